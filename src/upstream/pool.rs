//! One worker's connections to the backend: hyper's own HTTP/1.1 client connections, each driven
//! by a task on the worker's runtime, the idle ones on a stack, newest on top (a keep-alive
//! client's next request mostly takes the connection its last one used).
//!
//! Why not hyper-util's pooled client: measured with callgrind on one keep-alive client, it
//! hashed its pool key (SipHash) three times per request, allocated for each checkout, and spawned
//! a task per request to wait for the connection to be ready again. Here a request gives its
//! connection back as soon as the response head is in: a connection still streaming its response
//! is simply not ready, and is passed over until it is.
//!
//! No connection is kept for a client connection: idle clients would each hold one, and a client
//! opening many keep-alive connections would pin as many backend connections.
//!
//! A request that finds no ready connection connects, and meanwhile waits for one given back
//! ready by another request, whichever comes first. Under many concurrent requests the backend's
//! accept queue overflows now and then; a connect whose SYN was dropped is retried by the kernel
//! only after a second, past the connect timeout, and must not fail a request that a connection
//! freed a moment later can serve (hyper-util's client races the two the same way).

use std::collections::VecDeque;
use std::error::Error as StdError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use http::{Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tower_service::Service;

use crate::body::Body;

/// Connections a worker keeps on its stack: the oldest beyond this are closed. Enough for the
/// concurrency of a busy worker: a cap below it closes connections that are needed a moment
/// later (measured at 1,000 client connections: a cap of 256 meant a new backend connection for
/// a good share of requests).
const MAX_IDLE: usize = 1024;
/// How often idle connections past the idle timeout are closed.
const REAP_EVERY: Duration = Duration::from_secs(10);
/// How long a connect that lost the race to a connection given back may still take (its TCP
/// part is bounded by the connect timeout, a TLS handshake is not).
const LOST_RACE_CONNECT: Duration = Duration::from_secs(10);
/// Waiters beyond this are swept of the ones gone (served or cancelled) when one is added.
const SWEEP_WAITERS: usize = 64;

/// A boxed error from the connector.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Why a request found no connection or its connection failed.
#[derive(Debug)]
pub enum Failure {
    /// No connection could be made (the error says whether it timed out).
    Connect(BoxError),
    /// The connection failed the exchange (or, for a new one, its start).
    Exchange(hyper::Error),
}

/// A connection not in use, and since when.
struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

/// The connections not in use and the requests waiting for one.
#[derive(Default)]
struct Shelf {
    /// Newest on top.
    stack: Vec<Idle>,
    /// Requests connecting, which take a connection given back ready if it comes first.
    waiters: VecDeque<oneshot::Sender<SendRequest<Body>>>,
}

/// One worker's upstream connections. Shared by the worker's tasks only, so its locks are never
/// contended; none is held across an await.
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`, what the connector connects to.
    target: Uri,
    idle_timeout: Duration,
    shelf: Mutex<Shelf>,
    /// Set once the reaper runs (started on the worker's runtime by the first connection).
    reaping: AtomicBool,
}

impl Pool {
    /// A pool of connections to `target` (`scheme://authority/`) made by `connector`, each
    /// closed once idle for `idle_timeout`.
    pub fn new(connector: HttpsConnector<HttpConnector>, target: Uri, idle_timeout: Duration) -> Pool {
        Pool { connector, target, idle_timeout, shelf: Mutex::default(), reaping: AtomicBool::new(false) }
    }

    /// Send `req` (in origin form) on a ready connection: the most recently used idle one, else a
    /// new one. A reused connection that closed before the request went out (the
    /// backend closed it while idle) is replaced once by a new one. The connection is given back
    /// when the response head is in, except after a `101` (it belongs to the tunnel then).
    pub async fn send(
        self: &Arc<Self>,
        mut req: http::Request<Body>,
        now: Instant,
    ) -> Result<Response<Incoming>, Failure> {
        let (mut sender, mut reused) = match self.checkout(now) {
            Some(sender) => (sender, true),
            // Boxed: the rare path would otherwise make every request's future (which hyper moves
            // into place for each request) larger by the whole connect and handshake.
            None => Box::pin(self.connect_or_take()).await?,
        };
        loop {
            match sender.try_send_request(req).await {
                Ok(response) => {
                    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                        // Idle since the request was sent, as far as the idle timeout goes:
                        // earlier than the backend's own timer starts, so never later than it.
                        self.put(sender, now);
                    }
                    return Ok(response);
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => {
                        tracing::debug!(error = %e.error(), "idle upstream connection closed; sending on a new one");
                        req = unsent;
                        sender = Box::pin(self.connect()).await?;
                        reused = false;
                    }
                    _ => return Err(Failure::Exchange(e.into_error())),
                },
            }
        }
    }

    /// No ready connection at hand: a new one, or one given back ready by another request before
    /// it is made (`true`: reused; the connect then goes on, its connection for the shelf). A
    /// failed connect fails the request, as no connection came.
    async fn connect_or_take(self: &Arc<Self>) -> Result<(SendRequest<Body>, bool), Failure> {
        let (waiter, mut given) = oneshot::channel();
        {
            let mut shelf = self.shelf();
            if shelf.waiters.len() >= SWEEP_WAITERS {
                shelf.waiters.retain(|waiter| !waiter.is_closed());
            }
            shelf.waiters.push_back(waiter);
        }
        let pool = self.clone();
        let mut connecting = Box::pin(async move { pool.connect().await });
        tokio::select! {
            biased;
            Ok(sender) = &mut given => {
                // Not cancelled: a connect dropped after its SYN leaves a connection the backend
                // accepts for nothing; finished, it serves the next request.
                let pool = Arc::downgrade(self);
                tokio::spawn(async move {
                    let connected = tokio::time::timeout(LOST_RACE_CONNECT, connecting).await;
                    if let (Ok(Ok(sender)), Some(pool)) = (connected, pool.upgrade()) {
                        pool.put(sender, Instant::now());
                    }
                });
                Ok((sender, true))
            }
            connected = &mut connecting => {
                // Given one meanwhile (another task of this worker may run between the polls):
                // used if the connect failed, else back on the shelf rather than dropped.
                match (connected, given.try_recv()) {
                    (Err(_), Ok(sender)) => Ok((sender, true)),
                    (connected, given) => {
                        if let Ok(sender) = given {
                            self.put(sender, Instant::now());
                        }
                        connected.map(|sender| (sender, false))
                    }
                }
            }
        }
    }

    /// The newest ready connection, if there is one: the whole stack is looked at, as the newest
    /// are the likeliest to be still receiving their response. Closed and expired ones met on the
    /// way are dropped.
    fn checkout(&self, now: Instant) -> Option<SendRequest<Body>> {
        let mut shelf = self.shelf();
        let stack = &mut shelf.stack;
        let mut i = stack.len();
        while i > 0 {
            i -= 1;
            let idle = &stack[i];
            if idle.sender.is_closed() || self.expired(idle, now) {
                stack.remove(i);
            } else if idle.sender.is_ready() {
                return Some(stack.remove(i).sender);
            }
        }
        None
    }

    fn expired(&self, idle: &Idle, now: Instant) -> bool {
        now.saturating_duration_since(idle.since) > self.idle_timeout
    }

    /// A connection whose response head is in, idle `since`: to the first request waiting, once
    /// ready (it may still be receiving its response body), else onto the stack, where the
    /// oldest goes when the stack is full (expired ones are the reaper's and the checkout's).
    fn put(self: &Arc<Self>, mut sender: SendRequest<Body>, since: Instant) {
        let mut shelf = self.shelf();
        // Gone waiters further back are met by the handing below, or swept when one is added.
        while shelf.waiters.front().is_some_and(|waiter| waiter.is_closed()) {
            shelf.waiters.pop_front();
        }
        if !shelf.waiters.is_empty() {
            if !sender.is_ready() {
                drop(shelf);
                let pool = Arc::downgrade(self);
                tokio::spawn(async move {
                    if sender.ready().await.is_ok() {
                        if let Some(pool) = pool.upgrade() {
                            pool.put(sender, Instant::now());
                        }
                    }
                });
                return;
            }
            while let Some(waiter) = shelf.waiters.pop_front() {
                match waiter.send(sender) {
                    Ok(()) => return,
                    Err(back) => sender = back,
                }
            }
        }
        if shelf.stack.len() >= MAX_IDLE {
            shelf.stack.remove(0);
        }
        shelf.stack.push(Idle { sender, since });
    }

    fn shelf(&self) -> MutexGuard<'_, Shelf> {
        self.shelf.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new connection, its task spawned on the current (the worker's) runtime. The connect
    /// timeout is the connector's.
    async fn connect(self: &Arc<Self>) -> Result<SendRequest<Body>, Failure> {
        if !self.reaping.swap(true, Ordering::Relaxed) {
            tokio::spawn(reap(Arc::downgrade(self)));
        }
        let io = self.connector.clone().call(self.target.clone()).await.map_err(Failure::Connect)?;
        let (sender, connection) = http1::handshake(io).await.map_err(Failure::Exchange)?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Idle connections on the stack (for tests).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.shelf().stack.len()
    }
}

/// Closes the idle connections past the idle timeout (or closed by the backend) every
/// [`REAP_EVERY`], also when no request comes to do it; ends with the pool.
async fn reap(pool: Weak<Pool>) {
    let mut tick = tokio::time::interval(REAP_EVERY);
    loop {
        tick.tick().await;
        let Some(pool) = pool.upgrade() else { return };
        let now = Instant::now();
        pool.shelf().stack.retain(|idle| !idle.sender.is_closed() && !pool.expired(idle, now));
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    use super::*;

    /// A backend on port 0 answering `/slow` with a body it sends only when told, anything else
    /// with `ok`; counts the connections it accepted.
    struct Backend {
        uri: Uri,
        accepted: Arc<AtomicUsize>,
        release: Arc<tokio::sync::Notify>,
    }

    async fn backend() -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri: Uri = format!("http://{}/", listener.local_addr().unwrap()).parse().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let (count, notify) = (accepted.clone(), release.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                let notify = notify.clone();
                let service = service_fn(move |req: http::Request<Incoming>| {
                    let notify = notify.clone();
                    async move {
                        if req.uri().path() == "/slow" {
                            let late = futures_util::stream::once(async move {
                                notify.notified().await;
                                Ok::<_, Infallible>(hyper::body::Frame::data(bytes::Bytes::from_static(b"late")))
                            });
                            return Ok::<_, Infallible>(Response::new(http_body_util::StreamBody::new(late).boxed()));
                        }
                        Ok(Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"ok")).map_err(|e| match e {}).boxed(),
                        ))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Backend { uri, accepted, release }
    }

    fn pool(backend: &Backend) -> Arc<Pool> {
        let connector = crate::tls::https_connector("upstream.ca_file", None, Duration::from_secs(1)).unwrap();
        Arc::new(Pool::new(connector, backend.uri.clone(), Duration::from_secs(50)))
    }

    fn get(path: &'static str) -> http::Request<Body> {
        http::Request::get(path).header("host", "backend").body(crate::body::full(bytes::Bytes::new())).unwrap()
    }

    async fn text(response: Response<Incoming>) -> String {
        String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_keep_alive_client_keeps_using_one_connection_and_idle_ones_are_reaped() {
        let backend = backend().await;
        let pool = pool(&backend);
        for _ in 0..3 {
            let response = pool.send(get("/"), Instant::now()).await.unwrap();
            assert_eq!(text(response).await, "ok");
        }
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
        // Past the idle timeout with no request to notice: the reaper closes it.
        tokio::time::pause();
        tokio::time::advance(Duration::from_secs(61)).await;
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_connection_still_streaming_is_passed_over_and_taken_again_once_done() {
        let backend = backend().await;
        let pool = pool(&backend);
        let slow = pool.send(get("/slow"), Instant::now()).await.unwrap();
        assert_eq!(pool.idle_count(), 1, "given back with its head");
        let response = pool.send(get("/"), Instant::now()).await.unwrap();
        assert_eq!(text(response).await, "ok");
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 2, "the busy one was not used");
        backend.release.notify_one();
        assert_eq!(text(slow).await, "late");
        tokio::task::yield_now().await;
        for _ in 0..2 {
            let response = pool.send(get("/"), Instant::now()).await.unwrap();
            assert_eq!(text(response).await, "ok");
        }
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 2);
    }

    // Linux drops SYNs while an accept queue is full (elsewhere, or with tcp_abort_on_overflow,
    // the connect is refused at once).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_request_whose_connect_hangs_takes_a_connection_given_back_meanwhile() {
        // A backend that accepts one connection and leaves the rest in an accept queue of one:
        // once that is full, the kernel drops SYNs and a connect hangs (as under a burst).
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let head = Arc::new(tokio::sync::Notify::new());
        let wait = head.clone();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let service = service_fn(move |req: http::Request<Incoming>| {
                let wait = wait.clone();
                async move {
                    if req.uri().path() == "/late-head" {
                        wait.notified().await;
                    }
                    Ok::<_, Infallible>(Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"ok"))))
                }
            });
            tokio::spawn(hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            std::future::pending::<()>().await; // the listener stays open, accepting no more
        });
        let backend = Backend {
            uri: format!("http://{addr}/").parse().unwrap(),
            accepted: Arc::new(AtomicUsize::new(0)),
            release: head.clone(),
        };
        let pool = pool(&backend);
        let first = tokio::spawn({
            let pool = pool.clone();
            async move { text(pool.send(get("/late-head"), Instant::now()).await.unwrap()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await; // its connection accepted
        let mut queued = Vec::new();
        while let Ok(Ok(stream)) =
            tokio::time::timeout(Duration::from_millis(200), tokio::net::TcpStream::connect(addr)).await
        {
            queued.push(stream);
        }
        let started = Instant::now();
        let second = tokio::spawn({
            let pool = pool.clone();
            async move { pool.send(get("/"), Instant::now()).await.map(|r| r.status()) }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        head.notify_one();
        assert_eq!(first.await.unwrap(), "ok");
        assert_eq!(second.await.unwrap().unwrap(), StatusCode::OK, "served on the connection given back");
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(100), "it waited for the head released at 100 ms: {waited:?}");
        assert!(waited < Duration::from_secs(1), "not after a connect timeout: {waited:?}");
    }

    #[tokio::test]
    async fn connections_idle_past_the_timeout_or_closed_are_not_used() {
        let backend = backend().await;
        let pool = pool(&backend);
        let response = pool.send(get("/"), Instant::now()).await.unwrap();
        assert_eq!(text(response).await, "ok");
        let later = Instant::now() + Duration::from_secs(51);
        let response = pool.send(get("/"), later).await.unwrap();
        assert_eq!(text(response).await, "ok");
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 2, "the expired one was dropped");

        // A connection the backend closed is noticed and replaced.
        let closing = http::Request::get("/").header("host", "backend").header("connection", "close");
        let response =
            pool.send(closing.body(crate::body::full(bytes::Bytes::new())).unwrap(), Instant::now()).await.unwrap();
        assert_eq!(text(response).await, "ok");
        tokio::task::yield_now().await;
        let response = pool.send(get("/"), Instant::now()).await.unwrap();
        assert_eq!(text(response).await, "ok");
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 3);
    }
}
