//! The OS sandbox around `run_shell_command`.
//!
//! A command never runs directly: the agent starts `patchflow-sandbox-exec` (this crate's
//! one binary, beside the agent's own; [`ShellSandbox::program`]), which in that fresh,
//! single-threaded process makes the command's cgroup ([`cgroup`]: pids.max, the memory
//! limit) and rlimits (CPU seconds, address space, file size, no core dumps), then hands it
//! to bubblewrap for the namespace walls ([`bwrap`]): a minimal root of its own, its own
//! PID namespace under a reaper, an unprivileged uid in a user namespace, no
//! capabilities, no controlling terminal, no network unless the task's policy allows it,
//! and the seccomp filters ([`seccomp`]). Where namespaces are refused, `best-effort`
//! falls back to Landlock walls ([`landlock`]) with the same seccomp filters and no
//! capabilities, and says so loudly; `strict` (the default) refuses to run commands.
//!
//! Which walls a run gets is decided once, by a probe that runs a sandboxed shell and
//! checks from inside what it got ([`ShellSandbox::walls`]); its report is printed by
//! `patchflow doctor` and recorded in the task's summary. The process group and the
//! cgroup are killed when the command ends or times out. Inside a Kubernetes Job the
//! container is the outer wall and this is the inner one.

pub mod bwrap;
pub mod cgroup;
mod exec;
pub mod forward;
mod landlock;
pub mod seccomp;
pub mod toolchains;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use exec::{ExecRequest, exec_sandboxed, main_with_args};
pub use patchflow_core::SandboxReport;
pub use toolchains::Toolchain;

/// The file name of the binary that applies the sandbox (agent/src/bin), the only entry to
/// it: a program of its own links nothing that could start a thread before the walls are
/// up, and starts faster than the agent binaries would.
pub const SANDBOX_BINARY: &str = "patchflow-sandbox-exec";

/// How strictly commands are confined: the `sandbox_mode` setting.
pub use patchflow_core::config::SandboxMode;

/// [`SandboxReport::walls`] of the namespace walls and of the fallback.
pub const WALLS_NAMESPACES: &str = "namespaces";
pub const WALLS_FALLBACK: &str = "landlock";

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("cannot probe the shell sandbox: {0}")]
    Probe(String),
    #[error(
        "strict sandbox mode: {0}; refusing to run commands (install bubblewrap, or set sandbox_mode=best-effort to run with weaker walls)"
    )]
    Strict(String),
}

/// The walls a run's commands get, decided by the probe.
#[derive(Debug, Clone)]
pub struct Walls {
    /// Through bubblewrap (else the fallback walls).
    pub namespaces: bool,
    pub report: SandboxReport,
    /// Strict mode and something is missing: commands are refused with this.
    pub refused: Option<String>,
}

/// How shell commands are confined.
#[derive(Debug, Clone)]
pub struct ShellSandbox {
    /// The `patchflow-sandbox-exec` binary.
    pub program: PathBuf,
    pub mode: SandboxMode,
    /// Shell commands may use the network (the task's policy).
    pub network: bool,
    /// The task's temp dir (HOME and TMPDIR of commands), writable like the workspace.
    pub scratch: PathBuf,
    pub max_processes: u64,
    pub max_memory_bytes: u64,
    /// Largest file a command may write.
    pub max_file_bytes: u64,
    /// Most disk the workspace and temp dir may hold together.
    pub max_disk_bytes: u64,
    /// Size of each command's private /tmp.
    pub tmp_bytes: u64,
    /// The bubblewrap program ([`find_bwrap`]); `None`: only the fallback walls exist.
    pub bwrap: Option<PathBuf>,
    /// Toolchain homes bound read-only.
    pub toolchains: Vec<Toolchain>,
    /// A setup's egress proxy socket (`allow_hosts`): the command gets no network but it.
    pub proxy_socket: Option<PathBuf>,
    walls: Arc<tokio::sync::OnceCell<Walls>>,
    /// What to hide inside the read-only binds ([`bwrap::masks`] of `toolchains`), found
    /// once, by the probe.
    masks: Arc<std::sync::OnceLock<Vec<PathBuf>>>,
    /// The cgroup every command of this run joins, removed with the last clone.
    cgroup: Arc<TaskCgroup>,
}

/// The run's cgroup, by name; removed (with anything left in it) when dropped.
#[derive(Debug)]
pub struct TaskCgroup(pub String);

impl Drop for TaskCgroup {
    fn drop(&mut self) {
        cgroup::remove(&self.0);
    }
}

/// The bubblewrap program: `setting` if given, else `bwrap` on `path` (a PATH value), else
/// /usr/bin/bwrap; only an executable file counts.
pub fn find_bwrap(setting: Option<&Path>, path: Option<&str>) -> Option<PathBuf> {
    if let Some(p) = setting {
        return runnable(p).then(|| p.to_path_buf());
    }
    find_program("bwrap", path).or_else(|| {
        let usual = PathBuf::from("/usr/bin/bwrap");
        runnable(&usual).then_some(usual)
    })
}

/// `name` as an executable file in one of the absolute directories of `path` (a PATH
/// value), in order; a relative directory never counts.
pub fn find_program(name: &str, path: Option<&str>) -> Option<PathBuf> {
    path.unwrap_or_default()
        .split(':')
        .filter(|d| d.starts_with('/'))
        .map(|d| Path::new(d).join(name))
        .find(|p| runnable(p))
}

fn runnable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What the probe runs inside the walls: the process's own view of its capabilities,
/// seccomp and privileges, its pid (small in a PID namespace of its own), and whether the
/// host's /run, /var and /sys are there.
const PROBE_SCRIPT: &str = "grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status; echo pid=$$; if [ -e /run ] || [ -e /var ] || [ -e /sys ]; then echo root=host; else echo root=minimal; fi";

impl ShellSandbox {
    /// A sandbox with the default limits, started through `program`.
    pub fn new(program: PathBuf, scratch: &Path, mode: SandboxMode) -> Self {
        Self {
            program,
            mode,
            network: false,
            scratch: scratch.to_path_buf(),
            max_processes: 256,
            max_memory_bytes: 8 << 30,
            max_file_bytes: 1 << 30,
            max_disk_bytes: 8 << 30,
            tmp_bytes: 512 << 20,
            bwrap: find_bwrap(None, std::env::var("PATH").ok().as_deref()),
            toolchains: Vec::new(),
            proxy_socket: None,
            walls: Arc::default(),
            masks: Arc::default(),
            cgroup: Arc::new(TaskCgroup(format!(
                "task-{}-{}",
                std::process::id(),
                next_run()
            ))),
        }
    }

    /// The name of the cgroup the commands of this run join.
    pub fn cgroup_name(&self) -> &str {
        &self.cgroup.0
    }

    /// The sandbox started through the `patchflow-sandbox-exec` beside this executable
    /// (the agent binaries, the benchmarks: `cargo build --workspace` builds them all into
    /// one directory, and the image ships them side by side).
    pub fn beside_current_exe(scratch: &Path, mode: SandboxMode) -> std::io::Result<Self> {
        let program = std::env::current_exe()?.with_file_name(SANDBOX_BINARY);
        Ok(Self::new(program, scratch, mode))
    }

    /// The arguments of `patchflow-sandbox-exec` for one command under `walls` (then `--`
    /// and the command), as [`ExecRequest::parse`] reads them.
    pub fn exec_args(
        &self,
        workspace: &Path,
        cgroup: &str,
        cpu_seconds: u64,
        walls: &Walls,
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
            "--tmp-bytes".into(),
            self.tmp_bytes.to_string().into(),
        ];
        for t in &self.toolchains {
            a.extend(["--ro".into(), t.path.clone().into()]);
        }
        if walls.namespaces
            && let Some(bwrap) = &self.bwrap
        {
            a.extend(["--bwrap".into(), bwrap.clone().into()]);
            for m in self.masks() {
                a.extend(["--mask".into(), m.clone().into()]);
            }
        }
        if self.network {
            a.push("--network".into());
        }
        if let Some(socket) = &self.proxy_socket {
            a.extend(["--proxy-socket".into(), socket.clone().into()]);
        }
        if probe {
            a.push("--probe".into());
        }
        a
    }

    fn masks(&self) -> &[PathBuf] {
        self.masks.get_or_init(|| {
            let homes: Vec<PathBuf> = self.toolchains.iter().map(|t| t.path.clone()).collect();
            bwrap::masks(&homes)
        })
    }

    /// The walls of this run, decided by the first caller (the probe runs once): the
    /// namespace walls if they work here; else, in best-effort mode, the fallback walls,
    /// with a loud warning; in strict mode, a refusal every command reports.
    pub async fn walls(&self, workspace: &Path) -> &Walls {
        self.walls
            .get_or_init(|| async { self.decide(workspace).await })
            .await
    }

    /// The walls, if the probe has run.
    pub fn decided(&self) -> Option<&Walls> {
        self.walls.get()
    }

    /// Probes and returns the report; in strict mode anything missing is an error.
    pub async fn probe(&self, workspace: &Path) -> Result<SandboxReport, SandboxError> {
        let walls = self.walls(workspace).await;
        match &walls.refused {
            Some(why) => Err(SandboxError::Strict(why.clone())),
            None => Ok(walls.report.clone()),
        }
    }

    async fn decide(&self, workspace: &Path) -> Walls {
        let mut lost = Vec::new();
        if self.bwrap.is_some() {
            let masks_of = self.clone();
            let _ = tokio::task::spawn_blocking(move || {
                masks_of.masks();
            })
            .await;
            // Once bubblewrap works, its walls stay, whatever else is missing (strict mode
            // then refuses; best-effort runs under them and warns).
            match self.probe_walls(workspace, true).await {
                Ok(report) => return self.walls_of(true, report),
                Err(e) => lost.push(format!("namespaces ({e})")),
            }
        } else {
            lost.push(
                "namespaces (bubblewrap is not installed: apt-get install bubblewrap, or name it in sandbox_bwrap)"
                    .to_string(),
            );
        }
        let mut report = match self.probe_walls(workspace, false).await {
            Ok(report) => report,
            Err(e) => SandboxReport {
                walls: WALLS_FALLBACK.into(),
                missing: vec![format!("the fallback walls ({e})")],
                ..SandboxReport::default()
            },
        };
        // The fallback names "namespaces" generically; say why they are missing here.
        report.missing.retain(|m| !m.starts_with("namespaces"));
        lost.append(&mut report.missing);
        report.missing = lost;
        self.walls_of(false, report)
    }

    fn walls_of(&self, namespaces: bool, report: SandboxReport) -> Walls {
        let refused = (!report.missing.is_empty() && self.mode == SandboxMode::Strict)
            .then(|| report.missing.join("; "));
        if !report.missing.is_empty() && self.mode == SandboxMode::BestEffort {
            tracing::warn!(
                walls = %report.walls,
                missing = %report.missing.join("; "),
                "SHELL SANDBOX IS BEST-EFFORT: these layers are NOT in force for this task's commands (sandbox_mode=strict refuses instead)"
            );
        }
        Walls {
            namespaces,
            report,
            refused,
        }
    }

    /// Runs the probe script under the namespace walls or the fallback, and checks what
    /// `patchflow-sandbox-exec` says it put up against what the script saw from inside.
    async fn probe_walls(
        &self,
        workspace: &Path,
        namespaces: bool,
    ) -> Result<SandboxReport, String> {
        let name = format!("probe-{}-{}", std::process::id(), u8::from(namespaces));
        let walls = Walls {
            namespaces,
            report: SandboxReport::default(),
            refused: None,
        };
        // Best-effort here so the probe reports rather than refuses.
        let mut probe = self.clone();
        probe.mode = SandboxMode::BestEffort;
        // The walls, not a setup's proxy (whose forwarder would stand between).
        probe.proxy_socket = None;
        let out = tokio::process::Command::new(&self.program)
            .args(probe.exec_args(workspace, &name, 5, &walls, true))
            .args(["--", "/bin/sh", "-c", PROBE_SCRIPT])
            .current_dir(workspace)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| format!("{}: {e}", self.program.display()))?;
        let _ = tokio::task::spawn_blocking(move || cgroup::remove(&name)).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut lines = stdout.lines();
        let mut report: SandboxReport = lines
            .next()
            .and_then(|l| serde_json::from_str(l).ok())
            .ok_or_else(|| format!("{} answered: {}", self.program.display(), stderr.trim()))?;
        if !out.status.success() {
            return Err(stderr.trim().to_string());
        }
        let inside: std::collections::HashMap<&str, &str> = lines
            .filter_map(|l| l.split_once([':', '=']))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let zero = |k: &str| inside.get(k).is_some_and(|v| v.bytes().all(|b| b == b'0'));
        let check = |claimed: &mut bool, seen: bool, what: &str| {
            if *claimed && !seen {
                *claimed = false;
                report_missing(what)
            } else {
                None
            }
        };
        let mut missing = Vec::new();
        missing.extend(check(
            &mut report.no_capabilities,
            zero("CapEff") && zero("CapPrm") && zero("CapBnd"),
            "an empty capability set",
        ));
        missing.extend(check(
            &mut report.no_new_privs,
            inside.get("NoNewPrivs") == Some(&"1"),
            "PR_SET_NO_NEW_PRIVS",
        ));
        missing.extend(check(
            &mut report.seccomp,
            inside.get("Seccomp") == Some(&"2"),
            "the seccomp filters",
        ));
        let pid: u32 = inside
            .get("pid")
            .and_then(|p| p.parse().ok())
            .unwrap_or(u32::MAX);
        missing.extend(check(
            &mut report.pid_namespace,
            pid <= 3,
            "a PID namespace",
        ));
        missing.extend(check(
            &mut report.mount_namespace,
            inside.get("root") == Some(&"minimal"),
            "a minimal root",
        ));
        report.missing.extend(missing);
        Ok(report)
    }
}

fn report_missing(what: &str) -> Option<String> {
    Some(format!("{what} (claimed, but not seen from inside)"))
}

/// Kills whatever still runs in a command's cgroup and removes it.
pub fn remove_cgroup(name: &str) {
    cgroup::remove(name);
}

/// Numbers the sandboxes of this process (tests and benchmarks make several).
fn next_run() -> u64 {
    static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}
