//! `POST /api/v1/sessions`, `GET` and `DELETE /api/v1/sessions/{name}`:
//! sessions for clients, made as TestSessions and answered with the
//! credentials the session pod checks.
//!
//! Every request is checked before any API call: the caller may do this
//! (create, get or delete TestSessions in that namespace; credentials go
//! only to callers who may get the session), the names are Kubernetes names,
//! the namespace is the operator's, the pool exists (from this replica's
//! cache), the TTL is within the pool's cap, and the caller holds fewer live
//! sessions than allowed.

use std::net::IpAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::{StreamExt, TryStreamExt};
use kube::ResourceExt;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, PostParams, WatchEvent, WatchParams};
use kube::runtime::reflector::ObjectRef;
use serde_json::json;
use tidepool_crds::test_session::{ClientHints, Phase};
use tidepool_crds::{API_VERSION, TestSession, WarmPool};
use tidepool_protocol::api::{CreateSession, NamespaceQuery, NotReadyInTime, SessionView};
use tidepool_protocol::pod::probes_digest;
use tidepool_wire::report::Coordinates;
use tidepool_wire::token::SessionClaims;

use super::access::{Ask, Caller};
use super::reply::{Refused, json_body, kube_refusal, retry_later};
use super::state::{ApiState, Peer};
use super::{deny, refuse};
use crate::creators::{CREATED_BY_ANNOTATION, CREATOR_LABEL, Reservation, creator_label};
use crate::fleet::geo::GeoIp;
use crate::placement::view::distance_km;
use crate::{conditions, names};

pub async fn create(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    peer: Option<Extension<Peer>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let mut request: CreateSession = match json_body(body) {
        Ok(request) => request,
        Err(refused) => return refuse(&state, "create", refused),
    };
    if let Some(geoip) = &state.geoip {
        let peer = peer.map(|Extension(Peer(address))| address.ip());
        request.client = locate(geoip, request.client.take(), peer);
    }
    let namespace = request.namespace.clone().unwrap_or_else(|| state.namespace.clone());
    if let Err(refused) = check_names(&state, &namespace, Some(("WarmPool", &request.pool))) {
        return refuse(&state, "create", refused);
    }
    // Creating is of no use without the credentials, which need `get`.
    for verb in ["create", "get"] {
        if let Err(denied) =
            state.access.authorize(&caller, Ask::Sessions { verb, namespace: &namespace, name: None }).await
        {
            return deny(&state, "create", &denied);
        }
    }
    let pool = match find_pool(&state, &namespace, &request.pool).await {
        Ok(pool) => pool,
        Err(refused) => return refuse(&state, "create", refused),
    };
    if let Some(ttl) = request.ttl_seconds
        && ttl > pool.spec.max_session_ttl_seconds
    {
        let message = format!(
            "ttlSeconds: {ttl} is more than WarmPool {}'s maxSessionTTLSeconds ({})",
            request.pool, pool.spec.max_session_ttl_seconds
        );
        return refuse(&state, "create", Refused::new(StatusCode::UNPROCESSABLE_ENTITY, "ttl_over_cap", message));
    }
    let creator = creator_label(caller.name());
    // The place is taken before the create, so a burst of creates from one
    // caller cannot pass the cap while the cache catches up.
    let cap = if state.uncapped_callers.contains(caller.name()) { usize::MAX } else { state.sessions_per_caller };
    let reservation = match state.creators.reserve(&creator, cap) {
        Ok(reservation) => reservation,
        Err(held) => {
            state.metrics.api_refusals.with_label_values(&["create", "caller_limit"]).inc();
            let message =
                format!("{} holds {held} live sessions, the most one caller may; end one first", caller.name());
            return retry_later(StatusCode::TOO_MANY_REQUESTS, message, 30);
        }
    };
    match make_session(&state, &request, &namespace, &caller, reservation, &pool).await {
        Ok(response) => response,
        Err(refused) => refuse(&state, "create", refused),
    }
}

/// The client's coordinates from the GeoIP database when it gave none: by
/// the address it gave, else by the one its connection came from (which
/// behind a proxy is the proxy's: proxies should pass `client.address`).
/// Only the coordinates are kept: an address the client did not give is
/// not written into the session.
fn locate(geoip: &GeoIp, client: Option<ClientHints>, peer: Option<IpAddr>) -> Option<ClientHints> {
    if client.as_ref().is_some_and(|c| c.latitude.is_some() && c.longitude.is_some()) {
        return client;
    }
    let given = client.as_ref().and_then(|c| c.address.as_deref()).and_then(|a| a.parse::<IpAddr>().ok());
    let Some(found) = given.or(peer).and_then(|address| geoip.locate(address.to_canonical())) else {
        return client;
    };
    let address = client.and_then(|c| c.address);
    Some(ClientHints { address, latitude: Some(found.latitude), longitude: Some(found.longitude) })
}

/// The pool from this replica's cache, or, when the cache has not seen it
/// yet (a pool made a moment ago), one read from the API server. Only
/// callers already authorized to create sessions or tubes in the namespace
/// get here, so the read cannot be spent by strangers.
pub(super) async fn find_pool(state: &ApiState, namespace: &str, name: &str) -> Result<Arc<WarmPool>, Refused> {
    if let Some(pool) = state.pools.get(&ObjectRef::new(name).within(namespace)) {
        return Ok(pool);
    }
    let missing = || Refused::new(StatusCode::NOT_FOUND, "no_pool", format!("no WarmPool {namespace}/{name}"));
    let pools: Api<WarmPool> = Api::namespaced(state.client.clone(), namespace);
    match pools.get_opt(name).await {
        Ok(Some(pool)) => Ok(Arc::new(pool)),
        Ok(None) => Err(missing()),
        Err(e) => Err(kube_refusal(e, "reading the WarmPool")),
    }
}

async fn make_session(
    state: &ApiState,
    request: &CreateSession,
    namespace: &str,
    caller: &Caller,
    reservation: Reservation,
    pool: &WarmPool,
) -> Result<Response, Refused> {
    // The request's fields are the spec's, by name and spelling.
    let mut spec = serde_json::to_value(request)
        .map_err(|e| Refused::new(StatusCode::BAD_REQUEST, "bad_field", format!("invalid session: {e}")))?;
    if let Some(fields) = spec.as_object_mut() {
        fields.remove("namespace");
    }
    let object = json!({
        "apiVersion": API_VERSION,
        "kind": "TestSession",
        "metadata": {
            "generateName": "session-",
            "namespace": namespace,
            "labels": { CREATOR_LABEL: reservation.creator() },
            "annotations": { CREATED_BY_ANNOTATION: caller.name() },
        },
        "spec": spec,
    });
    // Sent untyped, so the API server's schema and CEL rules judge it and
    // their messages (which name the field) reach the client.
    let object: DynamicObject = serde_json::from_value(object)
        .map_err(|e| Refused::new(StatusCode::BAD_REQUEST, "bad_field", format!("invalid session: {e}")))?;
    let dynamic: Api<DynamicObject> = Api::namespaced_with(state.client.clone(), namespace, &session_resource());
    let created =
        dynamic.create(&PostParams::default(), &object).await.map_err(|e| kube_refusal(e, "creating the session"))?;
    reservation.created(namespace, &created.name_any());
    let created: TestSession = serde_json::to_value(created).and_then(serde_json::from_value).map_err(|e| {
        Refused::new(StatusCode::BAD_GATEWAY, "unreadable", format!("the session made is unreadable: {e}"))
    })?;
    let api: Api<TestSession> = Api::namespaced(state.client.clone(), namespace);
    let name = created.name_any();
    let pool_uid = pool.uid();
    match tokio::time::timeout(state.ready_deadline, wait_ready(&api, &created)).await {
        Ok(Ok(session)) => {
            Ok((StatusCode::CREATED, Json(view(state, &session, pool_uid, false).await)).into_response())
        }
        Ok(Err(e)) => Err(kube_refusal(e, "waiting for the session")),
        Err(_) => {
            let latest = api.get_opt(&name).await.ok().flatten().unwrap_or(created);
            let session = view(state, &latest, pool_uid, false).await;
            let reason = session.reason.clone().unwrap_or_else(|| "no pod became ready in time".into());
            let body = NotReadyInTime {
                error: format!("session {name} was not ready within {:?}: {reason}", state.ready_deadline),
                code: StatusCode::GATEWAY_TIMEOUT.as_u16(),
                session,
            };
            Ok((StatusCode::GATEWAY_TIMEOUT, Json(body)).into_response())
        }
    }
}

/// The namespace must be a name and the operator's; the object name (what
/// kind it names) a name too. Checked before anything reaches an API path.
pub(super) fn check_names(
    state: &ApiState,
    namespace: &str,
    object: Option<(&'static str, &str)>,
) -> Result<(), Refused> {
    let bad = |e: names::BadName| Refused::new(StatusCode::BAD_REQUEST, "bad_name", e.to_string());
    names::namespace(namespace).map_err(bad)?;
    if let Some((what, name)) = object {
        names::object(what, name).map_err(bad)?;
    }
    if !state.scope.contains(namespace) {
        let message = format!("namespace {namespace} is not one this operator serves");
        return Err(Refused::new(StatusCode::FORBIDDEN, "other_namespace", message));
    }
    Ok(())
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
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(query): Query<NamespaceQuery>,
) -> Response {
    let namespace = match one_session(&state, &caller, "get", &name, query).await {
        Ok(namespace) => namespace,
        Err(response) => return response,
    };
    let api: Api<TestSession> = Api::namespaced(state.client.clone(), &namespace);
    match api.get_opt(&name).await {
        Ok(Some(session)) => {
            let relay = state.access.authorize(&caller, Ask::Relay { namespace: &namespace }).await.is_ok();
            Json(view(&state, &session, None, relay).await).into_response()
        }
        Ok(None) => refuse(&state, "session", no_session(&namespace, &name)),
        Err(e) => refuse(&state, "session", kube_refusal(e, "reading the session")),
    }
}

pub async fn delete(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    Query(query): Query<NamespaceQuery>,
) -> Response {
    let namespace = match one_session(&state, &caller, "delete", &name, query).await {
        Ok(namespace) => namespace,
        Err(response) => return response,
    };
    let api: Api<TestSession> = Api::namespaced(state.client.clone(), &namespace);
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(kube::Error::Api(s)) if s.code == 404 => refuse(&state, "session", no_session(&namespace, &name)),
        Err(e) => refuse(&state, "session", kube_refusal(e, "deleting the session")),
    }
}

/// The namespace of a request for one session, once its names are sound and
/// the caller may `verb` it; otherwise the refusal, counted.
async fn one_session(
    state: &ApiState,
    caller: &Caller,
    verb: &'static str,
    name: &str,
    query: NamespaceQuery,
) -> Result<String, Response> {
    let namespace = query.namespace.unwrap_or_else(|| state.namespace.clone());
    if let Err(refused) = check_names(state, &namespace, Some(("TestSession", name))) {
        return Err(refuse(state, "session", refused));
    }
    let ask = Ask::Sessions { verb, namespace: &namespace, name: Some(name) };
    if let Err(denied) = state.access.authorize(caller, ask).await {
        return Err(deny(state, "session", &denied));
    }
    Ok(namespace)
}

fn no_session(namespace: &str, name: &str) -> Refused {
    Refused::new(StatusCode::NOT_FOUND, "not_found", format!("no session {namespace}/{name}"))
}

/// What the API shows of a session. `pool_uid` is the pool's UID when the
/// caller has already read it; otherwise it comes from the pool cache. With
/// `relay` (the caller may relay) it carries the pod's relay ticket too.
async fn view(state: &ApiState, session: &TestSession, pool_uid: Option<String>, relay: bool) -> SessionView {
    let namespace = session.namespace().unwrap_or_default();
    let status = session.status.clone().unwrap_or_default();
    let client =
        session.spec.client.as_ref().and_then(|c| Some(Coordinates { latitude: c.latitude?, longitude: c.longitude? }));
    let (region, distance_km) = status.backend.as_deref().map_or((None, None), |backend| {
        state.fleet.with_router(|router| {
            let Some(served) = router.view(backend) else { return (None, None) };
            let distance =
                client.zip(served.coordinates).map(|(client, here)| (distance_km(client, here) * 10.0).round() / 10.0);
            (served.region.clone(), distance)
        })
    });
    let mut view = SessionView {
        name: session.name_any(),
        namespace: namespace.clone(),
        pool: session.spec.pool.clone(),
        phase: status.phase,
        pod: status.pod.clone(),
        node: status.node.clone(),
        endpoint: status.endpoint.clone(),
        expires_at: status.expires_at.as_ref().map(|t| t.0.to_string()),
        backend: status.backend.clone(),
        region,
        distance_km,
        results: status.results.clone(),
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
    let pool_uid = pool_uid
        .or_else(|| state.pools.get(&ObjectRef::new(&session.spec.pool).within(&namespace)).and_then(|p| p.uid()));
    let Some(pool_uid) = pool_uid else { return view };
    match state.keys.load(&state.client, &namespace, &session.spec.pool, &pool_uid).await {
        Ok(Some(keys)) => {
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
                thresholds: None,
                kid: String::new(),
            };
            // Signed with the key the bound pod holds (the previous one, for a
            // pod made before a rotation).
            let signer = keys.signer_for(status.key_id.as_deref());
            view.token = Some(signer.sign_session(&claims));
            view.binding = Some(signer.sign_binding(&uid, pod));
            if relay {
                view.relay = Some(signer.sign_relay(&uid, pod));
            }
        }
        Ok(None) => view.reason = Some("the pool's key is not readable; no credentials".into()),
        Err(e) => {
            tracing::warn!(error = %e, "reading the pool's key");
            view.reason = Some("the pool's key could not be read; try again".into());
        }
    }
    view
}

fn session_resource() -> ApiResource {
    ApiResource::erase::<TestSession>(&())
}
