//! The `CodeTask` workflow.
//!
//! ```text
//! QUEUED -> DOWNLOADING_CODE (fetch_code) -> STAGING_CODE (stage_code)
//!        [acquire_batch_slot] [-> PREPARING_ENVIRONMENT (prepare_environment), with a setup]
//!        -> RUNNING_AGENT (run_agent) -> UPLOADING_RESULTS (publish_result)
//!        -> COMPLETED | FAILED | CANCELLED
//! ```
//!
//! The workflow writes every transition through the `record_status` local activity, so the task
//! store follows the workflow whatever moved it: a normal run, a retry, or a reset done by
//! hand in the Temporal Web UI. A `cancel` signal (or a Temporal cancellation) stops the
//! step in flight; `run_agent` waits until its process is gone before the task is CANCELLED.
//!
//! A task of a batch with a concurrency limit takes a batch slot before it records
//! RUNNING_AGENT and gives it back after it recorded the status that follows, so the
//! recorded RUNNING_AGENT spans of a batch never overlap more than the limit allows.

use std::time::Duration;

use patchflow_core::{AgentSummary, TaskId, TaskStatus};
use temporalio_common::data_converters::TemporalDeserializable;
use temporalio_common::{ActivityDefinition, RetryPolicy};
use temporalio_macros::{workflow, workflow_methods};
use temporalio_sdk::{
    ActivityCancellationType, ActivityExecutionError, ActivityOptions, LocalActivityOptions,
    SyncWorkflowContext, WorkflowCancellationToken, WorkflowContext, WorkflowContextView,
    WorkflowResult, WorkflowTermination,
};

use crate::io::{
    CodeTaskInput, CodeTaskOutput, FetchInput, PrepareInput, PublishInput, RunAgentInput,
    SlotInput, StageInput, StatusUpdate, StatusView, WorkflowSettings,
};
use crate::steps::Steps;

#[workflow]
#[derive(Default)]
pub struct CodeTask {
    status: Option<TaskStatus>,
    message: String,
    cancel_reason: Option<String>,
}

/// Why a task stops before its results are published: the final status and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum EarlyEnd {
    /// A step failed (after its retries); the message is the step's own words.
    Failed(String),
    /// A cancel signal or a Temporal cancellation; the message is the reason.
    Cancelled(String),
}

impl EarlyEnd {
    fn status(&self) -> TaskStatus {
        match self {
            Self::Failed(_) => TaskStatus::Failed,
            Self::Cancelled(_) => TaskStatus::Cancelled,
        }
    }

    fn message(&self) -> &str {
        match self {
            Self::Failed(m) | Self::Cancelled(m) => m,
        }
    }

    /// How the workflow run itself ends, so the Temporal UI shows the same outcome as the
    /// task record (and offers Reset on a failure).
    fn termination(self) -> WorkflowTermination {
        match self {
            Self::Cancelled(_) => WorkflowTermination::cancelled(),
            Self::Failed(message) => failure(message),
        }
    }
}

/// A failed run; never retried by Temporal (the task's retry is the user's call).
fn failure(message: String) -> WorkflowTermination {
    temporalio_sdk::ApplicationFailure::non_retryable(std::io::Error::other(message)).into()
}

#[workflow_methods]
impl CodeTask {
    #[run(name = "CodeTask")]
    pub async fn run(
        ctx: &mut WorkflowContext<Self>,
        input: CodeTaskInput,
    ) -> WorkflowResult<CodeTaskOutput> {
        let task_id = input.task_id.clone();
        let settings = input.settings.clone();
        let spec = input.spec.clone();

        // A tenant with `max_running` holds a slot from here to the end; the task waits in
        // QUEUED for one (the wait says so in its events). Leased for the whole task: no
        // step before the agent's renews it.
        let tenant_slot = (settings.tenant_max_running > 0).then(|| SlotInput {
            task_id: task_id.clone(),
            batch_id: format!("tenant:{}", spec.tenant),
            limit: settings.tenant_max_running,
            lease_secs: Some(spec.limits.wall_seconds + 3600),
        });
        if let Some(s) = &tenant_slot {
            let opts =
                ActivityOptions::with_start_to_close_timeout(Duration::from_secs(7 * 24 * 3600))
                    .heartbeat_timeout(Duration::from_secs(settings.heartbeat_timeout_secs.max(1)))
                    .retry_policy(retry_policy(&settings))
                    .build();
            if let Err(end) = Self::step(ctx, Steps::acquire_batch_slot, s.clone(), opts).await {
                return Self::end_early(ctx, &task_id, end, &[s]).await;
            }
        }

        Self::record(
            ctx,
            &task_id,
            TaskStatus::DownloadingCode,
            &format!("fetching {}", spec.source.display_name()),
        )
        .await?;
        let fetch = FetchInput {
            task_id: task_id.clone(),
            source: spec.source.clone(),
        };
        let fetched =
            match Self::step(ctx, Steps::fetch_code, fetch, io_options(&settings, 600)).await {
                Ok(v) => v,
                Err(end) => {
                    return Self::end_early(ctx, &task_id, end, &held(None, tenant_slot.as_ref()))
                        .await;
                }
            };

        Self::record(
            ctx,
            &task_id,
            TaskStatus::StagingCode,
            &format!(
                "staging {} files ({} bytes){}",
                fetched.files,
                fetched.bytes,
                fetched
                    .commit
                    .as_deref()
                    .map(|c| format!(" at commit {c}"))
                    .unwrap_or_default()
            ),
        )
        .await?;
        let stage = StageInput {
            task_id: task_id.clone(),
            source: spec.source.clone(),
            tree_dir: fetched.tree_dir.clone(),
        };
        let staged =
            match Self::step(ctx, Steps::stage_code, stage, io_options(&settings, 600)).await {
                Ok(v) => v,
                Err(end) => {
                    return Self::end_early(ctx, &task_id, end, &held(None, tenant_slot.as_ref()))
                        .await;
                }
            };

        let slot = match (&spec.batch_id, settings.batch_concurrency) {
            (Some(batch), limit) if limit > 0 => Some(SlotInput {
                task_id: task_id.clone(),
                batch_id: batch.clone(),
                limit,
                lease_secs: None,
            }),
            _ => None,
        };
        if let Some(s) = &slot {
            // Waiting for a slot can take as long as the batch ahead takes; the heartbeat
            // notices a dead waiter.
            let opts =
                ActivityOptions::with_start_to_close_timeout(Duration::from_secs(7 * 24 * 3600))
                    .heartbeat_timeout(Duration::from_secs(settings.heartbeat_timeout_secs.max(1)))
                    .retry_policy(retry_policy(&settings))
                    .build();
            if let Err(end) = Self::step(ctx, Steps::acquire_batch_slot, s.clone(), opts).await {
                return Self::end_early(
                    ctx,
                    &task_id,
                    end,
                    &held(slot.as_ref(), tenant_slot.as_ref()),
                )
                .await;
            }
        }

        // With a setup (inline, saved, or the repository's own script), the environment is
        // prepared first; the agent then starts from the prepared workspace.
        let mut prepared = None;
        if spec.setup.is_some() || spec.environment.is_some() || staged.repo_setup {
            let what = match (&spec.setup, &spec.environment) {
                (Some(_), _) => "the task's setup".to_string(),
                (None, Some(name)) => format!("environment `{name}`"),
                (None, None) => "the repository's .patchflow/setup.sh".to_string(),
            };
            Self::record(
                ctx,
                &task_id,
                TaskStatus::PreparingEnvironment,
                &format!("preparing {what}"),
            )
            .await?;
            let input = PrepareInput {
                task_id: task_id.clone(),
                spec: spec.clone(),
                repo_setup: staged.repo_setup,
            };
            // Setup can take long (installs); the heartbeat notices a dead worker.
            let opts = ActivityOptions::with_start_to_close_timeout(Duration::from_secs(4 * 3600))
                .heartbeat_timeout(Duration::from_secs(settings.heartbeat_timeout_secs.max(1)))
                .cancellation_type(ActivityCancellationType::WaitCancellationCompleted)
                .retry_policy(retry_policy(&settings))
                .build();
            match Self::step(ctx, Steps::prepare_environment, input, opts).await {
                Ok(v) => prepared = Some(v),
                Err(end) => {
                    return Self::end_early(
                        ctx,
                        &task_id,
                        end,
                        &held(slot.as_ref(), tenant_slot.as_ref()),
                    )
                    .await;
                }
            }
        }

        Self::record(
            ctx,
            &task_id,
            TaskStatus::RunningAgent,
            &match &prepared {
                Some(p) => format!(
                    "running the agent on the prepared environment (cache {})",
                    if p.cache_hit { "hit" } else { "miss" }
                ),
                None => format!(
                    "running the agent on {} ({} bytes staged)",
                    staged.key, staged.archive_bytes
                ),
            },
        )
        .await?;
        let run = RunAgentInput {
            task_id: task_id.clone(),
            spec: spec.clone(),
            batch_slot: slot.clone(),
            prepared,
        };
        let agent_opts = ActivityOptions::with_start_to_close_timeout(Duration::from_secs(
            spec.limits.wall_seconds + 120,
        ))
        .heartbeat_timeout(Duration::from_secs(settings.heartbeat_timeout_secs.max(1)))
        .cancellation_type(ActivityCancellationType::WaitCancellationCompleted)
        .retry_policy(retry_policy(&settings))
        .build();
        let summary: AgentSummary = match Self::step(ctx, Steps::run_agent, run, agent_opts).await {
            Ok(v) => v,
            Err(end) => {
                return Self::end_early(
                    ctx,
                    &task_id,
                    end,
                    &held(slot.as_ref(), tenant_slot.as_ref()),
                )
                .await;
            }
        };

        Self::record(
            ctx,
            &task_id,
            TaskStatus::UploadingResults,
            &format!(
                "publishing results ({} after {} steps)",
                summary.outcome.describe(),
                summary.steps
            ),
        )
        .await?;
        if let Some(s) = &slot {
            Self::release_slot(ctx, s).await;
        }
        let publish = PublishInput {
            task_id: task_id.clone(),
            summary: summary.clone(),
            commit: fetched.commit.clone(),
        };
        let published = match Self::step(
            ctx,
            Steps::publish_result,
            publish,
            io_options(&settings, 120),
        )
        .await
        {
            Ok(v) => v,
            Err(end) => {
                return Self::end_early(ctx, &task_id, end, &held(None, tenant_slot.as_ref()))
                    .await;
            }
        };
        // The final status is stored: the tenant's next task may start.
        if let Some(s) = &tenant_slot {
            Self::release_slot(ctx, s).await;
        }
        ctx.state_mut(|s| {
            s.status = Some(published.status);
            s.message = published.message.clone();
        });
        if published.status == TaskStatus::Failed {
            // The run ended (limits, model errors) and its results are stored; the workflow
            // fails too so the Temporal UI shows it and offers Reset.
            return Err(failure(published.message));
        }
        Ok(CodeTaskOutput {
            status: published.status,
            message: published.message,
            summary: Some(summary),
        })
    }

    #[signal(name = "cancel")]
    pub fn cancel(&mut self, _ctx: &mut SyncWorkflowContext<Self>, reason: String) {
        if self.cancel_reason.is_none() {
            self.cancel_reason = Some(if reason.trim().is_empty() {
                "cancelled by request".to_string()
            } else {
                reason
            });
        }
    }

    #[query(name = "status")]
    pub fn status(&self, _ctx: &WorkflowContextView) -> StatusView {
        StatusView {
            status: self.status.unwrap_or(TaskStatus::Queued),
            message: self.message.clone(),
        }
    }
}

impl CodeTask {
    /// Runs one activity, racing it against a cancel request.
    async fn step<AD>(
        ctx: &WorkflowContext<Self>,
        activity: AD,
        input: AD::Input,
        options: ActivityOptions,
    ) -> Result<AD::Output, EarlyEnd>
    where
        AD: ActivityDefinition,
        AD::Output: TemporalDeserializable,
    {
        if let Some(reason) = ctx.state(|s| s.cancel_reason.clone()) {
            return Err(EarlyEnd::Cancelled(reason));
        }
        let activity = std::pin::pin!(ctx.execute_activity(activity, input, options));
        let cancel = std::pin::pin!(ctx.wait_condition(|s: &Self| s.cancel_reason.is_some()));
        let mut activity = activity;
        let mut cancel = cancel;
        let outcome = temporalio_sdk::workflows::select! {
            r = activity.as_mut() => Some(r),
            _ = cancel.as_mut() => None,
        };
        match outcome {
            Some(Ok(v)) => Ok(v),
            Some(Err(ActivityExecutionError::Cancelled(_))) => {
                Err(EarlyEnd::Cancelled(cancel_reason(ctx)))
            }
            Some(Err(e)) => Err(EarlyEnd::Failed(root_cause(&e))),
            None => {
                // Ask the activity to stop and wait for its answer (run_agent confirms its
                // process is gone); whatever it says now, the task is cancelled.
                use temporalio_sdk::CancellableFuture;
                activity.cancel();
                let _ = activity.as_mut().await;
                Err(EarlyEnd::Cancelled(cancel_reason(ctx)))
            }
        }
    }

    /// Records a status, keeping the query's answer in step with the store.
    async fn record(
        ctx: &WorkflowContext<Self>,
        task_id: &TaskId,
        status: TaskStatus,
        message: &str,
    ) -> WorkflowResult<()> {
        ctx.state_mut(|s| {
            s.status = Some(status);
            s.message = message.to_string();
        });
        let update = StatusUpdate {
            task_id: task_id.clone(),
            status,
            message: message.to_string(),
        };
        // A local activity: the write runs in the worker that holds the workflow task, with
        // no extra round trip through the server (seven status writes per task).
        let opts = LocalActivityOptions::builder()
            .start_to_close_timeout(Duration::from_secs(30))
            .retry_policy(
                RetryPolicy::builder()
                    .initial_interval(Duration::from_millis(200))
                    .maximum_interval(Duration::from_secs(10))
                    .maximum_attempts(20)
                    .build(),
            )
            // Terminal states must be written even when the workflow itself is being
            // cancelled, so this write does not inherit the workflow's cancellation.
            .cancellation_token(WorkflowCancellationToken::new())
            .build();
        ctx.execute_local_activity(Steps::record_status, update, opts)
            .await?;
        Ok(())
    }

    /// Gives a batch slot back. Best effort: a slot that is not released expires with its
    /// lease, so a failure here must not fail the task.
    async fn release_slot(ctx: &WorkflowContext<Self>, slot: &SlotInput) {
        let opts = LocalActivityOptions::builder()
            .start_to_close_timeout(Duration::from_secs(10))
            .retry_policy(
                RetryPolicy::builder()
                    .initial_interval(Duration::from_millis(200))
                    .maximum_interval(Duration::from_secs(2))
                    .maximum_attempts(5)
                    .build(),
            )
            .cancellation_token(WorkflowCancellationToken::new())
            .build();
        let _ = ctx
            .execute_local_activity(Steps::release_batch_slot, slot.clone(), opts)
            .await;
    }

    /// Ends the task after a step failed or was cancelled: the final status is recorded
    /// first, then the batch slot the task may hold is given back, so the recorded
    /// RUNNING_AGENT spans of a batch never overlap more than its limit allows.
    async fn end_early(
        ctx: &WorkflowContext<Self>,
        task_id: &TaskId,
        end: EarlyEnd,
        slots: &[&SlotInput],
    ) -> WorkflowResult<CodeTaskOutput> {
        Self::record(ctx, task_id, end.status(), end.message()).await?;
        for slot in slots {
            Self::release_slot(ctx, slot).await;
        }
        Err(end.termination())
    }
}

/// The slots a task holds at a point: its batch's and its tenant's.
fn held<'a>(batch: Option<&'a SlotInput>, tenant: Option<&'a SlotInput>) -> Vec<&'a SlotInput> {
    batch.into_iter().chain(tenant).collect()
}

fn cancel_reason(ctx: &WorkflowContext<CodeTask>) -> String {
    ctx.state(|s| s.cancel_reason.clone())
        .or_else(|| ctx.cancellation_token().reason())
        .unwrap_or_else(|| "cancelled by request".to_string())
}

fn retry_policy(settings: &WorkflowSettings) -> RetryPolicy {
    RetryPolicy::builder()
        .initial_interval(Duration::from_millis(
            settings.retry_initial_interval_ms.max(1),
        ))
        .maximum_interval(Duration::from_secs(60))
        .maximum_attempts(settings.activity_max_attempts.max(1))
        .build()
}

fn io_options(settings: &WorkflowSettings, timeout_secs: u64) -> ActivityOptions {
    ActivityOptions::with_start_to_close_timeout(Duration::from_secs(timeout_secs))
        .retry_policy(retry_policy(settings))
        .build()
}

/// The innermost message of an activity failure: the activity's own words, not the
/// "Activity task failed" wrapper around them.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let m = s.to_string();
        if !m.trim().is_empty() {
            msg = m;
        }
        source = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn an_early_end_records_its_final_status_and_message() {
        let failed = EarlyEnd::Failed("clone failed: repository not found".into());
        assert_eq!(failed.status(), TaskStatus::Failed);
        assert_eq!(failed.message(), "clone failed: repository not found");
        let cancelled = EarlyEnd::Cancelled("changed my mind".into());
        assert_eq!(cancelled.status(), TaskStatus::Cancelled);
        assert_eq!(cancelled.message(), "changed my mind");
        assert!(failed.status().is_terminal() && cancelled.status().is_terminal());
    }

    #[test]
    fn a_cancelled_task_ends_its_run_cancelled_and_a_failed_one_failed_with_the_reason() {
        let cancelled = EarlyEnd::Cancelled("changed my mind".into()).termination();
        assert!(
            matches!(cancelled, WorkflowTermination::Cancelled { .. }),
            "{cancelled:?}"
        );
        let failed = EarlyEnd::Failed("upstream exploded".into()).termination();
        assert!(
            matches!(failed, WorkflowTermination::Failed(_)),
            "{failed:?}"
        );
        assert!(
            root_cause(&failed).contains("upstream exploded"),
            "{}",
            root_cause(&failed)
        );
    }

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1
                .as_deref()
                .map(|l| l as &(dyn std::error::Error + 'static))
        }
    }

    #[test]
    fn the_root_cause_is_the_innermost_message_that_says_something() {
        let wrapped = Layer(
            "Activity task failed",
            Some(Box::new(Layer(
                "application failure",
                Some(Box::new(Layer("git: repository not found", None))),
            ))),
        );
        assert_eq!(root_cause(&wrapped), "git: repository not found");
        // An empty innermost layer does not hide the words above it.
        let blank = Layer("model request failed", Some(Box::new(Layer(" ", None))));
        assert_eq!(root_cause(&blank), "model request failed");
        assert_eq!(root_cause(&Layer("alone", None)), "alone");
    }
}
