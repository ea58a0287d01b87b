//! Request coalescing: concurrent misses on one key in this process cause one upstream request.
//!
//! The first miss leads a flight; later misses on the same key follow it and are answered from
//! the entry the leader's response becomes. Whenever the leader cannot produce an entry (the
//! response is not storable, too large, the upstream failed, the client went away) its guard is
//! dropped unpublished and the followers are released to forward on their own, as Pingora's cache
//! lock does. The table's mutex is never held across an await.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::entry::Entry;

/// What followers learn from a flight.
#[derive(Clone)]
pub enum Outcome {
    /// The leader is still fetching.
    Pending,
    /// The leader's response, as the cache stored it, and the variant id of its slot.
    Done(Arc<Entry>, Arc<str>),
    /// The leader produced nothing to share: forward on your own.
    Failed,
}

type Flight = Arc<watch::Sender<Outcome>>;

/// The flights in progress, by cache key.
#[derive(Default)]
pub struct Flights {
    table: Mutex<HashMap<String, Flight>>,
}

/// Lead a new flight, or follow the one in progress.
pub enum Join {
    /// Fetch from the upstream; publish through the guard.
    Lead(FlightGuard),
    /// Wait for the leader.
    Follow(watch::Receiver<Outcome>),
}

impl Flights {
    /// Join the flight for `key`.
    pub fn join(self: &Arc<Self>, key: String) -> Join {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(flight) = table.get(&key) {
            return Join::Follow(flight.subscribe());
        }
        let (tx, _) = watch::channel(Outcome::Pending);
        let tx = Arc::new(tx);
        table.insert(key.clone(), tx.clone());
        Join::Lead(FlightGuard { flights: self.clone(), key, tx, published: false })
    }

    /// Flights in progress (for tests and status).
    pub fn len(&self) -> usize {
        self.table.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no flight is in progress.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The leader's handle: publish the entry, or drop it to release the followers.
pub struct FlightGuard {
    flights: Arc<Flights>,
    key: String,
    tx: Flight,
    published: bool,
}

impl FlightGuard {
    /// Hand the leader's entry, stored in the slot `variant`, to every follower.
    pub fn publish(mut self, entry: Arc<Entry>, variant: &str) {
        self.finish(Outcome::Done(entry, variant.into()));
    }

    fn finish(&mut self, outcome: Outcome) {
        self.published = true;
        // Leave the table first, so a request arriving now looks the store up (or leads anew)
        // instead of following a finished flight.
        let mut table = self.flights.table.lock().unwrap_or_else(|p| p.into_inner());
        if table.get(&self.key).is_some_and(|f| Arc::ptr_eq(f, &self.tx)) {
            table.remove(&self.key);
        }
        drop(table);
        self.tx.send_replace(outcome);
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if !self.published {
            self.finish(Outcome::Failed);
        }
    }
}

/// Wait for a flight's outcome at most `limit`; a leader that takes longer releases us.
pub async fn follow(mut rx: watch::Receiver<Outcome>, limit: Duration) -> Option<(Arc<Entry>, Arc<str>)> {
    match tokio::time::timeout(limit, rx.wait_for(|o| !matches!(o, Outcome::Pending))).await {
        Ok(Ok(outcome)) => match &*outcome {
            Outcome::Done(entry, variant) => Some((entry.clone(), variant.clone())),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    use super::*;
    use crate::cache::entry::Freshness;

    fn entry() -> Arc<Entry> {
        Arc::new(Entry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Bytes::from_static(b"shared"),
            stored_at: SystemTime::now(),
            freshness: Freshness {
                lifetime: Duration::from_secs(60),
                initial_age: Duration::ZERO,
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                must_revalidate: false,
            },
        })
    }

    #[tokio::test]
    async fn followers_get_the_leaders_entry() {
        let flights = Arc::new(Flights::default());
        let Join::Lead(guard) = flights.join("k".into()) else { panic!("first leads") };
        let followers: Vec<_> = (0..5)
            .map(|_| match flights.join("k".into()) {
                Join::Follow(rx) => tokio::spawn(follow(rx, Duration::from_secs(5))),
                Join::Lead(_) => panic!("one leader per key"),
            })
            .collect();
        assert!(matches!(flights.join("other".into()), Join::Lead(_)), "keys are independent");
        guard.publish(entry(), "v1");
        for f in followers {
            let (entry, variant) = f.await.unwrap().unwrap();
            assert_eq!((entry.body.as_ref(), &*variant), (&b"shared"[..], "v1"));
        }
        assert!(flights.is_empty());
        assert!(matches!(flights.join("k".into()), Join::Lead(_)), "a finished flight is gone");
    }

    #[tokio::test]
    async fn a_dropped_leader_releases_the_followers() {
        let flights = Arc::new(Flights::default());
        let Join::Lead(guard) = flights.join("k".into()) else { panic!() };
        let Join::Follow(rx) = flights.join("k".into()) else { panic!() };
        let follower = tokio::spawn(follow(rx, Duration::from_secs(5)));
        drop(guard);
        assert!(follower.await.unwrap().is_none());
        assert!(flights.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_leader_releases_the_followers_at_the_limit() {
        let flights = Arc::new(Flights::default());
        let Join::Lead(_guard) = flights.join("k".into()) else { panic!() };
        let Join::Follow(rx) = flights.join("k".into()) else { panic!() };
        assert!(follow(rx, Duration::from_secs(30)).await.is_none());
    }
}
