//! The Redis gate against a real redis-server of the test's own: values when healthy, fast
//! errors (never waits beyond the budget) when Redis is missing, dead, hung or full, and recovery
//! without a restart of the client.

mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sidecache::config::RedisConfig;
use sidecache::metrics::Metrics;
use sidecache::store::{BreakerState, RedisStore, RedisTarget, Role, StoreError};
use support::metric;
use support::redis::{free_port, TestRedis};
use tokio::time::Instant;

const BUDGET: Duration = Duration::from_millis(50);
/// What "fast" means for an operation while Redis is failing: the budget plus scheduling slack
/// on a loaded 2-core machine (the benchmark has the precise figures).
const FAST: Duration = Duration::from_millis(150);

fn redis_config(url: &str) -> RedisConfig {
    let toml = format!(
        "[upstream]\nurl = \"http://127.0.0.1:9\"\n[redis]\nurl = \"{url}\"\nop_timeout = \"50ms\"\nbreaker_failures = 3\nbreaker_cooldown = \"300ms\"\n"
    );
    sidecache::Config::from_sources(&toml, &HashMap::new()).unwrap().redis.unwrap()
}

fn start_store(url: &str) -> (RedisStore, Metrics) {
    let metrics = Metrics::new();
    let target = RedisTarget::new(&redis_config(url)).expect("no TLS files to load");
    let store = RedisStore::start(&target, Role::Cache, &metrics.registrar()).expect("store starts");
    (store, metrics)
}

/// Wait (at most `limit`) until a GET answers with a value or a clean miss.
async fn until_usable(store: &RedisStore, limit: Duration) -> Duration {
    let started = Instant::now();
    while store.get("probe").await.is_err() {
        assert!(started.elapsed() < limit, "store still unusable after {limit:?} (state {:?})", store.state());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn healthy_round_trip_and_metrics() {
    let redis = TestRedis::start();
    let (store, metrics) = start_store(&redis.url());
    until_usable(&store, Duration::from_secs(5)).await;
    assert_eq!(store.get("k").await.unwrap(), None);
    store.set("k", Bytes::from_static(b"\x00value\xff"), Duration::from_secs(60)).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), Some(Bytes::from_static(b"\x00value\xff")));
    assert!(redis.command(&["PTTL", "k"]).trim_start_matches(':').parse::<i64>().unwrap() > 59_000);
    assert_eq!(store.incr("n").await.unwrap(), 1);
    assert_eq!(store.incr("n").await.unwrap(), 2);
    store.del("k").await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), None);
    assert_eq!(store.state(), BreakerState::Up);

    metrics.upkeep();
    let text = metrics.render();
    assert_eq!(metric(&text, r#"sidecache_redis_up{client="cache"}"#), Some(1.0), "{text}");
    assert!(text.contains(r#"sidecache_redis_op_duration_seconds_count{client="cache",op="get"}"#), "{text}");
}

#[tokio::test]
async fn redis_never_started_costs_no_wait_and_is_used_once_it_appears() {
    let port = free_port();
    let (store, metrics) = start_store(&format!("redis://127.0.0.1:{port}/0"));
    // Had any call waited for Redis, 200 calls would take 200 budgets (10 s).
    let started = Instant::now();
    for _ in 0..200 {
        let err = store.get("k").await.unwrap_err();
        assert!(matches!(err, StoreError::NotConnected | StoreError::BreakerOpen), "{err:?}");
    }
    assert!(started.elapsed() < BUDGET, "200 skipped calls took {:?}", started.elapsed());
    assert_eq!(store.state(), BreakerState::Down);
    // Long after fred's first connection attempt failed: it must keep trying.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut redis = TestRedis::on_port(port, &[]);
    assert!(redis.spawn());
    let took = until_usable(&store, Duration::from_secs(5)).await;
    assert_eq!(store.state(), BreakerState::Up);
    store.set("k", Bytes::from_static(b"v"), Duration::from_secs(5)).await.unwrap();
    eprintln!("usable {took:?} after redis appeared");

    let text = metrics.render();
    assert!(
        metric(&text, r#"sidecache_redis_errors_total{client="cache",op="get",kind="breaker_open"}"#).unwrap() > 100.0,
        "{text}"
    );
}

/// Runs `tasks` loops of GETs until `stop`, recording the slowest call and counting successes.
struct Load {
    slowest_us: Arc<AtomicU64>,
    ok: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(store: &RedisStore, tasks: usize, duration: Duration) -> Load {
        let slowest_us = Arc::new(AtomicU64::new(0));
        let ok = Arc::new(AtomicUsize::new(0));
        let calls = Arc::new(AtomicUsize::new(0));
        let deadline = Instant::now() + duration;
        let handles = (0..tasks)
            .map(|i| {
                let (store, slowest_us, ok, calls) = (store.clone(), slowest_us.clone(), ok.clone(), calls.clone());
                tokio::spawn(async move {
                    while Instant::now() < deadline {
                        let started = Instant::now();
                        let result = store.get(&format!("key{i}")).await;
                        slowest_us.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                        calls.fetch_add(1, Ordering::Relaxed);
                        if result.is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            })
            .collect();
        Load { slowest_us, ok, calls, handles }
    }

    fn reset(&self) {
        self.slowest_us.store(0, Ordering::Relaxed);
        self.ok.store(0, Ordering::Relaxed);
    }

    fn slowest(&self) -> Duration {
        Duration::from_micros(self.slowest_us.load(Ordering::Relaxed))
    }

    async fn finish(self) {
        for h in self.handles {
            h.await.unwrap();
        }
    }
}

#[tokio::test]
async fn redis_killed_under_load_fails_fast_and_recovers_after_restart() {
    let mut redis = TestRedis::start();
    let (store, _metrics) = start_store(&redis.url());
    until_usable(&store, Duration::from_secs(5)).await;

    let load = Load::start(&store, 8, Duration::from_secs(6));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(load.ok.load(Ordering::Relaxed) > 0);
    redis.kill();
    // Calls answered just before the kill may still be counted: let them settle.
    tokio::time::sleep(Duration::from_millis(200)).await;
    load.reset();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(load.slowest() <= FAST, "with Redis dead a call took {:?}", load.slowest());
    assert_eq!(load.ok.load(Ordering::Relaxed), 0);

    redis.restart();
    let restarted = Instant::now();
    while load.ok.load(Ordering::Relaxed) == 0 {
        assert!(restarted.elapsed() < Duration::from_secs(4), "no success within 4 s of the restart");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("recovered {:?} after restart, {} calls in all", restarted.elapsed(), load.calls.load(Ordering::Relaxed));
    assert!(load.slowest() <= FAST, "a call took {:?}", load.slowest());
    load.finish().await;
}

#[tokio::test]
async fn hung_redis_opens_the_breaker_then_costs_nothing_and_recovers_on_resume() {
    let mut redis = TestRedis::start();
    let (store, metrics) = start_store(&redis.url());
    until_usable(&store, Duration::from_secs(5)).await;

    redis.pause();
    // The first calls wait out the budget (nothing can tell a hung server from a slow one)...
    let mut timed_out = 0;
    for _ in 0..3 {
        let started = Instant::now();
        assert!(matches!(store.get("k").await, Err(StoreError::Timeout)));
        assert!(started.elapsed() >= BUDGET && started.elapsed() <= FAST, "{:?}", started.elapsed());
        timed_out += 1;
    }
    // ...then the breaker is open and a call costs one atomic load.
    assert_eq!(store.state(), BreakerState::Down);
    let started = Instant::now();
    for _ in 0..1000 {
        assert!(matches!(store.get("k").await, Err(StoreError::BreakerOpen)));
    }
    assert!(started.elapsed() < BUDGET, "1000 skipped calls took {:?}", started.elapsed());

    // Still hung after several cool-downs: the prober keeps it open, calls stay free.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let started = Instant::now();
    assert!(store.get("k").await.is_err());
    assert!(started.elapsed() < BUDGET, "a call waited {:?}", started.elapsed());

    redis.resume();
    let took = until_usable(&store, Duration::from_secs(5)).await;
    eprintln!("usable {took:?} after SIGCONT ({timed_out} calls paid the budget)");
    assert_eq!(store.state(), BreakerState::Up);
    let text = metrics.render();
    assert_eq!(
        metric(&text, r#"sidecache_redis_errors_total{client="cache",op="get",kind="timeout"}"#),
        Some(3.0),
        "{text}"
    );
}

#[tokio::test]
async fn full_redis_fails_writes_but_keeps_serving_reads() {
    let redis = TestRedis::start();
    let (store, _metrics) = start_store(&redis.url());
    until_usable(&store, Duration::from_secs(5)).await;
    store.set("kept", Bytes::from_static(b"v"), Duration::from_secs(60)).await.unwrap();
    assert_eq!(redis.command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]), "+OK");
    assert_eq!(redis.command(&["CONFIG", "SET", "maxmemory", "1"]), "+OK");
    for _ in 0..10 {
        let started = Instant::now();
        let err = store.set("new", Bytes::from_static(b"v"), Duration::from_secs(60)).await.unwrap_err();
        assert!(matches!(err, StoreError::Redis(_)), "{err:?}");
        assert!(started.elapsed() <= FAST);
    }
    assert_eq!(store.state(), BreakerState::Up, "an OOM reply is not an outage");
    assert_eq!(store.get("kept").await.unwrap(), Some(Bytes::from_static(b"v")));
}

/// A cache store and a rate-limit store on `url`s, the limiter alarming the cache as the proxy
/// wires them, sharing one metrics registry; both usable.
async fn start_pair(cache_url: &str, limiter_url: &str) -> (RedisStore, RedisStore, Metrics) {
    let metrics = Metrics::new();
    let start = |url: &str, role| {
        let target = RedisTarget::new(&redis_config(url)).expect("no TLS files to load");
        RedisStore::start(&target, role, &metrics.registrar()).expect("store starts")
    };
    let cache = start(cache_url, Role::Cache);
    let limiter = start(limiter_url, Role::RateLimit);
    limiter.alarms(&cache);
    until_usable(&cache, Duration::from_secs(5)).await;
    until_usable(&limiter, Duration::from_secs(5)).await;
    (cache, limiter, metrics)
}

/// Fail `store`'s calls against a hung Redis until its breaker opens.
async fn open_breaker(store: &RedisStore) {
    for _ in 0..3 {
        assert!(matches!(store.get("k").await, Err(StoreError::Timeout)));
    }
    assert_eq!(store.state(), BreakerState::Down);
}

#[tokio::test]
async fn the_limiter_losing_a_hung_redis_makes_the_cache_skip_it_at_once() {
    let mut redis = TestRedis::start();
    let (cache, limiter, metrics) = start_pair(&redis.url(), &redis.url()).await;

    redis.pause();
    open_breaker(&limiter).await;
    // The cache has sent nothing to the hung server, yet already skips it: no call waits.
    assert_eq!(cache.state(), BreakerState::Probing);
    let started = Instant::now();
    for _ in 0..100 {
        assert!(matches!(cache.get("k").await, Err(StoreError::BreakerOpen)));
    }
    assert!(started.elapsed() < BUDGET, "100 cache calls took {:?}", started.elapsed());
    // Its own check went unanswered: open, as if its calls had failed.
    let started = Instant::now();
    while cache.state() != BreakerState::Down {
        assert!(started.elapsed() < FAST, "cache still {:?}", cache.state());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let text = metrics.render();
    assert_eq!(metric(&text, r#"sidecache_redis_errors_total{client="cache",op="get",kind="timeout"}"#), Some(0.0));
    assert_eq!(metric(&text, r#"sidecache_redis_up{client="cache"}"#), Some(0.0));

    redis.resume();
    until_usable(&cache, Duration::from_secs(5)).await;
    until_usable(&limiter, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn trouble_of_the_limiter_alone_costs_the_cache_one_budget_at_most() {
    // The limiter's server hangs, the cache's answers: what the cache sees of a limiter-only
    // fault (its connection stuck, its command queue full).
    let mut limiter_redis = TestRedis::start();
    let cache_redis = TestRedis::start();
    let (cache, limiter, metrics) = start_pair(&cache_redis.url(), &limiter_redis.url()).await;
    cache.set("kept", Bytes::from_static(b"v"), Duration::from_secs(60)).await.unwrap();
    let continuity = cache.continuity();

    limiter_redis.pause();
    open_breaker(&limiter).await;
    let started = Instant::now();
    while cache.state() != BreakerState::Up {
        assert!(started.elapsed() < FAST, "cache still {:?} after {:?}", cache.state(), started.elapsed());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    eprintln!("cache back in use {:?} after the limiter's breaker opened", started.elapsed());
    assert_eq!(cache.continuity(), continuity, "the cache's connection was not reconnected");
    assert_eq!(cache.get("kept").await.unwrap(), Some(Bytes::from_static(b"v")));
    assert_eq!(limiter.state(), BreakerState::Down, "the limiter's own trouble is not cleared");
    assert_eq!(metric(&metrics.render(), r#"sidecache_redis_up{client="cache"}"#), Some(1.0));
    limiter_redis.resume();
}

#[tokio::test]
async fn the_cache_losing_redis_never_trips_the_limiter() {
    let mut redis = TestRedis::start();
    let (cache, limiter, _metrics) = start_pair(&redis.url(), &redis.url()).await;

    redis.pause();
    open_breaker(&cache).await;
    tokio::time::sleep(BUDGET * 2).await;
    assert_eq!(limiter.state(), BreakerState::Up);
    assert!(matches!(limiter.get("k").await, Err(StoreError::Timeout)), "the limiter still asks Redis itself");
    redis.resume();
}

#[tokio::test]
async fn the_cache_checks_redis_on_its_own_runtime_whatever_becomes_of_the_alarming_one() {
    let mut redis = TestRedis::start();
    let (cache, limiter, _metrics) = start_pair(&redis.url(), &redis.url()).await;

    redis.pause();
    // The limiter finds out on a worker's runtime, which then ends (a worker restarted).
    let worker_limiter = limiter.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(open_breaker(&worker_limiter));
    })
    .join()
    .unwrap();
    assert_eq!(cache.state(), BreakerState::Probing);
    redis.resume();
    // The check ran on the cache's own runtime: the cache is not left bypassing Redis.
    until_usable(&cache, Duration::from_secs(5)).await;
    assert_eq!(cache.state(), BreakerState::Up);
}
