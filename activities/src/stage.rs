//! `stage_code`: the fetched tree as `staged/<task>/code.tar.zst`.

use patchflow_core::{TaskId, layout};
use patchflow_platform::{ObjectStore, archive};
use patchflow_workflows::io::{StageInput, StageOutput};
use temporalio_sdk::activities::ActivityError;

use crate::{ActivityConfig, fetch, handoff, transient};

/// zstd level: fast to write, a good ratio on source code.
const ZSTD_LEVEL: i32 = 3;

/// With `keep_local` (the agent runs on this worker's machine), the tree and the archive are
/// kept for it ([`handoff`]) rather than deleted.
pub async fn stage(
    config: &ActivityConfig,
    objects: &dyn ObjectStore,
    task: &TaskId,
    input: &StageInput,
    keep_local: bool,
) -> Result<StageOutput, ActivityError> {
    let mut tree = std::path::PathBuf::from(&input.tree_dir);
    if !tree.is_dir() {
        // fetch_code ran on another worker; fetch again here rather than fail.
        tracing::info!(task_id = %task, "fetched tree not on this worker; fetching again");
        let again = fetch::fetch(config, objects, task, &input.source).await?;
        tree = again.tree_dir.into();
    }
    let repo_setup = config.environments.config.environments.repo_setup_scripts
        && tree
            .join(patchflow_core::environment::REPO_SETUP_SCRIPT)
            .is_file();
    let archive = config.work_dir(task).join("code.tar.zst");
    let (t, a) = (tree.clone(), archive.clone());
    let files = tokio::task::spawn_blocking(move || archive::pack_tar_zst(&t, &a, ZSTD_LEVEL))
        .await
        .map_err(transient)?
        .map_err(|e| transient(format!("cannot pack the code: {e}")))?;
    let key = layout::staged_key(task);
    let archive_bytes = objects.put_file(&key, &archive).await.map_err(transient)?;
    let task_dir = config.work_dir(task);
    // git's private HOME served the fetch only.
    let _ = tokio::fs::remove_dir_all(task_dir.join(fetch::GIT_HOME)).await;
    // The staged archive is the copy that matters now: the tree and the archive stay only
    // for a local agent (which may run here), else they free the worker's disk.
    let handoff = if keep_local {
        let held = input.tree_bytes + archive_bytes;
        let (d, t, a) = (task_dir.clone(), tree.clone(), archive.clone());
        tokio::task::spawn_blocking(move || handoff::keep(&d, &t, &a, held))
            .await
            .ok()
            .flatten()
    } else {
        None
    };
    if handoff.is_none() {
        let _ = tokio::fs::remove_file(&archive).await;
        let _ = tokio::fs::remove_dir_all(&tree).await;
    }
    Ok(StageOutput {
        key,
        archive_bytes,
        files,
        repo_setup,
        handoff,
    })
}
