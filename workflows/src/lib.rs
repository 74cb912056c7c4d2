//! The `CodeTask` workflow: deterministic orchestration only. It knows the activities by
//! their declarations in [`steps`] (names and types, no I/O); the `patchflow-activities`
//! crate implements them. Everything here must replay identically, so no clocks, no I/O,
//! no randomness outside the workflow context.

pub mod io;
mod pull_request;
pub mod steps;
mod workflow;

pub use io::{
    CodeTaskInput, CodeTaskOutput, Continuation, MessageInput, StatusView, TurnAccepted,
    WorkflowSettings,
};
pub use pull_request::OpenPullRequest;
pub use workflow::{CodeTask, root_cause};

/// The workflow type name other SDKs, the CLI and the Web UI see.
pub const WORKFLOW_TYPE: &str = "CodeTask";
/// The signal that asks a task to stop.
pub const CANCEL_SIGNAL: &str = "cancel";
/// The query that answers the task's current status.
pub const STATUS_QUERY: &str = "status";
/// The update that sends a follow-up message (refused while a turn runs).
pub const MESSAGE_UPDATE: &str = "message";
/// The signal that ends a conversation's wait for follow-ups (a retry sends it).
pub const CLOSE_SIGNAL: &str = "close";
