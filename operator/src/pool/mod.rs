//! The WarmPool controller: keeps `size` warm pods, refills after every
//! assignment, rolls unassigned pods onto a new template, and cleans up pods
//! whose session is gone.
//!
//! Each pass observes (caches, the pod index, the operator's memory), plans
//! with [`plan::plan`] (pure), acts (creates, then deletes, each failure kept
//! rather than ending the pass), publishes the Events [`status::notices`]
//! gives, and writes the status [`status::derive`] gives when
//! [`status::write`] says it is due.

pub mod nodes;
pub mod plan;
pub mod status;

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
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tidepool_crds::warm_pool::{NodeAssignment, WarmPoolStatus};
use tidepool_crds::{API_VERSION, TestSession, WarmPool};
use tidepool_wire::report::ReportKind;

use crate::conditions::{self, reason};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::events::{self, Notice};
use crate::keys::PoolKeys;
use crate::labels;
use crate::placement::{Need, Pick, Request};
use crate::pod_index::PoolRef;
use crate::pods;
use plan::{PodView, Target};
use status::{Asked, Problems};

/// How soon a pass that changed something, or waits on something, comes back.
const BUSY_RECHECK: Duration = Duration::from_secs(2);
/// How soon a quiet pool is looked at again without a trigger.
const QUIET_RECHECK: Duration = Duration::from_secs(300);

/// Cached pods of this very pool (by UID), by name.
fn cached_pods(ctx: &Context, pool: &WarmPool, namespace: &str, names: &[String]) -> Vec<Arc<Pod>> {
    names
        .iter()
        .filter_map(|name| ctx.pods.get(&ObjectRef::new(name).within(namespace)))
        .filter(|p| pods::owned_by(p, pool))
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
    if let Some(wait) = ctx.memory.pool_pass_wait(&uid) {
        return Ok(Action::requeue(wait));
    }

    // Observe. The pods no session holds, and a count of those sessions
    // hold: a pass reads the pool's warm pods, not the thousands its
    // sessions may hold.
    let keys = match ctx.keys.ensure(&ctx.client, &pool).await {
        Ok(keys) => keys,
        Err(Error::KeyNotOwned { secret, pool: name }) => return key_not_owned(&ctx, &pool, &secret, &name).await,
        Err(e) => return Err(e),
    };
    let hash = pods::template_hash(&pool);
    let kid = keys.kid();
    let (unassigned, assigned) = ctx.with_pod_index(|index| index.owned(&uid));
    let pods = cached_pods(&ctx, &pool, &namespace, &unassigned);
    let in_flight =
        ctx.memory.creates_in_flight(&uid, |pod| ctx.pods.get(&ObjectRef::new(pod).within(&namespace)).is_some());
    let waiting = waiting_sessions(&ctx, &namespace, &name);
    let views: Vec<PodView> = pods.iter().map(|p| view(p, &hash, &kid)).collect();

    // Decide.
    let target = Target {
        size: u32::try_from(pool.spec.size).unwrap_or(0),
        max_size: Some(u32::try_from(pool.spec.max_size).unwrap_or(0)),
        waiting_sessions: waiting,
        batch: ctx.settings.create_batch,
        in_flight,
        assigned,
    };
    let plan = plan::plan(&views, target);

    // Act: create all of this pass's batch at once, then delete.
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut problems = Problems::default();
    if plan.create > 0 {
        let inputs = PodInputs {
            hash: &hash,
            keys: &keys,
            results_url: ctx.settings.results_url.as_deref(),
            cluster_cidrs: &ctx.settings.cluster_cidrs,
        };
        let template = pod_for(&pool, &inputs)?;
        let (create, placement) =
            create_pods(&ctx, &pool, &uid, &template, &pods_api, plan.create.min(waiting), plan.create).await;
        problems.create = create;
        problems.placement = placement;
    }
    let mut doomed: Vec<(String, Option<String>)> = plan
        .delete
        .iter()
        .map(|(n, _)| (n.clone(), pods.iter().find(|p| &p.name_any() == n).and_then(|p| p.uid())))
        .collect();
    // Held pods are looked over less often than passes run: there can be
    // thousands, and a gone session's pod waiting a second costs little.
    let sweep_wait = ctx.memory.orphan_sweep_wait(&uid);
    if sweep_wait.is_none() {
        let held = cached_pods(&ctx, &pool, &namespace, &ctx.with_pod_index(|index| index.owned_assigned(&uid)));
        for orphan in orphans(&ctx, &namespace, &held).await? {
            doomed.push((orphan.name_any(), orphan.uid()));
        }
    }
    let deleted = delete_pods(&pods_api, &doomed).await;
    problems.delete = deleted.as_ref().err().map(ToString::to_string);

    // Say what happened, then write the status.
    for notice in status::notices(&plan, &problems) {
        events::publish(&ctx.recorder, pool.as_ref(), &notice).await;
    }
    let old = pool.status.clone().unwrap_or_default();
    let asked =
        Asked { name: &name, size: target.size, max_size: pool.spec.max_size, generation: pool.meta().generation };
    let new = status::derive(&old, asked, &plan, &problems, Timestamp::now());
    for (state, value) in [("warm", new.warm), ("assigned", new.assigned), ("pending", new.pending)] {
        ctx.metrics.pool_pods.with_label_values(&[namespace.as_str(), &name, state]).set(i64::from(value));
    }
    let write = status::write(&old, &new, ctx.memory.since_status_written(&uid));
    if write == status::Write::Now {
        write_status(&ctx, &pool, &new).await?;
        ctx.memory.status_written(&uid);
    }
    // A failed delete fails the pass (and is retried) only once its Event
    // and status are out.
    deleted?;
    let busy = Busy {
        created: plan.create > 0,
        deleted: !doomed.is_empty(),
        in_flight: in_flight > 0,
        problem: problems.degraded().is_some(),
        deferred_status: write == status::Write::Later,
    };
    Ok(Action::requeue(next_pass(&busy, sweep_wait)))
}

/// The pool's key Secret is someone else's: say so, and make nothing until
/// it is gone (pods would get a key the operator does not control).
async fn key_not_owned(ctx: &Context, pool: &WarmPool, secret: &str, name: &str) -> Result<Action> {
    let message = Error::KeyNotOwned { secret: secret.into(), pool: name.into() }.to_string();
    events::publish(&ctx.recorder, pool, &Notice::warning(reason::KEY_NOT_OWNED, message.clone())).await;
    let old = pool.status.clone().unwrap_or_default();
    let mut new = old.clone();
    let generation = pool.meta().generation;
    conditions::set(
        &mut new.conditions,
        conditions::DEGRADED,
        true,
        reason::KEY_NOT_OWNED,
        message,
        generation,
        Timestamp::now(),
    );
    if new != old {
        write_status(ctx, pool, &new).await?;
    }
    Ok(Action::requeue(Duration::from_secs(60)))
}

pub fn error_policy(_pool: Arc<WarmPool>, error: &Error, _ctx: Arc<Context>) -> Action {
    if error.is_transient() {
        Action::requeue(Duration::from_secs(1))
    } else {
        Action::requeue(Duration::from_secs(60))
    }
}

/// What a pass left going on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Busy {
    created: bool,
    deleted: bool,
    in_flight: bool,
    problem: bool,
    deferred_status: bool,
}

/// When to pass over the pool again without a trigger.
fn next_pass(busy: &Busy, sweep_wait: Option<Duration>) -> Duration {
    let Busy { created, deleted, in_flight, problem, deferred_status } = *busy;
    let next = if created || deleted || in_flight || problem || deferred_status { BUSY_RECHECK } else { QUIET_RECHECK };
    // A skipped sweep may be the one a deleted session's pod is waiting for.
    sweep_wait.map_or(next, |wait| wait.min(next))
}

fn view(pod: &Pod, hash: &str, kid: &str) -> PodView {
    PodView {
        name: pod.name_any(),
        assigned: pod.labels().get(labels::STATE).map(String::as_str) == Some(labels::STATE_ASSIGNED),
        ready: pods::is_ready(pod),
        terminating: pods::is_terminating(pod),
        finished: pods::is_finished(pod),
        current: pods::is_current(pod, hash, kid),
        created: pod.meta().creation_timestamp.as_ref().map_or(0, |t| t.0.as_second()),
    }
}

/// Creates `count` pods from `template`, `on_demand` of them for waiting
/// sessions (placed by the router where agents report). Returns why a create
/// failed and why the operator found no node, if it did not.
async fn create_pods(
    ctx: &Context,
    pool: &WarmPool,
    pool_uid: &str,
    template: &Pod,
    pods_api: &Api<Pod>,
    on_demand: u32,
    count: u32,
) -> (Option<String>, Option<String>) {
    let mut pinned = place_on_demand(ctx, pool, on_demand);
    let (assigned_nodes, placement_error) = match pool.spec.node_assignment {
        NodeAssignment::Scheduler => (None, None),
        NodeAssignment::Operator => match assign_nodes(ctx, pool, template, &mut pinned, count) {
            Ok(nodes) if (nodes.len() as u32) < count => {
                let short = format!(
                    "the nodes that may take the pool's pods have no pod slots left ({} of {count} placed)",
                    nodes.len(),
                );
                (Some(nodes), Some(short))
            }
            Ok(nodes) => (Some(nodes), None),
            Err(why) => (Some(Vec::new()), Some(why)),
        },
    };
    let creating = assigned_nodes.as_ref().map_or(count as usize, Vec::len);
    let post = PostParams::default();
    let created = join_all((0..creating).map(|i| {
        let mut pod = match (&assigned_nodes, pinned.get(i)) {
            (None, Some(pick)) => pin(template, &pick.backend),
            _ => template.clone(),
        };
        if let (Some(nodes), Some(spec)) = (&assigned_nodes, pod.spec.as_mut()) {
            spec.node_name = nodes.get(i).cloned();
        }
        let post = &post;
        async move { pods_api.create(post, &pod).await }
    }))
    .await;
    let need = Need::from(&pool.spec.tier);
    let mut create_error = None;
    for (i, result) in created.into_iter().enumerate() {
        match result {
            Ok(pod) => ctx.memory.created(pool_uid, pod.name_any()),
            Err(e) => {
                create_error = Some(e.to_string());
                // No pod, so no session will use the room it reserved.
                if let Some(pick) = pinned.get(i) {
                    ctx.fleet.with_router(|router| router.release(pick, need));
                }
            }
        }
    }
    // Picks beyond the pods made hold no pod either.
    for pick in pinned.iter().skip(creating) {
        ctx.fleet.with_router(|router| router.release(pick, need));
    }
    (create_error, placement_error)
}

/// Deletes each pod, with its UID as a precondition; every delete is tried,
/// and the last failure is returned (gone or replaced already is not one).
async fn delete_pods(pods_api: &Api<Pod>, doomed: &[(String, Option<String>)]) -> Result<(), kube::Error> {
    let deletions = doomed.iter().map(|(pod, uid)| {
        let params = DeleteParams {
            preconditions: Some(Preconditions { uid: uid.clone(), resource_version: None }),
            ..DeleteParams::default()
        };
        async move { pods_api.delete(pod, &params).await }
    });
    let mut outcome = Ok(());
    for result in join_all(deletions).await {
        match result {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => outcome = Err(e),
        }
    }
    outcome
}

async fn write_status(ctx: &Context, pool: &WarmPool, status: &WarmPoolStatus) -> Result<()> {
    let api: Api<WarmPool> = Api::namespaced(ctx.client.clone(), &pool.namespace().unwrap_or_default());
    let patch = serde_json::json!({ "apiVersion": API_VERSION, "kind": "WarmPool", "status": status });
    api.patch_status(&pool.name_any(), &PatchParams::apply(labels::MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(())
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
    let pool_ref: PoolRef = (pool.namespace().unwrap_or_default(), pool.name_any());
    let (per_pool, known) = ctx.with_pod_index(|index| index.pods_per_node(&pool_ref));
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
    let count = ctx
        .sessions
        .state()
        .iter()
        .filter(|s| s.metadata.namespace.as_deref() == Some(namespace) && s.spec.pool == pool)
        .filter(|s| crate::session::waits_for_a_pod(s))
        .count();
    u32::try_from(count).unwrap_or(u32::MAX)
}

/// Assigned pods whose session no longer exists. The session cache can lag a
/// new session by a moment, so absence there is confirmed with the API server.
async fn orphans(ctx: &Context, namespace: &str, pods: &[Arc<Pod>]) -> Result<Vec<Arc<Pod>>> {
    let sessions: Api<TestSession> = Api::namespaced(ctx.client.clone(), namespace);
    let mut gone = Vec::new();
    for pod in pods {
        if pods::is_terminating(pod) {
            continue;
        }
        let Some(session_uid) = pods::claimed_by(pod) else { continue };
        let session_name = pod.labels().get(labels::SESSION).cloned().unwrap_or_default();
        let cached = ctx.sessions.get(&ObjectRef::new(&session_name).within(namespace));
        if cached.is_some_and(|s| s.metadata.uid.as_deref() == Some(session_uid)) {
            continue;
        }
        let live = sessions.get_opt(&session_name).await?;
        if live.and_then(|s| s.uid()).as_deref() != Some(session_uid) {
            gone.push(pod.clone());
        }
    }
    Ok(gone)
}

/// What the operator gives every session pod of a pool, beside its template.
pub struct PodInputs<'a> {
    /// The hash of the template and egress rules ([`pods::template_hash`]).
    pub hash: &'a str,
    /// The pool's keys: pods get the public keys, and the current key's id as a label.
    pub keys: &'a PoolKeys,
    /// Where to post results.
    pub results_url: Option<&'a str>,
    /// The cluster's pod and service ranges, which session pods may not
    /// reach unless the pool allows them.
    pub cluster_cidrs: &'a [String],
}

/// The pod the pool creates: its template, labelled and owned by the pool,
/// told its pool, its name, the pool's public keys, what it may reach and
/// where to post results.
fn pod_for(pool: &WarmPool, inputs: &PodInputs<'_>) -> Result<Pod> {
    let template = &pool.spec.template;
    let mut metadata: ObjectMeta = template.metadata.clone().unwrap_or_default();
    metadata.name = None;
    metadata.generate_name = Some(format!("{}-", pool.name_any()));
    metadata.namespace = pool.namespace();
    let labels = metadata.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(labels::POOL.into(), pool.name_any());
    labels.insert(labels::STATE.into(), labels::STATE_WARM.into());
    labels.insert(labels::TEMPLATE_HASH.into(), inputs.hash.into());
    labels.insert(labels::KEY_ID.into(), inputs.keys.kid());
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
    let value = |name: &str, value: String| EnvVar { name: name.into(), value: Some(value), ..Default::default() };
    let egress = serde_json::to_string(&pool.spec.egress.allow).map_err(|e| Error::Invalid {
        kind: "WarmPool",
        name: pool.name_any(),
        reason: format!("spec.egress: {e}"),
    })?;
    for container in &mut spec.containers {
        let env = container.env.get_or_insert_with(Vec::new);
        env.retain(|e| !e.name.starts_with("TIDEPOOL_"));
        env.push(value("TIDEPOOL_POOL", pool.name_any()));
        env.push(value("TIDEPOOL_POOL_PUBLIC_KEY", inputs.keys.public().to_base64_list()));
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
        if !pool.spec.egress.is_empty() {
            env.push(value("TIDEPOOL_EGRESS_ALLOW", egress.clone()));
        }
        if !inputs.cluster_cidrs.is_empty() {
            env.push(value("TIDEPOOL_EGRESS_DENY", inputs.cluster_cidrs.join(",")));
        }
        if let Some(url) = inputs.results_url {
            env.push(value("TIDEPOOL_OPERATOR_URL", url.into()));
        }
    }
    Ok(Pod { metadata, spec: Some(spec), status: None })
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "apiVersion": tidepool_crds::API_VERSION, "kind": "WarmPool",
            "metadata": { "name": "edge", "namespace": "ns", "uid": "u1" },
            "spec": { "size": 1, "tier": { "vcpu": 1, "memoryMiB": 64 }, "template": { "spec": template_spec } }
        }))
        .unwrap()
    }

    fn keys() -> PoolKeys {
        PoolKeys { current: tidepool_wire::token::PoolSigningKey::generate().unwrap(), previous: None }
    }

    fn inputs(keys: &PoolKeys) -> PodInputs<'_> {
        PodInputs { hash: "h", keys, results_url: None, cluster_cidrs: &[] }
    }

    #[test]
    fn a_pod_is_told_its_keys_what_it_may_reach_and_where_to_report() {
        let mut pool = pool_with(serde_json::json!({ "containers": [{ "name": "s", "image": "i" }] }));
        pool.spec.egress.allow.push(tidepool_crds::warm_pool::EgressRule {
            cidr: Some("10.1.0.0/16".into()),
            host: None,
            ports: vec![5432],
        });
        let old = tidepool_wire::token::PoolSigningKey::generate().unwrap();
        let keys = PoolKeys { current: tidepool_wire::token::PoolSigningKey::generate().unwrap(), previous: Some(old) };
        let cidrs = ["10.96.0.0/12".to_string(), "10.244.0.0/16".to_string()];
        let inputs = PodInputs { hash: "h", keys: &keys, results_url: Some("http://op:8080"), cluster_cidrs: &cidrs };
        let pod = pod_for(&pool, &inputs).unwrap();
        assert_eq!(pod.labels()[labels::KEY_ID], keys.kid());
        let env: BTreeMap<String, String> = pod.spec.unwrap().containers[0]
            .env
            .clone()
            .unwrap()
            .into_iter()
            .filter_map(|e| Some((e.name, e.value?)))
            .collect();
        assert_eq!(env["TIDEPOOL_POOL_PUBLIC_KEY"], keys.public().to_base64_list());
        assert_eq!(env["TIDEPOOL_EGRESS_ALLOW"], r#"[{"cidr":"10.1.0.0/16","ports":[5432]}]"#);
        assert_eq!(env["TIDEPOOL_EGRESS_DENY"], "10.96.0.0/12,10.244.0.0/16");
        assert_eq!(env["TIDEPOOL_OPERATOR_URL"], "http://op:8080");
        // The egress rules are in the hash: changing them rolls the warm pods.
        let plain = pool_with(serde_json::json!({ "containers": [{ "name": "s", "image": "i" }] }));
        assert_ne!(pods::template_hash(&plain), pods::template_hash(&pool));
    }

    #[test]
    fn a_pod_gets_no_api_token_unless_its_template_asks() {
        let containers = serde_json::json!([{ "name": "s", "image": "i" }]);
        let pod = pod_for(&pool_with(serde_json::json!({ "containers": containers })), &inputs(&keys())).unwrap();
        let spec = pod.spec.unwrap();
        assert_eq!(spec.automount_service_account_token, Some(false));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));

        let asks = serde_json::json!({ "containers": containers, "automountServiceAccountToken": true });
        let pod = pod_for(&pool_with(asks), &inputs(&keys())).unwrap();
        assert_eq!(pod.spec.unwrap().automount_service_account_token, Some(true));
    }
}

#[cfg(test)]
mod decisions {
    use super::*;

    #[test]
    fn a_busy_pass_comes_back_soon_and_a_quiet_one_late() {
        let quiet = Busy::default();
        assert_eq!(next_pass(&quiet, None), QUIET_RECHECK);
        let creating = Busy { created: true, ..Busy::default() };
        assert_eq!(next_pass(&creating, None), BUSY_RECHECK);
        for busy in [
            Busy { deleted: true, ..quiet },
            Busy { in_flight: true, ..quiet },
            Busy { problem: true, ..quiet },
            Busy { deferred_status: true, ..quiet },
        ] {
            assert_eq!(next_pass(&busy, None), BUSY_RECHECK, "{busy:?}");
        }
        // A skipped orphan sweep may be what a deleted session's pod waits for.
        assert_eq!(next_pass(&quiet, Some(Duration::from_millis(300))), Duration::from_millis(300));
        assert_eq!(next_pass(&creating, Some(Duration::from_secs(9))), BUSY_RECHECK);
    }
}
