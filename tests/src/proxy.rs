//! A TCP proxy on loopback that a test puts between a program and a server,
//! and can freeze: every connection through it stops moving bytes in both
//! directions, as in a network partition, until the test thaws it. Thawing
//! cuts the connections that were frozen (a partition long enough kills
//! them); only connections made afterwards carry bytes again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::{HarnessError, Result};

/// Whether bytes move, and which connections may still carry them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Flow {
    frozen: bool,
    /// Connections opened before the last thaw end.
    epoch: u64,
}

/// A running proxy; dropping it stops it and closes its connections.
pub struct Proxy {
    addr: SocketAddr,
    flow: watch::Sender<Flow>,
    forwarded: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(HarnessError::io("binding the proxy"))?;
        let addr = listener.local_addr().map_err(HarnessError::io("reading the proxy's address"))?;
        let (flow, watched) = watch::channel(Flow::default());
        let forwarded = Arc::new(AtomicU64::new(0));
        let counter = forwarded.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let flow = watched.clone();
                let counter = counter.clone();
                connections.spawn(async move {
                    let epoch = flow.borrow().epoch;
                    let Ok(server) = TcpStream::connect(target).await else { return };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    // When either direction ends, the connection ends.
                    tokio::select! {
                        () = pump(client_read, server_write, flow.clone(), epoch, counter.clone()) => {}
                        () = pump(server_read, client_write, flow, epoch, counter) => {}
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self { addr, flow, forwarded, task })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops every byte, on every connection, old and new.
    pub fn freeze(&self) {
        self.flow.send_modify(|flow| flow.frozen = true);
    }

    /// Cuts the connections that were frozen and lets new ones through.
    pub fn thaw(&self) {
        self.flow.send_modify(|flow| {
            flow.frozen = false;
            flow.epoch += 1;
        });
    }

    /// Bytes forwarded so far, both ways.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction while the flow allows, ending when either side
/// closes or the connection's epoch is over.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut flow: watch::Receiver<Flow>,
    epoch: u64,
    forwarded: Arc<AtomicU64>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if !flowing(&mut flow, epoch).await {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buffer) => read,
            changed = flow.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Read just as the flow froze: held until the thaw, which drops it.
        if !flowing(&mut flow, epoch).await {
            return;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
        forwarded.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Waits while frozen; false once this connection's epoch is over.
async fn flowing(flow: &mut watch::Receiver<Flow>, epoch: u64) -> bool {
    loop {
        let now = *flow.borrow_and_update();
        if now.epoch != epoch {
            return false;
        }
        if !now.frozen {
            return true;
        }
        if flow.changed().await.is_err() {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    while let Ok(n) = socket.read(&mut buffer).await {
                        if n == 0 || socket.write_all(&buffer[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn echo(stream: &mut TcpStream, text: &[u8]) -> Option<Vec<u8>> {
        stream.write_all(text).await.ok()?;
        let mut back = vec![0u8; text.len()];
        tokio::time::timeout(Duration::from_millis(300), stream.read_exact(&mut back)).await.ok()?.ok()?;
        Some(back)
    }

    #[tokio::test]
    async fn a_frozen_proxy_moves_nothing_and_a_thaw_cuts_what_was_frozen() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        let mut old = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo(&mut old, b"hello").await.as_deref(), Some(&b"hello"[..]));
        proxy.freeze();
        assert_eq!(echo(&mut old, b"stuck").await, None);
        let mut during = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo(&mut during, b"also stuck").await, None);
        let before = proxy.forwarded();
        proxy.thaw();
        // The frozen connections are cut, and what they held is dropped.
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(2), old.read_to_end(&mut rest)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?} {rest:?}");
        assert_eq!(proxy.forwarded(), before);
        let mut new = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo(&mut new, b"again").await.as_deref(), Some(&b"again"[..]));
    }
}
