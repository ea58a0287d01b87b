//! Caching directives as the RFCs say to read them: a response's from the first valid targeted
//! field (RFC 9213) or else `Cache-Control` (RFC 9111 5.2.2, RFC 5861), and a request's
//! (RFC 9111 5.2.1) for routes that let clients use them.

use http::header::{self, HeaderMap, HeaderName};

use super::delta_seconds;

/// The response directives a shared cache acts on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ResponseDirectives {
    /// `no-store`.
    pub no_store: bool,
    /// `private` (with or without field names: the safe reading for a shared cache).
    pub private: bool,
    /// `no-cache` (with or without field names: likewise).
    pub no_cache: bool,
    /// `must-revalidate` or `proxy-revalidate`.
    pub must_revalidate: bool,
    /// `public`.
    pub public: bool,
    /// `max-age`; `Some(0)` when its occurrences disagree or its value is invalid (RFC 9111
    /// 4.2.1: such a response is considered stale).
    pub max_age: Option<u64>,
    /// `s-maxage`, read like `max_age`.
    pub s_maxage: Option<u64>,
    /// `stale-while-revalidate` (RFC 5861 3); the shortest when repeated.
    pub stale_while_revalidate: Option<u64>,
    /// `stale-if-error` (RFC 5861 4); the shortest when repeated.
    pub stale_if_error: Option<u64>,
}

impl ResponseDirectives {
    /// The directives this cache follows: those of the first of `targeted` that the response
    /// carries as a valid Structured Fields dictionary (RFC 9213 2.1: an invalid one is ignored,
    /// and the next is tried), else those of `Cache-Control`.
    pub fn of(headers: &HeaderMap, targeted: &[HeaderName]) -> ResponseDirectives {
        targeted.iter().find_map(|name| Self::targeted(headers, name)).unwrap_or_else(|| Self::cache_control(headers))
    }

    /// `Cache-Control`, every line. A line that cannot be read (not ASCII) could say `private`
    /// or `no-store`: it is read as `no-store`.
    fn cache_control(headers: &HeaderMap) -> ResponseDirectives {
        let mut d = ResponseDirectives::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(value) = value.to_str() else {
                d.no_store = true;
                continue;
            };
            for (name, arg) in split(value) {
                let seconds = || arg.and_then(delta_seconds);
                match name.to_ascii_lowercase().as_str() {
                    "no-store" => d.no_store = true,
                    "private" => d.private = true,
                    "no-cache" => d.no_cache = true,
                    "must-revalidate" | "proxy-revalidate" => d.must_revalidate = true,
                    "public" => d.public = true,
                    "max-age" => d.max_age = once(d.max_age, seconds()),
                    "s-maxage" => d.s_maxage = once(d.s_maxage, seconds()),
                    "stale-while-revalidate" => {
                        d.stale_while_revalidate = shortest(d.stale_while_revalidate, seconds())
                    }
                    "stale-if-error" => d.stale_if_error = shortest(d.stale_if_error, seconds()),
                    _ => {}
                }
            }
        }
        d
    }

    /// A targeted field (RFC 9213), when present and a valid dictionary. Lines are combined
    /// as RFC 9651 4.2 says; a directive whose value has the wrong type is ignored (2.1).
    fn targeted(headers: &HeaderMap, name: &HeaderName) -> Option<ResponseDirectives> {
        let mut lines = headers.get_all(name).iter().peekable();
        lines.peek()?;
        let mut dict = sfv::Dictionary::new();
        for line in lines {
            dict = sfv::Parser::new(line.as_bytes()).parse_dictionary_with_visitor(dict).ok()?;
        }
        let mut d = ResponseDirectives::default();
        for (key, member) in &dict {
            let sfv::ListEntry::Item(item) = member else { continue };
            let flag = item.bare_item.as_boolean() == Some(true);
            let seconds = item
                .bare_item
                .as_integer()
                .and_then(|i| u64::try_from(i64::from(i)).ok())
                .map(|s| s.min(super::MAX_DELTA_SECONDS));
            match key.as_str() {
                "no-store" => d.no_store |= flag,
                "private" => d.private |= flag,
                "no-cache" => d.no_cache |= flag,
                "must-revalidate" | "proxy-revalidate" => d.must_revalidate |= flag,
                "public" => d.public |= flag,
                "max-age" => d.max_age = seconds.or(d.max_age),
                "s-maxage" => d.s_maxage = seconds.or(d.s_maxage),
                "stale-while-revalidate" => d.stale_while_revalidate = seconds.or(d.stale_while_revalidate),
                "stale-if-error" => d.stale_if_error = seconds.or(d.stale_if_error),
                _ => {}
            }
        }
        Some(d)
    }
}

/// The request directives a route may let clients use (RFC 9111 5.2.1).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RequestDirectives {
    /// `no-cache`, or `Pragma: no-cache` without `Cache-Control` (5.4): validate first.
    pub no_cache: bool,
    /// `no-store`: store nothing of this exchange.
    pub no_store: bool,
    /// `max-age`: no older response.
    pub max_age: Option<u64>,
    /// `min-fresh`: fresh for at least this much longer.
    pub min_fresh: Option<u64>,
    /// `max-stale`: a stale response is acceptable, `Some(None)` however stale.
    pub max_stale: Option<Option<u64>>,
    /// `only-if-cached`: never forward; 504 when nothing stored will do.
    pub only_if_cached: bool,
}

impl RequestDirectives {
    /// The request's directives; an invalid argument makes its directive the strictest reading
    /// (`max-age=x` is `max-age=0`, an invalid `max-stale` allows no staleness).
    pub fn of(headers: &HeaderMap) -> RequestDirectives {
        let mut d = RequestDirectives::default();
        let mut any = false;
        for value in headers.get_all(header::CACHE_CONTROL) {
            any = true;
            let Ok(value) = value.to_str() else { continue };
            for (name, arg) in split(value) {
                let seconds = || arg.and_then(delta_seconds);
                match name.to_ascii_lowercase().as_str() {
                    "no-cache" => d.no_cache = true,
                    "no-store" => d.no_store = true,
                    "max-age" => d.max_age = shortest(d.max_age, seconds().or(Some(0))),
                    "min-fresh" => d.min_fresh = Some(seconds().unwrap_or(u64::MAX).max(d.min_fresh.unwrap_or(0))),
                    "max-stale" => {
                        d.max_stale = match arg {
                            None => Some(None),
                            Some(_) => Some(Some(seconds().unwrap_or(0))),
                        }
                    }
                    "only-if-cached" => d.only_if_cached = true,
                    _ => {}
                }
            }
        }
        if !any {
            let pragma = headers.get_all(header::PRAGMA).iter().filter_map(|v| v.to_str().ok());
            d.no_cache = pragma.flat_map(split).any(|(name, _)| name.eq_ignore_ascii_case("no-cache"));
        }
        d
    }
}

/// `name[=arg]` directives of one line; a quoted argument loses its quotes.
fn split(value: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    value.split(',').filter(|d| !d.trim().is_empty()).map(|directive| match directive.split_once('=') {
        Some((n, a)) => (n.trim(), Some(a.trim().trim_matches('"'))),
        None => (directive.trim(), None),
    })
}

/// A directive that should appear once: its value, or `Some(0)` (stale) when it is invalid
/// or a repetition disagrees (RFC 9111 4.2.1).
fn once(seen: Option<u64>, value: Option<u64>) -> Option<u64> {
    match (seen, value) {
        (None, v) => Some(v.unwrap_or(0)),
        (Some(a), Some(b)) if a == b => Some(a),
        _ => Some(0),
    }
}

fn shortest(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::fields;

    fn targeted() -> Vec<HeaderName> {
        vec![HeaderName::from_static("sidecache-cache-control"), HeaderName::from_static("cdn-cache-control")]
    }

    #[test]
    fn repeated_and_conflicting_directives() {
        let of = |pairs: &[(&str, &str)]| ResponseDirectives::of(&fields(pairs), &[]);
        assert_eq!(of(&[("cache-control", "max-age=60, max-age=60")]).max_age, Some(60), "a repetition agrees");
        assert_eq!(of(&[("cache-control", "max-age=60"), ("cache-control", "max-age=30")]).max_age, Some(0));
        assert_eq!(of(&[("cache-control", "max-age=abc")]).max_age, Some(0), "invalid: stale");
        assert_eq!(of(&[("cache-control", "max-age=-1")]).max_age, Some(0));
        assert_eq!(of(&[("cache-control", "max-age=\"30\"")]).max_age, Some(30), "quoted");
        assert_eq!(of(&[("cache-control", "s-maxage=5, S-MAXAGE=5")]).s_maxage, Some(5));
        let d = of(&[("cache-control", "stale-while-revalidate=30, stale-if-error=60, stale-if-error=10")]);
        assert_eq!((d.stale_while_revalidate, d.stale_if_error), (Some(30), Some(10)));
        assert!(of(&[("cache-control", "Proxy-Revalidate")]).must_revalidate);
        assert!(of(&[("cache-control", "public,,no-cache")]).no_cache);
    }

    #[test]
    fn the_first_valid_targeted_field_replaces_cache_control() {
        let t = targeted();
        let of = |pairs: &[(&str, &str)]| ResponseDirectives::of(&fields(pairs), &t);
        let d = of(&[("cache-control", "no-store"), ("cdn-cache-control", "max-age=600")]);
        assert_eq!((d.no_store, d.max_age), (false, Some(600)));
        let d = of(&[("sidecache-cache-control", "max-age=5"), ("cdn-cache-control", "max-age=600")]);
        assert_eq!(d.max_age, Some(5), "the first listed wins");
        let d = of(&[("sidecache-cache-control", "max-age=5,,"), ("cdn-cache-control", "no-store")]);
        assert!(d.no_store, "an invalid dictionary is ignored; the next field is used");
        let d = of(&[("cdn-cache-control", "MAX-AGE=5"), ("cache-control", "max-age=9")]);
        assert_eq!(d.max_age, Some(9), "invalid (upper case key): Cache-Control");
        let d = of(&[("cdn-cache-control", "max-age=\"60\", private"), ("cache-control", "max-age=9")]);
        assert_eq!((d.max_age, d.private), (None, true), "a directive with the wrong type is ignored");
        let d = of(&[("cdn-cache-control", "no-store=?0, max-age=-5, s-maxage=3.5")]);
        assert_eq!((d.no_store, d.max_age, d.s_maxage), (false, None, None));
        let d = of(&[("cdn-cache-control", "max-age=60"), ("cdn-cache-control", "stale-if-error=30")]);
        assert_eq!((d.max_age, d.stale_if_error), (Some(60), Some(30)), "lines combine");
        let d = of(&[("cdn-cache-control", "max-age=99999999999")]);
        assert_eq!(d.max_age, Some(super::super::MAX_DELTA_SECONDS));
    }

    #[test]
    fn request_directives() {
        let of = |pairs: &[(&str, &str)]| RequestDirectives::of(&fields(pairs));
        assert_eq!(of(&[]), RequestDirectives::default());
        assert!(of(&[("pragma", "no-cache")]).no_cache);
        assert!(!of(&[("pragma", "no-cache"), ("cache-control", "max-age=5")]).no_cache, "Cache-Control wins");
        let d = of(&[("cache-control", "max-age=10, min-fresh=5, max-stale, only-if-cached, no-store")]);
        assert_eq!(
            d,
            RequestDirectives {
                no_cache: false,
                no_store: true,
                max_age: Some(10),
                min_fresh: Some(5),
                max_stale: Some(None),
                only_if_cached: true,
            }
        );
        assert_eq!(of(&[("cache-control", "max-stale=7")]).max_stale, Some(Some(7)));
        assert_eq!(of(&[("cache-control", "max-stale=x")]).max_stale, Some(Some(0)));
        assert_eq!(of(&[("cache-control", "max-age=x")]).max_age, Some(0));
        assert_eq!(of(&[("cache-control", "min-fresh=x")]).min_fresh, Some(u64::MAX));
    }
}
