//! Retry: a new attempt of an ended task, the same from every door (HTTP, gRPC, CLI, page).
//!
//! - `from_start` runs the workflow again under the same workflow id (the task id) once
//!   the previous run has closed.
//! - `from_failed_step` resets the last run with Temporal's ResetWorkflowExecution to just
//!   before the failed step was scheduled, which is just after the last step that
//!   completed: the steps before it (fetch, stage) are not run again.
//!
//! Either way the new run's first status write opens attempt N+1 in the store (writes
//! carry their run id), so a reset done by hand in the Temporal Web UI or CLI is recorded
//! the same way; the gateway's own QUEUED write here only says who asked.

use std::time::Duration;

use futures::TryStreamExt;
use patchflow_core::{TaskId, TaskRecord, TaskStatus};
use patchflow_workflows::{CodeTask, CodeTaskInput};
use temporalio_client::errors::WorkflowStartError;
use temporalio_client::grpc::WorkflowService;
use temporalio_client::{
    NamespacedClient, WorkflowDescribeOptions, WorkflowExecutionStatus,
    WorkflowFetchHistoryOptions, WorkflowIdConflictPolicy, WorkflowIdReusePolicy,
    WorkflowSignalOptions, WorkflowStartOptions,
};
use temporalio_common::protos::temporal::api::common::v1::WorkflowExecution;
use temporalio_common::protos::temporal::api::enums::v1::{EventType, ResetReapplyExcludeType};
use temporalio_common::protos::temporal::api::history::v1::HistoryEvent;
use temporalio_common::protos::temporal::api::history::v1::history_event::Attributes;
use temporalio_common::protos::temporal::api::workflowservice::v1::ResetWorkflowExecutionRequest;

use super::TaskService;
use crate::error::ServiceError;

// The mode is part of the wire (the retry body, the page's form), so patchflow-api owns it.
pub use patchflow_api::RetryMode;

/// How long a retry waits for the workflow of an ended task to close: the record's final
/// status is written a moment before the workflow returns.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// The step that `from_failed_step` runs again when every activity completed but the task
/// still failed (the agent ran and reported a failure, which `publish_result` recorded).
const AGENT_STEP: &str = "run_agent";

impl TaskService {
    /// Starts a new attempt of an ended task and answers its record (with the new attempt
    /// number). Refused while the task still runs.
    pub async fn retry(
        &self,
        task_id: &TaskId,
        mode: RetryMode,
    ) -> Result<TaskRecord, ServiceError> {
        let record = self.get_from_store(task_id).await?;
        if !record.status.is_terminal() {
            return Err(ServiceError::StillRunning {
                task: task_id.clone(),
                status: record.status,
            });
        }
        if mode == RetryMode::FromFailedStep && record.status == TaskStatus::Completed {
            return Err(ServiceError::Conflict(format!(
                "task {task_id} completed: no step failed to retry from; retry with mode from_start to run it again"
            )));
        }
        let run_id = self.closed_run(task_id, record.status).await?;
        let next = record.attempt + 1;
        let new_run = match mode {
            RetryMode::FromStart => self.run_again(task_id, &record).await?,
            RetryMode::FromFailedStep => self.reset_to_failed_step(task_id, &run_id, next).await?,
        };
        let message = match mode {
            RetryMode::FromStart => format!("retry from the start requested (attempt {next})"),
            RetryMode::FromFailedStep => {
                format!("retry from the failed step requested (attempt {next})")
            }
        };
        tracing::info!(task_id = %task_id, mode = mode.as_str(), run_id = %new_run, attempt = next, "retry");
        // The new run may already have written its first status (then this is ignored, and
        // that write announced itself).
        self.change_status(task_id, Some(&new_run), TaskStatus::Queued, &message)
            .await?;
        self.get_from_store(task_id).await
    }

    /// The id of the task's latest run once it has closed (an ended task's run waiting for
    /// follow-ups is asked to close). A run still open after
    /// [`CLOSE_WAIT`] (the record ended but the workflow did not) refuses the retry.
    async fn closed_run(
        &self,
        task_id: &TaskId,
        status: TaskStatus,
    ) -> Result<String, ServiceError> {
        let handle = self
            .temporal
            .get_workflow_handle::<CodeTask>(task_id.to_string());
        let deadline = tokio::time::Instant::now() + CLOSE_WAIT;
        let mut asked = false;
        loop {
            let desc = handle
                .describe(WorkflowDescribeOptions::default())
                .await
                .map_err(|e| {
                    ServiceError::Unavailable(format!(
                        "cannot describe the workflow of task {task_id}: {e}"
                    ))
                })?;
            if desc.status() != WorkflowExecutionStatus::Running {
                return Ok(desc.run_id().to_string());
            }
            if !asked {
                // An ended task's workflow waits for follow-ups: a retry closes the
                // conversation first (a turn that is running refuses the retry above).
                asked = true;
                let _ = handle
                    .signal(CodeTask::close, (), WorkflowSignalOptions::default())
                    .await;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ServiceError::StillRunning {
                    task: task_id.clone(),
                    status,
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `from_start`: the workflow again, same id, same input. Answers the new run's id.
    async fn run_again(
        &self,
        task_id: &TaskId,
        record: &TaskRecord,
    ) -> Result<String, ServiceError> {
        let input = CodeTaskInput {
            task_id: task_id.clone(),
            spec: record.spec.clone(),
            settings: self.config.settings.clone(),
            continuation: None,
        };
        // A closed run's id may be used again; a running one (a retry racing this one)
        // refuses the start rather than joining it.
        let options =
            WorkflowStartOptions::new(self.config.task_queue.clone(), task_id.to_string())
                .id_conflict_policy(WorkflowIdConflictPolicy::Fail)
                .id_reuse_policy(WorkflowIdReusePolicy::AllowDuplicate)
                .build();
        match self
            .temporal
            .start_workflow(CodeTask::run, input, options)
            .await
        {
            Ok(handle) => Ok(handle.run_id().unwrap_or_default().to_string()),
            Err(WorkflowStartError::AlreadyStarted { .. }) => Err(ServiceError::StillRunning {
                task: task_id.clone(),
                status: TaskStatus::Queued,
            }),
            Err(e) => Err(ServiceError::Unavailable(format!(
                "cannot start the workflow for task {task_id}: {e}"
            ))),
        }
    }

    /// `from_failed_step`: resets run `run_id` to just after its last completed step.
    /// Answers the new run's id.
    async fn reset_to_failed_step(
        &self,
        task_id: &TaskId,
        run_id: &str,
        attempt: u32,
    ) -> Result<String, ServiceError> {
        let handle = self
            .temporal
            .get_workflow_handle::<CodeTask>(task_id.to_string());
        let events: Vec<HistoryEvent> = handle
            .fetch_history(WorkflowFetchHistoryOptions::default())
            .try_collect()
            .await
            .map_err(|e| {
                ServiceError::Unavailable(format!(
                    "cannot read the workflow history of task {task_id}: {e}"
                ))
            })?;
        let point = reset_point(&events).ok_or_else(|| {
            ServiceError::Conflict(format!(
                "task {task_id} has no completed workflow step to resume from; retry with mode from_start"
            ))
        })?;
        let mut client = self.temporal.clone();
        let request = ResetWorkflowExecutionRequest {
            namespace: self.temporal.namespace(),
            workflow_execution: Some(WorkflowExecution {
                workflow_id: task_id.to_string(),
                run_id: run_id.to_string(),
            }),
            reason: format!("patchflow retry from the failed step (attempt {attempt})"),
            workflow_task_finish_event_id: point,
            // One reset per attempt even if the request is sent twice.
            request_id: format!("{task_id}-retry-{attempt}"),
            // A cancel or close signal of the old run must not stop the new one, nor a
            // follow-up message of the old run start a turn in it.
            reset_reapply_exclude_types: vec![
                ResetReapplyExcludeType::Signal as i32,
                ResetReapplyExcludeType::Update as i32,
            ],
            ..Default::default()
        };
        let response =
            WorkflowService::reset_workflow_execution(&mut client, tonic::Request::new(request))
                .await
                .map_err(|s| {
                    ServiceError::Unavailable(format!(
                        "cannot reset the workflow of task {task_id}: {}",
                        s.message()
                    ))
                })?;
        Ok(response.into_inner().run_id)
    }
}

/// Where `from_failed_step` resets a run to: the WorkflowTaskCompleted event that scheduled
/// the failed step, so the new run replays everything before it and runs that workflow task
/// (the status write, the step itself) again. The failed step is the last activity that did
/// not complete; when they all completed, the agent step (the run failed on its outcome).
/// `None` when there is no such point (the run never got as far as scheduling a step).
pub fn reset_point(events: &[HistoryEvent]) -> Option<i64> {
    let mut scheduled: Vec<(i64, String, i64)> = Vec::new(); // (scheduled id, type, wft completed before it)
    let mut completed: Vec<i64> = Vec::new();
    let mut last_wft_completed = None;
    for e in events {
        match e.event_type() {
            EventType::WorkflowTaskCompleted => last_wft_completed = Some(e.event_id),
            EventType::ActivityTaskScheduled => {
                if let (Some(Attributes::ActivityTaskScheduledEventAttributes(a)), Some(wft)) =
                    (&e.attributes, last_wft_completed)
                {
                    let name = a
                        .activity_type
                        .as_ref()
                        .map(|t| t.name.clone())
                        .unwrap_or_default();
                    scheduled.push((e.event_id, name, wft));
                }
            }
            EventType::ActivityTaskCompleted => {
                if let Some(Attributes::ActivityTaskCompletedEventAttributes(a)) = &e.attributes {
                    completed.push(a.scheduled_event_id);
                }
            }
            _ => {}
        }
    }
    let failed = scheduled
        .iter()
        .rev()
        .find(|(id, _, _)| !completed.contains(id))
        .or_else(|| {
            scheduled
                .iter()
                .rev()
                .find(|(_, name, _)| name == AGENT_STEP)
        })?;
    Some(failed.2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use temporalio_common::protos::temporal::api::common::v1::ActivityType;
    use temporalio_common::protos::temporal::api::history::v1::{
        ActivityTaskCompletedEventAttributes, ActivityTaskScheduledEventAttributes,
    };

    fn ev(id: i64, t: EventType, attributes: Option<Attributes>) -> HistoryEvent {
        HistoryEvent {
            event_id: id,
            event_type: t as i32,
            attributes,
            ..HistoryEvent::default()
        }
    }
    fn wft_done(id: i64) -> HistoryEvent {
        ev(id, EventType::WorkflowTaskCompleted, None)
    }
    fn scheduled(id: i64, name: &str) -> HistoryEvent {
        ev(
            id,
            EventType::ActivityTaskScheduled,
            Some(Attributes::ActivityTaskScheduledEventAttributes(
                ActivityTaskScheduledEventAttributes {
                    activity_type: Some(ActivityType { name: name.into() }),
                    ..Default::default()
                },
            )),
        )
    }
    fn completed(id: i64, of: i64) -> HistoryEvent {
        ev(
            id,
            EventType::ActivityTaskCompleted,
            Some(Attributes::ActivityTaskCompletedEventAttributes(
                ActivityTaskCompletedEventAttributes {
                    scheduled_event_id: of,
                    ..Default::default()
                },
            )),
        )
    }

    fn pipeline_until_agent() -> Vec<HistoryEvent> {
        vec![
            wft_done(4),
            scheduled(6, "fetch_code"),
            completed(8, 6),
            wft_done(11),
            scheduled(13, "stage_code"),
            completed(15, 13),
            wft_done(18),
            scheduled(20, "run_agent"),
        ]
    }

    #[test]
    fn resets_to_the_workflow_task_that_scheduled_the_step_that_did_not_complete() {
        // run_agent failed (no completion): redo the workflow task after stage_code.
        assert_eq!(reset_point(&pipeline_until_agent()), Some(18));
        // fetch_code failed: back to the first workflow task.
        assert_eq!(
            reset_point(&[wft_done(4), scheduled(6, "fetch_code")]),
            Some(4)
        );
    }

    #[test]
    fn an_agent_that_reported_failure_is_the_step_to_redo() {
        // Every activity completed, but the task failed on the agent's outcome.
        let mut h = pipeline_until_agent();
        h.extend([
            completed(22, 20),
            wft_done(25),
            scheduled(27, "publish_result"),
            completed(29, 27),
            wft_done(32),
        ]);
        assert_eq!(reset_point(&h), Some(18));
        assert_eq!(reset_point(&[wft_done(4)]), None);
    }

    /// On a real history (recorded for the workflow's replay tests): the agent failed, so
    /// the reset point is the workflow task that scheduled `run_agent`, after fetch and stage.
    #[tokio::test]
    async fn a_recorded_failed_run_resets_to_the_workflow_task_that_scheduled_the_agent() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../workflows/tests/histories/failed.json"
        );
        let json = std::fs::read(path).unwrap();
        let events = temporalio_client::WorkflowHistory::from_json(&json)
            .unwrap()
            .into_events()
            .await
            .unwrap();
        let point = reset_point(&events).unwrap();
        let at = events.iter().position(|e| e.event_id == point).unwrap();
        assert_eq!(events[at].event_type(), EventType::WorkflowTaskCompleted);
        let next_step = events[at..]
            .iter()
            .find_map(|e| match &e.attributes {
                Some(Attributes::ActivityTaskScheduledEventAttributes(a)) => {
                    a.activity_type.as_ref().map(|t| t.name.clone())
                }
                _ => None,
            })
            .unwrap();
        assert_eq!(next_step, AGENT_STEP);
        let completed_before: Vec<i64> = events[..at]
            .iter()
            .filter(|e| e.event_type() == EventType::ActivityTaskCompleted)
            .map(|e| e.event_id)
            .collect();
        assert_eq!(
            completed_before.len(),
            2,
            "fetch and stage completed before the agent"
        );
    }
}
