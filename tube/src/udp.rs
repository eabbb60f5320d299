//! UDP through a tube (SOCKS5 UDP ASSOCIATE): the client's handle on an
//! association, and the pod's relay that sends its datagrams on and brings
//! the answers back.
//!
//! The pod binds an association's sockets only when a datagram needs one:
//! one IPv4 socket, and one IPv6 socket if a target is IPv6. Each datagram
//! goes out under the policy (its name, then the address it resolved to);
//! what the policy refuses is dropped and counted, since UDP has no
//! refusal. Replies are taken only from addresses the association has sent
//! to, as a NAT would, so no stranger can write into the tube.

use std::collections::VecDeque;
use std::future::pending;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tidepool_wire::tube::{CloseReason, Frame, FrameError, MAX_DATAGRAM};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::link::{Policy, Stats, encode, send};

/// How long resolving a datagram's target may take (the pod's end).
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Addresses an association remembers sending to (the oldest forgotten).
const PEERS: usize = 64;

/// One datagram through an association: its target going out, its source
/// (an address, as text) coming back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    pub host: String,
    pub port: u16,
    pub payload: Bytes,
}

/// Why a datagram could not be sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    #[error("the association has ended")]
    Ended,
    #[error("a datagram of {0} bytes is longer than {MAX_DATAGRAM}")]
    TooLong(usize),
    #[error("the datagram cannot be framed: {0}")]
    Frame(FrameError),
}

/// A UDP association through the tube (the client's end), from
/// [`crate::Mux::associate`]. Dropping it ends it at both ends; so does the
/// pod when it has been idle ([`crate::Limits::association_idle`]), or the
/// tube's end.
#[derive(Debug)]
pub struct Association {
    assoc: u32,
    inbox: mpsc::Receiver<Datagram>,
    /// Weak, so a forgotten association does not keep the tube's channel open.
    outgoing: mpsc::WeakSender<Bytes>,
    stats: Arc<Stats>,
    gone: CancellationToken,
}

impl Association {
    pub(crate) fn new(
        assoc: u32,
        inbox: mpsc::Receiver<Datagram>,
        outgoing: mpsc::WeakSender<Bytes>,
        stats: Arc<Stats>,
        gone: CancellationToken,
    ) -> Self {
        Self { assoc, inbox, outgoing, stats, gone }
    }

    /// Its number in the tube: from the same counter as the connections'.
    pub fn id(&self) -> u32 {
        self.assoc
    }

    /// Whether the pod or the tube has ended it.
    pub fn is_ended(&self) -> bool {
        self.gone.is_cancelled()
    }

    /// Sends `payload` to `host:port` through the pod. Waits while the
    /// tube's queue is full, like a connection's reader; once the frame is
    /// queued, what becomes of it is UDP's business.
    pub async fn send(&self, host: &str, port: u16, payload: &[u8]) -> Result<(), DatagramError> {
        if payload.len() > MAX_DATAGRAM {
            return Err(DatagramError::TooLong(payload.len()));
        }
        if self.gone.is_cancelled() {
            return Err(DatagramError::Ended);
        }
        let frame = Frame::Datagram { assoc: self.assoc, host, port, payload };
        let message = encode(&frame).map_err(DatagramError::Frame)?;
        let outgoing = self.outgoing.upgrade().ok_or(DatagramError::Ended)?;
        tokio::select! {
            sent = outgoing.send(message) => sent.map_err(|_| DatagramError::Ended)?,
            () = self.gone.cancelled() => return Err(DatagramError::Ended),
        }
        Stats::count(&self.stats.sent, payload.len());
        Ok(())
    }

    /// The next datagram back, with its source; `None` once the association
    /// has ended and what came before has been read.
    pub async fn recv(&mut self) -> Option<Datagram> {
        self.inbox.recv().await
    }
}

/// An association's sockets at the pod's end, bound when first needed.
#[derive(Default)]
struct Sockets {
    v4: Option<UdpSocket>,
    v6: Option<UdpSocket>,
}

impl Sockets {
    async fn toward(&mut self, target: SocketAddr) -> io::Result<&UdpSocket> {
        let (slot, any) = match target {
            SocketAddr::V4(_) => (&mut self.v4, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            SocketAddr::V6(_) => (&mut self.v6, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        };
        let socket = match slot.take() {
            Some(socket) => socket,
            None => UdpSocket::bind(SocketAddr::new(any, 0)).await?,
        };
        Ok(slot.insert(socket))
    }
}

/// The addresses an association has sent to; replies from others are dropped.
#[derive(Default)]
struct Peers(VecDeque<IpAddr>);

impl Peers {
    fn remember(&mut self, ip: IpAddr) {
        if self.0.contains(&ip) {
            return;
        }
        if self.0.len() >= PEERS {
            self.0.pop_front();
        }
        self.0.push_back(ip);
    }

    fn knows(&self, ip: IpAddr) -> bool {
        self.0.contains(&ip)
    }
}

async fn readable(socket: Option<&UdpSocket>) -> io::Result<()> {
    match socket {
        Some(socket) => socket.readable().await,
        None => pending().await,
    }
}

/// The pod's end of one association: sends what the driver queues, brings
/// back what its sockets receive, until it has been idle for `idle` or the
/// channel closes. Says why it ended, for the `CLOSE`.
pub(crate) async fn relay<P: Policy + ?Sized>(
    assoc: u32,
    mut queue: mpsc::Receiver<Datagram>,
    policy: &P,
    outgoing: &mpsc::Sender<Bytes>,
    stats: &Stats,
    idle: Duration,
) -> CloseReason {
    let (mut sockets, mut peers) = (Sockets::default(), Peers::default());
    // Room for any UDP payload, so one too long to carry is seen whole and
    // dropped rather than cut to fit.
    let mut buffer = vec![0u8; usize::from(u16::MAX)];
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    loop {
        let ready = tokio::select! {
            datagram = queue.recv() => {
                let Some(datagram) = datagram else { return CloseReason::Reset };
                idle_timer.as_mut().reset(Instant::now() + idle);
                forward(datagram, policy, &mut sockets, &mut peers, stats).await;
                continue;
            }
            Ok(()) = readable(sockets.v4.as_ref()) => sockets.v4.as_ref(),
            Ok(()) = readable(sockets.v6.as_ref()) => sockets.v6.as_ref(),
            () = &mut idle_timer => return CloseReason::Idle,
        };
        let Some(socket) = ready else { continue };
        let (len, source) = match socket.try_recv_from(&mut buffer) {
            Ok(received) => received,
            // Readiness can be spurious; an error (an ICMP report) concerns one datagram.
            Err(_) => continue,
        };
        if !peers.knows(source.ip()) || len > MAX_DATAGRAM {
            Stats::count(&stats.datagrams_dropped, 1);
            continue;
        }
        idle_timer.as_mut().reset(Instant::now() + idle);
        let host = source.ip().to_string();
        let frame = Frame::Datagram { assoc, host: &host, port: source.port(), payload: &buffer[..len] };
        if send(outgoing, &frame).await.is_err() {
            return CloseReason::TubeClosing;
        }
        Stats::count(&stats.sent, len);
    }
}

/// Sends one datagram on, if the policy allows its name and one of the
/// addresses the name resolves to.
async fn forward<P: Policy + ?Sized>(
    datagram: Datagram,
    policy: &P,
    sockets: &mut Sockets,
    peers: &mut Peers,
    stats: &Stats,
) {
    let Datagram { host, port, payload } = datagram;
    if !policy.allows_name(&host, port) {
        Stats::count(&stats.datagrams_refused, 1);
        return;
    }
    let resolved = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host.as_str(), port))).await;
    let Ok(Ok(mut addresses)) = resolved else {
        Stats::count(&stats.datagrams_dropped, 1);
        return;
    };
    let Some(target) = addresses.find(|address| policy.allows_address(&host, *address)) else {
        Stats::count(&stats.datagrams_refused, 1);
        return;
    };
    peers.remember(target.ip());
    let sent = match sockets.toward(target).await {
        Ok(socket) => socket.send_to(&payload, target).await.map(|_| ()),
        Err(e) => Err(e),
    };
    if sent.is_err() {
        Stats::count(&stats.datagrams_dropped, 1);
    }
}
