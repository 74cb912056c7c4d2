//! The Kafka messages. A task message (schema [`TASK_SCHEMA`]) is a [`SubmitBody`] with a
//! `schema` field, keyed by its idempotency key: `patchflow batch submit --via kafka`
//! writes them ([`TaskMessage`]), the gateway's trigger reads them
//! ([`parse_task_message`]). A result message (schema [`RESULT_SCHEMA`]) is written by the
//! worker's `publish_result` hook for every finished task, keyed by task id.

use std::collections::BTreeMap;

use patchflow_core::TaskSpec;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::submit::SubmitBody;

/// The `schema` every task message carries; other values go to the DLQ.
pub const TASK_SCHEMA: &str = "patchflow.task.v1";
/// The `schema` of result messages.
pub const RESULT_SCHEMA: &str = "patchflow.result.v1";
/// Largest task message accepted; larger ones go to the DLQ. A task description is at most
/// 64 KiB, so this leaves room for JSON escapes while staying under Kafka's default 1 MB
/// message limit (a bigger message could not even be produced to most brokers).
pub const MAX_TASK_MESSAGE_BYTES: usize = 512 * 1024;

/// A task message as a producer writes it: the submit body's fields beside `schema`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskMessage<'a> {
    pub schema: &'static str,
    #[serde(flatten)]
    pub body: &'a SubmitBody,
}

impl<'a> TaskMessage<'a> {
    pub fn new(body: &'a SubmitBody) -> Self {
        Self {
            schema: TASK_SCHEMA,
            body,
        }
    }
}

/// Why a task message can never run, as the DLQ's `patchflow.error.kind` header says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    Empty,
    Oversized,
    BadJson,
    UnknownSchema,
    BadFields,
    /// The spec is well formed but the service refuses it (set by the trigger).
    Invalid,
}

impl Malformed {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::Oversized => "oversized",
            Self::BadJson => "bad_json",
            Self::UnknownSchema => "unknown_schema",
            Self::BadFields => "bad_fields",
            Self::Invalid => "invalid",
        }
    }
}

/// Parses a task message into a spec; the error says why it can never run. `origin` is
/// the message's (topic, partition, offset), which names a keyless message's task.
pub fn parse_task_message(
    payload: Option<&[u8]>,
    key: Option<&[u8]>,
    origin: (&str, i32, i64),
) -> Result<TaskSpec, (Malformed, String)> {
    let bytes = match payload {
        Some(b) if !b.is_empty() => b,
        _ => return Err((Malformed::Empty, "the message has no payload".into())),
    };
    if bytes.len() > MAX_TASK_MESSAGE_BYTES {
        return Err((
            Malformed::Oversized,
            format!(
                "the message is {} bytes, more than the {MAX_TASK_MESSAGE_BYTES} accepted",
                bytes.len()
            ),
        ));
    }
    let mut value: Value = serde_json::from_slice(bytes)
        .map_err(|e| (Malformed::BadJson, format!("not JSON: {e}")))?;
    let Some(obj) = value.as_object_mut() else {
        return Err((
            Malformed::BadJson,
            "the message is JSON but not an object".into(),
        ));
    };
    // `schema` is taken out first: the body refuses fields it does not know, and serde
    // cannot both flatten and refuse unknown fields.
    match obj.remove("schema") {
        Some(Value::String(s)) if s == TASK_SCHEMA => {}
        Some(other) => {
            return Err((
                Malformed::UnknownSchema,
                format!("unknown schema {other}; this consumer reads `{TASK_SCHEMA}`"),
            ));
        }
        None => {
            return Err((
                Malformed::UnknownSchema,
                format!("the `schema` field is missing; expected `{TASK_SCHEMA}`"),
            ));
        }
    }
    let body: SubmitBody =
        serde_json::from_value(value).map_err(|e| (Malformed::BadFields, e.to_string()))?;
    let mut spec = body
        .into_spec(false)
        .map_err(|e| (Malformed::BadFields, e.to_string()))?;
    if spec.task_description.trim().is_empty() {
        return Err((
            Malformed::BadFields,
            "task_description is required and must not be blank".into(),
        ));
    }
    // The key names the task; a keyless message is named by where it sits, which is still
    // the same on every redelivery.
    let key = key
        .and_then(|k| std::str::from_utf8(k).ok())
        .map(str::trim)
        .filter(|k| !k.is_empty());
    spec.idempotency_key = match (key, spec.idempotency_key.take()) {
        (Some(k), _) => Some(k.to_string()),
        (None, Some(k)) => Some(k),
        (None, None) => Some(format!("kafka:{}:{}:{}", origin.0, origin.1, origin.2)),
    };
    Ok(spec)
}

/// Where one result file is: its object key, and a presigned URL when the store has them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultObject {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
}

/// The message on the results topic, keyed by task id: one per finished task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultMessage {
    pub schema: String,
    pub task_id: String,
    /// COMPLETED, FAILED or CANCELLED.
    pub status: String,
    pub message: String,
    /// The agent's own account, when it ran.
    pub summary: Option<String>,
    /// What the agent's model answers used and cost (from its summary; null when it did
    /// not run): every token, the prompt tokens served from the provider's cache, the
    /// completion tokens spent reasoning, and US dollars priced from the model table.
    #[serde(default)]
    pub total_tokens: Option<u64>,
    #[serde(default)]
    pub cached_tokens: Option<u64>,
    #[serde(default)]
    pub reasoning_tokens: Option<u64>,
    #[serde(default)]
    pub cost_usd: Option<f64>,
    pub batch_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub tenant: String,
    pub pr_url: Option<String>,
    /// Why the pull request asked for could not be opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pr_error: Option<String>,
    /// `diff`, `transcript`, `log`, `summary` -> where each is, for the files that exist.
    pub objects: BTreeMap<String, ResultObject>,
    pub finished_at: chrono::DateTime<chrono::Utc>,
}
