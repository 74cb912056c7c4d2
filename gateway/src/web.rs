//! patchflow's own web page, served by the gateway: the task list with a submit form at
//! `/`, one task at `/tasks/{task_id}`, and the stylesheet and script under `/assets/`,
//! compiled into the binary (no front-end server, no build step).
//!
//! The server renders every page in full, so they read and work without JavaScript: the
//! forms are plain POSTs that answer with a redirect (303) to the page to look at next.
//! The script only enhances: it follows a task over the API's Server-Sent Events, refreshes
//! the parts of the page that change, filters the list as you type and keeps it fresh.
//! Every page is sent with a Content-Security-Policy that allows our own script and
//! stylesheet only, a second line of defence behind the escaping in [`html`].

pub mod diff;
pub mod html;
pub mod pages;
pub mod transcript;

use std::sync::LazyLock;

use axum::Router;
use axum::extract::{
    DefaultBodyLimit, Extension, FromRequest, Multipart, Path, Query, Request, State,
};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use patchflow_api::{LimitsBody, RetryMode};
use patchflow_core::{TaskId, TaskStatus, layout};
use patchflow_platform::db::{ListCursor, ListFilter};
use serde::Deserialize;

use crate::auth::Principal;
use crate::error::ServiceError;
use crate::service::{RunFile, TaskService};
use crate::submit::{read_multipart, spec_of};
use html::SignedIn;
use pages::{FormState, ListFilterView, TaskPageData};
use patchflow_core::config::AuthMode;

const APP_CSS: &str = include_str!("../assets/app.css");
const APP_JS: &str = include_str!("../assets/app.js");

/// Largest diff and transcript rendered into the page; the raw files have the rest.
const MAX_RENDERED_BYTES: u64 = 1024 * 1024;

/// How many tasks the list reads when a search narrows them on the server.
const SEARCH_WINDOW: u32 = 200;

/// A short fingerprint of the assets, put in their URLs so a browser may cache them for
/// good and still gets the new ones after an upgrade.
pub static ASSET_VERSION: LazyLock<String> = LazyLock::new(|| {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in APP_CSS.bytes().chain(APP_JS.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:08x}", h as u32)
});

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// The page routes, to merge into the API router. `upload_limit` bounds the submit form's
/// body as it bounds `POST /api/tasks` (the ZIP plus the other fields).
pub fn routes(upload_limit: usize, service: TaskService) -> Router<TaskService> {
    let signed_in = Router::new()
        .route("/", get(list_page))
        .route(
            "/tasks",
            post(submit_form).layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route("/tasks/{task_id}", get(task_page))
        .route("/tasks/{task_id}/cancel", post(cancel_form))
        .route("/tasks/{task_id}/retry", post(retry_form))
        .route("/tasks/{task_id}/messages", post(message_form))
        .route("/tasks/{task_id}/select", post(select_form))
        .route("/signout", post(signout))
        .route_layer(axum::middleware::from_fn_with_state(
            service,
            require_session,
        ));
    Router::new()
        .merge(signed_in)
        .route("/signin", get(signin_page).post(signin))
        .route("/assets/app.css", get(css))
        .route("/assets/app.js", get(js))
}

/// The signed-in caller of a page, with the session's CSRF token.
#[derive(Debug, Clone)]
struct Session {
    who: Principal,
    csrf: String,
}

impl Session {
    fn signed_in(&self) -> SignedIn<'_> {
        SignedIn {
            tenant: &self.who.tenant,
            role: self.who.role.as_str(),
            csrf: &self.csrf,
        }
    }

    /// `403` unless the form carried this session's CSRF token.
    fn check(&self, sent: Option<&str>) -> Option<Response> {
        (sent != Some(self.csrf.as_str())).then(|| {
            html(
                StatusCode::FORBIDDEN,
                pages::error_page("Refused", "this form is stale or was not sent from patchflow's page: reload and try again"),
            )
        })
    }
}

/// The session check in front of the pages: a live token in the session cookie, else a
/// redirect to the sign-in form (`401` for a form post).
async fn require_session(
    State(service): State<TaskService>,
    mut req: Request,
    next: axum::middleware::Next,
) -> Response {
    let token = crate::auth::session_token(req.headers());
    let checked = match &token {
        Some(t) => service.authenticate_token(Some(t)).await,
        None if service.config().auth == AuthMode::None => service.authenticate_token(None).await,
        None => Err(ServiceError::Unauthenticated("sign in first".into())),
    };
    match checked {
        Ok(who) => {
            let csrf = crate::auth::csrf_of(token.as_deref().unwrap_or_default());
            req.extensions_mut().insert(Session { who, csrf });
            next.run(req).await
        }
        Err(ServiceError::Unauthenticated(_)) if req.method() == axum::http::Method::GET => {
            Redirect::to("/signin").into_response()
        }
        Err(e) => error_html(&e),
    }
}

async fn signin_page() -> Response {
    html(StatusCode::OK, pages::signin_page(None))
}

/// `token=…` (form-encoded): a live token becomes the session cookie.
async fn signin(
    State(service): State<TaskService>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(r) = same_origin(&headers) {
        return r;
    }
    let token = form_value(&body, "token").unwrap_or_default();
    match service.authenticate_token(Some(&token)).await {
        Ok(who) => {
            tracing::info!(tenant = %who.tenant, token_id = %who.token_id, "signed in on the web page");
            let secure = headers
                .get("x-forwarded-proto")
                .and_then(|v| v.to_str().ok())
                == Some("https");
            let mut r = Redirect::to("/").into_response();
            if let Ok(v) = HeaderValue::from_str(&crate::auth::session_cookie(Some(&token), secure))
            {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(e) => html(
            StatusCode::UNAUTHORIZED,
            pages::signin_page(Some(&e.to_string())),
        ),
    }
}

async fn signout(Extension(session): Extension<Session>, body: axum::body::Bytes) -> Response {
    if let Some(r) = session.check(form_value(&body, "csrf").as_deref()) {
        return r;
    }
    let mut r = Redirect::to("/signin").into_response();
    if let Ok(v) = HeaderValue::from_str(&crate::auth::session_cookie(None, false)) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// One field of a form-encoded body.
fn form_value(body: &[u8], name: &str) -> Option<String> {
    url::form_urlencoded::parse(body)
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// An HTML answer with the security headers every page carries.
fn html(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    // Pages show live state: never serve one from a cache.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn error_html(e: &ServiceError) -> Response {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_server_error() {
        tracing::warn!(error = %e, "page failed");
    }
    let title = match e {
        ServiceError::NotFound(_) => "Not found",
        ServiceError::Finished { .. }
        | ServiceError::StillRunning { .. }
        | ServiceError::Conflict(_) => "Not possible now",
        _ if status.is_client_error() => "Bad request",
        _ => "Unavailable",
    };
    html(status, pages::error_page(title, &e.to_string()))
}

fn asset(body: &'static str, content_type: &'static str, versioned: bool) -> Response {
    let cache = if versioned {
        "public, max-age=31536000, immutable"
    } else {
        "public, max-age=300"
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, cache),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct AssetQuery {
    v: Option<String>,
}

async fn css(Query(q): Query<AssetQuery>) -> Response {
    asset(
        APP_CSS,
        "text/css; charset=utf-8",
        q.v.as_deref() == Some(ASSET_VERSION.as_str()),
    )
}

async fn js(Query(q): Query<AssetQuery>) -> Response {
    asset(
        APP_JS,
        "text/javascript; charset=utf-8",
        q.v.as_deref() == Some(ASSET_VERSION.as_str()),
    )
}

#[derive(Debug, Default, Deserialize)]
struct ListQuery {
    status: Option<String>,
    q: Option<String>,
    cursor: Option<String>,
    /// An admin's narrowing to one tenant.
    tenant: Option<String>,
}

async fn list_page(
    State(service): State<TaskService>,
    Extension(session): Extension<Session>,
    Query(q): Query<ListQuery>,
) -> Response {
    render_list(&service, &session, q, FormState::default(), StatusCode::OK).await
}

async fn render_list(
    service: &TaskService,
    session: &Session,
    q: ListQuery,
    form: FormState,
    status_code: StatusCode,
) -> Response {
    let status = match q
        .status
        .as_deref()
        .filter(|s| !s.is_empty())
        .map(str::parse::<TaskStatus>)
        .transpose()
    {
        Ok(s) => s,
        Err(e) => return error_html(&ServiceError::Invalid(e)),
    };
    let cursor = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        Some(c) => match ListCursor::decode(c) {
            Some(c) => Some(c),
            None => {
                return error_html(&ServiceError::BadRequest(format!("invalid cursor `{c}`")));
            }
        },
        None => None,
    };
    let query = q.q.unwrap_or_default();
    // The store has no text search: a search reads a wider window and narrows it here.
    let limit = if query.trim().is_empty() {
        50
    } else {
        SEARCH_WINDOW
    };
    // The signed-in tenant's tasks; an admin sees every tenant's, or the one it names.
    let tenant = q
        .tenant
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty() && session.who.is_admin());
    let filter = ListFilter {
        status,
        tenant: if session.who.is_admin() {
            tenant.clone()
        } else {
            Some(session.who.tenant.clone())
        },
        batch_id: None,
        cursor,
        limit,
    };
    let (tasks, next) = match service.list(filter).await {
        Ok(p) => p,
        Err(e) => return error_html(&e),
    };
    let tasks: Vec<_> = tasks
        .into_iter()
        .filter(|r| pages::matches_query(r, &query))
        .collect();
    let body = pages::list_page(
        &tasks,
        &ListFilterView {
            status,
            query,
            tenant: tenant.unwrap_or_default(),
        },
        next.as_deref(),
        &form,
        chrono::Utc::now(),
        Some(&session.signed_in()),
    );
    html(status_code, body)
}

#[derive(Debug, Default, Deserialize)]
struct TaskQuery {
    view: Option<String>,
}

/// Reads a result file for the page, as text; a missing one is `None`, and a store that
/// cannot be read is logged and shown as missing rather than failing the whole page.
async fn result_text(service: &TaskService, id: &TaskId, file: &str) -> Option<(String, bool)> {
    match service.read_result(id, file, MAX_RENDERED_BYTES).await {
        Ok(Some((bytes, cut))) => Some((String::from_utf8_lossy(&bytes).into_owned(), cut)),
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(task_id = %id, file, error = %e, "cannot read a result for the page");
            None
        }
    }
}

async fn task_page(
    State(service): State<TaskService>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    Query(q): Query<TaskQuery>,
) -> Response {
    let id = match id.parse::<TaskId>() {
        Ok(id) => id,
        Err(e) => return error_html(&ServiceError::Invalid(e)),
    };
    let record = match service.get_for(&session.who, &id).await {
        Ok(r) => r,
        Err(e) => return error_html(&e),
    };
    let events = match service.events(&id, 0, 1000).await {
        Ok(e) => e,
        Err(e) => return error_html(&e),
    };
    let (diff, transcript) = tokio::join!(
        result_text(&service, &id, layout::DIFF),
        result_text(&service, &id, layout::TRANSCRIPT)
    );
    // Each candidate's diff, side by side (a share of the page's budget each).
    let mut candidate_diffs = Vec::new();
    if record.spec.candidates > 1 {
        let share = MAX_RENDERED_BYTES / u64::from(record.spec.candidates);
        for n in 1..=record.spec.candidates {
            let which = RunFile {
                candidate: Some(n),
                turn: None,
            };
            let text = match service
                .read_run_result(&record, layout::DIFF, which, share)
                .await
            {
                Ok(t) => t.map(|(b, cut)| (String::from_utf8_lossy(&b).into_owned(), cut)),
                Err(e) => {
                    tracing::warn!(task_id = %id, candidate = n, error = %e, "cannot read a candidate's diff for the page");
                    None
                }
            };
            candidate_diffs.push((n, text));
        }
    }
    let data = TaskPageData {
        candidate_diffs,
        record: &record,
        events: &events,
        workflow_link: service.workflow_link(&id),
        diff,
        transcript,
        split: q.view.as_deref() == Some("split"),
        now: chrono::Utc::now(),
        who: Some(session.signed_in()),
    };
    html(StatusCode::OK, pages::task_page(&data))
}

/// Refuses a form post another site made the browser send (the API itself has no cookies
/// to steal, but a page elsewhere must not start or stop tasks through a visitor). A
/// browser that says where a request comes from (`Sec-Fetch-Site`) is believed; for older
/// ones the `Origin` must name this host (or the host a proxy says it forwarded).
fn same_origin(headers: &HeaderMap) -> Option<Response> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let refused = match (text("sec-fetch-site"), text("origin")) {
        (Some(site), _) => site == "cross-site",
        (None, Some("null")) => true,
        (None, Some(origin)) => {
            let origin_host = origin.split_once("://").map(|(_, rest)| rest);
            ![text("x-forwarded-host"), text("host")]
                .into_iter()
                .flatten()
                .any(|h| Some(h) == origin_host)
        }
        (None, None) => false,
    };
    refused.then(|| {
        html(
            StatusCode::FORBIDDEN,
            pages::error_page(
                "Refused",
                "this form may only be sent from patchflow's own page",
            ),
        )
    })
}

fn see_task(id: &TaskId) -> Response {
    Redirect::to(&format!("/tasks/{id}")).into_response()
}

/// The submit form without JavaScript: the same fields as `POST /api/tasks` (multipart),
/// answered with a redirect to the new task's page, or the form again with the error.
async fn submit_form(
    State(service): State<TaskService>,
    Extension(session): Extension<Session>,
    headers: HeaderMap,
    req: Request,
) -> Response {
    if let Some(r) = same_origin(&headers) {
        return r;
    }
    let session = &session;
    let refused = |service: TaskService, form: FormState, e: ServiceError| async move {
        let code = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
        let form = FormState {
            error: Some(e.to_string()),
            ..form
        };
        render_list(&service, session, ListQuery::default(), form, code).await
    };
    if let Err(e) = session.who.must_write() {
        return refused(service, FormState::default(), e).await;
    }
    let is_multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    if !is_multipart {
        let e = ServiceError::BadRequest("the form must be sent as multipart/form-data".into());
        return refused(service, FormState::default(), e).await;
    }
    let multipart = match Multipart::from_request(req, &()).await {
        Ok(m) => m,
        Err(e) => {
            let e = ServiceError::BadRequest(e.body_text());
            return refused(service, FormState::default(), e).await;
        }
    };
    let (mut body, upload, csrf) = match read_multipart(&service, multipart).await {
        Ok(x) => x,
        Err(e) => return refused(service, FormState::default(), e).await,
    };
    if let Some(r) = session.check(csrf.as_deref()) {
        if let Some(u) = &upload {
            let _ = tokio::fs::remove_file(&u.path).await;
        }
        return r;
    }
    body.tenant = match session.who.tenant_for_submit(body.tenant.as_deref()) {
        Ok(t) => Some(t),
        Err(e) => return refused(service, FormState::default(), e).await,
    };
    let form = FormState {
        error: None,
        git_url: body.git_url.clone().unwrap_or_default(),
        git_ref: body.git_ref.clone().unwrap_or_default(),
        task_description: body.task_description.clone().unwrap_or_default(),
        target_file: body.target_file.clone().unwrap_or_default(),
        model: body.model.clone().unwrap_or_default(),
        limits: body.limits.map(LimitsBody::resolve),
    };
    let spec = match spec_of(body, upload.as_ref()).await {
        Ok(s) => s,
        Err(e) => return refused(service, form, e).await,
    };
    match service.submit(spec, upload, None).await {
        Ok(outcome) => {
            let outcome = outcome.counted("web");
            tracing::info!(task_id = %outcome.record.task_id, "task submitted from the web page");
            see_task(&outcome.record.task_id)
        }
        Err(e) => refused(service, form, e).await,
    }
}

/// What every form on a task's page checks first: sent from this site, with the session's
/// CSRF token, about a well-formed task id. The refusal is the page to answer.
fn task_form(
    headers: &HeaderMap,
    session: &Session,
    body: &[u8],
    id: &str,
) -> Result<TaskId, Box<Response>> {
    if let Some(r) = same_origin(headers) {
        return Err(Box::new(r));
    }
    if let Some(r) = session.check(form_value(body, "csrf").as_deref()) {
        return Err(Box::new(r));
    }
    id.parse::<TaskId>()
        .map_err(|e| Box::new(error_html(&ServiceError::Invalid(e))))
}

async fn cancel_form(
    State(service): State<TaskService>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let id = match task_form(&headers, &session, &body, &id) {
        Ok(id) => id,
        Err(refused) => return *refused,
    };
    if let Err(e) = session.who.must_write() {
        return error_html(&e);
    }
    if let Err(e) = service.get_for(&session.who, &id).await {
        return error_html(&e);
    }
    match service.cancel(&id, "cancelled from the web page").await {
        Ok(_) => see_task(&id),
        Err(e) => error_html(&e),
    }
}

/// The Retry form without JavaScript: `mode=from_start|from_failed_step`, form-encoded.
async fn retry_form(
    State(service): State<TaskService>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let id = match task_form(&headers, &session, &body, &id) {
        Ok(id) => id,
        Err(refused) => return *refused,
    };
    if let Err(e) = session.who.must_write() {
        return error_html(&e);
    }
    if let Err(e) = service.get_for(&session.who, &id).await {
        return error_html(&e);
    }
    // The mode's values are plain words, so the form's encoding needs no decoding here;
    // anything else is refused by the mode's own parser with its message.
    let mode = form_value(&body, "mode").unwrap_or_else(|| RetryMode::FromStart.as_str().into());
    let mode = match mode.parse::<RetryMode>() {
        Ok(m) => m,
        Err(e) => return error_html(&ServiceError::from(e)),
    };
    match service.retry(&id, mode).await {
        Ok(_) => see_task(&id),
        Err(e) => error_html(&e),
    }
}

/// The follow-up box without JavaScript: `message=…`, form-encoded.
async fn message_form(
    State(service): State<TaskService>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let id = match task_form(&headers, &session, &body, &id) {
        Ok(id) => id,
        Err(refused) => return *refused,
    };
    let message = form_value(&body, "message").unwrap_or_default();
    match service.send_message(&session.who, &id, &message).await {
        Ok(_) => see_task(&id),
        Err(e) => error_html(&e),
    }
}

/// A candidate's Select button without JavaScript: `candidate=N`, form-encoded.
async fn select_form(
    State(service): State<TaskService>,
    Extension(session): Extension<Session>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let id = match task_form(&headers, &session, &body, &id) {
        Ok(id) => id,
        Err(refused) => return *refused,
    };
    let Some(n) = form_value(&body, "candidate").and_then(|v| v.trim().parse::<u32>().ok()) else {
        return error_html(&ServiceError::BadRequest(
            "candidate must be a number".into(),
        ));
    };
    match service.select(&session.who, &id, n).await {
        Ok(_) => see_task(&id),
        Err(e) => error_html(&e),
    }
}
