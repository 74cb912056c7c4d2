//! Follow-up turns and best-of-N candidates, through HTTP, gRPC and the CLI (the page's
//! message box and Select are in the browser suite).
//!
//! - A completed demo task takes follow-ups: each turn's first request carries the earlier
//!   turns' conversation, the diff stays cumulative while `?turn=N` gives one turn's own
//!   change, transcript lines say their turn, and a message while a turn runs is a 409.
//! - A follow-up survives a SIGKILL of `patchflow up` in the middle of its turn, once.
//! - Three candidates race at once (their requests interleave at the model), each with its
//!   own diff; one failing leaves the task COMPLETED; selection switches the task's diff;
//!   cancel stops them all.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use patchflow_gateway::grpc::proto;
use patchflow_scripted_model::{Failure, Script, ScriptedCall, Turn};
use serde_json::{Value, json};

use crate::support::{
    Mode, Stack, demo_git_repo, demo_script, processes_mentioning, requests_asking,
};

fn call(name: &str, arguments: Value) -> ScriptedCall {
    ScriptedCall {
        name: name.into(),
        arguments,
    }
}

fn turn(calls: Vec<ScriptedCall>) -> Turn {
    Turn {
        tool_calls: calls,
        ..Turn::default()
    }
}

fn finish(summary: &str) -> Turn {
    turn(vec![call("finish", json!({ "summary": summary }))])
}

/// The demo, then three follow-ups of two model turns each: add `subtract()` (slow, so a
/// second message lands while it runs), run the tests, note it in the README.
fn conversation_script() -> Script {
    let mut script = demo_script();
    let mut add = turn(vec![call(
        "edit_file_content",
        json!({
            "file_path": "calc.py",
            "old_text": "return a * b",
            "new_text": "return a * b\n\n\ndef subtract(a, b):\n    \"\"\"Return a minus b.\"\"\"\n    return a - b",
        }),
    )]);
    add.delay_ms = 1_500;
    script.turns.extend([
        add,
        finish("Added subtract()."),
        turn(vec![call(
            "run_shell_command",
            json!({"command_string": "python3 -m unittest -v", "timeout_seconds": 60}),
        )]),
        finish("The tests pass."),
        turn(vec![call(
            "edit_file_content",
            json!({"file_path": "README.md", "old_text": "calculator", "new_text": "calculator (with subtract)"}),
        )]),
        finish("Noted subtract() in the README."),
    ]);
    script
}

/// Waits until turn `n` of the task has ended; returns the record.
async fn wait_turn(stack: &Stack, id: &str, n: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let r = stack.record(id).await;
        let ended = r["turns"].as_array().unwrap().iter().any(|t| {
            t["turn"] == n
                && ["COMPLETED", "FAILED", "CANCELLED"].contains(&t["status"].as_str().unwrap())
        });
        if ended && ["COMPLETED", "FAILED", "CANCELLED"].contains(&r["status"].as_str().unwrap()) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "turn {n} of {id} did not end: {r}\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn post(stack: &Stack, path: &str, body: Value) -> (u16, Value) {
    stack.post_json(path, &body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_task_goes_on_turn_by_turn_over_http_grpc_and_the_cli() {
    let stack = Stack::start(Mode::Up, conversation_script(), &[]).await;
    let id = stack.submit_demo().await;
    let first = stack.wait_terminal(&id).await;
    assert_eq!(first["status"], "COMPLETED", "{first}");
    // One turn so far: the task as submitted.
    assert_eq!(first["turns"].as_array().unwrap().len(), 1, "{first}");
    assert_eq!(first["turns"][0]["turn"], 1);
    assert_eq!(first["turns"][0]["status"], "COMPLETED");
    let (_, first_diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;

    // Bad messages are refused and start nothing.
    let path = format!("/api/tasks/{id}/messages");
    for (body, code) in [
        (json!({"message": "   "}), 400),
        (json!({"message": "a\u{0}b"}), 400),
        (json!({"message": "x".repeat(70 * 1024)}), 400),
        (json!({"message": "hi", "turn": 7}), 400),
        (json!({"text": "hi"}), 400),
        (json!(["hi"]), 400),
    ] {
        let (c, v) = post(&stack, &path, body.clone()).await;
        assert_eq!(c, code, "{body}: {v}");
        assert_eq!(v["code"], "invalid_request", "{v}");
    }
    // Its own client: the gateway answers 413 before reading the rest and closes that
    // connection, which must not be the pooled one the next request reuses.
    let huge = crate::support::http_with(Some(&stack.token))
        .post(format!("{}{path}", stack.base))
        .header("content-type", "application/json")
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status().as_u16(), 413);
    let (c, _) = post(
        &stack,
        "/api/tasks/tsk_00000000000000000000000000000000/messages",
        json!({"message": "hi"}),
    )
    .await;
    assert_eq!(c, 404);
    let (c, _) = post(
        &stack,
        "/api/tasks/not-an-id/messages",
        json!({"message": "hi"}),
    )
    .await;
    let (c2, _) = stack.get_json("/api/tasks/not-an-id").await;
    assert_eq!(c, c2, "a malformed id is refused as every route refuses it");
    assert_eq!(stack.record(&id).await["status"], "COMPLETED");

    // Turn 2 over HTTP: 202 with its number, running at once; a second message is a 409.
    let (c, v) = post(&stack, &path, json!({"message": "Also add subtract()."})).await;
    assert_eq!(c, 202, "{v}");
    assert_eq!(v, json!({"task_id": id, "turn": 2}));
    let r = stack.record(&id).await;
    assert_eq!(r["status"], "RUNNING_AGENT", "{r}");
    assert_eq!(r["turns"][1]["message"], "Also add subtract().", "{r}");
    let (c, v) = post(&stack, &path, json!({"message": "and another"})).await;
    assert_eq!(c, 409, "{v}");
    assert_eq!(v["code"], "conflict");
    let r = wait_turn(&stack, &id, 2).await;
    assert_eq!(r["status"], "COMPLETED", "{r}\n{}", stack.logs());
    let turns = r["turns"].as_array().unwrap();
    assert_eq!(turns.len(), 2, "{r}");
    assert_eq!(turns[0]["message"], "fix");
    assert_eq!(turns[0]["status"], "COMPLETED");
    assert_eq!(turns[1]["status"], "COMPLETED");
    assert_eq!(turns[1]["summary"], "Added subtract().");
    assert!(turns[1]["finished_at"].is_string(), "{r}");
    assert!(
        r["message"].as_str().unwrap().starts_with("turn 2: "),
        "{r}"
    );

    // The second turn's first request carried the first turn's conversation.
    let seen = stack.model.observed();
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    let asked = requests_asking(&seen.bodies, "Also add subtract().");
    assert!(!asked.is_empty());
    let carried = asked[0].to_string();
    for earlier in [
        "return a - b",
        "call_1_1",
        "call_5_1",
        "Fixed add() in calc.py",
    ] {
        assert!(
            carried.contains(earlier),
            "{earlier} missing from {carried}"
        );
    }

    // Cumulative diff, and each turn's own change.
    let (_, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert!(diff.contains("+    return a + b"), "{diff}");
    assert!(diff.contains("+def subtract(a, b):"), "{diff}");
    let (c, turn1) = stack
        .get_text(&format!("/api/tasks/{id}/diff?turn=1"))
        .await;
    assert_eq!(c, 200);
    assert_eq!(turn1, first_diff);
    let (_, turn2) = stack
        .get_text(&format!("/api/tasks/{id}/diff?turn=2"))
        .await;
    assert!(turn2.contains("+def subtract(a, b):"), "{turn2}");
    assert!(!turn2.contains("return a + b"), "{turn2}");
    for bad in ["0", "3", "99999999999", "x"] {
        let (c, _) = stack
            .get_text(&format!("/api/tasks/{id}/diff?turn={bad}"))
            .await;
        assert!(c == 404 || c == 400, "turn={bad}: {c}");
    }
    let (c, _) = stack
        .get_text(&format!("/api/tasks/{id}/diff?turn=1&attempt=1"))
        .await;
    assert_eq!(c, 400);

    // Every transcript line says its turn; each turn's own transcript holds only its own.
    let (_, transcript) = stack.get_text(&format!("/api/tasks/{id}/transcript")).await;
    let lines: Vec<Value> = transcript
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let turn_of: BTreeSet<u64> = lines.iter().map(|l| l["turn"].as_u64().unwrap()).collect();
    assert_eq!(turn_of, BTreeSet::from([1, 2]), "{transcript}");
    let (_, own) = stack
        .get_text(&format!("/api/tasks/{id}/transcript?turn=2"))
        .await;
    assert!(
        own.lines()
            .all(|l| serde_json::from_str::<Value>(l).unwrap()["turn"] == 2),
        "{own}"
    );
    let events = stack.events(&id).await;
    assert!(
        events.iter().any(|e| e.message.starts_with("turn 2: ")),
        "{events:?}"
    );

    // Turn 3 over gRPC.
    let mut grpc = stack.grpc_client().await;
    let sent = grpc
        .send_message(proto::SendMessageRequest {
            task_id: id.clone(),
            message: "Run the tests again.".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.turn, 3);
    let refused = grpc
        .send_message(proto::SendMessageRequest {
            task_id: id.clone(),
            message: "too soon".into(),
        })
        .await;
    // Turn 3 may already be over; while it runs the answer is FAILED_PRECONDITION.
    if let Err(s) = refused {
        assert_eq!(s.code(), tonic::Code::FailedPrecondition, "{s:?}");
    }
    wait_turn(&stack, &id, 3).await;
    let task = grpc
        .get_task(proto::GetTaskRequest {
            task_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(task.turns.len() >= 3, "{task:?}");
    assert_eq!(task.turns[2].summary, "The tests pass.");
    let own = grpc
        .get_result(proto::GetResultRequest {
            task_id: id.clone(),
            turn: Some(2),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(own.diff, turn2);

    // Turn 4 from the CLI, followed to its end.
    let out = stack.cli(&["say", &id, "Mention subtract in the README.", "--wait"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("turn 4  accepted"), "{stdout}");
    assert!(stdout.contains("turn 4  COMPLETED"), "{stdout}");
    let (_, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    for change in ["return a + b", "def subtract", "calculator (with subtract)"] {
        assert!(diff.contains(change), "{change}: {diff}");
    }
    let out = stack.cli(&["result", &id, "--turn", "4"]);
    let own = String::from_utf8_lossy(&out.stdout);
    assert!(
        own.contains("with subtract") && !own.contains("def subtract"),
        "{own}"
    );

    // A retry closes the conversation's workflow first, then runs the task again.
    let (c, v) = post(
        &stack,
        &format!("/api/tasks/{id}/retry"),
        json!({"mode": "from_start"}),
    )
    .await;
    assert_eq!(c, 202, "{v}");
    let r = stack.wait_attempt_ends(&id, 2).await;
    assert_eq!(r["status"], "COMPLETED", "{r}");
    assert_eq!(r["turns"].as_array().unwrap().len(), 1, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follow_up_survives_a_sigkill_of_up_mid_turn_and_completes_once() {
    let mut script = conversation_script();
    // The follow-up's first model turn is slow, so the kill lands inside it.
    script.turns[5].delay_ms = 4_000;
    let mut stack = Stack::start(
        Mode::Up,
        script,
        &[
            ("PATCHFLOW_HEARTBEAT_TIMEOUT_SECS", "3"),
            // The workflow closes after the first turn: the message restarts it as a
            // continuation of the stored results (update-with-start).
            ("PATCHFLOW_FOLLOWUP_IDLE_HOURS", "0"),
        ],
    )
    .await;
    let id = stack.submit_demo().await;
    assert_eq!(stack.wait_terminal(&id).await["status"], "COMPLETED");
    let closed = stack.closed_workflow(&id).await;
    assert_eq!(
        closed["workflowExecutionInfo"]["status"],
        "WORKFLOW_EXECUTION_STATUS_COMPLETED"
    );
    let (c, v) = post(
        &stack,
        &format!("/api/tasks/{id}/messages"),
        json!({"message": "Also add subtract()."}),
    )
    .await;
    assert_eq!(c, 202, "{v}");
    assert_eq!(v["turn"], 2);
    let deadline = Instant::now() + Duration::from_secs(60);
    while requests_asking(&stack.model.observed().bodies, "Also add subtract().").is_empty() {
        assert!(
            Instant::now() < deadline,
            "turn 2 never asked the model:\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack.kill_and_restart_up().await;

    let r = wait_turn(&stack, &id, 2).await;
    assert_eq!(r["status"], "COMPLETED", "{r}\n{}", stack.logs());
    assert_eq!(r["turns"].as_array().unwrap().len(), 2, "{r}");
    let (_, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert_eq!(diff.matches("+def subtract(a, b):").count(), 1, "{diff}");
    assert!(diff.contains("+    return a + b"), "{diff}");
    // Turn 2's lines appear once in the transcript, after turn 1's.
    let (_, transcript) = stack.get_text(&format!("/api/tasks/{id}/transcript")).await;
    let turns: Vec<u64> = transcript
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["turn"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(turns.windows(2).all(|w| w[0] <= w[1]), "{turns:?}");
    let starts = transcript
        .lines()
        .filter(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["type"] == "start" && v["turn"] == 2
        })
        .count();
    assert_eq!(starts, 1, "{transcript}");
    let completed = stack
        .events(&id)
        .await
        .into_iter()
        .filter(|e| {
            e.status == Some(patchflow_core::TaskStatus::Completed)
                && e.message.starts_with("turn 2: ")
        })
        .count();
    assert_eq!(completed, 1);
}

/// The demo with each candidate's fix marked by its number (the request's `seed`), and
/// candidate 2's model refusing it (a 400 nobody retries).
fn race_script(delay_ms: u64) -> Script {
    let mut script = demo_script();
    script.turns[2].tool_calls[0].arguments["new_text"] =
        json!("return a + b  # candidate {{seed}}");
    for t in &mut script.turns {
        t.delay_ms = delay_ms;
    }
    script.fail = Some(Failure {
        status: 400,
        message: "candidate two is doomed".into(),
        seeds: vec![2],
        ..Failure::default()
    });
    script
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_candidates_race_and_the_selected_one_becomes_the_task() {
    let mut script = race_script(300);
    script.turns.extend([
        turn(vec![call(
            "edit_file_content",
            json!({"file_path": "calc.py", "old_text": "return a * b", "new_text": "return b * a"}),
        )]),
        finish("Swapped the factors."),
    ]);
    let stack = Stack::start(Mode::Up, script, &[]).await;
    let repo = demo_git_repo(stack.dir.path());
    let git_url = format!("file://{}", repo.display());

    // Abuse of the new fields is refused before anything starts.
    for body in [
        json!({"git_url": git_url, "task_description": "fix", "candidates": 0}),
        json!({"git_url": git_url, "task_description": "fix", "candidates": 9}),
        json!({"git_url": git_url, "task_description": "fix", "candidates": -1}),
        json!({"git_url": git_url, "task_description": "fix", "candidates": "3"}),
        json!({"git_url": git_url, "task_description": "fix", "candidates": 3, "auto_select": "best"}),
        json!({"git_url": git_url, "task_description": "fix", "auto_select": "first_finished"}),
    ] {
        let (c, v) = post(&stack, "/api/tasks", body.clone()).await;
        assert_eq!(c, 400, "{body}: {v}");
    }

    let (c, v) = post(
        &stack,
        "/api/tasks",
        json!({"git_url": git_url, "task_description": "fix", "candidates": 3}),
    )
    .await;
    assert_eq!(c, 202, "{v}");
    let id = v["task_id"].as_str().unwrap().to_string();
    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "COMPLETED", "{r}\n{}", stack.logs());
    assert_eq!(r["selected"], Value::Null, "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("2 of 3 candidates"),
        "{r}"
    );
    let cands = r["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 3, "{r}");
    for c in cands {
        let n = c["candidate"].as_u64().unwrap();
        if n == 2 {
            assert_eq!(c["status"], "FAILED", "{c}");
            assert!(c["error"].as_str().unwrap().contains("doomed"), "{c}");
        } else {
            assert_eq!(c["status"], "COMPLETED", "{c}");
            assert_eq!(c["files_changed"], json!(["calc.py"]), "{c}");
            assert!(c["cost_usd"].is_number(), "{c}");
            assert!(
                c["summary"].as_str().unwrap().contains("Fixed add()"),
                "{c}"
            );
        }
    }

    // They ran at once: each candidate asked the model before another one's last request.
    let seen = stack.model.observed();
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    let seeds: Vec<u64> = seen
        .bodies
        .iter()
        .filter_map(|b| b["seed"].as_u64())
        .collect();
    for s in [1, 2, 3] {
        let first = seeds.iter().position(|x| *x == s).unwrap();
        for other in [1, 3].into_iter().filter(|o| *o != s) {
            let last = seeds.iter().rposition(|x| *x == other).unwrap();
            assert!(
                first < last,
                "candidate {s} started after {other} ended: {seeds:?}"
            );
        }
    }

    // Each its own diff; nothing is the task's until one is selected.
    for n in [1, 3] {
        let (c, d) = stack
            .get_text(&format!("/api/tasks/{id}/candidates/{n}/diff"))
            .await;
        assert_eq!(c, 200);
        assert!(d.contains(&format!("# candidate {n}")), "{d}");
        let (c, t) = stack
            .get_text(&format!("/api/tasks/{id}/candidates/{n}/transcript"))
            .await;
        assert_eq!(c, 200);
        assert!(t.contains("Fixed add()"), "{t}");
        let (c, _) = stack
            .get_text(&format!("/api/tasks/{id}/candidates/{n}/log"))
            .await;
        assert_eq!(c, 200);
    }
    for bad in ["0", "4", "-1", "x", "1.5", "99999999999"] {
        let (c, _) = stack
            .get_text(&format!("/api/tasks/{id}/candidates/{bad}/diff"))
            .await;
        assert_eq!(c, 404, "candidate {bad}");
    }
    let (c, _) = stack
        .get_text(&format!("/api/tasks/{id}/candidates/1/summary.json"))
        .await;
    assert_eq!(c, 404);
    let (c, _) = stack
        .get_text(&format!("/api/tasks/{id}/candidates/1/..%2F..%2Fdiff"))
        .await;
    assert_eq!(c, 404);
    let (c, _) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert_eq!(c, 404);
    let (c, v) = post(
        &stack,
        &format!("/api/tasks/{id}/messages"),
        json!({"message": "go on"}),
    )
    .await;
    assert_eq!(c, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("select one"), "{v}");

    // Selection: bad numbers, the failed one, then 1, then 3.
    let select = format!("/api/tasks/{id}/select");
    for (body, code) in [
        (json!({"candidate": 0}), 400),
        (json!({"candidate": 4}), 400),
        (json!({"candidate": "1"}), 400),
        (json!({"candidate": 1, "also": 2}), 400),
        (json!({}), 400),
        (json!({"candidate": 2}), 409),
    ] {
        let (c, v) = post(&stack, &select, body.clone()).await;
        assert_eq!(c, code, "{body}: {v}");
    }
    let (c, v) = post(&stack, &select, json!({"candidate": 1})).await;
    assert_eq!(c, 200, "{v}");
    assert_eq!(v["selected"], 1);
    let (_, d) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert!(d.contains("# candidate 1"), "{d}");
    let mut grpc = stack.grpc_client().await;
    let task = grpc
        .select_candidate(proto::SelectCandidateRequest {
            task_id: id.clone(),
            candidate: 3,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(task.selected, Some(3));
    assert_eq!(task.candidates.len(), 3);
    let (_, d) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert!(
        d.contains("# candidate 3") && !d.contains("# candidate 1"),
        "{d}"
    );
    let result = grpc
        .get_result(proto::GetResultRequest {
            task_id: id.clone(),
            candidate: Some(1),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(result.diff.contains("# candidate 1"));
    let out = stack.cli(&["candidates", &id]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{listed}");
    assert_eq!(listed.lines().count(), 4, "{listed}");
    assert!(listed.contains("*3"), "{listed}");
    assert!(listed.contains("doomed"), "{listed}");
    let out = stack.cli(&["select", &id, "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stack.record(&id).await["selected"], 1);
    let out = stack.cli(&["select", &id, "2"]);
    assert!(!out.status.success());

    // A follow-up goes on from the selection; after it, the selection is final.
    let (c, v) = post(
        &stack,
        &format!("/api/tasks/{id}/messages"),
        json!({"message": "Swap the factors."}),
    )
    .await;
    assert_eq!(c, 202, "{v}");
    let r = wait_turn(&stack, &id, 2).await;
    assert_eq!(r["status"], "COMPLETED", "{r}\n{}", stack.logs());
    let (_, d) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert!(
        d.contains("# candidate 1") && d.contains("return b * a"),
        "{d}"
    );
    let (c, v) = post(&stack, &select, json!({"candidate": 3})).await;
    assert_eq!(c, 409, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_race_stops_every_candidate_and_first_finished_stops_the_rest() {
    let mut script = race_script(0);
    script.fail = None;
    // The second model turn is slow: all three are inside it when the cancel comes.
    script.turns[1].delay_ms = 30_000;
    let quotas = r#"{"small": {"max_candidates": 2}}"#;
    let stack = Stack::start(Mode::Up, script, &[("PATCHFLOW_TENANTS", quotas)]).await;
    let repo = demo_git_repo(stack.dir.path());
    let git_url = format!("file://{}", repo.display());

    // The tenant's quota caps candidates.
    let (c, v) = post(
        &stack,
        "/api/tasks",
        json!({"git_url": git_url, "task_description": "fix", "candidates": 3, "tenant": "small"}),
    )
    .await;
    assert_eq!(c, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("max_candidates = 2"),
        "{v}"
    );

    let (c, v) = post(
        &stack,
        "/api/tasks",
        json!({"git_url": git_url, "task_description": "fix", "candidates": 3}),
    )
    .await;
    assert_eq!(c, 202, "{v}");
    let id = v["task_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seeds: BTreeSet<u64> = stack
            .model
            .observed()
            .bodies
            .iter()
            .filter(|b| b["messages"].as_array().is_some_and(|m| m.len() > 3))
            .filter_map(|b| b["seed"].as_u64())
            .collect();
        if seeds.len() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the candidates never all reached turn 2:\n{}",
            stack.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(processes_mentioning(&id).len() >= 3);
    let (c, v) = post(
        &stack,
        &format!("/api/tasks/{id}/cancel"),
        json!({"reason": "enough"}),
    )
    .await;
    assert_eq!(c, 202, "{v}");
    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "CANCELLED", "{r}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !processes_mentioning(&id).is_empty() {
        assert!(Instant::now() < deadline, "a candidate outlived the cancel");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = stack.record(&id).await;
    let cands = r["candidates"].as_array().unwrap();
    assert_eq!(cands.len(), 3, "{r}");
    assert!(cands.iter().all(|c| c["status"] == "CANCELLED"), "{r}");
    let (c, v) = post(
        &stack,
        &format!("/api/tasks/{id}/messages"),
        json!({"message": "go on"}),
    )
    .await;
    assert_eq!(c, 409, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_finished_selects_the_winner_and_stops_the_others() {
    let mut script = race_script(0);
    script.fail = None;
    let stack = Stack::start(Mode::Up, script, &[]).await;
    let repo = demo_git_repo(stack.dir.path());
    let (c, v) = post(
        &stack,
        "/api/tasks",
        json!({"git_url": format!("file://{}", repo.display()), "task_description": "fix",
               "candidates": 2, "auto_select": "first_finished"}),
    )
    .await;
    assert_eq!(c, 202, "{v}");
    let id = v["task_id"].as_str().unwrap().to_string();
    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "COMPLETED", "{r}\n{}", stack.logs());
    let n = r["selected"].as_u64().expect("a candidate is selected");
    let winner = r["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["candidate"] == n)
        .unwrap();
    assert_eq!(winner["status"], "COMPLETED", "{r}");
    let (_, d) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert!(d.contains(&format!("# candidate {n}")), "{d}");
    assert_eq!(r["summary"]["files_changed"], json!(["calc.py"]), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_conversation_continues_as_new_and_keeps_every_turn() {
    // A small history budget: the conversation's workflow continues as new between turns.
    let stack = Stack::start(
        Mode::Up,
        conversation_script(),
        &[("PATCHFLOW_CONTINUE_AS_NEW_EVENTS", "40")],
    )
    .await;
    let id = stack.submit_demo().await;
    assert_eq!(stack.wait_terminal(&id).await["status"], "COMPLETED");
    let path = format!("/api/tasks/{id}/messages");
    for (n, message) in [
        (2, "Also add subtract()."),
        (3, "Run the tests."),
        (4, "Note subtract() in the README."),
    ] {
        let (c, v) = post(&stack, &path, json!({ "message": message })).await;
        assert_eq!(c, 202, "turn {n}: {v}");
        assert_eq!(v["turn"], n);
        let r = wait_turn(&stack, &id, n).await;
        assert_eq!(r["status"], "COMPLETED", "turn {n}: {r}\n{}", stack.logs());
    }
    // The workflow was carried over at least once, and the last run is the one open.
    let out = stack.temporal_cli(&[
        "workflow",
        "list",
        "--query",
        &format!("WorkflowId='{id}'"),
        "-o",
        "json",
    ]);
    let runs: Vec<Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let continued = runs
        .iter()
        .filter(|r| {
            r["status"]
                .as_str()
                .unwrap_or_default()
                .contains("CONTINUED_AS_NEW")
        })
        .count();
    assert!(continued >= 1, "never continued as new: {runs:?}");
    // Every turn is kept, in order, with its own summary; the last turn's first request
    // carried the first turn's conversation across the runs.
    let r = stack.record(&id).await;
    let turns: Vec<(u64, String)> = r["turns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["turn"].as_u64().unwrap(),
                t["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        turns,
        (1..=4)
            .map(|n| (n, "COMPLETED".to_string()))
            .collect::<Vec<_>>(),
        "{r}"
    );
    assert_eq!(r["turns"][3]["summary"], "Noted subtract() in the README.");
    let asked = requests_asking(
        &stack.model.observed().bodies,
        "Note subtract() in the README.",
    );
    assert!(!asked.is_empty());
    let carried = asked[0].to_string();
    for earlier in ["Fixed add() in calc.py", "Added subtract()."] {
        assert!(
            carried.contains(earlier),
            "{earlier} missing from {carried}"
        );
    }
    let (_, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    for change in [
        "+    return a + b",
        "+def subtract(a, b):",
        "calculator (with subtract)",
    ] {
        assert!(
            diff.contains(change),
            "{change} missing from the cumulative diff:\n{diff}"
        );
    }
}
