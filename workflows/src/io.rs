//! Inputs and outputs that cross the workflow/activity boundary. They are serialised into
//! Temporal's history, so fields are only ever added (with defaults), never renamed, and a
//! field's serialised form never changes: a [`TaskId`] is written as the plain string the
//! `String` it replaced was, so histories recorded before still replay.

use patchflow_core::{AgentSummary, TaskId, TaskSource, TaskSpec, TaskStatus};
use serde::{Deserialize, Serialize};

/// Knobs the gateway fixes when it starts a workflow (the workflow cannot read config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkflowSettings {
    /// Attempts per activity before the task fails.
    pub activity_max_attempts: u32,
    /// How long `run_agent` may go without a heartbeat before Temporal retries it elsewhere.
    pub heartbeat_timeout_secs: u64,
    /// First retry interval of activities, in milliseconds.
    pub retry_initial_interval_ms: u64,
    /// Most tasks of one batch running the agent at once, across workers; 0: no limit.
    /// Only tasks with a `batch_id` take a slot.
    pub batch_concurrency: u32,
    /// Most tasks of this task's tenant past QUEUED at once (its `max_running` quota, set
    /// by the gateway per task); 0: no limit. (Absent from histories recorded before.)
    #[serde(default)]
    pub tenant_max_running: u32,
    /// How long an ended task waits for a follow-up message before its workflow completes
    /// (seconds; 0: at once). (Absent from histories recorded before: 0.)
    #[serde(default)]
    pub followup_idle_secs: u64,
    /// Continue as new once the history holds this many events; 0: only when Temporal
    /// suggests it.
    #[serde(default)]
    pub continue_as_new_events: u32,
    /// The task queue `run_agent` is scheduled on (the agents' own, whose worker slots
    /// bound the agents a worker runs); unset: the workflow's. (Absent from histories
    /// recorded before.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_task_queue: Option<String>,
}

impl Default for WorkflowSettings {
    fn default() -> Self {
        Self {
            activity_max_attempts: 3,
            heartbeat_timeout_secs: 10,
            retry_initial_interval_ms: 1000,
            batch_concurrency: 0,
            tenant_max_running: 0,
            followup_idle_secs: 0,
            continue_as_new_events: 0,
            agent_task_queue: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodeTaskInput {
    pub task_id: TaskId,
    pub spec: TaskSpec,
    #[serde(default)]
    pub settings: WorkflowSettings,
    /// Set when this run carries on a conversation (continue-as-new, or a message to a
    /// task whose workflow had closed): it waits for the next turn instead of starting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continuation: Option<Continuation>,
}

/// Where a conversation stands when a new run carries it on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Continuation {
    /// The last turn that ran.
    pub turns: u32,
    /// How it ended (COMPLETED or FAILED).
    pub status: TaskStatus,
    pub message: String,
    /// The commit the code was fetched at (a pull request goes on top of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The prepared workspace the agent starts from, when the task had a setup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared: Option<PreparedEnv>,
}

/// The `message` update: a follow-up turn's instruction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageInput {
    pub message: String,
}

/// The `message` update's answer: the turn the message starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnAccepted {
    pub turn: u32,
}

/// A follow-up turn of `run_agent`: it resumes the task's stored conversation and changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowUp {
    pub turn: u32,
    pub message: String,
}

/// `begin_turn`: a follow-up turn starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnStart {
    pub task_id: TaskId,
    pub turn: u32,
    pub message: String,
}

/// `record_candidate`: one candidate started or ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateUpdate {
    pub task_id: TaskId,
    pub candidate: u32,
    pub status: TaskStatus,
    /// The run's summary, when it produced one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<AgentSummary>,
    /// Why it failed or stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `publish_candidates`: every candidate ended; pick one (by `auto_select`) and end the task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishCandidatesInput {
    pub task_id: TaskId,
    /// Candidate numbers in the order they finished.
    pub finish_order: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodeTaskOutput {
    pub status: TaskStatus,
    pub message: String,
    pub summary: Option<AgentSummary>,
}

/// What the `status` query answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub status: TaskStatus,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusUpdate {
    pub task_id: TaskId,
    pub status: TaskStatus,
    pub message: String,
    /// The follow-up turn this write belongs to (a final status also ends the turn).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchInput {
    pub task_id: TaskId,
    pub source: TaskSource,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchOutput {
    /// The fetched tree on the worker that ran `fetch_code`.
    pub tree_dir: String,
    /// The commit checked out, for git sources.
    pub commit: Option<String>,
    pub files: u64,
    pub bytes: u64,
    /// The task queue only the worker that fetched polls, so `stage_code` runs where the
    /// tree is instead of fetching it again. (Absent from histories recorded before.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker_queue: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageInput {
    pub task_id: TaskId,
    pub source: TaskSource,
    /// Where `fetch_code` left the tree; fetched again if this worker does not have it.
    pub tree_dir: String,
    /// The tree's size as `fetch_code` measured it (what keeping it for a local run holds).
    #[serde(default)]
    pub tree_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageOutput {
    pub key: String,
    pub archive_bytes: u64,
    pub files: u64,
    /// The tree has the repository's own setup script (`.patchflow/setup.sh`).
    #[serde(default)]
    pub repo_setup: bool,
    /// The token of the copy this worker kept for a local agent ([`RunAgentInput::handoff`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<String>,
}

/// `prepare_environment`: set the staged code up (setup or maintenance script, the cache).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareInput {
    pub task_id: TaskId,
    pub spec: TaskSpec,
    /// The tree has `.patchflow/setup.sh` (used when the spec names no setup).
    pub repo_setup: bool,
}

/// The prepared workspace the agent starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedEnv {
    /// The workspace as setup left it (tar.zst): what the agent is restored from and its
    /// diff's baseline.
    pub baseline_key: String,
    /// The scripts' HOME entries named by `cache_paths` (tar.zst), restored into the
    /// agent's temp dir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home_key: Option<String>,
    /// The content-addressed cache key (None with `cache: false`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_key: Option<String>,
    pub cache_hit: bool,
    /// Wall time of the step, in milliseconds.
    pub millis: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunAgentInput {
    pub task_id: TaskId,
    pub spec: TaskSpec,
    /// The batch slot this run holds; a retry on another worker takes it again first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_slot: Option<SlotInput>,
    /// The prepared workspace, when the task has a setup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepared: Option<PreparedEnv>,
    /// Candidate `n` of a best-of-N task (its files go to `candidates/<n>/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<u32>,
    /// A follow-up turn (its files go to `turns/<t>/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub followup: Option<FollowUp>,
    /// The staging worker's local copy of the code ([`StageOutput::handoff`]): a local run
    /// on that worker starts from it instead of downloading the staged archive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handoff: Option<String>,
}

/// One task's slot in its batch (see `acquire_batch_slot`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotInput {
    pub task_id: TaskId,
    pub batch_id: String,
    /// How many tasks of the batch may hold a slot at once.
    pub limit: u32,
    /// How long the slot is held without renewal (seconds); unset: the worker's
    /// `batch_lease_secs`, renewed by the agent's heartbeats. A tenant's slot is held from
    /// before the fetch to the end, so it is leased for the whole task instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_secs: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishInput {
    pub task_id: TaskId,
    pub summary: AgentSummary,
    /// The commit `fetch_code` checked out: a pull request's commit goes on top of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// A follow-up turn's results (in `turns/<t>/`), published as the task's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub turn: Option<u32>,
}

/// `open_pull_request`: the task, and a new token (sealed) to use instead of its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullRequestInput {
    pub task_id: TaskId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub github_token: Option<patchflow_core::GitToken>,
}

/// The pull request's URL, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullRequestOutput {
    pub pr_url: Option<String>,
    pub pr_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishOutput {
    pub status: TaskStatus,
    pub message: String,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// Histories recorded while task ids were `String`s must decode, and new inputs must
    /// read the same to workers and tools that still expect a string.
    #[test]
    fn a_task_id_crosses_the_history_as_a_plain_string() {
        let id: TaskId = "tsk_0192abc".parse().unwrap();
        let update = StatusUpdate {
            task_id: id.clone(),
            status: TaskStatus::Queued,
            message: "waiting for a worker".into(),
            turn: None,
        };
        let json = serde_json::to_value(&update).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "task_id": "tsk_0192abc",
                "status": "QUEUED",
                "message": "waiting for a worker"
            })
        );
        let slot: SlotInput = serde_json::from_value(serde_json::json!({
            "task_id": "tsk_0192abc", "batch_id": "b1", "limit": 2
        }))
        .unwrap();
        assert_eq!(slot.task_id, id);
    }
}
