//! The two provider wires end to end, through `patchflow up` and the scripted model: one
//! stack whose model table names a Responses model and a Chat Completions model runs the
//! same "ledger" task on each, streamed (with a stream cut halfway and retried) and not;
//! the requests have each wire's shape, the diffs are the same, and the summary's tokens
//! and dollars are the scripted usages priced by hand. Provider errors: a 429 waits for
//! its `Retry-After`, a 401 fails the task at once without repeating the key, a tiny
//! `max_cost_usd` stops the run. A 60-step run stays inside a small context window by
//! compacting, and a model whose real window is smaller than its profile says recovers
//! from the provider's `context_length_exceeded`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use patchflow_scripted_model::{
    CONTRACT_TOOLS, Failure, MASKED_KEY, Observed, Script, ScriptedCall, ScriptedUsage, Turn,
};
use serde_json::{Value, json};

use crate::support::{Mode, Stack};

const LEDGER_PY: &str = r#""""A tiny ledger of deposits and withdrawals."""


class Ledger:
    def __init__(self):
        self.entries = []

    def deposit(self, amount):
        self.entries.append(amount)

    def withdraw(self, amount):
        self.entries.append(-amount)

    def balance(self):
        """Return what the ledger holds: deposits less withdrawals."""
        return sum(abs(e) for e in self.entries)

    def __len__(self):
        return len(self.entries)
"#;

const TEST_LEDGER_PY: &str = r#"import unittest

from ledger import Ledger


class LedgerTest(unittest.TestCase):
    def test_deposits_add_up(self):
        ledger = Ledger()
        ledger.deposit(10)
        ledger.deposit(5)
        self.assertEqual(ledger.balance(), 15)

    def test_withdrawals_are_taken_off(self):
        ledger = Ledger()
        ledger.deposit(10)
        ledger.withdraw(3)
        self.assertEqual(ledger.balance(), 7)
        self.assertEqual(len(ledger), 2)


if __name__ == "__main__":
    unittest.main()
"#;

/// The one fix every ledger task ends with, whatever the wire.
const LEDGER_DIFF: &str = r#"diff --git a/ledger.py b/ledger.py
--- a/ledger.py
+++ b/ledger.py
@@ -13,7 +13,7 @@
 
     def balance(self):
         """Return what the ledger holds: deposits less withdrawals."""
-        return sum(abs(e) for e in self.entries)
+        return sum(self.entries)
 
     def __len__(self):
         return len(self.entries)
"#;

const BUGGY_LINE: &str = "return sum(abs(e) for e in self.entries)";
const FIXED_LINE: &str = "return sum(self.entries)";

/// Dollars per million tokens: input, cached input, output.
#[derive(Debug, Clone, Copy)]
struct Prices {
    input: f64,
    cached: f64,
    output: f64,
}

const RESPONSES_PRICES: Prices = Prices {
    input: 2.5,
    cached: 0.25,
    output: 10.0,
};
const CHAT_PRICES: Prices = Prices {
    input: 0.8,
    cached: 0.2,
    output: 3.2,
};

/// The model table of the ledger stacks: one model on each wire, priced.
fn ledger_models() -> String {
    json!({
        "ledger-responses": {
            "wire_api": "responses",
            "input_price": RESPONSES_PRICES.input,
            "cached_input_price": RESPONSES_PRICES.cached,
            "output_price": RESPONSES_PRICES.output,
            "context_window": 400000,
        },
        "ledger-chat": {
            "wire_api": "chat",
            "input_price": CHAT_PRICES.input,
            "cached_input_price": CHAT_PRICES.cached,
            "output_price": CHAT_PRICES.output,
            "context_window": 128000,
        },
    })
    .to_string()
}

/// The price of one answer, by hand: uncached prompt, cached prompt and completion tokens,
/// each at its rate per million.
fn cost(u: &ScriptedUsage, p: Prices) -> f64 {
    let uncached = (u.prompt_tokens - u.cached_tokens) as f64;
    (uncached * p.input + u.cached_tokens as f64 * p.cached + u.completion_tokens as f64 * p.output)
        / 1_000_000.0
}

fn call(name: &str, arguments: Value) -> ScriptedCall {
    ScriptedCall {
        name: name.into(),
        arguments,
    }
}

fn usage(prompt: u64, completion: u64, cached: u64, reasoning: u64) -> ScriptedUsage {
    ScriptedUsage {
        prompt_tokens: prompt,
        completion_tokens: completion,
        cached_tokens: cached,
        reasoning_tokens: reasoning,
    }
}

fn git(repo: &Path, args: &[&str]) {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fresh git repository holding the ledger (and `extra` files), committed on `main`.
fn ledger_repo(dir: &Path, extra: &[(&str, String)]) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let repo = dir.join(format!("ledger-{}", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("ledger.py"), LEDGER_PY).unwrap();
    std::fs::write(repo.join("test_ledger.py"), TEST_LEDGER_PY).unwrap();
    for (name, text) in extra {
        std::fs::write(repo.join(name), text).unwrap();
    }
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "."]);
    git(
        &repo,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@localhost",
            "commit",
            "-qm",
            "ledger",
        ],
    );
    repo
}

/// The turns of every ledger fix: read the code, find `balance`, fix it, run the tests,
/// finish. The first expects `expect` in the results before it.
fn fix_turns(expect: Vec<String>) -> Vec<Turn> {
    vec![
        Turn {
            expect_in_tool_results: expect,
            content: Some("Let me read the ledger first.".into()),
            reasoning: Some(
                "The balance is wrong; the ledger's code is the place to start.".into(),
            ),
            tool_calls: vec![call("read_file_content", json!({"file_path": "ledger.py"}))],
            ..Turn::default()
        },
        Turn {
            expect_in_tool_results: vec!["abs(e) for e in self.entries".into()],
            reasoning: Some("balance() takes abs() of withdrawals; find every caller.".into()),
            tool_calls: vec![call(
                "search_code",
                json!({"pattern": "def balance", "path_glob": "**/*.py"}),
            )],
            ..Turn::default()
        },
        Turn {
            expect_in_tool_results: vec!["\"file_path\":\"ledger.py\"".into()],
            content: Some("balance() counts withdrawals as deposits; fixing it.".into()),
            reasoning: Some("Summing the signed entries is the fix.".into()),
            tool_calls: vec![call(
                "edit_file_content",
                json!({"file_path": "ledger.py", "old_text": BUGGY_LINE, "new_text": FIXED_LINE}),
            )],
            ..Turn::default()
        },
        Turn {
            expect_in_tool_results: vec!["\"replaced\":1".into()],
            tool_calls: vec![call(
                "run_shell_command",
                json!({"command_string": "python3 -m unittest -v", "timeout_seconds": 60}),
            )],
            ..Turn::default()
        },
        Turn {
            expect_in_tool_results: vec!["\"exit_code\":0".into(), "OK".into()],
            reasoning: Some("Both tests pass; done.".into()),
            tool_calls: vec![call(
                "finish",
                json!({"summary": "Fixed Ledger.balance(): it summed abs() of the entries, so withdrawals counted as deposits. python3 -m unittest passes."}),
            )],
            ..Turn::default()
        },
    ]
}

/// The scripted usage of each ledger turn, exactly.
fn ledger_usages() -> [ScriptedUsage; 5] {
    [
        usage(1800, 60, 0, 24),
        usage(2300, 45, 1536, 12),
        usage(2900, 90, 2048, 40),
        usage(3400, 50, 2816, 0),
        usage(4100, 70, 3328, 30),
    ]
}

/// The five-turn ledger script, each turn with a reasoning summary or not and its exact
/// usage.
fn ledger_script() -> Script {
    let mut turns = fix_turns(Vec::new());
    for (t, u) in turns.iter_mut().zip(ledger_usages()) {
        t.usage = Some(u);
    }
    Script {
        turns,
        ..Script::default()
    }
}

async fn submit(stack: &Stack, repo: &Path, model: &str, limits: Value) -> String {
    let (code, v) = stack
        .post_json(
            "/api/tasks",
            &json!({
                "git_url": format!("file://{}", repo.display()),
                "task_description": "The ledger's balance is wrong once money is withdrawn; fix it.",
                "model": model,
                "limits": limits,
            }),
        )
        .await;
    assert_eq!(code, 202, "{v}");
    v["task_id"].as_str().unwrap().to_string()
}

async fn transcript(stack: &Stack, id: &str) -> (String, Vec<Value>) {
    let (code, text) = stack.get_text(&format!("/api/tasks/{id}/transcript")).await;
    assert_eq!(code, 200, "{text}");
    let entries = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (text, entries)
}

fn of_type<'a>(entries: &'a [Value], kind: &str) -> Vec<&'a Value> {
    entries.iter().filter(|e| e["type"] == kind).collect()
}

/// The requests one task made: what the scripted model observed from `from` on.
struct Seen {
    bodies: Vec<Value>,
    paths: Vec<String>,
    streamed: Vec<bool>,
}

fn since(o: &Observed, from: usize) -> Seen {
    assert_eq!(o.bodies.len(), o.paths.len(), "a request body was not JSON");
    Seen {
        bodies: o.bodies[from..].to_vec(),
        paths: o.paths[from..].to_vec(),
        streamed: o.streamed[from..].to_vec(),
    }
}

/// Whether `text` holds something shaped like an OpenAI key: `sk-` not inside a word
/// (`task-` is not a key), or the scripted provider's masked key.
fn has_key(text: &str) -> bool {
    text.contains(MASKED_KEY)
        || text.match_indices("sk-").any(|(i, _)| {
            text[..i]
                .chars()
                .next_back()
                .is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_')
        })
}

/// Runs the ledger task on `model`, asserts what holds on every wire (COMPLETED, the exact
/// diff, the summary's tokens and dollars, the transcript's per-answer usage and cost) and
/// returns the transcript and the requests the task made.
async fn ledger_task(stack: &Stack, model: &str, wire: &str, prices: Prices) -> (Vec<Value>, Seen) {
    let from = stack.model.observed().requests as usize;
    let repo = ledger_repo(stack.dir.path(), &[]);
    let id = submit(
        stack,
        &repo,
        model,
        json!({"max_steps": 10, "max_cost_usd": 5}),
    )
    .await;
    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "COMPLETED", "{model}: {r}\n{}", stack.logs());
    assert_eq!(r["message"], "the agent finished; 1 file changed", "{r}");

    let (code, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert_eq!(code, 200);
    assert_eq!(diff, LEDGER_DIFF, "{model}");
    let patch = stack.dir.path().join(format!("{model}.patch"));
    std::fs::write(&patch, &diff).unwrap();
    let check = Command::new("git")
        .arg("-C")
        .arg(&repo)
        .args(["apply", "--check"])
        .arg(&patch)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    // The summary: the scripted usages summed, and priced by hand to the micro-dollar.
    let usages = ledger_usages();
    let s = &r["summary"];
    assert_eq!(s["outcome"], "finished", "{s}");
    assert_eq!(s["model"], model, "{s}");
    assert_eq!(
        (s["steps"].as_u64(), s["tool_calls"].as_u64()),
        (Some(5), Some(5)),
        "{s}"
    );
    assert_eq!(s["files_changed"], json!(["ledger.py"]), "{s}");
    assert_eq!(s["compactions"], 0, "{s}");
    let sum = |f: fn(&ScriptedUsage) -> u64| usages.iter().map(f).sum::<u64>();
    let prompt = sum(|u| u.prompt_tokens);
    let completion = sum(|u| u.completion_tokens);
    assert_eq!(s["prompt_tokens"], prompt, "{s}");
    assert_eq!(s["completion_tokens"], completion, "{s}");
    assert_eq!(s["total_tokens"], prompt + completion, "{s}");
    assert_eq!(s["cached_tokens"], sum(|u| u.cached_tokens), "{s}");
    assert_eq!(s["reasoning_tokens"], sum(|u| u.reasoning_tokens), "{s}");
    let want: f64 = usages.iter().map(|u| cost(u, prices)).sum();
    let got = s["cost_usd"].as_f64().unwrap();
    assert!(
        (got - want).abs() < 1e-6,
        "{model}: cost ${got} where the usages price at ${want}"
    );

    // The transcript: the wire, each answer's usage and cost, the tools in order.
    let (text, entries) = transcript(stack, &id).await;
    let start = of_type(&entries, "start");
    assert_eq!(start.len(), 1, "{text}");
    assert_eq!(start[0]["wire"], wire, "{text}");
    assert_eq!(start[0]["model"], model, "{text}");
    let answers = of_type(&entries, "model_response");
    assert_eq!(answers.len(), 5, "{text}");
    for (i, (a, u)) in answers.iter().zip(&usages).enumerate() {
        assert_eq!(a["step"], i + 1, "{a}");
        let got = &a["usage"];
        assert_eq!(got["prompt_tokens"], u.prompt_tokens, "step {}: {a}", i + 1);
        assert_eq!(got["completion_tokens"], u.completion_tokens, "{a}");
        assert_eq!(got["cached_tokens"], u.cached_tokens, "{a}");
        assert_eq!(got["reasoning_tokens"], u.reasoning_tokens, "{a}");
        assert_eq!(
            got["total_tokens"],
            u.prompt_tokens + u.completion_tokens,
            "{a}"
        );
        let c = a["cost_usd"].as_f64().unwrap_or(f64::NAN);
        assert!((c - cost(u, prices)).abs() < 1e-9, "step {}: {a}", i + 1);
    }
    let results = of_type(&entries, "tool_result");
    let tools: Vec<&str> = results
        .iter()
        .map(|e| e["tool"].as_str().unwrap())
        .collect();
    assert_eq!(
        tools,
        [
            "read_file_content",
            "search_code",
            "edit_file_content",
            "run_shell_command",
            "finish"
        ],
        "{text}"
    );
    assert!(results.iter().all(|e| e["ok"] == true), "{text}");
    let shell = &results[3]["output"];
    assert_eq!(shell["exit_code"], 0, "{shell}");
    let stderr = shell["stderr"].as_str().unwrap();
    assert!(
        stderr.contains("Ran 2 tests") && stderr.trim_end().ends_with("OK"),
        "{stderr}"
    );
    let end = of_type(&entries, "end");
    assert_eq!(end.len(), 1, "{text}");
    assert_eq!(end[0]["outcome"], "finished", "{text}");

    let seen = since(&stack.model.observed(), from);
    assert!(
        seen.bodies.iter().all(|b| b["model"] == model),
        "{model}: another model's request came in during the task"
    );
    (entries, seen)
}

/// What every Responses request of the ledger task must look like: `store: false`, the
/// instructions apart, flat function tools, each `function_call_output` after the
/// `function_call` of its `call_id`, each reasoning item sent back before its turn's calls.
fn assert_responses_shape(seen: &Seen) {
    assert!(!seen.bodies.is_empty());
    assert!(
        seen.paths.iter().all(|p| p == "/v1/responses"),
        "{:?}",
        seen.paths
    );
    let mut outputs = 0;
    for b in &seen.bodies {
        assert_eq!(b["store"], false, "{b}");
        assert!(b.get("messages").is_none(), "{b}");
        assert!(
            b["instructions"]
                .as_str()
                .is_some_and(|i| i.contains("patchflow's coding agent")),
            "{b}"
        );
        let tools = b["tools"].as_array().unwrap();
        for t in tools {
            assert_eq!(t["type"], "function", "{t}");
            assert!(t["name"].is_string(), "{t}");
            assert!(t["parameters"].is_object(), "{t}");
            assert!(t.get("function").is_none(), "a nested Chat tool: {t}");
        }
        for (name, _) in CONTRACT_TOOLS {
            assert!(tools.iter().any(|t| t["name"] == name), "{name}: {b}");
        }
        let input = b["input"].as_array().unwrap();
        assert_eq!(input[0]["role"], "user", "{b}");
        for (pos, item) in input.iter().enumerate() {
            if item["type"] == "function_call_output" {
                outputs += 1;
                let id = &item["call_id"];
                assert!(
                    input[..pos]
                        .iter()
                        .any(|c| c["type"] == "function_call" && c["call_id"] == *id),
                    "{id} answers no earlier function_call: {b}"
                );
            }
        }
    }
    assert!(outputs > 0, "no request carried a function_call_output");
    // The last request (for `finish`) carries the whole run: four calls answered, and the
    // first turn's reasoning item, with its encrypted content, before its call.
    let last = seen.bodies.last().unwrap()["input"].as_array().unwrap();
    let pos = |pred: &dyn Fn(&Value) -> bool| last.iter().position(pred);
    for n in 1..=4 {
        let id = format!("call_{n}_1");
        let call = pos(&|i| i["type"] == "function_call" && i["call_id"] == id.as_str());
        let out = pos(&|i| i["type"] == "function_call_output" && i["call_id"] == id.as_str());
        assert!(call.is_some() && call < out, "{id}: {last:?}");
    }
    let rs = pos(&|i| i["type"] == "reasoning" && i["id"] == "rs_1");
    let call = pos(&|i| i["call_id"] == "call_1_1");
    assert!(rs.is_some() && rs < call, "{last:?}");
    assert_eq!(last[rs.unwrap()]["encrypted_content"], "enc_1");
}

/// What every Chat request of the ledger task must look like.
fn assert_chat_shape(seen: &Seen) {
    assert!(!seen.bodies.is_empty());
    assert!(
        seen.paths.iter().all(|p| p == "/v1/chat/completions"),
        "{:?}",
        seen.paths
    );
    for b in &seen.bodies {
        assert!(b.get("input").is_none() && b.get("store").is_none(), "{b}");
        assert_eq!(b["messages"][0]["role"], "system", "{b}");
        for t in b["tools"].as_array().unwrap() {
            assert_eq!(t["type"], "function", "{t}");
            assert!(t["function"]["name"].is_string(), "{t}");
        }
    }
    let last = seen.bodies.last().unwrap()["messages"].as_array().unwrap();
    let answered: Vec<&str> = last
        .iter()
        .filter(|m| m["role"] == "tool")
        .map(|m| m["tool_call_id"].as_str().unwrap())
        .collect();
    assert_eq!(answered, ["call_1_1", "call_2_1", "call_3_1", "call_4_1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_and_chat_wires_streamed() {
    let mut script = ledger_script();
    script.cut_streams = 1;
    let models = ledger_models();
    let stack = Stack::start(
        Mode::Up,
        script,
        &[
            ("PATCHFLOW_MODELS", &models),
            ("PATCHFLOW_LLM_STREAM", "true"),
            ("PATCHFLOW_LLM_MAX_RETRIES", "2"),
        ],
    )
    .await;

    // Responses first: its first streamed answer is cut halfway and retried.
    let (entries, seen) =
        ledger_task(&stack, "ledger-responses", "responses", RESPONSES_PRICES).await;
    let observed = stack.model.observed();
    assert!(observed.violations.is_empty(), "{:?}", observed.violations);
    assert_eq!(observed.cut_streams, 1);
    assert_eq!(
        seen.bodies.len(),
        6,
        "five answers and the retry of the cut one"
    );
    assert_eq!(observed.answered, 5);
    assert!(seen.streamed.iter().all(|s| *s), "{:?}", seen.streamed);
    assert!(seen.bodies.iter().all(|b| b["stream"] == true));
    // The cut answer was asked again, the same, and answered.
    assert_eq!(seen.bodies[0]["input"], seen.bodies[1]["input"]);
    let errors = of_type(&entries, "model_error");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0]["step"], 1);
    assert_responses_shape(&seen);
    let answers = of_type(&entries, "model_response");
    assert_eq!(
        answers[0]["reasoning"][0]["summary"][0]["text"],
        "The balance is wrong; the ledger's code is the place to start.",
        "{}",
        answers[0]
    );
    assert_eq!(answers[0]["content"], "Let me read the ledger first.");

    // Then Chat Completions, on the same stack.
    let (entries, seen) = ledger_task(&stack, "ledger-chat", "chat", CHAT_PRICES).await;
    let observed = stack.model.observed();
    assert!(observed.violations.is_empty(), "{:?}", observed.violations);
    assert_eq!(observed.cut_streams, 1, "only the first stream is cut");
    assert_eq!(seen.bodies.len(), 5);
    assert!(seen.streamed.iter().all(|s| *s), "{:?}", seen.streamed);
    for b in &seen.bodies {
        assert_eq!(b["stream"], true, "{b}");
        assert_eq!(b["stream_options"]["include_usage"], true, "{b}");
    }
    assert!(of_type(&entries, "model_error").is_empty());
    assert_chat_shape(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstreamed_wires() {
    let models = ledger_models();
    let stack = Stack::start(
        Mode::Up,
        ledger_script(),
        &[
            ("PATCHFLOW_MODELS", &models),
            ("PATCHFLOW_LLM_STREAM", "false"),
        ],
    )
    .await;
    let (_, seen) = ledger_task(&stack, "ledger-responses", "responses", RESPONSES_PRICES).await;
    assert_eq!(seen.bodies.len(), 5);
    assert!(seen.streamed.iter().all(|s| !s), "{:?}", seen.streamed);
    assert!(seen.bodies.iter().all(|b| b["stream"] != true));
    assert_responses_shape(&seen);

    let (_, seen) = ledger_task(&stack, "ledger-chat", "chat", CHAT_PRICES).await;
    assert_eq!(seen.bodies.len(), 5);
    assert!(seen.streamed.iter().all(|s| !s), "{:?}", seen.streamed);
    for b in &seen.bodies {
        assert!(
            b["stream"] != true && b.get("stream_options").is_none(),
            "{b}"
        );
    }
    assert_chat_shape(&seen);
    let observed = stack.model.observed();
    assert!(observed.violations.is_empty(), "{:?}", observed.violations);
    assert_eq!(observed.answered, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_errors() {
    let models = ledger_models();
    let stack = Stack::start(Mode::Up, ledger_script(), &[("PATCHFLOW_MODELS", &models)]).await;

    // A 429 with `Retry-After: 1`: the request is asked again no sooner, and the task
    // completes as if nothing happened.
    stack.model.set_failure(Some(Failure {
        status: 429,
        times: Some(1),
        message: "Rate limit reached for requests".into(),
        retry_after: Some(1),
        ..Failure::default()
    }));
    let (_, seen) = ledger_task(&stack, "ledger-chat", "chat", CHAT_PRICES).await;
    let observed = stack.model.observed();
    assert_eq!(observed.failed_on_purpose, 1);
    assert_eq!(seen.bodies.len(), 6, "five answers and the one refused");
    assert_eq!(seen.bodies[0]["messages"], seen.bodies[1]["messages"]);
    let gap = observed.arrivals[1] - observed.arrivals[0];
    assert!(
        gap >= Duration::from_secs(1),
        "asked again {gap:?} after a 429 that said Retry-After: 1"
    );

    // A 401: the task fails at once, saying the key was refused, and never repeats it.
    stack.model.set_failure(Some(Failure {
        status: 401,
        ..Failure::default()
    }));
    let from = stack.model.observed().requests;
    let repo = ledger_repo(stack.dir.path(), &[]);
    let id = submit(&stack, &repo, "ledger-responses", json!({"max_steps": 10})).await;
    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "FAILED", "{r}");
    let observed = stack.model.observed();
    let asked = observed.requests - from;
    assert!(
        (1..=2).contains(&asked),
        "{asked} requests for a refused key"
    );
    assert_eq!(observed.failed_on_purpose, 1 + asked);
    let message = r["message"].as_str().unwrap();
    assert!(
        message.contains("refused the credentials")
            && message.contains("HTTP 401")
            && message.contains("ledger-responses"),
        "{message}"
    );
    assert_eq!(r["summary"]["outcome"], "error", "{r}");
    assert_eq!(stack.activity_attempts(&id, "run_agent"), [1]);
    let events = serde_json::to_string(&stack.events(&id).await).unwrap();
    let (text, entries) = transcript(&stack, &id).await;
    let errors = of_type(&entries, "model_error");
    assert_eq!(errors.len(), 1, "{text}");
    let (code, log) = stack.get_text(&format!("/api/tasks/{id}/log")).await;
    assert_eq!(code, 200);
    for (what, t) in [
        ("record", r.to_string()),
        ("events", events),
        ("transcript", text),
        ("agent log", log),
        ("process logs", stack.logs()),
    ] {
        assert!(!has_key(&t), "the {what} repeats the key:\n{t}");
    }

    // A cost cap below one answer's price: the run stops after its first answer.
    stack.model.set_failure(None);
    let from = stack.model.observed().requests;
    let repo = ledger_repo(stack.dir.path(), &[]);
    let id = submit(
        &stack,
        &repo,
        "ledger-responses",
        json!({"max_steps": 10, "max_cost_usd": 0.000001}),
    )
    .await;
    let r = stack.wait_terminal(&id).await;
    assert_eq!(r["status"], "FAILED", "{r}");
    let s = &r["summary"];
    assert_eq!(s["outcome"], "max_cost", "{r}");
    assert_eq!(s["steps"], 1, "{s}");
    let first = cost(&ledger_usages()[0], RESPONSES_PRICES);
    assert!(
        (s["cost_usd"].as_f64().unwrap() - first).abs() < 1e-9,
        "{s}"
    );
    assert!(
        r["message"].as_str().unwrap().contains("max_cost_usd"),
        "{r}"
    );
    assert_eq!(stack.model.observed().requests - from, 1);
    let observed = stack.model.observed();
    assert!(observed.violations.is_empty(), "{:?}", observed.violations);
}

/// The server's context window in the compaction test, and the proactive model's.
const SMALL_WINDOW: u64 = 8000;
/// Lines of `journal.txt` each reading turn reads.
const SLICE: usize = 30;
/// Reading turns before the fix (every seventh a shell command).
const READS: usize = 55;

fn journal() -> String {
    (1..=READS * SLICE)
        .map(|n| {
            format!(
                "journal {n:04}: deposit {:>4} to account {:>3}, reconciled against statement {:05}\n",
                (n * 37) % 1000,
                n % 97,
                n * 11
            )
        })
        .collect()
}

/// 60 steps: 55 reads of the journal (`read_file_content`, or `sed` through the shell),
/// each turn checking it got the previous slice, then the ledger fix.
fn long_script() -> Script {
    let mut turns = Vec::new();
    for k in 0..READS {
        let (a, b) = (k * SLICE + 1, (k + 1) * SLICE);
        let expect = if k == 0 {
            Vec::new()
        } else {
            vec![format!("journal {:04}:", k * SLICE)]
        };
        let tool = if k % 7 == 6 {
            call(
                "run_shell_command",
                json!({"command_string": format!("sed -n '{a},{b}p' journal.txt"), "timeout_seconds": 30}),
            )
        } else {
            call(
                "read_file_content",
                json!({"file_path": "journal.txt", "start_line": a, "end_line": b}),
            )
        };
        turns.push(Turn {
            expect_in_tool_results: expect,
            tool_calls: vec![tool],
            ..Turn::default()
        });
    }
    let mut fix = fix_turns(vec![format!("journal {:04}:", READS * SLICE)]);
    for t in &mut fix {
        t.reasoning = None;
    }
    turns.extend(fix);
    Script {
        turns,
        context_window: Some(SMALL_WINDOW),
        ..Script::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_over_a_long_run() {
    let script = long_script();
    assert_eq!(script.turns.len(), 60);
    let models = json!({
        "knows-window": {"wire_api": "responses", "context_window": SMALL_WINDOW},
        "oblivious": {"wire_api": "chat", "context_window": 128000},
    })
    .to_string();
    let stack = Stack::start(Mode::Up, script, &[("PATCHFLOW_MODELS", &models)]).await;
    let limits = json!({"max_steps": 80, "max_tokens": 5_000_000, "wall_seconds": 900});

    // The agent knows the window: it compacts before the provider would refuse.
    let repo = ledger_repo(stack.dir.path(), &[("journal.txt", journal())]);
    let id = submit(&stack, &repo, "knows-window", limits.clone()).await;
    let r = stack
        .wait_for(&id, Duration::from_secs(600), |s| s.is_terminal())
        .await;
    assert_eq!(r["status"], "COMPLETED", "{r}\n{}", stack.logs());
    let (_, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert_eq!(diff, LEDGER_DIFF);
    let observed = stack.model.observed();
    assert!(observed.violations.is_empty(), "{:?}", observed.violations);
    assert_eq!(
        observed.context_overflows, 0,
        "the agent let a request overflow"
    );
    assert!(observed.compactions >= 1, "{observed:?}");
    assert!(
        observed.max_request_tokens <= SMALL_WINDOW,
        "a request of {} tokens",
        observed.max_request_tokens
    );
    let s = &r["summary"];
    assert_eq!(s["outcome"], "finished", "{s}");
    assert_eq!(s["steps"], 60, "{s}");
    let (text, entries) = transcript(&stack, &id).await;
    let compactions = of_type(&entries, "compaction");
    assert!(!compactions.is_empty(), "{text}");
    assert_eq!(s["compactions"], compactions.len(), "{s}");
    assert_eq!(observed.compactions, compactions.len() as u64);
    for c in &compactions {
        let (before, after) = (
            c["before_tokens"].as_u64().unwrap(),
            c["after_tokens"].as_u64().unwrap(),
        );
        assert!(before > after, "{c}");
        assert!(
            c["summary"]
                .as_str()
                .unwrap()
                .starts_with("Summary of the earlier conversation"),
            "{c}"
        );
    }
    // The requests after a compaction carry its summary in place of the older turns.
    assert!(
        observed.bodies.iter().any(|b| b["input"]
            .to_string()
            .contains("compacted to fit the context window")),
        "no request carried a summary"
    );
    let results = of_type(&entries, "tool_result");
    assert_eq!(results.len(), 60);
    assert!(results.iter().all(|e| e["ok"] == true), "{text}");
    let first = id.clone();

    // A profile claiming a far larger window: the provider refuses, the agent compacts
    // and goes on.
    let from = stack.model.observed();
    let repo = ledger_repo(stack.dir.path(), &[("journal.txt", journal())]);
    let id = submit(&stack, &repo, "oblivious", limits).await;
    let r = stack
        .wait_for(&id, Duration::from_secs(600), |s| s.is_terminal())
        .await;
    assert_eq!(
        r["status"],
        "COMPLETED",
        "after the provider's context_length_exceeded the agent must compact and go on: {r}\n{}",
        stack.logs()
    );
    let (_, diff) = stack.get_text(&format!("/api/tasks/{id}/diff")).await;
    assert_eq!(diff, LEDGER_DIFF);
    let observed = stack.model.observed();
    assert!(observed.violations.is_empty(), "{:?}", observed.violations);
    assert!(
        observed.context_overflows > from.context_overflows,
        "the window was never passed"
    );
    assert!(observed.compactions > from.compactions);
    let (text, entries) = transcript(&stack, &id).await;
    let compactions = of_type(&entries, "compaction");
    assert!(!compactions.is_empty(), "{text}");
    assert_eq!(r["summary"]["compactions"], compactions.len());
    assert_eq!(r["summary"]["steps"], 60);
    // The refusal taught the agent the real window, which it kept to from then on.
    let learned = of_type(&entries, "context_window");
    assert_eq!(learned.len(), 1, "{text}");
    assert_eq!(learned[0]["declared"], 128000);
    assert_eq!(learned[0]["learned"], SMALL_WINDOW, "{}", learned[0]);
    assert_eq!(
        of_type(&entries, "model_error")
            .iter()
            .filter(|e| e["kind"] == "context_length")
            .count(),
        1,
        "{text}"
    );

    // Both compacted runs replay exactly, compactions and the refusal included, with the
    // model server stopped.
    stack.model.stop();
    for task in [&first, &id] {
        let out = stack.cli(&["replay", task]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("identical (60 tool results"), "{text}");
    }
}
