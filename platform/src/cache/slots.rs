//! Batch slots: a counting semaphore per batch whose permits are leases, so "at most N tasks
//! of this batch run the agent at once" holds across every worker that shares the back-end.
//!
//! A permit is held by a task id (not by a process): a retried activity on another worker
//! re-enters the permit its task already holds instead of taking a second one. Permits
//! expire unless renewed, so a worker that crashes mid-run frees its slot after the lease
//! time; a live holder renews it with its heartbeats.
//!
//! In Redis a batch is one sorted set, `P:slots:<batch>`, member = task id, score = the
//! lease's expiry in server milliseconds (`TIME`, so workers with skewed clocks agree).
//! Acquire, renew and release are each one Lua script.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use tokio::time::Instant;

use super::CacheError;
use super::redis::RedisConn;

/// Leases on a batch's slots.
#[async_trait]
pub trait BatchSlots: Send + Sync + 'static {
    /// Takes one of `limit` slots of `batch` for `holder`, for `ttl`. `true` when held
    /// (also when `holder` already held it: the lease is extended), `false` when all slots
    /// are held by live leases.
    async fn try_acquire(
        &self,
        batch: &str,
        holder: &str,
        limit: u32,
        ttl: Duration,
    ) -> Result<bool, CacheError>;

    /// Extends `holder`'s lease; `false` when it holds none (it expired or was released).
    async fn renew(&self, batch: &str, holder: &str, ttl: Duration) -> Result<bool, CacheError>;

    /// Gives the slot back; releasing a slot not held is a no-op.
    async fn release(&self, batch: &str, holder: &str) -> Result<(), CacheError>;

    /// The holders of live leases (for status and tests).
    async fn holders(&self, batch: &str) -> Result<Vec<String>, CacheError>;
}

fn check(batch: &str, holder: &str) -> Result<(), CacheError> {
    if batch.is_empty() || holder.is_empty() {
        return Err(CacheError::Invalid(
            "a batch slot needs a batch id and a holder".into(),
        ));
    }
    Ok(())
}

/// One process's slots (the embedded default: worker and gateway in one `patchflow up`).
#[derive(Default)]
pub struct MemoryBatchSlots {
    batches: Mutex<HashMap<String, HashMap<String, Instant>>>,
}

impl MemoryBatchSlots {
    pub fn new() -> Self {
        Self::default()
    }

    fn with_batch<T>(&self, batch: &str, f: impl FnOnce(&mut HashMap<String, Instant>) -> T) -> T {
        let mut all = self.batches.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let leases = all.entry(batch.to_string()).or_default();
        leases.retain(|_, until| *until > now);
        let out = f(leases);
        if leases.is_empty() {
            all.remove(batch);
        }
        out
    }
}

#[async_trait]
impl BatchSlots for MemoryBatchSlots {
    async fn try_acquire(
        &self,
        batch: &str,
        holder: &str,
        limit: u32,
        ttl: Duration,
    ) -> Result<bool, CacheError> {
        check(batch, holder)?;
        let until = Instant::now() + ttl;
        Ok(self.with_batch(batch, |leases| {
            if leases.contains_key(holder) || leases.len() < limit as usize {
                leases.insert(holder.to_string(), until);
                true
            } else {
                false
            }
        }))
    }

    async fn renew(&self, batch: &str, holder: &str, ttl: Duration) -> Result<bool, CacheError> {
        check(batch, holder)?;
        let until = Instant::now() + ttl;
        Ok(
            self.with_batch(batch, |leases| match leases.get_mut(holder) {
                Some(u) => {
                    *u = until;
                    true
                }
                None => false,
            }),
        )
    }

    async fn release(&self, batch: &str, holder: &str) -> Result<(), CacheError> {
        check(batch, holder)?;
        self.with_batch(batch, |leases| leases.remove(holder));
        Ok(())
    }

    async fn holders(&self, batch: &str) -> Result<Vec<String>, CacheError> {
        let mut h = self.with_batch(batch, |leases| leases.keys().cloned().collect::<Vec<_>>());
        h.sort();
        Ok(h)
    }
}

/// Drops expired leases, then takes or extends one. KEYS[1] the set; ARGV holder, limit,
/// ttl ms. The set itself expires a while after its newest lease.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZSCORE', KEYS[1], ARGV[1])
if held or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
  return 1
end
return 0
",
    )
});

static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl * 2)
  return 1
end
return 0
",
    )
});

static HOLDERS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')
",
    )
});

/// Slots shared by every worker on the same Redis and key prefix.
pub struct RedisBatchSlots {
    conn: Arc<RedisConn>,
}

impl RedisBatchSlots {
    pub fn new(conn: Arc<RedisConn>) -> Self {
        Self { conn }
    }

    fn key(&self, batch: &str) -> String {
        self.conn.key("slots", batch)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[async_trait]
impl BatchSlots for RedisBatchSlots {
    async fn try_acquire(
        &self,
        batch: &str,
        holder: &str,
        limit: u32,
        ttl: Duration,
    ) -> Result<bool, CacheError> {
        check(batch, holder)?;
        let key = self.key(batch);
        let holder = holder.to_string();
        self.conn
            .call("batch slot acquire", |mut con| async move {
                ACQUIRE
                    .key(key)
                    .arg(holder)
                    .arg(limit)
                    .arg(millis(ttl))
                    .invoke_async::<i64>(&mut con)
                    .await
            })
            .await
            .map(|n| n == 1)
    }

    async fn renew(&self, batch: &str, holder: &str, ttl: Duration) -> Result<bool, CacheError> {
        check(batch, holder)?;
        let key = self.key(batch);
        let holder = holder.to_string();
        self.conn
            .call("batch slot renew", |mut con| async move {
                RENEW
                    .key(key)
                    .arg(holder)
                    .arg(millis(ttl))
                    .invoke_async::<i64>(&mut con)
                    .await
            })
            .await
            .map(|n| n == 1)
    }

    async fn release(&self, batch: &str, holder: &str) -> Result<(), CacheError> {
        check(batch, holder)?;
        let key = self.key(batch);
        let holder = holder.to_string();
        self.conn
            .call("batch slot release", |mut con| async move {
                redis::cmd("ZREM")
                    .arg(key)
                    .arg(holder)
                    .query_async::<i64>(&mut con)
                    .await
            })
            .await
            .map(drop)
    }

    async fn holders(&self, batch: &str) -> Result<Vec<String>, CacheError> {
        let key = self.key(batch);
        let mut h = self
            .conn
            .call("batch slot holders", |mut con| async move {
                HOLDERS.key(key).invoke_async::<Vec<String>>(&mut con).await
            })
            .await?;
        h.sort();
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The same behaviour from both implementations: the limit holds, a holder re-enters,
    /// a release frees a slot, and an unrenewed lease expires (a crashed worker).
    async fn behaves(slots: &dyn BatchSlots, batch: &str) {
        let ttl = Duration::from_millis(600);
        assert!(slots.try_acquire(batch, "a", 2, ttl).await.unwrap());
        assert!(slots.try_acquire(batch, "b", 2, ttl).await.unwrap());
        assert!(!slots.try_acquire(batch, "c", 2, ttl).await.unwrap());
        assert!(
            slots.try_acquire(batch, "a", 2, ttl).await.unwrap(),
            "re-entry"
        );
        assert_eq!(slots.holders(batch).await.unwrap(), ["a", "b"]);
        slots.release(batch, "b").await.unwrap();
        assert!(slots.try_acquire(batch, "c", 2, ttl).await.unwrap());
        assert!(!slots.renew(batch, "b", ttl).await.unwrap());
        // `a` keeps renewing, `c` stops (its worker died): only `c`'s slot frees up.
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(250)).await;
            assert!(slots.renew(batch, "a", ttl).await.unwrap());
        }
        assert_eq!(slots.holders(batch).await.unwrap(), ["a"]);
        assert!(slots.try_acquire(batch, "d", 2, ttl).await.unwrap());
        assert!(!slots.try_acquire(batch, "e", 2, ttl).await.unwrap());
        let e = slots.try_acquire("", "a", 1, ttl).await.unwrap_err();
        assert!(e.to_string().contains("batch id"), "{e}");
    }

    #[tokio::test]
    async fn in_process_slots_hold_the_limit_and_expire() {
        behaves(&MemoryBatchSlots::new(), "b1").await;
    }

    #[tokio::test]
    async fn redis_slots_hold_the_limit_and_expire() {
        let url = std::env::var("PATCHFLOW_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!("pf-slots-{}", uuid_like());
        let hot = super::super::Hot::open(Some(&url), &prefix).await.unwrap();
        hot.ping().await.unwrap();
        behaves(hot.slots.as_ref(), "b1").await;
    }

    fn uuid_like() -> String {
        format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        )
    }
}
