//! `POST /api/v1/sessions/{name}/results`: a session pod reports what its
//! session measured, and the operator keeps it in the TestSession's status.
//!
//! The pod holds no API token. It proves itself with the session's own
//! credentials, which only the client and the bound pod have: the session
//! token (signed with the pool's key, naming this session) and the binding
//! ticket for the session's current pod. Both are checked against this
//! replica's caches (the pool, its key, the session) before any API call, so
//! forged credentials cost the API server nothing, and every credential that
//! does not fit gets the same 403: whoever lacks the credentials learns
//! nothing, not even whether the session exists.

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
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tidepool_crds::TestSession;
use tidepool_crds::test_session::SessionResults;
use tidepool_protocol::BINDING_HEADER;
use tidepool_protocol::api::NamespaceQuery;
use tidepool_protocol::grading;
use tidepool_protocol::results::{ResultsSubmission, validate};
use tidepool_wire::token::{PoolPublicKey, TokenError};

use super::refuse;
use super::reply::{Refused, json_body, kube_refusal};
use super::state::ApiState;
use crate::{labels, names};

/// Writes that lost a race are tried again this many times in all.
const WRITE_ATTEMPTS: u32 = 5;

/// The one answer to credentials that do not fit this session.
const NOT_YOURS: &str = "these credentials are not for this session";

pub async fn submit(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(query): Query<NamespaceQuery>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let response = match accept(&state, &name, query.namespace, &headers, body).await {
        Ok(response) => response,
        Err(refused) => refuse(&state, "results", refused),
    };
    state.metrics.api_requests.with_label_values(&["results", response.status().as_str()]).inc();
    response
}

fn not_yours() -> Refused {
    Refused::new(StatusCode::FORBIDDEN, "bad_credentials", NOT_YOURS)
}

async fn accept(
    state: &ApiState,
    name: &str,
    namespace: Option<String>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Refused> {
    let namespace = namespace.unwrap_or_else(|| state.namespace.clone());
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let token = header(header::AUTHORIZATION.as_str()).and_then(tidepool_protocol::bearer_token);
    let (Some(token), Some(ticket)) = (token, header(BINDING_HEADER)) else {
        let message = format!("results need the session token and the {BINDING_HEADER} ticket");
        return Err(Refused::new(StatusCode::UNAUTHORIZED, "no_credentials", message));
    };
    if names::namespace(&namespace).is_err() || names::object("TestSession", name).is_err() {
        return Err(not_yours());
    }
    let (session, keys) = check_credentials(state, &namespace, name, token, ticket).await?;
    // Read only after the credentials fit: strangers learn nothing of the shape.
    let submission: ResultsSubmission = json_body(body)?;
    validate(&submission.results)
        .map_err(|invalid| Refused::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_field", invalid.to_string()))?;
    let mut results = submission.results;
    // Graded here again: the grades in status follow the operator's rules,
    // whatever the sender computed.
    grading::grade(&mut results);
    results.is_final = submission.is_final;
    write(state, &namespace, name, session, &keys, token, ticket, results).await
}

/// The token must be signed by the pool's key (current, or the previous one
/// during a rotation) and name this very session; the ticket must bind it to
/// the pod the session is bound to now. Every check reads this replica's
/// caches; the key is read from its Secret at most every 30 s.
async fn check_credentials(
    state: &ApiState,
    namespace: &str,
    name: &str,
    token: &str,
    ticket: &str,
) -> Result<(Arc<TestSession>, tidepool_wire::token::PublicKeys), Refused> {
    // Unverified, only to find the key that would have signed it.
    let claimed = PoolPublicKey::unverified_claims(token).map_err(|_| not_yours())?;
    if claimed.ns != namespace || claimed.name != name || names::object("WarmPool", &claimed.pool).is_err() {
        return Err(not_yours());
    }
    let pool = state.pools.get(&ObjectRef::new(&claimed.pool).within(namespace)).ok_or_else(not_yours)?;
    let pool_uid = pool.uid().ok_or_else(not_yours)?;
    let keys = match state.keys.load(&state.client, namespace, &claimed.pool, &pool_uid).await {
        Ok(Some(keys)) => keys.public(),
        Ok(None) => return Err(not_yours()),
        Err(e) => {
            tracing::warn!(error = %e, "reading a pool's key for results");
            return Err(Refused::new(StatusCode::SERVICE_UNAVAILABLE, "kube_unavailable", "try again"));
        }
    };
    let now = u64::try_from(Timestamp::now().as_second()).unwrap_or(0);
    let claims = keys.verify_session(token, now).map_err(|e| match e {
        // Signed by the pool, so the sender held a real token once.
        TokenError::Expired { .. } => Refused::new(StatusCode::UNAUTHORIZED, "expired", format!("session token: {e}")),
        _ => not_yours(),
    })?;
    // The token is the pool's own from here on: a cache that lags the
    // session (just made, just rebound) is worth one read.
    let cached = state.sessions.get(&ObjectRef::new(name).within(namespace));
    let fits = |session: &TestSession| {
        session.uid().as_deref() == Some(claims.sid.as_str())
            && check_ticket(session, &keys, &claims.sid, ticket).is_ok()
    };
    let session = match cached {
        Some(session) if fits(&session) => session,
        _ => {
            let api: Api<TestSession> = Api::namespaced(state.client.clone(), namespace);
            let fresh = api.get_opt(name).await.map_err(|e| kube_refusal(e, "reading the session"))?;
            Arc::new(fresh.filter(|s| fits(s)).ok_or_else(not_yours)?)
        }
    };
    Ok((session, keys))
}

fn check_ticket(
    session: &TestSession,
    keys: &tidepool_wire::token::PublicKeys,
    sid: &str,
    ticket: &str,
) -> Result<(), Refused> {
    let pod = session.status.as_ref().and_then(|s| s.pod.as_deref()).ok_or_else(not_yours)?;
    keys.verify_binding(ticket, sid, pod).map_err(|_| not_yours())
}

/// Writes `results` into the session's status, conditional on the version
/// checked; a write that raced another (a second report, the controller's)
/// reads the session again and checks it again.
#[allow(clippy::too_many_arguments)]
async fn write(
    state: &ApiState,
    namespace: &str,
    name: &str,
    mut session: Arc<TestSession>,
    keys: &tidepool_wire::token::PublicKeys,
    token: &str,
    ticket: &str,
    mut results: SessionResults,
) -> Result<Response, Refused> {
    let api: Api<TestSession> = Api::namespaced(state.client.clone(), namespace);
    for _ in 0..WRITE_ATTEMPTS {
        let status = session.status.clone().unwrap_or_default();
        if status.results.as_ref().is_some_and(|r| r.is_final) {
            // A final report is kept as it is. Repeating it (a retry whose
            // first answer was lost) succeeds; anything later is refused.
            if results.is_final {
                return Ok(accepted(name, namespace, status.results.as_ref().unwrap_or(&results)));
            }
            let message = format!("session {namespace}/{name} has its final results");
            return Err(Refused::new(StatusCode::CONFLICT, "final", message));
        }
        if status.phase.has_ended() {
            let message = format!("session {namespace}/{name} has ended ({})", status.phase);
            return Err(Refused::new(StatusCode::CONFLICT, "ended", message));
        }
        results.reported_at = Some(Time(Timestamp::now()));
        // `add` replaces the whole object, so nothing of an earlier report
        // lingers; the resourceVersion makes the write conditional on what
        // was read and checked.
        let patch = json!([
            { "op": "add", "path": "/metadata/resourceVersion", "value": session.resource_version() },
            { "op": "add", "path": "/status/results", "value": results },
        ]);
        let patch: json_patch::Patch = serde_json::from_value(patch).map_err(|e| {
            Refused::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("building the patch: {e}"))
        })?;
        let params = PatchParams { field_manager: Some(labels::MANAGER.into()), ..PatchParams::default() };
        match api.patch_status(name, &params, &Patch::<()>::Json(patch)).await {
            Ok(_) => {
                tracing::info!(session = %name, namespace = %namespace, is_final = results.is_final, "results reported");
                return Ok(accepted(name, namespace, &results));
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // The cache was behind, or another write won: read it again.
                let fresh = api.get_opt(name).await.map_err(|e| kube_refusal(e, "reading the session"))?;
                let fresh = Arc::new(fresh.ok_or_else(not_yours)?);
                let sid = fresh.meta().uid.clone().unwrap_or_default();
                check_ticket(&fresh, keys, &sid, ticket)?;
                if PoolPublicKey::unverified_claims(token).map(|c| c.sid) != Ok(sid) {
                    return Err(not_yours());
                }
                session = fresh;
            }
            Err(e) => return Err(kube_refusal(e, "writing the results")),
        }
    }
    let message = format!("session {namespace}/{name} kept changing; try again");
    Err(Refused::new(StatusCode::SERVICE_UNAVAILABLE, "contended", message))
}

fn accepted(name: &str, namespace: &str, results: &SessionResults) -> Response {
    let body = json!({ "name": name, "namespace": namespace, "final": results.is_final, "grades": results.grades });
    (StatusCode::OK, Json(body)).into_response()
}
