//! The forges a task's work lands on: GitHub (and GitHub Enterprise Server) and GitLab,
//! behind one interface. [`Forges::repo_of`] says which forge and repository a git URL
//! names (`github_hosts`, `gitlab_hosts`); [`Forge`] opens or updates the pull (merge)
//! request of a branch and comments on issues, over the forge's REST API.
//!
//! A token only ever goes into an `Authorization` header; no error message, log line or
//! URL this module makes holds it. Server errors and network failures are retried a few
//! times ([`ForgeError::Unavailable`]); a refusal (401, 403, 404, 422) is not.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use patchflow_core::Secret;
use serde_json::{Value, json};

/// Which API a repository is reached through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForgeKind {
    GitHub,
    GitLab,
}

impl ForgeKind {
    /// The user name a token pushes as over HTTPS.
    pub fn push_user(self) -> &'static str {
        match self {
            Self::GitHub => "x-access-token",
            Self::GitLab => "oauth2",
        }
    }

    /// "pull request" or "merge request", for messages.
    pub fn request_name(self) -> &'static str {
        match self {
            Self::GitHub => "pull request",
            Self::GitLab => "merge request",
        }
    }
}

/// A repository on a forge, as a git URL names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRef {
    pub kind: ForgeKind,
    /// The API root: `https://api.github.com`, `https://HOST/api/v3`, `https://HOST/api/v4`.
    pub api_url: String,
    /// `owner/name` on GitHub; the full `group/sub/name` path on GitLab.
    pub path: String,
}

impl RepoRef {
    /// The owner (GitHub) or top group (GitLab).
    pub fn owner(&self) -> &str {
        self.path.split('/').next().unwrap_or_default()
    }
}

/// `github_hosts` / `github_api_url` and `gitlab_hosts` / `gitlab_api_url`.
#[derive(Debug, Clone)]
pub struct Forges {
    pub github_hosts: Vec<String>,
    pub github_api_url: String,
    pub gitlab_hosts: Vec<String>,
    pub gitlab_api_url: String,
}

impl Forges {
    pub fn from_settings(
        github_hosts: &str,
        github_api_url: &str,
        gitlab_hosts: &str,
        gitlab_api_url: &str,
    ) -> Self {
        let list = |s: &str| {
            s.split(',')
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect()
        };
        Self {
            github_hosts: list(github_hosts),
            github_api_url: github_api_url.trim_end_matches('/').to_string(),
            gitlab_hosts: list(gitlab_hosts),
            gitlab_api_url: gitlab_api_url.trim_end_matches('/').to_string(),
        }
    }

    /// The forge repository an `https://` (or `http://`) git URL names; `None` for a host
    /// on neither list, or a path that names no repository.
    pub fn repo_of(&self, git_url: &str) -> Option<RepoRef> {
        let url = url::Url::parse(git_url).ok()?;
        if !matches!(url.scheme(), "https" | "http") {
            return None;
        }
        let host = url.host_str()?.to_ascii_lowercase();
        let with_port = url.port().map(|p| format!("{host}:{p}"));
        let on = |hosts: &[String]| {
            hosts
                .iter()
                .any(|h| *h == host || Some(h) == with_port.as_ref())
        };
        let (kind, api_url) = if on(&self.github_hosts) {
            (ForgeKind::GitHub, &self.github_api_url)
        } else if on(&self.gitlab_hosts) {
            (ForgeKind::GitLab, &self.gitlab_api_url)
        } else {
            return None;
        };
        let path = url.path().trim_matches('/');
        let path = path.strip_suffix(".git").unwrap_or(path);
        let parts: Vec<&str> = path.split('/').collect();
        let fine = |p: &&str| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        let shaped = match kind {
            ForgeKind::GitHub => parts.len() == 2,
            ForgeKind::GitLab => parts.len() >= 2,
        };
        (shaped && parts.iter().all(fine)).then(|| RepoRef {
            kind,
            api_url: api_url.clone(),
            path: parts.join("/"),
        })
    }
}

/// A GitHub App patchflow acts as (`github_app_id`, `github_app_private_key`): each push
/// and pull request gets an installation token minted for that one repository, as GitHub's
/// own integrations authenticate.
#[derive(Clone)]
pub struct GitHubApp {
    app_id: String,
    key: jsonwebtoken::EncodingKey,
}

impl std::fmt::Debug for GitHubApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitHubApp")
            .field("app_id", &self.app_id)
            .finish_non_exhaustive()
    }
}

impl GitHubApp {
    /// The App of `app_id` with its private key (PEM, RSA).
    pub fn new(app_id: &str, private_key_pem: &Secret) -> Result<Self, String> {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(private_key_pem.expose().as_bytes())
            .map_err(|e| format!("github_app_private_key is not an RSA private key in PEM: {e}"))?;
        Ok(Self {
            app_id: app_id.trim().to_string(),
            key,
        })
    }

    /// The App's own JWT (RS256, 9 minutes, issued a minute back for clock skew).
    fn jwt(&self) -> Result<Secret, ForgeError> {
        let now = chrono::Utc::now().timestamp();
        let claims = json!({"iat": now - 60, "exp": now + 540, "iss": self.app_id});
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &self.key,
        )
        .map(Secret::new)
        .map_err(|e| ForgeError::Refused {
            status: 0,
            message: format!("cannot sign the GitHub App's JWT: {e}"),
        })
    }
}

/// A pull (merge) request to open or bring up to date.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    pub title: String,
    pub body: String,
    /// The branch with the work.
    pub head: String,
    /// The branch it should merge into.
    pub base: String,
    pub draft: bool,
}

/// An open pull request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    pub url: String,
    pub number: u64,
    /// False when one was open for the branch already (and was updated).
    pub created: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ForgeError {
    /// The forge refused (bad credentials, no access, invalid request): retrying cannot help.
    #[error("the forge refused ({status}): {message}")]
    Refused { status: u16, message: String },
    /// The forge could not be reached or failed (5xx): worth retrying later.
    #[error("the forge is unavailable: {0}")]
    Unavailable(String),
}

/// The REST API of one forge.
#[derive(Clone)]
pub struct Forge {
    http: reqwest::Client,
    /// Pause before the first retry of an unavailable forge.
    retry_base: Duration,
}

/// A forge's answer: status and JSON.
struct Answer {
    status: u16,
    body: Value,
}

impl Forge {
    pub fn new() -> Result<Self, String> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("patchflow/", env!("CARGO_PKG_VERSION")))
            .timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("cannot build the forge client: {e}"))?;
        Ok(Self {
            http,
            retry_base: Duration::from_millis(500),
        })
    }

    /// The same client, retrying after `base` (tests).
    pub fn with_retry_base(mut self, base: Duration) -> Self {
        self.retry_base = base;
        self
    }

    /// One API call; a 5xx or a network failure is retried (3 tries in all).
    async fn call(
        &self,
        repo: &RepoRef,
        token: &Secret,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ForgeError> {
        let url = format!("{}{path}", repo.api_url);
        let once = || async {
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(token.expose())
                .header(reqwest::header::ACCEPT, "application/json");
            if repo.kind == ForgeKind::GitHub {
                req = req
                    .header(reqwest::header::ACCEPT, "application/vnd.github+json")
                    .header("X-GitHub-Api-Version", "2022-11-28");
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| ForgeError::Unavailable(e.without_url().to_string()))?;
            let status = resp.status().as_u16();
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            if status >= 500 {
                return Err(ForgeError::Unavailable(format!(
                    "{method} {path} answered {status}: {}",
                    message_of(&body)
                )));
            }
            Ok(Answer { status, body })
        };
        once.retry(
            ExponentialBuilder::default()
                .with_min_delay(self.retry_base)
                .with_max_times(2),
        )
        .when(|e| matches!(e, ForgeError::Unavailable(_)))
        .await
    }

    /// `call`, with anything but `ok` a refusal.
    async fn expect(
        &self,
        repo: &RepoRef,
        token: &Secret,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        ok: &[u16],
    ) -> Result<Value, ForgeError> {
        let a = self.call(repo, token, method.clone(), path, body).await?;
        if ok.contains(&a.status) {
            Ok(a.body)
        } else {
            Err(refused(&method, path, &a))
        }
    }

    /// An installation token of `app` for `repo` alone (GitHub): the App's installation on
    /// the repository, then a token limited to that repository.
    pub async fn installation_token(
        &self,
        repo: &RepoRef,
        app: &GitHubApp,
    ) -> Result<Secret, ForgeError> {
        let jwt = app.jwt()?;
        let path = format!("/repos/{}/installation", repo.path);
        let installation = self
            .expect(repo, &jwt, reqwest::Method::GET, &path, None, &[200])
            .await?;
        let id = installation["id"].as_u64().ok_or_else(|| {
            ForgeError::Unavailable(format!("GET {path} named no installation id"))
        })?;
        let name = repo.path.rsplit('/').next().unwrap_or_default();
        let tokens = format!("/app/installations/{id}/access_tokens");
        let minted = self
            .expect(
                repo,
                &jwt,
                reqwest::Method::POST,
                &tokens,
                Some(&json!({"repositories": [name]})),
                &[201],
            )
            .await?;
        minted["token"]
            .as_str()
            .map(Secret::new)
            .ok_or_else(|| ForgeError::Unavailable(format!("POST {tokens} answered no token")))
    }

    /// The repository's default branch.
    pub async fn default_branch(
        &self,
        repo: &RepoRef,
        token: &Secret,
    ) -> Result<String, ForgeError> {
        let path = match repo.kind {
            ForgeKind::GitHub => format!("/repos/{}", repo.path),
            ForgeKind::GitLab => format!("/projects/{}", project_id(&repo.path)),
        };
        let v = self
            .expect(repo, token, reqwest::Method::GET, &path, None, &[200])
            .await?;
        v["default_branch"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ForgeError::Unavailable(format!("GET {path} named no default_branch")))
    }

    /// Opens the pull request of `pr.head`, or, when one is open for that branch already,
    /// brings its title and body up to date: a retried step never opens a second one.
    pub async fn open_or_update(
        &self,
        repo: &RepoRef,
        token: &Secret,
        pr: &PullRequest,
    ) -> Result<Opened, ForgeError> {
        let s = RequestShape::of(repo, pr);
        let a = self
            .call(
                repo,
                token,
                reqwest::Method::POST,
                &s.collection,
                Some(&s.create),
            )
            .await?;
        if a.status == 201 {
            return opened(&a.body, s.url_field, s.number_field, true);
        }
        if !s.already_exists(&a) {
            return Err(refused(&reqwest::Method::POST, &s.collection, &a));
        }
        let list = self
            .expect(repo, token, reqwest::Method::GET, &s.open_one, None, &[200])
            .await?;
        let number = list
            .as_array()
            .and_then(|l| l.first())
            .and_then(|p| p[s.number_field].as_u64())
            .ok_or_else(|| ForgeError::Refused {
                status: a.status,
                message: format!(
                    "a {} for {} exists but is not open or not visible",
                    repo.kind.request_name(),
                    pr.head
                ),
            })?;
        let v = self
            .expect(
                repo,
                token,
                s.update_method.clone(),
                &format!("{}/{number}", s.collection),
                Some(&s.update),
                &[200],
            )
            .await?;
        opened(&v, s.url_field, s.number_field, false)
    }

    /// Comments on issue `number`.
    pub async fn comment(
        &self,
        repo: &RepoRef,
        token: &Secret,
        number: u64,
        text: &str,
    ) -> Result<(), ForgeError> {
        let path = match repo.kind {
            ForgeKind::GitHub => format!("/repos/{}/issues/{number}/comments", repo.path),
            ForgeKind::GitLab => {
                format!("/projects/{}/issues/{number}/notes", project_id(&repo.path))
            }
        };
        self.expect(
            repo,
            token,
            reqwest::Method::POST,
            &path,
            Some(&json!({"body": text})),
            &[201],
        )
        .await
        .map(|_| ())
    }
}

/// How one forge spells a pull request: where they live, what creating and updating one
/// sends, how "one is open already" is answered, and which fields name it.
struct RequestShape {
    kind: ForgeKind,
    collection: String,
    create: Value,
    /// The list of the open one for the branch (`collection` with a query).
    open_one: String,
    update_method: reqwest::Method,
    update: Value,
    url_field: &'static str,
    number_field: &'static str,
}

impl RequestShape {
    fn of(repo: &RepoRef, pr: &PullRequest) -> Self {
        match repo.kind {
            ForgeKind::GitHub => {
                let collection = format!("/repos/{}/pulls", repo.path);
                let head = encode(&format!("{}:{}", repo.owner(), pr.head));
                Self {
                    kind: repo.kind,
                    open_one: format!("{collection}?head={head}&state=open"),
                    collection,
                    create: json!({
                        "title": pr.title, "head": pr.head, "base": pr.base,
                        "body": pr.body, "draft": pr.draft,
                    }),
                    update_method: reqwest::Method::PATCH,
                    update: json!({"title": pr.title, "body": pr.body}),
                    url_field: "html_url",
                    number_field: "number",
                }
            }
            ForgeKind::GitLab => {
                let collection = format!("/projects/{}/merge_requests", project_id(&repo.path));
                // GitLab asks for a draft with the title.
                let title = if pr.draft {
                    format!("Draft: {}", pr.title)
                } else {
                    pr.title.clone()
                };
                Self {
                    kind: repo.kind,
                    open_one: format!(
                        "{collection}?source_branch={}&state=opened",
                        encode(&pr.head)
                    ),
                    collection,
                    create: json!({
                        "source_branch": pr.head, "target_branch": pr.base,
                        "title": title, "description": pr.body,
                    }),
                    update_method: reqwest::Method::PUT,
                    update: json!({"title": title, "description": pr.body}),
                    url_field: "web_url",
                    number_field: "iid",
                }
            }
        }
    }

    /// Whether a refused create says one is open for the branch already (GitHub: 422
    /// "already exists"; GitLab: 409).
    fn already_exists(&self, a: &Answer) -> bool {
        match self.kind {
            ForgeKind::GitLab => a.status == 409,
            ForgeKind::GitHub => a.status == 422 && message_of(&a.body).contains("already exists"),
        }
    }
}

/// GitLab's project id in a path: the full path, percent-encoded.
fn project_id(path: &str) -> String {
    encode(path)
}

/// Percent-encodes everything but unreserved characters.
fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

fn opened(
    v: &Value,
    url_field: &str,
    number_field: &str,
    created: bool,
) -> Result<Opened, ForgeError> {
    match (v[url_field].as_str(), v[number_field].as_u64()) {
        (Some(url), Some(number)) => Ok(Opened {
            url: url.to_string(),
            number,
            created,
        }),
        _ => Err(ForgeError::Unavailable(format!(
            "the forge's answer has no {url_field} or {number_field}"
        ))),
    }
}

/// The forge's own words of an error answer (`message`, GitHub's `errors[].message`,
/// GitLab's list of messages), cut short.
fn message_of(body: &Value) -> String {
    let mut parts: Vec<String> = Vec::new();
    match &body["message"] {
        Value::String(s) => parts.push(s.clone()),
        Value::Array(a) => parts.extend(a.iter().filter_map(Value::as_str).map(str::to_string)),
        _ => {}
    }
    if let Some(errors) = body["errors"].as_array() {
        parts.extend(
            errors
                .iter()
                .filter_map(|e| e["message"].as_str().or_else(|| e["code"].as_str()))
                .map(str::to_string),
        );
    }
    let text = if parts.is_empty() {
        "no message".to_string()
    } else {
        parts.join("; ")
    };
    text.chars().take(300).collect()
}

fn refused(method: &reqwest::Method, path: &str, a: &Answer) -> ForgeError {
    let path = path.split('?').next().unwrap_or(path);
    ForgeError::Refused {
        status: a.status,
        message: format!("{method} {path}: {}", message_of(&a.body)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forges() -> Forges {
        Forges::from_settings(
            "github.com, ghe.example:8443",
            "https://api.github.com/",
            "gitlab.com",
            "https://gitlab.com/api/v4",
        )
    }

    #[test]
    fn a_git_url_names_its_forge_and_repository() {
        let f = forges();
        let r = f.repo_of("https://github.com/acme/app.git").unwrap();
        assert_eq!(
            (r.kind, r.api_url.as_str(), r.path.as_str(), r.owner()),
            (
                ForgeKind::GitHub,
                "https://api.github.com",
                "acme/app",
                "acme"
            )
        );
        let r = f.repo_of("https://ghe.example:8443/acme/app").unwrap();
        assert_eq!(r.kind, ForgeKind::GitHub);
        let r = f.repo_of("https://gitlab.com/group/sub/app.git").unwrap();
        assert_eq!(
            (r.kind, r.path.as_str()),
            (ForgeKind::GitLab, "group/sub/app")
        );
        for bad in [
            "https://github.com/acme",
            "https://github.com/acme/app/extra",
            "https://github.com/acme/..",
            "https://github.com/ac%20me/app",
            "https://elsewhere.example/acme/app",
            "https://ghe.example/acme/app",
            "ssh://git@github.com/acme/app.git",
            "not a url",
        ] {
            assert_eq!(f.repo_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn forge_error_messages_are_the_forges_own_words_cut_short() {
        let v = json!({"message": "Validation Failed",
            "errors": [{"message": "A pull request already exists for a:b."}, {"code": "missing_field"}]});
        assert_eq!(
            message_of(&v),
            "Validation Failed; A pull request already exists for a:b.; missing_field"
        );
        assert_eq!(message_of(&json!({"message": ["one", "two"]})), "one; two");
        assert_eq!(message_of(&Value::Null), "no message");
        assert_eq!(message_of(&json!({"message": "x".repeat(1000)})).len(), 300);
        assert_eq!(project_id("group/sub app"), "group%2Fsub+app");
    }
}
