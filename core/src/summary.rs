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
    /// The cost budget (`limits.max_cost_usd`) ran out first.
    MaxCost,
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
            Self::MaxCost => "the agent reached max_cost_usd before finishing",
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
    /// Prompt tokens the provider served from its cache (part of `prompt_tokens`).
    #[serde(default)]
    pub cached_tokens: u64,
    /// Completion tokens spent on hidden reasoning (part of `completion_tokens`).
    #[serde(default)]
    pub reasoning_tokens: u64,
    /// What the model's answers cost, priced from the model table (0 when it names no
    /// prices), in US dollars.
    #[serde(default)]
    pub cost_usd: f64,
    /// Times the conversation was compacted to stay inside the context window.
    #[serde(default)]
    pub compactions: u32,
    pub wall_ms: u64,
    /// Paths (relative to the repository root) that the diff touches.
    pub files_changed: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the last test command the agent ran (pytest, cargo test, npm test, …)
    /// passed; `None` when it ran none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tests_passed: Option<bool>,
    /// The walls the run's shell commands ran under, as the sandbox probe found them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<SandboxReport>,
}

/// What the shell sandbox put up on this machine: printed by `patchflow doctor`, recorded
/// in each task's summary. `walls` names the mechanism: `namespaces` (bubblewrap: a
/// minimal root in fresh user, mount, PID, IPC and UTS namespaces) or `landlock` (the
/// best-effort fallback where namespaces are refused).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxReport {
    #[serde(default)]
    pub walls: String,
    /// Commands see a minimal root: system directories read-only, the workspace, their
    /// own /tmp, /dev and /proc; nothing else of the host.
    #[serde(default)]
    pub mount_namespace: bool,
    /// Commands see and can signal only their own processes, under a reaper as PID 1.
    #[serde(default)]
    pub pid_namespace: bool,
    /// Commands run as an unprivileged uid of a user namespace.
    #[serde(default)]
    pub user_namespace: bool,
    /// No capability is left (effective, permitted, bounding and ambient sets empty).
    #[serde(default)]
    pub no_capabilities: bool,
    /// A session of their own: no controlling terminal.
    #[serde(default)]
    pub new_session: bool,
    /// Landlock confines reads and writes (the fallback walls).
    #[serde(default)]
    pub landlock: bool,
    /// The network is off (an empty namespace, or Landlock's TCP rules), or allowed by policy.
    #[serde(default)]
    pub network_confined: bool,
    /// A pids cgroup bounds the number of processes.
    #[serde(default)]
    pub pids_cgroup: bool,
    /// A memory cgroup bounds the memory of a command.
    #[serde(default)]
    pub memory_cgroup: bool,
    #[serde(default)]
    pub no_new_privs: bool,
    #[serde(default)]
    pub rlimits: bool,
    /// The seccomp filters: socket families allow-listed, ptrace, keyctl, bpf, mount, new
    /// namespaces, io_uring and terminal injection refused.
    #[serde(default)]
    pub seccomp: bool,
    /// What could not be put up, in words.
    #[serde(default)]
    pub missing: Vec<String>,
}
