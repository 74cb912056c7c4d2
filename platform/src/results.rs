//! A task's result files beyond the single run: choosing one of a best-of-N task's
//! candidates (the gateway's `select` and the workflow's `auto_select` both come here).

use patchflow_core::{AgentSummary, TaskId, layout};

use crate::{ObjectStore, TaskStore};

/// Makes candidate `n`'s results the task's: its files are copied to the task's own keys,
/// its summary becomes the task's, and it is recorded as selected. The gateway's `select`
/// and `auto_select` both come here.
pub async fn select_candidate(
    store: &dyn TaskStore,
    objects: &dyn ObjectStore,
    id: &TaskId,
    n: u32,
) -> Result<AgentSummary, String> {
    let from = layout::run_prefix(id, 1, Some(n));
    let bytes = objects
        .get_bytes(&format!("{from}{}", layout::SUMMARY))
        .await
        .map_err(|e| format!("candidate {n} has no summary: {e}"))?;
    let summary: AgentSummary = serde_json::from_slice(&bytes)
        .map_err(|e| format!("candidate {n}'s summary is unreadable: {e}"))?;
    crate::objectstore::copy_files(
        objects,
        &from,
        &layout::results_prefix(id),
        &layout::RUN_FILES,
    )
    .await
    .map_err(|e| format!("cannot copy candidate {n}'s results: {e}"))?;
    store
        .set_summary(id, &summary)
        .await
        .map_err(|e| e.to_string())?;
    store
        .set_selected(id, Some(n))
        .await
        .map_err(|e| e.to_string())?;
    Ok(summary)
}
