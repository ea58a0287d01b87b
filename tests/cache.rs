//! The response cache through the real server: headers and bodies of hits, misses and bypasses,
//! every storing rule, key isolation, expiry, 304 and HEAD, purges, corrupt entries, the kill
//! switch; on the embedded store and on a redis-server of the test's own. The upstream is told
//! how to answer by the test (`TestUpstream::new().route(..)`); time moves by a manual clock.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::redis::TestRedis;
use support::*;

const ROUTES: &str = r#"
[[route]]
name = "cached"
path = "/gen/*"
cache = { ttl = "60s", vary = ["Accept-Encoding"], max_body = 4096 }
[[route]]
name = "short"
path = "/short/*"
cache = { ttl = "1s" }
[[route]]
name = "plain"
path = "/gen2/*"
cache = { ttl = "60s" }
[[route]]
name = "fallback"
path = "/gen3/*"
cache = { ttl = "1s", stale_if_error = "60s" }
[[route]]
name = "brief"
path = "/gen4/*"
cache = { ttl = "1s" }
[[route]]
name = "swr"
path = "/gen5/*"
cache = { ttl = "1s", stale_while_revalidate = "60s" }
"#;

type Setup = CacheSetup;

async fn embedded_with(upstream: TestUpstreamBuilder) -> Setup {
    CacheSetup::start(ROUTES, upstream, Store::Embedded, "").await
}

async fn embedded() -> Setup {
    embedded_with(TestUpstream::new()).await
}

async fn on_redis_with(upstream: TestUpstreamBuilder) -> Setup {
    CacheSetup::start(ROUTES, upstream, Store::Redis, "").await
}

async fn on_redis() -> Setup {
    on_redis_with(TestUpstream::new()).await
}

fn metrics_value(text: &str, route: &str, family: &str, result: &str) -> f64 {
    metric(text, &format!(r#"sidecache_{family}_total{{route="{route}",result="{result}"}}"#)).unwrap_or(0.0)
}

async fn req(proxy: &TestProxy, path: &str, headers: &[(&str, &str)]) -> Answer {
    send(Method::GET, &proxy.url(path), headers, Bytes::new()).await
}

fn binary() -> TestUpstreamBuilder {
    TestUpstream::new().route("/gen/a", Reply::ok().binary())
}

async fn miss_then_hit(s: &Setup) {
    let first = req(&s.proxy, "/gen/a?x=1", &[]).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers["x-cache"], "MISS");
    assert_eq!(first.headers["cache-status"], "sidecache; fwd=miss; stored");
    stored(&s.proxy, "cached", 1.0).await;

    let hit = req(&s.proxy, "/gen/a?x=1", &[]).await;
    assert_eq!(hit.status, StatusCode::OK);
    assert_eq!(hit.headers["x-cache"], "HIT");
    assert!(hit.headers["cache-status"].to_str().unwrap().starts_with("sidecache; hit; ttl="), "{:?}", hit.headers);
    assert!(hit.headers.contains_key("age"));
    assert_eq!(hit.headers.get_all("via").iter().collect::<Vec<_>>(), ["1.1 sidecache"], "one Via, not one per replay");
    assert!(hit.body == first.body, "a hit replays the stored body byte for byte");
    assert_eq!(s.upstream.requests(), 1);
    let m = get(&s.proxy.admin_url("/metrics")).await.text();
    assert_eq!(metrics_value(&m, "cached", "cache_lookups", "hit"), 1.0, "{m}");
    assert_eq!(metrics_value(&m, "cached", "cache_lookups", "miss"), 1.0, "{m}");
}

#[tokio::test]
async fn miss_then_hit_on_the_embedded_store() {
    miss_then_hit(&embedded_with(binary()).await).await;
}

#[tokio::test]
async fn miss_then_hit_on_redis() {
    miss_then_hit(&on_redis_with(binary()).await).await;
}

#[tokio::test]
async fn credentials_bypass_the_cache() {
    let s = embedded().await;
    for _ in 0..2 {
        let a = req(&s.proxy, "/gen/private", &[("authorization", "Bearer t")]).await;
        assert_eq!(
            (a.headers["x-cache"].to_str().unwrap(), a.headers["cache-status"].to_str().unwrap()),
            ("BYPASS", "sidecache; fwd=bypass")
        );
        let c = req(&s.proxy, "/gen/private", &[("cookie", "s=1")]).await;
        assert_eq!(c.headers["x-cache"], "BYPASS");
    }
    assert_eq!(s.upstream.requests(), 4);
}

#[tokio::test]
async fn responses_that_must_not_be_stored_are_fetched_every_time() {
    let cases = [
        ("/gen/no-store", Reply::ok().header("cache-control", "no-store")),
        ("/gen/private", Reply::ok().header("cache-control", "private, max-age=60")),
        ("/gen/cookie", Reply::ok().header("set-cookie", "s=1")),
        ("/gen/vary-star", Reply::ok().header("vary", "*")),
        ("/gen/vary-unkeyable", Reply::ok().header("vary", "X-Forwarded-For")),
        ("/gen/status", Reply::ok().status(500)),
        ("/gen/big", Reply::ok().size(5000)),
    ];
    let upstream = cases.iter().fold(TestUpstream::new(), |u, (path, reply)| u.route(path, reply.clone()));
    let s = embedded_with(upstream).await;
    for (path, _) in &cases[..6] {
        let a = req(&s.proxy, path, &[]).await;
        let b = req(&s.proxy, path, &[]).await;
        assert_eq!(b.headers["x-cache"], "MISS", "{path} was served from the cache");
        assert_ne!(a.body, b.body, "{path}");
    }
    let big = req(&s.proxy, "/gen/big", &[]).await;
    assert_eq!(big.body.len(), 5000, "bodies over max_body stream through whole");
    let again = req(&s.proxy, "/gen/big", &[]).await;
    assert_eq!(again.headers["x-cache"], "MISS");
    let m = get(&s.proxy.admin_url("/metrics")).await.text();
    assert_eq!(metrics_value(&m, "cached", "cache_stores", "not_storable"), 12.0, "{m}");
    assert_eq!(metrics_value(&m, "cached", "cache_stores", "too_large"), 2.0, "{m}");
    assert_eq!(metrics_value(&m, "cached", "cache_stores", "stored"), 0.0, "{m}");
}

#[tokio::test]
async fn keys_separate_queries_vary_values_and_routes() {
    let s = embedded_with(TestUpstream::new().route("/gen/v", Reply::ok().header("vary", "Accept-Encoding"))).await;
    req(&s.proxy, "/gen/k?b=2&a=1", &[]).await;
    stored(&s.proxy, "cached", 1.0).await;
    assert_eq!(req(&s.proxy, "/gen/k?a=1&b=2", &[]).await.headers["x-cache"], "HIT", "sorted query is the default");
    assert_eq!(req(&s.proxy, "/gen/k?a=1&b=3", &[]).await.headers["x-cache"], "MISS");
    req(&s.proxy, "/gen/v", &[("accept-encoding", "gzip")]).await;
    stored(&s.proxy, "cached", 3.0).await;
    assert_eq!(req(&s.proxy, "/gen/v", &[("accept-encoding", "gzip")]).await.headers["x-cache"], "HIT");
    assert_eq!(req(&s.proxy, "/gen/v", &[("accept-encoding", "br")]).await.headers["x-cache"], "MISS");
    assert_eq!(req(&s.proxy, "/short/k?a=1&b=2", &[]).await.headers["x-cache"], "MISS", "another route");
}

#[tokio::test]
async fn entries_expire_with_the_route_ttl_and_the_origin_max_age() {
    let s = embedded_with(TestUpstream::new().route("/gen/m", Reply::ok().header("cache-control", "max-age=1"))).await;
    req(&s.proxy, "/short/x", &[]).await;
    req(&s.proxy, "/gen/m", &[]).await;
    stored(&s.proxy, "short", 1.0).await;
    stored(&s.proxy, "cached", 1.0).await;
    assert_eq!(req(&s.proxy, "/short/x", &[]).await.headers["x-cache"], "HIT");
    assert_eq!(req(&s.proxy, "/gen/m", &[]).await.headers["x-cache"], "HIT");
    s.clock.advance(Duration::from_millis(1100));
    assert_eq!(req(&s.proxy, "/short/x", &[]).await.headers["x-cache"], "MISS", "route ttl 1s");
    assert_eq!(req(&s.proxy, "/gen/m", &[]).await.headers["x-cache"], "MISS", "origin max-age=1 under a 60s ttl");
}

#[tokio::test]
async fn conditional_requests_get_304_and_head_is_served_from_the_get_entry() {
    let reply = Reply::ok().header("etag", "\"v1\"").header("content-type", "text/plain");
    let s = embedded_with(TestUpstream::new().route("/gen/c", reply)).await;
    let first = req(&s.proxy, "/gen/c", &[]).await;
    stored(&s.proxy, "cached", 1.0).await;
    let nm = req(&s.proxy, "/gen/c", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(nm.status, StatusCode::NOT_MODIFIED);
    assert!(nm.body.is_empty());
    assert_eq!(nm.headers["etag"], "\"v1\"");
    assert_eq!(nm.headers["x-cache"], "HIT");
    let changed = req(&s.proxy, "/gen/c", &[("if-none-match", "\"v0\"")]).await;
    assert_eq!(changed.status, StatusCode::OK);
    assert_eq!(changed.body, first.body);

    let head = send(Method::HEAD, &s.proxy.url("/gen/c"), &[], Bytes::new()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.headers["x-cache"], "HIT");
    assert!(head.body.is_empty());
    assert_eq!(head.headers["content-length"], first.body.len().to_string());
    assert_eq!(s.upstream.requests(), 1);
}

async fn purge(proxy: &TestProxy, body: &str) -> Answer {
    send(Method::POST, &proxy.admin_url("/purge"), &[("content-type", "application/json")], body.to_string()).await
}

async fn purges(s: &Setup) {
    for path in ["/gen/p1", "/gen/p2"] {
        req(&s.proxy, path, &[]).await;
    }
    req(&s.proxy, "/gen/p1", &[("accept-encoding", "gzip")]).await;
    stored(&s.proxy, "cached", 3.0).await;

    let one = purge(&s.proxy, r#"{"route": "cached", "path": "/gen/p1"}"#).await;
    assert_eq!(one.status, StatusCode::OK, "{}", one.text());
    assert_eq!(req(&s.proxy, "/gen/p1", &[]).await.headers["x-cache"], "MISS");
    assert_eq!(
        req(&s.proxy, "/gen/p1", &[("accept-encoding", "gzip")]).await.headers["x-cache"],
        "MISS",
        "every variant"
    );
    assert_eq!(req(&s.proxy, "/gen/p2", &[]).await.headers["x-cache"], "HIT", "other paths stay");

    let all = purge(&s.proxy, r#"{"route": "cached"}"#).await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(all.json()["generation"], 1);
    assert_eq!(req(&s.proxy, "/gen/p2", &[]).await.headers["x-cache"], "MISS");

    assert_eq!(purge(&s.proxy, r#"{"route": "nope"}"#).await.status, StatusCode::NOT_FOUND);
    assert_eq!(purge(&s.proxy, r#"{"rout": "cached"}"#).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(purge(&s.proxy, r#"{"route": "cached", "path": "no-slash"}"#).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(get(&s.proxy.admin_url("/purge")).await.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn purge_a_path_and_a_route_on_the_embedded_store() {
    purges(&embedded().await).await;
}

#[tokio::test]
async fn purge_a_path_and_a_route_on_redis() {
    purges(&on_redis().await).await;
}

#[tokio::test]
async fn a_corrupt_entry_is_a_miss_and_is_replaced() {
    let s = on_redis().await;
    let redis = s.redis.as_ref().unwrap();
    req(&s.proxy, "/gen2/z", &[]).await;
    stored(&s.proxy, "plain", 1.0).await;
    let key = "sidecache:c:plain:0:g:/gen2/z";
    let fields = redis.reply_lines(&["HKEYS", key]);
    let variants: Vec<&String> = fields.iter().skip(2).step_by(2).filter(|f| *f != "~").collect();
    assert_eq!(variants.len(), 1, "one variant and the index: {fields:?}");
    assert_eq!(redis.command(&["HSET", key, variants[0], "garbage"]), ":0", "overwrote the entry");
    let a = req(&s.proxy, "/gen2/z", &[]).await;
    assert_eq!((a.status, a.headers["x-cache"].to_str().unwrap()), (StatusCode::OK, "MISS"));
    stored(&s.proxy, "plain", 2.0).await;
    assert_eq!(req(&s.proxy, "/gen2/z", &[]).await.headers["x-cache"], "HIT");
    assert_eq!(s.upstream.requests(), 2);
}

#[tokio::test]
async fn the_kill_switch_turns_the_cache_off() {
    let upstream = TestUpstream::spawn().await;
    let env: HashMap<String, String> = [("SIDECACHE_CACHE_ENABLED".to_string(), "false".to_string())].into();
    let proxy = TestProxy::start_with_env(&config_text(upstream.addr, ROUTES), &env).await;
    for _ in 0..2 {
        let a = req(&proxy, "/gen/k", &[]).await;
        assert!(a.headers.get("x-cache").is_none() && a.headers.get("cache-status").is_none());
    }
    assert_eq!(upstream.requests(), 2);
    let status = get(&proxy.admin_url("/status")).await.json();
    assert_eq!((status["cache_enabled"].as_bool(), status["cache_store"].as_str()), (Some(false), Some("none")));
}

#[tokio::test]
async fn fifty_concurrent_cold_requests_cause_one_upstream_request() {
    let s = embedded_with(TestUpstream::new().route("/gen/cold", Reply::ok().delay(Duration::from_millis(300)))).await;
    let url = s.proxy.url("/gen/cold");
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { send(Method::GET, &url, &[], Bytes::new()).await })
        })
        .collect();
    let mut bodies = Vec::new();
    for t in tasks {
        let a = t.await.unwrap();
        assert_eq!(a.status, StatusCode::OK);
        bodies.push(a.body);
    }
    assert_eq!(s.upstream.requests(), 1, "one upstream request for 50 concurrent misses");
    assert!(bodies.iter().all(|b| *b == bodies[0]), "everyone got the same response");
}

#[tokio::test]
async fn a_fetch_that_yields_nothing_releases_the_waiters() {
    let failing = Reply::ok().delay(Duration::from_millis(200)).status(503);
    let s = embedded_with(TestUpstream::new().route("/gen/fails", failing)).await;
    let url = s.proxy.url("/gen/fails");
    let started = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { send(Method::GET, &url, &[], Bytes::new()).await })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().status, StatusCode::SERVICE_UNAVAILABLE);
    }
    assert!(started.elapsed() < Duration::from_secs(3), "waiters were released, took {:?}", started.elapsed());
}

#[tokio::test]
async fn stale_if_error_serves_the_expired_entry_when_the_upstream_fails() {
    let must_revalidate = Reply::ok().header("cache-control", "max-age=1, must-revalidate");
    let s = embedded_with(TestUpstream::new().route("/gen3/m", must_revalidate)).await;
    let first = req(&s.proxy, "/gen3/s", &[]).await;
    stored(&s.proxy, "fallback", 1.0).await;
    s.clock.advance(Duration::from_millis(1100));
    s.upstream.set("/gen3/s", Reply::ok().status(503));
    let failing = req(&s.proxy, "/gen3/s", &[]).await;
    assert_eq!(failing.status, StatusCode::OK);
    assert_eq!(failing.headers["x-cache"], "STALE");
    assert!(failing.headers["cache-status"].to_str().unwrap().contains("detail=stale-if-error"));
    assert_eq!(failing.body, first.body);
    s.upstream.set("/gen3/s", Reply::ok());
    let fine = req(&s.proxy, "/gen3/s", &[]).await;
    assert_eq!(fine.headers["x-cache"], "MISS", "a working upstream answers, not the stale entry");
    assert_ne!(fine.body, first.body);
    let m = get(&s.proxy.admin_url("/metrics")).await.text();
    assert_eq!(metrics_value(&m, "fallback", "cache_lookups", "stale_if_error"), 1.0, "{m}");

    let must = req(&s.proxy, "/gen3/m", &[]).await;
    assert_eq!(must.status, StatusCode::OK);
    stored(&s.proxy, "fallback", 3.0).await;
    s.clock.advance(Duration::from_millis(1100));
    s.upstream.set("/gen3/m", Reply::ok().status(503));
    let refused = req(&s.proxy, "/gen3/m", &[]).await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "must-revalidate forbids serving it stale");
}

#[tokio::test]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    let s = embedded().await;
    let first = req(&s.proxy, "/gen5/w", &[]).await;
    stored(&s.proxy, "swr", 1.0).await;
    s.clock.advance(Duration::from_millis(1100));

    // Ten concurrent requests on the expired entry, the upstream now slow: all answered at once
    // from the stale entry, one refresh in the background.
    s.upstream.set("/gen5/w", Reply::ok().delay(Duration::from_millis(500)));
    let started = tokio::time::Instant::now();
    let answers: Vec<Answer> = futures_util::future::join_all((0..10).map(|_| req(&s.proxy, "/gen5/w", &[]))).await;
    assert!(started.elapsed() < Duration::from_millis(400), "stale answers waited: {:?}", started.elapsed());
    for a in &answers {
        assert_eq!(a.headers["x-cache"], "STALE");
        assert!(a.headers["cache-status"].to_str().unwrap().contains("stale-while-revalidate"));
        assert_eq!(a.body, first.body);
    }
    stored(&s.proxy, "swr", 2.0).await;
    assert_eq!(s.upstream.requests(), 2, "one background refresh for ten stale answers");
    let refreshed = req(&s.proxy, "/gen5/w", &[]).await;
    assert_eq!(refreshed.headers["x-cache"], "HIT");
    assert_ne!(refreshed.body, first.body, "the refreshed response");
}

#[tokio::test]
async fn a_stale_entry_with_validators_is_revalidated_by_a_conditional_request() {
    let reply = Reply::ok()
        .header("etag", "\"v1\"")
        .not_modified_if("\"v1\"", &[("cache-control", "max-age=1"), ("x-revalidated", "yes")]);
    let s = embedded_with(TestUpstream::new().route("/gen4/r", reply)).await;
    let first = req(&s.proxy, "/gen4/r", &[]).await;
    stored(&s.proxy, "brief", 1.0).await;
    s.clock.advance(Duration::from_millis(1100));

    let again = req(&s.proxy, "/gen4/r", &[]).await;
    assert_eq!(again.status, StatusCode::OK, "the client asked unconditionally and gets the body");
    assert_eq!(again.headers["x-cache"], "REVALIDATED");
    assert_eq!(again.headers["x-revalidated"], "yes", "the 304's headers were merged");
    assert_eq!(again.headers["etag"], "\"v1\"");
    assert_eq!(again.body, first.body, "the body was not transferred again");
    assert_eq!(s.upstream.requests(), 2);
    stored(&s.proxy, "brief", 2.0).await;
    assert_eq!(req(&s.proxy, "/gen4/r", &[]).await.headers["x-cache"], "HIT", "fresh again after the 304");
    assert_eq!(s.upstream.requests(), 2);
}

#[tokio::test]
async fn the_hot_tier_answers_without_redis_until_its_invalidation_link_is_lost() {
    let mut redis = TestRedis::start();
    let extra = format!(
        "[cache]\nhot_ttl = \"1s\"\n[redis]\nurl = \"{}\"\nop_timeout = \"50ms\"\nbreaker_cooldown = \"500ms\"\n",
        redis.url()
    );
    let s = CacheSetup::with(ROUTES, &extra, TestUpstream::new(), None).await;
    wait_for_redis(&s.proxy).await;
    let proxy = &s.proxy;
    let tracking = format!(r#"sidecache_redis_tracking_up{{client="cache",node="127.0.0.1:{}"}}"#, redis.port);
    until_metric(proxy.admin, &tracking, 1.0).await;
    let first = req(proxy, "/gen/h", &[]).await;
    stored(proxy, "cached", 1.0).await;
    assert_eq!(req(proxy, "/gen/h", &[]).await.headers["x-cache"], "HIT", "read back from Redis: admitted");

    redis.pause();
    let started = tokio::time::Instant::now();
    let hot = req(proxy, "/gen/h", &[]).await;
    assert_eq!(hot.headers["x-cache"], "HIT");
    assert_eq!(hot.body, first.body);
    assert!(started.elapsed() < Duration::from_millis(40), "a hot hit does not touch Redis: {:?}", started.elapsed());
    s.clock.advance(Duration::from_millis(1100));
    assert_eq!(req(proxy, "/gen/h", &[]).await.headers["x-cache"], "HIT", "tracked: held past hot_ttl");

    // The link's PING goes unanswered: the tier is dropped, and lookups go to (a hung) Redis.
    until_metric(proxy.admin, &tracking, 0.0).await;
    let after = req(proxy, "/gen/h", &[]).await;
    assert_eq!((after.status, after.headers["x-cache"].to_str().unwrap()), (StatusCode::OK, "MISS"));
    redis.resume();

    wait_for_redis(proxy).await;
    until_metric(proxy.admin, &tracking, 1.0).await;
    req(proxy, "/gen/p", &[]).await;
    stored(proxy, "cached", 2.0).await;
    assert_eq!(req(proxy, "/gen/p", &[]).await.headers["x-cache"], "HIT");
    assert_eq!(purge(proxy, r#"{"route": "cached", "path": "/gen/p"}"#).await.status, StatusCode::OK);
    assert_eq!(req(proxy, "/gen/p", &[]).await.headers["x-cache"], "MISS", "a local purge clears the hot tier at once");
}
