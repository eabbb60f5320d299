//! The operator's session API: create, read and delete TestSessions.

use std::time::Duration;

use reqwest::{Client, Method, StatusCode, Url};
use serde::{Deserialize, Serialize};
pub use tidepool_protocol::api::{CreateSession, SessionView};
use tidepool_protocol::api::{NamespaceQuery, SESSIONS_PATH};
use tidepool_protocol::stored::{ResultsPage, ResultsQuery, STORED_RESULTS_PATH};
use tidepool_protocol::tube::TUBES_API_PATH;
pub use tidepool_protocol::tube::{CreateTube, TubeView};

use crate::error::{Error, Result, chain, error_message};

/// How long a create may take: the operator answers once the session is
/// Ready or its own deadline passed (10 s by default).
const CREATE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long any other call may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of the operator's API.
#[derive(Clone, Debug)]
pub struct OperatorClient {
    base: Url,
    token: String,
    http: Client,
}

impl OperatorClient {
    pub fn new(base: &str, token: &str) -> Result<Self> {
        let base = Url::parse(base).map_err(|e| Error::usage(format!("--operator {base:?} is not a URL: {e}")))?;
        if !matches!(base.scheme(), "http" | "https") || base.host().is_none() {
            return Err(Error::usage(format!("--operator must be an http or https URL, not {base}")));
        }
        let token = token.trim().to_string();
        if token.is_empty() {
            return Err(Error::usage("the operator's API token is empty"));
        }
        let http = Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(|e| Error::Operator(format!("cannot build an HTTP client: {}", chain(&e))))?;
        Ok(Self { base, token, http })
    }

    /// Creates a session and waits for it to be Ready. Returns the view and
    /// the operator's JSON as it came. When the operator gives up waiting
    /// (504) the session stays, unless `abandon_unready` deletes it.
    pub async fn create(
        &self,
        request: &CreateSession,
        abandon_unready: bool,
    ) -> Result<(SessionView, serde_json::Value)> {
        let (status, bytes) = self.send(Method::POST, self.url(&[]), None, Some(request), CREATE_TIMEOUT).await?;
        if status == StatusCode::GATEWAY_TIMEOUT {
            let mut message = refusal(status, &bytes);
            let pending = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|body| body.pointer("/session/name").and_then(|n| n.as_str()).map(String::from));
            if let Some(name) = pending {
                let namespace = request.namespace.as_deref();
                if !abandon_unready {
                    message.push_str(&format!(" (the session is kept: `tidepool session get {name}` follows it)"));
                } else if self.delete(&name, namespace).await.is_ok() {
                    message.push_str(&format!(" (session {name} deleted)"));
                }
            }
            return Err(Error::Operator(message));
        }
        let body = json(status, &bytes)?;
        Ok((parse_view(&body)?, body))
    }

    /// Reads a session.
    pub async fn get(&self, name: &str, namespace: Option<&str>) -> Result<(SessionView, serde_json::Value)> {
        let (status, bytes) = self.send::<()>(Method::GET, self.url(&[name]), namespace, None, REQUEST_TIMEOUT).await?;
        let body = json(status, &bytes)?;
        Ok((parse_view(&body)?, body))
    }

    /// Deletes a session.
    pub async fn delete(&self, name: &str, namespace: Option<&str>) -> Result<()> {
        let (status, bytes) =
            self.send::<()>(Method::DELETE, self.url(&[name]), namespace, None, REQUEST_TIMEOUT).await?;
        if !status.is_success() {
            return Err(Error::Operator(refusal(status, &bytes)));
        }
        Ok(())
    }

    /// Creates a Tube with the client's offer and waits for the pod's answer.
    pub async fn create_tube(&self, request: &CreateTube) -> Result<TubeView> {
        let (status, bytes) = self.send(Method::POST, self.tube_url(&[]), None, Some(request), CREATE_TIMEOUT).await?;
        let body = json(status, &bytes)?;
        TubeView::deserialize(&body).map_err(|e| Error::Protocol(format!("the operator's tube is unreadable: {e}")))
    }

    /// Reads a Tube.
    pub async fn get_tube(&self, name: &str, namespace: Option<&str>) -> Result<TubeView> {
        let (status, bytes) =
            self.send::<()>(Method::GET, self.tube_url(&[name]), namespace, None, REQUEST_TIMEOUT).await?;
        let body = json(status, &bytes)?;
        TubeView::deserialize(&body).map_err(|e| Error::Protocol(format!("the operator's tube is unreadable: {e}")))
    }

    /// Deletes a Tube (the operator closes it on its pod first).
    pub async fn delete_tube(&self, name: &str, namespace: Option<&str>) -> Result<()> {
        let (status, bytes) =
            self.send::<()>(Method::DELETE, self.tube_url(&[name]), namespace, None, REQUEST_TIMEOUT).await?;
        if !status.is_success() && status != StatusCode::NOT_FOUND {
            return Err(Error::Operator(refusal(status, &bytes)));
        }
        Ok(())
    }

    /// Stored results of ended sessions, as the query filters them.
    pub async fn stored_results(&self, query: &ResultsQuery) -> Result<ResultsPage> {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(STORED_RESULTS_PATH.split('/').filter(|s| !s.is_empty()));
        }
        url.query_pairs_mut().extend_pairs(query_pairs(query));
        let (status, bytes) = self.send::<()>(Method::GET, url, None, None, REQUEST_TIMEOUT).await?;
        let body = json(status, &bytes)?;
        ResultsPage::deserialize(&body)
            .map_err(|e| Error::Protocol(format!("the operator's stored results are unreadable: {e}")))
    }

    /// Sends a request; an answer of any status is `Ok`.
    async fn send<B: Serialize>(
        &self,
        method: Method,
        url: Url,
        namespace: Option<&str>,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<(StatusCode, bytes::Bytes)> {
        let mut request = self.http.request(method, url).bearer_auth(&self.token).timeout(timeout);
        if let Some(namespace) = namespace {
            request = request.query(&NamespaceQuery { namespace: Some(namespace.to_owned()) });
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let unreachable = |e: reqwest::Error| {
            if e.is_timeout() {
                Error::Operator(format!("the operator at {} did not answer within {timeout:?}", self.base))
            } else {
                Error::Operator(format!("cannot reach the operator at {}: {}", self.base, chain(&e)))
            }
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        Ok((status, response.bytes().await.map_err(unreachable)?))
    }

    fn tube_url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(TUBES_API_PATH.split('/').filter(|s| !s.is_empty())).extend(segments);
        }
        url
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(SESSIONS_PATH.split('/').filter(|s| !s.is_empty())).extend(segments);
        }
        url
    }
}

/// The query's fields that are set, as URL pairs.
fn query_pairs(query: &ResultsQuery) -> Vec<(&'static str, String)> {
    let texts = [
        ("namespace", query.namespace.clone()),
        ("pool", query.pool.clone()),
        ("since", query.since.clone()),
        ("until", query.until.clone()),
        ("grade", query.grade.clone()),
        ("client", query.client.clone()),
        ("limit", query.limit.map(|n| n.to_string())),
    ];
    texts.into_iter().filter_map(|(name, value)| Some((name, value?))).collect()
}

/// A successful answer's JSON, or the operator's error.
fn json(status: StatusCode, bytes: &[u8]) -> Result<serde_json::Value> {
    if !status.is_success() {
        return Err(Error::Operator(refusal(status, bytes)));
    }
    serde_json::from_slice(bytes).map_err(|e| Error::Protocol(format!("the operator's answer is not JSON: {e}")))
}

fn parse_view(body: &serde_json::Value) -> Result<SessionView> {
    SessionView::deserialize(body).map_err(|e| Error::Protocol(format!("the operator's session is unreadable: {e}")))
}

/// The message for an operator's error answer.
fn refusal(status: StatusCode, body: &[u8]) -> String {
    let message = error_message(body);
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => format!("the operator refused the API token: {message}"),
        StatusCode::GATEWAY_TIMEOUT => format!("no session in time: {message}"),
        _ => format!("the operator answered {status}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_urls_escape_names_and_keep_a_prefix() {
        let operator = OperatorClient::new("https://tidepool.example/", "t").unwrap();
        assert_eq!(operator.url(&[]).as_str(), "https://tidepool.example/api/v1/sessions");
        assert_eq!(operator.url(&["a/b"]).as_str(), "https://tidepool.example/api/v1/sessions/a%2Fb");
        let prefixed = OperatorClient::new("http://gw/tidepool", "t").unwrap();
        assert_eq!(prefixed.url(&["s"]).as_str(), "http://gw/tidepool/api/v1/sessions/s");
        assert_eq!(prefixed.tube_url(&["t"]).as_str(), "http://gw/tidepool/api/v1/tubes/t");
        assert!(matches!(OperatorClient::new("http://gw", " \n"), Err(Error::Usage(_))));
        assert!(matches!(OperatorClient::new("gw:80", "t"), Err(Error::Usage(_))));
    }

    #[test]
    fn a_results_query_sends_only_what_is_set() {
        let query =
            ResultsQuery { pool: Some("edge".into()), grade: Some("D,F".into()), limit: Some(5), ..Default::default() };
        assert_eq!(query_pairs(&query), [("pool", "edge".to_string()), ("grade", "D,F".into()), ("limit", "5".into())]);
        assert!(query_pairs(&ResultsQuery::default()).is_empty());
    }

    #[test]
    fn views_parse_the_api() {
        let body = serde_json::json!({
            "name": "session-abc", "namespace": "default", "pool": "edge", "phase": "Ready",
            "pod": "edge-1", "endpoint": "http://10.0.0.1:8080", "token": "t", "binding": "b"
        });
        assert!(parse_view(&body).unwrap().usable());
        let garbled = serde_json::json!({"name": "s", "namespace": "default", "pool": "edge", "phase": "Bound"});
        assert!(matches!(parse_view(&garbled), Err(Error::Protocol(_))));
    }

    #[test]
    fn refusals_say_what_went_wrong() {
        let body = br#"{"error":"session session-x was not ready within 10s: no warm pod free","code":504}"#;
        assert_eq!(
            refusal(StatusCode::GATEWAY_TIMEOUT, body),
            "no session in time: session session-x was not ready within 10s: no warm pod free"
        );
        assert_eq!(
            refusal(StatusCode::FORBIDDEN, br#"{"error":"wrong bearer token"}"#),
            "the operator refused the API token: wrong bearer token"
        );
        assert_eq!(
            refusal(StatusCode::NOT_FOUND, b"{\"error\":\"no WarmPool default/x\"}"),
            "the operator answered 404 Not Found: no WarmPool default/x"
        );
    }
}
