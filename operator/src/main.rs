//! `tidepool-operator`: runs the HTTP API on every replica, and the
//! controllers on the replica that holds the leader lease.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use tidepool_operator::api::{self, ApiState};
use tidepool_operator::context::Settings;
use tidepool_operator::keys::Keys;
use tidepool_operator::leader::{Elector, LeaseSettings};
use tidepool_operator::metrics::Metrics;

#[derive(Parser, Debug)]
#[command(name = "tidepool-operator", version, about = "Tidepool's operator: warm pools, sessions, the HTTP API")]
struct Args {
    /// Address of the HTTP API, /healthz, /readyz and /metrics.
    #[arg(long, env = "TIDEPOOL_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// File holding the bearer token the API requires.
    #[arg(long, env = "TIDEPOOL_API_TOKEN_FILE")]
    api_token_file: std::path::PathBuf,
    /// Namespace for sessions whose request names none.
    #[arg(long, env = "TIDEPOOL_SESSION_NAMESPACE", default_value = "default")]
    session_namespace: String,
    /// Seconds POST /api/v1/sessions waits for Ready before answering 504.
    #[arg(long, env = "TIDEPOOL_READY_DEADLINE", default_value_t = 10.0)]
    ready_deadline_seconds: f64,
    /// Namespace of the leader Lease (the operator's own).
    #[arg(long, env = "TIDEPOOL_LEASE_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, env = "TIDEPOOL_LEASE_NAME", default_value = "tidepool-operator")]
    lease_name: String,
    /// Seconds a leader's lease lasts without renewal.
    #[arg(long, env = "TIDEPOOL_LEASE_SECONDS", default_value_t = 10)]
    lease_seconds: u64,
    /// This replica's name in the Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Pods a pool creates in one pass at most.
    #[arg(long, env = "TIDEPOOL_CREATE_BATCH", default_value_t = 50)]
    create_batch: u32,
    /// Seconds a finished session keeps its results before it is deleted.
    #[arg(long, env = "TIDEPOOL_RESULT_RETENTION", default_value_t = 3600)]
    result_retention_seconds: u64,
    /// Port of a session pod whose template names none.
    #[arg(long, env = "TIDEPOOL_SESSION_PORT", default_value_t = 8080)]
    session_port: u16,
    /// Fault injection for tests: milliseconds to pause between claiming a
    /// pod and writing the session's status.
    #[arg(long, hide = true)]
    fault_claim_delay_ms: Option<u64>,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let args = Args::parse();
    let token = match std::fs::read_to_string(&args.api_token_file) {
        Ok(token) if !token.trim().is_empty() => token.trim().to_string(),
        Ok(_) => return fail(format!("{} is empty", args.api_token_file.display())),
        Err(e) => return fail(format!("cannot read {}: {e}", args.api_token_file.display())),
    };
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(e) => return fail(format!("no Kubernetes client: {e}")),
    };
    let metrics = match Metrics::new() {
        Ok(metrics) => Arc::new(metrics),
        Err(e) => return fail(format!("metrics: {e}")),
    };
    let keys = Arc::new(Keys::default());
    let identity = args.identity.clone().unwrap_or_else(|| format!("tidepool-operator-{}", std::process::id()));

    let state = Arc::new(ApiState {
        client: client.clone(),
        keys: keys.clone(),
        metrics: metrics.clone(),
        token,
        namespace: args.session_namespace.clone(),
        ready_deadline: Duration::from_secs_f64(args.ready_deadline_seconds.max(0.1)),
        ready: Default::default(),
    });
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(e) => return fail(format!("cannot listen on {}: {e}", args.listen)),
    };
    tracing::info!(listen = %args.listen, identity, "serving the API");
    let router = api::router(state.clone());
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "the API server stopped");
        }
    });
    if let Err(e) = client.apiserver_version().await {
        return fail(format!("the Kubernetes API does not answer: {e}"));
    }
    state.ready.store(true, Ordering::Relaxed);

    let mut elector = Elector::new(
        client.clone(),
        LeaseSettings {
            namespace: args.lease_namespace,
            name: args.lease_name,
            identity: identity.clone(),
            duration: Duration::from_secs(args.lease_seconds.max(1)),
        },
    );
    tokio::select! {
        _ = elector.acquire() => {}
        _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
    }
    tracing::info!(identity, "leading");
    metrics.leader.set(1);
    let settings = Settings {
        create_batch: args.create_batch.max(1),
        result_retention: Duration::from_secs(args.result_retention_seconds),
        session_port: args.session_port,
        fault_claim_delay: args.fault_claim_delay_ms.map(Duration::from_millis),
    };
    let controllers = tidepool_operator::run::controllers(client, settings, metrics.clone(), keys, &identity);
    tokio::select! {
        _ = controllers => {
            // The controllers stop on SIGTERM or Ctrl-C: hand the lease over at once.
            elector.release().await;
            ExitCode::SUCCESS
        }
        _ = elector.hold() => {
            tracing::error!("lost the leader lease; exiting so that only the new leader writes");
            ExitCode::FAILURE
        }
    }
}

fn fail(message: String) -> ExitCode {
    tracing::error!("{message}");
    eprintln!("tidepool-operator: {message}");
    ExitCode::FAILURE
}
