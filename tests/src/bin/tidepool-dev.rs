//! `tidepool-dev`: brings up Tidepool's local cluster for a person to use.
//!
//! Starts the harness's real control plane with three kwok nodes (one with
//! GPUs), installs the CRDs, builds and starts the operator and an agent for
//! each node as local processes, applies an example WarmPool, asks the
//! operator's API for a session and for a route, shows what is there, and
//! keeps running until Ctrl-C. `--check`
//! stops after showing (for CI).

use std::process::ExitCode;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use tidepool_tests::{ControlPlane, FakeNode, HarnessError, Options, eventually, free_port};

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
        FakeNode::new("kwok-node-0"),
        FakeNode::new("kwok-node-1").cpu("16").memory("64Gi"),
        FakeNode::new("kwok-gpu-0").cpu("32").memory("128Gi").gpus(4),
    ];
    let plane = ControlPlane::start_with(Options { nodes, ..Options::default() }).await?;

    // The agents' ServiceAccount, before the operator makes their DaemonSet.
    plane.service_account_token("default", "tidepool-agent", "tidepool", None).await?;
    eprintln!("Building and starting tidepool-operator...");
    let operator_bin = tidepool_tests::workspace_binary("tidepool-operator", "tidepool-operator")?;
    let token = "tidepool-dev-token";
    let token_file = plane.dir().join("api-token");
    std::fs::write(&token_file, token).map_err(HarnessError::io("writing the API token"))?;
    let port = free_port()?;
    let url = format!("http://127.0.0.1:{port}");
    let args = [format!("--listen=127.0.0.1:{port}"), format!("--api-token-file={}", token_file.display())];
    let _operator = plane.spawn("tidepool-operator", &operator_bin, &args, &[])?;
    eprintln!("Building and starting a tidepool-agent for each node...");
    let _agents = start_agents(&plane, &url).await?;

    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/warm-pool.yaml");
    kubectl(&plane, &["apply", "-f", example])?;
    kubectl(&plane, &["get", "nodes", "-o", "wide"])?;
    kubectl(&plane, &["get", "crds"])?;
    kubectl(&plane, &["wait", "wp/edge", "--for=condition=Ready", "--timeout=60s"])?;
    kubectl(&plane, &["get", "warmpools", "-o", "wide"])?;
    kubectl(&plane, &["get", "pods", "-o", "wide"])?;

    println!("$ curl -s -X POST {url}/api/v1/sessions -H 'Authorization: Bearer {token}' -d '{{\"pool\":\"edge\"}}'");
    let session = post_session(&url, token).await?;
    println!("{session}");
    kubectl(&plane, &["get", "testsessions"])?;
    kubectl(&plane, &["wait", "backends", "--all", "--for=condition=Ready", "--timeout=30s"])?;
    kubectl(&plane, &["get", "backends"])?;
    let route = r#"{"tier":{"vcpu":1,"memoryMiB":256}}"#;
    println!("$ curl -s -X POST {url}/api/v1/route -H 'Authorization: Bearer {token}' -d '{route}'");
    println!("{}", post(&url, "/api/v1/route", token, route).await?);
    let kubeconfig = plane.kubeconfig().display();
    println!();
    println!("Tidepool's local cluster is up ({}).", plane.server());
    println!("Pods get loopback addresses from {}.", plane.pod_cidr());
    println!("In another terminal:");
    println!("  export KUBECONFIG={kubeconfig}");
    println!("  export PATH={}:$PATH", plane.bin().display());
    println!("  kubectl get warmpools,testsessions,backends,tubes -A");
    println!("  kubectl explain warmpool.spec.tier");
    println!("  curl -s -X POST {url}/api/v1/sessions -H 'Authorization: Bearer {token}' -d '{{\"pool\":\"edge\"}}'");
    println!("  curl -s -X POST {url}/api/v1/route -H 'Authorization: Bearer {token}' -d '{route}'");
    println!("  curl -s {url}/metrics | grep tidepool_");
    if check_only {
        return Ok(());
    }
    println!("Press Ctrl-C to stop everything and remove {}.", plane.dir().display());
    tokio::signal::ctrl_c().await.map_err(tidepool_tests::HarnessError::io("waiting for Ctrl-C"))?;
    eprintln!("Stopping.");
    Ok(())
}

fn kubectl(plane: &ControlPlane, args: &[&str]) -> tidepool_tests::Result<()> {
    println!("$ kubectl {}", args.join(" "));
    let status = plane.kubectl().args(args).status().map_err(tidepool_tests::HarnessError::io("running kubectl"))?;
    if status.success() {
        Ok(())
    } else {
        Err(tidepool_tests::HarnessError::Other(format!("kubectl {} failed: {status}", args.join(" "))))
    }
}

/// Runs the real agent for each node, as its DaemonSet pod would, with a
/// token bound to that pod. They read this machine's /proc.
async fn start_agents(plane: &ControlPlane, url: &str) -> tidepool_tests::Result<Vec<tidepool_tests::Process>> {
    let agent_bin = tidepool_tests::workspace_binary("tidepool-agent", "tidepool-agent")?;
    let pods: Api<Pod> = Api::namespaced(plane.client().await?, "default");
    let mut agents = Vec::new();
    for node in ["kwok-node-0", "kwok-node-1", "kwok-gpu-0"] {
        let params = ListParams::default()
            .labels("app.kubernetes.io/name=tidepool-agent")
            .fields(&format!("spec.nodeName={node}"));
        let (pod, uid) = eventually(Duration::from_secs(60), &format!("the agent pod on {node}"), || async {
            let pod = pods.list(&params).await.ok()?.items.into_iter().next()?;
            Some((pod.name_any(), pod.uid()?))
        })
        .await?;
        let token = plane.service_account_token("default", "tidepool-agent", "tidepool", Some((&pod, &uid))).await?;
        let token_file = plane.dir().join(format!("agent-{node}.token"));
        std::fs::write(&token_file, token).map_err(HarnessError::io("writing an agent token"))?;
        let args = [
            format!("--operator-url={url}"),
            format!("--token-file={}", token_file.display()),
            format!("--node-name={node}"),
            "--address=127.0.0.1".to_string(),
            format!("--listen=127.0.0.1:{}", free_port()?),
        ];
        agents.push(plane.spawn(&format!("agent-{node}"), &agent_bin, &args, &[])?);
    }
    let backends: Api<tidepool_crds::Backend> = Api::all(plane.client().await?);
    eventually(Duration::from_secs(30), "a Backend for each node", || async {
        (backends.list(&ListParams::default()).await.ok()?.items.len() == 3).then_some(())
    })
    .await?;
    Ok(agents)
}

/// Asks the operator's API for a session on the example pool, once it answers.
async fn post_session(url: &str, token: &str) -> tidepool_tests::Result<String> {
    post(url, "/api/v1/sessions", token, r#"{"pool":"edge"}"#).await
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
