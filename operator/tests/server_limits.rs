//! The operator's own listener keeps its limits whatever its clients do: a
//! header timeout, a body timeout, an idle timeout and a connection cap,
//! each counted by reason. (`serve/src/tests.rs` proves the server loop
//! itself; this proves the operator runs it with the limits its flags give.)

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{Cluster, TOKEN, until_closed};

fn healthz(stream: &mut TcpStream) -> String {
    stream.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = [0u8; 512];
    let n = stream.read(&mut answer).unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_listener_cuts_slow_heads_slow_bodies_idle_connections_and_one_too_many() {
    let cluster = Cluster::start(1).await;
    let limits =
        ["--max-connections=3", "--header-timeout-seconds=1", "--body-timeout-seconds=1", "--idle-timeout-seconds=1"];
    let operator = cluster.operator("operator-0", &limits).await;
    let address = operator.url.trim_start_matches("http://").to_string();
    let address = address.as_str();

    tokio::task::spawn_blocking({
        let address = address.to_string();
        move || {
            let address = address.as_str();
            // A half-sent head is dropped after the header timeout, unanswered.
            let mut slow_head = TcpStream::connect(address).unwrap();
            slow_head.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").unwrap();
            let (took, answer) = until_closed(&mut slow_head, Duration::from_secs(5));
            assert!(took >= Duration::from_millis(900) && answer.is_empty(), "{answer:?} after {took:?}");

            // A body that does not arrive in time gets 408.
            let mut slow_body = TcpStream::connect(address).unwrap();
            let head = format!(
                "POST /api/v1/sessions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
                 Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"pool\""
            );
            slow_body.write_all(head.as_bytes()).unwrap();
            let (took, answer) = until_closed(&mut slow_body, Duration::from_secs(5));
            assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
            assert!(took >= Duration::from_millis(900), "cut after {took:?}");

            // A kept-alive connection that goes quiet is closed.
            let mut idle = TcpStream::connect(address).unwrap();
            assert!(healthz(&mut idle).starts_with("HTTP/1.1 200"));
            let (took, _) = until_closed(&mut idle, Duration::from_secs(5));
            assert!(took >= Duration::from_millis(900), "closed after {took:?}");

            // Three open connections fill the cap: a fourth is closed
            // unanswered, and the three are still served.
            let mut held: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(address).unwrap()).collect();
            for stream in &mut held {
                assert!(healthz(stream).starts_with("HTTP/1.1 200"));
            }
            let mut fourth = TcpStream::connect(address).unwrap();
            let _ = fourth.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
            let (took, answer) = until_closed(&mut fourth, Duration::from_secs(2));
            assert!(answer.is_empty() && took < Duration::from_millis(900), "{answer:?} after {took:?}");
            assert!(healthz(&mut held[0]).starts_with("HTTP/1.1 200"));
        }
    })
    .await
    .unwrap();

    // Each cut is counted under its reason.
    let metrics = reqwest::get(format!("{}/metrics", operator.url)).await.unwrap().text().await.unwrap();
    for reason in ["header_timeout", "slow_body", "idle", "connection_cap"] {
        let series = format!("tidepool_connection_refusals_total{{reason=\"{reason}\"}} ");
        let count: f64 = metrics
            .lines()
            .find_map(|line| line.strip_prefix(&series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0);
        assert!(count >= 1.0, "no {reason} refusal counted:\n{metrics}");
    }
}
