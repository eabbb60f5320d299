//! The UDP echo: `POST /api/v1/udp` grants the client a cookie made for its
//! address (see [`crate::udp_cookie`]); datagrams that carry the cookie of
//! their own source address are stamped with the pod's time and sent back at
//! the same size, within the session's caps. Everything else is dropped and
//! counted.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::clock::unix_micros;
use crate::connection::ClientAddr;
use crate::error::json_response;
use crate::limits::UdpCaps;
use crate::session::BoundSession;
use crate::state::{PodState, until_shutdown};
use crate::udp_cookie::LastCookie;
pub use crate::udp_cookie::{Dropped, UdpCookies, check};
use tidepool_protocol::pod::{UdpGrant, UdpProbe};
use tidepool_protocol::relay::{self, RELAY_HEADER_BYTES, RELAY_MAX_BYTES, RelayKey};

/// The socket buffers we ask for: 4 MiB holds a third of a second at
/// 100 Mbit/s, so a busy moment of the runtime drops nothing.
pub const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

pub async fn grant(
    State(state): State<Arc<PodState>>,
    Extension(session): Extension<Arc<BoundSession>>,
    Extension(client): Extension<ClientAddr>,
) -> Response {
    let cookie = state.udp_cookies.grant(&session.claims.sid, client.0.ip());
    json_response(StatusCode::OK, &UdpGrant { port: state.udp_port, cookie })
}

/// The buffer sizes the kernel granted (Linux reports twice what is asked,
/// the half it keeps for bookkeeping included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketBuffers {
    pub receive: usize,
    pub send: usize,
}

/// Binds the echo socket with large buffers.
pub fn bind(addr: SocketAddr) -> io::Result<(UdpSocket, SocketBuffers)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    size_buffers(&socket, SOCKET_BUFFER_BYTES);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let buffers = SocketBuffers { receive: socket.recv_buffer_size()?, send: socket.send_buffer_size()? };
    Ok((UdpSocket::from_std(socket.into())?, buffers))
}

/// Asks for `bytes` each way. The plain options stop at the system's
/// rmem_max/wmem_max; as root (CAP_NET_ADMIN) the FORCE variants do not.
fn size_buffers(socket: &Socket, bytes: usize) {
    if !force_buffer(socket, ForceBuffer::Receive, bytes) {
        let _ = socket.set_recv_buffer_size(bytes);
    }
    if !force_buffer(socket, ForceBuffer::Send, bytes) {
        let _ = socket.set_send_buffer_size(bytes);
    }
}

#[derive(Clone, Copy)]
enum ForceBuffer {
    Receive,
    Send,
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn force_buffer(socket: &Socket, which: ForceBuffer, bytes: usize) -> bool {
    use std::os::fd::AsRawFd;
    let option = match which {
        ForceBuffer::Receive => libc::SO_RCVBUFFORCE,
        ForceBuffer::Send => libc::SO_SNDBUFFORCE,
    };
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: the fd is the live socket we own; the value is a c_int that
    // outlives the call, and its size is passed along.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    result == 0
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn force_buffer(_: &Socket, _: ForceBuffer, _: usize) -> bool {
    false
}

/// What the session's echo has sent back so far, against its caps.
#[derive(Debug, Default)]
struct SessionTally {
    packets: u64,
    bytes: u64,
}

impl SessionTally {
    /// Whether an echo of `len` bytes stays within the caps.
    fn allows(&self, len: usize, caps: UdpCaps) -> Result<(), Dropped> {
        if self.packets >= caps.packets_per_session || self.bytes.saturating_add(len as u64) > caps.bytes_per_session {
            return Err(Dropped::SessionLimit);
        }
        Ok(())
    }

    fn record(&mut self, len: usize) {
        self.packets += 1;
        self.bytes = self.bytes.saturating_add(len as u64);
    }
}

/// Echoes until shutdown.
pub async fn echo(socket: UdpSocket, state: Arc<PodState>, caps: UdpCaps) {
    // One byte more than the largest datagram, so an oversized one shows.
    let mut buffer = [0u8; RELAY_MAX_BYTES + 1];
    let mut shutdown = state.shutdown_signal();
    let mut tally = SessionTally::default();
    let mut last_cookie = LastCookie::default();
    let count = |outcome: &str| state.metrics.udp_datagrams.with_label_values(&[outcome]).inc();
    loop {
        let received = tokio::select! {
            received = socket.recv_from(&mut buffer) => received,
            () = until_shutdown(&mut shutdown) => return,
        };
        let (len, peer) = match received {
            Ok(received) => received,
            Err(e) => {
                tracing::debug!(error = %e, "udp receive failed");
                continue;
            }
        };
        let datagram = &mut buffer[..len];
        // Through the gateway the client is the one the wrapper names; the
        // echo still goes back to the datagram's source, the gateway.
        let (client, relay_key) = match relayed_client(datagram, state.relay_key.get()) {
            Ok(Some((client, key))) => (client, Some(key)),
            Ok(None) => (peer, None),
            Err(dropped) => {
                count(dropped.label());
                continue;
            }
        };
        let probe_at = if relay_key.is_some() { RELAY_HEADER_BYTES } else { 0 };
        let expected =
            || state.session().map(|s| last_cookie.get(&state.udp_cookies, &s.claims.sid, client.ip().to_canonical()));
        if let Err(dropped) = check(&datagram[probe_at..], expected, &state.udp_cookies) {
            count(dropped.label());
            continue;
        }
        let probe_len = len - probe_at;
        if let Err(dropped) = tally.allows(probe_len, caps) {
            count(dropped.label());
            continue;
        }
        // Both ways cross the client's line.
        if state.charge(client.ip(), 2 * probe_len as u64).is_err() {
            count(Dropped::OverLimit.label());
            continue;
        }
        tally.record(probe_len);
        UdpProbe::stamp_server_time(&mut datagram[probe_at..], unix_micros());
        if let Some(key) = relay_key
            && relay::seal(key, datagram).is_err()
        {
            count(Dropped::BadRelay.label());
            continue;
        }
        match socket.send_to(datagram, peer).await {
            Ok(_) => {
                count(if relay_key.is_some() { "relayed" } else { "echoed" });
                state.metrics.udp_bytes.inc_by(probe_len as u64);
            }
            Err(e) => {
                tracing::debug!(error = %e, %peer, "udp send failed");
                count("send_failed");
            }
        }
    }
}

/// The client a relayed datagram names, with the key it was checked with;
/// `None` for a datagram sent straight to the pod.
fn relayed_client<'k>(
    datagram: &[u8],
    key: Option<&'k RelayKey>,
) -> Result<Option<(SocketAddr, &'k RelayKey)>, Dropped> {
    if !relay::is_relayed(datagram) {
        return Ok(None);
    }
    let key = key.ok_or(Dropped::BadRelay)?;
    let client = relay::open(key, datagram).map_err(|_| Dropped::BadRelay)?;
    Ok(Some((client, key)))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_datagram_names_its_client_only_under_the_relay_key() {
        let key = RelayKey::new(&[1; 32]);
        let client: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let mut probe = [0u8; 64];
        UdpProbe { cookie: 1, seq: 2, client_time_us: 3, server_time_us: 0 }.write(&mut probe).unwrap();
        let mut wrapped = [0u8; RELAY_MAX_BYTES];
        let len = relay::wrap(&key, client, &probe, &mut wrapped).unwrap();
        assert_eq!(relayed_client(&probe, Some(&key)).map(|r| r.is_none()), Ok(true), "a direct probe");
        assert_eq!(relayed_client(&probe, None).map(|r| r.is_none()), Ok(true));
        assert_eq!(relayed_client(&wrapped[..len], Some(&key)).map(|r| r.map(|(c, _)| c)), Ok(Some(client)));
        // Before the gateway's ticket reached the pod, or under another key.
        assert_eq!(relayed_client(&wrapped[..len], None).map(|_| ()), Err(Dropped::BadRelay));
        let other = RelayKey::new(&[2; 32]);
        assert_eq!(relayed_client(&wrapped[..len], Some(&other)).map(|_| ()), Err(Dropped::BadRelay));
        assert_eq!(relayed_client(b"TPR1 short", Some(&key)).map(|_| ()), Err(Dropped::BadRelay));
    }

    #[test]
    fn the_session_caps_hold() {
        let caps = UdpCaps { packets_per_session: 3, bytes_per_session: 200 };
        let mut tally = SessionTally::default();
        let mut take = |len| tally.allows(len, caps).map(|()| tally.record(len));
        assert_eq!(take(64), Ok(()));
        assert_eq!(take(64), Ok(()));
        assert_eq!(take(100), Err(Dropped::SessionLimit), "bytes");
        assert_eq!(take(64), Ok(()));
        assert_eq!(take(1), Err(Dropped::SessionLimit), "packets");
        assert_eq!((tally.packets, tally.bytes), (3, 192));
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_socket_gets_the_buffers_it_asks_for() {
        let (_, buffers) = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        // As root the FORCE options pass the system's caps; otherwise they apply.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let cap = |path: &str| -> usize {
            if root { usize::MAX } else { std::fs::read_to_string(path).unwrap().trim().parse().unwrap() }
        };
        // Linux reports twice what it was asked for.
        let receive = 2 * SOCKET_BUFFER_BYTES.min(cap("/proc/sys/net/core/rmem_max"));
        let send = 2 * SOCKET_BUFFER_BYTES.min(cap("/proc/sys/net/core/wmem_max"));
        assert_eq!(buffers, SocketBuffers { receive, send });
    }
}
