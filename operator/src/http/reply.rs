//! Error answers: every one is an [`ErrorBody`] with the status again.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tidepool_protocol::ErrorBody;

/// A JSON error answer: `{"error": "...", "code": N}`.
pub fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(ErrorBody { error: message.into(), code: Some(code.as_u16()) })).into_response()
}

/// The API server's refusals pass through with their code and message;
/// anything else is a 502.
pub fn kube_error(e: kube::Error) -> Response {
    match e {
        kube::Error::Api(status) => {
            let code = StatusCode::from_u16(status.code).unwrap_or(StatusCode::BAD_GATEWAY);
            error(code, status.message)
        }
        other => error(StatusCode::BAD_GATEWAY, format!("Kubernetes API: {other}")),
    }
}
