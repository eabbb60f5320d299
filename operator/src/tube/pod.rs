//! The operator's calls to the pod that terminates a tube, each with a
//! tube ticket signed by the pool's key, and their answers checked.

use std::time::Duration;

use reqwest::StatusCode;
use tidepool_protocol::ErrorBody;
use tidepool_protocol::tube::{POD_TUBES_PATH, TUBE_TICKET_HEADER, TubeAnswer, TubeOffer, TubeReport, decode_sdp};

/// The pod gathers its candidates before it answers (a few ms on a quiet
/// node, up to 5 s at worst).
const OFFER_TIMEOUT: Duration = Duration::from_secs(8);
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// The most of an answer read: an SDP answer's base64 with room to spare.
const MAX_ANSWER_BYTES: usize = 128 * 1024;

/// Why a call to the pod did not give what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodError {
    #[error("the pod did not answer: {0}")]
    Unreachable(String),
    /// The pod is at a limit or backing off; try again later.
    #[error("the pod is busy: {message}")]
    Busy { retry_after: Duration, message: String },
    /// The client's offer cannot be answered.
    #[error("{0}")]
    BadOffer(String),
    /// The pod will not take this tube.
    #[error("{0}")]
    Refused(String),
    /// The pod does not know the tube (it restarted, or forgot it long ago).
    #[error("the pod does not know the tube")]
    Unknown,
    #[error("the pod's answer is not valid: {0}")]
    Invalid(String),
}

fn url(endpoint: &str, path: &str) -> String {
    format!("{}{path}", endpoint.trim_end_matches('/'))
}

fn tube_url(endpoint: &str, uid: &str) -> String {
    // A UID is a UUID: nothing in it needs escaping, but it is checked anyway.
    let uid: String = uid.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    url(endpoint, &format!("{POD_TUBES_PATH}/{uid}"))
}

/// Hands the offer to the pod; its answer, base64.
pub async fn offer(http: &reqwest::Client, endpoint: &str, ticket: &str, body: &TubeOffer) -> Result<String, PodError> {
    let request = http.post(url(endpoint, POD_TUBES_PATH)).header(TUBE_TICKET_HEADER, ticket).json(body);
    let bytes = call(request, OFFER_TIMEOUT).await?;
    let answer: TubeAnswer = serde_json::from_slice(&bytes).map_err(|e| PodError::Invalid(e.to_string()))?;
    // Checked as the client will check it, so a bad answer fails here, not there.
    decode_sdp(&answer.answer).map_err(|e| PodError::Invalid(e.to_string()))?;
    Ok(answer.answer)
}

/// What the pod says of the tube now.
pub async fn report(http: &reqwest::Client, endpoint: &str, ticket: &str, uid: &str) -> Result<TubeReport, PodError> {
    let request = http.get(tube_url(endpoint, uid)).header(TUBE_TICKET_HEADER, ticket);
    let bytes = call(request, CALL_TIMEOUT).await?;
    serde_json::from_slice(&bytes).map_err(|e| PodError::Invalid(e.to_string()))
}

/// Asks the pod to close the tube.
pub async fn close(http: &reqwest::Client, endpoint: &str, ticket: &str, uid: &str) -> Result<(), PodError> {
    let request = http.delete(tube_url(endpoint, uid)).header(TUBE_TICKET_HEADER, ticket);
    call(request, CALL_TIMEOUT).await.map(|_| ())
}

async fn call(request: reqwest::RequestBuilder, timeout: Duration) -> Result<Vec<u8>, PodError> {
    let mut response = request.timeout(timeout).send().await.map_err(|e| PodError::Unreachable(without_url(&e)))?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(Duration::from_secs(1), Duration::from_secs);
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| PodError::Unreachable(without_url(&e)))? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(PodError::Invalid(format!("the answer is over {MAX_ANSWER_BYTES} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    if status.is_success() {
        return Ok(body);
    }
    let message = serde_json::from_slice::<ErrorBody>(&body).map(|b| b.error).unwrap_or_else(|_| status.to_string());
    Err(match status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => PodError::Busy { retry_after, message },
        StatusCode::BAD_REQUEST => PodError::BadOffer(message),
        StatusCode::NOT_FOUND => PodError::Unknown,
        StatusCode::UNPROCESSABLE_ENTITY | StatusCode::CONFLICT | StatusCode::FORBIDDEN => PodError::Refused(message),
        _ => PodError::Unreachable(format!("{status}: {message}")),
    })
}

/// reqwest's errors name the URL; the pod's address is not for the Tube's readers.
fn without_url(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    kind.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_carry_only_a_uids_characters() {
        assert_eq!(tube_url("http://10.0.0.1:8080/", "ab-12"), "http://10.0.0.1:8080/api/v1/tubes/ab-12");
        assert_eq!(tube_url("http://p", "../x?y"), "http://p/api/v1/tubes/xy");
    }
}
