//! `fetch_code`: brings the task's code onto this worker, under `<work>/<task>/tree`.
//!
//! Git sources use the git CLI (run as a child process, never blocking the runtime):
//! `init` + `fetch --depth 1 origin <ref>` + `checkout FETCH_HEAD`, which works for
//! branches, tags and commit ids alike. ZIP uploads are checked entry by entry before a
//! single byte is written: no absolute paths, no `..`, no symlinks, bounded entry count and
//! size; a common top-level folder (as in GitHub's zipballs) is stripped.

use std::path::Path;
use std::time::Duration;

use patchflow_core::{TaskId, TaskSource};
use patchflow_platform::{ObjectStore, archive};
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
            objects
                .get_to_file(key, &zip_path)
                .await
                .map_err(|e| match e {
                    patchflow_platform::ObjectError::NotFound(k) => {
                        bad_input(format!("uploaded archive {k} is not in the object store"))
                    }
                    other => transient(other),
                })?;
            let (tree2, limits) = (
                tree.clone(),
                (config.max_archive_entries, config.max_unpacked_bytes),
            );
            tokio::task::spawn_blocking(move || {
                archive::unzip_safely(&zip_path, &tree2, limits.0, limits.1)
            })
            .await
            .map_err(transient)?
            .map_err(bad_input)?;
            None
        }
    };
    let (files, bytes) = {
        let t = tree.clone();
        tokio::task::spawn_blocking(move || tree_size(&t))
            .await
            .map_err(transient)?
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
        cmd.args([
            "-c",
            "protocol.file.allow=always",
            "-c",
            "uploadpack.allowAnySHA1InWant=true",
        ]);
    }
    cmd.args(["-c", "credential.helper=", "-c", "core.hooksPath=/dev/null"])
        .args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .env(
            "GIT_SSH_COMMAND",
            "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new",
        )
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
    Err(if permanent {
        bad_input(msg)
    } else {
        transient(msg)
    })
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
    git(
        tree,
        &["fetch", "-q", "--depth", "1", "--no-tags", "origin", target],
        url,
        local,
    )
    .await?;
    git(
        tree,
        &["checkout", "-q", "--detach", "FETCH_HEAD"],
        url,
        local,
    )
    .await?;
    git(tree, &["rev-parse", "HEAD"], url, local).await
}

/// Files and bytes under `dir` (without `.git`).
fn tree_size(dir: &Path) -> (u64, u64) {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_entry(|e| e.file_name() != ".git")
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .fold((0, 0), |(n, b), e| {
            (n + 1, b + e.metadata().map(|m| m.len()).unwrap_or(0))
        })
}
