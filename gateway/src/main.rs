//! `tidepool-gateway`: Tidepool's front door.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::Parser;
use tidepool_gateway::cache::Caches;
use tidepool_gateway::flags::Flags;
use tidepool_gateway::metrics::Metrics;
use tidepool_gateway::operator::OperatorApi;
use tidepool_gateway::proxy::pod_client;
use tidepool_gateway::server::{admin_router, public_router, serve};
use tidepool_gateway::state::Gateway;
use tidepool_gateway::tasks::Tasks;
use tidepool_gateway::udp_relay::UdpRelay;
use tokio::net::UdpSocket;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let flags = Flags::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime.block_on(run(flags)),
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            ExitCode::FAILURE
        }
    }
}

async fn run(flags: Flags) -> ExitCode {
    let settings = match flags.settings() {
        Ok(settings) => settings,
        Err(e) => {
            tracing::error!(error = %e, "bad flag");
            return ExitCode::from(2);
        }
    };
    let client = match kube::Client::try_default().await {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot reach the Kubernetes API");
            return ExitCode::FAILURE;
        }
    };
    let metrics = match Metrics::new() {
        Ok(metrics) => Arc::new(metrics),
        Err(e) => {
            tracing::error!(error = %e, "cannot register the metrics");
            return ExitCode::FAILURE;
        }
    };
    let (public, admin) = match (
        tokio::net::TcpListener::bind(flags.listen).await,
        tokio::net::TcpListener::bind(flags.admin_listen).await,
    ) {
        (Ok(public), Ok(admin)) => (public, admin),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot listen");
            return ExitCode::FAILURE;
        }
    };
    let udp = match flags.udp_address() {
        Ok(Some(address)) => match bind_udp(address).await {
            Ok(sockets) => Some(sockets),
            Err(e) => {
                tracing::error!(error = %e, %address, "cannot listen for the UDP echo relay");
                return ExitCode::FAILURE;
            }
        },
        Ok(None) => None,
        Err(e) => {
            tracing::error!(error = %e, "bad flag");
            return ExitCode::from(2);
        }
    };
    let relay = udp.as_ref().map(|(public, _)| {
        let bound = public.local_addr().map_or(0, |a| a.port());
        Arc::new(UdpRelay::new(flags.udp_advertised_port.unwrap_or(bound)))
    });
    let mut tasks = Tasks::default();
    let tls = settings.tls.clone().map(|files| {
        let reloading = tidepool_gateway::tls::Reloading::load(files)?;
        let config = reloading.server_config()?;
        Ok::<_, tidepool_gateway::tls::TlsError>((reloading, config))
    });
    let (tls, tls_config) = match tls.transpose() {
        Ok(Some((reloading, config))) => (Some(reloading), Some(config)),
        Ok(None) => (None, None),
        Err(e) => {
            tracing::error!(error = %e, "cannot serve TLS");
            return ExitCode::FAILURE;
        }
    };
    let ui = match settings.ui_dir.as_deref().map(tidepool_gateway::ui::Ui::load).transpose() {
        Ok(ui) => ui,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the web UI");
            return ExitCode::FAILURE;
        }
    };
    let caches = Caches::start(&client, &settings.namespaces, &mut tasks);
    let gateway = Arc::new(Gateway {
        operator: OperatorApi::new(settings.operator_url.clone(), settings.token_file.clone()),
        settings,
        kube: client.clone(),
        caches: caches.clone(),
        pods: pod_client(),
        streams: Default::default(),
        pending: Default::default(),
        picks: Default::default(),
        ui,
        udp: relay.clone(),
        metrics,
    });
    let ready = Arc::new(AtomicBool::new(false));
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let until_stopped = |mut stopping: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    tasks.spawn(
        "the users' server".into(),
        serve(gateway.clone(), public, public_router(gateway.clone()), tls_config, until_stopped(stopping.clone())),
    );
    tasks.spawn(
        "the admin server".into(),
        serve(
            gateway.clone(),
            admin,
            admin_router(gateway.clone(), ready.clone()),
            None,
            until_stopped(stopping.clone()),
        ),
    );
    if let Some(tls) = tls {
        tasks.spawn("the TLS reloader".into(), tls.keep_reloading(gateway.metrics.tls_reloads.clone()));
    }
    if let (Some((public, upstream)), Some(relay)) = (udp, relay) {
        use tidepool_gateway::udp_relay;
        let datagrams = gateway.metrics.udp_datagrams.clone();
        let (queue, queued) = udp_relay::resolve_queue();
        let relaying = udp_relay::relay(relay.clone(), public, upstream, queue, datagrams);
        tasks.spawn("the UDP echo relay".into(), relaying);
        tasks.spawn("the UDP routes' index".into(), udp_relay::keep_indexing(gateway.clone(), relay.clone()));
        tasks.spawn("the UDP routes' resolver".into(), udp_relay::keep_resolving(gateway.clone(), relay, queued));
    }
    tasks.spawn("the sightings of clients".into(), tidepool_gateway::seen::keep_writing(gateway.clone()));
    tracing::info!(listen = %flags.listen, admin = %flags.admin_listen, "serving");
    let synced = async {
        caches.wait_until_ready().await;
        ready.store(true, Ordering::Relaxed);
        tracing::info!("caches synced; ready");
        std::future::pending::<()>().await
    };
    let code = tokio::select! {
        () = terminate_signal() => {
            tracing::info!("shutting down");
            ExitCode::SUCCESS
        }
        ended = tasks.ended() => {
            tracing::error!(task = %ended, "a supervised task ended; exiting");
            ExitCode::FAILURE
        }
        () = synced => ExitCode::FAILURE,
    };
    ready.store(false, Ordering::Relaxed);
    let _ = stop.send(true);
    code
}

/// The relay's sockets: one for clients at `address`, one toward the pods.
async fn bind_udp(address: std::net::SocketAddr) -> std::io::Result<(UdpSocket, UdpSocket)> {
    let public = UdpSocket::bind(address).await?;
    let any = if address.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let upstream = UdpSocket::bind(any).await?;
    Ok((public, upstream))
}

async fn terminate_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut sigterm) => {
            tokio::select! {
                _ = sigterm.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
