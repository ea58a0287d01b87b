//! Redis Sentinel for real: a master, a replica and three Sentinels started here. Under steady
//! load through a cached, rate-limited route the master is killed; every request is still
//! answered correctly (forwarded while the failover runs), and caching and shared rate limits
//! resume on the promoted replica without restarting the proxy.

mod support;

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use support::redis::TestRedis;
use support::*;
use tokio::time::Instant;

/// Polls `check` every 50 ms for at most `limit`.
async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The port Sentinel names as the master of `mymaster`.
fn master_port(sentinel: &TestRedis) -> Option<u16> {
    let lines = sentinel.reply_lines(&["SENTINEL", "get-master-addr-by-name", "mymaster"]);
    lines.last()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_killed_under_load_fails_over_without_a_failed_request() {
    let mut master = TestRedis::start();
    let replica = TestRedis::start_with(&["--replicaof", "127.0.0.1", &master.port.to_string()]);
    eventually(Duration::from_secs(10), "replication", || {
        replica.info_field("master_link_status").as_deref() == Some("up")
    })
    .await;
    let sentinels: Vec<TestRedis> = (0..3).map(|_| TestRedis::sentinel(master.port)).collect();
    // A failover needs the Sentinels to know the replica and each other (hello messages, ~2 s).
    eventually(Duration::from_secs(15), "sentinel discovery", || {
        sentinels.iter().all(|s| {
            s.reply_lines(&["SENTINEL", "sentinels", "mymaster"]).iter().filter(|l| *l == "runid").count() == 2
                && s.reply_lines(&["SENTINEL", "replicas", "mymaster"]).iter().any(|l| *l == "slave")
        })
    })
    .await;

    let upstream = TestUpstream::spawn().await;
    let hosts: Vec<String> = sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
    let text = config_text(
        upstream.addr,
        &format!(
            "[cache]\nhot_ttl = \"1h\"\n[redis]\nurl = \"redis-sentinel://{}/mymaster/0\"\n\n\
             [[route]]\nname = \"catalog\"\npath = \"/gen/*\"\n\
             cache = {{ ttl = \"5m\" }}\nrate_limit = {{ burst = 1000000, rate = \"1000/1m\" }}\n",
            hosts.join(",")
        ),
    );
    let proxy = Arc::new(TestProxy::start(&text).await);
    // A second replica of the proxy, whose hot tier must follow the failover.
    let other = TestProxy::start(&text).await;
    wait_for_redis(&proxy).await;
    wait_for_redis(&other).await;
    let tracks = |port: u16| format!(r#"sidecache_redis_tracking_up{{client="cache",node="127.0.0.1:{port}"}}"#);
    until_metric(other.admin, &tracks(master.port), 1.0).await;
    // Both named by one host: the authority is part of the key.
    let held_on = |p: &TestProxy| {
        let url = p.url("/gen/held");
        async move { send(Method::GET, &url, &[("host", "shop")], bytes::Bytes::new()).await }
    };
    let held = held_on(&proxy).await.body;
    stored(&proxy, "catalog", 1.0).await;
    for _ in 0..2 {
        let a = held_on(&other).await;
        assert_eq!((a.headers["x-cache"].to_str().unwrap(), &a.body), ("HIT", &held), "admitted, then hot");
    }
    let status = get(&proxy.admin_url("/status")).await.json();
    assert_eq!(status["redis"]["mode"], "sentinel", "{status}");
    assert_eq!(status["redis"]["nodes"], serde_json::json!([format!("127.0.0.1:{}", master.port)]), "{status}");

    // Steady load: every answer must be a 200 carrying its own path's body.
    let load = SteadyLoad::start(&proxy, 10);
    eventually(Duration::from_secs(10), "cache hits before the failover", || {
        master.reply_lines(&["DBSIZE"])[0] != ":0"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    let old_master = master.port;
    let killed = Instant::now();
    master.kill();
    eventually(Duration::from_secs(20), "a failover to the replica", || {
        sentinels.iter().all(|s| master_port(s) == Some(replica.port))
    })
    .await;
    assert_ne!(replica.port, old_master);
    let switched = killed.elapsed();

    // Caching and rate limits resume on the promoted replica, with the same proxy.
    let fresh = "/gen/after-failover";
    eventually(Duration::from_secs(15), "the proxy to reconnect to the new master", || {
        replica.info_field("connected_clients").and_then(|n| n.parse::<u32>().ok()).unwrap_or(0) >= 3
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let a = get(&proxy.url(fresh)).await;
        assert_eq!(a.status, StatusCode::OK);
        if a.headers["x-cache"] == "HIT" {
            println!("failover: Sentinels switched {switched:?} after the kill, first hit {:?}", killed.elapsed());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no cache hit on the new master: {}",
            get(&proxy.admin_url("/status")).await.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let keys = replica.reply_lines(&["KEYS", "sidecache:c:*after-failover*"]);
    assert!(keys.iter().any(|k| k.contains("after-failover")), "the new entry is on the new master: {keys:?}");
    let checks = || async {
        let m = get(&proxy.admin_url("/metrics")).await.text();
        metric(&m, r#"sidecache_ratelimit_checks_total{route="catalog",result="allowed",backend="redis"}"#)
            .unwrap_or(0.0)
    };
    // The limiter has its own connections and breaker: it may come back a probe later.
    let before = checks().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while checks().await <= before {
        assert!(Instant::now() < deadline, "rate-limit checks are not decided by Redis again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let buckets = replica.reply_lines(&["KEYS", "sidecache:rl:catalog:*"]);
    assert!(buckets.iter().any(|k| k.starts_with("sidecache:rl:catalog:")), "limits on the new master: {buckets:?}");
    let status = get(&proxy.admin_url("/status")).await.json();
    assert_eq!(status["redis"]["nodes"], serde_json::json!([format!("127.0.0.1:{}", replica.port)]), "{status}");

    // The other proxy tracks the new master, and a purge there reaches its tier at once.
    until_metric(other.admin, &tracks(replica.port), 1.0).await;
    assert_eq!(metric(&get(&other.admin_url("/metrics")).await.text(), &tracks(old_master)), Some(0.0));
    let purge = || async {
        let body = r#"{"route": "catalog", "path": "/gen/held"}"#.to_string();
        send(Method::POST, &proxy.admin_url("/purge"), &[("content-type", "application/json")], body).await.status
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while purge().await != StatusCode::OK {
        assert!(Instant::now() < deadline, "no purge on the new master");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let purged = Instant::now();
    while held_on(&other).await.body == held {
        assert!(purged.elapsed() < Duration::from_secs(1), "a purge on the new master never reached the other tier");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let (total, slowest) = load.finish().await;
    println!("{total} requests answered under load, all 200 with their own body; slowest {slowest:?}");
    assert!(slowest < Duration::from_secs(1), "a request waited {slowest:?} on the failover");
    assert!(total > 200, "only {total} requests under load");
}
