//! A session pod reports results with its session's token and ticket; the
//! operator grades them, keeps them in status, and a final report completes
//! the session and releases its pod. Bad credentials and bad bodies change
//! nothing.

mod common;

use std::time::Duration;

use common::{Cluster, post_session};
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use serde_json::{Value, json};
use tidepool_crds::TestSession;
use tidepool_crds::test_session::{Grade, Phase};
use tidepool_tests::eventually;

struct Session {
    name: String,
    pod: String,
    token: String,
    binding: String,
}

async fn session(operator: &common::Operator) -> Session {
    let (code, body) = post_session(operator, json!({ "pool": "edge", "profile": "bufferbloat" })).await;
    assert_eq!(code, 201, "{body}");
    let field = |name: &str| body[name].as_str().unwrap_or_else(|| panic!("no {name} in {body}")).to_string();
    Session { name: field("name"), pod: field("pod"), token: field("token"), binding: field("binding") }
}

async fn post(url: &str, token: Option<&str>, binding: Option<&str>, body: Vec<u8>) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(url).header("content-type", "application/json").body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(binding) = binding {
        request = request.header("x-tidepool-binding", binding);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

fn report(results: Value, is_final: bool) -> Vec<u8> {
    serde_json::to_vec(&json!({ "results": results, "final": is_final })).unwrap()
}

/// The one answer to results credentials that do not fit the session.
const NOT_YOURS: &str = "these credentials are not for this session";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_land_in_status_graded_and_a_final_report_completes_the_session() {
    let cluster = Cluster::start(1).await;
    let operator = cluster.operator("operator-0", &["--results-url=http://operator.example:8080"]).await;
    cluster.pool("edge", 2).await;
    cluster.wait_warm("edge", 2, Duration::from_secs(30)).await;
    let one = session(&operator).await;
    let other = session(&operator).await;
    let url = format!("{}/api/v1/sessions/{}/results", operator.url, one.name);

    // Pods are told where to report.
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let pod = pods.get(&one.pod).await.unwrap();
    let env = pod.spec.unwrap().containers[0].env.clone().unwrap();
    assert!(
        env.iter()
            .any(|e| e.name == "TIDEPOOL_OPERATOR_URL" && e.value.as_deref() == Some("http://operator.example:8080")),
        "{env:?}"
    );

    let figures = json!({
        "latency": { "p50Ms": 1.0, "p95Ms": 2.0, "p99Ms": 3.0, "jitterMs": 0.5, "lossPercent": 0.0, "samples": 20 },
        "loadedLatency": { "downloadMs": 3.0, "uploadMs": 70.0, "bidirectionalMs": 90.0 },
        "downloadMbps": 19.2,
        "uploadMbps": 18.9,
        // Claimed by the sender; the operator grades for itself.
        "grades": { "overall": "A+" },
        "household": [{ "user": "gaming", "baselineMs": 1.0, "meanMs": 80.0, "jitterMs": 9.0,
                        "sharePercent": 100.0, "severity": "moderate" }]
    });

    // (what, token, ticket, body, status, words in the error)
    let bad_loss = json!({ "latency": { "p50Ms": 1.0, "p95Ms": 1.0, "p99Ms": 1.0, "jitterMs": 0.0,
                                        "lossPercent": 150.0, "samples": 1 } });
    type Case<'a> = (&'a str, Option<&'a str>, Option<&'a str>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("no credentials", None, None, report(figures.clone(), false), 401, "session token"),
        ("no ticket", Some(&one.token), None, report(figures.clone(), false), 401, "x-tidepool-binding"),
        ("garbage token", Some("x.y"), Some(&one.binding), report(figures.clone(), false), 403, NOT_YOURS),
        (
            "another session's token",
            Some(&other.token),
            Some(&other.binding),
            report(figures.clone(), false),
            403,
            NOT_YOURS,
        ),
        (
            "another session's ticket",
            Some(&one.token),
            Some(&other.binding),
            report(figures.clone(), false),
            403,
            NOT_YOURS,
        ),
        ("not JSON", Some(&one.token), Some(&one.binding), b"latency=1".to_vec(), 400, "invalid request body"),
        ("out of range", Some(&one.token), Some(&one.binding), report(bad_loss, false), 422, "lossPercent"),
        ("oversized", Some(&one.token), Some(&one.binding), vec![b' '; 300 * 1024], 413, "length limit"),
    ];
    for (what, token, ticket, body, code, needle) in cases {
        let (status, json) = post(&url, token, ticket, body).await;
        assert_eq!(status, code, "{what}: {json}");
        assert!(json["error"].as_str().unwrap_or_default().contains(needle), "{what}: {json}");
    }
    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");
    let untouched = sessions.get(&one.name).await.unwrap();
    assert_eq!(untouched.status.as_ref().unwrap().results, None, "a refused report changed the status");

    // A progress report: graded by the operator, the session stays Ready.
    let (status, json) = post(&url, Some(&one.token), Some(&one.binding), report(figures.clone(), false)).await;
    assert_eq!(status, 200, "{json}");
    let live = sessions.get(&one.name).await.unwrap();
    let live_status = live.status.unwrap();
    assert_eq!(live_status.phase, Phase::Ready);
    let results = live_status.results.unwrap();
    let grades = results.grades.clone().unwrap();
    // Rises 2, 69 and 89 ms: A+, C, C, whose mean is B; the household's
    // moderate gaming user scores 60: D, which is overall.
    assert_eq!(grades.bufferbloat, Some(Grade::B));
    assert_eq!(grades.household, Some(Grade::D));
    assert_eq!(grades.overall, Some(Grade::D));
    assert!(!results.is_final && results.reported_at.is_some());
    assert_eq!(results.download_mbps, Some(19.2));

    // A later report replaces the earlier one whole.
    let latency_only = json!({ "latency": figures["latency"] });
    let (status, json) = post(&url, Some(&one.token), Some(&one.binding), report(latency_only.clone(), false)).await;
    assert_eq!(status, 200, "{json}");
    let results = sessions.get(&one.name).await.unwrap().status.unwrap().results.unwrap();
    assert!(results.household.is_empty() && results.download_mbps.is_none(), "{results:?}");

    // The final report completes the session and releases its pod; the
    // results stay.
    let (status, json) = post(&url, Some(&one.token), Some(&one.binding), report(figures.clone(), true)).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["final"], true);
    let completed = eventually(Duration::from_secs(20), "the session to complete", || async {
        let session = sessions.get(&one.name).await.ok()?;
        (session.status.as_ref()?.phase == Phase::Completed).then_some(session)
    })
    .await
    .unwrap();
    let results = completed.status.unwrap().results.unwrap();
    assert!(results.is_final);
    assert_eq!(results.household.len(), 1);
    eventually(Duration::from_secs(20), "the completed session's pod to go", || async {
        pods.get_opt(&one.pod).await.ok()?.is_none_or(|p| p.metadata.deletion_timestamp.is_some()).then_some(())
    })
    .await
    .unwrap();

    // The final report again (a retry whose answer was lost) is accepted
    // and changes nothing; a progress report after it is refused.
    let (status, json) = post(&url, Some(&one.token), Some(&one.binding), report(json!({}), true)).await;
    assert_eq!((status, &json["final"]), (200, &json!(true)), "{json}");
    let kept = sessions.get(&one.name).await.unwrap().status.unwrap().results.unwrap();
    assert_eq!(kept.household.len(), 1, "a repeated final report replaced the first");
    let (status, json) = post(&url, Some(&one.token), Some(&one.binding), report(figures, false)).await;
    assert_eq!(status, 409, "{json}");
    assert!(json["error"].as_str().unwrap().contains("final results"), "{json}");
}
