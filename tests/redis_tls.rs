//! `rediss://` against a real redis-server with `tls-port`, certificates from a CA made here:
//! caching through it with a private CA, client certificates (mTLS), a wrong CA refused with a
//! clear log line while requests are still forwarded, `insecure_skip_verify`, and unusable files
//! failing start-up with the field named. Also ACL credentials from the environment.

mod support;

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use http::StatusCode;
use support::pki::Pki;
use support::redis::{free_port, TestRedis};
use support::*;

/// A redis-server with a plain port (for the test's own commands) and a TLS port.
fn tls_redis(pki: &Pki, require_client_cert: bool) -> (TestRedis, u16) {
    let tls_port = free_port().to_string();
    let auth_clients = if require_client_cert { "yes" } else { "no" };
    let (cert, key, ca) = (pki.file("server.pem"), pki.file("server.key"), pki.file("ca.pem"));
    let redis = TestRedis::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca,
        "--tls-auth-clients",
        auth_clients,
    ]);
    (redis, tls_port.parse().unwrap())
}

fn config(upstream: &TestUpstream, tls_port: u16, tls: &str) -> String {
    config_text(
        upstream.addr,
        &format!(
            "[redis]\nurl = \"rediss://127.0.0.1:{tls_port}/0\"\ntls = {{ {tls} }}\n\n\
             [[route]]\nname = \"cached\"\npath = \"/gen/*\"\ncache = {{ ttl = \"1m\" }}\n"
        ),
    )
}

/// Cache entries (one per path) in `redis`; a fill's lease may outlive the answer for a moment.
fn entries(redis: &TestRedis) -> usize {
    let keys = redis.reply_lines(&["KEYS", "sidecache:c:*"]);
    keys.iter().filter(|k| k.starts_with("sidecache:c:") && !k.contains("lease")).count()
}

/// MISS, stored in Redis (seen on the plain port), then HIT read back through TLS.
async fn caches_through(proxy: &TestProxy, redis: &TestRedis) {
    wait_for_redis(proxy).await;
    let first = get(&proxy.url("/gen/tls")).await;
    assert_eq!((first.status, first.headers["x-cache"].to_str().unwrap()), (StatusCode::OK, "MISS"));
    stored(proxy, "cached", 1.0).await;
    assert_eq!(entries(redis), 1, "the entry is in this redis");
    let hit = get(&proxy.url("/gen/tls")).await;
    assert_eq!(hit.headers["x-cache"], "HIT");
    assert_eq!(hit.body, first.body);
}

#[tokio::test]
async fn caches_through_tls_with_a_private_ca() {
    let pki = Pki::new();
    let (redis, tls_port) = tls_redis(&pki, false);
    let upstream = TestUpstream::spawn().await;
    let proxy = TestProxy::start(&config(&upstream, tls_port, &format!("ca_file = {:?}", pki.file("ca.pem")))).await;
    caches_through(&proxy, &redis).await;

    let status = get(&proxy.admin_url("/status")).await.json();
    let r = &status["redis"];
    assert_eq!((&r["mode"], &r["tls"], &r["connected_nodes"]), (&"standalone".into(), &true.into(), &1.into()), "{r}");
    assert_eq!(r["nodes"], serde_json::json!([format!("127.0.0.1:{tls_port}")]));
    let m = get(&proxy.admin_url("/metrics")).await.text();
    assert_eq!(metric(&m, r#"sidecache_redis_info{client="cache",mode="standalone",tls="true"}"#), Some(1.0), "{m}");
}

#[tokio::test]
async fn client_certificates_for_mutual_tls() {
    let pki = Pki::new();
    let (redis, tls_port) = tls_redis(&pki, true);
    let upstream = TestUpstream::spawn().await;
    let tls = format!(
        "ca_file = {:?}, cert_file = {:?}, key_file = {:?}",
        pki.file("ca.pem"),
        pki.file("client.pem"),
        pki.file("client.key")
    );
    let proxy = TestProxy::start(&config(&upstream, tls_port, &tls)).await;
    caches_through(&proxy, &redis).await;

    // Without a client certificate the server refuses the handshake: nothing is cached, and
    // every request is still answered by the backend.
    let upstream = TestUpstream::spawn().await;
    let proxy = TestProxy::start(&config(&upstream, tls_port, &format!("ca_file = {:?}", pki.file("ca.pem")))).await;
    for _ in 0..3 {
        let a = get(&proxy.url("/gen/no-client-cert")).await;
        assert_eq!((a.status, a.headers["x-cache"].to_str().unwrap()), (StatusCode::OK, "MISS"));
    }
    assert_eq!(upstream.requests(), 3);
    assert_eq!(get(&proxy.admin_url("/status")).await.json()["redis"]["connected"], false);
}

/// The binary's log lines that contain `needle`, waiting up to 5 s for the first.
fn log_lines(proxy: &BinaryProxy, needle: &str) -> Vec<String> {
    for _ in 0..250 {
        let lines: Vec<String> = proxy.log.lock().unwrap().iter().filter(|l| l.contains(needle)).cloned().collect();
        if !lines.is_empty() {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Vec::new()
}

#[tokio::test]
async fn a_wrong_ca_is_refused_with_a_clear_error_and_requests_still_flow() {
    let pki = Pki::new();
    let other = Pki::new();
    let (redis, tls_port) = tls_redis(&pki, false);
    let upstream = TestUpstream::spawn().await;
    let proxy = BinaryProxy::spawn(&config(&upstream, tls_port, &format!("ca_file = {:?}", other.file("ca.pem"))));

    let failed = log_lines(&proxy, "redis connection failed");
    assert!(!failed.is_empty(), "no connection error logged: {:#?}", proxy.log.lock().unwrap());
    assert!(failed[0].contains("InvalidCertificate") && failed[0].contains("rediss://127.0.0.1:"), "{}", failed[0]);
    for i in 0..5 {
        let a = get(&proxy.url(&format!("/gen/{i}"))).await;
        assert_eq!((a.status, a.headers["x-cache"].to_str().unwrap()), (StatusCode::OK, "MISS"));
    }
    assert_eq!(upstream.requests(), 5);
    assert_eq!(redis.command(&["DBSIZE"]), ":0", "nothing reached the untrusted server");
    // Retries go on in the background (each fails the same way) but are logged once per client
    // (the cache's and the rate limiter's).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let failed = log_lines(&proxy, "redis connection failed");
    for client in ["cache", "ratelimit"] {
        let lines = failed.iter().filter(|l| l.contains(&format!("\"client\":\"{client}\""))).count();
        assert_eq!(lines, 1, "one line per outage for the {client} client: {failed:#?}");
    }
}

#[tokio::test]
async fn insecure_skip_verify_connects_to_anyone_and_says_so() {
    let pki = Pki::new();
    let (redis, tls_port) = tls_redis(&pki, false);
    let upstream = TestUpstream::spawn().await;
    let proxy = BinaryProxy::spawn(&config(&upstream, tls_port, "insecure_skip_verify = true"));
    let warning = log_lines(&proxy, "insecure_skip_verify");
    assert!(warning.iter().any(|l| l.contains("\"WARN\"") && l.contains("NOT verified")), "{warning:?}");
    let admin = format!("http://{}", proxy.admin);
    until_redis_ready(&admin).await;
    assert_eq!(get(&proxy.url("/gen/x")).await.headers["x-cache"], "MISS");
    for _ in 0..250 {
        if entries(&redis) == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the entry never reached redis: {}", get(&format!("{admin}/status")).await.text());
}

#[tokio::test]
async fn unusable_tls_files_fail_start_up_with_the_field_named() {
    let pki = Pki::new();
    let upstream = TestUpstream::spawn().await;
    let (ca, cert) = (pki.file("ca.pem"), pki.file("client.pem"));
    for (tls, expected) in [
        ("ca_file = \"/nonexistent/ca.pem\"".to_string(), "redis.tls.ca_file: cannot load /nonexistent/ca.pem"),
        (
            format!("ca_file = {ca:?}, cert_file = {cert:?}, key_file = \"/nonexistent/client.key\""),
            "redis.tls.key_file: cannot load /nonexistent/client.key",
        ),
        (format!("ca_file = {cert:?}, cert_file = {ca:?}, key_file = {ca:?}"), "redis.tls.key_file: cannot load"),
    ] {
        let path = temp_path("bad-redis-tls.toml");
        std::fs::write(&path, config(&upstream, 6380, &tls)).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_sidecache")).arg("--config").arg(&path).output().unwrap();
        std::fs::remove_file(&path).unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{tls}: {stderr}");
        assert!(stderr.contains(expected), "{tls}: {stderr}");
    }
}

#[tokio::test]
async fn acl_credentials_from_the_environment() {
    // The default user may only PING and list keys; the cache needs the ACL user "app".
    let redis = TestRedis::start_with(&[
        "--user",
        "default",
        "on",
        "nopass",
        "~*",
        "+ping",
        "+dbsize",
        "+keys",
        "--user",
        "app",
        "on",
        ">app-secret",
        "~*",
        "+@all",
    ]);
    let upstream = TestUpstream::spawn().await;
    let text = config_text(
        upstream.addr,
        &format!(
            "[redis]\nurl = \"{}\"\n\n[[route]]\nname = \"cached\"\npath = \"/gen/*\"\ncache = {{ ttl = \"1m\" }}\n",
            redis.url()
        ),
    );
    let env: HashMap<String, String> =
        [("SIDECACHE_REDIS_USERNAME", "app"), ("SIDECACHE_REDIS_PASSWORD", "app-secret")]
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .into();
    let proxy = TestProxy::start_with_env(&text, &env).await;
    caches_through(&proxy, &redis).await;

    // Without them the default user may not even SELECT: nothing is stored, requests are forwarded.
    let proxy = TestProxy::start(&text).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        let a = get(&proxy.url("/gen/anonymous")).await;
        assert_eq!((a.status, a.headers["x-cache"].to_str().unwrap()), (StatusCode::OK, "MISS"));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(entries(&redis), 1, "only the authenticated proxy stored anything");
}
