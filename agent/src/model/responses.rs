//! The Responses API: `POST {base}/responses` with `instructions`, `input` items and flat
//! function tools; `function_call` items are answered with `function_call_output` items by
//! `call_id`; reasoning items come back with their encrypted content (`store: false`, so
//! the provider keeps nothing) and are sent back before the calls they led to. A stream
//! that ends before `response.completed` is a cut, retried by the loop.

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use serde_json::{Value, json};

use super::{
    Answer, Assemble, Endpoint, Item, Model, ModelError, Request, ToolCall, ToolSchema, Usage,
    classify, count, is_context_length, read_stream,
};

pub struct ResponsesWire {
    client: Client<OpenAIConfig>,
    endpoint: Endpoint,
    tools: Value,
}

impl ResponsesWire {
    pub fn new(client: Client<OpenAIConfig>, endpoint: Endpoint, tools: Vec<ToolSchema>) -> Self {
        let tools = tools
            .into_iter()
            .map(|(name, description, parameters)| {
                json!({"type": "function", "name": name, "description": description,
                       "parameters": parameters, "strict": false})
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
        let mut input = Vec::new();
        for item in request.items {
            match item {
                Item::User { text } => {
                    input.push(json!({"type": "message", "role": "user", "content": text}))
                }
                Item::Assistant {
                    content,
                    calls,
                    reasoning,
                } => {
                    input.extend(reasoning.iter().cloned());
                    if !content.is_empty() {
                        input.push(
                            json!({"type": "message", "role": "assistant", "content": content}),
                        );
                    }
                    input.extend(calls.iter().map(|c| {
                        json!({"type": "function_call", "call_id": c.id, "name": c.name, "arguments": c.arguments})
                    }));
                }
                Item::ToolResult { call_id, output } => input.push(
                    json!({"type": "function_call_output", "call_id": call_id, "output": output}),
                ),
            }
        }
        let mut body = json!({
            "model": self.endpoint.model,
            "instructions": request.instructions,
            "input": input,
            "store": false,
            "include": ["reasoning.encrypted_content"],
        });
        if request.tools {
            body["tools"] = self.tools.clone();
            body["parallel_tool_calls"] = json!(true);
        }
        if let Some(n) = self.endpoint.max_output_tokens {
            body["max_output_tokens"] = json!(n);
        }
        if let Some(e) = &self.endpoint.reasoning_effort {
            body["reasoning"] = json!({"effort": e, "summary": "auto"});
        }
        if stream {
            body["stream"] = json!(true);
        }
        body
    }
}

fn usage(u: &Value) -> Option<Usage> {
    u.is_object().then(|| {
        let (input, output) = (count(&u["input_tokens"]), count(&u["output_tokens"]));
        Usage {
            prompt_tokens: input,
            completion_tokens: output,
            total_tokens: u["total_tokens"].as_u64().unwrap_or(input + output),
            cached_tokens: count(&u["input_tokens_details"]["cached_tokens"]),
            reasoning_tokens: count(&u["output_tokens_details"]["reasoning_tokens"]),
        }
    })
}

/// Adds one output item to `answer`.
fn take_item(answer: &mut Answer, item: &Value) {
    match item["type"].as_str() {
        Some("message") => {
            for part in item["content"].as_array().into_iter().flatten() {
                if let Some(t) = part["text"].as_str()
                    && part["type"].as_str() != Some("refusal")
                {
                    answer.content.push_str(t);
                }
            }
        }
        Some("function_call") => answer.calls.push(ToolCall {
            id: item["call_id"].as_str().unwrap_or_default().to_string(),
            name: item["name"].as_str().unwrap_or_default().to_string(),
            arguments: item["arguments"].as_str().unwrap_or_default().to_string(),
        }),
        Some("reasoning") => {
            // Sent back as it came, less what only an answer carries.
            let mut r = item.clone();
            if let Some(o) = r.as_object_mut() {
                o.remove("status");
            }
            answer.reasoning.push(r);
        }
        _ => {}
    }
}

/// The error a failed response (`status: failed`, or a stream's `error` event) carries.
fn failure(error: &Value) -> ModelError {
    let code = error["code"].as_str();
    let message = error["message"].as_str().unwrap_or("the response failed");
    if is_context_length(code, message) {
        ModelError::ContextLength(message.to_string())
    } else if matches!(
        code,
        Some("rate_limit_exceeded" | "server_error" | "server_is_overloaded")
    ) {
        ModelError::Transient(message.to_string())
    } else {
        ModelError::Fatal(format!("the model's response failed: {message}"))
    }
}

/// Reads a whole response object.
pub fn parse_response(v: &Value) -> Result<Answer, ModelError> {
    if v["status"].as_str() == Some("failed") {
        return Err(failure(&v["error"]));
    }
    let mut answer = Answer::default();
    for item in v["output"].as_array().into_iter().flatten() {
        take_item(&mut answer, item);
    }
    answer.usage = usage(&v["usage"]);
    Ok(answer)
}

/// Follows a stream's events to the final response.
#[derive(Default)]
pub struct Assembler {
    done_items: Vec<Value>,
    result: Option<Result<Answer, ModelError>>,
}

impl Assemble for Assembler {
    fn push(&mut self, event: &Value) {
        match event["type"].as_str() {
            Some("response.output_item.done") => self.done_items.push(event["item"].clone()),
            Some("response.completed" | "response.incomplete") => {
                let response = &event["response"];
                let mut answer = parse_response(response);
                if let Ok(a) = &mut answer
                    && a.content.is_empty()
                    && a.calls.is_empty()
                {
                    // Some servers leave the final response's output empty: use the items
                    // the stream delivered.
                    let mut from_items = Answer::default();
                    for item in &self.done_items {
                        take_item(&mut from_items, item);
                    }
                    from_items.usage = a.usage;
                    *a = from_items;
                }
                self.result = Some(answer);
            }
            Some("response.failed") => {
                self.result = Some(Err(failure(&event["response"]["error"])))
            }
            Some("error") => self.result = Some(Err(failure(event))),
            _ => {}
        }
    }

    fn is_done(&self) -> bool {
        self.result.is_some()
    }

    fn finish(self) -> Result<Answer, ModelError> {
        self.result.unwrap_or_else(|| {
            Err(ModelError::Transient(
                "the response's stream ended before `response.completed`".into(),
            ))
        })
    }
}

#[async_trait::async_trait]
impl Model for ResponsesWire {
    async fn ask(&self, request: Request<'_>) -> Result<Answer, ModelError> {
        let model = &self.endpoint.model;
        let body = self.body(request, self.endpoint.stream);
        if !self.endpoint.stream {
            let v: Value = self
                .client
                .responses()
                .create_byot(body)
                .await
                .map_err(|e| classify(e, model))?;
            return parse_response(&v);
        }
        let stream = self
            .client
            .responses()
            .create_stream_byot::<Value, Value>(body)
            .await
            .map_err(|e| classify(e, model))?;
        read_stream::<Assembler>(stream, model).await
    }

    fn wire(&self) -> &'static str {
        "responses"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patchflow_core::config::WireApi;

    fn wire() -> ResponsesWire {
        let endpoint = Endpoint {
            model: "m".into(),
            wire: WireApi::Responses,
            base_url: "http://127.0.0.1:9/v1".into(),
            api_key: None,
            stream: true,
            max_output_tokens: None,
            reasoning_effort: Some("low".into()),
            extra_headers: Default::default(),
            seed: None,
        };
        let client = Client::with_config(OpenAIConfig::new());
        ResponsesWire::new(
            client,
            endpoint,
            vec![("finish", "done", json!({"type": "object"}))],
        )
    }

    #[test]
    fn the_request_carries_items_by_call_id_and_reasoning_before_its_calls() {
        let items = vec![
            Item::User {
                text: "task".into(),
            },
            Item::Assistant {
                content: String::new(),
                calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "finish".into(),
                    arguments: "{}".into(),
                }],
                reasoning: vec![
                    json!({"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "e"}),
                ],
            },
            Item::ToolResult {
                call_id: "call_1".into(),
                output: "ok".into(),
            },
        ];
        let body = wire().body(
            Request {
                instructions: "be good",
                items: &items,
                tools: true,
            },
            true,
        );
        let kinds: Vec<&str> = body["input"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["type"].as_str().unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                "message",
                "reasoning",
                "function_call",
                "function_call_output"
            ]
        );
        assert_eq!(body["input"][3]["call_id"], "call_1");
        assert_eq!(body["store"], false);
        assert_eq!(body["tools"][0]["name"], "finish");
        assert_eq!(body["reasoning"]["effort"], "low");
        assert_eq!(body["instructions"], "be good");
    }

    #[test]
    fn a_stream_is_read_to_its_completed_response_and_a_cut_is_transient() {
        let mut a = Assembler::default();
        a.push(&json!({"type": "response.created", "response": {"status": "in_progress", "output": []}}));
        a.push(&json!({"type": "response.output_item.done", "item": {"type": "function_call", "call_id": "c1", "name": "finish", "arguments": "{}"}}));
        assert!(!a.is_done());
        a.push(&json!({"type": "response.completed", "response": {"status": "completed", "output": [],
            "usage": {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 60}, "output_tokens": 20, "output_tokens_details": {"reasoning_tokens": 12}, "total_tokens": 120}}}));
        let answer = a.finish().unwrap();
        assert_eq!(answer.calls[0].id, "c1");
        let u = answer.usage.unwrap();
        assert_eq!(
            (u.cached_tokens, u.reasoning_tokens, u.total_tokens),
            (60, 12, 120)
        );

        let mut cut = Assembler::default();
        cut.push(&json!({"type": "response.output_text.delta", "delta": "half"}));
        assert!(matches!(cut.finish(), Err(ModelError::Transient(_))));

        let mut failed = Assembler::default();
        failed.push(&json!({"type": "response.failed", "response": {"error": {"code": "context_length_exceeded", "message": "too long"}}}));
        assert!(matches!(failed.finish(), Err(ModelError::ContextLength(_))));
    }
}
