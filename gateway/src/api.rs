//! The session API at the front door. A caller with a Kubernetes identity
//! is relayed to the operator as it is (the operator reviews its token and
//! rights and keeps its limits); a caller without one may start a session
//! on a pool marked public, within the gateway's limits per client address,
//! and later read that session with the session token it got.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, Request, StatusCode, Uri, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use tidepool_crds::test_session::ClientHints;
use tidepool_protocol::api::{CreateSession, NamespaceQuery, SessionView};
use tidepool_protocol::names;

use crate::anonymous::{Refusal, within_bytes};
use crate::client::allowed;
use crate::operator::{Answer, OperatorError};
use crate::reply::{self, Refused};
use crate::state::{Gateway, host_of, now_unix};
use crate::target::{self, NoTarget, pool_keys};

/// The most a create's body may be (the operator's own cap).
const MAX_CREATE_BYTES: usize = 16 * 1024;
const ROUTE: &str = "sessions";

/// `POST /api/v1/sessions`.
pub async fn create(State(gateway): State<Arc<Gateway>>, request: Request<Body>) -> axum::response::Response {
    match create_session(&gateway, request).await {
        Ok(response) => response,
        Err(refused) => reply::refuse(&gateway.metrics, ROUTE, refused),
    }
}

async fn create_session(gateway: &Gateway, request: Request<Body>) -> Result<axum::response::Response, Refused> {
    let client = gateway.client_address(&request)?;
    let host = host_of(&request);
    let authorization = request.headers().get(header::AUTHORIZATION).cloned();
    let body = read_body(request.into_body(), gateway.settings.body_deadline, MAX_CREATE_BYTES).await?;
    if let Some(authorization) = authorization {
        // A Kubernetes identity: the operator decides, as if asked directly.
        let answer = gateway.operator.relay(Method::POST, "/api/v1/sessions", authorization, body).await;
        if let Ok(answer) = &answer {
            first_sighting(gateway, answer).await;
        }
        return pass_on(gateway, answer, host.as_deref());
    }
    let mut create: CreateSession = tidepool_protocol::parse_json(&body).map_err(|e| {
        let status = match e {
            tidepool_protocol::BodyError::Syntax(_) => StatusCode::BAD_REQUEST,
            tidepool_protocol::BodyError::Field { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        };
        Refused::new(status, "bad_body", e.to_string())
    })?;
    let namespace = create.namespace.clone().unwrap_or_else(|| gateway.settings.session_namespace.clone());
    check_names(gateway, &namespace, &create.pool)?;
    let public = gateway.caches.pool(&namespace, &create.pool).is_some_and(|p| p.spec.public);
    if !public {
        // Missing and private read the same, so nothing is learnt by asking.
        let message = format!("there is no public pool {namespace}/{}; a token is needed", create.pool);
        return Err(Refused::new(StatusCode::UNAUTHORIZED, "not_public", message));
    }
    if !allowed(client, &gateway.settings.anonymous_allow) {
        let message = "this address may not start sessions without a token";
        return Err(Refused::new(StatusCode::FORBIDDEN, "not_allowlisted", message));
    }
    let (seen, names) = gateway.caches.sessions_for(client);
    let too_many = |r: Refusal| {
        Refused::new(StatusCode::TOO_MANY_REQUESTS, r.reason, r.message).retry_after(r.retry_after_seconds)
    };
    let unwritten = gateway.streams.unwritten(&names);
    within_bytes(gateway.settings.anonymous, &seen, unwritten, now_unix()).map_err(too_many)?;
    let reservation =
        gateway.pending.reserve(client, gateway.settings.anonymous, &seen, &names, now_unix()).map_err(too_many)?;
    // The session is made for the address the request came from, whatever
    // the body says; a client may still say where it is.
    let hints = create.client.take();
    create.client = Some(ClientHints {
        address: Some(client.to_string()),
        latitude: hints.as_ref().and_then(|h| h.latitude),
        longitude: hints.as_ref().and_then(|h| h.longitude),
    });
    create.namespace = Some(namespace.clone());
    let body = serde_json::to_vec(&create).map_err(|_| internal())?;
    let answer = gateway.operator.as_gateway(Method::POST, "/api/v1/sessions", Bytes::from(body)).await;
    if let Ok(answer) = &answer
        && let Ok(view) = serde_json::from_slice::<SessionView>(&answer.body)
        && answer.status.is_success()
    {
        reservation.made(format!("{}/{}", view.namespace, view.name));
        first_sighting(gateway, answer).await;
        gateway.metrics.anonymous_sessions.inc();
        tracing::info!(session = %view.name, namespace = %view.namespace, %client, "anonymous session");
    }
    pass_on(gateway, answer, host.as_deref())
}

/// A session made through the gateway on a pool that releases sessions of
/// clients that went away is marked seen now, so that a client that never
/// opens a stream is released after the grace too. A failed write is
/// logged: the session then lives to its TTL, as before the gateway.
async fn first_sighting(gateway: &Gateway, answer: &Answer) {
    let Ok(view) = serde_json::from_slice::<SessionView>(&answer.body) else { return };
    if !answer.status.is_success() {
        return;
    }
    let releases =
        gateway.caches.pool(&view.namespace, &view.pool).and_then(|p| p.spec.release_when_client_gone_seconds);
    if releases.is_some()
        && let Err(e) = crate::seen::write(&gateway.kube, &view.namespace, &view.name).await
    {
        tracing::warn!(error = %e, session = %view.name, "cannot mark the session's client seen");
    }
}

/// `GET /api/v1/sessions/{name}`.
pub async fn get(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> axum::response::Response {
    one_session(&gateway, Method::GET, &name, &uri, &headers).await
}

/// `DELETE /api/v1/sessions/{name}`.
pub async fn delete(
    State(gateway): State<Arc<Gateway>>,
    Path(name): Path<String>,
    uri: Uri,
    headers: HeaderMap,
) -> axum::response::Response {
    one_session(&gateway, Method::DELETE, &name, &uri, &headers).await
}

async fn one_session(
    gateway: &Gateway,
    method: Method,
    name: &str,
    uri: &Uri,
    headers: &HeaderMap,
) -> axum::response::Response {
    let answer = async {
        let query: NamespaceQuery = serde_urlencoded::from_str(uri.query().unwrap_or(""))
            .map_err(|e| Refused::new(StatusCode::BAD_REQUEST, "bad_query", e.to_string()))?;
        let namespace = query.namespace.unwrap_or_else(|| gateway.settings.session_namespace.clone());
        check_names(gateway, &namespace, name)?;
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let authorization = headers.get(header::AUTHORIZATION).cloned().ok_or_else(|| {
            Refused::new(StatusCode::UNAUTHORIZED, "no_token", "a token is needed: Authorization: Bearer <token>")
        })?;
        let path = format!("/api/v1/sessions/{name}?namespace={namespace}");
        let token = authorization.to_str().ok().and_then(tidepool_protocol::bearer_token).unwrap_or("");
        let answer = match target::claimed(token) {
            // A session token: good for its own session only, which the
            // gateway then asks about as itself.
            Ok(claims) => {
                // Deleting would take the session out of its address's
                // hourly count; it ends with its final results or its TTL.
                if method == Method::DELETE {
                    let message = "a session token cannot delete its session; it ends when its results are final or its TTL passes";
                    return Err(Refused::new(StatusCode::FORBIDDEN, "delete_by_session_token", message));
                }
                if claims.ns != namespace || claims.name != name {
                    return Err(proxy_refusal(NoTarget::NotAccepted));
                }
                check_session_token(gateway, token, &namespace)?;
                gateway.operator.as_gateway(method, &path, Bytes::new()).await
            }
            Err(_) => gateway.operator.relay(method, &path, authorization, Bytes::new()).await,
        };
        pass_on(gateway, answer, host)
    }
    .await;
    answer.unwrap_or_else(|refused| reply::refuse(&gateway.metrics, "session", refused))
}

/// Checks a session token with its pool's public keys, from any of the
/// pool's pods (the session's own may be gone once it ended).
fn check_session_token(gateway: &Gateway, token: &str, namespace: &str) -> Result<(), Refused> {
    let claims = target::claimed(token).map_err(proxy_refusal)?;
    let keys = gateway.caches.pool_pods(namespace, &claims.pool).iter().find_map(|pod| pool_keys(pod, &claims.pool));
    let keys = keys.ok_or_else(|| {
        Refused::new(StatusCode::SERVICE_UNAVAILABLE, "no_keys", "the session's pool has no pods to check tokens with")
            .retry_after(5)
    })?;
    // Expired tokens may still read their session's results.
    keys.verify_session(token, 0).map(|_| ()).map_err(|_| proxy_refusal(NoTarget::NotAccepted))
}

fn proxy_refusal(why: NoTarget) -> Refused {
    crate::proxy::no_target(why)
}

fn check_names(gateway: &Gateway, namespace: &str, name: &str) -> Result<(), Refused> {
    let bad = |e: names::BadName| Refused::new(StatusCode::BAD_REQUEST, "bad_name", e.to_string());
    names::namespace(namespace).map_err(bad)?;
    names::object("WarmPool or TestSession", name).map_err(bad)?;
    if !gateway.caches.serves(namespace) {
        let message = format!("namespace {namespace} is not one this gateway serves");
        return Err(Refused::new(StatusCode::FORBIDDEN, "other_namespace", message));
    }
    Ok(())
}

/// A small body (a create's, a routed request's that names its tier), whole
/// within `deadline`: the server cuts only a body that pauses (uploads
/// stream for long), so a small body that trickles in a byte at a time is
/// cut here.
pub async fn read_body(body: Body, deadline: std::time::Duration, limit: usize) -> Result<Bytes, Refused> {
    let slow = || Refused::new(StatusCode::REQUEST_TIMEOUT, "slow_body", "the request body came too slowly");
    match tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(Refused::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the body is over {limit} bytes"),
        )),
        // The server cut it for a pause, and counted that.
        Ok(Err(e)) if crate::proxy::caused_by_slow_body(e.as_ref()) => Err(slow().already_counted()),
        // The client broke it off, or sent a body that is not HTTP.
        Ok(Err(_)) => Err(Refused::new(StatusCode::BAD_REQUEST, "body_unread", "the request body could not be read")),
        Err(_) => Err(slow()),
    }
}

/// The operator's answer, passed on: a session's endpoint becomes the
/// gateway's stream path, so the client's streams come back through here.
fn pass_on(
    gateway: &Gateway,
    answer: Result<Answer, OperatorError>,
    host: Option<&str>,
) -> Result<axum::response::Response, Refused> {
    let answer = answer.map_err(|e| {
        tracing::warn!(error = %e, "the operator's API failed");
        Refused::new(StatusCode::SERVICE_UNAVAILABLE, "operator_unavailable", "sessions cannot be served now")
            .retry_after(5)
    })?;
    let body = match serde_json::from_slice::<SessionView>(&answer.body) {
        Ok(mut view) if answer.status.is_success() => {
            view.endpoint =
                view.endpoint.and(gateway.public_url(host)).map(|url| format!("{url}{}", crate::proxy::PREFIX));
            Bytes::from(serde_json::to_vec(&view).map_err(|_| internal())?)
        }
        _ => answer.body,
    };
    gateway.metrics.requests.with_label_values(&[ROUTE, answer.status.as_str()]).inc();
    let mut response = reply::json(answer.status, body);
    if let Some(retry_after) = answer.retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, retry_after);
    }
    Ok(response)
}

fn internal() -> Refused {
    Refused::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the answer could not be made")
}
