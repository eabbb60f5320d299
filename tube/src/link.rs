//! What the multiplexer and the datagram relay share: the policy the
//! pod's end dials under, the tube's counters, why a tube ends, and how a
//! frame goes out.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use tidepool_wire::tube::{Frame, FrameError};
use tokio::sync::mpsc;

/// What the pod's end may dial: the pool's allowlist and the defaults.
pub trait Policy: Send + Sync + 'static {
    /// Whether a target named `host:port` may be asked for at all (before
    /// its name is resolved).
    fn allows_name(&self, host: &str, port: u16) -> bool;
    /// Whether an address `host` resolved to may be dialled.
    fn allows_address(&self, host: &str, address: SocketAddr) -> bool;
}

/// What a tube has carried, for its status and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Payload bytes sent into the tube (connections' and datagrams').
    pub sent: AtomicU64,
    /// Payload bytes that came out of it.
    pub received: AtomicU64,
    pub open_connections: AtomicUsize,
    /// UDP associations open (at the pod's end: those that have had a datagram).
    pub open_associations: AtomicUsize,
    /// Datagrams dropped for want of room or route: a full inbox, an
    /// association that is gone or beyond the limit, a name that did not
    /// resolve, a socket that failed, a reply from an address never sent to.
    pub datagrams_dropped: AtomicU64,
    /// Datagrams the policy did not allow (the pod's end).
    pub datagrams_refused: AtomicU64,
    /// The last round trip of a ping, µs; 0 before the first.
    pub rtt_us: AtomicU64,
}

impl Stats {
    pub(crate) fn count(counter: &AtomicU64, by: usize) {
        counter.fetch_add(u64::try_from(by).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// Why a tube ended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Ended {
    #[error("the channel closed")]
    ChannelClosed,
    #[error("the peer sent a bad frame: {0}")]
    BadFrame(FrameError),
    #[error("the peer broke the protocol: {0}")]
    Protocol(&'static str),
    #[error("the tube was closed")]
    Closed,
}

pub(crate) fn encode(frame: &Frame<'_>) -> Result<Bytes, FrameError> {
    let mut message = Vec::new();
    frame.encode(&mut message)?;
    Ok(Bytes::from(message))
}

pub(crate) async fn send(outgoing: &mpsc::Sender<Bytes>, frame: &Frame<'_>) -> Result<(), Ended> {
    let message = encode(frame).map_err(Ended::BadFrame)?;
    outgoing.send(message).await.map_err(|_| Ended::ChannelClosed)
}
