//! What every controller and the API share.

use std::collections::{HashMap, HashSet};

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use tidepool_crds::{TestSession, WarmPool};

use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::placement::Placement;

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
    /// Fault injection for the restart tests: a pause between claiming a pod
    /// and writing the session's status, so a crash can land in between.
    pub fault_claim_delay: Option<Duration>,
}

/// The shortest time between two full passes over one pool. Under load
/// every pod and session event triggers the pool, and a pass reads every
/// pod it owns: unbounded, the passes run back to back and take a growing
/// share of a core as the pool's assigned pods pile up.
pub const POOL_PASS_INTERVAL: Duration = Duration::from_millis(100);

/// The shortest time between two looks over one pool's held pods for
/// sessions that are gone.
pub const ORPHAN_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// How long a claimed pod stays reserved, and a created pod counts as in
/// flight: far longer than the cache lags.
pub const CACHE_LAG_LIMIT: Duration = Duration::from_secs(30);

/// A binding this process made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub pod: String,
    /// The session's Ready status naming this pod is written.
    pub ready: bool,
}

/// State shared by the controllers of the leading replica.
pub struct Context {
    pub client: Client,
    pub settings: Settings,
    pub metrics: std::sync::Arc<Metrics>,
    pub recorder: Recorder,
    pub keys: std::sync::Arc<Keys>,
    pub pods: Store<Pod>,
    pub sessions: Store<TestSession>,
    pub pools: Store<WarmPool>,
    /// Every node: where pools with `nodeAssignment: Operator` put their pods.
    pub nodes: Store<Node>,
    /// The fallback when no agent reports for a pool's nodes.
    pub placement: Box<dyn Placement>,
    /// The live view of the backends, and the router.
    pub fleet: std::sync::Arc<crate::fleet::Fleet>,
    /// Pods a binding has chosen, so two sessions never pick the same pod
    /// from the cache. A failed claim frees its pod at once; a claimed pod
    /// stays reserved until the cache has surely caught up.
    pub reserved: Mutex<HashMap<String, Instant>>,
    /// When each pool's status was last written, by pool UID.
    pub status_written: Mutex<HashMap<String, Instant>>,
    /// When each pool's last full pass started, by pool UID.
    pub pool_passes: Mutex<HashMap<String, Instant>>,
    /// When each pool's held pods were last looked over, by pool UID.
    pub orphan_sweeps: Mutex<HashMap<String, Instant>>,
    /// Pods each pool created that the cache has not shown yet, with when,
    /// by pool UID, so a pool never creates twice for the same gap.
    pub expected: Mutex<HashMap<String, HashMap<String, Instant>>>,
    /// Bindings this process made, by session UID: the pod, and whether the
    /// session's Ready status is written. The caches can lag our own writes;
    /// this keeps a quick second pass from claiming a second pod or writing
    /// the same status twice.
    pub bindings: Mutex<HashMap<String, Binding>>,
    /// Sessions still binding, by UID: when this process first saw each and
    /// the API writes it has made for it.
    pub binding_progress: Mutex<HashMap<String, Progress>>,
    /// Claims by session, warm pods by pool, pods by node: from the pod watch.
    pub pod_index: std::sync::Arc<Mutex<crate::pod_index::PodIndex>>,
}

impl Context {
    /// Reads the pod index. A poisoned lock still holds a sound index
    /// (`apply` cannot panic half way); reading none would make every
    /// session claim a second pod.
    pub fn with_pod_index<T>(&self, read: impl FnOnce(&crate::pod_index::PodIndex) -> T) -> T {
        read(&self.pod_index.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// How long to wait before the next full pass over pool `uid`; None when
    /// one may run now (and it is recorded as started).
    pub fn pool_pass_wait(&self, uid: &str) -> Option<Duration> {
        pace(&self.pool_passes, uid, POOL_PASS_INTERVAL)
    }

    /// How long until pool `uid`'s held pods may be looked over for gone
    /// sessions again; None when now (and it is recorded as done).
    pub fn orphan_sweep_wait(&self, uid: &str) -> Option<Duration> {
        pace(&self.orphan_sweeps, uid, ORPHAN_SWEEP_INTERVAL)
    }

    /// Reserves `pod` (namespace/name) for a binding; false if it already is.
    pub fn reserve(&self, pod: &str) -> bool {
        let Ok(mut reserved) = self.reserved.lock() else { return false };
        if reserved.len() >= 10_000 {
            reserved.retain(|_, at| at.elapsed() < CACHE_LAG_LIMIT);
        }
        match reserved.get(pod) {
            Some(at) if at.elapsed() < CACHE_LAG_LIMIT => false,
            _ => {
                reserved.insert(pod.to_string(), Instant::now());
                true
            }
        }
    }

    /// Frees a pod whose claim failed.
    pub fn release(&self, pod: &str) {
        if let Ok(mut r) = self.reserved.lock() {
            r.remove(pod);
        }
    }

    pub fn is_reserved(&self, pod: &str) -> bool {
        self.reserved.lock().map(|r| r.get(pod).is_some_and(|at| at.elapsed() < CACHE_LAG_LIMIT)).unwrap_or(true)
    }

    /// The binding this process made for session `uid`, if it remembers one.
    pub fn binding(&self, uid: &str) -> Option<Binding> {
        self.bindings.lock().ok().and_then(|b| b.get(uid).cloned())
    }

    /// Remembers a binding; forgets those of sessions that are gone once
    /// the memory grows large.
    pub fn remember(&self, uid: &str, binding: Binding) {
        let Ok(mut bindings) = self.bindings.lock() else { return };
        if bindings.len() >= 10_000 {
            let live: std::collections::HashSet<String> =
                self.sessions.state().iter().filter_map(|s| kube::ResourceExt::uid(s.as_ref())).collect();
            bindings.retain(|uid, _| live.contains(uid));
        }
        bindings.insert(uid.to_string(), binding);
    }

    pub fn forget(&self, uid: &str) {
        if let Ok(mut bindings) = self.bindings.lock() {
            bindings.remove(uid);
        }
    }

    /// Notes that this process sees session `session_uid` still binding; the
    /// first sight starts its create-to-Ready clock. Sessions that end before
    /// they are Ready never take their entry, so a large map drops the gone ones.
    pub fn binding_seen(&self, session_uid: &str) {
        self.with_progress(session_uid, |_| ());
    }

    /// Counts one API write for a session.
    pub fn count_write(&self, session_uid: &str) {
        self.with_progress(session_uid, |progress| progress.writes += 1);
    }

    fn with_progress(&self, session_uid: &str, change: impl FnOnce(&mut Progress)) {
        let Ok(mut progress) = self.binding_progress.lock() else { return };
        if progress.len() >= 10_000 {
            let live: HashSet<String> =
                self.sessions.state().iter().filter_map(|s| kube::ResourceExt::uid(s.as_ref())).collect();
            progress.retain(|uid, _| live.contains(uid));
        }
        let entry = progress
            .entry(session_uid.to_string())
            .or_insert_with(|| Progress { first_seen: Instant::now(), writes: 0 });
        change(entry);
    }

    /// A session's progress, forgetting it: it is Ready.
    pub fn take_progress(&self, session_uid: &str) -> Option<Progress> {
        self.binding_progress.lock().ok().and_then(|mut p| p.remove(session_uid))
    }
}

/// One session's way to Ready, as this process sees it.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub first_seen: Instant,
    pub writes: u32,
}

/// Paces something done per key: how long until it may run again, or None
/// when it may run now (and it is recorded as run).
fn pace(last_runs: &Mutex<HashMap<String, Instant>>, key: &str, interval: Duration) -> Option<Duration> {
    let Ok(mut last_runs) = last_runs.lock() else { return None };
    let now = Instant::now();
    if let Some(last) = last_runs.get(key) {
        let since = now.saturating_duration_since(*last);
        if since < interval {
            return Some(interval - since);
        }
    }
    if last_runs.len() >= 10_000 {
        last_runs.retain(|_, at| now.saturating_duration_since(*at) < Duration::from_secs(60));
    }
    last_runs.insert(key.to_string(), now);
    None
}
