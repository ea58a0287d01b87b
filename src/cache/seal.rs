//! Entries sealed for Redis: AES-256-GCM (ring), a random nonce per write, and as associated data
//! the entry's Redis key (prefix, route, generation, path) and its variant, so that a sealed value
//! opens only where it was written. The value carries the id of the key that sealed it, so a
//! previous key still opens what it sealed while a rotation rolls out.
//!
//! `SE` | format 1 | key id (4) | nonce (12) | ciphertext and tag (16)

use bytes::{BufMut, Bytes, BytesMut};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::{EncryptionConfig, SealKey};

const MAGIC: &[u8; 2] = b"SE";
const FORMAT: u8 = 1;
const HEADER: usize = MAGIC.len() + 1 + 4 + NONCE_LEN;

/// Why a stored value could not be opened; also the `reason` label of
/// `sidecache_cache_unreadable_total` (with `undecodable`, an opened entry that does not decode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// Sealed with a key that is not configured (any more).
    UnknownKey,
    /// Sealed with a configured key, but altered, or moved from another Redis key or variant.
    Tampered,
    /// Not sealed at all (written before encryption was on, or by someone else).
    Unsealed,
    /// Opened (or never sealed), but not an entry this version can read.
    Undecodable,
}

impl Unreadable {
    /// Every reason, in the order of the route's counters.
    pub const ALL: [Unreadable; 4] = [Self::UnknownKey, Self::Tampered, Self::Unsealed, Self::Undecodable];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownKey => "unknown_key",
            Self::Tampered => "tampered",
            Self::Unsealed => "unsealed",
            Self::Undecodable => "undecodable",
        }
    }
}

struct Key {
    id: [u8; 4],
    aead: LessSafeKey,
}

impl Key {
    fn new(key: &SealKey) -> Key {
        let unbound = UnboundKey::new(&AES_256_GCM, key.bytes()).expect("a 32-byte key is an AES-256 key");
        Key { id: key.id(), aead: LessSafeKey::new(unbound) }
    }
}

/// Seals with the current key; opens with the current or the previous one.
pub struct Seal {
    current: Key,
    previous: Option<Key>,
    current_id: String,
    random: SystemRandom,
}

impl Seal {
    /// The seal of these keys.
    pub fn new(config: &EncryptionConfig) -> Seal {
        Seal {
            current: Key::new(&config.current),
            previous: config.previous.as_ref().map(Key::new),
            current_id: config.current.id_hex(),
            random: SystemRandom::new(),
        }
    }

    /// The id of the key writes are sealed with (8 hex digits).
    pub fn key_id(&self) -> &str {
        &self.current_id
    }

    /// `plain`, sealed for the hash field `variant` of the Redis key `path_key`.
    pub fn seal(&self, plain: &[u8], path_key: &str, variant: &str) -> Bytes {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).expect("the system's random source works");
        let mut out = BytesMut::with_capacity(HEADER + plain.len() + AES_256_GCM.tag_len());
        out.put_slice(MAGIC);
        out.put_u8(FORMAT);
        out.put_slice(&self.current.id);
        out.put_slice(&nonce);
        out.put_slice(plain);
        let mut body = out.split_off(HEADER);
        let aad = associated(path_key, variant);
        self.current
            .aead
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(&aad), &mut body)
            .expect("a cache entry is far below AES-GCM's length limit");
        out.unsplit(body);
        out.freeze()
    }

    /// The plain value of `sealed`, read from the hash field `variant` of the Redis key `path_key`.
    pub fn open(&self, sealed: &[u8], path_key: &str, variant: &str) -> Result<Bytes, Unreadable> {
        if sealed.len() < HEADER || &sealed[..2] != MAGIC || sealed[2] != FORMAT {
            return Err(Unreadable::Unsealed);
        }
        let id = &sealed[3..7];
        let key = [Some(&self.current), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .find(|k| k.id == id)
            .ok_or(Unreadable::UnknownKey)?;
        let nonce = Nonce::try_assume_unique_for_key(&sealed[7..HEADER]).map_err(|_| Unreadable::Tampered)?;
        let mut body = sealed[HEADER..].to_vec();
        let aad = associated(path_key, variant);
        let plain = key.aead.open_in_place(nonce, Aad::from(&aad), &mut body).map_err(|_| Unreadable::Tampered)?;
        let len = plain.len();
        body.truncate(len);
        Ok(Bytes::from(body))
    }
}

/// Where a value belongs: its Redis key and hash field.
fn associated(path_key: &str, variant: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(path_key.len() + 1 + variant.len());
    aad.extend_from_slice(path_key.as_bytes());
    aad.push(0);
    aad.extend_from_slice(variant.as_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::Config;

    fn seal(current: &str, previous: Option<&str>) -> Seal {
        let mut env = HashMap::from([("K".to_string(), current.to_string())]);
        if let Some(previous) = previous {
            env.insert("K_PREVIOUS".into(), previous.into());
        }
        let text = "[upstream]\nurl = \"http://127.0.0.1:1\"\n[cache]\nencryption_key_env = \"K\"\n";
        Seal::new(&Config::from_sources(text, &env).unwrap().cache_encryption.unwrap())
    }

    const A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const B: &str = "HxwdHh8AAQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRo=";

    #[test]
    fn sealed_values_open_only_where_they_were_written_and_with_a_key_that_sealed_them() {
        let (a, plain) = (seal(A, None), b"HTTP/1.1 200 personal data".as_slice());
        let sealed = a.seal(plain, "sc:c:r:0:g:/x?", "v1");
        assert!(!sealed.windows(8).any(|w| w == b"personal"), "nothing of it in the clear");
        assert_ne!(sealed, a.seal(plain, "sc:c:r:0:g:/x?", "v1"), "a nonce of its own per write");
        assert_eq!(a.open(&sealed, "sc:c:r:0:g:/x?", "v1").unwrap(), plain);
        assert_eq!(a.open(&sealed, "sc:c:r:0:g:/y?", "v1"), Err(Unreadable::Tampered), "another key");
        assert_eq!(a.open(&sealed, "sc:c:r:0:g:/x?", "v2"), Err(Unreadable::Tampered), "another variant");
        assert_eq!(a.open(&sealed, "sc:c:r:1:g:/x?", "v1"), Err(Unreadable::Tampered), "another generation");
        for i in [3, 8, HEADER, sealed.len() - 1] {
            let mut bad = sealed.to_vec();
            bad[i] ^= 1;
            let err = a.open(&bad, "sc:c:r:0:g:/x?", "v1").unwrap_err();
            assert!(matches!(err, Unreadable::Tampered | Unreadable::UnknownKey), "byte {i}: {err:?}");
        }
        assert_eq!(a.open(plain, "sc:c:r:0:g:/x?", "v1"), Err(Unreadable::Unsealed));
        assert_eq!(a.open(&sealed[..HEADER + 3], "sc:c:r:0:g:/x?", "v1"), Err(Unreadable::Tampered));

        // Rotation: B current with A previous opens both; B alone does not know A.
        let rotated = seal(B, Some(A));
        assert_eq!(rotated.open(&sealed, "sc:c:r:0:g:/x?", "v1").unwrap(), plain);
        let by_b = rotated.seal(plain, "sc:c:r:0:g:/x?", "v1");
        assert_eq!(seal(B, None).open(&by_b, "sc:c:r:0:g:/x?", "v1").unwrap(), plain);
        assert_eq!(seal(B, None).open(&sealed, "sc:c:r:0:g:/x?", "v1"), Err(Unreadable::UnknownKey));
        assert_eq!(a.open(&by_b, "sc:c:r:0:g:/x?", "v1"), Err(Unreadable::UnknownKey));
        assert_ne!(a.key_id(), rotated.key_id());
    }
}
