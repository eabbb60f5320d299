//! Results: what the client measured, as it goes to the session pod
//! (`POST /api/v1/results`) and from the pod to the operator
//! ([`OPERATOR_RESULTS_PATH`]), with the checks both sides apply before
//! they grade.

use serde::{Deserialize, Serialize};
use tidepool_crds::test_session::SessionResults;

/// The operator route a pod posts results to: `{name}` is the TestSession's,
/// with `?namespace=`. Authenticated by the session token and binding ticket.
pub const OPERATOR_RESULTS_PATH: &str = "/api/v1/sessions/{name}/results";

/// The largest results body either side takes: 32 probes with long URLs and
/// a household fit well inside.
pub const RESULTS_BODY_LIMIT: usize = 256 * 1024;

/// POST /api/v1/results (client to pod), and the pod's post to the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResultsSubmission {
    /// The summary; the receiver recomputes its grades from the figures.
    pub results: SessionResults,
    /// The last results of the session: the operator marks it Completed and
    /// releases its pod. Continuous runs post with `final: false`.
    #[serde(default, rename = "final")]
    pub is_final: bool,
}

/// The pod's answer to a [`ResultsSubmission`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ResultsAccepted {
    /// The results as the pod graded them.
    pub results: SessionResults,
    /// Whether the operator accepted them into the TestSession's status.
    pub reported: bool,
    /// Why not, when not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_error: Option<String>,
}

/// A figure outside what the TestSession's schema allows.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{field} {problem}")]
pub struct InvalidField {
    /// The JSON path, as the client wrote it: `results.latency.p50Ms`.
    pub field: String,
    pub problem: String,
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> InvalidField {
    InvalidField { field: field.into(), problem: problem.into() }
}

fn in_range(field: &str, value: f64, min: f64, max: f64) -> Result<(), InvalidField> {
    if !value.is_finite() {
        return Err(invalid(field, format!("must be a finite number, not {value}")));
    }
    if value < min || value > max {
        let range = if max == f64::MAX { format!("at least {min}") } else { format!("between {min} and {max}") };
        return Err(invalid(field, format!("must be {range}, not {value}")));
    }
    Ok(())
}

fn non_negative(field: &str, value: f64) -> Result<(), InvalidField> {
    in_range(field, value, 0.0, f64::MAX)
}

fn length(field: &str, len: usize, min: usize, max: usize) -> Result<(), InvalidField> {
    if len < min || len > max {
        return Err(invalid(field, format!("must have {min} to {max} entries or characters, not {len}")));
    }
    Ok(())
}

/// Checks `results` against the TestSession schema's ranges and lengths
/// (`crds/src/test_session.rs`).
/// Grades are not checked: the pod recomputes them.
pub fn validate(results: &SessionResults) -> Result<(), InvalidField> {
    if let Some(latency) = &results.latency {
        for (name, value) in [
            ("p50Ms", latency.p50_ms),
            ("p95Ms", latency.p95_ms),
            ("p99Ms", latency.p99_ms),
            ("jitterMs", latency.jitter_ms),
        ] {
            non_negative(&format!("results.latency.{name}"), value)?;
        }
        in_range("results.latency.lossPercent", latency.loss_percent, 0.0, 100.0)?;
        if latency.samples < 0 {
            return Err(invalid("results.latency.samples", format!("must be at least 0, not {}", latency.samples)));
        }
    }
    if let Some(loaded) = &results.loaded_latency {
        for (name, value) in [
            ("downloadMs", loaded.download_ms),
            ("uploadMs", loaded.upload_ms),
            ("bidirectionalMs", loaded.bidirectional_ms),
        ] {
            if let Some(value) = value {
                non_negative(&format!("results.loadedLatency.{name}"), value)?;
            }
        }
    }
    for (name, value) in [("downloadMbps", results.download_mbps), ("uploadMbps", results.upload_mbps)] {
        if let Some(value) = value {
            non_negative(&format!("results.{name}"), value)?;
        }
    }
    length("results.household", results.household.len(), 0, 16)?;
    for (i, user) in results.household.iter().enumerate() {
        let field = |name: &str| format!("results.household[{i}].{name}");
        length(&field("user"), user.user.chars().count(), 1, 32)?;
        for (name, value) in [("baselineMs", user.baseline_ms), ("meanMs", user.mean_ms), ("jitterMs", user.jitter_ms)]
        {
            non_negative(&field(name), value)?;
        }
        in_range(&field("sharePercent"), user.share_percent, 0.0, 1000.0)?;
    }
    length("results.probes", results.probes.len(), 0, 160)?;
    for (i, probe) in results.probes.iter().enumerate() {
        let field = |name: &str| format!("results.probes[{i}].{name}");
        length(&field("target"), probe.target.chars().count(), 0, 2048)?;
        if !(1..=3).contains(&probe.tier) {
            return Err(invalid(field("tier"), format!("must be between 1 and 3, not {}", probe.tier)));
        }
        if let Some(protocol) = &probe.protocol {
            length(&field("protocol"), protocol.chars().count(), 0, 32)?;
        }
        for (name, text) in [("error", &probe.error), ("detail", &probe.detail)] {
            if let Some(text) = text {
                length(&field(name), text.chars().count(), 0, 1024)?;
            }
        }
        if let Some(t) = &probe.timings {
            let optional = [
                ("dnsMs", t.dns_ms),
                ("connectMs", t.connect_ms),
                ("tlsMs", t.tls_ms),
                ("firstByteMs", t.first_byte_ms),
                ("kexMs", t.kex_ms),
            ];
            for (name, value) in
                optional.into_iter().filter_map(|(name, v)| Some((name, v?))).chain([("totalMs", t.total_ms)])
            {
                non_negative(&field(&format!("timings.{name}")), value)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_crds::test_session::{HouseholdUserResult, LatencySummary, ProbeKind, ProbeResult, Severity};

    fn latency(p50_ms: f64) -> SessionResults {
        SessionResults { latency: Some(LatencySummary { p50_ms, ..Default::default() }), ..Default::default() }
    }

    #[test]
    fn figures_out_of_range_name_their_field() {
        assert_eq!(validate(&latency(3.0)), Ok(()));
        assert_eq!(validate(&latency(-1.0)).unwrap_err().field, "results.latency.p50Ms");
        assert_eq!(validate(&latency(f64::NAN)).unwrap_err().field, "results.latency.p50Ms");
        assert_eq!(validate(&latency(f64::INFINITY)).unwrap_err().field, "results.latency.p50Ms");
        let mut results = latency(1.0);
        results.latency.as_mut().unwrap().loss_percent = 101.0;
        assert_eq!(validate(&results).unwrap_err().field, "results.latency.lossPercent");
        let results = SessionResults { upload_mbps: Some(-0.5), ..Default::default() };
        assert_eq!(validate(&results).unwrap_err().field, "results.uploadMbps");
    }

    #[test]
    fn lists_and_their_entries_are_checked() {
        let user = HouseholdUserResult {
            user: "gaming".into(),
            baseline_ms: 1.0,
            mean_ms: 1.0,
            jitter_ms: 0.0,
            share_percent: 1001.0,
            severity: Severity::None,
        };
        let results = SessionResults { household: vec![user.clone()], ..Default::default() };
        assert_eq!(validate(&results).unwrap_err().field, "results.household[0].sharePercent");
        let results = SessionResults {
            household: vec![HouseholdUserResult { share_percent: 5.0, ..user }; 17],
            ..Default::default()
        };
        assert_eq!(validate(&results).unwrap_err().field, "results.household");
        let probe = ProbeResult {
            kind: ProbeKind::Tcp,
            target: "example.org:443".into(),
            ok: true,
            tier: 4,
            timings: None,
            protocol: None,
            error: None,
            detail: Some("x".repeat(1025)),
        };
        let results = SessionResults { probes: vec![probe.clone()], ..Default::default() };
        assert_eq!(validate(&results).unwrap_err().field, "results.probes[0].tier");
        let results = SessionResults { probes: vec![ProbeResult { tier: 2, ..probe }], ..Default::default() };
        assert_eq!(validate(&results).unwrap_err().field, "results.probes[0].detail");
    }
}
