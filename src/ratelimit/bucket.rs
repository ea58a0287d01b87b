//! The token bucket, twice with the same arithmetic: as the Lua script Redis runs for the shared
//! limit, and in Rust for the in-process buckets (no Redis, or `on_redis_error = "local"`).
//!
//! A bucket holds up to `burst` tokens and gains one every `per_token` microseconds (the rate's
//! period divided by its tokens). A request takes one token or is refused. The state is the
//! level after the last taken token and the time it was taken; the level now follows from the
//! time since. Refused requests change nothing, so they cost no write.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::RateLimitConfig;

/// The shared bucket: one hash per bucket (`n` = level, `t` = microseconds of the last take),
/// time from Redis `TIME` so replicas with skewed clocks agree, and the key expiring when the
/// bucket would be full again (a full bucket and a missing key mean the same). One key, so it
/// runs on a cluster. A clock that went backwards (a failover) refills nothing. The expiry is
/// capped at 10^15 ms, so an absurd shape still yields an integer PEXPIRE accepts.
///
/// A check may ask for a lease of more than one token ([`super::lease`]): granted only while the
/// bucket holds at least `spread` times as many, else one.
///
/// ARGV: burst, period in microseconds, tokens per period, tokens wanted, spread.
/// Returns `{tokens taken (0 = refused), whole tokens left, µs until the next token, µs until full}`.
pub const SCRIPT: &str = r"
local burst = tonumber(ARGV[1])
local per_token = tonumber(ARGV[2]) / tonumber(ARGV[3])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local state = redis.call('HMGET', KEYS[1], 'n', 't')
local level = burst
local stored, last = tonumber(state[1]), tonumber(state[2])
if stored and last then
  if now < last then now = last end
  level = math.min(burst, stored + (now - last) / per_token)
end
local want = math.floor(tonumber(ARGV[4]) or 1)
local spread = math.max(1, tonumber(ARGV[5]) or 1)
local taken = 0
if level >= 1 then
  taken = 1
  if want > 1 and level >= want * spread then taken = want end
  level = level - taken
  redis.call('HSET', KEYS[1], 'n', level, 't', now)
  redis.call('PEXPIRE', KEYS[1], math.max(1, math.min(1e15, math.ceil((burst - level) * per_token / 1000))))
end
local retry = 0
if level < 1 then retry = math.ceil((1 - level) * per_token) end
return {taken, math.floor(level), retry, math.ceil((burst - level) * per_token)}
";

/// Buckets kept in process per route; past it the least used are dropped (and start full).
const LOCAL_BUCKETS_MAX: u64 = 100_000;

/// A route's bucket shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// Capacity in tokens.
    pub burst: NonZeroU32,
    /// The rate's period in microseconds.
    pub period_us: u64,
    /// Tokens per period.
    pub tokens: NonZeroU32,
}

impl Params {
    /// From a route's `rate_limit` table.
    pub fn new(config: &RateLimitConfig) -> Params {
        Params {
            burst: config.burst,
            period_us: u64::try_from(config.rate.per.as_micros()).unwrap_or(u64::MAX).max(1),
            tokens: config.rate.tokens,
        }
    }

    fn per_token_us(&self) -> f64 {
        self.period_us as f64 / f64::from(self.tokens.get())
    }

    /// How long an empty bucket takes to fill: the `w` of `RateLimit-Policy`, and how long an
    /// idle in-process bucket is worth keeping (after that it is full, as if new).
    pub fn fill_time(&self) -> Duration {
        micros(f64::from(self.burst.get()) * self.per_token_us())
    }
}

/// What a take decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    /// A token was taken: the request may go on.
    pub allowed: bool,
    /// Whole tokens left.
    pub remaining: u64,
    /// Until the next whole token (zero while tokens are left).
    pub retry_after: Duration,
    /// Until the bucket is full again.
    pub reset: Duration,
}

impl Taken {
    /// From the script's reply, with the tokens it took.
    pub fn from_reply(reply: &[i64]) -> Option<(Taken, u32)> {
        let [taken, remaining, retry_us, reset_us] = *reply else { return None };
        let taken = u32::try_from(taken.max(0)).unwrap_or(u32::MAX);
        let t = Taken {
            allowed: taken >= 1,
            remaining: remaining.max(0) as u64,
            retry_after: Duration::from_micros(retry_us.max(0) as u64),
            reset: Duration::from_micros(reset_us.max(0) as u64),
        };
        Some((t, taken))
    }
}

fn micros(us: f64) -> Duration {
    Duration::from_micros(us.ceil().clamp(0.0, u64::MAX as f64) as u64)
}

/// One bucket's state, the same as the script keeps.
#[derive(Debug, Clone, Copy)]
struct Level {
    tokens: f64,
    at_us: u64,
}

impl Level {
    /// Take one token at `now_us` (microseconds on any monotonic clock).
    fn take(&mut self, now_us: u64, p: &Params) -> Taken {
        let burst = f64::from(p.burst.get());
        let per_token = p.per_token_us();
        let now_us = now_us.max(self.at_us);
        let mut level = burst.min(self.tokens + (now_us - self.at_us) as f64 / per_token);
        let allowed = level >= 1.0;
        if allowed {
            level -= 1.0;
            *self = Level { tokens: level, at_us: now_us };
        }
        Taken {
            allowed,
            remaining: level.floor() as u64,
            retry_after: if level < 1.0 { micros((1.0 - level) * per_token) } else { Duration::ZERO },
            reset: micros((burst - level) * per_token),
        }
    }
}

/// In-process buckets of one route, keyed by client. Bounded: a bucket idle for its fill time
/// is dropped (it would be full again, so nothing is lost), and past [`LOCAL_BUCKETS_MAX`] the
/// least recently used go first.
pub struct LocalBuckets {
    params: Params,
    epoch: Instant,
    buckets: moka::sync::Cache<String, Arc<Mutex<Level>>>,
}

impl LocalBuckets {
    /// Empty buckets for a route of this shape.
    pub fn new(params: Params) -> LocalBuckets {
        let idle = params.fill_time().max(Duration::from_secs(1));
        LocalBuckets {
            params,
            epoch: Instant::now(),
            buckets: moka::sync::Cache::builder().max_capacity(LOCAL_BUCKETS_MAX).time_to_idle(idle).build(),
        }
    }

    /// Take a token from `client`'s bucket.
    pub fn take(&self, client: &str) -> Taken {
        let now_us = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let full = Level { tokens: f64::from(self.params.burst.get()), at_us: now_us };
        let bucket = match self.buckets.get(client) {
            Some(bucket) => bucket,
            None => self.buckets.get_with(client.to_owned(), || Arc::new(Mutex::new(full))),
        };
        let mut level = bucket.lock().unwrap_or_else(|p| p.into_inner());
        level.take(now_us, &self.params)
    }

    /// Buckets held now.
    #[cfg(test)]
    fn held(&self) -> u64 {
        self.buckets.run_pending_tasks();
        self.buckets.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(burst: u32, tokens: u32, period: Duration) -> Params {
        Params {
            burst: NonZeroU32::new(burst).unwrap(),
            period_us: period.as_micros() as u64,
            tokens: NonZeroU32::new(tokens).unwrap(),
        }
    }

    fn full(p: &Params) -> Level {
        Level { tokens: f64::from(p.burst.get()), at_us: 0 }
    }

    #[test]
    fn a_full_bucket_admits_exactly_burst_then_says_when() {
        // 100 per minute: a token every 600 ms.
        let p = params(100, 100, Duration::from_secs(60));
        let mut level = full(&p);
        for i in 0..100 {
            let t = level.take(0, &p);
            assert!(t.allowed, "take {i}");
            assert_eq!(t.remaining, 99 - i);
        }
        let refused = level.take(0, &p);
        assert!(!refused.allowed);
        assert_eq!(refused.remaining, 0);
        assert_eq!(refused.retry_after, Duration::from_millis(600));
        assert_eq!(refused.reset, Duration::from_secs(60));
        // Refused takes change nothing.
        assert_eq!(level.take(0, &p), refused);
    }

    #[test]
    fn refills_at_the_rate_and_never_past_burst() {
        let p = params(2, 10, Duration::from_secs(1)); // a token every 100 ms
        let mut level = full(&p);
        assert!(level.take(0, &p).allowed);
        assert!(level.take(0, &p).allowed);
        assert!(!level.take(50_000, &p).allowed);
        let t = level.take(100_000, &p);
        assert!(t.allowed && t.remaining == 0, "{t:?}");
        // A long idle time fills the bucket to burst only.
        let t = level.take(3_600_000_000, &p);
        assert_eq!((t.allowed, t.remaining), (true, 1));
        assert_eq!(t.reset, Duration::from_millis(100));
    }

    #[test]
    fn a_clock_going_backwards_refills_nothing() {
        let p = params(1, 1, Duration::from_secs(1));
        let mut level = full(&p);
        assert!(level.take(5_000_000, &p).allowed);
        assert!(!level.take(1_000_000, &p).allowed);
        assert!(!level.take(5_500_000, &p).allowed);
        assert!(level.take(6_000_000, &p).allowed);
    }

    #[test]
    fn fill_time_is_burst_tokens_at_the_rate() {
        assert_eq!(params(100, 100, Duration::from_secs(60)).fill_time(), Duration::from_secs(60));
        assert_eq!(params(10, 1, Duration::from_secs(1)).fill_time(), Duration::from_secs(10));
        assert_eq!(params(1, 3, Duration::from_secs(1)).fill_time(), Duration::from_micros(333_334));
    }

    #[test]
    fn script_reply_is_read_defensively() {
        let (t, taken) = Taken::from_reply(&[0, 0, 600_000, 60_000_000]).unwrap();
        assert!(!t.allowed && taken == 0);
        assert_eq!(t.retry_after, Duration::from_millis(600));
        assert_eq!(Taken::from_reply(&[1, -3, -1, 5]).unwrap().0.remaining, 0);
        let (t, taken) = Taken::from_reply(&[40, 300, 0, 5]).unwrap();
        assert!(t.allowed && taken == 40, "a lease");
        assert_eq!(Taken::from_reply(&[-2, 0, 0, 0]).unwrap().1, 0);
        assert!(Taken::from_reply(&[1, 2, 3]).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn local_buckets_are_per_client_and_refill_with_time() {
        let buckets = LocalBuckets::new(params(2, 1, Duration::from_secs(1)));
        assert!(buckets.take("a").allowed);
        assert!(buckets.take("a").allowed);
        assert!(!buckets.take("a").allowed);
        assert!(buckets.take("b").allowed, "another client has its own bucket");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(buckets.take("a").allowed);
        assert!(!buckets.take("a").allowed);
        assert_eq!(buckets.held(), 2);
    }
}
