//! Crashes and failover: `kill -9` of the operator under steady load leaves
//! every binding sound, and with two replicas a killed leader is replaced
//! within the lease duration plus 2 s.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::Cluster;
use k8s_openapi::api::coordination::v1::Lease;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use tidepool_crds::TestSession;
use tidepool_crds::test_session::Phase;
use tidepool_tests::eventually;

fn session(name: &str, pool: &str, ttl: i64) -> TestSession {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "TestSession",
        "metadata": { "name": name },
        "spec": { "pool": pool, "ttlSeconds": ttl }
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_kill_nines_under_load_leave_every_binding_sound() {
    let cluster = Cluster::start(2).await;
    // The pause between claim and status write makes some kills land between the two writes.
    let flags = ["--fault-claim-delay-ms=150", "--create-batch=20"];
    let mut operator = cluster.operator("operator-0", &flags).await;
    cluster.pool("churn", 10).await;
    cluster.wait_warm("churn", 10, Duration::from_secs(60)).await;

    // Steady load: a session every 100 ms, short TTLs, some deleted early.
    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");
    let stop = Arc::new(AtomicBool::new(false));
    let created = Arc::new(AtomicU32::new(0));
    let load = {
        let (sessions, stop, created) = (sessions.clone(), stop.clone(), created.clone());
        tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let name = format!("load-{i:04}");
                if sessions.create(&PostParams::default(), &session(&name, "churn", 3 + i64::from(i % 4))).await.is_ok()
                {
                    created.fetch_add(1, Ordering::Relaxed);
                }
                if i % 5 == 4 {
                    let _ = sessions.delete(&format!("load-{:04}", i - 2), &DeleteParams::default()).await;
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let mut adopted = 0;
    for kill in 0..20u64 {
        tokio::time::sleep(Duration::from_millis(300 + (kill * 137) % 500)).await;
        adopted += operator.process.log_tail(10_000).matches("adopting a pod claimed earlier").count();
        operator.process.kill();
        let problems = common::invariants::violations(&cluster.client, "default", false).await;
        assert!(problems.is_empty(), "after kill {kill}: {problems:#?}");
        // Creation never overshoots by more than one batch, also across restarts:
        // unassigned pods stay within size + waiting sessions + one batch.
        let (unassigned, waiting) = unassigned_and_waiting(&cluster.client).await;
        assert!(unassigned <= 10 + waiting + 20, "after kill {kill}: {unassigned} unassigned pods, {waiting} waiting");
        // The same identity: a restarted pod takes its own lease back at once.
        operator = cluster.operator("operator-0", &flags).await;
    }
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert!(created.load(Ordering::Relaxed) > 50, "the load generator made too few sessions");

    // Once things settle, every binding is sound and nothing accepted is lost:
    // every session is Ready or has ended, none is stuck.
    let settled = eventually(Duration::from_secs(60), "the cluster to settle", || async {
        let all = sessions.list(&ListParams::default()).await.ok()?.items;
        let stuck: Vec<String> = all
            .iter()
            .filter(|s| !matches!(s.status.as_ref().map(|st| st.phase), Some(Phase::Ready | Phase::Expired)))
            .map(|s| s.name_any())
            .collect();
        if !stuck.is_empty() {
            return None;
        }
        let problems = common::invariants::violations(&cluster.client, "default", true).await;
        problems.is_empty().then_some(all.len())
    })
    .await;
    if let Err(e) = settled {
        let problems = common::invariants::violations(&cluster.client, "default", true).await;
        panic!("{e}: {problems:#?}\n{}", operator.process.log_tail(40));
    }
    adopted += operator.process.log_tail(10_000).matches("adopting a pod claimed earlier").count();
    assert!(adopted > 0, "no kill landed between a claim and its status write; the test did not test that");
}

/// Live unassigned pods of the pool, and sessions waiting for a pod.
async fn unassigned_and_waiting(client: &kube::Client) -> (usize, usize) {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), "default");
    let pods =
        pods.list(&ListParams::default().labels("tidepool.dev/pool=churn,tidepool.dev/state=warm")).await.unwrap();
    let unassigned = pods.items.iter().filter(|p| p.metadata.deletion_timestamp.is_none()).count();
    let sessions: Api<TestSession> = Api::namespaced(client.clone(), "default");
    let waiting = sessions
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|s| s.status.as_ref().is_none_or(|st| st.phase == Phase::Pending))
        .count();
    (unassigned, waiting)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_within_the_lease_duration_plus_two_seconds() {
    let cluster = Cluster::start(1).await;
    let mut a = cluster.operator("replica-a", &[]).await;
    let b = cluster.operator("replica-b", &[]).await;
    cluster.pool("edge", 3).await;
    cluster.wait_warm("edge", 3, Duration::from_secs(60)).await;

    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), "default");
    let holder = |lease: Lease| lease.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    let leader = holder(leases.get("tidepool-operator").await.unwrap());
    assert_eq!(leader, "replica-a", "the first replica leads");

    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");
    a.process.kill();
    let killed = Instant::now();
    sessions.create(&PostParams::default(), &session("after-failover", "edge", 300)).await.unwrap();
    eventually(Duration::from_secs(15), "the session made after the kill to be Ready", || async {
        let s = sessions.get("after-failover").await.ok()?;
        (s.status?.phase == Phase::Ready).then_some(())
    })
    .await
    .unwrap();
    let took = killed.elapsed();
    let lease_seconds = 3;
    assert!(
        took <= Duration::from_secs(lease_seconds + 2),
        "assignments resumed {took:?} after the leader died (lease {lease_seconds} s)"
    );
    assert_eq!(holder(leases.get("tidepool-operator").await.unwrap()), "replica-b");
    drop(b);
}
