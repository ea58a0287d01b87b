//! Every metric name as a constant, described once, and small typed recorders for the hot path.
//!
//! Each running proxy owns its own Prometheus recorder instead of installing a global one: the
//! handles are registered once at start-up (the request path only does atomic adds) and several
//! proxies can run in one test process without sharing counters. Labels are bounded: route names
//! from the config, status classes and error kinds from enums; never a raw path or client address.

use std::sync::Arc;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

/// `sidecache_requests_total{route,status_class}`: answered requests.
pub const REQUESTS_TOTAL: &str = "sidecache_requests_total";
/// `sidecache_request_duration_seconds{route}`: time to the response head.
pub const REQUEST_DURATION: &str = "sidecache_request_duration_seconds";
/// `sidecache_upstream_duration_seconds`: upstream time to the response head.
pub const UPSTREAM_DURATION: &str = "sidecache_upstream_duration_seconds";
/// `sidecache_upstream_errors_total{kind}`: failed upstream exchanges.
pub const UPSTREAM_ERRORS_TOTAL: &str = "sidecache_upstream_errors_total";
/// `sidecache_inflight_requests`: requests between request head in and response head out.
pub const INFLIGHT_REQUESTS: &str = "sidecache_inflight_requests";

/// `sidecache_redis_up{client}`: 1 while Redis is connected and the breaker is closed.
pub const REDIS_UP: &str = "sidecache_redis_up";
/// `sidecache_redis_info{client,mode,tls}`: 1, naming the topology (`standalone`, `sentinel`,
/// `cluster`) and whether TLS is used.
pub const REDIS_INFO: &str = "sidecache_redis_info";
/// `sidecache_redis_nodes{client}`: servers requests go to (a cluster's primaries).
pub const REDIS_NODES: &str = "sidecache_redis_nodes";
/// `sidecache_redis_connected_nodes{client}`: servers with an open connection.
pub const REDIS_CONNECTED_NODES: &str = "sidecache_redis_connected_nodes";
/// `sidecache_redis_op_duration_seconds{client,op}`: latency of operations actually sent.
pub const REDIS_OP_DURATION: &str = "sidecache_redis_op_duration_seconds";
/// `sidecache_redis_errors_total{client,op,kind}`: operations that produced no value, by why.
pub const REDIS_ERRORS_TOTAL: &str = "sidecache_redis_errors_total";

/// `sidecache_redis_tracking_up{client,node}`: 1 while the invalidation link to this primary tracks.
pub const REDIS_TRACKING_UP: &str = "sidecache_redis_tracking_up";
/// `sidecache_hot_tier_invalidations_total`: key invalidations received from Redis.
pub const HOT_TIER_INVALIDATIONS_TOTAL: &str = "sidecache_hot_tier_invalidations_total";
/// `sidecache_hot_tier_flushes_total{reason}`: times the whole hot tier was dropped (link_lost,
/// flushall, topology).
pub const HOT_TIER_FLUSHES_TOTAL: &str = "sidecache_hot_tier_flushes_total";
/// `sidecache_hot_tier_entries`: entries the hot tier holds.
pub const HOT_TIER_ENTRIES: &str = "sidecache_hot_tier_entries";
/// `sidecache_hot_tier_bytes`: bytes the hot tier holds (bounded by `cache.memory_max`).
pub const HOT_TIER_BYTES: &str = "sidecache_hot_tier_bytes";

/// `sidecache_cache_lookups_total{route,result}`: hit, miss, stale, bypass, error.
pub const CACHE_LOOKUPS_TOTAL: &str = "sidecache_cache_lookups_total";
/// `sidecache_cache_stores_total{route,result}`: stored, not_storable, too_large, dropped, error.
pub const CACHE_STORES_TOTAL: &str = "sidecache_cache_stores_total";

/// `sidecache_cache_unreadable_total{route,reason}`: entries read from the store that could not
/// be used (unknown_key, tampered, unsealed, undecodable): misses, deleted.
pub const CACHE_UNREADABLE_TOTAL: &str = "sidecache_cache_unreadable_total";

/// `sidecache_cache_resealed_total{route}`: entries opened with the previous encryption key and
/// sealed again with the current one.
pub const CACHE_RESEALED_TOTAL: &str = "sidecache_cache_resealed_total";

/// `sidecache_cache_invalidations_total{route}`: targets purged because an unsafe request to a
/// path the route covers succeeded (RFC 9111 4.4).
pub const CACHE_INVALIDATIONS_TOTAL: &str = "sidecache_cache_invalidations_total";

/// `sidecache_ratelimit_checks_total{route,result,backend}`: allowed/limited by redis or local,
/// error by allow_all (the shared limiter failed and the route fails open).
pub const RATELIMIT_CHECKS_TOTAL: &str = "sidecache_ratelimit_checks_total";
/// `sidecache_ratelimit_check_duration_seconds{backend}`: time a request spent being checked.
pub const RATELIMIT_CHECK_DURATION: &str = "sidecache_ratelimit_check_duration_seconds";

/// `sidecache_config_reloads_total{result}`: reloads of `proxy.toml` by result (applied,
/// unchanged, invalid).
pub const CONFIG_RELOADS_TOTAL: &str = "sidecache_config_reloads_total";
/// `sidecache_config_info{hash}`: 1 for the configuration in force (the hash of its text), 0 for
/// those it replaced.
pub const CONFIG_INFO: &str = "sidecache_config_info";
/// `sidecache_config_last_reload_successful`: 0 while the newest configuration text was refused.
pub const CONFIG_LAST_RELOAD_SUCCESSFUL: &str = "sidecache_config_last_reload_successful";
/// `sidecache_config_restart_required`: 1 while a loaded configuration changed settings that only
/// a restart applies.
pub const CONFIG_RESTART_REQUIRED: &str = "sidecache_config_restart_required";

/// The `route` label of requests no route matched.
pub const NO_ROUTE: &str = "-";

/// Latency buckets (seconds): sub-millisecond cache hits up to the 30 s default response timeout.
const LATENCY_BUCKETS: [f64; 16] =
    [0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// How a failed upstream exchange failed; also the `kind` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// Connection refused, reset or unreachable.
    Connect,
    /// `connect_timeout` ran out.
    ConnectTimeout,
    /// `response_timeout` ran out.
    Timeout,
    /// The backend broke the exchange (closed, malformed response).
    Protocol,
}

impl UpstreamErrorKind {
    const ALL: [UpstreamErrorKind; 4] = [Self::Connect, Self::ConnectTimeout, Self::Timeout, Self::Protocol];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::ConnectTimeout => "connect_timeout",
            Self::Timeout => "timeout",
            Self::Protocol => "protocol",
        }
    }
}

/// One route's request handles (or those of unmatched requests, route `-`).
#[derive(Clone)]
pub struct RouteMetrics {
    requests_by_class: [Counter; 5],
    duration: Histogram,
}

impl RouteMetrics {
    /// Count one answered request.
    pub fn request(&self, status: http::StatusCode, elapsed: Duration) {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize - 1;
        self.requests_by_class[class].increment(1);
        self.duration.record(elapsed.as_secs_f64());
    }
}

/// The proxy's metrics: pre-registered handles plus the renderer for `/metrics`.
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    upstream_duration: Histogram,
    upstream_errors: [Counter; 4],
    inflight: Gauge,
}

impl Metrics {
    /// Describe every metric and register the process-wide handles.
    pub fn new() -> Metrics {
        let recorder =
            PrometheusBuilder::new().set_buckets(&LATENCY_BUCKETS).expect("bucket list is non-empty").build_recorder();
        let handle = recorder.handle();
        let recorder = Arc::new(recorder);
        describe(&recorder);
        let reg = Registrar(&recorder);
        Metrics {
            upstream_duration: reg.histogram(UPSTREAM_DURATION, &[]),
            upstream_errors: UpstreamErrorKind::ALL
                .map(|k| reg.counter(UPSTREAM_ERRORS_TOTAL, &[("kind", k.as_str())])),
            inflight: reg.gauge(INFLIGHT_REQUESTS, &[]),
            recorder,
            handle,
        }
    }

    /// The request handles of a route ([`NO_ROUTE`] for requests no route matched).
    pub fn route(&self, route: &str) -> RouteMetrics {
        let reg = self.registrar();
        RouteMetrics {
            requests_by_class: ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .map(|class| reg.counter(REQUESTS_TOTAL, &[("route", route), ("status_class", class)])),
            duration: reg.histogram(REQUEST_DURATION, &[("route", route)]),
        }
    }

    /// Record the upstream's time to the response head.
    pub fn upstream(&self, elapsed: Duration) {
        self.upstream_duration.record(elapsed.as_secs_f64());
    }

    /// Count one failed upstream exchange.
    pub fn upstream_error(&self, kind: UpstreamErrorKind) {
        self.upstream_errors[kind as usize].increment(1);
    }

    /// Mark a request in flight until the guard drops.
    pub fn inflight(&self) -> InflightGuard {
        self.inflight.increment(1.0);
        InflightGuard(self.inflight.clone())
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.handle.render()
    }

    /// Drain histogram samples into their buckets. Without this, samples recorded between scrapes
    /// accumulate without bound, so the server runs it periodically.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    /// A registrar for modules that add their own metrics.
    pub fn registrar(&self) -> Registrar<'_> {
        Registrar(&self.recorder)
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

/// Decrements `inflight_requests` on drop, so every exit path of a request counts.
pub struct InflightGuard(Gauge);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Registers handles on one proxy's recorder.
pub struct Registrar<'a>(&'a PrometheusRecorder);

impl Registrar<'_> {
    fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
        let labels: Vec<Label> = labels.iter().map(|(k, v)| Label::new(*k, v.to_string())).collect();
        Key::from_parts(name, labels)
    }

    /// A counter with these labels.
    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.0.register_counter(&Self::key(name, labels), &METADATA)
    }

    /// A gauge with these labels.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.0.register_gauge(&Self::key(name, labels), &METADATA)
    }

    /// A histogram with these labels.
    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.0.register_histogram(&Self::key(name, labels), &METADATA)
    }
}

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

fn describe(r: &PrometheusRecorder) {
    let text = |s: &'static str| SharedString::const_str(s);
    r.describe_counter(
        KeyName::from_const_str(REQUESTS_TOTAL),
        None,
        text("Requests answered, by route and status class."),
    );
    r.describe_histogram(
        KeyName::from_const_str(REQUEST_DURATION),
        Some(Unit::Seconds),
        text("Time from request head to response head, by route."),
    );
    r.describe_histogram(
        KeyName::from_const_str(UPSTREAM_DURATION),
        Some(Unit::Seconds),
        text("Upstream time from sending the request to the response head."),
    );
    r.describe_counter(
        KeyName::from_const_str(UPSTREAM_ERRORS_TOTAL),
        None,
        text("Upstream exchanges that failed, by kind (connect, connect_timeout, timeout, protocol)."),
    );
    r.describe_gauge(KeyName::from_const_str(INFLIGHT_REQUESTS), None, text("Requests being handled now."));
    r.describe_counter(
        KeyName::from_const_str(CACHE_UNREADABLE_TOTAL),
        None,
        text("Entries read from the store that could not be used, by route and reason (unknown_key, tampered, unsealed, undecodable): answered as misses and deleted."),
    );
    r.describe_counter(
        KeyName::from_const_str(CACHE_RESEALED_TOTAL),
        None,
        text("Entries opened with the previous encryption key and sealed again with the current one, by route."),
    );
    r.describe_counter(
        KeyName::from_const_str(CACHE_INVALIDATIONS_TOTAL),
        None,
        text("Request targets purged from a route's cache because an unsafe request (POST, PUT, DELETE, ...) to them succeeded, by route."),
    );
    r.describe_gauge(
        KeyName::from_const_str(REDIS_TRACKING_UP),
        None,
        text("1 while the invalidation link (CLIENT TRACKING) to this Redis primary tracks the cache's keys."),
    );
    r.describe_counter(
        KeyName::from_const_str(HOT_TIER_INVALIDATIONS_TOTAL),
        None,
        text("Key invalidations received from Redis by the in-process hot tier."),
    );
    r.describe_counter(
        KeyName::from_const_str(HOT_TIER_FLUSHES_TOTAL),
        None,
        text("Times the whole in-process hot tier was dropped, by reason (link_lost, flushall, topology)."),
    );
    r.describe_gauge(KeyName::from_const_str(HOT_TIER_ENTRIES), None, text("Entries held by the in-process hot tier."));
    r.describe_gauge(
        KeyName::from_const_str(HOT_TIER_BYTES),
        Some(Unit::Bytes),
        text("Bytes held by the in-process hot tier (bounded by cache.memory_max)."),
    );
    r.describe_counter(
        KeyName::from_const_str(CONFIG_RELOADS_TOTAL),
        None,
        text("Reloads of the configuration file by result (applied, unchanged, invalid)."),
    );
    r.describe_gauge(
        KeyName::from_const_str(CONFIG_INFO),
        None,
        text("1 for the configuration in force, by the hash of its text; 0 for those it replaced."),
    );
    r.describe_gauge(
        KeyName::from_const_str(CONFIG_LAST_RELOAD_SUCCESSFUL),
        None,
        text("0 while the newest configuration text is refused and the previous one keeps running."),
    );
    r.describe_gauge(
        KeyName::from_const_str(CONFIG_RESTART_REQUIRED),
        None,
        text("1 while the loaded configuration changed settings that only a restart applies."),
    );
    r.describe_counter(
        KeyName::from_const_str(CACHE_LOOKUPS_TOTAL),
        None,
        text("Cache lookups by route and result (hit, collapsed, revalidated, stale, stale_if_error, miss, error, bypass)."),
    );
    r.describe_counter(
        KeyName::from_const_str(CACHE_STORES_TOTAL),
        None,
        text("Responses offered to the cache by route and result (stored, not_storable, too_large, incomplete, dropped, too_many_variants, error)."),
    );
    r.describe_counter(
        KeyName::from_const_str(RATELIMIT_CHECKS_TOTAL),
        None,
        text("Rate-limit checks by route, result (allowed, limited, would_limit, error) and backend (redis, lease, local, allow_all, deny)."),
    );
    r.describe_histogram(
        KeyName::from_const_str(RATELIMIT_CHECK_DURATION),
        Some(Unit::Seconds),
        text("Time a request spent in its rate-limit check, by the backend that decided."),
    );
    r.describe_gauge(
        KeyName::from_const_str(REDIS_UP),
        None,
        text("1 while Redis is connected and the breaker is closed, by client (cache, ratelimit)."),
    );
    r.describe_gauge(
        KeyName::from_const_str(REDIS_INFO),
        None,
        text("1, with the Redis topology (mode: standalone, sentinel, cluster) and whether TLS is used, by client."),
    );
    r.describe_gauge(
        KeyName::from_const_str(REDIS_NODES),
        None,
        text("Redis servers requests go to: a cluster's primaries, Sentinel's current master, or the one server."),
    );
    r.describe_gauge(
        KeyName::from_const_str(REDIS_CONNECTED_NODES),
        None,
        text("Redis servers with an open connection, by client."),
    );
    r.describe_histogram(
        KeyName::from_const_str(REDIS_OP_DURATION),
        Some(Unit::Seconds),
        text("Latency of Redis operations actually sent, by client and op."),
    );
    r.describe_counter(
        KeyName::from_const_str(REDIS_ERRORS_TOTAL),
        None,
        text("Redis operations that produced no value, by client, op and kind (breaker_open, not_connected, saturated, timeout, error)."),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_series_with_labels() {
        let m = Metrics::new();
        m.route("catalog").request(http::StatusCode::OK, Duration::from_millis(3));
        m.route(NO_ROUTE).request(http::StatusCode::BAD_GATEWAY, Duration::from_millis(1));
        m.upstream_error(UpstreamErrorKind::Timeout);
        {
            let _g = m.inflight();
        }
        m.upkeep();
        let text = m.render();
        assert!(text.contains(r#"sidecache_requests_total{route="catalog",status_class="2xx"} 1"#), "{text}");
        assert!(text.contains(r#"sidecache_requests_total{route="-",status_class="5xx"} 1"#), "{text}");
        assert!(text.contains(r#"sidecache_upstream_errors_total{kind="timeout"} 1"#), "{text}");
        assert!(text.contains(r#"sidecache_request_duration_seconds_bucket{route="catalog",le="0.005"} 1"#), "{text}");
        assert!(text.contains("sidecache_inflight_requests 0"), "{text}");
        assert!(text.contains("# HELP sidecache_requests_total"), "{text}");
    }
}
