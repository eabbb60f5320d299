//! A real server on 127.0.0.1, and credentials signed for it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use reqwest::StatusCode;
use tidepool_protocol::pod::{ClientMessage, ServerMessage};
use tidepool_protocol::{BINDING_HEADER, ErrorBody};
use tidepool_session::server::{Server, ServerConfig};
use tidepool_session::state::PodIdentity;
use tidepool_wire::token::{PoolSigningKey, SessionClaims};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const POD: &str = "edge-7f9c2";
pub const POOL: &str = "edge";
pub const REGION: &str = "eu-test-1";
pub const SID: &str = "sid-alice";

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Every wait in these tests is bounded by this.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub struct Pod {
    pub server: Server,
    pub key: PoolSigningKey,
    pub http: reqwest::Client,
}

pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

pub fn claims(sid: &str, exp: u64) -> SessionClaims {
    SessionClaims {
        sid: sid.into(),
        ns: "default".into(),
        name: "alice".into(),
        pool: POOL.into(),
        profile: "household".into(),
        exp,
        probes: None,
        tier: 1,
        thresholds: None,
        kid: String::new(),
    }
}

/// The pool rule that lets a session's probes reach loopback, where these
/// tests' targets listen, as the operator would write `TIDEPOOL_EGRESS_ALLOW`.
pub const ALLOW_LOOPBACK: &str = r#"[{"cidr":"127.0.0.0/8"}]"#;

pub fn allow_loopback(config: &mut ServerConfig) {
    config.egress = tidepool_protocol::egress::EgressPolicy::parse(ALLOW_LOOPBACK, "").unwrap();
}

/// The value of the metric line that starts with `series` (0 when absent).
pub async fn metric(pod: &Pod, series: &str) -> f64 {
    let text = pod.http.get(pod.url("/metrics")).send().await.unwrap().text().await.unwrap();
    metric_in(&text, series)
}

pub fn metric_in(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

/// Starts a pod with the defaults, changed by `configure`.
pub async fn start_with(configure: impl FnOnce(&mut ServerConfig)) -> Pod {
    let key = PoolSigningKey::generate().unwrap();
    let identity =
        PodIdentity { pod: POD.into(), namespace: "default".into(), pool: POOL.into(), region: REGION.into() };
    let mut config = ServerConfig::new(identity, key.public());
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.udp_port = Some(0);
    configure(&mut config);
    let server = Server::start(config).await.unwrap();
    let http = reqwest::Client::builder().no_proxy().timeout(PATIENCE).build().unwrap();
    Pod { server, key, http }
}

pub async fn start() -> Pod {
    start_with(|_| {}).await
}

impl Pod {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.http_addr())
    }

    /// A valid token and ticket for session `sid` on this pod.
    pub fn credentials(&self, sid: &str) -> (String, String) {
        (self.key.sign_session(&claims(sid, unix_now() + 3600)), self.key.sign_binding(sid, POD))
    }

    /// A request with the credentials of [`SID`] in headers.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let (token, ticket) = self.credentials(SID);
        self.http.request(method, self.url(path)).bearer_auth(token).header(BINDING_HEADER, ticket)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::GET, path)
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.request(reqwest::Method::POST, path)
    }

    /// `path` with the credentials of [`SID`] in the query string.
    pub fn query_credentials(&self, path: &str) -> String {
        let (token, ticket) = self.credentials(SID);
        let join = if path.contains('?') { '&' } else { '?' };
        format!("{path}{join}token={token}&binding={ticket}")
    }

    /// Opens a WebSocket at `path`, credentials in the query.
    pub async fn websocket(&self, path: &str) -> Socket {
        self.try_websocket(path).await.unwrap()
    }

    pub async fn try_websocket(&self, path: &str) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
        let url = format!("ws://{}{}", self.server.http_addr(), self.query_credentials(path));
        let (socket, _) = tokio::time::timeout(PATIENCE, tokio_tungstenite::connect_async(url)).await.unwrap()?;
        Ok(socket)
    }
}

/// A 200's JSON body.
pub async fn json<T: serde::de::DeserializeOwned>(response: reqwest::Response) -> T {
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("unexpected body ({e}): {body}"))
}

/// The status and `error` of a refusal.
pub async fn refusal(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body = response.text().await.unwrap();
    let error: ErrorBody = serde_json::from_str(&body).unwrap_or_else(|e| panic!("not an error body ({e}): {body}"));
    (status, error.error)
}

/// The HTTP status a refused WebSocket handshake got.
pub fn handshake_status(error: tokio_tungstenite::tungstenite::Error) -> StatusCode {
    match error {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            StatusCode::from_u16(response.status().as_u16()).unwrap()
        }
        other => panic!("not an HTTP refusal: {other}"),
    }
}

pub async fn send(socket: &mut Socket, message: &ClientMessage) {
    socket.send(Message::Text(serde_json::to_string(message).unwrap().into())).await.unwrap();
}

pub async fn ping(socket: &mut Socket, seq: u64) {
    send(socket, &ClientMessage::Ping { seq, client_time_us: unix_micros() }).await;
}

pub fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as u64
}

/// What the pod sent next: a text frame as a message, binary as its length.
#[derive(Debug)]
pub enum Received {
    Text(ServerMessage),
    Binary(usize),
    Closed,
}

pub async fn receive(socket: &mut Socket) -> Received {
    loop {
        let next = tokio::time::timeout(PATIENCE, socket.next()).await.expect("the pod went quiet");
        return match next {
            Some(Ok(Message::Text(text))) => Received::Text(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Binary(data))) => Received::Binary(data.len()),
            Some(Ok(Message::Close(_))) | None => Received::Closed,
            Some(Ok(_)) => continue,
            Some(Err(e)) => panic!("socket error: {e}"),
        };
    }
}

/// The next text message, skipping binary frames.
pub async fn receive_text(socket: &mut Socket) -> ServerMessage {
    loop {
        match receive(socket).await {
            Received::Text(message) => return message,
            Received::Binary(_) => continue,
            Received::Closed => panic!("the pod closed the socket"),
        }
    }
}

/// JSON bodies without reqwest's `json` feature.
pub trait JsonBody {
    fn json_body(self, value: &serde_json::Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, value: &serde_json::Value) -> Self {
        self.header("content-type", "application/json").body(value.to_string())
    }
}

/// Tests that time traffic or load the loopback take this, one at a time:
/// two on two cores would measure each other.
pub static TIMED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
