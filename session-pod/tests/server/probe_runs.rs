//! `POST /api/v1/probes`: only the targets the session token names, once or
//! every interval.

use reqwest::StatusCode;
use serde_json::json;
use tidepool_crds::test_session::{ProbeKind, ProbeTarget};
use tidepool_protocol::BINDING_HEADER;
use tidepool_protocol::pod::{PROBES_PATH, ProbeResponse, probes_digest};

use crate::support::*;

/// A request with a token whose claims name `targets` as the session's probes.
fn with_targets(pod: &Pod, method: reqwest::Method, path: &str, targets: &[ProbeTarget]) -> reqwest::RequestBuilder {
    let mut claims = claims(SID, unix_now() + 3600);
    claims.probes = probes_digest(targets);
    let (token, ticket) = (pod.key.sign_session(&claims), pod.key.sign_binding(SID, POD));
    pod.http.request(method, pod.url(path)).bearer_auth(token).header(BINDING_HEADER, ticket)
}

fn tcp(port: u16) -> ProbeTarget {
    ProbeTarget { kind: ProbeKind::Tcp, url: None, host: Some("127.0.0.1".into()), port: Some(i32::from(port)) }
}

#[tokio::test]
async fn the_sessions_own_targets_are_probed_and_no_others() {
    let pod = start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let targets = vec![tcp(listener.local_addr().unwrap().port())];
    let body = json!({ "targets": targets });

    let response =
        with_targets(&pod, reqwest::Method::POST, PROBES_PATH, &targets).json_body(&body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let answer: ProbeResponse = json(response).await;
    assert_eq!(answer.results.len(), 1);
    assert!(answer.results[0].ok, "{:?}", answer.results[0]);
    assert!(answer.results[0].timings.as_ref().unwrap().connect_ms.is_some());

    // Other targets than the token's: refused, whatever they are.
    let other = json!({ "targets": [tcp(9)] });
    let (status, message) = refusal(
        with_targets(&pod, reqwest::Method::POST, PROBES_PATH, &targets).json_body(&other).send().await.unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(message.contains("not this session's spec.probes"), "{message}");

    // A session with no targets may probe nothing (another pod: a pod keeps
    // the claims of the session it first served).
    let plain = start().await;
    let (status, message) = refusal(plain.post(PROBES_PATH).json_body(&body).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(message.contains("no probe targets"), "{message}");

    // A bad tier or interval: 422 naming it.
    let bad_tier = json!({ "targets": targets, "tier": 4 });
    let (status, message) = refusal(
        with_targets(&pod, reqwest::Method::POST, PROBES_PATH, &targets).json_body(&bad_tier).send().await.unwrap(),
    )
    .await;
    assert_eq!((status, message.contains("tier")), (StatusCode::UNPROCESSABLE_ENTITY, true), "{message}");
    // A client may not start above the tier its token allows (1 here): only
    // the operator raises it.
    let higher = json!({ "targets": targets, "tier": 2 });
    let (status, message) = refusal(
        with_targets(&pod, reqwest::Method::POST, PROBES_PATH, &targets).json_body(&higher).send().await.unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{message}");
    assert!(message.contains("tier 1 at most"), "{message}");
    let path = format!("{PROBES_PATH}?everySeconds=1");
    let (status, message) =
        refusal(with_targets(&pod, reqwest::Method::POST, &path, &targets).json_body(&body).send().await.unwrap())
            .await;
    assert_eq!((status, message.contains("everySeconds")), (StatusCode::UNPROCESSABLE_ENTITY, true), "{message}");
}

#[tokio::test]
async fn continuous_runs_keep_their_results_until_stopped() {
    let pod = start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let targets = vec![tcp(listener.local_addr().unwrap().port())];
    let path = format!("{PROBES_PATH}?everySeconds=10");
    let body = json!({ "targets": targets });
    let response = with_targets(&pod, reqwest::Method::POST, &path, &targets).json_body(&body).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    // The first run starts at once; its results become the pod's latest.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let latest = loop {
        if let Some(results) = pod.server.latest_results() {
            break results;
        }
        assert!(std::time::Instant::now() < deadline, "no continuous run finished");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(latest.probes.len(), 1);
    assert!(latest.probes[0].ok && !latest.is_final);

    let stop = with_targets(&pod, reqwest::Method::DELETE, PROBES_PATH, &targets).send().await.unwrap();
    assert_eq!(stop.status(), StatusCode::OK);
    let again = with_targets(&pod, reqwest::Method::DELETE, PROBES_PATH, &targets).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
}
