use std::sync::Mutex;
use std::sync::atomic::AtomicI64;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use super::*;

fn limits() -> Limits {
    Limits { header_timeout: Duration::from_secs(2), idle_timeout: Duration::from_secs(5), ..Limits::default() }
}

/// Waits for `activity` to expire on a task of its own: why, and after how long.
fn watch(activity: &Arc<Activity>) -> tokio::task::JoinHandle<(Refusal, Duration)> {
    let activity = activity.clone();
    tokio::spawn(async move {
        let start = Instant::now();
        (activity.expired(&limits()).await, start.elapsed())
    })
}

#[tokio::test(start_paused = true)]
async fn a_new_connection_has_the_header_timeout_from_the_accept() {
    let activity = Activity::new();
    assert_eq!(watch(&activity).await.unwrap(), (Refusal::HeaderTimeout, Duration::from_secs(2)));
    // Bytes of the head do not move its start.
    let activity = Activity::new();
    let watcher = watch(&activity);
    tokio::time::sleep(Duration::from_secs(1)).await;
    activity.bytes_read();
    assert_eq!(watcher.await.unwrap(), (Refusal::HeaderTimeout, Duration::from_secs(2)));
}

#[tokio::test(start_paused = true)]
async fn no_timeout_while_answering_then_idle_from_the_answer() {
    let activity = Activity::new();
    let answering = activity.request_started();
    assert_eq!(activity.deadline(&limits()), None);
    let watcher = watch(&activity);
    // An answer that streams for a minute is not cut, nor are the bytes of
    // its request's body a head.
    tokio::time::sleep(Duration::from_secs(60)).await;
    activity.bytes_read();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert!(!watcher.is_finished());
    drop(answering);
    assert_eq!(watcher.await.unwrap(), (Refusal::Idle, Duration::from_secs(125)));
}

#[tokio::test(start_paused = true)]
async fn a_head_that_begins_while_idle_has_the_header_timeout_from_its_first_byte() {
    let activity = Activity::new();
    drop(activity.request_started());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let watcher = watch(&activity);
    tokio::time::sleep(Duration::from_millis(500)).await;
    activity.bytes_read();
    assert_eq!(watcher.await.unwrap(), (Refusal::HeaderTimeout, Duration::from_millis(2_500)));
}

#[tokio::test(start_paused = true)]
async fn a_head_in_time_starts_a_request_and_the_next_wait_is_idle() {
    let activity = Activity::new();
    let watcher = watch(&activity);
    tokio::time::sleep(Duration::from_secs(1)).await;
    activity.bytes_read();
    let answering = activity.request_started();
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(answering);
    // Idle from the answer, at 4 s: closed at 9 s.
    assert_eq!(watcher.await.unwrap(), (Refusal::Idle, Duration::from_secs(9)));
}

#[tokio::test(start_paused = true)]
async fn an_answer_is_done_when_its_body_is_dropped() {
    let activity = Activity::new();
    let body = AnsweredBody::new(String::from("ok"), activity.request_started());
    assert_eq!(activity.deadline(&limits()), None);
    assert_eq!(http_body::Body::size_hint(&body).exact(), Some(2));
    drop(body);
    let (at, why) = activity.deadline(&limits()).unwrap();
    assert_eq!((at - Instant::now(), why), (Duration::from_secs(5), Refusal::Idle));
}

/// The count an `OnOpenChange` keeps.
fn counted() -> (Arc<AtomicI64>, OnOpenChange) {
    let open = Arc::new(AtomicI64::new(0));
    let counter = open.clone();
    (
        open,
        Arc::new(move |change| {
            counter.fetch_add(change, Ordering::Relaxed);
        }),
    )
}

#[tokio::test]
async fn a_slot_holds_its_place_and_counts_until_dropped() {
    let places = Arc::new(Semaphore::new(1));
    let (open, on_change) = counted();
    let slot = Slot::new(places.clone().try_acquire_owned().unwrap(), on_change);
    assert_eq!(open.load(Ordering::Relaxed), 1);
    assert!(places.clone().try_acquire_owned().is_err());
    drop(slot);
    assert_eq!(open.load(Ordering::Relaxed), 0);
    assert!(places.try_acquire_owned().is_ok());
}

/// An IO that records how it was written to, and has bytes to read.
struct Recorder {
    to_read: &'static [u8],
    writes: Arc<Mutex<Vec<&'static str>>>,
}

impl AsyncRead for Recorder {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let n = self.to_read.len().min(buf.remaining());
        buf.put_slice(&self.to_read[..n]);
        self.to_read = &self.to_read[n..];
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Recorder {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        self.writes.lock().unwrap().push("write");
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.writes.lock().unwrap().push("vectored");
        Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test(start_paused = true)]
async fn the_stream_keeps_writes_vectored_and_its_reads_start_a_head() {
    let writes = Arc::new(Mutex::new(Vec::new()));
    let (open, on_change) = counted();
    let activity = Activity::new();
    drop(activity.request_started());
    let places = Arc::new(Semaphore::new(1));
    let slot = Slot::new(places.try_acquire_owned().unwrap(), on_change);
    let mut stream = Watched::new(Recorder { to_read: b"GET", writes: writes.clone() }, activity.clone(), slot);
    assert!(stream.is_write_vectored());
    let slices = [io::IoSlice::new(b"a"), io::IoSlice::new(b"bc")];
    assert_eq!(stream.write_vectored(&slices).await.unwrap(), 3);
    stream.write_all(b"d").await.unwrap();
    assert_eq!(writes.lock().unwrap().as_slice(), ["vectored", "write"]);
    // Writing is no sign of a head; reading is.
    assert_eq!(activity.deadline(&limits()).unwrap().1, Refusal::Idle);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut head = [0u8; 8];
    assert_eq!(stream.read(&mut head).await.unwrap(), 3);
    let (at, why) = activity.deadline(&limits()).unwrap();
    assert_eq!((at - Instant::now(), why), (Duration::from_secs(2), Refusal::HeaderTimeout));
    // An empty read (end of stream) is none.
    let activity = Activity::new();
    drop(activity.request_started());
    let slot = Slot::new(Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(), counted().1);
    let mut ended = Watched::new(Recorder { to_read: b"", writes }, activity.clone(), slot);
    assert_eq!(ended.read(&mut head).await.unwrap(), 0);
    assert_eq!(activity.deadline(&limits()).unwrap().1, Refusal::Idle);
    drop(stream);
    assert_eq!(open.load(Ordering::Relaxed), 0);
}
