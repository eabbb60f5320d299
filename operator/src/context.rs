//! What every controller and the API share.

use std::collections::{HashMap, HashSet};

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
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
    /// Pods each pool created that the cache has not shown yet, with when,
    /// by pool UID, so a pool never creates twice for the same gap.
    pub expected: Mutex<HashMap<String, HashMap<String, Instant>>>,
    /// Bindings this process made, by session UID: the pod, and whether the
    /// session's Ready status is written. The caches can lag our own writes;
    /// this keeps a quick second pass from claiming a second pod or writing
    /// the same status twice.
    pub bindings: Mutex<HashMap<String, Binding>>,
    /// API writes made for each session still binding, by session UID.
    pub writes: Mutex<HashMap<String, u32>>,
    /// The pods claimed for each session, from the pod watch.
    pub claims: std::sync::Arc<Mutex<crate::claims::ClaimIndex>>,
}

impl Context {
    /// How long to wait before the next full pass over pool `uid`; None when
    /// one may run now (and it is recorded as started).
    pub fn pool_pass_wait(&self, uid: &str) -> Option<Duration> {
        let Ok(mut passes) = self.pool_passes.lock() else { return None };
        let now = Instant::now();
        if let Some(last) = passes.get(uid) {
            let since = now.saturating_duration_since(*last);
            if since < POOL_PASS_INTERVAL {
                return Some(POOL_PASS_INTERVAL - since);
            }
        }
        if passes.len() >= 10_000 {
            passes.retain(|_, at| now.saturating_duration_since(*at) < Duration::from_secs(60));
        }
        passes.insert(uid.to_string(), now);
        None
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

    /// Counts one API write for a session. Sessions that end before they are
    /// Ready never take their count, so a large map drops the gone ones.
    pub fn count_write(&self, session_uid: &str) {
        let Ok(mut writes) = self.writes.lock() else { return };
        if writes.len() >= 10_000 {
            let live: HashSet<String> =
                self.sessions.state().iter().filter_map(|s| kube::ResourceExt::uid(s.as_ref())).collect();
            writes.retain(|uid, _| live.contains(uid));
        }
        *writes.entry(session_uid.to_string()).or_default() += 1;
    }

    /// The writes counted for a session, forgetting them.
    pub fn take_writes(&self, session_uid: &str) -> u32 {
        self.writes.lock().ok().and_then(|mut w| w.remove(session_uid)).unwrap_or(0)
    }
}
