//! Tests of both wires: turn selection after compaction, compaction requests, streaming,
//! the Responses API's checks, usage, the context window, failures and cut streams. The
//! answers are parsed with async-openai's own types, the client the agent uses.

use std::net::SocketAddr;

use async_openai::types::chat::{CreateChatCompletionResponse, CreateChatCompletionStreamResponse};
use async_openai::types::responses::{OutputItem, Response as OpenAiResponse, ResponseStreamEvent};
use serde_json::{Value, json};

use super::*;

fn props(ps: &[&str]) -> Value {
    Value::Object(
        ps.iter()
            .map(|p| (p.to_string(), json!({"type": "string"})))
            .collect(),
    )
}

fn chat_tools() -> Value {
    CONTRACT_TOOLS
        .iter()
        .map(|(n, ps)| {
            json!({"type": "function", "function": {
                "name": n, "description": "d",
                "parameters": {"type": "object", "properties": props(ps)}}})
        })
        .collect()
}

fn flat_tools() -> Value {
    CONTRACT_TOOLS
        .iter()
        .map(|(n, ps)| {
            json!({"type": "function", "name": n, "description": "d", "strict": false,
                "parameters": {"type": "object", "properties": props(ps)}})
        })
        .collect()
}

fn call(name: &str, arguments: Value) -> ScriptedCall {
    ScriptedCall {
        name: name.into(),
        arguments,
    }
}

/// Four turns: three reads, each expecting the previous result, then an answer.
fn four_turns() -> Script {
    let read = |n: u32, expect: Option<&str>| Turn {
        expect_in_tool_results: expect.map(|e| vec![e.to_string()]).unwrap_or_default(),
        tool_calls: vec![call(
            "read_file_content",
            json!({"file_path": format!("f{n}")}),
        )],
        ..Turn::default()
    };
    Script {
        model: Some("m".into()),
        turns: vec![
            read(1, None),
            read(2, Some("first")),
            read(3, Some("second")),
            Turn {
                expect_in_tool_results: vec!["third".into()],
                content: Some("All read.".into()),
                ..Turn::default()
            },
        ],
        ..Script::default()
    }
}

fn chat_body(messages: Value) -> Value {
    let mut body = json!({"model": "m", "tools": chat_tools()});
    body["messages"] = messages;
    body
}

fn responses_body(input: Value) -> Value {
    let mut body =
        json!({"model": "m", "store": false, "instructions": "be brief", "tools": flat_tools()});
    body["input"] = input;
    body
}

fn assistant_call(id: &str) -> Value {
    json!({"role": "assistant", "content": null, "tool_calls": [{
        "id": id, "type": "function",
        "function": {"name": "read_file_content", "arguments": "{}"}}]})
}

fn tool(id: &str, content: &str) -> Value {
    json!({"role": "tool", "tool_call_id": id, "content": content})
}

fn fc(id: &str) -> Value {
    json!({"type": "function_call", "call_id": id, "name": "read_file_content", "arguments": "{}"})
}

fn fco(id: &str, output: &str) -> Value {
    json!({"type": "function_call_output", "call_id": id, "output": output})
}

fn user(text: &str) -> Value {
    json!({"type": "message", "role": "user", "content": text})
}

fn reply(script: &Script, wire: Wire, body: &Value) -> Reply {
    match reply_for(script, wire, body) {
        Ok(Outcome::Reply(r)) => r,
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn violation(script: &Script, wire: Wire, body: &Value) -> String {
    match reply_for(script, wire, body) {
        Err(e) => e,
        other => panic!("expected a violation, got {other:?}"),
    }
}

// 1. Turn selection.

#[test]
fn a_compacted_chat_history_gets_the_turn_after_its_latest_call() {
    let s = four_turns();
    let compacted = chat_body(json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "Summary of the earlier conversation (5 messages compacted)."},
        assistant_call("call_3_1"),
        tool("call_3_1", "the third file"),
    ]));
    let r = reply(&s, Wire::Chat, &compacted);
    assert_eq!((r.turn, r.content.as_deref()), (4, Some("All read.")));

    // Only the calls present are checked: one without its result is still a violation.
    let unanswered =
        chat_body(json!([{"role": "user", "content": "x"}, assistant_call("call_3_1")]));
    assert!(violation(&s, Wire::Chat, &unanswered).contains("have no results"));
    // A result whose call was compacted away is one too.
    let orphan = chat_body(json!([{"role": "user", "content": "x"}, tool("call_2_1", "second")]));
    assert!(violation(&s, Wire::Chat, &orphan).contains("unknown call `call_2_1`"));
    // The previous turn's results must hold what the turn expects.
    let wrong = chat_body(json!([
        assistant_call("call_3_1"),
        tool("call_3_1", "nothing")
    ]));
    assert!(violation(&s, Wire::Chat, &wrong).contains("expected the tool results to contain"));

    // The answer's call ids carry the turn number.
    let second = chat_body(json!([
        assistant_call("call_1_1"),
        tool("call_1_1", "first")
    ]));
    let r = reply(&s, Wire::Chat, &second);
    assert_eq!(r.calls[0].id, "call_2_1");
}

#[test]
fn without_call_ids_the_turn_is_the_number_of_assistant_messages() {
    let mut s = four_turns();
    s.turns[1].expect_in_tool_results.clear();
    let body = chat_body(json!([
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "thinking"},
        {"role": "user", "content": "go on"},
    ]));
    assert_eq!(reply(&s, Wire::Chat, &body).turn, 2);
    // A text-only assistant message after the latest call counts as a turn too.
    let s = Script::from_json(
        r#"{"turns":[
            {"tool_calls":[{"name":"read_file_content","arguments":{}}]},
            {"content":"let me think"},
            {"content":"done"}]}"#,
    )
    .unwrap();
    let body = chat_body(json!([
        assistant_call("call_1_1"),
        tool("call_1_1", "r"),
        {"role": "assistant", "content": "let me think"},
        {"role": "user", "content": "go on"},
    ]));
    assert_eq!(
        reply(&s, Wire::Chat, &body).content.as_deref(),
        Some("done")
    );
    let input = json!([
        fc("call_1_1"),
        fco("call_1_1", "r"),
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "let me think"}]},
        user("go on"),
    ]);
    assert_eq!(reply(&s, Wire::Responses, &responses_body(input)).turn, 3);
    assert_eq!(
        reply(&s, Wire::Responses, &responses_body(json!([user("x")]))).turn,
        1
    );
}

#[test]
fn a_compacted_responses_input_gets_the_turn_after_its_latest_call() {
    let s = four_turns();
    let input = json!([user("summary"), fc("call_3_1"), fco("call_3_1", "third")]);
    let r = reply(&s, Wire::Responses, &responses_body(input));
    assert_eq!(r.turn, 4);
    // The outputs of the previous turn's calls count wherever they are, interleaved too.
    let s = Script::from_json(
        r#"{"turns":[
            {"tool_calls":[{"name":"read_file_content","arguments":{}},{"name":"search_code","arguments":{}}]},
            {"expect_in_tool_results":["one","two"],"content":"ok"}]}"#,
    )
    .unwrap();
    let input = json!([
        user("x"),
        fc("call_1_1"),
        fco("call_1_1", "one"),
        fc("call_1_2"),
        fco("call_1_2", "two")
    ]);
    assert_eq!(
        reply(&s, Wire::Responses, &responses_body(input))
            .content
            .as_deref(),
        Some("ok")
    );
}

// 2. Compaction.

#[test]
fn compaction_requests_are_summarised_without_a_turn() {
    let s = four_turns();
    let chat = json!({"model": "m", "messages": [
        {"role": "system", "content": format!("Summarise. {COMPACTION_MARKER}")},
        {"role": "user", "content": "x"},
        assistant_call("call_1_1"),
        tool("call_1_1", "first"),
    ]});
    let r = reply(&s, Wire::Chat, &chat);
    assert!(r.compaction);
    assert_eq!(
        r.content.as_deref(),
        Some("Summary of the earlier conversation (3 messages compacted).")
    );
    let responses = json!({"model": "m", "store": false, "tools": [],
        "instructions": format!("{COMPACTION_MARKER} summarise"),
        "input": [user("x"), fc("call_1_1"), fco("call_1_1", "first"), user("y")]});
    let r = reply(&s, Wire::Responses, &responses);
    assert_eq!(
        r.content.as_deref(),
        Some("Summary of the earlier conversation (4 items compacted).")
    );
    // With tools it is an ordinary turn.
    let mut with_tools = responses;
    with_tools["tools"] = flat_tools();
    assert!(!reply(&s, Wire::Responses, &with_tools).compaction);
    // Scripted usage for compactions.
    let s = Script {
        compaction_usage: Some(ScriptedUsage {
            prompt_tokens: 7,
            completion_tokens: 3,
            ..ScriptedUsage::default()
        }),
        ..s
    };
    let (a, _) = answer_for(&s, &chat).unwrap();
    assert_eq!(a["usage"]["total_tokens"], 10);
}

// 3. Chat streaming.

fn chat_stream_turn() -> Script {
    Script {
        turns: vec![Turn {
            content: Some("Reading two files.".into()),
            tool_calls: vec![
                call("read_file_content", json!({"file_path": "a.py"})),
                call("search_code", json!({"pattern": "def add"})),
            ],
            ..Turn::default()
        }],
        ..Script::default()
    }
}

fn parse_chunks(frames: &[String]) -> Vec<CreateChatCompletionStreamResponse> {
    let data: Vec<&str> = frames
        .iter()
        .map(|f| f.strip_prefix("data: ").unwrap().trim_end())
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"));
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect()
}

#[test]
fn chat_streams_parse_as_async_openai_chunks() {
    let s = chat_stream_turn();
    let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true},
        "tools": chat_tools(), "messages": [{"role": "user", "content": "x"}]});
    let r = reply(&s, Wire::Chat, &body);
    let chunks = parse_chunks(&sse_frames(Wire::Chat, &r, &body));
    let first = &chunks[0].choices[0].delta;
    assert!(matches!(
        first.role,
        Some(async_openai::types::chat::Role::Assistant)
    ));
    let content: Vec<String> = chunks
        .iter()
        .flat_map(|c| c.choices.iter().filter_map(|ch| ch.delta.content.clone()))
        .collect();
    assert!(content.len() >= 2, "{content:?}");
    assert_eq!(content.concat(), "Reading two files.");
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut pieces = [0usize; 2];
    for c in &chunks {
        for tc in c
            .choices
            .iter()
            .flat_map(|ch| ch.delta.tool_calls.iter().flatten())
        {
            let i = tc.index as usize;
            pieces[i] += 1;
            let f = tc.function.as_ref().unwrap();
            if let Some(id) = &tc.id {
                assert!(tc.r#type.is_some() && f.name.is_some());
                calls.push((id.clone(), f.name.clone().unwrap(), String::new()));
            } else {
                assert!(f.name.is_none());
            }
            calls[i]
                .2
                .push_str(f.arguments.as_deref().unwrap_or_default());
        }
    }
    assert!(pieces.iter().all(|p| *p >= 2), "{pieces:?}");
    assert_eq!(calls[0].0, "call_1_1");
    assert_eq!(calls[1].1, "search_code");
    assert_eq!(
        serde_json::from_str::<Value>(&calls[0].2).unwrap(),
        json!({"file_path": "a.py"})
    );
    let finish = chunks
        .iter()
        .find_map(|c| c.choices.first().and_then(|ch| ch.finish_reason));
    assert!(matches!(
        finish,
        Some(async_openai::types::chat::FinishReason::ToolCalls)
    ));
    let last = chunks.last().unwrap();
    assert!(last.choices.is_empty());
    let usage = last.usage.as_ref().unwrap();
    assert_eq!(
        usage.total_tokens,
        usage.prompt_tokens + usage.completion_tokens
    );

    // Without include_usage: no usage chunk.
    let mut plain = body.clone();
    plain["stream_options"] = Value::Null;
    let chunks = parse_chunks(&sse_frames(Wire::Chat, &r, &plain));
    assert!(
        chunks
            .iter()
            .all(|c| c.usage.is_none() && !c.choices.is_empty())
    );
    // The unstreamed answer parses too.
    let (whole, _) = answer_for(&s, &body).unwrap();
    let whole: CreateChatCompletionResponse = serde_json::from_value(whole).unwrap();
    assert_eq!(
        whole.choices[0].message.tool_calls.as_ref().unwrap().len(),
        2
    );
}

async fn start(script: Script) -> ScriptedModel {
    ScriptedModel::start(script, SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .unwrap()
}

fn client(model: &ScriptedModel) -> async_openai::Client<async_openai::config::OpenAIConfig> {
    let config = async_openai::config::OpenAIConfig::new()
        .with_api_base(model.base_url())
        .with_api_key("sk-script");
    async_openai::Client::with_config(config)
}

#[tokio::test]
async fn async_openai_streams_a_chat_turn() {
    use futures::StreamExt;
    let model = start(chat_stream_turn()).await;
    let request = serde_json::from_value(json!({"model": "m", "stream": true,
        "stream_options": {"include_usage": true},
        "tools": chat_tools(), "messages": [{"role": "user", "content": "x"}]}))
    .unwrap();
    let mut stream = client(&model).chat().create_stream(request).await.unwrap();
    let mut content = String::new();
    let mut usage = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        for ch in &chunk.choices {
            content.push_str(ch.delta.content.as_deref().unwrap_or_default());
        }
        usage = usage.or(chunk.usage);
    }
    assert_eq!(content, "Reading two files.");
    assert!(usage.is_some());
    let seen = model.observed();
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    assert_eq!((seen.answered, seen.streamed.clone()), (1, vec![true]));
    assert_eq!(seen.paths, vec!["/v1/chat/completions"]);
}

// 4. The Responses API.

fn reasoning_script() -> Script {
    Script {
        model: Some("m".into()),
        turns: vec![
            Turn {
                reasoning: Some("The bug is in add().".into()),
                content: Some("Looking.".into()),
                tool_calls: vec![call("read_file_content", json!({"file_path": "calc.py"}))],
                ..Turn::default()
            },
            Turn {
                expect_in_tool_results: vec!["def add".into()],
                content: Some("Fixed.".into()),
                ..Turn::default()
            },
        ],
        ..Script::default()
    }
}

fn reasoning_back() -> Value {
    json!({"type": "reasoning", "id": "rs_1",
        "summary": [{"type": "summary_text", "text": "The bug is in add()."}],
        "encrypted_content": "enc_1"})
}

#[test]
fn responses_answers_parse_as_async_openai_responses() {
    let s = reasoning_script();
    let (resp, _) = response_for(&s, &responses_body(json!([user("fix it")]))).unwrap();
    assert_eq!(resp["output"][0]["id"], "rs_1");
    assert_eq!(resp["output"][0]["encrypted_content"], "enc_1");
    assert_eq!(resp["output"][1]["id"], "msg_1");
    assert_eq!(resp["output"][2]["id"], "fc_1_1");
    assert_eq!(resp["output"][2]["call_id"], "call_1_1");
    let parsed: OpenAiResponse = serde_json::from_value(resp).unwrap();
    assert_eq!(parsed.output.len(), 3);
    assert!(matches!(parsed.output[0], OutputItem::Reasoning(_)));
    assert!(matches!(parsed.output[1], OutputItem::Message(_)));
    let OutputItem::FunctionCall(f) = &parsed.output[2] else {
        panic!("{:?}", parsed.output[2])
    };
    assert_eq!(
        serde_json::from_str::<Value>(&f.arguments).unwrap(),
        json!({"file_path": "calc.py"})
    );
    let usage = parsed.usage.unwrap();
    assert_eq!(usage.total_tokens, usage.input_tokens + usage.output_tokens);

    // The next request sends the reasoning item back before its call.
    let input = json!([
        user("fix it"),
        reasoning_back(),
        fc("call_1_1"),
        fco("call_1_1", "def add(a, b)")
    ]);
    let (resp, _) = response_for(&s, &responses_body(input)).unwrap();
    assert_eq!(resp["output"][0]["content"][0]["text"], "Fixed.");
    serde_json::from_value::<OpenAiResponse>(resp).unwrap();
}

#[test]
fn responses_streams_parse_as_async_openai_events() {
    let s = reasoning_script();
    let body = responses_body(json!([user("fix it")]));
    let r = reply(&s, Wire::Responses, &body);
    let frames = sse_frames(Wire::Responses, &r, &body);
    let mut events = Vec::new();
    for (n, frame) in frames.iter().enumerate() {
        let (event, data) = frame.trim_end().split_once('\n').unwrap();
        let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(event.strip_prefix("event: ").unwrap(), data["type"]);
        assert_eq!(data["sequence_number"], n);
        let parsed: ResponseStreamEvent =
            serde_json::from_value(data.clone()).unwrap_or_else(|e| panic!("{e}: {data}"));
        events.push(parsed);
    }
    let ResponseStreamEvent::ResponseCreated(created) = &events[0] else {
        panic!("{:?}", events[0])
    };
    assert!(created.response.output.is_empty());
    assert!(matches!(
        created.response.status,
        async_openai::types::responses::Status::InProgress
    ));
    let text: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            ResponseStreamEvent::ResponseOutputTextDelta(d) => Some(d.delta.as_str()),
            _ => None,
        })
        .collect();
    assert!(text.len() >= 2);
    assert_eq!(text.concat(), "Looking.");
    let args: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            ResponseStreamEvent::ResponseFunctionCallArgumentsDelta(d) => Some(d.delta.as_str()),
            _ => None,
        })
        .collect();
    assert!(args.len() >= 2);
    assert_eq!(args.concat(), json!({"file_path": "calc.py"}).to_string());
    let added = events
        .iter()
        .filter(|e| matches!(e, ResponseStreamEvent::ResponseOutputItemAdded(_)))
        .count();
    let done: Vec<&OutputItem> = events
        .iter()
        .filter_map(|e| match e {
            ResponseStreamEvent::ResponseOutputItemDone(d) => Some(&d.item),
            _ => None,
        })
        .collect();
    assert_eq!((added, done.len()), (3, 3));
    let ResponseStreamEvent::ResponseCompleted(completed) = events.last().unwrap() else {
        panic!("{:?}", events.last())
    };
    assert_eq!(completed.response.output.len(), 3);
    assert!(completed.response.usage.is_some());
}

#[tokio::test]
async fn async_openai_creates_and_streams_responses() {
    use futures::StreamExt;
    let model = start(reasoning_script()).await;
    let client = client(&model);
    let request = serde_json::from_value(responses_body(json!([user("fix it")]))).unwrap();
    let resp = client.responses().create(request).await.unwrap();
    assert_eq!(resp.output.len(), 3);
    let mut body = responses_body(json!([user("fix it")]));
    body["stream"] = json!(true);
    let request = serde_json::from_value(body).unwrap();
    let mut stream = client.responses().create_stream(request).await.unwrap();
    let mut completed = false;
    while let Some(event) = stream.next().await {
        completed |= matches!(event.unwrap(), ResponseStreamEvent::ResponseCompleted(_));
    }
    assert!(completed);
    let seen = model.observed();
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
    assert_eq!(seen.paths, vec!["/v1/responses", "/v1/responses"]);
    assert_eq!(seen.streamed, vec![false, true]);
    assert_eq!(seen.answered, 2);
}

#[test]
fn responses_requests_that_break_the_rules_are_violations() {
    let s = reasoning_script();
    let good = json!([
        user("fix it"),
        reasoning_back(),
        fc("call_1_1"),
        fco("call_1_1", "def add")
    ]);
    assert!(reply_for(&s, Wire::Responses, &responses_body(good.clone())).is_ok());

    let mut stored = responses_body(good.clone());
    stored["store"] = json!(true);
    assert!(violation(&s, Wire::Responses, &stored).contains("store: false"));
    stored.as_object_mut().unwrap().remove("store");
    assert!(violation(&s, Wire::Responses, &stored).contains("store: false"));

    let unknown = json!([
        user("x"),
        reasoning_back(),
        fc("call_1_1"),
        fco("call_1_1", "def add"),
        fco("call_9_9", "?")
    ]);
    let e = violation(&s, Wire::Responses, &responses_body(unknown));
    assert!(
        e.contains("function_call_output for unknown call `call_9_9`"),
        "{e}"
    );

    let unanswered = json!([user("x"), reasoning_back(), fc("call_1_1")]);
    let e = violation(&s, Wire::Responses, &responses_body(unanswered));
    assert!(e.contains("have no function_call_output"), "{e}");

    let no_reasoning = json!([user("x"), fc("call_1_1"), fco("call_1_1", "def add")]);
    let e = violation(&s, Wire::Responses, &responses_body(no_reasoning));
    assert!(e.contains("reasoning item rs_1 was not sent back"), "{e}");
    let after = json!([
        user("x"),
        fc("call_1_1"),
        reasoning_back(),
        fco("call_1_1", "def add")
    ]);
    let e = violation(&s, Wire::Responses, &responses_body(after));
    assert!(e.contains("reasoning item rs_1 was not sent back"), "{e}");
    let mut forged = reasoning_back();
    forged["encrypted_content"] = json!("something else");
    let forged = json!([
        user("x"),
        forged,
        fc("call_1_1"),
        fco("call_1_1", "def add")
    ]);
    let e = violation(&s, Wire::Responses, &responses_body(forged));
    assert!(e.contains("reasoning item rs_1 was not sent back"), "{e}");

    let mut tools = flat_tools();
    tools[1]["parameters"]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("end_line");
    let mut body = responses_body(good.clone());
    body["tools"] = tools;
    let e = violation(&s, Wire::Responses, &body);
    assert!(
        e.contains("tool `read_file_content` lacks parameter `end_line`"),
        "{e}"
    );
    // Chat's nested tools are not Responses tools.
    let mut body = responses_body(good.clone());
    body["tools"] = chat_tools();
    assert!(violation(&s, Wire::Responses, &body).contains("is missing from the request"));

    let s = Script {
        expect_in_instructions: vec!["patchflow".into()],
        ..s
    };
    let e = violation(&s, Wire::Responses, &responses_body(good));
    assert!(e.contains("instructions do not contain `patchflow`"), "{e}");

    let odd = json!([user("x"), {"type": "item_reference", "id": "x"}]);
    assert!(violation(&s, Wire::Responses, &responses_body(odd)).contains("unsupported type"));
}

#[test]
fn chat_tools_missing_a_contract_parameter_are_a_violation() {
    let s = four_turns();
    let mut body = chat_body(json!([{"role": "user", "content": "x"}]));
    body["tools"][6]["function"]["parameters"]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("summary");
    let e = violation(&s, Wire::Chat, &body);
    assert!(e.contains("tool `finish` lacks parameter `summary`"), "{e}");
}

#[tokio::test]
async fn a_body_that_is_not_json_is_a_violation_on_both_routes() {
    let model = start(four_turns()).await;
    let http = reqwest::Client::new();
    for path in ["/v1/chat/completions", "/v1/responses", "/responses"] {
        let r = http
            .post(format!("http://{}{path}", model.addr))
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let e: async_openai::error::WrappedError = r.json().await.unwrap();
        assert!(e.error.message.contains("not JSON"));
    }
    let seen = model.observed();
    assert_eq!(seen.violations.len(), 3);
    assert_eq!(seen.streamed, vec![false; 3]);
    assert_eq!(
        seen.paths,
        vec!["/v1/chat/completions", "/v1/responses", "/responses"]
    );
}

// 5. Usage.

#[test]
fn usage_is_estimated_or_scripted() {
    let mut s = four_turns();
    let messages = json!([{"role": "user", "content": "read them"}]);
    let body = chat_body(messages.clone());
    let prompt = (messages.to_string().len() as u64).div_ceil(4);
    let r = reply(&s, Wire::Chat, &body);
    let completion = (r.calls[0].arguments.len() as u64).div_ceil(4);
    assert_eq!(
        chat::completion(&r)["usage"],
        json!({"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0}})
    );
    let input = json!([user("read them")]);
    let body = responses_body(input.clone());
    let estimate =
        ((json!("be brief").to_string().len() + input.to_string().len()) as u64).div_ceil(4);
    assert_eq!(request_tokens(Wire::Responses, &body), estimate);

    s.turns[0].usage = Some(ScriptedUsage {
        prompt_tokens: 1000,
        completion_tokens: 50,
        cached_tokens: 800,
        reasoning_tokens: 20,
    });
    let (resp, _) = response_for(&s, &body).unwrap();
    assert_eq!(
        resp["usage"],
        json!({"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 800},
            "output_tokens": 50, "output_tokens_details": {"reasoning_tokens": 20},
            "total_tokens": 1050})
    );
    let (a, _) = answer_for(&s, &chat_body(messages)).unwrap();
    let a: CreateChatCompletionResponse = serde_json::from_value(a).unwrap();
    let u = a.usage.unwrap();
    assert_eq!(
        (u.prompt_tokens, u.completion_tokens, u.total_tokens),
        (1000, 50, 1050)
    );
    assert_eq!(u.prompt_tokens_details.unwrap().cached_tokens, Some(800));
    assert_eq!(
        u.completion_tokens_details.unwrap().reasoning_tokens,
        Some(20)
    );
}

// 6. The context window.

#[tokio::test]
async fn requests_over_the_context_window_get_context_length_exceeded() {
    let s = Script {
        context_window: Some(20),
        ..four_turns()
    };
    let small = chat_body(json!([{"role": "user", "content": "x"}]));
    assert!(matches!(
        reply_for(&s, Wire::Chat, &small),
        Ok(Outcome::Reply(_))
    ));
    let big = chat_body(json!([{"role": "user", "content": "x".repeat(200)}]));
    let tokens = request_tokens(Wire::Chat, &big);
    assert_eq!(
        reply_for(&s, Wire::Chat, &big),
        Ok(Outcome::Overflow { window: 20, tokens })
    );

    let model = start(s).await;
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/chat/completions", model.base_url()))
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": {
            "message": format!("This model's maximum context length is 20 tokens. However, your messages resulted in {tokens} tokens."),
            "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}})
    );
    let mut big_responses = responses_body(json!([user(&"y".repeat(300))]));
    big_responses["stream"] = json!(true);
    let r = http
        .post(format!("{}/responses", model.base_url()))
        .json(&big_responses)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let e: async_openai::error::WrappedError = r.json().await.unwrap();
    assert_eq!(e.error.code.as_deref(), Some("context_length_exceeded"));
    let seen = model.observed();
    assert_eq!(seen.context_overflows, 2);
    assert!(seen.violations.is_empty());
    assert_eq!(seen.answered, 0);
    assert_eq!(
        seen.max_request_tokens,
        request_tokens(Wire::Responses, &big_responses).max(tokens)
    );
}

// 7. Failures and cut streams.

#[tokio::test]
async fn failures_are_openai_shaped_with_retry_after_and_code() {
    let model = start(Script {
        fail: Some(Failure {
            status: 429,
            times: Some(1),
            retry_after: Some(3),
            code: Some("rate_limit_exceeded".into()),
            message: "Rate limit reached".into(),
            seeds: Vec::new(),
        }),
        ..four_turns()
    })
    .await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", model.base_url());
    let body = chat_body(json!([{"role": "user", "content": "x"}]));
    let r = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "3");
    let e: async_openai::error::WrappedError = r.json().await.unwrap();
    assert_eq!(e.error.code.as_deref(), Some("rate_limit_exceeded"));
    assert_eq!(e.error.message, "Rate limit reached");
    let r = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);

    model.set_failure(Some(Failure {
        status: 401,
        ..Failure::default()
    }));
    let r = http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("retry-after").is_none());
    let e: Value = r.json().await.unwrap();
    assert_eq!(
        e,
        json!({"error": {
            "message": "Incorrect API key provided: sk-scr***ipt. You can find your API key at https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}})
    );
    let seen = model.observed();
    assert_eq!((seen.failed_on_purpose, seen.answered), (2, 1));
}

#[tokio::test]
async fn the_first_streams_are_cut_and_the_retry_gets_the_same_turn() {
    let model = start(Script {
        cut_streams: 2,
        ..reasoning_script()
    })
    .await;
    let http = reqwest::Client::new();
    let mut chat = chat_body(json!([{"role": "user", "content": "x"}]));
    chat["stream"] = json!(true);
    let chat_url = format!("{}/chat/completions", model.base_url());
    let mut responses = responses_body(json!([user("x")]));
    responses["stream"] = json!(true);
    let responses_url = format!("{}/responses", model.base_url());

    async fn read(r: reqwest::Response) -> (String, bool) {
        let mut text = String::new();
        let mut r = r;
        loop {
            match r.chunk().await {
                Ok(Some(b)) => text.push_str(&String::from_utf8_lossy(&b)),
                Ok(None) => return (text, true),
                Err(_) => return (text, false),
            }
        }
    }
    let (cut, complete) = read(http.post(&chat_url).json(&chat).send().await.unwrap()).await;
    assert!(!complete, "the body ends with an error");
    assert!(!cut.contains("[DONE]") && !cut.contains("finish_reason\":\"tool_calls"));
    let (cut, complete) = read(
        http.post(&responses_url)
            .json(&responses)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(!complete);
    assert!(cut.contains("response.created") && !cut.contains("response.completed"));

    let (whole, complete) = read(http.post(&chat_url).json(&chat).send().await.unwrap()).await;
    assert!(complete && whole.trim_end().ends_with("data: [DONE]"));
    assert!(whole.contains("call_1_1"));
    let (whole, complete) = read(
        http.post(&responses_url)
            .json(&responses)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(complete && whole.contains("response.completed") && whole.contains("call_1_1"));

    let seen = model.observed();
    assert_eq!((seen.cut_streams, seen.answered), (2, 2));
    assert_eq!(seen.streamed, vec![true; 4]);
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
}

#[tokio::test]
async fn compaction_requests_use_no_turn_on_either_wire_streamed_or_not() {
    let model = start(four_turns()).await;
    let http = reqwest::Client::new();
    let compact_chat = json!({"model": "m", "stream": true, "messages": [
        {"role": "system", "content": COMPACTION_MARKER}, {"role": "user", "content": "x"}]});
    let r = http
        .post(format!("{}/chat/completions", model.base_url()))
        .json(&compact_chat)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let text = r.text().await.unwrap();
    let frames: Vec<String> = text.split_inclusive("\n\n").map(str::to_string).collect();
    let summary: String = parse_chunks(&frames)
        .iter()
        .flat_map(|c| c.choices.iter().filter_map(|ch| ch.delta.content.clone()))
        .collect();
    assert_eq!(
        summary,
        "Summary of the earlier conversation (1 messages compacted)."
    );
    let compact_responses = json!({"model": "m", "store": false,
        "instructions": COMPACTION_MARKER, "input": [user("x"), user("y")]});
    let r: Value = http
        .post(format!("{}/responses", model.base_url()))
        .json(&compact_responses)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        r["output"][0]["content"][0]["text"],
        "Summary of the earlier conversation (2 items compacted)."
    );
    serde_json::from_value::<OpenAiResponse>(r).unwrap();
    // The first turn is still the next one.
    let r: Value = http
        .post(format!("{}/chat/completions", model.base_url()))
        .json(&chat_body(json!([{"role": "user", "content": "x"}])))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        r["choices"][0]["message"]["tool_calls"][0]["id"],
        "call_1_1"
    );
    let seen = model.observed();
    assert_eq!((seen.compactions, seen.answered), (2, 3));
    assert_eq!(seen.streamed, vec![true, false, false]);
    assert!(seen.violations.is_empty(), "{:?}", seen.violations);
}

// 8. Script compatibility.

#[test]
fn scripts_old_and_new_parse_and_unknown_fields_are_refused() {
    let old = r#"{"model":"m","delay_ms":5,"expect_in_instructions":["x"],
        "fail":{"status":500,"times":1,"message":"boom"},
        "turns":[{"expect_in_tool_results":["a"],"tool_calls":[{"name":"finish","arguments":{"summary":"s"}}],"content":null,"delay_ms":1}]}"#;
    let s = Script::from_json(old).unwrap();
    assert_eq!(s.cut_streams, 0);
    assert!(s.context_window.is_none() && s.turns[0].reasoning.is_none());
    let new = r#"{"turns":[{"content":"c","reasoning":"r","usage":{"prompt_tokens":3}}],
        "context_window":1000,"cut_streams":1,"compaction_usage":{"completion_tokens":2},
        "fail":{"status":429,"retry_after":2,"code":"rate_limit_exceeded"}}"#;
    let s = Script::from_json(new).unwrap();
    assert_eq!(s.turns[0].usage.as_ref().unwrap().prompt_tokens, 3);
    assert_eq!(s.fail.as_ref().unwrap().retry_after, Some(2));
    assert!(Script::from_json(r#"{"turns":[],"context":1}"#).is_err());
    assert!(Script::from_json(r#"{"turns":[{"usage":{"tokens":1}}]}"#).is_err());
}

#[test]
fn parse_call_id_reads_only_our_ids() {
    assert_eq!(parse_call_id("call_12_3"), Some((12, 3)));
    for id in [
        "call_0_1",
        "call_1",
        "call_x_1",
        "call_1_1_1",
        "toolu_1_1",
        "",
    ] {
        assert_eq!(parse_call_id(id), None, "{id}");
    }
}

/// A best-of-N candidate's seed: a failure aimed at some seeds spares the others, and
/// `{{seed}}` in a scripted argument becomes the request's seed (`0` without one).
#[tokio::test]
async fn seeds_choose_which_requests_fail_and_fill_scripted_arguments() {
    let model = start(Script {
        model: Some("m".into()),
        turns: vec![Turn {
            tool_calls: vec![call(
                "edit_file_content",
                json!({"file_path": "a.py", "old_text": "x", "new_text": "x  # {{seed}} {{seed}}"}),
            )],
            ..Turn::default()
        }],
        fail: Some(Failure {
            status: 400,
            message: "doomed".into(),
            seeds: vec![2],
            ..Failure::default()
        }),
        ..Script::default()
    })
    .await;
    let http = reqwest::Client::new();
    let url = format!("{}/chat/completions", model.base_url());
    let ask = |seed: Option<u64>| {
        let mut body = chat_body(json!([{"role": "user", "content": "x"}]));
        if let Some(s) = seed {
            body["seed"] = json!(s);
        }
        let (http, url) = (http.clone(), url.clone());
        async move { http.post(&url).json(&body).send().await.unwrap() }
    };
    let r = ask(Some(2)).await;
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("doomed"));
    for (seed, want) in [(Some(7), "x  # 7 7"), (None, "x  # 0 0")] {
        let r = ask(seed).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        let args: Value = serde_json::from_str(
            v["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(args["new_text"], want, "{v}");
    }
    assert_eq!(model.observed().failed_on_purpose, 1);
}
