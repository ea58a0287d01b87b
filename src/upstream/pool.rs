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

use std::error::Error as StdError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use http::{Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::time::Instant;
use tower_service::Service;

use crate::body::Body;

/// Idle connections a worker keeps: the oldest beyond this are closed.
const MAX_IDLE: usize = 256;
/// How often idle connections past the idle timeout are closed.
const REAP_EVERY: Duration = Duration::from_secs(10);
/// How many connections not yet ready (still streaming a response) a checkout passes over before
/// it opens a new one.
const SCAN: usize = 4;

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

/// One worker's upstream connections. Shared by the worker's tasks only, so its locks are never
/// contended; none is held across an await.
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority/`, what the connector connects to.
    target: Uri,
    idle_timeout: Duration,
    idle: Mutex<Vec<Idle>>,
    /// Set once the reaper runs (started on the worker's runtime by the first connection).
    reaping: AtomicBool,
}

impl Pool {
    /// A pool of connections to `target` (`scheme://authority/`) made by `connector`, each
    /// closed once idle for `idle_timeout`.
    pub fn new(connector: HttpsConnector<HttpConnector>, target: Uri, idle_timeout: Duration) -> Pool {
        Pool { connector, target, idle_timeout, idle: Mutex::new(Vec::new()), reaping: AtomicBool::new(false) }
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
            None => (Box::pin(self.connect()).await?, false),
        };
        loop {
            match sender.try_send_request(req).await {
                Ok(response) => {
                    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                        // Idle since the request was sent, as far as the idle timeout goes:
                        // earlier than the backend's own timer starts, so never later than it.
                        self.put(Idle { sender, since: now });
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

    /// A ready connection, if one is at hand: closed and expired ones met on the way are dropped.
    fn checkout(&self, now: Instant) -> Option<SendRequest<Body>> {
        let mut stack = self.stack();
        let (mut i, mut passed) = (stack.len(), 0);
        while i > 0 && passed < SCAN {
            i -= 1;
            let idle = &stack[i];
            if idle.sender.is_closed() || self.expired(idle, now) {
                stack.remove(i);
            } else if idle.sender.is_ready() {
                return Some(stack.remove(i).sender);
            } else {
                passed += 1;
            }
        }
        None
    }

    fn expired(&self, idle: &Idle, now: Instant) -> bool {
        now.saturating_duration_since(idle.since) > self.idle_timeout
    }

    /// Onto the stack; the oldest connection goes when the stack is full (expired ones are the
    /// reaper's and the checkout's).
    fn put(&self, idle: Idle) {
        let mut stack = self.stack();
        if stack.len() >= MAX_IDLE {
            stack.remove(0);
        }
        stack.push(idle);
    }

    fn stack(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
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
        self.stack().len()
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
        pool.stack().retain(|idle| !idle.sender.is_closed() && !pool.expired(idle, now));
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
