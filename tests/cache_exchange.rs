//! The cache phase as a hostile client meets it: what it can make the cache store for everyone,
//! what it can make it skip, and the seams between lookup, forward and answer (an unsolicited
//! 304, a doubled `Via`, lookups left uncounted, a slow client holding everyone else), on the
//! embedded store and on a redis-server of the test's own. Time moves by a manual clock, not by
//! sleeping.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUTES: &str = r#"
[[route]]
name = "plain"
path = "/gen/plain/*"
cache = { ttl = "60s" }
[[route]]
name = "limited"
path = "/gen/limited/*"
cache = { ttl = "60s", query = ["limit"] }
[[route]]
name = "swr"
path = "/gen/swr/*"
cache = { ttl = "10s", stale_while_revalidate = "60s" }
[[route]]
name = "brief"
path = "/gen/brief/*"
cache = { ttl = "10s", stale_if_error = "60s" }
[[route]]
name = "origin"
path = "/gen/origin/*"
cache = {}
[[route]]
name = "big"
path = "/gen/big/*"
cache = { ttl = "60s", max_body = 4194304 }
"#;

type Setup = CacheSetup;

async fn setup(store: Store, upstream: TestUpstreamBuilder, cache: &str) -> Setup {
    CacheSetup::start(ROUTES, upstream, store, cache).await
}

/// Runs each scenario on the embedded store and on a redis-server of its own.
macro_rules! on_both_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test]
            async fn embedded() {
                super::$name(super::Store::Embedded).await
            }

            #[tokio::test]
            async fn redis() {
                super::$name(super::Store::Redis).await
            }
        }
    )*};
}

on_both_stores!(
    the_host_is_part_of_the_key,
    a_background_refresh_is_prepared_like_every_other_upstream_request,
    requests_with_a_body_bypass_the_cache,
    kept_query_parameters_cannot_be_cloaked,
    a_304_to_our_own_revalidation_is_never_passed_on,
    one_via_on_every_answer,
    every_cacheable_request_counts_one_lookup,
    a_huge_max_age_is_capped_not_a_panic,
    range_and_conditional_requests_never_create_an_entry,
    a_slow_client_does_not_hold_the_requests_that_wait_for_its_fetch,
    followers_wait_at_most_the_lock_timeout,
    forwarding_claims_reach_the_backend_only_from_a_trusted_proxy_and_are_keyed,
    a_kept_name_in_another_case_bypasses_and_an_unreadable_cache_control_is_not_stored,
    a_leader_whose_client_leaves_still_answers_the_followers,
    a_request_whose_client_leaves_is_still_counted,
    a_refresh_sends_the_host_the_entry_was_keyed_on,
    a_method_override_bypasses_the_cache,
);

async fn req(s: &Setup, path: &str, headers: &[(&str, &str)]) -> Answer {
    send(Method::GET, &s.proxy.url(path), headers, Bytes::new()).await
}

fn x_cache(a: &Answer) -> &str {
    a.headers.get("x-cache").map_or("-", |v| v.to_str().unwrap())
}

async fn lookups(s: &Setup, route: &str, result: &str) -> f64 {
    let text = get(&s.proxy.admin_url("/metrics")).await.text();
    metric(&text, &format!(r#"sidecache_cache_lookups_total{{route="{route}",result="{result}"}}"#)).unwrap_or(0.0)
}

async fn the_host_is_part_of_the_key(store: Store) {
    let s = setup(store, TestUpstream::new(), "").await;
    let evil = req(&s, "/gen/plain/p1", &[("host", "evil.example")]).await;
    stored(&s.proxy, "plain", 1.0).await;
    let shop = req(&s, "/gen/plain/p1", &[("host", "shop.example")]).await;
    assert_eq!(x_cache(&shop), "MISS", "another host's answer is not served");
    assert_ne!(shop.body, evil.body);
    stored(&s.proxy, "plain", 2.0).await;
    let again = req(&s, "/gen/plain/p1", &[("host", "SHOP.example:80")]).await;
    assert_eq!((x_cache(&again), &again.body), ("HIT", &shop.body), "lower case, default port dropped");
    let forwarded = req(&s, "/gen/plain/p1", &[("host", "shop.example"), ("x-forwarded-host", "evil.example")]).await;
    assert_eq!(x_cache(&forwarded), "HIT", "an untrusted peer's X-Forwarded-Host is replaced, not keyed");
    assert_eq!(s.upstream.requests(), 2);
}

#[tokio::test]
async fn a_trusted_proxys_forwarded_host_and_proto_are_part_of_the_key() {
    let upstream = TestUpstream::new().spawn().await;
    let toml = config_text(upstream.addr, &format!("trusted_proxies = [\"127.0.0.1\"]\n{ROUTES}"));
    let proxy = TestProxy::start(&toml).await;
    let ask = |xfh: &'static str, xfp: &'static str| {
        let url = proxy.url("/gen/plain/t");
        async move {
            let headers = [("host", "internal"), ("x-forwarded-host", xfh), ("x-forwarded-proto", xfp)];
            send(Method::GET, &url, &headers, Bytes::new()).await
        }
    };
    let first = ask("shop.example", "https").await;
    stored(&proxy, "plain", 1.0).await;
    assert_eq!(ask("shop.example", "https").await.body, first.body);
    assert_eq!(ask("evil.example", "https").await.headers["x-cache"], "MISS");
    assert_eq!(ask("shop.example", "http").await.headers["x-cache"], "MISS");
    // The backend would build https://shop.example:80/ and HTTPS links from these: not the same.
    assert_eq!(ask("shop.example:80", "https").await.headers["x-cache"], "MISS");
    assert_eq!(ask("shop.example", "HTTPS").await.headers["x-cache"], "MISS");
    assert_eq!(ask("shop.example:443", "https").await.headers["x-cache"], "HIT", "443 is https's own port");
    assert_eq!(upstream.requests(), 5);
}

/// A raw HTTP/1 exchange: the whole answer, the connection closed by the request.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer)).await.unwrap().unwrap();
    answer
}

async fn a_refresh_sends_the_host_the_entry_was_keyed_on(store: Store) {
    let s = setup(store, TestUpstream::new(), "").await;
    // HTTP/1.0 without Host: keyed without one, and the backend gets the client's default.
    raw(s.proxy.addr, "GET /gen/swr/h HTTP/1.0\r\n\r\n").await;
    stored(&s.proxy, "swr", 1.0).await;
    s.clock.advance(Duration::from_secs(11));
    // The same key again (Host can no longer be taken away as hop-by-hop, nor an absolute
    // target's authority be replaced by it): the refresh still asks as the entry was keyed.
    let stale = raw(s.proxy.addr, "GET /gen/swr/h HTTP/1.0\r\nConnection: close\r\n\r\n").await;
    assert!(stale.to_ascii_lowercase().contains("x-cache: stale"), "{stale}");
    stored(&s.proxy, "swr", 2.0).await;
    let seen = s.upstream.seen("/gen/swr/h");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].get("host"), seen[0].get("host"), "the refresh asked as the entry was keyed");
    assert!(!seen[1].contains_key("x-forwarded-host"), "{:?}", seen[1]);
}

/// On Redis a path keeps at most 64 variants; a new one never displaces a live one.
#[tokio::test]
async fn invented_hosts_cannot_evict_a_popular_entry() {
    let s = setup(Store::Redis, TestUpstream::new(), "").await;
    let shop = [("host", "shop.example")];
    let popular = req(&s, "/gen/plain/popular", &shop).await;
    stored(&s.proxy, "plain", 1.0).await;
    for i in 0..70 {
        let host = format!("x{i}.invalid");
        req(&s, "/gen/plain/popular", &[("host", host.as_str())]).await;
    }
    // 64 variants fit (the popular one and 63 others); the other 7 were refused.
    let series = r#"sidecache_cache_stores_total{route="plain",result="too_many_variants"}"#;
    let mut refused = None;
    for _ in 0..200 {
        refused = metric(&get(&s.proxy.admin_url("/metrics")).await.text(), series);
        if refused >= Some(7.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(refused, Some(7.0));
    let again = req(&s, "/gen/plain/popular", &shop).await;
    assert_eq!((x_cache(&again), &again.body), ("HIT", &popular.body), "the popular variant stays");
}

async fn a_background_refresh_is_prepared_like_every_other_upstream_request(store: Store) {
    let s = setup(store, TestUpstream::new(), "").await;
    let spoofed = [
        ("host", "shop.example"),
        ("x-forwarded-host", "evil.example"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-for", "6.6.6.6"),
    ];
    req(&s, "/gen/swr/r", &spoofed).await;
    stored(&s.proxy, "swr", 1.0).await;
    s.clock.advance(Duration::from_secs(11));
    let stale = req(&s, "/gen/swr/r", &spoofed).await;
    assert_eq!(x_cache(&stale), "STALE");
    stored(&s.proxy, "swr", 2.0).await;
    let seen = s.upstream.seen("/gen/swr/r");
    assert_eq!(seen.len(), 2, "the request and one refresh");
    for (i, headers) in seen.iter().enumerate() {
        assert_eq!(headers["x-forwarded-host"], "shop.example", "request {i}: an untrusted peer's value replaced");
        assert_eq!(headers["x-forwarded-proto"], "http", "request {i}");
        assert_eq!(headers["x-forwarded-for"], "6.6.6.6, 127.0.0.1", "request {i}: the peer appended");
        assert_eq!(headers.get_all("via").iter().count(), 1, "request {i}: one Via");
    }
}

async fn requests_with_a_body_bypass_the_cache(store: Store) {
    let s = setup(store, TestUpstream::new(), "").await;
    for _ in 0..2 {
        let a = send(Method::GET, &s.proxy.url("/gen/plain/b"), &[], "smuggled").await;
        assert_eq!(x_cache(&a), "BYPASS");
    }
    // A chunked body, sent by hand: HTTP clients will not put one on a GET.
    let mut raw = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    raw.write_all(b"GET /gen/plain/b HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nchunk\r\n0\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).await.unwrap();
    assert!(answer.to_ascii_lowercase().contains("x-cache: bypass"), "a chunked body too: {answer}");
    let plain = req(&s, "/gen/plain/b", &[]).await;
    assert_eq!(x_cache(&plain), "MISS", "nothing was stored from a request with a body");
    assert_eq!(s.upstream.requests(), 4);
    assert_eq!(lookups(&s, "plain", "bypass").await, 3.0);
}

async fn kept_query_parameters_cannot_be_cloaked(store: Store) {
    let s = setup(store, TestUpstream::new(), "").await;
    let cloaked = req(&s, "/gen/limited/m?%6cimit=1000", &[]).await;
    assert_eq!(x_cache(&cloaked), "MISS");
    stored(&s.proxy, "limited", 1.0).await;
    let plain = req(&s, "/gen/limited/m", &[]).await;
    assert_eq!(x_cache(&plain), "MISS", "the encoded name was keyed, not dropped");
    let same = req(&s, "/gen/limited/m?limit=1000", &[]).await;
    assert_eq!((x_cache(&same), &same.body), ("HIT", &cloaked.body), "%6cimit is limit");

    let semicolon = req(&s, "/gen/limited/n?utm=1;limit=999", &[]).await;
    assert_eq!(x_cache(&semicolon), "BYPASS", "a query the key cannot represent");
    let after = req(&s, "/gen/limited/n", &[]).await;
    assert_eq!(x_cache(&after), "MISS");
    assert!(after.text().starts_with("/gen/limited/n #"), "{}", after.text());

    // Names that backends read as `limit` (PHP, qs and Rack arrays, PHP's leading space and NUL,
    // case-insensitive frameworks) are not silently dropped from the key.
    for cloak in
        ["limit[]=100000", "limit%5B0%5D=100000", "limit[x]=100000", "+limit=100000", "limit%00=100000", "LIMIT=1"]
    {
        let attacker = req(&s, &format!("/gen/limited/o?{cloak}"), &[]).await;
        assert_eq!(x_cache(&attacker), "BYPASS", "{cloak}");
    }
    assert_eq!(x_cache(&req(&s, "/gen/limited/o", &[]).await), "MISS", "nothing was stored under the plain path");
}

async fn a_304_to_our_own_revalidation_is_never_passed_on(store: Store) {
    let reply = Reply::ok().header("etag", "\"v1\"").not_modified_if("\"v1\"", &[("cache-control", "private")]);
    let s = setup(store, TestUpstream::new().route("/gen/brief/", reply), "").await;
    let first = req(&s, "/gen/brief/r", &[]).await;
    stored(&s.proxy, "brief", 1.0).await;
    s.clock.advance(Duration::from_secs(11));
    for i in 0..2 {
        let again = req(&s, "/gen/brief/r", &[]).await;
        assert_eq!(again.status, StatusCode::OK, "request {i}: the client asked for nothing conditional");
        assert_eq!(again.body, first.body, "request {i}: answered from the stored response");
        assert_eq!(x_cache(&again), "REVALIDATED");
        assert_eq!(again.headers["cache-control"], "private", "updated by the 304's headers");
    }
    assert_eq!(s.upstream.seen("/gen/brief/r").len(), 3, "the private 304 was not stored: revalidated again");
    assert_eq!(lookups(&s, "brief", "revalidated").await, 2.0);
}

async fn one_via_on_every_answer(store: Store) {
    let reply = Reply::ok().header("etag", "\"v1\"").not_modified_if("\"v1\"", &[]);
    let s = setup(store, TestUpstream::new().route("/gen/brief/", reply), "").await;
    let mut answers = vec![req(&s, "/gen/brief/v", &[]).await];
    stored(&s.proxy, "brief", 1.0).await;
    answers.push(req(&s, "/gen/brief/v", &[]).await);
    s.clock.advance(Duration::from_secs(11));
    answers.push(req(&s, "/gen/brief/v", &[]).await);
    answers.push(req(&s, "/gen/plain/nothing", &[("cookie", "a=1")]).await);
    let outcomes: Vec<&str> = answers.iter().map(x_cache).collect();
    assert_eq!(outcomes, ["MISS", "HIT", "REVALIDATED", "BYPASS"]);
    for a in &answers {
        let via: Vec<_> = a.headers.get_all("via").iter().collect();
        assert_eq!(via, ["1.1 sidecache"], "{:?}", x_cache(a));
    }
}

async fn every_cacheable_request_counts_one_lookup(store: Store) {
    let s = setup(store, TestUpstream::new(), "").await;
    req(&s, "/gen/brief/c", &[]).await;
    stored(&s.proxy, "brief", 1.0).await;
    s.clock.advance(Duration::from_secs(11));
    s.upstream.set("/gen/brief/c", Reply::ok().status(503));
    assert_eq!(x_cache(&req(&s, "/gen/brief/c", &[]).await), "STALE", "inside stale_if_error");
    s.clock.advance(Duration::from_secs(120));
    let failed = req(&s, "/gen/brief/c", &[]).await;
    assert_eq!((failed.status, x_cache(&failed)), (StatusCode::SERVICE_UNAVAILABLE, "MISS"), "outside it");
    let counted: f64 = futures_util::future::join_all(
        ["hit", "collapsed", "revalidated", "stale", "stale_if_error", "miss", "error", "bypass"]
            .map(|r| lookups(&s, "brief", r)),
    )
    .await
    .into_iter()
    .sum();
    assert_eq!(counted, 3.0, "three requests, three lookups");
    assert_eq!(lookups(&s, "brief", "miss").await, 2.0);
}

async fn a_huge_max_age_is_capped_not_a_panic(store: Store) {
    let reply = Reply::ok().header("cache-control", "max-age=18446744073709551615").header("etag", "\"e\"");
    let upstream = TestUpstream::new()
        .route("/gen/origin/", reply)
        .route("/gen/plain/", Reply::ok().header("age", "99999999999999999999"));
    let s = setup(store, upstream, "").await;
    assert_eq!(req(&s, "/gen/origin/h", &[]).await.status, StatusCode::OK);
    stored(&s.proxy, "origin", 1.0).await;
    let hit = req(&s, "/gen/origin/h", &[]).await;
    assert_eq!(x_cache(&hit), "HIT");
    assert_eq!(req(&s, "/gen/plain/age", &[]).await.status, StatusCode::OK, "a huge Age is a stale arrival");
    assert_eq!(req(&s, "/gen/plain/age", &[]).await.status, StatusCode::OK);
}

async fn range_and_conditional_requests_never_create_an_entry(store: Store) {
    let s = setup(store, TestUpstream::new().route("/gen/plain/", Reply::ok().header("etag", "\"e\"")), "").await;
    for (i, header) in
        [("range", "bytes=0-3"), ("if-none-match", "\"other\""), ("if-modified-since", "Mon, 01 Jan 2024 00:00:00 GMT")]
            .into_iter()
            .enumerate()
    {
        let path = format!("/gen/plain/r{i}");
        assert_eq!(x_cache(&req(&s, &path, &[header]).await), "MISS");
        assert_eq!(x_cache(&req(&s, &path, &[]).await), "MISS", "{header:?} stored nothing");
    }
    stored(&s.proxy, "plain", 3.0).await;
    assert_eq!(x_cache(&req(&s, "/gen/plain/r0", &[("range", "bytes=0-3")]).await), "HIT", "served from an entry");
}

async fn a_slow_client_does_not_hold_the_requests_that_wait_for_its_fetch(store: Store) {
    let reply = Reply::ok().delay(Duration::from_millis(300)).size(3 << 20);
    let s = setup(store, TestUpstream::new().route("/gen/big/", reply), "").await;
    // The leader's client sends its request and never reads: 3 MiB cannot fit the socket buffers.
    let mut leader = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    leader.write_all(b"GET /gen/big/x HTTP/1.1\r\nhost: shop\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = tokio::time::Instant::now();
    let followers = (0..4).map(|_| req(&s, "/gen/big/x", &[("host", "shop")]));
    for a in futures_util::future::join_all(followers).await {
        assert_eq!((a.status, a.body.len()), (StatusCode::OK, 3 << 20));
        assert_eq!(a.headers["cache-status"], "sidecache; fwd=miss; collapsed");
    }
    assert!(started.elapsed() < Duration::from_secs(3), "followers waited {:?}", started.elapsed());
    assert_eq!(s.upstream.requests(), 1);
    let mut head = [0u8; 12];
    leader.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
}

async fn followers_wait_at_most_the_lock_timeout(store: Store) {
    let reply = Reply::ok().delay(Duration::from_millis(1500));
    let s = setup(store, TestUpstream::new().route("/gen/plain/", reply), "lock_timeout = \"300ms\"").await;
    let url = s.proxy.url("/gen/plain/l");
    let leader = tokio::spawn(async move { send(Method::GET, &url, &[], Bytes::new()).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = tokio::time::Instant::now();
    let follower = req(&s, "/gen/plain/l", &[]).await;
    assert_eq!(follower.status, StatusCode::OK);
    let waited = started.elapsed();
    // Following the leader would answer at 1.4 s; 0.3 s of waiting plus its own 1.5 s fetch is 1.8 s.
    assert!(waited >= Duration::from_millis(1750) && waited < Duration::from_millis(2700), "{waited:?}");
    assert_eq!(x_cache(&follower), "MISS", "forwarded on its own after the lock timeout");
    assert_eq!(leader.await.unwrap().status, StatusCode::OK);
    assert_eq!(s.upstream.requests(), 2);
}

async fn forwarding_claims_reach_the_backend_only_from_a_trusted_proxy_and_are_keyed(store: Store) {
    let claims = [
        ("forwarded", "host=evil.example;proto=https"),
        ("x-forwarded-port", "6666"),
        ("x-forwarded-prefix", "//evil.example"),
        ("x-forwarded-scheme", "https"),
        ("x-original-url", "/admin"),
        ("x-real-ip", "6.6.6.6"),
        ("x-scheme", "https"),
        ("x-proxied-https", "on"),
        ("x_forwarded_host", "evil.example"),
    ];
    let s = setup(store, TestUpstream::new(), "").await;
    for (name, value) in claims {
        let path = format!("/gen/plain/claim-{name}");
        req(&s, &path, &[("host", "shop.example"), (name, value)]).await;
        let seen = s.upstream.seen(&path);
        assert!(!seen[0].contains_key(name), "{name} from an untrusted client reached the backend");
    }

    // Behind a trusted proxy they are kept, and an answer made for one is not served for another.
    let upstream = TestUpstream::new().spawn().await;
    let toml = config_text(upstream.addr, &format!("trusted_proxies = [\"127.0.0.1\"]\n{ROUTES}"));
    let proxy = TestProxy::start(&toml).await;
    let url = proxy.url("/gen/plain/trusted");
    let ask = |forwarded: &'static str| {
        let url = url.clone();
        async move { send(Method::GET, &url, &[("host", "shop"), ("forwarded", forwarded)], Bytes::new()).await }
    };
    ask("host=shop.example").await;
    stored(&proxy, "plain", 1.0).await;
    assert_eq!(ask("host=shop.example").await.headers["x-cache"], "HIT");
    assert_eq!(ask("host=evil.example").await.headers["x-cache"], "MISS");
    assert_eq!(upstream.seen("/gen/plain/trusted")[1]["forwarded"], "host=evil.example");
}

async fn a_method_override_bypasses_the_cache(store: Store) {
    let s = setup(store, TestUpstream::new(), "").await;
    for name in ["x-http-method-override", "x-http-method", "x-method-override"] {
        let a = req(&s, "/gen/plain/override", &[(name, "DELETE")]).await;
        assert_eq!(x_cache(&a), "BYPASS", "{name}");
    }
    assert_eq!(x_cache(&req(&s, "/gen/plain/override", &[]).await), "MISS", "nothing stored from them");
}

async fn a_kept_name_in_another_case_bypasses_and_an_unreadable_cache_control_is_not_stored(store: Store) {
    let s = setup(
        store,
        TestUpstream::new().route("/gen/plain/odd", Reply::ok().header("cache-control", "private, x=\"café\"")),
        "",
    )
    .await;
    assert_eq!(x_cache(&req(&s, "/gen/limited/m?LIMIT=100000", &[]).await), "BYPASS");
    assert_eq!(x_cache(&req(&s, "/gen/limited/m", &[]).await), "MISS", "nothing stored under the plain path");
    let first = req(&s, "/gen/plain/odd", &[]).await;
    let second = req(&s, "/gen/plain/odd", &[]).await;
    assert_eq!(x_cache(&second), "MISS", "a Cache-Control that cannot be read is read as no-store");
    assert_ne!(first.body, second.body);
}

async fn a_leader_whose_client_leaves_still_answers_the_followers(store: Store) {
    let s =
        setup(store, TestUpstream::new().route("/gen/plain/", Reply::ok().delay(Duration::from_millis(500))), "").await;
    let mut leader = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
    leader.write_all(b"GET /gen/plain/k HTTP/1.1\r\nhost: shop\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let url = s.proxy.url("/gen/plain/k");
    let followers = tokio::spawn(async move {
        futures_util::future::join_all((0..8).map(|_| send(Method::GET, &url, &[("host", "shop")], Bytes::new()))).await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(leader);
    for a in followers.await.unwrap() {
        assert_eq!(a.headers["cache-status"], "sidecache; fwd=miss; collapsed");
    }
    assert_eq!(s.upstream.requests(), 1, "the fetch went on without its client");
    stored(&s.proxy, "plain", 1.0).await;
}

async fn a_request_whose_client_leaves_is_still_counted(store: Store) {
    let s =
        setup(store, TestUpstream::new().route("/gen/plain/", Reply::ok().delay(Duration::from_millis(600))), "").await;
    let url = s.proxy.url("/gen/plain/c");
    let leader = tokio::spawn(async move { send(Method::GET, &url, &[], Bytes::new()).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..3 {
        let mut follower = tokio::net::TcpStream::connect(s.proxy.addr).await.unwrap();
        let head = format!("GET /gen/plain/c HTTP/1.1\r\nhost: {}\r\n\r\n", s.proxy.addr);
        follower.write_all(head.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    leader.await.unwrap();
    let mut counted = 0.0;
    for _ in 0..100 {
        counted = lookups(&s, "plain", "miss").await + lookups(&s, "plain", "collapsed").await;
        if counted >= 4.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(counted, 4.0, "four cacheable requests, four lookups");
}
