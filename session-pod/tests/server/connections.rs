//! Every limit of the pod's HTTP server, proven on raw sockets: a half-sent
//! head is dropped after the header timeout, a slow body is cut, an idle
//! connection is closed, a connection beyond the cap is refused while the
//! others work, and a WebSocket keeps its place until it closes.

use std::time::{Duration, Instant};

use tidepool_protocol::pod::{ClientMessage, LATENCY_WS_PATH, RESULTS_PATH, ServerMessage, UPLOAD_PATH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const SHORT: Duration = Duration::from_millis(500);

/// Reads until the pod closes the connection: what it sent, and when it closed.
async fn until_closed(stream: &mut TcpStream) -> (String, Instant) {
    let mut text = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await.expect("the pod kept the connection open") {
            Ok(0) | Err(_) => return (String::from_utf8_lossy(&text).into_owned(), Instant::now()),
            Ok(n) => text.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends `GET /health` and reads its answer, leaving the connection open.
async fn health(stream: &mut TcpStream) -> String {
    stream.write_all(b"GET /health HTTP/1.1\r\nhost: pod\r\n\r\n").await.unwrap();
    let mut text = Vec::new();
    let mut buf = [0u8; 1024];
    while !text.ends_with(b"\r\n\r\nok") {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await.expect("no answer").unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&text));
        text.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(text).unwrap()
}

fn close_to(elapsed: Duration, expected: Duration) -> bool {
    elapsed >= expected - Duration::from_millis(50) && elapsed < expected + Duration::from_millis(1500)
}

#[tokio::test]
async fn a_half_sent_head_is_dropped_after_the_header_timeout() {
    let pod = start_with(|config| {
        config.http.header_read_timeout = SHORT;
        config.http.idle_timeout = Duration::from_secs(30);
    })
    .await;
    let mut stream = TcpStream::connect(pod.server.http_addr()).await.unwrap();
    let sent = Instant::now();
    stream.write_all(b"GET /health HTTP/1.1\r\nhost: po").await.unwrap();
    let (answer, closed) = until_closed(&mut stream).await;
    assert_eq!(answer, "", "a head never finished gets no answer");
    assert!(close_to(closed - sent, SHORT), "closed after {:?}", closed - sent);

    // A connection that sends nothing at all has the same time.
    let mut silent = TcpStream::connect(pod.server.http_addr()).await.unwrap();
    let opened = Instant::now();
    let (_, closed) = until_closed(&mut silent).await;
    assert!(close_to(closed - opened, SHORT), "closed after {:?}", closed - opened);

    // A head sent in time is answered.
    let mut prompt = TcpStream::connect(pod.server.http_addr()).await.unwrap();
    assert!(health(&mut prompt).await.starts_with("HTTP/1.1 200"));
    let closed = r#"tidepool_session_connections_closed_total{reason="header_timeout"}"#;
    assert_eq!(metric(&pod, closed).await, 2.0);
}

#[tokio::test]
async fn a_slow_body_is_cut() {
    let pod = start_with(|config| {
        config.http.body_read_timeout = SHORT;
        config.http.header_read_timeout = Duration::from_secs(30);
    })
    .await;
    let (token, ticket) = pod.credentials(SID);
    for path in [RESULTS_PATH, UPLOAD_PATH] {
        let mut stream = TcpStream::connect(pod.server.http_addr()).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: pod\r\nauthorization: Bearer {token}\r\nx-tidepool-binding: {ticket}\r\n\
             content-type: application/json\r\ncontent-length: 1000\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let sent = Instant::now();
        stream.write_all(b"{\"results\":").await.unwrap();
        // Nothing more comes: the pod answers 408 and closes.
        let (answer, closed) = until_closed(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer}");
        assert!(answer.contains("the request body did not come within 0.5 s"), "{path}: {answer}");
        assert!(close_to(closed - sent, SHORT), "{path}: closed after {:?}", closed - sent);
    }

    // An upload that keeps coming, a piece every 300 ms (its pauses within the
    // timeout, though it takes longer in all), is read to its end.
    let body = [7u8; 40];
    let mut stream = TcpStream::connect(pod.server.http_addr()).await.unwrap();
    let head = format!(
        "POST {UPLOAD_PATH} HTTP/1.1\r\nhost: pod\r\nauthorization: Bearer {token}\r\nx-tidepool-binding: {ticket}\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    for piece in body.chunks(10) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream.write_all(piece).await.unwrap();
    }
    let (answer, _) = until_closed(&mut stream).await;
    assert!(answer.starts_with("HTTP/1.1 200") && answer.contains(r#""bytes":40"#), "{answer}");
    assert_eq!(metric(&pod, r#"tidepool_session_refusals_total{reason="body_timeout"}"#).await, 2.0);
}

#[tokio::test]
async fn an_idle_connection_is_closed() {
    let idle = Duration::from_millis(800);
    let pod = start_with(|config| {
        config.http.idle_timeout = idle;
        config.http.header_read_timeout = Duration::from_secs(30);
    })
    .await;
    let mut stream = TcpStream::connect(pod.server.http_addr()).await.unwrap();
    // Requests closer together than the idle timeout keep it open.
    for _ in 0..3 {
        assert!(health(&mut stream).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(idle / 2).await;
    }
    assert!(health(&mut stream).await.starts_with("HTTP/1.1 200"));
    let answered = Instant::now();
    let (rest, closed) = until_closed(&mut stream).await;
    assert_eq!(rest, "");
    assert!(close_to(closed - answered, idle), "closed after {:?}", closed - answered);
    let closed = r#"tidepool_session_connections_closed_total{reason="idle_timeout"}"#;
    assert_eq!(metric(&pod, closed).await, 1.0);
}

#[tokio::test]
async fn a_connection_beyond_the_cap_is_refused_while_the_others_work() {
    let pod = start_with(|config| config.http.max_connections = 2).await;
    let mut first = TcpStream::connect(pod.server.http_addr()).await.unwrap();
    let mut second = TcpStream::connect(pod.server.http_addr()).await.unwrap();
    assert!(health(&mut first).await.starts_with("HTTP/1.1 200"));

    let mut third = TcpStream::connect(pod.server.http_addr()).await.unwrap();
    let started = Instant::now();
    // Whatever it sends, it is closed at once, unanswered.
    let _ = third.write_all(b"GET /health HTTP/1.1\r\nhost: pod\r\n\r\n").await;
    let (answer, closed) = until_closed(&mut third).await;
    assert_eq!(answer, "");
    assert!(closed - started < Duration::from_secs(1), "{:?}", closed - started);

    // The two inside still work.
    assert!(health(&mut second).await.starts_with("HTTP/1.1 200"));
    assert!(health(&mut first).await.starts_with("HTTP/1.1 200"));

    // One closes: a new connection gets its place.
    drop(first);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let mut next = TcpStream::connect(pod.server.http_addr()).await.unwrap();
        let _ = next.write_all(b"GET /health HTTP/1.1\r\nhost: pod\r\nconnection: close\r\n\r\n").await;
        let (answer, _) = until_closed(&mut next).await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "the closed connection's place never freed up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The metrics request needs a place too: free one, and ask until it gets it.
    drop(second);
    let series = r#"tidepool_session_refusals_total{reason="max_connections"}"#;
    let refused = loop {
        if let Ok(response) = pod.http.get(pod.url("/metrics")).send().await {
            break metric_in(&response.text().await.unwrap(), series);
        }
        assert!(Instant::now() < deadline, "no place for the metrics request");
    };
    assert!(refused >= 1.0, "{refused}");
}

/// The open-connections gauge, read on a connection of its own (counted
/// too); `None` when that connection found no place.
async fn open_connections(pod: &Pod) -> Option<f64> {
    let mut stream = TcpStream::connect(pod.server.http_addr()).await.unwrap();
    let _ = stream.write_all(b"GET /metrics HTTP/1.1\r\nhost: pod\r\nconnection: close\r\n\r\n").await;
    let (answer, _) = until_closed(&mut stream).await;
    answer.starts_with("HTTP/1.1 200").then(|| metric_in(&answer, "tidepool_session_open_connections"))
}

#[tokio::test]
async fn a_websocket_keeps_its_place_until_it_closes() {
    let idle = Duration::from_millis(300);
    let pod = start_with(|config| {
        config.http.max_connections = 2;
        config.http.idle_timeout = idle;
    })
    .await;
    let mut socket = pod.websocket(LATENCY_WS_PATH).await;
    // Long past the idle timeout it is open, and counted.
    tokio::time::sleep(idle * 3).await;
    send(&mut socket, &ClientMessage::Ping { seq: 1, client_time_us: 1 }).await;
    assert!(matches!(receive_text(&mut socket).await, ServerMessage::Pong { seq: 1, .. }));
    assert_eq!(open_connections(&pod).await, Some(2.0));

    // With the socket and one more open, a third is refused.
    let mut second = TcpStream::connect(pod.server.http_addr()).await.unwrap();
    assert!(health(&mut second).await.starts_with("HTTP/1.1 200"));
    let mut third = TcpStream::connect(pod.server.http_addr()).await.unwrap();
    let (answer, _) = until_closed(&mut third).await;
    assert_eq!(answer, "");
    drop(second);

    // Closed, it gives its place back.
    drop(socket);
    let deadline = Instant::now() + PATIENCE;
    while open_connections(&pod).await != Some(1.0) {
        assert!(Instant::now() < deadline, "the socket's place never freed up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
