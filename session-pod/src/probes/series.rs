//! A series of echo requests at a steady pace, and the round trips of the replies.

use std::io;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};

use super::outcome::{RttStats, ms};

/// Something that answers numbered requests: ICMP echo, a UDP echo.
pub(crate) trait Echo {
    /// Sends request `seq`.
    async fn send(&self, seq: u16) -> io::Result<()>;
    /// The next datagram: `Some(seq)` when it answers a request of ours.
    /// Must be cancel-safe.
    async fn recv(&self) -> io::Result<Option<u16>>;
}

/// What a series saw.
#[derive(Debug)]
pub(crate) struct Series {
    pub stats: RttStats,
    /// Why it stopped early, when it did.
    pub error: Option<io::Error>,
}

/// Sends `count` requests `interval` apart and waits for the replies until
/// `wait` after the last request, or until `deadline`.
pub(crate) async fn series(
    echo: &impl Echo,
    count: u16,
    interval: Duration,
    wait: Duration,
    deadline: Instant,
) -> Series {
    let count = usize::from(count);
    let mut sent_at: Vec<Instant> = Vec::with_capacity(count);
    let mut rtts: Vec<Option<f64>> = vec![None; count];
    let mut next_send = Instant::now();
    let mut error = None;
    while error.is_none() {
        let all_sent = sent_at.len() == count;
        if all_sent && rtts.iter().all(Option::is_some) {
            break;
        }
        let give_up = match sent_at.last() {
            Some(last) if all_sent => deadline.min(*last + wait),
            _ => deadline,
        };
        tokio::select! {
            () = sleep_until(next_send), if !all_sent => {
                let seq = sent_at.len() as u16;
                match echo.send(seq).await {
                    Ok(()) => sent_at.push(Instant::now()),
                    Err(failure) => error = Some(failure),
                }
                next_send += interval;
            }
            reply = echo.recv() => match reply {
                Ok(Some(seq)) => {
                    let seq = usize::from(seq);
                    if let (Some(sent), Some(rtt @ None)) = (sent_at.get(seq), rtts.get_mut(seq)) {
                        *rtt = Some(ms(sent.elapsed()));
                    }
                }
                Ok(None) => {}
                Err(failure) => error = Some(failure),
            },
            () = sleep_until(give_up) => break,
        }
    }
    let received: Vec<f64> = rtts.into_iter().flatten().collect();
    Series { stats: RttStats::new(sent_at.len() as u32, &received), error }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Answers every request but those in `lost`, each after `delay_ms[seq]`.
    struct Fake {
        lost: Vec<u16>,
        delay_ms: Vec<u64>,
        pending: Mutex<Vec<(Instant, u16)>>,
    }

    impl Echo for Fake {
        async fn send(&self, seq: u16) -> io::Result<()> {
            if !self.lost.contains(&seq) {
                let at = Instant::now() + Duration::from_millis(self.delay_ms[usize::from(seq)]);
                self.pending.lock().unwrap().push((at, seq));
            }
            Ok(())
        }

        async fn recv(&self) -> io::Result<Option<u16>> {
            loop {
                let next = self.pending.lock().unwrap().iter().min().copied();
                match next {
                    Some((at, seq)) => {
                        sleep_until(at).await;
                        self.pending.lock().unwrap().retain(|pending| pending.1 != seq);
                        return Ok(Some(seq));
                    }
                    None => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn counts_replies_and_losses() {
        let fake = Fake { lost: vec![2], delay_ms: vec![10, 30, 0, 20], pending: Mutex::default() };
        let start = Instant::now();
        let deadline = start + Duration::from_secs(5);
        let done = series(&fake, 4, Duration::from_millis(100), Duration::from_secs(1), deadline).await;
        assert!(done.error.is_none());
        assert_eq!((done.stats.sent, done.stats.received), (4, 3));
        assert_eq!((done.stats.min_ms, done.stats.max_ms), (10.0, 30.0));
        assert_eq!(done.stats.jitter_ms, 15.0);
        // The last request went out at 300 ms; the lost one is waited for 1 s more.
        assert_eq!(start.elapsed(), Duration::from_millis(1300));
    }

    #[tokio::test(start_paused = true)]
    async fn ends_as_soon_as_all_replied() {
        let fake = Fake { lost: vec![], delay_ms: vec![5, 5], pending: Mutex::default() };
        let start = Instant::now();
        let done =
            series(&fake, 2, Duration::from_millis(50), Duration::from_secs(1), start + Duration::from_secs(5)).await;
        assert_eq!(done.stats.received, 2);
        assert_eq!(start.elapsed(), Duration::from_millis(55));
    }

    struct Refused;

    impl Echo for Refused {
        async fn send(&self, _: u16) -> io::Result<()> {
            Ok(())
        }

        async fn recv(&self) -> io::Result<Option<u16>> {
            Err(io::ErrorKind::ConnectionRefused.into())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_an_error() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let done = series(&Refused, 4, Duration::from_millis(10), Duration::from_secs(1), deadline).await;
        assert_eq!(done.error.map(|error| error.kind()), Some(io::ErrorKind::ConnectionRefused));
    }
}
