//! The task store, written once for every SQL database: each statement, the order of the
//! writes and the locking rules live here. What a database does its own way (how a status
//! write locks, how a taken key shows, how a new `seq` comes back, what text it can hold)
//! comes from its [`Dialect`]. The columns are the same everywhere: times as Unix
//! milliseconds, the spec and summary as JSON text, statuses by name (see `rows.rs`).

use async_trait::async_trait;
use patchflow_core::auth::ApiToken;
use patchflow_core::environment::{EnvCacheEntry, EnvironmentRecord};
use patchflow_core::{
    AgentSummary, CandidateRecord, TaskEvent, TaskEventKind, TaskId, TaskRecord, TaskSpec,
    TaskStatus, TurnRecord, UsageRow,
};
use sqlx::{ColumnIndex, Decode, Encode, Executor, IntoArguments, Pool, QueryBuilder, Type};

use super::attempts::{self, Current, Plan};
use super::dialect::{Dialect, NewSeq, TaskLock};
use super::rows::{
    ATTEMPT_COLUMNS, COLUMNS, ENV_CACHE_COLUMNS, ENVIRONMENT_COLUMNS, TOKEN_COLUMNS, USAGE_SUMS,
    attach_attempts, attempt_of, cache_entry_of, corrupt, environment_of, event_of, now_ms,
    record_of, stored_model, stored_u64, token_of, usage_of,
};
use super::{Inserted, ListFilter, StatusChange, StoreError, TaskStore, UsageQuery};

/// The message of a task's first status.
const SUBMITTED: &str = "submitted";

/// The task store on one SQL database kind (`DB` is sqlx's type for it).
pub struct SqlStore<DB: Dialect> {
    pool: Pool<DB>,
}

impl<DB: Dialect> SqlStore<DB> {
    /// Connects to `url` and applies pending migrations (see each dialect's
    /// [`Dialect::connect`] for the URLs it takes).
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Ok(Self {
            pool: DB::connect(url).await?,
        })
    }
}

/// The SQL that locks the row a status write reads, where the dialect locks rows.
fn row_lock<DB: Dialect>() -> &'static str {
    match DB::TASK_LOCK {
        TaskLock::WholeDatabase { .. } => "",
        TaskLock::Row => " FOR UPDATE",
    }
}

// The bounds below say that sqlx can run statements on `DB` and move the few Rust types the
// store uses (text, 64-bit integers, doubles for dollars) in and out of it. Rust does not carry them with
// `Dialect`, so both impl blocks repeat them.
impl<DB> SqlStore<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB> + ColumnIndex<DB::Row>,
    for<'a> Option<&'a str>: Encode<'a, DB>,
    for<'a> i64: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> Option<i64>: Encode<'a, DB>,
    for<'a> f64: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> String: Decode<'a, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
{
    /// Finishes `UPDATE tasks SET …` (the columns pushed already) with `updated_at` and the
    /// task's id; a task that is not there is `NotFound`.
    async fn set_columns(
        &self,
        mut q: QueryBuilder<DB>,
        task_id: &TaskId,
    ) -> Result<(), StoreError> {
        q.push(", updated_at = ")
            .push_bind(now_ms())
            .push(" WHERE task_id = ")
            .push_bind(task_id.as_str());
        let done = q.build().execute(&self.pool).await?;
        if DB::rows_affected(&done) == 0 {
            return Err(StoreError::NotFound(task_id.clone()));
        }
        Ok(())
    }

    async fn insert_event(
        conn: &mut DB::Connection,
        task_id: &TaskId,
        kind: TaskEventKind,
        status: Option<TaskStatus>,
        message: &str,
        at: i64,
    ) -> Result<i64, StoreError> {
        let mut q = QueryBuilder::<DB>::new(
            "INSERT INTO task_events (task_id, kind, status, message, at) VALUES (",
        );
        q.separated(", ")
            .push_bind(task_id.as_str())
            .push_bind(kind.as_str())
            .push_bind(status.map(|s| s.as_str()))
            .push_bind(&*DB::storable_text(message))
            .push_bind(at);
        q.push(")");
        match DB::NEW_SEQ {
            NewSeq::Returning => {
                q.push(" RETURNING seq");
                Ok(q.build_query_scalar::<i64>().fetch_one(&mut *conn).await?)
            }
            NewSeq::LastInsertId(seq_of) => {
                let done = q.build().execute(&mut *conn).await?;
                i64::try_from(seq_of(&done)).map_err(|e| corrupt(task_id.as_str(), &e))
            }
        }
    }

    /// Fills in the attempts of records read from `tasks`.
    async fn with_attempts(&self, records: &mut [TaskRecord]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut q = QueryBuilder::<DB>::new(format!(
            "SELECT {ATTEMPT_COLUMNS} FROM task_attempts WHERE task_id IN ("
        ));
        let mut ids = q.separated(", ");
        for r in records.iter() {
            ids.push_bind(r.task_id.as_str());
        }
        q.push(") ORDER BY task_id, attempt");
        let rows = q.build().fetch_all(&self.pool).await?;
        let attempts = rows.iter().map(attempt_of).collect::<Result<Vec<_>, _>>()?;
        attach_attempts(records, attempts);
        Ok(())
    }

    /// Sets the current status and message of a task (and its attempt number, for a new
    /// attempt).
    async fn update_task(
        conn: &mut DB::Connection,
        task_id: &TaskId,
        status: TaskStatus,
        message: &str,
        now: i64,
        new_attempt: Option<u32>,
    ) -> Result<(), StoreError> {
        let mut q = QueryBuilder::<DB>::new("UPDATE tasks SET status = ");
        q.push_bind(status.as_str())
            .push(", message = ")
            .push_bind(&*DB::storable_text(message))
            .push(", updated_at = ")
            .push_bind(now);
        if let Some(number) = new_attempt {
            // A new attempt runs the task again from its first turn.
            q.push(", attempt = ").push_bind(i64::from(number));
            q.push(", turns = NULL, candidates = NULL, selected = NULL");
        }
        q.push(" WHERE task_id = ").push_bind(task_id.as_str());
        q.build().execute(&mut *conn).await?;
        Ok(())
    }

    /// Begins a transaction holding the task's lock (see [`TaskLock`]).
    async fn locked(&self) -> Result<sqlx::Transaction<'static, DB>, StoreError> {
        Ok(match DB::TASK_LOCK {
            TaskLock::WholeDatabase { begin } => self.pool.begin_with(begin).await?,
            TaskLock::Row => self.pool.begin().await?,
        })
    }

    /// The run that carries attempt `attempt` on from now (a conversation's next run).
    async fn adopt_run(
        tx: &mut DB::Connection,
        task_id: &TaskId,
        attempt: i64,
        run_id: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut q = QueryBuilder::<DB>::new("UPDATE task_attempts SET run_id = ");
        q.push_bind(run_id)
            .push(" WHERE task_id = ")
            .push_bind(task_id.as_str())
            .push(" AND attempt = ")
            .push_bind(attempt);
        q.build().execute(&mut *tx).await?;
        Ok(())
    }

    /// Reads one JSON list column of a task under the lock taken by [`Self::locked`].
    async fn locked_list<T: serde::de::DeserializeOwned>(
        tx: &mut DB::Connection,
        task_id: &TaskId,
        column: &str,
    ) -> Result<Vec<T>, StoreError> {
        let mut q = QueryBuilder::<DB>::new(format!("SELECT {column} FROM tasks WHERE task_id = "));
        q.push_bind(task_id.as_str()).push(row_lock::<DB>());
        let row: Option<(Option<String>,)> = q.build_query_as().fetch_optional(&mut *tx).await?;
        let Some((text,)) = row else {
            return Err(StoreError::NotFound(task_id.clone()));
        };
        super::rows::json_list(task_id.as_str(), text.as_deref())
    }

    /// Writes one JSON list column of a task.
    async fn write_list<T: serde::Serialize>(
        tx: &mut DB::Connection,
        task_id: &TaskId,
        column: &str,
        list: &[T],
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(list).map_err(|e| corrupt(task_id.as_str(), &e))?;
        let mut q = QueryBuilder::<DB>::new(format!("UPDATE tasks SET {column} = "));
        q.push_bind(json.as_str())
            .push(", updated_at = ")
            .push_bind(now_ms())
            .push(" WHERE task_id = ")
            .push_bind(task_id.as_str());
        q.build().execute(&mut *tx).await?;
        Ok(())
    }

    /// One status write, placed among the task's attempts (see [`attempts::plan`]), under
    /// the dialect's [`TaskLock`] from the read that decides until commit, so no other
    /// writer comes in between.
    async fn write_status(
        &self,
        task_id: &TaskId,
        run: Option<&str>,
        status: TaskStatus,
        message: &str,
    ) -> Result<StatusChange, StoreError> {
        let now = now_ms();
        let mut tx = self.locked().await?;
        let mut q = QueryBuilder::<DB>::new("SELECT status, attempt FROM tasks WHERE task_id = ");
        q.push_bind(task_id.as_str()).push(row_lock::<DB>());
        let row: Option<(String, i64)> = q.build_query_as().fetch_optional(&mut *tx).await?;
        let Some((current, attempt)) = row else {
            return Err(StoreError::NotFound(task_id.clone()));
        };
        let current: TaskStatus = current.parse().map_err(|e| corrupt(task_id.as_str(), &e))?;
        let attempt = u32::try_from(attempt).unwrap_or(1);
        let mut q =
            QueryBuilder::<DB>::new("SELECT attempt, run_id FROM task_attempts WHERE task_id = ");
        q.push_bind(task_id.as_str());
        let runs: Vec<(i64, Option<String>)> = q.build_query_as().fetch_all(&mut *tx).await?;
        let runs: Vec<(u32, Option<String>)> = runs
            .into_iter()
            .map(|(n, r)| (u32::try_from(n).unwrap_or(1), r))
            .collect();
        let finished = status.is_terminal().then_some(now);
        let stored_message = DB::storable_text(message);
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
                Self::update_task(&mut tx, task_id, status, message, now, None).await?;
                let mut q = QueryBuilder::<DB>::new("UPDATE task_attempts SET status = ");
                q.push_bind(status.as_str())
                    .push(", message = ")
                    .push_bind(&*stored_message)
                    .push(", finished_at = ")
                    .push_bind(finished)
                    .push(", run_id = COALESCE(run_id, ")
                    .push_bind(if adopt_run { run } else { None })
                    .push(") WHERE task_id = ")
                    .push_bind(task_id.as_str())
                    .push(" AND attempt = ")
                    .push_bind(i64::from(attempt));
                q.build().execute(&mut *tx).await?;
            }
            Plan::New {
                number,
                close_previous,
            } => {
                if close_previous {
                    let mut q = QueryBuilder::<DB>::new("UPDATE task_attempts SET status = ");
                    q.push_bind(TaskStatus::Cancelled.as_str())
                        .push(", message = ")
                        .push_bind(attempts::replaced_message(number).as_str())
                        .push(", finished_at = ")
                        .push_bind(now)
                        .push(" WHERE task_id = ")
                        .push_bind(task_id.as_str())
                        .push(" AND attempt = ")
                        .push_bind(i64::from(attempt));
                    q.build().execute(&mut *tx).await?;
                }
                let mut q = QueryBuilder::<DB>::new(
                    "INSERT INTO task_attempts (task_id, attempt, run_id, status, message, started_at, finished_at) VALUES (",
                );
                q.separated(", ")
                    .push_bind(task_id.as_str())
                    .push_bind(i64::from(number))
                    .push_bind(run)
                    .push_bind(status.as_str())
                    .push_bind(&*stored_message)
                    .push_bind(now)
                    .push_bind(finished);
                q.push(")");
                q.build().execute(&mut *tx).await?;
                Self::update_task(&mut tx, task_id, status, message, now, Some(number)).await?;
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

    /// Creates the task, its first event and its first attempt in one transaction. `false`
    /// when the id or the tenant's idempotency key is taken (then nothing was written).
    async fn create(
        &self,
        task_id: &TaskId,
        spec: &TaskSpec,
        spec_json: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        // A concurrent insert of the same id or key waits here for the other transaction
        // and then sees the key taken.
        let mut q = QueryBuilder::<DB>::new(
            "INSERT INTO tasks (task_id, tenant, idempotency_key, batch_id, status, message, spec, model, created_at, updated_at) VALUES (",
        );
        q.separated(", ")
            .push_bind(task_id.as_str())
            .push_bind(spec.tenant.as_str())
            .push_bind(spec.idempotency_key.as_deref())
            .push_bind(spec.batch_id.as_deref())
            .push_bind(TaskStatus::Pending.as_str())
            .push_bind(SUBMITTED)
            .push_bind(spec_json)
            .push_bind(stored_model(spec.model.as_deref().unwrap_or_default()))
            .push_bind(now)
            .push_bind(now);
        q.push(")").push(DB::INSERT_UNLESS_TAKEN);
        let created = match q.build().execute(&mut *tx).await {
            Ok(done) => DB::rows_affected(&done) == 1,
            Err(e) if DB::is_duplicate_key(&e) => false,
            Err(e) => return Err(e.into()),
        };
        if !created {
            tx.rollback().await?;
            return Ok(false);
        }
        Self::insert_event(
            &mut tx,
            task_id,
            TaskEventKind::Status,
            Some(TaskStatus::Pending),
            SUBMITTED,
            now,
        )
        .await?;
        let mut q = QueryBuilder::<DB>::new(
            "INSERT INTO task_attempts (task_id, attempt, status, message, started_at) VALUES (",
        );
        q.separated(", ")
            .push_bind(task_id.as_str())
            .push("1")
            .push_bind(TaskStatus::Pending.as_str())
            .push_bind(SUBMITTED)
            .push_bind(now);
        q.push(")");
        q.build().execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(true)
    }
}

#[async_trait]
impl<DB> TaskStore for SqlStore<DB>
where
    DB: Dialect,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    for<'a> &'a str: Encode<'a, DB> + Type<DB> + ColumnIndex<DB::Row>,
    for<'a> Option<&'a str>: Encode<'a, DB>,
    for<'a> i64: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> Option<i64>: Encode<'a, DB>,
    for<'a> f64: Encode<'a, DB> + Decode<'a, DB> + Type<DB>,
    for<'a> String: Decode<'a, DB> + Type<DB>,
    usize: ColumnIndex<DB::Row>,
{
    async fn insert(&self, task_id: &TaskId, spec: &TaskSpec) -> Result<Inserted, StoreError> {
        let now = now_ms();
        let spec_json = serde_json::to_string(spec).map_err(|e| corrupt(task_id.as_str(), &e))?;
        if self.create(task_id, spec, &spec_json, now).await? {
            let rec = self
                .get(task_id)
                .await?
                .ok_or_else(|| StoreError::NotFound(task_id.clone()))?;
            return Ok(Inserted::Created(rec));
        }
        // Taken: by the same id, or by the same tenant + idempotency key.
        let mut q =
            QueryBuilder::<DB>::new(format!("SELECT {COLUMNS} FROM tasks WHERE task_id = "));
        q.push_bind(task_id.as_str())
            .push(" OR (tenant = ")
            .push_bind(spec.tenant.as_str())
            .push(" AND idempotency_key = ")
            .push_bind(spec.idempotency_key.as_deref())
            .push(") LIMIT 1");
        match q.build().fetch_optional(&self.pool).await? {
            Some(row) => Ok(Inserted::Existing(record_of(&row)?)),
            None => Err(StoreError::NotFound(task_id.clone())),
        }
    }

    async fn get(&self, task_id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let mut q =
            QueryBuilder::<DB>::new(format!("SELECT {COLUMNS} FROM tasks WHERE task_id = "));
        q.push_bind(task_id.as_str());
        let Some(row) = q.build().fetch_optional(&self.pool).await? else {
            return Ok(None);
        };
        let mut records = [record_of(&row)?];
        self.with_attempts(&mut records).await?;
        let [record] = records;
        Ok(Some(record))
    }

    async fn list(&self, filter: &ListFilter) -> Result<Vec<TaskRecord>, StoreError> {
        let mut q = QueryBuilder::<DB>::new(format!("SELECT {COLUMNS} FROM tasks WHERE 1 = 1"));
        if let Some(s) = filter.status {
            q.push(" AND status = ").push_bind(s.as_str());
        }
        if let Some(t) = &filter.tenant {
            q.push(" AND tenant = ").push_bind(t.as_str());
        }
        if let Some(b) = &filter.batch_id {
            q.push(" AND batch_id = ").push_bind(b.as_str());
        }
        if let Some(c) = &filter.cursor {
            q.push(" AND (created_at < ")
                .push_bind(c.created_at_ms)
                .push(" OR (created_at = ")
                .push_bind(c.created_at_ms)
                .push(" AND task_id < ")
                .push_bind(c.task_id.as_str())
                .push("))");
        }
        q.push(" ORDER BY created_at DESC, task_id DESC LIMIT ")
            .push_bind(i64::from(filter.limit.max(1)));
        let rows = q.build().fetch_all(&self.pool).await?;
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
        let json = serde_json::to_string(summary).map_err(|e| corrupt(task_id.as_str(), &e))?;
        let mut q = QueryBuilder::<DB>::new("UPDATE tasks SET summary = ");
        q.push_bind(json.as_str())
            .push(", model = ")
            .push_bind(stored_model(&summary.model));
        for (column, n) in [
            ("prompt_tokens", summary.prompt_tokens),
            ("completion_tokens", summary.completion_tokens),
            ("cached_tokens", summary.cached_tokens),
            ("reasoning_tokens", summary.reasoning_tokens),
            ("total_tokens", summary.total_tokens),
        ] {
            q.push(format!(", {column} = ")).push_bind(stored_u64(n));
        }
        // A cost that is not a finite amount of dollars (it never should be) counts as none.
        let cost = Some(summary.cost_usd).filter(|c| c.is_finite() && *c >= 0.0);
        q.push(", cost_usd = ").push_bind(cost.unwrap_or(0.0));
        self.set_columns(q, task_id).await
    }

    async fn usage(&self, query: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
        let mut q = QueryBuilder::<DB>::new(format!(
            "SELECT {day} AS day, tenant, COALESCE(NULLIF(model, ''), ",
            day = DB::day_of_ms("created_at"),
        ));
        q.push_bind(query.default_model.as_str())
            .push(") AS model, COUNT(*) AS tasks");
        for column in USAGE_SUMS {
            q.push(format!(", {} AS {column}", DB::sum_integer(column)));
        }
        q.push(format!(", {} AS cost_usd", DB::sum_double("cost_usd")))
            .push(" FROM tasks WHERE created_at >= ")
            .push_bind(query.from.timestamp_millis())
            .push(" AND created_at < ")
            .push_bind(query.to.timestamp_millis());
        if let Some(t) = &query.tenant {
            q.push(" AND tenant = ").push_bind(t.as_str());
        }
        // By position: the model's expression holds a parameter, which a repeated
        // expression would bind again (and PostgreSQL would not see as the same).
        q.push(" GROUP BY 1, 2, 3");
        let rows = q.build().fetch_all(&self.pool).await?;
        let mut usage = rows.iter().map(usage_of).collect::<Result<Vec<_>, _>>()?;
        // The databases collate tenants and models differently: byte order here.
        usage.sort_by(|a, b| {
            (a.day, a.tenant.as_bytes(), a.model.as_bytes()).cmp(&(
                b.day,
                b.tenant.as_bytes(),
                b.model.as_bytes(),
            ))
        });
        Ok(usage)
    }

    async fn begin_turn(
        &self,
        task_id: &TaskId,
        run_id: Option<&str>,
        turn: &TurnRecord,
    ) -> Result<StatusChange, StoreError> {
        let now = now_ms();
        let mut tx = self.locked().await?;
        let mut q = QueryBuilder::<DB>::new(
            "SELECT status, attempt, turns, spec, summary, created_at, updated_at FROM tasks WHERE task_id = ",
        );
        q.push_bind(task_id.as_str()).push(row_lock::<DB>());
        type Row = (
            String,
            i64,
            Option<String>,
            String,
            Option<String>,
            i64,
            i64,
        );
        let row: Option<Row> = q.build_query_as().fetch_optional(&mut *tx).await?;
        let Some((current, attempt, turns, spec, summary, created, updated)) = row else {
            return Err(StoreError::NotFound(task_id.clone()));
        };
        let id = task_id.as_str();
        let current: TaskStatus = current.parse().map_err(|e| corrupt(id, &e))?;
        let mut turns: Vec<TurnRecord> = super::rows::json_list(id, turns.as_deref())?;
        if turns.iter().any(|t| t.turn == turn.turn)
            || !matches!(current, TaskStatus::Completed | TaskStatus::Failed)
        {
            // Begun already (or not a task that can go on): only the run that carries it.
            if run_id.is_some() && turns.iter().any(|t| t.turn == turn.turn) {
                Self::adopt_run(&mut tx, task_id, attempt, run_id).await?;
            }
            tx.commit().await?;
            return Ok(StatusChange::Ignored { current });
        }
        if turns.is_empty() {
            let spec: TaskSpec = serde_json::from_str(&spec).map_err(|e| corrupt(id, &e))?;
            let summary = summary
                .map(|s| serde_json::from_str::<AgentSummary>(&s))
                .transpose()
                .map_err(|e| corrupt(id, &e))?;
            turns.push(TurnRecord {
                turn: 1,
                message: spec.task_description,
                status: current,
                summary: summary.map(|s| s.summary).unwrap_or_default(),
                started_at: super::rows::time_of(created),
                finished_at: Some(super::rows::time_of(updated)),
            });
        }
        turns.push(turn.clone());
        Self::write_list(&mut tx, task_id, "turns", &turns).await?;
        let message = format!("turn {}: running the agent on the follow-up", turn.turn);
        Self::update_task(
            &mut tx,
            task_id,
            TaskStatus::RunningAgent,
            &message,
            now,
            None,
        )
        .await?;
        let mut q = QueryBuilder::<DB>::new("UPDATE task_attempts SET status = ");
        q.push_bind(TaskStatus::RunningAgent.as_str())
            .push(", message = ")
            .push_bind(&*DB::storable_text(&message))
            .push(", finished_at = ")
            .push_bind(None::<i64>)
            .push(" WHERE task_id = ")
            .push_bind(id)
            .push(" AND attempt = ")
            .push_bind(attempt);
        q.build().execute(&mut *tx).await?;
        if run_id.is_some() {
            Self::adopt_run(&mut tx, task_id, attempt, run_id).await?;
        }
        let seq = Self::insert_event(
            &mut tx,
            task_id,
            TaskEventKind::Status,
            Some(TaskStatus::RunningAgent),
            &message,
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(StatusChange::Applied { seq })
    }

    async fn put_turn(&self, task_id: &TaskId, turn: &TurnRecord) -> Result<(), StoreError> {
        let mut tx = self.locked().await?;
        let mut turns: Vec<TurnRecord> = Self::locked_list(&mut tx, task_id, "turns").await?;
        match turns.iter_mut().find(|t| t.turn == turn.turn) {
            Some(t) => *t = turn.clone(),
            None => {
                turns.push(turn.clone());
                turns.sort_by_key(|t| t.turn);
            }
        }
        Self::write_list(&mut tx, task_id, "turns", &turns).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn put_candidate(
        &self,
        task_id: &TaskId,
        candidate: &CandidateRecord,
    ) -> Result<(), StoreError> {
        let mut tx = self.locked().await?;
        let mut list: Vec<CandidateRecord> =
            Self::locked_list(&mut tx, task_id, "candidates").await?;
        match list.iter_mut().find(|c| c.candidate == candidate.candidate) {
            Some(c) => *c = candidate.clone(),
            None => {
                list.push(candidate.clone());
                list.sort_by_key(|c| c.candidate);
            }
        }
        Self::write_list(&mut tx, task_id, "candidates", &list).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn set_attempt_worker(
        &self,
        task_id: &TaskId,
        run_id: &str,
        worker: &str,
    ) -> Result<bool, StoreError> {
        let mut q = QueryBuilder::<DB>::new("UPDATE task_attempts SET worker = ");
        q.push_bind(worker)
            .push(" WHERE task_id = ")
            .push_bind(task_id.as_str())
            .push(" AND run_id = ")
            .push_bind(run_id);
        let done = q.build().execute(&self.pool).await?;
        Ok(DB::rows_affected(&done) > 0)
    }

    async fn result_sent(&self, task_id: &TaskId) -> Result<Option<String>, StoreError> {
        let mut q = QueryBuilder::<DB>::new("SELECT result_sent FROM tasks WHERE task_id = ");
        q.push_bind(task_id.as_str());
        let row: Option<(Option<String>,)> = q.build_query_as().fetch_optional(&self.pool).await?;
        match row {
            Some((marker,)) => Ok(marker),
            None => Err(StoreError::NotFound(task_id.clone())),
        }
    }

    async fn set_result_sent(&self, task_id: &TaskId, marker: &str) -> Result<(), StoreError> {
        // Not a change of the task: `updated_at` stays.
        let mut q = QueryBuilder::<DB>::new("UPDATE tasks SET result_sent = ");
        q.push_bind(marker)
            .push(" WHERE task_id = ")
            .push_bind(task_id.as_str());
        let done = q.build().execute(&self.pool).await?;
        if DB::rows_affected(&done) == 0 {
            return Err(StoreError::NotFound(task_id.clone()));
        }
        Ok(())
    }

    async fn set_selected(
        &self,
        task_id: &TaskId,
        selected: Option<u32>,
    ) -> Result<(), StoreError> {
        let mut q = QueryBuilder::<DB>::new("UPDATE tasks SET selected = ");
        q.push_bind(selected.map(i64::from));
        self.set_columns(q, task_id).await
    }

    async fn set_pull_request(
        &self,
        task_id: &TaskId,
        pr_url: Option<&str>,
        pr_error: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut q = QueryBuilder::<DB>::new("UPDATE tasks SET pr_url = ");
        q.push_bind(pr_url)
            .push(", pr_error = ")
            .push_bind(pr_error);
        self.set_columns(q, task_id).await
    }

    async fn append_event(
        &self,
        task_id: &TaskId,
        kind: TaskEventKind,
        message: &str,
    ) -> Result<i64, StoreError> {
        if let TaskLock::WholeDatabase { .. } = DB::TASK_LOCK {
            // One writer at a time: events become visible in `seq` order by themselves.
            let mut conn = self.pool.acquire().await?;
            return Self::insert_event(&mut conn, task_id, kind, None, message, now_ms()).await;
        }
        // Sequence numbers are handed out when a row is inserted, not when it commits. Two
        // writers of one task could otherwise commit out of order, and a reader resuming
        // after the higher number would never see the lower one. Holding the task's row
        // lock while inserting keeps one task's events visible in `seq` order, as a single
        // writer does. An unknown task has no row to lock; the insert then fails on the
        // foreign key, as it does there.
        let mut tx = self.pool.begin().await?;
        let mut q = QueryBuilder::<DB>::new("SELECT 1 FROM tasks WHERE task_id = ");
        q.push_bind(task_id.as_str()).push(row_lock::<DB>());
        q.build().fetch_optional(&mut *tx).await?;
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
        let mut q = QueryBuilder::<DB>::new(
            "SELECT seq, kind, status, message, at FROM task_events WHERE task_id = ",
        );
        q.push_bind(task_id.as_str())
            .push(" AND seq > ")
            .push_bind(after_seq)
            .push(" ORDER BY seq LIMIT ")
            .push_bind(i64::from(limit.max(1)));
        let rows = q.build().fetch_all(&self.pool).await?;
        rows.iter()
            .map(|row| event_of(task_id.as_str(), row))
            .collect()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_token(&self, token: &ApiToken, hash: &str) -> Result<(), StoreError> {
        let mut q = QueryBuilder::<DB>::new(
            "INSERT INTO api_tokens (token_id, token_hash, tenant, role, name, created_at, expires_at) VALUES (",
        );
        q.push_bind(token.token_id.as_str())
            .push(", ")
            .push_bind(hash)
            .push(", ")
            .push_bind(token.tenant.as_str())
            .push(", ")
            .push_bind(token.role.as_str())
            .push(", ")
            .push_bind(token.name.as_str())
            .push(", ")
            .push_bind(token.created_at.timestamp_millis())
            .push(", ")
            .push_bind(token.expires_at.map(|e| e.timestamp_millis()))
            .push(")");
        q.build().execute(&self.pool).await?;
        Ok(())
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<ApiToken>, StoreError> {
        let mut q = QueryBuilder::<DB>::new(format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens WHERE token_hash = "
        ));
        q.push_bind(hash);
        q.build()
            .fetch_optional(&self.pool)
            .await?
            .map(|row| token_of(&row))
            .transpose()
    }

    async fn list_tokens(&self) -> Result<Vec<ApiToken>, StoreError> {
        let mut q = QueryBuilder::<DB>::new(format!(
            "SELECT {TOKEN_COLUMNS} FROM api_tokens ORDER BY created_at DESC, token_id DESC"
        ));
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(token_of)
            .collect()
    }

    async fn revoke_token(&self, token_id: &str) -> Result<bool, StoreError> {
        let mut q = QueryBuilder::<DB>::new("UPDATE api_tokens SET revoked_at = ");
        q.push_bind(now_ms())
            .push(" WHERE token_id = ")
            .push_bind(token_id)
            .push(" AND revoked_at IS NULL");
        let done = q.build().execute(&self.pool).await?;
        Ok(DB::rows_affected(&done) == 1)
    }

    async fn touch_token(&self, token_id: &str) -> Result<(), StoreError> {
        let mut q = QueryBuilder::<DB>::new("UPDATE api_tokens SET last_used_at = ");
        q.push_bind(now_ms())
            .push(" WHERE token_id = ")
            .push_bind(token_id);
        q.build().execute(&self.pool).await?;
        Ok(())
    }

    async fn count_tokens(&self) -> Result<u64, StoreError> {
        let mut q = QueryBuilder::<DB>::new("SELECT COUNT(*) FROM api_tokens");
        let row = q.build().fetch_one(&self.pool).await?;
        let n: i64 = sqlx::Row::try_get(&row, 0usize)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn put_environment(
        &self,
        env: &EnvironmentRecord,
        replace: bool,
    ) -> Result<bool, StoreError> {
        let bad = |e: &serde_json::Error| StoreError::CorruptRow {
            what: format!("environment {}/{}", env.tenant, env.name),
            reason: e.to_string(),
        };
        let definition = serde_json::to_string(&env.setup).map_err(|e| bad(&e))?;
        let secrets = serde_json::to_string(&env.secrets).map_err(|e| bad(&e))?;
        if replace {
            let mut q = QueryBuilder::<DB>::new("UPDATE environments SET repo = ");
            q.push_bind(env.repo.as_deref())
                .push(", definition = ")
                .push_bind(definition.as_str())
                .push(", secrets = ")
                .push_bind(secrets.as_str())
                .push(", secrets_version = ")
                .push_bind(stored_u64(env.secrets_version))
                .push(", cache_generation = ")
                .push_bind(stored_u64(env.cache_generation))
                .push(", created_at = ")
                .push_bind(env.created_at.timestamp_millis())
                .push(", updated_at = ")
                .push_bind(env.updated_at.timestamp_millis())
                .push(" WHERE tenant = ")
                .push_bind(env.tenant.as_str())
                .push(" AND name = ")
                .push_bind(env.name.as_str());
            let done = q.build().execute(&self.pool).await?;
            return Ok(DB::rows_affected(&done) == 1);
        }
        let mut q = QueryBuilder::<DB>::new(format!(
            "INSERT INTO environments ({ENVIRONMENT_COLUMNS}) VALUES ("
        ));
        q.separated(", ")
            .push_bind(env.tenant.as_str())
            .push_bind(env.name.as_str())
            .push_bind(env.repo.as_deref())
            .push_bind(definition.as_str())
            .push_bind(secrets.as_str())
            .push_bind(stored_u64(env.secrets_version))
            .push_bind(stored_u64(env.cache_generation))
            .push_bind(env.created_at.timestamp_millis())
            .push_bind(env.updated_at.timestamp_millis());
        q.push(")").push(DB::INSERT_UNLESS_TAKEN);
        match q.build().execute(&self.pool).await {
            Ok(done) => Ok(DB::rows_affected(&done) == 1),
            Err(e) if DB::is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    async fn get_environment(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<EnvironmentRecord>, StoreError> {
        let mut q = QueryBuilder::<DB>::new(format!(
            "SELECT {ENVIRONMENT_COLUMNS} FROM environments WHERE tenant = "
        ));
        q.push_bind(tenant).push(" AND name = ").push_bind(name);
        q.build()
            .fetch_optional(&self.pool)
            .await?
            .map(|row| environment_of(&row))
            .transpose()
    }

    async fn list_environments(&self, tenant: &str) -> Result<Vec<EnvironmentRecord>, StoreError> {
        let mut q = QueryBuilder::<DB>::new(format!(
            "SELECT {ENVIRONMENT_COLUMNS} FROM environments WHERE tenant = "
        ));
        q.push_bind(tenant).push(" ORDER BY name");
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(environment_of)
            .collect()
    }

    async fn delete_environment(&self, tenant: &str, name: &str) -> Result<bool, StoreError> {
        let mut q = QueryBuilder::<DB>::new("DELETE FROM environments WHERE tenant = ");
        q.push_bind(tenant).push(" AND name = ").push_bind(name);
        let done = q.build().execute(&self.pool).await?;
        Ok(DB::rows_affected(&done) == 1)
    }

    async fn reset_environment_cache(
        &self,
        tenant: &str,
        name: &str,
    ) -> Result<Option<Vec<String>>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The UPDATE takes the environment's row (or, on SQLite, the database) first, so
        // two resets at once each bump the generation once, one after the other.
        let mut q = QueryBuilder::<DB>::new(
            "UPDATE environments SET cache_generation = cache_generation + 1, updated_at = ",
        );
        q.push_bind(now_ms())
            .push(" WHERE tenant = ")
            .push_bind(tenant)
            .push(" AND name = ")
            .push_bind(name);
        let done = q.build().execute(&mut *tx).await?;
        if DB::rows_affected(&done) == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        let mut q = QueryBuilder::<DB>::new("SELECT cache_key FROM env_cache WHERE tenant = ");
        q.push_bind(tenant)
            .push(" AND environment = ")
            .push_bind(name)
            .push(" ORDER BY cache_key");
        let keys: Vec<String> = q.build_query_scalar().fetch_all(&mut *tx).await?;
        // Exactly the keys answered (an entry written meanwhile is not removed unreported).
        for chunk in keys.chunks(500) {
            let mut q = QueryBuilder::<DB>::new("DELETE FROM env_cache WHERE tenant = ");
            q.push_bind(tenant).push(" AND cache_key IN (");
            let mut list = q.separated(", ");
            for k in chunk {
                list.push_bind(k.as_str());
            }
            q.push(")");
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(Some(keys))
    }

    async fn env_cache_get(
        &self,
        tenant: &str,
        key: &str,
    ) -> Result<Option<EnvCacheEntry>, StoreError> {
        let mut q = QueryBuilder::<DB>::new(format!(
            "SELECT {ENV_CACHE_COLUMNS} FROM env_cache WHERE tenant = "
        ));
        q.push_bind(tenant).push(" AND cache_key = ").push_bind(key);
        q.build()
            .fetch_optional(&self.pool)
            .await?
            .map(|row| cache_entry_of(&row))
            .transpose()
    }

    async fn env_cache_put(&self, entry: &EnvCacheEntry) -> Result<(), StoreError> {
        let mut q = QueryBuilder::<DB>::new(format!(
            "INSERT INTO env_cache ({ENV_CACHE_COLUMNS}) VALUES ("
        ));
        q.separated(", ")
            .push_bind(entry.tenant.as_str())
            .push_bind(entry.key.as_str())
            .push_bind(entry.environment.as_deref())
            .push_bind(stored_u64(entry.bytes))
            .push_bind(entry.created_at.timestamp_millis())
            .push_bind(entry.last_used_at.timestamp_millis());
        q.push(")").push(DB::upsert(
            &["tenant", "cache_key"],
            &["environment", "bytes", "created_at", "last_used_at"],
        ));
        q.build().execute(&self.pool).await?;
        Ok(())
    }

    async fn env_cache_touch(&self, tenant: &str, key: &str) -> Result<(), StoreError> {
        let mut q = QueryBuilder::<DB>::new("UPDATE env_cache SET last_used_at = ");
        q.push_bind(now_ms())
            .push(" WHERE tenant = ")
            .push_bind(tenant)
            .push(" AND cache_key = ")
            .push_bind(key);
        q.build().execute(&self.pool).await?;
        Ok(())
    }

    async fn env_cache_list(&self, tenant: &str) -> Result<Vec<EnvCacheEntry>, StoreError> {
        let mut q = QueryBuilder::<DB>::new(format!(
            "SELECT {ENV_CACHE_COLUMNS} FROM env_cache WHERE tenant = "
        ));
        q.push_bind(tenant)
            .push(" ORDER BY last_used_at, cache_key");
        q.build()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(cache_entry_of)
            .collect()
    }

    async fn env_cache_delete(&self, tenant: &str, key: &str) -> Result<bool, StoreError> {
        let mut q = QueryBuilder::<DB>::new("DELETE FROM env_cache WHERE tenant = ");
        q.push_bind(tenant).push(" AND cache_key = ").push_bind(key);
        let done = q.build().execute(&self.pool).await?;
        Ok(DB::rows_affected(&done) == 1)
    }
}
