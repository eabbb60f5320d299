//! The pod's tube routes over real WebRTC on loopback: a client peer in
//! the test posts its offer with a tube ticket (as the operator would),
//! joins the pod's answer and runs the client multiplexer; the pod dials
//! what the ticket allows, reports the tube, and ends it on DELETE, when
//! idle, or when the client never connects.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tidepool_tests::targets::{echo_target, pattern};

use reqwest::StatusCode;
use reqwest::header::RETRY_AFTER;
use serde_json::json;
use tidepool_protocol::tube::{
    EndReason, POD_TUBES_PATH, PodTubeState, TUBE_TICKET_HEADER, TubeAnswer, TubeReport, decode_sdp, encode_sdp,
};
use tidepool_session::tubes::TubeLimits;
use tidepool_tube::{BridgeEnded, Ended, Limits, Mux, Opened, Peer, Settings};
use tidepool_wire::token::{PoolSigningKey, TubeClaims};
use tidepool_wire::tube::Refusal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use crate::support::*;

/// The pool's tube allowlist in these tests: the one loopback address.
const ALLOW: &str = r#"[{"cidr":"127.0.0.1/32"}]"#;
const ONE_MIB: usize = 1 << 20;

/// A pod whose tube peers bind loopback (the default binds a wildcard
/// address, which leaves loopback out), its tube limits changed by `configure`.
async fn start_tubes(configure: impl FnOnce(&mut TubeLimits)) -> Pod {
    start_with(|config| {
        config.tubes.peer = Settings::loopback();
        configure(&mut config.tubes);
    })
    .await
}

/// A tunnel to `127.0.0.1:target` on this test's pod, as the operator signs it.
fn claims(uid: &str, target: u16) -> TubeClaims {
    TubeClaims {
        tube: uid.into(),
        ns: "default".into(),
        name: "t1".into(),
        pod: POD.into(),
        kind: "tunnel".into(),
        target: Some(format!("127.0.0.1:{target}")),
        allow: ALLOW.into(),
        idle: 300,
        exp: unix_now() + 300,
        kid: String::new(),
    }
}

fn tube_path(uid: &str) -> String {
    format!("{POD_TUBES_PATH}/{uid}")
}

/// A `TubeOffer` body for the SDP `sdp`.
fn offer_body(sdp: &str) -> String {
    json!({ "offer": encode_sdp(sdp) }).to_string()
}

/// Text that passes the pod's SDP check (`v=0`) without being a real offer.
const NOT_AN_OFFER: &str = "v=0\r\n";

async fn post(pod: &Pod, ticket: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
    pod.http
        .post(pod.url(POD_TUBES_PATH))
        .header(TUBE_TICKET_HEADER, ticket)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// The answer (base64) of a 201.
async fn answered(response: reqwest::Response) -> String {
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let answer: TubeAnswer = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not an answer ({e}): {body}"));
    answer.answer
}

/// A 429's `Retry-After`, in seconds, and its message.
async fn too_many(response: reqwest::Response) -> (u64, String) {
    let retry_after = response.headers().get(RETRY_AFTER).map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
    let (status, message) = refusal(response).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{message}");
    (retry_after.expect("a 429 says when to try again"), message)
}

async fn get(pod: &Pod, ticket: &str, uid: &str) -> reqwest::Response {
    pod.http.get(pod.url(&tube_path(uid))).header(TUBE_TICKET_HEADER, ticket).send().await.unwrap()
}

async fn delete(pod: &Pod, ticket: &str, uid: &str) -> StatusCode {
    pod.http.delete(pod.url(&tube_path(uid))).header(TUBE_TICKET_HEADER, ticket).send().await.unwrap().status()
}

/// The system's UDP counters (drops included), for a failure's message.
fn udp_counters() -> String {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    snmp.lines().filter(|line| line.starts_with("Udp:")).collect::<Vec<_>>().join(" / ")
}

async fn report(pod: &Pod, ticket: &str, uid: &str) -> TubeReport {
    json(get(pod, ticket, uid).await).await
}

/// The tube's report once `done` holds of it, within [`PATIENCE`].
async fn report_until(
    pod: &Pod,
    ticket: &str,
    uid: &str,
    what: &str,
    done: impl Fn(&TubeReport) -> bool,
) -> TubeReport {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let report = report(pod, ticket, uid).await;
        if done(&report) {
            return report;
        }
        assert!(Instant::now() < deadline, "{what}: not within {PATIENCE:?}; the last report: {report:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics_text(pod: &Pod) -> String {
    pod.http.get(pod.url("/metrics")).send().await.unwrap().text().await.unwrap()
}

fn creations(outcome: &str) -> String {
    format!(r#"tidepool_session_tube_creations_total{{outcome="{outcome}"}}"#)
}

fn tubes_in(state: &str) -> String {
    format!(r#"tidepool_session_tubes{{state="{state}"}}"#)
}

/// A client's peer and its offer (SDP), on loopback.
async fn client_offer() -> (Peer, String) {
    let peer = Peer::new(&Settings::loopback()).await.unwrap();
    let offer = timeout(PATIENCE, peer.offer()).await.expect("the offer took too long").unwrap();
    (peer, offer)
}

/// A client whose channel is open, its multiplexer's driver and its bridge running.
struct Client {
    mux: Mux,
    driver: JoinHandle<Ended>,
    bridge: JoinHandle<(BridgeEnded, Opened)>,
}

/// Joins the pod's answer (base64) and runs the client's end.
async fn join(peer: Peer, answer: &str) -> Client {
    peer.accept(&decode_sdp(answer).unwrap()).await.unwrap();
    let mut opened = peer.open_heard(PATIENCE).await.expect("the channel did not open");
    let (mux, driver) = Mux::client(opened.take_channel().unwrap(), Limits::default());
    let bridge = tokio::spawn(async move {
        let ended = opened.bridge().await;
        (ended, opened)
    });
    Client { mux, driver: tokio::spawn(driver), bridge }
}

impl Client {
    /// Waits for the client's end to notice that the tube ended, and closes it.
    async fn ended(self) -> (BridgeEnded, Ended) {
        let (bridge, opened) = timeout(PATIENCE, self.bridge).await.expect("the client's bridge ran on").unwrap();
        opened.close().await;
        drop(opened);
        let driver = timeout(PATIENCE, self.driver).await.expect("the client's multiplexer ran on").unwrap();
        (bridge, driver)
    }
}

/// Opens a connection to `127.0.0.1:port` through the tube; the application's socket.
async fn connect(mux: &Mux, port: u16) -> Result<TcpStream, Refusal> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (carried, _) = listener.accept().await.unwrap();
    timeout(PATIENCE, mux.open(carried, "127.0.0.1", port)).await.expect("the pod did not answer the open")?;
    Ok(app)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_carries_its_target_only_reports_what_it_carried_and_ends_on_delete() {
    let _timed = TIMED.lock().await;
    let pod = start_tubes(|_| {}).await;
    let target = echo_target().await;
    let uid = "0c7f2a4e-tunnel";
    let ticket = pod.key.sign_tube(&claims(uid, target));
    let (peer, offer) = client_offer().await;
    let answer = answered(post(&pod, &ticket, offer_body(&offer)).await).await;
    let client = join(peer, &answer).await;

    // A megabyte there and back through the tube, byte for byte.
    let app = connect(&client.mux, target).await.unwrap();
    let (mut reader, mut writer) = app.into_split();
    let sent = pattern(7, ONE_MIB);
    let to_send = sent.clone();
    let writing = tokio::spawn(async move {
        writer.write_all(&to_send).await.unwrap();
        writer
    });
    let mut echoed = vec![0u8; ONE_MIB];
    let mut got = 0;
    let deadline = Instant::now() + PATIENCE;
    while got < ONE_MIB && Instant::now() < deadline {
        match timeout(Duration::from_millis(500), reader.read(&mut echoed[got..])).await {
            Ok(Ok(read)) if read > 0 => got += read,
            Ok(_) => break,
            Err(_) => {}
        }
    }
    if got < ONE_MIB {
        // Both ends' counters say where the bytes stopped; whether
        // datagrams were dropped tells lost packets from a stuck tube.
        let seen = report(&pod, &ticket, uid).await;
        let stats = client.mux.stats();
        let client_counts = (stats.sent.load(Ordering::Relaxed), stats.received.load(Ordering::Relaxed));
        panic!(
            "the echo stopped (stalled, or the stream ended) at {got} bytes (all written: {}); the client's end sent and received {client_counts:?}; \
             the pod's report: {seen:?}; {}",
            writing.is_finished(),
            udp_counters()
        );
    }
    let writer = timeout(PATIENCE, writing).await.unwrap().unwrap();
    assert!(echoed == sent, "the echo differs from what was sent");

    // The connection is still open: the pod counts it, and every byte.
    let mib = ONE_MIB as u64;
    let seen = report_until(&pod, &ticket, uid, "the report shows the echo", |r| {
        r.state == PodTubeState::Connected && r.bytes_sent >= mib && r.bytes_received >= mib && r.open_connections == 1
    })
    .await;
    assert_eq!((seen.bytes_sent, seen.bytes_received, seen.ended), (mib, mib, None), "{seen:?}");

    // Another port on the same (allowed) address is not the tunnel's target.
    let other = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let other_port = other.local_addr().unwrap().port();
    assert_eq!(connect(&client.mux, other_port).await.unwrap_err(), Refusal::NotAllowed);

    let text = metrics_text(&pod).await;
    assert_eq!(metric_in(&text, &creations("answered")), 1.0, "{text}");
    assert_eq!(metric_in(&text, &creations("connected")), 1.0, "{text}");
    assert_eq!(metric_in(&text, &tubes_in("connected")), 1.0, "{text}");

    assert_eq!(delete(&pod, &ticket, uid).await, StatusCode::NO_CONTENT);
    let ended = report(&pod, &ticket, uid).await;
    assert_eq!((ended.state, ended.ended), (PodTubeState::Ended, Some(EndReason::Deleted)), "{ended:?}");
    // The client's end notices, and so does the application's connection.
    client.ended().await;
    let mut rest = Vec::new();
    timeout(PATIENCE, reader.read_to_end(&mut rest)).await.expect("the application's connection hung").ok();
    drop(writer);
    // Closing a tube already closed is fine, and changes nothing.
    assert_eq!(delete(&pod, &ticket, uid).await, StatusCode::NO_CONTENT);
    let text = metrics_text(&pod).await;
    assert_eq!(metric_in(&text, &tubes_in("connected")), 0.0, "{text}");
    assert_eq!(metric_in(&text, &tubes_in("ended")), 1.0, "{text}");
    let still = report(&pod, &ticket, uid).await;
    assert_eq!(still.ended, Some(EndReason::Deleted), "{still:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_tube_requests_say_why_and_create_nothing() {
    // One creation at a time: a refusal that held its place would show.
    let pod = start_tubes(|limits| limits.creations = 1).await;
    let uid = "1d0b9c33-refused";
    let ticket = pod.key.sign_tube(&claims(uid, 9));
    let fake = offer_body(NOT_AN_OFFER);

    let no_ticket = pod.http.post(pod.url(POD_TUBES_PATH)).body(fake.clone()).send().await.unwrap();
    assert_eq!(refusal(no_ticket).await.0, StatusCode::UNAUTHORIZED);
    let other_key = PoolSigningKey::generate().unwrap().sign_tube(&claims(uid, 9));
    let other_pod = pod.key.sign_tube(&TubeClaims { pod: "edge-other".into(), ..claims(uid, 9) });
    let expired = pod.key.sign_tube(&TubeClaims { exp: unix_now() - 10, ..claims(uid, 9) });
    for (what, bad) in [("another key", other_key), ("another pod", other_pod), ("expired", expired)] {
        let (status, message) = refusal(post(&pod, &bad, fake.clone()).await).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{what}: {message}");
    }
    for (what, body) in [
        ("not JSON", "{\"offer\":".to_string()),
        ("not base64", json!({ "offer": "***" }).to_string()),
        ("not SDP", json!({ "offer": encode_sdp("hello") }).to_string()),
        ("SDP that cannot be answered", fake.clone()),
    ] {
        let (status, message) = refusal(post(&pod, &ticket, body).await).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {message}");
    }
    let huge = json!({ "offer": "A".repeat(97 * 1024) }).to_string();
    assert_eq!(refusal(post(&pod, &ticket, huge).await).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    let nowhere =
        pod.key.sign_tube(&TubeClaims { kind: "socks5".into(), target: None, allow: "[]".into(), ..claims(uid, 9) });
    let (status, message) = refusal(post(&pod, &nowhere, fake.clone()).await).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{message}");

    let (status, message) = refusal(get(&pod, &ticket, uid).await).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "an unknown tube: {message}");
    let for_another = pod.key.sign_tube(&claims("another-uid", 9));
    let (status, message) = refusal(get(&pod, &for_another, uid).await).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a ticket for another tube: {message}");
    assert_eq!(delete(&pod, &for_another, uid).await, StatusCode::FORBIDDEN);

    let text = metrics_text(&pod).await;
    for state in ["connecting", "connected", "ended"] {
        assert_eq!(metric_in(&text, &tubes_in(state)), 0.0, "{state}: {text}");
    }
    for (outcome, count) in [
        ("answered", 0.0),
        ("unauthenticated", 1.0),
        ("forbidden", 3.0),
        ("bad_json", 1.0),
        ("bad_offer", 3.0),
        ("body_too_large", 1.0),
        ("tube_refused", 1.0),
    ] {
        assert_eq!(metric_in(&text, &creations(outcome)), count, "{outcome}: {text}");
    }

    // Nothing held the one creation: a real offer is answered.
    let (peer, offer) = client_offer().await;
    answered(post(&pod, &ticket, offer_body(&offer)).await).await;
    assert_eq!(report(&pod, &ticket, uid).await.state, PodTubeState::Connecting);
    assert_eq!(delete(&pod, &ticket, uid).await, StatusCode::NO_CONTENT);
    peer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posting_a_tube_again_gets_the_same_answer() {
    let pod = start_tubes(|_| {}).await;
    let (peer, offer) = client_offer().await;

    let uid = "2e4a8f10-again";
    let ticket = pod.key.sign_tube(&claims(uid, 9));
    let first = answered(post(&pod, &ticket, offer_body(&offer)).await).await;
    let second = answered(post(&pod, &ticket, offer_body(&offer)).await).await;
    assert_eq!(first, second);

    // Two posts at once: one answer stands for both.
    let raced = "2e4a8f10-raced";
    let raced_ticket = pod.key.sign_tube(&claims(raced, 9));
    let (one, two) =
        tokio::join!(post(&pod, &raced_ticket, offer_body(&offer)), post(&pod, &raced_ticket, offer_body(&offer)));
    let (one, two) = (answered(one).await, answered(two).await);
    assert_eq!(one, two);
    assert_ne!(one, first, "each tube has its own answer");

    assert_eq!(metric(&pod, &creations("answered")).await, 2.0);
    assert_eq!(metric(&pod, &tubes_in("connecting")).await, 2.0);
    for (uid, ticket) in [(uid, &ticket), (raced, &raced_ticket)] {
        assert_eq!(delete(&pod, ticket, uid).await, StatusCode::NO_CONTENT);
        let ended = report(&pod, ticket, uid).await;
        assert_eq!((ended.state, ended.ended), (PodTubeState::Ended, Some(EndReason::Deleted)), "{ended:?}");
    }
    // An ended tube is not answered again.
    let (status, message) = refusal(post(&pod, &ticket, offer_body(&offer)).await).await;
    assert_eq!(status, StatusCode::CONFLICT, "{message}");
    peer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tubes_being_set_up_at_once_are_bounded() {
    let pod = start_tubes(|limits| limits.creations = 1).await;
    let (peer, offer) = client_offer().await;
    let a = "3a91c0de-a";
    let a_ticket = pod.key.sign_tube(&claims(a, 9));
    answered(post(&pod, &a_ticket, offer_body(&offer)).await).await;

    let b = "3a91c0de-b";
    let b_ticket = pod.key.sign_tube(&claims(b, 9));
    let (retry_after, message) = too_many(post(&pod, &b_ticket, offer_body(NOT_AN_OFFER)).await).await;
    assert!(retry_after >= 1, "{retry_after}");
    assert!(message.contains("being set up"), "{message}");
    assert_eq!(metric(&pod, &creations("tube_creations")).await, 1.0);
    let (status, _) = refusal(get(&pod, &b_ticket, b).await).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "the refused tube was not made");

    assert_eq!(delete(&pod, &a_ticket, a).await, StatusCode::NO_CONTENT);
    let ended = report(&pod, &a_ticket, a).await;
    assert_eq!((ended.state, ended.ended), (PodTubeState::Ended, Some(EndReason::Deleted)), "{ended:?}");
    peer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tube_that_carries_nothing_ends_idle() {
    let pod = start_tubes(|_| {}).await;
    let uid = "4b77e1f2-idle";
    let ticket = pod.key.sign_tube(&TubeClaims { idle: 1, ..claims(uid, 9) });
    let (peer, offer) = client_offer().await;
    let answer = answered(post(&pod, &ticket, offer_body(&offer)).await).await;
    let client = join(peer, &answer).await;

    let ended = report_until(&pod, &ticket, uid, "the tube ends", |r| r.ended.is_some()).await;
    assert_eq!((ended.state, ended.ended), (PodTubeState::Ended, Some(EndReason::Idle)), "{ended:?}");
    assert_eq!((ended.bytes_sent, ended.bytes_received, ended.open_connections), (0, 0, 0), "{ended:?}");
    client.ended().await;
    assert_eq!(metric(&pod, &creations("connected")).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_connects_ends_its_tube_and_new_tubes_back_off() {
    let pod = start_tubes(|limits| limits.open_within = Duration::from_millis(500)).await;
    let uid = "5c0ffee5-silent";
    let ticket = pod.key.sign_tube(&claims(uid, 9));
    let (peer, offer) = client_offer().await;
    answered(post(&pod, &ticket, offer_body(&offer)).await).await;
    // The client goes without ever taking the answer.
    peer.close().await;

    let ended = report_until(&pod, &ticket, uid, "the tube gives up", |r| r.ended.is_some()).await;
    assert_eq!((ended.state, ended.ended), (PodTubeState::Ended, Some(EndReason::NotConnected)), "{ended:?}");
    assert_eq!(metric(&pod, &creations("not_connected")).await, 1.0);

    // The first failure backs new tubes off for a second.
    let next = "5c0ffee5-next";
    let next_ticket = pod.key.sign_tube(&claims(next, 9));
    let (retry_after, message) = too_many(post(&pod, &next_ticket, offer_body(NOT_AN_OFFER)).await).await;
    assert_eq!(retry_after, 1, "{message}");
    assert!(message.contains("backing off"), "{message}");
    assert_eq!(metric(&pod, &creations("tube_backoff")).await, 1.0);

    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let (peer, offer) = client_offer().await;
    answered(post(&pod, &next_ticket, offer_body(&offer)).await).await;
    assert_eq!(delete(&pod, &next_ticket, next).await, StatusCode::NO_CONTENT);
    peer.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_tube_still_connecting_frees_its_place_and_is_not_a_failure() {
    let pod = start_tubes(|limits| {
        limits.creations = 1;
        limits.open_within = Duration::from_millis(500);
    })
    .await;
    let (peer, offer) = client_offer().await;
    let a = "5e0d-deleted";
    let a_ticket = pod.key.sign_tube(&claims(a, 9));
    answered(post(&pod, &a_ticket, offer_body(&offer)).await).await;
    assert_eq!(delete(&pod, &a_ticket, a).await, StatusCode::NO_CONTENT);

    // The place among the creations is free at once, and once the deleted
    // tube's open has given up no backoff follows.
    let (second, offer) = client_offer().await;
    let b = "5e0d-next";
    let b_ticket = pod.key.sign_tube(&claims(b, 9));
    answered(post(&pod, &b_ticket, offer_body(&offer)).await).await;
    assert_eq!(delete(&pod, &b_ticket, b).await, StatusCode::NO_CONTENT);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (third, offer) = client_offer().await;
    let c = "5e0d-after";
    let c_ticket = pod.key.sign_tube(&claims(c, 9));
    answered(post(&pod, &c_ticket, offer_body(&offer)).await).await;
    assert_eq!(metric(&pod, &creations("not_connected")).await, 0.0);
    assert_eq!(metric(&pod, &creations("tube_backoff")).await, 0.0);
    let ended = report(&pod, &a_ticket, a).await;
    assert_eq!(ended.ended, Some(EndReason::Deleted), "{ended:?}");
    assert_eq!(delete(&pod, &c_ticket, c).await, StatusCode::NO_CONTENT);
    for client in [peer, second, third] {
        client.close().await;
    }
}
