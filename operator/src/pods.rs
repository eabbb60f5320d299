//! What a pod is, as both controllers and the pod index ask: pure
//! predicates over the Pod object.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use tidepool_crds::WarmPool;

use crate::{conditions, labels};

/// Whether a pod is Ready by its conditions.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == conditions::READY && c.status == "True"))
}

/// Whether a pod has stopped for good.
pub fn is_finished(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Failed" | "Succeeded"))
}

/// Whether a pod is being deleted.
pub fn is_terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Whether a pod can still serve: not finished and not being deleted.
pub fn is_alive(pod: &Pod) -> bool {
    !is_finished(pod) && !is_terminating(pod)
}

/// Whether `pod` is owned by this very pool (by UID), not by an older pool
/// of the same name.
pub fn owned_by(pod: &Pod, pool: &WarmPool) -> bool {
    let uid = pool.metadata.uid.as_deref();
    pod.owner_references().iter().any(|o| Some(o.uid.as_str()) == uid)
}

/// The UID of the session that claimed the pod, if one did.
pub fn claimed_by(pod: &Pod) -> Option<&str> {
    pod.annotations().get(labels::SESSION_UID).map(String::as_str)
}

/// Whether the pod is labelled warm (unassigned).
pub fn is_warm(pod: &Pod) -> bool {
    pod.labels().get(labels::STATE).map(String::as_str) == Some(labels::STATE_WARM)
}

/// The node the pod was given, if any.
pub fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

/// `http://<pod IP>:<port>`, the port being the first one the pod's first
/// container names, or `default_port`.
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

/// A stable hash of what a pool's pods are made from (its template, and the
/// egress rules their environment carries): FNV-1a over their JSON, which
/// serialises fields in a fixed order. Pods carry it as a label.
pub fn template_hash(pool: &WarmPool) -> String {
    let mut json = serde_json::to_vec(&pool.spec.template).unwrap_or_default();
    if !pool.spec.egress.is_empty() {
        json.extend(serde_json::to_vec(&pool.spec.egress).unwrap_or_default());
    }
    let hash = json.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    format!("{hash:016x}")
}

/// Whether the pod was made from the pool's current template and key.
pub fn is_current(pod: &Pod, hash: &str, kid: &str) -> bool {
    let labels = pod.labels();
    labels.get(labels::TEMPLATE_HASH).map(String::as_str) == Some(hash)
        && labels.get(labels::KEY_ID).map(String::as_str) == Some(kid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn readiness_life_and_claims_come_from_the_object() {
        let ready = pod(serde_json::json!({
            "metadata": { "name": "a", "annotations": { labels::SESSION_UID: "s1" }, "labels": { labels::STATE: "warm" } },
            "spec": { "containers": [], "nodeName": "n1" },
            "status": { "phase": "Running", "conditions": [{ "type": "Ready", "status": "True" }] }
        }));
        assert!(is_ready(&ready) && is_alive(&ready) && is_warm(&ready));
        assert_eq!((claimed_by(&ready), node_of(&ready)), (Some("s1"), Some("n1")));
        let failed = pod(serde_json::json!({ "metadata": { "name": "b" }, "status": { "phase": "Failed" } }));
        assert!(is_finished(&failed) && !is_alive(&failed) && !is_ready(&failed) && !is_warm(&failed));
        let mut going = ready.clone();
        going.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
        assert!(is_terminating(&going) && !is_alive(&going));
    }

    #[test]
    fn endpoints_use_the_first_port_or_the_default() {
        let with_port = pod(serde_json::json!({
            "spec": { "containers": [{ "name": "s", "ports": [{ "containerPort": 9000 }] }] },
            "status": { "podIP": "10.0.0.7" }
        }));
        assert_eq!(endpoint(&with_port, 8080).as_deref(), Some("http://10.0.0.7:9000"));
        let v6 = pod(serde_json::json!({ "spec": { "containers": [] }, "status": { "podIP": "fd00::7" } }));
        assert_eq!(endpoint(&v6, 8080).as_deref(), Some("http://[fd00::7]:8080"));
        assert_eq!(endpoint(&pod(serde_json::json!({})), 8080), None);
    }
}
