//! `POST /api/v1/route`: the best backend for a client outside the cluster.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use tidepool_protocol::api::{BackendKind, RouteAnswer, RouteRequest};
use tidepool_wire::report::ReportKind;

use super::access::{Ask, Caller};
use super::reply::{Refused, error, json_body};
use super::state::ApiState;
use super::{deny, refuse};
use crate::placement::{Need, Request};

pub async fn route(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if let Err(denied) = state.access.authorize(&caller, Ask::Route).await {
        return deny(&state, "route", &denied);
    }
    let request: RouteRequest = match json_body(body) {
        Ok(request) => request,
        Err(refused) => return refuse(&state, "route", refused),
    };
    if let Err(message) = request.check() {
        return refuse(&state, "route", Refused::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_field", message));
    }
    let fleet = &state.fleet;
    if !fleet.is_leading() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "this replica does not lead; retry");
    }
    let weights = request.weights.clone().unwrap_or_default();
    let sticky = request.sticky_key.as_deref().or(request.client_address.as_deref());
    // A client asking again replaces its own reservation rather than adding one.
    // Where the client is: as it says, or as the GeoIP database places its address.
    let located = request.coordinates.or_else(|| {
        let address = request.client_address.as_deref()?.parse::<std::net::IpAddr>().ok()?;
        state.geoip.as_ref()?.locate(address.to_canonical())
    });
    let asked =
        Request { need: Need::from(&request.tier), weights: &weights, client: located, sticky, replaces_own: true };
    let answer: Result<RouteAnswer, crate::placement::NoFit> = fleet.with_router(|router| {
        let pick = router.route(&asked, Instant::now())?;
        let view = router.view(&pick.backend);
        Ok(RouteAnswer {
            kind: match view.map(|v| v.kind) {
                Some(ReportKind::External) => BackendKind::External,
                _ => BackendKind::Node,
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
