//! Replays recorded histories of real `CodeTask` runs against today's workflow code, so a
//! change that would break the workflows already running or retried (a step added, removed
//! or moved, a status write reordered, an input that no longer decodes) fails here, in CI,
//! rather than on a worker that picks up an old run.
//!
//! The histories under `tests/histories/` are tasks run once on a Temporal dev server by the
//! end-to-end harness (`tests/support/mod.rs` at the root: the demo repository and the demo
//! script, the scripted model failing every request for the failed run), fetched with the
//! client (`WorkflowHandle::fetch_history`) and written with `WorkflowHistory::to_json`, the
//! SDK's own JSON, which is what `WorkflowHistory::from_json` reads back (the `temporal`
//! CLI prints the protobuf JSON mapping instead, which this SDK does not read):
//!
//! - `completed.json`: a task that ran through to COMPLETED;
//! - `failed.json`: a task whose agent kept failing (FAILED after run_agent's retries);
//! - `retried_from_failed_step.json`: that task after `POST /api/tasks/{id}/retry`, the run
//!   Temporal's reset started (fetch and stage replayed, the agent run again, COMPLETED);
//! - `cancelled.json`: a task cancelled while the agent waited for the model.
//!
//! A deliberate change to the workflow's steps makes these fail: keep the old shape working
//! for runs in flight (or version the change), then record the histories again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use patchflow_workflows::CodeTask;
use temporalio_client::WorkflowHistory;
use temporalio_sdk::workflow_replayer::{
    WorkflowReplayError, WorkflowReplayFailure, WorkflowReplayer, WorkflowReplayerOptions,
};

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/histories")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

async fn replay(history_json: &[u8]) -> Result<(), WorkflowReplayError> {
    let history = WorkflowHistory::from_json(history_json).expect("a history in Temporal's JSON");
    let options = WorkflowReplayerOptions::new()
        .register_workflow::<CodeTask>()
        .expect("CodeTask registers")
        .build();
    WorkflowReplayer::new(options)
        .expect("a replayer")
        .replay_workflow(history)
        .await
}

async fn replays(name: &str) {
    if let Err(e) = replay(&fixture(name)).await {
        panic!("{name} no longer replays against the workflow: {e}");
    }
}

#[tokio::test]
async fn a_completed_task_replays() {
    replays("completed.json").await;
}

#[tokio::test]
async fn a_task_that_failed_in_the_agent_step_replays() {
    replays("failed.json").await;
}

#[tokio::test]
async fn a_task_retried_from_the_failed_step_replays() {
    replays("retried_from_failed_step.json").await;
}

#[tokio::test]
async fn a_task_cancelled_while_the_agent_ran_replays() {
    replays("cancelled.json").await;
}

/// The check bites: a history whose first step is not the one the workflow schedules (as
/// after a change that reorders or renames steps) is refused as nondeterministic.
#[tokio::test]
async fn a_history_with_a_different_step_is_refused() {
    let mut history: serde_json::Value =
        serde_json::from_slice(&fixture("completed.json")).unwrap();
    const NAME: &str = "/attributes/ActivityTaskScheduledEventAttributes/activity_type/name";
    let renamed = history["events"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .filter_map(|e| e.pointer_mut(NAME))
        .find(|name| *name == "fetch_code")
        .map(|name| *name = "fetch_code_renamed".into());
    assert!(renamed.is_some(), "completed.json schedules fetch_code");
    let err = replay(&serde_json::to_vec(&history).unwrap())
        .await
        .expect_err("a renamed step must not replay");
    assert!(
        matches!(
            err,
            WorkflowReplayError::Replay(WorkflowReplayFailure::Nondeterminism { .. })
        ),
        "{err}"
    );
}
