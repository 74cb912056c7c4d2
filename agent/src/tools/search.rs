//! The host side of `search_code` and `web_search_doc_and_reference`.
//!
//! The directory walk and the reads happen here, natively, because going through WASI
//! file by file is what makes a search slow (seven times native when the guest opened
//! every file itself). The walk is the `ignore` crate's (`.gitignore`d build output
//! skipped, symlinks not followed); every read goes through a [`WorkspaceReader`], a
//! `cap-std` handle on the workspace that cannot open anything outside it, whatever a path
//! or a symlink on its way says: the capability check WASI itself applies. The guest gets
//! the contents in batches and does all the work with the untrusted pattern.
//!
//! Doc search has two providers behind [`DocSearch`]: the repository's own documentation
//! ([`WorkspaceDocs`]) and an HTTP search endpoint ([`HttpDocs`]) reached through the same
//! egress policy as `call_api`.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

use super::ToolError;
use super::guest::GuestRunner;
use crate::wasm::egress::{Egress, MAX_RESPONSE_BODY};
use crate::wasm::exports::patchflow::tools::tools::Guest;
use crate::wasm::{ApiRequest, DocHit, GuestState, SearchResult, SourceFile};
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

/// Regular files of the workspace as relative paths, in a stable order. The walk takes
/// file types from the directory entries and stats nothing; [`WorkspaceReader::read`]
/// skips files over the size bound when it opens them.
pub fn candidate_files(ws: &Workspace) -> Vec<String> {
    ignore::WalkBuilder::new(ws.root())
        .hidden(false)
        .follow_links(false)
        .sort_by_file_path(|a, b| a.cmp(b))
        .filter_entry(|e| e.file_name() != ".git")
        .build()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_some_and(|t| t.is_file()))
        .map(|e| ws.relative(e.path()))
        .collect()
}

/// Reads workspace files through a capability: `cap-std` resolves every path beneath
/// the workspace directory (`openat2` with `RESOLVE_BENEATH` where the kernel has it) and
/// refuses absolute paths, `..` and symlinks that lead out.
pub struct WorkspaceReader {
    dir: cap_std::fs::Dir,
}

impl WorkspaceReader {
    pub fn open(root: &Path) -> std::io::Result<Self> {
        let dir = cap_std::fs::Dir::open_ambient_dir(root, cap_std::ambient_authority())?;
        Ok(Self { dir })
    }

    /// A regular file's bytes; `None` for anything unreadable, not a file, larger than
    /// the search bound or outside the workspace.
    pub fn read(&self, rel: &str) -> Option<Vec<u8>> {
        let mut file = self.dir.open(rel).ok()?;
        let meta = file.metadata().ok()?;
        if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
            return None;
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes).ok()?;
        Some(bytes)
    }
}

/// Hands `files` of `ws` to the guest in order, read through a [`WorkspaceReader`] in
/// batches of about `batch_bytes`, until `each` returns `false`. The first batch is
/// handed over even when empty, so the guest always gets to check its arguments.
fn in_batches(
    ws: &Workspace,
    files: &[String],
    batch_bytes: usize,
    mut each: impl FnMut(&[SourceFile]) -> wasmtime::Result<Result<bool, String>>,
) -> wasmtime::Result<Result<(), String>> {
    let reader = match WorkspaceReader::open(ws.root()) {
        Ok(r) => r,
        Err(e) => return Ok(Err(format!("cannot open the workspace: {e}"))),
    };
    let mut batch: Vec<SourceFile> = Vec::new();
    let mut bytes = 0usize;
    let mut sent_any = false;
    for rel in files {
        let Some(content) = reader.read(rel) else {
            continue;
        };
        bytes += content.len() + rel.len();
        batch.push(SourceFile {
            path: rel.clone(),
            content,
        });
        if bytes >= batch_bytes {
            sent_any = true;
            match each(&batch)? {
                Ok(true) => {}
                Ok(false) => return Ok(Ok(())),
                Err(e) => return Ok(Err(e)),
            }
            batch.clear();
            bytes = 0;
        }
    }
    if (!batch.is_empty() || !sent_any)
        && let Err(e) = each(&batch)?
    {
        return Ok(Err(e));
    }
    Ok(Ok(()))
}

/// How many bytes of file contents go to the guest in one call: an eighth of its
/// memory limit, at most 4 MiB.
pub fn batch_bytes(memory_limit: usize) -> usize {
    (memory_limit / 8).clamp(64 << 10, 4 << 20)
}

/// A compiled `path_glob`, or the error the model reads.
pub fn path_glob(glob: Option<&str>) -> Result<Option<globset::GlobMatcher>, ToolError> {
    match glob {
        Some(g) if !g.trim().is_empty() => globset::Glob::new(g)
            .map(|g| Some(g.compile_matcher()))
            .map_err(|e| ToolError::new(format!("invalid path_glob `{g}`: {e}"))),
        _ => Ok(None),
    }
}

/// `search_code` on one guest instance: walk the workspace, keep the paths `glob`
/// matches, read them through the capability and let the guest match `pattern`, batch
/// by batch, until `limit` hits (and one more, to say the list was cut).
pub fn search_code_in(
    guest: &Guest,
    store: &mut wasmtime::Store<GuestState>,
    ws: &Workspace,
    pattern: &str,
    glob: Option<&globset::GlobMatcher>,
    limit: usize,
) -> wasmtime::Result<Result<SearchResult, String>> {
    let mut files = candidate_files(ws);
    if let Some(g) = glob {
        files.retain(|rel| g.is_match(rel));
    }
    let batch = batch_bytes(store.data().memory_limit());
    let mut total = SearchResult {
        hits: Vec::new(),
        files_searched: 0,
        truncated: false,
    };
    let done = in_batches(ws, &files, batch, |files| {
        let left = limit.saturating_sub(total.hits.len()) as u32;
        Ok(guest
            .call_search_code(&mut *store, pattern, left, files)?
            .map(|r| {
                total.hits.extend(r.hits);
                total.files_searched += r.files_searched;
                total.truncated = r.truncated;
                !r.truncated
            }))
    })?;
    Ok(done.map(|()| total))
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
        let hits: Vec<DocHit> = self
            .guest
            .run(Arc::new(Egress::none()), move |g, store| {
                let batch = batch_bytes(store.data().memory_limit());
                let mut hits: Vec<DocHit> = Vec::new();
                let done = in_batches(&ws, &doc_files(&ws), batch, |files| {
                    Ok(
                        g.call_search_docs(&mut *store, &words, limit as u32, files)?
                            .map(|more| {
                                hits.extend(more);
                                // Each batch answers its best; the best of all is among them.
                                hits.sort_by(|a, b| {
                                    b.score
                                        .cmp(&a.score)
                                        .then(a.path.cmp(&b.path))
                                        .then(a.line.cmp(&b.line))
                                });
                                hits.truncate(limit + 1);
                                true
                            }),
                    )
                })?;
                Ok(done.map(|()| hits))
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
