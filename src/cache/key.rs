//! Cache keys (DESIGN.md 4): `{prefix}c:{route}:{generation}:{method-class}:{path}?{query}`,
//! plus a variant id for the request's authority and the route's `vary` request headers.
//!
//! The variant id is a SHA-256 of those values, not the values themselves: a route may key on
//! `Authorization`, which must not appear in Redis key names, and a non-cryptographic hash would
//! let a client craft a collision between two variants (cache poisoning). The path key and the
//! variant are separate so that one path's variants can be stored together and purged in one
//! operation; that is also why the authority is in the variant rather than in the key name (a
//! departure from DESIGN.md 4's key shape): a one-path purge then covers every host.
//!
//! Everything the backend answers differently for must be in the key, or a client can make the
//! cache store one answer for another's request. The authority is: `Host` (as forwarded, lower
//! case, default port dropped), the `X-Forwarded-Host`/`-Proto` sent upstream (set by the proxy,
//! or a trusted proxy's kept values), and the other forwarding claims only a trusted proxy may
//! send (`Forwarded`, `X-Forwarded-Port`, ...), since the key is made from the prepared request.

use std::fmt::Write as _;

use http::{header, HeaderMap, Uri};
use sha2::{Digest, Sha256};

use crate::config::{CacheConfig, QueryMode};
use crate::upstream::headers::{FORWARDING_CLAIMS, X_FORWARDED_HOST, X_FORWARDED_PROTO};

/// Path keys longer than this are hashed (request targets can be kilobytes long).
const MAX_PLAIN_TARGET: usize = 1024;

/// Where an entry lives: the key of its path, and its variant within that key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    /// Shared by every variant of one route, generation and request target.
    pub path_key: String,
    /// Identifies the authority and the `vary` header values.
    pub variant: String,
}

/// A query the key cannot represent faithfully: the request bypasses the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unrepresentable;

/// The key of a GET or HEAD request (HEAD is served from the GET entry: one method class), made
/// from the request as prepared for the upstream; `tls` says whether the client connection is.
pub fn cache_key(
    prefix: &str,
    route: &str,
    generation: u64,
    uri: &Uri,
    headers: &HeaderMap,
    tls: bool,
    cfg: &CacheConfig,
) -> Result<CacheKey, Unrepresentable> {
    Ok(CacheKey {
        path_key: path_key(prefix, route, generation, uri, &cfg.query)?,
        variant: variant(headers, tls, cfg),
    })
}

/// The path part of the key, also what a one-path purge deletes.
pub fn path_key(
    prefix: &str,
    route: &str,
    generation: u64,
    uri: &Uri,
    query: &QueryMode,
) -> Result<String, Unrepresentable> {
    let mut target = String::with_capacity(uri.path().len() + 32);
    target.push_str(uri.path());
    if let Some(q) = normalize_query(uri.query(), query)? {
        target.push('?');
        target.push_str(&q);
    }
    if target.len() > MAX_PLAIN_TARGET {
        target = format!("#{}", hex(&Sha256::digest(target.as_bytes())));
    }
    Ok(format!("{prefix}c:{route}:{generation}:g:{target}"))
}

/// The key holding a route's generation; a route purge increments it.
pub fn generation_key(prefix: &str, route: &str) -> String {
    format!("{prefix}g:{route}")
}

/// The query as it enters the key, or `None` for no query.
///
/// Parameter names are compared by their percent-decoded form, as backends read them:
/// `?%6cimit=1` is the `limit` parameter; sorting goes by the name [`fold`]ed as lenient backends
/// read it, so parameters they merge keep their order. In a list of kept names, a parameter whose
/// name does not decode, folds to a kept name without being it (`LIMIT`), or a `;` (which some
/// backends also split on), makes the query unrepresentable: dropping what the key cannot see
/// would store one answer for another's request.
fn normalize_query(query: Option<&str>, mode: &QueryMode) -> Result<Option<String>, Unrepresentable> {
    let Some(query) = query.filter(|q| !q.is_empty()) else { return Ok(None) };
    let params = query.split('&').filter(|p| !p.is_empty());
    let mut params: Vec<(String, &str)> = match mode {
        QueryMode::Keep => return Ok(Some(query.to_string())),
        QueryMode::Ignore => return Ok(None),
        QueryMode::Sorted => {
            params.map(|p| (fold(&decoded_name(p).unwrap_or_else(|| name(p).to_string())), p)).collect()
        }
        QueryMode::Only(names) => {
            let mut kept = Vec::new();
            for p in params {
                if p.contains(';') {
                    return Err(Unrepresentable);
                }
                let decoded = decoded_name(p).ok_or(Unrepresentable)?;
                if !names.contains(&decoded) && names.iter().any(|n| fold(n) == fold(&decoded)) {
                    // `LIMIT` or `li.mit`: one of the kept names to a backend that folds names.
                    return Err(Unrepresentable);
                }
                if names.contains(&decoded) {
                    // The decoded name stands for the parameter: `%6cimit=1` and `limit=1` are one.
                    let value = p.split_once('=').map(|(_, v)| v);
                    kept.push((decoded, value));
                }
            }
            kept.sort_by(|a, b| a.0.cmp(&b.0));
            let joined: Vec<String> = kept
                .into_iter()
                .map(|(n, v)| match v {
                    Some(v) => format!("{n}={v}"),
                    None => n,
                })
                .collect();
            return Ok((!joined.is_empty()).then(|| joined.join("&")));
        }
    };
    // A stable sort keeps the order of parameters a backend may read as one (`a=2&a=1`,
    // `a=2&%61=1`, `A=2&a=1`, `page.size=1&page_size=2`): a list, or the last one wins.
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let joined: Vec<&str> = params.into_iter().map(|(_, p)| p).collect();
    Ok((!joined.is_empty()).then(|| joined.join("&")))
}

fn name(param: &str) -> &str {
    param.split('=').next().unwrap_or("")
}

/// A parameter name as the most lenient backends read it: ASCII case folded (ASP.NET), and `.`,
/// space and `[` read as `_` (PHP).
fn fold(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '.' | ' ' | '[' => '_',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// A parameter's name, percent-decoded (and `+` as a space, as forms encode it); `None` when the
/// encoding is broken or decodes to something that is not UTF-8.
fn decoded_name(param: &str) -> Option<String> {
    let raw = name(param).as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'%' => {
                let hex = raw.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn variant(headers: &HeaderMap, tls: bool, cfg: &CacheConfig) -> String {
    let mut hash = Sha256::new();
    // The authority: every Host line, then the X-Forwarded-Host and -Proto lines the backend
    // receives (lower case, a host's default port dropped).
    let default_port = if tls { &b":443"[..] } else { &b":80"[..] };
    for name in [&header::HOST, &X_FORWARDED_HOST, &X_FORWARDED_PROTO] {
        for v in headers.get_all(name) {
            let v = v.as_bytes().to_ascii_lowercase();
            hash.update(v.strip_suffix(default_port).unwrap_or(&v));
            hash.update(b"\x00");
        }
        hash.update(b"\x02");
    }
    // What a trusted proxy in front said of the original request (removed from anyone else).
    for name in &FORWARDING_CLAIMS {
        for v in headers.get_all(name) {
            hash.update(v.as_bytes());
            hash.update(b"\x00");
        }
        hash.update(b"\x02");
    }
    for name in &cfg.vary {
        hash.update(name.as_str().as_bytes());
        let mut values = headers.get_all(name).iter().peekable();
        if values.peek().is_none() {
            // Absent is not the same as present and empty.
            hash.update(b"\x00absent\x00");
        }
        for v in values {
            hash.update(b"\x00");
            hash.update(v.as_bytes());
        }
        hash.update(b"\x01");
    }
    hex(&hash.finalize()[..16])
}

fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{HeaderName, HeaderValue, StatusCode};

    use super::*;

    fn cfg(query: QueryMode, vary: &[&'static str]) -> CacheConfig {
        CacheConfig {
            ttl: Some(Duration::from_secs(60)),
            vary: vary.iter().map(|v| HeaderName::from_static(v)).collect(),
            query,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            statuses: vec![StatusCode::OK],
            max_body: 1 << 20,
            respect_origin: true,
        }
    }

    fn key(uri: &str, query: QueryMode) -> String {
        path_key("sc:", "catalog", 3, &uri.parse().unwrap(), &query).unwrap()
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, val) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(val).unwrap());
        }
        h
    }

    #[test]
    fn query_modes() {
        assert_eq!(key("/m?b=2&a=1", QueryMode::Keep), "sc:c:catalog:3:g:/m?b=2&a=1");
        assert_eq!(key("/m?b=2&a=1", QueryMode::Sorted), "sc:c:catalog:3:g:/m?a=1&b=2");
        assert_eq!(key("/m?a=1&b=2", QueryMode::Sorted), key("/m?b=2&a=1", QueryMode::Sorted));
        assert_eq!(key("/m?a=2&a=1&&", QueryMode::Sorted), "sc:c:catalog:3:g:/m?a=2&a=1", "repeats keep order");
        assert_eq!(key("/m?b=2&a=1", QueryMode::Ignore), "sc:c:catalog:3:g:/m");
        let only = QueryMode::Only(vec!["limit".into(), "page".into()]);
        assert_eq!(key("/m?utm=x&page=2&limit=10", only.clone()), "sc:c:catalog:3:g:/m?limit=10&page=2");
        assert_eq!(key("/m?utm=x", only.clone()), "sc:c:catalog:3:g:/m");
        assert_eq!(key("/m?", QueryMode::Keep), "sc:c:catalog:3:g:/m");
        assert_ne!(key("/m?a=1", QueryMode::Sorted), key("/m?b=1", QueryMode::Sorted));
    }

    #[test]
    fn kept_parameters_cannot_be_cloaked() {
        let only = QueryMode::Only(vec!["limit".into()]);
        let path = |uri: &str| path_key("sc:", "r", 0, &uri.parse().unwrap(), &only);
        assert_eq!(path("/m?%6cimit=1000").unwrap(), "sc:c:r:0:g:/m?limit=1000", "names compare decoded");
        assert_eq!(path("/m?%6Cimit=1000"), path("/m?limit=1000"));
        assert_ne!(path("/m?%6cimit=1000"), path("/m"), "an encoded kept name is not dropped");
        assert_eq!(path("/m?utm=1;limit=999"), Err(Unrepresentable), "a ; the backend may split on");
        assert_eq!(path("/m?%zzimit=1"), Err(Unrepresentable), "a name that does not decode");
        assert_eq!(path("/m?%ff=1"), Err(Unrepresentable), "a name that is not UTF-8");
        assert_eq!(path("/m?limit=1&li%6dit=2").unwrap(), "sc:c:r:0:g:/m?limit=1&limit=2");
        assert_ne!(path("/m?limit=1&limit=2"), path("/m?limit=2&limit=1"), "a repeated kept name keeps its order");
        assert_eq!(path("/m?LIMIT=100000"), Err(Unrepresentable), "case-insensitive backends read it as limit");
        let page_size = QueryMode::Only(vec!["page_size".into()]);
        let php = path_key("sc:", "r", 0, &"/m?page.size=9".parse().unwrap(), &page_size);
        assert_eq!(php, Err(Unrepresentable), "PHP reads page.size as page_size");
        assert_eq!(path("/m?other=1").unwrap(), "sc:c:r:0:g:/m");
    }

    #[test]
    fn sorting_by_decoded_names_keeps_the_order_of_a_repeated_parameter() {
        assert_ne!(key("/m?a=2&%61=1", QueryMode::Sorted), key("/m?%61=1&a=2", QueryMode::Sorted));
        assert_eq!(key("/m?b=1&a=2&%61=3", QueryMode::Sorted), "sc:c:catalog:3:g:/m?a=2&%61=3&b=1");
        assert_eq!(key("/m?x=1;y=2", QueryMode::Sorted), "sc:c:catalog:3:g:/m?x=1;y=2", "kept whole, as sent");
        let php = |q: &str| key(&format!("/m?{q}"), QueryMode::Sorted);
        assert_ne!(php("page_size=10&page.size=9"), php("page.size=9&page_size=10"), "PHP merges them: order kept");
        assert_ne!(php("A=1&a=2"), php("a=2&A=1"), "a case-insensitive backend merges them");
        assert_eq!(php("b=1&A=2"), "sc:c:catalog:3:g:/m?A=2&b=1");
    }

    #[test]
    fn generations_and_routes_separate_keys() {
        let uri: Uri = "/m".parse().unwrap();
        let a = path_key("sc:", "catalog", 3, &uri, &QueryMode::Sorted).unwrap();
        assert_ne!(a, path_key("sc:", "catalog", 4, &uri, &QueryMode::Sorted).unwrap());
        assert_ne!(a, path_key("sc:", "other", 3, &uri, &QueryMode::Sorted).unwrap());
        assert_eq!(generation_key("sc:", "catalog"), "sc:g:catalog");
    }

    #[test]
    fn long_targets_are_hashed() {
        let long = format!("/m?q={}", "x".repeat(5000));
        let k = key(&long, QueryMode::Keep);
        assert!(k.len() < 100 && k.starts_with("sc:c:catalog:3:g:#"), "{k}");
        assert_ne!(k, key(&format!("/m?q={}", "y".repeat(5000)), QueryMode::Keep));
    }

    #[test]
    fn the_authority_is_part_of_the_variant() {
        let c = cfg(QueryMode::Sorted, &[]);
        let v = |pairs: &[(&str, &str)], tls: bool| variant(&map(pairs), tls, &c);
        let shop = v(&[("host", "shop.example")], false);
        assert_ne!(shop, v(&[("host", "evil.example")], false), "another host");
        assert_eq!(shop, v(&[("host", "Shop.Example:80")], false), "lower case, default port dropped");
        assert_ne!(shop, v(&[("host", "shop.example:8080")], false));
        assert_ne!(shop, v(&[("host", "shop.example:80")], true), "80 is not the default port of https");
        assert_eq!(v(&[("host", "shop.example")], true), v(&[("host", "shop.example:443")], true));
        assert_ne!(shop, v(&[("host", "shop.example"), ("host", "evil.example")], false), "two Host lines");
        assert_ne!(shop, v(&[("host", "shop.example"), ("x-forwarded-host", "evil.example")], false));
        assert_ne!(shop, v(&[("host", "shop.example"), ("x-forwarded-proto", "https")], false));
        assert_ne!(v(&[("host", "a"), ("x-forwarded-host", "b")], false), v(&[("host", "ab")], false));
        assert_ne!(shop, v(&[("host", "shop.example"), ("forwarded", "host=evil.example")], false));
        assert_ne!(shop, v(&[("host", "shop.example"), ("x-forwarded-prefix", "/x")], false));
    }

    #[test]
    fn variants_follow_the_vary_headers_and_hide_their_values() {
        let c = cfg(QueryMode::Sorted, &["accept-encoding", "authorization"]);
        let v = |pairs: &[(&str, &str)]| variant(&map(pairs), false, &c);
        let gzip = v(&[("accept-encoding", "gzip")]);
        assert_eq!(gzip, v(&[("accept-encoding", "gzip"), ("user-agent", "x")]), "other headers do not matter");
        assert_ne!(gzip, v(&[("accept-encoding", "br")]));
        assert_ne!(v(&[]), v(&[("accept-encoding", "")]), "absent differs from empty");
        let secret = v(&[("authorization", "Bearer hunter2")]);
        assert!(!secret.contains("hunter2") && secret.len() == 32);
        assert_ne!(secret, v(&[("authorization", "Bearer other")]));
    }
}
