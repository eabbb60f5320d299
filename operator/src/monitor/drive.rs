//! Running a monitor's probes: the operator is the run's client. It signs
//! the run's credentials with the pool's key (the tier claim set to the
//! monitor's tier), asks the bound pod to run the session's targets once,
//! and checks what comes back like any other results.

use std::time::Duration;

use kube::ResourceExt;
use tidepool_crds::TestSession;
use tidepool_crds::monitor::EscalationThresholds;
use tidepool_crds::test_session::{ProbeResult, SessionResults};
use tidepool_protocol::BINDING_HEADER;
use tidepool_protocol::pod::{PROBES_PATH, ProbeRequest, ProbeResponse, probes_digest};
use tidepool_wire::token::{SessionClaims, ThresholdClaims};

use crate::keys::PoolKeys;

/// The longest a run may take: a tier-3 run downloads for up to 30 s after
/// tiers 1 and 2, each probe bounded by its own timeout.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(180);
/// The most of an answer read: the status's 160 results at their longest.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Why a run produced nothing.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error("the session has no {0} yet")]
    NotBound(&'static str),
    #[error("the pod did not answer: {0}")]
    Unreachable(String),
    #[error("the pod answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("the pod's answer is not valid: {0}")]
    Invalid(String),
}

/// What a run found, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOutcome {
    pub results: Vec<ProbeResult>,
    pub start_tier: u8,
    pub end_tier: u8,
    pub reasons: Vec<String>,
    /// The run's start tier is still called for.
    pub holding: bool,
}

/// Runs `session`'s probes on its pod, from `tier`, under `thresholds`.
pub async fn run(
    http: &reqwest::Client,
    keys: &PoolKeys,
    session: &TestSession,
    tier: u8,
    thresholds: ThresholdClaims,
) -> Result<RunOutcome, DriveError> {
    let status = session.status.clone().unwrap_or_default();
    let endpoint = status.endpoint.ok_or(DriveError::NotBound("endpoint"))?;
    let pod = status.pod.ok_or(DriveError::NotBound("pod"))?;
    let expires = status.expires_at.ok_or(DriveError::NotBound("expiry"))?;
    let sid = session.uid().ok_or(DriveError::NotBound("uid"))?;
    let claims = SessionClaims {
        sid: sid.clone(),
        ns: session.namespace().unwrap_or_default(),
        name: session.name_any(),
        pool: session.spec.pool.clone(),
        profile: "probes".into(),
        exp: u64::try_from(expires.0.as_second()).unwrap_or(0),
        probes: probes_digest(&session.spec.probes),
        tier,
        thresholds: Some(thresholds),
        kid: String::new(),
    };
    let signer = keys.signer_for(status.key_id.as_deref());
    let request = ProbeRequest { targets: session.spec.probes.clone(), tier: Some(i32::from(tier)) };
    let url = format!("{}{PROBES_PATH}", endpoint.trim_end_matches('/'));
    let mut response = http
        .post(url)
        .bearer_auth(signer.sign_session(&claims))
        .header(BINDING_HEADER, signer.sign_binding(&sid, &pod))
        .json(&request)
        .timeout(RUN_TIMEOUT)
        .send()
        .await
        .map_err(|e| DriveError::Unreachable(tidepool_wire::error_chain(&e)))?;
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| DriveError::Unreachable(e.to_string()))? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(DriveError::Invalid(format!("over {MAX_ANSWER_BYTES} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    if !response.status().is_success() {
        let message = String::from_utf8_lossy(&body).chars().take(200).collect();
        return Err(DriveError::Refused { status: response.status().as_u16(), message });
    }
    outcome(&body, tier)
}

/// A monitor's rules as the token carries them: each one not given is the default.
pub fn thresholds(given: Option<&EscalationThresholds>) -> ThresholdClaims {
    let defaults = ThresholdClaims::default();
    let Some(given) = given else { return defaults };
    let or = |value: Option<i32>, default: u32| value.and_then(|v| u32::try_from(v).ok()).unwrap_or(default);
    ThresholdClaims {
        ping_ms: or(given.ping_ms, defaults.ping_ms),
        loss_percent: or(given.loss_percent, defaults.loss_percent),
        http_total_ms: or(given.http_total_ms, defaults.http_total_ms),
        dns_ms: or(given.dns_ms, defaults.dns_ms),
        bandwidth_kbps: or(given.bandwidth_kbps, defaults.bandwidth_kbps),
        jitter_ms: or(given.jitter_ms, defaults.jitter_ms),
        hops: or(given.hops, defaults.hops),
        cert_days: or(given.cert_days, defaults.cert_days),
    }
}

/// The pod's answer, checked as the results route checks a client's.
pub fn outcome(body: &[u8], start_tier: u8) -> Result<RunOutcome, DriveError> {
    let answer: ProbeResponse = tidepool_protocol::parse_json(body).map_err(|e| DriveError::Invalid(e.to_string()))?;
    let results = SessionResults { probes: answer.results, ..SessionResults::default() };
    tidepool_protocol::results::validate(&results).map_err(|e| DriveError::Invalid(e.to_string()))?;
    let end_tier = results.probes.iter().map(|p| p.tier).max().map_or(start_tier, |t| t.clamp(1, 3) as u8);
    let reasons: Vec<String> = answer
        .escalations
        .iter()
        .flat_map(|step| step.reasons.iter().map(move |reason| format!("tier {}: {reason}", step.from)))
        .take(16)
        .map(|reason| reason.chars().take(256).collect())
        .collect();
    Ok(RunOutcome { results: results.probes, start_tier, end_tier, reasons, holding: !answer.holding.is_empty() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn probe(tier: i32, ok: bool) -> serde_json::Value {
        json!({ "type": "tcp", "target": "a.test:1", "ok": ok, "tier": tier, "timings": { "totalMs": 1.0 } })
    }

    #[test]
    fn an_answer_gives_the_tiers_and_reasons() {
        let body = json!({
            "results": [probe(1, true), probe(2, false)],
            "escalations": [{ "from": 1, "reasons": ["ping 130.2 ms > 100 ms"] }],
            "holding": []
        });
        let outcome = outcome(body.to_string().as_bytes(), 1).unwrap();
        assert_eq!((outcome.start_tier, outcome.end_tier, outcome.holding), (1, 2, false));
        assert_eq!(outcome.reasons, ["tier 1: ping 130.2 ms > 100 ms"]);
        assert_eq!(outcome.results.len(), 2);
        let held = json!({ "results": [probe(2, true)], "holding": ["DNS 1200.0 ms > 1000 ms"] });
        assert!(super::outcome(held.to_string().as_bytes(), 2).unwrap().holding);
    }

    #[test]
    fn a_monitor_sets_the_rules_it_names_and_keeps_the_rest() {
        assert_eq!(thresholds(None), ThresholdClaims::default());
        let given =
            EscalationThresholds { http_total_ms: Some(500), hops: Some(12), ..EscalationThresholds::default() };
        let claims = thresholds(Some(&given));
        assert_eq!((claims.http_total_ms, claims.hops), (500, 12));
        assert_eq!(claims, ThresholdClaims { http_total_ms: 500, hops: 12, ..ThresholdClaims::default() });
    }

    #[test]
    fn a_bad_answer_is_refused() {
        assert!(matches!(outcome(b"not json", 1), Err(DriveError::Invalid(_))));
        let negative = json!({ "results": [{ "type": "tcp", "target": "a", "ok": true, "tier": 1, "timings": { "totalMs": -1.0 } }] });
        let error = outcome(negative.to_string().as_bytes(), 1).unwrap_err().to_string();
        assert!(error.contains("totalMs"), "{error}");
    }
}
