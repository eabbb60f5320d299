//! A tube's engine (issue 15): many TCP connections over one ordered,
//! reliable message channel, as [`tidepool_wire::tube`] frames them.
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
//! holds at most [`Limits::connections`] connections.

pub mod mux;
pub mod peer;

pub use mux::{Channel, Ended, Limits, Mux, OUTGOING_FRAMES, Policy, Stats};
pub use peer::{BridgeEnded, Closer, Opened, Peer, PeerError, Settings};
