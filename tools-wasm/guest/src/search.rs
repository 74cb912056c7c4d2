//! `search-code` and `search-docs` over file contents the host read through its
//! capability handle on the workspace. The walk and the reads are native and fast; the
//! untrusted pattern is compiled and run on the untrusted contents here.

use regex::bytes::RegexBuilder;

use crate::exports::patchflow::tools::tools::{DocHit, Hit, SearchResult, SourceFile};

/// A matching line is cut to this many characters.
const MAX_LINE_CHARS: usize = 300;

/// Whether a file looks binary: a NUL byte in its first 8 KiB, as git decides.
fn is_binary(bytes: &[u8]) -> bool {
    memchr::memchr(0, &bytes[..bytes.len().min(8192)]).is_some()
}

/// The lines of `text` as `str::lines` splits them: on `\n`, a trailing `\r` dropped, no
/// empty last line after a final newline.
fn lines(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = text.strip_suffix(b"\n").unwrap_or(text);
    let empty = text.is_empty();
    body.split(|&b| b == b'\n')
        .filter(move |_| !empty)
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
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
    max_hits: u32,
    files: &[SourceFile],
) -> Result<SearchResult, String> {
    if pattern.is_empty() {
        return Err("pattern is empty".into());
    }
    let re = RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("invalid regex `{pattern}`: {e}"))?;
    let limit = max_hits as usize;
    let mut hits = Vec::new();
    let mut files_searched = 0u32;
    let mut truncated = false;
    'files: for file in files {
        if is_binary(&file.content) {
            continue;
        }
        files_searched += 1;
        // One pass over the whole file finds whether it matches at all before any line
        // is split, which is what keeps a mostly-miss search fast.
        if !re.is_match(&file.content) {
            continue;
        }
        for (i, line) in lines(&file.content).enumerate() {
            if re.is_match(line) {
                if hits.len() == limit {
                    truncated = true;
                    break 'files;
                }
                hits.push(Hit {
                    path: file.path.clone(),
                    line: (i + 1) as u32,
                    text: clip(&String::from_utf8_lossy(line)),
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
    files: &[SourceFile],
) -> Result<Vec<DocHit>, String> {
    if words.is_empty() {
        return Err("query is empty".into());
    }
    let mut hits: Vec<DocHit> = Vec::new();
    for file in files {
        if is_binary(&file.content) {
            continue;
        }
        let text = String::from_utf8_lossy(&file.content);
        for (i, line) in text.lines().enumerate() {
            let l = line.to_lowercase();
            let score = words.iter().filter(|w| l.contains(w.as_str())).count();
            if score > 0 {
                hits.push(DocHit {
                    path: file.path.clone(),
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
