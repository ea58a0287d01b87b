//! Test fixtures: a real upstream (hyper on port 0), the proxy in-process through the library,
//! the proxy as the real binary, and a small client. Every fixture stops what it started on drop.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type TestBody = BoxBody<Bytes, BoxError>;

pub mod pki;
pub mod redis;

// ---------------------------------------------------------------- deterministic streamed bodies

/// A body of `len` bytes where byte i is `i % 251`, produced in 64 KiB frames (never held whole).
pub struct PatternBody {
    sent: u64,
    len: u64,
}

impl PatternBody {
    pub fn new(len: u64) -> PatternBody {
        PatternBody { sent: 0, len }
    }
}

fn pattern_chunk() -> &'static Bytes {
    static CHUNK: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    // 64 KiB rounded to a multiple of 251 so every chunk starts at pattern offset 0.
    CHUNK.get_or_init(|| Bytes::from((0..251 * 261).map(|i| (i % 251) as u8).collect::<Vec<u8>>()))
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.sent >= self.len {
            return Poll::Ready(None);
        }
        let chunk = pattern_chunk();
        let n = (self.len - self.sent).min(chunk.len() as u64) as usize;
        self.sent += n as u64;
        Poll::Ready(Some(Ok(Frame::data(chunk.slice(..n)))))
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.len - self.sent)
    }
}

/// Streams a body through, checking it is the pattern; returns (length, pattern intact).
pub async fn consume_pattern<B>(mut body: B) -> (u64, bool)
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut len = 0u64;
    let mut intact = true;
    while let Some(frame) = body.frame().await {
        // A body cut short (the proxy gave up on its client's) is not the pattern.
        let Ok(frame) = frame else { return (len, false) };
        if let Ok(data) = frame.into_data() {
            for (i, b) in data.iter().enumerate() {
                intact &= *b == ((len + i as u64) % 251) as u8;
            }
            len += data.len() as u64;
        }
    }
    (len, intact)
}

// ---------------------------------------------------------------- the test upstream

/// What the upstream saw, and how it answers `/gen` paths.
#[derive(Default)]
pub struct UpstreamState {
    pub requests: AtomicUsize,
    pub cancelled: AtomicUsize,
    pub completed_slow: AtomicUsize,
    /// `/gen` answers by path prefix, first match wins; `Reply::default()` otherwise.
    replies: std::sync::Mutex<Vec<(String, Reply)>>,
    /// The head of every `/gen` request: path and query, headers.
    seen: std::sync::Mutex<Vec<(String, HeaderMap)>>,
}

/// How the test upstream answers a `/gen` path: a generated body `"<target> #<n>"` (n counts the
/// upstream's requests), with this status, headers, delay and size.
#[derive(Clone, Default)]
pub struct Reply {
    status: Option<u16>,
    headers: Vec<(String, String)>,
    delay: Duration,
    size: Option<usize>,
    binary: bool,
    not_modified: Option<(String, Vec<(String, String)>)>,
}

impl Reply {
    /// 200 with the generated body.
    pub fn ok() -> Reply {
        Reply::default()
    }

    /// Answer with this status.
    pub fn status(mut self, status: u16) -> Reply {
        self.status = Some(status);
        self
    }

    /// Add a response header.
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Answer after this long.
    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }

    /// Pad (or cut) the body to this many bytes.
    pub fn size(mut self, size: usize) -> Reply {
        self.size = Some(size);
        self
    }

    /// Follow the generated text with every byte value, four times over.
    pub fn binary(mut self) -> Reply {
        self.binary = true;
        self
    }

    /// Answer `If-None-Match: etag` with a bodiless 304 carrying these headers.
    pub fn not_modified_if(mut self, etag: &str, headers: &[(&str, &str)]) -> Reply {
        let headers = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.not_modified = Some((etag.to_string(), headers));
        self
    }
}

/// A real HTTP/1.1 backend on 127.0.0.1:0. Paths:
/// `/echo*` echoes the body (streamed) with the request's content-type; `/headers` answers the
/// request head as JSON; `/slow/{ms}` answers after a delay (counting cancellations);
/// `/download/{bytes}` streams a pattern body; `/upload` answers "{len} {intact}" of a pattern
/// body; `/status/{code}`; `/hop` answers with hop-by-hop headers; `/ws` is a WebSocket echo;
/// `/gen*` answers `"<target> #<n>"` as the test's [`Reply`] for its prefix says.
pub struct TestUpstream {
    pub addr: SocketAddr,
    pub state: Arc<UpstreamState>,
    task: tokio::task::JoinHandle<()>,
}

/// Builds a [`TestUpstream`]: `TestUpstream::new().route("/gen/x", Reply::ok().header(..)).spawn()`.
#[derive(Default)]
pub struct TestUpstreamBuilder {
    replies: Vec<(String, Reply)>,
}

impl TestUpstreamBuilder {
    /// Answer `/gen` paths starting with `prefix` so.
    pub fn route(mut self, prefix: &str, reply: Reply) -> TestUpstreamBuilder {
        self.replies.push((prefix.to_string(), reply));
        self
    }

    pub async fn spawn(self) -> TestUpstream {
        let state = Arc::new(UpstreamState { replies: std::sync::Mutex::new(self.replies), ..Default::default() });
        TestUpstream::serve(state).await
    }
}

impl TestUpstream {
    /// A builder, so a test reads `TestUpstream::new().route(..).spawn()`.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> TestUpstreamBuilder {
        TestUpstreamBuilder::default()
    }

    pub async fn spawn() -> TestUpstream {
        TestUpstream::new().spawn().await
    }

    /// From now on, answer `/gen` paths starting with `prefix` so (before earlier routes).
    pub fn set(&self, prefix: &str, reply: Reply) {
        self.state.replies.lock().unwrap().insert(0, (prefix.to_string(), reply));
    }

    /// The headers of every `/gen` request for this path and query, in order.
    pub fn seen(&self, target: &str) -> Vec<HeaderMap> {
        self.state.seen.lock().unwrap().iter().filter(|(t, _)| t == target).map(|(_, h)| h.clone()).collect()
    }

    async fn serve(state: Arc<UpstreamState>) -> TestUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let st = st.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let st = st.clone();
                        async move { Ok::<_, Infallible>(upstream_handle(req, st).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        TestUpstream { addr, state, task }
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn full(body: impl Into<Bytes>) -> TestBody {
    Full::new(body.into()).map_err(|e: Infallible| match e {}).boxed()
}

/// Counts the request as cancelled if dropped before `done` is set.
struct CancelGuard {
    state: Arc<UpstreamState>,
    done: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.done {
            self.state.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn upstream_handle(mut req: Request<Incoming>, st: Arc<UpstreamState>) -> Response<TestBody> {
    st.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    let mut resp = Response::new(full(""));
    if path.starts_with("/echo") {
        let ct = req.headers().get("content-type").cloned();
        let method = req.method().to_string();
        let body = req.into_body().map_err(|e| Box::new(e) as BoxError).boxed();
        resp = Response::new(body);
        if let Some(ct) = ct {
            resp.headers_mut().insert("content-type", ct);
        }
        resp.headers_mut().insert("x-echo-method", method.parse().unwrap());
    } else if path == "/headers" {
        let mut headers: HashMap<String, Vec<String>> = HashMap::new();
        for (k, v) in req.headers() {
            headers.entry(k.to_string()).or_default().push(v.to_str().unwrap_or("<binary>").to_string());
        }
        let json = serde_json::json!({
            "method": req.method().as_str(),
            "uri": req.uri().to_string(),
            "version": format!("{:?}", req.version()),
            "headers": headers,
        });
        resp = Response::new(full(json.to_string()));
    } else if let Some(ms) = path.strip_prefix("/slow/") {
        let mut guard = CancelGuard { state: st.clone(), done: false };
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        guard.done = true;
        st.completed_slow.fetch_add(1, Ordering::SeqCst);
        resp = Response::new(full("slow"));
    } else if let Some(n) = path.strip_prefix("/download/") {
        resp = Response::new(PatternBody::new(n.parse().unwrap()).map_err(|e| match e {}).boxed());
    } else if path == "/upload" {
        let (len, intact) = consume_pattern(req.into_body()).await;
        resp = Response::new(full(format!("{len} {intact}")));
    } else if let Some(code) = path.strip_prefix("/status/") {
        *resp.status_mut() = StatusCode::from_u16(code.parse().unwrap()).unwrap();
    } else if path == "/hop" {
        let h = resp.headers_mut();
        h.insert("connection", "x-hop-secret".parse().unwrap());
        h.insert("x-hop-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-end-to-end", "kept".parse().unwrap());
        resp = Response::from_parts(resp.into_parts().0, full("hop"));
    } else if path.starts_with("/gen") {
        // A generated answer, "<target> #<n>", shaped by the test's replies (see `Reply`).
        let n = st.requests.load(Ordering::SeqCst);
        let target = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
        st.seen.lock().unwrap().push((target.clone(), req.headers().clone()));
        let reply =
            st.replies.lock().unwrap().iter().find(|(p, _)| path.starts_with(p.as_str())).map(|(_, r)| r.clone());
        return scripted(&reply.unwrap_or_default(), &target, n, req.headers()).await;
    } else if path == "/ws" {
        let key = req.headers().get("sec-websocket-key").cloned().unwrap();
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let io = TokioIo::new(on_upgrade.await.unwrap());
            let ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                io,
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            use futures_util::{SinkExt, StreamExt};
            let (mut tx, mut rx) = ws.split();
            while let Some(Ok(msg)) = rx.next().await {
                if msg.is_text() || msg.is_binary() {
                    let _ = tx.send(msg).await;
                } else if msg.is_close() {
                    break;
                }
            }
        });
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        resp = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(full(""))
            .unwrap();
    }
    resp
}

/// The answer a [`Reply`] describes.
async fn scripted(reply: &Reply, target: &str, n: usize, request: &HeaderMap) -> Response<TestBody> {
    tokio::time::sleep(reply.delay).await;
    if let Some((etag, headers)) = &reply.not_modified {
        if request.get("if-none-match").is_some_and(|v| v == etag.as_str()) {
            let mut resp = Response::new(full(""));
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            for (k, v) in headers {
                resp.headers_mut().append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
            }
            return resp;
        }
    }
    let mut body = format!("{target} #{n}").into_bytes();
    if reply.binary {
        body.extend((0..=255u8).cycle().take(1024));
    }
    if let Some(size) = reply.size {
        body.resize(size, b'.');
    }
    let mut resp = Response::new(full(body));
    *resp.status_mut() = StatusCode::from_u16(reply.status.unwrap_or(200)).unwrap();
    for (k, v) in &reply.headers {
        resp.headers_mut().append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    resp
}

// ---------------------------------------------------------------- the proxy, in-process

/// `proxy.toml` text for a proxy on loopback port 0 in front of `upstream`, plus `extra` TOML:
/// lines before the first table header go into `[server]`, the rest after `[upstream]`.
pub fn config_text(upstream: SocketAddr, extra: &str) -> String {
    let split = extra.find("\n[").map_or(extra.len(), |i| i + 1);
    let split = if extra.trim_start().starts_with('[') { 0 } else { split };
    config_full(upstream, &extra[..split], "", &extra[split..])
}

/// `proxy.toml` text with extra lines for `[server]`, for `[upstream]`, and after both.
pub fn config_full(upstream: SocketAddr, server: &str, upstream_extra: &str, rest: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{server}\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [upstream]\nurl = \"http://{upstream}\"\n{upstream_extra}\n{rest}\n"
    )
}

/// The proxy running in this test process through the library API.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<()>>,
    /// Applies a new configuration to the running proxy.
    pub reloader: Arc<sidecache::reload::Reloader>,
}

impl TestProxy {
    pub async fn start(toml: &str) -> TestProxy {
        Self::start_with_env(toml, &HashMap::new()).await
    }

    pub async fn start_with_env(toml: &str, env: &HashMap<String, String>) -> TestProxy {
        Self::start_with(toml, env, sidecache::Clock::system()).await
    }

    /// Start with the cache's freshness judged by `clock` (a manual clock the test moves).
    pub async fn start_with(toml: &str, env: &HashMap<String, String>, clock: sidecache::Clock) -> TestProxy {
        let config = sidecache::Config::from_sources(toml, env).unwrap_or_else(|e| panic!("config: {e}\n{toml}"));
        let server = sidecache::Sidecache::bind_with_clock(config, clock).await.expect("bind");
        let (addr, admin, reloader) = (server.proxy_addr(), server.admin_addr(), server.reloader());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = server.run(async {
            let _ = stopped.await;
        });
        let task = tokio::spawn(async move { run.await.expect("proxy ran") });
        TestProxy { addr, admin, stop: Some(stop), task: Some(task), reloader }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Begin shutdown; the returned task ends when the drain is over.
    pub fn shutdown(&mut self) -> tokio::task::JoinHandle<()> {
        let _ = self.stop.take().map(|s| s.send(()));
        self.task.take().expect("running")
    }
}

impl Drop for TestProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

// ---------------------------------------------------------------- a cached proxy and its upstream

/// Where a test's cache keeps its entries.
#[derive(Clone, Copy, Debug)]
pub enum Store {
    Embedded,
    Redis,
}

/// A proxy with cached routes in front of a test upstream, its freshness on a manual clock.
pub struct CacheSetup {
    pub upstream: TestUpstream,
    pub proxy: TestProxy,
    pub clock: sidecache::Clock,
    pub redis: Option<redis::TestRedis>,
}

impl CacheSetup {
    /// `routes`, then a `[cache]` table with `cache` in it; on `Store::Redis` a redis-server of
    /// the test's own, with the hot tier off so that every lookup reaches Redis.
    pub async fn start(routes: &str, upstream: TestUpstreamBuilder, store: Store, cache: &str) -> CacheSetup {
        let redis = matches!(store, Store::Redis).then(redis::TestRedis::start);
        let extra = match &redis {
            Some(redis) => {
                format!(
                    "[cache]\nhot_ttl = \"0s\"\n{cache}\n[redis]\nurl = \"{}\"\nop_timeout = \"200ms\"\n",
                    redis.url()
                )
            }
            None => format!("[cache]\n{cache}\n"),
        };
        Self::with(routes, &extra, upstream, redis).await
    }

    /// `routes` and `extra` TOML as given; waits for `redis` when there is one.
    pub async fn with(
        routes: &str,
        extra: &str,
        upstream: TestUpstreamBuilder,
        redis: Option<redis::TestRedis>,
    ) -> CacheSetup {
        let upstream = upstream.spawn().await;
        let clock = sidecache::Clock::manual();
        let toml = config_text(upstream.addr, &format!("{routes}\n{extra}"));
        let proxy = TestProxy::start_with(&toml, &HashMap::new(), clock.clone()).await;
        if redis.is_some() {
            wait_for_redis(&proxy).await;
        }
        CacheSetup { upstream, proxy, clock, redis }
    }
}

// ---------------------------------------------------------------- the proxy, as the real binary

/// A unique temporary file path for this process.
pub fn temp_path(name: &str) -> std::path::PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("sidecache-test-{}-{n}-{name}", std::process::id()))
}

/// The release or debug `sidecache` binary, started with a config file; its JSON log is read
/// until it says where it listens.
pub struct BinaryProxy {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub log: Arc<std::sync::Mutex<Vec<String>>>,
    /// `proxy.toml`, alone in a directory of its own (the binary watches the directory).
    pub config_path: std::path::PathBuf,
}

impl BinaryProxy {
    pub fn spawn(toml: &str) -> BinaryProxy {
        Self::spawn_with_env(toml, &[])
    }

    /// Start it with these environment variables set (the rest of the test's environment is kept).
    pub fn spawn_with_env(toml: &str, env: &[(&str, &str)]) -> BinaryProxy {
        let dir = temp_path("config");
        std::fs::create_dir(&dir).unwrap();
        let config_path = dir.join("proxy.toml");
        std::fs::write(&config_path, toml).unwrap();
        Self::start(config_path, env)
    }

    /// Start it on a configuration file the test laid out (its directory is removed on drop).
    pub fn start(config_path: std::path::PathBuf, env: &[(&str, &str)]) -> BinaryProxy {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sidecache"));
        // The test's own settings only: none of the shell's logging or OpenTelemetry variables.
        for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("OTEL_")) {
            command.env_remove(name);
        }
        let mut child = command
            .arg("--config")
            .arg(&config_path)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sidecache");
        let stdout = child.stdout.take().unwrap();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("\"listening\"") {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
                    let addr = |k: &str| v[k].as_str().unwrap().parse::<SocketAddr>().unwrap();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send((addr("proxy"), addr("admin")));
                    }
                }
                log2.lock().unwrap().push(line);
            }
        });
        let (addr, admin) = rx.recv_timeout(Duration::from_secs(10)).expect("sidecache logged its listen addresses");
        BinaryProxy { child, addr, admin, log, config_path }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Replace the configuration file the way editors and the kubelet do: a new file renamed
    /// over the old one.
    pub fn rewrite_config(&self, toml: &str) {
        let next = self.config_path.with_extension("next");
        std::fs::write(&next, toml).unwrap();
        std::fs::rename(&next, &self.config_path).unwrap();
    }

    /// The log lines from index `from` on that contain `needle`, waiting up to 10 s for one.
    pub async fn wait_log(&self, from: usize, needle: &str) -> Vec<String> {
        for _ in 0..500 {
            let lines: Vec<String> =
                self.log.lock().unwrap().iter().skip(from).filter(|l| l.contains(needle)).cloned().collect();
            if !lines.is_empty() {
                return lines;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no log line with {needle:?} after line {from}: {:#?}", self.log.lock().unwrap());
    }

    /// How many lines the binary has logged so far.
    pub fn log_len(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(ok.success());
    }

    /// Peak resident memory (VmHWM) of the process, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmHWM:")
    }

    /// Current resident memory (VmRSS), in KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.child.id(), "VmRSS:")
    }

    /// Wait for exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        for _ in 0..limit.as_millis().div_ceil(20) {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child.try_wait().unwrap()
    }
}

pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

impl Drop for BinaryProxy {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(dir) = self.config_path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

// ---------------------------------------------------------------- a small client

pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.text()))
    }
}

/// Send a request with a whole body and read the whole answer (10 s limit).
pub async fn send(method: Method, url: &str, headers: &[(&str, &str)], body: impl Into<Bytes>) -> Answer {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(full(body)).unwrap();
    let fut = async {
        let resp = client().request(req).await.expect("request");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Answer { status: parts.status, headers: parts.headers, body }
    };
    tokio::time::timeout(Duration::from_secs(10), fut).await.expect("answer within 10 s")
}

pub async fn get(url: &str) -> Answer {
    send(Method::GET, url, &[], Bytes::new()).await
}

/// The value of one sample line in a Prometheus text exposition, e.g.
/// `sidecache_requests_total{route="a",status_class="2xx"}`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
}

/// Waits (10 s at most) until the `/metrics` of the admin listener at `admin` has `series` at
/// `value`; the whole text then.
pub async fn until_metric(admin: SocketAddr, series: &str, value: f64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = get(&format!("http://{admin}/metrics")).await.text();
        if metric(&m, series) == Some(value) {
            return m;
        }
        assert!(tokio::time::Instant::now() < deadline, "{series} never became {value}: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (10 s at most) until the cache's invalidation links to `n` Redis primaries track, as
/// the `/metrics` of the admin listener at `admin` say.
pub async fn until_tracking(admin: SocketAddr, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = get(&format!("http://{admin}/metrics")).await.text();
        let up = m
            .lines()
            .filter(|l| l.starts_with(r#"sidecache_redis_tracking_up{client="cache""#) && l.ends_with(" 1"))
            .count();
        if up == n {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{up} invalidation links up, not {n}: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (up to 10 s) until `/status` at `admin_url` says every Redis client of the proxy (the
/// cache's, the limiter's) is connected with its breaker closed.
pub async fn until_redis_ready(admin_url: &str) {
    let started = tokio::time::Instant::now();
    let ready = |redis: &serde_json::Value| redis.is_null() || (redis["connected"] == true && redis["state"] == "up");
    loop {
        let status = get(&format!("{admin_url}/status")).await.json();
        let some = !status["redis"].is_null() || !status["ratelimit_redis"].is_null();
        if some && ready(&status["redis"]) && ready(&status["ratelimit_redis"]) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "proxy never connected to redis: {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Four clients requesting `/gen/item-N` (N below `paths`) in a loop until [`SteadyLoad::finish`]
/// (at most 60 s), checking every answer: a 200 carrying its own path's body, whether it came
/// from the cache or the backend.
pub struct SteadyLoad {
    stop: Arc<std::sync::atomic::AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<(u32, Duration)>>,
}

impl SteadyLoad {
    pub fn start(proxy: &Arc<TestProxy>, paths: u32) -> SteadyLoad {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = (0..4)
            .map(|c| {
                let (proxy, stop) = (proxy.clone(), stop.clone());
                tokio::spawn(async move {
                    let (mut answered, mut slowest) = (0u32, Duration::ZERO);
                    let started = tokio::time::Instant::now();
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                        let path = format!("/gen/item-{}", (answered + c) % paths);
                        let t = tokio::time::Instant::now();
                        let a = get(&proxy.url(&path)).await;
                        slowest = slowest.max(t.elapsed());
                        assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.text());
                        assert!(a.text().starts_with(&format!("{path} #")), "{path} answered {:?}", a.text());
                        answered += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    (answered, slowest)
                })
            })
            .collect();
        SteadyLoad { stop, clients }
    }

    /// Stop the clients: requests answered and the slowest one (a wrong answer panics here).
    pub async fn finish(self) -> (u32, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let (mut total, mut slowest) = (0, Duration::ZERO);
        for client in self.clients {
            let (answered, slow) = client.await.expect("every answer was a correct 200");
            total += answered;
            slowest = slowest.max(slow);
        }
        (total, slowest)
    }
}

/// [`until_redis_ready`] for an in-process proxy.
pub async fn wait_for_redis(proxy: &TestProxy) {
    until_redis_ready(&proxy.admin_url("")).await
}

/// Waits until `n` responses of `route` were written to the cache store (writes never delay a
/// response).
pub async fn stored(proxy: &TestProxy, route: &str, n: f64) {
    stored_at(&proxy.admin_url(""), route, n).await
}

/// [`stored`] for any proxy, by its admin base URL (`http://host:port`).
pub async fn stored_at(admin_url: &str, route: &str, n: f64) {
    let series = format!(r#"sidecache_cache_stores_total{{route="{route}",result="stored"}}"#);
    for _ in 0..250 {
        if metric(&get(&format!("{admin_url}/metrics")).await.text(), &series).unwrap_or(0.0) >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{route}: {n} stores not reached");
}

pub fn boxed<B>(body: B) -> TestBody
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}
