//! `search_code` (regex over the repository's text files) and the offline provider of
//! `web_search_doc_and_reference` (the repository's own documentation). Both walk with the
//! `ignore` crate, so `.gitignore`d build output is skipped, and both are bounded.

use std::path::Path;

use globset::Glob;
use regex::RegexBuilder;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ToolError;
use crate::workspace::Workspace;

const DEFAULT_MAX_RESULTS: usize = 50;
const MAX_RESULTS: usize = 500;
/// Files larger than this are not searched (generated or data files).
const MAX_FILE_BYTES: u64 = 2 * 1024 * 1024;
/// A matching line is cut to this many characters.
const MAX_LINE_CHARS: usize = 300;

#[derive(Debug, Deserialize)]
pub struct SearchArgs {
    pub pattern: String,
    #[serde(default)]
    pub path_glob: Option<String>,
    #[serde(default)]
    pub max_results: Option<usize>,
}

#[derive(Debug, Deserialize)]
pub struct DocSearchArgs {
    pub query: String,
    #[serde(default)]
    pub max_results: Option<usize>,
}

/// Text files of the workspace, relative path first, in a stable order.
fn text_files(ws: &Workspace) -> impl Iterator<Item = (String, std::path::PathBuf)> + '_ {
    ignore::WalkBuilder::new(ws.root())
        .hidden(false)
        .follow_links(false)
        .sort_by_file_path(|a, b| a.cmp(b))
        .filter_entry(|e| e.file_name() != ".git")
        .build()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_some_and(|t| t.is_file()))
        .filter(|e| e.metadata().is_ok_and(|m| m.len() <= MAX_FILE_BYTES))
        .map(move |e| (ws.relative(e.path()), e.into_path()))
}

fn read_text(path: &Path) -> Option<String> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.iter().take(8192).any(|&b| b == 0) {
        return None;
    }
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

fn clip(line: &str) -> String {
    if line.chars().count() <= MAX_LINE_CHARS {
        line.to_string()
    } else {
        let mut s: String = line.chars().take(MAX_LINE_CHARS).collect();
        s.push_str(" [...]");
        s
    }
}

pub fn search_code(ws: &Workspace, args: SearchArgs) -> Result<Value, ToolError> {
    if args.pattern.is_empty() {
        return Err(ToolError::new("pattern is empty"));
    }
    let re = RegexBuilder::new(&args.pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| ToolError::new(format!("invalid regex `{}`: {e}", args.pattern)))?;
    let glob = match &args.path_glob {
        Some(g) if !g.trim().is_empty() => Some(
            Glob::new(g)
                .map_err(|e| ToolError::new(format!("invalid path_glob `{g}`: {e}")))?
                .compile_matcher(),
        ),
        _ => None,
    };
    let limit = args
        .max_results
        .unwrap_or(DEFAULT_MAX_RESULTS)
        .clamp(1, MAX_RESULTS);
    let mut matches = Vec::new();
    let mut files_searched = 0u64;
    let mut truncated = false;
    'files: for (rel, path) in text_files(ws) {
        if let Some(g) = &glob
            && !g.is_match(&rel)
        {
            continue;
        }
        let Some(text) = read_text(&path) else {
            continue;
        };
        files_searched += 1;
        for (i, line) in text.lines().enumerate() {
            if re.is_match(line) {
                if matches.len() == limit {
                    truncated = true;
                    break 'files;
                }
                matches.push(json!({"file_path": rel, "line": i + 1, "text": clip(line)}));
            }
        }
    }
    Ok(json!({
        "pattern": args.pattern,
        "matches": matches,
        "files_searched": files_searched,
        "truncated": truncated,
    }))
}

/// Searches documentation inside the workspace: Markdown, reStructuredText, text files and
/// anything under `docs/` or `doc/`. Lines are scored by how many query words they hold.
pub fn search_docs(ws: &Workspace, args: DocSearchArgs) -> Result<Value, ToolError> {
    let words: Vec<String> = args
        .query
        .split_whitespace()
        .map(|w| w.to_lowercase())
        .filter(|w| w.len() > 1)
        .collect();
    if words.is_empty() {
        return Err(ToolError::new("query is empty"));
    }
    let limit = args.max_results.unwrap_or(5).clamp(1, 50);
    let mut hits: Vec<(usize, String, usize, String)> = Vec::new();
    for (rel, path) in text_files(ws) {
        let lower = rel.to_lowercase();
        let is_doc = [".md", ".rst", ".txt", ".adoc"]
            .iter()
            .any(|e| lower.ends_with(e))
            || lower.starts_with("docs/")
            || lower.starts_with("doc/")
            || lower.contains("readme");
        if !is_doc {
            continue;
        }
        let Some(text) = read_text(&path) else {
            continue;
        };
        for (i, line) in text.lines().enumerate() {
            let l = line.to_lowercase();
            let score = words.iter().filter(|w| l.contains(w.as_str())).count();
            if score > 0 {
                hits.push((score, rel.clone(), i + 1, clip(line.trim())));
            }
        }
    }
    hits.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let truncated = hits.len() > limit;
    let results: Vec<Value> = hits
        .into_iter()
        .take(limit)
        .map(|(_, file, line, snippet)| json!({"title": file, "location": format!("{file}:{line}"), "snippet": snippet}))
        .collect();
    Ok(json!({
        "query": args.query,
        "provider": "workspace-docs",
        "results": results,
        "truncated": truncated,
    }))
}
