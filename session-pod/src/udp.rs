//! The UDP echo: `POST /api/v1/udp` grants the session a cookie; datagrams
//! that carry it are stamped with the pod's time and sent back at the same
//! size. Everything else is dropped and counted.

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
use crate::error::json_response;
use crate::session::BoundSession;
use crate::state::{PodState, until_shutdown};
use tidepool_protocol::pod::{UDP_MAX_BYTES, UdpError, UdpGrant, UdpProbe};

/// The socket buffers we ask for: 4 MiB holds a third of a second at
/// 100 Mbit/s, so a busy moment of the runtime drops nothing.
pub const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;

pub async fn grant(State(state): State<Arc<PodState>>, Extension(session): Extension<Arc<BoundSession>>) -> Response {
    json_response(StatusCode::OK, &UdpGrant { port: state.udp_port, cookie: session.udp_cookie })
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

/// Why a datagram was dropped: the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    BadSize,
    BadMagic,
    BadCookie,
}

impl Dropped {
    pub fn label(self) -> &'static str {
        match self {
            Self::BadSize => "bad_size",
            Self::BadMagic => "bad_magic",
            Self::BadCookie => "bad_cookie",
        }
    }
}

/// Whether `datagram` is a probe for the session with `cookie` (none before
/// a session bound the pod).
pub fn check(datagram: &[u8], cookie: Option<u64>) -> Result<(), Dropped> {
    let probe = UdpProbe::read(datagram).map_err(|e| match e {
        UdpError::Size(_) => Dropped::BadSize,
        UdpError::Magic => Dropped::BadMagic,
    })?;
    if Some(probe.cookie) != cookie {
        return Err(Dropped::BadCookie);
    }
    Ok(())
}

/// Echoes until shutdown.
pub async fn echo(socket: UdpSocket, state: Arc<PodState>) {
    // One byte more than the largest probe, so an oversized datagram shows.
    let mut buffer = [0u8; UDP_MAX_BYTES + 1];
    let mut shutdown = state.shutdown_signal();
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
        if let Err(dropped) = check(datagram, state.session().map(|s| s.udp_cookie)) {
            count(dropped.label());
            continue;
        }
        // Both ways cross the client's line.
        if state.charge(peer.ip(), 2 * len as u64).is_err() {
            count("over_limit");
            continue;
        }
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
    use tidepool_protocol::pod::UDP_HEADER_BYTES;

    fn probe(cookie: u64, len: usize) -> Vec<u8> {
        let mut datagram = vec![0u8; len];
        UdpProbe { cookie, seq: 1, client_time_us: 2, server_time_us: 0 }.write(&mut datagram).unwrap();
        datagram
    }

    #[test]
    fn only_probes_with_the_sessions_cookie_pass() {
        assert_eq!(check(&probe(7, 64), Some(7)), Ok(()));
        assert_eq!(check(&probe(7, 64), Some(8)), Err(Dropped::BadCookie));
        assert_eq!(check(&probe(7, 64), None), Err(Dropped::BadCookie));
        assert_eq!(check(&[0u8; UDP_HEADER_BYTES - 1], Some(7)), Err(Dropped::BadSize));
        assert_eq!(check(&[0u8; UDP_MAX_BYTES + 1], Some(7)), Err(Dropped::BadSize));
        assert_eq!(check(&[0u8; 64], Some(7)), Err(Dropped::BadMagic));
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
