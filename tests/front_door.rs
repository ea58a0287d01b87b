//! The front door, on raw connections to the real server: connection deadlines, `Host` as RFC
//! 9112 wants it, case-sensitive standard methods, and sidecache's own HTTP version on every
//! answer, an HTTP/1.0 backend's included.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Read one response (head, and a `Content-Length` body) from `stream`: its status line and
/// whole text.
async fn response(stream: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let read = async {
        loop {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before a whole response: {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + length {
                    return text;
                }
            }
        }
    };
    let text = tokio::time::timeout(Duration::from_secs(10), read).await.expect("a response within 10 s");
    (text.lines().next().unwrap().to_string(), text)
}

async fn exchange(proxy: &TestProxy, request: &str) -> (String, String) {
    exchange_at(proxy.addr, request).await
}

async fn exchange_at(addr: std::net::SocketAddr, request: &str) -> (String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    response(&mut stream).await
}

#[tokio::test]
async fn host_fields_and_method_spellings_are_checked_before_anything_else() {
    let upstream = TestUpstream::spawn().await;
    let limited = "[[route]]\nname = \"login\"\npath = \"/gen/login\"\nmethods = [\"POST\"]\nrate_limit = { burst = 1, rate = \"1/1h\" }\n";
    let proxy = TestProxy::start(&config_text(upstream.addr, limited)).await;
    let bad = [
        "GET /gen/a HTTP/1.1\r\n\r\n",
        "GET /gen/a HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
        "post /gen/login HTTP/1.1\r\nHost: a.example\r\nContent-Length: 0\r\n\r\n",
        "Get /gen/a HTTP/1.1\r\nHost: a.example\r\n\r\n",
        // Any method with a lower-case letter: `purge` would pass a route listing `PURGE`.
        "purge /gen/login HTTP/1.1\r\nHost: a.example\r\n\r\n",
    ];
    for request in bad {
        let (status, text) = exchange(&proxy, request).await;
        assert!(status.starts_with("HTTP/1.1 400"), "{request:?}: {text}");
    }
    assert_eq!(upstream.requests(), 0, "none of them reached the backend");
    // An HTTP/1.0 request may leave Host out; an absolute-form target's authority is the host.
    let (status, _) = exchange(&proxy, "GET /gen/ten HTTP/1.0\r\n\r\n").await;
    assert!(status.ends_with(" 200 OK"), "{status}");
    let (status, _) =
        exchange(&proxy, "GET http://target.example/gen/abs HTTP/1.1\r\nHost: other.example\r\n\r\n").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(upstream.seen("/gen/abs")[0]["host"], "target.example");
    // Naming Host in Connection does not take it away from the backend.
    let (status, _) =
        exchange(&proxy, "GET /gen/named HTTP/1.1\r\nHost: shop.example\r\nConnection: host\r\n\r\n").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    assert_eq!(upstream.seen("/gen/named")[0]["host"], "shop.example");
    // Extension methods in upper case pass.
    let (status, _) = exchange(&proxy, "PROPFIND /gen/dav HTTP/1.1\r\nHost: a.example\r\n\r\n").await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
}

#[tokio::test]
async fn an_http_1_0_backend_is_answered_as_http_1_1_on_a_kept_connection() {
    // A legacy backend: HTTP/1.0 answers, the connection closed after each.
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = backend.local_addr().unwrap();
    let served = tokio::spawn(async move {
        for _ in 0..2 {
            let (mut stream, _) = backend.accept().await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                if stream.read(&mut byte).await.unwrap() == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nlegacy").await.unwrap();
        }
    });
    let proxy = TestProxy::start(&config_text(addr, "")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    for _ in 0..2 {
        stream.write_all(b"GET /old HTTP/1.1\r\nHost: a.example\r\n\r\n").await.unwrap();
        let (status, text) = response(&mut stream).await;
        assert!(status.starts_with("HTTP/1.1 200") && text.ends_with("legacy"), "{text}");
        assert!(!text.to_ascii_lowercase().contains("connection: close"), "{text}");
    }
    served.await.unwrap();
}

#[tokio::test]
async fn only_the_listed_upgrades_are_tunnelled() {
    let upstream = TestUpstream::spawn().await;
    let default = TestProxy::start(&config_text(upstream.addr, "")).await;
    let none = TestProxy::start(&config_text(upstream.addr, "upgrades = []")).await;
    let offer = |protocol: &str| {
        format!("GET /headers HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {protocol}\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
    };
    // h2c (and anything unlisted) goes on as a plain request: no Upgrade reaches the backend.
    for (proxy, protocol) in [(&default, "h2c"), (&default, "websocket, h2c"), (&none, "websocket")] {
        let (status, text) = exchange(proxy, &offer(protocol)).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{protocol}: {text}");
        let seen: serde_json::Value = serde_json::from_str(&text[text.find("\r\n\r\n").unwrap() + 4..]).unwrap();
        assert!(seen["headers"].get("upgrade").is_none() && seen["headers"].get("http2-settings").is_none(), "{seen}");
    }
    // A backend that switches anyway is not passed on.
    let handshake = "GET /ws HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";
    let (status, _) = exchange(&none, handshake).await;
    assert!(status.starts_with("HTTP/1.1 502"), "{status}");
    let (status, _) = exchange(&default, handshake).await;
    assert!(status.starts_with("HTTP/1.1 101"), "websocket is tunnelled by default: {status}");
}

/// How long after `from` the server closed `stream` (reading nothing else), at most `limit`.
async fn closed_after(stream: &mut TcpStream, from: Instant, limit: Duration) -> Duration {
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(limit, stream.read(&mut buf)).await.expect("closed in time");
    assert!(read.map_or(true, |n| n == 0), "closed without an answer");
    from.elapsed()
}

#[tokio::test]
async fn silent_and_slow_connections_are_closed_at_the_head_deadline() {
    let upstream = TestUpstream::spawn().await;
    let proxy =
        TestProxy::start(&config_text(upstream.addr, "header_read_timeout = \"2s\"\nmax_connections = 4")).await;
    // Silent sockets fill the proxy port's whole budget: the admin port has its own.
    let start = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    let health = get(&proxy.admin_url("/healthz")).await;
    assert_eq!(health.status, 200);
    assert!(start.elapsed() < Duration::from_secs(2), "the admin port answered at once");
    // More silent sockets than the admin budget: the liveness probe waits only for the deadline.
    for _ in 0..70 {
        silent.push(TcpStream::connect(proxy.admin).await.unwrap());
    }
    let probe = Instant::now();
    let health = tokio::time::timeout(Duration::from_secs(8), get(&proxy.admin_url("/healthz"))).await;
    assert_eq!(health.expect("healthz answers once the deadline frees the budget").status, 200);
    assert!(probe.elapsed() < Duration::from_secs(5), "{:?}", probe.elapsed());
    let proxied = tokio::time::timeout(Duration::from_secs(8), get(&proxy.url("/gen/a"))).await;
    assert_eq!(proxied.expect("the proxy port answers once the deadline frees it").status, 200);
    for stream in &mut silent[..4] {
        let after = closed_after(stream, start, Duration::from_secs(5)).await;
        assert!(after >= Duration::from_secs(2), "{after:?}");
    }

    // A head sent a byte at a time gets the same deadline from its first byte.
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    let start = Instant::now();
    let trickle = b"GET /gen/slow HTTP/1.1\r\nHost: a.example\r\nX-Pad: ";
    let mut closed = false;
    for byte in trickle.iter().chain(std::iter::repeat(&b'a')).take(60) {
        if slow.write_all(&[*byte]).await.is_err() {
            closed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = if closed { start.elapsed() } else { closed_after(&mut slow, start, Duration::from_secs(5)).await };
    assert!((Duration::from_secs(2)..Duration::from_secs(5)).contains(&after), "{after:?}");
    assert!(upstream.seen("/gen/slow").is_empty());
}

#[tokio::test]
async fn idle_connections_close_but_requests_and_tunnels_outlast_the_idle_timeout() {
    let upstream = TestUpstream::new().route("/gen/late", Reply::ok().delay(Duration::from_millis(2500))).spawn().await;
    let proxy =
        TestProxy::start(&config_text(upstream.addr, "idle_timeout = \"1s\"\nheader_read_timeout = \"1s\"")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    // A request that takes longer than both timeouts, then one more on the same connection.
    for path in ["/gen/late", "/gen/next"] {
        stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: a.example\r\n\r\n").as_bytes()).await.unwrap();
        let (status, text) = response(&mut stream).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{text}");
    }
    let idle = Instant::now();
    let after = closed_after(&mut stream, idle, Duration::from_secs(5)).await;
    assert!((Duration::from_millis(900)..Duration::from_secs(3)).contains(&after), "{after:?}");

    // h2: an idle connection ends too.
    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(proxy.addr).await.unwrap());
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.unwrap();
    let conn = tokio::spawn(conn);
    let req = http::Request::get("http://a.example/gen/h2").body(boxed(http_body_util::Empty::new())).unwrap();
    assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
    let idle = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn).await.expect("the idle h2 connection ended").unwrap().ok();
    assert!(idle.elapsed() >= Duration::from_millis(900), "{:?}", idle.elapsed());

    // A WebSocket tunnel is not idle: it lives until either side closes it.
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/ws", proxy.addr), stream).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    ws.send(Message::text("still here")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(echoed, Message::text("still here"));
}

#[tokio::test]
async fn a_malformed_request_body_is_the_clients_error() {
    let upstream = TestUpstream::new().route("/gen/slow", Reply::ok().delay(Duration::from_secs(3))).spawn().await;
    let proxy = TestProxy::start(&config_full(upstream.addr, "", "response_timeout = \"1s\"", "")).await;
    let head = "POST /upload HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n";
    let long_extension = format!("5;ext={}\r\nhello\r\n0\r\n\r\n", "x".repeat(70_000));
    for body in ["5\r\nhello\r\nzz\r\nmore\r\n0\r\n\r\n", &long_extension] {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        // The backend has the head (and the body's start) before the bad chunk arrives.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = stream.write_all(body.as_bytes()).await;
        let (status, text) = response(&mut stream).await;
        assert!(status.starts_with("HTTP/1.1 400"), "{}: {text}", &body[..10]);
    }
    // A body that stops arriving: the time runs out on the client, not on the backend.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: a.example\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let (status, text) = response(&mut stream).await;
    assert!(status.starts_with("HTTP/1.1 408"), "{text}");
    let metrics = get(&proxy.admin_url("/metrics")).await.text();
    let errors: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("sidecache_upstream_errors_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(errors, 0.0, "{metrics}");
    // A backend that is too slow still is the backend's.
    let (status, _) =
        exchange(&proxy, "POST /gen/slow HTTP/1.1\r\nHost: a.example\r\nContent-Length: 2\r\n\r\nok").await;
    assert!(status.starts_with("HTTP/1.1 504"), "{status}");
    until_metric(proxy.admin, "sidecache_upstream_errors_total{kind=\"timeout\"}", 1.0).await;
}

#[tokio::test]
async fn spellings_of_a_limited_path_take_the_same_bucket() {
    let upstream = TestUpstream::spawn().await;
    let routes = "[[route]]\nname = \"login\"\npath = \"/gen/login\"\nmethods = [\"POST\"]\nrate_limit = { burst = 1, rate = \"1/1h\" }\n\
                  [[route]]\nname = \"iis\"\npath = \"/gen/iis\"\nmethods = [\"POST\"]\ncase_insensitive = true\nrate_limit = { burst = 1, rate = \"1/1h\" }\n\
                  [[route]]\nname = \"exact\"\npath = \"/gen/exact\"\nmethods = [\"POST\"]\ntrailing_slash = \"distinct\"\nrate_limit = { burst = 1, rate = \"1/1h\" }\n";
    let proxy = TestProxy::start(&config_text(upstream.addr, routes)).await;
    let post = |path: &str| format!("POST {path} HTTP/1.1\r\nHost: a.example\r\nContent-Length: 0\r\n\r\n");
    let (status, _) = exchange(&proxy, &post("/gen/login")).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    for dodge in [
        "/gen/login/",
        "/gen/login;jsessionid=x",
        "/gen/login/.",
        "/gen//login",
        "/gen/x/..;/login",
        "/gen/%6cogin",
        "/gen%2Flogin",
        "/gen/%u006Cogin",
        "/gen\\login",
    ] {
        let (status, text) = exchange(&proxy, &post(dodge)).await;
        assert!(status.starts_with("HTTP/1.1 429"), "{dodge}: {text}");
    }
    // Case counts unless the route says the backend ignores it.
    let (status, _) = exchange(&proxy, &post("/gen/Login")).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let (status, _) = exchange(&proxy, &post("/gen/iis")).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let (status, _) = exchange(&proxy, &post("/gen/IIS/")).await;
    assert!(status.starts_with("HTTP/1.1 429"), "{status}");
    // trailing_slash = "distinct": the slashed path is another resource.
    for path in ["/gen/exact", "/gen/exact/"] {
        let (status, _) = exchange(&proxy, &post(path)).await;
        assert!(status.starts_with("HTTP/1.1 200"), "{path}: {status}");
    }
    // The backend gets the request as sent.
    assert_eq!(upstream.seen("/gen/Login").len(), 1);
    assert_eq!(upstream.seen("/gen/exact/").len(), 1);
}

#[tokio::test]
async fn a_tunnel_keeps_its_connection_slot_and_the_admin_port_speaks_http_1_only() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let upstream = TestUpstream::spawn().await;
    let proxy = TestProxy::start(&config_text(upstream.addr, "max_connections = 1")).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/ws", proxy.addr), stream).await.unwrap();
    // The tunnel is the one connection allowed: another waits in the accept queue.
    let waiting = tokio::spawn(exchange_at(proxy.addr, "GET /gen/after HTTP/1.1\r\nHost: a.example\r\n\r\n"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a tunnel counts against server.max_connections");
    ws.send(Message::Close(None)).await.unwrap();
    drop(ws);
    let (status, _) = tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("admitted").unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");

    let io = hyper_util::rt::TokioIo::new(TcpStream::connect(proxy.admin).await.unwrap());
    let h2 = async {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await.ok()?;
        tokio::spawn(conn);
        let req = http::Request::get("http://a.example/healthz").body(boxed(http_body_util::Empty::new())).unwrap();
        sender.send_request(req).await.ok()
    };
    let answered = tokio::time::timeout(Duration::from_secs(5), h2).await.expect("refused in time");
    assert!(answered.is_none(), "the admin port does not speak h2");
}

#[tokio::test]
async fn only_a_path_in_normal_form_uses_a_routes_cache() {
    let upstream = TestUpstream::spawn().await;
    let routes = "[[route]]\nname = \"api\"\npath = \"/gen/api/*\"\ncache = { ttl = \"1m\" }\n";
    let proxy = TestProxy::start(&config_text(upstream.addr, routes)).await;
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: a.example\r\n\r\n");
    // Matched as /gen/api/..., but a backend that does not decode %2F serves another resource.
    for path in ["/gen/api/x%2F..%2Fother", "/gen/api/a;v=1", "/gen/api/a"] {
        for _ in 0..2 {
            let (status, _) = exchange(&proxy, &get(path)).await;
            assert!(status.starts_with("HTTP/1.1 200"), "{path}: {status}");
        }
    }
    assert_eq!(upstream.seen("/gen/api/x%2F..%2Fother").len(), 2, "never stored");
    assert_eq!(upstream.seen("/gen/api/a;v=1").len(), 2, "never stored");
    assert_eq!(upstream.seen("/gen/api/a").len(), 1, "the normal form is cached");
}

#[tokio::test]
async fn an_h2_client_that_grants_no_window_is_cut_off_after_the_idle_timeout() {
    let upstream = TestUpstream::spawn().await;
    let proxy = TestProxy::start(&config_text(upstream.addr, "idle_timeout = \"1s\"")).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let mut frames = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS: INITIAL_WINDOW_SIZE = 0, so no response body can ever be sent.
    frames.extend_from_slice(&[0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 0x4, 0, 0, 0, 0]);
    // HEADERS (END_STREAM | END_HEADERS) on stream 1: GET http://a/gen/starved.
    let block = [&[0x82, 0x86, 0x04, 12][..], b"/gen/starved", &[0x01, 0x01, b'a']].concat();
    frames.extend_from_slice(&[0, 0, block.len() as u8, 0x1, 0x5, 0, 0, 0, 1]);
    frames.extend_from_slice(&block);
    // The preface's first byte alone: the connection's first read cannot tell it is h2.
    stream.write_all(&frames[..1]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    stream.write_all(&frames[1..]).await.unwrap();
    let start = Instant::now();
    // Read what the server sends (its SETTINGS, the response head) until it closes.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection was closed");
    assert!(start.elapsed() >= Duration::from_millis(900), "{:?}", start.elapsed());
    assert_eq!(upstream.seen("/gen/starved").len(), 1, "the request was served up to the window");
}
