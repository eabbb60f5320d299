//! Tube: a tunnel over a WebRTC data channel into the cluster, signalled
//! through this resource (base64 SDP offer in the spec, answer in the status).

#[cfg(feature = "resource")]
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::common::{Conditions, conditions, optional_date_time};

/// A WebRTC tunnel: the client puts its SDP offer here, the session pod that
/// terminates the tube answers through the status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[cfg_attr(feature = "resource", derive(CustomResource))]
#[cfg_attr(
    feature = "resource",
    kube(
        group = "tidepool.dev",
        version = "v1alpha1",
        kind = "Tube",
        namespaced,
        category = "tidepool",
        status = "TubeStatus",
        printcolumn(name = "Type", type_ = "string", json_path = ".spec.conversationType"),
        printcolumn(name = "Session", type_ = "string", json_path = ".spec.session"),
        printcolumn(name = "State", type_ = "string", json_path = ".status.state"),
        printcolumn(name = "RTT(ms)", type_ = "number", json_path = ".status.rttMs"),
        printcolumn(name = "Conns", type_ = "integer", json_path = ".status.openConnections"),
        printcolumn(name = "Ended", type_ = "string", json_path = ".status.endReason"),
        printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
        doc = "A TCP or SOCKS5 tunnel over a WebRTC data channel"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.session) || has(self.pool)",
        "message": "one of spec.session and spec.pool is required",
        "fieldPath": ".session"
    },
    {
        "rule": "!(has(self.session) && has(self.pool))",
        "message": "spec.pool cannot be set together with spec.session",
        "fieldPath": ".pool"
    },
    {
        "rule": "self.conversationType != 'tunnel' || has(self.target)",
        "message": "spec.target is required for a tunnel",
        "fieldPath": ".target"
    },
    {
        "rule": "self == oldSelf",
        "message": "spec is immutable; create a new Tube to change it"
    }
]))]
pub struct TubeSpec {
    /// The TestSession whose pod terminates the tube.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = crate::common::NAME_PATTERN))]
    pub session: Option<String>,
    /// A WarmPool whose next free pod terminates the tube.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = crate::common::NAME_PATTERN))]
    pub pool: Option<String>,
    /// `tunnel` forwards to one target; `socks5` lets the client pick targets.
    pub conversation_type: ConversationType,
    /// Where a tunnel forwards to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    /// The client's SDP offer, base64.
    #[schemars(length(min = 4, max = 65536), regex(pattern = crate::common::BASE64_PATTERN))]
    pub offer: String,
    /// STUN and TURN servers for ICE.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub ice_servers: Vec<IceServer>,
    /// Trickle ICE candidates (needed for ICE restarts).
    #[serde(default)]
    pub trickle: bool,
    /// For a tube on a pool: the TTL of the session made for it (the
    /// pool's `sessionTTLSeconds` when not given, its
    /// `maxSessionTTLSeconds` at most). The tube ends with its session.
    #[serde(default, rename = "ttlSeconds", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub ttl_seconds: Option<i64>,
    /// Seconds with no connection open and no byte carried before the tube
    /// is closed (reason `Idle`).
    #[serde(default = "default_idle_timeout")]
    #[schemars(range(min = 10, max = 86400))]
    pub idle_timeout_seconds: i64,
}

fn default_idle_timeout() -> i64 {
    600
}

/// Kinds of tube.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ConversationType {
    Tunnel,
    Socks5,
}

/// A host and port.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// Host name or IP.
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[A-Za-z0-9.:-]+$"))]
    pub host: String,
    /// Port, 1 to 65535.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
}

/// One ICE server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.username) == has(self.credential)",
        "message": "iceServers[].username and iceServers[].credential must be given together",
        "fieldPath": ".username"
    }
]))]
pub struct IceServer {
    /// `stun:`, `turn:` or `turns:` URLs.
    #[schemars(length(min = 1, max = 8))]
    pub urls: Vec<IceUrl>,
    /// TURN user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub username: Option<String>,
    /// TURN credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub credential: Option<String>,
}

/// A STUN or TURN URL.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct IceUrl(
    #[schemars(length(min = 6, max = 512), regex(pattern = r"^(stun|stuns|turn|turns):[^\s]+$"))] pub String,
);

/// Where a tube is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TubeState {
    /// Waiting for a pod to answer.
    #[default]
    Pending,
    /// The answer is in the status; the peers are connecting.
    Answered,
    /// The data channel is open.
    Connected,
    /// Lost; ICE restarts are being tried.
    Disconnected,
    /// Gave up; the conditions say why.
    Failed,
    /// Closed normally.
    Closed,
}

/// The tube as the terminating pod last reported it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TubeStatus {
    /// The pod's SDP answer, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536), regex(pattern = crate::common::BASE64_PATTERN))]
    pub answer: Option<String>,
    /// Where the tube is in its life.
    #[serde(default)]
    pub state: TubeState,
    /// The pod terminating the tube.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Bytes sent from the cluster side to the client.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub bytes_sent: i64,
    /// Bytes received from the client.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub bytes_received: i64,
    /// Round-trip time over the data channel, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub rtt_ms: Option<f64>,
    /// TCP connections the tube carries now.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub open_connections: i32,
    /// The TestSession the operator made to claim a pool's pod for this
    /// tube (owned by the tube: it goes when the tube goes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// When the data channel opened.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub connected_at: Option<Time>,
    /// Why the tube ended (`Idle`, `Deleted`, `SessionEnded`, `PodGone`,
    /// `PeerGone`, ...), kept once it is Closed or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
    /// When it ended: the result retention counts from here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub ended_at: Option<Time>,
    /// Ready and the reasons for failing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions")]
    pub conditions: Conditions,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
