//! GPU sampling through NVML.
//!
//! NVML is loaded at run time (nvml-wrapper opens the library with dlopen),
//! so the agent runs the same on nodes with and without NVIDIA drivers. A
//! query that fails for one GPU is logged once and that figure keeps its
//! last value; nothing here can stop the agent.

use std::ffi::OsStr;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;
use tracing::{info, warn};

use crate::config::GpuMode;
use crate::window::GpuSample;

/// The longest model name the operator takes.
const MAX_MODEL_LEN: usize = 128;

/// A GPU's identity and size.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuInfo {
    pub index: u32,
    pub model: String,
    pub memory_total: u64,
}

/// Something that reads GPUs. The agent holds one for its whole life.
pub trait GpuSource {
    /// The GPUs, in index order.
    fn gpus(&self) -> &[GpuInfo];

    /// Reads every GPU. Returns one reading per GPU, and how many queries
    /// failed (their figures keep the previous reading).
    fn sample(&mut self) -> (&[GpuSample], u32);
}

/// No GPUs: NVML is off, missing, or found none.
#[derive(Debug, Default)]
pub struct NoGpus;

impl GpuSource for NoGpus {
    fn gpus(&self) -> &[GpuInfo] {
        &[]
    }

    fn sample(&mut self) -> (&[GpuSample], u32) {
        (&[], 0)
    }
}

/// The library names tried when no path is given: drivers ship the
/// versioned name; the bare one comes only with development packages.
const SYSTEM_LIBRARIES: [&str; 2] = ["libnvidia-ml.so.1", "libnvidia-ml.so"];

/// Opens NVML as `mode` says, or falls back to no GPUs (logged at info).
pub fn open(mode: &GpuMode) -> Box<dyn GpuSource> {
    let nvml = match mode {
        GpuMode::Off => {
            info!("GPU sampling is off (--no-gpu)");
            return Box::new(NoGpus);
        }
        GpuMode::Library(path) => Nvml::builder().lib_path(path.as_os_str()).init(),
        GpuMode::System => {
            let [first, second] = SYSTEM_LIBRARIES;
            match Nvml::builder().lib_path(OsStr::new(first)).init() {
                // Not there: try the other name, but report the usual one's error.
                Err(error @ NvmlError::LibloadingError(_)) => {
                    Nvml::builder().lib_path(OsStr::new(second)).init().map_err(|_| error)
                }
                other => other,
            }
        }
    };
    let nvml = match nvml {
        Ok(nvml) => nvml,
        Err(error) => {
            info!(%error, "no NVML; reporting no GPUs");
            return Box::new(NoGpus);
        }
    };
    match NvmlGpus::new(nvml) {
        Ok(gpus) if !gpus.gpus().is_empty() => {
            for gpu in gpus.gpus() {
                info!(index = gpu.index, model = %gpu.model, memory_bytes = gpu.memory_total, "found GPU");
            }
            Box::new(gpus)
        }
        Ok(_) => {
            info!("no GPUs");
            Box::new(NoGpus)
        }
        Err(error) => {
            info!(%error, "no GPUs: NVML cannot count them");
            Box::new(NoGpus)
        }
    }
}

/// The queries made per GPU per sample, for logging each failure once.
#[derive(Clone, Copy, Debug)]
enum Query {
    Handle,
    Utilization,
    Memory,
    Temperature,
    Power,
}

impl Query {
    fn bit(self) -> u8 {
        1 << self as u8
    }

    fn name(self) -> &'static str {
        match self {
            Query::Handle => "device handle",
            Query::Utilization => "utilization",
            Query::Memory => "memory",
            Query::Temperature => "temperature",
            Query::Power => "power",
        }
    }
}

/// GPUs read through NVML.
pub struct NvmlGpus {
    nvml: Nvml,
    info: Vec<GpuInfo>,
    last: Vec<GpuSample>,
    /// Per GPU, the queries whose failure was already logged.
    logged: Vec<u8>,
}

impl NvmlGpus {
    fn new(nvml: Nvml) -> Result<NvmlGpus, NvmlError> {
        let count = nvml.device_count()?;
        let mut info = Vec::with_capacity(count as usize);
        for index in 0..count {
            let device = nvml.device_by_index(index);
            let model = device.as_ref().map_or(Err(NvmlError::Unknown), |d| d.name().map_err(|_| NvmlError::Unknown));
            let memory_total = device.as_ref().ok().and_then(|d| d.memory_info().ok()).map_or(0, |m| m.total);
            info.push(GpuInfo { index, model: model_name(model.ok()), memory_total });
        }
        let last = vec![GpuSample::default(); info.len()];
        let logged = vec![0; info.len()];
        let mut gpus = NvmlGpus { nvml, info, last, logged };
        // Read once now so the first report does not start from zeros.
        gpus.sample();
        Ok(gpus)
    }
}

fn model_name(name: Option<String>) -> String {
    let mut name = name.filter(|n| !n.trim().is_empty()).unwrap_or_else(|| "unknown".to_owned());
    if name.len() > MAX_MODEL_LEN {
        let mut end = MAX_MODEL_LEN;
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name.truncate(end);
    }
    name
}

/// Keeps a query's value, or logs its failure the first time in a row.
fn note<T>(logged: &mut u8, index: u32, query: Query, result: Result<T, NvmlError>, failures: &mut u32) -> Option<T> {
    match result {
        Ok(value) => {
            if *logged & query.bit() != 0 {
                info!(gpu = index, query = query.name(), "GPU query works again");
                *logged &= !query.bit();
            }
            Some(value)
        }
        Err(error) => {
            *failures += 1;
            if *logged & query.bit() == 0 {
                warn!(gpu = index, query = query.name(), %error, "GPU query failed; keeping its last value");
                *logged |= query.bit();
            }
            None
        }
    }
}

impl GpuSource for NvmlGpus {
    fn gpus(&self) -> &[GpuInfo] {
        &self.info
    }

    fn sample(&mut self) -> (&[GpuSample], u32) {
        let mut failures = 0;
        for ((info, last), logged) in self.info.iter_mut().zip(&mut self.last).zip(&mut self.logged) {
            let index = info.index;
            let Some(device) = note(logged, index, Query::Handle, self.nvml.device_by_index(index), &mut failures)
            else {
                continue;
            };
            if let Some(rates) = note(logged, index, Query::Utilization, device.utilization_rates(), &mut failures) {
                last.utilization_percent = f64::from(rates.gpu.min(100));
            }
            if let Some(memory) = note(logged, index, Query::Memory, device.memory_info(), &mut failures) {
                last.memory_used = memory.used.min(memory.total);
                info.memory_total = memory.total;
            }
            let temperature = device.temperature(TemperatureSensor::Gpu);
            if let Some(celsius) = note(logged, index, Query::Temperature, temperature, &mut failures) {
                last.temperature_celsius = f64::from(celsius);
            }
            if let Some(milliwatts) = note(logged, index, Query::Power, device.power_usage(), &mut failures) {
                last.power_watts = f64::from(milliwatts) / 1000.0;
            }
        }
        (&self.last, failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_means_no_gpus() {
        let mut gpus = open(&GpuMode::Library("/nonexistent/libnvidia-ml.so.1".into()));
        assert!(gpus.gpus().is_empty());
        assert_eq!(gpus.sample(), (&[][..], 0));
        assert!(open(&GpuMode::Off).gpus().is_empty());
    }

    #[test]
    fn model_names_are_bounded() {
        assert_eq!(model_name(None), "unknown");
        assert_eq!(model_name(Some(" ".into())), "unknown");
        assert_eq!(model_name(Some("NVIDIA H100".into())), "NVIDIA H100");
        let long = "é".repeat(100);
        let cut = model_name(Some(long));
        assert_eq!(cut.len(), MAX_MODEL_LEN);
    }
}
