//! The benchmark's backend: answers every request with a 1 KiB body, after 20 ms for paths under
//! `/slow/`. Usage: `bench-upstream 127.0.0.1:PORT`. Runs until killed.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

#[tokio::main]
async fn main() {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await.expect("bind");
    let body = Bytes::from(vec![b'x'; 1024]);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move {
                    if req.uri().path().starts_with("/slow/") {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}
