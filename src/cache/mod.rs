//! The response cache (DESIGN.md 4): lookups that never fail a request, stores that never make
//! the client wait, and purges. `key`, `policy` and `entry` hold the rules; this file holds the
//! per-route state and talks to the store.

pub mod body;
pub mod coalesce;
pub mod entry;
pub mod key;
pub mod policy;
pub mod revalidate;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};
use metrics::Counter;
use tokio::sync::Semaphore;

use crate::config::{CacheConfig, Config};
use crate::metrics::{Registrar, CACHE_LOOKUPS_TOTAL, CACHE_STORES_TOTAL};
use crate::store::{self, CacheStore, StoreError};
use body::Finish;
use coalesce::{FlightGuard, Flights, Join};
use entry::Entry;
use key::CacheKey;
use policy::{Bypass, Phase};

/// Store writes in flight at most; past it, writes are dropped and counted, never queued.
const MAX_PENDING_WRITES: usize = 256;
/// How often each replica re-reads the route generations (a route purge reaches the other
/// replicas within this).
pub const GENERATION_REFRESH: Duration = Duration::from_secs(1);

/// What a lookup found.
pub enum Lookup {
    /// The request may not use the cache.
    Bypass(Bypass),
    /// A fresh entry.
    Fresh(Arc<Entry>, CacheKey),
    /// An expired entry, expired this long ago.
    Stale(Arc<Entry>, CacheKey, Duration),
    /// Nothing stored.
    Miss(CacheKey),
    /// The store could not answer in time: a miss.
    Unavailable(CacheKey),
}

/// Lookup outcomes; also the `result` label of `cache_lookups_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupResult {
    /// Served from a fresh entry.
    Hit,
    /// Forwarded: nothing usable stored.
    Miss,
    /// Served from an expired entry.
    Stale,
    /// The request may not use the cache.
    Bypass,
    /// The store failed; forwarded.
    Error,
}

impl LookupResult {
    const ALL: [LookupResult; 5] = [Self::Hit, Self::Miss, Self::Stale, Self::Bypass, Self::Error];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Stale => "stale",
            Self::Bypass => "bypass",
            Self::Error => "error",
        }
    }
}

/// Store outcomes; the `result` label of `cache_stores_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreResult {
    /// Written.
    Stored,
    /// The response may not be stored (any policy reason).
    NotStorable,
    /// The body exceeded `max_body`.
    TooLarge,
    /// Too many writes in flight: dropped.
    Dropped,
    /// The store failed.
    Error,
}

impl StoreResult {
    const ALL: [StoreResult; 5] = [Self::Stored, Self::NotStorable, Self::TooLarge, Self::Dropped, Self::Error];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::NotStorable => "not_storable",
            Self::TooLarge => "too_large",
            Self::Dropped => "dropped",
            Self::Error => "error",
        }
    }
}

struct RouteCache {
    name: String,
    config: CacheConfig,
    generation: AtomicU64,
    generation_key: String,
    lookups: [Counter; 5],
    stores: [Counter; 5],
}

impl RouteCache {
    fn count_lookup(&self, r: LookupResult) {
        self.lookups[r as usize].increment(1);
    }

    fn count_store(&self, r: StoreResult) {
        self.stores[r as usize].increment(1);
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

/// The cache of every route that has one.
pub struct Cache {
    store: Arc<CacheStore>,
    prefix: String,
    /// Indexed like the route table; `None` for routes without a cache.
    routes: Vec<Option<Arc<RouteCache>>>,
    writes: Arc<Semaphore>,
    flights: Arc<Flights>,
    /// In front of Redis: fresh decoded entries kept in process for at most `hot_ttl`, so a hot
    /// key costs no Redis round trip. An entry is admitted when it is read back from Redis (a
    /// second access), never when it is first stored: one-off keys would churn the tier (measured:
    /// admitting every miss put 200 ms stalls into the p99 of a stream of unique paths). A purge
    /// made on another replica reaches this one within `hot_ttl`. `None` for the embedded store
    /// (already in process) or `hot_ttl = "0s"`.
    hot: Option<Arc<HotTier>>,
}

/// Fresh decoded entries by `path_key \0 variant`, each expiring at its own deadline.
struct HotTier {
    entries: moka::sync::Cache<String, (Arc<Entry>, Duration)>,
    ttl: Duration,
}

struct HotExpiry;

// moka's trait names std's Instant in its signature; the value is not used here.
#[allow(clippy::disallowed_types)]
impl moka::Expiry<String, (Arc<Entry>, Duration)> for HotExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &(Arc<Entry>, Duration),
        _now: std::time::Instant,
    ) -> Option<Duration> {
        Some(value.1)
    }
}

impl HotTier {
    /// Keep a fresh entry for at most the tier's ttl and never past its freshness.
    fn insert(&self, key: &CacheKey, entry: &Arc<Entry>) {
        if let Phase::Fresh(left) = policy::phase(entry, SystemTime::now()) {
            self.entries.insert(store::entry_id(&key.path_key, &key.variant), (entry.clone(), left.min(self.ttl)));
        }
    }

    fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        let (entry, _) = self.entries.get(&store::entry_id(&key.path_key, &key.variant))?;
        matches!(policy::phase(&entry, SystemTime::now()), Phase::Fresh(_)).then_some(entry)
    }

    fn purge_path(&self, path_key: &str) {
        let prefix = store::path_prefix(path_key);
        let _ = self.entries.invalidate_entries_if(move |k, _| k.starts_with(&prefix));
    }
}

impl Cache {
    /// The cache for the configured routes (those whose `cache` is set and enabled).
    pub fn new(config: &Config, store: CacheStore, registrar: &Registrar<'_>) -> Cache {
        let prefix = config.redis.as_ref().map_or_else(|| "sidecache:".to_string(), |r| r.key_prefix.clone());
        let routes = config
            .routes
            .iter()
            .map(|r| {
                r.cache.as_ref().map(|c| {
                    let name = r.name.as_str();
                    Arc::new(RouteCache {
                        name: name.to_string(),
                        config: c.clone(),
                        generation: AtomicU64::new(0),
                        generation_key: key::generation_key(&prefix, name),
                        lookups: LookupResult::ALL.map(|l| {
                            registrar.counter(CACHE_LOOKUPS_TOTAL, &[("route", name), ("result", l.as_str())])
                        }),
                        stores: StoreResult::ALL
                            .map(|s| registrar.counter(CACHE_STORES_TOTAL, &[("route", name), ("result", s.as_str())])),
                    })
                })
            })
            .collect();
        let hot = (matches!(store, CacheStore::Redis(_)) && !config.cache_hot_ttl.is_zero()).then(|| {
            Arc::new(HotTier {
                entries: moka::sync::Cache::builder()
                    .max_capacity(config.cache_memory_max)
                    .weigher(|k: &String, (e, _): &(Arc<Entry>, Duration)| {
                        let headers: usize = e.headers.iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
                        (k.len() + headers + e.body.len()).try_into().unwrap_or(u32::MAX)
                    })
                    .expire_after(HotExpiry)
                    .support_invalidation_closures()
                    .build(),
                ttl: config.cache_hot_ttl,
            })
        });
        Cache {
            store: Arc::new(store),
            prefix,
            routes,
            writes: Arc::new(Semaphore::new(MAX_PENDING_WRITES)),
            flights: Arc::new(Flights::default()),
            hot,
        }
    }

    /// Whether the route at `index` caches.
    pub fn caches(&self, index: usize) -> bool {
        self.routes.get(index).is_some_and(Option::is_some)
    }

    /// The store behind the cache.
    pub fn store(&self) -> &CacheStore {
        &self.store
    }

    /// Look a request up. Never fails: a store error is [`Lookup::Unavailable`], a stored entry
    /// that does not decode is a miss (and is deleted).
    pub async fn lookup(&self, index: usize, method: &Method, uri: &Uri, headers: &HeaderMap) -> Option<Lookup> {
        let route = self.routes.get(index)?.as_ref()?;
        if let Some(reason) = policy::request_bypass(method, headers, &route.config) {
            return Some(Lookup::Bypass(reason));
        }
        let generation = route.generation.load(Ordering::Relaxed);
        let key = key::cache_key(&self.prefix, &route.name, generation, uri, headers, &route.config);
        if let Some(entry) = self.hot.as_ref().and_then(|hot| hot.get(&key)) {
            return Some(Lookup::Fresh(entry, key));
        }
        let bytes = match self.store.get(&key.path_key, &key.variant).await {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Some(Lookup::Miss(key)),
            Err(e) => {
                tracing::debug!(route = %route.name, error = %e, "cache lookup failed; forwarding");
                return Some(Lookup::Unavailable(key));
            }
        };
        match Entry::decode(&bytes) {
            Ok(entry) => Some(match policy::phase(&entry, SystemTime::now()) {
                Phase::Fresh(_) => {
                    let entry = Arc::new(entry);
                    if let Some(hot) = &self.hot {
                        hot.insert(&key, &entry);
                    }
                    Lookup::Fresh(entry, key)
                }
                Phase::Stale(by) => Lookup::Stale(Arc::new(entry), key, by),
            }),
            Err(e) => {
                tracing::debug!(route = %route.name, error = %e, "stored entry does not decode; deleting it");
                let (store, doomed) = (self.store.clone(), key.clone());
                tokio::spawn(async move {
                    if let Err(e) = store.remove(&doomed.path_key, &doomed.variant).await {
                        tracing::debug!(error = %e, "could not delete an undecodable entry");
                    }
                });
                Some(Lookup::Miss(key))
            }
        }
    }

    /// Count a lookup's outcome: the request path decides it (a stale entry may be served, or
    /// be a miss).
    pub fn count_lookup(&self, index: usize, result: LookupResult) {
        if let Some(Some(route)) = self.routes.get(index) {
            route.count_lookup(result);
        }
    }

    /// Lead the fetch of a missing key, or follow the fetch already in progress in this process.
    pub fn join(&self, key: &CacheKey) -> Join {
        self.flights.join(store::entry_id(&key.path_key, &key.variant))
    }

    /// A recorder for a GET response on a miss (publishing to the flight's followers when the
    /// body is complete), or `None` when the response is not stored.
    pub fn recorder(
        &self,
        index: usize,
        key: CacheKey,
        status: StatusCode,
        headers: &HeaderMap,
        flight: Option<FlightGuard>,
    ) -> Option<(usize, Box<dyn Finish>)> {
        let route = self.routes.get(index)?.as_ref()?;
        match policy::storable(status, headers, &route.config, SystemTime::now()) {
            Ok(freshness) => {
                let declared = headers
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<usize>().ok());
                if declared.is_some_and(|n| n > route.config.max_body) {
                    route.count_store(StoreResult::TooLarge);
                    return None;
                }
                let pending = Pending {
                    store: self.store.clone(),
                    writes: self.writes.clone(),
                    route: route.clone(),
                    key,
                    status,
                    headers: headers.clone(),
                    freshness,
                    flight,
                };
                Some((route.config.max_body, Box::new(pending)))
            }
            Err(reason) => {
                tracing::debug!(route = %route.name, reason = reason.as_str(), "response not stored");
                route.count_store(StoreResult::NotStorable);
                None
            }
        }
    }

    /// The cache settings of the route at `index`.
    pub fn config(&self, index: usize) -> Option<&CacheConfig> {
        self.routes.get(index)?.as_ref().map(|r| &r.config)
    }

    /// Store a whole response already in hand (a background refresh), publishing it to the
    /// flight's followers; not stored when the policy refuses it or it exceeds `max_body`.
    pub fn store_whole(
        &self,
        index: usize,
        key: CacheKey,
        status: StatusCode,
        headers: &HeaderMap,
        body: Bytes,
        flight: Option<FlightGuard>,
    ) {
        if let Some((limit, finish)) = self.recorder(index, key, status, headers, flight) {
            if body.len() <= limit {
                finish.complete(body);
            } else {
                finish.too_large();
            }
        }
    }

    /// Store an entry refreshed by a 304 (fire-and-forget, like every write).
    pub fn put_entry(&self, index: usize, key: CacheKey, entry: Arc<Entry>) {
        let Some(route) = self.routes.get(index).and_then(Option::as_ref) else { return };
        let keep_for = policy::keep_for(&entry);
        write(self.store.clone(), self.writes.clone(), route.clone(), key, entry, keep_for);
    }

    /// Purge a whole route: bump its generation (O(1), every replica within a second).
    pub async fn purge_route(&self, name: &str) -> Result<u64, PurgeError> {
        let route = self.route_named(name)?;
        let generation = self.store.bump_generation(&route.generation_key).await.map_err(PurgeError::Store)?;
        route.generation.fetch_max(generation, Ordering::Relaxed);
        Ok(generation)
    }

    /// Purge one request target of a route, every vary variant of it.
    pub async fn purge_path(&self, name: &str, target: &str) -> Result<(), PurgeError> {
        let route = self.route_named(name)?;
        let uri: Uri = target.parse().map_err(|_| PurgeError::BadPath(target.to_string()))?;
        if !target.starts_with('/') {
            return Err(PurgeError::BadPath(target.to_string()));
        }
        let generation = route.generation.load(Ordering::Relaxed);
        let path_key = key::path_key(&self.prefix, &route.name, generation, &uri, &route.config.query);
        if let Some(hot) = &self.hot {
            hot.purge_path(&path_key);
        }
        self.store.purge_path(&path_key).await.map_err(PurgeError::Store)
    }

    fn route_named(&self, name: &str) -> Result<&Arc<RouteCache>, PurgeError> {
        self.routes.iter().flatten().find(|r| r.name == name).ok_or_else(|| PurgeError::UnknownRoute(name.to_string()))
    }

    /// Re-read every route's generation from the store (another replica may have purged).
    pub async fn refresh_generations(&self) {
        for route in self.routes.iter().flatten() {
            match self.store.generation(&route.generation_key).await {
                Ok(g) => {
                    route.generation.fetch_max(g, Ordering::Relaxed);
                }
                Err(e) => tracing::debug!(route = %route.name, error = %e, "generation not refreshed"),
            }
        }
    }
}

/// Write an entry in the background, at most `MAX_PENDING_WRITES` at once; past that the write
/// is dropped and counted, never queued.
fn write(
    store: Arc<CacheStore>,
    writes: Arc<Semaphore>,
    route: Arc<RouteCache>,
    key: CacheKey,
    entry: Arc<Entry>,
    keep_for: Duration,
) {
    if !store.accepting() {
        route.count_store(StoreResult::Error);
        return;
    }
    let Ok(permit) = writes.try_acquire_owned() else {
        route.count_store(StoreResult::Dropped);
        return;
    };
    tokio::spawn(async move {
        let result = store.put(&key.path_key, &key.variant, entry.encode(), keep_for).await;
        route.count_store(if result.is_ok() { StoreResult::Stored } else { StoreResult::Error });
        drop(permit);
    });
}

/// A storable response whose body is being recorded; written when the body is complete.
struct Pending {
    store: Arc<CacheStore>,
    writes: Arc<Semaphore>,
    route: Arc<RouteCache>,
    key: CacheKey,
    status: StatusCode,
    headers: HeaderMap,
    freshness: policy::Freshness,
    /// Followers waiting for this response; dropped unpublished, it releases them.
    flight: Option<FlightGuard>,
}

impl Finish for Pending {
    fn complete(self: Box<Self>, body: Bytes) {
        let entry = Arc::new(Entry {
            status: self.status,
            headers: self.headers,
            body,
            stored_at: SystemTime::now(),
            lifetime: self.freshness.lifetime,
            initial_age: self.freshness.initial_age,
            stale_while_revalidate: self.freshness.stale_while_revalidate,
            stale_if_error: self.freshness.stale_if_error,
            must_revalidate: self.freshness.must_revalidate,
        });
        if let Some(flight) = self.flight {
            flight.publish(entry.clone());
        }
        let keep_for = policy::keep_for(&entry);
        write(self.store, self.writes, self.route, self.key, entry, keep_for);
    }

    fn too_large(self: Box<Self>) {
        self.route.count_store(StoreResult::TooLarge);
    }
}
