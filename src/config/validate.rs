//! One pass over the raw configuration that turns every value into its type and collects every
//! problem with its field path, instead of stopping at the first.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use http::{HeaderName, Method, StatusCode};

use super::raw::{self, RawCache, RawConfig, RawQuery, RawRateLimit, RawRedis, RawRoute};
use super::redis_url;
use super::units::{self, Rate};
use super::*;
use crate::route::pattern::Pattern;

/// Collects errors while turning raw values into typed ones.
#[derive(Default)]
pub(super) struct Validator {
    pub(super) errors: Vec<FieldError>,
}

impl Validator {
    pub(super) fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError { field: field.into(), message: message.into() });
    }

    /// Run a parser on an optional value, falling back to `default` and recording failures.
    fn field<T>(&mut self, field: &str, value: Option<&str>, default: T, parse: impl Fn(&str) -> Result<T, String>) -> T
    where
        T: Clone,
    {
        match value {
            None => default,
            Some(s) => parse(s).unwrap_or_else(|msg| {
                self.err(field, format!("{s:?} {msg}"));
                default
            }),
        }
    }

    /// Parse every item of an optional list, recording each failure as `field[i]`.
    fn list<T>(
        &mut self,
        field: &str,
        items: Option<Vec<String>>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Vec<T> {
        let mut out = Vec::new();
        for (i, item) in items.unwrap_or_default().iter().enumerate() {
            match parse(item) {
                Ok(v) => out.push(v),
                Err(msg) => self.err(format!("{field}[{i}]"), format!("{item:?} {msg}")),
            }
        }
        out
    }

    fn int(&mut self, field: &str, value: Option<i64>, default: u64, min: u64, max: u64) -> u64 {
        match value {
            None => default,
            Some(n) if n >= min as i64 && (n as u64) <= max => n as u64,
            Some(n) => {
                self.err(field, format!("{n} is out of range ({min}..={max})"));
                default
            }
        }
    }

    pub(super) fn config(&mut self, mut raw: RawConfig, env: &HashMap<String, String>) -> Option<Config> {
        let s = raw.server;
        let listen = self.field("server.listen", s.listen.as_deref(), units::addr(DEFAULT_LISTEN), units::parse_addr);
        let trusted_proxies = self.list("server.trusted_proxies", s.trusted_proxies, units::parse_net);
        let upgrades = match s.upgrades {
            None => vec!["websocket".to_string()],
            some => self.list("server.upgrades", some, |p| {
                let token =
                    !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
                match p.to_ascii_lowercase() {
                    _ if !token => Err("is not a protocol name (a token, like \"websocket\")".into()),
                    h2c if h2c == "h2c" => Err("cannot be tunnelled: the upstream connection is HTTP/1.1".into()),
                    name => Ok(name),
                }
            }),
        };
        let shutdown_grace = self.field(
            "server.shutdown_grace",
            s.shutdown_grace.as_deref(),
            Duration::from_secs(20),
            units::parse_duration_or_zero,
        );
        // nginx: client_header_timeout 60 s, keepalive_timeout 75 s. A sidecar's clients are near.
        let up_to = |max: Duration| {
            move |v: &str| match units::parse_duration(v)? {
                d if d > max => Err(format!("must be at most {}", humantime::format_duration(max))),
                d if d < Duration::from_secs(1) => Err("must be at least 1s".into()),
                d => Ok(d),
            }
        };
        let header_read_timeout = self.field(
            "server.header_read_timeout",
            s.header_read_timeout.as_deref(),
            Duration::from_secs(10),
            up_to(Duration::from_secs(3600)),
        );
        let idle_timeout = self.field(
            "server.idle_timeout",
            s.idle_timeout.as_deref(),
            Duration::from_secs(60),
            up_to(Duration::from_secs(24 * 3600)),
        );
        let max_header_bytes =
            self.int("server.max_header_bytes", s.max_header_bytes, 64 * 1024, 8 * 1024, 1024 * 1024) as usize;
        let max_connections = self.int("server.max_connections", s.max_connections, 10_000, 1, 1_000_000) as usize;
        // Default: one worker per core (a thread-per-core design, like nginx's worker_processes auto).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        let workers = self.int("server.workers", s.workers, cores, 1, 256) as usize;
        let tls = s.tls.map(|t| TlsFiles { cert: t.cert.into(), key: t.key.into() });

        let admin_listen = self.field(
            "admin.listen",
            raw.admin.listen.as_deref(),
            units::addr(DEFAULT_ADMIN_LISTEN),
            units::parse_addr,
        );
        if admin_listen == listen && listen.port() != 0 {
            self.err("admin.listen", format!("{admin_listen} is the same address as server.listen"));
        }

        let upstream = self.upstream(raw.upstream.unwrap_or_default(), env);
        let redis = self.redis(raw.redis, env);

        let format = self.field("log.format", raw.log.format.as_deref(), LogFormat::Json, |s| match s {
            "json" => Ok(LogFormat::Json),
            "pretty" => Ok(LogFormat::Pretty),
            _ => Err("is not a log format (json, pretty)".into()),
        });
        let level = self.field("log.level", raw.log.level.as_deref(), "info".to_string(), |s| {
            tracing_subscriber::EnvFilter::try_new(s)
                .map(|_| s.to_string())
                .map_err(|e| format!("is not a log filter: {e}"))
        });

        let cache_enabled = self.env_bool(env, "SIDECACHE_CACHE_ENABLED");
        let cache_memory_max = self.int("cache.memory_max", raw.cache.memory_max, 64 << 20, 1 << 20, 1 << 40);
        let cache_encryption = self.encryption(&raw.cache, env);
        let cache_hot_ttl = self.field(
            "cache.hot_ttl",
            raw.cache.hot_ttl.as_deref(),
            Duration::from_secs(1),
            units::parse_duration_or_zero,
        );
        // nginx's proxy_cache_lock_timeout is 5 s too.
        let cache_lock_timeout = self.field(
            "cache.lock_timeout",
            raw.cache.lock_timeout.as_deref(),
            Duration::from_secs(5),
            units::parse_duration_or_zero,
        );
        // RFC 9213: fields that replace Cache-Control for this cache, read as Structured Fields.
        let targeted = match raw.cache.targeted.take() {
            None => vec![SIDECACHE_CACHE_CONTROL],
            Some(names) => self.list("cache.targeted", Some(names), |h| match HeaderName::from_bytes(h.as_bytes()) {
                Ok(name) if name == http::header::CACHE_CONTROL => {
                    Err("is the field targeted ones replace, not a targeted one".to_string())
                }
                Ok(name) => Ok(name),
                Err(_) => Err("is not a header name".to_string()),
            }),
        };
        let rate_limit_enabled = self.env_bool(env, "SIDECACHE_RATE_LIMIT_ENABLED");
        let routes = self.routes(raw.routes, cache_enabled, rate_limit_enabled, &targeted);
        let telemetry = self.telemetry(raw.telemetry, env);

        Some(Config {
            server: ServerConfig {
                listen,
                trusted_proxies,
                upgrades,
                shutdown_grace,
                header_read_timeout,
                idle_timeout,
                max_header_bytes,
                max_connections,
                workers,
                tls,
            },
            admin: AdminConfig { listen: admin_listen, token: self.admin_token(env) },
            upstream: upstream?,
            redis,
            log: LogConfig { format, level },
            routes,
            cache_enabled,
            cache_memory_max,
            cache_hot_ttl,
            cache_lock_timeout,
            rate_limit_enabled,
            cache_encryption,
            hash: String::new(),
            telemetry,
        })
    }

    /// `SIDECACHE_ADMIN_TOKEN`, at least 16 characters when set (an empty value is unset).
    fn admin_token(&mut self, env: &HashMap<String, String>) -> Option<AdminToken> {
        let token = env.get("SIDECACHE_ADMIN_TOKEN").map(|t| t.trim()).filter(|t| !t.is_empty())?;
        if token.len() < 16 || token.chars().any(|c| !c.is_ascii_graphic()) {
            self.err("SIDECACHE_ADMIN_TOKEN", "must be at least 16 visible ASCII characters (openssl rand -hex 32)");
            return None;
        }
        Some(AdminToken(token.to_string()))
    }

    fn env_bool(&mut self, env: &HashMap<String, String>, name: &str) -> bool {
        match env.get(name).map(|v| v.trim().to_ascii_lowercase()) {
            None => true,
            Some(v) => match v.as_str() {
                "" | "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => {
                    self.err(name, format!("{v:?} is not a boolean (true, false)"));
                    true
                }
            },
        }
    }

    fn upstream(&mut self, u: raw::RawUpstream, env: &HashMap<String, String>) -> Option<UpstreamConfig> {
        let (field, url) = match env.get("SIDECACHE_UPSTREAM_URL").filter(|s| !s.is_empty()) {
            Some(url) => ("SIDECACHE_UPSTREAM_URL", Some(url.clone())),
            None => ("upstream.url", u.url),
        };
        let connect_timeout = self.field(
            "upstream.connect_timeout",
            u.connect_timeout.as_deref(),
            Duration::from_secs(1),
            units::parse_duration,
        );
        let response_timeout = self.field(
            "upstream.response_timeout",
            u.response_timeout.as_deref(),
            Duration::from_secs(30),
            units::parse_duration,
        );
        let Some(url) = url else {
            self.err("upstream.url", "is required (the backend to forward to, e.g. \"http://127.0.0.1:3000\")");
            return None;
        };
        match units::parse_upstream_url(&url) {
            Ok(url) => {
                Some(UpstreamConfig { url, connect_timeout, response_timeout, ca_file: u.ca_file.map(PathBuf::from) })
            }
            Err(msg) => {
                self.err(field, format!("{url:?} {msg}"));
                None
            }
        }
    }

    fn redis(&mut self, r: Option<RawRedis>, env: &HashMap<String, String>) -> Option<RedisConfig> {
        let r = r.unwrap_or_default();
        let (field, url) = match env.get("SIDECACHE_REDIS_URL") {
            Some(url) => ("SIDECACHE_REDIS_URL", Some(url.clone())),
            None => ("redis.url", r.url),
        };
        let op_timeout =
            self.field("redis.op_timeout", r.op_timeout.as_deref(), Duration::from_millis(50), units::parse_duration);
        let breaker_failures = self.int("redis.breaker_failures", r.breaker_failures, 3, 1, 1_000) as u32;
        let breaker_cooldown = self.field(
            "redis.breaker_cooldown",
            r.breaker_cooldown.as_deref(),
            Duration::from_secs(2),
            units::parse_duration,
        );
        let key_prefix = r.key_prefix.unwrap_or_else(|| "sidecache:".into());
        if key_prefix.len() > 64 || key_prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
            self.err("redis.key_prefix", format!("{key_prefix:?} must be at most 64 characters without spaces"));
        }
        let url = url.filter(|u| !u.trim().is_empty())?;
        let parsed = match redis_url::parse(&url) {
            Ok(parsed) => parsed,
            Err(msg) => {
                self.err(field, format!("{:?} {msg}", redis_url::redact(&url)));
                return None;
            }
        };
        let tls = self.redis_tls(r.tls, parsed.tls);
        let from_env = |name: &str| env.get(name).filter(|v| !v.is_empty()).cloned();
        let sentinel = matches!(parsed.topology, RedisTopology::Sentinel { .. });
        for name in ["SIDECACHE_REDIS_SENTINEL_USERNAME", "SIDECACHE_REDIS_SENTINEL_PASSWORD"] {
            if !sentinel && from_env(name).is_some() {
                self.err(name, "is set, but redis.url is not a redis-sentinel:// URL");
            }
        }
        Some(RedisConfig {
            url: redis_url::redact(&url),
            topology: parsed.topology,
            username: from_env("SIDECACHE_REDIS_USERNAME").or(parsed.username),
            password: from_env("SIDECACHE_REDIS_PASSWORD").or(parsed.password),
            sentinel_username: from_env("SIDECACHE_REDIS_SENTINEL_USERNAME"),
            sentinel_password: from_env("SIDECACHE_REDIS_SENTINEL_PASSWORD"),
            database: parsed.database,
            tls,
            key_prefix,
            op_timeout,
            breaker_failures: NonZeroU32::new(breaker_failures).unwrap_or(NonZeroU32::MIN),
            breaker_cooldown,
        })
    }

    /// `[redis.tls]`: only with a `rediss*://` URL, which gets the defaults (system roots) without it.
    fn redis_tls(&mut self, raw: Option<raw::RawRedisTls>, url_tls: bool) -> Option<RedisTls> {
        if !url_tls {
            if raw.is_some() {
                self.err("redis.tls", "is set, but redis.url does not use TLS (use a rediss:// scheme)");
            }
            return None;
        }
        let raw = raw.unwrap_or_default();
        let client_cert = match (raw.cert_file, raw.key_file) {
            (Some(cert), Some(key)) => Some(TlsFiles { cert: PathBuf::from(cert), key: PathBuf::from(key) }),
            (None, None) => None,
            (Some(_), None) => {
                self.err("redis.tls.key_file", "is required with cert_file (a client certificate needs its key)");
                None
            }
            (None, Some(_)) => {
                self.err("redis.tls.cert_file", "is required with key_file");
                None
            }
        };
        Some(RedisTls {
            ca_file: raw.ca_file.map(PathBuf::from),
            client_cert,
            insecure_skip_verify: raw.insecure_skip_verify.unwrap_or(false),
        })
    }

    fn routes(
        &mut self,
        raw: Vec<RawRoute>,
        cache_enabled: bool,
        rate_limit_enabled: bool,
        targeted: &[HeaderName],
    ) -> Vec<RouteConfig> {
        let mut names = HashSet::new();
        let mut routes = Vec::with_capacity(raw.len());
        for (i, r) in raw.into_iter().enumerate() {
            let at = format!("route[{i}]");
            // Names start alphanumeric: "-" is the metrics label of unmatched requests.
            if !r.name.starts_with(|c: char| c.is_ascii_alphanumeric())
                || r.name.len() > 64
                || !r.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
            {
                self.err(
                    format!("{at}.name"),
                    format!("{:?} must be 1-64 characters of [A-Za-z0-9_.-], starting with a letter or digit", r.name),
                );
            } else if !names.insert(r.name.clone()) {
                self.err(format!("{at}.name"), format!("{:?} is used by an earlier route", r.name));
            }
            let trailing_slash_same =
                self.field(&format!("{at}.trailing_slash"), r.trailing_slash.as_deref(), true, |s| match s {
                    "same" => Ok(true),
                    "distinct" => Ok(false),
                    _ => Err("is not a trailing-slash rule (same, distinct)".into()),
                });
            let pattern = Pattern::parse(&r.path)
                .map_err(|m| self.err(format!("{at}.path"), format!("{:?} {m}", r.path)))
                .ok()
                .map(|p| p.matching(trailing_slash_same, r.case_insensitive.unwrap_or(false)));
            let methods = self.methods(&at, r.methods);
            let cache = r.cache.map(|c| self.cache(&at, c, targeted));
            if cache.is_some() && !methods.contains(&Method::GET) {
                self.err(format!("{at}.cache"), "caching applies to GET and HEAD only, but methods has no GET");
            }
            let rate_limit = r.rate_limit.and_then(|rl| self.rate_limit(&at, rl));
            if let Some(pattern) = pattern {
                routes.push(RouteConfig {
                    name: r.name,
                    pattern,
                    methods,
                    cache: cache.filter(|_| cache_enabled),
                    rate_limit: rate_limit.filter(|_| rate_limit_enabled),
                });
            }
        }
        routes
    }

    fn methods(&mut self, at: &str, methods: Option<Vec<String>>) -> Vec<Method> {
        let Some(methods) = methods else { return vec![Method::GET, Method::HEAD] };
        if methods.is_empty() {
            self.err(format!("{at}.methods"), "must name at least one method");
        }
        let mut out = Vec::new();
        for (j, m) in methods.iter().enumerate() {
            match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                Ok(method) if !out.contains(&method) => out.push(method),
                Ok(_) => self.err(format!("{at}.methods[{j}]"), format!("{m:?} is listed twice")),
                Err(_) => self.err(format!("{at}.methods[{j}]"), format!("{m:?} is not an HTTP method")),
            }
        }
        out
    }

    fn cache(&mut self, at: &str, c: RawCache, targeted: &[HeaderName]) -> CacheConfig {
        let f = |name: &str| format!("{at}.cache.{name}");
        let ttl = c
            .ttl
            .as_deref()
            .and_then(|s| units::parse_duration(s).map_err(|m| self.err(f("ttl"), format!("{s:?} {m}"))).ok());
        let vary = self.list(&f("vary"), c.vary, |h| {
            HeaderName::from_bytes(h.as_bytes()).map_err(|_| "is not a header name".to_string())
        });
        let query = match c.query {
            None => QueryMode::Sorted,
            Some(RawQuery::Mode(m)) => match m.as_str() {
                "keep" => QueryMode::Keep,
                "sorted" => QueryMode::Sorted,
                "ignore" => QueryMode::Ignore,
                _ => {
                    self.err(
                        f("query"),
                        format!("{m:?} is not a query mode (keep, sorted, ignore, or a list of parameter names)"),
                    );
                    QueryMode::Sorted
                }
            },
            Some(RawQuery::Keep(mut names)) => {
                if names.iter().any(String::is_empty) {
                    self.err(f("query"), "parameter names must not be empty");
                }
                names.sort();
                names.dedup();
                QueryMode::Only(names)
            }
        };
        let mut window = |name: &str, value: Option<String>| {
            let value = value?;
            units::parse_duration_or_zero(&value).map_err(|m| self.err(f(name), format!("{value:?} {m}"))).ok()
        };
        let swr = window("stale_while_revalidate", c.stale_while_revalidate);
        let sie = window("stale_if_error", c.stale_if_error);
        let statuses = match c.statuses {
            None => vec![StatusCode::OK],
            Some(list) => list
                .iter()
                .enumerate()
                .filter_map(|(j, s)| {
                    // 206 and 304 are answers to a request's own range or condition: stored, they
                    // would answer everyone else with a part or with nothing.
                    u16::try_from(*s)
                        .ok()
                        .filter(|s| (200..=599).contains(s) && *s != 206 && *s != 304)
                        .and_then(|s| StatusCode::from_u16(s).ok())
                        .ok_or_else(|| {
                            self.err(
                                format!("{at}.cache.statuses[{j}]"),
                                format!("{s} is not a storable final status (200-599, not 206 or 304)"),
                            )
                        })
                        .ok()
                })
                .collect(),
        };
        let max_body = self.int(&f("max_body"), c.max_body, DEFAULT_MAX_BODY as u64, 0, 512 * 1024 * 1024) as usize;
        let respect_origin = c.respect_origin.unwrap_or(true);
        if !respect_origin && c.ttl.is_none() {
            self.err(
                f("respect_origin"),
                "is false, so the origin's freshness is ignored, but there is no ttl: nothing would ever be stored",
            );
        }
        CacheConfig {
            ttl,
            vary,
            query,
            stale_while_revalidate: swr,
            stale_if_error: sie,
            statuses,
            max_body,
            respect_origin,
            heuristic: c.heuristic.unwrap_or(false),
            request_directives: c.request_directives.unwrap_or(false),
            max_variants: self.int(&f("max_variants"), c.max_variants, DEFAULT_MAX_VARIANTS as u64, 1, 1024) as usize,
            targeted: targeted.to_vec(),
        }
    }

    fn rate_limit(&mut self, at: &str, rl: RawRateLimit) -> Option<RateLimitConfig> {
        let f = |name: &str| format!("{at}.rate_limit.{name}");
        let burst = u32::try_from(rl.burst).ok().and_then(NonZeroU32::new);
        if burst.is_none() {
            self.err(f("burst"), format!("{} must be a whole number from 1 to {}", rl.burst, u32::MAX));
        }
        let rate = Rate::parse(&rl.rate).map_err(|m| self.err(f("rate"), format!("{:?} {m}", rl.rate))).ok();
        let key = match rl.key.as_deref() {
            None | Some("ip") => ClientKey::Ip,
            Some("route") => ClientKey::Route,
            Some(k) => match k.strip_prefix("header:").map(|h| HeaderName::from_bytes(h.as_bytes())) {
                Some(Ok(h)) => ClientKey::Header(h),
                _ => {
                    self.err(f("key"), format!("{k:?} is not a client key (ip, route, header:NAME)"));
                    ClientKey::Ip
                }
            },
        };
        let on_redis_error = match rl.on_redis_error.as_deref() {
            None | Some("allow") => OnRedisError::Allow,
            Some("local") => OnRedisError::Local,
            Some("deny") => OnRedisError::Deny,
            Some(o) => {
                self.err(f("on_redis_error"), format!("{o:?} is not a fallback (allow, local, deny)"));
                OnRedisError::Allow
            }
        };
        let mode = match rl.mode.as_deref() {
            None | Some("enforce") => LimitMode::Enforce,
            Some("shadow") => LimitMode::Shadow,
            Some(m) => {
                self.err(f("mode"), format!("{m:?} is not a limit mode (enforce, shadow)"));
                LimitMode::Enforce
            }
        };
        Some(RateLimitConfig { burst: burst?, rate: rate?, key, on_redis_error, mode })
    }
}
