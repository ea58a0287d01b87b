//! Redis Cluster for real: three masters made with `redis-cli --cluster create`. Two proxy
//! processes share the cache and exact rate limits through it, with keys spread over the shards;
//! and a master killed mid-load fails no request (the cluster refuses commands until the node is
//! back, so the proxy forwards), after which caching resumes without a restart.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use support::pki::Pki;
use support::redis::TestCluster;
use support::*;
use tokio::time::Instant;

/// A cached and limited GET route and a POST route limited per API key, on `redis` (a table).
fn config(upstream: &TestUpstream, redis: &str, rate_limit: &str) -> String {
    config_text(
        upstream.addr,
        &format!(
            "{redis}\n\
             [[route]]\nname = \"catalog\"\npath = \"/gen/*\"\ncache = {{ ttl = \"5m\" }}\nrate_limit = {{ {rate_limit} }}\n\n\
             [[route]]\nname = \"api\"\npath = \"/api/*\"\nmethods = [\"POST\"]\n\
             rate_limit = {{ burst = 10, rate = \"1/1h\", key = \"header:x-api-key\" }}\n"
        ),
    )
}

fn redis_table(url: &str) -> String {
    format!("[redis]\nurl = \"{url}\"\n")
}

/// How many of the cluster's nodes hold keys matching `pattern`.
fn nodes_holding(cluster: &TestCluster, pattern: &str) -> usize {
    cluster
        .nodes
        .iter()
        .filter(|n| n.reply_lines(&["KEYS", pattern]).iter().any(|l| l.starts_with("sidecache:")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_share_the_cache_and_exact_limits_across_shards() {
    let cluster = TestCluster::start(3);
    let upstream = TestUpstream::spawn().await;
    // Exact counts: a Redis budget that a loaded machine never runs out of (a limiter that
    // fails open admits more than the bucket holds).
    let redis = format!("{}op_timeout = \"1s\"\n", redis_table(&cluster.url()));
    let text = config(&upstream, &redis, r#"burst = 1000000, rate = "1000/1m""#);
    let proxies = [BinaryProxy::spawn(&text), BinaryProxy::spawn(&text)];
    for p in &proxies {
        until_redis_ready(&format!("http://{}", p.admin)).await;
    }
    let status = get(&format!("http://{}/status", proxies[0].admin)).await.json();
    let expected: HashSet<String> = cluster.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
    let nodes: HashSet<String> =
        status["redis"]["nodes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect();
    assert_eq!((&status["redis"]["mode"], nodes), (&"cluster".into(), expected), "{status}");
    assert_eq!(status["redis"]["connected_nodes"], 3, "{status}");

    // 20 paths stored by the first proxy are hits on the second: one shared cache. Clients name
    // the service, not a replica's own address: the authority is part of the key.
    let via_service = |proxy: &BinaryProxy, path: String| {
        let url = proxy.url(&path);
        async move { send(Method::GET, &url, &[("host", "shop.example")], Bytes::new()).await }
    };
    for i in 0..20 {
        assert_eq!(via_service(&proxies[0], format!("/gen/p{i}")).await.headers["x-cache"], "MISS");
    }
    stored_at(&format!("http://{}", proxies[0].admin), "catalog", 20.0).await;
    for i in 0..20 {
        let a = via_service(&proxies[1], format!("/gen/p{i}")).await;
        assert_eq!(a.headers["x-cache"], "HIT", "/gen/p{i} on the second proxy");
        assert!(a.text().starts_with(&format!("/gen/p{i} #")));
    }
    assert_eq!(upstream.requests(), 20);
    assert_eq!(nodes_holding(&cluster, "sidecache:c:*"), 3, "entries spread over every shard");

    // Exact limits per client key, the keys on different shards: 4 keys × 30 concurrent
    // requests alternating between the processes; each key admits exactly its burst of 10.
    let keys = ["alpha", "bravo", "charlie", "delta"];
    let tasks: Vec<_> = (0..120)
        .map(|i| {
            let url = proxies[i % 2].url("/api/orders");
            let key = keys[i % 4];
            tokio::spawn(async move { (key, send(Method::POST, &url, &[("x-api-key", key)], "").await.status) })
        })
        .collect();
    let mut admitted = std::collections::BTreeMap::new();
    for t in tasks {
        let (key, status) = t.await.unwrap();
        assert!(status == StatusCode::OK || status == StatusCode::TOO_MANY_REQUESTS, "{status}");
        *admitted.entry(key).or_insert(0) += usize::from(status == StatusCode::OK);
    }
    assert_eq!(admitted.values().copied().collect::<Vec<_>>(), [10, 10, 10, 10], "{admitted:?}");
    assert_eq!(upstream.requests(), 20 + 40);
    assert!(nodes_holding(&cluster, "sidecache:rl:api:*") >= 2, "buckets on several shards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_load_fails_no_request() {
    let mut cluster = TestCluster::start(3);
    let upstream = TestUpstream::spawn().await;
    let proxy = Arc::new(
        TestProxy::start(&config(&upstream, &redis_table(&cluster.url()), r#"burst = 1000000, rate = "1000/1m""#))
            .await,
    );
    wait_for_redis(&proxy).await;

    let load = SteadyLoad::start(&proxy, 30);
    let hits = || async {
        let m = get(&proxy.admin_url("/metrics")).await.text();
        metric(&m, r#"sidecache_cache_lookups_total{route="catalog",result="hit"}"#).unwrap_or(0.0)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while hits().await < 50.0 {
        assert!(Instant::now() < deadline, "no hits before the kill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let killed = Instant::now();
    cluster.nodes[1].kill();
    // Without replicas the cluster is down until the node returns: the proxy must bypass it.
    let status = || async { get(&proxy.admin_url("/status")).await.json() };
    while status().await["redis"]["state"] == "up" {
        assert!(killed.elapsed() < Duration::from_secs(10), "the breaker never opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("breaker open {:?} after the kill", killed.elapsed());
    tokio::time::sleep(Duration::from_secs(3)).await;

    // The node comes back (empty, same cluster identity): hits resume without a restart.
    cluster.nodes[1].restart();
    cluster.wait_ok();
    let back = Instant::now();
    let before = hits().await;
    while hits().await < before + 20.0 {
        assert!(back.elapsed() < Duration::from_secs(20), "no hits after the node came back: {}", status().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("hits resumed {:?} after the node came back", back.elapsed());

    let (total, slowest) = load.finish().await;
    println!("{total} requests answered, all 200 with their own body; slowest {slowest:?}");
    assert!(slowest < Duration::from_secs(1), "a request waited {slowest:?} on the dead master");
    assert!(total > 200, "only {total} requests under load");
}

/// The hot tier on a cluster: each primary tells each proxy of changes to its own slots, so a
/// purge through one proxy reaches the other's tier on every shard (`hot_ttl` is an hour: only
/// the invalidation links explain it); a lost primary drops the tier, and nothing purged while it
/// was down is served once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_primary_keeps_both_proxies_hot_tiers_true() {
    let mut cluster = TestCluster::start(3);
    let upstream = TestUpstream::spawn().await;
    let redis = format!(
        "{}op_timeout = \"200ms\"\nbreaker_cooldown = \"300ms\"\n[cache]\nhot_ttl = \"1h\"\n",
        redis_table(&cluster.url())
    );
    let text = config(&upstream, &redis, r#"burst = 1000000, rate = "1000/1m""#);
    let (a, b) = (TestProxy::start(&text).await, TestProxy::start(&text).await);
    for p in [&a, &b] {
        wait_for_redis(p).await;
        until_tracking(p.admin, 3).await;
    }
    let req = |p: &TestProxy, i: usize| {
        let url = p.url(&format!("/gen/h{i}"));
        async move { send(Method::GET, &url, &[("host", "shop.example")], Bytes::new()).await }
    };
    let reads = |text: &str| {
        metric(text, r#"sidecache_redis_op_duration_seconds_count{client="cache",op="hget"}"#).unwrap_or(0.0)
    };
    let purge = |i: usize| {
        let url = a.admin_url("/purge");
        async move {
            let body = format!(r#"{{"route": "catalog", "path": "/gen/h{i}"}}"#);
            send(Method::POST, &url, &[("content-type", "application/json")], body).await.status
        }
    };
    // Admitted on both: a hit read back from Redis by each.
    let mut held = Vec::new();
    for i in 0..12 {
        held.push(req(&a, i).await.body);
    }
    stored(&a, "catalog", 12.0).await;
    for p in [&a, &b] {
        for i in 0..12 {
            assert_eq!(req(p, i).await.headers["x-cache"], "HIT");
        }
    }
    assert_eq!(nodes_holding(&cluster, "sidecache:c:*"), 3, "entries on every shard");
    let before = reads(&get(&b.admin_url("/metrics")).await.text());
    for (i, body) in held.iter().enumerate() {
        assert_eq!(&req(&b, i).await.body, body);
    }
    assert_eq!(reads(&get(&b.admin_url("/metrics")).await.text()), before, "hot hits read Redis");

    // Purged through one proxy: the other's tier lets go on every shard.
    for (i, body) in held.iter().enumerate().take(6) {
        assert_eq!(purge(i).await, StatusCode::OK);
        let started = Instant::now();
        while req(&b, i).await.body == body {
            assert!(started.elapsed() < Duration::from_secs(1), "/gen/h{i} still held after a purge");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // A primary lost: its link too, so the whole tier goes. Entries deleted from the live shards
    // while it is down (directly: the proxies' own client stalls until the cluster is whole) are
    // never served again, during the fault or after it.
    for (i, body) in held.iter().enumerate().skip(6) {
        assert_eq!(&req(&b, i).await.body, body);
    }
    // Under load from here on: every answer a 200 with its own path's body.
    let b = Arc::new(b);
    let load = SteadyLoad::start(&b, 20);
    cluster.nodes[1].kill();
    until_tracking(b.admin, 2).await;
    let mut deleted = Vec::new();
    for (i, body) in held.iter().enumerate().skip(6) {
        let key = format!("sidecache:c:catalog:0:g:/gen/h{i}");
        if cluster.nodes.iter().filter(|n| n.running()).any(|n| n.command(&["DEL", &key]) == ":1") {
            deleted.push(i);
        }
        let during = req(&b, i).await;
        assert_eq!(during.status, StatusCode::OK);
        assert_ne!(&during.body, body, "/gen/h{i} served from a tier whose link is lost");
    }
    assert!(!deleted.is_empty(), "no entry on a live shard");
    cluster.nodes[1].restart();
    cluster.wait_ok();
    until_tracking(b.admin, 3).await;
    for &i in &deleted {
        assert_ne!(req(&b, i).await.body, held[i], "/gen/h{i} deleted during the fault, served after it");
    }
    let (answered, slowest) = load.finish().await;
    assert!(answered > 100, "only {answered} requests under load");
    assert!(slowest < Duration::from_secs(1), "a request waited {slowest:?}");
}

/// TLS as managed clusters do it: the certificates name a host, the slot map names nodes by IP
/// address, and the client was given the host. Nodes are verified against that host.
#[tokio::test]
async fn a_tls_cluster_found_from_one_seed() {
    let pki = Pki::with_server_names(&["localhost"]);
    let cluster = TestCluster::start_with(3, Some(&pki));
    let upstream = TestUpstream::spawn().await;
    let url = cluster.tls_url("localhost");
    let redis = format!("{}tls = {{ ca_file = {:?} }}\n", redis_table(&url), pki.file("ca.pem"));
    let proxy = TestProxy::start(&config(&upstream, &redis, r#"burst = 1000000, rate = "1000/1m""#)).await;
    wait_for_redis(&proxy).await;
    let status = get(&proxy.admin_url("/status")).await.json();
    assert_eq!((&status["redis"]["mode"], &status["redis"]["tls"]), (&"cluster".into(), &true.into()), "{status}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&proxy.admin_url("/status")).await.json()["redis"]["connected_nodes"] != 3 {
        assert!(
            Instant::now() < deadline,
            "not connected to every TLS node: {}",
            get(&proxy.admin_url("/status")).await.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    for i in 0..12 {
        assert_eq!(get(&proxy.url(&format!("/gen/t{i}"))).await.headers["x-cache"], "MISS");
    }
    stored(&proxy, "catalog", 12.0).await;
    for i in 0..12 {
        assert_eq!(get(&proxy.url(&format!("/gen/t{i}"))).await.headers["x-cache"], "HIT", "/gen/t{i}");
    }
    assert!(nodes_holding(&cluster, "sidecache:c:*") >= 2, "entries on several shards");
    let url = proxy.url("/api/x");
    let answers =
        futures_util::future::join_all((0..12).map(|_| send(Method::POST, &url, &[("x-api-key", "k")], ""))).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status.as_u16()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 10, "{statuses:?}");
    // The hot tier's invalidation links track every primary over TLS too.
    until_tracking(proxy.admin, 3).await;
}
