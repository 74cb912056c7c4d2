//! The run's result as a unified diff: the workspace against the staged archive it was
//! restored from. Streams the archive (one file in memory at a time) and emits git-style
//! headers, so `git apply` takes the patch as is.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Read;
use std::path::Path;

use similar::TextDiff;

/// Directories and files never reported as added: caches that tools create as they run.
const ALWAYS_IGNORED: [&str; 6] = [
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    "node_modules",
    ".ruff_cache",
    ".DS_Store",
];

/// The diff and the paths it touches.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WorkspaceDiff {
    pub patch: String,
    pub files_changed: Vec<String>,
}

/// Compares `workspace` with the tar.zst `baseline` it was unpacked from.
pub fn diff_against_archive(baseline: &Path, workspace: &Path) -> std::io::Result<WorkspaceDiff> {
    let file = std::fs::File::open(baseline)?;
    let decoder = zstd::stream::read::Decoder::new(file)?;
    let mut archive = tar::Archive::new(decoder);
    let mut out = WorkspaceDiff::default();
    let mut seen = BTreeSet::new();
    let mut changes: Vec<(String, String)> = Vec::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let rel = entry
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        if rel.starts_with(".git/") {
            continue;
        }
        seen.insert(rel.clone());
        let mut old = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut old)?;
        let current = workspace.join(&rel);
        match std::fs::read(&current) {
            Ok(new) if new == old => {}
            Ok(new) => changes.push((rel.clone(), file_diff(&rel, Some(&old), Some(&new)))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                changes.push((rel.clone(), file_diff(&rel, Some(&old), None)))
            }
            Err(e) => return Err(e),
        }
    }
    for entry in ignore::WalkBuilder::new(workspace)
        .hidden(false)
        .require_git(false)
        .follow_links(false)
        .filter_entry(|e| {
            let name = e.file_name().to_string_lossy();
            name != ".git" && !ALWAYS_IGNORED.contains(&name.as_ref()) && !name.ends_with(".pyc")
        })
        .build()
    {
        let entry = entry.map_err(std::io::Error::other)?;
        if !entry.file_type().is_some_and(|t| t.is_file()) {
            continue;
        }
        let rel = entry
            .path()
            .strip_prefix(workspace)
            .unwrap_or(entry.path())
            .to_string_lossy()
            .replace('\\', "/");
        if seen.contains(&rel) {
            continue;
        }
        let new = std::fs::read(entry.path())?;
        changes.push((rel.clone(), file_diff(&rel, None, Some(&new))));
    }
    changes.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, text) in changes {
        out.patch.push_str(&text);
        out.files_changed.push(path);
    }
    Ok(out)
}

fn is_binary(bytes: &[u8]) -> bool {
    bytes.iter().take(8192).any(|&b| b == 0) || std::str::from_utf8(bytes).is_err()
}

/// One file's section of the patch. `None` on a side means the file is absent there.
pub(crate) fn file_diff(path: &str, old: Option<&[u8]>, new: Option<&[u8]>) -> String {
    let mut s = format!("diff --git a/{path} b/{path}\n");
    match (old, new) {
        (None, Some(_)) => s.push_str("new file mode 100644\n"),
        (Some(_), None) => s.push_str("deleted file mode 100644\n"),
        _ => {}
    }
    let old_name = if old.is_some() {
        format!("a/{path}")
    } else {
        "/dev/null".into()
    };
    let new_name = if new.is_some() {
        format!("b/{path}")
    } else {
        "/dev/null".into()
    };
    let (o, n) = (old.unwrap_or_default(), new.unwrap_or_default());
    if is_binary(o) || is_binary(n) {
        let _ = writeln!(s, "Binary files {old_name} and {new_name} differ");
        return s;
    }
    let (o, n) = (String::from_utf8_lossy(o), String::from_utf8_lossy(n));
    let _ = writeln!(s, "--- {old_name}\n+++ {new_name}");
    let diff = TextDiff::from_lines(o.as_ref(), n.as_ref());
    let mut unified = diff.unified_diff();
    unified.context_radius(3).missing_newline_hint(true);
    for hunk in unified.iter_hunks() {
        let _ = write!(s, "{hunk}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive_of(dir: &Path, out: &Path) {
        let f = std::fs::File::create(out).unwrap();
        let enc = zstd::stream::write::Encoder::new(f, 3)
            .unwrap()
            .auto_finish();
        let mut b = tar::Builder::new(enc);
        b.append_dir_all(".", dir).unwrap();
        b.finish().unwrap();
    }

    #[test]
    fn reports_modified_added_and_deleted_files_in_git_format() {
        let base = tempfile::tempdir().unwrap();
        std::fs::write(base.path().join("keep.txt"), "same\n").unwrap();
        std::fs::write(base.path().join("mod.py"), "a\nb\nc\n").unwrap();
        std::fs::write(base.path().join("gone.txt"), "bye\n").unwrap();
        let arc = tempfile::NamedTempFile::new().unwrap();
        archive_of(base.path(), arc.path());
        std::fs::write(base.path().join("mod.py"), "a\nB\nc\n").unwrap();
        std::fs::remove_file(base.path().join("gone.txt")).unwrap();
        std::fs::create_dir(base.path().join("__pycache__")).unwrap();
        std::fs::write(base.path().join("__pycache__/x.pyc"), [0u8, 1]).unwrap();
        std::fs::write(base.path().join("new.txt"), "hi").unwrap();
        let d = diff_against_archive(arc.path(), base.path()).unwrap();
        assert_eq!(d.files_changed, ["gone.txt", "mod.py", "new.txt"]);
        assert!(d.patch.contains("diff --git a/mod.py b/mod.py\n--- a/mod.py\n+++ b/mod.py\n@@ -1,3 +1,3 @@\n a\n-b\n+B\n c\n"), "{}", d.patch);
        assert!(
            d.patch.contains(
                "deleted file mode 100644\n--- a/gone.txt\n+++ /dev/null\n@@ -1 +0,0 @@\n-bye\n"
            ),
            "{}",
            d.patch
        );
        assert!(d.patch.contains("new file mode 100644\n--- /dev/null\n+++ b/new.txt\n@@ -0,0 +1 @@\n+hi\n\\ No newline at end of file\n"), "{}", d.patch);
    }
}
