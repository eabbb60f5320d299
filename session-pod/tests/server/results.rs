//! Results: checked, graded by the pod, kept, and forwarded (or not).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;
use tidepool_crds::test_session::Grade;
use tidepool_protocol::pod::RESULTS_PATH;
use tidepool_protocol::results::ResultsAccepted;

use crate::support::*;

/// Idle p50 of 10 ms, loaded medians 12, 80 and 95 ms, and grades the
/// client made up.
fn submission() -> serde_json::Value {
    json!({
        "results": {
            "latency": {"p50Ms": 10.0, "p95Ms": 14.0, "p99Ms": 20.0, "jitterMs": 1.0, "lossPercent": 0.0, "samples": 100},
            "loadedLatency": {"downloadMs": 12.0, "uploadMs": 80.0, "bidirectionalMs": 95.0},
            "downloadMbps": 940.5,
            "uploadMbps": 410.0,
            "grades": {"bufferbloat": "A+", "overall": "A+", "qualityPoints": 40}
        },
        "final": true
    })
}

#[tokio::test]
async fn the_pod_regrades_keeps_and_says_it_could_not_report() {
    let pod = start().await;
    let accepted: ResultsAccepted = json(pod.post(RESULTS_PATH).json_body(&submission()).send().await.unwrap()).await;
    let grades = accepted.results.grades.clone().unwrap();
    // Rises 2, 70, 85 ms: A+, C, C, mean B; worst rise 85 ms gives 0 + 10 + 10 points.
    assert_eq!(grades.bufferbloat, Some(Grade::B));
    assert_eq!(grades.overall, Some(Grade::B));
    assert_eq!(grades.quality_points, Some(20));
    assert!(!accepted.reported);
    assert!(accepted.report_error.as_deref().unwrap().contains("no operator URL"), "{accepted:?}");
    assert_eq!(pod.server.latest_results(), Some(accepted.results));

    let metrics = pod.http.get(pod.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for line in [
        "tidepool_session_result_grade_rank{grade=\"overall\"} 2",
        "tidepool_session_result_latency_seconds{statistic=\"p50\"} 0.01",
        "tidepool_session_result_throughput_bytes_per_second{direction=\"download\"} 117562500",
        "tidepool_session_result_quality_points 20",
        "tidepool_session_results_total{reported=\"false\"} 1",
    ] {
        assert!(metrics.contains(line), "no {line} in\n{metrics}");
    }
}

#[tokio::test]
async fn bad_figures_are_422_naming_the_field() {
    let pod = start().await;
    let mut negative = submission();
    negative["results"]["loadedLatency"]["uploadMs"] = json!(-3.0);
    // NaN has no JSON form: JSON.stringify and serde_json both write null.
    let mut nan = submission();
    nan["results"]["latency"]["jitterMs"] = serde_json::Value::Null;
    let mut loss = submission();
    loss["results"]["latency"]["lossPercent"] = json!(150.0);
    for (body, field) in [
        (negative, "results.loadedLatency.uploadMs"),
        (nan, "results.latency.jitterMs"),
        (loss, "results.latency.lossPercent"),
    ] {
        let (status, error) = refusal(pod.post(RESULTS_PATH).json_body(&body).send().await.unwrap()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
        assert!(error.starts_with(field), "{field}: {error}");
    }
    let (status, _) = refusal(pod.post(RESULTS_PATH).body("{").send().await.unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(pod.server.latest_results(), None);
}

#[tokio::test]
async fn an_unreachable_operator_is_retried_briefly_then_reported() {
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let pod = start_with(|config| config.operator_url = Some(format!("http://{closed}").parse().unwrap())).await;
    let started = Instant::now();
    let accepted: ResultsAccepted = json(pod.post(RESULTS_PATH).json_body(&submission()).send().await.unwrap()).await;
    let took = started.elapsed();
    assert!(!accepted.reported);
    let error = accepted.report_error.unwrap();
    assert!(error.contains("did not answer after 3 attempts"), "{error}");
    // Three tries with 0.2 s and 0.4 s pauses between.
    assert!(took >= Duration::from_millis(550) && took < Duration::from_secs(5), "{took:?}");
    assert!(accepted.results.grades.is_some());
}
