//! The pod's end of tubes (docs/tubes.md): the operator posts a Tube's
//! offer with a tube ticket, the pod answers, and once the client's peer
//! connects, the pod dials what the ticket's allowlist lets the client ask
//! for. The operator reads each tube's state back (`GET`) and closes it
//! (`DELETE`).
//!
//! Bounded: tubes live at once ([`TubeLimits::tubes`]), tubes being
//! negotiated at once ([`TubeLimits::creations`]; a creation holds its
//! place until its channel opens or gives up), and after repeated ICE or
//! DTLS failures new tubes wait out a growing backoff instead of retrying
//! hot. Every tube's task owns its peer connection and multiplexer and
//! closes both whichever way it ends; a guard records the end even if the
//! task panics.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tidepool_protocol::egress::parse_allow;
use tidepool_protocol::tube::{
    EndReason, PodTubeState, TUBE_TICKET_HEADER, TubeAnswer, TubeOffer, TubePolicy, TubeReport, decode_sdp, encode_sdp,
};
use tidepool_tube::{Limits, Mux, Opened, Peer, Settings, Stats};
use tidepool_wire::token::TubeClaims;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::body::{parse_json, read_body};
use crate::clock::unix_seconds;
use crate::error::{ApiError, Reason, json_response};
use crate::state::PodState;

/// The largest offer body: the SDP's base64, with room to spare.
const OFFER_BODY_BYTES: usize = 96 * 1024;
/// Ended tubes the pod remembers, for the operator to read why.
const ENDED_KEPT: usize = 64;
/// How often a tube looks at its idle time.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// What the pod's tubes may hold.
#[derive(Clone, Debug)]
pub struct TubeLimits {
    /// Tubes open at once (connecting or connected).
    pub tubes: usize,
    /// Tubes between their answer and their open channel, at once.
    pub creations: usize,
    /// How long the client's peer has to connect after the answer.
    pub open_within: Duration,
    /// The first backoff after a tube failed to connect; it doubles with
    /// each failure in a row, up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// What one tube may carry.
    pub per_tube: Limits,
    /// The peer connection's settings (where its UDP sockets bind).
    pub peer: Settings,
}

impl Default for TubeLimits {
    fn default() -> Self {
        Self {
            tubes: 16,
            creations: 4,
            open_within: Duration::from_secs(10),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            per_tube: Limits::default(),
            peer: Settings::default(),
        }
    }
}

/// Failures in a row, and until when new tubes are refused. Pure.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Backoff {
    failures: u32,
    until: Option<Instant>,
}

impl Backoff {
    /// A tube failed to connect at `now`.
    pub fn failed(&mut self, now: Instant, first: Duration, max: Duration) {
        self.failures = self.failures.saturating_add(1);
        let factor = 1u32.checked_shl(self.failures.saturating_sub(1).min(16)).unwrap_or(u32::MAX);
        self.until = Some(now + first.saturating_mul(factor).min(max));
    }

    /// A tube connected: the line is good again.
    pub fn connected(&mut self) {
        *self = Self::default();
    }

    /// How long new tubes must still wait, if at all.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        self.until.and_then(|until| until.checked_duration_since(now)).filter(|wait| !wait.is_zero())
    }
}

/// Whether a tube has been idle for `idle`: no connection open and no
/// byte carried since `last_activity`. Pure.
pub fn is_idle(open_connections: usize, last_activity: Instant, now: Instant, idle: Duration) -> bool {
    open_connections == 0 && now.saturating_duration_since(last_activity) >= idle
}

struct Entry {
    state: PodTubeState,
    answer: String,
    stats: Option<Arc<Stats>>,
    ended: Option<(EndReason, String)>,
    ended_at: Option<Instant>,
    stop: CancellationToken,
}

#[derive(Default)]
struct Table {
    tubes: HashMap<String, Entry>,
    backoff: Backoff,
}

impl Table {
    fn live(&self) -> usize {
        self.tubes.values().filter(|entry| entry.ended.is_none()).count()
    }

    /// Forgets the oldest ended tubes beyond [`ENDED_KEPT`].
    fn trim(&mut self) {
        let mut ended: Vec<(Instant, String)> =
            self.tubes.iter().filter_map(|(uid, e)| e.ended_at.map(|at| (at, uid.clone()))).collect();
        if ended.len() <= ENDED_KEPT {
            return;
        }
        ended.sort();
        for (_, uid) in ended.iter().take(ended.len() - ENDED_KEPT) {
            self.tubes.remove(uid);
        }
    }
}

/// The pod's tubes.
pub struct Tubes {
    limits: TubeLimits,
    creations: Arc<Semaphore>,
    table: Mutex<Table>,
}

impl Tubes {
    pub fn new(limits: TubeLimits) -> Self {
        Self { creations: Arc::new(Semaphore::new(limits.creations.max(1))), limits, table: Mutex::default() }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Closes every tube (the pod is shutting down).
    pub fn close_all(&self) {
        for entry in self.table().tubes.values() {
            entry.stop.cancel();
        }
    }

    /// Tubes by state, for /metrics.
    pub fn count(&self, state: PodTubeState) -> usize {
        self.table().tubes.values().filter(|e| e.state == state).count()
    }

    fn end(&self, uid: &str, reason: EndReason, message: String) {
        let mut table = self.table();
        if let Some(entry) = table.tubes.get_mut(uid)
            && entry.ended.is_none()
        {
            entry.state = PodTubeState::Ended;
            entry.ended = Some((reason, message));
            entry.ended_at = Some(Instant::now());
            entry.stop.cancel();
        }
        table.trim();
    }
}

/// The ticket from the header, checked: signed by the pool's key, in
/// time, for this pod.
fn ticket(state: &PodState, headers: &HeaderMap) -> Result<TubeClaims, ApiError> {
    let text = headers.get(TUBE_TICKET_HEADER).and_then(|v| v.to_str().ok()).ok_or_else(|| {
        ApiError::new(
            Reason::Unauthenticated,
            StatusCode::UNAUTHORIZED,
            format!("send the {TUBE_TICKET_HEADER} header"),
        )
    })?;
    let claims = state
        .public_keys
        .verify_tube(text, unix_seconds())
        .map_err(|e| ApiError::new(Reason::Forbidden, StatusCode::FORBIDDEN, format!("tube ticket refused: {e}")))?;
    if claims.pod != state.identity.pod {
        let message = format!("the tube ticket is for pod {}, not this one", claims.pod);
        return Err(ApiError::new(Reason::Forbidden, StatusCode::FORBIDDEN, message));
    }
    Ok(claims)
}

/// `POST /api/v1/tubes`: answer a tube's offer. Idempotent per tube: a
/// second post for a tube already answered gets the same answer.
pub async fn create(State(state): State<Arc<PodState>>, headers: HeaderMap, body: Body) -> Response {
    match create_tube(&state, &headers, body).await {
        Ok(answer) => json_response(StatusCode::CREATED, &TubeAnswer { answer }),
        Err(e) => {
            state.metrics.tube_creations.with_label_values(&[e.reason.label()]).inc();
            e.into_response()
        }
    }
}

async fn create_tube(state: &Arc<PodState>, headers: &HeaderMap, body: Body) -> Result<String, ApiError> {
    let claims = ticket(state, headers)?;
    let offer: TubeOffer = parse_json(&read_body(body, OFFER_BODY_BYTES, state.body_read_timeout).await?)?;
    let sdp = decode_sdp(&offer.offer).map_err(|e| ApiError::bad_request(Reason::BadOffer, e.to_string()))?;
    let allow = parse_allow(&claims.allow)
        .map_err(|e| ApiError::new(Reason::TubeRefused, StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let policy = TubePolicy::new(&claims.kind, claims.target.as_deref(), &allow)
        .map_err(|e| ApiError::new(Reason::TubeRefused, StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let tubes = &state.tubes;
    {
        let table = tubes.table();
        if let Some(entry) = table.tubes.get(&claims.tube) {
            return match &entry.ended {
                None => Ok(entry.answer.clone()),
                Some((reason, _)) => Err(ApiError::new(
                    Reason::TubeRefused,
                    StatusCode::CONFLICT,
                    format!("tube {} already ended ({})", claims.name, reason.as_str()),
                )),
            };
        }
        if let Some(wait) = table.backoff.wait(Instant::now()) {
            let message = "tubes to this pod failed to connect again and again; backing off";
            return Err(ApiError::too_many(Reason::TubeBackoff, message, wait));
        }
        if table.live() >= tubes.limits.tubes {
            let message = format!("this pod carries {} tubes, the most it may", tubes.limits.tubes);
            return Err(ApiError::too_many(Reason::TubeLimit, message, Duration::from_secs(5)));
        }
    }
    let permit = tubes.creations.clone().try_acquire_owned().map_err(|_| {
        let message = format!("{} tubes are being set up on this pod, the most at once", tubes.limits.creations);
        ApiError::too_many(Reason::TubeCreations, message, Duration::from_secs(1))
    })?;
    let peer = Peer::new(&tubes.limits.peer).await.map_err(|e| {
        tracing::warn!(error = %e, "cannot make a peer connection");
        ApiError::new(Reason::Other, StatusCode::SERVICE_UNAVAILABLE, "cannot make a peer connection")
    })?;
    let answer = match peer.answer(&sdp).await {
        Ok(answer) => encode_sdp(&answer),
        Err(e) => {
            peer.close().await;
            return Err(ApiError::bad_request(Reason::BadOffer, format!("the offer cannot be answered: {e}")));
        }
    };
    let stop = CancellationToken::new();
    let raced = {
        let mut table = tubes.table();
        // Two posts for one tube raced: the first one's answer stands.
        match table.tubes.get(&claims.tube) {
            Some(entry) => Some(entry.answer.clone()),
            None => {
                let entry = Entry {
                    state: PodTubeState::Connecting,
                    answer: answer.clone(),
                    stats: None,
                    ended: None,
                    ended_at: None,
                    stop: stop.clone(),
                };
                table.tubes.insert(claims.tube.clone(), entry);
                None
            }
        }
    };
    if let Some(first) = raced {
        peer.close().await;
        return Ok(first);
    }
    state.metrics.tube_creations.with_label_values(&["answered"]).inc();
    tracing::info!(tube = %claims.name, namespace = %claims.ns, kind = %claims.kind, "tube answered");
    let guard = EndGuard { state: state.clone(), uid: claims.tube.clone() };
    tokio::spawn(run(guard, peer, permit, Arc::new(Dial(policy)), claims.idle, stop));
    Ok(answer)
}

/// Records a tube's end when its task ends without saying why (a panic).
struct EndGuard {
    state: Arc<PodState>,
    uid: String,
}

impl EndGuard {
    fn end(&self, reason: EndReason, message: impl Into<String>) {
        self.state.tubes.end(&self.uid, reason, message.into());
    }
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        // A no-op after `end`; otherwise the task died.
        self.end(EndReason::PodShutdown, "the tube's task ended");
    }
}

/// One tube, from the answer to its end.
async fn run(
    guard: EndGuard,
    peer: Peer,
    permit: OwnedSemaphorePermit,
    policy: Arc<Dial>,
    idle_seconds: u64,
    stop: CancellationToken,
) {
    let limits = &guard.state.tubes.limits;
    // `open` is never dropped mid-way (it would leave the connection
    // running): it closes the connection itself when it gives up. A tube
    // deleted meanwhile frees its place among the creations at once.
    let mut permit = Some(permit);
    let open = peer.open(limits.open_within);
    tokio::pin!(open);
    let opened = tokio::select! {
        opened = &mut open => opened,
        () = stop.cancelled() => {
            permit.take();
            open.await
        }
    };
    drop(permit);
    let mut opened: Opened = match opened {
        Ok(opened) => opened,
        // Deleted while the client connected: not the line's failure.
        Err(_) if stop.is_cancelled() => return guard.end(EndReason::Deleted, "closed before the client connected"),
        Err(e) => {
            guard.state.tubes.table().backoff.failed(Instant::now(), limits.backoff, limits.max_backoff);
            guard.state.metrics.tube_creations.with_label_values(&["not_connected"]).inc();
            return guard.end(EndReason::NotConnected, format!("the client's peer did not connect: {e}"));
        }
    };
    if stop.is_cancelled() {
        opened.close().await;
        return guard.end(EndReason::Deleted, "closed by the operator");
    }
    let Some(channel) = opened.take_channel() else {
        opened.close().await;
        return guard.end(EndReason::PodShutdown, "the channel was taken twice");
    };
    let (mux, driver) = Mux::server(channel, limits.per_tube, policy);
    {
        let mut table = guard.state.tubes.table();
        table.backoff.connected();
        if let Some(entry) = table.tubes.get_mut(&guard.uid) {
            entry.state = PodTubeState::Connected;
            entry.stats = Some(mux.stats().clone());
        }
    }
    guard.state.metrics.tube_creations.with_label_values(&["connected"]).inc();
    let idle = Duration::from_secs(idle_seconds.max(1));
    let stats = mux.stats().clone();
    let mut shutdown = guard.state.shutdown_signal();
    let (reason, message) = {
        let watch_idle = async {
            let (mut carried, mut last_activity) = (0, Instant::now());
            loop {
                tokio::time::sleep(IDLE_CHECK).await;
                let now_carried = stats.sent.load(Ordering::Relaxed) + stats.received.load(Ordering::Relaxed);
                if now_carried != carried {
                    (carried, last_activity) = (now_carried, Instant::now());
                }
                if is_idle(stats.open_connections.load(Ordering::Relaxed), last_activity, Instant::now(), idle) {
                    return;
                }
            }
        };
        tokio::pin!(driver);
        tokio::select! {
            ended = &mut driver => match ended {
                tidepool_tube::Ended::BadFrame(_) | tidepool_tube::Ended::Protocol(_) => {
                    (EndReason::ProtocolError, ended.to_string())
                }
                other => (EndReason::PeerGone, other.to_string()),
            },
            ended = opened.bridge() => (EndReason::PeerGone, format!("{ended:?}")),
            () = watch_idle => (EndReason::Idle, format!("nothing carried for {} s", idle.as_secs())),
            () = stop.cancelled() => (EndReason::Deleted, "closed by the operator".to_string()),
            () = crate::state::until_shutdown(&mut shutdown) => (EndReason::PodShutdown, "the pod is shutting down".to_string()),
        }
    };
    mux.close();
    opened.close().await;
    tracing::info!(reason = reason.as_str(), %message, "tube ended");
    guard.end(reason, message);
}

/// The ticket's policy, as the multiplexer asks it.
struct Dial(TubePolicy);

impl tidepool_tube::Policy for Dial {
    fn allows_name(&self, host: &str, port: u16) -> bool {
        self.0.allows_name(host, port)
    }

    fn allows_address(&self, host: &str, address: SocketAddr) -> bool {
        self.0.check_address(host, address).is_ok()
    }
}

/// `GET /api/v1/tubes/{tube}`: what the tube has carried, and how it ended.
pub async fn report(State(state): State<Arc<PodState>>, headers: HeaderMap, Path(uid): Path<String>) -> Response {
    let claims = match ticket(&state, &headers) {
        Ok(claims) => claims,
        Err(e) => return e.into_response(),
    };
    if claims.tube != uid {
        return ApiError::new(Reason::Forbidden, StatusCode::FORBIDDEN, "the ticket is for another tube")
            .into_response();
    }
    let table = state.tubes.table();
    let Some(entry) = table.tubes.get(&uid) else {
        return ApiError::not_found(Reason::NoSuchTube, "no such tube on this pod").into_response();
    };
    let stats = entry.stats.as_deref();
    let load = |pick: fn(&Stats) -> u64| stats.map_or(0, pick);
    let rtt_us = load(|s| s.rtt_us.load(Ordering::Relaxed));
    let report = TubeReport {
        state: entry.state,
        bytes_sent: load(|s| s.sent.load(Ordering::Relaxed)),
        bytes_received: load(|s| s.received.load(Ordering::Relaxed)),
        rtt_ms: (rtt_us > 0).then(|| rtt_us as f64 / 1000.0),
        open_connections: u32::try_from(load(|s| s.open_connections.load(Ordering::Relaxed) as u64)).unwrap_or(0),
        ended: entry.ended.as_ref().map(|(reason, _)| *reason),
        message: entry.ended.as_ref().map(|(_, message)| message.clone()),
    };
    drop(table);
    json_response(StatusCode::OK, &report)
}

/// `DELETE /api/v1/tubes/{tube}`: close it. Closing one already gone is fine.
pub async fn close(State(state): State<Arc<PodState>>, headers: HeaderMap, Path(uid): Path<String>) -> Response {
    match ticket(&state, &headers) {
        Ok(claims) if claims.tube == uid => {
            state.tubes.end(&uid, EndReason::Deleted, "closed by the operator".into());
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(_) => {
            ApiError::new(Reason::Forbidden, StatusCode::FORBIDDEN, "the ticket is for another tube").into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_each_failure_up_to_its_cap_and_a_connection_clears_it() {
        let (first, max) = (Duration::from_secs(1), Duration::from_secs(5));
        let now = Instant::now();
        let mut backoff = Backoff::default();
        assert_eq!(backoff.wait(now), None);
        backoff.failed(now, first, max);
        assert_eq!(backoff.wait(now), Some(Duration::from_secs(1)));
        assert_eq!(backoff.wait(now + Duration::from_secs(1)), None, "waited out");
        backoff.failed(now, first, max);
        assert_eq!(backoff.wait(now), Some(Duration::from_secs(2)));
        backoff.failed(now, first, max);
        backoff.failed(now, first, max);
        assert_eq!(backoff.wait(now), Some(max), "capped");
        for _ in 0..100 {
            backoff.failed(now, first, max);
        }
        assert_eq!(backoff.wait(now), Some(max), "no overflow after many");
        backoff.connected();
        assert_eq!(backoff, Backoff::default());
    }

    #[test]
    fn a_tube_is_idle_only_with_no_connection_and_nothing_carried_for_its_time() {
        let start = Instant::now();
        let idle = Duration::from_secs(10);
        assert!(!is_idle(0, start, start + Duration::from_secs(9), idle));
        assert!(is_idle(0, start, start + idle, idle));
        assert!(!is_idle(1, start, start + Duration::from_secs(3600), idle), "an open connection keeps it");
    }

    #[test]
    fn the_table_keeps_only_the_latest_ended_tubes() {
        let mut table = Table::default();
        let now = Instant::now();
        for i in 0..(ENDED_KEPT + 5) {
            let entry = Entry {
                state: PodTubeState::Ended,
                answer: String::new(),
                stats: None,
                ended: Some((EndReason::Idle, String::new())),
                ended_at: Some(now + Duration::from_millis(i as u64)),
                stop: CancellationToken::new(),
            };
            table.tubes.insert(format!("t{i}"), entry);
        }
        let live = Entry {
            state: PodTubeState::Connected,
            answer: String::new(),
            stats: None,
            ended: None,
            ended_at: None,
            stop: CancellationToken::new(),
        };
        table.tubes.insert("live".into(), live);
        table.trim();
        assert_eq!(table.tubes.len(), ENDED_KEPT + 1);
        assert!(table.tubes.contains_key("live") && !table.tubes.contains_key("t0") && table.tubes.contains_key("t68"));
        assert_eq!(table.live(), 1);
    }
}
