//! The task store on SQLite: the embedded default. WAL mode and a busy timeout let a
//! gateway and a worker in separate processes share one database file.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, TimeZone, Utc};
use patchflow_core::{
    AgentSummary, TaskEvent, TaskEventKind, TaskId, TaskRecord, TaskSpec, TaskStatus,
};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row, SqlitePool};

use super::{Inserted, ListFilter, StatusChange, StoreError, TaskStore};

pub struct SqliteTaskStore {
    pool: SqlitePool,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

const COLUMNS: &str = "task_id, tenant, idempotency_key, batch_id, status, message, spec, summary, pr_url, created_at, updated_at";

impl SqliteTaskStore {
    /// Opens (creating if needed) the database at `url` (`sqlite://PATH` or `sqlite::memory:`)
    /// and applies pending migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        if let Some(dir) = opts.get_filename().parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
        }
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(opts)
            .await?;
        Self::migrate(&pool).await?;
        Ok(Self { pool })
    }

    /// Applies migrations. Two processes starting at once may race on the first run; the
    /// loser sees the winner's tables and its retry finds nothing left to do.
    async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
        let mut attempt = 0;
        loop {
            match MIGRATOR.run(pool).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 5 => {
                    tracing::debug!(error = %e, "migration raced another process; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn insert_event(
        tx: &mut sqlx::SqliteConnection,
        task_id: &TaskId,
        kind: TaskEventKind,
        status: Option<TaskStatus>,
        message: &str,
        at: i64,
    ) -> Result<i64, StoreError> {
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO task_events (task_id, kind, status, message, at) VALUES (?, ?, ?, ?, ?) RETURNING seq",
        )
        .bind(task_id.as_str())
        .bind(kind.as_str())
        .bind(status.map(|s| s.as_str()))
        .bind(message)
        .bind(at)
        .fetch_one(&mut *tx)
        .await?;
        Ok(seq)
    }
}

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn time_of(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn corrupt(task: &str, reason: impl ToString) -> StoreError {
    StoreError::Corrupt {
        task: task.to_string(),
        reason: reason.to_string(),
    }
}

fn record_of(row: &SqliteRow) -> Result<TaskRecord, StoreError> {
    let id: String = row.try_get("task_id")?;
    let status: String = row.try_get("status")?;
    let spec: String = row.try_get("spec")?;
    let summary: Option<String> = row.try_get("summary")?;
    Ok(TaskRecord {
        task_id: id.parse().map_err(|e| corrupt(&id, e))?,
        status: status.parse().map_err(|e| corrupt(&id, e))?,
        message: row.try_get("message")?,
        created_at: time_of(row.try_get("created_at")?),
        updated_at: time_of(row.try_get("updated_at")?),
        pr_url: row.try_get("pr_url")?,
        summary: summary
            .map(|s| serde_json::from_str::<AgentSummary>(&s))
            .transpose()
            .map_err(|e| corrupt(&id, e))?,
        tenant: row.try_get("tenant")?,
        batch_id: row.try_get("batch_id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        spec: serde_json::from_str::<TaskSpec>(&spec).map_err(|e| corrupt(&id, e))?,
    })
}

#[async_trait]
impl TaskStore for SqliteTaskStore {
    async fn insert(&self, task_id: &TaskId, spec: &TaskSpec) -> Result<Inserted, StoreError> {
        let now = now_ms();
        let spec_json = serde_json::to_string(spec).map_err(|e| corrupt(task_id.as_str(), e))?;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "INSERT INTO tasks (task_id, tenant, idempotency_key, batch_id, status, message, spec, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(task_id.as_str())
        .bind(&spec.tenant)
        .bind(&spec.idempotency_key)
        .bind(&spec.batch_id)
        .bind(TaskStatus::Pending.as_str())
        .bind("submitted")
        .bind(&spec_json)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 1 {
            Self::insert_event(
                &mut tx,
                task_id,
                TaskEventKind::Status,
                Some(TaskStatus::Pending),
                "submitted",
                now,
            )
            .await?;
            tx.commit().await?;
            let rec = self
                .get(task_id)
                .await?
                .ok_or_else(|| StoreError::NotFound(task_id.clone()))?;
            return Ok(Inserted::Created(rec));
        }
        tx.rollback().await?;
        // Taken: by the same id, or by the same tenant + idempotency key.
        let existing = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM tasks WHERE task_id = ? OR (tenant = ? AND idempotency_key = ?) LIMIT 1"
        )))
        .bind(task_id.as_str())
        .bind(&spec.tenant)
        .bind(&spec.idempotency_key)
        .fetch_optional(&self.pool)
        .await?;
        match existing {
            Some(row) => Ok(Inserted::Existing(record_of(&row)?)),
            None => Err(StoreError::NotFound(task_id.clone())),
        }
    }

    async fn get(&self, task_id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM tasks WHERE task_id = ?"
        )))
        .bind(task_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(record_of).transpose()
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>, StoreError> {
        let mut sql = format!("SELECT {COLUMNS} FROM tasks WHERE 1 = 1");
        if filter.status.is_some() {
            sql.push_str(" AND status = ?");
        }
        if filter.tenant.is_some() {
            sql.push_str(" AND tenant = ?");
        }
        if filter.batch_id.is_some() {
            sql.push_str(" AND batch_id = ?");
        }
        if filter.cursor.is_some() {
            sql.push_str(" AND (created_at < ? OR (created_at = ? AND task_id < ?))");
        }
        sql.push_str(" ORDER BY created_at DESC, task_id DESC LIMIT ?");
        // Built from fixed fragments only; every value is a bind parameter.
        let mut q = sqlx::query(AssertSqlSafe(sql));
        if let Some(s) = filter.status {
            q = q.bind(s.as_str());
        }
        if let Some(t) = &filter.tenant {
            q = q.bind(t);
        }
        if let Some(b) = &filter.batch_id {
            q = q.bind(b);
        }
        if let Some(c) = &filter.cursor {
            q = q
                .bind(c.created_at_ms)
                .bind(c.created_at_ms)
                .bind(&c.task_id);
        }
        let rows = q
            .bind(i64::from(filter.limit.max(1)))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(record_of).collect()
    }

    async fn set_status(
        &self,
        task_id: &TaskId,
        status: TaskStatus,
        message: &str,
    ) -> Result<StatusChange, StoreError> {
        let allowed_from: Vec<&str> = TaskStatus::ALL
            .into_iter()
            .filter(|s| s.can_move_to(status))
            .map(|s| s.as_str())
            .collect();
        let placeholders = vec!["?"; allowed_from.len()].join(", ");
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let sql = format!(
            "UPDATE tasks SET status = ?, message = ?, updated_at = ? WHERE task_id = ? AND status IN ({placeholders})"
        );
        // Fixed fragments and `?` placeholders only.
        let mut q = sqlx::query(AssertSqlSafe(sql))
            .bind(status.as_str())
            .bind(message)
            .bind(now)
            .bind(task_id.as_str());
        for s in &allowed_from {
            q = q.bind(*s);
        }
        let done = q.execute(&mut *tx).await?;
        if done.rows_affected() == 0 {
            tx.rollback().await?;
            let current = self
                .get(task_id)
                .await?
                .ok_or_else(|| StoreError::NotFound(task_id.clone()))?
                .status;
            return Ok(StatusChange::Ignored { current });
        }
        Self::insert_event(
            &mut tx,
            task_id,
            TaskEventKind::Status,
            Some(status),
            message,
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(StatusChange::Applied)
    }

    async fn set_summary(
        &self,
        task_id: &TaskId,
        summary: &AgentSummary,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(summary).map_err(|e| corrupt(task_id.as_str(), e))?;
        let done = sqlx::query("UPDATE tasks SET summary = ?, updated_at = ? WHERE task_id = ?")
            .bind(json)
            .bind(now_ms())
            .bind(task_id.as_str())
            .execute(&self.pool)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(task_id.clone()));
        }
        Ok(())
    }

    async fn append_event(
        &self,
        task_id: &TaskId,
        kind: TaskEventKind,
        message: &str,
    ) -> Result<i64, StoreError> {
        let mut conn = self.pool.acquire().await?;
        Self::insert_event(&mut conn, task_id, kind, None, message, now_ms()).await
    }

    async fn events(
        &self,
        task_id: &TaskId,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<TaskEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, kind, status, message, at FROM task_events WHERE task_id = ? AND seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(task_id.as_str())
        .bind(after_seq)
        .bind(i64::from(limit.max(1)))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let kind: String = row.try_get("kind")?;
                let status: Option<String> = row.try_get("status")?;
                Ok(TaskEvent {
                    seq: row.try_get("seq")?,
                    kind: if kind == "status" {
                        TaskEventKind::Status
                    } else {
                        TaskEventKind::Agent
                    },
                    status: status
                        .map(|s| s.parse::<TaskStatus>())
                        .transpose()
                        .map_err(|e| corrupt(task_id.as_str(), e))?,
                    message: row.try_get("message")?,
                    at: time_of(row.try_get("at")?),
                })
            })
            .collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::{ListCursor, ListFilter};
    use patchflow_core::{TaskEventKind, TaskSource};

    fn spec(key: Option<&str>) -> TaskSpec {
        let mut s = TaskSpec::new(
            TaskSource::Git {
                url: "https://example.com/r.git".into(),
                git_ref: None,
            },
            "fix",
        );
        s.idempotency_key = key.map(str::to_string);
        s
    }

    async fn store(dir: &tempfile::TempDir) -> SqliteTaskStore {
        SqliteTaskStore::open(&format!("sqlite://{}", dir.path().join("t.db").display()))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn migrations_are_idempotent_and_safe_to_race() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("race.db").display());
        let (a, b) = tokio::join!(SqliteTaskStore::open(&url), SqliteTaskStore::open(&url));
        let (a, _b) = (a.unwrap(), b.unwrap());
        let id = TaskId::generate();
        a.insert(&id, &spec(None)).await.unwrap();
        // Opening again runs the migrator again: nothing to do, nothing lost.
        let again = SqliteTaskStore::open(&url).await.unwrap();
        assert!(again.get(&id).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn idempotency_key_returns_the_first_task() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir).await;
        let first = TaskId::generate();
        assert!(matches!(
            s.insert(&first, &spec(Some("k"))).await.unwrap(),
            Inserted::Created(_)
        ));
        let second = TaskId::generate();
        match s.insert(&second, &spec(Some("k"))).await.unwrap() {
            Inserted::Existing(r) => assert_eq!(r.task_id, first),
            other => panic!("expected the existing task, got {other:?}"),
        }
        assert!(s.get(&second).await.unwrap().is_none(), "no second record");
    }

    #[tokio::test]
    async fn status_moves_forward_only_and_every_move_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir).await;
        let id = TaskId::generate();
        s.insert(&id, &spec(None)).await.unwrap();
        assert_eq!(
            s.set_status(&id, TaskStatus::Queued, "q").await.unwrap(),
            StatusChange::Applied
        );
        assert_eq!(
            s.set_status(&id, TaskStatus::RunningAgent, "r")
                .await
                .unwrap(),
            StatusChange::Applied
        );
        // A late QUEUED write (out of order) changes nothing.
        assert_eq!(
            s.set_status(&id, TaskStatus::Queued, "late").await.unwrap(),
            StatusChange::Ignored {
                current: TaskStatus::RunningAgent
            }
        );
        s.append_event(&id, TaskEventKind::Agent, "step 1")
            .await
            .unwrap();
        assert_eq!(
            s.set_status(&id, TaskStatus::Completed, "done")
                .await
                .unwrap(),
            StatusChange::Applied
        );
        assert!(matches!(
            s.set_status(&id, TaskStatus::Failed, "x").await.unwrap(),
            StatusChange::Ignored { .. }
        ));
        let rec = s.get(&id).await.unwrap().unwrap();
        assert_eq!(
            (rec.status, rec.message.as_str()),
            (TaskStatus::Completed, "done")
        );
        let events = s.events(&id, 0, 100).await.unwrap();
        let kinds: Vec<String> = events
            .iter()
            .map(|e| {
                e.status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.message.clone())
            })
            .collect();
        assert_eq!(
            kinds,
            ["PENDING", "QUEUED", "RUNNING_AGENT", "step 1", "COMPLETED"]
        );
        assert!(
            events
                .windows(2)
                .all(|w| w[0].seq < w[1].seq && w[0].at <= w[1].at)
        );
        // Resuming after a sequence number returns only what follows.
        assert_eq!(s.events(&id, events[2].seq, 100).await.unwrap().len(), 2);
        assert!(matches!(
            s.set_status(&TaskId::generate(), TaskStatus::Queued, "x")
                .await,
            Err(StoreError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn list_pages_newest_first_with_filters() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(&dir).await;
        let mut ids = Vec::new();
        for _ in 0..5 {
            let id = TaskId::generate();
            s.insert(&id, &spec(None)).await.unwrap();
            ids.push(id);
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        s.set_status(&ids[1], TaskStatus::Failed, "x")
            .await
            .unwrap();
        let page1 = s
            .list(&ListFilter {
                limit: 2,
                ..ListFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(
            page1.iter().map(|r| &r.task_id).collect::<Vec<_>>(),
            [&ids[4], &ids[3]]
        );
        let cursor = ListCursor::decode(&ListCursor::of(&page1[1]).encode()).unwrap();
        let page2 = s
            .list(&ListFilter {
                limit: 10,
                cursor: Some(cursor),
                ..ListFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(
            page2.iter().map(|r| &r.task_id).collect::<Vec<_>>(),
            [&ids[2], &ids[1], &ids[0]]
        );
        let failed = s
            .list(&ListFilter {
                limit: 10,
                status: Some(TaskStatus::Failed),
                ..ListFilter::default()
            })
            .await
            .unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].task_id, ids[1]);
    }
}
