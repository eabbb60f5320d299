//! The report a node agent sends the operator, and the checks the operator
//! runs on it before it believes a word.
//!
//! It is JSON, kept compact: per-core use is a list of numbers, and every
//! window carries only what placement and the Backend status need.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The path the operator takes reports on.
pub const REPORT_PATH: &str = "/api/v1/agents/report";

/// The largest report body the operator reads (4,096 cores fit easily).
pub const MAX_REPORT_BYTES: usize = 256 * 1024;

/// What a Backend stands for.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReportKind {
    /// A Kubernetes node; the agent runs in the DaemonSet.
    Node,
    /// A server outside the cluster, running the agent on its own.
    External,
}

/// One report: who the agent is, what the backend has, and how much of it
/// is in use over each window.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentReport {
    /// The Backend's name: the node's name, or the external server's.
    pub backend: String,
    pub kind: ReportKind,
    /// Where clients reach the backend: a host name or IP, with an optional `:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The port of the agent's own `/healthz`, which health probes use by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinates: Option<Coordinates>,
    /// Milliseconds between this agent's reports, so the operator can tell
    /// when reports stop.
    pub interval_ms: u32,
    /// Counts up by one per report; restarts from 0 with the agent.
    pub seq: u64,
    /// When the newest sample in the windows was taken, in Unix milliseconds.
    pub sampled_at_ms: u64,
    pub capacity: Capacity,
    /// Window averages, shortest window first.
    pub windows: Vec<Window>,
}

/// A point on Earth.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
pub struct Coordinates {
    pub latitude: f64,
    pub longitude: f64,
}

/// What the backend has.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Capacity {
    pub cores: u32,
    pub memory_bytes: u64,
    /// Over the agent's configured disk paths.
    pub disk_bytes: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<Gpu>,
}

/// One GPU's identity and size.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Gpu {
    pub index: u32,
    pub model: String,
    pub memory_bytes: u64,
}

/// Averages over one window.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Window {
    /// The window's length.
    pub seconds: u32,
    /// Samples averaged; fewer than the window holds just after start.
    pub samples: u32,
    /// Use of each core, percent, in core order.
    pub cores: Vec<f32>,
    pub memory_used_bytes: u64,
    pub disk_used_bytes: u64,
    pub net_rx_bytes_per_second: f64,
    pub net_tx_bytes_per_second: f64,
    /// One entry per GPU in `capacity.gpus`, in the same order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuWindow>,
}

/// One GPU's averages over a window.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GpuWindow {
    pub utilization_percent: f32,
    pub memory_used_bytes: u64,
    pub temperature_celsius: f32,
    pub power_watts: f32,
}

/// Why a report is refused. The message names the field.
#[derive(Debug, Error, PartialEq)]
pub enum ReportError {
    #[error("{field}: {problem}")]
    Invalid { field: String, problem: String },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ReportError {
    ReportError::Invalid { field: field.into(), problem: problem.into() }
}

const MAX_CORES: u32 = 4096;
const MAX_GPUS: usize = 64;
const MAX_WINDOWS: usize = 8;

impl AgentReport {
    /// A report with what every report needs; the optional fields empty,
    /// a one-second interval, and `seq` and `sampledAtMs` at 0.
    pub fn new(backend: impl Into<String>, kind: ReportKind, capacity: Capacity, windows: Vec<Window>) -> Self {
        Self {
            backend: backend.into(),
            kind,
            address: None,
            health_port: None,
            region: None,
            coordinates: None,
            interval_ms: 1000,
            seq: 0,
            sampled_at_ms: 0,
            capacity,
            windows,
        }
    }

    /// Checks that every figure is possible. A report that fails is refused
    /// whole: nothing in it reaches placement.
    pub fn validate(&self) -> Result<(), ReportError> {
        if !is_object_name(&self.backend) {
            return Err(invalid("backend", "must be a lowercase RFC 1123 name of at most 253 characters"));
        }
        if self.kind == ReportKind::External && self.address.is_none() {
            return Err(invalid("address", "is required for an external backend: where clients reach it"));
        }
        if let Some(address) = &self.address
            && (address.is_empty() || address.len() > 261 || address.chars().any(|c| c.is_whitespace() || c == '/'))
        {
            return Err(invalid("address", "must be a host or IP with an optional :port"));
        }
        if let Some(region) = &self.region
            && (region.is_empty() || region.len() > 63)
        {
            return Err(invalid("region", "must be 1 to 63 characters"));
        }
        if let Some(c) = &self.coordinates
            && !((-90.0..=90.0).contains(&c.latitude) && (-180.0..=180.0).contains(&c.longitude))
        {
            return Err(invalid("coordinates", "latitude must be within ±90 and longitude within ±180"));
        }
        if !(50..=600_000).contains(&self.interval_ms) {
            return Err(invalid("intervalMs", "must be between 50 and 600000"));
        }
        let capacity = &self.capacity;
        if capacity.cores == 0 || capacity.cores > MAX_CORES {
            return Err(invalid("capacity.cores", format!("must be between 1 and {MAX_CORES}")));
        }
        if capacity.memory_bytes == 0 {
            return Err(invalid("capacity.memoryBytes", "must be more than 0"));
        }
        if capacity.gpus.len() > MAX_GPUS {
            return Err(invalid("capacity.gpus", format!("at most {MAX_GPUS} GPUs")));
        }
        for (i, gpu) in capacity.gpus.iter().enumerate() {
            if gpu.model.len() > 128 {
                return Err(invalid(format!("capacity.gpus[{i}].model"), "at most 128 characters"));
            }
        }
        if self.windows.is_empty() || self.windows.len() > MAX_WINDOWS {
            return Err(invalid("windows", format!("must hold 1 to {MAX_WINDOWS} windows")));
        }
        for (w, window) in self.windows.iter().enumerate() {
            let at = |field: &str| format!("windows[{w}].{field}");
            if window.seconds == 0 {
                return Err(invalid(at("seconds"), "must be more than 0"));
            }
            if window.cores.len() != capacity.cores as usize {
                return Err(invalid(at("cores"), "must hold one figure per core in capacity.cores"));
            }
            if let Some(i) = window.cores.iter().position(|p| !is_percent(*p)) {
                return Err(invalid(at(&format!("cores[{i}]")), "must be a percentage from 0 to 100"));
            }
            if window.memory_used_bytes > capacity.memory_bytes {
                return Err(invalid(at("memoryUsedBytes"), "is more than capacity.memoryBytes"));
            }
            if window.disk_used_bytes > capacity.disk_bytes {
                return Err(invalid(at("diskUsedBytes"), "is more than capacity.diskBytes"));
            }
            for (field, rate) in [
                ("netRxBytesPerSecond", window.net_rx_bytes_per_second),
                ("netTxBytesPerSecond", window.net_tx_bytes_per_second),
            ] {
                if !(rate.is_finite() && rate >= 0.0) {
                    return Err(invalid(at(field), "must be a finite rate of at least 0"));
                }
            }
            if window.gpus.len() != capacity.gpus.len() {
                return Err(invalid(at("gpus"), "must hold one entry per GPU in capacity.gpus"));
            }
            for (g, (gpu, total)) in window.gpus.iter().zip(&capacity.gpus).enumerate() {
                let at = |field: &str| format!("windows[{w}].gpus[{g}].{field}");
                if !is_percent(gpu.utilization_percent) {
                    return Err(invalid(at("utilizationPercent"), "must be a percentage from 0 to 100"));
                }
                if gpu.memory_used_bytes > total.memory_bytes {
                    return Err(invalid(at("memoryUsedBytes"), "is more than the GPU's memory"));
                }
                if !(gpu.temperature_celsius.is_finite() && (-50.0..=200.0).contains(&gpu.temperature_celsius)) {
                    return Err(invalid(at("temperatureCelsius"), "must be between -50 and 200"));
                }
                if !(gpu.power_watts.is_finite() && (0.0..=10_000.0).contains(&gpu.power_watts)) {
                    return Err(invalid(at("powerWatts"), "must be between 0 and 10000"));
                }
            }
        }
        Ok(())
    }
}

fn is_percent(value: f32) -> bool {
    value.is_finite() && (0.0..=100.0).contains(&value)
}

/// A Kubernetes object name: an RFC 1123 subdomain.
pub fn is_object_name(name: &str) -> bool {
    let label_ok = |label: &str| {
        !label.is_empty()
            && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    };
    !name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> AgentReport {
        AgentReport {
            backend: "node-1".into(),
            kind: ReportKind::Node,
            address: Some("10.0.0.1:9100".into()),
            health_port: Some(9100),
            region: None,
            coordinates: None,
            interval_ms: 1000,
            seq: 1,
            sampled_at_ms: 1,
            capacity: Capacity {
                cores: 2,
                memory_bytes: 1 << 30,
                disk_bytes: 1 << 40,
                gpus: vec![Gpu { index: 0, model: "Fake".into(), memory_bytes: 1 << 34 }],
            },
            windows: vec![Window {
                seconds: 10,
                samples: 10,
                cores: vec![10.0, 20.0],
                memory_used_bytes: 1 << 29,
                disk_used_bytes: 1 << 39,
                net_rx_bytes_per_second: 0.0,
                net_tx_bytes_per_second: 0.0,
                gpus: vec![GpuWindow {
                    utilization_percent: 50.0,
                    memory_used_bytes: 1 << 30,
                    temperature_celsius: 40.0,
                    power_watts: 100.0,
                }],
            }],
        }
    }

    fn field_of(report: &AgentReport) -> String {
        match report.validate() {
            Err(ReportError::Invalid { field, .. }) => field,
            Ok(()) => "accepted".into(),
        }
    }

    #[test]
    fn a_sound_report_passes_and_round_trips() {
        let good = report();
        assert_eq!(good.validate(), Ok(()));
        let json = serde_json::to_string(&good).unwrap();
        assert_eq!(serde_json::from_str::<AgentReport>(&json).unwrap(), good);
    }

    #[test]
    fn absurd_figures_are_refused_by_field() {
        type Breaks = Box<dyn Fn(&mut AgentReport)>;
        let cases: Vec<(&str, Breaks)> = vec![
            ("backend", Box::new(|r| r.backend = "Node_1".into())),
            ("intervalMs", Box::new(|r| r.interval_ms = 0)),
            ("capacity.cores", Box::new(|r| r.capacity.cores = 100_000)),
            ("windows[0].cores", Box::new(|r| r.windows[0].cores.push(1.0))),
            ("windows[0].cores[1]", Box::new(|r| r.windows[0].cores[1] = 250.0)),
            ("windows[0].cores[0]", Box::new(|r| r.windows[0].cores[0] = f32::NAN)),
            ("windows[0].memoryUsedBytes", Box::new(|r| r.windows[0].memory_used_bytes = u64::MAX)),
            ("windows[0].gpus[0].utilizationPercent", Box::new(|r| r.windows[0].gpus[0].utilization_percent = -1.0)),
            ("windows[0].gpus[0].powerWatts", Box::new(|r| r.windows[0].gpus[0].power_watts = 1e9)),
            ("windows[0].gpus", Box::new(|r| r.windows[0].gpus.clear())),
            ("windows", Box::new(|r| r.windows.clear())),
            ("coordinates", Box::new(|r| r.coordinates = Some(Coordinates { latitude: 91.0, longitude: 0.0 }))),
            (
                "address",
                Box::new(|r| {
                    r.kind = ReportKind::External;
                    r.address = None;
                }),
            ),
        ];
        for (field, break_it) in cases {
            let mut bad = report();
            break_it(&mut bad);
            assert_eq!(field_of(&bad), field);
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let mut json = serde_json::to_value(report()).unwrap();
        json["surprise"] = 1.into();
        assert!(serde_json::from_value::<AgentReport>(json).is_err());
    }

    #[test]
    fn object_names() {
        assert!(is_object_name("kwok-node-0.example"));
        assert!(!is_object_name(""));
        assert!(!is_object_name("-a"));
        assert!(!is_object_name(&"a".repeat(254)));
    }
}

/// Reports arrive from anything that holds an agent's token; whatever the
/// figures, validation answers and never panics, and a possible report is
/// accepted as it was sent.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn possible() -> impl Strategy<Value = AgentReport> {
        (1u32..=8, 1u64..1 << 40, 0u64..1 << 42, "[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?", 50u32..=600_000).prop_flat_map(
            |(cores, memory, disk, backend, interval)| {
                let figures = proptest::collection::vec(0.0f32..=100.0, cores as usize);
                (figures, 0..=memory, 0..=disk).prop_map(move |(figures, memory_used, disk_used)| AgentReport {
                    backend: backend.clone(),
                    kind: ReportKind::Node,
                    address: None,
                    health_port: None,
                    region: None,
                    coordinates: None,
                    interval_ms: interval,
                    seq: 1,
                    sampled_at_ms: 1,
                    capacity: Capacity { cores, memory_bytes: memory, disk_bytes: disk, gpus: vec![] },
                    windows: vec![Window {
                        seconds: 10,
                        samples: 10,
                        cores: figures,
                        memory_used_bytes: memory_used,
                        disk_used_bytes: disk_used,
                        net_rx_bytes_per_second: 0.0,
                        net_tx_bytes_per_second: 0.0,
                        gpus: vec![],
                    }],
                })
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_bytes_parse_or_fail_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(report) = serde_json::from_slice::<AgentReport>(&bytes) {
                let _ = report.validate();
            }
        }

        #[test]
        fn possible_reports_round_trip_and_are_accepted(report in possible()) {
            prop_assert_eq!(report.validate(), Ok(()));
            let again: AgentReport = serde_json::from_slice(&serde_json::to_vec(&report).unwrap()).unwrap();
            prop_assert_eq!(again.validate(), Ok(()));
            prop_assert_eq!(again.capacity, report.capacity);
        }

        #[test]
        fn impossible_figures_are_refused(report in possible(), over in 100.001f32..1e30, core in any::<prop::sample::Index>()) {
            let mut busy = report.clone();
            let i = core.index(busy.windows[0].cores.len());
            busy.windows[0].cores[i] = over;
            prop_assert!(busy.validate().is_err());
            let mut not_a_number = report.clone();
            not_a_number.windows[0].cores[i] = f32::NAN;
            prop_assert!(not_a_number.validate().is_err());
            let mut overfull = report.clone();
            overfull.windows[0].memory_used_bytes = report.capacity.memory_bytes + 1;
            prop_assert!(overfull.validate().is_err());
            let mut one_core_short = report;
            one_core_short.windows[0].cores.pop();
            prop_assert!(one_core_short.validate().is_err());
        }
    }
}
