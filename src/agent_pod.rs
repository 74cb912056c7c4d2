//! `patchflow agent-pod fetch|run`: the two containers of a Kubernetes agent Job. The kube
//! runner (`activities/src/runner/kube.rs`) writes the contract into the Job's environment;
//! the pod holds no store credentials: the code comes in by a presigned `GET`, the results
//! leave by presigned `PUT`s.
//!
//! - `fetch` (init container): downloads `PATCHFLOW_STAGED_URL` to `PATCHFLOW_BASELINE` and
//!   unpacks it into `PATCHFLOW_WORKSPACE`.
//! - `run` (agent container): runs `patchflow agent` on `PATCHFLOW_TASK_SPEC`, relays its
//!   progress lines on stdout (the runner follows the container's log), keeps its log, and
//!   uploads `diff.patch`, `transcript.jsonl`, `agent.log` and, last, `summary.json`.
//!
//! Presigned URLs are bearer credentials: they are never printed, and the agent process
//! does not inherit them.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::Context;
use backon::{ExponentialBuilder, Retryable};
use clap::{Args, ValueEnum};
use patchflow_activities::runner::{AgentPaths, agent_command};
use patchflow_core::{TaskSpec, layout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PodStep {
    /// Bring the staged code into the workspace (the init container).
    Fetch,
    /// Run the agent and upload its results (the agent container).
    Run,
}

#[derive(Debug, Args)]
pub struct AgentPodArgs {
    #[arg(value_enum)]
    pub step: PodStep,
}

const STAGED_URL: &str = "PATCHFLOW_STAGED_URL";
/// `(variable, result file)`, in upload order: the summary last, since its presence is what
/// tells the runner the attempt is complete.
const RESULT_URLS: [(&str, &str); 4] = [
    ("PATCHFLOW_RESULT_URL_DIFF", layout::DIFF),
    ("PATCHFLOW_RESULT_URL_TRANSCRIPT", layout::TRANSCRIPT),
    ("PATCHFLOW_RESULT_URL_LOG", layout::AGENT_LOG),
    ("PATCHFLOW_RESULT_URL_SUMMARY", layout::SUMMARY),
];

pub async fn run(a: AgentPodArgs) -> anyhow::Result<ExitCode> {
    match a.step {
        PodStep::Fetch => fetch().await,
        PodStep::Run => run_agent().await,
    }
}

fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .with_context(|| format!("{name} is not set (the kube runner sets it in the agent Job)"))
}

fn http_client() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(600))
        .build()
        .context("cannot build the HTTP client")
}

async fn fetch() -> anyhow::Result<ExitCode> {
    let url = var(STAGED_URL)?;
    let baseline = PathBuf::from(var("PATCHFLOW_BASELINE")?);
    let workspace = PathBuf::from(var("PATCHFLOW_WORKSPACE")?);
    let http = http_client()?;
    let bytes = (|| download(&http, &url, &baseline))
        .retry(transfer_backoff())
        .when(Transfer::is_transient)
        .notify(|e, after| eprintln!("patchflow agent-pod: {e}; retrying in {after:?}"))
        .await
        .context("cannot download the staged code")?;
    let (b, w) = (baseline.clone(), workspace.clone());
    tokio::task::spawn_blocking(move || patchflow_platform::archive::unpack_tar_zst(&b, &w))
        .await?
        .with_context(|| format!("cannot unpack the staged code into {}", workspace.display()))?;
    eprintln!(
        "patchflow agent-pod: fetched the staged code ({bytes} bytes) into {}",
        workspace.display()
    );
    Ok(ExitCode::SUCCESS)
}

async fn run_agent() -> anyhow::Result<ExitCode> {
    let task_id = var("PATCHFLOW_TASK_ID")?;
    let spec_json = var("PATCHFLOW_TASK_SPEC")?;
    serde_json::from_str::<TaskSpec>(&spec_json)
        .context("PATCHFLOW_TASK_SPEC is not a task spec")?;
    let workspace = PathBuf::from(var("PATCHFLOW_WORKSPACE")?);
    let baseline = PathBuf::from(var("PATCHFLOW_BASELINE")?);
    let scratch = PathBuf::from(var("PATCHFLOW_SCRATCH")?);
    // Every URL is checked before the agent spends a single token.
    let mut uploads = Vec::with_capacity(RESULT_URLS.len());
    for (name, file) in RESULT_URLS {
        uploads.push((var(name)?, file));
    }
    let (out, tmp) = (scratch.join("out"), scratch.join("tmp"));
    for d in [&out, &tmp] {
        tokio::fs::create_dir_all(d)
            .await
            .with_context(|| format!("cannot create {}", d.display()))?;
    }
    let spec_path = scratch.join("task.json");
    tokio::fs::write(&spec_path, &spec_json).await?;

    let program = crate::stack::agent_program()?;
    let mut cmd = agent_command(
        &program,
        &AgentPaths {
            task_spec: &spec_path,
            workspace: &workspace,
            baseline: &baseline,
            out: &out,
            scratch: &tmp,
        },
        &task_id,
    );
    cmd.env_remove(STAGED_URL)
        .stdin(Stdio::null())
        // Progress events go straight to the container's log, which the runner follows.
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (name, _) in RESULT_URLS {
        cmd.env_remove(name);
    }
    let mut child = cmd.spawn().context("cannot start the agent")?;
    let log_path = out.join(layout::AGENT_LOG);
    let stderr = child.stderr.take();
    let tee = tokio::spawn(tee_log(stderr, log_path));
    let status = child.wait().await.context("waiting for the agent")?;
    if let Err(e) = tee.await? {
        eprintln!("patchflow agent-pod: the agent's log is incomplete: {e}");
    }

    let http = http_client()?;
    let mut stored = 0;
    for (url, file) in &uploads {
        let path = out.join(file);
        if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
            continue;
        }
        let body = tokio::fs::read(&path)
            .await
            .with_context(|| format!("cannot read {}", path.display()))?;
        (|| upload(&http, url, body.clone()))
            .retry(transfer_backoff())
            .when(Transfer::is_transient)
            .notify(|e, after| eprintln!("patchflow agent-pod: {file}: {e}; retrying in {after:?}"))
            .await
            .with_context(|| format!("cannot upload {file}"))?;
        stored += 1;
    }
    if !tokio::fs::try_exists(out.join(layout::SUMMARY))
        .await
        .unwrap_or(false)
    {
        anyhow::bail!(
            "the agent {status} without a summary ({stored} result files uploaded; see agent.log)"
        );
    }
    eprintln!("patchflow agent-pod: agent {status}; {stored} result files uploaded");
    Ok(ExitCode::SUCCESS)
}

/// Copies the agent's stderr into `agent.log` and onto this container's stderr.
async fn tee_log(
    stderr: Option<tokio::process::ChildStderr>,
    path: PathBuf,
) -> std::io::Result<()> {
    let Some(mut stderr) = stderr else {
        return Ok(());
    };
    let mut file = tokio::fs::File::create(&path).await?;
    let mut own = tokio::io::stderr();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = stderr.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).await?;
        let _ = own.write_all(&buf[..n]).await;
    }
    file.flush().await
}

/// A failed transfer; the message never holds the URL (its signature is a credential).
#[derive(Debug, thiserror::Error)]
enum Transfer {
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Refused(String),
}

impl Transfer {
    fn is_transient(&self) -> bool {
        matches!(self, Transfer::Transient(_))
    }

    fn from_reqwest(e: reqwest::Error) -> Self {
        Transfer::Transient(e.without_url().to_string())
    }

    fn from_status(status: reqwest::StatusCode) -> Self {
        let text = format!("the object store answered HTTP {status}");
        if status.is_server_error() || status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            Transfer::Transient(text)
        } else if status == reqwest::StatusCode::FORBIDDEN {
            Transfer::Refused(format!("{text} (has the presigned URL expired?)"))
        } else {
            Transfer::Refused(text)
        }
    }
}

fn transfer_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_max_times(6)
        .with_jitter()
}

async fn download(http: &reqwest::Client, url: &str, to: &Path) -> Result<u64, Transfer> {
    let mut resp = http.get(url).send().await.map_err(Transfer::from_reqwest)?;
    if !resp.status().is_success() {
        return Err(Transfer::from_status(resp.status()));
    }
    let io = |e: std::io::Error| Transfer::Refused(format!("cannot write {}: {e}", to.display()));
    let mut file = tokio::fs::File::create(to).await.map_err(io)?;
    let mut total = 0u64;
    while let Some(chunk) = resp.chunk().await.map_err(Transfer::from_reqwest)? {
        file.write_all(&chunk).await.map_err(io)?;
        total += chunk.len() as u64;
    }
    file.flush().await.map_err(io)?;
    Ok(total)
}

async fn upload(http: &reqwest::Client, url: &str, body: Vec<u8>) -> Result<(), Transfer> {
    let resp = http
        .put(url)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(body)
        .send()
        .await
        .map_err(Transfer::from_reqwest)?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(Transfer::from_status(resp.status()))
    }
}
