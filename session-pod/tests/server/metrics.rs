//! /metrics after some traffic passes promtool's checks.

use std::process::Command;

use tidepool_protocol::pod::{ClientMessage, DOWNLOAD_PATH, LATENCY_WS_PATH, RESULTS_PATH, UDP_GRANT_PATH, UdpGrant};

use crate::support::*;

#[tokio::test]
async fn metrics_pass_promtool_after_traffic() {
    let pod = start_with(|config| config.limits.tests_per_hour = 1).await;
    let mut socket = pod.websocket(LATENCY_WS_PATH).await;
    send(&mut socket, &ClientMessage::Ping { seq: 1, client_time_us: 1 }).await;
    receive_text(&mut socket).await;
    assert!(pod.try_websocket(LATENCY_WS_PATH).await.is_err(), "the second test is refused");
    pod.get(&format!("{DOWNLOAD_PATH}?seconds=1")).send().await.unwrap().bytes().await.unwrap();
    let _: UdpGrant = json(pod.post(UDP_GRANT_PATH).send().await.unwrap()).await;
    let results = r#"{"results":{"latency":{"p50Ms":5,"p95Ms":6,"p99Ms":7,"jitterMs":1,"lossPercent":0,"samples":9},
        "household":[{"user":"gaming","baselineMs":5,"meanMs":6,"jitterMs":1,"sharePercent":99,"severity":"none"}]}}"#;
    pod.post(RESULTS_PATH).body(results).send().await.unwrap();

    let text = pod.http.get(pod.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for name in [
        "tidepool_session_requests_total{code=\"200\",route=\"download\"} 1",
        "tidepool_session_refusals_total{reason=\"tests_per_hour\"} 1",
        "tidepool_session_pings_total{outcome=\"answered\"} 1",
        "tidepool_session_bound 1",
        "tidepool_session_result_household_share_ratio{user=\"gaming\"} 0.99",
        "tidepool_session_udp_socket_buffer_bytes{direction=\"receive\"}",
    ] {
        assert!(text.contains(name), "no {name} in\n{text}");
    }
    let file = std::env::temp_dir().join(format!("tidepool-session-metrics-{}.txt", std::process::id()));
    std::fs::write(&file, &text).unwrap();
    let check = Command::new("promtool").args(["check", "metrics"]).stdin(std::fs::File::open(&file).unwrap()).output();
    std::fs::remove_file(&file).unwrap();
    let check = check.expect("promtool is installed");
    assert!(
        check.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
}
