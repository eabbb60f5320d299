//! Request bodies under the body timeout ([`BodyTimeout`]).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::BoxError;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::{BodyTimeout, OnRefusal, Refusal};

/// A request body that broke the body timeout: it did not come in full in
/// time, or it paused too long. Handlers find it among their read error's
/// sources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request body did not come within {} s", .0.as_secs_f64())]
pub struct BodyTimedOut(pub Duration);

/// A request body that fails with [`BodyTimedOut`] when it breaks its
/// policy, reporting [`Refusal::SlowBody`] once.
pub struct TimedBody<B> {
    inner: B,
    timeout: BodyTimeout,
    /// Whole: when the head came. Pause: when the last piece came (the
    /// first read, before any), moved at every piece.
    mark: Instant,
    /// Armed at the first read: a request whose body is never read costs
    /// no timer. Moved on only when it fires early, not at every piece: an
    /// upload brings tens of thousands a second.
    timer: Option<Pin<Box<Sleep>>>,
    on_refusal: OnRefusal,
    timed_out: bool,
}

impl<B> TimedBody<B> {
    /// A body whose head came now.
    pub fn new(inner: B, timeout: BodyTimeout, on_refusal: OnRefusal) -> Self {
        Self { inner, timeout, mark: Instant::now(), timer: None, on_refusal, timed_out: false }
    }
}

impl<B> http_body::Body for TimedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.timed_out {
            return Poll::Ready(None);
        }
        let (pause, timeout) = match this.timeout {
            BodyTimeout::Whole(timeout) => (false, timeout),
            BodyTimeout::Pause(timeout) => (true, timeout),
        };
        if this.timer.is_none() && pause {
            this.mark = Instant::now();
        }
        let mark = this.mark;
        let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(mark + timeout)));
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if pause {
                    this.mark = Instant::now();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => loop {
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let due = this.mark + timeout;
                if Instant::now() >= due {
                    this.timed_out = true;
                    (this.on_refusal)(Refusal::SlowBody);
                    return Poll::Ready(Some(Err(Box::new(BodyTimedOut(timeout)))));
                }
                // Pieces came since the timer was set: it fired early; move it on.
                timer.as_mut().reset(due);
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.timed_out || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests;
