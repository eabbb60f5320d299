//! `GET /download?seconds=N`: incompressible bytes for N seconds.
//!
//! The hot path: each frame is a slice of the random pool (a reference
//! count, no copy, no allocation), and hyper writes the slices with vectored
//! writes straight from the pool.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, Uri, header};
use axum::response::Response;
use bytes::Bytes;
use http_body::Frame;
use serde::Deserialize;

use crate::connection::ClientAddr;
use crate::error::{ApiError, Reason, parse_query};
use crate::limits::Opening;
use crate::random::Chunks;
use crate::state::{PodState, TrafficMeter};
use tidepool_protocol::pod::{DOWNLOAD_CHUNK_BYTES, MAX_STREAM_SECONDS};

/// How long a download runs when the client does not say.
pub const DEFAULT_DOWNLOAD_SECONDS: u64 = 10;

/// `?seconds=` of the streams (credentials may share the query).
#[derive(Deserialize)]
pub struct StreamQuery {
    pub seconds: Option<u64>,
}

/// A stream's length: `requested` or `default`, 1 to [`MAX_STREAM_SECONDS`].
pub fn stream_duration(requested: Option<u64>, default: u64) -> Result<Duration, ApiError> {
    match requested.unwrap_or(default) {
        seconds @ 1..=MAX_STREAM_SECONDS => Ok(Duration::from_secs(seconds)),
        seconds => Err(ApiError::bad_request(
            Reason::BadQuery,
            format!("seconds must be 1 to {MAX_STREAM_SECONDS}, not {seconds}"),
        )),
    }
}

pub async fn download(
    State(state): State<Arc<PodState>>,
    Extension(client): Extension<ClientAddr>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let query: StreamQuery = parse_query(uri.query())?;
    let duration = stream_duration(query.seconds, DEFAULT_DOWNLOAD_SECONDS)?;
    let permit = state.open_socket(client.0.ip(), Opening::Socket)?;
    let body = RandomBody {
        chunks: Chunks::new(state.random.clone(), DOWNLOAD_CHUNK_BYTES),
        ends_at: Instant::now() + duration,
        meter: TrafficMeter::new(permit, state.metrics.download_bytes.clone()),
        done: false,
    };
    let mut response = Response::new(Body::new(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// Random chunks until the time is up or the client's hourly bytes are spent.
struct RandomBody {
    chunks: Chunks,
    ends_at: Instant,
    meter: TrafficMeter,
    done: bool,
}

impl http_body::Body for RandomBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let body = self.get_mut();
        if body.done || Instant::now() >= body.ends_at {
            body.done = true;
            return Poll::Ready(None);
        }
        let chunk = body.chunks.next_chunk();
        if body.meter.add(chunk.len() as u64).is_err() {
            // This chunk still goes out; the next request gets the 429.
            body.done = true;
        }
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_default_and_stay_in_range() {
        assert_eq!(stream_duration(None, 10).unwrap(), Duration::from_secs(10));
        assert_eq!(stream_duration(Some(60), 10).unwrap(), Duration::from_secs(60));
        assert!(stream_duration(Some(0), 10).is_err());
        assert!(stream_duration(Some(61), 10).is_err());
    }
}
