//! What the controllers share: the client, the caches, the operator's
//! memory, the fleet, and how to reach the pod index.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use tidepool_crds::{TestSession, WarmPool};

use crate::fleet::Fleet;
use crate::keys::Keys;
use crate::memory::Memory;
use crate::metrics::Metrics;
use crate::placement::Placement;
use crate::pod_index::PodIndex;
use crate::scope::Caches;

/// Settings the controllers act on.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Pods a pool creates in one pass at most.
    pub create_batch: u32,
    /// How long a finished session keeps its results before it is deleted.
    pub result_retention: Duration,
    /// The port a session pod serves on when its template names none.
    pub session_port: u16,
    /// The operator's URL as session pods reach it (`TIDEPOOL_OPERATOR_URL`
    /// in their environment), for posting results; None leaves it out.
    pub results_url: Option<String>,
    /// The cluster's pod and service ranges: session pods may not reach them
    /// unless their pool allows it.
    pub cluster_cidrs: Vec<String>,
    /// Fault injection for the restart tests: a pause between claiming a pod
    /// and writing the session's status, so a crash can land in between.
    pub fault_claim_delay: Option<Duration>,
}

/// State shared by the controllers of the leading replica.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub keys: Arc<Keys>,
    pub pods: Caches<Pod>,
    pub sessions: Caches<TestSession>,
    pub pools: Caches<WarmPool>,
    /// Every node: where pools with `nodeAssignment: Operator` put their pods.
    pub nodes: Store<Node>,
    /// The fallback when no agent reports for a pool's nodes.
    pub placement: Box<dyn Placement>,
    /// The live view of the backends, and the router.
    pub fleet: Arc<Fleet>,
    /// Reservations, bindings in flight, pacing: what this process remembers.
    pub memory: Memory,
    /// Claims by session, warm pods by pool, pods by node: from the pod watch.
    pub pod_index: Arc<Mutex<PodIndex>>,
    /// Monitors' calls to their runs' pods.
    pub monitor_http: reqwest::Client,
    /// Where ended sessions' results are stored, when a store is configured.
    pub exporter: Option<Arc<crate::export::Exporter>>,
}

impl Context {
    /// Reads the pod index. A poisoned lock still holds a sound index (`apply`
    /// cannot panic half way), and the operator's one rule for a poisoned
    /// lock is to take it over: reading none would make every session claim
    /// a second pod.
    pub fn with_pod_index<T>(&self, read: impl FnOnce(&PodIndex) -> T) -> T {
        read(&self.pod_index.lock().unwrap_or_else(PoisonError::into_inner))
    }
}
