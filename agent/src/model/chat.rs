//! Chat Completions: `POST {base}/chat/completions`, the wire vLLM, Ollama, OpenRouter,
//! Azure and most gateways speak. Streamed answers are put back together from their
//! deltas; a stream that ends before a `finish_reason` is a cut, retried by the loop.

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use serde_json::{Value, json};

use super::{
    Answer, Assemble, Endpoint, Item, Model, ModelError, Request, ToolCall, ToolSchema, Usage,
    classify, count, read_stream,
};

pub struct ChatWire {
    client: Client<OpenAIConfig>,
    endpoint: Endpoint,
    tools: Value,
}

impl ChatWire {
    pub fn new(client: Client<OpenAIConfig>, endpoint: Endpoint, tools: Vec<ToolSchema>) -> Self {
        let tools = tools
            .into_iter()
            .map(|(name, description, parameters)| {
                json!({"type": "function", "function": {
                    "name": name, "description": description, "parameters": parameters,
                }})
            })
            .collect();
        Self {
            client,
            endpoint,
            tools: Value::Array(tools),
        }
    }

    /// The request body for `request`.
    pub fn body(&self, request: Request<'_>, stream: bool) -> Value {
        let mut messages = vec![json!({"role": "system", "content": request.instructions})];
        for item in request.items {
            messages.push(match item {
                Item::User { text } => json!({"role": "user", "content": text}),
                Item::Assistant { content, calls, .. } => {
                    let mut m = json!({"role": "assistant", "content": if content.is_empty() { Value::Null } else { json!(content) }});
                    if !calls.is_empty() {
                        m["tool_calls"] = calls
                            .iter()
                            .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}))
                            .collect();
                    }
                    m
                }
                Item::ToolResult { call_id, output } => {
                    json!({"role": "tool", "tool_call_id": call_id, "content": output})
                }
            });
        }
        let mut body = json!({"model": self.endpoint.model, "messages": messages});
        if request.tools {
            body["tools"] = self.tools.clone();
        }
        if let Some(n) = self.endpoint.max_output_tokens {
            body["max_completion_tokens"] = json!(n);
        }
        if let Some(e) = &self.endpoint.reasoning_effort {
            body["reasoning_effort"] = json!(e);
        }
        if let Some(seed) = self.endpoint.seed {
            body["seed"] = json!(seed);
        }
        if stream {
            body["stream"] = json!(true);
            body["stream_options"] = json!({"include_usage": true});
        }
        body
    }
}

/// The usage object of either a whole answer or the stream's last chunk.
fn usage(u: &Value) -> Option<Usage> {
    u.is_object().then(|| Usage {
        prompt_tokens: count(&u["prompt_tokens"]),
        completion_tokens: count(&u["completion_tokens"]),
        total_tokens: count(&u["total_tokens"]),
        cached_tokens: count(&u["prompt_tokens_details"]["cached_tokens"]),
        reasoning_tokens: count(&u["completion_tokens_details"]["reasoning_tokens"]),
    })
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// Reads a whole (not streamed) answer.
pub fn parse_answer(v: &Value) -> Result<Answer, ModelError> {
    let Some(message) = v["choices"].get(0).map(|c| &c["message"]) else {
        return Err(ModelError::Fatal(
            "the model answered with no choices".into(),
        ));
    };
    let calls = message["tool_calls"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["type"].as_str().unwrap_or("function") == "function")
        .map(|c| ToolCall {
            id: text(&c["id"]),
            name: text(&c["function"]["name"]),
            arguments: text(&c["function"]["arguments"]),
        })
        .collect();
    Ok(Answer {
        content: text(&message["content"]),
        calls,
        reasoning: Vec::new(),
        usage: usage(&v["usage"]),
    })
}

/// Puts a streamed answer back together, chunk by chunk.
#[derive(Default)]
pub struct Assembler {
    content: String,
    calls: Vec<ToolCall>,
    usage: Option<Usage>,
    finished: bool,
}

impl Assemble for Assembler {
    fn push(&mut self, chunk: &Value) {
        if let Some(u) = usage(&chunk["usage"]) {
            self.usage = Some(u);
        }
        let Some(choice) = chunk["choices"].get(0) else {
            return;
        };
        let delta = &choice["delta"];
        if let Some(t) = delta["content"].as_str() {
            self.content.push_str(t);
        }
        for d in delta["tool_calls"].as_array().into_iter().flatten() {
            let index = d["index"].as_u64().unwrap_or(self.calls.len() as u64) as usize;
            if index > 256 {
                continue;
            }
            while self.calls.len() <= index {
                self.calls.push(ToolCall {
                    id: String::new(),
                    name: String::new(),
                    arguments: String::new(),
                });
            }
            let call = &mut self.calls[index];
            if let Some(id) = d["id"].as_str() {
                call.id = id.to_string();
            }
            if let Some(n) = d["function"]["name"].as_str() {
                call.name.push_str(n);
            }
            if let Some(a) = d["function"]["arguments"].as_str() {
                call.arguments.push_str(a);
            }
        }
        if choice["finish_reason"].is_string() {
            self.finished = true;
        }
    }

    fn finish(self) -> Result<Answer, ModelError> {
        if !self.finished {
            return Err(ModelError::Transient(
                "the answer's stream ended before it was complete".into(),
            ));
        }
        Ok(Answer {
            content: self.content,
            calls: self
                .calls
                .into_iter()
                .filter(|c| !c.name.is_empty())
                .collect(),
            reasoning: Vec::new(),
            usage: self.usage,
        })
    }
}

#[async_trait::async_trait]
impl Model for ChatWire {
    async fn ask(&self, request: Request<'_>) -> Result<Answer, ModelError> {
        let model = &self.endpoint.model;
        let body = self.body(request, self.endpoint.stream);
        if !self.endpoint.stream {
            let v: Value = self
                .client
                .chat()
                .create_byot(body)
                .await
                .map_err(|e| classify(e, model))?;
            return parse_answer(&v);
        }
        let stream = self
            .client
            .chat()
            .create_stream_byot::<Value, Value>(body)
            .await
            .map_err(|e| classify(e, model))?;
        read_stream::<Assembler>(stream, model).await
    }

    fn wire(&self) -> &'static str {
        "chat"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_streamed_answer_is_put_back_together() {
        let mut a = Assembler::default();
        for c in [
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "Let me "}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "look.", "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "read_file_content", "arguments": "{\"file_"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "path\":\"a\"}"}}, {"index": 1, "id": "call_2", "function": {"name": "search_code", "arguments": "{}"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "prompt_tokens_details": {"cached_tokens": 4}}}),
        ] {
            a.push(&c);
        }
        let answer = a.finish().unwrap();
        assert_eq!(answer.content, "Let me look.");
        assert_eq!(answer.calls.len(), 2);
        assert_eq!(answer.calls[0].arguments, "{\"file_path\":\"a\"}");
        assert_eq!(answer.calls[1].id, "call_2");
        let u = answer.usage.unwrap();
        assert_eq!(
            (u.prompt_tokens, u.cached_tokens, u.total_tokens),
            (10, 4, 15)
        );
    }

    #[test]
    fn a_stream_without_its_finish_is_a_cut() {
        let mut a = Assembler::default();
        a.push(&json!({"choices": [{"index": 0, "delta": {"content": "half"}}]}));
        assert!(matches!(a.finish(), Err(ModelError::Transient(_))));
    }
}
