//! Entries sealed for Redis: AES-256-GCM (ring) with a random nonce, under a key derived
//! (HKDF-SHA256) from the configured key and a random 128-bit salt that a process uses for at most
//! 2²⁸ writes, then draws again; so no key and nonce pair is likely to repeat however many
//! entries a configured key seals (one key with random 96-bit nonces would need a rotation every
//! 2³² writes, which a client asking for unique URLs could hasten). Readers keep the keys of the
//! salts they meet (each process's few), so a read derives nothing in the common case. The associated data is the value's header and the
//! entry's place, its Redis key (prefix, route, generation, path) and its variant, each with its
//! length: a sealed value opens only where it was written. The value carries the id of the key
//! that sealed it, so a previous key still opens what it sealed while a rotation rolls out.
//!
//! `SE` | format 1 | key id (4) | salt (16) | nonce (12) | ciphertext and tag (16)

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{BufMut, Bytes, BytesMut};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf::{Salt, HKDF_SHA256};
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::{EncryptionConfig, SealKey, KEY_LEN};

const MAGIC: &[u8; 2] = b"SE";
const FORMAT: u8 = 1;
const SALT_LEN: usize = 16;
const ID: std::ops::Range<usize> = 3..7;
const SALT: std::ops::Range<usize> = 7..7 + SALT_LEN;
const HEADER: usize = SALT.end + NONCE_LEN;
/// What the derivation is for (HKDF's info).
const INFO: &[u8] = b"sidecache cache entry v1";
/// Writes under one salt at most (random nonces: a repeat is then about 2⁻⁴¹ likely).
const SALT_WRITES: u64 = 1 << 28;
/// Derived keys a process keeps per configured key; past it, they are all dropped (salts come
/// from the processes writing: a handful, unless someone writes made-up values into Redis).
const DERIVED_MAX: usize = 256;

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

/// An opened value, and whether the previous key sealed it (then worth sealing again under the
/// current one, so the previous key can be dropped sooner).
#[derive(Debug, PartialEq, Eq)]
pub struct Opened {
    /// The plain value.
    pub plain: Bytes,
    /// Sealed with the previous key.
    pub by_previous: bool,
}

type Derived = Arc<LessSafeKey>;

struct Key {
    id: [u8; 4],
    secret: [u8; KEY_LEN],
    derived: Mutex<HashMap<[u8; SALT_LEN], Derived>>,
}

impl Key {
    fn new(key: &SealKey) -> Key {
        Key { id: key.id(), secret: *key.bytes(), derived: Mutex::default() }
    }

    /// The AES-256-GCM key of this salt: HKDF-SHA256 of the configured key, derived once.
    fn salted(&self, salt: [u8; SALT_LEN]) -> Derived {
        let mut derived = self.derived.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(key) = derived.get(&salt) {
            return key.clone();
        }
        let prk = Salt::new(HKDF_SHA256, &salt).extract(&self.secret);
        let info = [INFO];
        let okm = prk.expand(&info, &AES_256_GCM).expect("32 bytes are within HKDF-SHA256's output");
        let key = Arc::new(LessSafeKey::new(UnboundKey::from(okm)));
        if derived.len() >= DERIVED_MAX {
            derived.clear();
        }
        derived.insert(salt, key.clone());
        key
    }
}

/// The salt this process writes with, and how many writes it has sealed.
struct Writing {
    salt: [u8; SALT_LEN],
    key: Derived,
    writes: u64,
}

/// Seals with the current key; opens with the current or the previous one.
pub struct Seal {
    current: Key,
    previous: Option<Key>,
    current_id: String,
    random: SystemRandom,
    writing: Mutex<Option<Writing>>,
}

impl Seal {
    /// The seal of these keys.
    pub fn new(config: &EncryptionConfig) -> Seal {
        Seal {
            current: Key::new(&config.current),
            previous: config.previous.as_ref().map(Key::new),
            current_id: config.current.id_hex(),
            random: SystemRandom::new(),
            writing: Mutex::new(None),
        }
    }

    /// The salt and key of the next write: a new salt at first and every [`SALT_WRITES`].
    fn next_write(&self) -> ([u8; SALT_LEN], Derived) {
        let mut writing = self.writing.lock().unwrap_or_else(PoisonError::into_inner);
        let writing = match &mut *writing {
            Some(w) if w.writes < SALT_WRITES => w,
            stale => {
                let mut salt = [0u8; SALT_LEN];
                self.random.fill(&mut salt).expect("the system's random source works");
                stale.insert(Writing { salt, key: self.current.salted(salt), writes: 0 })
            }
        };
        writing.writes += 1;
        (writing.salt, writing.key.clone())
    }

    /// The id of the key writes are sealed with (8 hex digits).
    pub fn key_id(&self) -> &str {
        &self.current_id
    }

    /// `plain`, sealed for the hash field `variant` of the Redis key `path_key`.
    pub fn seal(&self, plain: &[u8], path_key: &str, variant: &str) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER + plain.len() + AES_256_GCM.tag_len());
        out.put_slice(MAGIC);
        out.put_u8(FORMAT);
        out.put_slice(&self.current.id);
        let (salt, key) = self.next_write();
        out.put_slice(&salt);
        out.resize(HEADER, 0);
        self.random.fill(&mut out[SALT.end..HEADER]).expect("the system's random source works");
        let nonce = Nonce::try_assume_unique_for_key(&out[SALT.end..HEADER]).expect("a nonce's length");
        let aad = associated(&out[..HEADER], path_key, variant);
        let mut body = BytesMut::from(plain);
        key.seal_in_place_append_tag(nonce, Aad::from(&aad), &mut body)
            .expect("a cache entry is far below AES-GCM's length limit");
        out.unsplit(body);
        out.freeze()
    }

    /// The plain value of `sealed`, read from the hash field `variant` of the Redis key `path_key`.
    pub fn open(&self, sealed: &[u8], path_key: &str, variant: &str) -> Result<Opened, Unreadable> {
        if sealed.len() < HEADER || &sealed[..2] != MAGIC || sealed[2] != FORMAT {
            return Err(Unreadable::Unsealed);
        }
        let id = &sealed[ID];
        let (key, by_previous) = if self.current.id == id {
            (&self.current, false)
        } else {
            (self.previous.as_ref().filter(|k| k.id == id).ok_or(Unreadable::UnknownKey)?, true)
        };
        let nonce = Nonce::try_assume_unique_for_key(&sealed[SALT.end..HEADER]).map_err(|_| Unreadable::Tampered)?;
        let aad = associated(&sealed[..HEADER], path_key, variant);
        let mut body = sealed[HEADER..].to_vec();
        let salt = <[u8; SALT_LEN]>::try_from(&sealed[SALT]).expect("the header's salt");
        let plain =
            key.salted(salt).open_in_place(nonce, Aad::from(&aad), &mut body).map_err(|_| Unreadable::Tampered)?;
        let len = plain.len();
        body.truncate(len);
        Ok(Opened { plain: Bytes::from(body), by_previous })
    }
}

/// What a value is bound to: its header, its Redis key and its hash field, lengths first.
fn associated(header: &[u8], path_key: &str, variant: &str) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + 8 + path_key.len() + variant.len());
    aad.extend_from_slice(header);
    aad.extend_from_slice(&(path_key.len() as u32).to_be_bytes());
    aad.extend_from_slice(path_key.as_bytes());
    aad.extend_from_slice(&(variant.len() as u32).to_be_bytes());
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
        let at = |s: &Seal, sealed: &[u8], path_key: &str, variant: &str| s.open(sealed, path_key, variant);
        let sealed = a.seal(plain, "sc:c:r:0:g:/x?", "v1");
        assert!(!sealed.windows(8).any(|w| w == b"personal"), "nothing of it in the clear");
        let again = a.seal(plain, "sc:c:r:0:g:/x?", "v1");
        assert_ne!(sealed[SALT.end..], again[SALT.end..], "a nonce of its own per write");
        assert_eq!(sealed[SALT], again[SALT], "one salt per process, for many writes");
        assert_ne!(sealed[SALT], seal(A, None).seal(plain, "p", "v")[SALT], "a salt of its own per process");
        let opened = at(&a, &sealed, "sc:c:r:0:g:/x?", "v1").unwrap();
        assert_eq!((opened.plain.as_ref(), opened.by_previous), (plain, false));
        assert_eq!(at(&a, &sealed, "sc:c:r:0:g:/y?", "v1"), Err(Unreadable::Tampered), "another key");
        assert_eq!(at(&a, &sealed, "sc:c:r:0:g:/x?", "v2"), Err(Unreadable::Tampered), "another variant");
        assert_eq!(at(&a, &sealed, "sc:c:r:1:g:/x?", "v1"), Err(Unreadable::Tampered), "another generation");
        assert_eq!(at(&a, &sealed, "sc:c:r:0:g:/x?v", "1"), Err(Unreadable::Tampered), "the same bytes cut elsewhere");
        // Each part of the value, altered, is told apart: what decides the alert.
        for (i, expected) in [(0, Unreadable::Unsealed), (2, Unreadable::Unsealed), (3, Unreadable::UnknownKey)]
            .into_iter()
            .chain([ID.end - 1].map(|i| (i, Unreadable::UnknownKey)))
            .chain([SALT.start, SALT.end, HEADER, sealed.len() - 1].map(|i| (i, Unreadable::Tampered)))
        {
            let mut bad = sealed.to_vec();
            bad[i] ^= 1;
            assert_eq!(at(&a, &bad, "sc:c:r:0:g:/x?", "v1"), Err(expected), "byte {i}");
        }
        assert_eq!(at(&a, plain, "sc:c:r:0:g:/x?", "v1"), Err(Unreadable::Unsealed));
        assert_eq!(at(&a, &sealed[..HEADER + 3], "sc:c:r:0:g:/x?", "v1"), Err(Unreadable::Tampered));

        // Rotation: B current with A previous opens both; B alone does not know A.
        let rotated = seal(B, Some(A));
        let opened = at(&rotated, &sealed, "sc:c:r:0:g:/x?", "v1").unwrap();
        assert_eq!((opened.plain.as_ref(), opened.by_previous), (plain, true));
        let by_b = rotated.seal(plain, "sc:c:r:0:g:/x?", "v1");
        assert_eq!(at(&seal(B, None), &by_b, "sc:c:r:0:g:/x?", "v1").unwrap().plain, plain);
        assert_eq!(at(&seal(B, None), &sealed, "sc:c:r:0:g:/x?", "v1"), Err(Unreadable::UnknownKey));
        assert_eq!(at(&a, &by_b, "sc:c:r:0:g:/x?", "v1"), Err(Unreadable::UnknownKey));
        assert_ne!(a.key_id(), rotated.key_id());
    }
}
