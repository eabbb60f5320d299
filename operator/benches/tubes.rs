//! Tube set-up on the real control plane: from the Tube applied (the
//! client's POST to the operator's tube API, its offer in hand) to the
//! first byte echoed through the tube, beside `ssh -L` to Debian's sshd
//! on loopback (from starting `ssh` to the first byte through its forward).
//!
//! `cargo bench -p tidepool-operator --bench tubes` starts the harness
//! (kwok nodes, kube-apiserver, etcd), the operator as a local process, the
//! session pod behind each kwok pod of a pool of 4, and an echo target the
//! pool's allowlist names. Each of `TIDEPOOL_BENCH_TUBES` tubes (default
//! 30) is made one after another by an in-process client (the CLI's own
//! engine): the POST answers once the pod has answered, the client
//! connects, opens a connection through the tube to the echo target and
//! sends one byte. Each tube is then deleted, which frees its pod; the pool
//! refills behind it.

use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tidepool_crds::WarmPool;
use tidepool_protocol::tube::{CreateTube, TubeView, decode_sdp, encode_sdp};
use tidepool_tests::sshd::Sshd;
use tidepool_tests::targets::echo_target;
use tidepool_tests::{ControlPlane, FakeNode, Options, PodRunner, eventually, free_port, workspace_binary};
use tidepool_tube::{Limits, Mux, Peer, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "bench-api-token-0123456789";

/// One byte there and back on `tcp`.
async fn first_byte(mut tcp: TcpStream) {
    tcp.write_all(b"x").await.expect("write");
    let mut byte = [0];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut byte))
        .await
        .expect("echo in time")
        .expect("echo");
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn summary(name: &str, mut ms: Vec<f64>) -> f64 {
    ms.sort_by(f64::total_cmp);
    let p50 = percentile(&ms, 0.5);
    println!(
        "{name:<34} n {:>3}  p50 {p50:>7.1} ms  p99 {:>7.1} ms  min {:>7.1}  max {:>7.1}",
        ms.len(),
        percentile(&ms, 0.99),
        ms[0],
        ms[ms.len() - 1]
    );
    p50
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let count: usize = std::env::var("TIDEPOOL_BENCH_TUBES").ok().and_then(|n| n.parse().ok()).unwrap_or(30);
    let plane = ControlPlane::start_with(Options { nodes: vec![FakeNode::new("node-0")], ..Options::default() })
        .await
        .expect("control plane");
    let client = plane.client().await.expect("client");
    let token_file = plane.dir().join("api-token");
    std::fs::write(&token_file, TOKEN).expect("token file");
    let port = free_port().expect("port");
    let url = format!("http://127.0.0.1:{port}");
    let args = [format!("--listen=127.0.0.1:{port}"), format!("--api-token-file={}", token_file.display())];
    let program = std::path::Path::new(env!("CARGO_BIN_EXE_tidepool-operator"));
    let _operator = plane.spawn("operator", program, &args, &[("RUST_LOG", "warn")]).expect("operator");
    let session_bin = workspace_binary("tidepool-session", "tidepool-session").expect("session pod binary");
    let runner =
        PodRunner::start(client.clone(), "default", "tidepool.dev/pool=edge", session_bin, plane.dir().to_path_buf());
    let echo = echo_target().await;
    let pools: Api<WarmPool> = Api::namespaced(client.clone(), "default");
    let pool = json!({
        "apiVersion": tidepool_crds::API_VERSION, "kind": "WarmPool",
        "metadata": { "name": "edge" },
        "spec": {
            "size": 4,
            "tier": { "vcpu": 1, "memoryMiB": 64 },
            "tubes": { "allow": [{ "cidr": "127.0.0.1/32", "ports": [echo] }] },
            "template": { "spec": { "containers": [{
                "name": "session", "image": "tidepool/session:bench", "ports": [{ "containerPort": 9000 }],
                "env": [{ "name": "RUST_LOG", "value": std::env::var("TIDEPOOL_BENCH_POD_LOG").unwrap_or_else(|_| "info".into()) }]
            }] } }
        }
    });
    pools.patch("edge", &PatchParams::apply("bench").force(), &Patch::Apply(&pool)).await.expect("pool");
    eventually(Duration::from_secs(60), "4 warm pods with their processes", || async {
        let warm = pools.get("edge").await.ok()?.status?.warm;
        (warm == 4 && runner.running().len() == 4).then_some(())
    })
    .await
    .expect("the pool to fill");

    let http = reqwest::Client::new();
    let mut applied_to_byte = Vec::new();
    let mut applied_to_answer = Vec::new();
    for i in 0..count {
        // Wait for a warm pod with its process, as a user arriving at a filled pool would find.
        eventually(Duration::from_secs(60), "a warm pod", || async {
            let warm = pools.get("edge").await.ok()?.status?.warm;
            (warm >= 1 && runner.running().len() >= 4).then_some(())
        })
        .await
        .expect("a warm pod");
        let settings = Settings { udp: vec!["127.0.0.1:0".parse().expect("address")], ..Settings::default() };
        let peer = Peer::new(&settings).await.expect("peer");
        let offer = peer.offer().await.expect("offer");
        let request = CreateTube {
            namespace: None,
            pool: Some("edge".into()),
            session: None,
            conversation_type: tidepool_crds::tube::ConversationType::Tunnel,
            target: Some(tidepool_crds::tube::Target { host: "127.0.0.1".into(), port: i32::from(echo) }),
            offer: encode_sdp(&offer),
            ttl_seconds: None,
            idle_timeout_seconds: None,
            ice_servers: Vec::new(),
        };
        let applied = Instant::now();
        let response = http
            .post(format!("{url}/api/v1/tubes"))
            .bearer_auth(TOKEN)
            .json(&request)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status().as_u16(), 201, "tube {i}: {}", response.text().await.unwrap_or_default());
        let view: TubeView = response.json().await.expect("the tube");
        applied_to_answer.push(applied.elapsed().as_secs_f64() * 1e3);
        peer.accept(&decode_sdp(view.answer.as_deref().expect("answer")).expect("SDP")).await.expect("accept");
        let mut opened = peer.open_heard(Duration::from_secs(10)).await.expect("open");
        let (mux, driver) = Mux::client(opened.take_channel().expect("channel"), Limits::default());
        let driver = tokio::spawn(driver);
        let local = TcpListener::bind("127.0.0.1:0").await.expect("local");
        let app = TcpStream::connect(local.local_addr().expect("local address")).await.expect("connect");
        let (carried, _) = local.accept().await.expect("accept");
        // The bridge runs beside the work, as `tidepool tube` runs it.
        let work = async {
            let dialled = tokio::time::timeout(Duration::from_secs(15), mux.open(carried, "127.0.0.1", echo)).await;
            match dialled {
                Ok(Ok(())) => {
                    first_byte(app).await;
                    Ok(applied.elapsed())
                }
                Ok(Err(refusal)) => Err(format!("refused: {refusal}")),
                Err(_) => Err("the pod did not answer the open in 15 s".to_string()),
            }
        };
        let outcome = tokio::select! {
            outcome = work => outcome,
            ended = opened.bridge() => Err(format!("the bridge ended: {ended:?}")),
        };
        mux.close();
        opened.close().await;
        let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
        let took = match outcome {
            Ok(took) => took,
            Err(why) => {
                let tube = http.get(format!("{url}/api/v1/tubes/{}", view.name)).bearer_auth(TOKEN).send().await;
                let tube = match tube {
                    Ok(answer) => answer.text().await.unwrap_or_default(),
                    Err(e) => e.to_string(),
                };
                panic!("tube {i}: {why}; the tube: {tube}");
            }
        };
        applied_to_byte.push(took.as_secs_f64() * 1e3);
        eprintln!("tube {i}: answered in {:.0} ms, first byte at {:.0} ms", applied_to_answer[i], applied_to_byte[i]);
        let deleted = http.delete(format!("{url}/api/v1/tubes/{}", view.name)).bearer_auth(TOKEN).send().await;
        assert!(deleted.is_ok_and(|r| r.status().is_success()), "deleting tube {i}");
    }
    println!("tube set-up on the harness, {count} tubes one after another, pool of 4 warm pods");
    summary("Tube applied → answer in status", applied_to_answer);
    let tube_p50 = summary("Tube applied → first byte echoed", applied_to_byte);

    // The peer: `ssh -L` through Debian's sshd to the same echo target.
    match Sshd::start("operator-bench").await {
        Some(sshd) => {
            let mut ssh = Vec::new();
            for _ in 0..count {
                let started = Instant::now();
                let forward = sshd.forward(echo).expect("ssh");
                let tcp = forward.ready().await.expect("the forward");
                first_byte(tcp).await;
                ssh.push(started.elapsed().as_secs_f64() * 1e3);
            }
            let ssh_p50 = summary("ssh -L started → first byte echoed", ssh);
            println!("tube / ssh -L (p50): {:.2}", tube_p50 / ssh_p50);
        }
        None => println!("ssh -L: sshd or ssh is not installed; no peer figure"),
    }
}
