//! WarmPool: pre-started session pods, kept ready from a template and a tier.

use k8s_openapi::api::core::v1::PodTemplateSpec;
#[cfg(feature = "resource")]
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

use crate::common::{Conditions, conditions};

/// A pool of warm session pods. `size` of them are kept ready and unassigned;
/// each TestSession takes one, and the pool refills.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[cfg_attr(feature = "resource", derive(CustomResource))]
#[cfg_attr(
    feature = "resource",
    kube(
        group = "tidepool.dev",
        version = "v1alpha1",
        kind = "WarmPool",
        namespaced,
        shortname = "wp",
        category = "tidepool",
        status = "WarmPoolStatus",
        scale(
            spec_replicas_path = ".spec.size",
            status_replicas_path = ".status.replicas",
            label_selector_path = ".status.selector"
        ),
        printcolumn(name = "Size", type_ = "integer", json_path = ".spec.size"),
        printcolumn(name = "Warm", type_ = "integer", json_path = ".status.warm"),
        printcolumn(name = "Assigned", type_ = "integer", json_path = ".status.assigned"),
        printcolumn(name = "Pending", type_ = "integer", json_path = ".status.pending"),
        printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
        printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
        doc = "A pool of pre-started session pods"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.maxSize >= self.size",
        "message": "spec.maxSize (100 when not given) must be at least spec.size",
        "fieldPath": ".maxSize"
    },
    {
        "rule": "self.sessionTTLSeconds <= self.maxSessionTTLSeconds",
        "message": "spec.sessionTTLSeconds must be at most spec.maxSessionTTLSeconds (3600 when not given)",
        "fieldPath": ".sessionTTLSeconds"
    },
    {
        "rule": "self.nodeAssignment != 'Operator' || ((!has(self.template.spec.topologySpreadConstraints) || size(self.template.spec.topologySpreadConstraints) == 0) && (!has(self.template.spec.schedulingGates) || size(self.template.spec.schedulingGates) == 0) && (!has(self.template.spec.affinity) || (!has(self.template.spec.affinity.podAffinity) && !has(self.template.spec.affinity.podAntiAffinity))) && (!has(self.template.spec.schedulerName) || self.template.spec.schedulerName == 'default-scheduler') && (!has(self.template.spec.volumes) || self.template.spec.volumes.all(v, !has(v.persistentVolumeClaim) && !has(v.ephemeral))))",
        "message": "nodeAssignment Operator places pods by their node rules alone: the template may not use pod affinity, topology spread constraints, scheduling gates, another scheduler, or volumes that need binding",
        "fieldPath": ".nodeAssignment"
    }
]))]
pub struct WarmPoolSpec {
    /// The pod every warm session pod is made from. It must name at least one container.
    #[schemars(schema_with = "pod_template")]
    pub template: PodTemplateSpec,
    /// What one session on this pool reserves on its backend.
    pub tier: Tier,
    /// How many unassigned pods to keep ready. `kubectl scale` sets this.
    #[schemars(range(min = 0, max = 10000))]
    pub size: i32,
    /// The most pods (warm and assigned together) the pool may own.
    #[serde(default = "default_max_size")]
    #[schemars(range(min = 0, max = 100000))]
    pub max_size: i32,
    /// How long a session on this pool lives unless it asks for its own TTL.
    #[serde(default = "default_session_ttl", rename = "sessionTTLSeconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub session_ttl_seconds: i64,
    /// The longest TTL a session on this pool may have: the operator's API
    /// refuses more, and a session made another way is ended at this age.
    #[serde(default = "default_max_session_ttl", rename = "maxSessionTTLSeconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub max_session_ttl_seconds: i64,
    /// How often one session may move to a new pod after its pod went away;
    /// past it the session fails, so no client can drain the pool by ending
    /// its pod again and again.
    #[serde(default = "default_max_rebinds")]
    #[schemars(range(min = 0, max = 100))]
    pub max_rebinds: i32,
    /// What the pool's session pods may reach with probes and tunnels,
    /// beside the public internet: loopback, link-local, private, multicast
    /// and the cluster's own ranges are refused unless a rule here allows
    /// them.
    #[serde(default, skip_serializing_if = "Egress::is_empty")]
    pub egress: Egress,
    /// Where the pool's tubes may lead. A tube reaches only what a rule
    /// here allows; with no rule, the pool refuses tubes (a SOCKS5 tube
    /// with no allowlist would be an open proxy into the cluster).
    #[serde(default, skip_serializing_if = "TubeAccess::is_empty")]
    pub tubes: TubeAccess,
    /// How placement weighs the parts of a backend's score (lower score wins).
    #[serde(default)]
    pub placement: PlacementWeights,
    /// Who puts a new pod on a node: the Kubernetes scheduler, or the
    /// operator itself (no scheduling round trip; see docs/operator.md).
    #[serde(default)]
    pub node_assignment: NodeAssignment,
    /// Whether people without a Kubernetes identity may start sessions on
    /// this pool through the gateway, within the gateway's limits for
    /// anonymous clients (docs/gateway.md). Off unless set.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public: bool,
    /// When set, a session started through the gateway whose client has had
    /// no stream open through it for this many seconds is ended early
    /// (`Expired`, reason `ClientGone`), freeing its pod before its TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub release_when_client_gone_seconds: Option<i32>,
}

/// Who puts a pool's new pods on nodes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum NodeAssignment {
    /// The Kubernetes scheduler, with every rule of the template.
    #[default]
    Scheduler,
    /// The operator sets `spec.nodeName` when it creates the pod: a Ready,
    /// schedulable node whose taints the template tolerates and whose labels
    /// and name match its nodeSelector and required node affinity, spreading
    /// the pool's pods over such nodes. It saves the scheduler's binding and
    /// event writes for every pod.
    Operator,
}

fn default_session_ttl() -> i64 {
    300
}

/// A pool's `maxSize` when it names none.
pub const DEFAULT_MAX_SIZE: i32 = 100;

fn default_max_size() -> i32 {
    DEFAULT_MAX_SIZE
}

fn default_max_session_ttl() -> i64 {
    3600
}

fn default_max_rebinds() -> i32 {
    3
}

/// What a pool's session pods may reach beyond the public internet.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct Egress {
    /// Each rule allows an address range or a host name, on some ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub allow: Vec<EgressRule>,
}

impl Egress {
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty()
    }
}

/// Where a pool's tubes may lead.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct TubeAccess {
    /// Each rule allows an address range or a host name, on some ports.
    /// Unlike probes, tubes get nothing by default: not even the public
    /// internet.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub allow: Vec<EgressRule>,
}

impl TubeAccess {
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty()
    }
}

/// One allowed destination: a CIDR (matched against the addresses a name
/// resolves to) or a host name (exact, or `*.example.org` for names under
/// it), and the ports (all when none are listed).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "has(self.cidr) != has(self.host)",
        "message": "an egress rule names either a cidr or a host"
    }
]))]
pub struct EgressRule {
    /// An IPv4 or IPv6 CIDR, such as `10.20.0.0/16` or `fd00::/8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 43), extend("x-kubernetes-validations" = [
        { "rule": "isCIDR(self)", "message": "egress cidr must be an IPv4 or IPv6 CIDR" }
    ]))]
    pub cidr: Option<String>,
    /// A host name, or `*.` and a domain for every name under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub host: Option<String>,
    /// Ports, 1 to 65535; every port when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(range(min = 1, max = 65535)))]
    pub ports: Vec<i32>,
}

/// The resources one session reserves: what placement checks a backend has free.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.gpuMemoryMiB == 0 || self.gpus > 0",
        "message": "tier.gpuMemoryMiB needs tier.gpus of at least 1",
        "fieldPath": ".gpuMemoryMiB"
    }
]))]
pub struct Tier {
    /// Whole virtual CPUs.
    #[schemars(range(min = 1, max = 512))]
    pub vcpu: i32,
    /// Memory in MiB.
    #[schemars(range(min = 16, max = 4194304))]
    #[serde(rename = "memoryMiB")]
    pub memory_mib: i64,
    /// Local disk in GiB.
    #[serde(default)]
    #[schemars(range(min = 0, max = 65536))]
    #[serde(rename = "diskGiB")]
    pub disk_gib: i64,
    /// NVIDIA GPUs.
    #[serde(default)]
    #[schemars(range(min = 0, max = 16))]
    pub gpus: i32,
    /// Free GPU memory needed, in MiB, across the tier's GPUs.
    #[serde(default)]
    #[schemars(range(min = 0, max = 4194304))]
    #[serde(rename = "gpuMemoryMiB")]
    pub gpu_memory_mib: i64,
}

/// Weights for the parts of a backend's placement score. Each part is
/// multiplied by its weight; 0 turns a part off.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlacementWeights {
    /// Per kilometre between the client and the backend.
    #[serde(default = "one")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub distance: f64,
    /// Per percent of mean use of the least-loaded cores.
    #[serde(default = "one")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub cpu: f64,
    /// Per percent of memory used.
    #[serde(default = "one")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub memory: f64,
    /// Per percent of mean GPU use (GPU tiers only).
    #[serde(default = "one_and_a_half")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub gpu: f64,
    /// Per millisecond of the backend's probe latency (EWMA).
    #[serde(default = "one")]
    #[schemars(range(min = 0.0, max = 1000.0))]
    pub latency: f64,
}

impl Default for PlacementWeights {
    fn default() -> Self {
        Self { distance: 1.0, cpu: 1.0, memory: 1.0, gpu: 1.5, latency: 1.0 }
    }
}

fn one() -> f64 {
    1.0
}

fn one_and_a_half() -> f64 {
    1.5
}

/// What the pool has now, as its controller last saw it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WarmPoolStatus {
    /// All pods the pool owns that are not being deleted (the scale subresource's replicas).
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub replicas: i32,
    /// Pods that are ready and not assigned to a session.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub warm: i32,
    /// Pods bound to a session.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub assigned: i32,
    /// Pods created but not ready yet.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub pending: i32,
    /// The label selector of the pool's pods, in string form, for the scale subresource and HPAs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Ready, Progressing and Degraded, with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions")]
    pub conditions: Conditions,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A pod template is stored as Kubernetes sends it; the API server checks the
/// pods made from it; the schema checks only that it names a container.
/// Embedding the full PodSpec schema would make this CRD
/// ~10,000 lines for no extra safety at pod creation.
fn pod_template(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
        "required": ["spec"],
        "properties": {
            "spec": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true,
                "required": ["containers"],
                "properties": {
                    "containers": {
                        "type": "array",
                        "minItems": 1,
                        "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true }
                    },
                    // Declared only so that the nodeAssignment rule can look at them.
                    "schedulerName": { "type": "string" },
                    "topologySpreadConstraints": {
                        "type": "array",
                        "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true }
                    },
                    "schedulingGates": {
                        "type": "array",
                        "items": { "type": "object", "x-kubernetes-preserve-unknown-fields": true }
                    },
                    "affinity": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": true,
                        "properties": {
                            "podAffinity": { "type": "object", "x-kubernetes-preserve-unknown-fields": true },
                            "podAntiAffinity": { "type": "object", "x-kubernetes-preserve-unknown-fields": true }
                        }
                    },
                    "volumes": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "x-kubernetes-preserve-unknown-fields": true,
                            "properties": {
                                "persistentVolumeClaim": { "type": "object", "x-kubernetes-preserve-unknown-fields": true },
                                "ephemeral": { "type": "object", "x-kubernetes-preserve-unknown-fields": true }
                            }
                        }
                    }
                }
            }
        }
    })
}
