//! The request path, one function read top to bottom: route → rate limit → cache → forward →
//! finish.
//! Errors become responses here, once, through [`respond`](crate::respond).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use ipnet::IpNet;
use tokio::time::Instant;
use tracing::Instrument;

use crate::cache::body::RecordingBody;
use crate::cache::coalesce::{self, FlightGuard, Join};
use crate::cache::entry::Entry;
use crate::cache::key::CacheKey;
use crate::cache::revalidate::{self, RefreshRequest};
use crate::cache::{policy, Cache, Lookup, LookupResult};
use crate::config::Config;
use crate::metrics::{Metrics, NO_ROUTE};
use crate::ratelimit::{RateLimiter, Verdict};
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

/// Everything a request needs. One per worker thread (its own upstream pool); the cache and the
/// rate limiter are shared by all.
pub struct Proxy {
    routes: Routes,
    upstream: Upstream,
    cache: Option<Arc<Cache>>,
    limiter: Option<Arc<RateLimiter>>,
    metrics: Arc<Metrics>,
    trusted_proxies: Vec<IpNet>,
}

/// What the cache decided for a request that goes upstream.
#[derive(Default)]
struct Plan {
    /// The route's cache and index, when the route caches.
    cached: Option<usize>,
    /// Where the response would be stored (a miss).
    key: Option<CacheKey>,
    /// An expired entry: served if the upstream fails, refreshed by a 304.
    stale: Option<(Arc<Entry>, Duration)>,
    /// Leading the fetch for this key: followers wait for what it yields.
    flight: Option<FlightGuard>,
    /// The entry's validators were added to the request: a 304 refreshes the entry.
    revalidating: bool,
    /// The `Cache-Status` / `X-Cache` of a forwarded response.
    outcome: CacheOutcome,
}

/// The cache's verdict on a request.
enum Step {
    /// Answer from the cache.
    Answer(Response<Body>),
    /// Go upstream with this plan.
    Forward(Plan),
}

impl Proxy {
    /// Build the request path from the validated configuration.
    pub fn new(
        config: &Config,
        metrics: Arc<Metrics>,
        cache: Option<Arc<Cache>>,
        limiter: Option<Arc<RateLimiter>>,
    ) -> Result<Proxy, TlsError> {
        Ok(Proxy {
            routes: Routes::new(&config.routes),
            upstream: Upstream::new(&config.upstream)?,
            cache,
            limiter,
            metrics,
            trusted_proxies: config.server.trusted_proxies.clone(),
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

        // 1. Route: first match in file order; unmatched requests are plain pass-through.
        let route = self.routes.find(req.method(), req.uri().path());
        let route_index = route.map(|r| r.index);
        let route_name = route.map_or(NO_ROUTE, |r| r.config.name.as_str());
        let span = tracing::debug_span!("request", method = %req.method(), path = req.uri().path(), route = route_name);

        async move {
            // A reverse proxy has no tunnel to offer: CONNECT is refused here, never forwarded.
            if req.method() == Method::CONNECT {
                let response = respond::method_not_allowed("CONNECT is not supported\n");
                return self.finish_local(response, route_index, started, &conn);
            }

            // 2. Rate limit, before the cache: a cached answer still costs a token. A limiter that
            // cannot answer lets the request through (or decides in process).
            let verdict = match (route_index, &self.limiter) {
                (Some(index), Some(limiter)) => limiter.check(index, conn.peer.ip(), req.headers()).await,
                _ => Verdict::Unlimited,
            };
            let quota = match verdict {
                Verdict::Limited(quota) => {
                    return self.finish_local(respond::rate_limited(&quota), route_index, started, &conn);
                }
                Verdict::Allowed(quota) => Some(quota),
                Verdict::Unlimited | Verdict::Unchecked => None,
            };

            let mut response = self.serve(req, route_index, started, &conn).await;
            if let Some(quota) = quota {
                quota.apply(response.headers_mut());
            }
            response
        }
        .instrument(span)
        .await
    }

    /// Steps 3 to 5: the cache, the forward, the answer.
    async fn serve(
        &self,
        mut req: Request<Incoming>,
        route_index: Option<usize>,
        started: Instant,
        conn: &Conn,
    ) -> Response<Body> {
        // 3. Cache: fresh (or servable stale) entries answer here; a failing store is a miss.
        let cache = route_index.and_then(|i| self.cache.as_ref().filter(|c| c.caches(i)).map(|c| (i, c)));
        let mut plan = match cache {
            Some((index, cache)) => match self.consult(cache, index, &req).await {
                Step::Answer(response) => return self.finish(response, route_index, started, conn),
                Step::Forward(plan) => plan,
            },
            None => Plan::default(),
        };
        let method = req.method().clone();

        // 4. Forward, keeping an HTTP/1.1 upgrade's handshake headers so the backend can accept it.
        let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let trusted = headers::is_trusted(conn.peer.ip(), &self.trusted_proxies);
        upstream::prepare(&mut req, &conn.peer_value, conn.tls, trusted, upgrade);
        if plan.revalidating {
            if let Some((entry, _)) = &plan.stale {
                for (name, value) in policy::conditional_headers(entry) {
                    req.headers_mut().insert(name, value);
                }
            }
        }

        let forwarded = self.upstream.forward(req.map(|b| Either::Left(RecordingBody::passthrough(b)))).await;
        let mut response = match forwarded {
            Ok(forwarded) => {
                self.metrics.upstream(forwarded.elapsed);
                forwarded.response
            }
            Err(e) => {
                self.metrics.upstream_error(e.kind());
                tracing::debug!(error = %e, source = ?std::error::Error::source(&e), "upstream failed");
                if let Some(stale) = self.stale_on_error(&plan, method == Method::HEAD) {
                    return self.finish(stale, route_index, started, conn);
                }
                let mut response = respond::upstream_error(&e);
                respond::cache_headers(response.headers_mut(), plan.outcome);
                return self.finish_local(response, route_index, started, conn);
            }
        };

        // 5. The answer: a refreshed or stale entry, or the upstream's response, recorded for
        // the cache as it streams when it is a cacheable GET miss.
        if let (Some(index), Some(cache)) = (plan.cached, &self.cache) {
            if plan.revalidating && response.status() == StatusCode::NOT_MODIFIED {
                if let Some(answer) = self.revalidated(cache, index, &mut plan, response.headers(), &method) {
                    return self.finish(answer, route_index, started, conn);
                }
            }
            if response.status().is_server_error() {
                if let Some(stale) = self.stale_on_error(&plan, method == Method::HEAD) {
                    return self.finish(stale, route_index, started, conn);
                }
            }
            if plan.stale.is_some() {
                cache.count_lookup(index, LookupResult::Miss);
            }
        }
        if let Some(client_upgrade) = client_upgrade {
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                tokio::spawn(upstream::tunnel(client_upgrade, upstream_upgrade).in_current_span());
            }
        }
        let recorder = match (plan.cached, plan.key.take(), &self.cache) {
            (Some(index), Some(key), Some(cache)) if method == Method::GET => {
                cache.recorder(index, key, response.status(), response.headers(), plan.flight.take())
            }
            _ => None,
        };
        let mut response = response.map(|body| match recorder {
            Some((limit, finish)) => Either::Left(RecordingBody::recording(body, limit, finish)),
            None => Either::Left(RecordingBody::passthrough(body)),
        });
        respond::cache_headers(response.headers_mut(), plan.outcome);
        self.finish(response, route_index, started, conn)
    }

    /// The cache phase: answer from the cache, or plan the forward.
    async fn consult(&self, cache: &Arc<Cache>, index: usize, req: &Request<Incoming>) -> Step {
        let head = req.method() == Method::HEAD;
        let mut plan = Plan { cached: Some(index), outcome: CacheOutcome::Miss, ..Plan::default() };
        let key = match cache.lookup(index, req.method(), req.uri(), req.headers()).await {
            None => return Step::Forward(Plan::default()),
            Some(Lookup::Fresh(entry, _)) => {
                cache.count_lookup(index, LookupResult::Hit);
                return Step::Answer(respond::from_entry(&entry, head, Some(req.headers()), CacheOutcome::Hit));
            }
            Some(Lookup::Bypass(_)) => {
                cache.count_lookup(index, LookupResult::Bypass);
                plan.outcome = CacheOutcome::Bypass;
                return Step::Forward(plan);
            }
            Some(Lookup::Unavailable(key)) => {
                cache.count_lookup(index, LookupResult::Error);
                key
            }
            Some(Lookup::Miss(key)) => {
                cache.count_lookup(index, LookupResult::Miss);
                key
            }
            Some(Lookup::Stale(entry, key, by)) => {
                // stale-while-revalidate: answer now, refresh once in the background.
                if policy::serve_while_revalidating(&entry, by) {
                    if let Join::Lead(flight) = cache.join(&key) {
                        let refresh = RefreshRequest::from_client(req.uri(), req.headers());
                        let task = revalidate::refresh(
                            cache.clone(),
                            self.upstream.clone(),
                            index,
                            key,
                            flight,
                            entry.clone(),
                            refresh,
                        );
                        tokio::spawn(task.in_current_span());
                    }
                    cache.count_lookup(index, LookupResult::Stale);
                    return Step::Answer(respond::from_entry(&entry, head, None, CacheOutcome::StaleWhileRevalidate));
                }
                // Counted when the forward's outcome is known (served stale on error, or a miss).
                let no_client_conditionals = !req.headers().contains_key(http::header::IF_NONE_MATCH)
                    && !req.headers().contains_key(http::header::IF_MODIFIED_SINCE);
                plan.revalidating = no_client_conditionals && policy::has_validators(&entry.headers);
                plan.stale = Some((entry, by));
                key
            }
        };
        // Coalescing: one upstream fetch per missing key in this process; the others wait for it
        // (at most the response budget) and forward on their own if it yields nothing.
        match cache.join(&key) {
            Join::Lead(flight) if !head => plan.flight = Some(flight),
            Join::Lead(_) => {}
            Join::Follow(rx) => {
                if let Some(entry) = coalesce::follow(rx, self.upstream.response_timeout()).await {
                    return Step::Answer(respond::from_entry(&entry, head, None, CacheOutcome::Collapsed));
                }
            }
        }
        plan.key = Some(key);
        Step::Forward(plan)
    }

    /// A 304 to our own conditional request: refresh the stale entry, store it, answer from it.
    fn revalidated(
        &self,
        cache: &Cache,
        index: usize,
        plan: &mut Plan,
        not_modified: &http::HeaderMap,
        method: &Method,
    ) -> Option<Response<Body>> {
        let (stale, _) = plan.stale.as_ref()?;
        let config = cache.config(index)?;
        let entry = Arc::new(policy::refreshed(stale, not_modified, config, std::time::SystemTime::now())?);
        if let Some(flight) = plan.flight.take() {
            flight.publish(entry.clone());
        }
        cache.count_lookup(index, LookupResult::Hit);
        cache.put_entry(index, plan.key.take()?, entry.clone());
        Some(respond::from_entry(&entry, *method == Method::HEAD, None, CacheOutcome::Revalidated))
    }

    /// stale-if-error: an expired entry beats a 502/504 or the backend's 5xx.
    fn stale_on_error(&self, plan: &Plan, head: bool) -> Option<Response<Body>> {
        let (entry, by) = plan.stale.as_ref()?;
        if !policy::serve_on_error(entry, *by) {
            return None;
        }
        let (index, cache) = (plan.cached?, self.cache.as_ref()?);
        cache.count_lookup(index, LookupResult::Stale);
        Some(respond::from_entry(entry, head, None, CacheOutcome::StaleOnError))
    }

    /// Finish a forwarded or cached response: `Via`, then [`Proxy::finish_local`].
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
