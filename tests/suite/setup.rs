//! Environments through the real binary: a Python repository whose tests import a package
//! from PyPI that the machine does not have is set up by its setup script (network on, in
//! the sandbox), the agent then runs the tests offline and they pass, and the diff holds
//! only the fix. The same repository again hits the cache (setup skipped, maintenance
//! run); a changed lockfile or setup script misses. A failing setup fails the task with
//! its exit code and output; an environment's secret reaches its setup only, redacted
//! everywhere; the cache is shared by workers through S3; `cargo test` runs on the
//! machine's rustup.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use patchflow_core::TaskStatus;
use patchflow_scripted_model::Script;
use serde_json::{Value, json};

use crate::support::{Database, Mode, S3Server, Stack, TestDatabase};

/// A package the machine's Python does not have (checked by the test), pinned.
const PACKAGE: &str = "humanize==4.9.0";

const SETUP: &str = "python3 -m venv .venv\n.venv/bin/pip install --disable-pip-version-check -q -r requirements.txt\necho installed-ok";

/// Fixes `add`, runs the tests with the prepared virtualenv, checks that the agent phase
/// has neither network nor the setup's secret, and finishes.
fn python_script() -> Script {
    Script::from_json(
        &json!({"turns": [
            {"tool_calls": [{"name": "edit_file_content", "arguments": {"file_path": "app.py", "old_text": "return a - b", "new_text": "return a + b"}}]},
            {"expect_in_tool_results": ["\"replaced\":1"],
             "tool_calls": [{"name": "run_shell_command", "arguments": {"command_string": ".venv/bin/python -m unittest -v 2>&1", "timeout_seconds": 60}}]},
            {"expect_in_tool_results": ["\"exit_code\":0", "OK", "test_pretty"],
             "tool_calls": [{"name": "run_shell_command", "arguments": {"command_string": "echo \"token=[${API_TOKEN:-}]\"; .venv/bin/python -c \"import socket; socket.create_connection(('pypi.org', 443), timeout=5)\"", "timeout_seconds": 30}}]},
            {"expect_in_tool_results": ["token=[]", "\"exit_code\":1"],
             "tool_calls": [{"name": "finish", "arguments": {"summary": "Fixed add(); the tests pass."}}]}
        ]})
        .to_string(),
    )
    .unwrap()
}

fn git(repo: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["-c", "user.name=t", "-c", "user.email=t@localhost"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A committed Python repository: `add` is wrong, `pretty` needs the PyPI package.
fn python_repo(dir: &Path, name: &str, extra: &[(&str, &str)]) -> PathBuf {
    let repo = dir.join(name);
    std::fs::create_dir_all(&repo).unwrap();
    let files = [
        (
            "app.py",
            "import humanize\n\n\ndef add(a, b):\n    return a - b\n\n\ndef pretty(n):\n    return humanize.intcomma(n)\n",
        ),
        (
            "test_app.py",
            "import unittest\n\nfrom app import add, pretty\n\n\nclass T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(add(2, 3), 5)\n\n    def test_pretty(self):\n        self.assertEqual(pretty(1234567), \"1,234,567\")\n",
        ),
        ("requirements.txt", &format!("{PACKAGE}\n")),
    ];
    for (f, text) in files
        .iter()
        .map(|(f, t)| (*f, *t))
        .chain(extra.iter().copied())
    {
        let path = repo.join(f);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-qm", "app"]);
    repo
}

async fn submit(stack: &Stack, body: Value) -> String {
    let (status, v) = stack.post_json("/api/tasks", &body).await;
    assert_eq!(status, 202, "{v}");
    v["task_id"].as_str().unwrap().to_string()
}

fn task(repo: &Path, setup: Option<Value>) -> Value {
    let mut body =
        json!({"git_url": format!("file://{}", repo.display()), "task_description": "fix add"});
    if let Some(s) = setup {
        body["setup"] = s;
    }
    body
}

async fn messages(stack: &Stack, id: &str) -> Vec<String> {
    stack
        .events(id)
        .await
        .into_iter()
        .map(|e| e.message)
        .collect()
}

/// The event that starts with `prefix`, if any.
fn find<'a>(events: &'a [String], prefix: &str) -> Option<&'a String> {
    events.iter().find(|m| m.starts_with(prefix))
}

/// The prepared-in time the step reported, in ms.
fn prepared_ms(events: &[String]) -> u64 {
    let e = find(events, "environment prepared in ").expect("the step reports its time");
    e["environment prepared in ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

async fn wait_completed(stack: &Stack, id: &str) -> Value {
    let r = stack
        .wait_for(id, Duration::from_secs(300), TaskStatus::is_terminal)
        .await;
    assert_eq!(
        r["status"],
        "COMPLETED",
        "{r}\n{:#?}\n{}",
        messages(stack, id).await,
        stack.logs()
    );
    r
}

async fn assert_only_the_fix(stack: &Stack, id: &str) {
    let (status, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert_eq!(status, 200);
    assert!(diff.contains("+    return a + b"), "{diff}");
    assert!(
        !diff.contains(".venv") && !diff.contains("site-packages"),
        "setup's products are not the agent's change: {diff}"
    );
    let r = stack.record(id).await;
    assert_eq!(r["summary"]["files_changed"], json!(["app.py"]), "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_setup_installs_from_pypi_once_and_the_cache_skips_it_after() {
    let missing = Command::new("python3")
        .args(["-c", "import humanize"])
        .output()
        .unwrap();
    assert!(
        !missing.status.success(),
        "the machine must not have the package already"
    );
    let stack = Stack::start(Mode::Up, python_script(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = python_repo(dir.path(), "py", &[]);
    let setup = json!({"setup_script": SETUP, "maintenance_script": "echo maintenance-ran; test -x .venv/bin/python", "cache_paths": ["~/.cache/pip"]});

    // Cold: the setup runs with network, the agent phase is offline and the tests pass.
    let cold = submit(&stack, task(&repo, Some(setup.clone()))).await;
    wait_completed(&stack, &cold).await;
    let events = messages(&stack, &cold).await;
    let miss = find(&events, "environment cache miss ").expect("a miss first");
    let key = miss.rsplit(' ').next().unwrap().to_string();
    assert_eq!(key.len(), 64, "{miss}");
    assert!(
        find(&events, "setup: installed-ok").is_some(),
        "the script's output is streamed: {events:#?}"
    );
    assert!(find(&events, "maintenance:").is_none());
    use TaskStatus::*;
    assert_eq!(
        stack.statuses(&cold).await,
        [
            Pending,
            Queued,
            DownloadingCode,
            StagingCode,
            PreparingEnvironment,
            RunningAgent,
            UploadingResults,
            Completed
        ]
    );
    assert_only_the_fix(&stack, &cold).await;
    let cold_ms = prepared_ms(&events);

    // Again: a hit. Setup does not run, maintenance does, the tests still pass.
    let warm = submit(&stack, task(&repo, Some(setup.clone()))).await;
    wait_completed(&stack, &warm).await;
    let events = messages(&stack, &warm).await;
    assert_eq!(
        find(&events, "environment cache hit ").map(String::as_str),
        Some(format!("environment cache hit {key}").as_str()),
        "{events:#?}"
    );
    assert!(find(&events, "setup:").is_none(), "{events:#?}");
    assert!(
        find(&events, "maintenance: maintenance-ran").is_some(),
        "{events:#?}"
    );
    assert_only_the_fix(&stack, &warm).await;
    let warm_ms = prepared_ms(&events);
    eprintln!("PREPARING_ENVIRONMENT: cold {cold_ms} ms, cache hit {warm_ms} ms");

    // A changed lockfile misses.
    std::fs::write(repo.join("requirements.txt"), "humanize==4.8.0\n").unwrap();
    git(&repo, &["commit", "-qam", "older humanize"]);
    let changed = submit(&stack, task(&repo, Some(setup.clone()))).await;
    wait_completed(&stack, &changed).await;
    let events = messages(&stack, &changed).await;
    let other = find(&events, "environment cache miss ").expect("a new lockfile misses");
    assert!(!other.ends_with(&key));

    // So does a changed setup script; and `cache: false` neither reads nor writes it.
    let mut edited = setup.clone();
    edited["setup_script"] = json!(format!("{SETUP}\necho edited"));
    let id = submit(&stack, task(&repo, Some(edited))).await;
    wait_completed(&stack, &id).await;
    let events = messages(&stack, &id).await;
    assert!(
        find(&events, "environment cache miss ").is_some(),
        "{events:#?}"
    );
    let mut off = setup.clone();
    off["cache"] = json!(false);
    let id = submit(&stack, task(&repo, Some(off))).await;
    wait_completed(&stack, &id).await;
    let events = messages(&stack, &id).await;
    assert!(find(&events, "environment cache").is_none(), "{events:#?}");
    assert!(find(&events, "setup: installed-ok").is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_setups_fail_the_task_and_secrets_reach_only_the_setup_redacted() {
    let stack = Stack::start(Mode::Up, python_script(), &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = python_repo(dir.path(), "py", &[]);

    // A failing script: FAILED with its exit code and the tail of its output, no agent.
    let failing = json!({"setup_script": "echo preparing\necho 'pip: no matching distribution' >&2\nexit 7\necho never"});
    let id = submit(&stack, task(&repo, Some(failing))).await;
    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "FAILED", "{r}");
    let msg = r["message"].as_str().unwrap();
    assert!(msg.contains("exited with code 7"), "{msg}");
    assert!(msg.contains("pip: no matching distribution"), "{msg}");
    assert!(!msg.contains("never"), "{msg}");
    assert!(
        !stack
            .statuses(&id)
            .await
            .contains(&TaskStatus::RunningAgent),
        "the agent never ran"
    );
    assert_eq!(stack.model.observed().requests, 0);

    // A bad inline setup is refused at the door, with the field.
    for (bad, field) in [
        (json!({"setup_script": ""}), "setup.setup_script"),
        (
            json!({"setup_script": "x", "env": {"LD_PRELOAD": "/x.so"}}),
            "setup.env",
        ),
        (
            json!({"setup_script": "x", "cache_paths": ["/etc"]}),
            "setup.cache_paths",
        ),
        (
            json!({"setup_script": "x", "allow_hosts": ["https://pypi.org"]}),
            "setup.allow_hosts",
        ),
        (
            json!({"setup_script": "x", "network": "off", "allow_hosts": ["pypi.org"]}),
            "setup.allow_hosts",
        ),
        (
            json!({"setup_script": "x", "network": "sometimes"}),
            "sometimes",
        ),
        (
            json!({"setup_script": "x", "run_as_root": true}),
            "run_as_root",
        ),
    ] {
        let (status, v) = stack
            .post_json("/api/tasks", &task(&repo, Some(bad.clone())))
            .await;
        assert_eq!(status, 400, "{bad}: {v}");
        assert!(v.to_string().contains(field), "{bad}: {v}");
    }

    // A saved environment with a secret: its setup sees it, its output shows `***`, the
    // agent's shell has nothing of it, and it is nowhere in the events, logs or history.
    let secret = "sk-live-9f8e7d6c5b4a-setup-only";
    let (status, v) = stack
        .post_json(
            "/api/environments",
            &json!({
                "name": "py",
                "setup_script": format!("{SETUP}\necho \"token is $API_TOKEN\"\ntest \"$API_TOKEN\" = '{secret}'"),
                "secrets": {"API_TOKEN": secret},
                "cache_paths": ["~/.cache/pip"],
            }),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let mut body = task(&repo, None);
    body["environment"] = json!("py");
    let id = submit(&stack, body).await;
    wait_completed(&stack, &id).await;
    let events = messages(&stack, &id).await;
    assert!(
        find(&events, "setup: token is ***").is_some(),
        "{events:#?}"
    );
    assert!(!events.iter().any(|m| m.contains(secret)));
    assert!(!stack.logs().contains(secret), "the secret is in the logs");
    assert!(
        !crate::support::history_text(&stack.history(&id)).contains(secret),
        "the secret is in the workflow history"
    );
    assert_only_the_fix(&stack, &id).await;

    // allow_hosts: the install reaches PyPI through the egress proxy; any other host, and
    // any address directly, is refused.
    let fenced = json!({
        "setup_script": format!("{SETUP}\n\
            if python3 -c \"import urllib.request; urllib.request.urlopen('https://example.com', timeout=10)\" 2>err.txt; then echo REACHED-OTHER-HOST; fi\n\
            grep -o 'not in allow_hosts' err.txt || true\n\
            rm err.txt\n\
            if python3 -c \"import socket; socket.create_connection(('1.1.1.1', 443), timeout=5)\" 2>/dev/null; then echo REACHED-DIRECT; else echo direct-refused; fi"),
        "allow_hosts": ["pypi.org", "files.pythonhosted.org"],
        "cache": false,
    });
    let id = submit(&stack, task(&repo, Some(fenced))).await;
    wait_completed(&stack, &id).await;
    let events = messages(&stack, &id).await;
    assert!(
        find(
            &events,
            "running the setup script (network only to pypi.org, files.pythonhosted.org)"
        )
        .is_some(),
        "{events:#?}"
    );
    assert!(
        find(&events, "setup: installed-ok").is_some(),
        "{events:#?}"
    );
    assert!(
        find(&events, "setup: not in allow_hosts").is_some(),
        "{events:#?}"
    );
    assert!(
        find(&events, "setup: direct-refused").is_some(),
        "{events:#?}"
    );
    assert!(!events.iter().any(|m| m.contains("REACHED")), "{events:#?}");
    assert_only_the_fix(&stack, &id).await;

    // The repository's own .patchflow/setup.sh, with no setup in the task.
    let own = python_repo(
        dir.path(),
        "own",
        &[(
            ".patchflow/setup.sh",
            &format!("echo repo-setup\n{SETUP}\n"),
        )],
    );
    let id = submit(&stack, task(&own, None)).await;
    wait_completed(&stack, &id).await;
    let events = messages(&stack, &id).await;
    assert!(find(&events, "setup: repo-setup").is_some(), "{events:#?}");
    assert_only_the_fix(&stack, &id).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_environment_cache_is_shared_by_workers_through_s3() {
    let aux = tempfile::tempdir().unwrap();
    let db = TestDatabase::create(Database::Postgres, aux.path());
    let s3 = S3Server::start(aux.path());
    let bucket = s3.url("patchflow-envcache");
    let env = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("PATCHFLOW_DATABASE_URL", db.url.as_str()),
        ("PATCHFLOW_OBJECT_STORE_URL", bucket.as_str()),
    ];
    let mut stack = Stack::start(Mode::Split, python_script(), &env).await;
    let repo = python_repo(aux.path(), "py", &[]);
    let setup = json!({"setup_script": SETUP});
    let first = submit(&stack, task(&repo, Some(setup.clone()))).await;
    wait_completed(&stack, &first).await;
    let events = messages(&stack, &first).await;
    let key = find(&events, "environment cache miss ")
        .unwrap()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string();
    assert!(
        find(&events, "environment cached: ")
            .is_some_and(|m| m.ends_with(&format!("as envcache/default/{key}.tar.zst"))),
        "{events:#?}"
    );

    // The first worker goes; another, with a data dir of its own, takes the next task.
    stack.workers[0].terminate();
    let other = aux.path().join("other-worker");
    let other = other.display().to_string();
    let w = stack.spawn_patchflow_with("worker-2", &["worker"], &[("PATCHFLOW_DATA_DIR", &other)]);
    stack.workers.push(w);
    let second = submit(&stack, task(&repo, Some(setup))).await;
    wait_completed(&stack, &second).await;
    let events = messages(&stack, &second).await;
    assert_eq!(
        find(&events, "environment cache hit ").map(String::as_str),
        Some(format!("environment cache hit {key}").as_str()),
        "{events:#?}"
    );
    assert_only_the_fix(&stack, &second).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cargo_test_runs_in_the_sandbox_on_the_machines_rustup() {
    let script = Script::from_json(
        &json!({"turns": [
            {"tool_calls": [{"name": "edit_file_content", "arguments": {"file_path": "src/lib.rs", "old_text": "a - b", "new_text": "a + b"}}]},
            {"expect_in_tool_results": ["\"replaced\":1"],
             "tool_calls": [{"name": "run_shell_command", "arguments": {"command_string": "cargo test --offline 2>&1", "timeout_seconds": 300}}]},
            {"expect_in_tool_results": ["\"exit_code\":0", "test result: ok. 1 passed"],
             "tool_calls": [{"name": "finish", "arguments": {"summary": "fixed"}}]}
        ]})
        .to_string(),
    )
    .unwrap();
    let stack = Stack::start(Mode::Up, script, &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("crate");
    std::fs::create_dir_all(repo.join("src")).unwrap();
    std::fs::write(
        repo.join("Cargo.toml"),
        "[package]\nname = \"adder\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    )
    .unwrap();
    std::fs::write(
        repo.join("src/lib.rs"),
        "pub fn add(a: i32, b: i32) -> i32 {\n    a - b\n}\n\n#[test]\nfn adds() {\n    assert_eq!(add(2, 3), 5);\n}\n",
    )
    .unwrap();
    std::fs::write(repo.join(".gitignore"), "/target\n").unwrap();
    // The lockfile cargo would otherwise write during the test (and the diff would show).
    let lock = Command::new("cargo")
        .args(["generate-lockfile", "--offline"])
        .current_dir(&repo)
        .output()
        .unwrap();
    assert!(
        lock.status.success(),
        "{}",
        String::from_utf8_lossy(&lock.stderr)
    );
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-qm", "crate"]);
    let id = submit(
        &stack,
        json!({"git_url": format!("file://{}", repo.display()), "task_description": "fix add"}),
    )
    .await;
    let r = wait_completed(&stack, &id).await;
    assert_eq!(r["summary"]["files_changed"], json!(["src/lib.rs"]), "{r}");
}
