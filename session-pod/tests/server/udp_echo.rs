//! The UDP echo: same size back, the pod's time stamped in, strangers dropped.

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
