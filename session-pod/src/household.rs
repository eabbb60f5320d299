//! `GET /ws/household/{user}`: one simulated member of the household.
//!
//! Until the client sends `start`, the socket carries pings only. From then
//! on the pod sends binary frames paced at the user's down rate while the
//! user is active, counts the client's binary frames (its up traffic) and
//! reports both every second. Pongs jump the queue: the writer sends them
//! before the next data frame, and the socket keeps little unsent data in
//! the kernel, so a pong never waits behind more than one frame and that.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Extension;
use axum::extract::rejection::PathRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{Path, State};
use axum::response::Response;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::clock::expiry;
use crate::connection::{ClientAddr, ConnectionSocket};
use crate::error::ApiError;
use crate::error::Reason;
use crate::limits::{Opening, Refusal};
use crate::random::Chunks;
use crate::session::BoundSession;
use crate::sockets::{self, CLOSE_GOING_AWAY, CLOSE_POLICY, PingAnswerer, error_message, refuse};
use crate::state::{PodState, SocketPermit, until_shutdown};
use tidepool_protocol::pod::{ClientMessage, HouseholdUser, ServerMessage};

/// About this much of the user's traffic goes in one frame...
const FRAME_TIME: Duration = Duration::from_millis(20);
/// ...within these bounds.
const MIN_FRAME_BYTES: usize = 512;
const MAX_FRAME_BYTES: usize = 64 * 1024;
/// A user that fell behind (a slow socket) catches up by at most this much
/// time's worth, or four frames, whichever is more: no bursts after a stall.
const MAX_CATCH_UP: Duration = Duration::from_millis(20);
/// Unsent bytes the kernel may hold for a household socket (TCP_NOTSENT_LOWAT).
const UNSENT_BYTES: u32 = 32 * 1024;
/// Messages from the reader to the writer: pongs and commands, never data.
const CONTROL_QUEUE: usize = 16;
const STATS_EVERY: Duration = Duration::from_secs(1);

pub async fn household_socket(
    State(state): State<Arc<PodState>>,
    user: Result<Path<String>, PathRejection>,
    Extension(session): Extension<Arc<BoundSession>>,
    Extension(client): Extension<ClientAddr>,
    connection: Option<Extension<ConnectionSocket>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let known = || HouseholdUser::ALL.iter().map(|u| u.as_str()).collect::<Vec<_>>().join(", ");
    let Path(user) = user.map_err(|_| {
        ApiError::not_found(Reason::NoSuchUser, format!("no such household user; the users are {}", known()))
    })?;
    let user = HouseholdUser::parse(&user).ok_or_else(|| {
        ApiError::not_found(Reason::NoSuchUser, format!("no household user {user:?}; the users are {}", known()))
    })?;
    let upgrade = sockets::upgrade(upgrade)?;
    // One household run is one test, counted on its bulk user.
    let opening = if user == HouseholdUser::Bulk { Opening::Test } else { Opening::Socket };
    let permit = state.open_socket(client.0.ip(), opening)?;
    if let Some(Extension(connection)) = connection {
        connection.keep_unsent_below(UNSENT_BYTES);
    }
    Ok(upgrade.on_upgrade(move |socket| serve(socket, user, session, permit)))
}

/// What the reader hands the writer.
enum Control {
    Send(ServerMessage),
    Start { line_mbps: f64 },
    Terminate,
}

/// Bytes moved since `start`, shared by the reader and the writer.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    received: AtomicU64,
}

async fn serve(socket: WebSocket, user: HouseholdUser, session: Arc<BoundSession>, permit: SocketPermit) {
    let (mut sink, mut stream) = socket.split();
    let (control, mut controls) = mpsc::channel(CONTROL_QUEUE);
    let tally = Tally::default();
    let mut charged = Charged::default();
    let broken = tokio::select! {
        broken = read(&mut stream, control, &tally, &session, &permit) => broken,
        () = write(&mut sink, &mut controls, user, &tally, &mut charged, &session, &permit) => None,
    };
    if let Some((code, reason)) = broken {
        sockets::close(&mut sink, code, reason).await;
    }
    // Over the limit or not, the bytes flowed: the next socket is refused.
    let _ = charged.charge(user, &tally, &permit);
}

async fn read(
    stream: &mut SplitStream<WebSocket>,
    control: mpsc::Sender<Control>,
    tally: &Tally,
    session: &BoundSession,
    permit: &SocketPermit,
) -> Option<(u16, &'static str)> {
    let state = permit.state();
    let mut pings = PingAnswerer::new();
    let mut started = false;
    loop {
        let message = match stream.next().await {
            None => return None,
            Some(Ok(message)) => message,
            // A frame that breaks the rules: the socket closes with its code.
            Some(Err(error)) => return sockets::read_failure(state, error),
        };
        let command = match message {
            Message::Binary(data) => {
                if started {
                    tally.received.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                continue;
            }
            Message::Text(text) => match sockets::read_client_message(&text) {
                Ok(ClientMessage::Ping { seq, client_time_us }) => {
                    Control::Send(pings.answer(state, session, seq, client_time_us))
                }
                Ok(ClientMessage::Start { .. }) if started => {
                    Control::Send(refuse(state, Reason::WsBadStart, "traffic already started"))
                }
                Ok(ClientMessage::Start { line_mbps }) if !(line_mbps.is_finite() && line_mbps > 0.0) => {
                    let message = format!("lineMbps must be a positive number, not {line_mbps}");
                    Control::Send(refuse(state, Reason::WsBadStart, message))
                }
                Ok(ClientMessage::Start { line_mbps }) => {
                    started = true;
                    Control::Start { line_mbps }
                }
                Ok(ClientMessage::Terminate) => Control::Terminate,
                Err(error) => Control::Send(refuse(state, Reason::WsBadMessage, error)),
            },
            Message::Close(_) => return None,
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        // Waiting here when the writer is behind stops reading: backpressure.
        if control.send(command).await.is_err() {
            return None;
        }
    }
}

/// The traffic once started.
struct Traffic {
    pacer: Pacer,
    chunks: Chunks,
    started: Instant,
    next_stats: Instant,
}

async fn write(
    sink: &mut SplitSink<WebSocket, Message>,
    controls: &mut mpsc::Receiver<Control>,
    user: HouseholdUser,
    tally: &Tally,
    charged: &mut Charged,
    session: &BoundSession,
    permit: &SocketPermit,
) {
    let state = permit.state();
    let mut shutdown = state.shutdown_signal();
    let expires = expiry(session);
    let mut traffic: Option<Traffic> = None;
    loop {
        let now = Instant::now();
        let (data_due, stats_due) = match &traffic {
            Some(t) => (t.started + t.pacer.next_due(now - t.started), t.next_stats),
            // Never: these branches are disabled until traffic starts.
            None => (now, now),
        };
        let sent = tokio::select! {
            biased;
            command = controls.recv() => match command {
                None => return,
                Some(Control::Send(message)) => sockets::send(sink, &message).await,
                Some(Control::Start { line_mbps }) => {
                    let started = Instant::now();
                    let pacer = Pacer::new(user, line_mbps);
                    let chunks = Chunks::new(state.random.clone(), pacer.frame_bytes());
                    traffic = Some(Traffic { pacer, chunks, started, next_stats: started + STATS_EVERY });
                    Ok(())
                }
                Some(Control::Terminate) => return sockets::terminate(sink, state).await,
            },
            () = until_shutdown(&mut shutdown) => {
                return sockets::close(sink, CLOSE_GOING_AWAY, "the pod is shutting down").await;
            }
            () = tokio::time::sleep_until(expires) => {
                return sockets::close(sink, CLOSE_POLICY, "the session expired").await;
            }
            () = tokio::time::sleep_until(stats_due), if traffic.is_some() => {
                let Some(t) = traffic.as_mut() else { continue };
                t.next_stats += STATS_EVERY;
                let stats = ServerMessage::Stats {
                    sent_bytes: tally.sent.load(Ordering::Relaxed),
                    received_bytes: tally.received.load(Ordering::Relaxed),
                    elapsed_us: u64::try_from(t.started.elapsed().as_micros()).unwrap_or(u64::MAX),
                };
                if let Err(refusal) = charged.charge(user, tally, permit) {
                    state.count_refusal(Reason::BytesPerHour);
                    let _ = sockets::send(sink, &error_message(refusal.to_string())).await;
                    return sockets::close(sink, CLOSE_POLICY, "bytes_per_hour limit").await;
                }
                sockets::send(sink, &stats).await
            }
            () = tokio::time::sleep_until(data_due), if traffic.is_some() => {
                let Some(t) = traffic.as_mut() else { continue };
                match t.pacer.take_frame(Instant::now() - t.started) {
                    Some(len) => {
                        tally.sent.fetch_add(len as u64, Ordering::Relaxed);
                        sink.send(Message::Binary(t.chunks.next_sized(len))).await
                    }
                    None => Ok(()),
                }
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

/// What of the tally was already charged to the limits and the metrics.
#[derive(Default)]
struct Charged {
    sent: u64,
    received: u64,
}

impl Charged {
    fn charge(&mut self, user: HouseholdUser, tally: &Tally, permit: &SocketPermit) -> Result<(), Refusal> {
        let sent = tally.sent.load(Ordering::Relaxed);
        let received = tally.received.load(Ordering::Relaxed);
        let (new_sent, new_received) = (sent - self.sent, received - self.received);
        (self.sent, self.received) = (sent, received);
        let metrics = &permit.state().metrics;
        metrics.household_bytes.with_label_values(&[user.as_str(), "sent"]).inc_by(new_sent);
        metrics.household_bytes.with_label_values(&[user.as_str(), "received"]).inc_by(new_received);
        permit.state().charge(permit.ip(), new_sent + new_received)
    }
}

/// Paces a user's down traffic by time: by `elapsed` into the test, the
/// user may have been sent its rate times the time it was active.
#[derive(Clone, Debug)]
pub struct Pacer {
    user: HouseholdUser,
    bytes_per_second: f64,
    frame_bytes: usize,
    sent: f64,
    /// Allowance given up after stalls.
    forgiven: f64,
}

impl Pacer {
    pub fn new(user: HouseholdUser, line_mbps: f64) -> Self {
        let (down_mbps, _) = user.rates_mbps(line_mbps);
        let bytes_per_second = down_mbps * 1e6 / 8.0;
        let frame_bytes =
            ((bytes_per_second * FRAME_TIME.as_secs_f64()) as usize).clamp(MIN_FRAME_BYTES, MAX_FRAME_BYTES);
        Self { user, bytes_per_second, frame_bytes, sent: 0.0, forgiven: 0.0 }
    }

    pub fn frame_bytes(&self) -> usize {
        self.frame_bytes
    }

    /// Seconds the user was active in the first `elapsed`.
    fn active_seconds(&self, elapsed: Duration) -> f64 {
        let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        let fraction = if self.user.active_at(ms) { f64::from(elapsed.subsec_micros() % 1000) / 1e3 } else { 0.0 };
        (self.user.active_ms(ms) as f64 + fraction) / 1e3
    }

    fn owed(&self, elapsed: Duration) -> f64 {
        self.bytes_per_second * self.active_seconds(elapsed) - self.forgiven - self.sent
    }

    /// The size of the frame due at `elapsed`, if one is, counted as sent.
    pub fn take_frame(&mut self, elapsed: Duration) -> Option<usize> {
        let frame = self.frame_bytes as f64;
        let most = (self.bytes_per_second * MAX_CATCH_UP.as_secs_f64()).max(4.0 * frame);
        let owed = self.owed(elapsed);
        if owed > most {
            self.forgiven += owed - most;
        }
        if owed < frame {
            return None;
        }
        self.sent += frame;
        Some(self.frame_bytes)
    }

    /// When, after `elapsed`, the next frame falls due: now if one is, the
    /// next active period if the user is idle, else when the allowance grows
    /// by what is missing.
    pub fn next_due(&self, elapsed: Duration) -> Duration {
        let missing = self.frame_bytes as f64 - self.owed(elapsed);
        if missing <= 0.0 {
            return elapsed;
        }
        let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        if !self.user.active_at(ms) {
            let next_ms = (ms..).find(|m| self.user.active_at(*m)).unwrap_or(ms);
            return Duration::from_millis(next_ms);
        }
        elapsed + Duration::from_secs_f64(missing / self.bytes_per_second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a pacer on a simulated clock for `seconds`, waking when it asks.
    fn simulate(user: HouseholdUser, line_mbps: f64, seconds: f64) -> Vec<(Duration, usize)> {
        let mut pacer = Pacer::new(user, line_mbps);
        let mut now = Duration::ZERO;
        let mut frames = Vec::new();
        while now.as_secs_f64() < seconds {
            match pacer.take_frame(now) {
                Some(len) => frames.push((now, len)),
                None => now = pacer.next_due(now).max(now + Duration::from_micros(100)),
            }
        }
        frames
    }

    fn bytes(frames: &[(Duration, usize)], from: f64, to: f64) -> usize {
        frames.iter().filter(|(at, _)| (from..to).contains(&at.as_secs_f64())).map(|(_, len)| len).sum()
    }

    #[test]
    fn constant_users_get_their_rate_in_small_frames() {
        let frames = simulate(HouseholdUser::Gaming, 100.0, 3.0);
        let total = bytes(&frames, 0.0, 3.0) as f64;
        assert!((total - 562_500.0).abs() <= 3_750.0, "{total}");
        assert_eq!(Pacer::new(HouseholdUser::Gaming, 100.0).frame_bytes(), 3_750);
        assert_eq!(Pacer::new(HouseholdUser::Bulk, 1000.0).frame_bytes(), MAX_FRAME_BYTES);
    }

    #[test]
    fn streaming_sends_only_in_the_first_second_of_five() {
        let frames = simulate(HouseholdUser::Streaming, 100.0, 6.0);
        let on = bytes(&frames, 0.0, 1.0) as f64;
        assert!((on - 3_125_000.0).abs() <= 62_500.0, "{on}");
        assert_eq!(bytes(&frames, 1.01, 5.0), 0);
        assert!(bytes(&frames, 5.0, 6.0) > 3_000_000);
    }

    #[test]
    fn a_stalled_user_catches_up_by_a_bounded_burst() {
        let mut pacer = Pacer::new(HouseholdUser::VideoCall, 100.0);
        // Nothing taken for ten seconds, then everything due at once.
        let burst = std::iter::from_fn(|| pacer.take_frame(Duration::from_secs(10))).count();
        assert_eq!(burst, 4);
        assert!(pacer.next_due(Duration::from_secs(10)) > Duration::from_secs(10));
    }
}
