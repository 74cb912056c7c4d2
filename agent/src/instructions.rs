//! The repository's own instructions for agents: `AGENTS.md` at the root and in each
//! directory leading to the task's `target_file`, outermost first, joined into the system
//! message (at most [`MAX_BYTES`] in all). Only regular files inside the workspace are read:
//! an `AGENTS.md` that is a link, or under a directory that links out, is skipped.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

/// The most the instructions may add to the system message.
pub const MAX_BYTES: usize = 32 * 1024;
const FILE: &str = "AGENTS.md";

/// What was read: the text for the system message and the files it came from.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Instructions {
    pub text: String,
    /// Workspace-relative paths, in the order read.
    pub files: Vec<String>,
    /// Whether the cap cut the text short.
    pub truncated: bool,
}

/// Reads the `AGENTS.md` files that apply to a task on `workspace`.
pub fn agents_md(workspace: &Path, target_file: Option<&str>) -> Instructions {
    let mut out = Instructions::default();
    let Ok(root) = workspace.canonicalize() else {
        return out;
    };
    let mut dirs = vec![PathBuf::new()];
    if let Some(parent) = target_file.and_then(|t| Path::new(t).parent()) {
        let mut at = PathBuf::new();
        for c in parent.components() {
            let Component::Normal(name) = c else { break };
            at.push(name);
            dirs.push(at.clone());
        }
    }
    for dir in dirs {
        let rel = dir.join(FILE);
        let path = root.join(&rel);
        let is_file = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_file());
        let inside = path
            .canonicalize()
            .is_ok_and(|real| real.starts_with(&root));
        if !is_file || !inside {
            continue;
        }
        let name = rel.to_string_lossy().replace('\\', "/");
        let header = format!("\n## {name}\n\n");
        let left = MAX_BYTES.saturating_sub(out.text.len() + header.len());
        if left == 0 {
            out.truncated = true;
            break;
        }
        let mut bytes = Vec::new();
        let Ok(file) = std::fs::File::open(&path) else {
            continue;
        };
        if file.take(left as u64 + 1).read_to_end(&mut bytes).is_err() {
            continue;
        }
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if text.len() > left {
            let mut cut = left;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            out.truncated = true;
        }
        out.text.push_str(&header);
        out.text.push_str(text.trim_end());
        out.text.push('\n');
        out.files.push(name);
        if out.truncated {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_and_the_target_files_directories_are_read_outermost_first() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::fs::create_dir_all(p.join("src/lib")).unwrap();
        std::fs::create_dir_all(p.join("other")).unwrap();
        std::fs::write(p.join("AGENTS.md"), "root rules\n").unwrap();
        std::fs::write(p.join("src/AGENTS.md"), "src rules").unwrap();
        std::fs::write(p.join("other/AGENTS.md"), "not on the way").unwrap();
        let i = agents_md(p, Some("src/lib/x.py"));
        assert_eq!(i.files, ["AGENTS.md", "src/AGENTS.md"]);
        assert!(i.text.find("root rules").unwrap() < i.text.find("src rules").unwrap());
        assert!(!i.text.contains("not on the way") && !i.truncated);
        assert_eq!(agents_md(p, None).files, ["AGENTS.md"]);
        assert_eq!(agents_md(p, Some("../../etc/x")).files, ["AGENTS.md"]);
    }

    #[test]
    fn links_out_of_the_workspace_are_not_followed_and_the_text_is_capped() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("AGENTS.md"), "SECRET OUTSIDE").unwrap();
        std::fs::write(outside.path().join("passwd"), "SECRET OUTSIDE").unwrap();
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        std::os::unix::fs::symlink(outside.path().join("passwd"), p.join("AGENTS.md")).unwrap();
        std::os::unix::fs::symlink(outside.path(), p.join("linked")).unwrap();
        let i = agents_md(p, Some("linked/x.py"));
        assert!(i.files.is_empty() && !i.text.contains("SECRET"), "{i:?}");

        std::fs::remove_file(p.join("AGENTS.md")).unwrap();
        std::fs::write(p.join("AGENTS.md"), "é".repeat(MAX_BYTES)).unwrap();
        let i = agents_md(p, None);
        assert!(
            i.truncated && i.text.len() <= MAX_BYTES + 1,
            "{}",
            i.text.len()
        );
    }
}
