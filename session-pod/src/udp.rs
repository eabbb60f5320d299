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
use tidepool_protocol::pod::{UDP_MAX_BYTES, UdpGrant, UdpProbe};

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
    // One byte more than the largest probe, so an oversized datagram shows.
    let mut buffer = [0u8; UDP_MAX_BYTES + 1];
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
        let expected =
            || state.session().map(|s| last_cookie.get(&state.udp_cookies, &s.claims.sid, peer.ip().to_canonical()));
        if let Err(dropped) = check(datagram, expected, &state.udp_cookies) {
            count(dropped.label());
            continue;
        }
        if let Err(dropped) = tally.allows(len, caps) {
            count(dropped.label());
            continue;
        }
        // Both ways cross the client's line.
        if state.charge(peer.ip(), 2 * len as u64).is_err() {
            count(Dropped::OverLimit.label());
            continue;
        }
        tally.record(len);
        UdpProbe::stamp_server_time(datagram, unix_micros());
        match socket.send_to(datagram, peer).await {
            Ok(_) => {
                count("echoed");
                state.metrics.udp_bytes.inc_by(len as u64);
            }
            Err(e) => {
                tracing::debug!(error = %e, %peer, "udp send failed");
                count("send_failed");
            }
        }
    }
}
#[cfg(test)]
mod tests {
    use super::*;

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
