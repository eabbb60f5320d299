//! Who may use the pod: the session token, the binding ticket, the lock.

use reqwest::StatusCode;
use tidepool_protocol::BINDING_HEADER;
use tidepool_protocol::pod::{INFO_PATH, PodInfo};
use tidepool_wire::token::PoolSigningKey;

use crate::support::*;

#[tokio::test]
async fn health_and_metrics_need_no_credentials() {
    let pod = start().await;
    let health = pod.http.get(pod.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.text().await.unwrap(), "ok");
    let metrics = pod.http.get(pod.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    assert!(metrics.text().await.unwrap().contains("tidepool_session_bound 0"));
}

#[tokio::test]
async fn missing_credentials_are_401() {
    let pod = start().await;
    let response = pod.http.get(pod.url(INFO_PATH)).send().await.unwrap();
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let (status, error) = refusal(response).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(error.contains("missing session token"), "{error}");

    let (token, _) = pod.credentials(SID);
    let no_ticket = pod.http.get(pod.url(INFO_PATH)).bearer_auth(token).send().await.unwrap();
    let (status, error) = refusal(no_ticket).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(error.contains("missing binding ticket"), "{error}");
}

#[tokio::test]
async fn an_expired_token_is_401() {
    let pod = start().await;
    let token = pod.key.sign_session(&claims(SID, unix_now() - 1));
    let ticket = pod.key.sign_binding(SID, POD);
    let response =
        pod.http.get(pod.url(INFO_PATH)).bearer_auth(token).header(BINDING_HEADER, ticket).send().await.unwrap();
    let (status, error) = refusal(response).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(error.contains("expired"), "{error}");
}

#[tokio::test]
async fn a_foreign_signature_is_403() {
    let pod = start().await;
    let stranger = PoolSigningKey::generate().unwrap();
    let token = stranger.sign_session(&claims(SID, unix_now() + 60));
    let ticket = stranger.sign_binding(SID, POD);
    let response =
        pod.http.get(pod.url(INFO_PATH)).bearer_auth(token).header(BINDING_HEADER, ticket).send().await.unwrap();
    let (status, error) = refusal(response).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(error.contains("which this pod does not hold"), "{error}");
}

#[tokio::test]
async fn a_ticket_for_another_pod_is_403() {
    let pod = start().await;
    let (token, _) = pod.credentials(SID);
    let ticket = pod.key.sign_binding(SID, "edge-other");
    let response =
        pod.http.get(pod.url(INFO_PATH)).bearer_auth(token).header(BINDING_HEADER, ticket).send().await.unwrap();
    let (status, error) = refusal(response).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(error.contains(POD), "{error}");
}

#[tokio::test]
async fn the_first_session_locks_the_pod() {
    let pod = start().await;
    assert_eq!(pod.get(INFO_PATH).send().await.unwrap().status(), StatusCode::OK);
    let (token, ticket) = pod.credentials("sid-mallory");
    let response =
        pod.http.get(pod.url(INFO_PATH)).bearer_auth(token).header(BINDING_HEADER, ticket).send().await.unwrap();
    let (status, error) = refusal(response).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(error, format!("this pod serves session {SID}"));
    // The first session is still served.
    assert_eq!(pod.get(INFO_PATH).send().await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn credentials_in_the_query_work_and_info_says_who_serves() {
    let pod = start().await;
    let response = pod.http.get(pod.url(&pod.query_credentials(INFO_PATH))).send().await.unwrap();
    let info: PodInfo = json(response).await;
    assert_eq!(
        (info.pod.as_str(), info.pool.as_str(), info.region.as_str(), info.session_id.as_str()),
        (POD, POOL, REGION, SID)
    );
    assert_eq!((info.session_name.as_str(), info.profile.as_str()), ("alice", "household"));
    assert_eq!(info.udp_port, pod.server.udp_addr().port());
    assert!(info.expires_at > unix_now());
}

#[tokio::test]
async fn unknown_routes_and_methods_are_json_errors() {
    let pod = start().await;
    let (status, error) = refusal(pod.http.get(pod.url("/nope")).send().await.unwrap()).await;
    assert_eq!((status, error.as_str()), (StatusCode::NOT_FOUND, "no such route"));
    let (status, _) = refusal(pod.http.post(pod.url("/health")).send().await.unwrap()).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}
