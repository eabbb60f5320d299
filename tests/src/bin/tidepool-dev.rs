//! `tidepool-dev`: brings up Tidepool's local cluster for a person to use.
//!
//! Starts the harness's real control plane with three kwok nodes (one with
//! GPUs), installs the CRDs, applies an example WarmPool, shows what is there,
//! and keeps running until Ctrl-C. `--check` stops after showing (for CI).

use std::process::ExitCode;

use tidepool_tests::{ControlPlane, FakeNode, Options};

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
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/warm-pool.yaml");
    kubectl(&plane, &["apply", "-f", example])?;
    kubectl(&plane, &["get", "nodes", "-o", "wide"])?;
    kubectl(&plane, &["get", "crds"])?;
    kubectl(&plane, &["get", "warmpools"])?;
    let kubeconfig = plane.kubeconfig().display();
    println!();
    println!("Tidepool's local cluster is up ({}).", plane.server());
    println!("Pods get loopback addresses from {}.", plane.pod_cidr());
    println!("In another terminal:");
    println!("  export KUBECONFIG={kubeconfig}");
    println!("  export PATH={}:$PATH", plane.bin().display());
    println!("  kubectl get warmpools,testsessions,backends,tubes -A");
    println!("  kubectl explain warmpool.spec.tier");
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
