//! What Tidepool's programs say to each other over HTTP, free of I/O:
//!
//! - [`pod`]: a client (the CLI, a browser) and a session pod;
//! - [`api`]: a client and the operator's REST API;
//! - [`results`]: measured results, from the client to the pod and from the
//!   pod to the operator, and the checks both apply;
//! - [`grading`]: the grading rules every side applies to results.
//!
//! Session tokens, binding tickets and agent reports live in `tidepool-wire`.

pub mod api;
pub mod grading;
pub mod pod;
pub mod results;

use serde::{Deserialize, Serialize};

/// The header that carries the binding ticket, on the pod's routes and the
/// operator's results route.
pub const BINDING_HEADER: &str = "x-tidepool-binding";

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
}
