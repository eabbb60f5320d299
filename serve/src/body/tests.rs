use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Body;
use http_body_util::BodyExt;

use super::*;

/// A body that sends `frames` one-byte frames, `gap` apart.
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

/// A refusal counter and the callback that feeds it.
fn refusals() -> (Arc<AtomicUsize>, OnRefusal) {
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    let on_refusal: OnRefusal = Arc::new(move |refusal| {
        assert_eq!(refusal, Refusal::SlowBody);
        counter.fetch_add(1, Ordering::Relaxed);
    });
    (count, on_refusal)
}

/// Reads the whole body: its length, or the timeout it broke.
async fn read(body: TimedBody<Body>) -> Result<usize, Duration> {
    match Body::new(body).collect().await {
        Ok(collected) => Ok(collected.to_bytes().len()),
        Err(e) => {
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(error) = cause {
                if let Some(timed_out) = error.downcast_ref::<BodyTimedOut>() {
                    return Err(timed_out.0);
                }
                cause = error.source();
            }
            panic!("not a timeout: {e}")
        }
    }
}

const TEN: Duration = Duration::from_secs(10);

#[tokio::test(start_paused = true)]
async fn a_pausing_body_may_take_long_but_not_stop() {
    let (count, on_refusal) = refusals();
    // Each piece within 10 s of the last, 45 s in all.
    let steady = TimedBody::new(trickle(5, Duration::from_secs(9)), BodyTimeout::Pause(TEN), on_refusal.clone());
    assert_eq!(read(steady).await, Ok(5));
    let start = Instant::now();
    let stalled = TimedBody::new(trickle(2, Duration::from_secs(11)), BodyTimeout::Pause(TEN), on_refusal);
    assert_eq!(read(stalled).await, Err(TEN));
    assert_eq!(start.elapsed(), TEN);
    assert_eq!(count.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn a_pause_is_counted_from_the_first_read_not_the_head() {
    let (count, on_refusal) = refusals();
    let body = TimedBody::new(trickle(1, Duration::from_secs(9)), BodyTimeout::Pause(TEN), on_refusal);
    // The handler looks at the request for longer than the timeout first.
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(read(body).await, Ok(1));
    assert_eq!(count.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn a_whole_body_must_come_within_the_timeout_of_its_head() {
    let (count, on_refusal) = refusals();
    let quick = TimedBody::new(trickle(3, Duration::from_secs(3)), BodyTimeout::Whole(TEN), on_refusal.clone());
    assert_eq!(read(quick).await, Ok(3));
    // A piece every 3 s never pauses long, but the whole takes 15 s.
    let start = Instant::now();
    let trickling = TimedBody::new(trickle(5, Duration::from_secs(3)), BodyTimeout::Whole(TEN), on_refusal.clone());
    assert_eq!(read(trickling).await, Err(TEN));
    assert_eq!(start.elapsed(), TEN);
    // From the head, whenever the handler begins to read.
    let late = TimedBody::new(trickle(1, Duration::from_secs(3)), BodyTimeout::Whole(TEN), on_refusal);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let start = Instant::now();
    assert_eq!(read(late).await, Err(TEN));
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    assert_eq!(count.load(Ordering::Relaxed), 2);
}

#[tokio::test(start_paused = true)]
async fn a_timed_out_body_ends_and_is_reported_once() {
    let (count, on_refusal) = refusals();
    let mut body = TimedBody::new(trickle(2, Duration::from_secs(11)), BodyTimeout::Whole(TEN), on_refusal);
    assert!(body.frame().await.unwrap().is_err());
    assert!(http_body::Body::is_end_stream(&body));
    assert!(body.frame().await.is_none());
    assert_eq!(count.load(Ordering::Relaxed), 1);
}

#[tokio::test(start_paused = true)]
async fn errors_pass_through_and_the_size_is_the_inner_ones() {
    let (count, on_refusal) = refusals();
    let sized = TimedBody::new(Body::from("abc"), BodyTimeout::Pause(TEN), on_refusal.clone());
    assert_eq!(http_body::Body::size_hint(&sized).exact(), Some(3));
    assert!(!http_body::Body::is_end_stream(&sized));
    let broken = futures_util::stream::iter([Err::<Bytes, _>(std::io::Error::other("reset"))]);
    let mut broken = TimedBody::new(Body::from_stream(broken), BodyTimeout::Pause(TEN), on_refusal);
    let error = broken.frame().await.unwrap().unwrap_err();
    assert!(error.to_string().contains("reset"), "{error}");
    assert_eq!(count.load(Ordering::Relaxed), 0);
    assert_eq!(BodyTimedOut(Duration::from_millis(500)).to_string(), "the request body did not come within 0.5 s");
}
