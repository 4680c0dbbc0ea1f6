//! Response bodies: whole (nearly every response), a few chunks sent as they are (a large
//! prediction answer, so it is not copied to add the envelope around it), or streamed from a
//! channel (a build log being followed while the build runs). `Either` keeps the common case
//! free of boxing.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Frame, SizeHint};
use tokio::sync::mpsc;

pub type Body = Either<Full<Bytes>, Streamed>;

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Either::Left(Full::new(bytes.into()))
}

/// A body of several chunks, written in order (vectored where the connection can), with its
/// length known up front so it is sent with a Content-Length.
pub fn parts(chunks: impl IntoIterator<Item = Bytes>) -> Body {
    let chunks: VecDeque<Bytes> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
    let remaining = chunks.iter().map(|c| c.len() as u64).sum();
    Either::Right(Streamed::Parts { chunks, remaining })
}

/// A body streamed from the returned sender; it ends when the sender is dropped.
pub fn channel(capacity: usize) -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel(capacity);
    (tx, Either::Right(Streamed::Channel(rx)))
}

pub enum Streamed {
    Parts {
        chunks: VecDeque<Bytes>,
        remaining: u64,
    },
    Channel(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for Streamed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            Streamed::Parts { chunks, remaining } => Poll::Ready(chunks.pop_front().map(|c| {
                *remaining -= c.len() as u64;
                Ok(Frame::data(c))
            })),
            Streamed::Channel(rx) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Streamed::Parts { chunks, .. } if chunks.is_empty())
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Streamed::Parts { remaining, .. } => SizeHint::with_exact(*remaining),
            Streamed::Channel(_) => SizeHint::default(),
        }
    }
}
