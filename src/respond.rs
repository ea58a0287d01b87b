//! Every response the proxy writes itself, and the one place where typed errors become HTTP.

use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

use crate::cache::entry::Entry;
use crate::cache::policy;
use crate::ratelimit::Quota;
use crate::upstream::UpstreamError;
use crate::Body;

/// A short plain-text response.
pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(body.as_bytes()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

/// `405` with an `Allow` header naming what is accepted instead.
pub fn method_not_allowed(body: &'static str) -> Response<Body> {
    let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, body);
    resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"));
    resp
}

/// A JSON response.
pub fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// `429 Too Many Requests`: `Retry-After` in whole seconds (rounded up), the `RateLimit-Policy`
/// and `RateLimit` headers, and `{"error":"rate_limited","retry_after_ms":N}`.
pub fn rate_limited(quota: &Quota) -> Response<Body> {
    let ms = quota.retry_after.as_micros().div_ceil(1000).max(1);
    let mut resp = json(StatusCode::TOO_MANY_REQUESTS, format!(r#"{{"error":"rate_limited","retry_after_ms":{ms}}}"#));
    let headers = resp.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000) as u64));
    quota.apply(headers);
    resp
}

/// The answer to a failed upstream exchange: 504 when a time budget ran out, 502 otherwise,
/// with a one-line reason (never the error's details: they can name internal hosts).
pub fn upstream_error(e: &UpstreamError) -> Response<Body> {
    match e {
        UpstreamError::Timeout => text(StatusCode::GATEWAY_TIMEOUT, "upstream did not respond in time\n"),
        UpstreamError::ConnectTimeout(_) => text(StatusCode::GATEWAY_TIMEOUT, "upstream connect timed out\n"),
        UpstreamError::Connect(_) => text(StatusCode::BAD_GATEWAY, "upstream unreachable\n"),
        UpstreamError::Protocol(_) => text(StatusCode::BAD_GATEWAY, "upstream closed the connection\n"),
    }
}

/// How the cache took part in a response; decides `Cache-Status` (RFC 9211) and `X-Cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheOutcome {
    /// The route does not cache.
    #[default]
    None,
    /// Served from a fresh entry.
    Hit,
    /// Served from an expired entry because the upstream failed.
    StaleOnError,
    /// Served from the response another request in flight fetched.
    Collapsed,
    /// Served from an expired entry while it is refreshed in the background.
    StaleWhileRevalidate,
    /// Served from an expired entry the upstream confirmed with a 304.
    Revalidated,
    /// Forwarded: nothing usable was stored.
    Miss,
    /// Forwarded: the request may not use the cache.
    Bypass,
}

/// `Cache-Status` and `X-Cache` for a forwarded response.
pub fn cache_headers(headers: &mut HeaderMap, outcome: CacheOutcome) {
    let (status, x_cache) = match outcome {
        CacheOutcome::Miss => ("sidecache; fwd=miss", "MISS"),
        CacheOutcome::Bypass => ("sidecache; fwd=bypass", "BYPASS"),
        _ => return,
    };
    headers.insert(CACHE_STATUS.clone(), HeaderValue::from_static(status));
    headers.insert(X_CACHE.clone(), HeaderValue::from_static(x_cache));
}

/// `Cache-Status` (RFC 9211).
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
/// `X-Cache`, for older dashboards.
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Headers a 304 carries over from the stored response (RFC 9110 15.4.5).
const NOT_MODIFIED_HEADERS: [HeaderName; 6] =
    [header::CACHE_CONTROL, header::CONTENT_LOCATION, header::DATE, header::ETAG, header::EXPIRES, header::VARY];

/// A response from a stored entry: its status, end-to-end headers and body unchanged, plus `Age`
/// and the cache headers. A fresh entry answers a matching conditional request with 304; HEAD
/// gets the headers without the body.
pub fn from_entry(entry: &Entry, head: bool, request: Option<&HeaderMap>, outcome: CacheOutcome) -> Response<Body> {
    let now = SystemTime::now();
    let age = entry.age(now).as_secs();
    let conditional_hit = outcome == CacheOutcome::Hit && request.is_some_and(|r| policy::not_modified(r, entry));
    let mut resp = if conditional_hit {
        let mut resp = Response::new(Either::Right(Full::new(Bytes::new())));
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        for name in &NOT_MODIFIED_HEADERS {
            for value in entry.headers.get_all(name) {
                resp.headers_mut().append(name.clone(), value.clone());
            }
        }
        resp
    } else {
        let body = if head { Bytes::new() } else { entry.body.clone() };
        let mut resp = Response::new(Either::Right(Full::new(body)));
        *resp.status_mut() = entry.status;
        *resp.headers_mut() = entry.headers.clone();
        resp
    };
    let h = resp.headers_mut();
    h.insert(header::AGE, HeaderValue::from(age));
    let ttl = entry.lifetime.as_secs() as i64 - age as i64;
    let (status, x_cache) = match outcome {
        CacheOutcome::StaleOnError => (format!("sidecache; hit; ttl={ttl}; detail=stale-if-error"), "STALE"),
        CacheOutcome::Collapsed => ("sidecache; fwd=miss; collapsed".to_string(), "MISS"),
        CacheOutcome::StaleWhileRevalidate => {
            (format!("sidecache; hit; ttl={ttl}; detail=stale-while-revalidate"), "STALE")
        }
        CacheOutcome::Revalidated => ("sidecache; fwd=stale; fwd-status=304".to_string(), "REVALIDATED"),
        _ => (format!("sidecache; hit; ttl={ttl}"), "HIT"),
    };
    h.insert(CACHE_STATUS.clone(), HeaderValue::from_str(&status).expect("ASCII"));
    h.insert(X_CACHE.clone(), HeaderValue::from_static(x_cache));
    resp
}
