//! The abuse limits per client address: each refusal is a 429 that names
//! its limit and says when it frees up.

use reqwest::StatusCode;
use tidepool_protocol::pod::{DOWNLOAD_PATH, LATENCY_WS_PATH};

use crate::support::*;

#[tokio::test]
async fn tests_per_hour() {
    let pod = start_with(|config| config.limits.tests_per_hour = 2).await;
    let _first = pod.websocket(LATENCY_WS_PATH).await;
    let _second = pod.websocket(LATENCY_WS_PATH).await;
    // Household users other than bulk are part of a test already counted.
    let _gaming = pod.websocket("/ws/household/gaming").await;
    let error = pod.try_websocket(LATENCY_WS_PATH).await.unwrap_err();
    assert_eq!(handshake_status(error), StatusCode::TOO_MANY_REQUESTS);
    assert!(pod.try_websocket("/ws/household/bulk").await.is_err());

    // The same refusal over plain HTTP, to read its body and header.
    let response = pod
        .get(LATENCY_WS_PATH)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((3590..=3600).contains(&retry_after), "{retry_after}");
    let (status, error) = refusal(response).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(error.contains("tests_per_hour"), "{error}");
}

#[tokio::test]
async fn concurrent_sockets() {
    let pod = start_with(|config| config.limits.concurrent_sockets = 2).await;
    let first = pod.websocket(LATENCY_WS_PATH).await;
    let _second = pod.websocket("/ws/household/gaming").await;
    let response = pod.get(&format!("{DOWNLOAD_PATH}?seconds=1")).send().await.unwrap();
    assert_eq!(response.headers()["retry-after"], "1");
    let (status, error) = refusal(response).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(error.contains("concurrent_sockets"), "{error}");

    // Closing one frees its place.
    drop(first);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let response = pod.get(&format!("{DOWNLOAD_PATH}?seconds=1")).send().await.unwrap();
        if response.status() == StatusCode::OK {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the socket's place never freed up");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn bytes_per_hour() {
    let _timed = TIMED.lock().await;
    let pod = start_with(|config| config.limits.bytes_per_hour = 1_000_000).await;
    // The first download runs until its bytes are counted over the limit, then ends early.
    let started = std::time::Instant::now();
    let body = pod.get(&format!("{DOWNLOAD_PATH}?seconds=5")).send().await.unwrap().bytes().await.unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(4), "the stream was not cut");
    assert!(body.len() >= 1_000_000, "{}", body.len());

    let response = pod.get(&format!("{DOWNLOAD_PATH}?seconds=1")).send().await.unwrap();
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((3500..=3600).contains(&retry_after), "{retry_after}");
    let (status, error) = refusal(response).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(error.contains("bytes_per_hour"), "{error}");
}
