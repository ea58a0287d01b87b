//! Rate limits through the real proxy, against a redis-server of the test's own (or none):
//! exact shared buckets across two proxy processes, refill, bucket keys, `X-Forwarded-For`
//! spoofing, the 429 and its headers, NOSCRIPT recovery, Redis killed or hung (fail open, or the
//! in-process fallback), and the in-process limiter without Redis.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::redis::TestRedis;
use support::*;
use tokio::time::Instant;

/// A `[redis]` table with the test budgets. Tests that count admissions wait long for Redis: on
/// a loaded 2-core machine a 50 ms budget sometimes runs out, and a limiter that fails open
/// admits more than the bucket holds. Tests that stop Redis measure the budget, and keep it short.
fn redis_table(url: &str, op_timeout: &str) -> String {
    format!(
        "[redis]\nurl = \"{url}\"\nop_timeout = \"{op_timeout}\"\nbreaker_failures = 3\nbreaker_cooldown = \"300ms\"\n"
    )
}

/// The budget of tests that count admissions.
const PATIENT: &str = "1s";
/// The budget of tests that stop Redis.
const BRISK: &str = "50ms";

/// One limited route on `/gen/*` (plus an unlimited rest).
fn limited(rate_limit: &str) -> String {
    format!("[[route]]\nname = \"limited\"\npath = \"/gen/*\"\nrate_limit = {{ {rate_limit} }}\n")
}

async fn start(upstream: &TestUpstream, server: &str, rest: &str, redis: Option<&TestRedis>) -> TestProxy {
    start_budget(upstream, server, rest, redis, PATIENT).await
}

/// [`start`] with the short Redis budget, for tests that stop Redis.
async fn start_brisk(upstream: &TestUpstream, rest: &str, redis: &TestRedis) -> TestProxy {
    start_budget(upstream, "", rest, Some(redis), BRISK).await
}

async fn start_budget(
    upstream: &TestUpstream,
    server: &str,
    rest: &str,
    redis: Option<&TestRedis>,
    op_timeout: &str,
) -> TestProxy {
    let rest = match redis {
        Some(r) => format!("{rest}\n{}", redis_table(&r.url(), op_timeout)),
        None => rest.to_string(),
    };
    let proxy = TestProxy::start(&config_full(upstream.addr, server, "", &rest)).await;
    if redis.is_some() {
        until_redis_ready(&proxy.admin_url("")).await;
    }
    proxy
}

async fn get_with(url: &str, headers: &[(&str, &str)]) -> Answer {
    send(Method::GET, url, headers, Bytes::new()).await
}

/// Send `n` GETs one after another; how many were allowed (200) and limited (429).
async fn count(url: &str, headers: &[(&str, &str)], n: usize) -> (usize, usize) {
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..n {
        let a = get_with(url, headers).await;
        match a.status {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => limited += 1,
            other => panic!("unexpected {other}: {}", a.text()),
        }
    }
    (ok, limited)
}

async fn metrics(proxy: &TestProxy) -> String {
    get(&proxy.admin_url("/metrics")).await.text()
}

fn checks(text: &str, result: &str, backend: &str) -> f64 {
    let series =
        format!(r#"sidecache_ratelimit_checks_total{{route="limited",result="{result}",backend="{backend}"}}"#);
    metric(text, &series).unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// The seeds' acceptance check: 100 requests per 60 s, 101 rapid requests from one client.
async fn hundred_per_minute(redis: Option<&TestRedis>) {
    let upstream = TestUpstream::spawn().await;
    let proxy = start(&upstream, "", &limited(r#"burst = 100, rate = "100/60s""#), redis).await;
    let (ok, limited) = count(&proxy.url("/gen/a"), &[], 101).await;
    assert_eq!((ok, limited), (100, 1));
    assert_eq!(upstream.requests(), 100, "the 429 never reached the upstream");
}

#[tokio::test]
async fn acceptance_100_per_minute_then_429_on_redis() {
    let redis = TestRedis::start();
    hundred_per_minute(Some(&redis)).await;
}

#[tokio::test]
async fn acceptance_100_per_minute_then_429_in_process() {
    hundred_per_minute(None).await;
}

#[tokio::test]
async fn headers_and_body_of_allowed_and_limited_responses() {
    let redis = TestRedis::start();
    let upstream = TestUpstream::spawn().await;
    // A token every 20 s: nothing refills during the test.
    let proxy = start(&upstream, "", &limited(r#"burst = 3, rate = "3/1m""#), Some(&redis)).await;

    let first = get(&proxy.url("/gen/a")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers["ratelimit-policy"], r#""limited";q=3;w=60"#);
    assert_eq!(first.headers["ratelimit"], r#""limited";r=2;t=20"#);
    assert!(first.headers.get("retry-after").is_none());
    get(&proxy.url("/gen/a")).await;
    let last = get(&proxy.url("/gen/a")).await;
    assert_eq!(last.headers["ratelimit"], r#""limited";r=0;t=60"#);

    let refused = get(&proxy.url("/gen/a")).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.headers["content-type"], "application/json");
    assert_eq!(refused.headers["ratelimit-policy"], r#""limited";q=3;w=60"#);
    assert_eq!(refused.headers["ratelimit"], r#""limited";r=0;t=60"#);
    let retry_ms = refused.json()["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!((19_000..=20_000).contains(&retry_ms), "{retry_ms}");
    assert_eq!(refused.json()["error"], "rate_limited");
    assert_eq!(refused.headers["retry-after"], "20", "whole seconds, rounded up");
    assert!(refused.headers.get("via").is_none(), "answered by the proxy itself");
    assert_eq!(upstream.requests(), 3);

    // Unrouted paths are never limited and carry no RateLimit fields.
    let other = get(&proxy.url("/echo")).await;
    assert_eq!(other.status, StatusCode::OK);
    assert!(other.headers.get("ratelimit").is_none());

    let text = metrics(&proxy).await;
    assert_eq!(checks(&text, "allowed", "redis"), 3.0);
    assert_eq!(checks(&text, "limited", "redis"), 1.0);
    assert_eq!(checks(&text, "error", "allow_all"), 0.0);
    assert!(text.contains(r#"sidecache_ratelimit_check_duration_seconds_count{backend="redis"} 4"#), "{text}");
    assert!(
        text.contains(r#"sidecache_requests_total{route="limited",status_class="4xx"} 1"#),
        "the 429 is counted as the route's: {text}"
    );
}

#[tokio::test]
async fn a_denial_is_remembered_until_the_next_token_and_spares_redis() {
    let redis = TestRedis::start();
    let upstream = TestUpstream::spawn().await;
    // A token every 500 ms.
    let proxy = start(&upstream, "", &limited(r#"burst = 2, rate = "2/s""#), Some(&redis)).await;
    let url = proxy.url("/gen/a");
    let scripts = || async {
        let series = r#"sidecache_redis_op_duration_seconds_count{client="ratelimit",op="token_bucket"}"#;
        metric(&metrics(&proxy).await, series).unwrap_or(0.0)
    };
    assert_eq!(count(&url, &[], 2).await, (2, 0));
    let before = scripts().await;
    let denied = get(&url).await;
    assert_eq!(denied.status, StatusCode::TOO_MANY_REQUESTS);
    let retry_ms = denied.json()["retry_after_ms"].as_u64().unwrap();
    // Remembered: the same answer without asking Redis, counting down.
    let again = get(&url).await;
    assert_eq!(again.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(again.headers["ratelimit-policy"], denied.headers["ratelimit-policy"]);
    assert!(again.headers["ratelimit"].to_str().unwrap().contains(";r=0;"), "{:?}", again.headers["ratelimit"]);
    assert!(again.json()["retry_after_ms"].as_u64().unwrap() <= retry_ms);
    assert_eq!(count(&url, &[], 10).await, (0, 10));
    assert_eq!(scripts().await, before + 1.0, "one check reached Redis");
    assert_eq!(checks(&metrics(&proxy).await, "limited", "redis"), 12.0, "Redis's decision, remembered");
    // Once the next token may exist, Redis decides again.
    tokio::time::sleep(Duration::from_millis(retry_ms + 50)).await;
    assert_eq!(get(&url).await.status, StatusCode::OK);
    assert_eq!(scripts().await, before + 2.0);
    assert_eq!(upstream.requests(), 3);
}

#[tokio::test]
async fn the_script_keeps_one_hash_per_bucket_expiring_when_full_again() {
    let redis = TestRedis::start();
    let upstream = TestUpstream::spawn().await;
    // One token per second: after one request the bucket is full again in 1 s.
    let proxy = start(&upstream, "", &limited(r#"burst = 10, rate = "1/s""#), Some(&redis)).await;
    assert_eq!(get(&proxy.url("/gen/a")).await.status, StatusCode::OK);

    let key = "sidecache:rl:limited:ip:127.0.0.1";
    assert_eq!(redis.command(&["TYPE", key]), "+hash");
    let pttl: i64 = redis.command(&["PTTL", key]).trim_start_matches(':').parse().unwrap();
    assert!((800..=1000).contains(&pttl), "expires when full again, not later: {pttl} ms");
    let level = redis.reply_lines(&["HGET", key, "n"]);
    assert_eq!(level[1].parse::<f64>().unwrap(), 9.0, "{level:?}");
    assert_eq!(redis.command(&["DBSIZE"]), ":1", "one key per bucket and nothing else");
}

/// `n` proxy processes on one `upstream` and one `redis`, with `rate_limit` on `/gen/*`, each
/// ready.
async fn replicas(n: usize, upstream: &TestUpstream, redis: &TestRedis, rate_limit: &str) -> Vec<BinaryProxy> {
    let toml =
        config_full(upstream.addr, "", "", &format!("{}\n{}", limited(rate_limit), redis_table(&redis.url(), PATIENT)));
    let proxies: Vec<_> = (0..n).map(|_| BinaryProxy::spawn(&toml)).collect();
    for p in &proxies {
        until_redis_ready(&format!("http://{}", p.admin)).await;
    }
    proxies
}

#[tokio::test]
async fn two_proxy_processes_sharing_redis_admit_exactly_burst() {
    const BURST: usize = 20;
    let redis = TestRedis::start();
    let upstream = TestUpstream::spawn().await;
    let proxies = replicas(2, &upstream, &redis, &format!(r#"burst = {BURST}, rate = "1/1h""#)).await;
    // 3 × burst requests at once, alternating between the two processes.
    let tasks: Vec<_> = (0..3 * BURST)
        .map(|i| {
            let url = proxies[i % 2].url("/gen/a");
            tokio::spawn(async move { get(&url).await.status })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    let limited = statuses.iter().filter(|s| **s == StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!((ok, limited), (BURST, 2 * BURST), "{statuses:?}");
    assert_eq!(upstream.requests(), BURST);
}

/// Keep-alive GETs on `url` by each of `clients` until `until`: how many were allowed, of how many.
async fn load(url: String, clients: usize, until: Instant) -> (usize, usize) {
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = client();
                let (mut ok, mut sent) = (0, 0);
                while Instant::now() < until {
                    sent += 1;
                    let req = http::Request::get(&url).body(full(Bytes::new())).unwrap();
                    let resp = client.request(req).await.expect("request");
                    match resp.status() {
                        StatusCode::OK => ok += 1,
                        StatusCode::TOO_MANY_REQUESTS => {}
                        other => panic!("unexpected {other}"),
                    }
                    http_body_util::BodyExt::collect(resp.into_body()).await.expect("body");
                }
                (ok, sent)
            })
        })
        .collect();
    let (mut ok, mut sent) = (0, 0);
    for t in tasks {
        let (o, s) = t.await.unwrap();
        (ok, sent) = (ok + o, sent + s);
    }
    (ok, sent)
}

#[tokio::test]
async fn three_proxy_processes_with_leases_never_admit_more_than_the_bucket_allows() {
    // A bucket big enough for leases at first, drained to single checks, refilled at 400/s.
    const BURST: f64 = 1000.0;
    const RATE: f64 = 400.0;
    let redis = TestRedis::start();
    let upstream = TestUpstream::spawn().await;
    let proxies = replicas(3, &upstream, &redis, r#"burst = 1000, rate = "400/s", key = "route""#).await;
    let started = Instant::now();
    let until = started + Duration::from_secs(2);
    let loads: Vec<_> = proxies.iter().map(|p| tokio::spawn(load(p.url("/gen/a"), 12, until))).collect();
    let (mut admitted, mut sent) = (0, 0);
    for l in loads {
        let (ok, all) = l.await.unwrap();
        (admitted, sent) = (admitted + ok, sent + all);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = BURST + RATE * elapsed;
    assert_eq!(upstream.requests(), admitted);
    assert!(admitted as f64 <= allowed, "{admitted} admitted, the bucket allowed {allowed:.0} in {elapsed:.2} s");
    assert!(admitted as f64 >= 0.8 * allowed, "{admitted} admitted of {allowed:.0} allowed in {elapsed:.2} s");

    let (mut leased, mut single) = (0.0, 0.0);
    for p in &proxies {
        let text = get(&format!("http://{}/metrics", p.admin)).await.text();
        leased += checks(&text, "allowed", "lease");
        single += checks(&text, "allowed", "redis");
    }
    assert_eq!(leased + single, admitted as f64);
    // The full bucket goes largely by leases (about 1,000 on an idle machine, 400 on a busy
    // one), the drained one by single tokens. A lease answers demand (16 requests within 50 ms
    // at one proxy): a machine too busy to send that many sees none, rightly.
    let per_proxy = sent as f64 / 3.0 / elapsed;
    if per_proxy >= 2.0 * 16.0 / 0.050 {
        assert!(
            leased >= BURST / 10.0,
            "{leased} of {admitted} admitted by leases, {per_proxy:.0} requests/s per proxy"
        );
    }
}

#[tokio::test]
async fn the_script_grants_a_lease_only_from_a_bucket_holding_spread_times_it() {
    let redis = TestRedis::start();
    let script = sidecache::ratelimit::bucket::SCRIPT;
    let spread = sidecache::ratelimit::lease::SPREAD.to_string();
    // burst 100, one token an hour; asks for `want`: {taken, remaining, retry µs, full µs}.
    let eval = |key: &str, want: &str, spread: &str| -> (i64, i64) {
        let args = ["EVAL", script, "1", key, "100", "3600000000", "1", want, spread];
        let lines = redis.reply_lines(&args);
        let int = |l: &String| l.trim_start_matches(':').parse::<i64>().unwrap();
        (int(&lines[1]), int(&lines[2]))
    };
    let take = |want: &str| eval("b", want, &spread);
    assert_eq!(take("5"), (5, 95), "100 tokens hold 8 x 5");
    assert_eq!(take("11"), (11, 84), "95 hold 8 x 11");
    assert_eq!(take("11"), (1, 83), "84 do not: one token");
    for _ in 0..81 {
        take("1");
    }
    assert_eq!(take("2"), (1, 1), "near empty: one token per call");
    assert_eq!(take("2"), (1, 0), "the last token");
    assert_eq!(take("2").0, 0, "refused");
    // Arguments no caller sends are read safely: a fraction of a token is not asked for, and
    // a spread under one never grants more than the bucket holds.
    assert_eq!(eval("c", "2.5", "8"), (2, 98));
    assert_eq!(eval("c", "1000", "0"), (1, 97));
    assert_eq!(eval("c", "97", "0.5"), (97, 0));
}

#[tokio::test]
async fn bursts_of_a_few_requests_take_no_more_from_the_shared_bucket_than_they_are_admitted() {
    let redis = TestRedis::start();
    let upstream = TestUpstream::spawn().await;
    let proxy = start(&upstream, "", &limited(r#"burst = 1000, rate = "1/1h", key = "route""#), Some(&redis)).await;
    let url = proxy.url("/gen/a");
    // Four keep-alive clients, 400 µs apart, every 60 ms: short gaps, no lasting demand.
    let mut admitted = 0;
    for _ in 0..20 {
        let round: Vec<_> = (0..4u64)
            .map(|i| {
                let url = url.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_micros(400 * i)).await;
                    get(&url).await.status == StatusCode::OK
                })
            })
            .collect();
        for r in round {
            admitted += usize::from(r.await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert_eq!(admitted, 80);
    let level: f64 = redis.reply_lines(&["HGET", "sidecache:rl:limited:all", "n"])[1].parse().unwrap();
    // (The bucket refills a token an hour meanwhile: a fraction.)
    assert_eq!((1000.0 - level).round(), 80.0, "tokens taken from the shared bucket");
}

#[tokio::test]
async fn refill_admits_tokens_at_the_rate() {
    let redis = TestRedis::start();
    let upstream = TestUpstream::spawn().await;
    // A token every 500 ms.
    let proxy = start(&upstream, "", &limited(r#"burst = 4, rate = "2/s""#), Some(&redis)).await;
    assert_eq!(count(&proxy.url("/gen/a"), &[], 5).await, (4, 1));
    let refused = get(&proxy.url("/gen/a")).await;
    let retry_ms = refused.json()["retry_after_ms"].as_u64().unwrap();
    assert!(retry_ms <= 500, "{retry_ms}");
    assert_eq!(refused.headers["retry-after"], "1");
    // 1.1 s later: two tokens back (the third arrives at 1.5 s).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(count(&proxy.url("/gen/a"), &[], 3).await, (2, 1));
}

#[tokio::test]
async fn separate_buckets_per_client_key_and_per_route() {
    let redis = TestRedis::start();
    let upstream = TestUpstream::spawn().await;
    let routes = r#"
[[route]]
name = "by-key"
path = "/gen/key/*"
rate_limit = { burst = 2, rate = "1/1h", key = "header:x-api-key" }

[[route]]
name = "shared"
path = "/gen/shared/*"
rate_limit = { burst = 2, rate = "1/1h", key = "route" }

[[route]]
name = "by-ip"
path = "/gen/*"
rate_limit = { burst = 2, rate = "1/1h" }
"#;
    let proxy = start(&upstream, "", routes, Some(&redis)).await;
    let key = |k: &'static str| [("x-api-key", k)];
    assert_eq!(count(&proxy.url("/gen/key/1"), &key("alice"), 3).await, (2, 1));
    assert_eq!(count(&proxy.url("/gen/key/1"), &key("bob"), 3).await, (2, 1), "bob has his own bucket");
    // Without the header the client address is the bucket.
    assert_eq!(count(&proxy.url("/gen/key/1"), &[], 3).await, (2, 1));
    // key = "route": one bucket whoever asks.
    assert_eq!(count(&proxy.url("/gen/shared/1"), &key("alice"), 1).await, (1, 0));
    assert_eq!(count(&proxy.url("/gen/shared/2"), &key("bob"), 2).await, (1, 1));
    // Another route: its own bucket for the same client.
    assert_eq!(count(&proxy.url("/gen/other"), &[], 3).await, (2, 1));
}

#[tokio::test]
async fn spoofed_forwarded_for_does_not_escape_the_limit() {
    let redis = TestRedis::start();
    let upstream = TestUpstream::spawn().await;
    let trusted = "trusted_proxies = [\"127.0.0.1/32\"]";
    let proxy = start(&upstream, trusted, &limited(r#"burst = 2, rate = "1/1h""#), Some(&redis)).await;
    // The client behind the trusted ingress (127.0.0.1) is 198.51.100.7, whatever it writes
    // to the left of what the ingress appended.
    for n in 0..2 {
        let xff = format!("6.6.6.{n}, 198.51.100.7");
        assert_eq!(get_with(&proxy.url("/gen/a"), &[("x-forwarded-for", &xff)]).await.status, StatusCode::OK);
    }
    for n in 2..6 {
        let xff = format!("6.6.6.{n}, 198.51.100.7");
        let a = get_with(&proxy.url("/gen/a"), &[("x-forwarded-for", &xff)]).await;
        assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS, "spoofed left-most entry {xff} escaped");
    }
    // Another client behind the same ingress has its own bucket.
    let xff = [("x-forwarded-for", "203.0.113.5")];
    assert_eq!(count(&proxy.url("/gen/a"), &xff, 3).await, (2, 1));
    assert_eq!(redis.command(&["EXISTS", "sidecache:rl:limited:ip:198.51.100.7"]), ":1");

    // Without trusted proxies, the header is not believed: the peer is the client.
    let redis = TestRedis::start();
    let proxy = start(&upstream, "", &limited(r#"burst = 2, rate = "1/1h""#), Some(&redis)).await;
    let mut statuses = Vec::new();
    for n in 0..3 {
        let xff = format!("198.51.100.{n}");
        statuses.push(get_with(&proxy.url("/gen/a"), &[("x-forwarded-for", &xff)]).await.status);
    }
    assert_eq!(statuses, [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);
}

#[tokio::test]
async fn noscript_after_script_flush_reloads_and_keeps_counting() {
    let redis = TestRedis::start();
    let upstream = TestUpstream::spawn().await;
    let proxy = start(&upstream, "", &limited(r#"burst = 4, rate = "1/1h""#), Some(&redis)).await;
    assert_eq!(count(&proxy.url("/gen/a"), &[], 2).await, (2, 0));
    assert_eq!(redis.command(&["SCRIPT", "FLUSH"]), "+OK");
    assert_eq!(count(&proxy.url("/gen/a"), &[], 3).await, (2, 1), "the bucket kept its level");
    let text = metrics(&proxy).await;
    assert_eq!(checks(&text, "allowed", "redis"), 4.0);
    assert_eq!(checks(&text, "limited", "redis"), 1.0);
    assert_eq!(checks(&text, "error", "allow_all"), 0.0, "NOSCRIPT was no failure: {text}");
}

/// `n` GETs one after another; every one must be answered 200, each within `limit`.
async fn all_allowed_quickly(url: &str, n: usize, limit: Duration) {
    let mut slowest = Duration::ZERO;
    for _ in 0..n {
        let started = Instant::now();
        let a = get(url).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    }
    assert!(slowest < limit, "slowest request took {slowest:?}");
}

/// The budget (50 ms) plus scheduling slack on a loaded 2-core machine.
const FAST: Duration = Duration::from_millis(250);

#[tokio::test]
async fn redis_killed_fails_open_then_exact_limits_resume() {
    let mut redis = TestRedis::start();
    let upstream = TestUpstream::spawn().await;
    let proxy = start_brisk(&upstream, &limited(r#"burst = 3, rate = "1/1h""#), &redis).await;
    // Emptied, but not yet refused (a refusal is remembered: see the test above).
    assert_eq!(count(&proxy.url("/gen/a"), &[], 3).await, (3, 0));

    redis.kill();
    all_allowed_quickly(&proxy.url("/gen/a"), 50, FAST).await;
    let failed_open = checks(&metrics(&proxy).await, "error", "allow_all");
    assert_eq!(failed_open, 50.0);
    let a = get(&proxy.url("/gen/a")).await;
    assert!(a.headers.get("ratelimit").is_none(), "no quota to report while failing open");

    // Back (empty: the test Redis keeps nothing on disk): the shared bucket starts full again.
    redis.spawn();
    until_redis_ready(&proxy.admin_url("")).await;
    assert_eq!(count(&proxy.url("/gen/a"), &[], 4).await, (3, 1));
}

#[tokio::test]
async fn redis_hung_fails_open_within_the_budget_then_resumes() {
    let mut redis = TestRedis::start();
    let upstream = TestUpstream::spawn().await;
    let proxy = start_brisk(&upstream, &limited(r#"burst = 3, rate = "1/1h""#), &redis).await;
    // Emptied, but not yet refused (a refusal is remembered: see the test above).
    assert_eq!(count(&proxy.url("/gen/a"), &[], 3).await, (3, 0));

    redis.pause();
    all_allowed_quickly(&proxy.url("/gen/a"), 50, FAST).await;
    let text = metrics(&proxy).await;
    assert!(text.contains(r#"sidecache_redis_up{client="ratelimit"} 0"#), "the limiter's breaker opened: {text}");

    // Resumed, the bucket is still empty: limited again, by Redis.
    redis.resume();
    until_redis_ready(&proxy.admin_url("")).await;
    assert_eq!(count(&proxy.url("/gen/a"), &[], 2).await, (0, 2));
}

#[tokio::test]
async fn a_hung_redis_found_by_the_limiter_costs_the_cache_no_budget() {
    let mut redis = TestRedis::start();
    let upstream = TestUpstream::spawn().await;
    // One failure opens a breaker, so the first request shows who waited for Redis.
    let route = "[[route]]\nname = \"both\"\npath = \"/gen/*\"\ncache = { ttl = \"60s\" }\n\
                 rate_limit = { burst = 1000, rate = \"1000/1s\" }\n";
    let rest = format!(
        "{route}[redis]\nurl = \"{}\"\nop_timeout = \"{BRISK}\"\nbreaker_failures = 1\nbreaker_cooldown = \"300ms\"\n",
        redis.url()
    );
    let proxy = TestProxy::start(&config_full(upstream.addr, "", "", &rest)).await;
    until_redis_ready(&proxy.admin_url("")).await;

    redis.pause();
    // The limiter's check waits out the budget and opens its breaker; the cache then skips the
    // hung server at once (its lookup of this very request included) while it checks it.
    assert_eq!(get(&proxy.url("/gen/a")).await.status, StatusCode::OK);
    let text = metrics(&proxy).await;
    let errors = |client: &str, op: &str, kind: &str| {
        metric(&text, &format!(r#"sidecache_redis_errors_total{{client="{client}",op="{op}",kind="{kind}"}}"#))
            .unwrap_or(0.0)
    };
    assert_eq!(errors("ratelimit", "token_bucket", "timeout"), 1.0, "{text}");
    assert_eq!(errors("cache", "hget", "timeout") + errors("cache", "hmget", "timeout"), 0.0, "{text}");
    assert!(errors("cache", "hget", "breaker_open") + errors("cache", "hmget", "breaker_open") >= 1.0, "{text}");
    let status = get(&proxy.admin_url("/status")).await.json();
    assert_ne!(status["redis"]["state"], "up", "{status}");

    redis.resume();
    until_redis_ready(&proxy.admin_url("")).await;
}

#[tokio::test]
async fn local_fallback_limits_in_process_while_redis_is_down() {
    let mut redis = TestRedis::start();
    let upstream = TestUpstream::spawn().await;
    let rl = r#"burst = 3, rate = "1/1h", on_redis_error = "local""#;
    let proxy = start_brisk(&upstream, &limited(rl), &redis).await;
    assert_eq!(count(&proxy.url("/gen/a"), &[], 1).await, (1, 0));

    redis.kill();
    let started = Instant::now();
    // The in-process bucket starts full: 3 more, then 429 from it.
    assert_eq!(count(&proxy.url("/gen/a"), &[], 6).await, (3, 3));
    assert!(started.elapsed() < FAST * 6, "{:?}", started.elapsed());
    let text = metrics(&proxy).await;
    assert_eq!(checks(&text, "allowed", "local"), 3.0);
    assert_eq!(checks(&text, "limited", "local"), 3.0);
    assert_eq!(checks(&text, "error", "allow_all"), 0.0);
    let a = get(&proxy.url("/gen/a")).await;
    assert_eq!(a.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(a.headers["ratelimit"], r#""limited";r=0;t=10800"#, "3 tokens at one an hour");
}

#[tokio::test]
async fn without_redis_limits_are_in_process() {
    let upstream = TestUpstream::spawn().await;
    let proxy = start(&upstream, "", &limited(r#"burst = 3, rate = "1/1h", key = "header:x-user""#), None).await;
    assert_eq!(count(&proxy.url("/gen/a"), &[("x-user", "u1")], 4).await, (3, 1));
    assert_eq!(count(&proxy.url("/gen/a"), &[("x-user", "u2")], 4).await, (3, 1));
    let text = metrics(&proxy).await;
    assert_eq!(checks(&text, "allowed", "local"), 6.0);
    assert_eq!(checks(&text, "limited", "local"), 2.0);
    let status = get(&proxy.admin_url("/status")).await.json();
    assert_eq!(status["ratelimit_store"], "local");
    assert!(status["ratelimit_redis"].is_null());
}

#[tokio::test]
async fn a_cached_answer_still_costs_a_token() {
    let redis = TestRedis::start();
    let upstream = TestUpstream::spawn().await;
    let route = r#"
[[route]]
name = "limited"
path = "/gen/*"
cache = { ttl = "60s" }
rate_limit = { burst = 3, rate = "1/1h" }
"#;
    let proxy = start(&upstream, "workers = 2", route, Some(&redis)).await;
    // The limiter has connections of its own, one per worker, beside the cache's one and its
    // invalidation link (and the test's own connection that asks).
    // (Each worker connects on its own thread: wait a moment for the last one.)
    let clients = || {
        let info = redis.reply_lines(&["INFO", "clients"]);
        info.iter().find_map(|l| l.strip_prefix("connected_clients:")?.parse::<usize>().ok()).unwrap()
    };
    let started = Instant::now();
    while clients() < 2 + 2 + 1 && started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(clients(), 2 + 2 + 1);
    let mut caches = Vec::new();
    for _ in 0..3 {
        let a = get(&proxy.url("/gen/a")).await;
        assert_eq!(a.status, StatusCode::OK);
        assert!(a.headers.contains_key("ratelimit"));
        caches.push(a.headers["x-cache"].to_str().unwrap().to_string());
        // The store is written after the response; wait for it so the next one is a hit.
        stored(&proxy, "limited", 1.0).await;
    }
    assert_eq!(caches, ["MISS", "HIT", "HIT"]);
    assert_eq!(get(&proxy.url("/gen/a")).await.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(upstream.requests(), 1);
}

#[tokio::test]
async fn the_kill_switch_turns_every_limit_off() {
    let upstream = TestUpstream::spawn().await;
    let toml = config_full(upstream.addr, "", "", &limited(r#"burst = 1, rate = "1/1h""#));
    let env = HashMap::from([("SIDECACHE_RATE_LIMIT_ENABLED".to_string(), "false".to_string())]);
    let proxy = TestProxy::start_with_env(&toml, &env).await;
    for _ in 0..3 {
        let a = get(&proxy.url("/gen/a")).await;
        assert_eq!(a.status, StatusCode::OK);
        assert!(a.headers.get("ratelimit").is_none());
    }
    let status = get(&proxy.admin_url("/status")).await.json();
    assert_eq!(status["rate_limit_enabled"], false);
    assert_eq!(status["ratelimit_store"], "none");
}

#[tokio::test]
async fn a_route_that_fails_closed_answers_503_while_redis_is_down() {
    let mut redis = TestRedis::start();
    let upstream = TestUpstream::spawn().await;
    let rl = r#"burst = 100, rate = "100/1m", on_redis_error = "deny""#;
    let proxy = start_brisk(&upstream, &limited(rl), &redis).await;
    assert_eq!(get(&proxy.url("/gen/a")).await.status, StatusCode::OK, "Redis alive: decided by Redis");

    redis.kill();
    let started = Instant::now();
    for _ in 0..5 {
        let a = get(&proxy.url("/gen/a")).await;
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
        assert_eq!(a.headers["retry-after"], "1", "the breaker's cooldown (300 ms), in whole seconds");
        assert_eq!(a.json()["error"], "rate_limiter_unavailable");
    }
    assert!(started.elapsed() < FAST * 5, "{:?}", started.elapsed());
    let before = upstream.requests();
    assert_eq!(before, 1, "nothing reached the backend while the limiter could not answer");
    let text = metrics(&proxy).await;
    assert_eq!(checks(&text, "error", "deny"), 5.0);
    assert_eq!(checks(&text, "error", "allow_all"), 0.0);

    redis.restart();
    until_redis_ready(&proxy.admin_url("")).await;
    assert_eq!(get(&proxy.url("/gen/a")).await.status, StatusCode::OK, "back to Redis's decisions");
}

#[tokio::test]
async fn a_limit_in_shadow_mode_counts_what_it_would_limit_and_limits_nothing() {
    for redis in [Some(TestRedis::start()), None] {
        let upstream = TestUpstream::spawn().await;
        let proxy =
            start(&upstream, "", &limited(r#"burst = 2, rate = "1/1h", mode = "shadow""#), redis.as_ref()).await;
        for _ in 0..5 {
            let a = get(&proxy.url("/gen/a")).await;
            assert_eq!(a.status, StatusCode::OK);
            assert!(
                a.headers.get("ratelimit").is_none() && a.headers.get("ratelimit-policy").is_none(),
                "nothing told"
            );
        }
        assert_eq!(upstream.requests(), 5);
        let backend = if redis.is_some() { "redis" } else { "local" };
        let text = metrics(&proxy).await;
        assert_eq!(checks(&text, "allowed", backend), 2.0, "{backend}");
        assert_eq!(checks(&text, "would_limit", backend), 3.0, "{backend}");
        assert_eq!(checks(&text, "limited", backend), 0.0, "{backend}");
    }
}

#[tokio::test]
async fn a_key_header_named_in_connection_does_not_choose_the_bucket() {
    // The backend never sees a field named in Connection, so a client could otherwise invent a
    // fresh value per request and never run out: it takes its address's bucket instead.
    let upstream = TestUpstream::spawn().await;
    let proxy = start(&upstream, "", &limited("burst = 2, rate = \"1/1h\", key = \"header:X-Api-Key\""), None).await;
    let url = proxy.url("/gen/k");
    for (i, expected) in [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS].into_iter().enumerate() {
        let key = format!("invented-{i}");
        let a = get_with(&url, &[("x-api-key", &key), ("connection", "keep-alive, X-Api-Key")]).await;
        assert_eq!(a.status, expected, "request {i}");
    }
    // Sent plainly, the header still picks its own bucket.
    assert_eq!(get_with(&url, &[("x-api-key", "real")]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_key_header_sent_on_several_lines_does_not_choose_the_bucket() {
    // The bucket would come from one line while the backend may read another (or all of them):
    // an invented first line per request would dodge the limit. Such a request takes its
    // address's bucket.
    let upstream = TestUpstream::spawn().await;
    let proxy = start(&upstream, "", &limited("burst = 2, rate = \"1/1h\", key = \"header:X-Api-Key\""), None).await;
    let url = proxy.url("/gen/k");
    for (i, expected) in [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS].into_iter().enumerate() {
        let invented = format!("invented-{i}");
        let a = get_with(&url, &[("x-api-key", &invented), ("x-api-key", "real")]).await;
        assert_eq!(a.status, expected, "request {i}");
    }
}
