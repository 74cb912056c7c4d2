//! `patchflow-bench pipeline` and `patchflow-bench status`: an embedded stack (dev server,
//! worker, gateway, instant scripted model) running one-step tasks. The pipeline: N tasks
//! submit-to-COMPLETED p50/p95, tasks/s, and each stage timed from the task's recorded
//! history; status: many concurrent readers of one task's record.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patchflow_core::{Config, TaskEvent, TaskStatus};
use patchflow_scripted_model::{Script, ScriptedModel};
use serde_json::{Value, json};

use crate::harness::{DEMO_SCRIPT, bench_repo, free_port, ms, on_stack, stats};

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
pub enum Drive {
    /// `sequential` demo-sized tasks one at a time (the idle overheads), then `tasks` of
    /// them with `concurrency` in flight (throughput, queue wait, steps).
    Pipeline {
        sequential: usize,
        tasks: usize,
        concurrency: usize,
    },
    Status {
        readers: usize,
        seconds: u64,
    },
    /// Tasks with a setup (a virtualenv and a package from PyPI): the wall time of
    /// PREPARING_ENVIRONMENT without the cache and on a cache hit.
    Environment {
        runs: usize,
    },
    /// Follow-ups (message -> the follow-up's first model request, message -> turn
    /// COMPLETED) and best-of-N wall time for 1, 2 and 4 candidates.
    Conversation {
        runs: usize,
    },
}

/// Runs `drive` against an embedded stack (dev server, worker, gateway, instant model),
/// on `base`'s task store if it names one, with Redis when `redis_url` is given.
/// `auth`: `tokens` (every request sends the bootstrap admin token, checked against the
/// task store) or `none`, to measure what the check costs.
pub async fn with_stack(
    base: &Config,
    redis_url: Option<String>,
    drive_mode: Drive,
    auth: patchflow_core::config::AuthMode,
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
    // One `finish` per turn: a follow-up asks for the turn after the last one it carries.
    let mut script = Script::calls_then_finish(vec![]);
    if let Drive::Conversation { runs } = drive_mode {
        let finish = script.turns[0].clone();
        script.turns = vec![finish; runs + 2];
    }
    if let Drive::Pipeline { .. } = drive_mode {
        // The demo-sized task: read, search, edit, run the tests in the shell, finish.
        script = Script::from_json(DEMO_SCRIPT)?;
    }
    let model = ScriptedModel::start(script, SocketAddr::from(([127, 0, 0, 1], 0))).await?;

    let mut config = Config::default();
    config.server.data_dir = dir.path().join("data");
    config.temporal.temporal_cli = base.temporal.temporal_cli.clone();
    config.server.http_addr = "127.0.0.1:0".into();
    config.temporal.temporal_port = free_port()?;
    config.temporal.temporal_ui_port = free_port()?;
    config.server.allow_local_sources = true;
    config.llm.openai_base_url = Some(model.base_url());
    config.llm.model = "bench".into();
    config.temporal.task_queue = "bench".into();
    config.server.submit_rate_capacity = 0;
    config.server.auth = auth;
    config.store.database_url = base.store.database_url.clone();
    config.store.object_store_url = base.store.object_store_url.clone();
    config.temporal.worker_max_agents = base.temporal.worker_max_agents;
    config.temporal.worker_tuner = base.temporal.worker_tuner;
    if let Some(r) = redis_url.or_else(|| base.store.redis_url.clone()) {
        config.store.redis_url = Some(r);
        config.store.redis_prefix = format!("pf-bench-{}", std::process::id());
    }
    if let Some(addr) = &base.temporal.temporal_address {
        config.temporal.temporal_address = Some(addr.clone());
        config.temporal.task_queue = format!("bench-{}", std::process::id());
    }
    if let Drive::Pipeline { .. } = drive_mode {
        println!(
            "stack: task store {}, objects {}, cache {}, Temporal {}",
            patchflow_core::config::redact_url(&config.database_url()),
            patchflow_core::config::redact_url(&config.object_store_url()),
            config
                .store
                .redis_url
                .as_deref()
                .map_or("in-process".into(), patchflow_core::config::redact_url),
            config
                .temporal
                .temporal_address
                .as_deref()
                .unwrap_or("the embedded dev server")
        );
    }
    on_stack(&config, async |stores, client| {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let service = patchflow::stack::service(&config, &stores, client.clone())?;
        let token = match service
            .bootstrap_admin(&config.server.data_dir, None)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
        {
            Some(path) => Some(std::fs::read_to_string(path)?.trim().to_string()),
            None => None,
        };
        let (http, addr) =
            patchflow::stack::serve_http(&config, service, patchflow::stack::stopped(&stop_rx))
                .await?;
        let url = format!("http://{addr}");
        let repo_url = format!("file://{}", repo.display());
        let driver = async {
            let r = match drive_mode {
                Drive::Pipeline {
                    sequential,
                    tasks,
                    concurrency,
                } => {
                    let load = Load {
                        sequential,
                        tasks,
                        concurrency,
                    };
                    drive(&url, token.as_deref(), &repo_url, &model, load).await
                }
                Drive::Status { readers, seconds } => {
                    read_status(&url, token.as_deref(), &repo_url, readers, seconds).await
                }
                Drive::Environment { runs } => {
                    environment(&url, token.as_deref(), &repo_url, runs).await
                }
                Drive::Conversation { runs } => {
                    conversation(&url, token.as_deref(), &repo_url, &model, runs).await
                }
            };
            let _ = stop_tx.send(true);
            r
        };
        // A worker that cannot start (a binary missing beside the bench, say) ends the
        // bench with its error instead of leaving the driver waiting for it forever.
        let worker = patchflow::stack::run_worker(&config, &stores, client, stop_rx.clone());
        tokio::pin!(worker);
        tokio::pin!(driver);
        let report = tokio::select! {
            report = &mut driver => {
                (&mut worker).await?;
                report
            }
            failed = &mut worker => {
                failed?;
                bail!("the worker stopped before the benchmark ended");
            }
        };
        let _ = http.await;
        report
    })
    .await
}

async fn submit_and_wait(
    http: &reqwest::Client,
    url: &str,
    repo_url: &str,
) -> anyhow::Result<(String, Duration)> {
    submit_polling(http, url, repo_url, Duration::from_millis(10)).await
}

/// Submits the benchmark task and polls its record every `poll` until it ends.
async fn submit_polling(
    http: &reqwest::Client,
    url: &str,
    repo_url: &str,
    poll: Duration,
) -> anyhow::Result<(String, Duration)> {
    let body = json!({"git_url": repo_url, "task_description": "benchmark task"});
    submit_body_polling(http, url, &body, poll).await
}

async fn submit_body_and_wait(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
) -> anyhow::Result<(String, Duration)> {
    submit_body_polling(http, url, body, Duration::from_millis(10)).await
}

/// Submits `body` and polls the task's record every `poll` until it ends: its id and the
/// time from submit to COMPLETED.
async fn submit_body_polling(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
    poll: Duration,
) -> anyhow::Result<(String, Duration)> {
    let t0 = Instant::now();
    let resp: Value = http
        .post(format!("{url}/api/tasks"))
        .json(body)
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
        tokio::time::sleep(poll).await;
    }
}

/// The recorded events of a task.
async fn events_of(http: &reqwest::Client, url: &str, id: &str) -> anyhow::Result<Vec<TaskEvent>> {
    let page: Value = http
        .get(format!("{url}/api/tasks/{id}/events"))
        .send()
        .await?
        .json()
        .await?;
    Ok(serde_json::from_value(page["events"].clone())?)
}

/// Milliseconds from the first event matching `from` to the first matching `to`.
fn between(
    events: &[TaskEvent],
    from: impl Fn(&TaskEvent) -> bool,
    to: impl Fn(&TaskEvent) -> bool,
) -> f64 {
    let at = |pred: &dyn Fn(&TaskEvent) -> bool| events.iter().find(|e| pred(e)).map(|e| e.at);
    match (at(&from), at(&to)) {
        (Some(a), Some(b)) => (b - a).num_microseconds().unwrap_or(0) as f64 / 1000.0,
        _ => f64::NAN,
    }
}

/// PREPARING_ENVIRONMENT's wall time for a Python setup (a virtualenv and `humanize` from
/// PyPI): `runs` tasks with `cache: false`, then `runs` cache hits after one priming miss.
async fn environment(
    url: &str,
    token: Option<&str>,
    repo_url: &str,
    runs: usize,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .default_headers(auth_headers(token)?)
        .build()?;
    let setup = |cache: bool| {
        json!({"git_url": repo_url, "task_description": "benchmark task", "setup": {
            "setup_script": "python3 -m venv .venv\n.venv/bin/pip install -q humanize==4.9.0",
            "maintenance_script": "test -x .venv/bin/python",
            "cache": cache,
        }})
    };
    let prepare = |e: &TaskEvent| e.status == Some(TaskStatus::PreparingEnvironment);
    let running = |e: &TaskEvent| e.status == Some(TaskStatus::RunningAgent);
    let measure = async |body: Value, n: usize| -> anyhow::Result<Vec<f64>> {
        let mut out = Vec::new();
        for _ in 0..n {
            let (id, _) = submit_body_and_wait(&http, url, &body).await?;
            out.push(between(
                &events_of(&http, url, &id).await?,
                prepare,
                running,
            ));
        }
        Ok(out)
    };
    let cold = measure(setup(false), runs).await?;
    measure(setup(true), 1).await?;
    let hit = measure(setup(true), runs).await?;
    println!("PREPARING_ENVIRONMENT (venv + humanize from PyPI, {runs} runs each):");
    let (p50, p95, _) = stats(cold);
    println!("  setup run (cache: false)  p50 {p50:>7.0} ms  p95 {p95:>7.0} ms");
    let (p50, p95, _) = stats(hit);
    println!("  cache hit + maintenance   p50 {p50:>7.0} ms  p95 {p95:>7.0} ms");
    Ok(())
}

/// Per-stage durations of one task from its recorded history.
async fn stage_times(
    http: &reqwest::Client,
    url: &str,
    id: &str,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    let events = events_of(http, url, id).await?;
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
        ("agent (its steps)", d(agent_started, up)),
        ("publish_result", d(up, done)),
    ])
}

/// Default headers carrying `token`, if any.
fn auth_headers(token: Option<&str>) -> anyhow::Result<reqwest::header::HeaderMap> {
    let mut h = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        h.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {t}").parse()?,
        );
    }
    Ok(h)
}

/// How [`drive`] loads the stack.
struct Load {
    sequential: usize,
    tasks: usize,
    concurrency: usize,
}

async fn drive(
    url: &str,
    token: Option<&str>,
    repo_url: &str,
    model: &ScriptedModel,
    load: Load,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(load.concurrency.max(8))
        .default_headers(auth_headers(token)?)
        .build()?;
    // Warm-up: the first workflow, the first agent spawn, the tools' compiled code.
    for _ in 0..2 {
        submit_and_wait(&http, url, repo_url).await?;
    }
    println!(
        "patchflow pipeline benchmark: the demo-sized task (5 model requests: read, search, \
         edit, a sandboxed `python3 -m unittest`, finish), instant scripted model"
    );

    // Idle: one task at a time.
    let (mut to_first, mut end_to_done, mut total) = (Vec::new(), Vec::new(), Vec::new());
    let mut idle_ids = Vec::new();
    for _ in 0..load.sequential {
        let before = model.observed().arrivals.len();
        let t0 = Instant::now();
        let (id, d) = submit_and_wait(&http, url, repo_url).await?;
        total.push(ms(d));
        let seen = model.observed();
        let first = seen.arrivals.get(before).context("no model request")?;
        to_first.push(ms(first.duration_since(t0)));
        let events = events_of(&http, url, &id).await?;
        end_to_done.push(between(
            &events,
            |e| {
                e.status.is_none() && e.message.contains(" after ") && e.message.ends_with(" steps")
            },
            |e| e.status == Some(TaskStatus::Completed),
        ));
        idle_ids.push(id);
    }
    let row = |name: &str, v: Vec<f64>| {
        let (p50, p95, _) = stats(v);
        println!("  {name:<40} p50 {p50:>8.1} ms  p95 {p95:>8.1} ms");
    };
    println!("idle ({} tasks, one at a time):", load.sequential);
    row("submit -> the agent's first model request", to_first);
    row("the agent's end -> COMPLETED", end_to_done);
    row("submit -> COMPLETED", total);
    println!("  steps, idle (from each task's recorded history):");
    step_rows(&http, url, &idle_ids).await?;

    // Under load: `concurrency` submitters, each submitting its next task when the last
    // one ended, until `tasks` have run.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t0 = Instant::now();
    let runs = futures::future::join_all((0..load.concurrency.max(1)).map(|_| async {
        let mut mine = Vec::new();
        while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < load.tasks {
            mine.push(submit_polling(&http, url, repo_url, Duration::from_millis(50)).await?);
        }
        anyhow::Ok(mine)
    }))
    .await;
    let wall = t0.elapsed();
    let mut done = Vec::new();
    for r in runs {
        done.extend(r?);
    }
    let (lp50, lp95, _) = stats(done.iter().map(|(_, d)| ms(*d)).collect());
    println!(
        "load ({} tasks, {} in flight): {:.2} tasks/s; submit -> COMPLETED p50 {lp50:.0} ms, \
         p95 {lp95:.0} ms (polled every 50 ms)",
        done.len(),
        load.concurrency,
        done.len() as f64 / wall.as_secs_f64()
    );
    println!("  steps under load (from each task's recorded history):");
    let ids: Vec<String> = done.into_iter().map(|(id, _)| id).collect();
    step_rows(&http, url, &ids).await
}

/// One row per step: its p50 and p95 over the tasks `ids`.
async fn step_rows(http: &reqwest::Client, url: &str, ids: &[String]) -> anyhow::Result<()> {
    let mut per_stage: Vec<(&str, Vec<f64>)> = Vec::new();
    for id in ids {
        for (i, (name, v)) in stage_times(http, url, id).await?.into_iter().enumerate() {
            if per_stage.len() <= i {
                per_stage.push((name, Vec::new()));
            }
            per_stage[i].1.push(v);
        }
    }
    for (name, v) in per_stage {
        let (p50, p95, _) = stats(v);
        println!("  {name:<40} p50 {p50:>8.1} ms  p95 {p95:>8.1} ms");
    }
    Ok(())
}

/// Follow-ups on one task, one after another: message -> the follow-up's first model
/// request and message -> COMPLETED; then best-of-N tasks (1, 2 and 4 candidates of a
/// one-step task): submit -> COMPLETED.
async fn conversation(
    url: &str,
    token: Option<&str>,
    repo_url: &str,
    model: &ScriptedModel,
    runs: usize,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .default_headers(auth_headers(token)?)
        .build()?;
    let (id, _) = submit_and_wait(&http, url, repo_url).await?;
    let (mut to_request, mut to_done) = (Vec::new(), Vec::new());
    for n in 0..runs {
        let before = model.observed().arrivals.len();
        let t0 = Instant::now();
        let answer: Value = http
            .post(format!("{url}/api/tasks/{id}/messages"))
            .json(&json!({"message": format!("follow-up {n}")}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let turn = answer["turn"].as_u64().context("no turn")?;
        loop {
            let r: Value = http
                .get(format!("{url}/api/tasks/{id}"))
                .send()
                .await?
                .json()
                .await?;
            let ended = r["turns"].as_array().is_some_and(|t| {
                t.iter()
                    .any(|t| t["turn"] == turn && t["status"] == "COMPLETED")
            });
            if ended && r["status"] == "COMPLETED" {
                break;
            }
            if r["status"] == "FAILED" {
                bail!("turn {turn} failed: {}", r["message"]);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        to_done.push(ms(t0.elapsed()));
        let seen = model.observed();
        let first = seen.arrivals.get(before).context("no model request")?;
        to_request.push(ms(first.duration_since(t0)));
    }
    let (p50, p95, _) = stats(to_request);
    let (dp50, dp95, _) = stats(to_done);
    println!("follow-ups ({runs} turns of one task, its workflow open):");
    println!("  message -> the turn's first model request  p50 {p50:>7.1} ms  p95 {p95:>7.1} ms");
    println!("  message -> turn COMPLETED                  p50 {dp50:>7.1} ms  p95 {dp95:>7.1} ms");
    println!(
        "best-of-N (one-step task, {runs} tasks each, one after another): submit -> COMPLETED"
    );
    let mut one = None;
    for n in [1u32, 2, 4] {
        let mut lat = Vec::new();
        for _ in 0..runs {
            // Every candidate runs to its end (no auto_select): the race's whole cost.
            let mut body = json!({"git_url": repo_url, "task_description": "benchmark task"});
            if n > 1 {
                body["candidates"] = json!(n);
            }
            lat.push(ms(submit_body_and_wait(&http, url, &body).await?.1));
        }
        let (p50, p95, _) = stats(lat);
        let base = *one.get_or_insert(p50);
        println!(
            "  {n} candidate(s): p50 {p50:>7.1} ms  p95 {p95:>7.1} ms  ({:.2}x one)",
            p50 / base
        );
    }
    Ok(())
}

/// Many readers polling one task's record; prints latency percentiles and reads/s.
async fn read_status(
    url: &str,
    token: Option<&str>,
    repo_url: &str,
    readers: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(readers)
        .default_headers(auth_headers(token)?)
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
