//! Kafka: task messages start tasks exactly once, each finished task publishes one result
//! message, malformed messages go to the DLQ without blocking the good ones, a Temporal
//! outage leaves messages uncommitted until it ends, and batches run under a concurrency
//! limit and export SWE-bench predictions. Against a real broker (Tansu) and a real stack.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use patchflow_core::{TaskId, TaskStatus};
use patchflow_scripted_model::{Script, ScriptedCall, Turn};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde_json::{Value, json};

use crate::support::{KafkaBroker, Mode, Stack, demo_git_repo, demo_script};

const TASKS: &str = "patchflow.tasks";
pub(crate) const RESULTS: &str = "patchflow.results";
const DLQ: &str = "patchflow.tasks.dlq";

fn kafka_env(b: &KafkaBroker) -> Vec<(&'static str, String)> {
    vec![
        ("PATCHFLOW_KAFKA_BROKERS", b.brokers.clone()),
        ("PATCHFLOW_SUBMIT_RATE_CAPACITY", "0".into()),
    ]
}

fn env_refs<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A model that finishes at once (optionally slowly).
fn finish_script(delay_ms: u64) -> Script {
    Script {
        turns: vec![Turn {
            tool_calls: vec![ScriptedCall {
                name: "finish".into(),
                arguments: json!({"summary": "nothing to change"}),
            }],
            ..Turn::default()
        }],
        delay_ms,
        ..Script::default()
    }
}

fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("message.timeout.ms", "20000")
        .create()
        .unwrap()
}

/// Produces one message; returns its offset.
async fn produce(
    p: &FutureProducer,
    topic: &str,
    partition: i32,
    key: Option<&str>,
    payload: Option<&[u8]>,
) -> i64 {
    let mut r: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).partition(partition);
    if let Some(k) = key {
        r = r.key(k);
    }
    if let Some(b) = payload {
        r = r.payload(b);
    }
    p.send(r, Duration::from_secs(20)).await.unwrap().offset
}

fn task_message(repo: &Path, description: &str, batch: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schema": "patchflow.task.v1",
        "git_url": format!("file://{}", repo.display()),
        "task_description": description,
        "batch_id": batch,
    }))
    .unwrap()
}

#[derive(Debug, Clone)]
pub(crate) struct Got {
    pub(crate) key: String,
    pub(crate) payload: Vec<u8>,
    headers: HashMap<String, String>,
}

/// Reads `topic` from the start until `done` says so (or panics after `timeout`).
pub(crate) async fn consume_until(
    brokers: &str,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Got]) -> bool,
) -> Vec<Got> {
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("test-{}", TaskId::generate()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    while !done(&got) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{topic}: gave up after {} messages: {got:?}",
            got.len()
        );
        if let Ok(Ok(m)) = tokio::time::timeout(left.min(Duration::from_secs(1)), c.recv()).await {
            let mut headers = HashMap::new();
            if let Some(h) = m.headers() {
                for hd in h.iter() {
                    headers.insert(
                        hd.key.to_string(),
                        String::from_utf8_lossy(hd.value.unwrap_or_default()).to_string(),
                    );
                }
            }
            got.push(Got {
                key: String::from_utf8_lossy(m.key().unwrap_or_default()).to_string(),
                payload: m.payload().unwrap_or_default().to_vec(),
                headers,
            });
        }
    }
    got
}

/// The group's committed offset of each partition (-1: nothing committed).
async fn committed(brokers: &str, group: &str, topic: &str, partitions: i32) -> Vec<i64> {
    let (brokers, group, topic) = (brokers.to_string(), group.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&topic, p);
        }
        let got = c.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
        (0..partitions)
            .map(
                |p| match got.find_partition(&topic, p).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => o,
                    _ => -1,
                },
            )
            .collect()
    })
    .await
    .unwrap()
}

async fn wait_committed(brokers: &str, topic: &str, partition: i32, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let c = committed(brokers, "patchflow", topic, 3).await;
        if c[partition as usize] == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "partition {partition} committed {c:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn workflow_count(stack: &Stack, query: &str) -> String {
    let out = stack.temporal_cli(&["workflow", "count", "--query", query]);
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn task_id(key: &str) -> String {
    TaskId::from_idempotency_key("default", key).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_start_tasks_once_publish_one_result_each_and_bad_ones_go_to_the_dlq() {
    let dir = tempfile::tempdir().unwrap();
    let broker = KafkaBroker::start(dir.path());
    let env = kafka_env(&broker);
    let stack = Stack::start(Mode::Up, finish_script(0), &env_refs(&env)).await;
    let repo = demo_git_repo(stack.dir.path());
    let p = producer(&broker.brokers);

    // Partition 0: every kind of malformed message, then a good one behind them.
    let good = task_message(&repo, "fix it", "kb1");
    let big = format!(
        r#"{{"schema":"patchflow.task.v1","git_url":"https://x/r.git","task_description":"{}"}}"#,
        "a".repeat(600 * 1024)
    );
    let bad: Vec<(&str, Option<Vec<u8>>, &str)> = vec![
        ("empty", None, "no payload"),
        ("bad_json", Some(b"{\"schema\": oops".to_vec()), "not JSON"),
        (
            "unknown_schema",
            Some(
                br#"{"schema":"patchflow.task.v0","git_url":"https://x/r.git","task_description":"t"}"#
                    .to_vec(),
            ),
            "patchflow.task.v0",
        ),
        (
            "bad_fields",
            Some(br#"{"schema":"patchflow.task.v1","task_description":"t"}"#.to_vec()),
            "a source is required",
        ),
        ("oversized", Some(big.into_bytes()), "more than the"),
        (
            "invalid",
            Some(
                br#"{"schema":"patchflow.task.v1","git_url":"ftp://x/r","task_description":"t"}"#
                    .to_vec(),
            ),
            "not a supported repository URL",
        ),
    ];
    let mut bad_offsets = HashMap::new();
    for (kind, payload, _) in &bad {
        let o = produce(
            &p,
            TASKS,
            0,
            Some(&format!("bad-{kind}")),
            payload.as_deref(),
        )
        .await;
        bad_offsets.insert(kind.to_string(), o);
    }
    produce(&p, TASKS, 0, Some("k1"), Some(&good)).await;
    // Other partitions: good ones, and k1 again (a redelivery by another route).
    produce(&p, TASKS, 1, Some("k2"), Some(&good)).await;
    produce(&p, TASKS, 1, Some("k3"), Some(&good)).await;
    produce(&p, TASKS, 2, Some("k1"), Some(&good)).await;
    produce(&p, TASKS, 2, Some("k4"), Some(&good)).await;

    let keys: BTreeSet<String> = ["k1", "k2", "k3", "k4"]
        .iter()
        .map(|k| task_id(k))
        .collect();
    let results = consume_until(&broker.brokers, RESULTS, Duration::from_secs(180), |got| {
        got.iter().map(|g| g.key.clone()).collect::<BTreeSet<_>>() == keys
    })
    .await;
    for k in ["k1", "k2", "k3", "k4"] {
        let id = task_id(k);
        let r = stack.wait_terminal(&id).await;
        assert_eq!(r["status"], "COMPLETED", "{r}");
        let msg: Value = results
            .iter()
            .find(|g| g.key == id)
            .map(|g| serde_json::from_slice(&g.payload).unwrap())
            .unwrap();
        assert_eq!(msg["schema"], "patchflow.result.v1", "{msg}");
        assert_eq!(msg["task_id"], id.as_str());
        assert_eq!(msg["status"], "COMPLETED", "{msg}");
        assert_eq!(msg["summary"], "nothing to change", "{msg}");
        assert_eq!(msg["batch_id"], "kb1");
        assert_eq!(msg["idempotency_key"], k);
        assert_eq!(
            msg["objects"]["diff"]["key"],
            format!("results/{id}/diff.patch")
        );
        assert_eq!(
            msg["objects"]["transcript"]["key"],
            format!("results/{id}/transcript.jsonl")
        );
        // The local directory store has no presigned URLs.
        assert!(msg["objects"]["diff"].get("url").is_none(), "{msg}");
    }
    // k1 arrived twice and ran once.
    let k1 = task_id("k1");
    let count = workflow_count(&stack, &format!("WorkflowId='{k1}'"));
    assert!(count.contains("Total: 1"), "{count}");
    let count = workflow_count(&stack, "WorkflowType='CodeTask'");
    assert!(count.contains("Total: 4"), "{count}");
    assert_eq!(stack.model.observed().answered, 4, "each agent ran once");
    let (_, list) = stack.get_json("/api/tasks?batch_id=kb1").await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 4, "{list}");

    // Every malformed message is in the DLQ, as it was sent, with why and where from.
    let dlq = consume_until(&broker.brokers, DLQ, Duration::from_secs(60), |g| {
        g.len() >= bad.len()
    })
    .await;
    for (kind, payload, text) in &bad {
        let m = dlq
            .iter()
            .find(|g| g.key == format!("bad-{kind}"))
            .unwrap_or_else(|| panic!("{kind} not in the DLQ: {dlq:?}"));
        assert_eq!(m.headers["patchflow.error.kind"], *kind, "{m:?}");
        assert!(
            m.headers["patchflow.error"].contains(text),
            "{kind}: {:?}",
            m.headers["patchflow.error"]
        );
        assert_eq!(m.headers["patchflow.source.topic"], TASKS);
        assert_eq!(m.headers["patchflow.source.partition"], "0");
        assert_eq!(
            m.headers["patchflow.source.offset"],
            bad_offsets[*kind].to_string()
        );
        assert_eq!(
            &m.payload,
            payload.as_ref().unwrap_or(&Vec::new()),
            "{kind}"
        );
    }
    // Everything on partition 0 (six bad, one good) is committed.
    wait_committed(&broker.brokers, TASKS, 0, 7).await;
    wait_committed(&broker.brokers, TASKS, 2, 2).await;

    // A missing topic with auto-create off is a start-up error that names it.
    let out = stack
        .command(&["gateway"])
        .env(
            "TEMPORAL_ADDRESS",
            format!("127.0.0.1:{}", stack.temporal_port),
        )
        .env(
            "PATCHFLOW_HTTP_ADDR",
            format!("127.0.0.1:{}", crate::support::free_port()),
        )
        .env("PATCHFLOW_KAFKA_AUTO_CREATE", "false")
        .env("PATCHFLOW_KAFKA_TASKS_TOPIC", "absent.tasks")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("Kafka topic `absent.tasks` does not exist")
            && err.contains("kafka_auto_create"),
        "{err}"
    );
    let file = stack.dir.path().join("one.jsonl");
    std::fs::write(
        &file,
        format!(
            "{}\n",
            json!({"git_url": format!("file://{}", repo.display()), "task_description": "t"})
        ),
    )
    .unwrap();
    let out = stack
        .command(&["batch", "submit", file.to_str().unwrap(), "--via", "kafka"])
        .env("PATCHFLOW_KAFKA_AUTO_CREATE", "false")
        .env("PATCHFLOW_KAFKA_TASKS_TOPIC", "absent.tasks")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("Kafka topic `absent.tasks` does not exist"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporal_down_leaves_messages_uncommitted_until_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let broker = KafkaBroker::start(dir.path());
    let env = kafka_env(&broker);
    let mut stack = Stack::start(Mode::Split, finish_script(0), &env_refs(&env)).await;
    let repo = demo_git_repo(stack.dir.path());
    let p = producer(&broker.brokers);

    // The consumer has joined and committed nothing yet; now Temporal goes away.
    stack.temporal.take().unwrap().terminate();
    for k in ["t1", "t2", "t3"] {
        produce(
            &p,
            TASKS,
            0,
            Some(k),
            Some(&task_message(&repo, "fix", "tb")),
        )
        .await;
    }
    let gateway_log = || stack.gateway.as_ref().unwrap().log_text();
    let deadline = Instant::now() + Duration::from_secs(90);
    while gateway_log()
        .matches("retrying (offset not committed)")
        .count()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the consumer never retried:\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Nothing was committed, nothing dead-lettered, and the first task waits unstarted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        committed(&broker.brokers, "patchflow", TASKS, 3).await[0],
        -1
    );
    assert!(!gateway_log().contains("malformed Kafka message"));
    let (_, r) = stack
        .get_json(&format!("/api/tasks/{}", task_id("t1")))
        .await;
    assert_eq!(r["status"], "PENDING", "{r}");

    // Temporal returns (same port; the dev server starts empty): each message starts once.
    stack.temporal = Some(stack.start_temporal());
    for w in stack.workers.iter_mut() {
        w.terminate();
    }
    stack.workers.clear();
    stack.start_worker();
    for k in ["t1", "t2", "t3"] {
        let r = stack.wait_terminal(&task_id(k)).await;
        assert_eq!(r["status"], "COMPLETED", "{r}");
    }
    let count = workflow_count(&stack, "WorkflowType='CodeTask'");
    assert!(count.contains("Total: 3"), "{count}");
    wait_committed(&broker.brokers, TASKS, 0, 3).await;
    let results = consume_until(&broker.brokers, RESULTS, Duration::from_secs(60), |g| {
        g.len() >= 3
    })
    .await;
    let keys: BTreeSet<_> = results.iter().map(|g| g.key.clone()).collect();
    assert_eq!(keys.len(), 3, "{results:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_one_stopped_mid_stream_start_every_message_exactly_once() {
    const N: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let broker = KafkaBroker::start(dir.path());
    let env = kafka_env(&broker);
    // Each gateway is a consumer of the group: two consumer processes, one stopped below
    // in the middle of the stream (the worker, apart, keeps running the tasks). It is
    // stopped with SIGTERM, not SIGKILL: on Tansu 0.6.0 the partitions of a SIGKILLed member
    // were never handed to the survivor (4 of 12 messages still unstarted after 200 s), which
    // points at the broker not expiring members on session timeout; patchflow relies on
    // Kafka's rebalance for that case and is not bent around it.
    let mut stack = Stack::start(Mode::Split, finish_script(0), &env_refs(&env)).await;
    stack.start_extra_gateway().await;
    let repo = demo_git_repo(stack.dir.path());
    let p = producer(&broker.brokers);
    // Both consumers have joined before the messages arrive.
    tokio::time::sleep(Duration::from_secs(4)).await;
    for i in 0..N {
        let k = format!("m{i}");
        let part = (i % 3) as i32;
        produce(
            &p,
            TASKS,
            part,
            Some(&k),
            Some(&task_message(&repo, "fix", "two")),
        )
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, list) = stack.get_json("/api/tasks?batch_id=two&limit=200").await;
        if list["tasks"].as_array().map_or(0, Vec::len) >= N / 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tasks did not start:\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.extra_gateways[0].terminate();

    let want: BTreeSet<String> = (0..N).map(|i| task_id(&format!("m{i}"))).collect();
    let results = consume_until(&broker.brokers, RESULTS, Duration::from_secs(200), |got| {
        got.iter().map(|g| g.key.clone()).collect::<BTreeSet<_>>() == want
    })
    .await;
    let mut per_key: BTreeMap<&str, usize> = BTreeMap::new();
    for g in &results {
        *per_key.entry(g.key.as_str()).or_default() += 1;
    }
    let repeats: usize = per_key.values().map(|n| n - 1).sum();
    println!(
        "{} result messages for {N} tasks ({repeats} repeated, same key)",
        results.len()
    );
    for id in &want {
        let r = stack.wait_terminal(id).await;
        assert_eq!(r["status"], "COMPLETED", "{r}");
    }
    let count = workflow_count(&stack, "WorkflowType='CodeTask'");
    assert!(count.contains(&format!("Total: {N}")), "{count}");
    let (_, list) = stack.get_json("/api/tasks?limit=200").await;
    let ids: Vec<String> = list["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), N);
    assert_eq!(ids.iter().cloned().collect::<BTreeSet<_>>(), want);
}

fn git_head(repo: &Path) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["rev-parse", "HEAD"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swe_bench_batch_runs_within_its_concurrency_limit_and_exports_preds() {
    let dir = tempfile::tempdir().unwrap();
    let broker = KafkaBroker::start(dir.path());
    let mut env = kafka_env(&broker);
    env.push(("PATCHFLOW_BATCH_CONCURRENCY", "1".into()));
    // A slow model, so runs would overlap without the limit.
    let mut script = demo_script();
    script.delay_ms = 300;
    let stack = Stack::start(Mode::Up, script, &env_refs(&env)).await;
    let repo = demo_git_repo(stack.dir.path());
    let commit = git_head(&repo);
    let file = stack.dir.path().join("swe.jsonl");
    let lines: Vec<String> = (1..=3)
        .map(|i| {
            json!({
                "instance_id": format!("demo__calc-{i}"),
                "repo": format!("file://{}", repo.display()),
                "base_commit": commit,
                "problem_statement": "add() returns the wrong result",
                "hints_text": "",
            })
            .to_string()
        })
        .collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();

    // A file with a bad line sends nothing.
    let bad_file = stack.dir.path().join("bad.jsonl");
    std::fs::write(
        &bad_file,
        format!("{}\n{{\"instance_id\":\"x\",\"repo\":\"a/b\"}}\n", lines[0]),
    )
    .unwrap();
    let out = stack.cli(&[
        "batch",
        "submit",
        bad_file.to_str().unwrap(),
        "--via",
        "kafka",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("line 2: `base_commit` is missing") && err.contains("nothing was submitted"),
        "{err}"
    );

    let out = stack.cli(&[
        "batch",
        "submit",
        file.to_str().unwrap(),
        "--batch-id",
        "swe1",
        "--via",
        "kafka",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "swe1");
    // The same file again: the same tasks, nothing new.
    let out = stack.cli(&[
        "batch",
        "submit",
        file.to_str().unwrap(),
        "--batch-id",
        "swe1",
        "--via",
        "http",
    ]);
    assert!(out.status.success());

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, list) = stack.get_json("/api/tasks?batch_id=swe1").await;
        if list["tasks"].as_array().map_or(0, Vec::len) == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{list}\n{}", stack.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = stack.cli(&["batch", "status", "swe1", "--follow"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}\n{}", stack.logs());
    assert!(text.contains("3 tasks, 3 ended"), "{text}");
    let out = stack.cli(&["batch", "status", "swe1", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["counts"], json!({"COMPLETED": 3}), "{v}");

    let preds = stack.dir.path().join("preds.json");
    let out = stack.cli(&[
        "batch",
        "export",
        "swe1",
        "--format",
        "preds",
        "-o",
        preds.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let preds: Value = serde_json::from_slice(&std::fs::read(&preds).unwrap()).unwrap();
    let preds = preds.as_array().unwrap();
    assert_eq!(preds.len(), 3);
    for (i, p) in preds.iter().enumerate() {
        assert_eq!(p["instance_id"], format!("demo__calc-{}", i + 1));
        assert_eq!(p["model_name_or_path"], "patchflow/scripted-test");
        assert_eq!(p["model_patch"], super::e2e::EXPECTED_DIFF);
        assert_eq!(p.as_object().unwrap().len(), 3);
    }
    let count = workflow_count(&stack, "WorkflowType='CodeTask'");
    assert!(count.contains("Total: 3"), "{count}");

    // Never two RUNNING_AGENT at once, by the recorded history: each task's span runs from
    // RUNNING_AGENT to the status after it.
    let mut spans = Vec::new();
    for i in 1..=3 {
        let id = task_id(&format!("swe1/demo__calc-{i}"));
        let events = stack.events(&id).await;
        let statuses: Vec<_> = events.iter().filter(|e| e.status.is_some()).collect();
        let at = statuses
            .iter()
            .position(|e| e.status == Some(TaskStatus::RunningAgent))
            .unwrap();
        spans.push((statuses[at].at, statuses[at + 1].at));
    }
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0, "RUNNING_AGENT spans overlap: {spans:?}");
    }
    // And the limit was in play: some task waited for a slot.
    assert!(
        stack.logs().contains("waiting for a batch slot"),
        "{}",
        stack.logs()
    );
}
