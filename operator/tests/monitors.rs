//! Monitors on the harness: the operator makes each run a TestSession, the
//! real session pod behind its kwok pod runs the probes against a target on
//! loopback, and the monitor carries the tier from run to run.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::Cluster;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use tidepool_crds::monitor::RunResult;
use tidepool_crds::{Monitor, TestSession};
use tidepool_tests::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// An HTTP target on loopback that answers after 0.8 s while `slow` is set
/// (over the monitor's own 0.5 s rule, under the pods' default 2 s), at
/// once otherwise.
async fn target(slow: Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let slow = slow.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 2048];
                let _ = stream.read(&mut request).await;
                if slow.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(800)).await;
                }
                let answer = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    url
}

fn status(monitor: &Monitor) -> tidepool_crds::MonitorStatus {
    monitor.status.clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_monitor_runs_on_schedule_carries_its_tier_and_keeps_its_history() {
    let cluster = Cluster::start(1).await;
    let operator = cluster.operator("operator-0", &[]).await;
    let runner = cluster.session_pods("probers");
    // A pool whose pods may probe this machine's loopback, where the target listens.
    let pools: Api<tidepool_crds::WarmPool> = Api::namespaced(cluster.client.clone(), "default");
    let pool = json!({
        "apiVersion": tidepool_crds::API_VERSION, "kind": "WarmPool",
        "metadata": { "name": "probers" },
        "spec": {
            "size": 2, "tier": { "vcpu": 1, "memoryMiB": 64 },
            "egress": { "allow": [{ "cidr": "127.0.0.0/8" }] },
            "template": { "spec": { "containers": [{ "name": "session", "image": "tidepool/session:test" }] } }
        }
    });
    pools.patch("probers", &PatchParams::apply("test").force(), &Patch::Apply(&pool)).await.unwrap();
    cluster.wait_warm("probers", 2, Duration::from_secs(30)).await;
    eventually(Duration::from_secs(20), "a session pod process behind each pod", || async {
        (runner.running().len() == 2).then_some(())
    })
    .await
    .unwrap();

    let slow = Arc::new(AtomicBool::new(true));
    let url = target(slow.clone()).await;
    let monitors: Api<Monitor> = Api::namespaced(cluster.client.clone(), "default");
    let monitor = json!({
        "apiVersion": tidepool_crds::API_VERSION, "kind": "Monitor",
        "metadata": { "name": "edge-watch" },
        "spec": {
            "pool": "probers", "schedule": "@every 10s",
            "probes": [{ "type": "http", "url": url }],
            "successfulRunsHistoryLimit": 2,
            "thresholds": { "httpTotalMs": 500 }
        }
    });
    monitors.patch("edge-watch", &PatchParams::apply("test").force(), &Patch::Apply(&monitor)).await.unwrap();
    let runs_at_least = |count: usize| {
        let monitors = monitors.clone();
        async move {
            eventually(Duration::from_secs(45), &format!("{count} runs recorded"), || async {
                let monitor = monitors.get("edge-watch").await.ok()?;
                (status(&monitor).runs.len() >= count).then_some(monitor)
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"))
        }
    };

    // Run 1: the slow answer trips the monitor's own rule (the pods' default
    // would not), takes the run from tier 1 to 2, and the next run starts there.
    let first = runs_at_least(1).await;
    let run = &status(&first).runs[0];
    assert_eq!((run.start_tier, run.end_tier, run.result), (1, 2, RunResult::Succeeded), "{run:?}");
    assert!(run.reasons.iter().any(|r| r.starts_with("tier 1: HTTP total") && r.ends_with("> 500 ms")), "{run:?}");
    assert_eq!(status(&first).current_tier, 2);
    assert!(status(&first).next_run_at.is_some());
    let ready = status(&first).conditions.into_iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "Scheduled"));
    // Its session is the monitor's, and completed with the results.
    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");
    let session = sessions.get(&run.session).await.unwrap();
    assert_eq!(session.owner_references()[0].name, "edge-watch");
    let results = session.status.unwrap().results.unwrap();
    assert!(results.is_final && results.probes.iter().any(|p| p.tier == 2), "{results:?}");

    // Run 2 starts in tier 2; the line is still slow, so tier 2 holds.
    let second = runs_at_least(2).await;
    let run = &status(&second).runs[0];
    assert_eq!((run.start_tier, run.end_tier), (2, 2), "{run:?}");
    assert_eq!(status(&second).current_tier, 2);

    // The line recovers: the next run in tier 2 finds nothing that calls
    // for it, and the tier comes down.
    slow.store(false, Ordering::Relaxed);
    let third = eventually(Duration::from_secs(45), "the tier to come down", || async {
        let monitor = monitors.get("edge-watch").await.ok()?;
        (status(&monitor).current_tier == 1).then_some(monitor)
    })
    .await
    .unwrap();
    let run = &status(&third).runs[0];
    assert_eq!((run.start_tier, run.end_tier, run.result), (2, 2, RunResult::Succeeded), "{run:?}");
    // Runs never overlapped: each started after the one before it was recorded.
    let mut scheduled: Vec<_> = status(&third).runs.iter().filter_map(|r| r.scheduled_at.clone()).collect();
    scheduled.dedup();
    assert_eq!(scheduled.len(), status(&third).runs.len(), "two runs for one time: {:?}", status(&third).runs);

    // History: two finished runs are kept, the older sessions deleted.
    eventually(Duration::from_secs(20), "the history limit to prune old runs", || async {
        let owned = sessions.list(&ListParams::default().labels("tidepool.dev/monitor=edge-watch")).await.ok()?;
        let finished = owned.items.iter().filter(|s| s.status.as_ref().is_some_and(|s| s.phase.has_ended())).count();
        (finished <= 2).then_some(())
    })
    .await
    .unwrap();

    // Prometheus sees it.
    let metrics = reqwest::get(format!("{}/metrics", operator.url)).await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"tidepool_monitor_runs_total{monitor="edge-watch",namespace="default",result="Succeeded"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"tidepool_monitor_tier{monitor="edge-watch",namespace="default"} 1"#));

    // A schedule the API server takes but no clock has: the monitor says so and makes nothing.
    let broken = json!({
        "apiVersion": tidepool_crds::API_VERSION, "kind": "Monitor",
        "metadata": { "name": "broken" },
        "spec": { "pool": "probers", "schedule": "61 * * * *", "probes": [{ "type": "dns", "host": "localhost" }] }
    });
    monitors.patch("broken", &PatchParams::apply("test").force(), &Patch::Apply(&broken)).await.unwrap();
    let condition = eventually(Duration::from_secs(15), "the broken monitor to say why", || async {
        let monitor = monitors.get("broken").await.ok()?;
        status(&monitor).conditions.into_iter().find(|c| c.type_ == "Ready" && c.status == "False")
    })
    .await
    .unwrap();
    assert_eq!(condition.reason, "InvalidSchedule");
    assert!(condition.message.contains("minute"), "{}", condition.message);
    // And schedules that are not a schedule at all are refused at the door.
    let mut bad = broken.clone();
    bad["metadata"]["name"] = json!("worse");
    bad["spec"]["schedule"] = json!("every five minutes please");
    let refused = monitors.patch("worse", &PatchParams::apply("test").force(), &Patch::Apply(&bad)).await.unwrap_err();
    assert!(refused.to_string().contains("spec.schedule is five cron fields"), "{refused}");
    drop(runner);
}
