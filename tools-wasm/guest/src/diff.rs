//! `apply-diff`: a unified diff applied with exact matching. Hunks may sit at another line
//! than the header says (the nearest exact match wins), but their text must match; every
//! file is checked before any is written, so a bad diff leaves the workspace as it was.

use crate::exports::patchflow::tools::tools::PatchedFile;
use crate::files::{explain, resolve};

struct Hunk {
    old_start: usize,
    old: Vec<String>,
    new: Vec<String>,
}

struct FilePatch {
    old_path: Option<String>,
    new_path: Option<String>,
    hunks: Vec<Hunk>,
}

fn strip_path(raw: &str) -> Option<String> {
    let p = raw.split('\t').next().unwrap_or("").trim();
    if p == "/dev/null" {
        return None;
    }
    let p = p
        .strip_prefix("a/")
        .or_else(|| p.strip_prefix("b/"))
        .unwrap_or(p);
    Some(p.to_string())
}

fn parse(diff: &str) -> Result<Vec<FilePatch>, String> {
    let mut files: Vec<FilePatch> = Vec::new();
    let mut lines = diff.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(old) = line.strip_prefix("--- ") {
            let Some(new) = lines.next().and_then(|l| l.strip_prefix("+++ ")) else {
                return Err("a `---` line is not followed by a `+++` line".into());
            };
            files.push(FilePatch {
                old_path: strip_path(old),
                new_path: strip_path(new),
                hunks: Vec::new(),
            });
        } else if let Some(header) = line.strip_prefix("@@ ") {
            let Some(file) = files.last_mut() else {
                return Err("a hunk comes before any `---`/`+++` file header".into());
            };
            let old_start = header
                .split_whitespace()
                .next()
                .and_then(|r| r.strip_prefix('-'))
                .and_then(|r| r.split(',').next())
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| format!("bad hunk header `@@ {header}`"))?;
            let mut hunk = Hunk {
                old_start,
                old: Vec::new(),
                new: Vec::new(),
            };
            while let Some(next) = lines.peek() {
                if next.starts_with("@@ ") || next.starts_with("--- ") || next.starts_with("diff ")
                {
                    break;
                }
                let l = lines.next().unwrap_or_default();
                match l.chars().next() {
                    Some(' ') => {
                        hunk.old.push(l[1..].to_string());
                        hunk.new.push(l[1..].to_string());
                    }
                    None => {
                        hunk.old.push(String::new());
                        hunk.new.push(String::new());
                    }
                    Some('-') => hunk.old.push(l[1..].to_string()),
                    Some('+') => hunk.new.push(l[1..].to_string()),
                    _ => {}
                }
            }
            file.hunks.push(hunk);
        }
    }
    if files.is_empty() {
        return Err("no file headers (`--- a/...` / `+++ b/...`) found in the diff".into());
    }
    Ok(files)
}

/// Where `needle` occurs in `hay`, nearest to `hint` first.
fn find_block(hay: &[String], needle: &[String], hint: usize) -> Option<usize> {
    if needle.is_empty() {
        return Some(hint.min(hay.len()));
    }
    if needle.len() > hay.len() {
        return None;
    }
    let last = hay.len() - needle.len();
    let hint = hint.min(last);
    for d in 0..=hint.max(last - hint) {
        for i in [hint.checked_sub(d), Some(hint + d)].into_iter().flatten() {
            if i <= last && hay[i..i + needle.len()] == *needle {
                return Some(i);
            }
        }
    }
    None
}

pub fn apply(diff: &str) -> Result<Vec<PatchedFile>, String> {
    let patches = parse(diff)?;
    let mut writes: Vec<(String, Option<String>, PatchedFile)> = Vec::new();
    for p in &patches {
        let shown = p
            .new_path
            .clone()
            .or_else(|| p.old_path.clone())
            .unwrap_or_default();
        let mut lines: Vec<String> = match &p.old_path {
            None => Vec::new(),
            Some(old) => {
                let path = resolve(old)?;
                let text = std::fs::read_to_string(&path).map_err(|e| explain(old, "read", &e))?;
                text.lines().map(str::to_string).collect()
            }
        };
        let mut offset: isize = 0;
        for (n, h) in p.hunks.iter().enumerate() {
            let hint = (h.old_start.saturating_sub(1) as isize + offset).max(0) as usize;
            let at = find_block(&lines, &h.old, hint).ok_or_else(|| {
                format!(
                    "hunk {} of `{shown}` does not match the file; read the file and make the diff again",
                    n + 1
                )
            })?;
            lines.splice(at..at + h.old.len(), h.new.iter().cloned());
            offset += h.new.len() as isize - h.old.len() as isize;
        }
        let content = p.new_path.as_ref().map(|_| {
            let mut s = lines.join("\n");
            if !lines.is_empty() {
                s.push('\n');
            }
            s
        });
        let target = p.new_path.clone().unwrap_or_else(|| shown.clone());
        resolve(&target)?;
        writes.push((
            target.clone(),
            content,
            PatchedFile {
                path: target,
                hunks: p.hunks.len() as u32,
                created: p.old_path.is_none(),
            },
        ));
    }
    let mut done = Vec::new();
    for (rel, content, info) in writes {
        let path = resolve(&rel)?;
        match content {
            Some(text) => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| explain(&rel, "write", &e))?;
                }
                std::fs::write(&path, text).map_err(|e| explain(&rel, "write", &e))?;
            }
            None => std::fs::remove_file(&path).map_err(|e| explain(&rel, "remove", &e))?,
        }
        done.push(info);
    }
    Ok(done)
}
