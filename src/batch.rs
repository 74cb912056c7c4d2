//! `patchflow batch`: many tasks from one JSONL file, followed and exported as a whole.
//! The line formats, the predictions and the counts are patchflow-api's (`batch`).
//!
//! - `batch submit FILE.jsonl [--batch-id ID] [--via http|kafka]`: one task per line, either
//!   the HTTP submit body (`git_url`, `task_description`, …) or a SWE-bench instance
//!   (`instance_id`, `repo`, `base_commit`, `problem_statement`). Every line is checked
//!   before anything is sent, so a bad file sends nothing. Each task's idempotency key is
//!   `<batch>/<instance_id>` (or `<batch>/<line>`), so submitting the same file again to the
//!   same batch starts nothing new.
//! - `batch status ID [--follow]`: counts per status, with a progress bar while following.
//! - `batch export ID --format preds`: `preds.json` for a SWE-bench harness
//!   (`instance_id`, `model_name_or_path`, `model_patch`).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use patchflow_api::batch::{self as lines, BatchCounts, Prediction};
use patchflow_api::kafka::TaskMessage;
use patchflow_api::{ErrorBody, SubmitBody, TaskPage, TaskView};
use patchflow_core::{Config, TaskStatus};
use patchflow_platform::bus::{self, Producer};
use serde::de::DeserializeOwned;

use crate::client::{ServerOpt, print_json};

#[derive(Debug, Subcommand)]
pub enum BatchCommand {
    /// Submit every line of a JSONL file as a task of one batch.
    Submit(SubmitArgs),
    /// Counts per status of a batch's tasks.
    Status(StatusArgs),
    /// Write a batch's results in a harness's format.
    Export(ExportArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    Http,
    Kafka,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// SWE-bench predictions: a JSON list of {instance_id, model_name_or_path, model_patch}.
    Preds,
}

#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// One task per line (JSON): a submit body or a SWE-bench instance.
    pub file: PathBuf,
    /// The batch's id (default: generated and printed).
    #[arg(long)]
    pub batch_id: Option<String>,
    /// Through the HTTP API, or as messages on the Kafka tasks topic.
    #[arg(long, value_enum, default_value_t = Via::Http)]
    pub via: Via,
    /// Model for every task of the batch (default: the server's).
    #[arg(long = "task-model")]
    pub task_model: Option<String>,
    #[command(flatten)]
    pub server: ServerOpt,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    pub batch_id: String,
    /// Keep following until every task has ended, with a progress bar.
    #[arg(long)]
    pub follow: bool,
    /// Print the counts as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerOpt,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    pub batch_id: String,
    #[arg(long, value_enum, default_value_t = Format::Preds)]
    pub format: Format,
    /// Where to write (default: preds.json).
    #[arg(long, short = 'o', default_value = "preds.json")]
    pub output: PathBuf,
    /// `model_name_or_path` of every entry (default: each task's model, else `patchflow`).
    #[arg(long)]
    pub model_name: Option<String>,
    #[command(flatten)]
    pub server: ServerOpt,
}

pub async fn run(config: Config, cmd: BatchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BatchCommand::Submit(a) => submit(&config, a).await,
        BatchCommand::Status(a) => status(&config, a).await,
        BatchCommand::Export(a) => export(&config, a).await,
    }
}

fn client(config: &Config) -> anyhow::Result<reqwest::Client> {
    crate::client::http(config)
}

/// The refusal's message, or `fallback` when the answer is not an error body.
async fn refusal(r: reqwest::Response, fallback: &str) -> String {
    r.json::<ErrorBody>()
        .await
        .map_or_else(|_| fallback.to_string(), |e| e.message)
}

async fn get_json<T: DeserializeOwned>(client: &reqwest::Client, url: &str) -> anyhow::Result<T> {
    let r = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}: is `patchflow up` running?"))?;
    let status = r.status();
    if !status.is_success() {
        bail!("{} ({status})", refusal(r, "request failed").await);
    }
    Ok(r.json().await?)
}

async fn submit(config: &Config, a: SubmitArgs) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("cannot read {}", a.file.display()))?;
    let batch_id = a.batch_id.clone().unwrap_or_else(|| {
        let id = patchflow_core::TaskId::generate();
        format!("batch-{}", &id.as_str()[4..16])
    });
    if batch_id.is_empty() || batch_id.len() > 128 || batch_id.contains('/') {
        bail!("--batch-id must be 1 to 128 characters without `/`");
    }
    let mut bodies = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match lines::parse_line(line, i + 1, &batch_id, a.task_model.as_deref()) {
            Ok(b) => bodies.push(b),
            Err(e) => errors.push(format!("line {}: {e}", i + 1)),
        }
    }
    if !errors.is_empty() {
        bail!(
            "{} has {} bad line(s); nothing was submitted:\n  {}",
            a.file.display(),
            errors.len(),
            errors.join("\n  ")
        );
    }
    if bodies.is_empty() {
        bail!("{} has no tasks", a.file.display());
    }
    match a.via {
        Via::Http => submit_http(config, &a, &bodies).await?,
        Via::Kafka => submit_kafka(config, &bodies).await?,
    }
    eprintln!(
        "submitted {} tasks to batch {batch_id} via {}",
        bodies.len(),
        match a.via {
            Via::Http => "HTTP",
            Via::Kafka => "Kafka",
        }
    );
    println!("{batch_id}");
    Ok(ExitCode::SUCCESS)
}

async fn submit_http(config: &Config, a: &SubmitArgs, bodies: &[SubmitBody]) -> anyhow::Result<()> {
    use futures::StreamExt;
    let base = a.server.base(config);
    let client = client(config)?;
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(bodies.iter())
        .map(|b| {
            let client = client.clone();
            let url = format!("{base}/api/tasks");
            async move {
                let r = client
                    .post(&url)
                    .json(b)
                    .send()
                    .await
                    .with_context(|| format!("cannot reach {url}"))?;
                let status = r.status();
                if !status.is_success() {
                    bail!(
                        "{}: {} ({status})",
                        b.idempotency_key.as_deref().unwrap_or_default(),
                        refusal(r, "refused").await
                    );
                }
                Ok(())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let failed: Vec<String> = results
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} tasks were refused (submit again: accepted ones are not repeated):\n  {}",
            failed.len(),
            bodies.len(),
            failed.join("\n  ")
        );
    }
    Ok(())
}

async fn submit_kafka(config: &Config, bodies: &[SubmitBody]) -> anyhow::Result<()> {
    let Some(settings) = crate::kafka::settings(config)? else {
        bail!("--via kafka needs kafka_brokers (PATCHFLOW_KAFKA_BROKERS)");
    };
    bus::ensure_topics(&settings, &[settings.tasks_topic.as_str()]).await?;
    let producer = Producer::new(&settings, Duration::from_secs(30))?;
    let sends = bodies.iter().map(|b| {
        let key = b.idempotency_key.clone().unwrap_or_default();
        let payload = serde_json::to_vec(&TaskMessage::new(b));
        let producer = producer.clone();
        let topic = settings.tasks_topic.clone();
        async move {
            let payload = payload?;
            producer
                .send(&topic, key.as_bytes(), &payload, &[])
                .await
                .map_err(anyhow::Error::from)
        }
    });
    for r in futures::future::join_all(sends).await {
        r?;
    }
    Ok(())
}

/// Every task of a batch (all pages).
async fn batch_tasks(
    client: &reqwest::Client,
    base: &str,
    batch_id: &str,
) -> anyhow::Result<Vec<TaskView>> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = reqwest::Url::parse(&format!("{base}/api/tasks"))?;
        url.query_pairs_mut()
            .append_pair("batch_id", batch_id)
            .append_pair("limit", "200");
        if let Some(c) = &cursor {
            url.query_pairs_mut().append_pair("cursor", c);
        }
        let page: TaskPage = get_json(client, url.as_str()).await?;
        out.extend(page.tasks);
        match page.next_cursor {
            Some(c) if !c.is_empty() => cursor = Some(c),
            _ => return Ok(out),
        }
    }
}

/// Tasks per status, in the pipeline's order.
pub fn counts(tasks: &[TaskView]) -> BTreeMap<usize, (TaskStatus, usize)> {
    let mut m: BTreeMap<usize, (TaskStatus, usize)> = BTreeMap::new();
    for t in tasks {
        let s = t.status;
        let idx = TaskStatus::ALL.iter().position(|x| *x == s).unwrap_or(0);
        m.entry(idx).or_insert((s, 0)).1 += 1;
    }
    m
}

fn bar(done: usize, total: usize, width: usize) -> String {
    let filled = (done * width).checked_div(total).unwrap_or(0).min(width);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

fn line(tasks: &[TaskView]) -> (String, usize) {
    let c = counts(tasks);
    let done: usize = c
        .values()
        .filter(|(s, _)| s.is_terminal())
        .map(|(_, n)| n)
        .sum();
    let parts: Vec<String> = c.values().map(|(s, n)| format!("{s} {n}")).collect();
    (
        format!(
            "{} {done}/{} ended  {}",
            bar(done, tasks.len(), 30),
            tasks.len(),
            parts.join("  ")
        ),
        done,
    )
}

async fn status(config: &Config, a: StatusArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = client(config)?;
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    loop {
        let tasks = batch_tasks(&client, &base, &a.batch_id).await?;
        if tasks.is_empty() {
            bail!("batch {} has no tasks", a.batch_id);
        }
        let (text, done) = line(&tasks);
        let finished = done == tasks.len();
        if a.follow && !finished {
            if text != last {
                let mut err = std::io::stderr();
                if tty {
                    let _ = write!(err, "\r{text}\x1b[K");
                } else {
                    let _ = writeln!(err, "{text}");
                }
                let _ = err.flush();
                last = text;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        if a.follow && tty {
            eprintln!("\r{text}\x1b[K");
        }
        let c = counts(&tasks);
        if a.json {
            print_json(&BatchCounts {
                batch_id: a.batch_id.clone(),
                total: tasks.len(),
                ended: done,
                counts: c.values().map(|(s, n)| (s.to_string(), *n)).collect(),
            })?;
        } else {
            println!("batch {}: {} tasks, {done} ended", a.batch_id, tasks.len());
            for (s, n) in c.values() {
                println!("  {:<18} {n}", s.as_str());
            }
        }
        let all_completed = c.values().all(|(s, _)| *s == TaskStatus::Completed);
        return Ok(if !a.follow || (finished && all_completed) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
}

async fn export(config: &Config, a: ExportArgs) -> anyhow::Result<ExitCode> {
    let base = a.server.base(config);
    let client = client(config)?;
    let tasks = batch_tasks(&client, &base, &a.batch_id).await?;
    if tasks.is_empty() {
        bail!("batch {} has no tasks", a.batch_id);
    }
    let mut preds = Vec::new();
    let mut unfinished = 0;
    let mut without_diff = 0;
    for t in &tasks {
        if !t.status.is_terminal() {
            unfinished += 1;
            continue;
        }
        let id = &t.task_id;
        let r = client
            .get(format!("{base}/api/tasks/{id}/diff"))
            .send()
            .await
            .with_context(|| format!("cannot fetch the diff of {id}"))?;
        let patch = if r.status().is_success() {
            r.text().await?
        } else {
            without_diff += 1;
            String::new()
        };
        let model = a
            .model_name
            .clone()
            .or_else(|| t.model.clone())
            .unwrap_or_else(|| format!("patchflow/{}", config.llm.model));
        let key = t.idempotency_key.as_deref().unwrap_or_default();
        preds.push(Prediction {
            instance_id: lines::instance_of(key, &a.batch_id).to_string(),
            model_name_or_path: model,
            model_patch: patch,
        });
    }
    preds.sort_by(|x, y| x.instance_id.cmp(&y.instance_id));
    std::fs::write(&a.output, serde_json::to_vec_pretty(&preds)?)
        .with_context(|| format!("cannot write {}", a.output.display()))?;
    eprintln!(
        "wrote {} predictions to {} ({unfinished} unfinished task(s) left out, {without_diff} without a diff)",
        preds.len(),
        a.output.display()
    );
    Ok(ExitCode::SUCCESS)
}
