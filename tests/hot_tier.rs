//! The in-process hot tier in front of Redis, kept true by Redis's invalidation messages
//! (`CLIENT TRACKING` BCAST): two proxies on one redis-server of the test's own, with `hot_ttl`
//! set to an hour so that only the invalidation links can explain a replica seeing a change.
//! Entries are fresh for an hour, so nothing here ends by expiry.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::redis::TestRedis;
use support::*;
use tokio::time::Instant;

const ROUTES: &str = r#"
[[route]]
name = "capped"
path = "/gen/capped/*"
cache = { ttl = "1h", max_variants = 1 }
[[route]]
name = "two"
path = "/gen/two/*"
cache = { ttl = "1h", max_variants = 2 }
[[route]]
name = "cached"
path = "/gen/*"
cache = { ttl = "1h", request_directives = true }
"#;

/// The key of `/gen/{name}` in generation 0.
fn key(name: &str) -> String {
    format!("sidecache:c:cached:0:g:/gen/{name}")
}

async fn proxy(upstream: &TestUpstream, redis: &TestRedis, clock: &sidecache::Clock, hot_ttl: &str) -> TestProxy {
    let extra = format!(
        "{ROUTES}\n[cache]\nhot_ttl = \"{hot_ttl}\"\n[redis]\nurl = \"{}\"\nop_timeout = \"250ms\"\nbreaker_cooldown = \"200ms\"\n",
        redis.url()
    );
    let p = TestProxy::start_with(&config_text(upstream.addr, &extra), &HashMap::new(), clock.clone()).await;
    wait_for_redis(&p).await;
    p
}

async fn replicas(redis: &TestRedis) -> (TestUpstream, TestProxy, TestProxy, sidecache::Clock) {
    let upstream = TestUpstream::spawn().await;
    let clock = sidecache::Clock::manual();
    let a = proxy(&upstream, redis, &clock, "1h").await;
    let b = proxy(&upstream, redis, &clock, "1h").await;
    until_tracking(&a, redis, true).await;
    until_tracking(&b, redis, true).await;
    (upstream, a, b, clock)
}

async fn metrics(p: &TestProxy) -> String {
    get(&p.admin_url("/metrics")).await.text()
}

fn tracking_series(redis: &TestRedis) -> String {
    format!(r#"sidecache_redis_tracking_up{{client="cache",node="127.0.0.1:{}"}}"#, redis.port)
}

/// Waits (10 s at most) until the proxy's link to `redis` tracks (or not).
async fn until_tracking(p: &TestProxy, redis: &TestRedis, up: bool) {
    until_metric(p.admin, &tracking_series(redis), if up { 1.0 } else { 0.0 }).await;
}

/// Every request names one host: the authority is part of the key.
async fn req(p: &TestProxy, path: &str) -> Answer {
    send(Method::GET, &p.url(path), &[("host", "shop")], Bytes::new()).await
}

fn x_cache(a: &Answer) -> &str {
    a.headers["x-cache"].to_str().unwrap()
}

fn redis_reads(text: &str) -> f64 {
    ["hget", "hmget"]
        .iter()
        .map(|op| {
            let series = format!(r#"sidecache_redis_op_duration_seconds_count{{client="cache",op="{op}"}}"#);
            metric(text, &series).unwrap_or(0.0)
        })
        .sum()
}

/// Responses `p` has stored so far.
async fn stores(p: &TestProxy) -> f64 {
    metric(&metrics(p).await, r#"sidecache_cache_stores_total{route="cached",result="stored"}"#).unwrap_or(0.0)
}

/// Store `path` through `a`, then have each proxy read it back from Redis once (which admits it
/// to its tier) and answer it from the tier.
async fn warm(a: &TestProxy, b: &TestProxy, path: &str) -> Bytes {
    let before = stores(a).await;
    let first = req(a, path).await;
    assert_eq!(x_cache(&first), "MISS", "{path}");
    stored(a, "cached", before + 1.0).await;
    for p in [a, b] {
        let hit = req(p, path).await;
        assert_eq!((x_cache(&hit), &hit.body), ("HIT", &first.body), "{path} on {}", p.addr);
    }
    first.body
}

/// How long until `p` answers `path` with something other than `held` (10 s at most).
async fn until_changed(p: &TestProxy, path: &str, held: &Bytes) -> Duration {
    let started = Instant::now();
    loop {
        let a = req(p, path).await;
        if a.body != *held {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{path} still served as before");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn hot_hits_cost_no_redis_read_and_every_change_reaches_the_other_replica_at_once() {
    let redis = TestRedis::start();
    let (_upstream, a, b, _clock) = replicas(&redis).await;

    // Hits from the tier read nothing from Redis.
    let held = warm(&a, &b, "/gen/x").await;
    let before = redis_reads(&metrics(&b).await);
    for _ in 0..20 {
        assert_eq!(x_cache(&req(&b, "/gen/x").await), "HIT");
    }
    assert_eq!(redis_reads(&metrics(&b).await), before, "hot hits read Redis");

    // A path purge through the other replica.
    let purge = send(
        Method::POST,
        &a.admin_url("/purge"),
        &[("content-type", "application/json")],
        r#"{"route": "cached", "path": "/gen/x"}"#.to_string(),
    )
    .await;
    assert_eq!(purge.status, StatusCode::OK);
    let took = until_changed(&b, "/gen/x", &held).await;
    assert!(took < Duration::from_secs(1), "a purge reached the other replica after {took:?}");

    // An overwrite: the other replica fetches anew and stores over the entry.
    let held = warm(&a, &b, "/gen/y").await;
    let before = stores(&a).await;
    let fetched =
        send(Method::GET, &a.url("/gen/y"), &[("cache-control", "no-cache"), ("host", "shop")], Bytes::new()).await;
    assert_ne!(fetched.body, held);
    stored(&a, "cached", before + 1.0).await;
    until_changed(&b, "/gen/y", &held).await;
    assert_eq!(req(&b, "/gen/y").await.body, fetched.body, "the other replica serves the new entry");

    // A DEL made directly in Redis.
    let held = warm(&a, &b, "/gen/z").await;
    assert_eq!(redis.command(&["DEL", &key("z")]), ":1");
    for p in [&a, &b] {
        until_changed(p, "/gen/z", &held).await;
    }

    // FLUSHALL: every entry is dropped, on both.
    let held = warm(&a, &b, "/gen/w").await;
    redis.command(&["FLUSHALL"]);
    for p in [&a, &b] {
        until_changed(p, "/gen/w", &held).await;
        assert!(metric(&metrics(p).await, r#"sidecache_hot_tier_flushes_total{reason="flushall"}"#) >= Some(1.0));
    }
    assert!(metric(&metrics(&b).await, "sidecache_hot_tier_invalidations_total") >= Some(3.0));
}

#[tokio::test]
async fn a_route_purge_reaches_the_other_replica_without_waiting_for_the_generation_refresh() {
    let redis = TestRedis::start();
    let (_upstream, a, b, _clock) = replicas(&redis).await;
    let held = warm(&a, &b, "/gen/r").await;
    let purge = send(
        Method::POST,
        &a.admin_url("/purge"),
        &[("content-type", "application/json")],
        r#"{"route": "cached"}"#.to_string(),
    )
    .await;
    assert_eq!(purge.status, StatusCode::OK);
    let took = until_changed(&b, "/gen/r", &held).await;
    // The refresh loop runs every second; the invalidation of the counter comes at once.
    assert!(took < Duration::from_millis(500), "a route purge reached the other replica after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_link_drops_the_tier_and_a_restarted_empty_redis_is_never_contradicted() {
    let mut redis = TestRedis::start();
    let (_upstream, a, b, _clock) = replicas(&redis).await;
    let held = warm(&a, &b, "/gen/k").await;
    // Under load throughout: every answer a 200 with its own path's body.
    let b = std::sync::Arc::new(b);
    let load = SteadyLoad::start(&b, 20);

    // A hung Redis: the link's PING goes unanswered, the tier is dropped.
    redis.pause();
    let paused = Instant::now();
    until_tracking(&b, &redis, false).await;
    assert!(paused.elapsed() < Duration::from_millis(1500), "a silent link noticed after {:?}", paused.elapsed());
    assert!(metric(&metrics(&b).await, r#"sidecache_hot_tier_flushes_total{reason="link_lost"}"#) >= Some(1.0));
    let during = req(&b, "/gen/k").await;
    assert_eq!((during.status, x_cache(&during)), (StatusCode::OK, "MISS"), "forwarded, not held");
    assert_ne!(during.body, held);
    redis.resume();
    wait_for_redis(&b).await;
    until_tracking(&b, &redis, true).await;

    // Restarted empty: whatever a replica held before is gone with it.
    let held = warm(&a, &b, "/gen/k2").await;
    redis.restart();
    wait_for_redis(&b).await;
    until_tracking(&b, &redis, true).await;
    let after = req(&b, "/gen/k2").await;
    assert_ne!(after.body, held, "served an entry Redis no longer holds");
    let (answered, slowest) = load.finish().await;
    assert!(answered > 100, "only {answered} requests under load");
    assert!(slowest < Duration::from_secs(1), "a request waited {slowest:?}");
}

#[tokio::test]
async fn without_tracking_the_tier_keeps_entries_for_hot_ttl_only() {
    // A server that cannot track (no HELLO, as before Redis 6).
    let redis = TestRedis::start_with(&["--rename-command", "HELLO", ""]);
    let upstream = TestUpstream::spawn().await;
    let clock = sidecache::Clock::manual();
    let a = proxy(&upstream, &redis, &clock, "1s").await;
    req(&a, "/gen/t").await;
    stored(&a, "cached", 1.0).await;
    assert_eq!(x_cache(&req(&a, "/gen/t").await), "HIT");
    let before = redis_reads(&metrics(&a).await);
    assert_eq!(x_cache(&req(&a, "/gen/t").await), "HIT");
    assert_eq!(redis_reads(&metrics(&a).await), before, "held for hot_ttl");
    clock.advance(Duration::from_millis(1100));
    assert_eq!(x_cache(&req(&a, "/gen/t").await), "HIT");
    assert_eq!(redis_reads(&metrics(&a).await), before + 1.0, "read again after hot_ttl");
    assert_eq!(metric(&metrics(&a).await, &tracking_series(&redis)), Some(0.0));
}

/// Three proxies on one Redis, with a path `/gen/slow` the backend answers with `slow`.
async fn three(redis: &TestRedis, slow: Reply) -> (TestUpstream, Vec<TestProxy>) {
    let upstream = TestUpstream::new().route("/gen/slow", slow).spawn().await;
    let clock = sidecache::Clock::system();
    let mut proxies = Vec::new();
    for _ in 0..3 {
        let p = proxy(&upstream, redis, &clock, "1h").await;
        until_tracking(&p, redis, true).await;
        proxies.push(p);
    }
    (upstream, proxies)
}

/// 30 concurrent requests for `path`, spread over the proxies; their bodies.
async fn thirty(proxies: &[TestProxy], path: &str) -> Vec<Bytes> {
    let tasks: Vec<_> = (0..30)
        .map(|i| {
            let url = proxies[i % proxies.len()].url(path);
            tokio::spawn(async move { send(Method::GET, &url, &[("host", "shop")], Bytes::new()).await })
        })
        .collect();
    let mut bodies = Vec::new();
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, StatusCode::OK);
        bodies.push(a.body);
    }
    bodies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_missing_one_key_at_once_fetch_it_once() {
    let redis = TestRedis::start();
    let (upstream, proxies) = three(&redis, Reply::ok().delay(Duration::from_millis(300))).await;
    let bodies = thirty(&proxies, "/gen/slow").await;
    assert_eq!(upstream.seen("/gen/slow").len(), 1, "one upstream fetch for three replicas");
    assert!(bodies.iter().all(|b| *b == bodies[0]), "everyone got the one fetch's answer");
    let collapsed: f64 = {
        let mut n = 0.0;
        for p in &proxies {
            let m = metrics(p).await;
            n += metric(&m, r#"sidecache_cache_lookups_total{route="cached",result="collapsed"}"#).unwrap_or(0.0);
        }
        n
    };
    assert_eq!(collapsed, 29.0);
    let released = Instant::now();
    while redis.reply_lines(&["KEYS", "*lease*"]) != ["*0"] {
        assert!(released.elapsed() < Duration::from_secs(2), "the lease was never released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_each_replica_coalesces_on_its_own_at_once() {
    let mut redis = TestRedis::start();
    let (upstream, proxies) = three(&redis, Reply::ok().delay(Duration::from_millis(300))).await;
    redis.kill();
    for p in &proxies {
        until_tracking(p, &redis, false).await;
    }
    let started = Instant::now();
    thirty(&proxies, "/gen/slow").await;
    assert_eq!(upstream.seen("/gen/slow").len(), 3, "one fetch per replica");
    assert!(started.elapsed() < Duration::from_secs(2), "nobody waited out a lease: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_that_yields_nothing_to_store_releases_the_other_replicas_at_once() {
    let redis = TestRedis::start();
    let slow = Reply::ok().status(503).delay(Duration::from_millis(300));
    let (_upstream, proxies) = three(&redis, slow).await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..9)
        .map(|i| {
            let url = proxies[i % 3].url("/gen/slow");
            tokio::spawn(async move { send(Method::GET, &url, &[("host", "shop")], Bytes::new()).await.status })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::SERVICE_UNAVAILABLE);
    }
    // The lease is released with the unstorable answer: nobody waits out `lock_timeout` (5 s).
    assert!(started.elapsed() < Duration::from_secs(2), "waited {:?}", started.elapsed());
}

#[tokio::test]
async fn a_refused_variant_does_not_make_other_replicas_read_the_entry_again() {
    let redis = TestRedis::start();
    let (_upstream, a, b, _clock) = replicas(&redis).await;
    let path = "/gen/capped/p";
    let first = req(&a, path).await;
    let capped = r#"sidecache_cache_stores_total{route="capped",result="stored"}"#;
    until_metric(a.admin, capped, 1.0).await;
    for _ in 0..2 {
        assert_eq!((x_cache(&req(&b, path).await)), "HIT");
    }
    let before = redis_reads(&metrics(&b).await);
    // Another host's variant, refused every time: the path holds as many as it may.
    for _ in 0..5 {
        let other = send(Method::GET, &a.url(path), &[("host", "elsewhere")], Bytes::new()).await;
        assert_eq!(x_cache(&other), "MISS");
    }
    until_metric(a.admin, r#"sidecache_cache_stores_total{route="capped",result="too_many_variants"}"#, 5.0).await;
    for _ in 0..3 {
        assert_eq!(req(&b, path).await.body, first.body);
    }
    assert_eq!(redis_reads(&metrics(&b).await), before, "the other replica's entry was dropped");
}

#[tokio::test]
async fn a_refused_variant_the_origin_varies_by_does_not_make_other_replicas_read_again() {
    let redis = TestRedis::start();
    let varied = Reply::ok().header("cache-control", "max-age=3600").header("vary", "Accept-Language");
    let upstream = TestUpstream::new().route("/gen/two", varied).spawn().await;
    let clock = sidecache::Clock::manual();
    let (a, b) = (proxy(&upstream, &redis, &clock, "1h").await, proxy(&upstream, &redis, &clock, "1h").await);
    until_tracking(&a, &redis, true).await;
    until_tracking(&b, &redis, true).await;
    let lang = |p: &TestProxy, value: &str| {
        let url = p.url("/gen/two/p");
        let value = value.to_string();
        async move { send(Method::GET, &url, &[("host", "shop"), ("accept-language", &value)], Bytes::new()).await }
    };
    // The marker and the `en` entry: the path's two variants.
    assert_eq!(x_cache(&lang(&a, "en").await), "MISS");
    until_metric(a.admin, r#"sidecache_cache_stores_total{route="two",result="stored"}"#, 1.0).await;
    for _ in 0..2 {
        assert_eq!(x_cache(&lang(&b, "en").await), "HIT");
    }
    let before = redis_reads(&metrics(&b).await);
    // A third value, refused: the marker it would lead from is not written again either.
    assert_eq!(x_cache(&lang(&a, "xx-invented").await), "MISS");
    until_metric(a.admin, r#"sidecache_cache_stores_total{route="two",result="too_many_variants"}"#, 1.0).await;
    for _ in 0..3 {
        assert_eq!(x_cache(&lang(&b, "en").await), "HIT");
    }
    assert_eq!(redis_reads(&metrics(&b).await), before, "the other replica's entry was dropped");
}
