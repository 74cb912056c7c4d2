//! The one way to change a task's status: store it, then, only if the store took the write,
//! tell live readers (the event on the task's stream) and drop the cached record.
//!
//! The task store decides whether a move is allowed (the state machine, the attempt a run
//! belongs to); a write it ignores changed nothing, so there is nothing to announce and the
//! cached record is still right. The store is the source of truth: once it has the write,
//! a cache that does not answer only delays readers, so cache trouble is handed to the
//! caller to log and never fails the change.

use patchflow_core::{TaskEvent, TaskEventKind, TaskId, TaskStatus};

use crate::cache::{CacheError, Hot};
use crate::db::{StatusChange, StoreError, TaskStore};

/// A status to write.
#[derive(Debug, Clone, Copy)]
pub struct StatusWrite<'a> {
    pub task: &'a TaskId,
    /// The Temporal run that writes it, which places the write among the task's attempts
    /// (see [`TaskStore::set_run_status`]); `None` for the current attempt.
    pub run_id: Option<&'a str>,
    pub status: TaskStatus,
    pub message: &'a str,
}

/// Which cache service failed after the store took a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheDuty {
    /// Publishing the event on the task's live stream.
    LiveEvents,
    /// Dropping the cached task record.
    StatusCache,
}

impl CacheDuty {
    /// How the gateway names the service in its cache warnings.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::LiveEvents => "live events",
            Self::StatusCache => "status cache",
        }
    }
}

/// Writes `write` to the store and, if it was applied, publishes its event and invalidates
/// the cached record. `on_cache_trouble` hears each cache failure (the change stands).
pub async fn change_status(
    store: &dyn TaskStore,
    hot: &Hot,
    write: StatusWrite<'_>,
    on_cache_trouble: &(dyn Fn(CacheDuty, &CacheError) + Send + Sync),
) -> Result<StatusChange, StoreError> {
    let change = match write.run_id {
        Some(run) => {
            store
                .set_run_status(write.task, run, write.status, write.message)
                .await?
        }
        None => {
            store
                .set_status(write.task, write.status, write.message)
                .await?
        }
    };
    if let StatusChange::Applied { seq } = change {
        if write.status.is_terminal() {
            let m = crate::metrics::global();
            // The tenant costs a read, made only when tenants are labels.
            let tenant = if m.tenant_labels() {
                store.get(write.task).await.ok().flatten().map(|r| r.tenant)
            } else {
                None
            };
            m.finished(write.status.as_str(), tenant.as_deref());
        }
        let event = TaskEvent {
            seq,
            kind: TaskEventKind::Status,
            status: Some(write.status),
            message: write.message.to_string(),
            at: chrono::Utc::now(),
        };
        if let Err(e) = hot.events.publish(write.task, &event).await {
            on_cache_trouble(CacheDuty::LiveEvents, &e);
        }
        if let Err(e) = hot.status.invalidate(write.task).await {
            on_cache_trouble(CacheDuty::StatusCache, &e);
        }
    }
    Ok(change)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::sync::Mutex;
    use std::time::Duration;

    use futures::StreamExt;
    use patchflow_core::{TaskSource, TaskSpec};

    use super::*;
    use crate::cache::HotOptions;
    use crate::db::SqliteTaskStore;

    fn spec() -> TaskSpec {
        TaskSpec::new(
            TaskSource::Git {
                url: "https://example.com/r.git".into(),
                git_ref: None,
                git_token: None,
            },
            "fix it",
        )
    }

    fn quiet(_: CacheDuty, e: &CacheError) {
        panic!("the in-process cache failed: {e}");
    }

    /// The status events on the task's live stream, waiting briefly for each.
    async fn live_statuses(hot: &Hot, task: &TaskId) -> Vec<(TaskStatus, String)> {
        let mut stream = hot.events.subscribe(task, 0).await.unwrap();
        let mut seen = Vec::new();
        while let Ok(Some(ev)) =
            tokio::time::timeout(Duration::from_millis(200), stream.next()).await
        {
            let ev = ev.unwrap();
            seen.push((ev.status.unwrap(), ev.message));
        }
        seen
    }

    #[tokio::test]
    async fn an_applied_write_is_announced_and_an_ignored_one_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("tasks.db").display());
        let store = SqliteTaskStore::open(&url).await.unwrap();
        let hot = Hot::in_process(&HotOptions::default());
        let task = TaskId::generate();
        store.insert(&task, &spec()).await.unwrap();

        let write = |status, message| StatusWrite {
            task: &task,
            run_id: None,
            status,
            message,
        };
        let queued = write(TaskStatus::Queued, "waiting for a worker");
        let change = change_status(&store, &hot, queued, &quiet).await.unwrap();
        assert!(matches!(change, StatusChange::Applied { .. }), "{change:?}");

        // A reader caches the record it reads after the move.
        let record = store.get(&task).await.unwrap().unwrap();
        hot.status
            .put(&record, Duration::from_secs(60))
            .await
            .unwrap();

        // Back to PENDING is not a move the state machine allows: the store ignores it, so
        // nothing is published and the cached record (still right) stays.
        let backwards = write(TaskStatus::Pending, "should not land");
        let change = change_status(&store, &hot, backwards, &quiet)
            .await
            .unwrap();
        assert_eq!(
            change,
            StatusChange::Ignored {
                current: TaskStatus::Queued
            }
        );
        let cached = hot.status.get(&task).await.unwrap();
        assert_eq!(cached.map(|r| r.status), Some(TaskStatus::Queued));
        assert_eq!(
            live_statuses(&hot, &task).await,
            [(TaskStatus::Queued, "waiting for a worker".to_string())]
        );

        // The next move is applied: announced, and the cached record dropped.
        let downloading = write(TaskStatus::DownloadingCode, "fetching");
        change_status(&store, &hot, downloading, &quiet)
            .await
            .unwrap();
        assert!(hot.status.get(&task).await.unwrap().is_none());
        let statuses: Vec<TaskStatus> = live_statuses(&hot, &task)
            .await
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(statuses, [TaskStatus::Queued, TaskStatus::DownloadingCode]);
    }

    #[tokio::test]
    async fn a_write_for_an_unknown_task_fails_and_announces_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("tasks.db").display());
        let store = SqliteTaskStore::open(&url).await.unwrap();
        let hot = Hot::in_process(&HotOptions::default());
        let task = TaskId::generate();
        let troubles = Mutex::new(Vec::new());
        let record_trouble = |duty: CacheDuty, _: &CacheError| troubles.lock().unwrap().push(duty);
        let write = StatusWrite {
            task: &task,
            run_id: Some("run-1"),
            status: TaskStatus::Failed,
            message: "no such task",
        };
        let err = change_status(&store, &hot, write, &record_trouble)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NotFound(_)), "{err}");
        assert!(live_statuses(&hot, &task).await.is_empty());
        assert!(troubles.lock().unwrap().is_empty());
    }
}
