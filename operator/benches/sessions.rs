//! Session assignment benchmark on the real control plane.
//!
//! `cargo bench -p tidepool-operator --bench sessions` starts the harness
//! (kwok nodes, kube-apiserver, etcd with fsync on), runs the operator as a
//! local process, and drives TestSessions from a non-admin ServiceAccount. It
//! prints create-to-Ready as the load generator's own watch sees it, the
//! operator's API writes per session and its 409 count, for: sequential warm
//! assignment, Poisson arrivals at 50/s for 60 s, and a burst of 200.
//! Set TIDEPOOL_BENCH_SECONDS to shorten the Poisson run, and
//! TIDEPOOL_BENCH_NODE_ASSIGNMENT=Scheduler to have the Kubernetes scheduler
//! place the pool's pods (the default here is the pool's `Operator` mode).
//! Set TIDEPOOL_BENCH_TIMELINE=FILE to get every session's timeline as CSV:
//! when its create started, when the create answered, when the watch showed
//! it, and when it showed it Ready (ms from the scenario's first create).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::{Client, ResourceExt};
use tidepool_crds::test_session::Phase;
use tidepool_crds::{TestSession, WarmPool};
use tidepool_tests::control_plane::bin_dir;
use tidepool_tests::{ControlPlane, FakeNode, Options, eventually, free_port};

const NAMESPACE: &str = "bench";

/// What the load generator saw of each session.
#[derive(Default)]
struct Watched {
    started: HashMap<String, Instant>,
    /// When the create request answered, and when the watch first showed the session.
    answered: HashMap<String, Instant>,
    seen: HashMap<String, Instant>,
    ready: HashMap<String, Duration>,
    waited_for_a_pod: usize,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let nodes = (0..4).map(|i| FakeNode::new(&format!("node-{i}")).pods(1000)).collect();
    let plane =
        ControlPlane::start_with(Options { fsync: true, nodes, ..Options::default() }).await.expect("control plane");
    let admin = plane.client().await.expect("admin client");
    let loadgen = loadgen_client(&plane, &admin).await;

    let port = free_port().expect("port");
    let args = [
        format!("--listen=127.0.0.1:{port}"),
        format!("--session-namespace={NAMESPACE}"),
        format!("--namespaces={NAMESPACE}"),
        "--create-batch=100".to_string(),
        "--lease-namespace=tidepool".to_string(),
    ];
    let kubeconfig = operator_kubeconfig(&plane).await;
    let operator = plane
        .spawn(
            "tidepool-operator",
            std::path::Path::new(env!("CARGO_BIN_EXE_tidepool-operator")),
            &args,
            &[("RUST_LOG", "warn"), ("KUBECONFIG", &kubeconfig.display().to_string())],
        )
        .expect("operator");
    let metrics_url = format!("http://127.0.0.1:{port}/metrics");
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), "the operator", || async {
        http.get(&metrics_url).send().await.ok()?.status().is_success().then_some(())
    })
    .await
    .expect("operator up");

    let sessions: Api<TestSession> = Api::namespaced(loadgen.clone(), NAMESPACE);
    let watched = Arc::new(Mutex::new(Watched::default()));
    tokio::spawn(watch_sessions(sessions.clone(), watched.clone()));

    println!(
        "Tidepool session assignment, {} ({} cores), nodeAssignment {}",
        plane.server(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        node_assignment()
    );
    println!(
        "{:<34} {:>6} {:>8} {:>8} {:>8} {:>8} {:>7} {:>5} {:>9}",
        "scenario", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "writes", "409s", "on-demand"
    );

    // Warm-up, not counted: the load generator's watch connects, and the
    // first session goes through every cold path once.
    pool(&admin, 50).await;
    create(&sessions, &watched, "warmup").await;
    wait_ready(&watched, "warmup").await;

    // 1. Sequential warm assignment.
    let before = scrape(&http, &metrics_url).await;
    for i in 0..200 {
        let name = format!("seq-{i:04}");
        create(&sessions, &watched, &name).await;
        wait_ready(&watched, &name).await;
    }
    report("sequential warm", &watched, "seq-", &before, &scrape(&http, &metrics_url).await);
    clean(&sessions, &admin, 50).await;

    // 2. Poisson arrivals at 50/s with the pool kept non-empty.
    let seconds: u64 = std::env::var("TIDEPOOL_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    pool(&admin, 250).await;
    let before = scrape(&http, &metrics_url).await;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let start = Instant::now();
    let mut next = Duration::ZERO;
    let mut i = 0;
    let mut inflight = Vec::new();
    while next < Duration::from_secs(seconds) {
        tokio::time::sleep_until((start + next).into()).await;
        let name = format!("poisson-{i:05}");
        let (sessions, watched) = (sessions.clone(), watched.clone());
        inflight.push(tokio::spawn(async move { create(&sessions, &watched, &name).await }));
        // Exponential gaps with mean 20 ms: Poisson arrivals at 50/s.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let uniform = (rng >> 11) as f64 / (1u64 << 53) as f64;
        next += Duration::from_secs_f64(-(1.0 - uniform).ln() / 50.0);
        i += 1;
    }
    for task in inflight {
        let _ = task.await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    report(&format!("poisson 50/s for {seconds} s"), &watched, "poisson-", &before, &scrape(&http, &metrics_url).await);
    clean(&sessions, &admin, 220).await;

    // 3. A burst of 200 at once.
    let before = scrape(&http, &metrics_url).await;
    let burst = (0..200).map(|i| {
        let (sessions, watched) = (sessions.clone(), watched.clone());
        tokio::spawn(async move { create(&sessions, &watched, &format!("burst-{i:03}")).await })
    });
    let started = Instant::now();
    for task in burst.collect::<Vec<_>>() {
        let _ = task.await;
    }
    for i in 0..200 {
        wait_ready(&watched, &format!("burst-{i:03}")).await;
    }
    let all_ready = started.elapsed();
    report("burst of 200", &watched, "burst-", &before, &scrape(&http, &metrics_url).await);
    println!("burst: all 200 Ready {:.0} ms after the first create", all_ready.as_secs_f64() * 1000.0);
    drop(operator);
}

/// The operator runs as it does in a cluster: as ServiceAccount
/// tidepool/tidepool-operator with the chart's RBAC, sending that account's
/// token (an admin certificate would cost the API server a signature check
/// on every request).
async fn operator_kubeconfig(plane: &ControlPlane) -> std::path::PathBuf {
    let run = |command: &mut std::process::Command| {
        let output = command.output().expect("run");
        assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
        output.stdout
    };
    run(plane.kubectl().args(["create", "namespace", "tidepool"]));
    let chart = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/tidepool");
    let rbac = run(std::process::Command::new(bin_dir().expect("helm").join("helm"))
        .args(["template", "tidepool"])
        .arg(chart)
        .args(["--namespace", "tidepool", "--kube-version", "1.36.3"])
        // The chart's rights are per namespace: the lease's and the sessions'.
        .args(["--set", &format!("rbac.namespaces={{tidepool,{NAMESPACE}}}")])
        .args(["--show-only", "templates/rbac.yaml", "--show-only", "templates/serviceaccounts.yaml"]));
    let rbac_file = plane.dir().join("operator-rbac.yaml");
    std::fs::write(&rbac_file, rbac).expect("rbac file");
    run(plane.kubectl().args(["apply", "-f"]).arg(&rbac_file));
    plane.service_account_kubeconfig("tidepool", "tidepool-operator").await.expect("operator kubeconfig")
}

/// A client for ServiceAccount bench/loadgen, allowed only to create, read and
/// watch TestSessions in the bench namespace.
async fn loadgen_client(plane: &ControlPlane, admin: &Client) -> Client {
    let client = plane.service_account_client(NAMESPACE, "loadgen").await.expect("loadgen client");
    let role = Role {
        metadata: ObjectMeta { name: Some("loadgen".into()), namespace: Some(NAMESPACE.into()), ..Default::default() },
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec!["tidepool.dev".into()]),
            resources: Some(vec!["testsessions".into()]),
            verbs: ["create", "get", "list", "watch", "delete", "deletecollection"].map(String::from).to_vec(),
            ..Default::default()
        }]),
    };
    let binding = RoleBinding {
        metadata: ObjectMeta { name: Some("loadgen".into()), namespace: Some(NAMESPACE.into()), ..Default::default() },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: "loadgen".into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: "loadgen".into(),
            namespace: Some(NAMESPACE.into()),
            ..Default::default()
        }]),
    };
    Api::<Role>::namespaced(admin.clone(), NAMESPACE).create(&PostParams::default(), &role).await.expect("role");
    Api::<RoleBinding>::namespaced(admin.clone(), NAMESPACE)
        .create(&PostParams::default(), &binding)
        .await
        .expect("binding");
    client
}

/// Who places the pool's pods in this run.
fn node_assignment() -> String {
    std::env::var("TIDEPOOL_BENCH_NODE_ASSIGNMENT").unwrap_or_else(|_| "Operator".into())
}

async fn pool(admin: &Client, size: i32) {
    let pools: Api<WarmPool> = Api::namespaced(admin.clone(), NAMESPACE);
    let pool = serde_json::json!({
        "apiVersion": tidepool_crds::API_VERSION, "kind": "WarmPool",
        "metadata": { "name": "bench" },
        "spec": {
            // Every session of the 50/s phase holds a pod for its TTL.
            "size": size, "maxSize": 10000, "sessionTTLSeconds": 300, "nodeAssignment": node_assignment(),
            "tier": { "vcpu": 1, "memoryMiB": 64 },
            "template": { "spec": { "containers": [{ "name": "session", "image": "tidepool/session:bench" }] } }
        }
    });
    pools.patch("bench", &PatchParams::apply("bench").force(), &Patch::Apply(&pool)).await.expect("pool");
    eventually(Duration::from_secs(300), "the pool to fill", || async {
        let pool = pools.get("bench").await.ok()?;
        (pool.status?.warm >= size).then_some(())
    })
    .await
    .expect("pool filled");
}

async fn clean(sessions: &Api<TestSession>, admin: &Client, size: i32) {
    // Asked again until none are left: a loaded API server may drop the
    // connection of a large delete-collection.
    eventually(Duration::from_secs(120), "sessions to go", || async {
        let _ = sessions.delete_collection(&DeleteParams::default(), &ListParams::default()).await;
        sessions.list(&ListParams::default()).await.ok()?.items.is_empty().then_some(())
    })
    .await
    .expect("clean");
    pool(admin, size).await;
}

async fn create(sessions: &Api<TestSession>, watched: &Mutex<Watched>, name: &str) {
    let session: TestSession = serde_json::from_value(serde_json::json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "TestSession",
        "metadata": { "name": name },
        "spec": { "pool": "bench" }
    }))
    .expect("session");
    if let Ok(mut w) = watched.lock() {
        w.started.insert(name.to_string(), Instant::now());
    }
    if let Err(e) = sessions.create(&PostParams::default(), &session).await {
        eprintln!("create {name}: {e}");
    }
    if let Ok(mut w) = watched.lock() {
        w.answered.insert(name.to_string(), Instant::now());
    }
}

async fn wait_ready(watched: &Mutex<Watched>, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if watched.lock().map(|w| w.ready.contains_key(name)).unwrap_or(false) {
            return;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    eprintln!("{name} was not Ready within 60 s");
}

/// One watch over every session: when one first shows Ready, its latency is
/// the time since its create request started.
async fn watch_sessions(sessions: Api<TestSession>, watched: Arc<Mutex<Watched>>) {
    let mut version = "0".to_string();
    loop {
        let Ok(stream) = sessions.watch(&WatchParams::default(), &version).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut stream = stream.boxed();
        while let Ok(Some(event)) = stream.try_next().await {
            let now = Instant::now();
            let session = match event {
                WatchEvent::Added(s) | WatchEvent::Modified(s) => s,
                WatchEvent::Bookmark(b) => {
                    version = b.metadata.resource_version;
                    continue;
                }
                _ => continue,
            };
            version = session.resource_version().unwrap_or(version);
            let name = session.name_any();
            let Ok(mut w) = watched.lock() else { continue };
            w.seen.entry(name.clone()).or_insert(now);
            let Some(status) = &session.status else { continue };
            if status.phase == Phase::Ready && !w.ready.contains_key(&name) {
                if let Some(start) = w.started.get(&name) {
                    let took = now - *start;
                    w.ready.insert(name, took);
                }
            } else if status.phase == Phase::Pending && status.conditions.iter().any(|c| c.reason == "PoolEmpty") {
                w.waited_for_a_pod += 1;
            }
        }
    }
}

async fn scrape(http: &reqwest::Client, url: &str) -> HashMap<String, f64> {
    let text = http.get(url).send().await.expect("metrics").text().await.expect("metrics body");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

fn report(
    scenario: &str,
    watched: &Mutex<Watched>,
    prefix: &str,
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
) {
    let Ok(mut w) = watched.lock() else { return };
    let mut latencies: Vec<f64> =
        w.ready.iter().filter(|(n, _)| n.starts_with(prefix)).map(|(_, d)| d.as_secs_f64() * 1000.0).collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies.get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1)).copied().unwrap_or(f64::NAN)
    };
    let delta = |name: &str| after.get(name).unwrap_or(&0.0) - before.get(name).unwrap_or(&0.0);
    let writes =
        delta("tidepool_session_binding_api_writes_sum") / delta("tidepool_session_binding_api_writes_count").max(1.0);
    println!(
        "{:<34} {:>6} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>7.2} {:>5} {:>9}",
        scenario,
        latencies.len(),
        pct(0.50),
        pct(0.90),
        pct(0.99),
        latencies.last().copied().unwrap_or(f64::NAN),
        // The client's own create is one more write on the critical path.
        writes + 1.0,
        delta("tidepool_binding_conflicts_total"),
        w.waited_for_a_pod,
    );
    w.waited_for_a_pod = 0;
    if let Ok(path) = std::env::var("TIDEPOOL_BENCH_TIMELINE") {
        write_timeline(&w, prefix, &path);
    }
}

/// Appends the scenario's sessions to a CSV: name, then ms from the
/// scenario's first create to each session's create, create answer, first
/// sight in the watch, and Ready.
fn write_timeline(w: &Watched, prefix: &str, path: &str) {
    use std::io::Write;
    let mut names: Vec<&String> = w.started.keys().filter(|n| n.starts_with(prefix)).collect();
    names.sort();
    let Some(first) = names.iter().filter_map(|n| w.started.get(*n)).min().copied() else { return };
    let ms = |at: Option<&Instant>| at.map_or(String::new(), |t| format!("{:.1}", (*t - first).as_secs_f64() * 1000.0));
    let mut out = String::new();
    for name in names {
        let started = w.started.get(name);
        let ready = started.zip(w.ready.get(name)).map(|(s, d)| *s + *d);
        let line = [ms(started), ms(w.answered.get(name)), ms(w.seen.get(name)), ms(ready.as_ref())].join(",");
        out.push_str(&format!("{name},{line}\n"));
    }
    let written =
        std::fs::OpenOptions::new().create(true).append(true).open(path).and_then(|mut f| f.write_all(out.as_bytes()));
    if let Err(e) = written {
        eprintln!("timeline {path}: {e}");
    }
}
