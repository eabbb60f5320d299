//! The gateway's Prometheus metrics. Names start with `tidepool_gateway_`,
//! carry base units, and every label has a small fixed set of values.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct Metrics {
    registry: Registry,
    /// `route`: sessions, session, streams, pools, cluster, ui, routed, other; `code`: the HTTP status.
    pub requests: IntCounterVec,
    /// `reason`: why a request or connection was refused.
    pub refusals: IntCounterVec,
    /// Bytes proxied to session pods (`to_pod`) and back (`to_client`), and
    /// to routed backends (`to_backend`) and back (`from_backend`).
    pub proxied_bytes: IntCounterVec,
    /// Streams (proxied requests and WebSockets) open now.
    pub open_streams: IntGauge,
    /// Connections open now, upgraded ones included.
    pub open_connections: IntGauge,
    /// Anonymous sessions started.
    pub anonymous_sessions: IntCounter,
    /// `outcome`: reloaded, failed; reads of the TLS files that found a change.
    pub tls_reloads: IntCounterVec,
    /// `direction`: to_pod, to_client; `outcome`: relayed, send_failed, or
    /// why a datagram was dropped.
    pub udp_datagrams: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let metric = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let metric = IntGauge::new(name, help)?;
            registry.register(Box::new(metric.clone()))?;
            Ok(metric)
        };
        let requests = counter_vec(
            "tidepool_gateway_requests_total",
            "Requests answered, by route and status",
            &["route", "code"],
        )?;
        let refusals =
            counter_vec("tidepool_gateway_refusals_total", "Requests and connections refused, by reason", &["reason"])?;
        let proxied_bytes = counter_vec(
            "tidepool_gateway_proxied_bytes_total",
            "Bytes proxied between clients and session pods or routed backends",
            &["direction"],
        )?;
        let open_streams = gauge("tidepool_gateway_open_streams", "Proxied requests and WebSockets open now")?;
        let open_connections = gauge("tidepool_gateway_open_connections", "Client connections open now")?;
        let tls_reloads = counter_vec(
            "tidepool_gateway_tls_reloads_total",
            "Changed TLS certificates served, or refused and the old one kept",
            &["outcome"],
        )?;
        let udp_datagrams = counter_vec(
            "tidepool_gateway_udp_datagrams_total",
            "UDP echo datagrams relayed or dropped, by direction and outcome",
            &["direction", "outcome"],
        )?;
        for direction in ["to_pod", "to_client"] {
            let dropped = crate::udp_relay::Dropped::ALL.map(|d| d.label());
            for outcome in ["relayed", "send_failed"].into_iter().chain(dropped) {
                udp_datagrams.with_label_values(&[direction, outcome]);
            }
        }
        let anonymous_sessions =
            IntCounter::new("tidepool_gateway_anonymous_sessions_total", "Anonymous sessions started")?;
        registry.register(Box::new(anonymous_sessions.clone()))?;
        // Every direction from the start, so rates work before the first byte.
        for direction in ["to_pod", "to_client", "to_backend", "from_backend"] {
            proxied_bytes.with_label_values(&[direction]);
        }
        Ok(Self {
            registry,
            requests,
            refusals,
            proxied_bytes,
            open_streams,
            open_connections,
            anonymous_sessions,
            tls_reloads,
            udp_datagrams,
        })
    }

    pub fn refused(&self, reason: &str) {
        self.refusals.with_label_values(&[reason]).inc();
    }

    /// The Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
