//! The admin listener's state-changing endpoints through the real server: with
//! `SIDECACHE_ADMIN_TOKEN` set, `POST /purge` needs it as a bearer token, from loopback too;
//! without it, loopback may purge (the rule for other peers is unit-tested in `admin.rs`, since
//! tests stay on 127.0.0.1). Health, readiness and metrics stay open.

mod support;

use std::collections::HashMap;

use http::{Method, StatusCode};
use support::*;

const TOKEN: &str = "9f86d081884c7d659a2feaa0c55ad015";

fn cached(upstream: &TestUpstream) -> String {
    config_text(upstream.addr, "[[route]]\nname = \"c\"\npath = \"/gen/*\"\ncache = { ttl = \"60s\" }\n")
}

async fn purge(proxy: &TestProxy, authorization: Option<&str>) -> Answer {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(value) = authorization {
        headers.push(("authorization", value));
    }
    send(Method::POST, &proxy.admin_url("/purge"), &headers, r#"{"route": "c"}"#).await
}

#[tokio::test]
async fn with_a_token_purge_needs_it_and_the_open_endpoints_stay_open() {
    let upstream = TestUpstream::spawn().await;
    let env = HashMap::from([("SIDECACHE_ADMIN_TOKEN".to_string(), TOKEN.to_string())]);
    let proxy = TestProxy::start_with_env(&cached(&upstream), &env).await;
    assert_eq!(get(&proxy.url("/gen/a")).await.headers["x-cache"], "MISS");

    for refused in [None, Some("Bearer wrong-token-of-32-characters!!"), Some(TOKEN), Some("Basic OTpm")] {
        let a = purge(&proxy, refused).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{refused:?}: {}", a.text());
        assert_eq!(a.headers["www-authenticate"], "Bearer realm=\"sidecache\"");
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while get(&proxy.url("/gen/a")).await.headers["x-cache"] != "HIT" {
        assert!(tokio::time::Instant::now() < deadline, "nothing was purged, so the entry is a hit");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let a = purge(&proxy, Some(&format!("Bearer {TOKEN}"))).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(get(&proxy.url("/gen/a")).await.headers["x-cache"], "MISS", "purged");
    for open in ["/healthz", "/readyz", "/metrics", "/status"] {
        assert_eq!(get(&proxy.admin_url(open)).await.status, StatusCode::OK, "{open}");
    }
    assert!(!get(&proxy.admin_url("/status")).await.text().contains(TOKEN));
}

#[tokio::test]
async fn without_a_token_loopback_may_purge() {
    let upstream = TestUpstream::spawn().await;
    let proxy = TestProxy::start(&cached(&upstream)).await;
    assert_eq!(purge(&proxy, None).await.status, StatusCode::OK);
}
