//! Refusals as the gateway answers them: JSON `{"error", "code"}` with a
//! message that says what was wrong and never how the gateway is built,
//! counted by reason.

use axum::body::Body;
use axum::http::{HeaderValue, Response, StatusCode, header};

use tidepool_protocol::ErrorBody;

use crate::metrics::Metrics;

/// A request the gateway will not serve, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: StatusCode,
    /// The metric label: a fixed, small set.
    pub reason: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
    /// Already counted where it happened (a body the server cut for its
    /// pauses): answered, but not counted again.
    pub counted: bool,
}

impl Refused {
    pub fn new(status: StatusCode, reason: &'static str, message: impl Into<String>) -> Self {
        Self { status, reason, message: message.into(), retry_after: None, counted: false }
    }

    pub fn already_counted(mut self) -> Self {
        self.counted = true;
        self
    }

    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

/// Answers a refusal and counts it.
pub fn refuse(metrics: &Metrics, route: &str, refused: Refused) -> Response<Body> {
    if !refused.counted {
        metrics.refused(refused.reason);
    }
    metrics.requests.with_label_values(&[route, refused.status.as_str()]).inc();
    let body = ErrorBody { error: refused.message, code: Some(refused.status.as_u16()) };
    let mut response = json(refused.status, serde_json::to_vec(&body).unwrap_or_default());
    if let Some(seconds) = refused.retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    if refused.status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// A JSON answer.
pub fn json(status: StatusCode, body: impl Into<Body>) -> Response<Body> {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_refusal_is_json_counted_and_says_when_to_retry() {
        let metrics = Metrics::new().unwrap();
        let refused = Refused::new(StatusCode::TOO_MANY_REQUESTS, "sessions_per_hour", "too many").retry_after(42);
        let response = refuse(&metrics, "sessions", refused);
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "42");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body, serde_json::json!({ "error": "too many", "code": 429 }));
        assert_eq!(metrics.refusals.with_label_values(&["sessions_per_hour"]).get(), 1);
        let unauthorized = refuse(&metrics, "streams", Refused::new(StatusCode::UNAUTHORIZED, "no_token", "no"));
        assert_eq!(unauthorized.headers()["www-authenticate"], "Bearer");
        // A refusal the server already counted is answered, not counted twice.
        let cut = Refused::new(StatusCode::REQUEST_TIMEOUT, "slow_body", "slow").already_counted();
        assert_eq!(refuse(&metrics, "sessions", cut).status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(metrics.refusals.with_label_values(&["slow_body"]).get(), 0);
    }
}
