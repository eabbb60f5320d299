//! The router's reverse proxy, side by side with nginx, from one run.
//!
//! `cargo bench -p tidepool-operator --bench routed` starts the harness, the
//! operator and the gateway (release builds), and nginx from Debian
//! (`apt-get install nginx-light`) with two servers: the application, a
//! small fixed answer, and a reverse proxy to it with kept-alive upstream
//! connections. The application is registered as an external Backend whose
//! load the bench reports as its agent would; the gateway routes `/app` by
//! the request's tier. Then, five rounds taking turns, 400 kept-alive GETs
//! one after another on each path:
//!
//! - direct to the application;
//! - through the gateway's routed path (a call to the operator's router,
//!   then the proxy hop);
//! - through nginx (the proxy hop alone, to a fixed upstream).
//!
//! It prints each path's p50 and p99 per request and what the gateway and
//! nginx add to direct.

#[path = "common/nginx.rs"]
mod nginx;

use std::path::Path;
use std::time::{Duration, Instant};

use kube::api::Api;
use nginx::Nginx;
use serde_json::json;
use tidepool_crds::Backend;
use tidepool_tests::{ControlPlane, FakeNode, Options, eventually, free_port, workspace_binary};
use tidepool_wire::report::{AgentReport, Capacity, ReportKind, Window};

const TOKEN: &str = "bench-api-token-0123456789";
const ROUNDS: usize = 5;
const REQUESTS: usize = 400;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let nginx = Path::new("/usr/sbin/nginx");
    assert!(nginx.exists(), "nginx is needed: apt-get install nginx-light");
    let plane = ControlPlane::start_with(Options { nodes: vec![FakeNode::new("node-0")], ..Options::default() })
        .await
        .expect("control plane");
    let admin = plane.client().await.expect("client");
    let token_file = plane.dir().join("api-token");
    std::fs::write(&token_file, TOKEN).expect("token file");
    let report_token =
        plane.service_account_token("default", "tidepool-agent", "tidepool", None).await.expect("agent token");

    let (app_port, proxy_port) = (free_port().unwrap(), free_port().unwrap());
    let _nginx = start_nginx(nginx, plane.dir(), app_port, proxy_port);
    eventually(Duration::from_secs(10), "nginx to listen", || async {
        std::net::TcpStream::connect(("127.0.0.1", proxy_port)).ok().map(|_| ())
    })
    .await
    .expect("nginx");

    let port = free_port().expect("port");
    let operator_url = format!("http://127.0.0.1:{port}");
    let args = [
        format!("--listen=127.0.0.1:{port}"),
        format!("--api-token-file={}", token_file.display()),
        "--identity=bench".to_string(),
        "--no-agent-daemonset".to_string(),
        "--allow-local-backend-addresses".to_string(),
        "--health-probe-interval-seconds=2".to_string(),
        "--health-probe-timeout-seconds=1".to_string(),
    ];
    let program = Path::new(env!("CARGO_BIN_EXE_tidepool-operator"));
    let _operator = plane.spawn("tidepool-operator", program, &args, &[]).expect("operator");
    let backend: Backend = serde_json::from_value(json!({
        "apiVersion": tidepool_crds::API_VERSION, "kind": "Backend",
        "metadata": { "name": "app" },
        "spec": { "kind": "external", "address": format!("127.0.0.1:{app_port}"),
                  "healthCheck": { "type": "tcp", "port": app_port, "intervalSeconds": 2, "timeoutSeconds": 1 } }
    }))
    .expect("backend");
    let backends: Api<Backend> = Api::all(admin.clone());
    eventually(Duration::from_secs(30), "the Backend registered", || async {
        backends.create(&Default::default(), &backend).await.ok().map(|_| ())
    })
    .await
    .expect("backend");
    // The application's agent, as the bench: a report a second.
    let reports = format!("{operator_url}/api/v1/agents/report");
    let reporter = tokio::spawn(async move {
        let http = reqwest::Client::new();
        for seq in 1.. {
            let _ = http.post(&reports).bearer_auth(&report_token).json(&report(seq)).send().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    eventually(Duration::from_secs(60), "the Backend healthy", || async {
        let backend = backends.get("app").await.ok()?;
        (backend.status?.health == tidepool_crds::backend::Health::Healthy).then_some(())
    })
    .await
    .expect("healthy");

    let (gateway_port, gateway_admin) = (free_port().unwrap(), free_port().unwrap());
    let gateway_args = [
        format!("--listen=127.0.0.1:{gateway_port}"),
        format!("--admin-listen=127.0.0.1:{gateway_admin}"),
        format!("--operator-url={operator_url}"),
        format!("--token-file={}", token_file.display()),
        "--routed-paths=/app".to_string(),
        r#"--routed-tiers={"small":{"vcpu":1,"memoryMiB":64}}"#.to_string(),
        "--routed-default-tier=small".to_string(),
    ];
    let gateway_bin = workspace_binary("tidepool-gateway", "tidepool-gateway").expect("gateway");
    let _gateway = plane.spawn("tidepool-gateway", &gateway_bin, &gateway_args, &[]).expect("gateway");
    let paths = [
        ("direct", format!("http://127.0.0.1:{app_port}/app/ok")),
        ("gateway", format!("http://127.0.0.1:{gateway_port}/app/ok")),
        ("nginx", format!("http://127.0.0.1:{proxy_port}/app/ok")),
    ];
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(60), "a routed answer through the gateway", || async {
        let response = http.get(&paths[1].1).send().await.ok()?;
        response.status().is_success().then_some(())
    })
    .await
    .expect("routed");

    println!(
        "Tidepool gateway's routed path vs nginx {}, {REQUESTS} kept-alive GETs a round, {ROUNDS} rounds, {} cores",
        nginx::version(nginx),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut samples = vec![Vec::new(); paths.len()];
    for _ in 0..ROUNDS {
        for (i, (_, url)) in paths.iter().enumerate() {
            samples[i].extend(requests(&http, url, REQUESTS).await);
        }
    }
    for samples in &mut samples {
        samples.sort_by(f64::total_cmp);
    }
    for ((name, _), samples) in paths.iter().zip(&samples) {
        println!(
            "request  {name:<8} p50 {:>7.1} µs  p99 {:>7.1} µs",
            percentile(samples, 0.50),
            percentile(samples, 0.99)
        );
    }
    for (i, name) in [(1, "gateway"), (2, "nginx")] {
        println!(
            "request  {name} adds p50 {:>7.1} µs  p99 {:>7.1} µs",
            percentile(&samples[i], 0.50) - percentile(&samples[0], 0.50),
            percentile(&samples[i], 0.99) - percentile(&samples[0], 0.99)
        );
    }
    reporter.abort();
}

/// Each request's time to its whole answer, in µs, one after another on
/// one kept-alive connection.
async fn requests(http: &reqwest::Client, url: &str, count: usize) -> Vec<f64> {
    let mut times = Vec::with_capacity(count);
    for _ in 0..count {
        let started = Instant::now();
        let response = http.get(url).send().await.expect("request");
        assert!(response.status().is_success(), "{url}: {}", response.status());
        response.bytes().await.expect("answer");
        times.push(started.elapsed().as_secs_f64() * 1e6);
    }
    times
}

/// The value at quantile `q` of `sorted`, or 0 for none.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// An idle application server: 4 cores, a tenth of its memory used.
fn report(seq: u64) -> AgentReport {
    let total: u64 = 8 << 30;
    let capacity = Capacity { cores: 4, memory_bytes: total, disk_bytes: 1 << 40, gpus: vec![] };
    let window =
        Window { seconds: 10, samples: 10, cores: vec![5.0; 4], memory_used_bytes: total / 10, ..Window::default() };
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let address = Some("app.example:443".to_string());
    let report = AgentReport::new("app", ReportKind::External, capacity, vec![window]);
    AgentReport { seq, sampled_at_ms: now_ms, address, ..report }
}

/// nginx with the application (a fixed small answer) and a reverse proxy
/// to it, as one configures one for an API: HTTP/1.1 with kept-alive
/// upstream connections.
fn start_nginx(nginx: &Path, dir: &Path, app_port: u16, proxy_port: u16) -> Nginx {
    let http = format!(
        "upstream app {{ server 127.0.0.1:{app_port}; keepalive 8; }}\n\
         server {{ listen 127.0.0.1:{app_port}; location / {{ default_type text/plain; return 200 \"ok\\n\"; }} }}\n\
         server {{ listen 127.0.0.1:{proxy_port};\n\
         location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
    );
    Nginx::start(nginx, &dir.join("nginx-routed"), 1024, &http)
}
