//! Tidepool's node agent.
//!
//! It samples a backend (a Kubernetes node, or a server outside the cluster)
//! every tick: per-core CPU, memory, disk, network and GPUs. It keeps sliding
//! windows of those samples and sends the operator an
//! [`AgentReport`](tidepool_wire::report::AgentReport) on every report tick,
//! through a circuit breaker. It serves `/metrics` and `/healthz`.
//!
//! - [`config`]: flags and their checks.
//! - [`proc`], [`disk`], [`gpu`]: what is read, and how.
//! - [`window`]: sliding-window means; [`report`]: the report built from them.
//! - [`sampler`]: the tick loop; [`reporter`] and [`breaker`]: sending.
//! - [`metrics`], [`server`]: what Prometheus and probes see.

pub mod breaker;
pub mod config;
pub mod disk;
pub mod gpu;
pub mod metrics;
pub mod proc;
pub mod report;
pub mod reporter;
pub mod sampler;
pub mod server;
pub mod window;

use std::sync::Arc;

use thiserror::Error;
use tokio::net::TcpListener;
use tracing::info;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::reporter::Reporter;
use crate::sampler::{Outbox, Sampler};
use crate::server::Heartbeat;

/// What stops the agent. Everything else is logged and lived with.
#[derive(Debug, Error)]
pub enum AgentError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("cannot set up metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot set up the HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("cannot watch for signals: {0}")]
    Signal(std::io::Error),
    #[error("the {0} stopped on its own")]
    Stopped(&'static str),
}

/// Runs the agent until SIGTERM or SIGINT. Needs a Tokio runtime with
/// timers and I/O; one thread is plenty.
pub async fn run(config: Config) -> Result<(), AgentError> {
    use tokio::signal::unix::{SignalKind, signal};

    let listener =
        TcpListener::bind(config.listen).await.map_err(|source| AgentError::Listen { addr: config.listen, source })?;
    let kind = match config.identity.kind {
        tidepool_wire::report::ReportKind::Node => "node",
        tidepool_wire::report::ReportKind::External => "external",
    };
    let mut metrics = Metrics::new(&config.windows, &config.identity.backend, kind)?;
    let gpus = gpu::open(&config.gpu);
    metrics.set_gpus(gpus.gpus());
    let metrics = Arc::new(metrics);
    let heartbeat = Arc::new(Heartbeat::new(sampler::stale_after(config.tick())));
    let sampler = Sampler::new(&config, gpus, metrics.clone());
    let reporter = Reporter::new(&config, metrics.clone())?;
    let outbox = Outbox::default();
    let mut terminate = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    info!(
        backend = %config.identity.backend,
        kind,
        url = %config.report_url,
        listen = %config.listen,
        report_ms = config.report_interval.as_millis() as u64,
        tick_ms = config.tick().as_millis() as u64,
        "agent started"
    );
    tokio::select! {
        // None of these ends while the agent runs; one that does ends it.
        () = server::serve(listener, metrics.clone(), heartbeat.clone(), config.server_limits) => {
            return Err(AgentError::Stopped("metrics and health server"));
        }
        () = sampler::run(&config, sampler, &heartbeat, &outbox) => return Err(AgentError::Stopped("sampler")),
        () = reporter.run(&outbox) => return Err(AgentError::Stopped("reporter")),
        _ = terminate.recv() => info!("SIGTERM; stopping"),
        _ = interrupt.recv() => info!("SIGINT; stopping"),
    }
    Ok(())
}
