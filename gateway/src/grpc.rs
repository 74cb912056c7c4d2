//! The gRPC API (`patchflow.v1.Tasks`, `proto/patchflow/v1/tasks.proto`): the HTTP API's
//! operations over tonic, answered by the same [`TaskService`] with the same messages.
//! Errors map onto gRPC codes: bad input INVALID_ARGUMENT, unknown task (or environment)
//! NOT_FOUND, an environment name taken ALREADY_EXISTS, too big or rate limited
//! RESOURCE_EXHAUSTED, a retry of a running task or a cancel of an ended one
//! FAILED_PRECONDITION. Health (`grpc.health.v1`) and server reflection are served
//! beside it, so `grpcurl` works without the proto file.

pub mod proto;

use std::future::Future;
use std::pin::Pin;

use futures::{Stream, StreamExt};
use patchflow_api::{LimitsBody, SubmitBody};
use patchflow_core::{
    AgentSummary, TaskAttempt, TaskEvent, TaskId, TaskRecord, TaskStatus, layout,
};
use patchflow_platform::db::{ListCursor, ListFilter};
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Principal;
use crate::error::ServiceError;
use crate::service::{RetryMode, RunFile, SubmitOutcome, TaskService, Upload};
use crate::submit::{spec_of, temp_upload_path};
use proto::tasks_server::{Tasks, TasksServer};

/// Most bytes of a result file sent in one `GetResult` answer; longer files are cut and
/// flagged (the HTTP API serves them whole).
const MAX_RESULT_FILE_BYTES: u64 = 8 * 1024 * 1024;

#[derive(Debug, Error)]
pub enum GrpcError {
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A service error as a gRPC status, with the HTTP API's message and its `code` in the
/// `x-patchflow-code` metadata.
pub fn status_of(e: &ServiceError) -> Status {
    let message = e.to_string();
    let mut status = match e {
        ServiceError::Invalid(_) | ServiceError::BadRequest(_) => Status::invalid_argument(message),
        ServiceError::NotFound(_) | ServiceError::Missing(_) | ServiceError::NotReady(_) => {
            Status::not_found(message)
        }
        ServiceError::AlreadyExists(_) => Status::already_exists(message),
        ServiceError::Finished { .. }
        | ServiceError::StillRunning { .. }
        | ServiceError::Conflict(_) => Status::failed_precondition(message),
        ServiceError::TooLarge { .. } | ServiceError::RateLimited { .. } => {
            Status::resource_exhausted(message)
        }
        ServiceError::Unavailable(_) => Status::unavailable(message),
        ServiceError::Unauthenticated(_) => Status::unauthenticated(message),
        ServiceError::Forbidden(_) => Status::permission_denied(message),
        ServiceError::Internal(_) => Status::internal(message),
    };
    if status.code() == tonic::Code::Unavailable || status.code() == tonic::Code::Internal {
        tracing::warn!(error = %e, "gRPC request failed");
    }
    if let Ok(v) = e.code().parse() {
        status.metadata_mut().insert("x-patchflow-code", v);
    }
    status
}

fn parse_id(s: &str) -> Result<TaskId, Status> {
    s.parse::<TaskId>()
        .map_err(|e| status_of(&ServiceError::Invalid(e)))
}

fn time(t: chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|v| !v.trim().is_empty())
}

pub fn summary_message(s: &AgentSummary) -> proto::Summary {
    proto::Summary {
        outcome: serde_json::to_value(s.outcome)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        summary: s.summary.clone(),
        model: s.model.clone(),
        steps: s.steps,
        tool_calls: s.tool_calls,
        prompt_tokens: s.prompt_tokens,
        completion_tokens: s.completion_tokens,
        total_tokens: s.total_tokens,
        wall_ms: s.wall_ms,
        files_changed: s.files_changed.clone(),
        error: s.error.clone(),
        cached_tokens: s.cached_tokens,
        reasoning_tokens: s.reasoning_tokens,
        cost_usd: s.cost_usd,
        compactions: s.compactions,
    }
}

/// The usage report as the gRPC API shows it (the fields of `GET /api/usage`).
pub fn usage_message(a: &patchflow_api::UsageAnswer) -> proto::GetUsageResponse {
    let t = &a.total;
    proto::GetUsageResponse {
        from: time(a.from),
        to: time(a.to),
        tenants: a.tenants.clone(),
        days: a
            .days
            .iter()
            .map(|d| proto::UsageDay {
                day: d.day.to_string(),
                tenant: d.tenant.clone(),
                model: d.model.clone(),
                tasks: d.tasks,
                prompt_tokens: d.prompt_tokens,
                completion_tokens: d.completion_tokens,
                cached_tokens: d.cached_tokens,
                reasoning_tokens: d.reasoning_tokens,
                total_tokens: d.total_tokens,
                cost_usd: d.cost_usd,
            })
            .collect(),
        total: Some(proto::UsageTotal {
            tasks: t.tasks,
            prompt_tokens: t.prompt_tokens,
            completion_tokens: t.completion_tokens,
            cached_tokens: t.cached_tokens,
            reasoning_tokens: t.reasoning_tokens,
            total_tokens: t.total_tokens,
            cost_usd: t.cost_usd,
        }),
    }
}

fn attempt_message(a: &TaskAttempt) -> proto::Attempt {
    proto::Attempt {
        attempt: a.attempt,
        started_at: time(a.started_at),
        finished_at: a.finished_at.map(time),
        status: a.status.to_string(),
        message: a.message.clone(),
        worker: a.worker.clone(),
    }
}

/// The task record as the gRPC API shows it (the fields of `GET /api/tasks/{task_id}`).
pub fn task_message(service: &TaskService, r: &TaskRecord) -> proto::Task {
    proto::Task {
        task_id: r.task_id.to_string(),
        status: r.status.to_string(),
        message: r.message.clone(),
        created_at: time(r.created_at),
        updated_at: time(r.updated_at),
        pr_url: r.pr_url.clone(),
        summary: r.summary.as_ref().map(summary_message),
        source: r.spec.source.display_name(),
        task_description: r.spec.task_description.clone(),
        target_file: r.spec.target_file.clone(),
        model: r.spec.model.clone(),
        limits: Some(proto::Limits {
            max_steps: r.spec.limits.max_steps,
            max_tokens: r.spec.limits.max_tokens,
            wall_seconds: r.spec.limits.wall_seconds,
            max_cost_usd: r.spec.limits.max_cost_usd.map(|c| c.0),
        }),
        tenant: r.tenant.clone(),
        batch_id: r.batch_id.clone(),
        attempt: r.attempt,
        attempts: r.attempts.iter().map(attempt_message).collect(),
        workflow_url: service.workflow_link(&r.task_id),
        // The same turns the HTTP view lists (turn 1 before any follow-up).
        turns: patchflow_api::TaskView::turns_of(r)
            .iter()
            .map(|t| proto::Turn {
                turn: t.turn,
                message: t.message.clone(),
                status: t.status.to_string(),
                summary: t.summary.clone(),
                started_at: time(t.started_at),
                finished_at: t.finished_at.map(time),
            })
            .collect(),
        candidates: r
            .candidates
            .iter()
            .map(|c| proto::Candidate {
                candidate: c.candidate,
                status: c.status.to_string(),
                summary: c.summary.clone(),
                files_changed: c.files_changed.clone(),
                cost_usd: c.cost_usd,
                error: c.error.clone(),
            })
            .collect(),
        selected: r.selected,
    }
}

pub fn event_message(e: &TaskEvent) -> proto::TaskEvent {
    proto::TaskEvent {
        seq: e.seq,
        kind: e.kind.as_str().to_string(),
        status: e.status.map(|s| s.to_string()),
        message: e.message.clone(),
        at: time(e.at),
    }
}

fn submitted(o: SubmitOutcome) -> proto::SubmitTaskResponse {
    proto::SubmitTaskResponse {
        task_id: o.record.task_id.to_string(),
        status: o.record.status.to_string(),
        message: o.record.message,
        created: o.created,
    }
}

/// The HTTP submit body these options stand for, so both doors validate alike.
fn submit_body(
    git_url: Option<String>,
    git_ref: Option<String>,
    o: proto::TaskOptions,
) -> Result<SubmitBody, Status> {
    // proto3 has no "not given" for a number: 0 is the default.
    let given = |n: u64| (n != 0).then_some(n);
    let limits = o.limits.map(|l| LimitsBody {
        max_steps: (l.max_steps != 0).then_some(l.max_steps),
        max_tokens: given(l.max_tokens),
        wall_seconds: given(l.wall_seconds),
        // Optional on the wire: given or not; NaN or infinite is refused by the spec's check.
        max_cost_usd: l.max_cost_usd,
    });
    let setup = match non_empty(o.setup_json) {
        Some(json) => Some(
            patchflow_api::error::from_json(json.as_bytes())
                .map_err(|e| Status::invalid_argument(format!("setup_json: {e}")))?,
        ),
        None => None,
    };
    Ok(SubmitBody {
        git_url,
        git_ref: non_empty(git_ref),
        task_description: Some(o.task_description),
        target_file: non_empty(o.target_file),
        model: non_empty(o.model),
        limits,
        tenant: non_empty(o.tenant),
        batch_id: non_empty(o.batch_id),
        idempotency_key: non_empty(o.idempotency_key),
        branch_name: non_empty(o.branch_name),
        environment: non_empty(o.environment),
        setup,
        candidates: o.candidates,
        auto_select: match non_empty(o.auto_select) {
            Some(rule) => Some(rule.parse().map_err(|e: patchflow_core::ValidationError| {
                Status::invalid_argument(e.to_string())
            })?),
            None => None,
        },
        ..SubmitBody::default()
    })
}

/// The HTTP body a gRPC environment definition stands for, so both doors validate alike.
/// `secrets`: `None` unless `replace` or the map is non-empty (proto3 has no "not given"
/// for a map).
fn environment_body(
    d: proto::EnvironmentDefinition,
    replace_secrets: bool,
) -> Result<patchflow_api::EnvironmentBody, Status> {
    use patchflow_core::environment::SetupNetwork;
    let network = match non_empty(d.network).as_deref().map(str::trim) {
        None => None,
        Some("on") => Some(SetupNetwork::On),
        Some("off") => Some(SetupNetwork::Off),
        Some(other) => {
            return Err(status_of(&ServiceError::Invalid(
                patchflow_core::ValidationError::new(
                    "network",
                    format!("`{other}` is neither `on` nor `off`"),
                ),
            )));
        }
    };
    let secrets = (replace_secrets || !d.secrets.is_empty()).then(|| {
        d.secrets
            .into_iter()
            .map(|(k, v)| (k, patchflow_core::Secret::new(v)))
            .collect()
    });
    Ok(patchflow_api::EnvironmentBody {
        name: d.name,
        repo: non_empty(d.repo),
        setup_script: d.setup_script,
        maintenance_script: d.maintenance_script,
        env: d.env.into_iter().collect(),
        secrets,
        network,
        allow_hosts: d.allow_hosts,
        cache: d.cache,
        cache_paths: d.cache_paths,
        cache_key_files: d.cache_key_files,
    })
}

/// A saved environment as the gRPC API shows it (the fields of its JSON view).
pub fn environment_message(
    r: &patchflow_core::environment::EnvironmentRecord,
) -> proto::Environment {
    let v = patchflow_api::EnvironmentView::new(r);
    proto::Environment {
        name: v.name,
        repo: v.repo,
        setup_script: v.setup_script,
        maintenance_script: v.maintenance_script,
        env: v.env.into_iter().collect(),
        secret_names: v.secret_names,
        network: v.network.as_str().to_string(),
        allow_hosts: v.allow_hosts,
        cache: v.cache,
        cache_paths: v.cache_paths,
        cache_key_files: v.cache_key_files,
        secrets_version: v.secrets_version,
        cache_generation: v.cache_generation,
        created_at: time(v.created_at),
        updated_at: time(v.updated_at),
    }
}

/// The `Tasks` service over a [`TaskService`].
#[derive(Clone)]
pub struct TasksApi {
    service: TaskService,
}

impl TasksApi {
    pub fn new(service: TaskService) -> Self {
        Self { service }
    }

    /// The caller of an RPC, from its `authorization: Bearer <token>` metadata; or
    /// `UNAUTHENTICATED`.
    async fn who<T>(&self, request: &Request<T>) -> Result<Principal, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        self.service
            .authenticate(authorization)
            .await
            .map_err(|e| status_of(&e))
    }

    /// A task the caller may see (another tenant's is `NOT_FOUND`, as a missing one).
    async fn task_for(&self, who: &Principal, id: &TaskId) -> Result<TaskRecord, Status> {
        self.service
            .get_for(who, id)
            .await
            .map_err(|e| status_of(&e))
    }

    /// Buffers an upload's chunks to a temporary file, refusing it the moment it crosses
    /// the upload limit.
    async fn receive_upload(
        &self,
        stream: &mut Streaming<proto::UploadTaskRequest>,
    ) -> Result<(proto::TaskOptions, Upload), Status> {
        use proto::upload_task_request::Part;
        let options = match stream.message().await? {
            Some(proto::UploadTaskRequest {
                part: Some(Part::Options(o)),
            }) => o,
            _ => {
                return Err(status_of(&ServiceError::BadRequest(
                    "the first message of an upload carries the task options; the ZIP's bytes follow"
                        .into(),
                )));
            }
        };
        let limit = self.service.config().max_upload_bytes;
        let path = temp_upload_path("patchflow-grpc-upload");
        let internal = |e: std::io::Error| {
            status_of(&ServiceError::Internal(format!(
                "cannot buffer the upload: {e}"
            )))
        };
        let mut file = tokio::fs::File::create(&path).await.map_err(internal)?;
        let mut bytes = 0u64;
        let outcome: Result<(), Status> = async {
            while let Some(msg) = stream.message().await? {
                match msg.part {
                    Some(Part::Chunk(chunk)) => {
                        bytes += chunk.len() as u64;
                        if bytes > limit {
                            return Err(status_of(&ServiceError::TooLarge { limit }));
                        }
                        file.write_all(&chunk).await.map_err(internal)?;
                    }
                    _ => {
                        return Err(status_of(&ServiceError::BadRequest(
                            "only the first message of an upload carries task options".into(),
                        )));
                    }
                }
            }
            file.flush().await.map_err(internal)
        }
        .await;
        drop(file);
        if let Err(e) = outcome {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(e);
        }
        Ok((options, Upload { path, bytes }))
    }
}

/// The caller's W3C trace context, from the `traceparent` metadata.
fn traceparent_of(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(patchflow_core::trace::TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<proto::WatchTaskResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Tasks for TasksApi {
    async fn submit_task(
        &self,
        request: Request<proto::SubmitTaskRequest>,
    ) -> Result<Response<proto::SubmitTaskResponse>, Status> {
        let who = self.who(&request).await?;
        who.must_write().map_err(|e| status_of(&e))?;
        let traceparent = traceparent_of(request.metadata());
        let r = request.into_inner();
        let mut body = submit_body(Some(r.git_url), r.git_ref, r.options.unwrap_or_default())?;
        body.git_token = non_empty(r.git_token).map(patchflow_core::Secret::new);
        body.tenant = Some(
            who.tenant_for_submit(body.tenant.as_deref())
                .map_err(|e| status_of(&e))?,
        );
        let spec = body.into_spec(false).map_err(|e| status_of(&e.into()))?;
        let outcome = self
            .service
            .submit(spec, None, traceparent.as_deref())
            .await
            .map_err(|e| status_of(&e))?
            .counted("grpc");
        Ok(Response::new(submitted(outcome)))
    }

    async fn upload_task(
        &self,
        request: Request<Streaming<proto::UploadTaskRequest>>,
    ) -> Result<Response<proto::SubmitTaskResponse>, Status> {
        // Before a byte of the upload is read: who, and the caller's rate limit.
        let who = self.who(&request).await?;
        who.must_write().map_err(|e| status_of(&e))?;
        let traceparent = traceparent_of(request.metadata());
        self.service
            .admit(&who.tenant)
            .await
            .map_err(|e| status_of(&e))?;
        let mut stream = request.into_inner();
        let (options, upload) = self.receive_upload(&mut stream).await?;
        let mut body = match submit_body(None, None, options) {
            Ok(b) => b,
            Err(e) => {
                let _ = tokio::fs::remove_file(&upload.path).await;
                return Err(e);
            }
        };
        body.tenant = match who.tenant_for_submit(body.tenant.as_deref()) {
            Ok(t) => Some(t),
            Err(e) => {
                let _ = tokio::fs::remove_file(&upload.path).await;
                return Err(status_of(&e));
            }
        };
        let spec = spec_of(body, Some(&upload))
            .await
            .map_err(|e| status_of(&e))?;
        let outcome = self
            .service
            .submit_admitted(spec, Some(upload), traceparent.as_deref())
            .await
            .map_err(|e| status_of(&e))?
            .counted("grpc");
        Ok(Response::new(submitted(outcome)))
    }

    async fn get_task(
        &self,
        request: Request<proto::GetTaskRequest>,
    ) -> Result<Response<proto::Task>, Status> {
        let who = self.who(&request).await?;
        let id = parse_id(&request.into_inner().task_id)?;
        let r = self.task_for(&who, &id).await?;
        Ok(Response::new(task_message(&self.service, &r)))
    }

    async fn list_tasks(
        &self,
        request: Request<proto::ListTasksRequest>,
    ) -> Result<Response<proto::ListTasksResponse>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        let status = non_empty(Some(r.status))
            .map(|s| s.parse::<TaskStatus>())
            .transpose()
            .map_err(|e| status_of(&ServiceError::Invalid(e)))?;
        let cursor = match non_empty(Some(r.page_token)) {
            Some(c) => Some(ListCursor::decode(&c).ok_or_else(|| {
                status_of(&ServiceError::BadRequest(format!("invalid cursor `{c}`")))
            })?),
            None => None,
        };
        let filter = ListFilter {
            status,
            tenant: if who.is_admin() {
                non_empty(Some(r.tenant))
            } else {
                Some(who.tenant.clone())
            },
            batch_id: non_empty(Some(r.batch_id)),
            cursor,
            limit: if r.page_size == 0 { 50 } else { r.page_size },
        };
        let (page, next) = self.service.list(filter).await.map_err(|e| status_of(&e))?;
        Ok(Response::new(proto::ListTasksResponse {
            tasks: page
                .iter()
                .map(|t| task_message(&self.service, t))
                .collect(),
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn cancel_task(
        &self,
        request: Request<proto::CancelTaskRequest>,
    ) -> Result<Response<proto::Task>, Status> {
        let who = self.who(&request).await?;
        who.must_write().map_err(|e| status_of(&e))?;
        let r = request.into_inner();
        let id = parse_id(&r.task_id)?;
        self.task_for(&who, &id).await?;
        let rec = self
            .service
            .cancel(&id, &r.reason)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(task_message(&self.service, &rec)))
    }

    async fn retry_task(
        &self,
        request: Request<proto::RetryTaskRequest>,
    ) -> Result<Response<proto::Task>, Status> {
        let who = self.who(&request).await?;
        who.must_write().map_err(|e| status_of(&e))?;
        let r = request.into_inner();
        let id = parse_id(&r.task_id)?;
        self.task_for(&who, &id).await?;
        let mode = match proto::RetryMode::try_from(r.mode) {
            Ok(proto::RetryMode::FromStart) => RetryMode::FromStart,
            Ok(proto::RetryMode::FromFailedStep | proto::RetryMode::Unspecified) => {
                RetryMode::FromFailedStep
            }
            Err(_) => {
                return Err(status_of(&ServiceError::BadRequest(format!(
                    "unknown retry mode {} (from_start or from_failed_step)",
                    r.mode
                ))));
            }
        };
        let rec = self
            .service
            .retry(&id, mode)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(task_message(&self.service, &rec)))
    }

    async fn send_message(
        &self,
        request: Request<proto::SendMessageRequest>,
    ) -> Result<Response<proto::SendMessageResponse>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        let id = parse_id(&r.task_id)?;
        let accepted = self
            .service
            .send_message(&who, &id, &r.message)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(proto::SendMessageResponse {
            task_id: id.to_string(),
            turn: accepted.turn,
        }))
    }

    async fn select_candidate(
        &self,
        request: Request<proto::SelectCandidateRequest>,
    ) -> Result<Response<proto::Task>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        let id = parse_id(&r.task_id)?;
        let rec = self
            .service
            .select(&who, &id, r.candidate)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(task_message(&self.service, &rec)))
    }

    async fn create_environment(
        &self,
        request: Request<proto::CreateEnvironmentRequest>,
    ) -> Result<Response<proto::Environment>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        let body = environment_body(r.environment.unwrap_or_default(), false)?;
        let rec = self
            .service
            .create_environment(&who, non_empty(r.tenant).as_deref(), body)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(environment_message(&rec)))
    }

    async fn list_environments(
        &self,
        request: Request<proto::ListEnvironmentsRequest>,
    ) -> Result<Response<proto::ListEnvironmentsResponse>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        let list = self
            .service
            .list_environments(&who, non_empty(r.tenant).as_deref())
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(proto::ListEnvironmentsResponse {
            environments: list.iter().map(environment_message).collect(),
        }))
    }

    async fn get_environment(
        &self,
        request: Request<proto::GetEnvironmentRequest>,
    ) -> Result<Response<proto::Environment>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        let rec = self
            .service
            .get_environment(&who, non_empty(r.tenant).as_deref(), &r.name)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(environment_message(&rec)))
    }

    async fn update_environment(
        &self,
        request: Request<proto::UpdateEnvironmentRequest>,
    ) -> Result<Response<proto::Environment>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        let body = environment_body(r.environment.unwrap_or_default(), r.replace_secrets)?;
        let rec = self
            .service
            .update_environment(&who, non_empty(r.tenant).as_deref(), &r.name, body)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(environment_message(&rec)))
    }

    async fn delete_environment(
        &self,
        request: Request<proto::DeleteEnvironmentRequest>,
    ) -> Result<Response<proto::DeleteEnvironmentResponse>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        self.service
            .delete_environment(&who, non_empty(r.tenant).as_deref(), &r.name)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(proto::DeleteEnvironmentResponse {}))
    }

    async fn reset_environment_cache(
        &self,
        request: Request<proto::ResetEnvironmentCacheRequest>,
    ) -> Result<Response<proto::ResetEnvironmentCacheResponse>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        let answer = self
            .service
            .reset_environment_cache(&who, non_empty(r.tenant).as_deref(), &r.name)
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(proto::ResetEnvironmentCacheResponse {
            name: answer.name,
            cache_generation: answer.cache_generation,
            removed: answer.removed,
        }))
    }

    async fn get_usage(
        &self,
        request: Request<proto::GetUsageRequest>,
    ) -> Result<Response<proto::GetUsageResponse>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        let answer = self
            .service
            .usage(
                &who,
                r.tenant.as_deref(),
                r.from.as_deref(),
                r.to.as_deref(),
            )
            .await
            .map_err(|e| status_of(&e))?;
        Ok(Response::new(usage_message(&answer)))
    }

    type WatchTaskStream = WatchStream;

    async fn watch_task(
        &self,
        request: Request<proto::WatchTaskRequest>,
    ) -> Result<Response<Self::WatchTaskStream>, Status> {
        let who = self.who(&request).await?;
        let r = request.into_inner();
        let id = parse_id(&r.task_id)?;
        if r.after_seq < 0 {
            return Err(status_of(&ServiceError::BadRequest(
                "after_seq must not be negative".into(),
            )));
        }
        // NOT_FOUND now, before the stream starts.
        self.task_for(&who, &id).await?;
        let service = self.service.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            use proto::watch_task_response::Item;
            let follow = service.follow(id.clone(), r.after_seq);
            tokio::pin!(follow);
            while let Some(item) = follow.next().await {
                let msg = match item {
                    Ok(ev) => Ok(proto::WatchTaskResponse {
                        item: Some(Item::Event(event_message(&ev))),
                    }),
                    Err(e) => Err(status_of(&e)),
                };
                let failed = msg.is_err();
                if tx.send(msg).await.is_err() || failed {
                    return;
                }
            }
            // The task has ended (or the watcher left, and this send fails quietly).
            let last = match service.get(&id).await {
                Ok(rec) => Ok(proto::WatchTaskResponse {
                    item: Some(Item::Final(task_message(&service, &rec))),
                }),
                Err(e) => Err(status_of(&e)),
            };
            let _ = tx.send(last).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn get_result(
        &self,
        request: Request<proto::GetResultRequest>,
    ) -> Result<Response<proto::TaskResult>, Status> {
        let who = self.who(&request).await?;
        let req = request.into_inner();
        let id = parse_id(&req.task_id)?;
        let rec = self.task_for(&who, &id).await?;
        let which = RunFile {
            candidate: req.candidate,
            turn: req.turn,
        };
        let not_ready = || {
            status_of(&ServiceError::NotReady(format!(
                "the result of task {id} is not available (status {})",
                rec.status
            )))
        };
        if !rec.status.is_terminal() {
            return Err(not_ready());
        }
        if which.candidate.is_some() && which.turn.is_some() {
            return Err(Status::invalid_argument(
                "ask for a candidate or a turn, not both",
            ));
        }
        let read = |file: &'static str| {
            let service = self.service.clone();
            let rec = rec.clone();
            async move {
                service
                    .read_run_result(&rec, file, which, MAX_RESULT_FILE_BYTES)
                    .await
                    .map_err(|e| status_of(&e))
            }
        };
        let (diff, transcript) = (read(layout::DIFF).await?, read(layout::TRANSCRIPT).await?);
        if diff.is_none() && transcript.is_none() {
            return Err(not_ready());
        }
        let text = |f: Option<(Vec<u8>, bool)>| {
            let (bytes, cut) = f.unwrap_or_default();
            (String::from_utf8_lossy(&bytes).into_owned(), cut)
        };
        let (diff, diff_truncated) = text(diff);
        let (transcript, transcript_truncated) = text(transcript);
        Ok(Response::new(proto::TaskResult {
            task_id: id.to_string(),
            status: rec.status.to_string(),
            diff,
            transcript,
            summary: match which.candidate {
                Some(_) => read(layout::SUMMARY)
                    .await?
                    .and_then(|(b, _)| serde_json::from_slice::<AgentSummary>(&b).ok())
                    .as_ref()
                    .map(summary_message),
                None => rec.summary.as_ref().map(summary_message),
            },
            diff_truncated,
            transcript_truncated,
        }))
    }
}

/// Serves `patchflow.v1.Tasks`, health and reflection on `listener` until `shutdown`.
pub async fn serve(
    service: TaskService,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), GrpcError> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<TasksServer<TasksApi>>().await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    // grpcurl and older tools still ask the v1alpha service.
    let reflection_v1alpha = reflection().build_v1alpha()?;
    tonic::transport::Server::builder()
        .layer(CountCalls)
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(TasksServer::new(TasksApi::new(service)))
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await?;
    Ok(())
}

/// Counts every call in `patchflow_grpc_requests_total{method,code}`: the code is the
/// `grpc-status` of a trailers-only answer (every error tonic returns), else `Ok`.
#[derive(Debug, Clone, Copy)]
struct CountCalls;

impl<S> tower::Layer<S> for CountCalls {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted(inner)
    }
}

#[derive(Debug, Clone)]
struct Counted<S>(S);

impl<S, B, RB> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = method_label(req.uri().path());
        let answer = self.0.call(req);
        Box::pin(async move {
            let r = answer.await;
            let code = match &r {
                Ok(resp) => resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|c| c.parse::<i32>().ok())
                    .map_or_else(
                        || "Ok".to_string(),
                        |c| format!("{:?}", tonic::Code::from(c)),
                    ),
                Err(_) => "Unavailable".to_string(),
            };
            patchflow_platform::metrics::global().grpc(&method, &code);
            r
        })
    }
}

/// `Service/Method` of a call's path (`/patchflow.v1.Tasks/SubmitTask` → `Tasks/SubmitTask`);
/// a path that is not one (a client chooses it) is `other`, so no label is a caller's text.
fn method_label(path: &str) -> String {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (Some(service), Some(method)) = (parts.next(), parts.next()) else {
        return "other".into();
    };
    let service = service.rsplit('.').next().unwrap_or(service);
    let word = |s: &str| {
        !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    if word(service) && word(method) {
        format!("{service}/{method}")
    } else {
        "other".into()
    }
}
