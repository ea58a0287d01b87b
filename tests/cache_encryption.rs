//! Cache entries sealed at rest in a redis-server of the test's own: nothing of a stored response
//! is readable in Redis, hits still work, a rotation keeps them, and an entry no configured key
//! opens (another key, altered, moved to another Redis key, not sealed) is a counted miss.

mod support;

use std::collections::HashMap;

use http::StatusCode;
use support::redis::TestRedis;
use support::*;

const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const K2: &str = "HxwdHh8AAQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRo=";
const HEADER_SAMPLE: &str = "plaintext-header-sample";

/// A proxy caching `/gen/*` (route `enc`) in `redis`, hits read from Redis every time (no hot
/// tier), with these keys (`current`, `previous`) or none.
async fn proxy(upstream: &TestUpstream, redis: &TestRedis, keys: Option<(&str, Option<&str>)>) -> TestProxy {
    let mut env = HashMap::new();
    let mut cache = "[cache]\nhot_ttl = \"0s\"\n".to_string();
    if let Some((current, previous)) = keys {
        cache.push_str("encryption_key_env = \"SIDECACHE_CACHE_KEY\"\n");
        env.insert("SIDECACHE_CACHE_KEY".to_string(), current.to_string());
        if let Some(previous) = previous {
            env.insert("SIDECACHE_CACHE_KEY_PREVIOUS".to_string(), previous.to_string());
        }
    }
    let toml = config_text(
        upstream.addr,
        &format!(
            "{cache}\n[redis]\nurl = \"{}\"\n\n[[route]]\nname = \"enc\"\npath = \"/gen/*\"\ncache = {{ ttl = \"60s\" }}\n",
            redis.url()
        ),
    );
    let proxy = TestProxy::start_with_env(&toml, &env).await;
    until_redis_ready(&proxy.admin_url("")).await;
    proxy
}

async fn upstream() -> TestUpstream {
    TestUpstream::new().route("/gen/", Reply::ok().header("x-personal", HEADER_SAMPLE)).spawn().await
}

/// `X-Cache` of a GET, once the proxy has stored what a miss fetched.
async fn x_cache(proxy: &TestProxy, target: &str) -> (String, String) {
    let before = get(&proxy.admin_url("/metrics")).await.text();
    let stored = metric(&before, "sidecache_cache_stores_total{route=\"enc\",result=\"stored\"}").unwrap_or(0.0);
    // One Host for every proxy of a test (they listen on ports of their own): the same variant.
    let a = send(http::Method::GET, &proxy.url(target), &[("host", "shop.example")], "").await;
    assert_eq!(a.status, StatusCode::OK);
    let x_cache = a.headers["x-cache"].to_str().unwrap().to_string();
    if x_cache == "MISS" {
        until_metric(proxy.admin, "sidecache_cache_stores_total{route=\"enc\",result=\"stored\"}", stored + 1.0).await;
    }
    (x_cache, a.text())
}

async fn unreadable(proxy: &TestProxy, reason: &str) -> f64 {
    let m = get(&proxy.admin_url("/metrics")).await.text();
    metric(&m, &format!("sidecache_cache_unreadable_total{{route=\"enc\",reason=\"{reason}\"}}")).unwrap_or(0.0)
}

/// Everything Redis holds, as text: every key's name, `DUMP`, and a hash's `HGETALL`.
fn everything(redis: &TestRedis) -> String {
    let mut all = String::new();
    for key in redis.reply_lines(&["KEYS", "*"]).into_iter().filter(|l| !l.starts_with(['*', '$'])) {
        all.push_str(&key);
        all.push_str(&redis.reply_lines(&["DUMP", &key]).join("\n"));
        if redis.command(&["TYPE", &key]) == "+hash" {
            all.push_str(&redis.reply_lines(&["HGETALL", &key]).join("\n"));
        }
    }
    all
}

/// The Redis key holding `path`'s variants, and the field of its one variant.
fn stored(redis: &TestRedis, path: &str) -> (String, String) {
    let keys = redis.reply_lines(&["KEYS", &format!("*g:{path}")]);
    let key = keys
        .into_iter()
        .find(|l| !l.starts_with(['*', '$']))
        .unwrap_or_else(|| panic!("no key for {path}: {:?}", redis.reply_lines(&["KEYS", "*"])));
    let fields = redis.reply_lines(&["HKEYS", &key]);
    let field = fields.into_iter().find(|l| !l.starts_with(['*', '$']) && l != "~").expect("a variant");
    (key, field)
}

#[tokio::test]
async fn nothing_of_a_response_is_readable_in_redis_and_hits_still_work() {
    let upstream = upstream().await;
    let (sealed_redis, plain_redis) = (TestRedis::start(), TestRedis::start());
    let sealed = proxy(&upstream, &sealed_redis, Some((K1, None))).await;
    let plain = proxy(&upstream, &plain_redis, None).await;
    for proxy in [&sealed, &plain] {
        let (first, body) = x_cache(proxy, "/gen/p").await;
        assert_eq!((first.as_str(), x_cache(proxy, "/gen/p").await), ("MISS", ("HIT".to_string(), body.clone())));
        assert!(body.starts_with("/gen/p #"));
    }
    // The same check finds the samples where nothing is sealed.
    let samples = [HEADER_SAMPLE, "x-personal", "/gen/p #"];
    let in_plain = everything(&plain_redis);
    assert!(samples.iter().all(|s| in_plain.contains(s)), "{in_plain}");
    let in_sealed = everything(&sealed_redis);
    assert!(in_sealed.contains("g:/gen/p") && in_sealed.contains("SE"), "the entry is there: {in_sealed}");
    for sample in samples {
        assert!(!in_sealed.contains(sample), "{sample:?} readable in Redis: {in_sealed}");
    }
    let status = get(&sealed.admin_url("/status")).await.json();
    assert_eq!(status["cache_encryption"]["enabled"], true);
    let id = status["cache_encryption"]["key_id"].as_str().unwrap().to_string();
    assert!(id.len() == 8 && !status.to_string().contains(K1), "{status}");
    assert_eq!(get(&plain.admin_url("/status")).await.json()["cache_encryption"]["enabled"], false);
}

#[tokio::test]
async fn a_rotation_keeps_hits_and_an_entry_no_key_opens_is_a_counted_miss() {
    let (upstream, redis) = (upstream().await, TestRedis::start());
    let old = proxy(&upstream, &redis, Some((K1, None))).await;
    assert_eq!(x_cache(&old, "/gen/r").await.0, "MISS");
    assert_eq!(x_cache(&old, "/gen/q").await.0, "MISS");
    // The new key, with the old one as previous: what the old key sealed is still a hit, and is
    // sealed again under the new key.
    let rotated = proxy(&upstream, &redis, Some((K2, Some(K1)))).await;
    assert_eq!(x_cache(&rotated, "/gen/r").await.0, "HIT");
    until_metric(rotated.admin, "sidecache_cache_resealed_total{route=\"enc\"}", 1.0).await;
    until_metric(rotated.admin, "sidecache_cache_stores_total{route=\"enc\",result=\"stored\"}", 1.0).await;
    assert_eq!(x_cache(&rotated, "/gen/s").await.0, "MISS");
    assert_eq!(x_cache(&rotated, "/gen/s").await.0, "HIT");
    // A proxy that knows only the old key cannot open the new key's entry: a miss, counted, and
    // the entry deleted (this proxy's own fetch then stores it again, under its key).
    assert_eq!(x_cache(&old, "/gen/s").await.0, "MISS");
    assert_eq!(unreadable(&old, "unknown_key").await, 1.0);
    assert_eq!(x_cache(&old, "/gen/s").await.0, "HIT");
    // The previous key dropped: what was sealed again is a hit, what the old key sealed is not.
    let new_only = proxy(&upstream, &redis, Some((K2, None))).await;
    assert_eq!(x_cache(&new_only, "/gen/r").await.0, "HIT");
    assert_eq!(x_cache(&new_only, "/gen/q").await.0, "MISS");
    assert_eq!(unreadable(&new_only, "unknown_key").await, 1.0);
    assert_eq!(x_cache(&new_only, "/gen/q").await.0, "HIT");
}

#[tokio::test]
async fn altered_moved_or_unsealed_entries_are_counted_misses() {
    let (upstream, redis) = (upstream().await, TestRedis::start());
    let proxy = proxy(&upstream, &redis, Some((K1, None))).await;

    // Altered: the last byte (of the tag) flipped in Redis.
    assert_eq!(x_cache(&proxy, "/gen/t").await.0, "MISS");
    let (key, field) = stored(&redis, "/gen/t");
    let flip = "local v = redis.call('HGET', KEYS[1], ARGV[1]) \
                redis.call('HSET', KEYS[1], ARGV[1], string.sub(v, 1, -2) .. string.char((string.byte(v, -1) + 1) % 256)) \
                return 1";
    assert_eq!(redis.command(&["EVAL", flip, "1", &key, &field]), ":1");
    // This time the backend says no-store: what is left in Redis is what the proxy left there.
    upstream.set("/gen/t", Reply::ok().header("cache-control", "no-store"));
    let a = send(http::Method::GET, &proxy.url("/gen/t"), &[("host", "shop.example")], "").await;
    assert_eq!(a.headers["x-cache"], "MISS");
    assert_eq!(unreadable(&proxy, "tampered").await, 1.0);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while redis.command(&["HEXISTS", &key, &field]) != ":0" {
        assert!(tokio::time::Instant::now() < deadline, "the altered entry was not deleted");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    // Moved: another path's Redis key holding a copy of this one.
    assert_eq!(x_cache(&proxy, "/gen/u").await.0, "MISS");
    let (key, _) = stored(&redis, "/gen/u");
    assert_eq!(redis.command(&["COPY", &key, &key.replace("/gen/u", "/gen/v")]), ":1");
    assert_eq!(x_cache(&proxy, "/gen/v").await.0, "MISS", "a sealed entry opens only where it was written");
    assert_eq!(unreadable(&proxy, "tampered").await, 2.0);

    // Not sealed: written by someone else (or before encryption was on).
    let (key, field) = stored(&redis, "/gen/u");
    assert_eq!(redis.command(&["HSET", &key, &field, "SC\u{1}forged"]), ":0");
    assert_eq!(x_cache(&proxy, "/gen/u").await.0, "MISS");
    assert_eq!(unreadable(&proxy, "unsealed").await, 1.0);
    assert_eq!(x_cache(&proxy, "/gen/u").await.0, "HIT", "stored again, sealed");
}
