//! The pod's tube routes (docs/tubes.md): the operator posts a Tube's
//! offer with a tube ticket, the pod answers, and once the client's peer
//! connects, the pod dials what the ticket's allowlist lets the client ask
//! for. The operator reads each tube's state back (`GET`) and closes it
//! (`DELETE`). Every tube's task owns its peer connection and multiplexer
//! and closes both whichever way it ends; a guard records the end even if
//! the task panics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tidepool_protocol::egress::parse_allow;
use tidepool_protocol::tube::{
    EndReason, PodTubeState, TUBE_TICKET_HEADER, TubeAnswer, TubeOffer, TubePolicy, TubeReport, decode_sdp, encode_sdp,
};
use tidepool_tube::{Closer, Mux, Opened, Peer, PeerError, Stats};
use tidepool_wire::token::TubeClaims;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;

use crate::body::{parse_json, read_body};
use crate::clock::unix_seconds;
use crate::error::{ApiError, Reason, json_response};
use crate::state::PodState;
use crate::tubes::{Entry, IDLE_CHECK, OFFER_BODY_BYTES, is_idle};

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
    // Should this request be dropped while it answers (its caller gone),
    // the connection is closed rather than left running.
    let mut unclaimed = CloseOnDrop(Some(peer.closer()));
    let answer = match peer.answer(&sdp).await {
        Ok(answer) => encode_sdp(&answer),
        Err(e @ PeerError::GatheringTimedOut(_)) => {
            unclaimed.0 = None;
            peer.close().await;
            // The pod's trouble, not the offer's: the operator tries again.
            tracing::warn!(error = %e, "cannot answer a tube's offer");
            return Err(ApiError::new(Reason::Other, StatusCode::SERVICE_UNAVAILABLE, "cannot answer now; retry"));
        }
        Err(e) => {
            unclaimed.0 = None;
            peer.close().await;
            return Err(ApiError::bad_request(Reason::BadOffer, format!("the offer cannot be answered: {e}")));
        }
    };
    let stop = CancellationToken::new();
    let raced = {
        let mut table = tubes.table();
        // Two posts for one tube raced: the first one's answer stands.
        match table.tubes.get(&claims.tube) {
            Some(entry) => Some(Ok(entry.answer.clone())),
            // Others were set up meanwhile: the limit holds all the same.
            None if table.live() >= tubes.limits.tubes => {
                let message = format!("this pod carries {} tubes, the most it may", tubes.limits.tubes);
                Some(Err(ApiError::too_many(Reason::TubeLimit, message, Duration::from_secs(5))))
            }
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
        unclaimed.0 = None;
        peer.close().await;
        return first;
    }
    unclaimed.0 = None;
    state.metrics.tube_creations.with_label_values(&["answered"]).inc();
    tracing::info!(tube = %claims.name, namespace = %claims.ns, kind = %claims.kind, "tube answered");
    let guard = EndGuard { state: state.clone(), uid: claims.tube.clone(), closer: Some(peer.closer()) };
    tokio::spawn(run(guard, peer, permit, Arc::new(Dial(policy)), claims.idle, stop));
    Ok(answer)
}

/// Closes a peer connection when dropped while it still holds it.
struct CloseOnDrop(Option<Closer>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(closer) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move { closer.close().await });
        }
    }
}

/// Records a tube's end when its task ends without saying why (a panic),
/// and closes its peer connection then, whose own tasks would otherwise
/// run on, answering the client, for ever.
struct EndGuard {
    state: Arc<PodState>,
    uid: String,
    /// Taken once the task has closed the connection itself.
    closer: Option<Closer>,
}

impl EndGuard {
    fn end(&mut self, reason: EndReason, message: impl Into<String>) {
        self.closer = None;
        self.state.tubes.end(&self.uid, reason, message.into());
    }
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        if let Some(closer) = self.closer.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            tracing::error!(tube = %self.uid, "a tube's task ended without closing its connection; closing it");
            runtime.spawn(async move { closer.close().await });
        }
        // A no-op after `end`; otherwise the task died.
        self.state.tubes.end(&self.uid, EndReason::PodShutdown, "the tube's task ended".into());
    }
}

/// One tube, from the answer to its end.
async fn run(
    mut guard: EndGuard,
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
    let closer = peer.closer();
    let open = peer.open(limits.open_within);
    tokio::pin!(open);
    let opened = tokio::select! {
        opened = &mut open => opened,
        () = stop.cancelled() => {
            permit.take();
            // Closed first, so the open gives up at once and no client
            // completes a handshake with a tube that was deleted.
            closer.close().await;
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
