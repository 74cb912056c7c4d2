//! What the SQL back-ends do differently, as one trait the shared store
//! ([`super::sql_store::SqlStore`]) asks, implemented on sqlx's own database types.
//!
//! Everything not named here is written once, in SQL all three databases read alike, with
//! sqlx's `QueryBuilder` writing each database's placeholders (`?`, or `$1, $2, ...` on
//! PostgreSQL). Each database's answers live in its own file (`sqlite.rs`, `postgres.rs`,
//! `mysql.rs`), beside the reason for each.

use std::borrow::Cow;
use std::future::Future;
use std::time::Duration;

use sqlx::{Database, Pool};

use super::StoreError;

/// One SQL database kind as the task store needs to know it.
pub trait Dialect: Database {
    /// Opens a pool on `url` (already known to be this database's) and brings the schema up
    /// to date, safely when several processes start at once.
    fn connect(url: &str) -> impl Future<Output = Result<Pool<Self>, StoreError>>;

    /// How a status write keeps the task's other writers out between the read that decides
    /// and the writes that follow.
    const TASK_LOCK: TaskLock;

    /// What follows the task's INSERT so that a taken id or idempotency key writes nothing
    /// (zero rows affected) instead of failing. Empty where the database has no such clause
    /// that is safe; the INSERT then fails and [`Dialect::is_duplicate_key`] tells why.
    const INSERT_UNLESS_TAKEN: &'static str;

    /// Whether a failed INSERT failed only because a primary or unique key is taken.
    fn is_duplicate_key(_error: &sqlx::Error) -> bool {
        false
    }

    /// How an event's INSERT hands back the `seq` it was given.
    const NEW_SEQ: NewSeq<Self>;

    /// How many rows a statement changed (sqlx has no trait for it; each result type has it).
    fn rows_affected(done: &Self::QueryResult) -> u64;

    /// `text` as the database can store it in a text column.
    fn storable_text(text: &str) -> Cow<'_, str> {
        Cow::Borrowed(text)
    }

    /// The UTC day of a Unix-millisecond column, as a whole number of days since
    /// 1970-01-01 (`/` divides integers as integers on SQLite and PostgreSQL).
    fn day_of_ms(column: &str) -> String {
        format!("({column} / 86400000)")
    }

    /// The sum of a BIGINT column as a BIGINT (PostgreSQL sums them as NUMERIC).
    fn sum_integer(column: &str) -> String {
        format!("CAST(SUM({column}) AS BIGINT)")
    }

    /// The sum of a double column as a double.
    fn sum_double(column: &str) -> String {
        format!("SUM({column})")
    }

    /// What follows an INSERT so that a row whose primary key (`key`) is taken has its
    /// `columns` replaced by the new values instead (an "insert or replace" that keeps the
    /// row in place). SQLite and PostgreSQL say `ON CONFLICT … DO UPDATE`.
    fn upsert(key: &[&str], columns: &[&str]) -> String {
        let set: Vec<String> = columns
            .iter()
            .map(|c| format!("{c} = excluded.{c}"))
            .collect();
        format!(
            " ON CONFLICT ({}) DO UPDATE SET {}",
            key.join(", "),
            set.join(", ")
        )
    }
}

/// How a status write has a task to itself until it commits.
pub enum TaskLock {
    /// The database lets one writer in at a time and the transaction takes that lock when
    /// it begins, with this statement. Events are then ordered by that single writer too.
    WholeDatabase { begin: &'static str },
    /// The read that decides locks the task's row (`SELECT ... FOR UPDATE`) until commit.
    /// Such databases hand out `seq` numbers when a row is inserted, not when it commits, so
    /// appending an event takes the same row lock (see `SqlStore::append_event`).
    Row,
}

/// How the database tells the `seq` of the event row just inserted.
pub enum NewSeq<DB: Database> {
    /// `INSERT ... RETURNING seq`.
    Returning,
    /// The statement's result carries the AUTO_INCREMENT value it was given.
    LastInsertId(fn(&DB::QueryResult) -> u64),
}

/// Runs `migrate` until it succeeds, six tries at most, waiting a little longer after each
/// failure. Two processes starting at once may race on the first run (the loser then sees
/// the winner's tables and its retry finds nothing left to do), and a connection lost
/// half-way is worth a second try.
pub(super) async fn migrate_with_retries<F, Fut>(mut migrate: F) -> Result<(), StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), StoreError>>,
{
    let mut attempt = 0;
    loop {
        match migrate().await {
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
