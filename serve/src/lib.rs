//! HTTP/1 serving with the limits every Tidepool server keeps, whatever
//! its clients do:
//!
//! - a cap on open connections: one beyond it is closed at once, unanswered;
//! - a header timeout: a request head not complete in time closes the
//!   connection;
//! - a body timeout: a request body not read in full in time fails, so a
//!   client that sends its body a byte at a time cannot hold a handler;
//! - an idle timeout: a kept-alive connection with no request going on and
//!   no byte moving is closed.
//!
//! Each refusal is reported to the caller's `on_refusal` with a short
//! reason, for its metrics.

mod activity;
mod body;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tower::ServiceExt;

use activity::{Activity, Tracked};
pub use body::BodyTimedOut;

/// The limits of one server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most.
    pub max_connections: usize,
    /// How long a client has to send a request's head.
    pub header_timeout: Duration,
    /// How long a handler waits for a request's whole body.
    pub body_timeout: Duration,
    /// How long a connection may sit with no request and no byte moving.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a connection or request was cut, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A connection beyond [`Limits::max_connections`].
    ConnectionCap,
    /// A connection idle past [`Limits::idle_timeout`].
    Idle,
    /// A request body not read within [`Limits::body_timeout`].
    SlowBody,
}

impl Refusal {
    /// The bounded metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::ConnectionCap => "connection_cap",
            Self::Idle => "idle",
            Self::SlowBody => "slow_body",
        }
    }
}

/// What counts refusals.
pub type OnRefusal = Arc<dyn Fn(Refusal) + Send + Sync>;

/// The peer of a request's connection (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// Serves `router` on `listener` within `limits` until `shutdown` resolves,
/// then lets open requests finish for up to `grace`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    on_refusal: OnRefusal,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout).keep_alive(true);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stopping, stop) = watch::channel(false);
    let open = Arc::new(AtomicUsize::new(0));
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, most likely: wait for some to close.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            on_refusal(Refusal::ConnectionCap);
            drop(stream);
            continue;
        };
        let connection = Connection {
            http: http.clone(),
            router: router.clone(),
            limits,
            on_refusal: on_refusal.clone(),
            stop: stop.clone(),
            grace,
        };
        let open = open.clone();
        open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            connection.serve(stream, peer).await;
            open.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    let deadline = tokio::time::Instant::now() + grace + Duration::from_millis(200);
    while open.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One connection's share of the server.
struct Connection {
    http: http1::Builder,
    router: Router,
    limits: Limits,
    on_refusal: OnRefusal,
    stop: watch::Receiver<bool>,
    grace: Duration,
}

impl Connection {
    async fn serve(self, stream: TcpStream, peer: SocketAddr) {
        let _ = stream.set_nodelay(true);
        let activity = Activity::default();
        let io = TokioIo::new(Tracked::new(stream, activity.clone()));
        let (router, limits, on_refusal) = (self.router, self.limits, self.on_refusal.clone());
        let requests = activity.clone();
        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
            request.extensions_mut().insert(Peer(peer));
            let request = body::with_deadline(request, limits.body_timeout, on_refusal.clone());
            let busy = requests.request_started();
            let router = router.clone();
            async move {
                let response = router.oneshot(request).await;
                drop(busy);
                response
            }
        });
        let connection = self.http.serve_connection(io, service).with_upgrades();
        tokio::pin!(connection);
        let mut stop = self.stop;
        let mut watchdog = tokio::time::interval((limits.idle_timeout / 4).max(Duration::from_millis(10)));
        let mut closing = false;
        loop {
            tokio::select! {
                finished = connection.as_mut() => {
                    if let Err(e) = finished {
                        tracing::debug!(error = %e, %peer, "connection ended with an error");
                    }
                    return;
                }
                _ = watchdog.tick(), if !closing => {
                    if activity.idle_for() >= limits.idle_timeout {
                        (self.on_refusal)(Refusal::Idle);
                        connection.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
                () = stopped(&mut stop) => {
                    connection.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(self.grace, connection.as_mut()).await;
                    return;
                }
            }
        }
    }
}

/// Resolves once the server stops. (The guard `wait_for` gives back is not
/// Send: it is dropped here, not held in the caller's select.)
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

#[cfg(test)]
mod tests;
