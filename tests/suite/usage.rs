//! The usage report through the real stack: tasks of two tenants run against the scripted
//! model (its answers priced from a model table), then `GET /api/usage`, gRPC `GetUsage`
//! and `patchflow usage` answer per-tenant totals equal to the sum of the tasks' summaries;
//! a member or viewer sees only its tenant, an admin every tenant; bad `from`/`to` are 400
//! naming the parameter. `limits.max_cost_usd` is checked at the door and capped by the
//! tenant's quota, and `patchflow status` shows what a task used.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use patchflow_gateway::grpc::proto;
use serde_json::{Value, json};
use tonic::Code;

use crate::support::{Mode, Stack, demo_git_repo, demo_script, http_with};

/// The summary fields the report sums, as the report names them.
const SUMMED: [&str; 5] = [
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "total_tokens",
];

async fn call(http: &reqwest::Client, url: &str, body: Option<&Value>) -> (u16, Value) {
    let req = match body {
        Some(b) => http.post(url).json(b),
        None => http.get(url),
    };
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
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

/// Submits the demo as the holder of `http`'s token, with `extra` fields in the body.
async fn submit(stack: &Stack, http: &reqwest::Client, extra: Value) -> (u16, Value) {
    let repo = demo_git_repo(stack.dir.path());
    let mut body =
        json!({"git_url": format!("file://{}", repo.display()), "task_description": "fix"});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    call(http, &format!("{}/api/tasks", stack.base), Some(&body)).await
}

/// What the report should say of these records: tasks, each summed count, and dollars.
fn expected(records: &[&Value]) -> (u64, [u64; 5], f64) {
    let mut counts = [0u64; 5];
    let mut cost = 0.0;
    for r in records {
        let s = &r["summary"];
        for (i, f) in SUMMED.iter().enumerate() {
            counts[i] += s[f].as_u64().unwrap();
        }
        cost += s["cost_usd"].as_f64().unwrap();
    }
    (records.len() as u64, counts, cost)
}

/// A report's (or a part's) figures in the order of [`expected`].
fn figures(rows: &[&Value]) -> (u64, [u64; 5], f64) {
    let mut counts = [0u64; 5];
    let mut tasks = 0;
    let mut cost = 0.0;
    for r in rows {
        tasks += r["tasks"].as_u64().unwrap();
        for (i, f) in SUMMED.iter().enumerate() {
            counts[i] += r[f].as_u64().unwrap();
        }
        cost += r["cost_usd"].as_f64().unwrap();
    }
    (tasks, counts, cost)
}

fn assert_same(got: (u64, [u64; 5], f64), want: (u64, [u64; 5], f64), what: &str) {
    assert_eq!((got.0, got.1), (want.0, want.1), "{what}");
    assert!(
        (got.2 - want.2).abs() < 1e-9,
        "{what}: ${} vs ${}",
        got.2,
        want.2
    );
}

/// The rows of one tenant in a report.
fn rows_of<'a>(report: &'a Value, tenant: &str) -> Vec<&'a Value> {
    report["days"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["tenant"] == tenant)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_sums_each_tenants_task_summaries_and_shows_only_what_the_caller_may_see() {
    let models = r#"{"scripted-test": {"input_price": 2.0, "cached_input_price": 0.5, "output_price": 8.0}}"#;
    let quotas = r#"{"team-b": {"max_cost_usd": 5}}"#;
    let stack = Stack::start(
        Mode::Up,
        demo_script(),
        &[("PATCHFLOW_MODELS", models), ("PATCHFLOW_TENANTS", quotas)],
    )
    .await;
    let member_a = http_with(Some(&new_token(&stack, "team-a", "member").await));
    let viewer_a_token = new_token(&stack, "team-a", "viewer").await;
    let viewer_a = http_with(Some(&viewer_a_token));
    let member_b_token = new_token(&stack, "team-b", "member").await;
    let member_b = http_with(Some(&member_b_token));

    // `limits.max_cost_usd` at the door: anything but an amount above 0 is a 400 naming it.
    for bad in [json!(-1), json!(0), json!("0.5"), json!(2_000_000)] {
        let (c, v) = submit(&stack, &member_a, json!({"limits": {"max_cost_usd": bad}})).await;
        assert_eq!(c, 400, "{bad}: {v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .contains("limits.max_cost_usd"),
            "{bad}: {v}"
        );
    }
    let raw = r#"{"git_url": "file:///nowhere", "task_description": "fix", "limits": {"max_cost_usd": 1e400}}"#;
    let r = member_a
        .post(format!("{}/api/tasks", stack.base))
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("limits.max_cost_usd"),
        "{v}"
    );
    // Team B's quota caps the cost: over it is refused, none given gets the cap.
    let (c, v) = submit(&stack, &member_b, json!({"limits": {"max_cost_usd": 10}})).await;
    assert_eq!(c, 400, "{v}");
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("over tenant `team-b`'s cap"),
        "{v}"
    );

    // Two tasks of team A (one with a cost cap of its own), one of team B.
    let mut ids_a = Vec::new();
    for extra in [json!({}), json!({"limits": {"max_cost_usd": 2.5}})] {
        let (c, v) = submit(&stack, &member_a, extra).await;
        assert_eq!(c, 202, "{v}");
        ids_a.push(v["task_id"].as_str().unwrap().to_string());
    }
    let (c, v) = submit(&stack, &member_b, json!({})).await;
    assert_eq!(c, 202, "{v}");
    let id_b = v["task_id"].as_str().unwrap().to_string();

    let mut records_a = Vec::new();
    for id in &ids_a {
        let r = stack.wait_terminal(id).await;
        assert_eq!(r["status"], "COMPLETED", "{r}");
        records_a.push(r);
    }
    let record_b = stack.wait_terminal(&id_b).await;
    assert_eq!(record_b["status"], "COMPLETED", "{record_b}");
    assert_eq!(records_a[1]["limits"]["max_cost_usd"], 2.5);
    assert!(records_a[0]["limits"].get("max_cost_usd").is_none());
    assert_eq!(record_b["limits"]["max_cost_usd"], 5.0);
    for r in records_a.iter().chain([&record_b]) {
        let s = &r["summary"];
        assert!(s["total_tokens"].as_u64().unwrap() > 0, "{r}");
        assert!(s["cost_usd"].as_f64().is_some(), "{r}");
    }
    let want_a = expected(&records_a.iter().collect::<Vec<_>>());
    let want_b = expected(&[&record_b]);

    // A member sees its tenant's usage: every row its own, the totals its tasks' sums.
    let (c, mine) = call(&member_a, &format!("{}/api/usage", stack.base), None).await;
    assert_eq!(c, 200, "{mine}");
    assert_eq!(mine["tenants"], json!(["team-a"]), "{mine}");
    assert!(rows_of(&mine, "team-b").is_empty(), "{mine}");
    assert_same(figures(&[&mine["total"]]), want_a, "team A's total");
    assert_same(figures(&rows_of(&mine, "team-a")), want_a, "team A's rows");
    for d in mine["days"].as_array().unwrap() {
        assert_eq!(d["model"], "scripted-test", "{mine}");
        assert_eq!(d["day"].as_str().unwrap().len(), 10, "{mine}");
    }
    // A viewer reads the same; naming another tenant is refused.
    let (c, seen) = call(&viewer_a, &format!("{}/api/usage", stack.base), None).await;
    assert_eq!(c, 200, "{seen}");
    assert_eq!(seen["total"], mine["total"]);
    let (c, v) = call(
        &member_a,
        &format!("{}/api/usage?tenant=team-b", stack.base),
        None,
    )
    .await;
    assert_eq!(c, 403, "{v}");
    let (c, b_only) = call(&member_b, &format!("{}/api/usage", stack.base), None).await;
    assert_eq!(c, 200, "{b_only}");
    assert_same(figures(&[&b_only["total"]]), want_b, "team B's total");

    // An admin sees both tenants, each with its own sums, or one it names.
    let (c, all) = call(&stack.http, &format!("{}/api/usage", stack.base), None).await;
    assert_eq!(c, 200, "{all}");
    assert_eq!(all["tenants"], json!(["team-a", "team-b"]), "{all}");
    assert_same(figures(&rows_of(&all, "team-a")), want_a, "admin: team A");
    assert_same(figures(&rows_of(&all, "team-b")), want_b, "admin: team B");
    assert_same(
        figures(&[&all["total"]]),
        (
            want_a.0 + want_b.0,
            std::array::from_fn(|i| want_a.1[i] + want_b.1[i]),
            want_a.2 + want_b.2,
        ),
        "admin: total",
    );
    let (c, named) = call(
        &stack.http,
        &format!("{}/api/usage?tenant=team-b", stack.base),
        None,
    )
    .await;
    assert_eq!(c, 200, "{named}");
    assert_eq!(named["tenants"], json!(["team-b"]));
    assert_same(figures(&[&named["total"]]), want_b, "admin naming team B");

    // Bounds: dates or RFC 3339 times; a range before the tasks is empty.
    let today = chrono::Utc::now().date_naive();
    let tomorrow = today.succ_opt().unwrap();
    let (c, v) = call(
        &member_a,
        &format!("{}/api/usage?from={today}&to={tomorrow}", stack.base),
        None,
    )
    .await;
    assert_eq!(c, 200, "{v}");
    assert_eq!(v["from"], format!("{today}T00:00:00Z"));
    let (c, v) = call(
        &member_a,
        &format!(
            "{}/api/usage?from=2020-01-01T00:00:00Z&to=2020-01-02",
            stack.base
        ),
        None,
    )
    .await;
    assert_eq!(c, 200, "{v}");
    assert_eq!(v["days"], json!([]));
    assert_eq!(v["total"]["tasks"], 0);
    // Bad bounds: 400, naming the parameter or the rule.
    for (query, needle) in [
        ("from=last-week", "from: `last-week`"),
        ("to=2026-02-30", "to: `2026-02-30`"),
        ("from=2026-03-02&to=2026-03-01", "must be before to"),
        ("from=2026-03-01&to=2026-03-01", "must be before to"),
        ("from=2024-01-01&to=2026-01-01", "longer than 366 days"),
    ] {
        let (c, v) = call(
            &member_a,
            &format!("{}/api/usage?{query}", stack.base),
            None,
        )
        .await;
        assert_eq!(c, 400, "{query}: {v}");
        assert_eq!(v["code"], "invalid_request", "{v}");
        assert!(
            v["message"].as_str().unwrap().contains(needle),
            "{query}: {v}"
        );
    }
    let (c, _) = call(&http_with(None), &format!("{}/api/usage", stack.base), None).await;
    assert_eq!(c, 401);

    // gRPC answers the same report, with the same refusals.
    let mut grpc_b = stack.grpc_as(Some(&member_b_token)).await;
    let g = grpc_b
        .get_usage(proto::GetUsageRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(g.tenants, ["team-b"]);
    let t = g.total.unwrap();
    assert_same(
        (
            t.tasks,
            [
                t.prompt_tokens,
                t.completion_tokens,
                t.cached_tokens,
                t.reasoning_tokens,
                t.total_tokens,
            ],
            t.cost_usd,
        ),
        want_b,
        "gRPC: team B",
    );
    let e = grpc_b
        .get_usage(proto::GetUsageRequest {
            from: Some("soon".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("from: `soon`"), "{e:?}");
    let e = grpc_b
        .get_usage(proto::GetUsageRequest {
            tenant: Some("team-a".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // The gRPC record shows what the task used, and its cost cap.
    let task = stack
        .grpc_client()
        .await
        .get_task(proto::GetTaskRequest {
            task_id: id_b.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let s = task.summary.unwrap();
    assert_eq!(
        s.cached_tokens,
        record_b["summary"]["cached_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        s.cost_usd,
        record_b["summary"]["cost_usd"].as_f64().unwrap()
    );
    assert_eq!(task.limits.unwrap().max_cost_usd, Some(5.0));

    // `patchflow usage`: the same report as JSON, and as a table with the totals.
    let out = stack
        .command(&["usage", "--json"])
        .env("PATCHFLOW_TOKEN", &viewer_a_token)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli["total"], mine["total"]);
    let out = stack.cli(&["usage"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    let total_line = table.lines().last().unwrap();
    assert!(total_line.starts_with("total "), "{table}");
    assert!(
        total_line.ends_with(&format!("{:.6}", want_a.2 + want_b.2)),
        "{table}"
    );
    assert!(
        table.contains("team-a") && table.contains("team-b"),
        "{table}"
    );
    let out = stack
        .command(&["usage", "--from", "yesterday"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("from: `yesterday`"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `patchflow status` shows the task's tokens and cost.
    let out = stack.cli(&["status", &ids_a[0]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let s = &records_a[0]["summary"];
    assert!(
        text.contains(&format!(
            "({} cached) + {} completion ({} reasoning) tokens, ${:.6}",
            s["cached_tokens"],
            s["completion_tokens"],
            s["reasoning_tokens"],
            s["cost_usd"].as_f64().unwrap()
        )),
        "{text}"
    );
    // `patchflow submit --max-cost-usd` sends the cap.
    let repo = demo_git_repo(stack.dir.path());
    let out = stack
        .command(&[
            "submit",
            &format!("file://{}", repo.display()),
            "-d",
            "fix",
            "--max-cost-usd",
            "0.75",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(stack.record(&id).await["limits"]["max_cost_usd"], 0.75);
    stack.wait_terminal(&id).await;
}
