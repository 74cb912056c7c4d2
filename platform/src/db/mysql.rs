//! The task store on MySQL or MariaDB, for deployments where gateways and workers on many
//! machines share one database. It behaves exactly as the SQLite store does (same columns,
//! times as Unix milliseconds, JSON as text, same state-machine check and error mapping);
//! the differences are the dialect (`?` placeholders, no `RETURNING`, no `ON CONFLICT`),
//! a migration lock of its own (MariaDB ignores the one sqlx takes) and how concurrent
//! writers are kept in order.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use patchflow_core::{
    AgentSummary, TaskEvent, TaskEventKind, TaskId, TaskRecord, TaskSpec, TaskStatus,
};
use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError, MySqlPoolOptions};
use sqlx::{AssertSqlSafe, Connection, MySqlConnection, MySqlPool};

use super::attempts::{self, Current, Plan};
use super::rows::{
    ATTEMPT_COLUMNS, COLUMNS, attach_attempts, attempt_of, corrupt, event_of, now_ms, record_of,
};
use super::{Inserted, ListFilter, StatusChange, StoreError, TaskStore};

pub struct MySqlTaskStore {
    pool: MySqlPool,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/mysql");

/// `ER_DUP_ENTRY`: a row with this primary or unique key exists.
const ER_DUP_ENTRY: u16 = 1062;

/// How long one `GET_LOCK` waits before it logs that it is still waiting and asks again.
const MIGRATION_LOCK_POLL_SECS: i64 = 10;

impl MySqlTaskStore {
    /// Connects to `url` (`mysql://`, or `mariadb://` which means the same) and applies
    /// pending migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let url = match url.strip_prefix("mariadb://") {
            Some(rest) => format!("mysql://{rest}"),
            None => url.to_string(),
        };
        let opts = MySqlConnectOptions::from_str(&url)?;
        let pool = MySqlPoolOptions::new()
            .max_connections(8)
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    // Refuse values that do not fit (a batch id longer than its column)
                    // instead of silently cutting them, whatever the server's default is.
                    sqlx::query(
                        "SET SESSION sql_mode = CONCAT(@@SESSION.sql_mode, ',STRICT_TRANS_TABLES')",
                    )
                    .execute(&mut *conn)
                    .await?;
                    Ok(())
                })
            })
            .connect_with(opts.clone())
            .await?;
        Self::migrate(&opts).await?;
        Ok(Self { pool })
    }

    /// Applies migrations. Two processes starting at once queue on a named lock; the
    /// second then finds nothing left to do. The retry covers a connection lost half-way,
    /// as on SQLite.
    async fn migrate(opts: &MySqlConnectOptions) -> Result<(), StoreError> {
        let mut attempt = 0;
        loop {
            match Self::migrate_once(opts).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 5 => {
                    tracing::debug!(error = %e, "migration raced another process; retrying");
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One run on a connection of its own: closing it ends the session, which releases the
    /// lock even when the run failed half-way (a pooled connection would keep holding it).
    async fn migrate_once(opts: &MySqlConnectOptions) -> Result<(), StoreError> {
        let mut conn = MySqlConnection::connect_with(opts).await?;
        let outcome = Self::migrate_locked(&mut conn).await;
        if let Err(e) = conn.close().await {
            tracing::debug!(error = %e, "closing the migration connection");
        }
        outcome
    }

    /// sqlx's migrator takes `GET_LOCK(name, -1)` and ignores the answer. MySQL reads -1 as
    /// "wait forever", but MariaDB refuses a negative timeout (warning 1411, result NULL),
    /// so there the migrator would run unlocked and two processes could both apply the
    /// first migration. Hence a lock of our own, per database, with a positive timeout.
    async fn migrate_locked(conn: &mut MySqlConnection) -> Result<(), StoreError> {
        loop {
            let got: Option<i64> = sqlx::query_scalar(
                "SELECT GET_LOCK(CONCAT('patchflow_migrate_', MD5(DATABASE())), ?)",
            )
            .bind(MIGRATION_LOCK_POLL_SECS)
            .fetch_one(&mut *conn)
            .await?;
            match got {
                Some(1) => break,
                Some(_) => tracing::info!(
                    "another process is migrating the task store; waiting for it to finish"
                ),
                None => {
                    return Err(StoreError::Database(sqlx::Error::Protocol(
                        "GET_LOCK for the migration lock returned NULL (does the database URL name a database?)"
                            .into(),
                    )));
                }
            }
        }
        MIGRATOR.run(&mut *conn).await?;
        // The lock goes with the session when the caller closes the connection.
        Ok(())
    }

    /// MySQL has no `RETURNING`: the OK packet of the INSERT carries `LAST_INSERT_ID()` of
    /// this very statement on this connection.
    async fn insert_event(
        conn: &mut MySqlConnection,
        task_id: &TaskId,
        kind: TaskEventKind,
        status: Option<TaskStatus>,
        message: &str,
        at: i64,
    ) -> Result<i64, StoreError> {
        let done = sqlx::query(
            "INSERT INTO task_events (task_id, kind, status, message, at) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(task_id.as_str())
        .bind(kind.as_str())
        .bind(status.map(|s| s.as_str()))
        .bind(message)
        .bind(at)
        .execute(&mut *conn)
        .await?;
        i64::try_from(done.last_insert_id()).map_err(|e| corrupt(task_id.as_str(), e))
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
    /// read takes the task's row lock (FOR UPDATE) until commit, so the read that decides
    /// and the writes that follow see no other writer in between, and this task's events
    /// stay visible in `seq` order (see `append_event`).
    async fn write_status(
        &self,
        task_id: &TaskId,
        run: Option<&str>,
        status: TaskStatus,
        message: &str,
    ) -> Result<StatusChange, StoreError> {
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        let row: Option<(String, i64)> =
            sqlx::query_as("SELECT status, attempt FROM tasks WHERE task_id = ? FOR UPDATE")
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

/// Whether `e` says the row's primary or unique key is taken.
fn is_duplicate_key(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .try_downcast_ref::<MySqlDatabaseError>()
            .is_some_and(|m| m.number() == ER_DUP_ENTRY),
        _ => false,
    }
}

#[async_trait]
impl TaskStore for MySqlTaskStore {
    async fn insert(&self, task_id: &TaskId, spec: &TaskSpec) -> Result<Inserted, StoreError> {
        let now = now_ms();
        let spec_json = serde_json::to_string(spec).map_err(|e| corrupt(task_id.as_str(), e))?;
        let mut tx = self.pool.begin().await?;
        // A plain INSERT, not INSERT IGNORE: IGNORE would also turn a too-long value or a
        // bad column into a warning and a silently missing row. Only a duplicate key
        // means "already there". A concurrent insert of the same key waits for the other
        // transaction and then fails with that error.
        let inserted = sqlx::query(
            "INSERT INTO tasks (task_id, tenant, idempotency_key, batch_id, status, message, spec, created_at, updated_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
        .await;
        match inserted {
            Ok(_) => {
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
            Err(e) if is_duplicate_key(&e) => tx.rollback().await?,
            Err(e) => return Err(e.into()),
        }
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
        // AUTO_INCREMENT hands out numbers at insert, not at commit. Two writers of one task
        // could otherwise commit out of order, and a reader resuming after the higher
        // number would never see the lower one. Holding the task's row lock while
        // inserting keeps one task's events visible in `seq` order, as SQLite's single
        // writer does. An unknown task has no row to lock; the insert then fails on the
        // foreign key, as on SQLite.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT 1 FROM tasks WHERE task_id = ? FOR UPDATE")
            .bind(task_id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let seq = Self::insert_event(&mut tx, task_id, kind, None, message, now_ms()).await?;
        tx.commit().await?;
        Ok(seq)
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
    //! The shared task-store behaviour suite ([`crate::db::contract_tests`]) on MariaDB.

    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use sqlx::mysql::MySqlDatabaseError;
    use sqlx::{Connection, MySqlConnection};

    use crate::db::StoreError;
    use crate::db::contract_tests::{self as contract, as_mysql_url, with_mariadb};
    use patchflow_core::{TaskId, TaskSource, TaskSpec};

    #[tokio::test]
    async fn mariadb_migrations_are_idempotent_and_safe_to_race() {
        with_mariadb(contract::migrations_are_idempotent_and_safe_to_race).await;
    }

    #[tokio::test]
    async fn mariadb_idempotency_key_returns_the_first_task() {
        with_mariadb(contract::idempotency_key_returns_the_first_task).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mariadb_concurrent_inserts_with_one_key_create_one_task() {
        with_mariadb(contract::concurrent_inserts_with_one_key_create_one_task).await;
    }

    #[tokio::test]
    async fn mariadb_status_moves_forward_only_and_every_move_is_recorded() {
        with_mariadb(contract::status_moves_forward_only_and_every_move_is_recorded).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mariadb_events_resume_by_seq_without_gaps_under_concurrent_writers() {
        with_mariadb(contract::events_resume_by_seq_without_gaps_under_concurrent_writers).await;
    }

    #[tokio::test]
    async fn mariadb_list_pages_newest_first_with_filters() {
        with_mariadb(contract::list_pages_newest_first_with_filters).await;
    }

    #[tokio::test]
    async fn mariadb_record_keeps_what_was_stored_and_unknown_tasks_are_refused() {
        with_mariadb(contract::record_keeps_what_was_stored_and_unknown_tasks_are_refused).await;
    }

    #[tokio::test]
    async fn mariadb_attempts_are_numbered_kept_and_old_runs_ignored() {
        with_mariadb(contract::attempts_are_numbered_kept_and_old_runs_ignored).await;
    }

    /// Indexed columns have a length on MySQL/MariaDB (SQLite's have none); a batch id
    /// longer than its column is refused with the server's error, not cut, and nothing of
    /// the task is stored.
    #[tokio::test]
    async fn mariadb_a_value_too_long_for_its_column_is_refused_and_nothing_is_stored() {
        with_mariadb(|url| async move {
            let store = crate::db::open(&url).await.unwrap();
            let mut spec = TaskSpec::new(TaskSource::Archive { key: "k".into() }, "fix");
            spec.batch_id = Some("b".repeat(129));
            let id = TaskId::generate();
            match store.insert(&id, &spec).await {
                Err(StoreError::Database(sqlx::Error::Database(e))) => {
                    let number = e
                        .try_downcast_ref::<MySqlDatabaseError>()
                        .map(|m| m.number());
                    assert_eq!(number, Some(1406), "expected ER_DATA_TOO_LONG, got {e}");
                }
                other => panic!("expected the server to refuse the batch id, got {other:?}"),
            }
            assert!(store.get(&id).await.unwrap().is_none());
            assert!(store.events(&id, 0, 10).await.unwrap().is_empty());
            spec.batch_id = Some("b".repeat(128));
            store.insert(&id, &spec).await.unwrap();
            assert_eq!(store.get(&id).await.unwrap().unwrap().spec, spec);
        })
        .await;
    }

    /// MariaDB refuses the lock sqlx's migrator asks for, so the store takes its own: while
    /// another session holds it, opening waits and creates nothing; once it is released,
    /// opening completes.
    #[tokio::test]
    async fn mariadb_migrations_wait_for_the_migration_lock() {
        with_mariadb(|url| async move {
            let mut holder = MySqlConnection::connect(&as_mysql_url(&url)).await.unwrap();
            let got: Option<i64> = sqlx::query_scalar(
                "SELECT GET_LOCK(CONCAT('patchflow_migrate_', MD5(DATABASE())), 0)",
            )
            .fetch_one(&mut holder)
            .await
            .unwrap();
            assert_eq!(got, Some(1));
            // The migrator's future is not `Send` (sqlx's `Acquire` bounds), so it runs
            // beside the holder in this task rather than on a spawned one.
            let opened = AtomicBool::new(false);
            let opening = async {
                let result = crate::db::open(&url).await.map(|_| ());
                opened.store(true, Ordering::SeqCst);
                result
            };
            let holding = async {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let tables: i64 = sqlx::query_scalar(
                    "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE()",
                )
                .fetch_one(&mut holder)
                .await
                .unwrap();
                assert_eq!(
                    tables, 0,
                    "migrations ran while another session held the lock"
                );
                assert!(!opened.load(Ordering::SeqCst));
                // Ending the session releases the lock.
                holder.close().await.unwrap();
            };
            let (result, ()) = tokio::join!(opening, holding);
            result.unwrap();
        })
        .await;
    }
}
