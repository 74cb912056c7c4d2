//! The model behind the agent, whatever wire it speaks. The loop (crate::run) keeps one
//! provider-neutral conversation ([`Item`]s) and asks a [`Model`] for the next [`Answer`];
//! [`chat`] renders it as Chat Completions, [`responses`] as the Responses API, both
//! through async-openai, streamed or not; [`replay`] answers from a recorded transcript.

pub mod chat;
pub mod replay;
pub mod responses;

use std::collections::BTreeMap;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use patchflow_core::Secret;
use patchflow_core::config::WireApi;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The public OpenAI endpoint, used when no base URL is configured.
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// One tool call the model asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// One entry of the conversation after the instructions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Item {
    User {
        text: String,
    },
    Assistant {
        content: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        calls: Vec<ToolCall>,
        /// The provider's reasoning items (Responses wire), sent back as they came.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        reasoning: Vec<Value>,
    },
    ToolResult {
        call_id: String,
        output: String,
    },
}

impl Item {
    /// A rough token count (a token is about four bytes of the JSON text the wires send),
    /// enough to decide when to compact before the provider refuses.
    pub fn estimate_tokens(&self) -> u64 {
        let bytes = serde_json::to_string(self).map(|s| s.len()).unwrap_or(0);
        (bytes as u64).div_ceil(4) + 4
    }
}

/// What one request asks: the instructions, the conversation, and whether the tools are
/// offered (a compaction request offers none).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub instructions: &'a str,
    pub items: &'a [Item],
    pub tools: bool,
}

/// Token counts of one answer. `cached_tokens` is part of `prompt_tokens`,
/// `reasoning_tokens` part of `completion_tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cached_tokens: u64,
    pub reasoning_tokens: u64,
}

/// The model's answer to one request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub content: String,
    #[serde(default)]
    pub calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasoning: Vec<Value>,
    #[serde(default)]
    pub usage: Option<Usage>,
}

/// Why a request failed, as the loop must treat it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelError {
    /// Worth retrying: 429, 5xx, a dropped connection, a stream cut mid-answer.
    Transient(String),
    /// The request is longer than the model's context window: compact, then ask again.
    ContextLength(String),
    /// The provider refused the credentials (401/403): fail at once. The text names
    /// neither the key nor its prefix.
    Auth(String),
    /// Anything else: the run cannot go on.
    Fatal(String),
}

impl ModelError {
    /// The error's class as the transcript records it (`model_error.kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Transient(_) => "transient",
            Self::ContextLength(_) => "context_length",
            Self::Auth(_) => "auth",
            Self::Fatal(_) => "fatal",
        }
    }
}

/// The window a context-length error states, when it does: OpenAI's and vLLM's "maximum
/// context length is 8192 tokens", "context window of 8192", Anthropic-style
/// "210000 tokens > 200000 maximum".
pub fn stated_window(message: &str) -> Option<u64> {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    let re = RE.get_or_init(|| {
        regex::Regex::new(
            r"(?i)(?:maximum context length is|context length of|context window of|context window is|maximum context length:)\s*(\d+)|>\s*(\d+)\s*maximum",
        )
        .unwrap_or_else(|_| unreachable!("a valid pattern"))
    });
    let caps = re.captures(message)?;
    caps.get(1)
        .or_else(|| caps.get(2))
        .and_then(|m| m.as_str().parse().ok())
        .filter(|&w| w > 0)
}

impl std::fmt::Display for ModelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Transient(m) | Self::ContextLength(m) | Self::Auth(m) | Self::Fatal(m) => {
                f.write_str(m)
            }
        }
    }
}

/// Whether a provider's error text (or code) says the context window was exceeded:
/// OpenAI's `context_length_exceeded`, and the wording of vLLM, Ollama, Anthropic-style
/// gateways and Azure.
pub fn is_context_length(code: Option<&str>, message: &str) -> bool {
    if code.is_some_and(|c| c.contains("context_length") || c == "string_above_max_length") {
        return true;
    }
    let m = message.to_ascii_lowercase();
    [
        "maximum context length",
        "context length",
        "context window",
        "prompt is too long",
        "too many tokens",
        "input is too long",
    ]
    .iter()
    .any(|p| m.contains(p))
}

/// Sorts an async-openai error into what the loop does with it.
pub(crate) fn classify(err: OpenAIError, model: &str) -> ModelError {
    match err {
        OpenAIError::ApiError(e) => {
            let status = e.status_code.as_u16();
            let message = e.api_error.message.clone();
            match status {
                401 | 403 => ModelError::Auth(format!(
                    "the model provider refused the credentials for model `{model}` (HTTP {status}); \
                     check the API key it is configured with"
                )),
                400 | 413 | 422 if is_context_length(e.api_error.code.as_deref(), &message) => {
                    ModelError::ContextLength(format!("HTTP {status}: {message}"))
                }
                408 | 409 | 429 | 500..=599 => {
                    ModelError::Transient(format!("HTTP {status}: {}", short(&message)))
                }
                _ => ModelError::Fatal(format!(
                    "the model endpoint refused the request (HTTP {status}): {}",
                    short(&message)
                )),
            }
        }
        OpenAIError::Reqwest(e) => ModelError::Transient(format!("model request failed: {e}")),
        OpenAIError::StreamError(e) => ModelError::Transient(format!("the stream broke: {e}")),
        OpenAIError::JSONDeserialize(e, _) => ModelError::Fatal(format!(
            "the model endpoint answered something unreadable: {e}"
        )),
        other => ModelError::Fatal(other.to_string()),
    }
}

/// At most 300 characters of a provider's message.
fn short(s: &str) -> String {
    if s.chars().count() > 300 {
        format!("{}…", s.chars().take(300).collect::<String>())
    } else {
        s.to_string()
    }
}

/// Something that answers the agent's requests.
#[async_trait::async_trait]
pub trait Model: Send + Sync {
    async fn ask(&self, request: Request<'_>) -> Result<Answer, ModelError>;
    /// `chat`, `responses` or `replay`, for the transcript.
    fn wire(&self) -> &'static str;
}

/// The tools as the model sees them: name, description, JSON-schema parameters.
pub type ToolSchema = (&'static str, &'static str, Value);

/// Where and how to reach one model.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub model: String,
    pub wire: WireApi,
    pub base_url: String,
    pub api_key: Option<Secret>,
    pub stream: bool,
    pub max_output_tokens: Option<u32>,
    pub reasoning_effort: Option<String>,
    pub extra_headers: BTreeMap<String, String>,
    /// Chat Completions' `seed` (the Responses API has none).
    pub seed: Option<u64>,
}

impl Endpoint {
    /// The async-openai client for this endpoint.
    fn client(&self) -> Result<Client<OpenAIConfig>, String> {
        let mut config = OpenAIConfig::new().with_api_base(self.base_url.trim_end_matches('/'));
        if let Some(key) = &self.api_key {
            config = config.with_api_key(key.expose());
        }
        for (k, v) in &self.extra_headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| format!("extra header `{k}`: {e}"))?;
            config = config
                .with_header(name, v.as_str())
                .map_err(|e| format!("extra header `{k}`: {e}"))?;
        }
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Client::build(http, config))
    }

    /// The model client for this endpoint's wire.
    pub fn connect(&self, tools: Vec<ToolSchema>) -> Result<Box<dyn Model>, String> {
        let client = self.client()?;
        Ok(match self.wire {
            WireApi::Chat => Box::new(chat::ChatWire::new(client, self.clone(), tools)),
            WireApi::Responses => {
                Box::new(responses::ResponsesWire::new(client, self.clone(), tools))
            }
        })
    }
}

/// Puts one wire's streamed answer back together, event by event.
pub(crate) trait Assemble: Default {
    fn push(&mut self, event: &Value);
    /// Whether the answer is whole before the stream ends.
    fn is_done(&self) -> bool {
        false
    }
    /// The answer; a stream that ended before its finish is a cut ([`ModelError::Transient`]).
    fn finish(self) -> Result<Answer, ModelError>;
}

/// Reads a stream of either wire to its answer.
pub(crate) async fn read_stream<A: Assemble>(
    mut stream: async_openai::types::stream::StreamResponse<Value>,
    model: &str,
) -> Result<Answer, ModelError> {
    use futures::StreamExt;
    let mut answer = A::default();
    while let Some(event) = stream.next().await {
        answer.push(&event.map_err(|e| classify(e, model))?);
        if answer.is_done() {
            break;
        }
    }
    answer.finish()
}

/// The JSON number a u64 count came as, 0 when absent.
pub(crate) fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_an_error_states_is_read() {
        assert_eq!(
            stated_window(
                "HTTP 400: This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens."
            ),
            Some(8192)
        );
        assert_eq!(
            stated_window("prompt is too long: 210000 tokens > 200000 maximum"),
            Some(200000)
        );
        assert_eq!(
            stated_window("exceeds the context window of 32768 tokens"),
            Some(32768)
        );
        assert_eq!(stated_window("input is too long"), None);
        assert_eq!(stated_window("maximum context length is 0 tokens"), None);
    }

    #[test]
    fn context_length_errors_are_recognised_across_providers() {
        assert!(is_context_length(Some("context_length_exceeded"), ""));
        assert!(is_context_length(
            None,
            "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens."
        ));
        assert!(is_context_length(
            None,
            "prompt is too long: 210000 tokens > 200000 maximum"
        ));
        assert!(!is_context_length(None, "Invalid value for 'tools'"));
    }

    #[test]
    fn auth_errors_never_repeat_the_providers_text() {
        let err = OpenAIError::ApiError(async_openai::error::ApiErrorResponse {
            status_code: reqwest::StatusCode::UNAUTHORIZED,
            api_error: async_openai::error::ApiError {
                message: "Incorrect API key provided: sk-live-abc***xyz.".into(),
                ..Default::default()
            },
        });
        let ModelError::Auth(text) = classify(err, "m") else {
            panic!("not an auth error")
        };
        assert!(!text.contains("sk-"), "{text}");
        assert!(text.contains("401"), "{text}");
    }
}
