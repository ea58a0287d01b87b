//! The route table: routes compiled once, each with everything the request path needs of it;
//! the first route in file order whose methods and pattern match a request wins.

pub mod pattern;

use std::sync::Arc;

use http::Method;

use crate::cache::RouteCache;
use crate::metrics::RouteMetrics;
use crate::ratelimit::Limit;
pub use pattern::{is_normal, normalize, Pattern};

/// A route ready for the request path, compiled once: what it matches, and everything the
/// request path needs of it.
pub struct Route {
    /// Its name: metric label, cache key part, rate-limit policy id.
    pub name: String,
    pattern: Pattern,
    methods: Vec<Method>,
    /// Its cache, when it caches.
    pub cache: Option<Arc<RouteCache>>,
    /// Its rate limit, when it has one.
    pub limit: Option<Arc<Limit>>,
    /// Its request metrics.
    pub metrics: RouteMetrics,
}

impl Route {
    /// Its path pattern as written (`/api/models/*`): OpenTelemetry's `http.route`.
    pub fn template(&self) -> &str {
        self.pattern.as_str()
    }

    /// A route matching `methods` on `pattern`.
    pub fn new(
        name: String,
        pattern: Pattern,
        methods: Vec<Method>,
        cache: Option<Arc<RouteCache>>,
        limit: Option<Arc<Limit>>,
        metrics: RouteMetrics,
    ) -> Route {
        Route { name, pattern, methods, cache, limit, metrics }
    }
}

/// The routes in file order.
#[derive(Default)]
pub struct Routes {
    routes: Vec<Route>,
}

impl Routes {
    /// The table, in file order.
    pub fn new(routes: Vec<Route>) -> Routes {
        Routes { routes }
    }

    /// The first route whose methods and pattern match, and whether the path was already in
    /// normal form (see [`is_normal`]).
    pub fn find(&self, method: &Method, path: &str) -> (Option<&Route>, bool) {
        if self.routes.is_empty() {
            return (None, true);
        }
        let normalized = normalize(path);
        let route = self.routes.iter().find(|r| r.methods.contains(method) && r.pattern.matches(&normalized));
        (route, normalized == path)
    }

    /// The caches of every route whose pattern matches `normal_path` (in normal form, [`is_normal`]),
    /// whatever methods it takes: those an unsafe request to it invalidates (RFC 9111 4.4).
    pub fn caches_covering<'a>(&'a self, normal_path: &'a str) -> impl Iterator<Item = &'a Arc<RouteCache>> + 'a {
        self.routes.iter().filter(move |r| r.pattern.matches(normal_path)).filter_map(|r| r.cache.as_ref())
    }

    /// Whether any route caches.
    pub fn any_cache(&self) -> bool {
        self.routes.iter().any(|r| r.cache.is_some())
    }

    /// The route named `name`.
    pub fn get(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.name == name)
    }

    /// The routes in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }
}
