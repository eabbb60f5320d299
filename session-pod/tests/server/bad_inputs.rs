//! A catalogue of hostile inputs to one pod: probe requests, results bodies,
//! credentials, routes, WebSocket frames on the latency and household
//! sockets, UDP datagrams and slow connections. Each is answered with a
//! clear error (or dropped, for UDP), moves its reason's counter in
//! /metrics, and changes nothing: the pod still serves its session and its
//! results are the ones it had.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::json;
use tidepool_crds::test_session::{ProbeKind, ProbeTarget};
use tidepool_protocol::BINDING_HEADER;
use tidepool_protocol::pod::{
    ClientMessage, DOWNLOAD_PATH, INFO_PATH, LATENCY_WS_PATH, PROBES_PATH, RESULTS_PATH, ServerMessage, UDP_GRANT_PATH,
    UdpGrant, UdpProbe, probes_digest,
};
use tidepool_protocol::results::ResultsAccepted;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::*;

/// What the catalogue expects each input to move in /metrics.
#[derive(Default)]
struct Expected {
    /// Series, and how many inputs should have moved it.
    counts: BTreeMap<String, u32>,
    inputs: u32,
}

impl Expected {
    fn refusal(&mut self, reason: &str) {
        self.moves(format!(r#"tidepool_session_refusals_total{{reason="{reason}"}}"#));
    }

    fn udp(&mut self, outcome: &str) {
        self.moves(format!(r#"tidepool_session_udp_datagrams_total{{outcome="{outcome}"}}"#));
    }

    fn moves(&mut self, series: String) {
        self.moves_by(series, 1);
    }

    /// One input that moves `series` by `count` (a burst of pings, say).
    fn moves_by(&mut self, series: String, count: u32) {
        *self.counts.entry(series).or_default() += count;
        self.inputs += 1;
    }
}

/// A refusal with a JSON body that says why, the status expected, and the reason it counts under.
async fn refused(expected: &mut Expected, response: reqwest::Response, status: StatusCode, reason: &str) -> String {
    let (got, message) = refusal(response).await;
    assert_eq!(got, status, "{reason}: {message}");
    assert!(message.len() > 10, "{reason}: an unclear error {message:?}");
    expected.refusal(reason);
    message
}

fn tcp_target(port: i32) -> ProbeTarget {
    ProbeTarget { kind: ProbeKind::Tcp, url: None, host: Some("127.0.0.1".into()), port: Some(port) }
}

/// The next `error` frame, past pongs, stats and binary frames.
async fn next_error(socket: &mut Socket) -> String {
    loop {
        if let ServerMessage::Error { message } = receive_text(socket).await {
            return message;
        }
    }
}

/// Sends `datagram` from `socket` and says whether anything came back.
async fn echoed(socket: &UdpSocket, datagram: &[u8]) -> bool {
    socket.send(datagram).await.unwrap();
    let mut buffer = [0u8; 2048];
    tokio::time::timeout(Duration::from_millis(300), socket.recv(&mut buffer)).await.is_ok()
}

fn udp_probe(cookie: u64, seq: u32, len: usize) -> Vec<u8> {
    let mut datagram = vec![0u8; len];
    UdpProbe { cookie, seq, client_time_us: 1, server_time_us: 0 }.write(&mut datagram).unwrap();
    datagram
}

async fn udp_from(local: &str, pod: &Pod) -> UdpSocket {
    let socket = UdpSocket::bind((local, 0)).await.unwrap();
    socket.connect(("127.0.0.1", pod.server.udp_addr().port())).await.unwrap();
    socket
}

#[tokio::test]
async fn every_bad_input_is_refused_counted_and_changes_nothing() {
    let pod = start_with(|config| {
        config.http.header_read_timeout = Duration::from_secs(1);
        config.http.body_read_timeout = Duration::from_secs(1);
        config.udp_caps.packets_per_session = 2;
    })
    .await;
    let mut expected = Expected::default();

    // The session binds with a token that names its probe targets, and has results.
    let targets = vec![tcp_target(1)];
    let mut session_claims = claims(SID, unix_now() + 3600);
    session_claims.probes = probes_digest(&targets);
    let (token, ticket) = (pod.key.sign_session(&session_claims), pod.key.sign_binding(SID, POD));
    let results = json!({"results": {"latency": {"p50Ms": 9.0, "p95Ms": 12.0, "p99Ms": 15.0, "jitterMs": 1.0,
        "lossPercent": 0.0, "samples": 50}, "downloadMbps": 95.0}});
    let first = pod.http.post(pod.url(RESULTS_PATH)).bearer_auth(&token).header(BINDING_HEADER, &ticket);
    let _: ResultsAccepted = json(first.json_body(&results).send().await.unwrap()).await;
    let kept = pod.server.latest_results().expect("the session's results");
    let before = pod.http.get(pod.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let probes = || pod.post(PROBES_PATH);

    // Probe requests.
    let answer = probes().header("content-type", "application/json").body(r#"{"targets":"#).send().await.unwrap();
    refused(&mut expected, answer, StatusCode::BAD_REQUEST, "bad_json").await;
    let answer = probes().json_body(&json!({"targets": "everything"})).send().await.unwrap();
    let message = refused(&mut expected, answer, StatusCode::UNPROCESSABLE_ENTITY, "bad_field").await;
    assert!(message.starts_with("targets: "), "{message}");
    let answer = probes().json_body(&json!({"targets": [tcp_target(22)]})).send().await.unwrap();
    refused(&mut expected, answer, StatusCode::FORBIDDEN, "probe_targets").await;
    let answer = probes().json_body(&json!({"targets": [], "tier": 1})).send().await.unwrap();
    refused(&mut expected, answer, StatusCode::UNPROCESSABLE_ENTITY, "probe_targets").await;
    let answer = probes().json_body(&json!({"targets": targets, "tier": 9})).send().await.unwrap();
    refused(&mut expected, answer, StatusCode::UNPROCESSABLE_ENTITY, "probe_tier").await;
    let answer = probes().json_body(&json!({"targets": targets, "tier": 3})).send().await.unwrap();
    refused(&mut expected, answer, StatusCode::FORBIDDEN, "probe_tier").await;
    let every = pod.post(&format!("{PROBES_PATH}?everySeconds=1")).json_body(&json!({"targets": targets}));
    refused(&mut expected, every.send().await.unwrap(), StatusCode::UNPROCESSABLE_ENTITY, "probe_interval").await;
    let every = pod.post(&format!("{PROBES_PATH}?everySeconds=soon")).json_body(&json!({"targets": targets}));
    refused(&mut expected, every.send().await.unwrap(), StatusCode::BAD_REQUEST, "bad_query").await;
    let huge = format!(r#"{{"targets":[],"pad":"{}"}}"#, "x".repeat(200 * 1024));
    let answer = probes().header("content-type", "application/json").body(huge).send().await.unwrap();
    refused(&mut expected, answer, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large").await;

    // Results bodies.
    let answer = pod.post(RESULTS_PATH).body("results=please").send().await.unwrap();
    refused(&mut expected, answer, StatusCode::BAD_REQUEST, "bad_json").await;
    let nan = json!({"results": {"latency": {"p50Ms": null, "p95Ms": 1, "p99Ms": 1, "jitterMs": 1, "lossPercent": 0, "samples": 1}}});
    let answer = pod.post(RESULTS_PATH).json_body(&nan).send().await.unwrap();
    let message = refused(&mut expected, answer, StatusCode::UNPROCESSABLE_ENTITY, "bad_field").await;
    assert!(message.starts_with("results.latency.p50Ms"), "{message}");
    let negative = json!({"results": {"downloadMbps": -5.0}});
    let answer = pod.post(RESULTS_PATH).json_body(&negative).send().await.unwrap();
    refused(&mut expected, answer, StatusCode::UNPROCESSABLE_ENTITY, "invalid_results").await;
    let oversized = format!(r#"{{"results":{{}},"pad":"{}"}}"#, "y".repeat(300 * 1024));
    let answer = pod.post(RESULTS_PATH).header("content-type", "application/json").body(oversized).send().await;
    refused(&mut expected, answer.unwrap(), StatusCode::PAYLOAD_TOO_LARGE, "body_too_large").await;

    // Credentials.
    let answer = pod.http.get(pod.url(INFO_PATH)).send().await.unwrap();
    refused(&mut expected, answer, StatusCode::UNAUTHORIZED, "unauthenticated").await;
    let forged = pod.http.get(pod.url(INFO_PATH)).bearer_auth("not.a.token").header(BINDING_HEADER, &ticket);
    refused(&mut expected, forged.send().await.unwrap(), StatusCode::UNAUTHORIZED, "unauthenticated").await;
    let (mallory, mallory_ticket) = pod.credentials("sid-mallory");
    let other = pod.http.post(pod.url(RESULTS_PATH)).bearer_auth(mallory).header(BINDING_HEADER, mallory_ticket);
    refused(&mut expected, other.json_body(&results).send().await.unwrap(), StatusCode::FORBIDDEN, "other_session")
        .await;

    // Streams and routes.
    for query in ["seconds=0", "seconds=lots", "seconds=1&seconds=2"] {
        let answer = pod.get(&format!("{DOWNLOAD_PATH}?{query}")).send().await.unwrap();
        refused(&mut expected, answer, StatusCode::BAD_REQUEST, "bad_query").await;
    }
    let answer = pod.get("/../../etc/passwd").send().await.unwrap();
    refused(&mut expected, answer, StatusCode::NOT_FOUND, "no_such_route").await;
    let answer = pod.request(reqwest::Method::DELETE, RESULTS_PATH).send().await.unwrap();
    refused(&mut expected, answer, StatusCode::METHOD_NOT_ALLOWED, "wrong_method").await;
    let answer = pod.get(LATENCY_WS_PATH).send().await.unwrap();
    refused(&mut expected, answer, StatusCode::BAD_REQUEST, "not_websocket").await;
    let answer = pod.get("/ws/household/grandma").send().await.unwrap();
    refused(&mut expected, answer, StatusCode::NOT_FOUND, "no_such_user").await;

    // The latency socket: each bad frame gets an error frame, and the socket stays up.
    let mut socket = pod.websocket(LATENCY_WS_PATH).await;
    socket.send(Message::Binary(vec![0xde, 0xad].into())).await.unwrap();
    assert!(next_error(&mut socket).await.contains("binary frames"));
    expected.refusal("ws_binary");
    socket.send(Message::Text("{\"type\":\"ping\",".into())).await.unwrap();
    assert!(next_error(&mut socket).await.starts_with("not a client message: "));
    expected.refusal("ws_bad_message");
    socket.send(Message::Text(r#"{"type":"shutdown","now":true}"#.into())).await.unwrap();
    assert!(next_error(&mut socket).await.contains("unknown variant `shutdown`"));
    expected.refusal("ws_bad_message");
    send(&mut socket, &ClientMessage::Start { line_mbps: 100.0 }).await;
    assert!(next_error(&mut socket).await.contains("household sockets"));
    expected.refusal("ws_bad_start");
    for seq in 0..150 {
        ping(&mut socket, seq).await;
    }
    let mut too_fast = 0;
    for _ in 0..150 {
        if let ServerMessage::Error { message } = receive_text(&mut socket).await {
            assert!(message.contains("pings a second"), "{message}");
            too_fast += 1;
        }
    }
    assert!(too_fast > 0, "150 pings at once all answered");
    expected.moves_by(r#"tidepool_session_refusals_total{reason="ws_ping_rate"}"#.into(), too_fast);
    drop(socket);
    // A frame over the size limit closes the socket with 1009 (or the reset
    // that follows the close reaches the client first).
    let mut socket = pod.websocket(LATENCY_WS_PATH).await;
    let _ = socket.send(Message::Text("z".repeat(2 * 1024 * 1024).into())).await;
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match socket.next().await {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("the oversized frame's socket stayed open");
    assert!(matches!(closed, None | Some(CloseCode::Size)), "{closed:?}");
    expected.refusal("ws_bad_frame");

    // A household socket.
    let mut household = pod.websocket("/ws/household/gaming").await;
    send(&mut household, &ClientMessage::Start { line_mbps: -1.0 }).await;
    assert!(next_error(&mut household).await.contains("lineMbps must be a positive number"));
    expected.refusal("ws_bad_start");
    household.send(Message::Text("[1,2,3]".into())).await.unwrap();
    assert!(next_error(&mut household).await.starts_with("not a client message: "));
    expected.refusal("ws_bad_message");
    send(&mut household, &ClientMessage::Start { line_mbps: 10.0 }).await;
    send(&mut household, &ClientMessage::Start { line_mbps: 10.0 }).await;
    assert!(next_error(&mut household).await.contains("traffic already started"));
    expected.refusal("ws_bad_start");
    drop(household);

    // UDP datagrams: dropped, never answered.
    let grant: UdpGrant = json(pod.post(UDP_GRANT_PATH).send().await.unwrap()).await;
    let udp = udp_from("127.0.0.1", &pod).await;
    assert!(!echoed(&udp, &udp_probe(grant.cookie, 1, 64)[..20]).await);
    expected.udp("bad_size");
    let mut long = udp_probe(grant.cookie, 2, 1472);
    long.extend([0u8; 28]);
    assert!(!echoed(&udp, &long).await);
    expected.udp("bad_size");
    let mut magic = udp_probe(grant.cookie, 3, 64);
    magic[..4].copy_from_slice(b"TPU2");
    assert!(!echoed(&udp, &magic).await);
    expected.udp("bad_magic");
    assert!(!echoed(&udp, &udp_probe(grant.cookie.wrapping_add(1), 4, 64)).await);
    expected.udp("bad_cookie");
    // The grant's cookie from another address: a spoofed source.
    let spoofed = udp_from("127.0.0.2", &pod).await;
    assert!(!echoed(&spoofed, &udp_probe(grant.cookie, 5, 64)).await);
    expected.udp("wrong_source");
    // Past the session's cap (2 datagrams here), good ones are dropped too.
    assert!(echoed(&udp, &udp_probe(grant.cookie, 6, 64)).await);
    assert!(echoed(&udp, &udp_probe(grant.cookie, 7, 64)).await);
    assert!(!echoed(&udp, &udp_probe(grant.cookie, 8, 64)).await);
    expected.udp("session_limit");

    // Slow connections: a head that stops, a body that stops.
    let mut stream = TcpStream::connect(pod.server.http_addr()).await.unwrap();
    stream.write_all(b"POST /api/v1/results HTTP/1.1\r\nhost: pod\r\ncontent-le").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut rest)).await.expect("the head never timed out").unwrap();
    assert!(rest.is_empty());
    expected.moves(r#"tidepool_session_connections_closed_total{reason="header_timeout"}"#.into());
    let mut stream = TcpStream::connect(pod.server.http_addr()).await.unwrap();
    let head = format!(
        "POST {RESULTS_PATH} HTTP/1.1\r\nhost: pod\r\nauthorization: Bearer {token}\r\n{BINDING_HEADER}: {ticket}\r\n\
         content-length: 500\r\n\r\n{{\"results\":"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut answer))
        .await
        .expect("the body never timed out")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("did not come within"), "{answer}");
    expected.refusal("body_timeout");

    // Every input moved its counter, as many times as it was sent.
    assert!(expected.inputs >= 20, "only {} inputs", expected.inputs);
    let after = pod.http.get(pod.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for (series, count) in &expected.counts {
        let moved = metric_in(&after, series) - metric_in(&before, series);
        assert_eq!(moved, f64::from(*count), "{series} moved {moved}, not {count}");
    }

    // Nothing changed: the same results, and the session is served as before.
    assert_eq!(pod.server.latest_results(), Some(kept));
    let info: tidepool_protocol::pod::PodInfo = json(pod.get(INFO_PATH).send().await.unwrap()).await;
    assert_eq!(info.session_id, SID);
    let mut socket = pod.websocket(LATENCY_WS_PATH).await;
    ping(&mut socket, 1).await;
    assert!(matches!(receive_text(&mut socket).await, ServerMessage::Pong { seq: 1, .. }));
    let mut household = pod.websocket("/ws/household/videoCall").await;
    ping(&mut household, 2).await;
    assert!(matches!(receive_text(&mut household).await, ServerMessage::Pong { seq: 2, .. }));
}
