//! The results store, measured against a real S3 server (SeaweedFS).
//!
//! `cargo bench -p tidepool-operator --bench export` prints, from one run:
//!
//! 1. the store's own ceiling for results documents: PUTs by the operator's
//!    S3 client, one at a time and 16 at once, side by side with curl's
//!    `--aws-sigv4` (the tool people script this with) putting the same
//!    documents over one kept-alive connection;
//! 2. the exporter on the harness: 200 Ready sessions get their final
//!    results at once; a watch records when each shows `Completed` and when
//!    it shows `exportedAt`. It prints how fast sessions completed, how fast
//!    they were stored, the time from Completed to stored as the watch saw
//!    them, and from each final report's answer to stored, p50 and p99.
//!
//! Set TIDEPOOL_BENCH_SESSIONS to change the 200.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::ResourceExt;
use kube::api::{Api, WatchEvent, WatchParams};
use serde_json::json;
use tidepool_crds::TestSession;
use tidepool_crds::test_session::{Grade, Grades, LatencySummary, LoadedLatency, Phase, Profile, SessionResults};
use tidepool_operator::export::s3::{S3Config, S3Store};
use tidepool_protocol::stored::{StoredClient, StoredResult};
use tidepool_tests::s3::{ACCESS_KEY_ID, S3Server, SECRET_ACCESS_KEY};
use tidepool_tests::{ControlPlane, FakeNode, Options, eventually, free_port};

const BUCKET: &str = "tidepool-bench";
const TOKEN: &str = "bench-api-token-0123456789";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let server = S3Server::start(BUCKET).await.expect("SeaweedFS");
    println!("Tidepool results store, SeaweedFS at {}, {} cores", server.endpoint(), cores());
    store_ceiling(&server).await;
    exporter(&server).await;
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

fn store(server: &S3Server) -> S3Store {
    S3Store::new(S3Config {
        endpoint: server.endpoint().parse().expect("endpoint"),
        bucket: server.bucket.clone(),
        region: "us-east-1".into(),
        access_key_id: ACCESS_KEY_ID.into(),
        secret_access_key: SECRET_ACCESS_KEY.into(),
        virtual_hosted: false,
    })
    .expect("store")
}

/// A bufferbloat session's document, as the exporter writes it.
fn document(i: usize) -> Vec<u8> {
    let results = SessionResults {
        is_final: true,
        latency: Some(LatencySummary {
            p50_ms: 11.2,
            p95_ms: 14.9,
            p99_ms: 19.3,
            jitter_ms: 0.8,
            loss_percent: 0.0,
            samples: 95,
        }),
        loaded_latency: Some(LoadedLatency {
            download_ms: Some(84.1),
            upload_ms: Some(131.0),
            bidirectional_ms: Some(152.7),
        }),
        download_mbps: Some(19.4),
        upload_mbps: Some(18.8),
        grades: Some(Grades {
            bufferbloat: Some(Grade::C),
            household: None,
            overall: Some(Grade::C),
            quality_points: Some(24),
        }),
        ..Default::default()
    };
    let record = StoredResult {
        api_version: tidepool_crds::API_VERSION.into(),
        kind: "TestSessionResult".into(),
        namespace: "default".into(),
        name: format!("session-{i:05}"),
        uid: format!("6f1c2d3e-0000-4000-8000-{i:012}"),
        pool: "edge".into(),
        profile: Profile::Bufferbloat,
        phase: Phase::Completed,
        created_at: Some("2026-12-05T14:40:02Z".into()),
        ended_at: "2026-12-05T14:40:12Z".into(),
        pod: Some("edge-7dj2k".into()),
        node: Some("node-0".into()),
        backend: Some("node-0".into()),
        client: StoredClient { address: Some("192.0.2.44".into()), created_by: Some("static-token".into()) },
        monitor: None,
        results: Some(results),
    };
    serde_json::to_vec(&record).expect("a document")
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

async fn store_ceiling(server: &S3Server) {
    const N: usize = 400;
    let s3 = store(server);
    let body = document(0);
    println!("\n1. PUTs of one results document ({} bytes), {N} each", body.len());
    println!("{:<44} {:>9} {:>8} {:>8}", "client", "PUT/s", "p50 ms", "p99 ms");
    // Warm-up: the connection and the bucket's first write.
    s3.put("ceiling/warmup.json", body.clone(), "application/json").await.expect("warm-up PUT");

    let mut times = Vec::with_capacity(N);
    let started = Instant::now();
    for i in 0..N {
        let at = Instant::now();
        s3.put(&format!("ceiling/one/{i}.json"), document(i), "application/json").await.expect("PUT");
        times.push(at.elapsed());
    }
    let one_rate = N as f64 / started.elapsed().as_secs_f64();
    times.sort();
    println!(
        "{:<44} {:>9.0} {:>8.2} {:>8.2}",
        "tidepool S3 client, one at a time",
        one_rate,
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );

    let started = Instant::now();
    let times: Vec<Duration> = futures::stream::iter(0..N)
        .map(|i| {
            let s3 = s3.clone();
            async move {
                let at = Instant::now();
                s3.put(&format!("ceiling/many/{i}.json"), document(i), "application/json").await.expect("PUT");
                at.elapsed()
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let many_rate = N as f64 / started.elapsed().as_secs_f64();
    let mut times = times;
    times.sort();
    println!(
        "{:<44} {:>9.0} {:>8.2} {:>8.2}",
        "tidepool S3 client, 16 at once",
        many_rate,
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );

    // curl: every PUT in one process, so one connection kept alive, as a
    // script would; per-request times from its own --write-out.
    let dir = std::env::temp_dir().join(format!("tidepool-export-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let file = dir.join("document.json");
    std::fs::write(&file, &body).expect("document");
    let mut command = std::process::Command::new("curl");
    command
        .args(["--silent", "--show-error", "--fail"])
        .args(["--aws-sigv4", "aws:amz:us-east-1:s3"])
        .args(["--user", &format!("{ACCESS_KEY_ID}:{SECRET_ACCESS_KEY}")])
        .args(["-H", "content-type: application/json", "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
        .args(["--write-out", "%{time_total}\\n", "--output", "/dev/null"]);
    for i in 0..N {
        command.arg("--upload-file").arg(&file).arg(format!("{}/{BUCKET}/ceiling/curl/{i}.json", server.endpoint()));
    }
    let started = Instant::now();
    let output = command.output().expect("curl");
    let curl_rate = N as f64 / started.elapsed().as_secs_f64();
    assert!(output.status.success(), "curl failed: {}", String::from_utf8_lossy(&output.stderr));
    let mut times: Vec<Duration> = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .collect();
    assert_eq!(times.len(), N, "curl wrote {} times", times.len());
    times.sort();
    println!(
        "{:<44} {:>9.0} {:>8.2} {:>8.2}",
        "curl --aws-sigv4, one at a time",
        curl_rate,
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
    println!("ratio, tidepool one at a time / curl: {:.2}", one_rate / curl_rate);
    let _ = std::fs::remove_dir_all(&dir);
}

/// When the watch first showed each session Completed, and exported.
#[derive(Default)]
struct Seen {
    completed: HashMap<String, Instant>,
    exported: HashMap<String, Instant>,
}

async fn exporter(server: &S3Server) {
    let sessions_wanted: usize =
        std::env::var("TIDEPOOL_BENCH_SESSIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    let nodes = (0..4).map(|i| FakeNode::new(&format!("node-{i}")).pods(1000)).collect();
    let plane =
        ControlPlane::start_with(Options { fsync: true, nodes, ..Options::default() }).await.expect("control plane");
    let admin = plane.client().await.expect("admin client");
    let token_file = plane.dir().join("api-token");
    std::fs::write(&token_file, TOKEN).expect("token file");
    let port = free_port().expect("port");
    let args = [
        format!("--listen=127.0.0.1:{port}"),
        format!("--api-token-file={}", token_file.display()),
        "--create-batch=100".to_string(),
        "--sessions-per-caller=100000".to_string(),
        format!("--results-store-endpoint={}", server.endpoint()),
        format!("--results-store-bucket={BUCKET}"),
        format!("--results-store-access-key-id={ACCESS_KEY_ID}"),
        format!("--results-store-secret-access-key={SECRET_ACCESS_KEY}"),
    ];
    let program = std::path::Path::new(env!("CARGO_BIN_EXE_tidepool-operator"));
    let log = std::env::var("TIDEPOOL_BENCH_LOG").unwrap_or_else(|_| "warn".into());
    let _operator = plane.spawn("tidepool-operator", program, &args, &[("RUST_LOG", &log)]).expect("operator");
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    eventually(Duration::from_secs(30), "the operator", || async {
        http.get(format!("{url}/readyz")).send().await.ok()?.status().is_success().then_some(())
    })
    .await
    .expect("operator up");
    support::pool(&admin, sessions_wanted as i32).await;

    // Sessions through the API, 20 at once, all Ready before the clock starts.
    let credentials: Vec<(String, String, String)> = futures::stream::iter(0..sessions_wanted)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let answer: serde_json::Value = http
                    .post(format!("{url}/api/v1/sessions"))
                    .bearer_auth(TOKEN)
                    .json(&json!({ "pool": "edge", "profile": "bufferbloat" }))
                    .send()
                    .await
                    .expect("create")
                    .json()
                    .await
                    .expect("create answer");
                let field = |name: &str| answer[name].as_str().unwrap_or_else(|| panic!("{answer}")).to_string();
                (field("name"), field("token"), field("binding"))
            }
        })
        .buffer_unordered(20)
        .collect()
        .await;

    let seen = Arc::new(Mutex::new(Seen::default()));
    let sessions: Api<TestSession> = Api::namespaced(admin.clone(), "default");
    tokio::spawn(watch(sessions.clone(), seen.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Every session's final results at once (32 in flight).
    let figures = json!({
        "latency": { "p50Ms": 11.2, "p95Ms": 14.9, "p99Ms": 19.3, "jitterMs": 0.8, "lossPercent": 0.0, "samples": 95 },
        "loadedLatency": { "downloadMs": 84.1, "uploadMs": 131.0, "bidirectionalMs": 152.7 },
        "downloadMbps": 19.4, "uploadMbps": 18.8
    });
    let started = Instant::now();
    let answered: HashMap<String, Instant> = futures::stream::iter(credentials.iter())
        .map(|(name, token, binding)| {
            let (http, url, figures) = (http.clone(), url.clone(), figures.clone());
            async move {
                let response = http
                    .post(format!("{url}/api/v1/sessions/{name}/results"))
                    .bearer_auth(token)
                    .header("x-tidepool-binding", binding)
                    .json(&json!({ "results": figures, "final": true }))
                    .send()
                    .await
                    .expect("results");
                let at = Instant::now();
                assert!(response.status().is_success(), "{}", response.text().await.unwrap_or_default());
                (name.clone(), at)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let names: Vec<&String> = credentials.iter().map(|(name, _, _)| name).collect();
    eventually(Duration::from_secs(300), "every session stored", || async {
        let seen = seen.lock().ok()?;
        names.iter().all(|n| seen.exported.contains_key(*n)).then_some(())
    })
    .await
    .expect("all stored");

    let metrics = http.get(format!("{url}/metrics")).send().await.expect("metrics").text().await.expect("text");
    let seen = seen.lock().expect("seen");
    let last = |map: &HashMap<String, Instant>| names.iter().filter_map(|n| map.get(*n)).max().copied();
    let first_completed = names.iter().filter_map(|n| seen.completed.get(*n)).min().copied().expect("completed");
    let completed_span = last(&seen.completed).expect("completed").duration_since(started);
    let exported_span = last(&seen.exported).expect("exported").duration_since(started);
    let mut delays: Vec<Duration> =
        names.iter().filter_map(|n| Some(seen.exported.get(*n)?.duration_since(*seen.completed.get(*n)?))).collect();
    delays.sort();
    let mut from_report: Vec<Duration> = names
        .iter()
        .filter_map(|n| Some(seen.exported.get(*n)?.saturating_duration_since(*answered.get(*n)?)))
        .collect();
    from_report.sort();
    let n = names.len() as f64;
    println!("\n2. The exporter on the harness: {} sessions get their final results at once", names.len());
    println!(
        "   first Completed seen {:.0} ms after the first report",
        (first_completed - started).as_secs_f64() * 1e3
    );
    println!(
        "   sessions Completed: {:.0}/s (all within {:.2} s); stored: {:.0}/s (all within {:.2} s); ratio stored/completed {:.2}",
        n / completed_span.as_secs_f64(),
        completed_span.as_secs_f64(),
        n / exported_span.as_secs_f64(),
        exported_span.as_secs_f64(),
        completed_span.as_secs_f64() / exported_span.as_secs_f64()
    );
    println!(
        "   Completed to stored, as a watch sees both: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&delays, 0.5),
        percentile(&delays, 0.99),
        percentile(&delays, 1.0)
    );
    println!(
        "   final report answered to stored, as the watch sees it: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&from_report, 0.5),
        percentile(&from_report, 0.99),
        percentile(&from_report, 1.0)
    );
    for line in metrics.lines().filter(|l| {
        l.starts_with("tidepool_results_exports_total") || l.starts_with("tidepool_results_export_call_seconds_sum")
    }) {
        println!("   {line}");
    }
}

async fn watch(sessions: Api<TestSession>, seen: Arc<Mutex<Seen>>) {
    let mut version = "0".to_string();
    loop {
        let Ok(stream) = sessions.watch(&WatchParams::default(), &version).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut stream = stream.boxed();
        while let Ok(Some(event)) = stream.try_next().await {
            let (WatchEvent::Added(session) | WatchEvent::Modified(session)) = event else { continue };
            version = session.resource_version().unwrap_or(version);
            let now = Instant::now();
            let Some(status) = &session.status else { continue };
            let Ok(mut seen) = seen.lock() else { return };
            if status.phase == Phase::Completed {
                seen.completed.entry(session.name_any()).or_insert(now);
            }
            if status.exported_at.is_some() {
                seen.exported.entry(session.name_any()).or_insert(now);
            }
        }
    }
}
