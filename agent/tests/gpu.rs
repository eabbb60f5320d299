//! The agent against a fake NVML: a small C library built here that reports
//! two GPUs whose use a state file sets. Also: no NVML at all, and a disk
//! path that cannot be read. The operator URL points where nothing listens,
//! so these runs also show the agent living through an operator outage.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{Agent, Metrics, TempDir, fixture_proc, free_port, wait_until, write_atomically};

const MIB: f64 = 1024.0 * 1024.0;

/// Compiles tests/fake-nvml/fake_nvml.c into `dir`/libnvidia-ml.so.1.
fn build_fake_nvml(dir: &TempDir) -> PathBuf {
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fake-nvml/fake_nvml.c");
    let library = dir.join("libnvidia-ml.so.1");
    let output = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-o"])
        .arg(&library)
        .arg(&source)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `cc` to build the fake NVML (install a C compiler, e.g. gcc): {e}"));
    assert!(output.status.success(), "cc failed to build the fake NVML:\n{}", String::from_utf8_lossy(&output.stderr));
    library
}

/// A dead operator URL: a port that was free a moment ago.
fn nowhere() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

fn common_args<'a>(dir: &'a TempDir, url: &'a str, proc_root: &'a str) -> Vec<String> {
    let token = dir.join("token");
    std::fs::write(&token, "test-token\n").unwrap();
    [
        "--operator-url",
        url,
        "--token-file",
        token.to_str().unwrap(),
        "--proc-root",
        proc_root,
        "--report-interval-ms",
        "100",
        "--sample-interval-ms",
        "100",
        "--breaker-failures",
        "2",
        "--breaker-open-seconds",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One GPU's figures as the state file has them.
struct Gpu {
    util: u32,
    mem_mib: u64,
    temp: u32,
    power_mw: u32,
}

fn state(gpus: &[Option<&Gpu>]) -> String {
    gpus.iter()
        .map(|g| match g {
            Some(g) => format!("{} {} {} {}\n", g.util, g.mem_mib, g.temp, g.power_mw),
            None => "fail\n".to_owned(),
        })
        .collect()
}

/// Whether /metrics shows exactly `gpu`'s figures for GPU `index`.
fn shows(metrics: &Metrics, index: u32, gpu: &Gpu, total_mib: u64) -> bool {
    let value = |name: &str| metrics.value(&format!("tidepool_agent_gpu_{name}{{gpu=\"{index}\"}}"));
    value("utilization_ratio") == Some(f64::from(gpu.util) / 100.0)
        && value("memory_used_bytes") == Some(gpu.mem_mib as f64 * MIB)
        && value("memory_total_bytes") == Some(total_mib as f64 * MIB)
        && value("temperature_celsius") == Some(f64::from(gpu.temp))
        && value("power_watts") == Some(f64::from(gpu.power_mw) / 1000.0)
}

#[test]
fn reports_what_the_fake_gpus_say_and_follows_changes() {
    let dir = TempDir::new("gpu");
    let library = build_fake_nvml(&dir);
    let state_file = dir.join("state");
    let (a, b) = (
        Gpu { util: 37, mem_mib: 5120, temp: 61, power_mw: 123_456 },
        Gpu { util: 80, mem_mib: 20_000, temp: 75, power_mw: 250_000 },
    );
    write_atomically(&state_file, &state(&[Some(&a), Some(&b)]));
    let url = nowhere();
    let proc_root = fixture_proc();
    let mut args = common_args(&dir, &url, proc_root.to_str().unwrap());
    args.extend(["--node-name", "gpu-node", "--nvml-library", library.to_str().unwrap()].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&dir, &args, &[("FAKE_NVML_STATE", state_file.to_str().unwrap())]);

    let mut metrics = agent.metrics();
    let seen = wait_until(Duration::from_secs(10), || {
        metrics = agent.metrics();
        shows(&metrics, 0, &a, 16_384) && shows(&metrics, 1, &b, 24_576)
    });
    assert!(seen, "GPU gauges never matched the state file:\n{}", metrics.0);
    assert_eq!(metrics.value("tidepool_agent_gpu_info{gpu=\"0\",model=\"Fake GPU 0\"}"), Some(1.0));
    assert_eq!(metrics.value("tidepool_agent_gpu_info{gpu=\"1\",model=\"Fake GPU 1\"}"), Some(1.0));

    // New figures: the gauges follow.
    let (a2, b2) = (
        Gpu { util: 5, mem_mib: 100, temp: 40, power_mw: 60_500 },
        Gpu { util: 100, mem_mib: 24_000, temp: 88, power_mw: 301_250 },
    );
    write_atomically(&state_file, &state(&[Some(&a2), Some(&b2)]));
    let followed = wait_until(Duration::from_secs(10), || {
        metrics = agent.metrics();
        shows(&metrics, 0, &a2, 16_384) && shows(&metrics, 1, &b2, 24_576)
    });
    assert!(followed, "GPU gauges did not follow the new state:\n{}", metrics.0);

    // GPU 1 starts failing: it keeps its last figures, GPU 0 goes on.
    let a3 = Gpu { util: 55, mem_mib: 8192, temp: 70, power_mw: 200_000 };
    write_atomically(&state_file, &state(&[Some(&a3), None]));
    let contained = wait_until(Duration::from_secs(10), || {
        metrics = agent.metrics();
        shows(&metrics, 0, &a3, 16_384)
            && metrics.value("tidepool_agent_sample_errors_total{source=\"gpu\"}") > Some(0.0)
    });
    assert!(contained, "a failing GPU was not contained:\n{}", metrics.0);
    assert!(shows(&metrics, 1, &b2, 24_576), "GPU 1 lost its last values:\n{}", metrics.0);

    // The operator is not there: the breaker opened, and all is well.
    let opened = wait_until(Duration::from_secs(10), || {
        metrics = agent.metrics();
        metrics.value("tidepool_agent_breaker_open") == Some(1.0)
    });
    assert!(opened, "the breaker never opened:\n{}", metrics.0);
    assert!(metrics.value("tidepool_agent_reports_total{result=\"failed\"}") >= Some(2.0));
    assert_eq!(agent.get("/healthz"), Some((200, "ok".to_owned())));
    assert!(agent.running());
    let log = agent.log_text();
    assert_eq!(log.matches("GPU query failed").count(), 4, "each failing query is logged once:\n{log}");
}

#[test]
fn without_nvml_there_are_no_gpu_series() {
    let dir = TempDir::new("nonvml");
    let url = nowhere();
    let proc_root = fixture_proc();
    let mut args = common_args(&dir, &url, proc_root.to_str().unwrap());
    args.extend(
        ["--external", "edge-1", "--address", "edge-1.example", "--nvml-library", "/nonexistent/libnvidia-ml.so.1"]
            .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&dir, &args, &[]);
    let mut metrics = agent.metrics();
    // Wait for a few samples so any GPU series would have shown.
    let sampled = wait_until(Duration::from_secs(10), || {
        metrics = agent.metrics();
        metrics.value("tidepool_agent_memory_total_bytes") == Some(8_388_608.0 * 1024.0)
    });
    assert!(sampled, "memory never showed:\n{}", metrics.0);
    assert!(!metrics.has("tidepool_agent_gpu"), "GPU series without NVML:\n{}", metrics.0);
    assert_eq!(metrics.value("tidepool_agent_cpu_cores"), Some(4.0));
    assert_eq!(metrics.value("tidepool_agent_memory_used_bytes"), Some(2_097_152.0 * 1024.0));
    assert_eq!(agent.get("/healthz"), Some((200, "ok".to_owned())));
    assert!(agent.running());
    assert!(agent.log_text().contains("no NVML"), "log:\n{}", agent.log_text());
}

#[test]
fn an_unreadable_disk_path_is_skipped() {
    let dir = TempDir::new("disk");
    let url = nowhere();
    let proc_root = fixture_proc();
    let mut args = common_args(&dir, &url, proc_root.to_str().unwrap());
    args.extend(
        ["--node-name", "disk-node", "--no-gpu", "--disk-path", "/nonexistent/disk", "--disk-path", "/"]
            .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Agent::start(&dir, &args, &[]);
    let mut metrics = agent.metrics();
    let sampled = wait_until(Duration::from_secs(10), || {
        metrics = agent.metrics();
        metrics.value("tidepool_agent_sample_errors_total{source=\"disk\"}") >= Some(2.0)
    });
    assert!(sampled, "the bad path was never counted:\n{}", metrics.0);
    assert!(metrics.value("tidepool_agent_disk_total_bytes") > Some(0.0), "/ still counts:\n{}", metrics.0);
    assert_eq!(agent.get("/healthz"), Some((200, "ok".to_owned())));
    assert!(agent.running());
    let log = agent.log_text();
    assert_eq!(log.matches("cannot read disk path").count(), 1, "warned once:\n{log}");
}
