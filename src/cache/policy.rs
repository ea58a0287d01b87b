//! What may be cached and for how long: a shared cache's rules (RFC 9111) with the route's `ttl`
//! as the default lifetime and the cap, and conditional requests answered from a fresh entry.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName};
use http::{Method, StatusCode};

use super::entry::Entry;
pub use super::entry::Freshness;
use crate::config::CacheConfig;
pub use directives::{RequestDirectives, ResponseDirectives};

mod directives;

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
    /// A status that is never stored, or one that needs the route's `statuses` (freshness from
    /// the route's `ttl`, or an answer about the request rather than the resource, such as 429).
    Status,
    /// The response sets a cookie.
    SetCookie,
    /// `Cache-Control: no-store`.
    NoStore,
    /// `Cache-Control: private`.
    Private,
    /// `Vary: *`.
    VaryStar,
    /// `Vary` names a field the proxy itself sets for the backend (`X-Forwarded-For`, `Via`,
    /// trace context), or is not a list of field names: the key cannot hold what the backend saw.
    VaryUnkeyable,
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
            Self::VaryUnkeyable => "vary_unkeyable",
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

/// Statuses a response may get heuristic freshness for (RFC 9110 15.1), less 206: a part is
/// never stored, ranges are answered from a stored full response.
const HEURISTICALLY_CACHEABLE: [u16; 11] = [200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];
/// Answers about the request rather than the resource: its header fields (malformed, oversized,
/// an unmet `Expect`), its credentials, its client's address or rate (a WAF's 403, a limiter's
/// 429), its body. The key holds none of these, so stored they would answer everyone with one
/// client's error (cache-poisoned denial of service). Stored only when the route lists them.
const ABOUT_THE_REQUEST: [u16; 14] = [400, 401, 403, 407, 408, 411, 412, 413, 416, 417, 421, 428, 429, 431];
/// Heuristic freshness never exceeds this (nor the route's `ttl`).
const MAX_HEURISTIC: Duration = Duration::from_secs(86_400);

fn http_date(headers: &HeaderMap, name: HeaderName) -> Option<SystemTime> {
    headers.get(name).and_then(|v| v.to_str().ok()).and_then(|s| httpdate::parse_http_date(s.trim()).ok())
}

/// The origin's explicit freshness lifetime (RFC 9111 4.2.1): `s-maxage`, else `max-age`, else
/// `Expires` − `Date`. An `Expires` that cannot be parsed (any of RFC 9110 5.6.7's three date
/// formats), or several that disagree, means already expired.
fn origin_lifetime(d: &ResponseDirectives, headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(s) = d.s_maxage.or(d.max_age) {
        return Some(Duration::from_secs(s));
    }
    let mut lines = headers.get_all(header::EXPIRES).iter();
    let first = lines.next()?;
    if lines.any(|line| line != first) {
        return Some(Duration::ZERO);
    }
    let Some(expires) = first.to_str().ok().and_then(|s| httpdate::parse_http_date(s.trim()).ok()) else {
        return Some(Duration::ZERO);
    };
    let date = http_date(headers, header::DATE).unwrap_or(now);
    Some(expires.duration_since(date).unwrap_or_default())
}

/// Heuristic freshness (RFC 9111 4.2.2): a tenth of the time since `Last-Modified`.
fn heuristic_lifetime(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let modified = http_date(headers, header::LAST_MODIFIED)?;
    let date = http_date(headers, header::DATE).unwrap_or(now);
    Some((date.duration_since(modified).unwrap_or_default() / 10).min(MAX_HEURISTIC))
}

/// The response's age on arrival (RFC 9111 5.1): the first member of `Age`, ignored when it is
/// not delta-seconds.
fn age_on_arrival(headers: &HeaderMap) -> Duration {
    let first = headers.get(header::AGE).and_then(|v| v.to_str().ok()).and_then(|v| v.split(',').next());
    first.and_then(|v| delta_seconds(v.trim())).map(Duration::from_secs).unwrap_or_default()
}

/// Whether the response carries a validator for conditional revalidation.
pub fn has_validators(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED)
}

/// Decide whether a response may be stored, and its freshness (RFC 9111 3 and 4.2).
///
/// The lifetime comes from the origin's explicit freshness (any final status, capped by the
/// route's `ttl`), else from the route's `ttl` (only for the route's `statuses`), else, when the
/// route opts in, from `Last-Modified`. Stale use: the origin's `stale-while-revalidate` and
/// `stale-if-error`, with the route's settings as defaults and caps; none at all after
/// `must-revalidate`, `proxy-revalidate`, `no-cache` or `s-maxage` (RFC 9111 4.2.4, 5.2.2.10).
pub fn storable(
    status: StatusCode,
    headers: &HeaderMap,
    cfg: &CacheConfig,
    now: SystemTime,
) -> Result<Freshness, NotStorable> {
    if status.is_informational() || status == StatusCode::PARTIAL_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Err(NotStorable::Status);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Err(NotStorable::SetCookie);
    }
    let d = ResponseDirectives::of(headers, &cfg.targeted);
    if d.no_store {
        return Err(NotStorable::NoStore);
    }
    if d.private {
        return Err(NotStorable::Private);
    }
    super::vary::names(headers)?;

    let listed = cfg.statuses.contains(&status);
    if ABOUT_THE_REQUEST.contains(&status.as_u16()) && !listed {
        return Err(NotStorable::Status);
    }
    let origin = cfg.respect_origin.then(|| origin_lifetime(&d, headers, now)).flatten();
    let capped = |lifetime: Duration| cfg.ttl.map_or(lifetime, |ttl| lifetime.min(ttl));
    let lifetime = match (origin, cfg.ttl) {
        (Some(origin), _) => capped(origin),
        (None, Some(ttl)) if listed => ttl,
        (None, _)
            if cfg.heuristic
                && cfg.respect_origin
                && (d.public || HEURISTICALLY_CACHEABLE.contains(&status.as_u16())) =>
        {
            capped(heuristic_lifetime(headers, now).ok_or(NotStorable::NoFreshness)?)
        }
        (None, Some(_)) => return Err(NotStorable::Status),
        (None, None) => return Err(NotStorable::NoFreshness),
    };
    let respect = cfg.respect_origin;
    // `no-cache`: store, but revalidate before every use.
    let lifetime = if respect && d.no_cache { Duration::ZERO } else { lifetime };
    let must_revalidate = respect && (d.must_revalidate || d.no_cache || d.s_maxage.is_some());
    let window = |origin: Option<u64>, route: Option<Duration>| {
        if must_revalidate {
            return Duration::ZERO;
        }
        match (origin.filter(|_| respect).map(Duration::from_secs), route) {
            (Some(origin), Some(route)) => origin.min(route),
            (origin, route) => origin.or(route).unwrap_or_default(),
        }
    };
    let freshness = Freshness {
        lifetime,
        initial_age: if respect { age_on_arrival(headers) } else { Duration::ZERO },
        stale_while_revalidate: window(d.stale_while_revalidate, cfg.stale_while_revalidate),
        stale_if_error: window(d.stale_if_error, cfg.stale_if_error),
        must_revalidate,
    };
    // Stale on arrival with nothing to revalidate it with: storing it could only ever serve
    // what the origin already called expired.
    if freshness.lifetime <= freshness.initial_age && !has_validators(headers) {
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

/// What a request may do with a stored entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Use {
    /// Answer with it.
    Fresh,
    /// Answer with it although it is stale, and refresh it in the background.
    Stale,
    /// Forward, with its validators when it has any.
    Revalidate,
}

/// What `asks` (the client's directives, default when the route ignores them) lets a request
/// do with `entry`: fresh entries answer unless the client wants them younger (`max-age`),
/// fresher (`min-fresh`) or validated (`no-cache`); stale ones answer inside the entry's
/// `stale-while-revalidate`, or the client's `max-stale` unless the origin forbade stale use.
pub fn usable(entry: &Entry, phase: Phase, asks: &RequestDirectives, now: SystemTime) -> Use {
    let too_old = asks.max_age.is_some_and(|max| entry.age(now) > Duration::from_secs(max));
    if asks.no_cache || too_old {
        return Use::Revalidate;
    }
    let min_fresh = Duration::from_secs(asks.min_fresh.unwrap_or(0));
    match phase {
        Phase::Fresh(left) if left >= min_fresh => Use::Fresh,
        Phase::Fresh(_) => Use::Revalidate,
        Phase::Stale(_) if asks.min_fresh.is_some() => Use::Revalidate,
        Phase::Stale(by) if serve_while_revalidating(entry, by) => Use::Stale,
        Phase::Stale(by) => {
            let allowed = asks.max_stale.is_some_and(|max| max.is_none_or(|max| by <= Duration::from_secs(max)));
            match allowed && !entry.freshness.must_revalidate {
                true => Use::Stale,
                false => Use::Revalidate,
            }
        }
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
