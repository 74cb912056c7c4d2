//! `fetch_code`: brings the task's code onto this worker, under `<work>/<task>/tree`.
//!
//! Git sources use the git CLI (run as a child process, never blocking the runtime):
//! `init` + `fetch --depth 1 <url> <ref>` + `checkout FETCH_HEAD`, which works for
//! branches, tags and commit ids alike. ZIP uploads are checked entry by entry before a
//! single byte is written: no absolute paths, no `..`, no symlinks, bounded entry count and
//! size; a common top-level folder (as in GitHub's zipballs) is stripped.
//!
//! A remote is checked before git runs ([`patchflow_platform::git_remote`]: allowed
//! scheme, no credentials, only public addresses unless `git_allowed_hosts` names the host),
//! and git connects to the address that was checked. git itself runs with a cleared
//! environment: no system or global config, a private empty HOME (so no `~/.netrc`,
//! `~/.ssh` or `~/.git-credentials`), no SSH agent, no prompts, no credential helpers, no
//! hooks, no redirects, and only the protocols the worker allows.

use std::path::Path;
use std::time::Duration;

use patchflow_core::{GitToken, Secret, TaskId, TaskSource};
use patchflow_platform::git_remote::GitRemote;
use patchflow_platform::{ObjectStore, archive};
use patchflow_workflows::io::FetchOutput;
use temporalio_sdk::activities::ActivityError;
use tokio::process::Command;

use crate::{ActivityConfig, bad_input, transient};

/// git's private HOME for a fetch, beside the tree in the task's work directory.
pub(crate) const GIT_HOME: &str = "git-home";

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
        TaskSource::Git {
            url,
            git_ref,
            git_token,
        } => {
            let token = match git_token {
                None => None,
                Some(GitToken::Sealed(sealed)) => {
                    Some(config.secrets.open(sealed, task).map_err(bad_input)?)
                }
                Some(GitToken::Plain(_)) => {
                    return Err(bad_input("the task's git_token was never sealed"));
                }
            };
            Some(git_fetch(config, url, git_ref.as_deref(), token.as_ref(), &tree).await?)
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
            let zip = zip_path.clone();
            let unpacked = tokio::task::spawn_blocking(move || {
                archive::unzip_safely(&zip, &tree2, limits.0, limits.1)
            })
            .await
            .map_err(transient)?;
            // The upload stays in the object store; this copy has served.
            let _ = tokio::fs::remove_file(&zip_path).await;
            unpacked.map_err(bad_input)?;
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
        worker_queue: None,
    })
}

fn is_local(url: &str) -> bool {
    url.starts_with("file://") || url.starts_with('/') || url.starts_with('.')
}

/// How git runs for one fetch (or push): the `-c` settings and the private HOME.
pub(crate) struct GitRun<'a> {
    pub(crate) url: &'a str,
    pub(crate) home: &'a Path,
    pub(crate) settings: Vec<String>,
    pub(crate) timeout: Duration,
    /// Most bytes the repository may take on disk while git downloads it.
    pub(crate) max_bytes: u64,
    /// The `Authorization` header git sends (from the task's git_token), through the
    /// environment's config (never the command line).
    pub(crate) auth_header: Option<Secret>,
    /// What the runs are, for error messages: `fetch` or `push`.
    pub(crate) verb: &'static str,
}

/// Why a git command failed, in words that name the URL (never a token), and whether
/// trying again could help.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GitFailure {
    pub(crate) message: String,
    pub(crate) permanent: bool,
}

impl GitFailure {
    fn transient(message: String) -> Self {
        Self {
            message,
            permanent: false,
        }
    }
}

impl From<GitFailure> for ActivityError {
    fn from(f: GitFailure) -> Self {
        if f.permanent {
            bad_input(f.message)
        } else {
            transient(f.message)
        }
    }
}

/// git by its full path, found once on the worker's PATH (else `git`, for the spawn's own
/// error). By name, under a cleared environment that sets PATH, the standard library starts
/// it with fork and exec instead of `posix_spawn`, and a fork copies the worker's whole
/// address space for each of a task's git runs.
fn git_program() -> &'static Path {
    static GIT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    GIT.get_or_init(|| {
        let path = std::env::var("PATH").ok();
        patchflow_agent::sandbox::find_program("git", path.as_deref())
            .unwrap_or_else(|| "git".into())
    })
}

impl GitRun<'_> {
    /// Runs one git command; returns stdout, or the classified error naming the URL.
    pub(crate) async fn git(&self, dir: &Path, args: &[&str]) -> Result<String, ActivityError> {
        self.exec(dir, args).await.map_err(ActivityError::from)
    }

    /// [`Self::git`], with the failure as words.
    pub(crate) async fn exec(&self, dir: &Path, args: &[&str]) -> Result<String, GitFailure> {
        let mut cmd = Command::new(git_program());
        cmd.arg("-C").arg(dir);
        for setting in &self.settings {
            cmd.arg("-c").arg(setting);
        }
        cmd.args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.home)
            .env("XDG_CONFIG_HOME", self.home)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "true")
            .env(
                "GIT_SSH_COMMAND",
                "ssh -F /dev/null -o BatchMode=yes -o IdentitiesOnly=yes -o StrictHostKeyChecking=accept-new",
            )
            .stdin(std::process::Stdio::null());
        if let Some(header) = &self.auth_header {
            cmd.env("GIT_CONFIG_COUNT", "1")
                .env("GIT_CONFIG_KEY_0", "http.extraHeader")
                .env("GIT_CONFIG_VALUE_0", header.expose());
        }
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let started = cmd
            .spawn()
            .map_err(|e| GitFailure::transient(format!("cannot run git: {e}")))?;
        let git_dir = dir.join(".git");
        let out = tokio::select! {
            out = tokio::time::timeout(self.timeout, started.wait_with_output()) => out
                .map_err(|_| GitFailure::transient(format!(
                    "git {} of {} did not finish in {} s (git_fetch_timeout_secs)",
                    args[0], self.url, self.timeout.as_secs()
                )))?
                .map_err(|e| GitFailure::transient(format!("cannot run git: {e}")))?,
            used = over_size(&git_dir, self.max_bytes) => return Err(GitFailure {
                message: format!(
                    "cannot {} {}: the download passed {} MiB (at {} MiB), more than max_unpacked_bytes allows; git was stopped",
                    self.verb, self.url, self.max_bytes >> 20, used >> 20
                ),
                permanent: true,
            }),
        };
        git_result(&out, self.url, self.verb)
    }
}

/// The `-c` settings every fetch runs with, and the local or remote ones on top.
fn git_settings(protocols: &[String], extra: Vec<String>) -> Vec<String> {
    let mut settings: Vec<String> = [
        "credential.helper=",
        "core.hooksPath=/dev/null",
        "core.askPass=",
        "http.followRedirects=false",
        "protocol.allow=never",
    ]
    .map(String::from)
    .into();
    settings.extend(
        protocols
            .iter()
            .map(|p| format!("protocol.{p}.allow=always")),
    );
    settings.extend(extra);
    settings
}

/// Resolves once `dir` takes more than `max` bytes on disk (checked every 250 ms; the
/// dropped git child is killed), with what it took; never otherwise.
async fn over_size(dir: &Path, max: u64) -> u64 {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let d = dir.to_path_buf();
        let used = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::MetadataExt;
            walkdir::WalkDir::new(d)
                .into_iter()
                .filter_map(Result::ok)
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum::<u64>()
        })
        .await
        .unwrap_or(0);
        if used > max {
            return used;
        }
    }
}

fn git_result(out: &std::process::Output, url: &str, verb: &str) -> Result<String, GitFailure> {
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
    let msg = format!("cannot {verb} {url}: {reason}");
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
        "not allowed",
        "denied",
        "rejected",
        "protected branch",
    ]
    .iter()
    .any(|p| reason.to_lowercase().contains(p));
    Err(GitFailure {
        message: msg,
        permanent,
    })
}

async fn git_fetch(
    config: &ActivityConfig,
    url: &str,
    git_ref: Option<&str>,
    token: Option<&Secret>,
    tree: &Path,
) -> Result<String, ActivityError> {
    let mut settings = remote_settings(config, url, token.is_some(), "fetch").await?;
    // The fetched objects stay one pack (three files) however few they are, not one loose
    // file and directory each: a small repository's tree is written, archived and deleted
    // per task, and every file of it is an inode to allocate and free.
    settings.push("fetch.unpackLimit=1".into());
    // The private HOME sits beside the tree, so a retry starts it afresh too.
    let home = tree.with_file_name(GIT_HOME);
    if home.exists() {
        tokio::fs::remove_dir_all(&home).await.map_err(transient)?;
    }
    tokio::fs::create_dir_all(&home).await.map_err(transient)?;
    let run = GitRun {
        url,
        home: &home,
        settings,
        timeout: config.git_fetch_timeout,
        max_bytes: config.max_unpacked_bytes,
        auth_header: token.map(patchflow_platform::secret_box::basic_auth_header),
        verb: "fetch",
    };
    // Three git processes per task: no template (its sample hooks are files to write and
    // delete again for every task), the URL fetched as it is (no remote to add), and the
    // commit read from FETCH_HEAD (no rev-parse).
    run.git(tree, &["init", "-q", "--template="]).await?;
    let target = git_ref.unwrap_or("HEAD");
    run.git(
        tree,
        &["fetch", "-q", "--depth", "1", "--no-tags", url, target],
    )
    .await?;
    run.git(tree, &["checkout", "-q", "--detach", "FETCH_HEAD"])
        .await?;
    let fetched = tokio::fs::read_to_string(tree.join(".git/FETCH_HEAD"))
        .await
        .unwrap_or_default();
    match fetched_commit(&fetched) {
        Some(commit) => Ok(commit.to_string()),
        None => run.git(tree, &["rev-parse", "HEAD"]).await,
    }
}

/// The commit a one-ref fetch brought, from FETCH_HEAD's first line (`<id>\t…`): 40 or 64
/// hex digits (SHA-1 or SHA-256 repositories), or nothing.
fn fetched_commit(fetch_head: &str) -> Option<&str> {
    let id = fetch_head.split_whitespace().next()?;
    (matches!(id.len(), 40 | 64) && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// The `git -c` settings a run against `url` needs, once the remote passed the worker's
/// checks (`git_allowed_protocols`, `git_allowed_hosts`, public addresses only, the
/// connection pinned); a local repository only with `allow_local_sources`. A token goes
/// over HTTP(S) only.
pub(crate) async fn remote_settings(
    config: &ActivityConfig,
    url: &str,
    with_token: bool,
    verb: &str,
) -> Result<Vec<String>, GitFailure> {
    let local = is_local(url);
    if with_token && !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(refused(format!(
            "cannot {verb} {url}: a token is sent over HTTP(S) only"
        )));
    }
    let settings = if local {
        if !config.allow_local_sources {
            return Err(refused(format!(
                "cannot {verb} {url}: local repositories are not allowed by this worker (allow_local_sources is off)"
            )));
        }
        // Local fetches by commit id need the "server" side to allow it.
        let file = ["file".to_string()];
        git_settings(&file, vec!["uploadpack.allowAnySHA1InWant=true".into()])
    } else {
        let checked = GitRemote::parse(url)
            .map_err(|e| refused(e.to_string()))?
            .check(&config.git_remotes)
            .await
            .map_err(|e| refused(format!("cannot {verb} {url}: {e}")))?;
        git_settings(&config.git_remotes.protocols, checked.git_config())
    };
    Ok(settings)
}

fn refused(message: String) -> GitFailure {
    GitFailure {
        message,
        permanent: true,
    }
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

#[cfg(test)]
mod tests {
    use super::fetched_commit;

    #[test]
    fn the_fetched_commit_is_read_from_fetch_head_or_not_at_all() {
        let sha1 = "4bf92f3577b34da6a3ce929d0e0e47364bf92f35";
        assert_eq!(
            fetched_commit(&format!("{sha1}\t\tbranch 'main' of https://x/r\n")),
            Some(sha1)
        );
        let sha256 = "a".repeat(64);
        assert_eq!(
            fetched_commit(&format!("{sha256}\tnot-for-merge\t'x'\n")),
            Some(sha256.as_str())
        );
        for bad in ["", "\n", "zzzz\t\tx", "4bf92f35\t\tshort", &"g".repeat(40)] {
            assert_eq!(fetched_commit(bad), None, "{bad}");
        }
    }
}
