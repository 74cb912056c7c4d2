//! Failure paths: each asserts the error text and that stored state is intact.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use patchflow_core::TaskStatus;
use patchflow_scripted_model::{Failure, Script, ScriptedCall, Turn};
use serde_json::json;

use crate::support::{Mode, Stack, demo_git_repo, demo_script, processes_mentioning};

fn call(name: &str, arguments: serde_json::Value) -> ScriptedCall {
    ScriptedCall {
        name: name.into(),
        arguments,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_git_url_fails_once_naming_the_url() {
    let stack = Stack::start(Mode::Up, demo_script(), &[]).await;
    let url = format!("file://{}/no-such-repo.git", stack.dir.path().display());
    let (c, v) = stack
        .post_json(
            "/api/tasks",
            &json!({"git_url": url, "task_description": "fix"}),
        )
        .await;
    assert_eq!(c, 202, "{v}");
    let id = v["task_id"].as_str().unwrap();
    let r = stack.wait_terminal(id).await;
    assert_eq!(r["status"], "FAILED");
    let msg = r["message"].as_str().unwrap();
    assert!(msg.contains(&url) && msg.contains("cannot fetch"), "{msg}");
    // Bad input is not retried: one attempt of fetch_code, and the agent never ran.
    assert_eq!(stack.activity_attempts(id, "fetch_code"), [1]);
    use TaskStatus::*;
    assert_eq!(
        stack.statuses(id).await,
        [Pending, Queued, DownloadingCode, Failed]
    );
    assert_eq!(stack.model.observed().requests, 0);
    // The record keeps what was asked.
    assert_eq!(r["source"], url.as_str());
    assert_eq!(r["task_description"], "fix");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_edit_is_returned_to_the_model_and_the_run_goes_on() {
    let script = Script {
        turns: vec![
            Turn {
                tool_calls: vec![call(
                    "edit_file_content",
                    json!({"file_path": "calc.py", "old_text": "return a", "new_text": "return b"}),
                )],
                ..Turn::default()
            },
            Turn {
                expect_in_tool_results: vec!["old_text matches 2 places in `calc.py`".into()],
                tool_calls: vec![call(
                    "edit_file_content",
                    json!({"file_path": "calc.py", "old_text": "return a - b", "new_text": "return a + b"}),
                )],
                ..Turn::default()
            },
            Turn {
                expect_in_tool_results: vec!["\"replaced\":1".into()],
                content: Some("Fixed add().".into()),
                ..Turn::default()
            },
        ],
        ..Script::default()
    };
    let stack = Stack::start(Mode::Up, script, &[]).await;
    let id = &stack.submit_demo().await;
    let r = stack.wait_terminal(id).await;
    assert_eq!(r["status"], "COMPLETED", "{r}\n{}", stack.logs());
    assert_eq!(r["summary"]["outcome"], "answered");
    assert_eq!(r["summary"]["summary"], "Fixed add().");
    let (_, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert_eq!(diff, super::e2e::EXPECTED_DIFF);
    let (_, transcript) = stack.get_text(&format!("/api/tasks/{id}/transcript")).await;
    let first: serde_json::Value = transcript
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["type"] == "tool_result")
        .unwrap();
    assert_eq!(first["ok"], false);
    assert!(
        first["output"]["error"]
            .as_str()
            .unwrap()
            .contains("include more surrounding lines")
    );
    assert!(stack.model.observed().violations.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_endpoint_500_is_retried_then_fails_with_the_cause() {
    let mut script = demo_script();
    script.fail = Some(Failure {
        status: 500,
        times: None,
        message: "upstream exploded".into(),
        ..Failure::default()
    });
    let stack = Stack::start(Mode::Up, script, &[]).await;
    let id = &stack.submit_demo().await;
    let r = stack.wait_terminal(id).await;
    assert_eq!(r["status"], "FAILED");
    let msg = r["message"].as_str().unwrap();
    assert!(
        msg.contains("model endpoint failed after 2 attempts") && msg.contains("upstream exploded"),
        "{msg}"
    );
    // Retried: more than one request reached the endpoint.
    let seen = stack.model.observed();
    assert!(seen.failed_on_purpose >= 2, "{}", seen.failed_on_purpose);
    assert_eq!(seen.answered, 0);
    // What the run produced is kept: the transcript records each failed attempt.
    assert_eq!(r["summary"]["outcome"], "error");
    let (c, transcript) = stack.get_text(&format!("/api/tasks/{id}/transcript")).await;
    assert_eq!(c, 200);
    assert_eq!(
        transcript
            .lines()
            .filter(|l| l.contains("\"model_error\""))
            .count(),
        2
    );
    let (c, log) = stack.get_text(&format!("/api/tasks/{id}/log")).await;
    assert_eq!(c, 200);
    assert!(log.contains("model request failed"), "{log}");
    let (c, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert_eq!((c, diff.as_str()), (200, ""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_run_agent_stops_the_agent_process() {
    let mut script = demo_script();
    script.turns[0].delay_ms = 120_000;
    let stack = Stack::start(Mode::Up, script, &[]).await;
    let id = stack.submit_demo().await;
    stack
        .wait_for(&id, Duration::from_secs(60), |s| {
            s == TaskStatus::RunningAgent
        })
        .await;
    // Wait for the agent to be asking the (slow) model.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stack.model.observed().requests == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never asked the model:\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agents = processes_mentioning(&id);
    assert!(!agents.is_empty(), "no agent process for {id}");
    // The workflow's `status` query answers from the workflow itself.
    let out = stack.temporal_cli(&[
        "workflow",
        "query",
        "--workflow-id",
        &id,
        "--type",
        "status",
        "--output",
        "json",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("RUNNING_AGENT"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (c, b) = stack
        .post_json(
            &format!("/api/tasks/{id}/cancel"),
            &json!({"reason": "changed my mind"}),
        )
        .await;
    assert_eq!(c, 202, "{b}");
    let r = stack
        .wait_for(&id, Duration::from_secs(30), |s| s.is_terminal())
        .await;
    assert_eq!(r["status"], "CANCELLED", "{r}");
    assert_eq!(r["message"], "changed my mind");
    assert!(
        processes_mentioning(&id).is_empty(),
        "agent still running after CANCELLED"
    );
    let desc = stack.closed_workflow(&id).await;
    assert_eq!(
        desc["workflowExecutionInfo"]["status"],
        "WORKFLOW_EXECUTION_STATUS_CANCELED"
    );
    // Cancelling again: the task is already over.
    let (c, _) = stack
        .post_json(&format!("/api/tasks/{id}/cancel"), &json!({}))
        .await;
    assert_eq!(c, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_resubmit_returns_the_same_task_and_one_workflow() {
    let stack = Stack::start(Mode::Up, demo_script(), &[]).await;
    let repo = demo_git_repo(stack.dir.path());
    let body = json!({"git_url": format!("file://{}", repo.display()), "task_description": "fix"});
    let submit = || async {
        let r = stack
            .http
            .post(format!("{}/api/tasks", stack.base))
            .header("Idempotency-Key", "nightly-42")
            .json(&body)
            .send()
            .await
            .unwrap();
        (
            r.status().as_u16(),
            r.json::<serde_json::Value>().await.unwrap(),
        )
    };
    let (c1, v1) = submit().await;
    let (c2, v2) = submit().await;
    assert_eq!((c1, c2), (202, 200), "{v1} {v2}");
    assert_eq!(v1["task_id"], v2["task_id"]);
    let id = v1["task_id"].as_str().unwrap();
    assert_eq!(stack.wait_terminal(id).await["status"], "COMPLETED");
    let (c3, v3) = submit().await;
    assert_eq!(
        (c3, v3["task_id"].as_str(), v3["status"].as_str()),
        (200, Some(id), Some("COMPLETED"))
    );

    let (_, list) = stack.get_json("/api/tasks").await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1);
    let out = stack.temporal_cli(&[
        "workflow",
        "count",
        "--query",
        &format!("WorkflowId='{id}'"),
    ]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Total: 1"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(stack.model.observed().answered, 5, "the agent ran once");
    let statuses = stack.statuses(id).await;
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == TaskStatus::Completed)
            .count(),
        1
    );
}

/// An agent told to die with a runner that is not its parent (that runner died before the
/// agent could ask for it) stops at once, before it reads anything or asks a model.
#[test]
fn an_agent_whose_runner_is_gone_stops_before_it_starts() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).display().to_string();
    let out = std::process::Command::new(crate::support::bin())
        .args(["agent", "--task", &p("task.json"), "--workspace", &p("ws")])
        .args(["--baseline", &p("code.tar.zst"), "--out", &p("out")])
        // pid 1 is never this test's child's parent.
        .env("PATCHFLOW_PARENT_PID", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the runner that started this agent (pid 1) is gone"),
        "{stderr}"
    );
    // Not a number: ignored, and the agent goes on to its own checks.
    let out = std::process::Command::new(crate::support::bin())
        .args(["agent", "--task", &p("task.json"), "--workspace", &p("ws")])
        .args(["--baseline", &p("code.tar.zst"), "--out", &p("out")])
        .env("PATCHFLOW_PARENT_PID", "1; kill -9 -1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot read"), "{stderr}");
}
