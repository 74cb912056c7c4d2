//! The HTTP API's contract on bad input: each refusal has the right status, a `{code,
//! message}` body that says what is wrong, and leaves nothing behind.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use serde_json::{Value, json};

use crate::support::{Mode, Stack, demo_git_repo, demo_script};

fn zip_bytes(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    {
        let mut w = zip::ZipWriter::new(&mut buf);
        for (name, body) in entries {
            w.start_file(
                *name,
                zip::write::SimpleFileOptions::default()
                    .compression_method(zip::CompressionMethod::Stored),
            )
            .unwrap();
            w.write_all(body).unwrap();
        }
        w.finish().unwrap();
    }
    buf.into_inner()
}

async fn post_zip(stack: &Stack, zip: Vec<u8>, description: &str) -> (u16, Value) {
    let form = reqwest::multipart::Form::new()
        .text("task_description", description.to_string())
        .part(
            "zip_file",
            reqwest::multipart::Part::bytes(zip).file_name("src.zip"),
        );
    let r = stack
        .http
        .post(format!("{}/api/tasks", stack.base))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap_or(Value::Null))
}

fn assert_error(code: u16, body: &Value, want_code: u16, want: &str, contains: &str) {
    assert_eq!(code, want_code, "{body}");
    assert_eq!(body["code"], want, "{body}");
    let msg = body["message"].as_str().unwrap_or_default();
    assert!(msg.contains(contains), "message {msg:?} lacks {contains:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_store_nothing() {
    let stack = Stack::start(
        Mode::Up,
        demo_script(),
        &[("PATCHFLOW_MAX_UPLOAD_BYTES", "65536")],
    )
    .await;

    let (c, b) = stack
        .get_json("/api/tasks/tsk_00000000000000000000000000000000")
        .await;
    assert_error(
        c,
        &b,
        404,
        "not_found",
        "task tsk_00000000000000000000000000000000 not found",
    );
    let (c, b) = stack.get_json("/api/tasks/bad!id").await;
    assert_error(c, &b, 400, "invalid_request", "is not a task id");
    let (c, b) = stack.post_json("/api/tasks", &json!({})).await;
    assert_error(c, &b, 400, "invalid_request", "a source is required");
    let (c, b) = stack
        .post_json(
            "/api/tasks",
            &json!({"git_url": "https://example.com/r.git"}),
        )
        .await;
    assert_error(c, &b, 400, "invalid_request", "task_description");
    let (c, b) = stack.post_json("/api/tasks", &json!({"git_url": "https://example.com/r.git", "task_description": "x", "descripton": "typo"})).await;
    assert_error(c, &b, 400, "invalid_request", "unknown field `descripton`");
    let (c, b) = stack
        .post_json(
            "/api/tasks",
            &json!({"git_url": "ftp://example.com/r", "task_description": "x"}),
        )
        .await;
    assert_error(c, &b, 400, "invalid_request", "git_url");
    let (c, b) = stack.post_json("/api/tasks", &json!({"git_url": "https://example.com/r.git", "task_description": "x", "limits": {"max_steps": 0}})).await;
    assert_error(c, &b, 400, "invalid_request", "limits.max_steps");
    let (c, b) = stack.post_json("/api/tasks", &json!({"git_url": "https://example.com/r.git", "task_description": "x", "open_pr": true, "pr_branch": "main/../../x"})).await;
    assert_error(c, &b, 400, "invalid_request", "pr_branch");
    let r = stack
        .http
        .post(format!("{}/api/tasks", stack.base))
        .header("content-type", "text/plain")
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 415);
    let (c, b) = stack.get_json("/api/tasks?status=BOGUS").await;
    assert_error(c, &b, 400, "invalid_request", "unknown status `BOGUS`");
    let (c, b) = stack.get_json("/api/nothing-here").await;
    assert_error(c, &b, 404, "not_found", "no such route");

    // A ZIP trying to escape is refused at the door: no task, nothing stored or written.
    let evil = zip_bytes(&[
        ("ok.py", b"print(1)\n"),
        ("../../escaped-by-zip.txt", b"gotcha"),
    ]);
    let (c, b) = post_zip(&stack, evil, "x").await;
    assert_error(
        c,
        &b,
        400,
        "invalid_request",
        "`../../escaped-by-zip.txt` points outside",
    );
    // Over the upload limit: 413.
    let big = zip_bytes(&[("big.bin", &vec![7u8; 100_000])]);
    let (c, b) = post_zip(&stack, big, "x").await;
    assert_error(c, &b, 413, "payload_too_large", "larger than 65536 bytes");
    let junk = b"this is not a zip".to_vec();
    let (c, b) = post_zip(&stack, junk, "x").await;
    assert_error(c, &b, 400, "invalid_request", "not a valid ZIP");
    // A pull request needs a remote to push to: not with a ZIP.
    let form = reqwest::multipart::Form::new()
        .text("task_description", "x")
        .text("open_pr", "true")
        .part(
            "zip_file",
            reqwest::multipart::Part::bytes(zip_bytes(&[("ok.py", b"1\n")])).file_name("a.zip"),
        );
    let r = stack
        .http
        .post(format!("{}/api/tasks", stack.base))
        .multipart(form)
        .send()
        .await
        .unwrap();
    let code = r.status().as_u16();
    let b: Value = r.json().await.unwrap();
    assert_error(code, &b, 400, "invalid_request", "open_pr");

    let (c, b) = stack.get_json("/api/tasks").await;
    assert_eq!(c, 200);
    assert_eq!(
        b["tasks"],
        json!([]),
        "a refused submission left a task behind"
    );
    let found: Vec<_> = walkdir::WalkDir::new(stack.dir.path().parent().unwrap())
        .max_depth(3)
        .into_iter()
        .flatten()
        .filter(|e| e.file_name() == "escaped-by-zip.txt")
        .collect();
    assert!(found.is_empty(), "{found:?}");
    let uploads = stack.data_dir.join("objects/uploads");
    assert!(!uploads.exists() || std::fs::read_dir(&uploads).unwrap().count() == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_newest_first_and_finished_tasks_refuse_cancel() {
    let stack = Stack::start(Mode::Up, demo_script(), &[]).await;
    let repo = demo_git_repo(stack.dir.path());
    let url = format!("file://{}", repo.display());
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (c, v) = stack
            .post_json(
                "/api/tasks",
                &json!({"git_url": url, "task_description": "fix"}),
            )
            .await;
        assert_eq!(c, 202, "{v}");
        ids.push(v["task_id"].as_str().unwrap().to_string());
    }
    for id in &ids {
        assert_eq!(stack.wait_terminal(id).await["status"], "COMPLETED");
    }
    let (_, page1) = stack.get_json("/api/tasks?limit=1").await;
    assert_eq!(
        page1["tasks"][0]["task_id"],
        ids[1].as_str(),
        "newest first"
    );
    let cursor = page1["next_cursor"].as_str().unwrap();
    let (_, page2) = stack
        .get_json(&format!("/api/tasks?limit=1&cursor={cursor}"))
        .await;
    assert_eq!(page2["tasks"][0]["task_id"], ids[0].as_str());
    let (_, done) = stack.get_json("/api/tasks?status=COMPLETED").await;
    assert_eq!(done["tasks"].as_array().unwrap().len(), 2);
    let (_, none) = stack.get_json("/api/tasks?status=FAILED").await;
    assert_eq!(none["tasks"], json!([]));

    let (c, b) = stack
        .post_json(&format!("/api/tasks/{}/cancel", ids[0]), &json!({}))
        .await;
    assert_error(c, &b, 409, "conflict", "is already COMPLETED");
    assert_eq!(stack.record(&ids[0]).await["status"], "COMPLETED");

    // SSE replays the history and ends with the final status.
    let r = stack
        .http
        .get(format!("{}/api/tasks/{}/events", stack.base, ids[0]))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let body = r.text().await.unwrap();
    assert!(
        body.contains("event: status") && body.contains("COMPLETED"),
        "{body}"
    );

    // `patchflow config` shows the effective settings with secrets redacted.
    let out = stack
        .command(&["config"])
        .env("OPENAI_API_KEY", "sk-test-must-not-print")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("openai_api_key = \"***\"") && !text.contains("sk-test-must-not-print"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "http_addr = \"{}\"",
            stack.base.trim_start_matches("http://")
        )),
        "{text}"
    );
    // Migrations at start-up already ran; running them by hand, twice, changes nothing.
    for _ in 0..2 {
        let out = stack.command(&["migrate"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("is up to date"));
    }
    let (_, again) = stack.get_json("/api/tasks").await;
    assert_eq!(again["tasks"].as_array().unwrap().len(), 2);
    // A bad setting is named.
    let out = stack
        .command(&["config", "--set", "temporal_port=abc"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("temporal_port"));
}
