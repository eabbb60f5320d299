//! Node agents on the real control plane: the real agent binary runs as a
//! local process for each kwok node, with a token bound to its DaemonSet pod
//! there, reading /proc fixtures (and a fake NVML on the GPU node) so each
//! node's load is known.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Cluster, Operator, TOKEN, post_session};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use tidepool_crds::Backend;
use tidepool_tests::{FakeNode, Process, eventually, free_port, mmdb, workspace_binary};
use tidepool_wire::report::{AgentReport, Capacity, ReportKind, Window};

const AGENT_IMAGE: &str = "tidepool-agent:test";

/// Starts the operator with fast probes, after the agents' ServiceAccount exists.
async fn operator(cluster: &Cluster, name: &str) -> Operator {
    operator_on(cluster, name, free_port().unwrap()).await
}

/// Like [`operator`], on a chosen port (where the agents report).
async fn operator_on(cluster: &Cluster, name: &str, port: u16) -> Operator {
    operator_with(cluster, name, port, &[]).await
}

/// Like [`operator_on`], with more arguments.
async fn operator_with(cluster: &Cluster, name: &str, port: u16, extra: &[&str]) -> Operator {
    cluster.plane.service_account_token("default", "tidepool-agent", "tidepool", None).await.unwrap();
    let agent_image = format!("--agent-image={AGENT_IMAGE}");
    let mut args = vec![
        agent_image.as_str(),
        "--health-probe-interval-seconds=2",
        "--health-probe-timeout-seconds=1",
        "--backend-status-refresh-seconds=5",
        // The harness's nodes are all at 127.0.0.1.
        "--allow-local-backend-addresses",
    ];
    args.extend_from_slice(extra);
    cluster.operator_on(name, port, &args).await
}

/// The agent DaemonSet's pod on `node`: (name, uid), once the DaemonSet controller made it.
async fn agent_pod(cluster: &Cluster, node: &str) -> (String, String) {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let params =
        ListParams::default().labels("app.kubernetes.io/name=tidepool-agent").fields(&format!("spec.nodeName={node}"));
    eventually(Duration::from_secs(60), &format!("the agent pod on {node}"), || async {
        let pod = pods.list(&params).await.ok()?.items.into_iter().next()?;
        Some((pod.name_any(), pod.uid()?))
    })
    .await
    .unwrap()
}

/// A /proc with `cores` cores, memory `memory_used_percent` % used of 16 GiB.
fn proc_fixture(dir: &Path, memory_used_percent: u64) -> PathBuf {
    let root = dir.to_path_buf();
    std::fs::create_dir_all(root.join("net")).unwrap();
    let mut stat = String::from("cpu  400 0 400 4000 0 0 0 0 0 0\n");
    for core in 0..4 {
        stat.push_str(&format!("cpu{core} 100 0 100 1000 0 0 0 0 0 0\n"));
    }
    std::fs::write(root.join("stat"), stat).unwrap();
    let total_kib: u64 = 16 << 20;
    let available = total_kib * (100 - memory_used_percent) / 100;
    std::fs::write(
        root.join("meminfo"),
        format!("MemTotal: {total_kib} kB\nMemFree: {available} kB\nMemAvailable: {available} kB\n"),
    )
    .unwrap();
    std::fs::write(
        root.join("net/dev"),
        "Inter-|   Receive |  Transmit\n face |bytes packets errs drop fifo frame compressed multicast|bytes\n    lo: 5 1 0 0 0 0 0 0 5 1 0 0 0 0 0 0\n  eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n",
    )
    .unwrap();
    root
}

/// Builds the fake NVML library the agent's own tests use.
fn fake_nvml(dir: &Path) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/tests/fake-nvml/fake_nvml.c");
    let library = dir.join("libnvidia-ml.so.1");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&library)
        .arg(&source)
        .status()
        .expect("a C compiler (cc) is needed to build the fake NVML library");
    assert!(status.success(), "building the fake NVML library failed");
    library
}

/// Runs the real agent for `node` against `operator`.
struct Agent {
    process: Process,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

async fn start_agent(
    cluster: &Cluster,
    operator: &Operator,
    node: &str,
    memory_used_percent: u64,
    gpu: Option<&Path>,
) -> Agent {
    let (pod, uid) = agent_pod(cluster, node).await;
    let token =
        cluster.plane.service_account_token("default", "tidepool-agent", "tidepool", Some((&pod, &uid))).await.unwrap();
    let dir = cluster.plane.dir().join(format!("agent-{node}"));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, token).unwrap();
    let proc_root = proc_fixture(&dir.join("proc"), memory_used_percent);
    let mut args = vec![
        format!("--operator-url={}", operator.url),
        format!("--token-file={}", token_file.display()),
        format!("--node-name={node}"),
        "--address=127.0.0.1".to_string(),
        format!("--listen=127.0.0.1:{}", free_port().unwrap()),
        "--report-interval-ms=200".to_string(),
        "--sample-interval-ms=200".to_string(),
        "--windows=10s,60s".to_string(),
        // A failover's 503s open the breaker; the tests wait 1 s for it, not 30.
        "--breaker-open-seconds=1".to_string(),
        format!("--proc-root={}", proc_root.display()),
        format!("--disk-path={}", dir.display()),
    ];
    let mut env = vec![("RUST_LOG".to_string(), "info".to_string())];
    match gpu {
        Some(library) => {
            args.push(format!("--nvml-library={}", library.display()));
            let state = dir.join("nvml-state");
            // Two GPUs: 10 % and 30 % busy, 1 GiB and 2 GiB used.
            std::fs::write(&state, "10 1024 40 100000\n30 2048 50 150000\n").unwrap();
            env.push(("FAKE_NVML_STATE".to_string(), state.display().to_string()));
        }
        None => args.push("--no-gpu".to_string()),
    }
    let process = spawn_agent(cluster, node, &args, &env);
    Agent { process, args, env }
}

fn spawn_agent(cluster: &Cluster, node: &str, args: &[String], env: &[(String, String)]) -> Process {
    let binary = workspace_binary("tidepool-agent", "tidepool-agent").unwrap();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    cluster.plane.spawn(&format!("agent-{node}"), &binary, args, &env).unwrap()
}

fn condition(backend: &Backend, type_: &str) -> Option<String> {
    let status = backend.status.as_ref()?;
    status.conditions.iter().find(|c| c.type_ == type_).map(|c| c.status.clone())
}

async fn wait_backend<T>(
    cluster: &Cluster,
    name: &str,
    what: &str,
    limit: Duration,
    check: impl Fn(&Backend) -> Option<T>,
) -> T {
    let backends: Api<Backend> = Api::all(cluster.client.clone());
    eventually(limit, &format!("Backend {name}: {what}"), || async {
        let backend = backends.get_opt(name).await.ok()??;
        check(&backend)
    })
    .await
    .unwrap()
}

/// A pool whose warm pods spread evenly over the nodes.
async fn spread_pool(cluster: &Cluster, name: &str, size: i32, tier: Value) {
    let pools: Api<tidepool_crds::WarmPool> = Api::namespaced(cluster.client.clone(), "default");
    let pool = json!({
        "apiVersion": "tidepool.dev/v1alpha1", "kind": "WarmPool",
        "metadata": { "name": name },
        "spec": {
            "size": size,
            "tier": tier,
            "template": { "spec": {
                "topologySpreadConstraints": [{
                    "maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "DoNotSchedule",
                    "labelSelector": { "matchLabels": { "tidepool.dev/pool": name } }
                }],
                "containers": [{
                    "name": "session", "image": "tidepool/session:test",
                    "resources": { "requests": { "cpu": "10m", "memory": "16Mi" } }
                }]
            } }
        }
    });
    pools.patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&pool)).await.unwrap();
}

async fn session_node(operator: &Operator, pool: &str) -> String {
    let (code, body) = post_session(operator, json!({ "pool": pool })).await;
    assert_eq!(code, 201, "{body}");
    body["node"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_feed_backends_and_sessions_follow_the_load() {
    let cluster = Cluster::start(3).await;
    cluster.plane.add_node(&FakeNode::new("gpu-0").gpus(2)).await.unwrap();
    let operator = operator(&cluster, "op").await;
    let nvml = fake_nvml(cluster.plane.dir());
    // Memory use decides among otherwise idle nodes: node-1 is the least loaded.
    let loads = [("node-0", 80), ("node-1", 20), ("node-2", 50), ("gpu-0", 90)];
    let mut agents = Vec::new();
    for (node, memory) in loads {
        let gpu = (node == "gpu-0").then_some(nvml.as_path());
        agents.push(start_agent(&cluster, &operator, node, memory, gpu).await);
    }

    // Every node gets a Backend, owned by its Node, Ready, and healthy once probed.
    for (node, memory) in loads {
        let backend = wait_backend(&cluster, node, "Ready and Healthy", Duration::from_secs(30), |b| {
            let healthy = b.status.as_ref()?.health == tidepool_crds::backend::Health::Healthy;
            (condition(b, "Ready").as_deref() == Some("True") && healthy).then(|| b.clone())
        })
        .await;
        assert_eq!(backend.owner_references()[0].kind, "Node");
        assert_eq!(backend.spec.node_name.as_deref(), Some(node));
        let usage = backend.status.as_ref().unwrap().usage.clone().unwrap();
        assert!((usage.memory_percent - memory as f64).abs() < 1.0, "{node}: {usage:?}");
    }
    let gpu = wait_backend(&cluster, "gpu-0", "two GPUs", Duration::from_secs(10), |b| {
        let status = b.status.as_ref()?;
        (status.capacity.as_ref()?.gpus.len() == 2).then(|| status.clone())
    })
    .await;
    let usage = gpu.usage.unwrap();
    assert_eq!(usage.gpus.iter().map(|g| g.utilization_percent).collect::<Vec<_>>(), [10.0, 30.0]);
    assert_eq!(usage.gpus[1].memory_used_bytes, 2048 << 20);

    // Sessions take the warm pod on the least loaded node; pending picks
    // count, so the third goes elsewhere.
    spread_pool(&cluster, "cpu", 8, json!({ "vcpu": 1, "memoryMiB": 64 })).await;
    cluster.wait_warm("cpu", 8, Duration::from_secs(60)).await;
    assert_eq!(session_node(&operator, "cpu").await, "node-1");
    assert_eq!(session_node(&operator, "cpu").await, "node-1");
    assert_eq!(session_node(&operator, "cpu").await, "node-2");

    // A GPU tier lands only where GPUs are free, however loaded the rest is.
    spread_pool(&cluster, "gpu", 4, json!({ "vcpu": 1, "memoryMiB": 64, "gpus": 1, "gpuMemoryMiB": 1024 })).await;
    cluster.wait_warm("gpu", 4, Duration::from_secs(60)).await;
    assert_eq!(session_node(&operator, "gpu").await, "gpu-0");

    // Clients outside the cluster ask the router directly.
    let http = reqwest::Client::new();
    let route = |body: Value| {
        let request = http.post(format!("{}/api/v1/route", operator.url)).bearer_auth(TOKEN).json(&body);
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    let (code, body) = route(json!({ "tier": { "vcpu": 1, "memoryMiB": 64 }, "stickyKey": "user-7" })).await;
    assert_eq!(code, 200, "{body}");
    assert!(body["backend"].as_str().unwrap().starts_with("node-"), "{body}");
    assert!(body["reportAgeMs"].as_u64().unwrap() < 1000, "{body}");
    let (code, again) = route(json!({ "tier": { "vcpu": 1, "memoryMiB": 64 }, "stickyKey": "user-7" })).await;
    assert_eq!((code, &again["backend"], &again["sticky"]), (200, &body["backend"], &json!(true)), "{again}");
    let (code, body) = route(json!({ "tier": { "vcpu": 64, "memoryMiB": 64 } })).await;
    assert_eq!(code, 503, "{body}");
    assert!(body["error"].as_str().unwrap().contains("short of idle cores"), "{body}");
    let (code, body) = route(json!({ "tier": { "vcpu": 0, "memoryMiB": 64 } })).await;
    assert_eq!(code, 422, "{body}");

    // An agent that stops makes its Backend Stale within the window
    // (3 missed 200 ms reports), and it comes back when reports resume.
    let stopped = agents.remove(2);
    let (args, env) = (stopped.args.clone(), stopped.env.clone());
    let started = Instant::now();
    drop(stopped.process);
    wait_backend(&cluster, "node-2", "Stale", Duration::from_secs(10), |b| {
        (condition(b, "Stale").as_deref() == Some("True") && condition(b, "Ready").as_deref() == Some("False"))
            .then_some(())
    })
    .await;
    let stale_after = started.elapsed();
    assert!(stale_after < Duration::from_secs(5), "Stale after {stale_after:?}");
    let _again = spawn_agent(&cluster, "node-2", &args, &env);
    wait_backend(&cluster, "node-2", "Ready again", Duration::from_secs(15), |b| {
        (condition(b, "Ready").as_deref() == Some("True")).then_some(())
    })
    .await;
    drop(agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_keys_outlive_the_leader_that_picked_them() {
    let cluster = Cluster::start(3).await;
    let port = free_port().unwrap();
    let mut first = operator_on(&cluster, "first", port).await;
    let loads = [("node-0", 50), ("node-1", 50), ("node-2", 50)];
    let mut agents = Vec::new();
    for (node, memory) in loads {
        agents.push(start_agent(&cluster, &first, node, memory, None).await);
    }
    for (node, _) in loads {
        wait_backend(&cluster, node, "Ready", Duration::from_secs(30), |b| {
            (condition(b, "Ready").as_deref() == Some("True")).then_some(())
        })
        .await;
    }
    spread_pool(&cluster, "cpu", 8, json!({ "vcpu": 1, "memoryMiB": 64 })).await;
    cluster.wait_warm("cpu", 8, Duration::from_secs(60)).await;

    // The key lands somewhere; then that node becomes the busiest by far,
    // so that only the key can bring a session there again.
    let keyed = json!({ "pool": "cpu", "stickyKey": "household-9" });
    let (code, body) = post_session(&first, keyed.clone()).await;
    assert_eq!(code, 201, "{body}");
    let home = body["node"].as_str().unwrap().to_string();
    proc_fixture(&cluster.plane.dir().join(format!("agent-{home}")).join("proc"), 95);
    wait_backend(&cluster, &home, "95 % of its memory used", Duration::from_secs(30), |b| {
        (b.status.as_ref()?.usage.as_ref()?.memory_percent > 90.0).then_some(())
    })
    .await;

    // A new leader, at the address the agents report to, has no picks of
    // its own: it learns the key from the session that carries it.
    first.process.kill();
    let second = operator_on(&cluster, "second", port).await;
    eventually(Duration::from_secs(30), "the new leader to have fresh reports from every node", || async {
        let metrics = reqwest::get(format!("{}/metrics", second.url)).await.ok()?.text().await.ok()?;
        metrics.lines().any(|line| line == r#"tidepool_backends{state="ready"} 3"#).then_some(())
    })
    .await
    .unwrap();
    let (code, body) = post_session(&second, keyed).await;
    assert_eq!(
        (code, body["node"].as_str()),
        (201, Some(home.as_str())),
        "the key's backend after the failover: {body}"
    );
    // Without the key, placement goes elsewhere.
    assert_ne!(session_node(&second, "cpu").await, home);
    drop(agents);
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_are_placed_in_their_own_region() {
    let cluster = Cluster::start(0).await;
    let region = "topology.kubernetes.io/region";
    cluster.plane.add_node(&FakeNode::new("eu-0").label(region, "eu-west")).await.unwrap();
    cluster.plane.add_node(&FakeNode::new("us-0").label(region, "us-east")).await.unwrap();
    // A label value may not begin with "-": south is written with its hemisphere.
    let sydney =
        FakeNode::new("au-0").label("tidepool.dev/latitude", "33.87S").label("tidepool.dev/longitude", "151.21E");
    cluster.plane.add_node(&sydney).await.unwrap();
    // A GeoIP database of the test's own: two documentation networks, and
    // loopback (where this test's requests come from), in Paris.
    let (paris, new_york) = ((48.86, 2.35), (40.71, -74.0));
    let network = |address: [u8; 4], prefix: u8, (latitude, longitude): (f64, f64)| mmdb::Network {
        address: address.into(),
        prefix,
        latitude,
        longitude,
    };
    let database = cluster.plane.dir().join("geoip.mmdb");
    let networks = [
        network([198, 51, 100, 0], 24, paris),
        network([203, 0, 113, 0], 24, new_york),
        network([127, 0, 0, 0], 8, paris),
    ];
    std::fs::write(&database, mmdb::city_database(&networks)).unwrap();
    let geoip = format!("--geoip-database={}", database.display());
    let extra = ["--region-coordinates=eu-west=50.11,8.68", "--region-coordinates=us-east=39.04,-77.49", &geoip];
    let operator = operator_with(&cluster, "op", free_port().unwrap(), &extra).await;
    // Europe's node is the busier: load alone would send everyone to us-0,
    // and the GPU-free Sydney node is busier still.
    let mut agents = Vec::new();
    for (node, memory) in [("eu-0", 80), ("us-0", 20), ("au-0", 90)] {
        agents.push(start_agent(&cluster, &operator, node, memory, None).await);
    }
    // Each Backend is where its Node's labels say.
    let places = [
        ("eu-0", Some("eu-west"), (50.11, 8.68)),
        ("us-0", Some("us-east"), (39.04, -77.49)),
        ("au-0", None, (-33.87, 151.21)),
    ];
    for (node, region, (latitude, longitude)) in places {
        wait_backend(&cluster, node, "placed where its labels say", Duration::from_secs(30), |b| {
            let c = b.spec.coordinates.as_ref()?;
            let placed = b.spec.region.as_deref() == region && c.latitude == latitude && c.longitude == longitude;
            (placed && condition(b, "Ready").as_deref() == Some("True")).then_some(())
        })
        .await;
    }
    spread_pool(&cluster, "cpu", 6, json!({ "vcpu": 1, "memoryMiB": 64 })).await;
    cluster.wait_warm("cpu", 6, Duration::from_secs(60)).await;

    let placed = |client: Value| {
        let operator = &operator;
        async move {
            let (code, body) = post_session(operator, json!({ "pool": "cpu", "client": client })).await;
            assert_eq!(code, 201, "{body}");
            body
        }
    };
    // By the address a client gives: Paris goes to Frankfurt, New York to Ashburn.
    let from_paris = placed(json!({ "address": "198.51.100.7" })).await;
    assert_eq!(
        (from_paris["node"].as_str(), from_paris["region"].as_str()),
        (Some("eu-0"), Some("eu-west")),
        "{from_paris}"
    );
    let km = from_paris["distanceKm"].as_f64().unwrap();
    assert!((470.0..490.0).contains(&km), "Paris to Frankfurt: {km} km");
    let from_new_york = placed(json!({ "address": "203.0.113.9" })).await;
    assert_eq!(from_new_york["node"].as_str(), Some("us-0"), "{from_new_york}");
    assert!((300.0..360.0).contains(&from_new_york["distanceKm"].as_f64().unwrap()), "{from_new_york}");
    // By the address the request came from, when the client says nothing.
    let (code, by_connection) = post_session(&operator, json!({ "pool": "cpu" })).await;
    assert_eq!((code, by_connection["node"].as_str()), (201, Some("eu-0")), "{by_connection}");
    // Coordinates the client gives win over any address.
    let near_sydney = placed(json!({ "address": "198.51.100.7", "latitude": -37.81, "longitude": 144.96 })).await;
    assert_eq!(near_sydney["node"].as_str(), Some("au-0"), "{near_sydney}");
    // An address the database does not know: placement by load, as without geography.
    let unknown = placed(json!({ "address": "192.0.2.1" })).await;
    assert_eq!(unknown["node"].as_str(), Some("us-0"), "{unknown}");
    assert!(unknown.get("distanceKm").is_none(), "{unknown}");

    // The router places clients outside the cluster by their address too.
    let (code, routed) = {
        let response = reqwest::Client::new()
            .post(format!("{}/api/v1/route", operator.url))
            .bearer_auth(TOKEN)
            .json(&json!({ "tier": { "vcpu": 1, "memoryMiB": 64 }, "clientAddress": "198.51.100.20" }))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.json::<Value>().await.unwrap())
    };
    assert_eq!(
        (code, routed["backend"].as_str(), routed["region"].as_str()),
        (200, Some("eu-0"), Some("eu-west")),
        "{routed}"
    );
    drop(agents);
}

/// A report the test sends by hand.
fn report(backend: &str, kind: ReportKind) -> AgentReport {
    let capacity = Capacity { cores: 2, memory_bytes: 1 << 30, disk_bytes: 1 << 30, gpus: vec![] };
    let window = Window { seconds: 10, samples: 10, cores: vec![5.0, 5.0], ..Window::default() };
    AgentReport { seq: 1, sampled_at_ms: 1, ..AgentReport::new(backend, kind, capacity, vec![window]) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reports_are_refused_and_the_daemonset_is_kept() {
    let cluster = Cluster::start(2).await;
    let operator = operator(&cluster, "op").await;
    let (pod, uid) = agent_pod(&cluster, "node-0").await;
    let plane = &cluster.plane;
    let node_0 =
        plane.service_account_token("default", "tidepool-agent", "tidepool", Some((&pod, &uid))).await.unwrap();
    let unbound = plane.service_account_token("default", "tidepool-agent", "tidepool", None).await.unwrap();
    let stranger = plane.service_account_token("default", "someone-else", "tidepool", None).await.unwrap();
    let wrong_audience = plane.service_account_token("default", "tidepool-agent", "elsewhere", None).await.unwrap();
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/agents/report", operator.url);
    let send = |token: Option<&str>, body: Vec<u8>| {
        let mut request = http.post(&url).header("content-type", "application/json").body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let json = |r: &AgentReport| serde_json::to_vec(r).unwrap();
    let good = report("node-0", ReportKind::Node);
    let mut posing = report("node-1", ReportKind::External);
    posing.address = Some("203.0.113.9:443".into());
    let mut rogue = report("rogue", ReportKind::External);
    rogue.address = Some("203.0.113.10:443".into());
    let mut absurd = good.clone();
    absurd.windows[0].cores = vec![250.0, 5.0];
    // What is sent (token, body), and the code and words expected back.
    type Case<'a> = (&'a str, Option<&'a str>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("no token", None, json(&good), 401, "bearer token"),
        ("a forged token", Some("not-a-token"), json(&good), 401, "not accepted"),
        ("a token for another audience", Some(&wrong_audience), json(&good), 401, "not accepted"),
        ("another ServiceAccount", Some(&stranger), json(&good), 401, "not the agents' ServiceAccount"),
        ("another node", Some(&node_0), json(&report("node-1", ReportKind::Node)), 403, "not on node node-1"),
        ("a token bound to no pod", Some(&unbound), json(&good), 403, "bound to the agent's pod"),
        ("an external backend under a node's name", Some(&unbound), json(&posing), 409, "a node's name"),
        ("an absurd figure", Some(&node_0), json(&absurd), 422, "windows[0].cores[0]"),
        ("malformed JSON", Some(&node_0), b"{\"backend\":".to_vec(), 400, "invalid JSON"),
        ("an external backend no admin registered", Some(&unbound), json(&rogue), 403, "no Backend rogue"),
        ("an oversized body", Some(&node_0), vec![b' '; 300 * 1024], 413, ""),
    ];
    for (what, token, body, code, says) in cases {
        let (got, text) = send(token, body).await;
        assert_eq!(got, code, "{what}: {text}");
        assert!(text.contains(says), "{what}: {text}");
    }
    // Nothing refused reached the API server.
    let backends: Api<Backend> = Api::all(cluster.client.clone());
    assert!(backends.list(&ListParams::default()).await.unwrap().items.is_empty());
    let log = operator.process.log_tail(200);
    assert!(log.contains("refused an agent report"), "{log}");
    let (got, text) = send(Some(&node_0), json(&good)).await;
    assert_eq!(got, 204, "{text}");
    wait_backend(&cluster, "node-0", "created", Duration::from_secs(10), |_| Some(())).await;
    assert!(backends.get_opt("node-1").await.unwrap().is_none());

    // A replica that does not lead sends agents elsewhere.
    let follower = cluster.operator("op-2", &["--no-agent-daemonset"]).await;
    let answer =
        http.post(format!("{}/api/v1/agents/report", follower.url)).bearer_auth(&node_0).json(&good).send().await;
    assert_eq!(answer.unwrap().status().as_u16(), 503);

    // An admin registers an external backend; its agent then reports for it.
    let registered: Backend = serde_json::from_value(json!({
        "apiVersion": tidepool_crds::API_VERSION, "kind": "Backend",
        "metadata": { "name": "edge-1" },
        "spec": { "kind": "external", "address": "edge-1.example:8443", "region": "eu-west",
                  "healthCheck": { "type": "tcp", "port": 8443 } }
    }))
    .unwrap();
    backends.create(&Default::default(), &registered).await.unwrap();
    let dir = plane.dir().join("external");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), &unbound).unwrap();
    let proc_root = proc_fixture(&dir.join("proc"), 30);
    let args = vec![
        format!("--operator-url={}", operator.url),
        format!("--token-file={}", dir.join("token").display()),
        "--external=edge-1".to_string(),
        // What the agent claims is not where clients go: the admin's address is.
        "--address=elsewhere.example:9999".to_string(),
        "--region=eu-west".to_string(),
        format!("--listen=127.0.0.1:{}", free_port().unwrap()),
        "--report-interval-ms=200".to_string(),
        format!("--proc-root={}", proc_root.display()),
        format!("--disk-path={}", dir.display()),
        "--no-gpu".to_string(),
    ];
    let _external = spawn_agent(&cluster, "edge-1", &args, &[]);
    let spec = wait_backend(&cluster, "edge-1", "reporting", Duration::from_secs(15), |b| {
        b.status.as_ref()?.last_report_time.as_ref()?;
        Some(b.spec.clone())
    })
    .await;
    // The operator wrote its status and left the admin's spec alone.
    assert_eq!(spec.address.as_deref(), Some("edge-1.example:8443"));
    assert_eq!(spec.region.as_deref(), Some("eu-west"));
    // Its service port (the admin's) is probed over TCP; nothing answers
    // there, so after three failed probes it is Unhealthy and out of placement.
    wait_backend(&cluster, "edge-1", "Unhealthy", Duration::from_secs(30), |b| {
        let unhealthy = b.status.as_ref()?.health == tidepool_crds::backend::Health::Unhealthy;
        (unhealthy && condition(b, "Ready").as_deref() == Some("False")).then_some(())
    })
    .await;

    // The operator keeps its DaemonSet: an edit is undone, a deletion repaired.
    let daemonsets: Api<DaemonSet> = Api::namespaced(cluster.client.clone(), "default");
    let image = |ds: &DaemonSet| ds.spec.as_ref()?.template.spec.as_ref()?.containers[0].image.clone();
    let original = daemonsets.get("tidepool-agent").await.unwrap();
    assert_eq!(image(&original).as_deref(), Some(AGENT_IMAGE));
    let edit =
        json!({ "spec": { "template": { "spec": { "containers": [{ "name": "agent", "image": "evil:1" }] } } } });
    daemonsets.patch("tidepool-agent", &PatchParams::default(), &Patch::Strategic(edit)).await.unwrap();
    eventually(Duration::from_secs(15), "the edited DaemonSet put back", || async {
        let ds = daemonsets.get("tidepool-agent").await.ok()?;
        (image(&ds).as_deref() == Some(AGENT_IMAGE)).then_some(())
    })
    .await
    .unwrap();
    daemonsets.delete("tidepool-agent", &DeleteParams::default()).await.unwrap();
    eventually(Duration::from_secs(15), "the deleted DaemonSet made again", || async {
        let ds = daemonsets.get_opt("tidepool-agent").await.ok()??;
        (ds.uid() != original.uid()).then_some(())
    })
    .await
    .unwrap();
}
