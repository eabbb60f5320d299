//! What a Tube needs next, decided from what a pass observed. Pure.

use std::time::Duration;

use tidepool_crds::tube::TubeState;
use tidepool_protocol::tube::EndReason;

/// How long a tube whose named session or pool the caches do not show yet
/// waits before it fails (one made a moment before the tube, or a cache
/// that lags the API server).
pub const UNSEEN_GRACE: Duration = Duration::from_secs(10);
/// How soon a tube waiting for its pod is looked at again (the session's
/// change wakes it sooner).
pub const WAIT_RECHECK: Duration = Duration::from_secs(2);
/// A tube no pod has answered this long after it was made is ended: its
/// client gave up long ago (the API answers 504 after 10 s), and a pod
/// claimed for it later would only wait for a peer that never comes.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(60);

/// The session a tube rides, as the cache shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionSeen {
    /// Not in the cache.
    Missing,
    /// Not bound yet; why, in words.
    Waiting(String),
    /// Bound and served by `pod`; `alive` while the pod cache shows it
    /// running and not being deleted.
    Ready { pod: String, alive: bool },
    /// Completed, Expired or Failed.
    Ended(String),
}

/// What one pass knows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub deleting: bool,
    pub has_finalizer: bool,
    pub state: TubeState,
    /// The pod answered (the status holds its answer).
    pub answered: bool,
    /// The pod the status names.
    pub status_pod: Option<String>,
    /// The tube names a pool: the operator makes and owns its session.
    pub owns_session: bool,
    pub session: SessionSeen,
    /// Why the pool will not take this tube, if it will not.
    pub refused_by_pool: Option<String>,
    /// The tube's pool is not in the cache (yet, or at all).
    pub pool_unseen: Option<String>,
    /// Since the tube was made.
    pub age: Duration,
    /// Since it ended, once it has.
    pub ended_for: Option<Duration>,
    /// How long an ended tube is kept, with its reason, before it is deleted.
    pub retention: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The tube is being deleted: close it on its pod if it may be open
    /// there, then let it go.
    Release {
        close_on_pod: Option<String>,
    },
    AddFinalizer,
    /// Make the TestSession that claims a pool's pod for the tube.
    CreateSession,
    /// Wait for the session's pod.
    Wait {
        reason: &'static str,
        message: String,
    },
    /// Hand the offer to `pod`, and write its answer.
    Offer {
        pod: String,
    },
    /// Read the tube's state from `pod`.
    Poll {
        pod: String,
    },
    /// The tube is over.
    End {
        reason: EndReason,
        message: String,
        close_on_pod: Option<String>,
    },
    /// Ended: free the pod (delete the session the operator made), once.
    ReleaseSession,
    /// Ended longer ago than the retention: delete the Tube.
    Delete,
    /// Ended: kept, with its reason, for `remaining` of the retention.
    Keep {
        remaining: Duration,
    },
}

fn is_terminal(state: TubeState) -> bool {
    matches!(state, TubeState::Closed | TubeState::Failed)
}

pub fn decide(observed: &Observed) -> Step {
    let terminal = is_terminal(observed.state);
    // Only a pod that answered may hold the tube open.
    let open_on = || observed.answered.then(|| observed.status_pod.clone()).flatten().filter(|_| !terminal);
    if observed.deleting {
        // An offer whose answer was never written (the write lost to the
        // deletion) may still be open on the session's pod: closing it
        // there spares the pod counting a client that never came as a
        // failure. Closing a tube the pod never heard of is harmless.
        let offered_to = || match &observed.session {
            SessionSeen::Ready { pod, alive: true } if !terminal => Some(pod.clone()),
            _ => None,
        };
        return Step::Release { close_on_pod: open_on().or_else(offered_to) };
    }
    if terminal {
        let session_left = observed.owns_session && !matches!(observed.session, SessionSeen::Missing);
        // An end not yet known counts as now: kept a whole retention.
        let ended_for = observed.ended_for.unwrap_or(Duration::ZERO);
        return match (session_left, ended_for >= observed.retention) {
            (true, _) => Step::ReleaseSession,
            (false, true) => Step::Delete,
            (false, false) => Step::Keep { remaining: observed.retention - ended_for },
        };
    }
    if !observed.has_finalizer {
        return Step::AddFinalizer;
    }
    if let Some(why) = &observed.refused_by_pool
        && !observed.answered
    {
        return Step::End { reason: EndReason::Refused, message: why.clone(), close_on_pod: None };
    }
    if let Some(pool) = &observed.pool_unseen
        && !observed.answered
    {
        if observed.age < UNSEEN_GRACE {
            return Step::Wait { reason: "WaitingForPool", message: format!("WarmPool {pool} is not seen yet") };
        }
        return Step::End { reason: EndReason::Refused, message: format!("no WarmPool {pool}"), close_on_pod: None };
    }
    if !observed.answered && observed.age >= ANSWER_DEADLINE {
        let message = format!("no pod answered within {} s", ANSWER_DEADLINE.as_secs());
        return Step::End { reason: EndReason::NotConnected, message, close_on_pod: None };
    }
    match &observed.session {
        SessionSeen::Missing if observed.owns_session && observed.answered => Step::End {
            reason: EndReason::SessionEnded,
            message: "the tube's session was deleted".into(),
            close_on_pod: open_on(),
        },
        SessionSeen::Missing if observed.owns_session => Step::CreateSession,
        SessionSeen::Missing if observed.age < UNSEEN_GRACE => {
            Step::Wait { reason: "WaitingForSession", message: "the TestSession is not seen yet".into() }
        }
        SessionSeen::Missing => Step::End {
            reason: EndReason::SessionEnded,
            message: "the TestSession the tube names does not exist".into(),
            close_on_pod: open_on(),
        },
        SessionSeen::Waiting(why) if !observed.answered => Step::Wait { reason: "WaitingForPod", message: why.clone() },
        SessionSeen::Waiting(_) => Step::End {
            reason: EndReason::PodGone,
            message: "the tube's pod went away (its session is being rebound)".into(),
            close_on_pod: None,
        },
        SessionSeen::Ended(phase) => Step::End {
            reason: EndReason::SessionEnded,
            message: format!("the tube's session ended ({phase})"),
            close_on_pod: open_on(),
        },
        SessionSeen::Ready { pod, alive } => match (&observed.status_pod, observed.answered) {
            (_, false) if *alive => Step::Offer { pod: pod.clone() },
            (_, false) => Step::Wait { reason: "WaitingForPod", message: format!("pod {pod} is not running") },
            (Some(answered_by), true) if answered_by != pod || !alive => Step::End {
                reason: EndReason::PodGone,
                message: format!("pod {answered_by}, which terminated the tube, went away"),
                close_on_pod: None,
            },
            (None, true) => {
                Step::End { reason: EndReason::PodGone, message: "the status names no pod".into(), close_on_pod: None }
            }
            (Some(_), true) => Step::Poll { pod: pod.clone() },
        },
    }
}

/// Whether a pass about to wait should read the tube's session from the
/// API first. The session's change wakes the tube through the controller's
/// own watch, which can run ahead of the shared cache this pass observed;
/// a pass that trusted the cache then waited [`WAIT_RECHECK`] for a pod
/// the session already had. Only a wait on a session not seen bound is
/// worth the read (a wait for the pool or for a pod to run is not).
pub fn session_may_be_stale(observed: &Observed, step: &Step) -> bool {
    let on_session = matches!(step, Step::Wait { reason: "WaitingForPod" | "WaitingForSession", .. });
    on_session && matches!(observed.session, SessionSeen::Missing | SessionSeen::Waiting(_))
}

/// The state a tube ends in for `reason`.
pub fn ended_state(reason: EndReason) -> TubeState {
    if reason.is_normal() { TubeState::Closed } else { TubeState::Failed }
}

/// How soon to poll a tube again: often while its client connects (the
/// status should show Connected soon after it is), rarely once it carries.
pub fn poll_every(state: TubeState) -> Duration {
    match state {
        TubeState::Connected => Duration::from_secs(5),
        _ => Duration::from_millis(500),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed() -> Observed {
        Observed {
            deleting: false,
            has_finalizer: true,
            state: TubeState::Pending,
            answered: false,
            status_pod: None,
            owns_session: true,
            session: SessionSeen::Missing,
            refused_by_pool: None,
            pool_unseen: None,
            age: Duration::from_secs(1),
            ended_for: None,
            retention: Duration::from_secs(3600),
        }
    }

    fn ready(pod: &str) -> SessionSeen {
        SessionSeen::Ready { pod: pod.into(), alive: true }
    }

    fn answered(pod: &str, state: TubeState) -> Observed {
        Observed { answered: true, status_pod: Some(pod.into()), state, session: ready(pod), ..observed() }
    }

    #[test]
    fn a_deleted_tube_is_closed_on_the_pod_it_may_be_open_on() {
        let deleting = Observed { deleting: true, ..answered("p1", TubeState::Connected) };
        assert_eq!(decide(&deleting), Step::Release { close_on_pod: Some("p1".into()) });
        let pending = Observed { deleting: true, ..observed() };
        assert_eq!(decide(&pending), Step::Release { close_on_pod: None });
        let offered = Observed { deleting: true, session: ready("p2"), ..observed() };
        assert_eq!(decide(&offered), Step::Release { close_on_pod: Some("p2".into()) }, "its answer may be unwritten");
        let ended = Observed { deleting: true, ..answered("p1", TubeState::Closed) };
        assert_eq!(decide(&ended), Step::Release { close_on_pod: None });
    }

    #[test]
    fn an_ended_tube_frees_the_session_it_made_and_then_rests() {
        let ended = Observed { owns_session: true, ..answered("p1", TubeState::Failed) };
        assert_eq!(decide(&ended), Step::ReleaseSession);
        let gone = Observed { session: SessionSeen::Missing, ..ended.clone() };
        let whole = Step::Keep { remaining: Duration::from_secs(3600) };
        assert_eq!(decide(&gone), whole, "an end not yet known is kept a whole retention");
        let users = Observed { owns_session: false, ..ended.clone() };
        assert_eq!(decide(&users), whole, "a session the user named is not the tube's to delete");
        let kept = Observed { session: SessionSeen::Missing, ended_for: Some(Duration::from_secs(3599)), ..ended };
        let rest = Step::Keep { remaining: Duration::from_secs(1) };
        assert_eq!(decide(&kept), rest, "kept with its reason for the rest of the retention, then looked at again");
        let old = Observed { ended_for: Some(Duration::from_secs(3600)), ..kept };
        assert_eq!(decide(&old), Step::Delete);
    }

    #[test]
    fn a_tube_no_pod_answered_in_time_ends() {
        let late = Observed { session: SessionSeen::Waiting("pool empty".into()), age: ANSWER_DEADLINE, ..observed() };
        assert!(matches!(decide(&late), Step::End { reason: EndReason::NotConnected, close_on_pod: None, .. }));
        let answered_long_ago = Observed { age: ANSWER_DEADLINE * 10, ..answered("p1", TubeState::Connected) };
        assert_eq!(decide(&answered_long_ago), Step::Poll { pod: "p1".into() }, "an answered tube has no deadline");
    }

    #[test]
    fn a_new_tube_takes_its_finalizer_first() {
        assert_eq!(decide(&Observed { has_finalizer: false, ..observed() }), Step::AddFinalizer);
    }

    #[test]
    fn a_pool_that_refuses_tubes_fails_the_tube_before_any_pod_is_claimed() {
        let refused = Observed { refused_by_pool: Some("no allowlist".into()), ..observed() };
        assert_eq!(
            decide(&refused),
            Step::End { reason: EndReason::Refused, message: "no allowlist".into(), close_on_pod: None }
        );
        // Once answered, a pool's later change does not cut the tube.
        let later = Observed { refused_by_pool: Some("changed".into()), ..answered("p1", TubeState::Connected) };
        assert_eq!(decide(&later), Step::Poll { pod: "p1".into() });
    }

    #[test]
    fn a_pool_the_cache_has_not_seen_gets_a_grace_period_then_the_tube_fails() {
        let unseen = Observed { pool_unseen: Some("edge".into()), ..observed() };
        assert!(matches!(decide(&unseen), Step::Wait { reason: "WaitingForPool", .. }));
        let late = Observed { age: UNSEEN_GRACE, ..unseen };
        assert_eq!(
            decide(&late),
            Step::End { reason: EndReason::Refused, message: "no WarmPool edge".into(), close_on_pod: None }
        );
        // A tube already answered does not hang on the pool's cache entry.
        let answered = Observed { pool_unseen: Some("edge".into()), ..answered("p1", TubeState::Connected) };
        assert_eq!(decide(&answered), Step::Poll { pod: "p1".into() });
    }

    #[test]
    fn a_pool_tube_makes_its_session_and_waits_for_the_pod() {
        assert_eq!(decide(&observed()), Step::CreateSession);
        let waiting = Observed { session: SessionSeen::Waiting("pool empty".into()), ..observed() };
        assert_eq!(decide(&waiting), Step::Wait { reason: "WaitingForPod", message: "pool empty".into() });
        let not_running = Observed { session: SessionSeen::Ready { pod: "p1".into(), alive: false }, ..observed() };
        assert!(matches!(decide(&not_running), Step::Wait { .. }));
        let bound = Observed { session: ready("p1"), ..observed() };
        assert_eq!(decide(&bound), Step::Offer { pod: "p1".into() });
    }

    #[test]
    fn a_named_session_gets_a_grace_period_then_the_tube_fails() {
        let named = Observed { owns_session: false, ..observed() };
        assert!(matches!(decide(&named), Step::Wait { reason: "WaitingForSession", .. }));
        let late = Observed { age: UNSEEN_GRACE, ..named };
        assert!(matches!(decide(&late), Step::End { reason: EndReason::SessionEnded, close_on_pod: None, .. }));
    }

    #[test]
    fn an_answered_tube_is_polled_until_its_pod_or_session_goes() {
        assert_eq!(decide(&answered("p1", TubeState::Answered)), Step::Poll { pod: "p1".into() });
        let moved = Observed { session: ready("p2"), ..answered("p1", TubeState::Connected) };
        assert!(matches!(decide(&moved), Step::End { reason: EndReason::PodGone, close_on_pod: None, .. }));
        let dead = Observed {
            session: SessionSeen::Ready { pod: "p1".into(), alive: false },
            ..answered("p1", TubeState::Connected)
        };
        assert!(matches!(decide(&dead), Step::End { reason: EndReason::PodGone, .. }));
        let rebinding = Observed { session: SessionSeen::Waiting("x".into()), ..answered("p1", TubeState::Connected) };
        assert!(matches!(decide(&rebinding), Step::End { reason: EndReason::PodGone, .. }));
        let nameless = Observed { status_pod: None, ..answered("p1", TubeState::Connected) };
        assert!(matches!(decide(&nameless), Step::End { reason: EndReason::PodGone, .. }));
    }

    #[test]
    fn a_session_that_ends_ends_the_tube_and_closes_it_on_the_pod() {
        let ended = Observed { session: SessionSeen::Ended("Expired".into()), ..answered("p1", TubeState::Connected) };
        assert_eq!(
            decide(&ended),
            Step::End {
                reason: EndReason::SessionEnded,
                message: "the tube's session ended (Expired)".into(),
                close_on_pod: Some("p1".into())
            }
        );
        let deleted = Observed { session: SessionSeen::Missing, ..answered("p1", TubeState::Connected) };
        assert!(matches!(decide(&deleted), Step::End { reason: EndReason::SessionEnded, close_on_pod: Some(_), .. }));
        let named_gone = Observed { owns_session: false, age: UNSEEN_GRACE, ..deleted };
        assert!(matches!(decide(&named_gone), Step::End { reason: EndReason::SessionEnded, .. }));
    }

    #[test]
    fn ends_are_closed_or_failed_by_their_reason_and_polls_slow_once_connected() {
        assert_eq!(ended_state(EndReason::Idle), TubeState::Closed);
        assert_eq!(ended_state(EndReason::PodGone), TubeState::Failed);
        assert!(poll_every(TubeState::Connected) > poll_every(TubeState::Answered));
    }
    #[test]
    fn only_a_wait_on_a_session_not_seen_bound_reads_the_session_afresh() {
        let waiting = Observed { session: SessionSeen::Waiting("TestSession t is Pending".into()), ..observed() };
        assert!(matches!(decide(&waiting), Step::Wait { reason: "WaitingForPod", .. }));
        assert!(session_may_be_stale(&waiting, &decide(&waiting)));
        let unseen = Observed { owns_session: false, session: SessionSeen::Missing, ..observed() };
        assert!(matches!(decide(&unseen), Step::Wait { reason: "WaitingForSession", .. }));
        assert!(session_may_be_stale(&unseen, &decide(&unseen)));
        // Bound, but its pod is not running: the pod cache decides, not the session.
        let pod_down = Observed { session: SessionSeen::Ready { pod: "p1".into(), alive: false }, ..observed() };
        assert!(matches!(decide(&pod_down), Step::Wait { .. }));
        assert!(!session_may_be_stale(&pod_down, &decide(&pod_down)));
        // A wait for the pool: a fresher session would not change it.
        let pool_unseen = Observed { pool_unseen: Some("edge".into()), ..waiting.clone() };
        assert!(matches!(decide(&pool_unseen), Step::Wait { reason: "WaitingForPool", .. }));
        assert!(!session_may_be_stale(&pool_unseen, &decide(&pool_unseen)));
        // Any step but a wait goes on from the cache.
        let to_create = observed();
        assert_eq!(decide(&to_create), Step::CreateSession);
        assert!(!session_may_be_stale(&to_create, &decide(&to_create)));
    }
}
