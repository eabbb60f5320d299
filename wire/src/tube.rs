//! What the two ends of a tube say to each other (issue 15's wire format).
//!
//! A tube is one WebRTC data channel, ordered, reliable and negotiated
//! ahead (it opens as soon as SCTP is up, a round trip sooner than an
//! announced one). Every TCP connection through the tube rides it as
//! frames, one frame per data channel message: SCTP keeps message
//! boundaries, so a frame carries no length of its own. Why one channel:
//! the SCTP stack sends every ordered message of an association from one
//! queue, so more channels would buy no fairness on the sending side;
//! fairness and flow control are ours instead, per connection, by credit
//! ([`SendWindow`], [`ReceiveWindow`]).
//!
//! Layout, big-endian: kind u8 | connection u32 | the kind's body.
//!
//! | kind | from | body |
//! | --- | --- | --- |
//! | `OPEN` 1 | client | port u16, host (1 to 253 bytes of UTF-8) |
//! | `OPENED` 2 | pod | none |
//! | `REFUSED` 3 | pod | [`Refusal`] code u8 |
//! | `DATA` 4 | both | 1 to [`MAX_DATA`] bytes |
//! | `EOF` 5 | both | none: the sender writes no more (half-close) |
//! | `CLOSE` 6 | both | [`CloseReason`] code u8: the connection is gone both ways |
//! | `CREDIT` 7 | both | bytes u32, 1 to [`WINDOW`]: the receiver took that many |
//! | `PING` 8, `PONG` 9 | both | nonce u64; connection 0 |
//! | `DATAGRAM` 10 | both | port u16, host length u8, host, 0 to [`MAX_DATAGRAM`] bytes: SOCKS5 UDP ASSOCIATE |
//!
//! Connections are numbered by the client from 1; 0 is the tube itself.

use thiserror::Error;

/// The most bytes one `DATA` frame carries: a frame is a 64 KiB message.
/// Against 16 KiB frames this took one stream through a tube on loopback
/// from 139 to 234 MiB/s (docs/tubes.md), while a one-byte echo beside a
/// bulk stream on the same tube still came back in under a millisecond
/// at the median.
pub const MAX_DATA: usize = 64 * 1024 - 5;
/// The most payload one `DATAGRAM` frame carries: a UDP datagram over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;
/// Each connection's window each way: the most bytes in flight, unacknowledged
/// by `CREDIT`. It bounds what a receiver buffers per connection.
pub const WINDOW: u32 = 256 * 1024;
/// The longest host name (DNS's limit).
pub const MAX_HOST: usize = 253;
/// The largest frame of any kind.
pub const MAX_FRAME: usize = HEADER + 2 + 1 + MAX_HOST + MAX_DATAGRAM;

const HEADER: usize = 5;

const OPEN: u8 = 1;
const OPENED: u8 = 2;
const REFUSED: u8 = 3;
const DATA: u8 = 4;
const EOF: u8 = 5;
const CLOSE: u8 = 6;
const CREDIT: u8 = 7;
const PING: u8 = 8;
const PONG: u8 = 9;
const DATAGRAM: u8 = 10;

/// Why the pod would not open a connection. Each has the SOCKS5 reply code
/// (RFC 1928) a SOCKS5 client is answered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum Refusal {
    /// The pool's allowlist (or the defaults: no loopback, link-local or
    /// cluster-internal address) does not allow the target.
    #[error("the pool's allowlist does not allow the target")]
    NotAllowed,
    /// The target refused the connection.
    #[error("the target refused the connection")]
    ConnectionRefused,
    /// No route to the target's network.
    #[error("no route to the target's network")]
    NetworkUnreachable,
    /// The target's host did not answer, or its name did not resolve.
    #[error("the target's host did not answer or its name did not resolve")]
    HostUnreachable,
    /// The tube has as many connections open as it may.
    #[error("the tube carries as many connections as it may")]
    TooManyConnections,
    /// Anything else.
    #[error("the connection could not be opened")]
    Failed,
}

impl Refusal {
    pub const ALL: [Refusal; 6] = [
        Self::NotAllowed,
        Self::ConnectionRefused,
        Self::NetworkUnreachable,
        Self::HostUnreachable,
        Self::TooManyConnections,
        Self::Failed,
    ];

    fn code(self) -> u8 {
        match self {
            Self::NotAllowed => 1,
            Self::ConnectionRefused => 2,
            Self::NetworkUnreachable => 3,
            Self::HostUnreachable => 4,
            Self::TooManyConnections => 5,
            Self::Failed => 6,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    /// The SOCKS5 reply code (RFC 1928, section 6).
    pub fn socks5_reply(self) -> u8 {
        match self {
            Self::NotAllowed => 0x02,
            Self::NetworkUnreachable => 0x03,
            Self::HostUnreachable => 0x04,
            Self::ConnectionRefused => 0x05,
            Self::TooManyConnections | Self::Failed => 0x01,
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::NotAllowed => "not_allowed",
            Self::ConnectionRefused => "connection_refused",
            Self::NetworkUnreachable => "network_unreachable",
            Self::HostUnreachable => "host_unreachable",
            Self::TooManyConnections => "too_many_connections",
            Self::Failed => "failed",
        }
    }
}

/// Why a connection ended both ways.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The sender's side of the TCP connection was reset or failed.
    Reset,
    /// The peer sent more than its window: a broken or hostile peer.
    FlowViolation,
    /// The tube is closing.
    TubeClosing,
    /// No bytes either way for the idle time.
    Idle,
}

impl CloseReason {
    pub const ALL: [CloseReason; 4] = [Self::Reset, Self::FlowViolation, Self::TubeClosing, Self::Idle];

    fn code(self) -> u8 {
        match self {
            Self::Reset => 1,
            Self::FlowViolation => 2,
            Self::TubeClosing => 3,
            Self::Idle => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Reset => "reset",
            Self::FlowViolation => "flow_violation",
            Self::TubeClosing => "tube_closing",
            Self::Idle => "idle",
        }
    }
}

/// One frame; `DATA` and `DATAGRAM` borrow their bytes from the message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    Open { conn: u32, host: &'a str, port: u16 },
    Opened { conn: u32 },
    Refused { conn: u32, reason: Refusal },
    Data { conn: u32, bytes: &'a [u8] },
    Eof { conn: u32 },
    Close { conn: u32, reason: CloseReason },
    Credit { conn: u32, bytes: u32 },
    Ping { nonce: u64 },
    Pong { nonce: u64 },
    Datagram { assoc: u32, host: &'a str, port: u16, payload: &'a [u8] },
}

/// Why a message is not a frame. The tube that gets one closes: its peer
/// is broken or hostile, and nothing after it can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("a frame of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("a frame of {0} bytes is longer than any frame")]
    TooLong(usize),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("a {kind} frame's body is malformed")]
    BadBody { kind: &'static str },
    #[error("a {kind} frame names connection 0, which is the tube's own")]
    ConnectionZero { kind: &'static str },
    #[error("a {kind} frame names connection {conn}; it must name 0")]
    NotTheTube { kind: &'static str, conn: u32 },
    #[error("a host name must be 1 to {MAX_HOST} bytes of UTF-8 without spaces or controls")]
    BadHost,
}

impl<'a> Frame<'a> {
    /// Reads one data channel message.
    pub fn decode(message: &'a [u8]) -> Result<Self, FrameError> {
        if message.len() < HEADER {
            return Err(FrameError::Short(message.len()));
        }
        if message.len() > MAX_FRAME {
            return Err(FrameError::TooLong(message.len()));
        }
        let kind = message[0];
        let conn = u32::from_be_bytes([message[1], message[2], message[3], message[4]]);
        let body = &message[HEADER..];
        let name = kind_name(kind).ok_or(FrameError::UnknownKind(kind))?;
        let bad = || FrameError::BadBody { kind: name };
        // Every kind but the tube's own names a connection, and the tube's own names none.
        match (kind, conn) {
            (PING | PONG, 0) => {}
            (PING | PONG, conn) => return Err(FrameError::NotTheTube { kind: name, conn }),
            (_, 0) => return Err(FrameError::ConnectionZero { kind: name }),
            _ => {}
        }
        let frame = match kind {
            OPEN => {
                let (port, host) = body.split_first_chunk::<2>().ok_or_else(bad)?;
                Self::Open { conn, host: host_of(host)?, port: u16::from_be_bytes(*port) }
            }
            OPENED if body.is_empty() => Self::Opened { conn },
            REFUSED => match body {
                [code] => Self::Refused { conn, reason: Refusal::from_code(*code).ok_or_else(bad)? },
                _ => return Err(bad()),
            },
            DATA if (1..=MAX_DATA).contains(&body.len()) => Self::Data { conn, bytes: body },
            EOF if body.is_empty() => Self::Eof { conn },
            CLOSE => match body {
                [code] => Self::Close { conn, reason: CloseReason::from_code(*code).ok_or_else(bad)? },
                _ => return Err(bad()),
            },
            CREDIT => {
                let bytes = u32::from_be_bytes(*<&[u8; 4]>::try_from(body).map_err(|_| bad())?);
                if !(1..=WINDOW).contains(&bytes) {
                    return Err(bad());
                }
                Self::Credit { conn, bytes }
            }
            PING | PONG => {
                let nonce = u64::from_be_bytes(*<&[u8; 8]>::try_from(body).map_err(|_| bad())?);
                if kind == PING { Self::Ping { nonce } } else { Self::Pong { nonce } }
            }
            DATAGRAM => {
                let (port, rest) = body.split_first_chunk::<2>().ok_or_else(bad)?;
                let (&host_len, rest) = rest.split_first().ok_or_else(bad)?;
                if rest.len() < usize::from(host_len) {
                    return Err(bad());
                }
                let (host, payload) = rest.split_at(usize::from(host_len));
                if payload.len() > MAX_DATAGRAM {
                    return Err(bad());
                }
                Self::Datagram { assoc: conn, host: host_of(host)?, port: u16::from_be_bytes(*port), payload }
            }
            _ => return Err(bad()),
        };
        Ok(frame)
    }

    /// Writes the frame as one message into `out` (cleared first). A frame
    /// this module could not decode (an empty `DATA`, a bad host) is an
    /// error, so nothing unreadable is ever sent.
    pub fn encode(&self, out: &mut Vec<u8>) -> Result<(), FrameError> {
        out.clear();
        let (kind, conn) = match *self {
            Self::Open { conn, .. } => (OPEN, conn),
            Self::Opened { conn } => (OPENED, conn),
            Self::Refused { conn, .. } => (REFUSED, conn),
            Self::Data { conn, .. } => (DATA, conn),
            Self::Eof { conn } => (EOF, conn),
            Self::Close { conn, .. } => (CLOSE, conn),
            Self::Credit { conn, .. } => (CREDIT, conn),
            Self::Ping { .. } => (PING, 0),
            Self::Pong { .. } => (PONG, 0),
            Self::Datagram { assoc, .. } => (DATAGRAM, assoc),
        };
        out.push(kind);
        out.extend_from_slice(&conn.to_be_bytes());
        match *self {
            Self::Open { host, port, .. } => {
                out.extend_from_slice(&port.to_be_bytes());
                out.extend_from_slice(host.as_bytes());
            }
            Self::Refused { reason, .. } => out.push(reason.code()),
            Self::Data { bytes, .. } => out.extend_from_slice(bytes),
            Self::Close { reason, .. } => out.push(reason.code()),
            Self::Credit { bytes, .. } => out.extend_from_slice(&bytes.to_be_bytes()),
            Self::Ping { nonce } | Self::Pong { nonce } => out.extend_from_slice(&nonce.to_be_bytes()),
            Self::Datagram { host, port, payload, .. } => {
                out.extend_from_slice(&port.to_be_bytes());
                out.push(u8::try_from(host.len()).map_err(|_| FrameError::BadHost)?);
                out.extend_from_slice(host.as_bytes());
                out.extend_from_slice(payload);
            }
            Self::Opened { .. } | Self::Eof { .. } => {}
        }
        // What goes out must come back in: check it the way the peer will.
        Frame::decode(out).map(|_| ())
    }
}

fn kind_name(kind: u8) -> Option<&'static str> {
    Some(match kind {
        OPEN => "OPEN",
        OPENED => "OPENED",
        REFUSED => "REFUSED",
        DATA => "DATA",
        EOF => "EOF",
        CLOSE => "CLOSE",
        CREDIT => "CREDIT",
        PING => "PING",
        PONG => "PONG",
        DATAGRAM => "DATAGRAM",
        _ => return None,
    })
}

/// A target's host: a name or an address as text. Its meaning (a name to
/// resolve, an address, allowed or not) is the pod's decision.
fn host_of(bytes: &[u8]) -> Result<&str, FrameError> {
    let host = std::str::from_utf8(bytes).map_err(|_| FrameError::BadHost)?;
    let sane = (1..=MAX_HOST).contains(&host.len()) && host.chars().all(|c| !c.is_whitespace() && !c.is_control());
    if sane { Ok(host) } else { Err(FrameError::BadHost) }
}

/// What a connection's sender may still send: credit the receiver gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SendWindow {
    available: u32,
}

impl Default for SendWindow {
    fn default() -> Self {
        Self { available: WINDOW }
    }
}

impl SendWindow {
    /// How many of `wanted` bytes may go now (at most one `DATA` frame's).
    pub fn allows(&self, wanted: usize) -> usize {
        wanted.min(MAX_DATA).min(self.available as usize)
    }

    /// `bytes` went out.
    pub fn spend(&mut self, bytes: usize) {
        self.available = self.available.saturating_sub(u32::try_from(bytes).unwrap_or(u32::MAX));
    }

    /// A `CREDIT` came. More than was ever spent is the peer's error.
    pub fn credit(&mut self, bytes: u32) -> Result<(), CloseReason> {
        match self.available.checked_add(bytes) {
            Some(available) if available <= WINDOW => {
                self.available = available;
                Ok(())
            }
            _ => Err(CloseReason::FlowViolation),
        }
    }

    /// Whether the sender must wait for credit.
    pub fn is_shut(&self) -> bool {
        self.available == 0
    }
}

/// What a connection's receiver holds: bytes come in within the window and
/// go out as credit once written on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiveWindow {
    /// Bytes received and not yet credited back.
    outstanding: u32,
    /// Of those, bytes already written on (to the TCP socket).
    written: u32,
}

impl ReceiveWindow {
    /// A `DATA` frame of `bytes` came; beyond the window it is the peer's error.
    pub fn receive(&mut self, bytes: usize) -> Result<(), CloseReason> {
        let bytes = u32::try_from(bytes).map_err(|_| CloseReason::FlowViolation)?;
        match self.outstanding.checked_add(bytes) {
            Some(outstanding) if outstanding <= WINDOW => {
                self.outstanding = outstanding;
                Ok(())
            }
            _ => Err(CloseReason::FlowViolation),
        }
    }

    /// `bytes` were written on; the credit to send back now, if any. Credit
    /// goes back in quarters of the window: one `CREDIT` per 64 KiB keeps
    /// the pipe full without a frame for every `DATA`. What a slow reader
    /// has not taken is never credited, so its sender stops, alone.
    pub fn written(&mut self, bytes: usize) -> Option<u32> {
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        self.written = self.written.saturating_add(bytes).min(self.outstanding);
        if self.written < WINDOW / 4 {
            return None;
        }
        let credit = self.written;
        self.outstanding -= credit;
        self.written = 0;
        Some(credit)
    }

    /// Bytes held for the connection now, at most [`WINDOW`].
    pub fn held(&self) -> u32 {
        self.outstanding - self.written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(frame: Frame<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        frame.encode(&mut out).unwrap();
        assert_eq!(Frame::decode(&out), Ok(frame));
        out
    }

    #[test]
    fn every_kind_round_trips_in_its_layout() {
        assert_eq!(
            round_trip(Frame::Open { conn: 1, host: "db.default.svc", port: 5432 })[..7],
            [1, 0, 0, 0, 1, 0x15, 0x38]
        );
        assert_eq!(round_trip(Frame::Opened { conn: 2 }), [2, 0, 0, 0, 2]);
        assert_eq!(round_trip(Frame::Refused { conn: 3, reason: Refusal::NotAllowed }), [3, 0, 0, 0, 3, 1]);
        assert_eq!(round_trip(Frame::Data { conn: 4, bytes: b"hi" }), [4, 0, 0, 0, 4, b'h', b'i']);
        assert_eq!(round_trip(Frame::Eof { conn: 5 }), [5, 0, 0, 0, 5]);
        assert_eq!(round_trip(Frame::Close { conn: 6, reason: CloseReason::Idle }), [6, 0, 0, 0, 6, 4]);
        assert_eq!(round_trip(Frame::Credit { conn: 7, bytes: 65_536 }), [7, 0, 0, 0, 7, 0, 1, 0, 0]);
        assert_eq!(round_trip(Frame::Ping { nonce: 9 })[..5], [8, 0, 0, 0, 0]);
        round_trip(Frame::Pong { nonce: u64::MAX });
        let datagram = round_trip(Frame::Datagram { assoc: 8, host: "::1", port: 53, payload: b"q" });
        assert_eq!(datagram, [10, 0, 0, 0, 8, 0, 53, 3, b':', b':', b'1', b'q']);
        round_trip(Frame::Datagram { assoc: 8, host: "h", port: 1, payload: &[] });
        round_trip(Frame::Data { conn: u32::MAX, bytes: &[7; MAX_DATA] });
        round_trip(Frame::Datagram { assoc: 1, host: &"h".repeat(MAX_HOST), port: 1, payload: &[0; MAX_DATAGRAM] });
    }

    #[test]
    fn malformed_frames_are_refused_by_what_is_wrong() {
        let decode = |bytes: &[u8]| Frame::decode(bytes).unwrap_err();
        assert_eq!(decode(&[]), FrameError::Short(0));
        assert_eq!(decode(&[4, 0, 0, 1]), FrameError::Short(4));
        assert_eq!(decode(&vec![4; MAX_FRAME + 1]), FrameError::TooLong(MAX_FRAME + 1));
        assert_eq!(decode(&[0, 0, 0, 0, 1]), FrameError::UnknownKind(0));
        assert_eq!(decode(&[11, 0, 0, 0, 1]), FrameError::UnknownKind(11));
        assert_eq!(decode(&[4, 0, 0, 0, 0, 1]), FrameError::ConnectionZero { kind: "DATA" });
        assert_eq!(decode(&[8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]), FrameError::NotTheTube { kind: "PING", conn: 1 });
        let bad = |kind| FrameError::BadBody { kind };
        assert_eq!(decode(&[4, 0, 0, 0, 1]), bad("DATA"), "empty data");
        assert_eq!(decode(&[[4, 0, 0, 0, 1].as_slice(), &[0; MAX_DATA + 1]].concat()), bad("DATA"));
        assert_eq!(decode(&[2, 0, 0, 0, 1, 0]), bad("OPENED"));
        assert_eq!(decode(&[3, 0, 0, 0, 1, 0]), bad("REFUSED"), "no refusal 0");
        assert_eq!(decode(&[3, 0, 0, 0, 1, 7]), bad("REFUSED"));
        assert_eq!(decode(&[6, 0, 0, 0, 1, 9]), bad("CLOSE"));
        assert_eq!(decode(&[7, 0, 0, 0, 1, 0, 0, 0, 0]), bad("CREDIT"), "zero credit");
        assert_eq!(decode(&[7, 0, 0, 0, 1, 0, 4, 0, 1]), bad("CREDIT"), "beyond the window");
        assert_eq!(decode(&[7, 0, 0, 0, 1, 0, 1]), bad("CREDIT"));
        assert_eq!(decode(&[1, 0, 0, 0, 1, 0]), bad("OPEN"), "no port");
        assert_eq!(decode(&[1, 0, 0, 0, 1, 0, 80]), FrameError::BadHost, "no host");
        assert_eq!(decode(&[1, 0, 0, 0, 1, 0, 80, b'a', b' ', b'b']), FrameError::BadHost);
        assert_eq!(decode(&[1, 0, 0, 0, 1, 0, 80, 0xff]), FrameError::BadHost, "not UTF-8");
        assert_eq!(decode(&[10, 0, 0, 0, 1, 0, 53, 9, b'h']), bad("DATAGRAM"), "host cut short");
    }

    #[test]
    fn nothing_undecodable_is_encoded() {
        let mut out = Vec::new();
        assert!(Frame::Data { conn: 1, bytes: &[] }.encode(&mut out).is_err());
        assert!(Frame::Open { conn: 1, host: "", port: 1 }.encode(&mut out).is_err());
        assert!(Frame::Opened { conn: 0 }.encode(&mut out).is_err());
        assert!(Frame::Credit { conn: 1, bytes: WINDOW + 1 }.encode(&mut out).is_err());
        let long = "h".repeat(300);
        assert_eq!(
            Frame::Datagram { assoc: 1, host: &long, port: 1, payload: &[] }.encode(&mut out),
            Err(FrameError::BadHost)
        );
    }

    #[test]
    fn refusals_answer_socks5_clients_with_their_codes() {
        let replies: Vec<u8> = Refusal::ALL.iter().map(|r| r.socks5_reply()).collect();
        assert_eq!(replies, [0x02, 0x05, 0x03, 0x04, 0x01, 0x01]);
    }

    #[test]
    fn a_sender_stops_at_its_window_and_goes_on_with_credit() {
        let mut window = SendWindow::default();
        assert_eq!(window.allows(1 << 20), MAX_DATA, "one frame at a time");
        let mut sent = 0;
        while !window.is_shut() {
            let now = window.allows(10_000);
            window.spend(now);
            sent += now;
        }
        assert_eq!(sent, WINDOW as usize);
        assert_eq!(window.allows(1), 0);
        assert_eq!(window.credit(1_000), Ok(()));
        assert_eq!(window.allows(5_000), 1_000);
        assert_eq!(window.credit(WINDOW), Err(CloseReason::FlowViolation), "more than was ever sent");
    }

    #[test]
    fn a_receiver_credits_what_it_wrote_and_refuses_beyond_its_window() {
        let mut window = ReceiveWindow::default();
        assert_eq!(window.receive(WINDOW as usize), Ok(()));
        assert_eq!(window.receive(1), Err(CloseReason::FlowViolation));
        assert_eq!(window.held(), WINDOW);
        // A slow reader: what it has not taken is not credited.
        assert_eq!(window.written(1_000), None);
        assert_eq!(window.written(WINDOW as usize / 4), Some(WINDOW / 4 + 1_000));
        assert_eq!(window.held(), WINDOW - (WINDOW / 4 + 1_000));
        assert_eq!(window.receive(WINDOW as usize / 4), Ok(()));
        // Writing more than was received credits only what was received.
        let held = window.held();
        assert_eq!(window.written(10 * WINDOW as usize), Some(held));
        assert_eq!(window.held(), 0);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn host() -> impl Strategy<Value = String> {
            "[a-z0-9.:-]{1,253}"
        }

        fn frame_parts() -> impl Strategy<Value = (u8, u32, String, u16, Vec<u8>, u8, u32, u64)> {
            (
                1u8..=10,
                1u32..,
                host(),
                any::<u16>(),
                proptest::collection::vec(any::<u8>(), 1..2048),
                0u8..8,
                1..=WINDOW,
                any::<u64>(),
            )
        }

        proptest! {
            #[test]
            fn any_message_decodes_or_is_refused_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
                let _ = Frame::decode(&bytes);
            }

            #[test]
            fn any_sound_frame_round_trips((kind, conn, host, port, data, code, credit, nonce) in frame_parts()) {
                let frame = match kind {
                    1 => Frame::Open { conn, host: &host, port },
                    2 => Frame::Opened { conn },
                    3 => Frame::Refused { conn, reason: Refusal::ALL[usize::from(code) % Refusal::ALL.len()] },
                    4 => Frame::Data { conn, bytes: &data },
                    5 => Frame::Eof { conn },
                    6 => Frame::Close { conn, reason: CloseReason::ALL[usize::from(code) % CloseReason::ALL.len()] },
                    7 => Frame::Credit { conn, bytes: credit },
                    8 => Frame::Ping { nonce },
                    9 => Frame::Pong { nonce },
                    _ => Frame::Datagram { assoc: conn, host: &host, port, payload: &data },
                };
                let mut out = Vec::new();
                frame.encode(&mut out).unwrap();
                prop_assert!(out.len() <= MAX_FRAME);
                prop_assert_eq!(Frame::decode(&out), Ok(frame));
            }

            #[test]
            fn a_receiver_never_holds_more_than_its_window(steps in proptest::collection::vec((any::<bool>(), 0usize..70_000), 0..200)) {
                let mut window = ReceiveWindow::default();
                for (incoming, bytes) in steps {
                    if incoming {
                        let _ = window.receive(bytes);
                    } else {
                        let _ = window.written(bytes);
                    }
                    prop_assert!(window.held() <= WINDOW && window.outstanding <= WINDOW);
                }
            }
        }
    }
}
