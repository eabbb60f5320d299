//! The router's picture of one backend: its last report, boiled down once
//! at ingest to what filtering and scoring read, and its health probe state.

use std::time::Instant;

use tidepool_wire::report::{AgentReport, Coordinates, ReportKind};

/// A core at or above this use is busy (the reference router's rule).
pub const BUSY_CORE_PERCENT: f32 = 80.0;

/// What the health probes think of a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Health {
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
}

/// Consecutive successes that make a backend healthy, failures that make it unhealthy.
pub const HEALTHY_AFTER: u32 = 2;
pub const UNHEALTHY_AFTER: u32 = 3;
/// Weight of the newest probe latency in its moving average.
pub const LATENCY_ALPHA: f64 = 0.3;

/// Health probe bookkeeping: a small state machine with an EWMA of latency.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Probes {
    pub health: Health,
    pub successes: u32,
    pub failures: u32,
    pub latency_ms: Option<f64>,
}

impl Probes {
    /// Folds in one probe: `Some(latency)` on success, `None` on failure.
    /// Returns true when the health verdict changed.
    pub fn observe(&mut self, outcome: Option<f64>) -> bool {
        let before = self.health;
        match outcome {
            Some(ms) => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                self.latency_ms = Some(match self.latency_ms {
                    Some(avg) => LATENCY_ALPHA * ms + (1.0 - LATENCY_ALPHA) * avg,
                    None => ms,
                });
                if self.successes >= HEALTHY_AFTER {
                    self.health = Health::Healthy;
                }
            }
            None => {
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                if self.failures >= UNHEALTHY_AFTER {
                    self.health = Health::Unhealthy;
                }
            }
        }
        self.health != before
    }
}

/// One backend as placement sees it. Everything here is derived from the
/// latest report, so scoring is arithmetic on a few numbers.
#[derive(Clone, Debug)]
pub struct BackendView {
    pub name: String,
    pub kind: ReportKind,
    pub address: Option<String>,
    pub health_port: Option<u16>,
    pub region: Option<String>,
    pub coordinates: Option<Coordinates>,
    /// When the operator received the latest report (its own clock).
    pub received: Instant,
    /// When the agent took the newest sample, Unix ms (the agent's clock).
    pub sampled_at_ms: u64,
    pub interval_ms: u32,
    /// The shortest window's length: a pick is in the reports once a
    /// report received this long after it arrives.
    pub window_seconds: u32,
    pub report: AgentReport,
    /// Per-core use over the shortest window, least loaded first.
    pub cores_by_load: Vec<f32>,
    /// `prefix[i]` is the sum of the `i` least loaded cores' use.
    pub prefix: Vec<f32>,
    /// Cores under [`BUSY_CORE_PERCENT`].
    pub idle_cores: u32,
    pub memory_total: u64,
    pub memory_free: u64,
    pub disk_free: u64,
    /// GPUs under [`BUSY_CORE_PERCENT`] use.
    pub idle_gpus: u32,
    /// Free memory on the idle GPUs.
    pub gpu_memory_free: u64,
    /// Mean GPU use, percent (0 without GPUs).
    pub gpu_percent: f32,
    pub probes: Probes,
}

impl BackendView {
    /// Boils a validated report down to the numbers placement reads.
    pub fn from_report(report: AgentReport, received: Instant, probes: Probes) -> Self {
        let window = report.windows.first().cloned().unwrap_or_default();
        let mut cores_by_load = window.cores.clone();
        cores_by_load.sort_by(f32::total_cmp);
        let mut prefix = Vec::with_capacity(cores_by_load.len() + 1);
        let mut sum = 0.0f32;
        prefix.push(0.0);
        for load in &cores_by_load {
            sum += load;
            prefix.push(sum);
        }
        let idle_cores = cores_by_load.iter().filter(|&&p| p < BUSY_CORE_PERCENT).count() as u32;
        let capacity = &report.capacity;
        let idle_gpus = window.gpus.iter().filter(|g| g.utilization_percent < BUSY_CORE_PERCENT).count() as u32;
        // Only idle GPUs can take a session, so only their memory counts.
        let gpu_memory_free = capacity
            .gpus
            .iter()
            .zip(&window.gpus)
            .filter(|(_, used)| used.utilization_percent < BUSY_CORE_PERCENT)
            .map(|(gpu, used)| gpu.memory_bytes.saturating_sub(used.memory_used_bytes))
            .sum();
        let gpu_percent = if window.gpus.is_empty() {
            0.0
        } else {
            window.gpus.iter().map(|g| g.utilization_percent).sum::<f32>() / window.gpus.len() as f32
        };
        Self {
            name: report.backend.clone(),
            kind: report.kind,
            address: report.address.clone(),
            health_port: report.health_port,
            region: report.region.clone(),
            coordinates: report.coordinates,
            received,
            sampled_at_ms: report.sampled_at_ms,
            interval_ms: report.interval_ms,
            window_seconds: window.seconds,
            cores_by_load,
            prefix,
            idle_cores,
            memory_total: capacity.memory_bytes,
            memory_free: capacity.memory_bytes.saturating_sub(window.memory_used_bytes),
            disk_free: capacity.disk_bytes.saturating_sub(window.disk_used_bytes),
            idle_gpus,
            gpu_memory_free,
            gpu_percent,
            probes,
            report,
        }
    }

    /// Mean use of the `n` least loaded cores after skipping the `skip`
    /// cores pending picks will take. Cores past the end count as full.
    pub fn least_loaded_mean(&self, skip: u32, n: u32) -> f32 {
        if n == 0 {
            return 0.0;
        }
        let len = self.cores_by_load.len();
        let start = (skip as usize).min(len);
        let end = (skip as usize + n as usize).min(len);
        let missing = n as usize - (end - start);
        (self.prefix[end] - self.prefix[start] + missing as f32 * 100.0) / n as f32
    }

    /// Memory in use, percent, counting `pending` bytes as used.
    pub fn memory_percent(&self, pending: u64) -> f32 {
        let used = self.memory_total.saturating_sub(self.memory_free).saturating_add(pending);
        (used as f64 * 100.0 / self.memory_total.max(1) as f64).min(100.0) as f32
    }
}

/// Great-circle distance in km (haversine, R = 6371 km).
pub fn distance_km(a: Coordinates, b: Coordinates) -> f64 {
    let (lat1, lat2) = (a.latitude.to_radians(), b.latitude.to_radians());
    let dlat = lat2 - lat1;
    let dlon = (b.longitude - a.longitude).to_radians();
    let h = (dlat / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * (dlon / 2.0).sin().powi(2);
    2.0 * 6371.0 * h.sqrt().min(1.0).asin()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_wire::report::{Capacity, Window};

    pub fn report(cores: Vec<f32>, memory_used_percent: u64) -> AgentReport {
        let memory = 100 << 30;
        AgentReport::new(
            "n",
            ReportKind::Node,
            Capacity { cores: cores.len() as u32, memory_bytes: memory, disk_bytes: 1 << 40, gpus: vec![] },
            vec![Window {
                seconds: 10,
                samples: 10,
                cores,
                memory_used_bytes: memory / 100 * memory_used_percent,
                ..Window::default()
            }],
        )
    }

    #[test]
    fn least_loaded_cores_skip_the_pending_ones() {
        let view =
            BackendView::from_report(report(vec![90.0, 10.0, 30.0, 20.0], 50), Instant::now(), Probes::default());
        assert_eq!(view.idle_cores, 3);
        assert_eq!(view.least_loaded_mean(0, 2), 15.0);
        assert_eq!(view.least_loaded_mean(1, 2), 25.0);
        // Asking past the last core counts the missing ones as full.
        assert_eq!(view.least_loaded_mean(3, 2), 95.0);
        assert_eq!(view.memory_percent(0), 50.0);
        assert_eq!(view.memory_percent(10 << 30), 60.0);
    }

    #[test]
    fn health_needs_two_successes_and_three_failures() {
        let mut probes = Probes::default();
        assert!(!probes.observe(Some(10.0)));
        assert!(probes.observe(Some(20.0)));
        assert_eq!(probes.health, Health::Healthy);
        assert!((probes.latency_ms.unwrap() - 13.0).abs() < 1e-9);
        assert!(!probes.observe(None));
        assert!(!probes.observe(None));
        assert!(probes.observe(None));
        assert_eq!(probes.health, Health::Unhealthy);
        assert!(!probes.observe(Some(1.0)));
        assert!(probes.observe(Some(1.0)));
        assert_eq!(probes.health, Health::Healthy);
    }

    #[test]
    fn haversine_matches_a_known_distance() {
        let london = Coordinates { latitude: 51.5074, longitude: -0.1278 };
        let paris = Coordinates { latitude: 48.8566, longitude: 2.3522 };
        assert!((distance_km(london, paris) - 343.5).abs() < 1.0);
        assert_eq!(distance_km(paris, paris), 0.0);
    }
}
