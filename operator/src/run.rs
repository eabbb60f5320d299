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

use crate::context::{Context, Settings};
use crate::error::Error;
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::placement::Spread;
use crate::{labels, pool, session};

/// Runs both controllers until one of them stops (they stop on a shutdown signal).
pub async fn controllers(client: Client, settings: Settings, metrics: Arc<Metrics>, keys: Arc<Keys>, identity: &str) {
    let pods_api: Api<Pod> = Api::all(client.clone());
    let sessions_api: Api<TestSession> = Api::all(client.clone());
    let pools_api: Api<WarmPool> = Api::all(client.clone());
    let pod_selector = watcher::Config::default().labels(labels::POOL);

    // One watch per kind. Each feeds a cache (read by both controllers) and
    // fans its events out to the controllers that subscribe to it.
    let (pods, pods_writer) = reflector::store_shared(FAN_OUT_BUFFER);
    let (sessions, sessions_writer) = reflector::store_shared(FAN_OUT_BUFFER);
    let (pools, pools_writer) = reflector::store_shared(FAN_OUT_BUFFER);
    let subscribe = "a shared store can always be subscribed to";
    let (pods_for_pools, pods_for_sessions) =
        (pods_writer.subscribe().expect(subscribe), pods_writer.subscribe().expect(subscribe));
    let (sessions_for_pools, sessions_trigger) =
        (sessions_writer.subscribe().expect(subscribe), sessions_writer.subscribe().expect(subscribe));
    let pools_trigger = pools_writer.subscribe().expect(subscribe);
    tokio::spawn(watcher(pods_api, pod_selector).default_backoff().reflect_shared(pods_writer).for_each(|_| async {}));
    tokio::spawn(
        watcher(sessions_api, Default::default())
            .default_backoff()
            .reflect_shared(sessions_writer)
            .for_each(|_| async {}),
    );
    tokio::spawn(
        watcher(pools_api, Default::default()).default_backoff().reflect_shared(pools_writer).for_each(|_| async {}),
    );
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
        pods,
        sessions: sessions.clone(),
        pools: pools.clone(),
        placement: Box::new(Spread),
        reserved: Mutex::new(HashMap::new()),
        status_written: Mutex::new(HashMap::new()),
        expected: Mutex::new(HashMap::new()),
        bindings: Mutex::new(HashMap::new()),
        writes: Mutex::new(HashMap::new()),
    });

    let pool_controller = Controller::for_shared_stream(pools_trigger, pools.clone())
        .owns_shared_stream(pods_for_pools)
        .watches_shared_stream(sessions_for_pools, |s: Arc<TestSession>| {
            Some(ObjectRef::<WarmPool>::new(&s.spec.pool).within(&s.namespace().unwrap_or_default()))
        })
        .shutdown_on_signal()
        .run(timed("warmpool", pool::reconcile, metrics.clone()), pool::error_policy, ctx.clone())
        .for_each(|_| async {});
    let waiting = sessions.clone();
    let session_controller = Controller::for_shared_stream(sessions_trigger, sessions)
        .watches_shared_stream(pods_for_sessions, move |pod: Arc<Pod>| session::sessions_for_pod(&pod, &waiting))
        .shutdown_on_signal()
        .run(timed("testsession", session::reconcile, metrics.clone()), session::error_policy, ctx)
        .for_each(|_| async {});
    tokio::join!(pool_controller, session_controller);
}

/// Events a slow controller may fall behind its watch by before the watch waits.
const FAN_OUT_BUFFER: usize = 4096;

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
