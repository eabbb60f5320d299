//! The operator's HTTP API: sessions for clients, results from session pods,
//! reports from agents, routing for clients outside the cluster, health and
//! /metrics. Every replica serves it; session writes go to the API server,
//! which the leader's controllers act on.
//!
//! - [`state`]: what the handlers share; [`reply`]: error answers.
//! - [`sessions`], [`results`], [`agents`], [`route`], [`stored`], [`cluster`]: one module per route.

pub mod access;
pub mod agents;
pub mod cluster;
pub mod reply;
pub mod results;
pub mod route;
pub mod sessions;
pub mod state;
pub mod stored;
pub mod tubes;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tidepool_protocol::api::{ROUTE_PATH, SESSION_PATH, SESSIONS_PATH};
use tidepool_protocol::results::{OPERATOR_RESULTS_PATH, RESULTS_BODY_LIMIT};
use tidepool_protocol::stored::STORED_RESULTS_PATH;
use tidepool_protocol::tube::{OFFER_BODY_LIMIT, TUBE_API_PATH, TUBES_API_PATH};
use tidepool_wire::report::{MAX_REPORT_BYTES, REPORT_PATH};

pub use reply::error;
pub use state::{ApiState, Peer};

/// Request bodies larger than this are refused with 413.
pub const BODY_LIMIT: usize = 16 * 1024;

/// The router: the session and route API behind the caller's Kubernetes
/// identity (or the static token), results behind the session's own
/// credentials, reports behind the agents' ServiceAccount tokens, the rest
/// open.
pub fn router(state: Arc<ApiState>) -> Router {
    let api = Router::new()
        .route(SESSIONS_PATH, post(sessions::create))
        .route(SESSION_PATH, get(sessions::get).delete(sessions::delete))
        .route(TUBE_API_PATH, get(tubes::get).delete(tubes::delete))
        .route(ROUTE_PATH, post(route::route))
        .route(STORED_RESULTS_PATH, get(stored::list))
        .route(tidepool_protocol::cluster::CLUSTER_PATH, get(cluster::events));
    let api = limited(authenticated(api, &state), &state, BODY_LIMIT);
    // A tube's offer is larger than any other request the API takes.
    let tube_offers = Router::new().route(TUBES_API_PATH, post(tubes::create));
    let tube_offers = limited(authenticated(tube_offers, &state), &state, OFFER_BODY_LIMIT);
    let pods = limited(Router::new().route(OPERATOR_RESULTS_PATH, post(results::submit)), &state, RESULTS_BODY_LIMIT);
    let agents = limited(Router::new().route(REPORT_PATH, post(agents::report)), &state, MAX_REPORT_BYTES);
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(api)
        .merge(tube_offers)
        .merge(agents)
        .merge(pods)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .with_state(state)
}

/// `router` behind the caller's identity.
fn authenticated(router: Router<Arc<ApiState>>, state: &Arc<ApiState>) -> Router<Arc<ApiState>> {
    router.layer(middleware::from_fn_with_state(state.clone(), authenticate))
}

/// `router` taking bodies of at most `limit` bytes: a larger declared
/// length is refused with 413 before anything else runs, and no handler
/// reads more than `limit` of a body that did not declare its length.
fn limited(router: Router<Arc<ApiState>>, state: &Arc<ApiState>, limit: usize) -> Router<Arc<ApiState>> {
    router
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), move |state, request: Request, next: Next| {
            refuse_oversized(state, limit, request, next)
        }))
}

/// Oversized bodies this large or smaller are read and dropped before the 413.
const DRAIN_LIMIT: usize = 1024 * 1024;

/// Refuses a body whose declared length is over `limit` with 413. Bodies up
/// to [`DRAIN_LIMIT`] are read first: a server that answers and closes with
/// the body unread makes the kernel reset the connection, and the client
/// may see the reset instead of the answer.
async fn refuse_oversized(State(state): State<Arc<ApiState>>, limit: usize, request: Request, next: Next) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
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
            let refused = reply::Refused::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message);
            if path == REPORT_PATH {
                // Agent reports are counted by their own metric.
                state.metrics.agent_reports.with_label_values(&[refused.reason]).inc();
                return refused.into_response();
            }
            let route = if path.ends_with("/results") { "results" } else { route_of(&method, &path) };
            refuse(&state, route, refused)
        }
        _ => next.run(request).await,
    }
}

/// Finds out who is calling and hands the handlers the [`access::Caller`];
/// what it may do is each handler's check, once it knows the namespace.
async fn authenticate(State(state): State<Arc<ApiState>>, mut request: Request, next: Next) -> Response {
    let route = route_label(&request);
    let bearer = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(tidepool_protocol::bearer_token)
        .map(str::to_owned);
    let response = match state.access.authenticate(bearer.as_deref()).await {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(denied) => deny(&state, route, &denied),
    };
    state.metrics.api_requests.with_label_values(&[route, response.status().as_str()]).inc();
    response
}

fn route_label(request: &Request) -> &'static str {
    route_of(request.method(), request.uri().path())
}

fn route_of(method: &axum::http::Method, path: &str) -> &'static str {
    match (method == axum::http::Method::POST, path) {
        (_, path) if path.starts_with(TUBES_API_PATH) => "tube",
        (true, ROUTE_PATH) => "route",
        (true, _) => "create",
        (false, _) => "session",
    }
}

/// The answer to a caller turned away, counted by reason.
pub fn deny(state: &ApiState, route: &'static str, denied: &access::Denied) -> Response {
    state.metrics.api_refusals.with_label_values(&[route, denied.reason()]).inc();
    let code = match denied {
        access::Denied::NoToken | access::Denied::BadToken => StatusCode::UNAUTHORIZED,
        access::Denied::Forbidden(_) => StatusCode::FORBIDDEN,
        access::Denied::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(code, denied.to_string())
}

/// The answer to a refused request, counted by reason.
pub fn refuse(state: &ApiState, route: &'static str, refused: reply::Refused) -> Response {
    state.metrics.api_refusals.with_label_values(&[route, refused.reason]).inc();
    refused.into_response()
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
