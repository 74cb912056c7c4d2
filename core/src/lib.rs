//! patchflow's domain model: what a task is, the states it moves through, what the agent
//! reports, and the typed configuration. No I/O lives here, so every other crate (gateway,
//! workflows, activities, agent) can share these types without pulling infrastructure.

pub mod auth;
pub mod config;
pub mod conversation;
pub mod environment;
pub mod error;
pub mod event;
pub mod secret;
pub mod summary;
pub mod task;
pub mod trace;
pub mod usage;

pub use config::Config;

pub use conversation::{AutoSelect, CandidateRecord, TurnRecord};
pub use error::{CoreError, ValidationError};
pub use event::{AgentEvent, TaskEvent, TaskEventKind};
pub use secret::Secret;
pub use summary::{AgentOutcome, AgentSummary, SandboxReport};
pub use task::{
    GitToken, IssueRef, Limits, SecretHeader, TaskAttempt, TaskId, TaskRecord, TaskSource,
    TaskSpec, TaskStatus, ToolPolicy, Usd,
};
pub use trace::TRACE_TARGET;
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
    /// The conversation the agent ends with (what a follow-up turn resumes).
    pub const CONVERSATION: &str = "conversation.json";
    /// The workspace's changes against the code the run started from (every changed file's
    /// content, and the deleted paths): what a follow-up turn's workspace is rebuilt from.
    pub const CHANGES: &str = "changes.tar.zst";
    /// A follow-up turn's own change (`diff.patch` is the cumulative one).
    pub const TURN_DIFF: &str = "turn.patch";
    /// Every file a run writes, in upload order: the summary last, since its presence says
    /// the run's files are complete.
    pub const RUN_FILES: [&str; 7] = [
        DIFF,
        TRANSCRIPT,
        AGENT_LOG,
        CONVERSATION,
        CHANGES,
        TURN_DIFF,
        SUMMARY,
    ];

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
    /// Where one agent run's files go: the task's own results for its first (or only)
    /// agent, `candidates/<n>/` for candidate `n` of a best-of-N task, `turns/<t>/` for
    /// follow-up turn `t`. A published candidate or turn is copied to the task's own keys.
    pub fn run_prefix(task: &TaskId, turn: u32, candidate: Option<u32>) -> String {
        match (turn, candidate) {
            (t, _) if t > 1 => format!("results/{task}/turns/{t}/"),
            (_, Some(n)) => format!("results/{task}/candidates/{n}/"),
            _ => results_prefix(task),
        }
    }
    /// A candidate's result file.
    pub fn candidate_key(task: &TaskId, candidate: u32, file: &str) -> String {
        format!("{}{file}", run_prefix(task, 1, Some(candidate)))
    }
    /// A turn's own result file (`turns/1/` holds turn 1's once a second turn ran).
    pub fn turn_key(task: &TaskId, turn: u32, file: &str) -> String {
        format!("results/{task}/turns/{turn}/{file}")
    }
}
