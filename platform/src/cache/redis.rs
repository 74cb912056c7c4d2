//! Redis-backed hot-path services, shared by every gateway pointed at the same server and key
//! prefix.
//!
//! Why Redis: with several gateways behind a load balancer, idempotency claims, rate-limit
//! buckets and live events must be seen by all of them, and status reads should not each cost
//! a database round trip.
//!
//! Key layout (`P` is the configured prefix; several stacks and test runs share one Redis by
//! using different prefixes):
//!
//! | key | type | holds | expiry |
//! | --- | --- | --- | --- |
//! | `P:status:<task_id>` | string | the `TaskRecord` as JSON | the TTL given to `put` |
//! | `P:idem:<tenant>:<key>` | string | the task id that claimed the key (`%` and `:` in the tenant escaped as `%25`, `%3A`) | the TTL given to `claim` |
//! | `P:rate:<tenant>` | hash | `tokens` (float), `ts` (server time of the last refill, µs) | time to refill completely + 1 s |
//! | `P:slots:<batch>` | sorted set | batch slot leases (see [`super::slots`]) | twice the lease time after the last acquire or renew |
//! | `P:events:<task_id>` | stream | entry id `<seq>-0`, field `event`: the `TaskEvent` as JSON; `MAXLEN ~ event_retention` | `event_ttl` after the last publish |
//!
//! Everything that must be atomic is one Lua script run with `EVALSHA` (loaded on first use):
//! the idempotency claim, the token bucket (which reads the clock with `TIME` on the server, so
//! gateways with skewed clocks share one bucket fairly) and the publish (which refuses a `seq`
//! not above the stream's newest, so an event is stored at most once and in order).
//!
//! Calls go through one [`ConnectionManager`] (multiplexed, reconnecting) with connection and
//! response timeouts, and each is also wrapped in [`HotOptions::op_timeout`] so an outage,
//! however it shows (refused, silent, half-open), costs a caller at most that long. Event
//! subscribers block in `XREAD BLOCK`, which would stall every other command on a shared
//! multiplexed connection, so each subscriber gets a dedicated connection.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use patchflow_core::{TaskEvent, TaskId, TaskRecord};
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::StreamReadReply;
use redis::{AsyncConnectionConfig, Client, ErrorKind, RedisError, Script, ServerErrorKind};

use super::{
    CacheError, Claim, EventStream, EventSubscription, HotOptions, IdempotencyKeys, Published,
    RateLimit, RateLimiter, RetryAfter, StatusCache,
};

/// Entries one `XREAD` returns at most; a long replay takes several reads.
const READ_BATCH: usize = 512;

/// Maps `(tenant, key)` to a task id unless the key is taken; answers the holder if it is.
static CLAIM_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
-- KEYS[1]: the claim; ARGV[1]: the task id; ARGV[2]: expiry in ms.
local current = redis.call('GET', KEYS[1])
if current then
  return current
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
",
    )
});

/// A token bucket in a hash. The clock is the server's (`TIME`), never a gateway's.
static TOKEN_BUCKET_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
-- KEYS[1]: the tenant's bucket; ARGV[1]: capacity; ARGV[2]: tokens refilled per second.
-- Returns {1, 0} when a token was taken, else {0, microseconds until the next token}.
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = capacity
  ts = now
end
-- A clock that went back (a failover to another server) refills nothing until it catches up.
if now > ts then
  tokens = math.min(capacity, tokens + (now - ts) * rate / 1000000)
  ts = now
end
local granted = 0
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
  granted = 1
else
  wait = math.ceil((1 - tokens) * 1000000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%d', ts))
-- Once full again the bucket is the same as no bucket, so it may go.
redis.call('PEXPIRE', KEYS[1], string.format('%d', math.ceil(capacity / rate * 1000) + 1000))
return {granted, wait}
",
    )
});

/// Appends an event whose seq is above the stream's newest; the entry id is the seq itself.
static PUBLISH_SCRIPT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
-- KEYS[1]: the task's stream; ARGV[1]: seq (decimal, >= 1, no leading zeros);
-- ARGV[2]: the event as JSON; ARGV[3]: approximate max length; ARGV[4]: expiry in ms.
-- Returns 1 when appended, 0 when the stream already has this or a higher seq.
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if top[1] then
  local last = string.match(top[1][1], '^(%d+)')
  local seq = ARGV[1]
  -- Compared as decimal strings: exact for every 64-bit seq, unlike Lua's doubles.
  if #last > #seq or (#last == #seq and last >= seq) then
    return 0
  end
end
redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], ARGV[1] .. '-0', 'event', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
",
    )
});

/// The connection shared by the four services of one [`super::Hot`].
pub struct RedisConn {
    client: Client,
    manager: ConnectionManager,
    prefix: String,
    op_timeout: Duration,
    shown_url: String,
}

impl RedisConn {
    /// Sets up a lazily connecting manager: nothing is sent until the first call, so an
    /// unreachable server is not an error here.
    pub(super) fn open(url: &str, prefix: &str, options: &HotOptions) -> Result<Self, CacheError> {
        let shown_url = patchflow_core::config::redact_url(url);
        if prefix.is_empty() || prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(CacheError::Invalid(format!(
                "the Redis key prefix must be non-empty without spaces, not `{prefix}`"
            )));
        }
        if url.starts_with("rediss://") {
            install_crypto_provider();
        }
        let client = Client::open(url).map_err(|e| {
            CacheError::Invalid(format!("Redis URL `{shown_url}`: {}", redacted(&e, url)))
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.op_timeout))
            .set_response_timeout(Some(options.op_timeout))
            // Each call waits at most op_timeout anyway; a long retry chain would only keep a
            // doomed attempt alive behind it.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(options.op_timeout);
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| CacheError::Invalid(format!("Redis `{shown_url}`: {e}")))?;
        Ok(Self {
            client,
            manager,
            prefix: prefix.to_string(),
            op_timeout: options.op_timeout,
            shown_url,
        })
    }

    pub(super) fn key(&self, kind: &str, rest: &str) -> String {
        format!("{}:{kind}:{rest}", self.prefix)
    }

    /// Runs one call on the shared connection, bounded by the operation timeout.
    pub(super) async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T, CacheError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        bounded(self.op_timeout, what, f(self.manager.clone())).await
    }

    pub(super) async fn ping(&self) -> Result<(), CacheError> {
        self.call("PING", |mut con| async move {
            redis::cmd("PING").query_async::<String>(&mut con).await
        })
        .await
        .map(drop)
    }

    pub(super) fn describe(&self) -> String {
        format!("{} (keys under `{}:`)", self.shown_url, self.prefix)
    }

    /// A connection of its own, for a reader that blocks.
    async fn dedicated(&self, block: Duration) -> Result<MultiplexedConnection, CacheError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.op_timeout))
            .set_response_timeout(Some(block + self.op_timeout));
        bounded(
            self.op_timeout,
            "connect",
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
    }
}

/// `fut` within `limit`, its error typed.
async fn bounded<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, RedisError>>,
) -> Result<T, CacheError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(classify(what, &e)),
        Err(_) => Err(CacheError::Unavailable(format!(
            "Redis {what}: no answer within {limit:?}"
        ))),
    }
}

/// Unreachable or overloaded servers are `Unavailable`; an answer that is an error is
/// `Backend`.
fn classify(what: &str, e: &RedisError) -> CacheError {
    let transient_server = matches!(
        e.kind(),
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::MasterDown
                | ServerErrorKind::ReadOnly
        )
    );
    let text = format!("Redis {what}: {e}");
    if e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || transient_server
    {
        CacheError::Unavailable(text)
    } else {
        CacheError::Backend(text)
    }
}

/// The error's text without the URL's password, should the client have quoted it.
fn redacted(e: &RedisError, url: &str) -> String {
    let text = e.to_string();
    match password_of(url) {
        Some(password) if !password.is_empty() => text.replace(password, "***"),
        _ => text,
    }
}

fn password_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    let userinfo = authority.rsplit_once('@')?.0;
    Some(userinfo.split_once(':')?.1)
}

/// rustls needs a process-wide crypto provider when several are compiled in (this workspace
/// has both aws-lc-rs and ring through other crates); pick aws-lc-rs unless one is set.
fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another thread installing one is fine: one is installed.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}

/// Milliseconds for `PX`/`PEXPIRE`: at least 1 (Redis refuses 0).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, CacheError> {
    serde_json::from_slice(bytes).map_err(|e| CacheError::Corrupt {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

fn encode<T: serde::Serialize>(value: &T) -> Result<String, CacheError> {
    serde_json::to_string(value).map_err(|e| CacheError::Invalid(format!("encoding: {e}")))
}

// ---------------------------------------------------------------------------------------
// Status cache
// ---------------------------------------------------------------------------------------

pub struct RedisStatusCache {
    conn: Arc<RedisConn>,
}

impl RedisStatusCache {
    pub fn new(conn: Arc<RedisConn>) -> Self {
        Self { conn }
    }
}

#[async_trait]
impl StatusCache for RedisStatusCache {
    async fn get(&self, task_id: &TaskId) -> Result<Option<TaskRecord>, CacheError> {
        let key = self.conn.key("status", task_id.as_str());
        let bytes: Option<Vec<u8>> = self
            .conn
            .call("GET", |mut con| {
                let key = key.clone();
                async move { redis::cmd("GET").arg(key).query_async(&mut con).await }
            })
            .await?;
        bytes.map(|b| decode(&key, &b)).transpose()
    }

    async fn put(&self, record: &TaskRecord, ttl: Duration) -> Result<(), CacheError> {
        let key = self.conn.key("status", record.task_id.as_str());
        let json = encode(record)?;
        self.conn
            .call("SET", |mut con| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(json)
                    .arg("PX")
                    .arg(millis(ttl))
                    .exec_async(&mut con)
                    .await
            })
            .await
    }

    async fn invalidate(&self, task_id: &TaskId) -> Result<(), CacheError> {
        let key = self.conn.key("status", task_id.as_str());
        self.conn
            .call("DEL", |mut con| async move {
                redis::cmd("DEL").arg(key).exec_async(&mut con).await
            })
            .await
    }
}

// ---------------------------------------------------------------------------------------
// Idempotency keys
// ---------------------------------------------------------------------------------------

pub struct RedisIdempotencyKeys {
    conn: Arc<RedisConn>,
}

impl RedisIdempotencyKeys {
    pub fn new(conn: Arc<RedisConn>) -> Self {
        Self { conn }
    }
}

/// The tenant is followed by a `:` in the key, so its own `:` (and the escape character) are
/// escaped: tenant `a:b` with key `c` and tenant `a` with key `b:c` stay apart.
fn escape_tenant(tenant: &str) -> String {
    tenant.replace('%', "%25").replace(':', "%3A")
}

#[async_trait]
impl IdempotencyKeys for RedisIdempotencyKeys {
    async fn claim(
        &self,
        tenant: &str,
        key: &str,
        task_id: &TaskId,
        ttl: Duration,
    ) -> Result<Claim, CacheError> {
        let redis_key = self
            .conn
            .key("idem", &format!("{}:{key}", escape_tenant(tenant)));
        let holder: Option<String> = self
            .conn
            .call("claim", |mut con| {
                let redis_key = redis_key.clone();
                async move {
                    CLAIM_SCRIPT
                        .key(redis_key)
                        .arg(task_id.as_str())
                        .arg(millis(ttl))
                        .invoke_async(&mut con)
                        .await
                }
            })
            .await?;
        match holder {
            None => Ok(Claim::New),
            Some(id) => {
                id.parse::<TaskId>()
                    .map(Claim::Existing)
                    .map_err(|e| CacheError::Corrupt {
                        key: redis_key,
                        reason: e.to_string(),
                    })
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Rate limiter
// ---------------------------------------------------------------------------------------

pub struct RedisRateLimiter {
    conn: Arc<RedisConn>,
    limit: RateLimit,
}

impl RedisRateLimiter {
    pub fn new(conn: Arc<RedisConn>, limit: RateLimit) -> Self {
        Self { conn, limit }
    }
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn try_acquire(&self, tenant: &str) -> Result<Result<(), RetryAfter>, CacheError> {
        let key = self.conn.key("rate", tenant);
        let limit = self.limit;
        let (granted, wait_us): (i64, i64) = self
            .conn
            .call("rate limit", |mut con| async move {
                TOKEN_BUCKET_SCRIPT
                    .key(key)
                    .arg(limit.capacity)
                    .arg(limit.refill_per_sec)
                    .invoke_async(&mut con)
                    .await
            })
            .await?;
        if granted == 1 {
            Ok(Ok(()))
        } else {
            let wait = u64::try_from(wait_us).unwrap_or(0);
            Ok(Err(RetryAfter(Duration::from_micros(wait))))
        }
    }

    fn limit(&self) -> RateLimit {
        self.limit
    }
}

// ---------------------------------------------------------------------------------------
// Event stream
// ---------------------------------------------------------------------------------------

pub struct RedisEventStream {
    conn: Arc<RedisConn>,
    retention: usize,
    ttl: Duration,
    block: Duration,
}

impl RedisEventStream {
    pub fn new(conn: Arc<RedisConn>, options: &HotOptions) -> Self {
        Self {
            conn,
            retention: options.event_retention,
            ttl: options.event_ttl,
            block: options.follow_block,
        }
    }
}

/// A subscriber's state between reads.
struct Follower {
    conn: MultiplexedConnection,
    key: String,
    /// Id of the last entry read: the next `XREAD` starts after it.
    cursor: String,
    last_seq: i64,
    pending: VecDeque<Result<TaskEvent, CacheError>>,
    block: Duration,
    read_limit: Duration,
    failed: bool,
}

impl Follower {
    async fn next_item(&mut self) -> Option<Result<TaskEvent, CacheError>> {
        if self.failed {
            return None;
        }
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if let Err(e) = self.read().await {
                self.failed = true;
                return Some(Err(e));
            }
        }
    }

    /// One `XREAD BLOCK`: everything after the cursor, or nothing once `block` has passed.
    async fn read(&mut self) -> Result<(), CacheError> {
        let block_ms = millis(self.block);
        let reply: Option<StreamReadReply> = bounded(
            self.read_limit,
            "XREAD",
            redis::cmd("XREAD")
                .arg("COUNT")
                .arg(READ_BATCH)
                .arg("BLOCK")
                .arg(block_ms)
                .arg("STREAMS")
                .arg(&self.key)
                .arg(&self.cursor)
                .query_async(&mut self.conn),
        )
        .await?;
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            self.cursor.clone_from(&entry.id);
            let seq = entry
                .id
                .split_once('-')
                .and_then(|(ms, _)| ms.parse::<i64>().ok());
            let item = match (seq, entry.get::<Vec<u8>>("event")) {
                (Some(seq), Some(json)) => match decode::<TaskEvent>(&self.key, &json) {
                    Ok(event) if event.seq == seq => Ok(event),
                    Ok(event) => Err(CacheError::Corrupt {
                        key: self.key.clone(),
                        reason: format!("entry {} holds event seq {}", entry.id, event.seq),
                    }),
                    Err(e) => Err(e),
                },
                _ => Err(CacheError::Corrupt {
                    key: self.key.clone(),
                    reason: format!("entry {} is not a patchflow event", entry.id),
                }),
            };
            match item {
                Ok(event) if event.seq <= self.last_seq => {}
                Ok(event) => {
                    self.last_seq = event.seq;
                    self.pending.push_back(Ok(event));
                }
                // A bad entry is reported and stepped over: resubscribing would meet it again.
                Err(e) => self.pending.push_back(Err(e)),
            }
        }
        Ok(())
    }
}

#[async_trait]
impl EventStream for RedisEventStream {
    async fn publish(&self, task_id: &TaskId, event: &TaskEvent) -> Result<Published, CacheError> {
        if event.seq < 1 {
            return Err(CacheError::Invalid(format!(
                "event seq must be at least 1, not {}",
                event.seq
            )));
        }
        let key = self.conn.key("events", task_id.as_str());
        let json = encode(event)?;
        let (retention, ttl) = (self.retention, self.ttl);
        let appended: i64 = self
            .conn
            .call("publish", |mut con| async move {
                PUBLISH_SCRIPT
                    .key(key)
                    .arg(event.seq)
                    .arg(json)
                    .arg(retention)
                    .arg(millis(ttl))
                    .invoke_async(&mut con)
                    .await
            })
            .await?;
        Ok(if appended == 1 {
            Published::Appended
        } else {
            Published::Stale
        })
    }

    async fn subscribe(
        &self,
        task_id: &TaskId,
        after_seq: i64,
    ) -> Result<EventSubscription, CacheError> {
        let conn = self.conn.dedicated(self.block).await?;
        let after_seq = after_seq.max(0);
        let follower = Follower {
            conn,
            key: self.conn.key("events", task_id.as_str()),
            cursor: format!("{after_seq}-0"),
            last_seq: after_seq,
            pending: VecDeque::new(),
            block: self.block,
            read_limit: self.block + self.conn.op_timeout,
            failed: false,
        };
        Ok(
            futures::stream::unfold(follower, |mut follower| async move {
                let item = follower.next_item().await?;
                Some((item, follower))
            })
            .boxed(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenants_with_colons_do_not_collide() {
        let a = format!("{}:{}", escape_tenant("a:b"), "c");
        let b = format!("{}:{}", escape_tenant("a"), "b:c");
        assert_ne!(a, b);
        assert_eq!(escape_tenant("100%:x"), "100%25%3Ax");
    }

    #[test]
    fn password_is_found_for_redaction() {
        assert_eq!(password_of("redis://u:s3cret@h:6379/0"), Some("s3cret"));
        assert_eq!(password_of("rediss://:s3cret@h"), Some("s3cret"));
        assert_eq!(password_of("redis://h:6379"), None);
    }

    #[test]
    fn expiry_is_never_zero() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1500)), 1);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
    }
}
