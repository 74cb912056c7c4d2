//! `patchflow agent`: what a runner executes. Reads the task spec, works in the given
//! workspace, prints progress events as JSON lines on stdout, writes result files to `--out`.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use patchflow_agent::{AgentRun, NativeTools, ShellEnv, Workspace};
use patchflow_core::{Config, TaskSpec};

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The task spec (JSON).
    #[arg(long)]
    pub task: PathBuf,
    /// The restored repository to work in.
    #[arg(long)]
    pub workspace: PathBuf,
    /// The staged archive the workspace came from (for the diff).
    #[arg(long)]
    pub baseline: PathBuf,
    /// Where diff.patch, transcript.jsonl and summary.json go.
    #[arg(long)]
    pub out: PathBuf,
    /// Private HOME and TMPDIR for shell commands (default: a temporary directory).
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// The task id, for logs.
    #[arg(long, default_value = "")]
    pub task_id: String,
}

pub async fn run(config: &Config, a: AgentArgs) -> anyhow::Result<ExitCode> {
    let spec_text =
        std::fs::read(&a.task).with_context(|| format!("cannot read {}", a.task.display()))?;
    let spec: TaskSpec = serde_json::from_slice(&spec_text)
        .with_context(|| format!("{} is not a task spec", a.task.display()))?;
    let ws = Workspace::new(&a.workspace)
        .with_context(|| format!("workspace {} does not exist", a.workspace.display()))?;
    let scratch = match &a.scratch {
        Some(s) => s.clone(),
        None => std::env::temp_dir(),
    };
    std::fs::create_dir_all(&scratch)?;
    let deadline = Instant::now() + Duration::from_secs(spec.limits.wall_seconds);
    let tools = Arc::new(NativeTools::new(ws, ShellEnv::minimal(&scratch), deadline));
    let run = AgentRun {
        spec,
        workspace: a.workspace.clone(),
        baseline: a.baseline.clone(),
        out_dir: a.out.clone(),
        model: config.model.clone(),
        base_url: config.openai_base_url.clone(),
        api_key: config.openai_api_key.clone(),
        max_retries: config.llm_max_retries,
        retry_backoff: Duration::from_millis(config.llm_retry_backoff_ms),
    };
    let stdout = std::io::stdout();
    let summary = run
        .run(tools, |event| {
            let mut out = stdout.lock();
            if let Ok(line) = serde_json::to_string(event) {
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        })
        .await
        .context("cannot write the agent's results")?;
    tracing::info!(
        task_id = %a.task_id,
        outcome = ?summary.outcome,
        steps = summary.steps,
        tokens = summary.total_tokens,
        files_changed = summary.files_changed.len(),
        "agent finished"
    );
    Ok(ExitCode::SUCCESS)
}
