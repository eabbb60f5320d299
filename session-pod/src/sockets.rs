//! What the latency and household WebSockets share: reading the client's
//! text frames, answering pings within the rate limit, ending the pod.

use std::time::Instant;

use axum::extract::ws::{CloseFrame, Message, WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use futures_util::{Sink, SinkExt};

use crate::clock::unix_micros;
use crate::error::ApiError;
use crate::limits::RateBudget;
use crate::session::BoundSession;
use crate::state::PodState;
use tidepool_protocol::pod::{ClientMessage, MAX_PING_HZ, ServerMessage};

/// Close codes (RFC 6455).
pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_GOING_AWAY: u16 = 1001;
pub const CLOSE_POLICY: u16 = 1008;

/// The largest frame a client may send: pings are tiny, household uploads
/// come in frames of tens of kilobytes.
pub const MAX_CLIENT_FRAME_BYTES: usize = 1024 * 1024;

/// A WebSocket upgrade, or a JSON 400 for a request that is not one.
pub fn upgrade(upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>) -> Result<WebSocketUpgrade, ApiError> {
    let upgrade = upgrade.map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))?;
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
            return ServerMessage::Error {
                message: format!("ping {seq} refused: at most {MAX_PING_HZ} pings a second per socket"),
            };
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

/// A client's text frame, or the error to answer it with.
pub fn read_client_message(text: &str) -> Result<ClientMessage, ServerMessage> {
    serde_json::from_str(text).map_err(|e| ServerMessage::Error { message: format!("not a client message: {e}") })
}

pub fn error_message(message: impl Into<String>) -> ServerMessage {
    ServerMessage::Error { message: message.into() }
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
