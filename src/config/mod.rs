//! `proxy.toml` + environment overrides → one validated, typed [`Config`], or every problem
//! with the field it belongs to.
//!
//! The sources are injected (`Config::from_sources(text, env)`) so tests never touch the process
//! environment. Validation runs once at start-up; the rest of the proxy only sees typed values
//! (`Duration`, `SocketAddr`, compiled route patterns, enums).

mod encryption;
mod raw;
mod redis_url;
mod telemetry;
mod units;
mod validate;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode, Uri};
use ipnet::IpNet;
use sha2::Digest;

use crate::route::pattern::Pattern;
pub use encryption::{EncryptionConfig, SealKey, KEY_LEN};
use raw::RawConfig;
pub use redis_url::{RedisNode, RedisTopology};
pub use telemetry::TelemetryConfig;
pub use units::Rate;
use validate::Validator;

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The proxy listener.
    pub server: ServerConfig,
    /// The admin listener (health, status, metrics).
    pub admin: AdminConfig,
    /// The one backend every request is forwarded to.
    pub upstream: UpstreamConfig,
    /// Shared Redis; `None` means the embedded in-memory store.
    pub redis: Option<RedisConfig>,
    /// Logging format and level.
    pub log: LogConfig,
    /// Routes in file order; the first match wins.
    pub routes: Vec<RouteConfig>,
    /// `SIDECACHE_CACHE_ENABLED=false` turns every cache table off.
    pub cache_enabled: bool,
    /// Bytes the in-process cache may hold: the embedded store, or the hot tier in front of
    /// Redis (`[cache] memory_max`).
    pub cache_memory_max: u64,
    /// How long a fresh entry read from Redis is also kept in process (`[cache] hot_ttl`).
    pub cache_hot_ttl: Duration,
    /// How long a request waits for another request's fetch of the same key before it forwards
    /// on its own (`[cache] lock_timeout`).
    pub cache_lock_timeout: Duration,
    /// `SIDECACHE_RATE_LIMIT_ENABLED=false` turns every rate limit off.
    pub rate_limit_enabled: bool,
    /// The keys entries in Redis are sealed with (`[cache] encryption_key_env` or
    /// `encryption_key_file`); `None`: stored as they are.
    pub cache_encryption: Option<EncryptionConfig>,
    /// The first 16 hex digits of the SHA-256 of the configuration text
    /// (`sha256sum proxy.toml | cut -c1-16`): which configuration is loaded.
    pub hash: String,
    /// OpenTelemetry traces; `None` (the default) when off.
    pub telemetry: Option<TelemetryConfig>,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Address of the proxy listener.
    pub listen: SocketAddr,
    /// Peers whose `X-Forwarded-*` headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// Protocols an HTTP/1.1 `Upgrade` may switch to, lower case (default `websocket`); a
    /// request offering any other is forwarded as a plain request, without the upgrade.
    pub upgrades: Vec<String>,
    /// How long in-flight requests may run after SIGTERM.
    pub shutdown_grace: Duration,
    /// A connection has this long from its start, and an HTTP/1 request from its first byte, to
    /// send a complete request head; then it is closed.
    pub header_read_timeout: Duration,
    /// A connection with no request in progress (and no upgraded tunnel) is closed after this.
    pub idle_timeout: Duration,
    /// Largest request head (request line + headers) accepted; larger gets 431.
    pub max_header_bytes: usize,
    /// Open client connections at most; further connections wait in the accept queue.
    pub max_connections: usize,
    /// Proxy worker threads, each with its own event loop and upstream pool.
    pub workers: usize,
    /// Serve HTTPS with these PEM files instead of plain HTTP.
    pub tls: Option<TlsFiles>,
}

/// PEM certificate chain and private key.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// `[admin]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    /// Address of the admin listener.
    pub listen: SocketAddr,
    /// `SIDECACHE_ADMIN_TOKEN`: the bearer token endpoints that change state require; without
    /// one, they answer only on loopback.
    pub token: Option<AdminToken>,
}

/// The admin bearer token; its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(String);

impl AdminToken {
    /// Whether `presented` is the token, in time that does not depend on where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let (a, b) = (sha2::Sha256::digest(self.0.as_bytes()), sha2::Sha256::digest(presented));
        a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(…)")
    }
}

/// `[upstream]`.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Scheme and authority of the backend (no path).
    pub url: Uri,
    /// Budget for the TCP connect.
    pub connect_timeout: Duration,
    /// Budget from sending the request to receiving the response head.
    pub response_timeout: Duration,
    /// Extra PEM CA certificates trusted for an `https://` upstream (beside the public roots).
    pub ca_file: Option<PathBuf>,
}

/// `[redis]` with a URL.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    /// The URL with its password masked, for logs and `/status`.
    pub url: String,
    /// Standalone, Sentinel or Cluster, and where.
    pub topology: RedisTopology,
    /// ACL user name: `SIDECACHE_REDIS_USERNAME`, else the URL's.
    pub username: Option<String>,
    /// Password: `SIDECACHE_REDIS_PASSWORD`, else the URL's.
    pub password: Option<String>,
    /// Sentinel's own credentials (`SIDECACHE_REDIS_SENTINEL_USERNAME` / `_PASSWORD`); none by
    /// default, since Sentinels commonly run without `requirepass`.
    pub sentinel_username: Option<String>,
    /// See `sentinel_username`.
    pub sentinel_password: Option<String>,
    /// The database to `SELECT`.
    pub database: Option<u8>,
    /// TLS settings when the URL is `rediss*://`.
    pub tls: Option<RedisTls>,
    /// Prefix of every key sidecache writes.
    pub key_prefix: String,
    /// Time budget of one Redis operation.
    pub op_timeout: Duration,
    /// Consecutive failures that open the breaker.
    pub breaker_failures: NonZeroU32,
    /// How long the breaker stays open before a probe.
    pub breaker_cooldown: Duration,
}

/// `[redis.tls]`, for `rediss*://` URLs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RedisTls {
    /// PEM CA certificates to trust instead of the system roots (a private CA).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for servers that require client certificates (mTLS).
    pub client_cert: Option<TlsFiles>,
    /// Accept any server certificate. Only for trials: logged loudly at start-up.
    pub insecure_skip_verify: bool,
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// `tracing` filter directive (`RUST_LOG` wins when set).
    pub level: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line.
    Json,
    /// Human-readable lines.
    Pretty,
}

/// One `[[route]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    /// Unique name, used in metrics labels and cache keys.
    pub name: String,
    /// Compiled path pattern.
    pub pattern: Pattern,
    /// Methods this route applies to.
    pub methods: Vec<Method>,
    /// Response caching, if configured (and not switched off).
    pub cache: Option<CacheConfig>,
    /// Rate limit, if configured (and not switched off).
    pub rate_limit: Option<RateLimitConfig>,
}

/// A route's `cache` table.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheConfig {
    /// Lifetime when the origin gives none, cap when it gives one.
    pub ttl: Option<Duration>,
    /// Request headers that are part of the key (lower case).
    pub vary: Vec<HeaderName>,
    /// How the query string enters the key.
    pub query: QueryMode,
    /// Serve stale this long after expiry while refreshing in the background: the default
    /// and the cap of the origin's `stale-while-revalidate`; `None`: the origin's alone.
    pub stale_while_revalidate: Option<Duration>,
    /// Serve stale this long after expiry when the upstream fails: the default and the cap of
    /// the origin's `stale-if-error`; `None`: the origin's alone.
    pub stale_if_error: Option<Duration>,
    /// Cacheable statuses.
    pub statuses: Vec<StatusCode>,
    /// Largest body stored; larger bodies stream through uncached.
    pub max_body: usize,
    /// Whether origin freshness headers count (`no-store`/`private` always do).
    pub respect_origin: bool,
    /// Whether a response without explicit freshness gets a tenth of its time since
    /// `Last-Modified` (RFC 9111 4.2.2).
    pub heuristic: bool,
    /// Whether clients' `Cache-Control` request directives count (RFC 9111 5.2.1).
    pub request_directives: bool,
    /// Variants (hosts, `vary` values, the values of fields the origin's `Vary` names) one path
    /// keeps at most.
    pub max_variants: usize,
    /// Targeted cache-control fields (RFC 9213) that replace `Cache-Control`, first valid one
    /// wins: `[cache] targeted`, the same for every route.
    pub targeted: Vec<HeaderName>,
}

impl Default for CacheConfig {
    /// A `cache = {}` table's settings (with the default `[cache] targeted`).
    fn default() -> CacheConfig {
        CacheConfig {
            ttl: None,
            vary: Vec::new(),
            query: QueryMode::Sorted,
            stale_while_revalidate: None,
            stale_if_error: None,
            statuses: vec![StatusCode::OK],
            max_body: DEFAULT_MAX_BODY,
            respect_origin: true,
            heuristic: false,
            request_directives: false,
            max_variants: DEFAULT_MAX_VARIANTS,
            targeted: vec![SIDECACHE_CACHE_CONTROL],
        }
    }
}

/// The targeted cache-control field (RFC 9213) this cache reads by default.
pub const SIDECACHE_CACHE_CONTROL: HeaderName = HeaderName::from_static("sidecache-cache-control");
/// Variants one path keeps at most, by default.
pub const DEFAULT_MAX_VARIANTS: usize = 64;

/// How a route's cache key treats the query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryMode {
    /// As sent.
    Keep,
    /// Parameters sorted, so `?b=1&a=2` and `?a=2&b=1` share an entry.
    Sorted,
    /// Dropped from the key.
    Ignore,
    /// Only these parameters, sorted.
    Only(Vec<String>),
}

/// A route's `rate_limit` table.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    /// Bucket capacity.
    pub burst: NonZeroU32,
    /// Refill rate.
    pub rate: Rate,
    /// Whose bucket a request takes from.
    pub key: ClientKey,
    /// What happens when the shared limiter cannot answer.
    pub on_redis_error: OnRedisError,
    /// Enforce the limit, or only count what it would limit.
    pub mode: LimitMode,
}

/// Whether a limit acts on requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitMode {
    /// Answer 429 when the bucket is empty.
    Enforce,
    /// Limit nothing and tell the client nothing; count what would have been limited.
    Shadow,
}

/// Which bucket a request belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientKey {
    /// The client address (through trusted proxies).
    Ip,
    /// A request header's value, falling back to the ip.
    Header(HeaderName),
    /// One bucket for the whole route.
    Route,
}

/// Rate-limit behaviour when Redis fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnRedisError {
    /// Fail open.
    Allow,
    /// Use an in-process bucket with the same parameters.
    Local,
    /// Fail closed: 503 while the shared limiter cannot answer.
    Deny,
}

/// Every problem found in a configuration, each naming its field.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.lines())]
pub struct ConfigErrors(pub Vec<FieldError>);

impl ConfigErrors {
    fn lines(&self) -> String {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        lines.join("\n")
    }
}

/// One problem: the field path (`route[2].cache.ttl`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Dotted path of the field, or the environment variable.
    pub field: String,
    /// Why the value is rejected.
    pub message: String,
}

const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
const DEFAULT_ADMIN_LISTEN: &str = "0.0.0.0:9090";
const DEFAULT_MAX_BODY: usize = 1024 * 1024;

impl Config {
    /// Parse and validate `proxy.toml` text with the given environment overrides.
    pub fn from_sources(text: &str, env: &HashMap<String, String>) -> Result<Config, ConfigErrors> {
        let raw = parse_toml(text).map_err(|e| ConfigErrors(vec![e]))?;
        let mut v = Validator::default();
        let config = v.config(raw, env);
        match (config, v.errors.is_empty()) {
            (Some(mut config), true) => {
                config.hash = text_hash(text);
                Ok(config)
            }
            _ => Err(ConfigErrors(v.errors)),
        }
    }

    /// Read the file and validate it against the process environment.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigErrors> {
        Config::from_sources(&Config::read(path)?, &std::env::vars().collect())
    }

    /// The file's text, or the error naming it.
    pub fn read(path: &std::path::Path) -> Result<String, ConfigErrors> {
        std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![FieldError { field: path.display().to_string(), message: format!("cannot read: {e}") }])
        })
    }

    /// Give the settings that only a restart applies (listeners, workers, connection limits, the
    /// upstream, Redis, the log format, the process-wide cache sizes) the values of `running`,
    /// and name those that differed.
    pub fn keep_restart_only(&mut self, running: &Config) -> Vec<&'static str> {
        // Every field is named: one added to `Config` must be declared reloadable (`_`) or not.
        let Config {
            server:
                ServerConfig {
                    listen,
                    trusted_proxies: _,
                    upgrades: _,
                    shutdown_grace,
                    header_read_timeout,
                    idle_timeout,
                    max_header_bytes,
                    max_connections,
                    workers,
                    tls,
                },
            // From the environment, which does not change while the process runs.
            admin: AdminConfig { listen: admin_listen, token: _ },
            upstream,
            redis,
            log: LogConfig { format, level: _ },
            routes: _,
            // From the environment, which does not change while the process runs.
            cache_enabled: _,
            rate_limit_enabled: _,
            cache_memory_max,
            cache_hot_ttl,
            cache_lock_timeout,
            cache_encryption,
            telemetry,
            hash: _,
        } = running;
        let mut changed = Vec::new();
        macro_rules! keep {
            ($($name:literal: $field:expr => $running:expr;)*) => {$(
                if $field != *$running {
                    changed.push($name);
                    $field = $running.clone();
                }
            )*};
        }
        keep! {
            "server.listen": self.server.listen => listen;
            "server.tls": self.server.tls => tls;
            "server.shutdown_grace": self.server.shutdown_grace => shutdown_grace;
            "server.header_read_timeout": self.server.header_read_timeout => header_read_timeout;
            "server.idle_timeout": self.server.idle_timeout => idle_timeout;
            "server.max_header_bytes": self.server.max_header_bytes => max_header_bytes;
            "server.max_connections": self.server.max_connections => max_connections;
            "server.workers": self.server.workers => workers;
            "admin.listen": self.admin.listen => admin_listen;
            "upstream": self.upstream => upstream;
            "redis": self.redis => redis;
            "log.format": self.log.format => format;
            "cache.memory_max": self.cache_memory_max => cache_memory_max;
            "cache.hot_ttl": self.cache_hot_ttl => cache_hot_ttl;
            "cache.lock_timeout": self.cache_lock_timeout => cache_lock_timeout;
            "cache.encryption": self.cache_encryption => cache_encryption;
            "telemetry": self.telemetry => telemetry;
        }
        changed
    }

    /// One-line summary for `--check` and the start-up log.
    pub fn summary(&self) -> String {
        let routes: Vec<&str> = self.routes.iter().map(|r| r.name.as_str()).collect();
        let redis = match &self.redis {
            Some(r) => {
                let tls = match &r.tls {
                    Some(t) if t.insecure_skip_verify => " (TLS, server certificate NOT verified)",
                    Some(_) => " (TLS)",
                    None => "",
                };
                format!("{} {}{tls}", r.topology.mode(), r.url)
            }
            None => "embedded".to_string(),
        };
        format!(
            "listen {} ({}), admin {}, upstream {}, redis {}, {} route(s) [{}]",
            self.server.listen,
            if self.server.tls.is_some() { "https" } else { "http" },
            self.admin.listen,
            self.upstream.url,
            redis,
            self.routes.len(),
            routes.join(", ")
        )
    }
}

/// The first 16 hex digits of the SHA-256 of a configuration text.
pub fn text_hash(text: &str) -> String {
    sha2::Sha256::digest(text.as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Structural problems (syntax, unknown fields, wrong types) stop parsing at the first one;
/// `serde_path_to_error` gives it its field path.
fn parse_toml(text: &str) -> Result<RawConfig, FieldError> {
    let de = toml::Deserializer::parse(text)
        .map_err(|e| FieldError { field: "proxy.toml".into(), message: e.to_string().trim().replace('\n', " ") })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        FieldError { field: if path == "." { "proxy.toml".into() } else { path }, message: inner.message().to_string() }
    })
}

#[cfg(test)]
mod tests;
