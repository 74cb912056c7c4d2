//! `patchflow-bench kafka`: the Kafka trigger and results producer, measured.
//!
//! Starts a Temporal dev server and (unless `--brokers` is given) a Tansu broker on free
//! ports, with a task store in a temporary directory and no worker: what is measured is
//! message -> workflow started, not the tasks themselves.
//!
//! - throughput: N messages produced at once, consumed by 1 and by 2 trigger consumers of
//!   one group (in this process, each with its own rdkafka consumer): messages/s from the
//!   first produce to the last start acknowledged by Temporal;
//! - latency: messages produced at a steady pace, produce timestamp -> start acknowledged,
//!   p50/p95;
//! - the DLQ path: N malformed messages, wall time per message until dead-lettered;
//! - results: `Producer::send` of a result-sized message, waiting for the delivery report
//!   (what `publish_result` adds to a task), p50/p95.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use patchflow_core::Config;
use patchflow_gateway::kafka::{Trigger, TriggerEvent};
use patchflow_platform::bus::{KafkaSettings, Producer, TASK_SCHEMA};
use serde_json::json;

use crate::harness::free_port;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn tansu_bin() -> std::path::PathBuf {
    let cached = std::env::var_os("HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_default()
        .join(".cache/patchflow/tansu/bin/tansu");
    if cached.exists() {
        cached
    } else {
        "tansu".into()
    }
}

/// A broker child process, killed when this is dropped (`kill_on_drop`).
struct Broker {
    _child: tokio::process::Child,
}

async fn start_tansu() -> anyhow::Result<(Broker, String)> {
    let port = free_port()?;
    let url = format!("tcp://127.0.0.1:{port}");
    let child = tokio::process::Command::new(tansu_bin())
        .args([
            "broker",
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "memory://tansu/",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start tansu (scripts/test installs it; or pass --brokers)")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("tansu did not start on port {port}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((Broker { _child: child }, format!("127.0.0.1:{port}")))
}

fn task_message(repo: &str, n: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schema": TASK_SCHEMA,
        "git_url": repo,
        "task_description": format!("benchmark task {n}"),
    }))
    .unwrap_or_default()
}

pub async fn run(
    base: &Config,
    brokers: Option<String>,
    messages: usize,
    bad: usize,
) -> anyhow::Result<ExitCode> {
    let dir = tempfile::tempdir()?;
    let (_broker, brokers) = match brokers.or_else(|| base.kafka.kafka_brokers.clone()) {
        Some(b) => (None, b),
        None => {
            let (b, addr) = start_tansu().await?;
            (Some(b), addr)
        }
    };
    let mut config = Config::default();
    config.server.data_dir = dir.path().join("data");
    config.temporal.temporal_cli = base.temporal.temporal_cli.clone();
    config.temporal.temporal_port = free_port()?;
    config.temporal.temporal_ui_port = free_port()?;
    config.server.allow_local_sources = true;
    config.temporal.task_queue = format!("bench-kafka-{}", std::process::id());
    config.server.submit_rate_capacity = 0;
    if let Some(addr) = &base.temporal.temporal_address {
        config.temporal.temporal_address = Some(addr.clone());
    }
    crate::harness::on_stack(&config, async |stores, client| {
        let service = patchflow::stack::service(&config, &stores, client)?;
        let repo = "https://example.com/bench/repo.git";
        let run_id = std::process::id();
        let settings = |round: &str| KafkaSettings {
            brokers: brokers.clone(),
            tasks_topic: format!("bench.{run_id}.{round}.tasks"),
            results_topic: format!("bench.{run_id}.results"),
            dlq_topic: format!("bench.{run_id}.{round}.dlq"),
            group: format!("bench-{run_id}-{round}"),
            dlq: true,
            auto_create: true,
            partitions: 3,
            properties: Vec::new(),
            tenant: None,
        };
        println!(
            "patchflow Kafka benchmark (broker {brokers}, 3 partitions, Temporal dev server, SQLite task store, no worker)"
        );
        // Throughput with 1 and 2 consumers: all messages produced at once.
        for consumers in [1usize, 2] {
            let s = settings(&format!("t{consumers}"));
            let (rate, mut lat) =
                round(&service, &s, consumers, messages, 0, repo, &format!("c{consumers}")).await?;
            println!(
                "{consumers} consumer(s): {messages} messages -> started workflows at {rate:.1}/s; produce -> started p50 {:.0} ms, p95 {:.0} ms (queued behind the burst)",
                pct(&mut lat, 0.5),
                pct(&mut lat, 0.95)
            );
        }
        // Latency at a steady pace (20 messages/s), one consumer.
        let s = settings("paced");
        let (_, mut lat) = round(&service, &s, 1, 60, 50, repo, "paced").await?;
        println!(
            "paced 20 msg/s, 1 consumer: produce -> workflow started p50 {:.1} ms, p95 {:.1} ms",
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.95)
        );
        // The DLQ path.
        let s = settings("dlq");
        let trigger = Trigger::new(service.clone(), s.clone()).await?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let producer = Producer::new(&s, Duration::from_secs(30))?;
        let t0 = Instant::now();
        let sends = (0..bad).map(|i| {
            let producer = producer.clone();
            let topic = s.tasks_topic.clone();
            async move {
                producer
                    .send(&topic, format!("bad-{i}").as_bytes(), b"{not json", &[])
                    .await
            }
        });
        for r in futures::future::join_all(sends).await {
            r?;
        }
        let handle = tokio::spawn(trigger.with_events(tx).run(stop_rx));
        let mut seen = 0;
        while seen < bad {
            match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
                Ok(Some(TriggerEvent::DeadLettered { .. })) => seen += 1,
                Ok(Some(_)) => {}
                _ => bail!("only {seen} of {bad} bad messages reached the DLQ"),
            }
        }
        let dlq_total = t0.elapsed();
        let _ = stop_tx.send(true);
        let _ = handle.await;
        println!(
            "DLQ path: {bad} malformed messages dead-lettered in {:.0} ms ({:.2} ms each, 3 partitions)",
            dlq_total.as_secs_f64() * 1000.0,
            dlq_total.as_secs_f64() * 1000.0 / bad.max(1) as f64
        );
        // Result messages, one at a time as publish_result sends them.
        let s = settings("results");
        patchflow_platform::bus::ensure_topics(&s, &[s.results_topic.as_str()]).await?;
        let producer = Producer::new(&s, Duration::from_secs(30))?;
        let payload = vec![b'x'; 1200];
        let mut lat = Vec::new();
        for i in 0..200 {
            let t = Instant::now();
            producer
                .send(&s.results_topic, format!("tsk_{i}").as_bytes(), &payload, &[])
                .await?;
            lat.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        println!(
            "result message produce, waiting for the delivery report (acks=all, idempotent): p50 {:.2} ms, p95 {:.2} ms",
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.95)
        );
        anyhow::Ok(())
    })
    .await
}

/// Produces `n` task messages (`pace_ms` apart, 0: all at once) and runs `consumers`
/// triggers until every one is started; returns messages/s and per-message latencies (ms).
async fn round(
    service: &patchflow_gateway::TaskService,
    s: &KafkaSettings,
    consumers: usize,
    n: usize,
    pace_ms: u64,
    repo: &str,
    tag: &str,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut handles = Vec::new();
    for _ in 0..consumers {
        let t = Trigger::new(service.clone(), s.clone())
            .await?
            .with_events(tx.clone());
        handles.push(tokio::spawn(t.run(stop_rx.clone())));
    }
    // Let the group settle so the clock measures consumption, not the join.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let producer = Producer::new(s, Duration::from_secs(30))?;
    let t0 = Instant::now();
    let topic = s.tasks_topic.clone();
    let tag = tag.to_string();
    let repo = repo.to_string();
    let send_all = tokio::spawn(async move {
        if pace_ms == 0 {
            let sends = (0..n).map(|i| {
                let (producer, topic) = (producer.clone(), topic.clone());
                let key = format!("{tag}-{i}");
                let body = task_message(&repo, i);
                async move { producer.send(&topic, key.as_bytes(), &body, &[]).await }
            });
            for r in futures::future::join_all(sends).await {
                r?;
            }
        } else {
            for i in 0..n {
                let key = format!("{tag}-{i}");
                producer
                    .send(&topic, key.as_bytes(), &task_message(&repo, i), &[])
                    .await?;
                tokio::time::sleep(Duration::from_millis(pace_ms)).await;
            }
        }
        anyhow::Ok(())
    });
    let mut latencies = Vec::new();
    while latencies.len() < n {
        match tokio::time::timeout(Duration::from_secs(120), rx.recv()).await {
            Ok(Some(TriggerEvent::Started { produced_ms, .. })) => {
                let now = chrono::Utc::now().timestamp_millis();
                latencies.push(produced_ms.map(|p| (now - p) as f64).unwrap_or(0.0));
            }
            Ok(Some(TriggerEvent::DeadLettered { kind, .. })) => {
                bail!("a benchmark message was dead-lettered ({})", kind.as_str())
            }
            _ => bail!("only {} of {n} messages started", latencies.len()),
        }
    }
    let elapsed = t0.elapsed();
    send_all.await??;
    let _ = stop_tx.send(true);
    for h in handles {
        let _ = h.await;
    }
    Ok((n as f64 / elapsed.as_secs_f64(), latencies))
}
