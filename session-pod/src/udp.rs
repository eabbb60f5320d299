//! The UDP echo: `POST /api/v1/udp` grants the client a cookie made for its
//! address; datagrams that carry the cookie of their own source address are
//! stamped with the pod's time and sent back at the same size. Everything
//! else is dropped and counted.
//!
//! The cookie is the first 8 bytes of HMAC-SHA256(a random secret of the
//! pod, session id || client IP), so a datagram whose source was spoofed to
//! aim the echo at someone else carries a cookie that is not its source's:
//! the echo cannot be used for reflection.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use ring::hmac;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;

use crate::clock::unix_micros;
use crate::connection::ClientAddr;
use crate::error::json_response;
use crate::random::NoRandomness;
use crate::session::BoundSession;
use crate::state::{PodState, until_shutdown};
use tidepool_protocol::pod::{UDP_MAX_BYTES, UdpError, UdpGrant, UdpProbe};

/// The socket buffers we ask for: 4 MiB holds a third of a second at
/// 100 Mbit/s, so a busy moment of the runtime drops nothing.
pub const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// How many granted cookies the pod remembers, to tell a datagram from the
/// wrong address (`wrong_source`) from one with a made-up cookie.
const GRANTS_REMEMBERED: usize = 4096;

/// What one session's echo may send back in all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpCaps {
    /// Datagrams echoed per session.
    pub packets_per_session: u64,
    /// Bytes echoed per session.
    pub bytes_per_session: u64,
}

impl Default for UdpCaps {
    /// 100 datagrams a second for an hour (the CLI sends 10 a second), and 100 MB.
    fn default() -> Self {
        Self { packets_per_session: 360_000, bytes_per_session: 100_000_000 }
    }
}

/// Makes and remembers the cookies of UDP grants.
pub struct UdpCookies {
    key: hmac::Key,
    granted: Mutex<Granted>,
}

#[derive(Default)]
struct Granted {
    order: VecDeque<u64>,
    set: HashSet<u64>,
}

impl UdpCookies {
    /// With a fresh random secret.
    pub fn new() -> Result<Self, NoRandomness> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret)?;
        Ok(Self::with_secret(&secret))
    }

    pub fn with_secret(secret: &[u8]) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, secret), granted: Mutex::new(Granted::default()) }
    }

    /// The cookie of session `sid` for datagrams from `ip`: the first 8
    /// bytes, big-endian, of HMAC-SHA256(secret, sid || the address's 4 or
    /// 16 bytes). An IPv4-mapped IPv6 address counts as its IPv4 address.
    pub fn cookie(&self, sid: &str, ip: IpAddr) -> u64 {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(sid.as_bytes());
        match ip.to_canonical() {
            IpAddr::V4(v4) => context.update(&v4.octets()),
            IpAddr::V6(v6) => context.update(&v6.octets()),
        }
        let tag = context.sign();
        let mut first = [0u8; 8];
        first.copy_from_slice(&tag.as_ref()[..8]);
        u64::from_be_bytes(first)
    }

    /// A grant's cookie for `ip`, remembered.
    pub fn grant(&self, sid: &str, ip: IpAddr) -> u64 {
        let cookie = self.cookie(sid, ip);
        let mut granted = self.granted();
        if granted.set.insert(cookie) {
            granted.order.push_back(cookie);
            if granted.order.len() > GRANTS_REMEMBERED
                && let Some(oldest) = granted.order.pop_front()
            {
                granted.set.remove(&oldest);
            }
        }
        cookie
    }

    /// Whether `cookie` was granted (to some address).
    pub fn was_granted(&self, cookie: u64) -> bool {
        self.granted().set.contains(&cookie)
    }

    /// A poisoned lock holds a sound set (each update is a few plain steps).
    fn granted(&self) -> MutexGuard<'_, Granted> {
        self.granted.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

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

/// Why a datagram was dropped: the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    BadSize,
    BadMagic,
    /// A cookie no grant gave (and every datagram before a session bound the pod).
    BadCookie,
    /// A granted cookie from another address than the one it was granted to:
    /// a spoofed source, most likely.
    WrongSource,
    /// The address's hourly bytes are spent.
    OverLimit,
    /// The session's datagrams or bytes are spent.
    SessionLimit,
}

impl Dropped {
    pub const ALL: [Dropped; 6] =
        [Self::BadSize, Self::BadMagic, Self::BadCookie, Self::WrongSource, Self::OverLimit, Self::SessionLimit];

    pub fn label(self) -> &'static str {
        match self {
            Self::BadSize => "bad_size",
            Self::BadMagic => "bad_magic",
            Self::BadCookie => "bad_cookie",
            Self::WrongSource => "wrong_source",
            Self::OverLimit => "over_limit",
            Self::SessionLimit => "session_limit",
        }
    }
}

/// Whether `datagram` is a probe with `expected`, the cookie made for its
/// source address (`None` before a session bound the pod), asked for only
/// once the datagram is a well-formed probe: garbage costs no HMAC.
pub fn check(datagram: &[u8], expected: impl FnOnce() -> Option<u64>, cookies: &UdpCookies) -> Result<(), Dropped> {
    let probe = UdpProbe::read(datagram).map_err(|e| match e {
        UdpError::Size(_) => Dropped::BadSize,
        UdpError::Magic => Dropped::BadMagic,
    })?;
    let Some(expected) = expected() else { return Err(Dropped::BadCookie) };
    if probe.cookie == expected {
        Ok(())
    } else if cookies.was_granted(probe.cookie) {
        Err(Dropped::WrongSource)
    } else {
        Err(Dropped::BadCookie)
    }
}

/// The cookie of the last source address seen: a client sends from one
/// address, so the echo makes its HMAC once, not per datagram.
#[derive(Debug, Default)]
struct LastCookie(Option<(IpAddr, u64)>);

impl LastCookie {
    fn get(&mut self, cookies: &UdpCookies, sid: &str, source: IpAddr) -> u64 {
        match self.0 {
            Some((ip, cookie)) if ip == source => cookie,
            _ => {
                let cookie = cookies.cookie(sid, source);
                self.0 = Some((source, cookie));
                cookie
            }
        }
    }
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
    use tidepool_protocol::pod::UDP_HEADER_BYTES;

    fn probe(cookie: u64, len: usize) -> Vec<u8> {
        let mut datagram = vec![0u8; len];
        UdpProbe { cookie, seq: 1, client_time_us: 2, server_time_us: 0 }.write(&mut datagram).unwrap();
        datagram
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn cookies_are_hmacs_of_the_session_and_the_address() {
        let cookies = UdpCookies::with_secret(b"pod secret");
        // HMAC-SHA256("pod secret", "sid-1" || 127.0.0.1), its first 8 bytes.
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"pod secret");
        let tag = hmac::sign(&key, b"sid-1\x7f\x00\x00\x01");
        let expected = u64::from_be_bytes(tag.as_ref()[..8].try_into().unwrap());
        assert_eq!(cookies.cookie("sid-1", ip("127.0.0.1")), expected);
        assert_eq!(cookies.cookie("sid-1", ip("::ffff:127.0.0.1")), expected, "mapped is the IPv4 address");
        assert_ne!(cookies.cookie("sid-1", ip("127.0.0.2")), expected);
        assert_ne!(cookies.cookie("sid-2", ip("127.0.0.1")), expected);
        assert_ne!(UdpCookies::with_secret(b"another pod").cookie("sid-1", ip("127.0.0.1")), expected);
    }

    #[test]
    fn only_probes_with_their_sources_cookie_pass() {
        let cookies = UdpCookies::with_secret(b"s");
        let (alice, mallory) = (ip("198.51.100.7"), ip("203.0.113.9"));
        let granted = cookies.grant("sid", alice);
        let cookies = &cookies;
        let from = |source: IpAddr| move || Some(cookies.cookie("sid", source));
        assert_eq!(check(&probe(granted, 64), from(alice), cookies), Ok(()));
        assert_eq!(check(&probe(granted, 64), from(mallory), cookies), Err(Dropped::WrongSource));
        assert_eq!(check(&probe(granted ^ 1, 64), from(alice), cookies), Err(Dropped::BadCookie));
        assert_eq!(check(&probe(granted, 64), || None, cookies), Err(Dropped::BadCookie));
        let never = || -> Option<u64> { panic!("no HMAC for a datagram that is not a probe") };
        assert_eq!(check(&[0u8; UDP_HEADER_BYTES - 1], never, cookies), Err(Dropped::BadSize));
        assert_eq!(check(&[0u8; UDP_MAX_BYTES + 1], never, cookies), Err(Dropped::BadSize));
        assert_eq!(check(&[0u8; 64], never, cookies), Err(Dropped::BadMagic));

        let mut last = LastCookie::default();
        assert_eq!(last.get(cookies, "sid", alice), granted);
        assert_eq!(last.get(cookies, "sid", alice), granted);
        assert_eq!(last.get(cookies, "sid", mallory), cookies.cookie("sid", mallory));
    }

    #[test]
    fn the_grants_remembered_are_bounded() {
        let cookies = UdpCookies::with_secret(b"s");
        let first = cookies.grant("sid", ip("10.0.0.1"));
        for n in 0..GRANTS_REMEMBERED as u32 {
            cookies.grant("sid", IpAddr::from(0x0b00_0000u32.wrapping_add(n).to_be_bytes()));
        }
        assert_eq!(cookies.granted().order.len(), GRANTS_REMEMBERED);
        assert_eq!(cookies.granted().set.len(), GRANTS_REMEMBERED);
        assert!(!cookies.was_granted(first), "the oldest is forgotten first");
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
