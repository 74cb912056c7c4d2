//! Scale-out: two `patchflow gateway` and two `patchflow worker` processes against one
//! Temporal dev server started apart, PostgreSQL, Redis and an S3 server. 100 tasks go in
//! through both gateways (HTTP to one, gRPC to the other); one worker is SIGKILLed while
//! they run. Every task completes exactly once, with one result message on Kafka (a Tansu
//! broker), both workers ran agents, and no agent is left running.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use patchflow_core::TaskStatus;
use patchflow_gateway::grpc::proto;

use crate::suite::kafka::{RESULTS, consume_until};
use crate::support::{
    Bearer, Database, KafkaBroker, Mode, S3Server, Stack, TestDatabase, demo_git_repo, demo_script,
    processes_mentioning,
};

/// 100 unless `PATCHFLOW_SCALE_OUT_TASKS` says otherwise.
fn tasks() -> usize {
    std::env::var("PATCHFLOW_SCALE_OUT_TASKS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_and_two_workers_complete_100_tasks_exactly_once_through_a_worker_crash() {
    let aux = tempfile::tempdir().unwrap();
    let db = TestDatabase::create(Database::Postgres, aux.path());
    let s3 = S3Server::start(aux.path());
    let kafka = KafkaBroker::start(aux.path());
    let prefix = format!(
        "pf-scale-{}",
        &patchflow_core::TaskId::generate().as_str()[4..20]
    );
    let bucket = s3.url("scale-out");
    let env = [
        ("PATCHFLOW_DATABASE_URL", db.url.as_str()),
        ("PATCHFLOW_REDIS_URL", "redis://127.0.0.1:6379"),
        ("PATCHFLOW_REDIS_PREFIX", prefix.as_str()),
        ("PATCHFLOW_OBJECT_STORE_URL", bucket.as_str()),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("PATCHFLOW_KAFKA_BROKERS", kafka.brokers.as_str()),
        ("PATCHFLOW_SUBMIT_RATE_CAPACITY", "0"),
    ];
    let mut stack = Stack::start(Mode::Split, demo_script(), &env).await;
    let (_, grpc2) = stack.start_extra_gateway_with_grpc().await;
    stack.start_worker();
    let pids: Vec<i32> = stack.workers.iter().map(|w| w.pid()).collect();
    let channel = tonic::transport::Endpoint::from_shared(grpc2)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = proto::tasks_client::TasksClient::with_interceptor(
        channel,
        Bearer(Some(stack.token.clone())),
    );
    let repo = demo_git_repo(stack.dir.path());

    let started = Instant::now();
    let mut ids = Vec::with_capacity(tasks());
    for i in 0..tasks() {
        let id = if i % 2 == 0 {
            stack.submit_demo().await
        } else {
            grpc.submit_task(proto::SubmitTaskRequest {
                git_token: None,
                git_url: format!("file://{}", repo.display()),
                git_ref: None,
                options: Some(proto::TaskOptions {
                    task_description: "fix".into(),
                    ..proto::TaskOptions::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .task_id
        };
        ids.push(id);
    }

    // Mid-run, one worker dies with whatever it holds (its agents go with it).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut done = 0;
        for id in &ids {
            if stack.record(id).await["status"] == "COMPLETED" {
                done += 1;
            }
            if done >= 10 {
                break;
            }
        }
        if done >= 10 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress:\n{}", stack.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("{:?}: 10 completed; killing worker 0", started.elapsed());
    stack.workers[0].kill9();

    let mut ran_on = BTreeSet::new();
    for id in &ids {
        let r = stack
            .wait_for(id, Duration::from_secs(240), |s| s.is_terminal())
            .await;
        assert_eq!(r["status"], "COMPLETED", "{r}");
        assert_eq!(r["attempt"], 1, "one attempt of the task: {r}");
        let completed = stack
            .statuses(id)
            .await
            .into_iter()
            .filter(|s| *s == TaskStatus::Completed)
            .count();
        assert_eq!(completed, 1, "{id} completed {completed} times");
        if let Some(w) = r["attempts"][0]["worker"].as_str() {
            ran_on.insert(w.rsplit(':').next().unwrap().to_string());
        }
    }
    eprintln!("{:?}: all {} completed", started.elapsed(), ids.len());
    // One result message per task, keyed by its id, saying COMPLETED. A step run again
    // after the kill finds its message sent (the store's marker); only a worker killed
    // between the broker's answer and that marker's write (a few milliseconds) would send
    // one twice, so one repeat is tolerated.
    let wanted: BTreeSet<String> = ids.iter().cloned().collect();
    let results = consume_until(&kafka.brokers, RESULTS, Duration::from_secs(120), |got| {
        got.iter().map(|g| g.key.clone()).collect::<BTreeSet<_>>() == wanted
    })
    .await;
    for g in &results {
        let msg: serde_json::Value = serde_json::from_slice(&g.payload).unwrap();
        assert_eq!(msg["status"], "COMPLETED", "{msg}");
        assert_eq!(msg["task_id"], g.key.as_str(), "{msg}");
    }
    let repeats = results.len() - wanted.len();
    let mut seen = BTreeSet::new();
    for g in &results {
        if !seen.insert(g.key.clone()) {
            let r = stack.record(&g.key).await;
            eprintln!("repeated: {} {}", g.key, r["attempts"]);
        }
    }
    eprintln!(
        "{} result messages for {} tasks",
        results.len(),
        wanted.len()
    );
    assert!(repeats <= 1, "{repeats} repeated result messages");
    let workers: BTreeSet<String> = pids.iter().map(ToString::to_string).collect();
    assert_eq!(
        ran_on, workers,
        "both workers ran agents: {ran_on:?} of {workers:?}"
    );
    let (_, diff) = stack
        .get_text(&format!("/api/tasks/{}/diff", ids[tasks() - 1]))
        .await;
    assert!(diff.contains("+    return a + b"), "{diff}");
    // No agent outlived its task or its worker.
    let work = stack.data_dir.join("work").display().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !processes_mentioning(&work).is_empty() {
        assert!(
            Instant::now() < deadline,
            "agents left running: {:?}",
            processes_mentioning(&work)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
