//! The operator's API, as the gateway calls it: relaying a caller's own
//! request, and asking with the gateway's identity for what only the
//! operator signs (an anonymous client's session, a pod's binding ticket).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tidepool_protocol::api::SessionView;

/// The most of an operator answer the gateway reads.
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// A create waits for its session to turn Ready (the operator's
/// `--ready-deadline-seconds`, 10 s by default) before answering.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Tickets kept; the cache is emptied when it grows past this.
const MAX_TICKETS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error("the operator did not answer: {0}")]
    Unreachable(String),
    #[error("the operator did not answer within {0:?}")]
    TimedOut(Duration),
    #[error("the gateway's token cannot be read: {0}")]
    Token(std::io::Error),
    #[error("the operator answered {0}")]
    Refused(StatusCode),
    #[error("the operator's answer is not a session: {0}")]
    NotASession(String),
}

/// What lets the gateway reach a session's pod: the binding ticket and,
/// when the gateway may relay (the chart's RBAC), the relay ticket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tickets {
    pub binding: String,
    pub relay: Option<String>,
}

/// An answer from the operator, to pass on.
pub struct Answer {
    pub status: StatusCode,
    pub retry_after: Option<HeaderValue>,
    pub body: Bytes,
}

pub struct OperatorApi {
    base: String,
    token_file: PathBuf,
    http: Client<HttpConnector, Full<Bytes>>,
    /// Binding tickets by (session UID, pod): one operator call per pod a
    /// session is bound to, not one per stream.
    tickets: Mutex<HashMap<(String, String), Tickets>>,
}

impl OperatorApi {
    pub fn new(base: String, token_file: PathBuf) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        connector.set_nodelay(true);
        let http = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        Self { base, token_file, http, tickets: Mutex::new(HashMap::new()) }
    }

    /// Sends a request as the gateway itself.
    pub async fn as_gateway(&self, method: Method, path: &str, body: Bytes) -> Result<Answer, OperatorError> {
        let token = tokio::fs::read_to_string(&self.token_file).await.map_err(OperatorError::Token)?;
        let authorization = HeaderValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|e| OperatorError::Token(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))?;
        self.relay(method, path, authorization, body).await
    }

    /// The tickets for session `name` (UID `uid`) at `pod`.
    pub async fn tickets(&self, namespace: &str, name: &str, uid: &str, pod: &str) -> Result<Tickets, OperatorError> {
        let key = (uid.to_string(), pod.to_string());
        if let Some(ticket) = self.tickets.lock().ok().and_then(|t| t.get(&key).cloned()) {
            return Ok(ticket);
        }
        let path = format!("/api/v1/sessions/{name}?namespace={namespace}");
        let answer = self.as_gateway(Method::GET, &path, Bytes::new()).await?;
        if answer.status != StatusCode::OK {
            return Err(OperatorError::Refused(answer.status));
        }
        let view: SessionView =
            serde_json::from_slice(&answer.body).map_err(|e| OperatorError::NotASession(e.to_string()))?;
        // The operator's view may already be of a newer pod: use it only for the one asked.
        let ticket = match (view.pod.as_deref(), view.binding) {
            (Some(bound), Some(binding)) if bound == pod => Tickets { binding, relay: view.relay },
            _ => return Err(OperatorError::Refused(StatusCode::CONFLICT)),
        };
        if let Ok(mut tickets) = self.tickets.lock() {
            if tickets.len() >= MAX_TICKETS {
                tickets.clear();
            }
            tickets.insert(key, ticket.clone());
        }
        Ok(ticket)
    }

    /// A GET relayed with the caller's `authorization` whose answer is a
    /// stream (the cluster view's events): the head within the call
    /// timeout, the body passed on as it comes.
    pub async fn stream(
        &self,
        path: &str,
        authorization: HeaderValue,
    ) -> Result<axum::http::Response<hyper::body::Incoming>, OperatorError> {
        let mut request = Request::builder()
            .method(Method::GET)
            .uri(format!("{}{path}", self.base))
            .body(Full::new(Bytes::new()))
            .map_err(|e| OperatorError::Unreachable(e.to_string()))?;
        request.headers_mut().insert(header::AUTHORIZATION, authorization);
        tokio::time::timeout(CALL_TIMEOUT, self.http.request(request))
            .await
            .map_err(|_| OperatorError::TimedOut(CALL_TIMEOUT))?
            .map_err(|e| OperatorError::Unreachable(e.to_string()))
    }

    /// Sends a request with `authorization` as given (a caller's own, or the gateway's).
    pub async fn relay(
        &self,
        method: Method,
        path: &str,
        authorization: HeaderValue,
        body: Bytes,
    ) -> Result<Answer, OperatorError> {
        let uri = format!("{}{path}", self.base);
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, authorization);
        if !body.is_empty() {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        let mut request = Request::builder()
            .method(method)
            .uri(&uri)
            .body(Full::new(body))
            .map_err(|e| OperatorError::Unreachable(e.to_string()))?;
        *request.headers_mut() = headers;
        let call = async {
            let response = self.http.request(request).await.map_err(|e| OperatorError::Unreachable(e.to_string()))?;
            let status = response.status();
            let retry_after = response.headers().get(header::RETRY_AFTER).cloned();
            let body = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|e| OperatorError::Unreachable(e.to_string()))?
                .to_bytes();
            Ok(Answer { status, retry_after, body })
        };
        tokio::time::timeout(CALL_TIMEOUT, call).await.map_err(|_| OperatorError::TimedOut(CALL_TIMEOUT))?
    }
}
