//! `POST /api/v1/probes`: the session's outbound probes, once or every
//! interval, and `DELETE /api/v1/probes` to stop the continuous runs.
//!
//! A client may only point the pod at the TestSession's own targets: the
//! session token carries their digest, signed by the operator, so a pod
//! cannot be turned into a scanner of whatever a client names. The targets'
//! addresses must pass the pool's egress policy, and a session's runs are
//! capped in bytes and in runs a minute.

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Serialize};
use tidepool_crds::test_session::SessionResults;

use crate::body::{parse_json, read_body};
use crate::error::{ApiError, Reason, json_response, parse_query};
use crate::probes::{self, ContinuousRun, ContinuousSettings, ProbeSettings, Run};
use crate::session::BoundSession;
use crate::state::{PodState, ProbeRuns};
use tidepool_protocol::pod::{Escalation, ProbeRequest, ProbeResponse, probes_digest};
use tidepool_protocol::results::ResultsSubmission;

/// A probe request is a list of at most 32 targets; this is plenty.
const PROBES_BODY_LIMIT: usize = 128 * 1024;
/// The shortest and longest interval of continuous runs, in seconds.
const MIN_EVERY_SECONDS: u64 = 10;
const MAX_EVERY_SECONDS: u64 = 86_400;

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ProbeQuery {
    /// Run every this many seconds from now on, posting each run's results
    /// to the operator, instead of once.
    every_seconds: Option<u64>,
}

/// The answer when continuous runs start.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ContinuousStarted {
    every_seconds: u64,
    start_tier: u8,
}

pub async fn run(
    State(state): State<Arc<PodState>>,
    Extension(session): Extension<Arc<BoundSession>>,
    RawQuery(query): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let query: ProbeQuery = parse_query(query.as_deref())?;
    let body = read_body(body, PROBES_BODY_LIMIT, state.body_read_timeout).await?;
    let request: ProbeRequest = parse_json(&body)?;
    check_targets(&request, &session)?;
    let tier = match request.tier.unwrap_or(1) {
        tier @ 1..=3 => tier as u8,
        other => {
            let message = format!("tier: {other} is not 1, 2 or 3");
            return Err(ApiError::new(Reason::ProbeTier, StatusCode::UNPROCESSABLE_ENTITY, message));
        }
    };
    // Only the operator raises where a run starts (through the token); past
    // that, escalation is the pod's own decision from what it measures.
    if tier > session.claims.tier {
        let allowed = session.claims.tier;
        return Err(ApiError::new(
            Reason::ProbeTier,
            StatusCode::FORBIDDEN,
            format!("tier: this session may start probe runs at tier {allowed} at most"),
        ));
    }
    let runs = &state.probe_runs;
    match query.every_seconds {
        None => {
            if runs.continuous_running() {
                return Err(busy("continuous probe runs go on; DELETE /api/v1/probes first"));
            }
            let Ok(_permit) = runs.running.try_acquire() else {
                return Err(busy("a probe run is already going on this pod"));
            };
            runs.start_run()?;
            state.metrics.probe_runs.with_label_values(&["once"]).inc();
            let run = probes::run(&request.targets, tier, &session_settings(runs, &session)).await;
            count_run(&state, &run);
            let escalations = run
                .escalations
                .iter()
                .map(|(from, reasons)| Escalation { from: *from, reasons: reasons.clone() })
                .collect();
            let response = ProbeResponse { results: run.results(), escalations, holding: run.holding.clone() };
            Ok(json_response(StatusCode::OK, &response))
        }
        Some(every) if !(MIN_EVERY_SECONDS..=MAX_EVERY_SECONDS).contains(&every) => Err(ApiError::new(
            Reason::ProbeInterval,
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("everySeconds: {every} is outside {MIN_EVERY_SECONDS} to {MAX_EVERY_SECONDS}"),
        )),
        Some(every) => {
            // One set of runs at a time, and none beside a one-shot run: a
            // client cannot stack runs by asking again and again.
            if runs.continuous_running() {
                return Err(busy("continuous probe runs go on already; DELETE /api/v1/probes first"));
            }
            if runs.running.available_permits() == 0 {
                return Err(busy("a probe run is already going on this pod"));
            }
            let per_minute = runs.runs_per_minute();
            if per_minute == 0 || every < 60_u64.div_ceil(u64::from(per_minute)) {
                let message = format!(
                    "limit probe_runs_per_minute: everySeconds={every} would start more than the \
                     {per_minute} probe runs a minute this session may"
                );
                return Err(ApiError::new(Reason::ProbeRunsPerMinute, StatusCode::TOO_MANY_REQUESTS, message));
            }
            // The first run starts now; later runs count as they finish.
            runs.start_run()?;
            let every_settings =
                ContinuousSettings { interval: Duration::from_secs(every), start_tier: tier, max_runs: None };
            let sink_state = state.clone();
            let sink_session = session.clone();
            let sink = move |run: ContinuousRun| {
                let (state, session) = (sink_state.clone(), sink_session.clone());
                async move { report(&state, &session, run).await }
            };
            let handle =
                probes::spawn_continuous(request.targets, session_settings(runs, &session), every_settings, sink);
            runs.set_continuous(handle);
            Ok(json_response(StatusCode::ACCEPTED, &ContinuousStarted { every_seconds: every, start_tier: tier }))
        }
    }
}

/// Counts a finished run into the metrics: its bytes, and its targets the
/// egress policy refused.
fn count_run(state: &PodState, run: &Run) {
    state.probe_runs.count_bytes(&state.metrics.probe_bytes);
    for refused in run.outcomes.iter().filter_map(|outcome| outcome.facts.egress_refused) {
        state.metrics.probe_egress_refusals.with_label_values(&[refused]).inc();
    }
}

/// `DELETE /api/v1/probes`: stops the continuous runs (204), or 404 when
/// none go on.
pub async fn stop(
    State(state): State<Arc<PodState>>,
    Extension(_session): Extension<Arc<BoundSession>>,
) -> Result<Response, ApiError> {
    let running = state.probe_runs.take_continuous();
    match running {
        Some(handle) => {
            handle.stop().await;
            Ok(json_response(StatusCode::OK, &serde_json::json!({ "stopped": true })))
        }
        None => Err(ApiError::not_found(Reason::ProbeBusy, "no continuous probe runs go on")),
    }
}

fn busy(message: &str) -> ApiError {
    ApiError::too_many(Reason::ProbeBusy, message, Duration::from_secs(1))
}

/// The targets must be the ones the session token names.
fn check_targets(request: &ProbeRequest, session: &BoundSession) -> Result<(), ApiError> {
    let unprocessable = |message| ApiError::new(Reason::ProbeTargets, StatusCode::UNPROCESSABLE_ENTITY, message);
    if request.targets.is_empty() {
        return Err(unprocessable("targets: at least one target is needed"));
    }
    if request.targets.len() > 32 {
        return Err(unprocessable("targets: at most 32 targets"));
    }
    if probes_digest(&request.targets) != session.claims.probes {
        let message = match &session.claims.probes {
            None => "this session has no probe targets; they are set in the TestSession's spec.probes".to_string(),
            Some(_) => "these targets are not this session's spec.probes, byte for byte".to_string(),
        };
        return Err(ApiError::new(Reason::ProbeTargets, StatusCode::FORBIDDEN, message));
    }
    Ok(())
}

/// Keeps one continuous run's results and posts them to the operator as
/// progress (not final: the runs go on). They replace only the probes of the
/// pod's latest results, so the client's own figures stay; once the session
/// has its final results, the runs have nothing more to report.
async fn report(state: &PodState, session: &BoundSession, run: ContinuousRun) {
    state.metrics.probe_runs.with_label_values(&["continuous"]).inc();
    count_run(state, &run.run);
    // The first run was counted when the runs started.
    if run.number > 1 {
        // Over the cap a run still reports: the interval was checked against it.
        let _ = state.probe_runs.start_run();
    }
    let latest = state.latest_results.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if latest.as_ref().is_some_and(|r| r.is_final) {
        return;
    }
    let mut results = SessionResults { probes: run.run.results(), ..latest.unwrap_or_default() };
    tidepool_protocol::grading::grade(&mut results);
    state.metrics.show_results(&results);
    *state.latest_results.lock().unwrap_or_else(|p| p.into_inner()) = Some(results.clone());
    let submission = ResultsSubmission { results, is_final: false };
    if let Err(e) = state.reporter.report(session, &submission).await {
        tracing::warn!(run = run.number, error = %e, "continuous probe results not reported to the operator");
    }
}

/// The pod's probe settings, with the escalation rules the session's token
/// carries when it carries any (a monitor's; only the operator signs them).
fn session_settings(runs: &ProbeRuns, session: &BoundSession) -> ProbeSettings {
    let mut settings = runs.settings();
    if let Some(thresholds) = session.claims.thresholds {
        settings.thresholds = thresholds.into();
    }
    settings
}
