//! The body type of the request path: a peer's body streamed through, optionally recorded for
//! the cache as it passes (a miss on a cacheable route), or a whole body the proxy wrote.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// What to do with a recorded body once it has passed through completely.
pub trait Finish: Send + Sync + 'static {
    /// The whole body arrived: store it (without making anyone wait).
    fn complete(self: Box<Self>, body: Bytes);
    /// The body grew past the limit: it streams on, but is not stored.
    fn too_large(self: Box<Self>);
}

struct Recording {
    buf: BytesMut,
    limit: usize,
    finish: Box<dyn Finish>,
}

/// A peer's body, streamed through; when recording, also copied (up to a limit) for the cache.
/// A client that disconnects drops the body before its end, and nothing is stored.
pub struct RecordingBody {
    inner: Incoming,
    recording: Option<Recording>,
}

impl RecordingBody {
    /// Stream through untouched.
    pub fn passthrough(inner: Incoming) -> RecordingBody {
        RecordingBody { inner, recording: None }
    }

    /// Stream through and hand the whole body to `finish` at its end, unless it exceeds `limit`.
    pub fn recording(inner: Incoming, limit: usize, finish: Box<dyn Finish>) -> RecordingBody {
        // An empty body is over before it starts, and hyper never polls it: complete now.
        if inner.is_end_stream() {
            finish.complete(Bytes::new());
            return RecordingBody::passthrough(inner);
        }
        let capacity = inner.size_hint().exact().map_or(8 * 1024, |n| n as usize).min(limit);
        RecordingBody { inner, recording: Some(Recording { buf: BytesMut::with_capacity(capacity), limit, finish }) }
    }
}

impl Body for RecordingBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some(rec), Some(data)) = (&mut this.recording, f.data_ref()) {
                    if rec.buf.len() + data.len() > rec.limit {
                        if let Some(rec) = this.recording.take() {
                            rec.finish.too_large();
                        }
                    } else {
                        rec.buf.extend_from_slice(data);
                    }
                }
                // hyper stops polling once a body reports its end (a known length reached), so
                // the final `None` may never come: finish on the last frame.
                if this.inner.is_end_stream() {
                    if let Some(rec) = this.recording.take() {
                        rec.finish.complete(rec.buf.freeze());
                    }
                }
            }
            None => {
                if let Some(rec) = this.recording.take() {
                    rec.finish.complete(rec.buf.freeze());
                }
            }
            // A broken upstream body is never stored.
            Some(Err(_)) => this.recording = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
