//! Builds the [`AgentReport`] the operator reads from the windows.
//!
//! Pure: the sampler passes in what it knows. Every figure is clamped into
//! the range the operator checks, so a glitch in one reading (a counter
//! that jumped, a GPU that said 250 %) cannot get the whole report refused.

use tidepool_wire::report::{AgentReport, Capacity, Gpu, GpuWindow, Window};

use crate::config::Identity;
use crate::gpu::GpuInfo;
use crate::window::{Sample, Windows};

/// What the backend has, as last sampled.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    pub memory_bytes: u64,
    pub disk_bytes: u64,
}

/// The report for the windows as they are now, or None before the first
/// sample. `seq` is left at 0: the sender numbers what it sends.
pub fn build(
    identity: &Identity,
    interval_ms: u32,
    sampled_at_ms: u64,
    totals: Totals,
    gpus: &[GpuInfo],
    windows: &mut Windows,
    scratch: &mut Sample,
) -> Option<AgentReport> {
    let capacity = Capacity {
        cores: u32::try_from(windows.shape().cores).unwrap_or(u32::MAX),
        memory_bytes: totals.memory_bytes,
        disk_bytes: totals.disk_bytes,
        gpus: gpus
            .iter()
            .map(|g| Gpu { index: g.index, model: g.model.clone(), memory_bytes: g.memory_total })
            .collect(),
    };
    let mut report_windows = Vec::with_capacity(windows.len());
    for index in 0..windows.len() {
        let (seconds, samples) = windows.mean(index, scratch)?;
        report_windows.push(window(seconds, samples, scratch, &capacity));
    }
    Some(AgentReport {
        backend: identity.backend.clone(),
        kind: identity.kind,
        address: identity.address.clone(),
        health_port: Some(identity.health_port),
        region: identity.region.clone(),
        coordinates: identity.coordinates,
        interval_ms,
        seq: 0,
        sampled_at_ms,
        capacity,
        windows: report_windows,
    })
}

fn window(seconds: u32, samples: u32, mean: &Sample, capacity: &Capacity) -> Window {
    Window {
        seconds,
        samples,
        cores: mean.cores.iter().map(|&c| percent(f64::from(c))).collect(),
        memory_used_bytes: mean.memory_used.min(capacity.memory_bytes),
        disk_used_bytes: mean.disk_used.min(capacity.disk_bytes),
        net_rx_bytes_per_second: rate(mean.net_rx_per_second),
        net_tx_bytes_per_second: rate(mean.net_tx_per_second),
        gpus: mean
            .gpus
            .iter()
            .zip(&capacity.gpus)
            .map(|(g, total)| GpuWindow {
                utilization_percent: percent(g.utilization_percent),
                memory_used_bytes: g.memory_used.min(total.memory_bytes),
                temperature_celsius: clamp(g.temperature_celsius, -50.0, 200.0),
                power_watts: clamp(g.power_watts, 0.0, 10_000.0),
            })
            .collect(),
    }
}

fn clamp(value: f64, low: f64, high: f64) -> f32 {
    if value.is_finite() { value.clamp(low, high) as f32 } else { 0.0 }
}

fn percent(value: f64) -> f32 {
    clamp(value, 0.0, 100.0)
}

fn rate(value: f64) -> f64 {
    if value.is_finite() { value.max(0.0) } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tidepool_wire::report::{Coordinates, ReportKind};

    use super::*;
    use crate::window::{GpuSample, Shape};

    fn identity() -> Identity {
        Identity {
            backend: "node-1".into(),
            kind: ReportKind::Node,
            address: Some("10.0.0.1".into()),
            region: Some("eu".into()),
            coordinates: Some(Coordinates { latitude: 1.0, longitude: 2.0 }),
            health_port: 9101,
        }
    }

    fn gpus() -> Vec<GpuInfo> {
        vec![GpuInfo { index: 0, model: "Fake GPU 0".into(), memory_total: 16 << 30 }]
    }

    fn sample(core: f32) -> Sample {
        Sample {
            cores: vec![core, 50.0],
            memory_used: 1 << 30,
            disk_used: 1 << 35,
            net_rx_per_second: 10.0,
            net_tx_per_second: 20.0,
            gpus: vec![GpuSample {
                utilization_percent: 40.0,
                memory_used: 1 << 32,
                temperature_celsius: 60.0,
                power_watts: 250.5,
            }],
        }
    }

    #[test]
    fn reports_are_valid_and_shortest_first() {
        let mut windows = Windows::new(&[2, 10], Duration::from_secs(1), Shape { cores: 2, gpus: 1 });
        let totals = Totals { memory_bytes: 8 << 30, disk_bytes: 1 << 40 };
        let mut scratch = Sample::default();
        assert_eq!(build(&identity(), 1000, 1, totals, &gpus(), &mut windows, &mut scratch), None);
        for core in [10.0, 20.0, 30.0] {
            windows.push(&sample(core));
        }
        let report = build(&identity(), 1000, 42, totals, &gpus(), &mut windows, &mut scratch).unwrap();
        assert_eq!(report.validate(), Ok(()));
        assert_eq!(report.health_port, Some(9101));
        assert_eq!(report.sampled_at_ms, 42);
        assert_eq!(report.capacity.cores, 2);
        assert_eq!(report.capacity.gpus[0].model, "Fake GPU 0");
        let seconds: Vec<u32> = report.windows.iter().map(|w| w.seconds).collect();
        assert_eq!(seconds, vec![2, 10]);
        assert_eq!(report.windows[0].samples, 2);
        assert_eq!(report.windows[0].cores, vec![25.0, 50.0]);
        assert_eq!(report.windows[1].samples, 3);
        assert_eq!(report.windows[1].cores, vec![20.0, 50.0]);
        assert_eq!(report.windows[1].gpus[0].power_watts, 250.5);
    }

    #[test]
    fn wild_readings_are_clamped_into_a_valid_report() {
        let mut windows = Windows::new(&[10], Duration::from_secs(1), Shape { cores: 2, gpus: 1 });
        let mut wild = sample(f32::NAN);
        wild.cores[1] = 250.0;
        wild.memory_used = u64::MAX / 2;
        wild.disk_used = u64::MAX / 2;
        wild.net_rx_per_second = f64::INFINITY;
        wild.net_tx_per_second = -5.0;
        wild.gpus[0] = GpuSample {
            utilization_percent: 400.0,
            memory_used: u64::MAX / 2,
            temperature_celsius: 900.0,
            power_watts: -1.0,
        };
        windows.push(&wild);
        let totals = Totals { memory_bytes: 8 << 30, disk_bytes: 1 << 40 };
        let report =
            build(&identity(), 100, 1, totals, &gpus(), &mut windows, &mut Sample::default()).expect("one sample");
        assert_eq!(report.validate(), Ok(()));
        let window = &report.windows[0];
        assert_eq!(window.cores, vec![0.0, 100.0]);
        assert_eq!(window.memory_used_bytes, 8 << 30);
        assert_eq!((window.net_rx_bytes_per_second, window.net_tx_bytes_per_second), (0.0, 0.0));
        assert_eq!(window.gpus[0].utilization_percent, 100.0);
        assert_eq!(window.gpus[0].memory_used_bytes, 16 << 30);
        assert_eq!(window.gpus[0].temperature_celsius, 200.0);
    }
}
