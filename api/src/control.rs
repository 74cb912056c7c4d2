//! The bodies that act on an existing task: `POST /api/tasks/{task_id}/retry` (also the
//! web page's Retry form and gRPC's `RetryTask`, through [`RetryMode`]) and
//! `POST /api/tasks/{task_id}/cancel`. The CLI's `retry` and `cancel` send them.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::error::{InvalidBody, from_json};

/// How a task is retried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RetryMode {
    /// A new run of the whole workflow.
    FromStart,
    /// A reset to just after the last completed step.
    #[default]
    FromFailedStep,
}

/// A retry mode that is neither of the two.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown retry mode `{0}` (from_start or from_failed_step)")]
pub struct UnknownRetryMode(pub String);

impl RetryMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FromStart => "from_start",
            Self::FromFailedStep => "from_failed_step",
        }
    }
}

impl std::str::FromStr for RetryMode {
    type Err = UnknownRetryMode;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "from_start" => Ok(Self::FromStart),
            "from_failed_step" => Ok(Self::FromFailedStep),
            other => Err(UnknownRetryMode(other.to_string())),
        }
    }
}

/// `{"mode": "from_start" | "from_failed_step"}`; an empty body is the default mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryBody {
    #[serde(default)]
    pub mode: RetryMode,
}

impl RetryBody {
    /// Reads the body as sent; nothing but whitespace means the default.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, InvalidBody> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self::default());
        }
        from_json(bytes)
    }
}

/// `{"reason": "..."}`; an empty body gives no reason. Other fields are ignored, as they
/// always were.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelBody {
    #[serde(default)]
    pub reason: String,
}

impl CancelBody {
    /// Reads the body as sent; an empty one means no reason.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, InvalidBody> {
        if bytes.is_empty() {
            return Ok(Self::default());
        }
        from_json(bytes)
    }
}

/// `POST /api/tasks/{task_id}/messages`: `{"message": "..."}`, the next turn's instruction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageBody {
    pub message: String,
}

/// How a follow-up is answered (`202`): the turn it became.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnAnswer {
    pub task_id: patchflow_core::TaskId,
    pub turn: u32,
}

/// `POST /api/tasks/{task_id}/select`: `{"candidate": N}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectBody {
    pub candidate: u32,
}
