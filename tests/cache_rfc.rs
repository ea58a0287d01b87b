//! The cache as an RFC 9111 shared cache, through the real request path on the embedded store and
//! on a redis-server of the test's own: variants the origin's `Vary` chooses, any final status
//! with explicit freshness, the origin's stale directives, targeted cache control (RFC 9213),
//! byte ranges from stored responses, clients' request directives where a route allows them,
//! invalidation by unsafe requests (on one replica and across two), and fields read as the RFCs
//! say. Freshness runs on a manual clock.

mod support;

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, StatusCode};
use support::redis::TestRedis;
use support::*;

const ROUTES: &str = r#"
[[route]]
name = "origin"
path = "/gen/*"
cache = { }
[[route]]
name = "ttl"
path = "/genttl/*"
cache = { ttl = "60s" }
[[route]]
name = "few"
path = "/genfew/*"
cache = { max_variants = 3 }
[[route]]
name = "clients"
path = "/genclients/*"
cache = { ttl = "60s", request_directives = true }
[[route]]
name = "capped"
path = "/gencapped/*"
cache = { stale_if_error = "30s" }
[[route]]
name = "heuristic"
path = "/genheur/*"
cache = { heuristic = true }
"#;

const TARGETED: &str = r#"targeted = ["Sidecache-Cache-Control", "CDN-Cache-Control"]"#;

/// Each scenario on both stores.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::*;
            #[tokio::test]
            async fn embedded() {
                super::$name(Store::Embedded).await
            }
            #[tokio::test]
            async fn redis() {
                super::$name(Store::Redis).await
            }
        }
    )*};
}

on_both_stores!(
    origin_vary_chooses_the_variant,
    followers_with_other_values_fetch_their_own,
    explicit_freshness_stores_any_final_status,
    the_origins_stale_directives_count,
    a_targeted_field_decides,
    ranges_are_answered_from_stored_responses,
    request_directives_only_where_the_route_allows,
    unsafe_requests_invalidate,
    fields_are_read_as_the_rfcs_say,
    no_value_reads_as_an_absent_field,
);

async fn setup(store: Store, upstream: TestUpstreamBuilder) -> CacheSetup {
    CacheSetup::start(ROUTES, upstream, store, TARGETED).await
}

async fn req(s: &CacheSetup, path: &str, headers: &[(&str, &str)]) -> Answer {
    send(Method::GET, &s.proxy.url(path), headers, Bytes::new()).await
}

fn x_cache(a: &Answer) -> &str {
    a.headers["x-cache"].to_str().unwrap()
}

fn counter(text: &str, family: &str, route: &str, result: &str) -> f64 {
    metric(text, &format!(r#"sidecache_{family}_total{{route="{route}",result="{result}"}}"#)).unwrap_or(0.0)
}

async fn metrics(proxy: &TestProxy) -> String {
    get(&proxy.admin_url("/metrics")).await.text()
}

const FRESH: &str = "max-age=60";

async fn origin_vary_chooses_the_variant(store: Store) {
    let varied = Reply::ok().header("cache-control", FRESH).header("vary", "Accept-Language");
    let s = setup(store, TestUpstream::new().route("/gen/lang", varied)).await;
    let en = req(&s, "/gen/lang", &[("accept-language", "en")]).await;
    assert_eq!(en.headers["cache-status"], "sidecache; fwd=miss; stored");
    stored(&s.proxy, "origin", 1.0).await;
    let en_again = req(&s, "/gen/lang", &[("accept-language", "en")]).await;
    assert_eq!((x_cache(&en_again), &en_again.body), ("HIT", &en.body));
    let fr = req(&s, "/gen/lang", &[("accept-language", "fr")]).await;
    assert_eq!(x_cache(&fr), "MISS", "another value of a field the origin varies by");
    assert_ne!(fr.body, en.body);
    stored(&s.proxy, "origin", 2.0).await;
    let fr_again = req(&s, "/gen/lang", &[("accept-language", "fr")]).await;
    assert_eq!((x_cache(&fr_again), &fr_again.body), ("HIT", &fr.body));
    assert_eq!(x_cache(&req(&s, "/gen/lang", &[("accept-language", "en")]).await), "HIT", "en is still there");

    // Values are normalised: combined lines and whitespace around members.
    let both = req(&s, "/gen/lang", &[("accept-language", "en, fr")]).await;
    stored(&s.proxy, "origin", 3.0).await;
    let lines = req(&s, "/gen/lang", &[("accept-language", "en"), ("accept-language", "fr")]).await;
    assert_eq!((x_cache(&lines), &lines.body), ("HIT", &both.body), "two lines are one list");
    let tight = req(&s, "/gen/lang", &[("accept-language", "en,fr")]).await;
    assert_eq!((x_cache(&tight), &tight.body), ("HIT", &both.body));
    assert_eq!(x_cache(&req(&s, "/gen/lang", &[("accept-language", "fr, en")]).await), "MISS", "order counts");
    assert_eq!(x_cache(&req(&s, "/gen/lang", &[]).await), "MISS", "absent is a value of its own");
    assert_eq!(s.upstream.requests(), 5);
}

async fn followers_with_other_values_fetch_their_own(store: Store) {
    let slow =
        Reply::ok().header("cache-control", FRESH).header("vary", "Accept-Language").delay(Duration::from_millis(300));
    let s = setup(store, TestUpstream::new().route("/gen/slow", slow)).await;
    let url = s.proxy.url("/gen/slow");
    let ask = |lang: &'static str| {
        let url = url.clone();
        tokio::spawn(async move { send(Method::GET, &url, &[("accept-language", lang)], Bytes::new()).await })
    };
    let leader = ask("en");
    tokio::time::sleep(Duration::from_millis(80)).await;
    let (same, other) = (ask("en"), ask("fr"));
    let (leader, same, other) = (leader.await.unwrap(), same.await.unwrap(), other.await.unwrap());
    assert_eq!(same.headers["cache-status"], "sidecache; fwd=miss; collapsed");
    assert_eq!(same.body, leader.body, "a follower with the leader's values gets its response");
    assert_ne!(other.body, leader.body, "one with other values must not get the leader's");
    let seen: Vec<_> = s.upstream.seen("/gen/slow").iter().map(|h| h["accept-language"].clone()).collect();
    assert_eq!(seen, ["en", "fr"]);
}

async fn explicit_freshness_stores_any_final_status(store: Store) {
    let lm = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(100_000));
    let upstream = TestUpstream::new()
        .route("/genttl/moved", Reply::ok().status(301).header("location", "/x").header("cache-control", FRESH))
        .route("/genttl/unavailable", Reply::ok().status(503).header("cache-control", FRESH))
        .route(
            "/genttl/gone",
            Reply::ok()
                .status(410)
                .header("expires", &httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60))),
        )
        .route("/genttl/bad", Reply::ok().status(400).header("cache-control", FRESH))
        .route("/genttl/missing", Reply::ok().status(404))
        .route("/genheur/", Reply::ok().header("last-modified", &lm))
        .route("/gen/heur", Reply::ok().header("last-modified", &lm));
    let s = setup(store, upstream).await;
    for (path, status) in [("/genttl/moved", 301), ("/genttl/unavailable", 503), ("/genttl/gone", 410)] {
        let first = req(&s, path, &[]).await;
        assert_eq!(first.status.as_u16(), status);
        assert_eq!(first.headers["cache-status"], "sidecache; fwd=miss; stored", "{path}");
    }
    stored(&s.proxy, "ttl", 3.0).await;
    for (path, status) in [("/genttl/moved", 301), ("/genttl/unavailable", 503), ("/genttl/gone", 410)] {
        let again = req(&s, path, &[]).await;
        assert_eq!((again.status.as_u16(), x_cache(&again)), (status, "HIT"), "{path}");
    }
    // A 400 answers the request's own fields, which the key does not hold; a 404 without
    // freshness of its own is not among the route's statuses for its ttl.
    for path in ["/genttl/bad", "/genttl/missing"] {
        let (a, b) = (req(&s, path, &[]).await, req(&s, path, &[]).await);
        assert_eq!((x_cache(&b), a.body != b.body), ("MISS", true), "{path}");
    }
    // Heuristic freshness from Last-Modified only where the route opts in.
    req(&s, "/genheur/x", &[]).await;
    stored(&s.proxy, "heuristic", 1.0).await;
    assert_eq!(x_cache(&req(&s, "/genheur/x", &[]).await), "HIT");
    let hit = req(&s, "/genheur/x", &[]).await;
    let ttl: i64 = hit.headers["cache-status"].to_str().unwrap().rsplit("ttl=").next().unwrap().parse().unwrap();
    assert!((9_900..=10_000).contains(&ttl), "a tenth of the 100000 s since Last-Modified: {ttl}");
    req(&s, "/gen/heur", &[]).await;
    assert_eq!(x_cache(&req(&s, "/gen/heur", &[]).await), "MISS", "not on a route without heuristic");
}

async fn the_origins_stale_directives_count(store: Store) {
    let upstream = TestUpstream::new()
        .route("/gen/swr", Reply::ok().header("cache-control", "max-age=1, stale-while-revalidate=60"))
        .route("/gen/sie", Reply::ok().header("cache-control", "max-age=1, stale-if-error=60"))
        .route("/gen/must", Reply::ok().header("cache-control", "max-age=1, stale-if-error=60, must-revalidate"))
        .route("/gen/shared", Reply::ok().header("cache-control", "s-maxage=1, stale-if-error=60"))
        .route("/gencapped/x", Reply::ok().header("cache-control", "max-age=1, stale-if-error=600"));
    let s = setup(store, upstream).await;
    let paths = ["/gen/swr", "/gen/sie", "/gen/must", "/gen/shared", "/gencapped/x"];
    let mut first = HashMap::new();
    for path in paths {
        first.insert(path, req(&s, path, &[]).await.body);
    }
    stored(&s.proxy, "origin", 4.0).await;
    stored(&s.proxy, "capped", 1.0).await;
    s.clock.advance(Duration::from_secs(20));

    let swr = req(&s, "/gen/swr", &[]).await;
    assert_eq!((x_cache(&swr), &swr.body), ("STALE", &first["/gen/swr"]), "the origin's stale-while-revalidate");
    for _ in 0..200 {
        if s.upstream.seen("/gen/swr").len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.upstream.seen("/gen/swr").len(), 2, "refreshed in the background");

    for path in paths[1..].iter() {
        s.upstream.set(path, Reply::ok().status(500));
    }
    let sie = req(&s, "/gen/sie", &[]).await;
    assert_eq!((sie.status, x_cache(&sie)), (StatusCode::OK, "STALE"), "the origin's stale-if-error");
    assert!(sie.headers["cache-status"].to_str().unwrap().ends_with("detail=stale-if-error"));
    let capped = req(&s, "/gencapped/x", &[]).await;
    assert_eq!(x_cache(&capped), "STALE", "inside the route's cap of 30 s");
    for path in ["/gen/must", "/gen/shared"] {
        assert_eq!(req(&s, path, &[]).await.status, StatusCode::INTERNAL_SERVER_ERROR, "{path}: no stale use");
    }
    s.clock.advance(Duration::from_secs(20));
    let capped = req(&s, "/gencapped/x", &[]).await;
    assert_eq!(capped.status, StatusCode::INTERNAL_SERVER_ERROR, "40 s stale: past the route's cap");
    assert_eq!(x_cache(&req(&s, "/gen/sie", &[]).await), "STALE", "the origin's 60 s where the route sets none");
}

async fn a_targeted_field_decides(store: Store) {
    let upstream = TestUpstream::new()
        .route("/gen/cdn", Reply::ok().header("cache-control", "no-store").header("cdn-cache-control", FRESH))
        .route("/gen/ours", Reply::ok().header("cache-control", FRESH).header("sidecache-cache-control", "no-store"))
        .route("/gen/invalid", Reply::ok().header("cache-control", FRESH).header("cdn-cache-control", "max-age=,,"));
    let s = setup(store, upstream).await;
    req(&s, "/gen/cdn", &[]).await;
    req(&s, "/gen/invalid", &[]).await;
    stored(&s.proxy, "origin", 2.0).await;
    let hit = req(&s, "/gen/cdn", &[]).await;
    assert_eq!(x_cache(&hit), "HIT", "CDN-Cache-Control replaces Cache-Control for this cache");
    assert_eq!(
        (hit.headers["cache-control"].to_str().unwrap(), hit.headers["cdn-cache-control"].to_str().unwrap()),
        ("no-store", "max-age=60"),
        "forwarded unchanged"
    );
    assert_eq!(x_cache(&req(&s, "/gen/invalid", &[]).await), "HIT", "an invalid targeted field is ignored");
    let (a, b) = (req(&s, "/gen/ours", &[]).await, req(&s, "/gen/ours", &[]).await);
    assert_eq!((x_cache(&b), a.body != b.body), ("MISS", true), "the first listed field wins");
}

async fn ranges_are_answered_from_stored_responses(store: Store) {
    let reply = Reply::ok().header("cache-control", FRESH).header("etag", "\"r1\"").binary();
    let s = setup(store, TestUpstream::new().route("/gen/r", reply)).await;
    // A range miss goes upstream as sent and stores nothing.
    let miss = req(&s, "/gen/r", &[("range", "bytes=0-3")]).await;
    assert_eq!(x_cache(&miss), "MISS");
    assert_eq!(s.upstream.seen("/gen/r")[0]["range"], "bytes=0-3");
    let full = req(&s, "/gen/r", &[]).await;
    assert_eq!(full.headers["cache-status"], "sidecache; fwd=miss; stored", "the range miss stored nothing");
    stored(&s.proxy, "origin", 1.0).await;
    let len = full.body.len();

    let part = req(&s, "/gen/r", &[("range", "bytes=2-9")]).await;
    assert_eq!((part.status, x_cache(&part)), (StatusCode::PARTIAL_CONTENT, "HIT"));
    assert_eq!(part.headers["content-range"], format!("bytes 2-9/{len}").as_str());
    assert_eq!(part.headers["content-length"], "8");
    assert_eq!(part.body, full.body.slice(2..10));
    let suffix = req(&s, "/gen/r", &[("range", "bytes=-5")]).await;
    assert_eq!(suffix.body, full.body.slice(len - 5..));
    let past = req(&s, "/gen/r", &[("range", &format!("bytes={len}-"))]).await;
    assert_eq!(past.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(past.headers["content-range"], format!("bytes */{len}").as_str());
    let several = req(&s, "/gen/r", &[("range", "bytes=0-1,4-5")]).await;
    assert_eq!((several.status, &several.body), (StatusCode::OK, &full.body), "several ranges: the whole");
    let matching = req(&s, "/gen/r", &[("range", "bytes=0-1"), ("if-range", "\"r1\"")]).await;
    assert_eq!(matching.status, StatusCode::PARTIAL_CONTENT);
    let changed = req(&s, "/gen/r", &[("range", "bytes=0-1"), ("if-range", "\"r0\"")]).await;
    assert_eq!((changed.status, &changed.body), (StatusCode::OK, &full.body), "If-Range does not match: the whole");
    let head = send(Method::HEAD, &s.proxy.url("/gen/r"), &[("range", "bytes=0-1")], Bytes::new()).await;
    assert_eq!(head.status, StatusCode::OK, "Range is for GET");
    assert_eq!(s.upstream.requests(), 2);
}

async fn request_directives_only_where_the_route_allows(store: Store) {
    let s = setup(store, TestUpstream::new()).await;
    for path in ["/genclients/a", "/genclients/no-cache", "/genclients/max-age", "/genclients/min-fresh"] {
        req(&s, path, &[]).await;
    }
    req(&s, "/genttl/a", &[]).await;
    stored(&s.proxy, "clients", 4.0).await;
    stored(&s.proxy, "ttl", 1.0).await;
    s.clock.advance(Duration::from_secs(10));
    let hit = |a: &Answer| x_cache(a) == "HIT";

    // A route that ignores them (the default): no client can make the cache skip an entry.
    for cc in ["no-cache", "max-age=0", "min-fresh=3600"] {
        assert!(hit(&req(&s, "/genttl/a", &[("cache-control", cc)]).await), "{cc} is ignored");
    }
    assert!(hit(&req(&s, "/genttl/a", &[("pragma", "no-cache")]).await));
    assert_eq!(x_cache(&req(&s, "/genttl/cold", &[("cache-control", "only-if-cached")]).await), "MISS");

    // A route that lets them count.
    assert!(hit(&req(&s, "/genclients/a", &[("cache-control", "max-age=20, min-fresh=40")]).await));
    let before = s.upstream.requests();
    for (path, cc) in [("no-cache", "no-cache"), ("max-age", "max-age=5"), ("min-fresh", "min-fresh=55")] {
        let forwarded = req(&s, &format!("/genclients/{path}"), &[("cache-control", cc)]).await;
        assert_eq!(x_cache(&forwarded), "MISS", "{cc} goes to the backend");
    }
    assert_eq!(s.upstream.requests(), before + 3);
    let cold = req(&s, "/genclients/cold", &[("cache-control", "only-if-cached")]).await;
    assert_eq!(cold.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(s.upstream.requests(), before + 3, "only-if-cached never forwards");
    assert!(hit(&req(&s, "/genclients/a", &[("cache-control", "only-if-cached")]).await));

    req(&s, "/genclients/kept-out", &[("cache-control", "no-store")]).await;
    assert_eq!(x_cache(&req(&s, "/genclients/kept-out", &[]).await), "MISS", "no-store: nothing stored");

    stored(&s.proxy, "clients", 7.0).await;
    s.clock.advance(Duration::from_secs(70));
    let stale = req(&s, "/genclients/a", &[("cache-control", "max-stale=30")]).await;
    assert_eq!(x_cache(&stale), "STALE", "max-stale accepts an entry stale for less");
    assert_eq!(x_cache(&req(&s, "/genclients/b", &[("cache-control", "max-stale")]).await), "MISS");
}

async fn unsafe_requests_invalidate(store: Store) {
    let fresh = Reply::ok().header("cache-control", FRESH);
    let upstream = TestUpstream::new()
        .route(
            "/gen/create",
            Reply::ok()
                .status(201)
                .header("location", "/gen/listed")
                .header("content-location", "http://elsewhere/gen/other"),
        )
        .route("/gen/", fresh);
    let s = setup(store, upstream).await;
    let warm = ["/gen/item", "/gen/fails", "/gen/listed", "/gen/other", "/gen/q?a=1&b=2", "/gen/dot"];
    for path in warm {
        req(&s, path, &[]).await;
    }
    stored(&s.proxy, "origin", warm.len() as f64).await;
    let post = |path: &str| {
        let url = s.proxy.url(path);
        async move { send(Method::POST, &url, &[], Bytes::from_static(b"x")).await }
    };

    let changed = post("/gen/item").await;
    assert_eq!(changed.headers["cache-status"], "sidecache; fwd=bypass; detail=invalidated");
    assert_eq!(x_cache(&req(&s, "/gen/item", &[]).await), "MISS", "a POST the route does not list invalidates");

    s.upstream.set("/gen/fails", Reply::ok().status(500));
    let failed = post("/gen/fails").await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(failed.headers.get("cache-status").is_none());
    s.upstream.set("/gen/fails", Reply::ok());
    assert_eq!(x_cache(&req(&s, "/gen/fails", &[]).await), "HIT", "an error changed nothing");

    post("/gen/create").await;
    assert_eq!(x_cache(&req(&s, "/gen/listed", &[]).await), "MISS", "a same-origin Location");
    assert_eq!(x_cache(&req(&s, "/gen/other", &[]).await), "HIT", "another origin's Content-Location");

    send(Method::DELETE, &s.proxy.url("/gen/q?b=2&a=1"), &[], Bytes::new()).await;
    assert_eq!(x_cache(&req(&s, "/gen/q?a=1&b=2", &[]).await), "MISS", "the target as the route keys it");
    // Another spelling may be another resource on this backend (one that does not decode %2F,
    // or resolve dot segments, answers it elsewhere): it purges nothing, and is never stored.
    let elsewhere = post("/echo/..%2F..%2Fgen/dot").await;
    assert_eq!(elsewhere.status, StatusCode::OK);
    assert!(elsewhere.headers.get("cache-status").is_none());
    post("/gen/x/../dot").await;
    assert_eq!(x_cache(&req(&s, "/gen/dot", &[]).await), "HIT", "no spelling but the stored one purges it");

    let m = metrics(&s.proxy).await;
    let invalidations = metric(&m, r#"sidecache_cache_invalidations_total{route="origin"}"#);
    assert_eq!(invalidations, Some(4.0), "item, create and its Location, q: {m}");
}

/// RFC 850 form of a date, as legacy backends still send.
fn rfc850(t: SystemTime) -> String {
    let imf = httpdate::fmt_http_date(t); // "Sun, 06 Nov 1994 08:49:37 GMT"
    let day = match &imf[..3] {
        "Mon" => "Monday",
        "Tue" => "Tuesday",
        "Wed" => "Wednesday",
        "Thu" => "Thursday",
        "Fri" => "Friday",
        "Sat" => "Saturday",
        _ => "Sunday",
    };
    format!("{day}, {}-{}-{} {}", &imf[5..7], &imf[8..11], &imf[14..16], &imf[17..])
}

async fn fields_are_read_as_the_rfcs_say(store: Store) {
    let in_two_minutes = SystemTime::now() + Duration::from_secs(120);
    let upstream = TestUpstream::new()
        .route("/gen/aged", Reply::ok().header("cache-control", "max-age=60").header("age", "30, 10"))
        .route("/gen/rfc850", Reply::ok().header("expires", &rfc850(in_two_minutes)))
        .route("/gen/invalid-expires", Reply::ok().header("expires", "next week"))
        .route(
            "/gen/conflict",
            Reply::ok().header("cache-control", "max-age=60").header("cache-control", "max-age=600"),
        );
    let s = setup(store, upstream).await;
    req(&s, "/gen/aged", &[]).await;
    req(&s, "/gen/rfc850", &[]).await;
    stored(&s.proxy, "origin", 2.0).await;
    let aged = req(&s, "/gen/aged", &[]).await;
    assert_eq!(aged.headers["age"], "30", "the first member of a list-valued Age");
    assert!(aged.headers["cache-status"].to_str().unwrap().ends_with("ttl=30"));
    assert_eq!(x_cache(&req(&s, "/gen/rfc850", &[]).await), "HIT", "Expires in RFC 850 form");
    for path in ["/gen/invalid-expires", "/gen/conflict"] {
        let (a, b) = (req(&s, path, &[]).await, req(&s, path, &[]).await);
        assert_eq!((x_cache(&b), a.body != b.body), ("MISS", true), "{path}: already expired");
    }
}

/// Two proxies on one Redis.
async fn two_replicas(upstream: &TestUpstream, redis: &TestRedis) -> (TestProxy, TestProxy, sidecache::Clock) {
    let clock = sidecache::Clock::manual();
    let extra = format!(
        "{ROUTES}\n[cache]\nhot_ttl = \"0s\"\n{TARGETED}\n[redis]\nurl = \"{}\"\nop_timeout = \"200ms\"\n",
        redis.url()
    );
    let toml = config_text(upstream.addr, &extra);
    let a = TestProxy::start_with(&toml, &HashMap::new(), clock.clone()).await;
    let b = TestProxy::start_with(&toml, &HashMap::new(), clock.clone()).await;
    wait_for_redis(&a).await;
    wait_for_redis(&b).await;
    (a, b, clock)
}

fn redis_reads(text: &str, op: &str) -> f64 {
    metric(text, &format!(r#"sidecache_redis_op_duration_seconds_count{{client="cache",op="{op}"}}"#)).unwrap_or(0.0)
}

#[tokio::test]
async fn a_varied_path_costs_one_more_round_trip_the_first_time_a_process_meets_it() {
    let redis = TestRedis::start();
    let varied = Reply::ok().header("cache-control", FRESH).header("vary", "Accept-Language");
    let upstream = TestUpstream::new().route("/gen/lang", varied).spawn().await;
    let (a, b, _clock) = two_replicas(&upstream, &redis).await;
    // Replicas serve one Host (their Service's name), whatever port each test proxy has.
    let get_on = |proxy: &TestProxy, lang: &'static str| {
        let url = proxy.url("/gen/lang");
        async move { send(Method::GET, &url, &[("accept-language", lang), ("host", "shop")], Bytes::new()).await }
    };
    let stored_by_a = get_on(&a, "en").await;
    stored(&a, "origin", 1.0).await;

    // The other replica has never seen the path: the first slot holds a marker, so one more read.
    let first = get_on(&b, "en").await;
    assert_eq!((x_cache(&first), &first.body), ("HIT", &stored_by_a.body), "stored by the other replica");
    let m = metrics(&b).await;
    assert_eq!((redis_reads(&m, "hget"), redis_reads(&m, "hmget")), (2.0, 0.0), "{m}");
    // From then on, both slots in one round trip.
    for lang in ["en", "en", "fr"] {
        get_on(&b, lang).await;
    }
    let m = metrics(&b).await;
    assert_eq!((redis_reads(&m, "hget"), redis_reads(&m, "hmget")), (2.0, 3.0), "{m}");
    assert_eq!(upstream.requests(), 2, "en once, fr once");
}

#[tokio::test]
async fn a_path_keeps_at_most_max_variants() {
    let redis = TestRedis::start();
    let varied = Reply::ok().header("cache-control", FRESH).header("vary", "Accept-Language");
    let s = CacheSetup::with(
        ROUTES,
        &format!("[cache]\nhot_ttl = \"0s\"\n[redis]\nurl = \"{}\"\nop_timeout = \"200ms\"\n", redis.url()),
        TestUpstream::new().route("/genfew/x", varied),
        Some(redis),
    )
    .await;
    // max_variants = 3: the marker's slot and two entries.
    for lang in ["a", "b", "c", "d"] {
        req(&s, "/genfew/x", &[("accept-language", lang)]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut m = metrics(&s.proxy).await;
    for _ in 0..100 {
        if counter(&m, "cache_stores", "few", "stored") + counter(&m, "cache_stores", "few", "too_many_variants") >= 4.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        m = metrics(&s.proxy).await;
    }
    assert_eq!(counter(&m, "cache_stores", "few", "stored"), 2.0, "{m}");
    assert_eq!(counter(&m, "cache_stores", "few", "too_many_variants"), 2.0, "{m}");
    assert_eq!(x_cache(&req(&s, "/genfew/x", &[("accept-language", "a")]).await), "HIT");
    assert_eq!(x_cache(&req(&s, "/genfew/x", &[("accept-language", "d")]).await), "MISS");
}

#[tokio::test]
async fn an_unsafe_request_on_one_replica_invalidates_on_the_other() {
    let redis = TestRedis::start();
    let upstream = TestUpstream::new().route("/gen/", Reply::ok().header("cache-control", FRESH)).spawn().await;
    let (a, b, _clock) = two_replicas(&upstream, &redis).await;
    // Replicas serve one Host (their Service's name), whatever port each test proxy has.
    let host = [("host", "shop")];
    send(Method::GET, &a.url("/gen/shared"), &host, Bytes::new()).await;
    stored(&a, "origin", 1.0).await;
    let hit = send(Method::GET, &b.url("/gen/shared"), &host, Bytes::new()).await;
    assert_eq!(x_cache(&hit), "HIT");
    let put = send(Method::PUT, &a.url("/gen/shared"), &host, Bytes::from_static(b"new")).await;
    assert_eq!(put.headers["cache-status"], "sidecache; fwd=bypass; detail=invalidated");
    let after = send(Method::GET, &b.url("/gen/shared"), &host, Bytes::new()).await;
    assert_eq!(x_cache(&after), "MISS", "the other replica no longer serves the old entry");
    assert_ne!(after.body, hit.body);
}

/// A backend on a raw socket that reads a request head and writes `answer(n, head)` for the n-th
/// connection (from 1), its parts 300 ms apart, then closes it; connections are served at once.
async fn raw_backend(answer: fn(usize, &str) -> Vec<String>) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        for n in 1.. {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                for (i, part) in answer(n, &String::from_utf8_lossy(&head)).into_iter().enumerate() {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    if stream.write_all(part.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// Read from `conn` until `end` has been read, at most `limit`.
async fn read_until(conn: &mut tokio::net::TcpStream, end: &[u8], limit: Duration) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let _ = tokio::time::timeout(limit, async {
        while !got.windows(end.len()).any(|w| w == end) {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    got
}

#[tokio::test]
async fn interim_responses_reach_http1_clients_at_once_and_are_never_stored() {
    use tokio::io::AsyncWriteExt;
    // A backend that sends 103 Early Hints, then the final response 300 ms later.
    let (addr, backend) = raw_backend(|n, _| {
        let body = format!("final #{n}");
        vec![
            "HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\nConnection: x-secret\r\nX-Secret: 1\r\n\r\n".into(),
            format!(
                "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        ]
    })
    .await;
    let proxy = TestProxy::start(&config_text(addr, ROUTES)).await;
    let at = proxy.url("").trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut conn = tokio::net::TcpStream::connect(&at).await.unwrap();
    conn.write_all(b"GET /gen/hints HTTP/1.1\r\nHost: shop\r\n\r\n").await.unwrap();
    let hints = String::from_utf8(read_until(&mut conn, b"\r\n\r\n", Duration::from_millis(250)).await).unwrap();
    assert_eq!(
        hints.to_ascii_lowercase(),
        "http/1.1 103 early hints\r\nlink: </style.css>; rel=preload\r\n\r\n",
        "passed on before the final response, without its hop-by-hop fields"
    );
    let rest = String::from_utf8(read_until(&mut conn, b"final #1", Duration::from_secs(5)).await).unwrap();
    assert!(rest.starts_with("HTTP/1.1 200 OK\r\n"), "{rest}");
    assert!(rest.contains("cache-status: sidecache; fwd=miss; stored"), "{rest}");
    stored(&proxy, "origin", 1.0).await;
    conn.write_all(b"GET /gen/hints HTTP/1.1\r\nHost: shop\r\n\r\n").await.unwrap();
    let hit = String::from_utf8(read_until(&mut conn, b"final #1", Duration::from_secs(5)).await).unwrap();
    assert!(hit.starts_with("HTTP/1.1 200 OK\r\n"), "a hit has no interim response: {hit}");
    assert!(hit.contains("x-cache: HIT") && !hit.to_ascii_lowercase().contains("link:"), "{hit}");
    // HTTP/1.0 clients never get an interim response (RFC 9110 15.2).
    let mut old = tokio::net::TcpStream::connect(&at).await.unwrap();
    old.write_all(b"GET /gen/other HTTP/1.0\r\nHost: shop\r\n\r\n").await.unwrap();
    let answer = String::from_utf8(read_until(&mut old, b"final #2", Duration::from_secs(5)).await).unwrap();
    assert!(answer.starts_with("HTTP/1.0 200 OK\r\n"), "{answer}");
    backend.abort();
}

async fn no_value_reads_as_an_absent_field(store: Store) {
    let varied = Reply::ok().header("cache-control", FRESH).header("vary", "X-Api-Version");
    let s = setup(store, TestUpstream::new().route("/gen/v", varied)).await;
    let crafted = req(&s, "/gen/v", &[("x-api-version", "absent")]).await;
    assert_eq!(crafted.headers["cache-status"], "sidecache; fwd=miss; stored");
    stored(&s.proxy, "origin", 1.0).await;
    let other = req(&s, "/gen/v", &[]).await;
    assert_eq!(x_cache(&other), "MISS", "a request without the field must not get the crafted value's answer");
    assert_ne!(other.body, crafted.body);
}

#[tokio::test]
async fn only_list_fields_are_normalised() {
    let varied = Reply::ok().header("cache-control", FRESH).header("vary", "User-Agent");
    let s = setup(Store::Embedded, TestUpstream::new().route("/gen/ua", varied)).await;
    let real = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0";
    let tight = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML,like Gecko) Chrome/126.0";
    req(&s, "/gen/ua", &[("user-agent", tight)]).await;
    req(&s, "/gen/ua", &[("user-agent", "Mozilla/5.0 (KHTML"), ("user-agent", "like Gecko) Chrome/126.0")]).await;
    stored(&s.proxy, "origin", 2.0).await;
    let browser = req(&s, "/gen/ua", &[("user-agent", real)]).await;
    assert_eq!(x_cache(&browser), "MISS", "another User-Agent value, however alike");
    assert_eq!(
        x_cache(&req(&s, "/gen/ua", &[("user-agent", "Mozilla/5.0 (KHTML, like Gecko) Chrome/126.0")]).await),
        "MISS"
    );
    assert_eq!(x_cache(&req(&s, "/gen/ua", &[("user-agent", tight)]).await), "HIT");
}

#[tokio::test]
async fn the_route_vary_cannot_forge_an_absent_field() {
    let routes = "[[route]]\nname = \"tenant\"\npath = \"/gen/*\"\ncache = { vary = [\"x-tenant\"] }\n";
    let upstream = TestUpstream::new().route("/gen/t", Reply::ok().header("cache-control", FRESH));
    let s = CacheSetup::start(routes, upstream, Store::Embedded, "").await;
    let crafted = req(&s, "/gen/t", &[("x-tenant", "absent"), ("x-tenant", "")]).await;
    stored(&s.proxy, "tenant", 1.0).await;
    let other = req(&s, "/gen/t", &[]).await;
    assert_eq!(x_cache(&other), "MISS");
    assert_ne!(other.body, crafted.body);
}

#[tokio::test]
async fn one_clients_429_is_not_stored_for_everyone() {
    // A backend whose middleware stamps every answer cacheable, and whose limiter answers one
    // noisy client 429 (a WAF's 403 likewise).
    let limited = Reply::ok().status(429).header("cache-control", "public, max-age=60");
    let s = setup(Store::Embedded, TestUpstream::new().route("/gen/feed", limited)).await;
    assert_eq!(req(&s, "/gen/feed", &[]).await.status, StatusCode::TOO_MANY_REQUESTS);
    s.upstream.set("/gen/feed", Reply::ok().header("cache-control", "public, max-age=60"));
    assert_eq!(req(&s, "/gen/feed", &[]).await.status, StatusCode::OK);
    let lm = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(100_000));
    let bad = Reply::ok().status(400).header("cache-control", "public").header("last-modified", &lm);
    s.upstream.set("/genheur/bad", bad);
    req(&s, "/genheur/bad", &[]).await;
    assert_eq!(x_cache(&req(&s, "/genheur/bad", &[]).await), "MISS", "nor by heuristic freshness");
}

#[tokio::test]
async fn an_embedded_marker_lives_as_long_as_its_longest_variant() {
    let long = Reply::ok().header("cache-control", "max-age=600").header("vary", "Accept-Language");
    let s = setup(Store::Embedded, TestUpstream::new().route("/gen/m", long)).await;
    req(&s, "/gen/m", &[("accept-language", "en")]).await;
    stored(&s.proxy, "origin", 1.0).await;
    s.upstream.set("/gen/m", Reply::ok().header("cache-control", "max-age=1").header("vary", "Accept-Language"));
    req(&s, "/gen/m", &[("accept-language", "fr")]).await;
    stored(&s.proxy, "origin", 2.0).await;
    // The embedded store expires entries on real time (its keep-for), not on the test's clock.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(x_cache(&req(&s, "/gen/m", &[("accept-language", "en")]).await), "HIT");
}

#[tokio::test]
async fn a_clients_no_store_stores_nothing_even_on_revalidation() {
    let reply = Reply::ok().header("cache-control", FRESH).header("etag", "\"e1\"").not_modified_if("\"e1\"", &[]);
    let s = setup(Store::Embedded, TestUpstream::new().route("/genclients/n", reply)).await;
    req(&s, "/genclients/n", &[]).await;
    stored(&s.proxy, "clients", 1.0).await;
    let revalidated = req(&s, "/genclients/n", &[("cache-control", "no-cache, no-store")]).await;
    assert_eq!(x_cache(&revalidated), "REVALIDATED");
    assert_eq!(s.upstream.seen("/genclients/n")[1]["if-none-match"], "\"e1\"");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = metrics(&s.proxy).await;
    assert_eq!(counter(&m, "cache_stores", "clients", "stored"), 1.0, "{m}");
}

#[tokio::test]
async fn an_authority_form_request_with_a_relative_location_is_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let created = |_, _: &str| {
        vec!["HTTP/1.1 201 Created\r\nLocation: item/7\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()]
    };
    let (backend, task) = raw_backend(created).await;
    let proxy = TestProxy::start(&config_text(backend, ROUTES)).await;
    let addr = proxy.url("").trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let raw = b"POST shop.example:80 HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
    conn.write_all(raw).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await;
    assert!(answer.starts_with(b"HTTP/1.1 201"), "{:?}", String::from_utf8_lossy(&answer));
    task.abort();
}

/// A client that leads the cache's fetch of a slow resource and leaves: its connection is gone,
/// and so is its place in `max_connections`, while the fetch goes on for others.
#[tokio::test]
async fn a_client_gone_frees_its_connection_slot_while_its_fetch_goes_on() {
    use tokio::io::AsyncWriteExt;
    let (addr, backend) = raw_backend(|_, head| {
        let ok = "HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
        // The slow fetch answers 3 s later, the others at once.
        let wait = if head.starts_with("GET /gen/slow") { 10 } else { 0 };
        std::iter::repeat_n(String::new(), wait).chain([ok.to_string()]).collect()
    })
    .await;
    let proxy = TestProxy::start(&config_text(addr, &format!("max_connections = 1\n{ROUTES}"))).await;
    let at = proxy.url("").trim_start_matches("http://").trim_end_matches('/').to_string();
    let mut first = tokio::net::TcpStream::connect(&at).await.unwrap();
    first.write_all(b"GET /gen/slow HTTP/1.1\r\nHost: shop\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = tokio::time::Instant::now();
    let mut second = tokio::net::TcpStream::connect(&at).await.unwrap();
    second.write_all(b"GET /other HTTP/1.1\r\nHost: shop\r\n\r\n").await.unwrap();
    let got = read_until(&mut second, b"ok", Duration::from_secs(10)).await;
    assert!(got.starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&got));
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(1), "the second client waited {waited:?} for a slot no connection held");
    backend.abort();
}
