//! The local runner: `patchflow agent` as a child process in a fresh workspace restored
//! from the staged archive, with a scrubbed environment, a wall-clock limit, its own
//! process group (killed whole on cancel or timeout) and death with the worker.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use patchflow_core::task::SECRET_ENV_PREFIX;
use patchflow_core::{AgentEvent, AgentSummary, Secret, TaskId, TaskSpec, layout};
use patchflow_platform::ObjectStore;
use patchflow_platform::process::stop_group;
use patchflow_workflows::io::PreparedEnv;
use tokio::io::AsyncBufReadExt;
use tokio::process::Command;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use super::agent_runner::{AgentRunner, RunTarget, RunnerError};
use crate::handoff;
use patchflow_platform::archive;

/// Extra time past the task's wall budget before the runner kills an agent that did not
/// stop itself.
const WALL_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct LocalRunnerConfig {
    /// The `patchflow` executable (its `agent` subcommand is run).
    pub program: PathBuf,
    pub model: String,
    pub openai_base_url: Option<String>,
    pub openai_api_key: Option<Secret>,
    pub llm_max_retries: u32,
    pub llm_retry_backoff_ms: u64,
    /// Settings the agent reads besides the model's (`PATCHFLOW_SANDBOX_MODE`,
    /// `PATCHFLOW_TOOL_*`, …), passed as they are.
    pub agent_env: Vec<(String, String)>,
}

pub struct LocalRunner {
    pub config: LocalRunnerConfig,
}

impl LocalRunner {
    pub fn new(config: LocalRunnerConfig) -> Self {
        Self { config }
    }

    /// The only variables the agent sees: no worker secrets besides the model key, no
    /// database or store credentials.
    /// `worker_env` reads the worker's own environment (`std::env::var` outside tests).
    fn environment(
        &self,
        scratch: &Path,
        spec: &TaskSpec,
        worker_env: impl Fn(&str) -> Option<String>,
    ) -> Vec<(String, String)> {
        let c = &self.config;
        let mut env = vec![
            (
                "PATH".to_string(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
            ),
            ("LANG".to_string(), "C.UTF-8".to_string()),
            ("HOME".to_string(), scratch.display().to_string()),
            ("TMPDIR".to_string(), scratch.display().to_string()),
            ("PATCHFLOW_MODEL".to_string(), c.model.clone()),
            (
                "PATCHFLOW_LLM_MAX_RETRIES".to_string(),
                c.llm_max_retries.to_string(),
            ),
            (
                "PATCHFLOW_LLM_RETRY_BACKOFF_MS".to_string(),
                c.llm_retry_backoff_ms.to_string(),
            ),
        ];
        if let Some(u) = &c.openai_base_url {
            env.push(("OPENAI_BASE_URL".into(), u.clone()));
        }
        if let Some(k) = &c.openai_api_key {
            env.push(("OPENAI_API_KEY".into(), k.expose().to_string()));
        }
        if let Ok(filter) = std::env::var("RUST_LOG") {
            env.push(("RUST_LOG".into(), filter));
        }
        env.extend(c.agent_env.iter().cloned());
        // Only the task secrets this task's policy names (validated to be
        // `PATCHFLOW_SECRET_*`), and only if the operator set them.
        for s in &spec.policy.secrets {
            if s.env.starts_with(SECRET_ENV_PREFIX)
                && let Some(v) = worker_env(&s.env)
            {
                env.push((s.env.clone(), v));
            }
        }
        env
    }
}

/// Uploads the run's files under `prefix`, the summary last.
async fn upload_results(
    objects: &dyn ObjectStore,
    prefix: &str,
    out: &Path,
) -> Result<(), RunnerError> {
    for file in layout::RUN_FILES {
        let path = out.join(file);
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            objects.put_file(&format!("{prefix}{file}"), &path).await?;
        }
    }
    Ok(())
}

/// Downloads what a follow-up resumes (the task's current conversation and changes) into
/// `dir`; a file the task does not have is left out.
async fn download_resume(
    objects: &dyn ObjectStore,
    task: &TaskId,
    dir: &Path,
) -> Result<(), RunnerError> {
    tokio::fs::create_dir_all(dir).await?;
    for file in [layout::CONVERSATION, layout::CHANGES] {
        match objects
            .get_to_file(&layout::result_key(task, file), &dir.join(file))
            .await
        {
            Ok(_) => {}
            Err(patchflow_platform::ObjectError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Downloads the tar.zst `key` to `file` and unpacks it into `dest`.
async fn restore(
    objects: &dyn ObjectStore,
    key: &str,
    file: &Path,
    dest: &Path,
) -> Result<(), RunnerError> {
    objects.get_to_file(key, file).await?;
    let (a, d) = (file.to_path_buf(), dest.to_path_buf());
    tokio::task::spawn_blocking(move || archive::unpack_tar_zst(&a, &d))
        .await
        .map_err(|e| RunnerError::Failed(e.to_string()))??;
    Ok(())
}

/// Where `patchflow agent` reads and writes.
pub struct AgentPaths<'a> {
    pub task_spec: &'a Path,
    pub workspace: &'a Path,
    pub baseline: &'a Path,
    pub out: &'a Path,
    pub scratch: &'a Path,
}

/// The file name of the slim agent binary.
pub const AGENT_BINARY: &str = "patchflow-agent";

/// The program a runner starts for an agent: `patchflow-agent` when it sits beside the
/// `patchflow` executable `exe` and was built from the same sources (`build` is
/// `patchflow`'s own agent build id, which `patchflow-agent --build-id` must print), else
/// `exe` itself (its `agent` subcommand). Either answers `<program> agent …` the same way.
/// Asks the slim binary once: call it when a runner is made, not per task.
pub fn agent_program(exe: &Path, build: &str) -> PathBuf {
    let slim = exe.with_file_name(AGENT_BINARY);
    if !slim.is_file() {
        return exe.to_path_buf();
    }
    let answer = std::process::Command::new(&slim)
        .arg("--build-id")
        .env_clear()
        .output();
    match answer {
        Ok(out) if out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == build => {
            slim
        }
        _ => {
            tracing::warn!(agent = %slim.display(), "patchflow-agent is from another build than patchflow; agents run as `patchflow agent` instead (build both binaries: cargo build -p patchflow)");
            exe.to_path_buf()
        }
    }
}

/// `patchflow agent` on `paths`, run in the workspace: what every runner starts.
pub fn agent_command(program: &Path, paths: &AgentPaths<'_>, task_id: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.arg("agent")
        .arg("--task")
        .arg(paths.task_spec)
        .arg("--workspace")
        .arg(paths.workspace)
        .arg("--baseline")
        .arg(paths.baseline)
        .arg("--out")
        .arg(paths.out)
        .arg("--scratch")
        .arg(paths.scratch)
        .arg("--task-id")
        .arg(task_id)
        .current_dir(paths.workspace);
    cmd
}

/// The last lines of the agent's log, for an error message.
async fn log_tail(path: &Path) -> String {
    let text = tokio::fs::read_to_string(path).await.unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

#[async_trait]
impl AgentRunner for LocalRunner {
    fn runs_on_this_machine(&self) -> bool {
        true
    }

    async fn run_target(
        &self,
        target: &RunTarget,
        task: &TaskId,
        spec: &TaskSpec,
        prepared: Option<&PreparedEnv>,
        objects: &dyn ObjectStore,
        work: &Path,
        events: UnboundedSender<AgentEvent>,
        cancel: CancellationToken,
    ) -> Result<AgentSummary, RunnerError> {
        if work.exists() {
            tokio::fs::remove_dir_all(work).await?;
        }
        let (workspace, out, scratch) =
            (work.join("workspace"), work.join("out"), work.join("tmp"));
        for d in [&out, &scratch] {
            tokio::fs::create_dir_all(d).await?;
        }
        let baseline = work.join("code.tar.zst");
        // The staged code as this worker's stage kept it, when this is that worker; used
        // when the run starts from the staged code, else (a prepared workspace, the setup's
        // products in it) only freed, and the workspace comes from the object store.
        let kept = match (&target.handoff, work.parent()) {
            (Some(token), Some(task_dir)) => {
                let (t, d, w) = (token.clone(), task_dir.to_path_buf(), work.to_path_buf());
                tokio::task::spawn_blocking(move || handoff::take(&d, &t, &w))
                    .await
                    .ok()
                    .flatten()
            }
            _ => None,
        };
        match kept {
            Some(kept) if prepared.is_none() => {
                tokio::fs::rename(&kept.tree, &workspace).await?;
                tokio::fs::rename(&kept.archive, &baseline).await?;
                let _ = tokio::fs::remove_dir_all(kept.dir()).await;
            }
            unused => {
                if let Some(kept) = unused {
                    let _ = tokio::fs::remove_dir_all(kept.dir()).await;
                }
                tokio::fs::create_dir_all(&workspace).await?;
                let baseline_key =
                    prepared.map_or_else(|| layout::staged_key(task), |p| p.baseline_key.clone());
                restore(objects, &baseline_key, &baseline, &workspace).await?;
            }
        }
        // And the setup's HOME cache paths, in the agent's temp dir (its commands' HOME).
        if let Some(home_key) = prepared.and_then(|p| p.home_key.as_deref()) {
            restore(objects, home_key, &work.join("home.tar.zst"), &scratch).await?;
        }
        let spec_path = work.join("task.json");
        let spec_json =
            serde_json::to_vec(spec).map_err(|e| RunnerError::BadInput(e.to_string()))?;
        tokio::fs::write(&spec_path, spec_json).await?;
        let log_path = out.join(layout::AGENT_LOG);
        let log = std::fs::File::create(&log_path)?;
        let prefix = target.prefix(task);

        let mut cmd = agent_command(
            &self.config.program,
            &AgentPaths {
                task_spec: &spec_path,
                workspace: &workspace,
                baseline: &baseline,
                out: &out,
                scratch: &scratch,
            },
            task.as_str(),
        );
        if let Some(f) = &target.followup {
            let resume = work.join("resume");
            download_resume(objects, task, &resume).await?;
            let message = work.join("followup.txt");
            tokio::fs::write(&message, &f.message).await?;
            cmd.arg("--resume")
                .arg(&resume)
                .arg("--followup")
                .arg(&message)
                .arg("--turn")
                .arg(f.turn.to_string());
        }
        if let Some(n) = target.candidate {
            cmd.arg("--candidate").arg(n.to_string());
        }
        cmd.env_clear()
            .envs(self.environment(&scratch, spec, |k| std::env::var(k).ok()));
        // The agent's spans go under this step's, when tracing is on.
        if let Some(parent) = patchflow_agent::telemetry::traceparent() {
            cmd.env(patchflow_agent::telemetry::TRACEPARENT, parent);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .process_group(0)
            .kill_on_drop(true);
        // The agent dies with this process: it arranges that itself (no pre-exec hook here,
        // so the spawn does not copy this process's address space).
        cmd.env(
            patchflow_agent::cli::PARENT_PID_VAR,
            std::process::id().to_string(),
        );
        let mut child = cmd.spawn().map_err(|e| {
            RunnerError::Failed(format!(
                "cannot start the agent ({}): {e}",
                self.config.program.display()
            ))
        })?;
        tracing::info!(task_id = %task, pid = child.id(), workspace = %workspace.display(), "agent started");
        let stdout = child.stdout.take();
        let relay = tokio::spawn(async move {
            let Some(stdout) = stdout else { return };
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<AgentEvent>(&line) {
                    Ok(ev) => {
                        let _ = events.send(ev);
                    }
                    Err(_) => tracing::debug!(%line, "agent printed a non-event line"),
                }
            }
        });
        let limit = Duration::from_secs(spec.limits.wall_seconds) + WALL_GRACE;
        let status = tokio::select! {
            s = child.wait() => Some(s?),
            _ = cancel.cancelled() => {
                stop_group(&mut child, Duration::from_secs(2)).await;
                let _ = relay.await;
                tracing::info!(task_id = %task, "agent stopped on cancel");
                // Keep what the agent wrote so far for whoever looks at a cancelled task.
                let _ = upload_results(objects, &prefix, &out).await;
                return Err(RunnerError::Cancelled);
            }
            _ = tokio::time::sleep(limit) => {
                stop_group(&mut child, Duration::from_secs(2)).await;
                None
            }
        };
        let _ = relay.await;
        upload_results(objects, &prefix, &out).await?;
        let summary_path = out.join(layout::SUMMARY);
        let summary = match tokio::fs::read(&summary_path).await {
            Ok(bytes) => serde_json::from_slice::<AgentSummary>(&bytes).map_err(|e| {
                RunnerError::Failed(format!("the agent wrote an unreadable summary: {e}"))
            })?,
            Err(_) => {
                let how = match status {
                    Some(s) => format!("exited with {s}"),
                    None => format!(
                        "ran past its wall time ({} s) and was killed",
                        spec.limits.wall_seconds
                    ),
                };
                return Err(RunnerError::Failed(format!(
                    "the agent {how} without a summary; last log lines: {}",
                    log_tail(&log_path).await
                )));
            }
        };
        // The workspace has served its purpose: the diff and transcript are stored. The
        // task's directory goes too once nothing else (another candidate) is in it.
        let _ = tokio::fs::remove_dir_all(work).await;
        if let Some(task_dir) = work.parent() {
            let _ = tokio::fs::remove_dir(task_dir).await;
        }
        Ok(summary)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use patchflow_core::TaskSource;
    use patchflow_core::task::{SecretHeader, ToolPolicy};

    use super::*;

    #[test]
    fn the_slim_agent_runs_only_when_it_is_from_the_same_build() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("patchflow");
        std::fs::write(&exe, "").unwrap();
        // Nothing beside it: the patchflow binary's own `agent` subcommand.
        assert_eq!(agent_program(&exe, "0.1.0-abc"), exe);
        let slim = dir.path().join(AGENT_BINARY);
        let script = |id: &str| {
            std::fs::write(
                &slim,
                format!("#!/bin/sh\n[ \"$1\" = --build-id ] && echo {id} && exit 0\nexit 9\n"),
            )
            .unwrap();
            std::fs::set_permissions(&slim, std::fs::Permissions::from_mode(0o755)).unwrap();
        };
        script("0.1.0-abc");
        assert_eq!(agent_program(&exe, "0.1.0-abc"), slim);
        // A leftover of another build is not run.
        script("0.1.0-old");
        assert_eq!(agent_program(&exe, "0.1.0-abc"), exe);
        // Nor one that cannot say.
        std::fs::write(&slim, "#!/bin/sh\nexit 1\n").unwrap();
        assert_eq!(agent_program(&exe, "0.1.0-abc"), exe);
    }

    #[test]
    fn the_agent_gets_its_settings_and_only_the_secrets_its_policy_names() {
        let runner = LocalRunner::new(LocalRunnerConfig {
            program: "patchflow".into(),
            model: "m".into(),
            openai_base_url: None,
            openai_api_key: Some(Secret::new("sk-model")),
            llm_max_retries: 1,
            llm_retry_backoff_ms: 1,
            agent_env: vec![("PATCHFLOW_SANDBOX_MODE".into(), "strict".into())],
        });
        let mut spec = TaskSpec::new(
            TaskSource::Git {
                url: "https://git.example/r.git".into(),
                git_ref: None,
                git_token: None,
            },
            "x",
        );
        spec.policy = ToolPolicy {
            network: false,
            allow_hosts: vec!["api.example.com".into()],
            secrets: vec![
                SecretHeader {
                    host: "api.example.com".into(),
                    header: "Authorization".into(),
                    env: "PATCHFLOW_SECRET_API".into(),
                },
                // Never valid at submit; the runner refuses it too.
                SecretHeader {
                    host: "api.example.com".into(),
                    header: "X-Aws".into(),
                    env: "AWS_SECRET_ACCESS_KEY".into(),
                },
            ],
        };
        let worker = |k: &str| match k {
            "PATCHFLOW_SECRET_API" => Some("tok-1".to_string()),
            "PATCHFLOW_SECRET_OTHER" => Some("tok-2".to_string()),
            "AWS_SECRET_ACCESS_KEY" => Some("aws".to_string()),
            _ => None,
        };
        let env = runner.environment(Path::new("/s"), &spec, worker);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("PATCHFLOW_SANDBOX_MODE"), Some("strict"));
        assert_eq!(get("PATCHFLOW_SECRET_API"), Some("tok-1"));
        assert_eq!(
            get("PATCHFLOW_SECRET_OTHER"),
            None,
            "not named by the policy"
        );
        assert_eq!(
            get("AWS_SECRET_ACCESS_KEY"),
            None,
            "never a worker credential"
        );
        assert_eq!(get("HOME"), Some("/s"));
    }
}
