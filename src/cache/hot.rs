//! The hot tier: fresh decoded entries read from Redis, kept in process so a hot key costs no
//! Redis round trip. While Redis's invalidation messages are tracked on every primary
//! ([`Tracking`]), an entry is trusted until its freshness ends or its key changes in Redis, on
//! any replica; while they are not, for at most `hot_ttl` from its admission.
//!
//! An entry is admitted when it is read back from Redis (a second access), never when it is first
//! stored: one-off keys would churn the tier (measured: admitting every miss put 200 ms stalls
//! into the p99 of a stream of unique paths).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::entry::Entry;
use super::policy::{self, Phase};
use crate::metrics::{Metrics, HOT_TIER_BYTES, HOT_TIER_ENTRIES};
use crate::store::tracking::{Mark, Tracking, Trust};
use crate::store::{MemoryStore, Weight};

/// How often the size gauges are updated.
const SIZE_EVERY: Duration = Duration::from_secs(1);

/// Fresh decoded entries, bounded by `cache.memory_max` bytes.
pub(super) struct HotTier {
    entries: Arc<MemoryStore<Hot>>,
    /// How long an entry is trusted while invalidations are not tracked.
    ttl: Duration,
    tracking: Tracking,
}

/// An entry of the hot tier, when it was admitted, and the mark of its read.
#[derive(Clone)]
pub(super) struct Hot(Arc<Entry>, SystemTime, Mark);

impl Weight for Hot {
    fn weight(&self) -> usize {
        let headers: usize = self.0.headers.iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
        headers + self.0.body.len()
    }
}

impl HotTier {
    /// A tier over `entries`, kept true by `tracking`; its size is reported every second.
    pub(super) fn new(entries: Arc<MemoryStore<Hot>>, ttl: Duration, tracking: Tracking, metrics: &Metrics) -> HotTier {
        let reg = metrics.registrar();
        let (count, bytes) = (reg.gauge(HOT_TIER_ENTRIES, &[]), reg.gauge(HOT_TIER_BYTES, &[]));
        let weak = Arc::downgrade(&entries);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SIZE_EVERY);
            loop {
                tick.tick().await;
                let Some(entries) = weak.upgrade() else { return };
                bytes.set(entries.weighted_size() as f64);
                count.set(entries.entry_count() as f64);
            }
        });
        HotTier { entries, ttl, tracking }
    }

    /// Taken before a read from Redis whose entry may be admitted.
    pub(super) fn mark(&self) -> Mark {
        self.tracking.mark()
    }

    /// The tier's [`Tracking`].
    pub(super) fn tracking(&self) -> &Tracking {
        &self.tracking
    }

    /// A fresh entry this tier may answer with now.
    pub(super) fn get(&self, path_key: &str, variant: &str, now: SystemTime) -> Option<(Arc<Entry>, Phase)> {
        let Hot(entry, admitted, mark) = self.entries.get(path_key, variant)?;
        let trusted = match self.tracking.trusts(path_key, mark) {
            Trust::UntilFresh => true,
            Trust::Briefly => now.duration_since(admitted).is_ok_and(|held| held < self.ttl),
            Trust::No => false,
        };
        match (trusted, policy::phase(&entry, now)) {
            (true, fresh @ Phase::Fresh(_)) => Some((entry, fresh)),
            _ => None,
        }
    }

    /// Admit an entry read under `mark`, fresh for `left` more.
    pub(super) fn admit(
        &self,
        path_key: &str,
        variant: &str,
        entry: Arc<Entry>,
        now: SystemTime,
        mark: Mark,
        left: Duration,
    ) {
        let keep_for = match mark.tracked() {
            true => left,
            false => left.min(self.ttl),
        };
        self.entries.put(path_key, variant, Hot(entry, now, mark), keep_for);
    }

    /// A path changed through this replica: no entry of it read before is trusted again.
    pub(super) fn purge_path(&self, path_key: &str) {
        self.tracking.invalidate(path_key);
    }
}
