//! Redis through fred, behind the gate of DESIGN.md 3: a failing Redis produces a fast
//! [`StoreError`], never a wait.
//!
//! fred is configured as `shared/REDIS_NOTES.md` measured it must be: unlimited reconnect
//! attempts with backoff (a finite policy, or none, leaves every later command hanging after the
//! first drop), one attempt per command (a replay after reconnect would charge a rate-limit token
//! twice), a bounded command queue (unbounded grows through an outage), the command timeout set
//! to the budget, and `connect()` without awaiting `init()` so start-up never waits for Redis.
//! On top of that the gate adds what fred lacks: checks that cost no await (breaker, connected,
//! in-flight cap), an outer `tokio::time::timeout` as the hard guarantee (fred ignores per-call
//! timeouts for EVALSHA), and a background prober that closes the breaker and turns a hung
//! server into a reconnect (fred's own detector never fires under steady traffic).

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use fred::clients::{Client, Pool};
use fred::error::{Error as FredError, ErrorKind};
use fred::interfaces::{ClientLike, EventInterface, HashesInterface, KeysInterface};
use fred::types::config::ReconnectPolicy;
use fred::types::scripts::Script;
use fred::types::{Builder, Expiration, FromValue, SetOptions, Value};
use metrics::{Counter, Gauge, Histogram};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::Instrument;

use super::breaker::{Breaker, BreakerState};
use super::target::{RedisTarget, Topology};
use super::StoreError;
use crate::metrics::{
    Registrar, REDIS_CONNECTED_NODES, REDIS_ERRORS_TOTAL, REDIS_INFO, REDIS_NODES, REDIS_OP_DURATION, REDIS_UP,
};
use crate::telemetry;

/// Operations sent at most concurrently per store; more are skipped, never queued.
const MAX_IN_FLIGHT: usize = 1024;

/// [`RedisStore::hset_variants`]: KEYS[1] the path's hash; ARGV keep-for ms, cap, then field and
/// value pairs. Returns how many fields were written: none when the new ones would take the path
/// past `cap` live variants. Variant ids are hex or `v` and hex, so the index field `~` is never one.
/// A field's expiry only ever moves later: a marker written for a short-lived variant must not
/// end before a longer-lived one it leads to. The fields of one write are stored together or
/// not at all (a marker is no use without the entry it leads to), and a write that stores
/// nothing and finds nothing expired leaves the key untouched: any write to it makes Redis tell
/// every replica's hot tier to drop the path's entries.
const HSET_VARIANTS_LUA: &str = r#"
local key, keep, cap = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local expiries, order, dropped = {}, {}, {}
local index = redis.call('HGET', key, '~')
if index then
  for variant, expiry in string.gmatch(index, '(%S+) (%d+)') do
    expiry = tonumber(expiry)
    if expiry > now then
      expiries[variant] = expiry
      order[#order + 1] = variant
    else
      dropped[#dropped + 1] = variant
    end
  end
end
local new = 0
for i = 3, #ARGV - 1, 2 do
  if not expiries[ARGV[i]] then new = new + 1 end
end
local stored = 0
if #order + new <= cap then
  for i = 3, #ARGV - 1, 2 do
    local field, expiry = ARGV[i], now + keep
    local known = expiries[field]
    redis.call('HSET', key, field, ARGV[i + 1])
    if not known then
      order[#order + 1] = field
      expiries[field] = expiry
    elseif known < expiry then
      expiries[field] = expiry
    end
    stored = stored + 1
  end
end
if stored == 0 and #dropped == 0 then
  return 0
end
for _, variant in ipairs(dropped) do
  redis.call('HDEL', key, variant)
end
if #order == 0 then
  redis.call('DEL', key)
  return stored
end
local parts, longest = {}, 0
for _, variant in ipairs(order) do
  local expiry = expiries[variant]
  parts[#parts + 1] = variant .. ' ' .. string.format('%d', expiry)
  if expiry > longest then longest = expiry end
end
redis.call('HSET', key, '~', table.concat(parts, ' '))
redis.call('PEXPIRE', key, longest - now)
return stored
"#;
/// Commands fred may queue per connection while (re)connecting; past it fred answers
/// Backpressure at once.
const COMMAND_BUFFER: usize = 1024;
/// Reconnect backoff: from this...
const RECONNECT_MIN_MS: u32 = 20;
/// ...doubling up to this (fred adds jitter).
const RECONNECT_MAX_MS: u32 = 1_000;
/// TCP connect budget of a (re)connection. Background only: no request waits for it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

thread_local! {
    /// The pool index of the connection this thread's runtime drives (a proxy worker's, see
    /// [`RedisStore::attach`]); `usize::MAX` elsewhere.
    static HOME: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// An operation the gate sends; also the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// GET
    Get,
    /// SET with expiry
    Set,
    /// DEL
    Del,
    /// INCR
    Incr,
    /// PING (the prober)
    Ping,
    /// HGET
    Hget,
    /// HMGET (a path's first and second variant slot)
    Hmget,
    /// HSET + extend expiry (one script)
    Hset,
    /// HDEL
    Hdel,
    /// The rate limiter's token-bucket script
    TokenBucket,
    /// SET NX PX of a fill lease (coalescing across replicas)
    Lease,
    /// Delete a fill lease if it is still ours (one script)
    Release,
}

impl Op {
    const ALL: [Op; 12] = [
        Op::Get,
        Op::Set,
        Op::Del,
        Op::Incr,
        Op::Ping,
        Op::Hget,
        Op::Hmget,
        Op::Hset,
        Op::Hdel,
        Op::TokenBucket,
        Op::Lease,
        Op::Release,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Get => "get",
            Op::Set => "set",
            Op::Del => "del",
            Op::Incr => "incr",
            Op::Ping => "ping",
            Op::Hget => "hget",
            Op::Hmget => "hmget",
            Op::Hset => "hset",
            Op::Hdel => "hdel",
            Op::TokenBucket => "token_bucket",
            Op::Lease => "lease",
            Op::Release => "release",
        }
    }
}

/// What a store is for: its own connections, breaker and `client` metric label, so the cache
/// cannot starve the rate limiter (or the reverse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The response cache.
    Cache,
    /// The rate limiter.
    RateLimit,
}

impl Role {
    /// The `client` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Cache => "cache",
            Role::RateLimit => "ratelimit",
        }
    }
}

/// Pre-registered handles per operation.
struct OpMetrics {
    duration: Histogram,
    /// Indexed like [`StoreError::kind_index`].
    errors: [Counter; StoreError::KINDS.len()],
}

struct Inner {
    pool: Pool,
    target: RedisTarget,
    role: Role,
    budget: Duration,
    cooldown: Duration,
    breaker: Breaker,
    permits: Semaphore,
    opened: Arc<Notify>,
    ops: Vec<OpMetrics>,
    up: Gauge,
    nodes: Gauge,
    connected_nodes: Gauge,
    /// Reconnections so far (a client's first connection is none): a server reached again may
    /// have lost its keys (restarted empty, failed over before a write was replicated).
    reconnections: std::sync::atomic::AtomicU64,
    /// Told of every (re)connection and cluster slot map change: the primaries, or the server
    /// behind a name, may have changed (a failover).
    changed: Arc<Notify>,
    /// Set once a connection error was logged, cleared on reconnect: one line per outage.
    error_logged: AtomicBool,
    /// Our watchers and prober, and fred's connection tasks, ended when the store is dropped.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
    connections: std::sync::Mutex<Vec<fred::types::ConnectHandle>>,
    /// The store of the same Redis that checks it at once when this one's breaker opens.
    alarms: std::sync::OnceLock<Weak<Inner>>,
}

/// Redis behind the gate: one connection, or one per proxy worker, sharing one breaker. Cheap to
/// clone.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl RedisStore {
    /// One connection, driven by the calling runtime, connecting in the background (never waits
    /// for Redis). Must be called inside a tokio runtime: fred's tasks and the prober run on it.
    pub fn start(target: &RedisTarget, role: Role, registrar: &Registrar<'_>) -> Result<RedisStore, StoreError> {
        let store = Self::build(target, role, 1, registrar)?;
        let handles = store.inner.pool.connect_pool();
        store.inner.connections.lock().unwrap_or_else(|p| p.into_inner()).extend(handles);
        Ok(store)
    }

    /// One connection per proxy worker, each connected and driven by its worker's own runtime
    /// once the worker calls [`RedisStore::attach`]. A request then talks to Redis without
    /// handing its command to another thread and back (measured on the rate limiter: 5-13% less
    /// proxy CPU per check than two connections on the main runtime). Must be called inside a
    /// tokio runtime (the prober runs on it).
    pub fn start_per_worker(
        target: &RedisTarget,
        role: Role,
        workers: usize,
        registrar: &Registrar<'_>,
    ) -> Result<RedisStore, StoreError> {
        Self::build(target, role, workers, registrar)
    }

    /// Called by proxy worker `index` on its own runtime: connect its connection here, and send
    /// this thread's commands through it (through another connection while it is down).
    pub fn attach(&self, index: usize) {
        let Some(client) = self.inner.pool.clients().get(index) else { return };
        HOME.set(index);
        let handle = client.connect();
        self.inner.connections.lock().unwrap_or_else(|p| p.into_inner()).push(handle);
    }

    fn build(
        target: &RedisTarget,
        role: Role,
        connections: usize,
        registrar: &Registrar<'_>,
    ) -> Result<RedisStore, StoreError> {
        let config = &target.config;
        let pool = Builder::from_config(target.fred.clone())
            .set_policy(ReconnectPolicy::new_exponential(0, RECONNECT_MIN_MS, RECONNECT_MAX_MS, 2))
            .with_connection_config(|c| {
                c.connection_timeout = CONNECT_TIMEOUT;
                c.internal_command_timeout = CONNECT_TIMEOUT;
                c.max_command_attempts = 1;
                c.max_command_buffer_len = COMMAND_BUFFER;
                c.tcp.nodelay = Some(true);
            })
            .with_performance_config(|p| p.default_command_timeout = config.op_timeout)
            .build_pool(connections.max(1))
            .map_err(StoreError::Redis)?;

        let client = role.as_str();
        let ops = Op::ALL
            .iter()
            .map(|op| OpMetrics {
                duration: registrar.histogram(REDIS_OP_DURATION, &[("client", client), ("op", op.as_str())]),
                errors: StoreError::KINDS.map(|kind| {
                    registrar.counter(REDIS_ERRORS_TOTAL, &[("client", client), ("op", op.as_str()), ("kind", kind)])
                }),
            })
            .collect();
        let inner = Arc::new(Inner {
            budget: config.op_timeout,
            cooldown: config.breaker_cooldown,
            breaker: Breaker::new(config.breaker_failures.get()),
            permits: Semaphore::new(MAX_IN_FLIGHT),
            opened: Arc::new(Notify::new()),
            ops,
            up: registrar.gauge(REDIS_UP, &[("client", client)]),
            nodes: registrar.gauge(REDIS_NODES, &[("client", client)]),
            connected_nodes: registrar.gauge(REDIS_CONNECTED_NODES, &[("client", client)]),
            changed: Arc::new(Notify::new()),
            reconnections: std::sync::atomic::AtomicU64::new(0),
            error_logged: AtomicBool::new(false),
            tasks: std::sync::Mutex::new(Vec::new()),
            connections: std::sync::Mutex::new(Vec::new()),
            alarms: std::sync::OnceLock::new(),
            pool,
            target: target.clone(),
            role,
        });
        inner.up.set(0.0);
        let tls = if config.tls.is_some() { "true" } else { "false" };
        registrar.gauge(REDIS_INFO, &[("client", client), ("mode", config.topology.mode()), ("tls", tls)]).set(1.0);
        let mut tasks: Vec<JoinHandle<()>> =
            (0..inner.pool.size()).map(|i| tokio::spawn(watch_connection(Arc::downgrade(&inner), i))).collect();
        tasks.push(tokio::spawn(probe(Arc::downgrade(&inner), inner.opened.clone())));
        tasks.push(tokio::spawn(refresh_topology(Arc::downgrade(&inner))));
        *inner.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        Ok(RedisStore { inner })
    }

    /// When this store's breaker opens, `other` (a store of the same Redis) stops using Redis
    /// at once and PINGs it with one budget: back in use when it answers (nothing reconnected,
    /// nothing it read is distrusted), open with the usual cool-down and reconnection when not.
    /// So when Redis hangs, the requests that reach `other` after this store has found out pay
    /// no budget, and trouble of this store's own costs `other` one budget of bypass at most.
    /// The rate limiter alarms the cache: every rate-limited request checks Redis, so it is the
    /// first to find out. Set once; later calls change nothing.
    pub fn alarms(&self, other: &RedisStore) {
        let _ = self.inner.alarms.set(Arc::downgrade(&other.inner));
    }

    /// The breaker state.
    pub fn state(&self) -> BreakerState {
        self.inner.breaker.state()
    }

    /// Whether fred holds a connection now (any of the pool's).
    pub fn connected(&self) -> bool {
        self.inner.pool.clients().iter().any(|c| c.is_connected())
    }

    /// Mode, TLS, and the nodes known and connected now.
    pub fn topology(&self) -> Topology {
        self.inner.target.topology(&self.inner.pool)
    }

    /// What this store is for.
    pub fn role(&self) -> Role {
        self.inner.role
    }

    /// The validated `[redis]`.
    pub fn config(&self) -> &crate::config::RedisConfig {
        &self.inner.target.config
    }

    /// The TLS client settings, for `rediss*://`.
    pub fn tls(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.inner.target.tls.clone()
    }

    /// What Redis said is still known to hold: the breaker is closed, a connection is up, and
    /// no client has (re)connected since `since` was read from [`RedisStore::continuity`].
    pub fn continuous(&self, since: u64) -> bool {
        self.state() == BreakerState::Up && self.connected() && self.continuity() == since
    }

    /// A number that changes whenever a client of the store (re)connects.
    pub fn continuity(&self) -> u64 {
        self.inner.reconnections.load(Ordering::SeqCst)
    }

    /// Notified at every (re)connection of the store's clients and every change of a cluster's
    /// slot map.
    pub fn changes(&self) -> Arc<Notify> {
        self.inner.changed.clone()
    }

    /// The primaries commands go to now, as fred knows them (nothing is sent).
    pub fn primaries(&self) -> Vec<super::tracking::Node> {
        self.inner.target.primaries(&self.inner.pool)
    }

    /// GET; `None` when the key is absent.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        self.call(Op::Get, |c| c.get::<Option<Bytes>, _>(key)).await
    }

    /// SET with a millisecond expiry.
    pub async fn set(&self, key: &str, value: Bytes, ttl: Duration) -> Result<(), StoreError> {
        let ms = ttl.as_millis().clamp(1, i64::MAX as u128) as i64;
        self.call(Op::Set, |c| c.set::<(), _, _>(key, value, Some(Expiration::PX(ms)), None, false)).await
    }

    /// SET NX with a millisecond expiry: whether the key was set (it did not exist).
    pub async fn set_nx(&self, key: &str, value: &str, ttl: Duration) -> Result<bool, StoreError> {
        let ms = ttl.as_millis().clamp(1, i64::MAX as u128) as i64;
        let expiry = Some(Expiration::PX(ms));
        let reply =
            self.call(Op::Lease, |c| c.set::<Option<String>, _, _>(key, value, expiry, Some(SetOptions::NX), false));
        reply.await.map(|reply| reply.is_some())
    }

    /// DEL of a key that still holds `value` (a lease that is still ours), in one script.
    pub async fn del_if(&self, key: &str, value: &str) -> Result<(), StoreError> {
        static DEL_IF: std::sync::LazyLock<Script> = std::sync::LazyLock::new(|| {
            Script::from_lua(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0",
            )
        });
        self.script::<i64>(Op::Release, &DEL_IF, key, vec![value.into()]).await.map(drop)
    }

    /// DEL.
    pub async fn del(&self, key: &str) -> Result<(), StoreError> {
        self.call(Op::Del, |c| c.del::<(), _>(key)).await
    }

    /// INCR, returning the new value.
    pub async fn incr(&self, key: &str) -> Result<i64, StoreError> {
        self.call(Op::Incr, |c| c.incr::<i64, _>(key)).await
    }

    /// HGET of one field.
    pub async fn hget(&self, key: &str, field: &str) -> Result<Option<Bytes>, StoreError> {
        self.call(Op::Hget, |c| c.hget::<Option<Bytes>, _, _>(key, field)).await
    }

    /// HMGET of two fields.
    pub async fn hmget2(&self, key: &str, a: &str, b: &str) -> Result<(Option<Bytes>, Option<Bytes>), StoreError> {
        self.call(Op::Hmget, |c| c.hmget::<(Option<Bytes>, Option<Bytes>), _, _>(key, vec![a, b])).await
    }

    /// HSET variants of a path, which live `keep_for`; how many were written: none when the new
    /// ones would take the path past `max_variants` live ones. One script on one key
    /// (cluster-safe).
    ///
    /// Redis expires keys, not hash fields (HPEXPIRE needs 7.4), so the hash keeps an index
    /// field `~` of `variant expiry-ms` pairs (Redis `TIME`, so replicas agree): each write
    /// deletes the variants that have expired and sets the key to live as long as its
    /// longest-lived variant, so expired variants of a path with many `vary` values or hosts
    /// never accumulate. A new variant never displaces a live one (a write of existing ones is
    /// always made): otherwise anyone could evict a popular entry by asking for the same path under
    /// `max_variants` invented hosts.
    pub async fn hset_variants(
        &self,
        key: &str,
        fields: Vec<(String, Bytes)>,
        keep_for: Duration,
        max_variants: usize,
    ) -> Result<usize, StoreError> {
        static HSET_VARIANTS: std::sync::LazyLock<Script> =
            std::sync::LazyLock::new(|| Script::from_lua(HSET_VARIANTS_LUA));
        let ms = keep_for.as_millis().clamp(1, 1 << 50) as i64;
        let cap = max_variants.clamp(1, 1 << 20) as i64;
        let mut args: Vec<Value> = Vec::with_capacity(2 + 2 * fields.len());
        args.extend([ms.into(), cap.into()]);
        for (field, value) in fields {
            args.extend([field.into(), value.into()]);
        }
        self.script::<i64>(Op::Hset, &HSET_VARIANTS, key, args).await.map(|n| n.max(0) as usize)
    }

    /// Run a one-key script by EVALSHA, loading it again after NOSCRIPT (a restarted or
    /// failed-over server has lost its script cache). A NOSCRIPT reply means the script did not
    /// run, so the second EVALSHA is no replay. Both stay within the one budget of the gate.
    pub async fn script<T: FromValue>(
        &self,
        op: Op,
        script: &Script,
        key: &str,
        args: Vec<Value>,
    ) -> Result<T, StoreError> {
        self.call(op, |c| script.evalsha_with_reload::<T, _, _>(c, key, args)).await
    }

    /// HDEL of one field.
    pub async fn hdel(&self, key: &str, field: &str) -> Result<(), StoreError> {
        self.call(Op::Hdel, |c| c.hdel::<(), _, _>(key, field)).await
    }

    /// GET of an integer counter; 0 when absent.
    pub async fn get_counter(&self, key: &str) -> Result<u64, StoreError> {
        self.call(Op::Get, |c| c.get::<Option<u64>, _>(key)).await.map(Option::unwrap_or_default)
    }

    /// The gate: every operation passes here.
    async fn call<'a, T, F, Fut>(&'a self, op: Op, send: F) -> Result<T, StoreError>
    where
        F: FnOnce(&'a Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, FredError>> + 'a,
    {
        let inner = &self.inner;
        // A child of the request's span (only inside one: background loops are not traced).
        let span = tracing::debug_span!(
            "redis",
            otel.name = op.as_str(),
            otel.kind = "client",
            db.system.name = "redis",
            db.operation.name = op.as_str(),
            sidecache.redis.client = inner.role.as_str(),
            error.type = Empty,
            otel.status_code = Empty,
        );
        let result = gate(inner, op, send).instrument(span.clone()).await;
        if let Err(e) = &result {
            inner.ops[op as usize].errors[e.kind_index()].increment(1);
            telemetry::record_error(&span, e.kind());
        }
        result
    }
}

async fn gate<'a, T, F, Fut>(inner: &'a Inner, op: Op, send: F) -> Result<T, StoreError>
where
    F: FnOnce(&'a Client) -> Fut,
    Fut: std::future::Future<Output = Result<T, FredError>> + 'a,
{
    // Checks that cost no await: the breaker, the connection, the in-flight cap.
    if !inner.breaker.allows() {
        return Err(StoreError::BreakerOpen);
    }
    let client = inner.client();
    if !client.is_connected() {
        inner.failure();
        return Err(StoreError::NotConnected);
    }
    let Ok(_permit) = inner.permits.try_acquire() else {
        return Err(StoreError::Saturated);
    };
    let started = Instant::now();
    let result = tokio::time::timeout(inner.budget, send(client)).await;
    inner.ops[op as usize].duration.record(started.elapsed().as_secs_f64());
    match result {
        Ok(Ok(value)) => {
            inner.breaker.success();
            Ok(value)
        }
        Ok(Err(e)) => {
            // A server's reply error (wrong type, OOM under noeviction) says Redis is alive;
            // only failures to reach it feed the breaker.
            if is_unreachable(&e) {
                inner.failure();
            }
            // fred's own timeout is set to the same budget and may fire first: same outcome.
            if *e.kind() == ErrorKind::Timeout {
                return Err(StoreError::Timeout);
            }
            Err(StoreError::Redis(e))
        }
        Err(_) => {
            inner.failure();
            Err(StoreError::Timeout)
        }
    }
}

fn is_unreachable(e: &FredError) -> bool {
    matches!(
        e.kind(),
        ErrorKind::IO | ErrorKind::Timeout | ErrorKind::Canceled | ErrorKind::Backpressure | ErrorKind::Routing
    )
}

impl Inner {
    /// This thread's own connection when it has one and it is up, else any connected one.
    fn client(&self) -> &Client {
        let clients = self.pool.clients();
        match clients.get(HOME.get()) {
            Some(own) if own.is_connected() => own,
            _ => self.pool.next_connected(),
        }
    }

    fn failure(&self) {
        if self.breaker.failure() {
            // The one transition to down: log once, tell the prober.
            self.up.set(0.0);
            self.log_lost();
            self.opened.notify_one();
            if let Some(other) = self.alarms.get().and_then(Weak::upgrade) {
                other.suspect();
            }
        }
    }

    /// Another store of this Redis lost it ([`RedisStore::alarms`]): bypass Redis at once; the
    /// prober (this store's own task, on its own runtime) checks it.
    fn suspect(&self) {
        if self.breaker.suspect() {
            self.opened.notify_one();
        }
    }

    /// The one line of a transition to down.
    fn log_lost(&self) {
        tracing::warn!(client = self.role.as_str(), cooldown = ?self.cooldown, "redis lost: bypassing it until a probe succeeds");
    }

    /// One PING within the budget: whether Redis answered.
    async fn ping(&self) -> bool {
        let started = Instant::now();
        let ping = tokio::time::timeout(self.budget, self.pool.next_connected().ping::<String>(None)).await;
        self.ops[Op::Ping as usize].duration.record(started.elapsed().as_secs_f64());
        matches!(ping, Ok(Ok(_)))
    }
}

/// Logs and reflects the (re)connections of the pool's client `index`, and logs why connecting
/// failed (refused, TLS handshake, authentication): the first error of an outage only, as the
/// reconnect policy retries up to every second. Holds only a weak reference, so dropping the
/// store ends it.
async fn watch_connection(inner: Weak<Inner>, index: usize) {
    let Some((mut reconnects, mut errors, mut resharded)) = inner.upgrade().map(|i| {
        let client = &i.pool.clients()[index];
        (client.reconnect_rx(), client.error_rx(), client.cluster_change_rx())
    }) else {
        return;
    };
    let mut first = true;
    loop {
        tokio::select! {
            change = resharded.recv() => {
                if matches!(change, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    return;
                }
                let Some(inner) = inner.upgrade() else { return };
                inner.changed.notify_one();
            }
            reconnected = reconnects.recv() => {
                if reconnected.is_err() {
                    return;
                }
                let Some(inner) = inner.upgrade() else { return };
                // A first connection follows nothing that could have been lost.
                if !std::mem::replace(&mut first, false) {
                    inner.reconnections.fetch_add(1, Ordering::SeqCst);
                }
                inner.changed.notify_one();
                inner.error_logged.store(false, Ordering::Relaxed);
                if inner.breaker.allows() {
                    inner.up.set(1.0);
                }
                tracing::debug!(client = inner.role.as_str(), "redis connection established");
            }
            error = errors.recv() => {
                let Ok((error, _server)) = error else { return };
                let Some(inner) = inner.upgrade() else { return };
                if !inner.error_logged.swap(true, Ordering::Relaxed) {
                    let url = &inner.target.config.url;
                    tracing::warn!(client = inner.role.as_str(), url, error = %error, "redis connection failed");
                }
            }
        }
    }
}

/// Keeps the topology gauges current (fred's state is read; nothing is sent to Redis).
async fn refresh_topology(weak: Weak<Inner>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(inner) = weak.upgrade() else { return };
        let topology = inner.target.topology(&inner.pool);
        inner.nodes.set(topology.nodes.len() as f64);
        inner.connected_nodes.set(topology.connected_nodes as f64);
    }
}

/// The prober: after the breaker opens, waits the cool-down, then PINGs with the budget; success
/// closes the breaker (after another client's alarm it PINGs at once, see
/// [`RedisStore::alarms`]). When the breaker opened although fred still reports a connection,
/// the server is hung (SIGSTOP, network black hole): force a reconnection so later calls fail
/// fast.
async fn probe(weak: Weak<Inner>, opened: Arc<Notify>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        match inner.breaker.state() {
            BreakerState::Up => {
                drop(inner);
                opened.notified().await;
                continue;
            }
            // Suspected on another client's alarm (this loop probes only from Down, and not at
            // this point): one check at once, no reconnection, nothing distrusted if Redis
            // answers; the usual path when it does not.
            BreakerState::Probing => {
                inner.up.set(0.0);
                let client = inner.role.as_str();
                tracing::info!(client, "redis lost by another client: checking it now, bypassing it meanwhile");
                let healthy = inner.ping().await;
                inner.breaker.end_probe(healthy);
                if healthy {
                    inner.up.set(1.0);
                    tracing::info!(client, "redis answered the check: using it again");
                } else {
                    inner.log_lost();
                }
                continue;
            }
            BreakerState::Down => {}
        }
        for client in inner.pool.clients().iter().filter(|c| c.is_connected()) {
            let client = client.clone();
            let budget = inner.budget;
            tokio::spawn(async move {
                let _ = tokio::time::timeout(budget.max(CONNECT_TIMEOUT), client.force_reconnection()).await;
            });
        }
        let cooldown = inner.cooldown;
        drop(inner);
        tokio::time::sleep(cooldown).await;

        let Some(inner) = weak.upgrade() else { return };
        if !inner.breaker.begin_probe() {
            continue;
        }
        let healthy = inner.ping().await;
        inner.breaker.end_probe(healthy);
        if healthy {
            inner.up.set(1.0);
            tracing::info!(client = inner.role.as_str(), down_for_at_least = ?cooldown, "redis back: using it again");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in self.tasks.get_mut().unwrap_or_else(|p| p.into_inner()).drain(..) {
            task.abort();
        }
        for connection in self.connections.get_mut().unwrap_or_else(|p| p.into_inner()).drain(..) {
            connection.abort();
        }
    }
}
