//! One request's cache phase (DESIGN.md 2.3), one object from start to end, modelled on
//! Pingora's `HttpCache` and its `CachePhase` without the callback framework.
//!
//! The proxy asks the cache to [`begin`](Cache::begin): the answer is either a response now (a
//! fresh entry, a stale one served while it is refreshed, another request's fetch), or an
//! [`Exchange`] to forward with. The proxy lets the exchange [`prepare`](Exchange::prepare) the
//! upstream request (our validators), then hands it the upstream's answer
//! ([`respond`](Exchange::respond)) or its failure ([`fail`](Exchange::fail)). The exchange
//! decides 304 refresh, stale-on-error, storing and coalescing, and counts its outcome exactly
//! once, when it is dropped.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::{Frame, Incoming};
use tokio::time::Instant;
use tracing::Instrument;

use super::coalesce::{self, FlightGuard, Join};
use super::entry::Entry;
use super::key::{self, CacheKey};
use super::lease::{Leading, Lease};
use super::policy::{self, Bypass, Phase, RequestDirectives, Use};
use super::{Cache, Found, Outcome, RouteCache, Slot, StoreResult};
use crate::body::{self, Body, Streamed};
use crate::respond;
use crate::store;
use crate::upstream::{Hop, Upstream};

/// What [`Cache::begin`] decided.
pub enum Begin {
    /// Answer this, from the cache.
    Answer(Response<Body>),
    /// Forward the request, and hand the exchange the upstream's answer.
    Forward(Exchange),
}

/// The cache phase of one forwarded request.
pub struct Exchange {
    cache: Arc<Cache>,
    route: Arc<RouteCache>,
    /// Counted when the exchange ends; `None` for a background refresh (the request that started
    /// it counted its own).
    outcome: Option<Outcome>,
    /// `None` when the request bypasses the cache.
    fetch: Option<Fetch>,
}

/// A forward the cache takes part in.
struct Fetch {
    key: CacheKey,
    /// The request's fields as the backend receives them, but for the proxy's annotations:
    /// the response's `Vary` chooses its slot by them.
    request: HeaderMap,
    head: bool,
    /// An expired entry: served if the upstream fails, refreshed by a 304.
    stale: Option<Arc<Entry>>,
    /// Our validators go upstream: a 304 answers from `stale`.
    revalidate: bool,
    /// Leading the fetch of this key: followers get what it yields.
    flight: Option<FlightGuard>,
    /// The answer may become an entry (no body, `Range` or conditionals of the request's own).
    store: bool,
    /// The client asked that nothing of the exchange be stored (`no-store`, where it counts).
    no_store: bool,
    /// The fill lease of the key, while other replicas wait for this fetch.
    lease: Option<Lease>,
}

/// Conditional header fields (RFC 9110 13.1) a client may send.
static CONDITIONALS: [header::HeaderName; 5] =
    [header::IF_NONE_MATCH, header::IF_MODIFIED_SINCE, header::IF_MATCH, header::IF_UNMODIFIED_SINCE, header::IF_RANGE];

fn has_conditionals(headers: &HeaderMap) -> bool {
    CONDITIONALS.iter().any(|name| headers.contains_key(name))
}

impl Cache {
    /// Begin the cache phase of a client's request that arrived on `hop`, already sanitized by
    /// it ([`Hop::sanitize`]: the key is made of what the backend will receive); `upstream`
    /// serves a background refresh. Never fails: a failing store is a miss.
    pub async fn begin(
        self: &Arc<Self>,
        route: &Arc<RouteCache>,
        req: &Request<Incoming>,
        hop: &Hop<'_>,
        upstream: &Upstream,
    ) -> Begin {
        // Counted when it is dropped, whatever happens from here: answered, forwarded (then the
        // exchange counts it), or the client gone while the store or another request's fetch
        // was awaited. It borrows: a hit touches no shared reference count.
        let mut lookup = Lookup { route, outcome: Some(Outcome::Bypass) };
        let has_body = !hyper::body::Body::is_end_stream(req.body());
        if let Some(reason) = policy::request_bypass(req.method(), req.headers(), has_body, &route.config) {
            tracing::debug!(route = %route.name, ?reason, "cache bypassed");
            return Begin::Forward(self.exchange(route, lookup.take(), None));
        }
        let generation = route.generation.load(std::sync::atomic::Ordering::Relaxed);
        let Ok(key) =
            key::cache_key(&self.prefix, &route.name, generation, req.uri(), req.headers(), hop, &route.config)
        else {
            tracing::debug!(route = %route.name, reason = ?Bypass::Query, "cache bypassed");
            return Begin::Forward(self.exchange(route, lookup.take(), None));
        };
        lookup.set(Outcome::Miss);
        let head = req.method() == Method::HEAD;
        // The client's own directives count only where the route lets them (RFC 9111 5.2.1).
        let asks = match route.config.request_directives {
            true => RequestDirectives::of(req.headers()),
            false => RequestDirectives::default(),
        };

        let (found, slot) = self.find(route, &key, req.headers()).await;
        let now = self.clock.now();
        let stale = match found {
            Found::Entry(entry, phase) => match policy::usable(&entry, phase, &asks, now) {
                Use::Fresh => {
                    lookup.set(Outcome::Hit);
                    return Begin::Answer(respond::from_entry(&entry, head, Some(req.headers()), Outcome::Hit, now));
                }
                Use::Stale => {
                    // stale-while-revalidate: answer now, refresh once in the background (not
                    // for a client that asked that nothing of its exchange be stored).
                    let flight =
                        (!asks.no_store).then(|| self.flights.join(store::entry_id(&key.path_key, slot.variant(&key))));
                    if let Some(Join::Lead(flight)) = flight {
                        self.refresh(route, key, entry.clone(), flight, req, hop, upstream);
                    }
                    lookup.set(Outcome::Stale);
                    return Begin::Answer(respond::from_entry(&entry, head, None, Outcome::Stale, now));
                }
                Use::Revalidate => Some(entry),
            },
            Found::Nothing => None,
            Found::Unavailable => {
                lookup.set(Outcome::Error);
                None
            }
        };
        if asks.only_if_cached {
            // Nothing stored will do, and the client asked not to forward (5.2.1.7).
            let mut answer = respond::text(StatusCode::GATEWAY_TIMEOUT, "not in the cache (only-if-cached)\n");
            Outcome::Miss.apply(answer.headers_mut(), 0, false);
            return Begin::Answer(answer);
        }
        let own_conditionals = has_conditionals(req.headers());
        let store = !own_conditionals && !req.headers().contains_key(header::RANGE) && !asks.no_store;
        // Our validators only when the client sent none: its own 304 is its to receive.
        let revalidate = !own_conditionals && stale.as_ref().is_some_and(|e| policy::has_validators(&e.headers));

        // Coalescing: one upstream fetch per missing key in this process; the others wait for it
        // (at most `lock_timeout`) and forward on their own if it yields nothing, or a response
        // the origin varies by fields whose values they do not share. Across replicas, the
        // process that takes the key's lease in Redis fetches; the others wait for its fill.
        let (mut flight, mut lease) = (None, None);
        match self.flights.join(store::entry_id(&key.path_key, slot.variant(&key))) {
            Join::Lead(guard) if store && !head => match self.lead(&key, &slot).await {
                Leading::Here(held) => (flight, lease) = (Some(guard), held),
                Leading::Elsewhere(mark, lease_key) => {
                    self.await_fill(&key, mark, &lease_key).await;
                    let (found, slot) = self.find(route, &key, req.headers()).await;
                    let now = self.clock.now();
                    if let Found::Entry(entry, phase) = found {
                        if policy::usable(&entry, phase, &asks, now) == Use::Fresh {
                            guard.publish(entry.clone(), slot.variant(&key));
                            lookup.set(Outcome::Collapsed);
                            return Begin::Answer(respond::from_entry(&entry, head, None, Outcome::Collapsed, now));
                        }
                    }
                    flight = Some(guard);
                }
            },
            Join::Lead(_) => {}
            Join::Follow(rx) => {
                if let Some((entry, variant)) = coalesce::follow(rx, self.lock_timeout).await {
                    let own = Slot::of_response(&key, &entry.headers, req.headers(), &route.config.vary);
                    if own.variant(&key) == &*variant {
                        lookup.set(Outcome::Collapsed);
                        let now = self.clock.now();
                        return Begin::Answer(respond::from_entry(&entry, head, None, Outcome::Collapsed, now));
                    }
                }
            }
        }
        let request = req.headers().clone();
        let fetch = Fetch { key, request, head, stale, revalidate, flight, store, no_store: asks.no_store, lease };
        Begin::Forward(self.exchange(route, lookup.take(), Some(fetch)))
    }

    fn exchange(self: &Arc<Self>, route: &Arc<RouteCache>, outcome: Option<Outcome>, fetch: Option<Fetch>) -> Exchange {
        Exchange { cache: self.clone(), route: route.clone(), outcome, fetch }
    }

    /// Refresh a stale entry in the background: the client's request, prepared like every other
    /// (the same forwarding rules, [`Hop::sanitize`] then [`Hop::annotate`]), without its own
    /// conditionals or range, plus ours.
    #[allow(clippy::too_many_arguments)]
    fn refresh(
        self: &Arc<Self>,
        route: &Arc<RouteCache>,
        key: CacheKey,
        stale: Arc<Entry>,
        flight: FlightGuard,
        req: &Request<Incoming>,
        hop: &Hop<'_>,
        upstream: &Upstream,
    ) {
        // The client's request is sanitized already: only the annotation is left to do.
        let mut request = req.headers().clone();
        for name in CONDITIONALS.iter().chain([&header::RANGE]) {
            request.remove(name);
        }
        let mut refresh = Request::new(body::full(Bytes::new()));
        *refresh.uri_mut() = req.uri().clone();
        *refresh.version_mut() = req.version();
        *refresh.headers_mut() = request.clone();
        hop.annotate(&mut refresh);
        let revalidate = policy::has_validators(&stale.headers);
        let fetch = Fetch {
            key,
            request,
            head: false,
            stale: Some(stale),
            revalidate,
            flight: Some(flight),
            store: true,
            no_store: false,
            lease: None,
        };
        let exchange = self.exchange(route, None, Some(fetch));
        exchange.prepare(refresh.headers_mut());
        let upstream = upstream.clone();
        let task = async move {
            match upstream.forward(refresh).await {
                // Read to its end (a stored body is read whole before the answer): then dropped.
                Ok(forwarded) => drop(exchange.respond(forwarded.response).await),
                Err(e) => tracing::debug!(error = %e, "background refresh failed; the stale entry stays"),
            }
        };
        // A child of the request that is answered already (its span ends with the answer).
        tokio::spawn(task.instrument(tracing::debug_span!("cache.refresh")));
    }
}

/// A lookup not yet handed to an [`Exchange`]: counts its outcome when dropped, unless taken.
struct Lookup<'a> {
    route: &'a RouteCache,
    outcome: Option<Outcome>,
}

impl Lookup<'_> {
    fn set(&mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
    }

    /// The outcome, now the exchange's to count.
    fn take(&mut self) -> Option<Outcome> {
        self.outcome.take()
    }
}

impl Drop for Lookup<'_> {
    fn drop(&mut self) {
        if let Some(outcome) = self.outcome {
            self.route.count_lookup(outcome);
        }
    }
}

/// A response body read for storing: whole, or what was read before it proved too large
/// ([`StoreResult::TooLarge`]) or too slow, broken or with trailers ([`StoreResult::Incomplete`]),
/// followed by the rest.
enum Read {
    Whole(Bytes),
    Partial(Vec<Result<Frame<Bytes>, hyper::Error>>, Incoming, StoreResult),
}

fn far_future() -> Instant {
    Instant::now() + std::time::Duration::from_secs(86_400 * 365)
}

/// Read a body whole: at most `limit` bytes, before `deadline`.
async fn read_whole(mut body: Incoming, limit: usize, deadline: Instant) -> Read {
    use http_body_util::BodyExt;
    let mut frames: Vec<Result<Frame<Bytes>, hyper::Error>> = Vec::new();
    let mut len = 0usize;
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(None) => break,
            Ok(Some(Ok(frame))) => {
                let Some(data) = frame.data_ref() else {
                    // Trailers are not stored: the answer cannot be replayed faithfully.
                    frames.push(Ok(frame));
                    return Read::Partial(frames, body, StoreResult::Incomplete);
                };
                len += data.len();
                frames.push(Ok(frame));
                if len > limit {
                    return Read::Partial(frames, body, StoreResult::TooLarge);
                }
            }
            Ok(Some(Err(e))) => {
                frames.push(Err(e));
                return Read::Partial(frames, body, StoreResult::Incomplete);
            }
            Err(_) => return Read::Partial(frames, body, StoreResult::Incomplete),
        }
    }
    let mut data = frames.into_iter().filter_map(|f| f.ok()?.into_data().ok());
    let first = data.next().unwrap_or_default();
    match data.next() {
        None => Read::Whole(first),
        Some(second) => {
            let mut whole = BytesMut::with_capacity(len);
            whole.extend_from_slice(&first);
            whole.extend_from_slice(&second);
            data.for_each(|d| whole.extend_from_slice(&d));
            Read::Whole(whole.freeze())
        }
    }
}

impl Exchange {
    /// Add what the cache needs to the upstream request: our validators when revalidating an
    /// expired entry (RFC 9111 4.3.1).
    pub fn prepare(&self, headers: &mut HeaderMap) {
        if let Some(Fetch { stale: Some(stale), revalidate: true, .. }) = &self.fetch {
            for (name, value) in policy::conditional_headers(stale) {
                headers.insert(name, value);
            }
        }
    }

    /// The upstream answered: answer the client, from the cache (a 304 to our own conditional
    /// request, a 5xx with a stale entry to serve) or with the upstream's response, stored when
    /// the rules allow. A response to store is read whole first (at most `max_body`, within the
    /// response budget), so followers get it as soon as the upstream has sent it, whatever the
    /// client does.
    pub async fn respond(mut self, response: Response<Incoming>) -> Response<Body> {
        let Some(mut fetch) = self.fetch.take() else {
            return self.forwarded(response.map(Streamed::body), false);
        };
        let now = self.cache.clock.now();
        let status = response.status();
        if fetch.revalidate && status == StatusCode::NOT_MODIFIED {
            if let Some(stale) = fetch.stale.take() {
                return self.revalidated(fetch, &stale, response.headers(), now);
            }
        }
        if status.is_server_error() {
            if let Some(answer) = self.stale_on_error(&fetch, now) {
                return answer;
            }
        }
        if !fetch.store || fetch.head {
            return self.forwarded(response.map(Streamed::body), false);
        }
        let config = &self.route.config;
        let freshness = match policy::storable(status, response.headers(), config, now) {
            Ok(freshness) => freshness,
            Err(reason) => {
                tracing::debug!(route = %self.route.name, reason = reason.as_str(), "response not stored");
                self.route.count_store(StoreResult::NotStorable);
                return self.forwarded(response.map(Streamed::body), false);
            }
        };
        let declared =
            response.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > config.max_body as u64) {
            self.route.count_store(StoreResult::TooLarge);
            return self.forwarded(response.map(Streamed::body), false);
        }
        let (parts, incoming) = response.into_parts();
        // A budget too large to add to now is as good as none.
        let deadline = Instant::now().checked_add(self.cache.body_timeout).unwrap_or_else(far_future);
        match read_whole(incoming, config.max_body, deadline).await {
            Read::Whole(body) => {
                let entry =
                    Entry { status, headers: parts.headers.clone(), body: body.clone(), stored_at: now, freshness };
                let slot = Slot::of_response(&fetch.key, &entry.headers, &fetch.request, &config.vary);
                let stored = self.cache.write(&self.route, &fetch.key, &slot, &entry, fetch.lease.take());
                if let Some(flight) = fetch.flight.take() {
                    flight.publish(Arc::new(entry), slot.variant(&fetch.key));
                }
                self.forwarded(Response::from_parts(parts, body::full(body)), stored)
            }
            Read::Partial(read, rest, why) => {
                // Streamed on, not stored; followers are released.
                self.route.count_store(why);
                self.forwarded(
                    Response::from_parts(parts, http_body_util::Either::Left(Streamed::after(read, rest))),
                    false,
                )
            }
        }
    }

    /// The upstream failed: answer a stale entry when `stale_if_error` allows, else the error
    /// response the proxy made.
    pub fn fail(mut self, error: Response<Body>) -> Response<Body> {
        let now = self.cache.clock.now();
        if let Some(answer) = self.fetch.take().and_then(|fetch| self.stale_on_error(&fetch, now)) {
            return answer;
        }
        self.forwarded(error, false)
    }

    /// A 304 to our own conditional request: answer from the stored response, updated by the
    /// 304's headers, and store it again when it may still be stored (RFC 9111 4.3.3, 4.3.4).
    fn revalidated(
        &mut self,
        mut fetch: Fetch,
        stale: &Entry,
        not_modified: &HeaderMap,
        now: SystemTime,
    ) -> Response<Body> {
        let (entry, storable) = policy::revalidated(stale, not_modified, &self.route.config, now);
        // A client's `no-store` (where its directives count): nothing of this exchange is stored.
        let storable = storable && !fetch.no_store;
        let entry = Arc::new(entry);
        if storable {
            let slot = Slot::of_response(&fetch.key, &entry.headers, &fetch.request, &self.route.config.vary);
            self.cache.write(&self.route, &fetch.key, &slot, &entry, fetch.lease.take());
            if let Some(flight) = fetch.flight.take() {
                flight.publish(entry.clone(), slot.variant(&fetch.key));
            }
        }
        self.set_outcome(Outcome::Revalidated);
        respond::from_entry(&entry, fetch.head, None, Outcome::Revalidated, now)
    }

    /// stale-if-error: an expired entry beats a 502/504 or the backend's 5xx.
    fn stale_on_error(&mut self, fetch: &Fetch, now: SystemTime) -> Option<Response<Body>> {
        let entry = fetch.stale.as_ref()?;
        let Phase::Stale(by) = policy::phase(entry, now) else { return None };
        if !policy::serve_on_error(entry, by) {
            return None;
        }
        self.set_outcome(Outcome::StaleIfError);
        Some(respond::from_entry(entry, fetch.head, None, Outcome::StaleIfError, now))
    }

    /// Whether this exchange leads a fetch other requests wait for.
    pub fn leads(&self) -> bool {
        self.fetch.as_ref().is_some_and(|f| f.flight.is_some())
    }

    fn set_outcome(&mut self, outcome: Outcome) {
        if let Some(o) = &mut self.outcome {
            *o = outcome;
        }
    }

    /// A forwarded response, marked with the outcome.
    fn forwarded(&self, mut response: Response<Body>, stored: bool) -> Response<Body> {
        if let Some(outcome) = self.outcome {
            outcome.apply(response.headers_mut(), 0, stored);
        }
        response
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if let Some(outcome) = self.outcome {
            self.route.count_lookup(outcome);
        }
    }
}
