//! The operator's Prometheus metrics. Label sets are bounded: controllers,
//! error kinds, routes, and the pools people create.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the operator serves on /metrics.
pub struct Metrics {
    registry: Registry,
    pub reconciles: IntCounterVec,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: HistogramVec,
    pub session_ready: Histogram,
    pub binding_writes: Histogram,
    pub binding_conflicts: IntCounter,
    pub pool_pods: IntGaugeVec,
    pub api_requests: IntCounterVec,
    pub api_refusals: IntCounterVec,
    pub connection_refusals: IntCounterVec,
    pub leader: IntGauge,
    pub agent_reports: IntCounterVec,
    pub backends: IntGaugeVec,
    pub backend_writes: IntCounter,
    pub placements: IntCounterVec,
    pub placement_view_age: Histogram,
    pub monitor_runs: IntCounterVec,
    pub monitor_tier: IntGaugeVec,
    pub monitor_last_run: GaugeVec,
    pub exports: IntCounterVec,
    pub export_call: Histogram,
    pub export_delay: Histogram,
    pub export_backlog: IntGauge,
    pub export_oldest_pending: prometheus::Gauge,
    pub tubes: IntGaugeVec,
    pub tube_connections: IntGauge,
    pub tube_creations: IntCounterVec,
    pub tube_ends: IntCounterVec,
    pub tube_bytes: IntCounterVec,
    pub tube_setup: Histogram,
}

impl Metrics {
    /// Registers every metric. Names are fixed, so this only fails on a bug.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new("tidepool_reconciles_total", "Reconciles run, by controller"),
            &["controller"],
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new("tidepool_reconcile_errors_total", "Reconciles that failed, by controller and error kind"),
            &["controller", "kind"],
        )?;
        let reconcile_duration = HistogramVec::new(
            HistogramOpts::new("tidepool_reconcile_duration_seconds", "Time spent in one reconcile")
                .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            &["controller"],
        )?;
        let session_ready = Histogram::with_opts(
            HistogramOpts::new(
                "tidepool_session_create_to_ready_seconds",
                "From the operator's first sight of a TestSession to its Ready status, written",
            )
            .buckets(vec![
                0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
                60.0,
            ]),
        )?;
        let binding_writes = Histogram::with_opts(
            HistogramOpts::new(
                "tidepool_session_binding_api_writes",
                "API server writes the operator made to bind one session, counted when it turns Ready",
            )
            .buckets(vec![1.0, 2.0, 3.0, 4.0, 6.0, 10.0]),
        )?;
        let binding_conflicts = IntCounter::new(
            "tidepool_binding_conflicts_total",
            "Pod claims refused with 409 Conflict and settled by reading the pod",
        )?;
        let pool_pods = IntGaugeVec::new(
            Opts::new("tidepool_pool_pods", "Pods of each pool, by state (warm, assigned, pending)"),
            &["namespace", "pool", "state"],
        )?;
        let api_requests = IntCounterVec::new(
            Opts::new("tidepool_api_requests_total", "HTTP API requests, by route and status code"),
            &["route", "code"],
        )?;
        let api_refusals = IntCounterVec::new(
            Opts::new(
                "tidepool_api_refusals_total",
                "HTTP API requests refused before any work, by route and reason (bad_token, forbidden, bad_name, ...)",
            ),
            &["route", "reason"],
        )?;
        let connection_refusals = IntCounterVec::new(
            Opts::new(
                "tidepool_connection_refusals_total",
                "Connections or requests the HTTP server cut, by reason (connection_cap, header_timeout, idle, slow_body)",
            ),
            &["reason"],
        )?;
        let leader = IntGauge::new("tidepool_leader", "1 while this replica holds the leader lease")?;
        let agent_reports = IntCounterVec::new(
            Opts::new("tidepool_agent_reports_total", "Agent reports, by result (accepted, or why refused)"),
            &["result"],
        )?;
        let backends = IntGaugeVec::new(
            Opts::new("tidepool_backends", "Backends in the live view, by state (ready, stale, unhealthy)"),
            &["state"],
        )?;
        let backend_writes =
            IntCounter::new("tidepool_backend_writes_total", "Backend spec and status writes to the API server")?;
        let placements = IntCounterVec::new(
            Opts::new("tidepool_placements_total", "Placement decisions, by caller and result (placed, no_fit)"),
            &["caller", "result"],
        )?;
        let placement_view_age = Histogram::with_opts(
            HistogramOpts::new(
                "tidepool_placement_view_age_seconds",
                "How old the chosen backend's report was when placement chose it",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0]),
        )?;
        let monitor_runs = IntCounterVec::new(
            Opts::new(
                "tidepool_monitor_runs_total",
                "Monitor runs recorded, by monitor and result (Succeeded, Degraded, Failed)",
            ),
            &["namespace", "monitor", "result"],
        )?;
        let monitor_tier = IntGaugeVec::new(
            Opts::new("tidepool_monitor_tier", "The tier a monitor's next run starts in"),
            &["namespace", "monitor"],
        )?;
        let monitor_last_run = GaugeVec::new(
            Opts::new("tidepool_monitor_last_run_timestamp_seconds", "When a monitor last recorded a run (Unix time)"),
            &["namespace", "monitor"],
        )?;
        let exports = IntCounterVec::new(
            Opts::new(
                "tidepool_results_exports_total",
                "Calls to store an ended session's results, by result (stored, failed)",
            ),
            &["result"],
        )?;
        let export_call = Histogram::with_opts(
            HistogramOpts::new("tidepool_results_export_call_seconds", "How long one store call took")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )?;
        let export_delay = Histogram::with_opts(
            HistogramOpts::new(
                "tidepool_results_export_delay_seconds",
                "From a session's end to its results being stored",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0]),
        )?;
        let export_backlog =
            IntGauge::new("tidepool_results_export_backlog", "Ended sessions whose results are not stored yet")?;
        let export_oldest_pending = prometheus::Gauge::new(
            "tidepool_results_export_oldest_pending_seconds",
            "How long the oldest ended session has waited for its results to be stored",
        )?;
        let tubes = IntGaugeVec::new(
            Opts::new("tidepool_tubes", "Tubes, by state (Pending, Answered, Connected, Closed, Failed)"),
            &["state"],
        )?;
        let tube_connections =
            IntGauge::new("tidepool_tube_connections", "TCP connections the tubes carry, as their pods last said")?;
        let tube_creations = IntCounterVec::new(
            Opts::new(
                "tidepool_tube_creations_total",
                "Tube set-ups, by outcome (answered, connected, pod_busy, refused, bad_offer, failed)",
            ),
            &["outcome"],
        )?;
        let tube_ends = IntCounterVec::new(
            Opts::new("tidepool_tube_ends_total", "Tubes ended, by reason (Idle, Deleted, PeerGone, PodGone, ...)"),
            &["reason"],
        )?;
        let tube_bytes = IntCounterVec::new(
            Opts::new("tidepool_tube_bytes_total", "Bytes the tubes carried, by direction (to_client, from_client)"),
            &["direction"],
        )?;
        let tube_setup = Histogram::with_opts(
            HistogramOpts::new(
                "tidepool_tube_setup_seconds",
                "From a Tube's creation to the operator seeing its data channel open",
            )
            .buckets(vec![0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0]),
        )?;
        registry.register(Box::new(tubes.clone()))?;
        registry.register(Box::new(tube_connections.clone()))?;
        registry.register(Box::new(tube_creations.clone()))?;
        registry.register(Box::new(tube_ends.clone()))?;
        registry.register(Box::new(tube_bytes.clone()))?;
        registry.register(Box::new(tube_setup.clone()))?;
        registry.register(Box::new(exports.clone()))?;
        registry.register(Box::new(export_call.clone()))?;
        registry.register(Box::new(export_delay.clone()))?;
        registry.register(Box::new(export_backlog.clone()))?;
        registry.register(Box::new(export_oldest_pending.clone()))?;
        registry.register(Box::new(monitor_runs.clone()))?;
        registry.register(Box::new(monitor_tier.clone()))?;
        registry.register(Box::new(monitor_last_run.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(session_ready.clone()))?;
        registry.register(Box::new(binding_writes.clone()))?;
        registry.register(Box::new(binding_conflicts.clone()))?;
        registry.register(Box::new(pool_pods.clone()))?;
        registry.register(Box::new(api_requests.clone()))?;
        registry.register(Box::new(api_refusals.clone()))?;
        registry.register(Box::new(connection_refusals.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        registry.register(Box::new(agent_reports.clone()))?;
        registry.register(Box::new(backends.clone()))?;
        registry.register(Box::new(backend_writes.clone()))?;
        registry.register(Box::new(placements.clone()))?;
        registry.register(Box::new(placement_view_age.clone()))?;
        Ok(Self {
            registry,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            session_ready,
            binding_writes,
            binding_conflicts,
            pool_pods,
            api_requests,
            api_refusals,
            connection_refusals,
            leader,
            agent_reports,
            backends,
            backend_writes,
            placements,
            placement_view_age,
            monitor_runs,
            monitor_tier,
            monitor_last_run,
            exports,
            export_call,
            export_delay,
            export_backlog,
            export_oldest_pending,
            tubes,
            tube_connections,
            tube_creations,
            tube_ends,
            tube_bytes,
            tube_setup,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding gathered families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}
