//! Whose bucket a request takes from (DESIGN.md 5): the client address, believed from
//! `X-Forwarded-For` only as far as the hops are `server.trusted_proxies`, a header's value, or
//! one bucket for the whole route.

use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;
use sha2::{Digest, Sha256};

use crate::config::ClientKey;
use crate::upstream::headers::{canonical, is_connection_option, is_trusted, X_FORWARDED_FOR};

/// Header values longer than this (or not plain visible ASCII) name their bucket by SHA-256, so a
/// key in Redis stays short and printable whatever a client sends.
const MAX_PLAIN_HEADER: usize = 64;

/// The client address: the peer, or, when the peer is a trusted proxy, the right-most
/// `X-Forwarded-For` hop that is not trusted. Hops are read right to left and each one is only
/// believed because the hop to its right is trusted, so whatever a client writes at the left
/// cannot choose its bucket. A hop that does not parse ends the walk at the last trusted one.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let mut client = canonical(peer);
    if !is_trusted(client, trusted) {
        return client;
    }
    for line in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        let Ok(line) = line.to_str() else { return client };
        for hop in line.rsplit(',') {
            let Some(ip) = parse_hop(hop.trim()) else { return client };
            client = ip;
            if !is_trusted(ip, trusted) {
                return ip;
            }
        }
    }
    client
}

/// `1.2.3.4`, `2001:db8::1`, or either with a port (`1.2.3.4:5678`, `[2001:db8::1]:443`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let ip = hop.parse::<IpAddr>().ok().or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip()))?;
    Some(canonical(ip))
}

/// The bucket id of a request within its route: `ip:ADDR`, `h:VALUE` (or `h#SHA256` for long or
/// unusual values), or `all`. A request without the configured header uses its address; so do
/// one that sends it on several lines and one that names it in `Connection`: the backend never sees it (it is hop-by-hop then),
/// so it must not choose a bucket either (a fresh invented value per request would dodge the limit).
pub fn bucket_id(key: &ClientKey, peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> String {
    let value = match key {
        ClientKey::Route => return "all".to_owned(),
        // One line only: with several, the backend may read another than the one bucketed.
        ClientKey::Header(name) if !is_connection_option(headers, name.as_str()) => {
            let mut lines = headers.get_all(name).iter();
            match (lines.next(), lines.next()) {
                (Some(v), None) if !v.is_empty() => Some(v.as_bytes()),
                _ => None,
            }
        }
        ClientKey::Header(_) | ClientKey::Ip => None,
    };
    match value {
        Some(v) if v.len() <= MAX_PLAIN_HEADER && v.iter().all(|b| b.is_ascii_graphic()) => {
            let mut id = String::with_capacity(2 + v.len());
            id.push_str("h:");
            id.extend(v.iter().map(|&b| b as char));
            id
        }
        Some(v) => {
            let mut id = String::with_capacity(2 + 64);
            id.push_str("h#");
            for byte in Sha256::digest(v) {
                let _ = write!(id, "{byte:02x}");
            }
            id
        }
        None => {
            let mut id = String::with_capacity(3 + 39);
            let _ = write!(id, "ip:{}", client_ip(peer, headers, trusted));
            id
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn xff(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for line in lines {
            h.append(&X_FORWARDED_FOR, HeaderValue::from_str(line).unwrap());
        }
        h
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let h = xff(&["6.6.6.6"]);
        assert_eq!(client_ip(ip("203.0.113.9"), &h, &nets(&["10.0.0.0/8"])), ip("203.0.113.9"));
        assert_eq!(client_ip(ip("10.0.0.1"), &h, &[]), ip("10.0.0.1"));
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let trusted = nets(&["10.0.0.0/8"]);
        // A client wrote 6.6.6.6; the ingress (10.1.1.1) appended the address it saw.
        let h = xff(&["6.6.6.6, 198.51.100.7", "10.1.1.1"]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("198.51.100.7"));
        let h = xff(&["1.1.1.1, 2.2.2.2, 198.51.100.7"]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("198.51.100.7"));
    }

    #[test]
    fn all_hops_trusted_or_unreadable_stops_at_the_last_believable_one() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert_eq!(client_ip(ip("10.0.0.2"), &xff(&["10.9.9.9"]), &trusted), ip("10.9.9.9"));
        assert_eq!(client_ip(ip("10.0.0.2"), &HeaderMap::new(), &trusted), ip("10.0.0.2"));
        let h = xff(&["198.51.100.7, garbage, 10.3.3.3"]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("10.3.3.3"));
    }

    #[test]
    fn hops_with_ports_and_mapped_addresses() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = xff(&["198.51.100.7:4711"]);
        assert_eq!(client_ip(ip("::ffff:10.0.0.2"), &h, &trusted), ip("198.51.100.7"));
        let h = xff(&["[2001:db8::1]:443"]);
        assert_eq!(client_ip(ip("10.0.0.2"), &h, &trusted), ip("2001:db8::1"));
    }

    #[test]
    fn bucket_ids() {
        let peer = ip("192.0.2.1");
        let name = HeaderName::from_static("x-api-key");
        let mut h = HeaderMap::new();
        assert_eq!(bucket_id(&ClientKey::Ip, peer, &h, &[]), "ip:192.0.2.1");
        assert_eq!(bucket_id(&ClientKey::Route, peer, &h, &[]), "all");
        assert_eq!(bucket_id(&ClientKey::Header(name.clone()), peer, &h, &[]), "ip:192.0.2.1");
        h.insert(&name, HeaderValue::from_static("key-1"));
        assert_eq!(bucket_id(&ClientKey::Header(name.clone()), peer, &h, &[]), "h:key-1");
        h.insert(&name, HeaderValue::from_static("with space"));
        let hashed = bucket_id(&ClientKey::Header(name.clone()), peer, &h, &[]);
        assert!(hashed.starts_with("h#") && hashed.len() == 66, "{hashed}");
        h.insert(&name, HeaderValue::from_str(&"k".repeat(65)).unwrap());
        assert_ne!(bucket_id(&ClientKey::Header(name), peer, &h, &[]), hashed);
    }
}
