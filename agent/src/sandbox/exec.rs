//! The inside of `patchflow-sandbox-exec`: put up every wall in this (fresh,
//! single-threaded) process, then replace it with the command. Nothing here needs
//! `unsafe`: each layer is a plain syscall wrapper (nix, landlock) applied to the process
//! itself before `exec`, so no `pre_exec` hook is involved.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use std::collections::BTreeMap;

use landlock::{
    ABI, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    path_beneath_rules,
};
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::unistd::{Gid, Uid};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

use super::{SandboxMode, SandboxReport, cgroup_dir};

/// One sandboxed command, as `patchflow-sandbox-exec`'s arguments describe it.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub workspace: PathBuf,
    pub scratch: PathBuf,
    pub mode: SandboxMode,
    /// Name of the pids cgroup to create and join.
    pub cgroup: String,
    pub cpu_seconds: u64,
    pub max_processes: u64,
    pub max_memory_bytes: u64,
    pub max_file_bytes: u64,
    pub network: bool,
    /// Leave out the network namespace, so the layers that stand in for it where
    /// namespaces are refused (seccomp, Landlock's TCP rules) can be checked on their own.
    pub skip_netns: bool,
    /// Report what was put up (JSON on stdout) instead of running a command.
    pub probe: bool,
    /// The program and its arguments.
    pub command: Vec<OsString>,
}

impl ExecRequest {
    /// Parses the arguments [`super::ShellSandbox::exec_args`] writes, then `--` and the
    /// command: the sandbox's one flag parser.
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Self, String> {
        let mut req = ExecRequest {
            workspace: PathBuf::new(),
            scratch: PathBuf::new(),
            mode: SandboxMode::BestEffort,
            cgroup: String::new(),
            cpu_seconds: 60,
            max_processes: 256,
            max_memory_bytes: 8 << 30,
            max_file_bytes: 1 << 30,
            network: false,
            skip_netns: false,
            probe: false,
            command: Vec::new(),
        };
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let flag = flag.to_string_lossy().into_owned();
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            let num = |v: OsString| {
                v.to_string_lossy()
                    .parse::<u64>()
                    .map_err(|_| format!("{flag} needs a number"))
            };
            match flag.as_str() {
                "--workspace" => req.workspace = value()?.into(),
                "--scratch" => req.scratch = value()?.into(),
                "--mode" => {
                    let v = value()?;
                    req.mode = SandboxMode::from_word(&v.to_string_lossy())
                        .ok_or_else(|| format!("bad --mode {}", v.to_string_lossy()))?;
                }
                "--cgroup" => req.cgroup = value()?.to_string_lossy().into_owned(),
                "--cpu-seconds" => req.cpu_seconds = num(value()?)?,
                "--max-processes" => req.max_processes = num(value()?)?,
                "--max-memory-bytes" => req.max_memory_bytes = num(value()?)?,
                "--max-file-bytes" => req.max_file_bytes = num(value()?)?,
                "--network" => req.network = true,
                "--skip-netns" => req.skip_netns = true,
                "--probe" => req.probe = true,
                "--" => {
                    req.command = it.collect();
                    break;
                }
                other => return Err(format!("unknown argument `{other}`")),
            }
        }
        if req.workspace.as_os_str().is_empty() || req.scratch.as_os_str().is_empty() {
            return Err("--workspace and --scratch are required".into());
        }
        if req.cgroup.is_empty()
            || !req
                .cgroup
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("--cgroup needs a plain name".into());
        }
        Ok(req)
    }
}

/// The entry point of `patchflow-sandbox-exec` over its arguments (without the program
/// name); returns the exit code for a failure to set up (the command's own code otherwise
/// never comes back here: the process has become it).
pub fn main_with_args(args: impl IntoIterator<Item = OsString>) -> u8 {
    let result = ExecRequest::parse(args).and_then(|req| exec_sandboxed(&req).map(|n| match n {}));
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("patchflow-sandbox-exec: {e}");
            126
        }
    }
}

/// Devices a command may write to (redirections to /dev/null are everywhere).
const WRITABLE_DEVICES: [&str; 5] = [
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/tty",
    "/dev/pts",
];

fn join_pids_cgroup(name: &str, max: u64) -> Result<(), String> {
    let dir = cgroup_dir(name).ok_or("no pids cgroup hierarchy is mounted")?;
    let parent = dir.parent().ok_or("bad cgroup path")?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    if !dir.join("pids.max").exists() {
        // cgroup v2: the pids controller must be enabled for the children of each level.
        let root = parent.parent().ok_or("bad cgroup path")?;
        let _ = std::fs::write(root.join("cgroup.subtree_control"), "+pids");
        let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+pids");
    }
    std::fs::write(dir.join("pids.max"), max.to_string())
        .map_err(|e| format!("cannot set pids.max: {e}"))?;
    std::fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
        .map_err(|e| format!("cannot join {}: {e}", dir.display()))
}

fn set_rlimits(req: &ExecRequest, with_nproc: bool) -> Result<(), String> {
    let set = |r: Resource, soft: u64, hard: u64| {
        setrlimit(r, soft, hard).map_err(|e| format!("setrlimit {r:?}: {e}"))
    };
    set(Resource::RLIMIT_CPU, req.cpu_seconds, req.cpu_seconds + 2)?;
    set(
        Resource::RLIMIT_AS,
        req.max_memory_bytes,
        req.max_memory_bytes,
    )?;
    set(
        Resource::RLIMIT_FSIZE,
        req.max_file_bytes,
        req.max_file_bytes,
    )?;
    set(Resource::RLIMIT_CORE, 0, 0)?;
    if with_nproc {
        // Counted per user across the machine, and never binding for root: only the
        // fallback where no pids cgroup could be made.
        set(Resource::RLIMIT_NPROC, req.max_processes, req.max_processes)?;
    }
    Ok(())
}

/// An empty network namespace: only a loopback device that is down.
fn network_off() -> Result<(), String> {
    if Uid::effective().is_root() {
        return unshare(CloneFlags::CLONE_NEWNET).map_err(|e| format!("unshare(net): {e}"));
    }
    let (uid, gid) = (Uid::current(), Gid::current());
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("unshare(user, net): {e}"))?;
    // Map our own ids so files keep their owner; setgroups must be denied first.
    let _ = std::fs::write("/proc/self/setgroups", "deny");
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))
        .and_then(|_| std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1")))
        .map_err(|e| format!("cannot map ids in the new user namespace: {e}"))
}

/// Socket families a command without network may not open: IP, raw packets. Unix
/// sockets stay (local tools talk over them), and so does netlink inside the empty
/// namespace it can only see.
const DENIED_FAMILIES: [i32; 3] = [libc::AF_INET, libc::AF_INET6, libc::AF_PACKET];

/// A seccomp filter that fails `socket()` and `socketpair()` for [`DENIED_FAMILIES`] with
/// EACCES, and `io_uring_setup` (whose socket operations would bypass the filter) with
/// EPERM; every other system call is allowed. Applied last before `exec` and inherited by
/// every child, it keeps UDP and raw sockets shut too, which Landlock's TCP rules do not.
fn seccomp_network_off() -> Result<(), String> {
    fn err(e: impl std::fmt::Display) -> String {
        format!("seccomp: {e}")
    }
    let arch = std::env::consts::ARCH
        .try_into()
        .map_err(|_| format!("seccomp: no filter for {}", std::env::consts::ARCH))?;
    let family_rules = || -> Result<Vec<SeccompRule>, String> {
        DENIED_FAMILIES
            .iter()
            .map(|&family| {
                let cond = SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    family as u64,
                )
                .map_err(err)?;
                SeccompRule::new(vec![cond]).map_err(err)
            })
            .collect()
    };
    let sockets: BTreeMap<i64, Vec<SeccompRule>> = [
        (libc::SYS_socket, family_rules()?),
        (libc::SYS_socketpair, family_rules()?),
    ]
    .into();
    let sockets: BpfProgram = SeccompFilter::new(
        sockets,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EACCES as u32),
        arch,
    )
    .and_then(TryInto::try_into)
    .map_err(err)?;
    let uring: BpfProgram = SeccompFilter::new(
        [(libc::SYS_io_uring_setup, vec![])].into(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .and_then(TryInto::try_into)
    .map_err(err)?;
    seccompiler::apply_filter(&sockets).map_err(err)?;
    seccompiler::apply_filter(&uring).map_err(err)
}

fn landlock(req: &ExecRequest, deny_tcp: bool) -> Result<RulesetStatus, String> {
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
    let writable: Vec<&Path> = [req.workspace.as_path(), req.scratch.as_path()]
        .into_iter()
        .chain(WRITABLE_DEVICES.iter().map(Path::new))
        .filter(|p| p.exists())
        .collect();
    let status = ruleset
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(writable, AccessFs::from_all(abi)))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(status.ruleset)
}

/// Applies the sandbox and `exec`s the command. Returns only on failure (or after a
/// probe, which prints its report and exits).
pub fn exec_sandboxed(req: &ExecRequest) -> Result<std::convert::Infallible, String> {
    let mut report = SandboxReport::default();
    match join_pids_cgroup(&req.cgroup, req.max_processes) {
        Ok(()) => report.pids_cgroup = true,
        Err(e) => report
            .missing
            .push(format!("a pids cgroup to bound processes ({e})")),
    }
    match set_rlimits(req, !report.pids_cgroup) {
        Ok(()) => report.rlimits = true,
        Err(e) => report.missing.push(format!("resource limits ({e})")),
    }
    let mut deny_tcp = false;
    if req.network {
        report.network_confined = true;
    } else if req.skip_netns {
        deny_tcp = true;
    } else {
        match network_off() {
            Ok(()) => report.network_confined = true,
            Err(e) => {
                deny_tcp = true;
                report.missing.push(format!(
                    "a network namespace ({e}); only TCP is blocked, by Landlock"
                ));
            }
        }
    }
    match nix::sys::prctl::set_no_new_privs() {
        Ok(()) => report.no_new_privs = true,
        Err(e) => report.missing.push(format!("PR_SET_NO_NEW_PRIVS ({e})")),
    }
    match landlock(req, deny_tcp) {
        Ok(RulesetStatus::NotEnforced) => report
            .missing
            .push("Landlock (this kernel does not offer it; writes are not confined)".into()),
        Ok(_) => {
            report.landlock = true;
            if deny_tcp {
                report.network_confined = true;
            }
        }
        Err(e) => report.missing.push(format!("Landlock ({e})")),
    }
    if req.network {
        report.seccomp = true;
    } else {
        match seccomp_network_off() {
            Ok(()) => report.seccomp = true,
            Err(e) => report.missing.push(format!(
                "a seccomp filter on sockets ({e}); UDP and raw sockets are open wherever the network namespace is missing"
            )),
        }
    }
    if req.probe {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
        std::process::exit(0);
    }
    if req.mode == SandboxMode::Strict && !report.missing.is_empty() {
        return Err(format!(
            "strict sandbox mode: refusing to run the command without {}",
            report.missing.join("; ")
        ));
    }
    let Some((program, args)) = req.command.split_first() else {
        return Err("no command given".into());
    };
    let err = std::process::Command::new(program).args(args).exec();
    Err(format!("cannot run {}: {err}", program.to_string_lossy()))
}
