//! The HTTP API (DESIGN.md's contract): JSON in and out, errors as `{code, message}`.
//!
//! | route | what |
//! | --- | --- |
//! | `POST /api/tasks` | submit (JSON with `git_url`, or multipart with a `zip_file` part) |
//! | `GET /api/tasks` | list, newest first (`status`, `limit`, `cursor`) |
//! | `GET /api/tasks/{task_id}` | the task record |
//! | `GET /api/tasks/{task_id}/diff`, `/transcript`, `/log` | result files |
//! | `GET /api/tasks/{task_id}/events` | history as JSON, or live as Server-Sent Events |
//! | `POST /api/tasks/{task_id}/cancel` | ask a running task to stop |
//! | `POST /api/tasks/{task_id}/retry` | a new attempt of an ended task (`{"mode": "from_start" \| "from_failed_step"}`) |
//! | `GET /healthz` | liveness of the stores |
//! | `GET /`, `/tasks/{task_id}`, `POST /tasks…` | the web page ([`crate::web`]) |

use std::convert::Infallible;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use patchflow_core::{
    AgentSummary, Limits, Secret, TaskId, TaskRecord, TaskSource, TaskSpec, TaskStatus, layout,
};
use patchflow_platform::db::{ListCursor, ListFilter};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::error::ServiceError;
use crate::service::{ResultFile, RetryMode, TaskService, Upload};

/// Largest JSON body accepted (a task description is at most 64 KiB).
const MAX_JSON_BYTES: usize = 1024 * 1024;

/// An error as the API shows it.
pub struct ApiError(pub ServiceError);

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        Self(e)
    }
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(json!({"code": code, "message": message}))).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(error = %self.0, "request failed");
        }
        let mut response = error_response(status, self.0.code(), &self.0.to_string());
        if let ServiceError::RateLimited {
            retry_after_secs, ..
        } = &self.0
            && let Ok(v) = axum::http::HeaderValue::from_str(&retry_after_secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        response
    }
}

/// The task record as `GET /api/tasks/{task_id}` shows it.
#[derive(Debug, Serialize)]
pub struct TaskView {
    pub task_id: TaskId,
    pub status: TaskStatus,
    pub message: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub pr_url: Option<String>,
    pub summary: Option<AgentSummary>,
    pub source: String,
    pub task_description: String,
    pub target_file: Option<String>,
    pub model: Option<String>,
    pub limits: Limits,
    pub tenant: String,
    pub batch_id: Option<String>,
    /// The key the task was submitted with (a Kafka message's key; a batch's instance).
    pub idempotency_key: Option<String>,
    /// The current attempt (1 until the task is retried) and every attempt's outcome.
    pub attempt: u32,
    pub attempts: Vec<AttemptView>,
    pub links: Links,
}

/// One attempt of a task, as the record shows it.
#[derive(Debug, Serialize)]
pub struct AttemptView {
    pub attempt: u32,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub status: TaskStatus,
    pub message: String,
}

#[derive(Debug, Serialize)]
pub struct Links {
    pub diff: String,
    pub transcript: String,
    pub log: String,
    pub events: String,
    pub workflow: Option<String>,
}

fn view(service: &TaskService, r: TaskRecord) -> TaskView {
    let base = format!("/api/tasks/{}", r.task_id);
    TaskView {
        links: Links {
            diff: format!("{base}/diff"),
            transcript: format!("{base}/transcript"),
            log: format!("{base}/log"),
            events: format!("{base}/events"),
            workflow: service.workflow_link(&r.task_id),
        },
        source: r.spec.source.display_name(),
        task_description: r.spec.task_description.clone(),
        target_file: r.spec.target_file.clone(),
        model: r.spec.model.clone(),
        limits: r.spec.limits,
        task_id: r.task_id,
        status: r.status,
        message: r.message,
        created_at: r.created_at,
        updated_at: r.updated_at,
        pr_url: r.pr_url,
        summary: r.summary,
        tenant: r.tenant,
        batch_id: r.batch_id,
        idempotency_key: r.idempotency_key,
        attempt: r.attempt,
        attempts: r
            .attempts
            .into_iter()
            .map(|a| AttemptView {
                attempt: a.attempt,
                started_at: a.started_at,
                finished_at: a.finished_at,
                status: a.status,
                message: a.message,
            })
            .collect(),
    }
}

/// The submit body, JSON or multipart fields (DESIGN.md's names).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    pub git_url: Option<String>,
    pub git_ref: Option<String>,
    pub task_description: Option<String>,
    pub target_file: Option<String>,
    pub model: Option<String>,
    pub limits: Option<Limits>,
    #[serde(default)]
    pub open_pr: bool,
    /// Only the step that opens a pull request may use it; it is never stored.
    pub github_token: Option<Secret>,
    pub branch_name: Option<String>,
    pub tenant: Option<String>,
    pub batch_id: Option<String>,
    pub idempotency_key: Option<String>,
}

impl SubmitBody {
    /// The spec this body asks for. `has_upload` says a ZIP came with it.
    pub fn into_spec(self, has_upload: bool) -> Result<TaskSpec, ServiceError> {
        let empty = |o: &Option<String>| o.as_deref().is_none_or(|s| s.trim().is_empty());
        let source = match (&self.git_url, has_upload) {
            (Some(u), true) if !u.trim().is_empty() => {
                return Err(ServiceError::BadRequest(
                    "give either git_url or a zip_file upload, not both".into(),
                ));
            }
            (_, true) => TaskSource::Archive { key: String::new() },
            (url, false) if !empty(url) => TaskSource::Git {
                url: url.clone().unwrap_or_default().trim().to_string(),
                git_ref: self.git_ref.clone().filter(|r| !r.trim().is_empty()),
            },
            _ => {
                return Err(ServiceError::BadRequest(
                    "a source is required: git_url, or a zip_file part in a multipart upload"
                        .into(),
                ));
            }
        };
        let mut spec = TaskSpec::new(source, self.task_description.unwrap_or_default());
        spec.target_file = self.target_file.filter(|s| !s.trim().is_empty());
        spec.model = self.model.filter(|s| !s.trim().is_empty());
        spec.limits = self.limits.unwrap_or_default();
        spec.open_pr = self.open_pr;
        spec.branch_name = self.branch_name.filter(|s| !s.trim().is_empty());
        if let Some(t) = self.tenant.filter(|s| !s.trim().is_empty()) {
            spec.tenant = t;
        }
        spec.batch_id = self.batch_id.filter(|s| !s.trim().is_empty());
        spec.idempotency_key = self.idempotency_key.filter(|s| !s.trim().is_empty());
        Ok(spec)
    }
}

/// The API's routes over a service.
pub fn router(service: TaskService) -> Router {
    let upload_limit = service.config().max_upload_bytes as usize + MAX_JSON_BYTES;
    Router::new()
        .route(
            "/api/tasks",
            post(submit)
                .get(list)
                .layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route("/api/tasks/{task_id}", get(get_task))
        .route("/api/tasks/{task_id}/diff", get(diff))
        .route("/api/tasks/{task_id}/transcript", get(transcript))
        .route("/api/tasks/{task_id}/log", get(agent_log))
        .route("/api/tasks/{task_id}/events", get(events))
        .route("/api/tasks/{task_id}/cancel", post(cancel))
        .route("/api/tasks/{task_id}/retry", post(retry))
        .route("/healthz", get(healthz))
        .merge(crate::web::routes(upload_limit))
        .fallback(|| async { error_response(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(service)
}

fn parse_id(s: &str) -> Result<TaskId, ApiError> {
    s.parse::<TaskId>()
        .map_err(|e| ApiError(ServiceError::Invalid(e)))
}

async fn submit(
    State(service): State<TaskService>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let (body, upload) = if content_type.starts_with("multipart/form-data") {
        let multipart = Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError(ServiceError::BadRequest(e.body_text())))?;
        read_multipart(&service, multipart).await?
    } else if content_type.starts_with("application/json") || content_type.is_empty() {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_JSON_BYTES)
            .await
            .map_err(|_| {
                ApiError(ServiceError::TooLarge {
                    limit: MAX_JSON_BYTES as u64,
                })
            })?;
        let body: SubmitBody = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError(ServiceError::BadRequest(format!("invalid JSON body: {e}"))))?;
        (body, None)
    } else {
        return Ok(error_response(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send application/json or multipart/form-data",
        ));
    };
    let mut body = body;
    if let Some(key) = headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        body.idempotency_key = Some(key.to_string());
    }
    let spec = match body.into_spec(upload.is_some()) {
        Ok(s) => s,
        Err(e) => {
            if let Some(u) = upload {
                let _ = tokio::fs::remove_file(&u.path).await;
            }
            return Err(e.into());
        }
    };
    let outcome = service.submit(spec, upload).await?;
    let status = if outcome.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let r = &outcome.record;
    Ok((
        status,
        Json(json!({"task_id": r.task_id, "status": r.status, "message": r.message})),
    )
        .into_response())
}

/// Reads multipart fields; the `zip_file` part streams to a temporary file, bounded.
/// A browser form sends every field: an empty file part (no file chosen) and empty number
/// fields mean "not given".
pub(crate) async fn read_multipart(
    service: &TaskService,
    mut mp: Multipart,
) -> Result<(SubmitBody, Option<Upload>), ApiError> {
    let limit = service.config().max_upload_bytes;
    let mut fields = serde_json::Map::new();
    let mut upload: Option<Upload> = None;
    let bad = |m: String| ApiError(ServiceError::BadRequest(m));
    loop {
        let field = match mp.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError(ServiceError::TooLarge { limit }));
            }
            Err(e) => return Err(bad(format!("invalid multipart body: {}", e.body_text()))),
        };
        let name = field.name().unwrap_or_default().to_string();
        if name == "zip_file" {
            let no_file_chosen = field.file_name().is_none_or(str::is_empty);
            let path = std::env::temp_dir().join(format!("patchflow-upload-{}.zip", uuid_suffix()));
            let mut file = tokio::fs::File::create(&path).await.map_err(|e| {
                ApiError(ServiceError::Internal(format!(
                    "cannot buffer the upload: {e}"
                )))
            })?;
            let mut bytes = 0u64;
            let mut field = field;
            loop {
                match field.chunk().await {
                    Ok(Some(chunk)) => {
                        bytes += chunk.len() as u64;
                        if bytes > limit {
                            drop(file);
                            let _ = tokio::fs::remove_file(&path).await;
                            return Err(ApiError(ServiceError::TooLarge { limit }));
                        }
                        file.write_all(&chunk).await.map_err(|e| {
                            ApiError(ServiceError::Internal(format!(
                                "cannot buffer the upload: {e}"
                            )))
                        })?;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = tokio::fs::remove_file(&path).await;
                        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                            return Err(ApiError(ServiceError::TooLarge { limit }));
                        }
                        return Err(bad(format!("upload interrupted: {}", e.body_text())));
                    }
                }
            }
            file.flush()
                .await
                .map_err(|e| ApiError(ServiceError::Internal(e.to_string())))?;
            if no_file_chosen && bytes == 0 {
                drop(file);
                let _ = tokio::fs::remove_file(&path).await;
                continue;
            }
            upload = Some(Upload { path, bytes });
            continue;
        }
        let text = field
            .text()
            .await
            .map_err(|e| bad(format!("field `{name}`: {}", e.body_text())))?;
        let value = match name.as_str() {
            "limits" => serde_json::from_str(&text)
                .map_err(|e| bad(format!("field `limits` is not JSON: {e}")))?,
            "open_pr" => json!(matches!(text.trim(), "true" | "on" | "1" | "yes")),
            "max_steps" | "max_tokens" | "wall_seconds" if text.trim().is_empty() => continue,
            "max_steps" | "max_tokens" | "wall_seconds" => {
                let n: u64 = text
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("field `{name}` is not a number")))?;
                let limits = fields.entry("limits").or_insert_with(|| json!({}));
                limits[name.as_str()] = json!(n);
                continue;
            }
            _ => json!(text),
        };
        fields.insert(name, value);
    }
    let body: SubmitBody = serde_json::from_value(serde_json::Value::Object(fields))
        .map_err(|e| bad(format!("invalid form fields: {e}")))?;
    Ok((body, upload))
}

fn uuid_suffix() -> String {
    TaskId::generate()
        .as_str()
        .trim_start_matches("tsk_")
        .to_string()
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    status: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
    tenant: Option<String>,
    batch_id: Option<String>,
}

async fn list(
    State(service): State<TaskService>,
    Query(q): Query<ListQuery>,
) -> Result<Response, ApiError> {
    let status = q
        .status
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(str::parse::<TaskStatus>)
        .transpose()
        .map_err(|e| ApiError(ServiceError::Invalid(e)))?;
    let cursor =
        match q.cursor.as_deref().filter(|c| !c.is_empty()) {
            Some(c) => Some(ListCursor::decode(c).ok_or_else(|| {
                ApiError(ServiceError::BadRequest(format!("invalid cursor `{c}`")))
            })?),
            None => None,
        };
    let filter = ListFilter {
        status,
        tenant: q.tenant,
        batch_id: q.batch_id,
        cursor,
        limit: q.limit.unwrap_or(50),
    };
    let (page, next) = service.list(filter).await?;
    let tasks: Vec<TaskView> = page.into_iter().map(|r| view(&service, r)).collect();
    Ok(Json(json!({"tasks": tasks, "next_cursor": next})).into_response())
}

async fn get_task(
    State(service): State<TaskService>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    let id = parse_id(&id)?;
    let r = service.get(&id).await?;
    Ok(Json(view(&service, r)))
}

async fn result_file(
    service: &TaskService,
    id: &str,
    file: &str,
    content_type: &str,
) -> Result<Response, ApiError> {
    let id = parse_id(id)?;
    match service.open_result(&id, file).await? {
        ResultFile::Redirect(url) => {
            Ok((StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, url)]).into_response())
        }
        ResultFile::Stream(reader, size) => {
            let body = Body::from_stream(tokio_util::io::ReaderStream::new(reader));
            Ok((
                [
                    (header::CONTENT_TYPE, content_type.to_string()),
                    (header::CONTENT_LENGTH, size.to_string()),
                ],
                body,
            )
                .into_response())
        }
    }
}

async fn diff(
    State(service): State<TaskService>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    result_file(&service, &id, layout::DIFF, "text/x-diff; charset=utf-8").await
}

async fn transcript(
    State(service): State<TaskService>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    result_file(&service, &id, layout::TRANSCRIPT, "application/x-ndjson").await
}

async fn agent_log(
    State(service): State<TaskService>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    result_file(
        &service,
        &id,
        layout::AGENT_LOG,
        "text/plain; charset=utf-8",
    )
    .await
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    after: Option<i64>,
    limit: Option<u32>,
}

async fn events(
    State(service): State<TaskService>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let last_seen = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .or(q.after)
        .unwrap_or(0);
    if !wants_stream {
        let events = service
            .events(&id, last_seen, q.limit.unwrap_or(500))
            .await?;
        return Ok(Json(json!({"task_id": id, "events": events})).into_response());
    }
    service.get(&id).await?;
    let stream = service.follow(id, last_seen).map(|item| {
        Ok::<_, Infallible>(match item {
            Ok(ev) => Event::default()
                .id(ev.seq.to_string())
                .event(ev.kind.as_str())
                .data(serde_json::to_string(&ev).unwrap_or_default()),
            Err(e) => Event::default().event("error").data(e.to_string()),
        })
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[derive(Debug, Default, Deserialize)]
struct CancelBody {
    #[serde(default)]
    reason: String,
}

async fn cancel(
    State(service): State<TaskService>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let body: CancelBody = if body.is_empty() {
        CancelBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError(ServiceError::BadRequest(format!("invalid JSON body: {e}"))))?
    };
    let r = service.cancel(&id, &body.reason).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"task_id": r.task_id, "status": r.status, "message": "cancel requested"})),
    )
        .into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryBody {
    #[serde(default)]
    mode: RetryMode,
}

/// `202` with the task record (its `attempt` is the new one); `409` while the task runs.
async fn retry(
    State(service): State<TaskService>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let body: RetryBody = if body.iter().all(u8::is_ascii_whitespace) {
        RetryBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError(ServiceError::BadRequest(format!("invalid JSON body: {e}"))))?
    };
    let r = service.retry(&id, body.mode).await?;
    Ok((StatusCode::ACCEPTED, Json(view(&service, r))).into_response())
}

async fn healthz(State(service): State<TaskService>) -> Response {
    match service.health().await {
        Ok(None) => Json(json!({"status": "ok"})).into_response(),
        Ok(Some(cache)) => Json(json!({"status": "degraded", "cache": cache})).into_response(),
        Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, e.code(), &e.to_string()),
    }
}
