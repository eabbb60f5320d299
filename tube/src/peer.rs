//! The WebRTC side of a tube: a peer connection with one pre-negotiated,
//! ordered, reliable data channel, and the bridge between that channel and
//! the multiplexer's queues ([`crate::Channel`]).
//!
//! Signalling is not trickled: each side gathers its candidates before it
//! hands over its description, so one offer and one answer (the Tube
//! resource's spec and status) are all it takes.
//!
//! What is tuned, and why (docs/tubes.md has the figures):
//! - the ICE check interval is 20 ms, not 200 ms: ICE nominates on a tick;
//! - mDNS is off: no multicast socket per connection;
//! - the UDP socket buffers are 4 MiB: at the default size a burst of
//!   SCTP packets overflows the receive buffer, and SCTP's 1 s minimum
//!   retransmission timeout turns each drop into a stall;
//! - a GSO send holds no more datagrams than fit one UDP send
//!   ([`crate::sockets`]): a larger batch fails whole, again on every
//!   retransmission, and wedged one direction of the tube;
//! - SCTP packets are 1,400 bytes, not 1,191 (fewer per message);
//! - the SCTP receive window is 4 MiB, and a message may hold any frame;
//! - SCTP's first INIT goes out as soon as DTLS is up, not on the next
//!   ICE tick (see [`Peer::open`]);
//! - the channel's send buffer is bounded, so `send` waits when the peer
//!   falls behind, and the multiplexer's queue with it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rtc::ice::mdns::MulticastDnsMode;
use rtc::ice::network_type::NetworkType;
use rtc::peer_connection::configuration::setting_engine::SctpMaxMessageSize;
use tokio::sync::{Notify, mpsc, watch};
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder, RTCIceGatheringState,
    RTCIceServer, RTCPeerConnectionState, RTCSessionDescription, SettingEngine, SettingEngineBuilder,
};

use crate::mux::{Channel, OUTGOING_FRAMES};
use crate::sockets::TubeSockets;

/// Messages from the channel waiting for the multiplexer. When it is full
/// the bridge stops taking messages, and SCTP's window pushes back.
const INCOMING_MESSAGES: usize = 256;
/// The largest message either side takes: the largest frame fits.
const MAX_MESSAGE: u32 = 128 * 1024;
const _: () = assert!(tidepool_wire::tube::MAX_FRAME <= MAX_MESSAGE as usize);
/// The pre-negotiated channel's stream id, the same on both sides.
const CHANNEL_ID: u16 = 0;

/// How a peer connection is made.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where its UDP sockets bind. `127.0.0.1:0` for loopback (a wildcard
    /// address binds every interface but loopback).
    pub udp: Vec<SocketAddr>,
    pub ice_check_interval: Duration,
    /// Binding requests before a candidate pair is given up.
    pub ice_binding_requests: u16,
    /// No traffic for this long: the connection is Disconnected; this long
    /// again: Failed, and the tube ends.
    pub ice_disconnected: Duration,
    pub ice_failed: Duration,
    pub ice_keepalive: Duration,
    pub socket_buffer: usize,
    pub sctp_receive_buffer: u32,
    /// SCTP's packet size: kept under 1500 with DTLS's overhead, which the
    /// receiving side's 2,000-byte buffer assumes.
    pub sctp_mtu: u32,
    /// Bytes the channel may hold unacknowledged before `send` waits.
    pub send_buffer: usize,
    /// STUN and TURN servers (a Tube's `spec.iceServers`); none: host
    /// candidates only.
    pub ice_servers: Vec<IceServer>,
}

/// One STUN or TURN server.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IceServer {
    pub urls: Vec<String>,
    pub username: String,
    pub credential: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            udp: vec![SocketAddr::from(([0, 0, 0, 0], 0))],
            ice_check_interval: Duration::from_millis(20),
            ice_binding_requests: 50,
            ice_disconnected: Duration::from_secs(3),
            ice_failed: Duration::from_secs(3),
            ice_keepalive: Duration::from_millis(500),
            socket_buffer: 4 << 20,
            sctp_receive_buffer: 4 << 20,
            sctp_mtu: 1400,
            send_buffer: 1 << 20,
            ice_servers: Vec::new(),
        }
    }
}

impl Settings {
    /// On loopback only (tests and benchmarks).
    pub fn loopback() -> Self {
        Self { udp: vec![SocketAddr::from(([127, 0, 0, 1], 0))], ..Self::default() }
    }

    fn rtc_ice_servers(&self) -> Vec<RTCIceServer> {
        let server = |s: &IceServer| RTCIceServer {
            urls: s.urls.clone(),
            username: s.username.clone(),
            credential: s.credential.clone(),
        };
        self.ice_servers.iter().map(server).collect()
    }

    fn engine(&self) -> SettingEngine {
        SettingEngineBuilder::new()
            .with_multicast_dns_mode(MulticastDnsMode::Disabled)
            .with_network_types(vec![NetworkType::Udp4, NetworkType::Udp6])
            .with_ice_connection_attempts(Some(self.ice_check_interval), Some(self.ice_binding_requests))
            .with_ice_timeouts(Some(self.ice_disconnected), Some(self.ice_failed), Some(self.ice_keepalive))
            .with_sctp_max_message_size(SctpMaxMessageSize::Bounded(MAX_MESSAGE))
            .with_sctp_max_receive_buffer_size(self.sctp_receive_buffer)
            .with_sctp_mtu(self.sctp_mtu)
            .build()
    }
}

/// Why a peer could not be made or joined.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("WebRTC: {0}")]
    Rtc(#[from] webrtc::error::Error),
    #[error("the description is not SDP: {0}")]
    BadDescription(String),
    #[error("ICE gathering did not complete in {0:?}")]
    GatheringTimedOut(Duration),
    #[error("the data channel did not open in {0:?}")]
    OpenTimedOut(Duration),
    #[error("the connection failed before its channel opened")]
    Failed,
}

/// One end of a tube's WebRTC connection.
pub struct Peer {
    connection: Arc<dyn PeerConnection>,
    channel: Arc<dyn DataChannel>,
    gathered: Arc<Notify>,
    state: watch::Receiver<RTCPeerConnectionState>,
}

/// Turns the connection's callbacks into signals. They run on the
/// connection's own task, so they only signal, never wait.
struct Events {
    gathered: Arc<Notify>,
    state: watch::Sender<RTCPeerConnectionState>,
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Events {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            self.gathered.notify_one();
        }
    }

    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.state.send_replace(state);
    }
}

const GATHERING: Duration = Duration::from_secs(5);

impl Peer {
    /// A connection with the tube's channel, not yet signalled.
    pub async fn new(settings: &Settings) -> Result<Self, PeerError> {
        let gathered = Arc::new(Notify::new());
        let (state, state_changes) = watch::channel(RTCPeerConnectionState::New);
        let events = Arc::new(Events { gathered: gathered.clone(), state });
        let runtime = Arc::new(TubeSockets::new(settings.socket_buffer, settings.sctp_mtu));
        let connection = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().with_ice_servers(settings.rtc_ice_servers()).build())
            .with_setting_engine(settings.engine())
            .with_runtime(runtime)
            .with_handler(events)
            .with_udp_addrs(settings.udp.clone())
            .with_data_channel_send_buffer_limit(settings.send_buffer)
            .build()
            .await?;
        let connection: Arc<dyn PeerConnection> = Arc::new(connection);
        let init = RTCDataChannelInit { negotiated: Some(CHANNEL_ID), ordered: true, ..Default::default() };
        let channel = match connection.create_data_channel("tube", Some(init)).await {
            Ok(channel) => channel,
            Err(e) => {
                let _ = connection.close().await;
                return Err(e.into());
            }
        };
        Ok(Self { connection, channel, gathered, state: state_changes })
    }

    /// The client's offer: SDP with every candidate.
    pub async fn offer(&self) -> Result<String, PeerError> {
        let offer = self.connection.create_offer(None).await?;
        self.local(offer).await
    }

    /// The pod's answer to `offer`.
    pub async fn answer(&self, offer: &str) -> Result<String, PeerError> {
        let offer =
            RTCSessionDescription::offer(offer.to_string()).map_err(|e| PeerError::BadDescription(e.to_string()))?;
        self.connection.set_remote_description(offer).await?;
        let answer = self.connection.create_answer(None).await?;
        self.local(answer).await
    }

    /// The client takes the pod's answer.
    pub async fn accept(&self, answer: &str) -> Result<(), PeerError> {
        let answer =
            RTCSessionDescription::answer(answer.to_string()).map_err(|e| PeerError::BadDescription(e.to_string()))?;
        Ok(self.connection.set_remote_description(answer).await?)
    }

    async fn local(&self, description: RTCSessionDescription) -> Result<String, PeerError> {
        // Registered before gathering starts, so its end is not missed.
        let gathered = self.gathered.notified();
        self.connection.set_local_description(description).await?;
        tokio::time::timeout(GATHERING, gathered).await.map_err(|_| PeerError::GatheringTimedOut(GATHERING))?;
        let local = self.connection.local_description().await.ok_or(PeerError::Failed)?;
        Ok(local.sdp)
    }

    /// Waits up to `within` for the channel to open, then bridges it to a
    /// multiplexer's queues. The bridge runs until the channel or the
    /// connection ends; the caller runs it and then [`Opened::close`]s.
    pub async fn open(self, within: Duration) -> Result<Opened, PeerError> {
        self.open_until(within, false).await
    }

    /// [`Peer::open`] for the client's end, which also waits for the pod's
    /// first message (the pod's multiplexer pings as it starts) before it
    /// lets the client speak. The client's SCTP association is up first;
    /// a frame it sent at once could reach the pod in the same packet as
    /// the last handshake chunk, before the pod's stack had opened the
    /// channel's stream, and be dropped there (on the harness, about one
    /// tube in ten lost its first `OPEN` so).
    pub async fn open_heard(self, within: Duration) -> Result<Opened, PeerError> {
        self.open_until(within, true).await
    }

    async fn open_until(self, within: Duration, heard: bool) -> Result<Opened, PeerError> {
        let mut state = self.state.clone();
        let (to_mux, incoming) = mpsc::channel(INCOMING_MESSAGES);
        let opened = async {
            loop {
                tokio::select! {
                    event = self.channel.poll() => match event {
                        // The client's end waits on for the pod's first message.
                        Some(DataChannelEvent::OnOpen) if !heard => return Ok(()),
                        // The far end opened first and has spoken (its first
                        // OPEN may come before this end's open event): the
                        // channel is open, and the message is the
                        // multiplexer's, not to be lost.
                        Some(DataChannelEvent::OnMessage(message)) => {
                            return to_mux.try_send(message.data.freeze()).map_err(|_| PeerError::Failed);
                        }
                        Some(DataChannelEvent::OnClose | DataChannelEvent::OnError) | None => return Err(PeerError::Failed),
                        Some(_) => {}
                    },
                    changed = state.changed() => {
                        let now = *state.borrow();
                        if changed.is_err() || matches!(now, RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed) {
                            return Err(PeerError::Failed);
                        }
                        if now == RTCPeerConnectionState::Connected {
                            // DTLS is up and SCTP's INIT is queued, but the
                            // connection's task sends it only when something
                            // wakes it: its next ICE tick, up to 200 ms on.
                            // Setting a threshold (to the value it has) wakes it now.
                            let _ = self.channel.set_buffered_amount_low_threshold(0).await;
                        }
                    }
                }
            }
        };
        let result = match tokio::time::timeout(within, opened).await {
            Ok(result) => result,
            Err(_) => Err(PeerError::OpenTimedOut(within)),
        };
        if let Err(e) = result {
            let _ = self.connection.close().await;
            return Err(e);
        }
        let (outgoing, from_mux) = mpsc::channel(OUTGOING_FRAMES);
        Ok(Opened { peer: self, channel: Some(Channel { incoming, outgoing }), to_mux, from_mux })
    }
}

/// A peer whose channel is open.
pub struct Opened {
    peer: Peer,
    channel: Option<Channel>,
    to_mux: mpsc::Sender<Bytes>,
    from_mux: mpsc::Receiver<Bytes>,
}

/// Why a bridge ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BridgeEnded {
    /// The multiplexer let go of its queues.
    MuxEnded,
    /// The data channel closed.
    ChannelClosed,
    /// The connection failed (the peer went away) or closed.
    ConnectionFailed,
}

impl Opened {
    /// The multiplexer's side of the bridge (once).
    pub fn take_channel(&mut self) -> Option<Channel> {
        self.channel.take()
    }

    /// Carries messages both ways until either side ends.
    pub async fn bridge(&mut self) -> BridgeEnded {
        let channel = &self.peer.channel;
        let (to_mux, from_mux) = (&self.to_mux, &mut self.from_mux);
        let mut state = self.peer.state.clone();
        let inbound = async {
            loop {
                match channel.poll().await {
                    Some(DataChannelEvent::OnMessage(message)) => {
                        if to_mux.send(message.data.freeze()).await.is_err() {
                            return BridgeEnded::MuxEnded;
                        }
                    }
                    Some(DataChannelEvent::OnClose) | None => return BridgeEnded::ChannelClosed,
                    Some(_) => {}
                }
            }
        };
        let outbound = async {
            while let Some(message) = from_mux.recv().await {
                if channel.send(BytesMut::from(message)).await.is_err() {
                    return BridgeEnded::ChannelClosed;
                }
            }
            BridgeEnded::MuxEnded
        };
        let failed = async {
            loop {
                if state.changed().await.is_err() {
                    return BridgeEnded::ConnectionFailed;
                }
                if matches!(*state.borrow(), RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed) {
                    return BridgeEnded::ConnectionFailed;
                }
            }
        };
        tokio::select! {
            ended = inbound => ended,
            ended = outbound => ended,
            ended = failed => ended,
        }
    }

    /// Closes the connection (dropping it would not: its task would run on).
    pub async fn close(&self) {
        let _ = self.peer.connection.close().await;
    }

    /// A handle that closes the connection while its bridge runs elsewhere.
    pub fn closer(&self) -> Closer {
        Closer(self.peer.connection.clone())
    }
}

/// Closes a peer connection from outside its bridge.
#[derive(Clone)]
pub struct Closer(Arc<dyn PeerConnection>);

impl Closer {
    pub async fn close(&self) {
        let _ = self.0.close().await;
    }
}

impl Peer {
    /// Closes the connection of a peer that never opened.
    pub async fn close(&self) {
        let _ = self.connection.close().await;
    }

    /// A handle that closes the connection from elsewhere, whatever becomes
    /// of this peer (its owner's guard, should the owner panic).
    pub fn closer(&self) -> Closer {
        Closer(self.connection.clone())
    }
}
