//! The tools implemented in-process, confined to the workspace by [`Workspace::resolve`].

use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

use super::search::{self, DocSearchArgs, SearchArgs};
use super::shell::{self, ShellArgs, ShellEnv};
use super::{
    CALL_API, EDIT_FILE_CONTENT, FINISH, READ_FILE_CONTENT, RUN_SHELL_COMMAND, SEARCH_CODE,
    ToolDispatch, ToolError, ToolOutput, WEB_SEARCH, parse_args,
};
use crate::truncate::{MAX_BYTES, MAX_LINES};
use crate::workspace::Workspace;

/// Largest file `read_file_content` and `edit_file_content` work on.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

pub struct NativeTools {
    ws: Workspace,
    shell_env: ShellEnv,
    deadline: Instant,
}

impl NativeTools {
    /// Tools over `ws`; shell commands never run past `deadline` (the run's wall budget).
    pub fn new(ws: Workspace, shell_env: ShellEnv, deadline: Instant) -> Self {
        Self {
            ws,
            shell_env,
            deadline,
        }
    }

    fn read_file(&self, args: ReadArgs) -> Result<Value, ToolError> {
        let path = self.ws.resolve(&args.file_path)?;
        let text = read_text_file(&path, &args.file_path)?;
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        let total = lines.len();
        let start = args.start_line.unwrap_or(1);
        if start == 0 {
            return Err(ToolError::new("start_line is 1-based"));
        }
        let end = args.end_line.unwrap_or(total).min(total);
        if total > 0 && start > total {
            return Err(ToolError::new(format!(
                "start_line {start} is past the end of `{}` ({total} lines)",
                args.file_path
            )));
        }
        if end < start && total > 0 {
            return Err(ToolError::new(format!(
                "end_line {end} is before start_line {start}"
            )));
        }
        let mut content = String::new();
        let mut last = start.saturating_sub(1);
        for line in lines.iter().take(end).skip(start.saturating_sub(1)) {
            if last + 1 - start >= MAX_LINES || content.len() + line.len() > MAX_BYTES {
                break;
            }
            content.push_str(line);
            last += 1;
        }
        let truncated = last < end;
        if truncated {
            content.push_str(&format!(
                "[... lines {}-{end} not shown; read them with start_line={} ...]\n",
                last + 1,
                last + 1
            ));
        }
        Ok(json!({
            "file_path": args.file_path,
            "start_line": start,
            "end_line": last,
            "total_lines": total,
            "content": content,
            "truncated": truncated,
        }))
    }

    fn edit_file(&self, args: EditArgs) -> Result<Value, ToolError> {
        let path = self.ws.resolve(&args.file_path)?;
        if args.old_text.is_empty() {
            if path.exists() {
                let empty = std::fs::metadata(&path)
                    .map(|m| m.len() == 0)
                    .unwrap_or(false);
                if !empty {
                    return Err(ToolError::new(format!(
                        "`{}` already exists; give old_text to change it",
                        args.file_path
                    )));
                }
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    ToolError::new(format!(
                        "cannot create directories for `{}`: {e}",
                        args.file_path
                    ))
                })?;
            }
            std::fs::write(&path, &args.new_text)
                .map_err(|e| ToolError::new(format!("cannot write `{}`: {e}", args.file_path)))?;
            return Ok(json!({
                "file_path": args.file_path,
                "created": true,
                "replaced": 0,
                "lines": args.new_text.lines().count(),
            }));
        }
        let text = read_text_file(&path, &args.file_path)?;
        let count = text.matches(&args.old_text).count();
        match count {
            0 => Err(ToolError::new(format!(
                "old_text was not found in `{}`; read the file and copy the exact text, including whitespace",
                args.file_path
            ))),
            1 => {
                let updated = text.replacen(&args.old_text, &args.new_text, 1);
                std::fs::write(&path, &updated).map_err(|e| {
                    ToolError::new(format!("cannot write `{}`: {e}", args.file_path))
                })?;
                let at = text
                    .find(&args.old_text)
                    .map(|i| text[..i].lines().count() + 1)
                    .unwrap_or(1);
                Ok(json!({
                    "file_path": args.file_path,
                    "created": false,
                    "replaced": 1,
                    "at_line": at,
                }))
            }
            n => Err(ToolError::new(format!(
                "old_text matches {n} places in `{}`; include more surrounding lines so it matches exactly once",
                args.file_path
            ))),
        }
    }
}

fn read_text_file(path: &std::path::Path, shown: &str) -> Result<String, ToolError> {
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ToolError::new(format!("`{shown}` does not exist")),
        _ => ToolError::new(format!("cannot read `{shown}`: {e}")),
    })?;
    if meta.is_dir() {
        return Err(ToolError::new(format!(
            "`{shown}` is a directory; list it with run_shell_command (ls)"
        )));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(ToolError::new(format!(
            "`{shown}` is {} bytes, more than the {MAX_FILE_BYTES} this tool reads; use run_shell_command (head, sed -n)",
            meta.len()
        )));
    }
    let bytes =
        std::fs::read(path).map_err(|e| ToolError::new(format!("cannot read `{shown}`: {e}")))?;
    if bytes.iter().take(8192).any(|&b| b == 0) {
        return Err(ToolError::new(format!("`{shown}` is a binary file")));
    }
    String::from_utf8(bytes).map_err(|_| ToolError::new(format!("`{shown}` is not UTF-8 text")))
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

#[async_trait]
impl ToolDispatch for NativeTools {
    async fn call(&self, name: &str, arguments: &str) -> ToolOutput {
        let result = match name {
            RUN_SHELL_COMMAND => match parse_args::<ShellArgs>(name, arguments) {
                Ok(a) => {
                    let budget = self.deadline.saturating_duration_since(Instant::now());
                    shell::run(
                        &self.ws,
                        &self.shell_env,
                        a,
                        budget.max(Duration::from_secs(1)),
                    )
                    .await
                }
                Err(e) => Err(e),
            },
            READ_FILE_CONTENT => parse_args(name, arguments).and_then(|a| self.read_file(a)),
            EDIT_FILE_CONTENT => parse_args(name, arguments).and_then(|a| self.edit_file(a)),
            SEARCH_CODE => parse_args::<SearchArgs>(name, arguments)
                .and_then(|a| search::search_code(&self.ws, a)),
            WEB_SEARCH => parse_args::<DocSearchArgs>(name, arguments)
                .and_then(|a| search::search_docs(&self.ws, a)),
            CALL_API => Err(ToolError::new(
                "call_api: no API hosts are allowed by this task's policy",
            )),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn tools() -> (tempfile::TempDir, NativeTools) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.py"), "x = 1\ny = 1\n").unwrap();
        let ws = Workspace::new(dir.path()).unwrap();
        let env = ShellEnv::minimal(dir.path());
        let t = NativeTools::new(ws, env, Instant::now() + Duration::from_secs(60));
        (dir, t)
    }

    #[tokio::test]
    async fn edit_refuses_missing_and_ambiguous_matches() {
        let (dir, t) = tools();
        let out = t
            .call(
                EDIT_FILE_CONTENT,
                r#"{"file_path":"a.py","old_text":"= 1","new_text":"= 2"}"#,
            )
            .await;
        assert!(!out.ok);
        assert!(
            out.value["error"]
                .as_str()
                .unwrap()
                .contains("matches 2 places")
        );
        let out = t
            .call(
                EDIT_FILE_CONTENT,
                r#"{"file_path":"a.py","old_text":"z","new_text":"w"}"#,
            )
            .await;
        assert!(out.value["error"].as_str().unwrap().contains("not found"));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a.py")).unwrap(),
            "x = 1\ny = 1\n"
        );
        let out = t
            .call(
                EDIT_FILE_CONTENT,
                r#"{"file_path":"a.py","old_text":"y = 1","new_text":"y = 2"}"#,
            )
            .await;
        assert!(out.ok, "{:?}", out);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("a.py")).unwrap(),
            "x = 1\ny = 2\n"
        );
        let out = t
            .call(
                EDIT_FILE_CONTENT,
                r#"{"file_path":"new/b.py","old_text":"","new_text":"b\n"}"#,
            )
            .await;
        assert_eq!(out.value["created"], true);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("new/b.py")).unwrap(),
            "b\n"
        );
    }

    #[tokio::test]
    async fn read_ranges_and_refusals() {
        let (_dir, t) = tools();
        let out = t
            .call(READ_FILE_CONTENT, r#"{"file_path":"a.py","start_line":2}"#)
            .await;
        assert_eq!(out.value["content"], "y = 1\n");
        assert_eq!(out.value["total_lines"], 2);
        let out = t
            .call(READ_FILE_CONTENT, r#"{"file_path":"/etc/passwd"}"#)
            .await;
        assert!(
            out.value["error"]
                .as_str()
                .unwrap()
                .contains("absolute path")
        );
        let out = t.call(READ_FILE_CONTENT, r#"{"path":"a.py"}"#).await;
        assert!(
            out.value["error"]
                .as_str()
                .unwrap()
                .contains("invalid arguments for read_file_content")
        );
    }

    #[tokio::test]
    async fn shell_reports_exit_and_hides_secrets() {
        let (_dir, t) = tools();
        let out = t
            .call(
                RUN_SHELL_COMMAND,
                r#"{"command_string":"echo hi; echo oops >&2; exit 3"}"#,
            )
            .await;
        assert_eq!(out.value["exit_code"], 3);
        assert_eq!(out.value["stdout"], "hi\n");
        assert_eq!(out.value["stderr"], "oops\n");
        let out = t
            .call(RUN_SHELL_COMMAND, r#"{"command_string":"env"}"#)
            .await;
        // Only the minimal environment reaches commands: none of this process's variables
        // (cargo sets CARGO_* for every test process), so no key or token can leak.
        assert!(std::env::vars().any(|(k, _)| k.starts_with("CARGO")));
        let allowed = [
            "PATH",
            "HOME",
            "TMPDIR",
            "LANG",
            "TERM",
            "PAGER",
            "GIT_PAGER",
            "PYTHONDONTWRITEBYTECODE",
            "CI",
            "PWD",
            "SHLVL",
            "_",
            "OLDPWD",
        ];
        for line in out.value["stdout"].as_str().unwrap().lines() {
            let key = line.split('=').next().unwrap_or_default();
            assert!(
                allowed.contains(&key),
                "`{key}` leaked into the shell environment"
            );
        }
        let out = t
            .call(
                RUN_SHELL_COMMAND,
                r#"{"command_string":"sleep 30","timeout_seconds":1}"#,
            )
            .await;
        assert!(!out.ok);
        assert_eq!(out.value["timed_out"], true);
    }
}
