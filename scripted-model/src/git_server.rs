//! A git server over smart HTTP, for push tests: it serves the bare repositories under a
//! root through the real `git http-backend` (one CGI child per request) and can require a
//! token for pushes the way GitHub and GitLab do: HTTP Basic, any user name, the token as
//! the password. Fetches stay open.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use tokio::io::AsyncWriteExt;

use crate::lock;

struct Shared {
    root: PathBuf,
    /// `HOME` of the backend: empty, so no user configuration leaks in.
    home: tempfile::TempDir,
    token: Mutex<Option<String>>,
    auth: Mutex<Vec<Option<String>>>,
}

/// A running git server on a loopback port.
pub struct GitServer {
    base: String,
    shared: Arc<Shared>,
}

impl GitServer {
    /// Serves the bare repositories under `root` on 127.0.0.1, any port, in the background.
    pub async fn start(root: &Path) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        let base = format!("http://{}", listener.local_addr()?);
        let shared = Arc::new(Shared {
            root: std::fs::canonicalize(root)?,
            home: tempfile::tempdir()?,
            token: Mutex::new(None),
            auth: Mutex::new(Vec::new()),
        });
        let app = Router::new().fallback(serve).with_state(shared.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "test git server stopped");
            }
        });
        Ok(Self { base, shared })
    }

    /// The clone URL of `repo`, a path under the root such as `o/r.git`.
    pub fn url(&self, repo: &str) -> String {
        format!("{}/{repo}", self.base)
    }

    /// From now on, pushes must carry `Authorization: Basic base64(USER:token)`.
    pub fn require_token(&self, token: &str) {
        *lock(&self.shared.token) = Some(token.to_string());
    }

    /// The `Authorization` header of every request, in order.
    pub fn auth_headers(&self) -> Vec<Option<String>> {
        lock(&self.shared.auth).clone()
    }
}

/// The user and password of a Basic `Authorization` header.
fn basic(authorization: &str) -> Option<(String, String)> {
    let raw = STANDARD
        .decode(authorization.strip_prefix("Basic ")?.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

fn status(code: StatusCode, message: &str) -> Response {
    (code, message.to_string()).into_response()
}

async fn serve(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let header = |name| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let authorization = header("authorization");
    lock(&shared.auth).push(authorization.map(str::to_string));
    let path = parts.uri.path();
    let query = parts.uri.query().unwrap_or_default();
    let push = path.ends_with("/git-receive-pack")
        || query.split('&').any(|kv| kv == "service=git-receive-pack");
    let token = lock(&shared.token).clone();
    let user = match token {
        None => Some("anonymous".to_string()),
        Some(token) => match authorization.and_then(basic) {
            Some((user, password)) if password == token => Some(user),
            _ if push => {
                let mut res = status(StatusCode::UNAUTHORIZED, "a token is required to push");
                res.headers_mut().insert(
                    "www-authenticate",
                    axum::http::HeaderValue::from_static("Basic realm=\"git\""),
                );
                return res;
            }
            _ => None,
        },
    };
    let Ok(body) = axum::body::to_bytes(body, usize::MAX).await else {
        return status(StatusCode::BAD_REQUEST, "unreadable body");
    };

    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("GIT_PROJECT_ROOT", &shared.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", shared.home.path())
        .env("PATH_INFO", path)
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("QUERY_STRING", query)
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if parts.method != axum::http::Method::GET {
        cmd.env("CONTENT_LENGTH", body.len().to_string());
    }
    let passed = [
        ("content-type", "CONTENT_TYPE"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
        ("git-protocol", "HTTP_GIT_PROTOCOL"),
    ];
    for (name, var) in passed {
        if let Some(v) = header(name) {
            cmd.env(var, v);
        }
    }
    if let Some(user) = user {
        cmd.env("REMOTE_USER", user);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return status(StatusCode::INTERNAL_SERVER_ERROR, &format!("git: {e}")),
    };
    // Written beside the read: a large request or answer must not wait on the other.
    if let Some(mut stdin) = child.stdin.take() {
        tokio::spawn(async move {
            // A backend that stops reading early answers on its own; its exit says why.
            let _ = stdin.write_all(&body).await;
        });
    }
    match child.wait_with_output().await {
        Ok(out) if !out.stdout.is_empty() => cgi_response(out.stdout),
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            tracing::error!(%err, "git http-backend gave no answer");
            status(StatusCode::INTERNAL_SERVER_ERROR, &err)
        }
        Err(e) => status(StatusCode::INTERNAL_SERVER_ERROR, &format!("git: {e}")),
    }
}

/// A CGI answer: headers (`Status:` sets the status) up to a blank line, then the body.
fn cgi_response(mut out: Vec<u8>) -> Response {
    let ends = [&b"\r\n\r\n"[..], b"\n\n"].map(|sep| {
        out.windows(sep.len())
            .position(|w| w == sep)
            .map(|i| (i, i + sep.len()))
    });
    let Some((head_end, body_start)) = ends.into_iter().flatten().min() else {
        return status(StatusCode::BAD_GATEWAY, "git http-backend sent no headers");
    };
    let body = out.split_off(body_start);
    let mut res = Response::builder();
    let mut code = StatusCode::OK;
    for line in String::from_utf8_lossy(&out[..head_end]).lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let number = value.split(' ').next().unwrap_or_default();
            code = number.parse().unwrap_or(StatusCode::BAD_GATEWAY);
        } else {
            res = res.header(name.trim(), value);
        }
    }
    res.status(code)
        .body(Body::from(body))
        .unwrap_or_else(|e| status(StatusCode::BAD_GATEWAY, &e.to_string()))
}

/// Runs git in `dir` away from the caller's git environment and configuration.
fn git(dir: &Path, args: &[&dyn AsRef<OsStr>]) -> std::io::Result<String> {
    let mut cmd = std::process::Command::new("git");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("GIT_") {
            cmd.env_remove(name);
        }
    }
    let out = cmd
        .args(args.iter().map(|a| a.as_ref()))
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(std::io::Error::other(format!(
            "git in {}: {err}",
            dir.display()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Creates `root/repo` as a bare repository that accepts pushes over HTTP, with the files
/// of `seed` as one commit on `main`; returns that commit's id.
pub fn init_bare(root: &Path, repo: &str, seed: &Path) -> std::io::Result<String> {
    let bare = root.join(repo);
    std::fs::create_dir_all(&bare)?;
    let bare = std::fs::canonicalize(bare)?;
    git(&bare, &[&"init", &"-q", &"--bare", &"-b", &"main"])?;
    git(&bare, &[&"config", &"http.receivepack", &"true"])?;
    // A scratch repository whose work tree is `seed` itself: nothing to copy.
    let work = tempfile::tempdir()?;
    let work = work.path();
    git(work, &[&"init", &"-q", &"-b", &"main"])?;
    let git_dir = work.join(".git");
    git(
        seed,
        &[&"--git-dir", &git_dir, &"--work-tree", &".", &"add", &"-A"],
    )?;
    let (name, email) = (&"user.name=seed", &"user.email=seed@localhost");
    git(
        work,
        &[
            &"-c",
            name,
            &"-c",
            email,
            &"commit",
            &"-q",
            &"--allow-empty",
            &"-m",
            &"seed",
        ],
    )?;
    git(work, &[&"push", &"-q", &bare, &"main"])?;
    git(work, &[&"rev-parse", &"HEAD"])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// The git CLI as a client: no credential helpers, no prompts, no user configuration.
    async fn client(dir: &Path, args: &[&str]) -> std::process::Output {
        client_env(dir, args, &[]).await
    }

    async fn client_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let config = [
            "credential.helper=",
            "user.name=t",
            "user.email=t@localhost",
        ];
        tokio::process::Command::new("git")
            .args(config.iter().flat_map(|c| ["-c", c]))
            .args(args)
            .current_dir(dir)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .envs(env.iter().copied())
            .output()
            .await
            .unwrap()
    }

    /// Asserts the command succeeded; its stderr.
    fn ok(out: &std::process::Output) -> String {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{err}");
        err
    }

    /// The `http.extraHeader` setting that sends `user:password` as HTTP Basic.
    fn basic_header(credentials: &str) -> String {
        format!(
            "http.extraHeader=Authorization: Basic {}",
            STANDARD.encode(credentials)
        )
    }

    #[tokio::test]
    async fn clones_openly_and_pushes_with_the_token() {
        let root = tempfile::tempdir().unwrap();
        let seed = tempfile::tempdir().unwrap();
        std::fs::write(seed.path().join("README.md"), "hello\n").unwrap();
        std::fs::create_dir(seed.path().join("src")).unwrap();
        std::fs::write(seed.path().join("src/a.txt"), "a\n").unwrap();
        let first = init_bare(root.path(), "o/r.git", seed.path()).unwrap();
        assert_eq!(first.len(), 40);
        let bare = root.path().join("o/r.git");

        let server = GitServer::start(root.path()).await.unwrap();
        server.require_token("s3cret");
        let work = tempfile::tempdir().unwrap();
        ok(&client(work.path(), &["clone", "-q", &server.url("o/r.git"), "c"]).await);
        let clone = work.path().join("c");
        assert_eq!(
            std::fs::read_to_string(clone.join("src/a.txt")).unwrap(),
            "a\n"
        );

        std::fs::write(clone.join("README.md"), "changed\n").unwrap();
        ok(&client(&clone, &["commit", "-q", "-am", "change"]).await);
        let out = client(&clone, &["push", "origin", "main"]).await;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("could not read Username"),
            "{err}"
        );
        let wrong = basic_header("x-access-token:nope");
        let out = client(&clone, &["-c", &wrong, "push", "origin", "main"]).await;
        assert!(!out.status.success());
        assert_eq!(git(&bare, &[&"rev-parse", &"main"]).unwrap(), first);

        let right = basic_header("x-access-token:s3cret");
        ok(&client(&clone, &["-c", &right, "push", "origin", "main"]).await);
        let log = git(&bare, &[&"log", &"--format=%H %s", &"main"]).unwrap();
        let head = git(&clone, &[&"rev-parse", &"HEAD"]).unwrap();
        assert_eq!(log, format!("{head} change\n{first} seed"));
        let auth = server.auth_headers();
        assert!(auth.contains(&None));
        let sent = right.trim_start_matches("http.extraHeader=Authorization: ");
        assert_eq!(auth.last().unwrap().as_deref(), Some(sent));
    }

    #[tokio::test]
    async fn pushes_are_open_without_a_token_and_gzip_bodies_pass() {
        let root = tempfile::tempdir().unwrap();
        let seed = tempfile::tempdir().unwrap();
        init_bare(root.path(), "r.git", seed.path()).unwrap();
        let server = GitServer::start(root.path()).await.unwrap();
        let work = tempfile::tempdir().unwrap();
        ok(&client(work.path(), &["clone", "-q", &server.url("r.git"), "c"]).await);
        let clone = work.path().join("c");
        ok(&client(&clone, &["commit", "-q", "--allow-empty", "-m", "new"]).await);
        ok(&client(&clone, &["push", "-q", "origin", "HEAD:refs/heads/topic"]).await);
        let bare = root.path().join("r.git");
        assert_eq!(
            git(&bare, &[&"log", &"-1", &"--format=%s", &"topic"]).unwrap(),
            "new"
        );

        // A fetch of 30 new branch tips: over 1 KiB of `want` lines, which git sends
        // gzip-encoded.
        ok(&client(work.path(), &["clone", "-q", &server.url("r.git"), "d"]).await);
        for i in 0..30 {
            let message = format!("b{i}");
            ok(&client(&clone, &["commit", "-q", "--allow-empty", "-m", &message]).await);
        }
        let refspecs: Vec<String> = (0..30)
            .map(|i| format!("HEAD~{}:refs/heads/b{i}", 29 - i))
            .collect();
        let mut push = vec!["push", "-q", "origin"];
        push.extend(refspecs.iter().map(String::as_str));
        ok(&client(&clone, &push).await);
        let other = work.path().join("d");
        let trace = [("GIT_TRACE_CURL", "1"), ("GIT_TRACE_CURL_NO_DATA", "1")];
        let err = ok(&client_env(&other, &["fetch", "-q", "origin"], &trace).await);
        assert!(err.contains("Content-Encoding: gzip"), "{err}");
        let fetched = git(&other, &[&"log", &"-1", &"--format=%s", &"origin/b29"]).unwrap();
        assert_eq!(fetched, "b29");

        let refs = format!(
            "{}/info/refs?service=git-upload-pack",
            server.url("none.git")
        );
        assert_eq!(reqwest::get(refs).await.unwrap().status().as_u16(), 404);
    }
}
