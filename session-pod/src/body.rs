//! Request bodies: a body that must keep coming ([`TimedBody`]), read up to
//! a limit within a time, parsed as JSON with errors that say which field.

use std::error::Error as StdError;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::BoxError;
use axum::body::Body;
use axum::http::StatusCode;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tidepool_protocol::BodyError;
use tokio::time::{Instant, Sleep};

use crate::error::{ApiError, Reason};

/// A request body that sent nothing for the body read timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no byte of the request body came for {} s", .0.as_secs_f64())]
pub struct BodyTimedOut(pub Duration);

/// A request body that fails with [`BodyTimedOut`] when no piece of it comes
/// within `timeout` of the last (or of the first read). Every request's body
/// is one, so a client cannot hold a handler by sending a byte now and then
/// forever; handlers that read a whole body also bound the whole read.
pub struct TimedBody<B> {
    inner: B,
    timeout: Duration,
    /// Armed at the first read: a handler may look at the request first.
    timer: Option<Pin<Box<Sleep>>>,
    /// When the last piece came. The timer is moved on only when it fires
    /// early, not at every piece: an upload brings tens of thousands a second.
    last_piece: Instant,
}

impl<B> TimedBody<B> {
    pub fn new(inner: B, timeout: Duration) -> Self {
        Self { inner, timeout, timer: None, last_piece: Instant::now() }
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
        let timeout = this.timeout;
        if this.timer.is_none() {
            this.last_piece = Instant::now();
        }
        let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.last_piece = Instant::now();
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(error.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => loop {
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let due = this.last_piece + timeout;
                if Instant::now() >= due {
                    return Poll::Ready(Some(Err(Box::new(BodyTimedOut(timeout)))));
                }
                // Pieces came since the timer was set: it fired early; move it on.
                timer.as_mut().reset(due);
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body that failed: 408 when it stopped coming, else 400.
pub fn broken_body(error: &(dyn StdError + 'static), what: &str) -> ApiError {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(timed_out) = current.downcast_ref::<BodyTimedOut>() {
            return timed_out_error(timed_out.0);
        }
        cause = current.source();
    }
    ApiError::bad_request(Reason::BodyError, format!("{what}: {error}"))
}

fn timed_out_error(timeout: Duration) -> ApiError {
    ApiError::new(
        Reason::BodyTimeout,
        StatusCode::REQUEST_TIMEOUT,
        format!("the request body did not come within {} s", timeout.as_secs_f64()),
    )
}

/// The whole body, at most `limit` bytes (413 beyond), within `timeout` (408 beyond).
pub async fn read_body(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    let collected = match tokio::time::timeout(timeout, Limited::new(body, limit).collect()).await {
        Ok(collected) => collected,
        Err(_) => return Err(timed_out_error(timeout)),
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => Err(ApiError::new(
            Reason::BodyTooLarge,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is over the limit of {limit} bytes"),
        )),
        Err(e) => Err(broken_body(e.as_ref(), "cannot read the body")),
    }
}

/// JSON that does not parse is a 400; JSON of the wrong shape (a missing
/// field, a `null` where a number belongs: what NaN becomes in JSON) is a
/// 422 that names the field.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    tidepool_protocol::parse_json(body).map_err(|e| match e {
        BodyError::Syntax(_) => ApiError::bad_request(Reason::BadJson, e.to_string()),
        BodyError::Field { .. } => ApiError::new(Reason::BadField, StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_protocol::results::ResultsSubmission;

    #[test]
    fn json_errors_are_400_and_shape_errors_are_422_with_the_path() {
        let syntax = parse_json::<ResultsSubmission>(b"{\"results\":").unwrap_err();
        assert_eq!((syntax.status, syntax.reason), (StatusCode::BAD_REQUEST, Reason::BadJson));
        let nan = parse_json::<ResultsSubmission>(br#"{"results":{"latency":{"p50Ms":null}}}"#).unwrap_err();
        assert_eq!((nan.status, nan.reason), (StatusCode::UNPROCESSABLE_ENTITY, Reason::BadField));
        assert!(nan.message.starts_with("results.latency.p50Ms"), "{}", nan.message);
        let trailing = parse_json::<ResultsSubmission>(br#"{"results":{}} x"#).unwrap_err();
        assert_eq!(trailing.status, StatusCode::BAD_REQUEST);
    }

    /// A body that sends its frames `gap` apart.
    fn trickle(frames: usize, gap: Duration) -> Body {
        let stream = futures_util::stream::unfold(0, move |sent| async move {
            if sent == frames {
                return None;
            }
            tokio::time::sleep(gap).await;
            Some((Ok::<_, std::io::Error>(Bytes::from_static(b"x")), sent + 1))
        });
        Body::from_stream(stream)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stops_coming_is_cut() {
        let timeout = Duration::from_secs(10);
        // Steady: each frame within the timeout of the last, for 50 s in all.
        let steady = Body::new(TimedBody::new(trickle(5, Duration::from_secs(9)), timeout));
        let collected = steady.collect().await.unwrap().to_bytes();
        assert_eq!(collected.len(), 5);
        let stalled = Body::new(TimedBody::new(trickle(2, Duration::from_secs(11)), timeout));
        let error = read_body(stalled, 1024, Duration::from_secs(100)).await.unwrap_err();
        assert_eq!((error.status, error.reason), (StatusCode::REQUEST_TIMEOUT, Reason::BodyTimeout));
        // The whole read is bounded too.
        let slow = Body::new(TimedBody::new(trickle(5, Duration::from_secs(9)), timeout));
        let error = read_body(slow, 1024, Duration::from_secs(30)).await.unwrap_err();
        assert_eq!(error.reason, Reason::BodyTimeout);
        assert_eq!(error.message, "the request body did not come within 30 s");
        let large = read_body(Body::from(vec![0u8; 2048]), 1024, timeout).await.unwrap_err();
        assert_eq!((large.status, large.reason), (StatusCode::PAYLOAD_TOO_LARGE, Reason::BodyTooLarge));
    }
}
