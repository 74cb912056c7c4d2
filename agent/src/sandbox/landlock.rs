//! The fallback walls, for `best-effort` where namespaces are refused (a pod under the
//! restricted profile, a kernel without unprivileged user namespaces): Landlock lets a
//! command read only what the minimal root would hold (the system directories, the
//! toolchain homes, the workspace, the temp dir, a few devices, /proc) and write only the
//! workspace and temp dir; with no network, TCP bind and connect are refused too. The data
//! dir, other tasks' workspaces, the tool cache and the operator's home stay out of reach.

use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    path_beneath_rules,
};

/// Devices a command may open (redirections to /dev/null are everywhere). Not /dev/tty:
/// the agent's terminal is not the command's.
const DEVICES: [&str; 6] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/pts",
];

/// Applies the rules. `deny_tcp`: no network namespace stands in for the policy.
pub fn restrict(
    workspace: &Path,
    scratch: &Path,
    read_only: &[PathBuf],
    deny_tcp: bool,
) -> Result<RulesetStatus, String> {
    let abi = ABI::V5;
    let err = |e: landlock::RulesetError| format!("landlock: {e}");
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?;
    if deny_tcp {
        // Handled with no port rule: every TCP bind and connect is refused.
        ruleset = ruleset
            .handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp)
            .map_err(err)?;
    }
    let readable: Vec<PathBuf> = super::bwrap::SYSTEM_DIRS
        .iter()
        .map(PathBuf::from)
        .chain(read_only.iter().cloned())
        .chain(["/proc".into(), "/dev/shm".into()])
        .filter(|p| p.exists())
        .collect();
    let writable: Vec<&Path> = [workspace, scratch]
        .into_iter()
        .chain(DEVICES.iter().map(Path::new))
        .filter(|p| p.exists())
        .collect();
    let status = ruleset
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(readable, AccessFs::from_read(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(writable, AccessFs::from_all(abi)))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(status.ruleset)
}
