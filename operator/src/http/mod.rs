//! The operator's HTTP API: sessions for clients, health and /metrics for
//! Kubernetes and Prometheus. Every replica serves it; writes go to the API
//! server, which the leader's controllers act on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, PostParams, WatchEvent, WatchParams};
use kube::{Client, ResourceExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tidepool_crds::TestSession;
use tidepool_crds::test_session::Phase;
use tidepool_wire::report::{MAX_REPORT_BYTES, REPORT_PATH};
use tidepool_wire::token::SessionClaims;

use crate::fleet::{Fleet, ingest, route};
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::results::RESULTS_BODY_LIMIT;
use tidepool_session::protocol::OPERATOR_RESULTS_PATH;

/// Request bodies larger than this are refused with 413.
pub const BODY_LIMIT: usize = 16 * 1024;

/// What the API handlers share.
pub struct ApiState {
    pub client: Client,
    pub keys: Arc<Keys>,
    pub metrics: Arc<Metrics>,
    /// The bearer token every /api request must carry.
    pub token: String,
    /// Where sessions go when a request names no namespace.
    pub namespace: String,
    /// How long POST waits for a session to turn Ready before answering 504.
    pub ready_deadline: Duration,
    /// Set once the API server has answered.
    pub ready: AtomicBool,
    /// Agents' reports and the router.
    pub fleet: Arc<Fleet>,
}

/// The router: /api/v1 behind the bearer token, the rest open.
pub fn router(state: Arc<ApiState>) -> Router {
    let api = Router::new()
        .route("/api/v1/sessions", axum::routing::post(create_session))
        .route("/api/v1/sessions/{name}", get(get_session).delete(delete_session))
        .route("/api/v1/route", axum::routing::post(route::route))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(|request: Request, next: Next| refuse_oversized(BODY_LIMIT, request, next)));
    // Session pods authenticate with their session's own token and ticket.
    let pods = Router::new()
        .route(OPERATOR_RESULTS_PATH, axum::routing::post(crate::results::submit))
        .layer(DefaultBodyLimit::max(RESULTS_BODY_LIMIT))
        .layer(middleware::from_fn(|request: Request, next: Next| refuse_oversized(RESULTS_BODY_LIMIT, request, next)));
    // Agents authenticate with their ServiceAccount tokens, not the API token.
    let agents = Router::new()
        .route(REPORT_PATH, axum::routing::post(ingest::report))
        .layer(DefaultBodyLimit::max(MAX_REPORT_BYTES))
        .layer(middleware::from_fn(|request: Request, next: Next| refuse_oversized(MAX_REPORT_BYTES, request, next)));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .merge(agents)
        .merge(pods)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .with_state(state)
}

/// Oversized bodies this large or smaller are read and dropped before the 413.
const DRAIN_LIMIT: usize = 1024 * 1024;

/// Refuses a body whose declared length is over `limit` with 413. Bodies up
/// to [`DRAIN_LIMIT`] are read first: a server that answers and closes with
/// the body unread makes the kernel reset the connection, and the client
/// may see the reset instead of the answer.
async fn refuse_oversized(limit: usize, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    match declared {
        Some(length) if length > limit => {
            if length <= DRAIN_LIMIT {
                let drain = axum::body::to_bytes(request.into_body(), DRAIN_LIMIT);
                let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
            }
            let message = format!("length limit exceeded: the body is {length} bytes, the limit {limit}");
            error(StatusCode::PAYLOAD_TOO_LARGE, message)
        }
        _ => next.run(request).await,
    }
}

/// A JSON error body: `{"error": "...", "code": N}`.
pub fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(json!({ "error": message.into(), "code": code.as_u16() }))).into_response()
}

async fn authorize(State(state): State<Arc<ApiState>>, request: Request, next: Next) -> Response {
    let route = match (request.method() == axum::http::Method::POST, request.uri().path()) {
        (true, "/api/v1/route") => "route",
        (true, _) => "create",
        (false, _) => "session",
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let response = match presented {
        None => error(StatusCode::UNAUTHORIZED, "missing bearer token"),
        Some(token) if !constant_time_eq(token.as_bytes(), state.token.as_bytes()) => {
            error(StatusCode::FORBIDDEN, "wrong bearer token")
        }
        Some(_) => next.run(request).await,
    };
    state.metrics.api_requests.with_label_values(&[route, response.status().as_str()]).inc();
    response
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn readyz(State(state): State<Arc<ApiState>>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        "ok".into_response()
    } else {
        error(StatusCode::SERVICE_UNAVAILABLE, "the Kubernetes API has not answered yet")
    }
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

/// POST /api/v1/sessions.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateRequest {
    pub pool: String,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub profile: Option<String>,
    #[serde(default)]
    pub ttl_seconds: Option<i64>,
    #[serde(default)]
    pub sticky_key: Option<String>,
    #[serde(default)]
    pub client: Option<serde_json::Value>,
    #[serde(default)]
    pub probes: Option<serde_json::Value>,
}

/// What the API answers about a session.
#[derive(Serialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    pub name: String,
    pub namespace: String,
    pub pool: String,
    pub phase: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The session token: the same for the session's whole life.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The binding ticket for the current pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub binding: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Why the session is not Ready, when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Deserialize)]
pub struct NamespaceQuery {
    pub namespace: Option<String>,
}

async fn create_session(State(state): State<Arc<ApiState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    let request: CreateRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid request body: {e}")),
    };
    let namespace = request.namespace.clone().unwrap_or_else(|| state.namespace.clone());
    let pools: Api<tidepool_crds::WarmPool> = Api::namespaced(state.client.clone(), &namespace);
    let pool_uid = match pools.get_metadata_opt(&request.pool).await {
        Ok(Some(pool)) => pool.uid(),
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no WarmPool {namespace}/{}", request.pool)),
        Err(e) => return kube_error(e),
    };
    let mut spec = json!({ "pool": request.pool });
    for (key, value) in [
        ("profile", request.profile.map(serde_json::Value::from)),
        ("ttlSeconds", request.ttl_seconds.map(serde_json::Value::from)),
        ("stickyKey", request.sticky_key.map(serde_json::Value::from)),
        ("client", request.client),
        ("probes", request.probes),
    ] {
        if let Some(value) = value {
            spec[key] = value;
        }
    }
    let object = json!({
        "apiVersion": "tidepool.dev/v1alpha1",
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
            let view = view(&state, &latest, pool_uid).await;
            let reason = view.reason.clone().unwrap_or_else(|| "no pod became ready in time".into());
            let body = json!({
                "error": format!("session {name} was not ready within {:?}: {reason}", state.ready_deadline),
                "code": 504,
                "session": view,
            });
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

async fn get_session(
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

async fn delete_session(
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

/// The API server's refusals pass through with their code and message;
/// anything else is a 502.
pub fn kube_error(e: kube::Error) -> Response {
    match e {
        kube::Error::Api(status) => {
            let code = StatusCode::from_u16(status.code).unwrap_or(StatusCode::BAD_GATEWAY);
            error(code, status.message)
        }
        other => error(StatusCode::BAD_GATEWAY, format!("Kubernetes API: {other}")),
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
        phase: format!("{:?}", status.phase),
        pod: status.pod.clone(),
        node: status.node.clone(),
        endpoint: status.endpoint.clone(),
        expires_at: status.expires_at.as_ref().map(|t| t.0.to_string()),
        ..SessionView::default()
    };
    if status.phase != Phase::Ready {
        view.reason =
            status.conditions.iter().find(|c| c.type_ == "Bound" || c.type_ == "Ready").map(|c| c.message.clone());
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
            probes: tidepool_session::protocol::probes_digest(&session.spec.probes),
        };
        view.token = Some(key.sign_session(&claims));
        view.binding = Some(key.sign_binding(&uid, pod));
    }
    view
}

fn session_resource() -> ApiResource {
    ApiResource::erase::<TestSession>(&())
}

/// The pool's UID; None when the pool does not exist.
pub async fn lookup_pool_uid(state: &ApiState, namespace: &str, pool: &str) -> Result<Option<String>, kube::Error> {
    let pools: Api<tidepool_crds::WarmPool> = Api::namespaced(state.client.clone(), namespace);
    Ok(pools.get_metadata_opt(pool).await?.and_then(|p| p.uid()))
}

/// Serves the router on `addr` until the future completes.
pub async fn serve(addr: std::net::SocketAddr, router: Router) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, router).await
}
