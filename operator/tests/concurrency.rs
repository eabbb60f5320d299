//! Many sessions at once: each gets its own pod.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::Cluster;
use futures::future::join_all;
use kube::ResourceExt;
use kube::api::{Api, ListParams, PostParams};
use tidepool_crds::TestSession;
use tidepool_crds::test_session::Phase;
use tidepool_tests::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_sessions_at_once_get_two_hundred_distinct_pods() {
    let cluster = Cluster::start(2).await;
    // One replica, so no failover to hurry: a lease that outlasts the API
    // server's slowest answer under this burst on a busy machine. With the
    // tests' usual 3 s (a 2 s renew deadline) it was missed once in CI, and
    // the operator exited as it should, leaving half the sessions unbound.
    let operator = cluster.operator("operator-0", &["--create-batch=100", "--lease-seconds=15"]).await;
    cluster.pool("big", 200).await;
    cluster.wait_warm("big", 200, Duration::from_secs(120)).await;

    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");
    let creates = (0..200).map(|i| {
        let sessions = sessions.clone();
        async move {
            let session: TestSession = serde_json::from_value(serde_json::json!({
                "apiVersion": "tidepool.dev/v1alpha1", "kind": "TestSession",
                "metadata": { "name": format!("burst-{i:03}") },
                "spec": { "pool": "big" }
            }))
            .unwrap();
            sessions.create(&PostParams::default(), &session).await.unwrap()
        }
    });
    join_all(creates).await;
    let ready = eventually(Duration::from_secs(120), "200 Ready sessions", || async {
        let all = sessions.list(&ListParams::default()).await.ok()?.items;
        let ready: Vec<TestSession> =
            all.into_iter().filter(|s| s.status.as_ref().is_some_and(|st| st.phase == Phase::Ready)).collect();
        (ready.len() == 200).then_some(ready)
    })
    .await;
    let ready = match ready {
        Ok(ready) => ready,
        Err(e) => {
            // Say where the sessions stopped, and what the operator said.
            let all = sessions.list(&ListParams::default()).await.map(|l| l.items).unwrap_or_default();
            let mut waiting = std::collections::BTreeMap::<String, usize>::new();
            for session in &all {
                let status = session.status.clone().unwrap_or_default();
                let why = status.conditions.iter().find(|c| c.type_ == "Bound").map(|c| c.reason.clone());
                *waiting.entry(format!("{} {}", status.phase, why.unwrap_or_default())).or_default() += 1;
            }
            panic!("{e}\nsessions by phase and reason: {waiting:?}\n{}", operator.process.log_tail(60));
        }
    };
    let pods: HashSet<String> = ready.iter().filter_map(|s| s.status.as_ref()?.pod.clone()).collect();
    assert_eq!(pods.len(), 200, "some sessions share a pod");
    let problems = common::invariants::violations(&cluster.client, "default", true).await;
    assert!(problems.is_empty(), "{problems:#?}");
    // Every pod is claimed by the session that names it.
    let pod_api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(cluster.client.clone(), "default");
    for session in ready.iter().take(20) {
        let pod = pod_api.get(session.status.as_ref().unwrap().pod.as_deref().unwrap()).await.unwrap();
        assert_eq!(pod.labels()["tidepool.dev/session"], session.name_any());
    }
}
