//! Redis failing under a cached route, through the real proxy under concurrent load: every
//! request is answered correctly by the upstream, none gets an error status, none waits on a
//! dead Redis, and hits come back without restarting the proxy.

mod support;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::redis::{free_port, TestRedis};
use support::*;
use tokio::time::Instant;

const ROUTES: &str = r#"
[[route]]
name = "cached"
path = "/gen/*"
cache = { ttl = "60s" }
"#;

async fn proxy_for(upstream: &TestUpstream, redis_url: &str) -> TestProxy {
    // The hot tier off: these tests are about Redis failing, not about what the process keeps.
    let extra = format!(
        "{ROUTES}\n[cache]\nhot_ttl = \"0s\"\n[redis]\nurl = \"{redis_url}\"\nop_timeout = \"50ms\"\nbreaker_failures = 3\nbreaker_cooldown = \"300ms\"\n"
    );
    TestProxy::start(&config_text(upstream.addr, &extra)).await
}

/// Concurrent clients requesting a handful of cached paths until stopped; every answer is
/// checked, the slowest is remembered, hits are counted.
struct Load {
    slowest_us: Arc<AtomicU64>,
    hits: Arc<AtomicUsize>,
    answered: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Load {
    fn start(proxy: &TestProxy, clients: usize) -> Load {
        let slowest_us = Arc::new(AtomicU64::new(0));
        let hits = Arc::new(AtomicUsize::new(0));
        let answered = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let deadline = Instant::now() + Duration::from_secs(30);
        let tasks = (0..clients)
            .map(|c| {
                let (url, slowest_us, hits, answered, stop) =
                    (proxy.url(""), slowest_us.clone(), hits.clone(), answered.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut i = 0usize;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let path = format!("/gen/item{}", (c + i) % 4);
                        i += 1;
                        let started = Instant::now();
                        let a = get(&format!("{url}{path}")).await;
                        slowest_us.fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                        assert_eq!(a.status, http::StatusCode::OK, "{path}: {}", a.text());
                        assert!(a.text().starts_with(&format!("{path} #")), "{path}: wrong body {:?}", a.text());
                        if a.headers.get("x-cache").is_some_and(|v| v == "HIT") {
                            hits.fetch_add(1, Ordering::Relaxed);
                        }
                        answered.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                })
            })
            .collect();
        Load { slowest_us, hits, answered, tasks, stop }
    }

    fn reset(&self) {
        self.slowest_us.store(0, Ordering::Relaxed);
        self.hits.store(0, Ordering::Relaxed);
    }

    fn slowest(&self) -> Duration {
        Duration::from_micros(self.slowest_us.load(Ordering::Relaxed))
    }

    async fn wait_for_hits(&self, limit: Duration) -> Duration {
        let started = Instant::now();
        self.reset();
        while self.hits.load(Ordering::Relaxed) < 20 {
            assert!(started.elapsed() < limit, "hits did not resume within {limit:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        started.elapsed()
    }

    async fn finish(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("every answer was correct");
        }
        self.answered.load(Ordering::Relaxed)
    }
}

/// A bound on any single request while Redis fails: at most one budget (50 ms) of waiting plus
/// the upstream and scheduling on a loaded 2-core machine. A hang would be seconds.
const SLOWEST: Duration = Duration::from_millis(400);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_never_started_then_appearing() {
    let upstream = TestUpstream::spawn().await;
    let port = free_port();
    let proxy = proxy_for(&upstream, &format!("redis://127.0.0.1:{port}/0")).await;
    let load = Load::start(&proxy, 8);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(load.slowest() < SLOWEST, "slowest {:?}", load.slowest());
    assert_eq!(load.hits.load(Ordering::Relaxed), 0);

    let mut redis = TestRedis::on_port(port, &[]);
    assert!(redis.spawn());
    let took = load.wait_for_hits(Duration::from_secs(5)).await;
    eprintln!("hits {took:?} after redis appeared");
    let answered = load.finish().await;
    assert!(answered > 100, "{answered}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restarted_empty() {
    let upstream = TestUpstream::spawn().await;
    let mut redis = TestRedis::start();
    let proxy = proxy_for(&upstream, &redis.url()).await;
    let load = Load::start(&proxy, 8);
    load.wait_for_hits(Duration::from_secs(5)).await;

    redis.kill();
    // Requests whose lookup was answered just before the kill may still finish as hits.
    tokio::time::sleep(Duration::from_millis(200)).await;
    load.reset();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(load.slowest() < SLOWEST, "slowest {:?} with redis dead", load.slowest());
    assert_eq!(load.hits.load(Ordering::Relaxed), 0, "no hits without redis: the cache is redis");

    redis.restart();
    let took = load.wait_for_hits(Duration::from_secs(5)).await;
    eprintln!("hits {took:?} after restart with an empty dataset");
    assert!(load.finish().await > 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_hung_with_sigstop_then_resumed() {
    let upstream = TestUpstream::spawn().await;
    let mut redis = TestRedis::start();
    let proxy = proxy_for(&upstream, &redis.url()).await;
    let load = Load::start(&proxy, 8);
    load.wait_for_hits(Duration::from_secs(5)).await;

    redis.pause();
    load.reset();
    tokio::time::sleep(Duration::from_millis(1500)).await; // several budgets and cool-downs
    assert!(load.slowest() < SLOWEST, "slowest {:?} with redis hung", load.slowest());
    let status = get(&proxy.admin_url("/status")).await.json();
    assert_ne!(status["redis"]["state"], "up", "{status}");

    // With the breaker open, a cached route costs what pass-through costs.
    let passthrough = mean_latency(&proxy, "/headers").await;
    let cached = mean_latency(&proxy, "/gen/item0").await;
    eprintln!("breaker open: cached route {cached:?} vs pass-through {passthrough:?}");
    assert!(cached < passthrough + Duration::from_millis(10), "cached {cached:?} vs pass-through {passthrough:?}");

    redis.resume();
    let took = load.wait_for_hits(Duration::from_secs(5)).await;
    eprintln!("hits {took:?} after SIGCONT");
    assert!(load.finish().await > 100);
}

async fn mean_latency(proxy: &TestProxy, path: &str) -> Duration {
    let url = proxy.url(path);
    let started = Instant::now();
    for _ in 0..50 {
        assert_eq!(get(&url).await.status, http::StatusCode::OK);
    }
    started.elapsed() / 50
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_full_with_noeviction() {
    let upstream = TestUpstream::spawn().await;
    let redis = TestRedis::start();
    let proxy = proxy_for(&upstream, &redis.url()).await;
    assert_eq!(redis.command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]), "+OK");
    assert_eq!(redis.command(&["CONFIG", "SET", "maxmemory", "1"]), "+OK");
    let load = Load::start(&proxy, 8);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(load.slowest() < SLOWEST, "slowest {:?}", load.slowest());
    assert_eq!(load.hits.load(Ordering::Relaxed), 0, "nothing could be stored");
    assert_eq!(redis.command(&["CONFIG", "SET", "maxmemory", "0"]), "+OK");
    load.wait_for_hits(Duration::from_secs(5)).await;
    assert!(load.finish().await > 100);
    let m = get(&proxy.admin_url("/metrics")).await.text();
    assert!(metric(&m, r#"sidecache_cache_stores_total{route="cached",result="error"}"#).unwrap() >= 1.0, "{m}");
}
