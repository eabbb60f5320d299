//! The whole session path on the harness: the operator, the real session pod
//! running behind each kwok pod of the pool, and the real `tidepool` CLI.
//! The CLI asks the operator for a session, measures against the pod, the
//! pod reports to the operator, and the TestSession ends Completed with the
//! results in its status. Then a pod told to terminate heals onto another.

mod common;

use std::process::Command;
use std::time::Duration;

use common::Cluster;
use kube::api::Api;
use serde_json::Value;
use tidepool_crds::test_session::{Phase, SessionResults};
use tidepool_crds::{TestSession, WarmPool};
use tidepool_tests::{eventually, free_port, workspace_binary};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_runs_a_session_on_a_real_pod_and_the_results_land_in_status() {
    let cluster = Cluster::start(1).await;
    let port = free_port().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let results_url = format!("--results-url={url}");
    let operator = cluster.operator_on("operator-0", port, &[&results_url]).await;
    let cli = workspace_binary("tidepool-cli", "tidepool").unwrap();
    let runner = cluster.session_pods("edge");
    cluster.pool("edge", 2).await;
    cluster.wait_warm("edge", 2, Duration::from_secs(30)).await;
    eventually(Duration::from_secs(20), "a session pod process behind each pod", || async {
        (runner.running().len() == 2).then_some(())
    })
    .await
    .unwrap();

    // `tidepool run` end to end: a session through the operator, the
    // latency profile against the pod, the results submitted as final.
    let token_file = cluster.token_file().display().to_string();
    let base = ["--operator", url.as_str(), "--api-token-file", token_file.as_str(), "--pool", "edge"];
    let output = Command::new(&cli)
        .args(["run"])
        .args(base)
        .args(["--profile", "latency", "--json"])
        .output()
        .expect("running tidepool");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "tidepool run failed ({}): {stdout}\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        operator.process.log_tail(20)
    );
    let report: Value = serde_json::from_str(&stdout).unwrap();
    let printed: SessionResults = serde_json::from_value(report.clone()).unwrap();
    let name = report["name"].as_str().expect("the session's name in the JSON").to_string();
    let pod = report["pod"].as_str().expect("the pod in the JSON").to_string();
    assert!(printed.latency.as_ref().is_some_and(|l| l.samples > 0), "{report}");

    // The pod reported to the operator: the session is Completed, with the
    // same figures and the operator's grades, and its pod was released.
    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");
    let completed = eventually(Duration::from_secs(20), "the session to complete", || async {
        let session = sessions.get(&name).await.ok()?;
        (session.status.as_ref()?.phase == Phase::Completed).then_some(session)
    })
    .await
    .unwrap();
    let status = completed.status.unwrap();
    let stored = status.results.expect("results in status");
    assert!(stored.is_final && stored.reported_at.is_some());
    assert_eq!(stored.latency, printed.latency);
    assert!(stored.grades.as_ref().is_some_and(|g| g.quality_points.is_some()), "{stored:?}");
    assert_eq!(status.pod.as_deref(), Some(pod.as_str()));
    eventually(Duration::from_secs(20), "the completed session's pod to go and the pool to refill", || async {
        let pods = runner.running();
        let pools: Api<WarmPool> = Api::namespaced(cluster.client.clone(), "default");
        let warm = pools.get("edge").await.ok()?.status?.warm;
        (!pods.contains(&pod) && warm == 2).then_some(())
    })
    .await
    .unwrap();

    // `tidepool ping --terminate-after`: the pod ends itself, its process
    // exits, the runner ends its pod, the session heals onto another pod and
    // the CLI goes on with the same token.
    let output = Command::new(&cli)
        .args(["ping"])
        .args(base)
        .args(["--ping-hz", "5", "--terminate-after", "3", "--count", "8", "--json"])
        .output()
        .expect("running tidepool ping");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "tidepool ping failed: {stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<Value> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let answered_by: Vec<&str> =
        lines.iter().filter_map(|l| l["pod"].as_str().filter(|_| l.get("seq").is_some())).collect();
    let healed = lines.iter().find(|l| l.get("healed").is_some()).unwrap_or_else(|| panic!("no heal in {stdout}"));
    let first = answered_by.first().copied().unwrap_or_default();
    let last = answered_by.last().copied().unwrap_or_default();
    assert_ne!(first, last, "the pings were not answered by a new pod after the heal: {stdout}");
    assert_eq!(healed["pod"].as_str(), Some(last), "{stdout}");
}
