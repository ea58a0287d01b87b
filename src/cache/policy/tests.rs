use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode};

use super::*;
use crate::config::{CacheConfig, QueryMode};

fn cfg(ttl: Option<u64>) -> CacheConfig {
    CacheConfig {
        ttl: ttl.map(Duration::from_secs),
        vary: vec![HeaderName::from_static("accept-encoding")],
        query: QueryMode::Sorted,
        stale_while_revalidate: Some(Duration::from_secs(30)),
        stale_if_error: Some(Duration::from_secs(600)),
        statuses: vec![StatusCode::OK, StatusCode::NOT_FOUND],
        ..CacheConfig::default()
    }
}

use crate::cache::fields as headers;

fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_790_000_000)
}

fn lifetime(pairs: &[(&str, &str)], ttl: Option<u64>) -> Result<Duration, NotStorable> {
    storable(StatusCode::OK, &headers(pairs), &cfg(ttl), now()).map(|f| f.lifetime)
}

#[test]
fn requests_with_credentials_a_body_or_an_upgrade_bypass() {
    let c = cfg(Some(60));
    let bypass =
        |method: Method, pairs: &[(&str, &str)], body: bool| request_bypass(&method, &headers(pairs), body, &c);
    assert_eq!(bypass(Method::POST, &[], false), Some(Bypass::Method));
    assert_eq!(bypass(Method::GET, &[], false), None);
    assert_eq!(bypass(Method::HEAD, &[("cookie", "a=1")], false), Some(Bypass::Cookie));
    assert_eq!(bypass(Method::GET, &[("authorization", "Bearer x")], false), Some(Bypass::Authorization));
    assert_eq!(bypass(Method::GET, &[], true), Some(Bypass::Body));
    assert_eq!(bypass(Method::HEAD, &[], true), Some(Bypass::Body));
    assert_eq!(bypass(Method::GET, &[("upgrade", "websocket")], false), Some(Bypass::Upgrade));
    assert_eq!(bypass(Method::GET, &[("x-http-method-override", "DELETE")], false), Some(Bypass::Method));
    assert_eq!(bypass(Method::GET, &[("x-method-override", "PUT")], false), Some(Bypass::Method));
    let mut keyed = c.clone();
    keyed.vary.push(http::header::AUTHORIZATION);
    assert_eq!(request_bypass(&Method::GET, &headers(&[("authorization", "Bearer x")]), false, &keyed), None);
}

#[test]
fn responses_that_must_not_be_stored() {
    let c = cfg(Some(60));
    let check = |status: StatusCode, pairs: &[(&str, &str)]| storable(status, &headers(pairs), &c, now()).err();
    assert_eq!(check(StatusCode::INTERNAL_SERVER_ERROR, &[]), Some(NotStorable::Status), "the ttl is for 200 and 404");
    assert_eq!(check(StatusCode::NOT_FOUND, &[]), None, "404 is listed for this route");
    for status in [206, 304, 101, 103] {
        let status = StatusCode::from_u16(status).unwrap();
        assert_eq!(check(status, &[("cache-control", "max-age=60")]), Some(NotStorable::Status), "{status}");
    }
    assert_eq!(check(StatusCode::OK, &[("set-cookie", "s=1")]), Some(NotStorable::SetCookie));
    assert_eq!(check(StatusCode::OK, &[("cache-control", "max-age=60, no-store")]), Some(NotStorable::NoStore));
    assert_eq!(check(StatusCode::OK, &[("cache-control", "Private")]), Some(NotStorable::Private));
    assert_eq!(check(StatusCode::OK, &[("cache-control", "private=\"x-user\"")]), Some(NotStorable::Private));
    assert_eq!(check(StatusCode::OK, &[("vary", "*")]), Some(NotStorable::VaryStar));
    assert_eq!(check(StatusCode::OK, &[("vary", "Accept-Encoding, User-Agent")]), None, "the origin varies further");
    assert_eq!(
        check(StatusCode::OK, &[("vary", "accept-encoding, x-forwarded-for")]),
        Some(NotStorable::VaryUnkeyable)
    );
    let mut unreadable = headers(&[]);
    unreadable.insert("cache-control", HeaderValue::from_bytes(b"private, max-age=60, x=\"caf\xe9\"").unwrap());
    assert_eq!(
        storable(StatusCode::OK, &unreadable, &c, now()).err(),
        Some(NotStorable::NoStore),
        "not ASCII: not stored"
    );
}

#[test]
fn without_a_route_ttl_the_origin_decides_alone() {
    assert_eq!(lifetime(&[("cache-control", "max-age=60, s-maxage=120")], None), Ok(Duration::from_secs(120)));
    assert_eq!(lifetime(&[("cache-control", "public, max-age=60")], None), Ok(Duration::from_secs(60)));
    let date = httpdate::fmt_http_date(now());
    let expires = httpdate::fmt_http_date(now() + Duration::from_secs(90));
    assert_eq!(lifetime(&[("date", &date), ("expires", &expires)], None), Ok(Duration::from_secs(90)));
    assert_eq!(
        lifetime(&[("expires", &expires), ("cache-control", "max-age=10")], None),
        Ok(Duration::from_secs(10)),
        "max-age wins over Expires"
    );
    assert_eq!(lifetime(&[("expires", "0")], None), Err(NotStorable::NoFreshness), "invalid Expires is expired");
    assert_eq!(lifetime(&[], None), Err(NotStorable::NoFreshness), "no explicit freshness: not stored");
    assert_eq!(lifetime(&[("cache-control", "max-age=0")], None), Err(NotStorable::NoFreshness));
}

#[test]
fn a_route_ttl_is_the_default_and_the_cap() {
    assert_eq!(lifetime(&[], Some(300)), Ok(Duration::from_secs(300)));
    assert_eq!(lifetime(&[("cache-control", "max-age=600")], Some(300)), Ok(Duration::from_secs(300)));
    assert_eq!(lifetime(&[("cache-control", "max-age=60")], Some(300)), Ok(Duration::from_secs(60)));
    let mut ignore = cfg(Some(300));
    ignore.respect_origin = false;
    let f = |pairs: &[(&str, &str)]| storable(StatusCode::OK, &headers(pairs), &ignore, now());
    assert_eq!(f(&[("cache-control", "max-age=5"), ("age", "4")]).unwrap().lifetime, Duration::from_secs(300));
    assert_eq!(f(&[("cache-control", "max-age=5"), ("age", "4")]).unwrap().initial_age, Duration::ZERO);
    assert_eq!(f(&[("cache-control", "no-store")]).err(), Some(NotStorable::NoStore), "always honoured");
    assert_eq!(f(&[("cache-control", "private")]).err(), Some(NotStorable::Private), "always honoured");
}

#[test]
fn no_cache_stores_for_revalidation_and_must_revalidate_forbids_stale() {
    let c = cfg(Some(300));
    let f = storable(StatusCode::OK, &headers(&[("cache-control", "no-cache"), ("etag", "\"a\"")]), &c, now()).unwrap();
    assert_eq!((f.lifetime, f.must_revalidate), (Duration::ZERO, true));
    assert_eq!((f.stale_while_revalidate, f.stale_if_error), (Duration::ZERO, Duration::ZERO));
    assert_eq!(
        storable(StatusCode::OK, &headers(&[("cache-control", "no-cache")]), &c, now()).err(),
        Some(NotStorable::NoFreshness),
        "nothing to revalidate with"
    );
    let f = storable(StatusCode::OK, &headers(&[("cache-control", "max-age=60, must-revalidate")]), &c, now()).unwrap();
    assert!(f.must_revalidate);
    assert_eq!(f.stale_if_error, Duration::ZERO);
    let f = storable(StatusCode::OK, &headers(&[("cache-control", "max-age=60")]), &c, now()).unwrap();
    assert_eq!((f.stale_while_revalidate, f.stale_if_error), (Duration::from_secs(30), Duration::from_secs(600)));
}

#[test]
fn age_on_arrival_and_how_long_to_keep() {
    let c = cfg(None);
    let f = storable(StatusCode::OK, &headers(&[("cache-control", "max-age=100"), ("age", "40")]), &c, now()).unwrap();
    assert_eq!(f.initial_age, Duration::from_secs(40));
    assert_eq!(f.keep_for(false), Duration::from_secs(60 + 600));
    assert_eq!(f.keep_for(true), Duration::from_secs(60 + 600 + 60));
}

fn entry(lifetime: u64, stored_ago: u64, must_revalidate: bool, pairs: &[(&str, &str)]) -> Entry {
    Entry {
        status: StatusCode::OK,
        headers: headers(pairs),
        body: Bytes::new(),
        stored_at: now() - Duration::from_secs(stored_ago),
        freshness: Freshness {
            lifetime: Duration::from_secs(lifetime),
            initial_age: Duration::ZERO,
            stale_while_revalidate: Duration::from_secs(30),
            stale_if_error: Duration::from_secs(600),
            must_revalidate,
        },
    }
}

#[test]
fn phases_and_stale_windows() {
    assert_eq!(phase(&entry(60, 10, false, &[]), now()), Phase::Fresh(Duration::from_secs(50)));
    let stale = entry(60, 80, false, &[]);
    assert_eq!(phase(&stale, now()), Phase::Stale(Duration::from_secs(20)));
    assert!(serve_while_revalidating(&stale, Duration::from_secs(20)));
    assert!(!serve_while_revalidating(&stale, Duration::from_secs(31)));
    assert!(serve_on_error(&stale, Duration::from_secs(599)));
    assert!(!serve_on_error(&entry(60, 80, true, &[]), Duration::from_secs(20)), "must-revalidate");
}

#[test]
fn conditional_requests_against_an_entry() {
    let lm = httpdate::fmt_http_date(now() - Duration::from_secs(3600));
    let e = entry(60, 0, false, &[("etag", "W/\"v7\""), ("last-modified", &lm)]);
    let nm = |pairs: &[(&str, &str)]| not_modified(&headers(pairs), &e);
    assert!(nm(&[("if-none-match", "\"v7\"")]), "weak comparison");
    assert!(nm(&[("if-none-match", "\"v1\", W/\"v7\"")]));
    assert!(nm(&[("if-none-match", "*")]));
    assert!(!nm(&[("if-none-match", "\"v8\"")]));
    let later = httpdate::fmt_http_date(now());
    let earlier = httpdate::fmt_http_date(now() - Duration::from_secs(7200));
    assert!(nm(&[("if-modified-since", &later)]));
    assert!(!nm(&[("if-modified-since", &earlier)]));
    assert!(!nm(&[("if-none-match", "\"v8\""), ("if-modified-since", &later)]), "If-None-Match takes precedence");
    assert!(!nm(&[]));
    assert!(!not_modified(&headers(&[("if-none-match", "*")]), &entry(60, 0, false, &[])), "no ETag to match");
}

#[test]
fn a_304_refreshes_headers_and_freshness_and_keeps_the_body() {
    let lm = httpdate::fmt_http_date(now() - Duration::from_secs(3600));
    let mut stale = entry(
        60,
        500,
        false,
        &[("etag", "\"v1\""), ("last-modified", &lm), ("x-kept", "yes"), ("cache-control", "max-age=60")],
    );
    stale.body = Bytes::from_static(b"the body");
    let cond = conditional_headers(&stale);
    assert_eq!(cond[0], (http::header::IF_NONE_MATCH, HeaderValue::from_static("\"v1\"")));
    assert_eq!(cond[1].0, http::header::IF_MODIFIED_SINCE);
    assert!(conditional_headers(&entry(60, 0, false, &[])).is_empty());

    let answer = headers(&[("cache-control", "max-age=120"), ("content-length", "0"), ("x-new", "1")]);
    let (fresh, stored) = revalidated(&stale, &answer, &cfg(Some(300)), now());
    assert!(stored);
    assert_eq!(fresh.body, stale.body);
    assert_eq!(fresh.freshness.lifetime, Duration::from_secs(120));
    assert_eq!(fresh.stored_at, now());
    assert_eq!(fresh.headers["cache-control"], "max-age=120");
    assert_eq!(fresh.headers["x-kept"], "yes");
    assert_eq!(fresh.headers["x-new"], "1");
    assert!(fresh.headers.get("content-length").is_none(), "a 304's framing is not the body's");
    let (private, stored) = revalidated(&stale, &headers(&[("cache-control", "private")]), &cfg(Some(300)), now());
    assert!(!stored, "a 304 that makes the response private is not stored");
    assert_eq!((private.body, private.stored_at), (stale.body.clone(), stale.stored_at), "but still answers");
    assert_eq!(private.headers["cache-control"], "private");
}

#[test]
fn numbers_from_the_origin_cannot_overflow() {
    for cc in ["max-age=18446744073709551615", "s-maxage=99999999999999999999999999", "max-age=2147483648"] {
        let f = storable(StatusCode::OK, &headers(&[("cache-control", cc)]), &cfg(None), now()).unwrap();
        assert_eq!(f.lifetime, Duration::from_secs(MAX_DELTA_SECONDS), "{cc}");
        let huge_age = headers(&[("cache-control", cc), ("age", "18446744073709551615"), ("etag", "\"e\"")]);
        let f = storable(StatusCode::OK, &huge_age, &cfg(None), now()).unwrap();
        assert_eq!(f.initial_age, Duration::from_secs(MAX_DELTA_SECONDS));
        let _ = f.keep_for(true);
        let e = Entry { freshness: f, ..entry(0, 0, false, &[]) };
        let _ = (phase(&e, now()), e.age(now() + Duration::from_secs(u32::MAX as u64)));
    }
    assert_eq!(delta_seconds("-1"), None);
    assert_eq!(delta_seconds("+5"), None);
    assert_eq!(delta_seconds("12"), Some(12));
    let f = Freshness {
        lifetime: Duration::MAX,
        initial_age: Duration::ZERO,
        stale_while_revalidate: Duration::MAX,
        stale_if_error: Duration::MAX,
        must_revalidate: false,
    };
    assert_eq!(f.keep_for(true), Duration::MAX, "saturates");
}

#[test]
fn explicit_freshness_makes_any_final_status_storable() {
    let c = cfg(Some(300));
    let check = |status: u16, pairs: &[(&str, &str)]| {
        storable(StatusCode::from_u16(status).unwrap(), &headers(pairs), &c, now()).map(|f| f.lifetime)
    };
    for status in [203, 204, 300, 301, 302, 303, 307, 308, 405, 410, 414, 418, 500, 502, 503, 599] {
        assert_eq!(check(status, &[("cache-control", "max-age=30")]), Ok(Duration::from_secs(30)), "{status}");
        assert_eq!(check(status, &[("cache-control", "s-maxage=900")]), Ok(Duration::from_secs(300)), "ttl caps");
        assert_eq!(check(status, &[]), Err(NotStorable::Status), "{status}: the route's ttl is for its statuses");
    }
    let expires = httpdate::fmt_http_date(now() + Duration::from_secs(60));
    assert_eq!(check(302, &[("expires", &expires)]), Ok(Duration::from_secs(60)));
    // Answers about one request rather than the resource would answer everyone with them.
    for status in [400, 401, 403, 408, 413, 417, 429, 431] {
        assert_eq!(check(status, &[("cache-control", "max-age=30")]), Err(NotStorable::Status), "{status}");
    }
    let mut heuristic = cfg(None);
    heuristic.heuristic = true;
    let lm = httpdate::fmt_http_date(now() - Duration::from_secs(1000));
    let public_400 = headers(&[("cache-control", "public"), ("last-modified", &lm)]);
    assert_eq!(storable(StatusCode::BAD_REQUEST, &public_400, &heuristic, now()).err(), Some(NotStorable::Status));
    let mut listed = cfg(Some(300));
    listed.statuses.push(StatusCode::BAD_REQUEST);
    let f = storable(StatusCode::BAD_REQUEST, &headers(&[("cache-control", "max-age=30")]), &listed, now());
    assert_eq!(f.map(|f| f.lifetime), Ok(Duration::from_secs(30)), "unless the route lists it");
    let mut fixed = cfg(Some(300));
    fixed.respect_origin = false;
    let f = storable(StatusCode::MOVED_PERMANENTLY, &headers(&[("cache-control", "max-age=30")]), &fixed, now());
    assert_eq!(f.err(), Some(NotStorable::Status), "respect_origin = false: only the route's statuses");
}

#[test]
fn heuristic_freshness_only_when_the_route_opts_in() {
    let lm = httpdate::fmt_http_date(now() - Duration::from_secs(10_000));
    let date = httpdate::fmt_http_date(now());
    let pairs = [("last-modified", lm.as_str()), ("date", date.as_str())];
    let mut c = cfg(None);
    let check = |c: &CacheConfig, status: u16, pairs: &[(&str, &str)]| {
        storable(StatusCode::from_u16(status).unwrap(), &headers(pairs), c, now()).map(|f| f.lifetime)
    };
    assert_eq!(check(&c, 200, &pairs), Err(NotStorable::NoFreshness), "off by default");
    c.heuristic = true;
    assert_eq!(check(&c, 200, &pairs), Ok(Duration::from_secs(1000)), "a tenth of the time since Last-Modified");
    assert_eq!(check(&c, 410, &pairs), Ok(Duration::from_secs(1000)));
    assert_eq!(check(&c, 302, &pairs), Err(NotStorable::NoFreshness), "302 is not heuristically cacheable");
    let public = [pairs[0], pairs[1], ("cache-control", "public")];
    assert_eq!(check(&c, 302, &public), Ok(Duration::from_secs(1000)), "unless public");
    assert_eq!(check(&c, 200, &[]), Err(NotStorable::NoFreshness), "no Last-Modified");
    c.ttl = Some(Duration::from_secs(60));
    c.statuses = vec![StatusCode::NOT_FOUND];
    assert_eq!(check(&c, 200, &pairs), Ok(Duration::from_secs(60)), "capped by the ttl");
    let old = httpdate::fmt_http_date(now() - Duration::from_secs(86_400 * 3650));
    c.ttl = None;
    assert_eq!(check(&c, 200, &[("last-modified", &old)]), Ok(Duration::from_secs(86_400)), "at most a day");
}

#[test]
fn the_origins_stale_directives_with_the_route_as_default_and_cap() {
    let f = |pairs: &[(&str, &str)], c: &CacheConfig| storable(StatusCode::OK, &headers(pairs), c, now()).unwrap();
    let windows = |fr: Freshness| (fr.stale_while_revalidate.as_secs(), fr.stale_if_error.as_secs());
    let route = cfg(Some(300)); // 30 s and 600 s
    assert_eq!(windows(f(&[("cache-control", "max-age=60")], &route)), (30, 600), "the route's by default");
    let origin = [("cache-control", "max-age=60, stale-while-revalidate=10, stale-if-error=6000")];
    assert_eq!(windows(f(&origin, &route)), (10, 600), "the origin's, capped by the route's");
    let mut unset = cfg(Some(300));
    (unset.stale_while_revalidate, unset.stale_if_error) = (None, None);
    assert_eq!(windows(f(&origin, &unset)), (10, 6000), "the origin's alone");
    assert_eq!(windows(f(&[("cache-control", "max-age=60")], &unset)), (0, 0));
    for forbids in ["must-revalidate", "proxy-revalidate", "no-cache"] {
        let cc = format!("max-age=60, stale-while-revalidate=10, stale-if-error=60, {forbids}");
        let fr = f(&[("cache-control", &cc), ("etag", "\"e\"")], &route);
        assert_eq!((windows(fr), fr.must_revalidate), ((0, 0), true), "{forbids}");
    }
    let fr = f(&[("cache-control", "s-maxage=60, stale-if-error=60")], &route);
    assert_eq!((windows(fr), fr.must_revalidate), ((0, 0), true), "s-maxage implies proxy-revalidate");
    let mut fixed = cfg(Some(300));
    fixed.respect_origin = false;
    let fr = f(&[("cache-control", "must-revalidate, stale-if-error=1")], &fixed);
    assert_eq!((windows(fr), fr.must_revalidate), ((30, 600), false), "respect_origin = false: the route's");
}

#[test]
fn fields_are_read_as_the_rfcs_say() {
    let age = |value: &str| {
        storable(StatusCode::OK, &headers(&[("cache-control", "max-age=100"), ("age", value)]), &cfg(None), now())
            .map(|f| f.initial_age.as_secs())
    };
    assert_eq!(age("10, 20"), Ok(10), "the first member of a list");
    assert_eq!(age(" 7 "), Ok(7));
    assert_eq!(age("abc"), Ok(0), "invalid: ignored");
    assert_eq!(age("-5, 3"), Ok(0), "the first member is invalid: ignored");
    assert_eq!(age("1.5"), Ok(0));
    let expires = |values: &[&str]| {
        let mut h = headers(&[("date", "Sun, 06 Nov 1994 08:49:37 GMT")]);
        for v in values {
            h.append("expires", HeaderValue::from_str(v).unwrap());
        }
        storable(StatusCode::OK, &h, &cfg(None), now()).map(|f| f.lifetime.as_secs())
    };
    assert_eq!(expires(&["Sun, 06 Nov 1994 08:50:37 GMT"]), Ok(60), "IMF-fixdate");
    assert_eq!(expires(&["Sunday, 06-Nov-94 08:50:37 GMT"]), Ok(60), "RFC 850");
    assert_eq!(expires(&["Sun Nov  6 08:50:37 1994"]), Ok(60), "asctime");
    assert_eq!(expires(&["soon"]), Err(NotStorable::NoFreshness), "invalid: already expired");
    assert_eq!(expires(&["Sun, 06 Nov 1994 08:50:37 GMT", "Sun, 06 Nov 1994 08:50:37 GMT"]), Ok(60));
    assert_eq!(
        expires(&["Sun, 06 Nov 1994 08:50:37 GMT", "Sun, 06 Nov 1994 09:50:37 GMT"]),
        Err(NotStorable::NoFreshness),
        "lines that disagree: expired"
    );
    let lifetime = |cc: &[&str]| {
        let pairs: Vec<(&str, &str)> = cc.iter().map(|v| ("cache-control", *v)).collect();
        storable(StatusCode::OK, &headers(&pairs), &cfg(Some(300)), now()).map(|f| f.lifetime.as_secs())
    };
    assert_eq!(lifetime(&["max-age=60", "max-age=60"]), Ok(60));
    assert_eq!(lifetime(&["max-age=60", "max-age=120"]), Err(NotStorable::NoFreshness), "conflicting: stale");
    assert_eq!(lifetime(&["max-age=60, public"]), Ok(60));
}

#[test]
fn a_targeted_field_decides_for_this_cache() {
    let c = cfg(None);
    let f = |pairs: &[(&str, &str)]| storable(StatusCode::OK, &headers(pairs), &c, now()).map(|f| f.lifetime.as_secs());
    assert_eq!(f(&[("cache-control", "no-store"), ("sidecache-cache-control", "max-age=90")]), Ok(90));
    assert_eq!(
        f(&[("cache-control", "max-age=90"), ("sidecache-cache-control", "no-store")]),
        Err(NotStorable::NoStore)
    );
    assert_eq!(f(&[("cache-control", "max-age=90"), ("sidecache-cache-control", "max-age=,")]), Ok(90), "invalid");
    let wrong_type = [("cache-control", "max-age=90"), ("sidecache-cache-control", "max-age=(1)")];
    assert_eq!(
        f(&wrong_type),
        Err(NotStorable::NoFreshness),
        "valid, so used: its max-age of the wrong type is ignored"
    );
    assert_eq!(f(&[("cache-control", "max-age=90"), ("cdn-cache-control", "max-age=5")]), Ok(90), "not listed");
    let mut cdn = cfg(None);
    cdn.targeted.push(HeaderName::from_static("cdn-cache-control"));
    let f = storable(
        StatusCode::OK,
        &headers(&[("cache-control", "max-age=90"), ("cdn-cache-control", "max-age=5")]),
        &cdn,
        now(),
    );
    assert_eq!(f.map(|f| f.lifetime.as_secs()), Ok(5));
}
