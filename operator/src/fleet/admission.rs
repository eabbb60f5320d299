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

use super::Fleet;
use super::auth::{AuthError, Caller};
use crate::api::{ApiState, error};

/// Why a report is refused, with the status code it gets.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: StatusCode,
    pub reason: &'static str,
    pub message: String,
}

fn refuse(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Refusal {
    Refusal { code, reason, message: message.into() }
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
    admit(fleet, &caller, &report)?;
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

/// Whether `caller` may speak for the report's backend.
pub fn admit(fleet: &Fleet, caller: &Caller, report: &AgentReport) -> Result<(), Refusal> {
    let expected =
        format!("system:serviceaccount:{}:{}", fleet.settings.agent_namespace, fleet.settings.agent_service_account);
    if caller.username != expected {
        return Err(refuse(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{} is not the agents' ServiceAccount {expected}", caller.username),
        ));
    }
    match (report.kind, caller.node.as_deref()) {
        (ReportKind::Node, Some(node)) if node == report.backend => Ok(()),
        (ReportKind::Node, Some(node)) => Err(refuse(
            StatusCode::FORBIDDEN,
            "wrong_node",
            format!("the token is bound to a pod on node {node}, not on node {}", report.backend),
        )),
        (ReportKind::Node, None) => Err(refuse(
            StatusCode::FORBIDDEN,
            "wrong_node",
            "a node report needs a token bound to the agent's pod on that node",
        )),
        (ReportKind::External, Some(node)) => Err(refuse(
            StatusCode::FORBIDDEN,
            "wrong_node",
            format!("the agent on node {node} may not report an external backend"),
        )),
        (ReportKind::External, None) if caller.pod_bound => Err(refuse(
            StatusCode::FORBIDDEN,
            "wrong_node",
            "a token bound to a pod may not report an external backend",
        )),
        (ReportKind::External, None) => {
            let clash = fleet.with_router(|r| r.view(&report.backend).is_some_and(|v| v.kind == ReportKind::Node));
            if clash {
                return Err(refuse(
                    StatusCode::CONFLICT,
                    "wrong_node",
                    format!("{} is a node backend; pick another name for the external one", report.backend),
                ));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::FleetSettings;
    use tidepool_wire::report::{Capacity, Window};

    fn report(kind: ReportKind, backend: &str) -> AgentReport {
        AgentReport::new(
            backend,
            kind,
            Capacity { cores: 1, memory_bytes: 1, disk_bytes: 0, gpus: vec![] },
            vec![Window { seconds: 10, cores: vec![0.0], ..Window::default() }],
        )
    }

    fn agent(node: Option<&str>) -> Caller {
        Caller {
            username: "system:serviceaccount:default:tidepool-agent".into(),
            node: node.map(Into::into),
            pod_bound: node.is_some(),
        }
    }

    #[test]
    fn an_agent_speaks_only_for_its_own_node() {
        let fleet = Fleet::new(FleetSettings::default());
        assert_eq!(admit(&fleet, &agent(Some("n1")), &report(ReportKind::Node, "n1")), Ok(()));
        let wrong = admit(&fleet, &agent(Some("n1")), &report(ReportKind::Node, "n2")).unwrap_err();
        assert_eq!((wrong.code, wrong.reason), (StatusCode::FORBIDDEN, "wrong_node"));
        assert!(admit(&fleet, &agent(None), &report(ReportKind::Node, "n1")).is_err());
        assert!(admit(&fleet, &agent(Some("n1")), &report(ReportKind::External, "ext")).is_err());
        let pod_without_node = Caller { pod_bound: true, ..agent(None) };
        assert!(admit(&fleet, &pod_without_node, &report(ReportKind::External, "ext")).is_err());
        let stranger =
            Caller { username: "system:serviceaccount:default:other".into(), node: Some("n1".into()), pod_bound: true };
        assert_eq!(admit(&fleet, &stranger, &report(ReportKind::Node, "n1")).unwrap_err().reason, "forbidden");
    }

    #[test]
    fn an_external_backend_cannot_take_a_node_name() {
        let fleet = Fleet::new(FleetSettings::default());
        assert_eq!(admit(&fleet, &agent(None), &report(ReportKind::External, "ext")), Ok(()));
        fleet.with_router(|r| r.ingest(report(ReportKind::Node, "n1"), Instant::now()));
        let clash = admit(&fleet, &agent(None), &report(ReportKind::External, "n1")).unwrap_err();
        assert_eq!(clash.code, StatusCode::CONFLICT);
    }
}
