//! What every runner is: the [`AgentRunner`] trait the `run_agent` activity calls, and the
//! [`RunnerError`] it answers with.

use std::path::Path;

use async_trait::async_trait;
use patchflow_core::{AgentEvent, AgentSummary, TaskId, TaskSpec};
use patchflow_platform::ObjectStore;
use patchflow_workflows::io::PreparedEnv;
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

#[async_trait]
pub trait AgentRunner: Send + Sync + 'static {
    /// Runs one attempt, from the `prepared` workspace when the task had a setup (else
    /// from the staged code). `work` is a directory private to this attempt. Progress goes to
    /// `events`; `cancel` asks the run to stop, and the runner returns
    /// [`RunnerError::Cancelled`] only once the agent is gone.
    // Each argument is a different concern the activity hands over; a struct of them
    // would only move the list.
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
    ) -> Result<AgentSummary, RunnerError>;
}
