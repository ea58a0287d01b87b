//! Byte ranges answered from a stored full response (RFC 9110 14): one range is a `206`, one
//! that cannot be satisfied a `416`; several ranges, a `Range` that cannot be read, or an
//! `If-Range` that does not match get the whole `200`, as the RFC lets a server answer.

use http::{header, HeaderMap};

use super::entry::Entry;

/// What a request's `Range` makes of an entry's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ranged {
    /// The whole response.
    Full,
    /// Bytes `first..=last` of the body.
    Part(u64, u64),
    /// No byte of the range exists (`416`).
    Unsatisfiable,
}

/// The range `request` asks of `entry` (a `200`; any other status is answered whole).
pub fn select(request: &HeaderMap, entry: &Entry) -> Ranged {
    let mut lines = request.get_all(header::RANGE).iter();
    let (Some(range), None) = (lines.next(), lines.next()) else { return Ranged::Full };
    if entry.status != http::StatusCode::OK || !if_range_holds(request, entry) {
        return Ranged::Full;
    }
    let Some(spec) = range.to_str().ok().and_then(one_byte_range) else { return Ranged::Full };
    let len = entry.body.len() as u64;
    match spec {
        (Some(first), _) if first >= len => Ranged::Unsatisfiable,
        (Some(first), last) => Ranged::Part(first, last.unwrap_or(u64::MAX).min(len - 1)),
        (None, Some(suffix)) if suffix == 0 || len == 0 => Ranged::Unsatisfiable,
        (None, Some(suffix)) => Ranged::Part(len.saturating_sub(suffix), len - 1),
        (None, None) => Ranged::Full,
    }
}

/// `bytes=first-[last]` or `bytes=-suffix`, when that is the only range: `(first, last)` or
/// `(None, suffix)`. `None` for anything else (several ranges, another unit, bad syntax).
fn one_byte_range(value: &str) -> Option<(Option<u64>, Option<u64>)> {
    let (unit, set) = value.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    let (Some(spec), None) = (specs.next(), specs.next()) else { return None };
    let (first, last) = spec.split_once('-')?;
    match (digits(first), digits(last)) {
        (Some(first), Some(last)) if first <= last => Some((Some(first), Some(last))),
        (Some(first), None) if last.is_empty() => Some((Some(first), None)),
        (None, Some(suffix)) if first.is_empty() => Some((None, Some(suffix))),
        _ => None,
    }
}

/// Digits as a number, saturating: `None` unless `s` is digits only.
fn digits(s: &str) -> Option<u64> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().unwrap_or(u64::MAX))
}

/// `If-Range` (RFC 9110 13.1.5): absent, or the entry's strong `ETag` exactly, or its
/// `Last-Modified` date exactly.
fn if_range_holds(request: &HeaderMap, entry: &Entry) -> bool {
    let Some(condition) = request.get(header::IF_RANGE) else { return true };
    let Ok(condition) = condition.to_str().map(str::trim) else { return false };
    if condition.starts_with('"') || condition.starts_with("W/") {
        let etag = entry.headers.get(header::ETAG).and_then(|v| v.to_str().ok()).map(str::trim);
        return !condition.starts_with("W/") && etag.is_some_and(|etag| etag == condition);
    }
    let modified =
        entry.headers.get(header::LAST_MODIFIED).and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok());
    let date = httpdate::parse_http_date(condition).ok();
    modified.is_some() && modified == date
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use bytes::Bytes;
    use http::StatusCode;

    use super::*;
    use crate::cache::entry::Freshness;
    use crate::cache::fields;

    fn entry(body: &'static [u8], pairs: &[(&str, &str)]) -> Entry {
        let headers = fields(pairs);
        let freshness = Freshness {
            lifetime: Duration::from_secs(60),
            initial_age: Duration::ZERO,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            must_revalidate: false,
        };
        Entry { status: StatusCode::OK, headers, body: Bytes::from_static(body), stored_at: UNIX_EPOCH, freshness }
    }

    fn ask(e: &Entry, pairs: &[(&str, &str)]) -> Ranged {
        select(&fields(pairs), e)
    }

    #[test]
    fn single_ranges() {
        let e = entry(b"0123456789", &[]);
        let range = |v: &str| ask(&e, &[("range", v)]);
        assert_eq!(range("bytes=0-4"), Ranged::Part(0, 4));
        assert_eq!(range("bytes=5-"), Ranged::Part(5, 9));
        assert_eq!(range("bytes=-3"), Ranged::Part(7, 9));
        assert_eq!(range("bytes=-30"), Ranged::Part(0, 9), "a suffix longer than the body");
        assert_eq!(range("bytes=8-99999999999999999999999"), Ranged::Part(8, 9), "a huge last byte");
        assert_eq!(range("Bytes = 2-2"), Ranged::Part(2, 2));
        assert_eq!(range("bytes=10-"), Ranged::Unsatisfiable);
        assert_eq!(range("bytes=99999999999999999999999-"), Ranged::Unsatisfiable);
        assert_eq!(range("bytes=-0"), Ranged::Unsatisfiable);
        assert_eq!(ask(&e, &[]), Ranged::Full);
        for whole in ["bytes=0-1,3-4", "bytes=5-2", "items=0-1", "bytes=a-b", "bytes=-", "bytes=1-2-3", "0-4"] {
            assert_eq!(range(whole), Ranged::Full, "{whole}");
        }
        assert_eq!(ask(&e, &[("range", "bytes=0-1"), ("range", "bytes=2-3")]), Ranged::Full);
        assert_eq!(ask(&entry(b"", &[]), &[("range", "bytes=0-")]), Ranged::Unsatisfiable);
        assert_eq!(ask(&entry(b"", &[]), &[("range", "bytes=-5")]), Ranged::Unsatisfiable);
        let mut not_ok = entry(b"0123456789", &[]);
        not_ok.status = StatusCode::NOT_FOUND;
        assert_eq!(ask(&not_ok, &[("range", "bytes=0-1")]), Ranged::Full);
    }

    #[test]
    fn if_range_needs_an_exact_strong_validator() {
        let lm = "Sun, 06 Nov 1994 08:49:37 GMT";
        let e = entry(b"0123456789", &[("etag", "\"v1\""), ("last-modified", lm)]);
        let with = |cond: &str| ask(&e, &[("range", "bytes=0-1"), ("if-range", cond)]);
        assert_eq!(with("\"v1\""), Ranged::Part(0, 1));
        assert_eq!(with("\"v2\""), Ranged::Full);
        assert_eq!(with("W/\"v1\""), Ranged::Full, "weak tags never match");
        assert_eq!(with(lm), Ranged::Part(0, 1));
        assert_eq!(with("Sun, 06 Nov 1994 08:49:38 GMT"), Ranged::Full);
        assert_eq!(with("garbage"), Ranged::Full);
        let weak = entry(b"0123456789", &[("etag", "W/\"v1\"")]);
        assert_eq!(ask(&weak, &[("range", "bytes=0-1"), ("if-range", "W/\"v1\"")]), Ranged::Full);
    }
}
