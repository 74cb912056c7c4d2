//! Turning stored rows into domain records, shared by every back-end so SQLite, PostgreSQL
//! and MySQL/MariaDB read the same columns the same way: times as Unix milliseconds, the
//! spec and summary as JSON text, statuses by name, and anything unreadable as
//! [`StoreError::Corrupt`].

use chrono::{DateTime, TimeZone, Utc};
use patchflow_core::{
    AgentSummary, TaskAttempt, TaskEvent, TaskEventKind, TaskRecord, TaskSpec, TaskStatus, UsageRow,
};
use sqlx::{ColumnIndex, Database, Decode, Row, Type};

use super::StoreError;

/// The columns of `tasks` that [`record_of`] reads, in the order the back-ends select them.
pub(super) const COLUMNS: &str = "task_id, tenant, idempotency_key, batch_id, status, message, spec, summary, pr_url, pr_error, created_at, updated_at, attempt, turns, candidates, selected";

pub(super) fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

pub(super) fn time_of(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

pub(super) fn corrupt(task: &str, reason: &dyn std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        task: task.to_string(),
        reason: reason.to_string(),
    }
}

/// A `tasks` row selected with [`COLUMNS`].
pub(super) fn record_of<R, DB>(row: &R) -> Result<TaskRecord, StoreError>
where
    R: Row<Database = DB>,
    DB: Database,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, DB> + Type<DB>,
    for<'r> i64: Decode<'r, DB> + Type<DB>,
{
    let id: String = row.try_get("task_id")?;
    let status: String = row.try_get("status")?;
    let spec: String = row.try_get("spec")?;
    let summary: Option<String> = row.try_get("summary")?;
    let turns: Option<String> = row.try_get("turns")?;
    let candidates: Option<String> = row.try_get("candidates")?;
    let selected: Option<i64> = row.try_get("selected")?;
    Ok(TaskRecord {
        task_id: id.parse().map_err(|e| corrupt(&id, &e))?,
        status: status.parse().map_err(|e| corrupt(&id, &e))?,
        message: row.try_get("message")?,
        created_at: time_of(row.try_get("created_at")?),
        updated_at: time_of(row.try_get("updated_at")?),
        pr_url: row.try_get("pr_url")?,
        pr_error: row.try_get("pr_error")?,
        summary: summary
            .map(|s| serde_json::from_str::<AgentSummary>(&s))
            .transpose()
            .map_err(|e| corrupt(&id, &e))?,
        tenant: row.try_get("tenant")?,
        batch_id: row.try_get("batch_id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        spec: serde_json::from_str::<TaskSpec>(&spec).map_err(|e| corrupt(&id, &e))?,
        attempt: u32::try_from(row.try_get::<i64, _>("attempt")?).unwrap_or(1),
        // Filled in by the back-end from `task_attempts` ([`ATTEMPT_COLUMNS`]).
        attempts: Vec::new(),
        turns: json_list(&id, turns.as_deref())?,
        candidates: json_list(&id, candidates.as_deref())?,
        selected: selected.and_then(|n| u32::try_from(n).ok()),
    })
}

/// A JSON array column (`turns`, `candidates`); NULL is empty.
pub(super) fn json_list<T: serde::de::DeserializeOwned>(
    task: &str,
    text: Option<&str>,
) -> Result<Vec<T>, StoreError> {
    match text {
        None => Ok(Vec::new()),
        Some(t) => serde_json::from_str(t).map_err(|e| corrupt(task, &e)),
    }
}

/// The columns of `task_attempts` that [`attempt_of`] reads.
pub(super) const ATTEMPT_COLUMNS: &str =
    "task_id, attempt, run_id, status, message, started_at, finished_at, worker";

/// A `task_attempts` row selected with [`ATTEMPT_COLUMNS`], with its task id.
pub(super) fn attempt_of<R, DB>(row: &R) -> Result<(String, TaskAttempt), StoreError>
where
    R: Row<Database = DB>,
    DB: Database,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, DB> + Type<DB>,
    for<'r> i64: Decode<'r, DB> + Type<DB>,
{
    let id: String = row.try_get("task_id")?;
    let status: String = row.try_get("status")?;
    let finished: Option<i64> = row.try_get("finished_at")?;
    let attempt = TaskAttempt {
        attempt: u32::try_from(row.try_get::<i64, _>("attempt")?).map_err(|e| corrupt(&id, &e))?,
        started_at: time_of(row.try_get("started_at")?),
        finished_at: finished.map(time_of),
        status: status.parse().map_err(|e| corrupt(&id, &e))?,
        message: row.try_get("message")?,
        run_id: row.try_get("run_id")?,
        worker: row.try_get("worker")?,
    };
    Ok((id, attempt))
}

/// Hands attempts (as read by [`attempt_of`], ordered by task and number) to their records.
pub(super) fn attach_attempts(records: &mut [TaskRecord], attempts: Vec<(String, TaskAttempt)>) {
    for (id, a) in attempts {
        if let Some(r) = records.iter_mut().find(|r| r.task_id.as_str() == id) {
            r.attempts.push(a);
        }
    }
}

/// A `task_events` row selected as `seq, kind, status, message, at`.
pub(super) fn event_of<R, DB>(task: &str, row: &R) -> Result<TaskEvent, StoreError>
where
    R: Row<Database = DB>,
    DB: Database,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, DB> + Type<DB>,
    for<'r> i64: Decode<'r, DB> + Type<DB>,
{
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
            .map_err(|e| corrupt(task, &e))?,
        message: row.try_get("message")?,
        at: time_of(row.try_get("at")?),
    })
}

/// The columns of `api_tokens` that [`token_of`] reads.
pub(super) const TOKEN_COLUMNS: &str =
    "token_id, tenant, role, name, created_at, expires_at, revoked_at, last_used_at";

pub(super) fn token_of<R, DB>(row: &R) -> Result<patchflow_core::auth::ApiToken, StoreError>
where
    R: Row<Database = DB>,
    DB: Database,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, DB> + Type<DB>,
    for<'r> i64: Decode<'r, DB> + Type<DB>,
{
    let token_id: String = row.try_get("token_id")?;
    let role: String = row.try_get("role")?;
    let at = |col: &str| -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(row.try_get::<Option<i64>, _>(col)?.map(time_of))
    };
    Ok(patchflow_core::auth::ApiToken {
        role: role.parse().map_err(|e| corrupt(&token_id, &e))?,
        tenant: row.try_get("tenant")?,
        name: row.try_get("name")?,
        created_at: time_of(row.try_get("created_at")?),
        expires_at: at("expires_at")?,
        revoked_at: at("revoked_at")?,
        last_used_at: at("last_used_at")?,
        token_id,
    })
}

/// The columns of `environments` that [`environment_of`] reads.
pub(super) const ENVIRONMENT_COLUMNS: &str = "tenant, name, repo, definition, secrets, secrets_version, cache_generation, created_at, updated_at";

fn corrupt_row(what: String, reason: &dyn std::fmt::Display) -> StoreError {
    StoreError::CorruptRow {
        what,
        reason: reason.to_string(),
    }
}

/// A count or a size as the columns keep it (BIGINT: an `i64`).
pub(super) fn stored_u64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Most characters of a model name the `model` column keeps (a spec's may have 200).
const MODEL_CHARS: usize = 200;

/// A model name as the `model` column keeps it: its first 200 characters.
pub(super) fn stored_model(model: &str) -> &str {
    match model.char_indices().nth(MODEL_CHARS) {
        Some((end, _)) => &model[..end],
        None => model,
    }
}

/// The token columns of `tasks` the usage report sums, as [`usage_of`] reads them.
pub(super) const USAGE_SUMS: [&str; 5] = [
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "total_tokens",
];

/// One row of the usage report: `day` (days since 1970-01-01), `tenant`, `model`, `tasks`,
/// the [`USAGE_SUMS`] and `cost_usd`.
pub(super) fn usage_of<R, DB>(row: &R) -> Result<UsageRow, StoreError>
where
    R: Row<Database = DB>,
    DB: Database,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, DB> + Type<DB>,
    for<'r> i64: Decode<'r, DB> + Type<DB>,
    for<'r> f64: Decode<'r, DB> + Type<DB>,
{
    let tenant: String = row.try_get("tenant")?;
    let what = || format!("usage of tenant {tenant}");
    let count = |col: &str| -> Result<u64, StoreError> {
        u64::try_from(row.try_get::<i64, _>(col)?).map_err(|e| corrupt_row(what(), &e))
    };
    let days: i64 = row.try_get("day")?;
    let day = DateTime::<Utc>::UNIX_EPOCH
        .date_naive()
        .checked_add_signed(chrono::Duration::days(days))
        .ok_or_else(|| corrupt_row(what(), &format!("day {days} is out of range")))?;
    Ok(UsageRow {
        day,
        model: row.try_get("model")?,
        tasks: count("tasks")?,
        prompt_tokens: count("prompt_tokens")?,
        completion_tokens: count("completion_tokens")?,
        cached_tokens: count("cached_tokens")?,
        reasoning_tokens: count("reasoning_tokens")?,
        total_tokens: count("total_tokens")?,
        cost_usd: row.try_get("cost_usd")?,
        tenant,
    })
}

/// An `environments` row selected with [`ENVIRONMENT_COLUMNS`].
pub(super) fn environment_of<R, DB>(
    row: &R,
) -> Result<patchflow_core::environment::EnvironmentRecord, StoreError>
where
    R: Row<Database = DB>,
    DB: Database,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, DB> + Type<DB>,
    for<'r> i64: Decode<'r, DB> + Type<DB>,
{
    let tenant: String = row.try_get("tenant")?;
    let name: String = row.try_get("name")?;
    let what = || format!("environment {tenant}/{name}");
    let definition: String = row.try_get("definition")?;
    let secrets: String = row.try_get("secrets")?;
    let count = |col: &str| -> Result<u64, StoreError> {
        u64::try_from(row.try_get::<i64, _>(col)?).map_err(|e| corrupt_row(what(), &e))
    };
    Ok(patchflow_core::environment::EnvironmentRecord {
        repo: row.try_get("repo")?,
        setup: serde_json::from_str(&definition).map_err(|e| corrupt_row(what(), &e))?,
        secrets: serde_json::from_str(&secrets).map_err(|e| corrupt_row(what(), &e))?,
        secrets_version: count("secrets_version")?,
        cache_generation: count("cache_generation")?,
        created_at: time_of(row.try_get("created_at")?),
        updated_at: time_of(row.try_get("updated_at")?),
        tenant,
        name,
    })
}

/// The columns of `env_cache` that [`cache_entry_of`] reads.
pub(super) const ENV_CACHE_COLUMNS: &str =
    "tenant, cache_key, environment, bytes, created_at, last_used_at";

/// An `env_cache` row selected with [`ENV_CACHE_COLUMNS`].
pub(super) fn cache_entry_of<R, DB>(
    row: &R,
) -> Result<patchflow_core::environment::EnvCacheEntry, StoreError>
where
    R: Row<Database = DB>,
    DB: Database,
    for<'a> &'a str: ColumnIndex<R>,
    for<'r> String: Decode<'r, DB> + Type<DB>,
    for<'r> i64: Decode<'r, DB> + Type<DB>,
{
    let tenant: String = row.try_get("tenant")?;
    let key: String = row.try_get("cache_key")?;
    let bytes: i64 = row.try_get("bytes")?;
    Ok(patchflow_core::environment::EnvCacheEntry {
        bytes: u64::try_from(bytes)
            .map_err(|e| corrupt_row(format!("cache entry {tenant}/{key}"), &e))?,
        environment: row.try_get("environment")?,
        created_at: time_of(row.try_get("created_at")?),
        last_used_at: time_of(row.try_get("last_used_at")?),
        tenant,
        key,
    })
}

#[cfg(test)]
mod tests {
    use super::stored_model;

    #[test]
    fn a_model_name_is_kept_to_its_first_200_characters() {
        assert_eq!(stored_model("gpt-x"), "gpt-x");
        let long = "é".repeat(250);
        assert_eq!(stored_model(&long).chars().count(), 200);
        assert_eq!(stored_model(&"m".repeat(200)), "m".repeat(200));
    }
}
