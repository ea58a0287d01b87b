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

use std::borrow::Cow;

use http::{header, HeaderMap, HeaderName, Uri};
use sha2::{Digest, Sha256};

use crate::config::{CacheConfig, QueryMode};
use crate::upstream::headers::{is_forwarding_claim, FORWARDING_CLAIMS, X_FORWARDED_HOST, X_FORWARDED_PROTO};
use crate::upstream::Hop;

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
    hop: &Hop<'_>,
    cfg: &CacheConfig,
) -> Result<CacheKey, Unrepresentable> {
    Ok(CacheKey {
        path_key: path_key(prefix, route, generation, uri, &cfg.query)?,
        variant: variant(headers, hop, cfg),
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
    let query = normalize_query(uri.query(), query)?;
    let mut key = String::with_capacity(
        prefix.len() + route.len() + 32 + uri.path().len() + query.as_ref().map_or(0, |q| q.len() + 1),
    );
    key.push_str(prefix);
    key.push_str("c:");
    key.push_str(route);
    key.push(':');
    key.push_str(itoa_u64(generation, &mut [0; 20]));
    key.push_str(":g:");
    let target = key.len();
    key.push_str(uri.path());
    if let Some(q) = query {
        key.push('?');
        key.push_str(&q);
    }
    if key.len() - target > MAX_PLAIN_TARGET {
        let digest = hex(&Sha256::digest(&key.as_bytes()[target..]));
        key.truncate(target);
        key.push('#');
        key.push_str(&digest);
    }
    Ok(key)
}

/// `n` in decimal, written into `buf`.
fn itoa_u64(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[at..]).expect("ASCII digits")
}

/// The prefix of every path key (what the hot tier's invalidation links track).
pub fn entry_prefix(prefix: &str) -> String {
    format!("{prefix}c:")
}

/// The key holding a route's generation; a route purge increments it.
pub fn generation_key(prefix: &str, route: &str) -> String {
    format!("{prefix}g:{route}")
}

/// The query as it enters the key, or `None` for no query.
///
/// Parameter names are compared by their percent-decoded form, as backends read them:
/// `?%6cimit=1` is the `limit` parameter. Sorting goes by the name's [`skeleton`], so parameters
/// a lenient backend reads as one keep their order. In a list of kept names, a parameter whose
/// name does not decode, or has a kept name's skeleton without being it (`LIMIT`, `limit[]`,
/// ` limit`), or a `;` (which some backends also split on), makes the query unrepresentable:
/// dropping what the key cannot see would store one answer for another's request.
fn normalize_query(query: Option<&str>, mode: &QueryMode) -> Result<Option<String>, Unrepresentable> {
    let Some(query) = query.filter(|q| !q.is_empty()) else { return Ok(None) };
    let params = query.split('&').filter(|p| !p.is_empty());
    let mut params: Vec<(String, &str)> = match mode {
        QueryMode::Keep => return Ok(Some(query.to_string())),
        QueryMode::Ignore => return Ok(None),
        QueryMode::Sorted => {
            params.map(|p| (skeleton(&decoded_name(p).unwrap_or_else(|| name(p).to_string())), p)).collect()
        }
        QueryMode::Only(names) => {
            let mut kept = Vec::new();
            for p in params {
                if p.contains(';') {
                    return Err(Unrepresentable);
                }
                let decoded = decoded_name(p).ok_or(Unrepresentable)?;
                if !names.contains(&decoded) && names.iter().any(|n| skeleton(n) == skeleton(&decoded)) {
                    // `LIMIT`, `limit[]`, ` limit`: one of the kept names to some backend.
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
    // `a=2&%61=1`, `A=2&a=1`, `page.size=1&page_size=2`, `a[]=1&a=2`): a list, or the last wins.
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let joined: Vec<&str> = params.into_iter().map(|(_, p)| p).collect();
    Ok((!joined.is_empty()).then(|| joined.join("&")))
}

fn name(param: &str) -> &str {
    param.split('=').next().unwrap_or("")
}

/// What is left of a (decoded) parameter name once the most lenient backends have read it: cut
/// at a NUL (PHP) or at the first `[` (arrays and maps in PHP, qs and Rack: `limit[]`,
/// `limit[0]`), case folded (ASP.NET), and only letters and digits kept (PHP reads `.` and
/// spaces as `_` and drops leading spaces). Two names with one skeleton may be one parameter.
fn skeleton(name: &str) -> String {
    let end = name.find(['[', '\0']).unwrap_or(name.len());
    name[..end].chars().filter(|c| c.is_alphanumeric()).flat_map(char::to_lowercase).collect()
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

fn variant(headers: &HeaderMap, hop: &Hop<'_>, cfg: &CacheConfig) -> String {
    let mut hash = Sha256::new();
    // The authority as the backend will receive it: the request is sanitized (`Hop::sanitize`:
    // Host set, hop-by-hop fields and untrusted forwarding claims gone) but a hit is never
    // annotated, so X-Forwarded-Host and -Proto are taken as `Hop::annotate` will set them: a
    // trusted proxy's, else made from Host and the connection. Hosts are compared in lower case
    // without the default port of the scheme the client used (a trusted proxy's
    // X-Forwarded-Proto, else this connection's); the scheme as sent.
    // `the_key_is_what_the_backend_receives` checks this against the preparation itself.
    let kept = |name: &HeaderName| hop.trusted && headers.contains_key(name);
    let https = match headers.get(&X_FORWARDED_PROTO).filter(|_| kept(&X_FORWARDED_PROTO)) {
        Some(proto) => proto.as_bytes().eq_ignore_ascii_case(b"https"),
        None => hop.tls,
    };
    let default_port = if https { &b":443"[..] } else { &b":80"[..] };
    let host = |hash: &mut Sha256, v: &[u8]| {
        // Allocates only for a value with upper case in it.
        let lower =
            if v.iter().any(u8::is_ascii_uppercase) { Cow::Owned(v.to_ascii_lowercase()) } else { Cow::Borrowed(v) };
        hash.update(lower.strip_suffix(default_port).unwrap_or(&lower));
        hash.update(b"\x00");
    };
    let exactly = |hash: &mut Sha256, name: &HeaderName| {
        for v in headers.get_all(name) {
            hash.update(v.as_bytes());
            hash.update(b"\x00");
        }
    };
    headers.get_all(header::HOST).iter().for_each(|v| host(&mut hash, v.as_bytes()));
    hash.update(b"\x02");
    if kept(&X_FORWARDED_HOST) {
        headers.get_all(&X_FORWARDED_HOST).iter().for_each(|v| host(&mut hash, v.as_bytes()));
    } else if let Some(v) = headers.get(header::HOST) {
        host(&mut hash, v.as_bytes());
    }
    hash.update(b"\x02");
    if kept(&X_FORWARDED_PROTO) {
        exactly(&mut hash, &X_FORWARDED_PROTO);
    } else {
        hash.update(if hop.tls { &b"https"[..] } else { &b"http"[..] });
        hash.update(b"\x00");
    }
    hash.update(b"\x02");
    // A trusted proxy's other claims about the original request (anyone else's are removed).
    if headers.keys().any(is_forwarding_claim) {
        for name in &FORWARDING_CLAIMS {
            exactly(&mut hash, name);
            hash.update(b"\x02");
        }
    }
    for name in &cfg.vary {
        hash.update(name.as_str().as_bytes());
        let mut values = headers.get_all(name).iter().peekable();
        if values.peek().is_none() {
            // Absent is not the same as present and empty, nor as any value: field values never
            // hold bytes below 0x09, so no line can forge this tag.
            hash.update(b"\x02");
        }
        for v in values {
            hash.update(b"\x00");
            hash.update(v.as_bytes());
        }
        hash.update(b"\x01");
    }
    // How the route keys the query, so that an entry stored under another setting (before a
    // configuration reload) is never served under this one. The vary names are in above.
    match &cfg.query {
        QueryMode::Keep => hash.update(b"\x03keep"),
        QueryMode::Sorted => hash.update(b"\x03sorted"),
        QueryMode::Ignore => hash.update(b"\x03ignore"),
        QueryMode::Only(names) => {
            hash.update(b"\x03only");
            for name in names {
                hash.update(b"\x00");
                hash.update(name.as_bytes());
            }
        }
    }
    hex(&hash.finalize()[..16])
}

/// Lower-case hex digits of `bytes`.
pub(super) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::{HeaderName, HeaderValue};

    use super::*;

    fn cfg(query: QueryMode, vary: &[&'static str]) -> CacheConfig {
        CacheConfig {
            ttl: Some(Duration::from_secs(60)),
            vary: vary.iter().map(|v| HeaderName::from_static(v)).collect(),
            query,
            ..CacheConfig::default()
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
        for cloak in ["limit[]=1", "limit%5B0%5D=1", "limit[x]=1", "+limit=1", "%20limit=1", "limit%00=1", "li_mit=1"] {
            assert_eq!(path(&format!("/m?{cloak}")), Err(Unrepresentable), "{cloak}: limit to some backend");
        }
        assert_eq!(path("/m?limitless=1&unlimited=2").unwrap(), "sc:c:r:0:g:/m", "other names are dropped");
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
        assert_ne!(php("limit[]=1&limit=2"), php("limit=2&limit[]=1"), "PHP, qs and Rack merge them");
        assert_ne!(php("+limit=1&limit=2"), php("limit=2&+limit=1"), "PHP drops the leading space");
    }

    #[test]
    fn generations_and_routes_separate_keys() {
        let uri: Uri = "/m".parse().unwrap();
        let a = path_key("sc:", "catalog", 3, &uri, &QueryMode::Sorted).unwrap();
        assert_ne!(a, path_key("sc:", "catalog", 4, &uri, &QueryMode::Sorted).unwrap());
        assert_ne!(a, path_key("sc:", "other", 3, &uri, &QueryMode::Sorted).unwrap());
        assert_eq!(generation_key("sc:", "catalog"), "sc:g:catalog");
        assert_eq!(
            path_key("sc:", "r", u64::MAX, &uri, &QueryMode::Sorted).unwrap(),
            format!("sc:c:r:{}:g:/m", u64::MAX)
        );
    }

    #[test]
    fn long_targets_are_hashed() {
        let long = format!("/m?q={}", "x".repeat(5000));
        let k = key(&long, QueryMode::Keep);
        assert!(k.len() < 100 && k.starts_with("sc:c:catalog:3:g:#"), "{k}");
        assert_ne!(k, key(&format!("/m?q={}", "y".repeat(5000)), QueryMode::Keep));
    }

    fn hop(tls: bool, trusted: bool) -> Hop<'static> {
        static PEER: HeaderValue = HeaderValue::from_static("192.0.2.7");
        Hop { peer: &PEER, tls, trusted }
    }

    fn request(uri: &str, pairs: &[(&str, &str)]) -> http::Request<()> {
        let mut req = http::Request::builder().uri(uri).body(()).unwrap();
        *req.headers_mut() = map(pairs);
        req
    }

    #[test]
    fn the_authority_is_part_of_the_variant() {
        let c = cfg(QueryMode::Sorted, &[]);
        let untrusted = |pairs: &[(&str, &str)], tls: bool| {
            let mut req = request("/m", pairs);
            hop(tls, false).sanitize(&mut req, false);
            variant(req.headers(), &hop(tls, false), &c)
        };
        let shop = untrusted(&[("host", "shop.example")], false);
        assert_ne!(shop, untrusted(&[("host", "evil.example")], false), "another host");
        assert_eq!(shop, untrusted(&[("host", "Shop.Example:80")], false), "lower case, default port dropped");
        assert_ne!(shop, untrusted(&[("host", "shop.example:8080")], false));
        assert_ne!(shop, untrusted(&[("host", "shop.example:80")], true), "80 is not the default port of https");
        assert_eq!(untrusted(&[("host", "shop.example")], true), untrusted(&[("host", "shop.example:443")], true));
        assert_ne!(shop, untrusted(&[("host", "shop.example"), ("host", "evil.example")], false), "two Host lines");
        assert_eq!(
            shop,
            untrusted(&[("host", "shop.example"), ("x-forwarded-host", "evil.example")], false),
            "replaced"
        );
        assert_eq!(shop, untrusted(&[("host", "shop.example"), ("forwarded", "host=evil.example")], false), "removed");
        let mut absolute = request("http://shop.example/m", &[]);
        hop(false, false).sanitize(&mut absolute, false);
        assert_eq!(shop, variant(absolute.headers(), &hop(false, false), &c), "no Host: the target's authority");

        let trusted = |pairs: &[(&str, &str)]| variant(&map(pairs), &hop(false, true), &c);
        let behind = trusted(&[("host", "internal"), ("x-forwarded-host", "shop.example")]);
        assert_ne!(behind, trusted(&[("host", "internal"), ("x-forwarded-host", "evil.example")]));
        assert_ne!(
            behind,
            trusted(&[("host", "internal"), ("x-forwarded-host", "shop.example"), ("x-forwarded-proto", "https")])
        );
        assert_ne!(
            behind,
            trusted(&[("host", "internal"), ("x-forwarded-host", "shop.example"), ("forwarded", "host=x")])
        );
        assert_ne!(
            behind,
            trusted(&[("host", "internal"), ("x-forwarded-host", "shop.example"), ("x-forwarded-prefix", "/x")])
        );
    }

    /// The key is made when the request is sanitized but not annotated (a hit never is): it must
    /// be what the backend receives after the whole preparation, whatever a client or a trusted
    /// proxy sends.
    #[test]
    fn the_key_is_what_the_backend_receives() {
        let c = cfg(QueryMode::Sorted, &["accept-language"]);
        let requests: &[(&str, &[(&str, &str)])] = &[
            ("/m", &[("host", "Shop.Example")]),
            ("/m", &[("host", "shop.example:80"), ("host", "other")]),
            ("/m", &[]),
            ("http://shop.example:80/m", &[]),
            ("http://evil.example/m", &[("host", "shop.example")]),
            ("/m", &[("host", "shop.example"), ("x-forwarded-host", "Evil.Example"), ("x-forwarded-proto", "https")]),
            ("/m", &[("host", "shop.example"), ("x-forwarded-proto", "HTTP")]),
            (
                "/m",
                &[
                    ("host", "shop.example"),
                    ("forwarded", "host=evil"),
                    ("x-forwarded-port", "1"),
                    ("x-real-ip", "1.2.3.4"),
                ],
            ),
            ("/m", &[("host", "shop.example"), ("connection", "x-forwarded-host"), ("x-forwarded-host", "evil")]),
            ("/m", &[("host", "shop.example"), ("connection", "host, accept-language"), ("accept-language", "de")]),
            ("/m", &[("host", "shop.example"), ("accept-language", "de"), ("x-forwarded-for", "6.6.6.6")]),
        ];
        for (uri, pairs) in requests {
            for (tls, trusted) in [(false, false), (true, false), (false, true), (true, true)] {
                let hop = hop(tls, trusted);
                let mut req = request(uri, pairs);
                hop.sanitize(&mut req, false);
                let keyed = variant(req.headers(), &hop, &c);
                hop.annotate(&mut req);
                let received = variant(req.headers(), &hop, &c);
                assert_eq!(keyed, received, "{uri} {pairs:?} tls={tls} trusted={trusted}");
                let mut whole = request(uri, pairs);
                hop.prepare(&mut whole, false);
                assert_eq!(whole.headers(), req.headers(), "prepare is sanitize then annotate");
            }
        }
    }

    /// Two requests share a key only if the backend receives the same authority for them.
    #[test]
    fn one_key_means_one_authority_for_the_backend() {
        let c = cfg(QueryMode::Sorted, &[]);
        let seen = |hop: &Hop<'_>, pairs: &[(&str, &str)]| {
            let mut req = request("/m", pairs);
            hop.sanitize(&mut req, false);
            let keyed = variant(req.headers(), hop, &c);
            hop.annotate(&mut req);
            let h = req.headers();
            (keyed, (h.get("x-forwarded-host").cloned(), h["x-forwarded-proto"].clone()))
        };
        let trusted = hop(false, true);
        for (a, b) in [
            (
                &[("host", "internal"), ("x-forwarded-host", "shop.example:80"), ("x-forwarded-proto", "https")][..],
                &[("host", "internal"), ("x-forwarded-host", "shop.example"), ("x-forwarded-proto", "https")][..],
            ),
            (
                &[("host", "shop.example:80"), ("x-forwarded-proto", "https")],
                &[("host", "shop.example"), ("x-forwarded-proto", "https")],
            ),
            (
                &[("host", "internal"), ("x-forwarded-host", "shop.example"), ("x-forwarded-proto", "HTTPS")],
                &[("host", "internal"), ("x-forwarded-host", "shop.example"), ("x-forwarded-proto", "https")],
            ),
            (
                &[("host", "internal"), ("x-forwarded-host", "shop.example:443"), ("x-forwarded-proto", "http")],
                &[("host", "internal"), ("x-forwarded-host", "shop.example"), ("x-forwarded-proto", "http")],
            ),
        ] {
            let ((ka, ra), (kb, rb)) = (seen(&trusted, a), seen(&trusted, b));
            assert_ne!(ra, rb);
            assert_ne!(ka, kb, "the backend is told different things: {a:?} / {b:?}");
        }
        let https = |pairs: &[(&str, &str)]| seen(&trusted, pairs).0;
        assert_eq!(
            https(&[("host", "shop.example:443"), ("x-forwarded-proto", "https")]),
            https(&[("host", "shop.example"), ("x-forwarded-proto", "https")]),
            "443 is the default port of the scheme the client used"
        );
    }

    #[test]
    fn variants_follow_the_vary_headers_and_hide_their_values() {
        let c = cfg(QueryMode::Sorted, &["accept-encoding", "authorization"]);
        let v = |pairs: &[(&str, &str)]| variant(&map(pairs), &hop(false, false), &c);
        let gzip = v(&[("accept-encoding", "gzip")]);
        assert_eq!(gzip, v(&[("accept-encoding", "gzip"), ("user-agent", "x")]), "other headers do not matter");
        assert_ne!(gzip, v(&[("accept-encoding", "br")]));
        assert_ne!(v(&[]), v(&[("accept-encoding", "")]), "absent differs from empty");
        let secret = v(&[("authorization", "Bearer hunter2")]);
        assert!(!secret.contains("hunter2") && secret.len() == 32);
        assert_ne!(secret, v(&[("authorization", "Bearer other")]));
    }

    #[test]
    fn a_route_keyed_another_way_shares_no_entry() {
        // What a configuration reload can change: an entry stored for `/m?x=1` while the query
        // was ignored must not answer `/m` once it is kept, nor one keyed without a vary header.
        let v = |query: QueryMode, vary: &[&'static str]| variant(&map(&[]), &hop(false, false), &cfg(query, vary));
        let only = |names: &[&str]| QueryMode::Only(names.iter().map(|n| n.to_string()).collect());
        let all = [
            v(QueryMode::Keep, &[]),
            v(QueryMode::Sorted, &[]),
            v(QueryMode::Ignore, &[]),
            v(only(&["page"]), &[]),
            v(only(&["page", "size"]), &[]),
            v(QueryMode::Keep, &["accept"]),
        ];
        for (i, a) in all.iter().enumerate() {
            assert!(all[i + 1..].iter().all(|b| a != b), "{i}");
        }
    }
}
