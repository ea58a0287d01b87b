//! The response cache (DESIGN.md 4): lookups that never fail a request, stores that never make
//! the client wait, and purges. `key`, `policy` and `entry` hold the rules, `exchange` the
//! per-request phase; this file holds the shared and per-route state and talks to the store.

pub mod coalesce;
pub mod entry;
pub mod exchange;
mod hot;
pub mod invalidate;
pub mod key;
mod lease;
pub mod outcome;
pub mod policy;
pub mod range;
pub mod seal;
pub mod vary;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, Uri};
use metrics::Counter;
use tokio::sync::Semaphore;
use tracing::Instrument;

use crate::clock::Clock;
use crate::config::{CacheConfig, Config};
use crate::metrics::{
    Metrics, Registrar, CACHE_INVALIDATIONS_TOTAL, CACHE_LOOKUPS_TOTAL, CACHE_RESEALED_TOTAL, CACHE_STORES_TOTAL,
    CACHE_UNREADABLE_TOTAL,
};
use crate::store::tracking::{Event, Mark, Tracking};
use crate::store::{self, CacheStore, MemoryStore, StoreError};
use coalesce::Flights;
use entry::Entry;
pub use exchange::{Begin, Exchange};
use hot::HotTier;
use key::CacheKey;
use lease::Lease;
pub use outcome::Outcome;
use policy::Phase;
use seal::{Opened, Seal, Unreadable};

/// Store writes in flight at most; past it, writes are dropped and counted, never queued.
const MAX_PENDING_WRITES: usize = 256;
/// How often each replica re-reads the route generations (a route purge reaches the other
/// replicas within this).
pub const GENERATION_REFRESH: Duration = Duration::from_secs(1);

/// Store outcomes; the `result` label of `cache_stores_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreResult {
    /// Written.
    Stored,
    /// The response may not be stored (any policy reason).
    NotStorable,
    /// The body exceeded `max_body`.
    TooLarge,
    /// The body did not arrive whole in time, broke off, or ended with trailers.
    Incomplete,
    /// Too many writes in flight: dropped.
    Dropped,
    /// The path already holds as many live variants as it may (a new one never displaces them).
    TooManyVariants,
    /// The store failed.
    Error,
}

impl StoreResult {
    const ALL: [StoreResult; 7] = [
        Self::Stored,
        Self::NotStorable,
        Self::TooLarge,
        Self::Incomplete,
        Self::Dropped,
        Self::TooManyVariants,
        Self::Error,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::NotStorable => "not_storable",
            Self::TooLarge => "too_large",
            Self::Incomplete => "incomplete",
            Self::Dropped => "dropped",
            Self::TooManyVariants => "too_many_variants",
            Self::Error => "error",
        }
    }
}

/// One route's cache: its settings, generation and metric handles. Built once; the route holds it.
pub struct RouteCache {
    name: String,
    config: CacheConfig,
    /// Shared by every `RouteCache` of this name the process ever builds (see `Cache::route`).
    generation: Arc<AtomicU64>,
    generation_key: String,
    lookups: [Counter; Outcome::ALL.len()],
    stores: [Counter; StoreResult::ALL.len()],
    unreadable: [Counter; Unreadable::ALL.len()],
    resealed: Counter,
    invalidations: Counter,
}

impl RouteCache {
    fn count_lookup(&self, outcome: Outcome) {
        self.lookups[outcome as usize].increment(1);
        crate::telemetry::record("sidecache.cache.outcome", outcome.as_str());
    }

    fn count_store(&self, r: StoreResult) {
        self.stores[r as usize].increment(1);
    }

    fn count_unreadable(&self, why: Unreadable) {
        self.unreadable[why as usize].increment(1);
    }
}

/// Why a purge did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    /// No route of that name has a cache.
    #[error("no cached route named {0:?}")]
    UnknownRoute(String),
    /// The path is not a valid request target.
    #[error("path {0:?} is not a request target like \"/api/models?limit=10\"")]
    BadPath(String),
    /// The store failed.
    #[error("the cache store could not be reached")]
    Store(#[source] StoreError),
}

/// The cache of every route that has one, and what they share.
pub struct Cache {
    store: Arc<CacheStore>,
    prefix: String,
    /// Every route name's generation, kept across reloads.
    generations: Arc<Generations>,
    writes: Arc<Semaphore>,
    flights: Arc<Flights>,
    /// The fields each path the origin varies is varied by, as last seen.
    selectors: vary::Selectors,
    /// In front of Redis: fresh decoded entries kept in process ([`hot`]). `None` for the
    /// embedded store (already in process) or `hot_ttl = "0s"`.
    hot: Option<HotTier>,
    clock: Clock,
    /// How long a request waits for another's fetch of the same key before forwarding itself.
    lock_timeout: Duration,
    /// How long a response to be stored may take to arrive whole.
    body_timeout: Duration,
    /// Seals entries written to Redis, when `[cache]` names keys (never the embedded store).
    seal: Option<Seal>,
    /// Tokens of the fill leases this process takes.
    tokens: lease::Tokens,
}

/// Every route name's generation.
type Generations = Mutex<HashMap<String, Arc<AtomicU64>>>;

impl Cache {
    /// The cache shared by every route that has one.
    pub fn new(config: &Config, store: CacheStore, clock: Clock, metrics: &Arc<Metrics>) -> Cache {
        let prefix = config.redis.as_ref().map_or_else(|| "sidecache:".to_string(), |r| r.key_prefix.clone());
        let seal = config.cache_encryption.as_ref().filter(|_| matches!(store, CacheStore::Redis(_))).map(Seal::new);
        let store = Arc::new(store);
        let generations = Arc::new(Generations::default());
        let hot = match &*store {
            CacheStore::Redis(redis) if !config.cache_hot_ttl.is_zero() => {
                let entries = Arc::new(MemoryStore::new(config.cache_memory_max));
                let on_event = {
                    let (entries, store, generations, prefix) =
                        (entries.clone(), store.clone(), generations.clone(), prefix.clone());
                    Box::new(move |event: Event<'_>| match event {
                        Event::Flushed(_) => entries.clear(),
                        Event::Generation(route) => refresh_generation(&store, &generations, &prefix, route),
                    })
                };
                let generations_prefix = key::generation_key(&prefix, "");
                let prefixes = vec![key::entry_prefix(&prefix), generations_prefix.clone()];
                let tracking = Tracking::start(redis, prefixes, generations_prefix, metrics.clone(), on_event);
                Some(HotTier::new(entries, config.cache_hot_ttl, tracking, metrics))
            }
            _ => None,
        };
        Cache {
            store,
            prefix,
            generations,
            writes: Arc::new(Semaphore::new(MAX_PENDING_WRITES)),
            flights: Arc::new(Flights::default()),
            selectors: vary::Selectors::default(),
            hot,
            clock,
            lock_timeout: config.cache_lock_timeout,
            body_timeout: config.upstream.response_timeout,
            seal,
            tokens: lease::Tokens::new(),
        }
    }

    /// The cache of the route named `name` with these settings. Every cache of one route name
    /// shares its generation for the life of the process, so a purge outlives any reload: one
    /// that removes the route's cache and adds it back, renames the route and back, or races
    /// the purge itself.
    pub fn route(&self, name: &str, config: &CacheConfig, registrar: &Registrar<'_>) -> Arc<RouteCache> {
        let generation = self
            .generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(name.to_string())
            .or_default()
            .clone();
        Arc::new(RouteCache {
            name: name.to_string(),
            config: config.clone(),
            generation,
            generation_key: key::generation_key(&self.prefix, name),
            lookups: Outcome::ALL
                .map(|o| registrar.counter(CACHE_LOOKUPS_TOTAL, &[("route", name), ("result", o.as_str())])),
            stores: StoreResult::ALL
                .map(|s| registrar.counter(CACHE_STORES_TOTAL, &[("route", name), ("result", s.as_str())])),
            unreadable: Unreadable::ALL
                .map(|u| registrar.counter(CACHE_UNREADABLE_TOTAL, &[("route", name), ("reason", u.as_str())])),
            resealed: registrar.counter(CACHE_RESEALED_TOTAL, &[("route", name)]),
            invalidations: registrar.counter(CACHE_INVALIDATIONS_TOTAL, &[("route", name)]),
        })
    }

    /// The id of the key entries are sealed with, when they are.
    pub fn seal_key_id(&self) -> Option<&str> {
        self.seal.as_ref().map(Seal::key_id)
    }

    /// The store behind the cache.
    pub fn store(&self) -> &CacheStore {
        &self.store
    }

    /// Look a key up: the hot tier, then the store; `request` chooses among the responses the
    /// origin varied by fields beyond the route's `vary` ([`vary`]). Never fails: a store error
    /// is [`Found::Unavailable`], a stored entry that cannot be opened or decoded is a miss (and
    /// is deleted); one opened with the previous key is sealed again with the current one. The
    /// slot is where the entry was found, or where the request's would be.
    async fn find(&self, route: &Arc<RouteCache>, key: &CacheKey, request: &HeaderMap) -> (Found, Slot) {
        let now = self.clock.now();
        // Costs nothing until some response has varied beyond its route's `vary`.
        let remembered = match self.selectors.is_empty() {
            true => None,
            false => self.selectors.get(&store::entry_id(&key.path_key, &key.variant)),
        };
        let slot = remembered.clone().map_or(Slot::Primary, |names| Slot::new(key, names, request));
        if let Some((entry, fresh)) = self.hot.as_ref().and_then(|h| h.get(&key.path_key, slot.variant(key), now)) {
            return (Found::Entry(entry, fresh), slot);
        }
        let mark = self.hot.as_ref().map(HotTier::mark);
        // The first slot, and the second one this process expects the origin to vary by.
        let read = match &slot {
            Slot::Primary => self.store.get(&key.path_key, &key.variant).await.map(|first| (first, None)),
            Slot::Secondary(_, second) => self.store.get_two(&key.path_key, &key.variant, second).await,
        };
        let (first, second) = match read {
            Ok((Some(first), second)) => (first, second),
            Ok((None, _)) => return (Found::Nothing, slot),
            Err(e) => {
                tracing::debug!(route = %route.name, error = %e, "cache lookup failed; forwarding");
                return (Found::Unavailable, slot);
            }
        };
        match self.open(key, &Slot::Primary, first) {
            Ok(Stored::Entry(entry, by_previous)) => {
                if remembered.is_some() {
                    self.selectors.set(&store::entry_id(&key.path_key, &key.variant), &[]);
                }
                (self.found(route, key, &Slot::Primary, entry, by_previous, now, mark), Slot::Primary)
            }
            Ok(Stored::Marker(marker)) => {
                let names: Arc<[HeaderName]> = marker.names.into();
                self.selectors.set(&store::entry_id(&key.path_key, &key.variant), &names);
                let wanted = Slot::new(key, names, request);
                let second = match (wanted == slot, second) {
                    (true, second) => second,
                    // The first time this process meets the path varied, or the origin now varies it by
                    // other fields: one more round trip.
                    (false, _) => match self.store.get(&key.path_key, wanted.variant(key)).await {
                        Ok(second) => second,
                        Err(e) => {
                            tracing::debug!(route = %route.name, error = %e, "cache lookup failed; forwarding");
                            return (Found::Unavailable, wanted);
                        }
                    },
                };
                let found = match second.map(|bytes| self.open(key, &wanted, bytes)) {
                    Some(Ok(Stored::Entry(entry, by_previous))) => {
                        self.found(route, key, &wanted, entry, by_previous, now, mark)
                    }
                    Some(Ok(Stored::Marker(_))) => Found::Nothing,
                    Some(Err(why)) => self.unreadable(route, key, &wanted, why),
                    None => Found::Nothing,
                };
                (found, wanted)
            }
            Err(why) => (self.unreadable(route, key, &Slot::Primary, why), Slot::Primary),
        }
    }

    /// Open (and decode) what a slot holds.
    fn open(&self, key: &CacheKey, slot: &Slot, bytes: Bytes) -> Result<Stored, Unreadable> {
        let opened = match &self.seal {
            Some(seal) => seal.open(&bytes, &key.path_key, slot.variant(key))?,
            None => Opened { plain: bytes, by_previous: false },
        };
        if vary::Marker::is_marker(&opened.plain) {
            // Only the first slot holds markers; a marker is never sealed again (the entry it
            // leads to is, and rewrites it).
            return match (slot, vary::Marker::decode(&opened.plain)) {
                (Slot::Primary, Some(marker)) => Ok(Stored::Marker(marker)),
                _ => Err(Unreadable::Undecodable),
            };
        }
        match Entry::decode(&opened.plain) {
            Ok(entry) => Ok(Stored::Entry(entry, opened.by_previous)),
            Err(_) => Err(Unreadable::Undecodable),
        }
    }

    /// A stored entry found: sealed again under the current key if it was opened with the
    /// previous one, admitted to the hot tier when fresh (`mark` taken before it was read).
    #[allow(clippy::too_many_arguments)]
    fn found(
        &self,
        route: &Arc<RouteCache>,
        key: &CacheKey,
        slot: &Slot,
        entry: Entry,
        by_previous: bool,
        now: SystemTime,
        mark: Option<Mark>,
    ) -> Found {
        if by_previous {
            // Sealed again under the current key: the previous one is needed ever less.
            route.resealed.increment(1);
            self.write(route, key, slot, &entry, None);
        }
        let entry = Arc::new(entry);
        let phase = policy::phase(&entry, now);
        if let (Some(hot), Some(mark), Phase::Fresh(left)) = (&self.hot, mark, phase) {
            hot.admit(&key.path_key, slot.variant(key), entry.clone(), now, mark, left);
        }
        Found::Entry(entry, phase)
    }

    /// Never served, never an error: a miss, counted, and gone for the next request.
    fn unreadable(&self, route: &RouteCache, key: &CacheKey, slot: &Slot, why: Unreadable) -> Found {
        route.count_unreadable(why);
        tracing::debug!(route = %route.name, reason = why.as_str(), "stored entry unreadable; deleting it");
        let (store, path_key, variant) = (self.store.clone(), key.path_key.clone(), slot.variant(key).to_string());
        tokio::spawn(async move {
            if let Err(e) = store.remove(&path_key, &variant).await {
                tracing::debug!(error = %e, "could not delete an undecodable entry");
            }
        });
        Found::Nothing
    }

    /// Write an entry to its slot in the background (with the marker that leads to it, for a
    /// second slot), at most `MAX_PENDING_WRITES` at once; past that the write is dropped and
    /// counted, never queued. Whether the write was sent. A fill lease is released once the
    /// write is done (or at once, when there is none).
    fn write(&self, route: &Arc<RouteCache>, key: &CacheKey, slot: &Slot, entry: &Entry, lease: Option<Lease>) -> bool {
        if !self.store.accepting() {
            route.count_store(StoreResult::Error);
            return false;
        }
        let Ok(permit) = self.writes.clone().try_acquire_owned() else {
            route.count_store(StoreResult::Dropped);
            return false;
        };
        let seal = |bytes: Bytes, variant: &str| match &self.seal {
            Some(seal) => seal.seal(&bytes, &key.path_key, variant),
            None => bytes,
        };
        let mut variants = Vec::with_capacity(2);
        if let Slot::Secondary(names, _) = slot {
            let marker = vary::Marker { names: names.to_vec() }.encode();
            variants.push((key.variant.clone(), seal(marker, &key.variant)));
            self.selectors.set(&store::entry_id(&key.path_key, &key.variant), names);
        }
        let variant = slot.variant(key);
        variants.push((variant.to_string(), seal(entry.encode(), variant)));
        let (store, route, path_key) = (self.store.clone(), route.clone(), key.path_key.clone());
        let (keep_for, max_variants, wanted) = (policy::keep_for(entry), route.config.max_variants, variants.len());
        let write = async move {
            let result = store.put(&path_key, variants, keep_for, max_variants).await;
            route.count_store(match result {
                Ok(n) if n == wanted => StoreResult::Stored,
                Ok(_) => StoreResult::TooManyVariants,
                Err(_) => StoreResult::Error,
            });
            drop((permit, lease));
        };
        // A child of the request (its span ends with the answer, before the write does).
        tokio::spawn(write.instrument(tracing::debug_span!("cache.write")));
        true
    }

    /// Purge a whole route: bump its generation (O(1); every replica as soon as Redis's
    /// invalidation of the counter reaches it, else within a second).
    pub async fn purge_route(&self, route: &RouteCache) -> Result<u64, PurgeError> {
        let generation = self.store.bump_generation(&route.generation_key).await.map_err(PurgeError::Store)?;
        route.generation.fetch_max(generation, Ordering::Relaxed);
        Ok(generation)
    }

    /// Purge one request target of a route, every vary variant of it.
    pub async fn purge_path(&self, route: &RouteCache, target: &str) -> Result<(), PurgeError> {
        let uri: Uri = target.parse().map_err(|_| PurgeError::BadPath(target.to_string()))?;
        if !target.starts_with('/') {
            return Err(PurgeError::BadPath(target.to_string()));
        }
        let generation = route.generation.load(Ordering::Relaxed);
        let path_key = key::path_key(&self.prefix, &route.name, generation, &uri, &route.config.query)
            .map_err(|_| PurgeError::BadPath(target.to_string()))?;
        if let Some(hot) = &self.hot {
            hot.purge_path(&path_key);
        }
        self.store.purge_path(&path_key).await.map_err(PurgeError::Store)
    }

    /// Re-read these routes' generations from the store (another replica may have purged).
    pub async fn refresh_generations(&self, routes: impl Iterator<Item = &RouteCache>) {
        for route in routes {
            reread_generation(&self.store, &route.generation_key, &route.generation).await;
        }
    }
}

/// Re-read one route's generation now, when Redis says its counter changed (a route purge made
/// through another replica), in the background.
fn refresh_generation(store: &Arc<CacheStore>, generations: &Arc<Generations>, prefix: &str, route: &str) {
    let Some(generation) = generations.lock().unwrap_or_else(PoisonError::into_inner).get(route).cloned() else {
        return;
    };
    let (store, key) = (store.clone(), key::generation_key(prefix, route));
    tokio::spawn(async move { reread_generation(&store, &key, &generation).await });
}

/// Read a route's generation from `key` into `generation` (it only ever grows).
async fn reread_generation(store: &CacheStore, key: &str, generation: &AtomicU64) {
    match store.generation(key).await {
        Ok(g) => {
            generation.fetch_max(g, Ordering::Relaxed);
        }
        Err(e) => tracing::debug!(key, error = %e, "generation not refreshed"),
    }
}

/// Where an entry lives within its path: the first variant's slot (the authority and the
/// route's `vary` values), or a second one, chosen also by the fields beyond those that the
/// origin's `Vary` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Slot {
    /// The key's own variant.
    Primary,
    /// A second variant: the fields beyond the route's `vary`, and the id their values make.
    Secondary(Arc<[HeaderName]>, String),
}

impl Slot {
    /// The slot of a request that the origin varies by `names` beyond the route's `vary`.
    fn new(key: &CacheKey, names: Arc<[HeaderName]>, request: &HeaderMap) -> Slot {
        match names.is_empty() {
            true => Slot::Primary,
            false => {
                let variant = vary::secondary(&key.variant, &names, request);
                Slot::Secondary(names, variant)
            }
        }
    }

    /// The slot a response to `request` is stored in, by its `Vary`.
    fn of_response(key: &CacheKey, response: &HeaderMap, request: &HeaderMap, keyed: &[HeaderName]) -> Slot {
        let names = vary::beyond(vary::names(response).unwrap_or_default(), keyed);
        Slot::new(key, names.into(), request)
    }

    /// The slot's variant id within the path.
    fn variant<'a>(&'a self, key: &'a CacheKey) -> &'a str {
        match self {
            Slot::Primary => &key.variant,
            Slot::Secondary(_, variant) => variant,
        }
    }
}

/// What a slot holds.
#[allow(clippy::large_enum_variant)] // short-lived, never in a collection
enum Stored {
    /// An entry, and whether it was opened with the previous encryption key.
    Entry(Entry, bool),
    /// A marker: the entries are in second slots.
    Marker(vary::Marker),
}

/// Header fields from name-value pairs, in order (the tests of the cache's rules).
#[cfg(test)]
pub(crate) fn fields(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), http::HeaderValue::from_str(v).unwrap());
    }
    h
}

/// What the store holds for a key.
enum Found {
    /// An entry, fresh or expired.
    Entry(Arc<Entry>, Phase),
    /// Nothing usable.
    Nothing,
    /// The store could not answer in time.
    Unavailable,
}
