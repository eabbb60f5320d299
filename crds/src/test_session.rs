//! TestSession: one user's session on one warm pod, and what it measured.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
#[cfg(feature = "resource")]
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Conditions, conditions, optional_date_time};

/// One user's network session: a warm pod bound to it, the tests it runs, and
/// their results. A TTL ends it. The spec is fixed once created.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[cfg_attr(feature = "resource", derive(CustomResource))]
#[cfg_attr(
    feature = "resource",
    kube(
        group = "tidepool.dev",
        version = "v1alpha1",
        kind = "TestSession",
        namespaced,
        shortname = "ts",
        category = "tidepool",
        status = "TestSessionStatus",
        printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
        printcolumn(name = "Pool", type_ = "string", json_path = ".spec.pool"),
        printcolumn(name = "Pod", type_ = "string", json_path = ".status.pod"),
        printcolumn(name = "Node", type_ = "string", json_path = ".status.node"),
        printcolumn(name = "Grade", type_ = "string", json_path = ".status.results.grades.overall"),
        printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
        doc = "One user's network test session"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    { "rule": "self == oldSelf", "message": "spec is immutable once the session is created" }
]))]
pub struct TestSessionSpec {
    /// The WarmPool (same namespace) that serves this session.
    #[schemars(length(min = 1, max = 253), regex(pattern = crate::common::NAME_PATTERN))]
    pub pool: String,
    /// Which tests the session pod runs.
    #[serde(default)]
    pub profile: Profile,
    /// Seconds the session lives; the pool's `sessionTTLSeconds` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub ttl_seconds: Option<i64>,
    /// Sessions with the same key go to the same backend while it stays fresh,
    /// healthy and has room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9._:-]+$"))]
    pub sticky_key: Option<String>,
    /// What is known of the client, for distance-aware placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientHints>,
    /// Outbound probes the session pod runs (the `probes` profile).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub probes: Vec<ProbeTarget>,
}

/// The test plans a session can run.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Idle round-trip latency, jitter and loss.
    #[default]
    Latency,
    /// Download and upload throughput.
    Speed,
    /// Latency idle and under download, upload and both: the bufferbloat grade.
    Bufferbloat,
    /// The virtual household: four simulated users sharing the line.
    Household,
    /// Outbound probes to the session's targets.
    Probes,
}

/// What the client tells about itself.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.latitude) == has(self.longitude)",
        "message": "client.latitude and client.longitude must be given together",
        "fieldPath": ".latitude"
    }
]))]
pub struct ClientHints {
    /// The client's IP address as it sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 45), extend("x-kubernetes-validations" = [
        { "rule": "isIP(self)", "message": "client.address must be an IPv4 or IPv6 address" }
    ]))]
    pub address: Option<String>,
    /// Degrees north, -90 to 90.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -90.0, max = 90.0))]
    pub latitude: Option<f64>,
    /// Degrees east, -180 to 180.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = -180.0, max = 180.0))]
    pub longitude: Option<f64>,
}

/// One outbound probe target.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.type != 'http' || has(self.url)",
        "message": "probes[].url is required for an http probe",
        "fieldPath": ".url"
    },
    {
        "rule": "self.type == 'http' || has(self.host)",
        "message": "probes[].host is required for every probe but http",
        "fieldPath": ".host"
    },
    {
        "rule": "!(self.type in ['tcp', 'tls', 'udp']) || has(self.port)",
        "message": "probes[].port is required for tcp, tls and udp probes",
        "fieldPath": ".port"
    }
]))]
pub struct ProbeTarget {
    /// The kind of probe.
    #[serde(rename = "type")]
    pub kind: ProbeKind,
    /// An http or https URL, for `http` probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://[^\s/$.?#].[^\s]*$"))]
    pub url: Option<String>,
    /// A host name or IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9.:-]+$"))]
    pub host: Option<String>,
    /// A port, 1 to 65535.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
}

/// Probe kinds, after the performance platform's.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// HTTP(S) with the DNS / connect / TLS / first byte / total split.
    Http,
    /// A TCP connect.
    Tcp,
    /// A TCP connect and TLS handshake.
    Tls,
    /// A UDP echo.
    Udp,
    /// A DNS lookup of the host.
    Dns,
    /// ICMP echo, where the pod may open raw sockets.
    Icmp,
    /// The route to the host.
    Traceroute,
    /// An SSH server's banner and key exchange (port 22 when none is given).
    Ssh,
}

/// Where a session is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    /// Waiting for a pod.
    #[default]
    Pending,
    /// Bound to a pod that is not serving it yet.
    Assigned,
    /// The pod serves this session; the client may connect.
    Ready,
    /// Tests are running.
    Running,
    /// Tests finished and results are in.
    Completed,
    /// The TTL ran out.
    Expired,
    /// The session cannot go on; the conditions say why.
    Failed,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

impl Phase {
    /// The name, as `status.phase` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Assigned => "Assigned",
            Self::Ready => "Ready",
            Self::Running => "Running",
            Self::Completed => "Completed",
            Self::Expired => "Expired",
            Self::Failed => "Failed",
        }
    }

    /// Completed, Expired or Failed: the session is over and keeps only its results.
    pub fn has_ended(self) -> bool {
        matches!(self, Self::Completed | Self::Expired | Self::Failed)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The session as the operator last saw it, and what it measured.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TestSessionStatus {
    /// Where the session is in its life.
    #[serde(default)]
    pub phase: Phase,
    /// The bound pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The node the pod runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// The Backend placement chose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Where the client connects (`http://ip:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// When the session was created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub created_at: Option<Time>,
    /// When it was bound to a pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub assigned_at: Option<Time>,
    /// When its pod started serving it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub ready_at: Option<Time>,
    /// When the TTL ends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub expires_at: Option<Time>,
    /// The id of the pool key the bound pod checks credentials with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub key_id: Option<String>,
    /// How many times the session moved to a new pod after its pod went away.
    #[serde(default, skip_serializing_if = "is_zero")]
    #[schemars(range(min = 0))]
    pub rebinds: i32,
    /// The summary of what the session measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<SessionResults>,
    /// When the operator stored the ended session's results in the results
    /// store (when one is configured); until then it does not delete the
    /// session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub exported_at: Option<Time>,
    /// Bound, Ready, Exported and the reasons for waiting or failing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions")]
    pub conditions: Conditions,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Summary results; the raw series stay in Prometheus. Written only by the
/// results route of the operator's API, on the session pod's report.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionResults {
    /// The session's last results: the session is Completed and its pod released.
    #[serde(default, rename = "final", skip_serializing_if = "std::ops::Not::not")]
    pub is_final: bool,
    /// When the operator accepted these results.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub reported_at: Option<Time>,
    /// Idle round-trip latency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<LatencySummary>,
    /// Latency under load, per direction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loaded_latency: Option<LoadedLatency>,
    /// Download throughput in Mbit/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub download_mbps: Option<f64>,
    /// Upload throughput in Mbit/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub upload_mbps: Option<f64>,
    /// Letter grades.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grades: Option<Grades>,
    /// Per simulated user of the virtual household.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub household: Vec<HouseholdUserResult>,
    /// One per probe run: each target, plus what escalated tiers add
    /// (traceroutes, certificate checks, jitter series, downloads).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 160))]
    pub probes: Vec<ProbeResult>,
}

/// Round-trip statistics in milliseconds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LatencySummary {
    /// Median round trip.
    #[schemars(range(min = 0.0))]
    pub p50_ms: f64,
    /// 95th percentile.
    #[schemars(range(min = 0.0))]
    pub p95_ms: f64,
    /// 99th percentile.
    #[schemars(range(min = 0.0))]
    pub p99_ms: f64,
    /// RFC 3550 interarrival jitter.
    #[schemars(range(min = 0.0))]
    pub jitter_ms: f64,
    /// Lost probes, percent.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub loss_percent: f64,
    /// Round trips sampled.
    #[schemars(range(min = 0))]
    pub samples: i64,
}

/// Median latency while the line is loaded, and its rise over idle.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadedLatency {
    /// Under download load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub download_ms: Option<f64>,
    /// Under upload load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub upload_ms: Option<f64>,
    /// Under both at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub bidirectional_ms: Option<f64>,
}

/// A+ to F.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, JsonSchema)]
pub enum Grade {
    #[serde(rename = "A+")]
    APlus,
    A,
    B,
    C,
    D,
    F,
}

/// Letter grades of a session.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Grades {
    /// From the rise of latency under load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bufferbloat: Option<Grade>,
    /// From the household's fairness score.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub household: Option<Grade>,
    /// The worst that matters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overall: Option<Grade>,
    /// Cloudflare-style quality points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality_points: Option<i32>,
}

/// How one simulated household member fared.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HouseholdUserResult {
    /// gaming, videoCall, streaming or bulk.
    #[schemars(length(min = 1, max = 32))]
    pub user: String,
    /// Mean of the first pings.
    #[schemars(range(min = 0.0))]
    pub baseline_ms: f64,
    /// Mean latency during the test.
    #[schemars(range(min = 0.0))]
    pub mean_ms: f64,
    /// Standard deviation of latency.
    #[schemars(range(min = 0.0))]
    pub jitter_ms: f64,
    /// Throughput achieved against the profile's target, percent.
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub share_percent: f64,
    /// none, mild, moderate or severe rise over baseline.
    pub severity: Severity,
}

/// How badly latency rose over a user's baseline.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    None,
    Mild,
    Moderate,
    Severe,
}

/// The outcome of one probe.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResult {
    /// The kind of probe.
    #[serde(rename = "type")]
    pub kind: ProbeKind,
    /// The URL or host:port probed.
    #[schemars(length(max = 2048))]
    pub target: String,
    /// Whether it succeeded.
    pub ok: bool,
    /// The escalation tier it ran in (1 to 3).
    #[serde(default = "first_tier")]
    #[schemars(range(min = 1, max = 3))]
    pub tier: i32,
    /// The timing split, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timings: Option<ProbeTimings>,
    /// The protocol spoken (for example `HTTP/1.1`, `h2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub protocol: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub error: Option<String>,
    /// What else the probe found, in one line: addresses, round trips and
    /// loss, traceroute hops, certificate days left, download rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub detail: Option<String>,
}

fn first_tier() -> i32 {
    1
}

/// The parts of a probe's time, in milliseconds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProbeTimings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub dns_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub connect_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub tls_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub first_byte_ms: Option<f64>,
    /// ssh: the key exchange, from our KEXINIT to the server's reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub kex_ms: Option<f64>,
    #[schemars(range(min = 0.0))]
    pub total_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_is_named_as_serde_writes_it() {
        use Phase::*;
        for phase in [Pending, Assigned, Ready, Running, Completed, Expired, Failed] {
            assert_eq!(serde_json::to_value(phase).unwrap(), phase.as_str());
            assert_eq!(phase.to_string(), phase.as_str());
            assert_eq!(phase.has_ended(), matches!(phase, Completed | Expired | Failed));
        }
    }
}
