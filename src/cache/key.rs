//! Cache keys (DESIGN.md 4): `{prefix}c:{route}:{generation}:{method-class}:{path}?{query}`,
//! plus a variant id for the route's `vary` request headers.
//!
//! The variant id is a SHA-256 of the `vary` values, not the values themselves: a route may key
//! on `Authorization`, which must not appear in Redis key names, and a non-cryptographic hash
//! would let a client craft a collision between two variants (cache poisoning). The path key and
//! the variant are separate so that one path's variants can be stored together and purged in one
//! operation.

use std::fmt::Write as _;

use http::{HeaderMap, Uri};
use sha2::{Digest, Sha256};

use crate::config::{CacheConfig, QueryMode};

/// Path keys longer than this are hashed (request targets can be kilobytes long).
const MAX_PLAIN_TARGET: usize = 1024;

/// Where an entry lives: the key of its path, and its variant within that key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    /// Shared by every variant of one route, generation and request target.
    pub path_key: String,
    /// Identifies the `vary` header values; `"-"` when the route varies on nothing.
    pub variant: String,
}

/// The key of a GET or HEAD request (HEAD is served from the GET entry: one method class).
pub fn cache_key(
    prefix: &str,
    route: &str,
    generation: u64,
    uri: &Uri,
    headers: &HeaderMap,
    cfg: &CacheConfig,
) -> CacheKey {
    CacheKey { path_key: path_key(prefix, route, generation, uri, &cfg.query), variant: variant(headers, cfg) }
}

/// The path part of the key, also what a one-path purge deletes.
pub fn path_key(prefix: &str, route: &str, generation: u64, uri: &Uri, query: &QueryMode) -> String {
    let mut target = String::with_capacity(uri.path().len() + 32);
    target.push_str(uri.path());
    if let Some(q) = normalize_query(uri.query(), query) {
        target.push('?');
        target.push_str(&q);
    }
    if target.len() > MAX_PLAIN_TARGET {
        target = format!("#{}", hex(&Sha256::digest(target.as_bytes())));
    }
    format!("{prefix}c:{route}:{generation}:g:{target}")
}

/// The key holding a route's generation; a route purge increments it.
pub fn generation_key(prefix: &str, route: &str) -> String {
    format!("{prefix}g:{route}")
}

/// The query as it enters the key, or `None` for no query.
fn normalize_query(query: Option<&str>, mode: &QueryMode) -> Option<String> {
    let query = query.filter(|q| !q.is_empty())?;
    let mut params: Vec<&str> = match mode {
        QueryMode::Keep => return Some(query.to_string()),
        QueryMode::Ignore => return None,
        QueryMode::Sorted => query.split('&').filter(|p| !p.is_empty()).collect(),
        QueryMode::Only(names) => {
            query.split('&').filter(|p| names.iter().any(|n| p.split('=').next() == Some(n.as_str()))).collect()
        }
    };
    // A stable sort keeps repeated parameters (`a=2&a=1`) in their order: they can mean a list.
    params.sort_by_key(|p| p.split('=').next().unwrap_or(""));
    (!params.is_empty()).then(|| params.join("&"))
}

fn variant(headers: &HeaderMap, cfg: &CacheConfig) -> String {
    if cfg.vary.is_empty() {
        return "-".to_string();
    }
    let mut hash = Sha256::new();
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
        path_key("sc:", "catalog", 3, &uri.parse().unwrap(), &query)
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
        assert_ne!(key("/m?a=1", QueryMode::Sorted), key("/n?a=1", QueryMode::Sorted));
    }

    #[test]
    fn generations_and_routes_separate_keys() {
        let uri: Uri = "/m".parse().unwrap();
        let a = path_key("sc:", "catalog", 3, &uri, &QueryMode::Sorted);
        assert_ne!(a, path_key("sc:", "catalog", 4, &uri, &QueryMode::Sorted));
        assert_ne!(a, path_key("sc:", "other", 3, &uri, &QueryMode::Sorted));
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
    fn variants_follow_the_vary_headers_and_hide_their_values() {
        let c = cfg(QueryMode::Sorted, &["accept-encoding", "authorization"]);
        let v = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (k, val) in pairs {
                h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(val).unwrap());
            }
            cache_key("sc:", "r", 0, &"/m".parse().unwrap(), &h, &c).variant
        };
        let gzip = v(&[("accept-encoding", "gzip")]);
        assert_eq!(gzip, v(&[("accept-encoding", "gzip"), ("user-agent", "x")]), "other headers do not matter");
        assert_ne!(gzip, v(&[("accept-encoding", "br")]));
        assert_ne!(v(&[]), v(&[("accept-encoding", "")]), "absent differs from empty");
        let secret = v(&[("authorization", "Bearer hunter2")]);
        assert!(!secret.contains("hunter2") && secret.len() == 32);
        assert_ne!(secret, v(&[("authorization", "Bearer other")]));
        let none = cfg(QueryMode::Sorted, &[]);
        assert_eq!(cache_key("sc:", "r", 0, &"/m".parse().unwrap(), &HeaderMap::new(), &none).variant, "-");
    }
}
