//! Download and upload streams.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tidepool_protocol::pod::{DOWNLOAD_PATH, UPLOAD_PATH, UploadReport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

/// Pearson's chi-square of `counts` against a uniform spread.
fn chi_square(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    let expected = total as f64 / counts.len() as f64;
    counts.iter().map(|c| (*c as f64 - expected).powi(2) / expected).sum()
}

#[tokio::test]
async fn downloads_are_incompressible_and_stop_on_time() {
    let _timed = TIMED.lock().await;
    let pod = start().await;
    let started = Instant::now();
    let mut response = pod.get(&format!("{DOWNLOAD_PATH}?seconds=1")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut sample = Vec::with_capacity(8 << 20);
    let mut total = 0usize;
    while let Some(chunk) = response.chunk().await.unwrap() {
        total += chunk.len();
        if sample.len() < 8 << 20 {
            sample.extend_from_slice(&chunk[..chunk.len().min((8 << 20) - sample.len())]);
        }
    }
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(950) && elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert!(total >= 4 << 20, "only {total} bytes in a second on loopback");

    // Bytes and byte pairs spread evenly: what a compressor could not squeeze.
    let mut bytes = vec![0u64; 256];
    let mut pairs = vec![0u64; 65_536];
    sample.iter().for_each(|b| bytes[usize::from(*b)] += 1);
    sample.chunks_exact(2).for_each(|p| pairs[usize::from(p[0]) << 8 | usize::from(p[1])] += 1);
    let (bytes, pairs) = (chi_square(&bytes), chi_square(&pairs));
    // Degrees of freedom 255 (sd 22.6) and 65535 (sd 362): within about seven sd.
    assert!((100.0..420.0).contains(&bytes), "byte chi-square {bytes}");
    assert!((63_000.0..68_100.0).contains(&pairs), "pair chi-square {pairs}");
}

#[tokio::test]
async fn stream_lengths_out_of_range_are_400() {
    let pod = start().await;
    for query in ["seconds=0", "seconds=61", "seconds=abc", "seconds=-1"] {
        let (status, error) = refusal(pod.get(&format!("{DOWNLOAD_PATH}?{query}")).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {error}");
    }
    let (status, error) = refusal(pod.post(&format!("{UPLOAD_PATH}?seconds=0")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{error}");
}

#[tokio::test]
async fn uploads_count_exact_bytes_with_samples() {
    let _timed = TIMED.lock().await;
    let pod = start().await;
    let body = vec![7u8; 3_000_001];
    let report: UploadReport = json(pod.post(UPLOAD_PATH).body(body).send().await.unwrap()).await;
    assert_eq!(report.bytes, 3_000_001);
    assert_eq!(report.samples.last(), Some(&(report.elapsed_us, report.bytes)));
    assert!(report.samples.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{:?}", report.samples);
}

#[tokio::test]
async fn uploads_over_the_maximum_are_413() {
    let pod = start_with(|config| config.limits.max_upload_bytes = 1 << 20).await;
    let response = pod.post(UPLOAD_PATH).body(vec![0u8; 2 << 20]).send().await.unwrap();
    let (status, error) = refusal(response).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert!(error.contains("at most 1048576 bytes"), "{error}");
    // Exactly the maximum is fine.
    let report: UploadReport = json(pod.post(UPLOAD_PATH).body(vec![0u8; 1 << 20]).send().await.unwrap()).await;
    assert_eq!(report.bytes, 1 << 20);
}

#[tokio::test]
async fn a_chunked_upload_over_the_maximum_is_413() {
    let pod = start_with(|config| config.limits.max_upload_bytes = 1 << 20).await;
    let (token, ticket) = pod.credentials(SID);
    let mut stream = tokio::net::TcpStream::connect(pod.server.http_addr()).await.unwrap();
    let head = format!(
        "POST {UPLOAD_PATH} HTTP/1.1\r\nhost: pod\r\nauthorization: Bearer {token}\r\n\
         x-tidepool-binding: {ticket}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![1u8; 64 * 1024];
    for _ in 0..32 {
        stream.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await.unwrap();
        stream.write_all(&chunk).await.unwrap();
        stream.write_all(b"\r\n").await.unwrap();
    }
    stream.write_all(b"0\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("at most 1048576 bytes"), "{answer}");
}
