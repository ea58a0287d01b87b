//! Token leases for busy buckets: when a bucket holds far more tokens than this replica would
//! spend in a moment, one script call takes several (a lease), and the requests that follow
//! spend them here without asking Redis, for at most [`LEASE_TIME`]; tokens left when the lease
//! ends are lost. Every token spent was taken from the shared bucket first, so the replicas
//! together never admit more than the bucket allows; they may admit slightly less (what expired
//! unspent).
//!
//! A lease is sized from this replica's demand on the bucket: the requests seen since the last
//! lease was asked for (within [`WINDOW`]), scaled to [`SIZED_FOR`], at most double what was
//! spent of the last lease. Until [`MIN_LEASE`] requests have been seen in the window, and below
//! [`MIN_LEASE`] tokens, a check asks for one: a lease answers demand that was seen, never one
//! short gap between two requests, so a client cannot make a replica take tokens it will not
//! spend faster than it spends them; a bucket seen once in a while stays one round trip per
//! check, and a small bucket (under `SPREAD x MIN_LEASE` tokens) is never leased from:
//! what it admits stays exact to the token even when demand stops with a lease unspent. The
//! script grants a lease only while the bucket holds at least [`SPREAD`] times as many tokens;
//! nearer empty it takes one token per call as before, so one replica cannot take what the
//! others need.
//!
//! One request at a time asks for a lease; the others meanwhile take single tokens as without
//! leases. The next lease is asked for ahead, by the request that takes the lease below a
//! quarter of its grant (after it is answered), so a busy bucket's requests rarely find the
//! lease empty; its grant adds to what is left and both are spent until it expires. Like
//! denials, a lease is used only while Redis is known to still hold the bucket it came from.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use moka::sync::Cache;
use tokio::time::Instant;

use super::bucket::Taken;

/// How long a lease's tokens may be spent.
const LEASE_TIME: Duration = Duration::from_millis(50);
/// A lease holds this long's worth of the replica's demand, less than [`LEASE_TIME`] so that it
/// normally runs out (and is renewed) before it expires unspent.
const SIZED_FOR: Duration = Duration::from_millis(20);
/// A lease is granted only from a bucket holding at least this many times its size.
pub const SPREAD: u32 = 8;
/// The smallest lease asked for, and the requests a window must hold before one is: less
/// demand than this asks for single tokens.
const MIN_LEASE: u32 = 16;
/// Demand is counted over at most this long: an older count says nothing of now.
const WINDOW: Duration = LEASE_TIME;
/// The largest lease asked for.
const MAX_LEASE: u32 = 1 << 20;
/// Buckets followed at most per route (the least recently used go first).
const CAPACITY: u64 = 65_536;
/// A bucket not seen for this long is forgotten: its demand would size a lease of one token.
const IDLE: Duration = Duration::from_secs(1);

/// What this replica knows of one bucket.
#[derive(Debug)]
struct State {
    /// The store's continuity when the lease was granted.
    continuity: u64,
    /// Tokens of the lease not spent yet.
    left: u32,
    /// When the lease's tokens are no longer spent.
    expires: Instant,
    /// Whole tokens Redis held after the grant.
    remaining: u64,
    /// When Redis's bucket would be full again, as of the grant.
    full: Instant,
    /// The start of the demand window: when a lease was last asked for, the first check, or
    /// the first request after a window went by.
    since: Instant,
    /// Requests seen since then, counting the first.
    seen: u32,
    /// The last grant's size, or what was spent of it when it ended unspent.
    granted: u32,
    /// A request is asking for a lease now.
    asking: bool,
}

/// What to ask Redis for: a token for a request (and a lease), or a lease ahead.
#[must_use]
#[derive(Debug)]
pub struct Ask {
    /// Tokens to ask for: one for this request, the rest a lease; all a lease when ahead.
    pub want: u32,
    /// The request already has its token: everything granted is lease.
    ahead: bool,
    /// Held by the one request asking for a lease: dropped without a grant (Redis failed, the
    /// request was cancelled), it lets the next request ask.
    asking: Option<Asking>,
}

#[derive(Debug)]
struct Asking(Arc<Mutex<State>>);

impl Drop for Asking {
    fn drop(&mut self) {
        lock(&self.0).asking = false;
    }
}

/// The leases of one route's buckets.
pub struct Leases {
    buckets: Cache<String, Arc<Mutex<State>>>,
}

impl Default for Leases {
    fn default() -> Leases {
        Leases::new()
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Leases {
    /// No bucket followed yet.
    pub fn new() -> Leases {
        Leases { buckets: Cache::builder().max_capacity(CAPACITY).time_to_idle(IDLE).build() }
    }

    /// Spend a token of bucket `id`'s lease at `now`, while it lasts and `holds` says Redis
    /// still has the bucket it came from (given the continuity then), with the next lease to
    /// ask for ahead when this one runs low; or what to ask Redis for.
    pub fn take(&self, id: &str, now: Instant, holds: impl FnOnce(u64) -> bool) -> Result<(Taken, Option<Ask>), Ask> {
        let Some(bucket) = self.buckets.get(id) else { return Err(Ask { want: 1, ahead: false, asking: None }) };
        let mut s = lock(&bucket);
        if !s.asking && now.saturating_duration_since(s.since) > WINDOW {
            s.since = now;
            s.seen = 0;
        }
        s.seen = s.seen.saturating_add(1);
        if s.left > 0 && now < s.expires && holds(s.continuity) {
            s.left -= 1;
            let taken = Taken {
                allowed: true,
                remaining: s.remaining + u64::from(s.left),
                retry_after: Duration::ZERO,
                reset: s.full.saturating_duration_since(now),
            };
            let mut ahead = None;
            if !s.asking && s.left <= s.granted / 4 {
                let want = s.size(now);
                ahead = (want > 1).then(|| s.ask(want, now, true, &bucket));
            }
            return Ok((taken, ahead));
        }
        if s.left > 0 {
            // Expired, or Redis may have lost the bucket: the next lease answers what was spent.
            s.granted = s.granted.saturating_sub(s.left).max(1);
            s.left = 0;
        }
        let want = s.size(now);
        if s.asking || want == 1 {
            // One token, and the window goes on counting.
            return Err(Ask { want: 1, ahead: false, asking: None });
        }
        Err(s.ask(want, now, false, &bucket))
    }

    /// Redis's answer to `ask` for bucket `id`, asked at `asked` with the store's `continuity`:
    /// `granted` tokens taken (one is the asking request's unless asked ahead).
    pub fn granted(&self, id: &str, ask: Ask, asked: Instant, continuity: u64, granted: u32, taken: &Taken) {
        let Some(Asking(bucket)) = &ask.asking else {
            if taken.allowed && !self.buckets.contains_key(id) {
                // The first check of a bucket: follow its demand from now on.
                let state = State {
                    continuity,
                    left: 0,
                    expires: asked,
                    remaining: 0,
                    full: asked,
                    since: asked,
                    seen: 1,
                    granted: 1,
                    asking: false,
                };
                self.buckets.insert(id.to_owned(), Arc::new(Mutex::new(state)));
            }
            return;
        };
        if !taken.allowed {
            return;
        }
        let mut s = lock(bucket);
        // Asked ahead: what is left of the current lease is kept while it is still good (not
        // expired, and from the same Redis as the grant).
        let kept = if ask.ahead && s.continuity == continuity && Instant::now() < s.expires { s.left } else { 0 };
        s.continuity = continuity;
        s.left = if ask.ahead { kept.saturating_add(granted) } else { granted.saturating_sub(1) };
        s.expires = asked + LEASE_TIME;
        s.remaining = taken.remaining;
        s.full = asked + taken.reset;
        s.granted = granted.max(1);
    }
}

impl State {
    /// This bucket's request asks for `want` tokens from `now` on.
    fn ask(&mut self, want: u32, now: Instant, ahead: bool, bucket: &Arc<Mutex<State>>) -> Ask {
        self.asking = true;
        self.since = now;
        self.seen = 1;
        Ask { want, ahead, asking: Some(Asking(bucket.clone())) }
    }

    /// The lease to ask for at `now`: the demand counted in the window, scaled to [`SIZED_FOR`],
    /// at most double the last grant; one token until the window holds [`MIN_LEASE`] requests,
    /// or when the lease would be smaller.
    fn size(&self, now: Instant) -> u32 {
        // The requests after the window's first, this one included.
        let counted = self.seen.saturating_sub(1);
        if counted < MIN_LEASE {
            return 1;
        }
        let elapsed = now.saturating_duration_since(self.since).as_secs_f64();
        let cap = self.granted.saturating_mul(2).clamp(MIN_LEASE, MAX_LEASE);
        let demand = f64::from(counted) * SIZED_FOR.as_secs_f64() / elapsed;
        let want = if demand.is_finite() { (demand.ceil() as u32).min(cap) } else { cap };
        if want < MIN_LEASE {
            1
        } else {
            want
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(remaining: u64) -> Taken {
        Taken { allowed: true, remaining, retry_after: Duration::ZERO, reset: Duration::from_secs(10) }
    }

    const SAME: fn(u64) -> bool = |c| c == 7;

    /// One request: spent from the lease, or asked of a stand-in Redis granting what is wanted.
    fn one(leases: &Leases, grants: &mut Vec<u32>) -> Taken {
        let now = Instant::now();
        match leases.take("a", now, SAME) {
            Ok((taken, ahead)) => {
                if let Some(ask) = ahead {
                    let want = ask.want;
                    grants.push(want);
                    leases.granted("a", ask, now, 7, want, &allowed(1000));
                }
                taken
            }
            Err(ask) => {
                let want = ask.want;
                grants.push(want);
                let taken = allowed(1000);
                leases.granted("a", ask, now, 7, want, &taken);
                taken
            }
        }
    }

    /// After a quiet window, 17 requests 100 µs apart, each given its single token: the 17th
    /// asks for a lease.
    async fn until_a_lease_is_asked(leases: &Leases) -> Ask {
        tokio::time::advance(WINDOW * 2).await;
        let mut grants = Vec::new();
        for _ in 0..16 {
            one(leases, &mut grants);
            tokio::time::advance(Duration::from_micros(100)).await;
        }
        assert_eq!(grants, [1; 16]);
        leases.take("a", Instant::now(), SAME).unwrap_err()
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_bucket_grows_its_lease_and_a_quiet_one_stays_single() {
        let leases = Leases::new();
        let mut grants = Vec::new();
        // 10,000 requests a second on one bucket: a request every 100 µs.
        for _ in 0..2000 {
            assert!(one(&leases, &mut grants).allowed);
            tokio::time::advance(Duration::from_micros(100)).await;
        }
        // Single tokens until 16 requests were counted, then from the smallest lease, doubling
        // up to 20 ms of demand (200 tokens), then renewed at that size.
        assert_eq!(&grants[..16], &[1; 16], "{grants:?}");
        assert_eq!(&grants[16..20], &[16, 32, 64, 128], "{grants:?}");
        assert!(grants[20..].iter().all(|g| (195..=205).contains(g)), "{grants:?}");
        assert!(grants.len() < 40, "{} Redis calls for 2,000 requests", grants.len());

        // 500 requests a second (10 in 20 ms): each one asks Redis for one token.
        let quiet = Leases::new();
        let mut grants = Vec::new();
        for _ in 0..50 {
            one(&quiet, &mut grants);
            tokio::time::advance(Duration::from_millis(2)).await;
        }
        assert_eq!(grants, [1; 50]);
    }

    /// Tokens taken from Redis against requests admitted, for requests arriving at these gaps.
    async fn taken_for_admitted(gaps: impl Iterator<Item = Duration>) -> (u64, u64) {
        let leases = Leases::new();
        let mut grants = Vec::new();
        let mut admitted = 0;
        for gap in gaps {
            assert!(one(&leases, &mut grants).allowed);
            admitted += 1;
            tokio::time::advance(gap).await;
        }
        (grants.iter().map(|g| u64::from(*g)).sum(), admitted)
    }

    #[tokio::test(start_paused = true)]
    async fn short_gaps_without_demand_take_no_lease() {
        // Pairs of requests 500 µs apart every 60 ms: one short gap is no demand.
        let pairs = [Duration::from_micros(500), Duration::from_millis(60)].into_iter().cycle().take(200);
        assert_eq!(taken_for_admitted(pairs).await, (200, 200));
        // Four requests 400 µs apart every 60 ms.
        let bursts = [400, 400, 400, 60_000].into_iter().map(Duration::from_micros).cycle().take(400);
        assert_eq!(taken_for_admitted(bursts).await, (400, 400));
        // Requests arriving at random, 100 a second on average (gaps 1-19 ms).
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let random = std::iter::repeat_with(move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Duration::from_millis(1 + x % 19)
        });
        assert_eq!(taken_for_admitted(random.take(2000)).await, (2000, 2000));
        // A burst of 17 every 60 ms leases 16 and spends 1 of it: never more than that.
        let gaps = (0..17).map(|i| if i == 16 { 60_000 } else { 100 }).map(Duration::from_micros);
        let (taken, admitted) = taken_for_admitted(gaps.cycle().take(17 * 20)).await;
        assert_eq!(admitted, 340);
        assert!(taken <= 2 * admitted, "{taken} taken for {admitted} admitted");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lease_is_spent_only_while_it_lasts_and_redis_keeps_the_bucket() {
        let leases = Leases::new();
        let ask = until_a_lease_is_asked(&leases).await;
        assert_eq!(ask.want, MIN_LEASE);
        leases.granted("a", ask, Instant::now(), 7, 3, &allowed(96));
        let (spent, _) = leases.take("a", Instant::now(), SAME).unwrap();
        assert_eq!((spent.allowed, spent.remaining), (true, 97), "Redis's remaining plus the lease's");
        assert!(leases.take("a", Instant::now(), SAME).is_ok());
        assert!(leases.take("a", Instant::now(), SAME).is_err(), "spent");

        // A fresh lease, then time passes: unspent tokens are not used after LEASE_TIME.
        let lease = until_a_lease_is_asked(&leases).await;
        let now = Instant::now();
        leases.granted("a", lease, now, 7, 4, &allowed(90));
        assert!(leases.take("a", now, |c| c == 8).is_err(), "Redis reconnected: the bucket may be gone");
        let lease = until_a_lease_is_asked(&leases).await;
        leases.granted("a", lease, Instant::now(), 7, 4, &allowed(90));
        tokio::time::advance(LEASE_TIME).await;
        assert!(leases.take("a", Instant::now(), SAME).is_err(), "expired");
    }

    /// A lease of 64 spent down to a quarter: the ask ahead.
    async fn ahead_of_a_lease_of_64(leases: &Leases) -> Ask {
        let lease = until_a_lease_is_asked(leases).await;
        let now = Instant::now();
        leases.granted("a", lease, now, 7, 64, &allowed(935));
        // 63 left: the 47th spends down to 16, a quarter of the grant, and asks ahead.
        for _ in 0..46 {
            assert!(leases.take("a", now, SAME).unwrap().1.is_none());
        }
        let (_, ahead) = leases.take("a", now, SAME).unwrap();
        ahead.expect("asked ahead")
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_lease_is_asked_for_ahead_and_adds_to_what_is_left() {
        let leases = Leases::new();
        let ahead = ahead_of_a_lease_of_64(&leases).await;
        assert!(ahead.want >= 16, "{}", ahead.want);
        let now = Instant::now();
        for _ in 0..16 {
            assert!(leases.take("a", now, SAME).unwrap().1.is_none(), "one asks at a time, the rest spend");
        }
        assert!(leases.take("a", now, SAME).unwrap_err().asking.is_none(), "empty while asked: single");
        leases.granted("a", ahead, now, 7, 20, &allowed(963));
        for _ in 0..20 {
            leases.take("a", now, SAME).unwrap();
        }
        assert!(leases.take("a", now, SAME).is_err(), "the grant added 20, no more");
    }

    #[tokio::test(start_paused = true)]
    async fn a_grant_ahead_keeps_no_token_of_an_expired_lease_or_of_another_redis() {
        // Redis reconnected between the check and the ask ahead: the 16 left are not kept.
        let leases = Leases::new();
        let ahead = ahead_of_a_lease_of_64(&leases).await;
        let now = Instant::now();
        leases.granted("a", ahead, now, 8, 20, &allowed(963));
        let spent = std::iter::from_fn(|| leases.take("a", now, |c| c == 8).ok()).count();
        assert_eq!(spent, 20);

        // The lease expired while the ask ahead was answered: only the grant is spent.
        let leases = Leases::new();
        let ahead = ahead_of_a_lease_of_64(&leases).await;
        tokio::time::advance(LEASE_TIME).await;
        let late = Instant::now();
        assert!(leases.take("a", late, SAME).unwrap_err().asking.is_none());
        leases.granted("a", ahead, late, 7, 20, &allowed(963));
        let spent = std::iter::from_fn(|| leases.take("a", late, SAME).ok()).count();
        assert_eq!(spent, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn one_request_asks_for_a_lease_at_a_time_and_a_failure_lets_the_next_one_ask() {
        let leases = Leases::new();
        let asking = until_a_lease_is_asked(&leases).await;
        assert_eq!(asking.want, MIN_LEASE);
        let now = Instant::now();
        let meanwhile = leases.take("a", now, SAME).unwrap_err();
        assert_eq!(meanwhile.want, 1, "single tokens while the lease is asked for");
        assert!(meanwhile.asking.is_none());
        drop(asking); // Redis failed, or the request was cancelled.
                      // The next request that has 16 counted since the failed ask asks again.
        for _ in 0..14 {
            assert!(leases.take("a", now, SAME).unwrap_err().asking.is_none());
        }
        assert!(leases.take("a", now, SAME).unwrap_err().asking.is_some());
        // A refusal grants nothing.
        let refused = Taken { allowed: false, ..allowed(0) };
        let ask = leases.take("a", now, SAME).unwrap_err();
        leases.granted("a", ask, now, 7, 0, &refused);
        assert!(leases.take("a", now, SAME).is_err());
        let unseen = leases.take("b", now, SAME).unwrap_err();
        assert_eq!(unseen.want, 1);
        leases.granted("b", unseen, now, 7, 1, &refused);
        assert!(leases.take("b", now, SAME).unwrap_err().asking.is_none(), "a refused bucket is not followed");
    }
}
