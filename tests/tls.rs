//! The proxy listener with TLS: HTTP/1.1 and h2 by ALPN, and X-Forwarded-Proto: https.

mod support;

use std::sync::Arc;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use support::*;

struct Cert {
    der: rustls::pki_types::CertificateDer<'static>,
    cert_path: std::path::PathBuf,
    key_path: std::path::PathBuf,
}

impl Drop for Cert {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cert_path);
        let _ = std::fs::remove_file(&self.key_path);
    }
}

fn self_signed() -> Cert {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_path = temp_path("tls.crt");
    let key_path = temp_path("tls.key");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    Cert { der: cert.cert.der().clone(), cert_path, key_path }
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    cert: &Cert,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    sidecache::tls::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    connector.connect(ServerName::try_from("localhost").unwrap(), tcp).await.expect("TLS handshake")
}

#[tokio::test]
async fn tls_listener_serves_http1_and_h2() {
    let upstream = TestUpstream::spawn().await;
    let cert = self_signed();
    let tls_line =
        format!("tls = {{ cert = \"{}\", key = \"{}\" }}", cert.cert_path.display(), cert.key_path.display());
    let proxy = TestProxy::start(&config_text(upstream.addr, &tls_line)).await;

    let io = TokioIo::new(tls_connect(proxy.addr, &cert, b"http/1.1").await);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("/headers").header("host", "localhost").body(boxed(http_body_util::Empty::new())).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let seen: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(seen["headers"]["x-forwarded-proto"][0], "https");

    let io = TokioIo::new(tls_connect(proxy.addr, &cert, b"h2").await);
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://localhost/headers").body(boxed(http_body_util::Empty::new())).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let seen: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(seen["headers"]["x-forwarded-proto"][0], "https");
    assert_eq!(seen["headers"]["host"][0], "localhost");

    // A plain-text client on the TLS port gets nothing served, and the listener keeps working.
    let plain = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"GET /headers HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        buf
    })
    .await
    .unwrap();
    assert!(!String::from_utf8_lossy(&plain).contains("200 OK"));
    assert_eq!(upstream.requests(), 2);
}

#[tokio::test]
async fn unusable_tls_files_fail_start_up_with_the_field_named() {
    let cert = self_signed();
    let toml = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"/nonexistent.key\" }}\n[admin]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"http://127.0.0.1:9\"\n",
        cert.cert_path.display()
    );
    let config = sidecache::Config::from_sources(&toml, &Default::default()).unwrap();
    let err = sidecache::Sidecache::bind(config).await.err().expect("start-up fails");
    let text = err.to_string();
    assert!(text.starts_with("server.tls: cannot load /nonexistent.key"), "{text}");
}

/// A TLS upstream on 127.0.0.1:0 that answers every request with "secure <path>".
async fn tls_upstream(cert: &Cert) -> std::net::SocketAddr {
    sidecache::tls::install_crypto_provider();
    let files = sidecache::config::TlsFiles { cert: cert.cert_path.clone(), key: cert.key_path.clone() };
    let acceptor = sidecache::tls::acceptor(&files).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let body = format!("secure {}", req.uri().path());
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from(body),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_upstream_is_verified_against_ca_file() {
    let cert = self_signed();
    let upstream = tls_upstream(&cert).await;
    let https = |extra: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"https://localhost:{}\"\n{extra}\n",
            upstream.port()
        )
    };
    let trusted = TestProxy::start(&https(&format!("ca_file = \"{}\"", cert.cert_path.display()))).await;
    let a = get(&trusted.url("/over/tls")).await;
    assert_eq!((a.status, a.text().as_str()), (StatusCode::OK, "secure /over/tls"));

    let untrusted = TestProxy::start(&https("")).await;
    let a = get(&untrusted.url("/over/tls")).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "an unverifiable upstream certificate is refused");
}
