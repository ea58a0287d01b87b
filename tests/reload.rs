//! Configuration reload through the real binary (SIGHUP, a rewritten file, a Kubernetes
//! ConfigMap's symlink swap) and through the library API: new requests get the new routes at
//! once, requests in flight finish on the old ones, nothing fails under load, an invalid file is
//! refused with every problem named, settings that need a restart are reported and kept, and
//! unchanged routes keep their cache state and buckets.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use sha2::{Digest, Sha256};
use sidecache::reload::Reloaded;
use support::*;
use tokio::time::Instant;

/// What `sha256sum proxy.toml | cut -c1-16` prints.
fn hash(text: &str) -> String {
    Sha256::digest(text.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// A proxy config in front of `upstream` where `/api/*` is cached (`cached`) or rate limited.
fn api_route(upstream: &TestUpstream, cached: bool) -> String {
    let route = if cached {
        "[[route]]\nname = \"api\"\npath = \"/api/*\"\ncache = { ttl = \"60s\" }\n"
    } else {
        "[[route]]\nname = \"api\"\npath = \"/api/*\"\nrate_limit = { burst = 1000000, rate = \"1000000/s\" }\n"
    };
    config_text(upstream.addr, route)
}

async fn metrics(admin: std::net::SocketAddr) -> String {
    get(&format!("http://{admin}/metrics")).await.text()
}

async fn status(admin: std::net::SocketAddr) -> serde_json::Value {
    get(&format!("http://{admin}/status")).await.json()
}

/// Whether an answer came through the cached or the limited `/api` route.
fn shape(a: &Answer) -> (&'static str, bool) {
    (if a.headers.contains_key("x-cache") { "cached" } else { "limited" }, a.headers.contains_key("ratelimit-policy"))
}

#[tokio::test]
async fn a_request_in_flight_finishes_on_its_configuration_and_the_next_gets_the_new_one() {
    let upstream = TestUpstream::spawn().await;
    let slow = |cached: bool| {
        let route = if cached {
            "[[route]]\nname = \"slow\"\npath = \"/slow/*\"\ncache = { ttl = \"60s\" }\n"
        } else {
            "[[route]]\nname = \"slow\"\npath = \"/slow/*\"\nrate_limit = { burst = 100, rate = \"100/s\" }\n"
        };
        config_text(upstream.addr, route)
    };
    let proxy = BinaryProxy::spawn(&slow(true));
    let url = proxy.url("/slow/1500");
    let in_flight = tokio::spawn(async move { get(&url).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while upstream.requests() == 0 {
        assert!(Instant::now() < deadline, "the request never reached the upstream");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let from = proxy.log_len();
    let text = slow(false);
    proxy.rewrite_config(&text);
    let line = &proxy.wait_log(from, "configuration reloaded").await[0];
    assert!(line.contains(&hash(&text)), "{line}");

    let next = get(&proxy.url("/slow/0")).await;
    assert_eq!((next.status, shape(&next)), (StatusCode::OK, ("limited", true)), "the new route");
    let old = in_flight.await.unwrap();
    assert_eq!((old.status, shape(&old)), (StatusCode::OK, ("cached", false)), "the route it started on");
    assert_eq!(upstream.requests(), 2);

    let m = metrics(proxy.admin).await;
    assert_eq!(metric(&m, "sidecache_config_reloads_total{result=\"applied\"}"), Some(1.0), "{m}");
    assert_eq!(metric(&m, &format!("sidecache_config_info{{hash=\"{}\"}}", hash(&text))), Some(1.0), "{m}");
    assert_eq!(metric(&m, &format!("sidecache_config_info{{hash=\"{}\"}}", hash(&slow(true)))), Some(0.0), "{m}");
    let s = status(proxy.admin).await;
    assert_eq!(s["config"]["hash"], hash(&text));
    assert_eq!(s["config"]["restart_required"], serde_json::json!([]));
    assert_eq!(s["routes"][0]["cache"], false);
}

#[tokio::test]
async fn reloads_under_load_fail_no_request() {
    let upstream = TestUpstream::spawn().await;
    let proxy = BinaryProxy::spawn(&api_route(&upstream, true));
    let stop = Arc::new(AtomicBool::new(false));
    let (done, shapes) = (Arc::new(AtomicUsize::new(0)), Arc::new(std::sync::Mutex::new(Vec::new())));
    // Four keep-alive clients, each at most 5,000 requests or 20 s.
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let (stop, done, shapes, base) = (stop.clone(), done.clone(), shapes.clone(), proxy.url(""));
            tokio::spawn(async move {
                let client = client();
                let started = Instant::now();
                let mut failures = Vec::new();
                for i in 0..5000 {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(20) {
                        break;
                    }
                    let req = http::Request::get(format!("{base}/api/{c}/{}", i % 50)).body(full(""));
                    match client.request(req.unwrap()).await {
                        Ok(resp) if resp.status() == StatusCode::OK => {
                            let cached = resp.headers().contains_key("x-cache");
                            use http_body_util::BodyExt;
                            if let Err(e) = resp.into_body().collect().await {
                                failures.push(format!("body: {e}"));
                            }
                            shapes.lock().unwrap().push(cached);
                        }
                        Ok(resp) => failures.push(format!("status {}", resp.status())),
                        Err(e) => failures.push(format!("request: {e:?}")),
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
                failures
            })
        })
        .collect();

    // Six reloads while the clients run, each waited for; the first at least 200 requests in.
    let wait_for = |n: usize| {
        let done = done.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            while done.load(Ordering::Relaxed) < n {
                assert!(Instant::now() < deadline, "the clients stalled");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    for round in 0..6 {
        wait_for(200 * (round + 1)).await;
        let from = proxy.log_len();
        let text = api_route(&upstream, round % 2 == 1);
        proxy.rewrite_config(&text);
        proxy.wait_log(from, &hash(&text)).await;
    }
    let served_before_stop = done.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let failures = client.await.unwrap();
        assert!(failures.is_empty(), "{failures:#?}");
    }
    let both = {
        let shapes = shapes.lock().unwrap();
        shapes.contains(&true) && shapes.contains(&false)
    };
    assert!(served_before_stop >= 1200 && both, "{served_before_stop} requests, both routes: {both}");
    // The last configuration (round 5) is the cached one.
    let a = get(&proxy.url("/api/x")).await;
    assert_eq!(shape(&a), ("cached", false));
    let m = metrics(proxy.admin).await;
    assert_eq!(metric(&m, "sidecache_config_reloads_total{result=\"applied\"}"), Some(6.0), "{m}");
}

/// A proxy whose `proxy.toml` is a link to a file in another directory, which the proxy does
/// not watch: only SIGHUP makes it read that file again. Returns the file.
fn unwatched(text: &str) -> (BinaryProxy, std::path::PathBuf) {
    let (watched, elsewhere) = (temp_path("watched"), temp_path("unwatched"));
    std::fs::create_dir(&watched).unwrap();
    std::fs::create_dir(&elsewhere).unwrap();
    let file = elsewhere.join("proxy.toml");
    std::fs::write(&file, text).unwrap();
    std::os::unix::fs::symlink(&file, watched.join("proxy.toml")).unwrap();
    (BinaryProxy::start(watched.join("proxy.toml"), &[]), file)
}

#[tokio::test]
async fn sighup_reloads_and_an_invalid_file_is_refused_while_the_old_configuration_serves() {
    let upstream = TestUpstream::spawn().await;
    let first = api_route(&upstream, true);
    let (proxy, file) = unwatched(&first);

    // Two problems, both named in one log line; the cached route keeps serving.
    let broken = config_text(
        upstream.addr,
        "[[route]]\nname = \"api\"\npath = \"/api/*\"\ncache = { ttl = \"soon\" }\n\n\
         [[route]]\nname = \"login\"\npath = \"/login\"\nrate_limit = { burst = 0, rate = \"1/s\" }\n",
    );
    std::fs::write(&file, &broken).unwrap();
    let from = proxy.log_len();
    proxy.signal("HUP");
    let refused = &proxy.wait_log(from, "configuration refused").await[0];
    assert!(refused.contains("route[0].cache.ttl") && refused.contains("route[1].rate_limit.burst"), "{refused}");
    assert!(refused.contains(&format!("\"hash\":\"{}\"", hash(&first))), "names the one in force: {refused}");
    assert_eq!(shape(&get(&proxy.url("/api/a")).await), ("cached", false));
    let m = metrics(proxy.admin).await;
    assert_eq!(metric(&m, "sidecache_config_reloads_total{result=\"invalid\"}"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "sidecache_config_last_reload_successful"), Some(0.0), "{m}");
    assert_eq!(status(proxy.admin).await["config"]["hash"], hash(&first));

    // Fixed: SIGHUP applies it.
    let fixed = api_route(&upstream, false);
    std::fs::write(&file, &fixed).unwrap();
    let from = proxy.log_len();
    proxy.signal("HUP");
    proxy.wait_log(from, "configuration reloaded").await;
    assert_eq!(shape(&get(&proxy.url("/api/a")).await), ("limited", true));
    // SIGHUP with nothing changed: counted as unchanged, nothing rebuilt.
    proxy.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = metrics(proxy.admin).await;
        if metric(&m, "sidecache_config_reloads_total{result=\"unchanged\"}") == Some(1.0) {
            break m;
        }
        assert!(Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(metric(&m, "sidecache_config_reloads_total{result=\"applied\"}"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "sidecache_config_last_reload_successful"), Some(1.0), "{m}");
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

/// Lay a directory out as the kubelet does for a ConfigMap volume:
/// `proxy.toml -> ..data/proxy.toml`, `..data -> ..<version>`.
fn configmap_version(dir: &Path, version: &str, text: &str) {
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir(&data).unwrap();
    std::fs::write(data.join("proxy.toml"), text).unwrap();
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
    if !dir.join("proxy.toml").exists() {
        std::os::unix::fs::symlink("..data/proxy.toml", dir.join("proxy.toml")).unwrap();
    }
}

#[tokio::test]
async fn a_configmap_update_applies_routes_and_log_level_and_reports_what_needs_a_restart() {
    let upstream = TestUpstream::spawn().await;
    let other = TestUpstream::spawn().await;
    let dir = temp_path("configmap");
    std::fs::create_dir(&dir).unwrap();
    let first = format!("{}\n[log]\nlevel = \"info\"\n", api_route(&upstream, true));
    configmap_version(&dir, "2026_11_30_v1", &first);
    let proxy = BinaryProxy::start(dir.join("proxy.toml"), &[]);
    assert_eq!(shape(&get(&proxy.url("/api/a")).await), ("cached", false));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!proxy.log.lock().unwrap().iter().any(|l| l.contains("sidecache::access")), "info: no access log");

    // The new version moves the upstream and the workers (restart only), the route and the level.
    let second = config_full(
        other.addr,
        "workers = 5",
        "",
        "[[route]]\nname = \"api\"\npath = \"/api/*\"\nrate_limit = { burst = 1000000, rate = \"1000000/s\" }\n\n\
         [log]\nlevel = \"sidecache=debug,info\"\n",
    );
    let from = proxy.log_len();
    configmap_version(&dir, "2026_11_30_v2", &second);
    let line = &proxy.wait_log(from, "configuration reloaded").await[0];
    assert!(line.contains("\"level\":\"WARN\"") && line.contains("server.workers, upstream"), "{line}");
    let s = status(proxy.admin).await;
    assert_eq!(s["config"]["hash"], hash(&second));
    assert_eq!(s["config"]["restart_required"], serde_json::json!(["server.workers", "upstream"]));
    assert!(s["upstream"].as_str().unwrap().contains(&upstream.addr.to_string()), "the running upstream stays: {s}");
    let m = metrics(proxy.admin).await;
    assert_eq!(metric(&m, "sidecache_config_restart_required"), Some(1.0), "{m}");

    let from = proxy.log_len();
    assert_eq!(shape(&get(&proxy.url("/api/b")).await), ("limited", true));
    assert_eq!((upstream.requests(), other.requests()), (2, 0));
    let access = &proxy.wait_log(from, "sidecache::access").await[0];
    assert!(access.contains("\"status\":200"), "debug lines now: {access}");
}

// ---------------------------------------------------------------- through the library API

fn reload(proxy: &TestProxy, text: &str) -> Reloaded {
    proxy.reloader.reload_text(text, &HashMap::new())
}

#[tokio::test]
async fn unchanged_limits_keep_their_buckets_and_changed_ones_start_afresh() {
    let upstream = TestUpstream::spawn().await;
    let limited = |burst: u32, extra: &str| {
        config_text(
            upstream.addr,
            &format!("[[route]]\nname = \"login\"\npath = \"/gen/login\"\nrate_limit = {{ burst = {burst}, rate = \"1/1h\" }}\n{extra}"),
        )
    };
    let proxy = TestProxy::start(&limited(2, "")).await;
    let statuses = |n: usize| {
        let url = proxy.url("/gen/login");
        async move {
            let mut s = Vec::new();
            for _ in 0..n {
                s.push(get(&url).await.status.as_u16());
            }
            s
        }
    };
    assert_eq!(statuses(3).await, [200, 200, 429]);
    let unrelated = limited(2, "\n[[route]]\nname = \"other\"\npath = \"/other\"\n");
    assert!(matches!(reload(&proxy, &unrelated), Reloaded::Applied(r) if r.is_empty()));
    assert_eq!(statuses(1).await, [429], "a reload that leaves the limit alone is no way around it");
    assert!(matches!(reload(&proxy, &limited(3, "")), Reloaded::Applied(_)));
    assert_eq!(statuses(4).await, [200, 200, 200, 429], "a new limit starts full");
    assert!(matches!(reload(&proxy, &limited(3, "")), Reloaded::Unchanged));
    let refused = reload(&proxy, "[upstream]\nurl = 3\n");
    assert!(matches!(refused, Reloaded::Invalid(_)));
    assert_eq!(statuses(1).await, [429]);
}

#[tokio::test]
async fn cache_entries_survive_unrelated_reloads_but_never_a_changed_key_or_a_purge() {
    let upstream = TestUpstream::spawn().await;
    let cached = |cache: &str| {
        config_text(upstream.addr, &format!("[[route]]\nname = \"c\"\npath = \"/gen/*\"\ncache = {{ {cache} }}\n"))
    };
    let proxy = TestProxy::start(&cached("ttl = \"60s\", query = \"ignore\"")).await;
    let x_cache = |target: &str| {
        let url = proxy.url(target);
        async move { get(&url).await.headers["x-cache"].to_str().unwrap().to_string() }
    };
    // Stored from `?who=mallory` while the query is ignored.
    assert_eq!(x_cache("/gen/p?who=mallory").await, "MISS");
    assert_eq!(x_cache("/gen/p").await, "HIT");
    let unrelated =
        format!("{}\n[[route]]\nname = \"other\"\npath = \"/other\"\n", cached("ttl = \"60s\", query = \"ignore\""));
    assert!(matches!(reload(&proxy, &unrelated), Reloaded::Applied(_)));
    assert_eq!(x_cache("/gen/p").await, "HIT", "the route's cache is kept");

    // Once the query is part of the key, what was stored under another key is not served.
    assert!(matches!(reload(&proxy, &cached("ttl = \"60s\", query = \"keep\"")), Reloaded::Applied(_)));
    assert_eq!(x_cache("/gen/p").await, "MISS");
    assert_eq!(x_cache("/gen/p").await, "HIT");

    // A purge before a reload stays a purge after it (the generation carries over).
    let purge = send(
        http::Method::POST,
        &proxy.admin_url("/purge"),
        &[("content-type", "application/json")],
        r#"{"route": "c"}"#,
    )
    .await;
    assert_eq!(purge.status, StatusCode::OK, "{}", purge.text());
    assert!(matches!(reload(&proxy, &cached("ttl = \"30s\", query = \"keep\"")), Reloaded::Applied(_)));
    assert_eq!(x_cache("/gen/p").await, "MISS");
    assert_eq!(x_cache("/gen/p").await, "HIT");

    // Even through a reload that takes the route's cache away, or renames the route, and back.
    let purge = send(http::Method::POST, &proxy.admin_url("/purge"), &[], r#"{"route": "c"}"#).await;
    assert_eq!(purge.status, StatusCode::OK, "{}", purge.text());
    let uncached = config_text(upstream.addr, "[[route]]\nname = \"c\"\npath = \"/gen/*\"\n");
    let renamed = cached("ttl = \"30s\", query = \"keep\"").replace("name = \"c\"", "name = \"d\"");
    for detour in [uncached, renamed] {
        assert!(matches!(reload(&proxy, &detour), Reloaded::Applied(_)));
        assert!(matches!(reload(&proxy, &cached("ttl = \"30s\", query = \"keep\"")), Reloaded::Applied(_)));
        assert_eq!(x_cache("/gen/p").await, "MISS", "the purge holds");
        assert_eq!(x_cache("/gen/p").await, "HIT");
        let purge = send(http::Method::POST, &proxy.admin_url("/purge"), &[], r#"{"route": "c"}"#).await;
        assert_eq!(purge.status, StatusCode::OK, "{}", purge.text());
    }
}

#[tokio::test]
async fn a_missing_file_is_no_lasting_failure_and_a_replaced_directory_is_watched_again() {
    let upstream = TestUpstream::spawn().await;
    let first = api_route(&upstream, true);
    let proxy = BinaryProxy::spawn(&first);
    let dir = proxy.config_path.parent().unwrap().to_path_buf();

    // Gone for a moment (refused: the old configuration serves), then back as it was.
    std::fs::remove_file(&proxy.config_path).unwrap();
    until_metric(proxy.admin, "sidecache_config_last_reload_successful", 0.0).await;
    assert_eq!(shape(&get(&proxy.url("/api/a")).await), ("cached", false));
    proxy.rewrite_config(&first);
    let m = until_metric(proxy.admin, "sidecache_config_last_reload_successful", 1.0).await;
    assert_eq!(metric(&m, "sidecache_config_reloads_total{result=\"unchanged\"}"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "sidecache_config_reloads_total{result=\"invalid\"}"), Some(1.0), "{m}");

    // The whole directory replaced: the new one is watched, and its file read.
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let second = api_route(&upstream, false);
    std::fs::write(&proxy.config_path, &second).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(proxy.admin).await["config"]["hash"] != hash(&second) {
        assert!(Instant::now() < deadline, "the new directory's file was never read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(shape(&get(&proxy.url("/api/a")).await), ("limited", true));
    let third = api_route(&upstream, true);
    proxy.rewrite_config(&third);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(proxy.admin).await["config"]["hash"] != hash(&third) {
        assert!(Instant::now() < deadline, "a change in the new directory was not seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
