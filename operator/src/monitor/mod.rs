//! The Monitor controller: probing that outlives a session.
//!
//! Each pass observes the monitor and its runs (the TestSessions it owns,
//! from the session cache), asks [`decide::decide`] for one step, takes it,
//! and writes the monitor's status. A run's probes are run by the operator
//! itself, as the run's client ([`drive`]); the session then completes like
//! any other, and the history limits delete the oldest.
//!
//! - [`schedule`]: cron fields and `@every` (pure).
//! - [`decide`]: the next step, and the tier the next run starts in (pure).
//! - [`drive`]: the HTTP call to the run's pod, and its answer checked.

pub mod decide;
pub mod drive;
pub mod schedule;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use serde_json::json;
use tidepool_crds::monitor::{MonitorRun, MonitorStatus, RunResult};
use tidepool_crds::test_session::{Phase, Profile, SessionResults, TestSessionSpec};
use tidepool_crds::{Monitor, TestSession};
use tidepool_wire::token::ThresholdClaims;

use crate::conditions::{self, reason};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::events::{self, Notice};
use crate::labels;
use decide::{Observed, RunSession, Step, decide, next_tier};
use drive::RunOutcome;
use schedule::Schedule;

/// Runs a monitor keeps in its status.
const STATUS_RUNS: usize = 10;
/// After a step that changed something, look again at once.
const AGAIN: Duration = Duration::from_millis(100);

pub async fn reconcile(cached: Arc<Monitor>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = cached.namespace().ok_or(Error::Missing("Monitor", "namespace"))?;
    // Read fresh: a pass right after this controller's own status write may
    // be handed the object from before it, and would record or start a run
    // twice. A monitor passes a few times per run, so the read is cheap.
    let api: Api<Monitor> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(monitor) = api.get_opt(&cached.name_any()).await? else { return Ok(Action::await_change()) };
    let monitor = Arc::new(monitor);
    let uid = monitor.uid().ok_or(Error::Missing("Monitor", "uid"))?;
    let status = monitor.status.clone().unwrap_or_default();
    let now = Timestamp::now();
    let runs = runs_of(&ctx, &namespace, &uid, &status);
    let created = monitor.creation_timestamp().map_or(now, |t| t.0);
    let observed = Observed {
        now,
        schedule: Schedule::parse(&monitor.spec.schedule),
        suspended: monitor.spec.suspend,
        last_due: status.last_schedule_time.as_ref().map_or(created, |t| t.0),
        active: status.active.clone(),
        run_ttl: Duration::from_secs(u64::try_from(monitor.spec.run_ttl_seconds).unwrap_or(300)),
        runs,
        successful_history: usize::try_from(monitor.spec.successful_runs_history_limit).unwrap_or(0),
        failed_history: usize::try_from(monitor.spec.failed_runs_history_limit).unwrap_or(0),
    };
    let step = decide(&observed);
    tracing::debug!(monitor = %monitor.name_any(), ?step, "monitor step");
    match step {
        Step::Invalid(why) => {
            let mut next = status.clone();
            next.next_run_at = None;
            ready(&mut next, &monitor, false, reason::INVALID_SCHEDULE, &why, now);
            write_status(&ctx, &monitor, &status, &next).await?;
            Ok(Action::await_change())
        }
        Step::Record(name) => {
            let session = session(&ctx, &namespace, &name);
            let run = recorded(&name, session.as_deref(), &status, now);
            let mut next = status.clone();
            finish(&ctx, &monitor, &mut next, run, None).await;
            write_status(&ctx, &monitor, &status, &next).await?;
            Ok(Action::requeue(AGAIN))
        }
        Step::Prune(names) => {
            let api: Api<TestSession> = Api::namespaced(ctx.client.clone(), &namespace);
            for name in names {
                match api.delete(&name, &DeleteParams::background()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Ok(Action::requeue(AGAIN))
        }
        Step::Drive(name) => {
            let Some(session) = session(&ctx, &namespace, &name) else { return Ok(Action::requeue(AGAIN)) };
            let tier = u8::try_from(status.current_tier.clamp(1, 3)).unwrap_or(1);
            let thresholds = drive::thresholds(monitor.spec.thresholds.as_ref());
            let outcome = run_probes(&ctx, &session, tier, thresholds).await;
            // The session gets the results (or none), final: it completes and frees its pod.
            let results = SessionResults {
                probes: outcome.as_ref().map(|o| o.results.clone()).unwrap_or_default(),
                is_final: true,
                reported_at: Some(Time(Timestamp::now())),
                ..SessionResults::default()
            };
            write_results(&ctx, &session, &results).await?;
            let mut run = recorded(&name, Some(&session), &status, Timestamp::now());
            run.probes_ok = count(&results, true);
            run.probes_failed = count(&results, false);
            let held = match &outcome {
                Ok(outcome) => {
                    run.end_tier = i32::from(outcome.end_tier);
                    run.reasons = outcome.reasons.clone();
                    run.result = if run.probes_failed == 0 { RunResult::Succeeded } else { RunResult::Degraded };
                    Some(outcome)
                }
                Err(why) => {
                    run.result = RunResult::Failed;
                    run.reasons = vec![why.to_string()];
                    None
                }
            };
            let mut next = status.clone();
            finish(&ctx, &monitor, &mut next, run, held).await;
            write_status(&ctx, &monitor, &status, &next).await?;
            Ok(Action::requeue(AGAIN))
        }
        Step::Start(due) => {
            let name = start_run(&ctx, &monitor, &namespace).await?;
            let mut next = status.clone();
            next.active = Some(name);
            next.last_schedule_time = Some(Time(due));
            next.next_run_at = observed.schedule.as_ref().ok().and_then(|s| s.next_after(due)).map(Time);
            ready(&mut next, &monitor, true, reason::SCHEDULED, "runs are being made", now);
            write_status(&ctx, &monitor, &status, &next).await?;
            Ok(Action::requeue(decide::RUN_RECHECK))
        }
        Step::Wait { recheck, next_due } => {
            let mut next = status.clone();
            next.next_run_at = next_due.map(Time);
            let (why, message) = if monitor.spec.suspend {
                (reason::SUSPENDED, "suspended: no runs are made")
            } else {
                (reason::SCHEDULED, "runs are being made")
            };
            ready(&mut next, &monitor, !monitor.spec.suspend, why, message, now);
            write_status(&ctx, &monitor, &status, &next).await?;
            Ok(Action::requeue(recheck.max(AGAIN)))
        }
    }
}

pub fn error_policy(_monitor: Arc<Monitor>, error: &Error, _ctx: Arc<Context>) -> Action {
    if error.is_transient() {
        Action::requeue(Duration::from_secs(2))
    } else {
        Action::requeue(Duration::from_secs(60))
    }
}

/// The monitor's runs from the session cache, newest first.
fn runs_of(ctx: &Context, namespace: &str, uid: &str, status: &MonitorStatus) -> Vec<RunSession> {
    let mut runs: Vec<RunSession> = ctx
        .sessions
        .state()
        .iter()
        .filter(|s| s.metadata.namespace.as_deref() == Some(namespace))
        .filter(|s| s.owner_references().iter().any(|o| o.uid == uid && o.controller == Some(true)))
        .map(|s| {
            let name = s.name_any();
            let session_status = s.status.clone().unwrap_or_default();
            let record = status.runs.iter().find(|r| r.session == name);
            RunSession {
                created: s.creation_timestamp().map_or(Timestamp::UNIX_EPOCH, |t| t.0),
                phase: session_status.phase,
                has_results: session_status.results.as_ref().is_some_and(|r| r.is_final),
                ready: session_status.phase == Phase::Ready,
                recorded: record.is_some(),
                succeeded: record.is_some_and(|r| r.result != RunResult::Failed),
                name,
            }
        })
        .collect();
    runs.sort_by(|a, b| b.created.cmp(&a.created).then_with(|| b.name.cmp(&a.name)));
    runs
}

fn session(ctx: &Context, namespace: &str, name: &str) -> Option<Arc<TestSession>> {
    ctx.sessions.get(&ObjectRef::new(name).within(namespace))
}

/// What the status says of a run, from its session as it ended (results
/// and tier filled in by the caller when the run was driven).
fn recorded(name: &str, session: Option<&TestSession>, status: &MonitorStatus, now: Timestamp) -> MonitorRun {
    let tier = status.current_tier.clamp(1, 3);
    let session_status = session.and_then(|s| s.status.clone()).unwrap_or_default();
    let results = session_status.results.unwrap_or_default();
    let (ok, failed) = (count(&results, true), count(&results, false));
    let end_tier = results.probes.iter().map(|p| p.tier).max().unwrap_or(tier).clamp(1, 3);
    let result = match (results.probes.is_empty(), failed) {
        (true, _) => RunResult::Failed,
        (false, 0) => RunResult::Succeeded,
        _ => RunResult::Degraded,
    };
    let reasons = match (result, session) {
        (RunResult::Failed, Some(_)) => {
            vec![format!("the run's session ended {} before its probes ran", session_status.phase)]
        }
        (RunResult::Failed, None) => vec!["the run's session is gone (deleted before its probes ran)".to_owned()],
        _ => Vec::new(),
    };
    MonitorRun {
        session: name.to_owned(),
        scheduled_at: status.last_schedule_time.clone(),
        finished_at: Some(Time(now)),
        result,
        phase: session_status.phase,
        start_tier: tier,
        end_tier,
        probes_ok: ok,
        probes_failed: failed,
        reasons,
    }
}

fn count(results: &SessionResults, ok: bool) -> i32 {
    i32::try_from(results.probes.iter().filter(|p| p.ok == ok).count()).unwrap_or(i32::MAX)
}

/// Puts `run` first in the status, moves the tier, clears the active run,
/// and counts it.
async fn finish(
    ctx: &Context,
    monitor: &Monitor,
    next: &mut MonitorStatus,
    run: MonitorRun,
    outcome: Option<&RunOutcome>,
) {
    let start = u8::try_from(run.start_tier).unwrap_or(1);
    let tier = match outcome {
        Some(outcome) => next_tier(start, outcome.end_tier, outcome.holding),
        // Without the pod's judgement the tier moves only up, as the run did.
        None => start.max(u8::try_from(run.end_tier).unwrap_or(1)),
    };
    next.current_tier = i32::from(tier);
    if next.active.as_deref() == Some(run.session.as_str()) {
        next.active = None;
    }
    let (namespace, name) = (monitor.namespace().unwrap_or_default(), monitor.name_any());
    let result = match run.result {
        RunResult::Succeeded => "Succeeded",
        RunResult::Degraded => "Degraded",
        RunResult::Failed => "Failed",
    };
    ctx.metrics.monitor_runs.with_label_values(&[&namespace, &name, result]).inc();
    ctx.metrics.monitor_tier.with_label_values(&[&namespace, &name]).set(i64::from(tier));
    ctx.metrics.monitor_last_run.with_label_values(&[&namespace, &name]).set(Timestamp::now().as_second() as f64);
    let note = match run.result {
        RunResult::Failed => format!("run {} failed: {}", run.session, run.reasons.join("; ")),
        _ => format!(
            "run {}: {} probes answered, {} failed, tier {} to {}; the next run starts in tier {tier}",
            run.session, run.probes_ok, run.probes_failed, run.start_tier, run.end_tier
        ),
    };
    let notice = match run.result {
        RunResult::Failed => Notice::warning(reason::RUN_FAILED, note),
        _ => Notice::normal(reason::RUN_FINISHED, note),
    };
    events::publish(&ctx.recorder, monitor, &notice).await;
    next.runs.retain(|r| r.session != run.session);
    next.runs.insert(0, run);
    next.runs.truncate(STATUS_RUNS);
}

/// Runs the session's probes on its pod, with credentials signed by its pool's key.
async fn run_probes(
    ctx: &Context,
    session: &TestSession,
    tier: u8,
    thresholds: ThresholdClaims,
) -> Result<RunOutcome, drive::DriveError> {
    let namespace = session.namespace().unwrap_or_default();
    let pool = ctx.pools.get(&ObjectRef::new(&session.spec.pool).within(&namespace));
    let pool_uid = pool.and_then(|p| p.uid()).ok_or(drive::DriveError::NotBound("pool"))?;
    let keys = match ctx.keys.load(&ctx.client, &namespace, &session.spec.pool, &pool_uid).await {
        Ok(Some(keys)) => keys,
        Ok(None) => return Err(drive::DriveError::NotBound("pool key")),
        Err(e) => return Err(drive::DriveError::Unreachable(format!("reading the pool's key: {e}"))),
    };
    drive::run(&ctx.monitor_http, &keys, session, tier, thresholds).await
}

/// Writes the run's final results into its session's status.
async fn write_results(ctx: &Context, session: &TestSession, results: &SessionResults) -> Result<()> {
    let api: Api<TestSession> = Api::namespaced(ctx.client.clone(), &session.namespace().unwrap_or_default());
    let patch = json!({ "status": { "results": results } });
    let params = PatchParams { field_manager: Some(labels::MANAGER.into()), ..PatchParams::default() };
    match api.patch_status(&session.name_any(), &params, &Patch::Merge(&patch)).await {
        Ok(_) => Ok(()),
        // The session went away meanwhile: the run is recorded as it is.
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Makes the next run: a TestSession of the `probes` profile, owned by the monitor.
async fn start_run(ctx: &Context, monitor: &Monitor, namespace: &str) -> Result<String> {
    let owner = OwnerReference {
        api_version: tidepool_crds::API_VERSION.into(),
        kind: "Monitor".into(),
        name: monitor.name_any(),
        uid: monitor.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let spec = TestSessionSpec {
        pool: monitor.spec.pool.clone(),
        profile: Profile::Probes,
        ttl_seconds: Some(monitor.spec.run_ttl_seconds),
        sticky_key: None,
        client: None,
        probes: monitor.spec.probes.clone(),
    };
    let mut session = TestSession::new("", spec);
    session.metadata = ObjectMeta {
        generate_name: Some(format!("{}-", truncate(&monitor.name_any(), 50))),
        namespace: Some(namespace.to_owned()),
        owner_references: Some(vec![owner]),
        labels: Some([(labels::MONITOR.to_string(), truncate(&monitor.name_any(), 63))].into()),
        ..ObjectMeta::default()
    };
    let api: Api<TestSession> = Api::namespaced(ctx.client.clone(), namespace);
    let created = api.create(&PostParams::default(), &session).await?;
    let name = created.name_any();
    tracing::info!(monitor = %monitor.name_any(), session = %name, "monitor run started");
    Ok(name)
}

fn truncate(name: &str, max: usize) -> String {
    name.chars().take(max).collect::<String>().trim_end_matches(['-', '.']).to_owned()
}

fn ready(next: &mut MonitorStatus, monitor: &Monitor, ok: bool, why: &str, message: &str, now: Timestamp) {
    let generation = monitor.meta().generation;
    conditions::set(&mut next.conditions, conditions::READY, ok, why, message, generation, now);
    next.observed_generation = generation;
    if next.current_tier == 0 {
        next.current_tier = 1;
    }
}

/// Writes the status when it changed.
async fn write_status(ctx: &Context, monitor: &Monitor, before: &MonitorStatus, next: &MonitorStatus) -> Result<()> {
    if before == next {
        return Ok(());
    }
    let api: Api<Monitor> = Api::namespaced(ctx.client.clone(), &monitor.namespace().unwrap_or_default());
    let mut status = serde_json::to_value(next).map_err(|e| Error::Invalid {
        kind: "Monitor",
        name: monitor.name_any(),
        reason: format!("its status does not serialise: {e}"),
    })?;
    // A merge patch keeps what it does not name: absent fields are cleared by name.
    if let Some(fields) = status.as_object_mut() {
        for field in ["active", "nextRunAt"] {
            fields.entry(field).or_insert(serde_json::Value::Null);
        }
    }
    let patch = json!({ "status": status });
    let params = PatchParams { field_manager: Some(labels::MANAGER.into()), ..PatchParams::default() };
    api.patch_status(&monitor.name_any(), &params, &Patch::Merge(&patch)).await?;
    Ok(())
}
