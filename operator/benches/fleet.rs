//! Ingest and freshness benchmark on the real control plane.
//!
//! `cargo bench -p tidepool-operator --bench fleet` runs the operator (release
//! build) against the harness and drives simulated agents at it: real HTTP
//! reports, authenticated by a real ServiceAccount token through TokenReview.
//! They report as external backends (registered first, as an admin does),
//! so no kwok node or pod is needed per agent; the operator health-probes
//! each one over TCP, as it would for real, against one local listener. It prints:
//! - with 1,000 agents reporting every second: the operator's CPU (% of one
//!   core) and its Backend writes per second;
//! - how old the router's view is when it answers `POST /api/v1/route`
//!   (sample age: the wall clock minus the report's newest sample), p50 / p99
//!   / max, with reports every 1 s and, from 50 agents, every 100 ms.
//!
//! Set TIDEPOOL_BENCH_SECONDS (default 60) to shorten each measurement.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tidepool_tests::{ControlPlane, Options, eventually, free_port};
use tidepool_wire::report::{AgentReport, Capacity, ReportKind, Window};

/// The reference router's agents report every 60 s (its default), so its
/// view of a node can be up to that old.
const REFERENCE_REPORT_INTERVAL_MS: f64 = 60_000.0;

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn report(name: &str, address: &str, interval_ms: u32, seq: u64) -> AgentReport {
    AgentReport {
        backend: name.into(),
        kind: ReportKind::External,
        address: Some(address.to_string()),
        health_port: None,
        region: None,
        coordinates: None,
        interval_ms,
        seq,
        sampled_at_ms: unix_ms(),
        capacity: Capacity { cores: 16, memory_bytes: 64 << 30, disk_bytes: 1 << 40, gpus: vec![] },
        windows: [10, 60, 900]
            .iter()
            .map(|&seconds| Window {
                seconds,
                samples: seconds,
                cores: vec![12.5; 16],
                memory_used_bytes: 16 << 30,
                disk_used_bytes: 1 << 39,
                net_rx_bytes_per_second: 1e6,
                net_tx_bytes_per_second: 1e6,
                gpus: vec![],
            })
            .collect(),
    }
}

/// Where simulated agents send their reports, and what they count.
#[derive(Clone)]
struct Target {
    http: reqwest::Client,
    url: String,
    token: String,
    failures: Arc<AtomicU64>,
    /// Every simulated server's address: a listener that accepts the
    /// operator's TCP health probes.
    address: String,
}

/// Starts `count` simulated agents named `prefix-N` reporting every `interval`.
/// Registers `count` external backends as an admin does, all at `address`:
/// the operator believes reports only for registered ones.
async fn register(admin: &kube::Client, prefix: &str, count: usize, address: &str) {
    let backends: kube::Api<tidepool_crds::Backend> = kube::Api::all(admin.clone());
    for i in 0..count {
        let backend: tidepool_crds::Backend = serde_json::from_value(json!({
            "apiVersion": tidepool_crds::API_VERSION, "kind": "Backend",
            "metadata": { "name": format!("{prefix}-{i}") },
            "spec": { "kind": "external", "address": address }
        }))
        .expect("a Backend");
        backends.create(&Default::default(), &backend).await.expect("registering a backend");
    }
}

fn agents(target: &Target, prefix: &str, count: usize, interval: Duration, stop: Arc<AtomicBool>) {
    for i in 0..count {
        let Target { http, url, token, failures, address } = target.clone();
        let stop = stop.clone();
        let name = format!("{prefix}-{i}");
        let interval_ms = interval.as_millis() as u32;
        // Spread the agents over the interval, as real ones drift apart.
        let offset = interval.mul_f64(i as f64 / count as f64);
        tokio::spawn(async move {
            tokio::time::sleep(offset).await;
            let mut ticker = tokio::time::interval(interval);
            let mut seq = 0;
            while !stop.load(Ordering::Relaxed) {
                ticker.tick().await;
                seq += 1;
                let sent =
                    http.post(&url).bearer_auth(&token).json(&report(&name, &address, interval_ms, seq)).send().await;
                if !sent.is_ok_and(|r| r.status().is_success()) {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}

async fn metric(http: &reqwest::Client, url: &str, name: &str) -> f64 {
    let text = http.get(url).send().await.unwrap().text().await.unwrap();
    text.lines().find(|l| l.starts_with(name)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}

/// Asks the router `rate` times a second for `seconds` and returns the sample ages it answered with.
async fn route_ages(http: &reqwest::Client, url: &str, seconds: u64) -> Vec<f64> {
    let mut ages = Vec::new();
    let until = Instant::now() + Duration::from_secs(seconds);
    let mut ticker = tokio::time::interval(Duration::from_millis(97));
    while Instant::now() < until {
        ticker.tick().await;
        let body = json!({ "tier": { "vcpu": 1, "memoryMiB": 512 } });
        let Ok(response) = http.post(url).bearer_auth("bench-static-token-0001").json(&body).send().await else {
            continue;
        };
        if let Ok(answer) = response.json::<Value>().await
            && let Some(age) = answer["sampleAgeMs"].as_f64()
        {
            ages.push(age);
        }
    }
    ages.sort_by(f64::total_cmp);
    ages
}

fn quantiles(ages: &[f64]) -> String {
    if ages.is_empty() {
        return "no answers".into();
    }
    let at = |q: f64| ages[((ages.len() as f64 * q) as usize).min(ages.len() - 1)];
    format!(
        "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} answers)",
        at(0.5),
        at(0.99),
        ages[ages.len() - 1],
        ages.len()
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let seconds: u64 = std::env::var("TIDEPOOL_BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let plane = ControlPlane::start_with(Options { fsync: true, ..Options::default() }).await.expect("control plane");
    let token = plane.service_account_token("default", "tidepool-agent", "tidepool", None).await.expect("agent token");
    let token_file = plane.dir().join("api-token");
    std::fs::write(&token_file, "bench-static-token-0001").expect("token file");
    let port = free_port().expect("port");
    let args = [
        format!("--listen=127.0.0.1:{port}"),
        format!("--api-token-file={}", token_file.display()),
        "--no-agent-daemonset".to_string(),
        "--allow-local-backend-addresses".to_string(),
    ];
    let operator = plane
        .spawn(
            "tidepool-operator",
            std::path::Path::new(env!("CARGO_BIN_EXE_tidepool-operator")),
            &args,
            &[("RUST_LOG", "warn")],
        )
        .expect("operator");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder().pool_max_idle_per_host(2000).build().expect("http client");
    eventually(Duration::from_secs(30), "the operator to lead", || async {
        let text = http.get(format!("{base}/metrics")).send().await.ok()?.text().await.ok()?;
        text.contains("tidepool_leader 1").then_some(())
    })
    .await
    .expect("operator");
    let report_url = format!("{base}/api/v1/agents/report");
    let route_url = format!("{base}/api/v1/route");
    let metrics_url = format!("{base}/metrics");
    let failures = Arc::new(AtomicU64::new(0));

    // 1,000 agents, every second.
    let stop = Arc::new(AtomicBool::new(false));
    // One listener stands in for every simulated server's service port.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listener");
    let address = listener.local_addr().expect("listener address").to_string();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            drop(socket);
        }
    });
    let admin = plane.client().await.expect("admin client");
    register(&admin, "sim", 1000, &address).await;
    register(&admin, "fast", 50, &address).await;
    let target = Target { http: http.clone(), url: report_url, token, failures: failures.clone(), address };
    agents(&target, "sim", 1000, Duration::from_secs(1), stop.clone());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (cpu_before, writes_before, reports_before) = (
        support::cpu_seconds(operator.pid()),
        metric(&http, &metrics_url, "tidepool_backend_writes_total").await,
        metric(&http, &metrics_url, "tidepool_agent_reports_total{result=\"accepted\"}").await,
    );
    let started = Instant::now();
    let ages_1s = route_ages(&http, &route_url, seconds).await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = (support::cpu_seconds(operator.pid()) - cpu_before) / elapsed * 100.0;
    let writes = (metric(&http, &metrics_url, "tidepool_backend_writes_total").await - writes_before) / elapsed;
    let reports = (metric(&http, &metrics_url, "tidepool_agent_reports_total{result=\"accepted\"}").await
        - reports_before)
        / elapsed;
    stop.store(true, Ordering::Relaxed);
    let backends = metric(&http, &metrics_url, "tidepool_backends{state=\"ready\"}").await;

    println!("ingest: 1,000 simulated agents reporting every 1 s, measured over {elapsed:.0} s");
    println!("  reports accepted: {reports:.0}/s; failed sends: {}", failures.load(Ordering::Relaxed));
    println!("  operator CPU: {cpu:.1} % of one core");
    println!("  Backend writes: {writes:.2}/s ({backends:.0} Backends in the view, ready)");
    println!("freshness, reports every 1 s: {}", quantiles(&ages_1s));

    // 50 agents, every 100 ms (the 1 s agents go stale and leave placement).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stop = Arc::new(AtomicBool::new(false));
    agents(&target, "fast", 50, Duration::from_millis(100), stop.clone());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let ages_100ms = route_ages(&http, &route_url, seconds.min(30)).await;
    stop.store(true, Ordering::Relaxed);
    println!("freshness, reports every 100 ms: {}", quantiles(&ages_100ms));
    let p99 = ages_1s.get(((ages_1s.len() as f64 * 0.99) as usize).min(ages_1s.len().saturating_sub(1))).copied();
    if let Some(p99) = p99 {
        println!(
            "reference router (reports every 60 s by default, so its view can be 60,000 ms old): ratio ours p99 / its worst {:.4}",
            p99 / REFERENCE_REPORT_INTERVAL_MS
        );
    }
}
