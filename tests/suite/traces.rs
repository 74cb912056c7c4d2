//! Traces: with `otlp_endpoint` set, one task is one connected trace across processes,
//! from the gateway's submit through the workflow (the context rides in the Temporal
//! headers), each activity, and the agent process (`TRACEPARENT`), down to every model
//! request and tool call, and none of it carries a secret. The collector is a test OTLP/HTTP
//! receiver that records what the exporters send.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use patchflow_scripted_model::otlp::{OtlpReceiver, ReceivedSpan};

use crate::support::{Mode, Stack, demo_script};

const MODEL_KEY: &str = "sk-trace-test-0b8f3c2e-never-exported";

/// The spans of the trace `submit_task` of `task` began, once its last steps have arrived.
async fn trace_of(otlp: &OtlpReceiver, task: &str) -> Vec<ReceivedSpan> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let spans = otlp.spans();
        let root = spans.iter().find(|s| {
            s.name == "submit_task" && s.attributes.get("task_id").map(String::as_str) == Some(task)
        });
        if let Some(root) = root {
            let trace: Vec<_> = spans
                .iter()
                .filter(|s| s.trace_id == root.trace_id)
                .cloned()
                .collect();
            let has = |n: &str| trace.iter().any(|s| s.name == n);
            if [
                "RunWorkflow:CodeTask",
                "RunActivity:publish_result",
                "agent",
                "tool_call",
            ]
            .iter()
            .all(|n| has(n))
            {
                return trace;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the trace of {task} did not arrive whole; got {:#?}",
            spans
                .iter()
                .map(|s| (&s.service, &s.name))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The demo task, submitted over HTTP with a `traceparent` header.
async fn submit_with_traceparent(stack: &Stack, traceparent: &str) -> String {
    let repo = crate::support::demo_git_repo(stack.dir.path());
    let r = stack
        .http
        .post(format!("{}/api/tasks", stack.base))
        .header("traceparent", traceparent)
        .json(&serde_json::json!({
            "git_url": format!("file://{}", repo.display()),
            "task_description": "fix",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    r.json::<serde_json::Value>().await.unwrap()["task_id"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_is_one_connected_trace_from_submit_to_each_tool_call() {
    let otlp = OtlpReceiver::start().await.unwrap();
    let endpoint = otlp.endpoint();
    let stack = Stack::start(
        Mode::Split,
        demo_script(),
        &[
            ("PATCHFLOW_OTLP_ENDPOINT", &endpoint),
            // Send within a tenth of a second, not the default five.
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("OPENAI_API_KEY", MODEL_KEY),
            // The workflow's own span ends (and is sent) when the workflow does: here at
            // once, not after the follow-up window.
            ("PATCHFLOW_FOLLOWUP_IDLE_HOURS", "0"),
        ],
    )
    .await;
    let id = stack.submit_demo().await;
    assert_eq!(stack.wait_terminal(&id).await["status"], "COMPLETED");
    let trace = trace_of(&otlp, &id).await;

    // One root: the submit, in the gateway. Every other span's parent is in the trace.
    let ids: HashSet<&str> = trace.iter().map(|s| s.span_id.as_str()).collect();
    let roots: Vec<_> = trace
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "{roots:#?}");
    assert_eq!(roots[0].name, "submit_task");
    assert_eq!(roots[0].service, "patchflow-gateway");
    for s in &trace {
        assert!(
            s.parent_span_id.is_empty() || ids.contains(s.parent_span_id.as_str()),
            "{} ({}) hangs off a span not in the trace: {trace:#?}",
            s.name,
            s.service
        );
    }
    let by_id: HashMap<&str, &ReceivedSpan> =
        trace.iter().map(|s| (s.span_id.as_str(), s)).collect();
    let parent = |s: &ReceivedSpan| by_id.get(s.parent_span_id.as_str()).copied();
    let one = |name: &str| {
        let found: Vec<_> = trace.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "{name}: {found:#?}");
        found[0]
    };

    // The gateway started the workflow under its submit; the worker ran it.
    let start = one("StartWorkflow:CodeTask");
    assert_eq!(start.service, "patchflow-gateway");
    assert_eq!(parent(start).unwrap().name, "submit_task");
    let workflow = one("RunWorkflow:CodeTask");
    assert_eq!(workflow.service, "patchflow-worker");
    for step in ["fetch_code", "stage_code", "run_agent", "publish_result"] {
        let run = one(&format!("RunActivity:{step}"));
        assert_eq!(run.service, "patchflow-worker", "{step}");
        let scheduled = parent(run).unwrap();
        assert_eq!(scheduled.name, format!("StartActivity:{step}"));
    }

    // The agent process's run hangs off the run_agent step, and every model request and
    // tool call off the agent (the demo: five requests, one tool call per step but the last).
    let agent = one("agent");
    assert_eq!(agent.service, "patchflow-agent");
    assert_eq!(parent(agent).unwrap().name, "RunActivity:run_agent");
    let requests: Vec<_> = trace.iter().filter(|s| s.name == "model_request").collect();
    assert_eq!(requests.len(), 5, "{requests:#?}");
    let tools: Vec<_> = trace.iter().filter(|s| s.name == "tool_call").collect();
    assert!(!tools.is_empty());
    for s in requests.iter().chain(&tools) {
        assert_eq!(s.service, "patchflow-agent");
        assert_eq!(parent(s).unwrap().span_id, agent.span_id, "{}", s.name);
    }
    assert!(requests.iter().all(|r| r.attributes["outcome"] == "ok"));
    assert!(
        tools
            .iter()
            .any(|t| t.attributes["tool"] == "read_file_content" && t.attributes["ok"] == "true"),
        "{tools:#?}"
    );

    // A caller that sends its own trace context (`traceparent`) gets the task's trace as
    // part of its own: the submit hangs off the caller's span. A value that is not a valid
    // one (here an attempt to smuggle a second header) is ignored: a fresh trace.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let joined =
        submit_with_traceparent(&stack, &format!("00-{caller_trace}-{caller_span}-01")).await;
    let hostile = submit_with_traceparent(
        &stack,
        &format!("00-{caller_trace}-{caller_span}-01, x-evil=1"),
    )
    .await;
    for id in [&joined, &hostile] {
        assert_eq!(stack.wait_terminal(id).await["status"], "COMPLETED");
    }
    let submit_of = |trace: &[ReceivedSpan]| {
        trace
            .iter()
            .find(|s| s.name == "submit_task")
            .cloned()
            .unwrap()
    };
    let under_caller = submit_of(&trace_of(&otlp, &joined).await);
    assert_eq!(under_caller.trace_id, caller_trace);
    assert_eq!(under_caller.parent_span_id, caller_span);
    let fresh = submit_of(&trace_of(&otlp, &hostile).await);
    assert_ne!(fresh.trace_id, caller_trace);
    assert!(fresh.parent_span_id.is_empty(), "{fresh:#?}");

    // Nothing secret went out: not the model key, not the caller's token.
    assert!(!otlp.bodies_contain(MODEL_KEY));
    assert!(!otlp.bodies_contain(&stack.token));
    assert_eq!(otlp.refused(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_the_spans_never_the_task() {
    // Nothing listens on the discard port of loopback.
    let stack = Stack::start(
        Mode::Up,
        demo_script(),
        &[
            ("PATCHFLOW_OTLP_ENDPOINT", "http://127.0.0.1:9"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
    )
    .await;
    let id = stack.submit_demo().await;
    let record = stack.wait_terminal(&id).await;
    assert_eq!(record["status"], "COMPLETED", "{record}");
    let (code, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert_eq!(code, 200);
    assert!(diff.contains("+    return a + b"), "{diff}");
}
