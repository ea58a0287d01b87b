//! The route path normalizer and matcher: any request target, whatever its bytes. The
//! normalized form is stable (normalizing it again changes nothing, escapes aside), keeps no
//! segment a backend would read differently (`.`, `..`, empty, `;params`, `\`), and matching
//! it never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidecache::route::{normalize, Pattern};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // What reaches the router: a path hyper and http accepted.
    let Ok(uri) = text.parse::<http::Uri>() else { return };
    let path = uri.path();
    let normalized = normalize(path);
    // Authority-form (CONNECT) and asterisk-form (OPTIONS *) targets match no route.
    if !path.starts_with('/') {
        return;
    }
    assert!(normalized.starts_with('/'), "{path:?} -> {normalized:?}");
    // Escapes are decoded once, as a backend does (`%2561` stays `%61`); without any left, a
    // second pass must change nothing.
    if !normalized.contains('%') {
        assert_eq!(normalize(&normalized), normalized, "{path:?} normalizes in one pass");
    }
    let inner = normalized.strip_suffix('/').unwrap_or(&normalized);
    for segment in inner.split('/').skip(1) {
        assert!(!matches!(segment, "" | "." | "..") && !segment.contains([';', '\\']), "{path:?} -> {normalized:?}");
    }
    for pattern in ["/", "/login", "/api/*", "/users/{id}", "/users/{id}/posts/*"] {
        let pattern = Pattern::parse(pattern).expect("valid pattern");
        for (trailing, case) in [(true, false), (false, true)] {
            let _ = pattern.clone().matching(trailing, case).matches(&normalized);
        }
    }
});
