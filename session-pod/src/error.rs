//! Refusals as HTTP answers: a status, a JSON [`ErrorBody`], and the reason
//! the refusal metric counts them by.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::limits::{Refusal, secs};
use tidepool_protocol::ErrorBody;

/// Why the pod refused a request, a socket's message, a connection or a
/// probe run: the `reason` label of `tidepool_session_refusals_total`, a
/// fixed set whatever clients send.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// No token or ticket, or a malformed or expired token.
    Unauthenticated,
    /// A token or ticket signed by another key, for another pod or pool.
    Forbidden,
    /// Credentials of another session than the one the pod serves.
    OtherSession,
    /// A relayed request without a sound client address.
    BadForwarded,
    TestsPerHour,
    BytesPerHour,
    ConcurrentSockets,
    /// An upload over `max_upload_bytes`.
    UploadTooLarge,
    /// A JSON body over its route's limit.
    BodyTooLarge,
    /// A body that did not come in time.
    BodyTimeout,
    /// A body that broke off.
    BodyError,
    /// A query string that does not parse or is out of range.
    BadQuery,
    /// A body that is not JSON.
    BadJson,
    /// JSON of the wrong shape.
    BadField,
    /// Results with a figure outside the TestSession schema.
    InvalidResults,
    /// A plain request to a WebSocket route.
    NotWebsocket,
    NoSuchUser,
    NoSuchRoute,
    WrongMethod,
    /// Probe targets other than the session's.
    ProbeTargets,
    /// A probe tier out of range or above the token's.
    ProbeTier,
    /// A continuous interval out of range.
    ProbeInterval,
    /// A probe run while another goes on.
    ProbeBusy,
    ProbeRunsPerMinute,
    ProbeBytes,
    /// A text frame that is not a client message (bad JSON, an unknown type).
    WsBadMessage,
    /// A binary frame on the latency socket.
    WsBinary,
    /// A message that does not belong: `start` on `/ws`, a second `start`, a bad rate.
    WsBadStart,
    /// Pings faster than `MAX_PING_HZ`.
    WsPingRate,
    /// A frame over `MAX_CLIENT_FRAME_BYTES`, or one that breaks the protocol.
    WsBadFrame,
    /// A connection beyond `max_connections`.
    MaxConnections,
    /// A tube offer that is not SDP, or cannot be answered.
    BadOffer,
    /// A tube its ticket does not allow (no allowlist, a bad target), or one already ended.
    TubeRefused,
    /// Tubes to this pod failed to connect in a row: new ones wait.
    TubeBackoff,
    /// As many tubes as the pod may carry.
    TubeLimit,
    /// As many tubes being set up as the pod takes at once.
    TubeCreations,
    NoSuchTube,
    /// Any other client error (a framework's own rejection).
    Other,
}

impl Reason {
    pub const ALL: [Reason; 38] = [
        Self::Unauthenticated,
        Self::Forbidden,
        Self::OtherSession,
        Self::BadForwarded,
        Self::TestsPerHour,
        Self::BytesPerHour,
        Self::ConcurrentSockets,
        Self::UploadTooLarge,
        Self::BodyTooLarge,
        Self::BodyTimeout,
        Self::BodyError,
        Self::BadQuery,
        Self::BadJson,
        Self::BadField,
        Self::InvalidResults,
        Self::NotWebsocket,
        Self::NoSuchUser,
        Self::NoSuchRoute,
        Self::WrongMethod,
        Self::ProbeTargets,
        Self::ProbeTier,
        Self::ProbeInterval,
        Self::ProbeBusy,
        Self::ProbeRunsPerMinute,
        Self::ProbeBytes,
        Self::WsBadMessage,
        Self::WsBinary,
        Self::WsBadStart,
        Self::WsPingRate,
        Self::WsBadFrame,
        Self::MaxConnections,
        Self::BadOffer,
        Self::TubeRefused,
        Self::TubeBackoff,
        Self::TubeLimit,
        Self::TubeCreations,
        Self::NoSuchTube,
        Self::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Unauthenticated => "unauthenticated",
            Self::Forbidden => "forbidden",
            Self::OtherSession => "other_session",
            Self::BadForwarded => "bad_forwarded_for",
            Self::TestsPerHour => "tests_per_hour",
            Self::BytesPerHour => "bytes_per_hour",
            Self::ConcurrentSockets => "concurrent_sockets",
            Self::UploadTooLarge => "upload_too_large",
            Self::BodyTooLarge => "body_too_large",
            Self::BodyTimeout => "body_timeout",
            Self::BodyError => "body_error",
            Self::BadQuery => "bad_query",
            Self::BadJson => "bad_json",
            Self::BadField => "bad_field",
            Self::InvalidResults => "invalid_results",
            Self::NotWebsocket => "not_websocket",
            Self::NoSuchUser => "no_such_user",
            Self::NoSuchRoute => "no_such_route",
            Self::WrongMethod => "wrong_method",
            Self::ProbeTargets => "probe_targets",
            Self::ProbeTier => "probe_tier",
            Self::ProbeInterval => "probe_interval",
            Self::ProbeBusy => "probe_busy",
            Self::ProbeRunsPerMinute => "probe_runs_per_minute",
            Self::ProbeBytes => "probe_bytes",
            Self::WsBadMessage => "ws_bad_message",
            Self::WsBinary => "ws_binary",
            Self::WsBadStart => "ws_bad_start",
            Self::WsPingRate => "ws_ping_rate",
            Self::WsBadFrame => "ws_bad_frame",
            Self::MaxConnections => "max_connections",
            Self::BadOffer => "bad_offer",
            Self::TubeRefused => "tube_refused",
            Self::TubeBackoff => "tube_backoff",
            Self::TubeLimit => "tube_limit",
            Self::TubeCreations => "tube_creations",
            Self::NoSuchTube => "no_such_tube",
            Self::Other => "other",
        }
    }
}

/// A request the pod will not serve, and why.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// Sent as `Retry-After` (whole seconds).
    pub retry_after: Option<Duration>,
    pub reason: Reason,
}

impl ApiError {
    pub fn new(reason: Reason, status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into(), retry_after: None, reason }
    }

    pub fn bad_request(reason: Reason, message: impl Into<String>) -> Self {
        Self::new(reason, StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(reason: Reason, message: impl Into<String>) -> Self {
        Self::new(reason, StatusCode::NOT_FOUND, message)
    }

    /// A 429 for a limit, with when to try again.
    pub fn too_many(reason: Reason, message: impl Into<String>, retry_after: Duration) -> Self {
        Self { retry_after: Some(retry_after), ..Self::new(reason, StatusCode::TOO_MANY_REQUESTS, message) }
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        let reason = match refusal {
            Refusal::Tests { .. } => Reason::TestsPerHour,
            Refusal::Bytes { .. } => Reason::BytesPerHour,
            Refusal::Sockets { .. } => Reason::ConcurrentSockets,
        };
        Self::too_many(reason, refusal.to_string(), refusal.retry_after())
    }
}

impl IntoResponse for ApiError {
    /// The answer carries its reason as an extension: the request counter
    /// counts every refusal by it, in one place.
    fn into_response(self) -> Response {
        let mut response =
            json_response(self.status, &ErrorBody { error: self.message, code: Some(self.status.as_u16()) });
        response.extensions_mut().insert(self.reason);
        let headers = response.headers_mut();
        if let Some(wait) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs(wait).max(1)));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        // The rest of a body that stopped coming may never come: do not wait for it.
        if self.status == StatusCode::REQUEST_TIMEOUT {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// `value` as a JSON body with `status`.
pub fn json_response<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => {
            (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
        }
        // Our own types always serialise; answer something sensible if one ever does not.
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode the answer: {e}")).into_response(),
    }
}

/// Parses a query string into `T`, or a 400 that says what was wrong.
pub fn parse_query<T: serde::de::DeserializeOwned>(query: Option<&str>) -> Result<T, ApiError> {
    serde_urlencoded::from_str(query.unwrap_or_default())
        .map_err(|e| ApiError::bad_request(Reason::BadQuery, format!("invalid query string: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_labels_are_distinct_snake_case_and_carried_by_the_answer() {
        let labels: std::collections::HashSet<&str> = Reason::ALL.iter().map(|r| r.label()).collect();
        assert_eq!(labels.len(), Reason::ALL.len());
        assert!(labels.iter().all(|l| l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')), "{labels:?}");
        let response = ApiError::too_many(Reason::ProbeBusy, "busy", Duration::from_millis(1500)).into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.extensions().get::<Reason>(), Some(&Reason::ProbeBusy));
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }
}
