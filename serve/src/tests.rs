//! Each limit and hook, proven against a real server on loopback.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Extension, Request};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::*;

const SHORT: Duration = Duration::from_millis(300);

/// What a test server reported.
#[derive(Clone, Default)]
struct Seen {
    refusals: Arc<Mutex<Vec<Refusal>>>,
    open: Arc<AtomicI64>,
}

impl Seen {
    fn refusals(&self) -> Vec<Refusal> {
        self.refusals.lock().unwrap().clone()
    }
}

struct TestServer {
    addr: SocketAddr,
    seen: Seen,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

/// A peer's port, as a connection hook adds it.
#[derive(Clone, Copy)]
struct PeerPort(u16);

fn router() -> Router {
    Router::new()
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
        )
        // Answers at once and never reads the body, as a refusal does.
        .route("/early", post(|| async { "early" }))
        .route("/port", get(|Extension(PeerPort(port)): Extension<PeerPort>| async move { format!("port {port}") }))
        .route("/upgrade", get(upgrade))
        // Bytes for as long as the client takes them, as a download gives.
        .route(
            "/flood",
            get(|| async {
                let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
                let endless = futures_util::stream::repeat_with(move || Ok::<_, std::io::Error>(chunk.clone()));
                axum::body::Body::from_stream(endless)
            }),
        )
}

/// Upgrades, then holds the socket until the client closes it.
async fn upgrade(mut request: Request) -> Response {
    let upgrading = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        if let Ok(upgraded) = upgrading.await {
            let mut io = hyper_util::rt::TokioIo::new(upgraded);
            let mut sink = Vec::new();
            let _ = io.read_to_end(&mut sink).await;
        }
    });
    (StatusCode::SWITCHING_PROTOCOLS, [(header::CONNECTION, "upgrade"), (header::UPGRADE, "test")]).into_response()
}

async fn start_with(limits: Limits, tune: impl FnOnce(Server) -> Server) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Seen::default();
    let (refusals, open) = (seen.refusals.clone(), seen.open.clone());
    let server = Server::new(limits)
        .grace(Duration::from_secs(1))
        .on_refusal(move |r| refusals.lock().unwrap().push(r))
        .on_open_change(move |change| {
            open.fetch_add(change, Ordering::Relaxed);
        })
        .on_connection(|_, peer| {
            let mut extensions = axum::http::Extensions::new();
            extensions.insert(PeerPort(peer.port()));
            extensions
        });
    let (stop, stopped) = oneshot::channel();
    let server = tune(server);
    let done = tokio::spawn(server.serve(listener, router(), async {
        let _ = stopped.await;
    }));
    TestServer { addr, seen, stop: Some(stop), done }
}

async fn start(limits: Limits) -> TestServer {
    start_with(limits, |server| server).await
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

async fn get_path(stream: &mut TcpStream, path: &str) -> String {
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes()).await.unwrap();
    let mut buffer = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer)).await.unwrap().unwrap();
    String::from_utf8_lossy(&buffer[..n]).to_string()
}

async fn get_ok(stream: &mut TcpStream) -> String {
    get_path(stream, "/").await
}

/// Waits until the server's count of open connections is `expected`.
async fn open_becomes(seen: &Seen, expected: i64) {
    let deadline = Instant::now() + Duration::from_secs(2);
    while seen.open.load(Ordering::Relaxed) != expected {
        assert!(Instant::now() < deadline, "open: {} not {expected}", seen.open.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn an_answer_before_the_body_is_read_reaches_the_client_without_a_reset() {
    let server = start(Limits::default()).await;
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    const BODY: usize = 4 * 1024 * 1024;
    // The client sends its whole body whatever the answer, as an upload does.
    let sending = tokio::spawn(async move {
        let head = format!("POST /early HTTP/1.1\r\nHost: t\r\nContent-Length: {BODY}\r\n\r\n");
        writer.write_all(head.as_bytes()).await?;
        writer.write_all(&vec![b'x'; BODY]).await?;
        writer.shutdown().await
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), reader.read_to_end(&mut answer)).await.unwrap();
    // The answer, then a clean end: no reset, which would have cut the read
    // (or the body's sending) with ECONNRESET.
    assert!(read.is_ok(), "the read ended with {read:?}");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("early"), "{answer}");
    let sent = tokio::time::timeout(Duration::from_secs(5), sending).await.unwrap().unwrap();
    assert!(sent.is_ok(), "sending the body met {sent:?}");
}

/// A request for an answer that never ends.
const GET_FLOOD: &[u8] = b"GET /flood HTTP/1.1\r\nHost: t\r\n\r\n";

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_after_the_write_timeout_and_one_that_reads_is_not() {
    let server = start(Limits { write_timeout: SHORT, ..Limits::default() }).await;
    // A client that asks for a download and reads a little, then nothing:
    // the socket's buffers fill and the server's writes wait on it.
    let mut stalled = TcpStream::connect(server.addr).await.unwrap();
    stalled.write_all(GET_FLOOD).await.unwrap();
    let mut buffer = vec![0u8; 64 * 1024];
    let _ = tokio::time::timeout(Duration::from_secs(2), stalled.read(&mut buffer)).await.unwrap().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.seen.refusals().is_empty() {
        assert!(Instant::now() < deadline, "the stalled client was never cut");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.seen.refusals(), [Refusal::WriteStalled]);
    // Its place under the cap is given back.
    open_becomes(&server.seen, 0).await;
    // A client that goes on reading, however long, is never cut: it reads
    // for four write timeouts.
    let mut reading = TcpStream::connect(server.addr).await.unwrap();
    reading.write_all(GET_FLOOD).await.unwrap();
    let until = Instant::now() + SHORT * 4;
    let mut read = 0usize;
    while Instant::now() < until {
        let n = tokio::time::timeout(Duration::from_secs(2), reading.read(&mut buffer)).await.unwrap().unwrap();
        assert!(n > 0, "the server closed a reading client");
        read += n;
    }
    assert!(read > 1 << 20, "read {read} bytes");
    assert_eq!(server.seen.refusals(), [Refusal::WriteStalled]);
}

#[tokio::test]
async fn a_half_sent_head_or_none_is_dropped_after_the_header_timeout() {
    let server = start(Limits { header_timeout: SHORT, ..Limits::default() }).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: ").await.unwrap();
    let (took, answer) = until_closed(&mut stream, Duration::from_secs(5)).await.expect("the server closes it");
    assert!(took >= SHORT - Duration::from_millis(50), "closed after {took:?}");
    assert_eq!(answer, "");
    // A connection that sends nothing has the same time, from the accept.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let (took, _) = until_closed(&mut silent, Duration::from_secs(5)).await.expect("the server closes it");
    assert!(took >= SHORT - Duration::from_millis(50) && took < Duration::from_secs(2), "closed after {took:?}");
    assert_eq!(server.seen.refusals(), [Refusal::HeaderTimeout, Refusal::HeaderTimeout]);
}

#[tokio::test]
async fn a_kept_alive_connection_waits_the_idle_timeout_not_the_header_timeout() {
    // hyper's own header timer would close this one at the header timeout.
    let server = start(Limits { header_timeout: SHORT, idle_timeout: SHORT * 3, ..Limits::default() }).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    assert!(get_ok(&mut stream).await.starts_with("HTTP/1.1 200"));
    let (took, _) = until_closed(&mut stream, Duration::from_secs(5)).await.expect("closed when idle");
    assert!(took >= SHORT * 3 - Duration::from_millis(50), "closed after {took:?}");
    assert_eq!(server.seen.refusals(), [Refusal::Idle]);
}

#[tokio::test]
async fn a_whole_body_too_slow_is_cut() {
    let server = start(Limits { body_timeout: BodyTimeout::Whole(SHORT), ..Limits::default() }).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n0123456789").await.unwrap();
    let started = Instant::now();
    let mut buffer = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&buffer[..n]).to_string();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() >= SHORT - Duration::from_millis(50));
    assert_eq!(server.seen.refusals(), [Refusal::SlowBody]);
    // A body that arrives in time is read whole.
    let mut quick = TcpStream::connect(server.addr).await.unwrap();
    quick.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc").await.unwrap();
    let n = quick.read(&mut buffer).await.unwrap();
    assert!(String::from_utf8_lossy(&buffer[..n]).contains("3 bytes"));
    // Pieces that never pause long are still cut when the whole is late.
    let mut trickle = TcpStream::connect(server.addr).await.unwrap();
    trickle.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\n\r\n").await.unwrap();
    for _ in 0..8 {
        tokio::time::sleep(SHORT / 4).await;
        if trickle.write_all(b"x").await.is_err() {
            break;
        }
    }
    let (_, answer) = until_closed(&mut trickle, Duration::from_secs(5)).await.expect("closed");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
}

#[tokio::test]
async fn a_pausing_body_may_take_longer_than_the_timeout_but_not_stop() {
    let server = start(Limits { body_timeout: BodyTimeout::Pause(SHORT), ..Limits::default() }).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\n\r\n").await.unwrap();
    for _ in 0..8 {
        tokio::time::sleep(SHORT / 3).await;
        stream.write_all(b"x").await.unwrap();
    }
    let mut buffer = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buffer[..n]).contains("8 bytes"));
    assert_eq!(server.seen.refusals(), []);
    stream.write_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 8\r\n\r\nxx").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 408"));
    assert_eq!(server.seen.refusals(), [Refusal::SlowBody]);
}

#[tokio::test]
async fn an_idle_kept_alive_connection_is_closed_but_a_long_request_is_not() {
    let server = start(Limits { idle_timeout: SHORT, ..Limits::default() }).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    assert!(get_ok(&mut stream).await.starts_with("HTTP/1.1 200"));
    let (took, _) = until_closed(&mut stream, Duration::from_secs(5)).await.expect("the idle connection is closed");
    assert!(took >= SHORT - Duration::from_millis(100), "closed after {took:?}");
    assert!(server.seen.refusals().contains(&Refusal::Idle));
    // A request that takes longer than the idle timeout is no idleness.
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    let answer = get_path(&mut slow, "/slow").await;
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
    assert_eq!(server.seen.open.load(Ordering::Relaxed), 2);
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    let _ = third.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
    let (took, answer) = until_closed(&mut third, Duration::from_secs(2)).await.expect("closed at once");
    assert!(answer.is_empty() && took < Duration::from_secs(1), "{answer:?} after {took:?}");
    assert_eq!(server.seen.refusals(), [Refusal::ConnectionCap]);
    assert!(get_ok(&mut first).await.starts_with("HTTP/1.1 200"));
    // A closed connection frees its place.
    drop(second);
    open_becomes(&server.seen, 1).await;
    let mut fourth = TcpStream::connect(server.addr).await.unwrap();
    assert!(get_ok(&mut fourth).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn an_upgraded_socket_keeps_its_place_until_it_closes() {
    let server = start(Limits { max_connections: 1, idle_timeout: SHORT, ..Limits::default() }).await;
    let mut upgraded = TcpStream::connect(server.addr).await.unwrap();
    upgraded
        .write_all(b"GET /upgrade HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: test\r\n\r\n")
        .await
        .unwrap();
    let mut buffer = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(2), upgraded.read(&mut buffer)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 101"));
    // Past the idle timeout, the socket is still open and still counted.
    tokio::time::sleep(SHORT * 2).await;
    assert_eq!(server.seen.open.load(Ordering::Relaxed), 1);
    let mut other = TcpStream::connect(server.addr).await.unwrap();
    let (_, answer) = until_closed(&mut other, Duration::from_secs(2)).await.expect("refused");
    assert_eq!(answer, "");
    assert_eq!(server.seen.refusals(), [Refusal::ConnectionCap]);
    drop(upgraded);
    open_becomes(&server.seen, 0).await;
    let mut next = TcpStream::connect(server.addr).await.unwrap();
    assert!(get_ok(&mut next).await.starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn the_hooks_add_extensions_and_tune_hyper() {
    let server = start_with(Limits::default(), |server| {
        server.tune_http1(|http| {
            // What hyper would need a timer for: ignored.
            http.header_read_timeout(Duration::from_millis(1)).max_buf_size(8192);
        })
    })
    .await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let port = stream.local_addr().unwrap().port();
    assert!(get_path(&mut stream, "/port").await.ends_with(&format!("port {port}")));
    // Past hyper's buffer, a head is too large.
    let mut big = TcpStream::connect(server.addr).await.unwrap();
    let head = format!("GET / HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n", "x".repeat(16 * 1024));
    let _ = big.write_all(head.as_bytes()).await;
    let (_, answer) = until_closed(&mut big, Duration::from_secs(2)).await.expect("closed");
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test]
async fn at_shutdown_open_requests_finish_within_the_grace() {
    let mut server = start(Limits::default()).await;
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    let mut waiting = TcpStream::connect(server.addr).await.unwrap();
    open_becomes(&server.seen, 2).await;
    let stopped = Instant::now();
    let _ = server.stop.take().unwrap().send(());
    // The request going on is answered; the connection waiting is closed.
    let (_, answer) = until_closed(&mut slow, Duration::from_secs(3)).await.expect("closed after its answer");
    assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("done"), "{answer}");
    let (_, answer) = until_closed(&mut waiting, Duration::from_secs(3)).await.expect("closed");
    assert_eq!(answer, "");
    tokio::time::timeout(Duration::from_secs(3), server.done).await.unwrap().unwrap();
    assert!(stopped.elapsed() < Duration::from_secs(2), "{:?}", stopped.elapsed());
    assert!(TcpStream::connect(server.addr).await.is_err());
}

#[tokio::test]
async fn at_shutdown_a_request_past_the_grace_is_cut() {
    let mut server = start_with(Limits::default(), |server| server.grace(Duration::from_millis(100))).await;
    let mut slow = TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n").await.unwrap();
    open_becomes(&server.seen, 1).await;
    let stopped = Instant::now();
    let _ = server.stop.take().unwrap().send(());
    let (_, answer) = until_closed(&mut slow, Duration::from_secs(3)).await.expect("cut");
    assert_eq!(answer, "");
    tokio::time::timeout(Duration::from_secs(3), server.done).await.unwrap().unwrap();
    assert!(stopped.elapsed() < Duration::from_millis(500), "{:?}", stopped.elapsed());
    assert_eq!(server.seen.open.load(Ordering::Relaxed), 0);
}

#[test]
fn every_refusal_has_its_label() {
    let labels: Vec<&str> = Refusal::ALL.iter().map(|r| r.reason()).collect();
    assert_eq!(labels, ["connection_cap", "header_timeout", "idle", "slow_body", "tls_handshake", "write_stalled"]);
}
