//! The WarmPool controller: keeps `size` warm pods, refills after every
//! assignment, rolls unassigned pods onto a new template, and cleans up pods
//! whose session is gone. Each pass: read (caches), plan (pure), act (API),
//! report (status).

pub mod nodes;
pub mod plan;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join_all;
use k8s_openapi::api::core::v1::{
    EnvVar, EnvVarSource, NodeAffinity, NodeSelectorRequirement, NodeSelectorTerm, ObjectFieldSelector, Pod, PodSpec,
    PreferredSchedulingTerm,
};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tidepool_crds::warm_pool::{NodeAssignment, WarmPoolStatus};
use tidepool_crds::{TestSession, WarmPool};
use tidepool_wire::report::ReportKind;

use crate::conditions;
use crate::context::{CACHE_LAG_LIMIT, Context};
use crate::error::{Error, Result};
use crate::labels;
use crate::placement::{Need, Pick, Request};
use plan::{DeleteReason, PodView, Target};

/// A stable hash of a pod template: FNV-1a over its JSON, which serialises
/// fields in a fixed order.
pub fn template_hash(pool: &WarmPool) -> String {
    let json = serde_json::to_vec(&pool.spec.template).unwrap_or_default();
    let hash = json.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016x}")
}

/// Whether a pod is Ready by its conditions.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether a pod has stopped for good.
pub fn is_finished(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Failed" | "Succeeded"))
}

/// Whether `pod` is owned by this very pool (by UID), not by an older pool
/// of the same name.
pub fn owned_by(pod: &Pod, pool: &WarmPool) -> bool {
    let uid = pool.metadata.uid.as_deref();
    pod.owner_references().iter().any(|o| Some(o.uid.as_str()) == uid)
}

/// Cached pods of this very pool (by UID), by name.
fn cached_pods(ctx: &Context, pool: &WarmPool, namespace: &str, names: &[String]) -> Vec<Arc<Pod>> {
    names
        .iter()
        .filter_map(|name| ctx.pods.get(&ObjectRef::new(name).within(namespace)))
        .filter(|p| owned_by(p, pool))
        .collect()
}

pub async fn reconcile(pool: Arc<WarmPool>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = pool.namespace().ok_or(Error::Missing("WarmPool", "namespace"))?;
    let uid = pool.uid().ok_or(Error::Missing("WarmPool", "uid"))?;
    let name = pool.name_any();
    if pool.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    // Triggers that arrive within the interval are served by one pass at its end.
    if let Some(wait) = ctx.pool_pass_wait(&uid) {
        return Ok(Action::requeue(wait));
    }
    let key = ctx.keys.ensure(&ctx.client, &pool).await?;
    let hash = template_hash(&pool);
    // The pods no session holds, and a count of those sessions hold: a pass
    // reads the pool's warm pods, not the thousands its sessions may hold.
    let (unassigned, assigned) = ctx.with_pod_index(|index| index.owned(&uid));
    let pods = cached_pods(&ctx, &pool, &namespace, &unassigned);
    let in_flight = in_flight(&ctx, &uid, &namespace);
    let waiting = waiting_sessions(&ctx, &namespace, &name);
    let views: Vec<PodView> = pods.iter().map(|p| view(p, &hash)).collect();
    let target = Target {
        size: u32::try_from(pool.spec.size).unwrap_or(0),
        max_size: pool.spec.max_size.map(|m| u32::try_from(m).unwrap_or(0)),
        waiting_sessions: waiting,
        batch: ctx.settings.create_batch,
        in_flight,
        assigned,
    };
    let plan = plan::plan(&views, target);
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);

    // Create, all of this pass's batch at once.
    let template = pod_for(&pool, &hash, &key.public().to_base64(), ctx.settings.results_url.as_deref())?;
    let post = PostParams::default();
    let mut pinned = place_on_demand(&ctx, &pool, plan.create.min(waiting));
    let (assigned_nodes, placement_error) = match pool.spec.node_assignment {
        NodeAssignment::Scheduler => (None, None),
        NodeAssignment::Operator if plan.create == 0 => (Some(Vec::new()), None),
        NodeAssignment::Operator => match assign_nodes(&ctx, &pool, &template, &mut pinned, plan.create) {
            Ok(nodes) if (nodes.len() as u32) < plan.create => {
                let short = format!(
                    "the nodes that may take the pool's pods have no pod slots left ({} of {} placed)",
                    nodes.len(),
                    plan.create
                );
                (Some(nodes), Some(short))
            }
            Ok(nodes) => (Some(nodes), None),
            Err(why) => (Some(Vec::new()), Some(why)),
        },
    };
    let creating = assigned_nodes.as_ref().map_or(plan.create as usize, Vec::len);
    let created = join_all((0..creating).map(|i| {
        let mut pod = match (&assigned_nodes, pinned.get(i)) {
            (None, Some(pick)) => pin(&template, &pick.backend),
            _ => template.clone(),
        };
        if let (Some(nodes), Some(spec)) = (&assigned_nodes, pod.spec.as_mut()) {
            spec.node_name = nodes.get(i).cloned();
        }
        let pods_api = &pods_api;
        let post = &post;
        async move { pods_api.create(post, &pod).await }
    }))
    .await;
    let mut create_error = None;
    for (i, result) in created.into_iter().enumerate() {
        match result {
            Ok(pod) => expect(&ctx, &uid, pod.name_any()),
            Err(e) => {
                create_error = Some(e.to_string());
                // No pod, so no session will use the room it reserved.
                if let Some(pick) = pinned.get(i) {
                    ctx.fleet.with_router(|router| router.release(pick, Need::from(&pool.spec.tier)));
                }
            }
        }
    }
    // Picks beyond the pods made hold no pod either.
    for pick in pinned.iter().skip(creating) {
        ctx.fleet.with_router(|router| router.release(pick, Need::from(&pool.spec.tier)));
    }

    // Delete what the plan says, and assigned pods whose session is gone.
    let mut doomed: Vec<(String, Option<String>, &'static str)> = plan
        .delete
        .iter()
        .map(|(n, why)| {
            let uid = pods.iter().find(|p| &p.name_any() == n).and_then(|p| p.uid());
            let reason = match why {
                DeleteReason::Finished => "Finished",
                DeleteReason::Outdated => "Outdated",
                DeleteReason::ScaleDown => "ScaleDown",
            };
            (n.clone(), uid, reason)
        })
        .collect();
    // Held pods are looked over less often than passes run: there can be
    // thousands, and a gone session's pod waiting a second costs little.
    let sweep_wait = ctx.orphan_sweep_wait(&uid);
    if sweep_wait.is_none() {
        let held = cached_pods(&ctx, &pool, &namespace, &ctx.with_pod_index(|index| index.owned_assigned(&uid)));
        for orphan in orphans(&ctx, &namespace, &held).await? {
            doomed.push((orphan.name_any(), orphan.uid(), "SessionGone"));
        }
    }
    let deletions = doomed.iter().map(|(pod, pod_uid, _)| {
        let params = DeleteParams {
            preconditions: Some(Preconditions { uid: pod_uid.clone(), resource_version: None }),
            ..DeleteParams::default()
        };
        let api = pods_api.clone();
        async move { api.delete(pod, &params).await }
    });
    for result in join_all(deletions).await {
        match result {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if plan.rolling && plan.delete.iter().any(|(_, why)| *why == DeleteReason::Outdated) {
        publish(
            &ctx,
            pool.as_ref(),
            EventType::Normal,
            "RollingTemplate",
            "Replacing warm pods made from an older template",
        )
        .await;
    }
    if let Some(message) = &create_error {
        publish(&ctx, pool.as_ref(), EventType::Warning, "CreateFailed", message).await;
    }
    if let Some(message) = &placement_error {
        publish(&ctx, pool.as_ref(), EventType::Warning, NO_NODE_FITS, message).await;
    }
    let problem = match (&create_error, &placement_error) {
        (Some(message), _) => Some(("CreateFailed", message.as_str())),
        (None, Some(message)) => Some((NO_NODE_FITS, message.as_str())),
        (None, None) => None,
    };
    let failed = plan.delete.iter().filter(|(_, why)| *why == DeleteReason::Finished).count();
    if failed > 0 {
        let note = format!("replacing {failed} pods that failed or exited");
        publish(&ctx, pool.as_ref(), EventType::Warning, "PodsFailing", &note).await;
    }

    let deferred = !update_status(&ctx, &pool, &plan, problem).await?;
    let busy = plan.create > 0 || !doomed.is_empty() || in_flight > 0 || problem.is_some() || deferred;
    let next = if busy { Duration::from_secs(2) } else { Duration::from_secs(300) };
    // A skipped sweep may be the one a deleted session's pod is waiting for.
    Ok(Action::requeue(sweep_wait.map_or(next, |wait| wait.min(next))))
}

pub fn error_policy(_pool: Arc<WarmPool>, error: &Error, _ctx: Arc<Context>) -> Action {
    if error.is_transient() {
        Action::requeue(Duration::from_secs(1))
    } else {
        Action::requeue(Duration::from_secs(60))
    }
}

fn view(pod: &Pod, hash: &str) -> PodView {
    PodView {
        name: pod.name_any(),
        assigned: pod.labels().get(labels::STATE).map(String::as_str) == Some(labels::STATE_ASSIGNED),
        ready: is_ready(pod),
        terminating: pod.meta().deletion_timestamp.is_some(),
        finished: is_finished(pod),
        current: pod.labels().get(labels::TEMPLATE_HASH).map(String::as_str) == Some(hash),
        created: pod.meta().creation_timestamp.as_ref().map_or(0, |t| t.0.as_second()),
    }
}

/// Pods created but not in the cache yet. Forgets those the cache now has,
/// and those it never showed in time (deleted before it saw them), so a lost
/// pod cannot hold the pool below its size.
fn in_flight(ctx: &Context, pool_uid: &str, namespace: &str) -> u32 {
    let Ok(mut expected) = ctx.expected.lock() else { return 0 };
    let Some(names) = expected.get_mut(pool_uid) else { return 0 };
    let cached = |name: &str| ctx.pods.get(&ObjectRef::new(name).within(namespace)).is_some();
    still_in_flight(names, cached, std::time::Instant::now())
}

/// Keeps the expected pods the cache has not shown, up to the lag limit.
fn still_in_flight(
    expected: &mut std::collections::HashMap<String, std::time::Instant>,
    cached: impl Fn(&str) -> bool,
    now: std::time::Instant,
) -> u32 {
    expected.retain(|name, at| !cached(name) && now.duration_since(*at) < CACHE_LAG_LIMIT);
    expected.len() as u32
}

fn expect(ctx: &Context, pool_uid: &str, pod: String) {
    if let Ok(mut expected) = ctx.expected.lock() {
        expected.entry(pool_uid.to_string()).or_default().insert(pod, std::time::Instant::now());
    }
}

/// Picks for on-demand pods (made for waiting sessions): the router's best
/// node backends, each reserving the pool's tier. Empty when no agent
/// reports; then the scheduler alone decides.
fn place_on_demand(ctx: &Context, pool: &WarmPool, count: u32) -> Vec<Pick> {
    let request = Request {
        need: Need::from(&pool.spec.tier),
        weights: &pool.spec.placement,
        client: None,
        sticky: None,
        replaces_own: false,
    };
    let now = Instant::now();
    ctx.fleet.with_router(|router| {
        (0..count).map_while(|_| router.route_within(&request, now, |v| v.kind == ReportKind::Node).ok()).collect()
    })
}

/// The Degraded reason while the operator finds no node for a pool's pods.
pub const NO_NODE_FITS: &str = "NoNodeFits";

/// Nodes for `count` new pods of a pool the operator places itself. Pods the
/// router picked a backend for (on-demand pods) go there when that node may
/// take them; the rest spread over the nodes that may. The picks not used
/// give their room back, and `pinned` keeps the used ones, in the order of
/// the nodes returned.
fn assign_nodes(
    ctx: &Context,
    pool: &WarmPool,
    template: &Pod,
    pinned: &mut Vec<Pick>,
    count: u32,
) -> std::result::Result<Vec<String>, String> {
    let pool_key = (pool.namespace().unwrap_or_default(), pool.name_any());
    let (per_pool, known) = ctx.with_pod_index(|index| index.pods_per_node(&pool_key));
    let spec = template.spec.clone().unwrap_or_default();
    let nodes = ctx.nodes.state();
    let release = |picks: &[Pick]| {
        let need = Need::from(&pool.spec.tier);
        ctx.fleet.with_router(|router| picks.iter().for_each(|pick| router.release(pick, need)));
    };
    let mut rooms = match nodes::rooms(nodes.iter().map(AsRef::as_ref), &spec, &per_pool, &known) {
        Ok(rooms) => rooms,
        Err(why) => {
            release(&std::mem::take(pinned));
            return Err(why);
        }
    };
    let mut picks = Vec::with_capacity(count as usize);
    let mut unused = Vec::new();
    for pick in std::mem::take(pinned) {
        let room = rooms.iter_mut().find(|r| r.node == pick.backend && r.free_slots != Some(0));
        match room {
            Some(room) if picks.len() < count as usize => {
                room.pool_pods += 1;
                room.free_slots = room.free_slots.map(|f| f - 1);
                picks.push(room.node.clone());
                pinned.push(pick);
            }
            _ => unused.push(pick),
        }
    }
    release(&unused);
    let rest = count - picks.len() as u32;
    picks.extend(nodes::assign(rooms, rest));
    Ok(picks)
}

/// The pod, steered to `node`. The affinity is preferred, not required, and
/// added to the template's own: the template's node rules and taints still
/// apply, and a node that cannot take the pod never leaves it pending.
fn pin(template: &Pod, node: &str) -> Pod {
    let mut pod = template.clone();
    if let Some(spec) = pod.spec.as_mut() {
        let term = NodeSelectorTerm {
            match_fields: Some(vec![NodeSelectorRequirement {
                key: "metadata.name".into(),
                operator: "In".into(),
                values: Some(vec![node.to_string()]),
            }]),
            ..Default::default()
        };
        let affinity = spec.affinity.get_or_insert_with(Default::default);
        let node_affinity = affinity.node_affinity.get_or_insert_with(NodeAffinity::default);
        let preferred = node_affinity.preferred_during_scheduling_ignored_during_execution.get_or_insert_with(Vec::new);
        preferred.push(PreferredSchedulingTerm { weight: 100, preference: term });
    }
    pod
}

/// Sessions of this pool that found no warm pod: each is owed an on-demand pod.
fn waiting_sessions(ctx: &Context, namespace: &str, pool: &str) -> u32 {
    ctx.sessions
        .state()
        .iter()
        .filter(|s| s.metadata.namespace.as_deref() == Some(namespace) && s.spec.pool == pool)
        .filter(|s| s.meta().deletion_timestamp.is_none())
        .filter(|s| {
            s.status.as_ref().is_some_and(|st| {
                let reason = conditions::reason(&st.conditions, "Bound");
                st.pod.is_none()
                    && (reason == Some(crate::session::POOL_EMPTY) || reason == Some(crate::session::NO_BACKEND_FITS))
            })
        })
        .count() as u32
}

/// Assigned pods whose session no longer exists. The session cache can lag a
/// new session by a moment, so absence there is confirmed with the API server.
async fn orphans(ctx: &Context, namespace: &str, pods: &[Arc<Pod>]) -> Result<Vec<Arc<Pod>>> {
    let sessions: Api<TestSession> = Api::namespaced(ctx.client.clone(), namespace);
    let mut gone = Vec::new();
    for pod in pods {
        if pod.meta().deletion_timestamp.is_some() {
            continue;
        }
        let Some(session_uid) = pod.annotations().get(labels::SESSION_UID) else { continue };
        let session_name = pod.labels().get(labels::SESSION).cloned().unwrap_or_default();
        let cached = ctx.sessions.get(&ObjectRef::new(&session_name).within(namespace));
        if cached.is_some_and(|s| s.metadata.uid.as_deref() == Some(session_uid.as_str())) {
            continue;
        }
        let live = sessions.get_opt(&session_name).await?;
        if live.and_then(|s| s.uid()).as_deref() != Some(session_uid.as_str()) {
            gone.push(pod.clone());
        }
    }
    Ok(gone)
}

/// The pod the pool creates: its template, labelled and owned by the pool,
/// told its pool, its name, the pool's public key and where to post results.
fn pod_for(pool: &WarmPool, hash: &str, public_key: &str, results_url: Option<&str>) -> Result<Pod> {
    let template = &pool.spec.template;
    let mut metadata: ObjectMeta = template.metadata.clone().unwrap_or_default();
    metadata.name = None;
    metadata.generate_name = Some(format!("{}-", pool.name_any()));
    metadata.namespace = pool.namespace();
    let labels = metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(labels::POOL.into(), pool.name_any());
    labels.insert(labels::STATE.into(), labels::STATE_WARM.into());
    labels.insert(labels::TEMPLATE_HASH.into(), hash.into());
    metadata.owner_references = pool.controller_owner_ref(&()).map(|r| vec![r]);
    let mut spec: PodSpec = template.spec.clone().ok_or_else(|| Error::Invalid {
        kind: "WarmPool",
        name: pool.name_any(),
        reason: "spec.template.spec is missing".into(),
    })?;
    // A session pod is not restarted in place: a failed one is replaced.
    spec.restart_policy.get_or_insert_with(|| "Never".into());
    // A session pod serves users and never calls the Kubernetes API, so it
    // gets no API token unless the template asks for one. This also keeps the
    // pod small: every copy of it is written, watched and decoded many times.
    spec.automount_service_account_token.get_or_insert(false);
    let field = |path: &str| EnvVarSource {
        field_ref: Some(ObjectFieldSelector { field_path: path.into(), ..Default::default() }),
        ..Default::default()
    };
    for container in &mut spec.containers {
        let env = container.env.get_or_insert_with(Vec::new);
        env.retain(|e| !e.name.starts_with("TIDEPOOL_"));
        env.push(EnvVar { name: "TIDEPOOL_POOL".into(), value: Some(pool.name_any()), ..Default::default() });
        env.push(EnvVar {
            name: "TIDEPOOL_POOL_PUBLIC_KEY".into(),
            value: Some(public_key.into()),
            ..Default::default()
        });
        env.push(EnvVar {
            name: "TIDEPOOL_POD_NAME".into(),
            value_from: Some(field("metadata.name")),
            ..Default::default()
        });
        env.push(EnvVar {
            name: "TIDEPOOL_POD_NAMESPACE".into(),
            value_from: Some(field("metadata.namespace")),
            ..Default::default()
        });
        if let Some(url) = results_url {
            env.push(EnvVar { name: "TIDEPOOL_OPERATOR_URL".into(), value: Some(url.into()), ..Default::default() });
        }
    }
    Ok(Pod { metadata, spec: Some(spec), status: None })
}

/// Writes the pool's status. Under load the counts change all the time, so a
/// change of counts alone is written at most once a second; a change of any
/// condition is written at once. Returns false when a write was put off.
async fn update_status(
    ctx: &Context,
    pool: &WarmPool,
    plan: &plan::Plan,
    problem: Option<(&'static str, &str)>,
) -> Result<bool> {
    let now = Timestamp::now();
    let generation = pool.meta().generation;
    let size = u32::try_from(pool.spec.size).unwrap_or(0);
    let old = pool.status.clone().unwrap_or_default();
    let mut conditions = old.conditions.clone();
    let counts = plan.counts;
    let filled = counts.warm >= size;
    conditions::set(
        &mut conditions,
        "Ready",
        filled,
        if filled { "Filled" } else { "Filling" },
        format!("{}/{} warm", counts.warm, size),
        generation,
        now,
    );
    let progressing = plan.create > 0 || !plan.delete.is_empty() || plan.rolling || counts.pending > 0;
    let (reason, message) = if plan.rolling {
        ("RollingTemplate", "replacing warm pods made from an older template".to_string())
    } else if progressing {
        ("Scaling", format!("{} pending, creating {}", counts.pending, plan.create))
    } else {
        ("Stable", "nothing to do".to_string())
    };
    conditions::set(&mut conditions, "Progressing", progressing, reason, message, generation, now);
    let failed = plan.delete.iter().filter(|(_, why)| *why == DeleteReason::Finished).count();
    let (degraded, reason, message) = match (problem, failed, plan.capped) {
        (Some((reason, message)), _, _) => (true, reason, message.to_string()),
        (None, 1.., _) => (true, "PodsFailing", format!("{failed} pods failed or exited and are being replaced")),
        (None, 0, true) => (true, "MaxSizeReached", format!("maxSize {} reached", pool.spec.max_size.unwrap_or(0))),
        (None, 0, false) => (false, "Healthy", String::new()),
    };
    conditions::set(&mut conditions, "Degraded", degraded, reason, message, generation, now);

    let status = WarmPoolStatus {
        replicas: counts.replicas as i32,
        warm: counts.warm as i32,
        assigned: counts.assigned as i32,
        pending: counts.pending as i32,
        selector: Some(format!("{}={}", labels::POOL, pool.name_any())),
        conditions,
        observed_generation: generation,
    };
    let namespace = pool.namespace().unwrap_or_default();
    for (state, value) in [("warm", counts.warm), ("assigned", counts.assigned), ("pending", counts.pending)] {
        ctx.metrics.pool_pods.with_label_values(&[namespace.as_str(), &pool.name_any(), state]).set(i64::from(value));
    }
    if old == status {
        return Ok(true);
    }
    let uid = pool.uid().unwrap_or_default();
    let conditions_changed = old
        .conditions
        .iter()
        .map(|c| (&c.type_, &c.status))
        .ne(status.conditions.iter().map(|c| (&c.type_, &c.status)));
    let recently = ctx.status_written.lock().ok().and_then(|w| w.get(&uid).map(|at| at.elapsed() < STATUS_INTERVAL));
    if recently == Some(true) && !conditions_changed && old.observed_generation == status.observed_generation {
        return Ok(false);
    }
    let api: Api<WarmPool> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = serde_json::json!({
        "apiVersion": "tidepool.dev/v1alpha1",
        "kind": "WarmPool",
        "status": status,
    });
    api.patch_status(&pool.name_any(), &PatchParams::apply(labels::MANAGER).force(), &Patch::Apply(&patch)).await?;
    if let Ok(mut written) = ctx.status_written.lock() {
        written.insert(uid, std::time::Instant::now());
    }
    Ok(true)
}

/// The least time between two status writes that only change counts.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Publishes a Kubernetes Event about `object`; a failure is only logged.
pub async fn publish<K>(ctx: &Context, object: &K, type_: EventType, reason: &str, note: &str)
where
    K: Resource<DynamicType = ()>,
{
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(reason, error = %e, "could not publish an event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Instant;

    #[test]
    fn a_pod_counts_as_in_flight_until_seen_or_too_late() {
        let start = Instant::now();
        let mut expected = HashMap::from([("seen".to_string(), start), ("lost".to_string(), start)]);
        let cached = |name: &str| name == "seen";
        assert_eq!(still_in_flight(&mut expected, cached, start), 1);
        // "lost" was deleted before the cache saw it: it stops holding the pool back.
        assert_eq!(still_in_flight(&mut expected, cached, start + CACHE_LAG_LIMIT), 0);
    }

    #[test]
    fn pinning_adds_a_preference_and_keeps_the_templates_rules() {
        let template: Pod = serde_json::from_value(serde_json::json!({
            "spec": {
                "containers": [{ "name": "s", "image": "i" }],
                "affinity": { "nodeAffinity": { "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{ "matchExpressions": [{ "key": "gpu", "operator": "In", "values": ["true"] }] }]
                } } }
            }
        }))
        .unwrap();
        let pinned = pin(&template, "node-7");
        let affinity = pinned.spec.unwrap().affinity.unwrap().node_affinity.unwrap();
        assert!(affinity.required_during_scheduling_ignored_during_execution.is_some());
        let preferred = affinity.preferred_during_scheduling_ignored_during_execution.unwrap();
        assert_eq!(preferred.len(), 1);
        let field = &preferred[0].preference.match_fields.as_ref().unwrap()[0];
        assert_eq!((field.key.as_str(), field.values.as_deref()), ("metadata.name", Some(&["node-7".to_string()][..])));
    }

    fn pool_with(template_spec: serde_json::Value) -> WarmPool {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "tidepool.dev/v1alpha1", "kind": "WarmPool",
            "metadata": { "name": "edge", "namespace": "ns", "uid": "u1" },
            "spec": { "size": 1, "tier": { "vcpu": 1, "memoryMiB": 64 }, "template": { "spec": template_spec } }
        }))
        .unwrap()
    }

    #[test]
    fn a_pod_gets_no_api_token_unless_its_template_asks() {
        let containers = serde_json::json!([{ "name": "s", "image": "i" }]);
        let pod = pod_for(&pool_with(serde_json::json!({ "containers": containers })), "h", "key", None).unwrap();
        let spec = pod.spec.unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));

        let asks = serde_json::json!({ "containers": containers, "automountServiceAccountToken": true });
        let pod = pod_for(&pool_with(asks), "h", "key", None).unwrap();
        assert_eq!(pod.spec.unwrap().automount_service_account_token, Some(true));
    }
}
