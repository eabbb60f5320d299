//! Answers: every error is an [`ErrorBody`] with the status again, a short
//! reason for the caller. What the API server said is logged, never passed
//! on: its messages name the operator's ServiceAccount and its rights.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use tidepool_protocol::{BodyError, ErrorBody};
use tidepool_serve::BodyTimedOut;

/// A JSON error answer: `{"error": "...", "code": N}`.
pub fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(ErrorBody { error: message.into(), code: Some(code.as_u16()) })).into_response()
}

/// Like [`error`], telling the client when to try again.
pub fn retry_later(code: StatusCode, message: impl Into<String>, after_seconds: u64) -> Response {
    let mut response = error(code, message);
    if let Ok(value) = HeaderValue::from_str(&after_seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// A request refused before any work: its status, the bounded reason for
/// the refusal metric, and the message for the caller.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub code: StatusCode,
    pub reason: &'static str,
    pub message: String,
}

impl Refused {
    pub fn new(code: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self { code, reason, message: message.into() }
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        error(self.code, self.message)
    }
}

/// An API server failure as the caller should see it: its kind, never its text.
pub fn kube_refusal(e: kube::Error, what: &str) -> Refused {
    let status = match &e {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    };
    match status {
        Some(404) => Refused::new(StatusCode::NOT_FOUND, "not_found", format!("{what}: not found")),
        Some(409) => Refused::new(StatusCode::CONFLICT, "conflict", format!("{what}: changed meanwhile; try again")),
        // The object's own fields were refused: the API server's message
        // names the field, and says nothing of the operator.
        Some(422) => {
            let message = match &e {
                kube::Error::Api(status) => status.message.clone(),
                _ => String::new(),
            };
            Refused::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message.chars().take(1024).collect::<String>())
        }
        Some(401 | 403) => {
            tracing::error!(error = %e, what, "the API server refused the operator; check its RBAC");
            Refused::new(StatusCode::BAD_GATEWAY, "operator_forbidden", format!("{what}: the operator may not do this"))
        }
        Some(429) | Some(500..=599) | None => {
            tracing::warn!(error = %e, what, "the Kubernetes API failed");
            Refused::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "kube_unavailable",
                format!("{what}: the Kubernetes API is busy; try again"),
            )
        }
        Some(_) => {
            tracing::warn!(error = %e, what, "the Kubernetes API refused");
            Refused::new(StatusCode::BAD_GATEWAY, "kube_refused", format!("{what}: the Kubernetes API refused"))
        }
    }
}

/// A request's JSON body: 400 when it is not JSON, 422 naming the field when
/// a field is missing, unknown or of the wrong type, 408 when it came too
/// slowly, 413 (from the body limit) when it is too long.
pub fn json_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, Refused> {
    let body = body.map_err(|rejection| {
        if timed_out(&rejection) {
            Refused::new(StatusCode::REQUEST_TIMEOUT, "slow_body", "the request body came too slowly")
        } else if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Refused::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", rejection.body_text())
        } else {
            Refused::new(rejection.status(), "unreadable_body", rejection.body_text())
        }
    })?;
    tidepool_protocol::parse_json(&body).map_err(|e| match e {
        BodyError::Syntax(_) => Refused::new(StatusCode::BAD_REQUEST, "not_json", format!("invalid request body: {e}")),
        BodyError::Field { .. } => {
            Refused::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_field", format!("invalid request body: {e}"))
        }
    })
}

fn timed_out(rejection: &BytesRejection) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(rejection);
    while let Some(error) = source {
        if error.is::<BodyTimedOut>() {
            return true;
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, message: &str) -> kube::Error {
        kube::Error::Api(kube::core::Status::failure(message, "Reason").with_code(code).boxed())
    }

    #[test]
    fn the_api_servers_words_reach_the_caller_only_for_a_bad_field() {
        let rbac = r#"testsessions.tidepool.dev is forbidden: User "system:serviceaccount:tidepool:tidepool-operator" cannot create"#;
        let refused = kube_refusal(api(403, rbac), "creating the session");
        assert_eq!((refused.code, refused.reason), (StatusCode::BAD_GATEWAY, "operator_forbidden"));
        assert!(!refused.message.contains("serviceaccount"), "{}", refused.message);
        let invalid = kube_refusal(api(422, "spec.ttlSeconds: Invalid value: 0"), "creating the session");
        assert_eq!(
            (invalid.code, invalid.message.as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, "spec.ttlSeconds: Invalid value: 0")
        );
        assert_eq!(kube_refusal(api(404, "x"), "reading").code, StatusCode::NOT_FOUND);
        assert_eq!(kube_refusal(api(409, "x"), "reading").code, StatusCode::CONFLICT);
        for busy in [429, 500, 503] {
            let refused = kube_refusal(api(busy, "etcdserver: leader changed"), "reading");
            assert_eq!(refused.code, StatusCode::SERVICE_UNAVAILABLE);
            assert!(!refused.message.contains("etcd"));
        }
    }
}
