//! The server: the routes, the HTTP server (`tidepool-serve`) and what the
//! pod counts of it, the UDP echo, and how it starts and stops.
//! [`Server::start`] runs it in-process (tests, `main`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{Extensions, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use tidepool_crds::test_session::SessionResults;
use tidepool_protocol::egress::EgressPolicy;
use tidepool_serve::{BodyTimeout, Refusal};
use tidepool_wire::token::PublicKeys;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::auth;
use crate::connection::{ClientAddr, ConnectionSocket};
use crate::error::{ApiError, Reason, json_response};
use crate::limits::{Limiter, Limits, ProbeLimits, UdpCaps};
use crate::metrics::{HEADER_TIMEOUT, IDLE_TIMEOUT, Metrics, WRITE_TIMEOUT, route_label};
use crate::random::{NoRandomness, POOL_BYTES, RandomPool};
use crate::reporter::OperatorReporter;
use crate::session::BoundSession;
use crate::state::{PodIdentity, PodState, PodStateParts, ProbeRuns, until_shutdown};
use crate::udp_cookie::UdpCookies;
use crate::{download, household, latency, probe_runs, results, tube_routes, udp, upload};
use tidepool_protocol::pod::{
    DEFAULT_PORT, DOWNLOAD_PATH, HEALTH_PATH, HOUSEHOLD_WS_PATH, INFO_PATH, LATENCY_WS_PATH, METRICS_PATH, PROBES_PATH,
    PodInfo, RESULTS_PATH, UDP_GRANT_PATH, UPLOAD_PATH,
};
use tidepool_protocol::tube::{POD_TUBE_PATH, POD_TUBES_PATH, PodTubeState};

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// TCP address for HTTP and WebSockets; port 0 picks one.
    pub listen: SocketAddr,
    /// The UDP echo's port, on the listen address; `None`: the TCP port's
    /// number, `Some(0)`: any free port.
    pub udp_port: Option<u16>,
    pub identity: PodIdentity,
    /// The pool's key, which signs session tokens and binding tickets.
    pub public_keys: PublicKeys,
    pub limits: Limits,
    /// The cap on connections and the header, body and idle timeouts.
    pub http: HttpLimits,
    /// What the session's probes may reach (`--egress-allow`, `--egress-deny`).
    pub egress: EgressPolicy,
    /// What the session's probe runs may spend.
    pub probe_limits: ProbeLimits,
    /// What the session's UDP echo may send back.
    pub udp_caps: UdpCaps,
    /// Where results go: `http://host:port` of the operator.
    pub operator_url: Option<reqwest::Url>,
    /// At shutdown, how long open requests get to finish.
    pub shutdown_grace: Duration,
    /// What the pod's tubes may hold, and where their UDP sockets bind.
    pub tubes: crate::tubes::TubeLimits,
}

impl ServerConfig {
    /// Defaults for everything but who the pod is.
    pub fn new(identity: PodIdentity, public_keys: impl Into<PublicKeys>) -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)),
            udp_port: None,
            identity,
            public_keys: public_keys.into(),
            limits: Limits::default(),
            http: HttpLimits::default(),
            egress: EgressPolicy::default(),
            probe_limits: ProbeLimits::default(),
            udp_caps: UdpCaps::default(),
            operator_url: None,
            shutdown_grace: Duration::from_secs(5),
            tubes: crate::tubes::TubeLimits::default(),
        }
    }
}

/// What the HTTP server allows each connection, whatever its client does,
/// by the flags' names; `tidepool-serve` keeps them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once (WebSockets included); one beyond is closed at once.
    pub max_connections: usize,
    /// A request head must come in full within this of its first byte (of
    /// the accept, on a new connection).
    pub header_read_timeout: Duration,
    /// A request body may pause at most this long between two pieces, and a
    /// JSON body must come in full within it.
    pub body_read_timeout: Duration,
    /// Between requests, a connection with nothing coming is closed after this.
    pub idle_timeout: Duration,
    /// A client that takes no bytes of an answer (a download, a WebSocket's
    /// frames) for this long is cut.
    pub write_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(60),
        }
    }
}

impl HttpLimits {
    fn serve(&self) -> tidepool_serve::Limits {
        tidepool_serve::Limits {
            max_connections: self.max_connections,
            header_timeout: self.header_read_timeout,
            // Uploads stream for many seconds: only a pause is too slow.
            body_timeout: BodyTimeout::Pause(self.body_read_timeout),
            idle_timeout: self.idle_timeout,
            write_timeout: self.write_timeout,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("cannot bind the UDP echo on {addr}: {source}")]
    Udp { addr: SocketAddr, source: io::Error },
    #[error(transparent)]
    Randomness(#[from] NoRandomness),
    #[error("cannot register the metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot make the HTTP client for the operator: {0}")]
    HttpClient(#[from] reqwest::Error),
}

/// Why [`Server::serve_until`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A client asked the pod to end.
    Terminated,
    /// The signal given, named.
    Signal(&'static str),
    /// One of the server's tasks ended on its own.
    TaskEnded(&'static str),
}

/// A running server.
pub struct Server {
    http_addr: SocketAddr,
    udp_addr: SocketAddr,
    state: Arc<PodState>,
    shutdown: watch::Sender<bool>,
    /// The accept loop and the UDP echo; taken by `shutdown`.
    tasks: Option<(JoinHandle<()>, JoinHandle<()>)>,
}

/// hyper's per-connection buffer: big reads and writes on the streams.
const CONNECTION_BUFFER_BYTES: usize = 1024 * 1024;
/// At shutdown, how long WebSockets get to send their close frames.
const SOCKETS_CLOSE_WAIT: Duration = Duration::from_secs(1);

impl Server {
    /// Binds, spawns the accept loop and the UDP echo, and returns.
    pub async fn start(config: ServerConfig) -> Result<Self, StartError> {
        let listen = config.listen;
        let listener = TcpListener::bind(listen).await.map_err(|source| StartError::Listen { addr: listen, source })?;
        let http_addr = listener.local_addr().map_err(|source| StartError::Listen { addr: listen, source })?;
        let udp_wanted = SocketAddr::new(listen.ip(), config.udp_port.unwrap_or(http_addr.port()));
        let udp_error = |source| StartError::Udp { addr: udp_wanted, source };
        let (udp_socket, buffers) = udp::bind(udp_wanted).map_err(udp_error)?;
        let udp_addr = udp_socket.local_addr().map_err(udp_error)?;

        let metrics = Metrics::new()?;
        let buffer_gauge = &metrics.udp_socket_buffer_bytes;
        buffer_gauge.with_label_values(&["receive"]).set(i64::try_from(buffers.receive).unwrap_or(i64::MAX));
        buffer_gauge.with_label_values(&["send"]).set(i64::try_from(buffers.send).unwrap_or(i64::MAX));
        tracing::info!(receive = buffers.receive, send = buffers.send, "udp echo socket buffers (bytes)");

        let (shutdown, shutdown_signal) = watch::channel(false);
        let state = Arc::new(PodState::new(PodStateParts {
            identity: config.identity,
            public_keys: config.public_keys,
            metrics,
            limiter: Limiter::new(config.limits),
            random: RandomPool::new(POOL_BYTES)?,
            udp_port: udp_addr.port(),
            udp_cookies: UdpCookies::new()?,
            reporter: OperatorReporter::new(config.operator_url)?,
            probe_runs: ProbeRuns::new(config.egress, config.probe_limits),
            tubes: crate::tubes::Tubes::new(config.tubes),
            body_read_timeout: config.http.body_read_timeout,
            shutdown: shutdown_signal,
        }));
        let accept = tokio::spawn(serve_http(
            listener,
            router(state.clone()),
            state.clone(),
            config.http,
            config.shutdown_grace,
        ));
        let echo = tokio::spawn(udp::echo(udp_socket, state.clone(), config.udp_caps));
        Ok(Self { http_addr, udp_addr, state, shutdown, tasks: Some((accept, echo)) })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// Resolves when a client asked the pod to end (`terminate`); tests watch it.
    pub async fn terminate_requested(&self) {
        self.state.terminate.notified().await;
    }

    /// Serves until a client asks the pod to end, `signal` resolves, or one
    /// of the server's own tasks ends (which it never should while serving).
    pub async fn serve_until(&mut self, signal: impl Future<Output = &'static str>) -> Stop {
        let Some((accept, echo)) = self.tasks.as_mut() else { return Stop::TaskEnded("the server") };
        let stop = tokio::select! {
            () = self.state.terminate.notified() => Stop::Terminated,
            reason = signal => Stop::Signal(reason),
            _ = accept => Stop::TaskEnded("the accept loop"),
            _ = echo => Stop::TaskEnded("the UDP echo"),
        };
        if let (Stop::TaskEnded(_), Some((accept, echo))) = (&stop, self.tasks.take()) {
            // One has ended (and must not be awaited again): stop the other.
            accept.abort();
            echo.abort();
        }
        stop
    }

    /// The latest graded results.
    pub fn latest_results(&self) -> Option<SessionResults> {
        self.state.latest_results.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    /// Stops accepting, closes the WebSockets, gives open requests the
    /// grace period, and returns.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        self.state.tubes.close_all();
        if let Some((accept, echo)) = self.tasks.take() {
            let _ = accept.await;
            let _ = echo.await;
        }
        // WebSockets outlive their connections' tasks: let their close frames go out.
        let closed = tokio::time::timeout(SOCKETS_CLOSE_WAIT, self.state.all_sockets_closed()).await;
        if closed.is_err() {
            tracing::warn!("sockets still open at exit");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // A server dropped without `shutdown` still stops.
        let _ = self.shutdown.send(true);
    }
}

/// The routes. Every one but health and metrics needs the session's credentials.
pub fn router(state: Arc<PodState>) -> Router {
    let session_routes = Router::new()
        .route(INFO_PATH, get(info))
        .route(LATENCY_WS_PATH, get(latency::latency_socket))
        .route(DOWNLOAD_PATH, get(download::download))
        .route(UPLOAD_PATH, post(upload::upload))
        .route(UDP_GRANT_PATH, post(udp::grant))
        .route(HOUSEHOLD_WS_PATH, get(household::household_socket))
        .route(RESULTS_PATH, post(results::submit))
        .route(PROBES_PATH, post(probe_runs::run).delete(probe_runs::stop))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth::require_session));
    // Tubes are the operator's to open and close; their tickets are checked in the handlers.
    let tube_routes = Router::new()
        .route(POD_TUBES_PATH, post(tube_routes::create))
        .route(POD_TUBE_PATH, get(tube_routes::report).delete(tube_routes::close));
    Router::new()
        .route(HEALTH_PATH, get(|| async { "ok" }))
        .route(METRICS_PATH, get(metrics))
        .merge(session_routes)
        .merge(tube_routes)
        .fallback(|| async { ApiError::not_found(Reason::NoSuchRoute, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(Reason::WrongMethod, StatusCode::METHOD_NOT_ALLOWED, "this route does not take that method")
        })
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .with_state(state)
}

/// Counts every answer by route and status, and every refusal by the reason
/// it carries: one place, so no refusal path goes uncounted. A client error
/// without a reason (a framework's own rejection) counts as `other`.
async fn count_requests(State(state): State<Arc<PodState>>, request: Request, next: Next) -> Response {
    let route = route_label(request.uri().path());
    let response = next.run(request).await;
    let status = response.status();
    state.metrics.requests.with_label_values(&[route, status.as_str()]).inc();
    // A server error is the pod's failing, not a refusal.
    if status.is_client_error() {
        state.count_refusal(response.extensions().get::<Reason>().copied().unwrap_or(Reason::Other));
    }
    response
}

async fn metrics(State(state): State<Arc<PodState>>) -> Response {
    // Probe bytes move while runs go on: count them up to now.
    state.probe_runs.count_bytes(&state.metrics.probe_bytes);
    for (tube_state, label) in [
        (PodTubeState::Connecting, "connecting"),
        (PodTubeState::Connected, "connected"),
        (PodTubeState::Ended, "ended"),
    ] {
        let count = i64::try_from(state.tubes.count(tube_state)).unwrap_or(i64::MAX);
        state.metrics.tubes.with_label_values(&[label]).set(count);
    }
    match state.metrics.render() {
        Ok(text) => {
            let content_type = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
            ([(header::CONTENT_TYPE, content_type)], text).into_response()
        }
        Err(e) => {
            let message = format!("cannot render metrics: {e}");
            ApiError::new(Reason::Other, StatusCode::INTERNAL_SERVER_ERROR, message).into_response()
        }
    }
}

async fn info(State(state): State<Arc<PodState>>, Extension(session): Extension<Arc<BoundSession>>) -> Response {
    let (identity, claims) = (&state.identity, &session.claims);
    let or_claim = |own: &str, claim: &str| if own.is_empty() { claim.to_owned() } else { own.to_owned() };
    let info = PodInfo {
        pod: identity.pod.clone(),
        namespace: or_claim(&identity.namespace, &claims.ns),
        pool: or_claim(&identity.pool, &claims.pool),
        region: identity.region.clone(),
        session_id: claims.sid.clone(),
        session_name: claims.name.clone(),
        profile: claims.profile.clone(),
        expires_at: claims.exp,
        udp_port: state.udp_port,
    };
    json_response(StatusCode::OK, &info)
}

/// The HTTP server: `tidepool-serve` within `limits`, its refusals and open
/// connections counted in the pod's metrics, each request told its client's
/// address and socket. Serves until the pod shuts down.
async fn serve_http(listener: TcpListener, router: Router, state: Arc<PodState>, limits: HttpLimits, grace: Duration) {
    let metrics = &state.metrics;
    let open = metrics.open_connections.clone();
    let header_timeouts = metrics.connections_closed.with_label_values(&[HEADER_TIMEOUT]);
    let idle_timeouts = metrics.connections_closed.with_label_values(&[IDLE_TIMEOUT]);
    let write_timeouts = metrics.connections_closed.with_label_values(&[WRITE_TIMEOUT]);
    let refusals = state.clone();
    let server = tidepool_serve::Server::new(limits.serve())
        .grace(grace)
        .tune_http1(|http| {
            http.max_buf_size(CONNECTION_BUFFER_BYTES).writev(true);
        })
        .on_connection(|stream, peer| {
            let mut extensions = Extensions::new();
            extensions.insert(ClientAddr(peer));
            if let Ok(fd) = stream.as_fd().try_clone_to_owned() {
                extensions.insert(ConnectionSocket::new(fd.into()));
            }
            extensions
        })
        .on_open_change(move |change| open.add(change))
        .on_refusal(move |refusal| match refusal {
            Refusal::ConnectionCap => refusals.count_refusal(Reason::MaxConnections),
            Refusal::HeaderTimeout => header_timeouts.inc(),
            Refusal::Idle => idle_timeouts.inc(),
            Refusal::WriteStalled => write_timeouts.inc(),
            // Counted where it is answered: a 408, `body_timeout`.
            Refusal::SlowBody => {}
            // The pod serves plain HTTP.
            Refusal::TlsHandshake => {}
        });
    let mut shutdown = state.shutdown_signal();
    server.serve(listener, router, until_shutdown(&mut shutdown)).await;
}
