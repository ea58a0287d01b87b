//! The cache key of any request target and request fields: built without a panic, the same
//! every time for the same request, and, where the route ignores the query, the same with any
//! query.
#![no_main]

mod common;

use std::sync::OnceLock;

use http::{HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;
use sidecache::cache::key::cache_key;
use sidecache::cache::policy;
use sidecache::config::{CacheConfig, QueryMode};
use sidecache::upstream::Hop;

const ROUTES: &str = r#"
[upstream]
url = "http://127.0.0.1:1"
[[route]]
name = "sorted"
path = "/a"
cache = { ttl = "1m", vary = ["Accept-Encoding", "Accept-Language", "X-Api-Version"] }
[[route]]
name = "keep"
path = "/b"
cache = { ttl = "1m", query = "keep" }
[[route]]
name = "ignore"
path = "/c"
cache = { ttl = "1m", query = "ignore", vary = ["Cookie", "Authorization"] }
[[route]]
name = "only"
path = "/d"
cache = { ttl = "1m", query = ["page", "limit", "q"] }
"#;

fn caches() -> &'static [CacheConfig] {
    static CACHES: OnceLock<Vec<CacheConfig>> = OnceLock::new();
    CACHES.get_or_init(|| common::caches(ROUTES))
}

fuzz_target!(|data: &[u8]| {
    let Some(split) = data.iter().position(|b| *b == b'\n') else { return };
    let Ok(uri) = std::str::from_utf8(&data[..split]).unwrap_or("").parse::<Uri>() else { return };
    let headers = common::fields(&data[split + 1..]);
    let peer = HeaderValue::from_static("192.0.2.1");
    for trusted in [false, true] {
        let hop = Hop { peer: &peer, tls: trusted, trusted };
        for cfg in caches() {
            let _ = policy::request_bypass(&Method::GET, &headers, false, cfg);
            let key = cache_key("p:", "r", 7, &uri, &headers, &hop, cfg);
            assert_eq!(key, cache_key("p:", "r", 7, &uri, &headers, &hop, cfg), "a key is a function of the request");
            // A route only ever sees origin-form targets (a path).
            if let (Ok(key), QueryMode::Ignore, true) = (&key, &cfg.query, uri.path().starts_with('/')) {
                let bare: Uri = uri.path().parse().expect("a path alone is a target");
                let bare = cache_key("p:", "r", 7, &bare, &headers, &hop, cfg).expect("no query to refuse");
                assert_eq!(key.path_key, bare.path_key, "{uri}");
            }
        }
    }
});
