//! `[cache] encryption_key_env` or `encryption_key_file`: the keys that seal cache entries in
//! Redis (the current one, and a previous one still accepted for reading). Key material never
//! appears in an error, a log line or a `Debug` print: only its id.

use std::collections::HashMap;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine;
use sha2::{Digest, Sha256};

use super::raw::RawCacheSettings;
use super::validate::Validator;

/// Bytes of a key: AES-256.
pub const KEY_LEN: usize = 32;

/// A 256-bit key and its id (the first 4 bytes of a SHA-256 of it: naming it reveals nothing).
#[derive(Clone, PartialEq, Eq)]
pub struct SealKey {
    id: [u8; 4],
    bytes: [u8; KEY_LEN],
}

impl SealKey {
    fn new(bytes: [u8; KEY_LEN]) -> SealKey {
        let digest = Sha256::new().chain_update(b"sidecache cache key id\0").chain_update(bytes).finalize();
        SealKey { id: [digest[0], digest[1], digest[2], digest[3]], bytes }
    }

    /// The id an entry sealed with this key carries.
    pub fn id(&self) -> [u8; 4] {
        self.id
    }

    /// The id as 8 hex digits, for `/status` and logs.
    pub fn id_hex(&self) -> String {
        self.id.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The key itself.
    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealKey({})", self.id_hex())
    }
}

/// The keys entries in Redis are sealed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptionConfig {
    /// Seals every write, and opens what it sealed.
    pub current: SealKey,
    /// Opens what it sealed, during a rotation.
    pub previous: Option<SealKey>,
}

/// A key given base64-encoded (padding optional, surrounding white space ignored).
fn parse_key(text: &str) -> Result<SealKey, String> {
    let text = text.trim();
    // The decoder's own error would quote a byte of the key.
    let bytes = STANDARD
        .decode(text)
        .or_else(|_| STANDARD_NO_PAD.decode(text))
        .map_err(|_| "is not base64 (make a key with `openssl rand -base64 32`)".to_string())?;
    let bytes = <[u8; KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| {
        format!("is {} bytes once decoded; a key is {KEY_LEN} (`openssl rand -base64 32`)", bytes.len())
    })?;
    Ok(SealKey::new(bytes))
}

impl Validator {
    /// The current key and the previous one, which must differ (one given twice is a rotation
    /// command gone wrong, and their ids would clash).
    fn rotation(&mut self, current: SealKey, previous: Option<SealKey>, field: &str) -> Option<EncryptionConfig> {
        if previous.as_ref().is_some_and(|p| p.id() == current.id()) {
            self.err(field, "is the current key; during a rotation it holds the key before it");
            return None;
        }
        Some(EncryptionConfig { current, previous })
    }

    /// A key from its text, or the error named `field`.
    fn key(&mut self, field: &str, text: Result<String, String>) -> Option<SealKey> {
        match text.and_then(|text| parse_key(&text)) {
            Ok(key) => Some(key),
            Err(message) => {
                self.err(field, message);
                None
            }
        }
    }

    /// The keys, when `[cache]` names where they are.
    pub(super) fn encryption(
        &mut self,
        raw: &RawCacheSettings,
        env: &HashMap<String, String>,
    ) -> Option<EncryptionConfig> {
        let read = |path: &str| std::fs::read_to_string(path).map_err(|e| format!("cannot read {path:?}: {e}"));
        match (&raw.encryption_key_env, &raw.encryption_key_file, &raw.previous_encryption_key_file) {
            (Some(_), Some(_), _) => {
                self.err("cache.encryption_key_file", "set encryption_key_env or encryption_key_file, not both");
                None
            }
            (Some(name), None, previous_file) => {
                if previous_file.is_some() {
                    self.err(
                        "cache.previous_encryption_key_file",
                        format!("goes with encryption_key_file; with encryption_key_env the previous key is {name}_PREVIOUS"),
                    );
                }
                if name.trim().is_empty() {
                    self.err("cache.encryption_key_env", "must name an environment variable");
                    return None;
                }
                let set = |var: &str| env.get(var).filter(|v| !v.trim().is_empty()).cloned();
                let current = match set(name) {
                    Some(text) => self.key(name, Ok(text)),
                    None => self.key("cache.encryption_key_env", Err(format!("names {name}, which is not set"))),
                };
                let previous_var = format!("{name}_PREVIOUS");
                let previous = set(&previous_var).and_then(|text| self.key(&previous_var, Ok(text)));
                self.rotation(current?, previous, &previous_var)
            }
            (None, Some(path), previous_file) => {
                let current = self.key("cache.encryption_key_file", read(path));
                let previous =
                    previous_file.as_deref().and_then(|p| self.key("cache.previous_encryption_key_file", read(p)));
                self.rotation(current?, previous, "cache.previous_encryption_key_file")
            }
            (None, None, Some(_)) => {
                self.err("cache.previous_encryption_key_file", "needs encryption_key_file");
                None
            }
            (None, None, None) => None,
        }
    }
}
