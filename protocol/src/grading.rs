//! Grades and statistics: pure functions shared by the pod and the CLI.
//!
//! The cut-points are the published ones (DSLReports' bufferbloat grade,
//! Cloudflare's quality points, the household test's severities and fairness
//! grade, RFC 3550 jitter). Where they leave a gap we say what we chose.

use tidepool_crds::test_session::{Grade, Grades, HouseholdUserResult, LatencySummary, SessionResults, Severity};

/// The bufferbloat grade of a latency rise under load (ms): A+ under 5, A
/// under 30, B under 60, C under 200, D under 400, else F.
pub fn bufferbloat_grade(increase_ms: f64) -> Grade {
    match increase_ms {
        x if x < 5.0 => Grade::APlus,
        x if x < 30.0 => Grade::A,
        x if x < 60.0 => Grade::B,
        x if x < 200.0 => Grade::C,
        x if x < 400.0 => Grade::D,
        _ => Grade::F,
    }
}

/// A+ is 0, F is 5.
pub fn rank(grade: Grade) -> u8 {
    match grade {
        Grade::APlus => 0,
        Grade::A => 1,
        Grade::B => 2,
        Grade::C => 3,
        Grade::D => 4,
        Grade::F => 5,
    }
}

fn from_rank(rank: u8) -> Grade {
    [Grade::APlus, Grade::A, Grade::B, Grade::C, Grade::D, Grade::F][usize::from(rank.min(5))]
}

/// The grade nearest the mean of `grades` (halves round toward the worse).
pub fn mean_grade(grades: &[Grade]) -> Option<Grade> {
    if grades.is_empty() {
        return None;
    }
    let total: u32 = grades.iter().map(|g| u32::from(rank(*g))).sum();
    let count = grades.len() as u32;
    // Rounded half up: (2 * total + count) / (2 * count).
    Some(from_rank(u8::try_from((2 * total + count) / (2 * count)).unwrap_or(5)))
}

/// The bufferbloat grade of a whole run: the worse of the idle latency's own
/// grade and the mean grade of the rises under download, upload and both.
pub fn overall_bufferbloat(idle_ms: f64, increases_ms: &[f64]) -> Grade {
    let idle = bufferbloat_grade(idle_ms);
    let loaded: Vec<Grade> = increases_ms.iter().map(|x| bufferbloat_grade(*x)).collect();
    mean_grade(&loaded).map_or(idle, |mean| idle.max(mean))
}

/// Cloudflare-style quality points. The published tables stop at "< 500 ms"
/// for jitter; beyond that we give -20, as for the latency rise.
pub fn quality_points(increase_ms: f64, jitter_ms: f64, loss_percent: f64) -> i32 {
    let latency = match increase_ms {
        x if x < 10.0 => 20,
        x if x < 20.0 => 10,
        x if x < 50.0 => 5,
        x if x < 100.0 => 0,
        x if x < 500.0 => -10,
        _ => -20,
    };
    let jitter = match jitter_ms {
        x if x < 10.0 => 10,
        x if x < 20.0 => 5,
        x if x < 100.0 => 0,
        x if x < 500.0 => -10,
        _ => -20,
    };
    let loss = match loss_percent {
        x if x < 1.0 => 10,
        x if x < 5.0 => 5,
        x if x < 25.0 => 0,
        x if x < 50.0 => -10,
        _ => -20,
    };
    latency + jitter + loss
}

/// How badly a user's latency rose over its baseline: under 10 ms none,
/// under 50 mild, under 200 moderate, else severe.
pub fn severity(increase_ms: f64) -> Severity {
    match increase_ms {
        x if x < 10.0 => Severity::None,
        x if x < 50.0 => Severity::Mild,
        x if x < 200.0 => Severity::Moderate,
        _ => Severity::Severe,
    }
}

/// The household grade of a fairness score (0 to 100): 95 A+, 85 A, 75 B,
/// 65 C, 55 D, else F.
pub fn household_grade(score: f64) -> Grade {
    match score {
        x if x >= 95.0 => Grade::APlus,
        x if x >= 85.0 => Grade::A,
        x if x >= 75.0 => Grade::B,
        x if x >= 65.0 => Grade::C,
        x if x >= 55.0 => Grade::D,
        _ => Grade::F,
    }
}

/// The household's fairness score, 0 to 100. The reference publishes the
/// grade's cut-points but not the score, so ours is: each user scores its
/// throughput share (capped at 100 %) times a latency factor (none 1.0, mild
/// 0.85, moderate 0.6, severe 0.3), and the household scores the mean. A
/// line that starves anyone, or lets anyone's latency balloon, scores low.
pub fn household_score(users: &[HouseholdUserResult]) -> Option<f64> {
    if users.is_empty() {
        return None;
    }
    let factor = |s: Severity| match s {
        Severity::None => 1.0,
        Severity::Mild => 0.85,
        Severity::Moderate => 0.6,
        Severity::Severe => 0.3,
    };
    let total: f64 = users.iter().map(|u| u.share_percent.clamp(0.0, 100.0) * factor(u.severity)).sum();
    Some(total / users.len() as f64)
}

/// Fills `results.grades` from its figures: bufferbloat from the idle p50 and
/// the loaded medians, quality points from the worst rise, the idle jitter and
/// loss, the household grade from its users, and overall as the worst.
pub fn grade(results: &mut SessionResults) {
    let mut grades = Grades::default();
    if let Some(idle) = &results.latency {
        let loaded = results.loaded_latency.as_ref();
        let increases: Vec<f64> = loaded
            .into_iter()
            .flat_map(|l| [l.download_ms, l.upload_ms, l.bidirectional_ms])
            .flatten()
            .map(|ms| (ms - idle.p50_ms).max(0.0))
            .collect();
        if !increases.is_empty() {
            grades.bufferbloat = Some(overall_bufferbloat(idle.p50_ms, &increases));
        }
        let worst_rise = increases.iter().copied().fold(0.0, f64::max);
        grades.quality_points = Some(quality_points(worst_rise, idle.jitter_ms, idle.loss_percent));
    }
    if let Some(score) = household_score(&results.household) {
        grades.household = Some(household_grade(score));
    }
    grades.overall = [grades.bufferbloat, grades.household].into_iter().flatten().max();
    results.grades = Some(grades);
}

/// The `q` quantile (0 to 1) of sorted values, by the nearest rank.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The median of unsorted values.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    quantile(&sorted, 0.5)
}

/// RFC 3550 interarrival jitter: `J += (|D| - J) / 16`, where `D` is the
/// change in transit (or round-trip) time between consecutive packets.
#[derive(Clone, Copy, Debug, Default)]
pub struct Rfc3550Jitter {
    jitter: f64,
    last: Option<f64>,
}

impl Rfc3550Jitter {
    pub fn update(&mut self, transit_ms: f64) {
        if let Some(last) = self.last {
            self.jitter += ((transit_ms - last).abs() - self.jitter) / 16.0;
        }
        self.last = Some(transit_ms);
    }

    pub fn value(&self) -> f64 {
        self.jitter
    }
}

/// Idle latency statistics from round trips (ms, in arrival order) and the
/// count of probes sent.
pub fn summarize(rtts_ms: &[f64], sent: u64) -> LatencySummary {
    let mut jitter = Rfc3550Jitter::default();
    rtts_ms.iter().for_each(|rtt| jitter.update(*rtt));
    let mut sorted = rtts_ms.to_vec();
    sorted.sort_by(f64::total_cmp);
    let received = rtts_ms.len() as u64;
    let lost = sent.saturating_sub(received);
    LatencySummary {
        p50_ms: quantile(&sorted, 0.5),
        p95_ms: quantile(&sorted, 0.95),
        p99_ms: quantile(&sorted, 0.99),
        jitter_ms: jitter.value(),
        loss_percent: if sent == 0 { 0.0 } else { 100.0 * lost as f64 / sent as f64 },
        samples: i64::try_from(received).unwrap_or(i64::MAX),
    }
}

/// One household member's latency as the reference tracks it: the baseline
/// is the mean of the first ten pings, jitter the standard deviation over
/// the last 60 s, and the rise the median after the baseline minus it.
#[derive(Clone, Debug, Default)]
pub struct LatencyTracker {
    /// `(ms since the test began, rtt ms)`.
    samples: Vec<(u64, f64)>,
}

/// How many first pings make the baseline.
pub const BASELINE_PINGS: usize = 10;
/// The jitter window, in ms.
pub const JITTER_WINDOW_MS: u64 = 60_000;

impl LatencyTracker {
    pub fn record(&mut self, at_ms: u64, rtt_ms: f64) {
        self.samples.push((at_ms, rtt_ms));
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The mean of the first ten pings (or of all, when fewer).
    pub fn baseline_ms(&self) -> f64 {
        let first = &self.samples[..self.samples.len().min(BASELINE_PINGS)];
        mean(first.iter().map(|(_, rtt)| *rtt))
    }

    /// The mean of every ping.
    pub fn mean_ms(&self) -> f64 {
        mean(self.samples.iter().map(|(_, rtt)| *rtt))
    }

    /// The standard deviation of the pings of the last 60 s.
    pub fn jitter_ms(&self) -> f64 {
        let Some((last_at, _)) = self.samples.last() else { return 0.0 };
        let window: Vec<f64> =
            self.samples.iter().filter(|(at, _)| last_at - at <= JITTER_WINDOW_MS).map(|(_, rtt)| *rtt).collect();
        let m = mean(window.iter().copied());
        (mean(window.iter().map(|x| (x - m) * (x - m)))).sqrt()
    }

    /// The median of the pings after the baseline, less the baseline (never
    /// below zero); zero while there is nothing after the baseline. The
    /// median, not the mean: each user pings over its own TCP connection,
    /// and one lost packet there holds a pong for a retransmission timeout
    /// (200 ms or more), which would make a mild line look moderate.
    pub fn increase_ms(&self) -> f64 {
        if self.samples.len() <= BASELINE_PINGS {
            return 0.0;
        }
        let after: Vec<f64> = self.samples[BASELINE_PINGS..].iter().map(|(_, rtt)| *rtt).collect();
        (median(&after) - self.baseline_ms()).max(0.0)
    }

    pub fn severity(&self) -> Severity {
        severity(self.increase_ms())
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0u32), |(s, c), x| (s + x, c + 1));
    if count == 0 { 0.0 } else { sum / f64::from(count) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_crds::test_session::LoadedLatency;

    #[test]
    fn bufferbloat_cut_points() {
        let cases = [
            (0.0, Grade::APlus),
            (4.9, Grade::APlus),
            (5.0, Grade::A),
            (29.9, Grade::A),
            (30.0, Grade::B),
            (60.0, Grade::C),
            (199.0, Grade::C),
            (200.0, Grade::D),
            (400.0, Grade::F),
        ];
        for (ms, grade) in cases {
            assert_eq!(bufferbloat_grade(ms), grade, "{ms} ms");
        }
    }

    #[test]
    fn overall_is_the_worse_of_idle_and_the_mean_of_loaded() {
        // Loaded A+, B, C: ranks 0, 2, 3, mean 1.67, nearest B.
        assert_eq!(overall_bufferbloat(1.0, &[1.0, 40.0, 100.0]), Grade::B);
        // A bad idle line is not rescued by a small rise.
        assert_eq!(overall_bufferbloat(250.0, &[1.0, 1.0, 1.0]), Grade::D);
        // A half rounds toward the worse grade: A+ and A give A.
        assert_eq!(mean_grade(&[Grade::APlus, Grade::A]), Some(Grade::A));
        assert_eq!(mean_grade(&[]), None);
    }

    #[test]
    fn quality_points_follow_the_tables() {
        assert_eq!(quality_points(0.0, 0.0, 0.0), 40);
        assert_eq!(quality_points(15.0, 15.0, 2.0), 20);
        assert_eq!(quality_points(60.0, 50.0, 10.0), 0);
        assert_eq!(quality_points(600.0, 600.0, 60.0), -60);
    }

    #[test]
    fn severities_and_household_grades() {
        assert_eq!(severity(9.9), Severity::None);
        assert_eq!(severity(10.0), Severity::Mild);
        assert_eq!(severity(50.0), Severity::Moderate);
        assert_eq!(severity(200.0), Severity::Severe);
        assert_eq!(household_grade(95.0), Grade::APlus);
        assert_eq!(household_grade(85.0), Grade::A);
        assert_eq!(household_grade(54.9), Grade::F);
    }

    fn user(share: f64, severity: Severity) -> HouseholdUserResult {
        HouseholdUserResult {
            user: "u".into(),
            baseline_ms: 1.0,
            mean_ms: 1.0,
            jitter_ms: 0.0,
            share_percent: share,
            severity,
        }
    }

    #[test]
    fn household_score_punishes_starvation_and_latency() {
        assert_eq!(household_score(&[user(100.0, Severity::None), user(150.0, Severity::None)]), Some(100.0));
        assert_eq!(household_score(&[user(100.0, Severity::Severe), user(50.0, Severity::None)]), Some(40.0));
        assert_eq!(household_score(&[]), None);
    }

    #[test]
    fn grade_fills_every_grade_from_the_figures() {
        let mut results = SessionResults {
            latency: Some(LatencySummary { p50_ms: 1.0, jitter_ms: 1.0, samples: 10, ..Default::default() }),
            loaded_latency: Some(LoadedLatency {
                download_ms: Some(3.0),
                upload_ms: Some(70.0),
                bidirectional_ms: Some(90.0),
            }),
            household: vec![user(100.0, Severity::Moderate)],
            ..Default::default()
        };
        grade(&mut results);
        let grades = results.grades.unwrap();
        // Rises 2, 69, 89: A+, C, C; mean rank 2 = B.
        assert_eq!(grades.bufferbloat, Some(Grade::B));
        // Worst rise 89 ms: 0; jitter 1: 10; loss 0: 10.
        assert_eq!(grades.quality_points, Some(20));
        // Score 60: D.
        assert_eq!(grades.household, Some(Grade::D));
        assert_eq!(grades.overall, Some(Grade::D));
    }

    #[test]
    fn summaries_quantiles_and_rfc3550_jitter() {
        let rtts: Vec<f64> = (1..=100).map(f64::from).collect();
        let summary = summarize(&rtts, 200);
        assert_eq!((summary.p50_ms, summary.p95_ms, summary.p99_ms), (50.0, 95.0, 99.0));
        assert_eq!(summary.loss_percent, 50.0);
        assert_eq!(summary.samples, 100);
        // A steady 1 ms step converges toward 1 ms from below.
        assert!(summary.jitter_ms > 0.99 && summary.jitter_ms < 1.0, "{}", summary.jitter_ms);
        let mut jitter = Rfc3550Jitter::default();
        jitter.update(10.0);
        jitter.update(26.0);
        assert_eq!(jitter.value(), 1.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn tracker_baseline_jitter_and_rise() {
        let mut tracker = LatencyTracker::default();
        for i in 0..10 {
            tracker.record(i * 500, 10.0);
        }
        assert_eq!(tracker.increase_ms(), 0.0);
        for i in 10..20 {
            tracker.record(i * 500, 110.0);
        }
        assert_eq!(tracker.baseline_ms(), 10.0);
        assert_eq!(tracker.mean_ms(), 60.0);
        assert_eq!(tracker.increase_ms(), 100.0);
        assert_eq!(tracker.severity(), Severity::Moderate);
        assert_eq!(tracker.jitter_ms(), 50.0);
    }
}
