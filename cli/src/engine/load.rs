//! Loading the line: parallel downloads counted by the client, parallel
//! uploads counted by the pod.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use tokio::task::JoinSet;
use tokio::time::Instant;

use tidepool_protocol::pod::MAX_UPLOAD_BYTES;

use super::Clock;
use super::plan::Settings;
use crate::error::{Error, Result, chain};
use crate::measure::{self, Series};
use crate::pod::PodClient;

/// How long after its phase an upload's report may take: the bytes still
/// queued on the way to the pod arrive first.
const REPORT_GRACE: Duration = Duration::from_secs(5);
/// A new upload request is not worth starting with less than this left.
const MIN_UPLOAD: Duration = Duration::from_millis(100);
/// The size of the random buffer upload bodies are sliced from.
const RANDOM_BYTES: usize = 4 * 1024 * 1024;

/// Incompressible bytes, made once: upload bodies and household frames
/// are slices of them, so sending allocates and copies nothing.
pub(crate) fn random_bytes() -> Bytes {
    static RANDOM: OnceLock<Bytes> = OnceLock::new();
    RANDOM
        .get_or_init(|| {
            // SplitMix64: fast, and its output is as incompressible as any.
            let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            let mut state = seed as u64 ^ 0x9e37_79b9_7f4a_7c15;
            let mut data = Vec::with_capacity(RANDOM_BYTES);
            while data.len() < RANDOM_BYTES {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                data.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
            }
            Bytes::from(data)
        })
        .clone()
}

/// Download streams until a deadline, adding what they receive to a counter.
pub(crate) struct Downloads {
    pub received: Arc<AtomicU64>,
    tasks: JoinSet<Result<()>>,
}

impl Downloads {
    pub(crate) fn start(pod: &PodClient, streams: usize, until: Instant) -> Self {
        let received = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        for _ in 0..streams {
            tasks.spawn(download(pod.clone(), until, received.clone()));
        }
        Self { received, tasks }
    }

    /// Waits for the streams, which end at the deadline.
    pub(crate) async fn finish(mut self) -> Result<()> {
        while let Some(done) = self.tasks.join_next().await {
            done.map_err(|e| Error::test(format!("a download stream failed: {e}")))??;
        }
        Ok(())
    }
}

async fn download(pod: PodClient, until: Instant, received: Arc<AtomicU64>) -> Result<()> {
    let deadline = tokio::time::sleep_until(until);
    tokio::pin!(deadline);
    while Instant::now() < until {
        let seconds = Settings::stream_seconds(until - Instant::now());
        let mut response = tokio::select! {
            _ = &mut deadline => return Ok(()),
            response = pod.download(seconds) => response?,
        };
        loop {
            // Dropping the response at the deadline closes its connection.
            tokio::select! {
                biased;
                _ = &mut deadline => return Ok(()),
                chunk = response.chunk() => match chunk {
                    Ok(Some(chunk)) => {
                        received.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    }
                    // The pod ended it early: start another.
                    Ok(None) => break,
                    Err(e) => return Err(Error::test(format!("a download from the pod broke: {}", chain(&e)))),
                },
            }
        }
    }
    Ok(())
}

/// Upload streams until a deadline; each brings back the pod's reports.
pub(crate) struct Uploads {
    /// What the client has handed to its sockets: for the live view only,
    /// since the pod's count is the measurement.
    pub sent: Arc<AtomicU64>,
    tasks: JoinSet<Result<Vec<Series>>>,
}

impl Uploads {
    pub(crate) fn start(pod: &PodClient, clock: Clock, streams: usize, until: Instant) -> Self {
        let sent = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        for _ in 0..streams {
            tasks.spawn(upload(pod.clone(), clock, until, sent.clone()));
        }
        Self { sent, tasks }
    }

    /// The pod's byte counts of every upload, on the run's clock.
    pub(crate) async fn finish(mut self) -> Result<Vec<Series>> {
        let mut series = Vec::new();
        while let Some(done) = self.tasks.join_next().await {
            series.extend(done.map_err(|e| Error::test(format!("an upload stream failed: {e}")))??);
        }
        Ok(series)
    }
}

async fn upload(pod: PodClient, clock: Clock, until: Instant, sent: Arc<AtomicU64>) -> Result<Vec<Series>> {
    let mut series = Vec::new();
    // A fast line fills a request before the deadline: then another follows.
    while Instant::now() + MIN_UPLOAD < until {
        let first_byte = Arc::new(OnceLock::new());
        let body = UploadBody {
            data: random_bytes(),
            offset: 0,
            until,
            limit: MAX_UPLOAD_BYTES,
            started: None,
            sent: 0,
            first_byte: first_byte.clone(),
            counter: sent.clone(),
        };
        let seconds = Settings::stream_seconds(until - Instant::now());
        let report = tokio::time::timeout_at(until + REPORT_GRACE, pod.upload(seconds, reqwest::Body::wrap(body)))
            .await
            .map_err(|_| {
                Error::test(format!("the pod's upload report did not come within {REPORT_GRACE:?} of the phase's end"))
            })??;
        let Some(first) = first_byte.get() else { break };
        series.push(measure::report_series(clock.us(*first), &report));
    }
    Ok(series)
}

/// An upload body: slices of the random buffer until the deadline or the
/// most one request may carry, sized to the rate the socket takes them at.
struct UploadBody {
    data: Bytes,
    offset: usize,
    until: Instant,
    limit: u64,
    started: Option<Instant>,
    sent: u64,
    first_byte: Arc<OnceLock<Instant>>,
    counter: Arc<AtomicU64>,
}

impl http_body::Body for UploadBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let now = Instant::now();
        if now >= this.until || this.sent >= this.limit {
            return Poll::Ready(None);
        }
        let started = *this.started.get_or_insert_with(|| {
            let _ = this.first_byte.set(now);
            now
        });
        let elapsed = (now - started).as_secs_f64();
        let rate = if elapsed > 0.01 { this.sent as f64 / elapsed } else { 0.0 };
        let left = usize::try_from(this.limit - this.sent).unwrap_or(usize::MAX);
        let len = measure::upload_chunk_bytes(rate).min(this.data.len()).min(left);
        if this.offset + len > this.data.len() {
            this.offset = 0;
        }
        let chunk = this.data.slice(this.offset..this.offset + len);
        this.offset += len;
        this.sent += len as u64;
        this.counter.fetch_add(len as u64, Ordering::Relaxed);
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_bytes_are_made_once_and_do_not_repeat_soon() {
        let a = random_bytes();
        assert_eq!(a.len(), RANDOM_BYTES);
        assert_eq!(a.as_ptr(), random_bytes().as_ptr());
        assert_ne!(a[..4096], a[4096..8192]);
        // About as many ones as zeros.
        let ones: u32 = a[..65536].iter().map(|b| b.count_ones()).sum();
        assert!((250_000..275_000).contains(&ones), "{ones}");
    }
}
