//! 1,000 Monitors on a one-minute schedule, against 1,000 CronJobs on the
//! same schedule (Kubernetes' own "a resource that makes runs on a clock").
//!
//! `cargo bench -p tidepool-operator --bench monitors` starts the harness
//! (kwok nodes, etcd with fsync on, the API server's audit log), then, one
//! after the other in the same run:
//!
//! - 1,000 Monitors (`* * * * *`, one TCP probe each) over a WarmPool of
//!   1,000: every run is a TestSession that takes a warm pod, the operator
//!   calls the pod (a kwok pod: nobody answers, so the run fails at once,
//!   completes its session and frees the pod), and records it;
//! - 1,000 CronJobs (`* * * * *`, `concurrencyPolicy: Forbid`, a Job whose
//!   pod is ended by `activeDeadlineSeconds: 20`).
//!
//! For each, over TIDEPOOL_BENCH_MINUTES (default 3) whole minutes after a
//! first minute of warm-up: runs (or Jobs) made per minute, CPU seconds per
//! minute of the process that drives them (the operator; the
//! controller-manager and the scheduler) and of the API server and etcd,
//! each above what it used idle, the driver's peak RSS, and its API writes
//! per minute from the audit log.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;
use tidepool_crds::Monitor;
use tidepool_tests::{ControlPlane, FakeNode, Options, eventually, free_port};

const MONITORS: usize = 1_000;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let minutes: u64 = std::env::var("TIDEPOOL_BENCH_MINUTES").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let nodes = (0..4).map(|i| FakeNode::new(&format!("node-{i}")).pods(2000)).collect();
    let plane = ControlPlane::start_with(Options { fsync: true, audit: true, nodes, ..Options::default() })
        .await
        .expect("control plane");
    let admin = plane.client().await.expect("admin client");
    let kubeconfig = plane.admin_kubeconfig_as("tidepool-operator", plane.server()).expect("operator kubeconfig");
    let port = free_port().expect("port");
    // A longer lease than the default 10 s: filling a pool of 1,000 with
    // etcd syncing every write and the audit log on can hold the API server
    // past the default renew deadline, and a leader that cannot renew exits.
    let args = [format!("--listen=127.0.0.1:{port}"), "--create-batch=100".into(), "--lease-seconds=30".into()];
    let program = std::path::Path::new(env!("CARGO_BIN_EXE_tidepool-operator"));
    let env = [("RUST_LOG", "warn"), ("KUBECONFIG", &kubeconfig.display().to_string())];
    let mut operator = plane.spawn("tidepool-operator", program, &args, &env).expect("operator");
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), "the operator", || async {
        http.get(&metrics_url).send().await.ok()?.status().is_success().then_some(())
    })
    .await
    .expect("operator up");
    let pids: HashMap<String, u32> = plane.pids().into_iter().collect();
    let processes = [
        ("tidepool-operator", operator.pid()),
        ("kube-controller-manager", pids["kube-controller-manager"]),
        ("kube-scheduler", pids["kube-scheduler"]),
        ("kube-apiserver", pids["kube-apiserver"]),
        ("etcd", pids["etcd"]),
    ];
    println!(
        "Tidepool monitors against CronJobs, {MONITORS} each on `* * * * *`, {minutes} min measured, {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // 1. Monitors.
    support::pool(&admin, MONITORS as i32).await;
    let idle = cpu_rates(&processes, Duration::from_secs(20)).await;
    let monitors: Api<Monitor> = Api::namespaced(admin.clone(), "default");
    for i in 0..MONITORS {
        let monitor: Monitor = serde_json::from_value(json!({
            "apiVersion": tidepool_crds::API_VERSION, "kind": "Monitor",
            "metadata": { "name": format!("watch-{i:04}") },
            "spec": {
                "pool": "edge", "schedule": "* * * * *",
                "probes": [{ "type": "tcp", "host": "192.0.2.1", "port": 443 }],
                "successfulRunsHistoryLimit": 1, "failedRunsHistoryLimit": 1
            }
        }))
        .expect("monitor");
        monitors.create(&PostParams::default(), &monitor).await.expect("create monitor");
    }
    let runs = || async {
        let text = http.get(&metrics_url).send().await.ok()?.text().await.ok()?;
        Some(metric_sum(&text, "tidepool_monitor_runs_total"))
    };
    let measured = measure(&plane, &processes, minutes, || async { runs().await.unwrap_or(0.0) }).await;
    if let Err(e) = operator.check_running() {
        panic!("the operator ended during the measurement: {e}");
    }
    report("Monitors", "tidepool-operator", "tidepool-operator", &measured, &idle, minutes);

    // Clean up: the monitors and their runs go, the pool empties.
    monitors.delete_collection(&DeleteParams::background(), &ListParams::default()).await.expect("delete monitors");
    support::pool(&admin, 0).await;
    tokio::time::sleep(Duration::from_secs(30)).await;

    // 2. CronJobs.
    let idle = cpu_rates(&processes, Duration::from_secs(20)).await;
    let cronjob = ApiResource::from_gvk(&GroupVersionKind::gvk("batch", "v1", "CronJob"));
    let cronjobs: Api<DynamicObject> = Api::namespaced_with(admin.clone(), "default", &cronjob);
    for i in 0..MONITORS {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "batch/v1", "kind": "CronJob",
            "metadata": { "name": format!("watch-{i:04}") },
            "spec": {
                "schedule": "* * * * *", "concurrencyPolicy": "Forbid",
                "successfulJobsHistoryLimit": 1, "failedJobsHistoryLimit": 1,
                "jobTemplate": { "spec": {
                    "activeDeadlineSeconds": 20, "backoffLimit": 0,
                    "template": { "spec": {
                        "restartPolicy": "Never",
                        "containers": [{ "name": "probe", "image": "busybox",
                            "resources": { "requests": { "cpu": "1m", "memory": "1Mi" } } }]
                    } }
                } }
            }
        }))
        .expect("cronjob");
        cronjobs.create(&PostParams::default(), &object).await.expect("create cronjob");
    }
    let audit = plane.audit_log();
    let measured = measure(&plane, &processes, minutes, || {
        let audit = audit.clone();
        async move { creates_of(&audit, "jobs") as f64 }
    })
    .await;
    report("CronJobs", "kube-controller-manager", "system:serviceaccount:kube-system:", &measured, &idle, minutes);
    println!(
        "\n(the scheduler places the Jobs' pods: {:.2} CPU s/min above idle; Monitors' pods are placed by the operator)",
        above_idle(&measured, &idle, "kube-scheduler", minutes)
    );
}

/// What one phase measured.
struct Measured {
    /// CPU seconds used in the window, by process.
    cpu: HashMap<&'static str, f64>,
    /// Peak RSS in MiB, by process.
    rss: HashMap<&'static str, f64>,
    /// Runs (or Jobs) made in the window.
    made: f64,
    /// Writes in the window, by user.
    writes: HashMap<String, usize>,
}

/// Waits for the first minute boundary to pass (the warm-up minute), then
/// measures `minutes` whole minutes from the next boundary plus 5 s.
async fn measure<F, Fut>(plane: &ControlPlane, processes: &[(&'static str, u32)], minutes: u64, mut made: F) -> Measured
where
    F: FnMut() -> Fut,
    Fut: Future<Output = f64>,
{
    sleep_to_next_minute().await;
    sleep_to_next_minute().await;
    let start_wall = std::time::SystemTime::now();
    let cpu_before: HashMap<_, _> = processes.iter().map(|(name, pid)| (*name, support::cpu_seconds(*pid))).collect();
    let made_before = made().await;
    let mut rss: HashMap<&'static str, f64> = HashMap::new();
    let end = tokio::time::Instant::now() + Duration::from_secs(60 * minutes);
    while tokio::time::Instant::now() < end {
        for (name, pid) in processes {
            let now = rss_mib(*pid);
            let peak = rss.entry(name).or_insert(0.0);
            *peak = peak.max(now);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let cpu = processes.iter().map(|(name, pid)| (*name, support::cpu_seconds(*pid) - cpu_before[name])).collect();
    let made = made().await - made_before;
    let writes = writes_since(&plane.audit_log(), start_wall, std::time::SystemTime::now());
    Measured { cpu, rss, made, writes }
}

async fn sleep_to_next_minute() {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let into = now.as_secs_f64() % 60.0;
    tokio::time::sleep(Duration::from_secs_f64(60.0 - into + 5.0)).await;
}

fn above_idle(measured: &Measured, idle: &HashMap<&'static str, f64>, process: &str, minutes: u64) -> f64 {
    let used = measured.cpu.get(process).copied().unwrap_or(0.0) / minutes as f64;
    used - idle.get(process).copied().unwrap_or(0.0) * 60.0
}

/// Prints a phase's figures; `users` are the driver's API users (a prefix
/// of their names: the controller-manager's controllers each have their own
/// ServiceAccount).
fn report(what: &str, driver: &str, users: &str, measured: &Measured, idle: &HashMap<&'static str, f64>, minutes: u64) {
    let runs = measured.made / minutes as f64;
    let writes: usize = measured.writes.iter().filter(|(user, _)| user.starts_with(users)).map(|(_, n)| n).sum();
    let writes = writes as f64 / minutes as f64;
    let cpu = above_idle(measured, idle, driver, minutes);
    println!("\n{what}: {runs:.0} runs made per minute");
    println!(
        "  {driver}: {cpu:.2} CPU s/min above idle ({:.1} % of a core; {:.1} ms a run), peak RSS {:.0} MiB, \
         {writes:.0} API writes/min ({:.1} a run)",
        cpu / 60.0 * 100.0,
        cpu / runs * 1e3,
        measured.rss.get(driver).copied().unwrap_or(0.0),
        writes / runs
    );
    for process in ["kube-apiserver", "etcd"] {
        let cpu = above_idle(measured, idle, process, minutes);
        println!("  {process}: {cpu:.2} CPU s/min above idle ({:.1} ms a run)", cpu / runs * 1e3);
    }
}

/// CPU seconds a second each process uses over `window`, idle.
async fn cpu_rates(processes: &[(&'static str, u32)], window: Duration) -> HashMap<&'static str, f64> {
    let before: HashMap<_, _> = processes.iter().map(|(name, pid)| (*name, support::cpu_seconds(*pid))).collect();
    tokio::time::sleep(window).await;
    processes
        .iter()
        .map(|(name, pid)| (*name, (support::cpu_seconds(*pid) - before[name]) / window.as_secs_f64()))
        .collect()
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Writes (create, update, patch, delete) by user, between two times, from the audit log.
fn writes_since(
    audit: &std::path::Path,
    from: std::time::SystemTime,
    to: std::time::SystemTime,
) -> HashMap<String, usize> {
    let (from, to) = (unix(from), unix(to));
    let mut writes = HashMap::new();
    for event in audit_events(audit) {
        let verb = event["verb"].as_str().unwrap_or_default();
        if !matches!(verb, "create" | "update" | "patch" | "delete") {
            continue;
        }
        let at = event["stageTimestamp"].as_str().and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok());
        if at.is_none_or(|at| unix_of(at) < from || unix_of(at) > to) {
            continue;
        }
        let user = event["user"]["username"].as_str().unwrap_or_default().to_string();
        *writes.entry(user).or_insert(0) += 1;
    }
    writes
}

/// Jobs (or any resource) created so far, from the audit log.
fn creates_of(audit: &std::path::Path, resource: &str) -> usize {
    audit_events(audit)
        .filter(|e| {
            e["verb"] == "create" && e["objectRef"]["resource"] == resource && e["responseStatus"]["code"] == 201
        })
        .count()
}

fn audit_events(audit: &std::path::Path) -> impl Iterator<Item = serde_json::Value> {
    let text = std::fs::read_to_string(audit).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).collect::<Vec<_>>().into_iter()
}

fn unix_of(at: k8s_openapi::jiff::Timestamp) -> f64 {
    at.as_millisecond() as f64 / 1e3
}

fn unix(t: std::time::SystemTime) -> f64 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}
