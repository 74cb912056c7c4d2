//! The SQLite dialect of the task store: the embedded default. WAL mode and a busy timeout
//! let a gateway and a worker in separate processes share one database file.
//!
//! Its quirks, each for a reason:
//! - One writer at a time for the whole file, so a status write begins with
//!   `BEGIN IMMEDIATE`: a plain `BEGIN` would take the write lock only at its first write,
//!   after the read that decides, and two writers could both decide on the same state.
//!   SQLite has no row locks (`FOR UPDATE`), and needs none.
//! - `ON CONFLICT DO NOTHING` makes a taken id or idempotency key write nothing.
//! - `RETURNING seq` hands back the new event's number.
//! - Opening retries on "database is locked" (see `connect` below).

use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteQueryResult,
    SqliteSynchronous,
};
use sqlx::{Sqlite, SqlitePool};

use super::StoreError;
use super::dialect::{Dialect, NewSeq, TaskLock, migrate_with_retries};
use super::sql_store::SqlStore;

/// The task store on SQLite.
pub type SqliteTaskStore = SqlStore<Sqlite>;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

impl Dialect for Sqlite {
    /// Opens (creating if needed) the database at `url` (`sqlite://PATH` or
    /// `sqlite::memory:`) and applies pending migrations.
    async fn connect(url: &str) -> Result<SqlitePool, StoreError> {
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
                let migrating = &pool;
                migrate_with_retries(move || async move { Ok(MIGRATOR.run(migrating).await?) })
                    .await?;
                Ok::<_, StoreError>(pool)
            }
            .await;
            match opened {
                Ok(pool) => return Ok(pool),
                Err(e) if attempt < 10 && is_locked(&e) => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "SQLite busy while opening; retrying");
                    tokio::time::sleep(Duration::from_millis(50 * attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    const TASK_LOCK: TaskLock = TaskLock::WholeDatabase {
        begin: "BEGIN IMMEDIATE",
    };

    const INSERT_UNLESS_TAKEN: &'static str = " ON CONFLICT DO NOTHING";

    const NEW_SEQ: NewSeq<Self> = NewSeq::Returning;

    fn rows_affected(done: &SqliteQueryResult) -> u64 {
        done.rows_affected()
    }

    /// SQLite's SUM of REALs that happen to be whole may come back as an INTEGER; TOTAL
    /// is always a REAL.
    fn sum_double(column: &str) -> String {
        format!("TOTAL({column})")
    }
}

/// Whether an error is SQLite's "database is locked" / "busy".
fn is_locked(e: &StoreError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("database is locked") || text.contains("busy")
}

#[cfg(test)]
mod tests {
    //! The shared task-store behaviour suite ([`crate::db::contract_tests`]) on SQLite.

    crate::db::contract_suite::tests_for!(with_sqlite);
}
