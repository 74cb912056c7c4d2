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
//!
//! **Best-of-N.** A task with `candidates` > 1 runs that many `run_agent` activities at
//! once on the same staged code (each its own runner execution), records each candidate
//! as it ends (`record_candidate`), and publishes them together (`publish_candidates`,
//! which selects one by `auto_select`). With `first_finished`, the others stop when the
//! first one succeeds.
//!
//! **Follow-ups.** An ended (COMPLETED or FAILED) task's workflow stays open for
//! `followup_idle_secs`, waiting for the `message` update (validated: refused while a turn
//! runs). Each message is one more turn: `begin_turn`, `run_agent` resuming the stored
//! conversation and changes, `publish_result` of the turn. The turn state lives here; the
//! history is carried over with continue-as-new before it grows large. Once the wait is
//! over the workflow completes; a later message starts a new run with a [`Continuation`]
//! (update-with-start), so a conversation survives its workflow closing.

use std::time::Duration;

use patchflow_core::{AgentSummary, TaskId, TaskStatus};
use temporalio_common::data_converters::TemporalDeserializable;
use temporalio_common::{ActivityDefinition, RetryPolicy};
use temporalio_macros::{workflow, workflow_methods};
use temporalio_sdk::{
    ActivityCancellationType, ActivityExecutionError, ActivityOptions, ContinueAsNewOptions,
    LocalActivityOptions, SyncWorkflowContext, WorkflowCancellationToken, WorkflowContext,
    WorkflowContextView, WorkflowResult, WorkflowTermination,
};

use crate::io::{
    CandidateUpdate, CodeTaskInput, CodeTaskOutput, Continuation, FetchInput, FollowUp,
    MessageInput, PrepareInput, PreparedEnv, PublishCandidatesInput, PublishInput, PublishOutput,
    RunAgentInput, SlotInput, StageInput, StatusUpdate, StatusView, TurnAccepted, TurnStart,
    WorkflowSettings,
};
use crate::steps::Steps;

#[workflow]
#[derive(Default)]
pub struct CodeTask {
    input: Option<CodeTaskInput>,
    status: Option<TaskStatus>,
    message: String,
    cancel_reason: Option<String>,
    /// The last turn that began (0 before the first).
    turns: u32,
    /// A turn runs: the first, or a follow-up.
    running: bool,
    /// A follow-up accepted by the `message` update and not begun yet.
    pending: Option<FollowUp>,
    /// The `close` signal: stop waiting for follow-ups.
    closing: bool,
    /// Best-of-N: the candidates in the order they ended.
    finish_order: Vec<u32>,
    /// Best-of-N with `first_finished`: one succeeded, the others stop.
    stop_candidates: bool,
}

/// How the first turn ended, for the turns that follow.
struct FirstTurn {
    output: CodeTaskOutput,
    commit: Option<String>,
    prepared: Option<PreparedEnv>,
}

/// Why a task stops before its results are published: the final status and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum EarlyEnd {
    /// A step failed (after its retries); the message is the step's own words.
    Failed(String),
    /// No worker took the step before its schedule-to-start timeout (it was routed to one
    /// worker's own queue and that worker is gone): a failure, unless the caller routes it
    /// elsewhere.
    NotStarted(String),
    /// A cancel signal or a Temporal cancellation; the message is the reason.
    Cancelled(String),
}

impl EarlyEnd {
    fn status(&self) -> TaskStatus {
        match self {
            Self::Failed(_) | Self::NotStarted(_) => TaskStatus::Failed,
            Self::Cancelled(_) => TaskStatus::Cancelled,
        }
    }

    fn message(&self) -> &str {
        match self {
            Self::Failed(m) | Self::NotStarted(m) | Self::Cancelled(m) => m,
        }
    }

    /// How the workflow run itself ends, so the Temporal UI shows the same outcome as the
    /// task record (and offers Reset on a failure).
    fn termination(self) -> WorkflowTermination {
        match self {
            Self::Cancelled(_) => WorkflowTermination::cancelled(),
            Self::Failed(message) | Self::NotStarted(message) => failure(message),
        }
    }
}

/// A failed run; never retried by Temporal (the task's retry is the user's call).
fn failure(message: String) -> WorkflowTermination {
    temporalio_sdk::ApplicationFailure::non_retryable(std::io::Error::other(message)).into()
}

/// The longest a run started by a message waits for that message's update to land.
const MESSAGE_LANDING: Duration = Duration::from_secs(300);

#[workflow_methods]
impl CodeTask {
    #[init]
    pub fn new(_ctx: &WorkflowContextView, input: CodeTaskInput) -> Self {
        let mut state = Self::default();
        match &input.continuation {
            Some(c) => {
                state.status = Some(c.status);
                state.message = c.message.clone();
                state.turns = c.turns;
            }
            None => state.running = true,
        }
        state.input = Some(input);
        state
    }

    #[run(name = "CodeTask")]
    pub async fn run(ctx: &mut WorkflowContext<Self>) -> WorkflowResult<CodeTaskOutput> {
        let Some(input) = ctx.state(|s| s.input.clone()) else {
            return Err(failure("the workflow started without its input".into()));
        };
        let (mut output, commit, prepared) = match &input.continuation {
            Some(c) => (
                CodeTaskOutput {
                    status: c.status,
                    message: c.message.clone(),
                    summary: None,
                },
                c.commit.clone(),
                c.prepared.clone(),
            ),
            None => {
                let first = Self::first_turn(ctx, &input).await?;
                (first.output, first.commit, first.prepared)
            }
        };
        ctx.state_mut(|s| {
            s.running = false;
            s.turns = s.turns.max(1);
        });

        // The conversation: follow-up turns while messages come within the idle time.
        let settings = &input.settings;
        let mut wait = Duration::from_secs(settings.followup_idle_secs);
        if input.continuation.is_some() {
            // A run started by a message waits for it, whatever the idle time.
            wait = wait.max(MESSAGE_LANDING);
        }
        loop {
            let Some(followup) = Self::next_message(ctx, wait).await else {
                break;
            };
            wait = Duration::from_secs(settings.followup_idle_secs);
            output =
                Self::follow_up(ctx, &input, &followup, commit.clone(), prepared.clone()).await?;
            let events = ctx.history_length();
            if ctx.continue_as_new_suggested()
                || (settings.continue_as_new_events > 0
                    && events >= settings.continue_as_new_events)
            {
                // A message accepted meanwhile begins in this run first.
                if ctx.state(|s| s.pending.is_none()) {
                    let mut next = input.clone();
                    next.continuation = Some(Continuation {
                        turns: followup.turn,
                        status: output.status,
                        message: output.message.clone(),
                        commit: commit.clone(),
                        prepared: prepared.clone(),
                    });
                    ctx.continue_as_new(next, ContinueAsNewOptions::default())?;
                }
            }
        }
        if output.status == TaskStatus::Failed {
            // The run ended (limits, model errors) and its results are stored; the workflow
            // fails too so the Temporal UI shows it and offers Reset.
            return Err(failure(output.message));
        }
        Ok(output)
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

    /// Stops waiting for follow-ups: the workflow completes (a retry asks, to run again).
    #[signal(name = "close")]
    pub fn close(&mut self, _ctx: &mut SyncWorkflowContext<Self>) {
        self.closing = true;
    }

    #[query(name = "status")]
    pub fn status(&self, _ctx: &WorkflowContextView) -> StatusView {
        StatusView {
            status: self.status.unwrap_or(TaskStatus::Queued),
            message: self.message.clone(),
        }
    }

    #[update_validator(message)]
    pub fn validate_message(
        &self,
        _ctx: &WorkflowContextView,
        input: &MessageInput,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        patchflow_core::conversation::validate_message(&input.message)
            .map_err(|e| format!("{}: {}", e.field, e.reason))?;
        if self.running || self.pending.is_some() {
            let turn = self.pending.as_ref().map_or(self.turns.max(1), |p| p.turn);
            return Err(format!(
                "turn {turn} is still running: send the next message when it has ended"
            )
            .into());
        }
        if self.closing || self.cancel_reason.is_some() {
            return Err("the conversation is closing".into());
        }
        match self.status {
            Some(TaskStatus::Completed | TaskStatus::Failed) => Ok(()),
            Some(other) => Err(format!(
                "the task is {other}: only a COMPLETED or FAILED task takes a follow-up"
            )
            .into()),
            None => Err("the task has not started yet".into()),
        }
    }

    /// A follow-up message: accepted as the next turn (which begins at once).
    #[update(name = "message")]
    pub fn message(
        &mut self,
        _ctx: &mut SyncWorkflowContext<Self>,
        input: MessageInput,
    ) -> TurnAccepted {
        let turn = self.turns.max(1) + 1;
        self.pending = Some(FollowUp {
            turn,
            message: input.message,
        });
        TurnAccepted { turn }
    }
}

impl CodeTask {
    /// The task as submitted: fetch, stage, prepare, the agent (or its candidates), publish.
    async fn first_turn(
        ctx: &WorkflowContext<Self>,
        input: &CodeTaskInput,
    ) -> WorkflowResult<FirstTurn> {
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
                return Err(Self::end_early(ctx, &task_id, end, &[s]).await);
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
        let fetched = match Self::step(ctx, Steps::fetch_code, fetch, io_options(&settings, 600))
            .await
        {
            Ok(v) => v,
            Err(end) => {
                return Err(
                    Self::end_early(ctx, &task_id, end, &held(None, tenant_slot.as_ref())).await,
                );
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
            tree_bytes: fetched.bytes,
        };
        // Stage where the tree was fetched: on that worker's own queue; if it does not take
        // the step soon (it died), on the shared queue, where a worker fetches again.
        let here = match &fetched.worker_queue {
            Some(queue) => {
                let mut on_fetcher = io_options(&settings, 600);
                on_fetcher.task_queue = Some(queue.clone());
                on_fetcher.schedule_to_start_timeout = Some(Duration::from_secs(30));
                Some(Self::step(ctx, Steps::stage_code, stage.clone(), on_fetcher).await)
            }
            None => None,
        };
        let staged = match here {
            Some(Ok(v)) => Ok(v),
            Some(Err(EarlyEnd::NotStarted(_))) | None => {
                Self::step(ctx, Steps::stage_code, stage, io_options(&settings, 600)).await
            }
            Some(Err(end)) => Err(end),
        };
        let staged = match staged {
            Ok(v) => v,
            Err(end) => {
                return Err(
                    Self::end_early(ctx, &task_id, end, &held(None, tenant_slot.as_ref())).await,
                );
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
                return Err(Self::end_early(
                    ctx,
                    &task_id,
                    end,
                    &held(slot.as_ref(), tenant_slot.as_ref()),
                )
                .await);
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
                    return Err(Self::end_early(
                        ctx,
                        &task_id,
                        end,
                        &held(slot.as_ref(), tenant_slot.as_ref()),
                    )
                    .await);
                }
            }
        }

        let on = match &prepared {
            Some(p) => format!(
                "the prepared environment (cache {})",
                if p.cache_hit { "hit" } else { "miss" }
            ),
            None => format!("{} ({} bytes staged)", staged.key, staged.archive_bytes),
        };
        Self::record(
            ctx,
            &task_id,
            TaskStatus::RunningAgent,
            &if spec.candidates > 1 {
                format!("running {} candidate agents on {on}", spec.candidates)
            } else {
                format!("running the agent on {on}")
            },
        )
        .await?;
        let run = RunAgentInput {
            task_id: task_id.clone(),
            spec: spec.clone(),
            batch_slot: slot.clone(),
            prepared: prepared.clone(),
            candidate: None,
            followup: None,
            handoff: staged.handoff.clone(),
        };
        let published = if spec.candidates > 1 {
            let raced = Self::race(ctx, &run, &settings, fetched.commit.clone()).await;
            if let Some(s) = &slot {
                Self::release_slot(ctx, s).await;
            }
            match raced {
                Ok(p) => (p, None),
                Err(end) => {
                    return Err(Self::end_early(
                        ctx,
                        &task_id,
                        end,
                        &held(None, tenant_slot.as_ref()),
                    )
                    .await);
                }
            }
        } else {
            let summary: AgentSummary =
                match Self::step(ctx, Steps::run_agent, run, agent_options(&settings, &spec)).await
                {
                    Ok(v) => v,
                    Err(end) => {
                        return Err(Self::end_early(
                            ctx,
                            &task_id,
                            end,
                            &held(slot.as_ref(), tenant_slot.as_ref()),
                        )
                        .await);
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
                turn: None,
            };
            match Self::step(
                ctx,
                Steps::publish_result,
                publish,
                io_options(&settings, 120),
            )
            .await
            {
                Ok(v) => (v, Some(summary)),
                Err(end) => {
                    return Err(Self::end_early(
                        ctx,
                        &task_id,
                        end,
                        &held(None, tenant_slot.as_ref()),
                    )
                    .await);
                }
            }
        };
        let (published, summary) = published;
        // The final status is stored: the tenant's next task may start.
        if let Some(s) = &tenant_slot {
            Self::release_slot(ctx, s).await;
        }
        ctx.state_mut(|s| {
            s.status = Some(published.status);
            s.message = published.message.clone();
        });
        Ok(FirstTurn {
            output: CodeTaskOutput {
                status: published.status,
                message: published.message,
                summary,
            },
            commit: fetched.commit,
            prepared,
        })
    }

    /// Best-of-N: `run.spec.candidates` agents at once, each recorded as it ends, then
    /// published together.
    async fn race(
        ctx: &WorkflowContext<Self>,
        run: &RunAgentInput,
        settings: &WorkflowSettings,
        commit: Option<String>,
    ) -> Result<PublishOutput, EarlyEnd> {
        let task_id = &run.task_id;
        let first_finished =
            run.spec.auto_select == Some(patchflow_core::AutoSelect::FirstFinished);
        let runs = (1..=run.spec.candidates).map(|n| {
            let mut input = run.clone();
            input.candidate = Some(n);
            let opts = agent_options(settings, &run.spec);
            async move {
                Self::note_candidate(ctx, task_id, n, TaskStatus::RunningAgent, None, None).await;
                // A candidate also stops when another one won (`first_finished`).
                let stop = |s: &Self| s.cancel_reason.is_some() || s.stop_candidates;
                let ended = Self::step_until(ctx, Steps::run_agent, input, opts, stop).await;
                let (status, summary, error) = match ended {
                    Ok(s) if s.outcome.is_success() => (TaskStatus::Completed, Some(s), None),
                    Ok(s) => {
                        let why = s
                            .error
                            .clone()
                            .unwrap_or_else(|| s.outcome.describe().to_string());
                        (TaskStatus::Failed, Some(s), Some(why))
                    }
                    Err(end) => (end.status(), None, Some(end.message().to_string())),
                };
                Self::note_candidate(ctx, task_id, n, status, summary, error).await;
                ctx.state_mut(|s| {
                    s.finish_order.push(n);
                    if first_finished && status == TaskStatus::Completed {
                        s.stop_candidates = true;
                    }
                });
            }
        });
        futures::future::join_all(runs).await;
        if let Some(reason) = ctx.state(|s| s.cancel_reason.clone()) {
            return Err(EarlyEnd::Cancelled(reason));
        }
        let order = ctx.state(|s| s.finish_order.clone());
        Self::record(
            ctx,
            task_id,
            TaskStatus::UploadingResults,
            &format!("publishing {} candidates", run.spec.candidates),
        )
        .await
        .map_err(|e| EarlyEnd::Failed(root_cause(&e)))?;
        let input = PublishCandidatesInput {
            task_id: task_id.clone(),
            finish_order: order,
            commit,
        };
        Self::step(
            ctx,
            Steps::publish_candidates,
            input,
            io_options(settings, 300),
        )
        .await
    }

    /// Records a candidate's start or end. Best effort beyond its retries: the candidate's
    /// files are what selection reads, so a lost record only hides it from the list.
    async fn note_candidate(
        ctx: &WorkflowContext<Self>,
        task_id: &TaskId,
        candidate: u32,
        status: TaskStatus,
        summary: Option<AgentSummary>,
        error: Option<String>,
    ) {
        let update = CandidateUpdate {
            task_id: task_id.clone(),
            candidate,
            status,
            summary,
            error,
        };
        let _ = ctx
            .execute_local_activity(Steps::record_candidate, update, local_options(20))
            .await;
    }

    /// Waits for the next follow-up: `None` once `wait` passed without one, or the
    /// conversation is closing.
    async fn next_message(ctx: &WorkflowContext<Self>, wait: Duration) -> Option<FollowUp> {
        let ready = |s: &Self| s.pending.is_some() || s.closing || s.cancel_reason.is_some();
        if !ctx.state(ready) && !wait.is_zero() {
            let mut timer = std::pin::pin!(ctx.timer(wait));
            let mut landed = std::pin::pin!(ctx.wait_condition(ready));
            temporalio_sdk::workflows::select! {
                _ = timer.as_mut() => {},
                _ = landed.as_mut() => {},
            };
            if !ctx.state(|s| s.pending.is_some()) {
                use temporalio_sdk::CancellableFuture;
                timer.cancel();
            }
        }
        ctx.state(|s| s.pending.clone())
    }

    /// One follow-up turn: the agent resumes the stored conversation and changes, and its
    /// result is published as the task's. A cancelled turn ends the conversation.
    async fn follow_up(
        ctx: &WorkflowContext<Self>,
        input: &CodeTaskInput,
        followup: &FollowUp,
        commit: Option<String>,
        prepared: Option<PreparedEnv>,
    ) -> WorkflowResult<CodeTaskOutput> {
        let task_id = &input.task_id;
        let settings = &input.settings;
        let turn = followup.turn;
        ctx.state_mut(|s| {
            s.running = true;
            s.pending = None;
            s.turns = turn;
            s.status = Some(TaskStatus::RunningAgent);
            s.message = format!("turn {turn}: running the agent on the follow-up");
        });
        let start = TurnStart {
            task_id: task_id.clone(),
            turn,
            message: followup.message.clone(),
        };
        let began = ctx
            .execute_local_activity(Steps::begin_turn, start, local_options(30))
            .await;
        let ended = match began {
            Err(e) => Err(EarlyEnd::Failed(root_cause(&e))),
            Ok(()) => {
                let run = RunAgentInput {
                    task_id: task_id.clone(),
                    spec: input.spec.clone(),
                    batch_slot: None,
                    prepared,
                    candidate: None,
                    followup: Some(followup.clone()),
                    handoff: None,
                };
                Self::step(
                    ctx,
                    Steps::run_agent,
                    run,
                    agent_options(settings, &input.spec),
                )
                .await
            }
        };
        let summary = match ended {
            Ok(s) => s,
            Err(end) => {
                let message = format!("turn {turn}: {}", end.message());
                Self::record_turn(ctx, task_id, end.status(), &message, Some(turn)).await?;
                ctx.state_mut(|s| s.running = false);
                if let EarlyEnd::Cancelled(_) = end {
                    return Err(end.termination());
                }
                return Ok(CodeTaskOutput {
                    status: TaskStatus::Failed,
                    message,
                    summary: None,
                });
            }
        };
        Self::record_turn(
            ctx,
            task_id,
            TaskStatus::UploadingResults,
            &format!(
                "turn {turn}: publishing results ({} after {} steps)",
                summary.outcome.describe(),
                summary.steps
            ),
            Some(turn),
        )
        .await?;
        let publish = PublishInput {
            task_id: task_id.clone(),
            summary: summary.clone(),
            commit,
            turn: Some(turn),
        };
        let published = match Self::step(
            ctx,
            Steps::publish_result,
            publish,
            io_options(settings, 120),
        )
        .await
        {
            Ok(p) => p,
            Err(end) => {
                let message = format!("turn {turn}: {}", end.message());
                Self::record_turn(ctx, task_id, end.status(), &message, Some(turn)).await?;
                ctx.state_mut(|s| s.running = false);
                if let EarlyEnd::Cancelled(_) = end {
                    return Err(end.termination());
                }
                PublishOutput {
                    status: TaskStatus::Failed,
                    message,
                }
            }
        };
        ctx.state_mut(|s| {
            s.running = false;
            s.status = Some(published.status);
            s.message = published.message.clone();
        });
        Ok(CodeTaskOutput {
            status: published.status,
            message: published.message,
            summary: Some(summary),
        })
    }

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
        Self::step_until(ctx, activity, input, options, |s: &Self| {
            s.cancel_reason.is_some()
        })
        .await
    }
    /// Runs one activity, racing it against `stop` (a cancel request, or another
    /// candidate's win).
    async fn step_until<AD>(
        ctx: &WorkflowContext<Self>,
        activity: AD,
        input: AD::Input,
        options: ActivityOptions,
        stop: fn(&Self) -> bool,
    ) -> Result<AD::Output, EarlyEnd>
    where
        AD: ActivityDefinition,
        AD::Output: TemporalDeserializable,
    {
        if let Some(reason) = ctx.state(|s| s.cancel_reason.clone()) {
            return Err(EarlyEnd::Cancelled(reason));
        }
        if ctx.state(stop) {
            return Err(EarlyEnd::Cancelled(cancel_reason(ctx)));
        }
        let activity = std::pin::pin!(ctx.execute_activity(activity, input, options));
        let cancel = std::pin::pin!(ctx.wait_condition(stop));
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
            Some(Err(e)) if never_started(&e) => Err(EarlyEnd::NotStarted(root_cause(&e))),
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
        Self::record_turn(ctx, task_id, status, message, None).await
    }

    /// [`Self::record`] of a follow-up turn's status (a final one ends the turn).
    async fn record_turn(
        ctx: &WorkflowContext<Self>,
        task_id: &TaskId,
        status: TaskStatus,
        message: &str,
        turn: Option<u32>,
    ) -> WorkflowResult<()> {
        ctx.state_mut(|s| {
            s.status = Some(status);
            s.message = message.to_string();
        });
        let update = StatusUpdate {
            task_id: task_id.clone(),
            status,
            message: message.to_string(),
            turn,
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
    ) -> WorkflowTermination {
        if let Err(e) = Self::record(ctx, task_id, end.status(), end.message()).await {
            return e;
        }
        for slot in slots {
            Self::release_slot(ctx, slot).await;
        }
        end.termination()
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

/// `run_agent`'s options: the agents' task queue, the task's wall time (from the start:
/// waiting for a free agent slot does not count), heartbeats, and a cancellation that
/// waits for the agent to be gone.
fn agent_options(settings: &WorkflowSettings, spec: &patchflow_core::TaskSpec) -> ActivityOptions {
    ActivityOptions::with_start_to_close_timeout(Duration::from_secs(
        spec.limits.wall_seconds + 120,
    ))
    .maybe_task_queue(settings.agent_task_queue.clone())
    .heartbeat_timeout(Duration::from_secs(settings.heartbeat_timeout_secs.max(1)))
    .cancellation_type(ActivityCancellationType::WaitCancellationCompleted)
    .retry_policy(retry_policy(settings))
    .build()
}

/// A local activity's options: a few quick retries, and no cancellation inherited from
/// the workflow (what it records must be recorded).
fn local_options(attempts: u32) -> LocalActivityOptions {
    LocalActivityOptions::builder()
        .start_to_close_timeout(Duration::from_secs(30))
        .retry_policy(
            RetryPolicy::builder()
                .initial_interval(Duration::from_millis(200))
                .maximum_interval(Duration::from_secs(10))
                .maximum_attempts(attempts)
                .build(),
        )
        .cancellation_token(WorkflowCancellationToken::new())
        .build()
}

/// A short step's options. Its activity heartbeats every second (`Beating`), so a worker
/// that dies holding it costs the heartbeat timeout, not `timeout_secs`.
fn io_options(settings: &WorkflowSettings, timeout_secs: u64) -> ActivityOptions {
    ActivityOptions::with_start_to_close_timeout(Duration::from_secs(timeout_secs))
        .heartbeat_timeout(Duration::from_secs(settings.heartbeat_timeout_secs.max(1)))
        .retry_policy(retry_policy(settings))
        .build()
}

/// Whether the activity failed because no worker started it in time (a schedule-to-start
/// timeout), as opposed to failing while it ran.
fn never_started(e: &ActivityExecutionError) -> bool {
    use temporalio_common::protos::temporal::api::enums::v1::TimeoutType;
    use temporalio_common::protos::temporal::api::failure::v1::failure::FailureInfo;
    let mut failure = e.failure();
    while let Some(f) = failure {
        if let Some(FailureInfo::TimeoutFailureInfo(t)) = &f.failure_info
            && t.timeout_type == TimeoutType::ScheduleToStart as i32
        {
            return true;
        }
        failure = f.cause.as_deref();
    }
    false
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
