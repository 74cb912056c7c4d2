//! `run_shell_command`: a command in the OS sandbox ([`crate::sandbox`]), in its own
//! process group and pids cgroup, with a timeout, a minimal environment (no API keys) and
//! bounded output. When it ends, whatever it left running in its group or cgroup is killed
//! too, so a stray `server &` cannot outlive its step.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use super::ToolError;
use crate::sandbox::{self, ShellSandbox};
use crate::truncate::{CappedBuffer, MAX_BYTES, MAX_LINES, head_tail};
use crate::workspace::Workspace;

pub const DEFAULT_TIMEOUT_SECS: u64 = 60;
pub const MAX_TIMEOUT_SECS: u64 = 600;
/// Bytes of each stream kept in memory (head and tail each) before the model cut.
const CAPTURE_CAP: usize = 256 * 1024;

#[derive(Debug, Deserialize)]
pub struct ShellArgs {
    pub command_string: String,
    #[serde(default)]
    pub target_directory: Option<String>,
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
}

/// The environment commands run with: built once, never containing secrets.
#[derive(Debug, Clone)]
pub struct ShellEnv {
    pub shell: PathBuf,
    pub vars: Vec<(String, String)>,
}

impl ShellEnv {
    /// PATH and locale from the agent's own environment, HOME and TMPDIR in `scratch`, and
    /// the variables naming the toolchain homes (HOME moved, so rustup and pyenv find
    /// theirs only through them).
    pub fn with_toolchains(
        scratch: &std::path::Path,
        toolchains: &[crate::sandbox::Toolchain],
    ) -> Self {
        let mut env = Self::minimal(scratch);
        for t in toolchains {
            if let Some(var) = &t.var {
                env.vars.push((var.clone(), t.path.display().to_string()));
            }
        }
        env
    }

    /// PATH and locale from the agent's own environment, HOME and TMPDIR in `scratch`.
    pub fn minimal(scratch: &std::path::Path) -> Self {
        let shell = ["/bin/bash", "/usr/bin/bash", "/bin/sh"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("sh"));
        let path =
            std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".to_string());
        let scratch = scratch.display().to_string();
        Self {
            shell,
            vars: vec![
                ("PATH".into(), path),
                ("HOME".into(), scratch.clone()),
                ("TMPDIR".into(), scratch),
                ("LANG".into(), "C.UTF-8".into()),
                ("TERM".into(), "dumb".into()),
                ("PAGER".into(), "cat".into()),
                ("GIT_PAGER".into(), "cat".into()),
                ("PYTHONDONTWRITEBYTECODE".into(), "1".into()),
                ("CI".into(), "1".into()),
            ],
        }
    }
}

pub async fn run(
    ws: &Workspace,
    env: &ShellEnv,
    sandbox: &ShellSandbox,
    args: ShellArgs,
    budget: Duration,
) -> Result<Value, ToolError> {
    if args.command_string.trim().is_empty() {
        return Err(ToolError::new("command_string is empty"));
    }
    let dir_rel = args.target_directory.as_deref().unwrap_or(".");
    let dir = ws.resolve(if dir_rel.is_empty() { "." } else { dir_rel })?;
    if !dir.is_dir() {
        return Err(ToolError::new(format!(
            "target_directory `{dir_rel}` is not a directory"
        )));
    }
    let requested = args
        .timeout_seconds
        .unwrap_or(DEFAULT_TIMEOUT_SECS)
        .clamp(1, MAX_TIMEOUT_SECS);
    let timeout = Duration::from_secs(requested).min(budget.max(Duration::from_secs(1)));

    let walls = sandbox.walls(ws.root()).await;
    if let Some(why) = &walls.refused {
        return Err(ToolError::new(format!(
            "strict sandbox mode: this machine cannot confine commands ({why}); no command runs. Install bubblewrap, or set sandbox_mode=best-effort to accept weaker walls"
        )));
    }
    let cgroup = sandbox.cgroup_name().to_string();
    let mut cmd = Command::new(&sandbox.program);
    // The CPU limit is a backstop behind the timeout: a command cannot burn more CPU
    // seconds than it has wall seconds.
    cmd.args(sandbox.exec_args(ws.root(), &cgroup, timeout.as_secs() + 1, walls, false))
        .arg("--")
        .arg(&env.shell)
        .arg("-c")
        .arg(&args.command_string)
        .current_dir(&dir)
        .env_clear()
        .envs(env.vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| {
        ToolError::new(format!(
            "cannot start the shell sandbox ({}): {e}",
            sandbox.program.display()
        ))
    })?;
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let out_task = tokio::spawn(async move { drain(stdout.as_mut()).await });
    let err_task = tokio::spawn(async move { drain(stderr.as_mut()).await });

    let (status, timed_out, over_disk) = tokio::select! {
        s = child.wait() => (s.ok(), false, None),
        _ = tokio::time::sleep(timeout) => (None, true, None),
        used = watch_disk(ws, sandbox) => (None, false, Some(used)),
    };
    // Kill the whole group: on timeout the command itself, otherwise anything it left
    // behind in the background (which would also hold our pipes open).
    if let Some(pgid) = pgid {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    // And everything that left the group (`setsid`) but not the cgroup.
    let _ = tokio::task::spawn_blocking(move || sandbox::cgroup::kill_members(&cgroup)).await;
    let status = match status {
        Some(s) => Some(s),
        None => child.wait().await.ok(),
    };
    let grace = Duration::from_secs(2);
    let stdout = tokio::time::timeout(grace, out_task)
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    let stderr = tokio::time::timeout(grace, err_task)
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    let (stdout, cut_out) = head_tail(&stdout, MAX_BYTES, MAX_LINES);
    let (stderr, cut_err) = head_tail(&stderr, MAX_BYTES, MAX_LINES);
    let (exit_code, signal) = match status {
        Some(s) => {
            use std::os::unix::process::ExitStatusExt;
            (s.code(), s.signal())
        }
        None => (None, None),
    };
    let mut v = json!({
        "exit_code": exit_code,
        "timed_out": timed_out,
        "stdout": stdout,
        "stderr": stderr,
        "truncated": cut_out || cut_err,
        "duration_ms": started.elapsed().as_millis() as u64,
    });
    if timed_out {
        v["error"] = json!(format!(
            "command timed out after {} s and was killed",
            timeout.as_secs()
        ));
    } else if let Some(used) = over_disk {
        v["error"] = json!(disk_error(used, sandbox.max_disk_bytes));
    } else if let Some(sig) = signal {
        v["signal"] = json!(sig);
    }
    Ok(v)
}

async fn drain<R: tokio::io::AsyncRead + Unpin>(r: Option<&mut R>) -> String {
    let Some(r) = r else { return String::new() };
    let mut buf = CappedBuffer::new(CAPTURE_CAP);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.push(&chunk[..n]),
        }
    }
    buf.into_string()
}

fn disk_error(used: u64, cap: u64) -> String {
    let (used, cap) = (used >> 20, cap >> 20);
    format!(
        "the command was killed: the workspace and temp dir grew to {used} MiB, over the {cap} MiB cap (shell_max_disk_mb); remove what it wrote (a quick `rm` runs before the next check) before going on"
    )
}

/// Bytes of disk the workspace and temp dir take (allocated blocks, so sparse files count
/// for what they hold), stopping early once past `stop_at`.
fn disk_usage(dirs: &[std::path::PathBuf], stop_at: u64) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    for dir in dirs {
        for entry in walkdir::WalkDir::new(dir)
            .follow_links(false)
            .into_iter()
            .flatten()
        {
            if let Ok(meta) = entry.metadata() {
                total = total.saturating_add(meta.blocks().saturating_mul(512));
                if total > stop_at {
                    return total;
                }
            }
        }
    }
    total
}

/// Resolves (with the usage) once the workspace and temp dir are past the cap while a
/// command runs; never otherwise. The first check is 200 ms in, so short commands (an
/// `rm` of what a killed one left) never pay for it. Each check is a walk of both trees, so they are spaced
/// at least four walks apart (a quarter of one core at most) and never under 200 ms.
pub(crate) async fn watch_disk(ws: &Workspace, sandbox: &ShellSandbox) -> u64 {
    let dirs = vec![ws.root().to_path_buf(), sandbox.scratch.clone()];
    let cap = sandbox.max_disk_bytes;
    let mut pause = Duration::from_millis(200);
    loop {
        tokio::time::sleep(pause).await;
        let dirs = dirs.clone();
        let started = Instant::now();
        let used = tokio::task::spawn_blocking(move || disk_usage(&dirs, cap))
            .await
            .unwrap_or(0);
        if used > cap {
            return used;
        }
        pause = (started.elapsed() * 4).max(Duration::from_millis(200));
    }
}
