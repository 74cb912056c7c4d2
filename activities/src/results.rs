//! The results topic: one message per finished task (COMPLETED, FAILED, CANCELLED), keyed
//! by task id, produced once the final status is stored.
//!
//! Why after the store: a consumer of the topic that looks the task up must find it
//! finished. Why wait for the delivery report: the activity (and so the workflow) does not
//! end until the broker has the message. Once the broker has it, the task store records so
//! (`result_sent`, `<attempt>/<turn>/<status>`), and a step that runs again for the same end
//! sends nothing; a crash between the broker's answer and that write repeats the message
//! with the same key, which consumers dedupe. The message is built from the stored record,
//! so a repeat says the same thing.

use std::time::Duration;

use patchflow_core::{TaskId, layout};
use patchflow_platform::bus::{Producer, RESULT_SCHEMA, ResultMessage, ResultObject};
use patchflow_platform::{ObjectStore, TaskStore};

/// Where result messages go.
#[derive(Clone)]
pub struct ResultsTopic {
    pub producer: Producer,
    pub topic: String,
    /// Lifetime of the presigned URLs in the message (S3 and COS stores).
    pub presign_expiry: Duration,
}

/// Names the result files go by in a message.
const FILES: [(&str, &str); 4] = [
    ("diff", layout::DIFF),
    ("transcript", layout::TRANSCRIPT),
    ("log", layout::AGENT_LOG),
    ("summary", layout::SUMMARY),
];

impl ResultsTopic {
    /// Produces the task's result message if the stored task has finished; `Ok(false)` if
    /// it has not (nothing to say yet).
    pub async fn publish(
        &self,
        store: &dyn TaskStore,
        objects: &dyn ObjectStore,
        task: &TaskId,
    ) -> Result<bool, String> {
        let record = store
            .get(task)
            .await
            .map_err(|e| format!("task store: {e}"))?
            .ok_or_else(|| format!("task {task} is not in the task store"))?;
        if !record.status.is_terminal() {
            return Ok(false);
        }
        // One message per end of the task: a step that runs again for the same end (a
        // local activity re-run on another worker after its first worker died) finds the
        // message sent already. Only a crash between the broker's answer and the marker's
        // write below repeats it.
        let marker = format!(
            "{}/{}/{}",
            record.attempt,
            record.turns.last().map_or(1, |t| t.turn),
            record.status
        );
        let sent = store
            .result_sent(task)
            .await
            .map_err(|e| format!("task store: {e}"))?;
        if sent.as_deref() == Some(marker.as_str()) {
            return Ok(true);
        }
        let stored = objects
            .list(&layout::results_prefix(task))
            .await
            .map_err(|e| format!("object store: {e}"))?;
        let mut files = std::collections::BTreeMap::new();
        for (name, file) in FILES {
            let key = layout::result_key(task, file);
            if !stored.iter().any(|o| o.key == key) {
                continue;
            }
            let url = objects
                .presigned_get(&key, self.presign_expiry)
                .await
                .map_err(|e| format!("object store: {e}"))?;
            files.insert(name.to_string(), ResultObject { key, url });
        }
        let message = ResultMessage {
            schema: RESULT_SCHEMA.to_string(),
            task_id: task.to_string(),
            status: record.status.to_string(),
            message: record.message.clone(),
            summary: record.summary.as_ref().map(|s| s.summary.clone()),
            total_tokens: record.summary.as_ref().map(|s| s.total_tokens),
            cached_tokens: record.summary.as_ref().map(|s| s.cached_tokens),
            reasoning_tokens: record.summary.as_ref().map(|s| s.reasoning_tokens),
            cost_usd: record.summary.as_ref().map(|s| s.cost_usd),
            batch_id: record.batch_id.clone(),
            idempotency_key: record.idempotency_key.clone(),
            tenant: record.tenant.clone(),
            pr_url: record.pr_url.clone(),
            pr_error: record.pr_error.clone(),
            objects: files,
            finished_at: record.updated_at,
        };
        let payload = serde_json::to_vec(&message).map_err(|e| e.to_string())?;
        let d = self
            .producer
            .send(
                &self.topic,
                task.as_str().as_bytes(),
                &payload,
                &[("patchflow.schema", RESULT_SCHEMA.as_bytes())],
            )
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(task_id = %task, status = %record.status, partition = d.partition, offset = d.offset, "result message delivered");
        if let Err(e) = store.set_result_sent(task, &marker).await {
            // The message is out; at worst a re-run sends it again (consumers dedupe by key).
            tracing::warn!(task_id = %task, error = %e, "cannot record that the result message was sent");
        }
        Ok(true)
    }
}
