//! The Responses wire: a [`Reply`] as a `response` object, or as the events of a stream.

use serde_json::{Value, json};

use crate::conversation::{Reply, split};
use crate::{ScriptedUsage, unix_now};

/// The usage object of the Responses wire.
pub fn usage(u: &ScriptedUsage) -> Value {
    json!({
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

fn suffix(r: &Reply) -> String {
    if r.compaction {
        "compaction".into()
    } else {
        r.turn.to_string()
    }
}

/// The reasoning item of a turn that reasoned: `rs_<turn>`, its summary, and the opaque
/// `enc_<turn>` the client must send back with the turn's function calls.
fn reasoning_item(r: &Reply, text: &str) -> Value {
    json!({
        "type": "reasoning",
        "id": format!("rs_{}", suffix(r)),
        "summary": [{"type": "summary_text", "text": text}],
        "encrypted_content": format!("enc_{}", suffix(r)),
    })
}

fn message_item(r: &Reply, text: &str, status: &str) -> Value {
    let content = if status == "completed" {
        json!([{"type": "output_text", "text": text, "annotations": []}])
    } else {
        json!([])
    };
    json!({
        "type": "message",
        "id": format!("msg_{}", suffix(r)),
        "role": "assistant",
        "status": status,
        "content": content,
    })
}

fn call_item(r: &Reply, i: usize, arguments: &str, status: &str) -> Value {
    let c = &r.calls[i];
    json!({
        "type": "function_call",
        "id": format!("fc_{}_{}", suffix(r), i + 1),
        "call_id": c.id,
        "name": c.name,
        "arguments": arguments,
        "status": status,
    })
}

/// The output items, in order: the reasoning (if the turn has one), the message (if it
/// has content), the function calls.
pub fn output(r: &Reply) -> Vec<Value> {
    let mut out = Vec::new();
    if let Some(text) = &r.reasoning {
        out.push(reasoning_item(r, text));
    }
    if let Some(text) = &r.content {
        out.push(message_item(r, text, "completed"));
    }
    for (i, c) in r.calls.iter().enumerate() {
        out.push(call_item(r, i, &c.arguments, "completed"));
    }
    out
}

fn response_object(r: &Reply, created_at: u64, status: &str, output: &[Value]) -> Value {
    let mut resp = json!({
        "id": format!("resp_{}", suffix(r)),
        "object": "response",
        "created_at": created_at,
        "status": status,
        "model": r.model,
        "output": output,
        "parallel_tool_calls": true,
        "store": false,
    });
    if status == "completed" {
        resp["completed_at"] = json!(unix_now());
        resp["usage"] = usage(&r.usage);
    }
    resp
}

/// The whole answer (no stream).
pub fn response(r: &Reply) -> Value {
    response_object(r, unix_now(), "completed", &output(r))
}

/// The events of a streamed answer, each with its `type` and `sequence_number`:
/// `response.created`, then for each output item `response.output_item.added`, its text
/// (`response.output_text.delta`) or arguments (`response.function_call_arguments.delta`)
/// in pieces and `response.output_item.done`, and last `response.completed` with the whole
/// response and its usage.
pub fn events(r: &Reply) -> Vec<Value> {
    let created_at = unix_now();
    let mut out: Vec<Value> = Vec::new();
    let mut push = |mut e: Value| {
        e["sequence_number"] = json!(out.len());
        out.push(e);
    };
    push(json!({
        "type": "response.created",
        "response": response_object(r, created_at, "in_progress", &[]),
    }));
    let mut index = 0usize;
    if let Some(text) = &r.reasoning {
        let mut added = reasoning_item(r, text);
        added["summary"] = json!([]);
        push(json!({"type": "response.output_item.added", "output_index": index, "item": added}));
        push(json!({
            "type": "response.output_item.done",
            "output_index": index,
            "item": reasoning_item(r, text),
        }));
        index += 1;
    }
    if let Some(text) = &r.content {
        let item_id = format!("msg_{}", suffix(r));
        push(json!({
            "type": "response.output_item.added",
            "output_index": index,
            "item": message_item(r, text, "in_progress"),
        }));
        for piece in split(text, 3) {
            push(json!({
                "type": "response.output_text.delta",
                "item_id": item_id,
                "output_index": index,
                "content_index": 0,
                "delta": piece,
            }));
        }
        push(json!({
            "type": "response.output_item.done",
            "output_index": index,
            "item": message_item(r, text, "completed"),
        }));
        index += 1;
    }
    for (i, c) in r.calls.iter().enumerate() {
        let item = call_item(r, i, "", "in_progress");
        let item_id = item["id"].clone();
        push(json!({"type": "response.output_item.added", "output_index": index, "item": item}));
        for piece in split(&c.arguments, 3) {
            push(json!({
                "type": "response.function_call_arguments.delta",
                "item_id": item_id,
                "output_index": index,
                "delta": piece,
            }));
        }
        push(json!({
            "type": "response.output_item.done",
            "output_index": index,
            "item": call_item(r, i, &c.arguments, "completed"),
        }));
        index += 1;
    }
    push(json!({
        "type": "response.completed",
        "response": response_object(r, created_at, "completed", &output(r)),
    }));
    out
}
