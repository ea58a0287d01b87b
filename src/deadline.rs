//! Connection deadlines: a connection gets `server.header_read_timeout` from its start (and an
//! HTTP/1 request from its first byte) to deliver a complete request head, and is closed after
//! `server.idle_timeout` with no request in progress, or with a write waiting that long for the
//! client to read.
//!
//! hyper cannot do this alone: hyper-util's auto builder waits with no timer for the bytes that
//! tell HTTP/1.1 from h2, hyper's HTTP/1 header timer also runs while a keep-alive connection is
//! idle, and its h2 server has no idle timeout. So the connection's IO is wrapped in
//! [`Deadlined`], which sees every read, and the request path holds a [`Busy`] guard from the
//! moment hyper hands it a request until the response body is dropped (or, for an upgraded
//! connection, until the tunnel ends). Only while no guard is held does a deadline run.
//!
//! The same wrapper writes what hyper's server cannot: interim responses from the backend
//! (`103 Early Hints`) to an HTTP/1.1 client, between hyper's messages ([`Activity::interim`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use http::{HeaderMap, StatusCode};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

/// The two timeouts, from `[server]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// From the connection's start, or an HTTP/1 request's first byte, to its complete head.
    pub header_read: Duration,
    /// With no request in progress.
    pub idle: Duration,
}

/// What a connection's requests are doing, shared by its IO and its requests.
#[derive(Debug)]
pub struct Activity {
    /// Requests (and tunnels) in progress.
    in_flight: AtomicUsize,
    /// Requests begun, ever: a request can begin and end between two reads.
    begun: AtomicUsize,
    /// An h2 connection's task, woken when its last request ends (a stream ends on a task of its
    /// own, and the connection must then start its idle deadline).
    waker: AtomicWaker,
    /// The connection's place in its listener's budget: released when the connection and any
    /// tunnel it was upgraded to are gone.
    _permit: OwnedSemaphorePermit,
    /// Whether the connection speaks h2, where a client can stall a response without a read or
    /// write waiting: by granting no flow-control window, so hyper never asks the body for more.
    h2: AtomicBool,
    /// h2 response bodies not waiting on their source: hyper has not asked them for more since
    /// their last frame (or at all).
    unasked: AtomicUsize,
    /// When an h2 response body was last created or asked, in milliseconds since `born`.
    asked_at: AtomicU64,
    born: Instant,
    /// HTTP/1.1: interim responses from the backend (`103 Early Hints`), encoded, waiting for the
    /// connection's task to write them (hyper's server cannot send one itself).
    interim: Mutex<Vec<u8>>,
    has_interim: AtomicBool,
    /// Whether a request's forward awaits its final response ([`InterimGate`]): only then may an
    /// interim response be queued.
    awaiting: AtomicBool,
    /// Whether everything hyper has written was flushed: set when the IO's flush completes
    /// (hyper flushes it only with its own buffer empty), cleared, under the `interim` lock,
    /// before hyper's next bytes. While a request awaits its final response, hyper has no other
    /// response to write (HTTP/1 answers one request at a time), so once flushed nothing of a
    /// response is pending and an interim response cannot split one.
    flushed: AtomicBool,
    /// The connection's task, woken to write an interim response.
    writer: AtomicWaker,
}

impl Activity {
    /// A new connection's, holding `permit`.
    pub fn new(permit: OwnedSemaphorePermit) -> Activity {
        Activity {
            in_flight: AtomicUsize::new(0),
            begun: AtomicUsize::new(0),
            waker: AtomicWaker::new(),
            _permit: permit,
            h2: AtomicBool::new(false),
            unasked: AtomicUsize::new(0),
            asked_at: AtomicU64::new(0),
            born: Instant::now(),
            interim: Mutex::new(Vec::new()),
            has_interim: AtomicBool::new(false),
            awaiting: AtomicBool::new(false),
            flushed: AtomicBool::new(true),
            writer: AtomicWaker::new(),
        }
    }

    /// Pass an interim response from the backend on to an HTTP/1.1 client, before the final
    /// response (RFC 9110 15.2). Sent at once, while a request awaits its final response and
    /// nothing else is being written (otherwise dropped, as it is on h2, where hyper offers no
    /// way to send one, and past [`MAX_INTERIM`] bytes).
    pub fn interim(&self, status: StatusCode, headers: &HeaderMap) {
        if self.h2.load(Ordering::Relaxed) || !self.awaiting.load(Ordering::Acquire) {
            return;
        }
        let mut headers = headers.clone();
        crate::upstream::headers::remove_hop_by_hop(&mut headers);
        headers.remove(http::header::CONTENT_LENGTH);
        let mut encoded = Vec::with_capacity(64);
        encoded.extend_from_slice(b"HTTP/1.1 ");
        encoded.extend_from_slice(status.as_str().as_bytes());
        encoded.push(b' ');
        encoded.extend_from_slice(status.canonical_reason().unwrap_or("Informational").as_bytes());
        encoded.extend_from_slice(b"\r\n");
        for (name, value) in &headers {
            encoded.extend_from_slice(name.as_str().as_bytes());
            encoded.extend_from_slice(b": ");
            encoded.extend_from_slice(value.as_bytes());
            encoded.extend_from_slice(b"\r\n");
        }
        encoded.extend_from_slice(b"\r\n");
        // Under the lock: the connection clears `flushed` under it before hyper's next bytes.
        let mut queued = self.interim.lock().unwrap_or_else(PoisonError::into_inner);
        if !self.flushed.load(Ordering::Acquire) || queued.len() + encoded.len() > MAX_INTERIM {
            return;
        }
        queued.extend_from_slice(&encoded);
        self.has_interim.store(true, Ordering::Release);
        drop(queued);
        self.writer.wake();
    }

    /// A request's forward begins: interim responses may reach its client until the gate drops
    /// (when its final response is in hand).
    pub fn await_interim(self: &Arc<Self>) -> InterimGate {
        self.awaiting.store(true, Ordering::Release);
        InterimGate(self.clone())
    }

    fn mark_asked(&self) {
        let millis = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.asked_at.store(millis, Ordering::Relaxed);
    }

    /// While every request in progress is an h2 response that hyper has not asked for more since
    /// its last frame, the client has taken nothing since `asked_at`: the moment that has lasted
    /// `idle`.
    fn starved_until(&self, idle: Duration) -> Option<Instant> {
        let in_flight = self.in_flight.load(Ordering::Acquire);
        (in_flight > 0 && self.unasked.load(Ordering::Acquire) == in_flight)
            .then(|| self.born + Duration::from_millis(self.asked_at.load(Ordering::Relaxed)) + idle)
    }

    /// Say the connection speaks h2 (told by its first request: its first bytes can come one at
    /// a time, and an HTTP/1 method may begin `PRI`).
    pub fn speaks_h2(&self) {
        self.h2.store(true, Ordering::Relaxed);
    }

    /// Mark a request in progress until the guard is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.begun.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }
}

/// Bytes of interim responses one connection holds at most; a backend sending more is not heard.
pub const MAX_INTERIM: usize = 16 * 1024;

/// While held, a request awaits its final response; see [`Activity::await_interim`].
#[derive(Debug)]
pub struct InterimGate(Arc<Activity>);

impl Drop for InterimGate {
    fn drop(&mut self) {
        self.0.awaiting.store(false, Ordering::Release);
    }
}

/// A request (or tunnel) in progress; see [`Activity::busy`].
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.waker.wake();
        }
    }
}

/// A response body that keeps its request's [`Busy`] guard until it is dropped, and on h2 says
/// whether hyper keeps asking it for more.
pub struct Tracked<B> {
    body: B,
    busy: Busy,
    /// Counted in `Activity::unasked`.
    unasked: bool,
}

impl<B> Tracked<B> {
    /// Keep `busy` for as long as `body` lives.
    pub fn new(body: B, busy: Busy) -> Tracked<B> {
        let activity = &busy.0;
        let unasked = activity.h2.load(Ordering::Relaxed);
        if unasked {
            activity.mark_asked();
            activity.unasked.fetch_add(1, Ordering::AcqRel);
        }
        Tracked { body, busy, unasked }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        if self.unasked {
            self.busy.0.unasked.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl<B: HttpBody + Unpin> HttpBody for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.body).poll_frame(cx);
        if this.busy.0.h2.load(Ordering::Relaxed) {
            // Waiting on its source is not the client's doing; a frame handed over waits on it.
            let unasked = polled.is_ready();
            let activity = &this.busy.0;
            activity.mark_asked();
            match (this.unasked, unasked) {
                (true, false) => drop(activity.unasked.fetch_sub(1, Ordering::AcqRel)),
                (false, true) => drop(activity.unasked.fetch_add(1, Ordering::AcqRel)),
                _ => {}
            }
            this.unasked = unasked;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request head to complete: the connection's first, or an HTTP/1 request's
    /// once its first byte arrived.
    Head,
    /// A request or tunnel in progress: no deadline.
    Busy,
    /// Nothing in progress.
    Idle,
}

/// A connection's IO with the deadlines of [`Limits`]. A deadline that passes fails the next
/// read (a write stalled too long, that write) with `TimedOut`, and hyper closes the connection.
pub struct Deadlined<I> {
    io: I,
    activity: Arc<Activity>,
    limits: Limits,
    phase: Phase,
    /// `Activity::begun` when last read.
    begun: usize,
    deadline: Instant,
    /// The timer, armed at `armed`: never later than `deadline`, re-armed only when it fires
    /// early, so a keep-alive request usually costs no timer update.
    sleep: Pin<Box<Sleep>>,
    armed: Instant,
    /// Busy on h2 with every response starved of flow-control window: `deadline` is when that
    /// has lasted `idle`.
    starved: bool,
    /// Set while a write waits for the client to read: a client that stops reading (a response
    /// it never takes, pipelined requests it never collects) gets `idle` to read again.
    stalled: Option<Pin<Box<Sleep>>>,
    /// Interim response bytes taken from `Activity::interim`, and how many are written.
    interim: Vec<u8>,
    interim_at: usize,
}

impl<I> Deadlined<I> {
    /// Wrap a newly accepted connection: its first request head is due within
    /// `limits.header_read`.
    pub fn new(io: I, activity: Arc<Activity>, limits: Limits) -> Deadlined<I> {
        let deadline = Instant::now() + limits.header_read;
        Deadlined {
            io,
            activity,
            limits,
            phase: Phase::Head,
            begun: 0,
            deadline,
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            armed: deadline,
            starved: false,
            stalled: None,
            interim: Vec::new(),
            interim_at: 0,
        }
    }

    fn set_deadline(&mut self, after: Duration) {
        self.deadline_at(Instant::now() + after);
    }

    fn deadline_at(&mut self, at: Instant) {
        self.deadline = at;
        if at < self.armed {
            self.armed = at;
            self.sleep.as_mut().reset(at);
        }
    }

    /// A write's outcome, failed once it has waited on the client for `idle`.
    fn write_progress<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let idle = self.limits.idle;
        let stall = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        match stall.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "client stopped reading"))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Follow the connection's requests; `true` when it has just become idle.
    fn observe(&mut self, cx: &mut Context<'_>) -> bool {
        // An h2 stream ends on a task of its own: the connection's must learn of it. Registered
        // before looking, so an end in between still wakes it.
        let h2 = self.activity.h2.load(Ordering::Relaxed);
        if h2 {
            self.activity.waker.register(cx.waker());
        }
        let begun = self.activity.begun.load(Ordering::Relaxed);
        if self.activity.in_flight.load(Ordering::Acquire) > 0 {
            self.phase = Phase::Busy;
            self.begun = begun;
            let starved = if h2 { self.activity.starved_until(self.limits.idle) } else { None };
            self.starved = starved.is_some();
            if let Some(until) = starved {
                self.deadline_at(until);
            }
        } else if self.phase == Phase::Busy || self.begun != begun {
            self.phase = Phase::Idle;
            self.begun = begun;
            self.set_deadline(self.limits.idle);
            return true;
        }
        false
    }

    /// Whether the deadline has passed; otherwise the timer will wake the task.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        while self.sleep.as_mut().poll(cx).is_ready() {
            if self.armed >= self.deadline {
                return true;
            }
            self.armed = self.deadline;
            self.sleep.as_mut().reset(self.deadline);
        }
        false
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Deadlined<I> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.observe(cx);
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        match polled {
            Poll::Ready(Ok(())) => {
                // An h2 client's frames between requests (PING, SETTINGS) do not start a head.
                if buf.filled().len() > before && this.phase == Phase::Idle && !this.activity.h2.load(Ordering::Relaxed)
                {
                    this.phase = Phase::Head;
                    this.set_deadline(this.limits.header_read);
                }
                polled
            }
            Poll::Pending if (this.phase != Phase::Busy || this.starved) && this.expired(cx) => {
                let what = match this.phase {
                    Phase::Idle => "idle timeout",
                    Phase::Head => "request head timeout",
                    Phase::Busy => "client granted no window for its responses",
                };
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, what)))
            }
            other => other,
        }
    }
}

impl<I: AsyncWrite + Unpin> Deadlined<I> {
    /// Write the interim responses queued for this connection, every one: one may be queued
    /// while another is half written.
    fn poll_interim(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            while self.interim_at < self.interim.len() {
                let polled = Pin::new(&mut self.io).poll_write(cx, &self.interim[self.interim_at..]);
                match self.write_progress(cx, polled) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => self.interim_at += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => return Poll::Pending,
                }
            }
            self.interim.clear();
            self.interim.shrink_to(MAX_INTERIM);
            self.interim_at = 0;
            if !self.activity.has_interim.load(Ordering::Acquire)
                || !self.activity.has_interim.swap(false, Ordering::AcqRel)
            {
                return Poll::Ready(Ok(()));
            }
            let mut queued = self.activity.interim.lock().unwrap_or_else(PoisonError::into_inner);
            std::mem::swap(&mut self.interim, &mut queued);
        }
    }

    /// Before hyper's bytes: write every queued interim response, and on the first write after
    /// a flush close the gate under the queue's lock, so none can be queued in between.
    fn poll_begin_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            std::task::ready!(self.poll_interim(cx))?;
            // Nothing is ever queued on h2: no lock for its many writes.
            if self.activity.h2.load(Ordering::Relaxed) || !self.activity.flushed.load(Ordering::Acquire) {
                return Poll::Ready(Ok(()));
            }
            let queued = self.activity.interim.lock().unwrap_or_else(PoisonError::into_inner);
            if queued.is_empty() {
                self.activity.flushed.store(false, Ordering::Release);
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Deadlined<I> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_begin_write(cx))?;
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.write_progress(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_begin_write(cx))?;
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.write_progress(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // HTTP/1 flushes after a response's last bytes, with its body (and the request's guard)
        // dropped, and may not read again before the next request arrives: the idle deadline
        // starts here.
        if this.observe(cx) {
            this.expired(cx);
        }
        // hyper flushes whenever its task runs, with its own buffer empty: the moment to send
        // an interim response, and to be woken for the next.
        if !this.activity.h2.load(Ordering::Relaxed) {
            this.activity.writer.register(cx.waker());
        }
        std::task::ready!(this.poll_interim(cx))?;
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        if let Poll::Ready(Ok(())) = polled {
            this.activity.flushed.store(true, Ordering::Release);
        }
        this.write_progress(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMITS: Limits = Limits { header_read: Duration::from_secs(10), idle: Duration::from_secs(60) };

    #[tokio::test]
    async fn interim_responses_go_out_between_messages_only() {
        let (mut io, mut client, activity) = pair();
        let mut hints = HeaderMap::new();
        hints.insert("link", http::HeaderValue::from_static("</a.css>; rel=preload"));
        hints.insert("connection", http::HeaderValue::from_static("close"));
        let early = StatusCode::from_u16(103).unwrap();
        // No request awaiting its final response: nothing to pass on.
        activity.interim(early, &hints);
        io.flush().await.unwrap();
        // Part of a response written, not yet flushed: an interim response now would split it.
        let gate = activity.await_interim();
        io.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        activity.interim(early, &hints);
        io.write_all(b"content-length: 0\r\n\r\n").await.unwrap();
        io.flush().await.unwrap();
        // Flushed: a message boundary. It goes out with the next flush, before anything else.
        activity.interim(early, &hints);
        io.flush().await.unwrap();
        drop(gate);
        activity.interim(early, &hints);
        io.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
        io.flush().await.unwrap();
        drop(io);
        let mut got = String::new();
        client.read_to_string(&mut got).await.unwrap();
        assert_eq!(
            got,
            "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n\
             HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n\
             HTTP/1.1 204 No Content\r\n\r\n"
        );
        // h2 has no way to carry one from here.
        let _gate = activity.await_interim();
        activity.speaks_h2();
        activity.interim(early, &hints);
        assert!(!activity.has_interim.load(Ordering::Relaxed));
    }

    /// One half written (the client reads slowly), another queued meanwhile: both go out before
    /// hyper's next bytes, never inside them.
    #[tokio::test]
    async fn an_interim_response_queued_behind_a_half_written_one_never_splits_a_message() {
        let (mut io, mut client, activity) = pair();
        let _gate = activity.await_interim();
        let mut big = HeaderMap::new();
        big.insert("link", http::HeaderValue::from_str(&format!("</{}>", "a".repeat(2000))).unwrap());
        let mut small = HeaderMap::new();
        small.insert("link", http::HeaderValue::from_static("</b.css>"));
        let early = StatusCode::from_u16(103).unwrap();
        activity.interim(early, &big);
        // The duplex holds 1 KiB: the first is half written and the flush waits.
        assert!(tokio::time::timeout(Duration::from_millis(50), io.flush()).await.is_err());
        activity.interim(early, &small);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            String::from_utf8(got).unwrap()
        });
        io.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
        io.flush().await.unwrap();
        drop(io);
        let got = reader.await.unwrap();
        assert!(got.ends_with("link: </b.css>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"), "{got:?}");
        assert_eq!(got.matches("HTTP/1.1 103 Early Hints").count(), 2);
    }

    #[test]
    fn interim_responses_are_bounded() {
        let permit = Arc::new(tokio::sync::Semaphore::new(1)).try_acquire_owned().unwrap();
        let activity = Arc::new(Activity::new(permit));
        let _gate = activity.await_interim();
        let mut huge = HeaderMap::new();
        huge.insert("link", http::HeaderValue::from_str(&"a".repeat(MAX_INTERIM)).unwrap());
        activity.interim(StatusCode::from_u16(103).unwrap(), &huge);
        assert!(activity.interim.lock().unwrap().is_empty(), "one over the bound is not queued");
    }

    fn pair() -> (Deadlined<tokio::io::DuplexStream>, tokio::io::DuplexStream, Arc<Activity>) {
        let (server, client) = tokio::io::duplex(1024);
        let permit = Arc::new(tokio::sync::Semaphore::new(1)).try_acquire_owned().unwrap();
        let activity = Arc::new(Activity::new(permit));
        (Deadlined::new(server, activity.clone(), LIMITS), client, activity)
    }

    /// The client sends `bytes`; the server side reads them.
    async fn deliver(client: &mut tokio::io::DuplexStream, io: &mut Deadlined<tokio::io::DuplexStream>, bytes: &[u8]) {
        client.write_all(bytes).await.unwrap();
        let mut buf = vec![0u8; bytes.len()];
        io.read_exact(&mut buf).await.unwrap();
    }

    async fn read_fails_after(io: &mut Deadlined<tokio::io::DuplexStream>, start: Instant) -> Duration {
        let mut buf = [0u8; 64];
        let err = io.read(&mut buf).await.expect_err("deadline");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_ends_at_the_header_deadline() {
        let (mut io, _client, _) = pair();
        assert_eq!(read_fails_after(&mut io, Instant::now()).await, LIMITS.header_read);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_head_ends_at_the_header_deadline_whatever_it_sends() {
        let (mut io, mut client, _) = pair();
        let start = Instant::now();
        for _ in 0..5 {
            deliver(&mut client, &mut io, b"G").await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        assert_eq!(read_fails_after(&mut io, start).await, LIMITS.header_read);
    }

    #[tokio::test(start_paused = true)]
    async fn no_deadline_while_busy_then_idle_then_a_new_head() {
        let (mut io, mut client, activity) = pair();
        let mut buf = [0u8; 64];
        deliver(&mut client, &mut io, b"GET / HTTP/1.1\r\n\r\n").await;
        let busy = activity.busy();
        // A request far longer than both timeouts: nothing ends it.
        let read = tokio::time::timeout(Duration::from_secs(3600), io.read(&mut buf)).await;
        assert!(read.is_err(), "no deadline while a request is in progress");
        drop(busy);
        tokio::time::sleep(Duration::from_secs(30)).await;
        // The next request's first byte starts its head deadline.
        deliver(&mut client, &mut io, b"G").await;
        let head_from = Instant::now();
        assert_eq!(read_fails_after(&mut io, head_from).await, LIMITS.header_read);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_ends_at_the_idle_deadline() {
        let (mut io, mut client, activity) = pair();
        deliver(&mut client, &mut io, b"GET / HTTP/1.1\r\n\r\n").await;
        drop(activity.busy());
        assert_eq!(read_fails_after(&mut io, Instant::now()).await, LIMITS.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn h2_frames_between_requests_do_not_start_a_head() {
        let (mut io, mut client, activity) = pair();
        let mut buf = [0u8; 64];
        deliver(&mut client, &mut io, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        activity.speaks_h2();
        drop(activity.busy());
        // The read that sees the request's end starts the idle deadline.
        let start = Instant::now();
        assert!(tokio::time::timeout(Duration::ZERO, io.read(&mut buf)).await.is_err());
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(11)).await;
            deliver(&mut client, &mut io, b"ping").await;
        }
        assert_eq!(read_fails_after(&mut io, start).await, LIMITS.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_h2_stream_ending_wakes_a_waiting_read() {
        let (mut io, mut client, activity) = pair();
        deliver(&mut client, &mut io, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        activity.speaks_h2();
        let busy = activity.busy();
        let start = Instant::now();
        let ended = tokio::spawn(async move { read_fails_after(&mut io, start).await });
        tokio::time::sleep(Duration::from_secs(100)).await;
        drop(busy);
        assert_eq!(ended.await.unwrap(), Duration::from_secs(100) + LIMITS.idle);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_cut_off_after_the_idle_timeout() {
        let (mut io, _client, activity) = pair();
        let _busy = activity.busy();
        let start = Instant::now();
        let chunk = [0u8; 256];
        // The duplex buffer (1 KiB) fills; the client never reads.
        let err = loop {
            match io.write(&chunk).await {
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), LIMITS.idle, "even with a request in progress");
    }
}
