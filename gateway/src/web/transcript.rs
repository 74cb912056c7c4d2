//! Renders `transcript.jsonl` as a list: the model's words in the open, each tool call with
//! its arguments and output folded in a `<details>`, so a long run stays scannable. Every
//! value is untrusted (the model and the repository wrote it) and goes through [`esc`].

use std::fmt::Write as _;

use serde_json::Value;

use super::html::{duration_ms, esc, thousands};

/// Longest text shown for one value; the raw transcript link has the rest.
const MAX_SHOWN: usize = 16 * 1024;

fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}\n… ({} more bytes)", &s[..end], s.len() - end)
}

/// A JSON value as readable text: strings as they are, anything else pretty-printed.
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => serde_json::to_string_pretty(other).unwrap_or_default(),
    }
}

/// Tool arguments are kept as the model sent them, a JSON string: parse it when it is one.
fn as_json(v: &Value) -> Value {
    match v {
        Value::String(s) => serde_json::from_str::<Value>(s).unwrap_or(Value::String(s.clone())),
        other => other.clone(),
    }
}

/// Arguments on one line, short, for a summary row.
fn preview(v: &Value) -> String {
    let v = as_json(v);
    let line = match &v {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{k}={}", text_of(v).replace('\n', " ")))
            .collect::<Vec<_>>()
            .join(" "),
        other => text_of(other).replace('\n', " "),
    };
    cut(&line, 90).replace("\n… (", " … (")
}

fn pre(label: &str, body: &str) -> String {
    format!(
        "<div class=\"lbl\">{}</div><pre>{}</pre>",
        esc(label),
        esc(&cut(body, MAX_SHOWN))
    )
}

/// A tool's output: multi-line text fields (file content, stdout, stderr) shown as text
/// under their own label, the rest of the object as JSON.
fn output(v: &Value) -> String {
    let Value::Object(map) = v else {
        return pre("output", &text_of(v));
    };
    let mut rest = serde_json::Map::new();
    let mut texts = String::new();
    for (k, v) in map {
        match v {
            Value::String(s) if s.contains('\n') => texts.push_str(&pre(k, s)),
            other => {
                rest.insert(k.clone(), other.clone());
            }
        }
    }
    let mut out = String::new();
    if !rest.is_empty() {
        out.push_str(&pre("output", &text_of(&Value::Object(rest))));
    }
    out.push_str(&texts);
    out
}

/// One `<li>` per transcript entry; lines that are not JSON are shown as they are.
pub fn render(jsonl: &str) -> String {
    let mut out = String::from("<ol class=\"transcript\">");
    for line in jsonl.lines().filter(|l| !l.trim().is_empty()) {
        let Ok(e) = serde_json::from_str::<Value>(line) else {
            let _ = write!(
                out,
                "<li class=\"t-raw\"><pre>{}</pre></li>",
                esc(&cut(line, MAX_SHOWN))
            );
            continue;
        };
        let step = e["step"]
            .as_u64()
            .map(|s| format!("step {s}"))
            .unwrap_or_default();
        match e["type"].as_str().unwrap_or_default() {
            "start" => {
                let _ = write!(
                    out,
                    "<li class=\"t-note\">Agent started with model <b>{}</b>; limits {}</li>",
                    esc(e["model"].as_str().unwrap_or("?")),
                    esc(&preview(&e["limits"]))
                );
            }
            "message" => {
                let role = e["role"].as_str().unwrap_or("message");
                let label = match role {
                    "system" => "System prompt",
                    "user" => "Task given to the agent",
                    other => other,
                };
                let _ = write!(
                    out,
                    "<li class=\"t-msg\"><details><summary>{}</summary><pre>{}</pre></details></li>",
                    esc(label),
                    esc(&cut(&text_of(&e["content"]), MAX_SHOWN))
                );
            }
            "model_response" => {
                let content = text_of(&e["content"]);
                let calls: Vec<String> = e["tool_calls"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|c| esc(c["name"].as_str().unwrap_or("?")))
                            .collect()
                    })
                    .unwrap_or_default();
                let tokens = e["usage"]["total_tokens"]
                    .as_u64()
                    .map(|t| format!(" · {} tokens", thousands(t)))
                    .unwrap_or_default();
                let latency = e["latency_ms"]
                    .as_u64()
                    .map(|t| format!(" · {}", duration_ms(t)))
                    .unwrap_or_default();
                let calls = if calls.is_empty() {
                    String::new()
                } else {
                    format!(" → {}", calls.join(", "))
                };
                let _ = write!(
                    out,
                    "<li class=\"t-model\"><div class=\"who\">model · {step}{tokens}{latency}{calls}</div>"
                );
                if !content.trim().is_empty() {
                    let _ = write!(
                        out,
                        "<p class=\"say\">{}</p>",
                        esc(&cut(&content, MAX_SHOWN))
                    );
                }
                out.push_str("</li>");
            }
            "tool_result" => {
                let ok = e["ok"].as_bool().unwrap_or(false);
                let _ = write!(
                    out,
                    "<li class=\"t-tool {cls}\"><details><summary><b>{tool}</b> <code>{args}</code> <span class=\"res\">{res}{dur}</span></summary>{a}{o}</details></li>",
                    cls = if ok { "ok" } else { "err" },
                    tool = esc(e["tool"].as_str().unwrap_or("?")),
                    args = esc(&preview(&e["arguments"])),
                    res = if ok { "ok" } else { "error" },
                    dur = e["duration_ms"]
                        .as_u64()
                        .map(|d| format!(" · {}", duration_ms(d)))
                        .unwrap_or_default(),
                    a = pre("arguments", &text_of(&as_json(&e["arguments"]))),
                    o = output(&e["output"]),
                );
            }
            "model_error" => {
                let _ = write!(
                    out,
                    "<li class=\"t-err\">{step}: the model endpoint failed (attempt {}): {}</li>",
                    e["attempt"].as_u64().unwrap_or(0),
                    esc(&cut(&text_of(&e["error"]), MAX_SHOWN))
                );
            }
            "end" => {
                let _ = write!(
                    out,
                    "<li class=\"t-note\">Run ended ({}) after {} steps: {}</li>",
                    esc(e["outcome"].as_str().unwrap_or("?")),
                    e["steps"].as_u64().unwrap_or(0),
                    esc(&cut(e["summary"].as_str().unwrap_or_default(), MAX_SHOWN))
                );
            }
            other => {
                let _ = write!(
                    out,
                    "<li class=\"t-msg\"><details><summary>{}</summary><pre>{}</pre></details></li>",
                    esc(other),
                    esc(&cut(&text_of(&e), MAX_SHOWN))
                );
            }
        }
    }
    out.push_str("</ol>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_calls_fold_and_everything_is_escaped() {
        let jsonl = [
            r#"{"type":"start","model":"m<b>","limits":{"max_steps":3}}"#,
            r#"{"type":"message","role":"user","content":"fix </pre><script>alert(1)</script>"}"#,
            r#"{"type":"model_response","step":1,"content":"I'll <i>look</i>","tool_calls":[{"name":"read_file_content"}],"usage":{"total_tokens":1200},"latency_ms":40}"#,
            r#"{"type":"tool_result","step":1,"tool":"read_file_content","arguments":{"file_path":"a\"<x>.py"},"ok":false,"output":{"error":"<svg onload=alert(1)>"},"duration_ms":3}"#,
            "not json <b>",
        ]
        .join("\n");
        let html = render(&jsonl);
        for bad in [
            "<script",
            "<svg",
            "m<b>",
            "json <b>",
            "<i>",
            "<x>",
            "</pre><script",
        ] {
            assert!(!html.contains(bad), "{bad} leaked: {html}");
        }
        assert!(
            html.contains("<li class=\"t-tool err\"><details><summary><b>read_file_content</b>")
        );
        assert!(html.contains("&lt;svg onload=alert(1)&gt;"));
        assert!(html.contains("1\u{202f}200 tokens"));
        assert!(html.contains("not json &lt;b&gt;"));
    }

    #[test]
    fn long_values_are_cut_on_a_char_boundary() {
        let s = "é".repeat(MAX_SHOWN);
        let c = cut(&s, MAX_SHOWN);
        assert!(c.ends_with("more bytes)"));
        assert!(c.len() < s.len());
    }
}
