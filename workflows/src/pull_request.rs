//! The `OpenPullRequest` workflow: one `open_pull_request` step for a task that has
//! ended, started by `POST /api/tasks/{task_id}/pull-request` (and `patchflow pr`) to open
//! the pull request later, for instance after `pr_error` or with a new `github_token`.

use std::time::Duration;

use temporalio_common::RetryPolicy;
use temporalio_macros::{workflow, workflow_methods};
use temporalio_sdk::{ActivityOptions, WorkflowContext, WorkflowResult};

use crate::io::{PullRequestInput, PullRequestOutput};
use crate::steps::Steps;

#[workflow]
#[derive(Default)]
pub struct OpenPullRequest;

#[workflow_methods]
impl OpenPullRequest {
    #[run(name = "OpenPullRequest")]
    pub async fn run(
        ctx: &mut WorkflowContext<Self>,
        input: PullRequestInput,
    ) -> WorkflowResult<PullRequestOutput> {
        // The step retries the forge itself and records a refusal as `pr_error`; Temporal
        // retries only what failed around it (a store that could not be written).
        let options = ActivityOptions::with_start_to_close_timeout(Duration::from_secs(300))
            .retry_policy(
                RetryPolicy::builder()
                    .initial_interval(Duration::from_secs(1))
                    .maximum_attempts(3)
                    .build(),
            )
            .build();
        ctx.execute_activity(Steps::open_pull_request, input, options)
            .await
            .map_err(|e| {
                temporalio_sdk::ApplicationFailure::non_retryable(std::io::Error::other(
                    crate::workflow::root_cause(&e),
                ))
                .into()
            })
    }
}
