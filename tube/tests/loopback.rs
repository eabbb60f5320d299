//! Tubes over real WebRTC on loopback: two peer connections in one
//! process (host candidates only), a TCP echo target, the multiplexer on
//! both ends. The offer and answer pass as text, as the Tube resource
//! carries them.

use std::sync::atomic::Ordering;
use std::time::Duration;

mod common;

use common::{connect, echo_target, echoed, pattern, tube};
use tidepool_tube::{BridgeEnded, Ended, Peer, PeerError, Settings};
use tidepool_wire::tube::Refusal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_connections_through_one_tube_carry_their_own_bytes() {
    let tube = tube().await;
    let port = echo_target().await;
    let mut connections = tokio::task::JoinSet::new();
    for i in 0..64u32 {
        let client = tube.client.clone();
        connections.spawn(async move {
            let app = connect(&client, port).await.unwrap();
            let sent = pattern(i, 100_000 + i as usize * 997);
            let echoed = echoed(app, &sent).await;
            assert!(echoed == sent, "connection {i}: {} bytes back of {}", echoed.len(), sent.len());
        });
    }
    while let Some(done) = connections.join_next().await {
        done.unwrap();
    }
    assert!(tube.client.stats().rtt_us.load(Ordering::Relaxed) > 0, "the first ping has been answered");
    let total: u64 = (0..64u64).map(|i| 100_000 + i * 997).sum();
    assert_eq!(tube.server.stats().received.load(Ordering::Relaxed), total);
    tube.server_runtime.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_target_says_why_and_the_tube_goes_on() {
    let tube = tube().await;
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    assert_eq!(connect(&tube.client, closed).await.unwrap_err(), Refusal::ConnectionRefused);
    let port = echo_target().await;
    let mut app = connect(&tube.client, port).await.unwrap();
    app.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    app.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
    tube.server_runtime.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_pod_end_goes_mid_transfer_the_client_end_notices_and_its_connections_close() {
    let tube = tube().await;
    let port = echo_target().await;
    let app = connect(&tube.client, port).await.unwrap();
    let (mut reader, mut writer) = app.into_split();
    // A transfer that is still going when the pod's end disappears.
    let writing = tokio::spawn(async move {
        let chunk = vec![5u8; 64 * 1024];
        while writer.write_all(&chunk).await.is_ok() {}
    });
    let mut first = [0u8; 1024];
    reader.read_exact(&mut first).await.unwrap();
    // The pod's end goes without a word, as a killed pod's would: its
    // sockets close and nothing answers ICE's consent checks.
    tube.server_runtime.shutdown_background();
    let (ended, client) = tokio::time::timeout(Duration::from_secs(20), tube.client_bridge).await.unwrap().unwrap();
    assert!(matches!(ended, BridgeEnded::ConnectionFailed | BridgeEnded::ChannelClosed), "{ended:?}");
    client.close().await;
    drop(client);
    let driver = tokio::time::timeout(Duration::from_secs(5), tube.client_ended).await.unwrap().unwrap();
    assert_eq!(driver, Ended::ChannelClosed);
    // The application's connection ends rather than hanging.
    let mut rest = Vec::new();
    let drained = tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut rest)).await;
    assert!(drained.is_ok(), "the application's connection hung");
    writing.abort();
}

#[tokio::test]
async fn a_description_that_is_not_sdp_is_refused() {
    let peer = Peer::new(&Settings::loopback()).await.unwrap();
    assert!(matches!(peer.answer("not sdp at all").await, Err(PeerError::BadDescription(_))));
    assert!(matches!(peer.accept("v=0\r\nnonsense").await, Err(PeerError::BadDescription(_)) | Err(PeerError::Rtc(_))));
    peer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_tube_in_one_process_carries_after_the_first_is_closed() {
    let port = echo_target().await;
    for round in 0..3u32 {
        let tube = tube().await;
        let app = tokio::time::timeout(Duration::from_secs(10), connect(&tube.client, port))
            .await
            .unwrap_or_else(|_| panic!("round {round}: the pod did not answer the open"))
            .unwrap();
        let sent = pattern(round, 10_000);
        assert_eq!(echoed(app, &sent).await, sent, "round {round}");
        tube.client.close();
        let (_, opened) = tube.client_bridge.await.unwrap();
        opened.close().await;
        tube.server_runtime.shutdown_background();
    }
}
