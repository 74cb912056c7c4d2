//! The demo task end to end: over HTTP through `patchflow up`, and through the CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use serde_json::{Value, json};

use crate::support::{Mode, Stack, demo_git_repo, demo_script, repo_root};
use patchflow_core::TaskStatus;

pub const EXPECTED_DIFF: &str = "diff --git a/calc.py b/calc.py
--- a/calc.py
+++ b/calc.py
@@ -3,7 +3,7 @@
 
 def add(a, b):
     \"\"\"Return the sum of a and b.\"\"\"
-    return a - b
+    return a + b
 
 
 def multiply(a, b):
";

fn transcript_entries(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// What the worker's work directory (`<data_dir>/work`) still holds, as relative paths.
fn work_left_over(stack: &Stack) -> Vec<String> {
    let work = stack.data_dir.join("work");
    walkdir::WalkDir::new(&work)
        .min_depth(1)
        .into_iter()
        .filter_map(Result::ok)
        .map(|e| e.path().strip_prefix(&work).unwrap().display().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_task_completes_over_http_with_the_exact_diff() {
    let stack = Stack::start(Mode::Up, demo_script(), &[]).await;
    let repo = demo_git_repo(stack.dir.path());
    let (code, v) = stack
        .post_json(
            "/api/tasks",
            &json!({
                "git_url": format!("file://{}", repo.display()),
                "git_ref": "main",
                "task_description": "The test suite fails; fix the bug.",
                "target_file": "calc.py",
                "github_token": "ghp_never_stored_anywhere"
            }),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    assert_eq!(v["status"], "QUEUED");
    let id = v["task_id"].as_str().unwrap().to_string();

    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "COMPLETED", "{r}\n{}", stack.logs());
    assert_eq!(r["message"], "the agent finished; 1 file changed");
    // The worker kept the fetched tree for the agent and the agent's workspace until each
    // was done with: nothing of the task is left in its work directory.
    assert_eq!(work_left_over(&stack), Vec::<String>::new());

    // The exact diff, and it applies to the original repository.
    let (code, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert_eq!(code, 200);
    assert_eq!(diff, EXPECTED_DIFF);
    let patch = stack.dir.path().join("fix.patch");
    std::fs::write(&patch, &diff).unwrap();
    let check = std::process::Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["apply", "--check"])
        .arg(&patch)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // The transcript: every tool call in order, with outputs that show the fix worked.
    let (code, transcript) = stack.get_text(&format!("/api/tasks/{id}/transcript")).await;
    assert_eq!(code, 200);
    let entries = transcript_entries(&transcript);
    let results: Vec<&Value> = entries
        .iter()
        .filter(|e| e["type"] == "tool_result")
        .collect();
    let tools: Vec<&str> = results
        .iter()
        .map(|e| e["tool"].as_str().unwrap())
        .collect();
    assert_eq!(
        tools,
        [
            "read_file_content",
            "search_code",
            "edit_file_content",
            "run_shell_command",
            "finish"
        ]
    );
    assert!(results.iter().all(|e| e["ok"] == true), "{transcript}");
    assert!(
        results[0]["output"]["content"]
            .as_str()
            .unwrap()
            .contains("return a - b")
    );
    assert_eq!(results[1]["output"]["matches"][0]["file_path"], "calc.py");
    assert_eq!(results[1]["output"]["matches"][0]["line"], 4);
    assert_eq!(results[2]["output"]["replaced"], 1);
    let shell = &results[3]["output"];
    assert_eq!(shell["exit_code"], 0, "{shell}");
    let stderr = shell["stderr"].as_str().unwrap();
    assert!(
        stderr.contains("Ran 2 tests") && stderr.trim_end().ends_with("OK"),
        "{stderr}"
    );
    let responses = entries
        .iter()
        .filter(|e| e["type"] == "model_response")
        .count();
    assert_eq!(responses, 5);
    assert!(entries.iter().all(|e| e["ts"].is_string()));
    assert!(!transcript.contains("ghp_never_stored_anywhere"));

    // Summary figures.
    let s = &r["summary"];
    assert_eq!(s["outcome"], "finished");
    assert_eq!(s["steps"], 5);
    assert_eq!(s["tool_calls"], 5);
    assert_eq!(s["files_changed"], json!(["calc.py"]));
    assert_eq!(s["model"], "scripted-test");
    let (p, c, t) = (
        s["prompt_tokens"].as_u64().unwrap(),
        s["completion_tokens"].as_u64().unwrap(),
        s["total_tokens"].as_u64().unwrap(),
    );
    assert!(p > 0 && c > 0 && t == p + c, "{s}");
    assert!(s["summary"].as_str().unwrap().starts_with("Fixed add()"));

    // Every transition, in order, each stamped.
    use TaskStatus::*;
    assert_eq!(
        stack.statuses(&id).await,
        [
            Pending,
            Queued,
            DownloadingCode,
            StagingCode,
            RunningAgent,
            UploadingResults,
            Completed
        ]
    );

    // The model saw exactly the script, with the tool schemas of ARCHITECTURE.md and our model name.
    let seen = stack.model.observed();
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    assert_eq!(seen.answered, 5);
    assert!(seen.bodies.iter().all(|b| b["model"] == "scripted-test"));

    // Temporal has the workflow, completed, under the task id; the record links to it.
    let desc = stack.closed_workflow(&id).await;
    assert_eq!(
        desc["workflowExecutionInfo"]["status"], "WORKFLOW_EXECUTION_STATUS_COMPLETED",
        "{desc}"
    );
    assert_eq!(desc["workflowExecutionInfo"]["type"]["name"], "CodeTask");
    assert!(
        r["links"]["workflow"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/namespaces/default/workflows/{id}"))
    );

    // The secret sent with the submission is nowhere in the stored data or logs.
    let mut leaked = Vec::new();
    for entry in walkdir::WalkDir::new(stack.dir.path())
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
    {
        let bytes = std::fs::read(entry.path()).unwrap_or_default();
        if bytes.windows(25).any(|w| w == b"ghp_never_stored_anywhere") {
            leaked.push(entry.path().display().to_string());
        }
    }
    assert!(leaked.is_empty(), "secret found in {leaked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_submits_a_directory_waits_and_prints_the_result() {
    let stack = Stack::start(Mode::Up, demo_script(), &[]).await;
    let demo = repo_root().join("examples/demo-repo");
    let out = stack.cli(&[
        "submit",
        demo.to_str().unwrap(),
        "-d",
        "Fix the failing test",
        "--wait",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "submit failed: {stderr}\n{}",
        stack.logs()
    );
    let id = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap()
        .trim()
        .to_string();
    assert!(id.starts_with("tsk_"), "{id}");
    // --wait showed the progress, ending in COMPLETED.
    for status in ["QUEUED", "DOWNLOADING_CODE", "RUNNING_AGENT", "COMPLETED"] {
        assert!(stderr.contains(status), "no {status} in:\n{stderr}");
    }
    assert!(stderr.contains("step 4: run_shell_command"), "{stderr}");

    let out = stack.cli(&["result", &id]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        super::e2e::EXPECTED_DIFF
    );

    let out = stack.cli(&["status", &id, "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "COMPLETED");
    assert_eq!(v["source"], "uploaded zip");
    // Neither the unpacked upload nor the workspace is left on the worker.
    assert_eq!(work_left_over(&stack), Vec::<String>::new());

    let out = stack.cli(&["result", &id, "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["diff"], super::e2e::EXPECTED_DIFF);
    assert_eq!(v["summary"]["outcome"], "finished");

    let out = stack.cli(&["result", &id, "--transcript"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("\"tool_result\""))
            .count(),
        5
    );

    // The uploaded ZIP was kept under the object layout.
    assert!(
        stack
            .data_dir
            .join(format!("objects/uploads/{id}/source.zip"))
            .exists()
    );
    assert!(
        stack
            .data_dir
            .join(format!("objects/staged/{id}/code.tar.zst"))
            .exists()
    );
    for f in [
        "diff.patch",
        "transcript.jsonl",
        "agent.log",
        "summary.json",
    ] {
        assert!(
            stack
                .data_dir
                .join(format!("objects/results/{id}/{f}"))
                .exists(),
            "{f}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_stops_cleanly_on_ctrl_c_and_leaves_no_server_behind() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let mut stack = Stack::start(Mode::Up, demo_script(), &[]).await;
    let data_dir = stack.data_dir.display().to_string();
    // The embedded dev server runs with its database under the data directory.
    assert!(!crate::support::processes_mentioning(&data_dir).is_empty());
    let up = stack.up.as_mut().unwrap();
    kill(Pid::from_raw(up.pid()), Signal::SIGINT).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = up.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "`patchflow up` did not stop on Ctrl-C"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}: {}", up.log_text());
    assert!(
        up.log_text().contains("Temporal dev server stopped"),
        "{}",
        up.log_text()
    );
    assert!(
        crate::support::processes_mentioning(&data_dir).is_empty(),
        "the dev server outlived `up`"
    );
}
