//! The harness is a working cluster: the scheduler places pods on kwok's fake
//! nodes, kwok runs them with loopback addresses, the controller-manager
//! collects what an owner leaves behind, and ServiceAccount clients get only
//! their own rights.

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;
use tidepool_tests::{ControlPlane, FakeNode, Options, eventually};

fn in_cidr(ip: &str, cidr: &str) -> bool {
    let (base, bits) = cidr.split_once('/').unwrap();
    let base: Ipv4Addr = base.parse().unwrap();
    let bits: u32 = bits.parse().unwrap();
    let mask = u32::MAX << (32 - bits);
    ip.parse::<Ipv4Addr>().is_ok_and(|ip| u32::from(ip) & mask == u32::from(base) & mask)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_is_scheduled_onto_kwok_nodes_and_runs() {
    let nodes = vec![FakeNode::new("small").cpu("2"), FakeNode::new("gpu").cpu("16").gpus(2)];
    let plane = ControlPlane::start_with(Options { nodes, crds: false, ..Options::default() }).await.unwrap();
    let client = plane.client().await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": { "name": "web" },
        "spec": {
            "replicas": 4,
            "selector": { "matchLabels": { "app": "web" } },
            "template": {
                "metadata": { "labels": { "app": "web" } },
                "spec": { "containers": [{
                    "name": "web", "image": "web:1",
                    "resources": { "requests": { "cpu": "500m" } }
                }] }
            }
        }
    }))
    .unwrap();
    deployments.create(&PostParams::default(), &deployment).await.unwrap();
    eventually(Duration::from_secs(60), "4 ready replicas", || async {
        let d = deployments.get("web").await.ok()?;
        (d.status?.ready_replicas? == 4).then_some(())
    })
    .await
    .unwrap();

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let listed = pods.list(&ListParams::default().labels("app=web")).await.unwrap();
    assert_eq!(listed.items.len(), 4);
    for pod in &listed.items {
        let status = pod.status.as_ref().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        let node = pod.spec.as_ref().unwrap().node_name.as_deref().unwrap();
        assert!(["small", "gpu"].contains(&node), "scheduled onto {node}");
        let ip = status.pod_ip.as_deref().unwrap();
        assert!(in_cidr(ip, plane.pod_cidr()), "pod IP {ip} is outside {}", plane.pod_cidr());
    }

    // A pod asking for a GPU lands only on the node that has GPUs.
    let gpu_pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "trainer" },
        "spec": { "containers": [{
            "name": "t", "image": "t:1",
            "resources": { "limits": { "nvidia.com/gpu": "1" } }
        }] }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &gpu_pod).await.unwrap();
    let node = eventually(Duration::from_secs(30), "the GPU pod to run", || async {
        let p = pods.get("trainer").await.ok()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Running")).then(|| p.spec?.node_name)?
    })
    .await
    .unwrap();
    assert_eq!(node, "gpu");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_owner_garbage_collects_what_it_owns() {
    let plane =
        ControlPlane::start_with(Options { nodes: vec![FakeNode::new("n0")], ..Options::default() }).await.unwrap();
    let client = plane.client().await.unwrap();
    let pools: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "default",
        &ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("tidepool.dev", "v1alpha1", "WarmPool"), "warmpools"),
    );
    let pool: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "WarmPool",
        "metadata": { "name": "owner" },
        "spec": {
            "size": 1, "tier": { "vcpu": 1, "memoryMiB": 64 },
            "template": { "spec": { "containers": [{ "name": "s", "image": "s:1" }] } }
        }
    }))
    .unwrap();
    let pool = pools.create(&PostParams::default(), &pool).await.unwrap();
    let owner = json!([{
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "WarmPool",
        "name": "owner", "uid": pool.metadata.uid.unwrap(), "controller": true
    }]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": "owned-pod", "ownerReferences": owner },
        "spec": { "containers": [{ "name": "s", "image": "s:1" }] }
    }))
    .unwrap();
    let config_map: ConfigMap = serde_json::from_value(json!({
        "metadata": { "name": "owned-config", "ownerReferences": owner }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    config_maps.create(&PostParams::default(), &config_map).await.unwrap();
    eventually(Duration::from_secs(30), "the owned pod to run", || async {
        let p = pods.get("owned-pod").await.ok()?;
        (p.status?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await
    .unwrap();

    pools.delete("owner", &DeleteParams::background()).await.unwrap();
    eventually(Duration::from_secs(60), "the garbage collector to delete the pod and the config map", || async {
        let pod_gone = pods.get_opt("owned-pod").await.ok()?.is_none();
        let config_gone = config_maps.get_opt("owned-config").await.ok()?.is_none();
        (pod_gone && config_gone).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_client_has_only_its_own_rights() {
    let plane = ControlPlane::start_with(Options { nodes: vec![], ..Options::default() }).await.unwrap();
    let limited = plane.service_account_client("tenant", "loadgen").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(limited, "tenant");
    match pods.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 403);
            assert!(status.message.contains("system:serviceaccount:tenant:loadgen"), "{}", status.message);
        }
        other => panic!("a ServiceAccount without RBAC listed pods: {other:?}"),
    }
    // kubectl auth can-i agrees, through the same control plane.
    let out = plane
        .kubectl()
        .args(["auth", "can-i", "list", "pods", "-n", "tenant", "--as=system:serviceaccount:tenant:loadgen"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "no");
}
