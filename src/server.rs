//! Sockets: bind, accept (bounded), optional TLS, HTTP/1.1 and h2c on one port, and the graceful
//! drain on shutdown.

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
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use crate::admin::Admin;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{Conn, Proxy};
use crate::{tls, Body};

/// A client has this long to finish the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client has this long to send a complete request head (slow-loris protection).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The admin port needs few connections: probes and a scraper.
const ADMIN_MAX_CONNECTIONS: usize = 64;
/// How long admin connections get to finish once the proxy has drained.
const ADMIN_DRAIN: Duration = Duration::from_secs(1);
/// How often histogram samples are folded into buckets.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

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
}

/// Facts the admin endpoints report about the running server.
pub struct ServerState {
    /// When the proxy started (for uptime).
    pub started: Instant,
    /// Set when shutdown begins: `/readyz` then answers 503.
    pub draining: AtomicBool,
}

/// A bound but not yet serving proxy: its addresses are known (useful with port 0).
pub struct Sidecache {
    config: Arc<Config>,
    proxy_listener: TcpListener,
    admin_listener: TcpListener,
    tls: Option<TlsAcceptor>,
    proxy: Arc<Proxy>,
    admin: Arc<Admin>,
    metrics: Arc<Metrics>,
    state: Arc<ServerState>,
}

impl Sidecache {
    /// Bind both listeners and build the request path. Never waits on anything but the sockets.
    pub async fn bind(config: Config) -> Result<Sidecache, StartError> {
        let tls = config.server.tls.as_ref().map(tls::acceptor).transpose()?;
        let bind = |what: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr).await.map_err(|source| StartError::Bind { what, addr, source })
        };
        let proxy_listener = bind("server.listen", config.server.listen).await?;
        let admin_listener = bind("admin.listen", config.admin.listen).await?;

        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new(config.routes.iter().map(|r| r.name.as_str())));
        let state = Arc::new(ServerState { started: Instant::now(), draining: AtomicBool::new(false) });
        let proxy = Arc::new(Proxy::new(&config, metrics.clone())?);
        let admin = Arc::new(Admin::new(config.clone(), metrics.clone(), state.clone()));
        Ok(Sidecache { config, proxy_listener, admin_listener, tls, proxy, admin, metrics, state })
    }

    /// The bound proxy address.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_listener.local_addr().expect("bound listener has an address")
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener.local_addr().expect("bound listener has an address")
    }

    /// Serve until `shutdown` resolves, then stop accepting, let in-flight requests finish within
    /// `server.shutdown_grace`, and return.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Sidecache { config, proxy_listener, admin_listener, tls, proxy, admin, metrics, state } = self;
        tracing::info!(
            proxy = %proxy_listener.local_addr().expect("bound"),
            admin = %admin_listener.local_addr().expect("bound"),
            "listening"
        );

        let upkeep = tokio::spawn(async move {
            let mut tick = tokio::time::interval(METRICS_UPKEEP);
            loop {
                tick.tick().await;
                metrics.upkeep();
            }
        });

        let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin_builder = Arc::new(http_builder(&config));
        let admin_task = tokio::spawn(async move {
            let stop = async {
                let _ = admin_stopped.await;
            };
            let graceful = accept_loop(admin_listener, None, admin_builder, admin, ADMIN_MAX_CONNECTIONS, stop).await;
            let _ = tokio::time::timeout(ADMIN_DRAIN, graceful.shutdown()).await;
        });

        let builder = Arc::new(http_builder(&config));
        let graceful = accept_loop(proxy_listener, tls, builder, proxy, config.server.max_connections, shutdown).await;

        state.draining.store(true, Ordering::SeqCst);
        let open = graceful.count();
        tracing::info!(connections = open, grace = ?config.server.shutdown_grace, "shutting down: stopped accepting, draining");
        match tokio::time::timeout(config.server.shutdown_grace, graceful.shutdown()).await {
            Ok(()) => tracing::info!("drained"),
            Err(_) => tracing::warn!("shutdown grace ran out; closing the remaining connections"),
        }
        let _ = admin_stop.send(());
        let _ = admin_task.await;
        upkeep.abort();
    }
}

/// One builder for HTTP/1.1 and h2c (detected from the connection preface).
fn http_builder(config: &Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // The head must fit the read buffer: a larger one is answered 431.
        .max_buf_size(config.server.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.server.max_header_bytes as u32)
        .keep_alive_interval(Duration::from_secs(30));
    builder
}

/// Something that answers requests on a listener: the proxy or the admin endpoints.
pub trait Handler: Send + Sync + 'static {
    /// Answer one request.
    fn call(&self, req: Request<Incoming>, conn: Conn) -> impl Future<Output = Response<Body>> + Send;
}

/// Accept until `shutdown`, at most `max_connections` open at once (further clients wait in the
/// kernel's accept queue). Returns the tracker of the connections still open.
async fn accept_loop<H: Handler>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    handler: Arc<H>,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) -> GracefulShutdown {
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(max_connections));
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
        let builder = builder.clone();
        let watcher = graceful.watcher();
        match tls.clone() {
            None => {
                let conn = Conn { peer, tls: false };
                tokio::spawn(serve(builder, stream, handler, conn, watcher, permit));
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve(builder, stream, handler, Conn { peer, tls: true }, watcher, permit).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
    graceful
}

/// Serve one connection until it closes; holds its connection permit until then.
async fn serve<I, H>(
    builder: Arc<auto::Builder<TokioExecutor>>,
    io: I,
    handler: Arc<H>,
    conn: Conn,
    watcher: hyper_util::server::graceful::Watcher,
    _permit: OwnedSemaphorePermit,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let service = service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler.call(req, conn).await) }
    });
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(connection.into_owned()).await {
        tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
    }
}

impl Handler for Proxy {
    fn call(&self, req: Request<Incoming>, conn: Conn) -> impl Future<Output = Response<Body>> + Send {
        self.handle(req, conn)
    }
}
