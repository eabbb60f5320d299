//! The SOCKS5 server in front of a tube over real WebRTC on loopback: a
//! client speaks RFC 1928 to it byte by byte, and the pod's end reaches
//! TCP and UDP targets on loopback under the tests' policy (the name
//! "127.0.0.1" only).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

mod common;

use common::{Tube, echo_target, echoed, pattern, tube, udp_echo_target};
use tidepool_tests::until;
use tidepool_tube::{Socks5Limits, serve_socks5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// A SOCKS5 server on loopback in front of the tube's client end.
async fn socks(tube: &Tube) -> (SocketAddr, JoinHandle<std::io::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    (address, tokio::spawn(serve_socks5(listener, tube.client.clone(), Socks5Limits::default())))
}

/// Connected, "no authentication" agreed.
async fn greeted(socks: SocketAddr) -> TcpStream {
    let mut tcp = TcpStream::connect(socks).await.unwrap();
    tcp.write_all(&[5, 1, 0]).await.unwrap();
    let mut chosen = [0u8; 2];
    tcp.read_exact(&mut chosen).await.unwrap();
    assert_eq!(chosen, [5, 0]);
    tcp
}

/// Sends a request for `command` to 127.0.0.1:`port`; the reply.
async fn request(tcp: &mut TcpStream, command: u8, port: u16) -> [u8; 10] {
    let [high, low] = port.to_be_bytes();
    tcp.write_all(&[5, command, 0, 1, 127, 0, 0, 1, high, low]).await.unwrap();
    read_reply(tcp).await
}

async fn read_reply(tcp: &mut TcpStream) -> [u8; 10] {
    let mut reply = [0u8; 10];
    tcp.read_exact(&mut reply).await.unwrap();
    reply
}

/// The server closes the connection: end of stream (or a reset).
async fn closed(tcp: &mut TcpStream) {
    let mut rest = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut rest)).await.expect("still open");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_connect_carries_a_mebibyte_to_an_allowed_target_and_back() {
    let tube = tube().await;
    let (socks, _server) = socks(&tube).await;
    let port = echo_target().await;
    let mut tcp = greeted(socks).await;
    assert_eq!(request(&mut tcp, 1, port).await, [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    let sent = pattern(7, 1 << 20);
    let echoed = echoed(tcp, &sent).await;
    assert!(echoed == sent, "{} bytes back of {}", echoed.len(), sent.len());
    assert_eq!(tube.server.stats().received.load(Ordering::Relaxed), 1 << 20);
    tube.server_runtime.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_reply_comes_before_the_first_byte_of_a_target_that_speaks_first() {
    let tube = tube().await;
    let (socks, _server) = socks(&tube).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        tcp.write_all(b"SSH-2.0-banner\r\n").await.unwrap();
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest).await;
    });
    let mut tcp = greeted(socks).await;
    // The target by name (ATYP 3): "127.0.0.1" is a name the policy allows.
    let mut named = vec![5, 1, 0, 3, 9];
    named.extend_from_slice(b"127.0.0.1");
    named.extend_from_slice(&port.to_be_bytes());
    tcp.write_all(&named).await.unwrap();
    let mut got = [0u8; 10 + 16];
    tcp.read_exact(&mut got).await.unwrap();
    assert_eq!(got[..10], [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&got[10..], b"SSH-2.0-banner\r\n");
    tube.server_runtime.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_connect_refusals_carry_their_codes() {
    let tube = tube().await;
    let (socks, _server) = socks(&tube).await;
    // A name the policy does not allow: 0x02.
    let mut tcp = greeted(socks).await;
    let mut named = vec![5, 1, 0, 3, 9];
    named.extend_from_slice(b"localhost");
    named.extend_from_slice(&80u16.to_be_bytes());
    tcp.write_all(&named).await.unwrap();
    assert_eq!(read_reply(&mut tcp).await[1], 0x02);
    closed(&mut tcp).await;
    // A port nobody listens on: 0x05.
    let nobody = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let mut tcp = greeted(socks).await;
    assert_eq!(request(&mut tcp, 1, nobody).await[1], 0x05);
    closed(&mut tcp).await;
    tube.server_runtime.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_unsupported_and_malformed_requests_are_answered_and_closed() {
    let tube = tube().await;
    let (socks, _server) = socks(&tube).await;
    // BIND, and a command that does not exist: 0x07.
    for command in [2, 9] {
        let mut tcp = greeted(socks).await;
        assert_eq!(request(&mut tcp, command, 80).await[1], 0x07, "command {command}");
        closed(&mut tcp).await;
    }
    // An address type that does not exist: 0x08.
    let mut tcp = greeted(socks).await;
    tcp.write_all(&[5, 1, 0, 9, 1, 2, 3, 4, 0, 80]).await.unwrap();
    assert_eq!(read_reply(&mut tcp).await[1], 0x08);
    closed(&mut tcp).await;
    // A request of another version: 0x01.
    let mut tcp = greeted(socks).await;
    tcp.write_all(&[4, 1, 0, 1, 127, 0, 0, 1, 0, 80]).await.unwrap();
    assert_eq!(read_reply(&mut tcp).await[1], 0x01);
    closed(&mut tcp).await;
    // A greeting of another version (SOCKS4): closed without a word.
    let mut tcp = TcpStream::connect(socks).await.unwrap();
    tcp.write_all(&[4, 1, 0, 80, 127, 0, 0, 1, 0]).await.unwrap();
    closed(&mut tcp).await;
    // No method we take (username and password only, or none at all): 0xFF.
    for greeting in [&[5u8, 1, 2][..], &[5, 0]] {
        let mut tcp = TcpStream::connect(socks).await.unwrap();
        tcp.write_all(greeting).await.unwrap();
        let mut chosen = [0u8; 2];
        tcp.read_exact(&mut chosen).await.unwrap();
        assert_eq!(chosen, [5, 0xFF]);
        closed(&mut tcp).await;
    }
    tube.server_runtime.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_udp_associate_relays_allowed_datagrams_and_counts_the_rest() {
    let tube = tube().await;
    let (socks, _server) = socks(&tube).await;
    let echo = udp_echo_target().await;
    let mut control = greeted(socks).await;
    let reply = request(&mut control, 3, 0).await;
    assert_eq!(reply[..8], [5, 0, 0, 1, 127, 0, 0, 1]);
    let relay = SocketAddr::from(([127, 0, 0, 1], u16::from_be_bytes([reply[8], reply[9]])));
    let app = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let header = |ip: [u8; 4], port: u16| {
        let mut header = vec![0, 0, 0, 1];
        header.extend_from_slice(&ip);
        header.extend_from_slice(&port.to_be_bytes());
        header
    };

    // A target the policy does not allow: nothing comes back, and the pod counts it.
    let refused = [header([127, 0, 0, 2], echo), b"refused".to_vec()].concat();
    app.send_to(&refused, relay).await.unwrap();
    let stats = tube.server.stats().clone();
    until("the refused datagram counted", || stats.datagrams_refused.load(Ordering::Relaxed) == 1).await;
    // A fragment is dropped before the tube.
    let mut fragment = [header([127, 0, 0, 1], echo), b"fragment".to_vec()].concat();
    fragment[2] = 1;
    app.send_to(&fragment, relay).await.unwrap();

    // An allowed target: the answer comes back with its source in the header.
    let datagram = [header([127, 0, 0, 1], echo), pattern(5, 1_200)].concat();
    app.send_to(&datagram, relay).await.unwrap();
    let mut buffer = vec![0u8; 65_536];
    let (len, from) = tokio::time::timeout(Duration::from_secs(5), app.recv_from(&mut buffer)).await.unwrap().unwrap();
    assert_eq!(from, relay);
    assert!(buffer[..len] == datagram[..], "the first datagram back is the allowed one's echo");
    assert_eq!(stats.open_associations.load(Ordering::Relaxed), 1);
    assert_eq!(stats.datagrams_refused.load(Ordering::Relaxed), 1);

    // The association ends with its control connection.
    drop(control);
    until("the association ended at the pod", || stats.open_associations.load(Ordering::Relaxed) == 0).await;
    tube.server_runtime.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_server_returns_when_its_tube_ends() {
    let tube = tube().await;
    let (_, server) = socks(&tube).await;
    tube.client.close();
    let served = tokio::time::timeout(Duration::from_secs(5), server).await.expect("still serving");
    assert!(served.unwrap().is_ok());
    tube.server_runtime.shutdown_background();
}
