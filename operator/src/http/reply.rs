//! Error answers: every one is an [`ErrorBody`] with the status again.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use tidepool_protocol::{BodyError, ErrorBody};

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

/// A request's JSON body: 400 when it is not JSON, 422 naming the field when
/// a field is missing, unknown or of the wrong type, 413 (from the body
/// limit) when it is too long.
pub fn json_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, Refused> {
    let body = body.map_err(|rejection| Refused(rejection.status(), rejection.body_text()))?;
    tidepool_protocol::parse_json(&body).map_err(|e| {
        let code = match e {
            BodyError::Syntax(_) => StatusCode::BAD_REQUEST,
            BodyError::Field { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        };
        Refused(code, format!("invalid request body: {e}"))
    })
}

/// A request refused before any work: its status and the reason.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused(pub StatusCode, pub String);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}
