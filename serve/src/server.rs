//! The accept loop and each connection's task.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Extensions;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tower::ServiceExt;

use crate::activity::{Activity, AnsweredBody, Slot, Watched, WriteStall};
use crate::body::TimedBody;
use crate::{Limits, OnConnection, OnOpenChange, OnRefusal, Refusal};

/// After the grace period, how long the accept loop still waits for its
/// connections' tasks to see it out.
const TASKS_END_WAIT: Duration = Duration::from_secs(1);

/// A server to be: its limits and the caller's hooks. [`Server::serve`]
/// runs it.
pub struct Server {
    limits: Limits,
    grace: Duration,
    http: http1::Builder,
    on_refusal: OnRefusal,
    on_open_change: OnOpenChange,
    on_connection: Option<OnConnection>,
    #[cfg(feature = "tls")]
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Server {
    /// A server within `limits`, reporting nothing, with 5 s of grace at shutdown.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            grace: Duration::from_secs(5),
            http: http1::Builder::new(),
            on_refusal: Arc::new(|_| {}),
            on_open_change: Arc::new(|_| {}),
            on_connection: None,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// Serves TLS: each connection's handshake must finish within the header
    /// timeout, and its certificate comes from `acceptor`'s configuration
    /// (whose resolver may change it between handshakes).
    #[cfg(feature = "tls")]
    pub fn tls(mut self, acceptor: tokio_rustls::TlsAcceptor) -> Self {
        self.tls = Some(acceptor);
        self
    }

    /// At shutdown, how long open requests get to finish.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Told of every refusal, on the connection's task: keep it short.
    pub fn on_refusal(mut self, on_refusal: impl Fn(Refusal) + Send + Sync + 'static) -> Self {
        self.on_refusal = Arc::new(on_refusal);
        self
    }

    /// Told +1 when a connection takes its place under the cap and -1 when
    /// its socket closes (an upgraded socket keeps its place).
    pub fn on_open_change(mut self, on_open_change: impl Fn(i64) + Send + Sync + 'static) -> Self {
        self.on_open_change = Arc::new(on_open_change);
        self
    }

    /// Called once per accepted connection; what it gives is added to each
    /// of the connection's requests (the peer's address, a handle on the
    /// socket).
    pub fn on_connection(
        mut self,
        on_connection: impl Fn(&TcpStream, SocketAddr) -> Extensions + Send + Sync + 'static,
    ) -> Self {
        self.on_connection = Some(Arc::new(on_connection));
        self
    }

    /// Tunes hyper's HTTP/1 settings (buffer size, vectored writes). Its
    /// header timeout stays off whatever this sets: the header timeout is
    /// [`Limits::header_timeout`].
    pub fn tune_http1(mut self, tune: impl FnOnce(&mut http1::Builder)) -> Self {
        tune(&mut self.http);
        self
    }

    /// Serves `router` on `listener` until `shutdown` resolves, then lets
    /// open requests finish for up to the grace period and returns.
    pub async fn serve(self, listener: TcpListener, router: Router, shutdown: impl Future<Output = ()>) {
        #[cfg(feature = "tls")]
        let Self { limits, grace, mut http, on_refusal, on_open_change, on_connection, tls } = self;
        #[cfg(not(feature = "tls"))]
        let Self { limits, grace, mut http, on_refusal, on_open_change, on_connection } = self;
        // hyper's timer would also run while a kept-alive connection waits.
        http.header_read_timeout(None).keep_alive(true);
        let shared = Arc::new(Shared {
            http,
            router,
            limits,
            grace,
            on_refusal,
            on_connection,
            #[cfg(feature = "tls")]
            tls,
        });
        let slots = Arc::new(Semaphore::new(limits.max_connections.min(Semaphore::MAX_PERMITS)));
        let (stopping, stop) = watch::channel(false);
        // Every connection's task holds a sender: when all are gone, all are done.
        let (open, mut all_done) = mpsc::channel::<()>(1);
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
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                (shared.on_refusal)(Refusal::ConnectionCap);
                tracing::debug!(%peer, max = limits.max_connections, "connection refused: too many open");
                drop(stream);
                continue;
            };
            let slot = Slot::new(permit, on_open_change.clone());
            tokio::spawn(connection(stream, peer, slot, shared.clone(), stop.clone(), open.clone()));
        }
        drop(listener);
        let _ = stopping.send(true);
        drop(open);
        if tokio::time::timeout(grace + TASKS_END_WAIT, all_done.recv()).await.is_err() {
            tracing::warn!("connections still open after the grace period");
        }
    }
}

/// What every connection's task shares.
struct Shared {
    http: http1::Builder,
    router: Router,
    limits: Limits,
    grace: Duration,
    on_refusal: OnRefusal,
    on_connection: Option<OnConnection>,
    #[cfg(feature = "tls")]
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Serves one connection until it ends, times out, or the server stops.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    shared: Arc<Shared>,
    stop: watch::Receiver<bool>,
    _open: mpsc::Sender<()>,
) {
    // Small answers and frames must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let extensions = shared.on_connection.as_ref().map(|extensions| extensions(&stream, peer));
    let extensions = extensions.filter(|extensions| !extensions.is_empty());
    #[cfg(feature = "tls")]
    if let Some(acceptor) = shared.tls.clone() {
        // The handshake is the start of the head: bounded by the same timeout.
        match tokio::time::timeout(shared.limits.header_timeout, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => serve_io(tls, peer, slot, extensions, shared, stop).await,
            Ok(Err(e)) => {
                (shared.on_refusal)(Refusal::TlsHandshake);
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
            }
            Err(_) => {
                (shared.on_refusal)(Refusal::TlsHandshake);
                tracing::debug!(%peer, "TLS handshake timed out");
            }
        }
        return;
    }
    serve_io(stream, peer, slot, extensions, shared, stop).await;
}

/// Serves HTTP/1 on one connection's stream, plain or TLS.
async fn serve_io<S>(
    stream: S,
    peer: SocketAddr,
    slot: Slot,
    extensions: Option<Extensions>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let stalled = WriteStall::new(shared.limits.write_timeout, shared.on_refusal.clone());
    let io = TokioIo::new(Watched::new(stream, activity.clone(), slot).with_write_stall(stalled));
    let service = {
        let (shared, activity) = (shared.clone(), activity.clone());
        hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            let answering = activity.request_started();
            if let Some(extensions) = &extensions {
                request.extensions_mut().extend(extensions.clone());
            }
            let body_timeout = shared.limits.body_timeout;
            let on_refusal = shared.on_refusal.clone();
            let request = request.map(|body| Body::new(TimedBody::new(body, body_timeout, on_refusal)));
            let answer = shared.router.clone().oneshot(request);
            async move {
                let response = answer.await?;
                Ok::<_, Infallible>(response.map(|body| AnsweredBody::new(body, answering)))
            }
        })
    };
    let connection = shared.http.serve_connection(io, service).with_upgrades();
    tokio::pin!(connection);
    let finished = tokio::select! {
        finished = connection.as_mut() => finished,
        refusal = activity.expired(&shared.limits) => {
            // Nothing is being answered: dropping the connection closes it.
            (shared.on_refusal)(refusal);
            tracing::debug!(%peer, reason = refusal.reason(), "connection closed");
            return;
        }
        () = stopped(&mut stop) => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(shared.grace, connection.as_mut()).await {
                Ok(finished) => finished,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = finished {
        tracing::debug!(error = %e, %peer, "connection ended with an error");
    }
}

/// Resolves once the server stops. (The guard `wait_for` gives back is not
/// Send: it is dropped here, not held in the caller's select.)
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}
