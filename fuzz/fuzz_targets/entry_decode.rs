//! The cache entry decoder and the sealed-entry opener: bytes read back from Redis are not
//! trusted (another writer, a corrupt or hostile value). Neither may panic; a decoded entry
//! encodes back to something that decodes to the same entry.
#![no_main]

use std::collections::HashMap;
use std::sync::OnceLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sidecache::cache::entry::Entry;
use sidecache::cache::seal::Seal;

fn seal() -> &'static Seal {
    static SEAL: OnceLock<Seal> = OnceLock::new();
    SEAL.get_or_init(|| {
        let text = "[upstream]\nurl = \"http://127.0.0.1:1\"\n[cache]\nencryption_key_env = \"K\"\n";
        let env = HashMap::from([("K".to_string(), "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".to_string())]);
        let config = sidecache::Config::from_sources(text, &env).expect("fuzz configuration");
        Seal::new(config.cache_encryption.as_ref().expect("encryption configured"))
    })
}

fuzz_target!(|data: &[u8]| {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(entry) = Entry::decode(&bytes) {
        let again = Entry::decode(&entry.encode()).expect("an encoded entry decodes");
        assert_eq!(again.status, entry.status);
        assert_eq!(again.headers, entry.headers);
        assert_eq!(again.body, entry.body);
        assert_eq!(again.stored_at, entry.stored_at);
        assert_eq!(again.freshness, entry.freshness);
    }
    let seal = seal();
    if let Ok(opened) = seal.open(data, "k", "v") {
        // Only what the key sealed opens; sealing it again opens to the same plain text.
        let resealed = seal.seal(&opened.plain, "k", "v");
        assert_eq!(seal.open(&resealed, "k", "v").expect("resealed opens").plain, opened.plain);
    }
    let sealed = seal.seal(data, "k", "v");
    assert_eq!(seal.open(&sealed, "k", "v").expect("sealed opens").plain.as_ref(), data);
    assert!(seal.open(&sealed, "k", "w").is_err(), "bound to its variant");
});
