//! What Tidepool's programs say to each other over HTTP, free of I/O:
//!
//! - [`pod`]: a client (the CLI, a browser) and a session pod;
//! - [`api`]: a client and the operator's REST API;
//! - [`results`]: measured results, from the client to the pod and from the
//!   pod to the operator, and the checks both apply;
//! - [`grading`]: the grading rules every side applies to results;
//! - [`egress`]: what a pool's session pods may reach with their probes;
//! - [`stored`]: results kept in object storage, and the route that reads them;
//! - [`cluster`]: the operators' live view of pools, sessions and backends;
//! - [`tube`]: tubes, between a client and the operator and between the
//!   operator and the pod that terminates one.
//!
//! Session tokens, binding tickets and agent reports live in `tidepool-wire`.

pub mod api;
pub mod cluster;
pub mod egress;
pub mod grading;
pub mod names;
pub mod pod;
pub mod relay;
pub mod results;
pub mod stored;
pub mod tube;

use serde::{Deserialize, Serialize};

/// The header that carries the binding ticket, on the pod's routes and the
/// operator's results route.
pub const BINDING_HEADER: &str = "x-tidepool-binding";

/// The header that carries a relay ticket: the gateway's proof to a pod
/// that it may name the client's address (in `X-Forwarded-For`) and relay
/// the client's UDP echo.
pub const RELAY_HEADER: &str = "x-tidepool-relay";

/// The token of an `Authorization: Bearer <token>` header's value: the
/// scheme in any case (RFC 9110), the token trimmed; `None` for another
/// scheme or an empty token.
pub fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Every error answer, from the pod or the operator: a short reason for the
/// caller, and the HTTP status again.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
}

/// Why a JSON body was refused: it is not JSON (answered 400), or it is JSON
/// of the wrong shape or with a value out of place (answered 422, naming the
/// field by its path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("invalid JSON: {0}")]
    Syntax(String),
    #[error("{path}: {message}")]
    Field { path: String, message: String },
}

/// Parses a JSON body, telling bad syntax from a bad field; trailing bytes
/// after the value are bad syntax.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, BodyError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let (path, inner) = (e.path().to_string(), e.inner());
        if inner.is_data() {
            BodyError::Field { path, message: inner.to_string() }
        } else {
            BodyError::Syntax(inner.to_string())
        }
    })?;
    deserializer.end().map_err(|e| BodyError::Syntax(e.to_string()))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bearer_token_is_read_whatever_the_schemes_case() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("BEARER abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token(""), None);
    }

    #[test]
    fn bad_syntax_and_bad_fields_are_told_apart() {
        let syntax = parse_json::<results::ResultsSubmission>(b"{\"results\":").unwrap_err();
        assert!(matches!(syntax, BodyError::Syntax(_)), "{syntax:?}");
        let null = parse_json::<results::ResultsSubmission>(br#"{"results":{"latency":{"p50Ms":null}}}"#).unwrap_err();
        assert!(matches!(&null, BodyError::Field { path, .. } if path == "results.latency.p50Ms"), "{null:?}");
        let trailing = parse_json::<results::ResultsSubmission>(br#"{"results":{}} x"#).unwrap_err();
        assert!(matches!(trailing, BodyError::Syntax(_)));
        let unknown = parse_json::<api::CreateSession>(br#"{"pool":"edge","colour":"red"}"#).unwrap_err();
        assert!(unknown.to_string().contains("unknown field `colour`"), "{unknown}");
        assert!(parse_json::<api::CreateSession>(br#"{"pool":"edge"}"#).is_ok());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;
        use tidepool_crds::test_session::{LatencySummary, ProbeKind, ProbeTarget, SessionResults};

        fn target() -> impl Strategy<Value = ProbeTarget> {
            let kind = prop_oneof![
                Just(ProbeKind::Http),
                Just(ProbeKind::Tcp),
                Just(ProbeKind::Tls),
                Just(ProbeKind::Udp),
                Just(ProbeKind::Dns),
                Just(ProbeKind::Icmp),
                Just(ProbeKind::Traceroute),
                Just(ProbeKind::Ssh),
            ];
            (kind, proptest::option::of("\\PC{0,40}"), proptest::option::of("[a-z0-9.:-]{1,30}"), any::<Option<i32>>())
                .prop_map(|(kind, url, host, port)| ProbeTarget { kind, url, host, port })
        }

        fn request() -> impl Strategy<Value = pod::ProbeRequest> {
            (proptest::collection::vec(target(), 0..5), any::<Option<i32>>())
                .prop_map(|(targets, tier)| pod::ProbeRequest { targets, tier })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = parse_json::<results::ResultsSubmission>(&bytes);
                let _ = parse_json::<pod::ProbeRequest>(&bytes);
            }

            #[test]
            fn probe_requests_round_trip(request in request()) {
                let body = serde_json::to_vec(&request).unwrap();
                prop_assert_eq!(parse_json::<pod::ProbeRequest>(&body), Ok(request));
            }

            #[test]
            fn cut_bodies_are_bad_syntax(request in request(), cut in 0.0f64..1.0) {
                let body = serde_json::to_vec(&request).unwrap();
                let cut = ((body.len() as f64) * cut) as usize;
                prop_assume!(cut < body.len());
                prop_assert!(matches!(parse_json::<pod::ProbeRequest>(&body[..cut]), Err(BodyError::Syntax(_))));
            }

            #[test]
            fn results_round_trip_and_wrong_types_name_the_field(
                p50 in 0u32..1_000_000, samples in any::<i64>(), text in "[a-z]{0,8}", is_final in any::<bool>(),
            ) {
                // Whole numbers: serde_json's float parsing may miss the last bit.
                let latency = LatencySummary { p50_ms: f64::from(p50), samples, ..Default::default() };
                let submission = results::ResultsSubmission {
                    results: SessionResults { latency: Some(latency), ..Default::default() },
                    is_final,
                };
                let body = serde_json::to_vec(&submission).unwrap();
                prop_assert_eq!(parse_json::<results::ResultsSubmission>(&body), Ok(submission));
                let wrong = format!(r#"{{"results":{{"latency":{{"p50Ms":"{text}"}}}}}}"#);
                let refused = parse_json::<results::ResultsSubmission>(wrong.as_bytes());
                prop_assert!(
                    matches!(&refused, Err(BodyError::Field { path, .. }) if path == "results.latency.p50Ms"),
                    "{:?}", refused
                );
            }
        }
    }
}
