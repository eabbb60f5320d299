//! `tidepool-session`: the session pod's server.

use std::process::ExitCode;

use clap::Parser;
use tidepool_session::flags::Flags;
use tidepool_session::server::{Server, Stop};
use tracing::level_filters::LevelFilter;
use tracing_log::AsLog;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    // Usage errors (a missing or malformed key or pod name) exit with 2.
    let flags = Flags::parse();
    // The WebRTC stack logs through `log`, which this also collects: its
    // errors (a failed send) belong in the pod's log; its warnings come
    // with every tube and say nothing wrong.
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rtc=error,webrtc=error")),
        )
        .init();
    // After the subscriber, so `log` skips at once what its filter drops.
    let _ = tracing_log::LogTracer::builder().with_max_level(LevelFilter::current().as_log()).init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(flags.worker_threads))
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(run(flags)),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            ExitCode::FAILURE
        }
    }
}

async fn run(flags: Flags) -> ExitCode {
    let config = flags.server_config();
    tracing::info!(egress = %config.egress, "probes may reach");
    let mut server = match Server::start(config).await {
        Ok(server) => server,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        http = %server.http_addr(),
        udp = %server.udp_addr(),
        pod = %flags.pod_name,
        operator = flags.operator_url.as_ref().map(|u| u.as_str()).unwrap_or("none"),
        "serving"
    );
    let signal = async {
        tokio::select! {
            () = terminate_signal() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "interrupt",
        }
    };
    let code = match server.serve_until(signal).await {
        // Exit 0 also on a client's request: the pod ended as asked.
        Stop::Terminated => {
            tracing::info!("a client asked the pod to end; shutting down");
            ExitCode::SUCCESS
        }
        Stop::Signal(reason) => {
            tracing::info!(reason, "shutting down");
            ExitCode::SUCCESS
        }
        Stop::TaskEnded(task) => {
            tracing::error!(task, "a server task ended on its own; exiting");
            ExitCode::FAILURE
        }
    };
    server.shutdown().await;
    tracing::info!("stopped");
    code
}

#[cfg(unix)]
async fn terminate_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut sigterm) => {
            sigterm.recv().await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(not(unix))]
async fn terminate_signal() {
    std::future::pending::<()>().await;
}
