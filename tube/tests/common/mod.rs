//! What the loopback tests and the benchmark share: a policy that allows
//! loopback, a tube over real WebRTC on loopback, echo targets (TCP and
//! UDP), a connection carried through a tube, and bytes that tell one
//! connection's data from another's.
#![allow(dead_code)] // each user takes what it needs

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tidepool_tube::{BridgeEnded, Ended, Limits, Mux, Opened, Peer, Policy, Settings};
use tidepool_wire::tube::Refusal;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

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

// Not every user of this module takes both.
#[allow(unused_imports)]
pub use tidepool_tests::targets::{echo_target, echoed, pattern, udp_echo_target};

/// Opens a connection through the tube; the application's socket.
pub async fn connect(mux: &Mux, port: u16) -> Result<TcpStream, Refusal> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
    let (carried, _) = listener.accept().await.unwrap();
    mux.open(carried, "127.0.0.1", port).await.map(|()| app)
}

/// A tube between a client and a pod end, both running. The pod's end
/// runs on a runtime of its own, so a test can kill it as a pod dies:
/// its sockets gone, no goodbye.
pub struct Tube {
    pub client: Mux,
    pub client_ended: JoinHandle<Ended>,
    pub client_bridge: JoinHandle<(BridgeEnded, Opened)>,
    pub server: Mux,
    pub server_runtime: tokio::runtime::Runtime,
}

/// Runs a peer's bridge; the peer comes back with how it ended, to be closed.
fn run_bridge(mut opened: Opened) -> JoinHandle<(BridgeEnded, Opened)> {
    tokio::spawn(async move {
        let ended = opened.bridge().await;
        (ended, opened)
    })
}

/// Two real peer connections on loopback (host candidates only), the offer
/// and answer passed as text, as the Tube resource carries them; the pod's
/// end allows loopback ([`Loopback`]).
pub async fn tube() -> Tube {
    tube_with(Limits::default()).await
}

/// [`tube`], with the client's end held to `client_limits`.
pub async fn tube_with(client_limits: Limits) -> Tube {
    let settings = Settings::loopback();
    let within = Duration::from_secs(10);
    let client = Peer::new(&settings).await.unwrap();
    let offer = client.offer().await.unwrap();

    let server_runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let (answered, answer) = tokio::sync::oneshot::channel();
    let (opened, server) = tokio::sync::oneshot::channel();
    server_runtime.spawn(async move {
        let server = Peer::new(&Settings::loopback()).await.unwrap();
        let _ = answered.send(server.answer(&offer).await.unwrap());
        let mut server = server.open(within).await.unwrap();
        let (mux, driver) = Mux::server(server.take_channel().unwrap(), Limits::default(), Arc::new(Loopback));
        let _ = opened.send(mux);
        tokio::spawn(driver);
        server.bridge().await;
        server.close().await;
    });
    client.accept(&answer.await.unwrap()).await.unwrap();
    let mut client = client.open_heard(within).await.unwrap();
    let server = server.await.unwrap();
    let (client_mux, client_driver) = Mux::client(client.take_channel().unwrap(), client_limits);
    Tube {
        client: client_mux,
        client_ended: tokio::spawn(client_driver),
        client_bridge: run_bridge(client),
        server,
        server_runtime,
    }
}
