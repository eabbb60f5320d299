//! `POST /api/v1/route`: the best backend for a client outside the cluster.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tidepool_crds::warm_pool::{PlacementWeights, Tier};
use tidepool_wire::report::{Coordinates, ReportKind};

use crate::api::{ApiState, error};
use crate::placement::{Need, Request};

/// What a client asks.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteRequest {
    pub tier: Tier,
    /// The client's address; it is the sticky key when none is given.
    #[serde(default)]
    pub client_address: Option<String>,
    #[serde(default)]
    pub coordinates: Option<Coordinates>,
    #[serde(default)]
    pub sticky_key: Option<String>,
    /// Score weights; the defaults are the reference router's.
    #[serde(default)]
    pub weights: Option<PlacementWeights>,
}

/// The answer.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct RouteAnswer {
    pub backend: String,
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub score: f64,
    /// The sticky key's backend was reused.
    pub sticky: bool,
    /// How long ago the operator received the backend's latest report.
    pub report_age_ms: u64,
    /// How old the newest sample in that report is, by the wall clock.
    pub sample_age_ms: u64,
}

/// Checks a request's figures; the message names the field.
pub fn check(request: &RouteRequest) -> Result<(), String> {
    let tier = &request.tier;
    let ranges: [(&str, i64, i64, i64); 5] = [
        ("tier.vcpu", i64::from(tier.vcpu), 1, 512),
        ("tier.memoryMiB", tier.memory_mib, 16, 4_194_304),
        ("tier.diskGiB", tier.disk_gib, 0, 65_536),
        ("tier.gpus", i64::from(tier.gpus), 0, 16),
        ("tier.gpuMemoryMiB", tier.gpu_memory_mib, 0, 4_194_304),
    ];
    for (field, value, min, max) in ranges {
        if !(min..=max).contains(&value) {
            return Err(format!("{field} must be between {min} and {max}"));
        }
    }
    if let Some(address) = &request.client_address
        && address.parse::<IpAddr>().is_err()
    {
        return Err("clientAddress must be an IPv4 or IPv6 address".into());
    }
    if let Some(c) = &request.coordinates
        && !((-90.0..=90.0).contains(&c.latitude) && (-180.0..=180.0).contains(&c.longitude))
    {
        return Err("coordinates: latitude must be within ±90 and longitude within ±180".into());
    }
    if request.sticky_key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 253) {
        return Err("stickyKey must be 1 to 253 characters".into());
    }
    if let Some(w) = &request.weights {
        let all = [w.distance, w.cpu, w.memory, w.gpu, w.latency];
        if all.iter().any(|v| !(v.is_finite() && (0.0..=1000.0).contains(v))) {
            return Err("weights must each be between 0 and 1000".into());
        }
    }
    Ok(())
}

pub async fn route(State(state): State<Arc<ApiState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    let request: RouteRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("invalid request body: {e}")),
    };
    if let Err(message) = check(&request) {
        return error(StatusCode::UNPROCESSABLE_ENTITY, message);
    }
    let fleet = &state.fleet;
    if !fleet.is_leading() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "this replica does not lead; retry");
    }
    let weights = request.weights.clone().unwrap_or_default();
    let sticky = request.sticky_key.as_deref().or(request.client_address.as_deref());
    // A client asking again replaces its own reservation rather than adding one.
    let asked = Request {
        need: Need::from(&request.tier),
        weights: &weights,
        client: request.coordinates,
        sticky,
        replaces_own: true,
    };
    let answer: Result<RouteAnswer, crate::placement::NoFit> = fleet.with_router(|router| {
        let pick = router.route(&asked, Instant::now())?;
        let view = router.view(&pick.backend);
        Ok(RouteAnswer {
            kind: match view.map(|v| v.kind) {
                Some(ReportKind::External) => "external",
                _ => "node",
            },
            address: view.and_then(|v| v.address.clone()),
            region: view.and_then(|v| v.region.clone()),
            score: pick.score,
            sticky: pick.sticky,
            report_age_ms: u64::try_from(pick.view_age.as_millis()).unwrap_or(u64::MAX),
            sample_age_ms: view.map_or(0, |v| unix_ms().saturating_sub(v.sampled_at_ms)),
            backend: pick.backend,
        })
    });
    match answer {
        Ok(answer) => {
            state.metrics.placements.with_label_values(&["route", "placed"]).inc();
            state.metrics.placement_view_age.observe(answer.report_age_ms as f64 / 1000.0);
            (StatusCode::OK, Json(answer)).into_response()
        }
        Err(no_fit) => {
            state.metrics.placements.with_label_values(&["route", "no_fit"]).inc();
            error(StatusCode::SERVICE_UNAVAILABLE, no_fit.to_string())
        }
    }
}

fn unix_ms() -> u64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> RouteRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn bad_figures_name_their_field() {
        let ok = parse(r#"{"tier": {"vcpu": 1, "memoryMiB": 1024}}"#);
        assert_eq!(check(&ok), Ok(()));
        let cases = [
            (r#"{"tier": {"vcpu": 0, "memoryMiB": 1024}}"#, "tier.vcpu"),
            (r#"{"tier": {"vcpu": 1, "memoryMiB": 1}}"#, "tier.memoryMiB"),
            (r#"{"tier": {"vcpu": 1, "memoryMiB": 64, "gpus": 99}}"#, "tier.gpus"),
            (r#"{"tier": {"vcpu": 1, "memoryMiB": 64}, "clientAddress": "nope"}"#, "clientAddress"),
            (
                r#"{"tier": {"vcpu": 1, "memoryMiB": 64}, "coordinates": {"latitude": 99, "longitude": 0}}"#,
                "coordinates",
            ),
            (r#"{"tier": {"vcpu": 1, "memoryMiB": 64}, "stickyKey": ""}"#, "stickyKey"),
        ];
        for (json, field) in cases {
            let message = check(&parse(json)).unwrap_err();
            assert!(message.starts_with(field), "{json}: {message}");
        }
        assert!(serde_json::from_str::<RouteRequest>(r#"{"tier": {"vcpu": 1, "memoryMiB": 64}, "x": 1}"#).is_err());
    }
}
