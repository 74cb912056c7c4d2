//! The agent's tools: their OpenAI function schemas (names and parameters fixed by
//! ARCHITECTURE.md) and the [`ToolDispatch`] trait the loop calls them through. The
//! implementation is [`SandboxedTools`]: files, search and HTTP in a WebAssembly guest,
//! shell commands in the OS sandbox.
//!
//! Every tool answers JSON. A failure is a result too (`{"error": "..."}`), returned to the
//! model so it can correct itself; only the loop decides when a run ends.

mod guest;
mod sandboxed;
pub mod search;
pub(crate) mod shell;

use async_trait::async_trait;
use serde_json::{Value, json};

pub use guest::{GuestRunner, HostHandle};
pub use sandboxed::SandboxedTools;
pub use search::{DocSearch, HttpDocs, WorkspaceDocs};
pub use shell::ShellEnv;

/// A tool failure, shown to the model as `{"error": message}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ToolError(pub String);

impl ToolError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// One tool's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutput {
    pub ok: bool,
    pub value: Value,
}

impl ToolOutput {
    pub fn ok(value: Value) -> Self {
        Self { ok: true, value }
    }

    pub fn error(e: impl std::fmt::Display) -> Self {
        Self {
            ok: false,
            value: json!({ "error": e.to_string() }),
        }
    }

    /// The text sent back to the model.
    pub fn to_model_text(&self) -> String {
        self.value.to_string()
    }
}

impl From<Result<Value, ToolError>> for ToolOutput {
    fn from(r: Result<Value, ToolError>) -> Self {
        match r {
            Ok(v) => Self::ok(v),
            Err(e) => Self::error(e),
        }
    }
}

/// Where the loop sends tool calls.
#[async_trait]
pub trait ToolDispatch: Send + Sync {
    /// Runs tool `name` with the model's JSON `arguments`.
    async fn call(&self, name: &str, arguments: &str) -> ToolOutput;

    /// The walls shell commands ran under, once the sandbox probe has decided them.
    fn sandbox_report(&self) -> Option<patchflow_core::SandboxReport> {
        None
    }
}

pub const RUN_SHELL_COMMAND: &str = "run_shell_command";
pub const READ_FILE_CONTENT: &str = "read_file_content";
pub const EDIT_FILE_CONTENT: &str = "edit_file_content";
pub const SEARCH_CODE: &str = "search_code";
pub const WEB_SEARCH: &str = "web_search_doc_and_reference";
pub const CALL_API: &str = "call_api";
pub const FINISH: &str = "finish";

/// The function schemas sent with every model request, as `(name, description, parameters)`.
pub fn schemas() -> Vec<(&'static str, &'static str, Value)> {
    vec![
        (
            RUN_SHELL_COMMAND,
            "Run a shell command in the repository (bash -c). Returns exit code, stdout and stderr, each cut to about 10 KiB / 256 lines keeping head and tail.",
            json!({
                "type": "object",
                "properties": {
                    "command_string": {"type": "string", "description": "The command line to run."},
                    "target_directory": {"type": "string", "description": "Working directory relative to the repository root.", "default": "."},
                    "timeout_seconds": {"type": "integer", "description": "Kill the command after this many seconds (default 60, at most 600).", "minimum": 1}
                },
                "required": ["command_string"],
                "additionalProperties": false
            }),
        ),
        (
            READ_FILE_CONTENT,
            "Read a text file of the repository, optionally lines start_line..end_line (1-based, inclusive).",
            json!({
                "type": "object",
                "properties": {
                    "file_path": {"type": "string", "description": "Path relative to the repository root."},
                    "start_line": {"type": "integer", "minimum": 1},
                    "end_line": {"type": "integer", "minimum": 1}
                },
                "required": ["file_path"],
                "additionalProperties": false
            }),
        ),
        (
            EDIT_FILE_CONTENT,
            "Replace old_text with new_text in a file. old_text must match exactly once. An empty old_text creates a new file with new_text as its content. To change many places of one existing file at once, give an empty old_text and that file's unified diff as new_text.",
            json!({
                "type": "object",
                "properties": {
                    "file_path": {"type": "string", "description": "Path relative to the repository root."},
                    "old_text": {"type": "string", "description": "Exact text to replace; empty to create the file."},
                    "new_text": {"type": "string", "description": "Replacement text."}
                },
                "required": ["file_path", "old_text", "new_text"],
                "additionalProperties": false
            }),
        ),
        (
            SEARCH_CODE,
            "Search the repository's files for a regular expression. Returns matching lines with file and line number.",
            json!({
                "type": "object",
                "properties": {
                    "pattern": {"type": "string", "description": "Regular expression (Rust regex syntax)."},
                    "path_glob": {"type": "string", "description": "Only files whose path matches this glob, e.g. `**/*.py`."},
                    "max_results": {"type": "integer", "minimum": 1, "description": "At most this many matches (default 50, at most 500)."}
                },
                "required": ["pattern"],
                "additionalProperties": false
            }),
        ),
        (
            WEB_SEARCH,
            "Search documentation and references for a query. Returns titles, locations and snippets.",
            json!({
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "max_results": {"type": "integer", "minimum": 1}
                },
                "required": ["query"],
                "additionalProperties": false
            }),
        ),
        (
            CALL_API,
            "Make an HTTP request to an API the task's policy allows.",
            json!({
                "type": "object",
                "properties": {
                    "method": {"type": "string", "enum": ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"]},
                    "url": {"type": "string"},
                    "headers": {"type": "object", "additionalProperties": {"type": "string"}},
                    "body": {"type": "string"}
                },
                "required": ["method", "url"],
                "additionalProperties": false
            }),
        ),
        (
            FINISH,
            "Call when the task is done, with a short summary of what you changed and how you checked it.",
            json!({
                "type": "object",
                "properties": {
                    "summary": {"type": "string"}
                },
                "required": ["summary"],
                "additionalProperties": false
            }),
        ),
    ]
}

/// Parses a tool's JSON arguments into its parameter struct, with an error the model can read.
pub fn parse_args<T: serde::de::DeserializeOwned>(
    tool: &str,
    arguments: &str,
) -> Result<T, ToolError> {
    let text = if arguments.trim().is_empty() {
        "{}"
    } else {
        arguments
    };
    serde_json::from_str(text)
        .map_err(|e| ToolError::new(format!("invalid arguments for {tool}: {e}")))
}
