//! Sockets: bind, accept (bounded), optional TLS, HTTP/1.1 and h2c on one port, the proxy's
//! worker threads, and the graceful drain on shutdown.
//!
//! The proxy listener is served by `server.workers` threads, each with its own single-threaded
//! runtime, its own clone of the listening socket and its own [`Proxy`] (so its own upstream
//! pool). A request, its upstream exchange and their wake-ups then stay on one thread: measured
//! here, a work-stealing runtime spent a sixth of its CPU handing wake-ups between threads. The
//! least busy worker tends to win `accept`, which spreads connections. The caller's runtime keeps
//! the admin listener and background work.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::body::Body;
use crate::config::Config;
use crate::deadline::{Deadlined, Limits, Tracked};
use crate::proxy::{Conn, Proxy};
use crate::tls;

/// A client has this long to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The admin port needs few connections: probes and a scraper.
const ADMIN_MAX_CONNECTIONS: usize = 64;
/// How long admin connections get to finish once the proxy has drained.
const ADMIN_DRAIN: Duration = Duration::from_secs(1);
/// Pending connections the kernel queues while every worker is busy.
const LISTEN_BACKLOG: u32 = 1024;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The configured address.
        addr: SocketAddr,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The Redis client could not be built (its URL was rejected).
    #[error("redis.url cannot be used")]
    Redis(#[source] crate::store::StoreError),
    /// A worker thread or its runtime could not be created.
    #[error("cannot start proxy worker threads")]
    Worker(#[source] std::io::Error),
}

/// The bound listeners, not yet serving: their addresses are known (useful with port 0).
pub struct Server {
    proxy_listener: std::net::TcpListener,
    admin_listener: TcpListener,
    tls: Option<TlsAcceptor>,
}

impl Server {
    /// Bind both listeners (and load the TLS certificate). Waits on nothing but the sockets.
    pub fn bind(config: &Config) -> Result<Server, StartError> {
        let tls = config.server.tls.as_ref().map(tls::acceptor).transpose()?;
        let proxy_listener = bind("server.listen", config.server.listen)?
            .into_std()
            .map_err(|source| StartError::Bind { what: "server.listen", addr: config.server.listen, source })?;
        let admin_listener = bind("admin.listen", config.admin.listen)?;
        Ok(Server { proxy_listener, admin_listener, tls })
    }

    /// The bound proxy address.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_listener.local_addr().expect("bound listener has an address")
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener.local_addr().expect("bound listener has an address")
    }

    /// Serve the proxies (one worker thread each) and the admin endpoints until `shutdown`
    /// resolves, then stop accepting (setting `draining`), let in-flight requests finish within
    /// `server.shutdown_grace`, and return.
    pub async fn run<A: Handler>(
        self,
        config: &Config,
        proxies: Vec<Arc<Proxy>>,
        admin: Arc<A>,
        draining: &AtomicBool,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StartError> {
        let Server { proxy_listener, admin_listener, tls } = self;
        tracing::info!(
            proxy = %proxy_listener.local_addr().expect("bound"),
            admin = %admin_listener.local_addr().expect("bound"),
            "listening"
        );

        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        // HTTP/1.1 only: probes and scrapers speak it, and an h2 client could hold a connection
        // open by never granting flow-control window for its answer.
        let admin_http = Arc::new(http_builder(config, true));
        let admin_task = tokio::spawn(async move {
            let stop = async {
                let _ = admin_stopped.await;
            };
            let limit = Arc::new(Semaphore::new(ADMIN_MAX_CONNECTIONS));
            let graceful = accept_loop(admin_listener, None, admin_http, admin, limit, stop).await;
            let _ = tokio::time::timeout(ADMIN_DRAIN, graceful.shutdown()).await;
        });

        let (stop, stopped) = watch::channel(false);
        let limit = Arc::new(Semaphore::new(config.server.max_connections));
        let http = Arc::new(http_builder(config, false));
        let mut workers = Vec::with_capacity(proxies.len());
        let spawn_all = || -> std::io::Result<()> {
            for (i, proxy) in proxies.into_iter().enumerate() {
                let worker = Worker {
                    listener: proxy_listener.try_clone()?,
                    tls: tls.clone(),
                    http: http.clone(),
                    proxy,
                    limit: limit.clone(),
                    stop: stopped.clone(),
                    grace: config.server.shutdown_grace,
                };
                workers.push(worker.spawn(i)?);
            }
            Ok(())
        };
        // On failure, the workers that did start are stopped below like on a normal shutdown.
        let started = spawn_all().map_err(StartError::Worker);
        drop(proxy_listener);

        if started.is_ok() {
            shutdown.await;
        }
        let _ = stop.send(true);
        for worker in &mut workers {
            let _ = (&mut worker.listening).await;
        }
        // Only now is the listening socket closed in every worker: from here on new connections
        // are refused, and /readyz says so.
        draining.store(true, Ordering::SeqCst);
        tracing::info!(grace = ?config.server.shutdown_grace, "shutting down: stopped accepting, draining");
        let mut clean = true;
        for worker in workers {
            clean &= worker.drained.await.unwrap_or(false);
        }
        if clean {
            tracing::info!("drained");
        } else {
            tracing::warn!("shutdown grace ran out; closed the remaining connections");
        }
        let _ = admin_stop.send(());
        let _ = admin_task.await;
        started
    }
}

/// Bind with the backlog we want (std's bind fixes it at 128).
fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    let err = |source| StartError::Bind { what, addr, source };
    let socket = if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)
}

/// One proxy worker: a thread with a single-threaded runtime accepting on its own clone of the
/// listening socket.
struct Worker {
    listener: std::net::TcpListener,
    tls: Option<TlsAcceptor>,
    http: Arc<Http>,
    proxy: Arc<Proxy>,
    limit: Arc<Semaphore>,
    stop: watch::Receiver<bool>,
    grace: Duration,
}

/// A running worker's two milestones during shutdown.
struct WorkerHandle {
    /// Resolves once the worker has closed its listening socket.
    listening: tokio::sync::oneshot::Receiver<()>,
    /// Yields `true` when the worker drained within the grace.
    drained: tokio::sync::oneshot::Receiver<bool>,
}

impl Worker {
    /// Start the thread.
    fn spawn(self, index: usize) -> std::io::Result<WorkerHandle> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (stopped_listening, listening) = tokio::sync::oneshot::channel();
        let (done, drained) = tokio::sync::oneshot::channel();
        std::thread::Builder::new().name(format!("sidecache-w{index}")).spawn(move || {
            let clean = runtime.block_on(self.serve(index, stopped_listening));
            // Dropping the runtime here ends what the grace left: upgraded tunnels, stragglers.
            let _ = done.send(clean);
        })?;
        Ok(WorkerHandle { listening, drained })
    }

    async fn serve(self, index: usize, stopped_listening: tokio::sync::oneshot::Sender<()>) -> bool {
        let Worker { listener, tls, http, proxy, limit, mut stop, grace } = self;
        proxy.attach(index);
        let listener = match TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!(error = %e, "worker cannot register the listener");
                return false;
            }
        };
        let shutdown = async move {
            let _ = stop.wait_for(|stopping| *stopping).await;
        };
        // accept_loop owns the listener and closes it when it returns.
        let graceful = accept_loop(listener, tls, http, proxy, limit, shutdown).await;
        let _ = stopped_listening.send(());
        tokio::time::timeout(grace, graceful.shutdown()).await.is_ok()
    }
}

/// How a listener serves its connections: one builder for HTTP/1.1 and h2c (detected from the
/// connection preface), or HTTP/1.1 only, and the connection deadlines.
struct Http {
    builder: auto::Builder<TokioExecutor>,
    limits: Limits,
    /// HTTP/1.1 only, without upgrades (the admin listener).
    http1_only: bool,
}

fn http_builder(config: &Config, http1_only: bool) -> Http {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if http1_only {
        builder = builder.http1_only();
    }
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        // Deadlined keeps the connection's deadlines: hyper's timer here would also run while a
        // keep-alive connection is idle.
        .header_read_timeout(None)
        // The head must fit the read buffer: a larger one is answered 431.
        .max_buf_size(config.server.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.server.max_header_bytes as u32)
        .keep_alive_interval(Duration::from_secs(30));
    let limits = Limits { header_read: config.server.header_read_timeout, idle: config.server.idle_timeout };
    Http { builder, limits, http1_only }
}

/// Something that answers requests on a listener: the proxy or the admin endpoints.
pub trait Handler: Send + Sync + 'static {
    /// Answer one request.
    fn call(&self, req: Request<Incoming>, conn: Conn) -> impl Future<Output = Response<Body>> + Send;
}

/// Accept until `shutdown`, with at most `limit` connections open at once (further clients wait in
/// the kernel's accept queue). Returns the tracker of the connections still open.
async fn accept_loop<H: Handler>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    http: Arc<Http>,
    handler: Arc<H>,
    limit: Arc<Semaphore>,
    shutdown: impl Future<Output = ()>,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = limit.clone().acquire_owned() => permit.expect("semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors or a connection reset before accept: back off briefly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let http = http.clone();
        let watcher = graceful.watcher();
        match tls.clone() {
            None => {
                tokio::spawn(serve(http, stream, handler, Conn::new(peer, false, permit), watcher));
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => serve(http, stream, handler, Conn::new(peer, true, permit), watcher).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
    graceful
}

/// Serve one connection until it closes. Its connection permit lives in its `Activity`, so an
/// upgraded tunnel, which outlives this, holds it too.
async fn serve<I, H>(
    http: Arc<Http>,
    io: I,
    handler: Arc<H>,
    conn: Conn,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let peer = conn.peer;
    let activity = conn.activity.clone();
    let service = service_fn(move |req| {
        let handler = handler.clone();
        let conn = conn.clone();
        if req.version() == http::Version::HTTP_2 {
            conn.activity.speaks_h2();
        }
        // Held from the request head until the response body is dropped.
        let busy = conn.activity.busy();
        async move { Ok::<_, Infallible>(handler.call(req, conn).await.map(|body| Tracked::new(body, busy))) }
    });
    let io = Deadlined::new(io, activity, http.limits);
    let io = TokioIo::new(io);
    // Only a builder that may serve both protocols can upgrade (hyper-util reads the preface
    // there whatever the builder allows).
    let served = if http.http1_only {
        watcher.watch(http.builder.serve_connection(io, service).into_owned()).await
    } else {
        watcher.watch(http.builder.serve_connection_with_upgrades(io, service).into_owned()).await
    };
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

impl Handler for Proxy {
    fn call(&self, req: Request<Incoming>, conn: Conn) -> impl Future<Output = Response<Body>> + Send {
        self.handle(req, conn)
    }
}
