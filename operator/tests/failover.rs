//! Leadership and supervision on a real control plane: a leader cut off from
//! the API server stops writing before another replica takes over; the API
//! server or etcd restarted under load loses no session and binds none
//! twice; a supervised task that ends ends its process and gives the lease up.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Cluster;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, PostParams};
use tidepool_crds::TestSession;
use tidepool_crds::test_session::Phase;
use tidepool_tests::{Process, Proxy, eventually, free_port};

const LEASE: &str = "tidepool-operator";

fn session(name: &str, pool: &str, ttl: i64) -> TestSession {
    serde_json::from_value(serde_json::json!({
        "apiVersion": tidepool_crds::API_VERSION, "kind": "TestSession",
        "metadata": { "name": name },
        "spec": { "pool": pool, "ttlSeconds": ttl }
    }))
    .unwrap()
}

async fn lease(client: &kube::Client) -> Option<Lease> {
    Api::<Lease>::namespaced(client.clone(), "default").get_opt(LEASE).await.ok().flatten()
}

fn holder(lease: &Lease) -> Option<String> {
    lease.spec.as_ref().and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty())
}

/// Creates a session every 100 ms until stopped, counting those the API
/// server accepted (creates refused while it is down are not sessions).
struct Load {
    stop: Arc<AtomicBool>,
    created: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(client: &kube::Client, pool: &str, ttl: i64) -> Self {
        let sessions: Api<TestSession> = Api::namespaced(client.clone(), "default");
        let stop = Arc::new(AtomicBool::new(false));
        let created = Arc::new(Mutex::new(Vec::new()));
        let (flag, names, pool) = (stop.clone(), created.clone(), pool.to_string());
        let task = tokio::spawn(async move {
            let mut i = 0u32;
            while !flag.load(Ordering::Relaxed) {
                let name = format!("load-{i:04}");
                let object = session(&name, &pool, ttl);
                let params = PostParams::default();
                let create = sessions.create(&params, &object);
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(2), create).await {
                    names.lock().unwrap().push(name);
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        Self { stop, created, task }
    }

    async fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.created.lock().unwrap().clone()
    }
}

/// Once the load stops: every session the API server accepted is Ready
/// (none is lost), and every binding is sound (none is bound twice).
async fn every_session_bound_once(cluster: &Cluster, created: &[String]) {
    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");
    let settled = eventually(Duration::from_secs(90), "every accepted session to be Ready", || async {
        let all = sessions.list(&ListParams::default()).await.ok()?.items;
        let ready: Vec<&str> = all
            .iter()
            .filter(|s| s.status.as_ref().is_some_and(|st| st.phase == Phase::Ready))
            .map(|s| s.metadata.name.as_deref().unwrap_or(""))
            .collect();
        let missing: Vec<&String> = created.iter().filter(|n| !ready.contains(&n.as_str())).collect();
        if !missing.is_empty() {
            return None;
        }
        let problems = common::invariants::violations(&cluster.client, "default", true).await;
        problems.is_empty().then_some(())
    })
    .await;
    if let Err(e) = settled {
        let problems = common::invariants::violations(&cluster.client, "default", true).await;
        panic!("{e}: {problems:#?}");
    }
}

/// Operator replicas kept running as a Deployment would: one that exits is
/// started again a second later, with the same identity and port.
struct Replicas {
    stop: Arc<AtomicBool>,
    restarts: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Replicas {
    fn keep(cluster: &Cluster, names: &[&str]) -> Self {
        let program = PathBuf::from(env!("CARGO_BIN_EXE_tidepool-operator"));
        let dir = cluster.plane.dir().to_path_buf();
        let kubeconfig = cluster.plane.kubeconfig().display().to_string();
        let specs: Vec<(String, Vec<String>)> = names
            .iter()
            .map(|name| (name.to_string(), cluster.operator_args(name, free_port().unwrap(), &[])))
            .collect();
        let start = move |(name, args): &(String, Vec<String>)| {
            let env = [("KUBECONFIG".to_string(), kubeconfig.clone())];
            Process::spawn_with_env(name, &program, args, &env, &dir).unwrap()
        };
        let mut running: Vec<Process> = specs.iter().map(&start).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let restarts = Arc::new(AtomicU32::new(0));
        let (flag, count) = (stop.clone(), restarts.clone());
        let task = tokio::spawn(async move {
            while !flag.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                for (process, spec) in running.iter_mut().zip(&specs) {
                    if process.exit_status().is_some() {
                        *process = start(spec);
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Self { stop, restarts, task }
    }

    async fn stop(self) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        self.restarts.load(Ordering::Relaxed)
    }
}

/// Kills `component`, starts it again after `down`, and returns when the
/// API server answered again; then a session made after that must be Ready
/// within 5 s of it.
async fn restart_under_load(component: &str) {
    let mut cluster = Cluster::start(2).await;
    let replicas = Replicas::keep(&cluster, &["replica-a", "replica-b"]);
    cluster.pool("steady", 20).await;
    cluster.wait_warm("steady", 20, Duration::from_secs(60)).await;
    let load = Load::start(&cluster.client, "steady", 600);
    tokio::time::sleep(Duration::from_secs(5)).await;

    cluster.plane.kill(component).unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.plane.start_again(component).await.unwrap();
    let answering = Instant::now();
    // The control plane's clients reconnect on their own; ours too.
    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");
    eventually(Duration::from_secs(30), "the API server to take creates again", || async {
        sessions.create(&PostParams::default(), &session("after-restart", "steady", 600)).await.ok()
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(30), "the session made after the restart to be Ready", || async {
        let s = sessions.get("after-restart").await.ok()?;
        (s.status?.phase == Phase::Ready).then_some(())
    })
    .await
    .unwrap();
    let resumed = answering.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut created = load.stop().await;
    created.push("after-restart".into());
    assert!(created.len() > 60, "the load made only {} sessions", created.len());
    every_session_bound_once(&cluster, &created).await;
    let restarts = replicas.stop().await;
    println!(
        "{component}: {} sessions, assignments resumed {resumed:?} after it answered, {restarts} replica restarts",
        created.len()
    );
    assert!(
        resumed <= Duration::from_secs(5),
        "assignments resumed {resumed:?} after the API server answered again ({restarts} replica restarts)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_restarted_under_load_loses_no_session_and_binds_none_twice() {
    restart_under_load("kube-apiserver").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_under_load_loses_no_session_and_binds_none_twice() {
    restart_under_load("etcd").await;
}

/// A write in the audit log.
struct Write {
    user: String,
    received: Timestamp,
    what: String,
}

fn writes(audit_log: &std::path::Path) -> Vec<Write> {
    let text = std::fs::read_to_string(audit_log).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|event| event["verb"].as_str() != Some("get"))
        .filter_map(|event| {
            let received = event["requestReceivedTimestamp"].as_str()?.parse().ok()?;
            let what = format!("{} {}", event["verb"].as_str()?, event["requestURI"].as_str()?);
            Some(Write { user: event["user"]["username"].as_str()?.to_string(), received, what })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_api_server_stops_writing_before_another_takes_over() {
    let cluster = Cluster::start_audited(2).await;
    // Replica A reaches the API server only through a proxy the test freezes.
    let api_server: std::net::SocketAddr = cluster.plane.server().trim_start_matches("https://").parse().unwrap();
    let proxy = Proxy::start(api_server).await.unwrap();
    let through_proxy = cluster.plane.admin_kubeconfig_as("replica-a", &format!("https://{}", proxy.addr())).unwrap();
    let direct = cluster.plane.admin_kubeconfig_as("replica-b", cluster.plane.server()).unwrap();
    let mut a = cluster.operator_with_kubeconfig("replica-a", &through_proxy, &[]).await;
    eventually(Duration::from_secs(15), "replica-a to lead", || async {
        (holder(&lease(&cluster.client).await?)? == "replica-a").then_some(())
    })
    .await
    .unwrap();
    let b = cluster.operator_with_kubeconfig("replica-b", &direct, &[]).await;
    cluster.pool("cut", 10).await;
    cluster.wait_warm("cut", 10, Duration::from_secs(60)).await;
    let load = Load::start(&cluster.client, "cut", 600);
    tokio::time::sleep(Duration::from_secs(2)).await;

    proxy.freeze();
    let taken = eventually(Duration::from_secs(20), "replica-b to take the lease", || async {
        let lease = lease(&cluster.client).await?;
        if holder(&lease)? != "replica-b" {
            return None;
        }
        Some(lease.spec?.acquire_time?.0)
    })
    .await
    .unwrap();
    // The partition heals: whatever A still holds or retries could land now.
    proxy.thaw();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let created = load.stop().await;

    let status = exited(&mut a.process, Duration::from_secs(10)).await.expect("replica-a to exit");
    assert!(!status.success(), "replica-a exited with {status}");
    let log = writes(&cluster.plane.audit_log());
    let before: usize = log.iter().filter(|w| w.user == "replica-a" && w.received < taken).count();
    assert!(before > 0, "replica-a wrote nothing while it led: the test tested nothing");
    let late: Vec<&str> =
        log.iter().filter(|w| w.user == "replica-a" && w.received >= taken).map(|w| w.what.as_str()).collect();
    assert!(late.is_empty(), "replica-a wrote after replica-b took the lease at {taken}: {late:#?}");
    every_session_bound_once(&cluster, &created).await;
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervised_task_that_ends_ends_the_process_and_gives_up_the_lease() {
    let cluster = Cluster::start(1).await;
    for task in ["backend-status", "pod-cache", "testsession-controller", "health-probes"] {
        let mut replica = cluster.operator(task, &[&format!("--fault-end-task={task}")]).await;
        let Some(status) = exited(&mut replica.process, Duration::from_secs(20)).await else {
            panic!("the replica whose {task} ends did not exit:\n{}", replica.process.log_tail(30));
        };
        assert!(!status.success(), "{task}: exited with {status}");
        let log = replica.process.log_tail(50);
        assert!(log.contains("a supervised task ended") && log.contains(task), "{task}:\n{log}");
        let held = lease(&cluster.client).await.and_then(|l| holder(&l));
        assert_eq!(held, None, "{task}: the lease is still held");
    }
}

/// How `process` ended, waiting up to `limit` for it to.
async fn exited(process: &mut Process, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = process.exit_status() {
            return Some(status);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}
