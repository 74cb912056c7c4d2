//! The HTTP API (the README's contract): JSON in and out, errors as `{code, message}`.
//! The bodies are patchflow-api's types; submissions are read by [`crate::submit`].
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
//! | `POST /api/tasks/{task_id}/messages` | a follow-up turn (`{"message"}`): `202 {"task_id", "turn"}`, `409` while a turn runs |
//! | `POST /api/tasks/{task_id}/select` | makes a candidate the task's result (`{"candidate": N}`) |
//! | `GET /api/tasks/{task_id}/candidates/{n}/diff`, `/transcript`, `/log` | one candidate's files |
//! | `…/diff?turn=N`, `…/transcript?turn=N`, `…/log?turn=N` | one turn's own change, lines, log |
//! | `POST /api/tokens`, `GET /api/tokens`, `DELETE /api/tokens/{token_id}` | token management (admin) |
//! | `POST /api/environments`, `GET /api/environments` | create (`201`, `409` if the name is taken) and list the tenant's saved environments |
//! | `GET`, `PUT`, `DELETE /api/environments/{name}` | one environment: read, replace (a body without `secrets` keeps the stored ones), delete |
//! | `POST /api/environments/{name}/reset-cache` | a new cache generation; the cached states made from it removed |
//! | `GET /api/usage` | tasks, tokens and cost per day and model (`from`, `to`; an admin's `tenant`) |
//! | `GET /api/whoami` | the caller's tenant, role and token id |
//! | `GET /healthz` | liveness of the stores |
//!
//! Every `/api/*` route wants `Authorization: Bearer <token>` ([`crate::auth`]), checked
//! before any body is read; a task of another tenant answers 404, as a missing one.
//! | `GET /`, `/tasks/{task_id}`, `POST /tasks…` | the web page ([`crate::web`]) |

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{
    DefaultBodyLimit, Extension, FromRequest, Multipart, Path, Query, Request, State,
};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use futures::StreamExt;
use patchflow_api::error::from_json;
use patchflow_api::{
    CancelBody, ErrorBody, EventPage, Health, MessageBody, RetryBody, SelectBody, StatusAnswer,
    SubmitBody, TaskPage, TaskView, TurnAnswer,
};
use patchflow_core::{TaskId, TaskRecord, TaskStatus, layout};
use patchflow_platform::db::{ListCursor, ListFilter};
use serde::Deserialize;

use crate::auth::{Principal, TokenRequest};
use crate::error::ServiceError;
use crate::service::{ResultFile, RunFile, TaskService};
use crate::submit::{read_multipart, spec_of};

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
    (status, Json(ErrorBody::new(code, message))).into_response()
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

/// The body of `POST /api/tasks/{task_id}/pull-request` (all optional).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PullRequestBody {
    /// A token to use instead of the task's own.
    #[serde(default)]
    github_token: Option<patchflow_core::Secret>,
}

/// Opens (or updates) an ended task's pull request now: `200 {"task_id", "pr_url"}`, or
/// `409` with the reason (also the record's `pr_error`).
async fn pull_request(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    Path(task_id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&task_id)?;
    let body: PullRequestBody = if body.iter().all(u8::is_ascii_whitespace) {
        PullRequestBody::default()
    } else {
        from_json(&body).map_err(ServiceError::from)?
    };
    let out = service
        .open_pull_request(&who, &id, body.github_token)
        .await?;
    match (out.pr_url, out.pr_error) {
        (Some(url), _) => Ok((
            StatusCode::OK,
            Json(serde_json::json!({"task_id": id, "pr_url": url})),
        )
            .into_response()),
        (None, why) => Err(ApiError(ServiceError::Conflict(
            why.unwrap_or_else(|| "no pull request was opened".into()),
        ))),
    }
}

/// A service error as the API answers it.
pub(crate) fn error_of(e: ServiceError) -> Response {
    ApiError(e).into_response()
}

/// The record as the API shows it, with its workflow's link.
fn view(service: &TaskService, r: TaskRecord) -> TaskView {
    let workflow = service.workflow_link(&r.task_id);
    TaskView::new(r, workflow)
}

/// The API's routes over a service.
pub fn router(service: TaskService) -> Router {
    let upload_limit = service.config().max_upload_bytes as usize + MAX_JSON_BYTES;
    let api = Router::new()
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
        .route("/api/tasks/{task_id}/source", get(source))
        .route("/api/tasks/{task_id}/events", get(events))
        .route("/api/tasks/{task_id}/cancel", post(cancel))
        .route("/api/tasks/{task_id}/retry", post(retry))
        .route("/api/tasks/{task_id}/pull-request", post(pull_request))
        .route("/api/tasks/{task_id}/messages", post(send_message))
        .route("/api/tasks/{task_id}/select", post(select))
        .route(
            "/api/tasks/{task_id}/candidates/{candidate}/{file}",
            get(candidate_file),
        )
        .route("/api/tokens", post(create_token).get(list_tokens))
        .route("/api/tokens/{token_id}", delete(revoke_token))
        .route(
            "/api/environments",
            post(create_environment).get(list_environments),
        )
        .route(
            "/api/environments/{name}",
            get(get_environment)
                .put(update_environment)
                .delete(delete_environment),
        )
        .route(
            "/api/environments/{name}/reset-cache",
            post(reset_environment_cache),
        )
        .route("/api/usage", get(usage))
        .route("/api/whoami", get(whoami))
        .route_layer(axum::middleware::from_fn_with_state(
            service.clone(),
            require_token,
        ));
    // Webhooks are authenticated by their signatures, not by API tokens.
    let hooks = Router::new()
        .route("/api/webhooks/github", post(crate::webhooks::github))
        .route("/api/webhooks/gitlab", post(crate::webhooks::gitlab))
        .layer(DefaultBodyLimit::max(crate::webhooks::MAX_WEBHOOK_BYTES));
    Router::new()
        .merge(api)
        .merge(hooks)
        .route("/healthz", get(healthz))
        .merge(crate::web::routes(upload_limit, service.clone()))
        .fallback(|| async { error_response(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .with_state(service)
        .layer(axum::middleware::from_fn(count_request))
}

/// Counts every answer in `patchflow_http_requests_total{route,code}`, by the route's
/// pattern (`/api/tasks/{task_id}`), never the path a caller sent.
async fn count_request(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let response = next.run(req).await;
    patchflow_platform::metrics::global().http(&route, response.status().as_u16());
    response
}

/// The token check in front of every `/api/*` route: the caller becomes a [`Principal`]
/// in the request's extensions, or the answer is `401` with `WWW-Authenticate: Bearer`.
async fn require_token(
    State(service): State<TaskService>,
    mut req: Request,
    next: Next,
) -> Response {
    let header_token = crate::auth::bearer(
        req.headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok()),
    )
    .map(str::to_string);
    // The web page's script calls the API with the session cookie; a write by cookie must
    // carry the session's CSRF token too (the cookie is SameSite=Strict as well).
    let token = match (header_token, crate::auth::session_token(req.headers())) {
        (Some(t), _) => Some(t),
        (None, Some(token)) => {
            let safe = matches!(
                *req.method(),
                axum::http::Method::GET | axum::http::Method::HEAD
            );
            let sent = req
                .headers()
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok());
            if !safe && sent != Some(crate::auth::csrf_of(&token).as_str()) {
                return ApiError(ServiceError::Forbidden(
                    "a write with the session cookie needs the page's X-CSRF-Token".into(),
                ))
                .into_response();
            }
            Some(token)
        }
        (None, None) => None,
    };
    match service.authenticate_token(token.as_deref()).await {
        Ok(who) => {
            req.extensions_mut().insert(who);
            next.run(req).await
        }
        Err(e) => {
            let mut response = ApiError(e).into_response();
            if response.status() == StatusCode::UNAUTHORIZED {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    axum::http::HeaderValue::from_static("Bearer realm=\"patchflow\""),
                );
            }
            response
        }
    }
}

async fn create_token(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    who.must_admin()?;
    let req: TokenRequest = serde_json::from_slice(&body)
        .map_err(|e| ServiceError::BadRequest(format!("invalid JSON body: {e}")))?;
    let made = service.create_token(&who, req).await?;
    Ok((StatusCode::CREATED, Json(made)).into_response())
}

async fn list_tokens(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
) -> Result<Response, ApiError> {
    let tokens = service.list_tokens(&who).await?;
    Ok(Json(serde_json::json!({ "tokens": tokens })).into_response())
}

async fn revoke_token(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    Path(token_id): Path<String>,
) -> Result<Response, ApiError> {
    if service.revoke_token(&who, &token_id).await? {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Ok(error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no live token {token_id}"),
        ))
    }
}

/// Largest environment body: two scripts of 64 KiB and 64 variables and 64 secrets of
/// 16 KiB each fit, with room for names and lists.
const MAX_ENVIRONMENT_BYTES: usize = 3 * 1024 * 1024;

/// `?tenant=`: the tenant an admin acts in (a member or viewer naming another is refused).
#[derive(Debug, Default, Deserialize)]
struct TenantQuery {
    tenant: Option<String>,
}

/// An environment body, read up to its limit (over it: `413`, before it is parsed).
async fn environment_body(req: Request) -> Result<patchflow_api::EnvironmentBody, ApiError> {
    let bytes = axum::body::to_bytes(req.into_body(), MAX_ENVIRONMENT_BYTES)
        .await
        .map_err(|_| {
            ApiError(ServiceError::TooLarge {
                limit: MAX_ENVIRONMENT_BYTES as u64,
            })
        })?;
    Ok(from_json(&bytes).map_err(ServiceError::from)?)
}

fn environment_view(
    r: &patchflow_core::environment::EnvironmentRecord,
) -> Json<patchflow_api::EnvironmentView> {
    Json(patchflow_api::EnvironmentView::new(r))
}

async fn create_environment(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    Query(q): Query<TenantQuery>,
    req: Request,
) -> Result<Response, ApiError> {
    who.must_write()?;
    let body = environment_body(req).await?;
    let r = service
        .create_environment(&who, q.tenant.as_deref(), body)
        .await?;
    Ok((StatusCode::CREATED, environment_view(&r)).into_response())
}

async fn list_environments(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, ApiError> {
    let list = service.list_environments(&who, q.tenant.as_deref()).await?;
    Ok(Json(patchflow_api::EnvironmentList {
        environments: list
            .iter()
            .map(patchflow_api::EnvironmentView::new)
            .collect(),
    })
    .into_response())
}

async fn get_environment(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, ApiError> {
    let r = service
        .get_environment(&who, q.tenant.as_deref(), &name)
        .await?;
    Ok(environment_view(&r).into_response())
}

async fn update_environment(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    Query(q): Query<TenantQuery>,
    req: Request,
) -> Result<Response, ApiError> {
    who.must_write()?;
    let body = environment_body(req).await?;
    let r = service
        .update_environment(&who, q.tenant.as_deref(), &name, body)
        .await?;
    Ok(environment_view(&r).into_response())
}

async fn delete_environment(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, ApiError> {
    service
        .delete_environment(&who, q.tenant.as_deref(), &name)
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn reset_environment_cache(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    Query(q): Query<TenantQuery>,
) -> Result<Response, ApiError> {
    let answer = service
        .reset_environment_cache(&who, q.tenant.as_deref(), &name)
        .await?;
    Ok(Json(answer).into_response())
}

/// `?from=&to=&tenant=` of `GET /api/usage` (each optional).
#[derive(Debug, Default, Deserialize)]
struct UsageParams {
    from: Option<String>,
    to: Option<String>,
    tenant: Option<String>,
}

/// The caller's usage report; a parameter that cannot be read is a `400` naming it.
async fn usage(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    q: Result<Query<UsageParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<patchflow_api::UsageAnswer>, ApiError> {
    let Query(q) = q.map_err(|e| ServiceError::BadRequest(e.body_text()))?;
    Ok(Json(
        service
            .usage(
                &who,
                q.tenant.as_deref(),
                q.from.as_deref(),
                q.to.as_deref(),
            )
            .await?,
    ))
}

async fn whoami(Extension(who): Extension<Principal>) -> Json<Principal> {
    Json(who)
}

fn parse_id(s: &str) -> Result<TaskId, ApiError> {
    s.parse::<TaskId>()
        .map_err(|e| ApiError(ServiceError::Invalid(e)))
}

async fn submit(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    req: Request,
) -> Result<Response, ApiError> {
    who.must_write()?;
    // The caller's rate limit, before a byte of the body is read.
    service.admit(&who.tenant).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let (body, upload) = if content_type.starts_with("multipart/form-data") {
        let multipart = Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError(ServiceError::BadRequest(e.body_text())))?;
        let (body, upload, _csrf) = read_multipart(&service, multipart).await?;
        (body, upload)
    } else if content_type.starts_with("application/json") || content_type.is_empty() {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_JSON_BYTES)
            .await
            .map_err(|_| {
                ApiError(ServiceError::TooLarge {
                    limit: MAX_JSON_BYTES as u64,
                })
            })?;
        let body: SubmitBody = from_json(&bytes).map_err(ServiceError::from)?;
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
    body.tenant = Some(who.tenant_for_submit(body.tenant.as_deref())?);
    let spec = spec_of(body, upload.as_ref()).await?;
    let traceparent = headers
        .get(patchflow_core::trace::TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok());
    let outcome = service
        .submit_admitted(spec, upload, traceparent)
        .await?
        .counted("http");
    let status = if outcome.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    let r = outcome.record;
    let answer = StatusAnswer {
        task_id: r.task_id,
        status: r.status,
        message: r.message,
    };
    Ok((status, Json(answer)).into_response())
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
    Extension(who): Extension<Principal>,
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
        // Only an admin lists another tenant (or every tenant).
        tenant: if who.is_admin() {
            q.tenant.filter(|t| !t.is_empty())
        } else {
            Some(who.tenant.clone())
        },
        batch_id: q.batch_id,
        cursor,
        limit: q.limit.unwrap_or(50),
    };
    let (page, next) = service.list(filter).await?;
    let tasks = page.into_iter().map(|r| view(&service, r)).collect();
    Ok(Json(TaskPage {
        tasks,
        next_cursor: next,
    })
    .into_response())
}

async fn get_task(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<TaskView>, ApiError> {
    let id = parse_id(&id)?;
    let r = service.get_for(&who, &id).await?;
    Ok(Json(view(&service, r)))
}

/// `?attempt=N`: one attempt's copy of a result file instead of the latest; `?turn=N`:
/// one turn's own (its change, its transcript lines, its log).
#[derive(Debug, Deserialize)]
struct AttemptQuery {
    attempt: Option<u32>,
    turn: Option<u32>,
}

async fn result_file(
    service: &TaskService,
    who: &Principal,
    id: &str,
    file: &str,
    q: AttemptQuery,
    content_type: &str,
) -> Result<Response, ApiError> {
    let id = parse_id(id)?;
    service.get_for(who, &id).await?;
    let opened = match (q.attempt, q.turn) {
        (Some(_), Some(_)) => {
            return Err(
                ServiceError::BadRequest("ask for an attempt or a turn, not both".into()).into(),
            );
        }
        (_, Some(turn)) => {
            let which = RunFile {
                candidate: None,
                turn: Some(turn),
            };
            service.open_run_result(&id, file, which).await?
        }
        (attempt, None) => service.open_result(&id, file, attempt).await?,
    };
    respond(opened, content_type)
}

/// The result files a candidate has, and how each is served.
fn result_file_of(name: &str) -> Option<(&'static str, &'static str)> {
    match name {
        "diff" => Some((layout::DIFF, "text/x-diff; charset=utf-8")),
        "transcript" => Some((layout::TRANSCRIPT, "application/x-ndjson")),
        "log" => Some((layout::AGENT_LOG, "text/plain; charset=utf-8")),
        _ => None,
    }
}

/// `GET /api/tasks/{id}/candidates/{n}/{diff|transcript|log}`.
async fn candidate_file(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    Path((id, candidate, file)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    service.get_for(&who, &id).await?;
    let Some((file, content_type)) = result_file_of(&file) else {
        return Ok(error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            "a candidate has diff, transcript and log",
        ));
    };
    let Ok(n) = candidate.parse::<u32>() else {
        return Err(
            ServiceError::Missing(format!("task {id} has no candidate `{candidate}`")).into(),
        );
    };
    let which = RunFile {
        candidate: Some(n),
        turn: None,
    };
    respond(
        service.open_run_result(&id, file, which).await?,
        content_type,
    )
}

/// A JSON object body read as `T` (serde would also take an array for a struct's fields).
fn object_body<T: serde::de::DeserializeOwned>(bytes: &[u8], shape: &str) -> Result<T, ApiError> {
    if !bytes.trim_ascii_start().starts_with(b"{") {
        return Err(
            ServiceError::BadRequest(format!("the body must be a JSON object: {shape}")).into(),
        );
    }
    Ok(from_json(bytes).map_err(ServiceError::from)?)
}

/// Largest message body: a message of 64 KiB, escaped.
const MAX_MESSAGE_BODY_BYTES: usize = 512 * 1024;

/// `202 {"task_id", "turn"}`; `409` while a turn runs (or the task cannot go on).
async fn send_message(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    who.must_write()?;
    // Another tenant's task is a 404 whatever the body says.
    service.get_for(&who, &id).await?;
    let bytes = axum::body::to_bytes(req.into_body(), MAX_MESSAGE_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError(ServiceError::TooLarge {
                limit: MAX_MESSAGE_BODY_BYTES as u64,
            })
        })?;
    let body: MessageBody = object_body(&bytes, r#"{"message": "..."}"#)?;
    let accepted = service.send_message(&who, &id, &body.message).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(TurnAnswer {
            task_id: id,
            turn: accepted.turn,
        }),
    )
        .into_response())
}

/// `200` with the task record, whose diff is now the candidate's.
async fn select(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    who.must_write()?;
    service.get_for(&who, &id).await?;
    let body: SelectBody = object_body(&body, r#"{"candidate": N}"#)?;
    let r = service.select(&who, &id, body.candidate).await?;
    Ok(Json(view(&service, r)).into_response())
}

/// An opened object as the answer: a redirect to its presigned URL, or its bytes.
fn respond(opened: ResultFile, content_type: &str) -> Result<Response, ApiError> {
    match opened {
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
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    Query(q): Query<AttemptQuery>,
) -> Result<Response, ApiError> {
    result_file(
        &service,
        &who,
        &id,
        layout::DIFF,
        q,
        "text/x-diff; charset=utf-8",
    )
    .await
}

async fn transcript(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    Query(q): Query<AttemptQuery>,
) -> Result<Response, ApiError> {
    result_file(
        &service,
        &who,
        &id,
        layout::TRANSCRIPT,
        q,
        "application/x-ndjson",
    )
    .await
}

#[derive(Debug, Deserialize)]
struct SourceQuery {
    part: Option<String>,
}

/// The code the agent started from (`application/zstd`, a tar): what replay restores;
/// `?part=home`, the HOME paths its setup kept.
async fn source(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    Query(q): Query<SourceQuery>,
) -> Result<Response, ApiError> {
    let home = match q.part.as_deref() {
        None | Some("code") => false,
        Some("home") => true,
        Some(other) => {
            return Err(ServiceError::BadRequest(format!(
                "part must be `code` or `home`, not `{other}`"
            ))
            .into());
        }
    };
    let id = parse_id(&id)?;
    service.get_for(&who, &id).await?;
    respond(service.open_source(&id, home).await?, "application/zstd")
}

async fn agent_log(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    Query(q): Query<AttemptQuery>,
) -> Result<Response, ApiError> {
    result_file(
        &service,
        &who,
        &id,
        layout::AGENT_LOG,
        q,
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
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    service.get_for(&who, &id).await?;
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
        return Ok(Json(EventPage {
            task_id: id,
            events,
        })
        .into_response());
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

async fn cancel(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    who.must_write()?;
    service.get_for(&who, &id).await?;
    let body = CancelBody::from_bytes(&body).map_err(ServiceError::from)?;
    let r = service.cancel(&id, &body.reason).await?;
    let answer = StatusAnswer {
        task_id: r.task_id,
        status: r.status,
        message: "cancel requested".into(),
    };
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// `202` with the task record (its `attempt` is the new one); `409` while the task runs.
async fn retry(
    State(service): State<TaskService>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    who.must_write()?;
    service.get_for(&who, &id).await?;
    let body = RetryBody::from_bytes(&body).map_err(ServiceError::from)?;
    let r = service.retry(&id, body.mode).await?;
    Ok((StatusCode::ACCEPTED, Json(view(&service, r))).into_response())
}

async fn healthz(State(service): State<TaskService>) -> Response {
    match service.health().await {
        Ok(cache) => Json(Health {
            status: if cache.is_none() { "ok" } else { "degraded" }.into(),
            cache,
        })
        .into_response(),
        Err(e) => error_response(StatusCode::SERVICE_UNAVAILABLE, e.code(), &e.to_string()),
    }
}
