//! Progress events: what the agent reports while it runs, and what the task store keeps.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::summary::AgentOutcome;
use crate::task::TaskStatus;

/// One line the agent writes to its standard output while it works. The runner relays them
/// to the task's event stream and into its Temporal heartbeats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum AgentEvent {
    Started {
        model: String,
        max_steps: u32,
    },
    ModelRequest {
        step: u32,
    },
    ToolCall {
        step: u32,
        tool: String,
        /// The arguments, cut to a short preview.
        arguments: String,
    },
    ToolResult {
        step: u32,
        tool: String,
        ok: bool,
        duration_ms: u64,
    },
    Finished {
        outcome: AgentOutcome,
        steps: u32,
    },
    /// Where the agent's pod is, as the Kubernetes runner sees it (`Pending: Unschedulable`,
    /// `Running`, …); sent when it changes. The agent itself never prints this.
    Pod {
        phase: String,
    },
}

impl AgentEvent {
    /// One human line, for `submit --wait` and logs.
    pub fn describe(&self) -> String {
        match self {
            Self::Started { model, max_steps } => {
                format!("agent started (model {model}, up to {max_steps} steps)")
            }
            Self::ModelRequest { step } => format!("step {step}: asking the model"),
            Self::ToolCall {
                step,
                tool,
                arguments,
            } => format!("step {step}: {tool} {arguments}"),
            Self::ToolResult {
                step,
                tool,
                ok,
                duration_ms,
            } => format!(
                "step {step}: {tool} {} in {duration_ms} ms",
                if *ok { "ok" } else { "returned an error" }
            ),
            Self::Finished { outcome, steps } => {
                format!("{} after {steps} steps", outcome.describe())
            }
            Self::Pod { phase } => format!("agent pod: {phase}"),
        }
    }
}

/// One entry of a task's history: a status change or an agent progress line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEvent {
    /// Increases per task; a reader resumes after the last one it saw.
    pub seq: i64,
    pub kind: TaskEventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<TaskStatus>,
    pub message: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskEventKind {
    Status,
    Agent,
}

impl TaskEventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Agent => "agent",
        }
    }
}
