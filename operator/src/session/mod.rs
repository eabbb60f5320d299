//! The TestSession controller: binds each session to exactly one warm pod,
//! rebinds it when its pod dies, and ends it when its TTL runs out.
//!
//! Binding takes two API writes. First the pod is claimed: its labels say
//! `assigned` and its annotation names the session's UID, written with the
//! pod's resourceVersion as a precondition. That claim is the durable record
//! of the binding. Then the session's status turns Ready. Every step is
//! idempotent: a pass that finds a pod already claimed for its session just
//! finishes the status. A claim refused with 409 or 404 is settled by reading
//! the pod from the API server, never by grabbing another pod blindly.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tidepool_crds::test_session::{Phase, TestSessionStatus};
use tidepool_crds::{TestSession, WarmPool};

use crate::conditions;
use crate::context::{Binding, Context};
use crate::error::{Error, Result};
use crate::labels;
use crate::placement::view::BackendView;
use crate::placement::{Candidate, Need, Pick, Request};
use crate::pool::{is_finished, is_ready, template_hash};
use tidepool_wire::report::{Coordinates, ReportKind};

/// How often a bound session's pass runs again, at the latest (its expiry
/// may come first).
const SETTLED_RECHECK: Duration = Duration::from_secs(15);

/// The Bound condition's reason while a session waits for a pod.
pub const POOL_EMPTY: &str = "PoolEmpty";
/// The Bound condition's reason while warm pods exist but no backend
/// holding one has room for the pool's tier.
pub const NO_BACKEND_FITS: &str = "NoBackendFits";

pub async fn reconcile(session: Arc<TestSession>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = session.namespace().ok_or(Error::Missing("TestSession", "namespace"))?;
    let uid = session.uid().ok_or(Error::Missing("TestSession", "uid"))?;
    if session.meta().deletion_timestamp.is_some() {
        // Its pod is deleted by the pool controller once the session is gone.
        return Ok(Action::await_change());
    }
    let now = Timestamp::now();
    let status = session.status.clone().unwrap_or_default();
    if matches!(status.phase, Phase::Completed | Phase::Expired | Phase::Failed) {
        return retire(&session, &ctx, &status, now).await;
    }
    let Some(pool) = ctx.pools.get(&kube::runtime::reflector::ObjectRef::new(&session.spec.pool).within(&namespace))
    else {
        return wait(&session, &ctx, status, "PoolNotFound", format!("WarmPool {} does not exist", session.spec.pool))
            .await;
    };
    let created = session.meta().creation_timestamp.as_ref().map_or(now, |t| t.0);
    let ttl = session.spec.ttl_seconds.unwrap_or(pool.spec.session_ttl_seconds);
    let expires = created + SignedDuration::from_secs(ttl);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);

    if status.phase != Phase::Ready && ctx.binding(&uid).is_none_or(|b| !b.ready) {
        ctx.binding_seen(&uid);
    }
    let claimed = claimed_pods(&ctx, &namespace, &uid);
    let (bound, cache_has_claim) = match bound_pod(&ctx, &pods, &claimed, &uid, status.pod.as_deref()).await? {
        Some((pod, cached)) => (Some(pod), cached),
        None => (None, false),
    };
    if status.results.as_ref().is_some_and(|r| r.is_final) {
        // The pod reported its last results: the session is done early and
        // its pod goes back to the pool's budget.
        if let Some(pod) = &bound {
            delete_pod(&pods, pod).await?;
        }
        ctx.forget(&uid);
        let mut next = status.clone();
        next.phase = Phase::Completed;
        let generation = session.meta().generation;
        let message = "the session's tests finished; the results are in status.results";
        conditions::set(&mut next.conditions, "Ready", false, "Completed", message, generation, now);
        write_status(&ctx, &session, &next).await?;
        crate::pool::publish(&ctx, session.as_ref(), EventType::Normal, "Completed", message).await;
        return Ok(Action::requeue(ctx.settings.result_retention));
    }
    if now >= expires {
        if let Some(pod) = &bound {
            delete_pod(&pods, pod).await?;
        }
        ctx.forget(&uid);
        let mut next = status.clone();
        next.phase = Phase::Expired;
        let generation = session.meta().generation;
        conditions::set(&mut next.conditions, "Ready", false, "Expired", "the session's TTL ran out", generation, now);
        write_status(&ctx, &session, &next).await?;
        return Ok(Action::requeue(ctx.settings.result_retention));
    }

    let pod = match bound {
        Some(pod) if !is_finished(&pod) && pod.meta().deletion_timestamp.is_none() => {
            if status.pod.as_deref() != Some(&pod.name_any()) {
                // Claimed by an earlier pass that stopped before the status write.
                tracing::info!(session = %session.name_any(), pod = %pod.name_any(), "adopting a pod claimed earlier");
            }
            pod
        }
        dead => {
            // A pod that died under a live session is replaced: the session heals.
            if let Some(pod) = &dead {
                delete_pod(&pods, pod).await?;
            }
            match claim(&ctx, &session, &pool, &pods).await? {
                Claim::Won(pod) => {
                    ctx.remember(&uid, Binding { pod: pod.name_any(), ready: false });
                    tracing::debug!(session = %session.name_any(), pod = %pod.name_any(), "claimed");
                    if let Some(delay) = ctx.settings.fault_claim_delay {
                        tokio::time::sleep(delay).await;
                    }
                    pod
                }
                Claim::NoneFree => {
                    let message = format!("WarmPool {} has no warm pod free; one is being made", pool.name_any());
                    return wait(&session, &ctx, status, POOL_EMPTY, message).await;
                }
                Claim::NoFit(message) => return wait(&session, &ctx, status, NO_BACKEND_FITS, message).await,
                Claim::Lost => return Ok(Action::requeue(Duration::from_millis(10))),
            }
        }
    };

    // A claim whose answer was lost (a timeout after the API server applied
    // it) can leave a second pod claimed for this session: let it go.
    // Scanned again, not reused from the start of the pass: the pod cache may
    // have caught up with the second claim by now, and nothing else would
    // trigger a pass for it once the session is settled.
    for extra in claimed_pods(&ctx, &namespace, &uid).iter().filter(|p| p.metadata.name != pod.metadata.name) {
        tracing::warn!(session = %session.name_any(), pod = %extra.name_any(), "deleting a second pod claimed for one session");
        delete_pod(&pods, extra).await?;
    }
    // A bound session is looked at again every SETTLED_RECHECK: the event of
    // a second claim can start its pass before the pod cache shows that
    // claim, and nothing else would start another.
    let until_expiry = expires.duration_since(now).unsigned_abs().min(SETTLED_RECHECK);
    let written = Binding { pod: pod.name_any(), ready: true };
    if status.phase == Phase::Ready && status.pod.as_deref() == Some(&pod.name_any()) {
        if cache_has_claim {
            // Both caches have caught up with this binding: no need to remember it.
            ctx.forget(&uid);
        }
        return Ok(Action::requeue(until_expiry));
    }
    if ctx.binding(&uid).as_ref() == Some(&written) {
        // This pass saw a session older than our own status write.
        return Ok(Action::requeue(until_expiry));
    }
    let rebound = status.pod.is_some();
    let previous = status.pod.clone();
    let next = ready_status(&session, &ctx, &pod, status, created, expires, now, rebound);
    write_status(&ctx, &session, &next).await?;
    if let Some(previous) = previous {
        let note = format!("pod {previous} went away; rebound to pod {}", pod.name_any());
        crate::pool::publish(&ctx, session.as_ref(), EventType::Normal, "Rebound", &note).await;
    }
    ctx.remember(&uid, written);
    if let Some(progress) = ctx.take_progress(&uid)
        && !rebound
    {
        ctx.metrics.session_ready.observe(progress.first_seen.elapsed().as_secs_f64());
        ctx.metrics.binding_writes.observe(f64::from(progress.writes));
    }
    Ok(Action::requeue(until_expiry))
}

pub fn error_policy(_session: Arc<TestSession>, error: &Error, _ctx: Arc<Context>) -> Action {
    if error.is_transient() {
        Action::requeue(Duration::from_millis(500))
    } else {
        Action::requeue(Duration::from_secs(60))
    }
}

/// The pod claimed for session `uid`: from the cache, or, while the cache
/// has not caught up with a claim this process made, from the API server.
/// The flag says whether the cache already shows the claim. With more than
/// one pod claimed, the one the session's status names wins, then the one
/// this process remembers binding.
async fn bound_pod(
    ctx: &Context,
    pods: &Api<Pod>,
    claimed: &[Arc<Pod>],
    uid: &str,
    in_status: Option<&str>,
) -> Result<Option<(Arc<Pod>, bool)>> {
    let remembered = ctx.binding(uid).map(|b| b.pod);
    let cached = claimed
        .iter()
        .find(|p| Some(p.name_any().as_str()) == in_status)
        .or_else(|| claimed.iter().find(|p| Some(p.name_any()) == remembered))
        .or_else(|| claimed.first())
        .cloned();
    if let Some(pod) = cached {
        return Ok(Some((pod, true)));
    }
    let Some(remembered) = remembered else { return Ok(None) };
    match pods.get_opt(&remembered).await? {
        Some(pod) if pod.annotations().get(labels::SESSION_UID).map(String::as_str) == Some(uid) => {
            Ok(Some((Arc::new(pod), false)))
        }
        _ => {
            ctx.forget(uid);
            Ok(None)
        }
    }
}

/// Live pods the cache shows claimed for session `uid`: looked up through
/// the pod index, and checked again on the cached pod itself.
fn claimed_pods(ctx: &Context, namespace: &str, uid: &str) -> Vec<Arc<Pod>> {
    let keys = ctx.with_pod_index(|index| index.pods_of(uid));
    keys.into_iter()
        .filter(|(ns, _)| ns == namespace)
        .filter_map(|(ns, name)| ctx.pods.get(&kube::runtime::reflector::ObjectRef::new(&name).within(&ns)))
        .filter(|p| {
            p.meta().deletion_timestamp.is_none()
                && p.annotations().get(labels::SESSION_UID).map(String::as_str) == Some(uid)
        })
        .collect()
}

enum Claim {
    Won(Arc<Pod>),
    NoneFree,
    /// Warm pods exist, but no backend holding one fits the tier now.
    NoFit(String),
    /// Another binding got the pod first; try again from fresh caches.
    Lost,
}

/// What resource-aware placement made of a session's warm pods.
enum Placed {
    /// The warm pod at this index is on the best backend; the pick holds a
    /// reservation there until reports show it (or it is released).
    On(usize, Pick),
    /// The pool's nodes have agents, but none fits the tier now.
    NoFit(String),
    /// No agent reports on time for any of these pods' nodes.
    NoAgents,
}

/// Asks the router for the best backend among the nodes holding warm pods,
/// reserving the pool's tier there. Pods on nodes without a reporting agent
/// are left out once any of the nodes has one.
fn place(ctx: &Context, session: &TestSession, pool: &WarmPool, choices: &[&Arc<Pod>]) -> Placed {
    if choices.is_empty() {
        return Placed::NoAgents;
    }
    let nodes: HashSet<&str> = choices.iter().filter_map(|p| node_of(p)).collect();
    let client = session.spec.client.as_ref().and_then(|c| match (c.latitude, c.longitude) {
        (Some(latitude), Some(longitude)) => Some(Coordinates { latitude, longitude }),
        _ => None,
    });
    let request = Request {
        need: Need::from(&pool.spec.tier),
        weights: &pool.spec.placement,
        client,
        sticky: session.spec.sticky_key.as_deref(),
        replaces_own: false,
    };
    let now = Instant::now();
    let picked = ctx.fleet.with_router(|router| {
        // Agents that all stopped reporting must not stop sessions: with no
        // fresh view, the fallback decides.
        let node_view = |name: &str| router.view(name).filter(|v| v.kind == ReportKind::Node);
        if !nodes.iter().any(|n| node_view(n).is_some_and(|v| router.is_fresh(v, now))) {
            return None;
        }
        let allowed = |v: &BackendView| v.kind == ReportKind::Node && nodes.contains(v.name.as_str());
        Some(router.route_within(&request, now, allowed))
    });
    match picked {
        None => Placed::NoAgents,
        Some(Ok(pick)) => {
            ctx.metrics.placements.with_label_values(&["session", "placed"]).inc();
            ctx.metrics.placement_view_age.observe(pick.view_age.as_secs_f64());
            match choices.iter().position(|p| node_of(p) == Some(pick.backend.as_str())) {
                Some(index) => Placed::On(index, pick),
                None => {
                    ctx.fleet.with_router(|router| router.release(&pick, request.need));
                    Placed::NoAgents
                }
            }
        }
        Some(Err(no_fit)) => {
            ctx.metrics.placements.with_label_values(&["session", "no_fit"]).inc();
            Placed::NoFit(format!("WarmPool {}: {no_fit}", pool.name_any()))
        }
    }
}

/// Each node's first free pod by name on the current template, or, when no
/// node has one, each node's first free outdated pod (outdated pods still
/// serve); in name order across nodes, as placement breaks ties by the first
/// offered. Scanning stops on a node at its first current pod.
fn first_free_per_node<'a, P>(
    nodes: impl Iterator<Item = (&'a str, impl Iterator<Item = &'a str>)>,
    free: impl Fn(&str) -> Option<P>,
    is_current: impl Fn(&P) -> bool,
) -> Vec<(String, P)> {
    let (mut current, mut outdated) = (Vec::new(), Vec::new());
    for (_node, names) in nodes {
        let mut first_outdated = None;
        for (name, pod) in names.filter_map(|name| free(name).map(|pod| (name.to_string(), pod))) {
            if is_current(&pod) {
                current.push((name, pod));
                break;
            }
            first_outdated.get_or_insert((name, pod));
        }
        outdated.extend(first_outdated);
    }
    let mut chosen = if current.is_empty() { outdated } else { current };
    chosen.sort_by(|a, b| a.0.cmp(&b.0));
    chosen
}

/// Chooses a warm pod through placement and claims it for the session.
async fn claim(ctx: &Context, session: &TestSession, pool: &WarmPool, pods: &Api<Pod>) -> Result<Claim> {
    let namespace = session.namespace().unwrap_or_default();
    let hash = template_hash(pool);
    // From the pod index: the pool's warm pods node by node, and its
    // sessions per node. Placement picks a node; within a node the first pod
    // by name goes. So each node offers only its first free pod on the current
    // template (or, failing that, its first outdated one): the same choice as
    // offering every warm pod, without reading them all on every claim.
    let pool_key = (namespace.clone(), pool.name_any());
    let free = |name: &str| -> Option<Arc<Pod>> {
        let pod = ctx.pods.get(&kube::runtime::reflector::ObjectRef::new(name).within(&namespace))?;
        let usable = crate::pool::owned_by(&pod, pool)
            && pod.labels().get(labels::STATE).map(String::as_str) == Some(labels::STATE_WARM)
            && is_ready(&pod)
            && !is_finished(&pod)
            && pod.meta().deletion_timestamp.is_none()
            && !ctx.is_reserved(&format!("{namespace}/{name}"));
        usable.then_some(pod)
    };
    let is_current = |pod: &Arc<Pod>| pod.labels().get(labels::TEMPLATE_HASH) == Some(&hash);
    let (choices, assigned) = ctx.with_pod_index(|index| {
        (first_free_per_node(index.warm_by_node(&pool_key), free, is_current), index.assigned_per_node(&pool_key))
    });
    let per_node: HashMap<&str, u32> = assigned.iter().map(|(node, n)| (node.as_str(), *n)).collect();
    let choices: Vec<&Arc<Pod>> = choices.iter().map(|(_, pod)| pod).collect();
    let (index, pick) = match place(ctx, session, pool, &choices) {
        Placed::On(index, pick) => (index, Some(pick)),
        Placed::NoFit(message) => return Ok(Claim::NoFit(message)),
        Placed::NoAgents => {
            let candidates: Vec<Candidate> = choices
                .iter()
                .map(|p| Candidate { pod: p.meta().name.as_deref().unwrap_or(""), node: node_of(p).unwrap_or("") })
                .collect();
            match ctx.placement.choose(&candidates, &per_node) {
                Some(index) => (index, None),
                None => return Ok(Claim::NoneFree),
            }
        }
    };
    let chosen = choices[index].clone();
    let key = format!("{namespace}/{}", chosen.name_any());
    let outcome = if ctx.reserve(&key) {
        let outcome = claim_pod(ctx, session, pods, &chosen).await;
        // A claimed pod stays reserved: the cache may still show it warm.
        if !matches!(outcome, Ok(Claim::Won(_))) {
            ctx.release(&key);
        }
        outcome
    } else {
        Ok(Claim::Lost)
    };
    // A pick whose claim did not win holds no session: give its room back.
    if let Some(pick) = pick
        && !matches!(outcome, Ok(Claim::Won(_)))
    {
        let need = Need::from(&pool.spec.tier);
        ctx.fleet.with_router(|router| router.release(&pick, need));
    }
    outcome
}

async fn claim_pod(ctx: &Context, session: &TestSession, pods: &Api<Pod>, pod: &Arc<Pod>) -> Result<Claim> {
    let uid = session.uid().unwrap_or_default();
    let name = pod.name_any();
    let patch = |resource_version: Option<String>| {
        serde_json::json!({
            "metadata": {
                "resourceVersion": resource_version,
                "labels": { labels::STATE: labels::STATE_ASSIGNED, labels::SESSION: session.name_any() },
                "annotations": { labels::SESSION_UID: uid },
            }
        })
    };
    ctx.count_write(&uid);
    match pods.patch(&name, &PatchParams::default(), &Patch::Merge(patch(pod.resource_version()))).await {
        Ok(claimed) => return Ok(Claim::Won(Arc::new(claimed))),
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Claim::Lost),
        Err(kube::Error::Api(s)) if s.code == 409 => ctx.metrics.binding_conflicts.inc(),
        Err(e) => return Err(e.into()),
    }
    // 409: the cache was behind. Read the pod and settle by what it says.
    let Some(fresh) = pods.get_opt(&name).await? else { return Ok(Claim::Lost) };
    let claimed_by = fresh.annotations().get(labels::SESSION_UID).cloned();
    if claimed_by.as_deref() == Some(uid.as_str()) {
        return Ok(Claim::Won(Arc::new(fresh)));
    }
    let still_warm = claimed_by.is_none()
        && fresh.labels().get(labels::STATE).map(String::as_str) == Some(labels::STATE_WARM)
        && fresh.meta().deletion_timestamp.is_none();
    if !still_warm {
        return Ok(Claim::Lost);
    }
    ctx.count_write(&uid);
    match pods.patch(&name, &PatchParams::default(), &Patch::Merge(patch(fresh.resource_version()))).await {
        Ok(claimed) => Ok(Claim::Won(Arc::new(claimed))),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {
            ctx.metrics.binding_conflicts.inc();
            Ok(Claim::Lost)
        }
        Err(e) => Err(e.into()),
    }
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

/// `http://<pod IP>:<port>`, the port being the first one the pod's first
/// container names, or the operator's default.
pub fn endpoint(pod: &Pod, default_port: u16) -> Option<String> {
    let ip = pod.status.as_ref()?.pod_ip.as_deref()?;
    let port = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.ports.as_ref())
        .and_then(|p| p.first())
        .map_or(i32::from(default_port), |p| p.container_port);
    Some(if ip.contains(':') { format!("http://[{ip}]:{port}") } else { format!("http://{ip}:{port}") })
}

#[allow(clippy::too_many_arguments)]
fn ready_status(
    session: &TestSession,
    ctx: &Context,
    pod: &Pod,
    mut status: TestSessionStatus,
    created: Timestamp,
    expires: Timestamp,
    now: Timestamp,
    rebound: bool,
) -> TestSessionStatus {
    let generation = session.meta().generation;
    status.phase = Phase::Ready;
    status.pod = Some(pod.name_any());
    status.node = node_of(pod).map(String::from);
    status.endpoint = endpoint(pod, ctx.settings.session_port);
    status.created_at = Some(Time(created));
    status.assigned_at = Some(Time(now));
    status.ready_at = Some(Time(now));
    status.expires_at = Some(Time(expires));
    status.observed_generation = generation;
    let reason = if rebound { "Rebound" } else { "Bound" };
    let message = format!("bound to pod {}", pod.name_any());
    conditions::set(&mut status.conditions, "Bound", true, reason, message, generation, now);
    conditions::set(&mut status.conditions, "Ready", true, "PodServing", "the client may connect", generation, now);
    status
}

/// Marks the session as waiting (once; later passes change nothing).
async fn wait(
    session: &TestSession,
    ctx: &Context,
    mut status: TestSessionStatus,
    reason: &str,
    message: String,
) -> Result<Action> {
    let already = status.phase == Phase::Pending
        && status.pod.is_none()
        && conditions::reason(&status.conditions, "Bound") == Some(reason);
    if !already {
        let generation = session.meta().generation;
        let now = Timestamp::now();
        status.phase = Phase::Pending;
        status.pod = None;
        status.node = None;
        status.endpoint = None;
        status.observed_generation = generation;
        status.created_at = session.meta().creation_timestamp.clone();
        conditions::set(&mut status.conditions, "Bound", false, reason, message, generation, now);
        conditions::set(&mut status.conditions, "Ready", false, reason, "waiting for a pod", generation, now);
        write_status(ctx, session, &status).await?;
    }
    // A pod turning warm wakes this session up sooner through the pod watch.
    Ok(Action::requeue(Duration::from_secs(5)))
}

/// A finished session keeps its results for the retention time, then goes.
async fn retire(session: &TestSession, ctx: &Context, status: &TestSessionStatus, now: Timestamp) -> Result<Action> {
    let ended = status.conditions.iter().find(|c| c.type_ == "Ready").map_or(now, |c| c.last_transition_time.0);
    let retention = SignedDuration::try_from(ctx.settings.result_retention).unwrap_or(SignedDuration::ZERO);
    if now >= ended + retention {
        let api: Api<TestSession> = Api::namespaced(ctx.client.clone(), &session.namespace().unwrap_or_default());
        let params = DeleteParams {
            preconditions: Some(Preconditions { uid: session.uid(), resource_version: None }),
            ..DeleteParams::default()
        };
        match api.delete(&session.name_any(), &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(Action::await_change());
    }
    Ok(Action::requeue((ended + retention).duration_since(now).unsigned_abs()))
}

async fn delete_pod(pods: &Api<Pod>, pod: &Pod) -> Result<()> {
    let params = DeleteParams {
        preconditions: Some(Preconditions { uid: pod.uid(), resource_version: None }),
        ..DeleteParams::default()
    };
    match pods.delete(&pod.name_any(), &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn write_status(ctx: &Context, session: &TestSession, status: &TestSessionStatus) -> Result<()> {
    let api: Api<TestSession> = Api::namespaced(ctx.client.clone(), &session.namespace().unwrap_or_default());
    let patch = serde_json::json!({ "status": status_patch(status)? });
    ctx.count_write(&session.uid().unwrap_or_default());
    // A merge patch, not a server-side apply: this write is on every
    // session's critical path, and an apply costs the API server a typed
    // merge and field-set bookkeeping on top (docs/benchmarks.md).
    let params = PatchParams { field_manager: Some(labels::MANAGER.into()), ..PatchParams::default() };
    api.patch_status(&session.name_any(), &params, &Patch::Merge(&patch)).await?;
    Ok(())
}

/// The status fields the controller owns. A merge patch keeps what it does
/// not name, so each of these it leaves unset is sent as null.
const OWNED_STATUS_FIELDS: [&str; 11] = [
    "phase",
    "pod",
    "node",
    "backend",
    "endpoint",
    "createdAt",
    "assignedAt",
    "readyAt",
    "expiresAt",
    "conditions",
    "observedGeneration",
];

/// The merge patch for `status`. `results` belongs to the results route
/// alone: never named here, a write from a stale cache cannot drop it.
fn status_patch(status: &TestSessionStatus) -> Result<serde_json::Value> {
    let mut patch = serde_json::to_value(TestSessionStatus { results: None, ..status.clone() })
        .map_err(|e| Error::Kube(kube::Error::SerdeError(e)))?;
    if let Some(fields) = patch.as_object_mut() {
        for field in OWNED_STATUS_FIELDS {
            fields.entry(field).or_insert(serde_json::Value::Null);
        }
    }
    Ok(patch)
}

/// The sessions a pod event concerns: the one it is bound to, or, when it is
/// a ready warm pod, the longest-waiting session of its pool. One pod wakes
/// one waiter, so a busy pool is not woken in a herd.
pub fn sessions_for_pod(
    pod: &Pod,
    sessions: &kube::runtime::reflector::Store<TestSession>,
) -> Vec<kube::runtime::reflector::ObjectRef<TestSession>> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    if let Some(session) = pod.labels().get(labels::SESSION) {
        return vec![kube::runtime::reflector::ObjectRef::new(session).within(namespace)];
    }
    let Some(pool) = pod.labels().get(labels::POOL) else { return vec![] };
    if !is_ready(pod) {
        return vec![];
    }
    let waiting = |s: &TestSession| {
        s.metadata.namespace.as_deref() == Some(namespace)
            && &s.spec.pool == pool
            && s.status.as_ref().is_some_and(|st| st.pod.is_none() && st.phase == Phase::Pending)
    };
    // Almost always nobody waits: find that out without copying the cache.
    if sessions.find(|s| waiting(s)).is_none() {
        return vec![];
    }
    sessions
        .state()
        .iter()
        .filter(|s| waiting(s))
        .min_by_key(|s| s.meta().creation_timestamp.as_ref().map(|t| t.0))
        .map(|s| kube::runtime::reflector::ObjectRef::from(s.as_ref()))
        .into_iter()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// Every status field but `results` is named in each write, so a field
    /// the controller unsets is removed, whatever its cache showed.
    #[test]
    fn a_status_write_names_every_owned_field_and_never_results() {
        let mut full = serde_json::json!({
            "phase": "Ready", "pod": "p", "node": "n", "backend": "b", "endpoint": "http://e",
            "createdAt": "2026-11-22T10:00:00Z", "assignedAt": "2026-11-22T10:00:00Z",
            "readyAt": "2026-11-22T10:00:00Z", "expiresAt": "2026-11-22T10:05:00Z",
            "results": { "final": true },
            "conditions": [{ "type": "Ready", "status": "True", "reason": "Bound", "message": "m",
                "lastTransitionTime": "2026-11-22T10:00:00Z" }],
            "observedGeneration": 1,
        });
        // The fixture holds every status field the CRD has.
        let crd = <TestSession as kube::CustomResourceExt>::crd();
        let schema = crd.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).unwrap();
        let status_schema = &schema.properties.as_ref().unwrap()["status"];
        let in_crd: BTreeSet<&str> = status_schema.properties.as_ref().unwrap().keys().map(String::as_str).collect();
        let in_fixture: BTreeSet<&str> = full.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(in_fixture, in_crd);
        // A field added to the CRD must be added to the owned list too.
        let mut named: BTreeSet<&str> = OWNED_STATUS_FIELDS.into_iter().collect();
        named.insert("results");
        assert_eq!(named, in_crd);
        let status: TestSessionStatus = serde_json::from_value(full.clone()).unwrap();
        assert_eq!(serde_json::to_value(&status).unwrap(), full);

        let written = status_patch(&status).unwrap();
        full.as_object_mut().unwrap().remove("results");
        assert_eq!(written, full);
        let unset = status_patch(&TestSessionStatus::default()).unwrap();
        let unset = unset.as_object().unwrap();
        assert_eq!(unset.len(), OWNED_STATUS_FIELDS.len());
        assert!(unset.iter().all(|(k, v)| k == "phase" || v.is_null()), "{unset:?}");
    }

    /// Offering each node's first free pod picks what offering every warm pod
    /// did: the first free pod overall, and the first free pod on each node.
    #[test]
    fn one_pod_per_node_offers_what_all_the_warm_pods_did() {
        let mut seed = 7u64;
        let mut next = move |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for _ in 0..500 {
            // node -> pod name -> (free, current)
            let mut nodes: BTreeMap<String, BTreeMap<String, (bool, bool)>> = BTreeMap::new();
            for i in 0..next(12) {
                let node = format!("n{}", next(3));
                let pod = format!("p{:02}", next(40) * 10 + i);
                nodes.entry(node).or_default().insert(pod, (next(4) > 0, next(3) > 0));
            }
            let lookup = |name: &str| {
                nodes.values().find_map(|pods| pods.get(name)).filter(|(free, _)| *free).map(|(_, current)| *current)
            };
            let per_node = nodes.iter().map(|(node, pods)| (node.as_str(), pods.keys().map(String::as_str)));
            let offered = first_free_per_node(per_node, lookup, |current| *current);

            // Every free warm pod, in name order, as claims used to offer them.
            let all: BTreeMap<&str, (&str, bool)> = nodes
                .iter()
                .flat_map(|(node, pods)| pods.iter().map(move |(pod, state)| (pod.as_str(), (node.as_str(), *state))))
                .filter(|(_, (_, (free, _)))| *free)
                .map(|(pod, (node, (_, current)))| (pod, (node, current)))
                .collect();
            let any_current = all.values().any(|(_, current)| *current);
            let old: Vec<(&str, &str)> = all
                .iter()
                .filter(|(_, (_, current))| *current == any_current)
                .map(|(pod, (node, _))| (*pod, *node))
                .collect();
            let node_of = |pod: &str| all[pod].0;
            assert_eq!(offered.first().map(|(pod, _)| pod.as_str()), old.first().map(|(pod, _)| *pod));
            for node in nodes.keys() {
                let first_old = old.iter().find(|(_, n)| n == node).map(|(pod, _)| *pod);
                let first_new = offered.iter().map(|(pod, _)| pod.as_str()).find(|pod| node_of(pod) == node);
                assert_eq!(first_new, first_old, "{nodes:?}");
            }
        }
    }
}
