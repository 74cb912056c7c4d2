//! Round trips of every wire type, and the answers to hostile input (unknown fields, wrong
//! types, over-long values, malformed messages) with the exact error text a client sees.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use chrono::{TimeZone, Utc};
use patchflow_core::{
    AgentOutcome, AgentSummary, Limits, Secret, TaskAttempt, TaskId, TaskRecord, TaskSource,
    TaskSpec, TaskStatus,
};
use serde_json::{Value, json};

use crate::batch::{self, BadLine};
use crate::error::{InvalidBody, from_json};
use crate::kafka::{
    MAX_TASK_MESSAGE_BYTES, Malformed, RESULT_SCHEMA, ResultMessage, ResultObject, TaskMessage,
    parse_task_message,
};
use crate::{
    CancelBody, ErrorBody, FormFields, LimitsBody, RetryBody, RetryMode, StatusAnswer, SubmitBody,
    TaskPage, TaskView,
};

// Test helpers take literal JSON by value, so each call site reads as the document it builds.
#[allow(clippy::needless_pass_by_value)]
fn body(v: Value) -> Result<SubmitBody, InvalidBody> {
    from_json(v.to_string().as_bytes())
}

fn err_text(v: Value) -> String {
    body(v).unwrap_err().to_string()
}

#[test]
fn a_submit_body_keeps_its_field_names_both_ways() {
    let sent = json!({
        "git_url": "https://example.com/r.git",
        "git_ref": "main",
        "task_description": "fix it",
        "target_file": "src/x.py",
        "model": "m",
        "limits": {"max_steps": 5},
        "open_pr": true,
        "github_token": "ghp_secret",
        "branch_name": "fix",
        "tenant": "acme",
        "batch_id": "b1",
        "idempotency_key": "k1",
    });
    let b = body(sent.clone()).unwrap();
    assert_eq!(b.github_token, Some(Secret::new("ghp_secret")));
    assert_eq!(
        b.limits,
        Some(LimitsBody {
            max_steps: Some(5),
            ..LimitsBody::default()
        })
    );
    // A client sends exactly what it was given, the token included (only there).
    assert_eq!(serde_json::to_value(&b).unwrap(), sent);
    assert!(!format!("{b:?}").contains("ghp_secret"));
    // What was not given is not sent.
    let small = SubmitBody {
        git_url: Some("https://example.com/r.git".into()),
        task_description: Some("t".into()),
        ..SubmitBody::default()
    };
    assert_eq!(
        serde_json::to_value(&small).unwrap(),
        json!({"git_url": "https://example.com/r.git", "task_description": "t"})
    );
}

#[test]
fn a_submit_body_becomes_a_spec_in_one_way() {
    let spec = body(json!({
        "git_url": "  https://example.com/r.git ",
        "git_ref": " ",
        "task_description": "fix it",
        "target_file": "",
        "model": "m",
        "limits": {"max_tokens": 5000},
        "tenant": " ",
        "batch_id": "b1",
    }))
    .unwrap()
    .into_spec(false)
    .unwrap();
    assert_eq!(
        spec.source,
        TaskSource::Git {
            url: "https://example.com/r.git".into(),
            git_ref: None,
            git_token: None,
        }
    );
    assert_eq!(spec.target_file, None);
    assert_eq!(spec.model.as_deref(), Some("m"));
    assert_eq!(
        spec.limits,
        Limits {
            max_tokens: 5000,
            ..Limits::default()
        }
    );
    assert_eq!(spec.tenant, "default");
    assert_eq!(spec.batch_id.as_deref(), Some("b1"));

    let archive = body(json!({"task_description": "t"}))
        .unwrap()
        .into_spec(true)
        .unwrap();
    assert!(matches!(archive.source, TaskSource::Archive { .. }));
    assert_eq!(
        body(json!({"task_description": "t"}))
            .unwrap()
            .into_spec(false)
            .unwrap_err()
            .to_string(),
        "a source is required: git_url, or a zip_file part in a multipart upload"
    );
    assert_eq!(
        body(json!({"git_url": "https://x/r.git", "task_description": "t"}))
            .unwrap()
            .into_spec(true)
            .unwrap_err()
            .to_string(),
        "give either git_url or a zip_file upload, not both"
    );
}

#[test]
fn hostile_submit_bodies_are_refused_with_their_reason() {
    let e = err_text(
        json!({"git_url": "https://x/r.git", "task_description": "x", "descripton": "typo"}),
    );
    assert!(
        e.starts_with("invalid JSON body: unknown field `descripton`, expected one of `git_url`"),
        "{e}"
    );
    assert!(
        err_text(json!({"open_pr": "yes"}))
            .contains("invalid type: string \"yes\", expected a boolean"),
    );
    assert!(err_text(json!({"limits": 5})).contains("expected struct Limits"));
    assert!(
        err_text(json!({"limits": {"max_steps": -1}}))
            .contains("invalid value: integer `-1`, expected u32")
    );
    assert!(err_text(json!({"git_url": ["a"]})).contains("expected a string"));
    let e = from_json::<SubmitBody>(b"{not json")
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("invalid JSON body: key must be a string"),
        "{e}"
    );
    let e = from_json::<SubmitBody>(b"[]").unwrap_err().to_string();
    assert!(
        e.contains("invalid length 0, expected struct SubmitBody"),
        "{e}"
    );
    let e = from_json::<SubmitBody>(br#"["https://x/r.git"]"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("invalid length 1"), "{e}");
    // Unknown keys inside `limits` were always ignored, and still are.
    let b = body(json!({"limits": {"max_steps": 3, "colour": 1}})).unwrap();
    assert_eq!(b.limits.unwrap().resolve().max_steps, 3);

    // An over-long description parses, and the spec's own check names the limit.
    let long = "a".repeat(patchflow_core::task::MAX_DESCRIPTION_BYTES + 1);
    let spec = body(json!({"git_url": "https://example.com/r.git", "task_description": long}))
        .unwrap()
        .into_spec(false)
        .unwrap();
    let e = spec.validate(false).unwrap_err().to_string();
    assert!(
        e.contains("task_description") && e.contains("longer than 65536 bytes"),
        "{e}"
    );
}

#[test]
fn form_fields_read_like_the_json_body() {
    let mut f = FormFields::default();
    for (name, text) in [
        ("task_description", "fix it"),
        ("git_url", "https://x/r.git"),
        ("max_steps", " 7 "),
        ("max_tokens", ""),
        ("wall_seconds", "60"),
        ("open_pr", "on"),
        // The page's password field, left empty: not a token.
        ("git_token", ""),
    ] {
        f.add(name, text).unwrap();
    }
    let b = f.finish().unwrap();
    assert!(b.git_token.is_none());
    assert_eq!(
        b.limits,
        Some(LimitsBody {
            max_steps: Some(7),
            max_tokens: None,
            wall_seconds: Some(60),
            max_cost_usd: None,
        })
    );
    assert!(b.open_pr);
    assert_eq!(b.limits.unwrap().resolve().max_tokens, 200_000);

    let mut f = FormFields::default();
    assert_eq!(
        f.add("max_steps", "many").unwrap_err().to_string(),
        "field `max_steps` is not a number"
    );
    let e = f.add("limits", "{oops").unwrap_err().to_string();
    assert!(e.starts_with("field `limits` is not JSON: "), "{e}");

    // A `limits` that is not an object is refused as it comes (a number field could not go
    // into it: that used to panic).
    let mut f = FormFields::default();
    let e = f.add("limits", "5").unwrap_err().to_string();
    assert!(e.starts_with("field `limits` is not JSON: "), "{e}");
    f.add("max_steps", "3").unwrap();

    // A multipart `setup` is the JSON object, checked as the JSON body's is.
    let mut f = FormFields::default();
    f.add("task_description", "fix").unwrap();
    f.add(
        "setup",
        r#"{"setup_script": "make deps", "network": "off"}"#,
    )
    .unwrap();
    let b = f.finish().unwrap();
    assert_eq!(b.setup.unwrap().setup_script, "make deps");
    let mut f = FormFields::default();
    let e = f.add("setup", "make deps").unwrap_err().to_string();
    assert!(e.contains("setup is not a JSON object"), "{e}");
    let mut f = FormFields::default();
    f.add("setup", r#"{"setup_script": "x", "as_root": true}"#)
        .unwrap();
    let e = f.finish().unwrap_err().to_string();
    assert!(e.contains("as_root"), "{e}");

    let mut f = FormFields::default();
    f.add("colour", "red").unwrap();
    let e = f.finish().unwrap_err().to_string();
    assert!(
        e.starts_with("invalid form fields: unknown field `colour`"),
        "{e}"
    );
    let mut f = FormFields::default();
    f.add("max_steps", "5000000000").unwrap();
    let e = f.finish().unwrap_err().to_string();
    assert!(e.contains("expected u32"), "{e}");
}

#[test]
fn max_cost_usd_is_read_at_every_door_and_refused_naming_it() {
    // Given: into the spec's limits, the other limits at their defaults.
    let spec = body(
        json!({"git_url": "https://x/r.git", "task_description": "t",
                           "limits": {"max_cost_usd": 0.25}}),
    )
    .unwrap()
    .into_spec(false)
    .unwrap();
    assert_eq!(spec.limits.max_cost_usd, Some(patchflow_core::Usd(0.25)));
    assert_eq!(spec.limits.max_steps, Limits::default().max_steps);
    spec.validate(false).unwrap();
    // Not given, or null: no cap.
    for limits in [json!({"max_steps": 3}), json!({"max_cost_usd": null})] {
        let spec = body(
            json!({"git_url": "https://x/r.git", "task_description": "t",
                               "limits": limits}),
        )
        .unwrap()
        .into_spec(false)
        .unwrap();
        assert_eq!(spec.limits.max_cost_usd, None);
    }
    // What JSON cannot read as a double is refused by the body, naming the field.
    for raw in [
        r#"{"limits": {"max_cost_usd": 1e400}}"#,
        r#"{"limits": {"max_cost_usd": -1e400}}"#,
        r#"{"limits": {"max_cost_usd": "0.5"}}"#,
        r#"{"limits": {"max_cost_usd": "NaN"}}"#,
        r#"{"limits": {"max_cost_usd": [1]}}"#,
        r#"{"limits": {"max_cost_usd": true}}"#,
    ] {
        let e = from_json::<SubmitBody>(raw.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("invalid JSON body: limits.max_cost_usd: must be a number of dollars"),
            "{raw}: {e}"
        );
    }
    // A number out of range is refused by the spec's check, naming the field.
    for usd in [
        json!(0),
        json!(0.0),
        json!(-0.01),
        json!(-5),
        json!(1_000_000.5),
    ] {
        let spec = body(
            json!({"git_url": "https://x/r.git", "task_description": "t",
                               "limits": {"max_cost_usd": usd}}),
        )
        .unwrap()
        .into_spec(false)
        .unwrap();
        let e = spec.validate(false).unwrap_err().to_string();
        assert!(e.starts_with("limits.max_cost_usd: "), "{usd}: {e}");
    }

    // Multipart: a field of its own, or inside a `limits` field.
    let mut f = FormFields::default();
    f.add("max_cost_usd", " 1.5 ").unwrap();
    f.add("max_steps", "4").unwrap();
    let limits = f.finish().unwrap().limits.unwrap();
    assert_eq!(limits.max_cost_usd, Some(1.5));
    assert_eq!(limits.max_steps, Some(4));
    let mut f = FormFields::default();
    f.add("max_cost_usd", "").unwrap();
    assert_eq!(f.finish().unwrap().limits, None);
    for text in ["1e400", "NaN", "inf", "-inf", "a dollar", "0x10"] {
        let e = FormFields::default()
            .add("max_cost_usd", text)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("limits.max_cost_usd: must be a number of dollars"),
            "{text}: {e}"
        );
    }
    for text in [r#"{"max_cost_usd": 1e400}"#, r#"{"max_cost_usd": "1"}"#] {
        let e = FormFields::default()
            .add("limits", text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.max_cost_usd: must be"), "{text}: {e}");
    }
    let mut f = FormFields::default();
    f.add("limits", r#"{"max_cost_usd": 2, "max_tokens": 5000}"#)
        .unwrap();
    let limits = f.finish().unwrap().limits.unwrap();
    assert_eq!(limits.max_cost_usd, Some(2.0));
    assert_eq!(limits.max_tokens, Some(5000));
    // Sent as form fields and read back, the amount is the same.
    let b = body(
        json!({"git_url": "https://x/r.git", "task_description": "t",
                        "limits": {"max_cost_usd": 0.000_123}}),
    )
    .unwrap();
    let mut f = FormFields::default();
    for (name, text) in b.to_form_fields() {
        f.add(&name, &text).unwrap();
    }
    assert_eq!(f.finish().unwrap(), b);
    // The record's limits come back as a body with the cap.
    let l = Limits {
        max_cost_usd: Some(patchflow_core::Usd(3.0)),
        ..Limits::default()
    };
    assert_eq!(LimitsBody::from(l).resolve(), l);
}

#[test]
fn a_body_sent_as_form_fields_reads_back_the_same() {
    let b = body(json!({
        "git_url": "https://x/r.git",
        "task_description": "fix it",
        "limits": {"max_steps": 4, "wall_seconds": 90},
        "open_pr": true,
        "github_token": "ghp_x",
    }))
    .unwrap();
    let mut f = FormFields::default();
    for (name, text) in b.to_form_fields() {
        f.add(&name, &text).unwrap();
    }
    assert_eq!(f.finish().unwrap(), b);
}

#[test]
fn retry_and_cancel_bodies_read_as_before() {
    assert_eq!(
        RetryBody::from_bytes(b"").unwrap().mode,
        RetryMode::FromFailedStep
    );
    assert_eq!(RetryBody::from_bytes(b" \n").unwrap(), RetryBody::default());
    let r = RetryBody::from_bytes(br#"{"mode":"from_start"}"#).unwrap();
    assert_eq!(r.mode, RetryMode::FromStart);
    assert_eq!(
        serde_json::to_value(r).unwrap(),
        json!({"mode": "from_start"})
    );
    let e = RetryBody::from_bytes(br#"{"mode":"sideways"}"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("invalid JSON body: unknown variant `sideways`"),
        "{e}"
    );
    let e = RetryBody::from_bytes(br#"{"mode":"from_start","force":true}"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unknown field `force`"), "{e}");
    assert_eq!(
        "sideways".parse::<RetryMode>().unwrap_err().to_string(),
        "unknown retry mode `sideways` (from_start or from_failed_step)"
    );
    for m in [RetryMode::FromStart, RetryMode::FromFailedStep] {
        assert_eq!(m.as_str().parse::<RetryMode>().unwrap(), m);
    }

    assert_eq!(CancelBody::from_bytes(b"").unwrap().reason, "");
    let c = CancelBody::from_bytes(br#"{"reason":"enough","by":"me"}"#).unwrap();
    assert_eq!(c.reason, "enough");
    let e = CancelBody::from_bytes(br#"{"reason":5}"#)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("invalid JSON body: invalid type: integer `5`"),
        "{e}"
    );
}

fn record() -> TaskRecord {
    let at = Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap();
    let mut spec = TaskSpec::new(
        TaskSource::Git {
            url: "https://example.com/r.git".into(),
            git_ref: Some("main".into()),
            git_token: None,
        },
        "fix it",
    );
    spec.model = Some("m".into());
    TaskRecord {
        task_id: TaskId::generate(),
        status: TaskStatus::Completed,
        message: "done".into(),
        created_at: at,
        updated_at: at + chrono::Duration::milliseconds(1500),
        pr_url: None,
        pr_error: None,
        summary: Some(AgentSummary {
            outcome: AgentOutcome::Finished,
            summary: "fixed".into(),
            model: "m".into(),
            steps: 3,
            tool_calls: 2,
            prompt_tokens: 10,
            completion_tokens: 5,
            total_tokens: 15,
            cached_tokens: 4,
            reasoning_tokens: 1,
            cost_usd: 0.25,
            compactions: 0,
            wall_ms: 900,
            files_changed: vec!["src/x.py".into()],
            tests_passed: None,
            error: None,
            sandbox: None,
        }),
        tenant: "default".into(),
        batch_id: Some("b1".into()),
        idempotency_key: Some("b1/i1".into()),
        spec,
        attempt: 1,
        turns: Vec::new(),
        candidates: Vec::new(),
        selected: None,
        attempts: vec![TaskAttempt {
            attempt: 1,
            started_at: at,
            finished_at: Some(at),
            status: TaskStatus::Completed,
            message: "done".into(),
            run_id: Some("run-1".into()),
            worker: Some("patchflow@w1:42".into()),
        }],
    }
}

#[test]
fn the_task_view_round_trips_with_its_field_names() {
    let r = record();
    let id = r.task_id.clone();
    let view = TaskView::new(r, Some("http://ui/wf".into()));
    let v = serde_json::to_value(&view).unwrap();
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = vec![
        "task_id",
        "status",
        "message",
        "created_at",
        "updated_at",
        "pr_url",
        "summary",
        "source",
        "task_description",
        "target_file",
        "model",
        "limits",
        "tenant",
        "batch_id",
        "idempotency_key",
        "attempt",
        "attempts",
        "turns",
        "candidates",
        "selected",
        "links",
    ];
    want.sort_unstable();
    assert_eq!(keys, want);
    // One turn before any follow-up: the task as submitted, ended with the task.
    assert_eq!(v["turns"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["turns"][0]["turn"], 1);
    assert_eq!(v["turns"][0]["status"], "COMPLETED");
    assert_eq!(v["turns"][0]["finished_at"], v["updated_at"]);
    assert_eq!(v["candidates"], json!([]));
    assert_eq!(v["selected"], Value::Null);
    assert_eq!(v["status"], "COMPLETED");
    assert_eq!(v["source"], "https://example.com/r.git@main");
    assert_eq!(v["links"]["diff"], format!("/api/tasks/{id}/diff"));
    assert_eq!(v["links"]["workflow"], "http://ui/wf");
    assert_eq!(v["updated_at"], "2026-01-02T03:04:06.500Z");
    assert_eq!(v["attempts"][0].get("run_id"), None, "{v}");
    assert_eq!(v["attempts"][0]["worker"], "patchflow@w1:42", "{v}");
    // The CLI reads the view back and prints it: nothing is lost on the way.
    let back: TaskView = serde_json::from_value(v.clone()).unwrap();
    assert_eq!(back, view);
    assert_eq!(serde_json::to_value(&back).unwrap(), v);

    let page = TaskPage {
        tasks: vec![view],
        next_cursor: None,
    };
    let v = serde_json::to_value(&page).unwrap();
    assert_eq!(v["next_cursor"], Value::Null);
    assert_eq!(serde_json::from_value::<TaskPage>(v).unwrap(), page);

    let e = serde_json::from_value::<TaskView>(json!({"task_id": "bad!id"}))
        .unwrap_err()
        .to_string();
    assert!(!e.is_empty());
}

#[test]
fn short_answers_and_errors_keep_their_shape() {
    let a = StatusAnswer {
        task_id: TaskId::generate(),
        status: TaskStatus::Queued,
        message: "queued".into(),
    };
    let v = serde_json::to_value(&a).unwrap();
    assert_eq!(v["status"], "QUEUED");
    assert_eq!(serde_json::from_value::<StatusAnswer>(v).unwrap(), a);
    let e = ErrorBody::new("not_found", "task x not found");
    assert_eq!(
        serde_json::to_value(&e).unwrap(),
        json!({"code": "not_found", "message": "task x not found"})
    );
    let h = crate::Health {
        status: "ok".into(),
        cache: None,
    };
    assert_eq!(serde_json::to_value(h).unwrap(), json!({"status": "ok"}));
}

fn parse(payload: &str, key: Option<&str>) -> Result<TaskSpec, (Malformed, String)> {
    parse_task_message(
        Some(payload.as_bytes()),
        key.map(str::as_bytes),
        ("patchflow.tasks", 1, 7),
    )
}

#[test]
fn a_task_message_reads_like_the_http_body() {
    let spec = parse(
        r#"{"schema":"patchflow.task.v1","git_url":"https://github.com/o/r.git","git_ref":"abc123","task_description":"fix it","batch_id":"b1","limits":{"max_steps":5}}"#,
        Some("inst-1"),
    )
    .unwrap();
    assert_eq!(spec.idempotency_key.as_deref(), Some("inst-1"));
    assert_eq!(spec.batch_id.as_deref(), Some("b1"));
    assert_eq!(spec.limits.max_steps, 5);
    assert_eq!(
        spec.source.display_name(),
        "https://github.com/o/r.git@abc123"
    );
    // No key: named by its place in the log, the same on every redelivery.
    let spec = parse(
        r#"{"schema":"patchflow.task.v1","git_url":"https://x/r.git","task_description":"t"}"#,
        None,
    )
    .unwrap();
    assert_eq!(
        spec.idempotency_key.as_deref(),
        Some("kafka:patchflow.tasks:1:7")
    );
}

#[test]
fn a_produced_task_message_is_read_back_as_the_same_spec() {
    let b = batch::parse_line(
        r#"{"git_url":"https://x/r.git","task_description":"t","limits":{"wall_seconds":60}}"#,
        2,
        "run1",
        Some("m"),
    )
    .unwrap();
    let payload = serde_json::to_vec(&TaskMessage::new(&b)).unwrap();
    let v: Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(v["schema"], "patchflow.task.v1");
    assert_eq!(v["idempotency_key"], "run1/2");
    let spec = parse_task_message(Some(&payload), Some(b"run1/2"), ("t", 0, 0)).unwrap();
    assert_eq!(spec, b.into_spec(false).unwrap());
}

#[test]
fn each_kind_of_malformed_message_is_named() {
    let cases = [
        ("", Malformed::Empty, "no payload"),
        ("{not json", Malformed::BadJson, "not JSON"),
        ("[1,2]", Malformed::BadJson, "not an object"),
        (
            r#"{"schema":"patchflow.task.v9","git_url":"https://x/r.git","task_description":"t"}"#,
            Malformed::UnknownSchema,
            "patchflow.task.v9",
        ),
        (
            r#"{"schema":7,"git_url":"https://x/r.git","task_description":"t"}"#,
            Malformed::UnknownSchema,
            "unknown schema 7",
        ),
        (
            r#"{"git_url":"https://x/r.git","task_description":"t"}"#,
            Malformed::UnknownSchema,
            "`schema` field is missing",
        ),
        (
            r#"{"schema":"patchflow.task.v1","task_description":"t"}"#,
            Malformed::BadFields,
            "a source is required",
        ),
        (
            r#"{"schema":"patchflow.task.v1","git_url":"https://x/r.git"}"#,
            Malformed::BadFields,
            "task_description is required and must not be blank",
        ),
        (
            r#"{"schema":"patchflow.task.v1","git_url":"https://x/r.git","task_description":"t","colour":"red"}"#,
            Malformed::BadFields,
            "unknown field `colour`",
        ),
        (
            r#"{"schema":"patchflow.task.v1","git_url":"https://x/r.git","task_description":"t","open_pr":"yes"}"#,
            Malformed::BadFields,
            "invalid type: string \"yes\", expected a boolean",
        ),
    ];
    for (payload, kind, text) in cases {
        let (k, e) = parse(payload, Some("k")).unwrap_err();
        assert_eq!(k, kind, "{payload}: {e}");
        assert!(e.contains(text), "{payload}: {e}");
        assert!(!k.as_str().is_empty());
    }
    let big = format!(
        r#"{{"schema":"patchflow.task.v1","git_url":"https://x/r.git","task_description":"{}"}}"#,
        "a".repeat(MAX_TASK_MESSAGE_BYTES)
    );
    let (k, e) = parse(&big, Some("k")).unwrap_err();
    assert_eq!(k, Malformed::Oversized);
    assert_eq!(
        e,
        format!(
            "the message is {} bytes, more than the 524288 accepted",
            big.len()
        )
    );
}

#[test]
fn a_result_message_round_trips() {
    let m = ResultMessage {
        schema: RESULT_SCHEMA.into(),
        task_id: "tsk_1".into(),
        status: "COMPLETED".into(),
        message: "done".into(),
        summary: Some("fixed".into()),
        total_tokens: Some(1200),
        cached_tokens: Some(300),
        reasoning_tokens: Some(40),
        cost_usd: Some(0.012345),
        batch_id: None,
        idempotency_key: Some("k".into()),
        tenant: "default".into(),
        pr_url: None,
        pr_error: None,
        objects: [(
            "diff".to_string(),
            ResultObject {
                key: "results/tsk_1/diff.patch".into(),
                url: None,
            },
        )]
        .into(),
        finished_at: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
    };
    let v = serde_json::to_value(&m).unwrap();
    assert_eq!(v["schema"], "patchflow.result.v1");
    assert_eq!(
        v["objects"]["diff"],
        json!({"key": "results/tsk_1/diff.patch"})
    );
    assert_eq!(v["cost_usd"], 0.012345);
    assert_eq!(v["cached_tokens"], 300);
    assert_eq!(v["reasoning_tokens"], 40);
    assert_eq!(
        serde_json::from_value::<ResultMessage>(v.clone()).unwrap(),
        m
    );
    // A message written before these fields reads with none.
    let mut old = v;
    for k in [
        "total_tokens",
        "cached_tokens",
        "reasoning_tokens",
        "cost_usd",
    ] {
        old.as_object_mut().unwrap().remove(k);
    }
    let read = serde_json::from_value::<ResultMessage>(old).unwrap();
    assert_eq!((read.cost_usd, read.cached_tokens), (None, None));
}

#[test]
fn swe_bench_instances_become_tasks() {
    assert_eq!(
        batch::repo_url("astropy/astropy"),
        "https://github.com/astropy/astropy.git"
    );
    assert_eq!(batch::repo_url("file:///tmp/r"), "file:///tmp/r");
    assert_eq!(
        batch::repo_url("https://x.org/a/b.git"),
        "https://x.org/a/b.git"
    );
    assert_eq!(batch::repo_url("/srv/git/r"), "/srv/git/r");
    let b = batch::parse_line(
        r#"{"instance_id":"a__b-1","repo":"a/b","base_commit":"0123abc","problem_statement":"it breaks","hints_text":""}"#,
        1,
        "run1",
        None,
    )
    .unwrap();
    assert_eq!(b.git_url.as_deref(), Some("https://github.com/a/b.git"));
    assert_eq!(b.git_ref.as_deref(), Some("0123abc"));
    assert_eq!(b.task_description.as_deref(), Some("it breaks"));
    assert_eq!(b.idempotency_key.as_deref(), Some("run1/a__b-1"));
    assert_eq!(b.batch_id.as_deref(), Some("run1"));
    assert_eq!(batch::instance_of("run1/a__b-1", "run1"), "a__b-1");
    assert_eq!(batch::instance_of("other/a", "run1"), "other/a");
}

#[test]
fn bad_batch_lines_say_what_is_wrong() {
    let line = |l: &str| batch::parse_line(l, 3, "r", None);
    assert_eq!(
        line(r#"{"instance_id":"x","repo":"a/b"}"#).unwrap_err(),
        BadLine("`base_commit` is missing".into())
    );
    assert_eq!(
        line(r#"{"instance_id":"x","repo":"a/b","base_commit":5,"problem_statement":"p"}"#)
            .unwrap_err()
            .to_string(),
        "`base_commit` must be a non-empty string"
    );
    assert!(line("nope").unwrap_err().0.starts_with("not JSON: "));
    assert_eq!(line("[1]").unwrap_err().0, "not a JSON object");
    assert_eq!(
        line(r#"{"git_url":"https://x/r.git"}"#).unwrap_err().0,
        "`task_description` is missing"
    );
    assert_eq!(
        line(r#"{"task_description":"t"}"#).unwrap_err().0,
        "`git_url` is missing (or give a SWE-bench `instance_id`)"
    );
    // A field the gateway would refuse is refused here, before anything is sent.
    let e = line(r#"{"git_url":"https://x/r.git","task_description":"t","colour":1}"#)
        .unwrap_err()
        .0;
    assert!(
        e.starts_with("not a submit body: unknown field `colour`"),
        "{e}"
    );
    // A line's own key and schema are taken; the batch and the model are the batch's.
    let b = batch::parse_line(
        r#"{"schema":"patchflow.task.v1","git_url":"https://x/r.git","task_description":"t","idempotency_key":"i9","batch_id":"other","model":"x"}"#,
        7,
        "r",
        Some("m"),
    )
    .unwrap();
    assert_eq!(b.idempotency_key.as_deref(), Some("r/i9"));
    assert_eq!(b.batch_id.as_deref(), Some("r"));
    assert_eq!(b.model.as_deref(), Some("m"));
    let b = line(r#"{"git_url":"https://x/r.git","task_description":"t"}"#).unwrap();
    assert_eq!(b.idempotency_key.as_deref(), Some("r/3"));
}

#[test]
fn a_git_token_is_checked_kept_plain_only_in_memory_and_never_serialized() {
    let spec = body(json!({"git_url": "https://example.com/r.git", "task_description": "t", "git_token": "ghp_Secret123"}))
        .unwrap()
        .into_spec(false)
        .unwrap();
    let TaskSource::Git {
        git_token: Some(patchflow_core::GitToken::Plain(t)),
        ..
    } = &spec.source
    else {
        panic!("{:?}", spec.source)
    };
    assert_eq!(t.expose(), "ghp_Secret123");
    assert!(!format!("{spec:?}").contains("ghp_Secret123"));
    let e = serde_json::to_string(&spec).unwrap_err().to_string();
    assert!(e.contains("must be sealed"), "{e}");
    for bad in ["has space", "line\nbreak", "tab\there", "caf\u{e9}"] {
        let e =
            body(json!({"git_url": "https://x/r.git", "task_description": "t", "git_token": bad}))
                .unwrap()
                .into_spec(false)
                .unwrap_err()
                .to_string();
        assert!(e.starts_with("git_token:"), "{bad}: {e}");
    }
    let long = "a".repeat(5000);
    let e = body(json!({"git_url": "https://x/r.git", "task_description": "t", "git_token": long}))
        .unwrap()
        .into_spec(false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("longer than"), "{e}");
    // With a ZIP there is nothing to fetch: refused rather than dropped.
    let e = body(json!({"task_description": "t", "git_token": "abc"}))
        .unwrap()
        .into_spec(true)
        .unwrap_err()
        .to_string();
    assert_eq!(e, "git_token: only with a git_url");
}
