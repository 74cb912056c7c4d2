//! What one agent run produced, as written to `results/<task>/summary.json`.

use serde::{Deserialize, Serialize};

/// How an agent run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentOutcome {
    /// The model called `finish`.
    Finished,
    /// The model answered without calling a tool.
    Answered,
    /// The step budget ran out first.
    MaxSteps,
    /// The token budget ran out first.
    MaxTokens,
    /// The wall-clock budget ran out first.
    WallTime,
    /// The run could not go on (model endpoint down, bad workspace).
    Error,
}

impl AgentOutcome {
    /// Whether the task counts as COMPLETED.
    pub fn is_success(self) -> bool {
        matches!(self, Self::Finished | Self::Answered)
    }

    pub fn describe(self) -> &'static str {
        match self {
            Self::Finished => "the agent finished",
            Self::Answered => "the agent answered without a tool call",
            Self::MaxSteps => "the agent reached max_steps before finishing",
            Self::MaxTokens => "the agent reached max_tokens before finishing",
            Self::WallTime => "the agent ran out of wall time before finishing",
            Self::Error => "the agent stopped on an error",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSummary {
    pub outcome: AgentOutcome,
    /// The model's own account (`finish(summary)` or its last answer).
    pub summary: String,
    pub model: String,
    pub steps: u32,
    pub tool_calls: u32,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub wall_ms: u64,
    /// Paths (relative to the repository root) that the diff touches.
    pub files_changed: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
