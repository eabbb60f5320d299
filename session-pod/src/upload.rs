//! `POST /upload`: counts the body and throws it away, sampling the count
//! so the client can take its rate after warm-up.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::Response;
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::body::broken_body;
use crate::connection::ClientAddr;
use crate::download::{StreamQuery, stream_duration};
use crate::error::{ApiError, Reason, json_response, parse_query};
use crate::limits::Opening;
use crate::state::{PodState, TrafficMeter};
use tidepool_protocol::pod::{MAX_STREAM_SECONDS, UPLOAD_SAMPLE_US, UploadReport};

/// After refusing an oversized body, the pod reads (and drops) at most this
/// much more of it, for this long, before it answers: a server that answers
/// and closes with a body unread makes the kernel reset the connection, and
/// the client may see the reset instead of the 413.
const DRAIN_BYTES: u64 = 64 * 1024 * 1024;
const DRAIN_TIME: Duration = Duration::from_secs(1);

pub async fn upload(
    State(state): State<Arc<PodState>>,
    Extension(client): Extension<ClientAddr>,
    uri: Uri,
    headers: HeaderMap,
    mut body: Body,
) -> Result<Response, ApiError> {
    let query: StreamQuery = parse_query(uri.query())?;
    let cap = stream_duration(query.seconds, MAX_STREAM_SECONDS)?;
    let max_bytes = state.max_upload_bytes();
    let too_large = |bytes: u64| {
        ApiError::new(
            Reason::UploadTooLarge,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("an upload may carry at most {max_bytes} bytes; this one has {bytes} or more"),
        )
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(declared) = declared.filter(|length| *length > max_bytes) {
        // A client waiting for `100 Continue` has sent nothing: answer at once.
        if !expects_continue(&headers) {
            drain(&mut body).await;
        }
        return Err(too_large(declared));
    }

    let permit = state.open_socket(client.0.ip(), Opening::Socket)?;
    let mut meter = TrafficMeter::new(permit, state.metrics.upload_bytes.clone());
    let ends_at = Instant::now() + cap;
    let mut counter = UploadCounter::default();
    loop {
        let frame = match tokio::time::timeout_at(ends_at, body.frame()).await {
            // The time cap: report what came.
            Err(_) | Ok(None) => break,
            // A body that stopped coming for the body timeout is a 408; one that broke, a 400.
            Ok(Some(Err(e))) => return Err(broken_body(&e, "the upload broke off")),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else { continue };
        counter.add(data.len() as u64, Instant::now());
        if counter.bytes > max_bytes {
            drain(&mut body).await;
            return Err(too_large(counter.bytes));
        }
        if let Err(refusal) = meter.add(data.len() as u64) {
            return Err(ApiError::from(refusal));
        }
    }
    Ok(json_response(StatusCode::OK, &counter.report()))
}

fn expects_continue(headers: &HeaderMap) -> bool {
    headers.get(header::EXPECT).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
}

/// Reads and drops what is left of `body`, within [`DRAIN_BYTES`] and [`DRAIN_TIME`].
async fn drain(body: &mut Body) {
    let mut drained = 0;
    let _ = tokio::time::timeout(DRAIN_TIME, async {
        while drained < DRAIN_BYTES {
            match body.frame().await {
                Some(Ok(frame)) => drained += frame.data_ref().map_or(0, |d| d.len() as u64),
                _ => return,
            }
        }
    })
    .await;
}

/// Counts an upload's bytes and samples the count every [`UPLOAD_SAMPLE_US`].
#[derive(Debug, Default)]
pub struct UploadCounter {
    pub bytes: u64,
    first_at: Option<Instant>,
    last_us: u64,
    next_sample_us: u64,
    samples: Vec<(u64, u64)>,
}

impl UploadCounter {
    /// `bytes` more arrived at `now`.
    pub fn add(&mut self, bytes: u64, now: Instant) {
        if bytes == 0 {
            return;
        }
        let first_at = *self.first_at.get_or_insert(now);
        self.bytes += bytes;
        self.last_us = u64::try_from((now - first_at).as_micros()).unwrap_or(u64::MAX);
        if self.last_us >= self.next_sample_us {
            self.samples.push((self.last_us, self.bytes));
            self.next_sample_us = (self.last_us / UPLOAD_SAMPLE_US + 1) * UPLOAD_SAMPLE_US;
        }
    }

    /// The report, ending with a sample at the last byte.
    pub fn report(mut self) -> UploadReport {
        if self.bytes > 0 && self.samples.last() != Some(&(self.last_us, self.bytes)) {
            self.samples.push((self.last_us, self.bytes));
        }
        UploadReport { bytes: self.bytes, elapsed_us: self.last_us, samples: self.samples }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_come_every_interval_and_at_the_end() {
        let t0 = Instant::now();
        let mut counter = UploadCounter::default();
        for ms in (0..=250).step_by(10) {
            counter.add(1_000, t0 + Duration::from_millis(ms));
        }
        counter.add(0, t0 + Duration::from_millis(300));
        let report = counter.report();
        assert_eq!(report.bytes, 26_000);
        assert_eq!(report.elapsed_us, 250_000);
        assert_eq!(report.samples, vec![(0, 1_000), (100_000, 11_000), (200_000, 21_000), (250_000, 26_000)]);
    }

    #[test]
    fn an_empty_upload_reports_nothing() {
        assert_eq!(UploadCounter::default().report(), UploadReport::default());
    }
}
