//! The binding's API writes against a mocked API server, in order: the happy
//! path, and the 409 and 404 paths of a claim.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::Action;
use serde_json::json;
use tidepool_crds::{TestSession, WarmPool};

use super::reconcile;
use crate::error::Error;
use crate::testing::{self, ApiServer};

const POD_PATH: &str = "/api/v1/namespaces/default/pods";
const STATUS_PATH: &str = "/apis/tidepool.dev/v1alpha1/namespaces/default/testsessions/alice/status";
const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

fn pool() -> WarmPool {
    serde_json::from_value(json!({
        "apiVersion": tidepool_crds::API_VERSION, "kind": "WarmPool",
        "metadata": { "name": "edge", "namespace": "default", "uid": "pool-uid" },
        "spec": { "size": 2, "tier": { "vcpu": 1, "memoryMiB": 64 },
                  "template": { "spec": { "containers": [{ "name": "s", "image": "i" }] } } }
    }))
    .unwrap()
}

/// A ready warm pod of the pool at `version`, claimed by `session` if given.
fn pod(name: &str, version: &str, session: Option<&str>) -> Pod {
    let hash = crate::pods::template_hash(&pool());
    let mut annotations = serde_json::Map::new();
    if let Some(uid) = session {
        annotations.insert("tidepool.dev/session-uid".into(), json!(uid));
    }
    serde_json::from_value(json!({
        "metadata": { "name": name, "namespace": "default", "uid": format!("{name}-uid"), "resourceVersion": version,
            "labels": { "tidepool.dev/pool": "edge", "tidepool.dev/state": if session.is_some() { "assigned" } else { "warm" },
                        "tidepool.dev/template-hash": hash },
            "annotations": annotations,
            "ownerReferences": [{ "apiVersion": tidepool_crds::API_VERSION, "kind": "WarmPool", "name": "edge",
                                  "uid": "pool-uid", "controller": true }] },
        "spec": { "containers": [{ "name": "s", "image": "i", "ports": [{ "containerPort": 9000 }] }], "nodeName": "n1" },
        "status": { "phase": "Running", "podIP": "127.16.0.7", "conditions": [{ "type": "Ready", "status": "True" }] }
    }))
    .unwrap()
}

fn session(status: serde_json::Value) -> Arc<TestSession> {
    Arc::new(
        serde_json::from_value(json!({
            "apiVersion": tidepool_crds::API_VERSION, "kind": "TestSession",
            "metadata": { "name": "alice", "namespace": "default", "uid": "s-1", "generation": 1,
                          "creationTimestamp": k8s_openapi::jiff::Timestamp::now().to_string() },
            "spec": { "pool": "edge" },
            "status": status
        }))
        .unwrap(),
    )
}

fn pending() -> Arc<TestSession> {
    session(json!({ "phase": "Pending" }))
}

/// Expects the claim of `pod` at `version`, and returns the call to answer.
async fn expect_claim(api: &mut ApiServer, pod: &str, version: &str) -> testing::Call {
    let call = api.expect(Method::PATCH, &format!("{POD_PATH}/{pod}")).await;
    let metadata = &call.body["metadata"];
    assert_eq!(metadata["resourceVersion"], version, "{}", call.body);
    assert_eq!(metadata["labels"]["tidepool.dev/state"], "assigned");
    assert_eq!(metadata["annotations"]["tidepool.dev/session-uid"], "s-1");
    call
}

/// Expects a read of `pod` and answers it at `version`, held by `session`.
async fn expect_pod_read(api: &mut ApiServer, pod: &str, version: &str, session: Option<&str>) {
    api.expect(Method::GET, &format!("{POD_PATH}/{pod}"))
        .await
        .answer(StatusCode::OK, &self::pod(pod, version, session));
}

/// Expects the Ready status naming `pod`, and answers it.
async fn expect_ready(api: &mut ApiServer, pod: &str, reason: &str) {
    let call = api.expect(Method::PATCH, STATUS_PATH).await;
    let status = call.body["status"].clone();
    assert_eq!((status["phase"].as_str(), status["pod"].as_str()), (Some("Ready"), Some(pod)), "{}", call.body);
    assert_eq!(status["endpoint"], "http://127.16.0.7:9000");
    assert!(status.get("results").is_none(), "a status write names results: {}", call.body);
    let bound = status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Bound").unwrap();
    assert_eq!(bound["reason"], reason);
    // The API server drops what a merge patch sets to null.
    let mut stored = status;
    if let Some(fields) = stored.as_object_mut() {
        fields.retain(|_, v| !v.is_null());
    }
    call.answer(StatusCode::OK, &*session(stored));
}

async fn run(
    session: Arc<TestSession>,
    ctx: Arc<crate::context::Context>,
) -> tokio::task::JoinHandle<Result<Action, Error>> {
    tokio::spawn(reconcile(session, ctx))
}

/// A pending session's pass, started with one warm pod (`edge-a` at
/// version 1) in the caches.
async fn pending_with_one_warm_pod()
-> (Arc<crate::context::Context>, ApiServer, tokio::task::JoinHandle<Result<Action, Error>>) {
    let (ctx, api, mut caches) = testing::context();
    caches.pool(pool());
    caches.pod(pod("edge-a", "1", None));
    let pass = run(pending(), ctx.clone()).await;
    (ctx, api, pass)
}

#[tokio::test]
async fn a_pending_session_claims_a_warm_pod_then_turns_ready_in_two_writes() {
    let (ctx, mut api, pass) = pending_with_one_warm_pod().await;
    expect_claim(&mut api, "edge-a", "1").await.answer(StatusCode::OK, &pod("edge-a", "2", Some("s-1")));
    expect_ready(&mut api, "edge-a", "Bound").await;
    let action = pass.await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(super::decide::SETTLED_RECHECK));
    api.expect_nothing(Duration::from_millis(100)).await;
    assert!(ctx.memory.is_reserved("default/edge-a"), "a won claim keeps its pod reserved until the cache shows it");
}

#[tokio::test]
async fn a_claim_refused_with_409_reads_the_pod_and_claims_it_again_while_it_is_warm() {
    let (ctx, mut api, pass) = pending_with_one_warm_pod().await;
    expect_claim(&mut api, "edge-a", "1").await.refuse(409, "Conflict");
    expect_pod_read(&mut api, "edge-a", "5", None).await;
    expect_claim(&mut api, "edge-a", "5").await.answer(StatusCode::OK, &pod("edge-a", "6", Some("s-1")));
    expect_ready(&mut api, "edge-a", "Bound").await;
    pass.await.unwrap().unwrap();
    assert_eq!(ctx.metrics.binding_conflicts.get(), 1);
}

#[tokio::test]
async fn a_claim_refused_with_409_for_a_pod_we_claimed_already_goes_on() {
    // The first claim was applied, but its answer was lost.
    let (_, mut api, pass) = pending_with_one_warm_pod().await;
    expect_claim(&mut api, "edge-a", "1").await.refuse(409, "Conflict");
    expect_pod_read(&mut api, "edge-a", "2", Some("s-1")).await;
    expect_ready(&mut api, "edge-a", "Bound").await;
    pass.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_claim_refused_with_409_for_a_pod_another_session_took_is_lost_and_frees_the_pod() {
    let (ctx, mut api, pass) = pending_with_one_warm_pod().await;
    expect_claim(&mut api, "edge-a", "1").await.refuse(409, "Conflict");
    expect_pod_read(&mut api, "edge-a", "2", Some("s-9")).await;
    let action = pass.await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(super::LOST_RETRY), "a lost claim tries again from fresh caches");
    api.expect_nothing(Duration::from_millis(100)).await;
    assert!(!ctx.memory.is_reserved("default/edge-a"));
}

#[tokio::test]
async fn a_second_409_loses_the_claim() {
    let (ctx, mut api, pass) = pending_with_one_warm_pod().await;
    expect_claim(&mut api, "edge-a", "1").await.refuse(409, "Conflict");
    expect_pod_read(&mut api, "edge-a", "5", None).await;
    expect_claim(&mut api, "edge-a", "5").await.refuse(409, "Conflict");
    assert_eq!(pass.await.unwrap().unwrap(), Action::requeue(super::LOST_RETRY));
    assert_eq!(ctx.metrics.binding_conflicts.get(), 2);
    assert!(!ctx.memory.is_reserved("default/edge-a"));
}

#[tokio::test]
async fn a_claim_on_a_pod_that_is_gone_is_lost_without_a_read() {
    let (ctx, mut api, pass) = pending_with_one_warm_pod().await;
    expect_claim(&mut api, "edge-a", "1").await.refuse(404, "NotFound");
    assert_eq!(pass.await.unwrap().unwrap(), Action::requeue(super::LOST_RETRY));
    api.expect_nothing(Duration::from_millis(100)).await;
    assert!(!ctx.memory.is_reserved("default/edge-a"));
}

#[tokio::test]
async fn a_session_whose_pod_died_deletes_it_claims_another_and_says_it_rebound() {
    let (ctx, mut api, mut caches) = testing::context();
    caches.pool(pool());
    let mut dead = pod("edge-a", "3", Some("s-1"));
    dead.status.as_mut().unwrap().phase = Some("Failed".into());
    caches.pod(dead);
    caches.pod(pod("edge-b", "1", None));
    let ready = session(json!({ "phase": "Ready", "pod": "edge-a" }));
    let pass = run(ready, ctx.clone()).await;
    // Already gone: a 404 on the delete is fine.
    let delete = api.expect(Method::DELETE, &format!("{POD_PATH}/edge-a")).await;
    assert_eq!(delete.body["preconditions"]["uid"], "edge-a-uid", "{}", delete.body);
    delete.refuse(404, "NotFound");
    expect_claim(&mut api, "edge-b", "1").await.answer(StatusCode::OK, &pod("edge-b", "2", Some("s-1")));
    expect_ready(&mut api, "edge-b", "Rebound").await;
    let event = api.expect(Method::POST, EVENTS_PATH).await;
    assert_eq!(event.body["reason"], "Rebound", "{}", event.body);
    let body = event.body.clone();
    event.answer(StatusCode::CREATED, &body);
    pass.await.unwrap().unwrap();
}

#[tokio::test]
async fn an_ended_session_past_its_retention_is_deleted_even_if_already_gone() {
    let (ctx, mut api, mut caches) = testing::context();
    caches.pool(pool());
    let long_ago = "2020-01-01T00:00:00Z";
    let ended = session(json!({ "phase": "Expired", "conditions": [{ "type": "Ready", "status": "False",
        "reason": "Expired", "message": "m", "lastTransitionTime": long_ago }] }));
    let pass = run(ended, ctx.clone()).await;
    let delete = api.expect(Method::DELETE, "/apis/tidepool.dev/v1alpha1/namespaces/default/testsessions/alice").await;
    assert_eq!(delete.body["preconditions"]["uid"], "s-1");
    delete.refuse(404, "NotFound");
    assert_eq!(pass.await.unwrap().unwrap(), Action::await_change());
}
