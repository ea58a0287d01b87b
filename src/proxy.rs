//! The request path, one function read top to bottom: route → forward → finish.
//! Errors become responses here, once, through [`respond`](crate::respond).

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use ipnet::IpNet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::Config;
use crate::metrics::{Metrics, NO_ROUTE};
use crate::respond;
use crate::route::Routes;
use crate::tls::TlsError;
use crate::upstream::{self, headers, Upstream};
use crate::Body;

/// What the request path knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct Conn {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The peer's address as a header value, made once per connection.
    pub peer_value: HeaderValue,
    /// Whether the client connection is TLS.
    pub tls: bool,
}

impl Conn {
    /// Describe a newly accepted connection.
    pub fn new(peer: SocketAddr, tls: bool) -> Conn {
        Conn { peer, peer_value: headers::peer_value(peer.ip()), tls }
    }
}

/// Everything a request needs, shared by all connections.
pub struct Proxy {
    routes: Routes,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    trusted_proxies: Vec<IpNet>,
}

impl Proxy {
    /// Build the request path from the validated configuration.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Proxy, TlsError> {
        Ok(Proxy {
            routes: Routes::new(&config.routes),
            upstream: Upstream::new(&config.upstream)?,
            metrics,
            trusted_proxies: config.server.trusted_proxies.clone(),
        })
    }

    /// Handle one request. Never fails: every error is a response.
    pub async fn handle(&self, mut req: Request<Incoming>, conn: Conn) -> Response<Body> {
        let started = Instant::now();
        let _inflight = self.metrics.inflight();

        // 1. Route: first match in file order; unmatched requests are plain pass-through.
        let route = self.routes.find(req.method(), req.uri().path());
        let route_name = route.map_or(NO_ROUTE, |r| r.config.name.as_str());
        let span = tracing::debug_span!("request", method = %req.method(), path = req.uri().path(), route = route_name);

        async move {
            // A reverse proxy has no tunnel to offer: CONNECT is refused here, never forwarded.
            if req.method() == Method::CONNECT {
                let response = respond::method_not_allowed("CONNECT is not supported\n");
                self.metrics.request(route.map(|r| r.index), response.status(), started.elapsed());
                return response;
            }

            // 2. Forward, keeping an HTTP/1.1 upgrade's handshake headers so the backend can accept it.
            let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
            let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
            let trusted = headers::is_trusted(conn.peer.ip(), &self.trusted_proxies);
            upstream::prepare(&mut req, &conn.peer_value, conn.tls, trusted, upgrade);

            let response = match self.upstream.forward(req.map(Either::Left)).await {
                Ok(forwarded) => {
                    self.metrics.upstream(forwarded.elapsed);
                    let mut response = forwarded.response;
                    if let Some(client_upgrade) = client_upgrade {
                        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                            let upstream_upgrade = hyper::upgrade::on(&mut response);
                            tokio::spawn(upstream::tunnel(client_upgrade, upstream_upgrade).in_current_span());
                        }
                    }
                    response.map(Either::Left)
                }
                Err(e) => {
                    self.metrics.upstream_error(e.kind());
                    tracing::debug!(error = %e, source = ?std::error::Error::source(&e), "upstream failed");
                    respond::upstream_error(&e)
                }
            };

            // 3. Finish: metrics once, access log at debug.
            let elapsed = started.elapsed();
            self.metrics.request(route.map(|r| r.index), response.status(), elapsed);
            tracing::debug!(
                target: "sidecache::access",
                peer = %conn.peer,
                status = response.status().as_u16(),
                elapsed_us = elapsed.as_micros() as u64,
            );
            response
        }
        .instrument(span)
        .await
    }
}
