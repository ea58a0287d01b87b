//! The request path, one function read top to bottom: route → cache → forward → finish.
//! Errors become responses here, once, through [`respond`](crate::respond).

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use ipnet::IpNet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::cache::body::RecordingBody;
use crate::cache::coalesce::{self, Join};
use crate::cache::{Cache, Lookup, LookupResult};
use crate::config::Config;
use crate::metrics::{Metrics, NO_ROUTE};
use crate::respond::{self, CacheOutcome};
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

/// Everything a request needs. One per worker thread (its own upstream pool); the cache is
/// shared by all.
pub struct Proxy {
    routes: Routes,
    upstream: Upstream,
    cache: Option<Arc<Cache>>,
    metrics: Arc<Metrics>,
    trusted_proxies: Vec<IpNet>,
}

impl Proxy {
    /// Build the request path from the validated configuration.
    pub fn new(config: &Config, metrics: Arc<Metrics>, cache: Option<Arc<Cache>>) -> Result<Proxy, TlsError> {
        Ok(Proxy {
            routes: Routes::new(&config.routes),
            upstream: Upstream::new(&config.upstream)?,
            cache,
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

            // 2. Cache: a fresh entry answers at once; a failing store is a miss.
            let cache = route.and_then(|r| self.cache.as_ref().filter(|c| c.caches(r.index)).map(|c| (r.index, c)));
            let mut stale = None;
            let mut miss_key = None;
            let mut outcome = CacheOutcome::None;
            if let Some((index, cache)) = cache {
                match cache.lookup(index, req.method(), req.uri(), req.headers()).await {
                    Some(Lookup::Fresh(entry, _)) => {
                        cache.count_lookup(index, LookupResult::Hit);
                        let head = req.method() == Method::HEAD;
                        let response = respond::from_entry(&entry, head, Some(req.headers()), CacheOutcome::Hit);
                        return self.finish(response, route.map(|r| r.index), started, &conn);
                    }
                    Some(Lookup::Stale(entry, key, by)) => {
                        stale = Some((entry, by));
                        miss_key = Some(key);
                        outcome = CacheOutcome::Miss;
                    }
                    Some(Lookup::Miss(key)) => {
                        cache.count_lookup(index, LookupResult::Miss);
                        miss_key = Some(key);
                        outcome = CacheOutcome::Miss;
                    }
                    Some(Lookup::Unavailable(key)) => {
                        cache.count_lookup(index, LookupResult::Error);
                        miss_key = Some(key);
                        outcome = CacheOutcome::Miss;
                    }
                    Some(Lookup::Bypass(_)) => {
                        cache.count_lookup(index, LookupResult::Bypass);
                        outcome = CacheOutcome::Bypass;
                    }
                    None => {}
                }
            }
            let method = req.method().clone();

            // Coalescing: one upstream fetch per missing key in this process; the others wait for
            // it (at most the response budget) and forward on their own if it yields nothing.
            let mut flight = None;
            if let (Some((_, cache)), Some(key)) = (cache, &miss_key) {
                match cache.join(key) {
                    Join::Lead(guard) if method == Method::GET => flight = Some(guard),
                    Join::Lead(_) => {}
                    Join::Follow(rx) => {
                        if let Some(entry) = coalesce::follow(rx, self.upstream.response_timeout()).await {
                            let response =
                                respond::from_entry(&entry, method == Method::HEAD, None, CacheOutcome::Collapsed);
                            return self.finish(response, route.map(|r| r.index), started, &conn);
                        }
                    }
                }
            }

            // 3. Forward, keeping an HTTP/1.1 upgrade's handshake headers so the backend can accept it.
            let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
            let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
            let trusted = headers::is_trusted(conn.peer.ip(), &self.trusted_proxies);
            upstream::prepare(&mut req, &conn.peer_value, conn.tls, trusted, upgrade);

            let forwarded = self.upstream.forward(req.map(|b| Either::Left(RecordingBody::passthrough(b)))).await;
            let response = match forwarded {
                Ok(forwarded) => {
                    self.metrics.upstream(forwarded.elapsed);
                    let mut response = forwarded.response;
                    // stale-if-error: an expired entry beats the backend's 5xx.
                    if let (Some((entry, by)), true) = (&stale, response.status().is_server_error()) {
                        if crate::cache::policy::serve_on_error(entry, *by) {
                            let (index, cache) = cache.expect("stale implies a cached route");
                            cache.count_lookup(index, LookupResult::Stale);
                            return self.finish(
                                respond::from_entry(entry, method == Method::HEAD, None, CacheOutcome::StaleOnError),
                                Some(index),
                                started,
                                &conn,
                            );
                        }
                    }
                    if let Some((index, cache)) = cache.filter(|_| stale.is_some()) {
                        cache.count_lookup(index, LookupResult::Miss);
                    }
                    if let Some(client_upgrade) = client_upgrade {
                        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                            let upstream_upgrade = hyper::upgrade::on(&mut response);
                            tokio::spawn(upstream::tunnel(client_upgrade, upstream_upgrade).in_current_span());
                        }
                    }
                    // A GET miss on a cacheable response is recorded as it streams to the client.
                    let recorder = match (cache, miss_key) {
                        (Some((index, cache)), Some(key)) if method == Method::GET => {
                            cache.recorder(index, key, response.status(), response.headers(), flight.take())
                        }
                        _ => None,
                    };
                    let mut response = response.map(|body| match recorder {
                        Some((limit, finish)) => Either::Left(RecordingBody::recording(body, limit, finish)),
                        None => Either::Left(RecordingBody::passthrough(body)),
                    });
                    respond::cache_headers(response.headers_mut(), outcome);
                    response
                }
                Err(e) => {
                    self.metrics.upstream_error(e.kind());
                    tracing::debug!(error = %e, source = ?std::error::Error::source(&e), "upstream failed");
                    // stale-if-error: an expired entry beats a 502/504.
                    if let Some((entry, by)) = &stale {
                        if crate::cache::policy::serve_on_error(entry, *by) {
                            let (index, cache) = cache.expect("stale implies a cached route");
                            cache.count_lookup(index, LookupResult::Stale);
                            return self.finish(
                                respond::from_entry(entry, method == Method::HEAD, None, CacheOutcome::StaleOnError),
                                Some(index),
                                started,
                                &conn,
                            );
                        }
                        if let Some((index, cache)) = cache {
                            cache.count_lookup(index, LookupResult::Miss);
                        }
                    }
                    let mut response = respond::upstream_error(&e);
                    respond::cache_headers(response.headers_mut(), outcome);
                    return self.finish_local(response, route.map(|r| r.index), started, &conn);
                }
            };
            self.finish(response, route.map(|r| r.index), started, &conn)
        }
        .instrument(span)
        .await
    }

    /// 4. Finish a forwarded or cached response: `Via`, then [`Proxy::finish_local`].
    fn finish(
        &self,
        mut response: Response<Body>,
        route: Option<usize>,
        started: Instant,
        conn: &Conn,
    ) -> Response<Body> {
        headers::append_via(response.headers_mut(), Version::HTTP_11);
        self.finish_local(response, route, started, conn)
    }

    /// Metrics once, access log at debug.
    fn finish_local(
        &self,
        response: Response<Body>,
        route: Option<usize>,
        started: Instant,
        conn: &Conn,
    ) -> Response<Body> {
        let elapsed = started.elapsed();
        self.metrics.request(route, response.status(), elapsed);
        tracing::debug!(
            target: "sidecache::access",
            peer = %conn.peer,
            status = response.status().as_u16(),
            elapsed_us = elapsed.as_micros() as u64,
        );
        response
    }
}
