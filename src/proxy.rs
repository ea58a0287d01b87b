//! The request path, read top to bottom: route → rate limit → prepare → cache begin → forward →
//! cache finish → answer.
//! Errors become responses here, once, through [`respond`](crate::respond).

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::Instrument;

use crate::body::{Body, Streamed};
use crate::cache::outcome::CACHE_STATUS;
use crate::cache::{invalidate, Begin, Cache, Exchange, RouteCache};
use crate::config::{Config, ServerConfig};
use crate::deadline::Activity;
use crate::metrics::{Metrics, RouteMetrics, NO_ROUTE};
use crate::ratelimit::{RateLimiter, Verdict};
use crate::reload::Active;
use crate::respond;
use crate::route::{self, Route, Routes};
use crate::telemetry;
use crate::tls::TlsError;
use crate::upstream::{self, headers, Hop, Upstream};

/// What the request path knows about the connection a request came on.
#[derive(Debug, Clone)]
pub struct Conn {
    /// The TCP peer.
    pub peer: SocketAddr,
    /// The peer's address as a header value, made once per connection.
    pub peer_value: HeaderValue,
    /// Whether the client connection is TLS.
    pub tls: bool,
    /// Whether requests are in progress on the connection (its deadlines wait while they are).
    pub activity: Arc<Activity>,
}

impl Conn {
    /// Describe a newly accepted connection, which holds `permit` (its place in the listener's
    /// connection budget) for as long as it or its upgraded tunnel lives.
    pub fn new(peer: SocketAddr, tls: bool, permit: OwnedSemaphorePermit) -> Conn {
        Conn { peer, peer_value: headers::peer_value(peer.ip()), tls, activity: Arc::new(Activity::new(permit)) }
    }
}

/// Everything a request needs. One per worker thread (its own upstream pool); the configuration
/// in force, the cache and the rate limiter are shared by all.
pub struct Proxy {
    active: Arc<ArcSwap<Active>>,
    upstream: Upstream,
    cache: Option<Arc<Cache>>,
    limiter: Option<Arc<RateLimiter>>,
    metrics: Arc<Metrics>,
    /// The request metrics of requests no route matched.
    unrouted: RouteMetrics,
}

impl Proxy {
    /// Build one worker's request path around the shared parts.
    pub fn new(
        config: &Config,
        active: Arc<ArcSwap<Active>>,
        metrics: Arc<Metrics>,
        cache: Option<Arc<Cache>>,
        limiter: Option<Arc<RateLimiter>>,
    ) -> Result<Proxy, TlsError> {
        Ok(Proxy {
            active,
            upstream: Upstream::new(&config.upstream)?,
            cache,
            limiter,
            unrouted: metrics.route(NO_ROUTE),
            metrics,
        })
    }

    /// Called once by the worker thread that runs this proxy, on its runtime: connections that
    /// belong to the worker are started here.
    pub fn attach(&self, worker: usize) {
        if let Some(redis) = self.limiter.as_ref().and_then(|l| l.redis()) {
            redis.attach(worker);
        }
    }

    /// Handle one request. Never fails: every error is a response.
    pub async fn handle(&self, req: Request<Incoming>, conn: Conn) -> Response<Body> {
        let started = Instant::now();
        let _inflight = self.metrics.inflight();

        // 1. Route: first match in file order; unmatched requests are plain pass-through. The
        // request keeps the configuration it started with to its end, whatever a reload does.
        let active = self.active.load_full();
        let (server, routes) = (&active.config.server, &active.routes);
        let trusted = &server.trusted_proxies;
        let (route, normal_path) = routes.find(req.method(), req.uri().path());
        let route_metrics = route.map_or(&self.unrouted, |r| &r.metrics);
        // Field names are OpenTelemetry's: with traces on, this span is exported as it is.
        // Client-chosen values are clipped: a span holds them until it is exported.
        let span = tracing::debug_span!(
            "request",
            otel.kind = "server",
            otel.name = Empty,
            http.request.method = telemetry::clip(req.method().as_str()),
            url.path = telemetry::clip(req.uri().path()),
            url.scheme = if conn.tls { "https" } else { "http" },
            http.route = Empty,
            sidecache.route = route.map_or(NO_ROUTE, |r| r.name.as_str()),
            client.address = Empty,
            network.peer.address = Empty,
            http.response.status_code = Empty,
            sidecache.ratelimit.result = Empty,
            sidecache.cache.outcome = Empty,
            error.type = Empty,
            otel.status_code = Empty,
        );
        if telemetry::enabled() {
            telemetry::begin_request(&span, &req, route.map(Route::template), conn.peer.ip(), trusted);
        }

        async move {
            // A reverse proxy has no tunnel to offer: CONNECT is refused here, never forwarded.
            if req.method() == Method::CONNECT {
                let response = respond::method_not_allowed("CONNECT is not supported\n");
                return self.finish(response, route_metrics, started, &conn);
            }
            if let Some(reason) = malformed(&req) {
                return self.finish(respond::text(StatusCode::BAD_REQUEST, reason), route_metrics, started, &conn);
            }
            let version = req.version();

            // 2. Rate limit, before the cache: a cached answer still costs a token. A limiter that
            // cannot answer lets the request through (or decides in process).
            let verdict = match (route.and_then(|r| r.limit.as_deref()), &self.limiter) {
                (Some(limit), Some(limiter)) => limiter.check(limit, conn.peer.ip(), req.headers(), trusted).await,
                _ => Verdict::Unlimited,
            };
            let quota = match verdict {
                Verdict::Limited(quota) => {
                    return self.finish(respond::rate_limited(&quota), route_metrics, started, &conn);
                }
                Verdict::Unavailable(retry_after) => {
                    return self.finish(respond::limiter_unavailable(retry_after), route_metrics, started, &conn);
                }
                Verdict::Allowed(quota) => Some(quota),
                Verdict::Unlimited | Verdict::Unchecked => None,
            };

            // Only a path in normal form uses the cache: another spelling (`/api/x/..%2F..%2Fadmin`)
            // matched the route the way the most lenient backend reads it, but this backend may
            // serve another resource there, which must not be stored under the route's rules.
            let cached_route = route.filter(|_| normal_path).and_then(|r| r.cache.as_ref());
            // What an unsafe request may change, kept for step 7.
            let changes = match &self.cache {
                Some(_) if invalidate::may_invalidate(req.method()) && routes.any_cache() => {
                    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok());
                    let host = host.or(req.uri().authority().map(|a| a.as_str())).map(str::to_string);
                    Some((req.method().clone(), req.uri().clone(), host))
                }
                _ => None,
            };
            let mut response = self.serve(req, route, cached_route, &conn, server).await;
            // 7. A successful unsafe request invalidates what it changed (RFC 9111 4.4), before the
            // client hears of it: its next read is not answered from the cache.
            if let (Some((method, uri, host)), Some(cache)) = (changes, &self.cache) {
                if invalidate::invalidates(&method, response.status()) {
                    invalidated(cache, routes, &uri, host.as_deref(), response.headers_mut()).await;
                }
            }
            // Our own version, whatever the backend's (RFC 9110 6.2): an HTTP/1.0 backend's answer
            // must not close the client's keep-alive connection.
            if matches!(version, Version::HTTP_10 | Version::HTTP_11) {
                *response.version_mut() = Version::HTTP_11;
            }
            headers::append_via(response.headers_mut(), Version::HTTP_11);
            if let Some(quota) = quota {
                quota.apply(response.headers_mut());
            }
            self.finish(response, route_metrics, started, &conn)
        }
        .instrument(span)
        .await
    }

    /// Steps 3 to 6: prepare, cache begin, forward, cache finish; `route_cache` is the route's
    /// cache when this request may use it.
    async fn serve(
        &self,
        mut req: Request<Incoming>,
        route: Option<&Route>,
        route_cache: Option<&Arc<RouteCache>>,
        conn: &Conn,
        server: &ServerConfig,
    ) -> Response<Body> {
        // 3. One preparation for every request to the upstream, foreground or background. What
        // the backend will see of the client's request is decided first (hop-by-hop fields,
        // forwarding claims of untrusted peers): the cache keys on it. An HTTP/1.1 upgrade keeps
        // its handshake headers.
        let hop = Hop {
            peer: &conn.peer_value,
            tls: conn.tls,
            trusted: headers::is_trusted(conn.peer.ip(), &server.trusted_proxies),
        };
        // Only the protocols `server.upgrades` lists are tunnelled (bytes after a 101 pass no
        // limit and no rewriting); any other offer goes on as a plain request, its Upgrade
        // removed with the other hop-by-hop fields.
        let upgrade = req.version() == Version::HTTP_11
            && headers::is_upgrade(req.headers())
            && headers::upgrade_allowed(req.headers(), &server.upgrades);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        hop.sanitize(&mut req, upgrade);

        // 4. Cache: answer from it, or forward with an exchange that finishes the phase.
        let exchange = match (route_cache, &self.cache) {
            (Some(route_cache), Some(cache)) => match cache.begin(route_cache, &req, &hop, &self.upstream).await {
                Begin::Answer(response) => return response,
                Begin::Forward(exchange) => Some(exchange),
            },
            _ => None,
        };
        // The rest of the preparation (X-Forwarded-*, Via), and the cache's validators.
        hop.annotate(&mut req);
        if let Some(exchange) = &exchange {
            exchange.prepare(req.headers_mut());
        }

        // 5. Forward, and 6. the cache finishes its phase: 304 refresh, stale on error, storing,
        // coalescing. A fetch other requests wait for runs as a task of its own, so a client
        // that leaves cannot cancel it for them.
        // Interim responses (`103 Early Hints`) from the backend go on to an HTTP/1.1 client as
        // they arrive (hyper's client hands them over, its server cannot send them: the
        // connection's IO does). Never 100, which hyper's server sends itself, nor 101.
        // Only until the final response is in hand (the gate), and the callback does not keep the
        // connection's slot taken once its client is gone (a fetch it led may go on).
        let _awaiting_interim = (req.version() == Version::HTTP_11 && !upgrade).then(|| {
            let activity = Arc::downgrade(&conn.activity);
            hyper::ext::on_informational(&mut req, move |interim| {
                if let Some(activity) = activity.upgrade().filter(|_| !matches!(interim.status().as_u16(), 100 | 101)) {
                    activity.interim(interim.status(), interim.headers());
                }
            });
            conn.activity.await_interim()
        });
        let req = req.map(Streamed::body);
        match exchange {
            Some(exchange) if exchange.leads() => {
                let (upstream, metrics) = (self.upstream.clone(), self.metrics.clone());
                let fetch =
                    async move { conclude(Some(exchange), forward(&upstream, &metrics, req).await, false).await };
                match tokio::spawn(fetch.in_current_span()).await {
                    Ok(response) => response,
                    Err(e) => {
                        tracing::error!(error = %e, "a cache fetch task failed");
                        respond::text(StatusCode::BAD_GATEWAY, "upstream exchange failed\n")
                    }
                }
            }
            exchange => {
                let mut forwarded = forward(&self.upstream, &self.metrics, req).await;
                let tunnelled = match (client_upgrade, &mut forwarded) {
                    (Some(client_upgrade), Ok(response)) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
                        let upstream_upgrade = hyper::upgrade::on(response);
                        // A span of its own: the request's ends with the 101, the tunnel lives on.
                        let span = tracing::debug_span!(parent: None, "tunnel", sidecache.route = route.map_or(NO_ROUTE, |r| r.name.as_str()));
                        // The connection has no idle deadline while its tunnel lives.
                        let busy = conn.activity.busy();
                        let tunnel = upstream::tunnel(client_upgrade, upstream_upgrade);
                        tokio::spawn(
                            async move {
                                tunnel.await;
                                drop(busy)
                            }
                            .instrument(span),
                        );
                        true
                    }
                    _ => false,
                };
                conclude(exchange, forwarded, tunnelled).await
            }
        }
    }

    /// Metrics once, access log at debug.
    fn finish(
        &self,
        response: Response<Body>,
        metrics: &RouteMetrics,
        started: Instant,
        conn: &Conn,
    ) -> Response<Body> {
        let elapsed = started.elapsed();
        metrics.request(response.status(), elapsed);
        if telemetry::enabled() {
            telemetry::record_status(&tracing::Span::current(), response.status(), 500);
        }
        tracing::debug!(
            target: "sidecache::access",
            peer = %conn.peer,
            status = response.status().as_u16(),
            elapsed_us = elapsed.as_micros() as u64,
        );
        response
    }
}

/// Purge every target a successful unsafe request invalidates from every cached route covering
/// it, and say so in the answer's `Cache-Status`. Only targets in normal form: no other spelling
/// is ever stored, and the normal form of one may name another resource than the one this
/// backend changed (`/upload/..%2F..%2Fhome` is `/upload/%2F..` to a backend that does not decode
/// `%2F`), so purging it would let any 2xx endpoint purge any cached path.
async fn invalidated(cache: &Cache, routes: &Routes, uri: &http::Uri, host: Option<&str>, headers: &mut HeaderMap) {
    let mut purges = Vec::new();
    for target in invalidate::targets(uri, host, headers) {
        let path = target.split('?').next().unwrap_or_default();
        if route::is_normal(path) {
            purges.extend(routes.caches_covering(path).map(|route_cache| (route_cache.clone(), target.clone())));
        }
    }
    let done = futures_util::future::join_all(purges.iter().map(|(rc, target)| cache.invalidate(rc, target))).await;
    if done.contains(&true) {
        headers.insert(CACHE_STATUS.clone(), HeaderValue::from_static("sidecache; fwd=bypass; detail=invalidated"));
    }
}

/// Why a request is refused before anything looks at it, if it is: a method with a lower-case
/// letter (methods are case-sensitive, routes list upper-case ones, and `post` or `purge` would
/// pass a route listing `POST` or `PURGE` to a backend that folds case; nginx refuses them too),
/// two `Host` fields, or an HTTP/1.1 request without one (RFC 9112 3.2). An absolute-form target
/// or h2's `:authority` gives the host itself (`Hop::sanitize` sets `Host`).
fn malformed<B>(req: &Request<B>) -> Option<&'static str> {
    if req.method().as_str().bytes().any(|b| b.is_ascii_lowercase()) {
        return Some("methods are case-sensitive, and sidecache takes upper-case ones only\n");
    }
    if matches!(req.version(), Version::HTTP_10 | Version::HTTP_11) {
        let mut hosts = req.headers().get_all(header::HOST).iter();
        match (hosts.next(), hosts.next()) {
            (_, Some(_)) => return Some("more than one Host field\n"),
            (None, None) if req.version() == Version::HTTP_11 && req.uri().authority().is_none() => {
                return Some("an HTTP/1.1 request needs a Host field\n")
            }
            _ => {}
        }
    }
    None
}

/// Send a prepared request to the upstream: its response, or the error as the response to give.
async fn forward(
    upstream: &Upstream,
    metrics: &Metrics,
    req: Request<Body>,
) -> Result<Response<Incoming>, Response<Body>> {
    match upstream.forward(req).await {
        Ok(forwarded) => {
            metrics.upstream(forwarded.elapsed);
            Ok(forwarded.response)
        }
        Err(e) => {
            if let Some(kind) = e.kind() {
                metrics.upstream_error(kind);
            }
            tracing::debug!(error = %e, source = ?std::error::Error::source(&e), "upstream failed");
            Err(respond::upstream_error(&e))
        }
    }
}

/// The answer to a forwarded request: through the cache's exchange when there is one. A `101` is
/// passed on only when its tunnel was set up: a switch nobody asked for (or that
/// `server.upgrades` does not allow) would leave the client with a connection in limbo.
async fn conclude(
    exchange: Option<Exchange>,
    mut forwarded: Result<Response<Incoming>, Response<Body>>,
    tunnelled: bool,
) -> Response<Body> {
    if !tunnelled && forwarded.as_ref().is_ok_and(|r| r.status() == StatusCode::SWITCHING_PROTOCOLS) {
        forwarded = Err(respond::text(StatusCode::BAD_GATEWAY, "upstream switched protocols unasked\n"));
    }
    match (exchange, forwarded) {
        (Some(exchange), Ok(response)) => exchange.respond(response).await,
        (Some(exchange), Err(error)) => exchange.fail(error),
        (None, Ok(response)) => response.map(Streamed::body),
        (None, Err(error)) => error,
    }
}
