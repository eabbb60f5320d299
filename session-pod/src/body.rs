//! Request bodies: read up to a limit within a time, parsed as JSON with
//! errors that say which field. (The server cuts a body that pauses for the
//! body read timeout: `tidepool_serve`'s pause policy.)

use std::error::Error as StdError;
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tidepool_protocol::BodyError;
use tidepool_serve::BodyTimedOut;

use crate::error::{ApiError, Reason};

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
    async fn a_body_that_stops_coming_or_comes_too_slowly_is_408() {
        // The server's body timeout fails the body with `BodyTimedOut`.
        let stopped = futures_util::stream::iter([Err::<Bytes, _>(BodyTimedOut(Duration::from_millis(500)))]);
        let error = read_body(Body::from_stream(stopped), 1024, Duration::from_secs(100)).await.unwrap_err();
        assert_eq!((error.status, error.reason), (StatusCode::REQUEST_TIMEOUT, Reason::BodyTimeout));
        assert_eq!(error.message, "the request body did not come within 0.5 s");
        // The whole read is bounded too.
        let error = read_body(trickle(5, Duration::from_secs(9)), 1024, Duration::from_secs(30)).await.unwrap_err();
        assert_eq!(error.reason, Reason::BodyTimeout);
        assert_eq!(error.message, "the request body did not come within 30 s");
        let whole = read_body(trickle(3, Duration::from_secs(9)), 1024, Duration::from_secs(30)).await.unwrap();
        assert_eq!(whole.len(), 3);
        let large = read_body(Body::from(vec![0u8; 2048]), 1024, Duration::from_secs(10)).await.unwrap_err();
        assert_eq!((large.status, large.reason), (StatusCode::PAYLOAD_TOO_LARGE, Reason::BodyTooLarge));
        let broken = futures_util::stream::iter([Err::<Bytes, _>(std::io::Error::other("reset"))]);
        let broken = read_body(Body::from_stream(broken), 1024, Duration::from_secs(10)).await.unwrap_err();
        assert_eq!((broken.status, broken.reason), (StatusCode::BAD_REQUEST, Reason::BodyError));
    }
}
