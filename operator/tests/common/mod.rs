//! Shared by the operator's tests: a control plane with the operator running
//! as a local process against it, and a small client for its HTTP API.

#![allow(dead_code)]

pub mod invariants;

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};
use tidepool_crds::WarmPool;
use tidepool_tests::{ControlPlane, FakeNode, Options, Process, eventually, free_port};

/// The static token (the opt-in for small setups), valid in `default`.
pub const TOKEN: &str = "test-api-token-0123456789";

pub struct Cluster {
    pub plane: ControlPlane,
    pub client: kube::Client,
    token_file: PathBuf,
}

/// One running operator replica.
pub struct Operator {
    pub process: Process,
    pub url: String,
}

impl Cluster {
    pub async fn start(nodes: usize) -> Self {
        Self::start_with(nodes, false).await
    }

    /// Like [`Cluster::start`], with the API server's audit log of writes.
    pub async fn start_audited(nodes: usize) -> Self {
        Self::start_with(nodes, true).await
    }

    async fn start_with(nodes: usize, audit: bool) -> Self {
        let nodes = (0..nodes).map(|i| FakeNode::new(&format!("node-{i}"))).collect();
        let plane = ControlPlane::start_with(Options { nodes, audit, ..Options::default() }).await.unwrap();
        let client = plane.client().await.unwrap();
        let token_file = plane.dir().join("api-token");
        std::fs::write(&token_file, TOKEN).unwrap();
        Self { plane, client, token_file }
    }

    /// Starts an operator replica and waits until its API answers.
    pub async fn operator(&self, name: &str, extra: &[&str]) -> Operator {
        self.operator_on(name, free_port().unwrap(), extra).await
    }

    /// The API token file.
    pub fn token_file(&self) -> &std::path::Path {
        &self.token_file
    }

    /// The arguments of replica `name` serving on `port`: a 3 s lease, so
    /// failovers are quick, unless `extra` sets its own.
    pub fn operator_args(&self, name: &str, port: u16, extra: &[&str]) -> Vec<String> {
        let mut args = vec![
            format!("--listen=127.0.0.1:{port}"),
            format!("--api-token-file={}", self.token_file.display()),
            format!("--identity={name}"),
        ];
        if !extra.iter().any(|a| a.starts_with("--lease-seconds")) {
            args.push("--lease-seconds=3".to_string());
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    }

    /// Like [`Cluster::operator`], on a chosen port.
    pub async fn operator_on(&self, name: &str, port: u16, extra: &[&str]) -> Operator {
        self.start_operator(name, port, extra, &[]).await
    }

    /// Like [`Cluster::operator`], reaching the API server as `kubeconfig` says.
    pub async fn operator_with_kubeconfig(&self, name: &str, kubeconfig: &std::path::Path, extra: &[&str]) -> Operator {
        let kubeconfig = kubeconfig.display().to_string();
        self.start_operator(name, free_port().unwrap(), extra, &[("KUBECONFIG", &kubeconfig)]).await
    }

    async fn start_operator(&self, name: &str, port: u16, extra: &[&str], env: &[(&str, &str)]) -> Operator {
        let args = self.operator_args(name, port, extra);
        let program = std::path::Path::new(env!("CARGO_BIN_EXE_tidepool-operator"));
        let process = self.plane.spawn(name, program, &args, env).unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        eventually(Duration::from_secs(30), "the operator's /readyz", || async {
            let r = http.get(format!("{url}/readyz")).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", process.log_tail(40)));
        Operator { process, url }
    }

    /// The real session pod behind every kwok pod of pool `pool` in
    /// `default`, until the runner is dropped.
    pub fn session_pods(&self, pool: &str) -> tidepool_tests::PodRunner {
        let program = tidepool_tests::workspace_binary("tidepool-session", "tidepool-session").unwrap();
        let selector = format!("tidepool.dev/pool={pool}");
        let dir = self.plane.dir().to_path_buf();
        tidepool_tests::PodRunner::start(self.client.clone(), "default", &selector, program, dir)
    }

    /// Creates (or updates) WarmPool `name` with `size` warm pods.
    pub async fn pool(&self, name: &str, size: i32) {
        let pools: Api<WarmPool> = Api::namespaced(self.client.clone(), "default");
        let pool = json!({
            "apiVersion": tidepool_crds::API_VERSION, "kind": "WarmPool",
            "metadata": { "name": name },
            "spec": {
                "size": size,
                // Tests hold many sessions at once; the default (100) is for people.
                "maxSize": 1000,
                "tier": { "vcpu": 1, "memoryMiB": 64 },
                "template": { "spec": { "containers": [{
                    "name": "session", "image": "tidepool/session:test",
                    "ports": [{ "containerPort": 9000 }],
                    "resources": { "requests": { "cpu": "10m", "memory": "16Mi" } }
                }] } }
            }
        });
        pools.patch(name, &PatchParams::apply("test").force(), &Patch::Apply(&pool)).await.unwrap();
    }

    /// Waits until the pool reports `warm` warm and `assigned` assigned pods.
    /// Both, because right after a claim the status can still be the one
    /// written before it.
    pub async fn wait_counts(&self, name: &str, warm: i32, assigned: i32, limit: Duration) -> WarmPool {
        let pools: Api<WarmPool> = Api::namespaced(self.client.clone(), "default");
        eventually(limit, &format!("pool {name} to have {warm} warm and {assigned} assigned pods"), || async {
            let pool = pools.get(name).await.ok()?;
            let status = pool.status.as_ref()?;
            (status.warm == warm && status.assigned == assigned).then_some(pool)
        })
        .await
        .unwrap()
    }

    /// Waits until the pool reports `warm` warm pods; on a timeout, says
    /// what the pool and its pods look like.
    pub async fn wait_warm(&self, name: &str, warm: i32, limit: Duration) -> WarmPool {
        let pools: Api<WarmPool> = Api::namespaced(self.client.clone(), "default");
        let waited = eventually(limit, &format!("pool {name} to have {warm} warm pods"), || async {
            let pool = pools.get(name).await.ok()?;
            (pool.status.as_ref()?.warm == warm).then_some(pool)
        })
        .await;
        match waited {
            Ok(pool) => pool,
            Err(e) => {
                let status = pools.get(name).await.ok().and_then(|p| p.status);
                let pods: Api<Pod> = Api::namespaced(self.client.clone(), "default");
                let listed = pods.list(&ListParams::default().labels(&format!("tidepool.dev/pool={name}"))).await;
                let pods: Vec<String> = listed
                    .map(|l| l.items)
                    .unwrap_or_default()
                    .iter()
                    .map(|p| {
                        let phase = p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
                        let node = p.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default();
                        format!("{} {phase} on {node:?} {:?}", p.name_any(), p.labels())
                    })
                    .collect();
                panic!("{e}\nthe pool's status: {status:#?}\nits pods: {pods:#?}")
            }
        }
    }
}

/// Reads until the server closes the connection: how long that took, and what came.
pub fn until_closed(stream: &mut std::net::TcpStream, limit: Duration) -> (Duration, String) {
    use std::io::Read;
    let started = std::time::Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut answer = Vec::new();
    // A reset (the server closed with our request unread) is closed too; a
    // timeout is not.
    if let Err(e) = stream.read_to_end(&mut answer) {
        let timed_out = matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut);
        assert!(!timed_out, "still open after {limit:?}");
    }
    (started.elapsed(), String::from_utf8_lossy(&answer).into_owned())
}

/// POSTs `body` to `/api/v1/sessions` and returns the status and JSON.
pub async fn post_session(operator: &Operator, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/sessions", operator.url))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    let code = response.status().as_u16();
    (code, response.json().await.unwrap_or(Value::Null))
}
