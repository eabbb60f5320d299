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
pub mod probe;
pub mod status;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

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

    /// Runs `f` on the router. A poisoned lock (a panic while held) still
    /// holds consistent data: every change to it is a single assignment.
    pub fn with_router<T>(&self, f: impl FnOnce(&mut Router) -> T) -> T {
        let mut router = self.router.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut router)
    }
}
