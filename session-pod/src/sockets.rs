//! What the latency and household WebSockets share: reading the client's
//! text frames, answering pings within the rate limit, refusing what does
//! not belong (each refusal counted by its reason), ending the pod.

use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use futures_util::{Sink, SinkExt};

use crate::clock::unix_micros;
use crate::error::{ApiError, Reason};
use crate::limits::RateBudget;
use crate::session::BoundSession;
use crate::state::PodState;
use tidepool_protocol::pod::{ClientMessage, MAX_PING_HZ, ServerMessage};

/// Close codes (RFC 6455).
pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_PROTOCOL: u16 = 1002;
pub const CLOSE_NOT_UTF8: u16 = 1007;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;

/// The largest frame a client may send: pings are tiny, household uploads
/// come in frames of tens of kilobytes.
pub const MAX_CLIENT_FRAME_BYTES: usize = 1024 * 1024;

/// A WebSocket upgrade, or a JSON 400 for a request that is not one.
pub fn upgrade(upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>) -> Result<WebSocketUpgrade, ApiError> {
    let upgrade =
        upgrade.map_err(|rejection| ApiError::new(Reason::NotWebsocket, rejection.status(), rejection.body_text()))?;
    Ok(upgrade.max_message_size(MAX_CLIENT_FRAME_BYTES).max_frame_size(MAX_CLIENT_FRAME_BYTES))
}

/// Answers a socket's pings, at most [`MAX_PING_HZ`] a second.
pub struct PingAnswerer {
    budget: RateBudget,
}

impl PingAnswerer {
    pub fn new() -> Self {
        Self { budget: RateBudget::new(MAX_PING_HZ, Instant::now()) }
    }

    /// A pong, or an error when the client pings too fast.
    pub fn answer(&mut self, state: &PodState, session: &BoundSession, seq: u64, client_time_us: u64) -> ServerMessage {
        if !self.budget.allow(Instant::now()) {
            state.metrics.pings.with_label_values(&["rate_limited"]).inc();
            let message = format!("ping {seq} refused: at most {MAX_PING_HZ} pings a second per socket");
            return refuse(state, Reason::WsPingRate, message);
        }
        state.metrics.pings.with_label_values(&["answered"]).inc();
        ServerMessage::Pong {
            seq,
            client_time_us,
            server_time_us: unix_micros(),
            pod: state.identity.pod.clone(),
            region: state.identity.region.clone(),
            session_id: session.claims.sid.clone(),
        }
    }
}

impl Default for PingAnswerer {
    fn default() -> Self {
        Self::new()
    }
}

/// A client's text frame, or why it is not a client message.
pub fn read_client_message(text: &str) -> Result<ClientMessage, String> {
    serde_json::from_str(text).map_err(|e| format!("not a client message: {e}"))
}

pub fn error_message(message: impl Into<String>) -> ServerMessage {
    ServerMessage::Error { message: message.into() }
}

/// An `error` frame for something the client sent, counted by its reason.
pub fn refuse(state: &PodState, reason: Reason, message: impl Into<String>) -> ServerMessage {
    state.count_refusal(reason);
    error_message(message)
}

/// Why reading a socket failed: a frame that breaks the rules, answered
/// with a close frame and counted, or a connection that is simply gone.
pub fn read_failure(state: &PodState, error: axum::Error) -> Option<(u16, &'static str)> {
    use tungstenite::Error as WsError;
    use tungstenite::error::ProtocolError;
    let inner = error.into_inner();
    let close = match inner.downcast_ref::<WsError>() {
        // A client that went away without a close frame broke no rule.
        Some(WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake)) => return None,
        Some(WsError::Capacity(_)) => (CLOSE_TOO_BIG, "frame over the size limit"),
        Some(WsError::Protocol(_)) => (CLOSE_PROTOCOL, "protocol error"),
        Some(WsError::Utf8(_)) => (CLOSE_NOT_UTF8, "text frame is not UTF-8"),
        _ => return None,
    };
    tracing::debug!(error = %inner, "websocket frame refused");
    state.count_refusal(Reason::WsBadFrame);
    Some(close)
}

/// A server message as a text frame.
pub fn text_frame(message: &ServerMessage) -> Message {
    // Plain strings and integers: serialising cannot fail.
    Message::Text(serde_json::to_string(message).unwrap_or_default().into())
}

pub async fn send<S: Sink<Message> + Unpin>(sink: &mut S, message: &ServerMessage) -> Result<(), S::Error> {
    sink.send(text_frame(message)).await
}

/// Sends a close frame; the client may already be gone, which is fine.
pub async fn close<S: Sink<Message> + Unpin>(sink: &mut S, code: u16, reason: &'static str) {
    let _ = sink.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
}

/// The client asked the pod to end: say so, close, and ask `main` to exit.
pub async fn terminate<S: Sink<Message> + Unpin>(sink: &mut S, state: &PodState) {
    tracing::info!("a client asked the pod to end");
    let _ = send(sink, &ServerMessage::Terminating { pod: state.identity.pod.clone() }).await;
    close(sink, CLOSE_NORMAL, "the pod is ending").await;
    state.terminate.notify_one();
}
