//! The virtual household: four simulated users share the line, each on its
//! own WebSocket, pinging while the pod sends its down traffic and the
//! client its paced up traffic.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use tidepool_crds::test_session::HouseholdUserResult;
use tidepool_protocol::grading::{BASELINE_PINGS, LatencyTracker};
use tidepool_protocol::pod::{ClientMessage, HOUSEHOLD_WS_PATH, HouseholdUser, ServerMessage};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use super::latency::text;
use super::load::random_bytes;
use super::plan::BASELINE_INTERVAL;
use super::{Clock, Observer, Phase};
use crate::error::{Error, Result};
use crate::measure::{self, Pacer};
use crate::pod::{PodClient, WebSocket};

/// How often the up traffic is paced.
const PACE_TICK: Duration = Duration::from_millis(20);
/// How long after the end the last pongs may take.
const GRACE: Duration = Duration::from_millis(500);

/// When each user does what. Every user follows the same schedule, so the
/// traffic starts at once for all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Schedule {
    /// The first baseline ping.
    pub begin: Instant,
    /// `Start`: the end of the baseline and the start of the traffic.
    pub start: Instant,
    /// The end of the traffic.
    pub end: Instant,
    /// The interval of the pings during the traffic.
    pub ping_every: Duration,
}

impl Schedule {
    pub(crate) fn new(begin: Instant, traffic: Duration, ping_every: Duration) -> Self {
        let start = begin + BASELINE_INTERVAL * BASELINE_PINGS as u32;
        Self { begin, start, end: start + traffic, ping_every }
    }

    /// When baseline ping `seq` goes.
    pub(crate) fn baseline_ping(&self, seq: usize) -> Instant {
        self.begin + BASELINE_INTERVAL * seq as u32
    }
}

/// What one user's socket brought back.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct UserOutcome {
    /// `(seq, sent µs, round trip µs)` of each answered ping.
    pub pongs: Vec<(u64, u64, u64)>,
    /// Down traffic received between `Start` and the end.
    pub down_bytes: u64,
}

impl UserOutcome {
    /// The user's result: latency from its pings (the first ten are its
    /// baseline), share from its down bytes over the traffic's length.
    pub(crate) fn result(
        mut self,
        user: HouseholdUser,
        begin_us: u64,
        traffic: Duration,
        line_mbps: f64,
    ) -> HouseholdUserResult {
        self.pongs.sort_unstable_by_key(|(seq, _, _)| *seq);
        let mut tracker = LatencyTracker::default();
        for (_, sent_us, rtt_us) in &self.pongs {
            tracker.record(sent_us.saturating_sub(begin_us) / 1000, measure::ms(*rtt_us));
        }
        let achieved_mbps = self.down_bytes as f64 * 8.0 / traffic.as_micros().max(1) as f64;
        HouseholdUserResult {
            user: user.as_str().to_string(),
            baseline_ms: tracker.baseline_ms(),
            mean_ms: tracker.mean_ms(),
            jitter_ms: tracker.jitter_ms(),
            share_percent: measure::share_percent(user, achieved_mbps, line_mbps),
            severity: tracker.severity(),
        }
    }
}

/// Runs the four users on a line of `line_mbps`; `phases` are the baseline's
/// and the traffic's.
pub(crate) async fn run(
    pod: &PodClient,
    clock: Clock,
    line_mbps: f64,
    [baseline, traffic]: [Phase; 2],
    ping_every: Duration,
    observer: &Arc<dyn Observer>,
) -> Result<Vec<HouseholdUserResult>> {
    let sockets = futures::future::try_join_all(
        HouseholdUser::ALL
            .map(|user| async move { pod.websocket(&HOUSEHOLD_WS_PATH.replace("{user}", user.as_str())).await }),
    )
    .await?;
    observer.phase(&baseline);
    let schedule = Schedule::new(Instant::now(), traffic.length, ping_every);
    let users = futures::future::try_join_all(
        HouseholdUser::ALL
            .into_iter()
            .zip(sockets)
            .map(|(user, socket)| run_user(user, socket, clock, schedule, line_mbps)),
    );
    let announce = async {
        tokio::time::sleep_until(schedule.start).await;
        observer.phase(&traffic);
    };
    let (outcomes, ()) = tokio::join!(users, announce);
    let begin_us = clock.us(schedule.begin);
    Ok(HouseholdUser::ALL
        .into_iter()
        .zip(outcomes?)
        .map(|(user, outcome)| outcome.result(user, begin_us, traffic.length, line_mbps))
        .collect())
}

async fn run_user(
    user: HouseholdUser,
    socket: WebSocket,
    clock: Clock,
    schedule: Schedule,
    line_mbps: f64,
) -> Result<UserOutcome> {
    let (sink, stream) = socket.split();
    let pings_sent = AtomicU64::new(0);
    let (written, read) = tokio::join!(
        write(user, sink, clock, schedule, line_mbps, &pings_sent),
        read(stream, clock, schedule, &pings_sent),
    );
    let mut sink = written?;
    let outcome = read?;
    tokio::spawn(async move { tokio::time::timeout(Duration::from_secs(1), sink.close()).await });
    if outcome.pongs.is_empty() {
        return Err(Error::test(format!("the household's {} user got no pong from the pod", user.as_str())));
    }
    Ok(outcome)
}

type Sink = SplitSink<WebSocket, Message>;

/// The user's side: the baseline pings, `Start`, then pings and paced up
/// traffic until the end.
async fn write(
    user: HouseholdUser,
    mut sink: Sink,
    clock: Clock,
    schedule: Schedule,
    line_mbps: f64,
    pings_sent: &AtomicU64,
) -> Result<Sink> {
    let mut seq = 0u64;
    let mut ping = async |sink: &mut Sink| -> Result<()> {
        let message = ClientMessage::Ping { seq, client_time_us: clock.now_us() };
        sink.send(text(&message)).await.map_err(|e| broken(user, &e))?;
        seq += 1;
        pings_sent.store(seq, Ordering::Release);
        Ok(())
    };
    for i in 0..BASELINE_PINGS {
        tokio::time::sleep_until(schedule.baseline_ping(i)).await;
        ping(&mut sink).await?;
    }
    tokio::time::sleep_until(schedule.start).await;
    sink.send(text(&ClientMessage::Start { line_mbps })).await.map_err(|e| broken(user, &e))?;
    let (_, up_mbps) = user.rates_mbps(line_mbps);
    let mut pacer = Pacer::new(up_mbps);
    let data = random_bytes();
    let mut offset = 0;
    let mut next_ping = schedule.start;
    let mut last = schedule.start;
    let mut ticks = tokio::time::interval_at(schedule.start, PACE_TICK);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let now = ticks.tick().await;
        if now >= schedule.end {
            break;
        }
        if now >= next_ping {
            ping(&mut sink).await?;
            next_ping += schedule.ping_every;
        }
        let elapsed_ms = u64::try_from((now - schedule.start).as_millis()).unwrap_or(u64::MAX);
        let due = pacer.advance(u64::try_from((now - last).as_micros()).unwrap_or(0), user.active_at(elapsed_ms));
        last = now;
        if due > 0 {
            let len = due.min(data.len());
            if offset + len > data.len() {
                offset = 0;
            }
            sink.send(Message::Binary(data.slice(offset..offset + len))).await.map_err(|e| broken(user, &e))?;
            offset += len;
        }
    }
    Ok(sink)
}

/// The pod's side: pongs, and the down traffic counted until the end. After
/// the end it waits, a little, for the pongs still due.
async fn read(
    mut stream: SplitStream<WebSocket>,
    clock: Clock,
    schedule: Schedule,
    pings_sent: &AtomicU64,
) -> Result<UserOutcome> {
    let mut outcome = UserOutcome::default();
    let end = tokio::time::sleep_until(schedule.end);
    tokio::pin!(end);
    let mut ended = false;
    loop {
        if ended && outcome.pongs.len() as u64 >= pings_sent.load(Ordering::Acquire) {
            break;
        }
        tokio::select! {
            _ = &mut end => {
                if ended {
                    break;
                }
                ended = true;
                end.as_mut().reset(schedule.end + GRACE);
            }
            message = stream.next() => match message {
                Some(Ok(Message::Binary(data))) if !ended => outcome.down_bytes += data.len() as u64,
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerMessage>(&text) {
                    Ok(ServerMessage::Pong { seq, client_time_us, .. }) => {
                        outcome.pongs.push((seq, client_time_us, clock.now_us().saturating_sub(client_time_us)));
                    }
                    Ok(ServerMessage::Stats { sent_bytes, received_bytes, elapsed_us }) => {
                        tracing::debug!(sent_bytes, received_bytes, elapsed_us, "household stats");
                    }
                    Ok(ServerMessage::Error { message }) => {
                        return Err(Error::Protocol(format!("the pod refused a household message: {message}")));
                    }
                    Ok(ServerMessage::Terminating { .. }) | Err(_) => {}
                },
                Some(Ok(Message::Close(_))) | None if ended => break,
                Some(Ok(Message::Close(_))) | None => return Err(Error::test("the pod closed a household WebSocket early")),
                Some(Ok(_)) => {}
                Some(Err(e)) if ended => {
                    tracing::debug!("household socket after the end: {e}");
                    break;
                }
                Some(Err(e)) => {
                    return Err(Error::test(format!("a household WebSocket broke: {}", crate::error::chain(&e))));
                }
            }
        }
    }
    Ok(outcome)
}

fn broken(user: HouseholdUser, error: &tokio_tungstenite::tungstenite::Error) -> Error {
    Error::test(format!("the household's {} WebSocket broke: {}", user.as_str(), crate::error::chain(error)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_crds::test_session::Severity;

    #[test]
    fn the_schedule_has_a_second_of_baseline_then_the_traffic() {
        let begin = Instant::now();
        let schedule = Schedule::new(begin, Duration::from_secs(10), Duration::from_millis(500));
        assert_eq!(schedule.start - begin, Duration::from_secs(1));
        assert_eq!(schedule.end - begin, Duration::from_secs(11));
        assert_eq!(schedule.baseline_ping(9) - begin, Duration::from_millis(900));
    }

    #[test]
    fn a_user_result_has_its_baseline_rise_and_share() {
        // Ten idle pings at 10 ms, then ten at 30 ms: a 20 ms rise, mild.
        let mut pongs: Vec<(u64, u64, u64)> = (0..10).map(|i| (i, 1_000_000 + i * 100_000, 10_000)).collect();
        pongs.extend((10..20).map(|i| (i, 2_000_000 + i * 500_000, 30_000)));
        pongs.reverse();
        // 10 s at 0.75 Mbit/s: half the gaming user's 1.5.
        let outcome = UserOutcome { pongs, down_bytes: 937_500 };
        let result = outcome.result(HouseholdUser::Gaming, 1_000_000, Duration::from_secs(10), 100.0);
        assert_eq!(result.user, "gaming");
        assert_eq!(result.baseline_ms, 10.0);
        assert_eq!(result.mean_ms, 20.0);
        assert_eq!(result.severity, Severity::Mild);
        assert_eq!(result.share_percent, 50.0);
    }
}
