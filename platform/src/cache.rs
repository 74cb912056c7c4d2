//! Hot-path services beside the task store: a status cache, idempotency keys, per-tenant rate
//! limits and live task events.
//!
//! Why they exist: the gateway answers `GET /api/tasks/{id}`, deduplicates submissions, throttles
//! tenants and streams progress far more often than a task changes. Serving those from memory
//! (one machine) or Redis (several gateways) keeps that traffic off the database. The database
//! stays the source of truth: everything here is either a copy that may be dropped at any time
//! (status cache, event stream) or a fast guard whose authoritative twin lives in the database
//! (idempotency keys; the task store dedupes on the same key).
//!
//! Each service is a small trait with two implementations: in-process ([`memory`], the embedded
//! default: no Redis needed) and Redis ([`redis`], shared by every gateway that points at the
//! same server and key prefix). [`Hot::open`] picks one from the configuration.
//!
//! Outages: a Redis outage must never fail a request the database can answer. Every
//! Redis-backed call is bounded by [`HotOptions::op_timeout`] and fails with a typed
//! [`CacheError`] (usually [`CacheError::Unavailable`]); callers treat any `CacheError` as "no
//! answer from the cache" and fall back to the database (or, for the rate limiter, let the
//! request through).

pub mod memory;
pub mod redis;
pub mod slots;

#[cfg(test)]
mod contract_tests;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use patchflow_core::{TaskEvent, TaskId, TaskRecord};
use thiserror::Error;

pub use slots::BatchSlots;

/// Why a cache call did not answer. Callers degrade on any variant: the database answers
/// instead.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum CacheError {
    /// The back-end could not be reached or did not answer in time.
    #[error("cache unavailable: {0}")]
    Unavailable(String),
    /// The back-end answered with an error (a wrong key type, a script error, a refused
    /// command).
    #[error("cache back-end error: {0}")]
    Backend(String),
    /// A stored value could not be decoded; the entry is ignored.
    #[error("cached value under `{key}` is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    /// The call or the configuration was wrong (an empty key prefix, a zero capacity, an
    /// event sequence number below 1).
    #[error("invalid cache request: {0}")]
    Invalid(String),
    #[error(
        "unsupported cache URL `{0}` (redis://HOST[:PORT][/DB] or rediss://...; leave it unset for the in-process cache)"
    )]
    UnsupportedUrl(String),
}

impl CacheError {
    /// Whether the back-end was unreachable or too slow (as opposed to answering wrongly).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Outcome of [`IdempotencyKeys::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key was free and now maps to the task id the caller proposed.
    New,
    /// The key was already taken, by this task.
    Existing(TaskId),
}

/// How long a refused caller should wait before a token is available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl RetryAfter {
    /// Whole seconds, rounded up and at least 1: the value of an HTTP `Retry-After` header.
    pub fn header_secs(&self) -> u64 {
        let secs = self.0.as_secs() + u64::from(self.0.subsec_nanos() > 0);
        secs.max(1)
    }
}

/// A token bucket: `capacity` requests at once, refilled at `refill_per_sec`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub capacity: u32,
    pub refill_per_sec: f64,
}

impl Default for RateLimit {
    /// Bursts of 60 submissions, 1 a second sustained.
    fn default() -> Self {
        Self {
            capacity: 60,
            refill_per_sec: 1.0,
        }
    }
}

impl RateLimit {
    fn validate(&self) -> Result<(), CacheError> {
        if self.capacity == 0 {
            return Err(CacheError::Invalid(
                "rate limit capacity must be at least 1".into(),
            ));
        }
        if !(self.refill_per_sec.is_finite() && self.refill_per_sec > 0.0) {
            return Err(CacheError::Invalid(format!(
                "rate limit refill_per_sec must be a positive number, not {}",
                self.refill_per_sec
            )));
        }
        Ok(())
    }

    /// How long an empty bucket takes to fill up: after that an idle bucket is the same as
    /// no bucket, so its state may be forgotten.
    fn time_to_full(&self) -> Duration {
        Duration::from_secs_f64(f64::from(self.capacity) / self.refill_per_sec)
    }
}

/// Outcome of [`EventStream::publish`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// The event is stored and was sent to live subscribers.
    Appended,
    /// The stream already holds an event with this or a higher `seq` (a repeated publish, or
    /// one that lost a race with a later event); nothing was written, so subscribers never see
    /// an event twice or out of order. The database still has it.
    Stale,
}

/// A task's events after some `seq`, oldest first: what is retained, then live ones as they are
/// published. It does not end on its own (a task may be retried after it finished); the reader
/// drops it when done. A lost connection yields one `Unavailable` error and ends the stream: the
/// reader resubscribes with the last `seq` it saw. A stored entry that cannot be decoded yields
/// a `Corrupt` error and is stepped over; the stream goes on.
pub type EventSubscription = BoxStream<'static, Result<TaskEvent, CacheError>>;

/// Task records kept for a short while, so status reads skip the database.
///
/// Writers put the record they just stored, or invalidate; a put that loses a race with a newer
/// write can leave an older record in place until its TTL, so TTLs should be seconds, not hours.
#[async_trait]
pub trait StatusCache: Send + Sync + 'static {
    /// The cached record, `None` if absent or expired.
    async fn get(&self, task_id: &TaskId) -> Result<Option<TaskRecord>, CacheError>;

    /// Caches `record` (as JSON in Redis) for `ttl`, replacing any previous entry.
    async fn put(&self, record: &TaskRecord, ttl: Duration) -> Result<(), CacheError>;

    /// Drops the entry; done after every write to the task, so the next read goes to the
    /// database.
    async fn invalidate(&self, task_id: &TaskId) -> Result<(), CacheError>;
}

/// First-writer-wins mapping from a tenant's idempotency key to a task id.
#[async_trait]
pub trait IdempotencyKeys: Send + Sync + 'static {
    /// Atomically maps `(tenant, key)` to `task_id` for `ttl` if the key is free (SET NX
    /// semantics); otherwise answers the task id the key already maps to.
    async fn claim(
        &self,
        tenant: &str,
        key: &str,
        task_id: &TaskId,
        ttl: Duration,
    ) -> Result<Claim, CacheError>;
}

/// Per-tenant token buckets.
#[async_trait]
pub trait RateLimiter: Send + Sync + 'static {
    /// Takes one token from `tenant`'s bucket: `Ok(Ok(()))` when granted, `Ok(Err(_))` when the
    /// bucket is empty (with how long until the next token), `Err(_)` when the limiter could not
    /// decide (callers then let the request through).
    async fn try_acquire(&self, tenant: &str) -> Result<Result<(), RetryAfter>, CacheError>;

    /// The bucket every tenant gets.
    fn limit(&self) -> RateLimit;
}

/// Live progress of each task, with a bounded replay so a reconnecting reader misses nothing
/// still retained.
#[async_trait]
pub trait EventStream: Send + Sync + 'static {
    /// Appends `event` (whose `seq` is the database's, at least 1) to the task's stream if its
    /// `seq` is above every `seq` already there.
    async fn publish(&self, task_id: &TaskId, event: &TaskEvent) -> Result<Published, CacheError>;

    /// The task's events with `seq > after_seq`: first those retained, then live ones, each
    /// once and in `seq` order. Fails fast (rather than yielding an error later) when the
    /// back-end is unreachable, so a caller can fall back to polling the database.
    async fn subscribe(
        &self,
        task_id: &TaskId,
        after_seq: i64,
    ) -> Result<EventSubscription, CacheError>;
}

/// Tuning shared by both implementations.
#[derive(Debug, Clone, PartialEq)]
pub struct HotOptions {
    /// The bucket each tenant gets.
    pub rate_limit: RateLimit,
    /// Upper bound on any one Redis call, connecting included: past it the call fails with
    /// [`CacheError::Unavailable`].
    pub op_timeout: Duration,
    /// Events kept per task for replay (Redis trims approximately, keeping at least this many).
    pub event_retention: usize,
    /// A task's stream is forgotten this long after its last event.
    pub event_ttl: Duration,
    /// How long one blocking read of a Redis subscriber waits for new events before asking
    /// again; it also bounds how long a silently dead connection goes unnoticed.
    pub follow_block: Duration,
}

impl Default for HotOptions {
    fn default() -> Self {
        Self {
            rate_limit: RateLimit::default(),
            op_timeout: Duration::from_millis(500),
            event_retention: 10_000,
            event_ttl: Duration::from_secs(24 * 3600),
            follow_block: Duration::from_secs(2),
        }
    }
}

impl HotOptions {
    fn validate(&self) -> Result<(), CacheError> {
        self.rate_limit.validate()?;
        if self.op_timeout.is_zero() {
            return Err(CacheError::Invalid("op_timeout must not be zero".into()));
        }
        if self.event_retention == 0 {
            return Err(CacheError::Invalid(
                "event_retention must be at least 1".into(),
            ));
        }
        if self.event_ttl < Duration::from_millis(1) {
            return Err(CacheError::Invalid(
                "event_ttl must be at least 1 ms".into(),
            ));
        }
        if self.follow_block < Duration::from_millis(1) {
            return Err(CacheError::Invalid(
                "follow_block must be at least 1 ms".into(),
            ));
        }
        Ok(())
    }
}

/// The hot-path services of one deployment, all on the same back-end.
#[derive(Clone)]
pub struct Hot {
    pub status: Arc<dyn StatusCache>,
    pub idempotency: Arc<dyn IdempotencyKeys>,
    pub rate_limiter: Arc<dyn RateLimiter>,
    pub events: Arc<dyn EventStream>,
    /// Leases on batch slots (how many tasks of a batch run at once, across workers).
    pub slots: Arc<dyn BatchSlots>,
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    InProcess,
    Redis(Arc<self::redis::RedisConn>),
}

impl Hot {
    /// `None`: in-process services (one process only; `prefix` is unused). `redis://` or
    /// `rediss://` (TLS): Redis, with every key under `<prefix>:`. Does not wait for Redis: an unreachable server makes
    /// each call fail with [`CacheError::Unavailable`] (and is logged here once), so a gateway
    /// starts, degraded, during an outage.
    pub async fn open(url: Option<&str>, prefix: &str) -> Result<Self, CacheError> {
        Self::open_with(url, prefix, HotOptions::default()).await
    }

    /// [`Hot::open`] with explicit tuning.
    pub async fn open_with(
        url: Option<&str>,
        prefix: &str,
        options: HotOptions,
    ) -> Result<Self, CacheError> {
        options.validate()?;
        match url {
            None => Ok(Self::in_process(&options)),
            Some(url) if url.starts_with("redis://") || url.starts_with("rediss://") => {
                let conn = Arc::new(self::redis::RedisConn::open(url, prefix, &options)?);
                let hot = Self {
                    status: Arc::new(self::redis::RedisStatusCache::new(conn.clone())),
                    idempotency: Arc::new(self::redis::RedisIdempotencyKeys::new(conn.clone())),
                    rate_limiter: Arc::new(self::redis::RedisRateLimiter::new(
                        conn.clone(),
                        options.rate_limit,
                    )),
                    events: Arc::new(self::redis::RedisEventStream::new(conn.clone(), &options)),
                    slots: Arc::new(slots::RedisBatchSlots::new(conn.clone())),
                    backend: Backend::Redis(conn),
                };
                if let Err(e) = hot.ping().await {
                    tracing::warn!(
                        cache = %hot.describe(),
                        error = %e,
                        "Redis does not answer; the gateway serves from the database until it does"
                    );
                }
                Ok(hot)
            }
            Some(other) => Err(CacheError::UnsupportedUrl(
                patchflow_core::config::redact_url(other),
            )),
        }
    }

    /// In-process services with these options.
    pub fn in_process(options: &HotOptions) -> Self {
        Self {
            status: Arc::new(memory::MemoryStatusCache::new()),
            idempotency: Arc::new(memory::MemoryIdempotencyKeys::new()),
            rate_limiter: Arc::new(memory::MemoryRateLimiter::new(options.rate_limit)),
            events: Arc::new(memory::MemoryEventStream::new(
                options.event_retention,
                options.event_ttl,
            )),
            slots: Arc::new(slots::MemoryBatchSlots::new()),
            backend: Backend::InProcess,
        }
    }

    /// Cheap liveness check for `/healthz`: always fine in-process; a `PING` within the
    /// operation timeout for Redis.
    pub async fn ping(&self) -> Result<(), CacheError> {
        match &self.backend {
            Backend::InProcess => Ok(()),
            Backend::Redis(conn) => conn.ping().await,
        }
    }

    /// `in-process`, or the Redis URL without its password and the key prefix.
    pub fn describe(&self) -> String {
        match &self.backend {
            Backend::InProcess => "in-process".to_string(),
            Backend::Redis(conn) => conn.describe(),
        }
    }
}

impl std::fmt::Debug for Hot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hot")
            .field("backend", &self.describe())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_header_rounds_up_to_whole_seconds() {
        assert_eq!(RetryAfter(Duration::from_millis(1)).header_secs(), 1);
        assert_eq!(RetryAfter(Duration::ZERO).header_secs(), 1);
        assert_eq!(RetryAfter(Duration::from_millis(2000)).header_secs(), 2);
        assert_eq!(RetryAfter(Duration::from_millis(2001)).header_secs(), 3);
    }

    #[tokio::test]
    async fn open_refuses_an_unknown_scheme_and_hides_the_password() {
        let err = Hot::open(Some("memcached://app:s3cret@cache.internal:11211"), "pf")
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, CacheError::UnsupportedUrl(_)), "{err:?}");
        assert!(!text.contains("s3cret"), "{text}");
        assert!(
            text.contains("redis://") && text.contains("rediss://"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn open_refuses_bad_options() {
        let options = HotOptions {
            rate_limit: RateLimit {
                capacity: 0,
                refill_per_sec: 1.0,
            },
            ..HotOptions::default()
        };
        let err = Hot::open_with(None, "pf", options).await.unwrap_err();
        assert!(err.to_string().contains("capacity"), "{err}");
        let options = HotOptions {
            rate_limit: RateLimit {
                capacity: 1,
                refill_per_sec: f64::NAN,
            },
            ..HotOptions::default()
        };
        let err = Hot::open_with(None, "pf", options).await.unwrap_err();
        assert!(err.to_string().contains("refill_per_sec"), "{err}");
    }

    #[tokio::test]
    async fn open_refuses_an_empty_prefix_for_redis() {
        let err = Hot::open(Some("redis://127.0.0.1:6379"), "")
            .await
            .unwrap_err();
        assert!(matches!(err, CacheError::Invalid(_)), "{err:?}");
    }
}
