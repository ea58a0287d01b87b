//! Denials remembered: after Redis answers "limited, next token in T" for a bucket, this replica
//! answers 429 for the same bucket itself until T has passed. A denial changes no state of a
//! token bucket and no token can appear before T for anyone, so this changes no decision; it
//! only spares Redis the checks of a client that keeps knocking. The moment is the one the check
//! was sent at (never later than Redis's own), so a remembered denial never outlasts Redis's.
//! Only while Redis is known to still hold the bucket: not once the breaker opened or a client
//! reconnected (a server restarted empty has full buckets again), when the route's failure
//! policy decides as it would without the memory.

use std::time::Duration;

use moka::sync::Cache;
use moka::Expiry;
use tokio::time::Instant;

use super::bucket::Taken;

/// Buckets remembered at most per route (the least recently denied go first).
const CAPACITY: u64 = 65_536;

/// One bucket's remembered denial.
#[derive(Clone, Copy)]
struct Denied {
    /// The store's continuity when Redis denied.
    continuity: u64,
    /// The next token.
    until: Instant,
    /// The bucket full again.
    full: Instant,
}

struct UntilNextToken;

// moka's trait names std's Instant in its signature; the value is not used here.
#[allow(clippy::disallowed_types)]
impl Expiry<String, Denied> for UntilNextToken {
    fn expire_after_create(&self, _key: &String, denied: &Denied, _now: std::time::Instant) -> Option<Duration> {
        Some(denied.until.saturating_duration_since(Instant::now()))
    }
}

/// The denials of one route's buckets.
pub struct Denials {
    buckets: Cache<String, Denied>,
}

impl Default for Denials {
    fn default() -> Denials {
        Denials::new()
    }
}

impl Denials {
    /// Nothing remembered yet.
    pub fn new() -> Denials {
        Denials { buckets: Cache::builder().max_capacity(CAPACITY).expire_after(UntilNextToken).build() }
    }

    /// Remember Redis's denial of bucket `id`, asked at `asked` with the store's `continuity`.
    pub fn remember(&self, id: &str, asked: Instant, continuity: u64, taken: &Taken) {
        if taken.allowed || taken.retry_after.is_zero() {
            return;
        }
        let denied = Denied { continuity, until: asked + taken.retry_after, full: asked + taken.reset };
        self.buckets.insert(id.to_string(), denied);
    }

    /// The denial of bucket `id` as of `now`, while it holds and `holds` says Redis still has
    /// the bucket it was made in (given the continuity then).
    pub fn get(&self, id: &str, now: Instant, holds: impl FnOnce(u64) -> bool) -> Option<Taken> {
        let denied = self.buckets.get(id).filter(|d| holds(d.continuity))?;
        let retry_after = denied.until.checked_duration_since(now).filter(|left| !left.is_zero())?;
        Some(Taken { allowed: false, remaining: 0, retry_after, reset: denied.full.saturating_duration_since(now) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn denied(retry_ms: u64) -> Taken {
        Taken {
            allowed: false,
            remaining: 0,
            retry_after: Duration::from_millis(retry_ms),
            reset: Duration::from_millis(retry_ms * 3),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_denial_holds_until_the_next_token_from_when_it_was_asked() {
        let d = Denials::new();
        let asked = Instant::now();
        tokio::time::advance(Duration::from_millis(5)).await; // the round trip
        d.remember("a", asked, 7, &denied(100));
        let now = Instant::now();
        let same = |c| c == 7;
        let held = d.get("a", now, same).unwrap();
        assert_eq!((held.allowed, held.remaining), (false, 0));
        assert_eq!(held.retry_after, Duration::from_millis(95), "from the moment the check was sent");
        assert_eq!(held.reset, Duration::from_millis(295));
        assert!(d.get("b", now, same).is_none(), "another bucket");
        assert!(d.get("a", now, |c| c == 8).is_none(), "Redis reconnected since: it may have lost the bucket");
        assert!(d.get("a", asked + Duration::from_millis(100), same).is_none(), "a token may exist from then on");
        d.remember("c", asked, 7, &Taken { allowed: true, remaining: 3, ..denied(0) });
        assert!(d.get("c", now, same).is_none(), "allowed: nothing to remember");
    }
}
