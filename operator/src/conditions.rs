//! Kubernetes-style conditions: one per type, with lastTransitionTime kept
//! while the status stays the same.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Every resource: it does what it is for (a pool is full, a session's pod
/// serves it, a backend takes placements).
pub const READY: &str = "Ready";
/// TestSession: a pod is claimed for the session.
pub const BOUND: &str = "Bound";
/// WarmPool: pods are being made, replaced or removed.
pub const PROGRESSING: &str = "Progressing";
/// WarmPool: something keeps the pool from its goal.
pub const DEGRADED: &str = "Degraded";
/// TestSession: its results are in the results store.
pub const EXPORTED: &str = "Exported";
/// Backend: its agent stopped reporting.
pub const STALE: &str = "Stale";

/// The reasons conditions (and the Events beside them) give, CamelCase as
/// the API conventions ask.
pub mod reason {
    // TestSession
    pub const BOUND: &str = "Bound";
    pub const REBOUND: &str = "Rebound";
    pub const POD_SERVING: &str = "PodServing";
    /// Waiting: no warm pod is free; one is being made.
    pub const POOL_EMPTY: &str = "PoolEmpty";
    /// Waiting: warm pods exist, but no backend holding one has room for the tier.
    pub const NO_BACKEND_FITS: &str = "NoBackendFits";
    pub const POOL_NOT_FOUND: &str = "PoolNotFound";
    pub const COMPLETED: &str = "Completed";
    pub const EXPIRED: &str = "Expired";
    /// Ended early: its client had no stream open through the gateway for
    /// the pool's `releaseWhenClientGoneSeconds`.
    pub const CLIENT_GONE: &str = "ClientGone";
    /// Failed: its pod went away more often than the pool's `maxRebinds`.
    pub const TOO_MANY_REBINDS: &str = "TooManyRebinds";
    /// Its results are in the results store.
    pub const STORED: &str = "Stored";
    /// The results store did not take them; the operator retries.
    pub const STORE_UNAVAILABLE: &str = "StoreUnavailable";
    // WarmPool
    pub const FILLED: &str = "Filled";
    pub const FILLING: &str = "Filling";
    pub const SCALING: &str = "Scaling";
    pub const STABLE: &str = "Stable";
    pub const ROLLING_TEMPLATE: &str = "RollingTemplate";
    pub const PODS_FAILING: &str = "PodsFailing";
    pub const MAX_SIZE_REACHED: &str = "MaxSizeReached";
    pub const CREATE_FAILED: &str = "CreateFailed";
    pub const DELETE_FAILED: &str = "DeleteFailed";
    /// The operator finds no node for a pool's pods (`nodeAssignment: Operator`).
    pub const NO_NODE_FITS: &str = "NoNodeFits";
    pub const HEALTHY: &str = "Healthy";
    /// The pool's key Secret exists but the pool does not own it.
    pub const KEY_NOT_OWNED: &str = "KeyNotOwned";
    // Backend
    pub const REPORTING: &str = "Reporting";
    pub const STALE: &str = "Stale";
    pub const UNHEALTHY: &str = "Unhealthy";
    pub const MISSED_REPORTS: &str = "MissedReports";
    // Monitor
    pub const SCHEDULED: &str = "Scheduled";
    pub const SUSPENDED: &str = "Suspended";
    pub const INVALID_SCHEDULE: &str = "InvalidSchedule";
    pub const RUN_FINISHED: &str = "RunFinished";
    pub const RUN_FAILED: &str = "RunFailed";
    // Tube
    pub const TUBE_CLOSED: &str = "Closed";
    pub const TUBE_FAILED: &str = "Failed";
}

/// Sets condition `type_` in `conditions`, keeping its transition time when
/// its status does not change.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let previous = conditions.iter().position(|c| c.type_ == type_);
    let last_transition_time = match previous {
        Some(i) if conditions[i].status == status => conditions[i].last_transition_time.clone(),
        _ => Time(now),
    };
    let condition = Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    };
    match previous {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
}

/// Whether condition `type_` is present and True.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions.iter().any(|c| c.type_ == type_ && c.status == "True")
}

/// When condition `type_` last changed, if present.
pub fn last_transition(conditions: &[Condition], type_: &str) -> Option<Timestamp> {
    conditions.iter().find(|c| c.type_ == type_).map(|c| c.last_transition_time.0)
}

/// The reason of condition `type_`, if present.
pub fn reason<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a str> {
    conditions.iter().find(|c| c.type_ == type_).map(|c| c.reason.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_transition_time_moves_only_when_the_status_does() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let mut conditions = Vec::new();
        set(&mut conditions, "Ready", false, "Filling", "0/3 warm", Some(1), t0);
        set(&mut conditions, "Ready", false, "Filling", "1/3 warm", Some(1), t1);
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time, Time(t0));
        assert_eq!(conditions[0].message, "1/3 warm");
        set(&mut conditions, "Ready", true, "Filled", "3/3 warm", Some(2), t1);
        assert_eq!(conditions[0].last_transition_time, Time(t1));
        assert!(is_true(&conditions, "Ready"));
        assert_eq!(reason(&conditions, "Ready"), Some("Filled"));
        assert_eq!(conditions[0].observed_generation, Some(2));
    }
}
