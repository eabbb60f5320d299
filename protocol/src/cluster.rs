//! `GET /api/v1/cluster`: the operators' live view of a namespace's pools
//! and sessions and of every backend, as a stream of server-sent events.
//! Each `cluster` event carries a whole [`ClusterView`]; the operator sends
//! one when its watch caches show a change, and a comment line while
//! nothing changes, so proxies keep the stream open.

use serde::{Deserialize, Serialize};
use tidepool_crds::test_session::{Grade, Phase, TestSessionSpec, TestSessionStatus};
use tidepool_crds::warm_pool::{WarmPoolSpec, WarmPoolStatus};

/// The route, with `?namespace=`.
pub const CLUSTER_PATH: &str = "/api/v1/cluster";
/// The SSE event name of a [`ClusterView`].
pub const CLUSTER_EVENT: &str = "cluster";
/// The most sessions one view lists, newest first; `sessionsTotal` counts all.
pub const MAX_SESSIONS_SHOWN: usize = 200;

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    pub namespace: String,
    pub pools: Vec<PoolRow>,
    pub sessions: Vec<SessionRow>,
    pub sessions_total: usize,
    pub backends: Vec<BackendRow>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolRow {
    pub name: String,
    /// Warm pods it keeps ready.
    pub size: i32,
    pub warm: i32,
    pub assigned: i32,
    pub pending: i32,
    pub public: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SessionRow {
    pub name: String,
    pub pool: String,
    pub phase: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// When it was made, Unix seconds: the page works out its age, so the
    /// view changes only when a session does.
    pub created_unix: i64,
    /// The overall grade, once results are in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grade: Option<Grade>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackendRow {
    pub name: String,
    /// Node or External.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Use of each core over the shortest window, percent, busiest first;
    /// empty without a report.
    pub core_percent: Vec<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used_percent: Option<f32>,
    /// Mean GPU use, percent; absent without GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_percent: Option<f32>,
    pub gpus: u32,
    /// Healthy, Unhealthy or Unknown: the health probe's verdict.
    pub health: String,
    /// No report for three report intervals: placement leaves it out.
    pub stale: bool,
}

pub fn pool_row(name: &str, spec: &WarmPoolSpec, status: Option<&WarmPoolStatus>) -> PoolRow {
    PoolRow {
        name: name.to_string(),
        size: spec.size,
        warm: status.map_or(0, |s| s.warm),
        assigned: status.map_or(0, |s| s.assigned),
        pending: status.map_or(0, |s| s.pending),
        public: spec.public,
    }
}

/// A TestSession's parts a row is made of.
pub struct SessionParts<'a> {
    pub name: &'a str,
    /// Unix seconds; `None` reads as now.
    pub created_unix: Option<i64>,
    pub spec: &'a TestSessionSpec,
    pub status: Option<&'a TestSessionStatus>,
}

/// The sessions as rows, newest first, at most [`MAX_SESSIONS_SHOWN`]; a
/// session without a creation time (not yet written) counts as made at `now_unix`.
pub fn session_rows(sessions: &[SessionParts<'_>], now_unix: i64) -> Vec<SessionRow> {
    let mut rows: Vec<SessionRow> = sessions
        .iter()
        .map(|session| {
            let created = session.created_unix.unwrap_or(now_unix);
            let status = session.status;
            let grade = status.and_then(|s| s.results.as_ref()).and_then(|r| r.grades.as_ref()).and_then(|g| g.overall);
            SessionRow {
                name: session.name.to_string(),
                pool: session.spec.pool.clone(),
                phase: status.map_or(Phase::Pending, |s| s.phase).as_str().to_string(),
                pod: status.and_then(|s| s.pod.clone()),
                created_unix: created,
                grade,
            }
        })
        .collect();
    rows.sort_by(|a, b| b.created_unix.cmp(&a.created_unix).then_with(|| a.name.cmp(&b.name)));
    rows.truncate(MAX_SESSIONS_SHOWN);
    rows
}

/// One server-sent event carrying `view`.
pub fn event(view: &ClusterView) -> String {
    // serde_json writes no raw newlines, so the data is one line.
    format!("event: {CLUSTER_EVENT}\ndata: {}\n\n", serde_json::to_string(view).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_crds::test_session::{Grades, SessionResults};

    fn spec() -> TestSessionSpec {
        serde_json::from_value(serde_json::json!({ "pool": "edge" })).unwrap()
    }

    fn session<'a>(
        name: &'a str,
        created: i64,
        spec: &'a TestSessionSpec,
        status: Option<&'a TestSessionStatus>,
    ) -> SessionParts<'a> {
        SessionParts { name, created_unix: Some(created), spec, status }
    }

    #[test]
    fn sessions_are_listed_newest_first_with_their_age_phase_and_grade() {
        let graded = TestSessionStatus {
            phase: Phase::Completed,
            pod: Some("edge-1".into()),
            results: Some(SessionResults {
                grades: Some(Grades { overall: Some(Grade::B), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let spec = spec();
        let sessions = [session("old", 1_000, &spec, Some(&graded)), session("new", 1_090, &spec, None)];
        let rows = session_rows(&sessions, 1_100);
        assert_eq!(
            rows[0],
            SessionRow {
                name: "new".into(),
                pool: "edge".into(),
                phase: "Pending".into(),
                pod: None,
                created_unix: 1_090,
                grade: None
            }
        );
        assert_eq!((rows[1].created_unix, rows[1].phase.as_str(), rows[1].grade), (1_000, "Completed", Some(Grade::B)));
        assert_eq!(rows[1].pod.as_deref(), Some("edge-1"));
    }

    #[test]
    fn a_view_lists_at_most_its_cap_of_sessions_and_is_one_event() {
        let spec = spec();
        let names: Vec<String> = (0..MAX_SESSIONS_SHOWN + 5).map(|i| format!("s{i}")).collect();
        let sessions: Vec<SessionParts<'_>> =
            names.iter().enumerate().map(|(i, name)| session(name, i as i64, &spec, None)).collect();
        let rows = session_rows(&sessions, 10_000);
        assert_eq!(rows.len(), MAX_SESSIONS_SHOWN);
        assert_eq!(rows[0].name, format!("s{}", MAX_SESSIONS_SHOWN + 4));
        let view = ClusterView { namespace: "ns".into(), sessions: rows, ..Default::default() };
        let text = event(&view);
        assert!(text.starts_with("event: cluster\ndata: {") && text.ends_with("}\n\n"));
        assert_eq!(text.lines().count(), 3);
    }

    #[test]
    fn a_pool_row_reads_its_status_or_zeroes() {
        let spec: WarmPoolSpec = serde_json::from_value(serde_json::json!({
            "size": 3, "tier": { "vcpu": 1, "memoryMiB": 64 }, "template": {}, "public": true
        }))
        .unwrap();
        let expected = PoolRow { name: "edge".into(), size: 3, public: true, ..Default::default() };
        assert_eq!(pool_row("edge", &spec, None), expected);
        let status: WarmPoolStatus =
            serde_json::from_value(serde_json::json!({ "replicas": 3, "warm": 2, "assigned": 1, "pending": 0 }))
                .unwrap();
        let row = pool_row("edge", &spec, Some(&status));
        assert_eq!((row.warm, row.assigned, row.pending), (2, 1, 0));
    }
}
