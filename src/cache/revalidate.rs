//! The background refresh of stale-while-revalidate: one per stale key (the flight table makes
//! sure), a conditional request when the entry has validators, and the result stored. Clients
//! never wait for it; a failed refresh leaves the stale entry in place.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Full, Limited};

use super::coalesce::FlightGuard;
use super::entry::Entry;
use super::key::CacheKey;
use super::{policy, Cache};
use crate::upstream::{headers, Upstream};

/// What the refresh asks the upstream, taken from the request that found the entry stale.
pub struct RefreshRequest {
    /// Path and query of the stale entry.
    pub uri: Uri,
    /// The client's headers (Host and the `vary` headers matter), without its own conditionals.
    pub headers: HeaderMap,
}

impl RefreshRequest {
    /// Capture what a refresh needs from a client request.
    pub fn from_client(uri: &Uri, client: &HeaderMap) -> RefreshRequest {
        let mut headers = client.clone();
        headers::remove_hop_by_hop(&mut headers);
        for name in [http::header::IF_NONE_MATCH, http::header::IF_MODIFIED_SINCE, http::header::RANGE] {
            headers.remove(name);
        }
        RefreshRequest { uri: uri.clone(), headers }
    }
}

/// Refresh a stale entry and store the result; publishes it to the flight's followers.
pub async fn refresh(
    cache: Arc<Cache>,
    upstream: Upstream,
    index: usize,
    key: CacheKey,
    flight: FlightGuard,
    stale: Arc<Entry>,
    request: RefreshRequest,
) {
    let Some(config) = cache.config(index).cloned() else { return };
    let mut req = Request::new(Either::Right(Full::new(Bytes::new())));
    *req.method_mut() = Method::GET;
    *req.uri_mut() = request.uri;
    *req.headers_mut() = request.headers;
    for (name, value) in policy::conditional_headers(&stale) {
        req.headers_mut().insert(name, value);
    }
    headers::append_via(req.headers_mut(), http::Version::HTTP_11);

    let response = match upstream.forward(req).await {
        Ok(forwarded) => forwarded.response,
        Err(e) => {
            tracing::debug!(error = %e, "background refresh failed; the stale entry stays");
            return;
        }
    };
    if response.status() == StatusCode::NOT_MODIFIED {
        if let Some(entry) = policy::refreshed(&stale, response.headers(), &config, SystemTime::now()) {
            let entry = Arc::new(entry);
            flight.publish(entry.clone());
            cache.put_entry(index, key, entry);
        }
        return;
    }
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, config.max_body).collect();
    match tokio::time::timeout(upstream.response_timeout(), body).await {
        Ok(Ok(body)) => cache.store_whole(index, key, parts.status, &parts.headers, body.to_bytes(), Some(flight)),
        _ => tracing::debug!("background refresh body unusable (too large, broken or slow)"),
    }
}
