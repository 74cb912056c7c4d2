//! The task store: task records and their history of events.
//!
//! One trait, [`TaskStore`], with a back-end per database kind: SQLite (the embedded
//! default), PostgreSQL and MySQL/MariaDB (shared by gateways and workers on many machines).
//! [`open`] picks one from the URL. Every back-end passes the same behaviour suite.
//!
//! The three are one store (`sql_store.rs`, generic over sqlx's database type) and a small
//! dialect each (`sqlite.rs`, `postgres.rs`, `mysql.rs`: how it connects and migrates, and
//! each way it differs, with the reason), answering the questions of `dialect.rs`.

mod attempts;
#[cfg(test)]
mod contract_suite;
#[cfg(test)]
mod contract_tests;
mod dialect;
mod mysql;
mod postgres;
mod rows;
mod sql_store;
mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use patchflow_core::auth::ApiToken;
use patchflow_core::environment::{EnvCacheEntry, EnvironmentRecord};
use patchflow_core::{
    AgentSummary, CandidateRecord, TaskEvent, TaskEventKind, TaskId, TaskRecord, TaskSpec,
    TaskStatus, TurnRecord, UsageRow,
};
use thiserror::Error;

pub use mysql::MySqlTaskStore;
pub use postgres::PostgresTaskStore;
pub use sqlite::SqliteTaskStore;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("task {0} not found")]
    NotFound(TaskId),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database migration: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("stored record of task {task} is corrupt: {reason}")]
    Corrupt { task: String, reason: String },
    /// A stored row that is not a task's (an environment, a cache entry) cannot be read.
    #[error("stored {what} is corrupt: {reason}")]
    CorruptRow { what: String, reason: String },
    #[error(
        "unsupported database URL `{0}` (sqlite://PATH, postgres://USER@HOST/DB or mysql://USER@HOST/DB; postgresql:// and mariadb:// work too)"
    )]
    UnsupportedUrl(String),
}

/// Result of inserting a task.
#[derive(Debug, Clone)]
pub enum Inserted {
    /// A new record.
    Created(TaskRecord),
    /// A task with this id or idempotency key already existed; nothing was written.
    Existing(TaskRecord),
}

impl Inserted {
    pub fn record(&self) -> &TaskRecord {
        match self {
            Self::Created(r) | Self::Existing(r) => r,
        }
    }
}

/// Result of a status update.
#[derive(Debug, Clone, PartialEq)]
pub enum StatusChange {
    /// The record moved; `seq` is the history entry written for the move.
    Applied { seq: i64 },
    /// The move was not allowed from the current status (an out-of-order or repeated write);
    /// the record is unchanged.
    Ignored { current: TaskStatus },
}

/// Which tasks to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<TaskStatus>,
    pub tenant: Option<String>,
    pub batch_id: Option<String>,
    /// Return tasks older than this cursor (from a previous page's `next_cursor`).
    pub cursor: Option<ListCursor>,
    pub limit: u32,
}

/// Whose use to sum, over which tasks: those created in `[from, to)`.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    /// One tenant, or every tenant.
    pub tenant: Option<String>,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// The model a task counts under when its spec names none and it has no summary yet.
    pub default_model: String,
}

/// A position in the newest-first order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListCursor {
    pub created_at_ms: i64,
    pub task_id: String,
}

impl ListCursor {
    pub fn of(rec: &TaskRecord) -> Self {
        Self {
            created_at_ms: rec.created_at.timestamp_millis(),
            task_id: rec.task_id.to_string(),
        }
    }

    pub fn encode(&self) -> String {
        format!("{}.{}", self.created_at_ms, self.task_id)
    }

    pub fn decode(s: &str) -> Option<Self> {
        let (ms, id) = s.split_once('.')?;
        Some(Self {
            created_at_ms: ms.parse().ok()?,
            task_id: id.parse::<TaskId>().ok()?.to_string(),
        })
    }
}

#[async_trait]
pub trait TaskStore: Send + Sync + 'static {
    /// Stores a new task in PENDING. If the id, or the tenant's idempotency key, is taken,
    /// returns the existing record instead.
    async fn insert(&self, task_id: &TaskId, spec: &TaskSpec) -> Result<Inserted, StoreError>;

    async fn get(&self, task_id: &TaskId) -> Result<Option<TaskRecord>, StoreError>;

    async fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>, StoreError>;

    /// Moves a task's current attempt to `status` if the state machine allows it from
    /// where it is, and appends the change to its history, in one transaction.
    async fn set_status(
        &self,
        task_id: &TaskId,
        status: TaskStatus,
        message: &str,
    ) -> Result<StatusChange, StoreError>;

    /// A status written by a workflow run (`run_id` is Temporal's run id). The current
    /// attempt's run moves it as [`TaskStore::set_status`] does; a run not seen before
    /// begins a new attempt (a retry, or a reset done in Temporal), closing the current one
    /// if it was still in flight; a run of an earlier attempt is ignored.
    async fn set_run_status(
        &self,
        task_id: &TaskId,
        run_id: &str,
        status: TaskStatus,
        message: &str,
    ) -> Result<StatusChange, StoreError>;

    /// Stores the task's summary (replacing an earlier attempt's), and what it used in the
    /// columns [`TaskStore::usage`] sums.
    async fn set_summary(&self, task_id: &TaskId, summary: &AgentSummary)
    -> Result<(), StoreError>;

    /// Tasks, tokens and cost per UTC day (of `created_at`), tenant and model, summed by
    /// the database; ordered by day, tenant, model (byte order). A task counts with its
    /// summary's model and usage; one without a summary counts with no tokens, under its
    /// spec's model or `default_model`.
    async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, StoreError>;

    /// Records the task's pull request: its URL, or why there is none (each replaces what
    /// was there; both `None` clears them).
    /// A follow-up turn begins. A COMPLETED or FAILED task goes back to RUNNING_AGENT within
    /// its current attempt, whose run becomes `run_id` when given (the workflow run that
    /// carries the conversation on); `turn` joins its turns (turn 1 written first, from the
    /// record, when this is the first follow-up); the status event says so. A turn already
    /// begun changes nothing but the run (`Ignored`): the gateway and the workflow both
    /// announce a turn, whichever comes first.
    async fn begin_turn(
        &self,
        task_id: &TaskId,
        run_id: Option<&str>,
        turn: &TurnRecord,
    ) -> Result<StatusChange, StoreError>;

    /// Writes one turn over the stored one of the same number (its end).
    async fn put_turn(&self, task_id: &TaskId, turn: &TurnRecord) -> Result<(), StoreError>;

    /// Writes one candidate over the stored one of the same number. Candidates end
    /// concurrently, so this reads and writes under the task's lock.
    async fn put_candidate(
        &self,
        task_id: &TaskId,
        candidate: &CandidateRecord,
    ) -> Result<(), StoreError>;

    /// Names the worker that runs the agent of the attempt carried by Temporal run `run_id`;
    /// `false` when no attempt has that run.
    async fn set_attempt_worker(
        &self,
        task_id: &TaskId,
        run_id: &str,
        worker: &str,
    ) -> Result<bool, StoreError>;

    /// The marker of the last result message the broker took for the task
    /// (`<attempt>/<turn>/<status>`), if any.
    async fn result_sent(&self, task_id: &TaskId) -> Result<Option<String>, StoreError>;

    /// Records that the broker took the result message `marker` names.
    async fn set_result_sent(&self, task_id: &TaskId, marker: &str) -> Result<(), StoreError>;

    /// The candidate whose results are the task's.
    async fn set_selected(&self, task_id: &TaskId, selected: Option<u32>)
    -> Result<(), StoreError>;

    async fn set_pull_request(
        &self,
        task_id: &TaskId,
        pr_url: Option<&str>,
        pr_error: Option<&str>,
    ) -> Result<(), StoreError>;

    /// Appends a progress line to the task's history; returns its sequence number.
    async fn append_event(
        &self,
        task_id: &TaskId,
        kind: TaskEventKind,
        message: &str,
    ) -> Result<i64, StoreError>;

    /// History after `after_seq`, oldest first.
    async fn events(
        &self,
        task_id: &TaskId,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<TaskEvent>, StoreError>;

    /// Cheap liveness check for `/healthz`.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Stores a new API token by its hash ([`patchflow_core::auth::token_hash`]); the
    /// token itself is never given to the store.
    async fn create_token(&self, token: &ApiToken, hash: &str) -> Result<(), StoreError>;

    /// The token with this hash, live or not (the caller checks [`ApiToken::is_live`]).
    async fn token_by_hash(&self, hash: &str) -> Result<Option<ApiToken>, StoreError>;

    /// Every token, newest first.
    async fn list_tokens(&self) -> Result<Vec<ApiToken>, StoreError>;

    /// Marks a token revoked (now); `false` if there is no such token or it was revoked
    /// already.
    async fn revoke_token(&self, token_id: &str) -> Result<bool, StoreError>;

    /// Records that a token was used now.
    async fn touch_token(&self, token_id: &str) -> Result<(), StoreError>;

    /// How many tokens exist (revoked ones too): zero means a new deployment to bootstrap.
    async fn count_tokens(&self) -> Result<u64, StoreError>;

    // Saved environments (per tenant, by name) and the cache of prepared states. Every
    // call is scoped to one tenant: another tenant's rows are never read or written.

    /// Creates (`replace == false`: Ok(false) if the name is taken) or replaces
    /// (`replace == true`: Ok(false) if there is none) a saved environment. A replace
    /// writes every column but the key (tenant, name) from `env`, `created_at` included:
    /// the caller carries over what it keeps.
    async fn put_environment(
        &self,
        env: &EnvironmentRecord,
        replace: bool,
    ) -> Result<bool, StoreError>;

    async fn get_environment(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<EnvironmentRecord>, StoreError>;

    /// The tenant's environments, by name (byte order).
    async fn list_environments(&self, tenant: &str) -> Result<Vec<EnvironmentRecord>, StoreError>;

    /// `false` if there is no such environment. Its cache entries stay (they age out).
    async fn delete_environment(&self, tenant: &str, name: &str) -> Result<bool, StoreError>;

    /// Bumps cache_generation and deletes the env_cache rows made from it; answers the keys
    /// removed (None: no such environment). The objects of those keys are the caller's to
    /// delete.
    async fn reset_environment_cache(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<Vec<String>>, StoreError>;

    async fn env_cache_get(
        &self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<EnvCacheEntry>, StoreError>;

    /// Insert or replace.
    async fn env_cache_put(&self, entry: &EnvCacheEntry) -> Result<(), StoreError>;

    /// last_used_at = now (nothing if there is no such entry).
    async fn env_cache_touch(&self, tenant: &str, key: &str) -> Result<(), StoreError>;

    /// The tenant's entries, least recently used first.
    async fn env_cache_list(&self, tenant: &str) -> Result<Vec<EnvCacheEntry>, StoreError>;

    /// `false` if there was no such entry.
    async fn env_cache_delete(&self, tenant: &str, key: &str) -> Result<bool, StoreError>;
}

/// Opens the store a URL names and brings its schema up to date: `sqlite:`,
/// `postgres://` or `postgresql://`, `mysql://` or `mariadb://`.
pub async fn open(url: &str) -> Result<Arc<dyn TaskStore>, StoreError> {
    if url.starts_with("sqlite:") {
        return Ok(Arc::new(SqliteTaskStore::open(url).await?));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Arc::new(PostgresTaskStore::open(url).await?));
    }
    if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        return Ok(Arc::new(MySqlTaskStore::open(url).await?));
    }
    Err(StoreError::UnsupportedUrl(
        patchflow_core::config::redact_url(url),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_refuses_an_unknown_scheme_and_hides_the_password() {
        let err = match open("redis://app:s3cret@db.internal:6379/0").await {
            Err(e) => e.to_string(),
            Ok(_) => panic!("redis:// is not a task store"),
        };
        assert!(!err.contains("s3cret"), "{err}");
        assert!(
            err.contains("`redis://app:***@db.internal:6379/0`"),
            "{err}"
        );
        for scheme in ["sqlite://", "postgres://", "mysql://", "mariadb://"] {
            assert!(err.contains(scheme), "{err} should name {scheme}");
        }
    }
}
