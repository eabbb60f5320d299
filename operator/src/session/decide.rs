//! The binding state machine: from what was observed of one session and the
//! time, the one next step. No I/O; every branch has a test below.

use std::time::Duration;

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use tidepool_crds::test_session::Phase;

use crate::conditions::reason;
use crate::memory::Binding;

/// How often a bound session is looked at again, at the latest (its expiry
/// may come first): the event of a second claim can start its pass before
/// the pod cache shows that claim, and nothing else would start another.
pub const SETTLED_RECHECK: Duration = Duration::from_secs(15);

/// What a pass observed of one session: its own status, its pool, the pods
/// claimed for it, and what this process remembers of it.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed {
    pub now: Timestamp,
    /// The session is being deleted.
    pub deleting: bool,
    pub phase: Phase,
    /// The pod `status.pod` names.
    pub status_pod: Option<String>,
    /// The pod reported its final results.
    pub results_final: bool,
    /// When an ended session ended (its Ready condition's last transition).
    pub ended_at: Option<Timestamp>,
    /// How long an ended session keeps its results.
    pub retention: Duration,
    /// Where storing an ended session's results stands.
    pub export: Export,
    /// False when the session's WarmPool does not exist.
    pub pool_exists: bool,
    /// When the session's TTL runs out.
    pub expires: Timestamp,
    /// When the session is to be released because its client went away:
    /// the gateway's last sighting of it plus the pool's grace. None when
    /// the pool sets no grace or the gateway does not serve the session.
    pub client_gone_at: Option<Timestamp>,
    /// The pod claimed for the session, if one is.
    pub bound: Option<BoundPod>,
    /// Other live pods claimed for it (a claim whose answer was lost).
    pub extra_claims: Vec<String>,
    /// The binding this process wrote and the caches may not show yet.
    pub written: Option<Binding>,
    /// How often the session moved to a new pod so far, and how often its
    /// pool lets it.
    pub rebinds: i32,
    pub max_rebinds: i32,
}

impl Observed {
    /// What this pass wrote when it ended the session (and, when it could,
    /// stored its results in the same write).
    pub fn ended(&mut self, status: &tidepool_crds::test_session::TestSessionStatus) {
        self.phase = status.phase;
        self.ended_at = super::status::ended_at(status);
        self.bound = None;
        if self.export == Export::Due && status.exported_at.is_some() {
            self.export = Export::Done;
        }
    }
}

/// Where storing an ended session's results stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Export {
    /// No results store is configured.
    Off,
    /// `status.exportedAt` is set.
    Done,
    /// Not stored yet; the store may be tried now.
    Due,
}

/// The pod claimed for a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundPod {
    pub name: String,
    /// Not finished and not being deleted: it can serve.
    pub alive: bool,
    /// The pod cache shows the claim (not only this process's memory).
    pub in_cache: bool,
}

/// One step of a session's life.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Nothing to do until `Requeue` says.
    Idle(Requeue),
    /// An ended session's retention is over: delete the TestSession.
    Delete,
    /// An ended session's results are not stored yet: store them.
    Export,
    /// Its final results are in: release its pod and end it Completed.
    Complete { release: Option<String> },
    /// Its TTL ran out: release its pod and end it Expired.
    Expire { release: Option<String> },
    /// Its client went away: release its pod and end it Expired, early.
    ClientGone { release: Option<String> },
    /// It cannot be bound now; say why in its status.
    Wait { reason: &'static str, message: String },
    /// No live pod holds it: claim a warm one, deleting the dead one first.
    Claim { replacing: Option<String> },
    /// Its pod went away once more than its pool allows: release what is
    /// left of it and end the session Failed.
    Fail { release: Option<String> },
    /// It holds more than one pod: release the others.
    ReleaseExtras(Vec<String>),
    /// Its pod is claimed; write the Ready status naming it.
    WriteReady { pod: String, rebound: bool },
    /// Bound and Ready. `forget`: the caches show the binding, so this
    /// process need not remember it.
    Settled { forget: bool, recheck: Duration },
}

/// When to look at the session again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requeue {
    /// Only when it changes.
    OnChange,
    After(Duration),
}

/// The next step for a session.
pub fn decide(observed: &Observed, pool_name: &str) -> Step {
    let now = observed.now;
    if observed.deleting {
        // Its pod is deleted by the pool controller once the session is gone.
        return Step::Idle(Requeue::OnChange);
    }
    if observed.phase.has_ended() {
        // Never deleted before its results are stored, however long that takes.
        if observed.export == Export::Due {
            return Step::Export;
        }
        let ended = observed.ended_at.unwrap_or(now);
        let retention = SignedDuration::try_from(observed.retention).unwrap_or(SignedDuration::ZERO);
        let delete_at = ended + retention;
        return if now >= delete_at {
            Step::Delete
        } else {
            Step::Idle(Requeue::After(delete_at.duration_since(now).unsigned_abs()))
        };
    }
    if !observed.pool_exists {
        return Step::Wait { reason: reason::POOL_NOT_FOUND, message: format!("WarmPool {pool_name} does not exist") };
    }
    let release = observed.bound.as_ref().map(|pod| pod.name.clone());
    if observed.results_final {
        return Step::Complete { release };
    }
    if now >= observed.expires {
        return Step::Expire { release };
    }
    if observed.client_gone_at.is_some_and(|gone| now >= gone) {
        return Step::ClientGone { release };
    }
    let pod = match &observed.bound {
        Some(pod) if pod.alive => pod,
        dead => {
            let replacing = dead.as_ref().map(|pod| pod.name.clone());
            // A session that had a pod and lost it is rebinding.
            if observed.status_pod.is_some() && observed.rebinds >= observed.max_rebinds {
                return Step::Fail { release: replacing };
            }
            return Step::Claim { replacing };
        }
    };
    if !observed.extra_claims.is_empty() {
        return Step::ReleaseExtras(observed.extra_claims.clone());
    }
    let next_end = observed.client_gone_at.map_or(observed.expires, |gone| gone.min(observed.expires));
    let recheck = next_end.duration_since(now).unsigned_abs().min(SETTLED_RECHECK);
    if observed.phase == Phase::Ready && observed.status_pod.as_deref() == Some(pod.name.as_str()) {
        return Step::Settled { forget: pod.in_cache, recheck };
    }
    if observed.written.as_ref() == Some(&Binding { pod: pod.name.clone(), ready: true }) {
        // This pass saw a session older than our own status write.
        return Step::Idle(Requeue::After(recheck));
    }
    Step::WriteReady { pod: pod.name.clone(), rebound: observed.status_pod.is_some() }
}

/// The pod a session holds among those claimed for it: the one its status
/// names, then the one this process remembers binding, then the first.
pub fn choose_bound<'a>(
    claimed: &'a [String],
    in_status: Option<&str>,
    remembered: Option<&str>,
) -> Option<&'a String> {
    claimed
        .iter()
        .find(|p| Some(p.as_str()) == in_status)
        .or_else(|| claimed.iter().find(|p| Some(p.as_str()) == remembered))
        .or_else(|| claimed.first())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn pod(name: &str) -> BoundPod {
        BoundPod { name: name.into(), alive: true, in_cache: true }
    }

    /// A live session of pool "edge" at t=100 that expires at t=400, with no pod yet.
    fn fresh() -> Observed {
        Observed {
            now: at(100),
            deleting: false,
            phase: Phase::Pending,
            status_pod: None,
            results_final: false,
            ended_at: None,
            retention: Duration::from_secs(3600),
            export: Export::Off,
            pool_exists: true,
            expires: at(400),
            client_gone_at: None,
            bound: None,
            extra_claims: vec![],
            written: None,
            rebinds: 0,
            max_rebinds: 3,
        }
    }

    #[test]
    fn a_session_being_deleted_is_left_alone() {
        let observed = Observed { deleting: true, bound: Some(pod("a")), ..fresh() };
        assert_eq!(decide(&observed, "edge"), Step::Idle(Requeue::OnChange));
    }

    #[test]
    fn an_ended_session_waits_out_its_retention_then_goes() {
        for phase in [Phase::Completed, Phase::Expired, Phase::Failed] {
            let ended = Observed { phase, ended_at: Some(at(90)), retention: Duration::from_secs(60), ..fresh() };
            assert_eq!(decide(&ended, "edge"), Step::Idle(Requeue::After(Duration::from_secs(50))));
            let later = Observed { now: at(150), ..ended };
            assert_eq!(decide(&later, "edge"), Step::Delete);
        }
        // No Ready condition to date it: it ended now.
        let undated = Observed { phase: Phase::Expired, retention: Duration::ZERO, ..fresh() };
        assert_eq!(decide(&undated, "edge"), Step::Delete);
    }

    #[test]
    fn an_ended_session_is_stored_before_anything_else_and_never_deleted_unstored() {
        for phase in [Phase::Completed, Phase::Expired, Phase::Failed] {
            let ended = Observed { phase, ended_at: Some(at(90)), export: Export::Due, ..fresh() };
            assert_eq!(decide(&ended, "edge"), Step::Export);
            // Long past its retention: still stored first, not deleted.
            let overdue = Observed { now: at(100_000), ..ended.clone() };
            assert_eq!(decide(&overdue, "edge"), Step::Export);
            // Stored: its retention runs as usual.
            let stored = Observed { export: Export::Done, ..overdue };
            assert_eq!(decide(&stored, "edge"), Step::Delete);
        }
        // A live session is not stored yet, whatever the flag says.
        let live = Observed { export: Export::Due, ..fresh() };
        assert_eq!(decide(&live, "edge"), Step::Claim { replacing: None });
        // Being deleted (by someone else): left alone.
        let deleting = Observed { deleting: true, phase: Phase::Completed, export: Export::Due, ..fresh() };
        assert_eq!(decide(&deleting, "edge"), Step::Idle(Requeue::OnChange));
    }

    #[test]
    fn ending_a_session_takes_what_its_write_said_of_the_store() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        use tidepool_crds::test_session::TestSessionStatus;
        let live = Observed { results_final: true, bound: Some(pod("a")), export: Export::Due, ..fresh() };
        // Stored in the same write: nothing left but the retention.
        let mut stored = live.clone();
        stored.ended(&TestSessionStatus {
            phase: Phase::Completed,
            exported_at: Some(Time(at(100))),
            ..Default::default()
        });
        assert_eq!((stored.phase, stored.bound.clone(), stored.export), (Phase::Completed, None, Export::Done));
        assert_eq!(decide(&stored, "edge"), Step::Idle(Requeue::After(Duration::from_secs(3600))));
        // Not stored: storing is the next step.
        let mut unstored = live.clone();
        unstored.ended(&TestSessionStatus { phase: Phase::Completed, ..Default::default() });
        assert_eq!(decide(&unstored, "edge"), Step::Export);
        // No store configured: it stays off.
        let mut off = Observed { export: Export::Off, ..live };
        off.ended(&TestSessionStatus { phase: Phase::Expired, ..Default::default() });
        assert_eq!(off.export, Export::Off);
    }

    #[test]
    fn a_session_of_a_missing_pool_waits_with_the_reason() {
        let observed = Observed { pool_exists: false, ..fresh() };
        let Step::Wait { reason, message } = decide(&observed, "edge") else { panic!("not a wait") };
        assert_eq!(reason, reason::POOL_NOT_FOUND);
        assert!(message.contains("edge"), "{message}");
    }

    #[test]
    fn final_results_complete_the_session_and_release_its_pod() {
        let observed = Observed { results_final: true, bound: Some(pod("a")), phase: Phase::Ready, ..fresh() };
        assert_eq!(decide(&observed, "edge"), Step::Complete { release: Some("a".into()) });
        let unbound = Observed { results_final: true, ..fresh() };
        assert_eq!(decide(&unbound, "edge"), Step::Complete { release: None });
    }

    #[test]
    fn the_ttl_ends_a_session_with_or_without_a_pod() {
        let observed = Observed { now: at(400), bound: Some(pod("a")), ..fresh() };
        assert_eq!(decide(&observed, "edge"), Step::Expire { release: Some("a".into()) });
        let waiting = Observed { now: at(401), ..fresh() };
        assert_eq!(decide(&waiting, "edge"), Step::Expire { release: None });
    }

    #[test]
    fn a_session_whose_client_went_away_ends_early_and_is_rechecked_in_time() {
        let ready = Observed { bound: Some(pod("a")), phase: Phase::Ready, status_pod: Some("a".into()), ..fresh() };
        let gone = Observed { client_gone_at: Some(at(100)), ..ready.clone() };
        assert_eq!(decide(&gone, "edge"), Step::ClientGone { release: Some("a".into()) });
        // Waiting for a pod, it still ends: nothing is there to serve.
        let waiting = Observed { client_gone_at: Some(at(90)), ..fresh() };
        assert_eq!(decide(&waiting, "edge"), Step::ClientGone { release: None });
        // Not gone yet: looked at again when it would be.
        let soon = Observed { client_gone_at: Some(at(103)), ..ready.clone() };
        assert_eq!(decide(&soon, "edge"), Step::Settled { forget: true, recheck: Duration::from_secs(3) });
        // The TTL first, when both are due.
        let both = Observed { now: at(400), client_gone_at: Some(at(300)), ..ready };
        assert_eq!(decide(&both, "edge"), Step::Expire { release: Some("a".into()) });
        // Final results win over both.
        let done = Observed { results_final: true, client_gone_at: Some(at(50)), ..fresh() };
        assert_eq!(decide(&done, "edge"), Step::Complete { release: None });
    }

    #[test]
    fn a_session_without_a_live_pod_claims_one() {
        assert_eq!(decide(&fresh(), "edge"), Step::Claim { replacing: None });
        // Its pod died under it: the session heals onto a new one.
        let dead = Observed { bound: Some(BoundPod { alive: false, ..pod("a") }), phase: Phase::Ready, ..fresh() };
        assert_eq!(decide(&dead, "edge"), Step::Claim { replacing: Some("a".into()) });
    }

    #[test]
    fn a_session_whose_pods_keep_going_away_fails_at_its_pools_limit() {
        let dead = Some(BoundPod { alive: false, ..pod("a") });
        let healing = Observed { bound: dead.clone(), status_pod: Some("a".into()), rebinds: 2, ..fresh() };
        assert_eq!(decide(&healing, "edge"), Step::Claim { replacing: Some("a".into()) });
        let spent = Observed { rebinds: 3, ..healing };
        assert_eq!(decide(&spent, "edge"), Step::Fail { release: Some("a".into()) });
        // Its pod is gone entirely: nothing to release.
        let vanished = Observed { bound: None, ..spent.clone() };
        assert_eq!(decide(&vanished, "edge"), Step::Fail { release: None });
        // A first binding is no rebind, however the count stands.
        let first = Observed { status_pod: None, ..spent };
        assert_eq!(decide(&first, "edge"), Step::Claim { replacing: Some("a".into()) });
    }

    #[test]
    fn a_second_claimed_pod_is_released() {
        let observed = Observed { bound: Some(pod("a")), extra_claims: vec!["b".into()], ..fresh() };
        assert_eq!(decide(&observed, "edge"), Step::ReleaseExtras(vec!["b".into()]));
    }

    #[test]
    fn a_claimed_pod_gets_its_ready_status() {
        let observed = Observed { bound: Some(pod("a")), ..fresh() };
        assert_eq!(decide(&observed, "edge"), Step::WriteReady { pod: "a".into(), rebound: false });
        // Claimed by an earlier pass that stopped before the status write: adopted.
        let adopted = Observed { bound: Some(BoundPod { in_cache: true, ..pod("a") }), ..fresh() };
        assert_eq!(decide(&adopted, "edge"), Step::WriteReady { pod: "a".into(), rebound: false });
        // Healed onto another pod: a rebinding.
        let healed = Observed { bound: Some(pod("b")), status_pod: Some("a".into()), ..fresh() };
        assert_eq!(decide(&healed, "edge"), Step::WriteReady { pod: "b".into(), rebound: true });
    }

    #[test]
    fn a_bound_ready_session_is_settled_and_looked_at_again() {
        let observed = Observed { bound: Some(pod("a")), phase: Phase::Ready, status_pod: Some("a".into()), ..fresh() };
        assert_eq!(decide(&observed, "edge"), Step::Settled { forget: true, recheck: SETTLED_RECHECK });
        // The claim is only in this process's memory: keep remembering it.
        let lagging = Observed { bound: Some(BoundPod { in_cache: false, ..pod("a") }), ..observed.clone() };
        assert_eq!(decide(&lagging, "edge"), Step::Settled { forget: false, recheck: SETTLED_RECHECK });
        // Expiry comes before the usual recheck.
        let late = Observed { now: at(395), ..observed };
        assert_eq!(decide(&late, "edge"), Step::Settled { forget: true, recheck: Duration::from_secs(5) });
    }

    #[test]
    fn a_status_this_process_wrote_is_not_written_again_from_a_stale_cache() {
        let observed =
            Observed { bound: Some(pod("a")), written: Some(Binding { pod: "a".into(), ready: true }), ..fresh() };
        assert_eq!(decide(&observed, "edge"), Step::Idle(Requeue::After(SETTLED_RECHECK)));
        // Claimed but not yet written: write it.
        let claimed = Observed { written: Some(Binding { pod: "a".into(), ready: false }), ..observed };
        assert_eq!(decide(&claimed, "edge"), Step::WriteReady { pod: "a".into(), rebound: false });
    }

    #[test]
    fn the_bound_pod_is_the_status_one_then_the_remembered_one_then_the_first() {
        let claimed = vec!["a".to_string(), "b".into(), "c".into()];
        assert_eq!(choose_bound(&claimed, Some("b"), Some("c")).map(String::as_str), Some("b"));
        assert_eq!(choose_bound(&claimed, Some("x"), Some("c")).map(String::as_str), Some("c"));
        assert_eq!(choose_bound(&claimed, None, None).map(String::as_str), Some("a"));
        assert_eq!(choose_bound(&[], Some("a"), Some("a")), None);
    }
}
