//! Targets for tests and benchmarks that carry bytes somewhere: an echo
//! server on loopback, and byte patterns to send to it and check.

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

/// A TCP echo server on 127.0.0.1 for as long as the runtime runs; its
/// port. Each connection is echoed until its client half-closes, then
/// half-closed in turn.
pub async fn echo_target() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the echo target");
    let port = listener.local_addr().expect("the echo target's address").port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            // A one-byte echo must not wait for Nagle's algorithm.
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let (mut reader, mut writer) = tcp.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            });
        }
    });
    port
}

/// `len` bytes of a sequence `seed` picks (xorshift): cheap to make, and two
/// seeds' bytes differ, so a byte delivered to the wrong connection shows.
pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

/// A UDP echo server on 127.0.0.1 for as long as the runtime runs; its port.
pub async fn udp_echo_target() -> u16 {
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.expect("binding the UDP echo target");
    let port = socket.local_addr().expect("the UDP echo target's address").port();
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 65_536];
        while let Ok((len, from)) = socket.recv_from(&mut buffer).await {
            let _ = socket.send_to(&buffer[..len], from).await;
        }
    });
    port
}

/// Sends `sent` on `tcp` and half-closes it while reading what comes back
/// until the far end closes; what came back.
pub async fn echoed(tcp: tokio::net::TcpStream, sent: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let (mut reader, mut writer) = tcp.into_split();
    let to_send = sent.to_vec();
    let writing = tokio::spawn(async move {
        writer.write_all(&to_send).await.expect("sending to the echo");
        writer.shutdown().await.expect("half-closing toward the echo");
    });
    let mut back = Vec::new();
    reader.read_to_end(&mut back).await.expect("reading the echo");
    writing.await.expect("the sender");
    back
}
