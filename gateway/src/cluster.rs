//! `GET /api/v1/cluster?namespace=`: the operators' live view of pools,
//! sessions and backends (the web UI's cluster page). Relayed to the
//! operator with the caller's own Kubernetes token, which the operator
//! reviews, and streamed back event by event as it comes.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Response, StatusCode, Uri, header};
use tidepool_protocol::api::NamespaceQuery;
use tidepool_protocol::cluster::CLUSTER_PATH;
use tidepool_protocol::names;

use crate::reply::{self, Refused};
use crate::state::Gateway;
use crate::target;

const ROUTE: &str = "cluster";

pub async fn view(State(gateway): State<Arc<Gateway>>, uri: Uri, headers: HeaderMap) -> Response<Body> {
    match relay(&gateway, &uri, &headers).await {
        Ok(response) => response,
        Err(refused) => reply::refuse(&gateway.metrics, ROUTE, refused),
    }
}

async fn relay(gateway: &Gateway, uri: &Uri, headers: &HeaderMap) -> Result<Response<Body>, Refused> {
    let query: NamespaceQuery = serde_urlencoded::from_str(uri.query().unwrap_or(""))
        .map_err(|e| Refused::new(StatusCode::BAD_REQUEST, "bad_query", e.to_string()))?;
    let namespace = query.namespace.unwrap_or_else(|| gateway.settings.session_namespace.clone());
    names::namespace(&namespace).map_err(|e| Refused::new(StatusCode::BAD_REQUEST, "bad_name", e.to_string()))?;
    if !gateway.caches.serves(&namespace) {
        let message = format!("namespace {namespace} is not one this gateway serves");
        return Err(Refused::new(StatusCode::FORBIDDEN, "other_namespace", message));
    }
    let authorization = headers.get(header::AUTHORIZATION).cloned().ok_or_else(|| {
        Refused::new(
            StatusCode::UNAUTHORIZED,
            "no_token",
            "a Kubernetes token is needed: Authorization: Bearer <token>",
        )
    })?;
    let token = authorization.to_str().ok().and_then(tidepool_protocol::bearer_token).unwrap_or("");
    if target::claimed(token).is_ok() {
        let message = "a session token cannot watch the cluster; use a Kubernetes token";
        return Err(Refused::new(StatusCode::FORBIDDEN, "session_token", message));
    }
    let answer = gateway.operator.stream(&format!("{CLUSTER_PATH}?namespace={namespace}"), authorization).await;
    let answer = answer.map_err(|e| {
        tracing::warn!(error = %e, "the operator's cluster view failed");
        Refused::new(StatusCode::SERVICE_UNAVAILABLE, "operator_unavailable", "the cluster view cannot be served now")
            .retry_after(5)
    })?;
    gateway.metrics.requests.with_label_values(&[ROUTE, answer.status().as_str()]).inc();
    let (parts, body) = answer.into_parts();
    let mut response = Response::new(Body::new(body));
    *response.status_mut() = parts.status;
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL, header::RETRY_AFTER] {
        if let Some(value) = parts.headers.get(&name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response.headers_mut().insert("x-accel-buffering", axum::http::HeaderValue::from_static("no"));
    Ok(response)
}
