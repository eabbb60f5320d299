//! The arithmetic of the measurements, apart from any I/O so that it can be
//! tested on its own. Times are microseconds on the run's monotonic clock.

use tidepool_crds::test_session::LatencySummary;
use tidepool_protocol::grading::{self, Rfc3550Jitter};
use tidepool_protocol::pod::{HouseholdUser, UploadReport};

/// A cumulative byte count over time: `(µs, bytes so far)`, ascending in time.
pub type Series = Vec<(u64, u64)>;

/// The count of a series at `at_us`, interpolated linearly between samples;
/// before the first sample it is the first count, after the last the last.
pub fn bytes_at(series: &[(u64, u64)], at_us: u64) -> f64 {
    let after = series.partition_point(|(t, _)| *t <= at_us);
    match (after.checked_sub(1).map(|i| series[i]), series.get(after)) {
        (None, None) => 0.0,
        (None, Some(&(_, first))) => first as f64,
        (Some((_, bytes)), None) => bytes as f64,
        (Some((t0, b0)), Some(&(t1, b1))) => {
            let fraction = (at_us - t0) as f64 / (t1 - t0) as f64;
            b0 as f64 + fraction * (b1 as f64 - b0 as f64)
        }
    }
}

/// The combined rate of several series between `from_us` and `to_us`, in
/// Mbit/s (bytes × 8 per µs is Mbit/s).
pub fn rate_mbps<'a>(series: impl IntoIterator<Item = &'a Series>, from_us: u64, to_us: u64) -> f64 {
    if to_us <= from_us {
        return 0.0;
    }
    let bytes: f64 = series.into_iter().map(|s| (bytes_at(s, to_us) - bytes_at(s, from_us)).max(0.0)).sum();
    bytes * 8.0 / (to_us - from_us) as f64
}

/// An upload report as a series on the run's clock: the pod counts from its
/// first byte, which the client sent at `first_byte_us`.
pub fn report_series(first_byte_us: u64, report: &UploadReport) -> Series {
    let mut series = Vec::with_capacity(report.samples.len() + 1);
    series.push((first_byte_us, 0));
    series.extend(report.samples.iter().map(|(t, bytes)| (first_byte_us + t, *bytes)));
    series
}

/// The size of the next upload chunk for a stream that has been sending at
/// `bytes_per_second` (0 when not known yet). About 5 ms of data: large
/// chunks where the line is fast (fewer system calls), small ones where it
/// is slow, so that little is queued in the client when a phase ends.
pub fn upload_chunk_bytes(bytes_per_second: f64) -> usize {
    const MIN: usize = 1024;
    const MAX: usize = 256 * 1024;
    if bytes_per_second <= 0.0 {
        return 64 * 1024;
    }
    ((bytes_per_second * 0.005) as usize).clamp(MIN, MAX)
}

/// Paces a household user's up traffic: credit accrues at the user's rate
/// while it is active and is spent in whole bytes.
#[derive(Clone, Debug)]
pub struct Pacer {
    bytes_per_us: f64,
    credit: f64,
}

impl Pacer {
    /// The most credit kept: 100 ms of traffic. A sender that fell behind
    /// does not catch up in one burst, as a real call or game would not.
    const MAX_CREDIT_US: f64 = 100_000.0;

    pub fn new(mbps: f64) -> Self {
        Self { bytes_per_us: mbps / 8.0, credit: 0.0 }
    }

    /// The bytes to send after `elapsed_us` more, of which the user was
    /// active or not; an idle user keeps no credit.
    pub fn advance(&mut self, elapsed_us: u64, active: bool) -> usize {
        if !active {
            self.credit = 0.0;
            return 0;
        }
        let max = self.bytes_per_us * Self::MAX_CREDIT_US;
        self.credit = (self.credit + self.bytes_per_us * elapsed_us as f64).min(max.max(1.0));
        let due = self.credit.floor();
        self.credit -= due;
        due as usize
    }
}

/// The down rate a household user should get, on average, in Mbit/s: its own
/// mean, or for bulk whatever the line leaves after the others' means (at
/// least 1 Mbit/s, and no more than the pod sends it).
pub fn target_down_mbps(user: HouseholdUser, line_mbps: f64) -> f64 {
    match user {
        HouseholdUser::Bulk => {
            let others: f64 = HouseholdUser::ALL
                .into_iter()
                .filter(|u| *u != HouseholdUser::Bulk)
                .map(|u| u.mean_down_mbps(line_mbps))
                .sum();
            let (offered, _) = user.rates_mbps(line_mbps);
            (line_mbps - others).max(1.0).min(offered)
        }
        other => other.mean_down_mbps(line_mbps),
    }
}

/// The share of its target a user achieved, in percent, at most 100: the
/// household grade caps it there, and more than the target is no better.
pub fn share_percent(user: HouseholdUser, achieved_mbps: f64, line_mbps: f64) -> f64 {
    (100.0 * achieved_mbps / target_down_mbps(user, line_mbps)).clamp(0.0, 100.0)
}

/// One latency ping: when it was sent and, once answered, its round trip.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ping {
    pub sent_us: u64,
    pub rtt_us: Option<u64>,
}

/// The statistics of the pings sent in `[from_us, to_us)`: quantiles and
/// jitter from those answered, loss from those that were not.
pub fn ping_summary(pings: &[Ping], from_us: u64, to_us: u64) -> LatencySummary {
    let window = pings.iter().filter(|p| (from_us..to_us).contains(&p.sent_us));
    let sent = window.clone().count() as u64;
    let rtts: Vec<f64> = window.filter_map(|p| p.rtt_us).map(ms).collect();
    grading::summarize(&rtts, sent)
}

/// The median round trip of the pings sent in `[from_us, to_us)`. A ping
/// still unanswered at `now_us` counts as `now_us - sent_us`, a lower bound
/// of its round trip: leaving it out would hide the worst of a full queue.
pub fn loaded_median_ms(pings: &[Ping], from_us: u64, to_us: u64, now_us: u64) -> Option<f64> {
    let rtts: Vec<f64> = pings
        .iter()
        .filter(|p| (from_us..to_us).contains(&p.sent_us))
        .map(|p| ms(p.rtt_us.unwrap_or(now_us.saturating_sub(p.sent_us))))
        .collect();
    (!rtts.is_empty()).then(|| grading::median(&rtts))
}

/// Loss and RFC 3550 jitter of a UDP echo series: `sent` datagrams, and of
/// those echoed, the one-way transit (the pod's receive time less the
/// client's send time, two clocks whose offset cancels out) in arrival order.
pub fn udp_loss_and_jitter(sent: u64, transits_us: &[i64]) -> (f64, f64) {
    let received = transits_us.len() as u64;
    let loss = if sent == 0 { 0.0 } else { 100.0 * sent.saturating_sub(received) as f64 / sent as f64 };
    let mut jitter = Rfc3550Jitter::default();
    if let Some(first) = transits_us.first() {
        // Relative to the first transit: the clocks' offset is large and
        // would cost precision in milliseconds as f64.
        transits_us.iter().for_each(|t| jitter.update((t - first) as f64 / 1000.0));
    }
    (loss, jitter.value())
}

/// Microseconds as milliseconds.
pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn bytes_are_interpolated_and_clamped() {
        let series = vec![(1_000, 0), (2_000, 1_000), (4_000, 2_000)];
        assert_eq!(bytes_at(&series, 0), 0.0);
        assert_eq!(bytes_at(&series, 1_500), 500.0);
        assert_eq!(bytes_at(&series, 2_000), 1_000.0);
        assert_eq!(bytes_at(&series, 3_000), 1_500.0);
        assert_eq!(bytes_at(&series, 9_000), 2_000.0);
        assert_eq!(bytes_at(&[], 9_000), 0.0);
    }

    #[test]
    fn the_rate_of_several_series_is_their_sum_over_the_window() {
        // 125 bytes per ms each is 1 Mbit/s each.
        let a: Series = (0..=10).map(|i| (i * 1_000, i * 125)).collect();
        let b: Series = (0..=10).map(|i| (500 + i * 1_000, i * 125)).collect();
        assert!(close(rate_mbps([&a], 2_500, 10_000), 1.0));
        assert!(close(rate_mbps([&a, &b], 2_500, 10_000), 2.0));
        // Nothing after a series ends: a stream that stopped adds nothing.
        assert!(close(rate_mbps([&a], 10_000, 20_000), 0.0));
        assert_eq!(rate_mbps([&a], 5_000, 5_000), 0.0);
    }

    #[test]
    fn upload_reports_are_shifted_onto_the_run_clock() {
        let report = UploadReport { bytes: 300, elapsed_us: 200_000, samples: vec![(100_000, 100), (200_000, 300)] };
        let series = report_series(1_000_000, &report);
        assert_eq!(series, vec![(1_000_000, 0), (1_100_000, 100), (1_200_000, 300)]);
        // 200 bytes in the last 100 ms: 16 kbit/s.
        assert!(close(rate_mbps([&series], 1_100_000, 1_200_000), 0.016));
    }

    #[test]
    fn upload_chunks_follow_the_rate() {
        assert_eq!(upload_chunk_bytes(0.0), 64 * 1024);
        // 1 Mbit/s: 625 bytes in 5 ms, raised to the minimum.
        assert_eq!(upload_chunk_bytes(125_000.0), 1024);
        // 100 Mbit/s: 62.5 kB.
        assert_eq!(upload_chunk_bytes(12_500_000.0), 62_500);
        assert_eq!(upload_chunk_bytes(5e9), 256 * 1024);
    }

    #[test]
    fn the_pacer_sends_at_the_rate_only_while_active() {
        // 0.8 Mbit/s is 100 bytes per ms.
        let mut pacer = Pacer::new(0.8);
        let sent: usize = (0..100).map(|_| pacer.advance(10_000, true)).sum();
        assert_eq!(sent, 100_000);
        assert_eq!(pacer.advance(10_000, false), 0);
        // A long stall is not made up in one burst: at most 100 ms.
        assert_eq!(pacer.advance(5_000_000, true), 10_000);
        // Fractions carry over.
        let mut slow = Pacer::new(0.004);
        assert_eq!((0..4).map(|_| slow.advance(1_000, true)).sum::<usize>(), 2);
    }

    #[test]
    fn shares_use_the_mean_targets_and_bulk_takes_the_rest() {
        // The others' means: 1.5 + 2.5 + 25 / 5 = 9 Mbit/s.
        assert_eq!(target_down_mbps(HouseholdUser::Bulk, 100.0), 91.0);
        assert_eq!(target_down_mbps(HouseholdUser::Bulk, 5.0), 1.0);
        // The pod sends bulk at most 1 Gbit/s, whatever the line.
        assert_eq!(target_down_mbps(HouseholdUser::Bulk, 40_000.0), 1_000.0);
        assert_eq!(target_down_mbps(HouseholdUser::Streaming, 100.0), 5.0);
        assert_eq!(share_percent(HouseholdUser::Gaming, 0.75, 100.0), 50.0);
        assert_eq!(share_percent(HouseholdUser::Bulk, 45.5, 100.0), 50.0);
        assert_eq!(share_percent(HouseholdUser::Streaming, 6.0, 100.0), 100.0);
        assert_eq!(share_percent(HouseholdUser::VideoCall, 0.0, 100.0), 0.0);
    }

    #[test]
    fn ping_summaries_take_their_window() {
        let pings: Vec<Ping> = (0..20)
            .map(|i| Ping { sent_us: i * 100_000, rtt_us: (i % 10 != 9).then_some(10_000 + i * 1_000) })
            .collect();
        let summary = ping_summary(&pings, 0, 1_000_000);
        assert_eq!(summary.samples, 9);
        assert_eq!(summary.loss_percent, 10.0);
        assert_eq!(summary.p50_ms, 14.0);
        assert_eq!(ping_summary(&pings, 5_000_000, 6_000_000).samples, 0);
    }

    #[test]
    fn loaded_medians_count_unanswered_pings_as_a_lower_bound() {
        let pings = [
            Ping { sent_us: 0, rtt_us: Some(50_000) },
            Ping { sent_us: 100_000, rtt_us: Some(60_000) },
            Ping { sent_us: 200_000, rtt_us: None },
            Ping { sent_us: 300_000, rtt_us: None },
            Ping { sent_us: 900_000, rtt_us: Some(1_000) },
        ];
        // In the window: 50, 60, and at 1 s the unanswered 800 and 700.
        assert_eq!(loaded_median_ms(&pings, 0, 500_000, 1_000_000), Some(60.0));
        assert_eq!(loaded_median_ms(&pings, 400_000, 500_000, 1_000_000), None);
    }

    #[test]
    fn udp_jitter_follows_rfc3550_and_loss_counts_missing_echoes() {
        let (loss, jitter) = udp_loss_and_jitter(4, &[5_000_000_000, 5_000_016_000]);
        assert_eq!(loss, 50.0);
        // |D| = 16 ms: J = 16 / 16.
        assert_eq!(jitter, 1.0);
        assert_eq!(udp_loss_and_jitter(0, &[]), (0.0, 0.0));
    }
}
