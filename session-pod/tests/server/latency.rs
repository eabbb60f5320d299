//! The latency WebSocket: pongs, the ping rate limit, garbage, terminate.

use std::time::Duration;

use tidepool_protocol::pod::{ClientMessage, LATENCY_WS_PATH, MAX_PING_HZ, ServerMessage};

use crate::support::*;

#[tokio::test]
async fn pongs_say_who_answered_and_when() {
    let pod = start().await;
    let mut socket = pod.websocket(LATENCY_WS_PATH).await;
    let before = unix_micros();
    send(&mut socket, &ClientMessage::Ping { seq: 7, client_time_us: 123_456 }).await;
    let ServerMessage::Pong { seq, client_time_us, server_time_us, pod: name, region, session_id } =
        receive_text(&mut socket).await
    else {
        panic!("not a pong")
    };
    let after = unix_micros();
    assert_eq!((seq, client_time_us), (7, 123_456));
    assert!((before..=after).contains(&server_time_us), "{before} <= {server_time_us} <= {after}");
    assert_eq!((name.as_str(), region.as_str(), session_id.as_str()), (POD, REGION, SID));
}

#[tokio::test]
async fn pings_beyond_the_rate_get_errors() {
    let pod = start().await;
    let mut socket = pod.websocket(LATENCY_WS_PATH).await;
    let burst = 2 * MAX_PING_HZ as u64;
    for seq in 0..burst {
        ping(&mut socket, seq).await;
    }
    let (mut pongs, mut refusals) = (0, 0);
    for _ in 0..burst {
        match receive_text(&mut socket).await {
            ServerMessage::Pong { .. } => pongs += 1,
            ServerMessage::Error { message } => {
                assert!(message.contains("pings a second"), "{message}");
                refusals += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // A full bucket, plus what refilled while the burst was read.
    assert!((MAX_PING_HZ as u64..MAX_PING_HZ as u64 + 20).contains(&pongs), "{pongs} pongs");
    assert_eq!(pongs + refusals, burst);
}

#[tokio::test]
async fn garbage_gets_an_error_and_the_socket_stays_up() {
    let pod = start().await;
    let mut socket = pod.websocket(LATENCY_WS_PATH).await;
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    for garbage in [Message::Text("{not json".into()), Message::Text(r#"{"type":"dance"}"#.into())] {
        socket.send(garbage).await.unwrap();
        assert!(matches!(receive_text(&mut socket).await, ServerMessage::Error { .. }));
    }
    socket.send(Message::Binary(vec![1, 2, 3].into())).await.unwrap();
    assert!(matches!(receive_text(&mut socket).await, ServerMessage::Error { .. }));
    send(&mut socket, &ClientMessage::Start { line_mbps: 10.0 }).await;
    assert!(matches!(receive_text(&mut socket).await, ServerMessage::Error { .. }));
    ping(&mut socket, 1).await;
    assert!(matches!(receive_text(&mut socket).await, ServerMessage::Pong { seq: 1, .. }));
}

#[tokio::test]
async fn terminate_answers_closes_and_asks_for_exit() {
    let pod = start().await;
    let mut socket = pod.websocket(LATENCY_WS_PATH).await;
    // Not before the client asks.
    let early = tokio::time::timeout(Duration::from_millis(100), pod.server.terminate_requested()).await;
    assert!(early.is_err());
    send(&mut socket, &ClientMessage::Terminate).await;
    assert_eq!(receive_text(&mut socket).await, ServerMessage::Terminating { pod: POD.into() });
    assert!(matches!(receive(&mut socket).await, Received::Closed));
    tokio::time::timeout(PATIENCE, pod.server.terminate_requested()).await.expect("no exit was asked for");
}

#[tokio::test]
async fn shutdown_closes_sockets_as_going_away() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let pod = start().await;
    let addr = pod.server.http_addr();
    let mut socket = pod.websocket(LATENCY_WS_PATH).await;
    tokio::time::timeout(PATIENCE, pod.server.shutdown()).await.expect("shutdown hung");
    match tokio::time::timeout(PATIENCE, socket.next()).await.unwrap() {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(frame.code, CloseCode::Away),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "still accepting");
}
