//! What a client (the `tidepool` CLI or a browser) and a session pod say to
//! each other. Shared by the pod and the CLI so the two cannot drift.
//!
//! Every route but `/health` and `/metrics` needs the session's credentials:
//! the session token (`Authorization: Bearer <token>`, or `?token=`) and the
//! binding ticket for this pod (`X-Tidepool-Binding: <ticket>`, or
//! `?binding=`). Browsers cannot set headers on a WebSocket, hence the query
//! form.

use serde::{Deserialize, Serialize};
use tidepool_crds::test_session::{ProbeResult, ProbeTarget};

/// The pod's TCP port (HTTP and WebSocket) and, with the same number, its UDP echo port.
pub const DEFAULT_PORT: u16 = 8080;

/// Liveness and readiness; no credentials.
pub const HEALTH_PATH: &str = "/health";
/// Prometheus exposition; no credentials.
pub const METRICS_PATH: &str = "/metrics";
/// GET: who serves the session ([`PodInfo`]).
pub const INFO_PATH: &str = "/api/v1/info";
/// WebSocket: latency ping/pong ([`ClientMessage`], [`ServerMessage`]).
pub const LATENCY_WS_PATH: &str = "/ws";
/// GET: endless incompressible bytes (`?seconds=`, at most [`MAX_STREAM_SECONDS`]).
pub const DOWNLOAD_PATH: &str = "/download";
/// POST: counted and discarded; answers an [`UploadReport`].
pub const UPLOAD_PATH: &str = "/upload";
/// POST: a UDP echo grant ([`UdpGrant`]) for this session.
pub const UDP_GRANT_PATH: &str = "/api/v1/udp";
/// WebSocket, one per simulated user: `/ws/household/{user}`.
pub const HOUSEHOLD_WS_PATH: &str = "/ws/household/{user}";
/// POST: the client's measured results ([`ResultsSubmission`]); the pod
/// grades them, keeps them in /metrics and forwards them to the operator.
pub const RESULTS_PATH: &str = "/api/v1/results";
/// POST: run the session's outbound probes ([`ProbeRequest`], [`ProbeResponse`]).
pub const PROBES_PATH: &str = "/api/v1/probes";

/// The longest a download or upload stream may run, in seconds.
pub const MAX_STREAM_SECONDS: u64 = 60;
/// The size of each download chunk.
pub const DOWNLOAD_CHUNK_BYTES: usize = 128 * 1024;
/// The most one upload request may carry.
pub const MAX_UPLOAD_BYTES: u64 = 512 * 1024 * 1024;
/// How often an [`UploadReport`] samples its byte count, in microseconds.
pub const UPLOAD_SAMPLE_US: u64 = 100_000;
/// The fastest latency pinging a client may ask for.
pub const MAX_PING_HZ: u32 = 100;

/// A text frame from the client on a latency or household WebSocket.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ClientMessage {
    /// Answer with a pong carrying `client_time_us` back.
    #[serde(rename_all = "camelCase")]
    Ping { seq: u64, client_time_us: u64 },
    /// End the pod, so the user can watch the session heal onto a new one.
    Terminate,
    /// Household sockets only: start the user's traffic. Until then the
    /// socket carries pings only, so the first pings give an idle baseline.
    /// `line_mbps` is the measured download capacity the bulk user adapts to.
    #[serde(rename_all = "camelCase")]
    Start { line_mbps: f64 },
}

/// A text frame from the pod on a latency or household WebSocket.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum ServerMessage {
    /// The answer to a ping: who answered, and when (pod clock, Unix µs).
    #[serde(rename_all = "camelCase")]
    Pong { seq: u64, client_time_us: u64, server_time_us: u64, pod: String, region: String, session_id: String },
    /// The pod is about to exit on the client's request.
    Terminating { pod: String },
    /// Household sockets only, every second once traffic started: what the
    /// pod sent and received on this socket since the start.
    #[serde(rename_all = "camelCase")]
    Stats { sent_bytes: u64, received_bytes: u64, elapsed_us: u64 },
    /// Something the client sent was refused.
    Error { message: String },
}

/// GET /api/v1/info.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PodInfo {
    pub pod: String,
    pub namespace: String,
    pub pool: String,
    pub region: String,
    pub session_id: String,
    pub session_name: String,
    pub profile: String,
    /// Unix seconds.
    pub expires_at: u64,
    /// The UDP echo port.
    pub udp_port: u16,
}

/// What the pod saw of one upload.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UploadReport {
    /// Bytes received.
    pub bytes: u64,
    /// From the first byte to the last, in microseconds.
    pub elapsed_us: u64,
    /// `[µs since the first byte, bytes received so far]`, every
    /// [`UPLOAD_SAMPLE_US`] and at the end: the client takes its rate from a
    /// window after warm-up, as it does for downloads.
    pub samples: Vec<(u64, u64)>,
}

/// POST /api/v1/udp: permission to use the UDP echo.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct UdpGrant {
    pub port: u16,
    /// Carried in every datagram; the pod drops datagrams without it. It is
    /// made for the address the grant was asked from (the first 8 bytes,
    /// big-endian, of an HMAC-SHA256 of the session id and that address
    /// under a secret of the pod's), so datagrams must come from that
    /// address: a datagram with a spoofed source carries a cookie that is
    /// not its source's, and is dropped.
    pub cookie: u64,
}

/// The UDP echo datagram. The pod fills in `server_time_us` and sends the
/// datagram back at the same size, so the echo never amplifies.
///
/// Layout, big-endian: magic `TPU1` | cookie u64 | seq u32 | client µs u64 |
/// server µs u64 | padding (any length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpProbe {
    pub cookie: u64,
    pub seq: u32,
    pub client_time_us: u64,
    pub server_time_us: u64,
}

pub const UDP_MAGIC: [u8; 4] = *b"TPU1";
/// The smallest valid datagram.
pub const UDP_HEADER_BYTES: usize = 32;
/// The largest datagram the echo answers.
pub const UDP_MAX_BYTES: usize = 1472;

/// Why a datagram was not a probe.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UdpError {
    #[error("datagram of {0} bytes is outside {UDP_HEADER_BYTES}..={UDP_MAX_BYTES}")]
    Size(usize),
    #[error("datagram does not start with TPU1")]
    Magic,
}

impl UdpProbe {
    /// Writes the header into the first [`UDP_HEADER_BYTES`] of `datagram`.
    pub fn write(&self, datagram: &mut [u8]) -> Result<(), UdpError> {
        if datagram.len() < UDP_HEADER_BYTES || datagram.len() > UDP_MAX_BYTES {
            return Err(UdpError::Size(datagram.len()));
        }
        datagram[0..4].copy_from_slice(&UDP_MAGIC);
        datagram[4..12].copy_from_slice(&self.cookie.to_be_bytes());
        datagram[12..16].copy_from_slice(&self.seq.to_be_bytes());
        datagram[16..24].copy_from_slice(&self.client_time_us.to_be_bytes());
        datagram[24..32].copy_from_slice(&self.server_time_us.to_be_bytes());
        Ok(())
    }

    /// Reads the header of `datagram`.
    pub fn read(datagram: &[u8]) -> Result<Self, UdpError> {
        if datagram.len() < UDP_HEADER_BYTES || datagram.len() > UDP_MAX_BYTES {
            return Err(UdpError::Size(datagram.len()));
        }
        if datagram[0..4] != UDP_MAGIC {
            return Err(UdpError::Magic);
        }
        let u64_at = |at: usize| u64::from_be_bytes(datagram[at..at + 8].try_into().unwrap_or_default());
        Ok(Self {
            cookie: u64_at(4),
            seq: u32::from_be_bytes(datagram[12..16].try_into().unwrap_or_default()),
            client_time_us: u64_at(16),
            server_time_us: u64_at(24),
        })
    }

    /// Stamps the pod's receive time into a datagram in place.
    pub fn stamp_server_time(datagram: &mut [u8], server_time_us: u64) {
        if datagram.len() >= UDP_HEADER_BYTES {
            datagram[24..32].copy_from_slice(&server_time_us.to_be_bytes());
        }
    }
}

/// The simulated members of the virtual household.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub enum HouseholdUser {
    /// 1.5 Mbit/s down, 0.75 up, constant; needs low latency.
    Gaming,
    /// 2.5 Mbit/s each way, constant.
    VideoCall,
    /// 25 Mbit/s down for 1 s in every 5 (0.1 up).
    Streaming,
    /// A greedy bulk download adapted to the line (twice the line's
    /// measured rate, at most 1000 Mbit/s), 2 Mbit/s up.
    Bulk,
}

impl HouseholdUser {
    pub const ALL: [HouseholdUser; 4] = [Self::Gaming, Self::VideoCall, Self::Streaming, Self::Bulk];

    /// The name in paths and results.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gaming => "gaming",
            Self::VideoCall => "videoCall",
            Self::Streaming => "streaming",
            Self::Bulk => "bulk",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|u| u.as_str() == text)
    }

    /// Down and up rates in Mbit/s while the user is active. `line_mbps` is
    /// the measured download capacity, which the bulk user adapts to.
    pub fn rates_mbps(self, line_mbps: f64) -> (f64, f64) {
        match self {
            Self::Gaming => (1.5, 0.75),
            Self::VideoCall => (2.5, 2.5),
            Self::Streaming => (25.0, 0.1),
            // Greedy, as a system update is: asking for more than the line
            // keeps the bottleneck's buffer as full as TCP makes it.
            Self::Bulk => ((2.0 * line_mbps).clamp(1.0, 1000.0), 2.0),
        }
    }

    /// Whether the user sends and receives at `elapsed_ms` into the test:
    /// streaming is on for the first second of every five, the rest always.
    pub fn active_at(self, elapsed_ms: u64) -> bool {
        match self {
            Self::Streaming => elapsed_ms % 5_000 < 1_000,
            _ => true,
        }
    }

    /// How long the user has been active in the first `elapsed_ms` of the
    /// test (as [`HouseholdUser::active_at`] says): its traffic so far is its
    /// rate times this.
    pub fn active_ms(self, elapsed_ms: u64) -> u64 {
        match self {
            Self::Streaming => elapsed_ms / 5_000 * 1_000 + (elapsed_ms % 5_000).min(1_000),
            _ => elapsed_ms,
        }
    }

    /// The average down rate the user asks for over a whole test.
    pub fn mean_down_mbps(self, line_mbps: f64) -> f64 {
        let (down, _) = self.rates_mbps(line_mbps);
        match self {
            Self::Streaming => down / 5.0,
            _ => down,
        }
    }
}

/// POST /api/v1/probes: run the session's probe targets once. The targets
/// must be the TestSession's own: their digest ([`probes_digest`]) is signed
/// into the session token, so a client cannot point the pod elsewhere.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProbeRequest {
    pub targets: Vec<ProbeTarget>,
    /// The escalation tier to start from (1 to 3); 1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<i32>,
}

/// The answer to a [`ProbeRequest`].
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProbeResponse {
    pub results: Vec<ProbeResult>,
    /// Each step up a tier: the tier left and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub escalations: Vec<Escalation>,
    /// For a run that started above tier 1: what still trips the rules
    /// into its start tier. Empty means the line no longer calls for that
    /// tier, so a monitor brings its next run down one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holding: Vec<String>,
}

/// One step up a tier, and why.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Escalation {
    pub from: u8,
    pub reasons: Vec<String>,
}

/// The digest of a session's probe targets, as the operator signs it into
/// the session token and the pod checks it: the hex SHA-256 of their
/// compact JSON. Empty targets give `None`.
pub fn probes_digest(targets: &[ProbeTarget]) -> Option<String> {
    tidepool_wire::token::probes_digest(&serde_json::to_vec(targets).ok()?, targets.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_probe_round_trips_and_stamps() {
        let mut datagram = [0u8; 64];
        let probe = UdpProbe { cookie: 7, seq: 42, client_time_us: 1_000, server_time_us: 0 };
        probe.write(&mut datagram).unwrap();
        UdpProbe::stamp_server_time(&mut datagram, 2_000);
        let read = UdpProbe::read(&datagram).unwrap();
        assert_eq!(read, UdpProbe { server_time_us: 2_000, ..probe });
    }

    #[test]
    fn udp_probe_refuses_short_long_and_foreign_datagrams() {
        assert_eq!(UdpProbe::read(&[0u8; 31]), Err(UdpError::Size(31)));
        assert_eq!(UdpProbe::read(&[0u8; 1473]), Err(UdpError::Size(1473)));
        assert_eq!(UdpProbe::read(&[0u8; 32]), Err(UdpError::Magic));
    }

    #[test]
    fn messages_use_the_documented_json() {
        let ping: ClientMessage = serde_json::from_str(r#"{"type":"ping","seq":1,"clientTimeUs":5}"#).unwrap();
        assert_eq!(ping, ClientMessage::Ping { seq: 1, client_time_us: 5 });
        let terminate: ClientMessage = serde_json::from_str(r#"{"type":"terminate"}"#).unwrap();
        assert_eq!(terminate, ClientMessage::Terminate);
        let pong = ServerMessage::Pong {
            seq: 1,
            client_time_us: 5,
            server_time_us: 9,
            pod: "p".into(),
            region: "r".into(),
            session_id: "s".into(),
        };
        assert_eq!(
            serde_json::to_string(&pong).unwrap(),
            r#"{"type":"pong","seq":1,"clientTimeUs":5,"serverTimeUs":9,"pod":"p","region":"r","sessionId":"s"}"#
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn client_message() -> impl Strategy<Value = ClientMessage> {
            prop_oneof![
                (any::<u64>(), any::<u64>())
                    .prop_map(|(seq, client_time_us)| ClientMessage::Ping { seq, client_time_us }),
                Just(ClientMessage::Terminate),
                // Quarters: exact in binary and in decimal, so they survive the text.
                (-4_000_000i32..4_000_000).prop_map(|q| ClientMessage::Start { line_mbps: f64::from(q) / 4.0 }),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn udp_read_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
                let _ = UdpProbe::read(&bytes);
            }

            #[test]
            fn udp_probes_of_every_valid_size_round_trip(
                cookie in any::<u64>(), seq in any::<u32>(), client in any::<u64>(), server in any::<u64>(),
                len in UDP_HEADER_BYTES..=UDP_MAX_BYTES, fill in any::<u8>(),
            ) {
                let probe = UdpProbe { cookie, seq, client_time_us: client, server_time_us: server };
                let mut datagram = vec![fill; len];
                probe.write(&mut datagram).unwrap();
                prop_assert_eq!(UdpProbe::read(&datagram), Ok(probe));
            }

            #[test]
            fn udp_datagrams_of_the_wrong_size_or_magic_are_refused(
                bytes in proptest::collection::vec(any::<u8>(), 0..1600),
            ) {
                let read = UdpProbe::read(&bytes);
                if !(UDP_HEADER_BYTES..=UDP_MAX_BYTES).contains(&bytes.len()) {
                    prop_assert_eq!(read, Err(UdpError::Size(bytes.len())));
                } else if bytes[..4] != UDP_MAGIC {
                    prop_assert_eq!(read, Err(UdpError::Magic));
                } else {
                    prop_assert!(read.is_ok());
                }
            }

            #[test]
            fn client_messages_never_panic(text in "\\PC{0,200}") {
                let _ = serde_json::from_str::<ClientMessage>(&text);
            }

            #[test]
            fn client_messages_round_trip(message in client_message()) {
                let text = serde_json::to_string(&message).unwrap();
                prop_assert_eq!(serde_json::from_str::<ClientMessage>(&text).unwrap(), message);
            }

            #[test]
            fn unknown_message_types_are_refused(kind in "[a-zA-Z]{1,12}", seq in any::<u64>()) {
                prop_assume!(!["ping", "terminate", "start"].contains(&kind.as_str()));
                let text = format!(r#"{{"type":"{kind}","seq":{seq},"clientTimeUs":1}}"#);
                prop_assert!(serde_json::from_str::<ClientMessage>(&text).is_err());
            }

            #[test]
            fn pings_need_their_numbers(seq in any::<i64>(), text in "[a-z]{0,5}") {
                let negative = format!(r#"{{"type":"ping","seq":{},"clientTimeUs":1}}"#, seq.min(-1));
                prop_assert!(serde_json::from_str::<ClientMessage>(&negative).is_err());
                let string = format!(r#"{{"type":"ping","seq":"{text}","clientTimeUs":1}}"#);
                prop_assert!(serde_json::from_str::<ClientMessage>(&string).is_err());
                let missing = serde_json::from_str::<ClientMessage>(r#"{"type":"ping","seq":1}"#);
                prop_assert!(missing.is_err());
            }
        }
    }

    #[test]
    fn household_profiles_follow_the_reference() {
        assert_eq!(HouseholdUser::Gaming.rates_mbps(100.0), (1.5, 0.75));
        assert_eq!(HouseholdUser::VideoCall.rates_mbps(100.0), (2.5, 2.5));
        assert_eq!(HouseholdUser::Bulk.rates_mbps(20.0), (40.0, 2.0));
        assert_eq!(HouseholdUser::Bulk.rates_mbps(900.0), (1000.0, 2.0));
        assert!(HouseholdUser::Streaming.active_at(999) && !HouseholdUser::Streaming.active_at(1_000));
        assert!(HouseholdUser::Streaming.active_at(5_000));
        assert_eq!(HouseholdUser::Streaming.mean_down_mbps(100.0), 5.0);
        assert_eq!(HouseholdUser::parse("videoCall"), Some(HouseholdUser::VideoCall));
    }

    #[test]
    fn active_time_grows_exactly_while_the_user_is_active() {
        for user in HouseholdUser::ALL {
            for ms in 0..12_000 {
                let grew = user.active_ms(ms + 1) - user.active_ms(ms);
                assert_eq!(grew == 1, user.active_at(ms), "{user:?} at {ms} ms");
            }
        }
        assert_eq!(HouseholdUser::Streaming.active_ms(7_500), 2_000);
        assert_eq!(HouseholdUser::Gaming.active_ms(7_500), 7_500);
    }
}
