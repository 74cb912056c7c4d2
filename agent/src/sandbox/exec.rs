//! The inside of `patchflow-sandbox-exec`: in this fresh, single-threaded process, make
//! the command's cgroup and rlimits, then either hand over to bubblewrap for the namespace
//! walls ([`super::bwrap`]) or, in `best-effort` where namespaces are refused, put up the
//! fallback walls here ([`super::landlock`], seccomp, no capabilities) and become the
//! command. No `unsafe`: each layer is a plain syscall wrapper applied before `exec`.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use landlock::RulesetStatus;
use nix::sched::{CloneFlags, unshare};
use nix::sys::resource::{Resource, setrlimit};
use nix::unistd::{Gid, Uid};

use super::{SandboxMode, SandboxReport, WALLS_FALLBACK, WALLS_NAMESPACES, bwrap, cgroup};

/// One sandboxed command, as `patchflow-sandbox-exec`'s arguments describe it.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub workspace: PathBuf,
    pub scratch: PathBuf,
    pub mode: SandboxMode,
    /// Name of the cgroup to create and join.
    pub cgroup: String,
    pub cpu_seconds: u64,
    pub max_processes: u64,
    pub max_memory_bytes: u64,
    pub max_file_bytes: u64,
    pub network: bool,
    /// The bubblewrap program: the namespace walls. Without it, the fallback walls.
    pub bwrap: Option<PathBuf>,
    /// Toolchain homes, read-only.
    pub read_only: Vec<PathBuf>,
    /// Paths inside the read-only binds to hide.
    pub masks: Vec<PathBuf>,
    /// Size of the private /tmp.
    pub tmp_bytes: u64,
    /// Fallback walls only: leave out the network namespace, so the layers that stand in
    /// for it where namespaces are refused (seccomp, Landlock's TCP rules) can be checked
    /// on their own.
    pub skip_netns: bool,
    /// Print what was put up (a JSON line on stdout) before running the command.
    pub probe: bool,
    /// A setup with `allow_hosts`: no network of its own, only the worker's egress proxy
    /// through this unix socket (see [`super::forward`]).
    pub proxy_socket: Option<PathBuf>,
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
            mode: SandboxMode::Strict,
            cgroup: String::new(),
            cpu_seconds: 60,
            max_processes: 256,
            max_memory_bytes: 8 << 30,
            max_file_bytes: 1 << 30,
            network: false,
            bwrap: None,
            read_only: Vec::new(),
            masks: Vec::new(),
            tmp_bytes: 512 << 20,
            skip_netns: false,
            probe: false,
            proxy_socket: None,
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
            let abs = |v: OsString| {
                let p = PathBuf::from(v);
                if p.is_absolute() {
                    Ok(p)
                } else {
                    Err(format!("{flag} needs an absolute path"))
                }
            };
            match flag.as_str() {
                "--workspace" => req.workspace = abs(value()?)?,
                "--scratch" => req.scratch = abs(value()?)?,
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
                "--tmp-bytes" => req.tmp_bytes = num(value()?)?,
                "--bwrap" => req.bwrap = Some(abs(value()?)?),
                "--ro" => req.read_only.push(abs(value()?)?),
                "--mask" => req.masks.push(abs(value()?)?),
                "--network" => req.network = true,
                "--skip-netns" => req.skip_netns = true,
                "--probe" => req.probe = true,
                "--proxy-socket" => req.proxy_socket = Some(abs(value()?)?),
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
    let args: Vec<OsString> = args.into_iter().collect();
    if args.first().is_some_and(|a| a == "--forward") {
        return super::forward::main(&args[1..]);
    }
    let result = ExecRequest::parse(args).and_then(|req| exec_sandboxed(&req).map(|n| match n {}));
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("patchflow-sandbox-exec: {e}");
            126
        }
    }
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

/// Fallback: an empty network namespace (only a loopback device that is down).
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

/// Fallback: no capability left, in any set, for this process and what it runs.
fn drop_capabilities() -> Result<(), String> {
    use caps::{CapSet, CapsHashSet};
    let err = |e: caps::errors::CapsError| format!("cannot drop capabilities: {e}");
    let empty = CapsHashSet::new();
    // The bounding set first (needs CAP_SETPCAP, so while we still have it): an exec by
    // uid 0 is granted only what is left in it.
    for cap in caps::all() {
        if caps::has_cap(None, CapSet::Bounding, cap).map_err(err)? {
            caps::drop(None, CapSet::Bounding, cap).map_err(err)?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(err)?;
    caps::set(None, CapSet::Inheritable, &empty).map_err(err)?;
    caps::set(None, CapSet::Effective, &empty).map_err(err)?;
    caps::set(None, CapSet::Permitted, &empty).map_err(err)
}

/// Applies the sandbox and `exec`s the command (through bubblewrap, or itself).
/// Returns only on failure.
pub fn exec_sandboxed(req: &ExecRequest) -> Result<std::convert::Infallible, String> {
    let mut report = SandboxReport::default();
    let joined = cgroup::join(&req.cgroup, req.max_processes, req.max_memory_bytes);
    report.pids_cgroup = joined.pids;
    report.memory_cgroup = joined.memory;
    report.missing.extend(joined.missing);
    match set_rlimits(req, !report.pids_cgroup) {
        Ok(()) => report.rlimits = true,
        Err(e) => report.missing.push(format!("resource limits ({e})")),
    }
    let Some((program, args)) = req.command.split_first() else {
        return Err("no command given".into());
    };
    let mut command = match &req.bwrap {
        Some(bwrap_program) => {
            // Through the egress proxy: an empty network namespace (no --network), but inet
            // sockets allowed, to reach the forwarder on its loopback.
            let proxied = req.proxy_socket.is_some();
            let pipes = bwrap::seccomp_pipes(req.network || proxied)?;
            let cwd = std::env::current_dir().map_err(|e| format!("no working directory: {e}"))?;
            let mut read_only = req.read_only.clone();
            let mut read_write = Vec::new();
            let mut forward: Vec<OsString> = Vec::new();
            if let Some(socket) = &req.proxy_socket {
                let me = std::env::current_exe()
                    .map_err(|e| format!("cannot find patchflow-sandbox-exec: {e}"))?;
                let dir = socket
                    .parent()
                    .ok_or("--proxy-socket needs a directory")?
                    .to_path_buf();
                read_only.push(me.clone());
                read_write.push(dir);
                forward = vec![
                    me.into(),
                    "--forward".into(),
                    super::forward::FORWARD_ADDR.into(),
                    socket.clone().into(),
                    "--".into(),
                ];
            }
            let layout = bwrap::Layout {
                workspace: &req.workspace,
                scratch: &req.scratch,
                read_only: &read_only,
                read_write: &read_write,
                masks: &req.masks,
                network: req.network && !proxied,
                tmp_bytes: req.tmp_bytes,
                cwd: &cwd,
            };
            report.walls = WALLS_NAMESPACES.into();
            report.mount_namespace = true;
            report.pid_namespace = true;
            report.user_namespace = true;
            report.no_capabilities = true;
            report.new_session = true;
            report.no_new_privs = true;
            report.seccomp = true;
            report.network_confined = true;
            let mut c = std::process::Command::new(bwrap_program);
            c.args(bwrap::args(&layout, &pipes))
                .arg("--")
                .args(&forward)
                .arg(program)
                .args(args);
            // The pipes' read ends must live until bubblewrap has read them, past exec.
            std::mem::forget(pipes);
            c
        }
        None if req.proxy_socket.is_some() => {
            return Err(
                "allow_hosts needs the namespace walls (bubblewrap): the fallback walls cannot give a script only the egress proxy"
                    .into(),
            );
        }
        None => {
            fallback(req, &mut report);
            let mut c = std::process::Command::new(program);
            c.args(args);
            c
        }
    };
    if req.probe {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string(&report).unwrap_or_default()
        );
        let _ = out.flush();
    }
    if req.mode == SandboxMode::Strict && !report.missing.is_empty() {
        return Err(format!(
            "strict sandbox mode: refusing to run the command without {}",
            report.missing.join("; ")
        ));
    }
    let err = command.exec();
    Err(format!(
        "cannot run {}: {err}",
        command.get_program().to_string_lossy()
    ))
}

/// The walls where namespaces are refused, put up on this process before it becomes the
/// command. Each that cannot be put up is named in `report.missing`.
fn fallback(req: &ExecRequest, report: &mut SandboxReport) {
    report.walls = WALLS_FALLBACK.into();
    report.missing.push(
        "namespaces (no bubblewrap, or the kernel refused them): commands see the host's file system through Landlock and its processes"
            .into(),
    );
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
    match drop_capabilities() {
        Ok(()) => report.no_capabilities = true,
        Err(e) => report.missing.push(e),
    }
    match super::landlock::restrict(&req.workspace, &req.scratch, &req.read_only, deny_tcp) {
        Ok(RulesetStatus::NotEnforced) => report.missing.push(
            "Landlock (this kernel does not offer it; reads and writes are not confined)".into(),
        ),
        Ok(_) => {
            report.landlock = true;
            if deny_tcp {
                report.network_confined = true;
            }
        }
        Err(e) => report.missing.push(format!("Landlock ({e})")),
    }
    match super::seccomp::apply(req.network) {
        Ok(()) => report.seccomp = true,
        Err(e) => report.missing.push(format!(
            "the seccomp filters ({e}); sockets, ptrace and mounts are not filtered"
        )),
    }
}
