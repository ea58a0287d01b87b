//! The one backend: a pooled keep-alive HTTP/1.1 client, the forwarding header rules, protocol
//! upgrades, and the time budgets, with failures typed as [`UpstreamError`].

pub mod headers;
mod pool;

use std::error::Error as StdError;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{header, HeaderValue, Request, Response, Uri, Version};
use http_body_util::Either;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::Instrument;

use crate::body::Body;
use crate::config::UpstreamConfig;
use crate::metrics::UpstreamErrorKind;
use crate::telemetry;
use crate::tls::{self, TlsError};
use pool::{BoxError, Failure, Pool};

/// An idle upstream connection is closed after this (backends commonly close theirs after a
/// minute or more; closing first avoids sending on a connection the backend is closing).
const IDLE_TIMEOUT: Duration = Duration::from_secs(50);

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The TCP connection (or its TLS handshake) could not be made.
    #[error("upstream connect failed")]
    Connect(#[source] BoxError),
    /// The TCP connect ran out of `connect_timeout`.
    #[error("upstream connect timed out")]
    ConnectTimeout(#[source] BoxError),
    /// No response head within `response_timeout`.
    #[error("upstream response timed out")]
    Timeout,
    /// The backend broke the exchange.
    #[error("upstream closed or broke the connection")]
    Protocol(#[source] hyper::Error),
    /// The client's request body failed (a malformed chunk, the client gone): the client's
    /// error, not the backend's.
    #[error("the client's request body failed")]
    ClientBody(#[source] hyper::Error),
    /// `response_timeout` ran out while the client was still sending its body.
    #[error("the client's request body was not complete in time")]
    ClientTimeout,
}

impl UpstreamError {
    /// The metric label, or `None` when the backend is not to blame.
    pub fn kind(&self) -> Option<UpstreamErrorKind> {
        match self {
            Self::Connect(_) => Some(UpstreamErrorKind::Connect),
            Self::ConnectTimeout(_) => Some(UpstreamErrorKind::ConnectTimeout),
            Self::Timeout => Some(UpstreamErrorKind::Timeout),
            Self::Protocol(_) => Some(UpstreamErrorKind::Protocol),
            Self::ClientBody(_) | Self::ClientTimeout => None,
        }
    }

    fn classify(failure: Failure) -> UpstreamError {
        match failure {
            // hyper reports a failure of the request body as a user error caused by the body's
            // own error, which for a client's streamed body is the server side's hyper::Error.
            Failure::Exchange(e) if e.is_user() && e.source().is_some_and(|c| c.is::<hyper::Error>()) => {
                Self::ClientBody(e)
            }
            Failure::Exchange(e) => Self::Protocol(e),
            Failure::Connect(e) => {
                // HttpConnector reports its connect timeout as an io::Error of kind TimedOut.
                let mut source: Option<&(dyn StdError + 'static)> = Some(e.as_ref());
                while let Some(s) = source {
                    if s.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut) {
                        return Self::ConnectTimeout(e);
                    }
                    source = s.source();
                }
                Self::Connect(e)
            }
        }
    }
}

/// The backend client: one per worker, its clones share the worker's connections.
#[derive(Clone)]
pub struct Upstream {
    pool: Arc<Pool>,
    authority: Authority,
    /// `Host` for a request that has none (an HTTP/1.0 client's): the backend's.
    host: HeaderValue,
    response_timeout: Duration,
}

/// A forwarded exchange: the response and how long the upstream took to its head.
pub struct Forwarded {
    /// The upstream's response, hop-by-hop fields removed (the proxy adds its `Via` once, as the
    /// response leaves).
    pub response: Response<Incoming>,
    /// Time from sending to the response head.
    pub elapsed: Duration,
}

impl Upstream {
    /// Build a worker's client for the configured backend (TLS when the URL is `https://`).
    pub fn new(config: &UpstreamConfig) -> Result<Upstream, TlsError> {
        let connector = tls::https_connector("upstream.ca_file", config.ca_file.as_deref(), config.connect_timeout)?;
        let scheme = config.url.scheme().cloned().unwrap_or(Scheme::HTTP);
        let authority = config.url.authority().cloned().expect("validated upstream URL has a host");
        let target = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .expect("scheme and authority make a URI");
        // The port only when it is not the scheme's (RFC 9110 7.2), as clients write it.
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => format!("{}:{port}", authority.host()),
            _ => authority.host().to_string(),
        };
        let host = HeaderValue::try_from(host).expect("a URI's host is a valid header value");
        Ok(Upstream {
            pool: Arc::new(Pool::new(connector, target, IDLE_TIMEOUT)),
            authority,
            host,
            response_timeout: config.response_timeout,
        })
    }

    /// Send a request prepared by [`Hop::prepare`] to the backend, on the worker's most recently
    /// used ready connection (see [`pool`]). The response head must
    /// arrive within `response_timeout`; the body then streams without a total deadline (a
    /// download may legitimately take long). Dropping the returned future cancels the exchange.
    pub async fn forward(&self, mut req: Request<Body>) -> Result<Forwarded, UpstreamError> {
        // Origin form (RFC 9112 3.2.1): the backend is no proxy.
        let target = match req.uri().path_and_query() {
            Some(path) if path.as_str() != "/" => Uri::from(path.clone()),
            _ => Uri::default(),
        };
        *req.uri_mut() = target;
        *req.version_mut() = Version::HTTP_11;
        if !req.headers().contains_key(header::HOST) {
            req.headers_mut().insert(header::HOST, self.host.clone());
        }

        // The exchange to its response head, a child of the request's span; with traces on, the
        // backend gets its trace context (the request was prepared, and keyed, before).
        let span = tracing::debug_span!(
            "upstream",
            otel.kind = "client",
            otel.name = telemetry::clip(req.method().as_str()),
            http.request.method = telemetry::clip(req.method().as_str()),
            server.address = self.authority.host(),
            server.port = self.authority.port_u16(),
            http.response.status_code = Empty,
            error.type = Empty,
            otel.status_code = Empty,
        );
        if telemetry::enabled() {
            telemetry::inject(&span, req.headers_mut());
        }

        // A body still arriving when the time runs out is the client's delay, not the backend's.
        let body_ended = match req.body_mut() {
            Either::Left(streamed) if !streamed.is_end_stream() => Some(streamed.watch_end()),
            _ => None,
        };
        let started = Instant::now();
        let result =
            tokio::time::timeout(self.response_timeout, self.pool.send(req, started)).instrument(span.clone()).await;
        let elapsed = started.elapsed();
        let forwarded = match result {
            Err(_) if body_ended.is_some_and(|ended| !ended.load(Ordering::Relaxed)) => {
                Err(UpstreamError::ClientTimeout)
            }
            Err(_) => Err(UpstreamError::Timeout),
            Ok(Err(e)) => Err(UpstreamError::classify(e)),
            Ok(Ok(mut response)) => {
                if response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                    headers::remove_hop_by_hop(response.headers_mut());
                }
                Ok(Forwarded { response, elapsed })
            }
        };
        if !span.is_disabled() {
            match &forwarded {
                Ok(f) => telemetry::record_status(&span, f.response.status(), 400),
                Err(e) => telemetry::record_error(&span, e.kind().map_or("client_body", |k| k.as_str())),
            }
        }
        forwarded
    }
}

/// The hop a request arrived on, and so how it is prepared for the backend.
#[derive(Debug, Clone, Copy)]
pub struct Hop<'a> {
    /// The client address as a header value (the connection's, borrowed).
    pub peer: &'a HeaderValue,
    /// Whether the client connection is TLS.
    pub tls: bool,
    /// Whether the peer is in `server.trusted_proxies` (its forwarding headers are kept).
    pub trusted: bool,
}

impl Hop<'_> {
    /// Prepare a client request for the backend: [`Hop::sanitize`], then [`Hop::annotate`].
    /// Every request to the backend, foreground or background, is prepared here.
    pub fn prepare<B>(&self, req: &mut Request<B>, upgrade: bool) {
        self.sanitize(req, upgrade);
        self.annotate(req);
    }

    /// The part of the preparation that decides what of the client's request the backend sees
    /// (and so what the cache keys on): `Host` as the client sent it (h2 clients send
    /// `:authority` instead), hop-by-hop fields dropped (keeping an upgrade's own
    /// `Connection: upgrade` + `Upgrade`), forwarding claims dropped unless the peer is trusted.
    pub fn sanitize<B>(&self, req: &mut Request<B>, upgrade: bool) {
        // An absolute-form target's authority, and h2's `:authority`, win over a Host field
        // (RFC 9112 3.2.2, RFC 9113 8.3.1): the backend sees the host the request was for.
        if let Some(host) = req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            req.headers_mut().insert(header::HOST, host);
        }
        let upgrade_to = if upgrade { req.headers().get(header::UPGRADE).cloned() } else { None };
        let h = req.headers_mut();
        headers::remove_hop_by_hop(h);
        if let Some(protocol) = upgrade_to {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            h.insert(header::UPGRADE, protocol);
        }
        headers::remove_forwarding_claims(h, self.trusted);
    }

    /// The rest, which only adds what this hop says: `X-Forwarded-*` and `Via`. A request
    /// answered from the cache never needs it.
    pub fn annotate<B>(&self, req: &mut Request<B>) {
        let version = req.version();
        let h = req.headers_mut();
        // Room for X-Forwarded-For, -Proto, -Host and Via at once, rather than growing by doubling.
        h.reserve(4);
        headers::set_forwarded(h, self.peer, self.tls, self.trusted);
        headers::append_via(h, version);
    }
}

/// Join an upgraded client connection to the upgraded upstream connection and copy bytes both
/// ways until either side closes.
pub async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
    }
}
