//! Invalidation after unsafe requests (RFC 9111 4.4): a non-error response to a method not known
//! to be safe invalidates the stored responses for its target, and for the same-origin targets
//! its `Location` and `Content-Location` name. The proxy finds the cached routes that cover each
//! target (whatever methods they list) and purges the path in each; with Redis that reaches every
//! replica at once (each replica's hot tier as soon as Redis's invalidation message reaches it).

use http::{header, HeaderMap, Method, StatusCode, Uri};

use super::{Cache, PurgeError, RouteCache};

/// Whether a request's method is not known to be safe (RFC 9110 9.2.1): its success invalidates.
pub fn may_invalidate(method: &Method) -> bool {
    !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE)
}

/// Whether a response to `method` with `status` invalidates: the method is not known to be safe
/// and the status is 2xx or 3xx.
pub fn invalidates(method: &Method, status: StatusCode) -> bool {
    may_invalidate(method) && (status.is_success() || status.is_redirection())
}

/// The request targets (`/path?query`) a response invalidates: the request's own, and those
/// of `Location` and `Content-Location` when they are on the request's origin (`host` as the
/// client sent it), relative references resolved against the request's path.
pub fn targets(uri: &Uri, host: Option<&str>, response: &HeaderMap) -> Vec<String> {
    let own = uri.path_and_query().map_or("/", |pq| pq.as_str()).to_string();
    let mut targets = vec![own];
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(reference) = response.get(&name).and_then(|v| v.to_str().ok()) else { continue };
        if let Some(target) = same_origin(reference.trim(), uri.path(), host) {
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
    }
    targets
}

/// A URI reference as a target on the request's origin, or `None` when it is on another one (or
/// is not a reference a backend would send: no scheme-relative or non-HTTP forms).
fn same_origin(reference: &str, base_path: &str, host: Option<&str>) -> Option<String> {
    let reference = reference.split('#').next().unwrap_or_default();
    if reference.is_empty() || reference.starts_with("//") {
        return None;
    }
    if reference.starts_with('/') {
        return reference.parse::<Uri>().ok().map(|_| reference.to_string());
    }
    if let Ok(uri) = reference.parse::<Uri>() {
        if let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) {
            let default = match scheme {
                "http" => ":80",
                "https" => ":443",
                _ => return None,
            };
            let strip = |a: &str| a.to_ascii_lowercase().trim_end_matches(default).to_string();
            let same = host.is_some_and(|host| strip(host) == strip(authority.as_str()));
            return same.then(|| uri.path_and_query().map_or("/", |pq| pq.as_str()).to_string());
        }
    }
    // A relative path (`item/7`, `?page=2`): resolved against the request's directory.
    if reference.contains(':') && !reference.starts_with(['?', '.']) {
        return None;
    }
    let target = match reference.strip_prefix('?') {
        Some(query) => format!("{base_path}?{query}"),
        None => format!("{}{reference}", base_path.rfind('/').map_or("/", |end| &base_path[..=end])),
    };
    target.parse::<Uri>().ok().map(|_| target)
}

impl Cache {
    /// Purge `target` from a route's cache after an unsafe request; whether it was purged.
    pub async fn invalidate(&self, route: &RouteCache, target: &str) -> bool {
        match self.purge_path(route, target).await {
            Ok(()) => {
                route.invalidations.increment(1);
                true
            }
            Err(PurgeError::BadPath(_)) => false,
            Err(e) => {
                tracing::debug!(route = %route.name, error = %e, "invalidation failed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::fields;
    use http::HeaderValue;

    fn targets_of(uri: &str, host: &str, pairs: &[(&str, &str)]) -> Vec<String> {
        targets(&uri.parse().unwrap(), Some(host), &fields(pairs))
    }

    #[test]
    fn unsafe_methods_with_non_error_answers() {
        for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::from_bytes(b"PURGE").unwrap()]
        {
            assert!(invalidates(&method, StatusCode::OK), "{method}");
            assert!(invalidates(&method, StatusCode::SEE_OTHER));
            assert!(!invalidates(&method, StatusCode::NOT_FOUND));
            assert!(!invalidates(&method, StatusCode::BAD_GATEWAY));
        }
        for method in [Method::GET, Method::HEAD, Method::OPTIONS, Method::TRACE] {
            assert!(!invalidates(&method, StatusCode::OK), "{method}");
        }
    }

    #[test]
    fn own_target_and_same_origin_locations() {
        assert_eq!(targets_of("/items/7?x=1", "shop", &[]), ["/items/7?x=1"]);
        let both =
            targets_of("/items", "Shop:80", &[("location", "http://shop/items/8"), ("content-location", "/items/8")]);
        assert_eq!(both, ["/items", "/items/8"], "one target once");
        assert_eq!(targets_of("/a/b", "shop", &[("location", "c?d=1")]), ["/a/b", "/a/c?d=1"], "relative");
        assert_eq!(targets_of("/a/b", "shop", &[("location", "?page=2")]), ["/a/b", "/a/b?page=2"]);
        assert_eq!(targets_of("/a", "shop", &[("location", "https://shop:443/x#frag")]), ["/a", "/x"]);
        let authority_form: Uri = "shop:80".parse().unwrap();
        assert_eq!(authority_form.path(), "");
        let mut created = HeaderMap::new();
        created.insert(header::LOCATION, HeaderValue::from_static("item/7"));
        assert_eq!(targets(&authority_form, Some("shop"), &created), ["/", "/item/7"], "no path to resolve against");
        for other in ["http://evil/x", "//shop/x", "https://shop:8443/x", "ftp://shop/x", "javascript:alert(1)"] {
            assert_eq!(targets_of("/a", "shop", &[("location", other)]), ["/a"], "{other}");
        }
    }
}
