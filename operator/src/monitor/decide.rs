//! What a Monitor does next, decided from what a pass observed and the time.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use tidepool_crds::test_session::Phase;

use super::schedule::Schedule;

/// How long to wait before looking again at a run that is on its way.
pub const RUN_RECHECK: Duration = Duration::from_secs(5);
/// A monitor with nothing due still looks again this often.
const IDLE_RECHECK: Duration = Duration::from_secs(300);

/// One of the monitor's runs: its session, as the cache shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSession {
    pub name: String,
    pub created: Timestamp,
    pub phase: Phase,
    /// Its final results are in (its probes ran, or a run was given up).
    pub has_results: bool,
    /// The pod serves it: its probes can run.
    pub ready: bool,
    /// Recorded in the monitor's status already.
    pub recorded: bool,
    /// How it came out, once recorded (for the history limits).
    pub succeeded: bool,
}

/// What one pass knows.
#[derive(Clone, Debug)]
pub struct Observed {
    pub now: Timestamp,
    pub schedule: Result<Schedule, String>,
    pub suspended: bool,
    /// When the latest run was due; the monitor's creation before any.
    pub last_due: Timestamp,
    /// The run the status says is in progress (the session cache may not
    /// show a run made a moment ago yet).
    pub active: Option<String>,
    /// How long a run may take before a missing one counts as gone.
    pub run_ttl: Duration,
    /// Its runs, newest first.
    pub runs: Vec<RunSession>,
    pub successful_history: usize,
    pub failed_history: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// The schedule does not parse: say so, make nothing.
    Invalid(String),
    /// A run that is over but not in the monitor's status yet: its session
    /// ended before its probes ran (a failed run), or the pass that drove
    /// it stopped before it recorded it.
    Record(String),
    /// Delete the sessions of finished runs past the history limits.
    Prune(Vec<String>),
    /// The run's pod serves it: run its probes and record the run.
    Drive(String),
    /// A run is due and none is in progress: make one, due at this time.
    Start(Timestamp),
    /// Nothing to do until then (a run on its way, or the next one due).
    Wait { recheck: Duration, next_due: Option<Timestamp> },
}

pub fn decide(observed: &Observed) -> Step {
    let schedule = match &observed.schedule {
        Ok(schedule) => schedule,
        Err(why) => return Step::Invalid(why.clone()),
    };
    if let Some(run) = observed.runs.iter().find(|r| (r.phase.has_ended() || r.has_results) && !r.recorded) {
        return Step::Record(run.name.clone());
    }
    let prune = past_history(observed);
    if !prune.is_empty() {
        return Step::Prune(prune);
    }
    let active = observed.runs.iter().find(|r| !r.phase.has_ended() && !r.has_results && !r.recorded);
    if let Some(run) = active {
        if run.ready {
            return Step::Drive(run.name.clone());
        }
        // Runs never overlap: the next waits for this one.
        return Step::Wait { recheck: RUN_RECHECK, next_due: schedule.next_after(observed.last_due) };
    }
    if let Some(name) = &observed.active {
        let listed = observed.runs.iter().any(|r| &r.name == name);
        if !listed {
            // Made a moment ago and not in the cache yet, or deleted by
            // someone: wait for it, until it has had its whole TTL.
            let age = observed.now.duration_since(observed.last_due).unsigned_abs();
            if age > observed.run_ttl + RUN_RECHECK * 12 {
                return Step::Record(name.clone());
            }
            return Step::Wait { recheck: RUN_RECHECK, next_due: schedule.next_after(observed.last_due) };
        }
    }
    if observed.suspended {
        return Step::Wait { recheck: IDLE_RECHECK, next_due: None };
    }
    match schedule.latest_due(observed.last_due, observed.now) {
        Some(due) => Step::Start(due),
        None => {
            let next = schedule.next_after(observed.last_due);
            let until = next.map_or(IDLE_RECHECK, |next| next.duration_since(observed.now).unsigned_abs());
            Step::Wait { recheck: until.min(IDLE_RECHECK), next_due: next }
        }
    }
}

/// Finished runs past the limits, oldest first out: the newest
/// `successful_history` that succeeded and `failed_history` that did not stay.
fn past_history(observed: &Observed) -> Vec<String> {
    let (mut succeeded, mut failed) = (0, 0);
    let mut prune = Vec::new();
    for run in observed.runs.iter().filter(|r| r.recorded && (r.phase.has_ended() || r.has_results)) {
        let (kept, limit) = if run.succeeded {
            (&mut succeeded, observed.successful_history)
        } else {
            (&mut failed, observed.failed_history)
        };
        *kept += 1;
        if *kept > limit {
            prune.push(run.name.clone());
        }
    }
    prune
}

/// The tier the next run starts in: a run that went up carries its tier;
/// one whose start tier's rules no longer trip (`holding` false) comes
/// down one; otherwise it stays.
pub fn next_tier(start: u8, end: u8, holding: bool) -> u8 {
    if end > start {
        end
    } else if start > 1 && !holding {
        start - 1
    } else {
        start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + second).unwrap()
    }

    fn observed(runs: Vec<RunSession>) -> Observed {
        Observed {
            now: at(100),
            schedule: Schedule::parse("@every 60s"),
            suspended: false,
            last_due: at(60),
            active: None,
            run_ttl: Duration::from_secs(300),
            runs,
            successful_history: 2,
            failed_history: 1,
        }
    }

    fn run(name: &str, phase: Phase) -> RunSession {
        RunSession {
            name: name.into(),
            created: at(0),
            phase,
            has_results: false,
            ready: false,
            recorded: false,
            succeeded: false,
        }
    }

    fn done(name: &str, succeeded: bool) -> RunSession {
        RunSession { has_results: true, recorded: true, succeeded, ..run(name, Phase::Completed) }
    }

    #[test]
    fn a_bad_schedule_makes_nothing() {
        let bad = Observed { schedule: Schedule::parse("every five minutes"), ..observed(vec![]) };
        assert!(matches!(decide(&bad), Step::Invalid(why) if why.contains("five cron fields")));
    }

    #[test]
    fn a_due_run_starts_when_none_is_active() {
        let due = Observed { now: at(130), ..observed(vec![done("old", true)]) };
        assert_eq!(decide(&due), Step::Start(at(120)));
        // Not due yet: wait until it is.
        assert_eq!(decide(&observed(vec![])), Step::Wait { recheck: Duration::from_secs(20), next_due: Some(at(120)) });
    }

    #[test]
    fn missed_runs_start_once_at_the_latest_time() {
        let late = Observed { now: at(1_000), ..observed(vec![]) };
        assert_eq!(decide(&late), Step::Start(at(960)));
    }

    #[test]
    fn runs_never_overlap() {
        let late = Observed { now: at(1_000), ..observed(vec![run("active", Phase::Pending)]) };
        assert_eq!(decide(&late), Step::Wait { recheck: RUN_RECHECK, next_due: Some(at(120)) });
        // A run the status names but the cache does not show yet is waited for.
        let unseen = Observed { now: at(130), active: Some("new".into()), ..observed(vec![]) };
        assert_eq!(decide(&unseen), Step::Wait { recheck: RUN_RECHECK, next_due: Some(at(120)) });
        // Past its whole TTL it is gone (deleted): recorded, so runs go on.
        let gone = Observed { now: at(60 + 300 + 61), active: Some("new".into()), ..observed(vec![]) };
        assert_eq!(decide(&gone), Step::Record("new".into()));
    }

    #[test]
    fn a_recorded_run_is_not_driven_twice() {
        // The session cache may lag the results written a moment ago; the
        // monitor's own status (read fresh) already has the run.
        let stale = RunSession { ready: true, recorded: true, succeeded: true, ..run("done", Phase::Ready) };
        assert!(matches!(decide(&observed(vec![stale])), Step::Wait { .. } | Step::Start(_)));
    }

    #[test]
    fn a_ready_run_is_driven() {
        let ready = RunSession { ready: true, ..run("active", Phase::Ready) };
        assert_eq!(decide(&observed(vec![ready])), Step::Drive("active".into()));
        // Once its results are in, it is no longer driven.
        let driven = RunSession {
            ready: true,
            has_results: true,
            recorded: true,
            succeeded: true,
            ..run("active", Phase::Ready)
        };
        assert!(matches!(decide(&observed(vec![driven])), Step::Wait { .. }));
    }

    #[test]
    fn a_finished_run_not_in_the_status_is_recorded() {
        let expired = run("lost", Phase::Expired);
        assert_eq!(decide(&observed(vec![expired])), Step::Record("lost".into()));
        let unrecorded = RunSession { has_results: true, ..run("driven", Phase::Ready) };
        assert_eq!(decide(&observed(vec![unrecorded])), Step::Record("driven".into()));
        let recorded = RunSession { recorded: true, ..run("lost", Phase::Expired) };
        assert!(matches!(decide(&observed(vec![recorded])), Step::Wait { .. }));
    }

    #[test]
    fn suspended_monitors_start_nothing() {
        let suspended = Observed { suspended: true, now: at(1_000), ..observed(vec![]) };
        assert!(matches!(decide(&suspended), Step::Wait { next_due: None, .. }));
        // The run in progress still runs.
        let ready = RunSession { ready: true, ..run("active", Phase::Ready) };
        assert_eq!(decide(&Observed { suspended: true, ..observed(vec![ready]) }), Step::Drive("active".into()));
    }

    #[test]
    fn history_keeps_the_newest_of_each_kind() {
        let runs = vec![done("s4", true), done("f3", false), done("s2", true), done("f1", false), done("s0", true)];
        assert_eq!(decide(&observed(runs)), Step::Prune(vec!["f1".into(), "s0".into()]));
        // A run still going on is never pruned.
        let runs = vec![run("active", Phase::Pending), done("s2", true), done("s1", true)];
        assert!(matches!(decide(&observed(runs)), Step::Wait { .. }));
    }

    #[test]
    fn the_tier_carries_up_and_comes_down_when_the_line_recovers() {
        assert_eq!(next_tier(1, 2, false), 2);
        assert_eq!(next_tier(1, 3, true), 3);
        assert_eq!(next_tier(2, 2, true), 2);
        assert_eq!(next_tier(2, 2, false), 1);
        assert_eq!(next_tier(3, 3, false), 2);
        assert_eq!(next_tier(1, 1, false), 1);
    }
}
