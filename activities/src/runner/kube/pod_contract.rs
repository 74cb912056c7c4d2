//! The pod contract: what the kube runner writes into an agent Job's environment and what
//! the Job's containers (`patchflow agent-pod fetch|run`) read from it, in one place.
//!
//! The worker never shares a file system with the pod: everything moves through the object
//! store by presigned URLs, so the store needs them (S3, COS, MinIO; not a directory). Both
//! containers run `patchflow agent-pod <step>` with everything else in the environment:
//!
//! - init container, `patchflow agent-pod fetch` ([`fetch`]): downloads `PATCHFLOW_STAGED_URL`
//!   (HTTP `GET` of `staged/<task>/code.tar.zst`) to `PATCHFLOW_BASELINE` and unpacks it
//!   into `PATCHFLOW_WORKSPACE`; with `PATCHFLOW_HOME_URL` (a prepared environment's HOME
//!   `cache_paths`, `staged/<task>/home.tar.zst`) also unpacks that into `PATCHFLOW_SCRATCH`.
//!   A follow-up turn's pod also gets `PATCHFLOW_RESUME_URL_CONVERSATION` and
//!   `PATCHFLOW_RESUME_URL_CHANGES` (the task's `conversation.json` and `changes.tar.zst`,
//!   each only when the task has one) and downloads them, as they are, into `/scratch/resume`.
//! - agent container, `patchflow agent-pod run` ([`run`]): runs the agent on
//!   `PATCHFLOW_TASK_SPEC` (the task spec as JSON) for task `PATCHFLOW_TASK_ID` in
//!   `PATCHFLOW_WORKSPACE` against `PATCHFLOW_BASELINE`, with `PATCHFLOW_SCRATCH` as its
//!   scratch directory (also `HOME` and `TMPDIR`), `PATCHFLOW_MODEL`, `OPENAI_BASE_URL`
//!   (when set) and `OPENAI_API_KEY` (from a Secret, never inline); relays its progress
//!   lines on stdout (the runner follows the container's log), keeps its log, then uploads
//!   each result file with HTTP `PUT` (`Content-Type: application/octet-stream`) to
//!   `PATCHFLOW_RESULT_URL_DIFF`, `PATCHFLOW_RESULT_URL_TRANSCRIPT`,
//!   `PATCHFLOW_RESULT_URL_LOG`, `PATCHFLOW_RESULT_URL_CONVERSATION`,
//!   `PATCHFLOW_RESULT_URL_CHANGES`, `PATCHFLOW_RESULT_URL_TURN_DIFF` and
//!   `PATCHFLOW_RESULT_URL_SUMMARY` (the run's files under its prefix,
//!   [`patchflow_core::layout::run_prefix`]: `results/<task>/`, `…/candidates/<n>/` or
//!   `…/turns/<t>/`), the summary last; the conversation, changes and turn-diff URLs may be
//!   absent (a Job from an older worker), the other four may not. It exits 0 once the
//!   summary is stored. `PATCHFLOW_CANDIDATE` (candidate `n` of a best-of-N task) and
//!   `PATCHFLOW_TURN` with `PATCHFLOW_FOLLOWUP_MESSAGE` (a follow-up turn) become the
//!   agent's `--candidate`, `--turn` and `--followup` (with `--resume /scratch/resume`).
//!
//! Presigned URLs are bearer credentials: they are never printed, and the agent process
//! does not inherit them.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use patchflow_core::{TaskId, TaskSpec, layout};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::runner::agent_runner::RunTarget;
use crate::runner::local::{AgentPaths, agent_command};

/// What both containers run, followed by the step.
pub const COMMAND: [&str; 2] = ["patchflow", "agent-pod"];
/// The init container's step and name.
pub const FETCH_STEP: &str = "fetch";
/// The agent container's step.
pub const RUN_STEP: &str = "run";
/// The container whose log carries the agent's progress events.
pub const AGENT_CONTAINER: &str = "agent";
/// The `emptyDir` volumes both containers mount.
pub const WORKSPACE: &str = "/workspace";
pub const SCRATCH: &str = "/scratch";
const BASELINE: &str = "/scratch/code.tar.zst";

const TASK_ID_VAR: &str = "PATCHFLOW_TASK_ID";
const WORKSPACE_VAR: &str = "PATCHFLOW_WORKSPACE";
const SCRATCH_VAR: &str = "PATCHFLOW_SCRATCH";
const BASELINE_VAR: &str = "PATCHFLOW_BASELINE";
const STAGED_URL_VAR: &str = "PATCHFLOW_STAGED_URL";
const HOME_URL_VAR: &str = "PATCHFLOW_HOME_URL";
const TASK_SPEC_VAR: &str = "PATCHFLOW_TASK_SPEC";
const MODEL_VAR: &str = "PATCHFLOW_MODEL";
const CANDIDATE_VAR: &str = "PATCHFLOW_CANDIDATE";
const TURN_VAR: &str = "PATCHFLOW_TURN";
const FOLLOWUP_VAR: &str = "PATCHFLOW_FOLLOWUP_MESSAGE";
/// Where the init container leaves what a follow-up resumes.
const RESUME_DIR: &str = "/scratch/resume";
const RESUME_DIR_VAR: &str = "PATCHFLOW_RESUME_DIR";
/// `(variable, result file)`, in upload order (that of [`layout::RUN_FILES`]): the summary
/// last, since its presence is what tells the runner the attempt is complete.
pub const RESULT_URLS: [(&str, &str); 7] = [
    ("PATCHFLOW_RESULT_URL_DIFF", layout::DIFF),
    ("PATCHFLOW_RESULT_URL_TRANSCRIPT", layout::TRANSCRIPT),
    ("PATCHFLOW_RESULT_URL_LOG", layout::AGENT_LOG),
    ("PATCHFLOW_RESULT_URL_CONVERSATION", layout::CONVERSATION),
    ("PATCHFLOW_RESULT_URL_CHANGES", layout::CHANGES),
    ("PATCHFLOW_RESULT_URL_TURN_DIFF", layout::TURN_DIFF),
    ("PATCHFLOW_RESULT_URL_SUMMARY", layout::SUMMARY),
];
/// The result files a pod may be given no URL for (a Job an older worker made).
const OPTIONAL_RESULTS: [&str; 3] = [layout::CONVERSATION, layout::CHANGES, layout::TURN_DIFF];
/// `(variable, file)`: what a follow-up turn resumes, as the task's current files.
pub const RESUME_URLS: [(&str, &str); 2] = [
    ("PATCHFLOW_RESUME_URL_CONVERSATION", layout::CONVERSATION),
    ("PATCHFLOW_RESUME_URL_CHANGES", layout::CHANGES),
];

/// The presigned URLs one pod needs.
#[derive(Debug, Clone)]
pub struct PodUrls {
    pub staged: String,
    /// The prepared environment's HOME `cache_paths`, when it has some.
    pub home: Option<String>,
    /// One per [`RESULT_URLS`] entry, in its order.
    pub results: [String; 7],
    /// A follow-up's: one per [`RESUME_URLS`] file the task has.
    pub resume: Vec<(&'static str, String)>,
}

/// What both containers see.
fn common_env(task: &TaskId) -> Vec<(&'static str, String)> {
    [
        ("LANG", "C.UTF-8"),
        ("HOME", SCRATCH),
        ("TMPDIR", SCRATCH),
        (TASK_ID_VAR, task.as_str()),
        (WORKSPACE_VAR, WORKSPACE),
        (SCRATCH_VAR, SCRATCH),
        (BASELINE_VAR, BASELINE),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_string()))
    .collect()
}

/// The runner's half for the init container: what [`fetch`] reads.
pub fn fetch_env(task: &TaskId, urls: &PodUrls) -> Vec<(&'static str, String)> {
    let mut env = common_env(task);
    env.push((STAGED_URL_VAR, urls.staged.clone()));
    if let Some(home) = &urls.home {
        env.push((HOME_URL_VAR, home.clone()));
    }
    if !urls.resume.is_empty() {
        env.push((RESUME_DIR_VAR, RESUME_DIR.to_string()));
    }
    env.extend(urls.resume.iter().cloned());
    env
}

/// The runner's half for the agent container: what [`run`] reads (the model's endpoint,
/// key and the agent's own settings come on top).
pub fn run_env(
    task: &TaskId,
    spec_json: &str,
    model: &str,
    urls: &PodUrls,
    run: &RunTarget,
) -> Vec<(&'static str, String)> {
    let mut env = common_env(task);
    env.push((TASK_SPEC_VAR, spec_json.to_string()));
    env.push((MODEL_VAR, model.to_string()));
    for ((name, _), url) in RESULT_URLS.iter().zip(&urls.results) {
        env.push((name, url.clone()));
    }
    if let Some(n) = run.candidate {
        env.push((CANDIDATE_VAR, n.to_string()));
    }
    if let Some(f) = &run.followup {
        env.push((TURN_VAR, f.turn.to_string()));
        env.push((FOLLOWUP_VAR, f.message.clone()));
        env.push((RESUME_DIR_VAR, RESUME_DIR.to_string()));
    }
    env
}

/// Why a pod step failed. No message holds a URL (its signature is a credential).
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    #[error("{0} is not set (the kube runner sets it in the agent Job)")]
    Unset(&'static str),
    #[error("PATCHFLOW_TASK_SPEC is not a task spec: {0}")]
    BadSpec(serde_json::Error),
    #[error("cannot build the HTTP client: {0}")]
    HttpClient(String),
    #[error("cannot download the staged code: {0}")]
    Download(Transfer),
    #[error("cannot download the {file} this follow-up resumes: {reason}")]
    Resume {
        file: &'static str,
        reason: Transfer,
    },
    #[error("{name} is not a number: {value:?}")]
    NotANumber { name: &'static str, value: String },
    #[error("cannot upload {file}: {reason}")]
    Upload {
        file: &'static str,
        reason: Transfer,
    },
    #[error("{what}: {reason}")]
    Io {
        what: String,
        reason: std::io::Error,
    },
    #[error("the agent {status} without a summary ({stored} result files uploaded; see agent.log)")]
    NoSummary { status: ExitStatus, stored: usize },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> PodError {
    let what = what.into();
    move |reason| PodError::Io { what, reason }
}

fn var(name: &'static str) -> Result<String, PodError> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .ok_or(PodError::Unset(name))
}

fn http_client() -> Result<reqwest::Client, PodError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(600))
        .build()
        .map_err(|e| PodError::HttpClient(e.without_url().to_string()))
}

/// `patchflow agent-pod fetch`: brings the staged code into the workspace (and a prepared
/// environment's HOME into the scratch directory).
pub async fn fetch() -> Result<(), PodError> {
    let url = var(STAGED_URL_VAR)?;
    let baseline = PathBuf::from(var(BASELINE_VAR)?);
    let workspace = PathBuf::from(var(WORKSPACE_VAR)?);
    let http = http_client()?;
    let bytes = fetch_into(&http, &url, &baseline, &workspace, "the staged code").await?;
    eprintln!(
        "patchflow agent-pod: fetched the staged code ({bytes} bytes) into {}",
        workspace.display()
    );
    if let Some(url) = std::env::var(HOME_URL_VAR).ok().filter(|u| !u.is_empty()) {
        let scratch = PathBuf::from(var(SCRATCH_VAR)?);
        let archive = scratch.join("home.tar.zst");
        let bytes = fetch_into(&http, &url, &archive, &scratch, "the environment's HOME").await?;
        let _ = tokio::fs::remove_file(&archive).await;
        eprintln!("patchflow agent-pod: restored the environment's HOME ({bytes} bytes)");
    }
    let resume: Vec<_> = RESUME_URLS
        .iter()
        .filter_map(|(name, file)| {
            let url = std::env::var(name).ok().filter(|u| !u.is_empty())?;
            Some((url, *file))
        })
        .collect();
    if !resume.is_empty() {
        let dir = PathBuf::from(var(RESUME_DIR_VAR)?);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io(format!("cannot create {}", dir.display())))?;
        for (url, file) in resume {
            let to = dir.join(file);
            let bytes = (|| download(&http, &url, &to))
                .retry(transfer_backoff())
                .when(Transfer::is_transient)
                .notify(|e, after| {
                    eprintln!("patchflow agent-pod: {file}: {e}; retrying in {after:?}")
                })
                .await
                .map_err(|reason| PodError::Resume { file, reason })?;
            eprintln!(
                "patchflow agent-pod: fetched the task's {file} ({bytes} bytes) to resume from"
            );
        }
    }
    Ok(())
}

/// An optional numeric variable.
fn number(name: &'static str) -> Result<Option<u32>, PodError> {
    match std::env::var(name).ok().filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(value) => value
            .parse()
            .map(Some)
            .map_err(|_| PodError::NotANumber { name, value }),
    }
}

/// Downloads the tar.zst at `url` to `archive` (retrying what may pass) and unpacks it into
/// `dest`; the bytes downloaded.
async fn fetch_into(
    http: &reqwest::Client,
    url: &str,
    archive: &Path,
    dest: &Path,
    what: &str,
) -> Result<u64, PodError> {
    let bytes = (|| download(http, url, archive))
        .retry(transfer_backoff())
        .when(Transfer::is_transient)
        .notify(|e, after| eprintln!("patchflow agent-pod: {e}; retrying in {after:?}"))
        .await
        .map_err(PodError::Download)?;
    let (a, d) = (archive.to_path_buf(), dest.to_path_buf());
    let unpack = io(format!("cannot unpack {what} into {}", dest.display()));
    tokio::task::spawn_blocking(move || patchflow_platform::archive::unpack_tar_zst(&a, &d))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(unpack)?;
    Ok(bytes)
}

/// `patchflow agent-pod run`: runs the agent (`program`, see `runner::agent_program`) and
/// uploads its results.
pub async fn run(program: &Path) -> Result<(), PodError> {
    let task_id = var(TASK_ID_VAR)?;
    let spec_json = var(TASK_SPEC_VAR)?;
    let spec = serde_json::from_str::<TaskSpec>(&spec_json).map_err(PodError::BadSpec)?;
    let workspace = PathBuf::from(var(WORKSPACE_VAR)?);
    let baseline = PathBuf::from(var(BASELINE_VAR)?);
    let scratch = PathBuf::from(var(SCRATCH_VAR)?);
    // Every URL and setting is checked before the agent spends a single token.
    let mut uploads = Vec::with_capacity(RESULT_URLS.len());
    for (name, file) in RESULT_URLS {
        match var(name) {
            Ok(url) => uploads.push((url, file)),
            Err(_) if OPTIONAL_RESULTS.contains(&file) => {}
            Err(e) => return Err(e),
        }
    }
    let candidate = number(CANDIDATE_VAR)?;
    let turn = number(TURN_VAR)?;
    let followup = match turn {
        Some(t) if t > 1 => Some((t, var(FOLLOWUP_VAR)?)),
        _ => None,
    };
    let (out, tmp) = (scratch.join("out"), scratch.join("tmp"));
    for d in [&out, &tmp] {
        tokio::fs::create_dir_all(d)
            .await
            .map_err(io(format!("cannot create {}", d.display())))?;
    }
    let spec_path = scratch.join("task.json");
    tokio::fs::write(&spec_path, &spec_json)
        .await
        .map_err(io(format!("cannot write {}", spec_path.display())))?;

    let mut cmd = agent_command(
        program,
        &AgentPaths {
            task_spec: &spec_path,
            workspace: &workspace,
            baseline: &baseline,
            out: &out,
            scratch: &tmp,
        },
        &task_id,
    );
    if let Some((turn, message)) = &followup {
        let resume = std::env::var(RESUME_DIR_VAR)
            .ok()
            .filter(|d| !d.is_empty())
            .map_or_else(|| scratch.join("resume"), PathBuf::from);
        // A task with nothing to resume yet (no file fetched) still gets the directory.
        tokio::fs::create_dir_all(&resume)
            .await
            .map_err(io(format!("cannot create {}", resume.display())))?;
        let message_path = scratch.join("followup.txt");
        tokio::fs::write(&message_path, message)
            .await
            .map_err(io(format!("cannot write {}", message_path.display())))?;
        cmd.arg("--resume")
            .arg(&resume)
            .arg("--followup")
            .arg(&message_path)
            .arg("--turn")
            .arg(turn.to_string());
    }
    if let Some(n) = candidate {
        cmd.arg("--candidate").arg(n.to_string());
    }
    cmd.env_remove(STAGED_URL_VAR)
        .env_remove(FOLLOWUP_VAR)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (name, _) in RESULT_URLS.iter().chain(&RESUME_URLS) {
        cmd.env_remove(name);
    }
    let running = patchflow_platform::metrics::RunningAgent::start();
    let mut child = cmd.spawn().map_err(io("cannot start the agent"))?;
    let log_path = out.join(layout::AGENT_LOG);
    let stderr = child.stderr.take();
    let tee = tokio::spawn(tee_log(stderr, log_path));
    let relay = tokio::spawn(relay_events(child.stdout.take()));
    let status = child.wait().await.map_err(io("waiting for the agent"))?;
    let _ = relay.await;
    drop(running);
    match tee.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("patchflow agent-pod: the agent's log is incomplete: {e}"),
        Err(e) => eprintln!("patchflow agent-pod: the agent's log is incomplete: {e}"),
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
            .map_err(io(format!("cannot read {}", path.display())))?;
        (|| upload(&http, url, body.clone()))
            .retry(transfer_backoff())
            .when(Transfer::is_transient)
            .notify(|e, after| eprintln!("patchflow agent-pod: {file}: {e}; retrying in {after:?}"))
            .await
            .map_err(|reason| PodError::Upload { file, reason })?;
        stored += 1;
    }
    let Ok(summary) = tokio::fs::read(out.join(layout::SUMMARY)).await else {
        return Err(PodError::NoSummary { status, stored });
    };
    if let Ok(summary) = serde_json::from_slice::<patchflow_core::AgentSummary>(&summary) {
        patchflow_platform::metrics::global().agent_ran(&summary, &spec.tenant);
    }
    eprintln!("patchflow agent-pod: agent {status}; {stored} result files uploaded");
    Ok(())
}

/// Passes the agent's progress events on to this container's stdout (the log the runner
/// follows), line for line, and counts its tool calls in this process's metrics.
async fn relay_events(stdout: Option<tokio::process::ChildStdout>) {
    use tokio::io::AsyncBufReadExt;
    let Some(stdout) = stdout else { return };
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut out = tokio::io::stdout();
    while let Ok(Some(line)) = lines.next_line().await {
        if let Ok(event) = serde_json::from_str(&line) {
            patchflow_platform::metrics::global().agent_event(&event);
        }
        let _ = out.write_all(line.as_bytes()).await;
        let _ = out.write_all(b"\n").await;
        let _ = out.flush().await;
    }
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
pub enum Transfer {
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
