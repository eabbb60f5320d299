//! `tidepool tube`: a tunnel into the cluster over a WebRTC data channel
//! (docs/tubes.md). The CLI makes its peer and offer, asks the operator
//! for a Tube with that offer (the operator has a pod answer it), connects,
//! and then carries every local TCP connection through the one tube: to
//! the fixed `--target`, or wherever a SOCKS5 client asks (`--socks5`).
//! Ctrl-C closes the tube and deletes the Tube; a tube that ends on its
//! own is left to the operator, which keeps it, with its reason, for its
//! retention.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tidepool_crds::tube::{ConversationType, IceServer, Target};
use tidepool_protocol::tube::{CreateTube, TubeView, decode_sdp, encode_sdp, split_target};
use tidepool_tube::{ForwardLimits, Limits, Mux, Opened, Peer, Settings, Socks5Limits};
use tokio::net::TcpListener;

use crate::error::{Error, Result};
use crate::operator::OperatorClient;

/// How long the client's peer waits for the channel to open once answered.
const OPEN_WITHIN: Duration = Duration::from_secs(10);
/// How long an ended tube's client waits for the operator's reason: past
/// the operator's 5 s poll of a connected tube's pod.
const REASON_WITHIN: Duration = Duration::from_secs(10);

/// What the tube carries, from the flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every local connection goes to `host:port`.
    Forward { host: String, port: u16, listen: SocketAddr },
    /// A local SOCKS5 server picks the target per connection.
    Socks5 { listen: SocketAddr },
}

/// Where the tube's pod comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    Pool(String),
    Session(String),
}

/// A `tidepool tube` run, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct TubeRequest {
    pub place: Place,
    pub namespace: Option<String>,
    pub mode: Mode,
    pub ttl_seconds: Option<i64>,
    pub idle_timeout_seconds: Option<i64>,
    /// Where the peer's UDP sockets bind.
    pub ice_addresses: Vec<IpAddr>,
    /// STUN and TURN servers for the client's peer (recorded in the Tube's
    /// `spec.iceServers`; the pod's peer uses none).
    pub ice_servers: Vec<IceServer>,
}

/// The request from the flags, or what is wrong with them. Pure.
pub fn request(
    pool: Option<String>,
    session: Option<String>,
    target: Option<&str>,
    listen: Option<SocketAddr>,
    socks5: Option<SocketAddr>,
) -> Result<(Place, Mode)> {
    let place = match (pool, session) {
        (Some(pool), None) => Place::Pool(pool),
        (None, Some(session)) => Place::Session(session),
        (Some(_), Some(_)) => return Err(Error::usage("give --pool or --session, not both")),
        (None, None) => return Err(Error::usage("--pool or --session is required")),
    };
    let mode = match (target, listen, socks5) {
        (Some(target), Some(listen), None) => {
            let (host, port) =
                split_target(target).ok_or_else(|| Error::usage(format!("--target {target:?}: expected HOST:PORT")))?;
            Mode::Forward { host, port, listen }
        }
        (Some(_), None, None) => return Err(Error::usage("--target needs --listen ADDRESS:PORT")),
        (None, _, Some(listen)) if target.is_none() => Mode::Socks5 { listen },
        (None, Some(_), None) => return Err(Error::usage("--listen goes with --target HOST:PORT")),
        (None, None, None) => return Err(Error::usage("give --target HOST:PORT with --listen, or --socks5")),
        _ => return Err(Error::usage("--socks5 and --target cannot be given together")),
    };
    Ok((place, mode))
}

/// The Tube the operator is asked for.
fn create(request: &TubeRequest, offer: &str) -> CreateTube {
    let (pool, session) = match &request.place {
        Place::Pool(pool) => (Some(pool.clone()), None),
        Place::Session(session) => (None, Some(session.clone())),
    };
    let (conversation_type, target) = match &request.mode {
        Mode::Forward { host, port, .. } => {
            (ConversationType::Tunnel, Some(Target { host: host.clone(), port: i32::from(*port) }))
        }
        Mode::Socks5 { .. } => (ConversationType::Socks5, None),
    };
    CreateTube {
        namespace: request.namespace.clone(),
        pool,
        session,
        conversation_type,
        target,
        offer: encode_sdp(offer),
        ttl_seconds: request.ttl_seconds,
        idle_timeout_seconds: request.idle_timeout_seconds,
        ice_servers: request.ice_servers.clone(),
    }
}

/// Runs the tube until Ctrl-C (or SIGTERM), or until it ends on its own.
pub async fn run(operator: OperatorClient, request: TubeRequest) -> Result<()> {
    let started = Instant::now();
    let listen = match &request.mode {
        Mode::Forward { listen, .. } | Mode::Socks5 { listen } => *listen,
    };
    // Bound first: a port in use fails before any Tube is made.
    let listener =
        TcpListener::bind(listen).await.map_err(|e| Error::usage(format!("cannot listen on {listen}: {e}")))?;
    let local = listener.local_addr().map_err(|e| Error::test(format!("the listener has no address: {e}")))?;
    let ice_servers = request.ice_servers.iter().map(|server| tidepool_tube::IceServer {
        urls: server.urls.iter().map(|url| url.0.clone()).collect(),
        username: server.username.clone().unwrap_or_default(),
        credential: server.credential.clone().unwrap_or_default(),
    });
    let settings = Settings {
        udp: request.ice_addresses.iter().map(|ip| SocketAddr::new(*ip, 0)).collect(),
        ice_servers: ice_servers.collect(),
        ..Settings::default()
    };
    let peer = Peer::new(&settings).await.map_err(|e| Error::test(format!("cannot make the peer connection: {e}")))?;
    let offer = match peer.offer().await {
        Ok(offer) => offer,
        Err(e) => {
            peer.close().await;
            return Err(Error::test(format!("cannot make the offer: {e}")));
        }
    };
    let namespace = request.namespace.as_deref();
    let view = match operator.create_tube(&create(&request, &offer)).await {
        Ok(view) => view,
        Err(e) => {
            peer.close().await;
            return Err(e);
        }
    };
    let name = view.name.clone();
    eprintln!(
        "tube {name}: answered by pod {} in {} ms",
        view.pod.as_deref().unwrap_or("?"),
        started.elapsed().as_millis()
    );
    let mut opened = match connect(peer, &view).await {
        Ok(opened) => opened,
        Err(e) => {
            let _ = operator.delete_tube(&name, namespace).await;
            return Err(e);
        }
    };
    let Some(channel) = opened.take_channel() else {
        opened.close().await;
        return Err(Error::Protocol("the tube's channel was taken twice".into()));
    };
    let (mux, driver) = Mux::client(channel, Limits::default());
    eprintln!("tube {name}: connected in {} ms", started.elapsed().as_millis());
    match &request.mode {
        Mode::Forward { host, port, .. } => println!("listening on {local}, forwarding to {host}:{port}"),
        Mode::Socks5 { .. } => println!("listening on {local} (SOCKS5)"),
    }
    let serving = serve(listener, mux.clone(), request.mode.clone());
    let outcome = tokio::select! {
        () = stop_signal() => Ok(()),
        ended = driver => Err(format!("the tube ended: {ended}")),
        ended = opened.bridge() => Err(format!("the tube's connection ended ({ended:?})")),
        served = serving => Err(format!("the local listener stopped: {served}")),
    };
    mux.close();
    opened.close().await;
    match outcome {
        Ok(()) => {
            operator.delete_tube(&name, namespace).await?;
            eprintln!("tube {name}: closed");
            Ok(())
        }
        Err(how) => {
            // The operator learns why from the pod (or from its going) and
            // keeps the ended Tube, with that reason, for its retention.
            // Deleting it here would race that write and, when it won, put
            // `Deleted` in the reason's place.
            let why = reason(&operator, &name, namespace).await;
            Err(Error::test(format!("tube {name}: {how}{why}")))
        }
    }
}

/// The client's side of the handshake: take the answer, open the channel.
/// The peer is closed on every failure.
async fn connect(peer: Peer, view: &TubeView) -> Result<Opened> {
    let answer = match view.answer.as_deref().map(decode_sdp) {
        Some(Ok(answer)) => answer,
        Some(Err(e)) => {
            peer.close().await;
            return Err(Error::Protocol(format!("the pod's answer: {e}")));
        }
        None => {
            peer.close().await;
            return Err(Error::Protocol("the operator's tube has no answer".into()));
        }
    };
    if let Err(e) = peer.accept(&answer).await {
        peer.close().await;
        return Err(Error::Protocol(format!("the pod's answer: {e}")));
    }
    // `open` closes the connection itself when it gives up.
    peer.open_heard(OPEN_WITHIN).await.map_err(|e| Error::test(format!("the tube did not connect: {e}")))
}

/// Why the tube ended, as the operator's status says, waited for up to
/// [`REASON_WITHIN`].
async fn reason(operator: &OperatorClient, name: &str, namespace: Option<&str>) -> String {
    let deadline = Instant::now() + REASON_WITHIN;
    while Instant::now() < deadline {
        if let Ok(view) = operator.get_tube(name, namespace).await
            && view.reason.as_deref().is_some_and(|r| r != "Answered" && r != "Connected")
        {
            return format!(" ({}: {})", view.reason.unwrap_or_default(), view.message.unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    String::new()
}

/// Carries local connections until the tube ends (or its listener fails).
async fn serve(listener: TcpListener, mux: Mux, mode: Mode) -> String {
    let served = match mode {
        Mode::Socks5 { .. } => tidepool_tube::serve_socks5(listener, mux, Socks5Limits::default()).await,
        Mode::Forward { host, port, .. } => {
            tidepool_tube::serve_forward(listener, mux, host, port, ForwardLimits::default()).await
        }
    };
    match served {
        Ok(()) => "the tube ended".into(),
        Err(e) => e.to_string(),
    }
}

async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> Option<SocketAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn the_flags_name_one_place_and_one_mode() {
        let forward = request(Some("edge".into()), None, Some("db.default.svc:5432"), addr("127.0.0.1:15432"), None);
        assert_eq!(
            forward.unwrap(),
            (
                Place::Pool("edge".into()),
                Mode::Forward { host: "db.default.svc".into(), port: 5432, listen: "127.0.0.1:15432".parse().unwrap() }
            )
        );
        let socks = request(None, Some("s1".into()), None, None, addr("127.0.0.1:1080")).unwrap();
        assert_eq!(socks, (Place::Session("s1".into()), Mode::Socks5 { listen: "127.0.0.1:1080".parse().unwrap() }));
        let v6 = request(Some("p".into()), None, Some("[::1]:22"), addr("[::1]:0"), None).unwrap();
        assert!(matches!(v6.1, Mode::Forward { ref host, port: 22, .. } if host == "::1"));
    }

    #[test]
    fn flags_that_do_not_fit_together_are_usage_errors() {
        let l = addr("127.0.0.1:0");
        let cases = [
            request(None, None, Some("h:1"), l, None),
            request(Some("p".into()), Some("s".into()), Some("h:1"), l, None),
            request(Some("p".into()), None, Some("h:1"), None, None),
            request(Some("p".into()), None, None, l, None),
            request(Some("p".into()), None, None, None, None),
            request(Some("p".into()), None, Some("h:1"), l, l),
            request(Some("p".into()), None, Some("h:1"), None, l),
            request(Some("p".into()), None, Some("no-port"), l, None),
        ];
        for (i, case) in cases.into_iter().enumerate() {
            assert!(matches!(case, Err(Error::Usage(_))), "case {i}: {case:?}");
        }
    }

    #[test]
    fn the_tube_asked_for_carries_the_offer_and_the_mode() {
        let request = TubeRequest {
            place: Place::Session("s1".into()),
            namespace: Some("team".into()),
            mode: Mode::Forward { host: "db".into(), port: 5432, listen: "127.0.0.1:0".parse().unwrap() },
            ttl_seconds: None,
            idle_timeout_seconds: Some(60),
            ice_addresses: Vec::new(),
            ice_servers: Vec::new(),
        };
        let made = create(&request, "v=0\r\n");
        assert_eq!((made.pool, made.session.as_deref()), (None, Some("s1")));
        assert_eq!(made.conversation_type, ConversationType::Tunnel);
        assert_eq!(made.target, Some(Target { host: "db".into(), port: 5432 }));
        assert_eq!(decode_sdp(&made.offer).unwrap(), "v=0\r\n");
        let socks = TubeRequest { mode: Mode::Socks5 { listen: "127.0.0.1:0".parse().unwrap() }, ..request };
        let made = create(&socks, "v=0");
        assert_eq!((made.conversation_type, made.target), (ConversationType::Socks5, None));
    }
}
