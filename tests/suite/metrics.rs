//! Prometheus metrics: one scrape of `patchflow up` after a demo task sees the task's door,
//! its end, each step's time, the agent's model requests, tokens and tool calls (counted
//! from its event stream and summary), and the HTTP and gRPC calls, labelled by route
//! pattern and method, never by a caller's text or a tenant.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use patchflow_gateway::grpc::proto;

use crate::support::{Mode, Stack, demo_script};

/// The value of the sample `name{labels}` in a scrape (0 when absent).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_scrape_of_up_sees_the_task_its_steps_its_agent_and_its_calls() {
    let stack = Stack::start(Mode::Up, demo_script(), &[]).await;
    let id = stack.submit_demo().await;
    assert_eq!(stack.wait_terminal(&id).await["status"], "COMPLETED");
    let mut grpc = stack.grpc_client().await;
    grpc.get_task(proto::GetTaskRequest {
        task_id: id.clone(),
    })
    .await
    .unwrap();
    grpc.get_task(proto::GetTaskRequest {
        task_id: "tsk_00000000000000000000000000000000".into(),
    })
    .await
    .unwrap_err();
    // A path a caller made up is counted under no label of its own.
    let (c, _) = stack
        .get_text("/api/tasks/%22%7D%201%0Apatchflow_fake%202")
        .await;
    assert_eq!(c, 400);

    let scrape = reqwest::get(&stack.metrics).await.unwrap();
    assert_eq!(scrape.status().as_u16(), 200);
    let text = scrape.text().await.unwrap();
    for (series, want) in [
        ("patchflow_tasks_submitted_total{door=\"http\"}", 1.0),
        ("patchflow_tasks_finished_total{status=\"COMPLETED\"}", 1.0),
        ("patchflow_task_step_seconds_count{step=\"queue\"}", 1.0),
        ("patchflow_task_step_seconds_count{step=\"fetch\"}", 1.0),
        ("patchflow_task_step_seconds_count{step=\"stage\"}", 1.0),
        ("patchflow_task_step_seconds_count{step=\"agent\"}", 1.0),
        ("patchflow_task_step_seconds_count{step=\"publish\"}", 1.0),
        ("patchflow_agents_running", 0.0),
        (
            "patchflow_llm_requests_total{model=\"scripted-test\",outcome=\"ok\"}",
            5.0,
        ),
        (
            "patchflow_tool_calls_total{tool=\"read_file_content\",ok=\"true\"}",
            1.0,
        ),
        (
            "patchflow_tool_calls_total{tool=\"run_shell_command\",ok=\"true\"}",
            1.0,
        ),
        (
            "patchflow_tool_call_seconds_count{tool=\"edit_file_content\"}",
            1.0,
        ),
        (
            "patchflow_http_requests_total{route=\"/api/tasks\",code=\"202\"}",
            1.0,
        ),
        (
            "patchflow_grpc_requests_total{method=\"Tasks/GetTask\",code=\"Ok\"}",
            1.0,
        ),
        (
            "patchflow_grpc_requests_total{method=\"Tasks/GetTask\",code=\"NotFound\"}",
            1.0,
        ),
    ] {
        assert_eq!(sample(&text, series), want, "{series} in:\n{text}");
    }
    assert!(
        sample(
            &text,
            "patchflow_llm_tokens_total{model=\"scripted-test\",kind=\"prompt\"}"
        ) > 0.0,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "patchflow_http_requests_total{route=\"/api/tasks/{task_id}\",code=\"200\"}"
        ) >= 1.0,
        "{text}"
    );
    assert!(!text.contains("patchflow_fake"), "{text}");
    assert!(!text.contains("tenant"), "a tenant became a label:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_metrics_tenant_labels_the_task_counts_and_cost_name_the_tenant() {
    let stack = Stack::start(
        Mode::Up,
        demo_script(),
        &[("PATCHFLOW_METRICS_TENANT_LABELS", "true")],
    )
    .await;
    let id = stack.submit_demo().await;
    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "COMPLETED");
    let tenant = r["tenant"].as_str().unwrap().to_string();
    let text = stack.scrape().await;
    for series in [
        format!("patchflow_tasks_submitted_total{{door=\"http\",tenant=\"{tenant}\"}}"),
        format!("patchflow_tasks_finished_total{{status=\"COMPLETED\",tenant=\"{tenant}\"}}"),
    ] {
        assert_eq!(sample(&text, &series), 1.0, "{series} in:\n{text}");
    }
    // (The scripted model's answers cost nothing, so no cost series: the unit test in
    // platform::metrics checks the cost's tenant label.) Only those: the step and tool series stay per-process.
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("patchflow_task_step_seconds") && l.contains("tenant")),
        "{text}"
    );
}
