//! Which pod a session's stream goes to: decided from the session token,
//! the TestSession and its pod as the watch shows them. Pure.
//!
//! The token names its session; the session names its current pod; that
//! pod carries the pool's public keys (the operator puts them in its
//! environment), which check the token. So the gateway routes only tokens
//! the pool signed, to the pod bound to that session now, and follows a
//! session that moved to a new pod without the client doing anything.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use tidepool_crds::TestSession;
use tidepool_crds::test_session::Phase;
use tidepool_wire::token::{PoolPublicKey, PublicKeys, SessionClaims, TokenError};

/// The environment variable that carries a pool's public keys in its pods.
pub const PUBLIC_KEY_ENV: &str = "TIDEPOOL_POOL_PUBLIC_KEY";

/// Where a session's stream goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub claims: SessionClaims,
    pub pod: String,
    /// The pod's HTTP endpoint, `http://<ip>:<port>`.
    pub endpoint: String,
}

/// Why a stream has nowhere to go. Each is a client's error or a state the
/// client can wait out; none says more than the client could know.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoTarget {
    #[error("the session token is not of the form <claims>.<signature>")]
    Malformed,
    #[error("the session has ended ({0})")]
    Ended(&'static str),
    #[error("the session has no pod yet; try again shortly")]
    NotReady,
    #[error("the session token is not accepted")]
    NotAccepted,
    #[error("the session expired")]
    Expired,
}

impl NoTarget {
    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed => "token_malformed",
            Self::Ended(_) => "session_ended",
            Self::NotReady => "session_not_ready",
            Self::NotAccepted => "token_not_accepted",
            Self::Expired => "token_expired",
        }
    }
}

/// What a token claims before it is checked: which session to look up.
pub fn claimed(token: &str) -> Result<SessionClaims, NoTarget> {
    PoolPublicKey::unverified_claims(token).map_err(|_| NoTarget::Malformed)
}

/// The target of `token`, given the session its claims name (`None` when
/// the watch has no such session) and the pod that session is bound to.
/// `now` is Unix seconds.
pub fn decide(token: &str, session: Option<&TestSession>, pod: Option<&Pod>, now: u64) -> Result<Target, NoTarget> {
    let claims = claimed(token)?;
    // A session that does not exist and one the token does not name are
    // the same to the client: a token not accepted.
    let session = session.ok_or(NoTarget::NotAccepted)?;
    if session.uid().as_deref() != Some(claims.sid.as_str()) {
        return Err(NoTarget::NotAccepted);
    }
    let status = session.status.as_ref().ok_or(NoTarget::NotReady)?;
    match status.phase {
        Phase::Completed => return Err(NoTarget::Ended("Completed")),
        Phase::Expired => return Err(NoTarget::Ended("Expired")),
        Phase::Failed => return Err(NoTarget::Ended("Failed")),
        Phase::Pending | Phase::Assigned => return Err(NoTarget::NotReady),
        Phase::Ready | Phase::Running => {}
    }
    let (Some(pod_name), Some(endpoint)) = (status.pod.as_ref(), status.endpoint.as_ref()) else {
        return Err(NoTarget::NotReady);
    };
    // The pod the cache shows may lag the session by a moment.
    let pod = pod.filter(|p| &p.name_any() == pod_name).ok_or(NoTarget::NotReady)?;
    let keys = pool_keys(pod, &claims.pool).ok_or(NoTarget::NotReady)?;
    let claims = keys.verify_session(token, now).map_err(|e| match e {
        TokenError::Expired { .. } => NoTarget::Expired,
        _ => NoTarget::NotAccepted,
    })?;
    Ok(Target { claims, pod: pod_name.clone(), endpoint: endpoint.clone() })
}

/// The public keys of `pool` from one of its pods: only from a pod the
/// WarmPool controls, so a pod someone else labelled cannot vouch for tokens.
pub fn pool_keys(pod: &Pod, pool: &str) -> Option<PublicKeys> {
    let owned =
        pod.owner_references().iter().any(|o| o.controller == Some(true) && o.kind == "WarmPool" && o.name == pool);
    if !owned {
        return None;
    }
    let containers = &pod.spec.as_ref()?.containers;
    let text = containers
        .iter()
        .flat_map(|c| c.env.iter().flatten())
        .find(|e| e.name == PUBLIC_KEY_ENV)
        .and_then(|e| e.value.as_deref())?;
    PublicKeys::from_base64_list(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use tidepool_wire::token::PoolSigningKey;

    const NOW: u64 = 1_800_000_000;

    struct Fixture {
        key: PoolSigningKey,
        token: String,
    }

    fn fixture() -> Fixture {
        let key = PoolSigningKey::generate().unwrap();
        let token = key.sign_session(&claims("uid-1", NOW + 600));
        Fixture { key, token }
    }

    fn claims(sid: &str, exp: u64) -> SessionClaims {
        SessionClaims {
            sid: sid.into(),
            ns: "default".into(),
            name: "s1".into(),
            pool: "edge".into(),
            profile: "speed".into(),
            exp,
            probes: None,
            tier: 1,
            thresholds: None,
            kid: String::new(),
        }
    }

    fn session(uid: &str, phase: &str, pod: Option<&str>) -> TestSession {
        serde_json::from_value(json!({
            "apiVersion": "tidepool.dev/v1alpha1", "kind": "TestSession",
            "metadata": { "name": "s1", "namespace": "default", "uid": uid },
            "spec": { "pool": "edge" },
            "status": {
                "phase": phase,
                "pod": pod,
                "endpoint": pod.map(|_| "http://10.0.0.7:9000"),
            }
        }))
        .unwrap()
    }

    fn pod(name: &str, owner: &str, keys: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": { "name": name, "namespace": "default", "ownerReferences": [{
                "apiVersion": "tidepool.dev/v1alpha1", "kind": "WarmPool", "name": owner, "uid": "p",
                "controller": true
            }]},
            "spec": { "containers": [{ "name": "session", "env": [{ "name": PUBLIC_KEY_ENV, "value": keys }] }] }
        }))
        .unwrap()
    }

    #[test]
    fn a_signed_token_for_a_ready_session_goes_to_its_pod() {
        let f = fixture();
        let keys = f.key.public().to_base64();
        let target = decide(
            &f.token,
            Some(&session("uid-1", "Ready", Some("edge-a"))),
            Some(&pod("edge-a", "edge", &keys)),
            NOW,
        )
        .unwrap();
        assert_eq!(target.pod, "edge-a");
        assert_eq!(target.endpoint, "http://10.0.0.7:9000");
        assert_eq!(target.claims.sid, "uid-1");
        // Running is served too.
        let running = session("uid-1", "Running", Some("edge-a"));
        assert!(decide(&f.token, Some(&running), Some(&pod("edge-a", "edge", &keys)), NOW).is_ok());
    }

    #[test]
    fn during_a_rotation_either_key_is_accepted() {
        let f = fixture();
        let newer = PoolSigningKey::generate().unwrap();
        let keys = format!("{},{}", newer.public().to_base64(), f.key.public().to_base64());
        let ready = session("uid-1", "Ready", Some("edge-a"));
        assert!(decide(&f.token, Some(&ready), Some(&pod("edge-a", "edge", &keys)), NOW).is_ok());
    }

    #[test]
    fn garbage_is_malformed() {
        assert_eq!(decide("nonsense", None, None, NOW), Err(NoTarget::Malformed));
        assert_eq!(claimed("a.b"), Err(NoTarget::Malformed));
    }

    #[test]
    fn an_unknown_session_or_another_uid_is_not_accepted() {
        let f = fixture();
        assert_eq!(decide(&f.token, None, None, NOW), Err(NoTarget::NotAccepted));
        // A session of the same name made again has a new UID.
        let again = session("uid-2", "Ready", Some("edge-a"));
        assert_eq!(decide(&f.token, Some(&again), None, NOW), Err(NoTarget::NotAccepted));
    }

    #[test]
    fn ended_sessions_say_how_they_ended() {
        let f = fixture();
        for phase in ["Completed", "Expired", "Failed"] {
            let ended = session("uid-1", phase, Some("edge-a"));
            assert!(matches!(decide(&f.token, Some(&ended), None, NOW), Err(NoTarget::Ended(p)) if p == phase));
        }
    }

    #[test]
    fn a_session_without_its_pod_in_view_is_not_ready() {
        let f = fixture();
        let keys = f.key.public().to_base64();
        for phase in ["Pending", "Assigned"] {
            let waiting = session("uid-1", phase, None);
            assert_eq!(decide(&f.token, Some(&waiting), None, NOW), Err(NoTarget::NotReady));
        }
        let mut no_status = session("uid-1", "Ready", None);
        no_status.status = None;
        assert_eq!(decide(&f.token, Some(&no_status), None, NOW), Err(NoTarget::NotReady));
        // Ready without a pod, the pod not cached yet, or the cache still on the old pod.
        let ready = session("uid-1", "Ready", Some("edge-b"));
        assert_eq!(decide(&f.token, Some(&session("uid-1", "Ready", None)), None, NOW), Err(NoTarget::NotReady));
        assert_eq!(decide(&f.token, Some(&ready), None, NOW), Err(NoTarget::NotReady));
        assert_eq!(decide(&f.token, Some(&ready), Some(&pod("edge-a", "edge", &keys)), NOW), Err(NoTarget::NotReady));
    }

    #[test]
    fn a_pod_the_pool_does_not_control_or_without_keys_vouches_for_nothing() {
        let f = fixture();
        let keys = f.key.public().to_base64();
        let ready = session("uid-1", "Ready", Some("edge-a"));
        assert_eq!(decide(&f.token, Some(&ready), Some(&pod("edge-a", "other", &keys)), NOW), Err(NoTarget::NotReady));
        assert_eq!(
            decide(&f.token, Some(&ready), Some(&pod("edge-a", "edge", "not-a-key")), NOW),
            Err(NoTarget::NotReady)
        );
    }

    #[test]
    fn a_token_from_another_key_or_expired_is_refused() {
        let f = fixture();
        let other = PoolSigningKey::generate().unwrap().public().to_base64();
        let ready = session("uid-1", "Ready", Some("edge-a"));
        assert_eq!(
            decide(&f.token, Some(&ready), Some(&pod("edge-a", "edge", &other)), NOW),
            Err(NoTarget::NotAccepted)
        );
        let keys = f.key.public().to_base64();
        let old = f.key.sign_session(&claims("uid-1", NOW - 1));
        assert_eq!(decide(&old, Some(&ready), Some(&pod("edge-a", "edge", &keys)), NOW), Err(NoTarget::Expired));
        // A changed claim breaks the signature.
        let (payload, signature) = f.token.split_once('.').unwrap();
        let forged = format!("{payload}A.{signature}");
        assert!(decide(&forged, Some(&ready), Some(&pod("edge-a", "edge", &keys)), NOW).is_err());
    }

    #[test]
    fn every_reason_has_a_label() {
        let all = [
            NoTarget::Malformed,
            NoTarget::Ended("Completed"),
            NoTarget::NotReady,
            NoTarget::NotAccepted,
            NoTarget::Expired,
        ];
        let labels: std::collections::HashSet<_> = all.iter().map(NoTarget::reason).collect();
        assert_eq!(labels.len(), all.len());
    }
}
