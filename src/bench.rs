//! `patchflow bench`: numbers, measured here, never asserted in tests.
//!
//! - `bench agent`: `patchflow agent` against an in-process scripted model that answers at
//!   once: process start to first model request, the cost of a file-tool step and of a
//!   trivial shell step (time between consecutive model requests), and peak RSS.
//! - `bench tools`: the sandboxed tools per call (WASM vs native) and the shell sandbox's
//!   start-up (see `bench_tools`).
//! - `bench pipeline`: an embedded stack (dev server, worker, gateway) running N one-step
//!   tasks: submit-to-COMPLETED p50/p95, tasks/s, and each stage timed from the task's
//!   recorded history.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use patchflow_core::{Config, TaskEvent, TaskStatus};
use patchflow_scripted_model::{Script, ScriptedCall, ScriptedModel, Turn};
use serde_json::{Value, json};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The agent alone against an instant scripted model.
    Agent {
        /// Runs per measurement.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Tool steps per run for the per-step costs.
        #[arg(long, default_value_t = 40)]
        steps: usize,
    },
    /// The sandboxed tools per call: WASM vs native, sandboxed vs plain spawn.
    Tools {
        /// Calls per file-tool measurement (searches and spawns use a tenth).
        #[arg(long, default_value_t = 500)]
        iterations: usize,
    },
    /// Status reads (`GET /api/tasks/{id}`) by many concurrent readers, without and with
    /// the Redis status cache. The task store is `database_url` (SQLite by default).
    Status {
        #[arg(long, default_value_t = 200)]
        readers: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// The Redis of the cached run.
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
    },
    /// Many watchers on one task: events/s and event -> watcher latency through gRPC
    /// `WatchTask` and the SSE endpoint.
    Watch {
        #[arg(long, default_value_t = 100)]
        watchers: usize,
        /// Agent events written as fast as the store takes them.
        #[arg(long, default_value_t = 500)]
        burst: usize,
        /// Agent events written one per 20 ms, for the latency.
        #[arg(long, default_value_t = 100)]
        paced: usize,
    },
    /// Upload and download of a large staged archive: the local directory vs S3.
    Store {
        /// Size of the archive in MiB.
        #[arg(long, default_value_t = 100)]
        mib: u64,
        /// The S3 store to measure (`s3://…`); default: a `moto_server` started here.
        #[arg(long)]
        s3_url: Option<String>,
    },
    /// Kafka: messages -> workflow starts per second (1 and 2 consumers), produce ->
    /// started latency, the DLQ path's cost, and result-message produce latency.
    Kafka {
        /// Messages per throughput round.
        #[arg(long, default_value_t = 300)]
        messages: usize,
        /// Malformed messages for the DLQ measurement.
        #[arg(long, default_value_t = 200)]
        bad: usize,
        /// An existing broker; default: kafka_brokers, else a Tansu started here.
        #[arg(long)]
        brokers: Option<String>,
    },
    /// Whole tasks through an embedded stack.
    Pipeline {
        /// Tasks submitted one after another (latency).
        #[arg(long, default_value_t = 10)]
        sequential: usize,
        /// Tasks submitted at once (throughput).
        #[arg(long, default_value_t = 30)]
        concurrent: usize,
    },
}

pub async fn run(config: Config, cmd: BenchCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BenchCommand::Agent { runs, steps } => agent(runs, steps).await,
        BenchCommand::Tools { iterations } => crate::bench_tools::run(iterations).await,
        BenchCommand::Kafka {
            messages,
            bad,
            brokers,
        } => crate::bench_kafka::run(&config, brokers, messages, bad).await,
        BenchCommand::Pipeline {
            sequential,
            concurrent,
        } => {
            let mode = Drive::Pipeline {
                sequential,
                concurrent,
            };
            with_stack(&config, None, mode).await
        }
        BenchCommand::Status {
            readers,
            seconds,
            redis_url,
        } => {
            let mode = Drive::Status { readers, seconds };
            let store = config
                .database_url
                .as_deref()
                .map(patchflow_core::config::redact_url)
                .unwrap_or_else(|| "SQLite (a fresh file)".into());
            println!(
                "status reads: {readers} concurrent readers for {seconds} s; task store {store}"
            );
            println!("without the cache:");
            with_stack(&config, None, mode).await?;
            println!(
                "with the Redis status cache ({}):",
                patchflow_core::config::redact_url(&redis_url)
            );
            with_stack(&config, Some(redis_url), mode).await
        }
        BenchCommand::Store { mib, s3_url } => crate::bench_store::run(mib, s3_url).await,
        BenchCommand::Watch {
            watchers,
            burst,
            paced,
        } => crate::bench_watch::run(&config, watchers, burst, paced).await,
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

pub fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (
        percentile(&v, 0.5),
        percentile(&v, 0.95),
        percentile(&v, 0.99),
    )
}

const DEMO_CALC: &str = include_str!("../examples/demo-repo/calc.py");
const DEMO_TEST: &str = include_str!("../examples/demo-repo/test_calc.py");

/// A small repository with a 10 KiB file to read.
fn bench_repo(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("calc.py"), DEMO_CALC)?;
    std::fs::write(dir.join("test_calc.py"), DEMO_TEST)?;
    let line = "# padding line to make a ten kibibyte file for the read benchmark\n";
    std::fs::write(dir.join("ten_kib.txt"), line.repeat(10 * 1024 / line.len()))?;
    Ok(())
}

fn script_of(calls: Vec<(&str, Value)>) -> Script {
    let mut turns: Vec<Turn> = calls
        .into_iter()
        .map(|(name, arguments)| Turn {
            tool_calls: vec![ScriptedCall {
                name: name.into(),
                arguments,
            }],
            ..Turn::default()
        })
        .collect();
    turns.push(Turn {
        tool_calls: vec![ScriptedCall {
            name: "finish".into(),
            arguments: json!({"summary": "done"}),
        }],
        ..Turn::default()
    });
    Script {
        turns,
        ..Script::default()
    }
}

struct AgentSample {
    to_first_request: Duration,
    step_gaps: Vec<Duration>,
    max_rss_kib: i64,
}

/// Runs `patchflow agent` once against `script`; returns its timings.
async fn run_agent_once(
    exe: &Path,
    work: &Path,
    baseline: &Path,
    script: Script,
) -> anyhow::Result<AgentSample> {
    let model = ScriptedModel::start(script, SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let ws = work.join("ws");
    if ws.exists() {
        std::fs::remove_dir_all(&ws)?;
    }
    patchflow_platform::archive::unpack_tar_zst(baseline, &ws)?;
    let out = work.join("out");
    let task = work.join("task.json");
    let spec = patchflow_core::TaskSpec::new(
        patchflow_core::TaskSource::Archive {
            key: "bench".into(),
        },
        "benchmark",
    );
    std::fs::write(&task, serde_json::to_vec(&spec)?)?;
    let started = Instant::now();
    let status = tokio::process::Command::new(exe)
        .arg("agent")
        .arg("--task")
        .arg(&task)
        .arg("--workspace")
        .arg(&ws)
        .arg("--baseline")
        .arg(baseline)
        .arg("--out")
        .arg(&out)
        .arg("--scratch")
        .arg(work.join("tmp"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("OPENAI_BASE_URL", model.base_url())
        .env("PATCHFLOW_MODEL", "bench")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await?;
    if !status.success() {
        bail!("the agent failed ({status})");
    }
    let seen = model.observed();
    if !seen.violations.is_empty() {
        bail!("scripted model violations: {:?}", seen.violations);
    }
    let first = *seen
        .arrivals
        .first()
        .context("the agent made no model request")?;
    // The agent's own time per step: from the model's answer being ready to the next
    // request arriving (parse, run the tool, build and send the next request).
    let gaps = seen
        .answered_at
        .iter()
        .zip(seen.arrivals.iter().skip(1))
        .map(|(answered, next)| next.saturating_duration_since(*answered))
        .collect();
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    Ok(AgentSample {
        to_first_request: first.saturating_duration_since(started),
        step_gaps: gaps,
        max_rss_kib: usage.max_rss(),
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn agent(runs: usize, steps: usize) -> anyhow::Result<ExitCode> {
    let exe = crate::stack::agent_program()?;
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    bench_repo(&repo)?;
    let baseline = dir.path().join("code.tar.zst");
    patchflow_platform::archive::pack_tar_zst(&repo, &baseline, 3)?;
    std::fs::create_dir_all(dir.path().join("tmp"))?;

    let mut first = Vec::new();
    let mut rss = 0i64;
    for _ in 0..runs.max(1) {
        let s = run_agent_once(&exe, dir.path(), &baseline, script_of(vec![])).await?;
        first.push(ms(s.to_first_request));
        rss = rss.max(s.max_rss_kib);
    }
    let read = vec![("read_file_content", json!({"file_path": "ten_kib.txt"})); steps];
    let s = run_agent_once(&exe, dir.path(), &baseline, script_of(read)).await?;
    // Drop the first gap (first-use warm-up) and the last (the finish turn).
    let read_gaps: Vec<f64> = s
        .step_gaps
        .iter()
        .skip(1)
        .take(steps.saturating_sub(1))
        .map(|d| ms(*d))
        .collect();
    rss = rss.max(s.max_rss_kib);
    let shell = vec![("run_shell_command", json!({"command_string": "true"})); steps];
    let s = run_agent_once(&exe, dir.path(), &baseline, script_of(shell)).await?;
    let shell_gaps: Vec<f64> = s
        .step_gaps
        .iter()
        .skip(1)
        .take(steps.saturating_sub(1))
        .map(|d| ms(*d))
        .collect();
    rss = rss.max(s.max_rss_kib);

    let (f50, f95, _) = stats(first);
    let (r50, r95, _) = stats(read_gaps);
    let (s50, s95, _) = stats(shell_gaps);
    println!(
        "patchflow agent benchmark ({}, instant scripted model, {runs} runs, {steps} steps per step measurement)",
        exe.display()
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9}",
        "measure", "p50", "p95", "target"
    );
    println!(
        "{:<44} {:>7.2}ms {:>7.2}ms {:>9}",
        "process start -> first model request", f50, f95, "<= 35 ms"
    );
    println!(
        "{:<44} {:>7.2}ms {:>7.2}ms {:>9}",
        "file-tool step (read 10 KiB), per step", r50, r95, "<= 2 ms"
    );
    println!(
        "{:<44} {:>7.2}ms {:>7.2}ms {:>9}",
        "shell step (`true`), per step", s50, s95, "<= 10 ms"
    );
    println!(
        "{:<44} {:>7.1}MB {:>9} {:>9}",
        "peak RSS (largest run)",
        rss as f64 / 1024.0,
        "",
        "<= 30 MB"
    );
    Ok(ExitCode::SUCCESS)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let st = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()?;
    if !st.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&st.stderr));
    }
    Ok(())
}

/// What to do with a running bench stack.
#[derive(Debug, Clone, Copy)]
enum Drive {
    Pipeline {
        sequential: usize,
        concurrent: usize,
    },
    Status {
        readers: usize,
        seconds: u64,
    },
}

/// Runs `drive` against an embedded stack (dev server, worker, gateway, instant model),
/// on `base`'s task store if it names one, with Redis when `redis_url` is given.
async fn with_stack(
    base: &Config,
    redis_url: Option<String>,
    drive_mode: Drive,
) -> anyhow::Result<ExitCode> {
    let dir = tempfile::tempdir()?;
    let repo = dir.path().join("repo");
    bench_repo(&repo)?;
    git(&repo, &["init", "-q"])?;
    git(&repo, &["add", "."])?;
    git(
        &repo,
        &[
            "-c",
            "user.name=bench",
            "-c",
            "user.email=bench@localhost",
            "commit",
            "-qm",
            "init",
        ],
    )?;
    let model =
        ScriptedModel::start(script_of(vec![]), SocketAddr::from(([127, 0, 0, 1], 0))).await?;

    let mut config = Config {
        data_dir: dir.path().join("data"),
        temporal_cli: base.temporal_cli.clone(),
        ..Config::default()
    };
    config.http_addr = "127.0.0.1:0".into();
    config.temporal_port = free_port()?;
    config.temporal_ui_port = free_port()?;
    config.allow_local_sources = true;
    config.openai_base_url = Some(model.base_url());
    config.model = "bench".into();
    config.task_queue = "bench".into();
    config.submit_rate_capacity = 0;
    config.database_url = base.database_url.clone();
    if let Some(r) = redis_url {
        config.redis_url = Some(r);
        config.redis_prefix = format!("pf-bench-{}", std::process::id());
    }
    if let Some(addr) = &base.temporal_address {
        config.temporal_address = Some(addr.clone());
        config.task_queue = format!("bench-{}", std::process::id());
    }
    crate::bench::on_stack(&config, async |stores, client| {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (http, addr) = crate::stack::serve_http(
            &config,
            crate::stack::service(&config, &stores, client.clone()),
            crate::stack::stopped(&stop_rx),
        )
        .await?;
        let url = format!("http://{addr}");
        let repo_url = format!("file://{}", repo.display());
        let driver = async {
            let r = match drive_mode {
                Drive::Pipeline {
                    sequential,
                    concurrent,
                } => drive(&url, &repo_url, sequential, concurrent).await,
                Drive::Status { readers, seconds } => {
                    read_status(&url, &repo_url, readers, seconds).await
                }
            };
            let _ = stop_tx.send(true);
            r
        };
        let (worker, report) = tokio::join!(
            crate::stack::run_worker(&config, &stores, client, stop_rx.clone()),
            driver
        );
        let _ = http.await;
        worker?;
        report
    })
    .await
}

/// Runs `body` on the stores `config` names and a Temporal client: on a dev server of its
/// own when `config` names no Temporal cluster, stopped afterwards whatever `body` returned.
pub(crate) async fn on_stack(
    config: &Config,
    body: impl AsyncFnOnce(crate::stack::Stores, temporalio_client::Client) -> anyhow::Result<()>,
) -> anyhow::Result<ExitCode> {
    let dev = if config.embedded_temporal() {
        Some(crate::devserver::DevServer::start(config).await?)
    } else {
        None
    };
    let result = async {
        let stores = crate::stack::open_stores(config).await?;
        let client = crate::devserver::connect(config).await?;
        body(stores, client).await
    }
    .await;
    if let Some(dev) = dev {
        dev.stop().await;
    }
    result?;
    Ok(ExitCode::SUCCESS)
}

async fn submit_and_wait(
    http: &reqwest::Client,
    url: &str,
    repo_url: &str,
) -> anyhow::Result<(String, Duration)> {
    let t0 = Instant::now();
    let resp: Value = http
        .post(format!("{url}/api/tasks"))
        .json(&json!({"git_url": repo_url, "task_description": "benchmark task"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let id = resp["task_id"].as_str().context("no task_id")?.to_string();
    loop {
        let r: Value = http
            .get(format!("{url}/api/tasks/{id}"))
            .send()
            .await?
            .json()
            .await?;
        let status: TaskStatus = serde_json::from_value(r["status"].clone())?;
        if status.is_terminal() {
            if status != TaskStatus::Completed {
                bail!("task {id} ended {status}: {}", r["message"]);
            }
            return Ok((id, t0.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Per-stage durations of one task from its recorded history.
async fn stage_times(
    http: &reqwest::Client,
    url: &str,
    id: &str,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let page: Value = http
        .get(format!("{url}/api/tasks/{id}/events"))
        .send()
        .await?
        .json()
        .await?;
    let events: Vec<TaskEvent> = serde_json::from_value(page["events"].clone())?;
    let at = |pred: &dyn Fn(&TaskEvent) -> bool| events.iter().find(|e| pred(e)).map(|e| e.at);
    let st = |s: TaskStatus| move |e: &TaskEvent| e.status == Some(s);
    let pending = at(&st(TaskStatus::Pending));
    let queued = at(&st(TaskStatus::Queued));
    let dl = at(&st(TaskStatus::DownloadingCode));
    let stg = at(&st(TaskStatus::StagingCode));
    let run = at(&st(TaskStatus::RunningAgent));
    let agent_started =
        at(&|e: &TaskEvent| e.status.is_none() && e.message.starts_with("agent started"));
    let up = at(&st(TaskStatus::UploadingResults));
    let done = at(&st(TaskStatus::Completed));
    let d = |a: Option<chrono::DateTime<chrono::Utc>>, b: Option<chrono::DateTime<chrono::Utc>>| {
        match (a, b) {
            (Some(a), Some(b)) => (b - a).num_microseconds().unwrap_or(0) as f64 / 1000.0,
            _ => f64::NAN,
        }
    };
    Ok(vec![
        ("submit (stored -> workflow started)", d(pending, queued)),
        ("queue (started -> fetch begins)", d(queued, dl)),
        ("fetch_code", d(dl, stg)),
        ("stage_code", d(stg, run)),
        ("agent start (restore + spawn)", d(run, agent_started)),
        ("agent (one step)", d(agent_started, up)),
        ("publish_result", d(up, done)),
    ])
}

async fn drive(
    url: &str,
    repo_url: &str,
    sequential: usize,
    concurrent: usize,
) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    // Warm-up: first workflow, first agent spawn.
    submit_and_wait(&http, url, repo_url).await?;
    let mut latencies = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..sequential {
        let (id, d) = submit_and_wait(&http, url, repo_url).await?;
        latencies.push(ms(d));
        ids.push(id);
    }
    let t0 = Instant::now();
    let all =
        futures::future::join_all((0..concurrent).map(|_| submit_and_wait(&http, url, repo_url)))
            .await;
    let wall = t0.elapsed();
    let mut conc_lat = Vec::new();
    for r in all {
        conc_lat.push(ms(r?.1));
    }
    let (p50, p95, _) = stats(latencies);
    let (cp50, cp95, _) = stats(conc_lat);
    println!(
        "patchflow pipeline benchmark (embedded stack, instant scripted model, one-step task)"
    );
    println!(
        "sequential ({sequential} tasks): submit -> COMPLETED p50 {p50:.0} ms, p95 {p95:.0} ms"
    );
    println!(
        "concurrent ({concurrent} tasks at once): {:.2} tasks/s, submit -> COMPLETED p50 {cp50:.0} ms, p95 {cp95:.0} ms",
        concurrent as f64 / wall.as_secs_f64()
    );
    let mut per_stage: Vec<(&str, Vec<f64>)> = Vec::new();
    for id in &ids {
        for (i, (name, v)) in stage_times(&http, url, id).await?.into_iter().enumerate() {
            if per_stage.len() <= i {
                per_stage.push((name, Vec::new()));
            }
            per_stage[i].1.push(v);
        }
    }
    println!("stages of the sequential tasks (from recorded history, ms):");
    for (name, v) in per_stage {
        let (p50, p95, _) = stats(v);
        println!("  {name:<38} p50 {p50:>7.1}  p95 {p95:>7.1}");
    }
    Ok(())
}

/// Many readers polling one task's record; prints latency percentiles and reads/s.
async fn read_status(
    url: &str,
    repo_url: &str,
    readers: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(readers)
        .build()?;
    let (id, _) = submit_and_wait(&http, url, repo_url).await?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let target = format!("{url}/api/tasks/{id}");
    let workers: Vec<_> = (0..readers)
        .map(|_| {
            let (http, target) = (http.clone(), target.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t0 = Instant::now();
                    let r = http.get(&target).send().await?;
                    if !r.status().is_success() {
                        bail!("status read answered {}", r.status());
                    }
                    r.bytes().await?;
                    lat.push(ms(t0.elapsed()));
                }
                anyhow::Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await??);
    }
    let n = all.len();
    let (p50, p95, p99) = stats(all);
    println!(
        "  {n} reads, {:.0} reads/s, latency p50 {p50:.2} ms, p95 {p95:.2} ms, p99 {p99:.2} ms",
        n as f64 / seconds as f64
    );
    Ok(())
}
