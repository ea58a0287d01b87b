//! The body type of the request path: a peer's body streamed through (perhaps after frames the
//! proxy already read from it), or a whole body the proxy wrote.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};

/// Every body the proxy sends or receives. An enum rather than a boxed body, so pass-through
/// costs no allocation for it.
pub type Body = Either<Streamed, Full<Bytes>>;

/// A peer's body, streamed through. When the cache read the start of it (a response it meant to
/// store that turned out too large or too slow), those frames come first.
pub struct Streamed {
    /// Frames (or the error that ended the body) already read, in reverse order.
    read: Vec<Result<Frame<Bytes>, hyper::Error>>,
    inner: Incoming,
    /// Set once the body has been read to its end, when someone asked ([`Streamed::watch_end`]).
    ended: Option<Arc<AtomicBool>>,
}

impl Streamed {
    /// Stream a body through untouched.
    pub fn new(inner: Incoming) -> Streamed {
        Streamed { read: Vec::new(), inner, ended: None }
    }

    /// The rest of a body whose first frames were already read.
    pub fn after(read: Vec<Result<Frame<Bytes>, hyper::Error>>, inner: Incoming) -> Streamed {
        let mut read = read;
        read.reverse();
        Streamed { read, inner, ended: None }
    }

    /// A flag set once the body has been read to its end.
    pub fn watch_end(&mut self) -> Arc<AtomicBool> {
        self.ended.get_or_insert_with(Arc::default).clone()
    }

    /// As the request path's body type.
    pub fn body(inner: Incoming) -> Body {
        Either::Left(Streamed::new(inner))
    }
}

/// A whole body written by the proxy.
pub fn full(bytes: Bytes) -> Body {
    Either::Right(Full::new(bytes))
}

impl HttpBody for Streamed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if let Some(frame) = self.read.pop() {
            return Poll::Ready(Some(frame));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Some(ended) = &self.ended {
            if matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream() {
                ended.store(true, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let read: u64 = self.read.iter().filter_map(|f| f.as_ref().ok()?.data_ref()).map(|d| d.len() as u64).sum();
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(read));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(read));
        }
        hint
    }
}
