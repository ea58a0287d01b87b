//! What several targets share.

use std::collections::HashMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use sidecache::config::CacheConfig;

/// The cache settings of every route of `toml`.
pub fn caches(toml: &str) -> Vec<CacheConfig> {
    let config = sidecache::Config::from_sources(toml, &HashMap::new()).expect("fuzz configuration");
    config.routes.into_iter().filter_map(|r| r.cache).collect()
}

/// `name: value` lines; lines that are not a valid field are skipped.
pub fn fields(text: &[u8]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for line in text.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(line[colon + 1..].trim_ascii()))
        {
            headers.append(name, value);
        }
    }
    headers
}
