//! A scripted OpenAI-compatible model server: the one stand-in for an LLM provider that
//! patchflow's tests and its key-less demo use. It speaks both wires, Chat Completions
//! (`POST /v1/chat/completions`) and Responses (`POST /v1/responses`), each with or without
//! `"stream": true` (server-sent events shaped like OpenAI's).
//!
//! It replays a [`Script`] of assistant turns (tool calls, text, and on the Responses wire
//! a reasoning item) and checks every request it receives: the model name, that the tool
//! schemas carry the API's names (README) and parameters, that every tool call present has
//! its result (and every result its call), any text the turn expects in those results, on
//! the Responses wire `store: false` and that a turn's reasoning item is sent back with its
//! function calls. A request it did not expect gets a 400 whose message says why and is
//! recorded as a violation, so a test fails loudly instead of passing by accident.
//!
//! The turn is chosen from the conversation itself, so a retried request, a restarted
//! agent, or many tasks at once all get the right answer without shared cursors: tool-call
//! ids are `call_<turn>_<i>`, and a request carrying such ids asks for the turn after the
//! latest of them (plus any assistant message after it); one without them, for the turn
//! after its assistant messages. Older turns may be missing (context compaction).
//!
//! Beyond the script's turns it answers compaction requests (instructions containing
//! [`COMPACTION_MARKER`] and no tools) with a summary without using a turn, reports usage
//! (estimated, or scripted per turn), refuses requests larger than the script's
//! `context_window` with OpenAI's `context_length_exceeded`, injects failures (OpenAI-shaped
//! error bodies, `Retry-After`) and cuts the first `cut_streams` streamed answers halfway.

pub mod chat;
mod conversation;
pub mod forge;
pub mod git_server;
pub mod oidc;
pub mod otlp;
pub mod responses;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub use conversation::{
    COMPACTION_MARKER, Outcome, Reply, ReplyCall, Wire, check_tools, parse_call_id, reply_for,
    request_tokens,
};

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

/// The API key a 401's default message names (masked as OpenAI masks it).
pub const MASKED_KEY: &str = "sk-scr***ipt";

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
    /// Text the instructions of every request must contain: its system messages (Chat) or
    /// its `instructions` (Responses). Not checked on compaction requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expect_in_instructions: Vec<String>,
    /// The usage reported for compaction answers (estimated when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compaction_usage: Option<ScriptedUsage>,
    /// Requests whose token estimate ([`request_tokens`]) exceeds this get a 400
    /// `context_length_exceeded` (not a violation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_window: Option<u64>,
    /// The first this many streamed answers (either wire) stop about halfway, the body
    /// ending abruptly; they answer nothing, so the retry gets the same turn.
    #[serde(default)]
    pub cut_streams: u64,
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
    /// A reasoning summary: on the Responses wire the turn's output starts with the
    /// reasoning item `rs_<turn>` (encrypted content `enc_<turn>`), which every later
    /// request carrying the turn's function calls must send back before them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    /// The usage to report for this turn, exactly (estimated when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<ScriptedUsage>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedCall {
    pub name: String,
    pub arguments: Value,
}

/// Token counts an answer reports; the total is prompt + completion.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedUsage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub cached_tokens: u64,
    #[serde(default)]
    pub reasoning_tokens: u64,
}

/// Injected failures: answer `status` to the first `times` requests (all, if unset), with an
/// OpenAI-shaped error body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Failure {
    pub status: u16,
    #[serde(default)]
    pub times: Option<u64>,
    /// The error's message; for a 401 left at the default, OpenAI's "Incorrect API key
    /// provided: sk-scr***ipt. ..." instead.
    #[serde(default = "default_failure_message")]
    pub message: String,
    /// Sent as a `Retry-After: <seconds>` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
    /// Only requests carrying one of these `seed`s fail (a best-of-N candidate's); the
    /// others are answered. Empty: every request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<u64>,
    /// The error's `code` (`invalid_api_key` for a 401 when unset, else null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
}

impl Default for Failure {
    fn default() -> Self {
        Self {
            status: 500,
            times: None,
            message: default_failure_message(),
            retry_after: None,
            code: None,
            seeds: Vec::new(),
        }
    }
}

fn default_failure_message() -> String {
    "scripted upstream failure".into()
}

impl Failure {
    /// The error body: `{"error": {"message", "type", "param": null, "code"}}`.
    pub fn body(&self) -> Value {
        let (kind, code) = match self.status {
            401 => ("invalid_request_error", Some("invalid_api_key")),
            429 => ("requests", None),
            400..=499 => ("invalid_request_error", None),
            _ => ("server_error", None),
        };
        let message = if self.status == 401 && self.message == default_failure_message() {
            format!(
                "Incorrect API key provided: {MASKED_KEY}. You can find your API key at https://platform.openai.com/account/api-keys."
            )
        } else {
            self.message.clone()
        };
        let code = self.code.as_deref().or(code);
        json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
    }
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
    /// Requests answered in full (a scripted turn or a compaction summary).
    pub answered: u64,
    pub failed_on_purpose: u64,
    pub violations: Vec<String>,
    /// Every request body, in arrival order.
    pub bodies: Vec<Value>,
    /// The path of every request, in arrival order.
    pub paths: Vec<String>,
    /// Whether each request asked for a stream (`"stream": true`), in arrival order.
    pub streamed: Vec<bool>,
    /// Compaction requests answered (they use no turn).
    pub compactions: u64,
    /// Requests refused as larger than the script's `context_window`.
    pub context_overflows: u64,
    /// The largest token estimate of a request seen.
    pub max_request_tokens: u64,
    /// Streamed answers cut halfway (the script's `cut_streams`).
    pub cut_streams: u64,
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
    server: Arc<tokio::task::AbortHandle>,
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
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "scripted model server stopped");
            }
        })
        .abort_handle();
        Ok(Self {
            addr,
            shared,
            server: Arc::new(server),
        })
    }

    /// The base URL to give an OpenAI client (`.../v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn observed(&self) -> Observed {
        lock(&self.shared).observed.clone()
    }

    /// Stops listening: new connections to [`Self::addr`] are refused from now on.
    pub fn stop(&self) {
        self.server.abort();
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

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The server's routes, for embedding in another axum app.
fn router(shared: Arc<Mutex<Shared>>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_route))
        .route("/chat/completions", post(chat_route))
        .route("/v1/responses", post(responses_route))
        .route("/responses", post(responses_route))
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

/// The 400 a provider answers a request larger than its context window with.
pub fn overflow_body(wire: Wire, window: u64, tokens: u64) -> Value {
    let param = match wire {
        Wire::Chat => "messages",
        Wire::Responses => "input",
    };
    json!({"error": {
        "message": format!(
            "This model's maximum context length is {window} tokens. However, your messages resulted in {tokens} tokens."
        ),
        "type": "invalid_request_error",
        "param": param,
        "code": "context_length_exceeded",
    }})
}

async fn chat_route(State(shared): State<Arc<Mutex<Shared>>>, uri: Uri, body: String) -> Response {
    serve(&shared, Wire::Chat, uri.path(), &body).await
}

async fn responses_route(
    State(shared): State<Arc<Mutex<Shared>>>,
    uri: Uri,
    body: String,
) -> Response {
    serve(&shared, Wire::Responses, uri.path(), &body).await
}

/// The SSE frames of an answer: `data:` lines ending with `[DONE]` (Chat), or `event:` and
/// `data:` pairs (Responses).
pub fn sse_frames(wire: Wire, reply: &Reply, body: &Value) -> Vec<String> {
    match wire {
        Wire::Chat => {
            let usage = body["stream_options"]["include_usage"] == true;
            chat::chunks(reply, usage)
                .iter()
                .map(|c| format!("data: {c}\n\n"))
                .chain(["data: [DONE]\n\n".to_string()])
                .collect()
        }
        Wire::Responses => responses::events(reply)
            .iter()
            .map(|e| {
                let kind = e["type"].as_str().unwrap_or_default();
                format!("event: {kind}\ndata: {e}\n\n")
            })
            .collect(),
    }
}

fn stream_response(frames: Vec<String>, cut: bool) -> Response {
    let body = if cut {
        // About half the events, then the connection breaks: no `[DONE]`, no
        // `response.completed`.
        let keep = frames.len() / 2;
        let head = futures::stream::iter(
            frames
                .into_iter()
                .take(keep)
                .map(Ok::<String, std::io::Error>),
        );
        let broken = futures::stream::once(async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Err(std::io::Error::other("scripted model: stream cut"))
        });
        Body::from_stream(head.chain(broken))
    } else {
        Body::from_stream(futures::stream::iter(
            frames.into_iter().map(Ok::<String, std::io::Error>),
        ))
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn failure_response(f: &Failure) -> Response {
    let status = StatusCode::from_u16(f.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, Json(f.body())).into_response();
    if let Some(secs) = f.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

/// What one request gets once the shared state has been read and updated.
enum Plan {
    Done(Response),
    Answer {
        reply: Reply,
        stream: bool,
        cut: bool,
        delay: u64,
    },
}

fn plan(shared: &Mutex<Shared>, wire: Wire, path: &str, text: &str) -> Plan {
    let mut s = lock(shared);
    s.observed.requests += 1;
    s.observed.arrivals.push(Instant::now());
    s.observed.paths.push(path.to_string());
    let body: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            s.observed.streamed.push(false);
            let msg = format!("scripted model: request body is not JSON: {e}");
            s.observed.violations.push(msg.clone());
            return Plan::Done(error(
                StatusCode::BAD_REQUEST,
                &msg,
                "invalid_request_error",
            ));
        }
    };
    let stream = body["stream"] == true;
    s.observed.streamed.push(stream);
    s.observed.bodies.push(body.clone());
    if body.is_object() {
        let tokens = request_tokens(wire, &body);
        s.observed.max_request_tokens = s.observed.max_request_tokens.max(tokens);
    }
    if let Some(f) = s.failure.clone()
        && f.times.is_none_or(|n| s.failed < n)
        && (f.seeds.is_empty() || body["seed"].as_u64().is_some_and(|v| f.seeds.contains(&v)))
    {
        s.failed += 1;
        s.observed.failed_on_purpose += 1;
        return Plan::Done(failure_response(&f));
    }
    match reply_for(&s.script, wire, &body) {
        Ok(Outcome::Reply(reply)) => {
            let cut = stream && s.observed.cut_streams < s.script.cut_streams;
            if cut {
                s.observed.cut_streams += 1;
            } else {
                s.observed.answered += 1;
                if reply.compaction {
                    s.observed.compactions += 1;
                }
            }
            let delay = s.script.delay_ms + reply.delay_ms;
            Plan::Answer {
                reply,
                stream,
                cut,
                delay,
            }
        }
        Ok(Outcome::Overflow { window, tokens }) => {
            s.observed.context_overflows += 1;
            Plan::Done(
                (
                    StatusCode::BAD_REQUEST,
                    Json(overflow_body(wire, window, tokens)),
                )
                    .into_response(),
            )
        }
        Err(msg) => {
            let msg = format!("scripted model: {msg}");
            tracing::error!("{msg}");
            s.observed.violations.push(msg.clone());
            Plan::Done(error(
                StatusCode::BAD_REQUEST,
                &msg,
                "invalid_request_error",
            ))
        }
    }
}

async fn serve(shared: &Mutex<Shared>, wire: Wire, path: &str, text: &str) -> Response {
    let (reply, stream, cut, delay) = match plan(shared, wire, path, text) {
        Plan::Done(response) => return response,
        Plan::Answer {
            reply,
            stream,
            cut,
            delay,
        } => (reply, stream, cut, delay),
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let response = if stream {
        let body: Value = serde_json::from_str(text).unwrap_or_default();
        stream_response(sse_frames(wire, &reply, &body), cut)
    } else {
        match wire {
            Wire::Chat => Json(chat::completion(&reply)).into_response(),
            Wire::Responses => Json(responses::response(&reply)).into_response(),
        }
    };
    if !cut {
        lock(shared).observed.answered_at.push(Instant::now());
    }
    response
}

fn rendered(
    script: &Script,
    wire: Wire,
    body: &Value,
    render: fn(&Reply) -> Value,
) -> Result<(Value, u64), String> {
    match reply_for(script, wire, body)? {
        Outcome::Reply(r) => Ok((render(&r), r.delay_ms)),
        Outcome::Overflow { window, tokens } => Err(format!(
            "the request's {tokens} tokens exceed the context window of {window}"
        )),
    }
}

/// Checks a Chat Completions request against the script and builds the (unstreamed)
/// answer for its turn, with the turn's own delay in milliseconds. A request over the
/// context window is an error here (the server answers it `context_length_exceeded`).
pub fn answer_for(script: &Script, body: &Value) -> Result<(Value, u64), String> {
    rendered(script, Wire::Chat, body, chat::completion)
}

/// [`answer_for`] for the Responses wire: the `response` object.
pub fn response_for(script: &Script, body: &Value) -> Result<(Value, u64), String> {
    rendered(script, Wire::Responses, body, responses::response)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod unit_tests {
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
