//! In-process hot-path services: the embedded default, for a single gateway with no Redis.
//!
//! They behave like the Redis ones (the same behaviour suite runs against both) but live and
//! die with the process, and two processes never share them. Every map is behind a plain
//! mutex held only for a few map operations, never across an `.await`; expired entries are
//! swept as the maps grow, so memory stays bounded by what is live.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use patchflow_core::{TaskEvent, TaskId, TaskRecord};
use tokio::sync::broadcast;
use tokio::time::Instant;

use super::{
    CacheError, Claim, EventStream, EventSubscription, IdempotencyKeys, Published, RateLimit,
    RateLimiter, RetryAfter, StatusCache,
};

/// Live events a subscriber may fall behind by before it re-reads the replay buffer.
const LIVE_CAPACITY: usize = 1024;
/// Maps are swept of expired entries when they reach at least this size.
const MIN_SWEEP_LEN: usize = 256;

/// A poisoned lock only means another thread panicked between two map operations; the maps
/// stay consistent, so carry on with them.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `now + ttl`, saturating instead of overflowing on absurd TTLs.
fn deadline(now: Instant, ttl: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now + ttl.min(CENTURY)
}

/// A map whose entries vanish at their deadline. Expired entries are dropped when read, and
/// all at once whenever the map has doubled since the last sweep (amortised O(1)).
struct ExpiringMap<K, V> {
    entries: HashMap<K, (V, Instant)>,
    sweep_at: usize,
}

impl<K: Eq + Hash, V> ExpiringMap<K, V> {
    fn new() -> Self {
        Self {
            entries: HashMap::new(),
            sweep_at: MIN_SWEEP_LEN,
        }
    }

    fn get(&mut self, key: &K, now: Instant) -> Option<&V> {
        let live = self.entries.get(key).is_some_and(|(_, until)| *until > now);
        if !live {
            self.entries.remove(key);
            return None;
        }
        self.entries.get(key).map(|(v, _)| v)
    }

    fn insert(&mut self, key: K, value: V, until: Instant, now: Instant) {
        if self.entries.len() >= self.sweep_at {
            self.entries.retain(|_, (_, until)| *until > now);
            self.sweep_at = (self.entries.len() * 2).max(MIN_SWEEP_LEN);
        }
        self.entries.insert(key, (value, until));
    }

    fn remove(&mut self, key: &K) {
        self.entries.remove(key);
    }
}

// ---------------------------------------------------------------------------------------
// Status cache
// ---------------------------------------------------------------------------------------

/// Task records by id, each until its TTL.
pub struct MemoryStatusCache {
    records: Mutex<ExpiringMap<TaskId, TaskRecord>>,
}

impl MemoryStatusCache {
    pub fn new() -> Self {
        Self {
            records: Mutex::new(ExpiringMap::new()),
        }
    }
}

impl Default for MemoryStatusCache {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl StatusCache for MemoryStatusCache {
    async fn get(&self, task_id: &TaskId) -> Result<Option<TaskRecord>, CacheError> {
        Ok(lock(&self.records).get(task_id, Instant::now()).cloned())
    }

    async fn put(&self, record: &TaskRecord, ttl: Duration) -> Result<(), CacheError> {
        let now = Instant::now();
        lock(&self.records).insert(
            record.task_id.clone(),
            record.clone(),
            deadline(now, ttl),
            now,
        );
        Ok(())
    }

    async fn invalidate(&self, task_id: &TaskId) -> Result<(), CacheError> {
        lock(&self.records).remove(task_id);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Idempotency keys
// ---------------------------------------------------------------------------------------

/// `(tenant, key) -> task id`, first writer wins until the TTL.
pub struct MemoryIdempotencyKeys {
    claims: Mutex<ExpiringMap<(String, String), TaskId>>,
}

impl MemoryIdempotencyKeys {
    pub fn new() -> Self {
        Self {
            claims: Mutex::new(ExpiringMap::new()),
        }
    }
}

impl Default for MemoryIdempotencyKeys {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl IdempotencyKeys for MemoryIdempotencyKeys {
    async fn claim(
        &self,
        tenant: &str,
        key: &str,
        task_id: &TaskId,
        ttl: Duration,
    ) -> Result<Claim, CacheError> {
        let now = Instant::now();
        let entry = (tenant.to_string(), key.to_string());
        let mut claims = lock(&self.claims);
        if let Some(existing) = claims.get(&entry, now) {
            return Ok(Claim::Existing(existing.clone()));
        }
        claims.insert(entry, task_id.clone(), deadline(now, ttl), now);
        Ok(Claim::New)
    }
}

// ---------------------------------------------------------------------------------------
// Rate limiter
// ---------------------------------------------------------------------------------------

struct Bucket {
    tokens: f64,
    refilled_at: Instant,
}

/// One token bucket per tenant. A bucket untouched long enough to be full again is the same
/// as none, so such buckets are swept.
pub struct MemoryRateLimiter {
    limit: RateLimit,
    buckets: Mutex<Buckets>,
}

struct Buckets {
    by_tenant: HashMap<String, Bucket>,
    sweep_at: usize,
}

impl MemoryRateLimiter {
    pub fn new(limit: RateLimit) -> Self {
        Self {
            limit,
            buckets: Mutex::new(Buckets {
                by_tenant: HashMap::new(),
                sweep_at: MIN_SWEEP_LEN,
            }),
        }
    }
}

#[async_trait]
impl RateLimiter for MemoryRateLimiter {
    async fn try_acquire(&self, tenant: &str) -> Result<Result<(), RetryAfter>, CacheError> {
        let now = Instant::now();
        let capacity = f64::from(self.limit.capacity);
        let rate = self.limit.refill_per_sec;
        let mut buckets = lock(&self.buckets);
        if buckets.by_tenant.len() >= buckets.sweep_at {
            let full_after = self.limit.time_to_full();
            buckets
                .by_tenant
                .retain(|_, b| now.saturating_duration_since(b.refilled_at) < full_after);
            buckets.sweep_at = (buckets.by_tenant.len() * 2).max(MIN_SWEEP_LEN);
        }
        let bucket = buckets
            .by_tenant
            .entry(tenant.to_string())
            .or_insert(Bucket {
                tokens: capacity,
                refilled_at: now,
            });
        let elapsed = now.saturating_duration_since(bucket.refilled_at);
        bucket.tokens = (bucket.tokens + elapsed.as_secs_f64() * rate).min(capacity);
        bucket.refilled_at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(Ok(()))
        } else {
            let wait = Duration::from_secs_f64((1.0 - bucket.tokens) / rate);
            Ok(Err(RetryAfter(wait)))
        }
    }

    fn limit(&self) -> RateLimit {
        self.limit
    }
}

// ---------------------------------------------------------------------------------------
// Event stream
// ---------------------------------------------------------------------------------------

/// Per task: a broadcast channel for live subscribers plus a bounded replay buffer. One lock
/// covers both, so a subscriber's replay snapshot and its live receiver are taken at the same
/// instant: nothing falls between them and nothing is in both.
pub struct MemoryEventStream {
    shared: Arc<Shared>,
}

struct Shared {
    topics: Mutex<Topics>,
    retention: usize,
    ttl: Duration,
    live_capacity: usize,
}

struct Topics {
    by_task: HashMap<TaskId, Topic>,
    sweep_at: usize,
}

struct Topic {
    retained: VecDeque<TaskEvent>,
    /// Highest `seq` accepted; later publishes must exceed it.
    last_seq: i64,
    last_publish: Instant,
    live: broadcast::Sender<TaskEvent>,
}

impl Topic {
    fn new(now: Instant, live_capacity: usize) -> Self {
        Self {
            retained: VecDeque::new(),
            last_seq: 0,
            last_publish: now,
            live: broadcast::channel(live_capacity).0,
        }
    }

    fn expired(&self, now: Instant, ttl: Duration) -> bool {
        now.saturating_duration_since(self.last_publish) >= ttl
    }

    fn after(&self, seq: i64) -> VecDeque<TaskEvent> {
        self.retained
            .iter()
            .filter(|e| e.seq > seq)
            .cloned()
            .collect()
    }
}

impl Shared {
    /// The task's topic, made fresh if absent or expired (as a Redis stream key expires: its
    /// events are gone, live subscribers stay attached).
    fn topic<'a>(&self, topics: &'a mut Topics, task_id: &TaskId, now: Instant) -> &'a mut Topic {
        if topics.by_task.len() >= topics.sweep_at {
            let ttl = self.ttl;
            topics
                .by_task
                .retain(|_, t| t.live.receiver_count() > 0 || !t.expired(now, ttl));
            topics.sweep_at = (topics.by_task.len() * 2).max(MIN_SWEEP_LEN);
        }
        let live_capacity = self.live_capacity;
        let topic = topics
            .by_task
            .entry(task_id.clone())
            .or_insert_with(|| Topic::new(now, live_capacity));
        if topic.expired(now, self.ttl) {
            topic.retained.clear();
            topic.last_seq = 0;
        }
        topic
    }
}

impl MemoryEventStream {
    /// Keeps the last `retention` events of each task, forgetting a task's events `ttl` after
    /// its last publish.
    pub fn new(retention: usize, ttl: Duration) -> Self {
        Self::with_live_capacity(retention, ttl, LIVE_CAPACITY)
    }

    /// As [`MemoryEventStream::new`], with the number of live events a subscriber may fall
    /// behind by before it catches up from the replay buffer instead.
    pub fn with_live_capacity(retention: usize, ttl: Duration, live_capacity: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                topics: Mutex::new(Topics {
                    by_task: HashMap::new(),
                    sweep_at: MIN_SWEEP_LEN,
                }),
                retention: retention.max(1),
                ttl,
                live_capacity: live_capacity.max(1),
            }),
        }
    }
}

/// What a subscriber carries between items.
struct Follower {
    shared: Arc<Shared>,
    task_id: TaskId,
    pending: VecDeque<TaskEvent>,
    live: broadcast::Receiver<TaskEvent>,
    last_seq: i64,
}

impl Follower {
    async fn next_event(&mut self) -> Option<TaskEvent> {
        loop {
            let event = match self.pending.pop_front() {
                Some(event) => event,
                None => match self.live.recv().await {
                    Ok(event) => event,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Fell behind the live channel: what it dropped is still in the replay
                        // buffer (unless trimmed, as a Redis stream would trim it).
                        let mut topics = lock(&self.shared.topics);
                        if let Some(topic) = topics.by_task.get_mut(&self.task_id) {
                            self.pending = topic.after(self.last_seq);
                        }
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
            };
            // The replay snapshot and the live channel may overlap after a lag; the seq check
            // keeps every event once and in order.
            if event.seq > self.last_seq {
                self.last_seq = event.seq;
                return Some(event);
            }
        }
    }
}

#[async_trait]
impl EventStream for MemoryEventStream {
    async fn publish(&self, task_id: &TaskId, event: &TaskEvent) -> Result<Published, CacheError> {
        if event.seq < 1 {
            return Err(CacheError::Invalid(format!(
                "event seq must be at least 1, not {}",
                event.seq
            )));
        }
        let now = Instant::now();
        let mut topics = lock(&self.shared.topics);
        let topic = self.shared.topic(&mut topics, task_id, now);
        if event.seq <= topic.last_seq {
            return Ok(Published::Stale);
        }
        topic.last_seq = event.seq;
        topic.last_publish = now;
        topic.retained.push_back(event.clone());
        while topic.retained.len() > self.shared.retention {
            topic.retained.pop_front();
        }
        // No receivers is fine: the replay buffer has it.
        let _ = topic.live.send(event.clone());
        Ok(Published::Appended)
    }

    async fn subscribe(
        &self,
        task_id: &TaskId,
        after_seq: i64,
    ) -> Result<EventSubscription, CacheError> {
        let now = Instant::now();
        let follower = {
            let mut topics = lock(&self.shared.topics);
            let topic = self.shared.topic(&mut topics, task_id, now);
            Follower {
                shared: self.shared.clone(),
                task_id: task_id.clone(),
                pending: topic.after(after_seq),
                live: topic.live.subscribe(),
                last_seq: after_seq,
            }
        };
        Ok(
            futures::stream::unfold(follower, |mut follower| async move {
                let event = follower.next_event().await?;
                Some((Ok(event), follower))
            })
            .boxed(),
        )
    }
}
