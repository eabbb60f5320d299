//! The fleet: node agents, the Backends they stand for, and the live view
//! placement reads.
//!
//! Agents push reports to whichever replica leads; the leader folds them
//! into the [`Router`](crate::placement::Router) in memory and writes a
//! Backend's status only when something significant changed or a refresh
//! is due, at a bounded rate across all Backends.
//!
//! - [`auth`]: who sent a report (TokenReview, cached).
//! - [`admission`]: which backend an agent may speak for (pure).
//! - [`status`]: what to write to each Backend and when (pure), and the writer.
//! - [`probe`]: TCP and HTTP health probes.
//! - [`daemonset`]: the agent DaemonSet the operator keeps.
//!
//! The HTTP routes that feed it (reports, routing) live in `http`.

pub mod admission;
pub mod auth;
pub mod daemonset;
pub mod geo;
pub mod probe;
pub mod status;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use kube::runtime::watcher::Event;
use tidepool_crds::TestSession;

use crate::placement::{Router, RouterSettings};

/// How the fleet behaves.
#[derive(Clone, Debug)]
pub struct FleetSettings {
    /// The namespace and ServiceAccount agents authenticate as.
    pub agent_namespace: String,
    pub agent_service_account: String,
    /// The audience agent tokens must carry.
    pub token_audience: String,
    /// A Backend's status is refreshed at least this often while it reports.
    pub status_refresh: Duration,
    /// Backend writes per second at most, over all Backends.
    pub writes_per_second: u32,
    /// Seconds between health probes, and a probe's timeout.
    pub probe_interval: Duration,
    pub probe_timeout: Duration,
    pub router: RouterSettings,
    /// Believe backends at loopback, link-local or unspecified addresses
    /// (the local harness's nodes are all at 127.0.0.1).
    pub allow_local_addresses: bool,
    /// Coordinates of the regions nodes are labelled with.
    pub regions: geo::RegionTable,
}

impl Default for FleetSettings {
    fn default() -> Self {
        Self {
            agent_namespace: "default".into(),
            agent_service_account: "tidepool-agent".into(),
            token_audience: "tidepool".into(),
            status_refresh: Duration::from_secs(300),
            writes_per_second: 5,
            probe_interval: Duration::from_secs(10),
            probe_timeout: Duration::from_secs(2),
            router: RouterSettings::default(),
            allow_local_addresses: false,
            regions: geo::RegionTable::default(),
        }
    }
}

/// What the API handlers and the fleet's tasks share.
pub struct Fleet {
    pub settings: FleetSettings,
    /// Held only for short, synchronous work: never across an await.
    pub router: Mutex<Router>,
    pub tokens: auth::TokenCache,
    /// Reports are taken only while this replica leads.
    leading: AtomicBool,
}

impl Fleet {
    pub fn new(settings: FleetSettings) -> Self {
        let router = Router::new(settings.router.clone());
        Self {
            settings,
            router: Mutex::new(router),
            tokens: auth::TokenCache::default(),
            leading: AtomicBool::new(false),
        }
    }

    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Relaxed);
    }

    pub fn is_leading(&self) -> bool {
        self.leading.load(Ordering::Relaxed)
    }

    /// Teaches the router the sticky key of a session the session watch
    /// shows, so keys survive a failover with no store but the sessions:
    /// every replica's router knows them before it leads.
    pub fn learn_from(&self, event: &Event<TestSession>) {
        let (Event::Apply(session) | Event::InitApply(session)) = event else { return };
        let Some(assignment) = StickyAssignment::of(session) else { return };
        let age = Timestamp::now().duration_since(assignment.assigned);
        let age = if age.is_negative() { Duration::ZERO } else { age.unsigned_abs() };
        // Older than the machine's clock can say: too old to matter.
        let Some(assigned) = Instant::now().checked_sub(age) else { return };
        self.with_router(|router| router.learn_sticky(assignment.key, assignment.backend, assigned));
    }

    /// Runs `f` on the router. A poisoned lock (a panic while held) still
    /// holds consistent data: every change to it is a single assignment.
    pub fn with_router<T>(&self, f: impl FnOnce(&mut Router) -> T) -> T {
        let mut router = self.router.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut router)
    }
}

/// A session's sticky key and the backend it was bound to, when.
#[derive(Debug, PartialEq)]
struct StickyAssignment<'a> {
    key: &'a str,
    backend: &'a str,
    assigned: Timestamp,
}

impl<'a> StickyAssignment<'a> {
    /// Only a session with a key that placement has bound to a backend has one.
    fn of(session: &'a TestSession) -> Option<Self> {
        let key = session.spec.sticky_key.as_deref()?;
        let status = session.status.as_ref()?;
        let backend = status.backend.as_deref()?;
        let assigned = status.assigned_at.as_ref()?.0;
        Some(Self { key, backend, assigned })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn session(sticky: Option<&str>, backend: Option<&str>, assigned: Option<i64>) -> TestSession {
        let mut session: TestSession = serde_json::from_value(serde_json::json!({
            "apiVersion": "tidepool.dev/v1alpha1", "kind": "TestSession",
            "metadata": { "name": "s", "namespace": "default" },
            "spec": { "pool": "p" },
            "status": {}
        }))
        .unwrap();
        session.spec.sticky_key = sticky.map(String::from);
        let status = session.status.get_or_insert_default();
        status.backend = backend.map(String::from);
        status.assigned_at = assigned.map(|s| Time(Timestamp::from_second(s).unwrap()));
        session
    }

    #[test]
    fn only_a_bound_session_with_a_key_teaches_one() {
        let bound = session(Some("user-1"), Some("node-2"), Some(1_000));
        let assignment = StickyAssignment::of(&bound).unwrap();
        assert_eq!((assignment.key, assignment.backend), ("user-1", "node-2"));
        assert_eq!(assignment.assigned, Timestamp::from_second(1_000).unwrap());
        assert_eq!(StickyAssignment::of(&session(None, Some("node-2"), Some(1_000))), None);
        assert_eq!(StickyAssignment::of(&session(Some("user-1"), None, Some(1_000))), None);
        assert_eq!(StickyAssignment::of(&session(Some("user-1"), Some("node-2"), None)), None);
    }

    #[test]
    fn the_watch_teaches_the_router() {
        let fleet = Fleet::new(FleetSettings::default());
        let an_hour_ago = Timestamp::now().as_second() - 3600;
        fleet.learn_from(&Event::InitApply(session(Some("user-1"), Some("node-2"), Some(an_hour_ago))));
        fleet.learn_from(&Event::Delete(session(Some("user-2"), Some("node-3"), Some(an_hour_ago))));
        fleet.learn_from(&Event::Apply(session(Some("user-1"), Some("node-1"), Some(an_hour_ago - 60))));
        fleet.with_router(|router| {
            assert_eq!(router.sticky_backend("user-1"), Some("node-2"));
            assert_eq!(router.sticky_backend("user-2"), None);
        });
        // A clock ahead of ours counts as now.
        fleet.learn_from(&Event::Apply(session(Some("user-1"), Some("node-3"), Some(an_hour_ago + 7200))));
        fleet.with_router(|router| assert_eq!(router.sticky_backend("user-1"), Some("node-3")));
    }
}
