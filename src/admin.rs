//! The admin listener: `/healthz`, `/readyz`, `/status`, `/metrics`.
//!
//! Readiness never depends on Redis: a Redis outage must not take pods out of the Service. It
//! turns 503 only while the proxy drains for shutdown, so the pod leaves endpoints first.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use serde_json::json;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::Conn;
use crate::respond;
use crate::server::{Handler, ServerState};
use crate::Body;

/// The admin endpoints and what they report on.
pub struct Admin {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    state: Arc<ServerState>,
}

impl Admin {
    /// Build the admin endpoints.
    pub fn new(config: Arc<Config>, metrics: Arc<Metrics>, state: Arc<ServerState>) -> Admin {
        Admin { config, metrics, state }
    }

    /// Answer one admin request.
    pub fn handle(&self, req: &Request<Incoming>) -> Response<Body> {
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
                let mut resp = Response::new(Either::Right(Full::new(Bytes::from(self.metrics.render()))));
                resp.headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
                resp
            }
            _ => respond::text(StatusCode::NOT_FOUND, "not found (try /healthz, /readyz, /status, /metrics)\n"),
        }
    }

    fn status(&self) -> serde_json::Value {
        let c = &self.config;
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
            "store": if c.redis.is_some() { "redis" } else { "embedded" },
            "cache_enabled": c.cache_enabled,
            "rate_limit_enabled": c.rate_limit_enabled,
            "routes": routes,
        })
    }
}

impl Handler for Admin {
    fn call(&self, req: Request<Incoming>, _conn: Conn) -> impl Future<Output = Response<Body>> + Send {
        std::future::ready(self.handle(&req))
    }
}
