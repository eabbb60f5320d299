//! What a connection is doing, as its header and idle timeouts see it, and
//! its place under the cap.
//!
//! A connection waits for a head from the head's first byte (from the
//! accept, for a new one) for at most the header timeout; between requests,
//! with nothing coming, for at most the idle timeout. While a request is
//! answered neither applies: the request counts as answered until hyper
//! drops its response body ([`AnsweredBody`]), having taken its last piece.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;

use crate::{Limits, OnOpenChange, OnRefusal, Refusal};

/// No head is coming.
const NO_HEAD: u64 = u64::MAX;

/// A connection's state for its timeouts. Its reads, its requests and
/// their answers all happen on the connection's task; the atomics are only
/// there to share it with the IO and the bodies.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    /// Requests whose answers are not done.
    in_flight: AtomicUsize,
    /// Milliseconds after `epoch` at which the last answer was done.
    quiet_since: AtomicU64,
    /// Milliseconds after `epoch` at which the next head began, or [`NO_HEAD`].
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
        // Below NO_HEAD even after half a billion years.
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(NO_HEAD - 1)
    }

    fn at(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// Bytes came: between requests, the next head has begun. (One relaxed
    /// load per read while answering: a body's bytes are no head.)
    pub fn bytes_read(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started.compare_exchange(NO_HEAD, self.now_ms(), Ordering::Relaxed, Ordering::Relaxed).is_ok()
        {
            self.changed.notify_waiters();
        }
    }

    /// A request's head came; it is being answered until the guard drops.
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
    pub fn deadline(&self, limits: &Limits) -> Option<(Instant, Refusal)> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        match self.head_started.load(Ordering::Relaxed) {
            NO_HEAD => Some((self.at(self.quiet_since.load(Ordering::Relaxed)) + limits.idle_timeout, Refusal::Idle)),
            started => Some((self.at(started) + limits.header_timeout, Refusal::HeaderTimeout)),
        }
    }

    /// Resolves when the connection has timed out, with why.
    pub async fn expired(&self, limits: &Limits) -> Refusal {
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

/// A response body that keeps its request [`Answering`] until hyper is done
/// with it: a download that streams for a minute is no idle connection.
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

/// One of the `max_connections` places; the caller's count of open
/// connections goes up while it is held.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    on_open_change: OnOpenChange,
}

impl Slot {
    pub fn new(permit: OwnedSemaphorePermit, on_open_change: OnOpenChange) -> Self {
        on_open_change(1);
        Self { _permit: permit, on_open_change }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        (self.on_open_change)(-1);
    }
}

/// A write that waits too long for the client to take bytes: armed when a
/// write finds the socket full, disarmed by any write that goes through,
/// and when it fires the connection's writes fail (once counted).
pub struct WriteStall {
    timeout: Duration,
    on_refusal: OnRefusal,
    armed: Option<Pin<Box<tokio::time::Sleep>>>,
    fired: bool,
}

impl WriteStall {
    pub fn new(timeout: Duration, on_refusal: OnRefusal) -> Self {
        Self { timeout, on_refusal, armed: None, fired: false }
    }

    /// Passes on a write's outcome, or the stall's error once it has waited
    /// past the timeout. The timer shares the write's waker, so a stalled
    /// write is polled again when the timer fires.
    fn watch<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if self.fired {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading")));
        }
        if polled.is_ready() {
            self.armed = None;
            return polled;
        }
        let timeout = self.timeout;
        let timer = self.armed.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if timer.as_mut().poll(cx).is_ready() {
            self.fired = true;
            (self.on_refusal)(Refusal::WriteStalled);
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading")));
        }
        Poll::Pending
    }
}

/// How long, and for how many bytes, a closed connection goes on reading
/// what its client still sends (see [`Watched`]'s drop).
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024 * 1024;

/// A connection's stream: its reads tell the [`Activity`], and it holds the
/// connection's [`Slot`] for as long as the socket lives, after an upgrade
/// too. Writes pass straight through.
///
/// When it is dropped it closes gently: a server that answered before the
/// request's body was all read (a refusal, an upload cut at its time limit)
/// would otherwise close a socket with unread bytes, and the kernel answers
/// those with a reset that can reach the client before the answer does, or
/// break the next request of a client that pooled the connection. So the
/// write side is shut (the answer, then FIN) and what still comes is read
/// and dropped, for at most [`LINGER`] and [`LINGER_BYTES`].
pub struct Watched<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    /// Only `None` once dropped.
    inner: Option<S>,
    activity: Arc<Activity>,
    _slot: Slot,
    stall: Option<WriteStall>,
}

impl<S> Watched<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    pub fn new(inner: S, activity: Arc<Activity>, slot: Slot) -> Self {
        Self { inner: Some(inner), activity, _slot: slot, stall: None }
    }

    /// Cuts the connection when a write waits on the client for too long.
    pub fn with_write_stall(mut self, stall: WriteStall) -> Self {
        self.stall = Some(stall);
        self
    }

    fn watch_write<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match &mut self.stall {
            Some(stall) => stall.watch(cx, polled),
            None => polled,
        }
    }

    fn stream(&mut self) -> io::Result<&mut S> {
        self.inner.as_mut().ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl<S> Drop for Watched<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn drop(&mut self) {
        if let (Some(stream), Ok(runtime)) = (self.inner.take(), tokio::runtime::Handle::try_current()) {
            // Bounded in time and bytes, and it owns nothing but the socket.
            runtime.spawn(linger(stream));
        }
    }
}

/// Shuts the write side and reads what the peer still sends until it
/// closes, [`LINGER`] passes or [`LINGER_BYTES`] came.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(LINGER, async {
        if stream.shutdown().await.is_err() {
            return;
        }
        let mut buffer = [0u8; 4096];
        let mut read = 0;
        while read < LINGER_BYTES {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

impl<S> AsyncRead for Watched<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = match self.stream() {
            Ok(stream) => Pin::new(stream).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        };
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl<S> AsyncWrite for Watched<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = match self.stream() {
            Ok(stream) => Pin::new(stream).poll_write(cx, data),
            Err(e) => Poll::Ready(Err(e)),
        };
        self.watch_write(cx, polled)
    }

    // Downloads go out as vectored writes of shared slices: keep them vectored.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = match self.stream() {
            Ok(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        };
        self.watch_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.as_ref().is_some_and(AsyncWrite::is_write_vectored)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = match self.stream() {
            Ok(stream) => Pin::new(stream).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        };
        self.watch_write(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.stream() {
            Ok(stream) => Pin::new(stream).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests;
