//! Wiring: the caches every replica keeps, and, on the leading replica, the
//! leader's caches and the two controllers; each a supervised task.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Client, ResourceExt};
use tidepool_crds::{Backend, Monitor, TestSession, Tube, WarmPool};

use crate::clock::SystemClock;
use crate::context::{Context, Settings};
use crate::creators::Creators;
use crate::error::Error;
use crate::fleet::Fleet;
use crate::keys::Keys;
use crate::memory::Memory;
use crate::metrics::Metrics;
use crate::placement::Spread;
use crate::pod_index::PodIndex;
use crate::scope::{self, Caches, Scope};
use crate::supervisor::Supervisor;
use crate::{labels, monitor, pool, session, tube};

/// The clients the controllers use.
#[derive(Clone)]
pub struct Clients {
    /// For watches: no read timeout, as a quiet watch may send nothing for minutes.
    pub watch: Client,
    /// For reads and writes: every request bounded.
    pub request: Client,
}

/// The caches every replica keeps, leading or not: the HTTP API reads them
/// (which pools exist, whose sessions are live), and the leader's
/// controllers share them.
#[derive(Clone)]
pub struct Shared {
    pub pools: Caches<WarmPool>,
    pub sessions: Caches<TestSession>,
    /// Live sessions per creator, kept by the session watch.
    pub creators: Creators,
    /// Backends and Nodes, for agent reports (cluster-scoped, few).
    pub backends: Store<Backend>,
    pub nodes: Store<Node>,
    /// Tubes: the cluster view lists them, the tube controller's triggers
    /// read them (which tubes ride a session), and the gauges count them.
    pub tubes: Caches<Tube>,
}

/// Starts the caches of pools and sessions under `supervisor`. The session
/// watch also keeps the per-creator index and teaches `fleet`'s router the
/// sessions' sticky keys.
pub fn shared_caches(supervisor: &mut Supervisor, scope: &Scope, client: &Client, fleet: &Arc<Fleet>) -> Shared {
    let creators = Creators::default();
    let (tap, fleet) = (creators.clone(), fleet.clone());
    let sessions = scope::watch(supervisor, scope, client, "session-cache", Default::default(), move |watch, event| {
        tap.apply(watch, event);
        fleet.learn_from(event);
    });
    Shared {
        pools: scope::watch(supervisor, scope, client, "pool-cache", Default::default(), |_, _| {}),
        sessions,
        creators,
        backends: scope::watch_cluster(supervisor, client, "backend-cache"),
        nodes: scope::watch_cluster(supervisor, client, "node-cache"),
        tubes: scope::watch(supervisor, scope, client, "tube-cache", Default::default(), |_, _| {}),
    }
}

/// What the controllers run with, beside the caches.
pub struct Parts {
    /// For monitors' calls to their runs' pods.
    pub monitor_http: reqwest::Client,
    pub exporter: Option<Arc<crate::export::Exporter>>,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub keys: Arc<Keys>,
    pub fleet: Arc<Fleet>,
    pub identity: String,
}

/// Starts the leader's caches (pods with their index, nodes) and both
/// controllers, once per namespace of `scope`, under `supervisor`.
pub fn start(supervisor: &mut Supervisor, scope: &Scope, clients: Clients, shared: Shared, parts: Parts) {
    let pod_selector = watcher::Config::default().labels(labels::POOL);
    // The index takes each event just before the pod cache does.
    let pod_index = Arc::new(Mutex::new(PodIndex::default()));
    let index_writer = pod_index.clone();
    let index = move |watch: Option<&str>, event: &watcher::Event<Pod>| {
        index_writer.lock().unwrap_or_else(PoisonError::into_inner).apply(watch, event);
    };
    let pods = scope::watch(supervisor, scope, &clients.watch, "pod-cache", pod_selector.clone(), index);
    // Nodes are only read (by pools that place their own pods), so their
    // cache triggers nothing.
    let nodes = shared.nodes.clone();

    let reporter = Reporter { controller: labels::MANAGER.into(), instance: Some(parts.identity.clone()) };
    let ctx = Arc::new(Context {
        client: clients.request.clone(),
        settings: parts.settings,
        metrics: parts.metrics.clone(),
        recorder: Recorder::new(clients.request.clone(), reporter),
        keys: parts.keys,
        pods: pods.clone(),
        sessions: shared.sessions.clone(),
        pools: shared.pools.clone(),
        nodes: nodes.clone(),
        placement: Box::new(Spread),
        fleet: parts.fleet,
        memory: Memory::new(Arc::new(SystemClock)),
        pod_index,
        monitor_http: parts.monitor_http,
        exporter: parts.exporter.clone(),
    });
    if parts.exporter.is_some() {
        let (sessions, metrics) = (shared.sessions.clone(), parts.metrics.clone());
        supervisor.spawn("export-backlog", crate::export::watch_backlog(sessions, metrics));
    }

    // The leader alone counts the tube gauges, as it alone writes tubes.
    let tubes = shared.tubes.clone();
    supervisor.spawn("tube-gauges", tube::keep_gauges(tubes.clone(), parts.metrics.clone()));
    // One wait, shared: kube's store readiness wakes only one waiter.
    let synced = {
        let (pods, sessions, pools, nodes, tubes) =
            (pods.clone(), shared.sessions.clone(), shared.pools.clone(), nodes.clone(), tubes.clone());
        async move {
            let caches = [
                ("pods", pods.ready().await),
                ("sessions", sessions.ready().await),
                ("pools", pools.ready().await),
                ("tubes", tubes.ready().await),
            ];
            let nodes = ("nodes", nodes.wait_until_ready().await.is_ok());
            match caches.into_iter().chain([nodes]).find(|(_, ready)| !ready) {
                Some((cache, _)) => {
                    tracing::error!(cache, "cache never synced");
                    false
                }
                None => true,
            }
        }
        .boxed()
        .shared()
    };
    // A controller polls all its reconciles inside one task. Giving each
    // controller its own task lets a long pool pass and session binding run
    // on both cores.
    let (pods_apis, sessions_apis, pools_apis, monitors_apis, tubes_apis) = (
        scope.apis::<Pod>(&clients.watch),
        scope.apis::<TestSession>(&clients.watch),
        scope.apis::<WarmPool>(&clients.watch),
        scope.apis::<Monitor>(&clients.watch),
        scope.apis::<Tube>(&clients.watch),
    );
    for (((((namespace, pods_api), (_, sessions_api)), (_, pools_api)), (_, monitors_api)), (_, tubes_api)) in
        pods_apis.into_iter().zip(sessions_apis).zip(pools_apis).zip(monitors_apis).zip(tubes_apis)
    {
        let suffix = namespace.map(|ns| format!("/{ns}")).unwrap_or_default();
        let (pool_ctx, pool_synced, pool_metrics) = (ctx.clone(), synced.clone(), parts.metrics.clone());
        let (pool_pods, pool_sessions, selector) = (pods_api.clone(), sessions_api.clone(), pod_selector.clone());
        supervisor.spawn(format!("warmpool-controller{suffix}"), async move {
            if !pool_synced.await {
                return;
            }
            Controller::new(pools_api, Default::default())
                .owns(pool_pods, selector)
                .watches(pool_sessions, Default::default(), |s: TestSession| {
                    Some(ObjectRef::<WarmPool>::new(&s.spec.pool).within(&s.namespace().unwrap_or_default()))
                })
                .run(timed("warmpool", pool::reconcile, pool_metrics), pool::error_policy, pool_ctx)
                .for_each(|_| async {})
                .await;
        });
        // Monitors: each run is a session the monitor owns; a change to one wakes its monitor.
        let (monitor_ctx, monitor_synced, monitor_metrics) = (ctx.clone(), synced.clone(), parts.metrics.clone());
        let monitor_sessions = sessions_api.clone();
        supervisor.spawn(format!("monitor-controller{suffix}"), async move {
            if !monitor_synced.await {
                return;
            }
            Controller::new(monitors_api, Default::default())
                .owns(monitor_sessions, watcher::Config::default().labels(labels::MONITOR))
                .run(timed("monitor", monitor::reconcile, monitor_metrics), monitor::error_policy, monitor_ctx)
                .for_each(|_| async {})
                .await;
        });
        // Tubes: a change to the session a tube rides (its own, or the one it
        // names) wakes the tube.
        let (tube_ctx, tube_synced, tube_metrics) = (ctx.clone(), synced.clone(), parts.metrics.clone());
        let (tube_sessions, tubes_for_sessions) = (sessions_api.clone(), tubes.clone());
        supervisor.spawn(format!("tube-controller{suffix}"), async move {
            if !tube_synced.await {
                return;
            }
            Controller::new(tubes_api, Default::default())
                .watches(tube_sessions, Default::default(), move |s: TestSession| {
                    tube::tubes_for_session(&s, &tubes_for_sessions)
                })
                .run(timed("tube", tube::reconcile, tube_metrics), tube::error_policy, tube_ctx)
                .for_each(|_| async {})
                .await;
        });
        let (session_ctx, session_synced, session_metrics) = (ctx.clone(), synced.clone(), parts.metrics.clone());
        let (sessions_for_pods, selector) = (shared.sessions.clone(), pod_selector.clone());
        supervisor.spawn(format!("testsession-controller{suffix}"), async move {
            if !session_synced.await {
                return;
            }
            Controller::new(sessions_api, Default::default())
                .watches(pods_api, selector, move |pod: Pod| session::sessions_for_pod(&pod, &sessions_for_pods))
                .run(timed("testsession", session::reconcile, session_metrics), session::error_policy, session_ctx)
                .for_each(|_| async {})
                .await;
        });
    }
}

/// What a wrapped reconcile returns.
type ReconcileFuture = std::pin::Pin<Box<dyn Future<Output = Result<kube::runtime::controller::Action, Error>> + Send>>;

/// Wraps a reconcile with its count, duration and error metrics.
fn timed<K, F, Fut>(
    controller: &'static str,
    reconcile: F,
    metrics: Arc<Metrics>,
) -> impl Fn(Arc<K>, Arc<Context>) -> ReconcileFuture
where
    K: Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Context>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Result<kube::runtime::controller::Action, Error>> + Send + 'static,
{
    move |object, ctx| {
        let reconcile = reconcile.clone();
        let metrics = metrics.clone();
        Box::pin(async move {
            let start = Instant::now();
            let result = reconcile(object, ctx).await;
            metrics.reconciles.with_label_values(&[controller]).inc();
            metrics.reconcile_duration.with_label_values(&[controller]).observe(start.elapsed().as_secs_f64());
            if let Err(e) = &result {
                metrics.reconcile_errors.with_label_values(&[controller, e.kind()]).inc();
                tracing::warn!(controller, error = %e, "reconcile failed");
            }
            result
        })
    }
}
