//! How the cache took part in one request: one value per request, counted once, and the
//! `Cache-Status` (RFC 9211) and `X-Cache` headers it puts on the answer.

use http::{HeaderMap, HeaderName, HeaderValue};

/// `Cache-Status` (RFC 9211).
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
/// `X-Cache`, for older dashboards.
pub static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// The cache phase's outcome; `as_str()` is the `result` label of `cache_lookups_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from a fresh entry.
    Hit,
    /// Answered from the entry another request in flight fetched (request coalescing).
    Collapsed,
    /// Answered from an expired entry that the upstream confirmed with a 304.
    Revalidated,
    /// Answered from an expired entry while it is refreshed in the background.
    Stale,
    /// Answered from an expired entry because the upstream failed.
    StaleIfError,
    /// Forwarded: nothing usable was stored.
    Miss,
    /// Forwarded: the store could not answer in time.
    Error,
    /// Forwarded: the request may not use the cache.
    Bypass,
}

impl Outcome {
    /// Every outcome, in label order.
    pub const ALL: [Outcome; 8] = [
        Self::Hit,
        Self::Collapsed,
        Self::Revalidated,
        Self::Stale,
        Self::StaleIfError,
        Self::Miss,
        Self::Error,
        Self::Bypass,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Collapsed => "collapsed",
            Self::Revalidated => "revalidated",
            Self::Stale => "stale",
            Self::StaleIfError => "stale_if_error",
            Self::Miss => "miss",
            Self::Error => "error",
            Self::Bypass => "bypass",
        }
    }

    /// The `X-Cache` value.
    fn x_cache(self) -> &'static str {
        match self {
            Self::Hit => "HIT",
            Self::Revalidated => "REVALIDATED",
            Self::Stale | Self::StaleIfError => "STALE",
            Self::Collapsed | Self::Miss | Self::Error => "MISS",
            Self::Bypass => "BYPASS",
        }
    }

    /// Set `Cache-Status` and `X-Cache`. `ttl` is the answering entry's remaining freshness in
    /// seconds (negative once expired); `stored` says the forwarded response was stored.
    pub fn apply(self, headers: &mut HeaderMap, ttl: i64, stored: bool) {
        // Only answers from an entry carry a number; the others are static values.
        let with_ttl =
            |detail: &str| HeaderValue::try_from(format!("sidecache; hit; ttl={ttl}{detail}")).expect("ASCII");
        let status = match self {
            Self::Hit => with_ttl(""),
            Self::Stale => with_ttl("; detail=stale-while-revalidate"),
            Self::StaleIfError => with_ttl("; detail=stale-if-error"),
            Self::Collapsed => HeaderValue::from_static("sidecache; fwd=miss; collapsed"),
            Self::Revalidated => HeaderValue::from_static("sidecache; fwd=stale; fwd-status=304"),
            Self::Miss if stored => HeaderValue::from_static("sidecache; fwd=miss; stored"),
            Self::Miss => HeaderValue::from_static("sidecache; fwd=miss"),
            Self::Error => HeaderValue::from_static("sidecache; fwd=miss; detail=store-unavailable"),
            Self::Bypass => HeaderValue::from_static("sidecache; fwd=bypass"),
        };
        headers.insert(CACHE_STATUS.clone(), status);
        headers.insert(X_CACHE.clone(), HeaderValue::from_static(self.x_cache()));
    }
}
