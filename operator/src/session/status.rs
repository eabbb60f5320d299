//! The TestSession statuses the controller writes, built without I/O, and
//! the merge patch that writes them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use tidepool_crds::test_session::{Phase, TestSessionStatus};

use crate::conditions::{self, reason};
use crate::error::{Error, Result};

/// What the status says about the pod a session is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    pub name: String,
    pub node: Option<String>,
    /// The Backend placement knows for the pod's node, when agents report.
    pub backend: Option<String>,
    pub endpoint: Option<String>,
    /// The pool key the pod holds.
    pub key_id: Option<String>,
}

/// When the session began and ends, and its generation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Times {
    pub created: Timestamp,
    pub expires: Timestamp,
    pub now: Timestamp,
    pub generation: Option<i64>,
}

/// Ready on `pod`: bound for the first time, or rebound after its pod died.
pub fn ready(mut status: TestSessionStatus, pod: &PodFacts, times: Times, rebound: bool) -> TestSessionStatus {
    let Times { created, expires, now, generation } = times;
    status.phase = Phase::Ready;
    status.pod = Some(pod.name.clone());
    status.node = pod.node.clone();
    status.backend = pod.backend.clone();
    status.endpoint = pod.endpoint.clone();
    status.key_id = pod.key_id.clone();
    status.created_at = Some(Time(created));
    status.assigned_at = Some(Time(now));
    status.ready_at = Some(Time(now));
    status.expires_at = Some(Time(expires));
    status.observed_generation = generation;
    if rebound {
        status.rebinds += 1;
    }
    let why = if rebound { reason::REBOUND } else { reason::BOUND };
    let message = format!("bound to pod {}", pod.name);
    conditions::set(&mut status.conditions, conditions::BOUND, true, why, message, generation, now);
    let serving = "the client may connect";
    conditions::set(&mut status.conditions, conditions::READY, true, reason::POD_SERVING, serving, generation, now);
    status
}

/// Pending for `why`; None when the status already says so (a pass that
/// finds the same reason writes nothing).
pub fn waiting(
    mut status: TestSessionStatus,
    why: &'static str,
    message: String,
    created_at: Option<Time>,
    generation: Option<i64>,
    now: Timestamp,
) -> Option<TestSessionStatus> {
    let already = status.phase == Phase::Pending
        && status.pod.is_none()
        && conditions::reason(&status.conditions, conditions::BOUND) == Some(why);
    if already {
        return None;
    }
    status.phase = Phase::Pending;
    status.pod = None;
    status.node = None;
    status.backend = None;
    status.endpoint = None;
    status.observed_generation = generation;
    status.created_at = created_at;
    conditions::set(&mut status.conditions, conditions::BOUND, false, why, message, generation, now);
    conditions::set(&mut status.conditions, conditions::READY, false, why, "waiting for a pod", generation, now);
    Some(status)
}

/// How a session ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Its final results are in.
    Completed,
    /// Its TTL ran out.
    Expired,
    /// Its client has been gone past its pool's grace: Expired, early.
    ClientGone,
    /// Its pods went away more often than its pool allows.
    Failed,
}

impl Ending {
    pub fn phase(self) -> Phase {
        match self {
            Self::Completed => Phase::Completed,
            Self::Expired | Self::ClientGone => Phase::Expired,
            Self::Failed => Phase::Failed,
        }
    }
}

/// Over, as `ending` says, with the Ready condition saying why.
pub fn ended(
    mut status: TestSessionStatus,
    ending: Ending,
    generation: Option<i64>,
    now: Timestamp,
) -> TestSessionStatus {
    let (why, message) = match ending {
        Ending::Completed => (reason::COMPLETED, COMPLETED_MESSAGE),
        Ending::Failed => (reason::TOO_MANY_REBINDS, TOO_MANY_REBINDS_MESSAGE),
        Ending::Expired => (reason::EXPIRED, "the session's TTL ran out"),
        Ending::ClientGone => (reason::CLIENT_GONE, CLIENT_GONE_MESSAGE),
    };
    status.phase = ending.phase();
    conditions::set(&mut status.conditions, conditions::READY, false, why, message, generation, now);
    status
}

/// The message of a session released because its client went away.
pub const CLIENT_GONE_MESSAGE: &str = "its client had no stream open for the pool's releaseWhenClientGoneSeconds";

/// Stored as `key` in the results store.
pub fn exported(
    mut status: TestSessionStatus,
    key: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> TestSessionStatus {
    status.exported_at = Some(Time(now));
    let message = format!("results stored as {key}");
    conditions::set(&mut status.conditions, conditions::EXPORTED, true, reason::STORED, message, generation, now);
    status
}

/// The results store failed (`why`); None when the status already says so:
/// one write per outage, not one per retry.
pub fn export_failed(
    mut status: TestSessionStatus,
    why: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Option<TestSessionStatus> {
    if conditions::reason(&status.conditions, conditions::EXPORTED) == Some(reason::STORE_UNAVAILABLE) {
        return None;
    }
    let message = format!(
        "the results store did not take the results ({why}); retrying with backoff, and the session is kept until they are stored"
    );
    let exported = conditions::EXPORTED;
    conditions::set(&mut status.conditions, exported, false, reason::STORE_UNAVAILABLE, message, generation, now);
    Some(status)
}

/// The message of a Completed session's Ready condition and Event.
pub const COMPLETED_MESSAGE: &str = "the session's tests finished; the results are in status.results";
/// The message of a session failed for its rebinds.
pub const TOO_MANY_REBINDS_MESSAGE: &str =
    "the session's pod went away more often than its WarmPool's maxRebinds allows; the session ended";

/// When an ended session ended: its Ready condition's last transition.
pub fn ended_at(status: &TestSessionStatus) -> Option<Timestamp> {
    conditions::last_transition(&status.conditions, conditions::READY)
}

/// The status fields the controller owns. A merge patch keeps what it does
/// not name, so each of these it leaves unset is sent as null.
pub const OWNED_STATUS_FIELDS: [&str; 14] = [
    "phase",
    "pod",
    "node",
    "backend",
    "endpoint",
    "createdAt",
    "assignedAt",
    "readyAt",
    "expiresAt",
    "keyId",
    "rebinds",
    "exportedAt",
    "conditions",
    "observedGeneration",
];

/// The merge patch for `status`. `results` belongs to the results route
/// alone: never named here, a write from a stale cache cannot drop it.
pub fn patch(status: &TestSessionStatus) -> Result<serde_json::Value> {
    let mut patch = serde_json::to_value(TestSessionStatus { results: None, ..status.clone() })
        .map_err(|e| Error::Kube(kube::Error::SerdeError(e)))?;
    if let Some(fields) = patch.as_object_mut() {
        for field in OWNED_STATUS_FIELDS {
            fields.entry(field).or_insert(serde_json::Value::Null);
        }
    }
    Ok(serde_json::json!({ "status": patch }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use tidepool_crds::TestSession;

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).unwrap()
    }

    fn times() -> Times {
        Times { created: at(1_000), expires: at(1_300), now: at(1_010), generation: Some(1) }
    }

    fn pod() -> PodFacts {
        PodFacts {
            name: "edge-a".into(),
            node: Some("n1".into()),
            backend: Some("n1".into()),
            endpoint: Some("http://10.0.0.1:8080".into()),
            key_id: Some("k1".into()),
        }
    }

    #[test]
    fn ready_names_the_pod_and_says_whether_it_rebound() {
        let status = ready(TestSessionStatus::default(), &pod(), times(), false);
        assert_eq!(
            (status.phase, status.pod.as_deref(), status.node.as_deref()),
            (Phase::Ready, Some("edge-a"), Some("n1"))
        );
        assert_eq!(status.backend.as_deref(), Some("n1"));
        assert_eq!(status.expires_at, Some(Time(at(1_300))));
        assert_eq!(conditions::reason(&status.conditions, conditions::BOUND), Some(reason::BOUND));
        assert!(conditions::is_true(&status.conditions, conditions::READY));
        assert_eq!(status.rebinds, 0);
        let healed = ready(status, &PodFacts { name: "edge-b".into(), ..pod() }, times(), true);
        assert_eq!(conditions::reason(&healed.conditions, conditions::BOUND), Some(reason::REBOUND));
        assert_eq!((healed.pod.as_deref(), healed.rebinds), (Some("edge-b"), 1));
    }

    #[test]
    fn waiting_is_written_once_per_reason() {
        let first = waiting(TestSessionStatus::default(), reason::POOL_EMPTY, "no pod".into(), None, Some(1), at(5));
        let first = first.expect("a new reason is written");
        assert_eq!(first.phase, Phase::Pending);
        assert!(!conditions::is_true(&first.conditions, conditions::READY));
        assert_eq!(waiting(first.clone(), reason::POOL_EMPTY, "still none".into(), None, Some(1), at(6)), None);
        let other = waiting(first, reason::NO_BACKEND_FITS, "full".into(), None, Some(1), at(7));
        assert_eq!(
            other.map(|s| conditions::reason(&s.conditions, conditions::BOUND).map(String::from)),
            Some(Some(reason::NO_BACKEND_FITS.into()))
        );
        // A session that lost its pod waits again, and its pod is cleared.
        let bound = ready(TestSessionStatus::default(), &pod(), times(), false);
        let lost = waiting(bound, reason::POOL_EMPTY, "no pod".into(), None, Some(1), at(8)).unwrap();
        assert_eq!((lost.pod, lost.endpoint, lost.backend), (None, None, None));
    }

    #[test]
    fn an_ended_session_says_how_and_when() {
        let bound = ready(TestSessionStatus::default(), &pod(), times(), false);
        let done = ended(bound.clone(), Ending::Completed, Some(1), at(2_000));
        assert_eq!(conditions::reason(&done.conditions, conditions::READY), Some(reason::COMPLETED));
        assert_eq!(ended_at(&done), Some(at(2_000)));
        let failed = ended(bound.clone(), Ending::Failed, Some(1), at(2_002));
        assert_eq!(conditions::reason(&failed.conditions, conditions::READY), Some(reason::TOO_MANY_REBINDS));
        let expired = ended(bound.clone(), Ending::Expired, Some(1), at(2_001));
        assert_eq!(
            (expired.phase, conditions::reason(&expired.conditions, conditions::READY)),
            (Phase::Expired, Some(reason::EXPIRED))
        );
        let gone = ended(bound, Ending::ClientGone, Some(1), at(2_003));
        assert_eq!(
            (gone.phase, conditions::reason(&gone.conditions, conditions::READY)),
            (Phase::Expired, Some(reason::CLIENT_GONE))
        );
    }

    #[test]
    fn storing_is_recorded_once_and_an_outage_is_said_once() {
        let done = ended(TestSessionStatus::default(), Ending::Completed, Some(1), at(2_000));
        let failing = export_failed(done.clone(), "the store answered 503", Some(1), at(2_001)).unwrap();
        assert_eq!(conditions::reason(&failing.conditions, conditions::EXPORTED), Some(reason::STORE_UNAVAILABLE));
        assert!(failing.exported_at.is_none());
        // Retries that fail again write nothing more.
        assert_eq!(export_failed(failing.clone(), "timeout", Some(1), at(2_030)), None);
        let stored = exported(failing, "ns/p/2026-11-22/s-u.json", Some(1), at(2_040));
        assert_eq!(stored.exported_at, Some(Time(at(2_040))));
        assert!(conditions::is_true(&stored.conditions, conditions::EXPORTED));
        assert_eq!(conditions::reason(&stored.conditions, conditions::EXPORTED), Some(reason::STORED));
        // The Ready condition (when it ended) is untouched.
        assert_eq!(ended_at(&stored), Some(at(2_000)));
    }

    /// Every status field but `results` is named in each write, so a field
    /// the controller unsets is removed, whatever its cache showed.
    #[test]
    fn a_status_write_names_every_owned_field_and_never_results() {
        let mut full = serde_json::json!({
            "phase": "Ready", "pod": "p", "node": "n", "backend": "b", "endpoint": "http://e",
            "createdAt": "2026-11-22T10:00:00Z", "assignedAt": "2026-11-22T10:00:00Z",
            "readyAt": "2026-11-22T10:00:00Z", "expiresAt": "2026-11-22T10:05:00Z", "rebinds": 2, "keyId": "k",
            "results": { "final": true }, "exportedAt": "2026-11-22T10:06:00Z",
            "conditions": [{ "type": "Ready", "status": "True", "reason": "Bound", "message": "m",
                "lastTransitionTime": "2026-11-22T10:00:00Z" }],
            "observedGeneration": 1,
        });
        // The fixture holds every status field the CRD has.
        let crd = <TestSession as kube::CustomResourceExt>::crd();
        let schema = crd.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).unwrap();
        let status_schema = &schema.properties.as_ref().unwrap()["status"];
        let in_crd: BTreeSet<&str> = status_schema.properties.as_ref().unwrap().keys().map(String::as_str).collect();
        let in_fixture: BTreeSet<&str> = full.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(in_fixture, in_crd);
        // A field added to the CRD must be added to the owned list too.
        let mut named: BTreeSet<&str> = OWNED_STATUS_FIELDS.into_iter().collect();
        named.insert("results");
        assert_eq!(named, in_crd);
        let status: TestSessionStatus = serde_json::from_value(full.clone()).unwrap();
        assert_eq!(serde_json::to_value(&status).unwrap(), full);

        let written = patch(&status).unwrap();
        full.as_object_mut().unwrap().remove("results");
        assert_eq!(written, serde_json::json!({ "status": full }));
        let unset = patch(&TestSessionStatus::default()).unwrap();
        let unset = unset["status"].as_object().unwrap();
        assert_eq!(unset.len(), OWNED_STATUS_FIELDS.len());
        assert!(unset.iter().all(|(k, v)| k == "phase" || v.is_null()), "{unset:?}");
    }
}
