//! Reading a request: which scripted turn it asks for, whether it is well formed, and
//! what the answer holds. Pure functions, shared by both wires; [`crate::chat`] and
//! [`crate::responses`] only render the [`Reply`] built here.

use serde_json::Value;

use crate::{CONTRACT_TOOLS, Script, ScriptedUsage};

/// The text a request's instructions carry when it asks for a summary of the conversation
/// (context compaction) instead of the next step.
pub const COMPACTION_MARKER: &str = "[patchflow-compaction]";

/// Which API a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/responses`.
    Responses,
}

/// One tool call of an answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplyCall {
    /// `call_<turn>_<i>`, both 1-based.
    pub id: String,
    pub name: String,
    /// The arguments as JSON text.
    pub arguments: String,
}

/// What to answer, independent of the wire.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// The 1-based number of the scripted turn answered; 0 for a compaction summary.
    pub turn: usize,
    pub compaction: bool,
    /// The model name to report.
    pub model: String,
    pub content: Option<String>,
    /// Reasoning summary (the Responses wire only).
    pub reasoning: Option<String>,
    pub calls: Vec<ReplyCall>,
    /// The usage to report (the scripted one, or the estimate).
    pub usage: ScriptedUsage,
    /// The turn's own delay in milliseconds (on top of the script's).
    pub delay_ms: u64,
}

impl Reply {
    /// `stop` or `tool_calls`.
    pub fn finish_reason(&self) -> &'static str {
        if self.calls.is_empty() {
            "stop"
        } else {
            "tool_calls"
        }
    }
}

/// The outcome of a well-formed request.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Reply(Reply),
    /// The request is larger than the script's `context_window`: not a violation, the
    /// provider's `context_length_exceeded`.
    Overflow {
        window: u64,
        tokens: u64,
    },
}

fn ceil_quarter(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(4)
}

fn json_len(v: &Value) -> usize {
    if v.is_null() { 0 } else { v.to_string().len() }
}

/// The token estimate of a request: a quarter of the bytes (rounded up) of the JSON text
/// of its `messages` (Chat), or of its `instructions` and `input` (Responses).
pub fn request_tokens(wire: Wire, body: &Value) -> u64 {
    match wire {
        Wire::Chat => ceil_quarter(json_len(&body["messages"])),
        Wire::Responses => ceil_quarter(json_len(&body["instructions"]) + json_len(&body["input"])),
    }
}

/// `call_<n>_<i>` with both numbers from 1: `(n, i)`.
pub fn parse_call_id(id: &str) -> Option<(usize, usize)> {
    let (n, i) = id.strip_prefix("call_")?.split_once('_')?;
    let n: usize = n.parse().ok()?;
    let i: usize = i.parse().ok()?;
    (n > 0 && i > 0).then_some((n, i))
}

/// The text of a message content: a string, or the `text` of each part of an array.
pub fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// What the checks read from a conversation, whatever the wire.
struct Conversation {
    /// The 0-based index of the scripted turn asked for.
    turn: usize,
    /// The results of the previous turn's tool calls, one after the other.
    last_results: String,
    /// The instructions: system messages (Chat) or `instructions` (Responses).
    instructions: String,
    /// Messages (Chat, system ones excluded) or input items (Responses).
    size: usize,
}

/// Chooses the turn: after the latest turn whose call ids (`call_<n>_<i>`) the request
/// carries, counting any assistant message that followed it; without such ids, the number
/// of assistant messages. Older turns may have been compacted away.
fn choose_turn(calls: &[(usize, usize)], assistant_positions: &[usize]) -> (usize, Option<usize>) {
    let Some(&(n, _)) = calls.iter().max_by_key(|(n, _)| *n) else {
        return (assistant_positions.len(), None);
    };
    let last = calls
        .iter()
        .filter(|(m, _)| *m == n)
        .map(|(_, pos)| *pos)
        .max()
        .unwrap_or_default();
    let later = assistant_positions.iter().filter(|p| **p > last).count();
    (n + later, (later == 0).then_some(n))
}

fn chat_conversation(body: &Value) -> Result<Conversation, String> {
    let messages = body["messages"]
        .as_array()
        .ok_or("request has no messages")?;
    let instructions: String = messages
        .iter()
        .filter(|m| m["role"] == "system" || m["role"] == "developer")
        .map(|m| text_of(&m["content"]))
        .collect::<Vec<_>>()
        .join("\n");
    // Every tool call the assistant made must be answered by a tool message before the next
    // assistant message.
    let mut pending: Vec<String> = Vec::new();
    let mut results: Vec<(String, String)> = Vec::new();
    let mut calls: Vec<(usize, usize)> = Vec::new();
    let mut assistants: Vec<usize> = Vec::new();
    for (pos, m) in messages.iter().enumerate() {
        match m["role"].as_str().unwrap_or_default() {
            "assistant" => {
                if !pending.is_empty() {
                    return Err(format!(
                        "tool calls {pending:?} have no results before the next assistant turn"
                    ));
                }
                assistants.push(pos);
                results.clear();
                for c in m["tool_calls"].as_array().into_iter().flatten() {
                    let id = c["id"].as_str().unwrap_or_default();
                    if let Some((n, _)) = parse_call_id(id) {
                        calls.push((n, pos));
                    }
                    pending.push(id.to_string());
                }
            }
            "tool" => {
                let id = m["tool_call_id"].as_str().unwrap_or_default();
                let Some(at) = pending.iter().position(|p| p == id) else {
                    return Err(format!("tool result for unknown call `{id}`"));
                };
                pending.remove(at);
                results.push((id.to_string(), text_of(&m["content"])));
            }
            _ => {}
        }
    }
    if !pending.is_empty() {
        return Err(format!("tool calls {pending:?} have no results"));
    }
    let (turn, _) = choose_turn(&calls, &assistants);
    let last_results = results
        .iter()
        .map(|(_, r)| format!("{r}\n"))
        .collect::<String>();
    Ok(Conversation {
        turn,
        last_results,
        instructions,
        size: messages.iter().filter(|m| m["role"] != "system").count(),
    })
}

fn responses_conversation(script: &Script, body: &Value) -> Result<Conversation, String> {
    let single;
    let items: &[Value] = match &body["input"] {
        Value::Array(items) => items,
        Value::String(text) => {
            single = [serde_json::json!({"type": "message", "role": "user", "content": text})];
            &single
        }
        _ => return Err("request has no input".into()),
    };
    let instructions = match &body["instructions"] {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => return Err(format!("instructions must be a string, got {other}")),
    };
    // (call_id, position) of each function call, with the number of its turn when ours.
    let mut function_calls: Vec<(String, usize)> = Vec::new();
    let mut outputs: Vec<(String, usize, String)> = Vec::new();
    let mut reasoning: Vec<(String, Option<String>, usize)> = Vec::new();
    let mut assistants: Vec<usize> = Vec::new();
    for (pos, item) in items.iter().enumerate() {
        let kind = match item["type"].as_str() {
            Some(k) => k,
            None if item.get("role").is_some() => "message",
            None => return Err(format!("input item {pos} has no type")),
        };
        match kind {
            "message" => {
                let role = item["role"].as_str().unwrap_or_default();
                if !matches!(role, "user" | "assistant" | "system" | "developer") {
                    return Err(format!("input item {pos}: unknown message role `{role}`"));
                }
                if !item["content"].is_string() && !item["content"].is_array() {
                    return Err(format!("input item {pos}: a message needs a content"));
                }
                if role == "assistant" {
                    assistants.push(pos);
                }
            }
            "function_call" => {
                let id = item["call_id"]
                    .as_str()
                    .ok_or(format!("input item {pos}: a function_call has no call_id"))?;
                if !item["name"].is_string() || !item["arguments"].is_string() {
                    return Err(format!(
                        "input item {pos}: function_call `{id}` needs a name and arguments as a string"
                    ));
                }
                function_calls.push((id.to_string(), pos));
            }
            "function_call_output" => {
                let id = item["call_id"].as_str().unwrap_or_default();
                if !function_calls.iter().any(|(c, _)| c == id) {
                    return Err(format!(
                        "function_call_output for unknown call `{id}` (no function_call before it)"
                    ));
                }
                outputs.push((id.to_string(), pos, text_of(&item["output"])));
            }
            "reasoning" => {
                let id = item["id"].as_str().unwrap_or_default().to_string();
                let enc = item["encrypted_content"].as_str().map(str::to_string);
                reasoning.push((id, enc, pos));
            }
            other => {
                return Err(format!(
                    "input item {pos} has an unsupported type `{other}`"
                ));
            }
        }
    }
    let unanswered: Vec<&str> = function_calls
        .iter()
        .filter(|(id, at)| !outputs.iter().any(|(o, pos, _)| o == id && pos > at))
        .map(|(id, _)| id.as_str())
        .collect();
    if !unanswered.is_empty() {
        return Err(format!(
            "function calls {unanswered:?} have no function_call_output"
        ));
    }
    let ours: Vec<(usize, usize)> = function_calls
        .iter()
        .filter_map(|(id, pos)| parse_call_id(id).map(|(n, _)| (n, *pos)))
        .collect();
    // A turn that reasoned must have its reasoning item sent back before its calls.
    let mut turns: Vec<usize> = ours.iter().map(|(n, _)| *n).collect();
    turns.sort_unstable();
    turns.dedup();
    for n in turns {
        if script
            .turns
            .get(n - 1)
            .is_none_or(|t| t.reasoning.is_none())
        {
            continue;
        }
        let first = ours
            .iter()
            .filter(|(m, _)| *m == n)
            .map(|(_, pos)| *pos)
            .min()
            .unwrap_or_default();
        let (want_id, want_enc) = (format!("rs_{n}"), format!("enc_{n}"));
        let sent = reasoning.iter().any(|(id, enc, pos)| {
            *id == want_id && enc.as_deref() == Some(&want_enc) && *pos < first
        });
        if !sent {
            return Err(format!(
                "reasoning item {want_id} was not sent back (with encrypted_content {want_enc}, before the function calls of turn {n})"
            ));
        }
    }
    let mut assistant_items = assistants.clone();
    assistant_items.extend(function_calls.iter().map(|(_, pos)| *pos));
    let (turn, previous) = choose_turn(&ours, &assistants);
    let last_results = match previous {
        // The outputs of the previous turn's calls, wherever they are.
        Some(n) => outputs
            .iter()
            .filter(|(id, _, _)| parse_call_id(id).is_some_and(|(m, _)| m == n))
            .map(|(_, _, r)| format!("{r}\n"))
            .collect(),
        // The outputs after the last assistant item.
        None => {
            let after = assistant_items.iter().max().copied();
            outputs
                .iter()
                .filter(|(_, pos, _)| after.is_none_or(|a| *pos > a))
                .map(|(_, _, r)| format!("{r}\n"))
                .collect()
        }
    };
    Ok(Conversation {
        turn,
        last_results,
        instructions,
        size: items.len(),
    })
}

/// Checks that `tools` declares every contract tool with its parameters. Chat nests each
/// function under `function`; Responses declares flat function tools.
pub fn check_tools(wire: Wire, tools: &Value) -> Result<(), String> {
    let tools = tools.as_array().ok_or("request declares no tools")?;
    let function = |t: &Value| -> Option<Value> {
        match wire {
            Wire::Chat => Some(t["function"].clone()),
            Wire::Responses => (t["type"] == "function").then(|| t.clone()),
        }
    };
    for (name, params) in CONTRACT_TOOLS {
        let Some(f) = tools
            .iter()
            .filter_map(function)
            .find(|f| f["name"] == name)
        else {
            return Err(format!("tool `{name}` is missing from the request"));
        };
        let props = &f["parameters"]["properties"];
        for p in params {
            if props.get(*p).is_none() {
                return Err(format!("tool `{name}` lacks parameter `{p}`"));
            }
        }
    }
    Ok(())
}

fn has_no_tools(tools: &Value) -> bool {
    match tools {
        Value::Null => true,
        Value::Array(t) => t.is_empty(),
        _ => false,
    }
}

fn estimated_usage(prompt: u64, content: &str, calls: &[ReplyCall]) -> ScriptedUsage {
    let bytes = content.len() + calls.iter().map(|c| c.arguments.len()).sum::<usize>();
    ScriptedUsage {
        prompt_tokens: prompt,
        completion_tokens: ceil_quarter(bytes),
        cached_tokens: 0,
        reasoning_tokens: 0,
    }
}

/// Checks a request against the script and decides the answer.
pub fn reply_for(script: &Script, wire: Wire, body: &Value) -> Result<Outcome, String> {
    if !body.is_object() {
        return Err("request body is not a JSON object".into());
    }
    let model = body["model"].as_str().unwrap_or_default();
    if let Some(want) = &script.model
        && model != want
    {
        return Err(format!("expected model `{want}`, got `{model}`"));
    }
    if wire == Wire::Responses && body["store"] != false {
        return Err(format!(
            "the request must set `store: false` (the agent must not store responses), got `store: {}`",
            body["store"]
        ));
    }
    let tokens = request_tokens(wire, body);
    if let Some(window) = script.context_window
        && tokens > window
    {
        return Ok(Outcome::Overflow { window, tokens });
    }
    let conversation = match wire {
        Wire::Chat => chat_conversation(body)?,
        Wire::Responses => responses_conversation(script, body)?,
    };
    let model = if model.is_empty() { "scripted" } else { model }.to_string();
    if conversation.instructions.contains(COMPACTION_MARKER) && has_no_tools(&body["tools"]) {
        let noun = match wire {
            Wire::Chat => "messages",
            Wire::Responses => "items",
        };
        let content = format!(
            "Summary of the earlier conversation ({} {noun} compacted).",
            conversation.size
        );
        let usage = script
            .compaction_usage
            .clone()
            .unwrap_or_else(|| estimated_usage(tokens, &content, &[]));
        return Ok(Outcome::Reply(Reply {
            turn: 0,
            compaction: true,
            model,
            content: Some(content),
            reasoning: None,
            calls: Vec::new(),
            usage,
            delay_ms: 0,
        }));
    }
    check_tools(wire, &body["tools"])?;
    if let Some(want) = script
        .expect_in_instructions
        .iter()
        .find(|w| !conversation.instructions.contains(w.as_str()))
    {
        return Err(format!("the instructions do not contain `{want}`"));
    }
    let turn = conversation.turn;
    let Some(t) = script.turns.get(turn) else {
        return Err(format!(
            "unexpected request: the script has {} turns and this is turn {}",
            script.turns.len(),
            turn + 1
        ));
    };
    for want in &t.expect_in_tool_results {
        if !conversation.last_results.contains(want.as_str()) {
            return Err(format!(
                "turn {}: expected the tool results to contain {want:?}, got {:?}",
                turn + 1,
                conversation.last_results
            ));
        }
    }
    // `{{seed}}` in an argument is the request's sampling seed (a best-of-N candidate's
    // number; `0` without one), so candidates of one script make different changes.
    let seed = body["seed"].as_u64().unwrap_or(0).to_string();
    let calls: Vec<ReplyCall> = t
        .tool_calls
        .iter()
        .enumerate()
        .map(|(i, c)| ReplyCall {
            id: format!("call_{}_{}", turn + 1, i + 1),
            name: c.name.clone(),
            arguments: with_seed(&c.arguments, &seed).to_string(),
        })
        .collect();
    let usage = t.usage.clone().unwrap_or_else(|| {
        estimated_usage(tokens, t.content.as_deref().unwrap_or_default(), &calls)
    });
    Ok(Outcome::Reply(Reply {
        turn: turn + 1,
        compaction: false,
        model,
        content: t.content.clone(),
        reasoning: t.reasoning.clone(),
        calls,
        usage,
        delay_ms: t.delay_ms,
    }))
}

/// `value` with `{{seed}}` in its strings replaced by `seed`.
fn with_seed(value: &Value, seed: &str) -> Value {
    match value {
        Value::String(text) => Value::String(text.replace("{{seed}}", seed)),
        Value::Array(items) => Value::Array(items.iter().map(|v| with_seed(v, seed)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), with_seed(v, seed)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Splits `text` into about `pieces` parts on character boundaries: at least two when it
/// has two characters or more.
pub(crate) fn split(text: &str, pieces: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return Vec::new();
    }
    let size = chars.len().div_ceil(pieces.max(2)).max(1);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}
