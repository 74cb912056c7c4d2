//! The namespace walls, put up by bubblewrap (the sandbox Flatpak and Codex CLI run
//! commands in). `patchflow-sandbox-exec` hands it:
//!
//! - fresh user, mount, PID, IPC, UTS and cgroup namespaces, and an empty network
//!   namespace unless the task's policy allows network;
//! - a minimal root: the system directories read-only, the toolchain homes read-only
//!   (their credential files and anything not world-readable hidden), the workspace and
//!   the task's temp dir read-write, a size-bounded tmpfs at /tmp, a minimal /dev with its
//!   own pts, a /proc of its own. Not the data dir, not other workspaces, not the tool
//!   cache, not the operator's home, not /run or its sockets;
//! - a reaper as PID 1, a session of its own (no controlling terminal), every capability
//!   dropped, an unprivileged uid when the worker is root, death with the agent;
//! - the seccomp filters ([`super::seccomp`]), each through a pipe, loaded last.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// System directories bound read-only (or recreated as the symlinks they are).
pub const SYSTEM_DIRS: [&str; 8] = [
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
];

/// The uid and gid commands of a root worker run as inside their user namespace.
pub const SANDBOX_ID: u32 = 1000;

/// What the walls are built from.
pub struct Layout<'a> {
    pub workspace: &'a Path,
    pub scratch: &'a Path,
    /// Toolchain homes, bound read-only.
    pub read_only: &'a [PathBuf],
    /// Bound read-write at the same path (the egress proxy's socket directory).
    pub read_write: &'a [PathBuf],
    /// Paths inside the read-only binds to hide (files behind /dev/null, directories
    /// behind an empty tmpfs).
    pub masks: &'a [PathBuf],
    pub network: bool,
    pub tmp_bytes: u64,
    /// The command's working directory.
    pub cwd: &'a Path,
}

fn push(args: &mut Vec<OsString>, items: &[&dyn AsRef<std::ffi::OsStr>]) {
    args.extend(items.iter().map(|i| i.as_ref().to_os_string()));
}

/// bubblewrap's arguments up to (not including) `--` and the command; `seccomp` are the
/// read ends of the pipes holding the filters, which must stay open through `exec`.
pub fn args(layout: &Layout<'_>, seccomp: &[OwnedFd]) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::with_capacity(96);
    push(
        &mut a,
        &[
            &"--unshare-user",
            &"--unshare-pid",
            &"--unshare-ipc",
            &"--unshare-uts",
            &"--unshare-cgroup-try",
            &"--die-with-parent",
            &"--new-session",
            &"--cap-drop",
            &"ALL",
            &"--hostname",
            &"sandbox",
        ],
    );
    if !layout.network {
        push(&mut a, &[&"--unshare-net"]);
    }
    if nix::unistd::Uid::effective().is_root() {
        let id = SANDBOX_ID.to_string();
        push(&mut a, &[&"--uid", &id, &"--gid", &id]);
    }
    for dir in SYSTEM_DIRS {
        let path = Path::new(dir);
        match std::fs::read_link(path) {
            Ok(target) => push(&mut a, &[&"--symlink", &target, &dir]),
            Err(_) if path.is_dir() => push(&mut a, &[&"--ro-bind", &dir, &dir]),
            Err(_) => {}
        }
    }
    for dir in layout.read_only {
        push(&mut a, &[&"--ro-bind", dir, dir]);
    }
    for mask in layout.masks {
        if mask.is_dir() {
            push(&mut a, &[&"--tmpfs", mask, &"--remount-ro", mask]);
        } else {
            push(&mut a, &[&"--ro-bind", &"/dev/null", mask]);
        }
    }
    let size = layout.tmp_bytes.to_string();
    push(
        &mut a,
        &[
            &"--dev", &"/dev", &"--proc", &"/proc", &"--size", &size, &"--tmpfs", &"/tmp",
        ],
    );
    // After /tmp, so a workspace or temp dir under /tmp is bound over the tmpfs.
    push(
        &mut a,
        &[
            &"--bind",
            &layout.scratch,
            &layout.scratch,
            &"--bind",
            &layout.workspace,
            &layout.workspace,
            &"--chdir",
            &layout.cwd,
        ],
    );
    for dir in layout.read_write {
        push(&mut a, &[&"--bind", dir, dir]);
    }
    for fd in seccomp {
        let n = fd.as_raw_fd().to_string();
        push(&mut a, &[&"--add-seccomp-fd", &n]);
    }
    a
}

/// The filters in pipes bubblewrap reads, their read ends left open across `exec`.
pub fn seccomp_pipes(network: bool) -> Result<Vec<OwnedFd>, String> {
    use std::io::Write;
    let mut fds = Vec::new();
    for program in super::seccomp::filters(network)? {
        let bytes = super::seccomp::to_bytes(&program);
        let (reader, mut writer) = std::io::pipe().map_err(|e| format!("pipe: {e}"))?;
        // Far below a pipe's 64 KiB, so this never blocks with nobody reading.
        writer
            .write_all(&bytes)
            .map_err(|e| format!("cannot write a seccomp filter: {e}"))?;
        drop(writer);
        let fd: OwnedFd = reader.into();
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
        )
        .map_err(|e| format!("fcntl: {e}"))?;
        fds.push(fd);
    }
    Ok(fds)
}

/// Paths commands must not read inside what is bound read-only: in `/etc` and at the top
/// of each toolchain home, whatever is not world-readable (a root worker's commands keep
/// root's uid outside their namespace, so owner-only files would otherwise be open to
/// them), and the toolchains' credential files.
pub fn masks(toolchains: &[PathBuf]) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let hidden = |meta: &std::fs::Metadata| {
        let mode = meta.mode();
        if meta.is_dir() {
            mode & 0o005 != 0o005
        } else {
            mode & 0o004 == 0
        }
    };
    let mut walk = walkdir::WalkDir::new("/etc").max_depth(4).into_iter();
    let mut seen = 0;
    while let Some(entry) = walk.next() {
        seen += 1;
        if seen > 20_000 {
            break;
        }
        let Ok(entry) = entry else { continue };
        if entry.depth() == 0 || entry.path_is_symlink() {
            continue;
        }
        let Ok(meta) = entry.metadata() else { continue };
        if hidden(&meta) {
            if meta.is_dir() {
                walk.skip_current_dir();
            }
            out.push(entry.into_path());
        }
    }
    for home in toolchains {
        let Ok(entries) = std::fs::read_dir(home) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let named = entry
                .file_name()
                .to_str()
                .is_some_and(|n| super::toolchains::CREDENTIAL_FILES.contains(&n));
            let meta = std::fs::symlink_metadata(&path);
            let is_link = meta.as_ref().is_ok_and(|m| m.file_type().is_symlink());
            if !is_link && (named || meta.as_ref().is_ok_and(&hidden)) {
                out.push(path);
            }
        }
    }
    // Parents before children (bubblewrap mounts in order), no path under a hidden dir.
    out.sort();
    let mut kept: Vec<PathBuf> = Vec::new();
    for p in out {
        if !kept.iter().any(|k| p.starts_with(k)) {
            kept.push(p);
        }
    }
    kept
}
