//! `POST /api/v1/sessions/{name}/results`: a session pod reports what its
//! session measured, and the operator keeps it in the TestSession's status.
//!
//! The pod holds no API token. It proves itself with the session's own
//! credentials, which only the client and the bound pod have: the session
//! token (checked against the pool's key, and naming this session) and the
//! binding ticket for the session's current pod. Any replica may accept
//! results, as any replica may create sessions: it is an API write, and the
//! leader's controller acts on it (a final report completes the session).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use tidepool_crds::TestSession;
use tidepool_crds::test_session::Phase;
use tidepool_crds::test_session::SessionResults;
use tidepool_protocol::BINDING_HEADER;
use tidepool_protocol::api::NamespaceQuery;
use tidepool_protocol::grading;
use tidepool_protocol::results::{ResultsSubmission, validate};
use tidepool_wire::token::{PoolPublicKey, TokenError};

use super::reply::{error, json_body, kube_error};
use super::sessions::lookup_pool_uid;
use super::state::ApiState;
use crate::labels;

pub async fn submit(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(query): Query<NamespaceQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let response = accept(&state, &name, query.namespace, &headers, body).await;
    state.metrics.api_requests.with_label_values(&["results", response.status().as_str()]).inc();
    response
}

async fn accept(
    state: &ApiState,
    name: &str,
    namespace: Option<String>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let namespace = namespace.unwrap_or_else(|| state.namespace.clone());
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let token = header(header::AUTHORIZATION.as_str()).and_then(|v| v.strip_prefix("Bearer "));
    let (Some(token), Some(ticket)) = (token, header(BINDING_HEADER)) else {
        return error(
            StatusCode::UNAUTHORIZED,
            format!("results need the session token and the {BINDING_HEADER} ticket"),
        );
    };
    let submission: ResultsSubmission = match json_body(body) {
        Ok(submission) => submission,
        Err(refused) => return refused.into_response(),
    };

    // The token names its session: a token for another one is refused before
    // any API call, and a missing session looks the same as a wrong token, so
    // the route tells nothing to whoever lacks the credentials.
    let not_yours = || error(StatusCode::FORBIDDEN, format!("the session token is not for session {namespace}/{name}"));
    match PoolPublicKey::unverified_claims(token) {
        Ok(claims) if claims.ns == namespace && claims.name == name => {}
        _ => return not_yours(),
    }
    if let Err(invalid) = validate(&submission.results) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, invalid.to_string());
    }
    let mut results = submission.results;
    // Graded here again: the grades in status follow the operator's rules,
    // whatever the sender computed.
    grading::grade(&mut results);
    results.is_final = submission.is_final;

    let api: Api<TestSession> = Api::namespaced(state.client.clone(), &namespace);
    // Read, check, write with the version read as a precondition; a write
    // that raced another (a second report, the controller's) reads again.
    for _ in 0..WRITE_ATTEMPTS {
        let session = match api.get_opt(name).await {
            Ok(Some(session)) => session,
            Ok(None) => return not_yours(),
            Err(e) => return unavailable(e),
        };
        if let Err(response) = check_credentials(state, &session, token, ticket).await {
            return response;
        }
        let status = session.status.clone().unwrap_or_default();
        if status.results.as_ref().is_some_and(|r| r.is_final) {
            // A final report is kept as it is. Repeating it (a retry whose
            // first answer was lost) succeeds; anything later is refused.
            if results.is_final {
                return accepted(name, &namespace, status.results.as_ref().unwrap_or(&results));
            }
            return error(StatusCode::CONFLICT, format!("session {namespace}/{name} has its final results"));
        }
        if matches!(status.phase, Phase::Completed | Phase::Expired | Phase::Failed) {
            return error(StatusCode::CONFLICT, format!("session {namespace}/{name} has ended ({:?})", status.phase));
        }
        results.reported_at = Some(Time(Timestamp::now()));
        // `add` replaces the whole object, so nothing of an earlier report
        // lingers; the resourceVersion makes the write conditional on what
        // was read and checked.
        let patch = json!([
            { "op": "add", "path": "/metadata/resourceVersion", "value": session.resource_version() },
            { "op": "add", "path": "/status/results", "value": results },
        ]);
        let patch: json_patch::Patch = match serde_json::from_value(patch) {
            Ok(patch) => patch,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("building the status patch: {e}")),
        };
        let params = PatchParams { field_manager: Some(labels::MANAGER.into()), ..PatchParams::default() };
        match api.patch_status(name, &params, &Patch::<()>::Json(patch)).await {
            Ok(_) => {
                tracing::info!(session = %name, namespace = %namespace, is_final = results.is_final, "results reported");
                return accepted(name, &namespace, &results);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return kube_error(e),
        }
    }
    error(StatusCode::SERVICE_UNAVAILABLE, format!("session {namespace}/{name} kept changing; try again"))
}

/// Writes that lost a race are tried again this many times in all.
const WRITE_ATTEMPTS: u32 = 5;

fn accepted(name: &str, namespace: &str, results: &SessionResults) -> Response {
    let body = json!({ "name": name, "namespace": namespace, "final": results.is_final, "grades": results.grades });
    (StatusCode::OK, Json(body)).into_response()
}

/// The API server could not be asked: the sender may try again.
fn unavailable(e: kube::Error) -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, format!("Kubernetes API: {e}"))
}

/// The token must verify with the pool's key and name this very session;
/// the ticket must bind it to the pod the session is bound to now.
async fn check_credentials(state: &ApiState, session: &TestSession, token: &str, ticket: &str) -> Result<(), Response> {
    let namespace = session.namespace().unwrap_or_default();
    let refuse = |message: String| error(StatusCode::FORBIDDEN, message);
    let pool_uid = match lookup_pool_uid(state, &namespace, &session.spec.pool).await {
        Ok(Some(uid)) => uid,
        Ok(None) => {
            let message = format!("WarmPool {} is gone; its sessions' results are not accepted", session.spec.pool);
            return Err(refuse(message));
        }
        Err(e) => return Err(unavailable(e)),
    };
    let key = match state.keys.load(&state.client, &namespace, &session.spec.pool, &pool_uid).await {
        Ok(Some(key)) => key,
        Ok(None) => return Err(refuse(format!("WarmPool {} has no session key", session.spec.pool))),
        Err(e) => return Err(error(StatusCode::SERVICE_UNAVAILABLE, format!("reading the pool's key: {e}"))),
    };
    let now = u64::try_from(Timestamp::now().as_second()).unwrap_or(0);
    let claims = key.public().verify_session(token, now).map_err(|e| match e {
        TokenError::Expired { .. } => error(StatusCode::UNAUTHORIZED, format!("session token: {e}")),
        other => refuse(format!("session token: {other}")),
    })?;
    let uid = session.meta().uid.clone().unwrap_or_default();
    if claims.sid != uid || claims.name != session.name_any() || claims.ns != namespace {
        return Err(refuse(format!("the session token is for session {}/{}, not this one", claims.ns, claims.name)));
    }
    let pod = session.status.as_ref().and_then(|s| s.pod.as_deref()).ok_or_else(|| {
        error(StatusCode::CONFLICT, format!("session {namespace}/{} is not bound to a pod", session.name_any()))
    })?;
    key.public()
        .verify_binding(ticket, &uid, pod)
        .map_err(|_| refuse(format!("the binding ticket is not for pod {pod}, the session's current pod")))
}
