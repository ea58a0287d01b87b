//! Pass-through behaviour through the real server: bodies, headers, upgrades, h2c, failures,
//! routing and the admin endpoints.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::time::Instant;

#[tokio::test]
async fn methods_round_trip_bodies_byte_exact() {
    let upstream = TestUpstream::spawn().await;
    let proxy = TestProxy::start(&config_text(upstream.addr, "")).await;
    let body: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    for method in [Method::GET, Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
        let a = send(
            method.clone(),
            &proxy.url("/echo/x?q=1"),
            &[("content-type", "application/octet-stream")],
            body.clone(),
        )
        .await;
        assert_eq!(a.status, StatusCode::OK, "{method}");
        assert_eq!(a.headers["x-echo-method"], method.as_str());
        assert_eq!(a.headers["content-type"], "application/octet-stream");
        assert!(a.body == body, "{method}: body differs");
    }
    let empty = send(Method::POST, &proxy.url("/echo"), &[], Bytes::new()).await;
    assert_eq!(empty.status, StatusCode::OK);
    assert!(empty.body.is_empty());
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_and_forwarding_headers_set() {
    let upstream = TestUpstream::spawn().await;
    let proxy = TestProxy::start(&config_text(upstream.addr, "")).await;
    let a = send(
        Method::GET,
        &proxy.url("/headers"),
        &[
            ("host", "shop.example"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("x-end-to-end", "yes"),
        ],
        Bytes::new(),
    )
    .await;
    let seen = a.json();
    let h = &seen["headers"];
    for gone in ["x-secret-hop", "keep-alive", "proxy-connection", "te"] {
        assert!(h.get(gone).is_none(), "{gone} was forwarded: {seen}");
    }
    assert_eq!(h["host"][0], "shop.example", "Host is kept as sent");
    assert_eq!(h["x-end-to-end"][0], "yes");
    assert_eq!(h["x-forwarded-for"][0], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"][0], "http", "an untrusted peer cannot claim https");
    assert_eq!(h["x-forwarded-host"][0], "shop.example");
    assert_eq!(h["via"][0], "1.1 sidecache");

    let hop = get(&proxy.url("/hop")).await;
    assert_eq!(hop.body, "hop");
    assert!(hop.headers.get("x-hop-secret").is_none());
    assert!(hop.headers.get("keep-alive").is_none());
    assert_eq!(hop.headers["x-end-to-end"], "kept");
    assert_eq!(hop.headers["via"], "1.1 sidecache");
}

#[tokio::test]
async fn a_trusted_proxy_keeps_its_forwarding_headers() {
    let upstream = TestUpstream::spawn().await;
    let proxy = TestProxy::start(&config_text(upstream.addr, "trusted_proxies = [\"127.0.0.0/8\"]")).await;
    let a = send(
        Method::GET,
        &proxy.url("/headers"),
        &[("x-forwarded-proto", "https"), ("x-forwarded-host", "public.example"), ("x-forwarded-for", "198.51.100.1")],
        Bytes::new(),
    )
    .await;
    let h = &a.json()["headers"];
    assert_eq!(h["x-forwarded-proto"][0], "https");
    assert_eq!(h["x-forwarded-host"][0], "public.example");
    assert_eq!(h["x-forwarded-for"][0], "198.51.100.1, 127.0.0.1");
}

#[tokio::test]
async fn websocket_echo_through_the_proxy() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let upstream = TestUpstream::spawn().await;
    let proxy = TestProxy::start(&config_text(upstream.addr, "")).await;
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut ws, resp) =
        tokio_tungstenite::client_async(format!("ws://{}/ws", proxy.addr), stream).await.expect("handshake");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..20 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(echoed, Message::text(format!("hello {i}")));
    }
    let blob: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
    ws.send(Message::binary(blob.clone())).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echoed.into_data(), Bytes::from(blob));
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn h2c_client_through_the_proxy() {
    let upstream = TestUpstream::spawn().await;
    let proxy = TestProxy::start(&config_text(upstream.addr, "")).await;
    let io = TokioIo::new(tokio::net::TcpStream::connect(proxy.addr).await.unwrap());
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);

    let req = Request::get("http://h2.example:8080/headers").body(boxed(http_body_util::Empty::new())).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let seen: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(seen["version"], "HTTP/1.1", "the backend speaks HTTP/1.1");
    assert_eq!(seen["headers"]["host"][0], "h2.example:8080", ":authority becomes Host");
    assert_eq!(seen["headers"]["via"][0], "2 sidecache");

    // Several concurrent streams on the one connection, each with its own body.
    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!("stream {i} ").repeat(1000);
            let req = Request::post("http://h2.example/echo")
                .body(boxed(http_body_util::Full::new(Bytes::from(body.clone()))))
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), body);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn upstream_down_gives_502_fast() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = TestProxy::start(&config_text(closed, "")).await;
    let started = Instant::now();
    let a = get(&proxy.url("/anything")).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert_eq!(a.text(), "upstream unreachable\n");
    assert!(started.elapsed() < Duration::from_secs(1), "took {:?}", started.elapsed());
    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    assert_eq!(metric(&metrics, r#"sidecache_upstream_errors_total{kind="connect"}"#), Some(1.0), "{metrics}");
    assert_eq!(metric(&metrics, r#"sidecache_requests_total{route="-",status_class="5xx"}"#), Some(1.0));
}

#[tokio::test]
async fn slow_upstream_gives_504_at_response_timeout_and_is_cancelled() {
    let upstream = TestUpstream::spawn().await;
    let proxy = TestProxy::start(&config_full(upstream.addr, "", "response_timeout = \"300ms\"", "")).await;
    let started = Instant::now();
    let a = get(&proxy.url("/slow/5000")).await;
    let elapsed = started.elapsed();
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(a.text(), "upstream did not respond in time\n");
    assert!(elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(2), "took {elapsed:?}");
    wait_for(|| upstream.state.cancelled.load(std::sync::atomic::Ordering::SeqCst) == 1).await;
    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    assert_eq!(metric(&metrics, r#"sidecache_upstream_errors_total{kind="timeout"}"#), Some(1.0), "{metrics}");
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_upstream_request() {
    let upstream = TestUpstream::spawn().await;
    let proxy = TestProxy::start(&config_text(upstream.addr, "")).await;
    let url = proxy.url("/slow/10000");
    let _ = tokio::time::timeout(Duration::from_millis(300), get(&url)).await;
    wait_for(|| upstream.state.cancelled.load(std::sync::atomic::Ordering::SeqCst) == 1).await;
    assert_eq!(upstream.state.completed_slow.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_oversized_request_head_gets_431() {
    let upstream = TestUpstream::spawn().await;
    let proxy = TestProxy::start(&config_text(upstream.addr, "max_header_bytes = 16384")).await;
    let big = "x".repeat(20_000);
    let a = send(Method::GET, &proxy.url("/headers"), &[("x-big", &big)], Bytes::new()).await;
    assert_eq!(a.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(upstream.requests(), 0);
    let ok = send(Method::GET, &proxy.url("/headers"), &[("x-fits", &big[..8000])], Bytes::new()).await;
    assert_eq!(ok.status, StatusCode::OK);
}

#[tokio::test]
async fn routes_match_in_file_order_and_label_metrics() {
    let upstream = TestUpstream::spawn().await;
    let routes = r#"
[[route]]
name = "model-versions"
path = "/api/models/{id}/versions"
[[route]]
name = "models"
path = "/api/models/*"
[[route]]
name = "users"
path = "/users/{id}"
methods = ["GET", "POST"]
[[route]]
name = "home"
path = "/"
"#;
    let proxy = TestProxy::start(&config_text(upstream.addr, routes)).await;
    let table: &[(Method, &str, &str)] = &[
        (Method::GET, "/api/models/7/versions", "model-versions"),
        (Method::GET, "/api/models/7", "models"),
        (Method::HEAD, "/api/models", "models"),
        (Method::GET, "/api//models/7/../8", "models"),
        (Method::POST, "/api/models/7", "-"),
        (Method::POST, "/users/7", "users"),
        (Method::DELETE, "/users/7", "-"),
        (Method::GET, "/users/7/x", "-"),
        (Method::GET, "/", "home"),
        (Method::GET, "/elsewhere", "-"),
    ];
    for (method, path, _) in table {
        let a = send(method.clone(), &proxy.url(path), &[], Bytes::new()).await;
        assert_eq!(a.status, StatusCode::OK, "{method} {path}");
    }
    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    for (route, expected) in [("model-versions", 1.0), ("models", 3.0), ("users", 1.0), ("home", 1.0), ("-", 4.0)] {
        let series = format!(r#"sidecache_requests_total{{route="{route}",status_class="2xx"}}"#);
        assert_eq!(metric(&metrics, &series), Some(expected), "{series}\n{metrics}");
    }
    assert_eq!(upstream.requests(), table.len());
}

#[tokio::test]
async fn admin_endpoints() {
    let upstream = TestUpstream::spawn().await;
    let routes = "[[route]]\nname = \"catalog\"\npath = \"/api/*\"\ncache = { ttl = \"5m\" }\n";
    let proxy = TestProxy::start(&config_text(upstream.addr, routes)).await;
    assert_eq!(get(&proxy.url("/api/x")).await.status, StatusCode::OK);

    let health = get(&proxy.admin_url("/healthz")).await;
    assert_eq!((health.status, health.text().as_str()), (StatusCode::OK, "ok\n"));
    assert_eq!(get(&proxy.admin_url("/readyz")).await.status, StatusCode::OK);

    let status = get(&proxy.admin_url("/status")).await;
    assert_eq!(status.headers["content-type"], "application/json");
    let s = status.json();
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["upstream"], format!("http://{}/", upstream.addr));
    assert_eq!(s["routes"][0]["name"], "catalog");
    assert_eq!(s["routes"][0]["path"], "/api/*");
    assert_eq!(s["routes"][0]["cache"], true);
    assert!(s["uptime_seconds"].is_u64());

    let metrics = get(&proxy.admin_url("/metrics")).await;
    assert!(metrics.headers["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = metrics.text();
    assert_eq!(metric(&text, r#"sidecache_requests_total{route="catalog",status_class="2xx"}"#), Some(1.0));
    assert_eq!(metric(&text, "sidecache_inflight_requests"), Some(0.0), "{text}");
    assert!(text.contains("sidecache_upstream_duration_seconds_count 1"), "{text}");
    assert!(text.contains(r#"sidecache_request_duration_seconds_count{route="catalog"} 1"#), "{text}");

    assert_eq!(get(&proxy.admin_url("/nope")).await.status, StatusCode::NOT_FOUND);
    let post = send(Method::POST, &proxy.admin_url("/healthz"), &[], Bytes::new()).await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn shutdown_drains_in_flight_requests_and_readiness_turns_503() {
    let upstream = TestUpstream::spawn().await;
    let mut proxy = TestProxy::start(&config_text(upstream.addr, "shutdown_grace = \"10s\"")).await;
    let url = proxy.url("/slow/800");
    let slow = tokio::spawn(async move { get(&url).await });
    wait_for(|| upstream.requests() == 1).await;
    let admin = proxy.admin_url("/readyz");
    let addr = proxy.addr;
    let drained = proxy.shutdown();
    wait_for_async(|| {
        let admin = admin.clone();
        async move { get(&admin).await.status == StatusCode::SERVICE_UNAVAILABLE }
    })
    .await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "new connections are refused while draining");
    let a = slow.await.unwrap();
    assert_eq!((a.status, a.text().as_str()), (StatusCode::OK, "slow"));
    tokio::time::timeout(Duration::from_secs(5), drained).await.expect("drain finished").unwrap();
}

#[tokio::test]
async fn shutdown_grace_bounds_the_drain() {
    let upstream = TestUpstream::spawn().await;
    let mut proxy = TestProxy::start(&config_text(upstream.addr, "shutdown_grace = \"300ms\"")).await;
    let url = proxy.url("/slow/10000");
    let _slow = tokio::spawn(async move { get(&url).await });
    wait_for(|| upstream.requests() == 1).await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), proxy.shutdown()).await.expect("drain bounded").unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3), "drain took {took:?}");
}

/// Poll a condition every 10 ms for up to 5 s.
async fn wait_for(cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "condition not met within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn wait_for_async<F, Fut>(cond: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond().await {
        assert!(Instant::now() < deadline, "condition not met within 5 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn head_and_bodiless_statuses_pass_through() {
    let upstream = TestUpstream::spawn().await;
    let proxy = TestProxy::start(&config_text(upstream.addr, "")).await;
    let head = send(Method::HEAD, &proxy.url("/download/5000"), &[], Bytes::new()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    for code in [204u16, 304, 404, 500, 503] {
        let a = get(&proxy.url(&format!("/status/{code}"))).await;
        assert_eq!(a.status.as_u16(), code);
        assert!(a.body.is_empty());
    }
    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    assert_eq!(metric(&metrics, r#"sidecache_requests_total{route="-",status_class="5xx"}"#), Some(2.0));
    assert_eq!(
        metric(&metrics, r#"sidecache_upstream_errors_total{kind="protocol"}"#),
        Some(0.0),
        "a 5xx answer is not an upstream error"
    );
}

#[tokio::test]
async fn chunked_upload_of_unknown_length_streams_through() {
    // No size hint: the body goes out with Transfer-Encoding: chunked on both hops.
    struct Unsized(PatternBody);
    impl hyper::body::Body for Unsized {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
            std::pin::Pin::new(&mut self.get_mut().0).poll_frame(cx)
        }
    }
    let upstream = TestUpstream::spawn().await;
    let proxy = TestProxy::start(&config_text(upstream.addr, "")).await;
    let req = Request::post(proxy.url("/upload")).body(boxed(Unsized(PatternBody::new(3_000_000)))).unwrap();
    let resp = client().request(req).await.unwrap();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "3000000 true");
}

#[tokio::test]
async fn an_upstream_speaking_garbage_gives_502() {
    let garbage = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = garbage.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = garbage.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(b"this is not HTTP\r\n\r\n").await;
        }
    });
    let proxy = TestProxy::start(&config_text(addr, "")).await;
    let a = get(&proxy.url("/x")).await;
    assert_eq!((a.status, a.text().as_str()), (StatusCode::BAD_GATEWAY, "upstream closed the connection\n"));
    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    assert_eq!(metric(&metrics, r#"sidecache_upstream_errors_total{kind="protocol"}"#), Some(1.0), "{metrics}");
}

#[tokio::test]
async fn an_upstream_that_never_accepts_gives_504_at_connect_timeout() {
    // A listener with a backlog of 1 that never accepts: once its queue is full the kernel drops
    // further SYNs, so a connect hangs as it would to a dead host, all on loopback.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let full = socket.listen(1).unwrap();
    let addr = full.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await
        {
            fillers.push(s);
        }
    }
    let proxy = TestProxy::start(&config_full(addr, "", "connect_timeout = \"300ms\"", "")).await;
    let started = Instant::now();
    let a = get(&proxy.url("/x")).await;
    let elapsed = started.elapsed();
    assert_eq!((a.status, a.text().as_str()), (StatusCode::GATEWAY_TIMEOUT, "upstream connect timed out\n"));
    assert!(elapsed >= Duration::from_millis(300) && elapsed < Duration::from_secs(3), "took {elapsed:?}");
    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    assert_eq!(metric(&metrics, r#"sidecache_upstream_errors_total{kind="connect_timeout"}"#), Some(1.0), "{metrics}");
    drop(full);
}

#[tokio::test]
async fn connect_is_refused_not_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = TestUpstream::spawn().await;
    let proxy = TestProxy::start(&config_text(upstream.addr, "")).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"CONNECT example.com:443 HTTP/1.1\r\nhost: example.com:443\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.unwrap().unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
    assert_eq!(upstream.requests(), 0);
}

#[tokio::test]
async fn an_http10_request_without_host_reaches_the_backend_in_origin_form_with_the_backends_host() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = TestUpstream::spawn().await;
    let proxy = TestProxy::start(&config_text(upstream.addr, "")).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /gen/old?q=1 HTTP/1.0\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"), "{answer}");
    let seen = upstream.seen("/gen/old?q=1");
    assert_eq!(seen.len(), 1, "the backend saw the target in origin form");
    assert_eq!(seen[0].get_all("host").iter().collect::<Vec<_>>(), [&upstream.addr.to_string()]);
}
