//! A run's changes as one archive (`changes.tar.zst`): the content of every file the run
//! changed against the code it started from, and the paths it deleted. A follow-up turn's
//! workspace is the staged code with the previous turn's changes laid over it, so it holds
//! exactly what that turn left (binary files too, which a diff cannot carry), and the
//! turn's own diff is taken against that state.
//!
//! Layout: `files/<path>` for each changed file, `deleted.json` (a JSON array of paths).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use crate::diff::{WorkspaceDiff, file_diff};

const FILES: &str = "files/";
const DELETED: &str = "deleted.json";

/// A run's changes: each path's content after it, `None` for a deleted one.
pub type Changes = BTreeMap<String, Option<Vec<u8>>>;

fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

/// A workspace-relative path from an archive, checked: relative, no `..`, nothing but
/// plain names.
fn checked(rel: &str) -> std::io::Result<PathBuf> {
    let p = Path::new(rel);
    if rel.is_empty()
        || rel.contains('\0')
        || !p.components().all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(invalid(format!("changes archive: refused path `{rel}`")));
    }
    Ok(p.to_path_buf())
}

/// Writes the changes of `files_changed` (workspace-relative, as the diff lists them) in
/// `workspace` to `out`. Only regular files are kept; a path that is gone is deleted.
pub fn write_changes(
    workspace: &Path,
    files_changed: &[String],
    out: &Path,
) -> std::io::Result<()> {
    let file = std::fs::File::create(out)?;
    let enc = zstd::stream::write::Encoder::new(file, 3)?.auto_finish();
    let mut tar = tar::Builder::new(enc);
    let mut deleted = Vec::new();
    for rel in files_changed {
        let path = workspace.join(checked(rel)?);
        match std::fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_file() => {
                let mut header = tar::Header::new_gnu();
                header.set_size(meta.len());
                header.set_mode(meta.permissions().mode() & 0o777);
                header.set_entry_type(tar::EntryType::Regular);
                let f = std::fs::File::open(&path)?;
                tar.append_data(&mut header, format!("{FILES}{rel}"), f)?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => deleted.push(rel.clone()),
            Err(e) => return Err(e),
        }
    }
    let list = serde_json::to_vec(&deleted).map_err(std::io::Error::other)?;
    let mut header = tar::Header::new_gnu();
    header.set_size(list.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, DELETED, list.as_slice())?;
    tar.finish()
}

/// An archive's entries: each path's content and mode, `None` for a deleted one.
type Entries = BTreeMap<String, Option<(Vec<u8>, u32)>>;

/// Reads a changes archive (paths checked), with each file's mode.
fn read_archive(archive: &Path) -> std::io::Result<Entries> {
    let file = std::fs::File::open(archive)?;
    let mut tar = tar::Archive::new(zstd::stream::read::Decoder::new(file)?);
    let mut out = BTreeMap::new();
    for entry in tar.entries()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            return Err(invalid("changes archive: only regular files are allowed"));
        }
        let name = entry.path()?.to_string_lossy().to_string();
        let mut bytes = Vec::with_capacity(entry.size() as usize);
        entry.read_to_end(&mut bytes)?;
        if name == DELETED {
            let list: Vec<String> = serde_json::from_slice(&bytes)
                .map_err(|e| invalid(format!("changes archive: {DELETED}: {e}")))?;
            for rel in list {
                checked(&rel)?;
                out.insert(rel, None);
            }
        } else if let Some(rel) = name.strip_prefix(FILES) {
            checked(rel)?;
            let mode = entry.header().mode().unwrap_or(0o644) & 0o777;
            out.insert(rel.to_string(), Some((bytes, mode)));
        } else {
            return Err(invalid(format!(
                "changes archive: unexpected entry `{name}`"
            )));
        }
    }
    Ok(out)
}

/// Reads the changes in `archive`.
pub fn read_changes(archive: &Path) -> std::io::Result<Changes> {
    Ok(read_archive(archive)?
        .into_iter()
        .map(|(k, v)| (k, v.map(|(b, _)| b)))
        .collect())
}

/// Lays the changes in `archive` over `workspace`: writes each file, removes each deleted
/// path. Never writes through a symlink: a path whose parent is one is refused, and a
/// symlink where a file goes is replaced. Answers the changes, for the turn's own diff.
pub fn apply_changes(archive: &Path, workspace: &Path) -> std::io::Result<Changes> {
    let entries = read_archive(archive)?;
    let root = workspace.canonicalize()?;
    for (rel, content) in &entries {
        let path = root.join(checked(rel)?);
        // Every directory on the way must be a real directory inside the workspace.
        let mut dir = root.clone();
        if let Some(parent) = Path::new(rel).parent() {
            for c in parent.components() {
                dir.push(c);
                match std::fs::symlink_metadata(&dir) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        return Err(invalid(format!(
                            "changes archive: `{rel}` goes through something that is not a directory"
                        )));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        std::fs::create_dir(&dir)?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {
                return Err(invalid(format!(
                    "changes archive: `{rel}` is a directory in the workspace"
                )));
            }
            Ok(_) => std::fs::remove_file(&path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        if let Some((bytes, mode)) = content {
            std::fs::write(&path, bytes)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))?;
        }
    }
    Ok(entries
        .into_iter()
        .map(|(k, v)| (k, v.map(|(b, _)| b)))
        .collect())
}

/// The turn's own change: `workspace` against the state the turn started from, the
/// `baseline` archive with `prior` laid over it. `now_changed` is what the cumulative diff
/// lists; only those paths and `prior`'s can differ.
pub fn turn_diff(
    baseline: &Path,
    prior: &Changes,
    workspace: &Path,
    now_changed: &[String],
) -> std::io::Result<WorkspaceDiff> {
    let wanted: BTreeSet<&str> = prior
        .keys()
        .map(String::as_str)
        .chain(now_changed.iter().map(String::as_str))
        .collect();
    // The baseline's content of the wanted paths that `prior` does not say.
    let mut base: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let file = std::fs::File::open(baseline)?;
    let mut tar = tar::Archive::new(zstd::stream::read::Decoder::new(file)?);
    for entry in tar.entries()? {
        let mut entry = entry?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let rel = entry
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        if wanted.contains(rel.as_str()) && !prior.contains_key(&rel) {
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes)?;
            base.insert(rel, bytes);
        }
    }
    let mut out = WorkspaceDiff::default();
    for rel in wanted {
        let old: Option<&[u8]> = match prior.get(rel) {
            Some(c) => c.as_deref(),
            None => base.get(rel).map(Vec::as_slice),
        };
        let path = workspace.join(checked(rel)?);
        let new = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_file() => Some(std::fs::read(&path)?),
            Ok(_) => None,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        if old != new.as_deref() {
            out.patch.push_str(&file_diff(rel, old, new.as_deref()));
            out.files_changed.push(rel.to_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::diff::diff_against_archive;

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
    fn a_second_turn_starts_where_the_first_ended_and_its_own_diff_is_only_its_change() {
        let base = tempfile::tempdir().unwrap();
        std::fs::write(base.path().join("a.py"), "a = 1\n").unwrap();
        std::fs::write(base.path().join("gone.txt"), "bye\n").unwrap();
        std::fs::create_dir(base.path().join("src")).unwrap();
        std::fs::write(base.path().join("src/b.py"), "b = 1\n").unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let baseline = tmp.path().join("code.tar.zst");
        archive_of(base.path(), &baseline);

        // Turn 1 edits a.py, deletes gone.txt, adds a binary file in a new directory.
        let ws1 = base.path();
        std::fs::write(ws1.join("a.py"), "a = 2\n").unwrap();
        std::fs::remove_file(ws1.join("gone.txt")).unwrap();
        std::fs::create_dir(ws1.join("assets")).unwrap();
        std::fs::write(ws1.join("assets/logo.bin"), [0u8, 159, 146, 150]).unwrap();
        let d1 = diff_against_archive(&baseline, ws1).unwrap();
        let changes = tmp.path().join("changes.tar.zst");
        write_changes(ws1, &d1.files_changed, &changes).unwrap();

        // Turn 2's workspace: the staged code with turn 1's changes over it.
        let ws2 = tempfile::tempdir().unwrap();
        patchflow_test_unpack(&baseline, ws2.path());
        let prior = apply_changes(&changes, ws2.path()).unwrap();
        assert_eq!(std::fs::read(ws2.path().join("a.py")).unwrap(), b"a = 2\n");
        assert!(!ws2.path().join("gone.txt").exists());
        assert_eq!(
            std::fs::read(ws2.path().join("assets/logo.bin")).unwrap(),
            [0u8, 159, 146, 150]
        );
        // Turn 2 edits src/b.py only.
        std::fs::write(ws2.path().join("src/b.py"), "b = 2\n").unwrap();
        let cumulative = diff_against_archive(&baseline, ws2.path()).unwrap();
        assert_eq!(
            cumulative.files_changed,
            ["a.py", "assets/logo.bin", "gone.txt", "src/b.py"]
        );
        let own = turn_diff(&baseline, &prior, ws2.path(), &cumulative.files_changed).unwrap();
        assert_eq!(own.files_changed, ["src/b.py"], "{}", own.patch);
        assert!(own.patch.contains("-b = 1\n+b = 2\n"), "{}", own.patch);
        // Turn 2 undoing turn 1's edit shows as its own change back.
        std::fs::write(ws2.path().join("a.py"), "a = 1\n").unwrap();
        let cumulative = diff_against_archive(&baseline, ws2.path()).unwrap();
        let own = turn_diff(&baseline, &prior, ws2.path(), &cumulative.files_changed).unwrap();
        assert_eq!(own.files_changed, ["a.py", "src/b.py"]);
        assert!(own.patch.contains("-a = 2\n+a = 1\n"), "{}", own.patch);
    }

    fn patchflow_test_unpack(archive: &Path, dest: &Path) {
        let f = std::fs::File::open(archive).unwrap();
        let mut t = tar::Archive::new(zstd::stream::read::Decoder::new(f).unwrap());
        t.unpack(dest).unwrap();
    }

    fn hostile(entries: &[(&str, &[u8])]) -> tempfile::NamedTempFile {
        let out = tempfile::NamedTempFile::new().unwrap();
        let enc = zstd::stream::write::Encoder::new(std::fs::File::create(out.path()).unwrap(), 3)
            .unwrap()
            .auto_finish();
        let mut b = tar::Builder::new(enc);
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            // Raw names: the builder's own checks would refuse `..`.
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.finish().unwrap();
        out
    }

    #[test]
    fn a_changes_archive_cannot_write_outside_the_workspace() {
        let ws = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), ws.path().join("link")).unwrap();
        for entries in [
            vec![("files/../escape", b"x".as_slice())],
            vec![("files/link/owned", b"x".as_slice())],
            vec![("other/x", b"x".as_slice())],
            vec![(DELETED, br#"["../../etc/passwd"]"#.as_slice())],
            vec![(DELETED, br#"["/etc/passwd"]"#.as_slice())],
        ] {
            let a = hostile(&entries);
            assert!(
                apply_changes(a.path(), ws.path()).is_err(),
                "{entries:?} was applied"
            );
        }
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // A symlink where a file goes is replaced, not written through.
        std::os::unix::fs::symlink(outside.path().join("t"), ws.path().join("f")).unwrap();
        let a = hostile(&[("files/f", b"mine".as_slice())]);
        apply_changes(a.path(), ws.path()).unwrap();
        assert_eq!(std::fs::read(ws.path().join("f")).unwrap(), b"mine");
        assert!(!outside.path().join("t").exists());
    }
}
