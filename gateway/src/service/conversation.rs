//! Follow-ups and best-of-N at the doors, the same from HTTP, gRPC, the CLI and the page.
//!
//! - A follow-up (`POST /api/tasks/{id}/messages`) is the workflow's `message` Update, sent
//!   with update-with-start: a workflow still open for follow-ups takes it (its validator
//!   refuses while a turn runs), a closed one is started again as a continuation of the
//!   stored results, so a conversation outlives its workflow.
//! - Selection (`POST /api/tasks/{id}/select`) copies a candidate's results to the task's
//!   own keys and, with `open_pr`, opens or updates its pull request.
//! - A candidate's or a turn's own result files are read from their prefixes
//!   ([`layout::run_prefix`]).

use std::time::Duration;

use patchflow_core::{TaskId, TaskRecord, TaskStatus, TurnRecord, layout};
use patchflow_workflows::io::{Continuation, MessageInput, PreparedEnv, TurnAccepted};
use patchflow_workflows::{CodeTask, CodeTaskInput};
use temporalio_client::errors::{WorkflowUpdateError, WorkflowUpdateWithStartError};
use temporalio_client::{
    WorkflowIdConflictPolicy, WorkflowIdReusePolicy, WorkflowUpdateWithStartOptions,
};

use super::{ResultFile, TaskService};
use crate::auth::Principal;
use crate::error::ServiceError;

/// How long a message waits for the workflow to finish recording the turn before it:
/// the record says COMPLETED a moment before the workflow stops running that turn.
const SETTLE_WAIT: Duration = Duration::from_secs(10);

/// What a result-file read names beyond the task: a candidate's files, or one turn's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunFile {
    pub candidate: Option<u32>,
    pub turn: Option<u32>,
}

impl TaskService {
    /// Sends a follow-up to a COMPLETED or FAILED task: answers the turn it became.
    pub async fn send_message(
        &self,
        who: &Principal,
        task_id: &TaskId,
        message: &str,
    ) -> Result<TurnAccepted, ServiceError> {
        who.must_write()?;
        self.get_for(who, task_id).await?;
        patchflow_core::conversation::validate_message(message)?;
        let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
        loop {
            let record = self.get_from_store(task_id).await?;
            check_can_follow_up(&record)?;
            match self.update_with_start(&record, message).await {
                Ok(accepted) => {
                    self.announce_turn(task_id, accepted.turn, message).await;
                    return Ok(accepted);
                }
                // The record ended its turn; the workflow is still finishing it.
                Err(Refused::Running(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(Refused::Running(why) | Refused::Other(why)) => {
                    return Err(ServiceError::Conflict(why));
                }
                Err(Refused::Error(e)) => return Err(e),
            }
        }
    }

    /// The `message` update on the task's workflow, starting it again (as a continuation
    /// of `record`) when it has closed.
    async fn update_with_start(
        &self,
        record: &TaskRecord,
        message: &str,
    ) -> Result<TurnAccepted, Refused> {
        let task_id = &record.task_id;
        let mut settings = self.config.settings.clone();
        settings.tenant_max_running = self
            .config
            .tenants
            .for_tenant(&record.spec.tenant)
            .max_running
            .unwrap_or(0);
        let input = CodeTaskInput {
            task_id: task_id.clone(),
            spec: record.spec.clone(),
            settings,
            continuation: Some(Continuation {
                turns: turns_of(record),
                status: record.status,
                message: record.message.clone(),
                commit: None,
                prepared: self.prepared_of(task_id).await.map_err(Refused::Error)?,
            }),
        };
        let options = WorkflowUpdateWithStartOptions::new(
            self.config.task_queue.clone(),
            task_id.to_string(),
            WorkflowIdConflictPolicy::UseExisting,
        )
        .id_reuse_policy(WorkflowIdReusePolicy::AllowDuplicate)
        .build();
        let update = MessageInput {
            message: message.to_string(),
        };
        self.temporal
            .execute_update_with_start_workflow(
                CodeTask::run,
                input,
                CodeTask::message,
                update,
                options,
            )
            .await
            .map_err(|e| refused(task_id, e))
    }

    /// The prepared environment a continuation resumes on, when the task had a setup.
    async fn prepared_of(&self, task_id: &TaskId) -> Result<Option<PreparedEnv>, ServiceError> {
        let baseline_key = layout::prepared_key(task_id);
        if !self.objects.exists(&baseline_key).await? {
            return Ok(None);
        }
        let home = layout::prepared_home_key(task_id);
        let home_key = self.objects.exists(&home).await?.then_some(home);
        Ok(Some(PreparedEnv {
            baseline_key,
            home_key,
            cache_key: None,
            cache_hit: true,
            millis: 0,
        }))
    }

    /// Records the accepted turn at once, so a read right after the answer shows the task
    /// running it (the workflow's own `begin_turn` finds it begun and adopts its run).
    async fn announce_turn(&self, task_id: &TaskId, turn: u32, message: &str) {
        let record = TurnRecord {
            turn,
            message: message.to_string(),
            status: TaskStatus::RunningAgent,
            summary: String::new(),
            started_at: chrono::Utc::now(),
            finished_at: None,
        };
        match self.store.begin_turn(task_id, None, &record).await {
            Ok(_) => {
                let _ = self.hot.status.invalidate(task_id).await;
            }
            Err(e) => {
                tracing::warn!(task_id = %task_id, turn, error = %e, "cannot record the turn (the workflow will)");
            }
        }
    }

    /// Makes candidate `n` the task's result; with `open_pr`, its pull request too.
    pub async fn select(
        &self,
        who: &Principal,
        task_id: &TaskId,
        n: u32,
    ) -> Result<TaskRecord, ServiceError> {
        who.must_write()?;
        self.get_for(who, task_id).await?;
        let record = self.get_from_store(task_id).await?;
        if record.spec.candidates <= 1 {
            return Err(ServiceError::Conflict(format!(
                "task {task_id} ran one agent: there is no candidate to select"
            )));
        }
        if n == 0 || n > record.spec.candidates {
            return Err(ServiceError::BadRequest(format!(
                "candidate must be 1 to {} (the task's candidates), not {n}",
                record.spec.candidates
            )));
        }
        if record.turns.len() > 1 {
            return Err(ServiceError::Conflict(format!(
                "task {task_id} has follow-up turns on candidate {}: the selection is final",
                record.selected.unwrap_or(0)
            )));
        }
        if !record.status.is_terminal() {
            return Err(ServiceError::StillRunning {
                task: task_id.clone(),
                status: record.status,
            });
        }
        match record.candidates.iter().find(|c| c.candidate == n) {
            Some(c) if c.status == TaskStatus::Completed => {}
            Some(c) => {
                return Err(ServiceError::Conflict(format!(
                    "candidate {n} of task {task_id} is {}{}: only a COMPLETED candidate can be selected",
                    c.status,
                    c.error
                        .as_deref()
                        .map(|e| format!(" ({e})"))
                        .unwrap_or_default()
                )));
            }
            None => {
                return Err(ServiceError::Conflict(format!(
                    "candidate {n} of task {task_id} has no result"
                )));
            }
        }
        patchflow_platform::results::select_candidate(
            self.store.as_ref(),
            self.objects.as_ref(),
            task_id,
            n,
        )
        .await
        .map_err(ServiceError::Unavailable)?;
        let _ = self.hot.status.invalidate(task_id).await;
        tracing::info!(task_id = %task_id, candidate = n, "candidate selected");
        let record = self.get_from_store(task_id).await?;
        let changed = record
            .summary
            .as_ref()
            .is_some_and(|s| !s.files_changed.is_empty());
        if record.spec.open_pr
            && changed
            && matches!(record.spec.source, patchflow_core::TaskSource::Git { .. })
        {
            // The pull request follows the selection; why it could not is in pr_error.
            if let Err(e) = self.open_pull_request(who, task_id, None).await {
                tracing::warn!(task_id = %task_id, error = %e, "pull request of the selection not opened");
            }
            return self.get_from_store(task_id).await;
        }
        Ok(record)
    }

    /// Where to read a result file of one candidate or one turn (checked against the
    /// record: a candidate or turn the task does not have is a `404` naming it).
    pub async fn open_run_result(
        &self,
        task_id: &TaskId,
        file: &str,
        which: RunFile,
    ) -> Result<ResultFile, ServiceError> {
        let record = self.get_from_store(task_id).await?;
        let key = run_file_key(&record, file, which)?;
        let not_ready = || {
            ServiceError::NotReady(format!(
                "{file} of {} of task {task_id} is not available (status {})",
                describe(which),
                record.status
            ))
        };
        self.open_object(&key, not_ready).await
    }

    /// [`Self::read_result`] of one candidate's or one turn's file.
    pub async fn read_run_result(
        &self,
        record: &TaskRecord,
        file: &str,
        which: RunFile,
        limit: u64,
    ) -> Result<Option<(Vec<u8>, bool)>, ServiceError> {
        let key = run_file_key(record, file, which)?;
        self.read_object(&key, limit).await
    }
}

/// Why the workflow did not take a message.
enum Refused {
    /// A turn is running (the validator's answer).
    Running(String),
    /// Another refusal of the validator (closing, cancelled).
    Other(String),
    Error(ServiceError),
}

fn refused(task_id: &TaskId, e: WorkflowUpdateWithStartError) -> Refused {
    match e {
        WorkflowUpdateWithStartError::Update(WorkflowUpdateError::Failed(f)) => {
            let why = f.message.clone();
            if why.contains("still running") {
                Refused::Running(format!("task {task_id}: {why}"))
            } else {
                Refused::Other(format!("task {task_id} takes no follow-up: {why}"))
            }
        }
        other => Refused::Error(ServiceError::Unavailable(format!(
            "cannot send the message to task {task_id}: {other}"
        ))),
    }
}

/// A task that may take a follow-up: ended COMPLETED or FAILED, and (best-of-N) with a
/// candidate chosen to go on from.
fn check_can_follow_up(record: &TaskRecord) -> Result<(), ServiceError> {
    let id = &record.task_id;
    match record.status {
        TaskStatus::Completed | TaskStatus::Failed => {}
        TaskStatus::Cancelled => {
            return Err(ServiceError::Conflict(format!(
                "task {id} was cancelled: only a COMPLETED or FAILED task takes a follow-up"
            )));
        }
        status => {
            return Err(ServiceError::Conflict(format!(
                "task {id} is {status}: send the next message when the running turn has ended"
            )));
        }
    }
    if record.spec.candidates > 1 && record.selected.is_none() {
        return Err(ServiceError::Conflict(format!(
            "task {id} ran {} candidates and none is selected: select one (POST /api/tasks/{id}/select) to go on from",
            record.spec.candidates
        )));
    }
    Ok(())
}

fn describe(which: RunFile) -> String {
    match which {
        RunFile {
            candidate: Some(n), ..
        } => format!("candidate {n}"),
        RunFile { turn: Some(t), .. } => format!("turn {t}"),
        RunFile { .. } => "the task".to_string(),
    }
}

/// How many turns `record` has had (1 before any follow-up).
fn turns_of(record: &TaskRecord) -> u32 {
    u32::try_from(record.turns.len()).unwrap_or(u32::MAX).max(1)
}

/// The object key of `file` for a candidate or a turn of `record`.
fn run_file_key(record: &TaskRecord, file: &str, which: RunFile) -> Result<String, ServiceError> {
    let id = &record.task_id;
    if let Some(n) = which.candidate {
        if record.spec.candidates <= 1 {
            return Err(ServiceError::Missing(format!(
                "task {id} ran one agent: it has no candidates"
            )));
        }
        if n == 0 || n > record.spec.candidates {
            return Err(ServiceError::Missing(format!(
                "task {id} has no candidate {n} (it has {})",
                record.spec.candidates
            )));
        }
        return Ok(layout::candidate_key(id, n, file));
    }
    let Some(turn) = which.turn else {
        return Ok(layout::result_key(id, file));
    };
    let turns = turns_of(record);
    if turn == 0 || turn > turns {
        return Err(ServiceError::Missing(format!(
            "task {id} has no turn {turn} (it has {turns})"
        )));
    }
    // A turn's own change: turn 1's diff (kept at turns/1/ once a second turn ran), a
    // follow-up's turn.patch. Its transcript and log: the turn's own files.
    let file = if turn > 1 && file == layout::DIFF {
        layout::TURN_DIFF
    } else {
        file
    };
    Ok(if turns == 1 {
        layout::result_key(id, file)
    } else {
        layout::turn_key(id, turn, file)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchflow_core::{TaskSource, TaskSpec};

    fn record(candidates: u32, turns: u32) -> TaskRecord {
        let mut spec = TaskSpec::new(
            TaskSource::Git {
                url: "https://example.com/r.git".into(),
                git_ref: None,
                git_token: None,
            },
            "do it",
        );
        spec.candidates = candidates;
        let now = chrono::Utc::now();
        TaskRecord {
            task_id: TaskId::generate(),
            status: TaskStatus::Completed,
            message: "done".into(),
            created_at: now,
            updated_at: now,
            pr_url: None,
            pr_error: None,
            summary: None,
            tenant: "default".into(),
            batch_id: None,
            idempotency_key: None,
            spec,
            attempt: 1,
            attempts: Vec::new(),
            turns: (1..=turns)
                .filter(|_| turns > 1)
                .map(|t| TurnRecord {
                    turn: t,
                    message: format!("m{t}"),
                    status: TaskStatus::Completed,
                    summary: String::new(),
                    started_at: now,
                    finished_at: None,
                })
                .collect(),
            candidates: Vec::new(),
            selected: None,
        }
    }

    #[test]
    fn a_turn_reads_its_own_change_and_the_task_its_cumulative_one() {
        let r = record(1, 3);
        let id = &r.task_id;
        let key = |which| run_file_key(&r, layout::DIFF, which).unwrap();
        assert_eq!(
            key(RunFile::default()),
            layout::result_key(id, layout::DIFF)
        );
        let t = |turn| RunFile {
            candidate: None,
            turn: Some(turn),
        };
        assert_eq!(key(t(1)), layout::turn_key(id, 1, layout::DIFF));
        assert_eq!(key(t(3)), layout::turn_key(id, 3, layout::TURN_DIFF));
        assert_eq!(
            run_file_key(&r, layout::TRANSCRIPT, t(2)).unwrap(),
            layout::turn_key(id, 2, layout::TRANSCRIPT)
        );
        for bad in [0, 4, u32::MAX] {
            let e = run_file_key(&r, layout::DIFF, t(bad)).unwrap_err();
            assert_eq!(e.http_status(), 404, "{e}");
        }
        // Before any follow-up, turn 1 is the task's own files.
        let one = record(1, 1);
        assert_eq!(
            run_file_key(&one, layout::DIFF, t(1)).unwrap(),
            layout::result_key(&one.task_id, layout::DIFF)
        );
    }

    #[test]
    fn a_candidate_outside_the_task_is_not_found_and_never_a_key_elsewhere() {
        let r = record(3, 1);
        let c = |n| RunFile {
            candidate: Some(n),
            turn: None,
        };
        assert_eq!(
            run_file_key(&r, layout::DIFF, c(2)).unwrap(),
            layout::candidate_key(&r.task_id, 2, layout::DIFF)
        );
        for bad in [0, 4, 9, u32::MAX] {
            assert_eq!(
                run_file_key(&r, layout::DIFF, c(bad))
                    .unwrap_err()
                    .http_status(),
                404
            );
        }
        assert_eq!(
            run_file_key(&record(1, 1), layout::DIFF, c(1))
                .unwrap_err()
                .http_status(),
            404
        );
    }

    #[test]
    fn only_an_ended_task_with_a_chosen_candidate_takes_a_follow_up() {
        let mut r = record(1, 1);
        assert!(check_can_follow_up(&r).is_ok());
        r.status = TaskStatus::Failed;
        assert!(check_can_follow_up(&r).is_ok());
        for s in [
            TaskStatus::Cancelled,
            TaskStatus::RunningAgent,
            TaskStatus::Queued,
        ] {
            r.status = s;
            assert_eq!(check_can_follow_up(&r).unwrap_err().http_status(), 409);
        }
        let mut raced = record(3, 1);
        let e = check_can_follow_up(&raced).unwrap_err();
        assert!(e.to_string().contains("select one"), "{e}");
        raced.selected = Some(2);
        assert!(check_can_follow_up(&raced).is_ok());
    }
}
