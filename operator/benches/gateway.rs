//! The gateway's proxy, side by side with nginx, from one run.
//!
//! `cargo bench -p tidepool-operator --bench gateway` starts the harness,
//! the operator, one real session pod behind a kwok pod (release builds),
//! the gateway, and nginx from Debian (`apt-get install nginx-light`)
//! proxying to the same pod with buffering off, as one configures it for
//! streams. One anonymous session through the gateway; then curl moves one
//! stream of bytes each way, five rounds, taking turns:
//!
//! - direct to the pod (with the session's token and binding ticket);
//! - through the gateway (token only; it finds the pod and the ticket);
//! - through nginx.
//!
//! It prints each path's median rate and the gateway's share of direct
//! and its ratio to nginx. Set TIDEPOOL_BENCH_SECONDS (default 4) for each
//! download's length; each upload sends TIDEPOOL_BENCH_UPLOAD_MIB (default 256; the pod takes
//! at most 512).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use tidepool_crds::WarmPool;
use tidepool_tests::{ControlPlane, FakeNode, Options, PodRunner, eventually, free_port, workspace_binary};

const TOKEN: &str = "bench-api-token-0123456789";
const ROUNDS: usize = 5;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds: u64 = std::env::var("TIDEPOOL_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    let upload_mib: u64 = std::env::var("TIDEPOOL_BENCH_UPLOAD_MIB").ok().and_then(|s| s.parse().ok()).unwrap_or(256);
    let nginx = Path::new("/usr/sbin/nginx");
    assert!(nginx.exists(), "nginx is needed: apt-get install nginx-light");

    let plane = ControlPlane::start_with(Options { nodes: vec![FakeNode::new("node-0")], ..Options::default() })
        .await
        .expect("control plane");
    let admin = plane.client().await.expect("client");
    let token_file = plane.dir().join("api-token");
    std::fs::write(&token_file, TOKEN).expect("token file");
    let port = free_port().expect("port");
    let operator_url = format!("http://127.0.0.1:{port}");
    let args = vec![
        format!("--listen=127.0.0.1:{port}"),
        format!("--api-token-file={}", token_file.display()),
        format!("--results-url={operator_url}"),
        "--uncapped-callers=static-token".to_string(),
        "--identity=bench".to_string(),
    ];
    let program = Path::new(env!("CARGO_BIN_EXE_tidepool-operator"));
    let _operator = plane.spawn("tidepool-operator", program, &args, &[]).expect("operator");
    let session = workspace_binary("tidepool-session", "tidepool-session").expect("session pod");
    let _runner = PodRunner::start(admin.clone(), "default", "tidepool.dev/pool", session, plane.dir().to_path_buf());
    // The pod's hourly byte budget per client address (45 GB) would run out
    // within the rounds: every path reaches it from 127.0.0.1.
    let pool = json!({
        "apiVersion": tidepool_crds::API_VERSION, "kind": "WarmPool",
        "metadata": { "name": "edge" },
        "spec": {
            "size": 1, "public": true,
            "tier": { "vcpu": 1, "memoryMiB": 64 },
            "template": { "spec": { "containers": [{
                "name": "session", "image": "tidepool/session:bench",
                "args": ["--bytes-per-hour=1000000000000000"],
                "ports": [{ "containerPort": 9000 }],
            }] } }
        }
    });
    let pools: Api<WarmPool> = Api::namespaced(admin.clone(), "default");
    pools.patch("edge", &PatchParams::apply("bench").force(), &Patch::Apply(&pool)).await.expect("pool");

    let (gateway_port, gateway_admin) = (free_port().unwrap(), free_port().unwrap());
    let gateway_args = vec![
        format!("--listen=127.0.0.1:{gateway_port}"),
        format!("--admin-listen=127.0.0.1:{gateway_admin}"),
        format!("--operator-url={operator_url}"),
        format!("--token-file={}", token_file.display()),
    ];
    let gateway_bin = workspace_binary("tidepool-gateway", "tidepool-gateway").expect("gateway");
    let _gateway = plane.spawn("tidepool-gateway", &gateway_bin, &gateway_args, &[]).expect("gateway");
    let gateway = format!("http://127.0.0.1:{gateway_port}");
    let http = reqwest::Client::new();
    let view: Value = eventually(Duration::from_secs(60), "an anonymous session through the gateway", || async {
        let response =
            http.post(format!("{gateway}/api/v1/sessions")).json(&json!({ "pool": "edge" })).send().await.ok()?;
        if response.status() != 201 {
            return None;
        }
        response.json().await.ok()
    })
    .await
    .expect("session");
    let token = view["token"].as_str().unwrap().to_string();
    let binding = view["binding"].as_str().unwrap().to_string();
    let pod_name = view["pod"].as_str().unwrap();
    let sessions: Api<tidepool_crds::TestSession> = Api::namespaced(admin.clone(), "default");
    let direct = sessions.get(view["name"].as_str().unwrap()).await.unwrap().status.unwrap().endpoint.unwrap();

    let nginx_port = free_port().unwrap();
    let _nginx = Nginx::start(nginx, plane.dir(), nginx_port, direct.trim_start_matches("http://"));
    let through_nginx = format!("http://127.0.0.1:{nginx_port}");
    eventually(Duration::from_secs(10), "nginx to listen", || async {
        std::net::TcpStream::connect(("127.0.0.1", nginx_port)).ok().map(|_| ())
    })
    .await
    .expect("nginx");

    println!(
        "Tidepool gateway vs nginx {}, one stream each way to session pod {pod_name}, {} cores, {ROUNDS} rounds",
        nginx_version(nginx),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let paths = [("direct", direct.as_str()), ("gateway", &format!("{gateway}/s")), ("nginx", through_nginx.as_str())];
    let mut downloads = vec![Vec::new(); paths.len()];
    let mut uploads = vec![Vec::new(); paths.len()];
    for _ in 0..ROUNDS {
        for (i, (_, base)) in paths.iter().enumerate() {
            downloads[i].push(curl_download(base, &token, &binding, seconds));
            uploads[i].push(curl_upload(base, &token, &binding, upload_mib));
        }
    }
    report("download", &paths, &mut downloads);
    report("upload", &paths, &mut uploads);
}

fn report(what: &str, paths: &[(&str, &str)], rates: &mut [Vec<f64>]) {
    let medians: Vec<f64> = rates.iter_mut().map(|r| median(r)).collect();
    for ((name, _), rate) in paths.iter().zip(&medians) {
        println!("{what:<8} {name:<8} {:>8.0} MiB/s (median)", rate / (1024.0 * 1024.0));
    }
    println!(
        "{what:<8} gateway/direct {:.2}  gateway/nginx {:.2}  nginx/direct {:.2}",
        medians[1] / medians[0],
        medians[1] / medians[2],
        medians[2] / medians[0]
    );
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Bytes a second curl received from `/download`.
fn curl_download(base: &str, token: &str, binding: &str, seconds: u64) -> f64 {
    let output = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{speed_download}", "--fail"])
        .args(["-H", &format!("Authorization: Bearer {token}"), "-H", &format!("x-tidepool-binding: {binding}")])
        .arg(format!("{base}/download?seconds={seconds}"))
        .output()
        .expect("curl");
    assert!(output.status.success(), "download from {base}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().parse().expect("curl's rate")
}

/// Bytes a second curl sent to `/upload`: `mib` MiB of zeros, chunked.
fn curl_upload(base: &str, token: &str, binding: &str, mib: u64) -> f64 {
    let mut zeros = Command::new("head")
        .args(["-c", &format!("{}", mib << 20), "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("head");
    let output = Command::new("curl")
        .args(["-sS", "-o", "/dev/null", "-w", "%{speed_upload}", "--fail", "-X", "POST", "-T", "-"])
        .args(["-H", &format!("Authorization: Bearer {token}"), "-H", &format!("x-tidepool-binding: {binding}")])
        .args(["-H", "Expect:"])
        .arg(format!("{base}/upload?seconds=60"))
        .stdin(zeros.stdout.take().expect("head's output"))
        .output()
        .expect("curl");
    let _ = zeros.wait();
    assert!(output.status.success(), "upload to {base}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).trim().parse().expect("curl's rate")
}

fn nginx_version(nginx: &Path) -> String {
    let output = Command::new(nginx).arg("-v").output().expect("nginx -v");
    String::from_utf8_lossy(&output.stderr).trim().trim_start_matches("nginx version: ").to_string()
}

/// nginx as a reverse proxy for streams, in a directory of its own.
struct Nginx {
    child: std::process::Child,
}

impl Nginx {
    fn start(nginx: &Path, dir: &Path, port: u16, upstream: &str) -> Self {
        let dir: PathBuf = dir.join("nginx");
        std::fs::create_dir_all(dir.join("logs")).expect("nginx dir");
        // One worker per core, buffering off both ways, HTTP/1.1 with kept-alive upstream connections.
        let config = format!(
            "worker_processes auto;\npid {dir}/nginx.pid;\nerror_log {dir}/logs/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n\
             fastcgi_temp_path {dir}/fastcgi;\n  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
             upstream pod {{ server {upstream}; keepalive 8; }}\n\
             server {{\n    listen 127.0.0.1:{port};\n    client_max_body_size 0;\n\
             location / {{\n      proxy_pass http://pod;\n      proxy_http_version 1.1;\n\
             proxy_set_header Connection \"\";\n      proxy_buffering off;\n      proxy_request_buffering off;\n\
             proxy_read_timeout 120s;\n    }}\n  }}\n}}\n",
            dir = dir.display()
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config).expect("nginx.conf");
        let child = Command::new(nginx)
            .args(["-p", &dir.display().to_string(), "-c", &path.display().to_string(), "-g", "daemon off;"])
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx");
        Self { child }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
