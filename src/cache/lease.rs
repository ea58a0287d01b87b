//! Coalescing across replicas: of the replicas that miss one key at once, the first to take a
//! short lease in Redis (`SET NX PX`, for `cache.lock_timeout`) fetches it; the others wait for
//! Redis's invalidation message of the key (the fill) or of the lease (its release or end), then
//! read the entry. Only while the hot tier's invalidation links track: without them a waiter
//! would learn nothing before its time ran out, so a failing Redis falls back at once to
//! coalescing within the process ([`super::coalesce`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::time::Instant;

use super::key::CacheKey;
use super::{Cache, Slot};
use crate::store::tracking::Mark;
use crate::store::CacheStore;

/// What taking the lease of a key decided.
pub(super) enum Leading {
    /// Fetch it: with the lease (released once the entry is written, or when the fetch yields
    /// none), or without one (no tracking, Redis failing).
    Here(Option<Lease>),
    /// Another replica holds the lease: wait for its fill ([`Cache::await_fill`]).
    Elsewhere(Mark, String),
}

/// A lease held by this process; released when dropped.
pub(super) struct Lease {
    store: Arc<CacheStore>,
    key: String,
    token: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (store, key, token) = (self.store.clone(), std::mem::take(&mut self.key), std::mem::take(&mut self.token));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // Not released in time: it ends by itself after `lock_timeout`.
                if let Err(e) = store.release(&key, &token).await {
                    tracing::debug!(error = %e, "fill lease not released; it expires");
                }
            });
        }
    }
}

/// Tokens of this process's leases: a random prefix and a count.
pub(super) struct Tokens {
    prefix: String,
    next: AtomicU64,
}

impl Tokens {
    pub(super) fn new() -> Tokens {
        let mut random = [0u8; 8];
        // Without randomness the process id still tells replicas apart on one host.
        let seed = match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random) {
            Ok(()) => u64::from_le_bytes(random),
            Err(_) => u64::from(std::process::id()),
        };
        Tokens { prefix: format!("{seed:016x}"), next: AtomicU64::new(0) }
    }

    fn next(&self) -> String {
        format!("{}-{}", self.prefix, self.next.fetch_add(1, Ordering::Relaxed))
    }
}

/// The key of the fill lease of one slot of a path: the path key, under the tracked prefix, then
/// a NUL (no path key holds one) and the variant.
fn lease_key(key: &CacheKey, slot: &Slot) -> String {
    format!("{}\0lease\0{}", key.path_key, slot.variant(key))
}

impl Cache {
    /// Take the fill lease of a key this process leads the fetch of.
    pub(super) async fn lead(&self, key: &CacheKey, slot: &Slot) -> Leading {
        // `lock_timeout = "0s"`: no request waits for another's fetch, here or elsewhere.
        let waits = !self.lock_timeout.is_zero();
        let Some(hot) = self.hot.as_ref().filter(|h| waits && h.tracking().healthy() && self.store.accepting()) else {
            return Leading::Here(None);
        };
        // Before the lease is asked for: a fill that lands meanwhile is seen by the wait.
        let mark = hot.mark();
        let (key, token) = (lease_key(key, slot), self.tokens.next());
        match self.store.lease(&key, &token, self.lock_timeout).await {
            Ok(true) => Leading::Here(Some(Lease { store: self.store.clone(), key, token })),
            Ok(false) => Leading::Elsewhere(mark, key),
            Err(e) => {
                tracing::debug!(error = %e, "fill lease not taken; fetching");
                Leading::Here(None)
            }
        }
    }

    /// Wait (at most `lock_timeout`) until Redis says the key was written or its lease ended.
    /// The lease key's own messages also tell of its taking (which may arrive after `mark`):
    /// after one, the lease is looked up, and the wait goes on while it is held.
    pub(super) async fn await_fill(&self, key: &CacheKey, mut mark: Mark, lease: &str) {
        let Some(tracking) = self.hot.as_ref().map(|h| h.tracking()) else { return };
        let deadline = Instant::now() + self.lock_timeout;
        loop {
            tracking.changed(&[&key.path_key, lease], mark, deadline).await;
            if Instant::now() >= deadline || tracking.changed_since(&key.path_key, mark) {
                return;
            }
            mark = tracking.mark();
            if !matches!(self.store.leased(lease).await, Ok(true)) {
                return;
            }
        }
    }
}
