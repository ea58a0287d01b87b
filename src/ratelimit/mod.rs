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
pub mod denials;
pub mod lease;

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

use crate::config::{Config, LimitMode, OnRedisError, RateLimitConfig, RouteConfig};
use crate::metrics::{Registrar, RATELIMIT_CHECKS_TOTAL, RATELIMIT_CHECK_DURATION};
use crate::store::redis::Op;
use crate::store::RedisStore;
use bucket::{LocalBuckets, Params, Taken};
use denials::Denials;
use lease::{Ask, Leases};

/// `RateLimit-Policy` (IETF httpapi ratelimit-headers draft): `"route";q=BURST;w=SECONDS`.
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`: `"route";r=REMAINING;t=SECONDS_UNTIL_FULL`.
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Who decided a check; also the `backend` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Redis,
    /// A token of a lease taken from Redis ([`lease`]).
    Lease,
    Local,
    AllowAll,
    Deny,
}

impl Backend {
    const ALL: [Backend; 5] = [Backend::Redis, Backend::Lease, Backend::Local, Backend::AllowAll, Backend::Deny];

    fn as_str(self) -> &'static str {
        match self {
            Backend::Redis => "redis",
            Backend::Lease => "lease",
            Backend::Local => "local",
            Backend::AllowAll => "allow_all",
            Backend::Deny => "deny",
        }
    }
}

/// What a check decided; with the backend, the labels of `ratelimit_checks_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Allowed,
    Limited,
    /// Shadow mode: the bucket was empty, the request went on.
    WouldLimit,
    /// The shared limiter could not answer.
    Error,
}

impl Decision {
    fn as_str(self) -> &'static str {
        match self {
            Decision::Allowed => "allowed",
            Decision::Limited => "limited",
            Decision::WouldLimit => "would_limit",
            Decision::Error => "error",
        }
    }
}

/// The (decision, backend) pairs that can happen, in the order of `Limit::checks`.
const COUNTED: [(Decision, Backend); 9] = [
    (Decision::Allowed, Backend::Redis),
    (Decision::Limited, Backend::Redis),
    (Decision::WouldLimit, Backend::Redis),
    (Decision::Allowed, Backend::Lease),
    (Decision::Allowed, Backend::Local),
    (Decision::Limited, Backend::Local),
    (Decision::WouldLimit, Backend::Local),
    (Decision::Error, Backend::AllowAll),
    (Decision::Error, Backend::Deny),
];

/// The verdict on one request.
#[derive(Debug)]
pub enum Verdict {
    /// The route has no limit.
    Unlimited,
    /// A token was taken: go on, and tell the client what is left.
    Allowed(Quota),
    /// No token left: answer 429.
    Limited(Quota),
    /// The shared limiter could not answer and the route fails open, or the limit is in shadow
    /// mode: go on, and tell the client nothing.
    Unchecked,
    /// The shared limiter could not answer and the route fails closed: answer 503, retry after
    /// this long.
    Unavailable(Duration),
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
    config: RateLimitConfig,
    params: Params,
    /// `{key_prefix}rl:{route}:`, followed by the bucket id.
    redis_prefix: String,
    policy: HeaderValue,
    /// In-process buckets: always without Redis, for failures with `on_redis_error = "local"`.
    local: Option<LocalBuckets>,
    /// Redis's denials, remembered until their next token ([`denials`]).
    denials: Denials,
    /// Tokens taken from Redis ahead for busy buckets ([`lease`]).
    leases: Leases,
    /// One per pair of [`COUNTED`].
    checks: [Counter; COUNTED.len()],
}

/// What every route's limit shares: the Redis and the script. One per process (its connections
/// are shared by all workers).
pub struct RateLimiter {
    redis: Option<RedisStore>,
    prefix: String,
    script: Script,
    durations: [Histogram; Backend::ALL.len()],
    /// `Retry-After` of a 503 from a route that fails closed: until the breaker probes again.
    deny_retry: Duration,
}

impl RateLimiter {
    /// The limiter of the routes' limits, shared through `redis` when given.
    pub fn new(config: &Config, redis: Option<RedisStore>, registrar: &Registrar<'_>) -> RateLimiter {
        RateLimiter {
            redis,
            prefix: config.redis.as_ref().map_or("", |r| r.key_prefix.as_str()).to_string(),
            script: Script::from_lua(bucket::SCRIPT),
            durations: Backend::ALL.map(|b| registrar.histogram(RATELIMIT_CHECK_DURATION, &[("backend", b.as_str())])),
            deny_retry: config.redis.as_ref().map_or(Duration::from_secs(1), |r| r.breaker_cooldown),
        }
    }

    /// The limit of a route, when it has one. A reload passes the route's limit so far as
    /// `previous`: kept as it is (with its in-process buckets) when the settings did not change.
    pub fn limit(
        &self,
        route: &RouteConfig,
        previous: Option<&Arc<Limit>>,
        registrar: &Registrar<'_>,
    ) -> Option<Arc<Limit>> {
        let rl = route.rate_limit.as_ref()?;
        if let Some(previous) = previous.filter(|p| p.config == *rl) {
            return Some(previous.clone());
        }
        let params = Params::new(rl);
        let window = params.fill_time().as_secs_f64().ceil().max(1.0) as u64;
        let policy = format!("\"{}\";q={};w={window}", route.name, rl.burst);
        let local = self.redis.is_none() || rl.on_redis_error == OnRedisError::Local;
        Some(Arc::new(Limit {
            name: route.name.clone(),
            config: rl.clone(),
            params,
            redis_prefix: format!("{}rl:{}:", self.prefix, route.name),
            policy: HeaderValue::from_str(&policy).expect("route names are visible ASCII"),
            local: local.then(|| LocalBuckets::new(params)),
            denials: Denials::new(),
            leases: Leases::new(),
            checks: COUNTED.map(|(decision, backend)| {
                registrar.counter(
                    RATELIMIT_CHECKS_TOTAL,
                    &[("route", &route.name), ("result", decision.as_str()), ("backend", backend.as_str())],
                )
            }),
        }))
    }

    /// The shared limiter's Redis, if any.
    pub fn redis(&self) -> Option<&RedisStore> {
        self.redis.as_ref()
    }

    /// Take a token from `limit` for a request from `peer` (whose `X-Forwarded-For` counts when
    /// it is one of the `trusted` proxies). Never waits longer than the Redis gate's budget, and
    /// never fails.
    pub async fn check(&self, limit: &Limit, peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> Verdict {
        let started = Instant::now();
        let id = client::bucket_id(&limit.config.key, peer, headers, trusted);
        let mut ahead = None;
        let shared = match &self.redis {
            Some(redis) => match limit.leases.take(&id, started, |then| redis.continuous(then)) {
                Ok((leased, next)) => {
                    ahead = next;
                    Some((leased, Backend::Lease))
                }
                Err(ask) => {
                    let continuity = redis.continuity();
                    match limit.denials.get(&id, started, |then| redis.continuous(then)) {
                        // Redis's own answer, remembered: no token can exist yet.
                        Some(denied) => Some(denied),
                        // Boxed: a Redis command's future is large, and every request's future
                        // would carry it (and be copied whole), whatever store answers.
                        None => Box::pin(self.shared(redis, limit, &id, ask, started, continuity)).await,
                    }
                    .map(|taken| (taken, Backend::Redis))
                }
            },
            None => None,
        };
        let (taken, backend) = match (shared, &limit.local) {
            (Some((taken, backend)), _) => (Some(taken), backend),
            (None, Some(local)) => (Some(local.take(&id)), Backend::Local),
            (None, None) if limit.config.on_redis_error == OnRedisError::Deny => (None, Backend::Deny),
            (None, None) => (None, Backend::AllowAll),
        };
        self.durations[backend as usize].record(started.elapsed().as_secs_f64());
        let shadow = limit.config.mode == LimitMode::Shadow;
        let decision = match &taken {
            None => Decision::Error,
            Some(t) if t.allowed => Decision::Allowed,
            Some(_) if shadow => Decision::WouldLimit,
            Some(_) => Decision::Limited,
        };
        limit.count(decision, backend);
        crate::telemetry::record("sidecache.ratelimit.result", decision.as_str());
        if let (Some(ask), Some(redis)) = (ahead, &self.redis) {
            // The next lease, asked for by this request after its own answer; a failure is
            // logged in `shared` and leaves the next requests to ask again.
            let continuity = redis.continuity();
            Box::pin(self.shared(redis, limit, &id, ask, Instant::now(), continuity)).await;
        }
        match taken {
            // A limit in shadow mode changes nothing for the client.
            _ if shadow => Verdict::Unchecked,
            None if backend == Backend::Deny => Verdict::Unavailable(self.deny_retry),
            None => Verdict::Unchecked,
            Some(taken) if taken.allowed => Verdict::Allowed(limit.quota(&taken)),
            Some(taken) => Verdict::Limited(limit.quota(&taken)),
        }
    }

    /// The shared bucket's answer to `ask`, sent at `asked` with the store's `continuity`
    /// (remembered when a denial or a lease); `None` when Redis could not give one within its
    /// budget.
    async fn shared(
        &self,
        redis: &RedisStore,
        limit: &Limit,
        id: &str,
        ask: Ask,
        asked: Instant,
        continuity: u64,
    ) -> Option<Taken> {
        let mut key = String::with_capacity(limit.redis_prefix.len() + id.len());
        key.push_str(&limit.redis_prefix);
        key.push_str(id);
        let p = &limit.params;
        let args = vec![
            Value::from(i64::from(p.burst.get())),
            Value::from(i64::try_from(p.period_us).unwrap_or(i64::MAX)),
            Value::from(i64::from(p.tokens.get())),
            Value::from(i64::from(ask.want)),
            Value::from(i64::from(lease::SPREAD)),
        ];
        match redis.script::<Vec<i64>>(Op::TokenBucket, &self.script, &key, args).await {
            Ok(reply) => {
                let (taken, granted) = Taken::from_reply(&reply)?;
                limit.denials.remember(id, asked, continuity, &taken);
                limit.leases.granted(id, ask, asked, continuity, granted, &taken);
                Some(taken)
            }
            Err(e) => {
                tracing::debug!(route = %limit.name, error = %e, fallback = ?limit.config.on_redis_error, "rate limit check failed");
                None
            }
        }
    }
}

impl Limit {
    /// Count a decision by the backend that made it.
    fn count(&self, decision: Decision, backend: Backend) {
        if let Some(i) = COUNTED.iter().position(|c| *c == (decision, backend)) {
            self.checks[i].increment(1);
        }
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
