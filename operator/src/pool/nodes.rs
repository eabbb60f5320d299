//! Node assignment by the operator (a pool's `nodeAssignment: Operator`):
//! which nodes may take a pool's pod, and which of them gets each new pod.
//! Pure: the nodes and the pool's pods come from the caches.
//!
//! The rules are the scheduler's node rules, no more: the node is Ready and
//! schedulable, the template tolerates its NoSchedule and NoExecute taints,
//! and its labels and name match the template's nodeSelector and required
//! node affinity. The pods the node may hold (`allocatable.pods`) are
//! counted against the pods this operator knows there. The CRD refuses
//! templates that need more than this (pod affinity, topology spread).

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, NodeSelectorTerm, PodSpec, Taint, Toleration};
use kube::ResourceExt;

/// Why a node cannot take the pool's pods; None when it can.
pub fn refusal(node: &Node, spec: &PodSpec) -> Option<String> {
    let status = node.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    if !ready {
        return Some("not Ready".into());
    }
    let node_spec = node.spec.as_ref();
    if node_spec.and_then(|s| s.unschedulable).unwrap_or(false) {
        return Some("cordoned".into());
    }
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    for taint in node_spec.and_then(|s| s.taints.as_deref()).unwrap_or_default() {
        let blocks = matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute");
        if blocks && !tolerations.iter().any(|t| tolerates(t, taint)) {
            return Some(format!(
                "taint {}={}:{} not tolerated",
                taint.key,
                taint.value.as_deref().unwrap_or(""),
                taint.effect
            ));
        }
    }
    let labels = node.labels();
    if let Some(selector) = &spec.node_selector
        && let Some((key, value)) = selector.iter().find(|(k, v)| labels.get(*k) != Some(*v))
    {
        return Some(format!("nodeSelector {key}={value} does not match"));
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_ref());
    if let Some(required) = required
        && !required.node_selector_terms.iter().any(|term| term_matches(term, labels, &node.name_any()))
    {
        return Some("required node affinity does not match".into());
    }
    None
}

/// The scheduler's toleration rule: an empty key with Exists tolerates every
/// taint; an empty effect tolerates every effect.
fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect_ok = toleration.effect.as_deref().is_none_or(|e| e.is_empty() || e == taint.effect);
    let key = toleration.key.as_deref().unwrap_or("");
    let operator = toleration.operator.as_deref().unwrap_or("Equal");
    effect_ok
        && match operator {
            "Exists" => key.is_empty() || key == taint.key,
            "Equal" => {
                key == taint.key && toleration.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or("")
            }
            _ => false,
        }
}

/// One node selector term: every expression on the labels and every field
/// (only `metadata.name` exists) must match. An empty term matches nothing.
fn term_matches(term: &NodeSelectorTerm, labels: &BTreeMap<String, String>, name: &str) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        return false;
    }
    expressions.iter().all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields.iter().all(|r| r.key == "metadata.name" && requirement_matches(r, Some(name)))
}

fn requirement_matches(requirement: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = requirement.values.as_deref().unwrap_or_default();
    let number = |v: &str| v.parse::<i64>().ok();
    match requirement.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|w| w == v)),
        "NotIn" => value.is_none_or(|v| values.iter().all(|w| w != v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(have), Some(bound)) = (value.and_then(number), values.first().and_then(|v| number(v))) else {
                return false;
            };
            if requirement.operator == "Gt" { have > bound } else { have < bound }
        }
        _ => false,
    }
}

/// A node that may take the pool's pods, and how many it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Room {
    pub node: String,
    /// This pool's pods on the node: what the spread evens out.
    pub pool_pods: u32,
    /// More pods the node may take (its `allocatable.pods` less the pods
    /// this operator knows there), or None when the node sets no limit.
    pub free_slots: Option<u32>,
}

/// Nodes for `count` new pods: each goes to the node with the fewest of the
/// pool's pods that still has a slot, ties by name. Fewer than `count` when
/// the nodes run out of slots.
pub fn assign(mut rooms: Vec<Room>, count: u32) -> Vec<String> {
    rooms.sort_by(|a, b| a.node.cmp(&b.node));
    let mut picks = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let Some(room) = rooms.iter_mut().filter(|r| r.free_slots != Some(0)).min_by_key(|r| r.pool_pods) else {
            break;
        };
        room.pool_pods += 1;
        if let Some(free) = room.free_slots.as_mut() {
            *free -= 1;
        }
        picks.push(room.node.clone());
    }
    picks
}

/// The rooms on the nodes that may take the template's pods, from the node
/// cache and the counts of pods per node (this pool's, and all pods this
/// operator knows). With none, the reasons of the first few refusals.
pub fn rooms<'a>(
    nodes: impl IntoIterator<Item = &'a Node>,
    spec: &PodSpec,
    pool_pods: &HashMap<String, u32>,
    known_pods: &HashMap<String, u32>,
) -> Result<Vec<Room>, String> {
    let mut rooms = Vec::new();
    let mut refusals = Vec::new();
    let mut seen = 0;
    for node in nodes {
        seen += 1;
        let name = node.name_any();
        if let Some(why) = refusal(node, spec) {
            if refusals.len() < 3 {
                refusals.push(format!("{name}: {why}"));
            }
            continue;
        }
        let capacity = node
            .status
            .as_ref()
            .and_then(|s| s.allocatable.as_ref())
            .and_then(|a| a.get("pods"))
            .and_then(|q| q.0.parse::<u32>().ok());
        let known = known_pods.get(&name).copied().unwrap_or(0);
        rooms.push(Room {
            pool_pods: pool_pods.get(&name).copied().unwrap_or(0),
            free_slots: capacity.map(|c| c.saturating_sub(known)),
            node: name,
        });
    }
    if rooms.is_empty() {
        return Err(if seen == 0 {
            "no nodes in the cluster".into()
        } else {
            format!("no node of {seen} may take the pool's pods ({})", refusals.join("; "))
        });
    }
    Ok(rooms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(value: serde_json::Value) -> Node {
        let mut node: serde_json::Value = serde_json::json!({
            "metadata": { "name": "n1", "labels": { "zone": "a", "gpus": "4" } },
            "spec": {},
            "status": { "conditions": [{ "type": "Ready", "status": "True" }], "allocatable": { "pods": "3" } }
        });
        merge(&mut node, value);
        serde_json::from_value(node).unwrap()
    }

    fn merge(base: &mut serde_json::Value, patch: serde_json::Value) {
        match (base, patch) {
            (serde_json::Value::Object(b), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    merge(b.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (b, p) => *b = p,
        }
    }

    fn spec(value: serde_json::Value) -> PodSpec {
        let mut spec = serde_json::json!({ "containers": [{ "name": "s", "image": "i" }] });
        merge(&mut spec, value);
        serde_json::from_value(spec).unwrap()
    }

    #[test]
    fn a_ready_schedulable_node_takes_a_plain_template() {
        assert_eq!(refusal(&node(serde_json::json!({})), &spec(serde_json::json!({}))), None);
    }

    #[test]
    fn not_ready_and_cordoned_nodes_are_refused() {
        let not_ready =
            node(serde_json::json!({ "status": { "conditions": [{ "type": "Ready", "status": "False" }] } }));
        assert_eq!(refusal(&not_ready, &spec(serde_json::json!({}))).as_deref(), Some("not Ready"));
        let cordoned = node(serde_json::json!({ "spec": { "unschedulable": true } }));
        assert_eq!(refusal(&cordoned, &spec(serde_json::json!({}))).as_deref(), Some("cordoned"));
    }

    #[test]
    fn taints_need_tolerations_as_the_scheduler_reads_them() {
        let tainted = node(
            serde_json::json!({ "spec": { "taints": [{ "key": "dedicated", "value": "sessions", "effect": "NoSchedule" }] } }),
        );
        assert!(refusal(&tainted, &spec(serde_json::json!({}))).unwrap().contains("dedicated=sessions:NoSchedule"));
        for toleration in [
            serde_json::json!({ "key": "dedicated", "value": "sessions" }),
            serde_json::json!({ "key": "dedicated", "operator": "Exists", "effect": "NoSchedule" }),
            serde_json::json!({ "operator": "Exists" }),
        ] {
            let tolerant = spec(serde_json::json!({ "tolerations": [toleration.clone()] }));
            assert_eq!(refusal(&tainted, &tolerant), None, "{toleration}");
        }
        for toleration in [
            serde_json::json!({ "key": "dedicated", "value": "other" }),
            serde_json::json!({ "key": "dedicated", "operator": "Exists", "effect": "NoExecute" }),
        ] {
            let wrong = spec(serde_json::json!({ "tolerations": [toleration.clone()] }));
            assert!(refusal(&tainted, &wrong).is_some(), "{toleration}");
        }
        // PreferNoSchedule only steers the scheduler; it never refuses.
        let soft = node(serde_json::json!({ "spec": { "taints": [{ "key": "k", "effect": "PreferNoSchedule" }] } }));
        assert_eq!(refusal(&soft, &spec(serde_json::json!({}))), None);
    }

    #[test]
    fn node_selector_and_required_affinity_must_match() {
        let n = node(serde_json::json!({}));
        assert_eq!(refusal(&n, &spec(serde_json::json!({ "nodeSelector": { "zone": "a" } }))), None);
        assert!(refusal(&n, &spec(serde_json::json!({ "nodeSelector": { "zone": "b" } }))).is_some());
        let affinity = |terms: serde_json::Value| {
            spec(serde_json::json!({ "affinity": { "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": terms } } } }))
        };
        let matching = [
            serde_json::json!([{ "matchExpressions": [{ "key": "zone", "operator": "In", "values": ["a", "b"] }] }]),
            serde_json::json!([{ "matchExpressions": [{ "key": "zone", "operator": "NotIn", "values": ["b"] }] }]),
            serde_json::json!([{ "matchExpressions": [{ "key": "zone", "operator": "Exists" }] }]),
            serde_json::json!([{ "matchExpressions": [{ "key": "ssd", "operator": "DoesNotExist" }] }]),
            serde_json::json!([{ "matchExpressions": [{ "key": "gpus", "operator": "Gt", "values": ["2"] }] }]),
            serde_json::json!([{ "matchFields": [{ "key": "metadata.name", "operator": "In", "values": ["n1"] }] }]),
            // Terms are ORed.
            serde_json::json!([
                { "matchExpressions": [{ "key": "zone", "operator": "In", "values": ["z"] }] },
                { "matchExpressions": [{ "key": "zone", "operator": "In", "values": ["a"] }] }
            ]),
        ];
        for terms in matching {
            assert_eq!(refusal(&n, &affinity(terms.clone())), None, "{terms}");
        }
        let refused = [
            serde_json::json!([{ "matchExpressions": [{ "key": "zone", "operator": "In", "values": ["b"] }] }]),
            serde_json::json!([{ "matchExpressions": [{ "key": "gpus", "operator": "Lt", "values": ["2"] }] }]),
            serde_json::json!([{ "matchExpressions": [{ "key": "gpus", "operator": "Gt", "values": ["many"] }] }]),
            serde_json::json!([{ "matchFields": [{ "key": "metadata.name", "operator": "NotIn", "values": ["n1"] }] }]),
            // Expressions in one term are ANDed; an empty term matches nothing.
            serde_json::json!([{ "matchExpressions": [
                { "key": "zone", "operator": "Exists" }, { "key": "ssd", "operator": "Exists" }] }]),
            serde_json::json!([{}]),
        ];
        for terms in refused {
            assert!(refusal(&n, &affinity(terms.clone())).is_some(), "{terms}");
        }
    }

    #[test]
    fn assignment_spreads_over_the_emptiest_nodes_within_their_slots() {
        let rooms = vec![
            Room { node: "b".into(), pool_pods: 0, free_slots: Some(1) },
            Room { node: "a".into(), pool_pods: 2, free_slots: None },
            Room { node: "c".into(), pool_pods: 1, free_slots: Some(5) },
        ];
        assert_eq!(assign(rooms.clone(), 4), ["b", "c", "a", "c"]);
        let full = vec![Room { node: "a".into(), pool_pods: 0, free_slots: Some(1) }];
        assert_eq!(assign(full, 3), ["a"]);
    }

    #[test]
    fn rooms_count_known_pods_against_allocatable_and_explain_an_empty_set() {
        let nodes = [
            node(serde_json::json!({})),
            node(serde_json::json!({ "metadata": { "name": "n2", "labels": { "zone": "b" } } })),
        ];
        let template = spec(serde_json::json!({ "nodeSelector": { "zone": "a" } }));
        let pool = HashMap::from([("n1".to_string(), 1)]);
        let known = HashMap::from([("n1".to_string(), 2)]);
        let rooms = rooms(&nodes, &template, &pool, &known).unwrap();
        assert_eq!(rooms, [Room { node: "n1".into(), pool_pods: 1, free_slots: Some(1) }]);

        let nowhere = spec(serde_json::json!({ "nodeSelector": { "zone": "z" } }));
        let error = super::rooms(&nodes, &nowhere, &pool, &known).unwrap_err();
        assert!(error.starts_with("no node of 2 may take the pool's pods"), "{error}");
        assert!(error.contains("n2: nodeSelector zone=z does not match"), "{error}");
        assert_eq!(super::rooms([], &nowhere, &pool, &known).unwrap_err(), "no nodes in the cluster");
    }
}
