//! Assembling the proxy from its validated configuration: the stores, the cache, the rate
//! limiter, the compiled routes, one request path per worker, the admin endpoints, and the
//! background loops; then serving them on the bound sockets until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::time::Instant;

use crate::admin::{Admin, ServerState};
use crate::cache::{Cache, GENERATION_REFRESH};
use crate::clock::Clock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::ratelimit::RateLimiter;
use crate::reload::{Active, Parts, Reloader};
use crate::server::{Server, StartError};
use crate::store::{CacheStore, MemoryStore, RedisStore, RedisTarget, Role};

/// How often histogram samples are folded into buckets.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// A bound but not yet serving proxy: its addresses are known (useful with port 0).
pub struct Sidecache {
    config: Arc<Config>,
    server: Server,
    proxies: Vec<Arc<Proxy>>,
    admin: Arc<Admin>,
    metrics: Arc<Metrics>,
    state: Arc<ServerState>,
    cache: Option<Arc<Cache>>,
    active: Arc<ArcSwap<Active>>,
    reloader: Arc<Reloader>,
}

/// The cache of the routes that have one (or will, after a reload): on Redis when configured,
/// else the embedded store; none when switched off. Never waits for Redis: the client connects
/// in the background.
fn build_cache(
    config: &Config,
    redis: Option<&RedisTarget>,
    clock: Clock,
    metrics: &Arc<Metrics>,
) -> Result<Option<Arc<Cache>>, StartError> {
    if !config.cache_enabled {
        return Ok(None);
    }
    let store = match redis {
        Some(redis) => {
            let store = RedisStore::start(redis, Role::Cache, &metrics.registrar()).map_err(StartError::Redis)?;
            CacheStore::Redis(store)
        }
        None => {
            tracing::info!(
                memory_max = config.cache_memory_max,
                "no [redis] url: the cache uses the embedded store, per instance only (replicas do not share it)"
            );
            CacheStore::Memory(MemoryStore::new(config.cache_memory_max))
        }
    };
    let cache = Cache::new(config, store, clock, metrics);
    match (&config.cache_encryption, cache.seal_key_id()) {
        (Some(keys), Some(id)) => tracing::info!(
            key_id = id,
            previous_key_id = keys.previous.as_ref().map(|k| k.id_hex()),
            "cache entries in Redis are sealed (AES-256-GCM)"
        ),
        (Some(_), None) => {
            tracing::info!("cache encryption keys are not used: the embedded store keeps entries in process")
        }
        _ => {}
    }
    Ok(Some(Arc::new(cache)))
}

/// The rate limits of the routes that have one (or will, after a reload): shared through Redis
/// when configured (its own breaker and a connection per worker, driven by the worker's runtime:
/// every request takes a token, so the check must not cross threads), else in process; none when
/// switched off. Never waits for Redis.
fn build_limiter(
    config: &Config,
    redis: Option<&RedisTarget>,
    metrics: &Metrics,
) -> Result<Option<Arc<RateLimiter>>, StartError> {
    if !config.rate_limit_enabled {
        return Ok(None);
    }
    if redis.is_none() {
        tracing::info!("no [redis] url: rate limits use in-process buckets, per instance only");
    }
    let redis = match redis {
        Some(redis) => Some(
            RedisStore::start_per_worker(redis, Role::RateLimit, config.server.workers, &metrics.registrar())
                .map_err(StartError::Redis)?,
        ),
        None => None,
    };
    Ok(Some(Arc::new(RateLimiter::new(config, redis, &metrics.registrar()))))
}

impl Sidecache {
    /// Bind both listeners and build the request path. Never waits on anything but the sockets.
    pub async fn bind(config: Config) -> Result<Sidecache, StartError> {
        Self::bind_with_clock(config, Clock::system()).await
    }

    /// [`Sidecache::bind`] with the cache's freshness judged by `clock` (tests move a manual
    /// clock instead of sleeping).
    pub async fn bind_with_clock(config: Config, clock: Clock) -> Result<Sidecache, StartError> {
        let server = Server::bind(&config)?;
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let state = Arc::new(ServerState { started: Instant::now(), draining: AtomicBool::new(false) });
        let redis = config.redis.as_ref().map(RedisTarget::new).transpose()?;
        if config.redis.as_ref().and_then(|r| r.tls.as_ref()).is_some_and(|t| t.insecure_skip_verify) {
            tracing::warn!(
                "redis.tls.insecure_skip_verify is true: Redis's certificate is NOT verified, so anyone on the \
                 network path can pose as Redis and read or change the cache and the rate limits"
            );
        }
        let cache = build_cache(&config, redis.as_ref(), clock, &metrics)?;
        let limiter = build_limiter(&config, redis.as_ref(), &metrics)?;
        if let (Some(CacheStore::Redis(cache)), Some(limiter)) =
            (cache.as_ref().map(|c| c.store()), limiter.as_ref().and_then(|l| l.redis()))
        {
            limiter.alarms(cache);
        }
        let parts = Parts { cache: cache.clone(), limiter: limiter.clone(), metrics: metrics.clone() };
        let active = Arc::new(ArcSwap::from_pointee(Active::build(Config::clone(&config), &parts, None, Vec::new())));
        let proxies = (0..config.server.workers)
            .map(|_| Proxy::new(&config, active.clone(), metrics.clone(), cache.clone(), limiter.clone()).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let admin = Arc::new(Admin::new(active.clone(), metrics.clone(), state.clone(), cache.clone(), limiter));
        let reloader = Arc::new(Reloader::new(active.clone(), parts));
        Ok(Sidecache { config, server, proxies, admin, metrics, state, cache, active, reloader })
    }

    /// The bound proxy address.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.server.proxy_addr()
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.server.admin_addr()
    }

    /// What applies a new configuration to this proxy while it runs.
    pub fn reloader(&self) -> Arc<Reloader> {
        self.reloader.clone()
    }

    /// Serve until `shutdown` resolves, then stop accepting, let in-flight requests finish within
    /// `server.shutdown_grace`, and return.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        let Sidecache { config, server, proxies, admin, metrics, state, cache, active, reloader: _ } = self;
        let upkeep = tokio::spawn(async move {
            let mut tick = tokio::time::interval(METRICS_UPKEEP);
            loop {
                tick.tick().await;
                metrics.upkeep();
            }
        });
        // Another replica's route purge reaches this one within a refresh interval.
        let generations = cache.filter(|c| matches!(c.store(), CacheStore::Redis(_))).map(|cache| {
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(GENERATION_REFRESH);
                loop {
                    tick.tick().await;
                    let active = active.load_full();
                    cache.refresh_generations(active.routes.iter().filter_map(|r| r.cache.as_deref())).await;
                }
            })
        });
        let result = server.run(&config, proxies, admin, &state.draining, shutdown).await;
        upkeep.abort();
        if let Some(task) = generations {
            task.abort();
        }
        result
    }
}
