//! Header rules of a forwarding proxy: hop-by-hop removal (RFC 9110 7.6.1), `Via` (7.6.3) and the
//! de-facto `X-Forwarded-*` headers.

use std::net::IpAddr;

use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Fields in which a proxy in front describes the original request: RFC 7239 `Forwarded` and the
/// de-facto fields web frameworks build absolute URLs and routes from. Only a trusted proxy may
/// send them; from anyone else they are removed, or a client could make the backend answer for a
/// host, port, scheme or path of its choosing, and the cache would store that answer for
/// everyone. From a trusted proxy they are kept, and the cache keys on them.
pub static FORWARDING_CLAIMS: [HeaderName; 17] = [
    header::FORWARDED,
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-ssl"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-forwarded-uri"),
    HeaderName::from_static("x-forwarded-path"),
    HeaderName::from_static("x-forwarded-protocol"),
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-original-host"),
    HeaderName::from_static("x-host"),
    HeaderName::from_static("x-url-scheme"),
    HeaderName::from_static("front-end-https"),
    HeaderName::from_static("x-scheme"),
    HeaderName::from_static("x-proxied-https"),
];

/// `X-Real-IP`: the client address as a proxy in front saw it; removed from untrusted peers like
/// the forwarding claims, but not keyed (it differs per client, like `X-Forwarded-For`).
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Fields that describe one connection, never forwarded (RFC 9110 7.6.1, plus the legacy
/// `Proxy-Connection` and `Keep-Alive` that old clients still send).
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// The index of a field in [`HOP_BY_HOP`]: one match on the (lower-case) name, where comparing
/// with each of the eight cost more than the rest of the pass.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "proxy-connection" => Some(1),
        "keep-alive" => Some(2),
        "te" => Some(3),
        "trailer" => Some(4),
        "transfer-encoding" => Some(5),
        "upgrade" => Some(6),
        "proxy-authorization" => Some(7),
        _ => None,
    }
}

/// Remove hop-by-hop fields, including every field the `Connection` header names.
///
/// On the hot path for every request and response: one pass over the names finds which
/// hop-by-hop fields are present, and only those are removed (a removal hashes the name).
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = 0u32;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Fields named in Connection are hop-by-hop too. The usual tokens name no field to remove.
    if present & 1 != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !["keep-alive", "close", "upgrade", ""].iter().any(|c| t.eq_ignore_ascii_case(c)))
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        // Host is never hop-by-hop: `Connection: host` must not leave the backend to pick one
        // (hyper's client would fill in the upstream's own address).
        for name in named.iter().filter(|n| **n != header::HOST) {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Whether the request asks for a protocol switch (WebSocket and other HTTP/1.1 upgrades).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && is_connection_option(headers, "upgrade")
}

/// Whether a `Connection` field lists `option` (a field so named then goes no further than this
/// hop).
pub fn is_connection_option(headers: &HeaderMap, option: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(option))
}

/// Whether every protocol an `Upgrade` field offers (`websocket`, `h2c, websocket`; a `/version`
/// suffix ignored) is one of `allowed` (lower case).
pub fn upgrade_allowed(headers: &HeaderMap, allowed: &[String]) -> bool {
    let mut offered = headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or(",").split(','))
        .map(|p| p.trim().split('/').next().unwrap_or(""))
        .peekable();
    offered.peek().is_some() && offered.all(|p| allowed.iter().any(|a| a.eq_ignore_ascii_case(p)))
}

/// Whether the peer is one of the proxies whose forwarding headers are believed.
pub fn is_trusted(peer: IpAddr, trusted: &[IpNet]) -> bool {
    let peer = canonical(peer);
    trusted.iter().any(|net| net.contains(&peer))
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, as dual-stack listeners report) as IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The client address as a header value, made once per connection so that a request without
/// an earlier `X-Forwarded-For` costs no allocation.
pub fn peer_value(peer: IpAddr) -> HeaderValue {
    HeaderValue::from_str(&canonical(peer).to_string()).expect("an IP address is a valid header value")
}

/// Whether a field is one of the [`FORWARDING_CLAIMS`] or `X-Real-IP`. On every request: all of
/// them start with `x` or `f`, so for most fields one byte decides.
pub fn is_forwarding_claim(name: &HeaderName) -> bool {
    matches!(name.as_str().as_bytes().first(), Some(b'x' | b'f'))
        && (FORWARDING_CLAIMS.contains(name) || name == X_REAL_IP)
}

/// Whether a field is a forwarding field spelled with `_` for `-` (`X_Forwarded_Host`): CGI and
/// WSGI servers read it as the real one, and no proxy sends it.
fn is_underscore_alias(name: &HeaderName) -> bool {
    let name = name.as_str();
    name.starts_with('x') && name.contains('_') && {
        let dashed = name.replace('_', "-");
        FORWARDING_CLAIMS
            .iter()
            .chain([&X_REAL_IP, &X_FORWARDED_FOR, &X_FORWARDED_HOST, &X_FORWARDED_PROTO])
            .any(|claim| claim.as_str() == dashed)
    }
}

/// Remove the [`FORWARDING_CLAIMS`] and `X-Real-IP` of a peer that is not trusted, and the
/// `_` spellings of forwarding fields from anyone.
pub fn remove_forwarding_claims(headers: &mut HeaderMap, trusted: bool) {
    if !trusted && headers.keys().any(is_forwarding_claim) {
        for name in FORWARDING_CLAIMS.iter().chain([&X_REAL_IP]) {
            headers.remove(name);
        }
    }
    let aliases: Vec<HeaderName> = headers.keys().filter(|n| is_underscore_alias(n)).cloned().collect();
    for name in &aliases {
        headers.remove(name);
    }
}

/// Set the forwarding headers on a request going upstream. `X-Forwarded-For` gets the peer
/// appended to what came before; `-Proto` and `-Host` describe this hop unless a trusted proxy
/// already described the original one.
pub fn set_forwarded(headers: &mut HeaderMap, peer: &HeaderValue, tls: bool, trusted_peer: bool) {
    // One lookup per field (an entry), as this runs for every forwarded request.
    match headers.entry(&X_FORWARDED_FOR) {
        Entry::Vacant(e) => {
            e.insert(peer.clone());
        }
        Entry::Occupied(mut e) => {
            // All earlier hops go into one field line: many backends read only the first line.
            let prior: Vec<&str> =
                e.iter().filter_map(|v| v.to_str().ok()).map(str::trim).filter(|v| !v.is_empty()).collect();
            let xff = match prior.is_empty() {
                true => peer.clone(),
                false => {
                    let joined = format!("{}, {}", prior.join(", "), peer.to_str().unwrap_or_default());
                    HeaderValue::from_str(&joined).unwrap_or_else(|_| peer.clone())
                }
            };
            e.insert(xff);
        }
    }
    let proto = HeaderValue::from_static(if tls { "https" } else { "http" });
    if trusted_peer {
        headers.entry(&X_FORWARDED_PROTO).or_insert(proto);
    } else {
        headers.insert(&X_FORWARDED_PROTO, proto);
    }
    let host = headers.get(header::HOST).cloned();
    match (headers.entry(&X_FORWARDED_HOST), host) {
        (Entry::Occupied(_), _) if trusted_peer => {}
        (Entry::Occupied(mut e), Some(host)) => {
            e.insert(host);
        }
        (Entry::Occupied(e), None) => {
            e.remove_entry_mult();
        }
        (Entry::Vacant(e), Some(host)) => {
            e.insert(host);
        }
        (Entry::Vacant(_), None) => {}
    }
}

/// Append this proxy to `Via` (RFC 9110 7.6.3) with the protocol version it received.
pub fn append_via(headers: &mut HeaderMap, version: http::Version) {
    let via = match version {
        http::Version::HTTP_2 => "2 sidecache",
        http::Version::HTTP_10 => "1.0 sidecache",
        _ => "1.1 sidecache",
    };
    headers.append(header::VIA, HeaderValue::from_static(via));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named_fields_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret-Hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic x"),
            ("accept", "*/*"),
            ("x-end-to-end", "kept"),
        ]);
        remove_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept", "x-end-to-end"]);

        let mut untouched = map(&[("accept", "*/*"), ("content-length", "3")]);
        remove_hop_by_hop(&mut untouched);
        assert_eq!(untouched.len(), 2);
    }

    #[test]
    fn every_forwarding_claim_is_recognised() {
        for claim in FORWARDING_CLAIMS.iter().chain([&X_REAL_IP]) {
            assert!(is_forwarding_claim(claim), "{claim}");
        }
        for other in ["host", "accept", "x-request-id", "from", "x-forwarded-for", "x-forwarded-host"] {
            assert!(!is_forwarding_claim(&HeaderName::from_static(other)), "{other}");
        }
        for alias in ["x_forwarded_host", "x_forwarded_for", "x_real_ip", "x-forwarded_proto"] {
            assert!(is_underscore_alias(&HeaderName::from_static(alias)), "{alias}");
        }
        assert!(!is_underscore_alias(&HeaderName::from_static("x_request_id")));
        let mut trusted = map(&[("x_forwarded_host", "evil"), ("x-forwarded-host", "shop")]);
        remove_forwarding_claims(&mut trusted, true);
        assert_eq!(trusted.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-forwarded-host"], "from anyone");
    }

    #[test]
    fn upgrade_detection() {
        assert!(is_upgrade(&map(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")])));
        assert!(!is_upgrade(&map(&[("connection", "upgrade")])));
        assert!(!is_upgrade(&map(&[("upgrade", "websocket")])));
    }

    #[test]
    fn forwarded_headers_from_an_untrusted_peer() {
        let mut h = map(&[
            ("host", "shop.example"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "host=evil.example;proto=https"),
            ("x-forwarded-port", "6666"),
            ("x-forwarded-prefix", "//evil.example"),
            ("x-original-url", "/admin"),
            ("x-real-ip", "6.6.6.6"),
        ]);
        remove_forwarding_claims(&mut h, false);
        set_forwarded(&mut h, &peer_value("192.0.2.7".parse().unwrap()), false, false);
        for claim in FORWARDING_CLAIMS.iter().chain([&X_REAL_IP]) {
            assert!(!h.contains_key(claim), "{claim} from an untrusted peer");
        }
        assert_eq!(h["x-forwarded-for"], "6.6.6.6, 192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example");
    }

    #[test]
    fn forwarded_headers_from_a_trusted_peer_are_kept_and_lines_joined() {
        let mut h = map(&[
            ("host", "internal:8080"),
            ("x-forwarded-for", "203.0.113.1"),
            ("x-forwarded-for", "10.0.0.2"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "shop.example"),
            ("forwarded", "for=203.0.113.1;host=shop.example;proto=https"),
            ("x-forwarded-port", "443"),
        ]);
        set_forwarded(&mut h, &peer_value("::ffff:10.0.0.3".parse().unwrap()), false, true);
        assert_eq!(h["forwarded"], "for=203.0.113.1;host=shop.example;proto=https");
        assert_eq!(h["x-forwarded-port"], "443");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "203.0.113.1, 10.0.0.2, 10.0.0.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "shop.example");
    }

    #[test]
    fn without_a_host_no_forwarded_host_is_claimed() {
        let peer = peer_value("192.0.2.7".parse().unwrap());
        let mut h = map(&[("x-forwarded-host", "evil.example")]);
        set_forwarded(&mut h, &peer, true, false);
        assert!(!h.contains_key("x-forwarded-host"), "an untrusted peer's claim is not kept");
        assert_eq!(h["x-forwarded-proto"], "https");
        let mut h = map(&[]);
        set_forwarded(&mut h, &peer, false, true);
        assert!(!h.contains_key("x-forwarded-host"));
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        let mut h = map(&[("x-forwarded-host", "shop.example"), ("host", "internal")]);
        set_forwarded(&mut h, &peer, false, true);
        assert_eq!(h["x-forwarded-host"], "shop.example", "a trusted proxy's description is kept");
    }

    #[test]
    fn an_untrusted_peers_forwarding_lines_are_joined_and_its_claims_replaced() {
        let mut h = map(&[
            ("host", "shop.example"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-for", "1.1.1.1"),
            ("x-forwarded-host", "evil.example"),
            ("x-forwarded-proto", "https"),
        ]);
        set_forwarded(&mut h, &peer_value("192.0.2.7".parse().unwrap()), false, false);
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 1.1.1.1, 192.0.2.7");
        assert_eq!(h["x-forwarded-host"], "shop.example");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn trust_matches_networks_and_mapped_addresses() {
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(is_trusted("10.1.2.3".parse().unwrap(), &nets));
        assert!(is_trusted("::ffff:10.1.2.3".parse().unwrap(), &nets));
        assert!(!is_trusted("11.0.0.1".parse().unwrap(), &nets));
        assert!(!is_trusted("10.0.0.1".parse().unwrap(), &[]));
    }
}
