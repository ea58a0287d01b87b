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

mod link;

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use metrics::{Counter, Gauge};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::redis::RedisStore;
use crate::metrics::{Metrics, HOT_TIER_FLUSHES_TOTAL, HOT_TIER_INVALIDATIONS_TOTAL, REDIS_TRACKING_UP};

/// Buckets of the invalidation table: two keys sharing one only cost an extra Redis read.
const MARKS: usize = 1 << 16;
/// A link that tracked this long before it was lost was stable: its loss is logged, and
/// reconnecting starts again from the shortest backoff.
const STABLE: Duration = Duration::from_secs(5);
/// Groups of buckets whose waiters are woken together.
const WAKERS: usize = 1 << 10;

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
    /// Per group of buckets, woken at each invalidation in one of them; all at a flush. A
    /// waiter is woken by its own keys' changes (and a few others'), not by every change.
    wakers: Box<[tokio::sync::Notify]>,
    invalidations: Counter,
    flushes: [Counter; Flush::ALL.len()],
    metrics: Arc<Metrics>,
    client: &'static str,
}

#[derive(Default)]
struct Links {
    wanted: Vec<Node>,
    /// The id of the link task that speaks for each wanted node: reports from an older one (ended
    /// by a relink, perhaps not yet stopped on another thread) are ignored.
    live: HashMap<Node, u64>,
    tracking: HashSet<Node>,
    next_epoch: u64,
    next_link: u64,
    /// When the current healthy period began.
    healthy_since: Option<Instant>,
    /// A loss was logged: the recovery is logged too.
    loss_logged: bool,
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
        let shared = Arc::new(Shared::new(prefixes, generation_prefix, metrics, store.role().as_str(), on_event));
        let manager = tokio::spawn(link::manage(Arc::downgrade(&shared), store.clone()));
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
            let mut woken: Vec<_> = keys.iter().map(|k| Box::pin(self.shared.waker(k.as_bytes()).notified())).collect();
            // Registered before the check, so a change between the two is not missed.
            woken.iter_mut().for_each(|n| {
                n.as_mut().enable();
            });
            if keys.iter().any(|k| self.changed_since(k, since)) {
                return;
            }
            if tokio::time::timeout_at(deadline, futures_util::future::select_all(woken)).await.is_err() {
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
    fn new(
        prefixes: Vec<String>,
        generation_prefix: String,
        metrics: Arc<Metrics>,
        client: &'static str,
        on_event: OnEvent,
    ) -> Shared {
        let reg = metrics.registrar();
        Shared {
            epoch: AtomicU64::new(0),
            seq: AtomicU64::new(0),
            marks: (0..MARKS).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::hash::RandomState::new(),
            prefixes,
            generation_prefix,
            on_event,
            links: Mutex::new(Links { next_epoch: 1, ..Links::default() }),
            wakers: (0..WAKERS).map(|_| tokio::sync::Notify::new()).collect(),
            invalidations: reg.counter(HOT_TIER_INVALIDATIONS_TOTAL, &[]),
            flushes: Flush::ALL.map(|f| reg.counter(HOT_TIER_FLUSHES_TOTAL, &[("reason", f.as_str())])),
            client,
            metrics: metrics.clone(),
        }
    }

    fn index(&self, key: &[u8]) -> usize {
        self.hasher.hash_one(key) as usize % MARKS
    }

    fn bucket(&self, key: &[u8]) -> &AtomicU64 {
        &self.marks[self.index(key)]
    }

    fn waker(&self, key: &[u8]) -> &tokio::sync::Notify {
        &self.wakers[self.index(key) % WAKERS]
    }

    /// Mark `key` changed; its bucket's index.
    fn invalidate(&self, key: &[u8]) -> usize {
        let (seq, index) = (self.seq.fetch_add(1, Ordering::SeqCst) + 1, self.index(key));
        self.marks[index].fetch_max(seq, Ordering::SeqCst);
        index
    }

    /// A key Redis says changed.
    fn invalidated(&self, key: &[u8]) {
        let index = self.invalidate(key);
        self.invalidations.increment(1);
        self.wakers[index % WAKERS].notify_waiters();
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
        self.wakers.iter().for_each(tokio::sync::Notify::notify_waiters);
    }

    /// Begin a new healthy period when every wanted link tracks.
    fn begin_if_healthy(&self, links: &mut Links) {
        let healthy = !links.wanted.is_empty() && links.wanted.iter().all(|n| links.tracking.contains(n));
        if healthy && self.epoch.load(Ordering::SeqCst) == 0 {
            self.epoch.store(links.next_epoch, Ordering::SeqCst);
            links.next_epoch += 1;
            links.healthy_since = Some(Instant::now());
            match std::mem::take(&mut links.loss_logged) {
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

    /// The primaries to follow now; those in `fresh` get a new link (the caller ends the old
    /// one): the ids of the new links.
    fn want(&self, nodes: Vec<Node>, fresh: &[Node]) -> Vec<(Node, u64)> {
        let mut links = self.links();
        links.wanted = nodes;
        let mut ids = Vec::with_capacity(fresh.len());
        for node in fresh {
            let id = links.next_link;
            links.next_link += 1;
            links.live.insert(node.clone(), id);
            links.tracking.remove(node);
            ids.push((node.clone(), id));
        }
        let Links { wanted, tracking, live, .. } = &mut *links;
        live.retain(|n, _| wanted.contains(n));
        tracking.retain(|n| wanted.contains(n));
        self.flush(&mut links, Flush::Topology);
        ids
    }

    /// Link `id` to `node` tracks now, or no longer does.
    fn tracking(&self, node: &Node, id: u64, on: bool) {
        let mut links = self.links();
        if links.live.get(node) != Some(&id) {
            return;
        }
        match on {
            true => {
                links.tracking.insert(node.clone());
                self.begin_if_healthy(&mut links);
            }
            false => {
                if links.tracking.remove(node) {
                    // A link that keeps failing soon after it tracks logs once, not every time.
                    let stable = links.healthy_since.take().is_some_and(|since| since.elapsed() >= STABLE);
                    if stable && !links.loss_logged {
                        links.loss_logged = true;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn node(port: u16) -> Node {
        Node { host: "127.0.0.1".into(), port, tls_name: "127.0.0.1".into() }
    }

    /// Tracking without links: the tests play the links' part.
    fn tracking(events: Arc<Mutex<Vec<String>>>) -> Tracking {
        let on_event: OnEvent = Box::new(move |e| {
            let e = match e {
                Event::Flushed(why) => format!("flushed {}", why.as_str()),
                Event::Generation(route) => format!("generation {route}"),
            };
            events.lock().unwrap().push(e);
        });
        let shared =
            Shared::new(vec!["p:c:".into(), "p:g:".into()], "p:g:".into(), Arc::new(Metrics::new()), "cache", on_event);
        Tracking { shared: Arc::new(shared), manager: tokio::spawn(async {}) }
    }

    #[tokio::test]
    async fn an_entry_is_trusted_while_every_link_tracks_and_its_key_is_unchanged() {
        let events = Arc::new(Mutex::new(Vec::new()));
        let t = tracking(events.clone());
        let untracked = t.mark();
        assert_eq!(t.trusts("p:c:a", untracked), Trust::Briefly, "no link yet");
        let ids = t.shared.want(vec![node(1), node(2)], &[node(1), node(2)]);
        let (one, two) = (ids[0].1, ids[1].1);
        t.shared.tracking(&node(1), one, true);
        assert!(!t.healthy(), "one of two links");
        t.shared.tracking(&node(2), two, true);
        assert!(t.healthy());
        assert_eq!(t.trusts("p:c:a", untracked), Trust::No, "read before tracking began");

        let read = t.mark();
        assert_eq!(t.trusts("p:c:a", read), Trust::UntilFresh);
        t.shared.invalidated(b"p:c:a");
        assert_eq!(t.trusts("p:c:a", read), Trust::No, "changed since the read began");
        assert_eq!(t.trusts("p:c:b", read), Trust::UntilFresh, "another key");
        assert_eq!(t.trusts("p:c:a", t.mark()), Trust::UntilFresh, "read after the change");

        // A purge made here counts at once.
        let read = t.mark();
        t.invalidate("p:c:b");
        assert_eq!(t.trusts("p:c:b", read), Trust::No);

        // A lost link: what was read before is trusted briefly, then not at all once tracking
        // begins again (invalidations may have been missed in between).
        let read = t.mark();
        t.shared.tracking(&node(2), two, false);
        assert_eq!(t.trusts("p:c:c", read), Trust::Briefly);
        let during = t.mark();
        t.shared.tracking(&node(2), two, true);
        assert_eq!((t.trusts("p:c:c", read), t.trusts("p:c:c", during)), (Trust::No, Trust::No));

        // FLUSHALL.
        let read = t.mark();
        t.shared.flush(&mut t.shared.links(), Flush::Flushall);
        assert!(t.healthy(), "still tracking, in a new period");
        assert_eq!(t.trusts("p:c:d", read), Trust::No);

        // New primaries.
        let read = t.mark();
        let three = t.shared.want(vec![node(1), node(3)], &[node(3)])[0].1;
        assert_eq!(t.trusts("p:c:e", read), Trust::Briefly, "the new primary is not tracked yet");
        t.shared.tracking(&node(2), two, true);
        assert_eq!(t.trusts("p:c:e", read), Trust::Briefly, "a node no longer followed");
        t.shared.tracking(&node(3), three, true);
        assert_eq!(t.trusts("p:c:e", read), Trust::No);
        assert_eq!(t.trusts("p:c:e", t.mark()), Trust::UntilFresh);

        // A relink (a reconnection of the client): the old link's late reports count for nothing.
        let read = t.mark();
        let renewed = t.shared.want(vec![node(1), node(3)], &[node(1), node(3)]);
        t.shared.tracking(&node(1), one, true);
        t.shared.tracking(&node(3), three, true);
        assert!(!t.healthy(), "reports from links that were replaced");
        for (node, id) in &renewed {
            t.shared.tracking(node, *id, true);
        }
        assert!(t.healthy());
        assert_eq!(t.trusts("p:c:f", read), Trust::No);

        t.shared.invalidated(b"p:g:catalog");
        let events = events.lock().unwrap().clone();
        assert_eq!(
            events,
            [
                "flushed topology",
                "flushed link_lost",
                "flushed flushall",
                "flushed topology",
                "flushed topology",
                "generation catalog"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_wakes_on_a_change_of_its_keys_only() {
        let t = Arc::new(tracking(Arc::default()));
        let one = t.shared.want(vec![node(1)], &[node(1)])[0].1;
        t.shared.tracking(&node(1), one, true);
        let since = t.mark();
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move {
                t.changed(&["p:c:a"], since, Instant::now() + Duration::from_secs(5)).await;
                Instant::now()
            })
        };
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(100)).await;
        t.shared.invalidated(b"p:c:other");
        tokio::time::sleep(Duration::from_millis(100)).await;
        t.shared.invalidated(b"p:c:a");
        assert_eq!(waiter.await.unwrap() - started, Duration::from_millis(200));
        // Nothing changes: the deadline ends the wait.
        let since = t.mark();
        let started = Instant::now();
        t.changed(&["p:c:a"], since, started + Duration::from_secs(5)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(5));
    }
}
