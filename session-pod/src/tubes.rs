//! The pod's tubes (docs/tubes.md): what it may hold, the table of its
//! tubes and their state, and the backoff after repeated connect failures.
//! The routes and each tube's task are in `tube_routes`.
//!
//! Bounded: tubes live at once ([`TubeLimits::tubes`]), tubes being
//! negotiated at once ([`TubeLimits::creations`]; a creation holds its
//! place until its channel opens or gives up), and after repeated ICE or
//! DTLS failures new tubes wait out a growing backoff instead of retrying
//! hot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tidepool_protocol::tube::{EndReason, PodTubeState};
use tidepool_tube::{Limits, Settings, Stats};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The largest offer body: the SDP's base64, with room to spare.
pub(crate) const OFFER_BODY_BYTES: usize = 96 * 1024;
/// Ended tubes the pod remembers, for the operator to read why.
const ENDED_KEPT: usize = 64;
/// How often a tube looks at its idle time.
pub(crate) const IDLE_CHECK: Duration = Duration::from_secs(1);

/// What the pod's tubes may hold.
#[derive(Clone, Debug)]
pub struct TubeLimits {
    /// Tubes open at once (connecting or connected).
    pub tubes: usize,
    /// Tubes between their answer and their open channel, at once.
    pub creations: usize,
    /// How long the client's peer has to connect after the answer.
    pub open_within: Duration,
    /// The first backoff after a tube failed to connect; it doubles with
    /// each failure in a row, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// What one tube may carry.
    pub per_tube: Limits,
    /// The peer connection's settings (where its UDP sockets bind).
    pub peer: Settings,
}

impl Default for TubeLimits {
    fn default() -> Self {
        Self {
            tubes: 16,
            creations: 4,
            open_within: Duration::from_secs(10),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            per_tube: Limits::default(),
            peer: Settings::default(),
        }
    }
}

/// Failures in a row, and until when new tubes are refused. Pure.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Backoff {
    failures: u32,
    until: Option<Instant>,
}

impl Backoff {
    /// A tube failed to connect at `now`.
    pub fn failed(&mut self, now: Instant, first: Duration, max: Duration) {
        self.failures = self.failures.saturating_add(1);
        let factor = 1u32.checked_shl(self.failures.saturating_sub(1).min(16)).unwrap_or(u32::MAX);
        self.until = Some(now + first.saturating_mul(factor).min(max));
    }

    /// A tube connected: the line is good again.
    pub fn connected(&mut self) {
        *self = Self::default();
    }

    /// How long new tubes must still wait, if at all.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        self.until.and_then(|until| until.checked_duration_since(now)).filter(|wait| !wait.is_zero())
    }
}

/// Whether a tube has been idle for `idle`: no connection open and no
/// byte carried since `last_activity`. Pure.
pub fn is_idle(open_connections: usize, last_activity: Instant, now: Instant, idle: Duration) -> bool {
    open_connections == 0 && now.saturating_duration_since(last_activity) >= idle
}

pub(crate) struct Entry {
    pub(crate) state: PodTubeState,
    pub(crate) answer: String,
    pub(crate) stats: Option<Arc<Stats>>,
    pub(crate) ended: Option<(EndReason, String)>,
    pub(crate) ended_at: Option<Instant>,
    pub(crate) stop: CancellationToken,
}

#[derive(Default)]
pub(crate) struct Table {
    pub(crate) tubes: HashMap<String, Entry>,
    pub(crate) backoff: Backoff,
}

impl Table {
    pub(crate) fn live(&self) -> usize {
        self.tubes.values().filter(|entry| entry.ended.is_none()).count()
    }

    /// Forgets the oldest ended tubes beyond [`ENDED_KEPT`].
    fn trim(&mut self) {
        let mut ended: Vec<(Instant, String)> =
            self.tubes.iter().filter_map(|(uid, e)| e.ended_at.map(|at| (at, uid.clone()))).collect();
        if ended.len() <= ENDED_KEPT {
            return;
        }
        ended.sort();
        for (_, uid) in ended.iter().take(ended.len() - ENDED_KEPT) {
            self.tubes.remove(uid);
        }
    }
}

/// The pod's tubes.
pub struct Tubes {
    pub(crate) limits: TubeLimits,
    pub(crate) creations: Arc<Semaphore>,
    table: Mutex<Table>,
}

impl Tubes {
    pub fn new(limits: TubeLimits) -> Self {
        Self { creations: Arc::new(Semaphore::new(limits.creations.max(1))), limits, table: Mutex::default() }
    }

    pub(crate) fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes every tube, each ended `PodShutdown` (the pod is shutting
    /// down) before its task hears of it and would say `Deleted`.
    pub fn close_all(&self) {
        let live: Vec<String> = self.table().tubes.keys().cloned().collect();
        for uid in live {
            self.end(&uid, EndReason::PodShutdown, "the pod is shutting down".into());
        }
    }

    /// Tubes by state, for /metrics.
    pub fn count(&self, state: PodTubeState) -> usize {
        self.table().tubes.values().filter(|e| e.state == state).count()
    }

    pub(crate) fn end(&self, uid: &str, reason: EndReason, message: String) {
        let mut table = self.table();
        if let Some(entry) = table.tubes.get_mut(uid)
            && entry.ended.is_none()
        {
            entry.state = PodTubeState::Ended;
            entry.ended = Some((reason, message));
            entry.ended_at = Some(Instant::now());
            entry.stop.cancel();
        }
        table.trim();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_each_failure_up_to_its_cap_and_a_connection_clears_it() {
        let (first, max) = (Duration::from_secs(1), Duration::from_secs(5));
        let now = Instant::now();
        let mut backoff = Backoff::default();
        assert_eq!(backoff.wait(now), None);
        backoff.failed(now, first, max);
        assert_eq!(backoff.wait(now), Some(Duration::from_secs(1)));
        assert_eq!(backoff.wait(now + Duration::from_secs(1)), None, "waited out");
        backoff.failed(now, first, max);
        assert_eq!(backoff.wait(now), Some(Duration::from_secs(2)));
        backoff.failed(now, first, max);
        backoff.failed(now, first, max);
        assert_eq!(backoff.wait(now), Some(max), "capped");
        for _ in 0..100 {
            backoff.failed(now, first, max);
        }
        assert_eq!(backoff.wait(now), Some(max), "no overflow after many");
        backoff.connected();
        assert_eq!(backoff, Backoff::default());
    }

    #[test]
    fn a_tube_is_idle_only_with_no_connection_and_nothing_carried_for_its_time() {
        let start = Instant::now();
        let idle = Duration::from_secs(10);
        assert!(!is_idle(0, start, start + Duration::from_secs(9), idle));
        assert!(is_idle(0, start, start + idle, idle));
        assert!(!is_idle(1, start, start + Duration::from_secs(3600), idle), "an open connection keeps it");
    }

    #[test]
    fn the_table_keeps_only_the_latest_ended_tubes() {
        let mut table = Table::default();
        let now = Instant::now();
        for i in 0..(ENDED_KEPT + 5) {
            let entry = Entry {
                state: PodTubeState::Ended,
                answer: String::new(),
                stats: None,
                ended: Some((EndReason::Idle, String::new())),
                ended_at: Some(now + Duration::from_millis(i as u64)),
                stop: CancellationToken::new(),
            };
            table.tubes.insert(format!("t{i}"), entry);
        }
        let live = Entry {
            state: PodTubeState::Connected,
            answer: String::new(),
            stats: None,
            ended: None,
            ended_at: None,
            stop: CancellationToken::new(),
        };
        table.tubes.insert("live".into(), live);
        table.trim();
        assert_eq!(table.tubes.len(), ENDED_KEPT + 1);
        assert!(table.tubes.contains_key("live") && !table.tubes.contains_key("t0") && table.tubes.contains_key("t68"));
        assert_eq!(table.live(), 1);
    }

    #[test]
    fn closing_all_ends_each_live_tube_for_the_shutdown_and_keeps_earlier_ends() {
        let tubes = Tubes::new(TubeLimits::default());
        let entry = |ended: Option<(EndReason, String)>| Entry {
            state: PodTubeState::Connected,
            answer: String::new(),
            stats: None,
            ended,
            ended_at: None,
            stop: CancellationToken::new(),
        };
        let live_stop = {
            let mut table = tubes.table();
            table.tubes.insert("live".into(), entry(None));
            table.tubes.insert("idle".into(), entry(Some((EndReason::Idle, "idle".into()))));
            table.tubes["live"].stop.clone()
        };
        tubes.close_all();
        let table = tubes.table();
        assert_eq!(table.tubes["live"].ended.as_ref().map(|e| e.0), Some(EndReason::PodShutdown));
        assert!(live_stop.is_cancelled(), "the tube's task is told");
        assert_eq!(table.tubes["idle"].ended.as_ref().map(|e| e.0), Some(EndReason::Idle));
    }
}
