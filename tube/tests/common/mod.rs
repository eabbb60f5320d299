//! What the loopback tests and the benchmark share: a policy that allows
//! loopback, an echo target, a connection carried through a tube, and
//! bytes that tell one connection's data from another's.
#![allow(dead_code)] // each user takes what it needs

use std::net::SocketAddr;

use tidepool_tube::{Mux, Policy};
use tidepool_wire::tube::Refusal;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

/// Allows loopback only (the real policy forbids it by default).
pub struct Loopback;

impl Policy for Loopback {
    fn allows_name(&self, host: &str, _: u16) -> bool {
        host == "127.0.0.1"
    }
    fn allows_address(&self, _: &str, address: SocketAddr) -> bool {
        address.ip().is_loopback()
    }
}

/// An echo server on loopback; its port.
pub async fn echo_target() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            // A one-byte echo must not wait for Nagle's algorithm.
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let (mut reader, mut writer) = tcp.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
                let _ = writer.shutdown().await;
            });
        }
    });
    port
}

/// Opens a connection through the tube; the application's socket.
pub async fn connect(mux: &Mux, port: u16) -> Result<TcpStream, Refusal> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (carried, _) = listener.accept().await.unwrap();
    mux.open(carried, "127.0.0.1", port).await.map(|()| app)
}

/// `len` bytes of a sequence `seed` picks.
pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}
