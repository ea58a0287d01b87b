//! The only code that talks to Redis or the embedded store. Callers get values or a
//! [`StoreError`] quickly; they turn it into their `Unavailable` fallback and never see fred.

pub mod breaker;
pub mod memory;
pub mod redis;
pub mod target;
pub mod tracking;

use std::time::Duration;

use bytes::Bytes;

pub use breaker::BreakerState;
pub use memory::{MemoryStore, Weight};
pub use redis::{RedisStore, Role};
pub use target::{RedisTarget, Topology};

/// The in-process id of one variant of a path: `path_key \0 variant` (memory store, hot tier,
/// flights).
pub fn entry_id(path_key: &str, variant: &str) -> String {
    let mut id = String::with_capacity(path_key.len() + 1 + variant.len());
    id.push_str(path_key);
    id.push('\0');
    id.push_str(variant);
    id
}

/// The prefix shared by every [`entry_id`] of a path (a one-path purge).
pub fn path_prefix(path_key: &str) -> String {
    entry_id(path_key, "")
}

/// Where cache entries live. In Redis, one hash per path key holds that path's variants as
/// fields, so a one-path purge is one DEL and every operation touches a single key (cluster-safe);
/// a route's generation is a counter key of its own.
pub enum CacheStore {
    /// Shared by every replica.
    Redis(RedisStore),
    /// This process only.
    Memory(MemoryStore),
}

impl CacheStore {
    /// Whether a write could be sent now. While Redis is known to be out (breaker open, no
    /// connection) a write would only be refused; callers skip the work of preparing it.
    pub fn accepting(&self) -> bool {
        match self {
            Self::Redis(r) => r.state() == BreakerState::Up && r.connected(),
            Self::Memory(_) => true,
        }
    }

    /// One variant of a path.
    pub async fn get(&self, path_key: &str, variant: &str) -> Result<Option<Bytes>, StoreError> {
        match self {
            Self::Redis(r) => Box::pin(r.hget(path_key, variant)).await,
            Self::Memory(m) => Ok(m.get(path_key, variant)),
        }
    }

    /// Two variants of a path, in one round trip.
    pub async fn get_two(
        &self,
        path_key: &str,
        a: &str,
        b: &str,
    ) -> Result<(Option<Bytes>, Option<Bytes>), StoreError> {
        match self {
            Self::Redis(r) => Box::pin(r.hmget2(path_key, a, b)).await,
            Self::Memory(m) => Ok((m.get(path_key, a), m.get(path_key, b))),
        }
    }

    /// Store variants of a path for `keep_for`, in one operation; how many were stored: Redis
    /// refuses the write whole when its new variants would take the path past `max_variants`
    /// live ones (in process,
    /// each variant is an entry of its own, and the memory bound is the only one).
    pub async fn put(
        &self,
        path_key: &str,
        variants: Vec<(String, Bytes)>,
        keep_for: Duration,
        max_variants: usize,
    ) -> Result<usize, StoreError> {
        match self {
            Self::Redis(r) => Box::pin(r.hset_variants(path_key, variants, keep_for, max_variants)).await,
            Self::Memory(m) => {
                let n = variants.len();
                for (variant, value) in variants {
                    m.put(path_key, &variant, value, keep_for);
                }
                Ok(n)
            }
        }
    }

    /// Remove one variant (an entry that failed to decode).
    pub async fn remove(&self, path_key: &str, variant: &str) -> Result<(), StoreError> {
        match self {
            Self::Redis(r) => Box::pin(r.hdel(path_key, variant)).await,
            Self::Memory(m) => {
                m.remove(path_key, variant);
                Ok(())
            }
        }
    }

    /// Remove every variant of a path.
    pub async fn purge_path(&self, path_key: &str) -> Result<(), StoreError> {
        match self {
            Self::Redis(r) => Box::pin(r.del(path_key)).await,
            Self::Memory(m) => {
                m.purge_path(path_key);
                Ok(())
            }
        }
    }

    /// Take a lease: set `key` to `token` for `ttl` unless it exists. Whether it was taken.
    /// In process there is no one to share a fetch with: always taken.
    pub async fn lease(&self, key: &str, token: &str, ttl: Duration) -> Result<bool, StoreError> {
        match self {
            Self::Redis(r) => Box::pin(r.set_nx(key, token, ttl)).await,
            Self::Memory(_) => Ok(true),
        }
    }

    /// Whether a lease is held now.
    pub async fn leased(&self, key: &str) -> Result<bool, StoreError> {
        match self {
            Self::Redis(r) => Box::pin(r.get(key)).await.map(|v| v.is_some()),
            Self::Memory(_) => Ok(false),
        }
    }

    /// End a lease taken with `token` (not one taken by another since it expired).
    pub async fn release(&self, key: &str, token: &str) -> Result<(), StoreError> {
        match self {
            Self::Redis(r) => Box::pin(r.del_if(key, token)).await,
            Self::Memory(_) => Ok(()),
        }
    }

    /// A route's generation, read from `key`.
    pub async fn generation(&self, key: &str) -> Result<u64, StoreError> {
        match self {
            Self::Redis(r) => Box::pin(r.get_counter(key)).await,
            Self::Memory(m) => Ok(m.generation(key)),
        }
    }

    /// Increment the generation at `key`: every entry of the route is gone at once.
    pub async fn bump_generation(&self, key: &str) -> Result<u64, StoreError> {
        match self {
            Self::Redis(r) => Box::pin(r.incr(key)).await.map(|g| g.max(0) as u64),
            Self::Memory(m) => Ok(m.bump_generation(key)),
        }
    }
}

/// Why a store operation produced no value. Every variant arrives within the time budget.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The breaker is open: Redis was skipped without a call.
    #[error("redis skipped: breaker open")]
    BreakerOpen,
    /// fred holds no connection: Redis was skipped without a call.
    #[error("redis skipped: not connected")]
    NotConnected,
    /// Too many operations in flight: skipped rather than queued.
    #[error("redis skipped: too many operations in flight")]
    Saturated,
    /// The operation ran out of its budget (`redis.op_timeout`).
    #[error("redis operation timed out")]
    Timeout,
    /// Redis or fred answered with an error.
    #[error("redis error")]
    Redis(#[source] fred::error::Error),
}

impl StoreError {
    /// The `kind` labels of `sidecache_redis_errors_total`, indexed by [`StoreError::kind_index`].
    pub const KINDS: [&'static str; 5] = ["breaker_open", "not_connected", "saturated", "timeout", "error"];

    /// Position of this error's label in [`StoreError::KINDS`].
    pub fn kind_index(&self) -> usize {
        match self {
            Self::BreakerOpen => 0,
            Self::NotConnected => 1,
            Self::Saturated => 2,
            Self::Timeout => 3,
            Self::Redis(_) => 4,
        }
    }

    /// The `kind` label.
    pub fn kind(&self) -> &'static str {
        Self::KINDS[self.kind_index()]
    }
}
