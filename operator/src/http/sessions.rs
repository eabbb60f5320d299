//! `POST /api/v1/sessions`, `GET` and `DELETE /api/v1/sessions/{name}`:
//! sessions for clients, made as TestSessions and answered with the
//! credentials the session pod checks.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::{StreamExt, TryStreamExt};
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, PostParams, WatchEvent, WatchParams};
use serde_json::json;
use tidepool_crds::test_session::Phase;
use tidepool_crds::{API_VERSION, TestSession, WarmPool};
use tidepool_protocol::api::{CreateSession, NamespaceQuery, NotReadyInTime, SessionView};
use tidepool_protocol::pod::probes_digest;
use tidepool_wire::token::SessionClaims;

use super::reply::{error, json_body, kube_error};
use super::state::ApiState;
use crate::conditions;

pub async fn create(State(state): State<Arc<ApiState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let request: CreateSession = match json_body(body) {
        Ok(request) => request,
        Err(refused) => return refused.into_response(),
    };
    let namespace = request.namespace.clone().unwrap_or_else(|| state.namespace.clone());
    let pools: Api<WarmPool> = Api::namespaced(state.client.clone(), &namespace);
    let pool_uid = match pools.get_metadata_opt(&request.pool).await {
        Ok(Some(pool)) => pool.uid(),
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no WarmPool {namespace}/{}", request.pool)),
        Err(e) => return kube_error(e),
    };
    // The request's fields are the spec's, by name and spelling.
    let mut spec = match serde_json::to_value(&request) {
        Ok(spec) => spec,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid session: {e}")),
    };
    if let Some(fields) = spec.as_object_mut() {
        fields.remove("namespace");
    }
    let object = json!({
        "apiVersion": API_VERSION,
        "kind": "TestSession",
        "metadata": { "generateName": "session-", "namespace": namespace },
        "spec": spec,
    });
    // Sent untyped, so the API server's schema and CEL rules judge it and
    // their messages (which name the field) reach the client.
    let object: DynamicObject = match serde_json::from_value(object) {
        Ok(object) => object,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid session: {e}")),
    };
    let dynamic: Api<DynamicObject> = Api::namespaced_with(state.client.clone(), &namespace, &session_resource());
    let created: TestSession = match dynamic.create(&PostParams::default(), &object).await {
        Ok(created) => match serde_json::to_value(created).and_then(serde_json::from_value) {
            Ok(session) => session,
            Err(e) => return error(StatusCode::BAD_GATEWAY, format!("unreadable session: {e}")),
        },
        Err(e) => return kube_error(e),
    };
    let api: Api<TestSession> = Api::namespaced(state.client.clone(), &namespace);
    let name = created.name_any();
    let ready = tokio::time::timeout(state.ready_deadline, wait_ready(&api, &created)).await;
    match ready {
        Ok(Ok(session)) => (StatusCode::CREATED, Json(view(&state, &session, pool_uid).await)).into_response(),
        Ok(Err(e)) => kube_error(e),
        Err(_) => {
            let latest = api.get_opt(&name).await.ok().flatten().unwrap_or(created);
            let session = view(&state, &latest, pool_uid).await;
            let reason = session.reason.clone().unwrap_or_else(|| "no pod became ready in time".into());
            let body = NotReadyInTime {
                error: format!("session {name} was not ready within {:?}: {reason}", state.ready_deadline),
                code: StatusCode::GATEWAY_TIMEOUT.as_u16(),
                session,
            };
            (StatusCode::GATEWAY_TIMEOUT, Json(body)).into_response()
        }
    }
}

/// Watches one session from the version the create returned until it is Ready.
async fn wait_ready(api: &Api<TestSession>, created: &TestSession) -> Result<TestSession, kube::Error> {
    let params = WatchParams::default().fields(&format!("metadata.name={}", created.name_any()));
    let version = created.resource_version().unwrap_or_else(|| "0".into());
    loop {
        let mut events = api.watch(&params, &version).await?.boxed();
        while let Some(event) = events.try_next().await? {
            if let WatchEvent::Added(s) | WatchEvent::Modified(s) = event
                && s.status.as_ref().is_some_and(|st| st.phase == Phase::Ready)
            {
                return Ok(s);
            }
        }
        // The watch ended early (a server timeout): look once, then watch again.
        let now = api.get(&created.name_any()).await?;
        if now.status.as_ref().is_some_and(|st| st.phase == Phase::Ready) {
            return Ok(now);
        }
    }
}

pub async fn get(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(query): Query<NamespaceQuery>,
) -> Response {
    let namespace = query.namespace.unwrap_or_else(|| state.namespace.clone());
    let api: Api<TestSession> = Api::namespaced(state.client.clone(), &namespace);
    match api.get_opt(&name).await {
        Ok(Some(session)) => Json(view(&state, &session, None).await).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no session {namespace}/{name}")),
        Err(e) => kube_error(e),
    }
}

pub async fn delete(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    Query(query): Query<NamespaceQuery>,
) -> Response {
    let namespace = query.namespace.unwrap_or_else(|| state.namespace.clone());
    let api: Api<TestSession> = Api::namespaced(state.client.clone(), &namespace);
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            error(StatusCode::NOT_FOUND, format!("no session {namespace}/{name}"))
        }
        Err(e) => kube_error(e),
    }
}

/// What the API shows of a session. `pool_uid` is the pool's UID when the
/// caller has already read it; otherwise it is looked up once a token is due.
async fn view(state: &ApiState, session: &TestSession, pool_uid: Option<String>) -> SessionView {
    let namespace = session.namespace().unwrap_or_default();
    let status = session.status.clone().unwrap_or_default();
    let mut view = SessionView {
        name: session.name_any(),
        namespace: namespace.clone(),
        pool: session.spec.pool.clone(),
        phase: status.phase,
        pod: status.pod.clone(),
        node: status.node.clone(),
        endpoint: status.endpoint.clone(),
        expires_at: status.expires_at.as_ref().map(|t| t.0.to_string()),
        ..SessionView::default()
    };
    if status.phase != Phase::Ready {
        view.reason = status
            .conditions
            .iter()
            .find(|c| c.type_ == conditions::BOUND || c.type_ == conditions::READY)
            .map(|c| c.message.clone());
        return view;
    }
    let (Some(pod), Some(expires), Some(uid)) = (&status.pod, &status.expires_at, session.uid()) else {
        return view;
    };
    let pool_uid = match pool_uid {
        Some(uid) => uid,
        None => match lookup_pool_uid(state, &namespace, &session.spec.pool).await {
            Ok(Some(uid)) => uid,
            _ => return view,
        },
    };
    if let Ok(Some(key)) = state.keys.load(&state.client, &namespace, &session.spec.pool, &pool_uid).await {
        let claims = SessionClaims {
            sid: uid.clone(),
            ns: namespace,
            name: session.name_any(),
            pool: session.spec.pool.clone(),
            profile: serde_json::to_value(session.spec.profile)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            exp: u64::try_from(expires.0.as_second()).unwrap_or(0),
            probes: probes_digest(&session.spec.probes),
            tier: 1,
            kid: String::new(),
        };
        // Signed with the key the bound pod holds (the previous one, for a
        // pod made before a rotation).
        let signer = key.signer_for(status.key_id.as_deref());
        view.token = Some(signer.sign_session(&claims));
        view.binding = Some(signer.sign_binding(&uid, pod));
    }
    view
}

fn session_resource() -> ApiResource {
    ApiResource::erase::<TestSession>(&())
}

/// The pool's UID; None when the pool does not exist.
pub async fn lookup_pool_uid(state: &ApiState, namespace: &str, pool: &str) -> Result<Option<String>, kube::Error> {
    let pools: Api<WarmPool> = Api::namespaced(state.client.clone(), namespace);
    Ok(pools.get_metadata_opt(pool).await?.and_then(|p| p.uid()))
}
