//! HTTP/1 serving with the limits every Tidepool server keeps, whatever
//! its clients do:
//!
//! - a cap on open connections, each holding its place for as long as its
//!   socket lives (an upgraded one too): one beyond is closed at once,
//!   unanswered;
//! - a header timeout: a request head must come in full within it of its
//!   first byte (of the accept, for a new connection);
//! - an idle timeout: between requests, a connection with nothing coming
//!   is closed after it;
//! - a body timeout, by one of two policies ([`BodyTimeout`]): the whole
//!   body within a time, or no pause longer than a time.
//!
//! While a request is being answered (until hyper has taken the last piece
//! of its response body) neither the header nor the idle timeout applies.
//! hyper's own header timer stays off: it also runs while a kept-alive
//! connection waits, which would make it an idle timeout.
//!
//! Each refusal is reported to the caller's [`Server::on_refusal`] with a
//! bounded reason, for its metrics.

mod activity;
mod body;
mod server;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

pub use body::BodyTimedOut;
pub use server::Server;

/// What counts refusals.
type OnRefusal = Arc<dyn Fn(Refusal) + Send + Sync>;
/// What counts open connections: +1 as one takes its place, -1 as its socket closes.
type OnOpenChange = Arc<dyn Fn(i64) + Send + Sync>;
/// What a connection's requests carry besides their own extensions.
type OnConnection = Arc<dyn Fn(&TcpStream, SocketAddr) -> axum::http::Extensions + Send + Sync>;

/// The limits of one server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once; one beyond is closed at once.
    pub max_connections: usize,
    /// A request head must come in full within this of its first byte (of
    /// the accept, for a new connection).
    pub header_timeout: Duration,
    /// How a request body may take its time.
    pub body_timeout: BodyTimeout,
    /// Between requests, how long a connection may sit with nothing coming.
    pub idle_timeout: Duration,
    /// How long a write may wait for the client to take bytes (an answer,
    /// a download, an upgraded connection's frames): a client that stops
    /// reading is cut after this, so it cannot hold its place for ever.
    pub write_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: BodyTimeout::Whole(Duration::from_secs(30)),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(60),
        }
    }
}

/// How long a request body may take. A body that breaks its limit fails
/// with [`BodyTimedOut`] and is reported as [`Refusal::SlowBody`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyTimeout {
    /// The whole body must come within this of the request's head: for
    /// small bodies, so that a byte every few seconds cannot hold a handler.
    Whole(Duration),
    /// The body may pause at most this long between two pieces (from the
    /// handler's first read): for uploads that stream for longer.
    Pause(Duration),
}

/// Why the server cut a connection or a request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A connection beyond [`Limits::max_connections`], closed unanswered.
    ConnectionCap,
    /// A request head not in within [`Limits::header_timeout`].
    HeaderTimeout,
    /// A connection with no request past [`Limits::idle_timeout`].
    Idle,
    /// A request body that broke [`Limits::body_timeout`].
    SlowBody,
    /// A TLS handshake that failed or did not finish within
    /// [`Limits::header_timeout`] (servers with TLS only).
    TlsHandshake,
    /// A client that took no bytes for [`Limits::write_timeout`].
    WriteStalled,
}

impl Refusal {
    /// Every refusal, for metrics that show each from the start.
    pub const ALL: [Refusal; 6] =
        [Self::ConnectionCap, Self::HeaderTimeout, Self::Idle, Self::SlowBody, Self::TlsHandshake, Self::WriteStalled];

    /// The bounded metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::ConnectionCap => "connection_cap",
            Self::HeaderTimeout => "header_timeout",
            Self::Idle => "idle",
            Self::SlowBody => "slow_body",
            Self::TlsHandshake => "tls_handshake",
            Self::WriteStalled => "write_stalled",
        }
    }
}

#[cfg(test)]
mod tests;
