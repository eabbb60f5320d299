//! Wiring: caches, the two controllers, and the lease that decides who runs them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tidepool_crds::{TestSession, WarmPool};

use crate::claims::ClaimIndex;
use crate::context::{Context, Settings};
use crate::error::Error;
use crate::fleet::Fleet;
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::placement::Spread;
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

    // One cache of each kind, read by both controllers.
    let (pods, pods_writer) = reflector::store();
    let (sessions, sessions_writer) = reflector::store();
    let (pools, pools_writer) = reflector::store();
    let claims = Arc::new(Mutex::new(ClaimIndex::default()));
    let claims_writer = claims.clone();
    let pod_cache = reflector::reflector(pods_writer, watcher(pods_api.clone(), pod_selector.clone()))
        .default_backoff()
        .for_each(move |event| {
            if let Ok(event) = event {
                claims_writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).apply(&event);
            }
            async {}
        });
    let session_cache = reflector::reflector(sessions_writer, watcher(sessions_api.clone(), Default::default()))
        .default_backoff()
        .touched_objects()
        .for_each(|_| async {});
    let pool_cache = reflector::reflector(pools_writer, watcher(pools_api.clone(), Default::default()))
        .default_backoff()
        .touched_objects()
        .for_each(|_| async {});
    tokio::spawn(pod_cache);
    tokio::spawn(session_cache);
    tokio::spawn(pool_cache);
    for (name, ready) in [
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
        placement: Box::new(Spread),
        fleet,
        reserved: Mutex::new(HashMap::new()),
        status_written: Mutex::new(HashMap::new()),
        pool_passes: Mutex::new(HashMap::new()),
        expected: Mutex::new(HashMap::new()),
        bindings: Mutex::new(HashMap::new()),
        writes: Mutex::new(HashMap::new()),
        claims,
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
    tokio::join!(pool_controller, session_controller);
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
