//! Variants the origin chooses (RFC 9111 4.1): a response whose `Vary` names request fields the
//! route did not key on up front is stored under a second variant id, made from the first (the
//! authority and the route's `vary` values, [`super::key`]) and those fields' values.
//!
//! The first variant's slot then holds a [`Marker`] naming the fields, so a lookup that finds a
//! marker knows which values to hash for the second. Each process remembers the names per path
//! and variant ([`Selectors`]), so after the first time it asks the store for both slots at once:
//! one round trip, as for a path that does not vary.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName};
use sha2::{Digest, Sha256};

use super::policy::NotStorable;

/// Fields the proxy sets for the backend itself, per request: a response varying on them varies
/// on something the key cannot hold (the client's own value is not what the backend saw).
static SET_BY_THE_PROXY: [HeaderName; 4] = [
    HeaderName::from_static("x-forwarded-for"),
    header::VIA,
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
];

/// The request fields a response's `Vary` names: lower case, sorted, each once. `Vary: *` is
/// never reused (4.1); a field the proxy sets itself, or a value that is not a list of field
/// names, cannot be keyed.
pub fn names(response: &HeaderMap) -> Result<Vec<HeaderName>, NotStorable> {
    let mut names = Vec::new();
    for value in response.get_all(header::VARY) {
        let value = value.to_str().map_err(|_| NotStorable::VaryUnkeyable)?;
        for name in value.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return Err(NotStorable::VaryStar);
            }
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| NotStorable::VaryUnkeyable)?;
            if SET_BY_THE_PROXY.contains(&name) {
                return Err(NotStorable::VaryUnkeyable);
            }
            names.push(name);
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    Ok(names)
}

/// The names of `names` that the route does not key on already.
pub fn beyond(names: Vec<HeaderName>, keyed: &[HeaderName]) -> Vec<HeaderName> {
    names.into_iter().filter(|n| !keyed.contains(n)).collect()
}

/// Fields whose value is a comma-separated list (RFC 9110 12.5): their lines may be combined and
/// the whitespace around members dropped without changing what they say. Any other field is
/// keyed exactly as sent, line by line: `(KHTML, like Gecko)` in a `User-Agent` is not a list.
static LISTS: [HeaderName; 4] =
    [header::ACCEPT, header::ACCEPT_CHARSET, header::ACCEPT_ENCODING, header::ACCEPT_LANGUAGE];

/// The second variant id: the first, and the values `request` has for `names` (sorted), list
/// fields normalised as RFC 9111 4.1 allows (lines combined, whitespace around members dropped),
/// any other field exactly, line by line. Field values never hold bytes below 0x09, so the tags
/// that separate the parts cannot be forged by a value; an absent field is not an empty one.
pub fn secondary(primary: &str, names: &[HeaderName], request: &HeaderMap) -> String {
    let mut hash = Sha256::new();
    hash.update(primary.as_bytes());
    for name in names {
        hash.update(b"\x01");
        hash.update(name.as_str().as_bytes());
        let mut lines = request.get_all(name).iter().peekable();
        if lines.peek().is_none() {
            hash.update(b"\x02");
        } else if LISTS.contains(name) {
            hash.update(b"\x03");
            let mut first = true;
            for member in lines.flat_map(|line| line.as_bytes().split(|b| *b == b',')) {
                if !first {
                    hash.update(b",");
                }
                first = false;
                hash.update(member.trim_ascii());
            }
        } else {
            for line in lines {
                hash.update(b"\x04");
                hash.update(line.as_bytes());
            }
        }
    }
    // A prefix no first variant has (those are plain hex), so the two can never meet.
    format!("v{}", super::key::hex(&hash.finalize()[..16]))
}

const MAGIC: &[u8; 2] = b"SV";
const VERSION: u8 = 1;

/// What a path's first variant slot holds when the origin varies it further: the request fields
/// that choose among its stored responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// Sorted, lower case, never empty.
    pub names: Vec<HeaderName>,
}

impl Marker {
    /// `b"SV"`, version, count `u16`, then each name's length `u16` and bytes.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(5 + self.names.iter().map(|n| 2 + n.as_str().len()).sum::<usize>());
        out.put_slice(MAGIC);
        out.put_u8(VERSION);
        out.put_u16(self.names.len().min(u16::MAX as usize) as u16);
        for name in self.names.iter().take(u16::MAX as usize) {
            out.put_u16(name.as_str().len() as u16);
            out.put_slice(name.as_str().as_bytes());
        }
        out.freeze()
    }

    /// Whether stored bytes are a marker rather than an entry (their magic differs).
    pub fn is_marker(bytes: &[u8]) -> bool {
        bytes.starts_with(MAGIC)
    }

    /// Decode what [`Marker::encode`] wrote; `None` when the bytes are anything else, exactly.
    pub fn decode(bytes: &[u8]) -> Option<Marker> {
        let rest = bytes.strip_prefix(MAGIC)?.strip_prefix(&[VERSION])?;
        let (count, mut rest) = rest.split_first_chunk::<2>()?;
        let mut names = Vec::with_capacity(usize::from(u16::from_be_bytes(*count)).min(64));
        for _ in 0..u16::from_be_bytes(*count) {
            let (len, tail) = rest.split_first_chunk::<2>()?;
            let (name, tail) = tail.split_at_checked(usize::from(u16::from_be_bytes(*len)))?;
            names.push(HeaderName::from_bytes(name).ok()?);
            rest = tail;
        }
        (rest.is_empty() && !names.is_empty()).then_some(Marker { names })
    }
}

/// Paths (and first variants) this process has seen varied by the origin, with the names: a
/// bounded memo, so the second slot can be asked for with the first. A wrong or missing memo
/// costs a round trip, never a wrong answer: the marker read with the slot is what counts.
pub struct Selectors {
    known: moka::sync::Cache<String, Arc<[HeaderName]>>,
    /// Set once anything is remembered: until then a lookup skips the memo.
    used: AtomicBool,
}

/// Paths remembered at most, and for how long since last used.
const SELECTORS: u64 = 65_536;
const SELECTOR_IDLE: Duration = Duration::from_secs(600);

impl Default for Selectors {
    fn default() -> Selectors {
        Selectors {
            known: moka::sync::Cache::builder().max_capacity(SELECTORS).time_to_idle(SELECTOR_IDLE).build(),
            used: AtomicBool::new(false),
        }
    }
}

impl Selectors {
    /// Whether nothing was ever remembered.
    pub fn is_empty(&self) -> bool {
        !self.used.load(Ordering::Relaxed)
    }

    /// The names remembered for this entry id.
    pub fn get(&self, id: &str) -> Option<Arc<[HeaderName]>> {
        self.known.get(id)
    }

    /// Remember (or, with no names, forget) what varies this entry id.
    pub fn set(&self, id: &str, names: &[HeaderName]) {
        match names {
            [] => self.known.invalidate(id),
            names => {
                if self.known.get(id).is_none_or(|known| *known != *names) {
                    self.known.insert(id.to_string(), names.into());
                    self.used.store(true, Ordering::Relaxed);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::fields;

    #[test]
    fn vary_names() {
        let of = |pairs: &[(&str, &str)]| names(&fields(pairs));
        let names = of(&[("vary", "Accept-Language, accept-encoding"), ("vary", "ACCEPT-LANGUAGE,,")]).unwrap();
        assert_eq!(names, ["accept-encoding", "accept-language"]);
        assert_eq!(of(&[("vary", "accept, *")]), Err(NotStorable::VaryStar));
        assert_eq!(of(&[("vary", "X-Forwarded-For")]), Err(NotStorable::VaryUnkeyable));
        assert_eq!(of(&[("vary", "a b")]), Err(NotStorable::VaryUnkeyable));
        assert_eq!(of(&[]).unwrap(), Vec::<HeaderName>::new());
        let keyed = [HeaderName::from_static("accept-encoding")];
        assert_eq!(beyond(names, &keyed), ["accept-language"]);
    }

    #[test]
    fn values_are_normalised_but_never_confused() {
        let names = [HeaderName::from_static("accept-language"), HeaderName::from_static("x-b")];
        let id = |pairs: &[(&str, &str)]| secondary("p", &names, &fields(pairs));
        let base = id(&[("accept-language", "en, fr"), ("x-b", "1")]);
        assert_eq!(base, id(&[("accept-language", "en"), ("accept-language", "fr"), ("x-b", "1")]), "lines combine");
        assert_eq!(base, id(&[("accept-language", " en ,fr "), ("x-b", "1")]), "whitespace around members");
        assert_ne!(base, id(&[("accept-language", "fr, en"), ("x-b", "1")]), "order counts");
        assert_ne!(base, id(&[("accept-language", "en, fr")]), "absent");
        assert_ne!(id(&[("x-b", "")]), id(&[]), "empty is not absent");
        assert_ne!(id(&[("x-b", "absent")]), id(&[]), "no value reads as absent");
        assert_ne!(id(&[("x-b", "a, b")]), id(&[("x-b", "a,b")]), "only list fields are normalised");
        assert_ne!(id(&[("x-b", "a"), ("x-b", "b")]), id(&[("x-b", "a, b")]), "nor are the lines of others combined");
        assert_ne!(base, secondary("q", &names, &fields(&[("accept-language", "en, fr"), ("x-b", "1")])));
        assert!(base.starts_with('v') && base.len() == 33);
    }

    #[test]
    fn markers_round_trip_and_reject_anything_else() {
        let m = Marker { names: vec![HeaderName::from_static("accept"), HeaderName::from_static("x-tenant")] };
        let bytes = m.encode();
        assert!(Marker::is_marker(&bytes));
        assert_eq!(Marker::decode(&bytes), Some(m));
        for cut in 0..bytes.len() {
            assert_eq!(Marker::decode(&bytes[..cut]), None);
        }
        let mut trailing = bytes.to_vec();
        trailing.push(0);
        assert_eq!(Marker::decode(&trailing), None);
        assert_eq!(Marker::decode(b"SV\x01\x00\x00"), None, "no names");
        assert!(!Marker::is_marker(b"SC\x01"));
    }
}
