//! The `proxy.toml` shape exactly as written: strings and numbers, no meaning yet.
//!
//! Every table denies unknown fields so a typo is an error, not a silently ignored setting.
//! Durations, rates and addresses stay strings here so that `validate` can report every bad
//! value with its field path instead of stopping at the first.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub admin: RawAdmin,
    pub upstream: Option<RawUpstream>,
    pub redis: Option<RawRedis>,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub cache: RawCacheSettings,
    #[serde(default, rename = "route")]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub telemetry: RawTelemetry,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub trusted_proxies: Option<Vec<String>>,
    pub upgrades: Option<Vec<String>>,
    pub shutdown_grace: Option<String>,
    pub header_read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_header_bytes: Option<i64>,
    pub max_connections: Option<i64>,
    pub workers: Option<i64>,
    pub tls: Option<RawServerTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServerTls {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub url: Option<String>,
    pub connect_timeout: Option<String>,
    pub response_timeout: Option<String>,
    pub ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    pub url: Option<String>,
    pub key_prefix: Option<String>,
    pub op_timeout: Option<String>,
    pub breaker_failures: Option<i64>,
    pub breaker_cooldown: Option<String>,
    pub tls: Option<RawRedisTls>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedisTls {
    pub ca_file: Option<String>,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub insecure_skip_verify: Option<bool>,
}

/// The top-level `[cache]` table (settings of the store, not of a route).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCacheSettings {
    pub memory_max: Option<i64>,
    pub hot_ttl: Option<String>,
    pub lock_timeout: Option<String>,
    pub encryption_key_env: Option<String>,
    pub encryption_key_file: Option<String>,
    pub previous_encryption_key_file: Option<String>,
    pub targeted: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    pub path: String,
    pub trailing_slash: Option<String>,
    pub case_insensitive: Option<bool>,
    pub methods: Option<Vec<String>>,
    pub cache: Option<RawCache>,
    pub rate_limit: Option<RawRateLimit>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    pub ttl: Option<String>,
    pub vary: Option<Vec<String>>,
    pub query: Option<RawQuery>,
    pub stale_while_revalidate: Option<String>,
    pub stale_if_error: Option<String>,
    pub statuses: Option<Vec<i64>>,
    pub max_body: Option<i64>,
    pub respect_origin: Option<bool>,
    pub heuristic: Option<bool>,
    pub request_directives: Option<bool>,
    pub max_variants: Option<i64>,
}

/// `query = "sorted"` or `query = ["page", "limit"]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawQuery {
    Mode(String),
    Keep(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub burst: i64,
    pub rate: String,
    pub key: Option<String>,
    pub on_redis_error: Option<String>,
    pub mode: Option<String>,
}

/// `[telemetry]`: OpenTelemetry traces, when no `OTEL_*` variable says otherwise.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTelemetry {
    pub otlp_endpoint: Option<String>,
    pub service_name: Option<String>,
    pub sample_ratio: Option<f64>,
}
