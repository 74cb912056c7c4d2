//! Exact replay: a [`Model`] that answers every request from a finished run's
//! transcript, and the comparison of a replayed run with the recorded one (each tool
//! result, then the diff). No model endpoint is needed.
//!
//! What a run measures of itself is not compared: a result's `duration_ms`, and durations
//! written in its text (`Ran 2 tests in 0.001s`, `finished in 12 ms`), are masked on both
//! sides first. Anything else that changes between runs (a clock, a random number, the
//! network) is a difference, reported with its step.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::Serialize;
use serde_json::Value;

use super::{Answer, Model, ModelError, Request, ToolCall, Usage};

/// Answers from a recorded transcript, in the order the run received them. The errors
/// that changed the run's course come back too: a context-length refusal (the run
/// compacted), a refused key, a fatal error. Transient ones do not: the recorded retry's
/// answer follows them.
pub struct ReplayWire {
    answers: Mutex<VecDeque<Result<Answer, ModelError>>>,
    compactions: Mutex<VecDeque<Result<Answer, ModelError>>>,
}

fn entries(transcript: &str) -> impl Iterator<Item = Value> + '_ {
    transcript
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
}

fn recorded_usage(v: &Value) -> Option<Usage> {
    serde_json::from_value(v.clone()).ok()
}

impl ReplayWire {
    /// Reads the model's answers out of `transcript.jsonl`'s text.
    pub fn from_transcript(transcript: &str) -> Result<Self, String> {
        let mut answers = VecDeque::new();
        let mut compactions = VecDeque::new();
        for e in entries(transcript) {
            match e["type"].as_str() {
                Some("model_error") => {
                    let message = e["error"].as_str().unwrap_or_default().to_string();
                    let err = match e["kind"].as_str() {
                        Some("context_length") => ModelError::ContextLength(message),
                        Some("auth") => ModelError::Auth(message),
                        Some("fatal") => ModelError::Fatal(message),
                        _ => continue,
                    };
                    if e["compaction"] == true {
                        compactions.push_back(Err(err));
                    } else {
                        answers.push_back(Err(err));
                    }
                }
                Some("model_response") => answers.push_back(Ok(Answer {
                    content: e["content"].as_str().unwrap_or_default().to_string(),
                    calls: e["tool_calls"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| ToolCall {
                            id: c["id"].as_str().unwrap_or_default().to_string(),
                            name: c["name"].as_str().unwrap_or_default().to_string(),
                            arguments: c["arguments"].as_str().unwrap_or_default().to_string(),
                        })
                        .collect(),
                    reasoning: e["reasoning"].as_array().cloned().unwrap_or_default(),
                    usage: recorded_usage(&e["usage"]),
                })),
                // A compaction whose request failed recorded that failure above instead.
                Some("compaction")
                    if e["usage"].is_null() && compactions.back().is_some_and(Result::is_err) => {}
                Some("compaction") => compactions.push_back(Ok(Answer {
                    content: e["summary"].as_str().unwrap_or_default().to_string(),
                    usage: recorded_usage(&e["usage"]),
                    ..Answer::default()
                })),
                _ => {}
            }
        }
        if !answers.iter().any(Result::is_ok) {
            return Err("the transcript records no model answer to replay".into());
        }
        Ok(Self {
            answers: Mutex::new(answers),
            compactions: Mutex::new(compactions),
        })
    }
}

#[async_trait::async_trait]
impl Model for ReplayWire {
    async fn ask(&self, request: Request<'_>) -> Result<Answer, ModelError> {
        let queue = if request.tools {
            &self.answers
        } else {
            &self.compactions
        };
        let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
        next.unwrap_or_else(|| {
            Err(ModelError::Fatal(if request.tools {
                "replay: the recorded run had no more model answers".into()
            } else {
                "replay: the recorded run compacted fewer times".into()
            }))
        })
    }

    fn wire(&self) -> &'static str {
        "replay"
    }
}

/// One tool result that came out differently.
#[derive(Debug, Clone, Serialize)]
pub struct StepDifference {
    /// The result's position among the run's tool results (1-based).
    pub index: usize,
    pub step: u64,
    pub tool: String,
    pub arguments: String,
    pub recorded_ok: Option<bool>,
    pub replayed_ok: Option<bool>,
    pub recorded_output: Value,
    pub replayed_output: Value,
}

/// What a replay found.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayReport {
    pub identical: bool,
    pub tool_results: usize,
    pub differences: Vec<StepDifference>,
    pub diff_identical: bool,
    pub recorded_outcome: Value,
    pub replayed_outcome: Value,
}

/// A duration in a tool's text: a number and a unit of time.
fn duration_pattern() -> &'static regex::Regex {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| {
        regex::Regex::new(r"\b\d+(?:\.\d+)?\s?(?:ns|us|µs|ms|s|sec|secs|seconds)\b")
            .unwrap_or_else(|_| unreachable!("a valid pattern"))
    })
}

/// `v` with what a run measures of itself masked (module docs).
fn comparable(v: &Value) -> Value {
    match v {
        Value::String(s) => {
            Value::String(duration_pattern().replace_all(s, "<duration>").into_owned())
        }
        Value::Array(a) => Value::Array(a.iter().map(comparable).collect()),
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "duration_ms")
                .map(|(k, v)| (k.clone(), comparable(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn tool_results(transcript: &str) -> Vec<Value> {
    entries(transcript)
        .filter(|e| e["type"] == "tool_result")
        .collect()
}

fn outcome(transcript: &str) -> Value {
    entries(transcript)
        .filter(|e| e["type"] == "end")
        .last()
        .map(|e| e["outcome"].clone())
        .unwrap_or(Value::Null)
}

/// Compares a replayed run (its transcript and diff) with the recorded one.
pub fn compare(
    recorded: &str,
    replayed: &str,
    recorded_diff: &str,
    replayed_diff: &str,
) -> ReplayReport {
    let (a, b) = (tool_results(recorded), tool_results(replayed));
    let mut differences = Vec::new();
    for i in 0..a.len().max(b.len()) {
        let (ra, rb) = (a.get(i), b.get(i));
        let same = match (ra, rb) {
            (Some(x), Some(y)) => {
                x["tool"] == y["tool"]
                    && x["arguments"] == y["arguments"]
                    && x["ok"] == y["ok"]
                    && comparable(&x["output"]) == comparable(&y["output"])
            }
            _ => false,
        };
        if !same {
            let pick = |r: Option<&Value>, k: &str| r.map(|v| v[k].clone()).unwrap_or(Value::Null);
            let either = ra.or(rb).cloned().unwrap_or(Value::Null);
            differences.push(StepDifference {
                index: i + 1,
                step: either["step"].as_u64().unwrap_or(0),
                tool: either["tool"].as_str().unwrap_or_default().to_string(),
                arguments: either["arguments"].as_str().unwrap_or_default().to_string(),
                recorded_ok: ra.and_then(|v| v["ok"].as_bool()),
                replayed_ok: rb.and_then(|v| v["ok"].as_bool()),
                recorded_output: pick(ra, "output"),
                replayed_output: pick(rb, "output"),
            });
        }
    }
    let diff_identical = recorded_diff == replayed_diff;
    ReplayReport {
        identical: differences.is_empty() && diff_identical,
        tool_results: a.len(),
        differences,
        diff_identical,
        recorded_outcome: outcome(recorded),
        replayed_outcome: outcome(replayed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const RECORDED: &str = r#"{"type":"start","model":"m"}
{"type":"model_response","step":1,"content":"","tool_calls":[{"id":"call_1_1","name":"run_shell_command","arguments":"{\"command_string\":\"date\"}"}],"usage":{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12}}
{"type":"tool_result","step":1,"tool":"run_shell_command","arguments":"{\"command_string\":\"date\"}","ok":true,"output":{"stdout":"Mon"}}
{"type":"compaction","step":2,"summary":"earlier: ran date"}
{"type":"model_response","step":2,"content":"done","tool_calls":[]}
{"type":"end","outcome":"answered"}
"#;

    #[tokio::test]
    async fn answers_come_back_in_order_and_compactions_apart() {
        let wire = ReplayWire::from_transcript(RECORDED).unwrap();
        let ask = |tools| Request {
            instructions: "",
            items: &[],
            tools,
        };
        let first = wire.ask(ask(true)).await.unwrap();
        assert_eq!(first.calls[0].id, "call_1_1");
        assert_eq!(first.usage.unwrap().total_tokens, 12);
        assert_eq!(
            wire.ask(ask(false)).await.unwrap().content,
            "earlier: ran date"
        );
        assert_eq!(wire.ask(ask(true)).await.unwrap().content, "done");
        assert!(matches!(
            wire.ask(ask(true)).await,
            Err(ModelError::Fatal(_))
        ));
        assert!(ReplayWire::from_transcript("{\"type\":\"start\"}\nnot json\n").is_err());
    }

    #[tokio::test]
    async fn errors_that_changed_the_course_come_back_and_transient_ones_do_not() {
        let recorded = r#"{"type":"start","model":"m"}
{"type":"model_error","step":1,"attempt":1,"kind":"transient","compaction":false,"error":"HTTP 500"}
{"type":"model_error","step":1,"attempt":1,"kind":"context_length","compaction":false,"error":"HTTP 400: too long"}
{"type":"compaction","step":1,"summary":"s","usage":{"prompt_tokens":5,"completion_tokens":1,"total_tokens":6}}
{"type":"model_response","step":1,"content":"done","tool_calls":[]}
"#;
        let wire = ReplayWire::from_transcript(recorded).unwrap();
        let ask = |tools| Request {
            instructions: "",
            items: &[],
            tools,
        };
        assert!(matches!(
            wire.ask(ask(true)).await,
            Err(ModelError::ContextLength(m)) if m == "HTTP 400: too long"
        ));
        assert_eq!(wire.ask(ask(false)).await.unwrap().content, "s");
        assert_eq!(wire.ask(ask(true)).await.unwrap().content, "done");
    }

    #[test]
    fn a_different_tool_result_is_reported_with_its_step() {
        let same = compare(RECORDED, RECORDED, "d", "d");
        assert!(same.identical, "{same:?}");
        let replayed = RECORDED.replace("\"stdout\":\"Mon\"", "\"stdout\":\"Tue\"");
        let r = compare(RECORDED, &replayed, "d", "d");
        assert!(!r.identical);
        assert_eq!(r.differences.len(), 1);
        assert_eq!(r.differences[0].step, 1);
        assert_eq!(r.differences[0].replayed_output["stdout"], "Tue");
        let r = compare(RECORDED, RECORDED, "d", "e");
        assert!(!r.identical && !r.diff_identical && r.differences.is_empty());
    }

    #[test]
    fn what_a_run_measures_of_itself_is_not_a_difference() {
        let recorded = RECORDED.replace(
            "\"stdout\":\"Mon\"",
            "\"stdout\":\"Ran 2 tests in 0.001s\\nOK\",\"duration_ms\":12",
        );
        let replayed = recorded
            .replace("0.001s", "0.013s")
            .replace("\"duration_ms\":12", "\"duration_ms\":40");
        assert!(compare(&recorded, &replayed, "d", "d").identical);
        // A number without a unit of time is not masked: a clock's output differs.
        let clock = RECORDED.replace("\"stdout\":\"Mon\"", "\"stdout\":\"1764000000123\"");
        let later = clock.replace("1764000000123", "1764000000999");
        assert_eq!(compare(&clock, &later, "d", "d").differences.len(), 1);
        assert_eq!(
            comparable(&json!("took 5 ms, 2.5 seconds and 3s; 12 files")),
            json!("took <duration>, <duration> and <duration>; 12 files")
        );
    }
}
