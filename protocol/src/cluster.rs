//! `GET /api/v1/cluster`: the operators' live view of a namespace's pools,
//! sessions and tubes and of every backend, as a stream of server-sent events.
//! Each `cluster` event carries a whole [`ClusterView`]; the operator sends
//! one when its watch caches show a change, and a comment line while
//! nothing changes, so proxies keep the stream open.

use serde::{Deserialize, Serialize};
use tidepool_crds::test_session::{Grade, Phase, TestSessionSpec, TestSessionStatus};
use tidepool_crds::tube::{ConversationType, TubeSpec, TubeStatus};
use tidepool_crds::warm_pool::{WarmPoolSpec, WarmPoolStatus};

use crate::tube::target_text;

/// The route, with `?namespace=`.
pub const CLUSTER_PATH: &str = "/api/v1/cluster";
/// The SSE event name of a [`ClusterView`].
pub const CLUSTER_EVENT: &str = "cluster";
/// The most sessions one view lists, newest first; `sessionsTotal` counts all.
pub const MAX_SESSIONS_SHOWN: usize = 200;
/// The most tubes one view lists, newest first; `tubesTotal` counts all.
pub const MAX_TUBES_SHOWN: usize = 200;

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClusterView {
    pub namespace: String,
    pub pools: Vec<PoolRow>,
    pub sessions: Vec<SessionRow>,
    pub sessions_total: usize,
    /// The namespace's tubes; absent when the caller may not list Tubes
    /// (a tube's target names a host inside the cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tubes: Option<Vec<TubeRow>>,
    #[serde(default)]
    pub tubes_total: usize,
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
pub struct TubeRow {
    pub name: String,
    /// `tunnel` or `socks5`.
    pub kind: String,
    /// A tunnel's `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The pool it claims a pod from, or the pool of the session it rides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Pending, Answered, Connected, Disconnected, Failed or Closed.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub bytes_sent: i64,
    pub bytes_received: i64,
    pub open_connections: i32,
    /// Unix seconds, as for sessions.
    pub created_unix: i64,
    /// Why it ended, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
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

/// An object's parts a row is made of.
pub struct Parts<'a, Spec, Status> {
    pub name: &'a str,
    /// Unix seconds; `None` reads as now.
    pub created_unix: Option<i64>,
    pub spec: &'a Spec,
    pub status: Option<&'a Status>,
}

/// A TestSession's parts.
pub type SessionParts<'a> = Parts<'a, TestSessionSpec, TestSessionStatus>;
/// A Tube's parts.
pub type TubeParts<'a> = Parts<'a, TubeSpec, TubeStatus>;

/// `rows` newest first (by `created`, then name), at most `cap` of them.
fn newest_first<Row>(mut rows: Vec<Row>, created: impl Fn(&Row) -> (i64, &str), cap: usize) -> Vec<Row> {
    rows.sort_by(|a, b| {
        let ((a_at, a_name), (b_at, b_name)) = (created(a), created(b));
        b_at.cmp(&a_at).then_with(|| a_name.cmp(b_name))
    });
    rows.truncate(cap);
    rows
}

/// The sessions as rows, newest first, at most [`MAX_SESSIONS_SHOWN`]; a
/// session without a creation time (not yet written) counts as made at `now_unix`.
pub fn session_rows(sessions: &[SessionParts<'_>], now_unix: i64) -> Vec<SessionRow> {
    let rows: Vec<SessionRow> = sessions
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
    newest_first(rows, |row| (row.created_unix, &row.name), MAX_SESSIONS_SHOWN)
}

/// The tubes as rows, newest first, at most [`MAX_TUBES_SHOWN`].
pub fn tube_rows(tubes: &[TubeParts<'_>], now_unix: i64) -> Vec<TubeRow> {
    let rows: Vec<TubeRow> = tubes
        .iter()
        .map(|tube| {
            let status = tube.status;
            let kind = match tube.spec.conversation_type {
                ConversationType::Tunnel => "tunnel",
                ConversationType::Socks5 => "socks5",
            };
            TubeRow {
                name: tube.name.to_string(),
                kind: kind.to_string(),
                target: tube.spec.target.as_ref().map(target_text),
                pool: tube.spec.pool.clone(),
                state: format!("{:?}", status.map(|s| s.state).unwrap_or_default()),
                pod: status.and_then(|s| s.pod.clone()),
                bytes_sent: status.map_or(0, |s| s.bytes_sent),
                bytes_received: status.map_or(0, |s| s.bytes_received),
                open_connections: status.map_or(0, |s| s.open_connections),
                created_unix: tube.created_unix.unwrap_or(now_unix),
                end_reason: status.and_then(|s| s.end_reason.clone()),
            }
        })
        .collect();
    newest_first(rows, |row| (row.created_unix, &row.name), MAX_TUBES_SHOWN)
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
    fn tubes_are_listed_newest_first_with_their_target_state_and_counts() {
        let tunnel: TubeSpec = serde_json::from_value(serde_json::json!({
            "pool": "edge", "conversationType": "tunnel", "target": { "host": "db.default.svc", "port": 5432 },
            "offer": "eA=="
        }))
        .unwrap();
        let socks: TubeSpec = serde_json::from_value(
            serde_json::json!({ "session": "s1", "conversationType": "socks5", "offer": "eA==" }),
        )
        .unwrap();
        let carrying: TubeStatus = serde_json::from_value(serde_json::json!({
            "state": "Connected", "pod": "edge-1", "bytesSent": 10, "bytesReceived": 20, "openConnections": 2
        }))
        .unwrap();
        let ended: TubeStatus =
            serde_json::from_value(serde_json::json!({ "state": "Failed", "endReason": "Refused" })).unwrap();
        let tubes = [
            TubeParts { name: "t-old", created_unix: Some(100), spec: &tunnel, status: Some(&carrying) },
            TubeParts { name: "t-new", created_unix: None, spec: &socks, status: Some(&ended) },
            TubeParts { name: "t-fresh", created_unix: Some(150), spec: &tunnel, status: None },
        ];
        let rows = tube_rows(&tubes, 200);
        let names: Vec<&str> = rows.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["t-new", "t-fresh", "t-old"]);
        assert_eq!(
            rows[2],
            TubeRow {
                name: "t-old".into(),
                kind: "tunnel".into(),
                target: Some("db.default.svc:5432".into()),
                pool: Some("edge".into()),
                state: "Connected".into(),
                pod: Some("edge-1".into()),
                bytes_sent: 10,
                bytes_received: 20,
                open_connections: 2,
                created_unix: 100,
                end_reason: None,
            }
        );
        assert_eq!((rows[0].kind.as_str(), rows[0].target.as_deref(), rows[0].pool.as_deref()), ("socks5", None, None));
        assert_eq!((rows[0].state.as_str(), rows[0].end_reason.as_deref()), ("Failed", Some("Refused")));
        assert_eq!((rows[1].state.as_str(), rows[1].pod.as_deref(), rows[1].bytes_sent), ("Pending", None, 0));
        let many: Vec<String> = (0..MAX_TUBES_SHOWN + 1).map(|i| format!("t{i}")).collect();
        let parts: Vec<TubeParts<'_>> =
            many.iter().map(|name| TubeParts { name, created_unix: Some(1), spec: &tunnel, status: None }).collect();
        assert_eq!(tube_rows(&parts, 2).len(), MAX_TUBES_SHOWN);
    }

    #[test]
    fn a_view_without_tubes_leaves_them_out_and_reads_back() {
        let hidden = ClusterView { namespace: "ns".into(), ..Default::default() };
        let text = serde_json::to_string(&hidden).unwrap();
        assert!(!text.contains("\"tubes\""), "{text}");
        assert_eq!(serde_json::from_str::<ClusterView>(&text).unwrap(), hidden);
        let shown = ClusterView { tubes: Some(Vec::new()), ..hidden };
        assert!(serde_json::to_string(&shown).unwrap().contains("\"tubes\":[]"));
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
