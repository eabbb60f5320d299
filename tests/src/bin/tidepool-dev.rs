//! `tidepool-dev`: brings up Tidepool's local cluster for a person to use.
//!
//! Starts the harness's real control plane with three kwok nodes (one with
//! GPUs), installs the Helm chart (CRDs, accounts and RBAC, the API token,
//! the example WarmPool), and runs our programs as the processes behind it:
//! the operator with the chart's arguments and its ServiceAccount's rights,
//! an agent for each node with a token bound to its DaemonSet pod, and the
//! session pod behind every pool pod; SeaweedFS is the results store. Then
//! it runs a bufferbloat test with the `tidepool` CLI through the operator's
//! API, shows the TestSession with its results, the same results read back
//! from the store, the Backends and a routing answer, starts Debian's
//! Prometheus (when installed) on all of them, prints where to look, and
//! keeps running until Ctrl-C. `--check` stops after showing (for CI).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use tidepool_tests::control_plane::bin_dir;
use tidepool_tests::s3::{self, S3Server};
use tidepool_tests::{ControlPlane, FakeNode, HarnessError, Options, PodRunner, Process, eventually, free_port};

const NAMESPACE: &str = "tidepool";
const RESULTS_BUCKET: &str = "tidepool-results";
const RESULTS_SECRET: &str = "tidepool-results-store";
const NODES: [&str; 3] = ["kwok-node-0", "kwok-node-1", "kwok-gpu-0"];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let check_only = std::env::args().any(|a| a == "--check");
    match run(check_only).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidepool-dev: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(check_only: bool) -> tidepool_tests::Result<()> {
    eprintln!("Starting etcd, kube-apiserver, controller-manager, scheduler and kwok...");
    let nodes = vec![
        FakeNode::new(NODES[0]),
        FakeNode::new(NODES[1]).cpu("16").memory("64Gi"),
        FakeNode::new(NODES[2]).cpu("32").memory("128Gi").gpus(4),
    ];
    // The chart brings the CRDs.
    let plane = ControlPlane::start_with(Options { nodes, crds: false, ..Options::default() }).await?;
    let client = plane.client().await?;
    eprintln!("Starting SeaweedFS, the results store...");
    let store = S3Server::start(RESULTS_BUCKET).await?;
    let chart = repo().join("helm/tidepool");
    let kubeconfig = plane.kubeconfig().display().to_string();
    // Every pod here is on this machine's loopback, where a bufferbloat run
    // moves more in ten seconds than the pods' default hourly cap per
    // address (45 GB) allows a real line; so the cap is lifted here.
    let store_values = format!(
        "resultsStore.endpoint={},resultsStore.bucket={RESULTS_BUCKET},resultsStore.credentialsSecret={RESULTS_SECRET},gateway.enabled=true,examplePool.bytesPerHour=10000000000000",
        store.endpoint()
    );
    println!("$ helm install tidepool helm/tidepool --namespace {NAMESPACE} --create-namespace --set {store_values}");
    let install = ["install", "tidepool", path(&chart), "--namespace", NAMESPACE, "--create-namespace"];
    command(Command::new(bin_dir()?.join("helm")).args(install).args([
        "--set",
        &store_values,
        "--kubeconfig",
        &kubeconfig,
        "--wait=false",
    ]))?;
    kubectl(
        &plane,
        &[
            "-n",
            NAMESPACE,
            "create",
            "secret",
            "generic",
            RESULTS_SECRET,
            &format!("--from-literal=accessKeyId={}", s3::ACCESS_KEY_ID),
            &format!("--from-literal=secretAccessKey={}", s3::SECRET_ACCESS_KEY),
        ],
    )?;

    let web_ui = build_web_ui()?;
    eprintln!("Building tidepool-operator, tidepool-gateway, tidepool-agent, tidepool-session and tidepool...");
    let operator_bin = tidepool_tests::workspace_binary("tidepool-operator", "tidepool-operator")?;
    let gateway_bin = tidepool_tests::workspace_binary("tidepool-gateway", "tidepool-gateway")?;
    let agent_bin = tidepool_tests::workspace_binary("tidepool-agent", "tidepool-agent")?;
    let session_bin = tidepool_tests::workspace_binary("tidepool-session", "tidepool-session")?;
    let cli = tidepool_tests::workspace_binary("tidepool-cli", "tidepool")?;

    // The operator: the chart's arguments, on loopback, with the chart's
    // ServiceAccount's rights and the chart's API token.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let token = eventually(Duration::from_secs(30), "the chart's API token", || async {
        let secret = secrets.get_opt("tidepool-api-token").await.ok()??;
        String::from_utf8(secret.data?.get("token")?.0.clone()).ok()
    })
    .await?;
    let token = token.trim().to_string();
    let token_file = plane.dir().join("api-token");
    std::fs::write(&token_file, &token).map_err(HarnessError::io("writing the API token"))?;
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let set = [
        ("--listen", format!("127.0.0.1:{port}")),
        ("--api-token-file", token_file.display().to_string()),
        ("--results-url", url.clone()),
        ("--agent-operator-url", url.clone()),
    ];
    let args: Vec<String> = tidepool_tests::with_flags(chart_args(&chart, &store_values, "tidepool-operator")?, &set)
        .into_iter()
        // The agents here are processes on this machine, at 127.0.0.1.
        .chain(["--allow-local-backend-addresses".to_string()])
        .collect();
    let operator_kubeconfig = plane.service_account_kubeconfig(NAMESPACE, "tidepool-operator").await?;
    // The store's keys as the Deployment passes them, from the Secret.
    let env = [
        ("KUBECONFIG", operator_kubeconfig.to_str().unwrap_or_default()),
        ("POD_NAME", "tidepool-operator-0"),
        ("AWS_ACCESS_KEY_ID", s3::ACCESS_KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", s3::SECRET_ACCESS_KEY),
    ];
    eprintln!("Starting the operator with the chart's arguments...");
    let operator = plane.spawn("tidepool-operator", &operator_bin, &args, &env)?;
    let runner =
        PodRunner::start(client.clone(), NAMESPACE, "tidepool.dev/pool", session_bin, plane.dir().to_path_buf());
    eprintln!("Starting a tidepool-agent for each node...");
    let agents = start_agents(&plane, &agent_bin, &url).await.map_err(|e| with_log(e, &operator))?;

    kubectl(&plane, &["get", "nodes", "-o", "wide"])?;
    kubectl(&plane, &["-n", NAMESPACE, "wait", "wp/edge", "--for=condition=Ready", "--timeout=60s"])?;
    eventually(Duration::from_secs(30), "a session pod behind each warm pod", || async {
        (runner.running().len() >= 3).then_some(())
    })
    .await?;
    kubectl(&plane, &["-n", NAMESPACE, "get", "warmpools,pods", "-o", "wide"])?;

    let token_path = token_file.display().to_string();
    let run_args = ["run", "--operator", &url, "--api-token-file", &token_path, "--pool", "edge", "-n", NAMESPACE];
    println!("$ tidepool {} --profile bufferbloat", run_args.join(" "));
    // The agents report this machine's real load: while something else keeps
    // both cores busy, placement rightly finds no idle core and the session
    // waits. Try a few times before giving up.
    let mut attempts = 0;
    while let Err(e) = command(Command::new(&cli).args(run_args).args(["--profile", "bufferbloat"])) {
        attempts += 1;
        if attempts == 3 {
            return Err(with_log(e, &operator));
        }
        eprintln!("(trying again in 5 s: placement needs an idle core, and this machine is busy)");
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    // The final report ends the session a moment after the CLI returns, with
    // its results stored in SeaweedFS in the same write: wait for that.
    kubectl(&plane, &["-n", NAMESPACE, "wait", "testsessions", "--all", "--for=condition=Exported", "--timeout=60s"])?;
    kubectl(&plane, &["-n", NAMESPACE, "get", "testsessions"])?;
    // Read back from the store through the operator.
    let results_args = ["results", "--operator", &url, "--api-token-file", &token_path, "-n", NAMESPACE];
    println!("$ tidepool {}", results_args.join(" "));
    command(Command::new(&cli).args(results_args))?;
    // The front door: the gateway with the chart's arguments and its
    // ServiceAccount's rights; the example pool opened to anonymous users.
    let (gateway, gateway_url, gateway_admin) =
        start_gateway(&plane, &chart, &store_values, &gateway_bin, &url, &web_ui).await?;
    kubectl(&plane, &["-n", NAMESPACE, "patch", "wp", "edge", "--type=merge", "-p", r#"{"spec":{"public":true}}"#])?;
    let anonymous = format!(r#"{{"pool":"edge","namespace":"{NAMESPACE}"}}"#);
    println!("$ curl -s -X POST {gateway_url}/api/v1/sessions -d '{anonymous}'");
    let view: serde_json::Value = eventually(Duration::from_secs(60), "an anonymous session", || async {
        let answer = reqwest::Client::new()
            .post(format!("{gateway_url}/api/v1/sessions"))
            .header("content-type", "application/json")
            .body(anonymous.clone())
            .send()
            .await
            .ok()?;
        // Placement may wait for an idle core on a busy machine: ask again.
        if answer.status() != 201 {
            return None;
        }
        answer.json().await.ok()
    })
    .await
    .map_err(|e| HarnessError::Other(format!("{e}\nthe gateway's log:\n{}", gateway.log_tail(20))))?;
    println!("{view}");
    let session_token = view["token"].as_str().unwrap_or_default().to_string();
    let endpoint = view["endpoint"].as_str().unwrap_or_default().to_string();
    println!("$ curl -s {endpoint}/api/v1/info -H 'Authorization: Bearer <its token>'");
    let info = reqwest::Client::new()
        .get(format!("{endpoint}/api/v1/info"))
        .bearer_auth(&session_token)
        .send()
        .await
        .map_err(|e| HarnessError::Other(format!("the session through the gateway: {e}")))?
        .text()
        .await
        .map_err(|e| HarnessError::Other(format!("the session through the gateway: {e}")))?;
    println!("{info}");
    show_web_ui(&plane, &gateway_url, &token)?;

    kubectl(&plane, &["wait", "backends", "--all", "--for=condition=Ready", "--timeout=30s"])?;
    kubectl(&plane, &["get", "backends"])?;
    let route = r#"{"tier":{"vcpu":1,"memoryMiB":256}}"#;
    println!("$ curl -s -X POST {url}/api/v1/route -H 'Authorization: Bearer {token}' -d '{route}'");
    println!("{}", post(&url, "/api/v1/route", &token, route).await?);

    show_tube(&plane, &cli, &url, &token_path, port).await.map_err(|e| with_log(e, &operator))?;

    let agent_targets: Vec<String> = agents.iter().map(|(_, address)| address.clone()).collect();
    let prometheus = start_prometheus(&plane, &format!("127.0.0.1:{port}"), &agent_targets)?;

    let kubeconfig = plane.kubeconfig().display();
    println!();
    println!("Tidepool's local cluster is up ({}).", plane.server());
    println!("Pods get loopback addresses from {}; a tidepool-session runs behind each pool pod.", plane.pod_cidr());
    println!("Logs: {}", plane.dir().display());
    println!("In another terminal:");
    println!("  export KUBECONFIG={kubeconfig}");
    println!(
        "  export PATH={}:{}:$PATH",
        plane.bin().display(),
        cli.parent().map(Path::display).map(|d| d.to_string()).unwrap_or_default()
    );
    println!("  kubectl -n {NAMESPACE} get warmpools,testsessions,pods; kubectl get backends");
    println!("  tidepool {} --profile household", run_args.join(" "));
    println!(
        "  tidepool ping --operator {url} --api-token-file {token_path} --pool edge -n {NAMESPACE} --terminate-after 5"
    );
    println!("  tidepool {}", results_args.join(" "));
    println!("  curl -s {url}/metrics | grep tidepool_");
    println!(
        "  The web UI: {gateway_url}/ (anonymous sessions on pool edge); the gateway's metrics: {gateway_admin}/metrics"
    );
    println!("  The results store (SeaweedFS, S3): {} bucket {RESULTS_BUCKET}", store.endpoint());
    if let Some((_, prometheus_url)) = &prometheus {
        println!("  Prometheus: {prometheus_url}/graph?g0.expr=tidepool_session_create_to_ready_seconds_count");
    }
    if check_only {
        return Ok(());
    }
    println!("Press Ctrl-C to stop everything and remove {}.", plane.dir().display());
    tokio::signal::ctrl_c().await.map_err(HarnessError::io("waiting for Ctrl-C"))?;
    eprintln!("Stopping.");
    Ok(())
}

/// A tube: the pool lets tubes reach the operator's port on loopback, and
/// `tidepool tube` forwards a local port there through a session pod; a
/// request goes through it, and Ctrl-C closes it.
async fn show_tube(
    plane: &ControlPlane,
    cli: &Path,
    url: &str,
    token_path: &str,
    port: u16,
) -> tidepool_tests::Result<()> {
    use tokio::io::AsyncBufReadExt;
    let allow = format!(r#"{{"spec":{{"tubes":{{"allow":[{{"cidr":"127.0.0.1/32","ports":[{port}]}}]}}}}}}"#);
    kubectl(plane, &["-n", NAMESPACE, "patch", "wp", "edge", "--type=merge", "-p", &allow])?;
    let target = format!("127.0.0.1:{port}");
    let args = ["tube", "--operator", url, "--api-token-file", token_path, "--pool", "edge", "-n", NAMESPACE];
    let forward = ["--target", target.as_str(), "--listen", "127.0.0.1:0"];
    println!("$ tidepool {} {} &", args.join(" "), forward.join(" "));
    let failed = |what: &str| HarnessError::Other(format!("tidepool tube: {what}"));
    let mut tube = tokio::process::Command::new(cli)
        .args(args)
        .args(forward)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| failed(&e.to_string()))?;
    let stdout = tube.stdout.take().ok_or_else(|| failed("no standard output"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await;
    let Ok(Ok(Some(line))) = line else { return Err(failed("it did not start listening")) };
    println!("{line}");
    let local = line.trim_start_matches("listening on ").split(',').next().unwrap_or_default().to_string();
    println!("$ curl -s http://{local}/healthz");
    let through = reqwest::get(format!("http://{local}/healthz")).await.map_err(|e| failed(&e.to_string()))?;
    println!("{}", through.text().await.map_err(|e| failed(&e.to_string()))?);
    let connected = "--for=jsonpath={.status.state}=Connected";
    kubectl(plane, &["-n", NAMESPACE, "wait", "tubes", "--all", connected, "--timeout=30s"])?;
    kubectl(plane, &["-n", NAMESPACE, "get", "tubes"])?;
    if let Some(pid) = tube.id() {
        // Ctrl-C: the CLI closes the tube and deletes it.
        let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
    }
    let ended = tokio::time::timeout(Duration::from_secs(30), tube.wait()).await;
    match ended {
        Ok(Ok(status)) if status.success() => Ok(()),
        other => Err(failed(&format!("it did not close cleanly: {other:?}"))),
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

fn with_log(e: HarnessError, operator: &Process) -> HarnessError {
    HarnessError::Other(format!("{e}\nthe operator's log:\n{}", operator.log_tail(20)))
}

/// Builds the web UI into `web/dist` with npm (its packages from the npm
/// registry the first time), as the gateway image's build stage does.
fn build_web_ui() -> tidepool_tests::Result<PathBuf> {
    let web = repo().join("web");
    let npm = |args: &[&str]| -> tidepool_tests::Result<()> {
        let status = Command::new("npm")
            .args(args)
            .current_dir(&web)
            .status()
            .map_err(HarnessError::io("running npm (the web UI needs Node.js 20 and npm)"))?;
        if status.success() {
            Ok(())
        } else {
            Err(HarnessError::Other(format!("npm {} failed in {}", args.join(" "), web.display())))
        }
    };
    if !web.join("node_modules").is_dir() {
        eprintln!("Installing the web UI's packages from npm...");
        npm(&["ci", "--no-audit", "--no-fund"])?;
    }
    eprintln!("Building the web UI...");
    npm(&["run", "build", "--silent"])?;
    Ok(web.join("dist"))
}

/// Opens the web UI in Debian's Chromium (web/tests/browser.mjs drives it
/// as a user would): the connection test, its results link, the live
/// latency graph with the pod killed and healed, and the cluster view.
/// Prints what it saw.
fn show_web_ui(plane: &ControlPlane, gateway_url: &str, api_token: &str) -> tidepool_tests::Result<()> {
    println!("$ open {gateway_url}/");
    if !Path::new("/usr/bin/chromium").exists() {
        println!("(Chromium is not installed: `apt-get install chromium` to have the web UI driven here.)");
        return Ok(());
    }
    let screenshots = plane.dir().join("browser");
    // The script bounds each of its waits; `timeout` bounds the whole.
    let output = Command::new("timeout")
        .arg("300")
        .arg("node")
        .arg(repo().join("web/tests/browser.mjs"))
        .arg(gateway_url)
        .arg(&screenshots)
        // The chart's API token stands in for an operator's own, for the cluster view.
        .env("TIDEPOOL_CLUSTER_TOKEN", api_token)
        .env("TIDEPOOL_CLUSTER_NAMESPACE", NAMESPACE)
        .output()
        .map_err(HarnessError::io("running the browser"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap_or_default();
    if !output.status.success() {
        return Err(HarnessError::Other(format!(
            "the web UI in Chromium: {}\n{}",
            report["failure"].as_str().unwrap_or("no report"),
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    let grades = &report["results"]["grades"];
    let session = &report["session"];
    println!(
        "The web UI in Chromium: bufferbloat grade {}, household grade {}, {:.0} Mbit/s down, in TestSession {}/{}",
        grades["bufferbloat"].as_str().unwrap_or("?"),
        grades["household"].as_str().unwrap_or("?"),
        report["results"]["downloadMbps"].as_f64().unwrap_or(0.0),
        session["namespace"].as_str().unwrap_or("?"),
        session["name"].as_str().unwrap_or("?"),
    );
    let heal = &report["live"]["heals"][0];
    println!(
        "The live latency graph: pod {} killed, healed onto pod {} after {:.0} ms",
        heal["from"].as_str().unwrap_or("?"),
        heal["to"].as_str().unwrap_or("?"),
        heal["gapMs"].as_f64().unwrap_or(0.0),
    );
    let cluster = &report["cluster"];
    println!(
        "The cluster view: {} pools, {} sessions, {} backends, live",
        cluster["pools"].as_array().map_or(0, Vec::len),
        cluster["sessionsTotal"].as_u64().unwrap_or(0),
        cluster["backends"].as_array().map_or(0, Vec::len),
    );
    println!("Screenshots: {}", screenshots.display());
    Ok(())
}

/// Runs the gateway as the chart's Deployment would, on loopback: its
/// arguments, its ServiceAccount's token and rights, the local operator.
/// Returns the process, its URL and its admin URL once it is ready.
async fn start_gateway(
    plane: &ControlPlane,
    chart: &Path,
    values: &str,
    binary: &Path,
    operator_url: &str,
    web_ui: &Path,
) -> tidepool_tests::Result<(Process, String, String)> {
    let (port, admin_port) = (free_port()?, free_port()?);
    let audience = "https://kubernetes.default.svc.cluster.local";
    let token = plane.service_account_token(NAMESPACE, "tidepool-gateway", audience, None).await?;
    let token_file = plane.dir().join("gateway-token");
    std::fs::write(&token_file, token.trim()).map_err(HarnessError::io("writing the gateway's token"))?;
    let set = [
        ("--listen", format!("127.0.0.1:{port}")),
        ("--admin-listen", format!("127.0.0.1:{admin_port}")),
        // The relay's UDP beside the users' TCP port, as the chart has it.
        ("--udp-listen", format!("127.0.0.1:{port}")),
        ("--udp-advertised-port", port.to_string()),
        ("--operator-url", operator_url.to_string()),
        ("--ui-dir", web_ui.display().to_string()),
    ];
    let args: Vec<String> = tidepool_tests::with_flags(chart_args(chart, values, "tidepool-gateway")?, &set)
        .into_iter()
        // Where the kubelet would mount the account's token.
        .chain([format!("--token-file={}", token_file.display())])
        .collect();
    let kubeconfig = plane.service_account_kubeconfig(NAMESPACE, "tidepool-gateway").await?;
    eprintln!("Starting the gateway with the chart's arguments...");
    let gateway = plane.spawn("tidepool-gateway", binary, &args, &[("KUBECONFIG", path(&kubeconfig))])?;
    let (url, admin) = (format!("http://127.0.0.1:{port}"), format!("http://127.0.0.1:{admin_port}"));
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), "the gateway's /readyz", || async {
        http.get(format!("{admin}/readyz")).send().await.ok()?.status().is_success().then_some(())
    })
    .await
    .map_err(|e| HarnessError::Other(format!("{e}\nthe gateway's log:\n{}", gateway.log_tail(20))))?;
    Ok((gateway, url, admin))
}

/// The first container's arguments of Deployment `name` as the chart renders
/// it with `values` (`--set`).
fn chart_args(chart: &Path, values: &str, name: &str) -> tidepool_tests::Result<Vec<String>> {
    let rendered = Command::new(bin_dir()?.join("helm"))
        .args(["template", "tidepool", path(chart), "--namespace", NAMESPACE, "--kube-version", "1.36.3"])
        .args(["--set", values])
        .output()
        .map_err(HarnessError::io("running helm template"))?;
    let text = String::from_utf8_lossy(&rendered.stdout);
    for document in text.split("\n---") {
        let Ok(value) = serde_yaml::from_str::<serde_yaml::Value>(document) else { continue };
        if value["kind"].as_str() == Some("Deployment") && value["metadata"]["name"].as_str() == Some(name) {
            let args = &value["spec"]["template"]["spec"]["containers"][0]["args"];
            return Ok(args.as_sequence().into_iter().flatten().filter_map(|a| a.as_str().map(String::from)).collect());
        }
    }
    Err(HarnessError::Other(format!(
        "helm template rendered no Deployment {name}: {}",
        String::from_utf8_lossy(&rendered.stderr)
    )))
}

fn kubectl(plane: &ControlPlane, args: &[&str]) -> tidepool_tests::Result<()> {
    println!("$ kubectl {}", args.join(" "));
    command(plane.kubectl().args(args))
}

fn command(command: &mut Command) -> tidepool_tests::Result<()> {
    let status = command.status().map_err(HarnessError::io(format!("running {command:?}")))?;
    if status.success() { Ok(()) } else { Err(HarnessError::Other(format!("{command:?} failed: {status}"))) }
}

/// Runs the real agent for each node, as its DaemonSet pod would, with a
/// token of the chart's agent account bound to that pod. They read this
/// machine's /proc. Returns each process and its /metrics address.
async fn start_agents(
    plane: &ControlPlane,
    agent_bin: &Path,
    url: &str,
) -> tidepool_tests::Result<Vec<(Process, String)>> {
    let pods: Api<Pod> = Api::namespaced(plane.client().await?, NAMESPACE);
    let mut agents = Vec::new();
    for node in NODES {
        let params = ListParams::default()
            .labels("app.kubernetes.io/name=tidepool-agent")
            .fields(&format!("spec.nodeName={node}"));
        let (pod, uid) = eventually(Duration::from_secs(60), &format!("the agent pod on {node}"), || async {
            let pod = pods.list(&params).await.ok()?.items.into_iter().next()?;
            Some((pod.name_any(), pod.uid()?))
        })
        .await?;
        let token = plane.service_account_token(NAMESPACE, "tidepool-agent", "tidepool", Some((&pod, &uid))).await?;
        let token_file = plane.dir().join(format!("agent-{node}.token"));
        std::fs::write(&token_file, token).map_err(HarnessError::io("writing an agent token"))?;
        let address = format!("127.0.0.1:{}", free_port()?);
        let args = [
            format!("--operator-url={url}"),
            format!("--token-file={}", token_file.display()),
            format!("--node-name={node}"),
            "--address=127.0.0.1".to_string(),
            format!("--listen={address}"),
        ];
        agents.push((plane.spawn(&format!("agent-{node}"), agent_bin, &args, &[])?, address));
    }
    let backends: Api<tidepool_crds::Backend> = Api::all(plane.client().await?);
    eventually(Duration::from_secs(30), "a Backend for each node", || async {
        (backends.list(&ListParams::default()).await.ok()?.items.len() == NODES.len()).then_some(())
    })
    .await?;
    Ok(agents)
}

/// Debian's Prometheus, when installed: the operator and the agents by
/// address, the session pods found through the API server (the pool pods'
/// IPs, port 8080), every 5 s.
fn start_prometheus(
    plane: &ControlPlane,
    operator: &str,
    agents: &[String],
) -> tidepool_tests::Result<Option<(Process, String)>> {
    let binary = Path::new("/usr/bin/prometheus");
    if !binary.exists() {
        println!("(Prometheus is not installed: `apt-get install prometheus` to have it scrape everything here.)");
        return Ok(None);
    }
    let agents: Vec<String> = agents.iter().map(|a| format!("'{a}'")).collect();
    let config = format!(
        "global:\n  scrape_interval: 5s\nscrape_configs:\n\
         - job_name: operator\n  static_configs: [{{targets: ['{operator}']}}]\n\
         - job_name: agent\n  static_configs: [{{targets: [{}]}}]\n\
         - job_name: session\n  kubernetes_sd_configs:\n  - role: pod\n    kubeconfig_file: {}\n    namespaces: {{names: [{NAMESPACE}]}}\n  \
         relabel_configs:\n  - source_labels: [__meta_kubernetes_pod_label_tidepool_dev_pool]\n    regex: .+\n    action: keep\n  \
         - source_labels: [__meta_kubernetes_pod_ip]\n    target_label: __address__\n    replacement: $1:8080\n  \
         - source_labels: [__meta_kubernetes_pod_name]\n    target_label: pod\n",
        agents.join(", "),
        plane.kubeconfig().display()
    );
    let file = plane.dir().join("prometheus.yml");
    std::fs::write(&file, config).map_err(HarnessError::io("writing prometheus.yml"))?;
    let port = free_port()?;
    let args = [
        format!("--config.file={}", file.display()),
        format!("--storage.tsdb.path={}", plane.dir().join("prometheus-data").display()),
        format!("--web.listen-address=127.0.0.1:{port}"),
    ];
    let process = plane.spawn("prometheus", binary, &args, &[])?;
    Ok(Some((process, format!("http://127.0.0.1:{port}"))))
}

/// POSTs `body` to the operator's API until it answers with success.
async fn post(url: &str, path: &str, token: &str, body: &'static str) -> tidepool_tests::Result<String> {
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), &format!("the operator's API to answer {path}"), || async {
        let response = http
            .post(format!("{url}{path}"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.text().await.ok()
    })
    .await
}
