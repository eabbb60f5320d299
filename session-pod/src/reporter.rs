//! Posting graded results to the operator, with the session's own
//! credentials: a few bounded tries, then a reason.

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::AUTHORIZATION;
use tidepool_protocol::results::{OPERATOR_RESULTS_PATH, ResultsSubmission};
use tidepool_protocol::{BINDING_HEADER, ErrorBody};
use tidepool_wire::error_chain;

use crate::session::BoundSession;

/// Posts to the operator: this many tries, each bounded, with a doubling pause.
const REPORT_ATTEMPTS: u32 = 3;
const REPORT_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);
const REPORT_FIRST_PAUSE: Duration = Duration::from_millis(200);

/// Why results did not reach the operator.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("no operator URL is configured (--operator-url or TIDEPOOL_OPERATOR_URL)")]
    NotConfigured,
    #[error("cannot make the operator's results URL from {base}: {reason}")]
    BadUrl { base: String, reason: String },
    #[error("the operator did not answer after {attempts} attempts: {last}")]
    Unreachable { attempts: u32, last: String },
    #[error("the operator refused the results ({status}): {message}")]
    Refused { status: u16, message: String },
}

/// Posts graded results to the operator.
pub struct OperatorReporter {
    client: reqwest::Client,
    base: Option<reqwest::Url>,
}

impl OperatorReporter {
    /// A reporter to the operator at `base` (`http://host:port`), or one that
    /// says it has nowhere to report when `None`.
    pub fn new(base: Option<reqwest::Url>) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(1))
            .timeout(REPORT_ATTEMPT_TIMEOUT)
            .build()?;
        Ok(Self { client, base })
    }

    /// The operator's URL for `session`'s results.
    fn url(&self, session: &BoundSession) -> Result<reqwest::Url, ReportError> {
        let base = self.base.as_ref().ok_or(ReportError::NotConfigured)?;
        let bad = |reason: String| ReportError::BadUrl { base: base.to_string(), reason };
        if base.cannot_be_a_base() {
            return Err(bad("not an http(s) URL".into()));
        }
        let mut url = base.clone();
        let template = OPERATOR_RESULTS_PATH.trim_start_matches('/');
        {
            let mut segments = url.path_segments_mut().map_err(|()| bad("not an http(s) URL".into()))?;
            // Each segment is percent-encoded, so no session name can leave the path.
            segments.pop_if_empty();
            for segment in template.split('/') {
                segments.push(if segment == "{name}" { &session.claims.name } else { segment });
            }
        }
        url.query_pairs_mut().append_pair("namespace", &session.claims.ns);
        Ok(url)
    }

    /// Posts `submission` with the session's token and ticket: a few tries
    /// on network errors and 5xx answers, a few seconds in all.
    pub async fn report(&self, session: &BoundSession, submission: &ResultsSubmission) -> Result<(), ReportError> {
        let url = self.url(session)?;
        let body = Bytes::from(serde_json::to_vec(submission).unwrap_or_default());
        let mut pause = REPORT_FIRST_PAUSE;
        let mut last = String::new();
        for attempt in 1..=REPORT_ATTEMPTS {
            let sent = self
                .client
                .post(url.clone())
                .header(AUTHORIZATION, format!("Bearer {}", session.token))
                .header(BINDING_HEADER, &session.ticket)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    let message = serde_json::from_str::<ErrorBody>(&text).map_or_else(|_| short(&text), |b| b.error);
                    if !status.is_server_error() && status != reqwest::StatusCode::TOO_MANY_REQUESTS {
                        return Err(ReportError::Refused { status: status.as_u16(), message });
                    }
                    last = format!("{status}: {message}");
                }
                Err(e) => last = error_chain(&e),
            }
            if attempt < REPORT_ATTEMPTS {
                tokio::time::sleep(pause).await;
                pause *= 2;
            }
        }
        Err(ReportError::Unreachable { attempts: REPORT_ATTEMPTS, last })
    }
}

fn short(text: &str) -> String {
    text.chars().take(512).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_wire::token::SessionClaims;

    #[test]
    fn the_operator_url_carries_the_session_name_and_namespace() {
        let session = BoundSession {
            claims: SessionClaims {
                sid: "s".into(),
                ns: "team a".into(),
                name: "alice".into(),
                pool: "p".into(),
                profile: "latency".into(),
                exp: 0,
                probes: None,
                tier: 1,
                thresholds: None,
                kid: String::new(),
            },
            token: String::new(),
            ticket: String::new(),
        };
        let reporter = OperatorReporter::new(Some("http://10.0.0.1:8080/".parse().unwrap())).unwrap();
        assert_eq!(
            reporter.url(&session).unwrap().as_str(),
            "http://10.0.0.1:8080/api/v1/sessions/alice/results?namespace=team+a"
        );
        let none = OperatorReporter::new(None).unwrap();
        assert!(matches!(none.url(&session), Err(ReportError::NotConfigured)));
    }
}
