//! A session's streams, proxied to the pod bound to it now: plain requests
//! with their bodies streamed both ways as they come (nothing is held to be
//! sent later), and WebSockets as the raw bytes of the upgraded connection.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use kube::ResourceExt;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::reply::{self, Refused};
use crate::state::{Gateway, now_unix};
use crate::target::{self, NoTarget, Target};
use crate::udp_relay::{SharedRoute, UdpRelay, endpoint_ip, share};
use tidepool_protocol::pod::{UDP_GRANT_PATH, UdpGrant};
use tidepool_protocol::relay::RelayKey;
use tidepool_wire::token::relay_key;

/// Where a session's streams are served on the gateway; the rest of the
/// path is the pod's own.
pub const PREFIX: &str = "/s";
/// The pod's answer must start within this (a download's first bytes
/// come at once; an upload is answered after its body).
pub const RESPONSE_HEAD_TIMEOUT: Duration = Duration::from_secs(90);
/// The header that carries the binding ticket to the pod.
const BINDING: HeaderName = HeaderName::from_static("x-tidepool-binding");
const RELAY: HeaderName = HeaderName::from_static("x-tidepool-relay");

/// The client of session pods.
pub type PodClient = Client<HttpConnector, Counted<Body>>;

pub fn pod_client() -> PodClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(Duration::from_secs(3)));
    connector.set_nodelay(true);
    Client::builder(hyper_util::rt::TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(connector)
}

/// Streams open per session on this replica, the sessions whose last
/// stream closed since they were last looked at (for the sightings the
/// gateway writes, `seen.rs`), and the bytes proxied for each session (for
/// the bytes the gateway writes, `traffic.rs`).
#[derive(Default)]
pub struct OpenStreams(Mutex<Streams>);

#[derive(Default)]
struct Streams {
    open: HashMap<String, (usize, SessionRef)>,
    closed: Vec<SessionRef>,
    /// By session UID.
    tallies: HashMap<String, Tally>,
}

/// What this replica has proxied for one session, and how much of it is
/// written on the session.
struct Tally {
    session: SessionRef,
    counted: Arc<AtomicU64>,
    written: u64,
    written_at: Option<Instant>,
    /// Since when it has had nothing to write and no stream open.
    idle_since: Option<Instant>,
}

/// A session's tally is forgotten this long after its last byte was
/// written and its last stream closed (by then the watch cache holds the
/// written figure, which seeds a new tally).
const FORGET_TALLY_AFTER: Duration = Duration::from_secs(600);

/// A session as the streams know it: its UID, namespace and name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRef {
    pub sid: String,
    pub namespace: String,
    pub name: String,
}

impl OpenStreams {
    /// Takes a place for one more stream of `session`, unless it has `cap`
    /// already. `written`: the bytes this replica last wrote on the session
    /// (from the cache), where a new tally starts.
    fn open(self: &Arc<Self>, session: &SessionRef, cap: usize, gauge: IntGauge, written: u64) -> Option<StreamGuard> {
        let mut streams = self.0.lock().ok()?;
        let (count, _) = streams.open.entry(session.sid.clone()).or_insert_with(|| (0, session.clone()));
        if *count >= cap {
            return None;
        }
        *count += 1;
        gauge.inc();
        let tally = streams.tallies.entry(session.sid.clone()).or_insert_with(|| Tally {
            session: session.clone(),
            counted: Arc::new(AtomicU64::new(written)),
            written,
            written_at: None,
            idle_since: None,
        });
        let bytes = tally.counted.clone();
        Some(StreamGuard { streams: self.clone(), sid: session.sid.clone(), gauge, bytes })
    }

    /// Bytes this replica proxied for the sessions named (`namespace/name`)
    /// and has not written yet.
    pub fn unwritten(&self, names: &[String]) -> u64 {
        let Ok(streams) = self.0.lock() else { return 0 };
        let names: Vec<(&str, &str)> = names.iter().filter_map(|n| n.split_once('/')).collect();
        streams
            .tallies
            .values()
            .filter(|t| names.iter().any(|(ns, name)| t.session.namespace == *ns && t.session.name == *name))
            .map(|t| t.counted.load(Ordering::Relaxed).saturating_sub(t.written))
            .fold(0, u64::saturating_add)
    }

    /// The tallies to write now: those with unwritten bytes, written no
    /// sooner than `spacing` after the last write, or at once when the
    /// session has no stream open here. Tallies long settled are forgotten.
    pub fn bytes_due(&self, now: Instant, spacing: Duration) -> Vec<(SessionRef, u64)> {
        let Ok(mut streams) = self.0.lock() else { return Vec::new() };
        let Streams { open, tallies, .. } = &mut *streams;
        let mut due = Vec::new();
        tallies.retain(|sid, tally| {
            let counted = tally.counted.load(Ordering::Relaxed);
            let streaming = open.contains_key(sid);
            if counted == tally.written && !streaming {
                let idle = *tally.idle_since.get_or_insert(now);
                return now.duration_since(idle) < FORGET_TALLY_AFTER;
            }
            tally.idle_since = None;
            if counted != tally.written
                && (!streaming || tally.written_at.is_none_or(|at| now.duration_since(at) >= spacing))
            {
                due.push((tally.session.clone(), counted));
            }
            true
        });
        due
    }

    /// `written` bytes of session `sid` are on the session now.
    pub fn bytes_written(&self, sid: &str, written: u64, now: Instant) {
        if let Ok(mut streams) = self.0.lock()
            && let Some(tally) = streams.tallies.get_mut(sid)
        {
            tally.written = tally.written.max(written);
            tally.written_at = Some(now);
        }
    }

    /// How many streams session `sid` has open here.
    #[cfg(test)]
    fn of(&self, sid: &str) -> usize {
        self.0.lock().map(|s| s.open.get(sid).map_or(0, |(count, _)| *count)).unwrap_or(0)
    }

    /// The sessions with a stream open now, and those whose last stream
    /// closed since the last call.
    pub fn sightings(&self) -> (Vec<SessionRef>, Vec<SessionRef>) {
        let Ok(mut streams) = self.0.lock() else { return (Vec::new(), Vec::new()) };
        let open = streams.open.values().map(|(_, session)| session.clone()).collect();
        (open, std::mem::take(&mut streams.closed))
    }
}

/// One open stream: its place is given back when the stream ends, however.
pub struct StreamGuard {
    streams: Arc<OpenStreams>,
    sid: String,
    gauge: IntGauge,
    /// The session's tally of bytes proxied.
    bytes: Arc<AtomicU64>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.gauge.dec();
        if let Ok(mut streams) = self.streams.0.lock()
            && let Some((count, _)) = streams.open.get_mut(&self.sid)
        {
            *count -= 1;
            if *count == 0
                && let Some((_, session)) = streams.open.remove(&self.sid)
            {
                streams.closed.push(session);
            }
        }
    }
}

/// `ANY /s/...`: the request goes to the session's pod.
pub async fn stream(State(gateway): State<Arc<Gateway>>, request: Request<Body>) -> Response<Body> {
    match forward(&gateway, request).await {
        Ok(response) => {
            gateway.metrics.requests.with_label_values(&["streams", response.status().as_str()]).inc();
            response
        }
        Err(refused) => reply::refuse(&gateway.metrics, "streams", refused),
    }
}

async fn forward(gateway: &Arc<Gateway>, mut request: Request<Body>) -> Result<Response<Body>, Refused> {
    let client = gateway.client_address(&request)?;
    let token = token_of(&request).ok_or_else(|| {
        Refused::new(StatusCode::UNAUTHORIZED, "no_token", "a session token is needed: Authorization: Bearer <token>")
    })?;
    let target = find_target_soon(gateway, &token).await?;
    let session = SessionRef {
        sid: target.claims.sid.clone(),
        namespace: target.claims.ns.clone(),
        name: target.claims.name.clone(),
    };
    within_bytes(gateway, &session)?;
    let written = gateway
        .caches
        .session(&session.namespace, &session.name)
        .and_then(|s| s.annotations().get(&gateway.settings.bytes_key)?.parse().ok())
        .unwrap_or(0);
    let guard = gateway
        .streams
        .open(&session, gateway.settings.streams_per_session, gateway.metrics.open_streams.clone(), written)
        .ok_or_else(|| {
            Refused::new(StatusCode::TOO_MANY_REQUESTS, "streams_per_session", "this session has too many streams open")
                .retry_after(1)
        })?;
    let tickets = gateway
        .operator
        .tickets(&target.claims.ns, &target.claims.name, &target.claims.sid, &target.pod)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, session = %target.claims.name, "no binding ticket");
            Refused::new(StatusCode::SERVICE_UNAVAILABLE, "no_ticket", "the session's pod cannot be reached now")
                .retry_after(1)
        })?;

    let upgrade = wants_upgrade(request.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();
    let uri = pod_uri(&target, &parts.uri)?;
    let relayed_grant = match (&gateway.udp, &tickets.relay) {
        (Some(relay), Some(ticket)) if is_udp_grant(&parts.method, &parts.uri) => Some((relay.clone(), ticket.clone())),
        _ => None,
    };
    let mut headers = forwarded_headers(&parts.headers, upgrade);
    headers.insert(header::AUTHORIZATION, bearer(&token)?);
    headers.insert(BINDING, HeaderValue::try_from(&tickets.binding).map_err(|_| internal())?);
    // With the relay ticket the pod takes X-Forwarded-For as the client's
    // address (for its limits and the UDP cookie); without it, ours.
    if let Some(relay) = &tickets.relay {
        headers.insert(RELAY, HeaderValue::try_from(relay).map_err(|_| internal())?);
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-for"),
        HeaderValue::try_from(client.to_string()).map_err(|_| internal())?,
    );
    let to_pod = gateway.metrics.proxied_bytes.with_label_values(&["to_pod"]);
    let body_ended = Arc::new(AtomicBool::new(false));
    let mut upstream = Request::builder()
        .method(parts.method)
        .uri(uri)
        .body(Counted::new(body, to_pod.clone(), None).tallying(guard.bytes.clone()).telling(body_ended.clone()))
        .map_err(|_| internal())?;
    *upstream.headers_mut() = headers;

    let response = tokio::time::timeout(RESPONSE_HEAD_TIMEOUT, gateway.pods.request(upstream))
        .await
        .map_err(|_| unreachable_pod("pod_timeout"))?
        .map_err(|e| {
            if caused_by_slow_body(&e) {
                // The server cut the client's body for a pause, and counted it.
                return Refused::new(StatusCode::REQUEST_TIMEOUT, "slow_body", "the request body came too slowly")
                    .already_counted();
            }
            tracing::debug!(error = %e, pod = %target.pod, "the pod did not answer");
            unreachable_pod("pod_unreachable")
        })?;
    let to_client = gateway.metrics.proxied_bytes.with_label_values(&["to_client"]);
    if let Some(client_upgrade) = client_upgrade
        && response.status() == StatusCode::SWITCHING_PROTOCOLS
    {
        return Ok(join_upgraded(client_upgrade, response, to_pod, to_client, Some(guard)));
    }
    if let Some((relay, ticket)) = relayed_grant
        && response.status() == StatusCode::OK
    {
        return relay_grant(gateway, &relay, &ticket, &target, response).await;
    }
    let (parts, body) = response.into_parts();
    let mut answer = Response::new(Body::new(Counted::new(body, to_client, Some(guard))));
    *answer.status_mut() = parts.status;
    *answer.headers_mut() = answer_headers(&parts.headers, body_ended.load(Ordering::Relaxed));
    Ok(answer)
}

/// Whether a request asks its pod for a UDP grant.
fn is_udp_grant(method: &axum::http::Method, uri: &Uri) -> bool {
    method == axum::http::Method::POST && uri.path().strip_prefix(PREFIX) == Some(UDP_GRANT_PATH)
}

/// How long a grant waits to write its route on the session.
const SHARE_TIMEOUT: Duration = Duration::from_secs(2);

/// The most of a pod's grant answer read.
const MAX_GRANT_BYTES: usize = 4096;

/// The pod's UDP grant as the client gets it through the gateway: the
/// gateway's UDP port in place of the pod's. The cookie's route is learned,
/// so the relay passes the client's probes to that pod.
async fn relay_grant(
    gateway: &Gateway,
    relay: &UdpRelay,
    ticket: &str,
    target: &Target,
    response: Response<hyper::body::Incoming>,
) -> Result<Response<Body>, Refused> {
    use http_body_util::{BodyExt, Limited};
    let body = Limited::new(response.into_body(), MAX_GRANT_BYTES).collect();
    let body = tokio::time::timeout(RESPONSE_HEAD_TIMEOUT, body)
        .await
        .map_err(|_| unreachable_pod("pod_timeout"))?
        .map_err(|_| unreachable_pod("pod_unreachable"))?
        .to_bytes();
    let grant: UdpGrant = serde_json::from_slice(&body).map_err(|_| unreachable_pod("pod_unreachable"))?;
    let pod_ip = endpoint_ip(&target.endpoint).ok_or_else(internal)?;
    let key = relay_key(ticket).ok_or_else(internal)?;
    let pod = std::net::SocketAddr::new(pod_ip, grant.port);
    relay.routes().learn(grant.cookie, pod, Arc::new(RelayKey::new(&key)), target.claims.exp, now_unix());
    // Written before the answer, so the other replicas may know the route
    // by the client's first datagram; without it this replica still relays.
    let shared = SharedRoute { cookie: grant.cookie, pod: target.pod.clone(), port: grant.port };
    let written =
        tokio::time::timeout(SHARE_TIMEOUT, share(&gateway.kube, &target.claims.ns, &target.claims.name, &shared));
    match written.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, session = %target.claims.name, "cannot share a UDP route"),
        Err(_) => tracing::warn!(session = %target.claims.name, "sharing a UDP route timed out"),
    }
    let answer = UdpGrant { port: relay.advertised_port, cookie: grant.cookie };
    let body = serde_json::to_vec(&answer).map_err(|_| internal())?;
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .map_err(|_| internal())
}

/// The headers of the pod's answer as the client gets them. An answer that
/// comes before the client's body has all come in (an upload the pod cut
/// at its time limit) says `Connection: close`: the server must close the
/// connection (the rest of the body is unread), and without the header the
/// client would put it back in its pool, and its next request there would
/// meet the reset that the unread bytes bring.
pub fn answer_headers(pod: &HeaderMap, request_body_ended: bool) -> HeaderMap {
    let mut headers = forwarded_headers(pod, false);
    if !request_body_ended {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    headers
}

/// Whether forwarding failed because the server cut the client's body.
pub fn caused_by_slow_body(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if error.is::<tidepool_serve::BodyTimedOut>() {
            return true;
        }
        cause = error.source();
    }
    false
}

/// An anonymous client's sessions stay within its bytes per hour: a new
/// stream of a session on a public pool is refused once the address's
/// sessions of the hour have moved that much (a stream already open runs
/// on; the session pod bounds each one).
fn within_bytes(gateway: &Gateway, session: &SessionRef) -> Result<(), Refused> {
    let limits = gateway.settings.anonymous;
    if limits.bytes_per_hour == 0 {
        return Ok(());
    }
    let Some(found) = gateway.caches.session(&session.namespace, &session.name) else { return Ok(()) };
    let public = gateway.caches.pool(&session.namespace, &found.spec.pool).is_some_and(|p| p.spec.public);
    let address = found.spec.client.as_ref().and_then(|c| c.address.as_deref()).and_then(|a| a.parse().ok());
    let (true, Some(address)) = (public, address) else { return Ok(()) };
    let (seen, names) = gateway.caches.sessions_for(crate::client::canonical(address));
    crate::anonymous::within_bytes(limits, &seen, gateway.streams.unwritten(&names), now_unix()).map_err(|r| {
        Refused::new(StatusCode::TOO_MANY_REQUESTS, r.reason, r.message).retry_after(r.retry_after_seconds)
    })
}

/// How long a stream waits for this replica's caches to show its session
/// Ready: the operator answers a create once the session is Ready, and a
/// client that connects at once may be a moment ahead of this watch.
const CACHE_CATCH_UP: Duration = Duration::from_secs(1);
const CACHE_POLL: Duration = Duration::from_millis(25);

/// [`find_target`], waiting up to [`CACHE_CATCH_UP`] while the session is
/// not Ready here yet. Only a session that exists, with the token's UID,
/// can be not Ready, so no stranger's request waits.
async fn find_target_soon(gateway: &Gateway, token: &str) -> Result<Target, Refused> {
    let deadline = tokio::time::Instant::now() + CACHE_CATCH_UP;
    loop {
        match find_target(gateway, token) {
            Err(refused) if refused.reason == NoTarget::NotReady.reason() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(CACHE_POLL).await;
            }
            found => return found,
        }
    }
}

/// The session the token names, checked and routed (see [`target::decide`]).
fn find_target(gateway: &Gateway, token: &str) -> Result<Target, Refused> {
    let claims = target::claimed(token).map_err(no_target)?;
    if !gateway.caches.serves(&claims.ns) {
        return Err(no_target(NoTarget::NotAccepted));
    }
    let session = gateway.caches.session(&claims.ns, &claims.name);
    let pod_name = session.as_ref().and_then(|s| s.status.as_ref()).and_then(|s| s.pod.clone());
    let pod = pod_name.and_then(|name| gateway.caches.pod(&claims.ns, &name));
    target::decide(token, session.as_deref(), pod.as_deref(), now_unix()).map_err(no_target)
}

pub fn no_target(why: NoTarget) -> Refused {
    let status = match why {
        NoTarget::Malformed | NoTarget::Expired => StatusCode::UNAUTHORIZED,
        NoTarget::NotAccepted => StatusCode::FORBIDDEN,
        NoTarget::Ended(_) => StatusCode::GONE,
        NoTarget::NotReady => StatusCode::SERVICE_UNAVAILABLE,
    };
    let refused = Refused::new(status, why.reason(), why.to_string());
    if why == NoTarget::NotReady { refused.retry_after(1) } else { refused }
}

fn unreachable_pod(reason: &'static str) -> Refused {
    Refused::new(StatusCode::BAD_GATEWAY, reason, "the session's pod did not answer").retry_after(1)
}

fn internal() -> Refused {
    Refused::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the request could not be forwarded")
}

/// The session token: from `Authorization: Bearer`, else `?token=` (a
/// browser cannot set headers on a WebSocket).
fn token_of(request: &Request<Body>) -> Option<String> {
    let from_header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(tidepool_protocol::bearer_token)
        .map(str::to_string);
    from_header.or_else(|| {
        let query = request.uri().query()?;
        serde_urlencoded::from_str::<Vec<(String, String)>>(query)
            .ok()?
            .into_iter()
            .find_map(|(key, value)| (key == "token").then_some(value))
    })
}

fn bearer(token: &str) -> Result<HeaderValue, Refused> {
    HeaderValue::try_from(format!("Bearer {token}"))
        .map_err(|_| Refused::new(StatusCode::UNAUTHORIZED, "token_malformed", "the session token is malformed"))
}

/// The pod's URI: its endpoint, and the request's path past [`PREFIX`] with its query.
fn pod_uri(target: &Target, uri: &Uri) -> Result<Uri, Refused> {
    let path = uri.path().strip_prefix(PREFIX).filter(|p| p.starts_with('/')).unwrap_or("/");
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    format!("{}{path}{query}", target.endpoint.trim_end_matches('/')).parse().map_err(|_| internal())
}

/// Whether the client asks to switch protocols (a WebSocket).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// The headers to pass on: the end-to-end ones. Hop-by-hop headers (and
/// those the `Connection` header names) stay on their hop, except the
/// upgrade's own pair when the connection is being upgraded; the client's
/// credentials and forwarding claims are replaced by the gateway's.
pub fn forwarded_headers(headers: &HeaderMap, upgrade: bool) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let hop = matches!(
            name.as_str(),
            "connection"
                | "keep-alive"
                | "proxy-authenticate"
                | "proxy-authorization"
                | "te"
                | "trailer"
                | "transfer-encoding"
                | "upgrade"
                | "host"
                | "authorization"
                | "x-tidepool-binding"
                | "x-tidepool-relay"
                | "x-forwarded-for"
        ) || named.iter().any(|n| n == name.as_str());
        if !hop {
            out.append(name.clone(), value.clone());
        }
    }
    if upgrade {
        out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(protocol) = headers.get(header::UPGRADE) {
            out.insert(header::UPGRADE, protocol.clone());
        }
    }
    out
}

/// Answers the client's upgrade with the upstream's 101 (a pod's or a
/// routed backend's) and joins the two upgraded connections byte for byte,
/// until either side closes.
pub fn join_upgraded(
    client: hyper::upgrade::OnUpgrade,
    mut response: Response<hyper::body::Incoming>,
    to_upstream: IntCounter,
    to_client: IntCounter,
    guard: Option<StreamGuard>,
) -> Response<Body> {
    let pod = hyper::upgrade::on(&mut response);
    let mut answer = Response::new(Body::empty());
    *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *answer.headers_mut() = forwarded_headers(response.headers(), true);
    let tally = guard.as_ref().map(|g| g.bytes.clone());
    tokio::spawn(async move {
        let _guard = guard;
        let (client, pod) = match tokio::try_join!(client, pod) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "an upgrade did not complete");
                return;
            }
        };
        let mut client = CountedIo { inner: TokioIo::new(client), read: to_upstream, tally: tally.clone() };
        let mut pod = CountedIo { inner: TokioIo::new(pod), read: to_client, tally };
        // Either side failing ends both; the error says only which went first.
        let _ = crate::join::join(&mut client, &mut pod).await;
    });
    answer
}

/// A body that counts the bytes passing through it and, when it is a
/// stream's answer, holds the stream's place until it ends.
pub struct Counted<B> {
    inner: B,
    bytes: IntCounter,
    /// The session's tally, when the body is a session's.
    tally: Option<Arc<AtomicU64>>,
    _guard: Option<StreamGuard>,
    /// Set once the body has given its last frame.
    ended: Option<Arc<AtomicBool>>,
}

impl<B: http_body::Body> Counted<B> {
    pub fn new(inner: B, bytes: IntCounter, guard: Option<StreamGuard>) -> Self {
        let tally = guard.as_ref().map(|g| g.bytes.clone());
        Self { inner, bytes, tally, _guard: guard, ended: None }
    }

    /// Also adds what passes to a session's tally.
    pub fn tallying(mut self, tally: Arc<AtomicU64>) -> Self {
        self.tally = Some(tally);
        self
    }

    /// Also tells `ended` when the body is done (at once for an empty one).
    pub fn telling(mut self, ended: Arc<AtomicBool>) -> Self {
        if self.inner.is_end_stream() {
            ended.store(true, Ordering::Relaxed);
        }
        self.ended = Some(ended);
        self
    }
}

impl<B> http_body::Body for Counted<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes.inc_by(data.len() as u64);
            if let Some(tally) = &self.tally {
                tally.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        // A sender may stop polling once the body says it has ended.
        if let Some(ended) = &self.ended
            && (matches!(polled, Poll::Ready(None)) || self.inner.is_end_stream())
        {
            ended.store(true, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An upgraded connection that counts what is read from it.
struct CountedIo<T> {
    inner: T,
    read: IntCounter,
    tally: Option<Arc<AtomicU64>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for CountedIo<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.read.inc_by(read as u64);
        if let Some(tally) = &self.tally {
            tally.fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountedIo<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(HeaderName::try_from(*name).unwrap(), HeaderValue::try_from(*value).unwrap());
        }
        map
    }

    #[test]
    fn an_answer_before_the_body_ended_closes_the_connection() {
        let pod = headers(&[("content-type", "application/json"), ("connection", "keep-alive")]);
        let whole = answer_headers(&pod, true);
        assert_eq!(whole.get("content-type").unwrap(), "application/json");
        assert!(whole.get("connection").is_none());
        assert_eq!(answer_headers(&pod, false).get("connection").unwrap(), "close");
    }

    #[tokio::test]
    async fn a_body_tells_when_it_has_ended() {
        use http_body_util::BodyExt;
        let bytes = IntCounter::new("t", "t").unwrap();
        let ended = Arc::new(AtomicBool::new(false));
        let empty = Counted::new(http_body_util::Empty::<Bytes>::new(), bytes.clone(), None).telling(ended.clone());
        assert!(ended.load(Ordering::Relaxed), "an empty body has ended before it is read");
        drop(empty);
        let ended = Arc::new(AtomicBool::new(false));
        let full = http_body_util::Full::new(Bytes::from_static(b"abc"));
        let mut body = Counted::new(full, bytes.clone(), None).telling(ended.clone());
        assert!(!ended.load(Ordering::Relaxed));
        assert!(body.frame().await.unwrap().is_ok());
        // Its last frame, without the poll that would say so.
        assert!(ended.load(Ordering::Relaxed));
        assert_eq!(bytes.get(), 3);
    }

    #[test]
    fn hop_by_hop_and_credentials_stay_behind() {
        let given = headers(&[
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("authorization", "Bearer client"),
            ("x-tidepool-binding", "forged"),
            ("x-tidepool-relay", "forged"),
            ("x-forwarded-for", "1.2.3.4"),
            ("host", "gateway"),
            ("transfer-encoding", "chunked"),
            ("content-type", "application/octet-stream"),
            ("accept", "a"),
            ("accept", "b"),
        ]);
        let out = forwarded_headers(&given, false);
        let names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type", "accept"]);
        assert_eq!(out.get_all("accept").iter().count(), 2);
    }

    #[test]
    fn an_upgrade_keeps_its_own_pair() {
        let given = headers(&[("connection", "Upgrade"), ("upgrade", "websocket"), ("sec-websocket-key", "k")]);
        assert!(wants_upgrade(&given));
        let out = forwarded_headers(&given, true);
        assert_eq!(out["connection"], "upgrade");
        assert_eq!(out["upgrade"], "websocket");
        assert_eq!(out["sec-websocket-key"], "k");
        assert!(!wants_upgrade(&headers(&[("upgrade", "websocket")])));
        assert!(!wants_upgrade(&headers(&[("connection", "upgrade")])));
    }

    #[test]
    fn the_pods_uri_keeps_the_path_past_the_prefix_and_the_query() {
        let target = Target {
            claims: serde_json::from_value(serde_json::json!({
                "sid": "u", "ns": "default", "name": "s", "pool": "p", "profile": "speed", "exp": 1
            }))
            .unwrap(),
            pod: "p-1".into(),
            endpoint: "http://10.0.0.7:9000/".into(),
        };
        let uri = |text: &str| pod_uri(&target, &text.parse().unwrap()).unwrap().to_string();
        assert_eq!(uri("/s/download?seconds=5"), "http://10.0.0.7:9000/download?seconds=5");
        assert_eq!(uri("/s/ws/household/gaming"), "http://10.0.0.7:9000/ws/household/gaming");
        assert_eq!(uri("/s"), "http://10.0.0.7:9000/");
        // A path that only looks like the prefix goes to the pod's root, not a neighbour.
        assert_eq!(uri("/session/x"), "http://10.0.0.7:9000/");
    }

    #[test]
    fn the_token_comes_from_the_header_first_then_the_query() {
        let request = |uri: &str, auth: Option<&str>| {
            let mut builder = Request::builder().uri(uri);
            if let Some(auth) = auth {
                builder = builder.header("authorization", auth);
            }
            builder.body(Body::empty()).unwrap()
        };
        assert_eq!(token_of(&request("/s/ws?token=q", Some("Bearer h"))).as_deref(), Some("h"));
        assert_eq!(token_of(&request("/s/ws?token=q%2Bx&binding=b", None)).as_deref(), Some("q+x"));
        assert_eq!(token_of(&request("/s/ws", Some("Basic x"))), None);
        assert_eq!(token_of(&request("/s/ws", None)), None);
    }

    #[test]
    fn a_sessions_bytes_are_written_spaced_at_once_when_its_streams_close_and_then_forgotten() {
        let streams = Arc::new(OpenStreams::default());
        let gauge = IntGauge::new("g", "g").unwrap();
        let spacing = Duration::from_secs(5);
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        // A tally starts where this replica's last write left it.
        let stream = streams.open(&session("a"), 2, gauge.clone(), 1000).unwrap();
        assert!(streams.bytes_due(at(0), spacing).is_empty());
        stream.bytes.fetch_add(500, Ordering::Relaxed);
        assert_eq!(streams.unwritten(&["default/s-a".into()]), 500);
        assert_eq!(streams.unwritten(&["default/s-b".into()]), 0);
        // Due at once the first time, then not before the spacing.
        assert_eq!(streams.bytes_due(at(1), spacing), [(session("a"), 1500)]);
        streams.bytes_written("a", 1500, at(1));
        assert_eq!(streams.unwritten(&["default/s-a".into()]), 0);
        stream.bytes.fetch_add(1, Ordering::Relaxed);
        assert!(streams.bytes_due(at(2), spacing).is_empty());
        assert_eq!(streams.bytes_due(at(6), spacing), [(session("a"), 1501)]);
        // Its last stream closed: due at once.
        streams.bytes_written("a", 1501, at(6));
        stream.bytes.fetch_add(9, Ordering::Relaxed);
        drop(stream);
        assert_eq!(streams.bytes_due(at(7), spacing), [(session("a"), 1510)]);
        streams.bytes_written("a", 1510, at(7));
        // Settled: kept a while (a new stream carries on the same tally), then forgotten.
        assert!(streams.bytes_due(at(8), spacing).is_empty());
        let again = streams.open(&session("a"), 2, gauge.clone(), 0).unwrap();
        assert_eq!(again.bytes.load(Ordering::Relaxed), 1510);
        drop(again);
        assert!(streams.bytes_due(at(8 + 601), spacing).is_empty());
        assert!(streams.0.lock().unwrap().tallies.is_empty());
    }

    fn session(sid: &str) -> SessionRef {
        SessionRef { sid: sid.into(), namespace: "default".into(), name: format!("s-{sid}") }
    }

    #[test]
    fn a_session_holds_at_most_its_cap_of_streams_and_gets_them_back() {
        let streams = Arc::new(OpenStreams::default());
        let gauge = IntGauge::new("g", "g").unwrap();
        let first = streams.open(&session("a"), 2, gauge.clone(), 0).unwrap();
        let second = streams.open(&session("a"), 2, gauge.clone(), 0).unwrap();
        assert!(streams.open(&session("a"), 2, gauge.clone(), 0).is_none());
        assert!(streams.open(&session("b"), 2, gauge.clone(), 0).is_some());
        assert_eq!((streams.of("a"), gauge.get()), (2, 2));
        // a is open; b opened and closed.
        assert_eq!(streams.sightings(), (vec![session("a")], vec![session("b")]));
        drop(first);
        assert_eq!(streams.of("a"), 1);
        drop(second);
        assert_eq!((streams.of("a"), gauge.get()), (0, 0));
        // Each closing is told once.
        assert_eq!(streams.sightings(), (vec![], vec![session("a")]));
        assert_eq!(streams.sightings(), (vec![], vec![]));
        assert!(streams.0.lock().unwrap().open.is_empty());
    }
}
