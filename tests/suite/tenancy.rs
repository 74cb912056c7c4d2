//! Every door knows who is asking: no token or a bad one is 401 (gRPC UNAUTHENTICATED) at
//! every route and RPC; another tenant's task is 404 exactly like a missing one, and is
//! never listed; a viewer only reads; only an admin manages tokens; revoked and expired
//! tokens are refused; the bootstrap token is 0600 and no token is stored in plain text.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};
use tonic::Code;

use crate::support::{Mode, Stack, demo_git_repo, demo_script, http_with};

const TASK_ID: &str = "tsk_00000000000000000000000000000000";

async fn call(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    let mut req = match method {
        "POST" => http.post(url),
        "DELETE" => http.delete(url),
        _ => http.get(url),
    };
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let www = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    (status, r.json().await.unwrap_or(Value::Null), www)
}

async fn new_token(stack: &Stack, tenant: &str, role: &str) -> (String, String) {
    let (c, v, _) = call(
        &stack.http,
        "POST",
        &format!("{}/api/tokens", stack.base),
        Some(json!({"tenant": tenant, "role": role, "name": format!("{role} of {tenant}")})),
    )
    .await;
    assert_eq!(c, 201, "{v}");
    assert_eq!(v["tenant"], tenant);
    assert_eq!(v["role"], role);
    (
        v["token_id"].as_str().unwrap().to_string(),
        v["token"].as_str().unwrap().to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_only_their_tasks_and_every_door_wants_a_live_token() {
    let stack = Stack::start(Mode::Up, demo_script(), &[]).await;
    // The bootstrap token: only its owner can read the file.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(stack.data_dir.join("admin.token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            !stack.logs().contains(&stack.token),
            "the log shows the admin token"
        );
    }

    // No token, a malformed one, an unknown one: 401 with WWW-Authenticate at every route.
    let routes = [
        ("GET", "/api/tasks".to_string()),
        ("POST", "/api/tasks".to_string()),
        ("GET", format!("/api/tasks/{TASK_ID}")),
        ("GET", format!("/api/tasks/{TASK_ID}/diff")),
        ("GET", format!("/api/tasks/{TASK_ID}/transcript")),
        ("GET", format!("/api/tasks/{TASK_ID}/log")),
        ("GET", format!("/api/tasks/{TASK_ID}/events")),
        ("POST", format!("/api/tasks/{TASK_ID}/cancel")),
        ("POST", format!("/api/tasks/{TASK_ID}/retry")),
        ("POST", format!("/api/tasks/{TASK_ID}/pull-request")),
        ("POST", format!("/api/tasks/{TASK_ID}/messages")),
        ("POST", format!("/api/tasks/{TASK_ID}/select")),
        ("GET", format!("/api/tasks/{TASK_ID}/candidates/1/diff")),
        ("GET", "/api/tokens".to_string()),
        ("POST", "/api/tokens".to_string()),
        ("DELETE", "/api/tokens/tok_x".to_string()),
        ("GET", "/api/whoami".to_string()),
    ];
    let bad = format!("pf_{}", "x".repeat(43));
    for token in [None, Some("not-a-token"), Some(bad.as_str())] {
        let http = http_with(token);
        for (method, path) in &routes {
            let (c, v, www) = call(&http, method, &format!("{}{path}", stack.base), None).await;
            assert_eq!(c, 401, "{method} {path} with {token:?}: {v}");
            assert_eq!(v["code"], "unauthenticated", "{v}");
            assert!(
                www.unwrap_or_default().starts_with("Bearer"),
                "{method} {path}"
            );
        }
    }
    // gRPC: every Tasks call without a token is UNAUTHENTICATED.
    let mut anon = stack.grpc_as(None).await;
    use patchflow_gateway::grpc::proto;
    let codes = [
        anon.get_task(proto::GetTaskRequest {
            task_id: TASK_ID.into(),
        })
        .await
        .unwrap_err()
        .code(),
        anon.list_tasks(proto::ListTasksRequest::default())
            .await
            .unwrap_err()
            .code(),
        anon.submit_task(proto::SubmitTaskRequest::default())
            .await
            .unwrap_err()
            .code(),
        anon.cancel_task(proto::CancelTaskRequest {
            task_id: TASK_ID.into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        anon.send_message(proto::SendMessageRequest {
            task_id: TASK_ID.into(),
            message: "go on".into(),
        })
        .await
        .unwrap_err()
        .code(),
        anon.select_candidate(proto::SelectCandidateRequest {
            task_id: TASK_ID.into(),
            candidate: 1,
        })
        .await
        .unwrap_err()
        .code(),
        anon.retry_task(proto::RetryTaskRequest {
            task_id: TASK_ID.into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
        anon.watch_task(proto::WatchTaskRequest {
            task_id: TASK_ID.into(),
            after_seq: 0,
        })
        .await
        .err()
        .unwrap()
        .code(),
        anon.get_result(proto::GetResultRequest {
            task_id: TASK_ID.into(),
            ..Default::default()
        })
        .await
        .unwrap_err()
        .code(),
    ];
    assert!(
        codes.iter().all(|c| *c == Code::Unauthenticated),
        "{codes:?}"
    );

    // The admin makes tokens; the list never shows a token's value.
    let (_, a) = new_token(&stack, "team-a", "member").await;
    let (b_id, b) = new_token(&stack, "team-b", "member").await;
    let (_, viewer) = new_token(&stack, "team-a", "viewer").await;
    let (c, listed, _) = call(
        &stack.http,
        "GET",
        &format!("{}/api/tokens", stack.base),
        None,
    )
    .await;
    assert_eq!(c, 200);
    assert_eq!(listed["tokens"].as_array().unwrap().len(), 4, "{listed}");
    let text = listed.to_string();
    assert!(!text.contains(&a) && !text.contains(&b) && !text.contains(&stack.token));
    let (http_a, http_b, http_v) = (
        http_with(Some(&a)),
        http_with(Some(&b)),
        http_with(Some(&viewer)),
    );
    let (c, who, _) = call(&http_a, "GET", &format!("{}/api/whoami", stack.base), None).await;
    assert_eq!(c, 200);
    assert_eq!(who["tenant"], "team-a");
    assert_eq!(who["role"], "member");
    // Only an admin manages tokens; nobody names another tenant in a submission.
    let (c, _, _) = call(
        &http_a,
        "POST",
        &format!("{}/api/tokens", stack.base),
        Some(json!({"tenant": "team-a", "role": "admin"})),
    )
    .await;
    assert_eq!(c, 403);
    let (c, _, _) = call(&http_a, "GET", &format!("{}/api/tokens", stack.base), None).await;
    assert_eq!(c, 403);
    let repo = demo_git_repo(stack.dir.path());
    let git_url = format!("file://{}", repo.display());
    let (c, v, _) = call(
        &http_a,
        "POST",
        &format!("{}/api/tasks", stack.base),
        Some(json!({"git_url": git_url, "task_description": "fix", "tenant": "team-b"})),
    )
    .await;
    assert_eq!(c, 403, "{v}");

    // A's task.
    let (c, v, _) = call(
        &http_a,
        "POST",
        &format!("{}/api/tasks", stack.base),
        Some(json!({"git_url": git_url, "task_description": "fix"})),
    )
    .await;
    assert_eq!(c, 202, "{v}");
    let id = v["task_id"].as_str().unwrap().to_string();
    let done = stack.wait_terminal(&id).await;
    assert_eq!(done["status"], "COMPLETED");
    assert_eq!(done["tenant"], "team-a", "{done}");

    // B: 404 at every route, exactly as for a task that does not exist; never listed.
    for (method, path) in [
        ("GET", format!("/api/tasks/{id}")),
        ("GET", format!("/api/tasks/{id}/diff")),
        ("GET", format!("/api/tasks/{id}/transcript")),
        ("GET", format!("/api/tasks/{id}/log")),
        ("GET", format!("/api/tasks/{id}/events")),
        ("POST", format!("/api/tasks/{id}/cancel")),
        ("POST", format!("/api/tasks/{id}/retry")),
        ("POST", format!("/api/tasks/{id}/pull-request")),
        ("POST", format!("/api/tasks/{id}/messages")),
        ("POST", format!("/api/tasks/{id}/select")),
        ("GET", format!("/api/tasks/{id}/candidates/1/diff")),
        ("GET", format!("/api/tasks/{id}/diff?turn=1")),
        ("GET", format!("/api/tasks/{id}/transcript?turn=1")),
    ] {
        let (c, theirs, _) = call(&http_b, method, &format!("{}{path}", stack.base), None).await;
        let missing_path = path.replace(&id, TASK_ID);
        let (c2, missing, _) = call(
            &http_b,
            method,
            &format!("{}{missing_path}", stack.base),
            None,
        )
        .await;
        assert_eq!((c, c2), (404, 404), "{method} {path}: {theirs} / {missing}");
        assert_eq!(theirs["code"], missing["code"]);
    }
    let (_, page, _) = call(
        &http_b,
        "GET",
        &format!("{}/api/tasks?tenant=team-a", stack.base),
        None,
    )
    .await;
    assert!(page["tasks"].as_array().unwrap().is_empty(), "{page}");
    let mut grpc_b = stack.grpc_as(Some(&b)).await;
    assert_eq!(
        grpc_b
            .get_task(proto::GetTaskRequest {
                task_id: id.clone()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        grpc_b
            .get_result(proto::GetResultRequest {
                task_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    // Follow-ups, selection and a candidate's or turn's files of another tenant's task are
    // NOT_FOUND too, never a hint that it exists.
    assert_eq!(
        grpc_b
            .send_message(proto::SendMessageRequest {
                task_id: id.clone(),
                message: "go on".into(),
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        grpc_b
            .get_result(proto::GetResultRequest {
                task_id: id.clone(),
                turn: Some(1),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        grpc_b
            .watch_task(proto::WatchTaskRequest {
                task_id: id.clone(),
                after_seq: 0
            })
            .await
            .err()
            .unwrap()
            .code(),
        Code::NotFound
    );
    let listed_b = grpc_b
        .list_tasks(proto::ListTasksRequest {
            tenant: "team-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed_b.tasks.is_empty());
    // A and the admin see it.
    let (_, page, _) = call(&http_a, "GET", &format!("{}/api/tasks", stack.base), None).await;
    assert_eq!(page["tasks"].as_array().unwrap().len(), 1, "{page}");
    let (c, _, _) = call(
        &stack.http,
        "GET",
        &format!("{}/api/tasks/{id}", stack.base),
        None,
    )
    .await;
    assert_eq!(c, 200);

    // The viewer reads but may not submit, cancel or retry.
    let (c, _, _) = call(
        &http_v,
        "GET",
        &format!("{}/api/tasks/{id}/diff", stack.base),
        None,
    )
    .await;
    assert_eq!(c, 200);
    for (method, path, body) in [
        (
            "POST",
            "/api/tasks".to_string(),
            Some(json!({"git_url": git_url, "task_description": "x"})),
        ),
        ("POST", format!("/api/tasks/{id}/cancel"), None),
        ("POST", format!("/api/tasks/{id}/retry"), None),
        ("POST", format!("/api/tasks/{id}/pull-request"), None),
    ] {
        let (c, v, _) = call(&http_v, method, &format!("{}{path}", stack.base), body).await;
        assert_eq!(c, 403, "{path}: {v}");
        assert_eq!(v["code"], "forbidden");
    }
    let mut grpc_v = stack.grpc_as(Some(&viewer)).await;
    assert_eq!(
        grpc_v
            .retry_task(proto::RetryTaskRequest {
                task_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    // Revoked: refused from then on.
    let (c, _, _) = call(
        &stack.http,
        "DELETE",
        &format!("{}/api/tokens/{b_id}", stack.base),
        None,
    )
    .await;
    assert_eq!(c, 204);
    let (c, _, _) = call(
        &stack.http,
        "DELETE",
        &format!("{}/api/tokens/{b_id}", stack.base),
        None,
    )
    .await;
    assert_eq!(c, 404, "revoked twice");
    let (c, v, _) = call(&http_b, "GET", &format!("{}/api/tasks", stack.base), None).await;
    assert_eq!(c, 401);
    assert!(v["message"].as_str().unwrap().contains("revoked"), "{v}");

    // Expired: a token whose time has passed (written into the store as it would be).
    let store = patchflow_platform::db::open(&format!(
        "sqlite://{}/patchflow.db",
        stack.data_dir.display()
    ))
    .await
    .unwrap();
    let (expired_id, expired) = patchflow_platform::secret_box::new_token().unwrap();
    store
        .create_token(
            &patchflow_core::auth::ApiToken {
                token_id: expired_id,
                tenant: "team-a".into(),
                role: patchflow_core::auth::Role::Member,
                name: "old".into(),
                created_at: chrono::Utc::now() - chrono::Duration::days(2),
                expires_at: Some(chrono::Utc::now() - chrono::Duration::days(1)),
                revoked_at: None,
                last_used_at: None,
            },
            &patchflow_core::auth::token_hash(&expired),
        )
        .await
        .unwrap();
    let (c, v, _) = call(
        &http_with(Some(expired.expose())),
        "GET",
        &format!("{}/api/tasks", stack.base),
        None,
    )
    .await;
    assert_eq!(c, 401);
    assert!(v["message"].as_str().unwrap().contains("expired"), "{v}");

    // No token in plain text in the database file or the logs.
    for entry in std::fs::read_dir(&stack.data_dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("patchflow.db") {
            let bytes = std::fs::read(entry.path()).unwrap();
            for t in [&a, &b, &viewer, &stack.token] {
                assert!(
                    !bytes.windows(t.len()).any(|w| w == t.as_bytes()),
                    "{name} holds a token"
                );
            }
        }
    }
    let logs = stack.logs();
    let history = crate::support::history_text(&stack.history(&id));
    assert!(history.contains("team-a"), "the history was not decoded");
    for t in [&a, &b, &viewer, &stack.token] {
        assert!(!logs.contains(t.as_str()), "the logs hold a token");
        assert!(
            !history.contains(t.as_str()),
            "the workflow history holds a token"
        );
    }
    // The CLI makes, lists and revokes tokens with admin.token, by itself.
    let out = stack.cli(&[
        "tokens", "create", "--tenant", "team-c", "--role", "viewer", "--name", "cli",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        patchflow_core::auth::looks_like_token(&cli_token),
        "{cli_token}"
    );
    let out = stack.cli(&["tokens", "list"]);
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        listing.contains("team-c") && !listing.contains(&cli_token),
        "{listing}"
    );
    let out = stack.cli(&["--token", &cli_token, "tokens", "list"]);
    assert!(!out.status.success(), "a viewer listed tokens");
    // The CLI on this machine signs in with admin.token by itself.
    let out = stack.cli(&["status", &id, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And with another tenant's token, the CLI sees nothing.
    let out = stack.cli(&["--token", &viewer, "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn auth_none_is_refused_unless_every_address_is_loopback() {
    let out = std::process::Command::new(crate::support::bin())
        .args(["config"])
        .env("PATCHFLOW_AUTH", "none")
        .env("PATCHFLOW_HTTP_ADDR", "0.0.0.0:8787")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("auth") && err.contains("loopback"), "{err}");
    let ok = std::process::Command::new(crate::support::bin())
        .args(["config"])
        .env("PATCHFLOW_AUTH", "none")
        .env("PATCHFLOW_HTTP_ADDR", "127.0.0.1:8787")
        .env("PATCHFLOW_GRPC_ADDR", "[::1]:8788")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_a_model_or_limit_a_tenant_may_not_have() {
    let quotas = r#"{"*": {"models": ["scripted-test"], "max_steps": 40}, "team-x": {"max_steps": 5, "wall_seconds": 600}}"#;
    let stack = Stack::start(Mode::Up, demo_script(), &[("PATCHFLOW_TENANTS", quotas)]).await;
    let repo = demo_git_repo(stack.dir.path());
    let git_url = format!("file://{}", repo.display());
    let submit = |body: Value| {
        let stack = &stack;
        async move {
            call(
                &stack.http,
                "POST",
                &format!("{}/api/tasks", stack.base),
                Some(body),
            )
            .await
        }
    };
    let (c, v, _) = submit(json!({"git_url": git_url, "task_description": "x", "tenant": "team-x", "limits": {"max_steps": 6}})).await;
    assert_eq!(c, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("max_steps = 5"),
        "{v}"
    );
    let (c, v, _) = submit(json!({"git_url": git_url, "task_description": "x", "tenant": "team-x", "limits": {"max_steps": 5, "wall_seconds": 601}})).await;
    assert_eq!(c, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("wall_seconds = 600"),
        "{v}"
    );
    // The default's model list applies to team-x too; another tenant's cap is the default's.
    let (c, v, _) = submit(json!({"git_url": git_url, "task_description": "x", "tenant": "team-x", "model": "gpt-5", "limits": {"max_steps": 5, "wall_seconds": 60}})).await;
    assert_eq!(c, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("model `gpt-5` is not allowed"),
        "{v}"
    );
    let (c, v, _) = submit(json!({"git_url": git_url, "task_description": "x", "tenant": "team-y", "limits": {"max_steps": 41}})).await;
    assert_eq!(c, 400, "{v}");
    // Nothing refused was stored; what fits is accepted and runs.
    let (_, page, _) = call(
        &stack.http,
        "GET",
        &format!("{}/api/tasks", stack.base),
        None,
    )
    .await;
    assert!(page["tasks"].as_array().unwrap().is_empty(), "{page}");
    // Limits left out: the defaults, lowered to team-x's caps rather than refused.
    let (c, v, _) =
        submit(json!({"git_url": git_url, "task_description": "x", "tenant": "team-x"})).await;
    assert_eq!(c, 202, "{v}");
    let r = stack.record(v["task_id"].as_str().unwrap()).await;
    assert_eq!(r["limits"]["max_steps"], 5, "{r}");
    assert_eq!(r["limits"]["wall_seconds"], 600, "{r}");
    let done = stack.wait_terminal(v["task_id"].as_str().unwrap()).await;
    assert_eq!(done["status"], "COMPLETED", "{done}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_past_max_running_waits_queued_and_starts_in_turn() {
    let mut script = demo_script();
    // Each task takes about two seconds in the agent, so three overlap.
    script.delay_ms = 400;
    let quotas = r#"{"team-q": {"max_running": 2}}"#;
    let stack = Stack::start(Mode::Up, script, &[("PATCHFLOW_TENANTS", quotas)]).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let repo = demo_git_repo(stack.dir.path());
        let (c, v, _) = call(
            &stack.http,
            "POST",
            &format!("{}/api/tasks", stack.base),
            Some(json!({"git_url": format!("file://{}", repo.display()), "task_description": "fix", "tenant": "team-q"})),
        )
        .await;
        assert_eq!(c, 202, "{v}");
        ids.push(v["task_id"].as_str().unwrap().to_string());
    }
    // Sample until all end: never more than two past QUEUED at once, and once a third
    // waited in QUEUED while two ran.
    let mut saw_wait = false;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let mut statuses = Vec::new();
        for id in &ids {
            statuses.push(
                stack.record(id).await["status"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        let running = statuses
            .iter()
            .filter(|s| {
                !matches!(
                    s.as_str(),
                    "PENDING" | "QUEUED" | "COMPLETED" | "FAILED" | "CANCELLED"
                )
            })
            .count();
        assert!(running <= 2, "{statuses:?}");
        if running == 2 && statuses.iter().any(|s| s == "QUEUED") {
            saw_wait = true;
        }
        if statuses.iter().all(|s| s == "COMPLETED" || s == "FAILED") {
            assert!(statuses.iter().all(|s| s == "COMPLETED"), "{statuses:?}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{statuses:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(saw_wait, "no task ever waited for its tenant's slot");
    // The one that waited says so in its events.
    let mut waited = 0;
    for id in &ids {
        let (_, page, _) = call(
            &stack.http,
            "GET",
            &format!("{}/api/tasks/{id}/events", stack.base),
            None,
        )
        .await;
        if page.to_string().contains("max_running = 2") {
            waited += 1;
        }
    }
    assert!(waited >= 1, "no task said why it waited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_token_from_the_environment_is_the_admin_and_no_file_is_written() {
    let preset = format!("pf_{}", "b".repeat(43));
    let stack = Stack::start(
        Mode::Up,
        demo_script(),
        &[("PATCHFLOW_BOOTSTRAP_TOKEN", preset.as_str())],
    )
    .await;
    assert!(!stack.data_dir.join("admin.token").exists());
    assert!(stack.token.is_empty());
    let (c, who, _) = call(
        &http_with(Some(&preset)),
        "GET",
        &format!("{}/api/whoami", stack.base),
        None,
    )
    .await;
    assert_eq!(c, 200, "{who}");
    assert_eq!(who["role"], "admin");
    assert!(
        !stack.logs().contains(&preset),
        "the log shows the bootstrap token"
    );
    // The preset is the only token: none was generated beside it.
    let (c, v, _) = call(
        &http_with(Some(&preset)),
        "GET",
        &format!("{}/api/tokens", stack.base),
        None,
    )
    .await;
    assert_eq!(c, 200);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 1, "{v}");
}

/// `auth = "jwt"`: a provider-signed JWT names the tenant and role at the HTTP and gRPC
/// doors; a forged, expired or foreign-audience one is a 401; API tokens (the bootstrap
/// admin's) still work beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_of_an_oidc_provider_name_the_tenant_and_role_at_every_door() {
    use patchflow_gateway::grpc::proto;
    use patchflow_scripted_model::oidc::{AUDIENCE, ISSUER, TestIssuer};

    let idp = TestIssuer::start().await.unwrap();
    let jwks = idp.jwks_url();
    let stack = Stack::start(
        Mode::Up,
        demo_script(),
        &[
            ("PATCHFLOW_AUTH", "jwt"),
            ("PATCHFLOW_AUTH_JWT_JWKS_URL", &jwks),
            ("PATCHFLOW_AUTH_JWT_ISSUER", ISSUER),
            ("PATCHFLOW_AUTH_JWT_AUDIENCE", AUDIENCE),
        ],
    )
    .await;
    let member = idp.sign(&TestIssuer::claims("acme", "member", 600));
    let rival = idp.sign(&TestIssuer::claims("globex", "member", 600));
    let viewer = idp.sign(&TestIssuer::claims("acme", "viewer", 600));
    let (c, who, _) = call(
        &http_with(Some(&member)),
        "GET",
        &format!("{}/api/whoami", stack.base),
        None,
    )
    .await;
    assert_eq!(c, 200, "{who}");
    assert_eq!(
        who,
        json!({"tenant": "acme", "role": "member", "token_id": "jwt:user-of-acme"})
    );

    // Refused: forged, expired, another audience, an admin claim forged onto a viewer's
    // token, a tenant claim with a path in it.
    let mut wrong_aud = TestIssuer::claims("acme", "member", 600);
    wrong_aud["aud"] = json!("another-app");
    let mut bad_tenant = TestIssuer::claims("acme", "member", 600);
    bad_tenant["tenant"] = json!("../acme");
    for (what, token) in [
        (
            "forged",
            idp.forge(&TestIssuer::claims("acme", "admin", 600)),
        ),
        (
            "expired",
            idp.sign(&TestIssuer::claims("acme", "member", -3600)),
        ),
        ("audience", idp.sign(&wrong_aud)),
        ("tenant", idp.sign(&bad_tenant)),
    ] {
        let (c, v, www) = call(
            &http_with(Some(&token)),
            "GET",
            &format!("{}/api/tasks", stack.base),
            None,
        )
        .await;
        assert_eq!(c, 401, "{what}: {v}");
        assert!(www.unwrap_or_default().starts_with("Bearer"), "{what}");
    }

    // The member submits; the task is acme's.
    let repo = demo_git_repo(stack.dir.path());
    let body = json!({"git_url": format!("file://{}", repo.display()), "task_description": "fix"});
    let (c, _, _) = call(
        &http_with(Some(&viewer)),
        "POST",
        &format!("{}/api/tasks", stack.base),
        Some(body.clone()),
    )
    .await;
    assert_eq!(c, 403, "a viewer's JWT only reads");
    let (c, v, _) = call(
        &http_with(Some(&member)),
        "POST",
        &format!("{}/api/tasks", stack.base),
        Some(body),
    )
    .await;
    assert_eq!(c, 202, "{v}");
    let id = v["task_id"].as_str().unwrap().to_string();
    let (c, r, _) = call(
        &http_with(Some(&member)),
        "GET",
        &format!("{}/api/tasks/{id}", stack.base),
        None,
    )
    .await;
    assert_eq!((c, r["tenant"].as_str()), (200, Some("acme")), "{r}");
    // Another tenant's JWT: 404, and not in its list.
    let (c, _, _) = call(
        &http_with(Some(&rival)),
        "GET",
        &format!("{}/api/tasks/{id}", stack.base),
        None,
    )
    .await;
    assert_eq!(c, 404);
    let (_, list, _) = call(
        &http_with(Some(&rival)),
        "GET",
        &format!("{}/api/tasks", stack.base),
        None,
    )
    .await;
    assert!(!list.to_string().contains(&id), "{list}");
    // gRPC: the same tokens, the same answers.
    let got = stack
        .grpc_as(Some(&viewer))
        .await
        .get_task(proto::GetTaskRequest {
            task_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.task_id, id);
    let code = |r: Result<tonic::Response<proto::Task>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(
            stack
                .grpc_as(Some(&rival))
                .await
                .get_task(proto::GetTaskRequest {
                    task_id: id.clone()
                })
                .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            stack
                .grpc_as(Some(&idp.forge(&TestIssuer::claims("acme", "admin", 600))))
                .await
                .get_task(proto::GetTaskRequest {
                    task_id: id.clone()
                })
                .await
        ),
        Code::Unauthenticated
    );
    // The bootstrap admin token still works beside the JWTs, and sees acme's task.
    let (c, _, _) = call(
        &stack.http,
        "GET",
        &format!("{}/api/tasks/{id}", stack.base),
        None,
    )
    .await;
    assert_eq!(c, 200);
    assert_eq!(stack.wait_terminal(&id).await["status"], "COMPLETED");
    assert!(!stack.logs().contains(&member), "a JWT reached the log");
}
