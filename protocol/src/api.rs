//! The operator's REST API as clients see it: the session routes and the
//! route for clients outside the cluster. The operator serves these types
//! and the CLI reads them; there is no second copy.

use serde::{Deserialize, Serialize};
use tidepool_crds::test_session::{ClientHints, Phase, ProbeTarget, Profile};
use tidepool_crds::warm_pool::{PlacementWeights, Tier};
use tidepool_wire::report::Coordinates;

/// POST: create a session and wait for it to be Ready ([`CreateSession`] →
/// [`SessionView`]).
pub const SESSIONS_PATH: &str = "/api/v1/sessions";

/// The annotation the gateway keeps on a session it serves: when (RFC 3339)
/// its client last had a stream open. With the pool's
/// `releaseWhenClientGoneSeconds`, the operator ends a session whose client
/// has been gone that long; a session without it is never ended so.
pub const CLIENT_SEEN_ANNOTATION: &str = "tidepool.dev/client-seen";
/// GET or DELETE one session, with `?namespace=`.
pub const SESSION_PATH: &str = "/api/v1/sessions/{name}";
/// POST: the best backend for a client outside the cluster ([`RouteRequest`]
/// → [`RouteAnswer`]).
pub const ROUTE_PATH: &str = "/api/v1/route";

/// The body of `POST /api/v1/sessions`. Every field but `pool` is optional;
/// the TestSession's schema judges the values.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSession {
    pub pool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<Profile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientHints>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probes: Vec<ProbeTarget>,
}

/// `GET /api/v1/pools` on the gateway: the pools anyone may start a
/// session on.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PublicPools {
    pub pools: Vec<PublicPool>,
}

/// One public pool, as the web UI picks one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PublicPool {
    pub namespace: String,
    pub name: String,
    pub tier: Tier,
    /// Warm pods now.
    pub warm: i32,
}

/// What the operator answers about a session.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    pub name: String,
    pub namespace: String,
    pub pool: String,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The session token: the same for the session's whole life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The binding ticket for the current pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binding: Option<String>,
    /// The relay ticket for the current pod: only for callers that may
    /// relay (`create` on `testsessions/relay`), that is the gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Why the session is not Ready, when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The Backend that serves it, when placement chose one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// That backend's region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// How far the backend is from the client, when both have coordinates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distance_km: Option<f64>,
    /// The results in the session's status, graded, once any were reported:
    /// the web UI's results link reads them back here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub results: Option<tidepool_crds::test_session::SessionResults>,
}

impl SessionView {
    /// Whether a client can use the session now: Ready, with a pod, an
    /// endpoint and credentials.
    pub fn usable(&self) -> bool {
        self.phase == Phase::Ready
            && self.pod.is_some()
            && self.endpoint.is_some()
            && self.token.is_some()
            && self.binding.is_some()
    }
}

/// The answer when a session did not turn Ready in time (504): the reason,
/// and the session as it stands, which is kept.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct NotReadyInTime {
    pub error: String,
    pub code: u16,
    pub session: SessionView,
}

/// `?namespace=` on the session routes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// What a client outside the cluster asks of `POST /api/v1/route`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteRequest {
    pub tier: Tier,
    /// The client's address; it is the sticky key when none is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinates: Option<Coordinates>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_key: Option<String>,
    /// Score weights; the defaults are the reference router's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<PlacementWeights>,
}

impl RouteRequest {
    /// Checks the request's figures; the message names the field.
    pub fn check(&self) -> Result<(), String> {
        let tier = &self.tier;
        let ranges: [(&str, i64, i64, i64); 5] = [
            ("tier.vcpu", i64::from(tier.vcpu), 1, 512),
            ("tier.memoryMiB", tier.memory_mib, 16, 4_194_304),
            ("tier.diskGiB", tier.disk_gib, 0, 65_536),
            ("tier.gpus", i64::from(tier.gpus), 0, 16),
            ("tier.gpuMemoryMiB", tier.gpu_memory_mib, 0, 4_194_304),
        ];
        for (field, value, min, max) in ranges {
            if !(min..=max).contains(&value) {
                return Err(format!("{field} must be between {min} and {max}"));
            }
        }
        if let Some(address) = &self.client_address
            && address.parse::<std::net::IpAddr>().is_err()
        {
            return Err("clientAddress must be an IPv4 or IPv6 address".into());
        }
        if let Some(c) = &self.coordinates
            && !((-90.0..=90.0).contains(&c.latitude) && (-180.0..=180.0).contains(&c.longitude))
        {
            return Err("coordinates: latitude must be within ±90 and longitude within ±180".into());
        }
        if self.sticky_key.as_ref().is_some_and(|k| k.is_empty() || k.len() > 253) {
            return Err("stickyKey must be 1 to 253 characters".into());
        }
        if let Some(w) = &self.weights {
            let all = [w.distance, w.cpu, w.memory, w.gpu, w.latency];
            if all.iter().any(|v| !(v.is_finite() && (0.0..=1000.0).contains(v))) {
                return Err("weights must each be between 0 and 1000".into());
            }
        }
        Ok(())
    }
}

/// Where a routed client should go.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RouteAnswer {
    pub backend: String,
    pub kind: BackendKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    pub score: f64,
    /// The sticky key's backend was reused.
    pub sticky: bool,
    /// How long ago the operator received the backend's latest report.
    pub report_age_ms: u64,
    /// How old the newest sample in that report is, by the wall clock.
    pub sample_age_ms: u64,
}

/// Whether a routed backend is a node of the cluster or a server outside it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Node,
    External,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_requests_leave_out_what_is_not_given() {
        let request = CreateSession { pool: "edge".into(), profile: Some(Profile::Bufferbloat), ..Default::default() };
        assert_eq!(serde_json::to_string(&request).unwrap(), r#"{"pool":"edge","profile":"bufferbloat"}"#);
        let full = CreateSession {
            pool: "edge".into(),
            namespace: Some("ns".into()),
            ttl_seconds: Some(60),
            sticky_key: Some("k".into()),
            ..Default::default()
        };
        let json = serde_json::to_string(&full).unwrap();
        assert_eq!(json, r#"{"pool":"edge","namespace":"ns","ttlSeconds":60,"stickyKey":"k"}"#);
        assert_eq!(serde_json::from_str::<CreateSession>(&json).unwrap(), full);
        assert!(serde_json::from_str::<CreateSession>(r#"{"pool":"edge","extra":1}"#).is_err());
    }

    #[test]
    fn the_phase_goes_on_the_wire_as_the_crd_spells_it() {
        let view = SessionView { name: "s".into(), phase: Phase::Ready, ..Default::default() };
        let json = serde_json::to_value(&view).unwrap();
        assert_eq!(json["phase"], "Ready");
        let back: SessionView = serde_json::from_value(json).unwrap();
        assert_eq!(back.phase, Phase::Ready);
        assert!(
            serde_json::from_value::<SessionView>(serde_json::json!({
                "name": "s", "namespace": "n", "pool": "p", "phase": "Bound"
            }))
            .is_err()
        );
    }

    #[test]
    fn views_tell_when_usable() {
        let body = serde_json::json!({
            "name": "session-abc", "namespace": "default", "pool": "edge", "phase": "Ready",
            "pod": "edge-1", "node": "n1", "endpoint": "http://10.0.0.1:8080",
            "token": "t", "binding": "b", "expiresAt": "2030-01-01T00:00:00Z"
        });
        let view: SessionView = serde_json::from_value(body).unwrap();
        assert!(view.usable());
        let pending: SessionView = serde_json::from_value(serde_json::json!({
            "name": "s", "namespace": "default", "pool": "edge", "phase": "Pending", "reason": "no warm pod"
        }))
        .unwrap();
        assert!(!pending.usable());
        assert_eq!(pending.reason.as_deref(), Some("no warm pod"));
    }

    fn route(json: &str) -> RouteRequest {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn bad_route_figures_name_their_field() {
        assert_eq!(route(r#"{"tier": {"vcpu": 1, "memoryMiB": 1024}}"#).check(), Ok(()));
        let cases = [
            (r#"{"tier": {"vcpu": 0, "memoryMiB": 1024}}"#, "tier.vcpu"),
            (r#"{"tier": {"vcpu": 1, "memoryMiB": 1}}"#, "tier.memoryMiB"),
            (r#"{"tier": {"vcpu": 1, "memoryMiB": 64, "gpus": 99}}"#, "tier.gpus"),
            (r#"{"tier": {"vcpu": 1, "memoryMiB": 64}, "clientAddress": "nope"}"#, "clientAddress"),
            (
                r#"{"tier": {"vcpu": 1, "memoryMiB": 64}, "coordinates": {"latitude": 99, "longitude": 0}}"#,
                "coordinates",
            ),
            (r#"{"tier": {"vcpu": 1, "memoryMiB": 64}, "stickyKey": ""}"#, "stickyKey"),
        ];
        for (json, field) in cases {
            let message = route(json).check().unwrap_err();
            assert!(message.starts_with(field), "{json}: {message}");
        }
        assert!(serde_json::from_str::<RouteRequest>(r#"{"tier": {"vcpu": 1, "memoryMiB": 64}, "x": 1}"#).is_err());
    }
}

/// The API's bodies come from anyone who can reach the operator: whatever
/// the bytes, parsing and checking answer and never panic, and every check
/// accepts exactly the figures it documents.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;
    use crate::parse_json;

    fn tier() -> impl Strategy<Value = Tier> {
        (any::<i32>(), any::<i64>(), any::<i64>(), any::<i32>(), any::<i64>()).prop_map(
            |(vcpu, memory_mib, disk_gib, gpus, gpu_memory_mib)| Tier {
                vcpu,
                memory_mib,
                disk_gib,
                gpus,
                gpu_memory_mib,
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn any_bytes_are_answered_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_json::<CreateSession>(&bytes);
            if let Ok(request) = parse_json::<RouteRequest>(&bytes) {
                let _ = request.check();
            }
        }

        #[test]
        fn a_tier_is_accepted_exactly_within_its_ranges(tier in tier()) {
            let within = (1..=512).contains(&tier.vcpu)
                && (16..=4_194_304).contains(&tier.memory_mib)
                && (0..=65_536).contains(&tier.disk_gib)
                && (0..=16).contains(&tier.gpus)
                && (0..=4_194_304).contains(&tier.gpu_memory_mib);
            let request = RouteRequest { tier, client_address: None, coordinates: None, sticky_key: None, weights: None };
            prop_assert_eq!(request.check().is_ok(), within);
        }

        #[test]
        fn a_client_address_is_accepted_only_when_it_is_an_ip(address in "\\PC{0,45}") {
            let tier = Tier { vcpu: 1, memory_mib: 64, disk_gib: 0, gpus: 0, gpu_memory_mib: 0 };
            let is_ip = address.parse::<std::net::IpAddr>().is_ok();
            let request =
                RouteRequest { tier, client_address: Some(address), coordinates: None, sticky_key: None, weights: None };
            prop_assert_eq!(request.check().is_ok(), is_ip);
        }

        #[test]
        fn create_requests_round_trip(pool in "[a-z0-9-]{1,63}", ttl in proptest::option::of(any::<i64>()), key in proptest::option::of("\\PC{0,40}")) {
            let request = CreateSession { pool, ttl_seconds: ttl, sticky_key: key, ..Default::default() };
            let body = serde_json::to_vec(&request).unwrap();
            prop_assert_eq!(parse_json::<CreateSession>(&body), Ok(request));
        }
    }
}
