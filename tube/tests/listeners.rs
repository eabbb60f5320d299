//! The two local listeners in front of a tube's client end, and their
//! bounds: the forwarding listener (`tidepool tube --target`) closes a
//! connection beyond the tube's cap at once and goes on carrying the
//! others; the SOCKS5 server closes a client that does not finish its
//! handshake in time, and one beyond its cap of clients at once.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

mod common;

use common::{echo_target, echoed, pattern, tube, tube_with};
use tidepool_tube::{ForwardLimits, Limits, Socks5Limits, serve_forward, serve_socks5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads until the far end closes; how long that took. Panics if it is
/// still open after `limit`.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut rest = [0u8; 64];
    loop {
        match tokio::time::timeout(limit, tcp.read(&mut rest)).await.expect("still open") {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_forwarding_listener_closes_one_connection_too_many_and_carries_the_rest() {
    let tube = tube_with(Limits { connections: 2, ..Limits::default() }).await;
    let port = echo_target().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let server =
        tokio::spawn(serve_forward(listener, tube.client.clone(), "127.0.0.1".into(), port, ForwardLimits::default()));

    // Two connections carried and held open (each has echoed a byte).
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(address).await.unwrap();
        tcp.write_all(b"x").await.unwrap();
        let mut back = [0u8; 1];
        tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut back)).await.unwrap().unwrap();
        held.push(tcp);
    }
    // The third is beyond the tube's cap: closed at once, nothing carried.
    let mut third = TcpStream::connect(address).await.unwrap();
    closed_within(&mut third, Duration::from_secs(5)).await;
    // One carried connection ends; once the tube has let it go, a new one
    // is carried again.
    drop(held.pop());
    let stats = tube.client.stats().clone();
    tidepool_tests::until("the dropped connection to end in the tube", || {
        stats.open_connections.load(Ordering::Relaxed) < 2
    })
    .await;
    let sent = pattern(3, 100_000);
    let carried = echoed(TcpStream::connect(address).await.unwrap(), &sent).await;
    assert!(carried == sent, "{} bytes back of {}", carried.len(), sent.len());
    tube.client.close();
    let served = tokio::time::timeout(Duration::from_secs(5), server).await.expect("the listener ends with its tube");
    assert!(served.unwrap().is_ok());
    tube.server_runtime.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_closes_a_handshake_that_does_not_finish_in_time_and_one_client_too_many() {
    let tube = tube().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let handshake = Duration::from_secs(2);
    let limits = Socks5Limits { clients: 2, handshake_timeout: handshake, ..Socks5Limits::default() };
    tokio::spawn(serve_socks5(listener, tube.client.clone(), limits));

    // A client that says nothing, and one that stops half way through its
    // greeting: each holds a place until the handshake's time is up.
    let connected = Instant::now();
    let mut silent = TcpStream::connect(address).await.unwrap();
    let mut halting = TcpStream::connect(address).await.unwrap();
    halting.write_all(&[5, 2]).await.unwrap();
    // Both places are taken: a third client is closed at once, long before
    // a handshake's time would be up.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(address).await.unwrap();
    let refused_after = closed_within(&mut third, Duration::from_secs(5)).await;
    assert!(refused_after < handshake / 2, "closed after {refused_after:?}, not at once");
    // The two are closed when their time is up, not before.
    for (name, tcp) in [("silent", &mut silent), ("halting", &mut halting)] {
        closed_within(tcp, Duration::from_secs(10)).await;
        let after = connected.elapsed();
        assert!(after >= handshake, "the {name} client was closed {after:?} after it connected");
    }
    // Their places are free again: a client is served.
    let mut served = TcpStream::connect(address).await.unwrap();
    served.write_all(&[5, 1, 0]).await.unwrap();
    let mut chosen = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(5), served.read_exact(&mut chosen)).await.unwrap().unwrap();
    assert_eq!(chosen, [5, 0]);
    tube.server_runtime.shutdown_background();
}
