//! The Chat Completions wire: a [`Reply`] as a `chat.completion`, or as the
//! `chat.completion.chunk`s of a stream.

use serde_json::{Value, json};

use crate::conversation::{Reply, split};
use crate::{ScriptedUsage, unix_now};

fn id(r: &Reply) -> String {
    if r.compaction {
        "chatcmpl-scripted-compaction".into()
    } else {
        format!("chatcmpl-scripted-{}", r.turn)
    }
}

/// The usage object of the Chat wire.
pub fn usage(u: &ScriptedUsage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    })
}

/// The whole answer (no stream).
pub fn completion(r: &Reply) -> Value {
    let mut message = json!({"role": "assistant", "content": r.content});
    if !r.calls.is_empty() {
        message["tool_calls"] = r
            .calls
            .iter()
            .map(|c| {
                json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                })
            })
            .collect();
    }
    json!({
        "id": id(r),
        "object": "chat.completion",
        "created": unix_now(),
        "model": r.model,
        "choices": [{
            "index": 0,
            "message": message,
            "finish_reason": r.finish_reason(),
        }],
        "usage": usage(&r.usage),
    })
}

/// The chunks of a streamed answer, in order: the role, the content in pieces, each tool
/// call (its id, name and first piece of arguments, then the rest), the finish reason and,
/// with `include_usage`, a last chunk with no choices and the usage. The SSE framing and
/// the closing `[DONE]` are the server's.
pub fn chunks(r: &Reply, include_usage: bool) -> Vec<Value> {
    let created = unix_now();
    let id = id(r);
    let chunk = |choices: Value| {
        let mut c = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": r.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let delta = |delta: Value| {
        chunk(json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}]))
    };
    let mut out = vec![delta(json!({"role": "assistant", "content": null}))];
    for piece in split(r.content.as_deref().unwrap_or_default(), 3) {
        out.push(delta(json!({"content": piece})));
    }
    for (index, c) in r.calls.iter().enumerate() {
        let mut pieces = split(&c.arguments, 3).into_iter();
        let first = pieces.next().unwrap_or_default();
        out.push(delta(json!({"tool_calls": [{
            "index": index,
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": first},
        }]})));
        for piece in pieces {
            out.push(delta(json!({"tool_calls": [{
                "index": index,
                "function": {"arguments": piece},
            }]})));
        }
    }
    out.push(chunk(json!([{
        "index": 0,
        "delta": {},
        "logprobs": null,
        "finish_reason": r.finish_reason(),
    }])));
    if include_usage {
        let mut last = chunk(json!([]));
        last["usage"] = usage(&r.usage);
        out.push(last);
    }
    out
}
