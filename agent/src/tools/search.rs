//! The host side of `search_code` and `web_search_doc_and_reference`.
//!
//! The directory walk happens here, natively (the `ignore` crate: `.gitignore`d build
//! output skipped, symlinks not followed), because walking through WASI is the slow part
//! of a search; the guest then opens and matches every listed file through its workspace
//! capability. Doc search has two providers behind [`DocSearch`]: the repository's own
//! documentation ([`WorkspaceDocs`]) and an HTTP search endpoint ([`HttpDocs`]) reached
//! through the same egress policy as `call_api`.

use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ToolError;
use super::guest::GuestRunner;
use crate::wasm::egress::{Egress, MAX_RESPONSE_BODY};
use crate::wasm::{ApiRequest, DocHit};
use crate::workspace::Workspace;

pub const DEFAULT_MAX_RESULTS: usize = 50;
pub const MAX_RESULTS: usize = 500;
/// Files larger than this are not searched (generated or data files).
const MAX_FILE_BYTES: u64 = 2 * 1024 * 1024;
const DEFAULT_DOC_RESULTS: usize = 5;
const MAX_DOC_RESULTS: usize = 50;

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

/// Regular files of the workspace as relative paths, in a stable order.
pub fn candidate_files(ws: &Workspace) -> Vec<String> {
    ignore::WalkBuilder::new(ws.root())
        .hidden(false)
        .follow_links(false)
        .sort_by_file_path(|a, b| a.cmp(b))
        .filter_entry(|e| e.file_name() != ".git")
        .build()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_some_and(|t| t.is_file()))
        .filter(|e| e.metadata().is_ok_and(|m| m.len() <= MAX_FILE_BYTES))
        .map(|e| ws.relative(e.path()))
        .collect()
}

/// Documentation among the workspace's files: Markdown, reStructuredText, text, AsciiDoc,
/// READMEs and anything under `docs/` or `doc/`.
pub fn doc_files(ws: &Workspace) -> Vec<String> {
    candidate_files(ws)
        .into_iter()
        .filter(|rel| {
            let lower = rel.to_lowercase();
            [".md", ".rst", ".txt", ".adoc"]
                .iter()
                .any(|e| lower.ends_with(e))
                || lower.starts_with("docs/")
                || lower.starts_with("doc/")
                || lower.contains("readme")
        })
        .collect()
}

/// A source of documentation search results.
#[async_trait]
pub trait DocSearch: Send + Sync {
    /// Results as the tool returns them: `{query, provider, results: [{title, location,
    /// snippet}], truncated}`.
    async fn search(&self, query: &str, max_results: usize) -> Result<Value, ToolError>;
}

/// Offline: lines of the repository's own documentation, scored by query words.
pub struct WorkspaceDocs {
    pub guest: GuestRunner,
    pub ws: Workspace,
}

#[async_trait]
impl DocSearch for WorkspaceDocs {
    async fn search(&self, query: &str, max_results: usize) -> Result<Value, ToolError> {
        let words: Vec<String> = query
            .split_whitespace()
            .map(|w| w.to_lowercase())
            .filter(|w| w.len() > 1)
            .collect();
        if words.is_empty() {
            return Err(ToolError::new("query is empty"));
        }
        let limit = max_results.clamp(1, MAX_DOC_RESULTS);
        let ws = self.ws.clone();
        let files = tokio::task::spawn_blocking(move || doc_files(&ws))
            .await
            .map_err(|e| ToolError::new(format!("listing the documentation failed: {e}")))?;
        let hits: Vec<DocHit> = self
            .guest
            .run(Arc::new(Egress::none()), move |g, store| {
                g.call_search_docs(store, &words, limit as u32, &files)
            })
            .await?;
        let truncated = hits.len() > limit;
        let results: Vec<Value> = hits
            .into_iter()
            .take(limit)
            .map(|h| {
                json!({
                    "title": h.path,
                    "location": format!("{}:{}", h.path, h.line),
                    "snippet": h.snippet,
                })
            })
            .collect();
        Ok(json!({
            "query": query,
            "provider": "workspace-docs",
            "results": results,
            "truncated": truncated,
        }))
    }
}

/// Online: `GET <endpoint>?q=QUERY&n=MAX`, answered with
/// `{"results": [{"title", "url", "snippet"}]}`. The request goes out from the guest like
/// any `call_api` request, allowed to the endpoint's host only.
pub struct HttpDocs {
    pub guest: GuestRunner,
    pub endpoint: String,
    egress: Arc<Egress>,
}

impl HttpDocs {
    pub fn new(guest: GuestRunner, endpoint: &str) -> Result<Self, ToolError> {
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|_| ToolError::new(format!("doc_search_url `{endpoint}` is not a URL")))?;
        let authority = uri
            .authority()
            .ok_or_else(|| ToolError::new(format!("doc_search_url `{endpoint}` has no host")))?;
        Ok(Self {
            guest,
            endpoint: endpoint.to_string(),
            egress: Arc::new(Egress::only(authority.as_str())),
        })
    }
}

/// Percent-encodes a query parameter value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[derive(Deserialize)]
struct EndpointAnswer {
    #[serde(default)]
    results: Vec<EndpointHit>,
}

#[derive(Deserialize)]
struct EndpointHit {
    #[serde(default)]
    title: String,
    #[serde(default)]
    url: String,
    #[serde(default)]
    snippet: String,
}

#[async_trait]
impl DocSearch for HttpDocs {
    async fn search(&self, query: &str, max_results: usize) -> Result<Value, ToolError> {
        if query.trim().is_empty() {
            return Err(ToolError::new("query is empty"));
        }
        let limit = max_results.clamp(1, MAX_DOC_RESULTS);
        let sep = if self.endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        let url = format!("{}{sep}q={}&n={limit}", self.endpoint, encode(query));
        let request = ApiRequest {
            method: "GET".into(),
            url,
            headers: vec![("accept".into(), "application/json".into())],
            body: None,
            max_response_bytes: MAX_RESPONSE_BODY,
        };
        let response = self
            .guest
            .run(self.egress.clone(), move |g, store| {
                g.call_call_api(store, &request)
            })
            .await
            .map_err(|e| ToolError::new(format!("the documentation search failed: {e}")))?;
        if !(200..300).contains(&response.status) {
            return Err(ToolError::new(format!(
                "the documentation search answered HTTP {}",
                response.status
            )));
        }
        let answer: EndpointAnswer = serde_json::from_str(&response.body).map_err(|e| {
            ToolError::new(format!(
                "the documentation search answered no results list: {e}"
            ))
        })?;
        let truncated = answer.results.len() > limit;
        let results: Vec<Value> = answer
            .results
            .into_iter()
            .take(limit)
            .map(|h| json!({"title": h.title, "location": h.url, "snippet": h.snippet}))
            .collect();
        Ok(json!({
            "query": query,
            "provider": "http",
            "results": results,
            "truncated": truncated,
        }))
    }
}

/// The default number of doc results when the model gives none.
pub fn doc_limit(max_results: Option<usize>) -> usize {
    max_results.unwrap_or(DEFAULT_DOC_RESULTS)
}
