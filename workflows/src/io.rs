//! Inputs and outputs that cross the workflow/activity boundary. They are serialised into
//! Temporal's history, so fields are only ever added (with defaults), never renamed.

use patchflow_core::{AgentSummary, TaskSource, TaskSpec, TaskStatus};
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
}

impl Default for WorkflowSettings {
    fn default() -> Self {
        Self {
            activity_max_attempts: 3,
            heartbeat_timeout_secs: 10,
            retry_initial_interval_ms: 1000,
            batch_concurrency: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CodeTaskInput {
    pub task_id: String,
    pub spec: TaskSpec,
    #[serde(default)]
    pub settings: WorkflowSettings,
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
    pub task_id: String,
    pub status: TaskStatus,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FetchInput {
    pub task_id: String,
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageInput {
    pub task_id: String,
    pub source: TaskSource,
    /// Where `fetch_code` left the tree; fetched again if this worker does not have it.
    pub tree_dir: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageOutput {
    pub key: String,
    pub archive_bytes: u64,
    pub files: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunAgentInput {
    pub task_id: String,
    pub spec: TaskSpec,
    /// The batch slot this run holds; a retry on another worker takes it again first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_slot: Option<SlotInput>,
}

/// One task's slot in its batch (see `acquire_batch_slot`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotInput {
    pub task_id: String,
    pub batch_id: String,
    /// How many tasks of the batch may hold a slot at once.
    pub limit: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishInput {
    pub task_id: String,
    pub summary: AgentSummary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishOutput {
    pub status: TaskStatus,
    pub message: String,
}
