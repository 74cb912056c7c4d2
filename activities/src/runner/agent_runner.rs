//! What every runner is: the [`AgentRunner`] trait the `run_agent` activity calls, and the
//! [`RunnerError`] it answers with.

use std::path::Path;

use async_trait::async_trait;
use patchflow_core::{AgentEvent, AgentSummary, TaskId, TaskSpec};
use patchflow_platform::ObjectStore;
use patchflow_workflows::io::{FollowUp, PreparedEnv};
use thiserror::Error;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Error)]
pub enum RunnerError {
    #[error("cancelled")]
    Cancelled,
    /// The input can never run (a bad spec); not retried.
    #[error("{0}")]
    BadInput(String),
    /// The attempt failed in a way a retry may fix (the agent crashed, a store hiccup).
    #[error("{0}")]
    Failed(String),
    #[error("object store: {0}")]
    Store(#[from] patchflow_platform::ObjectError),
    #[error("runner I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Which of a task's agent runs this is: its first agent, candidate `n` of a best-of-N
/// task, or a follow-up turn. It says where the run's files go
/// ([`patchflow_core::layout::run_prefix`]) and what a follow-up resumes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunTarget {
    pub candidate: Option<u32>,
    pub followup: Option<FollowUp>,
    /// The workflow run asking (a retried task's new run reuses attempt numbers; the kube
    /// runner annotates its Jobs with it, never the pod's environment).
    pub workflow_run: Option<String>,
    /// The staging worker's local copy of the code, by its token ([`crate::handoff`]): the
    /// local runner starts from it when it is on this worker; other runners ignore it.
    pub handoff: Option<String>,
}

impl RunTarget {
    pub fn turn(&self) -> u32 {
        self.followup.as_ref().map_or(1, |f| f.turn)
    }

    /// Where this run's files go.
    pub fn prefix(&self, task: &TaskId) -> String {
        patchflow_core::layout::run_prefix(task, self.turn(), self.candidate)
    }

    /// How its events are told apart in the task's history ("" for the task's one agent).
    pub fn label(&self) -> String {
        match (&self.followup, self.candidate) {
            (Some(f), _) => format!("turn {}: ", f.turn),
            (None, Some(n)) => format!("candidate {n}: "),
            (None, None) => String::new(),
        }
    }
}

#[async_trait]
pub trait AgentRunner: Send + Sync + 'static {
    /// Runs one attempt of `target` (the task's agent, a candidate or a follow-up turn),
    /// from the `prepared` workspace when the task had a setup (else from the staged code),
    /// its files stored under [`RunTarget::prefix`]. `work` is a directory private to this
    /// attempt. Progress goes to `events`; `cancel` asks the run to stop, and the runner
    /// returns [`RunnerError::Cancelled`] only once the agent is gone.
    // Each argument is a different concern the activity hands over; a struct of them
    // would only move the list.
    #[allow(clippy::too_many_arguments)]
    async fn run_target(
        &self,
        target: &RunTarget,
        task: &TaskId,
        spec: &TaskSpec,
        prepared: Option<&PreparedEnv>,
        objects: &dyn ObjectStore,
        work: &Path,
        events: UnboundedSender<AgentEvent>,
        cancel: CancellationToken,
    ) -> Result<AgentSummary, RunnerError>;

    /// Whether the agent runs on this worker's machine, where `stage_code` can keep the
    /// staged code for it ([`crate::handoff`]).
    fn runs_on_this_machine(&self) -> bool {
        false
    }

    /// [`AgentRunner::run_target`] for the task's one agent.
    #[allow(clippy::too_many_arguments)]
    async fn run(
        &self,
        task: &TaskId,
        spec: &TaskSpec,
        prepared: Option<&PreparedEnv>,
        objects: &dyn ObjectStore,
        work: &Path,
        events: UnboundedSender<AgentEvent>,
        cancel: CancellationToken,
    ) -> Result<AgentSummary, RunnerError> {
        self.run_target(
            &RunTarget::default(),
            task,
            spec,
            prepared,
            objects,
            work,
            events,
            cancel,
        )
        .await
    }
}
