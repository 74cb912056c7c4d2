//! patchflow's domain model: what a task is, the states it moves through, what the agent
//! reports, and the typed configuration. No I/O lives here, so every other crate (gateway,
//! workflows, activities, agent) can share these types without pulling infrastructure.

pub mod auth;
pub mod config;
pub mod environment;
pub mod error;
pub mod event;
pub mod secret;
pub mod summary;
pub mod task;
pub mod usage;

pub use config::Config;
pub use error::{CoreError, ValidationError};
pub use event::{AgentEvent, TaskEvent, TaskEventKind};
pub use secret::Secret;
pub use summary::{AgentOutcome, AgentSummary, SandboxReport};
pub use task::{
    GitToken, IssueRef, Limits, SecretHeader, TaskAttempt, TaskId, TaskRecord, TaskSource,
    TaskSpec, TaskStatus, ToolPolicy, Usd,
};
pub use usage::{UsageRow, UsageTotal};

/// Object keys of the layout in ARCHITECTURE.md, in one place so no crate spells them twice.
pub mod layout {
    use crate::TaskId;

    /// Names of the files the agent writes and `publish_result` uploads.
    pub const DIFF: &str = "diff.patch";
    pub const TRANSCRIPT: &str = "transcript.jsonl";
    pub const AGENT_LOG: &str = "agent.log";
    pub const SUMMARY: &str = "summary.json";
    /// Every result file, in the order a reader wants them.
    pub const RESULT_FILES: [&str; 4] = [DIFF, TRANSCRIPT, AGENT_LOG, SUMMARY];

    pub fn upload_key(task: &TaskId) -> String {
        format!("uploads/{task}/source.zip")
    }
    pub fn staged_key(task: &TaskId) -> String {
        format!("staged/{task}/code.tar.zst")
    }
    /// The workspace a setup prepared, which the agent started from instead of the staged
    /// code when the task had a setup.
    pub fn prepared_key(task: &TaskId) -> String {
        format!("staged/{task}/prepared.tar.zst")
    }
    /// The setup's HOME cache paths, restored into the agent's HOME.
    pub fn prepared_home_key(task: &TaskId) -> String {
        format!("staged/{task}/home.tar.zst")
    }
    pub fn result_key(task: &TaskId, file: &str) -> String {
        format!("results/{task}/{file}")
    }
    /// The copy of one attempt's result file, kept when the attempt's result is published
    /// (a later attempt overwrites `result_key`'s).
    pub fn attempt_result_key(task: &TaskId, attempt: u32, file: &str) -> String {
        format!("results/{task}/attempts/{attempt}/{file}")
    }
    pub fn results_prefix(task: &TaskId) -> String {
        format!("results/{task}/")
    }
}
