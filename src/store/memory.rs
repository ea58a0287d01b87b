//! Entries kept in this process: the embedded store (the cache's storage when no Redis is
//! configured, encoded entries) and the hot tier in front of Redis (decoded entries) are both
//! this one structure. Bounded by `cache.memory_max` bytes (moka evicts the least useful entries
//! past it), each entry expiring after its own keep-for time. Per instance only.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use moka::sync::Cache;
use moka::Expiry;

/// What the store holds, weighed in bytes against `memory_max`.
pub trait Weight: Clone + Send + Sync + 'static {
    /// Approximate bytes held.
    fn weight(&self) -> usize;
}

impl Weight for Bytes {
    fn weight(&self) -> usize {
        self.len()
    }
}

#[derive(Clone)]
struct Item<V> {
    value: V,
    keep_for: Duration,
}

struct KeepFor;

// moka's trait names std's Instant in its signature; the value is not used here.
#[allow(clippy::disallowed_types)]
impl<V> Expiry<String, Item<V>> for KeepFor {
    fn expire_after_create(&self, _key: &String, item: &Item<V>, _now: std::time::Instant) -> Option<Duration> {
        Some(item.keep_for)
    }

    /// Never earlier than before: a variant marker rewritten for a short-lived variant must not
    /// end before a longer-lived one it leads to (an entry's own freshness decides its use).
    fn expire_after_update(
        &self,
        _key: &String,
        item: &Item<V>,
        _now: std::time::Instant,
        left: Option<Duration>,
    ) -> Option<Duration> {
        Some(left.map_or(item.keep_for, |left| left.max(item.keep_for)))
    }
}

/// In-process storage for cache entries (by path key and variant) and route generations.
pub struct MemoryStore<V = Bytes> {
    entries: Cache<String, Item<V>>,
    generations: Mutex<HashMap<String, u64>>,
}

impl<V: Weight> MemoryStore<V> {
    /// A store holding at most about `memory_max` bytes of keys and values.
    pub fn new(memory_max: u64) -> MemoryStore<V> {
        let entries = Cache::builder()
            .max_capacity(memory_max)
            .weigher(|key: &String, item: &Item<V>| (key.len() + item.value.weight()).try_into().unwrap_or(u32::MAX))
            .expire_after(KeepFor)
            .support_invalidation_closures()
            .build();
        MemoryStore { entries, generations: Mutex::new(HashMap::new()) }
    }

    /// One variant of a path.
    pub fn get(&self, path_key: &str, variant: &str) -> Option<V> {
        self.entries.get(&super::entry_id(path_key, variant)).map(|item| item.value)
    }

    /// Store one variant for `keep_for`.
    pub fn put(&self, path_key: &str, variant: &str, value: V, keep_for: Duration) {
        self.entries.insert(super::entry_id(path_key, variant), Item { value, keep_for });
    }

    /// Remove one variant.
    pub fn remove(&self, path_key: &str, variant: &str) {
        self.entries.invalidate(&super::entry_id(path_key, variant));
    }

    /// Remove every variant of a path.
    pub fn purge_path(&self, path_key: &str) {
        let prefix = super::path_prefix(path_key);
        // Lazy and O(entries) in moka's background, but purges are rare and the bound is small.
        let _ = self.entries.invalidate_entries_if(move |k, _| k.starts_with(&prefix));
    }

    /// Remove every entry.
    pub fn clear(&self) {
        self.entries.invalidate_all();
    }

    /// A route's generation (0 until bumped).
    pub fn generation(&self, route: &str) -> u64 {
        self.generations.lock().unwrap_or_else(|p| p.into_inner()).get(route).copied().unwrap_or(0)
    }

    /// Increment a route's generation, returning the new one.
    pub fn bump_generation(&self, route: &str) -> u64 {
        let mut generations = self.generations.lock().unwrap_or_else(|p| p.into_inner());
        let g = generations.entry(route.to_string()).or_insert(0);
        *g += 1;
        *g
    }

    /// Entries held now (approximate, like [`MemoryStore::weighted_size`]).
    pub fn entry_count(&self) -> u64 {
        self.entries.entry_count()
    }

    /// Bytes held now (approximate: moka applies evictions asynchronously).
    pub fn weighted_size(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.weighted_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variants_purges_and_generations() {
        let m = MemoryStore::<Bytes>::new(1 << 20);
        m.put("p1", "a", Bytes::from_static(b"A"), Duration::from_secs(60));
        m.put("p1", "b", Bytes::from_static(b"B"), Duration::from_secs(60));
        m.put("p10", "a", Bytes::from_static(b"other path"), Duration::from_secs(60));
        assert_eq!(m.get("p1", "a"), Some(Bytes::from_static(b"A")));
        m.remove("p1", "a");
        assert_eq!(m.get("p1", "a"), None);
        m.purge_path("p1");
        assert_eq!(m.get("p1", "b"), None);
        assert_eq!(m.get("p10", "a"), Some(Bytes::from_static(b"other path")), "a path that merely shares a prefix");
        assert_eq!(m.generation("r"), 0);
        assert_eq!(m.bump_generation("r"), 1);
        assert_eq!(m.generation("r"), 1);
    }

    #[test]
    fn entries_expire_after_their_own_time() {
        let m = MemoryStore::<Bytes>::new(1 << 20);
        m.put("short", "-", Bytes::from_static(b"x"), Duration::from_millis(50));
        m.put("long", "-", Bytes::from_static(b"y"), Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(120));
        assert_eq!(m.get("short", "-"), None);
        assert_eq!(m.get("long", "-"), Some(Bytes::from_static(b"y")));
    }

    #[test]
    fn memory_is_bounded() {
        let m = MemoryStore::<Bytes>::new(256 * 1024);
        let value = Bytes::from(vec![7u8; 16 * 1024]);
        for i in 0..100 {
            m.put(&format!("path{i}"), "-", value.clone(), Duration::from_secs(60));
        }
        let size = m.weighted_size();
        assert!(size <= 256 * 1024 + 17 * 1024, "holds {size} bytes");
        assert!(size >= 128 * 1024, "keeps using what it is allowed ({size} bytes)");
    }
}
