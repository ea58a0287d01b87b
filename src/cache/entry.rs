//! A stored response and its versioned binary encoding.
//!
//! Layout (big-endian): `b"SC"`, version `1`, status `u16`, stored-at (Unix ms) `u64`, freshness
//! lifetime ms `u64`, age at storing ms `u64`, stale-while-revalidate ms `u64`, stale-if-error ms
//! `u64`, flags `u8`, header count `u16`, then per header name length `u16` + name + value length
//! `u32` + value, then body length `u32` + body. Anything that does not decode exactly, including
//! trailing bytes, is an error: the caller treats it as a miss and deletes it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

const MAGIC: &[u8; 2] = b"SC";
const VERSION: u8 = 1;
const FLAG_MUST_REVALIDATE: u8 = 1;

/// A cached response.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Response status.
    pub status: StatusCode,
    /// End-to-end response headers, replayed unchanged.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// When it was stored (or last revalidated).
    pub stored_at: SystemTime,
    /// How long it is fresh and usable stale.
    pub freshness: Freshness,
}

/// How long a storable response stays fresh and usable stale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// Freshness lifetime (RFC 9111 4.2.1), counted from the response's generation.
    pub lifetime: Duration,
    /// The response's age on arrival (`Age`).
    pub initial_age: Duration,
    /// Stale-while-revalidate window (zero when revalidation is mandatory).
    pub stale_while_revalidate: Duration,
    /// Stale-if-error window (zero when revalidation is mandatory).
    pub stale_if_error: Duration,
    /// Never serve stale: `must-revalidate`, `proxy-revalidate` or `no-cache`.
    pub must_revalidate: bool,
}

impl Freshness {
    /// How long the store should keep the entry: fresh time left plus the stale windows, and,
    /// for an entry with validators, as long again so a stale entry can still be revalidated
    /// by a conditional request instead of a full transfer.
    pub fn keep_for(&self, has_validators: bool) -> Duration {
        let fresh_left = self.lifetime.saturating_sub(self.initial_age);
        let stale = self.stale_while_revalidate.max(self.stale_if_error);
        let revalidation = if has_validators { fresh_left.max(Duration::from_secs(60)) } else { Duration::ZERO };
        fresh_left.saturating_add(stale).saturating_add(revalidation)
    }
}

/// Why bytes are not an entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Not written by this encoder.
    #[error("not a sidecache entry")]
    Magic,
    /// Written by another version of the encoding.
    #[error("entry version {0} is not supported")]
    Version(u8),
    /// Shorter than its fields say.
    #[error("entry is truncated")]
    Truncated,
    /// A field holds an impossible value.
    #[error("entry field {0} is invalid")]
    Invalid(&'static str),
    /// Bytes after the body.
    #[error("entry has trailing bytes")]
    Trailing,
}

impl Entry {
    /// The entry's age at `now` (RFC 9111 4.2.3, with the origin's `Age` as the initial age).
    pub fn age(&self, now: SystemTime) -> Duration {
        self.freshness.initial_age.saturating_add(now.duration_since(self.stored_at).unwrap_or_default())
    }

    /// Encode for the store.
    pub fn encode(&self) -> Bytes {
        let headers_len: usize = self.headers.iter().map(|(k, v)| 6 + k.as_str().len() + v.len()).sum();
        let mut out = BytesMut::with_capacity(64 + headers_len + self.body.len());
        out.put_slice(MAGIC);
        out.put_u8(VERSION);
        out.put_u16(self.status.as_u16());
        out.put_u64(millis(self.stored_at.duration_since(UNIX_EPOCH).unwrap_or_default()));
        let f = &self.freshness;
        for d in [f.lifetime, f.initial_age, f.stale_while_revalidate, f.stale_if_error] {
            out.put_u64(millis(d));
        }
        out.put_u8(if f.must_revalidate { FLAG_MUST_REVALIDATE } else { 0 });
        out.put_u16(self.headers.len().min(u16::MAX as usize) as u16);
        for (name, value) in self.headers.iter().take(u16::MAX as usize) {
            out.put_u16(name.as_str().len() as u16);
            out.put_slice(name.as_str().as_bytes());
            out.put_u32(value.len() as u32);
            out.put_slice(value.as_bytes());
        }
        out.put_u32(self.body.len() as u32);
        out.put_slice(&self.body);
        out.freeze()
    }

    /// Decode what [`Entry::encode`] wrote. The body shares the input's memory.
    pub fn decode(bytes: &Bytes) -> Result<Entry, DecodeError> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(2)? != MAGIC {
            return Err(DecodeError::Magic);
        }
        match r.u8()? {
            VERSION => {}
            v => return Err(DecodeError::Version(v)),
        }
        let status = StatusCode::from_u16(r.u16()?).map_err(|_| DecodeError::Invalid("status"))?;
        let stored_at =
            UNIX_EPOCH.checked_add(Duration::from_millis(r.u64()?)).ok_or(DecodeError::Invalid("stored_at"))?;
        let lifetime = Duration::from_millis(r.u64()?);
        let initial_age = Duration::from_millis(r.u64()?);
        let stale_while_revalidate = Duration::from_millis(r.u64()?);
        let stale_if_error = Duration::from_millis(r.u64()?);
        let flags = r.u8()?;
        let count = r.u16()?;
        // Fallible forms: a corrupt count must be an error, not http's capacity panic.
        let mut headers =
            HeaderMap::try_with_capacity((count as usize).min(64)).map_err(|_| DecodeError::Invalid("headers"))?;
        for _ in 0..count {
            let name_len = r.u16()? as usize;
            let name = HeaderName::from_bytes(r.take(name_len)?).map_err(|_| DecodeError::Invalid("header name"))?;
            let value_len = r.u32()? as usize;
            let value = r.take(value_len)?;
            let value = HeaderValue::from_maybe_shared(bytes.slice_ref(value))
                .map_err(|_| DecodeError::Invalid("header value"))?;
            headers.try_append(name, value).map_err(|_| DecodeError::Invalid("headers"))?;
        }
        let body_len = r.u32()? as usize;
        let body = bytes.slice_ref(r.take(body_len)?);
        if r.at != bytes.len() {
            return Err(DecodeError::Trailing);
        }
        let freshness = Freshness {
            lifetime,
            initial_age,
            stale_while_revalidate,
            stale_if_error,
            must_revalidate: flags & FLAG_MUST_REVALIDATE != 0,
        };
        Ok(Entry { status, headers, body, stored_at, freshness })
    }
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// Bounds-checked big-endian reads.
struct Reader<'a> {
    bytes: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|end| *end <= self.bytes.len()).ok_or(DecodeError::Truncated)?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("two bytes")))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("four bytes")))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("eight bytes")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Entry {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        headers.insert("etag", HeaderValue::from_static("\"v1\""));
        Entry {
            status: StatusCode::OK,
            headers,
            body: Bytes::from((0..=255u8).collect::<Vec<_>>()),
            stored_at: UNIX_EPOCH + Duration::from_millis(1_790_000_000_123),
            freshness: Freshness {
                lifetime: Duration::from_secs(300),
                initial_age: Duration::from_secs(7),
                stale_while_revalidate: Duration::from_secs(30),
                stale_if_error: Duration::from_secs(600),
                must_revalidate: true,
            },
        }
    }

    #[test]
    fn round_trip_keeps_everything() {
        let e = sample();
        let decoded = Entry::decode(&e.encode()).unwrap();
        assert_eq!(decoded, e);
        assert_eq!(decoded.headers.get_all("x-multi").iter().count(), 2, "repeated headers keep their order");
    }

    #[test]
    fn age_counts_from_storing_plus_initial_age() {
        let e = sample();
        assert_eq!(e.age(e.stored_at + Duration::from_secs(10)), Duration::from_secs(17));
        assert_eq!(e.age(e.stored_at - Duration::from_secs(10)), Duration::from_secs(7), "a clock behind the writer's");
    }

    #[test]
    fn damaged_bytes_are_errors_never_panics() {
        let good = sample().encode();
        assert_eq!(Entry::decode(&Bytes::from_static(b"XX\x01")), Err(DecodeError::Magic));
        let mut other_version = good.to_vec();
        other_version[2] = 9;
        assert_eq!(Entry::decode(&Bytes::from(other_version)), Err(DecodeError::Version(9)));
        for cut in 0..good.len() {
            assert!(Entry::decode(&good.slice(..cut)).is_err(), "truncated at {cut}");
        }
        let mut trailing = good.to_vec();
        trailing.push(0);
        assert_eq!(Entry::decode(&Bytes::from(trailing)), Err(DecodeError::Trailing));
        // Every single-byte corruption either decodes to something or is an error: no panic.
        for i in 0..good.len() {
            let mut bad = good.to_vec();
            bad[i] ^= 0xA5;
            let _ = Entry::decode(&Bytes::from(bad));
        }
        // And pseudo-random garbage with a valid prefix.
        let mut state = 0x2545F4914F6CDD1Du64;
        for len in 0..2000 {
            let mut junk = b"SC\x01".to_vec();
            for _ in 0..len % 97 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                junk.push(state as u8);
            }
            let _ = Entry::decode(&Bytes::from(junk));
        }
    }
}
