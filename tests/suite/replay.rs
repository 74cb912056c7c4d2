//! `patchflow replay`: a finished task's agent runs again on its staged code, the model's
//! answers coming from the recorded transcript. The demo task replays identical with the
//! model server stopped (and no endpoint configured that answers), attempt by attempt
//! after a retry; a task whose shell prints the time is reported step by step; another
//! tenant can neither replay a task nor download its code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use patchflow_scripted_model::{Script, ScriptedCall, Turn};
use serde_json::{Value, json};

use crate::support::{Mode, Stack, demo_git_repo, demo_script, free_port, http_with};

/// `patchflow replay ARGS` against the stack, with a model base URL nobody listens on.
fn replay(stack: &Stack, args: &[&str], token: Option<&str>) -> (i32, String, String) {
    let dead = format!("http://127.0.0.1:{}/v1", free_port());
    let mut cmd = stack.command(&[&["replay"], args].concat());
    cmd.env("OPENAI_BASE_URL", &dead);
    if let Some(t) = token {
        cmd.env("PATCHFLOW_TOKEN", t);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn shell(cmd: &str) -> ScriptedCall {
    ScriptedCall {
        name: "run_shell_command".into(),
        arguments: json!({"command_string": cmd}),
    }
}

fn finish(summary: &str) -> ScriptedCall {
    ScriptedCall {
        name: "finish".into(),
        arguments: json!({"summary": summary}),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_task_replays_identical_with_the_model_stopped() {
    let stack = Stack::start(Mode::Up, demo_script(), &[]).await;
    let id = stack.submit_demo().await;
    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "COMPLETED", "{r}\n{}", stack.logs());
    // A second attempt, so there are two recorded runs to replay.
    let (code, v) = stack
        .post_json(
            &format!("/api/tasks/{id}/retry"),
            &json!({"mode": "from_start"}),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    let r = stack.wait_attempt_ends(&id, 2).await;
    assert_eq!(r["status"], "COMPLETED", "{r}\n{}", stack.logs());

    stack.model.stop();
    let asked = stack.model.observed().requests;

    let (code, out, err) = replay(&stack, &[&id], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("replay of task {id} attempt 2: identical")),
        "{out}"
    );
    for attempt in ["1", "2"] {
        let (code, out, err) = replay(&stack, &[&id, "--attempt", attempt, "--json"], None);
        assert_eq!(code, 0, "attempt {attempt}: {out}{err}");
        let report: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(report["identical"], true, "{report}");
        assert_eq!(report["diff_identical"], true);
        // read, search, edit and the tests: every tool result compared.
        assert!(report["tool_results"].as_u64().unwrap() >= 4, "{report}");
        assert_eq!(report["recorded_outcome"], report["replayed_outcome"]);
    }
    assert_eq!(
        stack.model.observed().requests,
        asked,
        "a replay asked the model"
    );

    // Each attempt's files stay readable by number; one that never ran is refused.
    let (code, text) = stack
        .get_text(&format!("/api/tasks/{id}/transcript?attempt=1"))
        .await;
    assert_eq!(code, 200);
    assert!(text.contains("\"type\":\"model_response\""), "{text}");
    let (code, v) = stack
        .get_json(&format!("/api/tasks/{id}/diff?attempt=3"))
        .await;
    assert_eq!(code, 404, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("no attempt 3"),
        "{v}"
    );
    let (code, _, err) = replay(&stack, &[&id, "--attempt", "3"], None);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("has no attempt 3"), "{err}");
    let (code, v) = stack
        .get_json(&format!("/api/tasks/{id}/diff?attempt=x"))
        .await;
    assert_eq!(code, 400, "{v}");
    let (code, v) = stack
        .get_json(&format!("/api/tasks/{id}/source?part=home"))
        .await;
    assert_eq!(code, 404, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("no prepared HOME"),
        "{v}"
    );

    // The staged code is a zstd archive, and it is the owner's only.
    let (code, _) = stack.get_text(&format!("/api/tasks/{id}/source")).await;
    assert_eq!(code, 200);
    let bytes = stack
        .http
        .get(format!("{}/api/tasks/{id}/source", stack.base))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(&bytes[..4], &[0x28, 0xb5, 0x2f, 0xfd], "not zstd");
    let (c, v) = stack
        .post_json(
            "/api/tokens",
            &json!({"tenant": "other", "role": "member", "name": "other member"}),
        )
        .await;
    assert_eq!(c, 201, "{v}");
    let other = v["token"].as_str().unwrap().to_string();
    let r = http_with(Some(&other))
        .get(format!("{}/api/tasks/{id}/source", stack.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    for path in ["source?part=home", "transcript?attempt=1", "diff?attempt=2"] {
        let r = http_with(Some(&other))
            .get(format!("{}/api/tasks/{id}/{path}", stack.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404, "{path}");
    }
    let r = http_with(None)
        .get(format!("{}/api/tasks/{id}/source", stack.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let (code, out, err) = replay(&stack, &[&id], Some(&other));
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("not found"), "{err}");
    assert!(!out.contains("identical"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_tool_results_change_is_reported_step_by_step() {
    let script = Script {
        turns: vec![
            Turn {
                tool_calls: vec![shell("cat calc.py | wc -l")],
                ..Turn::default()
            },
            Turn {
                tool_calls: vec![shell("date +%s%N")],
                ..Turn::default()
            },
            Turn {
                tool_calls: vec![finish("looked at the clock")],
                ..Turn::default()
            },
        ],
        ..Script::default()
    };
    let stack = Stack::start(Mode::Up, script, &[]).await;
    let repo = demo_git_repo(stack.dir.path());
    let (code, v) = stack
        .post_json(
            "/api/tasks",
            &json!({"git_url": format!("file://{}", repo.display()), "task_description": "what time is it"}),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    let id = v["task_id"].as_str().unwrap().to_string();
    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "COMPLETED", "{r}\n{}", stack.logs());
    stack.model.stop();

    let (code, out, err) = replay(&stack, &[&id], None);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("DIFFERS (1 of 3 tool results differ"), "{out}");
    assert!(
        out.contains("step 2 (tool result 2): run_shell_command"),
        "{out}"
    );
    assert!(out.contains("date +%s%N"), "{out}");
    assert!(
        !out.contains("step 1 "),
        "the unchanged step is reported: {out}"
    );

    let (code, out, _) = replay(&stack, &[&id, "--json"], None);
    assert_eq!(code, 1);
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["identical"], false);
    assert_eq!(report["diff_identical"], true, "{report}");
    let diffs = report["differences"].as_array().unwrap();
    assert_eq!(diffs.len(), 1, "{report}");
    assert_eq!(diffs[0]["step"], 2);
    assert_eq!(diffs[0]["tool"], "run_shell_command");
    assert_ne!(diffs[0]["recorded_output"], diffs[0]["replayed_output"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_with_a_setup_replays_on_its_prepared_workspace_and_home() {
    let script = Script {
        turns: vec![
            Turn {
                tool_calls: vec![shell("cat prepared.txt ~/.cache/tool/marker")],
                ..Turn::default()
            },
            Turn {
                expect_in_tool_results: vec!["from setup".into(), "home v1".into()],
                tool_calls: vec![finish("read what the setup made")],
                ..Turn::default()
            },
        ],
        ..Script::default()
    };
    let stack = Stack::start(Mode::Up, script, &[]).await;
    let repo = demo_git_repo(stack.dir.path());
    let (code, v) = stack
        .post_json(
            "/api/tasks",
            &json!({
                "git_url": format!("file://{}", repo.display()),
                "task_description": "read the prepared files",
                "setup": {
                    "setup_script": "echo 'from setup' > prepared.txt\nmkdir -p ~/.cache/tool\necho 'home v1' > ~/.cache/tool/marker\n",
                    "network": "off",
                    "cache_paths": ["~/.cache/tool"]
                }
            }),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    let id = v["task_id"].as_str().unwrap().to_string();
    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "COMPLETED", "{r}\n{}", stack.logs());
    stack.model.stop();

    // Both parts of the prepared state are served; a part that is neither is refused.
    for part in ["code", "home"] {
        let (code, _) = stack
            .get_text(&format!("/api/tasks/{id}/source?part={part}"))
            .await;
        assert_eq!(code, 200, "part {part}");
    }
    let (code, v) = stack
        .get_json(&format!("/api/tasks/{id}/source?part=../../etc"))
        .await;
    assert_eq!(code, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("part"), "{v}");

    let (code, out, err) = replay(&stack, &[&id], None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("identical (2 tool results"), "{out}");
}
