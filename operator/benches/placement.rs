//! Placement decision benchmark: pure router, one core, no I/O.
//!
//! `cargo bench -p tidepool-operator --bench placement` fills the router with
//! 100 and 1,000 backends of varied load and times each decision (filter,
//! score, reserve). It prints p50/p99/max per decision and decisions per
//! second, for the full scan and for power-of-two choices, beside the
//! reference router's published linear scan (14.8 us at 100 backends).

use std::time::{Duration, Instant};

use tidepool_crds::warm_pool::PlacementWeights;
use tidepool_operator::placement::{Need, Request, Router, RouterSettings};
use tidepool_wire::report::{AgentReport, Capacity, ReportKind, Window};

/// The reference router's published linear scan at 100 backends, in microseconds.
const REFERENCE_100_US: f64 = 14.8;

fn report(name: String, seed: u64) -> AgentReport {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 1000) as f32 / 10.0
    };
    let cores: Vec<f32> = (0..64).map(|_| next()).collect();
    let memory: u64 = 512 << 30;
    AgentReport::new(
        name,
        ReportKind::Node,
        Capacity { cores: 64, memory_bytes: memory, disk_bytes: 1 << 42, gpus: vec![] },
        vec![Window {
            seconds: 10,
            samples: 10,
            memory_used_bytes: (memory as f64 * f64::from(next()) / 200.0) as u64,
            cores,
            ..Window::default()
        }],
    )
}

struct Figures {
    p50: Duration,
    p99: Duration,
    max: Duration,
    per_second: f64,
}

fn run(backends: usize, two_choices_above: usize, decisions: usize) -> Figures {
    let settings =
        RouterSettings { two_choices_above, pending_timeout: Duration::from_millis(100), ..Default::default() };
    let mut router = Router::new(settings);
    let start = Instant::now();
    for b in 0..backends {
        router.ingest(report(format!("node-{b}"), b as u64 + 1), start);
    }
    let weights = PlacementWeights::default();
    let need = Need { vcpu: 1, memory_bytes: 1 << 30, ..Need::default() };
    let request = Request { need, weights: &weights, client: None, sticky: None, replaces_own: false };
    let mut times = Vec::with_capacity(decisions);
    let began = Instant::now();
    for i in 0..decisions {
        // Simulated time runs at 100,000 decisions a second; reservations
        // expire after 100 simulated ms (about ten per backend at 1,000), as
        // reports would show them, so backends neither fill up nor stay empty.
        let now = start + Duration::from_micros(10 * i as u64);
        if i % 1_000 == 0 {
            router.sweep(now);
        }
        let t = Instant::now();
        let pick = router.route(&request, now);
        times.push(t.elapsed());
        std::hint::black_box(pick.ok());
    }
    let total = began.elapsed();
    times.sort_unstable();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    Figures {
        p50: at(0.50),
        p99: at(0.99),
        max: times[times.len() - 1],
        per_second: decisions as f64 / total.as_secs_f64(),
    }
}

fn main() {
    let decisions = 200_000;
    println!("placement decision, one core, {decisions} decisions each (filter, score, reserve)");
    println!("{:<34} {:>9} {:>9} {:>9} {:>14}", "case", "p50 us", "p99 us", "max us", "decisions/s");
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let mut scan_100 = 0.0;
    for (label, backends, above) in [
        ("100 backends, full scan", 100, usize::MAX),
        ("1,000 backends, full scan", 1000, usize::MAX),
        ("1,000 backends, two choices", 1000, 64),
    ] {
        let f = run(backends, above, decisions);
        if backends == 100 {
            scan_100 = us(f.p50);
        }
        println!("{label:<34} {:>9.2} {:>9.2} {:>9.2} {:>14.0}", us(f.p50), us(f.p99), us(f.max), f.per_second);
    }
    println!(
        "reference router, linear scan at 100 backends: {REFERENCE_100_US} us (published); ratio ours/reference at p50: {:.3}",
        scan_100 / REFERENCE_100_US
    );
}
