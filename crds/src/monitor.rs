//! Monitor: probing that outlives a session. On a schedule it makes a
//! TestSession that runs its probes, as a CronJob makes Jobs, and carries
//! the escalation tier from one run to the next.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
#[cfg(feature = "resource")]
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Conditions, conditions, optional_date_time};
use crate::test_session::{Phase, ProbeTarget};

/// Probes a pool's targets on a schedule, each run a TestSession of its own.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[cfg_attr(feature = "resource", derive(CustomResource))]
#[cfg_attr(
    feature = "resource",
    kube(
        group = "tidepool.dev",
        version = "v1alpha1",
        kind = "Monitor",
        namespaced,
        shortname = "mon",
        category = "tidepool",
        status = "MonitorStatus",
        printcolumn(name = "Pool", type_ = "string", json_path = ".spec.pool"),
        printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
        printcolumn(name = "Tier", type_ = "integer", json_path = ".status.currentTier"),
        printcolumn(name = "Last", type_ = "string", json_path = ".status.runs[0].result"),
        printcolumn(name = "Next", type_ = "date", json_path = ".status.nextRunAt"),
        printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
        doc = "Probes on a schedule, each run a TestSession"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MonitorSpec {
    /// The WarmPool (same namespace) whose pods run the probes.
    #[schemars(length(min = 1, max = 253), regex(pattern = crate::common::NAME_PATTERN))]
    pub pool: String,
    /// When to run, in UTC: five cron fields (`*/5 * * * *`: minute, hour,
    /// day of month, month, day of week, each `*`, a number, a range `a-b`,
    /// a step `*/n` or `a-b/n`, or a list of those), or `@every` and a
    /// duration of 10 s to 24 h (`@every 90s`, `@every 5m`, `@every 1h`).
    #[schemars(length(min = 1, max = 128), extend("x-kubernetes-validations" = [
        {
            "rule": "self.startsWith('@every ') ? self.matches('^@every [1-9][0-9]*(s|m|h)$') : size(self.split(' ')) == 5",
            "message": "spec.schedule is five cron fields, or @every and a duration such as 5m"
        }
    ]))]
    pub schedule: String,
    /// What each run probes.
    #[schemars(length(min = 1, max = 32))]
    pub probes: Vec<ProbeTarget>,
    /// Stop making runs; the one in progress goes on.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// Seconds each run's session may live (so a stuck run ends).
    #[serde(default = "default_run_ttl", rename = "runTTLSeconds")]
    #[schemars(range(min = 30, max = 3600))]
    pub run_ttl_seconds: i64,
    /// Finished runs whose sessions are kept: those that succeeded, and
    /// those that failed.
    #[serde(default = "default_successful_history")]
    #[schemars(range(min = 0, max = 100))]
    pub successful_runs_history_limit: i32,
    #[serde(default = "default_failed_history")]
    #[schemars(range(min = 0, max = 100))]
    pub failed_runs_history_limit: i32,
    /// The escalation rules of this monitor's runs; a rule not given is the
    /// pods' default (docs/probes.md#escalation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<EscalationThresholds>,
}

/// When a run goes up a tier. Whole units; each absent one is the default.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EscalationThresholds {
    /// Tier 1 to 2: an ICMP mean round trip above this, in ms (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 60000))]
    pub ping_ms: Option<i32>,
    /// Tier 1 to 2: ICMP or UDP loss above this, percent (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub loss_percent: Option<i32>,
    /// Tier 1 to 2: an HTTP probe's total time above this, in ms (default 2000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 600000))]
    pub http_total_ms: Option<i32>,
    /// Tier 1 to 2: a DNS lookup above this, in ms (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 60000))]
    pub dns_ms: Option<i32>,
    /// Tier 2 to 3: a bandwidth sample below this, in kbit/s (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000000))]
    pub bandwidth_kbps: Option<i32>,
    /// Tier 2 to 3: jitter above this, in ms (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 60000))]
    pub jitter_ms: Option<i32>,
    /// Tier 2 to 3: more hops than this (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 255))]
    pub hops: Option<i32>,
    /// Tier 2 to 3: a certificate with fewer days left than this (default 7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3650))]
    pub cert_days: Option<i32>,
}

fn default_run_ttl() -> i64 {
    300
}

fn default_successful_history() -> i32 {
    3
}

fn default_failed_history() -> i32 {
    1
}

/// How a run came out.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RunResult {
    /// Every probe answered.
    Succeeded,
    /// The run finished, and some probes failed.
    Degraded,
    /// The run produced no results: no pod, a pod that did not answer, or
    /// the session ended first.
    Failed,
}

/// One run, as the monitor keeps it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitorRun {
    /// The run's TestSession.
    #[schemars(length(max = 253))]
    pub session: String,
    /// When it was due.
    #[schemars(schema_with = "optional_date_time")]
    pub scheduled_at: Option<Time>,
    /// When it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub finished_at: Option<Time>,
    pub result: RunResult,
    /// The session's phase when the run was recorded.
    pub phase: Phase,
    /// The tier the run started in, and the one it ended in.
    #[schemars(range(min = 1, max = 3))]
    pub start_tier: i32,
    #[schemars(range(min = 1, max = 3))]
    pub end_tier: i32,
    /// Probes that answered, and that failed.
    #[schemars(range(min = 0))]
    pub probes_ok: i32,
    #[schemars(range(min = 0))]
    pub probes_failed: i32,
    /// Why the run went up a tier, or why it failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub reasons: Vec<String>,
}

/// What the monitor has done, and what it does next.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitorStatus {
    /// The tier the next run starts in. A run that escalates carries its
    /// tier to the next; a run whose start tier's rules no longer trip
    /// brings it down one.
    #[serde(default = "first_tier")]
    #[schemars(range(min = 1, max = 3))]
    pub current_tier: i32,
    /// The run in progress, if any (runs never overlap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<String>,
    /// When the latest run was due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub last_schedule_time: Option<Time>,
    /// When the next run is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_date_time")]
    pub next_run_at: Option<Time>,
    /// The latest runs, newest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub runs: Vec<MonitorRun>,
    /// Ready (the schedule is valid and runs are being made), with reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions")]
    pub conditions: Conditions,
    /// The spec generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

fn first_tier() -> i32 {
    1
}
