//! What the HTTP server allows each connection, whatever its client does: a
//! cap on open connections, and the header and idle timeouts. (The body
//! timeout is [`crate::body::TimedBody`].)
//!
//! A connection waits for a request head from its first byte (from the
//! accept, for a new connection) for at most the header timeout; between
//! requests, with nothing arriving, it may sit idle for at most the idle
//! timeout. While a request is being answered (a download streaming, a
//! probe run) neither applies. hyper's own header timer is off: it starts
//! as soon as a connection waits, which would make it an idle timeout too.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;

/// The server's limits on connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once (WebSockets included); one beyond is closed at once.
    pub max_connections: usize,
    /// A request head must come in full within this of its first byte (of
    /// the accept, on a new connection).
    pub header_read_timeout: Duration,
    /// A request body may pause at most this long between two pieces, and a
    /// JSON body must come in full within it.
    pub body_read_timeout: Duration,
    /// A kept-alive connection with no request and no byte coming is closed after this.
    pub idle_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// Why the server closed a connection on its own: the `reason` label of
/// `tidepool_session_connections_closed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Closed {
    HeaderTimeout,
    IdleTimeout,
}

impl Closed {
    pub fn label(self) -> &'static str {
        match self {
            Self::HeaderTimeout => "header_timeout",
            Self::IdleTimeout => "idle_timeout",
        }
    }
}

/// No head is coming.
const NO_HEAD: u64 = u64::MAX;

/// What a connection is doing, as its timeouts see it. Its reads, its
/// requests and their answers all happen on the connection's task.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    /// Requests whose answers are not done.
    in_flight: AtomicUsize,
    /// Milliseconds after `epoch` at which the last answer was done.
    quiet_since: AtomicU64,
    /// Milliseconds after `epoch` at which the next head began to come, or [`NO_HEAD`].
    head_started: AtomicU64,
    changed: Notify,
}

impl Activity {
    /// A new connection: its first head is awaited from now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            quiet_since: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            changed: Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// Bytes came: between requests, the next head has begun.
    pub fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started.compare_exchange(NO_HEAD, self.now_ms(), Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.changed.notify_waiters();
        }
    }

    /// A request's head came; it is answered until the guard drops.
    pub fn request_started(self: &Arc<Self>) -> Answering {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(NO_HEAD, Ordering::Relaxed);
        self.changed.notify_waiters();
        Answering(self.clone())
    }

    fn answer_done(&self) {
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.quiet_since.store(self.now_ms(), Ordering::Relaxed);
            self.changed.notify_waiters();
        }
    }

    /// When the connection times out if nothing changes, and why; `None`
    /// while a request is being answered.
    pub fn deadline(&self, limits: &HttpLimits) -> Option<(Instant, Closed)> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        match self.head_started.load(Ordering::Relaxed) {
            NO_HEAD => {
                Some((self.at(self.quiet_since.load(Ordering::Relaxed)) + limits.idle_timeout, Closed::IdleTimeout))
            }
            started => Some((self.at(started) + limits.header_read_timeout, Closed::HeaderTimeout)),
        }
    }

    /// Resolves when the connection has timed out, and why.
    pub async fn expired(&self, limits: &HttpLimits) -> Closed {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read, so no change is missed.
            changed.as_mut().enable();
            match self.deadline(limits) {
                None => changed.await,
                Some((at, why)) if at <= Instant::now() => return why,
                Some((at, _)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = changed => {}
                    }
                }
            }
        }
    }
}

/// A request being answered; dropped when its answer is done (or abandoned).
#[derive(Debug)]
pub struct Answering(Arc<Activity>);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.answer_done();
    }
}

/// A response body that keeps its request [`Answering`] until hyper is done with it.
pub struct AnsweredBody<B> {
    inner: B,
    _answering: Answering,
}

impl<B> AnsweredBody<B> {
    pub fn new(inner: B, answering: Answering) -> Self {
        Self { inner, _answering: answering }
    }
}

impl<B: http_body::Body<Data = Bytes> + Unpin> http_body::Body for AnsweredBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One of the `max_connections` places, held as long as the connection's
/// socket lives (a WebSocket's too); the gauge counts them.
#[derive(Debug)]
pub struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    open: IntGauge,
}

impl ConnectionSlot {
    pub fn new(permit: OwnedSemaphorePermit, open: IntGauge) -> Self {
        open.inc();
        Self { _permit: permit, open }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// A connection's stream: its reads tell the [`Activity`], and it holds the
/// connection's slot for as long as it lives.
#[derive(Debug)]
pub struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
    _slot: ConnectionSlot,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>, slot: ConnectionSlot) -> Self {
        Self { inner, activity, _slot: slot }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    // Downloads go out as vectored writes of pool slices: keep them vectored.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HttpLimits {
        HttpLimits {
            header_read_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(5),
            ..HttpLimits::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_connection_has_the_header_timeout() {
        let start = Instant::now();
        let activity = Activity::new();
        assert_eq!(activity.expired(&limits()).await, Closed::HeaderTimeout);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn no_timeout_while_answering_then_idle_then_a_head() {
        let limits = limits();
        let activity = Activity::new();
        let answering = activity.request_started();
        assert_eq!(activity.deadline(&limits), None);
        let watcher = {
            let activity = activity.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                (activity.expired(&limits).await, start.elapsed())
            })
        };
        // An answer that streams for a minute is not cut.
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!watcher.is_finished());
        drop(answering);
        let (why, after) = watcher.await.unwrap();
        assert_eq!((why, after), (Closed::IdleTimeout, Duration::from_secs(65)));

        // A head that begins while idle has the header timeout from its first byte.
        let activity = Activity::new();
        drop(activity.request_started());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let start = Instant::now();
        let watcher = {
            let activity = activity.clone();
            tokio::spawn(async move { activity.expired(&limits).await })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        activity.bytes_read();
        assert_eq!(watcher.await.unwrap(), Closed::HeaderTimeout);
        assert_eq!(start.elapsed(), Duration::from_millis(2_500));
    }
}
