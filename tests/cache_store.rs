//! The cache's storage layout on a real redis-server of the test's own: variants of one path in
//! one hash, its expiry only ever extended, one-path purge, route generations, NOSCRIPT recovery.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use sidecache::metrics::Metrics;
use sidecache::store::{CacheStore, MemoryStore, RedisStore, RedisTarget, Role};
use support::redis::TestRedis;

async fn redis_store(redis: &TestRedis) -> (CacheStore, Metrics) {
    let toml = format!(
        "[upstream]\nurl = \"http://127.0.0.1:9\"\n[redis]\nurl = \"{}\"\nop_timeout = \"200ms\"\n",
        redis.url()
    );
    let config = sidecache::Config::from_sources(&toml, &HashMap::new()).unwrap().redis.unwrap();
    let metrics = Metrics::new();
    let store = RedisStore::start(&RedisTarget::new(&config).unwrap(), Role::Cache, &metrics.registrar()).unwrap();
    for _ in 0..250 {
        if store.get("ready?").await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (CacheStore::Redis(store), metrics)
}

fn pttl(redis: &TestRedis, key: &str) -> i64 {
    redis.command(&["PTTL", key]).trim_start_matches(':').parse().unwrap()
}

/// The behaviour both backends share.
async fn variants_purge_and_generations(store: &CacheStore) {
    let a = Bytes::from_static(b"variant a");
    store.put("sc:c:r:0:g:/p", "a", a.clone(), Duration::from_secs(60)).await.unwrap();
    store.put("sc:c:r:0:g:/p", "b", Bytes::from_static(b"variant b"), Duration::from_secs(60)).await.unwrap();
    store.put("sc:c:r:0:g:/q", "a", Bytes::from_static(b"other path"), Duration::from_secs(60)).await.unwrap();
    assert_eq!(store.get("sc:c:r:0:g:/p", "a").await.unwrap(), Some(a));
    assert_eq!(store.get("sc:c:r:0:g:/p", "c").await.unwrap(), None);
    store.remove("sc:c:r:0:g:/p", "a").await.unwrap();
    assert_eq!(store.get("sc:c:r:0:g:/p", "a").await.unwrap(), None);
    assert!(store.get("sc:c:r:0:g:/p", "b").await.unwrap().is_some());
    store.purge_path("sc:c:r:0:g:/p").await.unwrap();
    assert_eq!(store.get("sc:c:r:0:g:/p", "b").await.unwrap(), None, "every variant of the path is gone");
    assert!(store.get("sc:c:r:0:g:/q", "a").await.unwrap().is_some(), "other paths stay");
    assert_eq!(store.generation("sc:g:r").await.unwrap(), 0);
    assert_eq!(store.bump_generation("sc:g:r").await.unwrap(), 1);
    assert_eq!(store.bump_generation("sc:g:r").await.unwrap(), 2);
    assert_eq!(store.generation("sc:g:r").await.unwrap(), 2);
}

#[tokio::test]
async fn redis_layout() {
    let redis = TestRedis::start();
    let (store, _m) = redis_store(&redis).await;
    variants_purge_and_generations(&store).await;

    // A new path key gets the entry's keep-for time; a shorter one never shortens it, a longer
    // one extends it (variants share the key).
    store.put("k", "v1", Bytes::from_static(b"x"), Duration::from_secs(100)).await.unwrap();
    let first = pttl(&redis, "k");
    assert!((99_000..=100_000).contains(&first), "{first}");
    store.put("k", "v2", Bytes::from_static(b"y"), Duration::from_secs(10)).await.unwrap();
    assert!(pttl(&redis, "k") > 90_000, "not shortened");
    store.put("k", "v3", Bytes::from_static(b"z"), Duration::from_secs(500)).await.unwrap();
    assert!(pttl(&redis, "k") > 490_000, "extended");
    assert_eq!(redis.command(&["HLEN", "k"]), ":3");
}

#[tokio::test]
async fn writes_survive_a_flushed_script_cache() {
    let redis = TestRedis::start();
    let (store, _m) = redis_store(&redis).await;
    store.put("k", "a", Bytes::from_static(b"1"), Duration::from_secs(60)).await.unwrap();
    assert_eq!(redis.command(&["SCRIPT", "FLUSH"]), "+OK");
    store.put("k", "b", Bytes::from_static(b"2"), Duration::from_secs(60)).await.unwrap();
    assert_eq!(store.get("k", "b").await.unwrap(), Some(Bytes::from_static(b"2")));
}

#[tokio::test]
async fn memory_store_behaves_the_same() {
    variants_purge_and_generations(&CacheStore::Memory(MemoryStore::new(1 << 20))).await;
}
