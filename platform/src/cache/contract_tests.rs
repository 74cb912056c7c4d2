//! One behaviour suite for both hot-path back-ends, so the in-process services and the Redis
//! ones are held to the same contract. Every case runs twice: `cache::contract_tests::memory::*`
//! and `cache::contract_tests::redis::*`.
//!
//! The Redis cases run against a real server (`PATCHFLOW_TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`). Each case gets a random key prefix of its own and deletes every
//! key under it afterwards, even when it fails, so parallel tests and other users of the server
//! never see each other's keys. A server that cannot be reached fails the test with a message
//! saying so; nothing is skipped. Outages are simulated without touching that server: a closed
//! port, a listener that never answers, and a TCP relay to the real server that the test cuts.

use std::collections::BTreeSet;
use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use chrono::Utc;
use futures::{FutureExt, StreamExt};
use patchflow_core::{
    TaskEvent, TaskEventKind, TaskId, TaskRecord, TaskSource, TaskSpec, TaskStatus,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::{
    CacheError, Claim, EventSubscription, Hot, HotOptions, Published, RateLimit, RetryAfter,
};

const REDIS_URL_VAR: &str = "PATCHFLOW_TEST_REDIS_URL";
const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Longest a case waits for an event it expects.
const EVENT_WAIT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------

/// One back-end a case runs on, able to hand out clients of it.
pub(crate) struct Fixture {
    options: HotOptions,
    backend: FixtureBackend,
}

enum FixtureBackend {
    Memory(Hot),
    Redis { url: String, prefix: String },
}

impl Fixture {
    /// A client of the back-end. For Redis a new one (its own connection manager) on the same
    /// server and prefix, as another gateway would be; in-process services are shared within
    /// one process only, so every client is the same one.
    async fn client(&self) -> Hot {
        match &self.backend {
            FixtureBackend::Memory(hot) => hot.clone(),
            FixtureBackend::Redis { url, prefix } => {
                Hot::open_with(Some(url), prefix, self.options.clone())
                    .await
                    .unwrap()
            }
        }
    }
}

fn redis_url() -> String {
    std::env::var(REDIS_URL_VAR).unwrap_or_else(|_| DEFAULT_REDIS_URL.to_string())
}

/// `pftest-` and 24 random hex digits: unique across parallel test processes and threads.
fn fresh_prefix() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let random = RandomState::new().hash_one((
        std::process::id(),
        SystemTime::now(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
    ));
    format!("pftest-{random:016x}{:08x}", std::process::id())
}

pub(crate) async fn in_memory<F, Fut>(options: HotOptions, case: F)
where
    F: FnOnce(Fixture) -> Fut,
    Fut: Future<Output = ()>,
{
    let hot = Hot::in_process(&options);
    case(Fixture {
        options,
        backend: FixtureBackend::Memory(hot),
    })
    .await;
}

/// Runs `case` on the test Redis under a fresh prefix, then deletes every key under it even
/// if the case panicked.
pub(crate) async fn on_redis<F, Fut>(options: HotOptions, case: F)
where
    F: FnOnce(Fixture) -> Fut,
    Fut: Future<Output = ()>,
{
    let url = redis_url();
    let mut admin = admin_connection(&url).await;
    let prefix = fresh_prefix();
    let outcome = AssertUnwindSafe(case(Fixture {
        options,
        backend: FixtureBackend::Redis {
            url: url.clone(),
            prefix: prefix.clone(),
        },
    }))
    .catch_unwind()
    .await;
    let left = delete_keys(&mut admin, &prefix).await;
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
    assert!(
        keys_under(&mut admin, &prefix).await.is_empty(),
        "keys under {prefix}: left behind after deleting {left}"
    );
}

/// A plain connection for set-up and clean-up, or a failed test saying the server is missing.
async fn admin_connection(url: &str) -> ::redis::aio::MultiplexedConnection {
    let unreachable = |why: String| -> ! {
        panic!(
            "the Redis server for the cache tests is not reachable as {url}: {why}. \
             Start it, or set {REDIS_URL_VAR} to one."
        )
    };
    let client = ::redis::Client::open(url).unwrap_or_else(|e| unreachable(e.to_string()));
    let connect = async {
        let mut con = client.get_multiplexed_async_connection().await?;
        ::redis::cmd("PING").query_async::<String>(&mut con).await?;
        Ok::<_, ::redis::RedisError>(con)
    };
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok(con)) => con,
        Ok(Err(e)) => unreachable(e.to_string()),
        Err(_) => unreachable("no answer within 10 s".into()),
    }
}

async fn keys_under(con: &mut ::redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = ::redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(con)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            return keys;
        }
        cursor = next;
    }
}

async fn delete_keys(con: &mut ::redis::aio::MultiplexedConnection, prefix: &str) -> usize {
    let keys = keys_under(con, prefix).await;
    if !keys.is_empty() {
        ::redis::cmd("DEL")
            .arg(&keys)
            .exec_async(con)
            .await
            .unwrap();
    }
    keys.len()
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn record(task_id: &TaskId, status: TaskStatus, message: &str) -> TaskRecord {
    let mut spec = TaskSpec::new(
        TaskSource::Git {
            url: "https://example.com/o/r.git".into(),
            git_ref: Some("main".into()),
            git_token: None,
        },
        "Fix the flaky test",
    );
    spec.idempotency_key = Some("k-1".into());
    spec.batch_id = Some("batch-7".into());
    let now = Utc::now();
    TaskRecord {
        task_id: task_id.clone(),
        status,
        message: message.into(),
        created_at: now,
        updated_at: now,
        pr_url: None,
        pr_error: None,
        summary: None,
        tenant: spec.tenant.clone(),
        batch_id: spec.batch_id.clone(),
        idempotency_key: spec.idempotency_key.clone(),
        spec,
        attempt: 1,
        attempts: Vec::new(),
        turns: Vec::new(),
        candidates: Vec::new(),
        selected: None,
    }
}

fn event(seq: i64) -> TaskEvent {
    TaskEvent {
        seq,
        kind: if seq % 2 == 0 {
            TaskEventKind::Agent
        } else {
            TaskEventKind::Status
        },
        status: (seq % 2 == 1).then_some(TaskStatus::RunningAgent),
        message: format!("event {seq}"),
        at: Utc::now(),
    }
}

/// The next event, failing the test on an error, the end of the stream or a long wait.
async fn next_event(sub: &mut EventSubscription) -> TaskEvent {
    match tokio::time::timeout(EVENT_WAIT, sub.next()).await {
        Ok(Some(Ok(event))) => event,
        Ok(Some(Err(e))) => panic!("subscription failed: {e}"),
        Ok(None) => panic!("subscription ended"),
        Err(_) => panic!("no event within {EVENT_WAIT:?}"),
    }
}

async fn next_seqs(sub: &mut EventSubscription, n: usize) -> Vec<i64> {
    let mut seqs = Vec::with_capacity(n);
    for _ in 0..n {
        seqs.push(next_event(sub).await.seq);
    }
    seqs
}

/// Asserts nothing arrives for a while (no duplicate, no stray event).
async fn assert_quiet(sub: &mut EventSubscription) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        panic!("expected nothing, got {item:?}");
    }
}

async fn publish_all(hot: &Hot, task: &TaskId, seqs: impl IntoIterator<Item = i64>) {
    for seq in seqs {
        assert_eq!(
            hot.events.publish(task, &event(seq)).await.unwrap(),
            Published::Appended,
            "seq {seq}"
        );
    }
}

fn limited(capacity: u32, refill_per_sec: f64) -> HotOptions {
    HotOptions {
        rate_limit: RateLimit {
            capacity,
            refill_per_sec,
        },
        ..HotOptions::default()
    }
}

// ---------------------------------------------------------------------------------------
// Status cache
// ---------------------------------------------------------------------------------------

pub(crate) async fn status_cache_put_get_invalidate(fx: Fixture) {
    let hot = fx.client().await;
    let id = TaskId::generate();
    assert_eq!(hot.status.get(&id).await.unwrap(), None);

    let queued = record(&id, TaskStatus::Queued, "queued");
    hot.status
        .put(&queued, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(hot.status.get(&id).await.unwrap(), Some(queued));

    let running = record(&id, TaskStatus::RunningAgent, "agent running");
    hot.status
        .put(&running, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        hot.status.get(&id).await.unwrap(),
        Some(running),
        "a put replaces the entry"
    );

    hot.status.invalidate(&id).await.unwrap();
    assert_eq!(hot.status.get(&id).await.unwrap(), None);
    hot.status.invalidate(&id).await.unwrap();
    hot.status.invalidate(&TaskId::generate()).await.unwrap();
}

pub(crate) async fn status_cache_entries_expire(fx: Fixture) {
    let hot = fx.client().await;
    let short = TaskId::generate();
    let long = TaskId::generate();
    let short_rec = record(&short, TaskStatus::Queued, "short");
    let long_rec = record(&long, TaskStatus::Queued, "long");
    hot.status
        .put(&short_rec, Duration::from_millis(300))
        .await
        .unwrap();
    hot.status
        .put(&long_rec, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(hot.status.get(&short).await.unwrap(), Some(short_rec));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(hot.status.get(&short).await.unwrap(), None, "expired");
    assert_eq!(hot.status.get(&long).await.unwrap(), Some(long_rec));
}

pub(crate) async fn status_cache_is_shared_by_every_client(fx: Fixture) {
    let writer = fx.client().await;
    let reader = fx.client().await;
    let id = TaskId::generate();
    let rec = record(&id, TaskStatus::Completed, "done");
    writer
        .status
        .put(&rec, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(reader.status.get(&id).await.unwrap(), Some(rec));
    reader.status.invalidate(&id).await.unwrap();
    assert_eq!(writer.status.get(&id).await.unwrap(), None);
}

// ---------------------------------------------------------------------------------------
// Idempotency keys
// ---------------------------------------------------------------------------------------

pub(crate) async fn idempotency_claim_race_has_exactly_one_winner(fx: Fixture) {
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(fx.client().await);
    }
    let contenders: Vec<TaskId> = (0..20).map(|_| TaskId::generate()).collect();
    let barrier = Arc::new(tokio::sync::Barrier::new(contenders.len()));
    let handles: Vec<_> = contenders
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let hot = clients[i % clients.len()].clone();
            let id = id.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                let claim = hot
                    .idempotency
                    .claim("tenant-a", "submit-42", &id, Duration::from_secs(60))
                    .await
                    .unwrap();
                (id, claim)
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for h in handles {
        outcomes.push(h.await.unwrap());
    }
    let winners: Vec<&TaskId> = outcomes
        .iter()
        .filter(|(_, c)| *c == Claim::New)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(winners.len(), 1, "{outcomes:?}");
    let winner = winners[0].clone();
    for (id, claim) in &outcomes {
        if id != &winner {
            assert_eq!(claim, &Claim::Existing(winner.clone()), "claim of {id}");
        }
    }

    // Later claims still see the winner; other tenants and keys are separate.
    let late = fx.client().await;
    let newcomer = TaskId::generate();
    let ttl = Duration::from_secs(60);
    assert_eq!(
        late.idempotency
            .claim("tenant-a", "submit-42", &newcomer, ttl)
            .await
            .unwrap(),
        Claim::Existing(winner)
    );
    assert_eq!(
        late.idempotency
            .claim("tenant-b", "submit-42", &newcomer, ttl)
            .await
            .unwrap(),
        Claim::New
    );
    assert_eq!(
        late.idempotency
            .claim("tenant-a", "submit-43", &newcomer, ttl)
            .await
            .unwrap(),
        Claim::New
    );
    // A tenant containing the separator cannot collide with another tenant's key.
    assert_eq!(
        late.idempotency
            .claim("tenant-a:submit", "42", &newcomer, ttl)
            .await
            .unwrap(),
        Claim::New
    );
}

pub(crate) async fn idempotency_claim_expires(fx: Fixture) {
    let hot = fx.client().await;
    let first = TaskId::generate();
    let second = TaskId::generate();
    let ttl = Duration::from_millis(300);
    assert_eq!(
        hot.idempotency.claim("t", "k", &first, ttl).await.unwrap(),
        Claim::New
    );
    assert_eq!(
        hot.idempotency.claim("t", "k", &second, ttl).await.unwrap(),
        Claim::Existing(first)
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        hot.idempotency.claim("t", "k", &second, ttl).await.unwrap(),
        Claim::New,
        "an expired claim frees the key"
    );
}

// ---------------------------------------------------------------------------------------
// Rate limiter
// ---------------------------------------------------------------------------------------

pub(crate) async fn rate_limit_refuses_past_capacity_with_retry_after(fx: Fixture) {
    let hot = fx.client().await;
    let limit = hot.rate_limiter.limit();
    assert_eq!(limit.capacity, 5);
    for i in 0..5 {
        assert_eq!(
            hot.rate_limiter.try_acquire("t1").await.unwrap(),
            Ok(()),
            "request {i} is within capacity"
        );
    }
    let Err(RetryAfter(wait)) = hot.rate_limiter.try_acquire("t1").await.unwrap() else {
        panic!("the sixth request must be refused");
    };
    // One token takes 1/refill = 500 ms; the bucket has refilled a little since it emptied.
    let full = Duration::from_millis(500);
    assert!(
        wait <= full && wait > full / 2,
        "retry after {wait:?}, expected close to {full:?}"
    );
    assert_eq!(RetryAfter(wait).header_secs(), 1);
}

pub(crate) async fn rate_limit_refills_over_time(fx: Fixture) {
    let hot = fx.client().await;
    assert_eq!(hot.rate_limiter.try_acquire("t1").await.unwrap(), Ok(()));
    assert_eq!(hot.rate_limiter.try_acquire("t1").await.unwrap(), Ok(()));
    let Err(RetryAfter(wait)) = hot.rate_limiter.try_acquire("t1").await.unwrap() else {
        panic!("capacity is 2");
    };
    tokio::time::sleep(wait + Duration::from_millis(30)).await;
    assert_eq!(
        hot.rate_limiter.try_acquire("t1").await.unwrap(),
        Ok(()),
        "one token back after {wait:?}"
    );
    assert!(
        hot.rate_limiter.try_acquire("t1").await.unwrap().is_err(),
        "only one"
    );
}

pub(crate) async fn rate_limit_tenants_are_independent(fx: Fixture) {
    let hot = fx.client().await;
    for _ in 0..3 {
        assert_eq!(hot.rate_limiter.try_acquire("busy").await.unwrap(), Ok(()));
    }
    assert!(hot.rate_limiter.try_acquire("busy").await.unwrap().is_err());
    for _ in 0..3 {
        assert_eq!(hot.rate_limiter.try_acquire("quiet").await.unwrap(), Ok(()));
    }
    assert!(
        hot.rate_limiter
            .try_acquire("quiet")
            .await
            .unwrap()
            .is_err()
    );
}

pub(crate) async fn rate_limit_is_shared_by_every_client(fx: Fixture) {
    // A refill so slow that no token comes back during the test: the count is exact.
    let a = fx.client().await;
    let b = fx.client().await;
    let mut granted = 0;
    for i in 0..12 {
        let client = if i % 2 == 0 { &a } else { &b };
        if client
            .rate_limiter
            .try_acquire("shared")
            .await
            .unwrap()
            .is_ok()
        {
            granted += 1;
        }
    }
    assert_eq!(granted, 6, "two clients draw from one bucket of 6");
    assert!(a.rate_limiter.try_acquire("shared").await.unwrap().is_err());
    assert!(b.rate_limiter.try_acquire("shared").await.unwrap().is_err());
}

// ---------------------------------------------------------------------------------------
// Event stream
// ---------------------------------------------------------------------------------------

pub(crate) async fn events_replay_after_seq_then_follow_live(fx: Fixture) {
    let hot = fx.client().await;
    let task = TaskId::generate();
    // Sequence numbers come from the database and need not be contiguous per task.
    publish_all(&hot, &task, [3, 5, 8, 13]).await;

    let mut sub = hot.events.subscribe(&task, 5).await.unwrap();
    let replayed = next_event(&mut sub).await;
    assert_eq!(replayed.seq, 8);
    assert_eq!(replayed.message, "event 8");
    assert_eq!(replayed.kind, TaskEventKind::Agent);
    assert_eq!(next_event(&mut sub).await.seq, 13);

    publish_all(&hot, &task, [21, 34]).await;
    assert_eq!(next_seqs(&mut sub, 2).await, [21, 34]);

    // A repeated or late publish is refused and never reaches subscribers.
    assert_eq!(
        hot.events.publish(&task, &event(34)).await.unwrap(),
        Published::Stale
    );
    assert_eq!(
        hot.events.publish(&task, &event(30)).await.unwrap(),
        Published::Stale
    );
    publish_all(&hot, &task, [55]).await;
    assert_eq!(next_event(&mut sub).await.seq, 55);
    assert_quiet(&mut sub).await;
}

pub(crate) async fn events_late_subscriber_gets_only_the_rest(fx: Fixture) {
    let publisher = fx.client().await;
    let task = TaskId::generate();
    publish_all(&publisher, &task, 1..=6).await;

    let first_client = fx.client().await;
    let mut first = first_client.events.subscribe(&task, 0).await.unwrap();
    assert_eq!(next_seqs(&mut first, 6).await, [1, 2, 3, 4, 5, 6]);

    // A reader that reconnects with the last seq it saw misses nothing and repeats nothing.
    let late_client = fx.client().await;
    let mut late = late_client.events.subscribe(&task, 4).await.unwrap();
    assert_eq!(next_seqs(&mut late, 2).await, [5, 6]);

    publish_all(&publisher, &task, [7]).await;
    assert_eq!(next_event(&mut first).await.seq, 7);
    assert_eq!(next_event(&mut late).await.seq, 7);
    assert_quiet(&mut first).await;
    assert_quiet(&mut late).await;

    let caught_up = late_client.events.subscribe(&task, 7).await.unwrap();
    let mut caught_up = caught_up;
    assert_quiet(&mut caught_up).await;
}

pub(crate) async fn events_subscriber_waiting_before_the_first_event_gets_it(fx: Fixture) {
    let hot = fx.client().await;
    let task = TaskId::generate();
    let mut sub = hot.events.subscribe(&task, 0).await.unwrap();
    let publisher = fx.client().await;
    let publishing = tokio::spawn({
        let task = task.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            publish_all(&publisher, &task, 1..=3).await;
        }
    });
    assert_eq!(next_seqs(&mut sub, 3).await, [1, 2, 3]);
    publishing.await.unwrap();
}

pub(crate) async fn events_of_tasks_stay_apart(fx: Fixture) {
    let hot = fx.client().await;
    let a = TaskId::generate();
    let b = TaskId::generate();
    publish_all(&hot, &a, [1, 2]).await;
    publish_all(&hot, &b, [1, 2, 3]).await;
    let mut sub_a = hot.events.subscribe(&a, 0).await.unwrap();
    assert_eq!(next_seqs(&mut sub_a, 2).await, [1, 2]);
    publish_all(&hot, &b, [4]).await;
    assert_quiet(&mut sub_a).await;
    // Each task has its own order: seq 3 is new for `a` though `b` is past it.
    publish_all(&hot, &a, [3]).await;
    assert_eq!(next_event(&mut sub_a).await.seq, 3);
}

pub(crate) async fn events_long_replay_arrives_whole_and_in_order(fx: Fixture) {
    let hot = fx.client().await;
    let task = TaskId::generate();
    publish_all(&hot, &task, 1..=1500).await;
    let mut sub = hot.events.subscribe(&task, 0).await.unwrap();
    let seqs = next_seqs(&mut sub, 1500).await;
    assert_eq!(seqs, (1..=1500).collect::<Vec<_>>());
    assert_quiet(&mut sub).await;
}

pub(crate) async fn events_racing_publishers_never_reorder_or_repeat(fx: Fixture) {
    let task = TaskId::generate();
    let reader = fx.client().await;
    let mut sub = reader.events.subscribe(&task, 0).await.unwrap();

    // Four publishers interleave seqs 1..=200; whichever loses a race is refused as stale.
    let appended = Arc::new(Mutex::new(BTreeSet::new()));
    let mut publishers = Vec::new();
    for k in 0..4 {
        let hot = fx.client().await;
        let task = task.clone();
        let appended = appended.clone();
        publishers.push(tokio::spawn(async move {
            for seq in (1..=200).filter(|s| s % 4 == k) {
                match hot.events.publish(&task, &event(seq)).await.unwrap() {
                    Published::Appended => {
                        appended.lock().unwrap().insert(seq);
                    }
                    Published::Stale => {}
                }
            }
        }));
    }
    for p in publishers {
        p.await.unwrap();
    }
    publish_all(&reader, &task, [1000]).await;

    let mut received = Vec::new();
    loop {
        let seq = next_event(&mut sub).await.seq;
        if seq == 1000 {
            break;
        }
        received.push(seq);
    }
    assert!(
        received.windows(2).all(|w| w[0] < w[1]),
        "out of order or repeated: {received:?}"
    );
    let appended: Vec<i64> = appended.lock().unwrap().iter().copied().collect();
    assert_eq!(received, appended, "every appended event, each once");
}

pub(crate) async fn events_refuse_a_seq_below_one(fx: Fixture) {
    let hot = fx.client().await;
    let err = hot
        .events
        .publish(&TaskId::generate(), &event(0))
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::Invalid(_)), "{err:?}");
    assert!(err.to_string().contains("at least 1"), "{err}");
}

pub(crate) async fn ping_answers(fx: Fixture) {
    fx.client().await.ping().await.unwrap();
}

// ---------------------------------------------------------------------------------------
// Both back-ends
// ---------------------------------------------------------------------------------------

macro_rules! suite {
    ($($case:ident $(with $options:expr)?;)*) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    in_memory(suite!(@options $($options)?), super::$case).await;
                }
            )*
        }
        mod redis {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    on_redis(suite!(@options $($options)?), super::$case).await;
                }
            )*
        }
    };
    (@options) => { HotOptions::default() };
    (@options $options:expr) => { $options };
}

suite! {
    status_cache_put_get_invalidate;
    status_cache_entries_expire;
    status_cache_is_shared_by_every_client;
    idempotency_claim_race_has_exactly_one_winner;
    idempotency_claim_expires;
    rate_limit_refuses_past_capacity_with_retry_after with limited(5, 2.0);
    rate_limit_refills_over_time with limited(2, 10.0);
    rate_limit_tenants_are_independent with limited(3, 0.001);
    rate_limit_is_shared_by_every_client with limited(6, 0.001);
    events_replay_after_seq_then_follow_live;
    events_late_subscriber_gets_only_the_rest;
    events_subscriber_waiting_before_the_first_event_gets_it;
    events_of_tasks_stay_apart;
    events_long_replay_arrives_whole_and_in_order;
    events_racing_publishers_never_reorder_or_repeat;
    events_refuse_a_seq_below_one;
    ping_answers;
}

// ---------------------------------------------------------------------------------------
// In-process only
// ---------------------------------------------------------------------------------------

mod memory_only {
    use super::*;
    use crate::cache::EventStream;
    use crate::cache::memory::MemoryEventStream;

    #[tokio::test]
    async fn memory_lagging_subscriber_catches_up_from_the_replay_buffer() {
        // Live channel of 4: a reader that falls 50 behind must re-read the replay buffer.
        let events = MemoryEventStream::with_live_capacity(100, Duration::from_secs(60), 4);
        let task = TaskId::generate();
        let mut sub = events.subscribe(&task, 0).await.unwrap();
        for seq in 1..=50 {
            events.publish(&task, &event(seq)).await.unwrap();
        }
        assert_eq!(next_seqs(&mut sub, 50).await, (1..=50).collect::<Vec<_>>());
        events.publish(&task, &event(51)).await.unwrap();
        assert_eq!(next_event(&mut sub).await.seq, 51);
        assert_quiet(&mut sub).await;
    }

    #[tokio::test]
    async fn memory_replay_keeps_only_the_newest_events() {
        let events = MemoryEventStream::new(10, Duration::from_secs(60));
        let task = TaskId::generate();
        for seq in 1..=30 {
            events.publish(&task, &event(seq)).await.unwrap();
        }
        let mut sub = events.subscribe(&task, 0).await.unwrap();
        assert_eq!(next_seqs(&mut sub, 10).await, (21..=30).collect::<Vec<_>>());
        assert_quiet(&mut sub).await;
    }

    #[tokio::test]
    async fn memory_events_are_forgotten_after_their_ttl() {
        let events = MemoryEventStream::new(10, Duration::from_millis(200));
        let task = TaskId::generate();
        events.publish(&task, &event(5)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let mut sub = events.subscribe(&task, 0).await.unwrap();
        assert_quiet(&mut sub).await;
        // As with an expired Redis key, the stream starts over.
        assert_eq!(
            events.publish(&task, &event(1)).await.unwrap(),
            Published::Appended
        );
        assert_eq!(next_event(&mut sub).await.seq, 1);
    }
}

// ---------------------------------------------------------------------------------------
// Redis only: key layout and outages
// ---------------------------------------------------------------------------------------

mod redis_only {
    use super::*;

    /// Every operation of `hot`, each of which must fail with `Unavailable` within a second.
    async fn assert_every_call_is_unavailable(hot: &Hot) {
        let task = TaskId::generate();
        let rec = record(&task, TaskStatus::Queued, "queued");
        let ttl = Duration::from_secs(60);
        let first = event(1);
        let calls: Vec<(&str, futures::future::BoxFuture<'_, Result<(), CacheError>>)> = vec![
            ("ping", hot.ping().boxed()),
            (
                "status get",
                hot.status.get(&task).map(|r| r.map(drop)).boxed(),
            ),
            ("status put", hot.status.put(&rec, ttl).boxed()),
            ("status invalidate", hot.status.invalidate(&task).boxed()),
            (
                "claim",
                hot.idempotency
                    .claim("t", "k", &task, ttl)
                    .map(|r| r.map(drop))
                    .boxed(),
            ),
            (
                "try_acquire",
                hot.rate_limiter
                    .try_acquire("t")
                    .map(|r| r.map(drop))
                    .boxed(),
            ),
            (
                "publish",
                hot.events
                    .publish(&task, &first)
                    .map(|r| r.map(drop))
                    .boxed(),
            ),
            (
                "subscribe",
                hot.events.subscribe(&task, 0).map(|r| r.map(drop)).boxed(),
            ),
        ];
        for (name, call) in calls {
            // A hang guard, not a speed check: the call must come back with an error rather
            // than wait on a server that will never answer.
            let outcome = tokio::time::timeout(Duration::from_secs(10), call)
                .await
                .unwrap_or_else(|_| panic!("{name} hung instead of failing"));
            match outcome {
                Err(CacheError::Unavailable(why)) => {
                    assert!(why.contains("Redis"), "{name}: {why}");
                }
                other => panic!("{name}: expected Unavailable, got {other:?}"),
            }
        }
    }

    /// A local port nothing listens on.
    async fn closed_port() -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        port
    }

    #[tokio::test]
    async fn redis_closed_port_makes_every_call_unavailable_instead_of_hanging() {
        let url = format!("redis://127.0.0.1:{}", closed_port().await);
        let hot = tokio::time::timeout(
            Duration::from_secs(10),
            Hot::open(Some(&url), &fresh_prefix()),
        )
        .await
        .expect("open hung on an unreachable Redis")
        .unwrap();
        assert_every_call_is_unavailable(&hot).await;
        assert!(hot.describe().contains(&url), "{}", hot.describe());
    }

    #[tokio::test]
    async fn redis_silent_server_makes_every_call_unavailable_instead_of_hanging() {
        // Accepts connections and never answers: a hung server or a black-holed network.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let held = Arc::new(Mutex::new(Vec::new()));
        let accepting = tokio::spawn({
            let held = held.clone();
            async move {
                while let Ok((socket, _)) = listener.accept().await {
                    held.lock().unwrap().push(socket);
                }
            }
        });
        let hot = Hot::open(Some(&format!("redis://127.0.0.1:{port}")), &fresh_prefix())
            .await
            .unwrap();
        assert_every_call_is_unavailable(&hot).await;
        accepting.abort();
    }

    #[tokio::test]
    async fn rediss_against_a_plain_server_is_unavailable_not_a_panic() {
        // TLS set-up must work in a process with several rustls providers compiled in; the
        // handshake with a server that does not speak TLS then fails like any outage.
        let url = redis_url().replacen("redis://", "rediss://", 1);
        let hot = Hot::open(Some(&url), &fresh_prefix()).await.unwrap();
        let err = hot.ping().await.unwrap_err();
        assert!(err.is_unavailable(), "{err:?}");
    }

    #[tokio::test]
    async fn redis_password_stays_out_of_descriptions_and_errors() {
        let url = format!("redis://app:s3cret@127.0.0.1:{}", closed_port().await);
        let hot = Hot::open(Some(&url), &fresh_prefix()).await.unwrap();
        assert!(!hot.describe().contains("s3cret"), "{}", hot.describe());
        let err = hot.ping().await.unwrap_err();
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_keys_follow_the_documented_layout_and_all_expire() {
        on_redis(limited(5, 1.0), |fx| async move {
            let FixtureBackend::Redis { url, prefix } = &fx.backend else {
                unreachable!()
            };
            let hot = fx.client().await;
            let task = TaskId::generate();
            hot.status
                .put(
                    &record(&task, TaskStatus::Queued, "q"),
                    Duration::from_secs(60),
                )
                .await
                .unwrap();
            hot.idempotency
                .claim("ten:ant", "key-1", &task, Duration::from_secs(60))
                .await
                .unwrap();
            hot.rate_limiter
                .try_acquire("tenant-1")
                .await
                .unwrap()
                .unwrap();
            hot.events.publish(&task, &event(7)).await.unwrap();

            let mut admin = admin_connection(url).await;
            let mut keys = keys_under(&mut admin, prefix).await;
            keys.sort();
            let mut expected = vec![
                format!("{prefix}:events:{task}"),
                format!("{prefix}:idem:ten%3Aant:key-1"),
                format!("{prefix}:rate:tenant-1"),
                format!("{prefix}:status:{task}"),
            ];
            expected.sort();
            assert_eq!(keys, expected);
            for key in &keys {
                let pttl: i64 = ::redis::cmd("PTTL")
                    .arg(key)
                    .query_async(&mut admin)
                    .await
                    .unwrap();
                assert!(pttl > 0, "{key} has no expiry ({pttl})");
            }
            let ids: Vec<::redis::streams::StreamId> = {
                let range: ::redis::streams::StreamRangeReply = ::redis::cmd("XRANGE")
                    .arg(format!("{prefix}:events:{task}"))
                    .arg("-")
                    .arg("+")
                    .query_async(&mut admin)
                    .await
                    .unwrap();
                range.ids
            };
            assert_eq!(ids.len(), 1);
            assert_eq!(ids[0].id, "7-0", "the entry id is the event's seq");
            let json: Vec<u8> = ids[0].get("event").unwrap();
            let stored: TaskEvent = serde_json::from_slice(&json).unwrap();
            assert_eq!(stored.seq, 7);
            let bucket: std::collections::HashMap<String, String> = ::redis::cmd("HGETALL")
                .arg(format!("{prefix}:rate:tenant-1"))
                .query_async(&mut admin)
                .await
                .unwrap();
            let tokens: f64 = bucket["tokens"].parse().unwrap();
            assert!((3.0..=4.1).contains(&tokens), "{bucket:?}");
            let ts: u64 = bucket["ts"].parse().unwrap();
            assert!(ts > 1_600_000_000_000_000, "server time in µs: {bucket:?}");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_corrupt_entries_are_reported_not_fatal() {
        on_redis(HotOptions::default(), |fx| async move {
            let FixtureBackend::Redis { url, prefix } = &fx.backend else {
                unreachable!()
            };
            let hot = fx.client().await;
            let task = TaskId::generate();
            let mut admin = admin_connection(url).await;
            ::redis::cmd("SET")
                .arg(format!("{prefix}:status:{task}"))
                .arg("{not json")
                .arg("EX")
                .arg(60)
                .exec_async(&mut admin)
                .await
                .unwrap();
            let err = hot.status.get(&task).await.unwrap_err();
            assert!(matches!(err, CacheError::Corrupt { .. }), "{err:?}");

            let stream = format!("{prefix}:events:{task}");
            ::redis::cmd("XADD")
                .arg(&stream)
                .arg("1-0")
                .arg("event")
                .arg("garbage")
                .exec_async(&mut admin)
                .await
                .unwrap();
            ::redis::cmd("EXPIRE")
                .arg(&stream)
                .arg(60)
                .exec_async(&mut admin)
                .await
                .unwrap();
            publish_all(&hot, &task, [2]).await;
            let mut sub = hot.events.subscribe(&task, 0).await.unwrap();
            let first = tokio::time::timeout(EVENT_WAIT, sub.next()).await.unwrap();
            assert!(
                matches!(first, Some(Err(CacheError::Corrupt { .. }))),
                "{first:?}"
            );
            assert_eq!(next_event(&mut sub).await.seq, 2, "the stream goes on");
        })
        .await;
    }

    /// A TCP relay to the real server that a test can cut and restore, to stage an outage
    /// without stopping the machine's Redis.
    struct Relay {
        port: u16,
        upstream: String,
        accepting: Option<JoinHandle<()>>,
        pipes: Arc<Mutex<Vec<JoinHandle<()>>>>,
    }

    impl Relay {
        async fn start(upstream: String) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let mut relay = Self {
                port,
                upstream,
                accepting: None,
                pipes: Arc::default(),
            };
            relay.serve(listener);
            relay
        }

        fn serve(&mut self, listener: TcpListener) {
            let upstream = self.upstream.clone();
            let pipes = self.pipes.clone();
            self.accepting = Some(tokio::spawn(async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let upstream = upstream.clone();
                    let pipe = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(&upstream).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    pipes.lock().unwrap().push(pipe);
                }
            }));
        }

        fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }

        /// Drops every connection and stops listening.
        fn cut(&mut self) {
            if let Some(accepting) = self.accepting.take() {
                accepting.abort();
            }
            for pipe in self.pipes.lock().unwrap().drain(..) {
                pipe.abort();
            }
        }

        async fn restore(&mut self) {
            let mut tries = 0;
            let listener = loop {
                match TcpListener::bind(("127.0.0.1", self.port)).await {
                    Ok(l) => break l,
                    Err(e) if tries < 50 => {
                        tries += 1;
                        let _ = e;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => panic!("re-binding relay port {}: {e}", self.port),
                }
            };
            self.serve(listener);
        }
    }

    impl Drop for Relay {
        fn drop(&mut self) {
            self.cut();
        }
    }

    fn upstream_addr(url: &str) -> String {
        let rest = url.split_once("://").unwrap().1;
        let authority = rest.split('/').next().unwrap();
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
        if host_port.contains(':') {
            host_port.to_string()
        } else {
            format!("{host_port}:6379")
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn redis_outage_ends_a_subscription_and_calls_recover_after_it() {
        let url = redis_url();
        let prefix = fresh_prefix();
        let mut admin = admin_connection(&url).await;
        let outcome = AssertUnwindSafe(async {
            let mut relay = Relay::start(upstream_addr(&url)).await;
            let options = HotOptions {
                follow_block: Duration::from_millis(500),
                ..HotOptions::default()
            };
            let via_relay = Hot::open_with(Some(&relay.url()), &prefix, options.clone())
                .await
                .unwrap();
            let direct = Hot::open_with(Some(&url), &prefix, options).await.unwrap();
            let task = TaskId::generate();
            publish_all(&direct, &task, [1, 2]).await;
            let mut sub = via_relay.events.subscribe(&task, 0).await.unwrap();
            assert_eq!(next_seqs(&mut sub, 2).await, [1, 2]);

            relay.cut();
            match tokio::time::timeout(EVENT_WAIT, sub.next()).await {
                Ok(Some(Err(e))) => assert!(e.is_unavailable(), "{e:?}"),
                other => panic!("expected the subscription to fail, got {other:?}"),
            }
            assert!(
                tokio::time::timeout(EVENT_WAIT, sub.next())
                    .await
                    .unwrap()
                    .is_none(),
                "a failed subscription ends"
            );
            assert_every_call_is_unavailable(&via_relay).await;

            // Meanwhile events go on (through another gateway); a reader coming back with the
            // last seq it saw gets exactly the rest.
            publish_all(&direct, &task, [3, 4]).await;
            relay.restore().await;
            let mut recovered = false;
            for _ in 0..50 {
                if via_relay.ping().await.is_ok() {
                    recovered = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(recovered, "calls work again once Redis is back");
            let mut sub = via_relay.events.subscribe(&task, 2).await.unwrap();
            assert_eq!(next_seqs(&mut sub, 2).await, [3, 4]);
            let rec = record(&task, TaskStatus::Completed, "done");
            via_relay
                .status
                .put(&rec, Duration::from_secs(60))
                .await
                .unwrap();
            assert_eq!(direct.status.get(&task).await.unwrap(), Some(rec));
        })
        .catch_unwind()
        .await;
        delete_keys(&mut admin, &prefix).await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }
}
