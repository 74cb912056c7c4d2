//! A scripted OpenAI-compatible Chat Completions server: the one stand-in for an LLM
//! provider that patchflow's tests and its key-less demo use.
//!
//! It replays a [`Script`] of assistant turns (tool calls or a final answer) and checks
//! every request it receives: the model name, that the tool schemas carry the API's names (README)
//! and parameters, that every earlier tool call has its result, and any text the turn
//! expects in those results. A request it did not expect gets a 400 whose message says why
//! and is recorded as a violation, so a test fails loudly instead of passing by accident.
//!
//! The turn is chosen from the conversation itself (the number of assistant messages in the
//! request), so a retried request, a restarted agent, or many tasks at once all get the
//! right answer without shared cursors.

pub mod forge;
pub mod git_server;
pub mod oidc;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The tools and parameter names a request must declare (ARCHITECTURE.md's contracts).
pub const CONTRACT_TOOLS: [(&str, &[&str]); 7] = [
    (
        "run_shell_command",
        &["command_string", "target_directory", "timeout_seconds"],
    ),
    (
        "read_file_content",
        &["file_path", "start_line", "end_line"],
    ),
    ("edit_file_content", &["file_path", "old_text", "new_text"]),
    ("search_code", &["pattern", "path_glob", "max_results"]),
    ("web_search_doc_and_reference", &["query", "max_results"]),
    ("call_api", &["method", "url", "headers", "body"]),
    ("finish", &["summary"]),
];

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Script {
    /// The model name requests must carry; any when unset.
    #[serde(default)]
    pub model: Option<String>,
    pub turns: Vec<Turn>,
    /// Answer every request with this failure first (see [`Failure`]).
    #[serde(default)]
    pub fail: Option<Failure>,
    /// Wait this long before each answer (a slow model).
    #[serde(default)]
    pub delay_ms: u64,
    /// Text the system message of every request must contain (the agent's instructions).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expect_in_instructions: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Turn {
    /// Text each result of the previous turn's tool calls must contain, all of them, in the
    /// results taken together.
    #[serde(default)]
    pub expect_in_tool_results: Vec<String>,
    #[serde(default)]
    pub tool_calls: Vec<ScriptedCall>,
    #[serde(default)]
    pub content: Option<String>,
    /// Wait this long before answering this turn (on top of the script's `delay_ms`).
    #[serde(default)]
    pub delay_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedCall {
    pub name: String,
    pub arguments: Value,
}

/// Injected failures: answer `status` to the first `times` requests (all, if unset).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    pub status: u16,
    #[serde(default)]
    pub times: Option<u64>,
    #[serde(default = "default_failure_message")]
    pub message: String,
}

fn default_failure_message() -> String {
    "scripted upstream failure".into()
}

impl Script {
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// One tool call a turn, in order, then `finish`: the shape benchmarks and tool tests
    /// drive the agent with.
    pub fn calls_then_finish(calls: Vec<(&str, serde_json::Value)>) -> Self {
        let finish = ("finish", serde_json::json!({"summary": "done"}));
        let turns = calls
            .into_iter()
            .chain([finish])
            .map(|(name, arguments)| Turn {
                tool_calls: vec![ScriptedCall {
                    name: name.into(),
                    arguments,
                }],
                ..Turn::default()
            })
            .collect();
        Self {
            turns,
            ..Self::default()
        }
    }
}

/// What the server has seen, for tests to assert on.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Observed {
    pub requests: u64,
    pub answered: u64,
    pub failed_on_purpose: u64,
    pub violations: Vec<String>,
    /// Every request body, in arrival order.
    pub bodies: Vec<Value>,
    /// When each request arrived, and when its answer was ready (benchmarks use the gap
    /// between an answer and the next request: the client's own time per step).
    #[serde(skip)]
    pub arrivals: Vec<Instant>,
    #[serde(skip)]
    pub answered_at: Vec<Instant>,
}

struct Shared {
    script: Script,
    failure: Option<Failure>,
    failed: u64,
    observed: Observed,
}

/// A running scripted server.
#[derive(Clone)]
pub struct ScriptedModel {
    pub addr: SocketAddr,
    shared: Arc<Mutex<Shared>>,
}

impl ScriptedModel {
    /// Binds `addr` (port 0 for any) and serves in the background.
    pub async fn start(script: Script, addr: SocketAddr) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Mutex::new(Shared {
            failure: script.fail.clone(),
            script,
            failed: 0,
            observed: Observed::default(),
        }));
        let app = router(shared.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "scripted model server stopped");
            }
        });
        Ok(Self { addr, shared })
    }

    /// The base URL to give an OpenAI client (`.../v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn observed(&self) -> Observed {
        lock(&self.shared).observed.clone()
    }

    /// Replaces the injected failure (None: answer normally from now on).
    pub fn set_failure(&self, failure: Option<Failure>) {
        let mut s = lock(&self.shared);
        s.failure = failure;
        s.failed = 0;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The server's routes, for embedding in another axum app.
fn router(shared: Arc<Mutex<Shared>>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/chat/completions", post(chat))
        .route("/__script/state", get(state))
        .route("/__script/fail", post(set_fail).delete(clear_fail))
        .with_state(shared)
}

async fn state(State(shared): State<Arc<Mutex<Shared>>>) -> Json<Observed> {
    Json(lock(&shared).observed.clone())
}

async fn set_fail(State(shared): State<Arc<Mutex<Shared>>>, Json(f): Json<Failure>) -> StatusCode {
    let mut s = lock(&shared);
    s.failure = Some(f);
    s.failed = 0;
    StatusCode::NO_CONTENT
}

async fn clear_fail(State(shared): State<Arc<Mutex<Shared>>>) -> StatusCode {
    lock(&shared).failure = None;
    StatusCode::NO_CONTENT
}

fn error(status: StatusCode, message: &str, kind: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "param": null, "code": null}})),
    )
        .into_response()
}

async fn chat(State(shared): State<Arc<Mutex<Shared>>>, body: String) -> Response {
    let (answer, delay) = {
        let mut s = lock(&shared);
        s.observed.requests += 1;
        s.observed.arrivals.push(Instant::now());
        let delay = s.script.delay_ms;
        let body: Value = match serde_json::from_str(&body) {
            Ok(v) => v,
            Err(e) => {
                let msg = format!("scripted model: request body is not JSON: {e}");
                s.observed.violations.push(msg.clone());
                return error(StatusCode::BAD_REQUEST, &msg, "invalid_request_error");
            }
        };
        s.observed.bodies.push(body.clone());
        if let Some(f) = s.failure.clone()
            && f.times.is_none_or(|n| s.failed < n)
        {
            s.failed += 1;
            s.observed.failed_on_purpose += 1;
            let status =
                StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return error(status, &f.message, "server_error");
        }
        match answer_for(&s.script, &body) {
            Ok((a, turn_delay)) => {
                s.observed.answered += 1;
                (a, delay + turn_delay)
            }
            Err(msg) => {
                let msg = format!("scripted model: {msg}");
                tracing::error!("{msg}");
                s.observed.violations.push(msg.clone());
                return error(StatusCode::BAD_REQUEST, &msg, "invalid_request_error");
            }
        }
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let response = Json(answer).into_response();
    lock(&shared).observed.answered_at.push(Instant::now());
    response
}

/// Checks a request against the script and builds the answer for its turn, with the
/// turn's own delay in milliseconds.
pub fn answer_for(script: &Script, body: &Value) -> Result<(Value, u64), String> {
    let model = body["model"].as_str().unwrap_or_default();
    if let Some(want) = &script.model
        && model != want
    {
        return Err(format!("expected model `{want}`, got `{model}`"));
    }
    check_tools(&body["tools"])?;
    let messages = body["messages"]
        .as_array()
        .ok_or("request has no messages")?;
    let system: String = messages
        .iter()
        .filter(|m| m["role"] == "system")
        .filter_map(|m| m["content"].as_str())
        .collect();
    if let Some(want) = script
        .expect_in_instructions
        .iter()
        .find(|w| !system.contains(w.as_str()))
    {
        return Err(format!("the instructions do not contain `{want}`"));
    }
    // Every tool call the assistant made must be answered by a tool message.
    let mut pending: Vec<String> = Vec::new();
    let mut last_results = String::new();
    let mut turn = 0usize;
    for m in messages {
        match m["role"].as_str().unwrap_or_default() {
            "assistant" => {
                if !pending.is_empty() {
                    return Err(format!(
                        "tool calls {pending:?} have no results before the next assistant turn"
                    ));
                }
                turn += 1;
                last_results.clear();
                for c in m["tool_calls"].as_array().into_iter().flatten() {
                    pending.push(c["id"].as_str().unwrap_or_default().to_string());
                }
            }
            "tool" => {
                let id = m["tool_call_id"].as_str().unwrap_or_default();
                let Some(pos) = pending.iter().position(|p| p == id) else {
                    return Err(format!("tool result for unknown call `{id}`"));
                };
                pending.remove(pos);
                last_results.push_str(m["content"].as_str().unwrap_or_default());
                last_results.push('\n');
            }
            _ => {}
        }
    }
    if !pending.is_empty() {
        return Err(format!("tool calls {pending:?} have no results"));
    }
    let Some(t) = script.turns.get(turn) else {
        return Err(format!(
            "unexpected request: the script has {} turns and this is turn {}",
            script.turns.len(),
            turn + 1
        ));
    };
    for want in &t.expect_in_tool_results {
        if !last_results.contains(want.as_str()) {
            return Err(format!(
                "turn {}: expected the tool results to contain {want:?}, got {last_results:?}",
                turn + 1
            ));
        }
    }
    let calls: Vec<Value> = t
        .tool_calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "id": format!("call_{}_{}", turn + 1, i + 1),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments.to_string()},
            })
        })
        .collect();
    let prompt_tokens = (body.to_string().len() / 4) as u64;
    let completion_tokens = (serde_json::to_string(&calls).unwrap_or_default().len() / 4
        + t.content.as_deref().unwrap_or_default().len() / 4
        + 1) as u64;
    let mut message = json!({"role": "assistant", "content": t.content});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let answer = json!({
        "id": format!("chatcmpl-scripted-{}", turn + 1),
        "object": "chat.completion",
        "created": 0,
        "model": if model.is_empty() { "scripted" } else { model },
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": if t.tool_calls.is_empty() { "stop" } else { "tool_calls" },
        }],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    });
    Ok((answer, t.delay_ms))
}

fn check_tools(tools: &Value) -> Result<(), String> {
    let tools = tools.as_array().ok_or("request declares no tools")?;
    for (name, params) in CONTRACT_TOOLS {
        let Some(t) = tools.iter().find(|t| t["function"]["name"] == name) else {
            return Err(format!("tool `{name}` is missing from the request"));
        };
        let props = &t["function"]["parameters"]["properties"];
        for p in params {
            if props.get(*p).is_none() {
                return Err(format!("tool `{name}` lacks parameter `{p}`"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> Value {
        Value::Array(
            CONTRACT_TOOLS
                .iter()
                .map(|(n, ps)| {
                    let props: serde_json::Map<String, Value> =
                        ps.iter().map(|p| (p.to_string(), json!({}))).collect();
                    json!({"type": "function", "function": {"name": n, "parameters": {"properties": props}}})
                })
                .collect(),
        )
    }

    fn script() -> Script {
        Script::from_json(
            r#"{"model":"m","turns":[
                {"tool_calls":[{"name":"read_file_content","arguments":{"file_path":"a"}}]},
                {"expect_in_tool_results":["hello"],"content":"done"}]}"#,
        )
        .unwrap()
    }

    #[test]
    fn picks_the_turn_from_the_conversation_and_checks_results() {
        let s = script();
        let first = json!({"model":"m","tools":tools(),"messages":[{"role":"user","content":"x"}]});
        let a = answer_for(&s, &first).unwrap().0;
        assert_eq!(
            a["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
            "read_file_content"
        );
        let call = a["choices"][0]["message"].clone();
        let second = json!({"model":"m","tools":tools(),"messages":[
            {"role":"user","content":"x"}, call,
            {"role":"tool","tool_call_id":"call_1_1","content":"hello world"}]});
        assert_eq!(
            answer_for(&s, &second).unwrap().0["choices"][0]["message"]["content"],
            "done"
        );
        let missing =
            json!({"model":"m","tools":tools(),"messages":[{"role":"user","content":"x"}, call]});
        assert!(
            answer_for(&s, &missing)
                .unwrap_err()
                .contains("have no results")
        );
        let wrong = json!({"model":"m","tools":tools(),"messages":[
            {"role":"user","content":"x"}, call,
            {"role":"tool","tool_call_id":"call_1_1","content":"bye"}]});
        assert!(
            answer_for(&s, &wrong)
                .unwrap_err()
                .contains("expected the tool results to contain")
        );
        let bad_model = json!({"model":"other","tools":tools(),"messages":[]});
        assert!(
            answer_for(&s, &bad_model)
                .unwrap_err()
                .contains("expected model")
        );
        let no_tools = json!({"model":"m","tools":[],"messages":[]});
        assert!(answer_for(&s, &no_tools).unwrap_err().contains("missing"));
    }

    #[test]
    fn a_request_past_the_script_is_a_violation() {
        let s = Script {
            turns: vec![Turn {
                content: Some("x".into()),
                ..Turn::default()
            }],
            ..Script::default()
        };
        let body =
            json!({"model":"m","tools":tools(),"messages":[{"role":"assistant","content":"x"}]});
        assert!(
            answer_for(&s, &body)
                .unwrap_err()
                .contains("unexpected request")
        );
    }
}
