//! Tubes on the harness: the operator, the real session pod behind each
//! kwok pod, and the real `tidepool tube`. A Tube made by the CLI is
//! answered by a pod of the pool and carries traffic to a target; the
//! pool's allowlist decides what it may reach (at creation, and per SOCKS5
//! connection); Ctrl-C closes a tube and deletes it; a pod deleted under a
//! tube fails it, with the reason in its status and from the CLI.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::Cluster;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use tidepool_crds::tube::TubeState;
use tidepool_crds::{TestSession, Tube, WarmPool};
use tidepool_tests::targets::echo_target;
use tidepool_tests::{eventually, free_port, workspace_binary};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

const PATIENCE: Duration = Duration::from_secs(30);

/// A running `tidepool tube`, and the address it listens on.
struct TubeCli {
    child: Child,
    listening: String,
    stderr: tokio::task::JoinHandle<String>,
}

impl TubeCli {
    /// Starts `tidepool tube` with `args` and waits for its listening line.
    async fn start(cli: &std::path::Path, base: &[String], args: &[&str]) -> Result<Self, String> {
        let mut child = Command::new(cli)
            .arg("tube")
            .args(base)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stderr_lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let stderr = tokio::spawn(async move {
            let mut text = String::new();
            while let Ok(Some(line)) = stderr_lines.next_line().await {
                text.push_str(&line);
                text.push('\n');
            }
            text
        });
        let line = tokio::time::timeout(PATIENCE, stdout.next_line()).await;
        match line {
            Ok(Ok(Some(line))) if line.starts_with("listening on ") => {
                let listening = line["listening on ".len()..].split([',', ' ']).next().unwrap().to_string();
                Ok(Self { child, listening, stderr })
            }
            other => {
                let _ = child.kill().await;
                let stderr = stderr.await.unwrap_or_default();
                Err(format!("tidepool tube did not listen ({other:?}): {stderr}"))
            }
        }
    }

    /// Waits for the process to end; its status and what it said.
    async fn ended(mut self) -> (std::process::ExitStatus, String) {
        let status = tokio::time::timeout(PATIENCE, self.child.wait()).await.expect("tidepool tube to end").unwrap();
        (status, self.stderr.await.unwrap_or_default())
    }
}

async fn echo_through(address: &str, size: usize) {
    let mut tcp = TcpStream::connect(address).await.unwrap();
    let sent: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
    let (mut reader, mut writer) = tcp.split();
    let write = async {
        writer.write_all(&sent).await.unwrap();
        writer.shutdown().await.unwrap();
    };
    let mut got = Vec::new();
    let read = reader.read_to_end(&mut got);
    let (_, read) = tokio::time::timeout(PATIENCE, async { tokio::join!(write, read) }).await.expect("the echo");
    read.unwrap();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "the echo came back changed");
}

/// A SOCKS5 CONNECT to `host:port` through `proxy`; the reply code.
async fn socks5_connect(proxy: &str, ip: [u8; 4], port: u16) -> (u8, TcpStream) {
    let mut tcp = TcpStream::connect(proxy).await.unwrap();
    tcp.write_all(&[5, 1, 0]).await.unwrap();
    let mut choice = [0; 2];
    tcp.read_exact(&mut choice).await.unwrap();
    assert_eq!(choice, [5, 0]);
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&ip);
    request.extend_from_slice(&port.to_be_bytes());
    tcp.write_all(&request).await.unwrap();
    let mut reply = [0; 10];
    tokio::time::timeout(PATIENCE, tcp.read_exact(&mut reply)).await.expect("a SOCKS5 reply").unwrap();
    (reply[1], tcp)
}

async fn tube_named(tubes: &Api<Tube>, pod_or_all: impl Fn(&Tube) -> bool) -> Option<Tube> {
    tubes.list(&ListParams::default()).await.ok()?.items.into_iter().find(|t| pod_or_all(t))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tube_made_by_the_cli_carries_traffic_within_the_pools_allowlist_and_ends_with_a_reason() {
    let cluster = Cluster::start(1).await;
    let port = free_port().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let operator = cluster.operator_on("operator-0", port, &[]).await;
    let cli = workspace_binary("tidepool-cli", "tidepool").unwrap();
    let runner = cluster.session_pods("edge");
    let (echo, other) = (echo_target().await, echo_target().await);
    cluster.pool("edge", 2).await;
    // Tubes may reach the echo target and nothing else.
    let pools: Api<WarmPool> = Api::namespaced(cluster.client.clone(), "default");
    let allow = json!({ "spec": { "tubes": { "allow": [{ "cidr": "127.0.0.1/32", "ports": [echo] }] } } });
    pools.patch("edge", &PatchParams::default(), &Patch::Merge(&allow)).await.unwrap();
    cluster.wait_warm("edge", 2, PATIENCE).await;
    eventually(PATIENCE, "a session pod process behind each pod", || async {
        (runner.running().len() == 2).then_some(())
    })
    .await
    .unwrap();
    let token_file = cluster.token_file().display().to_string();
    let operator_args: Vec<String> = ["--operator", &url, "--api-token-file", &token_file].map(String::from).to_vec();
    let base: Vec<String> = [operator_args.clone(), vec!["--pool".into(), "edge".into()]].concat();
    let tubes: Api<Tube> = Api::namespaced(cluster.client.clone(), "default");

    // A tunnel to the allowed target: bytes go there and back through the pod.
    let target = format!("127.0.0.1:{echo}");
    let forward = TubeCli::start(&cli, &base, &["--target", &target, "--listen", "127.0.0.1:0"])
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", operator.process.log_tail(30)));
    echo_through(&forward.listening, 1 << 20).await;
    let connected = eventually(PATIENCE, "the tube's status to show it connected and carrying", || async {
        let tube = tube_named(&tubes, |t| t.spec.target.as_ref().is_some_and(|t| t.port == i32::from(echo))).await?;
        let status = tube.status.clone()?;
        (status.state == TubeState::Connected && status.bytes_received >= 1 << 20 && status.bytes_sent >= 1 << 20)
            .then_some(tube)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", operator.process.log_tail(30)));
    let status = connected.status.clone().unwrap();
    let tube_pod = status.pod.clone().expect("the pod in the status");
    let tube_session = status.session.clone().expect("the tube's own session");
    assert!(status.conditions.iter().any(|c| c.type_ == "Ready" && c.status == "True"), "{status:?}");
    assert!(status.connected_at.is_some(), "{status:?}");

    // A tunnel to a target the allowlist does not name is refused before any pod is claimed.
    let refused_target = format!("127.0.0.1:{other}");
    let refused = TubeCli::start(&cli, &base, &["--target", &refused_target, "--listen", "127.0.0.1:0"]).await;
    let why = refused.err().expect("a tube to an unlisted target must be refused");
    assert!(why.contains("does not allow"), "{why}");

    // SOCKS5: the listed target opens, another is refused with the SOCKS5
    // code for a ruleset's refusal (2); Ctrl-C closes the tube and deletes it.
    let socks = TubeCli::start(&cli, &base, &["--socks5", "127.0.0.1:0"]).await.unwrap();
    let (code, mut carried) = socks5_connect(&socks.listening, [127, 0, 0, 1], echo).await;
    assert_eq!(code, 0);
    carried.write_all(b"ping").await.unwrap();
    let mut pong = [0; 4];
    tokio::time::timeout(PATIENCE, carried.read_exact(&mut pong)).await.unwrap().unwrap();
    assert_eq!(&pong, b"ping");
    let (code, _) = socks5_connect(&socks.listening, [127, 0, 0, 1], other).await;
    assert_eq!(code, 2, "an unlisted target is refused as not allowed by the ruleset");
    let socks_tube = tube_named(&tubes, |t| t.spec.target.is_none()).await.expect("the SOCKS5 tube");
    let socks_name = kube::ResourceExt::name_any(&socks_tube);
    let pid = socks.child.id().unwrap();
    std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap();
    let (exit, said) = socks.ended().await;
    assert!(exit.success(), "Ctrl-C should close the tube cleanly: {said}");
    let sessions: Api<TestSession> = Api::namespaced(cluster.client.clone(), "default");
    eventually(PATIENCE, "the SOCKS5 tube and its session to be gone", || async {
        let tube_gone = tubes.get_opt(&socks_name).await.ok()?.is_none();
        let session_gone = sessions.get_opt(&socks_name).await.ok()?.is_none();
        (tube_gone && session_gone).then_some(())
    })
    .await
    .unwrap();

    // --session: a tube into an existing session's pod, which stays the
    // session's when the tube is closed.
    let (code, session) = common::post_session(&operator, json!({ "pool": "edge" })).await;
    assert_eq!(code, 201, "{session}");
    let (session_name, session_pod) =
        (session["name"].as_str().unwrap().to_string(), session["pod"].as_str().unwrap().to_string());
    let via_session = TubeCli::start(
        &cli,
        &operator_args,
        &["--session", &session_name, "--target", &target, "--listen", "127.0.0.1:0"],
    )
    .await
    .unwrap();
    echo_through(&via_session.listening, 64 << 10).await;
    let ridden = tube_named(&tubes, |t| t.spec.session.as_deref() == Some(session_name.as_str())).await.unwrap();
    assert_eq!(ridden.status.and_then(|s| s.pod).as_deref(), Some(session_pod.as_str()));
    let pid = via_session.child.id().unwrap();
    std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status().unwrap();
    let (exit, said) = via_session.ended().await;
    assert!(exit.success(), "{said}");
    let kept = sessions.get(&session_name).await.unwrap();
    assert!(kept.metadata.deletion_timestamp.is_none(), "the session a tube rode is not the tube's to end");

    // The pod under the tunnel is deleted: the tube fails with the reason,
    // and the CLI says so and exits non-zero.
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    pods.delete(&tube_pod, &DeleteParams::default()).await.unwrap();
    let failed = eventually(PATIENCE, "the tube to fail for its pod", || async {
        let tube = tubes.get(&kube::ResourceExt::name_any(&connected)).await.ok()?;
        let status = tube.status?;
        (status.state == TubeState::Failed).then_some(status)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", operator.process.log_tail(30)));
    assert!(matches!(failed.end_reason.as_deref(), Some("PodGone" | "PeerGone")), "the reason is kept: {failed:?}");
    let (exit, said) = forward.ended().await;
    assert!(!exit.success(), "the CLI must fail when its tube does: {said}");
    assert!(said.contains("ended"), "{said}");
    // The CLI leaves the failed Tube, with its reason, to the operator's retention.
    let kept = tubes.get(&kube::ResourceExt::name_any(&connected)).await.expect("the failed Tube is kept");
    assert_eq!(kept.status.map(|s| s.state), Some(TubeState::Failed));
    // The ended tube let its session go, and the Events tell the story.
    eventually(PATIENCE, "the failed tube's session to be released", || async {
        sessions.get_opt(&tube_session).await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap();
    let events: Api<Event> = Api::namespaced(cluster.client.clone(), "default");
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.involved_object.kind.as_deref() == Some("Tube"))
        .filter_map(|e| e.reason)
        .collect();
    for expected in ["Answered", "Opened", "Failed"] {
        assert!(reasons.iter().any(|r| r == expected), "no {expected} Event among {reasons:?}");
    }
}
