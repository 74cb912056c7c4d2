//! A task as a conversation and a race: its follow-up turns ([`TurnRecord`]) and its
//! best-of-N candidates ([`CandidateRecord`], [`AutoSelect`]).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{TaskStatus, ValidationError};

/// Most candidates one task may run (`candidates` on submit; a tenant's quota may cap it lower).
pub const MAX_CANDIDATES: u32 = 8;
/// Longest follow-up message accepted: a prompt, like a task description.
pub const MAX_MESSAGE_BYTES: usize = crate::task::MAX_DESCRIPTION_BYTES;

/// One turn of a task's conversation: turn 1 is the task as submitted, each follow-up
/// message (`POST /api/tasks/{id}/messages`) adds one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnRecord {
    pub turn: u32,
    /// What the user asked in this turn (turn 1: the task description).
    pub message: String,
    /// RUNNING_AGENT while it runs, then COMPLETED, FAILED or CANCELLED.
    pub status: TaskStatus,
    /// The agent's account of the turn (`finish(summary)` or its last answer).
    #[serde(default)]
    pub summary: String,
    pub started_at: DateTime<Utc>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
}

/// One of a best-of-N task's agents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateRecord {
    /// 1 to `candidates`.
    pub candidate: u32,
    /// RUNNING_AGENT while it runs, then COMPLETED, FAILED or CANCELLED.
    pub status: TaskStatus,
    #[serde(default)]
    pub summary: String,
    #[serde(default)]
    pub files_changed: Vec<String>,
    #[serde(default)]
    pub cost_usd: f64,
    /// Why it failed or stopped, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Bytes of its diff (what `smallest_passing` compares).
    #[serde(default)]
    pub diff_bytes: u64,
    /// Whether the last test command it ran passed (`None`: it ran none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests_passed: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

/// How a best-of-N task chooses its candidate without being asked (`auto_select`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AutoSelect {
    /// The first candidate to finish successfully; the others are stopped.
    FirstFinished,
    /// The smallest diff among the successful candidates whose last test run passed.
    SmallestPassing,
}

impl AutoSelect {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FirstFinished => "first_finished",
            Self::SmallestPassing => "smallest_passing",
        }
    }
}

impl fmt::Display for AutoSelect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for AutoSelect {
    type Err = ValidationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "first_finished" => Ok(Self::FirstFinished),
            "smallest_passing" => Ok(Self::SmallestPassing),
            other => Err(ValidationError::new(
                "auto_select",
                format!("unknown `{other}` (first_finished or smallest_passing)"),
            )),
        }
    }
}

/// A follow-up message as given: not blank, at most [`MAX_MESSAGE_BYTES`], no NUL.
pub fn validate_message(message: &str) -> Result<(), ValidationError> {
    if message.trim().is_empty() {
        return Err(ValidationError::new(
            "message",
            "is required and must not be blank",
        ));
    }
    if message.len() > MAX_MESSAGE_BYTES {
        return Err(ValidationError::new(
            "message",
            format!("is longer than {MAX_MESSAGE_BYTES} bytes"),
        ));
    }
    if message.contains('\0') {
        return Err(ValidationError::new("message", "contains a NUL byte"));
    }
    Ok(())
}

/// The candidate `rule` picks among `candidates` (ended ones), given the order they
/// finished in (`finish_order`, candidate numbers). `None` when none qualifies.
pub fn auto_pick(
    rule: AutoSelect,
    candidates: &[CandidateRecord],
    finish_order: &[u32],
) -> Option<u32> {
    let ok = |c: &&CandidateRecord| c.status == TaskStatus::Completed;
    match rule {
        AutoSelect::FirstFinished => finish_order
            .iter()
            .copied()
            .find(|n| candidates.iter().filter(ok).any(|c| c.candidate == *n)),
        AutoSelect::SmallestPassing => candidates
            .iter()
            .filter(ok)
            .filter(|c| c.tests_passed == Some(true))
            .min_by_key(|c| (c.diff_bytes, c.candidate))
            .map(|c| c.candidate),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn cand(n: u32, status: TaskStatus, bytes: u64, tests: Option<bool>) -> CandidateRecord {
        CandidateRecord {
            candidate: n,
            status,
            summary: String::new(),
            files_changed: vec![],
            cost_usd: 0.0,
            error: None,
            diff_bytes: bytes,
            tests_passed: tests,
            finished_at: None,
        }
    }

    #[test]
    fn first_finished_takes_the_earliest_success_and_smallest_passing_the_smallest_tested_diff() {
        use TaskStatus::*;
        let c = [
            cand(1, Completed, 300, Some(true)),
            cand(2, Failed, 10, Some(true)),
            cand(3, Completed, 200, Some(false)),
            cand(4, Completed, 250, Some(true)),
        ];
        assert_eq!(
            auto_pick(AutoSelect::FirstFinished, &c, &[2, 3, 1, 4]),
            Some(3),
            "2 failed"
        );
        assert_eq!(auto_pick(AutoSelect::SmallestPassing, &c, &[]), Some(4));
        let none = [cand(1, Completed, 1, None), cand(2, Failed, 1, Some(true))];
        assert_eq!(auto_pick(AutoSelect::SmallestPassing, &none, &[1, 2]), None);
        assert_eq!(auto_pick(AutoSelect::FirstFinished, &none, &[2]), None);
    }

    #[test]
    fn auto_select_and_messages_are_checked() {
        assert_eq!(
            "smallest_passing".parse::<AutoSelect>().unwrap(),
            AutoSelect::SmallestPassing
        );
        assert!(
            "fastest"
                .parse::<AutoSelect>()
                .unwrap_err()
                .reason
                .contains("first_finished")
        );
        assert!(validate_message("  ").is_err());
        assert!(validate_message("a\0b").is_err());
        assert!(validate_message(&"x".repeat(MAX_MESSAGE_BYTES + 1)).is_err());
        assert!(validate_message("now add a test").is_ok());
    }
}
