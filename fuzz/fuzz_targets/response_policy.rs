//! A backend's response fields as the cache reads them: `Cache-Control`, `Age`, `Expires`,
//! `Date`, `Vary`, `ETag`, `Last-Modified`, in any spelling and any number, on any status. The
//! storability and freshness decision, the stored entry's phase, a revalidation merge and a
//! conditional request against it never panic, and the route's `ttl` caps any lifetime. So do
//! the rest read with the request's fields: targeted fields, request directives, the variant the
//! origin's `Vary` chooses and its marker, and a byte range (always inside the body).
#![no_main]

mod common;

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use libfuzzer_sys::fuzz_target;
use sidecache::cache::entry::Entry;
use sidecache::cache::policy::{self, RequestDirectives};
use sidecache::cache::range::{self, Ranged};
use sidecache::cache::vary::{self, Marker};
use sidecache::config::CacheConfig;

const ROUTES: &str = r#"
[upstream]
url = "http://127.0.0.1:1"
[[route]]
name = "capped"
path = "/a"
cache = { ttl = "1h", vary = ["Accept-Encoding", "Accept"], statuses = [200, 301, 404], stale_while_revalidate = "30s", stale_if_error = "1m" }
[[route]]
name = "origin"
path = "/b"
cache = { }
[[route]]
name = "fixed"
path = "/c"
cache = { ttl = "5m", respect_origin = false }
[[route]]
name = "clients"
path = "/d"
cache = { heuristic = true, request_directives = true, stale_if_error = "1m" }
[cache]
targeted = ["Sidecache-Cache-Control", "CDN-Cache-Control"]
"#;

fn caches() -> &'static [CacheConfig] {
    static CACHES: OnceLock<Vec<CacheConfig>> = OnceLock::new();
    CACHES.get_or_init(|| common::caches(ROUTES))
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 10 {
        return;
    }
    let Ok(status) = StatusCode::from_u16(100 + u16::from_le_bytes([data[0], data[1]]) % 500) else { return };
    let now = UNIX_EPOCH + Duration::from_secs(u64::from_le_bytes(data[2..10].try_into().unwrap()) % (1 << 40));
    let (response, request) = match data[10..].iter().position(|b| *b == 0) {
        Some(split) => (common::fields(&data[10..10 + split]), common::fields(&data[10 + split + 1..])),
        None => (common::fields(&data[10..]), HeaderMap::new()),
    };
    for value in response.values() {
        if let Ok(text) = value.to_str() {
            let _ = policy::delta_seconds(text);
        }
    }
    for cfg in caches() {
        let Ok(freshness) = policy::storable(status, &response, cfg, now) else { continue };
        if let Some(ttl) = cfg.ttl {
            assert!(freshness.lifetime <= ttl, "{freshness:?} over the route's ttl");
        }
        let _ = freshness.keep_for(policy::has_validators(&response));
        let entry =
            Entry { status, headers: response.clone(), body: Bytes::from_static(b"body"), stored_at: now, freshness };
        for later in [now, now + Duration::from_secs(3600), SystemTime::UNIX_EPOCH] {
            let _ = policy::phase(&entry, later);
            let _ = entry.age(later);
        }
        let _ = policy::serve_while_revalidating(&entry, Duration::from_secs(30));
        let _ = policy::serve_on_error(&entry, Duration::MAX);
        let _ = policy::not_modified(&request, &entry);
        let _ = policy::conditional_headers(&entry);
        let (merged, _) = policy::revalidated(&entry, &request, cfg, now);
        assert_eq!(merged.body, entry.body);
        let asks = RequestDirectives::of(&request);
        let _ = policy::usable(&entry, policy::phase(&entry, now), &asks, now + Duration::from_secs(90));
        if let Ranged::Part(first, last) = range::select(&request, &entry) {
            assert!(first <= last && last < entry.body.len() as u64, "{first}-{last} outside the body");
        }
        if let Ok(names) = vary::names(&response) {
            let _ = vary::secondary("primary", &names, &request);
            if !names.is_empty() {
                let marker = Marker { names };
                assert_eq!(Marker::decode(&marker.encode()).as_ref(), Some(&marker));
            }
        }
        let _ = Entry::decode(&entry.encode()).expect("an entry made from any response encodes");
    }
});
