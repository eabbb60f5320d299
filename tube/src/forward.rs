//! A local listener whose every connection goes through a tube to one
//! target (`tidepool tube --target`), as `ssh -L` forwards a port.
//!
//! Bounded: connections waiting for the pod to dial their target are
//! capped here ([`ForwardLimits::opening`]); carried ones by the tube
//! ([`crate::Limits::connections`], beyond which the pod's end is never
//! asked). A connection beyond either is closed at once. The bytes are the
//! application's own from the first one, so there is no head to time; a
//! carried connection may sit quiet as long as its application likes (a
//! database connection does), and the tube's idle time counts only while
//! none is open.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::mux::Mux;

/// What a forwarding listener may hold.
#[derive(Clone, Copy, Debug)]
pub struct ForwardLimits {
    /// Connections waiting for the pod to dial their target, at once.
    pub opening: usize,
}

impl Default for ForwardLimits {
    fn default() -> Self {
        Self { opening: 64 }
    }
}

/// Carries every connection `listener` accepts through `mux` to
/// `host:port`, until the tube ends; then `Ok`. A refused connection is
/// closed and logged with the pod's reason. Failed accepts (a client gone,
/// no file descriptors) are logged and retried after a pause: they end
/// neither the listener nor the tube.
pub async fn serve(listener: TcpListener, mux: Mux, host: String, port: u16, limits: ForwardLimits) -> io::Result<()> {
    let opening = Arc::new(Semaphore::new(limits.opening.max(1)));
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, from) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "forward: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let Ok(permit) = opening.clone().try_acquire_owned() else {
                    tracing::warn!(%from, opening = limits.opening, "connection closed: as many are opening already");
                    continue;
                };
                let (mux, host) = (mux.clone(), host.clone());
                tasks.spawn(async move {
                    if let Err(refusal) = mux.open(tcp, &host, port).await {
                        tracing::warn!(%from, target = %format!("{host}:{port}"), %refusal, "connection refused by the pod");
                    }
                    drop(permit);
                });
            }
            Some(_) = tasks.join_next() => {}
            () = mux.ended() => return Ok(()),
        }
    }
}
