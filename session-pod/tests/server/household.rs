//! The household sockets: nothing but pongs before `start`, then traffic
//! paced at the user's rate, counted both ways.

use std::time::Duration;

use futures_util::SinkExt;
use reqwest::StatusCode;
use tidepool_protocol::pod::{ClientMessage, ServerMessage};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;

fn household(user: &str) -> String {
    format!("/ws/household/{user}")
}

/// Binary bytes received until `until`, answering nothing; pongs' round
/// trips (ms) and stats are collected on the way.
#[derive(Default, Debug)]
struct Traffic {
    bytes: usize,
    rtts_ms: Vec<f64>,
    stats: Vec<(u64, u64, u64)>,
}

async fn collect(socket: &mut Socket, until: Instant, traffic: &mut Traffic) {
    while let Ok(received) = tokio::time::timeout_at(until, receive(socket)).await {
        match received {
            Received::Binary(len) => traffic.bytes += len,
            Received::Text(ServerMessage::Pong { client_time_us, .. }) => {
                traffic.rtts_ms.push((unix_micros() - client_time_us) as f64 / 1e3)
            }
            Received::Text(ServerMessage::Stats { sent_bytes, received_bytes, elapsed_us }) => {
                traffic.stats.push((sent_bytes, received_bytes, elapsed_us))
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn unknown_users_are_404() {
    let pod = start().await;
    let (status, error) = refusal(pod.get(&household("grandma")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error.contains("gaming, videoCall, streaming, bulk"), "{error}");
}

#[tokio::test]
async fn before_start_there_are_only_pongs() {
    let pod = start().await;
    let mut socket = pod.websocket(&household("gaming")).await;
    for seq in 0..3 {
        ping(&mut socket, seq).await;
        assert!(matches!(receive(&mut socket).await, Received::Text(ServerMessage::Pong { .. })));
    }
    let silence = tokio::time::timeout(Duration::from_millis(500), receive(&mut socket)).await;
    assert!(silence.is_err(), "sent before start: {silence:?}");
}

#[tokio::test]
async fn gaming_is_paced_at_its_rate_and_pongs_stay_prompt() {
    let _timed = TIMED.lock().await;
    let pod = start().await;
    let mut socket = pod.websocket(&household("gaming")).await;
    send(&mut socket, &ClientMessage::Start { line_mbps: 100.0 }).await;
    let started = Instant::now();
    let mut traffic = Traffic::default();
    for step in 1..=6 {
        ping(&mut socket, step).await;
        collect(&mut socket, started + Duration::from_millis(500 * step), &mut traffic).await;
    }
    // 1.5 Mbit/s for 3 s.
    let expected = 1.5e6 / 8.0 * 3.0;
    assert!((traffic.bytes as f64 - expected).abs() <= expected * 0.1, "{} bytes, expected {expected}", traffic.bytes);
    assert_eq!(traffic.rtts_ms.len(), 6, "{traffic:?}");
    assert!(traffic.rtts_ms.iter().all(|rtt| *rtt < 50.0), "{:?}", traffic.rtts_ms);
    // Stats at 1 s and 2 s say what was sent so far.
    assert!(traffic.stats.len() >= 2, "{traffic:?}");
    let (sent, received, elapsed_us) = traffic.stats[0];
    assert_eq!(received, 0);
    assert!((950_000..1_200_000).contains(&elapsed_us), "{elapsed_us}");
    assert!((sent as f64 - 187_500.0).abs() <= 18_750.0, "{sent}");
}

#[tokio::test]
async fn streaming_is_on_for_a_second_then_off() {
    let _timed = TIMED.lock().await;
    let pod = start().await;
    let mut socket = pod.websocket(&household("streaming")).await;
    send(&mut socket, &ClientMessage::Start { line_mbps: 100.0 }).await;
    let started = Instant::now();
    let mut on = Traffic::default();
    collect(&mut socket, started + Duration::from_millis(1_100), &mut on).await;
    let mut off = Traffic::default();
    collect(&mut socket, started + Duration::from_millis(2_500), &mut off).await;
    // 25 Mbit/s for the first second, nothing after.
    let expected = 25e6 / 8.0;
    assert!((on.bytes as f64 - expected).abs() <= expected * 0.1, "{} bytes, expected {expected}", on.bytes);
    assert_eq!(off.bytes, 0);
    assert!(!off.stats.is_empty(), "stats go on while idle");
}

#[tokio::test]
async fn the_clients_traffic_is_counted_from_start() {
    let _timed = TIMED.lock().await;
    let pod = start().await;
    let mut socket = pod.websocket(&household("videoCall")).await;
    // Before start: not counted.
    socket.send(Message::Binary(vec![0u8; 5_000].into())).await.unwrap();
    send(&mut socket, &ClientMessage::Start { line_mbps: 50.0 }).await;
    for _ in 0..10 {
        socket.send(Message::Binary(vec![0u8; 10_000].into())).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_millis(3_500);
    loop {
        let message = tokio::time::timeout_at(deadline, receive_text(&mut socket)).await.expect("no stats counted it");
        if let ServerMessage::Stats { received_bytes, .. } = message {
            if received_bytes == 100_000 {
                break;
            }
            assert!(received_bytes < 100_000, "{received_bytes}");
        }
    }
    send(&mut socket, &ClientMessage::Start { line_mbps: 50.0 }).await;
    loop {
        match receive_text(&mut socket).await {
            ServerMessage::Error { message } => break assert!(message.contains("already started"), "{message}"),
            ServerMessage::Stats { .. } => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}
