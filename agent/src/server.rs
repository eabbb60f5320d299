//! `/metrics` and `/healthz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tidepool_serve::Limits;
use tokio::net::TcpListener;

use crate::metrics::Metrics;

/// The sampler's heartbeat: `/healthz` fails when it stops.
#[derive(Debug)]
pub struct Heartbeat {
    start: Instant,
    /// Milliseconds after `start` of the last beat.
    last_ms: AtomicU64,
    /// How long without a beat means the sampler is stuck.
    stale_after: Duration,
}

impl Heartbeat {
    /// Beats count as alive for `stale_after`; it starts alive.
    pub fn new(stale_after: Duration) -> Heartbeat {
        Heartbeat { start: Instant::now(), last_ms: AtomicU64::new(0), stale_after }
    }

    pub fn beat(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn alive(&self) -> bool {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last) <= self.stale_after
    }
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    heartbeat: Arc<Heartbeat>,
}

pub fn router(metrics: Arc<Metrics>, heartbeat: Arc<Heartbeat>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .with_state(AppState { metrics, heartbeat })
}

/// Serves within `limits`, counting what they cut, until the process ends.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, heartbeat: Arc<Heartbeat>, limits: Limits) {
    let refusals = metrics.clone();
    tidepool_serve::Server::new(limits)
        .on_refusal(move |refusal| refusals.connection_refused(refusal.reason()))
        .serve(listener, router(metrics, heartbeat), std::future::pending())
        .await;
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    let mut body = Vec::with_capacity(8 * 1024);
    match state.metrics.encode(&mut body) {
        Ok(()) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

async fn healthz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.heartbeat.alive() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the sampler has stopped")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_goes_stale() {
        let heartbeat = Heartbeat::new(Duration::from_millis(20));
        assert!(heartbeat.alive());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!heartbeat.alive());
        heartbeat.beat();
        assert!(heartbeat.alive());
    }
}
