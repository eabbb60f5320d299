//! Takes a sample every tick, keeps the windows, and hands a fresh report to
//! the reporter on each tick a report is due.
//!
//! Reading `/proc` and statvfs is quick and never blocks on the network, so
//! it runs inline on the agent's one thread. A file that cannot be read is
//! logged once (and again when it recovers), counted, and otherwise leaves
//! zeros or the last value: the agent keeps going.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tidepool_wire::report::AgentReport;
use tokio::sync::Notify;
use tokio::time::MissedTickBehavior;
use tracing::{info, warn};

use crate::config::Config;
use crate::disk::{DiskUse, Disks};
use crate::gpu::GpuSource;
use crate::metrics::{Metrics, Source};
use crate::proc::{CpuTimes, MemInfo, NetCounter, core_usage, parse_meminfo, parse_stat};
use crate::report::{self, Totals};
use crate::server::Heartbeat;
use crate::window::{Sample, Shape, Windows};

/// The newest report waiting for the reporter. A newer one replaces an
/// unsent one: the operator wants the freshest view, not a backlog.
#[derive(Debug, Default)]
pub struct Outbox {
    slot: Mutex<Option<AgentReport>>,
    ready: Notify,
}

impl Outbox {
    pub fn put(&self, report: AgentReport) {
        *self.slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(report);
        self.ready.notify_one();
    }

    /// Waits for the next report.
    pub async fn take(&self) -> AgentReport {
        loop {
            // The guard is dropped before the await.
            let taken = self.slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(report) = taken {
                return report;
            }
            self.ready.notified().await;
        }
    }
}

/// A `/proc` file, with whether its failure was already logged.
#[derive(Debug)]
struct ProcFile {
    path: PathBuf,
    source: Source,
    failing: bool,
}

impl ProcFile {
    fn new(root: &Path, name: &str, source: Source) -> ProcFile {
        ProcFile { path: root.join(name), source, failing: false }
    }

    /// Reads the file into `buf` and parses it; logs a failure once.
    fn read<T, E: std::fmt::Display>(
        &mut self,
        buf: &mut String,
        metrics: &Metrics,
        parse: impl FnOnce(&str) -> Result<T, E>,
    ) -> Option<T> {
        buf.clear();
        let result = File::open(&self.path)
            .and_then(|mut f| f.read_to_string(buf))
            .map_err(|e| e.to_string())
            .and_then(|_| parse(buf).map_err(|e| e.to_string()));
        match result {
            Ok(value) => {
                if self.failing {
                    info!(path = %self.path.display(), "readable again");
                    self.failing = false;
                }
                Some(value)
            }
            Err(error) => {
                metrics.sample_error(self.source, 1);
                if !self.failing {
                    warn!(path = %self.path.display(), %error, "cannot read; reporting zeros or the last value");
                    self.failing = true;
                }
                None
            }
        }
    }
}

/// Reads everything the agent samples, keeping what deltas need.
pub struct Sampler {
    stat: ProcFile,
    meminfo: ProcFile,
    net_dev: ProcFile,
    text: String,
    cpu_before: Vec<CpuTimes>,
    cpu_now: Vec<CpuTimes>,
    /// Cores to report while /proc/stat has never been read.
    fallback_cores: usize,
    net: NetCounter,
    net_at: Option<Instant>,
    memory: MemInfo,
    disks: Disks,
    disk: DiskUse,
    gpus: Box<dyn GpuSource>,
    sample: Sample,
    metrics: Arc<Metrics>,
}

impl Sampler {
    pub fn new(config: &Config, gpus: Box<dyn GpuSource>, metrics: Arc<Metrics>) -> Sampler {
        let root = &config.proc_root;
        let fallback_cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Sampler {
            stat: ProcFile::new(root, "stat", Source::Stat),
            meminfo: ProcFile::new(root, "meminfo", Source::Meminfo),
            net_dev: ProcFile::new(root, "net/dev", Source::NetDev),
            text: String::with_capacity(16 * 1024),
            cpu_before: Vec::new(),
            cpu_now: Vec::new(),
            fallback_cores,
            net: NetCounter::default(),
            net_at: None,
            memory: MemInfo::default(),
            disks: Disks::new(config.disk_paths.clone()),
            disk: DiskUse::default(),
            gpus,
            sample: Sample::default(),
            metrics,
        }
    }

    /// The first reading: counters to take deltas from, and totals.
    pub fn baseline(&mut self) {
        self.read_cpu();
        std::mem::swap(&mut self.cpu_before, &mut self.cpu_now);
        self.read_net();
        self.sample_once();
    }

    fn read_cpu(&mut self) -> bool {
        let cpu_now = &mut self.cpu_now;
        self.stat.read(&mut self.text, &self.metrics, |text| parse_stat(text, cpu_now)).is_some()
    }

    /// Bytes per second moved since the last reading.
    fn read_net(&mut self) -> (f64, f64) {
        let now = Instant::now();
        let net = &mut self.net;
        let Some((rx, tx)) = self.net_dev.read(&mut self.text, &self.metrics, |text| net.update(text)) else {
            return (0.0, 0.0);
        };
        let elapsed = self.net_at.replace(now).map(|at| now.duration_since(at).as_secs_f64());
        self.metrics.add_network(rx, tx);
        match elapsed {
            Some(seconds) if seconds > 0.0 => (rx as f64 / seconds, tx as f64 / seconds),
            _ => (0.0, 0.0),
        }
    }

    /// Memory, disk and GPUs, which need no deltas.
    fn sample_once(&mut self) {
        if let Some(memory) = self.meminfo.read(&mut self.text, &self.metrics, parse_meminfo) {
            self.memory = memory;
        }
        let (disk, failed) = self.disks.sample();
        self.disk = disk;
        if failed > 0 {
            self.metrics.sample_error(Source::Disk, failed as u64);
        }
        let (gpus, failed) = self.gpus.sample();
        self.sample.gpus.clear();
        self.sample.gpus.extend_from_slice(gpus);
        if failed > 0 {
            self.metrics.sample_error(Source::Gpu, u64::from(failed));
        }
        self.sample.memory_used = self.memory.used.min(self.memory.total);
        self.sample.disk_used = self.disk.used;
    }

    /// Takes a sample.
    pub fn sample(&mut self) -> &Sample {
        if self.read_cpu() {
            core_usage(&self.cpu_before, &self.cpu_now, &mut self.sample.cores);
            std::mem::swap(&mut self.cpu_before, &mut self.cpu_now);
        } else {
            // Zeros, for as many cores as we last knew of.
            self.sample.cores.clear();
            self.sample.cores.resize(self.cores(), 0.0);
        }
        let (rx, tx) = self.read_net();
        self.sample.net_rx_per_second = rx;
        self.sample.net_tx_per_second = tx;
        self.sample_once();
        self.metrics.set_memory(self.sample.memory_used, self.memory.total);
        self.metrics.set_disk(self.disk.used, self.disk.total);
        self.metrics.set_gpu_samples(self.gpus.gpus(), &self.sample.gpus);
        &self.sample
    }

    /// Cores as last read, or as the runtime sees them before any read.
    fn cores(&self) -> usize {
        if self.cpu_before.is_empty() { self.fallback_cores } else { self.cpu_before.len() }
    }

    fn totals(&self) -> Totals {
        Totals { memory_bytes: self.memory.total, disk_bytes: self.disk.total }
    }
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Samples every tick forever; on ticks a report is due, builds it and
/// puts it in `outbox` straight after the sample, so it is as fresh as can be.
pub async fn run(config: &Config, mut sampler: Sampler, heartbeat: &Heartbeat, outbox: &Outbox) {
    let tick = config.tick();
    let report_every = config.report_interval;
    let interval_ms = u32::try_from(report_every.as_millis()).unwrap_or(u32::MAX);
    let mut ticker = tokio::time::interval(tick);
    // Skip keeps ticks on the start's grid, so reports stay on time after a stall.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let start = ticker.tick().await;
    sampler.baseline();
    heartbeat.beat();
    let shape = Shape { cores: sampler.cores(), gpus: sampler.gpus.gpus().len() };
    let mut windows = Windows::new(&config.windows, tick, shape);
    let mut mean = Sample::default();
    let mut next_report = start + report_every;
    // A tick within half a tick of the due time sends; reports stay on the
    // tick grid even when the report interval is not a multiple of it.
    let slack = tick / 2;
    loop {
        let at = ticker.tick().await;
        heartbeat.beat();
        let sample = sampler.sample();
        let sampled_at_ms = unix_ms(SystemTime::now());
        if windows.push(sample) {
            info!(cores = sample.cores.len(), gpus = sample.gpus.len(), "the backend changed shape; windows restart");
        }
        let cores = windows.shape().cores;
        sampler.metrics.set_cpu_cores(cores);
        for index in 0..windows.len() {
            if windows.mean(index, &mut mean).is_some() && cores > 0 {
                let total: f64 = mean.cores.iter().map(|&c| f64::from(c)).sum();
                sampler.metrics.set_cpu_usage(index, total / cores as f64 / 100.0);
            }
        }
        if at + slack < next_report {
            continue;
        }
        next_report += report_every;
        if next_report <= at {
            next_report = at + report_every;
        }
        let built = report::build(
            &config.identity,
            interval_ms,
            sampled_at_ms,
            sampler.totals(),
            sampler.gpus.gpus(),
            &mut windows,
            &mut mean,
        );
        if let Some(report) = built {
            outbox.put(report);
        }
    }
}

/// How long `/healthz` waits for a beat before it fails: a few ticks, and
/// never under 5 seconds so a slow NVML call is not a failure.
pub fn stale_after(tick: Duration) -> Duration {
    (tick * 5).max(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use tidepool_wire::report::ReportKind;

    use super::*;
    use crate::config::{GpuMode, Identity};
    use crate::gpu::NoGpus;

    fn config(root: &Path) -> Config {
        Config {
            identity: Identity {
                backend: "node-1".into(),
                kind: ReportKind::Node,
                address: None,
                region: None,
                coordinates: None,
                health_port: 9101,
            },
            report_url: "http://127.0.0.1:1/api/v1/agents/report".into(),
            token_file: root.join("token"),
            listen: "127.0.0.1:0".parse().unwrap(),
            server_limits: tidepool_serve::Limits::default(),
            report_interval: Duration::from_millis(100),
            sample_interval: Duration::from_millis(100),
            windows: vec![1, 10],
            disk_paths: vec!["/".into()],
            proc_root: root.to_owned(),
            gpu: GpuMode::Off,
            breaker_failures: 5,
            breaker_open: Duration::from_secs(30),
        }
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tidepool-agent-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("net")).unwrap();
        dir
    }

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new(&[1, 10], "node-1", "node").unwrap())
    }

    #[test]
    fn samples_follow_the_files() {
        let root = temp_dir("follow");
        fs::write(root.join("stat"), "cpu0 0 0 0 100 0 0 0 0\ncpu1 0 0 0 100 0 0 0 0\n").unwrap();
        fs::write(root.join("meminfo"), "MemTotal: 1000 kB\nMemAvailable: 250 kB\n").unwrap();
        fs::write(root.join("net/dev"), "eth0: 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n").unwrap();
        let mut sampler = Sampler::new(&config(&root), Box::new(NoGpus), metrics());
        sampler.baseline();
        fs::write(root.join("stat"), "cpu0 50 0 0 150 0 0 0 0\ncpu1 0 0 0 200 0 0 0 0\n").unwrap();
        fs::write(root.join("net/dev"), "eth0: 1000 0 0 0 0 0 0 0 10 0 0 0 0 0 0 0\n").unwrap();
        let sample = sampler.sample().clone();
        assert_eq!(sample.cores, vec![50.0, 0.0]);
        assert_eq!(sample.memory_used, 750 * 1024);
        assert!(sample.net_rx_per_second > 0.0);
        assert!(sample.gpus.is_empty());
        assert_eq!(sampler.totals().memory_bytes, 1000 * 1024);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn missing_files_give_zeros_and_keep_last_values() {
        let root = temp_dir("missing");
        fs::write(root.join("meminfo"), "MemTotal: 1000 kB\nMemAvailable: 250 kB\n").unwrap();
        fs::write(root.join("stat"), "cpu0 1 0 0 1 0 0 0 0\n").unwrap();
        let metrics = metrics();
        let mut sampler = Sampler::new(&config(&root), Box::new(NoGpus), metrics.clone());
        sampler.baseline();
        fs::remove_file(root.join("meminfo")).unwrap();
        fs::write(root.join("stat"), "garbage").unwrap();
        let sample = sampler.sample().clone();
        assert_eq!(sample.cores, vec![0.0], "one core known, now unreadable: zero");
        assert_eq!(sample.memory_used, 750 * 1024, "memory keeps its last value");
        assert_eq!(sample.net_rx_per_second, 0.0);
        let mut text = Vec::new();
        metrics.encode(&mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("tidepool_agent_sample_errors_total{source=\"meminfo\"} 1"), "{text}");
        assert!(text.contains("tidepool_agent_sample_errors_total{source=\"netdev\"} 2"), "{text}");
        fs::remove_dir_all(root).unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn reports_are_due_on_the_report_interval() {
        let root = temp_dir("loop");
        fs::write(root.join("stat"), "cpu0 1 0 0 1 0 0 0 0\n").unwrap();
        fs::write(root.join("meminfo"), "MemTotal: 1000 kB\nMemAvailable: 250 kB\n").unwrap();
        let mut config = config(&root);
        config.sample_interval = Duration::from_millis(100);
        config.report_interval = Duration::from_millis(300);
        let heartbeat = Heartbeat::new(Duration::from_secs(5));
        let outbox = Outbox::default();
        let sampler = Sampler::new(&config, Box::new(NoGpus), metrics());
        let started = tokio::time::Instant::now();
        let mut seen = Vec::new();
        tokio::select! {
            () = run(&config, sampler, &heartbeat, &outbox) => unreachable!(),
            () = async {
                for _ in 0..3 {
                    let report = outbox.take().await;
                    assert_eq!(report.validate(), Ok(()));
                    seen.push((started.elapsed().as_millis(), report.windows[1].samples));
                }
            } => {}
        }
        assert_eq!(seen, vec![(300, 3), (600, 6), (900, 9)]);
        fs::remove_dir_all(root).unwrap();
    }
}
