//! The OS sandbox around `run_shell_command`.
//!
//! A command never runs directly: the agent starts `patchflow-sandbox-exec` (this crate's
//! one binary, beside the agent's own; [`ShellSandbox::program`]), which in that fresh,
//! single-threaded process puts up the walls and then `exec`s `bash -c`:
//!
//! - a pids cgroup with `pids.max` (the fork-bomb wall; RLIMIT_NPROC does not bind root)
//!   and rlimits: CPU seconds, address space, processes, file size, no core dumps;
//! - no network unless the task's policy allows it: an empty network namespace (only a
//!   loopback that is down), or Landlock's TCP rules where namespaces are not allowed;
//! - `PR_SET_NO_NEW_PRIVS`, so no setuid binary gains anything;
//! - without network, also a seccomp filter: `socket()` for IP and packet families fails
//!   with EACCES (UDP too, which Landlock does not cover), and so does `io_uring_setup`;
//! - Landlock: the whole file system readable, writable only the workspace, the private
//!   temp dir and a few devices.
//!
//! The process group and the cgroup are killed when the command ends or times out. In
//! `best-effort` mode a layer the kernel lacks is reported once at start-up and skipped;
//! in `strict` mode the agent refuses to start and a command refuses to run without it.
//! Inside a Kubernetes Job the container is the outer wall and this is the inner one.

mod exec;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use exec::{ExecRequest, exec_sandboxed, main_with_args};

/// The file name of the binary that applies the sandbox (agent/src/bin), the only entry to
/// it: a program of its own links nothing that could start a thread before the walls are
/// up, and starts faster than the agent binaries would.
pub const SANDBOX_BINARY: &str = "patchflow-sandbox-exec";

/// How strictly commands are confined: the `sandbox_mode` setting.
pub use patchflow_core::config::SandboxMode;

/// What a sandboxed process got; printed as JSON by `patchflow-sandbox-exec --probe`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxReport {
    /// Landlock confines writes to the workspace and temp dir.
    pub landlock: bool,
    /// The network is off (namespace or Landlock TCP rules), or allowed by policy.
    pub network_confined: bool,
    /// A pids cgroup bounds the number of processes.
    pub pids_cgroup: bool,
    pub no_new_privs: bool,
    pub rlimits: bool,
    /// Without network: a seccomp filter refuses IP and packet sockets (and io_uring).
    #[serde(default)]
    pub seccomp: bool,
    /// What could not be put up, in words.
    pub missing: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox_mode must be `strict` or `best-effort`, not `{0}`")]
    Mode(String),
    #[error("cannot probe the shell sandbox: {0}")]
    Probe(String),
    #[error("strict sandbox mode: the kernel does not offer {0}; refusing to run commands")]
    Strict(String),
}

/// How shell commands are confined.
#[derive(Debug, Clone)]
pub struct ShellSandbox {
    /// The `patchflow-sandbox-exec` binary.
    pub program: PathBuf,
    pub mode: SandboxMode,
    /// Shell commands may use the network (the task's policy).
    pub network: bool,
    /// The private temp dir (HOME and TMPDIR of commands), writable like the workspace.
    pub scratch: PathBuf,
    pub max_processes: u64,
    pub max_memory_bytes: u64,
    /// Largest file a command may write.
    pub max_file_bytes: u64,
}

impl ShellSandbox {
    /// The sandbox started through the `patchflow-sandbox-exec` beside this executable
    /// (the agent binaries, the benchmarks: `cargo build --workspace` builds them all into
    /// one directory, and the image ships them side by side).
    pub fn beside_current_exe(scratch: &Path, mode: SandboxMode) -> std::io::Result<Self> {
        Ok(Self {
            program: std::env::current_exe()?.with_file_name(SANDBOX_BINARY),
            mode,
            network: false,
            scratch: scratch.to_path_buf(),
            max_processes: 256,
            max_memory_bytes: 8 << 30,
            max_file_bytes: 1 << 30,
        })
    }

    /// The arguments of `patchflow-sandbox-exec` for one command (then `--` and the
    /// command), as [`ExecRequest::parse`] reads them.
    pub fn exec_args(
        &self,
        workspace: &Path,
        cgroup: &str,
        cpu_seconds: u64,
        probe: bool,
    ) -> Vec<std::ffi::OsString> {
        let mut a: Vec<std::ffi::OsString> = vec![
            "--workspace".into(),
            workspace.into(),
            "--scratch".into(),
            self.scratch.clone().into(),
            "--mode".into(),
            self.mode.as_str().into(),
            "--cgroup".into(),
            cgroup.into(),
            "--cpu-seconds".into(),
            cpu_seconds.to_string().into(),
            "--max-processes".into(),
            self.max_processes.to_string().into(),
            "--max-memory-bytes".into(),
            self.max_memory_bytes.to_string().into(),
            "--max-file-bytes".into(),
            self.max_file_bytes.to_string().into(),
        ];
        if self.network {
            a.push("--network".into());
        }
        if probe {
            a.push("--probe".into());
        }
        a
    }

    /// Starts a sandboxed process that reports what it got, once at agent start-up. In
    /// strict mode anything missing is an error; in best-effort mode it is logged.
    pub async fn probe(&self, workspace: &Path) -> Result<SandboxReport, SandboxError> {
        let name = format!("probe-{}", std::process::id());
        let out = tokio::process::Command::new(&self.program)
            .args(self.exec_args(workspace, &name, 5, true))
            .env_clear()
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| SandboxError::Probe(format!("{}: {e}", self.program.display())))?;
        remove_cgroup(&name);
        let report: SandboxReport = serde_json::from_slice(&out.stdout).map_err(|_| {
            SandboxError::Probe(format!(
                "{} answered: {}",
                self.program.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        })?;
        if !report.missing.is_empty() {
            let missing = report.missing.join("; ");
            if self.mode == SandboxMode::Strict {
                return Err(SandboxError::Strict(missing));
            }
            tracing::warn!(
                missing = %missing,
                "shell sandbox is best-effort: these layers are not in force (set sandbox_mode=strict to refuse instead)"
            );
        }
        Ok(report)
    }
}

/// The pids cgroup a command runs in: v2 under the unified root, v1 under the pids
/// hierarchy. `None` where neither is mounted.
pub fn cgroup_dir(name: &str) -> Option<PathBuf> {
    let v2 = Path::new("/sys/fs/cgroup");
    if v2.join("cgroup.controllers").exists() {
        return Some(v2.join("patchflow").join(name));
    }
    let v1 = v2.join("pids");
    v1.join("cgroup.procs")
        .exists()
        .then(|| v1.join("patchflow").join(name))
}

/// Kills whatever still runs in a command's cgroup and removes it. Processes that left
/// the process group (`setsid`) are still in here.
pub fn remove_cgroup(name: &str) {
    let Some(dir) = cgroup_dir(name) else { return };
    if !dir.exists() {
        return;
    }
    if std::fs::write(dir.join("cgroup.kill"), "1").is_err() {
        // cgroup v1 has no cgroup.kill: signal every member until none is left.
        for _ in 0..50 {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            let pids: Vec<i32> = procs
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    tracing::warn!(cgroup = %dir.display(), "cannot remove a shell command's cgroup");
}
