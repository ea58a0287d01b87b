//! The real `sidecache` binary: exit codes, signals, and memory while streaming large bodies.

mod support;

use std::process::Command;
use std::time::Duration;

use http::{Method, Request, StatusCode};
use support::*;

fn check(toml: &str) -> (i32, String, String) {
    let path = temp_path("check.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sidecache")).arg("--config").arg(&path).arg("--check").output().unwrap();
    let _ = std::fs::remove_file(&path);
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn check_exit_codes_and_messages() {
    let (code, stdout, _) = check(include_str!("../proxy.toml"));
    assert_eq!(code, 0);
    assert!(stdout.starts_with("ok: listen 0.0.0.0:8080 (http), admin 0.0.0.0:9090"), "{stdout}");
    assert!(stdout.contains("2 route(s) [catalog, login]"), "{stdout}");

    let (code, _, stderr) = check("[upstream]\nurl = \"ftp://x\"\n[[route]]\nname = \"a\"\npath = \"x\"\n");
    assert_eq!(code, 2);
    assert!(stderr.contains("upstream.url: \"ftp://x\" must start with http:// or https://"), "{stderr}");
    assert!(stderr.contains("route[0].path: \"x\" must start with /"), "{stderr}");

    let (code, _, stderr) = check("[upstream]\nurl = \"http://x\"\ntimeout = \"1s\"\n");
    assert_eq!(code, 2);
    assert!(stderr.contains("upstream.timeout: unknown field `timeout`"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_sidecache"))
        .args(["--config", "/nonexistent/proxy.toml", "--check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn a_listen_address_in_use_exits_1_with_the_field_named() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let toml = format!(
        "[server]\nlisten = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://127.0.0.1:9\"\n",
        taken.local_addr().unwrap()
    );
    let path = temp_path("inuse.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sidecache")).arg("--config").arg(&path).output().unwrap();
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot listen on") && stderr.contains("server.listen"), "{stderr}");
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_0() {
    let upstream = TestUpstream::spawn().await;
    let mut proxy = BinaryProxy::spawn(&config_text(upstream.addr, "shutdown_grace = \"10s\""));
    let url = proxy.url("/slow/1000");
    let slow = tokio::spawn(async move { get(&url).await });
    while upstream.requests() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    proxy.signal("TERM");
    let readyz = format!("http://{}/readyz", proxy.admin);
    for _ in 0..500 {
        if get(&readyz).await.status == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(get(&readyz).await.status, StatusCode::SERVICE_UNAVAILABLE, "draining shows in /readyz");
    assert!(tokio::net::TcpStream::connect(proxy.addr).await.is_err(), "no new connections after SIGTERM");
    let a = slow.await.unwrap();
    assert_eq!((a.status, a.text().as_str()), (StatusCode::OK, "slow"));
    let status =
        tokio::task::spawn_blocking(move || proxy.wait_exit(Duration::from_secs(5)).map(|s| (s, proxy))).await.unwrap();
    let (status, proxy) = status.expect("exited after the drain");
    assert_eq!(status.code(), Some(0), "exit status");
    let log = proxy.log.lock().unwrap().join("\n");
    assert!(log.contains("shutdown requested") && log.contains("drained"), "{log}");
}

#[tokio::test]
async fn hundred_mib_bodies_stream_both_ways_in_constant_memory() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let upstream = TestUpstream::spawn().await;
    let proxy = BinaryProxy::spawn(&config_text(upstream.addr, ""));
    let baseline = proxy.rss_kib();

    let req =
        Request::builder().method(Method::POST).uri(proxy.url("/upload")).body(boxed(PatternBody::new(SIZE))).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(60), client().request(req)).await.unwrap().unwrap();
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    assert_eq!(body, format!("{SIZE} true"), "the upstream received every byte intact");

    let resp = tokio::time::timeout(Duration::from_secs(60), get_stream(&proxy.url(&format!("/download/{SIZE}"))))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let (len, intact) = tokio::time::timeout(Duration::from_secs(60), consume_pattern(resp.into_body())).await.unwrap();
    assert_eq!((len, intact), (SIZE, true), "the client received every byte intact");

    let peak = proxy.peak_rss_kib();
    assert!(peak < baseline + 32 * 1024, "peak RSS {peak} KiB vs {baseline} KiB at start: bodies were buffered");
}

async fn get_stream(url: &str) -> http::Response<hyper::body::Incoming> {
    let req = Request::get(url).body(boxed(http_body_util::Empty::new())).unwrap();
    client().request(req).await.unwrap()
}
