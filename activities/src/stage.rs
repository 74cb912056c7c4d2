//! `stage_code`: the fetched tree as `staged/<task>/code.tar.zst`, and the inverse the
//! runner uses to restore it into a fresh workspace.

use std::path::Path;

use patchflow_core::{TaskId, layout};
use patchflow_platform::ObjectStore;
use patchflow_workflows::io::{StageInput, StageOutput};
use temporalio_sdk::activities::ActivityError;

use crate::{ActivityConfig, fetch, transient};

/// zstd level: fast to write, a good ratio on source code.
const ZSTD_LEVEL: i32 = 3;

pub async fn stage(
    config: &ActivityConfig,
    objects: &dyn ObjectStore,
    task: &TaskId,
    input: &StageInput,
) -> Result<StageOutput, ActivityError> {
    let mut tree = std::path::PathBuf::from(&input.tree_dir);
    if !tree.is_dir() {
        // fetch_code ran on another worker; fetch again here rather than fail.
        tracing::info!(task_id = %task, "fetched tree not on this worker; fetching again");
        let again = fetch::fetch(config, objects, task, &input.source).await?;
        tree = again.tree_dir.into();
    }
    let archive = config.work_dir(task).join("code.tar.zst");
    let (t, a) = (tree.clone(), archive.clone());
    let files = tokio::task::spawn_blocking(move || pack(&t, &a))
        .await
        .map_err(transient)?
        .map_err(|e| transient(format!("cannot pack the code: {e}")))?;
    let key = layout::staged_key(task);
    let archive_bytes = objects.put_file(&key, &archive).await.map_err(transient)?;
    // The staged archive is the copy that matters now; free the worker's disk.
    let _ = tokio::fs::remove_file(&archive).await;
    let _ = tokio::fs::remove_dir_all(&tree).await;
    Ok(StageOutput {
        key,
        archive_bytes,
        files,
    })
}

/// Writes `dir` as a tar.zst at `out`; returns the number of files. Symlinks are stored as
/// links, never followed.
pub fn pack(dir: &Path, out: &Path) -> std::io::Result<u64> {
    let file = std::fs::File::create(out)?;
    let encoder = zstd::stream::write::Encoder::new(file, ZSTD_LEVEL)?;
    let mut builder = tar::Builder::new(encoder);
    builder.follow_symlinks(false);
    let mut files = 0u64;
    for entry in walkdir::WalkDir::new(dir).min_depth(1).sort_by_file_name() {
        let entry = entry.map_err(std::io::Error::other)?;
        let rel = entry.path().strip_prefix(dir).map_err(std::io::Error::other)?;
        builder.append_path_with_name(entry.path(), rel)?;
        if entry.file_type().is_file() {
            files += 1;
        }
    }
    builder.into_inner()?.finish()?;
    Ok(files)
}

/// Restores a tar.zst into `dest`. The tar crate refuses entries that would land outside
/// `dest`.
pub fn unpack(archive: &Path, dest: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dest)?;
    let file = std::fs::File::open(archive)?;
    let decoder = zstd::stream::read::Decoder::new(file)?;
    let mut tar = tar::Archive::new(decoder);
    tar.set_preserve_permissions(true);
    tar.set_overwrite(true);
    tar.unpack(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_and_unpack_round_trip() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(src.path().join("a/b")).unwrap();
        std::fs::write(src.path().join("a/b/c.txt"), "deep").unwrap();
        std::fs::write(src.path().join("top.py"), "top").unwrap();
        std::os::unix::fs::symlink("top.py", src.path().join("link")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let arc = out.path().join("x.tar.zst");
        assert_eq!(pack(src.path(), &arc).unwrap(), 2);
        let dest = out.path().join("restored");
        unpack(&arc, &dest).unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("a/b/c.txt")).unwrap(), "deep");
        assert_eq!(std::fs::read_link(dest.join("link")).unwrap(), Path::new("top.py"));
    }
}
