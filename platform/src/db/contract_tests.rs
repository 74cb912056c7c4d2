//! One behaviour suite for every task-store back-end, so SQLite, PostgreSQL and MariaDB are
//! held to the same contract: each case takes the URL of an empty database and opens it
//! through [`crate::db::open`], as the binary does.
//!
//! The PostgreSQL and MariaDB cases run against real servers (`PATCHFLOW_TEST_POSTGRES_URL`,
//! default `postgres://postgres@127.0.0.1:5432/test`, and `PATCHFLOW_TEST_MARIADB_URL`,
//! default `mariadb://root@127.0.0.1:3306/test`; the user must be allowed to create
//! databases). Tests run in parallel, one process each, so every case gets a database of its
//! own, created before and dropped after. A server that cannot be reached fails the test
//! with a message saying so; nothing is skipped.

use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::panic::AssertUnwindSafe;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use patchflow_core::{
    AgentOutcome, AgentSummary, Limits, TaskEventKind, TaskId, TaskSource, TaskSpec, TaskStatus,
    UsageRow, Usd,
};
use sqlx::mysql::MySqlConnectOptions;
use sqlx::postgres::PgConnectOptions;
use sqlx::{AssertSqlSafe, Connection, MySqlConnection, PgConnection};

use super::{Inserted, ListCursor, ListFilter, StatusChange, StoreError, TaskStore, UsageQuery};

const POSTGRES_URL_VAR: &str = "PATCHFLOW_TEST_POSTGRES_URL";
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const MARIADB_URL_VAR: &str = "PATCHFLOW_TEST_MARIADB_URL";
const DEFAULT_MARIADB_URL: &str = "mariadb://root@127.0.0.1:3306/test";

/// How long the admin connection may take before the server counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------
// Fresh databases
// ---------------------------------------------------------------------------------------

/// Runs `case` on a new SQLite file in a temporary directory.
pub(crate) async fn with_sqlite<F, Fut>(case: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    case(format!(
        "sqlite://{}",
        dir.path().join("tasks.db").display()
    ))
    .await;
}

/// Runs `case` on a new database on the PostgreSQL test server, dropped afterwards even if
/// the case panics.
pub(crate) async fn with_postgres<F, Fut>(case: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let admin_url = server_url(POSTGRES_URL_VAR, DEFAULT_POSTGRES_URL);
    let opts = PgConnectOptions::from_str(&admin_url)
        .unwrap_or_else(|e| panic!("{POSTGRES_URL_VAR}=`{admin_url}` is not a URL: {e}"));
    let server = format!(
        "{}@{}:{}",
        opts.get_username(),
        opts.get_host(),
        opts.get_port()
    );
    let mut admin = reach(
        "PostgreSQL",
        &server,
        POSTGRES_URL_VAR,
        PgConnection::connect_with(&opts),
    )
    .await;
    let name = fresh_database_name();
    sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|e| panic!("creating test database {name} on PostgreSQL {server}: {e}"));
    let outcome = AssertUnwindSafe(case(with_database(&admin_url, &name)))
        .catch_unwind()
        .await;
    // FORCE ends the sessions the case's pools may still hold (they close lazily).
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await
    .unwrap_or_else(|e| panic!("dropping test database {name} on PostgreSQL {server}: {e}"));
    admin.close().await.unwrap();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Runs `case` on a new database on the MariaDB test server (URL scheme `mariadb://`, so
/// the mapping to sqlx's `mysql://` is exercised too), dropped afterwards even if the case
/// panics.
pub(crate) async fn with_mariadb<F, Fut>(case: F)
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = ()>,
{
    let admin_url = server_url(MARIADB_URL_VAR, DEFAULT_MARIADB_URL);
    let opts = MySqlConnectOptions::from_str(&as_mysql_url(&admin_url))
        .unwrap_or_else(|e| panic!("{MARIADB_URL_VAR}=`{admin_url}` is not a URL: {e}"));
    let server = format!(
        "{}@{}:{}",
        opts.get_username(),
        opts.get_host(),
        opts.get_port()
    );
    let mut admin = reach(
        "MariaDB",
        &server,
        MARIADB_URL_VAR,
        MySqlConnection::connect_with(&opts),
    )
    .await;
    let name = fresh_database_name();
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE DATABASE {name} CHARACTER SET utf8mb4"
    )))
    .execute(&mut admin)
    .await
    .unwrap_or_else(|e| panic!("creating test database {name} on MariaDB {server}: {e}"));
    let store_url = with_database(&admin_url, &name);
    let store_url = match store_url.strip_prefix("mysql://") {
        Some(rest) => format!("mariadb://{rest}"),
        None => store_url,
    };
    let outcome = AssertUnwindSafe(case(store_url)).catch_unwind().await;
    sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}")))
        .execute(&mut admin)
        .await
        .unwrap_or_else(|e| panic!("dropping test database {name} on MariaDB {server}: {e}"));
    admin.close().await.unwrap();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// sqlx knows MariaDB as `mysql://`.
pub(crate) fn as_mysql_url(url: &str) -> String {
    match url.strip_prefix("mariadb://") {
        Some(rest) => format!("mysql://{rest}"),
        None => url.to_string(),
    }
}

fn server_url(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.to_string())
}

/// The admin connection, or a failed test that says which server is missing.
async fn reach<C>(
    kind: &str,
    server: &str,
    var: &str,
    connect: impl Future<Output = Result<C, sqlx::Error>>,
) -> C {
    let unreachable = |why: String| -> ! {
        panic!(
            "the {kind} server for the task-store tests is not reachable as {server}: {why}. \
             Start it, or set {var} to a server where this user may CREATE DATABASE."
        )
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => unreachable(e.to_string()),
        Err(_) => unreachable(format!("no answer within {CONNECT_TIMEOUT:?}")),
    }
}

/// `pf_` and 24 random hex digits: unique across the parallel test processes.
fn fresh_database_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let random = RandomState::new().hash_one((
        std::process::id(),
        SystemTime::now(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
    ));
    format!("pf_{random:016x}{:08x}", std::process::id())
}

/// `url` with its path (the database name) replaced by `name`, query string kept.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let (scheme, rest) = base.split_once("://").unwrap();
    let authority = rest
        .split_once('/')
        .map_or(rest, |(authority, _)| authority);
    match query {
        Some(query) => format!("{scheme}://{authority}/{name}?{query}"),
        None => format!("{scheme}://{authority}/{name}"),
    }
}

// ---------------------------------------------------------------------------------------
// The cases
// ---------------------------------------------------------------------------------------

fn spec(key: Option<&str>) -> TaskSpec {
    let mut s = TaskSpec::new(
        TaskSource::Git {
            url: "https://example.com/r.git".into(),
            git_ref: None,
            git_token: None,
        },
        "fix",
    );
    s.idempotency_key = key.map(str::to_string);
    s
}

async fn open_store(url: &str) -> Arc<dyn TaskStore> {
    crate::db::open(url)
        .await
        .unwrap_or_else(|e| panic!("opening the task store at {url}: {e}"))
}

/// Two or more processes opening one new database at once all succeed, and opening it
/// again later migrates nothing and loses nothing.
pub(crate) async fn migrations_are_idempotent_and_safe_to_race(url: String) {
    let (a, b, c) = tokio::join!(
        crate::db::open(&url),
        crate::db::open(&url),
        crate::db::open(&url)
    );
    let (a, _b, _c) = (a.unwrap(), b.unwrap(), c.unwrap());
    let id = TaskId::generate();
    a.insert(&id, &spec(None)).await.unwrap();
    // Opening again runs the migrator again: nothing to do, nothing lost.
    let again = open_store(&url).await;
    assert!(again.get(&id).await.unwrap().is_some());
    again.ping().await.unwrap();
}

pub(crate) async fn idempotency_key_returns_the_first_task(url: String) {
    let s = open_store(&url).await;
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
    // The same id again (a retried submission) is the existing task as well.
    match s.insert(&first, &spec(None)).await.unwrap() {
        Inserted::Existing(r) => assert_eq!(r.task_id, first),
        other => panic!("expected the existing task, got {other:?}"),
    }
    // The key is per tenant, and tasks without a key never collide.
    let mut other_tenant = spec(Some("k"));
    other_tenant.tenant = "other".into();
    assert!(matches!(
        s.insert(&TaskId::generate(), &other_tenant).await.unwrap(),
        Inserted::Created(_)
    ));
    for _ in 0..2 {
        assert!(matches!(
            s.insert(&TaskId::generate(), &spec(None)).await.unwrap(),
            Inserted::Created(_)
        ));
    }
    // Keys compare exactly, as on SQLite: a different case is a different key.
    assert!(matches!(
        s.insert(&TaskId::generate(), &spec(Some("K")))
            .await
            .unwrap(),
        Inserted::Created(_)
    ));
}

/// Gateways racing to submit one idempotency key create exactly one task.
pub(crate) async fn concurrent_inserts_with_one_key_create_one_task(url: String) {
    let s = open_store(&url).await;
    let racers: Vec<_> = (0..6)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move {
                s.insert(&TaskId::generate(), &spec(Some("same-key")))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut results = Vec::new();
    for racer in racers {
        results.push(racer.await.unwrap());
    }
    let created: Vec<_> = results
        .iter()
        .filter(|r| matches!(r, Inserted::Created(_)))
        .collect();
    assert_eq!(created.len(), 1, "{results:?}");
    let winner = &created[0].record().task_id;
    assert!(results.iter().all(|r| &r.record().task_id == winner));
    let all = s
        .list(&ListFilter {
            limit: 100,
            ..ListFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(s.events(winner, 0, 100).await.unwrap().len(), 1);
}

pub(crate) async fn status_moves_forward_only_and_every_move_is_recorded(url: String) {
    let s = open_store(&url).await;
    let id = TaskId::generate();
    s.insert(&id, &spec(None)).await.unwrap();
    assert!(matches!(
        s.set_status(&id, TaskStatus::Queued, "q").await.unwrap(),
        StatusChange::Applied { .. }
    ));
    assert!(matches!(
        s.set_status(&id, TaskStatus::RunningAgent, "r")
            .await
            .unwrap(),
        StatusChange::Applied { .. }
    ));
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
    assert!(matches!(
        s.set_status(&id, TaskStatus::Completed, "done")
            .await
            .unwrap(),
        StatusChange::Applied { .. }
    ));
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
    assert_eq!(
        events.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [
            TaskEventKind::Status,
            TaskEventKind::Status,
            TaskEventKind::Status,
            TaskEventKind::Agent,
            TaskEventKind::Status
        ]
    );
    assert!(
        events
            .windows(2)
            .all(|w| w[0].seq < w[1].seq && w[0].at <= w[1].at)
    );
    // Resuming after a sequence number returns only what follows, in pages.
    assert_eq!(s.events(&id, events[2].seq, 100).await.unwrap().len(), 2);
    let page = s.events(&id, events[0].seq, 2).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [events[1].seq, events[2].seq]
    );
    assert!(matches!(
        s.set_status(&TaskId::generate(), TaskStatus::Queued, "x")
            .await,
        Err(StoreError::NotFound(_))
    ));
}

/// A reader following one task's history (`events?after=SEQ`, Server-Sent Events) while
/// several writers add to it never skips an event: whatever it has seen, everything with a
/// lower number is already visible.
pub(crate) async fn events_resume_by_seq_without_gaps_under_concurrent_writers(url: String) {
    const WRITERS: usize = 4;
    const EVENTS_PER_WRITER: usize = 25;
    let s = open_store(&url).await;
    let id = TaskId::generate();
    s.insert(&id, &spec(None)).await.unwrap();
    let mut writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (s, id) = (s.clone(), id.clone());
            tokio::spawn(async move {
                for i in 0..EVENTS_PER_WRITER {
                    s.append_event(&id, TaskEventKind::Agent, &format!("writer {w} event {i}"))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let moves = [
        TaskStatus::Queued,
        TaskStatus::DownloadingCode,
        TaskStatus::StagingCode,
        TaskStatus::RunningAgent,
        TaskStatus::UploadingResults,
    ];
    writers.push({
        let (s, id) = (s.clone(), id.clone());
        tokio::spawn(async move {
            for status in moves {
                assert!(matches!(
                    s.set_status(&id, status, "moving").await.unwrap(),
                    StatusChange::Applied { .. }
                ));
            }
        })
    });
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let finished = writers.iter().all(|w| w.is_finished());
        for e in s.events(&id, after, 1000).await.unwrap() {
            after = e.seq;
            seen.push(e.seq);
        }
        if finished {
            break;
        }
        tokio::task::yield_now().await;
    }
    for w in writers {
        w.await.unwrap();
    }
    let all: Vec<i64> = s
        .events(&id, 0, 1000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(all.len(), 1 + WRITERS * EVENTS_PER_WRITER + moves.len());
    assert_eq!(
        seen, all,
        "a reader resuming by seq missed events committed out of order"
    );
}

pub(crate) async fn list_pages_newest_first_with_filters(url: String) {
    let s = open_store(&url).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let id = TaskId::generate();
        s.insert(&id, &spec(None)).await.unwrap();
        ids.push(id);
        tokio::time::sleep(Duration::from_millis(2)).await;
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
            cursor: Some(cursor.clone()),
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
    // A status filter and a cursor together.
    let pending_after = s
        .list(&ListFilter {
            limit: 10,
            status: Some(TaskStatus::Pending),
            cursor: Some(cursor),
            ..ListFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(
        pending_after.iter().map(|r| &r.task_id).collect::<Vec<_>>(),
        [&ids[2], &ids[0]]
    );
    // Tasks created in the same millisecond are ordered by id, and the cursor splits them.
    let same_ms = ListCursor {
        created_at_ms: page1[0].created_at.timestamp_millis(),
        task_id: format!("{}~", ids[4]),
    };
    let from_tie = s
        .list(&ListFilter {
            limit: 1,
            cursor: Some(same_ms),
            ..ListFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(from_tie[0].task_id, ids[4]);
}

/// Everything a record holds comes back as it was stored (JSON spec and summary, text with
/// any characters), filters combine, and writes about unknown tasks fail without leaving
/// anything behind.
pub(crate) async fn record_keeps_what_was_stored_and_unknown_tasks_are_refused(url: String) {
    let s = open_store(&url).await;
    let mut full = spec(Some("key-1"));
    full.task_description =
        "Fix «ünïcödé» 🚀, 'single' and \"double\" quotes, a \\ backslash; DROP TABLE tasks; --"
            .into();
    full.tenant = "acme".into();
    full.batch_id = Some("batch-7".into());
    full.target_file = Some("src/x.py".into());
    full.model = Some("some-model".into());
    full.limits = Limits {
        max_steps: 3,
        max_tokens: 1_000,
        wall_seconds: 60,
        max_cost_usd: Some(Usd(0.125)),
    };
    let id = TaskId::generate();
    let created = match s.insert(&id, &full).await.unwrap() {
        Inserted::Created(r) => r,
        other => panic!("expected a new task, got {other:?}"),
    };
    let rec = s.get(&id).await.unwrap().unwrap();
    assert_eq!(rec.spec, full);
    assert_eq!(
        (
            rec.status,
            rec.message.as_str(),
            rec.tenant.as_str(),
            rec.batch_id.as_deref(),
            rec.idempotency_key.as_deref(),
        ),
        (
            TaskStatus::Pending,
            "submitted",
            "acme",
            Some("batch-7"),
            Some("key-1")
        )
    );
    assert_eq!(rec.created_at, created.created_at);
    assert_eq!(rec.created_at, rec.updated_at);
    assert_eq!((rec.summary.clone(), rec.pr_url.clone()), (None, None));

    let summary = AgentSummary {
        outcome: AgentOutcome::Finished,
        summary: "Changed «x» 🚀".into(),
        model: "some-model".into(),
        steps: 4,
        tool_calls: 7,
        prompt_tokens: 1_234,
        completion_tokens: 56,
        total_tokens: 1_290,
        cached_tokens: 1_000,
        reasoning_tokens: 20,
        cost_usd: 0.0375,
        compactions: 2,
        wall_ms: 9_876,
        files_changed: vec!["src/x.py".into(), "README.md".into()],
        tests_passed: None,
        error: Some("none really".into()),
        sandbox: None,
    };
    // Writing the same summary twice (a retried activity) succeeds both times.
    s.set_summary(&id, &summary).await.unwrap();
    s.set_summary(&id, &summary).await.unwrap();
    let rec = s.get(&id).await.unwrap().unwrap();
    assert_eq!(rec.summary, Some(summary.clone()));
    assert!(rec.updated_at >= rec.created_at);

    // A pull request's URL, or why there is none; each write replaces the last.
    let why = "the forge refused (403): «no» 🚫";
    s.set_pull_request(&id, None, Some(why)).await.unwrap();
    let rec = s.get(&id).await.unwrap().unwrap();
    assert_eq!((rec.pr_url, rec.pr_error.as_deref()), (None, Some(why)));
    s.set_pull_request(&id, Some("https://forge.example/o/r/pull/1"), None)
        .await
        .unwrap();
    let rec = s.get(&id).await.unwrap().unwrap();
    assert_eq!(
        (rec.pr_url.as_deref(), rec.pr_error),
        (Some("https://forge.example/o/r/pull/1"), None)
    );
    assert!(matches!(
        s.set_pull_request(&TaskId::generate(), None, None).await,
        Err(StoreError::NotFound(_))
    ));

    let only_it = s
        .list(&ListFilter {
            limit: 10,
            status: Some(TaskStatus::Pending),
            tenant: Some("acme".into()),
            batch_id: Some("batch-7".into()),
            cursor: None,
        })
        .await
        .unwrap();
    assert_eq!(only_it.len(), 1);
    assert_eq!(only_it[0].task_id, id);
    for (tenant, batch) in [("acme", "other"), ("other", "batch-7")] {
        let none = s
            .list(&ListFilter {
                limit: 10,
                tenant: Some(tenant.into()),
                batch_id: Some(batch.into()),
                ..ListFilter::default()
            })
            .await
            .unwrap();
        assert!(none.is_empty(), "{tenant}/{batch}: {none:?}");
    }

    let unknown = TaskId::generate();
    assert!(matches!(
        s.set_summary(&unknown, &summary).await,
        Err(StoreError::NotFound(ref t)) if *t == unknown
    ));
    match s
        .append_event(&unknown, TaskEventKind::Agent, "orphan")
        .await
    {
        Err(StoreError::Database(sqlx::Error::Database(e))) => {
            assert!(e.is_foreign_key_violation(), "{e}");
        }
        other => panic!("expected a foreign-key error, got {other:?}"),
    }
    assert!(s.events(&unknown, 0, 10).await.unwrap().is_empty());
    assert!(s.get(&unknown).await.unwrap().is_none());
    assert_eq!(s.events(&id, 0, 10).await.unwrap().len(), 1);
    s.ping().await.unwrap();
}

/// Moves a task's creation time (the store stamps every insert with now), on a connection
/// of the URL's own kind.
async fn backdate(url: &str, id: &TaskId, created_at: &str) {
    let ms = chrono::DateTime::parse_from_rfc3339(created_at)
        .unwrap()
        .timestamp_millis();
    if url.starts_with("sqlite:") {
        let mut c = sqlx::SqliteConnection::connect(url).await.unwrap();
        sqlx::query("UPDATE tasks SET created_at = ? WHERE task_id = ?")
            .bind(ms)
            .bind(id.as_str())
            .execute(&mut c)
            .await
            .unwrap();
    } else if url.starts_with("postgres") {
        let mut c = PgConnection::connect(url).await.unwrap();
        sqlx::query("UPDATE tasks SET created_at = $1 WHERE task_id = $2")
            .bind(ms)
            .bind(id.as_str())
            .execute(&mut c)
            .await
            .unwrap();
    } else {
        let mut c = MySqlConnection::connect(&as_mysql_url(url)).await.unwrap();
        sqlx::query("UPDATE tasks SET created_at = ? WHERE task_id = ?")
            .bind(ms)
            .bind(id.as_str())
            .execute(&mut c)
            .await
            .unwrap();
    }
}

/// A summary with these token counts and cost.
fn used(model: &str, tokens: [u64; 4], cost_usd: f64) -> AgentSummary {
    let [prompt, completion, cached, reasoning] = tokens;
    AgentSummary {
        outcome: AgentOutcome::Finished,
        summary: "done".into(),
        model: model.into(),
        steps: 1,
        tool_calls: 1,
        prompt_tokens: prompt,
        completion_tokens: completion,
        total_tokens: prompt + completion,
        cached_tokens: cached,
        reasoning_tokens: reasoning,
        cost_usd,
        compactions: 0,
        wall_ms: 1,
        files_changed: Vec::new(),
        tests_passed: None,
        error: None,
        sandbox: None,
    }
}

fn usage_row(day: &str, tenant: &str, model: &str, counts: [u64; 6], cost_usd: f64) -> UsageRow {
    let [
        tasks,
        prompt_tokens,
        completion_tokens,
        cached_tokens,
        reasoning_tokens,
        total_tokens,
    ] = counts;
    UsageRow {
        day: day.parse().unwrap(),
        tenant: tenant.into(),
        model: model.into(),
        tasks,
        prompt_tokens,
        completion_tokens,
        cached_tokens,
        reasoning_tokens,
        total_tokens,
        cost_usd,
    }
}

/// The usage report: tasks, tokens and cost summed per UTC day, tenant and model, over
/// tasks created in `[from, to)`; a task without a summary counts with no tokens under its
/// spec's model or the default; a summary written twice counts once; a summary's model is
/// the one that counts.
pub(crate) async fn usage_is_summed_per_day_tenant_and_model_within_the_range(url: String) {
    let s = open_store(&url).await;
    // (tenant, created at, the spec's model, the summary's model/tokens/cost)
    let tasks: Vec<(&str, &str, Option<&str>, Option<AgentSummary>)> = vec![
        (
            "a",
            "2026-03-01T10:00:00Z",
            None,
            Some(used("m1", [100, 10, 40, 2], 0.25)),
        ),
        (
            "a",
            "2026-03-01T23:59:59.999Z",
            Some("m1"),
            Some(used("m1", [200, 20, 0, 0], 0.5)),
        ),
        // No summary and no model: the default's.
        ("a", "2026-03-01T12:00:00Z", None, None),
        // The first millisecond of the range counts.
        (
            "a",
            "2026-03-01T00:00:00Z",
            None,
            Some(used("m1", [1, 1, 0, 0], 0.0)),
        ),
        // The summary names the model that ran.
        (
            "a",
            "2026-03-02T08:00:00Z",
            Some("spec-m"),
            Some(used("m2", [1000, 100, 500, 50], 1.125)),
        ),
        // No summary: the spec's model.
        ("b", "2026-03-01T01:00:00Z", Some("m1"), None),
        (
            "b",
            "2026-03-01T02:00:00Z",
            None,
            Some(used("m1", [10, 1, 0, 0], 0.001)),
        ),
        // Outside [2026-03-01, 2026-03-03): the day after, and the millisecond before.
        (
            "b",
            "2026-03-03T00:00:00Z",
            None,
            Some(used("m1", [7, 7, 7, 7], 7.0)),
        ),
        (
            "a",
            "2026-02-28T23:59:59.999Z",
            None,
            Some(used("m1", [9, 9, 9, 9], 9.0)),
        ),
    ];
    for (tenant, at, model, summary) in &tasks {
        let mut sp = spec(None);
        sp.tenant = (*tenant).into();
        sp.model = model.map(str::to_string);
        let id = TaskId::generate();
        s.insert(&id, &sp).await.unwrap();
        if let Some(summary) = summary {
            // Twice, as a retried activity writes it: counted once.
            s.set_summary(&id, summary).await.unwrap();
            s.set_summary(&id, summary).await.unwrap();
        }
        backdate(&url, &id, at).await;
    }
    let at = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap().to_utc();
    let query = |tenant: Option<&str>, from: &str, to: &str| UsageQuery {
        tenant: tenant.map(str::to_string),
        from: at(from),
        to: at(to),
        default_model: "dflt".into(),
    };
    let close = |got: &[UsageRow], want: &[UsageRow]| {
        assert_eq!(got.len(), want.len(), "{got:#?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g.cost_usd - w.cost_usd).abs() < 1e-9, "{g:?} vs {w:?}");
            let g = UsageRow {
                cost_usd: w.cost_usd,
                ..g.clone()
            };
            assert_eq!(&g, w);
        }
    };
    let a_dflt = usage_row("2026-03-01", "a", "dflt", [1, 0, 0, 0, 0, 0], 0.0);
    let a_m1 = usage_row("2026-03-01", "a", "m1", [3, 301, 31, 40, 2, 332], 0.75);
    let b_m1 = usage_row("2026-03-01", "b", "m1", [2, 10, 1, 0, 0, 11], 0.001);
    let a_m2 = usage_row(
        "2026-03-02",
        "a",
        "m2",
        [1, 1000, 100, 500, 50, 1100],
        1.125,
    );
    let b_m1_next = usage_row("2026-03-03", "b", "m1", [1, 7, 7, 7, 7, 14], 7.0);

    let every = s
        .usage(&query(None, "2026-03-01T00:00:00Z", "2026-03-03T00:00:00Z"))
        .await
        .unwrap();
    close(
        &every,
        &[a_dflt.clone(), a_m1.clone(), b_m1.clone(), a_m2.clone()],
    );
    let only_b = s
        .usage(&query(
            Some("b"),
            "2026-03-01T00:00:00Z",
            "2026-03-03T00:00:00Z",
        ))
        .await
        .unwrap();
    close(&only_b, std::slice::from_ref(&b_m1));
    // `to` one millisecond later takes the next day's first task in.
    let later = s
        .usage(&query(
            Some("b"),
            "2026-03-01T00:00:00Z",
            "2026-03-03T00:00:00.001Z",
        ))
        .await
        .unwrap();
    close(&later, &[b_m1, b_m1_next]);
    // `from` mid-range: only what was created from then on.
    let from_noon = s
        .usage(&query(
            Some("a"),
            "2026-03-01T12:00:00Z",
            "2026-03-02T08:00:00.001Z",
        ))
        .await
        .unwrap();
    close(
        &from_noon,
        &[
            a_dflt,
            usage_row("2026-03-01", "a", "m1", [1, 200, 20, 0, 0, 220], 0.5),
            a_m2,
        ],
    );
    for (tenant, from, to) in [
        (Some("c"), "2026-03-01T00:00:00Z", "2026-03-03T00:00:00Z"),
        (None, "2026-01-01T00:00:00Z", "2026-02-28T23:59:59.999Z"),
    ] {
        assert!(s.usage(&query(tenant, from, to)).await.unwrap().is_empty());
    }
}

#[test]
fn with_database_replaces_only_the_database_name() {
    assert_eq!(
        with_database("postgres://u@h:5432/test?sslmode=disable", "pf_1"),
        "postgres://u@h:5432/pf_1?sslmode=disable"
    );
    assert_eq!(
        with_database("mysql://root@h", "pf_2"),
        "mysql://root@h/pf_2"
    );
    assert_ne!(fresh_database_name(), fresh_database_name());
}

/// Attempts: the first run is learnt from its first write, a new run after the end begins
/// attempt 2 (a retry or a reset by hand), a late write of the old run changes nothing, and
/// a reset of a run in flight closes its attempt.
pub(crate) async fn attempts_are_numbered_kept_and_old_runs_ignored(url: String) {
    use TaskStatus::*;
    let s = open_store(&url).await;
    let id = TaskId::generate();
    s.insert(&id, &spec(None)).await.unwrap();
    let rec = s.get(&id).await.unwrap().unwrap();
    assert_eq!(rec.attempt, 1);
    assert_eq!(rec.attempts.len(), 1);
    assert_eq!(rec.attempts[0].status, Pending);
    s.set_status(&id, Queued, "q").await.unwrap();
    for (st, m) in [
        (DownloadingCode, "fetch"),
        (RunningAgent, "run"),
        (Failed, "boom"),
    ] {
        assert!(matches!(
            s.set_run_status(&id, "run-1", st, m).await.unwrap(),
            StatusChange::Applied { .. }
        ));
    }
    // The worker that ran attempt 1's agent, named by its run; a run no attempt has
    // names nothing.
    assert!(
        s.set_attempt_worker(&id, "run-1", "patchflow@w1:7")
            .await
            .unwrap()
    );
    assert!(
        !s.set_attempt_worker(&id, "run-9", "patchflow@w9:9")
            .await
            .unwrap()
    );
    assert!(
        !s.set_attempt_worker(&TaskId::generate(), "run-1", "x")
            .await
            .unwrap(),
        "an unknown task"
    );
    // The result message's marker: none until one is sent, then the last one; an unknown
    // task has none to read or write.
    assert_eq!(s.result_sent(&id).await.unwrap(), None);
    s.set_result_sent(&id, "1/1/FAILED").await.unwrap();
    s.set_result_sent(&id, "2/1/COMPLETED").await.unwrap();
    assert_eq!(
        s.result_sent(&id).await.unwrap().as_deref(),
        Some("2/1/COMPLETED")
    );
    assert!(matches!(
        s.result_sent(&TaskId::generate()).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.set_result_sent(&TaskId::generate(), "1/1/FAILED").await,
        Err(StoreError::NotFound(_))
    ));
    // The gateway cannot reopen an ended task; only a new run can.
    assert_eq!(
        s.set_status(&id, Queued, "again").await.unwrap(),
        StatusChange::Ignored { current: Failed }
    );
    assert!(matches!(
        s.set_run_status(&id, "run-2", Queued, "retry requested")
            .await
            .unwrap(),
        StatusChange::Applied { .. }
    ));
    // A late write of the first run is ignored.
    assert_eq!(
        s.set_run_status(&id, "run-1", Completed, "late")
            .await
            .unwrap(),
        StatusChange::Ignored { current: Queued }
    );
    s.set_run_status(&id, "run-2", RunningAgent, "run again")
        .await
        .unwrap();
    // A reset by hand while attempt 2 runs: attempt 3, and attempt 2 is closed.
    s.set_run_status(&id, "run-3", RunningAgent, "reset run")
        .await
        .unwrap();
    s.set_run_status(&id, "run-3", Completed, "done")
        .await
        .unwrap();
    let rec = s.get(&id).await.unwrap().unwrap();
    assert_eq!((rec.status, rec.attempt), (Completed, 3));
    let summary: Vec<(u32, TaskStatus, &str, Option<&str>, bool)> = rec
        .attempts
        .iter()
        .map(|a| {
            (
                a.attempt,
                a.status,
                a.message.as_str(),
                a.run_id.as_deref(),
                a.finished_at.is_some(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, Failed, "boom", Some("run-1"), true),
            (
                2,
                Cancelled,
                "replaced by attempt 3 (the workflow was reset)",
                Some("run-2"),
                true
            ),
            (3, Completed, "done", Some("run-3"), true),
        ]
    );
    let workers: Vec<Option<&str>> = rec.attempts.iter().map(|a| a.worker.as_deref()).collect();
    assert_eq!(workers, [Some("patchflow@w1:7"), None, None]);
    // Lists carry the attempts too.
    let page = s
        .list(&ListFilter {
            limit: 50,
            ..ListFilter::default()
        })
        .await
        .unwrap();
    let listed = page.iter().find(|r| r.task_id == id).unwrap();
    assert_eq!(listed.attempts.len(), 3);
    let statuses: Vec<Option<TaskStatus>> = s
        .events(&id, 0, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.status)
        .collect();
    assert_eq!(
        statuses,
        [
            Some(Pending),
            Some(Queued),
            Some(DownloadingCode),
            Some(RunningAgent),
            Some(Failed),
            Some(Queued),
            Some(RunningAgent),
            Some(RunningAgent),
            Some(Completed)
        ]
    );
}

/// API tokens: stored by hash only, found by it, listed newest first, revoked once, touched;
/// a second token with the same hash is refused by the database.
pub(crate) async fn tokens_are_kept_by_hash_revoked_once_and_listed_newest_first(url: String) {
    use chrono::{TimeZone, Utc};
    use patchflow_core::auth::{ApiToken, Role, token_hash};
    let s = open_store(&url).await;
    assert_eq!(s.count_tokens().await.unwrap(), 0);
    let make = |n: i64, role: Role, expires: Option<i64>| {
        let (id, token) = crate::secret_box::new_token().unwrap();
        let t = ApiToken {
            token_id: id,
            tenant: format!("tenant-{n}"),
            role,
            name: format!("name {n} with 'quotes'"),
            created_at: Utc.timestamp_millis_opt(1_700_000_000_000 + n).unwrap(),
            expires_at: expires.map(|e| Utc.timestamp_millis_opt(e).unwrap()),
            revoked_at: None,
            last_used_at: None,
        };
        (t, token)
    };
    let (a, a_token) = make(1, Role::Admin, None);
    let (b, b_token) = make(2, Role::Viewer, Some(1_900_000_000_000));
    s.create_token(&a, &token_hash(&a_token)).await.unwrap();
    s.create_token(&b, &token_hash(&b_token)).await.unwrap();
    assert_eq!(s.count_tokens().await.unwrap(), 2);
    // Same hash, another id: the unique key refuses it.
    let (mut c, _) = make(3, Role::Member, None);
    c.token_id.push('x');
    assert!(s.create_token(&c, &token_hash(&a_token)).await.is_err());

    assert_eq!(
        s.token_by_hash(&token_hash(&a_token)).await.unwrap(),
        Some(a.clone())
    );
    assert_eq!(
        s.token_by_hash(&token_hash(&b_token)).await.unwrap(),
        Some(b.clone())
    );
    assert!(
        s.token_by_hash(&token_hash(&patchflow_core::Secret::new("pf_other")))
            .await
            .unwrap()
            .is_none()
    );
    // The token itself is nowhere in what the store hands back.
    let listed = s.list_tokens().await.unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|t| t.token_id.as_str())
            .collect::<Vec<_>>(),
        [b.token_id.as_str(), a.token_id.as_str()]
    );
    assert!(!format!("{listed:?}").contains(a_token.expose()));

    s.touch_token(&a.token_id).await.unwrap();
    let touched = s
        .token_by_hash(&token_hash(&a_token))
        .await
        .unwrap()
        .unwrap();
    assert!(touched.last_used_at.is_some());
    assert!(s.revoke_token(&a.token_id).await.unwrap());
    assert!(!s.revoke_token(&a.token_id).await.unwrap(), "revoked twice");
    assert!(!s.revoke_token("tok_nonexistent").await.unwrap());
    let revoked = s
        .token_by_hash(&token_hash(&a_token))
        .await
        .unwrap()
        .unwrap();
    assert!(revoked.revoked_at.is_some() && !revoked.is_live(Utc::now()));
    assert_eq!(
        s.count_tokens().await.unwrap(),
        2,
        "revoked tokens still count"
    );
}

fn environment(
    tenant: &str,
    name: &str,
    script: &str,
) -> patchflow_core::environment::EnvironmentRecord {
    use chrono::{TimeZone, Utc};
    let mut setup = patchflow_core::environment::SetupSpec {
        setup_script: script.into(),
        maintenance_script: Some("make deps\n".into()),
        cache_paths: vec!["~/.cache/pip".into()],
        ..Default::default()
    };
    setup
        .env
        .insert("MODE".into(), "test 'quoted' \u{e9}".into());
    let mut secrets = std::collections::BTreeMap::new();
    secrets.insert("API_KEY".into(), "sealed:abc".into());
    patchflow_core::environment::EnvironmentRecord {
        tenant: tenant.into(),
        name: name.into(),
        repo: Some("https://example.com/r.git".into()),
        setup,
        secrets,
        secrets_version: 1,
        cache_generation: 0,
        created_at: Utc.timestamp_millis_opt(1_700_000_000_000).unwrap(),
        updated_at: Utc.timestamp_millis_opt(1_700_000_000_500).unwrap(),
    }
}

/// Saved environments: kept whole, per tenant (another tenant never sees, replaces or
/// deletes one), created once, replaced only when there, listed by name.
pub(crate) async fn environments_are_per_tenant_created_once_and_replaced_only_when_there(
    url: String,
) {
    let s = open_store(&url).await;
    let a = environment("team-a", "py", "pip install -r requirements.txt\n");
    assert!(s.put_environment(&a, false).await.unwrap());
    assert_eq!(
        s.get_environment("team-a", "py").await.unwrap(),
        Some(a.clone())
    );
    // Taken: nothing changes.
    let mut other = environment("team-a", "py", "other");
    other.secrets_version = 9;
    assert!(
        !s.put_environment(&other, false).await.unwrap(),
        "created twice"
    );
    assert_eq!(
        s.get_environment("team-a", "py").await.unwrap(),
        Some(a.clone())
    );
    // Replacing one that is not there writes nothing.
    let missing = environment("team-a", "nope", "x");
    assert!(!s.put_environment(&missing, true).await.unwrap());
    assert!(s.get_environment("team-a", "nope").await.unwrap().is_none());
    // The same name in another tenant is another environment.
    let b = environment("team-b", "py", "poetry install\n");
    assert!(s.put_environment(&b, false).await.unwrap());
    assert!(s.get_environment("team-c", "py").await.unwrap().is_none());
    // Replace: every column but the key.
    let mut replaced = a.clone();
    replaced.repo = None;
    replaced.setup.setup_script = "uv sync\n".into();
    replaced.setup.maintenance_script = None;
    replaced.secrets.clear();
    replaced.secrets_version = 2;
    replaced.cache_generation = 3;
    replaced.updated_at = chrono::Utc::now();
    replaced.updated_at = crate::db::rows::time_of(replaced.updated_at.timestamp_millis());
    assert!(s.put_environment(&replaced, true).await.unwrap());
    assert_eq!(
        s.get_environment("team-a", "py").await.unwrap(),
        Some(replaced.clone())
    );
    assert_eq!(
        s.get_environment("team-b", "py").await.unwrap(),
        Some(b.clone()),
        "another tenant's was touched"
    );
    // Listed by name, per tenant.
    for name in ["zeta", "Alpha", "beta-2", "beta.1"] {
        assert!(
            s.put_environment(&environment("team-a", name, "x"), false)
                .await
                .unwrap()
        );
    }
    let names = |list: Vec<patchflow_core::environment::EnvironmentRecord>| {
        list.into_iter().map(|e| e.name).collect::<Vec<_>>()
    };
    assert_eq!(
        names(s.list_environments("team-a").await.unwrap()),
        ["Alpha", "beta-2", "beta.1", "py", "zeta"]
    );
    assert_eq!(names(s.list_environments("team-b").await.unwrap()), ["py"]);
    assert!(s.list_environments("team-c").await.unwrap().is_empty());
    // Deleted once, in its tenant only.
    assert!(!s.delete_environment("team-c", "py").await.unwrap());
    assert!(s.delete_environment("team-a", "py").await.unwrap());
    assert!(
        !s.delete_environment("team-a", "py").await.unwrap(),
        "deleted twice"
    );
    assert!(s.get_environment("team-a", "py").await.unwrap().is_none());
    assert_eq!(s.get_environment("team-b", "py").await.unwrap(), Some(b));
    // Case matters: `Alpha` is not `alpha`.
    assert!(
        s.get_environment("team-a", "alpha")
            .await
            .unwrap()
            .is_none()
    );
}

/// The cache of prepared states: inserted or replaced, listed least recently used first
/// per tenant, touched, deleted once; a reset bumps the environment's generation and removes
/// only the entries made from it (in its tenant), answering their keys.
pub(crate) async fn env_cache_is_lru_ordered_and_a_reset_removes_only_its_environment_entries(
    url: String,
) {
    use chrono::{TimeZone, Utc};
    use patchflow_core::environment::EnvCacheEntry;
    let s = open_store(&url).await;
    let at = |ms: i64| Utc.timestamp_millis_opt(1_700_000_000_000 + ms).unwrap();
    let entry = |tenant: &str, key: &str, env: Option<&str>, used: i64| EnvCacheEntry {
        tenant: tenant.into(),
        key: key.into(),
        environment: env.map(str::to_string),
        bytes: 5_000_000_000 + used.unsigned_abs(),
        created_at: at(0),
        last_used_at: at(used),
    };
    assert!(s.env_cache_get("team-a", "k1").await.unwrap().is_none());
    let k1 = entry("team-a", "k1", Some("py"), 30);
    let k2 = entry("team-a", "k2", Some("py"), 10);
    let k3 = entry("team-a", "k3", None, 20);
    let k4 = entry("team-a", "k4", Some("node"), 40);
    let b1 = entry("team-b", "k1", Some("py"), 5);
    for e in [&k1, &k2, &k3, &k4, &b1] {
        s.env_cache_put(e).await.unwrap();
    }
    assert_eq!(
        s.env_cache_get("team-a", "k1").await.unwrap(),
        Some(k1.clone())
    );
    assert_eq!(
        s.env_cache_get("team-b", "k1").await.unwrap(),
        Some(b1.clone())
    );
    let keys = |list: Vec<EnvCacheEntry>| list.into_iter().map(|e| e.key).collect::<Vec<_>>();
    assert_eq!(
        keys(s.env_cache_list("team-a").await.unwrap()),
        ["k2", "k3", "k1", "k4"]
    );
    // Replace: the same key, new values.
    let mut k3b = entry("team-a", "k3", Some("py"), 35);
    k3b.bytes = 7;
    s.env_cache_put(&k3b).await.unwrap();
    assert_eq!(
        s.env_cache_get("team-a", "k3").await.unwrap(),
        Some(k3b.clone())
    );
    assert_eq!(
        keys(s.env_cache_list("team-a").await.unwrap()),
        ["k2", "k1", "k3", "k4"]
    );
    // Touched now: the most recently used.
    let before = Utc::now().timestamp_millis();
    s.env_cache_touch("team-a", "k2").await.unwrap();
    s.env_cache_touch("team-a", "nope").await.unwrap();
    let touched = s.env_cache_get("team-a", "k2").await.unwrap().unwrap();
    assert!(touched.last_used_at.timestamp_millis() >= before);
    assert_eq!(
        keys(s.env_cache_list("team-a").await.unwrap()),
        ["k1", "k3", "k4", "k2"]
    );
    assert_eq!(
        s.env_cache_get("team-b", "k1").await.unwrap(),
        Some(b1.clone()),
        "touching team-a's k1 moved team-b's"
    );

    // Reset: no such environment (in this tenant) is None, and nothing is removed.
    assert_eq!(
        s.reset_environment_cache("team-a", "py").await.unwrap(),
        None
    );
    assert_eq!(s.env_cache_list("team-a").await.unwrap().len(), 4);
    let py = environment("team-a", "py", "x");
    assert!(s.put_environment(&py, false).await.unwrap());
    assert!(
        s.put_environment(&environment("team-b", "py", "x"), false)
            .await
            .unwrap()
    );
    let removed = s.reset_environment_cache("team-a", "py").await.unwrap();
    assert_eq!(removed, Some(vec!["k1".into(), "k2".into(), "k3".into()]));
    assert_eq!(keys(s.env_cache_list("team-a").await.unwrap()), ["k4"]);
    assert_eq!(
        keys(s.env_cache_list("team-b").await.unwrap()),
        ["k1"],
        "another tenant's entries of an environment with the same name were removed"
    );
    let after = s.get_environment("team-a", "py").await.unwrap().unwrap();
    assert_eq!(after.cache_generation, py.cache_generation + 1);
    assert_eq!(after.secrets_version, py.secrets_version);
    assert_eq!(after.setup, py.setup);
    assert_eq!(
        s.get_environment("team-b", "py")
            .await
            .unwrap()
            .unwrap()
            .cache_generation,
        0
    );
    // Again: nothing left to remove, the generation moves on.
    assert_eq!(
        s.reset_environment_cache("team-a", "py").await.unwrap(),
        Some(vec![])
    );
    assert_eq!(
        s.get_environment("team-a", "py")
            .await
            .unwrap()
            .unwrap()
            .cache_generation,
        py.cache_generation + 2
    );
    // Deleted once, per tenant.
    assert!(!s.env_cache_delete("team-b", "k4").await.unwrap());
    assert!(s.env_cache_delete("team-a", "k4").await.unwrap());
    assert!(!s.env_cache_delete("team-a", "k4").await.unwrap());
    assert!(s.env_cache_list("team-a").await.unwrap().is_empty());
    assert_eq!(s.env_cache_list("team-b").await.unwrap().len(), 1);
}

/// Follow-ups and candidates: an ended task reopens for a turn within its attempt (the
/// gateway and the workflow may both announce it; the run that carries it is adopted), a
/// running one does not; candidates written at once are all kept; a new attempt starts
/// with none of them.
pub(crate) async fn turns_reopen_an_ended_task_and_candidates_are_kept_per_attempt(url: String) {
    use TaskStatus::*;
    let s = open_store(&url).await;
    let id = TaskId::generate();
    let mut spec = spec(None);
    spec.task_description = "fix it — «quoted» 'single' \"double\" ✓".into();
    s.insert(&id, &spec).await.unwrap();
    for (st, m) in [(Queued, "q"), (RunningAgent, "run"), (Completed, "done")] {
        s.set_run_status(&id, "run-1", st, m).await.unwrap();
    }
    let turn = |n: u32, message: &str| patchflow_core::TurnRecord {
        turn: n,
        message: message.into(),
        status: RunningAgent,
        summary: String::new(),
        started_at: chrono::Utc::now(),
        finished_at: None,
    };
    let hostile = "also'); DROP TABLE tasks; -- \u{202e} 🦀";
    // The gateway announces turn 2 (no run id yet); the workflow's run does it again.
    assert!(matches!(
        s.begin_turn(&id, None, &turn(2, hostile)).await.unwrap(),
        StatusChange::Applied { .. }
    ));
    assert_eq!(
        s.begin_turn(&id, Some("run-2"), &turn(2, "again"))
            .await
            .unwrap(),
        StatusChange::Ignored {
            current: RunningAgent
        }
    );
    let r = s.get(&id).await.unwrap().unwrap();
    assert_eq!((r.status, r.attempt), (RunningAgent, 1));
    assert_eq!(r.turns.len(), 2);
    assert_eq!(
        (
            r.turns[0].turn,
            r.turns[0].status,
            r.turns[0].message.as_str()
        ),
        (1, Completed, spec.task_description.as_str())
    );
    assert_eq!((r.turns[1].turn, r.turns[1].message.as_str()), (2, hostile));
    // A running task takes no other turn.
    assert!(matches!(
        s.begin_turn(&id, None, &turn(3, "no")).await.unwrap(),
        StatusChange::Ignored { .. }
    ));
    // The adopted run's writes land in attempt 1 and end the turn's task again.
    assert!(matches!(
        s.set_run_status(&id, "run-2", Completed, "turn 2: done")
            .await
            .unwrap(),
        StatusChange::Applied { .. }
    ));
    let mut ended = turn(2, hostile);
    ended.status = Completed;
    ended.summary = "added it".into();
    ended.finished_at = Some(chrono::Utc::now());
    s.put_turn(&id, &ended).await.unwrap();
    let r = s.get(&id).await.unwrap().unwrap();
    assert_eq!((r.status, r.attempt, r.attempts.len()), (Completed, 1, 1));
    assert_eq!(r.turns[1].status, Completed);
    assert_eq!(r.turns[1].summary, "added it");
    assert!(r.turns[1].finished_at.is_some());

    // Candidates that end at once are all kept, in order; a later write replaces its own.
    let candidate = |n: u32, status: TaskStatus| patchflow_core::CandidateRecord {
        candidate: n,
        status,
        summary: format!("candidate {n}"),
        files_changed: vec!["calc.py".into()],
        cost_usd: 0.25 * f64::from(n),
        error: None,
        diff_bytes: u64::from(n) * 100,
        tests_passed: Some(n != 2),
        finished_at: None,
    };
    futures::future::join_all((1..=3).rev().map(|n| {
        let s = s.clone();
        let id = id.clone();
        async move { s.put_candidate(&id, &candidate(n, RunningAgent)).await }
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()
    .unwrap();
    s.put_candidate(&id, &candidate(2, Failed)).await.unwrap();
    s.set_selected(&id, Some(3)).await.unwrap();
    let r = s.get(&id).await.unwrap().unwrap();
    let kept: Vec<(u32, TaskStatus)> = r
        .candidates
        .iter()
        .map(|c| (c.candidate, c.status))
        .collect();
    assert_eq!(kept, [(1, RunningAgent), (2, Failed), (3, RunningAgent)]);
    assert_eq!(r.candidates[2].cost_usd, 0.75);
    assert_eq!(r.candidates[1].tests_passed, Some(false));
    assert_eq!(r.selected, Some(3));
    s.set_selected(&id, None).await.unwrap();
    assert_eq!(s.get(&id).await.unwrap().unwrap().selected, None);
    s.set_selected(&id, Some(1)).await.unwrap();
    assert!(matches!(
        s.put_candidate(&TaskId::generate(), &candidate(1, Failed))
            .await,
        Err(StoreError::NotFound(_))
    ));

    // A new attempt begins with no turns, candidates or selection of the last.
    s.set_run_status(&id, "run-9", Queued, "retry")
        .await
        .unwrap();
    let r = s.get(&id).await.unwrap().unwrap();
    assert_eq!(r.attempt, 2);
    assert!(
        r.turns.is_empty() && r.candidates.is_empty() && r.selected.is_none(),
        "{r:?}"
    );
}
