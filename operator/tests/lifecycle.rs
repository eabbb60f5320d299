//! The operator's core job on a real control plane: pools fill and refill,
//! sessions bind to one warm pod each, expire, heal, and go.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Cluster, TOKEN, post_session};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use tidepool_crds::TestSession;
use tidepool_crds::test_session::Phase;
use tidepool_tests::eventually;
use tidepool_wire::token::PoolPublicKey;

fn env_of(pod: &Pod, name: &str) -> Option<String> {
    pod.spec.as_ref()?.containers[0].env.as_ref()?.iter().find(|e| e.name == name)?.value.clone()
}

async fn pool_pods(client: &kube::Client, pool: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let listed = pods.list(&ListParams::default().labels(&format!("tidepool.dev/pool={pool}"))).await.unwrap();
    listed.items.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_fills_binds_refills_expires_heals_rolls_and_scales() {
    let cluster = Cluster::start(2).await;
    let operator = cluster.operator("operator-0", &["--result-retention-seconds=3"]).await;
    cluster.pool("edge", 3).await;
    let pool = cluster.wait_warm("edge", 3, Duration::from_secs(60)).await;
    let status = pool.status.unwrap();
    assert_eq!(status.selector.as_deref(), Some("tidepool.dev/pool=edge"));
    assert!(status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    assert_eq!(pool_pods(&cluster.client, "edge").await.len(), 3);

    // A session is bound to one warm pod and gets its endpoint and credentials.
    let (code, body) = post_session(&operator, json!({ "pool": "edge", "profile": "latency" })).await;
    assert_eq!(code, 201, "{body}");
    let pod_name = body["pod"].as_str().unwrap().to_string();
    let session_name = body["name"].as_str().unwrap().to_string();
    assert!(body["endpoint"].as_str().unwrap().starts_with("http://127."), "{body}");
    assert!(body["endpoint"].as_str().unwrap().ends_with(":9000"), "{body}");
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let pod = pods.get(&pod_name).await.unwrap();
    assert_eq!(pod.labels()["tidepool.dev/state"], "assigned");
    assert_eq!(pod.labels()["tidepool.dev/session"], session_name);
    // The pod can check the client's credentials with the key it was given.
    let public = PoolPublicKey::from_base64(&env_of(&pod, "TIDEPOOL_POOL_PUBLIC_KEY").unwrap()).unwrap();
    let claims = public.verify_session(body["token"].as_str().unwrap(), 0).unwrap();
    assert_eq!(claims.name, session_name);
    assert_eq!(claims.profile, "latency");
    public.verify_binding(body["binding"].as_str().unwrap(), &claims.sid, &pod_name).unwrap();

    // The pool refills behind the assignment.
    cluster.wait_counts("edge", 3, 1, Duration::from_secs(30)).await;

    // The session heals: its pod dies, it is rebound to a fresh pod, and the
    // same token still verifies there.
    pods.delete(&pod_name, &DeleteParams::default()).await.unwrap();
    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");
    let healed = eventually(Duration::from_secs(30), "the session to be rebound", || async {
        let s = sessions.get(&session_name).await.ok()?;
        let st = s.status?;
        (st.phase == Phase::Ready && st.pod.as_deref() != Some(pod_name.as_str())).then_some(st)
    })
    .await
    .unwrap();
    let new_pod = pods.get(healed.pod.as_deref().unwrap()).await.unwrap();
    assert_eq!(new_pod.labels()["tidepool.dev/session"], session_name);
    assert!(healed.conditions.iter().any(|c| c.type_ == "Bound" && c.reason == "Rebound"));
    let http = reqwest::Client::new();
    let again: serde_json::Value = http
        .get(format!("{}/api/v1/sessions/{session_name}", operator.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(again["token"], body["token"], "the session token survives a rebind");
    public.verify_binding(again["binding"].as_str().unwrap(), &claims.sid, &new_pod.name_any()).unwrap();

    // Deleting the session releases (deletes) its pod, and the pool refills.
    let response = http
        .delete(format!("{}/api/v1/sessions/{session_name}", operator.url))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 204);
    let released = new_pod.name_any();
    eventually(Duration::from_secs(30), "the released pod to go", || async {
        pods.get_opt(&released).await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap();
    let pools: Api<tidepool_crds::WarmPool> = Api::namespaced(cluster.client.clone(), "default");
    eventually(Duration::from_secs(30), "3 warm and none assigned", || async {
        let status = pools.get("edge").await.ok()?.status?;
        (status.warm == 3 && status.assigned == 0).then_some(())
    })
    .await
    .unwrap();

    // A TTL ends a session: Expired, its pod deleted.
    let (code, body) = post_session(&operator, json!({ "pool": "edge", "ttlSeconds": 2 })).await;
    assert_eq!(code, 201, "{body}");
    let short = body["name"].as_str().unwrap().to_string();
    let short_pod = body["pod"].as_str().unwrap().to_string();
    eventually(Duration::from_secs(20), "the session to expire", || async {
        let s = sessions.get(&short).await.ok()?;
        (s.status?.phase == Phase::Expired).then_some(())
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(20), "the expired session's pod to go", || async {
        pods.get_opt(&short_pod).await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap();
    // Its results stay readable for the retention time, then the session goes.
    assert!(sessions.get_opt(&short).await.unwrap().is_some());
    eventually(Duration::from_secs(20), "the finished session to be retired", || async {
        sessions.get_opt(&short).await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap();

    // A template change rolls the warm pods and leaves an assigned one alone.
    let (code, body) = post_session(&operator, json!({ "pool": "edge" })).await;
    assert_eq!(code, 201, "{body}");
    let kept = body["pod"].as_str().unwrap().to_string();
    let old_hash = pods.get(&kept).await.unwrap().labels()["tidepool.dev/template-hash"].clone();
    let change = json!({ "spec": { "template": { "metadata": { "labels": { "release": "2" } } } } });
    pools.patch("edge", &PatchParams::default(), &Patch::Merge(&change)).await.unwrap();
    eventually(Duration::from_secs(60), "the warm pods to be on the new template", || async {
        let pods = pool_pods(&cluster.client, "edge").await;
        let warm: Vec<&Pod> = pods.iter().filter(|p| p.labels()["tidepool.dev/state"] == "warm").collect();
        (warm.len() == 3 && warm.iter().all(|p| p.labels().get("release").map(String::as_str) == Some("2")))
            .then_some(())
    })
    .await
    .unwrap();
    let still = pods.get(&kept).await.unwrap();
    assert_eq!(still.labels()["tidepool.dev/template-hash"], old_hash, "the assigned pod was left alone");

    // kubectl scale sets the size, and the pool follows.
    let out = cluster.plane.kubectl().args(["scale", "wp/edge", "--replicas=5"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    cluster.wait_warm("edge", 5, Duration::from_secs(30)).await;
    let out = cluster.plane.kubectl().args(["scale", "wp/edge", "--replicas=1"]).output().unwrap();
    assert!(out.status.success());
    cluster.wait_warm("edge", 1, Duration::from_secs(30)).await;
    let names: HashSet<String> = pool_pods(&cluster.client, "edge").await.iter().map(|p| p.name_any()).collect();
    assert!(names.contains(&kept), "scaling down kept the assigned pod");
    drop(operator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_can_put_its_pods_on_nodes_itself() {
    let cluster = Cluster::start(3).await;
    let operator = cluster.operator("operator-0", &[]).await;
    let pools: Api<tidepool_crds::WarmPool> = Api::namespaced(cluster.client.clone(), "default");
    let pool = |template_spec: serde_json::Value| {
        json!({
            "apiVersion": "tidepool.dev/v1alpha1", "kind": "WarmPool",
            "metadata": { "name": "direct" },
            "spec": {
                "size": 4, "tier": { "vcpu": 1, "memoryMiB": 64 }, "nodeAssignment": "Operator",
                "template": { "spec": template_spec }
            }
        })
    };
    let containers = json!([{ "name": "session", "image": "tidepool/session:test" }]);
    let apply = PatchParams::apply("test").force();

    // Rules the operator does not evaluate are refused at admission.
    let spread = json!({ "containers": containers, "topologySpreadConstraints": [{
        "maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule" }] });
    let gated = json!({ "containers": containers, "schedulingGates": [{ "name": "example.com/wait" }] });
    for template in [spread, gated] {
        let refused = pools.patch("direct", &apply, &Patch::Apply(&pool(template))).await.unwrap_err();
        let message = refused.to_string();
        assert!(message.contains("nodeAssignment Operator places pods by their node rules alone"), "{message}");
    }

    // Node affinity keeps node-0 out; the pods spread over the other two.
    let not_node_0 = json!({ "containers": containers, "affinity": { "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": { "nodeSelectorTerms": [{ "matchExpressions": [
            { "key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-0"] }] }] } } } });
    pools.patch("direct", &apply, &Patch::Apply(&pool(not_node_0))).await.unwrap();
    cluster.wait_warm("direct", 4, Duration::from_secs(60)).await;
    let mut per_node = std::collections::BTreeMap::new();
    for pod in pool_pods(&cluster.client, "direct").await {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap();
        *per_node.entry(node).or_insert(0) += 1;
    }
    assert_eq!(per_node, [("node-1".to_string(), 2), ("node-2".to_string(), 2)].into());

    // A session binds to one of them as to any warm pod.
    let (code, body) = post_session(&operator, json!({ "pool": "direct" })).await;
    assert_eq!(code, 201, "{body}");
    assert!(["node-1", "node-2"].contains(&body["node"].as_str().unwrap()), "{body}");
    cluster.wait_counts("direct", 4, 1, Duration::from_secs(30)).await;

    // A template no node matches: the pool says why and keeps the pods it has.
    let nowhere = json!({ "containers": containers, "nodeSelector": { "zone": "nowhere" } });
    pools.patch("direct", &apply, &Patch::Apply(&pool(nowhere))).await.unwrap();
    let degraded = eventually(Duration::from_secs(30), "the pool to say no node fits", || async {
        let status = pools.get("direct").await.ok()?.status?;
        status.conditions.into_iter().find(|c| c.type_ == "Degraded" && c.status == "True" && c.reason == "NoNodeFits")
    })
    .await
    .unwrap();
    assert!(degraded.message.contains("no node of 3 may take the pool's pods"), "{}", degraded.message);
    assert!(degraded.message.contains("nodeSelector zone=nowhere does not match"), "{}", degraded.message);
    assert_eq!(pool_pods(&cluster.client, "direct").await.len(), 5, "the warm pods and the assigned one stay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_that_cannot_make_pods_says_why() {
    let cluster = Cluster::start(1).await;
    let _operator = cluster.operator("operator-0", &[]).await;
    let pools: Api<tidepool_crds::WarmPool> = Api::namespaced(cluster.client.clone(), "default");
    // The CRD accepts any container; the API server refuses pods with this name.
    let pool = json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "WarmPool",
        "metadata": { "name": "broken" },
        "spec": {
            "size": 2, "tier": { "vcpu": 1, "memoryMiB": 64 },
            "template": { "spec": { "containers": [{ "name": "Not_A_DNS_Label", "image": "x" }] } }
        }
    });
    pools.patch("broken", &PatchParams::apply("test").force(), &Patch::Apply(&pool)).await.unwrap();
    let degraded = eventually(Duration::from_secs(30), "the pool to be Degraded", || async {
        let status = pools.get("broken").await.ok()?.status?;
        status.conditions.into_iter().find(|c| c.type_ == "Degraded" && c.status == "True")
    })
    .await
    .unwrap();
    assert_eq!(degraded.reason, "CreateFailed");
    assert!(degraded.message.contains("Not_A_DNS_Label"), "{}", degraded.message);
    let events = cluster
        .plane
        .kubectl()
        .args(["get", "events", "--field-selector", "involvedObject.name=broken"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&events.stdout).contains("CreateFailed"),
        "{}",
        String::from_utf8_lossy(&events.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_pod_claimed_for_one_session_is_let_go() {
    let cluster = Cluster::start(1).await;
    let operator = cluster.operator("operator-0", &[]).await;
    cluster.pool("edge", 3).await;
    cluster.wait_warm("edge", 3, Duration::from_secs(60)).await;
    let (code, body) = post_session(&operator, json!({ "pool": "edge" })).await;
    assert_eq!(code, 201, "{body}");
    let name = body["name"].as_str().unwrap().to_string();
    let kept = body["pod"].as_str().unwrap().to_string();
    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");
    let uid = sessions.get(&name).await.unwrap().uid().unwrap();

    // As if a claim had been applied but its answer lost: a second warm pod
    // carries the same session's claim.
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let spare = pool_pods(&cluster.client, "edge")
        .await
        .into_iter()
        .find(|p| p.labels()["tidepool.dev/state"] == "warm")
        .unwrap()
        .name_any();
    let claim = json!({ "metadata": {
        "labels": { "tidepool.dev/state": "assigned", "tidepool.dev/session": name },
        "annotations": { "tidepool.dev/session-uid": uid },
    } });
    pods.patch(&spare, &PatchParams::default(), &Patch::Merge(&claim)).await.unwrap();
    eventually(Duration::from_secs(30), "the second claimed pod to go", || async {
        pods.get_opt(&spare).await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap();
    let session = sessions.get(&name).await.unwrap();
    assert_eq!(session.status.unwrap().pod.as_deref(), Some(kept.as_str()), "the session kept its pod");
    assert!(pods.get_opt(&kept).await.unwrap().is_some());
}
