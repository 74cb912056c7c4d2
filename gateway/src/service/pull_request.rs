//! Opening a task's pull request after it ended (`POST /api/tasks/{id}/pull-request`,
//! `patchflow pr`): the gateway starts an `OpenPullRequest` workflow whose one step, on a
//! worker, pushes the diff and opens or updates the pull request, and waits for its answer.
//! Two requests at once join the same run (workflow id `<task_id>-pr`).

use std::time::Duration;

use patchflow_core::{GitToken, Secret, TaskId, TaskSource, TaskStatus};
use patchflow_workflows::OpenPullRequest;
use patchflow_workflows::io::{PullRequestInput, PullRequestOutput};
use temporalio_client::{WorkflowIdConflictPolicy, WorkflowIdReusePolicy, WorkflowStartOptions};

use super::TaskService;
use crate::auth::Principal;
use crate::error::ServiceError;

/// Longest the gateway waits for the step: a push and a few API calls.
const WAIT: Duration = Duration::from_secs(300);

impl TaskService {
    /// Opens (or updates) the pull request of an ended task, optionally with a new token.
    pub async fn open_pull_request(
        &self,
        who: &Principal,
        task_id: &TaskId,
        github_token: Option<Secret>,
    ) -> Result<PullRequestOutput, ServiceError> {
        who.must_write()?;
        let record = self.get_for(who, task_id).await?;
        if !matches!(record.spec.source, TaskSource::Git { .. }) {
            return Err(ServiceError::BadRequest(
                "a pull request needs a git source to push to (this task was a ZIP upload)".into(),
            ));
        }
        if record.status != TaskStatus::Completed {
            return Err(ServiceError::Conflict(format!(
                "task {task_id} is {}: only a COMPLETED task has a pull request to open",
                record.status
            )));
        }
        let github_token = match patchflow_api::submit::secret_token(github_token, "github_token")
            .map_err(ServiceError::from)?
        {
            Some(GitToken::Plain(t)) => Some(GitToken::Sealed(
                self.config()
                    .secrets
                    .seal(&t, task_id)
                    .map_err(ServiceError::Internal)?,
            )),
            other => other,
        };
        let input = PullRequestInput {
            task_id: task_id.clone(),
            github_token,
        };
        let options =
            WorkflowStartOptions::new(self.config().task_queue.clone(), format!("{task_id}-pr"))
                .id_conflict_policy(WorkflowIdConflictPolicy::UseExisting)
                .id_reuse_policy(WorkflowIdReusePolicy::AllowDuplicate)
                .build();
        let handle = self
            .temporal
            .start_workflow(OpenPullRequest::run, input, options)
            .await
            .map_err(|e| {
                ServiceError::Unavailable(format!(
                    "cannot start the pull request of task {task_id}: {e}"
                ))
            })?;
        let result = tokio::time::timeout(WAIT, handle.get_result(Default::default()))
            .await
            .map_err(|_| {
                ServiceError::Unavailable(format!(
                    "the pull request of task {task_id} took longer than {} s; see its events",
                    WAIT.as_secs()
                ))
            })?;
        result.map_err(|e| {
            let why = patchflow_workflows::root_cause(&e);
            ServiceError::Conflict(why)
        })
    }
}
