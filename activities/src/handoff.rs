//! The staged code, kept on the worker that staged it for a local agent that runs there.
//!
//! `stage_code` uploads the archive of the fetched tree, then (with the local runner) keeps
//! the tree and the archive under `<work>/<task>/staged/` with a token it returns; a local
//! agent run on the same worker whose input names that token takes the tree as its
//! workspace and the archive as its baseline, instead of downloading the archive again and
//! unpacking it. The object store's copy stays the one that counts: a run on another
//! worker, a retry, a follow-up, a candidate that finds the copy taken, a token that does
//! not match (the code was staged again since), or a copy older than [`TTL`] restore from
//! it. The copies a worker holds are bounded ([`MAX_HELD_BYTES`]): past that, stage keeps
//! none, so tasks queued behind busy agents do not fill the disk.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// The kept copy's directory in a task's work directory.
const DIR: &str = "staged";
/// In it: the token and the bytes it holds (`<token> <bytes>`).
const TOKEN: &str = "token";
const TREE: &str = "tree";
const ARCHIVE: &str = "code.tar.zst";

/// How long an unclaimed copy is kept: a run that starts later restores from the store.
pub const TTL: Duration = Duration::from_secs(15 * 60);
/// Most bytes of kept copies on one worker.
pub const MAX_HELD_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// Bytes of the copies this process keeps now.
static HELD: AtomicU64 = AtomicU64::new(0);

/// What a run takes over: the tree (its workspace) and the archive (its baseline), in the
/// run's directory; the caller moves them and removes [`Taken::dir`].
#[derive(Debug)]
pub struct Taken {
    pub tree: PathBuf,
    pub archive: PathBuf,
}

impl Taken {
    /// The claimed copy's directory (empty once both are moved).
    pub fn dir(&self) -> &Path {
        self.tree.parent().unwrap_or(&self.tree)
    }
}

/// Keeps `tree` and `archive` (which together take `bytes`) under `task_dir` and returns
/// the token a run names to take them, or `None` when the worker holds too much already
/// (nothing moved) or the move fails (what moved is removed: the caller's next step is to
/// remove both anyway).
pub fn keep(task_dir: &Path, tree: &Path, archive: &Path, bytes: u64) -> Option<String> {
    let held = HELD.fetch_add(bytes, Ordering::Relaxed) + bytes;
    if held > MAX_HELD_BYTES {
        release(bytes);
        return None;
    }
    let token = uuid::Uuid::now_v7().simple().to_string();
    // Assembled beside and published with one rename, so a run never sees half of it.
    let building = task_dir.join(format!("{DIR}.{token}"));
    let kept = (|| -> std::io::Result<()> {
        std::fs::create_dir(&building)?;
        std::fs::rename(tree, building.join(TREE))?;
        std::fs::rename(archive, building.join(ARCHIVE))?;
        std::fs::write(building.join(TOKEN), format!("{token} {bytes}"))?;
        let dest = task_dir.join(DIR);
        if dest.exists() {
            // An earlier stage's copy of this task: this one replaces it.
            forget(&dest);
        }
        std::fs::rename(&building, dest)
    })();
    match kept {
        Ok(()) => Some(token),
        Err(e) => {
            tracing::debug!(error = %e, "cannot keep the staged code for a local run");
            let _ = std::fs::remove_dir_all(&building);
            release(bytes);
            None
        }
    }
}

/// Takes the copy under `task_dir` into `run_dir` when its token is `token`: the caller
/// then owns the returned paths. `None` when there is none, another run took it first, or
/// it is another stage's (which is removed).
pub fn take(task_dir: &Path, token: &str, run_dir: &Path) -> Option<Taken> {
    let claimed = run_dir.join(DIR);
    // The claim is one rename: of two candidates racing for it, one gets it.
    std::fs::rename(task_dir.join(DIR), &claimed).ok()?;
    let (found, bytes) = read_token(&claimed);
    release(bytes);
    if found.as_deref() != Some(token) {
        let _ = std::fs::remove_dir_all(&claimed);
        return None;
    }
    Some(Taken {
        tree: claimed.join(TREE),
        archive: claimed.join(ARCHIVE),
    })
}

/// Removes the copies under `work_root` older than `ttl`; returns how many.
pub fn sweep(work_root: &Path, ttl: Duration) -> usize {
    let Ok(tasks) = std::fs::read_dir(work_root) else {
        return 0;
    };
    let mut removed = 0;
    for task in tasks.flatten() {
        let dir = task.path().join(DIR);
        let old = std::fs::metadata(&dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= ttl);
        if old {
            forget(&dir);
            // The task's directory too, when nothing else is in it.
            let _ = std::fs::remove_dir(task.path());
            removed += 1;
        }
    }
    removed
}

/// Sweeps `work_root` every minute while it lives ([`sweep`] with [`TTL`]).
pub struct Sweeper(tokio::task::JoinHandle<()>);

impl Sweeper {
    pub fn start(work_root: PathBuf) -> Self {
        Self(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let root = work_root.clone();
                let removed = tokio::task::spawn_blocking(move || sweep(&root, TTL))
                    .await
                    .unwrap_or(0);
                if removed > 0 {
                    tracing::debug!(removed, "swept staged code no local run took");
                }
            }
        }))
    }
}

impl Drop for Sweeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Bytes of kept copies this process holds now.
pub fn held_bytes() -> u64 {
    HELD.load(Ordering::Relaxed)
}

fn forget(dir: &Path) {
    let (_, bytes) = read_token(dir);
    let _ = std::fs::remove_dir_all(dir);
    release(bytes);
}

fn release(bytes: u64) {
    let _ = HELD.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
        Some(h.saturating_sub(bytes))
    });
}

fn read_token(dir: &Path) -> (Option<String>, u64) {
    let text = std::fs::read_to_string(dir.join(TOKEN)).unwrap_or_default();
    let mut parts = text.split_whitespace();
    let token = parts.next().map(str::to_string);
    let bytes = parts.next().and_then(|b| b.parse().ok()).unwrap_or(0);
    (token, bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn staged(dir: &Path) -> (PathBuf, PathBuf) {
        let tree = dir.join("tree");
        std::fs::create_dir_all(tree.join("src")).unwrap();
        std::fs::write(tree.join("src/a.py"), "x = 1\n").unwrap();
        let archive = dir.join("code.tar.zst");
        std::fs::write(&archive, b"archive").unwrap();
        (tree, archive)
    }

    // One test: HELD is process-wide, so these steps must not interleave with another's.
    #[test]
    fn a_kept_copy_goes_to_the_run_that_names_its_token_once_and_is_bounded() {
        let work = tempfile::tempdir().unwrap();
        let task = work.path().join("task-1");
        std::fs::create_dir_all(&task).unwrap();
        let before = held_bytes();

        let (tree, archive) = staged(&task);
        let token = keep(&task, &tree, &archive, 100).unwrap();
        assert!(!tree.exists() && !archive.exists(), "moved, not copied");
        assert_eq!(held_bytes(), before + 100);

        // A run naming another token (the code was staged again elsewhere) gets nothing,
        // and the stale copy is gone.
        let run = task.join("run-1");
        std::fs::create_dir_all(&run).unwrap();
        assert!(take(&task, "not-the-token", &run).is_none());
        assert!(!task.join(DIR).exists());
        assert_eq!(held_bytes(), before);

        // The run that names it gets the tree and the archive; a second run gets nothing.
        let (tree, archive) = staged(&task);
        let token2 = keep(&task, &tree, &archive, 100).unwrap();
        assert_ne!(token, token2);
        let taken = take(&task, &token2, &run).unwrap();
        assert_eq!(
            std::fs::read_to_string(taken.tree.join("src/a.py")).unwrap(),
            "x = 1\n"
        );
        assert_eq!(std::fs::read(&taken.archive).unwrap(), b"archive");
        let run2 = task.join("run-2");
        std::fs::create_dir_all(&run2).unwrap();
        assert!(take(&task, &token2, &run2).is_none());
        assert_eq!(held_bytes(), before);

        // Past the bound nothing is kept and nothing moves.
        let (tree, archive) = staged(&task);
        assert!(keep(&task, &tree, &archive, MAX_HELD_BYTES + 1).is_none());
        assert!(tree.exists() && archive.exists());
        assert_eq!(held_bytes(), before);

        // A copy nobody takes is swept once it is old, with its task directory when that
        // is empty; a fresh one is left.
        let lone = work.path().join("task-2");
        std::fs::create_dir_all(&lone).unwrap();
        let (t, a) = staged(&lone);
        keep(&lone, &t, &a, 10).unwrap();
        assert_eq!(sweep(work.path(), TTL), 0);
        assert!(lone.join(DIR).exists());
        assert_eq!(sweep(work.path(), Duration::ZERO), 1);
        assert!(!lone.exists());
        assert_eq!(held_bytes(), before);
    }
}
