//! The distributed back-ends end to end: MySQL or PostgreSQL for tasks, S3 (moto) for code
//! and results, Redis for the status cache, idempotency keys, rate limits and live events;
//! and what happens when one of them fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use patchflow_core::TaskStatus;
use serde_json::{Value, json};

use crate::support::{
    Database, Mode, Proc, S3Server, Stack, TestDatabase, demo_git_repo, demo_script, free_port,
};

/// Keys under a random prefix in the machine's Redis, deleted afterwards.
struct RedisPrefix(String);

impl RedisPrefix {
    fn new() -> Self {
        Self(format!(
            "pf-e2e-{}",
            &patchflow_core::TaskId::generate().as_str()[4..20]
        ))
    }

    fn keys(&self) -> Vec<String> {
        let out = Command::new("redis-cli")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                "6379",
                "--scan",
                "--pattern",
                &format!("{}:*", self.0),
            ])
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for RedisPrefix {
    fn drop(&mut self) {
        for k in self.keys() {
            let _ = Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", "6379", "DEL", &k])
                .output();
        }
    }
}

fn aws_env() -> Vec<(String, String)> {
    vec![
        ("AWS_ACCESS_KEY_ID".into(), "test".into()),
        ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
        ("AWS_REGION".into(), "us-east-1".into()),
    ]
}

fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn sql(db: &TestDatabase, query: &str) -> String {
    let out = match db.kind {
        Database::Postgres => Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                &db.name,
                "-tAc",
                query,
            ])
            .output(),
        Database::MySql => Command::new("mysql")
            .args([
                "-h",
                "127.0.0.1",
                "-u",
                "root",
                "-N",
                "-B",
                &db.name,
                "-e",
                query,
            ])
            .output(),
        Database::Sqlite => unreachable!("not used with SQLite"),
    }
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn demo_on(kind: Database) {
    let aux = tempfile::tempdir().unwrap();
    let db = TestDatabase::create(kind, aux.path());
    let s3 = S3Server::start(aux.path());
    let redis = RedisPrefix::new();
    let mut env = aws_env();
    env.extend([
        ("PATCHFLOW_DATABASE_URL".to_string(), db.url.clone()),
        ("PATCHFLOW_OBJECT_STORE_URL".into(), s3.url("patchflow-e2e")),
        (
            "PATCHFLOW_REDIS_URL".into(),
            "redis://127.0.0.1:6379".into(),
        ),
        ("PATCHFLOW_REDIS_PREFIX".into(), redis.0.clone()),
    ]);
    let stack = Stack::start(Mode::Up, demo_script(), &as_refs(&env)).await;
    let id = stack.submit_demo().await;

    // Follow the live event stream (SSE) from the start while the task runs.
    let sse = stack
        .http
        .get(format!("{}/api/tasks/{id}/events", stack.base))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let body = tokio::time::timeout(Duration::from_secs(120), sse.text())
        .await
        .expect("the event stream ended")
        .unwrap();
    let seqs: Vec<i64> = body
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "events out of order or repeated: {seqs:?}"
    );
    assert!(body.contains("step 4: run_shell_command"), "{body}");
    assert!(body.contains("\"status\":\"COMPLETED\""), "{body}");

    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "COMPLETED", "{r}\n{}", stack.logs());
    use TaskStatus::*;
    assert_eq!(
        stack.statuses(&id).await,
        [
            Pending,
            Queued,
            DownloadingCode,
            StagingCode,
            RunningAgent,
            UploadingResults,
            Completed
        ]
    );

    // Result files come from S3 through presigned URLs.
    let mut auth = reqwest::header::HeaderMap::new();
    auth.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {}", stack.token).parse().unwrap(),
    );
    let no_redirect = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(auth)
        .build()
        .unwrap();
    let resp = no_redirect
        .get(format!("{}/api/tasks/{id}/diff", stack.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 307);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    assert!(
        location.starts_with(&s3.endpoint) && location.contains("X-Amz-Signature"),
        "{location}"
    );
    let (_, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert_eq!(diff, super::e2e::EXPECTED_DIFF);
    let (_, transcript) = stack.get_text(&format!("/api/tasks/{id}/transcript")).await;
    assert_eq!(
        transcript
            .lines()
            .filter(|l| l.contains("\"tool_result\""))
            .count(),
        5
    );
    // Nothing went to the local directory store.
    assert!(!stack.data_dir.join("objects").exists());

    // The database kind named in the URL holds the record and its history.
    assert_eq!(
        sql(
            &db,
            &format!("SELECT status FROM tasks WHERE task_id = '{id}'")
        ),
        "COMPLETED"
    );
    assert_eq!(
        sql(
            &db,
            &format!(
                "SELECT COUNT(*) FROM task_events WHERE task_id = '{id}' AND status IS NOT NULL"
            )
        ),
        "7"
    );
    // Redis carried the live events and the cached status, under the configured prefix.
    let keys = redis.keys();
    assert!(
        keys.contains(&format!("{}:events:{id}", redis.0)),
        "{keys:?}"
    );
    let out = stack.command(&["config"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("# cache:         Redis redis://127.0.0.1:6379"),
        "{text}"
    );
    assert!(
        text.contains(&format!("# task store:    {}", db.url)),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_task_on_mysql_s3_and_redis() {
    demo_on(Database::MySql).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_task_on_postgres_s3_and_redis() {
    demo_on(Database::Postgres).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_mid_run_degrades_to_the_database_and_loses_nothing() {
    let aux = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    let mut redis = Proc::spawn("redis-server", cmd, aux.path().join("redis.log"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "private redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut script = demo_script();
    script.turns[1].delay_ms = 3_000;
    let url = format!("redis://127.0.0.1:{port}");
    let stack = Stack::start(Mode::Up, script, &[("PATCHFLOW_REDIS_URL", &url)]).await;
    let id = stack.submit_demo().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stack.model.observed().requests < 2 {
        assert!(
            Instant::now() < deadline,
            "the agent never reached turn 2:\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(stack.record(&id).await["status"], "RUNNING_AGENT");

    redis.kill9();
    // Reads are answered from the database.
    let r = stack.record(&id).await;
    assert_eq!(r["status"], "RUNNING_AGENT");
    let (c, health) = stack.get_json("/healthz").await;
    assert_eq!(
        (c, health["status"].as_str()),
        (200, Some("degraded")),
        "{health}"
    );

    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "COMPLETED", "{r}\n{}", stack.logs());
    let statuses = stack.statuses(&id).await;
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == TaskStatus::Completed)
            .count(),
        1
    );
    let (_, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert_eq!(diff, super::e2e::EXPECTED_DIFF);
    assert!(
        stack.logs().contains("cache unavailable"),
        "no warning logged:\n{}",
        stack.logs()
    );
    // New submissions still work without Redis.
    let id2 = stack.submit_demo().await;
    assert_eq!(stack.wait_terminal(&id2).await["status"], "COMPLETED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_unreachable_during_stage_code_is_retried_then_fails_with_the_cause() {
    let aux = tempfile::tempdir().unwrap();
    let mut s3 = S3Server::start(aux.path());
    let mut env = aws_env();
    env.push((
        "PATCHFLOW_OBJECT_STORE_URL".into(),
        s3.url("patchflow-down"),
    ));
    let stack = Stack::start(Mode::Up, demo_script(), &as_refs(&env)).await;
    // The store answered at start-up; now it is gone. A git source needs no store to submit.
    s3.proc.kill9();
    let id = stack.submit_demo().await;
    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "FAILED", "{r}");
    let msg = r["message"].as_str().unwrap();
    assert!(msg.contains(&format!("staged/{id}/code.tar.zst")), "{msg}");
    assert_eq!(
        stack.activity_attempts(&id, "stage_code"),
        [3],
        "retried to the limit"
    );
    use TaskStatus::*;
    assert_eq!(
        stack.statuses(&id).await,
        [Pending, Queued, DownloadingCode, StagingCode, Failed]
    );
    assert_eq!(stack.model.observed().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_submission_racing_on_two_gateways_makes_one_task() {
    let aux = tempfile::tempdir().unwrap();
    let db = TestDatabase::create(Database::MySql, aux.path());
    let redis = RedisPrefix::new();
    let env = [
        ("PATCHFLOW_DATABASE_URL", db.url.as_str()),
        ("PATCHFLOW_REDIS_URL", "redis://127.0.0.1:6379"),
        ("PATCHFLOW_REDIS_PREFIX", redis.0.as_str()),
    ];
    let mut stack = Stack::start(Mode::Split, demo_script(), &env).await;
    let second = stack.start_extra_gateway().await;
    let repo = demo_git_repo(stack.dir.path());
    let body = json!({"git_url": format!("file://{}", repo.display()), "task_description": "fix"});
    let post = |base: String| {
        let (http, body) = (stack.http.clone(), body.clone());
        async move {
            let r = http
                .post(format!("{base}/api/tasks"))
                .header("Idempotency-Key", "race-1")
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let ((c1, v1), (c2, v2)) = tokio::join!(post(stack.base.clone()), post(second));
    assert_eq!(v1["task_id"], v2["task_id"], "{v1} {v2}");
    let mut codes = [c1, c2];
    codes.sort();
    assert_eq!(codes, [200, 202]);
    let id = v1["task_id"].as_str().unwrap();
    assert_eq!(stack.wait_terminal(id).await["status"], "COMPLETED");
    assert_eq!(sql(&db, "SELECT COUNT(*) FROM tasks"), "1");
    let out = stack.temporal_cli(&[
        "workflow",
        "count",
        "--query",
        &format!("WorkflowId='{id}'"),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Total: 1"));
    assert_eq!(stack.model.observed().answered, 5, "the agent ran once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_past_the_tenant_rate_get_429_with_retry_after() {
    let redis = RedisPrefix::new();
    let env = [
        ("PATCHFLOW_REDIS_URL", "redis://127.0.0.1:6379"),
        ("PATCHFLOW_REDIS_PREFIX", redis.0.as_str()),
        ("PATCHFLOW_SUBMIT_RATE_CAPACITY", "2"),
        ("PATCHFLOW_SUBMIT_RATE_PER_SEC", "0.05"),
    ];
    let stack = Stack::start(Mode::Up, demo_script(), &env).await;
    let repo = demo_git_repo(stack.dir.path());
    // The bucket is the caller's tenant, as its token says (a body naming another tenant
    // cannot move it): one member token per tenant.
    let mut tokens = std::collections::HashMap::new();
    for tenant in ["t1", "t2"] {
        let (c, v) = stack
            .post_json("/api/tokens", &json!({"tenant": tenant, "role": "member"}))
            .await;
        assert_eq!(c, 201, "{v}");
        tokens.insert(tenant, crate::support::http_with(v["token"].as_str()));
    }
    let submit = |tenant: &str| {
        let body =
            json!({"git_url": format!("file://{}", repo.display()), "task_description": "fix"});
        let http = tokens[tenant].clone();
        let url = format!("{}/api/tasks", stack.base);
        async move { http.post(url).json(&body).send().await.unwrap() }
    };
    assert_eq!(submit("t1").await.status().as_u16(), 202);
    assert_eq!(submit("t1").await.status().as_u16(), 202);
    let refused = submit("t1").await;
    assert_eq!(refused.status().as_u16(), 429);
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    assert!(
        body["message"].as_str().unwrap().contains("tenant t1"),
        "{body}"
    );
    // Another tenant has its own bucket; the refused submission stored nothing.
    assert_eq!(submit("t2").await.status().as_u16(), 202);
    let (_, list) = stack.get_json("/api/tasks").await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 3);
}
