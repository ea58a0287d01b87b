//! Keeping the in-process hot tier true (DESIGN.md 4): one connection per Redis primary with
//! `CLIENT TRACKING ON BCAST` on the cache's key prefixes. Redis sends each of them the name of
//! every key any client changes (written, deleted, expired, evicted) under those prefixes, and
//! `null` for a `FLUSHALL`; [`Tracking::trusts`] holds an entry read from Redis only while every
//! link is known to be tracking and no invalidation of its key has arrived since the read began.
//!
//! A connection of our own rather than fred's tracking interface, whose gaps (fred 10.1.0, read in
//! its source) would each let a replica serve what another had purged: it drops RESP3 `null`
//! invalidations (`broadcast_resp3_invalidation` reads arrays only), sends BCAST tracking to one
//! cluster node only, ends `on_invalidation` silently when its 32-message channel lags, and does
//! not track again after a reconnect. RESP3 rather than RESP2 with `REDIRECT`: invalidations
//! arrive as push messages on the connection that asked for them, so one connection per primary
//! is the whole link, and a `PING` answered on it proves that nothing before it was lost.
//! Framing is the `redis-protocol` crate that fred itself uses.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use bytes::BytesMut;
use metrics::{Counter, Gauge};
use redis_protocol::resp3::decode::complete::decode_bytes_mut;
use redis_protocol::resp3::types::{BytesFrame, Resp3Frame as _};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::redis::RedisStore;
use crate::metrics::{Metrics, HOT_TIER_FLUSHES_TOTAL, HOT_TIER_INVALIDATIONS_TOTAL, REDIS_TRACKING_UP};

/// Buckets of the invalidation table: two keys sharing one only cost an extra Redis read.
const MARKS: usize = 1 << 16;
/// A `PING` is sent on a link this often...
const PING_EVERY: Duration = Duration::from_millis(250);
/// ...and a link whose `PING` goes unanswered this long is lost: the bound on how long a silent
/// break (a partition, a hung server) leaves the tier trusting what it holds.
const PING_TIMEOUT: Duration = Duration::from_millis(750);
/// Connecting and the handshake, each.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Reconnect backoff: from this, doubling up to `RETRY_MAX`.
const RETRY_MIN: Duration = Duration::from_millis(50);
/// See `RETRY_MIN`.
const RETRY_MAX: Duration = Duration::from_secs(1);
/// How often a server that cannot track (no RESP3, no BCAST: Dragonfly, Redis before 6) is asked again.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(30);
/// A frame larger than this ends the link (invalidation messages are a few key names).
const MAX_FRAME: usize = 64 << 20;
/// How often the set of primaries is compared with fred's view when nothing signals a change.
const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);

/// When an entry was read: the healthy period then (0: none) and the invalidations received
/// before the read was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    epoch: u64,
    seq: u64,
}

impl Mark {
    /// Whether tracking was healthy when the read began.
    pub fn tracked(&self) -> bool {
        self.epoch != 0
    }
}

/// How far an entry read under a [`Mark`] may be trusted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// Every link has tracked its key since it was read, and it has not changed: until its
    /// freshness ends.
    UntilFresh,
    /// Tracking is down: for `hot_ttl` from its admission, as without tracking.
    Briefly,
    /// Its key changed since it was read, or tracking was re-established since (invalidations may
    /// have been missed in between): not at all.
    No,
}

/// Why every entry held in process was dropped; the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// A link broke, went silent, or could not be established.
    LinkLost,
    /// Redis announced that every key is gone (`FLUSHALL`, `FLUSHDB`).
    Flushall,
    /// The primaries changed (a failover, a cluster topology change).
    Topology,
}

impl Flush {
    const ALL: [Flush; 3] = [Flush::LinkLost, Flush::Flushall, Flush::Topology];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Flush::LinkLost => "link_lost",
            Flush::Flushall => "flushall",
            Flush::Topology => "topology",
        }
    }
}

/// What the links report to the cache besides the trust they keep.
pub enum Event<'a> {
    /// Drop everything held in process.
    Flushed(Flush),
    /// The generation counter of this route changed (a route purge on some replica).
    Generation(&'a str),
}

/// A Redis primary to track.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Node {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The name its TLS certificate is checked against.
    pub tls_name: String,
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host.contains(':') {
            true => write!(f, "[{}]:{}", self.host, self.port),
            false => write!(f, "{}:{}", self.host, self.port),
        }
    }
}

type OnEvent = Box<dyn Fn(Event<'_>) + Send + Sync>;

/// The tracking links of one Redis store and the trust they keep. Dropping it ends the links.
pub struct Tracking {
    shared: Arc<Shared>,
    manager: JoinHandle<()>,
}

struct Shared {
    /// Nonzero while every wanted link tracks: the id of this healthy period.
    epoch: AtomicU64,
    /// Invalidations received (and made locally) so far.
    seq: AtomicU64,
    /// Per bucket of key names, the `seq` of the latest invalidation that fell in it.
    marks: Box<[AtomicU64]>,
    hasher: std::hash::RandomState,
    prefixes: Vec<String>,
    generation_prefix: String,
    on_event: OnEvent,
    links: Mutex<Links>,
    /// Woken at every invalidation from Redis and every flush.
    changed: tokio::sync::Notify,
    invalidations: Counter,
    flushes: [Counter; Flush::ALL.len()],
    metrics: Arc<Metrics>,
    client: &'static str,
}

#[derive(Default)]
struct Links {
    wanted: Vec<Node>,
    tracking: HashSet<Node>,
    next_epoch: u64,
    /// A link was ever healthy (the first one is no news to log).
    was_healthy: bool,
}

impl Tracking {
    /// Track the keys under `prefixes` on every primary `store` sends commands to, following
    /// failovers and topology changes. `generation_prefix` (one of `prefixes`) starts the keys
    /// whose change is reported as [`Event::Generation`] with the rest of the key name. Spawns on
    /// the calling runtime.
    pub fn start(
        store: &RedisStore,
        prefixes: Vec<String>,
        generation_prefix: String,
        metrics: Arc<Metrics>,
        on_event: OnEvent,
    ) -> Tracking {
        let client = store.role().as_str();
        let reg = metrics.registrar();
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            marks: (0..MARKS).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::hash::RandomState::new(),
            prefixes,
            generation_prefix,
            on_event,
            links: Mutex::new(Links { next_epoch: 1, ..Links::default() }),
            changed: tokio::sync::Notify::new(),
            invalidations: reg.counter(HOT_TIER_INVALIDATIONS_TOTAL, &[]),
            flushes: Flush::ALL.map(|f| reg.counter(HOT_TIER_FLUSHES_TOTAL, &[("reason", f.as_str())])),
            client,
            metrics: metrics.clone(),
        });
        let manager = tokio::spawn(manage(Arc::downgrade(&shared), store.clone()));
        Tracking { shared, manager }
    }

    /// Taken before an entry is read from Redis, kept with it.
    pub fn mark(&self) -> Mark {
        // The epoch first: a link lost between the two loads leaves a mark that is already stale.
        let epoch = self.shared.epoch.load(Ordering::SeqCst);
        Mark { epoch, seq: self.shared.seq.load(Ordering::SeqCst) }
    }

    /// How far an entry of `key` read under `mark` may be trusted now.
    pub fn trusts(&self, key: &str, mark: Mark) -> Trust {
        if self.shared.bucket(key.as_bytes()).load(Ordering::SeqCst) > mark.seq {
            return Trust::No;
        }
        match self.shared.epoch.load(Ordering::SeqCst) {
            0 => Trust::Briefly,
            now if now == mark.epoch => Trust::UntilFresh,
            _ => Trust::No,
        }
    }

    /// `key` changed here (a purge made through this replica): no entry read before trusts it,
    /// before Redis's own message for it arrives.
    pub fn invalidate(&self, key: &str) {
        self.shared.invalidate(key.as_bytes());
    }

    /// Whether Redis may have changed `key` since `since` was taken: an invalidation of it
    /// arrived, or tracking was lost or began again (which may have hidden one).
    pub fn changed_since(&self, key: &str, since: Mark) -> bool {
        let s = &self.shared;
        s.bucket(key.as_bytes()).load(Ordering::SeqCst) > since.seq || s.epoch.load(Ordering::SeqCst) != since.epoch
    }

    /// Wait until [`Tracking::changed_since`] holds for one of `keys`, or until `deadline`.
    pub async fn changed(&self, keys: &[&str], since: Mark, deadline: Instant) {
        loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            // Registered before the check, so a change between the two is not missed.
            notified.as_mut().enable();
            if keys.iter().any(|k| self.changed_since(k, since)) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return;
            }
        }
    }

    /// Whether every link tracks now.
    pub fn healthy(&self) -> bool {
        self.shared.epoch.load(Ordering::SeqCst) != 0
    }
}

impl Drop for Tracking {
    fn drop(&mut self) {
        self.manager.abort();
    }
}

impl Shared {
    fn bucket(&self, key: &[u8]) -> &AtomicU64 {
        &self.marks[self.hasher.hash_one(key) as usize % MARKS]
    }

    fn invalidate(&self, key: &[u8]) {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.bucket(key).fetch_max(seq, Ordering::SeqCst);
    }

    /// A key Redis says changed.
    fn invalidated(&self, key: &[u8]) {
        self.invalidate(key);
        self.invalidations.increment(1);
        self.changed.notify_waiters();
        if let Some(route) = key.strip_prefix(self.generation_prefix.as_bytes()) {
            if let Ok(route) = std::str::from_utf8(route) {
                (self.on_event)(Event::Generation(route));
            }
        }
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// End the healthy period (if any) and drop what the tier holds.
    fn flush(&self, links: &mut Links, why: Flush) {
        self.epoch.store(0, Ordering::SeqCst);
        self.flushes[why as usize].increment(1);
        (self.on_event)(Event::Flushed(why));
        self.begin_if_healthy(links);
        self.changed.notify_waiters();
    }

    /// Begin a new healthy period when every wanted link tracks.
    fn begin_if_healthy(&self, links: &mut Links) {
        let healthy = !links.wanted.is_empty() && links.wanted.iter().all(|n| links.tracking.contains(n));
        if healthy && self.epoch.load(Ordering::SeqCst) == 0 {
            self.epoch.store(links.next_epoch, Ordering::SeqCst);
            links.next_epoch += 1;
            match std::mem::replace(&mut links.was_healthy, true) {
                true => tracing::info!(
                    client = self.client,
                    "redis invalidations tracked again: in-process entries kept until their freshness ends"
                ),
                false => {
                    tracing::debug!(client = self.client, nodes = links.wanted.len(), "redis invalidations tracked")
                }
            }
        }
    }

    /// The primaries changed: the links to follow now.
    fn want(&self, nodes: Vec<Node>) {
        let mut links = self.links();
        links.wanted = nodes;
        let Links { wanted, tracking, .. } = &mut *links;
        tracking.retain(|n| wanted.contains(n));
        self.flush(&mut links, Flush::Topology);
    }

    fn tracking(&self, node: &Node, on: bool) {
        let mut links = self.links();
        match on {
            true => {
                links.tracking.insert(node.clone());
                self.begin_if_healthy(&mut links);
            }
            false => {
                if links.tracking.remove(node) {
                    if self.epoch.load(Ordering::SeqCst) != 0 {
                        tracing::warn!(client = self.client, %node, "redis invalidation link lost: in-process entries dropped, then kept for hot_ttl at most until it is back");
                    }
                    self.flush(&mut links, Flush::LinkLost);
                }
            }
        }
        self.up_gauge(node).set(if on { 1.0 } else { 0.0 });
    }

    fn up_gauge(&self, node: &Node) -> Gauge {
        let node = node.to_string();
        self.metrics.registrar().gauge(REDIS_TRACKING_UP, &[("client", self.client), ("node", &node)])
    }
}

/// Follows the primaries fred sends commands to, with one link task each.
async fn manage(shared: Weak<Shared>, store: RedisStore) {
    let changed = store.changes();
    let mut links: HashMap<Node, AbortOnDrop> = HashMap::new();
    let mut current: Vec<Node> = Vec::new();
    loop {
        let mut nodes = store.primaries();
        nodes.sort();
        nodes.dedup();
        if nodes != current {
            let Some(s) = shared.upgrade() else { return };
            for gone in current.iter().filter(|n| !nodes.contains(n)) {
                links.remove(gone);
                s.up_gauge(gone).set(0.0);
            }
            if !current.is_empty() || nodes.is_empty() {
                tracing::debug!(client = s.client, from = ?current, to = ?nodes, "redis primaries changed");
            }
            s.want(nodes.clone());
            for node in &nodes {
                if !links.contains_key(node) {
                    s.up_gauge(node).set(0.0);
                    let task = tokio::spawn(link(shared.clone(), node.clone(), store.clone()));
                    links.insert(node.clone(), AbortOnDrop(task));
                }
            }
            current = nodes;
        }
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(TOPOLOGY_EVERY) => {}
        }
    }
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a link ended.
#[derive(Debug)]
enum Ended {
    /// The server cannot track this way; asking again soon is pointless.
    Unsupported(String),
    /// Anything else: reconnect with backoff. Whether it had been tracking.
    Failed(String, bool),
}

/// One primary's link, kept up for as long as the node is wanted.
async fn link(shared: Weak<Shared>, node: Node, store: RedisStore) {
    let mut delay = RETRY_MIN;
    let mut logged = false;
    loop {
        let ended = run(&shared, &node, &store).await;
        let Some(s) = shared.upgrade() else { return };
        s.tracking(&node, false);
        let wait = match ended {
            Ended::Unsupported(why) => {
                if !logged {
                    tracing::warn!(client = s.client, %node, reason = why, "redis cannot track invalidations (RESP3 and CLIENT TRACKING BCAST need Redis 6 or later; Dragonfly has no BCAST): in-process entries are kept for hot_ttl at most");
                    logged = true;
                }
                UNSUPPORTED_RETRY
            }
            Ended::Failed(why, was_tracking) => {
                if was_tracking {
                    (delay, logged) = (RETRY_MIN, false);
                }
                if !logged {
                    tracing::debug!(client = s.client, %node, reason = why, "redis invalidation link failed; retrying");
                    logged = true;
                }
                let wait = delay;
                delay = (delay * 2).min(RETRY_MAX);
                wait
            }
        };
        drop(s);
        tokio::time::sleep(wait).await;
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connect, ask for tracking, then apply invalidations until the link breaks or goes silent.
async fn run(shared: &Weak<Shared>, node: &Node, store: &RedisStore) -> Ended {
    let fail = |why: String| Ended::Failed(why, false);
    let mut io = match tokio::time::timeout(CONNECT_TIMEOUT, connect(node, store)).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => return fail(e),
        Err(_) => return fail("connect timed out".into()),
    };
    let mut buf = BytesMut::with_capacity(4096);
    let config = store.config();
    let mut hello: Vec<&[u8]> = vec![b"HELLO", b"3"];
    if let Some(password) = &config.password {
        hello.extend([
            b"AUTH".as_slice(),
            config.username.as_deref().unwrap_or("default").as_bytes(),
            password.as_bytes(),
        ]);
    }
    hello.extend([b"SETNAME".as_slice(), b"sidecache-tracking"]);
    let mut tracking: Vec<&[u8]> = vec![b"CLIENT", b"TRACKING", b"ON", b"BCAST"];
    let Some(s) = shared.upgrade() else { return fail("stopped".into()) };
    let prefixes = s.prefixes.clone();
    drop(s);
    for prefix in &prefixes {
        tracking.extend([b"PREFIX".as_slice(), prefix.as_bytes()]);
    }
    for (command, unsupported) in [(&hello, "HELLO 3"), (&tracking, "CLIENT TRACKING BCAST")] {
        let reply = async {
            io.write_all(&encode(command)).await.map_err(|e| e.to_string())?;
            read_frame(&mut io, &mut buf).await
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, reply).await {
            Ok(Ok(BytesFrame::SimpleError { data, .. })) => return refused(&data, unsupported),
            Ok(Ok(BytesFrame::BlobError { data, .. })) => return refused(&String::from_utf8_lossy(&data), unsupported),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return fail(e),
            Err(_) => return fail(format!("{unsupported} timed out")),
        }
    }
    let Some(s) = shared.upgrade() else { return fail("stopped".into()) };
    s.tracking(node, true);
    drop(s);

    let mut awaiting_pong: Option<Instant> = None;
    let mut next_ping = Instant::now() + PING_EVERY;
    loop {
        let frame = match tokio::time::timeout_at(next_ping, read_frame(&mut io, &mut buf)).await {
            Ok(Ok(frame)) => frame,
            Ok(Err(e)) => return Ended::Failed(e, true),
            Err(_) => {
                let now = Instant::now();
                if awaiting_pong.is_some_and(|sent| now.duration_since(sent) >= PING_TIMEOUT) {
                    return Ended::Failed("PING unanswered".into(), true);
                }
                if awaiting_pong.is_none() {
                    let ping = tokio::time::timeout(PING_TIMEOUT, io.write_all(b"*1\r\n$4\r\nPING\r\n")).await;
                    if !matches!(ping, Ok(Ok(()))) {
                        return Ended::Failed("PING not sent".into(), true);
                    }
                    awaiting_pong = Some(now);
                }
                next_ping = now + PING_EVERY;
                continue;
            }
        };
        let Some(s) = shared.upgrade() else { return fail("stopped".into()) };
        match frame {
            BytesFrame::Push { data, .. } => match data.as_slice() {
                [kind, keys] if kind.as_bytes() == Some(b"invalidate".as_slice()) => match keys {
                    BytesFrame::Array { data: keys, .. } => {
                        for key in keys {
                            if let Some(key) = key.as_bytes() {
                                s.invalidated(key);
                            }
                        }
                    }
                    BytesFrame::Null => {
                        tracing::info!(client = s.client, %node, "redis flushed its keys: in-process entries dropped");
                        s.flush(&mut s.links(), Flush::Flushall);
                    }
                    _ => {}
                },
                _ => {}
            },
            BytesFrame::SimpleError { data, .. } => return Ended::Failed(data.to_string(), true),
            _ => awaiting_pong = None,
        }
    }
}

/// A handshake step refused: unsupported, or another failure (authentication, ...).
fn refused(error: &str, step: &str) -> Ended {
    let unsupported = error.starts_with("NOPROTO")
        || error.contains("unknown command")
        || error.contains("unknown subcommand")
        || (step.starts_with("CLIENT") && error.contains("syntax"));
    match unsupported {
        true => Ended::Unsupported(format!("{step}: {error}")),
        false => Ended::Failed(format!("{step}: {error}"), false),
    }
}

async fn connect(node: &Node, store: &RedisStore) -> Result<Box<dyn Io>, String> {
    let tcp = TcpStream::connect((node.host.as_str(), node.port)).await.map_err(|e| e.to_string())?;
    tcp.set_nodelay(true).map_err(|e| e.to_string())?;
    match store.tls() {
        None => Ok(Box::new(tcp)),
        Some(tls) => {
            let name = rustls::pki_types::ServerName::try_from(node.tls_name.clone()).map_err(|e| e.to_string())?;
            let stream = tokio_rustls::TlsConnector::from(tls).connect(name, tcp).await.map_err(|e| e.to_string())?;
            Ok(Box::new(stream))
        }
    }
}

/// A command as a RESP array of bulk strings.
fn encode(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for part in parts {
        out.extend_from_slice(format!("${}\r\n", part.len()).as_bytes());
        out.extend_from_slice(part);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The next whole frame, reading as needed.
async fn read_frame(io: &mut Box<dyn Io>, buf: &mut BytesMut) -> Result<BytesFrame, String> {
    loop {
        if !buf.is_empty() {
            match decode_bytes_mut(buf) {
                Ok(Some((frame, _, _))) => return Ok(frame),
                Ok(None) if buf.len() > MAX_FRAME => return Err("frame too large".into()),
                Ok(None) => {}
                Err(e) => return Err(format!("protocol error: {e:?}")),
            }
        }
        if io.read_buf(buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("closed by the server".into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        assert_eq!(encode(&[b"PING"]), b"*1\r\n$4\r\nPING\r\n");
        assert_eq!(encode(&[b"A", b""]), b"*2\r\n$1\r\nA\r\n$0\r\n\r\n");
    }

    #[test]
    fn unsupported_servers_are_told_from_failures() {
        assert!(matches!(refused("NOPROTO sorry", "HELLO 3"), Ended::Unsupported(_)));
        assert!(matches!(refused("ERR unknown command 'HELLO'", "HELLO 3"), Ended::Unsupported(_)));
        assert!(matches!(refused("ERR syntax error", "CLIENT TRACKING BCAST"), Ended::Unsupported(_)));
        assert!(matches!(refused("WRONGPASS invalid username-password pair", "HELLO 3"), Ended::Failed(_, false)));
    }
}
