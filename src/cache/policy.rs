//! What may be cached and for how long: a shared cache's rules (RFC 9111) with the route's `ttl`
//! as the default lifetime and the cap, and conditional requests answered from a fresh entry.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName};
use http::{Method, StatusCode};

use super::entry::Entry;
pub use super::entry::Freshness;
use crate::config::CacheConfig;

/// Why a request does not use the cache (logged at debug).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bypass {
    /// Only GET and HEAD are cached.
    Method,
    /// `Authorization` is present and not part of the key (RFC 9111 3.5).
    Authorization,
    /// `Cookie` is present and not part of the key.
    Cookie,
    /// A request body: a shared cache cannot key on it.
    Body,
    /// A protocol upgrade.
    Upgrade,
    /// A query the key cannot represent faithfully.
    Query,
}

/// Fields with which a client asks a framework to treat a request as another method.
static METHOD_OVERRIDES: [HeaderName; 3] = [
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Whether a (sanitized) request must bypass the cache of a route; `has_body` says it carries a
/// body (`Content-Length` > 0, chunked, or an h2 DATA frame).
pub fn request_bypass(method: &Method, headers: &HeaderMap, has_body: bool, cfg: &CacheConfig) -> Option<Bypass> {
    if *method != Method::GET && *method != Method::HEAD {
        return Some(Bypass::Method);
    }
    let keyed = |name: &HeaderName| cfg.vary.contains(name);
    if headers.contains_key(header::AUTHORIZATION) && !keyed(&header::AUTHORIZATION) {
        return Some(Bypass::Authorization);
    }
    if headers.contains_key(header::COOKIE) && !keyed(&header::COOKIE) {
        return Some(Bypass::Cookie);
    }
    if has_body {
        return Some(Bypass::Body);
    }
    // A method override makes some frameworks answer another method's handler to a GET.
    if METHOD_OVERRIDES.iter().any(|name| headers.contains_key(name)) {
        return Some(Bypass::Method);
    }
    // Sanitizing removed `Upgrade` unless the request really asks for one.
    if headers.contains_key(header::UPGRADE) {
        return Some(Bypass::Upgrade);
    }
    None
}

/// Why a response is not stored; also the `cache_stores_total` result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStorable {
    /// Status not in the route's `statuses`.
    Status,
    /// The response sets a cookie.
    SetCookie,
    /// `Cache-Control: no-store`.
    NoStore,
    /// `Cache-Control: private`.
    Private,
    /// `Vary: *`.
    VaryStar,
    /// `Vary` names a header outside the route's `vary` list.
    VaryOutside,
    /// No freshness information and no route `ttl`, or already expired without validators.
    NoFreshness,
}

impl NotStorable {
    /// The reason as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::SetCookie => "set_cookie",
            Self::NoStore => "no_store",
            Self::Private => "private",
            Self::VaryStar => "vary_star",
            Self::VaryOutside => "vary_outside",
            Self::NoFreshness => "no_freshness",
        }
    }
}

/// Delta-seconds (RFC 9111 1.2.2) are capped here: a larger value, however many digits it has,
/// means 2^31 seconds, so no arithmetic on an origin's number can overflow.
pub const MAX_DELTA_SECONDS: u64 = 1 << 31;

/// A delta-seconds value: digits only, capped at [`MAX_DELTA_SECONDS`]; `None` when invalid.
pub fn delta_seconds(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse::<u64>().unwrap_or(u64::MAX).min(MAX_DELTA_SECONDS))
}

/// How long the store keeps an entry (see [`Freshness::keep_for`]).
pub fn keep_for(entry: &Entry) -> Duration {
    entry.freshness.keep_for(has_validators(&entry.headers))
}

/// The `Cache-Control` directives a shared cache acts on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct CacheControl {
    no_store: bool,
    private: bool,
    no_cache: bool,
    must_revalidate: bool,
    max_age: Option<u64>,
    s_maxage: Option<u64>,
}

impl CacheControl {
    fn parse(headers: &HeaderMap) -> CacheControl {
        let mut cc = CacheControl::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            // A line that cannot be read could say `private` or `no-store`: the safe reading.
            let Ok(value) = value.to_str() else {
                cc.no_store = true;
                continue;
            };
            for directive in value.split(',') {
                let (name, arg) = match directive.split_once('=') {
                    Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
                    None => (directive.trim(), None),
                };
                let seconds = || arg.and_then(delta_seconds);
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => cc.no_store = true,
                    // `private="field"` and `no-cache="field"` are treated like the bare forms:
                    // the safe reading for a shared cache.
                    "private" => cc.private = true,
                    "no-cache" => cc.no_cache = true,
                    "must-revalidate" | "proxy-revalidate" => cc.must_revalidate = true,
                    // Repeated or conflicting ages: the shortest wins.
                    "max-age" => cc.max_age = min_some(cc.max_age, seconds().or(Some(0))),
                    "s-maxage" => cc.s_maxage = min_some(cc.s_maxage, seconds().or(Some(0))),
                    _ => {}
                }
            }
        }
        cc
    }
}

fn min_some(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn http_date(headers: &HeaderMap, name: HeaderName) -> Option<SystemTime> {
    headers.get(name).and_then(|v| v.to_str().ok()).and_then(|s| httpdate::parse_http_date(s).ok())
}

/// The origin's explicit freshness lifetime (RFC 9111 4.2.1): `s-maxage`, else `max-age`, else
/// `Expires` − `Date`. An `Expires` that is present but unparseable means already expired.
fn origin_lifetime(cc: &CacheControl, headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(s) = cc.s_maxage.or(cc.max_age) {
        return Some(Duration::from_secs(s));
    }
    let expires = headers.get(header::EXPIRES)?;
    let Some(expires) = expires.to_str().ok().and_then(|s| httpdate::parse_http_date(s).ok()) else {
        return Some(Duration::ZERO);
    };
    let date = http_date(headers, header::DATE).unwrap_or(now);
    Some(expires.duration_since(date).unwrap_or_default())
}

/// Whether the response carries a validator for conditional revalidation.
pub fn has_validators(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED)
}

/// Decide whether a response may be stored, and its freshness.
pub fn storable(
    status: StatusCode,
    headers: &HeaderMap,
    cfg: &CacheConfig,
    now: SystemTime,
) -> Result<Freshness, NotStorable> {
    if !cfg.statuses.contains(&status) {
        return Err(NotStorable::Status);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Err(NotStorable::SetCookie);
    }
    let cc = CacheControl::parse(headers);
    if cc.no_store {
        return Err(NotStorable::NoStore);
    }
    if cc.private {
        return Err(NotStorable::Private);
    }
    for value in headers.get_all(header::VARY).iter() {
        for name in value.to_str().unwrap_or("*").split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return Err(NotStorable::VaryStar);
            }
            if !cfg.vary.iter().any(|v| v.as_str().eq_ignore_ascii_case(name)) {
                return Err(NotStorable::VaryOutside);
            }
        }
    }

    let (lifetime, must_revalidate) = if cfg.respect_origin {
        let origin = origin_lifetime(&cc, headers, now);
        let lifetime = match (origin, cfg.ttl) {
            (Some(o), Some(ttl)) => o.min(ttl),
            (Some(o), None) => o,
            (None, Some(ttl)) => ttl,
            (None, None) => return Err(NotStorable::NoFreshness),
        };
        // `no-cache`: store, but revalidate before every use.
        if cc.no_cache {
            (Duration::ZERO, true)
        } else {
            (lifetime, cc.must_revalidate)
        }
    } else {
        (cfg.ttl.ok_or(NotStorable::NoFreshness)?, false)
    };
    let initial_age = if cfg.respect_origin {
        headers
            .get(header::AGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| delta_seconds(v.trim()))
            .map(Duration::from_secs)
            .unwrap_or_default()
    } else {
        Duration::ZERO
    };
    let (swr, sie) = if must_revalidate {
        (Duration::ZERO, Duration::ZERO)
    } else {
        (cfg.stale_while_revalidate, cfg.stale_if_error)
    };
    let freshness =
        Freshness { lifetime, initial_age, stale_while_revalidate: swr, stale_if_error: sie, must_revalidate };
    // Stale on arrival with nothing to revalidate it with: storing it could only ever serve
    // what the origin already called expired.
    if lifetime <= initial_age && !has_validators(headers) {
        return Err(NotStorable::NoFreshness);
    }
    Ok(freshness)
}

/// Where an entry stands at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Fresh for this much longer.
    Fresh(Duration),
    /// Expired this long ago.
    Stale(Duration),
}

/// The entry's phase at `now`.
pub fn phase(entry: &Entry, now: SystemTime) -> Phase {
    let age = entry.age(now);
    let lifetime = entry.freshness.lifetime;
    if age < lifetime {
        Phase::Fresh(lifetime - age)
    } else {
        Phase::Stale(age - lifetime)
    }
}

/// Whether a stale entry may be served while it is refreshed in the background.
pub fn serve_while_revalidating(entry: &Entry, stale_for: Duration) -> bool {
    !entry.freshness.must_revalidate && stale_for <= entry.freshness.stale_while_revalidate
}

/// Whether a stale entry may be served because the upstream failed.
pub fn serve_on_error(entry: &Entry, stale_for: Duration) -> bool {
    !entry.freshness.must_revalidate && stale_for <= entry.freshness.stale_if_error
}

/// Whether a conditional request is satisfied by a (fresh) entry: answer 304 instead of the body.
/// `If-None-Match` (weak comparison) takes precedence over `If-Modified-Since` (RFC 9110 13.2.2).
pub fn not_modified(request: &HeaderMap, entry: &Entry) -> bool {
    let inm: Vec<&str> = request.get_all(header::IF_NONE_MATCH).iter().filter_map(|v| v.to_str().ok()).collect();
    if !inm.is_empty() {
        let Some(etag) = entry.headers.get(header::ETAG).and_then(|v| v.to_str().ok()) else { return false };
        let opaque = |t: &str| t.trim().trim_start_matches("W/").to_string();
        let etag = opaque(etag);
        return inm.iter().flat_map(|v| v.split(',')).any(|t| t.trim() == "*" || opaque(t) == etag);
    }
    match (http_date(request, header::IF_MODIFIED_SINCE), http_date(&entry.headers, header::LAST_MODIFIED)) {
        (Some(since), Some(modified)) => modified <= since,
        _ => false,
    }
}

/// The validators to send when refreshing `entry` (RFC 9111 4.3.1), empty when it has none.
pub fn conditional_headers(entry: &Entry) -> Vec<(HeaderName, http::HeaderValue)> {
    let mut out = Vec::new();
    if let Some(etag) = entry.headers.get(header::ETAG) {
        out.push((header::IF_NONE_MATCH, etag.clone()));
    }
    if let Some(modified) = entry.headers.get(header::LAST_MODIFIED) {
        out.push((header::IF_MODIFIED_SINCE, modified.clone()));
    }
    out
}

/// The entry after a 304 to our own conditional request (RFC 9111 4.3.4): the 304's headers
/// replace the stored ones of the same names, freshness is computed anew from the merged headers,
/// the body is kept. The flag says whether the merged response may be stored; when it may not
/// (the 304 said `private`, or set a cookie), it still answers this request (4.3.3: a 304 to our
/// own request is never passed on), with the old freshness, and is not stored again.
pub fn revalidated(entry: &Entry, not_modified: &HeaderMap, cfg: &CacheConfig, now: SystemTime) -> (Entry, bool) {
    let mut headers = entry.headers.clone();
    for name in not_modified.keys() {
        // Framing and hop-by-hop fields of the 304 say nothing about the stored body.
        if matches!(*name, header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::CONNECTION) {
            continue;
        }
        headers.remove(name);
        for value in not_modified.get_all(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    let (freshness, stored_at, storable) = match storable(entry.status, &headers, cfg, now) {
        Ok(freshness) => (freshness, now, true),
        Err(_) => (entry.freshness, entry.stored_at, false),
    };
    (Entry { status: entry.status, headers, body: entry.body.clone(), stored_at, freshness }, storable)
}

#[cfg(test)]
mod tests;
