//! Each limit, proven against a real server on loopback.

use std::sync::Mutex;
use std::time::Instant;

use axum::body::Bytes;
use axum::http::StatusCode;
use axum::routing::{get, post};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

const SHORT: Duration = Duration::from_millis(300);

struct Server {
    addr: SocketAddr,
    refusals: Arc<Mutex<Vec<Refusal>>>,
}

async fn start(limits: Limits) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(600)).await;
                "done"
            }),
        )
        .route(
            "/echo",
            post(|body: Result<Bytes, axum::extract::rejection::BytesRejection>| async move {
                match body {
                    Ok(body) => (StatusCode::OK, format!("{} bytes", body.len())),
                    Err(e) => (StatusCode::REQUEST_TIMEOUT, e.body_text()),
                }
            }),
        );
    let refusals = Arc::new(Mutex::new(Vec::new()));
    let seen = refusals.clone();
    let on_refusal: OnRefusal = Arc::new(move |r| seen.lock().unwrap().push(r));
    tokio::spawn(serve(listener, router, limits, on_refusal, std::future::pending(), Duration::from_secs(1)));
    Server { addr, refusals }
}

/// Reads until the server closes; how long that took, and what came.
async fn until_closed(stream: &mut TcpStream, limit: Duration) -> Option<(Duration, String)> {
    let started = Instant::now();
    let mut text = Vec::new();
    match tokio::time::timeout(limit, stream.read_to_end(&mut text)).await {
        Ok(_) => Some((started.elapsed(), String::from_utf8_lossy(&text).to_string())),
        Err(_) => None,
    }
}

async fn get_ok(stream: &mut TcpStream) -> String {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    let mut buffer = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer)).await.unwrap().unwrap();
    String::from_utf8_lossy(&buffer[..n]).to_string()
}

#[tokio::test]
async fn a_half_sent_header_is_dropped_after_the_header_timeout() {
    let server = start(Limits { header_timeout: SHORT, ..Limits::default() }).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ").await.unwrap();
    let (took, _) = until_closed(&mut stream, Duration::from_secs(5)).await.expect("the server closes it");
    assert!(took >= SHORT - Duration::from_millis(50), "closed after {took:?}");
}

#[tokio::test]
async fn a_slow_body_is_cut_at_the_body_timeout() {
    let server = start(Limits { body_timeout: SHORT, ..Limits::default() }).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789").await.unwrap();
    let started = Instant::now();
    let mut buffer = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&buffer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() >= SHORT - Duration::from_millis(50));
    assert_eq!(server.refusals.lock().unwrap().as_slice(), [Refusal::SlowBody]);
    // A body that arrives in time is read whole.
    let mut quick = TcpStream::connect(server.addr).await.unwrap();
    quick.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc").await.unwrap();
    let n = quick.read(&mut buffer).await.unwrap();
    assert!(String::from_utf8_lossy(&buffer[..n]).contains("3 bytes"));
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_but_a_long_request_is_not() {
    let server = start(Limits { idle_timeout: SHORT, ..Limits::default() }).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    assert!(get_ok(&mut stream).await.starts_with("HTTP/1.1 200"));
    let (took, _) = until_closed(&mut stream, Duration::from_secs(5)).await.expect("the idle connection is closed");
    assert!(took >= SHORT - Duration::from_millis(100), "closed after {took:?}");
    assert!(server.refusals.lock().unwrap().contains(&Refusal::Idle));
    // A request that takes longer than the idle timeout is no idleness.
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    let mut buffer = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buffer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&buffer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("done"), "{answer}");
}

#[tokio::test]
async fn a_connection_beyond_the_cap_is_closed_and_the_others_are_served() {
    let server = start(Limits { max_connections: 2, ..Limits::default() }).await;
    let mut first = TcpStream::connect(server.addr).await.unwrap();
    let mut second = TcpStream::connect(server.addr).await.unwrap();
    // Make sure both are accepted before the third arrives.
    assert!(get_ok(&mut first).await.starts_with("HTTP/1.1 200"));
    assert!(get_ok(&mut second).await.starts_with("HTTP/1.1 200"));
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let (took, answer) = until_closed(&mut third, Duration::from_secs(2)).await.expect("closed at once");
    assert!(answer.is_empty() && took < Duration::from_secs(1), "{answer:?} after {took:?}");
    assert_eq!(server.refusals.lock().unwrap().as_slice(), [Refusal::ConnectionCap]);
    assert!(get_ok(&mut first).await.starts_with("HTTP/1.1 200"));
    // A closed connection frees its place.
    drop(second);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fourth = TcpStream::connect(server.addr).await.unwrap();
    assert!(get_ok(&mut fourth).await.starts_with("HTTP/1.1 200"));
}
