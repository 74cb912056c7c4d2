//! [`SandboxedTools`]: the tools as the agent runs them. Files, search and HTTP go to the
//! WebAssembly guest (one fresh instance per call, the workspace its only directory);
//! shell commands go through the OS sandbox. The JSON each tool answers is the same the
//! spine's native tools answered, field for field and with the same truncation markers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::guest::GuestRunner;
use super::search::{self, DocSearch, DocSearchArgs, SearchArgs};
use super::shell::{self, ShellArgs, ShellEnv};
use super::{
    CALL_API, EDIT_FILE_CONTENT, FINISH, READ_FILE_CONTENT, RUN_SHELL_COMMAND, SEARCH_CODE,
    ToolDispatch, ToolError, ToolOutput, WEB_SEARCH, parse_args,
};
use crate::sandbox::ShellSandbox;
use crate::truncate::{MAX_BYTES, MAX_LINES, head_tail};
use crate::wasm::ApiRequest;
use crate::wasm::egress::{Egress, MAX_RESPONSE_BODY};
use crate::workspace::Workspace;

/// Entries of a directory named in a read error.
const LISTED_ENTRIES: u32 = 50;

pub struct SandboxedTools {
    ws: Workspace,
    guest: GuestRunner,
    shell_env: ShellEnv,
    sandbox: ShellSandbox,
    egress: Arc<Egress>,
    docs: Arc<dyn DocSearch>,
    deadline: Instant,
}

impl SandboxedTools {
    /// Tools over `ws`. `egress` is the task's `call_api` policy; shell commands never run
    /// past `deadline` (the run's wall budget).
    pub fn new(
        ws: Workspace,
        guest: GuestRunner,
        shell_env: ShellEnv,
        sandbox: ShellSandbox,
        egress: Egress,
        docs: Arc<dyn DocSearch>,
        deadline: Instant,
    ) -> Self {
        Self {
            ws,
            guest,
            shell_env,
            sandbox,
            egress: Arc::new(egress),
            docs,
            deadline,
        }
    }

    /// The shell sandbox the commands run in.
    pub fn sandbox(&self) -> &ShellSandbox {
        &self.sandbox
    }

    async fn read_file(&self, args: ReadArgs) -> Result<Value, ToolError> {
        let (start, end) = (to_u32(args.start_line), to_u32(args.end_line));
        let rel = args.file_path.clone();
        let r = self
            .guest
            .run(Arc::new(Egress::none()), move |g, store| {
                match g.call_read_file(&mut *store, &rel, start, end)? {
                    Err(e) if e.contains("is a directory") => {
                        // Saves the model a round trip: say what is in it.
                        let listing = g.call_list_dir(&mut *store, &rel, LISTED_ENTRIES)?;
                        Ok(Err(match listing {
                            Ok(l) => {
                                let names: Vec<String> = l
                                    .entries
                                    .iter()
                                    .map(|e| match e.kind {
                                        crate::wasm::EntryKind::Directory => format!("{}/", e.name),
                                        _ => e.name.clone(),
                                    })
                                    .collect();
                                format!(
                                    "`{rel}` is a directory; it holds: {}{}. Read one of its files",
                                    names.join(", "),
                                    if l.truncated { ", ..." } else { "" }
                                )
                            }
                            Err(_) => e,
                        }))
                    }
                    other => Ok(other),
                }
            })
            .await?;
        Ok(json!({
            "file_path": args.file_path,
            "start_line": r.start_line,
            "end_line": r.end_line,
            "total_lines": r.total_lines,
            "content": r.content,
            "truncated": r.truncated,
        }))
    }

    async fn edit_file(&self, args: EditArgs) -> Result<Value, ToolError> {
        if args.old_text.is_empty() && is_unified_diff(&args.new_text) {
            return self.apply_diff(args).await;
        }
        let (rel, old, new) = (
            args.file_path.clone(),
            args.old_text.clone(),
            args.new_text.clone(),
        );
        let r = self
            .guest
            .run(Arc::new(Egress::none()), move |g, store| {
                g.call_edit_file(store, &rel, &old, &new)
            })
            .await?;
        Ok(if r.created {
            json!({
                "file_path": args.file_path,
                "created": true,
                "replaced": 0,
                "lines": r.lines,
            })
        } else {
            json!({
                "file_path": args.file_path,
                "created": false,
                "replaced": r.replaced,
                "at_line": r.at_line,
            })
        })
    }

    /// `edit_file_content` with an empty `old_text` and a unified diff of `file_path` as
    /// `new_text`: the diff is applied (all hunks or none).
    async fn apply_diff(&self, args: EditArgs) -> Result<Value, ToolError> {
        let targets: Vec<&str> = args
            .new_text
            .lines()
            .filter_map(|l| l.strip_prefix("+++ "))
            .map(|p| {
                let p = p.split('\t').next().unwrap_or("").trim();
                p.strip_prefix("b/").unwrap_or(p)
            })
            .collect();
        if targets.iter().any(|t| *t != args.file_path.trim()) {
            return Err(ToolError::new(format!(
                "the diff in new_text changes other files than `{}`; give one file's diff at a time",
                args.file_path
            )));
        }
        let diff = args.new_text.clone();
        let patched = self
            .guest
            .run(Arc::new(Egress::none()), move |g, store| {
                g.call_apply_diff(store, &diff)
            })
            .await?;
        let hunks: u32 = patched.iter().map(|p| p.hunks).sum();
        Ok(json!({
            "file_path": args.file_path,
            "created": patched.iter().any(|p| p.created),
            "replaced": hunks,
            "applied_diff": true,
        }))
    }

    async fn search_code(&self, args: SearchArgs) -> Result<Value, ToolError> {
        if args.pattern.is_empty() {
            return Err(ToolError::new("pattern is empty"));
        }
        let limit = args
            .max_results
            .unwrap_or(search::DEFAULT_MAX_RESULTS)
            .clamp(1, search::MAX_RESULTS);
        let glob = search::path_glob(args.path_glob.as_deref())?;
        let (ws, pattern) = (self.ws.clone(), args.pattern.clone());
        let r = self
            .guest
            .run(Arc::new(Egress::none()), move |g, store| {
                search::search_code_in(g, store, &ws, &pattern, glob.as_ref(), limit)
            })
            .await?;
        let matches: Vec<Value> = r
            .hits
            .into_iter()
            .map(|h| json!({"file_path": h.path, "line": h.line, "text": h.text}))
            .collect();
        Ok(json!({
            "pattern": args.pattern,
            "matches": matches,
            "files_searched": r.files_searched,
            "truncated": r.truncated,
        }))
    }

    async fn call_api(&self, args: ApiArgs) -> Result<Value, ToolError> {
        let headers: Vec<(String, String)> = args
            .headers
            .into_iter()
            .filter(|(k, _)| !self.egress.is_secret_header(k))
            .map(|(k, v)| match v {
                Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect();
        self.egress
            .check(&args.method, &args.url, &headers, args.body.as_deref())?;
        let request = ApiRequest {
            method: args.method.to_ascii_uppercase(),
            url: args.url.clone(),
            headers,
            body: args.body,
            max_response_bytes: MAX_RESPONSE_BODY,
        };
        let egress = self.egress.clone();
        let r = self
            .guest
            .run(egress.clone(), move |g, store| {
                g.call_call_api(store, &request)
            })
            .await
            .map_err(|e| ToolError::new(egress.redact(&format!("call_api: {e}"))))?;
        let mut headers = Map::new();
        for (k, v) in r.headers {
            headers.insert(k, Value::String(egress.redact(&v)));
        }
        let (body, cut) = head_tail(&egress.redact(&r.body), MAX_BYTES, MAX_LINES);
        Ok(json!({
            "status": r.status,
            "headers": headers,
            "body": body,
            "truncated": r.truncated || cut,
        }))
    }
}

fn to_u32(v: Option<usize>) -> Option<u32> {
    v.map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// Whether `text` is a unified diff (file headers and at least one hunk).
fn is_unified_diff(text: &str) -> bool {
    let t = text.trim_start();
    (t.starts_with("--- ") || t.starts_with("diff "))
        && text.contains("\n+++ ")
        && text.contains("\n@@ ")
}

#[derive(Debug, Deserialize)]
struct ReadArgs {
    file_path: String,
    #[serde(default)]
    start_line: Option<usize>,
    #[serde(default)]
    end_line: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct EditArgs {
    file_path: String,
    old_text: String,
    new_text: String,
}

#[derive(Debug, Deserialize)]
struct ApiArgs {
    method: String,
    url: String,
    #[serde(default)]
    headers: Map<String, Value>,
    #[serde(default)]
    body: Option<String>,
}

#[async_trait]
impl ToolDispatch for SandboxedTools {
    fn sandbox_report(&self) -> Option<patchflow_core::SandboxReport> {
        self.sandbox.decided().map(|w| w.report.clone())
    }

    async fn call(&self, name: &str, arguments: &str) -> ToolOutput {
        let result = match name {
            RUN_SHELL_COMMAND => match parse_args::<ShellArgs>(name, arguments) {
                Ok(a) => {
                    let budget = self.deadline.saturating_duration_since(Instant::now());
                    shell::run(
                        &self.ws,
                        &self.shell_env,
                        &self.sandbox,
                        a,
                        budget.max(Duration::from_secs(1)),
                    )
                    .await
                }
                Err(e) => Err(e),
            },
            READ_FILE_CONTENT => match parse_args(name, arguments) {
                Ok(a) => self.read_file(a).await,
                Err(e) => Err(e),
            },
            EDIT_FILE_CONTENT => match parse_args(name, arguments) {
                Ok(a) => self.edit_file(a).await,
                Err(e) => Err(e),
            },
            SEARCH_CODE => match parse_args(name, arguments) {
                Ok(a) => self.search_code(a).await,
                Err(e) => Err(e),
            },
            WEB_SEARCH => match parse_args::<DocSearchArgs>(name, arguments) {
                Ok(a) => {
                    self.docs
                        .search(&a.query, search::doc_limit(a.max_results))
                        .await
                }
                Err(e) => Err(e),
            },
            CALL_API => match parse_args(name, arguments) {
                Ok(a) => self.call_api(a).await,
                Err(e) => Err(e),
            },
            FINISH => Ok(json!({"ok": true})),
            other => Err(ToolError::new(format!(
                "unknown tool `{other}`; the tools are run_shell_command, read_file_content, edit_file_content, search_code, web_search_doc_and_reference, call_api, finish"
            ))),
        };
        // A shell result carries its own error field when it timed out; it is still a
        // result the model should read, but it did not succeed.
        match result {
            Ok(v) if v.get("error").is_some() => ToolOutput {
                ok: false,
                value: v,
            },
            r => r.into(),
        }
    }
}
