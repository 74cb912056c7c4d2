//! `fetch_code`: brings the task's code onto this worker, under `<work>/<task>/tree`.
//!
//! Git sources use the git CLI (run as a child process, never blocking the runtime):
//! `init` + `fetch --depth 1 origin <ref>` + `checkout FETCH_HEAD`, which works for
//! branches, tags and commit ids alike. ZIP uploads are checked entry by entry before a
//! single byte is written: no absolute paths, no `..`, no symlinks, bounded entry count and
//! size; a common top-level folder (as in GitHub's zipballs) is stripped.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use patchflow_core::{TaskId, TaskSource};
use patchflow_platform::ObjectStore;
use patchflow_workflows::io::FetchOutput;
use temporalio_sdk::activities::ActivityError;
use tokio::process::Command;

use crate::{ActivityConfig, bad_input, transient};

/// Longest a git fetch may take before it is treated as a transient failure.
const GIT_TIMEOUT: Duration = Duration::from_secs(600);

pub async fn fetch(
    config: &ActivityConfig,
    objects: &dyn ObjectStore,
    task: &TaskId,
    source: &TaskSource,
) -> Result<FetchOutput, ActivityError> {
    let work = config.work_dir(task);
    let tree = work.join("tree");
    // A retry starts from scratch.
    if tree.exists() {
        tokio::fs::remove_dir_all(&tree).await.map_err(transient)?;
    }
    tokio::fs::create_dir_all(&tree).await.map_err(transient)?;
    let commit = match source {
        TaskSource::Git { url, git_ref } => {
            Some(git_fetch(config, url, git_ref.as_deref(), &tree).await?)
        }
        TaskSource::Archive { key } => {
            let zip_path = work.join("source.zip");
            objects.get_to_file(key, &zip_path).await.map_err(|e| match e {
                patchflow_platform::ObjectError::NotFound(k) => {
                    bad_input(format!("uploaded archive {k} is not in the object store"))
                }
                other => transient(other),
            })?;
            let (tree2, limits) = (tree.clone(), (config.max_archive_entries, config.max_unpacked_bytes));
            tokio::task::spawn_blocking(move || unzip_safely(&zip_path, &tree2, limits.0, limits.1))
                .await
                .map_err(transient)?
                .map_err(bad_input)?;
            None
        }
    };
    let (files, bytes) = {
        let t = tree.clone();
        tokio::task::spawn_blocking(move || tree_size(&t)).await.map_err(transient)?
    };
    if bytes > config.max_unpacked_bytes {
        return Err(bad_input(format!(
            "the repository holds {bytes} bytes, more than the {} this server accepts",
            config.max_unpacked_bytes
        )));
    }
    Ok(FetchOutput {
        tree_dir: tree.display().to_string(),
        commit,
        files,
        bytes,
    })
}

fn is_local(url: &str) -> bool {
    url.starts_with("file://") || url.starts_with('/') || url.starts_with('.')
}

/// Runs one git command; returns stdout, or the classified error naming the URL.
async fn git(dir: &Path, args: &[&str], url: &str, local: bool) -> Result<String, ActivityError> {
    let mut cmd = Command::new("git");
    cmd.arg("-C").arg(dir);
    if local {
        // Local fetches by commit id need the "server" side to allow it.
        cmd.args(["-c", "protocol.file.allow=always", "-c", "uploadpack.allowAnySHA1InWant=true"]);
    }
    cmd.args(["-c", "credential.helper=", "-c", "core.hooksPath=/dev/null"])
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(GIT_TIMEOUT, cmd.output())
        .await
        .map_err(|_| transient(format!("git {} of {url} timed out", args[0])))?
        .map_err(|e| transient(format!("cannot run git: {e}")))?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let reason: String = stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.trim_start_matches("fatal: ").trim())
        .collect::<Vec<_>>()
        .join("; ");
    let msg = format!("cannot fetch {url}: {reason}");
    let permanent = [
        "not found",
        "does not exist",
        "does not appear to be a git repository",
        "could not resolve host",
        "couldn't find remote ref",
        "not our ref",
        "authentication failed",
        "could not read username",
        "repository not found",
        "invalid",
        "no such",
        "unable to find remote helper",
        "transport 'file' not allowed",
    ]
    .iter()
    .any(|p| reason.to_lowercase().contains(p));
    Err(if permanent { bad_input(msg) } else { transient(msg) })
}

async fn git_fetch(
    config: &ActivityConfig,
    url: &str,
    git_ref: Option<&str>,
    tree: &Path,
) -> Result<String, ActivityError> {
    let local = is_local(url);
    if local && !config.allow_local_sources {
        return Err(bad_input(format!(
            "cannot fetch {url}: local repositories are not allowed by this worker (allow_local_sources is off)"
        )));
    }
    git(tree, &["init", "-q"], url, local).await?;
    git(tree, &["remote", "add", "origin", url], url, local).await?;
    let target = git_ref.unwrap_or("HEAD");
    git(tree, &["fetch", "-q", "--depth", "1", "--no-tags", "origin", target], url, local).await?;
    git(tree, &["checkout", "-q", "--detach", "FETCH_HEAD"], url, local).await?;
    git(tree, &["rev-parse", "HEAD"], url, local).await
}

/// Files and bytes under `dir` (without `.git`).
fn tree_size(dir: &Path) -> (u64, u64) {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_entry(|e| e.file_name() != ".git")
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .fold((0, 0), |(n, b), e| (n + 1, b + e.metadata().map(|m| m.len()).unwrap_or(0)))
}

/// Unpacks `zip` into `dest` after checking every entry. Returns a message for the user on
/// refusal; nothing is written unless the whole archive passes the checks.
pub fn unzip_safely(zip: &Path, dest: &Path, max_entries: u64, max_bytes: u64) -> Result<u64, String> {
    let file = std::fs::File::open(zip).map_err(|e| format!("cannot open the uploaded archive: {e}"))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| format!("the upload is not a valid ZIP archive: {e}"))?;
    if archive.len() as u64 > max_entries {
        return Err(format!(
            "the ZIP archive has {} entries, more than the {max_entries} allowed",
            archive.len()
        ));
    }
    // Pass 1: validate names, kinds and declared sizes.
    let mut names: Vec<(usize, PathBuf, bool)> = Vec::with_capacity(archive.len());
    let mut declared = 0u64;
    for i in 0..archive.len() {
        let entry = archive.by_index_raw(i).map_err(|e| format!("corrupt ZIP entry {i}: {e}"))?;
        let raw = entry.name().map(|n| n.to_string()).unwrap_or_else(|_| format!("#{i}"));
        let Some(path) = entry.enclosed_name() else {
            return Err(format!("ZIP entry `{raw}` points outside the archive (absolute path or `..`)"));
        };
        if entry.is_symlink() {
            return Err(format!("ZIP entry `{raw}` is a symbolic link; links are not accepted"));
        }
        declared = declared.saturating_add(entry.size());
        if declared > max_bytes {
            return Err(format!("the ZIP archive unpacks to more than {max_bytes} bytes"));
        }
        names.push((i, path, entry.is_dir()));
    }
    // GitHub-style archives wrap everything in one folder; strip it.
    let prefix = common_root(&names);
    // Pass 2: extract, counting real bytes (a header can lie about sizes).
    let mut written = 0u64;
    for (i, path, is_dir) in names {
        let rel = match &prefix {
            Some(p) => match path.strip_prefix(p) {
                Ok(r) if r.as_os_str().is_empty() => continue,
                Ok(r) => r.to_path_buf(),
                Err(_) => path.clone(),
            },
            None => path.clone(),
        };
        let out = dest.join(&rel);
        if is_dir {
            std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", rel.display()))?;
            continue;
        }
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let mut entry = archive.by_index(i).map_err(|e| format!("corrupt ZIP entry {}: {e}", path.display()))?;
        let mut f = std::fs::File::create(&out).map_err(|e| format!("cannot write {}: {e}", rel.display()))?;
        let budget = max_bytes - written;
        let n = std::io::copy(&mut (&mut entry).take(budget + 1), &mut f)
            .map_err(|e| format!("cannot unpack {}: {e}", path.display()))?;
        written += n;
        if written > max_bytes {
            return Err(format!("the ZIP archive unpacks to more than {max_bytes} bytes"));
        }
        #[cfg(unix)]
        if let Some(mode) = entry.unix_mode() {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&out, std::fs::Permissions::from_mode(mode & 0o755));
        }
    }
    Ok(written)
}

fn common_root(names: &[(usize, PathBuf, bool)]) -> Option<PathBuf> {
    let first = names.first()?.1.components().next()?.as_os_str().to_owned();
    let all_under = names.iter().all(|(_, p, is_dir)| {
        let mut c = p.components();
        c.next().map(|x| x.as_os_str() == first).unwrap_or(false) && (c.next().is_some() || *is_dir)
    });
    all_under.then(|| PathBuf::from(first))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn zip_with(entries: &[(&str, &str)]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut w = zip::ZipWriter::new(std::fs::File::create(f.path()).unwrap());
        for (name, body) in entries {
            w.start_file(*name, zip::write::SimpleFileOptions::default()).unwrap();
            w.write_all(body.as_bytes()).unwrap();
        }
        w.finish().unwrap();
        f
    }

    #[test]
    fn refuses_escaping_entries_before_writing_anything() {
        let outside = tempfile::tempdir().unwrap();
        let dest = outside.path().join("dest");
        std::fs::create_dir(&dest).unwrap();
        let z = zip_with(&[("ok.txt", "fine"), ("../escape.txt", "gotcha")]);
        let err = unzip_safely(z.path(), &dest, 100, 1 << 20).unwrap_err();
        assert!(err.contains("`../escape.txt` points outside"), "{err}");
        assert!(!outside.path().join("escape.txt").exists());
        assert_eq!(std::fs::read_dir(&dest).unwrap().count(), 0, "nothing written");
    }

    #[test]
    fn enforces_limits_and_strips_a_common_root() {
        let dest = tempfile::tempdir().unwrap();
        let z = zip_with(&[("repo-abc/a.py", "x"), ("repo-abc/src/b.py", "y")]);
        unzip_safely(z.path(), dest.path(), 100, 1 << 20).unwrap();
        assert_eq!(std::fs::read_to_string(dest.path().join("src/b.py")).unwrap(), "y");
        let z = zip_with(&[("a", "1"), ("b", "2"), ("c", "3")]);
        assert!(unzip_safely(z.path(), dest.path(), 2, 1 << 20).unwrap_err().contains("3 entries"));
        let z = zip_with(&[("big", &"x".repeat(1000))]);
        assert!(unzip_safely(z.path(), dest.path(), 10, 100).unwrap_err().contains("more than 100 bytes"));
        std::fs::write(dest.path().join("junk.zip"), "not a zip").unwrap();
        assert!(unzip_safely(&dest.path().join("junk.zip"), dest.path(), 10, 100).unwrap_err().contains("not a valid ZIP"));
    }
}
