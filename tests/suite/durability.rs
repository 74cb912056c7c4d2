//! Durability: a worker killed with SIGKILL in the middle of `run_agent` loses nothing; a
//! new worker finishes the task, exactly once. Gateway and worker run as separate processes
//! against one Temporal, one database file and one object-store directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use patchflow_core::TaskStatus;

use crate::support::{Mode, Stack, demo_script, processes_mentioning};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_during_run_agent_completes_exactly_once() {
    let mut script = demo_script();
    // The model is slow on the second turn, so the kill lands inside run_agent.
    script.turns[1].delay_ms = 3_000;
    let mut stack = Stack::start(
        Mode::Split,
        script,
        &[("PATCHFLOW_HEARTBEAT_TIMEOUT_SECS", "3")],
    )
    .await;
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
    assert!(!processes_mentioning(&id).is_empty());
    stack.workers[0].kill9();
    // The agent dies with its worker (no orphan keeps running the old attempt).
    let deadline = Instant::now() + Duration::from_secs(10);
    while !processes_mentioning(&id).is_empty() {
        assert!(Instant::now() < deadline, "the agent outlived its worker");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    stack.start_worker();
    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "COMPLETED", "{r}\n{}", stack.logs());
    let (_, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert_eq!(diff, super::e2e::EXPECTED_DIFF);

    let statuses = stack.statuses(&id).await;
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == TaskStatus::Completed)
            .count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == TaskStatus::RunningAgent)
            .count(),
        1,
        "{statuses:?}"
    );
    // Temporal retried run_agent on the new worker.
    let attempts = stack.activity_attempts(&id, "run_agent");
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert!(attempts[0] >= 2, "{attempts:?}");
    let seen = stack.model.observed();
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    // The first attempt asked turns 1 and 2; the second attempt started over: 1..5.
    let turns: Vec<usize> = seen
        .bodies
        .iter()
        .map(|b| {
            b["messages"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|m| m["role"] == "assistant")
                .count()
                + 1
        })
        .collect();
    assert_eq!(turns, [1, 2, 1, 2, 3, 4, 5], "{turns:?}");
    let out = stack.temporal_cli(&[
        "workflow",
        "count",
        "--query",
        &format!("WorkflowId='{id}'"),
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Total: 1"));
}
