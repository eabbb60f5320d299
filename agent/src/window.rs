//! Averages over sliding windows of samples.
//!
//! Each window keeps a ring of buckets and a running sum, so adding a sample
//! and reading a mean cost one pass over a sample's figures, not over the
//! window. A bucket holds one sample while the window has at most
//! [`MAX_BUCKETS`] ticks; longer windows put several ticks in a bucket, so
//! memory stays bounded however fast the agent samples. The running sum is
//! rebuilt from the buckets each time the ring wraps, so rounding errors
//! cannot build up over a long run.

use std::time::Duration;

/// The most buckets one window keeps: 15 minutes at 1 Hz fits exactly.
pub const MAX_BUCKETS: usize = 900;

/// One reading of everything the agent samples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// Use of each core, percent.
    pub cores: Vec<f32>,
    pub memory_used: u64,
    pub disk_used: u64,
    pub net_rx_per_second: f64,
    pub net_tx_per_second: f64,
    pub gpus: Vec<GpuSample>,
}

/// One GPU's reading.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GpuSample {
    pub utilization_percent: f64,
    pub memory_used: u64,
    pub temperature_celsius: f64,
    pub power_watts: f64,
}

/// Figures per core and per GPU; the rest are memory, disk, rx and tx.
const PER_GPU: usize = 4;
const FIXED: usize = 4;

/// How many cores and GPUs a sample has; windows hold samples of one shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    pub cores: usize,
    pub gpus: usize,
}

impl Shape {
    pub fn of(sample: &Sample) -> Shape {
        Shape { cores: sample.cores.len(), gpus: sample.gpus.len() }
    }

    fn width(self) -> usize {
        self.cores + FIXED + PER_GPU * self.gpus
    }
}

/// Writes a sample's figures into `out`, one f64 each.
fn flatten(sample: &Sample, out: &mut Vec<f64>) {
    out.clear();
    out.extend(sample.cores.iter().map(|&c| f64::from(c)));
    out.extend([
        sample.memory_used as f64,
        sample.disk_used as f64,
        sample.net_rx_per_second,
        sample.net_tx_per_second,
    ]);
    for gpu in &sample.gpus {
        out.extend([gpu.utilization_percent, gpu.memory_used as f64, gpu.temperature_celsius, gpu.power_watts]);
    }
}

/// The inverse of [`flatten`], for means.
fn unflatten(values: &[f64], shape: Shape, out: &mut Sample) {
    let (cores, rest) = values.split_at(shape.cores);
    out.cores.clear();
    out.cores.extend(cores.iter().map(|&c| c as f32));
    out.memory_used = rest[0].round() as u64;
    out.disk_used = rest[1].round() as u64;
    out.net_rx_per_second = rest[2];
    out.net_tx_per_second = rest[3];
    out.gpus.clear();
    out.gpus.extend(rest[FIXED..].chunks_exact(PER_GPU).map(|g| GpuSample {
        utilization_percent: g[0],
        memory_used: g[1].round() as u64,
        temperature_celsius: g[2],
        power_watts: g[3],
    }));
}

/// One sliding window.
#[derive(Debug)]
pub struct Window {
    seconds: u32,
    ticks_per_bucket: u32,
    width: usize,
    /// `buckets.len() / width` buckets, each the sum of its samples.
    buckets: Vec<f64>,
    counts: Vec<u32>,
    /// The bucket being filled.
    head: usize,
    /// Buckets holding samples, the head included.
    used: usize,
    sum: Vec<f64>,
    samples: u32,
}

impl Window {
    fn new(seconds: u32, tick: Duration, width: usize) -> Window {
        let tick_ms = tick.as_millis().max(1);
        let ticks = (u128::from(seconds) * 1000).div_ceil(tick_ms).max(1);
        let ticks_per_bucket = ticks.div_ceil(MAX_BUCKETS as u128);
        let buckets = ticks.div_ceil(ticks_per_bucket) as usize;
        Window {
            seconds,
            ticks_per_bucket: ticks_per_bucket as u32,
            width,
            buckets: vec![0.0; buckets * width],
            counts: vec![0; buckets],
            head: 0,
            used: 1,
            sum: vec![0.0; width],
            samples: 0,
        }
    }

    fn bucket_count(&self) -> usize {
        self.counts.len()
    }

    fn push(&mut self, values: &[f64]) {
        if self.counts[self.head] == self.ticks_per_bucket {
            self.rotate();
        }
        let at = self.head * self.width;
        for ((bucket, sum), value) in self.buckets[at..at + self.width].iter_mut().zip(&mut self.sum).zip(values) {
            *bucket += value;
            *sum += value;
        }
        self.counts[self.head] += 1;
        self.samples += 1;
    }

    /// Moves to the next bucket, dropping the oldest when the ring is full.
    fn rotate(&mut self) {
        self.head = (self.head + 1) % self.bucket_count();
        let at = self.head * self.width;
        if self.used == self.bucket_count() {
            for (sum, old) in self.sum.iter_mut().zip(&self.buckets[at..at + self.width]) {
                *sum -= old;
            }
            self.samples -= self.counts[self.head];
        } else {
            self.used += 1;
        }
        self.buckets[at..at + self.width].fill(0.0);
        self.counts[self.head] = 0;
        if self.head == 0 {
            self.resum();
        }
    }

    /// Rebuilds the running sum from the buckets.
    fn resum(&mut self) {
        self.sum.fill(0.0);
        for bucket in self.buckets.chunks_exact(self.width) {
            for (sum, value) in self.sum.iter_mut().zip(bucket) {
                *sum += value;
            }
        }
    }

    /// The window's length in seconds.
    pub fn seconds(&self) -> u32 {
        self.seconds
    }

    /// Samples in the window now.
    pub fn samples(&self) -> u32 {
        self.samples
    }
}

/// All the agent's windows, shortest first.
#[derive(Debug)]
pub struct Windows {
    shape: Shape,
    tick: Duration,
    windows: Vec<Window>,
    /// A flattened sample, reused between pushes and means.
    scratch: Vec<f64>,
}

impl Windows {
    /// Windows of the given lengths (seconds, shortest first) for samples
    /// taken every `tick`.
    pub fn new(seconds: &[u32], tick: Duration, shape: Shape) -> Windows {
        let windows = seconds.iter().map(|&s| Window::new(s, tick, shape.width())).collect();
        Windows { shape, tick, windows, scratch: Vec::with_capacity(shape.width()) }
    }

    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Adds a sample to every window. A sample of another shape (a core
    /// came online, say) starts the windows afresh: old means would not fit.
    /// Returns whether that happened.
    pub fn push(&mut self, sample: &Sample) -> bool {
        let shape = Shape::of(sample);
        let reset = shape != self.shape;
        if reset {
            let seconds: Vec<u32> = self.windows.iter().map(Window::seconds).collect();
            *self = Windows::new(&seconds, self.tick, shape);
        }
        flatten(sample, &mut self.scratch);
        for window in &mut self.windows {
            window.push(&self.scratch);
        }
        reset
    }

    pub fn iter(&self) -> impl Iterator<Item = &Window> {
        self.windows.iter()
    }

    /// The mean of window `index` into `out`, and the window's length and
    /// sample count; None while it has no samples.
    pub fn mean(&mut self, index: usize, out: &mut Sample) -> Option<(u32, u32)> {
        let window = self.windows.get(index)?;
        if window.samples == 0 {
            return None;
        }
        let samples = f64::from(window.samples);
        self.scratch.clear();
        self.scratch.extend(window.sum.iter().map(|s| s / samples));
        unflatten(&self.scratch, self.shape, out);
        Some((window.seconds, window.samples))
    }

    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(value: f64) -> Sample {
        Sample {
            cores: vec![value as f32, (value * 2.0) as f32],
            memory_used: (value * 1000.0) as u64,
            disk_used: 7,
            net_rx_per_second: value,
            net_tx_per_second: 0.5,
            gpus: vec![GpuSample {
                utilization_percent: value,
                memory_used: 1 << 30,
                temperature_celsius: 40.0,
                power_watts: value,
            }],
        }
    }

    fn mean(windows: &mut Windows, index: usize) -> (u32, Sample) {
        let mut out = Sample::default();
        let (_, samples) = windows.mean(index, &mut out).expect("has samples");
        (samples, out)
    }

    #[test]
    fn means_cover_only_the_window() {
        let mut windows = Windows::new(&[3, 10], Duration::from_secs(1), Shape { cores: 2, gpus: 1 });
        assert_eq!(windows.mean(0, &mut Sample::default()), None);
        for v in 1..=5 {
            windows.push(&sample(f64::from(v)));
        }
        // The 3 s window holds 3, 4 and 5; the 10 s window all five so far.
        let (samples, short) = mean(&mut windows, 0);
        assert_eq!(samples, 3);
        assert_eq!(short.cores, vec![4.0, 8.0]);
        assert_eq!(short.memory_used, 4000);
        assert_eq!(short.disk_used, 7);
        assert_eq!(short.net_rx_per_second, 4.0);
        assert_eq!(short.gpus[0].power_watts, 4.0);
        assert_eq!(short.gpus[0].memory_used, 1 << 30);
        let (samples, long) = mean(&mut windows, 1);
        assert_eq!(samples, 5);
        assert_eq!(long.cores, vec![3.0, 6.0]);
    }

    #[test]
    fn a_long_run_stays_exact() {
        let mut windows = Windows::new(&[10], Duration::from_secs(1), Shape { cores: 2, gpus: 1 });
        for v in 0..100_000u32 {
            windows.push(&sample(f64::from(v % 7) + 0.1));
        }
        let (samples, out) = mean(&mut windows, 0);
        assert_eq!(samples, 10);
        // The last ten values of (v % 7) + 0.1 for v = 99990..99999.
        let expected: f64 = (99_990..100_000u32).map(|v| f64::from(v % 7) + 0.1).sum::<f64>() / 10.0;
        assert!((out.net_rx_per_second - expected).abs() < 1e-9, "{} vs {expected}", out.net_rx_per_second);
    }

    #[test]
    fn fast_ticks_use_bounded_buckets() {
        let tick = Duration::from_millis(100);
        let windows = Windows::new(&[10, 60, 900, 3600], tick, Shape { cores: 4, gpus: 0 });
        let sizes: Vec<(usize, u32)> = windows.iter().map(|w| (w.bucket_count(), w.ticks_per_bucket)).collect();
        assert_eq!(sizes, vec![(100, 1), (600, 1), (900, 10), (900, 40)]);
        // A window shorter than a tick still holds one sample.
        let tiny = Windows::new(&[1], Duration::from_secs(5), Shape::default());
        assert_eq!(tiny.windows[0].bucket_count(), 1);
    }

    #[test]
    fn bucketed_windows_average_over_their_span() {
        // 20 s at 10 ms ticks: 2000 ticks in 900 buckets of 3 ticks (667 buckets).
        let mut windows = Windows::new(&[20], Duration::from_millis(10), Shape { cores: 2, gpus: 1 });
        assert_eq!(windows.windows[0].bucket_count(), 667);
        for _ in 0..5000 {
            windows.push(&sample(1.0));
        }
        for _ in 0..1000 {
            windows.push(&sample(3.0));
        }
        let (samples, out) = mean(&mut windows, 0);
        // Between 666 * 3 + 1 and 667 * 3 samples, the newest 1000 of them 3.0.
        assert!((1999..=2001).contains(&samples), "{samples}");
        let expected = (f64::from(samples - 1000) + 3000.0) / f64::from(samples);
        assert!((out.net_rx_per_second - expected).abs() < 1e-9);
    }

    #[test]
    fn a_new_shape_starts_afresh() {
        let mut windows = Windows::new(&[10], Duration::from_secs(1), Shape { cores: 2, gpus: 1 });
        assert!(!windows.push(&sample(1.0)));
        let mut three = sample(2.0);
        three.cores.push(9.0);
        assert!(windows.push(&three));
        let (samples, out) = mean(&mut windows, 0);
        assert_eq!(samples, 1);
        assert_eq!(out.cores, vec![2.0, 4.0, 9.0]);
        assert_eq!(windows.shape(), Shape { cores: 3, gpus: 1 });
    }
}
