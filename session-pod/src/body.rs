//! Request bodies: read up to a limit, parsed as JSON with errors that
//! say which field.

use axum::body::Body;
use axum::http::StatusCode;
use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tidepool_protocol::BodyError;

use crate::error::ApiError;

/// The whole body, at most `limit` bytes (413 beyond).
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<LengthLimitError>() => {
            Err(ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is over the limit of {limit} bytes")))
        }
        Err(e) => Err(ApiError::bad_request(format!("cannot read the body: {e}"))),
    }
}

/// JSON that does not parse is a 400; JSON of the wrong shape (a missing
/// field, a `null` where a number belongs: what NaN becomes in JSON) is a
/// 422 that names the field.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    tidepool_protocol::parse_json(body).map_err(|e| match e {
        BodyError::Syntax(_) => ApiError::bad_request(e.to_string()),
        BodyError::Field { .. } => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_protocol::results::ResultsSubmission;

    #[test]
    fn json_errors_are_400_and_shape_errors_are_422_with_the_path() {
        let syntax = parse_json::<ResultsSubmission>(b"{\"results\":").unwrap_err();
        assert_eq!(syntax.status, StatusCode::BAD_REQUEST);
        let nan = parse_json::<ResultsSubmission>(br#"{"results":{"latency":{"p50Ms":null}}}"#).unwrap_err();
        assert_eq!(nan.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(nan.message.starts_with("results.latency.p50Ms"), "{}", nan.message);
        let trailing = parse_json::<ResultsSubmission>(br#"{"results":{}} x"#).unwrap_err();
        assert_eq!(trailing.status, StatusCode::BAD_REQUEST);
    }
}
