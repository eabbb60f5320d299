//! Claiming a warm pod for a session: placement picks the node, the pod is
//! reserved in memory, and its labels are patched with its resourceVersion
//! as a precondition. A claim refused with 409 is settled by reading the pod
//! from the API server, never by grabbing another pod blindly.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tidepool_crds::{TestSession, WarmPool};
use tidepool_wire::report::{Coordinates, ReportKind};

use crate::context::Context;
use crate::error::Result;
use crate::labels;
use crate::placement::view::BackendView;
use crate::placement::{Candidate, Need, Pick, Request};
use crate::pod_index::PoolRef;
use crate::pods::{self, node_of};

/// How a claim came out.
#[derive(Debug)]
pub enum Claim {
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

/// Chooses a warm pod through placement and claims it for the session.
pub async fn claim(ctx: &Context, session: &TestSession, pool: &WarmPool, pods_api: &Api<Pod>) -> Result<Claim> {
    let namespace = session.namespace().unwrap_or_default();
    let hash = pods::template_hash(pool);
    // From the pod index: the pool's warm pods node by node, and its
    // sessions per node. Placement picks a node; within a node the first pod
    // by name goes. So each node offers only its first free pod on the current
    // template (or, failing that, its first outdated one): the same choice as
    // offering every warm pod, without reading them all on every claim.
    let pool_ref: PoolRef = (namespace.clone(), pool.name_any());
    let free = |name: &str| -> Option<Arc<Pod>> {
        let pod = ctx.pods.get(&ObjectRef::new(name).within(&namespace))?;
        let usable = pods::owned_by(&pod, pool)
            && pods::is_warm(&pod)
            && pods::is_ready(&pod)
            && pods::is_alive(&pod)
            && !ctx.memory.is_reserved(&format!("{namespace}/{name}"));
        usable.then_some(pod)
    };
    let is_current = |pod: &Arc<Pod>| pod.labels().get(labels::TEMPLATE_HASH) == Some(&hash);
    let (choices, assigned) = ctx.with_pod_index(|index| {
        (first_free_per_node(index.warm_by_node(&pool_ref), free, is_current), index.assigned_per_node(&pool_ref))
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
    let outcome = if ctx.memory.reserve(&key) {
        let outcome = claim_pod(ctx, session, pods_api, &chosen).await;
        // A claimed pod stays reserved: the cache may still show it warm.
        if !matches!(outcome, Ok(Claim::Won(_))) {
            ctx.memory.release(&key);
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
pub fn first_free_per_node<'a, P>(
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

/// Claims `pod` for the session: a merge patch of its labels and annotation
/// with its resourceVersion as a precondition. On 409 the pod is read again
/// and the claim settled by what it says: ours already (a lost answer), still
/// warm (retry once with the fresh version), or someone else's.
pub async fn claim_pod(ctx: &Context, session: &TestSession, pods_api: &Api<Pod>, pod: &Pod) -> Result<Claim> {
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
    ctx.memory.count_write(&uid);
    match pods_api.patch(&name, &PatchParams::default(), &Patch::Merge(patch(pod.resource_version()))).await {
        Ok(claimed) => return Ok(Claim::Won(Arc::new(claimed))),
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Claim::Lost),
        Err(kube::Error::Api(s)) if s.code == 409 => ctx.metrics.binding_conflicts.inc(),
        Err(e) => return Err(e.into()),
    }
    // 409: the cache was behind. Read the pod and settle by what it says.
    let Some(fresh) = pods_api.get_opt(&name).await? else { return Ok(Claim::Lost) };
    let claimed_by = pods::claimed_by(&fresh).map(String::from);
    if claimed_by.as_deref() == Some(uid.as_str()) {
        return Ok(Claim::Won(Arc::new(fresh)));
    }
    if claimed_by.is_some() || !pods::is_warm(&fresh) || pods::is_terminating(&fresh) {
        return Ok(Claim::Lost);
    }
    ctx.memory.count_write(&uid);
    match pods_api.patch(&name, &PatchParams::default(), &Patch::Merge(patch(fresh.resource_version()))).await {
        Ok(claimed) => Ok(Claim::Won(Arc::new(claimed))),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {
            ctx.metrics.binding_conflicts.inc();
            Ok(Claim::Lost)
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

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
