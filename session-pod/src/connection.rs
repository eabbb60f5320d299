//! What a handler learns of the connection its request came on (request
//! extensions the accept loop adds).

use std::net::SocketAddr;
use std::sync::Arc;

/// The peer of a request's connection (a request extension).
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

/// The connection's socket (a duplicate descriptor), so a handler can tune
/// it (a request extension).
#[derive(Clone, Debug)]
pub struct ConnectionSocket(Arc<socket2::Socket>);

impl ConnectionSocket {
    /// Keeps at most about `bytes` unsent in the kernel (TCP_NOTSENT_LOWAT),
    /// so what the pod sends next does not queue behind much.
    pub fn keep_unsent_below(&self, bytes: u32) {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Err(e) = self.0.set_tcp_notsent_lowat(bytes) {
            tracing::debug!(error = %e, "cannot set TCP_NOTSENT_LOWAT");
        }
    }
}

impl ConnectionSocket {
    pub fn new(socket: socket2::Socket) -> Self {
        Self(Arc::new(socket))
    }
}
