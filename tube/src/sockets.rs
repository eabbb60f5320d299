//! The sockets a peer connection runs on: tokio's, with the UDP buffers a
//! tube needs and GSO batches the kernel accepts.
//!
//! The webrtc driver (0.21) sends a run of same-sized datagrams (the last
//! may be shorter) as one GSO send of up to `min(max_gso_segments, 64)`
//! datagrams and 65,535 bytes. One UDP send over IPv4 carries at most
//! 65,507 bytes, so a run that comes to between the two fails with
//! `EMSGSIZE`, and every datagram in it is lost. When SCTP's retransmission
//! timer resends the lost chunks it can pack them the same way, into the
//! same failing send, every time: that direction of the tube stops for
//! good, with no drop in the system's counters. The sockets here report a
//! GSO limit under which no run can reach 65,507 bytes.

use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use webrtc::runtime::{
    AsyncInterval, AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, JoinHandle, RecvMeta, Runtime, TokioRuntime,
    Transmit,
};

/// The most one UDP send may carry over IPv4: 65,535 bytes less the IP
/// header (20) and the UDP header (8). IPv6 allows 20 more.
const MAX_UDP_PAYLOAD: usize = 65_507;

/// What DTLS adds to an SCTP packet, at most: its 13-byte record header
/// and the cipher's nonce and tag (AES-GCM: 24) or IV, MAC and padding
/// (CBC with SHA-1: up to 52), with room to spare.
const DTLS_OVERHEAD: usize = 100;

/// The most datagrams of up to `largest` bytes one GSO send can hold.
fn gso_segments(largest: usize) -> usize {
    (MAX_UDP_PAYLOAD / largest.max(1)).max(1)
}

/// Tokio, with sized UDP buffers and GSO batches that fit one send.
#[derive(Debug)]
pub(crate) struct TubeSockets {
    inner: TokioRuntime,
    buffer_bytes: usize,
    gso_segments: usize,
}

impl TubeSockets {
    /// `buffer_bytes` for each UDP socket's send and receive buffers;
    /// `sctp_mtu` the largest SCTP packet the connection sends.
    pub(crate) fn new(buffer_bytes: usize, sctp_mtu: u32) -> Self {
        let largest = usize::try_from(sctp_mtu).unwrap_or(usize::MAX).saturating_add(DTLS_OVERHEAD);
        Self { inner: TokioRuntime, buffer_bytes, gso_segments: gso_segments(largest) }
    }
}

impl Runtime for TubeSockets {
    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        self.inner.spawn(future)
    }

    fn spawn_reactor(&self, threads: usize, future: Pin<Box<dyn Future<Output = ()> + Send>>) -> Box<dyn JoinHandle> {
        self.inner.spawn_reactor(threads, future)
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        let sized = socket2::SockRef::from(&socket);
        // Best effort: the system's caps may hold them lower.
        let _ = sized.set_recv_buffer_size(self.buffer_bytes);
        let _ = sized.set_send_buffer_size(self.buffer_bytes);
        let inner = self.inner.wrap_udp_socket(socket)?;
        Ok(Arc::new(FittedGso { inner, segments: self.gso_segments }))
    }

    fn wrap_tcp_listener(&self, listener: std::net::TcpListener) -> io::Result<Arc<dyn AsyncTcpListener>> {
        self.inner.wrap_tcp_listener(listener)
    }

    fn connect_tcp<'a>(
        &'a self,
        address: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<Arc<dyn AsyncTcpStream>>> + Send + 'a>> {
        self.inner.connect_tcp(address)
    }

    fn resolve_host<'a>(
        &'a self,
        host: &'a str,
    ) -> Pin<Box<dyn Future<Output = io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        self.inner.resolve_host(host)
    }

    fn now(&self) -> Instant {
        self.inner.now()
    }

    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.inner.sleep(duration)
    }

    fn interval(&self, period: Duration) -> Box<dyn AsyncInterval> {
        self.inner.interval(period)
    }

    fn block_on(&self, future: Pin<Box<dyn Future<Output = ()> + '_>>) {
        self.inner.block_on(future)
    }

    fn yield_now(&self) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        self.inner.yield_now()
    }

    fn name(&self) -> &'static str {
        "tokio, sized UDP buffers, GSO batches that fit one send"
    }
}

/// A UDP socket that reports at most `segments` datagrams a GSO send.
#[derive(Debug)]
struct FittedGso {
    inner: Arc<dyn AsyncUdpSocket>,
    segments: usize,
}

impl AsyncUdpSocket for FittedGso {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn poll_send(&self, cx: &mut Context<'_>, transmit: &Transmit<'_>) -> Poll<io::Result<usize>> {
        self.inner.poll_send(cx, transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn max_gso_segments(&self) -> usize {
        self.inner.max_gso_segments().min(self.segments)
    }

    fn max_gro_segments(&self) -> usize {
        self.inner.max_gro_segments()
    }
}

// Linux: UDP GSO, and the limits, are Linux's.
#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The webrtc driver's rule for one GSO send, as in 0.21.1
    /// (`flush_writes`, `MAX_GSO_SEGMENTS`, `MAX_GSO_BATCH_BYTES`): up to
    /// the socket's limit and 64 datagrams of one size, and 65,535 bytes.
    fn longest_run(socket: &dyn AsyncUdpSocket, size: usize) -> usize {
        socket.max_gso_segments().min(64).min(65_535 / size)
    }

    async fn send_run(socket: &dyn AsyncUdpSocket, to: SocketAddr, size: usize, datagrams: usize) -> io::Result<usize> {
        let contents = vec![7u8; size * datagrams];
        let transmit =
            Transmit { destination: to, ecn: None, contents: &contents, segment_size: Some(size), src_ip: None };
        std::future::poll_fn(|cx| socket.poll_send(cx, &transmit)).await
    }

    fn loopback() -> std::net::UdpSocket {
        std::net::UdpSocket::bind("127.0.0.1:0").unwrap()
    }

    #[tokio::test]
    async fn every_run_the_driver_can_batch_fits_one_send() {
        let receiver = loopback();
        let to = receiver.local_addr().unwrap();
        let sctp_mtu = 1_400;
        let largest = sctp_mtu as usize + DTLS_OVERHEAD;

        // The premise: this kernel batches, and refuses some run the
        // driver makes on a socket that reports the kernel's own limit.
        let plain = TokioRuntime.wrap_udp_socket(loopback()).unwrap();
        assert!(plain.max_gso_segments() > 1, "this kernel does UDP GSO");
        let mut refused = Vec::new();
        for size in 1..=largest {
            let run = longest_run(plain.as_ref(), size);
            if run > 1 && send_run(plain.as_ref(), to, size, run).await.is_err() {
                refused.push(size);
            }
        }
        assert!(!refused.is_empty(), "no run was refused");
        assert!(refused.iter().all(|&size| longest_run(plain.as_ref(), size) * size > MAX_UDP_PAYLOAD), "{refused:?}");

        // Fitted, every size's longest run goes out.
        let fitted = TubeSockets::new(1 << 20, sctp_mtu).wrap_udp_socket(loopback()).unwrap();
        assert_eq!(fitted.max_gso_segments(), gso_segments(largest));
        for size in 1..=largest {
            let run = longest_run(fitted.as_ref(), size);
            let sent = send_run(fitted.as_ref(), to, size, run).await;
            assert_eq!(sent.map_err(|e| e.to_string()), Ok(size * run), "{run} datagrams of {size} bytes");
        }
    }

    #[tokio::test]
    async fn a_fitted_run_arrives_as_its_datagrams() {
        let receiver = loopback();
        receiver.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let fitted = TubeSockets::new(1 << 20, 1_400).wrap_udp_socket(loopback()).unwrap();
        let run = fitted.max_gso_segments();
        assert_eq!(send_run(fitted.as_ref(), receiver.local_addr().unwrap(), 1_437, run).await.unwrap(), 1_437 * run);
        let mut buffer = [0u8; 2_000];
        for _ in 0..run {
            assert_eq!(receiver.recv(&mut buffer).unwrap(), 1_437);
        }
    }

    #[test]
    fn the_limit_leaves_no_run_over_one_send() {
        assert_eq!(gso_segments(1_500), 43);
        assert_eq!(gso_segments(MAX_UDP_PAYLOAD), 1);
        assert_eq!(gso_segments(70_000), 1);
        assert_eq!(gso_segments(0), MAX_UDP_PAYLOAD);
        for largest in 1..=9_000 {
            assert!(gso_segments(largest) * largest <= MAX_UDP_PAYLOAD || largest > MAX_UDP_PAYLOAD);
        }
    }
}
