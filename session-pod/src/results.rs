//! `POST /api/v1/results`: the client's results, checked, graded, shown in
//! /metrics and forwarded to the operator with the session's credentials.

use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use tidepool_protocol::grading;
use tidepool_protocol::results::{RESULTS_BODY_LIMIT, ResultsAccepted, ResultsSubmission, validate};

use crate::body::{parse_json, read_body};
use crate::error::{ApiError, Reason, json_response};
use crate::session::BoundSession;
use crate::state::PodState;

pub async fn submit(
    State(state): State<Arc<PodState>>,
    Extension(session): Extension<Arc<BoundSession>>,
    body: Body,
) -> Result<Response, ApiError> {
    let body = read_body(body, RESULTS_BODY_LIMIT, state.body_read_timeout).await?;
    let mut submission: ResultsSubmission = parse_json(&body)?;
    validate(&submission.results)
        .map_err(|e| ApiError::new(Reason::InvalidResults, StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    // The operator stamps these when it takes the results; a client's say is void.
    submission.results.is_final = submission.is_final;
    submission.results.reported_at = None;
    grading::grade(&mut submission.results);
    state.metrics.show_results(&submission.results);
    *state.latest_results.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(submission.results.clone());

    let report = state.reporter.report(&session, &submission).await;
    let reported = report.is_ok();
    state.metrics.results.with_label_values(&[if reported { "true" } else { "false" }]).inc();
    if let Err(e) = &report {
        tracing::warn!(error = %e, "results not reported to the operator");
    }
    let accepted =
        ResultsAccepted { results: submission.results, reported, report_error: report.err().map(|e| e.to_string()) };
    Ok(json_response(StatusCode::OK, &accepted))
}
