//! The client commands (`submit`, `status`, `result`, `cancel`, `retry`, `say`,
//! `candidates`, `select`, `list`, `usage`): thin
//! callers of the HTTP API, so they work against any gateway. The bodies they send and
//! read are patchflow-api's types. The options and helpers every client command shares
//! (server addresses, [`SubmitArgs`], [`zip_directory`]) live here too; `submit --grpc`
//! and `watch` (crate::grpc_client) build on them, and this module never calls back.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::Args;
use patchflow_api::{
    CancelBody, ErrorBody, LimitsBody, MessageBody, RetryBody, SelectBody, StatusAnswer,
    SubmitBody, TaskPage, TaskView, TurnAnswer, UsageAnswer,
};
use patchflow_core::{AgentSummary, Config, TaskEvent, TaskStatus};
use serde::Serialize;

#[derive(Debug, Args)]
pub struct ServerOpt {
    /// The gateway's base URL (default: http://<http_addr>) [PATCHFLOW_SERVER].
    #[arg(long, env = "PATCHFLOW_SERVER")]
    pub server: Option<String>,
}

impl ServerOpt {
    pub fn base(&self, config: &Config) -> String {
        self.server
            .clone()
            .unwrap_or_else(|| format!("http://{}", config.server.http_addr))
            .trim_end_matches('/')
            .to_string()
    }
}

#[derive(Debug, Args)]
pub struct GrpcServerOpt {
    /// The gateway's gRPC URL (default: http://<grpc_addr>) [PATCHFLOW_GRPC_SERVER].
    #[arg(long = "grpc-server", env = "PATCHFLOW_GRPC_SERVER")]
    pub grpc_server: Option<String>,
}

impl GrpcServerOpt {
    pub fn url(&self, config: &Config) -> String {
        self.grpc_server
            .clone()
            .unwrap_or_else(|| format!("http://{}", config.server.grpc_addr))
            .trim_end_matches('/')
            .to_string()
    }
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// A git URL, a local directory (uploaded as a ZIP) or a .zip file.
    pub source: String,
    /// What the agent should do.
    #[arg(short = 'd', long = "description")]
    pub task_description: String,
    /// Branch, tag or commit of a git source.
    #[arg(long = "ref")]
    pub git_ref: Option<String>,
    /// A forge token for a private git source, sent to its host only (read from the
    /// environment so it stays out of `ps` and shell history).
    #[arg(skip = std::env::var("PATCHFLOW_GIT_TOKEN").ok().filter(|t| !t.is_empty()).map(patchflow_core::Secret::new))]
    pub git_token: Option<patchflow_core::Secret>,
    #[arg(long)]
    pub target_file: Option<String>,
    #[arg(long = "task-model")]
    pub task_model: Option<String>,
    #[arg(long)]
    pub max_steps: Option<u32>,
    #[arg(long)]
    pub max_tokens: Option<u64>,
    #[arg(long)]
    pub wall_seconds: Option<u64>,
    /// Stop the agent once its model answers cost this many US dollars (priced from the
    /// model table; outcome `max_cost`).
    #[arg(long, value_name = "USD")]
    pub max_cost_usd: Option<f64>,
    /// Submitting again with the same key returns the same task.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Set the repository up with this saved environment of the tenant's.
    #[arg(long)]
    pub environment: Option<String>,
    /// Set it up with this inline setup: a JSON file (`-` for stdin) holding the body's
    /// `setup` object (`{"setup_script": "...", ...}`).
    #[arg(long, value_name = "FILE")]
    pub setup: Option<PathBuf>,
    /// Best-of-N: race this many agents on the same code (1 to 8).
    #[arg(long, value_name = "N")]
    pub candidates: Option<u32>,
    /// Pick the candidate unasked: `first_finished` or `smallest_passing` (else
    /// `patchflow select`).
    #[arg(long, value_parser = ["first_finished", "smallest_passing"])]
    pub auto_select: Option<String>,
    /// Follow the task's progress until it ends.
    #[arg(long)]
    pub wait: bool,
    /// Print the task record as JSON.
    #[arg(long)]
    pub json: bool,
    /// Submit over the gRPC API (a ZIP streams in chunks) instead of HTTP.
    #[arg(long)]
    pub grpc: bool,
    #[command(flatten)]
    pub server: ServerOpt,
    #[command(flatten)]
    pub grpc_server: GrpcServerOpt,
}

#[derive(Debug, Args)]
pub struct RetryArgs {
    pub task_id: String,
    /// `from_failed_step` resumes after the last completed step; `from_start` runs the
    /// whole task again.
    #[arg(long, default_value = "from_failed_step", value_parser = ["from_failed_step", "from_start"])]
    pub mode: String,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerOpt,
}

#[derive(Debug, Args)]
pub struct PrArgs {
    pub task_id: String,
    /// Read a token to push and open it with from standard input (instead of the task's
    /// own or the deployment's), so it stays out of `ps` and shell history.
    #[arg(long)]
    pub github_token_stdin: bool,
    #[command(flatten)]
    pub server: ServerOpt,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    pub task_id: String,
    #[arg(long)]
    pub json: bool,
    /// Follow progress until the task ends.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub server: ServerOpt,
}

#[derive(Debug, Args)]
pub struct ResultArgs {
    pub task_id: String,
    /// Print the transcript (JSON lines) instead of the diff.
    #[arg(long, conflicts_with_all = ["log", "summary"])]
    pub transcript: bool,
    /// Print the agent's log.
    #[arg(long, conflicts_with = "summary")]
    pub log: bool,
    /// Print the summary.
    #[arg(long)]
    pub summary: bool,
    /// Print the result as one JSON document (diff, summary, status).
    #[arg(long)]
    pub json: bool,
    /// One candidate's files instead of the task's (best-of-N).
    #[arg(long, value_name = "N", conflicts_with_all = ["turn", "summary", "json"])]
    pub candidate: Option<u32>,
    /// One turn's own change (and transcript, log) instead of the cumulative ones.
    #[arg(long, value_name = "N", conflicts_with_all = ["summary", "json"])]
    pub turn: Option<u32>,
    #[command(flatten)]
    pub server: ServerOpt,
}

#[derive(Debug, Args)]
pub struct SayArgs {
    pub task_id: String,
    /// The follow-up instruction (`-` reads it from standard input).
    pub message: String,
    /// Follow the turn's progress until it ends.
    #[arg(long)]
    pub wait: bool,
    #[command(flatten)]
    pub server: ServerOpt,
}

#[derive(Debug, Args)]
pub struct CandidatesArgs {
    pub task_id: String,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerOpt,
}

#[derive(Debug, Args)]
pub struct SelectArgs {
    pub task_id: String,
    /// The candidate whose diff becomes the task's.
    pub candidate: u32,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerOpt,
}

#[derive(Debug, Args)]
pub struct CancelArgs {
    pub task_id: String,
    #[arg(long, default_value = "")]
    pub reason: String,
    #[command(flatten)]
    pub server: ServerOpt,
}

#[derive(Debug, Args)]
pub struct UsageArgs {
    /// First moment counted: an RFC 3339 time or a YYYY-MM-DD date (default: 30 days
    /// before `--to`).
    #[arg(long)]
    pub from: Option<String>,
    /// First moment not counted (default: now); a date means its midnight UTC.
    #[arg(long)]
    pub to: Option<String>,
    /// One tenant's usage (an admin's; others see only their own anyway).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Print the answer as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerOpt,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[arg(long)]
    pub status: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub limit: u32,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerOpt,
}

/// The HTTP client of the CLI, sending the caller's token ([`crate::settings::client_token`])
/// with every request.
pub fn http(config: &Config) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = crate::settings::client_token(config) {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .context("the token has characters a header cannot carry")?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .default_headers(headers)
        .build()
        .context("cannot build the HTTP client")
}

/// Turns an API error body into a readable error.
pub(crate) async fn check(resp: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<ErrorBody>(&body)
        .map(|e| e.message)
        .unwrap_or(body);
    bail!("{} ({status})", message.trim())
}

pub(crate) async fn send(
    req: reqwest::RequestBuilder,
    base: &str,
) -> anyhow::Result<reqwest::Response> {
    let resp = req.send().await.map_err(|e| {
        if e.is_connect() {
            anyhow::anyhow!(
                "cannot reach the patchflow gateway at {base}: is `patchflow up` running?"
            )
        } else {
            anyhow::anyhow!("request to {base} failed: {e}")
        }
    })?;
    check(resp).await
}

/// Zips a local directory (honouring .gitignore, without `.git`) into a temporary file.
pub(crate) fn zip_directory(dir: &Path) -> anyhow::Result<tempfile::NamedTempFile> {
    let tmp = tempfile::Builder::new().suffix(".zip").tempfile()?;
    let mut zip = zip::ZipWriter::new(tmp.reopen()?);
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for entry in ignore::WalkBuilder::new(dir)
        .hidden(false)
        .require_git(false)
        .sort_by_file_path(|a, b| a.cmp(b))
        .filter_entry(|e| e.file_name() != ".git")
        .build()
    {
        let entry = entry?;
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        let rel = entry
            .path()
            .strip_prefix(dir)?
            .to_string_lossy()
            .replace('\\', "/");
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            entry
                .metadata()
                .map(|m| m.permissions().mode())
                .unwrap_or(0o644)
        };
        zip.start_file(rel, options.unix_permissions(mode))?;
        std::io::copy(&mut std::fs::File::open(entry.path())?, &mut zip)?;
    }
    zip.finish()?;
    Ok(tmp)
}

/// Prints a value as indented JSON, its keys in order (as the CLI always printed them).
pub(crate) fn print_json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let value = serde_json::to_value(value)?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

/// A time as the API writes it (RFC 3339, UTC, `Z`).
fn api_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// The body `submit` sends (the source is added by the caller).
fn submit_body(a: &SubmitArgs) -> anyhow::Result<SubmitBody> {
    if let Some(usd) = a.max_cost_usd
        && !usd.is_finite()
    {
        bail!("--max-cost-usd must be a number of dollars");
    }
    let limits = LimitsBody {
        max_steps: a.max_steps,
        max_tokens: a.max_tokens,
        wall_seconds: a.wall_seconds,
        max_cost_usd: a.max_cost_usd,
    };
    let setup = match &a.setup {
        Some(path) => {
            let text = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read {}", path.display()))?
            };
            Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not a setup object", path.display()))?,
            )
        }
        None => None,
    };
    Ok(SubmitBody {
        task_description: Some(a.task_description.clone()),
        target_file: a.target_file.clone(),
        model: a.task_model.clone(),
        limits: (!limits.is_empty()).then_some(limits),
        environment: a.environment.clone(),
        setup,
        candidates: a.candidates,
        auto_select: a.auto_select.as_deref().map(str::parse).transpose()?,
        ..SubmitBody::default()
    })
}

/// `patchflow submit` over HTTP (`--grpc` is crate::grpc_client's).
pub async fn submit(config: &Config, a: SubmitArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = http(config)?;
    let mut body = submit_body(&a)?;
    let mut req = client.post(format!("{base}/api/tasks"));
    if let Some(k) = &a.idempotency_key {
        req = req.header("Idempotency-Key", k);
    }
    let local = PathBuf::from(&a.source);
    let _zip_guard;
    let req = if local.exists() {
        let zip_path = if local.is_dir() {
            let z =
                zip_directory(&local).with_context(|| format!("cannot zip {}", local.display()))?;
            let p = z.path().to_path_buf();
            _zip_guard = Some(z);
            p
        } else {
            _zip_guard = None;
            local.clone()
        };
        let file = tokio::fs::File::open(&zip_path).await?;
        let len = file.metadata().await?.len();
        let part = reqwest::multipart::Part::stream_with_length(file, len)
            .file_name("source.zip")
            .mime_str("application/zip")?;
        let mut form = reqwest::multipart::Form::new().part("zip_file", part);
        for (name, text) in body.to_form_fields() {
            form = form.text(name, text);
        }
        req.multipart(form)
    } else {
        body.git_url = Some(a.source.clone());
        body.git_ref = a.git_ref.clone();
        body.git_token = a.git_token.clone();
        req.json(&body)
    };
    let answer: StatusAnswer = send(req, &base).await?.json().await?;
    let task_id = answer.task_id.to_string();
    if a.json && !a.wait {
        let record = get_record(&client, &base, &task_id).await?;
        print_json(&record)?;
        return Ok(ExitCode::SUCCESS);
    }
    println!("{task_id}");
    if !a.wait {
        return Ok(ExitCode::SUCCESS);
    }
    follow(&client, &base, &task_id, a.json).await
}

async fn get_record(client: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<TaskView> {
    Ok(send(client.get(format!("{base}/api/tasks/{id}")), base)
        .await?
        .json()
        .await?)
}

/// Prints each event as it happens until the task ends, following the live event stream
/// (Server-Sent Events) and reconnecting after the last event seen if the connection drops;
/// exits 0 only if the task COMPLETED.
async fn follow(
    client: &reqwest::Client,
    base: &str,
    id: &str,
    json_out: bool,
) -> anyhow::Result<ExitCode> {
    use eventsource_stream::Eventsource;
    use futures::StreamExt;
    let mut after = 0i64;
    let mut stderr = std::io::stderr();
    let mut failures = 0u32;
    'reconnect: loop {
        let req = client
            .get(format!("{base}/api/tasks/{id}/events?after={after}"))
            .header(reqwest::header::ACCEPT, "text/event-stream");
        let resp = send(req, base).await?;
        let mut events = resp.bytes_stream().eventsource();
        while let Some(item) = events.next().await {
            let item = match item {
                Ok(i) => i,
                Err(e) => {
                    failures += 1;
                    if failures > 5 {
                        bail!("the event stream of {id} keeps failing: {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue 'reconnect;
                }
            };
            if item.event == "error" {
                bail!("the gateway could not follow {id}: {}", item.data);
            }
            let Ok(ev) = serde_json::from_str::<TaskEvent>(&item.data) else {
                continue;
            };
            after = ev.seq;
            let time = ev.at.format("%H:%M:%S%.3f");
            match ev.status {
                Some(s) => {
                    let _ = writeln!(stderr, "{time}  {:<18} {}", s.as_str(), ev.message);
                    // An attempt ended; the task has too unless a retry began the next.
                    if s.is_terminal() {
                        let record = get_record(client, base, id).await?;
                        if record.status.is_terminal() {
                            break 'reconnect;
                        }
                    }
                }
                None => {
                    let _ = writeln!(stderr, "{time}    {}", ev.message);
                }
            }
        }
        // The server closed the stream before the task ended: resume after the last event.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let record = get_record(client, base, id).await?;
    if json_out {
        print_json(&record)?;
    }
    Ok(if record.status == TaskStatus::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn status(config: &Config, a: StatusArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = http(config)?;
    if a.wait {
        return follow(&client, &base, &a.task_id, a.json).await;
    }
    let r = get_record(&client, &base, &a.task_id).await?;
    if a.json {
        print_json(&r)?;
    } else {
        println!("{}  {}  {}", r.task_id, r.status, r.message);
        println!("source:  {}", r.source);
        println!(
            "created: {}  updated: {}",
            api_time(r.created_at),
            api_time(r.updated_at)
        );
        if let Some(s) = &r.summary {
            println!(
                "agent:   {} steps, {} tool calls, {} tokens, {} ms, files changed: {}",
                s.steps,
                s.tool_calls,
                s.total_tokens,
                s.wall_ms,
                s.files_changed.join(", ")
            );
            println!(
                "usage:   {}: {} prompt ({} cached) + {} completion ({} reasoning) tokens, ${:.6}",
                s.model,
                s.prompt_tokens,
                s.cached_tokens,
                s.completion_tokens,
                s.reasoning_tokens,
                s.cost_usd
            );
        }
        if let Some(u) = &r.pr_url {
            println!("pull request: {u}");
        }
        if let Some(e) = &r.pr_error {
            println!(
                "pull request not opened: {e} (patchflow pr {} tries again)",
                r.task_id
            );
        }
        if let Some(w) = &r.links.workflow {
            println!("workflow: {w}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `result --json`: the record's outcome with the diff. Fields in name order, as printed.
#[derive(Debug, Serialize)]
struct ResultDocument<'a> {
    diff: String,
    message: String,
    status: TaskStatus,
    summary: Option<AgentSummary>,
    task_id: &'a str,
}

pub async fn result(config: &Config, a: ResultArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = http(config)?;
    let id = &a.task_id;
    if a.json {
        let record = get_record(&client, &base, id).await?;
        let diff = send(client.get(format!("{base}/api/tasks/{id}/diff")), &base)
            .await?
            .text()
            .await?;
        print_json(&ResultDocument {
            diff,
            message: record.message,
            status: record.status,
            summary: record.summary,
            task_id: id,
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    if a.summary {
        let record = get_record(&client, &base, id).await?;
        print_json(&record.summary)?;
        return Ok(ExitCode::SUCCESS);
    }
    let what = if a.transcript {
        "transcript"
    } else if a.log {
        "log"
    } else {
        "diff"
    };
    let url = match (a.candidate, a.turn) {
        (Some(n), _) => format!("{base}/api/tasks/{id}/candidates/{n}/{what}"),
        (None, Some(t)) => format!("{base}/api/tasks/{id}/{what}?turn={t}"),
        (None, None) => format!("{base}/api/tasks/{id}/{what}"),
    };
    let body = send(client.get(url), &base).await?.bytes().await?;
    std::io::stdout().write_all(&body)?;
    Ok(ExitCode::SUCCESS)
}

/// `patchflow say TASK_ID "..."`: a follow-up turn (`POST /api/tasks/{id}/messages`).
pub async fn say(config: &Config, a: SayArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = http(config)?;
    let message = if a.message == "-" {
        std::io::read_to_string(std::io::stdin()).context("cannot read the message")?
    } else {
        a.message.clone()
    };
    let answer: TurnAnswer = send(
        client
            .post(format!("{base}/api/tasks/{}/messages", a.task_id))
            .json(&MessageBody { message }),
        &base,
    )
    .await?
    .json()
    .await?;
    println!("{}  turn {}  accepted", answer.task_id, answer.turn);
    if !a.wait {
        return Ok(ExitCode::SUCCESS);
    }
    // The turn's end: the record back at a final status with this turn recorded.
    loop {
        let r = get_record(&client, &base, &a.task_id).await?;
        let turn = r.turns.iter().find(|t| t.turn == answer.turn);
        if let Some(t) = turn.filter(|t| t.status.is_terminal()) {
            println!(
                "{}  turn {}  {}  {}",
                a.task_id, t.turn, t.status, r.message
            );
            return Ok(if t.status == TaskStatus::Completed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `patchflow candidates TASK_ID`: a best-of-N task's candidates, one per line.
pub async fn candidates(config: &Config, a: CandidatesArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = http(config)?;
    let r = get_record(&client, &base, &a.task_id).await?;
    if a.json {
        print_json(&serde_json::json!({
            "task_id": r.task_id,
            "selected": r.selected,
            "candidates": r.candidates,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if r.candidates.is_empty() {
        println!("{}  ran one agent: no candidates", r.task_id);
        return Ok(ExitCode::SUCCESS);
    }
    println!("CANDIDATE  STATUS          FILES  COST_USD  SUMMARY");
    for c in &r.candidates {
        let mark = if r.selected == Some(c.candidate) {
            "*"
        } else {
            " "
        };
        let summary = c.error.as_deref().unwrap_or(&c.summary);
        println!(
            "{mark}{:<9} {:<15} {:>5}  {:>8.4}  {}",
            c.candidate,
            c.status.as_str(),
            c.files_changed.len(),
            c.cost_usd,
            summary.lines().next().unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `patchflow select TASK_ID N`: candidate N's diff becomes the task's.
pub async fn select(config: &Config, a: SelectArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = http(config)?;
    let r: TaskView = send(
        client
            .post(format!("{base}/api/tasks/{}/select", a.task_id))
            .json(&SelectBody {
                candidate: a.candidate,
            }),
        &base,
    )
    .await?
    .json()
    .await?;
    if a.json {
        print_json(&r)?;
    } else {
        println!(
            "{}  candidate {} selected{}",
            a.task_id,
            a.candidate,
            r.pr_url
                .as_deref()
                .map(|u| format!("  pull request {u}"))
                .unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Asks for a new attempt of an ended task (`POST /api/tasks/{task_id}/retry`).
pub async fn retry(config: &Config, a: RetryArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = http(config)?;
    let body = RetryBody {
        mode: a.mode.parse()?,
    };
    let r: TaskView = send(
        client
            .post(format!("{base}/api/tasks/{}/retry", a.task_id))
            .json(&body),
        &base,
    )
    .await?
    .json()
    .await?;
    if a.json {
        print_json(&r)?;
    } else {
        println!(
            "{}  attempt {}  {}  {}",
            a.task_id, r.attempt, r.status, r.message
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `patchflow pr TASK_ID`: prints the pull request's URL, or why there is none.
pub async fn pull_request(config: &Config, a: PrArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = http(config)?;
    let mut body = serde_json::Map::new();
    if a.github_token_stdin {
        let mut token = String::new();
        std::io::stdin()
            .read_line(&mut token)
            .context("cannot read the token from standard input")?;
        body.insert("github_token".into(), token.trim().into());
    }
    let r: serde_json::Value = send(
        client
            .post(format!("{base}/api/tasks/{}/pull-request", a.task_id))
            .json(&body),
        &base,
    )
    .await?
    .json()
    .await?;
    println!("{}", r["pr_url"].as_str().unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

pub async fn cancel(config: &Config, a: CancelArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = http(config)?;
    send(
        client
            .post(format!("{base}/api/tasks/{}/cancel", a.task_id))
            .json(&CancelBody {
                reason: a.reason.clone(),
            }),
        &base,
    )
    .await?;
    println!("cancel requested for {}", a.task_id);
    Ok(ExitCode::SUCCESS)
}

pub async fn list(config: &Config, a: ListArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = http(config)?;
    let mut url = format!("{base}/api/tasks?limit={}", a.limit);
    if let Some(s) = &a.status {
        url.push_str(&format!("&status={s}"));
    }
    let page: TaskPage = send(client.get(url), &base).await?.json().await?;
    if a.json {
        print_json(&page)?;
        return Ok(ExitCode::SUCCESS);
    }
    for t in &page.tasks {
        println!(
            "{}  {:<18} {}  {}",
            t.task_id,
            t.status.as_str(),
            api_time(t.created_at),
            t.source
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `patchflow usage`: tasks, tokens and cost per day and model (`GET /api/usage`), then the
/// totals.
pub async fn usage(config: &Config, a: UsageArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = http(config)?;
    let mut query = Vec::new();
    for (name, value) in [("from", &a.from), ("to", &a.to), ("tenant", &a.tenant)] {
        if let Some(v) = value {
            query.push((name, v.as_str()));
        }
    }
    let answer: UsageAnswer = send(client.get(format!("{base}/api/usage")).query(&query), &base)
        .await?
        .json()
        .await?;
    if a.json {
        print_json(&answer)?;
    } else {
        print!("{}", usage_table(&answer));
    }
    Ok(ExitCode::SUCCESS)
}

/// The report as a table: a line per day, tenant and model, then the totals; dollars to
/// six decimals.
fn usage_table(a: &UsageAnswer) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "usage from {} to {} ({})",
        api_time(a.from),
        api_time(a.to),
        if a.tenants.is_empty() {
            "no tasks".to_string()
        } else {
            format!("tenants: {}", a.tenants.join(", "))
        }
    );
    let width = |f: &dyn Fn(&patchflow_core::UsageRow) -> usize, title: &str| {
        a.days.iter().map(f).max().unwrap_or(0).max(title.len())
    };
    let tw = width(&|d| d.tenant.chars().count(), "TENANT");
    let mw = width(&|d| d.model.chars().count(), "MODEL");
    let line = |out: &mut String, day: &str, tenant: &str, model: &str, n: [String; 7]| {
        let _ = writeln!(
            out,
            "{day:<10}  {tenant:<tw$}  {model:<mw$}  {:>6}  {:>12}  {:>12}  {:>12}  {:>12}  {:>12}  {:>14}",
            n[0], n[1], n[2], n[3], n[4], n[5], n[6]
        );
    };
    line(
        &mut out,
        "DAY",
        "TENANT",
        "MODEL",
        [
            "TASKS",
            "PROMPT",
            "COMPLETION",
            "CACHED",
            "REASONING",
            "TOTAL",
            "COST (USD)",
        ]
        .map(String::from),
    );
    for d in &a.days {
        line(
            &mut out,
            &d.day.to_string(),
            &d.tenant,
            &d.model,
            [
                d.tasks.to_string(),
                d.prompt_tokens.to_string(),
                d.completion_tokens.to_string(),
                d.cached_tokens.to_string(),
                d.reasoning_tokens.to_string(),
                d.total_tokens.to_string(),
                format!("{:.6}", d.cost_usd),
            ],
        );
    }
    let t = &a.total;
    line(
        &mut out,
        "total",
        "",
        "",
        [
            t.tasks.to_string(),
            t.prompt_tokens.to_string(),
            t.completion_tokens.to_string(),
            t.cached_tokens.to_string(),
            t.reasoning_tokens.to_string(),
            t.total_tokens.to_string(),
            format!("{:.6}", t.cost_usd),
        ],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_usage_table_has_a_line_per_day_and_model_and_the_totals() {
        let row = |day: &str, tenant: &str, model: &str, tasks: u64, cost_usd: f64| {
            patchflow_core::UsageRow {
                day: day.parse().unwrap(),
                tenant: tenant.into(),
                model: model.into(),
                tasks,
                prompt_tokens: 1000 * tasks,
                completion_tokens: 10 * tasks,
                cached_tokens: 400,
                reasoning_tokens: 3,
                total_tokens: 1010 * tasks,
                cost_usd,
            }
        };
        let range =
            patchflow_api::UsageRange::parse(Some("2026-03-01"), Some("2026-03-03"), Utc::now())
                .unwrap();
        let a = UsageAnswer::new(
            range,
            vec!["acme".into()],
            vec![
                row("2026-03-01", "acme", "gpt-4.1-mini", 2, 0.0125),
                row("2026-03-02", "acme", "a-much-longer-model-name", 1, 1.5),
            ],
        );
        let text = usage_table(&a);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(lines[0].starts_with("usage from 2026-03-01T00:00:00Z to 2026-03-03T00:00:00Z"));
        assert!(lines[1].starts_with("DAY "), "{text}");
        assert!(
            lines[2].starts_with("2026-03-01  acme    gpt-4.1-mini "),
            "{text}"
        );
        assert!(lines[2].ends_with("0.012500"), "{text}");
        assert!(lines[3].ends_with("1.500000"), "{text}");
        assert!(
            lines[4].starts_with("total ") && lines[4].ends_with("1.512500"),
            "{text}"
        );
        assert!(lines[4].contains(" 3030 "), "{text}");
        // The columns line up.
        let cost_at = lines[1].find("COST (USD)").unwrap() + "COST (USD)".len();
        assert!(lines.iter().skip(1).all(|l| l.len() == cost_at), "{text}");
    }
}
