//! The task as the HTTP API shows it: [`TaskView`] answers `GET /api/tasks/{task_id}` (and
//! a retry), [`TaskPage`] `GET /api/tasks`, [`EventPage`] `GET /api/tasks/{task_id}/events`
//! without a stream, [`Health`] `GET /healthz`. The gateway writes them; the CLI
//! (`status`, `list`, `result --json`, `submit --wait`) and `patchflow batch` read them.
//! gRPC's `Task` message carries the same fields (gateway/src/grpc.rs).

use chrono::{DateTime, Utc};
use patchflow_core::{AgentSummary, Limits, TaskEvent, TaskId, TaskRecord, TaskStatus, ToolPolicy};
use serde::{Deserialize, Serialize};

/// The task record as `GET /api/tasks/{task_id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub task_id: TaskId,
    pub status: TaskStatus,
    pub message: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub pr_url: Option<String>,
    /// Why the pull request asked for could not be opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr_error: Option<String>,
    pub summary: Option<AgentSummary>,
    pub source: String,
    pub task_description: String,
    pub target_file: Option<String>,
    pub model: Option<String>,
    pub limits: Limits,
    /// What the agent's tools may reach (network, hosts, secret headers by name).
    #[serde(default, skip_serializing_if = "ToolPolicy::is_default")]
    pub policy: ToolPolicy,
    pub tenant: String,
    pub batch_id: Option<String>,
    /// The key the task was submitted with (a Kafka message's key; a batch's instance).
    pub idempotency_key: Option<String>,
    /// The current attempt (1 until the task is retried) and every attempt's outcome.
    pub attempt: u32,
    pub attempts: Vec<AttemptView>,
    /// The conversation: turn 1 is the task as submitted, each follow-up adds one.
    #[serde(default)]
    pub turns: Vec<patchflow_core::TurnRecord>,
    /// A best-of-N task's candidates (empty for a task with one agent).
    #[serde(default)]
    pub candidates: Vec<patchflow_core::CandidateRecord>,
    /// The candidate whose results are the task's (`None` until chosen).
    #[serde(default)]
    pub selected: Option<u32>,
    pub links: Links,
}

/// One attempt of a task, as the record shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptView {
    pub attempt: u32,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub status: TaskStatus,
    pub message: String,
    /// The worker that ran the attempt's agent (`patchflow@host:pid`), once one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

/// Where the task's result files, events and workflow are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Links {
    pub diff: String,
    pub transcript: String,
    pub log: String,
    pub events: String,
    /// The workflow in Temporal's Web UI, when the gateway knows its address.
    pub workflow: Option<String>,
}

impl TaskView {
    /// The view of a record; `workflow` is the Web UI link of its workflow, if any.
    pub fn new(r: TaskRecord, workflow: Option<String>) -> Self {
        let base = format!("/api/tasks/{}", r.task_id);
        let turns = Self::turns_of(&r);
        Self {
            links: Links {
                diff: format!("{base}/diff"),
                transcript: format!("{base}/transcript"),
                log: format!("{base}/log"),
                events: format!("{base}/events"),
                workflow,
            },
            source: r.spec.source.display_name(),
            task_description: r.spec.task_description,
            target_file: r.spec.target_file,
            model: r.spec.model,
            limits: r.spec.limits,
            policy: r.spec.policy,
            task_id: r.task_id,
            status: r.status,
            message: r.message,
            created_at: r.created_at,
            updated_at: r.updated_at,
            pr_url: r.pr_url,
            pr_error: r.pr_error,
            summary: r.summary,
            tenant: r.tenant,
            batch_id: r.batch_id,
            idempotency_key: r.idempotency_key,
            attempt: r.attempt,
            attempts: r
                .attempts
                .into_iter()
                .map(|a| AttemptView {
                    attempt: a.attempt,
                    started_at: a.started_at,
                    finished_at: a.finished_at,
                    status: a.status,
                    message: a.message,
                    worker: a.worker,
                })
                .collect(),
            turns,
            candidates: r.candidates,
            selected: r.selected,
        }
    }
}

impl TaskView {
    /// The turns a record shows: its stored ones, or before any follow-up the task as
    /// submitted (the store lists turns once a follow-up adds the second).
    pub fn turns_of(r: &TaskRecord) -> Vec<patchflow_core::TurnRecord> {
        if !r.turns.is_empty() {
            return r.turns.clone();
        }
        vec![patchflow_core::TurnRecord {
            turn: 1,
            message: r.spec.task_description.clone(),
            status: r.status,
            summary: r
                .summary
                .as_ref()
                .map(|s| s.summary.clone())
                .unwrap_or_default(),
            started_at: r.created_at,
            finished_at: r.status.is_terminal().then_some(r.updated_at),
        }]
    }
}

/// One page of `GET /api/tasks`, newest first; `next_cursor` asks for the next one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskPage {
    pub tasks: Vec<TaskView>,
    pub next_cursor: Option<String>,
}

/// A task's history as JSON (the same events the live stream sends one by one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventPage {
    pub task_id: TaskId,
    pub events: Vec<TaskEvent>,
}

/// `GET /healthz`: `ok`, or `degraded` with why the cache is not answering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
}
