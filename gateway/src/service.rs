//! The task service: every operation once, for every door.

use std::path::PathBuf;
use std::sync::Arc;

use patchflow_core::{TaskEvent, TaskId, TaskRecord, TaskSource, TaskSpec, TaskStatus, layout};
use patchflow_platform::db::{Inserted, ListCursor, ListFilter};
use patchflow_platform::objectstore::ObjectReader;
use patchflow_platform::{ObjectStore, TaskStore, archive};
use patchflow_workflows::{CodeTask, CodeTaskInput, WorkflowSettings};
use temporalio_client::errors::{WorkflowInteractionError, WorkflowStartError};
use temporalio_client::{
    Client, WorkflowIdConflictPolicy, WorkflowIdReusePolicy, WorkflowSignalOptions,
    WorkflowStartOptions,
};

use crate::error::ServiceError;

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

#[derive(Clone)]
pub struct TaskService {
    store: Arc<dyn TaskStore>,
    objects: Arc<dyn ObjectStore>,
    temporal: Client,
    config: Arc<ServiceConfig>,
}

impl TaskService {
    pub fn new(
        store: Arc<dyn TaskStore>,
        objects: Arc<dyn ObjectStore>,
        temporal: Client,
        config: ServiceConfig,
    ) -> Self {
        Self {
            store,
            objects,
            temporal,
            config: Arc::new(config),
        }
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    /// Validates, stores and starts a task. With an idempotency key, a repeat returns the
    /// first submission's task and starts nothing new.
    pub async fn submit(
        &self,
        mut spec: TaskSpec,
        upload: Option<Upload>,
    ) -> Result<SubmitOutcome, ServiceError> {
        let result = self.submit_inner(&mut spec, upload.as_ref()).await;
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
                    .store
                    .set_status(&task_id, TaskStatus::Failed, &e.to_string())
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
        let input = CodeTaskInput {
            task_id: task_id.to_string(),
            spec: spec.clone(),
            settings: self.config.settings.clone(),
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
        self.store
            .set_status(task_id, TaskStatus::Queued, "waiting for a worker")
            .await?;
        Ok(())
    }

    pub async fn get(&self, task_id: &TaskId) -> Result<TaskRecord, ServiceError> {
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
        let record = self.get(task_id).await?;
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
        self.get(task_id).await
    }

    pub async fn events(
        &self,
        task_id: &TaskId,
        after: i64,
        limit: u32,
    ) -> Result<Vec<TaskEvent>, ServiceError> {
        // 404 for unknown tasks rather than an empty list.
        self.get(task_id).await?;
        Ok(self
            .store
            .events(task_id, after, limit.clamp(1, 1000))
            .await?)
    }

    /// A result file of a task, streamed from the object store.
    pub async fn open_result(
        &self,
        task_id: &TaskId,
        file: &str,
    ) -> Result<(ObjectReader, u64), ServiceError> {
        let record = self.get(task_id).await?;
        match self
            .objects
            .open_read(&layout::result_key(task_id, file))
            .await
        {
            Ok(r) => Ok(r),
            Err(patchflow_platform::ObjectError::NotFound(_)) => {
                Err(ServiceError::NotReady(format!(
                    "{file} of task {task_id} is not available (status {})",
                    record.status
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn workflow_link(&self, task_id: &TaskId) -> Option<String> {
        self.config
            .workflow_ui_base
            .as_ref()
            .map(|b| format!("{}/{task_id}", b.trim_end_matches('/')))
    }

    /// Checks the task store and the object store answer.
    pub async fn health(&self) -> Result<(), ServiceError> {
        self.store.ping().await?;
        self.objects.exists("healthz/probe").await?;
        Ok(())
    }
}
