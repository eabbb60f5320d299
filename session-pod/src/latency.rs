//! `GET /ws`: the latency WebSocket. Pings are answered with pongs that say
//! who answered and when; `terminate` ends the pod.

use std::sync::Arc;

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::response::Response;

use crate::clock::expiry;
use crate::connection::ClientAddr;
use crate::error::ApiError;
use crate::error::Reason;
use crate::limits::Opening;
use crate::session::BoundSession;
use crate::sockets::{self, CLOSE_GOING_AWAY, CLOSE_POLICY, PingAnswerer, refuse};
use crate::state::{PodState, SocketPermit, until_shutdown};
use tidepool_protocol::pod::ClientMessage;

pub async fn latency_socket(
    State(state): State<Arc<PodState>>,
    Extension(session): Extension<Arc<BoundSession>>,
    Extension(client): Extension<ClientAddr>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let upgrade = sockets::upgrade(upgrade)?;
    let permit = state.open_socket(client.0.ip(), Opening::Test)?;
    Ok(upgrade.on_upgrade(move |socket| serve(socket, session, permit)))
}

async fn serve(mut socket: WebSocket, session: Arc<BoundSession>, permit: SocketPermit) {
    let state = permit.state().clone();
    let mut pings = PingAnswerer::new();
    let mut shutdown = state.shutdown_signal();
    let expires = expiry(&session);
    loop {
        let incoming = tokio::select! {
            incoming = socket.recv() => incoming,
            () = until_shutdown(&mut shutdown) => {
                return sockets::close(&mut socket, CLOSE_GOING_AWAY, "the pod is shutting down").await;
            }
            () = tokio::time::sleep_until(expires) => {
                return sockets::close(&mut socket, CLOSE_POLICY, "the session expired").await;
            }
        };
        let message = match incoming {
            None => return,
            Some(Ok(message)) => message,
            Some(Err(error)) => {
                if let Some((code, reason)) = sockets::read_failure(&state, error) {
                    sockets::close(&mut socket, code, reason).await;
                }
                return;
            }
        };
        let reply = match message {
            Message::Text(text) => match sockets::read_client_message(&text) {
                Ok(ClientMessage::Ping { seq, client_time_us }) => pings.answer(&state, &session, seq, client_time_us),
                Ok(ClientMessage::Terminate) => return sockets::terminate(&mut socket, &state).await,
                Ok(ClientMessage::Start { .. }) => refuse(&state, Reason::WsBadStart, "start is for household sockets"),
                Err(error) => refuse(&state, Reason::WsBadMessage, error),
            },
            Message::Binary(_) => refuse(&state, Reason::WsBinary, "binary frames are for household sockets"),
            Message::Close(_) => return,
            // WebSocket-level pings are answered by the library.
            Message::Ping(_) | Message::Pong(_) => continue,
        };
        if sockets::send(&mut socket, &reply).await.is_err() {
            return;
        }
    }
}
