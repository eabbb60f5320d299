//! Talking to a session pod: its credentials on every request, its JSON
//! routes, its WebSockets, and the raw download and upload streams.

use std::net::SocketAddr;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Client, Response, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tidepool_crds::test_session::{ProbeTarget, SessionResults};
use tidepool_protocol::BINDING_HEADER;
use tidepool_protocol::pod::{
    DOWNLOAD_PATH, INFO_PATH, PROBES_PATH, PodInfo, ProbeRequest, ProbeResponse, RESULTS_PATH, UDP_GRANT_PATH,
    UPLOAD_PATH, UdpGrant, UploadReport,
};
use tidepool_protocol::results::{ResultsAccepted, ResultsSubmission};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite};

use crate::error::{Error, Result, chain, error_message};

/// A WebSocket to the pod.
pub type WebSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a TCP connect to the pod may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a JSON request may take, answer included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the pod may take to run the session's probes.
const PROBES_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a WebSocket handshake may take.
const WEBSOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How long reading an error's body may take.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a first connection is retried: a pod reported Ready may not be
/// listening yet (its readiness probe settling, a healed pod starting).
const FIRST_CONNECT_PATIENCE: Duration = Duration::from_secs(5);

/// What a session's client shows every pod route: the session token and the
/// binding ticket for this pod.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub token: String,
    pub binding: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// A client of one session pod.
#[derive(Clone, Debug)]
pub struct PodClient {
    base: Url,
    credentials: Credentials,
    http: Client,
}

impl PodClient {
    /// A client of the pod at `endpoint` (`http://host:port`).
    pub fn new(endpoint: &str, credentials: Credentials) -> Result<Self> {
        let base =
            Url::parse(endpoint).map_err(|e| Error::usage(format!("the endpoint {endpoint:?} is not a URL: {e}")))?;
        if base.scheme() != "http" || base.host().is_none() {
            return Err(Error::usage(format!("the endpoint must be an http://host:port URL, not {endpoint:?}")));
        }
        let mut headers = HeaderMap::new();
        for (name, value) in credential_headers(&credentials)? {
            headers.insert(name, value);
        }
        let http = Client::builder()
            .default_headers(headers)
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // A proxy between the client and the pod would be measured too.
            .no_proxy()
            .build()
            .map_err(|e| Error::test(format!("cannot build an HTTP client: {}", chain(&e))))?;
        Ok(Self { base, credentials, http })
    }

    /// The same session on another pod: the same token, that pod's binding.
    pub fn rebound(&self, endpoint: &str, binding: &str) -> Result<Self> {
        let credentials = Credentials { token: self.credentials.token.clone(), binding: binding.to_string() };
        Self::new(endpoint, credentials)
    }

    pub fn endpoint(&self) -> &Url {
        &self.base
    }

    /// Who serves the session. Also checks the credentials.
    pub async fn info(&self) -> Result<PodInfo> {
        let request = self.http.get(self.url(INFO_PATH)).timeout(REQUEST_TIMEOUT);
        self.json(INFO_PATH, request).await
    }

    /// [`PodClient::info`], retried for a few seconds while the pod cannot
    /// be reached: the first call to a new pod.
    pub async fn first_info(&self) -> Result<PodInfo> {
        retry_unreachable(|| self.info()).await
    }

    /// Sends the results; the pod grades them and forwards them to the operator.
    pub async fn submit(&self, results: &SessionResults, is_final: bool) -> Result<ResultsAccepted> {
        let submission = ResultsSubmission { results: results.clone(), is_final };
        self.post(RESULTS_PATH, &submission, REQUEST_TIMEOUT).await
    }

    /// Has the pod run the session's probes once.
    pub async fn probes(&self, targets: &[ProbeTarget]) -> Result<ProbeResponse> {
        let request = ProbeRequest { targets: targets.to_vec(), tier: None };
        match self.post(PROBES_PATH, &request, PROBES_TIMEOUT).await {
            // The credentials passed (the run checked them first): a 403
            // here refuses the targets, which must be the session's own.
            Err(Error::Refused(message)) => Err(Error::Pod { status: 403, message }),
            outcome => outcome,
        }
    }

    /// Permission to use the pod's UDP echo.
    pub async fn udp_grant(&self) -> Result<UdpGrant> {
        let request = self.http.post(self.url(UDP_GRANT_PATH)).timeout(REQUEST_TIMEOUT);
        self.json(UDP_GRANT_PATH, request).await
    }

    /// The pod's UDP echo address: its host at `port`.
    pub async fn udp_address(&self, port: u16) -> Result<SocketAddr> {
        let host = self.base.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
        let mut addresses = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Error::test(format!("cannot resolve {host}: {e}")))?;
        addresses.next().ok_or_else(|| Error::test(format!("{host} has no address")))
    }

    /// Opens a WebSocket at `path`, with the credentials in its headers and
    /// Nagle's algorithm off (pings must not wait for each other).
    pub async fn websocket(&self, path: &str) -> Result<WebSocket> {
        let mut url = self.url(path);
        // An http URL always has a host, so its scheme can become ws.
        let _ = url.set_scheme("ws");
        let mut request = url.as_str().into_client_request().map_err(|e| Error::usage(format!("{url}: {e}")))?;
        for (name, value) in credential_headers(&self.credentials)? {
            request.headers_mut().insert(name, value);
        }
        let connect = tokio_tungstenite::connect_async_with_config(request, None, true);
        match tokio::time::timeout(WEBSOCKET_TIMEOUT, connect).await {
            Ok(Ok((socket, _))) => Ok(socket),
            Ok(Err(tungstenite::Error::Http(response))) => {
                Err(refusal(response.status().as_u16(), response.body().as_deref().unwrap_or_default()))
            }
            Ok(Err(e)) => Err(Error::test(format!("cannot open the WebSocket {url}: {}", chain(&e)))),
            Err(_) => Err(Error::test(format!("the WebSocket {url} did not open within {WEBSOCKET_TIMEOUT:?}"))),
        }
    }

    /// Starts a download of `seconds`; the caller reads and ends it.
    pub(crate) async fn download(&self, seconds: u64) -> Result<Response> {
        let url = self.url(DOWNLOAD_PATH);
        let response = self.http.get(url).query(&[("seconds", seconds)]).send().await;
        checked(self.sent(DOWNLOAD_PATH, response)?).await
    }

    /// Uploads `body` for at most `seconds`; the pod answers what it saw.
    pub(crate) async fn upload(&self, seconds: u64, body: reqwest::Body) -> Result<UploadReport> {
        let request = self
            .http
            .post(self.url(UPLOAD_PATH))
            .query(&[("seconds", seconds)])
            .header(CONTENT_TYPE, "application/octet-stream")
            .body(body);
        self.json(UPLOAD_PATH, request).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B, timeout: Duration) -> Result<T> {
        self.json(path, self.http.post(self.url(path)).json(body).timeout(timeout)).await
    }

    async fn json<T: DeserializeOwned>(&self, path: &str, request: reqwest::RequestBuilder) -> Result<T> {
        let response = checked(self.sent(path, request.send().await)?).await?;
        let body = response.bytes().await.map_err(|e| self.broken(path, &e))?;
        serde_json::from_slice(&body)
            .map_err(|e| Error::Protocol(format!("the pod's answer to {path} does not follow the protocol: {e}")))
    }

    fn sent(&self, path: &str, response: reqwest::Result<Response>) -> Result<Response> {
        response.map_err(|e| self.broken(path, &e))
    }

    fn broken(&self, path: &str, error: &reqwest::Error) -> Error {
        if error.is_timeout() {
            return Error::test(format!("the pod at {} did not answer {path} in time", self.base));
        }
        Error::test(format!("cannot reach the pod at {} ({path}): {}", self.base, chain(error)))
    }

    /// The endpoint's URL with `path` after its own path.
    fn url(&self, path: &str) -> Url {
        let mut url = self.base.clone();
        let joined = format!("{}{path}", self.base.path().trim_end_matches('/'));
        url.set_path(&joined);
        url.set_query(None);
        url
    }
}

/// Runs `call` until it gives anything but [`Error::Test`] (the pod could
/// not be reached), or for [`FIRST_CONNECT_PATIENCE`].
pub(crate) async fn retry_unreachable<T, F: Future<Output = Result<T>>>(mut call: impl FnMut() -> F) -> Result<T> {
    let deadline = tokio::time::Instant::now() + FIRST_CONNECT_PATIENCE;
    let mut pause = Duration::from_millis(50);
    loop {
        match call().await {
            Err(Error::Test(message)) if tokio::time::Instant::now() + pause < deadline => {
                tracing::debug!("retrying: {message}");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            outcome => return outcome,
        }
    }
}

fn credential_headers(credentials: &Credentials) -> Result<[(HeaderName, HeaderValue); 2]> {
    let invalid = |what: &str| Error::usage(format!("the {what} has characters a header cannot carry"));
    let mut token =
        HeaderValue::from_str(&format!("Bearer {}", credentials.token.trim())).map_err(|_| invalid("session token"))?;
    token.set_sensitive(true);
    let mut binding = HeaderValue::from_str(credentials.binding.trim()).map_err(|_| invalid("binding ticket"))?;
    binding.set_sensitive(true);
    Ok([(AUTHORIZATION, token), (HeaderName::from_static(BINDING_HEADER), binding)])
}

/// The response when its status is a success; its error otherwise.
async fn checked(response: Response) -> Result<Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let body = tokio::time::timeout(ERROR_BODY_TIMEOUT, response.bytes()).await.ok().and_then(|b| b.ok());
    Err(refusal(status.as_u16(), body.as_deref().unwrap_or_default()))
}

/// The error for a pod's refusal: 401 and 403 refuse the credentials.
fn refusal(status: u16, body: &[u8]) -> Error {
    let message = error_message(body);
    match status {
        401 | 403 => Error::Refused(message),
        _ => Error::Pod { status, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials() -> Credentials {
        Credentials { token: "t.s".into(), binding: "b".into() }
    }

    #[test]
    fn endpoints_must_be_http_urls() {
        assert!(PodClient::new("http://127.0.0.1:8080", credentials()).is_ok());
        for bad in ["127.0.0.1:8080", "ftp://x", "https://x", "http://"] {
            assert!(matches!(PodClient::new(bad, credentials()), Err(Error::Usage(_))), "{bad}");
        }
        let newline = Credentials { token: "a\nb".into(), binding: "b".into() };
        assert!(matches!(PodClient::new("http://x", newline), Err(Error::Usage(_))));
    }

    #[test]
    fn paths_follow_the_endpoints_own() {
        let pod = PodClient::new("http://10.0.0.1:8080", credentials()).unwrap();
        assert_eq!(pod.url(INFO_PATH).as_str(), "http://10.0.0.1:8080/api/v1/info");
        let prefixed = PodClient::new("http://edge.example/pods/p1/", credentials()).unwrap();
        assert_eq!(prefixed.url("/ws").as_str(), "http://edge.example/pods/p1/ws");
        let moved = pod.rebound("http://10.0.0.2:8080", "b2").unwrap();
        assert_eq!(moved.credentials, Credentials { token: "t.s".into(), binding: "b2".into() });
    }

    #[test]
    fn refusals_name_the_credentials() {
        let error = refusal(403, br#"{"error":"the binding ticket is for another pod"}"#);
        assert_eq!(error.to_string(), "the pod refused the credentials: the binding ticket is for another pod");
        assert_eq!(error.exit_code(), 3);
        assert_eq!(refusal(429, b"busy").to_string(), "the pod answered 429: busy");
        assert!(!format!("{:?}", credentials()).contains("t.s"));
    }
}
