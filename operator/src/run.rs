//! Wiring: caches, the two controllers, and the lease that decides who runs them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tidepool_crds::{TestSession, WarmPool};

use crate::context::{Context, Settings};
use crate::error::Error;
use crate::fleet::Fleet;
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::placement::Spread;
use crate::pod_index::PodIndex;
use crate::{labels, pool, session};

/// Runs both controllers until one of them stops (they stop on a shutdown signal).
pub async fn controllers(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    keys: Arc<Keys>,
    fleet: Arc<Fleet>,
    identity: &str,
) {
    let pods_api: Api<Pod> = Api::all(client.clone());
    let sessions_api: Api<TestSession> = Api::all(client.clone());
    let pools_api: Api<WarmPool> = Api::all(client.clone());
    let pod_selector = watcher::Config::default().labels(labels::POOL);

    // One cache of each kind, read by both controllers. Each controller also
    // has its own watches for its triggers: kube-runtime's shared streams
    // (one watch per kind) pass no deletions on and can stall a subscriber
    // whose object went meanwhile, and in our runs they bought no speed.
    let (pods, pods_writer) = reflector::store();
    let (sessions, sessions_writer) = reflector::store();
    let (pools, pools_writer) = reflector::store();
    let pod_index = Arc::new(Mutex::new(PodIndex::default()));
    let index_writer = pod_index.clone();
    // The index takes each event just before the pod cache does.
    let pod_cache = reflector::reflector(
        pods_writer,
        watcher(pods_api.clone(), pod_selector.clone()).default_backoff().map(move |event| {
            if let Ok(event) = &event {
                index_writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).apply(event);
            }
            event
        }),
    )
    .for_each(|_| async {});
    let session_cache = reflector::reflector(sessions_writer, watcher(sessions_api.clone(), Default::default()))
        .default_backoff()
        .for_each(|_| async {});
    let pool_cache = reflector::reflector(pools_writer, watcher(pools_api.clone(), Default::default()))
        .default_backoff()
        .for_each(|_| async {});
    tokio::spawn(pod_cache);
    tokio::spawn(session_cache);
    tokio::spawn(pool_cache);
    // Nodes are only read (by pools that place their own pods), so their
    // cache triggers nothing.
    let (nodes, nodes_writer) = reflector::store();
    tokio::spawn(
        reflector::reflector(nodes_writer, watcher(Api::<Node>::all(client.clone()), Default::default()))
            .default_backoff()
            .for_each(|_| async {}),
    );
    for (name, ready) in [
        ("nodes", nodes.wait_until_ready().await.is_ok()),
        ("pods", pods.wait_until_ready().await.is_ok()),
        ("sessions", sessions.wait_until_ready().await.is_ok()),
        ("pools", pools.wait_until_ready().await.is_ok()),
    ] {
        if !ready {
            tracing::error!(cache = name, "cache never synced");
            return;
        }
    }

    let reporter = Reporter { controller: labels::MANAGER.into(), instance: Some(identity.to_string()) };
    let ctx = Arc::new(Context {
        client: client.clone(),
        settings,
        metrics: metrics.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        keys,
        pods: pods.clone(),
        sessions: sessions.clone(),
        pools,
        nodes,
        placement: Box::new(Spread),
        fleet,
        reserved: Mutex::new(HashMap::new()),
        status_written: Mutex::new(HashMap::new()),
        pool_passes: Mutex::new(HashMap::new()),
        orphan_sweeps: Mutex::new(HashMap::new()),
        expected: Mutex::new(HashMap::new()),
        bindings: Mutex::new(HashMap::new()),
        binding_progress: Mutex::new(HashMap::new()),
        pod_index,
    });

    let pool_controller = Controller::new(pools_api, Default::default())
        .owns(pods_api.clone(), pod_selector.clone())
        .watches(sessions_api.clone(), Default::default(), |s: TestSession| {
            Some(ObjectRef::<WarmPool>::new(&s.spec.pool).within(&s.namespace().unwrap_or_default()))
        })
        .shutdown_on_signal()
        .run(timed("warmpool", pool::reconcile, metrics.clone()), pool::error_policy, ctx.clone())
        .for_each(|_| async {});
    let sessions_for_pods = sessions.clone();
    let session_controller = Controller::new(sessions_api, Default::default())
        .watches(pods_api, pod_selector, move |pod: Pod| session::sessions_for_pod(&pod, &sessions_for_pods))
        .shutdown_on_signal()
        .run(timed("testsession", session::reconcile, metrics.clone()), session::error_policy, ctx)
        .for_each(|_| async {});
    // A controller polls all its reconciles inside one task. Giving each
    // controller its own task lets a long pool pass and session binding run
    // on both cores. Dropping this future (the lease was lost) stops both.
    let mut pools_task = AbortOnDrop(tokio::spawn(pool_controller));
    let mut sessions_task = AbortOnDrop(tokio::spawn(session_controller));
    let (first, rest) = tokio::select! {
        done = pools_task.finished() => (("warmpool", done), ("testsession", sessions_task)),
        done = sessions_task.finished() => (("testsession", done), ("warmpool", pools_task)),
    };
    match first {
        // Both stop on a shutdown signal: let the other finish too.
        (_, Ok(())) => {
            let (name, mut task) = rest;
            if let Err(error) = task.finished().await {
                tracing::error!(controller = name, %error, "a controller task failed");
            }
        }
        // One failed (it panicked): stop the other and return, so the
        // process ends and a healthy replica takes the lease.
        (name, Err(error)) => tracing::error!(controller = name, %error, "a controller task failed"),
    }
}

/// A spawned task that is aborted when its handle is dropped, so it never
/// outlives the future that started it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    async fn finished(&mut self) -> Result<(), tokio::task::JoinError> {
        (&mut self.0).await
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
