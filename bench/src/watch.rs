//! `patchflow-bench watch`: many watchers on one task, through gRPC `WatchTask` and through
//! the SSE endpoint. Agent events are written the way `run_agent` writes them (stored, then
//! published on the live stream), straight into the embedded stack's stores, so the numbers
//! are the gateway's fan-out and not the agent's pace: events/s delivered, and the latency
//! from an event being written to each watcher receiving it (p50/p95).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use patchflow_core::{Config, TaskEvent, TaskEventKind, TaskId, TaskSource, TaskSpec, TaskStatus};
use patchflow_gateway::grpc::proto;

use patchflow::stack::Stores;

use crate::harness::{free_port, stats};

/// When each event was written, by seq (shared by the producer and the report).
type Sent = Arc<Mutex<HashMap<i64, Instant>>>;

#[derive(Debug, Clone, Copy)]
enum Door {
    Grpc,
    Sse,
}

pub async fn run(
    base: &Config,
    watchers: usize,
    burst: usize,
    paced: usize,
) -> anyhow::Result<ExitCode> {
    let dir = tempfile::tempdir()?;
    let mut config = Config::default();
    config.server.data_dir = dir.path().join("data");
    config.temporal.temporal_cli = base.temporal.temporal_cli.clone();
    config.store.database_url = base.store.database_url.clone();
    config.server.http_addr = "127.0.0.1:0".into();
    config.server.grpc_addr = "127.0.0.1:0".into();
    config.temporal.temporal_port = free_port()?;
    config.temporal.temporal_ui_port = free_port()?;
    config.server.submit_rate_capacity = 0;
    // Loopback only; this measures the fan-out, not the token check (`bench status` does).
    config.server.auth = patchflow_core::config::AuthMode::None;
    if let Some(addr) = &base.temporal.temporal_address {
        config.temporal.temporal_address = Some(addr.clone());
    }
    crate::harness::on_stack(&config, async |stores, client| {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let service = patchflow::stack::service(&config, &stores, client)?;
        let (http, http_addr) =
            patchflow::stack::serve_http(&config, service.clone(), patchflow::stack::stopped(&stop_rx))
                .await?;
        let (grpc, grpc_addr) =
            patchflow::stack::serve_grpc(&config, service, patchflow::stack::stopped(&stop_rx)).await?;
        println!(
            "watch fan-out: {watchers} watchers on one task; a burst of {burst} agent events, then {paced} paced events (one per 20 ms); task store {}",
            patchflow_core::config::redact_url(&config.database_url())
        );
        for door in [Door::Grpc, Door::Sse] {
            measure(&stores, door, http_addr, grpc_addr, watchers, burst, paced).await?;
        }
        let _ = stop_tx.send(true);
        let _ = http.await;
        let _ = grpc.await;
        anyhow::Ok(())
    })
    .await
}

/// Writes an event as an activity does: into the store, then onto the live stream.
async fn write_event(
    stores: &Stores,
    id: &TaskId,
    kind: TaskEventKind,
    status: Option<TaskStatus>,
    message: &str,
    sent: &Sent,
) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let seq = match status {
        Some(s) => match stores.tasks.set_status(id, s, message).await? {
            patchflow_platform::StatusChange::Applied { seq } => seq,
            other => bail!("status {s} not applied: {other:?}"),
        },
        None => stores.tasks.append_event(id, kind, message).await?,
    };
    if let Ok(mut m) = sent.lock() {
        m.insert(seq, t0);
    }
    let event = TaskEvent {
        seq,
        kind,
        status,
        message: message.to_string(),
        at: chrono::Utc::now(),
    };
    stores
        .hot
        .events
        .publish(id, &event)
        .await
        .context("publish a live event")?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    stores: &Stores,
    door: Door,
    http_addr: SocketAddr,
    grpc_addr: SocketAddr,
    watchers: usize,
    burst: usize,
    paced: usize,
) -> anyhow::Result<()> {
    let id = TaskId::generate();
    let spec = TaskSpec::new(
        TaskSource::Git {
            url: "https://example.com/bench.git".into(),
            git_ref: None,
            git_token: None,
        },
        "watch benchmark",
    );
    stores.tasks.insert(&id, &spec).await?;
    let sent: Sent = Arc::new(Mutex::new(HashMap::new()));
    write_event(
        stores,
        &id,
        TaskEventKind::Status,
        Some(TaskStatus::RunningAgent),
        "running",
        &sent,
    )
    .await?;
    // Every watcher connects and reads the history so far before the clock starts.
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(watchers);
    let mut tasks = Vec::new();
    for _ in 0..watchers {
        let ready = ready_tx.clone();
        let id = id.to_string();
        tasks.push(tokio::spawn(async move {
            match door {
                Door::Grpc => watch_grpc(grpc_addr, &id, ready).await,
                Door::Sse => watch_sse(http_addr, &id, ready).await,
            }
        }));
    }
    drop(ready_tx);
    for _ in 0..watchers {
        ready_rx
            .recv()
            .await
            .context("a watcher ended before it was ready")?;
    }
    let t0 = Instant::now();
    for i in 0..burst {
        let msg = format!("{{\"event\":\"tool_call\",\"step\":{i}}}");
        write_event(stores, &id, TaskEventKind::Agent, None, &msg, &sent).await?;
    }
    let written = t0.elapsed();
    for i in 0..paced {
        let msg = format!("{{\"event\":\"model_request\",\"step\":{i}}}");
        write_event(stores, &id, TaskEventKind::Agent, None, &msg, &sent).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    write_event(
        stores,
        &id,
        TaskEventKind::Status,
        Some(TaskStatus::Completed),
        "done",
        &sent,
    )
    .await?;
    let mut receipts = Vec::new();
    for t in tasks {
        receipts.push(t.await??);
    }
    let sent = sent.lock().map(|m| m.clone()).unwrap_or_default();
    let burst_seqs: Vec<i64> = {
        let mut v: Vec<i64> = sent.keys().copied().collect();
        v.sort_unstable();
        v
    };
    // The burst: from the first write to the last watcher's receipt of its last event.
    let burst_range = &burst_seqs[1..=burst];
    let last_burst = *burst_range.last().context("empty burst")?;
    let mut burst_done = t0;
    let mut paced_lat = Vec::new();
    let mut burst_lat = Vec::new();
    for r in &receipts {
        for (seq, at) in r {
            let Some(s) = sent.get(seq) else { continue };
            let lat = at.saturating_duration_since(*s).as_secs_f64() * 1000.0;
            if *seq <= last_burst && *seq >= burst_range[0] {
                burst_lat.push(lat);
                if *at > burst_done {
                    burst_done = *at;
                }
            } else if *seq > last_burst {
                paced_lat.push(lat);
            }
        }
        // Every event written here (the PENDING of the insert comes on top).
        let got = r.iter().filter(|(seq, _)| sent.contains_key(seq)).count();
        if got != sent.len() {
            bail!("a watcher received {got} events of {}", sent.len());
        }
    }
    let wall = burst_done.duration_since(t0).as_secs_f64();
    let deliveries = (burst * watchers) as f64;
    let (bp50, bp95, _) = stats(burst_lat);
    let (pp50, pp95, pp99) = stats(paced_lat);
    let name = match door {
        Door::Grpc => "gRPC WatchTask",
        Door::Sse => "SSE /events",
    };
    println!("{name}:");
    println!(
        "  burst: {burst} events written in {:.0} ms ({:.0} events/s into the store); delivered to all {watchers} watchers in {:.0} ms: {:.0} events/s per watcher, {:.0} deliveries/s in all; latency p50 {bp50:.1} ms, p95 {bp95:.1} ms",
        written.as_secs_f64() * 1000.0,
        burst as f64 / written.as_secs_f64(),
        wall * 1000.0,
        burst as f64 / wall,
        deliveries / wall
    );
    println!(
        "  paced (one event per 20 ms): event written -> watcher latency p50 {pp50:.1} ms, p95 {pp95:.1} ms, p99 {pp99:.1} ms"
    );
    Ok(())
}

/// One gRPC watcher: the receipt time of each event, by seq.
async fn watch_grpc(
    addr: SocketAddr,
    id: &str,
    ready: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<Vec<(i64, Instant)>> {
    use proto::watch_task_response::Item;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await
        .context("cannot reach the gRPC API")?;
    let mut client = proto::tasks_client::TasksClient::new(channel);
    let mut stream = client
        .watch_task(proto::WatchTaskRequest {
            task_id: id.to_string(),
            after_seq: 0,
        })
        .await?
        .into_inner();
    let mut got = Vec::new();
    let mut ready = Some(ready);
    while let Some(msg) = stream.message().await? {
        match msg.item {
            Some(Item::Event(e)) => {
                got.push((e.seq, Instant::now()));
                if e.status.as_deref() == Some("RUNNING_AGENT")
                    && let Some(r) = ready.take()
                {
                    let _ = r.send(()).await;
                }
            }
            Some(Item::Final(_)) => return Ok(got),
            None => {}
        }
    }
    bail!("the watch ended without the final record")
}

/// One SSE watcher (`Accept: text/event-stream`).
async fn watch_sse(
    addr: SocketAddr,
    id: &str,
    ready: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<Vec<(i64, Instant)>> {
    use eventsource_stream::Eventsource;
    let resp = reqwest::Client::new()
        .get(format!("http://{addr}/api/tasks/{id}/events"))
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .send()
        .await?
        .error_for_status()?;
    let mut events = resp.bytes_stream().eventsource();
    let mut got = Vec::new();
    let mut ready = Some(ready);
    while let Some(item) = events.next().await {
        let item = item.context("SSE stream")?;
        let Ok(ev) = serde_json::from_str::<TaskEvent>(&item.data) else {
            continue;
        };
        got.push((ev.seq, Instant::now()));
        match ev.status {
            Some(TaskStatus::RunningAgent) => {
                if let Some(r) = ready.take() {
                    let _ = r.send(()).await;
                }
            }
            Some(s) if s.is_terminal() => return Ok(got),
            _ => {}
        }
    }
    bail!("the SSE stream ended before the task did")
}
