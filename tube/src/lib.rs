//! A tube's engine (issue 15): many TCP connections, and UDP associations,
//! over one ordered, reliable message channel, as [`tidepool_wire::tube`]
//! frames them; and a SOCKS5 server in front of it ([`socks5`]).
//!
//! The engine does not know what carries its messages: it reads them from
//! one bounded queue and writes them to another ([`Channel`]). In the
//! programs a WebRTC data channel sits behind the queues; in the tests, a
//! pair of queues joined to each other.
//!
//! Bounded everywhere: the outgoing queue holds [`OUTGOING_FRAMES`] frames,
//! so every connection's reader waits when the channel is busy; each
//! connection's inbox holds at most its window ([`tidepool_wire::tube::WINDOW`]),
//! because the peer may not send beyond the credit it was given; a tube
//! holds at most [`Limits::connections`] connections and
//! [`Limits::associations`] associations, each of which holds at most
//! [`ASSOCIATION_INBOX`] datagrams (more are dropped, as UDP drops them).

pub mod forward;
pub mod link;
pub mod mux;
pub mod peer;
mod sockets;
pub mod socks5;
pub mod udp;

pub use forward::{ForwardLimits, serve as serve_forward};
pub use mux::{ASSOCIATION_INBOX, Channel, Dialled, Ended, Limits, Mux, OUTGOING_FRAMES, Policy, Stats};
pub use peer::{BridgeEnded, Closer, IceServer, Opened, Peer, PeerError, Settings};
pub use socks5::{Socks5Limits, serve as serve_socks5};
pub use udp::{Association, Datagram, DatagramError};
