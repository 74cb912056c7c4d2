//! A scripted forge: the parts of GitHub's REST v3 and GitLab's REST v4 APIs that open,
//! find, update and comment on pull (merge) requests, for the tests of patchflow's forge
//! clients. It records every request, can fail the next ones on purpose and can require a
//! token. GitHub's API root is [`ScriptedForge::base_url`]; GitLab's is `{base_url}/api/v4`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use axum::{Extension, Json, Router};
use serde::Serialize;
use serde_json::{Value, json};

use crate::lock;

/// One request the forge received.
#[derive(Debug, Clone, Serialize)]
pub struct ForgeRequest {
    pub method: String,
    /// Path and query as received, e.g. `/repos/o/r/pulls?head=o:b&state=open`.
    pub path: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// GitLab's `PRIVATE-TOKEN` header.
    pub private_token: Option<String>,
    /// The JSON body: `Null` when none, a string when it was not JSON.
    pub body: Value,
}

/// A pull request (GitHub) or merge request (GitLab), as the forge answers it.
struct Pull {
    gitlab: bool,
    repo: String,
    head: String,
    json: Value,
}

struct Shared {
    base_url: String,
    requests: Vec<ForgeRequest>,
    /// Status and count of the failures still to answer.
    fail: (u16, usize),
    token: Option<String>,
    default_branch: String,
    pulls: Vec<Pull>,
    comments: Vec<Value>,
    /// A GitHub App installed on every repository: its id, public key, and the
    /// installation token it hands out.
    app: Option<(String, jsonwebtoken::DecodingKey, String)>,
}

impl Shared {
    fn open(&self, gitlab: bool, repo: &str, head: &str) -> Option<&Value> {
        self.pulls
            .iter()
            .find(|p| p.gitlab == gitlab && p.repo == repo && p.head == head && is_open(&p.json))
            .map(|p| &p.json)
    }

    fn pull_mut(&mut self, gitlab: bool, repo: &str, number: u64) -> Option<&mut Value> {
        let key = if gitlab { "iid" } else { "number" };
        self.pulls
            .iter_mut()
            .find(|p| p.gitlab == gitlab && p.repo == repo && p.json[key] == number)
            .map(|p| &mut p.json)
    }

    fn next_number(&self, gitlab: bool, repo: &str) -> usize {
        1 + self
            .pulls
            .iter()
            .filter(|p| p.gitlab == gitlab && p.repo == repo)
            .count()
    }

    fn comment(&mut self, repo: &str, issue: u64, body: &Value) -> usize {
        self.comments
            .push(json!({"repo": repo, "issue": issue, "body": body}));
        self.comments.len()
    }
}

type St = State<Arc<Mutex<Shared>>>;

/// A request's body, parsed once by [`gate`].
#[derive(Clone)]
struct JsonBody(Value);

/// A running scripted forge on a loopback port.
pub struct ScriptedForge {
    base_url: String,
    shared: Arc<Mutex<Shared>>,
}

impl ScriptedForge {
    /// Starts serving on 127.0.0.1, any port, in the background.
    pub async fn start() -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let base_url = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(Mutex::new(Shared {
            base_url: base_url.clone(),
            requests: Vec::new(),
            fail: (0, 0),
            token: None,
            default_branch: "main".into(),
            pulls: Vec::new(),
            comments: Vec::new(),
            app: None,
        }));
        let app = Router::new()
            .route("/repos/{owner}/{repo}", get(gh_repo))
            .route("/repos/{owner}/{repo}/installation", get(gh_installation))
            .route(
                "/app/installations/{id}/access_tokens",
                post(gh_access_token),
            )
            .route("/repos/{owner}/{repo}/pulls", get(gh_list).post(gh_create))
            .route("/repos/{owner}/{repo}/pulls/{number}", patch(gh_update))
            .route(
                "/repos/{owner}/{repo}/issues/{number}/comments",
                post(gh_comment),
            )
            .route("/api/v4/projects/{id}", get(gl_project))
            .route(
                "/api/v4/projects/{id}/merge_requests",
                get(gl_list).post(gl_create),
            )
            .route("/api/v4/projects/{id}/merge_requests/{iid}", put(gl_update))
            .route("/api/v4/projects/{id}/issues/{iid}/notes", post(gl_note))
            .route(
                "/api/v4/projects/{id}/merge_requests/{iid}/notes",
                post(gl_note),
            )
            .fallback(unknown)
            .method_not_allowed_fallback(unknown)
            .layer(middleware::from_fn_with_state(shared.clone(), gate))
            .with_state(shared.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "scripted forge stopped");
            }
        });
        Ok(Self { base_url, shared })
    }

    /// `http://127.0.0.1:PORT`, GitHub's API root.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// Every request received, in order, refused ones included.
    pub fn requests(&self) -> Vec<ForgeRequest> {
        lock(&self.shared).requests.clone()
    }

    /// Answers the next `times` requests, on any route, with `status` and an error body.
    pub fn fail_next(&self, status: u16, times: usize) {
        lock(&self.shared).fail = (status, times);
    }

    /// From now on, answers 401 to requests that do not carry `token`.
    pub fn require_token(&self, token: &str) {
        lock(&self.shared).token = Some(token.to_string());
    }

    /// The default branch repositories report (`main` until set).
    pub fn set_default_branch(&self, branch: &str) {
        lock(&self.shared).default_branch = branch.to_string();
    }

    /// The pull and merge requests held, in creation order.
    /// Installs a GitHub App (`public_pem`: its RSA public key) that hands out
    /// `installation_token`; the token is also what [`Self::require_token`] should name.
    pub fn install_app(
        &self,
        app_id: &str,
        public_pem: &str,
        installation_token: &str,
    ) -> Result<(), jsonwebtoken::errors::Error> {
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(public_pem.as_bytes())?;
        lock(&self.shared).app = Some((app_id.into(), key, installation_token.into()));
        Ok(())
    }

    pub fn pulls(&self) -> Vec<Value> {
        lock(&self.shared)
            .pulls
            .iter()
            .map(|p| p.json.clone())
            .collect()
    }

    /// The comments (GitHub) and notes (GitLab) posted: `{"repo", "issue", "body"}`.
    pub fn comments(&self) -> Vec<Value> {
        lock(&self.shared).comments.clone()
    }
}

fn is_gitlab(path: &str) -> bool {
    path.starts_with("/api/v4/")
}

fn is_open(pull: &Value) -> bool {
    matches!(pull["state"].as_str(), Some("open" | "opened"))
}

fn answer(status: u16, body: Value) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(body)).into_response()
}

fn not_found(gitlab: bool) -> Response {
    let message = if gitlab { "404 Not found" } else { "Not Found" };
    answer(404, json!({ "message": message }))
}

async fn unknown(uri: Uri) -> Response {
    not_found(is_gitlab(uri.path()))
}

fn authorized(
    gitlab: bool,
    authorization: Option<&str>,
    private: Option<&str>,
    token: &str,
) -> bool {
    let scheme = |s: &str| authorization.and_then(|a| a.strip_prefix(s)) == Some(token);
    scheme("Bearer ")
        || if gitlab {
            private == Some(token)
        } else {
            scheme("token ")
        }
}

/// Records the request, then answers an injected failure, a missing token or a body that
/// is not JSON; otherwise hands the parsed body to the route.
async fn gate(State(shared): St, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return answer(400, json!({"message": "unreadable body"}));
    };
    let parsed = if bytes.is_empty() {
        Ok(Value::Null)
    } else {
        serde_json::from_slice::<Value>(&bytes)
    };
    let header = |name| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let gitlab = is_gitlab(parts.uri.path());
    {
        let mut s = lock(&shared);
        s.requests.push(ForgeRequest {
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or("", |p| p.as_str())
                .to_string(),
            authorization: header("authorization").map(str::to_string),
            private_token: header("private-token").map(str::to_string),
            body: match &parsed {
                Ok(v) => v.clone(),
                Err(_) => Value::String(String::from_utf8_lossy(&bytes).into_owned()),
            },
        });
        if s.fail.1 > 0 {
            s.fail.1 -= 1;
            let status = s.fail.0;
            return answer(
                status,
                json!({"message": format!("scripted failure ({status})")}),
            );
        }
        // The App's routes take the App's JWT (checked by the route), not a token.
        let app_route =
            parts.uri.path().starts_with("/app/") || parts.uri.path().ends_with("/installation");
        if let Some(token) = &s.token
            && !app_route
            && !authorized(
                gitlab,
                header("authorization"),
                header("private-token"),
                token,
            )
        {
            let message = if gitlab {
                "401 Unauthorized"
            } else {
                "Bad credentials"
            };
            return answer(401, json!({ "message": message }));
        }
    }
    let Ok(value) = parsed else {
        return answer(400, json!({"message": "Problems parsing JSON"}));
    };
    let mut req = Request::from_parts(parts, Body::empty());
    req.extensions_mut().insert(JsonBody(value));
    next.run(req).await
}

/// Whether `authorization` is `Bearer <JWT>` signed by the installed App (RS256, `iss`
/// its id, not expired).
fn app_jwt_ok(s: &Shared, authorization: Option<&str>) -> bool {
    let (Some((app_id, key, _)), Some(jwt)) = (
        &s.app,
        authorization.and_then(|a| a.strip_prefix("Bearer ")),
    ) else {
        return false;
    };
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_issuer(&[app_id]);
    v.validate_aud = false;
    jsonwebtoken::decode::<Value>(jwt, key, &v).is_ok()
}

async fn gh_installation(State(shared): St, headers: axum::http::HeaderMap) -> Response {
    let s = lock(&shared);
    if !app_jwt_ok(
        &s,
        headers.get("authorization").and_then(|v| v.to_str().ok()),
    ) {
        return answer(
            401,
            json!({"message": "A JSON web token could not be decoded"}),
        );
    }
    answer(
        200,
        json!({"id": 77, "app_id": s.app.as_ref().map(|a| a.0.clone())}),
    )
}

async fn gh_access_token(
    State(shared): St,
    Path(id): Path<u64>,
    headers: axum::http::HeaderMap,
) -> Response {
    let s = lock(&shared);
    if !app_jwt_ok(
        &s,
        headers.get("authorization").and_then(|v| v.to_str().ok()),
    ) {
        return answer(
            401,
            json!({"message": "A JSON web token could not be decoded"}),
        );
    }
    if id != 77 {
        return answer(404, json!({"message": "Not Found"}));
    }
    let token = s.app.as_ref().map(|a| a.2.clone()).unwrap_or_default();
    answer(
        201,
        json!({"token": token, "expires_at": "2099-01-01T00:00:00Z"}),
    )
}

async fn gh_repo(State(shared): St, Path((owner, repo)): Path<(String, String)>) -> Response {
    let s = lock(&shared);
    answer(
        200,
        json!({
            "default_branch": s.default_branch,
            "full_name": format!("{owner}/{repo}"),
            "clone_url": format!("{}/{owner}/{repo}.git", s.base_url),
            "html_url": format!("{}/{owner}/{repo}", s.base_url),
        }),
    )
}

async fn gh_create(
    State(shared): St,
    Path((owner, repo)): Path<(String, String)>,
    Extension(JsonBody(b)): Extension<JsonBody>,
) -> Response {
    if let Some(field) = ["title", "head", "base"]
        .into_iter()
        .find(|f| !b[f].is_string())
    {
        return answer(
            422,
            json!({"message": "Validation Failed", "errors": [
                {"resource": "PullRequest", "field": field, "code": "missing_field"}]}),
        );
    }
    let full = format!("{owner}/{repo}");
    let head_arg = b["head"].as_str().unwrap_or_default();
    let (head_owner, head) = head_arg.split_once(':').unwrap_or((&owner, head_arg));
    let mut s = lock(&shared);
    if s.open(false, &full, head).is_some() {
        return answer(
            422,
            json!({
                "message": "Validation Failed",
                "errors": [{"resource": "PullRequest", "code": "custom",
                    "message": format!("A pull request already exists for {head_owner}:{head}.")}],
                "documentation_url": "https://docs.github.com/rest/pulls/pulls#create-a-pull-request",
            }),
        );
    }
    let n = s.next_number(false, &full);
    let pr = json!({
        "number": n,
        "html_url": format!("{}/{full}/pull/{n}", s.base_url),
        "url": format!("{}/repos/{full}/pulls/{n}", s.base_url),
        "state": "open",
        "title": b["title"],
        "body": b["body"],
        "draft": b["draft"].as_bool().unwrap_or(false),
        "head": {"ref": head, "label": format!("{head_owner}:{head}")},
        "base": {"ref": b["base"]},
    });
    s.pulls.push(Pull {
        gitlab: false,
        repo: full,
        head: head.to_string(),
        json: pr.clone(),
    });
    answer(201, pr)
}

/// GitHub lists open pull requests unless `state` says otherwise (`closed`, `all`).
async fn gh_list(
    State(shared): St,
    Path((owner, repo)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let full = format!("{owner}/{repo}");
    let head = q
        .get("head")
        .map(|h| h.split_once(':').map_or(h.as_str(), |(_, b)| b));
    let state = q.get("state").map_or("open", String::as_str);
    let list = lock(&shared)
        .pulls
        .iter()
        .filter(|p| !p.gitlab && p.repo == full && head.is_none_or(|h| p.head == h))
        .filter(|p| state == "all" || p.json["state"] == state)
        .filter(|p| q.get("base").is_none_or(|b| p.json["base"]["ref"] == *b))
        .map(|p| p.json.clone())
        .collect();
    answer(200, Value::Array(list))
}

async fn gh_update(
    State(shared): St,
    Path((owner, repo, number)): Path<(String, String, u64)>,
    Extension(JsonBody(b)): Extension<JsonBody>,
) -> Response {
    let mut s = lock(&shared);
    let Some(pr) = s.pull_mut(false, &format!("{owner}/{repo}"), number) else {
        return not_found(false);
    };
    for field in ["title", "body", "state"] {
        if let Some(v) = b.get(field) {
            pr[field] = v.clone();
        }
    }
    if let Some(base) = b.get("base") {
        pr["base"]["ref"] = base.clone();
    }
    answer(200, pr.clone())
}

async fn gh_comment(
    State(shared): St,
    Path((owner, repo, number)): Path<(String, String, u64)>,
    Extension(JsonBody(b)): Extension<JsonBody>,
) -> Response {
    let mut s = lock(&shared);
    let full = format!("{owner}/{repo}");
    let id = s.comment(&full, number, &b["body"]);
    let url = format!("{}/{full}/issues/{number}#issuecomment-{id}", s.base_url);
    answer(201, json!({"id": id, "html_url": url, "body": b["body"]}))
}

async fn gl_project(State(shared): St, Path(project): Path<String>) -> Response {
    let s = lock(&shared);
    answer(
        200,
        json!({
            "default_branch": s.default_branch,
            "path_with_namespace": project,
            "web_url": format!("{}/{project}", s.base_url),
            "http_url_to_repo": format!("{}/{project}.git", s.base_url),
        }),
    )
}

/// A title starting `Draft:` asks GitLab for a draft.
fn gl_draft(title: &Value) -> bool {
    title.as_str().is_some_and(|t| t.starts_with("Draft:"))
}

async fn gl_create(
    State(shared): St,
    Path(project): Path<String>,
    Extension(JsonBody(b)): Extension<JsonBody>,
) -> Response {
    let fields = ["source_branch", "target_branch", "title"];
    if let Some(field) = fields.into_iter().find(|f| !b[f].is_string()) {
        return answer(400, json!({"error": format!("{field} is missing")}));
    }
    let source = b["source_branch"].as_str().unwrap_or_default();
    let mut s = lock(&shared);
    if let Some(other) = s.open(true, &project, source) {
        let message = format!(
            "Another open merge request already exists for this source branch: !{}",
            other["iid"]
        );
        return answer(409, json!({ "message": [message] }));
    }
    let n = s.next_number(true, &project);
    let mr = json!({
        "iid": n,
        "web_url": format!("{}/{project}/-/merge_requests/{n}", s.base_url),
        "state": "opened",
        "title": b["title"],
        "description": b["description"],
        "source_branch": source,
        "target_branch": b["target_branch"],
        "draft": gl_draft(&b["title"]),
    });
    s.pulls.push(Pull {
        gitlab: true,
        repo: project,
        head: source.to_string(),
        json: mr.clone(),
    });
    answer(201, mr)
}

/// GitLab lists merge requests in every state unless `state` says one (`opened`, ...).
async fn gl_list(
    State(shared): St,
    Path(project): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let state = q.get("state").map_or("all", String::as_str);
    let list = lock(&shared)
        .pulls
        .iter()
        .filter(|p| p.gitlab && p.repo == project)
        .filter(|p| q.get("source_branch").is_none_or(|b| p.head == *b))
        .filter(|p| {
            q.get("target_branch")
                .is_none_or(|b| p.json["target_branch"] == *b)
        })
        .filter(|p| state == "all" || p.json["state"] == state)
        .map(|p| p.json.clone())
        .collect();
    answer(200, Value::Array(list))
}

async fn gl_update(
    State(shared): St,
    Path((project, iid)): Path<(String, u64)>,
    Extension(JsonBody(b)): Extension<JsonBody>,
) -> Response {
    let mut s = lock(&shared);
    let Some(mr) = s.pull_mut(true, &project, iid) else {
        return not_found(true);
    };
    for field in ["title", "description", "target_branch"] {
        if let Some(v) = b.get(field) {
            mr[field] = v.clone();
        }
    }
    mr["draft"] = gl_draft(&mr["title"]).into();
    match b["state_event"].as_str() {
        Some("close") => mr["state"] = "closed".into(),
        Some("reopen") => mr["state"] = "opened".into(),
        _ => {}
    }
    answer(200, mr.clone())
}

async fn gl_note(
    State(shared): St,
    Path((project, iid)): Path<(String, u64)>,
    Extension(JsonBody(b)): Extension<JsonBody>,
) -> Response {
    let id = lock(&shared).comment(&project, iid, &b["body"]);
    answer(201, json!({"id": id, "body": b["body"]}))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    async fn send(
        forge: &ScriptedForge,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = reqwest::Client::new()
            .request(method, format!("{}{path}", forge.base_url()))
            .header("authorization", "Bearer t0k");
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        let status = res.status().as_u16();
        (status, res.json().await.unwrap_or(Value::Null))
    }

    fn pr(head: &str) -> Option<Value> {
        Some(json!({"title": "Fix", "head": head, "base": "main", "body": "b", "draft": true}))
    }

    #[tokio::test]
    async fn github_pulls_are_created_found_updated_and_commented() {
        use reqwest::Method;
        let f = ScriptedForge::start().await.unwrap();
        let base = f.base_url();
        let (status, one) = send(&f, Method::POST, "/repos/o/r/pulls", pr("fix-1")).await;
        assert_eq!(status, 201);
        assert_eq!(one["number"], 1);
        assert_eq!(one["html_url"], format!("{base}/o/r/pull/1"));
        assert_eq!(one["url"], format!("{base}/repos/o/r/pulls/1"));
        assert_eq!(
            (&one["head"]["ref"], &one["draft"]),
            (&json!("fix-1"), &json!(true))
        );

        let (status, dup) = send(&f, Method::POST, "/repos/o/r/pulls", pr("o:fix-1")).await;
        assert_eq!(status, 422);
        assert_eq!(
            dup["errors"][0]["message"],
            "A pull request already exists for o:fix-1."
        );
        let (status, missing) = send(
            &f,
            Method::POST,
            "/repos/o/r/pulls",
            Some(json!({"title": "t", "base": "main"})),
        )
        .await;
        assert_eq!(
            (status, &missing["errors"][0]["field"]),
            (422, &json!("head"))
        );
        assert_eq!(
            send(&f, Method::POST, "/repos/o/r/pulls", pr("fix-2"))
                .await
                .1["number"],
            2
        );
        assert_eq!(
            send(&f, Method::POST, "/repos/o/other/pulls", pr("fix-1"))
                .await
                .1["number"],
            1
        );

        let (status, list) = send(
            &f,
            Method::GET,
            "/repos/o/r/pulls?head=o:fix-1&state=open",
            None,
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(list.as_array().unwrap().len(), 1);
        assert_eq!(list[0]["number"], 1);
        let all = send(&f, Method::GET, "/repos/o/r/pulls", None).await.1;
        assert_eq!(all.as_array().unwrap().len(), 2);

        let (status, closed) = send(
            &f,
            Method::PATCH,
            "/repos/o/r/pulls/1",
            Some(json!({"title": "New", "state": "closed"})),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(
            (&closed["title"], &closed["body"], &closed["state"]),
            (&json!("New"), &json!("b"), &json!("closed"))
        );
        let open = send(
            &f,
            Method::GET,
            "/repos/o/r/pulls?head=o:fix-1&state=open",
            None,
        )
        .await
        .1;
        assert_eq!(open, json!([]));
        assert_eq!(
            send(&f, Method::POST, "/repos/o/r/pulls", pr("fix-1"))
                .await
                .1["number"],
            3
        );
        let (status, body) = send(&f, Method::PATCH, "/repos/o/r/pulls/9", Some(json!({}))).await;
        assert_eq!((status, body), (404, json!({"message": "Not Found"})));

        let (status, c) = send(
            &f,
            Method::POST,
            "/repos/o/r/issues/2/comments",
            Some(json!({"body": "hi"})),
        )
        .await;
        assert_eq!(status, 201);
        assert_eq!(c["html_url"], format!("{base}/o/r/issues/2#issuecomment-1"));
        assert_eq!(
            f.comments(),
            vec![json!({"repo": "o/r", "issue": 2, "body": "hi"})]
        );

        f.set_default_branch("trunk");
        let repo = send(&f, Method::GET, "/repos/o/r", None).await.1;
        assert_eq!(
            (&repo["default_branch"], &repo["full_name"]),
            (&json!("trunk"), &json!("o/r"))
        );
        assert_eq!(f.pulls().len(), 4);
        let last = f.requests().into_iter().nth(1).unwrap();
        assert_eq!(
            (last.method.as_str(), last.path.as_str()),
            ("POST", "/repos/o/r/pulls")
        );
        assert_eq!(last.body["head"], "o:fix-1");
        assert_eq!(last.authorization.as_deref(), Some("Bearer t0k"));
    }

    #[tokio::test]
    async fn gitlab_merge_requests_take_url_encoded_project_paths() {
        use reqwest::Method;
        let f = ScriptedForge::start().await.unwrap();
        let mr = |title: &str| {
            Some(
                json!({"source_branch": "fix", "target_branch": "main", "title": title, "description": "d"}),
            )
        };
        let (status, one) = send(
            &f,
            Method::POST,
            "/api/v4/projects/group%2Fsub%2Frepo/merge_requests",
            mr("Draft: Fix"),
        )
        .await;
        assert_eq!(status, 201);
        assert_eq!(one["iid"], 1);
        assert_eq!(one["draft"], true);
        assert_eq!(
            one["web_url"],
            format!("{}/group/sub/repo/-/merge_requests/1", f.base_url())
        );
        let (status, dup) = send(
            &f,
            Method::POST,
            "/api/v4/projects/group%2Fsub%2Frepo/merge_requests",
            mr("Again"),
        )
        .await;
        assert_eq!(status, 409);
        assert_eq!(
            dup["message"][0],
            "Another open merge request already exists for this source branch: !1"
        );

        let list = send(
            &f,
            Method::GET,
            "/api/v4/projects/group%2Fsub%2Frepo/merge_requests?source_branch=fix&state=opened",
            None,
        )
        .await
        .1;
        assert_eq!(list.as_array().unwrap().len(), 1);
        let none = send(
            &f,
            Method::GET,
            "/api/v4/projects/group%2Fsub%2Frepo/merge_requests?source_branch=other",
            None,
        )
        .await
        .1;
        assert_eq!(none, json!([]));

        let (status, up) = send(
            &f,
            Method::PUT,
            "/api/v4/projects/group%2Fsub%2Frepo/merge_requests/1",
            Some(json!({"title": "Fix", "description": "e"})),
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(
            (&up["title"], &up["description"], &up["draft"]),
            (&json!("Fix"), &json!("e"), &json!(false))
        );
        let (status, _) = send(
            &f,
            Method::PUT,
            "/api/v4/projects/group%2Fsub%2Frepo/merge_requests/7",
            Some(json!({})),
        )
        .await;
        assert_eq!(status, 404);

        let (status, note) = send(
            &f,
            Method::POST,
            "/api/v4/projects/group%2Frepo/issues/1/notes",
            Some(json!({"body": "hi"})),
        )
        .await;
        assert_eq!((status, &note["body"]), (201, &json!("hi")));
        assert_eq!(
            f.comments(),
            vec![json!({"repo": "group/repo", "issue": 1, "body": "hi"})]
        );
        let project = send(&f, Method::GET, "/api/v4/projects/group%2Frepo", None)
            .await
            .1;
        assert_eq!(project["path_with_namespace"], "group/repo");
        assert_eq!(project["default_branch"], "main");
    }

    #[tokio::test]
    async fn failures_tokens_and_bad_requests() {
        use reqwest::Method;
        let f = ScriptedForge::start().await.unwrap();
        f.fail_next(503, 2);
        assert_eq!(send(&f, Method::GET, "/repos/o/r", None).await.0, 503);
        let (status, body) = send(&f, Method::GET, "/nowhere", None).await;
        assert_eq!(status, 503);
        assert!(body["message"].is_string());
        assert_eq!(send(&f, Method::GET, "/repos/o/r", None).await.0, 200);
        assert_eq!(
            send(&f, Method::GET, "/nowhere", None).await,
            (404, json!({"message": "Not Found"}))
        );
        assert_eq!(send(&f, Method::DELETE, "/repos/o/r", None).await.0, 404);

        let raw = reqwest::Client::new()
            .post(format!("{}/repos/o/r/pulls", f.base_url()))
            .body("not json")
            .send()
            .await
            .unwrap();
        assert_eq!(raw.status().as_u16(), 400);

        f.require_token("t0k");
        let get = |auth: Option<(&'static str, &'static str)>, path: &'static str| {
            let mut req = reqwest::Client::new().get(format!("{}{path}", f.base_url()));
            if let Some((k, v)) = auth {
                req = req.header(k, v);
            }
            async move { req.send().await.unwrap().status().as_u16() }
        };
        assert_eq!(get(None, "/repos/o/r").await, 401);
        assert_eq!(
            get(Some(("authorization", "Bearer nope")), "/repos/o/r").await,
            401
        );
        assert_eq!(
            get(Some(("authorization", "token t0k")), "/repos/o/r").await,
            200
        );
        assert_eq!(
            get(Some(("authorization", "Bearer t0k")), "/repos/o/r").await,
            200
        );
        assert_eq!(get(Some(("private-token", "t0k")), "/repos/o/r").await, 401);
        assert_eq!(
            get(Some(("private-token", "t0k")), "/api/v4/projects/g%2Fr").await,
            200
        );
        assert_eq!(
            get(
                Some(("authorization", "Bearer t0k")),
                "/api/v4/projects/g%2Fr"
            )
            .await,
            200
        );
        assert_eq!(
            get(
                Some(("authorization", "token t0k")),
                "/api/v4/projects/g%2Fr"
            )
            .await,
            401
        );

        let requests = f.requests();
        assert_eq!(requests.len(), 14);
        assert_eq!(requests[1].path, "/nowhere");
        assert_eq!(requests[5].body, json!("not json"));
        assert_eq!(requests[10].private_token.as_deref(), Some("t0k"));
    }
}
