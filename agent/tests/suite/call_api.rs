//! `call_api` through wasi:http under the task's egress policy: an allowed local server is
//! reached with the secret header the host adds; anything else is refused before a
//! connection is made; the secret never reaches the transcript.

use std::sync::Arc;

use patchflow_agent::ToolDispatch;
use patchflow_agent::wasm::egress::{Egress, MAX_RESPONSE_BODY};
use patchflow_agent::wasm::{ApiRequest, CallLimits, TOOLS_COMPONENT};
use patchflow_core::{SecretHeader, ToolPolicy};
use serde_json::json;

use super::support::{Setup, TestServer, err, fixture, host, run_agent, tool_outputs};

const SECRET: &str = "s3cr3t-token-7f1c";

fn policy(allowed: &str) -> ToolPolicy {
    ToolPolicy {
        network: false,
        allow_hosts: vec![allowed.to_string()],
        secrets: vec![SecretHeader {
            host: allowed.to_string(),
            header: "X-Api-Key".into(),
            env: "PF_TEST_API_KEY".into(),
        }],
    }
}

#[tokio::test]
async fn call_api_reaches_an_allowed_host_with_the_secret_which_stays_out_of_the_transcript() {
    let server = TestServer::start().await;
    let allowed = server.addr.to_string();
    let egress = Egress::from_policy(&policy(&allowed), |name| {
        (name == "PF_TEST_API_KEY").then(|| SECRET.to_string())
    })
    .unwrap();
    let fx = fixture(Setup {
        egress,
        ..Setup::default()
    });
    let url = format!("http://{allowed}/v1/items?q=1");
    let (summary, transcript) = run_agent(
        fx,
        vec![(
            "call_api",
            // The model tries to set the secret header itself: the host's value wins.
            json!({"method": "POST", "url": url, "headers": {"X-Api-Key": "from-model", "X-Trace": "t1"}, "body": "{\"a\":1}"}),
        )],
    )
    .await;
    let seen = server.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let head = seen[0].head.to_ascii_lowercase();
    assert!(head.starts_with("post /v1/items?q=1 http/1.1"), "{head}");
    assert!(head.contains(&format!("x-api-key: {SECRET}")), "{head}");
    assert!(!head.contains("from-model"), "{head}");
    assert!(head.contains("x-trace: t1"), "{head}");
    assert_eq!(seen[0].body, "{\"a\":1}");
    let out = &tool_outputs(&transcript)[0];
    assert_eq!(out["status"], 200, "{out}");
    // The server echoed the secret back in a header and the body; both are redacted.
    assert_eq!(out["headers"]["x-echo"], "x-api-key: [secret]");
    assert!(out["body"].as_str().unwrap().contains("[secret]"));
    assert!(
        !transcript.contains(SECRET),
        "the secret reached the transcript"
    );
    assert_eq!(summary.outcome, patchflow_core::AgentOutcome::Finished);
}

#[tokio::test]
async fn call_api_to_a_host_not_on_the_list_is_refused_before_any_connection() {
    let allowed = TestServer::start().await;
    let other = TestServer::start().await;
    let egress = Egress::from_policy(
        &ToolPolicy {
            allow_hosts: vec![allowed.addr.to_string()],
            ..ToolPolicy::default()
        },
        |_| None,
    )
    .unwrap();
    let fx = fixture(Setup {
        egress,
        ..Setup::default()
    });
    let args = json!({"method": "GET", "url": format!("http://{}/", other.addr)}).to_string();
    let out = fx.tools.call("call_api", &args).await;
    assert_eq!(
        err(&out.value),
        format!(
            "call_api: host `{}` is not allowed by this task's policy (allowed hosts: {})",
            other.addr, allowed.addr
        )
    );
    let out = fx
        .tools
        .call(
            "call_api",
            r#"{"method":"GET","url":"https://example.com/"}"#,
        )
        .await;
    assert!(err(&out.value).contains("host `example.com` is not allowed"));
    let out = fx
        .tools
        .call(
            "call_api",
            r#"{"method":"TRACE","url":"https://example.com/"}"#,
        )
        .await;
    assert!(err(&out.value).contains("method `TRACE` is not allowed"));
    assert_eq!(other.connections(), 0);
    assert_eq!(allowed.connections(), 0);

    // The default policy allows nothing.
    let fx = fixture(Setup::default());
    let args = json!({"method": "GET", "url": format!("http://{}/", allowed.addr)}).to_string();
    let out = fx.tools.call("call_api", &args).await;
    assert!(err(&out.value).ends_with("(allowed hosts: none)"));
    assert_eq!(allowed.connections(), 0);
}

#[tokio::test]
async fn a_guest_that_skips_the_host_check_is_still_refused_at_send() {
    let server = TestServer::start().await;
    let host = host(TOOLS_COMPONENT, CallLimits::default());
    let ws = tempfile::tempdir().unwrap();
    let request = ApiRequest {
        method: "GET".into(),
        url: format!("http://{}/", server.addr),
        headers: Vec::new(),
        body: None,
        max_response_bytes: MAX_RESPONSE_BODY,
    };
    let result = tokio::task::spawn_blocking(move || {
        host.call(ws.path(), Arc::new(Egress::none()), move |g, store| {
            g.call_call_api(store, &request)
        })
    })
    .await
    .unwrap();
    let e = result.unwrap_err().to_string();
    assert!(e.contains("HttpRequestDenied"), "{e}");
    assert_eq!(server.connections(), 0);
}
