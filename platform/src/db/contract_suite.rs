//! The task-store behaviour suite ([`super::contract_tests`]) as tests of one back-end, and
//! what the two server back-ends test alike of their own migration locks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::{Connection, Database, Executor, FromRow, IntoArguments};

/// Every case of [`crate::db::contract_tests`] as a test of its own, on the fresh databases
/// `$with` makes (`with_sqlite`, `with_postgres` or `with_mariadb`); each dialect's file
/// runs it once.
macro_rules! tests_for {
    ($with:ident) => {
        $crate::db::contract_suite::tests_for!($with,
            one_thread: [
                migrations_are_idempotent_and_safe_to_race,
                idempotency_key_returns_the_first_task,
                status_moves_forward_only_and_every_move_is_recorded,
                list_pages_newest_first_with_filters,
                record_keeps_what_was_stored_and_unknown_tasks_are_refused,
                attempts_are_numbered_kept_and_old_runs_ignored,
                tokens_are_kept_by_hash_revoked_once_and_listed_newest_first,
                environments_are_per_tenant_created_once_and_replaced_only_when_there,
                env_cache_is_lru_ordered_and_a_reset_removes_only_its_environment_entries,
                usage_is_summed_per_day_tenant_and_model_within_the_range,
                turns_reopen_an_ended_task_and_candidates_are_kept_per_attempt,
            ],
            // Cases whose writers race each other need threads to race on.
            two_threads: [
                concurrent_inserts_with_one_key_create_one_task,
                events_resume_by_seq_without_gaps_under_concurrent_writers,
            ]
        );
    };
    ($with:ident, one_thread: [$($case:ident),* $(,)?], two_threads: [$($raced:ident),* $(,)?]) => {
        $(
            #[tokio::test]
            async fn $case() {
                $crate::db::contract_tests::$with($crate::db::contract_tests::$case).await;
            }
        )*
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $raced() {
                $crate::db::contract_tests::$with($crate::db::contract_tests::$raced).await;
            }
        )*
    };
}
pub(crate) use tests_for;

/// Opening the store at `url` while `holder`'s session holds the migration lock waits and
/// creates nothing; once that session ends (which releases the lock), opening completes.
/// `count_tables` counts the tables of the test database, as `holder` sees them.
pub(crate) async fn opening_waits_while_the_migration_lock_is_held<C>(
    url: &str,
    mut holder: C,
    count_tables: &'static str,
) where
    C: Connection,
    for<'c> &'c mut C: Executor<'c, Database = C::Database>,
    <C::Database as Database>::Arguments: IntoArguments<C::Database>,
    (i64,): for<'r> FromRow<'r, <C::Database as Database>::Row>,
{
    // The migrator's future is not `Send` (sqlx's `Acquire` bounds), so it runs beside the
    // holder in this task rather than on a spawned one.
    let opened = AtomicBool::new(false);
    let opening = async {
        let result = crate::db::open(url).await.map(|_| ());
        opened.store(true, Ordering::SeqCst);
        result
    };
    let holding = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let tables: i64 = sqlx::query_scalar(count_tables)
            .fetch_one(&mut holder)
            .await
            .unwrap();
        assert_eq!(
            tables, 0,
            "migrations ran while another session held the lock"
        );
        assert!(!opened.load(Ordering::SeqCst));
        holder.close().await.unwrap();
    };
    let (result, ()) = tokio::join!(opening, holding);
    result.unwrap();
}
