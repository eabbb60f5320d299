//! The UDP echo: same size back, the pod's time stamped in, strangers and
//! spoofed sources dropped, each session within its caps.

use std::time::Duration;

use tidepool_protocol::pod::{UDP_GRANT_PATH, UdpGrant, UdpProbe};
use tokio::net::UdpSocket;

use crate::support::*;

async fn echo(socket: &UdpSocket, datagram: &[u8], wait: Duration) -> Option<Vec<u8>> {
    socket.send(datagram).await.unwrap();
    let mut buffer = vec![0u8; 2048];
    let len = tokio::time::timeout(wait, socket.recv(&mut buffer)).await.ok()?.unwrap();
    buffer.truncate(len);
    Some(buffer)
}

fn probe(cookie: u64, seq: u32, len: usize) -> Vec<u8> {
    let mut datagram = vec![0xA5u8; len];
    UdpProbe { cookie, seq, client_time_us: 42, server_time_us: 0 }.write(&mut datagram).unwrap();
    datagram
}

#[tokio::test]
async fn probes_come_back_stamped_at_the_same_size() {
    let pod = start().await;
    let grant: UdpGrant = json(pod.post(UDP_GRANT_PATH).send().await.unwrap()).await;
    assert_eq!(grant.port, pod.server.udp_addr().port());
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(("127.0.0.1", grant.port)).await.unwrap();

    for len in [32, 200, 1472] {
        let sent = probe(grant.cookie, len as u32, len);
        let before = unix_micros();
        let back = echo(&socket, &sent, PATIENCE).await.expect("no echo");
        let after = unix_micros();
        assert_eq!(back.len(), len);
        let read = UdpProbe::read(&back).unwrap();
        assert_eq!((read.cookie, read.seq, read.client_time_us), (grant.cookie, len as u32, 42));
        assert!((before..=after).contains(&read.server_time_us), "{before} <= {} <= {after}", read.server_time_us);
        assert_eq!(back[32..], sent[32..], "the padding comes back untouched");
    }
}

#[tokio::test]
async fn strangers_are_dropped_and_counted() {
    let pod = start().await;
    let grant: UdpGrant = json(pod.post(UDP_GRANT_PATH).send().await.unwrap()).await;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(("127.0.0.1", grant.port)).await.unwrap();
    let quiet = Duration::from_millis(300);
    assert_eq!(echo(&socket, &probe(grant.cookie ^ 1, 1, 64), quiet).await, None);
    assert_eq!(echo(&socket, &[0u8; 64], quiet).await, None);
    assert_eq!(echo(&socket, &probe(grant.cookie, 1, 64)[..20], quiet).await, None);
    // The right cookie still works.
    assert!(echo(&socket, &probe(grant.cookie, 2, 64), PATIENCE).await.is_some());
    let metrics = pod.http.get(pod.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for outcome in ["bad_cookie", "bad_magic", "bad_size", "echoed"] {
        let line = format!("tidepool_session_udp_datagrams_total{{outcome=\"{outcome}\"}} 1");
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
    }
}

/// A grant asked from `local`, the address the HTTP request comes from.
async fn grant_from(pod: &Pod, local: &str) -> UdpGrant {
    let (token, ticket) = pod.credentials(SID);
    let client = reqwest::Client::builder().no_proxy().local_address(local.parse().ok()).build().unwrap();
    let response = client
        .post(pod.url(UDP_GRANT_PATH))
        .bearer_auth(token)
        .header(tidepool_protocol::BINDING_HEADER, ticket)
        .send()
        .await
        .unwrap();
    json(response).await
}

async fn socket_from(local: &str, pod: &Pod) -> UdpSocket {
    let socket = UdpSocket::bind((local, 0)).await.unwrap();
    socket.connect(("127.0.0.1", pod.server.udp_addr().port())).await.unwrap();
    socket
}

#[tokio::test]
async fn a_cookie_works_only_from_the_address_that_asked_for_it() {
    let pod = start().await;
    let alice = grant_from(&pod, "127.0.0.1").await;
    let other = grant_from(&pod, "127.0.0.2").await;
    assert_ne!(alice.cookie, other.cookie, "the cookie depends on the client's address");
    assert_eq!(grant_from(&pod, "127.0.0.1").await.cookie, alice.cookie, "and only on it");

    // A datagram that claims another source (127.0.0.2 here, as a spoofer's
    // would) with alice's cookie: no echo goes to the address it names.
    let quiet = Duration::from_millis(300);
    let spoofed = socket_from("127.0.0.2", &pod).await;
    assert_eq!(echo(&spoofed, &probe(alice.cookie, 1, 64), quiet).await, None);
    let from_alice = socket_from("127.0.0.1", &pod).await;
    assert_eq!(echo(&from_alice, &probe(other.cookie, 2, 64), quiet).await, None);
    // Each from its own address is echoed.
    assert!(echo(&from_alice, &probe(alice.cookie, 3, 64), PATIENCE).await.is_some());
    assert!(echo(&spoofed, &probe(other.cookie, 4, 64), PATIENCE).await.is_some());
    assert_eq!(metric(&pod, r#"tidepool_session_udp_datagrams_total{outcome="wrong_source"}"#).await, 2.0);
    assert_eq!(metric(&pod, r#"tidepool_session_udp_datagrams_total{outcome="echoed"}"#).await, 2.0);
}

#[tokio::test]
async fn a_session_past_its_caps_gets_no_more_echoes() {
    let pod = start_with(|config| {
        config.udp_caps.packets_per_session = 3;
        config.udp_caps.bytes_per_session = 1_000;
    })
    .await;
    let grant: UdpGrant = json(pod.post(UDP_GRANT_PATH).send().await.unwrap()).await;
    let socket = socket_from("127.0.0.1", &pod).await;
    let quiet = Duration::from_millis(300);
    // 600 bytes, then 500 more would pass the 1000: dropped; small ones still fit.
    assert!(echo(&socket, &probe(grant.cookie, 1, 600), PATIENCE).await.is_some());
    assert_eq!(echo(&socket, &probe(grant.cookie, 2, 500), quiet).await, None);
    assert!(echo(&socket, &probe(grant.cookie, 3, 64), PATIENCE).await.is_some());
    assert!(echo(&socket, &probe(grant.cookie, 4, 64), PATIENCE).await.is_some());
    // Three echoed: the packet cap.
    assert_eq!(echo(&socket, &probe(grant.cookie, 5, 32), quiet).await, None);
    assert_eq!(metric(&pod, r#"tidepool_session_udp_datagrams_total{outcome="session_limit"}"#).await, 2.0);
    assert_eq!(metric(&pod, "tidepool_session_udp_bytes_total").await, 728.0);
}
