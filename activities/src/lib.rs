//! The activities of the `CodeTask` workflow: the steps that do I/O. Each is bound to its
//! declaration in `patchflow_workflows::steps`, so a changed signature fails to compile.
//!
//! - [`fetch`]: `fetch_code`, a shallow git fetch or a safe ZIP unpack.
//! - [`stage`]: `stage_code`, the tree as tar.zst into the object store.
//! - [`runner`]: `run_agent`, the agent in a fresh workspace (local child process here).
//! - `publish_result` and `record_status`, which write the task store, both through
//!   `Activities::change_status` (the platform's status path, then the result message).
//!
//! Errors caused by the input (a repository that does not exist, a ZIP that tries to
//! escape) are non-retryable so the task fails once with the reason; everything else is
//! retried by Temporal's policy.

pub mod egress;
pub mod environment;
pub mod fetch;
pub mod handoff;
pub mod pull_request;
pub mod results;
pub mod runner;
pub mod stage;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use patchflow_core::{
    AgentEvent, AgentSummary, TaskEvent, TaskEventKind, TaskId, TaskStatus, layout,
};
use patchflow_platform::cache::{CacheError, Hot};
use patchflow_platform::metrics;
use patchflow_platform::status::{self, CacheDuty, StatusWrite};
use patchflow_platform::{ObjectStore, StatusChange, StoreError, TaskStore};
use patchflow_workflows::io::{
    CandidateUpdate, FetchInput, FetchOutput, PrepareInput, PreparedEnv, PublishCandidatesInput,
    PublishInput, PublishOutput, PullRequestInput, PullRequestOutput, RunAgentInput, SlotInput,
    StageInput, StageOutput, StatusUpdate, TurnStart,
};
use patchflow_workflows::steps::markers as steps;
use temporalio_macros::activities;
use temporalio_sdk::ApplicationFailure;
use temporalio_sdk::activities::{ActivityContext, ActivityError};
use tokio_util::sync::CancellationToken;

pub use runner::{
    AgentRunner, KubeRunner, KubeRunnerConfig, LocalRunner, LocalRunnerConfig, RunTarget,
    RunnerError,
};

/// How often a running agent's batch slot lease is renewed (leases last `batch_lease`).
const SLOT_RENEW_EVERY: Duration = Duration::from_secs(5);

/// What the activities need besides the stores.
#[derive(Debug, Clone)]
pub struct ActivityConfig {
    /// Fetched trees and agent workspaces live here, one directory per task (`work_dir`,
    /// default `<data_dir>/work`).
    pub work_root: PathBuf,
    pub allow_local_sources: bool,
    /// Which remotes `fetch_code` may reach (`git_allowed_protocols`, `git_allowed_hosts`).
    pub git_remotes: patchflow_platform::git_remote::RemotePolicy,
    pub max_unpacked_bytes: u64,
    pub max_archive_entries: u64,
    /// Longest a git fetch may take.
    pub git_fetch_timeout: Duration,
    /// Opens the sealed `git_token` of a task.
    pub secrets: Arc<patchflow_platform::secret_box::SecretBox>,
    /// Lifetime of a batch slot lease; holders renew it with their heartbeats.
    pub batch_lease: Duration,
    /// The forges and credentials pull requests are opened with.
    pub pull_requests: pull_request::PrSettings,
    /// Setup scripts: the sandbox they run in and the environment cache.
    pub environments: environment::EnvSettings,
    /// The task queue only this worker polls (for `stage_code`, after its own `fetch_code`);
    /// `None` where no such queue is polled.
    pub worker_queue: Option<String>,
}

impl ActivityConfig {
    pub fn work_dir(&self, task: &TaskId) -> PathBuf {
        self.work_root.join(task.as_str())
    }
}

/// Heartbeats the activity every second while it lives, from [`first_beat`] on: a step
/// whose worker dies is retried elsewhere once the heartbeat timeout passes, not its whole
/// start-to-close time.
struct Beating(tokio::task::JoinHandle<()>);

/// When an activity sends its first heartbeat: half its heartbeat timeout in (1 s without
/// one). Not at once: a step that ends before then (most fetches and stages, a short agent)
/// costs the server no heartbeat write, and the first one still lands well inside the
/// timeout.
fn first_beat(ctx: &ActivityContext) -> Duration {
    ctx.info()
        .heartbeat_timeout
        .map_or(Duration::from_secs(1), |t| {
            (t / 2).max(Duration::from_millis(100))
        })
}

/// A one-second heartbeat ticker whose first tick is at `first` ([`first_beat`] in).
fn heartbeat_ticker(first: tokio::time::Instant) -> tokio::time::Interval {
    tokio::time::interval_at(first, Duration::from_secs(1))
}

impl Beating {
    fn start(ctx: &ActivityContext) -> Self {
        let ctx = ctx.clone();
        Self(tokio::spawn(async move {
            let mut tick = heartbeat_ticker(tokio::time::Instant::now() + first_beat(&ctx));
            loop {
                tick.tick().await;
                let _ = ctx.record_heartbeat(()).await;
            }
        }))
    }
}

impl Drop for Beating {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The `run_agent` activity alone, for a worker that polls only the agents' task queue.
pub use self::activities::RunAgent as RunAgentActivity;
/// The `stage_code` activity alone, for the task queue only one worker polls.
pub use self::activities::StageCode as StageCodeActivity;

/// The activity implementations with their shared state (cheap to clone: a worker's agents
/// and its other steps poll apart with one copy each).
#[derive(Clone)]
pub struct Activities {
    pub store: Arc<dyn TaskStore>,
    pub objects: Arc<dyn ObjectStore>,
    /// Live events and the status cache (Redis, or in-process on one machine).
    pub hot: Hot,
    pub config: ActivityConfig,
    pub runner: Arc<dyn AgentRunner>,
    /// The Kafka results topic, when Kafka is configured.
    pub results: Option<results::ResultsTopic>,
}

impl Activities {
    /// Produces the finished task's result message (when Kafka is configured); a failure
    /// is transient, so Temporal retries the activity and the message is not lost.
    async fn publish_result_message(&self, task: &TaskId) -> Result<(), ActivityError> {
        let Some(results) = &self.results else {
            return Ok(());
        };
        results
            .publish(self.store.as_ref(), self.objects.as_ref(), task)
            .await
            .map(drop)
            .map_err(|e| transient(format!("cannot publish the result of {task}: {e}")))
    }

    /// Waits until `slot`'s task holds a slot of its batch, heartbeating meanwhile. A cache
    /// that does not answer is waited out too: running over the limit would break the
    /// promise the limit makes.
    async fn wait_for_slot(
        &self,
        ctx: &ActivityContext,
        slot: &SlotInput,
    ) -> Result<(), ActivityError> {
        let mut logged = false;
        loop {
            match self
                .hot
                .slots
                .try_acquire(
                    &slot.batch_id,
                    slot.task_id.as_str(),
                    slot.limit,
                    slot.lease_secs
                        .map_or(self.config.batch_lease, Duration::from_secs),
                )
                .await
            {
                Ok(true) => {
                    tracing::info!(task_id = %slot.task_id, batch_id = %slot.batch_id, limit = slot.limit, "batch slot taken");
                    return Ok(());
                }
                Ok(false) => {
                    if !logged {
                        tracing::info!(task_id = %slot.task_id, batch_id = %slot.batch_id, limit = slot.limit, "waiting for a batch slot");
                        logged = true;
                        // A tenant's slot is taken before the task leaves QUEUED: say why it
                        // waits, in its events.
                        if let Some(tenant) = slot.batch_id.strip_prefix("tenant:") {
                            let msg = format!(
                                "waiting: tenant `{tenant}` has {} tasks running (max_running = {}); this one starts when one ends",
                                slot.limit, slot.limit
                            );
                            let _ = self
                                .store
                                .append_event(
                                    &slot.task_id,
                                    patchflow_core::TaskEventKind::Agent,
                                    &msg,
                                )
                                .await;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(task_id = %slot.task_id, error = %e, "cannot take a batch slot yet");
                }
            }
            let _ = ctx.record_heartbeat(()).await;
            tokio::select! {
                _ = ctx.cancelled() => return Err(ActivityError::cancelled()),
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    /// The worker's one writer of a task's status, final ones included (`record_status` and
    /// `publish_result` both come here). The write carries the run id of the workflow run
    /// that called the activity, which places it among the task's attempts: a run the store
    /// has not seen (a retry, or a reset done by hand in the Temporal UI) begins a new
    /// attempt by itself. Once a final status is stored, applied now or by an earlier try
    /// of this activity whose result message was lost, the result message goes out.
    async fn change_status(
        &self,
        ctx: &ActivityContext,
        id: &TaskId,
        status: TaskStatus,
        message: &str,
    ) -> Result<StatusChange, ActivityError> {
        let run_id = ctx
            .info()
            .workflow_run_id
            .as_deref()
            .filter(|run| !run.is_empty());
        let write = StatusWrite {
            task: id,
            run_id,
            status,
            message,
        };
        let change = status::change_status(
            self.store.as_ref(),
            &self.hot,
            write,
            &|duty: CacheDuty, e: &CacheError| match duty {
                CacheDuty::LiveEvents => tracing::warn!(task_id = %id, error = %e, "cannot publish a live event (readers fall back to the database)"),
                CacheDuty::StatusCache => tracing::warn!(task_id = %id, error = %e, "cannot invalidate the cached status"),
            },
        )
        .await
        .map_err(|e| match e {
            StoreError::NotFound(_) => bad_input(format!("task {id} is not in the task store")),
            other => transient(other),
        })?;
        if status.is_terminal() {
            self.publish_result_message(id).await?;
            if matches!(change, StatusChange::Applied { .. }) {
                self.comment_on_issue(id).await;
            }
        }
        Ok(change)
    }

    /// Copies the published result files to the attempt's own keys, which a later attempt
    /// does not overwrite (`patchflow replay --attempt N` reads them). The attempt is the one
    /// the store placed this workflow run in. Best effort: the latest result stays in place
    /// whatever happens here, so a failed copy is only logged.
    async fn keep_attempt_results(
        &self,
        ctx: &ActivityContext,
        id: &TaskId,
        stored: &[patchflow_platform::objectstore::ObjectMeta],
    ) {
        let run_id = ctx.info().workflow_run_id.clone().unwrap_or_default();
        let attempt = match self.store.get(id).await {
            Ok(Some(r)) => r
                .attempts
                .iter()
                .find(|a| !run_id.is_empty() && a.run_id.as_deref() == Some(run_id.as_str()))
                .or(r.attempts.last())
                .map_or(1, |a| a.attempt),
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(task_id = %id, error = %e, "cannot keep the attempt's result files");
                return;
            }
        };
        for file in layout::RESULT_FILES {
            let key = layout::result_key(id, file);
            if !stored.iter().any(|o| o.key == key) {
                continue;
            }
            let copied = match self.objects.get_bytes(&key).await {
                Ok(bytes) => {
                    self.objects
                        .put_bytes(&layout::attempt_result_key(id, attempt, file), &bytes)
                        .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = copied {
                tracing::warn!(task_id = %id, attempt, file, error = %e, "cannot keep the attempt's result file");
            }
        }
    }

    /// Opens the task's pull request if it asked for one: `None` when it did not, else the
    /// URL or why not (both stored in the record, and said in an event). Only a store that
    /// cannot be written fails the step.
    async fn pull_request(
        &self,
        id: &TaskId,
        summary: &AgentSummary,
        commit: Option<&str>,
    ) -> Result<Option<Result<String, String>>, ActivityError> {
        let record = self
            .store
            .get(id)
            .await
            .map_err(transient)?
            .ok_or_else(|| bad_input(format!("task {id} is not in the task store")))?;
        if !record.spec.open_pr {
            return Ok(None);
        }
        self.open_and_record(&record, summary, commit)
            .await
            .map(Some)
    }

    /// Pushes the diff and opens the pull request of `record`, and records the URL or why
    /// not (the record's fields and an event).
    async fn open_and_record(
        &self,
        record: &patchflow_core::TaskRecord,
        summary: &AgentSummary,
        commit: Option<&str>,
    ) -> Result<Result<String, String>, ActivityError> {
        let id = &record.task_id;
        let outcome = match self.diff_file(id).await {
            Ok(diff) => pull_request::open(
                &self.config,
                &self.config.pull_requests,
                record,
                summary,
                commit,
                &diff,
            )
            .await
            .map_err(|e| e.0),
            Err(e) => Err(e),
        };
        let (url, error) = match &outcome {
            Ok(url) => (Some(url.as_str()), None),
            Err(e) => (None, Some(e.as_str())),
        };
        self.store
            .set_pull_request(id, url, error)
            .await
            .map_err(transient)?;
        // Readers of a cached record see the pull request at once.
        if let Err(e) = self.hot.status.invalidate(id).await {
            tracing::warn!(task_id = %id, error = %e, "cannot invalidate the cached status");
        }
        let note = match &outcome {
            Ok(url) => format!("pull request: {url}"),
            Err(e) => format!("pull request not opened: {e}"),
        };
        match &outcome {
            Ok(url) => tracing::info!(task_id = %id, %url, "pull request opened"),
            Err(e) => tracing::warn!(task_id = %id, error = %e, "pull request not opened"),
        }
        self.record_event(id, TaskEventKind::Agent, note).await;
        Ok(outcome)
    }

    /// Says on the task's issue, if it came from one, how it ended (a failure is logged:
    /// the task's own outcome stands).
    async fn comment_on_issue(&self, id: &TaskId) {
        let record = match self.store.get(id).await {
            Ok(Some(r)) if r.spec.issue.is_some() => r,
            Ok(_) => return,
            Err(e) => {
                tracing::warn!(task_id = %id, error = %e, "cannot read the task to comment on its issue");
                return;
            }
        };
        match pull_request::comment_on_issue(&self.config, &self.config.pull_requests, &record)
            .await
        {
            Ok(()) => tracing::info!(task_id = %id, "commented on the issue"),
            Err(e) => tracing::warn!(task_id = %id, error = %e.0, "cannot comment on the issue"),
        }
    }

    /// The task's diff, downloaded beside its work tree.
    async fn diff_file(&self, id: &TaskId) -> Result<PathBuf, String> {
        let path = self.config.work_dir(id).join("pr.patch");
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
        }
        self.objects
            .get_to_file(&layout::result_key(id, layout::DIFF), &path)
            .await
            .map_err(|e| format!("cannot read the diff: {e}"))?;
        Ok(path)
    }

    /// Ends follow-up turn `turn` in the task's record: its status, the agent's account of
    /// it, the time. Best effort: the task's own status is already stored.
    async fn end_turn(&self, id: &TaskId, turn: u32, status: TaskStatus, summary: Option<&str>) {
        let stored = match self.store.get(id).await {
            Ok(Some(r)) => r.turns.into_iter().find(|t| t.turn == turn),
            _ => None,
        };
        let Some(mut t) = stored else { return };
        t.status = status;
        if let Some(s) = summary {
            t.summary = s.to_string();
        }
        t.finished_at = Some(chrono::Utc::now());
        if let Err(e) = self.store.put_turn(id, &t).await {
            tracing::warn!(task_id = %id, turn, error = %e, "cannot record the turn's end");
        }
        let _ = self.hot.status.invalidate(id).await;
    }

    /// Makes follow-up turn `turn`'s results the task's: turn 1's own files are kept at
    /// `turns/1/` first, the transcript becomes every turn's lines in order, the rest is
    /// replaced (the diff is cumulative). Safe to run again: a retried publish neither
    /// overwrites turn 1's files with a later turn's nor repeats transcript lines.
    async fn adopt_turn(&self, id: &TaskId, turn: u32) -> Result<(), ActivityError> {
        use patchflow_platform::objectstore::copy_files;
        let root = layout::results_prefix(id);
        let objects = self.objects.as_ref();
        let kept = objects
            .exists(&layout::turn_key(id, 1, layout::SUMMARY))
            .await
            .map_err(transient)?;
        if turn == 2 && !kept {
            copy_files(
                objects,
                &root,
                &layout::turn_key(id, 1, ""),
                &layout::RUN_FILES,
            )
            .await
            .map_err(transient)?;
        }
        let mut transcript = Vec::new();
        for t in 1..=turn {
            match objects
                .get_bytes(&layout::turn_key(id, t, layout::TRANSCRIPT))
                .await
            {
                Ok(b) => transcript.extend_from_slice(&b),
                Err(patchflow_platform::ObjectError::NotFound(_)) => {}
                Err(e) => return Err(transient(e)),
            }
        }
        objects
            .put_bytes(&layout::result_key(id, layout::TRANSCRIPT), &transcript)
            .await
            .map_err(transient)?;
        let rest: Vec<&str> = layout::RUN_FILES
            .into_iter()
            .filter(|f| *f != layout::TRANSCRIPT && *f != layout::TURN_DIFF)
            .collect();
        copy_files(objects, &layout::run_prefix(id, turn, None), &root, &rest)
            .await
            .map_err(transient)?;
        Ok(())
    }

    /// Appends an event to the task's history and publishes it to live readers.
    async fn record_event(&self, task: &TaskId, kind: TaskEventKind, message: String) {
        match self.store.append_event(task, kind, &message).await {
            Ok(seq) => {
                // Not a status change: the event goes to live readers, the cached record
                // stays (it holds no agent events).
                let ev = TaskEvent {
                    seq,
                    kind,
                    status: None,
                    message,
                    at: chrono::Utc::now(),
                };
                if let Err(e) = self.hot.events.publish(task, &ev).await {
                    tracing::warn!(task_id = %task, error = %e, "cannot publish a live event (readers fall back to the database)");
                }
            }
            Err(e) => tracing::warn!(task_id = %task, error = %e, "cannot record an event"),
        }
    }
}

/// Records a step's duration when it is dropped, however the step ended.
struct StepTimer(&'static str, std::time::Instant);

impl StepTimer {
    fn new(step: &'static str) -> Self {
        Self(step, std::time::Instant::now())
    }
}

impl Drop for StepTimer {
    fn drop(&mut self) {
        metrics::global().step(self.0, self.1.elapsed().as_secs_f64());
    }
}

/// A failure that retrying cannot fix.
pub(crate) fn bad_input(msg: impl std::fmt::Display) -> ActivityError {
    ApplicationFailure::non_retryable(std::io::Error::other(msg.to_string())).into()
}

/// A failure worth retrying (infrastructure, a crashed process).
pub(crate) fn transient(msg: impl std::fmt::Display) -> ActivityError {
    ActivityError::from(anyhow::anyhow!(msg.to_string()))
}

/// The task id of an activity input, checked: ids travel as [`TaskId`] but deserialise
/// unchecked, and one names directories and object keys here, so an input that did not
/// come from the gateway is refused before it is used.
fn task_id(id: &TaskId) -> Result<TaskId, ActivityError> {
    id.as_str().parse::<TaskId>().map_err(bad_input)
}

#[activities]
impl Activities {
    #[activity(definition = steps::RecordStatus)]
    pub async fn record_status(
        self: Arc<Self>,
        ctx: ActivityContext,
        update: StatusUpdate,
    ) -> Result<(), ActivityError> {
        let id = task_id(&update.task_id)?;
        match self
            .change_status(&ctx, &id, update.status, &update.message)
            .await?
        {
            StatusChange::Applied { .. } => {
                tracing::info!(task_id = %id, status = %update.status, message = %update.message, "status");
                if update.status == TaskStatus::DownloadingCode {
                    // The queue step: from the attempt's start (its QUEUED) to a worker.
                    if let Ok(Some(r)) = self.store.get(&id).await
                        && let Some(a) = r.attempts.iter().find(|a| a.attempt == r.attempt)
                    {
                        let waited = chrono::Utc::now() - a.started_at;
                        metrics::global().step("queue", waited.as_seconds_f64().max(0.0));
                    }
                }
                if let Some(turn) = update.turn
                    && update.status.is_terminal()
                {
                    self.end_turn(&id, turn, update.status, None).await;
                }
            }
            StatusChange::Ignored { current } => {
                tracing::debug!(task_id = %id, status = %update.status, %current, "status write ignored (out of order)");
            }
        }
        Ok(())
    }

    #[activity(definition = steps::AcquireBatchSlot)]
    pub async fn acquire_batch_slot(
        self: Arc<Self>,
        ctx: ActivityContext,
        slot: SlotInput,
    ) -> Result<(), ActivityError> {
        self.wait_for_slot(&ctx, &slot).await
    }

    #[activity(definition = steps::ReleaseBatchSlot)]
    pub async fn release_batch_slot(
        self: Arc<Self>,
        _ctx: ActivityContext,
        slot: SlotInput,
    ) -> Result<(), ActivityError> {
        self.hot
            .slots
            .release(&slot.batch_id, slot.task_id.as_str())
            .await
            .map_err(transient)?;
        tracing::info!(task_id = %slot.task_id, batch_id = %slot.batch_id, "batch slot released");
        Ok(())
    }

    #[activity(definition = steps::FetchCode)]
    pub async fn fetch_code(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: FetchInput,
    ) -> Result<FetchOutput, ActivityError> {
        let _beating = Beating::start(&ctx);
        let id = task_id(&input.task_id)?;
        // A workflow started in Temporal directly never met a gateway: check it as one would.
        input
            .source
            .validate(self.config.allow_local_sources)
            .map_err(|e| bad_input(format!("refused task source: {e}")))?;
        let _timer = StepTimer::new("fetch");
        let mut fetched =
            fetch::fetch(&self.config, self.objects.as_ref(), &id, &input.source).await?;
        fetched.worker_queue.clone_from(&self.config.worker_queue);
        Ok(fetched)
    }

    #[activity(definition = steps::StageCode)]
    pub async fn stage_code(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: StageInput,
    ) -> Result<StageOutput, ActivityError> {
        let _beating = Beating::start(&ctx);
        let id = task_id(&input.task_id)?;
        let _timer = StepTimer::new("stage");
        let keep_local = self.runner.runs_on_this_machine();
        stage::stage(&self.config, self.objects.as_ref(), &id, &input, keep_local).await
    }

    #[activity(definition = steps::PrepareEnvironment)]
    pub async fn prepare_environment(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: PrepareInput,
    ) -> Result<PreparedEnv, ActivityError> {
        // Through every phase (restore, the script, packing and storing the products), not
        // the script alone: packing a large environment on a busy machine outlasted the
        // heartbeat timeout and ran the step twice.
        let _beating = Beating::start(&ctx);
        let id = task_id(&input.task_id)?;
        input
            .spec
            .validate(self.config.allow_local_sources)
            .map_err(|e| bad_input(format!("refused task: {e}")))?;
        let _timer = StepTimer::new("environment");
        self.prepare(&ctx, &id, &input).await
    }

    #[activity(definition = steps::RunAgent)]
    pub async fn run_agent(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: RunAgentInput,
    ) -> Result<AgentSummary, ActivityError> {
        let id = task_id(&input.task_id)?;
        input
            .spec
            .validate(self.config.allow_local_sources)
            .map_err(|e| bad_input(format!("refused task: {e}")))?;
        if let Some(slot) = &input.batch_slot {
            // Held already on a first attempt; a retry after a crash may have lost it.
            self.wait_for_slot(&ctx, slot).await?;
        }
        let attempt = ctx.info().attempt;
        // Time in the agents' task queue: waiting for a worker with a free agent slot.
        if let Some(waited) = ctx
            .info()
            .current_attempt_scheduled_time
            .and_then(|t| t.elapsed().ok())
        {
            metrics::global().step("agent_queue", waited.as_secs_f64());
            if waited >= Duration::from_secs(2) {
                self.record_event(
                    &id,
                    TaskEventKind::Status,
                    format!(
                        "waited {:.0} s for a free agent slot (every worker was at worker_max_agents)",
                        waited.as_secs_f64()
                    ),
                )
                .await;
            }
        }
        let workflow_run = ctx.info().workflow_run_id.clone().filter(|r| !r.is_empty());
        // The record names the worker that runs the agent (the last one, if a crash moved it).
        if let Some(run_id) = &workflow_run
            && let Err(e) = self
                .store
                .set_attempt_worker(&id, run_id, patchflow_platform::process::worker_identity())
                .await
        {
            tracing::warn!(task_id = %id, error = %e, "cannot record the attempt's worker");
        }
        let _running = metrics::RunningAgent::start();
        let started = std::time::Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<AgentEvent>();
        let cancel = CancellationToken::new();
        let target = RunTarget {
            candidate: input.candidate,
            followup: input.followup.clone(),
            workflow_run,
            handoff: input.handoff.clone(),
        };
        // Candidates run at once and turns one after another: each its own directory.
        let dir = match (&target.followup, target.candidate) {
            (Some(f), _) => format!("run-t{}-{attempt}", f.turn),
            (None, Some(n)) => format!("run-c{n}-{attempt}"),
            (None, None) => format!("run-{attempt}"),
        };
        let work = self.config.work_dir(&id).join(dir);
        let label = target.label();
        let run = self.runner.run_target(
            &target,
            &id,
            &input.spec,
            input.prepared.as_ref(),
            self.objects.as_ref(),
            &work,
            tx,
            cancel.clone(),
        );
        tokio::pin!(run);
        // Heartbeats go out every second whatever the agent is doing (a slow model turn
        // is silent), so even a short heartbeat timeout never fires on a live agent; the
        // SDK batches them, so this costs little. The batch slot is renewed less often.
        // Before the first tick, agent events send none: an agent that ends sooner costs
        // the server no heartbeat write.
        let beat_from = tokio::time::Instant::now() + first_beat(&ctx);
        let mut tick = heartbeat_ticker(beat_from);
        let mut renewed = tokio::time::Instant::now();
        let mut last_step = 0u32;
        let result = loop {
            tokio::select! {
                r = &mut run => break r,
                Some(event) = rx.recv() => {
                    if let AgentEvent::ModelRequest { step } = &event {
                        last_step = *step;
                    }
                    metrics::global().agent_event(&event);
                    self.record_event(&id, TaskEventKind::Agent, format!("{label}{}", event.describe())).await;
                    if tokio::time::Instant::now() >= beat_from {
                        let _ = ctx.record_heartbeat(last_step).await;
                    }
                }
                _ = tick.tick() => {
                    let _ = ctx.record_heartbeat(last_step).await;
                    if let Some(slot) = &input.batch_slot
                        && renewed.elapsed() >= SLOT_RENEW_EVERY
                    {
                        renewed = tokio::time::Instant::now();
                        if let Err(e) = self.hot.slots.renew(&slot.batch_id, slot.task_id.as_str(), self.config.batch_lease).await {
                            tracing::warn!(task_id = %id, error = %e, "cannot renew the batch slot");
                        }
                    }
                }
                _ = ctx.cancelled(), if !cancel.is_cancelled() => {
                    tracing::info!(task_id = %id, "run_agent cancelled; stopping the agent");
                    cancel.cancel();
                }
            }
        };
        metrics::global().step("agent", started.elapsed().as_secs_f64());
        // Events still queued when the run ended.
        while let Ok(event) = rx.try_recv() {
            metrics::global().agent_event(&event);
            let _ = self
                .store
                .append_event(
                    &id,
                    TaskEventKind::Agent,
                    &format!("{label}{}", event.describe()),
                )
                .await;
        }
        match result {
            Ok(summary) => {
                metrics::global().agent_ran(&summary, &input.spec.tenant);
                Ok(summary)
            }
            Err(RunnerError::Cancelled) => Err(ActivityError::cancelled()),
            Err(RunnerError::BadInput(m)) => Err(bad_input(m)),
            Err(e) => Err(transient(e)),
        }
    }

    /// `POST /api/tasks/{id}/pull-request`: the pull request of a task that ended with
    /// changes, opened now (with the request's token when it brought one).
    #[activity(definition = steps::OpenPullRequest)]
    pub async fn open_pull_request(
        self: Arc<Self>,
        _ctx: ActivityContext,
        input: PullRequestInput,
    ) -> Result<PullRequestOutput, ActivityError> {
        let id = task_id(&input.task_id)?;
        let mut record = self
            .store
            .get(&id)
            .await
            .map_err(transient)?
            .ok_or_else(|| bad_input(format!("task {id} is not in the task store")))?;
        let summary = match (&record.status, &record.summary) {
            (TaskStatus::Completed, Some(s)) if !s.files_changed.is_empty() => s.clone(),
            (TaskStatus::Completed, _) => {
                return Err(bad_input(format!(
                    "task {id} changed no file: there is nothing to propose"
                )));
            }
            (status, _) => {
                return Err(bad_input(format!(
                    "task {id} is {status}: only a COMPLETED task has a pull request to open"
                )));
            }
        };
        if input.github_token.is_some() {
            record.spec.github_token = input.github_token;
        }
        // The commit the task started from is not kept; the diff goes on the source's
        // ref as it is now (a conflict is said in pr_error).
        let outcome = self.open_and_record(&record, &summary, None).await?;
        Ok(match outcome {
            Ok(url) => PullRequestOutput {
                pr_url: Some(url),
                pr_error: None,
            },
            Err(e) => PullRequestOutput {
                pr_url: None,
                pr_error: Some(e),
            },
        })
    }

    #[activity(definition = steps::PublishResult)]
    pub async fn publish_result(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: PublishInput,
    ) -> Result<PublishOutput, ActivityError> {
        let _beating = Beating::start(&ctx);
        let id = task_id(&input.task_id)?;
        let _timer = StepTimer::new("publish");
        if let Some(turn) = input.turn.filter(|t| *t > 1) {
            self.adopt_turn(&id, turn).await?;
        }
        let stored = self
            .objects
            .list(&layout::results_prefix(&id))
            .await
            .map_err(transient)?;
        for file in [layout::DIFF, layout::SUMMARY] {
            let key = layout::result_key(&id, file);
            if !stored.iter().any(|o| o.key == key) {
                return Err(transient(format!(
                    "result file {key} is missing from the object store"
                )));
            }
        }
        self.store
            .set_summary(&id, &input.summary)
            .await
            .map_err(transient)?;
        let s = &input.summary;
        let pr = if s.outcome.is_success() && !s.files_changed.is_empty() {
            self.pull_request(&id, s, input.commit.as_deref()).await?
        } else {
            None
        };
        let (status, mut message) = if s.outcome.is_success() {
            let changed = match s.files_changed.len() {
                0 => "no files changed".to_string(),
                1 => "1 file changed".to_string(),
                n => format!("{n} files changed"),
            };
            let pr = match pr {
                Some(Ok(url)) => format!("; pull request {url}"),
                Some(Err(_)) => "; no pull request (see pr_error)".to_string(),
                None => String::new(),
            };
            (
                TaskStatus::Completed,
                format!("{}; {changed}{pr}", s.outcome.describe()),
            )
        } else {
            let why = s
                .error
                .clone()
                .unwrap_or_else(|| s.outcome.describe().to_string());
            (TaskStatus::Failed, why)
        };
        if let Some(turn) = input.turn.filter(|t| *t > 1) {
            message = format!("turn {turn}: {message}");
            // The turn ends first: a reader woken by the final status finds it ended.
            self.end_turn(&id, turn, status, Some(&s.summary)).await;
        }
        if let StatusChange::Ignored { current } =
            self.change_status(&ctx, &id, status, &message).await?
        {
            tracing::warn!(task_id = %id, %current, %status, "final status not applied");
        }
        self.keep_attempt_results(&ctx, &id, &stored).await;
        tracing::info!(task_id = %id, %status, %message, "published");
        Ok(PublishOutput { status, message })
    }

    #[activity(definition = steps::BeginTurn)]
    pub async fn begin_turn(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: TurnStart,
    ) -> Result<(), ActivityError> {
        let id = task_id(&input.task_id)?;
        let run_id = ctx.info().workflow_run_id.clone().filter(|r| !r.is_empty());
        let turn = patchflow_core::TurnRecord {
            turn: input.turn,
            message: input.message,
            status: TaskStatus::RunningAgent,
            summary: String::new(),
            started_at: chrono::Utc::now(),
            finished_at: None,
        };
        match self
            .store
            .begin_turn(&id, run_id.as_deref(), &turn)
            .await
            .map_err(transient)?
        {
            StatusChange::Applied { seq } => {
                let ev = TaskEvent {
                    seq,
                    kind: TaskEventKind::Status,
                    status: Some(TaskStatus::RunningAgent),
                    message: format!("turn {}: running the agent on the follow-up", turn.turn),
                    at: chrono::Utc::now(),
                };
                let _ = self.hot.events.publish(&id, &ev).await;
            }
            StatusChange::Ignored { .. } => {}
        }
        let _ = self.hot.status.invalidate(&id).await;
        tracing::info!(task_id = %id, turn = turn.turn, "turn begun");
        Ok(())
    }

    #[activity(definition = steps::RecordCandidate)]
    pub async fn record_candidate(
        self: Arc<Self>,
        _ctx: ActivityContext,
        input: CandidateUpdate,
    ) -> Result<(), ActivityError> {
        let id = task_id(&input.task_id)?;
        let n = input.candidate;
        let diff_bytes = if input.status.is_terminal() {
            self.objects
                .list(&layout::run_prefix(&id, 1, Some(n)))
                .await
                .map_err(transient)?
                .iter()
                .find(|o| o.key == layout::candidate_key(&id, n, layout::DIFF))
                .map_or(0, |o| o.size)
        } else {
            0
        };
        let s = input.summary.as_ref();
        let record = patchflow_core::CandidateRecord {
            candidate: n,
            status: input.status,
            summary: s.map(|s| s.summary.clone()).unwrap_or_default(),
            files_changed: s.map(|s| s.files_changed.clone()).unwrap_or_default(),
            cost_usd: s.map_or(0.0, |s| s.cost_usd),
            error: input.error.clone(),
            diff_bytes,
            tests_passed: s.and_then(|s| s.tests_passed),
            finished_at: input.status.is_terminal().then(chrono::Utc::now),
        };
        self.store
            .put_candidate(&id, &record)
            .await
            .map_err(transient)?;
        let _ = self.hot.status.invalidate(&id).await;
        if input.status.is_terminal() {
            let note = match &input.error {
                Some(e) => format!("candidate {n}: {} ({e})", input.status),
                None => format!("candidate {n}: {}", input.status),
            };
            self.record_event(&id, TaskEventKind::Agent, note).await;
        }
        Ok(())
    }

    #[activity(definition = steps::PublishCandidates)]
    pub async fn publish_candidates(
        self: Arc<Self>,
        ctx: ActivityContext,
        input: PublishCandidatesInput,
    ) -> Result<PublishOutput, ActivityError> {
        let _beating = Beating::start(&ctx);
        let id = task_id(&input.task_id)?;
        let record = self
            .store
            .get(&id)
            .await
            .map_err(transient)?
            .ok_or_else(|| bad_input(format!("task {id} is not in the task store")))?;
        let total = record.spec.candidates;
        let ok = record
            .candidates
            .iter()
            .filter(|c| c.status == TaskStatus::Completed)
            .count();
        if ok == 0 {
            let why = record
                .candidates
                .iter()
                .find_map(|c| c.error.clone())
                .unwrap_or_else(|| "no candidate finished".into());
            let message = format!("all {total} candidates failed; the first said: {why}");
            self.change_status(&ctx, &id, TaskStatus::Failed, &message)
                .await?;
            return Ok(PublishOutput {
                status: TaskStatus::Failed,
                message,
            });
        }
        let picked = record.spec.auto_select.and_then(|rule| {
            patchflow_core::conversation::auto_pick(rule, &record.candidates, &input.finish_order)
                .map(|n| (rule, n))
        });
        let mut message = format!("{ok} of {total} candidates finished");
        match picked {
            Some((rule, n)) => {
                let summary = patchflow_platform::results::select_candidate(
                    self.store.as_ref(),
                    self.objects.as_ref(),
                    &id,
                    n,
                )
                .await
                .map_err(transient)?;
                message.push_str(&format!("; candidate {n} selected ({rule})"));
                if summary.outcome.is_success() && !summary.files_changed.is_empty() {
                    match self
                        .pull_request(&id, &summary, input.commit.as_deref())
                        .await?
                    {
                        Some(Ok(url)) => message.push_str(&format!("; pull request {url}")),
                        Some(Err(_)) => message.push_str("; no pull request (see pr_error)"),
                        None => {}
                    }
                }
            }
            None => {
                if let Some(rule) = record.spec.auto_select {
                    message.push_str(&format!("; none qualifies for {rule}"));
                }
                message.push_str(&format!("; select one with POST /api/tasks/{id}/select"));
            }
        }
        self.change_status(&ctx, &id, TaskStatus::Completed, &message)
            .await?;
        Ok(PublishOutput {
            status: TaskStatus::Completed,
            message,
        })
    }
}
