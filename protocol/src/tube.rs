//! Tubes: what a client says to the operator's API about a tube, what the
//! operator says to the session pod that terminates it, and the pure rule
//! of what a tube may dial ([`TubePolicy`]).
//!
//! The operator is the only one who talks to a pod about tubes. Each call
//! carries a tube ticket ([`tidepool_wire::token::TubeClaims`]), signed
//! with the pool's key, which names the tube, the pod, the kind, the
//! target and the allowlist: the pod takes all of those from the ticket,
//! never from a body, so only the Tube's spec and its pool decide them.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use tidepool_crds::tube::{ConversationType, IceServer, Target, TubeState};

use crate::egress::{EgressPolicy, EgressRule, Refused};

/// The header that carries the tube ticket on the pod's tube routes.
pub const TUBE_TICKET_HEADER: &str = "x-tidepool-tube";
/// The pod's route: POST a [`TubeOffer`], get a [`TubeAnswer`].
pub const POD_TUBES_PATH: &str = "/api/v1/tubes";
/// The pod's route for one tube, by UID: GET a [`TubeReport`], DELETE to close it.
pub const POD_TUBE_PATH: &str = "/api/v1/tubes/{tube}";
/// The operator's route: POST a [`CreateTube`], get a [`TubeView`] once
/// the pod answered.
pub const TUBES_API_PATH: &str = "/api/v1/tubes";
/// The operator's route for one Tube, by name: GET its [`TubeView`], DELETE it.
pub const TUBE_API_PATH: &str = "/api/v1/tubes/{name}";
/// The most bytes of SDP either side takes (the CRD's field holds its
/// base64, 64 KiB); a description with every candidate is a few KiB.
pub const MAX_SDP_BYTES: usize = 48 * 1024;
/// The largest body of a request that carries an offer: the SDP in base64,
/// with room for the request's other fields.
pub const OFFER_BODY_LIMIT: usize = MAX_SDP_BYTES.div_ceil(3) * 4 + 16 * 1024;

/// The operator's request to the pod: terminate this tube. The pod's peer
/// gathers host candidates only: STUN or TURN servers named by a client
/// would have the pod send wherever that client says.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TubeOffer {
    /// The client's SDP offer, base64 (as the Tube's spec holds it).
    pub offer: String,
}

/// The pod's answer, base64 (as the Tube's status holds it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TubeAnswer {
    pub answer: String,
}

/// Where a tube is, as its pod sees it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodTubeState {
    /// Answered; the data channel is not open yet.
    Connecting,
    Connected,
    /// Ended; [`TubeReport::ended`] says why.
    Ended,
}

/// Why a tube ended. The names are the Tube's `status.endReason`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndReason {
    /// Nothing carried for the tube's idle time.
    Idle,
    /// The Tube was deleted, or the operator closed it.
    Deleted,
    /// The client's peer went away (ICE or DTLS failed, or it closed).
    PeerGone,
    /// The data channel did not open in time after the answer.
    NotConnected,
    /// The client broke the tube's protocol.
    ProtocolError,
    /// The pod is shutting down.
    PodShutdown,
    /// The tube's session ended (its TTL, or it was deleted).
    SessionEnded,
    /// The pod that terminated the tube went away.
    PodGone,
    /// The pool or the pod would not take the tube.
    Refused,
    /// The client's offer could not be answered.
    BadOffer,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "Idle",
            Self::Deleted => "Deleted",
            Self::PeerGone => "PeerGone",
            Self::NotConnected => "NotConnected",
            Self::ProtocolError => "ProtocolError",
            Self::PodShutdown => "PodShutdown",
            Self::SessionEnded => "SessionEnded",
            Self::PodGone => "PodGone",
            Self::Refused => "Refused",
            Self::BadOffer => "BadOffer",
        }
    }

    /// Whether the tube ended as it should (Closed), not by a fault (Failed).
    pub fn is_normal(self) -> bool {
        matches!(self, Self::Idle | Self::Deleted | Self::SessionEnded)
    }
}

/// What the pod reports of one tube.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TubeReport {
    pub state: PodTubeState,
    /// Payload bytes sent to the client, and received from it.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// The last ping's round trip over the channel, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    pub open_connections: u32,
    /// Why it ended, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<EndReason>,
    /// The end's detail, for the Tube's condition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A client's request to the operator's API for a tube.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTube {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// A pool whose next free pod terminates the tube...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// ...or the session whose pod does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    pub conversation_type: ConversationType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    /// The client's SDP offer, base64.
    pub offer: String,
    /// A pool tube's session TTL (the pool's default when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ice_servers: Vec<IceServer>,
}

/// What the operator's API shows of a Tube.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TubeView {
    pub name: String,
    pub namespace: String,
    pub state: TubeState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The pod's SDP answer, base64, once it has answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    #[serde(default)]
    pub bytes_sent: i64,
    #[serde(default)]
    pub bytes_received: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<f64>,
    #[serde(default)]
    pub open_connections: i32,
    /// Why it ended, or what it waits for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Why a description was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SdpError {
    #[error("the description is not base64")]
    NotBase64,
    #[error("the description is {0} bytes; at most {MAX_SDP_BYTES} are taken")]
    TooLarge(usize),
    #[error("the description is not UTF-8 text")]
    NotText,
    #[error("the description is not SDP (it must begin with `v=0`)")]
    NotSdp,
}

/// SDP as the Tube carries it.
pub fn encode_sdp(sdp: &str) -> String {
    B64.encode(sdp.as_bytes())
}

/// SDP from the Tube's base64, checked for size and form before any
/// WebRTC code sees it.
pub fn decode_sdp(text: &str) -> Result<String, SdpError> {
    if text.len() > MAX_SDP_BYTES.div_ceil(3) * 4 {
        return Err(SdpError::TooLarge(text.len() / 4 * 3));
    }
    let bytes = B64.decode(text.trim()).map_err(|_| SdpError::NotBase64)?;
    if bytes.len() > MAX_SDP_BYTES {
        return Err(SdpError::TooLarge(bytes.len()));
    }
    let sdp = String::from_utf8(bytes).map_err(|_| SdpError::NotText)?;
    if !sdp.starts_with("v=0") {
        return Err(SdpError::NotSdp);
    }
    Ok(sdp)
}

/// A tube's kind as its ticket names it.
pub const KIND_TUNNEL: &str = "tunnel";
pub const KIND_SOCKS5: &str = "socks5";

/// `host:port` as a ticket carries a target (IPv6 in brackets).
pub fn target_text(target: &Target) -> String {
    if target.host.contains(':') {
        format!("[{}]:{}", target.host, target.port)
    } else {
        format!("{}:{}", target.host, target.port)
    }
}

/// Splits `host:port` (IPv6 in brackets, which are dropped).
pub fn split_target(text: &str) -> Option<(String, u16)> {
    let (host, port) = text.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!host.is_empty()).then(|| (host.to_string(), port))
}

/// Why a ticket's tube cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("unknown tube kind {0:?}")]
    Kind(String),
    #[error("a tunnel needs a target of the form host:port")]
    Target,
    #[error("the allowlist is empty: the pool allows tubes nowhere")]
    NoAllowlist,
    #[error("the allowlist: {0}")]
    Rules(String),
}

/// What one tube may dial: its pool's allowlist, and for a tunnel only its
/// one target. Nothing is allowed by default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TubePolicy {
    rules: EgressPolicy,
    /// A tunnel's only target (host lowercased, without a trailing dot).
    only: Option<(String, u16)>,
}

impl TubePolicy {
    /// From a ticket's kind, target and rules.
    pub fn new(kind: &str, target: Option<&str>, allow: &[EgressRule]) -> Result<Self, TicketError> {
        if allow.is_empty() {
            return Err(TicketError::NoAllowlist);
        }
        let rules = EgressPolicy::new(allow, Vec::new()).map_err(|e| TicketError::Rules(e.to_string()))?;
        let only = match kind {
            KIND_TUNNEL => {
                let (host, port) = target.and_then(split_target).ok_or(TicketError::Target)?;
                Some((normal_host(&host), port))
            }
            KIND_SOCKS5 => None,
            other => return Err(TicketError::Kind(other.chars().take(16).collect())),
        };
        Ok(Self { rules, only })
    }

    /// Whether `host:port` may be asked for at all, before resolution.
    pub fn allows_name(&self, host: &str, port: u16) -> bool {
        if let Some((only, only_port)) = &self.only
            && (normal_host(host) != *only || port != *only_port)
        {
            return false;
        }
        self.rules.lists_name(host, port)
    }

    /// Whether an address `host` resolved to may be dialled.
    pub fn check_address(&self, host: &str, address: SocketAddr) -> Result<(), Refused> {
        self.rules.check_listed(host, address.ip(), address.port())
    }
}

fn normal_host(host: &str) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(cidr: Option<&str>, host: Option<&str>, ports: &[i32]) -> EgressRule {
        EgressRule { cidr: cidr.map(Into::into), host: host.map(Into::into), ports: ports.to_vec() }
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn a_tunnel_dials_only_its_target_and_only_if_listed() {
        let allow = [rule(None, Some("db.default.svc"), &[5432]), rule(Some("127.0.0.1/32"), None, &[])];
        let tunnel = TubePolicy::new(KIND_TUNNEL, Some("DB.default.svc.:5432"), &allow).unwrap();
        assert!(tunnel.allows_name("db.default.svc", 5432));
        assert!(!tunnel.allows_name("db.default.svc", 5433), "another port");
        assert!(!tunnel.allows_name("127.0.0.1", 5432), "another host, though listed");
        assert_eq!(tunnel.check_address("db.default.svc", addr("10.96.0.5:5432")), Ok(()));
        // A listed target whose rule does not cover the port is refused after all.
        let unlisted = TubePolicy::new(KIND_TUNNEL, Some("example.org:443"), &allow).unwrap();
        assert!(!unlisted.allows_name("example.org", 22));
        assert!(unlisted.check_address("example.org", addr("93.184.216.34:443")).is_err());
    }

    #[test]
    fn socks5_dials_whatever_the_allowlist_lists() {
        let allow = [rule(Some("127.0.0.1/32"), None, &[7000, 7001])];
        let socks = TubePolicy::new(KIND_SOCKS5, None, &allow).unwrap();
        assert!(socks.allows_name("127.0.0.1", 7000) && socks.allows_name("localhost", 7001));
        assert!(!socks.allows_name("127.0.0.1", 22));
        assert_eq!(socks.check_address("localhost", addr("127.0.0.1:7000")), Ok(()));
        assert!(socks.check_address("localhost", addr("[::1]:7000")).is_err(), "not listed");
    }

    #[test]
    fn tickets_that_cannot_be_served_say_why() {
        let allow = [rule(Some("127.0.0.1/32"), None, &[])];
        assert_eq!(TubePolicy::new(KIND_SOCKS5, None, &[]), Err(TicketError::NoAllowlist));
        assert_eq!(TubePolicy::new(KIND_TUNNEL, None, &allow), Err(TicketError::Target));
        assert_eq!(TubePolicy::new(KIND_TUNNEL, Some("host"), &allow), Err(TicketError::Target));
        assert_eq!(TubePolicy::new(KIND_TUNNEL, Some("host:0"), &allow), Err(TicketError::Target));
        assert!(matches!(TubePolicy::new("udp", None, &allow), Err(TicketError::Kind(_))));
        let bad = [rule(Some("300.0.0.0/8"), None, &[])];
        assert!(matches!(TubePolicy::new(KIND_SOCKS5, None, &bad), Err(TicketError::Rules(_))));
    }

    #[test]
    fn targets_split_and_join_with_ipv6_in_brackets() {
        assert_eq!(split_target("db:5432"), Some(("db".into(), 5432)));
        assert_eq!(split_target("[::1]:80"), Some(("::1".into(), 80)));
        assert_eq!(split_target(":80"), None);
        assert_eq!(split_target("db:x"), None);
        let v6 = Target { host: "::1".into(), port: 80 };
        assert_eq!(target_text(&v6), "[::1]:80");
        assert_eq!(target_text(&Target { host: "db".into(), port: 1 }), "db:1");
    }

    #[test]
    fn descriptions_are_checked_before_webrtc_sees_them() {
        let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\n";
        assert_eq!(decode_sdp(&encode_sdp(sdp)).as_deref(), Ok(sdp));
        assert_eq!(decode_sdp("***"), Err(SdpError::NotBase64));
        assert_eq!(decode_sdp(&encode_sdp("hello")), Err(SdpError::NotSdp));
        assert_eq!(decode_sdp(&B64.encode([0xff, 0xfe, 0x00])), Err(SdpError::NotText));
        let huge = encode_sdp(&format!("v=0\r\n{}", "a".repeat(MAX_SDP_BYTES)));
        assert!(matches!(decode_sdp(&huge), Err(SdpError::TooLarge(_))));
    }

    #[test]
    fn end_reasons_say_whether_the_tube_failed() {
        assert!(EndReason::Idle.is_normal() && EndReason::Deleted.is_normal() && EndReason::SessionEnded.is_normal());
        for failed in [EndReason::PeerGone, EndReason::PodGone, EndReason::Refused, EndReason::BadOffer] {
            assert!(!failed.is_normal(), "{failed:?}");
        }
        assert_eq!(serde_json::to_string(&EndReason::PodGone).unwrap(), "\"PodGone\"");
        assert_eq!(EndReason::NotConnected.as_str(), "NotConnected");
    }
}
