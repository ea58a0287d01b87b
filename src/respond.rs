//! Every response the proxy writes itself, and the one place where typed errors become HTTP.

use std::time::SystemTime;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::body::{self, Body};
use crate::cache::entry::Entry;
use crate::cache::range::{self, Ranged};
use crate::cache::{policy, Outcome};
use crate::ratelimit::Quota;
use crate::upstream::UpstreamError;

/// A short plain-text response.
pub fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(body::full(Bytes::from_static(body.as_bytes())));
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
    let mut resp = Response::new(body::full(Bytes::from(body)));
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

/// `503` for a route whose limit fails closed while the shared limiter cannot answer:
/// `Retry-After` (whole seconds, rounded up) and `{"error":"rate_limiter_unavailable"}`.
pub fn limiter_unavailable(retry_after: std::time::Duration) -> Response<Body> {
    let mut resp = json(StatusCode::SERVICE_UNAVAILABLE, r#"{"error":"rate_limiter_unavailable"}"#.to_string());
    let seconds = retry_after.as_millis().div_ceil(1000).max(1) as u64;
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    resp
}

/// The answer to a failed upstream exchange: 400 when the client's body failed it, 408 when it
/// was still arriving as the time budget ran out, 504 when the backend's ran out, 502
/// otherwise, with a one-line reason (never the error's details: they can name internal hosts).
pub fn upstream_error(e: &UpstreamError) -> Response<Body> {
    match e {
        UpstreamError::Timeout => text(StatusCode::GATEWAY_TIMEOUT, "upstream did not respond in time\n"),
        UpstreamError::ConnectTimeout(_) => text(StatusCode::GATEWAY_TIMEOUT, "upstream connect timed out\n"),
        UpstreamError::Connect(_) => text(StatusCode::BAD_GATEWAY, "upstream unreachable\n"),
        UpstreamError::Protocol(_) => text(StatusCode::BAD_GATEWAY, "upstream closed the connection\n"),
        UpstreamError::ClientBody(_) => text(StatusCode::BAD_REQUEST, "malformed or incomplete request body\n"),
        UpstreamError::ClientTimeout => text(StatusCode::REQUEST_TIMEOUT, "request body not received in time\n"),
    }
}

/// Headers a 304 carries over from the stored response (RFC 9110 15.4.5).
static NOT_MODIFIED_HEADERS: [HeaderName; 6] =
    [header::CACHE_CONTROL, header::CONTENT_LOCATION, header::DATE, header::ETAG, header::EXPIRES, header::VARY];

/// A response from a stored entry: its status, end-to-end headers and body unchanged, plus `Age`
/// and the cache headers of `outcome`. Given the request's headers, a fresh entry answers a
/// matching conditional request with 304, and a GET for one byte range with 206 (or 416); HEAD
/// gets the headers without the body.
pub fn from_entry(
    entry: &Entry,
    head: bool,
    conditional: Option<&HeaderMap>,
    outcome: Outcome,
    now: SystemTime,
) -> Response<Body> {
    let age = entry.age(now).as_secs();
    let mut resp = if conditional.is_some_and(|r| policy::not_modified(r, entry)) {
        let mut resp = Response::new(body::full(Bytes::new()));
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        for name in &NOT_MODIFIED_HEADERS {
            for value in entry.headers.get_all(name) {
                resp.headers_mut().append(name.clone(), value.clone());
            }
        }
        resp
    } else {
        let ranged = match conditional {
            Some(request) if !head => range::select(request, entry),
            _ => Ranged::Full,
        };
        let len = entry.body.len();
        let (status, body, content_range) = match ranged {
            Ranged::Full => (entry.status, if head { Bytes::new() } else { entry.body.clone() }, None),
            Ranged::Part(first, last) => {
                let part = entry.body.slice(first as usize..=last as usize);
                (StatusCode::PARTIAL_CONTENT, part, Some(format!("bytes {first}-{last}/{len}")))
            }
            Ranged::Unsatisfiable => (StatusCode::RANGE_NOT_SATISFIABLE, Bytes::new(), Some(format!("bytes */{len}"))),
        };
        let mut resp = Response::new(body::full(body));
        *resp.status_mut() = status;
        *resp.headers_mut() = entry.headers.clone();
        if let Some(content_range) = content_range {
            let h = resp.headers_mut();
            h.insert(header::CONTENT_RANGE, HeaderValue::try_from(content_range).expect("digits"));
            h.remove(header::CONTENT_LENGTH);
        }
        resp
    };
    let h = resp.headers_mut();
    h.insert(header::AGE, HeaderValue::from(age));
    let lifetime = i64::try_from(entry.freshness.lifetime.as_secs()).unwrap_or(i64::MAX);
    outcome.apply(h, lifetime.saturating_sub(i64::try_from(age).unwrap_or(i64::MAX)), false);
    resp
}
