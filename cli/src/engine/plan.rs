//! What a profile runs, for how long, and the knobs that change it.

use std::time::Duration;

use tidepool_crds::test_session::{ProbeTarget, Profile};
use tidepool_protocol::grading::BASELINE_PINGS;
use tidepool_protocol::pod::{MAX_PING_HZ, MAX_STREAM_SECONDS};

/// The share of a loaded phase left out as warm-up: while TCP ramps up and
/// queues fill, rates and latency are not yet what the line gives.
pub const WARMUP: f64 = 0.25;
/// The household's line pre-test.
pub const LINE_TEST: Duration = Duration::from_secs(2);
/// The household's idle pings, before its traffic starts.
pub const BASELINE_INTERVAL: Duration = Duration::from_millis(100);
/// An idle phase lasts this share of a loaded one: 2 s beside 2.5 s.
const IDLE_SHARE: f64 = 0.8;

/// How the engine runs a profile.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Latency pings per second.
    pub ping_hz: u32,
    /// Parallel TCP streams per direction.
    pub streams: usize,
    /// The length of each loaded phase; idle phases last 0.8 of it.
    pub phase: Duration,
    /// The household line's download capacity, when known: no pre-test.
    pub line_mbps: Option<f64>,
    /// How long the household's users run, after the baseline.
    pub household: Duration,
    /// How often each household user pings while its traffic runs.
    pub household_ping: Duration,
    /// The targets of the probes profile (the session's own).
    pub probes: Vec<ProbeTarget>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ping_hz: 10,
            streams: 4,
            phase: Duration::from_millis(2_500),
            line_mbps: None,
            household: Duration::from_secs(10),
            household_ping: Duration::from_millis(500),
            probes: Vec::new(),
        }
    }
}

impl Settings {
    /// The limits of each knob.
    pub const MAX_STREAMS: usize = 16;
    pub const PHASE_SECONDS: std::ops::RangeInclusive<f64> = 0.5..=30.0;
    pub const HOUSEHOLD_SECONDS: std::ops::RangeInclusive<f64> = 1.0..=600.0;
    pub const HOUSEHOLD_PING_MS: std::ops::RangeInclusive<u64> = 100..=5_000;
    pub const MAX_LINE_MBPS: f64 = 100_000.0;

    /// Why these settings cannot run, if they cannot.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_PING_HZ).contains(&self.ping_hz) {
            return Err(format!("--ping-hz must be 1 to {MAX_PING_HZ}, not {}", self.ping_hz));
        }
        if !(1..=Self::MAX_STREAMS).contains(&self.streams) {
            return Err(format!("--streams must be 1 to {}, not {}", Self::MAX_STREAMS, self.streams));
        }
        let phase = self.phase.as_secs_f64();
        if !Self::PHASE_SECONDS.contains(&phase) {
            let (low, high) = Self::PHASE_SECONDS.into_inner();
            return Err(format!("--duration must be {low} to {high} seconds, not {phase}"));
        }
        if let Some(line) = self.line_mbps
            && !(line > 0.0 && line <= Self::MAX_LINE_MBPS)
        {
            return Err(format!("--line-mbps must be above 0 and at most {}, not {line}", Self::MAX_LINE_MBPS));
        }
        let household = self.household.as_secs_f64();
        if !Self::HOUSEHOLD_SECONDS.contains(&household) {
            let (low, high) = Self::HOUSEHOLD_SECONDS.into_inner();
            return Err(format!("--household-seconds must be {low} to {high}, not {household}"));
        }
        let ping_ms = u64::try_from(self.household_ping.as_millis()).unwrap_or(u64::MAX);
        if !Self::HOUSEHOLD_PING_MS.contains(&ping_ms) {
            let (low, high) = Self::HOUSEHOLD_PING_MS.into_inner();
            return Err(format!("--household-ping-ms must be {low} to {high}, not {ping_ms}"));
        }
        Ok(())
    }

    /// The `seconds` to ask the pod for, for a stream that must last `length`:
    /// a second more, so that the client, not the pod, ends it.
    pub fn stream_seconds(length: Duration) -> u64 {
        (length.as_secs_f64().ceil() as u64 + 1).clamp(1, MAX_STREAM_SECONDS)
    }

    fn idle(&self) -> Duration {
        self.phase.mul_f64(IDLE_SHARE)
    }
}

/// A step of a profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhaseKind {
    /// Pings (and UDP echoes) on an idle line.
    Idle,
    /// Pings while downloading.
    Download,
    /// Pings while uploading.
    Upload,
    /// Pings while downloading and uploading.
    Both,
    /// The household's line pre-test, a download.
    Line,
    /// The household users' idle pings.
    Baseline,
    /// The household users' traffic.
    Household,
    /// The pod runs the session's probes.
    Probes,
}

impl PhaseKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Download => "download",
            Self::Upload => "upload",
            Self::Both => "download + upload",
            Self::Line => "line pre-test",
            Self::Baseline => "household baseline",
            Self::Household => "household",
            Self::Probes => "probes",
        }
    }
}

/// A phase and its length; a probes phase has none planned (the pod decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Phase {
    pub kind: PhaseKind,
    pub length: Duration,
}

impl Phase {
    /// The part of the phase before its measurement window.
    pub fn warmup(&self) -> Duration {
        self.length.mul_f64(WARMUP)
    }
}

/// The phases of a profile, in order.
pub fn plan(profile: Profile, settings: &Settings) -> Vec<Phase> {
    let phase = |kind, length| Phase { kind, length };
    let loaded = settings.phase;
    match profile {
        Profile::Latency => vec![phase(PhaseKind::Idle, settings.idle())],
        Profile::Speed => vec![phase(PhaseKind::Download, loaded), phase(PhaseKind::Upload, loaded)],
        Profile::Bufferbloat => vec![
            phase(PhaseKind::Idle, settings.idle()),
            phase(PhaseKind::Download, loaded),
            phase(PhaseKind::Upload, loaded),
            phase(PhaseKind::Both, loaded),
        ],
        Profile::Household => {
            let line = settings.line_mbps.is_none().then_some(phase(PhaseKind::Line, LINE_TEST));
            let baseline = BASELINE_INTERVAL * BASELINE_PINGS as u32;
            line.into_iter()
                .chain([phase(PhaseKind::Baseline, baseline), phase(PhaseKind::Household, settings.household)])
                .collect()
        }
        Profile::Probes => vec![phase(PhaseKind::Probes, Duration::ZERO)],
    }
}

/// The planned length of a run.
pub fn total(phases: &[Phase]) -> Duration {
    phases.iter().map(|p| p.length).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_bufferbloat_run_takes_at_most_ten_seconds() {
        let phases = plan(Profile::Bufferbloat, &Settings::default());
        let kinds: Vec<PhaseKind> = phases.iter().map(|p| p.kind).collect();
        assert_eq!(kinds, [PhaseKind::Idle, PhaseKind::Download, PhaseKind::Upload, PhaseKind::Both]);
        assert_eq!(phases[0].length, Duration::from_secs(2));
        assert_eq!(total(&phases), Duration::from_millis(9_500));
        assert!(total(&phases) <= Duration::from_secs(10));
        assert_eq!(phases[1].warmup(), Duration::from_millis(625));
    }

    #[test]
    fn duration_scales_every_phase() {
        let settings = Settings { phase: Duration::from_secs(5), ..Settings::default() };
        assert_eq!(total(&plan(Profile::Bufferbloat, &settings)), Duration::from_secs(19));
        assert_eq!(total(&plan(Profile::Speed, &settings)), Duration::from_secs(10));
        assert_eq!(total(&plan(Profile::Latency, &settings)), Duration::from_secs(4));
    }

    #[test]
    fn the_household_skips_its_pre_test_when_the_line_is_known() {
        let settings = Settings::default();
        let phases = plan(Profile::Household, &settings);
        assert_eq!(phases[0], Phase { kind: PhaseKind::Line, length: LINE_TEST });
        assert_eq!(phases[1].length, Duration::from_secs(1));
        assert_eq!(total(&phases), Duration::from_secs(13));
        let known = Settings { line_mbps: Some(100.0), ..settings };
        assert_eq!(plan(Profile::Household, &known)[0].kind, PhaseKind::Baseline);
    }

    #[test]
    fn settings_are_checked() {
        assert_eq!(Settings::default().validate(), Ok(()));
        let bad = [
            Settings { ping_hz: 0, ..Settings::default() },
            Settings { ping_hz: 101, ..Settings::default() },
            Settings { streams: 0, ..Settings::default() },
            Settings { streams: 17, ..Settings::default() },
            Settings { phase: Duration::from_millis(100), ..Settings::default() },
            Settings { phase: Duration::from_secs(31), ..Settings::default() },
            Settings { line_mbps: Some(0.0), ..Settings::default() },
            Settings { line_mbps: Some(f64::NAN), ..Settings::default() },
            Settings { household: Duration::ZERO, ..Settings::default() },
            Settings { household_ping: Duration::from_millis(10), ..Settings::default() },
        ];
        for settings in bad {
            assert!(settings.validate().is_err(), "{settings:?}");
        }
        assert!(Settings::default().validate().is_ok());
    }

    #[test]
    fn streams_ask_the_pod_for_a_second_more() {
        assert_eq!(Settings::stream_seconds(Duration::from_millis(2_500)), 4);
        assert_eq!(Settings::stream_seconds(Duration::from_secs(2)), 3);
        assert_eq!(Settings::stream_seconds(Duration::from_secs(600)), MAX_STREAM_SECONDS);
    }
}
