//! `POST /api/v1/tubes`, `GET` and `DELETE /api/v1/tubes/{name}`: tubes
//! for clients, made as Tube resources. The client's offer goes into the
//! Tube's spec, and the POST answers once the pod's answer is in the
//! status (or the tube failed, or the deadline passed): signalling goes
//! through the resource, the API only writes and watches it.
//!
//! Checked before any API call: the caller may create (and get) Tubes in
//! the namespace, and may get the session it names; the names are
//! Kubernetes names in the operator's namespaces; the pool takes tubes to
//! the target. At most [`MAX_CREATIONS`] creations wait at once on a
//! replica; more are refused with 429, not queued.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::{StreamExt, TryStreamExt};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::reflector::ObjectRef;
use tidepool_crds::Tube;
use tidepool_crds::tube::{TubeSpec, TubeState};
use tidepool_protocol::ErrorBody;
use tidepool_protocol::api::NamespaceQuery;
use tidepool_protocol::tube::{CreateTube, TubeView, decode_sdp};

use super::access::{Ask, Caller};
use super::reply::{Refused, json_body, kube_refusal, retry_later};
use super::sessions::{check_names, find_pool};
use super::state::ApiState;
use super::{deny, refuse};
use crate::conditions;
use crate::creators::{CREATED_BY_ANNOTATION, CREATOR_LABEL, creator_label};

/// Tube creations one replica waits on at once.
pub const MAX_CREATIONS: usize = 64;
const ROUTE: &str = "tube";

pub async fn create(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let request: CreateTube = match json_body(body) {
        Ok(request) => request,
        Err(refused) => return refuse(&state, ROUTE, refused),
    };
    let namespace = request.namespace.clone().unwrap_or_else(|| state.namespace.clone());
    let names = match (&request.pool, &request.session) {
        (Some(pool), None) => check_names(&state, &namespace, Some(("WarmPool", pool))),
        (None, Some(session)) => check_names(&state, &namespace, Some(("TestSession", session))),
        _ => Err(Refused::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_field", "give exactly one of pool and session")),
    };
    if let Err(refused) = names {
        return refuse(&state, ROUTE, refused);
    }
    if let Err(e) = decode_sdp(&request.offer) {
        return refuse(&state, ROUTE, Refused::new(StatusCode::BAD_REQUEST, "bad_offer", format!("offer: {e}")));
    }
    // The answer is read back, which needs `get`.
    for verb in ["create", "get"] {
        if let Err(denied) =
            state.access.authorize(&caller, Ask::Tubes { verb, namespace: &namespace, name: None }).await
        {
            return deny(&state, ROUTE, &denied);
        }
    }
    // A tube into someone's session is as good as holding its credentials.
    if let Some(session) = &request.session {
        let ask = Ask::Sessions { verb: "get", namespace: &namespace, name: Some(session) };
        if let Err(denied) = state.access.authorize(&caller, ask).await {
            return deny(&state, ROUTE, &denied);
        }
    }
    let Ok(_permit) = state.tube_creations.clone().try_acquire_owned() else {
        state.metrics.api_refusals.with_label_values(&[ROUTE, "tube_creations"]).inc();
        let message = format!("{MAX_CREATIONS} tubes are being set up through this replica; try again shortly");
        return retry_later(StatusCode::TOO_MANY_REQUESTS, message, 1);
    };
    let spec = TubeSpec {
        session: request.session.clone(),
        pool: request.pool.clone(),
        conversation_type: request.conversation_type,
        target: request.target.clone(),
        offer: request.offer.clone(),
        ice_servers: request.ice_servers.clone(),
        trickle: false,
        ttl_seconds: request.ttl_seconds,
        idle_timeout_seconds: request.idle_timeout_seconds.unwrap_or(600),
    };
    // Refused here when the caches already say so: no object made in vain.
    let pool = match (&request.pool, &request.session) {
        (Some(pool), _) => Some(pool.clone()),
        (None, Some(session)) => match find_session(&state, &namespace, session).await {
            Ok(pool) => Some(pool),
            Err(refused) => return refuse(&state, ROUTE, refused),
        },
        (None, None) => None,
    };
    let mut tube = Tube::new("", spec);
    if let Some(pool) = pool {
        let found = match find_pool(&state, &namespace, &pool).await {
            Ok(found) => found,
            Err(refused) => return refuse(&state, ROUTE, refused),
        };
        if let Some(why) = crate::tube::refusal(&tube, &pool, Some(&found)) {
            return refuse(&state, ROUTE, Refused::new(StatusCode::UNPROCESSABLE_ENTITY, "refused", why));
        }
    }
    tube.metadata.name = None;
    tube.metadata.generate_name = Some("tube-".into());
    tube.metadata.namespace = Some(namespace.clone());
    tube.metadata.labels = Some([(CREATOR_LABEL.to_string(), creator_label(caller.name()))].into());
    tube.metadata.annotations = Some([(CREATED_BY_ANNOTATION.to_string(), caller.name().to_string())].into());
    let api: Api<Tube> = Api::namespaced(state.client.clone(), &namespace);
    let created = match api.create(&PostParams::default(), &tube).await {
        Ok(created) => created,
        Err(e) => return refuse(&state, ROUTE, kube_refusal(e, "creating the tube")),
    };
    let name = created.name_any();
    match tokio::time::timeout(state.ready_deadline, wait_answered(&api, &created)).await {
        Ok(Ok(tube)) => answered(&tube),
        Ok(Err(e)) => {
            abandon(&api, &name).await;
            refuse(&state, ROUTE, kube_refusal(e, "waiting for the tube"))
        }
        Err(_) => {
            let latest = api.get_opt(&name).await.ok().flatten().unwrap_or(created);
            let view = view(&latest);
            let why = view.message.clone().unwrap_or_else(|| "no pod answered".into());
            // Nobody will take an answer that comes later: a pod claimed for
            // it would only wait for a peer that never comes.
            abandon(&api, &name).await;
            let body = ErrorBody {
                error: format!("tube {name} was not answered within {:?}: {why}", state.ready_deadline),
                code: Some(StatusCode::GATEWAY_TIMEOUT.as_u16()),
            };
            (StatusCode::GATEWAY_TIMEOUT, Json(body)).into_response()
        }
    }
}

/// Deletes a Tube its creator will not use; the controller closes what it
/// opened. (A handler dropped with its client ends nothing here: the
/// controller ends a tube no pod answered within a minute.)
async fn abandon(api: &Api<Tube>, name: &str) {
    if let Err(e) = api.delete(name, &DeleteParams::default()).await {
        tracing::warn!(tube = %name, error = %e, "deleting an abandoned tube");
    }
}

/// The pool of the session a tube names: from the cache, else from the API
/// server (a session made a moment ago); 404 when there is none.
async fn find_session(state: &ApiState, namespace: &str, name: &str) -> Result<String, Refused> {
    if let Some(session) = state.sessions.get(&ObjectRef::new(name).within(namespace)) {
        return Ok(session.spec.pool.clone());
    }
    let sessions: Api<tidepool_crds::TestSession> = Api::namespaced(state.client.clone(), namespace);
    match sessions.get_opt(name).await {
        Ok(Some(session)) => Ok(session.spec.pool),
        Ok(None) => Err(Refused::new(StatusCode::NOT_FOUND, "not_found", format!("no session {namespace}/{name}"))),
        Err(e) => Err(kube_refusal(e, "reading the session")),
    }
}

/// 201 with the view once answered; a tube that ended first is the reason's error.
fn answered(tube: &Tube) -> Response {
    let view = view(tube);
    if view.answer.is_some() && !matches!(view.state, TubeState::Failed | TubeState::Closed) {
        return (StatusCode::CREATED, Json(view)).into_response();
    }
    let reason = view.reason.clone().unwrap_or_default();
    let code = if reason == "BadOffer" { StatusCode::BAD_REQUEST } else { StatusCode::UNPROCESSABLE_ENTITY };
    let body = ErrorBody {
        error: format!("tube {} failed ({reason}): {}", view.name, view.message.unwrap_or_default()),
        code: Some(code.as_u16()),
    };
    (code, Json(body)).into_response()
}

fn is_settled(tube: &Tube) -> bool {
    tube.status.as_ref().is_some_and(|s| s.answer.is_some() || matches!(s.state, TubeState::Failed | TubeState::Closed))
}

/// Watches one tube from the version the create returned until it is
/// answered or over.
async fn wait_answered(api: &Api<Tube>, created: &Tube) -> Result<Tube, kube::Error> {
    let params = WatchParams::default().fields(&format!("metadata.name={}", created.name_any()));
    let mut version = created.resource_version().unwrap_or_else(|| "0".into());
    loop {
        let mut events = api.watch(&params, &version).await?.boxed();
        while let Some(event) = events.try_next().await? {
            match event {
                WatchEvent::Added(t) | WatchEvent::Modified(t) if is_settled(&t) => return Ok(t),
                WatchEvent::Added(t) | WatchEvent::Modified(t) => {
                    version = t.resource_version().unwrap_or(version);
                }
                // An expired version (410) or another error: look afresh.
                WatchEvent::Error(_) => break,
                _ => {}
            }
        }
        let now = api.get(&created.name_any()).await?;
        if is_settled(&now) {
            return Ok(now);
        }
        version = now.resource_version().unwrap_or(version);
        // A watch that ends at once would spin: pace the next one.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn get(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(query): Query<NamespaceQuery>,
) -> Response {
    let namespace = match one_tube(&state, &caller, "get", &name, query).await {
        Ok(namespace) => namespace,
        Err(response) => return response,
    };
    let api: Api<Tube> = Api::namespaced(state.client.clone(), &namespace);
    match api.get_opt(&name).await {
        Ok(Some(tube)) => Json(view(&tube)).into_response(),
        Ok(None) => refuse(&state, ROUTE, no_tube(&namespace, &name)),
        Err(e) => refuse(&state, ROUTE, kube_refusal(e, "reading the tube")),
    }
}

pub async fn delete(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(query): Query<NamespaceQuery>,
) -> Response {
    let namespace = match one_tube(&state, &caller, "delete", &name, query).await {
        Ok(namespace) => namespace,
        Err(response) => return response,
    };
    let api: Api<Tube> = Api::namespaced(state.client.clone(), &namespace);
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(kube::Error::Api(s)) if s.code == 404 => refuse(&state, ROUTE, no_tube(&namespace, &name)),
        Err(e) => refuse(&state, ROUTE, kube_refusal(e, "deleting the tube")),
    }
}

async fn one_tube(
    state: &ApiState,
    caller: &Caller,
    verb: &'static str,
    name: &str,
    query: NamespaceQuery,
) -> Result<String, Response> {
    let namespace = query.namespace.unwrap_or_else(|| state.namespace.clone());
    if let Err(refused) = check_names(state, &namespace, Some(("Tube", name))) {
        return Err(refuse(state, ROUTE, refused));
    }
    let ask = Ask::Tubes { verb, namespace: &namespace, name: Some(name) };
    if let Err(denied) = state.access.authorize(caller, ask).await {
        return Err(deny(state, ROUTE, &denied));
    }
    Ok(namespace)
}

fn no_tube(namespace: &str, name: &str) -> Refused {
    Refused::new(StatusCode::NOT_FOUND, "not_found", format!("no tube {namespace}/{name}"))
}

/// What the API shows of a tube.
pub fn view(tube: &Tube) -> TubeView {
    let status = tube.status.clone().unwrap_or_default();
    let ready = status.conditions.iter().find(|c| c.type_ == conditions::READY);
    TubeView {
        name: tube.name_any(),
        namespace: tube.namespace().unwrap_or_default(),
        state: status.state,
        pod: status.pod.clone(),
        answer: status.answer.clone(),
        bytes_sent: status.bytes_sent,
        bytes_received: status.bytes_received,
        rtt_ms: status.rtt_ms,
        open_connections: status.open_connections,
        reason: status.end_reason.clone().or_else(|| ready.map(|c| c.reason.clone())),
        message: ready.map(|c| c.message.clone()),
    }
}
