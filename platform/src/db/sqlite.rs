//! The task store on SQLite: the embedded default. WAL mode and a busy timeout let a
//! gateway and a worker in separate processes share one database file.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use patchflow_core::{
    AgentSummary, TaskEvent, TaskEventKind, TaskId, TaskRecord, TaskSpec, TaskStatus,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, SqlitePool};

use super::attempts::{self, Current, Plan};
use super::rows::{
    ATTEMPT_COLUMNS, COLUMNS, attach_attempts, attempt_of, corrupt, event_of, now_ms, record_of,
};
use super::{Inserted, ListFilter, StatusChange, StoreError, TaskStore};

pub struct SqliteTaskStore {
    pool: SqlitePool,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

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
        // Switching a new file to WAL needs an exclusive lock that SQLite does not wait for
        // (the busy timeout does not apply), so processes opening one new database at once
        // can see "database is locked": retry the whole open a few times.
        let mut attempt = 0u64;
        loop {
            let opened = async {
                let pool = SqlitePoolOptions::new()
                    .max_connections(8)
                    .connect_with(opts.clone())
                    .await?;
                Self::migrate(&pool).await?;
                Ok::<_, StoreError>(pool)
            }
            .await;
            match opened {
                Ok(pool) => return Ok(Self { pool }),
                Err(e) if attempt < 10 && is_locked(&e) => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "SQLite busy while opening; retrying");
                    tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
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

    /// Fills in the attempts of records read from `tasks`.
    async fn with_attempts(&self, records: &mut [TaskRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let placeholders = vec!["?"; records.len()].join(", ");
        // Fixed fragments and `?` placeholders only.
        let mut q = sqlx::query(AssertSqlSafe(format!(
            "SELECT {ATTEMPT_COLUMNS} FROM task_attempts WHERE task_id IN ({placeholders}) ORDER BY task_id, attempt"
        )));
        for r in records.iter() {
            q = q.bind(r.task_id.as_str());
        }
        let rows = q.fetch_all(&self.pool).await?;
        let attempts = rows.iter().map(attempt_of).collect::<Result<Vec<_>, _>>()?;
        attach_attempts(records, attempts);
        Ok(())
    }

    /// One status write, placed among the task's attempts (see [`attempts::plan`]). The
    /// transaction takes SQLite's write lock first (BEGIN IMMEDIATE), so the read that
    /// decides and the writes that follow see no other writer in between.
    async fn write_status(
        &self,
        task_id: &TaskId,
        run: Option<&str>,
        status: TaskStatus,
        message: &str,
    ) -> Result<StatusChange, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT status, attempt FROM tasks WHERE task_id = ?")
                .bind(task_id.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let Some((current, attempt)) = row else {
            return Err(StoreError::NotFound(task_id.clone()));
        };
        let current: TaskStatus = current.parse().map_err(|e| corrupt(task_id.as_str(), e))?;
        let attempt = u32::try_from(attempt).unwrap_or(1);
        let runs: Vec<(i64, Option<String>)> =
            sqlx::query_as("SELECT attempt, run_id FROM task_attempts WHERE task_id = ?")
                .bind(task_id.as_str())
                .fetch_all(&mut *tx)
                .await?;
        let runs: Vec<(u32, Option<String>)> = runs
            .into_iter()
            .map(|(n, r)| (u32::try_from(n).unwrap_or(1), r))
            .collect();
        let finished = status.is_terminal().then_some(now);
        match attempts::plan(
            &Current {
                status: current,
                attempt,
                runs: &runs,
            },
            run,
            status,
        ) {
            Plan::Ignore => {
                tx.rollback().await?;
                return Ok(StatusChange::Ignored { current });
            }
            Plan::Same { adopt_run } => {
                sqlx::query(
                    "UPDATE tasks SET status = ?, message = ?, updated_at = ? WHERE task_id = ?",
                )
                .bind(status.as_str())
                .bind(message)
                .bind(now)
                .bind(task_id.as_str())
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE task_attempts SET status = ?, message = ?, finished_at = ?, run_id = COALESCE(run_id, ?) WHERE task_id = ? AND attempt = ?",
                )
                .bind(status.as_str())
                .bind(message)
                .bind(finished)
                .bind(if adopt_run { run } else { None })
                .bind(task_id.as_str())
                .bind(i64::from(attempt))
                .execute(&mut *tx)
                .await?;
            }
            Plan::New {
                number,
                close_previous,
            } => {
                if close_previous {
                    sqlx::query(
                        "UPDATE task_attempts SET status = ?, message = ?, finished_at = ? WHERE task_id = ? AND attempt = ?",
                    )
                    .bind(TaskStatus::Cancelled.as_str())
                    .bind(attempts::replaced_message(number))
                    .bind(now)
                    .bind(task_id.as_str())
                    .bind(i64::from(attempt))
                    .execute(&mut *tx)
                    .await?;
                }
                sqlx::query(
                    "INSERT INTO task_attempts (task_id, attempt, run_id, status, message, started_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(task_id.as_str())
                .bind(i64::from(number))
                .bind(run)
                .bind(status.as_str())
                .bind(message)
                .bind(now)
                .bind(finished)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE tasks SET status = ?, message = ?, updated_at = ?, attempt = ? WHERE task_id = ?",
                )
                .bind(status.as_str())
                .bind(message)
                .bind(now)
                .bind(i64::from(number))
                .bind(task_id.as_str())
                .execute(&mut *tx)
                .await?;
            }
        }
        let seq = Self::insert_event(
            &mut tx,
            task_id,
            TaskEventKind::Status,
            Some(status),
            message,
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(StatusChange::Applied { seq })
    }
}

/// Whether an error is SQLite's "database is locked" / "busy".
fn is_locked(e: &StoreError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("database is locked") || text.contains("busy")
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
            sqlx::query(
                "INSERT INTO task_attempts (task_id, attempt, status, message, started_at) VALUES (?, 1, ?, ?, ?)",
            )
            .bind(task_id.as_str())
            .bind(TaskStatus::Pending.as_str())
            .bind("submitted")
            .bind(now)
            .execute(&mut *tx)
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
        let Some(row) = row else { return Ok(None) };
        let mut records = [record_of(&row)?];
        self.with_attempts(&mut records).await?;
        let [record] = records;
        Ok(Some(record))
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
        let mut records = rows.iter().map(record_of).collect::<Result<Vec<_>, _>>()?;
        self.with_attempts(&mut records).await?;
        Ok(records)
    }

    async fn set_status(
        &self,
        task_id: &TaskId,
        status: TaskStatus,
        message: &str,
    ) -> Result<StatusChange, StoreError> {
        self.write_status(task_id, None, status, message).await
    }

    async fn set_run_status(
        &self,
        task_id: &TaskId,
        run_id: &str,
        status: TaskStatus,
        message: &str,
    ) -> Result<StatusChange, StoreError> {
        self.write_status(task_id, Some(run_id), status, message)
            .await
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
            .map(|row| event_of(task_id.as_str(), row))
            .collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The shared task-store behaviour suite ([`crate::db::contract_tests`]) on SQLite.

    use crate::db::contract_tests::{self as contract, with_sqlite};

    #[tokio::test]
    async fn sqlite_migrations_are_idempotent_and_safe_to_race() {
        with_sqlite(contract::migrations_are_idempotent_and_safe_to_race).await;
    }

    #[tokio::test]
    async fn sqlite_idempotency_key_returns_the_first_task() {
        with_sqlite(contract::idempotency_key_returns_the_first_task).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_concurrent_inserts_with_one_key_create_one_task() {
        with_sqlite(contract::concurrent_inserts_with_one_key_create_one_task).await;
    }

    #[tokio::test]
    async fn sqlite_status_moves_forward_only_and_every_move_is_recorded() {
        with_sqlite(contract::status_moves_forward_only_and_every_move_is_recorded).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_events_resume_by_seq_without_gaps_under_concurrent_writers() {
        with_sqlite(contract::events_resume_by_seq_without_gaps_under_concurrent_writers).await;
    }

    #[tokio::test]
    async fn sqlite_list_pages_newest_first_with_filters() {
        with_sqlite(contract::list_pages_newest_first_with_filters).await;
    }

    #[tokio::test]
    async fn sqlite_record_keeps_what_was_stored_and_unknown_tasks_are_refused() {
        with_sqlite(contract::record_keeps_what_was_stored_and_unknown_tasks_are_refused).await;
    }

    #[tokio::test]
    async fn sqlite_attempts_are_numbered_kept_and_old_runs_ignored() {
        with_sqlite(contract::attempts_are_numbered_kept_and_old_runs_ignored).await;
    }
}
