//! The agent's Prometheus metrics.
//!
//! Gauges hold the newest sample (so a scrape shows exactly what the agent
//! last read), except `tidepool_agent_cpu_usage_ratio`, which is per window.
//! Labels are bounded: windows (at most 8), GPUs (at most 64), report
//! results (3) and sample sources (5).

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::config::window_label;
use crate::gpu::GpuInfo;
use crate::window::GpuSample;

/// How a report ended, as the `result` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The operator took it (2xx).
    Accepted,
    /// The operator refused it (4xx).
    Refused,
    /// No answer, a 503 (not the leader), or another error.
    Failed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// What a sample could not read, as the `source` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Stat,
    Meminfo,
    NetDev,
    Disk,
    Gpu,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Stat => "stat",
            Source::Meminfo => "meminfo",
            Source::NetDev => "netdev",
            Source::Disk => "disk",
            Source::Gpu => "gpu",
        }
    }
}

/// One GPU's gauges, looked up once so a sample does no label lookups.
struct GpuGauges {
    utilization: Gauge,
    memory_used: Gauge,
    memory_total: Gauge,
    temperature: Gauge,
    power: Gauge,
}

pub struct Metrics {
    registry: Registry,
    cpu_usage: Vec<Gauge>,
    cpu_cores: IntGauge,
    memory_used: Gauge,
    memory_total: Gauge,
    disk_used: Gauge,
    disk_total: Gauge,
    net_rx: IntCounter,
    net_tx: IntCounter,
    gpu_vecs: [GaugeVec; 5],
    gpu_info: IntGaugeVec,
    gpus: Vec<GpuGauges>,
    reports: IntCounterVec,
    breaker_open: IntGauge,
    report_duration: Histogram,
    sample_errors: IntCounterVec,
    connection_refusals: IntCounterVec,
}

/// Builds metrics and registers them; a name clash is a bug, so it is an error at startup.
fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> prometheus::Result<T> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

impl Metrics {
    /// The metrics for these windows (seconds, shortest first) and this backend.
    pub fn new(windows: &[u32], backend: &str, kind: &str) -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let r = &registry;
        let info = IntGaugeVec::new(
            Opts::new("tidepool_agent_info", "The agent's version and the backend it reports as; always 1"),
            &["version", "backend", "kind"],
        )?;
        register(r, info.clone())?.with_label_values(&[env!("CARGO_PKG_VERSION"), backend, kind]).set(1);
        let cpu = GaugeVec::new(
            Opts::new("tidepool_agent_cpu_usage_ratio", "Mean use of all cores over each window, 0 to 1"),
            &["window"],
        )?;
        let cpu = register(r, cpu)?;
        let cpu_usage = windows.iter().map(|&s| cpu.with_label_values(&[window_label(s)])).collect();
        let gauge = |name: &str, help: &str| register(r, Gauge::new(name, help)?);
        let gpu_vec = |name: &str, help: &str| register(r, GaugeVec::new(Opts::new(name, help), &["gpu"])?);
        let counter = |name: &str, help: &str| register(r, IntCounter::new(name, help)?);
        let metrics = Metrics {
            cpu_usage,
            cpu_cores: register(r, IntGauge::new("tidepool_agent_cpu_cores", "Cores the backend has")?)?,
            memory_used: gauge("tidepool_agent_memory_used_bytes", "Memory in use: MemTotal less MemAvailable")?,
            memory_total: gauge("tidepool_agent_memory_total_bytes", "Memory the backend has")?,
            disk_used: gauge("tidepool_agent_disk_used_bytes", "Disk in use over the --disk-path filesystems")?,
            disk_total: gauge("tidepool_agent_disk_total_bytes", "Disk size over the --disk-path filesystems")?,
            net_rx: counter("tidepool_agent_network_receive_bytes_total", "Bytes received on all interfaces but lo")?,
            net_tx: counter("tidepool_agent_network_transmit_bytes_total", "Bytes sent on all interfaces but lo")?,
            gpu_vecs: [
                gpu_vec("tidepool_agent_gpu_utilization_ratio", "GPU busy share in the last sample, 0 to 1")?,
                gpu_vec("tidepool_agent_gpu_memory_used_bytes", "GPU memory in use")?,
                gpu_vec("tidepool_agent_gpu_memory_total_bytes", "GPU memory the GPU has")?,
                gpu_vec("tidepool_agent_gpu_temperature_celsius", "GPU core temperature")?,
                gpu_vec("tidepool_agent_gpu_power_watts", "GPU power draw")?,
            ],
            gpu_info: register(
                r,
                IntGaugeVec::new(Opts::new("tidepool_agent_gpu_info", "The GPU's model; always 1"), &["gpu", "model"])?,
            )?,
            gpus: Vec::new(),
            reports: register(
                r,
                IntCounterVec::new(
                    Opts::new("tidepool_agent_reports_total", "Reports sent to the operator, by result"),
                    &["result"],
                )?,
            )?,
            breaker_open: register(
                r,
                IntGauge::new("tidepool_agent_breaker_open", "1 while the circuit breaker holds reports back")?,
            )?,
            report_duration: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new("tidepool_agent_report_duration_seconds", "Time to send one report")
                        .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0]),
                )?,
            )?,
            sample_errors: register(
                r,
                IntCounterVec::new(
                    Opts::new("tidepool_agent_sample_errors_total", "Readings that failed, by source"),
                    &["source"],
                )?,
            )?,
            connection_refusals: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "tidepool_agent_connection_refusals_total",
                        "Connections the metrics server cut, by reason (connection_cap, header_timeout, idle, slow_body)",
                    ),
                    &["reason"],
                )?,
            )?,
            registry,
        };
        // Every result and source shows from the start, at 0.
        for outcome in [Outcome::Accepted, Outcome::Refused, Outcome::Failed] {
            metrics.reports.with_label_values(&[outcome.label()]);
        }
        for source in [Source::Stat, Source::Meminfo, Source::NetDev, Source::Disk, Source::Gpu] {
            metrics.sample_errors.with_label_values(&[source.label()]);
        }
        Ok(metrics)
    }

    /// Creates the per-GPU series; called once NVML has said what it has.
    pub fn set_gpus(&mut self, gpus: &[GpuInfo]) {
        self.gpus = gpus
            .iter()
            .map(|gpu| {
                let label = gpu.index.to_string();
                self.gpu_info.with_label_values(&[label.as_str(), gpu.model.as_str()]).set(1);
                let [utilization, memory_used, memory_total, temperature, power] =
                    self.gpu_vecs.each_ref().map(|v| v.with_label_values(&[label.as_str()]));
                GpuGauges { utilization, memory_used, memory_total, temperature, power }
            })
            .collect();
    }

    pub fn set_cpu_cores(&self, cores: usize) {
        self.cpu_cores.set(cores as i64);
    }

    /// Mean use of all cores over window `index` (shortest first), 0 to 1.
    pub fn set_cpu_usage(&self, index: usize, ratio: f64) {
        if let Some(gauge) = self.cpu_usage.get(index) {
            gauge.set(ratio);
        }
    }

    pub fn set_memory(&self, used: u64, total: u64) {
        self.memory_used.set(used as f64);
        self.memory_total.set(total as f64);
    }

    pub fn set_disk(&self, used: u64, total: u64) {
        self.disk_used.set(used as f64);
        self.disk_total.set(total as f64);
    }

    pub fn add_network(&self, rx: u64, tx: u64) {
        self.net_rx.inc_by(rx);
        self.net_tx.inc_by(tx);
    }

    pub fn set_gpu_samples(&self, gpus: &[GpuInfo], samples: &[GpuSample]) {
        for ((gauges, info), sample) in self.gpus.iter().zip(gpus).zip(samples) {
            gauges.utilization.set(sample.utilization_percent / 100.0);
            gauges.memory_used.set(sample.memory_used as f64);
            gauges.memory_total.set(info.memory_total as f64);
            gauges.temperature.set(sample.temperature_celsius);
            gauges.power.set(sample.power_watts);
        }
    }

    pub fn sample_error(&self, source: Source, count: u64) {
        self.sample_errors.with_label_values(&[source.label()]).inc_by(count);
    }

    pub fn report(&self, outcome: Outcome, seconds: Option<f64>) {
        self.reports.with_label_values(&[outcome.label()]).inc();
        if let Some(seconds) = seconds {
            self.report_duration.observe(seconds);
        }
    }

    /// Counts a connection the metrics server cut.
    pub fn connection_refused(&self, reason: &str) {
        self.connection_refusals.with_label_values(&[reason]).inc();
    }

    pub fn set_breaker_open(&self, open: bool) {
        self.breaker_open.set(i64::from(open));
    }

    /// The text exposition format, for `/metrics`.
    pub fn encode(&self, out: &mut Vec<u8>) -> prometheus::Result<()> {
        TextEncoder::new().encode(&self.registry.gather(), out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(metrics: &Metrics) -> String {
        let mut out = Vec::new();
        metrics.encode(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn gpu_series_appear_only_with_gpus() {
        let mut metrics = Metrics::new(&[10, 60, 900], "node-1", "node").unwrap();
        metrics.set_cpu_cores(2);
        metrics.set_cpu_usage(0, 0.5);
        metrics.set_cpu_usage(2, 0.25);
        let before = text(&metrics);
        assert!(!before.contains("tidepool_agent_gpu"), "{before}");
        assert!(before.contains("tidepool_agent_cpu_usage_ratio{window=\"10s\"} 0.5"));
        assert!(before.contains("tidepool_agent_cpu_usage_ratio{window=\"15m\"} 0.25"));
        assert!(before.contains("tidepool_agent_reports_total{result=\"refused\"} 0"));
        assert!(before.contains("tidepool_agent_info{backend=\"node-1\",kind=\"node\""));
        let gpus = [GpuInfo { index: 0, model: "Fake GPU 0".into(), memory_total: 1 << 34 }];
        metrics.set_gpus(&gpus);
        let sample = GpuSample {
            utilization_percent: 37.0,
            memory_used: 5 << 20,
            temperature_celsius: 61.0,
            power_watts: 123.456,
        };
        metrics.set_gpu_samples(&gpus, &[sample]);
        let after = text(&metrics);
        for line in [
            "tidepool_agent_gpu_utilization_ratio{gpu=\"0\"} 0.37",
            "tidepool_agent_gpu_memory_used_bytes{gpu=\"0\"} 5242880",
            "tidepool_agent_gpu_memory_total_bytes{gpu=\"0\"} 17179869184",
            "tidepool_agent_gpu_temperature_celsius{gpu=\"0\"} 61",
            "tidepool_agent_gpu_power_watts{gpu=\"0\"} 123.456",
            "tidepool_agent_gpu_info{gpu=\"0\",model=\"Fake GPU 0\"} 1",
        ] {
            assert!(after.contains(line), "{line} missing from\n{after}");
        }
    }
}
