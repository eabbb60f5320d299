//! The circuit breaker between the agent and the operator.
//!
//! When the operator is down or refusing, thousands of agents retrying every
//! second would only add load to whatever is recovering. After enough
//! consecutive failures the breaker opens and the agent sends nothing for a
//! while; then one report probes, and its fate closes or re-opens it.
//!
//! Time is passed in, so the state machine is tested without sleeping.

use std::time::{Duration, Instant};

/// Where the breaker stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Reports flow.
    Closed,
    /// Nothing is sent until `until`.
    Open { until: Instant },
    /// One report is allowed through to probe.
    HalfOpen,
}

#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    failures: u32,
    state: State,
}

impl Breaker {
    /// Opens after `threshold` consecutive failures (at least 1) and stays
    /// open for `open_for`.
    pub fn new(threshold: u32, open_for: Duration) -> Breaker {
        Breaker { threshold: threshold.max(1), open_for, failures: 0, state: State::Closed }
    }

    /// How long the breaker stays open.
    pub fn open_for(&self) -> Duration {
        self.open_for
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Whether the breaker is anything but closed.
    pub fn is_open(&self) -> bool {
        self.state != State::Closed
    }

    /// Whether a report may be sent at `now`. When the open time is over,
    /// this moves to half-open and lets one report through.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            State::Closed | State::HalfOpen => true,
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen;
                true
            }
            State::Open { .. } => false,
        }
    }

    /// A report was accepted: the breaker closes.
    pub fn success(&mut self) {
        self.failures = 0;
        self.state = State::Closed;
    }

    /// A report failed at `now`. Returns true if this opened the breaker.
    pub fn failure(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        let open = match self.state {
            State::HalfOpen => true,
            State::Closed => self.failures >= self.threshold,
            State::Open { .. } => false,
        };
        if open {
            self.state = State::Open { until: now + self.open_for };
        }
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(3, Duration::from_secs(30));
        assert!(breaker.allow(t0));
        assert!(!breaker.failure(t0));
        assert!(!breaker.failure(t0));
        breaker.success();
        assert!(!breaker.failure(t0));
        assert!(!breaker.failure(t0));
        assert!(breaker.failure(t0), "the third failure in a row opens it");
        assert_eq!(breaker.state(), State::Open { until: t0 + Duration::from_secs(30) });
        assert!(breaker.is_open());
    }

    #[test]
    fn open_waits_then_half_open_probes() {
        let t0 = Instant::now();
        let later = |s| t0 + Duration::from_secs(s);
        let mut breaker = Breaker::new(1, Duration::from_secs(30));
        assert!(breaker.failure(t0));
        assert!(!breaker.allow(later(1)));
        assert!(!breaker.allow(later(29)));
        assert!(breaker.allow(later(30)));
        assert_eq!(breaker.state(), State::HalfOpen);
        // A failed probe re-opens it for another full period.
        assert!(breaker.failure(later(30)));
        assert_eq!(breaker.state(), State::Open { until: later(60) });
        assert!(!breaker.allow(later(59)));
        assert!(breaker.allow(later(61)));
        // A good probe closes it.
        breaker.success();
        assert_eq!(breaker.state(), State::Closed);
        assert!(!breaker.is_open());
        assert!(breaker.allow(later(61)));
    }

    #[test]
    fn a_zero_threshold_means_one() {
        let mut breaker = Breaker::new(0, Duration::from_secs(1));
        assert!(breaker.failure(Instant::now()));
    }
}
