//! What is stored for an ended session, and where: pure functions.
//!
//! Keys say namespace, pool, day and session:
//! `{prefix}{namespace}/{pool}/{YYYY-MM-DD}/{name}-{uid}.json`, the day
//! being the one the session ended on (UTC). A session always maps to the
//! same key, so a repeated export overwrites its own document; the UID
//! keeps a later session of the same name from overwriting an earlier one.

use k8s_openapi::jiff::Timestamp;
use k8s_openapi::jiff::civil::Date;
use kube::ResourceExt;
use tidepool_crds::test_session::TestSessionStatus;
use tidepool_crds::{API_VERSION, TestSession};
use tidepool_protocol::stored::{STORED_RESULT_KIND, StoredClient, StoredResult};

use crate::creators::CREATED_BY_ANNOTATION;
use crate::labels;

/// The document for `session`, which ended at `ended_at` with `status`.
pub fn record(session: &TestSession, status: &TestSessionStatus, ended_at: Timestamp) -> StoredResult {
    StoredResult {
        api_version: API_VERSION.to_string(),
        kind: STORED_RESULT_KIND.to_string(),
        namespace: session.namespace().unwrap_or_default(),
        name: session.name_any(),
        uid: session.uid().unwrap_or_default(),
        pool: session.spec.pool.clone(),
        profile: session.spec.profile,
        phase: status.phase,
        created_at: session.metadata.creation_timestamp.as_ref().map(|t| t.0.to_string()),
        ended_at: ended_at.to_string(),
        pod: status.pod.clone(),
        node: status.node.clone(),
        backend: status.backend.clone(),
        client: StoredClient {
            address: session.spec.client.as_ref().and_then(|c| c.address.clone()),
            created_by: session.annotations().get(CREATED_BY_ANNOTATION).cloned(),
        },
        monitor: session.labels().get(labels::MONITOR).cloned(),
        results: status.results.clone(),
    }
}

/// `prefix` as keys start with it: empty, or ending in one `/`.
pub fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() { String::new() } else { format!("{trimmed}/") }
}

/// Where `record` is stored, under a normalized `prefix`.
pub fn object_key(prefix: &str, record: &StoredResult, ended_at: Timestamp) -> String {
    format!(
        "{}{}-{}.json",
        day_prefix(prefix, &record.namespace, &record.pool, day_of(ended_at)),
        record.name,
        record.uid
    )
}

/// Every key of one pool's sessions that ended on `day`.
pub fn day_prefix(prefix: &str, namespace: &str, pool: &str, day: Date) -> String {
    format!("{prefix}{namespace}/{pool}/{day}/")
}

/// Every pool's folder in `namespace`.
pub fn namespace_prefix(prefix: &str, namespace: &str) -> String {
    format!("{prefix}{namespace}/")
}

/// The UTC day of a moment.
pub fn day_of(at: Timestamp) -> Date {
    at.to_zoned(k8s_openapi::jiff::tz::TimeZone::UTC).date()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use tidepool_crds::test_session::{ClientHints, Grade, Grades, Phase, SessionResults, TestSessionSpec};

    fn session() -> TestSession {
        let mut session = TestSession::new(
            "run-1",
            TestSessionSpec {
                pool: "edge".into(),
                profile: Default::default(),
                ttl_seconds: None,
                sticky_key: None,
                client: Some(ClientHints { address: Some("192.0.2.9".into()), latitude: None, longitude: None }),
                probes: vec![],
            },
        );
        session.metadata.namespace = Some("team-a".into());
        session.metadata.uid = Some("0a1b".into());
        session.metadata.creation_timestamp = Some(Time("2026-12-05T23:59:50Z".parse().unwrap()));
        session.metadata.annotations =
            Some([(CREATED_BY_ANNOTATION.to_string(), "system:serviceaccount:team-a:ci".to_string())].into());
        session.metadata.labels = Some([(labels::MONITOR.to_string(), "edge-watch".to_string())].into());
        session
    }

    #[test]
    fn a_record_says_what_ran_for_whom_and_what_it_measured() {
        let status = TestSessionStatus {
            phase: Phase::Completed,
            pod: Some("edge-x".into()),
            node: Some("n1".into()),
            results: Some(SessionResults {
                grades: Some(Grades { overall: Some(Grade::B), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let ended: Timestamp = "2026-12-06T00:00:05Z".parse().unwrap();
        let record = record(&session(), &status, ended);
        assert_eq!((record.namespace.as_str(), record.name.as_str(), record.uid.as_str()), ("team-a", "run-1", "0a1b"));
        assert_eq!(record.kind, STORED_RESULT_KIND);
        assert_eq!(record.api_version, "tidepool.dev/v1alpha1");
        assert_eq!(record.client.address.as_deref(), Some("192.0.2.9"));
        assert_eq!(record.client.created_by.as_deref(), Some("system:serviceaccount:team-a:ci"));
        assert_eq!(record.monitor.as_deref(), Some("edge-watch"));
        assert_eq!(record.created_at.as_deref(), Some("2026-12-05T23:59:50Z"));
        assert_eq!(record.ended_at, "2026-12-06T00:00:05Z");
        assert_eq!(record.overall_grade(), Some(Grade::B));
        // Filed under the day it ended, not the day it began.
        assert_eq!(object_key("results/", &record, ended), "results/team-a/edge/2026-12-06/run-1-0a1b.json");
    }

    #[test]
    fn prefixes_end_in_one_slash_or_are_empty() {
        assert_eq!(normalize_prefix(""), "");
        assert_eq!(normalize_prefix("/"), "");
        assert_eq!(normalize_prefix("tidepool"), "tidepool/");
        assert_eq!(normalize_prefix("/a/b//"), "a/b/");
        let day = Date::new(2026, 1, 2).unwrap();
        assert_eq!(day_prefix("", "ns", "p", day), "ns/p/2026-01-02/");
        assert_eq!(namespace_prefix("t/", "ns"), "t/ns/");
    }
}
