//! Idle and loaded latency: WebSocket pings and the UDP echo series.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tidepool_protocol::pod::{ClientMessage, ServerMessage, UdpProbe};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;

use super::{Clock, Observer};
use crate::error::{Error, Result, chain};
use crate::measure::{self, Ping};
use crate::pod::{PodClient, WebSocket};

/// How long a stopped series waits for the answers still on their way.
/// Pings still unanswered then count as lost, or under load as lower bounds.
const GRACE: Duration = Duration::from_millis(500);
/// The size of each UDP probe.
const UDP_DATAGRAM_BYTES: usize = 64;

/// The interval between pings at `hz` per second.
pub(crate) fn ping_interval(hz: u32) -> Duration {
    Duration::from_secs(1) / hz.max(1)
}

/// Encodes a client message as a text frame.
pub(crate) fn text(message: &ClientMessage) -> Message {
    // A plain enum of numbers and strings always serialises.
    Message::text(serde_json::to_string(message).unwrap_or_default())
}

/// Pings on the latency WebSocket, in the background, until finished.
pub(crate) struct Pinger {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<Vec<Ping>>>,
}

impl Pinger {
    pub(crate) fn start(socket: WebSocket, clock: Clock, hz: u32, observer: Arc<dyn Observer>) -> Self {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(ping(socket, clock, ping_interval(hz), stopped, observer));
        Self { stop, task }
    }

    /// Stops pinging, waits a little for the last pongs and returns every
    /// ping, indexed by its sequence number.
    pub(crate) async fn finish(self) -> Result<Vec<Ping>> {
        let _ = self.stop.send(());
        self.task.await.map_err(|e| Error::test(format!("the pinger failed: {e}")))?
    }
}

async fn ping(
    mut socket: WebSocket,
    clock: Clock,
    interval: Duration,
    mut stop: oneshot::Receiver<()>,
    observer: Arc<dyn Observer>,
) -> Result<Vec<Ping>> {
    let mut pings: Vec<Ping> = Vec::new();
    let mut answered = 0;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut drain_until: Option<Instant> = None;
    loop {
        if drain_until.is_some() && answered == pings.len() {
            break;
        }
        tokio::select! {
            _ = ticks.tick(), if drain_until.is_none() => {
                let sent_us = clock.now_us();
                let message = ClientMessage::Ping { seq: pings.len() as u64, client_time_us: sent_us };
                socket.send(text(&message)).await.map_err(|e| broken(&e))?;
                pings.push(Ping { sent_us, rtt_us: None });
            }
            _ = &mut stop, if drain_until.is_none() => drain_until = Some(Instant::now() + GRACE),
            _ = tokio::time::sleep_until(drain_until.unwrap_or_else(Instant::now)), if drain_until.is_some() => break,
            message = socket.next() => {
                let Some(pong) = pong(message)? else { continue };
                let (seq, client_time_us) = pong;
                let now_us = clock.now_us();
                if let Some(ping) = usize::try_from(seq).ok().and_then(|seq| pings.get_mut(seq))
                    && ping.rtt_us.is_none()
                    && ping.sent_us == client_time_us
                {
                    let rtt_us = now_us.saturating_sub(client_time_us);
                    ping.rtt_us = Some(rtt_us);
                    answered += 1;
                    observer.rtt(measure::ms(rtt_us));
                }
            }
        }
    }
    // The closing handshake takes a round trip: no reason to wait for it.
    tokio::spawn(async move { tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await });
    Ok(pings)
}

/// The `(seq, client_time_us)` of a pong; `None` for any other frame that
/// may come; an error when the socket ends or the pod refuses.
pub(crate) fn pong(
    message: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> Result<Option<(u64, u64)>> {
    match message {
        Some(Ok(Message::Text(text))) => match serde_json::from_str::<ServerMessage>(&text) {
            Ok(ServerMessage::Pong { seq, client_time_us, .. }) => Ok(Some((seq, client_time_us))),
            Ok(ServerMessage::Error { message }) => {
                Err(Error::Protocol(format!("the pod refused a message: {message}")))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(Error::Protocol(format!("the pod sent a message outside the protocol: {e}"))),
        },
        Some(Ok(Message::Close(frame))) => Err(Error::test(match frame {
            Some(frame) if !frame.reason.is_empty() => format!("the pod closed the WebSocket: {}", frame.reason),
            _ => "the pod closed the WebSocket".to_string(),
        })),
        Some(Ok(_)) => Ok(None),
        Some(Err(e)) => Err(broken(&e)),
        None => Err(Error::test("the pod closed the WebSocket")),
    }
}

fn broken(error: &tokio_tungstenite::tungstenite::Error) -> Error {
    Error::test(format!("the WebSocket to the pod broke: {}", chain(error)))
}

/// What a UDP echo series saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct UdpOutcome {
    pub sent: u64,
    /// One-way transit (pod receive time less client send time) of each
    /// echoed datagram, in arrival order.
    pub transits_us: Vec<i64>,
}

impl UdpOutcome {
    /// Loss in percent and RFC 3550 jitter in ms, when anything came back.
    pub fn loss_and_jitter(&self) -> Option<(f64, f64)> {
        (!self.transits_us.is_empty()).then(|| measure::udp_loss_and_jitter(self.sent, &self.transits_us))
    }
}

/// A UDP echo series at the ping rate, in the background.
pub(crate) struct UdpEcho {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<UdpOutcome>,
}

impl UdpEcho {
    /// Asks the pod for a grant and starts sending.
    pub(crate) async fn start(pod: &PodClient, clock: Clock, hz: u32) -> Result<Self> {
        let grant = pod.udp_grant().await?;
        let address = pod.udp_address(grant.port).await?;
        let local = if address.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let socket = UdpSocket::bind(local).await.map_err(|e| Error::test(format!("cannot open a UDP socket: {e}")))?;
        socket.connect(address).await.map_err(|e| Error::test(format!("cannot reach {address} over UDP: {e}")))?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(echo(socket, grant.cookie, clock, ping_interval(hz), stopped));
        Ok(Self { stop: Some(stop), task })
    }

    /// Stops sending; the last echoes are still taken for a little while.
    pub(crate) fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops sending and waits for the last echoes.
    pub(crate) async fn finish(mut self) -> UdpOutcome {
        self.stop();
        self.task.await.unwrap_or_default()
    }
}

async fn echo(
    socket: UdpSocket,
    cookie: u64,
    clock: Clock,
    interval: Duration,
    mut stop: oneshot::Receiver<()>,
) -> UdpOutcome {
    let mut outcome = UdpOutcome::default();
    let mut echoed: Vec<bool> = Vec::new();
    let mut datagram = [0u8; UDP_DATAGRAM_BYTES];
    let mut received = [0u8; 2048];
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut drain_until: Option<Instant> = None;
    loop {
        if drain_until.is_some() && outcome.transits_us.len() == echoed.len() {
            break;
        }
        tokio::select! {
            _ = ticks.tick(), if drain_until.is_none() => {
                let seq = echoed.len() as u32;
                let probe = UdpProbe { cookie, seq, client_time_us: clock.now_us(), server_time_us: 0 };
                if probe.write(&mut datagram).is_ok() && socket.send(&datagram).await.is_ok() {
                    echoed.push(false);
                    outcome.sent += 1;
                }
            }
            _ = &mut stop, if drain_until.is_none() => drain_until = Some(Instant::now() + GRACE),
            _ = tokio::time::sleep_until(drain_until.unwrap_or_else(Instant::now)), if drain_until.is_some() => break,
            read = socket.recv(&mut received) => {
                // Errors (an ICMP unreachable, say) leave the datagram lost.
                let Ok(len) = read else { continue };
                let Ok(probe) = UdpProbe::read(&received[..len]) else { continue };
                let Some(seen) = echoed.get_mut(probe.seq as usize) else { continue };
                if probe.cookie != cookie || *seen {
                    continue;
                }
                *seen = true;
                let transit = i64::try_from(probe.server_time_us).unwrap_or(i64::MAX)
                    - i64::try_from(probe.client_time_us).unwrap_or(0);
                outcome.transits_us.push(transit);
            }
        }
    }
    outcome
}
