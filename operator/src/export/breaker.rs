//! When to try the results store again, shared by every session: a circuit
//! breaker. While the store fails, one trial call at a time is let through,
//! after a backoff that doubles with each failure; everything else waits.
//! A store that is down is not hit once per pending session, and a store
//! that hangs holds one reconcile, not all of them. No I/O; the caller
//! passes the time.

use std::time::{Duration, Instant};

/// The first wait after a failure.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait between trials: a store that comes back is noticed
/// within this.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A trial not reported back within this is taken as lost (its reconcile
/// ended some other way) and another may go.
pub const TRIAL_LOST_AFTER: Duration = Duration::from_secs(30);
/// How soon a caller held back by a trial in flight looks again.
pub const TRIAL_WAIT: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, Default)]
pub struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    trial_since: Option<Instant>,
    /// Why the last call failed, for the sessions held back meanwhile.
    last_failure: Option<String>,
}

/// Whether a call may go now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admit {
    Go,
    Wait(Duration),
}

/// The wait after `failures` failures in a row.
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    FIRST_BACKOFF.saturating_mul(1 << doublings).min(MAX_BACKOFF)
}

impl Breaker {
    pub fn admit(&mut self, now: Instant) -> Admit {
        let Some(open_until) = self.open_until else { return Admit::Go };
        if now < open_until {
            return Admit::Wait(open_until - now);
        }
        match self.trial_since {
            Some(since) if now.duration_since(since) < TRIAL_LOST_AFTER => Admit::Wait(TRIAL_WAIT),
            _ => {
                self.trial_since = Some(now);
                Admit::Go
            }
        }
    }

    pub fn succeeded(&mut self) {
        *self = Self::default();
    }

    /// Returns how long until the next trial.
    pub fn failed(&mut self, now: Instant, why: String) -> Duration {
        self.last_failure = Some(why);
        self.failures = self.failures.saturating_add(1);
        let wait = backoff(self.failures);
        self.open_until = Some(now + wait);
        self.trial_since = None;
        wait
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Why the store last failed, while it is failing.
    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(4));
        assert_eq!(backoff(7), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX), MAX_BACKOFF);
    }

    #[test]
    fn a_healthy_store_lets_every_call_go() {
        let mut breaker = Breaker::default();
        let now = Instant::now();
        assert_eq!(breaker.admit(now), Admit::Go);
        assert_eq!(breaker.admit(now), Admit::Go);
    }

    #[test]
    fn after_a_failure_calls_wait_then_one_trial_goes() {
        let mut breaker = Breaker::default();
        let t0 = Instant::now();
        assert_eq!(breaker.failed(t0, "down".into()), FIRST_BACKOFF);
        assert_eq!(breaker.admit(t0 + Duration::from_millis(100)), Admit::Wait(Duration::from_millis(400)));
        let later = t0 + FIRST_BACKOFF;
        assert_eq!(breaker.admit(later), Admit::Go);
        // Only one trial at a time.
        assert_eq!(breaker.admit(later), Admit::Wait(TRIAL_WAIT));
        // It fails: the wait doubles.
        assert_eq!(breaker.failed(later, "down again".into()), Duration::from_secs(1));
        assert_eq!(breaker.failures(), 2);
        assert_eq!(breaker.last_failure(), Some("down again"));
        assert_eq!(breaker.admit(later), Admit::Wait(Duration::from_secs(1)));
    }

    #[test]
    fn a_trial_that_succeeds_closes_the_breaker() {
        let mut breaker = Breaker::default();
        let t0 = Instant::now();
        breaker.failed(t0, "down".into());
        assert_eq!(breaker.admit(t0 + FIRST_BACKOFF), Admit::Go);
        breaker.succeeded();
        assert_eq!((breaker.failures(), breaker.last_failure()), (0, None));
        assert_eq!(breaker.admit(t0 + FIRST_BACKOFF), Admit::Go);
        assert_eq!(breaker.admit(t0 + FIRST_BACKOFF), Admit::Go);
    }

    #[test]
    fn a_lost_trial_lets_another_go() {
        let mut breaker = Breaker::default();
        let t0 = Instant::now();
        breaker.failed(t0, "down".into());
        let trial = t0 + FIRST_BACKOFF;
        assert_eq!(breaker.admit(trial), Admit::Go);
        assert_eq!(breaker.admit(trial + TRIAL_LOST_AFTER - Duration::from_millis(1)), Admit::Wait(TRIAL_WAIT));
        assert_eq!(breaker.admit(trial + TRIAL_LOST_AFTER), Admit::Go);
    }
}
