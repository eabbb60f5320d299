//! `tidepool-operator`: runs the HTTP API on every replica, and the
//! controllers on the replica that holds the leader lease. Every long-running
//! task is supervised: the first to end ends the process (non-zero), after
//! giving up the lease.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use tidepool_operator::context::Settings;
use tidepool_operator::export::Exporter;
use tidepool_operator::export::s3::{S3Config, S3Store};
use tidepool_operator::fleet::daemonset::AgentSettings;
use tidepool_operator::fleet::geo::{GeoIp, RegionTable};
use tidepool_operator::fleet::{self, Fleet, FleetSettings};
use tidepool_operator::http::access::{Access, StaticToken};
use tidepool_operator::http::{self, ApiState};
use tidepool_operator::keys::Keys;
use tidepool_operator::leader::{Elector, LeaseSettings};
use tidepool_operator::metrics::Metrics;
use tidepool_operator::placement::RouterSettings;
use tidepool_operator::run::{self, Clients};
use tidepool_operator::scope::Scope;
use tidepool_operator::supervisor::Supervisor;

#[derive(Parser, Debug)]
#[command(
    name = "tidepool-operator",
    version,
    about = "Tidepool's operator: warm pools, sessions, agents and placement, the HTTP API"
)]
struct Args {
    /// Address of the HTTP API, /healthz, /readyz and /metrics.
    #[arg(long, env = "TIDEPOOL_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// A file holding a static bearer token the API also accepts (for small
    /// setups; callers otherwise use their Kubernetes tokens, checked with
    /// TokenReview and SubjectAccessReview).
    #[arg(long, env = "TIDEPOOL_API_TOKEN_FILE")]
    api_token_file: Option<std::path::PathBuf>,
    /// The namespaces the static token may act in (comma-separated); the
    /// session namespace when not given.
    #[arg(long, env = "TIDEPOOL_API_TOKEN_NAMESPACES", value_delimiter = ',')]
    api_token_namespaces: Vec<String>,
    /// Live sessions one caller may hold at once.
    #[arg(long, env = "TIDEPOOL_SESSIONS_PER_CALLER", default_value_t = 20)]
    sessions_per_caller: usize,
    /// Callers (user names, comma-separated) whose creates are not capped:
    /// a front door such as the gateway, which keeps its own limits per
    /// client and creates sessions for many of them.
    #[arg(long, env = "TIDEPOOL_UNCAPPED_CALLERS", value_delimiter = ',')]
    uncapped_callers: Vec<String>,
    #[command(flatten)]
    server: ServerArgs,
    /// Namespace for sessions whose request names none.
    #[arg(long, env = "TIDEPOOL_SESSION_NAMESPACE", default_value = "default")]
    session_namespace: String,
    /// The cluster's pod and service ranges (comma-separated CIDRs): session
    /// pods may not reach them with probes or tunnels unless their pool
    /// allows it.
    #[arg(long, env = "TIDEPOOL_CLUSTER_CIDRS", value_delimiter = ',')]
    cluster_cidrs: Vec<String>,
    /// The namespaces the operator watches and writes pools, sessions and
    /// pods in (comma-separated); empty: every namespace, which needs
    /// cluster-wide rights.
    #[arg(long, env = "TIDEPOOL_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
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
    /// The operator's URL as session pods reach it (its Service), given to
    /// them to post results to. Without it pods keep results to themselves.
    #[arg(long, env = "TIDEPOOL_RESULTS_URL")]
    results_url: Option<String>,
    /// Fault injection for tests: milliseconds to pause between claiming a
    /// pod and writing the session's status.
    #[arg(long, hide = true)]
    fault_claim_delay_ms: Option<u64>,
    /// Fault injection for tests: end this supervised task a second after it
    /// starts (api-server, backend-status, health-probes, agent-daemonset,
    /// pod-cache, session-cache, pool-cache, node-cache, warmpool-controller,
    /// testsession-controller; with --namespaces, the namespaced ones are
    /// `<task>/<namespace>`).
    #[arg(long, hide = true)]
    fault_end_task: Option<String>,
    #[command(flatten)]
    fleet: FleetArgs,
    #[command(flatten)]
    store: StoreArgs,
}

/// The results store: an S3-compatible bucket every ended session's
/// results are written to. Off unless an endpoint and a bucket are given.
#[derive(clap::Args, Debug)]
struct StoreArgs {
    /// The store's URL (`https://s3.eu-west-1.amazonaws.com`, `http://seaweedfs:8333`).
    #[arg(long, env = "TIDEPOOL_RESULTS_STORE_ENDPOINT", requires = "results_store_bucket")]
    results_store_endpoint: Option<String>,
    #[arg(long, env = "TIDEPOOL_RESULTS_STORE_BUCKET", requires = "results_store_endpoint")]
    results_store_bucket: Option<String>,
    /// Keys start with this (then namespace/pool/day/session).
    #[arg(long, env = "TIDEPOOL_RESULTS_STORE_PREFIX", default_value = "tidepool/")]
    results_store_prefix: String,
    /// The region requests are signed for.
    #[arg(long, env = "TIDEPOOL_RESULTS_STORE_REGION", default_value = "us-east-1")]
    results_store_region: String,
    /// Address the bucket as a host name (`bucket.endpoint`), not a path.
    #[arg(long, env = "TIDEPOOL_RESULTS_STORE_VIRTUAL_HOSTED")]
    results_store_virtual_hosted: bool,
    /// The access key, from the chart's Secret.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    results_store_access_key_id: Option<String>,
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    results_store_secret_access_key: Option<String>,
}

impl StoreArgs {
    fn exporter(&self, metrics: Arc<Metrics>) -> Result<Option<Arc<Exporter>>, String> {
        let (Some(endpoint), Some(bucket)) = (&self.results_store_endpoint, &self.results_store_bucket) else {
            return Ok(None);
        };
        let (Some(access_key_id), Some(secret_access_key)) =
            (&self.results_store_access_key_id, &self.results_store_secret_access_key)
        else {
            return Err("the results store needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into());
        };
        let endpoint = reqwest::Url::parse(endpoint).map_err(|e| format!("--results-store-endpoint: {e}"))?;
        let config = S3Config {
            endpoint,
            bucket: bucket.clone(),
            region: self.results_store_region.clone(),
            access_key_id: access_key_id.clone(),
            secret_access_key: secret_access_key.clone(),
            virtual_hosted: self.results_store_virtual_hosted,
        };
        let store = S3Store::new(config).map_err(|e| e.to_string())?;
        Ok(Some(Arc::new(Exporter::new(store, &self.results_store_prefix, metrics))))
    }
}

/// The HTTP server's limits.
#[derive(clap::Args, Debug)]
struct ServerArgs {
    /// Open connections at most; one beyond is closed at once.
    #[arg(long, env = "TIDEPOOL_MAX_CONNECTIONS", default_value_t = 1024)]
    max_connections: usize,
    /// Seconds a client has to send a request's head, from its first byte.
    #[arg(long, env = "TIDEPOOL_HEADER_TIMEOUT", default_value_t = 10)]
    header_timeout_seconds: u64,
    /// Seconds a request's body may take to arrive.
    #[arg(long, env = "TIDEPOOL_BODY_TIMEOUT", default_value_t = 30)]
    body_timeout_seconds: u64,
    /// Seconds a connection may sit between requests with nothing coming.
    #[arg(long, env = "TIDEPOOL_IDLE_TIMEOUT", default_value_t = 60)]
    idle_timeout_seconds: u64,
    /// Seconds a client may take no bytes of an answer (the cluster view's
    /// event stream) before it is cut.
    #[arg(long, env = "TIDEPOOL_WRITE_TIMEOUT", default_value_t = 60)]
    write_timeout_seconds: u64,
}

impl ServerArgs {
    fn limits(&self) -> tidepool_serve::Limits {
        tidepool_serve::Limits {
            max_connections: self.max_connections.max(1),
            header_timeout: Duration::from_secs(self.header_timeout_seconds.max(1)),
            // Bodies here are small (256 KiB at most): the whole must come in time.
            body_timeout: tidepool_serve::BodyTimeout::Whole(Duration::from_secs(self.body_timeout_seconds.max(1))),
            idle_timeout: Duration::from_secs(self.idle_timeout_seconds.max(1)),
            write_timeout: Duration::from_secs(self.write_timeout_seconds.max(1)),
        }
    }
}

/// The node agents, their Backends, and placement.
#[derive(clap::Args, Debug)]
struct FleetArgs {
    /// Leave the agent DaemonSet alone (for clusters that deploy agents another way).
    #[arg(long, env = "TIDEPOOL_NO_AGENT_DAEMONSET")]
    no_agent_daemonset: bool,
    /// The agent image the DaemonSet runs.
    #[arg(long, env = "TIDEPOOL_AGENT_IMAGE", default_value = concat!("tidepool-agent:", env!("CARGO_PKG_VERSION")))]
    agent_image: String,
    /// The agent DaemonSet's name.
    #[arg(long, env = "TIDEPOOL_AGENT_DAEMONSET", default_value = "tidepool-agent")]
    agent_daemonset: String,
    /// The agents' namespace; the lease namespace when unset.
    #[arg(long, env = "TIDEPOOL_AGENT_NAMESPACE")]
    agent_namespace: Option<String>,
    /// The ServiceAccount agents run as and authenticate with.
    #[arg(long, env = "TIDEPOOL_AGENT_SERVICE_ACCOUNT", default_value = "tidepool-agent")]
    agent_service_account: String,
    /// Where agents send reports; the operator's Service in the agent namespace when unset.
    #[arg(long, env = "TIDEPOOL_AGENT_OPERATOR_URL")]
    agent_operator_url: Option<String>,
    /// The audience agent tokens carry, checked by TokenReview.
    #[arg(long, env = "TIDEPOOL_AGENT_TOKEN_AUDIENCE", default_value = "tidepool")]
    agent_token_audience: String,
    /// Milliseconds between an agent's reports.
    #[arg(long, env = "TIDEPOOL_AGENT_REPORT_INTERVAL_MS", default_value_t = 1000)]
    agent_report_interval_ms: u32,
    /// The agents' averaging windows, shortest first (placement reads the shortest).
    #[arg(long, env = "TIDEPOOL_AGENT_WINDOWS", default_value = "10s,60s,15m")]
    agent_windows: String,
    /// The port agents serve /metrics and /healthz on (host network).
    #[arg(long, env = "TIDEPOOL_AGENT_PORT", default_value_t = 9101)]
    agent_port: u16,
    /// Run agents only on nodes with these labels (KEY=VALUE, repeatable).
    #[arg(long = "agent-node-selector", value_parser = parse_label)]
    agent_node_selector: Vec<(String, String)>,
    /// A RuntimeClass for the agent pods (for NVML on GPU nodes, where needed).
    #[arg(long, env = "TIDEPOOL_AGENT_RUNTIME_CLASS")]
    agent_runtime_class: Option<String>,
    /// A backend whose agent missed this many reports is Stale and leaves placement.
    #[arg(long, env = "TIDEPOOL_BACKEND_STALE_AFTER_REPORTS", default_value_t = 3)]
    backend_stale_after_reports: u32,
    /// Seconds between refreshes of a Backend's status when nothing significant changed.
    #[arg(long, env = "TIDEPOOL_BACKEND_STATUS_REFRESH", default_value_t = 300)]
    backend_status_refresh_seconds: u64,
    /// Backend writes per second at most, over all Backends.
    #[arg(long, env = "TIDEPOOL_BACKEND_WRITES_PER_SECOND", default_value_t = 5)]
    backend_writes_per_second: u32,
    /// Seconds between health probes of a backend.
    #[arg(long, env = "TIDEPOOL_HEALTH_PROBE_INTERVAL", default_value_t = 10)]
    health_probe_interval_seconds: u64,
    /// Seconds before a health probe counts as failed.
    #[arg(long, env = "TIDEPOOL_HEALTH_PROBE_TIMEOUT", default_value_t = 2)]
    health_probe_timeout_seconds: u64,
    /// Seconds a placement's reservation lasts when no report shows it.
    #[arg(long, env = "TIDEPOOL_PENDING_TIMEOUT", default_value_t = 120)]
    pending_timeout_seconds: u64,
    /// Believe backends at loopback, link-local or unspecified addresses
    /// (for a cluster on one machine, as the local harness is).
    #[arg(long, env = "TIDEPOOL_ALLOW_LOCAL_BACKEND_ADDRESSES")]
    allow_local_backend_addresses: bool,
    /// With more backends than this, placement samples two instead of scanning all.
    #[arg(long, env = "TIDEPOOL_TWO_CHOICES_ABOVE", default_value_t = 64)]
    two_choices_above: usize,
    /// Coordinates of a region nodes are labelled with
    /// (`topology.kubernetes.io/region`): `NAME=LATITUDE,LONGITUDE`, repeated.
    #[arg(long = "region-coordinates", value_name = "NAME=LAT,LON")]
    region_coordinates: Vec<String>,
    /// A GeoIP database in the MaxMind DB format (GeoLite2-City, say): where
    /// a client is when it does not say.
    #[arg(long, env = "TIDEPOOL_GEOIP_DATABASE")]
    geoip_database: Option<std::path::PathBuf>,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("{text:?} is not KEY=VALUE")),
    }
}

/// Every request of the controllers and the API handlers gets this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Connecting to the API server gets this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    let args = Args::parse();
    let static_token = match &args.api_token_file {
        None => None,
        Some(file) => match std::fs::read_to_string(file) {
            Ok(token) if token.trim().len() >= 16 => Some(token.trim().to_string()),
            Ok(_) => return fail(format!("{} holds no token of 16 characters or more", file.display())),
            Err(e) => return fail(format!("cannot read {}: {e}", file.display())),
        },
    };
    if let Some(bad) = args.cluster_cidrs.iter().find(|c| !is_cidr(c)) {
        return fail(format!("--cluster-cidrs: {bad:?} is not a CIDR"));
    }
    let scope = match Scope::from_list(&args.namespaces) {
        Ok(scope) => scope,
        Err(e) => return fail(e),
    };
    if !scope.contains(&args.session_namespace) {
        return fail(format!("--session-namespace {} is not among --namespaces", args.session_namespace));
    }
    let lease = LeaseSettings {
        namespace: args.lease_namespace.clone(),
        name: args.lease_name.clone(),
        identity: args.identity.clone().unwrap_or_else(|| format!("tidepool-operator-{}", std::process::id())),
        duration: Duration::from_secs(args.lease_seconds.max(1)),
    };
    let (clients, lease_client) = match clients(&lease).await {
        Ok(clients) => clients,
        Err(e) => return fail(format!("no Kubernetes client: {e}")),
    };
    let metrics = match Metrics::new() {
        Ok(metrics) => Arc::new(metrics),
        Err(e) => return fail(format!("metrics: {e}")),
    };
    let keys = Arc::new(Keys::default());
    let exporter = match args.store.exporter(metrics.clone()) {
        Ok(exporter) => exporter,
        Err(e) => return fail(format!("results store: {e}")),
    };
    if args.fleet.health_probe_timeout_seconds >= args.fleet.health_probe_interval_seconds {
        return fail("--health-probe-timeout-seconds must be shorter than --health-probe-interval-seconds".into());
    }
    let agent_namespace = args.fleet.agent_namespace.clone().unwrap_or_else(|| args.lease_namespace.clone());
    let regions = match RegionTable::parse(&args.fleet.region_coordinates) {
        Ok(regions) => regions,
        Err(e) => return fail(format!("--region-coordinates {e}")),
    };
    let geoip = match &args.fleet.geoip_database {
        Some(path) => match GeoIp::open(path) {
            Ok(geoip) => Some(Arc::new(geoip)),
            Err(e) => return fail(format!("--geoip-database {e}")),
        },
        None => None,
    };
    let fleet = Arc::new(Fleet::new(FleetSettings {
        agent_namespace: agent_namespace.clone(),
        agent_service_account: args.fleet.agent_service_account.clone(),
        token_audience: args.fleet.agent_token_audience.clone(),
        status_refresh: Duration::from_secs(args.fleet.backend_status_refresh_seconds.max(1)),
        writes_per_second: args.fleet.backend_writes_per_second.max(1),
        probe_interval: Duration::from_secs(args.fleet.health_probe_interval_seconds.max(1)),
        probe_timeout: Duration::from_secs(args.fleet.health_probe_timeout_seconds.max(1)),
        router: RouterSettings {
            stale_after_reports: args.fleet.backend_stale_after_reports.max(1),
            pending_timeout: Duration::from_secs(args.fleet.pending_timeout_seconds),
            two_choices_above: args.fleet.two_choices_above,
        },
        allow_local_addresses: args.fleet.allow_local_backend_addresses,
        regions,
    }));
    let agents = (!args.fleet.no_agent_daemonset).then(|| AgentSettings {
        name: args.fleet.agent_daemonset.clone(),
        namespace: agent_namespace.clone(),
        image: args.fleet.agent_image.clone(),
        service_account: args.fleet.agent_service_account.clone(),
        operator_url: args
            .fleet
            .agent_operator_url
            .clone()
            .unwrap_or_else(|| format!("http://tidepool-operator.{agent_namespace}.svc:{}", args.listen.port())),
        token_audience: args.fleet.agent_token_audience.clone(),
        report_interval_ms: args.fleet.agent_report_interval_ms,
        windows: args.fleet.agent_windows.clone(),
        port: args.fleet.agent_port,
        node_selector: args.fleet.agent_node_selector.iter().cloned().collect(),
        runtime_class: args.fleet.agent_runtime_class.clone(),
    });
    let identity = lease.identity.clone();
    let mut supervisor = Supervisor::new(args.fault_end_task.clone());
    let shared = run::shared_caches(&mut supervisor, &scope, &clients.watch, &fleet);

    let token_namespaces = if args.api_token_namespaces.is_empty() {
        vec![args.session_namespace.clone()]
    } else {
        args.api_token_namespaces.clone()
    };
    if let Some(bad) = token_namespaces.iter().find(|ns| !scope.contains(ns)) {
        return fail(format!("--api-token-namespaces: {bad} is not among --namespaces"));
    }
    let static_token = static_token.map(|token| StaticToken { token, namespaces: token_namespaces });
    let state = Arc::new(ApiState {
        client: clients.request.clone(),
        keys: keys.clone(),
        metrics: metrics.clone(),
        access: Access::new(clients.request.clone(), static_token),
        namespace: args.session_namespace.clone(),
        scope: scope.clone(),
        pools: shared.pools.clone(),
        sessions: shared.sessions.clone(),
        tubes: shared.tubes.clone(),
        backends: shared.backends.clone(),
        nodes: shared.nodes.clone(),
        sessions_per_caller: args.sessions_per_caller,
        uncapped_callers: args.uncapped_callers.iter().cloned().collect(),
        creators: shared.creators.clone(),
        ready_deadline: Duration::from_secs_f64(args.ready_deadline_seconds.max(0.1)),
        ready: Default::default(),
        fleet: fleet.clone(),
        geoip,
        exporter: exporter.clone(),
        cluster_streams: Arc::new(tokio::sync::Semaphore::new(http::cluster::MAX_STREAMS)),
        tube_creations: Arc::new(tokio::sync::Semaphore::new(http::tubes::MAX_CREATIONS)),
    });
    let listener = match tokio::net::TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(e) => return fail(format!("cannot listen on {}: {e}", args.listen)),
    };
    tracing::info!(listen = %args.listen, identity, "serving the API");
    let router = http::router(state.clone());
    let refusals = metrics.clone();
    let server = tidepool_serve::Server::new(args.server.limits())
        .on_refusal(move |refusal| refusals.connection_refusals.with_label_values(&[refusal.reason()]).inc())
        .on_connection(|_, peer| {
            let mut extensions = axum::http::Extensions::new();
            extensions.insert(http::Peer(peer));
            extensions
        });
    supervisor.spawn("api-server", server.serve(listener, router, std::future::pending()));
    if let Err(e) = clients.request.apiserver_version().await {
        return fail(format!("the Kubernetes API does not answer: {e}"));
    }
    state.ready.store(true, Ordering::Relaxed);

    let mut elector = Elector::new(lease_client, lease);
    let acquired = tokio::select! {
        acquired = elector.acquire() => acquired,
        ended = supervisor.ended() => return fail(format!("task {} {} before this replica led", ended.task, ended.how)),
        () = shutdown_signal() => return ExitCode::SUCCESS,
    };
    tracing::info!(identity, "leading");
    metrics.leader.set(1);
    fleet.set_leading(true);
    supervisor.spawn("backend-status", fleet::status::run(clients.request.clone(), fleet.clone(), metrics.clone()));
    supervisor.spawn("health-probes", fleet::probe::run(fleet.clone()));
    if let Some(agents) = agents {
        supervisor
            .spawn("agent-daemonset", fleet::daemonset::keep(clients.watch.clone(), clients.request.clone(), agents));
    }
    let settings = Settings {
        create_batch: args.create_batch.max(1),
        result_retention: Duration::from_secs(args.result_retention_seconds),
        session_port: args.session_port,
        results_url: args.results_url.clone(),
        cluster_cidrs: args.cluster_cidrs.clone(),
        fault_claim_delay: args.fault_claim_delay_ms.map(Duration::from_millis),
    };
    // Each run's call is bounded on its own (monitor::drive::RUN_TIMEOUT).
    let monitor_http = match reqwest::Client::builder().connect_timeout(Duration::from_secs(5)).build() {
        Ok(client) => client,
        Err(e) => return fail(format!("an HTTP client for monitors: {e}")),
    };
    let parts =
        run::Parts { monitor_http, exporter, settings, metrics: metrics.clone(), keys, fleet: fleet.clone(), identity };
    run::start(&mut supervisor, &scope, clients, shared, parts);
    let code = tokio::select! {
        ended = supervisor.ended() => {
            tracing::error!(task = %ended.task, how = %ended.how, "a supervised task ended; giving up the lease and exiting");
            stop_writing(supervisor, &fleet, &metrics);
            elector.release().await;
            ExitCode::FAILURE
        }
        () = elector.hold(acquired) => {
            // Not renewed in time: another replica may lead soon. Stop every
            // write now, and leave the lease alone.
            tracing::error!("lost the leader lease; exiting so that only the new leader writes");
            stop_writing(supervisor, &fleet, &metrics);
            ExitCode::FAILURE
        }
        () = shutdown_signal() => {
            stop_writing(supervisor, &fleet, &metrics);
            // Hand the lease over at once.
            elector.release().await;
            ExitCode::SUCCESS
        }
    };
    code
}

/// Aborts every task (controllers, fleet writers, caches, the API server)
/// before anything else happens.
fn stop_writing(supervisor: Supervisor, fleet: &Fleet, metrics: &Metrics) {
    fleet.set_leading(false);
    metrics.leader.set(0);
    drop(supervisor);
}

/// The clients: for watches (no read timeout: a quiet watch may send nothing
/// for minutes), for requests (each bounded), and for the lease (bounded by
/// its renew deadline).
async fn clients(lease: &LeaseSettings) -> Result<(Clients, kube::Client), kube::Error> {
    let config = kube::Config::infer().await.map_err(kube::Error::InferConfig)?;
    let mut watch = config.clone();
    watch.connect_timeout = Some(CONNECT_TIMEOUT);
    let mut request = watch.clone();
    request.read_timeout = Some(REQUEST_TIMEOUT);
    request.write_timeout = Some(REQUEST_TIMEOUT);
    request.reset_reader_on_write = true;
    let mut lease_config = request.clone();
    let deadline = lease.renew_deadline();
    lease_config.connect_timeout = Some(deadline);
    lease_config.read_timeout = Some(deadline);
    lease_config.write_timeout = Some(deadline);
    let clients = Clients { watch: kube::Client::try_from(watch)?, request: kube::Client::try_from(request)? };
    Ok((clients, kube::Client::try_from(lease_config)?))
}

/// SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// `address/prefix`, IPv4 or IPv6.
fn is_cidr(text: &str) -> bool {
    let Some((address, prefix)) = text.split_once('/') else { return false };
    match (address.parse::<std::net::IpAddr>(), prefix.parse::<u8>()) {
        (Ok(std::net::IpAddr::V4(_)), Ok(bits)) => bits <= 32,
        (Ok(std::net::IpAddr::V6(_)), Ok(bits)) => bits <= 128,
        _ => false,
    }
}

fn fail(message: String) -> ExitCode {
    tracing::error!("{message}");
    eprintln!("tidepool-operator: {message}");
    ExitCode::FAILURE
}
