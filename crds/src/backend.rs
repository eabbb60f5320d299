//! Backend: a node (or an outside server) that can host sessions, with its
//! capacity and live use as its agent reports them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
#[cfg(feature = "resource")]
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::common::{Conditions, Coordinates, conditions, optional_date_time};

/// A place sessions can run: a Kubernetes node, or an external server that
/// runs the agent. Placement scores Backends by their reported use.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[cfg_attr(feature = "resource", derive(CustomResource))]
#[cfg_attr(
    feature = "resource",
    kube(
        group = "tidepool.dev",
        version = "v1alpha1",
        kind = "Backend",
        shortname = "be",
        category = "tidepool",
        status = "BackendStatus",
        printcolumn(name = "Kind", type_ = "string", json_path = ".spec.kind"),
        printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
        printcolumn(name = "CPU%", type_ = "integer", json_path = ".status.usage.cpuPercent"),
        printcolumn(name = "Mem%", type_ = "integer", json_path = ".status.usage.memoryPercent"),
        printcolumn(name = "GPU%", type_ = "integer", json_path = ".status.usage.gpuPercent"),
        printcolumn(name = "Health", type_ = "string", json_path = ".status.health"),
        printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
        printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
        doc = "A node or external server that hosts sessions"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.kind != 'node' || has(self.nodeName)",
        "message": "spec.nodeName is required when spec.kind is node",
        "fieldPath": ".nodeName"
    },
    {
        "rule": "self.kind != 'external' || has(self.address)",
        "message": "spec.address is required when spec.kind is external",
        "fieldPath": ".address"
    }
]))]
pub struct BackendSpec {
    /// `node` for a Kubernetes node, `external` for a server outside the cluster.
    pub kind: BackendKind,
    /// The node this Backend stands for (kind `node`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = crate::common::NAME_PATTERN))]
    pub node_name: Option<String>,
    /// Where clients reach it: a host name or IP, with an optional `:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 261), regex(pattern = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?$"))]
    pub address: Option<String>,
    /// A region name, for people and for sticky routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub region: Option<String>,
    /// Where it is, for distance-aware placement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinates: Option<Coordinates>,
    /// Free-form labels that placement may match on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub labels: BTreeMap<String, String>,
    /// How the operator probes its health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

/// What a Backend stands for.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Node,
    External,
}

/// A TCP or HTTP health probe.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "self.type == 'http' || !has(self.path)",
        "message": "healthCheck.path applies only to http probes",
        "fieldPath": ".path"
    },
    {
        "rule": "self.timeoutSeconds < self.intervalSeconds",
        "message": "healthCheck.timeoutSeconds must be shorter than healthCheck.intervalSeconds",
        "fieldPath": ".timeoutSeconds"
    }
]))]
pub struct HealthCheck {
    /// `tcp` connects; `http` expects a 2xx from `path`.
    #[serde(rename = "type")]
    pub kind: HealthCheckKind,
    /// The port to probe.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// The HTTP path, for `http` probes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^/"))]
    pub path: Option<String>,
    /// Seconds between probes.
    #[serde(default = "ten")]
    #[schemars(range(min = 1, max = 3600))]
    pub interval_seconds: i32,
    /// Seconds before a probe counts as failed.
    #[serde(default = "two")]
    #[schemars(range(min = 1, max = 60))]
    pub timeout_seconds: i32,
}

fn ten() -> i32 {
    10
}

fn two() -> i32 {
    2
}

/// Health probe kinds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheckKind {
    Tcp,
    Http,
}

/// The health probe's verdict.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Health {
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
}

/// The Backend as its agent and the health probes last saw it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendStatus {
    /// What it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Capacity>,
    /// How much of it is in use (window averages).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The health probe's verdict.
    #[serde(default)]
    pub health: Health,
    /// EWMA (alpha 0.3) of the health probe's latency, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0))]
    pub probe_latency_ms: Option<f64>,
    /// When the agent last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub last_report_time: Option<Time>,
    /// Ready and Stale.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions")]
    pub conditions: Conditions,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A backend's capacity.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Capacity {
    /// Logical CPUs.
    #[schemars(range(min = 0, max = 4096))]
    pub cores: i32,
    /// Memory in bytes.
    #[schemars(range(min = 0))]
    pub memory_bytes: i64,
    /// Disk in bytes, over the agent's configured paths.
    #[schemars(range(min = 0))]
    pub disk_bytes: i64,
    /// NVIDIA GPUs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub gpus: Vec<GpuInfo>,
}

/// One GPU's identity and size.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuInfo {
    /// NVML index.
    #[schemars(range(min = 0, max = 63))]
    pub index: i32,
    /// The model name NVML reports.
    #[schemars(length(max = 128))]
    pub model: String,
    /// Memory in bytes.
    #[schemars(range(min = 0))]
    pub memory_bytes: i64,
}

/// A backend's use, as window averages.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// Mean use of all cores, percent.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub cpu_percent: f64,
    /// Use of each core, percent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 4096))]
    pub per_core_percent: Vec<f64>,
    /// Memory used, percent.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub memory_percent: f64,
    /// Disk used, percent.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub disk_percent: f64,
    /// Mean GPU use, percent (absent without GPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 100.0))]
    pub gpu_percent: Option<f64>,
    /// Each GPU's use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub gpus: Vec<GpuUsage>,
}

/// One GPU's use.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GpuUsage {
    /// NVML index.
    #[schemars(range(min = 0, max = 63))]
    pub index: i32,
    /// Utilisation, percent.
    #[schemars(range(min = 0.0, max = 100.0))]
    pub utilization_percent: f64,
    /// Memory used in bytes.
    #[schemars(range(min = 0))]
    pub memory_used_bytes: i64,
    /// Temperature in degrees Celsius.
    #[schemars(range(min = -50.0, max = 200.0))]
    pub temperature_celsius: f64,
    /// Power draw in watts.
    #[schemars(range(min = 0.0, max = 10000.0))]
    pub power_watts: f64,
}
