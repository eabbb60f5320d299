//! The pod's Prometheus metrics: traffic, refusals and the session's latest
//! results. Names start with `tidepool_session_`, carry their unit in base
//! units (seconds, bytes) and every label has a fixed, small set of values.

use prometheus::{Encoder, GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tidepool_crds::test_session::{Grade, SessionResults};

use tidepool_protocol::pod::HouseholdUser;

/// The `reason` of `connections_closed_total` for a head not in within the header timeout.
pub const HEADER_TIMEOUT: &str = "header_timeout";
/// The `reason` of `connections_closed_total` for a connection idle past the idle timeout.
pub const IDLE_TIMEOUT: &str = "idle_timeout";
/// The `reason` of `connections_closed_total` for a client that stopped taking bytes.
pub const WRITE_TIMEOUT: &str = "write_timeout";

pub struct Metrics {
    registry: Registry,
    /// `route`: one of [`route_label`]'s; `code`: the HTTP status.
    pub requests: IntCounterVec,
    /// `reason`: why a request or socket was refused.
    pub refusals: IntCounterVec,
    /// 1 once a session has bound the pod.
    pub bound: IntGauge,
    pub open_sockets: IntGauge,
    pub tracked_clients: IntGauge,
    pub download_bytes: IntCounter,
    pub upload_bytes: IntCounter,
    /// `outcome`: answered or rate_limited.
    pub pings: IntCounterVec,
    /// `user`, `direction` (sent or received).
    pub household_bytes: IntCounterVec,
    /// `outcome`: echoed, send_failed, or a [`crate::udp_cookie::Dropped`] label.
    pub udp_datagrams: IntCounterVec,
    pub udp_bytes: IntCounter,
    /// `direction`: receive or send; what the kernel granted.
    pub udp_socket_buffer_bytes: IntGaugeVec,
    /// `reported`: true or false.
    pub results: IntCounterVec,
    /// Connections open now, WebSockets included.
    pub open_connections: IntGauge,
    /// `reason`: header_timeout, idle_timeout.
    pub connections_closed: IntCounterVec,
    /// Bytes the session's probes sent and received.
    pub probe_bytes: IntCounter,
    /// `mode`: once, continuous.
    pub probe_runs: IntCounterVec,
    /// `reason`: an egress refusal's label (loopback, private, cluster, ...).
    pub probe_egress_refusals: IntCounterVec,
    /// Tube set-ups, by outcome (answered, connected, not_connected, or a refusal's reason).
    pub tube_creations: IntCounterVec,
    /// Tubes now, by state; set when /metrics is read.
    pub tubes: IntGaugeVec,
    results_gauges: ResultsGauges,
}

/// The latest results, as gauges.
struct ResultsGauges {
    /// `statistic`: p50, p95, p99, jitter.
    latency_seconds: GaugeVec,
    /// No labels: a vector only so that it can be emptied.
    loss_ratio: GaugeVec,
    /// `load`: download, upload, bidirectional.
    loaded_latency_seconds: GaugeVec,
    /// `direction`: download, upload.
    throughput_bytes_per_second: GaugeVec,
    /// `grade`: bufferbloat, household, overall; A+ is 0 and F is 5.
    grade_rank: IntGaugeVec,
    /// No labels, as `loss_ratio`.
    quality_points: IntGaugeVec,
    /// `user`: the four household users.
    household_share_ratio: GaugeVec,
}

/// The metric-name prefix.
const PREFIX: &str = "tidepool_session";

fn opts(name: &str, help: &str) -> Opts {
    Opts::new(format!("{PREFIX}_{name}"), help)
}

/// Registers `metric` and hands it back.
fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: M,
) -> Result<M, prometheus::Error> {
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let r = &registry;
        let counter = |name: &str, help: &str| register(r, IntCounter::with_opts(opts(name, help))?);
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| register(r, IntCounterVec::new(opts(name, help), labels)?);
        let gauge = |name: &str, help: &str| register(r, IntGauge::with_opts(opts(name, help))?);
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| register(r, GaugeVec::new(opts(name, help), labels)?);
        let results_gauges = ResultsGauges {
            latency_seconds: gauge_vec(
                "result_latency_seconds",
                "Idle round-trip latency of the latest results, by statistic (p50, p95, p99, jitter).",
                &["statistic"],
            )?,
            loss_ratio: gauge_vec("result_loss_ratio", "Probes lost in the latest results, 0 to 1.", &[])?,
            loaded_latency_seconds: gauge_vec(
                "result_loaded_latency_seconds",
                "Median round trip under load in the latest results, by load.",
                &["load"],
            )?,
            throughput_bytes_per_second: gauge_vec(
                "result_throughput_bytes_per_second",
                "Throughput of the latest results, by direction.",
                &["direction"],
            )?,
            grade_rank: register(
                r,
                IntGaugeVec::new(
                    opts("result_grade_rank", "Grades of the latest results: A+ is 0, A 1, B 2, C 3, D 4, F 5."),
                    &["grade"],
                )?,
            )?,
            quality_points: register(
                r,
                IntGaugeVec::new(
                    opts("result_quality_points", "Cloudflare-style quality points of the latest results."),
                    &[],
                )?,
            )?,
            household_share_ratio: gauge_vec(
                "result_household_share_ratio",
                "Throughput each household user got against its target in the latest results.",
                &["user"],
            )?,
        };
        Ok(Self {
            requests: counter_vec(
                "requests_total",
                "HTTP requests answered, by route and status.",
                &["route", "code"],
            )?,
            refusals: counter_vec("refusals_total", "Requests and sockets refused, by reason.", &["reason"])?,
            bound: gauge("bound", "1 once a session has bound this pod.")?,
            open_sockets: gauge("open_sockets", "WebSockets and download/upload streams open now.")?,
            tracked_clients: gauge("tracked_clients", "Client addresses the abuse limits remember.")?,
            download_bytes: counter("download_bytes_total", "Bytes sent by /download.")?,
            upload_bytes: counter("upload_bytes_total", "Bytes received by /upload.")?,
            pings: counter_vec("pings_total", "WebSocket pings, by outcome.", &["outcome"])?,
            household_bytes: counter_vec(
                "household_bytes_total",
                "Household traffic, by user and direction.",
                &["user", "direction"],
            )?,
            udp_datagrams: counter_vec("udp_datagrams_total", "UDP echo datagrams, by outcome.", &["outcome"])?,
            udp_bytes: counter("udp_bytes_total", "Bytes of UDP echo datagrams echoed.")?,
            udp_socket_buffer_bytes: register(
                r,
                IntGaugeVec::new(
                    opts("udp_socket_buffer_bytes", "The UDP echo socket's buffers as the kernel sized them."),
                    &["direction"],
                )?,
            )?,
            results: counter_vec(
                "results_total",
                "Results submitted, by whether the operator took them.",
                &["reported"],
            )?,
            open_connections: gauge("open_connections", "HTTP connections open now, WebSockets included.")?,
            connections_closed: counter_vec(
                "connections_closed_total",
                "Connections the pod closed on its own, by reason.",
                &["reason"],
            )?,
            probe_bytes: counter("probe_bytes_total", "Bytes the session's outbound probes sent and received.")?,
            probe_runs: counter_vec("probe_runs_total", "Outbound probe runs, by mode.", &["mode"])?,
            probe_egress_refusals: counter_vec(
                "probe_egress_refusals_total",
                "Probe targets the egress policy refused, by the kind of address.",
                &["reason"],
            )?,
            tube_creations: counter_vec(
                "tube_creations_total",
                "Tube set-ups, by outcome: answered, connected, not_connected, or the reason it was refused.",
                &["outcome"],
            )?,
            tubes: register(r, IntGaugeVec::new(opts("tubes", "Tubes on this pod now, by state."), &["state"])?)?,
            results_gauges,
            registry,
        })
        .inspect(Metrics::start_at_zero)
    }

    /// Shows every fixed label value at 0 from the start, so that a rate
    /// over the first refusal of a kind is not lost.
    fn start_at_zero(&self) {
        for reason in crate::error::Reason::ALL {
            self.refusals.with_label_values(&[reason.label()]);
        }
        for dropped in crate::udp_cookie::Dropped::ALL {
            self.udp_datagrams.with_label_values(&[dropped.label()]);
        }
        for outcome in ["echoed", "relayed", "send_failed"] {
            self.udp_datagrams.with_label_values(&[outcome]);
        }
        for closed in [HEADER_TIMEOUT, IDLE_TIMEOUT, WRITE_TIMEOUT] {
            self.connections_closed.with_label_values(&[closed]);
        }
        for mode in ["once", "continuous"] {
            self.probe_runs.with_label_values(&[mode]);
        }
        for outcome in ["answered", "connected", "not_connected"] {
            self.tube_creations.with_label_values(&[outcome]);
        }
    }

    /// The text exposition.
    pub fn render(&self) -> Result<Vec<u8>, prometheus::Error> {
        let mut text = Vec::with_capacity(8 * 1024);
        prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut text)?;
        Ok(text)
    }

    /// Shows `results` (graded) in the result gauges; figures it lacks are
    /// removed, so the gauges never mix two submissions.
    pub fn show_results(&self, results: &SessionResults) {
        let g = &self.results_gauges;
        for vec in [
            &g.latency_seconds,
            &g.loss_ratio,
            &g.loaded_latency_seconds,
            &g.throughput_bytes_per_second,
            &g.household_share_ratio,
        ] {
            vec.reset();
        }
        g.grade_rank.reset();
        g.quality_points.reset();
        if let Some(latency) = &results.latency {
            for (statistic, ms) in [
                ("p50", latency.p50_ms),
                ("p95", latency.p95_ms),
                ("p99", latency.p99_ms),
                ("jitter", latency.jitter_ms),
            ] {
                g.latency_seconds.with_label_values(&[statistic]).set(ms / 1e3);
            }
            g.loss_ratio.with_label_values::<&str>(&[]).set(latency.loss_percent / 100.0);
        }
        if let Some(loaded) = &results.loaded_latency {
            for (load, ms) in [
                ("download", loaded.download_ms),
                ("upload", loaded.upload_ms),
                ("bidirectional", loaded.bidirectional_ms),
            ] {
                if let Some(ms) = ms {
                    g.loaded_latency_seconds.with_label_values(&[load]).set(ms / 1e3);
                }
            }
        }
        for (direction, mbps) in [("download", results.download_mbps), ("upload", results.upload_mbps)] {
            if let Some(mbps) = mbps {
                g.throughput_bytes_per_second.with_label_values(&[direction]).set(mbps * 1e6 / 8.0);
            }
        }
        if let Some(grades) = &results.grades {
            for (name, grade) in
                [("bufferbloat", grades.bufferbloat), ("household", grades.household), ("overall", grades.overall)]
            {
                if let Some(grade) = grade {
                    g.grade_rank.with_label_values(&[name]).set(grade_rank(grade));
                }
            }
            if let Some(points) = grades.quality_points {
                g.quality_points.with_label_values::<&str>(&[]).set(i64::from(points));
            }
        }
        // Only the four known users: the label stays bounded whatever a client sends.
        for user in &results.household {
            if let Some(known) = HouseholdUser::parse(&user.user) {
                g.household_share_ratio.with_label_values(&[known.as_str()]).set(user.share_percent / 100.0);
            }
        }
    }
}

fn grade_rank(grade: Grade) -> i64 {
    i64::from(tidepool_protocol::grading::rank(grade))
}

/// The bounded `route` label of a request path.
pub fn route_label(path: &str) -> &'static str {
    use tidepool_protocol::pod::{
        DOWNLOAD_PATH, HEALTH_PATH, INFO_PATH, LATENCY_WS_PATH, METRICS_PATH, PROBES_PATH, RESULTS_PATH,
        UDP_GRANT_PATH, UPLOAD_PATH,
    };
    match path {
        HEALTH_PATH => "health",
        METRICS_PATH => "metrics",
        INFO_PATH => "info",
        LATENCY_WS_PATH => "ws",
        DOWNLOAD_PATH => "download",
        UPLOAD_PATH => "upload",
        UDP_GRANT_PATH => "udp",
        tidepool_protocol::tube::POD_TUBES_PATH => "tubes",
        _ if path.starts_with("/api/v1/tubes/") => "tube",
        RESULTS_PATH => "results",
        PROBES_PATH => "probes",
        _ if path.starts_with("/ws/household/") => "household",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_crds::test_session::{Grades, LatencySummary};

    #[test]
    fn results_show_in_base_units_and_replace_the_previous_ones() {
        let metrics = Metrics::new().unwrap();
        metrics.show_results(&SessionResults {
            latency: Some(LatencySummary { p50_ms: 12.0, loss_percent: 5.0, ..Default::default() }),
            download_mbps: Some(80.0),
            grades: Some(Grades { overall: Some(Grade::B), ..Default::default() }),
            ..Default::default()
        });
        let text = String::from_utf8(metrics.render().unwrap()).unwrap();
        assert!(text.contains("tidepool_session_result_latency_seconds{statistic=\"p50\"} 0.012"), "{text}");
        assert!(text.contains("tidepool_session_result_loss_ratio 0.05"), "{text}");
        assert!(text.contains("direction=\"download\"} 10000000"), "{text}");
        assert!(text.contains("tidepool_session_result_grade_rank{grade=\"overall\"} 2"), "{text}");

        metrics.show_results(&SessionResults { upload_mbps: Some(8.0), ..Default::default() });
        let text = String::from_utf8(metrics.render().unwrap()).unwrap();
        assert!(!text.contains("direction=\"download\""), "{text}");
        assert!(text.contains("direction=\"upload\"} 1000000"), "{text}");
    }

    #[test]
    fn route_labels_are_bounded() {
        assert_eq!(route_label("/ws/household/gaming"), "household");
        assert_eq!(route_label("/download"), "download");
        assert_eq!(route_label("/anything/else"), "other");
    }
}
