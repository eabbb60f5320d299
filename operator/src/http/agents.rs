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
use kube::api::Api;
use tidepool_wire::report::{AgentReport, ReportKind};

use super::reply::error;
use super::state::ApiState;
use crate::fleet::admission::{self, Refusal as Admission};
use crate::fleet::auth::AuthError;

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
            Admission::Stranger(_) | Admission::WrongNode(_) => StatusCode::FORBIDDEN,
            Admission::NodeName(_) => StatusCode::CONFLICT,
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
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "unauthenticated", "a bearer token is required"))?;
    let caller =
        fleet.tokens.authenticate(&state.client, token, &fleet.settings.token_audience).await.map_err(|e| match e {
            AuthError::Unauthenticated(_) => refuse(StatusCode::UNAUTHORIZED, "unauthenticated", e.to_string()),
            AuthError::Review(_) => refuse(StatusCode::SERVICE_UNAVAILABLE, "review_failed", e.to_string()),
        })?;
    let body = body.map_err(|e| refuse(e.status(), "too_large", e.body_text()))?;
    let report: AgentReport = serde_json::from_slice(&body).map_err(|e| {
        refuse(StatusCode::BAD_REQUEST, "malformed", format!("the report is not valid JSON for its type: {e}"))
    })?;
    report.validate().map_err(|e| refuse(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e.to_string()))?;
    admission::admit(fleet, &caller, &report)?;
    if report.kind == ReportKind::External && !fleet.with_router(|r| r.view(&report.backend).is_some()) {
        // First sight of this external name: it must not be a node's, even one
        // whose agent has not reported (yet, or since a failover).
        let nodes: Api<Node> = Api::all(state.client.clone());
        match nodes.get_metadata_opt(&report.backend).await {
            Ok(None) => {}
            Ok(Some(_)) => {
                let message = format!("{} is a node's name; pick another for the external backend", report.backend);
                return Err(refuse(StatusCode::CONFLICT, "wrong_node", message));
            }
            Err(e) => return Err(refuse(StatusCode::SERVICE_UNAVAILABLE, "review_failed", e.to_string())),
        }
    }
    let now = Instant::now();
    fleet.with_router(|router| router.ingest(report, now));
    Ok(())
}
