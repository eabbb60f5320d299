//! What the pod watch says about Tidepool's pods, indexed the ways the
//! controllers ask: the pods claimed for each session, each pool's warm pods
//! node by node, each pool's pods by whether they are assigned, and the pods
//! on each node. Claims, pool passes and pod placement look things up here
//! instead of scanning every cached pod. Under load those scans grew with the
//! pods held by live sessions, until they were the operator's main cost
//! (docs/benchmarks.md).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::watcher::Event;

use crate::labels;

/// A pod's namespace and name.
pub type PodKey = (String, String);

/// A pool by namespace and name (not its UID).
pub type PoolRef = (String, String);

/// What one pod adds to the index, kept so that its next event can take it
/// back out exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Facts {
    claimed_by: Option<String>,
    pool: Option<PoolRef>,
    /// The UID of the WarmPool that owns it.
    owner: Option<String>,
    /// Not being deleted.
    live: bool,
    warm: bool,
    assigned: bool,
    /// The node it was given, placed or not yet.
    given_node: String,
    /// Set while the pod is placed and not finished (it takes a slot).
    node: Option<String>,
}

/// One pool's live pods, by the UID of the pool that owns them.
#[derive(Debug, Default)]
struct OwnedPods {
    unassigned: BTreeSet<String>,
    assigned: BTreeSet<String>,
}

/// The indexes, fed by the pod watch.
#[derive(Debug, Default)]
pub struct PodIndex {
    facts: HashMap<PodKey, Facts>,
    by_session: HashMap<String, BTreeSet<PodKey>>,
    /// Warm pods by pool, then by node ("" before one is given), by name.
    warm_by_pool: HashMap<PoolRef, BTreeMap<String, BTreeSet<String>>>,
    by_owner: HashMap<String, OwnedPods>,
    assigned_by_pool_node: HashMap<PoolRef, HashMap<String, u32>>,
    pods_by_pool_node: HashMap<PoolRef, HashMap<String, u32>>,
    pods_by_node: HashMap<String, u32>,
    /// For each watch (by the namespace it covers; None: the whole cluster),
    /// the pods seen since its relist began; the rest of its pods are gone
    /// at its end.
    relisted: HashMap<Option<String>, HashSet<PodKey>>,
}

impl PodIndex {
    /// Folds one event of a pod watch in; `watch` is the namespace that
    /// watch covers (None: the whole cluster), so a relist of one namespace
    /// drops only that namespace's gone pods.
    pub fn apply(&mut self, watch: Option<&str>, event: &Event<Pod>) {
        match event {
            Event::Apply(pod) => self.upsert(pod),
            Event::Delete(pod) => self.remove(&key(pod)),
            Event::Init => {
                self.relisted.insert(watch.map(String::from), HashSet::new());
            }
            Event::InitApply(pod) => {
                if let Some(seen) = self.relisted.get_mut(&watch.map(String::from)) {
                    seen.insert(key(pod));
                }
                self.upsert(pod);
            }
            Event::InitDone => {
                if let Some(seen) = self.relisted.remove(&watch.map(String::from)) {
                    let covered = |k: &PodKey| watch.is_none_or(|ns| k.0 == ns);
                    let gone: Vec<PodKey> =
                        self.facts.keys().filter(|k| covered(k) && !seen.contains(*k)).cloned().collect();
                    gone.iter().for_each(|k| self.remove(k));
                }
            }
        }
    }

    /// The pods claimed for session `uid`.
    pub fn pods_of(&self, uid: &str) -> Vec<PodKey> {
        self.by_session.get(uid).map(|pods| pods.iter().cloned().collect()).unwrap_or_default()
    }

    /// Pool `pool`'s pods labelled warm (ready or not), node by node, each
    /// node's in name order.
    pub fn warm_by_node(&self, pool: &PoolRef) -> impl Iterator<Item = (&str, impl Iterator<Item = &str>)> {
        self.warm_by_pool
            .get(pool)
            .into_iter()
            .flatten()
            .map(|(node, names)| (node.as_str(), names.iter().map(String::as_str)))
    }

    /// The live pods of the pool with UID `owner` that no session holds (warm,
    /// starting, or finished), and how many live pods sessions hold.
    pub fn owned(&self, owner: &str) -> (Vec<String>, u32) {
        self.by_owner.get(owner).map_or_else(Default::default, |pods| {
            (pods.unassigned.iter().cloned().collect(), pods.assigned.len() as u32)
        })
    }

    /// The live pods of the pool with UID `owner` that sessions hold.
    pub fn owned_assigned(&self, owner: &str) -> Vec<String> {
        self.by_owner.get(owner).map(|pods| pods.assigned.iter().cloned().collect()).unwrap_or_default()
    }

    /// Pool `pool`'s assigned pods on each node.
    pub fn assigned_per_node(&self, pool: &PoolRef) -> HashMap<String, u32> {
        self.assigned_by_pool_node.get(pool).cloned().unwrap_or_default()
    }

    /// Pool `pool`'s pods on each node, and all Tidepool pods on each node;
    /// finished pods are not counted.
    pub fn pods_per_node(&self, pool: &PoolRef) -> (HashMap<String, u32>, HashMap<String, u32>) {
        (self.pods_by_pool_node.get(pool).cloned().unwrap_or_default(), self.pods_by_node.clone())
    }

    fn upsert(&mut self, pod: &Pod) {
        let key = key(pod);
        let facts = facts(pod);
        if self.facts.get(&key) == Some(&facts) {
            return;
        }
        self.remove(&key);
        if let Some(uid) = &facts.claimed_by {
            self.by_session.entry(uid.clone()).or_default().insert(key.clone());
        }
        if let Some(owner) = facts.owner.as_ref().filter(|_| facts.live) {
            let owned = self.by_owner.entry(owner.clone()).or_default();
            let set = if facts.assigned { &mut owned.assigned } else { &mut owned.unassigned };
            set.insert(key.1.clone());
        }
        if let Some(pool) = &facts.pool {
            if facts.warm {
                let by_node = self.warm_by_pool.entry(pool.clone()).or_default();
                by_node.entry(facts.given_node.clone()).or_default().insert(key.1.clone());
            }
            if let Some(node) = &facts.node {
                *self.pods_by_pool_node.entry(pool.clone()).or_default().entry(node.clone()).or_default() += 1;
                if facts.assigned {
                    *self.assigned_by_pool_node.entry(pool.clone()).or_default().entry(node.clone()).or_default() += 1;
                }
            }
        }
        if let Some(node) = &facts.node {
            *self.pods_by_node.entry(node.clone()).or_default() += 1;
        }
        if facts.claimed_by.is_some() || facts.pool.is_some() || facts.owner.is_some() || facts.node.is_some() {
            self.facts.insert(key, facts);
        }
    }

    fn remove(&mut self, key: &PodKey) {
        let Some(facts) = self.facts.remove(key) else { return };
        if let Some(uid) = &facts.claimed_by {
            drop_from_set(&mut self.by_session, uid, key);
        }
        if let Some(owner) = facts.owner.as_ref().filter(|_| facts.live)
            && let Some(owned) = self.by_owner.get_mut(owner)
        {
            let set = if facts.assigned { &mut owned.assigned } else { &mut owned.unassigned };
            set.remove(&key.1);
            if owned.assigned.is_empty() && owned.unassigned.is_empty() {
                self.by_owner.remove(owner);
            }
        }
        if let Some(pool) = &facts.pool {
            if facts.warm
                && let Some(by_node) = self.warm_by_pool.get_mut(pool)
            {
                if let Some(names) = by_node.get_mut(&facts.given_node) {
                    names.remove(&key.1);
                    if names.is_empty() {
                        by_node.remove(&facts.given_node);
                    }
                }
                if by_node.is_empty() {
                    self.warm_by_pool.remove(pool);
                }
            }
            if let Some(node) = &facts.node {
                count_down(&mut self.pods_by_pool_node, pool, node);
                if facts.assigned {
                    count_down(&mut self.assigned_by_pool_node, pool, node);
                }
            }
        }
        if let Some(node) = &facts.node {
            decrement(&mut self.pods_by_node, node);
        }
    }
}

fn facts(pod: &Pod) -> Facts {
    let live = pod.metadata.deletion_timestamp.is_none();
    let state = pod.labels().get(labels::STATE).map(String::as_str);
    let pool = pod.labels().get(labels::POOL).map(|p| (pod.namespace().unwrap_or_default(), p.clone()));
    let given_node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    Facts {
        claimed_by: pod.annotations().get(labels::SESSION_UID).filter(|_| live).cloned(),
        owner: pod
            .owner_references()
            .iter()
            .find(|o| o.kind == "WarmPool" && o.controller == Some(true))
            .map(|o| o.uid.clone()),
        live,
        warm: live && state == Some(labels::STATE_WARM),
        assigned: state == Some(labels::STATE_ASSIGNED),
        node: given_node.clone().filter(|_| !crate::pods::is_finished(pod)),
        given_node: given_node.unwrap_or_default(),
        pool,
    }
}

fn drop_from_set<K: std::hash::Hash + Eq, V: Ord>(map: &mut HashMap<K, BTreeSet<V>>, key: &K, value: &V) {
    if let Some(set) = map.get_mut(key) {
        set.remove(value);
        if set.is_empty() {
            map.remove(key);
        }
    }
}

fn count_down(map: &mut HashMap<PoolRef, HashMap<String, u32>>, pool: &PoolRef, node: &str) {
    if let Some(per_node) = map.get_mut(pool) {
        decrement(per_node, node);
        if per_node.is_empty() {
            map.remove(pool);
        }
    }
}

fn decrement(counts: &mut HashMap<String, u32>, node: &str) {
    if let Some(count) = counts.get_mut(node) {
        *count -= 1;
        if *count == 0 {
            counts.remove(node);
        }
    }
}

fn key(pod: &Pod) -> PodKey {
    (pod.namespace().unwrap_or_default(), pod.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use std::collections::BTreeMap;

    fn pod(name: &str, claim: Option<&str>) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.into());
        pod.metadata.namespace = Some("ns".into());
        if let Some(uid) = claim {
            pod.metadata.annotations = Some(BTreeMap::from([(labels::SESSION_UID.to_string(), uid.to_string())]));
        }
        pod
    }

    fn keys(names: &[&str]) -> Vec<PodKey> {
        names.iter().map(|n| ("ns".to_string(), n.to_string())).collect()
    }

    #[test]
    fn claims_follow_the_pods() {
        let mut index = PodIndex::default();
        index.apply(None, &Event::Apply(pod("a", None)));
        assert!(index.pods_of("s1").is_empty());
        index.apply(None, &Event::Apply(pod("a", Some("s1"))));
        index.apply(None, &Event::Apply(pod("b", Some("s1"))));
        assert_eq!(index.pods_of("s1"), keys(&["a", "b"]));
        // Moved to another session (never in practice, but kept exact).
        index.apply(None, &Event::Apply(pod("b", Some("s2"))));
        assert_eq!(index.pods_of("s1"), keys(&["a"]));
        assert_eq!(index.pods_of("s2"), keys(&["b"]));
        // A pod being deleted no longer counts; a deleted one is gone.
        let mut going = pod("a", Some("s1"));
        going.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        index.apply(None, &Event::Apply(going));
        assert!(index.pods_of("s1").is_empty());
        index.apply(None, &Event::Delete(pod("b", Some("s2"))));
        assert!(index.pods_of("s2").is_empty());
        assert!(index.facts.is_empty() && index.by_session.is_empty());
    }

    #[test]
    fn a_relist_drops_pods_that_went_meanwhile() {
        let mut index = PodIndex::default();
        index.apply(None, &Event::Apply(pod("a", Some("s1"))));
        index.apply(None, &Event::Apply(pod("b", Some("s1"))));
        index.apply(None, &Event::Init);
        index.apply(None, &Event::InitApply(pod("b", Some("s1"))));
        index.apply(None, &Event::InitApply(pod("c", Some("s3"))));
        // Until the relist ends, what was known stays.
        assert_eq!(index.pods_of("s1"), keys(&["a", "b"]));
        index.apply(None, &Event::InitDone);
        assert_eq!(index.pods_of("s1"), keys(&["b"]));
        assert_eq!(index.pods_of("s3"), keys(&["c"]));
    }

    #[test]
    fn a_relist_of_one_namespace_leaves_the_others_alone() {
        let mut other = pod("x", Some("s9"));
        other.metadata.namespace = Some("other".into());
        let mut index = PodIndex::default();
        index.apply(Some("other"), &Event::Apply(other));
        index.apply(Some("ns"), &Event::Apply(pod("a", Some("s1"))));
        index.apply(Some("ns"), &Event::Init);
        index.apply(Some("other"), &Event::Init);
        index.apply(Some("ns"), &Event::InitDone);
        // ns relisted empty: its pod is gone; other's relist is still going on.
        assert!(index.pods_of("s1").is_empty());
        assert_eq!(index.pods_of("s9"), [("other".to_string(), "x".to_string())]);
        index.apply(Some("other"), &Event::InitDone);
        assert!(index.pods_of("s9").is_empty());
    }

    fn pool_pod(name: &str, state: &str, node: Option<&str>, phase: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": name, "namespace": "ns",
                "labels": { labels::POOL: "edge", labels::STATE: state },
                "ownerReferences": [{ "apiVersion": "tidepool.dev/v1alpha1", "kind": "WarmPool",
                    "name": "edge", "uid": "edge-uid", "controller": true }] },
            "spec": { "containers": [], "nodeName": node },
            "status": { "phase": phase }
        }))
        .unwrap()
    }

    #[test]
    fn pools_warm_pods_and_node_counts_follow_the_pods() {
        let edge = ("ns".to_string(), "edge".to_string());
        let mut index = PodIndex::default();
        index.apply(None, &Event::Apply(pool_pod("a", labels::STATE_WARM, None, "Pending")));
        index.apply(None, &Event::Apply(pool_pod("a", labels::STATE_WARM, Some("n1"), "Running")));
        index.apply(None, &Event::Apply(pool_pod("b", labels::STATE_WARM, Some("n1"), "Running")));
        index.apply(None, &Event::Apply(pool_pod("c", labels::STATE_WARM, Some("n2"), "Running")));
        assert_eq!(warm(&index, &edge), [("n1", vec!["a", "b"]), ("n2", vec!["c"])]);
        assert_eq!(index.owned("edge-uid"), (vec!["a".to_string(), "b".into(), "c".into()], 0));
        assert!(index.assigned_per_node(&edge).is_empty());
        let per_node = HashMap::from([("n1".to_string(), 2), ("n2".to_string(), 1)]);
        assert_eq!(index.pods_per_node(&edge), (per_node.clone(), per_node));

        // Claimed: no longer warm, counted as assigned on its node.
        index.apply(None, &Event::Apply(pool_pod("b", labels::STATE_ASSIGNED, Some("n1"), "Running")));
        assert_eq!(warm(&index, &edge), [("n1", vec!["a"]), ("n2", vec!["c"])]);
        assert_eq!(index.owned("edge-uid"), (vec!["a".to_string(), "c".into()], 1));
        assert_eq!(index.owned_assigned("edge-uid"), ["b"]);
        assert_eq!(index.assigned_per_node(&edge), HashMap::from([("n1".to_string(), 1)]));
        // A finished pod holds no slot; a deleted one is gone from everything.
        index.apply(None, &Event::Apply(pool_pod("b", labels::STATE_ASSIGNED, Some("n1"), "Failed")));
        assert!(index.assigned_per_node(&edge).is_empty());
        assert_eq!(index.pods_per_node(&edge).1, HashMap::from([("n1".to_string(), 1), ("n2".to_string(), 1)]));
        for name in ["a", "b", "c"] {
            index.apply(None, &Event::Delete(pool_pod(name, labels::STATE_WARM, None, "Running")));
        }
        assert!(warm(&index, &edge).is_empty());
        assert_eq!(index.owned("edge-uid"), (vec![], 0));
        assert_eq!(index.pods_per_node(&edge), (HashMap::new(), HashMap::new()));
        assert!(index.facts.is_empty() && index.warm_by_pool.is_empty() && index.pods_by_pool_node.is_empty());
        assert!(index.by_owner.is_empty());
    }

    fn warm<'a>(index: &'a PodIndex, pool: &PoolRef) -> Vec<(&'a str, Vec<&'a str>)> {
        index.warm_by_node(pool).map(|(node, names)| (node, names.collect())).collect()
    }

    #[test]
    fn a_pod_being_deleted_leaves_its_pools_sets() {
        let edge = ("ns".to_string(), "edge".to_string());
        let mut index = PodIndex::default();
        index.apply(None, &Event::Apply(pool_pod("a", labels::STATE_WARM, None, "Pending")));
        index.apply(None, &Event::Apply(pool_pod("b", labels::STATE_ASSIGNED, Some("n1"), "Running")));
        assert_eq!(warm(&index, &edge), [("", vec!["a"])]);
        assert_eq!(index.owned("edge-uid"), (vec!["a".to_string()], 1));
        for name in ["a", "b"] {
            let mut going = pool_pod(name, labels::STATE_WARM, None, "Running");
            going.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
            index.apply(None, &Event::Apply(going));
        }
        assert!(warm(&index, &edge).is_empty());
        assert_eq!(index.owned("edge-uid"), (vec![], 0));
        assert!(index.owned_assigned("edge-uid").is_empty());
    }
}
