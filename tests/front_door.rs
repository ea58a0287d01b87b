//! Request hygiene at the front door, on raw connections to the real server: `Host` as RFC 9112
//! wants it, case-sensitive standard methods, and sidecache's own HTTP version on every answer,
//! an HTTP/1.0 backend's included.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
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
