//! Wiring for the leading replica: the caches and the two controllers, each
//! a supervised task.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tidepool_crds::{TestSession, WarmPool};

use crate::clock::SystemClock;
use crate::context::{Context, Settings};
use crate::error::Error;
use crate::fleet::Fleet;
use crate::keys::Keys;
use crate::memory::Memory;
use crate::metrics::Metrics;
use crate::placement::Spread;
use crate::pod_index::PodIndex;
use crate::supervisor::Supervisor;
use crate::{labels, pool, session};

/// The clients the controllers use.
#[derive(Clone)]
pub struct Clients {
    /// For watches: no read timeout, as a quiet watch may send nothing for minutes.
    pub watch: Client,
    /// For reads and writes: every request bounded.
    pub request: Client,
}

/// Starts the caches and both controllers under `supervisor`.
pub fn start(
    supervisor: &mut Supervisor,
    clients: Clients,
    settings: Settings,
    metrics: Arc<Metrics>,
    keys: Arc<Keys>,
    fleet: Arc<Fleet>,
    identity: &str,
) {
    let pods_api: Api<Pod> = Api::all(clients.watch.clone());
    let sessions_api: Api<TestSession> = Api::all(clients.watch.clone());
    let pools_api: Api<WarmPool> = Api::all(clients.watch.clone());
    let pod_selector = watcher::Config::default().labels(labels::POOL);

    // One cache of each kind, read by both controllers. Each controller also
    // has its own watches for its triggers: kube-runtime's shared streams
    // (one watch per kind) pass no deletions on and can stall a subscriber
    // whose object went meanwhile, and in our runs they bought no speed.
    let (pods, pods_writer) = reflector::store();
    let pod_index = Arc::new(Mutex::new(PodIndex::default()));
    let index_writer = pod_index.clone();
    // The index takes each event just before the pod cache does.
    let pod_events = watcher(pods_api.clone(), pod_selector.clone()).default_backoff().map(move |event| {
        if let Ok(event) = &event {
            index_writer.lock().unwrap_or_else(PoisonError::into_inner).apply(event);
        }
        event
    });
    supervisor.spawn("pod-cache", reflector::reflector(pods_writer, pod_events).for_each(|_| async {}));
    let sessions = cache(supervisor, "session-cache", sessions_api.clone());
    let pools = cache(supervisor, "pool-cache", pools_api.clone());
    // Nodes are only read (by pools that place their own pods), so their
    // cache triggers nothing.
    let nodes = cache(supervisor, "node-cache", Api::<Node>::all(clients.watch.clone()));

    let reporter = Reporter { controller: labels::MANAGER.into(), instance: Some(identity.to_string()) };
    let ctx = Arc::new(Context {
        client: clients.request.clone(),
        settings,
        metrics: metrics.clone(),
        recorder: Recorder::new(clients.request.clone(), reporter),
        keys,
        pods: pods.clone(),
        sessions: sessions.clone(),
        pools: pools.clone(),
        nodes: nodes.clone(),
        placement: Box::new(Spread),
        fleet,
        memory: Memory::new(Arc::new(SystemClock)),
        pod_index,
    });

    // A controller polls all its reconciles inside one task. Giving each
    // controller its own task lets a long pool pass and session binding run
    // on both cores.
    // One wait, shared: kube's store readiness wakes only one waiter.
    let synced = {
        let (pods, sessions, pools, nodes) = (pods.clone(), sessions.clone(), pools.clone(), nodes.clone());
        async move { caches_synced(&pods, &sessions, &pools, &nodes).await }.boxed().shared()
    };
    let pool_ctx = ctx.clone();
    let pool_metrics = metrics.clone();
    let pool_synced = synced.clone();
    let (pool_pods, pool_sessions) = (pods_api.clone(), sessions_api.clone());
    let pool_selector = pod_selector.clone();
    supervisor.spawn("warmpool-controller", async move {
        if !pool_synced.await {
            return;
        }
        Controller::new(pools_api, Default::default())
            .owns(pool_pods, pool_selector)
            .watches(pool_sessions, Default::default(), |s: TestSession| {
                Some(ObjectRef::<WarmPool>::new(&s.spec.pool).within(&s.namespace().unwrap_or_default()))
            })
            .run(timed("warmpool", pool::reconcile, pool_metrics), pool::error_policy, pool_ctx)
            .for_each(|_| async {})
            .await;
    });
    supervisor.spawn("testsession-controller", async move {
        if !synced.await {
            return;
        }
        let sessions_for_pods = sessions.clone();
        Controller::new(sessions_api, Default::default())
            .watches(pods_api, pod_selector, move |pod: Pod| session::sessions_for_pod(&pod, &sessions_for_pods))
            .run(timed("testsession", session::reconcile, metrics), session::error_policy, ctx)
            .for_each(|_| async {})
            .await;
    });
}

/// A cache of every object of a kind, kept by a supervised task.
fn cache<K>(supervisor: &mut Supervisor, name: &'static str, api: Api<K>) -> Store<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, Default::default())).default_backoff();
    supervisor.spawn(name, stream.for_each(|_| async {}));
    store
}

/// Waits until every cache has listed once; false (logged) if one never will.
async fn caches_synced(
    pods: &Store<Pod>,
    sessions: &Store<TestSession>,
    pools: &Store<WarmPool>,
    nodes: &Store<Node>,
) -> bool {
    for (name, ready) in [
        ("nodes", nodes.wait_until_ready().await.is_ok()),
        ("pods", pods.wait_until_ready().await.is_ok()),
        ("sessions", sessions.wait_until_ready().await.is_ok()),
        ("pools", pools.wait_until_ready().await.is_ok()),
    ] {
        if !ready {
            tracing::error!(cache = name, "cache never synced");
            return false;
        }
    }
    true
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
