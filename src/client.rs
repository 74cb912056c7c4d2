//! The client commands (`submit`, `status`, `result`, `cancel`, `retry`, `list`): thin
//! callers of the HTTP API, so they work against any gateway (`submit --grpc` and `watch`
//! use the gRPC API, see [`crate::grpc_client`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use patchflow_core::{Config, TaskEvent, TaskStatus};
use serde_json::{Value, json};

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
            .unwrap_or_else(|| format!("http://{}", config.http_addr))
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
    /// Submitting again with the same key returns the same task.
    #[arg(long)]
    pub idempotency_key: Option<String>,
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
    pub grpc_server: crate::grpc_client::GrpcServerOpt,
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

fn http() -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .context("cannot build the HTTP client")
}

/// Turns an API error body into a readable error.
async fn check(resp: reqwest::Response) -> anyhow::Result<reqwest::Response> {
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let message = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or(body);
    bail!("{} ({status})", message.trim())
}

async fn send(req: reqwest::RequestBuilder, base: &str) -> anyhow::Result<reqwest::Response> {
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

pub async fn submit(config: &Config, a: SubmitArgs) -> anyhow::Result<ExitCode> {
    if a.grpc {
        return crate::grpc_client::submit(config, a).await;
    }
    let base = a.server.base(config);
    let client = http()?;
    let mut fields = serde_json::Map::new();
    fields.insert("task_description".into(), json!(a.task_description));
    if let Some(v) = &a.target_file {
        fields.insert("target_file".into(), json!(v));
    }
    if let Some(v) = &a.task_model {
        fields.insert("model".into(), json!(v));
    }
    let mut limits = serde_json::Map::new();
    if let Some(v) = a.max_steps {
        limits.insert("max_steps".into(), json!(v));
    }
    if let Some(v) = a.max_tokens {
        limits.insert("max_tokens".into(), json!(v));
    }
    if let Some(v) = a.wall_seconds {
        limits.insert("wall_seconds".into(), json!(v));
    }
    if !limits.is_empty() {
        fields.insert("limits".into(), Value::Object(limits));
    }
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
        for (k, v) in fields {
            let text = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            form = form.text(k, text);
        }
        req.multipart(form)
    } else {
        fields.insert("git_url".into(), json!(a.source));
        if let Some(r) = &a.git_ref {
            fields.insert("git_ref".into(), json!(r));
        }
        req.json(&Value::Object(fields))
    };
    let resp: Value = send(req, &base).await?.json().await?;
    let task_id = resp["task_id"].as_str().unwrap_or_default().to_string();
    if a.json && !a.wait {
        let record = get_record(&client, &base, &task_id).await?;
        println!("{}", serde_json::to_string_pretty(&record)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{task_id}");
    if !a.wait {
        return Ok(ExitCode::SUCCESS);
    }
    follow(&client, &base, &task_id, a.json).await
}

async fn get_record(client: &reqwest::Client, base: &str, id: &str) -> anyhow::Result<Value> {
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
                        let now: TaskStatus = serde_json::from_value(record["status"].clone())?;
                        if now.is_terminal() {
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
        println!("{}", serde_json::to_string_pretty(&record)?);
    }
    let status: TaskStatus = serde_json::from_value(record["status"].clone())?;
    Ok(if status == TaskStatus::Completed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn status(config: &Config, a: StatusArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = http()?;
    if a.wait {
        return follow(&client, &base, &a.task_id, a.json).await;
    }
    let r = get_record(&client, &base, &a.task_id).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{}  {}  {}",
            r["task_id"].as_str().unwrap_or_default(),
            r["status"].as_str().unwrap_or_default(),
            r["message"].as_str().unwrap_or_default()
        );
        println!("source:  {}", r["source"].as_str().unwrap_or_default());
        println!(
            "created: {}  updated: {}",
            r["created_at"].as_str().unwrap_or_default(),
            r["updated_at"].as_str().unwrap_or_default()
        );
        if let Some(s) = r["summary"].as_object() {
            println!(
                "agent:   {} steps, {} tool calls, {} tokens, {} ms, files changed: {}",
                s["steps"],
                s["tool_calls"],
                s["total_tokens"],
                s["wall_ms"],
                s["files_changed"]
                    .as_array()
                    .map(|f| f
                        .iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(", "))
                    .unwrap_or_default()
            );
        }
        if let Some(w) = r["links"]["workflow"].as_str() {
            println!("workflow: {w}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn result(config: &Config, a: ResultArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = http()?;
    let id = &a.task_id;
    if a.json {
        let record = get_record(&client, &base, id).await?;
        let diff = send(client.get(format!("{base}/api/tasks/{id}/diff")), &base)
            .await?
            .text()
            .await?;
        let out = json!({"task_id": id, "status": record["status"], "message": record["message"], "summary": record["summary"], "diff": diff});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    if a.summary {
        let record = get_record(&client, &base, id).await?;
        println!("{}", serde_json::to_string_pretty(&record["summary"])?);
        return Ok(ExitCode::SUCCESS);
    }
    let what = if a.transcript {
        "transcript"
    } else if a.log {
        "log"
    } else {
        "diff"
    };
    let body = send(client.get(format!("{base}/api/tasks/{id}/{what}")), &base)
        .await?
        .bytes()
        .await?;
    std::io::stdout().write_all(&body)?;
    Ok(ExitCode::SUCCESS)
}

/// Asks for a new attempt of an ended task (`POST /api/tasks/{task_id}/retry`).
pub async fn retry(config: &Config, a: RetryArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = http()?;
    let r: Value = send(
        client
            .post(format!("{base}/api/tasks/{}/retry", a.task_id))
            .json(&json!({"mode": a.mode})),
        &base,
    )
    .await?
    .json()
    .await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{}  attempt {}  {}  {}",
            a.task_id,
            r["attempt"],
            r["status"].as_str().unwrap_or_default(),
            r["message"].as_str().unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn cancel(config: &Config, a: CancelArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = http()?;
    send(
        client
            .post(format!("{base}/api/tasks/{}/cancel", a.task_id))
            .json(&json!({"reason": a.reason})),
        &base,
    )
    .await?;
    println!("cancel requested for {}", a.task_id);
    Ok(ExitCode::SUCCESS)
}

pub async fn list(config: &Config, a: ListArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = http()?;
    let mut url = format!("{base}/api/tasks?limit={}", a.limit);
    if let Some(s) = &a.status {
        url.push_str(&format!("&status={s}"));
    }
    let page: Value = send(client.get(url), &base).await?.json().await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&page)?);
        return Ok(ExitCode::SUCCESS);
    }
    for t in page["tasks"].as_array().into_iter().flatten() {
        println!(
            "{}  {:<18} {}  {}",
            t["task_id"].as_str().unwrap_or_default(),
            t["status"].as_str().unwrap_or_default(),
            t["created_at"].as_str().unwrap_or_default(),
            t["source"].as_str().unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}
