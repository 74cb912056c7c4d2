//! Retry: from the failed step (a Temporal reset that skips the steps that completed), from
//! the start (a new run, attempt 2), a reset done by hand with the `temporal` CLI, and the
//! refusal while a task still runs. Attempts are numbered and kept in the record.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use patchflow_core::TaskStatus;
use patchflow_gateway::grpc::proto;
use patchflow_scripted_model::{Failure, Script};
use serde_json::{Value, json};

use crate::support::{Mode, Stack, demo_script};

fn failing_script() -> Script {
    let mut script = demo_script();
    script.fail = Some(Failure {
        status: 500,
        times: None,
        message: "upstream exploded".into(),
        ..Failure::default()
    });
    script
}

/// (attempt, status) of each attempt in a record.
fn attempts(r: &Value) -> Vec<(u64, String)> {
    r["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["attempt"].as_u64().unwrap(),
                a["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_from_failed_step_runs_the_agent_again_without_fetching_again() {
    let stack = Stack::start(Mode::Up, failing_script(), &[]).await;
    let id = stack.submit_demo().await;
    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "FAILED", "{r}");
    assert_eq!(r["attempt"], 1);
    assert!(r["message"].as_str().unwrap().contains("upstream exploded"));
    stack.closed_workflow(&id).await;

    // The model is back; retry with an empty body (from_failed_step is the default).
    stack.model.set_failure(None);
    let resp = stack
        .http
        .post(format!("{}/api/tasks/{id}/retry", stack.base))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let retried: Value = resp.json().await.unwrap();
    assert_eq!(retried["attempt"], 2, "{retried}");
    assert!(!TaskStatus::is_terminal(
        serde_json::from_value(retried["status"].clone()).unwrap()
    ));

    // A watcher from the beginning sees attempt 1 fail and attempt 2 through to the end.
    let mut c = stack.grpc_client().await;
    let mut stream = c
        .watch_task(proto::WatchTaskRequest {
            task_id: id.clone(),
            after_seq: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    let last = loop {
        match stream.message().await.unwrap().unwrap().item.unwrap() {
            proto::watch_task_response::Item::Event(e) => seen.extend(e.status),
            proto::watch_task_response::Item::Final(t) => break t,
        }
    };
    assert_eq!(last.status, "COMPLETED", "{last:?}\n{}", stack.logs());
    assert_eq!(last.attempt, 2);
    let after_failure: Vec<&str> = seen
        .iter()
        .skip_while(|s| *s != "FAILED")
        .map(String::as_str)
        .collect();
    assert_eq!(
        after_failure,
        [
            "FAILED",
            "QUEUED",
            "RUNNING_AGENT",
            "UPLOADING_RESULTS",
            "COMPLETED"
        ],
        "no fetch or stage in attempt 2"
    );

    let r = stack.record(&id).await;
    assert_eq!(
        attempts(&r),
        [(1, "FAILED".into()), (2, "COMPLETED".into())]
    );
    assert!(
        r["attempts"][0]["message"]
            .as_str()
            .unwrap()
            .contains("upstream exploded")
    );
    assert!(r["attempts"][0]["finished_at"].is_string());
    let (_, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert_eq!(diff, super::e2e::EXPECTED_DIFF);
    // The run that completed replayed fetch and stage from history instead of running them.
    stack.closed_workflow(&id).await;
    assert_eq!(stack.activity_attempts(&id, "fetch_code"), [1]);
    assert_eq!(stack.activity_attempts(&id, "stage_code"), [1]);
    assert_eq!(stack.activity_attempts(&id, "run_agent"), [1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_from_start_and_a_reset_by_hand_each_make_a_new_attempt() {
    let stack = Stack::start(Mode::Up, failing_script(), &[]).await;
    let id = stack.submit_demo().await;
    assert_eq!(stack.wait_terminal(&id).await["status"], "FAILED");
    stack.model.set_failure(None);

    // From the CLI, from the start.
    let out = stack.cli(&["retry", &id, "--mode", "from_start"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(line.contains(&format!("{id}  attempt 2")), "{line}");
    // Following from the beginning goes past attempt 1's FAILED to attempt 2's end.
    let out = stack.cli(&["status", &id, "--wait"]);
    let followed = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{followed}");
    assert!(
        followed.contains("FAILED") && followed.contains("COMPLETED"),
        "{followed}"
    );
    let r = stack.wait_attempt_ends(&id, 2).await;
    assert_eq!(r["status"], "COMPLETED", "{r}\n{}", stack.logs());
    assert_eq!(
        attempts(&r),
        [(1, "FAILED".into()), (2, "COMPLETED".into())]
    );
    // Attempt 2 fetched the code again: the whole pipeline ran twice.
    let downloads = stack
        .statuses(&id)
        .await
        .into_iter()
        .filter(|s| *s == TaskStatus::DownloadingCode)
        .count();
    assert_eq!(downloads, 2);

    // A reset done with the temporal CLI (as in the Web UI) is recorded as attempt 3.
    stack.closed_workflow(&id).await;
    let out = stack.temporal_cli(&[
        "workflow",
        "reset",
        "--workflow-id",
        &id,
        "--type",
        "FirstWorkflowTask",
        "--reason",
        "by hand",
        "--yes",
    ]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r = stack.wait_attempt_ends(&id, 3).await;
    assert_eq!(r["status"], "COMPLETED", "{r}");
    assert_eq!(
        attempts(&r),
        [
            (1, "FAILED".into()),
            (2, "COMPLETED".into()),
            (3, "COMPLETED".into())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_while_running_is_refused_with_the_reason() {
    let mut script = demo_script();
    script.delay_ms = 1500;
    let stack = Stack::start(Mode::Up, script, &[]).await;
    let id = stack.submit_demo().await;
    stack
        .wait_for(&id, Duration::from_secs(60), |s| {
            s == TaskStatus::RunningAgent
        })
        .await;
    let (c, body) = stack
        .post_json(
            &format!("/api/tasks/{id}/retry"),
            &json!({"mode": "from_start"}),
        )
        .await;
    assert_eq!(c, 409, "{body}");
    assert_eq!(body["code"], "conflict");
    let msg = body["message"].as_str().unwrap();
    assert!(
        msg.contains(&format!("task {id} is still RUNNING_AGENT"))
            && msg.contains("retry it once it has ended"),
        "{msg}"
    );
    let mut client = stack.grpc_client().await;
    let e = client
        .retry_task(proto::RetryTaskRequest {
            task_id: id.clone(),
            mode: proto::RetryMode::FromFailedStep as i32,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(e.message().contains("is still RUNNING_AGENT"), "{e:?}");
    let (c, body) = stack
        .post_json(
            &format!("/api/tasks/{id}/retry"),
            &json!({"mode": "sideways"}),
        )
        .await;
    assert_eq!(c, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("unknown variant `sideways`"),
        "{body}"
    );
    // Nothing changed: the run goes on to the end as attempt 1.
    let r = stack.wait_terminal(&id).await;
    assert_eq!(
        (r["status"].as_str(), r["attempt"].as_u64()),
        (Some("COMPLETED"), Some(1))
    );
    assert_eq!(attempts(&r), [(1, "COMPLETED".into())]);
}
