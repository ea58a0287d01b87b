//! The cache's storage layout on a real redis-server of the test's own: variants of one path in
//! one hash with their own expiry and a cap that never evicts, one-path purge, route generations,
//! NOSCRIPT recovery.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use sidecache::metrics::Metrics;
use sidecache::store::{CacheStore, MemoryStore, RedisStore, RedisTarget, Role};

const MAX_VARIANTS: usize = 64;
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

/// Store one variant; whether it was stored.
async fn put(store: &CacheStore, key: &str, variant: &str, value: Bytes, keep: Duration) -> bool {
    store.put(key, vec![(variant.to_string(), value)], keep, MAX_VARIANTS).await.unwrap() == 1
}

fn pttl(redis: &TestRedis, key: &str) -> i64 {
    redis.command(&["PTTL", key]).trim_start_matches(':').parse().unwrap()
}

/// The behaviour both backends share.
async fn variants_purge_and_generations(store: &CacheStore) {
    let a = Bytes::from_static(b"variant a");
    put(store, "sc:c:r:0:g:/p", "a", a.clone(), Duration::from_secs(60)).await;
    put(store, "sc:c:r:0:g:/p", "b", Bytes::from_static(b"variant b"), Duration::from_secs(60)).await;
    put(store, "sc:c:r:0:g:/q", "a", Bytes::from_static(b"other path"), Duration::from_secs(60)).await;
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

    // A new path key lives as long as its entry; a shorter-lived variant does not shorten it, a
    // longer-lived one extends it: the key lives as long as its longest-lived variant.
    put(&store, "k", "v1", Bytes::from_static(b"x"), Duration::from_secs(100)).await;
    let first = pttl(&redis, "k");
    assert!((99_000..=100_000).contains(&first), "{first}");
    put(&store, "k", "v2", Bytes::from_static(b"y"), Duration::from_secs(10)).await;
    assert!(pttl(&redis, "k") > 90_000, "not shortened");
    put(&store, "k", "v3", Bytes::from_static(b"z"), Duration::from_secs(500)).await;
    assert!(pttl(&redis, "k") > 490_000, "extended");
    assert_eq!(redis.command(&["HLEN", "k"]), ":4", "three variants and the index");
    // A write never moves a variant's expiry earlier: a marker written for a short-lived
    // variant must not end before a longer-lived one it leads to.
    put(&store, "k", "v3", Bytes::from_static(b"z2"), Duration::from_secs(5)).await;
    assert!(pttl(&redis, "k") > 490_000, "not shortened by a rewrite");
}

#[tokio::test]
async fn a_marker_and_its_entry_are_written_together_and_read_in_one_round_trip() {
    let redis = TestRedis::start();
    let (store, _m) = redis_store(&redis).await;
    let pair = |first: &str, second: &str| {
        vec![(first.to_string(), Bytes::from_static(b"marker")), (second.to_string(), Bytes::from_static(b"entry"))]
    };
    assert_eq!(store.put("m", pair("p", "v1"), Duration::from_secs(60), 3).await.unwrap(), 2);
    assert_eq!(
        store.get_two("m", "p", "v1").await.unwrap(),
        (Some(Bytes::from_static(b"marker")), Some(Bytes::from_static(b"entry")))
    );
    assert_eq!(store.get_two("m", "p", "v9").await.unwrap().1, None);
    assert_eq!(store.put("m", pair("p", "v2"), Duration::from_secs(60), 3).await.unwrap(), 2);
    // The cap counts the marker's slot too: the third entry does not fit, and nothing of the
    // write is made (the marker stays as it was; rewriting it would tell every replica the path
    // changed).
    assert_eq!(store.put("m", pair("p", "v3"), Duration::from_secs(60), 3).await.unwrap(), 0);
    assert_eq!(store.get("m", "v3").await.unwrap(), None);
    assert_eq!(redis.command(&["HLEN", "m"]), ":4", "marker, two entries and the index");
    let memory = CacheStore::Memory(MemoryStore::new(1 << 20));
    assert_eq!(memory.put("m", pair("p", "v1"), Duration::from_secs(60), 3).await.unwrap(), 2);
    assert_eq!(memory.get_two("m", "p", "v1").await.unwrap().1, Some(Bytes::from_static(b"entry")));
}

#[tokio::test]
async fn expired_variants_do_not_accumulate_and_a_full_path_refuses_new_ones() {
    let redis = TestRedis::start();
    let (store, _m) = redis_store(&redis).await;
    // Short-lived variants of one path (a `vary` header or a Host with many values): once they
    // have expired, the next write removes every one of them.
    for i in 0..40 {
        put(&store, "p", &format!("{i:x}"), Bytes::from_static(b"x"), Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    put(&store, "p", "fresh", Bytes::from_static(b"y"), Duration::from_secs(60)).await;
    assert_eq!(redis.command(&["HLEN", "p"]), ":2", "every expired variant went with the next write");
    assert!(pttl(&redis, "p") > 59_000, "the key lives as long as its one live variant");

    // Past the cap a new variant is refused: it never displaces a live one (anyone could evict
    // a popular entry with invented hosts otherwise); an existing one is always updated.
    for i in 0..MAX_VARIANTS {
        assert!(put(&store, "q", &format!("{i:x}"), Bytes::from_static(b"x"), Duration::from_secs(100)).await);
    }
    let refused = put(&store, "q", "new", Bytes::from_static(b"n"), Duration::from_secs(500)).await;
    assert!(!refused, "a new variant of a full path is refused");
    assert_eq!(redis.command(&["HLEN", "q"]), format!(":{}", MAX_VARIANTS + 1));
    assert!(store.get("q", "new").await.unwrap().is_none());
    assert!(store.get("q", "0").await.unwrap().is_some(), "the live variants stay");
    assert!(put(&store, "q", "0", Bytes::from_static(b"updated"), Duration::from_secs(100)).await);
    assert_eq!(store.get("q", "0").await.unwrap(), Some(Bytes::from_static(b"updated")), "an existing one is updated");
    // Once some have expired, new variants fit again.
    for i in 0..4 {
        put(&store, "r", &format!("{i:x}"), Bytes::from_static(b"x"), Duration::from_millis(100)).await;
    }
    for i in 4..MAX_VARIANTS {
        put(&store, "r", &format!("{i:x}"), Bytes::from_static(b"x"), Duration::from_secs(100)).await;
    }
    assert!(!put(&store, "r", "new", Bytes::from_static(b"n"), Duration::from_secs(100)).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(put(&store, "r", "new", Bytes::from_static(b"n"), Duration::from_secs(100)).await);
}

#[tokio::test]
async fn writes_survive_a_flushed_script_cache() {
    let redis = TestRedis::start();
    let (store, _m) = redis_store(&redis).await;
    put(&store, "k", "a", Bytes::from_static(b"1"), Duration::from_secs(60)).await;
    assert_eq!(redis.command(&["SCRIPT", "FLUSH"]), "+OK");
    put(&store, "k", "b", Bytes::from_static(b"2"), Duration::from_secs(60)).await;
    assert_eq!(store.get("k", "b").await.unwrap(), Some(Bytes::from_static(b"2")));
}

#[tokio::test]
async fn memory_store_behaves_the_same() {
    variants_purge_and_generations(&CacheStore::Memory(MemoryStore::new(1 << 20))).await;
}
