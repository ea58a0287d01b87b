//! The only code that talks to Redis (or, later, the embedded store). Callers get values or a
//! [`StoreError`] quickly; they turn it into their `Unavailable` fallback and never see fred.

pub mod breaker;
pub mod redis;

pub use breaker::BreakerState;
pub use redis::RedisStore;

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
