//! A request body that must arrive in full within a deadline.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use bytes::Bytes;
use http_body::Frame;
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::{OnRefusal, Refusal};

/// The body did not arrive within the server's body timeout.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {0:?}")]
pub struct BodyTimedOut(pub Duration);

/// The request, its body bounded by `timeout` from now.
pub fn with_deadline(request: Request<Incoming>, timeout: Duration, on_refusal: OnRefusal) -> Request {
    request.map(|body| {
        Body::new(Deadline {
            inner: body,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            timeout,
            on_refusal,
            done: false,
        })
    })
}

pin_project_lite::pin_project! {
    struct Deadline {
        #[pin]
        inner: Incoming,
        sleep: Pin<Box<Sleep>>,
        timeout: Duration,
        on_refusal: OnRefusal,
        done: bool,
    }
}

impl http_body::Body for Deadline {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if *this.done {
            return Poll::Ready(None);
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(None) => {
                *this.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame.map_err(Into::into))),
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    *this.done = true;
                    (this.on_refusal)(Refusal::SlowBody);
                    Poll::Ready(Some(Err(Box::new(BodyTimedOut(*this.timeout)))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
