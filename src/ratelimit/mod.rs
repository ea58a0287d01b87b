//! Per-route token-bucket rate limits (DESIGN.md 5): shared through Redis by every replica,
//! in process when there is no Redis, and never a reason for a request to fail or wait: a
//! limiter that cannot answer lets the request through (`on_redis_error = "allow"`) or falls
//! back to an in-process bucket of the same shape (`"local"`).
//!
//! The limiter has its own Redis connections and breaker ([`Role::RateLimit`]), so a busy cache
//! cannot starve it, and fred never replays its script after a reconnect (one attempt per
//! command), which would charge a token twice.

pub mod bucket;
pub mod client;

use std::fmt::Write;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use fred::types::scripts::Script;
use fred::types::Value;
use http::{HeaderMap, HeaderName, HeaderValue};
use ipnet::IpNet;
use metrics::{Counter, Histogram};
use tokio::time::Instant;

use crate::config::{ClientKey, Config, OnRedisError, RouteConfig};
use crate::metrics::{Registrar, RATELIMIT_CHECKS_TOTAL, RATELIMIT_CHECK_DURATION};
use crate::store::redis::Op;
use crate::store::RedisStore;
use bucket::{LocalBuckets, Params, Taken};

/// `RateLimit-Policy` (IETF httpapi ratelimit-headers draft): `"route";q=BURST;w=SECONDS`.
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`: `"route";r=REMAINING;t=SECONDS_UNTIL_FULL`.
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Who decided a check; also the `backend` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Redis,
    Local,
    AllowAll,
}

impl Backend {
    const ALL: [Backend; 3] = [Backend::Redis, Backend::Local, Backend::AllowAll];

    fn as_str(self) -> &'static str {
        match self {
            Backend::Redis => "redis",
            Backend::Local => "local",
            Backend::AllowAll => "allow_all",
        }
    }
}

/// The verdict on one request.
#[derive(Debug)]
pub enum Verdict {
    /// The route has no limit.
    Unlimited,
    /// A token was taken: go on, and tell the client what is left.
    Allowed(Quota),
    /// No token left: answer 429.
    Limited(Quota),
    /// The shared limiter could not answer and the route fails open.
    Unchecked,
}

/// What the client is told about its bucket.
#[derive(Debug)]
pub struct Quota {
    /// The route's `RateLimit-Policy`.
    pub policy: HeaderValue,
    /// The `RateLimit` value of this moment.
    pub state: HeaderValue,
    /// Until the next token (zero while tokens are left).
    pub retry_after: Duration,
}

impl Quota {
    /// Add `RateLimit-Policy` and `RateLimit` to a response.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(RATELIMIT_POLICY.clone(), self.policy.clone());
        headers.insert(RATELIMIT.clone(), self.state.clone());
    }
}

/// One route's limit, built once; the route holds it.
pub struct Limit {
    /// The route name, as the policy id.
    name: String,
    key: ClientKey,
    on_redis_error: OnRedisError,
    params: Params,
    /// `{key_prefix}rl:{route}:`, followed by the bucket id.
    redis_prefix: String,
    policy: HeaderValue,
    /// In-process buckets: always without Redis, for failures with `on_redis_error = "local"`.
    local: Option<LocalBuckets>,
    /// allowed/limited × redis/local, then error × allow_all.
    checks: [Counter; 5],
}

/// What every route's limit shares: the Redis, the script, the trusted proxies. One per process
/// (its connections are shared by all workers).
pub struct RateLimiter {
    redis: Option<RedisStore>,
    prefix: String,
    script: Script,
    trusted: Vec<IpNet>,
    durations: [Histogram; 3],
}

impl RateLimiter {
    /// The limiter of `config`'s routes, shared through `redis` when given; `None` when no
    /// route has a limit.
    pub fn new(config: &Config, redis: Option<RedisStore>, registrar: &Registrar<'_>) -> Option<RateLimiter> {
        if config.routes.iter().all(|r| r.rate_limit.is_none()) {
            return None;
        }
        if redis.is_none() {
            tracing::info!("no [redis] url: rate limits use in-process buckets, per instance only");
        }
        Some(RateLimiter {
            redis,
            prefix: config.redis.as_ref().map_or("", |r| r.key_prefix.as_str()).to_string(),
            script: Script::from_lua(bucket::SCRIPT),
            trusted: config.server.trusted_proxies.clone(),
            durations: Backend::ALL.map(|b| registrar.histogram(RATELIMIT_CHECK_DURATION, &[("backend", b.as_str())])),
        })
    }

    /// The limit of a route, when it has one.
    pub fn limit(&self, route: &RouteConfig, registrar: &Registrar<'_>) -> Option<Arc<Limit>> {
        let rl = route.rate_limit.as_ref()?;
        let params = Params::new(rl);
        let window = params.fill_time().as_secs_f64().ceil().max(1.0) as u64;
        let policy = format!("\"{}\";q={};w={window}", route.name, rl.burst);
        let local = self.redis.is_none() || rl.on_redis_error == OnRedisError::Local;
        let count = |result: &str, backend: Backend| {
            registrar.counter(
                RATELIMIT_CHECKS_TOTAL,
                &[("route", &route.name), ("result", result), ("backend", backend.as_str())],
            )
        };
        Some(Arc::new(Limit {
            name: route.name.clone(),
            key: rl.key.clone(),
            on_redis_error: rl.on_redis_error,
            params,
            redis_prefix: format!("{}rl:{}:", self.prefix, route.name),
            policy: HeaderValue::from_str(&policy).expect("route names are visible ASCII"),
            local: local.then(|| LocalBuckets::new(params)),
            checks: [
                count("allowed", Backend::Redis),
                count("limited", Backend::Redis),
                count("allowed", Backend::Local),
                count("limited", Backend::Local),
                count("error", Backend::AllowAll),
            ],
        }))
    }

    /// The shared limiter's Redis, if any.
    pub fn redis(&self) -> Option<&RedisStore> {
        self.redis.as_ref()
    }

    /// Take a token from `limit` for a request from `peer`. Never waits longer than the Redis
    /// gate's budget, and never fails.
    pub async fn check(&self, limit: &Limit, peer: IpAddr, headers: &HeaderMap) -> Verdict {
        let started = Instant::now();
        let id = client::bucket_id(&limit.key, peer, headers, &self.trusted);
        let shared = match &self.redis {
            Some(redis) => self.shared(redis, limit, &id).await,
            None => None,
        };
        let (taken, backend) = match (shared, &limit.local) {
            (Some(taken), _) => (Some(taken), Backend::Redis),
            (None, Some(local)) => (Some(local.take(&id)), Backend::Local),
            (None, None) => (None, Backend::AllowAll),
        };
        self.durations[backend as usize].record(started.elapsed().as_secs_f64());
        limit.count(backend, taken.map(|t| t.allowed));
        let Some(taken) = taken else {
            return Verdict::Unchecked;
        };
        let quota = limit.quota(&taken);
        if taken.allowed {
            Verdict::Allowed(quota)
        } else {
            Verdict::Limited(quota)
        }
    }

    /// The shared bucket's answer; `None` when Redis could not give one within its budget.
    async fn shared(&self, redis: &RedisStore, limit: &Limit, id: &str) -> Option<Taken> {
        let mut key = String::with_capacity(limit.redis_prefix.len() + id.len());
        key.push_str(&limit.redis_prefix);
        key.push_str(id);
        let p = &limit.params;
        let args = vec![
            Value::from(i64::from(p.burst.get())),
            Value::from(i64::try_from(p.period_us).unwrap_or(i64::MAX)),
            Value::from(i64::from(p.tokens.get())),
        ];
        match redis.script::<Vec<i64>>(Op::TokenBucket, &self.script, &key, args).await {
            Ok(reply) => Taken::from_reply(&reply),
            Err(e) => {
                tracing::debug!(route = %limit.name, error = %e, fallback = ?limit.on_redis_error, "rate limit check failed");
                None
            }
        }
    }
}

impl Limit {
    /// Count a decision: allowed or not (`None`: not checked, failing open).
    fn count(&self, backend: Backend, allowed: Option<bool>) {
        let index = match (backend, allowed) {
            (Backend::Redis, Some(true)) => 0,
            (Backend::Redis, Some(false)) => 1,
            (Backend::Local, Some(true)) => 2,
            (Backend::Local, Some(false)) => 3,
            _ => 4,
        };
        self.checks[index].increment(1);
    }

    fn quota(&self, taken: &Taken) -> Quota {
        let mut state = String::with_capacity(self.name.len() + 24);
        let reset = taken.reset.as_secs_f64().ceil() as u64;
        let _ = write!(state, "\"{}\";r={};t={reset}", self.name, taken.remaining);
        Quota {
            policy: self.policy.clone(),
            state: HeaderValue::from_str(&state).expect("route names are visible ASCII"),
            retry_after: taken.retry_after,
        }
    }
}
