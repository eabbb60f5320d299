//! The report endpoint: `POST /api/v1/agents/report`.
//!
//! A report is believed only when its token belongs to the agents'
//! ServiceAccount, and, for a node, is bound to a pod on that very node.
//! Anything else is refused whole with a 4xx and logged; nothing in it
//! reaches placement.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use tidepool_crds::Backend;
use tidepool_crds::backend::BackendKind;
use tidepool_wire::report::AgentReport;

use super::reply::error;
use super::state::ApiState;
use crate::fleet::admission::{self, Refusal as Admission};
use crate::fleet::admission::{NodeCapacity, Registry};
use crate::fleet::auth::{AuthError, Expected};
use crate::fleet::geo::{self, RegionTable};

/// Why a report is refused, with the status code it gets.
#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    code: StatusCode,
    reason: &'static str,
    message: String,
}

fn refuse(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal { code, reason, message: message.into() }
}

impl From<Admission> for Refusal {
    fn from(refusal: Admission) -> Self {
        let code = match refusal {
            Admission::Stranger(_) | Admission::WrongNode(_) | Admission::Unregistered(_) => StatusCode::FORBIDDEN,
            Admission::LocalAddress(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Admission::NodeName(_) => StatusCode::CONFLICT,
            Admission::UnknownNode(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        refuse(code, refusal.reason(), refusal.message())
    }
}

pub async fn report(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let outcome = take(&state, &headers, body).await;
    let result = match &outcome {
        Ok(()) => "accepted",
        Err(refusal) => refusal.reason,
    };
    state.metrics.agent_reports.with_label_values(&[result]).inc();
    match outcome {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(refusal) => {
            if refusal.code != StatusCode::SERVICE_UNAVAILABLE {
                tracing::warn!(reason = refusal.reason, message = %refusal.message, "refused an agent report");
            }
            error(refusal.code, refusal.message)
        }
    }
}

async fn take(state: &ApiState, headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<(), Refusal> {
    let fleet = &state.fleet;
    if !fleet.is_leading() {
        return Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "not_leader", "this replica does not lead; retry"));
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(tidepool_protocol::bearer_token)
        .ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "unauthenticated", "a bearer token is required"))?;
    let subject =
        format!("system:serviceaccount:{}:{}", fleet.settings.agent_namespace, fleet.settings.agent_service_account);
    let expected = Expected { subject: &subject, audience: &fleet.settings.token_audience };
    let caller = fleet.tokens.authenticate(&state.client, token, &expected).await.map_err(|e| match e {
        AuthError::Unauthenticated(_) => refuse(StatusCode::UNAUTHORIZED, "unauthenticated", e.to_string()),
        AuthError::Review(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "review_failed", "try again"),
        AuthError::Busy => refuse(StatusCode::SERVICE_UNAVAILABLE, "review_budget", e.to_string()),
    })?;
    let body = body.map_err(|e| refuse(e.status(), "too_large", e.body_text()))?;
    let report: AgentReport = tidepool_protocol::parse_json(&body)
        .map_err(|e| refuse(StatusCode::BAD_REQUEST, "malformed", format!("the report is not valid: {e}")))?;
    report.validate().map_err(|e| refuse(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e.to_string()))?;
    let registry = Cluster { backends: &state.backends, nodes: &state.nodes, regions: &fleet.settings.regions };
    let report = admission::admit(fleet, &caller, report, &registry, fleet.settings.allow_local_addresses)?;
    let now = Instant::now();
    fleet.with_router(|router| router.ingest(report, now));
    Ok(())
}

/// What this replica's caches say of Backends and Nodes.
struct Cluster<'a> {
    backends: &'a Store<Backend>,
    nodes: &'a Store<Node>,
    regions: &'a RegionTable,
}

impl Registry for Cluster<'_> {
    fn external(&self, name: &str) -> Option<Option<String>> {
        let backend = self.backends.get(&ObjectRef::new(name))?;
        (backend.spec.kind == BackendKind::External).then(|| backend.spec.address.clone())
    }

    fn node(&self, name: &str) -> Option<NodeCapacity> {
        let node = self.nodes.get(&ObjectRef::new(name))?;
        let capacity = node.status.as_ref()?.capacity.as_ref()?;
        let quantity = |key: &str| capacity.get(key).map(|q| q.0.as_str());
        Some(NodeCapacity {
            cores: quantity("cpu").and_then(parse_cores).unwrap_or(0),
            memory_bytes: quantity("memory").and_then(parse_bytes).unwrap_or(0),
            gpus: quantity("nvidia.com/gpu").and_then(|q| q.parse().ok()).unwrap_or(0),
            place: geo::node_place(node.labels(), node.annotations(), self.regions),
        })
    }
}

/// Whole cores of a CPU quantity: `8`, `7500m` (7).
fn parse_cores(quantity: &str) -> Option<u32> {
    match quantity.strip_suffix('m') {
        Some(millis) => millis.parse::<u64>().ok().map(|m| u32::try_from(m / 1000).unwrap_or(u32::MAX)),
        None => quantity.parse::<f64>().ok().map(|c| c.floor() as u32),
    }
}

/// Bytes of a memory quantity: `32Gi`, `16000000Ki`, `1e9`, `512M`.
fn parse_bytes(quantity: &str) -> Option<u64> {
    let units: [(&str, u64); 12] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
    ];
    for (suffix, factor) in units {
        if let Some(number) = quantity.strip_suffix(suffix) {
            return number.parse::<u64>().ok()?.checked_mul(factor);
        }
    }
    quantity.parse::<f64>().ok().filter(|b| b.is_finite() && *b >= 0.0).map(|b| b as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_quantities_are_read_as_kubernetes_writes_them() {
        assert_eq!(parse_cores("8"), Some(8));
        assert_eq!(parse_cores("7500m"), Some(7));
        assert_eq!(parse_cores("x"), None);
        assert_eq!(parse_bytes("32Gi"), Some(32 << 30));
        assert_eq!(parse_bytes("16000Ki"), Some(16_000 << 10));
        assert_eq!(parse_bytes("512M"), Some(512_000_000));
        assert_eq!(parse_bytes("1e9"), Some(1_000_000_000));
        assert_eq!(parse_bytes("99999999999Ei"), None, "overflow is no number");
        assert_eq!(parse_bytes("lots"), None);
    }
}
