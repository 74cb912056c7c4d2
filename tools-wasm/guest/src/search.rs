//! `search-code` and `search-docs` over files the host listed. The host walks the tree
//! (fast, natively, without following symlinks); this side opens every file through the
//! workspace capability, so a listed path can never read anything outside.

use globset::Glob;
use regex::RegexBuilder;

use crate::exports::patchflow::tools::tools::{DocHit, Hit, SearchResult};

/// Files larger than this are not searched (generated or data files).
const MAX_FILE_BYTES: u64 = 2 * 1024 * 1024;
/// A matching line is cut to this many characters.
const MAX_LINE_CHARS: usize = 300;

fn read_text(rel: &str) -> Option<String> {
    let path = crate::files::resolve(rel).ok()?;
    let meta = std::fs::metadata(&path).ok()?;
    if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
        return None;
    }
    let bytes = std::fs::read(&path).ok()?;
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

pub fn search_code(
    pattern: &str,
    path_glob: Option<&str>,
    max_hits: u32,
    files: &[String],
) -> Result<SearchResult, String> {
    if pattern.is_empty() {
        return Err("pattern is empty".into());
    }
    let re = RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("invalid regex `{pattern}`: {e}"))?;
    let glob = match path_glob {
        Some(g) if !g.trim().is_empty() => Some(
            Glob::new(g)
                .map_err(|e| format!("invalid path_glob `{g}`: {e}"))?
                .compile_matcher(),
        ),
        _ => None,
    };
    let limit = max_hits.max(1) as usize;
    let mut hits = Vec::new();
    let mut files_searched = 0u32;
    let mut truncated = false;
    'files: for rel in files {
        if let Some(g) = &glob
            && !g.is_match(rel)
        {
            continue;
        }
        let Some(text) = read_text(rel) else {
            continue;
        };
        files_searched += 1;
        // One pass over the whole file finds whether it matches at all before any line
        // is split, which is what keeps a mostly-miss search fast.
        if !re.is_match(&text) {
            continue;
        }
        for (i, line) in text.lines().enumerate() {
            if re.is_match(line) {
                if hits.len() == limit {
                    truncated = true;
                    break 'files;
                }
                hits.push(Hit {
                    path: rel.clone(),
                    line: (i + 1) as u32,
                    text: clip(line),
                });
            }
        }
    }
    Ok(SearchResult {
        hits,
        files_searched,
        truncated,
    })
}

pub fn search_docs(
    words: &[String],
    max_results: u32,
    files: &[String],
) -> Result<Vec<DocHit>, String> {
    if words.is_empty() {
        return Err("query is empty".into());
    }
    let mut hits: Vec<DocHit> = Vec::new();
    for rel in files {
        let Some(text) = read_text(rel) else {
            continue;
        };
        for (i, line) in text.lines().enumerate() {
            let l = line.to_lowercase();
            let score = words.iter().filter(|w| l.contains(w.as_str())).count();
            if score > 0 {
                hits.push(DocHit {
                    path: rel.clone(),
                    line: (i + 1) as u32,
                    score: score as u32,
                    snippet: clip(line.trim()),
                });
            }
        }
    }
    hits.sort_by(|a, b| {
        b.score
            .cmp(&a.score)
            .then(a.path.cmp(&b.path))
            .then(a.line.cmp(&b.line))
    });
    // One more than asked, so the host can tell the model the list was cut.
    hits.truncate(max_results as usize + 1);
    Ok(hits)
}
