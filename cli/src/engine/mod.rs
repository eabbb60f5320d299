//! The measurement engine: runs a profile against a session pod and returns
//! its results, graded.
//!
//! Every phase is bounded in time; the arithmetic lives in
//! [`crate::measure`] and the schedule in [`mod@plan`].

mod household;
mod latency;
mod load;
pub mod plan;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tidepool_crds::test_session::{LatencySummary, LoadedLatency, Profile, SessionResults};
use tidepool_protocol::grading;
use tidepool_protocol::pod::LATENCY_WS_PATH;
use tokio::time::Instant;

pub use plan::{Phase, PhaseKind, Settings, plan};

use crate::error::{Error, Result};
use crate::measure::{self, Ping, Series};
use crate::pod::PodClient;
use latency::{Pinger, UdpEcho, UdpOutcome};
use load::{Downloads, Uploads};

/// How often a loaded phase samples its download counter.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Which way traffic flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Down,
    Up,
}

/// Follows a run as it goes (a progress bar, a log). Every method has a
/// default that ignores the event.
pub trait Observer: Send + Sync {
    /// A phase begins.
    fn phase(&self, _phase: &Phase) {}
    /// A latency ping came back.
    fn rtt(&self, _ms: f64) {}
    /// The recent rate of a loaded phase, in Mbit/s (uploads as the client
    /// sent them; the results use what the pod received).
    fn rate(&self, _direction: Direction, _mbps: f64) {}
    /// Something the user should know that does not stop the run.
    fn warn(&self, _message: &str) {}
}

/// An observer that ignores everything.
pub struct Quiet;

impl Observer for Quiet {}

/// The run's monotonic clock, in microseconds since it began.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock(Instant);

impl Clock {
    pub(crate) fn start() -> Self {
        Self(Instant::now())
    }

    pub(crate) fn now_us(&self) -> u64 {
        self.us(Instant::now())
    }

    pub(crate) fn us(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.0).as_micros()).unwrap_or(u64::MAX)
    }
}

/// Runs `profile` against `pod` and grades the results.
pub async fn run(
    pod: &PodClient,
    profile: Profile,
    settings: &Settings,
    observer: Arc<dyn Observer>,
) -> Result<SessionResults> {
    settings.validate().map_err(Error::Usage)?;
    let phases = plan(profile, settings);
    let run = Run { pod, settings, observer, clock: Clock::start() };
    let mut results = match profile {
        Profile::Latency | Profile::Bufferbloat | Profile::Speed => run.latency_and_load(&phases).await?,
        Profile::Household => run.household(&phases).await?,
        Profile::Probes => run.probes(&phases[0]).await?,
    };
    grading::grade(&mut results);
    Ok(results)
}

struct Run<'a> {
    pod: &'a PodClient,
    settings: &'a Settings,
    observer: Arc<dyn Observer>,
    clock: Clock,
}

/// A loaded phase once over: its download rate is known, its uploads'
/// reports may still be on their way.
struct Loaded {
    kind: PhaseKind,
    /// The measurement window: after the warm-up, to the end.
    window: (u64, u64),
    download_mbps: Option<f64>,
    uploads: Option<Uploads>,
}

impl Loaded {
    async fn upload_mbps(&mut self) -> Result<Option<f64>> {
        let Some(uploads) = self.uploads.take() else { return Ok(None) };
        let series = uploads.finish().await?;
        if series.is_empty() {
            return Err(Error::test("no upload reached the pod"));
        }
        Ok(Some(measure::rate_mbps(&series, self.window.0, self.window.1)))
    }
}

impl Run<'_> {
    /// The latency, speed and bufferbloat profiles: an idle phase with pings
    /// and UDP echoes, and loaded phases, with pings when there was an idle
    /// phase to compare them with.
    async fn latency_and_load(&self, phases: &[Phase]) -> Result<SessionResults> {
        let mut pinger = None;
        let mut udp = None;
        // The idle phase counts from the first ping.
        let mut idle_start = Instant::now();
        if phases.iter().any(|p| p.kind == PhaseKind::Idle) {
            let socket = self.pod.websocket(LATENCY_WS_PATH).await?;
            udp = match UdpEcho::start(self.pod, self.clock, self.settings.ping_hz).await {
                Ok(udp) => Some(udp),
                Err(e) => {
                    self.observer.warn(&format!("no UDP echo ({e}); loss and jitter come from the WebSocket pings"));
                    None
                }
            };
            idle_start = Instant::now();
            pinger = Some(Pinger::start(socket, self.clock, self.settings.ping_hz, self.observer.clone()));
        }
        let mut idle_window = None;
        let mut loaded = Vec::new();
        for phase in phases {
            let start = if phase.kind == PhaseKind::Idle { idle_start } else { Instant::now() };
            if phase.kind == PhaseKind::Idle {
                self.observer.phase(phase);
                tokio::time::sleep_until(start + phase.length).await;
                idle_window = Some((self.clock.us(start), self.clock.now_us()));
                if let Some(udp) = &mut udp {
                    udp.stop();
                }
            } else {
                loaded.push(self.load(phase, start).await?);
            }
        }
        let (pings, udp_outcome) = tokio::join!(
            async {
                match pinger {
                    Some(pinger) => pinger.finish().await,
                    None => Ok(Vec::new()),
                }
            },
            async {
                match udp {
                    Some(udp) => Some(udp.finish().await),
                    None => None,
                }
            },
        );
        let pings = pings?;
        let now_us = self.clock.now_us();
        let mut results = SessionResults::default();
        if let Some((from, to)) = idle_window {
            results.latency = Some(self.idle_latency(&pings, from, to, udp_outcome.as_ref())?);
        }
        let mut loaded_latency = LoadedLatency::default();
        for phase in &mut loaded {
            let upload_mbps = phase.upload_mbps().await?;
            let median = || measure::loaded_median_ms(&pings, phase.window.0, phase.window.1, now_us);
            match phase.kind {
                PhaseKind::Download => {
                    results.download_mbps = phase.download_mbps;
                    loaded_latency.download_ms = median();
                }
                PhaseKind::Upload => {
                    results.upload_mbps = upload_mbps;
                    loaded_latency.upload_ms = median();
                }
                PhaseKind::Both => loaded_latency.bidirectional_ms = median(),
                _ => {}
            }
        }
        if loaded_latency != LoadedLatency::default() {
            results.loaded_latency = Some(loaded_latency);
        }
        Ok(results)
    }

    /// Idle latency from the WebSocket pings; loss and jitter from the UDP
    /// echoes when any came back.
    fn idle_latency(&self, pings: &[Ping], from: u64, to: u64, udp: Option<&UdpOutcome>) -> Result<LatencySummary> {
        let mut summary = measure::ping_summary(pings, from, to);
        if summary.samples == 0 {
            return Err(Error::test("no ping came back from the pod"));
        }
        match udp.map(UdpOutcome::loss_and_jitter) {
            Some(Some((loss, jitter))) => {
                summary.loss_percent = loss;
                summary.jitter_ms = jitter;
            }
            Some(None) => self.observer.warn("no UDP echo came back; loss and jitter come from the WebSocket pings"),
            None => {}
        }
        Ok(summary)
    }

    /// Runs a loaded phase from `start`: downloads counted as they come,
    /// uploads left to report.
    async fn load(&self, phase: &Phase, start: Instant) -> Result<Loaded> {
        let (down, up) = match phase.kind {
            PhaseKind::Download | PhaseKind::Line => (true, false),
            PhaseKind::Upload => (false, true),
            _ => (true, true),
        };
        self.observer.phase(phase);
        let end = start + phase.length;
        let window = (self.clock.us(start + phase.warmup()), self.clock.us(end));
        let streams = self.settings.streams;
        let downloads = down.then(|| Downloads::start(self.pod, streams, end));
        let uploads = up.then(|| Uploads::start(self.pod, self.clock, streams, end));
        let received = self.sample(end, downloads.as_ref(), uploads.as_ref()).await;
        let download_mbps = match downloads {
            Some(downloads) => {
                downloads.finish().await?;
                Some(measure::rate_mbps([&received], window.0, window.1))
            }
            None => None,
        };
        Ok(Loaded { kind: phase.kind, window, download_mbps, uploads })
    }

    /// Samples the download counter until `end`, and shows the live rates.
    async fn sample(&self, end: Instant, downloads: Option<&Downloads>, uploads: Option<&Uploads>) -> Series {
        let mut received: Series = Vec::new();
        let mut last_sent = (self.clock.now_us(), 0);
        loop {
            let now = Instant::now();
            let now_us = self.clock.us(now);
            if let Some(downloads) = downloads {
                received.push((now_us, downloads.received.load(Ordering::Relaxed)));
                if let [.., (t0, b0), (t1, b1)] = received[..] {
                    self.observer.rate(Direction::Down, (b1 - b0) as f64 * 8.0 / (t1 - t0).max(1) as f64);
                }
            }
            if let Some(uploads) = uploads {
                let sent = uploads.sent.load(Ordering::Relaxed);
                let (t0, b0) = std::mem::replace(&mut last_sent, (now_us, sent));
                self.observer.rate(Direction::Up, (sent - b0) as f64 * 8.0 / (now_us - t0).max(1) as f64);
            }
            if now >= end {
                return received;
            }
            tokio::time::sleep_until((now + SAMPLE_EVERY).min(end)).await;
        }
    }

    /// The household profile: the line pre-test (unless given), then the users.
    async fn household(&self, phases: &[Phase]) -> Result<SessionResults> {
        let [rest @ .., baseline, traffic] = phases else {
            return Err(Error::test("the household plan is incomplete"));
        };
        let line_mbps = match (self.settings.line_mbps, rest.first()) {
            (Some(line), _) => line,
            (None, Some(line)) => self.load(line, Instant::now()).await?.download_mbps.unwrap_or(0.0),
            (None, None) => return Err(Error::test("the household plan has no line pre-test")),
        };
        if line_mbps <= 0.0 {
            return Err(Error::test("the line pre-test received nothing from the pod"));
        }
        let ping_every = self.settings.household_ping;
        let users =
            household::run(self.pod, self.clock, line_mbps, [*baseline, *traffic], ping_every, &self.observer).await?;
        Ok(SessionResults { household: users, ..SessionResults::default() })
    }

    /// The probes profile: the pod probes the session's targets.
    async fn probes(&self, phase: &Phase) -> Result<SessionResults> {
        if self.settings.probes.is_empty() {
            return Err(Error::usage("the probes profile needs the session's targets (--probe)"));
        }
        self.observer.phase(phase);
        let response = self.pod.probes(&self.settings.probes).await?;
        Ok(SessionResults { probes: response.results, ..SessionResults::default() })
    }
}
