//! The task service: every operation once, for every door.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tracing::Instrument as _;

use patchflow_core::{
    GitToken, TaskEvent, TaskId, TaskRecord, TaskSource, TaskSpec, TaskStatus, layout,
};
use patchflow_platform::cache::{CacheError, Claim, Hot};
use patchflow_platform::db::{Inserted, ListCursor, ListFilter};
use patchflow_platform::objectstore::ObjectReader;
use patchflow_platform::status::{self, CacheDuty, StatusWrite};
use patchflow_platform::{ObjectStore, StatusChange, StoreError, TaskStore, archive};
use patchflow_workflows::{CodeTask, CodeTaskInput, WorkflowSettings};
use temporalio_client::errors::{WorkflowInteractionError, WorkflowStartError};
use temporalio_client::{
    Client, WorkflowIdConflictPolicy, WorkflowIdReusePolicy, WorkflowSignalOptions,
    WorkflowStartOptions,
};

use crate::error::ServiceError;

mod conversation;
mod environments;
mod pull_request;
mod retry;
mod usage;
pub use conversation::RunFile;
pub use retry::{RetryMode, reset_point};

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub task_queue: String,
    pub allow_local_sources: bool,
    pub max_upload_bytes: u64,
    /// Limits a ZIP must meet before it is accepted (checked again when unpacked).
    pub max_archive_entries: u64,
    pub max_unpacked_bytes: u64,
    pub settings: WorkflowSettings,
    /// Base of links to a workflow in the Temporal Web UI (`…/namespaces/NS/workflows`).
    pub workflow_ui_base: Option<String>,
    /// Serve status reads from the cache for this long (only with a shared cache: an
    /// in-process one would not see the workers' writes).
    pub status_cache_ttl: Option<Duration>,
    /// How long the cache remembers an idempotency key.
    pub idempotency_ttl: Duration,
    /// Whether submissions are rate limited per tenant.
    pub rate_limited: bool,
    /// Lifetime of presigned result URLs.
    pub presign_expiry: Duration,
    /// Seals a submission's `git_token` before anything stores or sends it.
    pub secrets: Arc<patchflow_platform::secret_box::SecretBox>,
    /// How callers are authenticated (`auth`).
    pub auth: patchflow_core::config::AuthMode,
    /// With `auth = "jwt"`: checks bearer JWTs (API tokens are still accepted beside them).
    pub jwt: Option<Arc<crate::jwt::JwtVerifier>>,
    /// The webhook doors' secrets, labels and tenants.
    pub webhooks: crate::webhooks::WebhookSettings,
    /// Per-tenant quotas (`[tenants.NAME]`), checked at submit.
    pub tenants: patchflow_core::config::TenantQuotas,
    /// The model a task without `model` gets (`PATCHFLOW_MODEL`), for the `models` quota.
    pub default_model: String,
}

/// Where a result file is read from.
pub enum ResultFile {
    /// A presigned URL of the object store (S3, COS): the client fetches it there.
    Redirect(String),
    /// The bytes, streamed by the gateway (local directory store).
    Stream(ObjectReader, u64),
}

/// An uploaded ZIP, already on local disk.
#[derive(Debug)]
pub struct Upload {
    pub path: PathBuf,
    pub bytes: u64,
}

#[derive(Debug, Clone)]
pub struct SubmitOutcome {
    pub record: TaskRecord,
    /// False when an idempotency key matched an earlier submission.
    pub created: bool,
}

impl SubmitOutcome {
    /// Counts a new task in `patchflow_tasks_submitted_total{door}` (a repeat is not one).
    pub fn counted(self, door: &str) -> Self {
        if self.created {
            patchflow_platform::metrics::global().submitted(door, &self.record.tenant);
        }
        self
    }
}

#[derive(Clone)]
pub struct TaskService {
    store: Arc<dyn TaskStore>,
    objects: Arc<dyn ObjectStore>,
    hot: Hot,
    temporal: Client,
    config: Arc<ServiceConfig>,
    /// When the last cache warning was logged (ms), so an outage logs once in a while,
    /// not once per request.
    last_cache_warning: Arc<AtomicI64>,
    use_clock: Arc<crate::auth::UseClock>,
    token_cache: Arc<crate::auth::TokenCache>,
}

/// Pause between database polls when following a task without a live stream.
const POLL_EVERY: Duration = Duration::from_millis(250);

impl TaskService {
    pub fn new(
        store: Arc<dyn TaskStore>,
        objects: Arc<dyn ObjectStore>,
        hot: Hot,
        temporal: Client,
        config: ServiceConfig,
    ) -> Self {
        Self {
            store,
            objects,
            hot,
            temporal,
            config: Arc::new(config),
            last_cache_warning: Arc::new(AtomicI64::new(0)),
            use_clock: Arc::default(),
            token_cache: Arc::default(),
        }
    }

    /// A submission over its tenant's caps, or asking for a model the tenant may not use:
    /// a `400` naming the cap. A limit left at its default is lowered to a cap below it, so
    /// a tenant with caps can still submit without naming limits.
    fn check_quota(&self, spec: &mut TaskSpec) -> Result<(), ServiceError> {
        let t = spec.tenant.clone();
        let q = self.config.tenants.for_tenant(&t);
        let model = spec.model.as_deref().unwrap_or(&self.config.default_model);
        if let Some(models) = &q.models
            && !models.iter().any(|m| m == model)
        {
            return Err(ServiceError::BadRequest(format!(
                "model `{model}` is not allowed for tenant `{t}` (models: {})",
                models.join(", ")
            )));
        }
        let d = patchflow_core::Limits::default();
        let l = &mut spec.limits;
        if let Some(cap) = q.max_steps
            && l.max_steps == d.max_steps
        {
            l.max_steps = l.max_steps.min(cap);
        }
        if let Some(cap) = q.wall_seconds
            && l.wall_seconds == d.wall_seconds
        {
            l.wall_seconds = l.wall_seconds.min(cap);
        }
        if let Some(cap) = q.max_tokens
            && l.max_tokens == d.max_tokens
        {
            l.max_tokens = l.max_tokens.min(cap);
        }
        let caps = [
            (
                "max_steps",
                u64::from(l.max_steps),
                q.max_steps.map(u64::from),
            ),
            ("wall_seconds", l.wall_seconds, q.wall_seconds),
            ("max_tokens", l.max_tokens, q.max_tokens),
        ];
        for (name, asked, cap) in caps {
            if let Some(cap) = cap
                && asked > cap
            {
                return Err(ServiceError::BadRequest(format!(
                    "limits.{name} = {asked} is over tenant `{t}`'s cap ({name} = {cap})"
                )));
            }
        }
        if let Some(cap) = q.max_candidates
            && spec.candidates > cap
        {
            return Err(ServiceError::BadRequest(format!(
                "candidates = {} is over tenant `{t}`'s cap (max_candidates = {cap})",
                spec.candidates
            )));
        }
        // No cost cap asked: the tenant's applies.
        if let Some(cap) = q.max_cost_usd {
            match l.max_cost_usd {
                None => l.max_cost_usd = Some(cap),
                Some(asked) if asked.0 > cap.0 => {
                    return Err(ServiceError::BadRequest(format!(
                        "limits.max_cost_usd = {} is over tenant `{t}`'s cap (max_cost_usd = {})",
                        asked.0, cap.0
                    )));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The task store (the token checks read it too).
    pub fn store(&self) -> &Arc<dyn TaskStore> {
        &self.store
    }

    pub(crate) fn use_clock(&self) -> &crate::auth::UseClock {
        &self.use_clock
    }

    pub(crate) fn token_cache(&self) -> &crate::auth::TokenCache {
        &self.token_cache
    }

    /// Logs a cache problem at most every 10 s: the request itself goes on from the database.
    fn cache_trouble(&self, what: &str, e: &dyn std::fmt::Display) {
        let now = chrono::Utc::now().timestamp_millis();
        let last = self.last_cache_warning.load(Ordering::Relaxed);
        if now - last > 10_000
            && self
                .last_cache_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(error = %e, "cache unavailable ({what}); serving from the database");
        }
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// Validates, stores and starts a task. With an idempotency key, a repeat returns the
    /// first submission's task and starts nothing new.
    /// `traceparent` is the caller's W3C trace context (a request's `traceparent` header, a
    /// Kafka message's): the task's trace joins it when it is valid, and starts afresh when
    /// it is absent or not one.
    pub async fn submit(
        &self,
        spec: TaskSpec,
        upload: Option<Upload>,
        traceparent: Option<&str>,
    ) -> Result<SubmitOutcome, ServiceError> {
        if let Err(e) = self.admit(&spec.tenant).await {
            if let Some(u) = upload {
                let _ = tokio::fs::remove_file(&u.path).await;
            }
            return Err(e);
        }
        self.submit_admitted(spec, upload, traceparent).await
    }

    /// Takes one submission from `tenant`'s rate limit, or `RateLimited`: what a door
    /// calls before it reads a body (then [`Self::submit_admitted`]), so a throttled
    /// upload costs nothing.
    pub async fn admit(&self, tenant: &str) -> Result<(), ServiceError> {
        if self.config.rate_limited {
            match self.hot.rate_limiter.try_acquire(tenant).await {
                Ok(Ok(())) => {}
                Ok(Err(wait)) => {
                    return Err(ServiceError::RateLimited {
                        tenant: tenant.to_string(),
                        retry_after_secs: wait.header_secs(),
                    });
                }
                Err(e) => self.cache_trouble("rate limit", &e),
            }
        }
        Ok(())
    }

    /// [`Self::submit`] for a submission [`Self::admit`] let in already.
    pub async fn submit_admitted(
        &self,
        mut spec: TaskSpec,
        upload: Option<Upload>,
        traceparent: Option<&str>,
    ) -> Result<SubmitOutcome, ServiceError> {
        // The root of the task's trace (with tracing on), or a child of the caller's: the
        // workflow's start carries it on.
        let span = tracing::info_span!(
            target: patchflow_core::TRACE_TARGET,
            "submit_task",
            task_id = tracing::field::Empty,
            created = tracing::field::Empty,
        );
        if let Some(parent) = patchflow_core::trace::remote_parent(traceparent) {
            use tracing_opentelemetry::OpenTelemetrySpanExt as _;
            let _ = span.set_parent(parent);
        }
        let result = self
            .submit_inner(&mut spec, upload.as_ref())
            .instrument(span.clone())
            .await;
        if let Ok(o) = &result {
            span.record("task_id", o.record.task_id.as_str());
            span.record("created", o.created);
        }
        if let Some(u) = upload {
            let _ = tokio::fs::remove_file(&u.path).await;
        }
        result
    }

    async fn submit_inner(
        &self,
        spec: &mut TaskSpec,
        upload: Option<&Upload>,
    ) -> Result<SubmitOutcome, ServiceError> {
        let task_id = match &spec.idempotency_key {
            Some(k) => TaskId::from_idempotency_key(&spec.tenant, k),
            None => TaskId::generate(),
        };
        if let Some(key) = &spec.idempotency_key {
            // Fast path for repeats; the database's unique key decides in the end.
            match self
                .hot
                .idempotency
                .claim(&spec.tenant, key, &task_id, self.config.idempotency_ttl)
                .await
            {
                Ok(Claim::Existing(first)) => {
                    if let Some(r) = self.store.get(&first).await?
                        && r.status != TaskStatus::Pending
                    {
                        return Ok(SubmitOutcome {
                            record: r,
                            created: false,
                        });
                    }
                }
                Ok(Claim::New) => {}
                Err(e) => self.cache_trouble("idempotency keys", &e),
            }
        }
        if let Some(u) = upload {
            if u.bytes > self.config.max_upload_bytes {
                return Err(ServiceError::TooLarge {
                    limit: self.config.max_upload_bytes,
                });
            }
            spec.source = TaskSource::Archive {
                key: layout::upload_key(&task_id),
            };
        }
        spec.validate(self.config.allow_local_sources)?;
        self.check_quota(spec)?;
        if let Some(name) = &spec.environment {
            self.check_environment_exists(&spec.tenant, name).await?;
        }
        // Tokens are sealed for this task id before the spec is stored or sent anywhere.
        let git_token = match &mut spec.source {
            TaskSource::Git { git_token, .. } => git_token.as_mut(),
            TaskSource::Archive { .. } => None,
        };
        for token in [git_token, spec.github_token.as_mut()]
            .into_iter()
            .flatten()
        {
            if let GitToken::Plain(plain) = token {
                let sealed = self
                    .config
                    .secrets
                    .seal(plain, &task_id)
                    .map_err(ServiceError::Internal)?;
                *token = GitToken::Sealed(sealed);
            }
        }
        if let Some(u) = upload {
            // Refuse a hostile or oversized ZIP now, before it is stored or a task exists.
            let (path, entries, bytes) = (
                u.path.clone(),
                self.config.max_archive_entries,
                self.config.max_unpacked_bytes,
            );
            tokio::task::spawn_blocking(move || archive::inspect_zip(&path, entries, bytes))
                .await
                .map_err(|e| ServiceError::Internal(e.to_string()))?
                .map_err(|m| ServiceError::BadRequest(format!("zip_file: {m}")))?;
        }

        if let Some(existing) = self.store.get(&task_id).await? {
            // A repeat. If the first attempt stopped before its workflow started, finish it.
            if existing.status == TaskStatus::Pending {
                self.start_workflow(&task_id, &existing.spec).await?;
                return Ok(SubmitOutcome {
                    record: self.get(&task_id).await?,
                    created: false,
                });
            }
            return Ok(SubmitOutcome {
                record: existing,
                created: false,
            });
        }
        if let Some(u) = upload {
            self.objects
                .put_file(&layout::upload_key(&task_id), &u.path)
                .await?;
        }
        let record = match self.store.insert(&task_id, spec).await? {
            Inserted::Created(r) => r,
            // Another gateway won the race for this key: its task is the task.
            Inserted::Existing(r) => {
                return Ok(SubmitOutcome {
                    record: r,
                    created: false,
                });
            }
        };
        if let Err(e) = self.start_workflow(&task_id, &record.spec).await {
            if spec.idempotency_key.is_none() {
                // Nobody can resume this one by resubmitting: say what happened.
                let _ = self
                    .change_status(&task_id, None, TaskStatus::Failed, &e.to_string())
                    .await;
            }
            return Err(e);
        }
        Ok(SubmitOutcome {
            record: self.get(&task_id).await?,
            created: true,
        })
    }

    async fn start_workflow(&self, task_id: &TaskId, spec: &TaskSpec) -> Result<(), ServiceError> {
        let mut settings = self.config.settings.clone();
        settings.tenant_max_running = self
            .config
            .tenants
            .for_tenant(&spec.tenant)
            .max_running
            .unwrap_or(0);
        let input = CodeTaskInput {
            task_id: task_id.clone(),
            spec: spec.clone(),
            settings,
            continuation: None,
        };
        // Same id twice never runs twice: a running duplicate is joined, a finished one is
        // refused (and the stored record already answers for it).
        let options =
            WorkflowStartOptions::new(self.config.task_queue.clone(), task_id.to_string())
                .id_conflict_policy(WorkflowIdConflictPolicy::UseExisting)
                .id_reuse_policy(WorkflowIdReusePolicy::RejectDuplicate)
                .build();
        match self
            .temporal
            .start_workflow(CodeTask::run, input, options)
            .await
        {
            Ok(_) | Err(WorkflowStartError::AlreadyStarted { .. }) => {}
            Err(e) => {
                return Err(ServiceError::Unavailable(format!(
                    "cannot start the workflow for task {task_id}: {e}"
                )));
            }
        }
        self.change_status(task_id, None, TaskStatus::Queued, "waiting for a worker")
            .await?;
        Ok(())
    }

    /// Writes a status the gateway decides (QUEUED when it hands a task to Temporal, FAILED
    /// when it could not) through the platform's one status path.
    async fn change_status(
        &self,
        task: &TaskId,
        run_id: Option<&str>,
        status: TaskStatus,
        message: &str,
    ) -> Result<StatusChange, StoreError> {
        let write = StatusWrite {
            task,
            run_id,
            status,
            message,
        };
        status::change_status(
            self.store.as_ref(),
            &self.hot,
            write,
            &|duty: CacheDuty, e: &CacheError| self.cache_trouble(duty.as_str(), e),
        )
        .await
    }

    /// The task record: from the status cache when there is a shared one, else (and on any
    /// cache trouble) from the database, which stays the source of truth.
    pub async fn get(&self, task_id: &TaskId) -> Result<TaskRecord, ServiceError> {
        let Some(ttl) = self.config.status_cache_ttl else {
            return self.get_from_store(task_id).await;
        };
        match self.hot.status.get(task_id).await {
            Ok(Some(r)) => return Ok(r),
            Ok(None) => {}
            Err(e) => {
                self.cache_trouble("status cache", &e);
                return self.get_from_store(task_id).await;
            }
        }
        let record = self.get_from_store(task_id).await?;
        // A record still moving is cached briefly: a write racing this read can leave it
        // stale for at most a second. A finished one does not change.
        let ttl = if record.status.is_terminal() {
            ttl
        } else {
            ttl.min(Duration::from_secs(1))
        };
        if let Err(e) = self.hot.status.put(&record, ttl).await {
            self.cache_trouble("status cache", &e);
        }
        Ok(record)
    }

    async fn get_from_store(&self, task_id: &TaskId) -> Result<TaskRecord, ServiceError> {
        self.store
            .get(task_id)
            .await?
            .ok_or_else(|| ServiceError::NotFound(task_id.clone()))
    }

    /// Newest first; returns the page and the cursor of the next one.
    pub async fn list(
        &self,
        mut filter: ListFilter,
    ) -> Result<(Vec<TaskRecord>, Option<String>), ServiceError> {
        filter.limit = filter.limit.clamp(1, 200);
        let page = self.store.list(&filter).await?;
        let next = (page.len() == filter.limit as usize)
            .then(|| page.last().map(|r| ListCursor::of(r).encode()))
            .flatten();
        Ok((page, next))
    }

    /// Asks a running task to stop. The workflow records CANCELLED once the step in flight
    /// has stopped.
    pub async fn cancel(&self, task_id: &TaskId, reason: &str) -> Result<TaskRecord, ServiceError> {
        let record = self.get_from_store(task_id).await?;
        if record.status.is_terminal() {
            return Err(ServiceError::Finished {
                task: task_id.clone(),
                status: record.status,
            });
        }
        let handle = self
            .temporal
            .get_workflow_handle::<CodeTask>(task_id.to_string());
        let reason = if reason.trim().is_empty() {
            "cancelled by request"
        } else {
            reason
        };
        handle
            .signal(
                CodeTask::cancel,
                reason.to_string(),
                WorkflowSignalOptions::default(),
            )
            .await
            .map_err(|e| match e {
                WorkflowInteractionError::NotFound(_) => ServiceError::Finished {
                    task: task_id.clone(),
                    status: record.status,
                },
                other => {
                    ServiceError::Unavailable(format!("cannot signal task {task_id}: {other}"))
                }
            })?;
        self.get_from_store(task_id).await
    }

    pub async fn events(
        &self,
        task_id: &TaskId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<TaskEvent>, ServiceError> {
        // 404 for unknown tasks rather than an empty list.
        self.get_from_store(task_id).await?;
        Ok(self
            .store
            .events(task_id, after, limit.clamp(1, 1000))
            .await?)
    }

    /// Follows a task's history after `after`: what the database holds, then live events
    /// as they happen, until the task ends; each event once, in order. The live stream only
    /// wakes the reader early (an event is published after it is stored); the database is
    /// read for the events themselves, and polled when there is no stream or it fails.
    pub fn follow(
        &self,
        task_id: TaskId,
        after: i64,
    ) -> impl Stream<Item = Result<TaskEvent, ServiceError>> + Send + 'static {
        let service = self.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<TaskEvent, ServiceError>>(64);
        tokio::spawn(async move {
            let mut last = after;
            let mut live = None;
            loop {
                let batch = match service.store.events(&task_id, last, 500).await {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                // The latest status seen decides whether the task has ended: a retried task
                // ends an attempt (FAILED) and then moves on (QUEUED of the next one).
                let mut ended = None;
                let batch_was_empty = batch.is_empty();
                for ev in batch {
                    last = ev.seq;
                    if let Some(s) = ev.status {
                        ended = Some(s.is_terminal());
                    }
                    if tx.send(Ok(ev)).await.is_err() {
                        return;
                    }
                }
                // Whether the task has ended is the record's to say: after an ended attempt
                // a retry may have begun the next, and a reader that resumes after the last
                // event of an ended task gets an empty batch and must stop too.
                if ended == Some(true) || (ended.is_none() && batch_was_empty) {
                    match service.store.get(&task_id).await {
                        Ok(Some(r)) if !r.status.is_terminal() => {}
                        Ok(Some(_)) => {
                            // What was written up to the end, then stop.
                            if let Ok(rest) = service.store.events(&task_id, last, 500).await {
                                for ev in rest {
                                    if tx.send(Ok(ev)).await.is_err() {
                                        return;
                                    }
                                }
                            }
                            return;
                        }
                        Ok(None) => return,
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    }
                }
                if live.is_none() {
                    match service.hot.events.subscribe(&task_id, last).await {
                        Ok(s) => live = Some(s),
                        Err(e) => service.cache_trouble("live events", &e),
                    }
                }
                match live.as_mut() {
                    Some(stream) => {
                        match tokio::time::timeout(Duration::from_secs(1), stream.next()).await {
                            Ok(Some(Ok(_))) | Err(_) => {}
                            Ok(Some(Err(e))) => {
                                service.cache_trouble("live events", &e);
                                live = None;
                            }
                            Ok(None) => live = None,
                        }
                    }
                    None => tokio::time::sleep(POLL_EVERY).await,
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// Where to read a result file of a task: a presigned URL when the object store has
    /// them (S3, COS), else a stream through the gateway (local directory).
    pub async fn open_result(
        &self,
        task_id: &TaskId,
        file: &str,
        attempt: Option<u32>,
    ) -> Result<ResultFile, ServiceError> {
        let record = self.get(task_id).await?;
        let key = match attempt {
            Some(n) => {
                if !record.attempts.iter().any(|a| a.attempt == n) {
                    return Err(ServiceError::Missing(format!(
                        "task {task_id} has no attempt {n} (it has {})",
                        record.attempts.len()
                    )));
                }
                layout::attempt_result_key(task_id, n, file)
            }
            None => layout::result_key(task_id, file),
        };
        let not_ready = || {
            ServiceError::NotReady(match attempt {
                Some(n) => format!(
                    "{file} of attempt {n} of task {task_id} is not available (an attempt's files are kept once its result is published)"
                ),
                None => format!(
                    "{file} of task {task_id} is not available (status {})",
                    record.status
                ),
            })
        };
        self.open_object(&key, not_ready).await
    }

    /// The code the agent started from: the workspace a setup prepared, else the staged
    /// archive (`code.tar.zst`). What `patchflow replay` runs the agent on again.
    /// With `home`, the setup's HOME cache paths instead (a task whose setup kept none has
    /// none: not found).
    pub async fn open_source(
        &self,
        task_id: &TaskId,
        home: bool,
    ) -> Result<ResultFile, ServiceError> {
        let record = self.get(task_id).await?;
        if home {
            let key = layout::prepared_home_key(task_id);
            let none = || {
                ServiceError::Missing(format!(
                    "task {task_id} has no prepared HOME (its setup kept no HOME paths, or it had no setup)"
                ))
            };
            return self.open_object(&key, none).await;
        }
        let prepared = layout::prepared_key(task_id);
        let key = if self.objects.exists(&prepared).await? {
            prepared
        } else {
            layout::staged_key(task_id)
        };
        let not_ready = || {
            ServiceError::NotReady(format!(
                "the staged code of task {task_id} is not available (status {})",
                record.status
            ))
        };
        self.open_object(&key, not_ready).await
    }

    async fn open_object(
        &self,
        key: &str,
        not_ready: impl Fn() -> ServiceError,
    ) -> Result<ResultFile, ServiceError> {
        if !self.objects.exists(key).await? {
            return Err(not_ready());
        }
        if let Some(url) = self
            .objects
            .presigned_get(key, self.config.presign_expiry)
            .await?
        {
            return Ok(ResultFile::Redirect(url));
        }
        match self.objects.open_read(key).await {
            Ok((r, size)) => Ok(ResultFile::Stream(r, size)),
            Err(patchflow_platform::ObjectError::NotFound(_)) => Err(not_ready()),
            Err(e) => Err(e.into()),
        }
    }

    /// Up to `limit` bytes of a result file, read through the object store whatever its
    /// kind (the web page renders diffs and transcripts on the server, even where clients
    /// get presigned URLs); `None` while the task has not written it. The flag says the
    /// file is longer than what was read.
    pub async fn read_result(
        &self,
        task_id: &TaskId,
        file: &str,
        limit: u64,
    ) -> Result<Option<(Vec<u8>, bool)>, ServiceError> {
        self.read_object(&layout::result_key(task_id, file), limit)
            .await
    }

    /// Up to `limit` bytes of an object, and whether it is longer; `None` if there is none.
    async fn read_object(
        &self,
        key: &str,
        limit: u64,
    ) -> Result<Option<(Vec<u8>, bool)>, ServiceError> {
        use tokio::io::AsyncReadExt;
        let (reader, size) = match self.objects.open_read(key).await {
            Ok(r) => r,
            Err(patchflow_platform::ObjectError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut bytes = Vec::with_capacity(size.min(limit) as usize);
        reader
            .take(limit)
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| ServiceError::Unavailable(format!("object store: {e}")))?;
        Ok(Some((bytes, size > limit)))
    }

    pub fn workflow_link(&self, task_id: &TaskId) -> Option<String> {
        self.config
            .workflow_ui_base
            .as_ref()
            .map(|b| format!("{}/{task_id}", b.trim_end_matches('/')))
    }

    /// Checks the task store and the object store answer (they must); reports the cache,
    /// whose outage only degrades the service.
    pub async fn health(&self) -> Result<Option<String>, ServiceError> {
        self.store.ping().await?;
        self.objects.exists("healthz/probe").await?;
        Ok(self.hot.ping().await.err().map(|e| e.to_string()))
    }
}
