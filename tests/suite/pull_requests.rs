//! Pull requests out and issues in, through the real binary: the push goes to a real git
//! server (`git http-backend`) that checks the token, the forge's REST API is the scripted
//! one, and what lands is read back with git itself. The token never reaches the record,
//! the database, the logs or the workflow history.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use patchflow_scripted_model::forge::ScriptedForge;
use patchflow_scripted_model::git_server::{GitServer, init_bare};
use serde_json::{Value, json};

use crate::support::{Stack, demo_script, repo_root};

const TOKEN: &str = "ghp_pullRequestTestToken7c1e";

/// A git server with `acme/app.git` (the demo repository), and the scripted forge.
struct Forges {
    root: tempfile::TempDir,
    git: GitServer,
    forge: ScriptedForge,
}

impl Forges {
    async fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        init_bare(
            root.path(),
            "acme/app.git",
            &repo_root().join("examples/demo-repo"),
        )
        .unwrap();
        let git = GitServer::start(root.path()).await.unwrap();
        git.require_token(TOKEN);
        let forge = ScriptedForge::start().await.unwrap();
        forge.require_token(TOKEN);
        Self { root, git, forge }
    }

    fn git_host(&self) -> String {
        host_of(&self.git.url("x"))
    }

    fn forge_host(&self) -> String {
        host_of(&self.forge.base_url())
    }

    /// The stack's settings: this git server is GitHub's (or GitLab's), at this forge.
    fn env(&self, gitlab: bool) -> Vec<(String, String)> {
        let (hosts, api, api_url) = if gitlab {
            (
                "PATCHFLOW_GITLAB_HOSTS",
                "PATCHFLOW_GITLAB_API_URL",
                format!("{}/api/v4", self.forge.base_url()),
            )
        } else {
            (
                "PATCHFLOW_GITHUB_HOSTS",
                "PATCHFLOW_GITHUB_API_URL",
                self.forge.base_url(),
            )
        };
        vec![
            (hosts.into(), self.git_host()),
            (api.into(), api_url),
            (
                "PATCHFLOW_GIT_ALLOWED_PROTOCOLS".into(),
                "https,http".into(),
            ),
            (
                "PATCHFLOW_GIT_ALLOWED_HOSTS".into(),
                format!("{},{}", self.git_host(), self.forge_host()),
            ),
            (
                "PATCHFLOW_PUBLIC_URL".into(),
                "https://patchflow.example".into(),
            ),
        ]
    }

    /// The forge's issue comments, once there are any: they land a moment after the task's
    /// final status (10 s at most).
    async fn comments(&self) -> Vec<Value> {
        for _ in 0..100 {
            let c = self.forge.comments();
            if !c.is_empty() {
                return c;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        Vec::new()
    }

    /// `git` on the server's bare repository.
    fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .arg("--git-dir")
            .arg(self.root.path().join("acme/app.git"))
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn host_of(url: &str) -> String {
    url.trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string()
}

async fn start(forges: &Forges, gitlab: bool, extra: &[(&str, &str)]) -> Stack {
    start_with(forges, gitlab, extra, demo_script()).await
}

async fn start_with(
    forges: &Forges,
    gitlab: bool,
    extra: &[(&str, &str)],
    script: patchflow_scripted_model::Script,
) -> Stack {
    let env = forges.env(gitlab);
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.extend_from_slice(extra);
    Stack::start(crate::support::Mode::Up, script, &all).await
}

async fn submit(stack: &Stack, body: Value) -> String {
    let (c, v) = stack.post_json("/api/tasks", &body).await;
    assert_eq!(c, 202, "{v}");
    v["task_id"].as_str().unwrap().to_string()
}

fn holds(path: &Path, needle: &str) -> bool {
    std::fs::read(path)
        .map(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_opens_one_pull_request_with_its_diff_and_a_retry_updates_it() {
    let f = Forges::start().await;
    let stack = start(&f, false, &[]).await;
    let url = f.git.url("acme/app.git");
    let id = submit(
        &stack,
        json!({"git_url": url, "task_description": "fix the bug", "open_pr": true,
               "pr_draft": true, "github_token": TOKEN}),
    )
    .await;
    let done = stack.wait_terminal(&id).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    let pr_url = format!("{}/acme/app/pull/1", f.forge.base_url());
    assert_eq!(done["pr_url"], pr_url.as_str(), "{done}");
    assert!(done.get("pr_error").is_none(), "{done}");

    // What was asked of the forge: the default branch, then the pull request, with the token.
    let asked = f.forge.requests();
    let create = asked
        .iter()
        .find(|r| r.method == "POST" && r.path == "/repos/acme/app/pulls")
        .expect("a pull request was asked for");
    assert_eq!(
        create.authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    let branch = format!("patchflow/{id}");
    assert_eq!(create.body["head"], branch.as_str());
    assert_eq!(
        create.body["base"], "main",
        "the repository's default branch"
    );
    assert_eq!(create.body["draft"], true);
    let body = create.body["body"].as_str().unwrap();
    assert!(body.contains("calc.py"), "{body}");
    assert!(
        body.contains(&format!("https://patchflow.example/tasks/{id}")),
        "{body}"
    );
    assert!(
        asked
            .iter()
            .any(|r| r.method == "GET" && r.path == "/repos/acme/app")
    );

    // What landed, read with git: one commit on main's tip, by patchflow, with the diff.
    let main = f.git(&["rev-parse", "main"]);
    let parent = f.git(&["rev-parse", &format!("{branch}^")]);
    assert_eq!(parent.trim(), main.trim());
    let author = f.git(&["log", "-1", "--format=%an <%ae>", &branch]);
    assert_eq!(author.trim(), "patchflow <patchflow@localhost>");
    let changed = f.git(&["diff", "--name-only", "main", &branch]);
    assert_eq!(changed.trim(), "calc.py");
    let (_, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    let pushed = f.git(&["diff", "main", &branch]);
    for line in diff
        .lines()
        .filter(|l| l.starts_with('+') && !l.starts_with("+++"))
    {
        assert!(pushed.contains(line), "{line} is not in the pushed commit");
    }
    // The push authenticated with the token as GitHub expects it (x-access-token).
    use base64::Engine as _;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{TOKEN}"))
    );
    assert!(
        f.git
            .auth_headers()
            .iter()
            .any(|h| h.as_deref() == Some(basic.as_str()))
    );

    // A new attempt lands on the same branch and the same pull request.
    stack.closed_workflow(&id).await;
    let (c, v) = stack
        .post_json(
            &format!("/api/tasks/{id}/retry"),
            &json!({"mode": "from_start"}),
        )
        .await;
    assert_eq!(c, 202, "{v}");
    let again = loop {
        let r = stack.record(&id).await;
        if r["attempt"] == 2 && r["status"] == "COMPLETED" {
            break r;
        }
        assert!(r["status"] != "FAILED", "{r}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(again["pr_url"], pr_url.as_str());
    assert_eq!(f.forge.pulls().len(), 1, "{:?}", f.forge.pulls());
    assert!(
        f.forge
            .requests()
            .iter()
            .any(|r| r.method == "PATCH" && r.path == "/repos/acme/app/pulls/1"),
        "the open pull request was updated"
    );
    let events = stack.events(&id).await;
    assert!(
        events
            .iter()
            .any(|e| e.message.contains(&format!("pull request: {pr_url}")))
    );

    // The token: only in the push and the API calls.
    assert!(!stack.logs().contains(TOKEN), "the logs hold the token");
    let history = crate::support::history_text(&stack.history(&id));
    assert!(
        !history.contains(TOKEN),
        "the workflow history holds the token"
    );
    assert!(
        history.contains("github_token"),
        "the sealed token is in the spec"
    );
    for entry in std::fs::read_dir(&stack.data_dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("patchflow.db") {
            assert!(!holds(&entry.path(), TOKEN), "{name} holds the token");
        }
    }
    let (_, transcript) = stack.get_text(&format!("/api/tasks/{id}/transcript")).await;
    assert!(!transcript.contains(TOKEN));
    assert!(!stack.record(&id).await.to_string().contains(TOKEN));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_push_or_forge_leaves_the_task_completed_with_pr_error() {
    let f = Forges::start().await;
    let stack = start(&f, false, &[]).await;
    let url = f.git.url("acme/app.git");

    // A token the git server refuses: no push, no API call for a pull request.
    let id = submit(
        &stack,
        json!({"git_url": url, "task_description": "fix", "open_pr": true,
               "pr_base": "main", "github_token": "ghp_wrongToken000"}),
    )
    .await;
    let done = stack.wait_terminal(&id).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    assert!(done["pr_url"].is_null());
    let why = done["pr_error"].as_str().unwrap();
    assert!(why.contains("cannot push"), "{why}");
    assert!(!why.contains("ghp_wrongToken000"), "{why}");
    assert!(!f.forge.requests().iter().any(|r| r.method == "POST"));
    let refused_push = id;

    // The forge refuses (403): said as the forge said it.
    f.forge.fail_next(403, 1);
    let id = submit(
        &stack,
        json!({"git_url": url, "task_description": "fix", "open_pr": true,
               "pr_base": "main", "pr_branch": "fix/forbidden", "github_token": TOKEN}),
    )
    .await;
    let done = stack.wait_terminal(&id).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    let why = done["pr_error"].as_str().unwrap();
    assert!(why.contains("403"), "{why}");
    let shown = stack.cli(&["status", &id]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("pull request not opened") && shown.contains("403"),
        "{shown}"
    );
    assert!(
        f.git(&["branch", "--list", "fix/forbidden"])
            .contains("fix/forbidden")
    );

    // Later, the forge answers: `patchflow pr` opens it, and the record forgets the error.
    let out = stack.cli(&["pr", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(printed.contains("/acme/app/pull/"), "{printed}");
    let r = stack.record(&id).await;
    assert_eq!(r["pr_url"], printed.as_str(), "{r}");
    assert!(r.get("pr_error").is_none(), "{r}");
    // The refused push, with a token that works this time, through the API.
    let (c, v) = stack
        .post_json(
            &format!("/api/tasks/{refused_push}/pull-request"),
            &json!({"github_token": TOKEN}),
        )
        .await;
    assert_eq!(c, 200, "{v}");
    assert!(
        v["pr_url"].as_str().unwrap().contains("/acme/app/pull/"),
        "{v}"
    );
    assert!(!stack.logs().contains(TOKEN) && !stack.logs().contains("ghp_wrongToken000"));
    // Refused at the door: an unknown field, a bad token, a task that does not exist.
    for (path, body, code) in [
        (
            format!("/api/tasks/{refused_push}/pull-request"),
            json!({"colour": 1}),
            400,
        ),
        (
            format!("/api/tasks/{refused_push}/pull-request"),
            json!({"github_token": "a b"}),
            400,
        ),
        (
            "/api/tasks/tsk_00000000000000000000000000000000/pull-request".to_string(),
            json!({}),
            404,
        ),
    ] {
        let (c, v) = stack.post_json(&path, &body).await;
        assert_eq!(c, code, "{path} {body}: {v}");
    }

    // The forge fails twice (502), then answers: retried, and the pull request is opened.
    f.forge.fail_next(502, 2);
    let id = submit(
        &stack,
        json!({"git_url": url, "task_description": "fix", "open_pr": true,
               "pr_base": "main", "pr_branch": "fix/flaky", "github_token": TOKEN}),
    )
    .await;
    let done = stack.wait_terminal(&id).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    assert!(
        done["pr_url"].as_str().unwrap().contains("/acme/app/pull/"),
        "{done}"
    );
    let posts = f
        .forge
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.body["head"] == "fix/flaky")
        .count();
    assert_eq!(posts, 3, "two 502s, then the pull request");

    // Never a force push over the base branch.
    let main_before = f.git(&["rev-parse", "main"]);
    let id = submit(
        &stack,
        json!({"git_url": url, "task_description": "fix", "open_pr": true,
               "pr_base": "main", "pr_branch": "main", "github_token": TOKEN}),
    )
    .await;
    let done = stack.wait_terminal(&id).await;
    assert!(
        done["pr_error"]
            .as_str()
            .unwrap_or_default()
            .contains("is the base branch"),
        "{done}"
    );
    assert_eq!(
        f.git(&["rev-parse", "main"]),
        main_before,
        "main was not touched"
    );

    // Bad input is refused at the door: a branch that is not a branch, a ZIP with open_pr.
    for (field, value) in [
        ("pr_branch", "../../etc"),
        ("pr_base", "-rf"),
        ("pr_branch", "a b"),
    ] {
        let (c, v) = stack
            .post_json(
                "/api/tasks",
                &json!({"git_url": url, "task_description": "fix", "open_pr": true, field: value}),
            )
            .await;
        assert_eq!(c, 400, "{field}={value}: {v}");
        assert!(v["message"].as_str().unwrap().contains(field), "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gitlab_task_opens_a_merge_request() {
    let f = Forges::start().await;
    let stack = start(
        &f,
        true,
        &[
            ("PATCHFLOW_GITLAB_TOKEN", TOKEN),
            ("PATCHFLOW_GITLAB_WEBHOOK_SECRET", "gl-hook-secret"),
        ],
    )
    .await;
    // The deployment's token: the task brings none.
    let id = submit(
        &stack,
        json!({"git_url": f.git.url("acme/app.git"), "task_description": "fix", "open_pr": true,
               "pr_draft": true}),
    )
    .await;
    let done = stack.wait_terminal(&id).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    assert_eq!(
        done["pr_url"],
        format!("{}/acme/app/-/merge_requests/1", f.forge.base_url()).as_str(),
        "{done}"
    );
    let create = f
        .forge
        .requests()
        .into_iter()
        .find(|r| r.method == "POST" && r.path.ends_with("/merge_requests"))
        .unwrap();
    assert_eq!(create.path, "/api/v4/projects/acme%2Fapp/merge_requests");
    assert_eq!(
        create.body["source_branch"],
        format!("patchflow/{id}").as_str()
    );
    assert_eq!(create.body["target_branch"], "main");
    assert!(
        create.body["title"]
            .as_str()
            .unwrap()
            .starts_with("Draft: ")
    );
    use base64::Engine as _;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("oauth2:{TOKEN}"))
    );
    assert!(
        f.git
            .auth_headers()
            .iter()
            .any(|h| h.as_deref() == Some(basic.as_str()))
    );

    // A `/patchflow` note on an issue starts a task that ends in a note linking its MR.
    let note = json!({
        "object_kind": "note",
        "object_attributes": {"noteable_type": "Issue", "note": "/patchflow fix add()"},
        "issue": {"iid": 5, "title": "add is wrong", "description": "2 + 2"},
        "project": {"git_http_url": f.git.url("acme/app.git"), "default_branch": "main",
                    "path_with_namespace": "acme/app"},
    });
    let r = reqwest::Client::new()
        .post(format!("{}/api/webhooks/gitlab", stack.base))
        .header("X-Gitlab-Token", "gl-hook-secret")
        .header("X-Gitlab-Event", "Note Hook")
        .header("X-Gitlab-Event-UUID", "e-1")
        .json(&note)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let v: Value = r.json().await.unwrap();
    let hooked = v["task_id"].as_str().unwrap().to_string();
    let done = stack.wait_terminal(&hooked).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    let mr = done["pr_url"].as_str().unwrap().to_string();
    let notes = f.comments().await;
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(
        (notes[0]["repo"].as_str(), notes[0]["issue"].as_u64()),
        (Some("acme/app"), Some(5))
    );
    assert!(
        notes[0]["body"].as_str().unwrap().contains(&mr),
        "{notes:?}"
    );
    assert!(!stack.logs().contains(TOKEN));
}

fn sign(secret: &str, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let tag = ring::hmac::sign(&key, body);
    format!(
        "sha256={}",
        tag.as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_labelled_issue_starts_a_task_that_opens_a_pull_request_and_comments_on_the_issue() {
    const SECRET: &str = "webhook-secret-5b2a";
    let f = Forges::start().await;
    let stack = start(
        &f,
        false,
        &[
            ("PATCHFLOW_GITHUB_TOKEN", TOKEN),
            ("PATCHFLOW_GITHUB_WEBHOOK_SECRET", SECRET),
            ("PATCHFLOW_GITHUB_WEBHOOK_TENANT", "acme"),
            ("PATCHFLOW_GITLAB_WEBHOOK_SECRET", SECRET),
        ],
    )
    .await;
    let hook = |event: &'static str, delivery: &'static str, body: Vec<u8>, sig: Option<String>| {
        let base = stack.base.clone();
        async move {
            // No API token: the signature is the credential.
            let mut req = reqwest::Client::new()
                .post(format!("{base}/api/webhooks/github"))
                .header("X-GitHub-Event", event)
                .header("X-GitHub-Delivery", delivery)
                .header("Content-Type", "application/json")
                .body(body);
            if let Some(s) = sig {
                req = req.header("X-Hub-Signature-256", s);
            }
            let r = req.send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let payload = serde_json::to_vec(&json!({
        "action": "labeled",
        "label": {"name": "patchflow"},
        "issue": {"number": 42, "title": "calc.add is wrong", "body": "add(2, 2) is not 4"},
        "repository": {"clone_url": f.git.url("acme/app.git"), "default_branch": "main",
                       "full_name": "acme/app"},
    }))
    .unwrap();

    // A bad or missing signature: 401, nothing started.
    let mut tampered = payload.clone();
    tampered.push(b' ');
    for sig in [
        None,
        Some(sign("wrong", &payload)),
        Some(sign(SECRET, &tampered)),
    ] {
        let (c, v) = hook("issues", "d-0", payload.clone(), sig).await;
        assert_eq!(c, 401, "{v}");
    }
    let (_, page) = stack.get_json("/api/tasks").await;
    assert!(page["tasks"].as_array().unwrap().is_empty(), "{page}");
    // An unrelated event: accepted, ignored.
    let ping = b"{\"zen\":\"hi\"}".to_vec();
    let (c, v) = hook("ping", "d-1", ping.clone(), Some(sign(SECRET, &ping))).await;
    assert_eq!(c, 202, "{v}");
    assert!(v["ignored"].is_string(), "{v}");

    let (c, v) = hook(
        "issues",
        "d-2",
        payload.clone(),
        Some(sign(SECRET, &payload)),
    )
    .await;
    assert_eq!(c, 202, "{v}");
    let id = v["task_id"].as_str().unwrap().to_string();
    // A redelivery starts nothing new.
    let (c, v) = hook(
        "issues",
        "d-2",
        payload.clone(),
        Some(sign(SECRET, &payload)),
    )
    .await;
    assert_eq!(c, 200, "{v}");
    assert_eq!(v["task_id"], id.as_str());

    let done = stack.wait_terminal(&id).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    assert_eq!(done["tenant"], "acme");
    assert!(
        done["task_description"]
            .as_str()
            .unwrap()
            .contains("add(2, 2) is not 4")
    );
    let pr_url = done["pr_url"].as_str().unwrap().to_string();
    let comments = f.comments().await;
    assert_eq!(comments.len(), 1, "{comments:?}");
    assert_eq!(comments[0]["issue"], 42);
    assert!(
        comments[0]["body"].as_str().unwrap().contains(&pr_url),
        "{comments:?}"
    );

    // GitLab's door: the secret is compared, not trusted.
    let r = reqwest::Client::new()
        .post(format!("{}/api/webhooks/gitlab", stack.base))
        .header("X-Gitlab-Token", "not-the-secret")
        .header("X-Gitlab-Event", "Note Hook")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let (_, page) = stack.get_json("/api/tasks").await;
    assert_eq!(page["tasks"].as_array().unwrap().len(), 1, "{page}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_github_app_mints_an_installation_token_for_the_one_repository() {
    const INSTALLATION: &str = "ghs_installationToken3f9a";
    let f = Forges::start().await;
    // The App's key pair, made here with openssl (GitHub Apps sign with RS256).
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = (keys.path().join("app.pem"), keys.path().join("app.pub"));
    for args in [
        vec![
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ],
        vec!["pkey", "-pubout", "-in"],
    ] {
        let mut cmd = Command::new("openssl");
        cmd.args(&args);
        if args[0] == "genpkey" {
            cmd.arg(&private);
        } else {
            cmd.arg(&private).arg("-out").arg(&public);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let private_pem = std::fs::read_to_string(&private).unwrap();
    f.forge
        .install_app(
            "4242",
            &std::fs::read_to_string(&public).unwrap(),
            INSTALLATION,
        )
        .unwrap();
    f.forge.require_token(INSTALLATION);
    f.git.require_token(INSTALLATION);
    let stack = start(
        &f,
        false,
        &[
            ("PATCHFLOW_GITHUB_APP_ID", "4242"),
            ("PATCHFLOW_GITHUB_APP_PRIVATE_KEY", &private_pem),
        ],
    )
    .await;
    // The task brings no token: the App's installation token pushes and opens it.
    let id = submit(
        &stack,
        json!({"git_url": f.git.url("acme/app.git"), "task_description": "fix", "open_pr": true}),
    )
    .await;
    let done = stack.wait_terminal(&id).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    assert!(done["pr_url"].as_str().is_some(), "{done}");
    let asked = f.forge.requests();
    let installation = asked
        .iter()
        .find(|r| r.path == "/repos/acme/app/installation")
        .expect("the App's installation was looked up");
    let jwt = installation.authorization.as_deref().unwrap();
    assert!(jwt.starts_with("Bearer ey"), "the App's JWT: {jwt}");
    let mint = asked
        .iter()
        .find(|r| r.path == "/app/installations/77/access_tokens")
        .expect("a token was minted");
    assert_eq!(
        mint.body["repositories"],
        json!(["app"]),
        "for this repository only"
    );
    let create = asked
        .iter()
        .find(|r| r.path == "/repos/acme/app/pulls")
        .unwrap();
    assert_eq!(
        create.authorization.as_deref(),
        Some(format!("Bearer {INSTALLATION}").as_str())
    );
    let logs = stack.logs();
    assert!(!logs.contains(INSTALLATION) && !logs.contains("PRIVATE KEY"));
    let (_, config) = {
        let out = stack.cli(&["config"]);
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert!(
        !config.contains("PRIVATE KEY"),
        "patchflow config shows the App's key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_turn_updates_the_open_pull_request() {
    use patchflow_scripted_model::{ScriptedCall, Turn};
    let f = Forges::start().await;
    let mut script = demo_script();
    let call = |name: &str, arguments: Value| Turn {
        tool_calls: vec![ScriptedCall {
            name: name.into(),
            arguments,
        }],
        ..Turn::default()
    };
    script.turns.extend([
        call(
            "edit_file_content",
            json!({"file_path": "README.md", "old_text": "calculator", "new_text": "calculator (add fixed)"}),
        ),
        call("finish", json!({"summary": "Noted the fix in the README."})),
    ]);
    let stack = start_with(&f, false, &[], script).await;
    let url = f.git.url("acme/app.git");
    let id = submit(
        &stack,
        json!({"git_url": url, "task_description": "fix the bug", "open_pr": true,
               "github_token": TOKEN}),
    )
    .await;
    let done = stack.wait_terminal(&id).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
    let pr_url = format!("{}/acme/app/pull/1", f.forge.base_url());
    assert_eq!(done["pr_url"], pr_url.as_str(), "{done}");
    let branch = format!("patchflow/{id}");
    let first_tip = f.git(&["rev-parse", &branch]);
    assert_eq!(
        f.git(&["diff", "--name-only", "main", &branch]).trim(),
        "calc.py"
    );
    let patches_before = f
        .forge
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH")
        .count();

    let (c, v) = stack
        .post_json(
            &format!("/api/tasks/{id}/messages"),
            &json!({"message": "Also note the fix in the README."}),
        )
        .await;
    assert_eq!(c, 202, "{v}");
    assert_eq!(v["turn"], 2);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let after = loop {
        let r = stack.record(&id).await;
        let ended = r["turns"].as_array().unwrap().iter().any(|t| {
            t["turn"] == 2 && ["COMPLETED", "FAILED"].contains(&t["status"].as_str().unwrap())
        });
        if ended && r["status"] == "COMPLETED" {
            break r;
        }
        assert!(r["status"] != "FAILED", "{r}");
        assert!(
            std::time::Instant::now() < deadline,
            "turn 2 did not end: {r}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(after["turns"][1]["status"], "COMPLETED", "{after}");

    // The same pull request, brought up to date: the branch holds both turns' changes as
    // one commit on main, pushed over the first turn's.
    assert_eq!(after["pr_url"], pr_url.as_str(), "{after}");
    assert_eq!(f.forge.pulls().len(), 1, "{:?}", f.forge.pulls());
    let patches_after = f
        .forge
        .requests()
        .iter()
        .filter(|r| r.method == "PATCH" && r.path == "/repos/acme/app/pulls/1")
        .count();
    assert!(
        patches_after > patches_before,
        "the pull request was not updated"
    );
    let tip = f.git(&["rev-parse", &branch]);
    assert_ne!(tip.trim(), first_tip.trim(), "turn 2 was not pushed");
    let parent = f.git(&["rev-parse", &format!("{branch}^")]);
    assert_eq!(parent.trim(), f.git(&["rev-parse", "main"]).trim());
    let changed = f.git(&["diff", "--name-only", "main", &branch]);
    let changed: Vec<&str> = changed.lines().collect();
    assert_eq!(changed, ["README.md", "calc.py"], "{changed:?}");
    let pushed = f.git(&["diff", "main", &branch]);
    assert!(pushed.contains("+    return a + b"), "{pushed}");
    assert!(pushed.contains("calculator (add fixed)"), "{pushed}");
    assert!(!stack.logs().contains(TOKEN), "the logs hold the token");
}
