//! Saved environments through the real stack: created, listed, shown, replaced and deleted
//! per tenant over HTTP, gRPC and the CLI; another tenant's is 404, a viewer only reads,
//! no token is 401; bad bodies are 400 naming the field; a secret's value is never in an
//! answer, the logs or the database; reset-cache starts the cache over and removes the
//! cached states (rows and objects); a task naming an unknown environment is refused.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use patchflow_gateway::grpc::proto;
use serde_json::{Value, json};
use tonic::Code;

use crate::support::{Mode, Stack, demo_git_repo, demo_script, http_with};

/// A value no other test or log line holds: if it shows up anywhere, it leaked.
const SECRET: &str = "s3cret-e2e-value-7f3c91d2";
const SECRET_2: &str = "rotated-e2e-value-0b5ae4";

async fn call(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    body: Option<Value>,
) -> (u16, String) {
    let mut req = match method {
        "POST" => http.post(url),
        "PUT" => http.put(url),
        "DELETE" => http.delete(url),
        _ => http.get(url),
    };
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.text().await.unwrap_or_default())
}

async fn call_json(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let (c, text) = call(http, method, url, body).await;
    (c, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn new_token(stack: &Stack, tenant: &str, role: &str) -> String {
    let (c, v) = stack
        .post_json(
            "/api/tokens",
            &json!({"tenant": tenant, "role": role, "name": format!("{role} of {tenant}")}),
        )
        .await;
    assert_eq!(c, 201, "{v}");
    v["token"].as_str().unwrap().to_string()
}

/// A refusal: its status, `code`, and a message naming `field`.
fn refused(c: u16, v: &Value, status: u16, code: &str, field: &str) {
    assert_eq!(c, status, "{v}");
    assert_eq!(v["code"], code, "{v}");
    let message = v["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(field),
        "{message:?} does not name {field:?}"
    );
}

fn py_env() -> Value {
    json!({
        "name": "py",
        "repo": "https://example.com/team-a/app.git",
        "setup_script": "pip install -r requirements.txt\n",
        "maintenance_script": "pip install -e .\n",
        "env": {"PIP_INDEX_URL": "https://pypi.org/simple"},
        "secrets": {"API_KEY": SECRET},
        "cache_paths": ["~/.cache/pip"],
    })
}

/// The database file (and its WAL) holds no plain `needle`.
fn database_lacks(stack: &Stack, needle: &str) {
    for entry in std::fs::read_dir(&stack.data_dir).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with("patchflow.db") {
            let bytes = std::fs::read(entry.path()).unwrap();
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{name} holds a secret in plain text"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_are_per_tenant_checked_and_never_show_their_secrets() {
    let stack = Stack::start(Mode::Up, demo_script(), &[]).await;
    let base = format!("{}/api/environments", stack.base);
    let member_a = http_with(Some(&new_token(&stack, "team-a", "member").await));
    let viewer_a = http_with(Some(&new_token(&stack, "team-a", "viewer").await));
    let member_b = http_with(Some(&new_token(&stack, "team-b", "member").await));

    // Create: 201 with the view; the secret's name only.
    let (c, text) = call(&member_a, "POST", &base, Some(py_env())).await;
    assert_eq!(c, 201, "{text}");
    assert!(
        !text.contains(SECRET),
        "the answer holds the secret: {text}"
    );
    let created: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(created["name"], "py");
    assert_eq!(created["secret_names"], json!(["API_KEY"]));
    assert_eq!(created["secrets_version"], 1);
    assert_eq!(created["cache_generation"], 0);
    assert_eq!(created["network"], "on");
    assert_eq!(created["cache"], true);
    assert_eq!(created["repo"], "https://example.com/team-a/app.git");
    assert_eq!(created["env"]["PIP_INDEX_URL"], "https://pypi.org/simple");
    assert!(created.get("secrets").is_none(), "{created}");
    chrono::DateTime::parse_from_rfc3339(created["created_at"].as_str().unwrap()).unwrap();

    // Twice: 409, nothing changed.
    let mut again = py_env();
    again["setup_script"] = json!("echo other");
    let (c, v) = call_json(&member_a, "POST", &base, Some(again)).await;
    refused(c, &v, 409, "already_exists", "py");

    // Read: list and show (a viewer may), never a value.
    let (c, text) = call(&viewer_a, "GET", &base, None).await;
    assert_eq!(c, 200, "{text}");
    assert!(!text.contains(SECRET));
    let listed: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(listed["environments"].as_array().unwrap().len(), 1);
    assert_eq!(listed["environments"][0], created);
    let (c, text) = call(&viewer_a, "GET", &format!("{base}/py"), None).await;
    assert_eq!(c, 200, "{text}");
    assert!(!text.contains(SECRET), "GET shows the secret: {text}");
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), created);

    // A viewer writes nothing.
    let mut node = py_env();
    node["name"] = json!("node");
    let (c, v) = call_json(&viewer_a, "POST", &base, Some(node.clone())).await;
    refused(c, &v, 403, "forbidden", "viewer");
    for (method, path) in [
        ("PUT", "/py"),
        ("DELETE", "/py"),
        ("POST", "/py/reset-cache"),
    ] {
        let body = (method == "PUT").then(py_env);
        let (c, v) = call_json(&viewer_a, method, &format!("{base}{path}"), body).await;
        assert_eq!(c, 403, "{method} {path}: {v}");
    }
    // No token (or a bad one): 401 at every route.
    for token in [None, Some("not-a-token")] {
        let anon = http_with(token);
        for (method, path) in [
            ("GET", ""),
            ("POST", ""),
            ("GET", "/py"),
            ("PUT", "/py"),
            ("DELETE", "/py"),
            ("POST", "/py/reset-cache"),
        ] {
            let (c, v) = call_json(&anon, method, &format!("{base}{path}"), None).await;
            assert_eq!(c, 401, "{method} {path} with {token:?}: {v}");
            assert_eq!(v["code"], "unauthenticated", "{v}");
        }
    }

    // Another tenant: its own (empty) list, and A's environment is 404 at every route.
    let (c, v) = call_json(&member_b, "GET", &base, None).await;
    assert_eq!(c, 200);
    assert_eq!(v["environments"], json!([]));
    for (method, path) in [
        ("GET", "/py"),
        ("PUT", "/py"),
        ("DELETE", "/py"),
        ("POST", "/py/reset-cache"),
    ] {
        let body = (method == "PUT").then(py_env);
        let (c, v) = call_json(&member_b, method, &format!("{base}{path}"), body).await;
        refused(c, &v, 404, "not_found", "team-b");
    }
    // A member naming another tenant is refused; B may have its own `py`.
    let (c, _) = call_json(&member_b, "GET", &format!("{base}/py?tenant=team-a"), None).await;
    assert_eq!(c, 403);
    let (c, v) = call_json(
        &member_b,
        "POST",
        &base,
        Some(json!({"name": "py", "setup_script": "npm ci"})),
    )
    .await;
    assert_eq!(c, 201, "{v}");
    assert_eq!(v["secret_names"], json!([]));
    // An admin reaches a tenant with `?tenant=`.
    let (c, v) = stack.get_json("/api/environments/py?tenant=team-a").await;
    assert_eq!(c, 200, "{v}");
    assert_eq!(v, created);

    // Bad bodies: 400 naming the field, nothing stored.
    let script_70k = "x".repeat(70 * 1024);
    let bad = [
        (
            json!({"name": "x", "setup_script": "x", "bogus": 1}),
            "bogus",
        ),
        (json!({"name": "../x", "setup_script": "x"}), "name"),
        (json!({"setup_script": "x"}), "name"),
        (
            json!({"name": "x", "setup_script": "x", "secrets": {"PATH": "v"}}),
            "secrets",
        ),
        (
            json!({"name": "x", "setup_script": script_70k}),
            "setup_script",
        ),
        (json!({"name": "x", "setup_script": "  "}), "setup_script"),
        (
            json!({"name": "x", "setup_script": "x", "network": "maybe"}),
            "maybe",
        ),
        (
            json!({"name": "x", "setup_script": "x", "env": {"LD_PRELOAD": "/x.so"}}),
            "env",
        ),
        (
            json!({"name": "x", "setup_script": "x", "cache_paths": ["/etc"]}),
            "cache_paths",
        ),
        (
            json!({"name": "x", "setup_script": "x", "network": "off", "allow_hosts": ["pypi.org"]}),
            "allow_hosts",
        ),
        (
            json!({"name": "x", "setup_script": "x", "allow_hosts": ["http://pypi.org"]}),
            "allow_hosts",
        ),
    ];
    for (body, field) in bad {
        let (c, v) = call_json(&member_a, "POST", &base, Some(body.clone())).await;
        refused(c, &v, 400, "invalid_request", field);
    }
    let (c, v) = call_json(&member_a, "GET", &base, None).await;
    assert_eq!(c, 200);
    assert_eq!(v["environments"].as_array().unwrap().len(), 1, "{v}");
    // Not JSON.
    let r = member_a
        .post(&base)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    // A PUT naming another name in its body, or to a bad name.
    let mut renamed = py_env();
    renamed["name"] = json!("other");
    let (c, v) = call_json(&member_a, "PUT", &format!("{base}/py"), Some(renamed)).await;
    refused(c, &v, 400, "invalid_request", "name");
    let (c, v) = call_json(&member_a, "GET", &format!("{base}/bad%20name"), None).await;
    refused(c, &v, 400, "invalid_request", "name");

    // PUT without `secrets`: the definition replaced, the secrets kept.
    let update = json!({
        "setup_script": "uv sync\n",
        "network": "off",
        "cache": false,
    });
    let (c, text) = call(&member_a, "PUT", &format!("{base}/py"), Some(update)).await;
    assert_eq!(c, 200, "{text}");
    let updated: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(updated["setup_script"], "uv sync\n");
    assert_eq!(updated["maintenance_script"], Value::Null);
    assert_eq!(updated["network"], "off");
    assert_eq!(updated["cache"], false);
    assert_eq!(updated["allow_hosts"], json!([]));
    assert_eq!(updated["secret_names"], json!(["API_KEY"]));
    assert_eq!(updated["secrets_version"], 1);
    assert_eq!(updated["created_at"], created["created_at"]);
    assert_eq!(updated["cache_generation"], 0);
    // The stored secret is the one sealed at create: it opens, in its context only.
    let store = patchflow_platform::db::open(&format!(
        "sqlite://{}/patchflow.db",
        stack.data_dir.display()
    ))
    .await
    .unwrap();
    let boxed = patchflow_platform::secret_box::SecretBox::load_or_create(
        &stack
            .data_dir
            .join(patchflow_platform::secret_box::KEY_FILE),
    )
    .unwrap();
    let ctx =
        |t: &str, n: &str, s: &str| patchflow_platform::secret_box::environment_context(t, n, s);
    let rec = store
        .get_environment("team-a", "py")
        .await
        .unwrap()
        .unwrap();
    let sealed = rec.secrets["API_KEY"].clone();
    assert!(!sealed.contains(SECRET));
    assert_eq!(
        boxed
            .open_in(&sealed, &ctx("team-a", "py", "API_KEY"))
            .unwrap()
            .expose(),
        SECRET
    );
    assert!(
        boxed
            .open_in(&sealed, &ctx("team-b", "py", "API_KEY"))
            .is_err()
    );
    // PUT with `secrets`: replaced, version bumped.
    let update = json!({
        "name": "py",
        "setup_script": "uv sync\n",
        "secrets": {"API_KEY": SECRET_2, "PYPI_TOKEN": SECRET},
    });
    let (c, text) = call(&member_a, "PUT", &format!("{base}/py"), Some(update)).await;
    assert_eq!(c, 200, "{text}");
    assert!(!text.contains(SECRET) && !text.contains(SECRET_2));
    let updated: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(updated["secret_names"], json!(["API_KEY", "PYPI_TOKEN"]));
    assert_eq!(updated["secrets_version"], 2);
    let rec = store
        .get_environment("team-a", "py")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        boxed
            .open_in(&rec.secrets["API_KEY"], &ctx("team-a", "py", "API_KEY"))
            .unwrap()
            .expose(),
        SECRET_2
    );
    // Sealed per secret: one secret's value does not open as another's.
    assert!(
        boxed
            .open_in(&rec.secrets["PYPI_TOKEN"], &ctx("team-a", "py", "API_KEY"))
            .is_err()
    );
    // A PUT of an environment that is not there does not create it.
    let (c, v) = call_json(
        &member_a,
        "PUT",
        &format!("{base}/nope"),
        Some(json!({"setup_script": "x"})),
    )
    .await;
    refused(c, &v, 404, "not_found", "nope");

    // Reset-cache: a new generation; this environment's cached states go (rows and
    // objects), another environment's and another tenant's stay.
    let objects = stack.data_dir.join("objects");
    let now = chrono::Utc::now();
    for (tenant, key, env) in [
        ("team-a", "k-py-1", Some("py")),
        ("team-a", "k-py-2", Some("py")),
        ("team-a", "k-inline", None),
        ("team-b", "k-py-b", Some("py")),
    ] {
        store
            .env_cache_put(&patchflow_core::environment::EnvCacheEntry {
                tenant: tenant.into(),
                key: key.into(),
                environment: env.map(str::to_string),
                bytes: 3,
                created_at: now,
                last_used_at: now,
            })
            .await
            .unwrap();
        let path = objects.join(patchflow_core::environment::cache_object_key(tenant, key));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"zst").unwrap();
    }
    let object = |t: &str, k: &str| {
        objects
            .join(patchflow_core::environment::cache_object_key(t, k))
            .exists()
    };
    let (c, v) = call_json(&member_a, "POST", &format!("{base}/py/reset-cache"), None).await;
    assert_eq!(c, 200, "{v}");
    assert_eq!(
        v,
        json!({"name": "py", "cache_generation": 1, "removed": 2})
    );
    assert!(!object("team-a", "k-py-1") && !object("team-a", "k-py-2"));
    assert!(object("team-a", "k-inline") && object("team-b", "k-py-b"));
    let left: Vec<String> = store
        .env_cache_list("team-a")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.key)
        .collect();
    assert_eq!(left, ["k-inline"]);
    assert_eq!(store.env_cache_list("team-b").await.unwrap().len(), 1);
    let (c, v) = call_json(&member_a, "GET", &format!("{base}/py"), None).await;
    assert_eq!(c, 200);
    assert_eq!(v["cache_generation"], 1);
    assert_eq!(v["secrets_version"], 2);

    // A task naming an environment its tenant lacks is refused before anything starts.
    let repo = demo_git_repo(stack.dir.path());
    let git_url = format!("file://{}", repo.display());
    let (c, v) = call_json(
        &member_b,
        "POST",
        &format!("{}/api/tasks", stack.base),
        Some(json!({"git_url": git_url, "task_description": "fix", "environment": "node"})),
    )
    .await;
    refused(c, &v, 400, "invalid_request", "environment");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("no environment `node` in tenant `team-b`"),
        "{v}"
    );
    let (c, v) = call_json(&member_b, "GET", &format!("{}/api/tasks", stack.base), None).await;
    assert_eq!(c, 200);
    assert_eq!(v["tasks"], json!([]), "a refused task was stored");

    // Delete: 204, then 404; the name is free again.
    let (c, _) = call(&member_a, "DELETE", &format!("{base}/py"), None).await;
    assert_eq!(c, 204);
    let (c, v) = call_json(&member_a, "GET", &format!("{base}/py"), None).await;
    refused(c, &v, 404, "not_found", "py");
    let (c, v) = call_json(&member_a, "DELETE", &format!("{base}/py"), None).await;
    refused(c, &v, 404, "not_found", "py");
    let (c, v) = call_json(&member_b, "GET", &format!("{base}/py"), None).await;
    assert_eq!(c, 200, "B's `py` went with A's: {v}");

    // The value is nowhere: not in the logs, not in the database in plain text.
    let logs = stack.logs();
    for s in [SECRET, SECRET_2] {
        assert!(!logs.contains(s), "the logs hold a secret");
        database_lacks(&stack, s);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_and_grpc_manage_environments_without_exposing_secrets() {
    let stack = Stack::start(Mode::Up, demo_script(), &[]).await;
    let member = new_token(&stack, "team-c", "member").await;
    let script = stack.dir.path().join("setup.sh");
    std::fs::write(&script, "pip install -r requirements.txt\n").unwrap();
    let script = script.display().to_string();
    let run = |args: &[&str]| {
        let out = stack
            .command(args)
            .env("PATCHFLOW_TOKEN", &member)
            .env("PATCHFLOW_SERVER", &stack.base)
            .env("MY_CI_SECRET", SECRET)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };

    // create, with a secret read from the CLI's environment.
    let (ok, out, err) = run(&[
        "env",
        "create",
        "py",
        "--setup-script",
        &script,
        "--env",
        "MODE=ci",
        "--secret-env",
        "API_KEY=MY_CI_SECRET",
        "--cache-path",
        "~/.cache/pip",
        "--repo",
        "https://example.com/c.git",
    ]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "py");
    assert!(err.contains("API_KEY"), "{err}");
    // Created in the token's tenant, with the secret sealed.
    let (c, v) = stack.get_json("/api/environments/py?tenant=team-c").await;
    assert_eq!(c, 200, "{v}");
    assert_eq!(v["secret_names"], json!(["API_KEY"]));
    assert_eq!(v["env"]["MODE"], "ci");
    // A missing variable, a duplicate and a bad name: clear refusals.
    let (ok, _, err) = run(&[
        "env",
        "create",
        "other",
        "--setup-script",
        &script,
        "--secret-env",
        "NOPE_NOT_SET_VAR",
    ]);
    assert!(!ok && err.contains("NOPE_NOT_SET_VAR"), "{err}");
    let (ok, _, err) = run(&["env", "create", "py", "--setup-script", &script]);
    assert!(
        !ok && err.contains("already") && err.contains("409"),
        "{err}"
    );
    let (ok, _, err) = run(&["env", "create", "bad/name", "--setup-script", &script]);
    assert!(!ok && err.contains("name") && err.contains("400"), "{err}");

    // list and show: names, never the value.
    let (ok, out, err) = run(&["env", "list"]);
    assert!(ok, "{err}");
    assert!(out.lines().any(|l| l.starts_with("py ")), "{out}");
    assert!(!out.contains(SECRET));
    let (ok, out, err) = run(&["env", "show", "py"]);
    assert!(ok, "{err}");
    assert!(!out.contains(SECRET), "{out}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["name"], "py");
    assert_eq!(shown["secret_names"], json!(["API_KEY"]));
    assert_eq!(shown["allow_hosts"], json!([]));
    // update keeps the secrets unless told; reset-cache.
    let (ok, _, err) = run(&[
        "env",
        "update",
        "py",
        "--setup-script",
        &script,
        "--network",
        "off",
        "--no-cache",
    ]);
    assert!(ok, "{err}");
    let (_, out, _) = run(&["env", "show", "py"]);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["network"], "off");
    assert_eq!(shown["secret_names"], json!(["API_KEY"]));
    assert_eq!(shown["secrets_version"], 1);
    let (ok, out, err) = run(&["env", "reset-cache", "py"]);
    assert!(ok, "{err}");
    assert!(out.contains("generation 1"), "{out}");
    // delete, then show is a clear 404.
    let (ok, _, err) = run(&["env", "delete", "py"]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["env", "show", "py"]);
    assert!(
        !ok && err.contains("no environment `py` in tenant `team-c`") && err.contains("404"),
        "{err}"
    );

    // gRPC: the same operations and refusals.
    let mut grpc = stack.grpc_as(Some(&member)).await;
    let definition = proto::EnvironmentDefinition {
        name: "node".into(),
        setup_script: "npm ci".into(),
        secrets: [("NPM_TOKEN".to_string(), SECRET.to_string())].into(),
        ..Default::default()
    };
    let made = grpc
        .create_environment(proto::CreateEnvironmentRequest {
            environment: Some(definition.clone()),
            tenant: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(made.secret_names, ["NPM_TOKEN"]);
    assert_eq!(made.network, "on");
    assert!(!format!("{made:?}").contains(SECRET));
    let code = grpc
        .create_environment(proto::CreateEnvironmentRequest {
            environment: Some(definition.clone()),
            tenant: None,
        })
        .await
        .unwrap_err()
        .code();
    assert_eq!(code, Code::AlreadyExists);
    let bad = proto::EnvironmentDefinition {
        name: "x".into(),
        setup_script: "x".into(),
        secrets: [("PATH".to_string(), "v".to_string())].into(),
        ..Default::default()
    };
    let e = grpc
        .create_environment(proto::CreateEnvironmentRequest {
            environment: Some(bad),
            tenant: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("secrets"), "{}", e.message());
    let listed = grpc
        .list_environments(proto::ListEnvironmentsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.environments.len(), 1);
    // Update without secrets keeps them; with replace_secrets and an empty map clears them.
    let kept = grpc
        .update_environment(proto::UpdateEnvironmentRequest {
            name: "node".into(),
            environment: Some(proto::EnvironmentDefinition {
                setup_script: "npm ci --offline".into(),
                ..Default::default()
            }),
            replace_secrets: false,
            tenant: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (kept.secret_names.clone(), kept.secrets_version),
        (vec!["NPM_TOKEN".to_string()], 1)
    );
    let cleared = grpc
        .update_environment(proto::UpdateEnvironmentRequest {
            name: "node".into(),
            environment: Some(proto::EnvironmentDefinition {
                setup_script: "npm ci".into(),
                ..Default::default()
            }),
            replace_secrets: true,
            tenant: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(cleared.secret_names.is_empty());
    assert_eq!(cleared.secrets_version, 2);
    let reset = grpc
        .reset_environment_cache(proto::ResetEnvironmentCacheRequest {
            name: "node".into(),
            tenant: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reset.cache_generation, reset.removed), (1, 0));
    // Another tenant's is NOT_FOUND; a viewer may not write; no token is UNAUTHENTICATED.
    let mut other = stack
        .grpc_as(Some(&new_token(&stack, "team-d", "member").await))
        .await;
    let code = other
        .get_environment(proto::GetEnvironmentRequest {
            name: "node".into(),
            tenant: None,
        })
        .await
        .unwrap_err()
        .code();
    assert_eq!(code, Code::NotFound);
    let mut viewer = stack
        .grpc_as(Some(&new_token(&stack, "team-c", "viewer").await))
        .await;
    viewer
        .get_environment(proto::GetEnvironmentRequest {
            name: "node".into(),
            tenant: None,
        })
        .await
        .unwrap();
    let code = viewer
        .delete_environment(proto::DeleteEnvironmentRequest {
            name: "node".into(),
            tenant: None,
        })
        .await
        .unwrap_err()
        .code();
    assert_eq!(code, Code::PermissionDenied);
    let mut anon = stack.grpc_as(None).await;
    let code = anon
        .list_environments(proto::ListEnvironmentsRequest::default())
        .await
        .unwrap_err()
        .code();
    assert_eq!(code, Code::Unauthenticated);
    grpc.delete_environment(proto::DeleteEnvironmentRequest {
        name: "node".into(),
        tenant: None,
    })
    .await
    .unwrap();
    let code = grpc
        .get_environment(proto::GetEnvironmentRequest {
            name: "node".into(),
            tenant: None,
        })
        .await
        .unwrap_err()
        .code();
    assert_eq!(code, Code::NotFound);

    assert!(!stack.logs().contains(SECRET), "the logs hold a secret");
    database_lacks(&stack, SECRET);
}
