//! The admin listener: `/healthz`, `/readyz`, `/status`, `/metrics`, `POST /purge`.
//!
//! Readiness never depends on Redis: a Redis outage must not take pods out of the Service. It
//! turns 503 only while the proxy drains for shutdown, so the pod leaves endpoints first.

use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::json;
use tokio::time::Instant;

use crate::body::{self, Body};
use crate::cache::{Cache, PurgeError};
use crate::config::AdminToken;
use crate::metrics::Metrics;
use crate::proxy::Conn;
use crate::ratelimit::RateLimiter;
use crate::reload::Active;
use crate::respond;
use crate::server::Handler;
use crate::store::{CacheStore, RedisStore};

/// Largest `/purge` body accepted.
const PURGE_BODY_MAX: usize = 64 * 1024;
/// How long a `/purge` body may take to arrive.
const PURGE_BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// Facts the admin endpoints report about the running server.
pub struct ServerState {
    /// When the proxy started (for uptime).
    pub started: Instant,
    /// Set when shutdown begins: `/readyz` then answers 503.
    pub draining: AtomicBool,
}

/// The admin endpoints and what they report on.
pub struct Admin {
    active: Arc<ArcSwap<Active>>,
    metrics: Arc<Metrics>,
    state: Arc<ServerState>,
    cache: Option<Arc<Cache>>,
    limiter: Option<Arc<RateLimiter>>,
}

impl Admin {
    /// Build the admin endpoints.
    pub fn new(
        active: Arc<ArcSwap<Active>>,
        metrics: Arc<Metrics>,
        state: Arc<ServerState>,
        cache: Option<Arc<Cache>>,
        limiter: Option<Arc<RateLimiter>>,
    ) -> Admin {
        Admin { active, metrics, state, cache, limiter }
    }

    /// Answer one admin request from `peer`.
    pub async fn handle(&self, req: Request<Incoming>, peer: IpAddr) -> Response<Body> {
        if req.uri().path() == "/purge" {
            if req.method() != Method::POST {
                let mut resp = respond::method_not_allowed("method not allowed\n");
                resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
                return resp;
            }
            let token = self.active.load().config.admin.token.clone();
            if let Some(refused) = refusal(token.as_ref(), peer, req.headers()) {
                return refused;
            }
            return self.purge(req).await;
        }
        let known = matches!(req.uri().path(), "/healthz" | "/readyz" | "/status" | "/metrics");
        if known && !matches!(*req.method(), Method::GET | Method::HEAD) {
            let mut resp = respond::method_not_allowed("method not allowed\n");
            resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return resp;
        }
        match req.uri().path() {
            "/healthz" => respond::text(StatusCode::OK, "ok\n"),
            "/readyz" if self.state.draining.load(Ordering::SeqCst) => {
                respond::text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            }
            "/readyz" => respond::text(StatusCode::OK, "ready\n"),
            "/status" => respond::json(StatusCode::OK, self.status().to_string()),
            "/metrics" => {
                let mut resp = Response::new(body::full(Bytes::from(self.metrics.render())));
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
                resp
            }
            _ => respond::text(StatusCode::NOT_FOUND, "not found (try /healthz, /readyz, /status, /metrics, /purge)\n"),
        }
    }

    /// `POST /purge` with `{"route": "catalog"}` (the whole route) or
    /// `{"route": "catalog", "path": "/api/models?limit=10"}` (one target, every variant).
    async fn purge(&self, req: Request<Incoming>) -> Response<Body> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Purge {
            route: String,
            path: Option<String>,
        }
        let error =
            |status: StatusCode, message: String| respond::json(status, json!({ "error": message }).to_string());
        let Some(cache) = &self.cache else {
            return error(StatusCode::NOT_FOUND, "no route has a cache".into());
        };
        let body = Limited::new(req.into_body(), PURGE_BODY_MAX).collect();
        let body = match tokio::time::timeout(PURGE_BODY_DEADLINE, body).await {
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(_)) => return error(StatusCode::BAD_REQUEST, "body unreadable or over 64 KiB".into()),
            Err(_) => return error(StatusCode::REQUEST_TIMEOUT, "body not received in time".into()),
        };
        let purge: Purge = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => {
                return error(StatusCode::BAD_REQUEST, format!("expected {{\"route\": \"…\", \"path\": \"…\"}}: {e}"))
            }
        };
        let active = self.active.load_full();
        let result = match (active.routes.get(&purge.route).and_then(|r| r.cache.as_deref()), &purge.path) {
            (None, _) => Err(PurgeError::UnknownRoute(purge.route.clone())),
            (Some(route), None) => cache
                .purge_route(route)
                .await
                .map(|g| json!({ "purged": "route", "route": purge.route, "generation": g })),
            (Some(route), Some(path)) => cache
                .purge_path(route, path)
                .await
                .map(|()| json!({ "purged": "path", "route": purge.route, "path": path })),
        };
        match result {
            Ok(done) => {
                tracing::info!(route = %purge.route, path = purge.path.as_deref().unwrap_or("*"), "cache purged");
                respond::json(StatusCode::OK, done.to_string())
            }
            Err(e @ PurgeError::UnknownRoute(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
            Err(e @ PurgeError::BadPath(_)) => error(StatusCode::BAD_REQUEST, e.to_string()),
            Err(e @ PurgeError::Store(_)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        }
    }

    fn status(&self) -> serde_json::Value {
        let active = self.active.load();
        let c = &active.config;
        let key_id = self.cache.as_ref().and_then(|c| c.seal_key_id());
        let routes: Vec<_> = c
            .routes
            .iter()
            .map(|r| {
                json!({
                    "name": r.name,
                    "path": r.pattern.as_str(),
                    "methods": r.methods.iter().map(Method::as_str).collect::<Vec<_>>(),
                    "cache": r.cache.is_some(),
                    "rate_limit": r.rate_limit.is_some(),
                })
            })
            .collect();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.state.started.elapsed().as_secs(),
            "draining": self.state.draining.load(Ordering::SeqCst),
            "listen": c.server.listen.to_string(),
            "tls": c.server.tls.is_some(),
            "upstream": c.upstream.url.to_string(),
            "cache_store": match self.cache.as_ref().map(|c| c.store()) {
                Some(CacheStore::Redis(_)) => "redis",
                Some(CacheStore::Memory(_)) => "embedded",
                None => "none",
            },
            "redis": redis_status(match self.cache.as_ref().map(|c| c.store()) {
                Some(CacheStore::Redis(r)) => Some(r),
                _ => None,
            }),
            "ratelimit_store": match &self.limiter {
                Some(l) if l.redis().is_some() => "redis",
                Some(_) => "local",
                None => "none",
            },
            "ratelimit_redis": redis_status(self.limiter.as_ref().and_then(|l| l.redis())),
            "cache_encryption": { "enabled": key_id.is_some(), "key_id": key_id },
            "cache_enabled": c.cache_enabled,
            "rate_limit_enabled": c.rate_limit_enabled,
            "routes": routes,
            "config": {
                "hash": c.hash,
                "loaded": humantime::format_rfc3339_seconds(active.loaded).to_string(),
                "restart_required": active.restart_required,
            },
        })
    }
}

fn redis_status(redis: Option<&RedisStore>) -> serde_json::Value {
    match redis {
        Some(r) => {
            let topology = r.topology();
            json!({
                "state": r.state().as_str(),
                "connected": r.connected(),
                "mode": topology.mode,
                "tls": topology.tls,
                "nodes": topology.nodes,
                "connected_nodes": topology.connected_nodes,
            })
        }
        None => serde_json::Value::Null,
    }
}

/// The answer to a request that may not change state, if it may not: with a token configured, it
/// must carry it (`Authorization: Bearer …`); without one, it must come from loopback
/// (`kubectl port-forward` arrives so), never from another pod.
fn refusal(token: Option<&AdminToken>, peer: IpAddr, headers: &HeaderMap) -> Option<Response<Body>> {
    let Some(token) = token else {
        let loopback = match peer {
            IpAddr::V4(v4) => v4.is_loopback(),
            IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        };
        return (!loopback).then(|| {
            respond::text(
                StatusCode::FORBIDDEN,
                "state-changing admin endpoints answer only on loopback unless SIDECACHE_ADMIN_TOKEN is set\n",
            )
        });
    };
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .filter(|t| token.matches(t));
    if presented.is_some() {
        return None;
    }
    let mut refused = respond::text(StatusCode::UNAUTHORIZED, "a bearer token (SIDECACHE_ADMIN_TOKEN) is required\n");
    refused.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"sidecache\""));
    Some(refused)
}

impl Handler for Admin {
    fn call(&self, req: Request<Incoming>, conn: Conn) -> impl Future<Output = Response<Body>> + Send {
        self.handle(req, conn.peer.ip())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::Config;

    fn token(value: &str) -> AdminToken {
        let env = HashMap::from([("SIDECACHE_ADMIN_TOKEN".to_string(), value.to_string())]);
        let config = Config::from_sources("[upstream]\nurl = \"http://127.0.0.1:1\"\n", &env).unwrap();
        config.admin.token.unwrap()
    }

    fn bearer(value: &str) -> HeaderMap {
        HeaderMap::from_iter([(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap())])
    }

    #[test]
    fn state_changes_need_the_token_or_loopback() {
        let (pod, local) = ("10.1.2.3".parse().unwrap(), "127.0.0.1".parse().unwrap());
        let status = |r: Option<Response<Body>>| r.map_or(Ok(()), |e| Err(e.status().as_u16()));
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        // No token: loopback only.
        assert_eq!(status(refusal(None, local, &HeaderMap::new())), Ok(()));
        assert_eq!(status(refusal(None, mapped, &HeaderMap::new())), Ok(()));
        assert_eq!(status(refusal(None, "::1".parse().unwrap(), &HeaderMap::new())), Ok(()));
        assert_eq!(status(refusal(None, pod, &bearer("Bearer anything-at-all-here"))), Err(403));
        // A token: whoever brings it, and nobody else, loopback included.
        let t = token("0123456789abcdef0123");
        assert_eq!(status(refusal(Some(&t), pod, &bearer("Bearer 0123456789abcdef0123"))), Ok(()));
        assert_eq!(status(refusal(Some(&t), local, &HeaderMap::new())), Err(401));
        for wrong in [
            "Bearer 0123456789abcdef012",
            "Bearer 0123456789abcdef01234",
            "bearer 0123456789abcdef0123",
            "0123456789abcdef0123",
        ] {
            assert_eq!(status(refusal(Some(&t), pod, &bearer(wrong))), Err(401), "{wrong}");
        }
        assert!(!format!("{t:?}").contains("0123"), "the token is never printed");
    }
}
