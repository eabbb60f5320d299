//! Backend objects: what to write, when, and the writer that does it.
//!
//! Reports arrive every second from every node, but a Backend's status is
//! written only when it is new, when Ready, Stale or health changes, when a
//! use figure moved by [`SIGNIFICANT_POINTS`], or when a refresh is due; and
//! never more than `writes_per_second` API writes over all Backends, most
//! urgent first.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};
use serde_json::json;
use tidepool_crds::backend::{
    BackendKind, BackendSpec, BackendStatus, Capacity, GpuInfo, GpuUsage, Health as CrdHealth, HealthCheck,
    HealthCheckKind, Usage,
};
use tidepool_crds::common::Coordinates;
use tidepool_crds::{API_VERSION, Backend};
use tidepool_wire::report::ReportKind;

use super::Fleet;
use crate::conditions::{self, reason};
use crate::labels;
use crate::metrics::Metrics;
use crate::placement::view::{BackendView, Health};

/// A backend silent this long is forgotten: its node is gone or its server retired.
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);

/// A use figure that moved this many percentage points is worth a write.
pub const SIGNIFICANT_POINTS: f32 = 10.0;

/// The few figures that decide whether a write is due.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub fresh: bool,
    pub health: Health,
    pub cpu: f32,
    pub memory: f32,
    pub disk: f32,
    pub gpu: f32,
}

impl Summary {
    pub fn of(view: &BackendView, fresh: bool) -> Self {
        let cores = view.cores_by_load.len().max(1) as f32;
        let disk_total = view.report.capacity.disk_bytes.max(1) as f64;
        Self {
            fresh,
            health: view.probes.health,
            cpu: view.prefix.last().copied().unwrap_or(0.0) / cores,
            memory: view.memory_percent(0),
            disk: ((disk_total - view.disk_free as f64) * 100.0 / disk_total) as f32,
            gpu: view.gpu_percent,
        }
    }
}

/// How urgent a write is; the lowest goes first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Urgency {
    /// Never written by this process.
    New,
    /// Ready, Stale or health changed.
    Condition,
    /// What the agent says of itself (address, region, place, kind) changed.
    Spec,
    /// A use figure moved a lot.
    Drift,
    /// Nothing changed much, but the last write is old.
    Refresh,
}

/// Whether `now_summary` is worth a write after `last` (what was written and when).
pub fn due(
    last: Option<&(Summary, Instant)>,
    now_summary: &Summary,
    spec_changed: bool,
    now: Instant,
    refresh: Duration,
) -> Option<Urgency> {
    let Some((written, at)) = last else { return Some(Urgency::New) };
    if written.fresh != now_summary.fresh || written.health != now_summary.health {
        return Some(Urgency::Condition);
    }
    if spec_changed {
        return Some(Urgency::Spec);
    }
    let moved = [
        (written.cpu, now_summary.cpu),
        (written.memory, now_summary.memory),
        (written.disk, now_summary.disk),
        (written.gpu, now_summary.gpu),
    ]
    .iter()
    .any(|(a, b)| (a - b).abs() >= SIGNIFICANT_POINTS);
    if moved {
        return Some(Urgency::Drift);
    }
    // A stale backend's figures cannot change: no refresh for it.
    (now_summary.fresh && now.saturating_duration_since(*at) >= refresh).then_some(Urgency::Refresh)
}

/// How often health probes run, and their timeout.
#[derive(Clone, Copy, Debug)]
pub struct ProbeTiming {
    pub interval: Duration,
    pub timeout: Duration,
}

/// The parts of a view its Backend's spec is made from.
#[derive(Clone, Debug, PartialEq)]
pub struct SpecKey {
    kind: ReportKind,
    address: Option<String>,
    region: Option<String>,
    coordinates: Option<(f64, f64)>,
    health_port: Option<u16>,
}

impl SpecKey {
    pub fn of(view: &BackendView) -> Self {
        Self {
            kind: view.kind,
            address: view.address.clone(),
            region: view.region.clone(),
            coordinates: view.coordinates.map(|c| (c.latitude, c.longitude)),
            health_port: view.health_port,
        }
    }
}

/// The Backend's spec, as the agent describes it, with the probe that runs.
pub fn spec_of(view: &BackendView, probe: &ProbeTiming) -> BackendSpec {
    BackendSpec {
        kind: match view.kind {
            ReportKind::Node => BackendKind::Node,
            ReportKind::External => BackendKind::External,
        },
        node_name: (view.kind == ReportKind::Node).then(|| view.name.clone()),
        address: view.address.clone(),
        region: view.region.clone(),
        coordinates: view.coordinates.map(|c| Coordinates { latitude: c.latitude, longitude: c.longitude }),
        labels: Default::default(),
        health_check: super::probe::target_of(view).map(|target| HealthCheck {
            kind: if target.path.is_some() { HealthCheckKind::Http } else { HealthCheckKind::Tcp },
            port: i32::from(target.port),
            path: target.path,
            interval_seconds: i32::try_from(probe.interval.as_secs()).unwrap_or(i32::MAX).clamp(1, 3600),
            timeout_seconds: i32::try_from(probe.timeout.as_secs()).unwrap_or(i32::MAX).clamp(1, 60),
        }),
    }
}

/// The Backend's status from the view; `previous` keeps condition transition times.
pub fn status_of(view: &BackendView, fresh: bool, previous: &[Condition], generation: Option<i64>) -> BackendStatus {
    let report = &view.report;
    let window = report.windows.first().cloned().unwrap_or_default();
    let capacity = &report.capacity;
    let percent = |used: u64, total: u64| (used as f64 * 100.0 / total.max(1) as f64).clamp(0.0, 100.0);
    let per_core: Vec<f64> = window.cores.iter().map(|&p| f64::from(p)).collect();
    let cpu = if per_core.is_empty() { 0.0 } else { per_core.iter().sum::<f64>() / per_core.len() as f64 };
    let usage = Usage {
        cpu_percent: cpu,
        per_core_percent: per_core,
        memory_percent: percent(window.memory_used_bytes, capacity.memory_bytes),
        disk_percent: percent(window.disk_used_bytes, capacity.disk_bytes),
        gpu_percent: (!window.gpus.is_empty()).then(|| f64::from(view.gpu_percent)),
        gpus: window
            .gpus
            .iter()
            .zip(&capacity.gpus)
            .map(|(g, info)| GpuUsage {
                index: i32::try_from(info.index).unwrap_or(0),
                utilization_percent: f64::from(g.utilization_percent),
                memory_used_bytes: i64::try_from(g.memory_used_bytes).unwrap_or(i64::MAX),
                temperature_celsius: f64::from(g.temperature_celsius),
                power_watts: f64::from(g.power_watts),
            })
            .collect(),
    };
    let to_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let health = match view.probes.health {
        Health::Unknown => CrdHealth::Unknown,
        Health::Healthy => CrdHealth::Healthy,
        Health::Unhealthy => CrdHealth::Unhealthy,
    };
    let now = Timestamp::now();
    let mut conditions = previous.to_vec();
    let (ready, why, message) = match (fresh, health) {
        (false, _) => (false, reason::STALE, "the agent stopped reporting; out of placement until it reports again"),
        (true, CrdHealth::Unhealthy) => (false, reason::UNHEALTHY, "health probes fail; out of placement"),
        (true, _) => (true, reason::REPORTING, "the agent reports on time"),
    };
    conditions::set(&mut conditions, conditions::READY, ready, why, message, generation, now);
    let (stale_reason, stale_message) = if fresh {
        (reason::REPORTING, "reports arrive on time".to_string())
    } else {
        (reason::MISSED_REPORTS, format!("no report for {:.1} s", view.received.elapsed().as_secs_f64()))
    };
    conditions::set(&mut conditions, conditions::STALE, !fresh, stale_reason, stale_message, generation, now);
    let received_at = SystemTime::now().checked_sub(view.received.elapsed()).unwrap_or(SystemTime::UNIX_EPOCH);
    BackendStatus {
        capacity: Some(Capacity {
            cores: i32::try_from(capacity.cores).unwrap_or(i32::MAX),
            memory_bytes: to_i64(capacity.memory_bytes),
            disk_bytes: to_i64(capacity.disk_bytes),
            gpus: capacity
                .gpus
                .iter()
                .map(|g| GpuInfo {
                    index: i32::try_from(g.index).unwrap_or(0),
                    model: g.model.clone(),
                    memory_bytes: to_i64(g.memory_bytes),
                })
                .collect(),
        }),
        usage: Some(usage),
        health,
        probe_latency_ms: view.probes.latency_ms,
        last_report_time: Timestamp::try_from(received_at).ok().map(Time),
        conditions,
        observed_generation: generation,
    }
}

/// One Backend to write.
struct Job {
    name: String,
    kind: ReportKind,
    summary: Summary,
    spec: Option<BackendSpec>,
    spec_key: SpecKey,
    view: BackendView,
    fresh: bool,
}

/// What this process last wrote for a Backend.
struct Written {
    summary: Summary,
    spec: SpecKey,
    at: Instant,
    conditions: Vec<Condition>,
    generation: Option<i64>,
}

/// One backend as the write scheduler weighs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    pub name: String,
    pub urgency: Urgency,
    /// When this process last wrote it.
    pub last_written: Option<Instant>,
}

impl Candidate {
    /// A write of the spec too costs two API writes (spec, then status).
    fn cost(&self) -> f64 {
        if matches!(self.urgency, Urgency::New | Urgency::Spec) { 2.0 } else { 1.0 }
    }
}

/// The writes to make now within `budget` API writes: most urgent first,
/// within an urgency the longest unwritten first, stopping at the first that
/// does not fit (so a big write is not passed over forever by small ones).
pub fn schedule(mut due: Vec<Candidate>, budget: f64) -> Vec<Candidate> {
    due.sort_by(|a, b| (a.urgency, a.last_written, &a.name).cmp(&(b.urgency, b.last_written, &b.name)));
    let mut spent = 0.0;
    due.into_iter()
        .take_while(|candidate| {
            spent += candidate.cost();
            spent <= budget
        })
        .collect()
}

/// The write budget: refilled by `writes_per_second` over each tick, kept
/// up to one second's worth (at least two, so a new Backend can be written).
pub fn refill(budget: f64, writes_per_second: u32, tick: Duration) -> f64 {
    (budget + f64::from(writes_per_second) * tick.as_secs_f64()).min(f64::from(writes_per_second.max(2)))
}

/// Writes Backends; runs while this replica leads.
pub async fn run(client: Client, fleet: Arc<Fleet>, metrics: Arc<Metrics>) {
    let api: Api<Backend> = Api::all(client.clone());
    let nodes: Api<Node> = Api::all(client);
    let mut written: HashMap<String, Written> = HashMap::new();
    let tick = Duration::from_millis(250);
    let mut budget = 0.0f64;
    let timing = ProbeTiming { interval: fleet.settings.probe_interval, timeout: fleet.settings.probe_timeout };
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        budget = refill(budget, fleet.settings.writes_per_second, tick);
        let now = Instant::now();
        let refresh = fleet.settings.status_refresh;
        let jobs = fleet.with_router(|router| {
            router.sweep(now);
            for gone in router.evict_silent(now, FORGET_AFTER) {
                tracing::info!(backend = %gone, "no report for a long time; forgetting the backend");
                written.remove(&gone);
            }
            let mut states = [0i64; 3];
            let mut due_now = Vec::new();
            for view in router.views() {
                let fresh = router.is_fresh(view, now);
                let state = match (fresh, view.probes.health) {
                    (false, _) => 1,
                    (true, Health::Unhealthy) => 2,
                    _ => 0,
                };
                states[state] += 1;
                let summary = Summary::of(view, fresh);
                let last = written.get(&view.name);
                let spec_changed = last.is_some_and(|w| w.spec != SpecKey::of(view));
                let before = last.map(|w| (w.summary.clone(), w.at));
                if let Some(urgency) = due(before.as_ref(), &summary, spec_changed, now, refresh) {
                    due_now.push(Candidate { name: view.name.clone(), urgency, last_written: last.map(|w| w.at) });
                }
            }
            for (state, count) in ["ready", "stale", "unhealthy"].iter().zip(states) {
                metrics.backends.with_label_values(&[state]).set(count);
            }
            // Views are cloned only for the chosen.
            schedule(due_now, budget)
                .into_iter()
                .filter_map(|candidate| {
                    let view = router.view(&candidate.name)?;
                    let fresh = router.is_fresh(view, now);
                    // An external Backend's spec is its admin's: only its status is written.
                    let with_spec = candidate.cost() > 1.0 && view.kind == ReportKind::Node;
                    Some(Job {
                        name: candidate.name,
                        kind: view.kind,
                        summary: Summary::of(view, fresh),
                        spec: with_spec.then(|| spec_of(view, &timing)),
                        spec_key: SpecKey::of(view),
                        view: view.clone(),
                        fresh,
                    })
                })
                .collect::<Vec<_>>()
        });
        for job in jobs {
            budget -= if job.spec.is_some() { 2.0 } else { 1.0 };
            let previous = written.remove(&job.name);
            match write(&api, &nodes, &job, previous.as_ref(), &metrics).await {
                Ok(Outcome::Written(done)) => {
                    written.insert(job.name.clone(), done);
                }
                Ok(Outcome::Recreate) => {}
                Ok(Outcome::Forget) => {
                    fleet.with_router(|router| router.remove(&job.name));
                }
                Err(e) => {
                    tracing::warn!(backend = %job.name, error = %e, "writing the Backend failed; will retry");
                    if let Some(previous) = previous {
                        written.insert(job.name.clone(), previous);
                    }
                }
            }
        }
    }
}

/// What came of a write.
enum Outcome {
    Written(Written),
    /// The Backend is gone: write it whole next time.
    Recreate,
    /// Its node is gone: forget the backend.
    Forget,
}

/// Writes one Backend: its spec and owner when new, then its status.
async fn write(
    api: &Api<Backend>,
    nodes: &Api<Node>,
    job: &Job,
    previous: Option<&Written>,
    metrics: &Metrics,
) -> Result<Outcome, kube::Error> {
    let params = PatchParams::apply(labels::MANAGER).force();
    let mut generation = previous.and_then(|p| p.generation);
    let mut conditions_before = Vec::new();
    if let Some(spec) = &job.spec {
        let mut owners: Vec<OwnerReference> = Vec::new();
        if job.kind == ReportKind::Node {
            // Owned by its Node, so it goes when the node goes.
            let Some(node) = nodes.get_opt(&job.name).await? else {
                tracing::warn!(backend = %job.name, "no such node; forgetting its reports");
                return Ok(Outcome::Forget);
            };
            owners.push(OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: job.name.clone(),
                uid: node.meta().uid.clone().unwrap_or_default(),
                ..Default::default()
            });
        }
        let body = json!({
            "apiVersion": API_VERSION,
            "kind": "Backend",
            "metadata": { "name": job.name, "ownerReferences": owners, "labels": { "app.kubernetes.io/managed-by": labels::MANAGER } },
            "spec": spec,
        });
        let applied = api.patch(&job.name, &params, &Patch::Apply(body)).await?;
        metrics.backend_writes.inc();
        generation = applied.meta().generation;
        if previous.is_none() {
            // After a restart or failover, keep the conditions' transition times.
            conditions_before = applied.status.map(|s| s.conditions).unwrap_or_default();
        }
    }
    let conditions = previous.map(|p| p.conditions.clone()).unwrap_or(conditions_before);
    let status = status_of(&job.view, job.fresh, &conditions, generation);
    let body = json!({ "apiVersion": API_VERSION, "kind": "Backend", "status": status });
    match api.patch_status(&job.name, &params, &Patch::Apply(body)).await {
        Ok(_) => {}
        // An external backend's admin took its registration back: forget it
        // (its reports are refused from now on).
        Err(kube::Error::Api(e)) if e.code == 404 && job.kind == ReportKind::External => return Ok(Outcome::Forget),
        // Deleted by someone (or its node went): make it anew next time.
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(Outcome::Recreate),
        Err(e) => return Err(e),
    }
    metrics.backend_writes.inc();
    Ok(Outcome::Written(Written {
        summary: job.summary.clone(),
        spec: job.spec_key.clone(),
        at: Instant::now(),
        conditions: status.conditions,
        generation,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(cpu: f32) -> Summary {
        Summary { fresh: true, health: Health::Unknown, cpu, memory: 10.0, disk: 10.0, gpu: 0.0 }
    }

    #[test]
    fn only_news_is_written() {
        let now = Instant::now();
        let refresh = Duration::from_secs(60);
        assert_eq!(due(None, &summary(5.0), false, now, refresh), Some(Urgency::New));
        let last = (summary(5.0), now);
        assert_eq!(due(Some(&last), &summary(9.0), false, now, refresh), None);
        assert_eq!(due(Some(&last), &summary(15.0), false, now, refresh), Some(Urgency::Drift));
        let stale = Summary { fresh: false, ..summary(5.0) };
        assert_eq!(due(Some(&last), &stale, false, now, refresh), Some(Urgency::Condition));
        let later = now + refresh;
        assert_eq!(due(Some(&last), &summary(6.0), false, later, refresh), Some(Urgency::Refresh));
        // A stale backend is not refreshed again and again.
        let stale_last = (stale.clone(), now);
        assert_eq!(due(Some(&stale_last), &stale, false, later, refresh), None);
        assert_eq!(due(Some(&last), &summary(5.0), true, now, refresh), Some(Urgency::Spec));
        assert!(
            Urgency::New < Urgency::Condition && Urgency::Spec < Urgency::Drift && Urgency::Drift < Urgency::Refresh
        );
    }

    fn candidate(name: &str, urgency: Urgency, last_written: Option<Instant>) -> Candidate {
        Candidate { name: name.into(), urgency, last_written }
    }

    fn names(chosen: &[Candidate]) -> Vec<&str> {
        chosen.iter().map(|c| c.name.as_str()).collect()
    }

    #[test]
    fn the_most_urgent_and_longest_unwritten_go_first_within_the_budget() {
        let now = Instant::now();
        let early = Some(now);
        let late = Some(now + Duration::from_secs(1));
        let due = vec![
            candidate("refresh", Urgency::Refresh, early),
            candidate("drift-late", Urgency::Drift, late),
            candidate("drift-early", Urgency::Drift, early),
            candidate("condition", Urgency::Condition, late),
        ];
        assert_eq!(names(&schedule(due.clone(), 10.0)), ["condition", "drift-early", "drift-late", "refresh"]);
        assert_eq!(names(&schedule(due.clone(), 2.0)), ["condition", "drift-early"]);
        assert!(schedule(due, 0.5).is_empty());
    }

    #[test]
    fn a_new_backend_costs_two_writes_and_is_not_skipped_for_cheaper_ones() {
        let due = vec![candidate("new", Urgency::New, None), candidate("drift", Urgency::Drift, None)];
        assert_eq!(names(&schedule(due.clone(), 2.0)), ["new"]);
        // One write short for the new Backend: nothing goes, the budget saves up.
        assert!(schedule(due, 1.0).is_empty());
    }

    #[test]
    fn the_budget_refills_up_to_a_second_of_writes() {
        let tick = Duration::from_millis(250);
        assert_eq!(refill(0.0, 4, tick), 1.0);
        assert_eq!(refill(3.5, 4, tick), 4.0);
        // At least two, so a new Backend's two writes can go.
        assert_eq!(refill(1.9, 1, tick), 2.0);
    }
}
