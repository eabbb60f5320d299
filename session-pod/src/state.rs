//! What the handlers share: who the pod is, the bound session, the limits,
//! the metrics and the random bytes.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use tidepool_crds::test_session::SessionResults;
use tidepool_protocol::egress::EgressPolicy;
use tidepool_protocol::relay::RelayKey;
use tidepool_wire::token::PublicKeys;
use tokio::sync::{Notify, Semaphore, watch};

use crate::error::{ApiError, Reason};
use crate::limits::{Limiter, MinuteWindow, Opening, ProbeLimits, Refusal};
use crate::metrics::Metrics;
use crate::probes::{Continuous, ProbeSettings, TrafficBudget};
use crate::random::RandomPool;
use crate::reporter::OperatorReporter;
use crate::session::BoundSession;
use crate::udp_cookie::UdpCookies;

/// Who this pod is, from its environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodIdentity {
    /// The pod's name: binding tickets name it.
    pub pod: String,
    pub namespace: String,
    /// The WarmPool; empty when unknown (then the token's pool is not checked).
    pub pool: String,
    pub region: String,
}

pub struct PodState {
    pub identity: PodIdentity,
    pub public_keys: PublicKeys,
    pub metrics: Metrics,
    limiter: Mutex<Limiter>,
    session: OnceLock<Arc<BoundSession>>,
    pub random: RandomPool,
    pub udp_port: u16,
    /// The UDP grants' cookies.
    pub udp_cookies: UdpCookies,
    /// The key of datagrams relayed by the gateway, from the first relay
    /// ticket this pod accepted (one session, one pod: one ticket).
    pub relay_key: OnceLock<RelayKey>,
    pub reporter: OperatorReporter,
    /// How long a request body may take (JSON bodies in all; any body
    /// between two of its pieces).
    pub body_read_timeout: Duration,
    /// The latest graded results.
    pub latest_results: Mutex<Option<SessionResults>>,
    /// The session's outbound probe runs.
    pub probe_runs: ProbeRuns,
    /// The tubes this pod terminates.
    pub tubes: crate::tubes::Tubes,
    /// Notified once when a client asks the pod to end; `main` exits on it.
    pub terminate: Notify,
    /// Turns true when the server shuts down; open sockets close on it.
    shutdown: watch::Receiver<bool>,
    open_sockets: AtomicUsize,
    socket_closed: Notify,
}

/// A pod's outbound probe runs: one at a time (probes make traffic to the
/// outside, and a client asking twice should not double it), the
/// continuous runs while they go on, and what the session's runs may
/// reach, spend and how often they may start.
pub struct ProbeRuns {
    pub running: Semaphore,
    continuous: Mutex<Option<Continuous>>,
    egress: Arc<EgressPolicy>,
    /// The session's probe bytes: one budget for every run.
    budget: Arc<TrafficBudget>,
    starts: Mutex<MinuteWindow>,
    /// What of the budget's use the metric has counted.
    bytes_counted: AtomicU64,
}

impl ProbeRuns {
    pub fn new(egress: EgressPolicy, limits: ProbeLimits) -> Self {
        Self {
            running: Semaphore::new(1),
            continuous: Mutex::new(None),
            egress: Arc::new(egress),
            budget: Arc::new(TrafficBudget::new(limits.bytes_per_session)),
            starts: Mutex::new(MinuteWindow::new(limits.runs_per_minute)),
            bytes_counted: AtomicU64::new(0),
        }
    }

    /// A poisoned lock still holds a sound value (one assignment), so it is taken over.
    fn continuous(&self) -> MutexGuard<'_, Option<Continuous>> {
        self.continuous.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether continuous runs go on.
    pub fn continuous_running(&self) -> bool {
        self.continuous().as_ref().is_some_and(|c| !c.is_finished())
    }

    /// Keeps the handle of the continuous runs just started.
    pub fn set_continuous(&self, runs: Continuous) {
        *self.continuous() = Some(runs);
    }

    /// Takes the continuous runs' handle, to stop them.
    pub fn take_continuous(&self) -> Option<Continuous> {
        self.continuous().take()
    }

    /// The settings of this session's runs: its egress policy and byte budget.
    pub fn settings(&self) -> ProbeSettings {
        ProbeSettings { egress: self.egress.clone(), budget: self.budget.clone(), ..ProbeSettings::default() }
    }

    pub fn runs_per_minute(&self) -> u32 {
        self.starts.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).per_minute()
    }

    /// Counts a run's start, or a 429 when the session's bytes are spent or
    /// it started too many runs in the last minute.
    pub fn start_run(&self) -> Result<(), ApiError> {
        if let Err(spent) = self.budget.check() {
            let message = format!("limit probe_bytes_per_session: {spent}; it does not free up");
            // No wait helps, but Retry-After must be a number: the session's
            // longest possible life.
            return Err(ApiError::too_many(Reason::ProbeBytes, message, Duration::from_secs(3600)));
        }
        let mut starts = self.starts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let per_minute = starts.per_minute();
        starts.start(Instant::now()).map_err(|wait| {
            let message = format!(
                "limit probe_runs_per_minute: {per_minute} probe runs a minute per session; the next frees up in {} s",
                crate::limits::secs(wait)
            );
            ApiError::too_many(Reason::ProbeRunsPerMinute, message, wait)
        })
    }

    /// Adds the bytes the probes moved since the last call to `counter`.
    pub fn count_bytes(&self, counter: &IntCounter) {
        let used = self.budget.used();
        let before = self.bytes_counted.swap(used, Ordering::Relaxed);
        counter.inc_by(used.saturating_sub(before));
    }
}

/// The parts of [`PodState`] the server makes before the state.
pub struct PodStateParts {
    pub identity: PodIdentity,
    pub public_keys: PublicKeys,
    pub metrics: Metrics,
    pub limiter: Limiter,
    pub random: RandomPool,
    pub udp_port: u16,
    pub udp_cookies: UdpCookies,
    pub reporter: OperatorReporter,
    pub probe_runs: ProbeRuns,
    pub tubes: crate::tubes::Tubes,
    pub body_read_timeout: Duration,
    pub shutdown: watch::Receiver<bool>,
}

impl PodState {
    pub fn new(parts: PodStateParts) -> Self {
        Self {
            identity: parts.identity,
            public_keys: parts.public_keys,
            metrics: parts.metrics,
            limiter: Mutex::new(parts.limiter),
            session: OnceLock::new(),
            random: parts.random,
            udp_port: parts.udp_port,
            udp_cookies: parts.udp_cookies,
            relay_key: OnceLock::new(),
            reporter: parts.reporter,
            body_read_timeout: parts.body_read_timeout,
            latest_results: Mutex::new(None),
            probe_runs: parts.probe_runs,
            tubes: parts.tubes,
            terminate: Notify::new(),
            shutdown: parts.shutdown,
            open_sockets: AtomicUsize::new(0),
            socket_closed: Notify::new(),
        }
    }

    /// The bound session, binding `first` if none is yet.
    pub fn bind(&self, first: impl FnOnce() -> BoundSession) -> Arc<BoundSession> {
        let mut bound_now = false;
        let session = self.session.get_or_init(|| {
            bound_now = true;
            Arc::new(first())
        });
        if bound_now {
            self.metrics.bound.set(1);
            tracing::info!(sid = %session.claims.sid, session = %session.claims.name, "bound to session");
        }
        session.clone()
    }

    /// The bound session, if any.
    pub fn session(&self) -> Option<&Arc<BoundSession>> {
        self.session.get()
    }

    /// A poisoned limiter is still consistent (every update is a few plain
    /// assignments), so a panic elsewhere must not stop the limits.
    fn limiter(&self) -> MutexGuard<'_, Limiter> {
        self.limiter.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn max_upload_bytes(&self) -> u64 {
        self.limiter().limits().max_upload_bytes
    }

    /// Lets `ip` open a socket (counted until the permit drops), or a 429.
    pub fn open_socket(self: &Arc<Self>, ip: IpAddr, opening: Opening) -> Result<SocketPermit, ApiError> {
        let opened = {
            let mut limiter = self.limiter();
            let opened = limiter.open(ip, opening, Instant::now());
            self.metrics.tracked_clients.set(limiter.tracked() as i64);
            opened
        };
        match opened {
            Ok(()) => {
                self.open_sockets.fetch_add(1, Ordering::Relaxed);
                self.metrics.open_sockets.inc();
                Ok(SocketPermit { state: self.clone(), ip })
            }
            Err(refusal) => Err(ApiError::from(refusal)),
        }
    }

    /// Counts traffic of `ip`; an error once its hourly bytes are spent.
    pub fn charge(&self, ip: IpAddr, bytes: u64) -> Result<(), Refusal> {
        self.limiter().charge(ip, bytes, Instant::now())
    }

    /// Counts a refusal that has no HTTP answer to carry it (inside a
    /// WebSocket, on a connection): answers are counted by their reason.
    pub fn count_refusal(&self, reason: Reason) {
        self.metrics.refusals.with_label_values(&[reason.label()]).inc();
    }

    /// Resolves once no socket is open.
    pub async fn all_sockets_closed(&self) {
        loop {
            // Registered before the check, so a close in between is not missed.
            let closed = self.socket_closed.notified();
            if self.open_sockets.load(Ordering::Relaxed) == 0 {
                return;
            }
            closed.await;
        }
    }

    /// A receiver that turns true at shutdown.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }
}

/// An open socket of one client; closing it (dropping) frees its place.
pub struct SocketPermit {
    state: Arc<PodState>,
    ip: IpAddr,
}

impl SocketPermit {
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    pub fn state(&self) -> &Arc<PodState> {
        &self.state
    }
}

impl Drop for SocketPermit {
    fn drop(&mut self) {
        self.state.limiter().close(self.ip);
        self.state.metrics.open_sockets.dec();
        self.state.open_sockets.fetch_sub(1, Ordering::Relaxed);
        self.state.socket_closed.notify_waiters();
    }
}

/// Counts a stream's bytes into the limits and a metric, in batches so the
/// hot path takes the limiter's lock rarely.
pub struct TrafficMeter {
    permit: SocketPermit,
    counter: IntCounter,
    uncounted: u64,
}

/// How many bytes a meter gathers before it charges them.
const CHARGE_EVERY_BYTES: u64 = 4 * 1024 * 1024;

impl TrafficMeter {
    pub fn new(permit: SocketPermit, counter: IntCounter) -> Self {
        Self { permit, counter, uncounted: 0 }
    }

    /// Adds `bytes`; an error once the client's hourly bytes are spent.
    pub fn add(&mut self, bytes: u64) -> Result<(), Refusal> {
        self.uncounted += bytes;
        if self.uncounted >= CHARGE_EVERY_BYTES { self.flush() } else { Ok(()) }
    }

    /// Charges what was gathered.
    pub fn flush(&mut self) -> Result<(), Refusal> {
        let bytes = std::mem::take(&mut self.uncounted);
        self.counter.inc_by(bytes);
        self.permit.state.charge(self.permit.ip, bytes)
    }

    pub fn state(&self) -> &Arc<PodState> {
        self.permit.state()
    }
}

impl Drop for TrafficMeter {
    fn drop(&mut self) {
        // Over the limit or not, the bytes flowed; the next request is refused.
        let _ = self.flush();
    }
}

/// Resolves when `signal` turns true (or its sender is gone).
pub async fn until_shutdown(signal: &mut watch::Receiver<bool>) {
    // The guard `wait_for` gives back is not Send: drop it here, not in a caller's select.
    let _ = signal.wait_for(|down| *down).await;
}
