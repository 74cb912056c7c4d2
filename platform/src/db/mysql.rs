//! The MySQL / MariaDB dialect of the task store, for deployments where gateways and
//! workers on many machines share one database.
//!
//! Its quirks, each for a reason:
//! - A status write locks the task's row (`FOR UPDATE`): many writers run at once, and the
//!   lock keeps the read that decides and the writes that follow together.
//! - No `ON CONFLICT`, and `INSERT IGNORE` would also turn a too-long value or a bad column
//!   into a warning and a silently missing row. So the task's INSERT is a plain one and only
//!   a duplicate key ([`ER_DUP_ENTRY`]) means "already there"; a concurrent insert of the
//!   same key waits for the other transaction and then fails with that error.
//! - No `RETURNING`: the OK packet of an INSERT carries `LAST_INSERT_ID()` of that very
//!   statement on that connection, which is the new event's `seq`.
//! - No `ON CONFLICT … DO UPDATE`: an upsert is `ON DUPLICATE KEY UPDATE`.
//! - Strict mode on every connection, and a migration lock of its own (see
//!   `connect` and `migrate_locked` below).
//! - `mariadb://` URLs mean the same as `mysql://` (sqlx knows only the latter).

use std::str::FromStr;

use sqlx::mysql::{MySqlConnectOptions, MySqlDatabaseError, MySqlPoolOptions, MySqlQueryResult};
use sqlx::{Connection, MySql, MySqlConnection, MySqlPool};

use super::StoreError;
use super::dialect::{Dialect, NewSeq, TaskLock, migrate_with_retries};
use super::sql_store::SqlStore;

/// The task store on MySQL or MariaDB.
pub type MySqlTaskStore = SqlStore<MySql>;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/mysql");

/// `ER_DUP_ENTRY`: a row with this primary or unique key exists.
const ER_DUP_ENTRY: u16 = 1062;

/// How long one `GET_LOCK` waits before it logs that it is still waiting and asks again.
const MIGRATION_LOCK_POLL_SECS: i64 = 10;

impl Dialect for MySql {
    /// Connects to `url` (`mysql://`, or `mariadb://` which means the same) and applies
    /// pending migrations.
    async fn connect(url: &str) -> Result<MySqlPool, StoreError> {
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
        // Two processes starting at once queue on a named lock (see `migrate_locked`); the
        // second then finds nothing left to do.
        migrate_with_retries(|| migrate_once(&opts)).await?;
        Ok(pool)
    }

    const TASK_LOCK: TaskLock = TaskLock::Row;

    const INSERT_UNLESS_TAKEN: &'static str = "";

    fn is_duplicate_key(error: &sqlx::Error) -> bool {
        match error {
            sqlx::Error::Database(db) => db
                .try_downcast_ref::<MySqlDatabaseError>()
                .is_some_and(|m| m.number() == ER_DUP_ENTRY),
            _ => false,
        }
    }

    const NEW_SEQ: NewSeq<Self> = NewSeq::LastInsertId(MySqlQueryResult::last_insert_id);

    fn rows_affected(done: &MySqlQueryResult) -> u64 {
        done.rows_affected()
    }

    /// `/` would divide as DECIMAL; `DIV` divides integers.
    fn day_of_ms(column: &str) -> String {
        format!("({column} DIV 86400000)")
    }

    /// SUM of a BIGINT is DECIMAL here, and CAST names 64-bit integers SIGNED.
    fn sum_integer(column: &str) -> String {
        format!("CAST(SUM({column}) AS SIGNED)")
    }

    /// No `ON CONFLICT`: `ON DUPLICATE KEY UPDATE` (whichever unique key is hit; the
    /// tables upserted have none but their primary key).
    fn upsert(_key: &[&str], columns: &[&str]) -> String {
        let set: Vec<String> = columns
            .iter()
            .map(|c| format!("{c} = VALUES({c})"))
            .collect();
        format!(" ON DUPLICATE KEY UPDATE {}", set.join(", "))
    }
}

/// One run on a connection of its own: closing it ends the session, which releases the
/// lock even when the run failed half-way (a pooled connection would keep holding it).
async fn migrate_once(opts: &MySqlConnectOptions) -> Result<(), StoreError> {
    let mut conn = MySqlConnection::connect_with(opts).await?;
    let outcome = migrate_locked(&mut conn).await;
    if let Err(e) = conn.close().await {
        tracing::debug!(error = %e, "closing the migration connection");
    }
    outcome
}

/// sqlx's migrator takes `GET_LOCK(name, -1)` and ignores the answer. MySQL reads -1 as
/// "wait forever", but MariaDB refuses a negative timeout (warning 1411, result NULL), so
/// there the migrator would run unlocked and two processes could both apply the first
/// migration. Hence a lock of our own, per database, with a positive timeout.
async fn migrate_locked(conn: &mut MySqlConnection) -> Result<(), StoreError> {
    loop {
        let got: Option<i64> =
            sqlx::query_scalar("SELECT GET_LOCK(CONCAT('patchflow_migrate_', MD5(DATABASE())), ?)")
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

#[cfg(test)]
mod tests {
    //! The shared task-store behaviour suite ([`crate::db::contract_tests`]) on MariaDB, and
    //! what only MySQL and MariaDB do.

    use sqlx::mysql::MySqlDatabaseError;
    use sqlx::{Connection, MySqlConnection};

    use crate::db::StoreError;
    use crate::db::contract_suite::opening_waits_while_the_migration_lock_is_held;
    use crate::db::contract_tests::{as_mysql_url, with_mariadb};
    use patchflow_core::{TaskId, TaskSource, TaskSpec};

    crate::db::contract_suite::tests_for!(with_mariadb);

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
            opening_waits_while_the_migration_lock_is_held(
                &url,
                holder,
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE()",
            )
            .await;
        })
        .await;
    }
}
