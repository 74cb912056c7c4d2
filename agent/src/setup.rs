//! Setup and maintenance scripts: one script run under the same walls as
//! `run_shell_command` (the task's [`ShellSandbox`], with the network the setup's policy
//! gives), in the workspace, as `bash -e`, its output streamed line by line with the
//! secrets' values redacted, and the run bounded by a timeout and the disk cap.

use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncBufReadExt;
use tokio::process::Command;

use crate::sandbox::{self, ShellSandbox};
use crate::tools::ShellEnv;
use crate::workspace::Workspace;

/// Longest line kept (longer ones are cut, with a marker).
pub const MAX_LINE_BYTES: usize = 2000;
/// Lines kept for the tail a failure reports.
pub const TAIL_LINES: usize = 30;

/// One script to run.
pub struct Script<'a> {
    pub workspace: &'a Workspace,
    pub sandbox: &'a ShellSandbox,
    /// The base environment (PATH, HOME in the temp dir, the toolchains' variables).
    pub env: &'a ShellEnv,
    /// The setup's `env` and its secrets, over the base.
    pub extra_env: &'a [(String, String)],
    pub script: &'a str,
    pub timeout: Duration,
    /// Values never to show (the secrets'): replaced by `***` in every line.
    pub redact: &'a [String],
}

/// How a script ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptOutcome {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Set when the disk cap stopped it.
    pub over_disk: bool,
    /// The last lines (redacted), for the failure message.
    pub tail: Vec<String>,
    pub lines: u64,
    pub duration: Duration,
}

impl ScriptOutcome {
    pub fn success(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out && !self.over_disk
    }

    /// Why it failed, in one sentence (empty when it did not).
    pub fn failure(&self) -> String {
        if self.success() {
            return String::new();
        }
        let how = if self.timed_out {
            format!("timed out after {} s", self.duration.as_secs())
        } else if self.over_disk {
            "was stopped: the workspace and temp dir grew past the disk cap (shell_max_disk_mb)"
                .to_string()
        } else if let Some(code) = self.exit_code {
            format!("exited with code {code}")
        } else if let Some(sig) = self.signal {
            format!("was killed by signal {sig}")
        } else {
            "ended without an exit code".to_string()
        };
        let tail = self.tail.join("\n");
        if tail.is_empty() {
            how
        } else {
            format!("{how}; last output:\n{tail}")
        }
    }
}

/// `line` with every secret value replaced and cut to [`MAX_LINE_BYTES`].
pub fn redact(line: &str, secrets: &[String]) -> String {
    let mut out = line.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "***");
        }
    }
    if out.len() > MAX_LINE_BYTES {
        let mut cut = MAX_LINE_BYTES;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
        out.push_str(" …[line cut]");
    }
    out
}

/// Runs `s`, handing each output line (stdout and stderr as they come, redacted) to
/// `on_line`. An error only when the script could not be started at all.
pub async fn run(s: Script<'_>, mut on_line: impl FnMut(String)) -> Result<ScriptOutcome, String> {
    let root = s.workspace.root();
    let walls = s.sandbox.walls(root).await;
    if let Some(why) = &walls.refused {
        return Err(format!(
            "strict sandbox mode: this machine cannot confine the setup script ({why})"
        ));
    }
    let cgroup = format!("{}-setup", s.sandbox.cgroup_name());
    let mut cmd = Command::new(&s.sandbox.program);
    cmd.args(
        s.sandbox
            .exec_args(root, &cgroup, s.timeout.as_secs() + 1, walls, false),
    )
    .arg("--")
    .arg(&s.env.shell)
    .arg("-e")
    .arg("-c")
    .arg(s.script)
    .current_dir(root)
    .env_clear()
    .envs(s.env.vars.iter().map(|(k, v)| (k, v)))
    .envs(s.extra_env.iter().map(|(k, v)| (k, v)))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0)
    .kill_on_drop(true);
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| {
        format!(
            "cannot start the shell sandbox ({}): {e}",
            s.sandbox.program.display()
        )
    })?;
    let pgid = child.id().map(|id| Pid::from_raw(id as i32));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(256);
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(tokio::spawn(read_lines(out, tx.clone())));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(tokio::spawn(read_lines(err, tx.clone())));
    }
    drop(tx);
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    let mut lines = 0u64;
    let mut take = |line: String, tail: &mut std::collections::VecDeque<String>| {
        let line = redact(&line, s.redact);
        lines += 1;
        if tail.len() == TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(line.clone());
        on_line(line);
    };
    let timeout = tokio::time::sleep(s.timeout);
    tokio::pin!(timeout);
    let disk = crate::tools::shell::watch_disk(s.workspace, s.sandbox);
    tokio::pin!(disk);
    let mut status = None;
    let (mut timed_out, mut over_disk) = (false, false);
    loop {
        tokio::select! {
            line = rx.recv() => match line {
                Some(line) => take(line, &mut tail),
                // Both streams closed: the script (and whatever held them) is done.
                None => { status = child.wait().await.ok(); break; }
            },
            st = child.wait(), if status.is_none() => { status = st.ok(); }
            _ = &mut timeout => { timed_out = true; break; }
            _ = &mut disk => { over_disk = true; break; }
        }
        if status.is_some() {
            // Drain what is buffered, then stop waiting for streams a background process
            // may hold open.
            while let Ok(line) = rx.try_recv() {
                take(line, &mut tail);
            }
            break;
        }
    }
    if let Some(pgid) = pgid {
        let _ = killpg(pgid, Signal::SIGKILL);
    }
    {
        let cg = cgroup.clone();
        let _ = tokio::task::spawn_blocking(move || sandbox::cgroup::kill_members(&cg)).await;
    }
    let status = match status {
        Some(st) => Some(st),
        None => child.wait().await.ok(),
    };
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
    }
    while let Ok(line) = rx.try_recv() {
        take(line, &mut tail);
    }
    let _ = tokio::task::spawn_blocking(move || sandbox::remove_cgroup(&cgroup)).await;
    let (exit_code, signal) = match status {
        Some(st) => {
            use std::os::unix::process::ExitStatusExt;
            (st.code(), st.signal())
        }
        None => (None, None),
    };
    Ok(ScriptOutcome {
        exit_code,
        signal,
        timed_out,
        over_disk,
        tail: tail.into_iter().collect(),
        lines,
        duration: started.elapsed(),
    })
}

async fn read_lines<R: tokio::io::AsyncRead + Unpin>(r: R, tx: tokio::sync::mpsc::Sender<String>) {
    let mut reader = tokio::io::BufReader::new(r);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // Bounded: a line longer than this is sent in pieces.
        match (&mut reader)
            .take(64 * 1024)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\n', '\r'])
                    .to_string();
                if tx.send(line).await.is_err() {
                    break;
                }
            }
        }
    }
}

use tokio::io::AsyncReadExt as _;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_long_lines_cut() {
        let secrets = vec!["hunter2-secret".to_string(), String::new()];
        assert_eq!(
            redact("token=hunter2-secret and hunter2-secret", &secrets),
            "token=*** and ***"
        );
        let long = "é".repeat(MAX_LINE_BYTES);
        let cut = redact(&long, &secrets);
        assert!(cut.len() <= MAX_LINE_BYTES + 20 && cut.ends_with("[line cut]"));
    }

    #[test]
    fn a_failure_says_how_and_shows_the_tail() {
        let o = ScriptOutcome {
            exit_code: Some(3),
            signal: None,
            timed_out: false,
            over_disk: false,
            tail: vec!["pip: no such package".into()],
            lines: 1,
            duration: Duration::from_millis(5),
        };
        assert!(!o.success());
        assert_eq!(
            o.failure(),
            "exited with code 3; last output:\npip: no such package"
        );
    }
}
