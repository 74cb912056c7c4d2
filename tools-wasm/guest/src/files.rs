//! `read-file`, `list-dir` and `edit-file`, plus the path rules they share. The messages
//! are the native tools' word for word, so the model sees no difference.

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use crate::exports::patchflow::tools::tools::{
    DirEntry, DirListing, EditResult, EntryKind, ReadResult,
};
use crate::{MAX_BYTES, MAX_LINES, ROOT};

/// Largest file read-file and edit-file work on.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// The guest path of a model-supplied relative path, after the lexical checks.
pub fn resolve(rel: &str) -> Result<PathBuf, String> {
    let rel = rel.trim();
    if rel.contains('\0') {
        return Err("path contains a NUL byte".into());
    }
    let path = Path::new(rel);
    if path.is_absolute() {
        return Err(format!(
            "`{rel}` is an absolute path; use a path relative to the repository root"
        ));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!(
            "`{rel}` contains `..`; paths must stay inside the repository"
        ));
    }
    Ok(Path::new(ROOT).join(path))
}

/// Turns a failed file operation into the model's message. The capability layer already
/// refused; this only finds out why, by looking for a symlink on the way that points out.
pub fn explain(rel: &str, verb: &str, err: &std::io::Error) -> String {
    if let Some(msg) = symlink_escape(rel) {
        return msg;
    }
    match err.kind() {
        ErrorKind::NotFound => format!("`{rel}` does not exist"),
        _ => format!("cannot {verb} `{rel}`: {err}"),
    }
}

fn symlink_escape(rel: &str) -> Option<String> {
    let comps: Vec<String> = Path::new(rel.trim())
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    let mut prefix = PathBuf::from(ROOT);
    for (i, c) in comps.iter().enumerate() {
        prefix.push(c);
        let Ok(meta) = std::fs::symlink_metadata(&prefix) else {
            return None;
        };
        if !meta.file_type().is_symlink() {
            continue;
        }
        // The capability layer will not even read a link whose target is absolute.
        let Ok(target) = std::fs::read_link(&prefix) else {
            return Some(format!(
                "`{}` leads outside the repository through a symlink",
                rel.trim()
            ));
        };
        // Where the link points, relative to the workspace root, worked out lexically.
        let mut depth: Vec<&str> = comps[..i].iter().map(String::as_str).collect();
        let outside = target.is_absolute()
            || target.components().any(|t| match t {
                Component::ParentDir => depth.pop().is_none(),
                Component::Normal(_) => {
                    depth.push("x");
                    false
                }
                _ => false,
            });
        if outside {
            return Some(format!(
                "`{}` leads outside the repository through a symlink",
                rel.trim()
            ));
        }
        if std::fs::metadata(&prefix).is_err() {
            return Some(format!(
                "`{}` goes through a symlink that leads nowhere inside the repository",
                rel.trim()
            ));
        }
    }
    None
}

fn read_text_file(rel: &str) -> Result<String, String> {
    let path = resolve(rel)?;
    let meta = std::fs::metadata(&path).map_err(|e| explain(rel, "read", &e))?;
    if meta.is_dir() {
        return Err(format!(
            "`{rel}` is a directory; list it with run_shell_command (ls)"
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(format!(
            "`{rel}` is {} bytes, more than the {MAX_FILE_BYTES} this tool reads; use run_shell_command (head, sed -n)",
            meta.len()
        ));
    }
    let bytes = std::fs::read(&path).map_err(|e| explain(rel, "read", &e))?;
    if bytes.iter().take(8192).any(|&b| b == 0) {
        return Err(format!("`{rel}` is a binary file"));
    }
    String::from_utf8(bytes).map_err(|_| format!("`{rel}` is not UTF-8 text"))
}

pub fn read_file(
    rel: &str,
    start_line: Option<u32>,
    end_line: Option<u32>,
) -> Result<ReadResult, String> {
    let text = read_text_file(rel)?;
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let total = lines.len();
    let start = start_line.map(|s| s as usize).unwrap_or(1);
    if start == 0 {
        return Err("start_line is 1-based".into());
    }
    let end = end_line.map(|e| e as usize).unwrap_or(total).min(total);
    if total > 0 && start > total {
        return Err(format!(
            "start_line {start} is past the end of `{rel}` ({total} lines)"
        ));
    }
    if end < start && total > 0 {
        return Err(format!("end_line {end} is before start_line {start}"));
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
    Ok(ReadResult {
        start_line: start as u32,
        end_line: last as u32,
        total_lines: total as u32,
        content,
        truncated,
    })
}

pub fn list_dir(rel: &str, max_entries: u32) -> Result<DirListing, String> {
    let rel = if rel.trim().is_empty() { "." } else { rel };
    let path = resolve(rel)?;
    let read = std::fs::read_dir(&path).map_err(|e| explain(rel, "list", &e))?;
    let mut entries: Vec<DirEntry> = read
        .filter_map(Result::ok)
        .map(|e| {
            let meta = e.metadata().ok();
            let kind = match e.file_type() {
                Ok(t) if t.is_symlink() => EntryKind::Symlink,
                Ok(t) if t.is_dir() => EntryKind::Directory,
                Ok(t) if t.is_file() => EntryKind::File,
                _ => EntryKind::Other,
            };
            DirEntry {
                name: e.file_name().to_string_lossy().into_owned(),
                kind,
                size: meta.map(|m| m.len()).unwrap_or(0),
            }
        })
        .collect();
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let truncated = entries.len() > max_entries as usize;
    entries.truncate(max_entries as usize);
    Ok(DirListing { entries, truncated })
}

pub fn edit_file(rel: &str, old_text: &str, new_text: &str) -> Result<EditResult, String> {
    let path = resolve(rel)?;
    if old_text.is_empty() {
        match std::fs::metadata(&path) {
            Ok(m) if m.len() > 0 || m.is_dir() => {
                return Err(format!(
                    "`{rel}` already exists; give old_text to change it"
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(explain(rel, "write", &e)),
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| match symlink_escape(rel) {
                Some(m) => m,
                None => format!("cannot create directories for `{rel}`: {e}"),
            })?;
        }
        std::fs::write(&path, new_text).map_err(|e| match symlink_escape(rel) {
            Some(m) => m,
            None => format!("cannot write `{rel}`: {e}"),
        })?;
        return Ok(EditResult {
            created: true,
            replaced: 0,
            at_line: 0,
            lines: new_text.lines().count() as u32,
        });
    }
    let text = read_text_file(rel)?;
    match text.matches(old_text).count() {
        0 => Err(format!(
            "old_text was not found in `{rel}`; read the file and copy the exact text, including whitespace"
        )),
        1 => {
            let updated = text.replacen(old_text, new_text, 1);
            std::fs::write(&path, &updated).map_err(|e| format!("cannot write `{rel}`: {e}"))?;
            let at = text
                .find(old_text)
                .map(|i| text[..i].lines().count() + 1)
                .unwrap_or(1);
            Ok(EditResult {
                created: false,
                replaced: 1,
                at_line: at as u32,
                lines: updated.lines().count() as u32,
            })
        }
        n => Err(format!(
            "old_text matches {n} places in `{rel}`; include more surrounding lines so it matches exactly once"
        )),
    }
}
