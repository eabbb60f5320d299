//! What the probes may spend: timeouts, counts, byte caps, and the CAs they trust.

use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use tidepool_protocol::egress::EgressPolicy;

use super::budget::TrafficBudget;
use super::escalate::Thresholds;

/// The most a tier-2 bandwidth sample may download, in bytes.
pub const MAX_SAMPLE_BYTES: u64 = 100_000_000;
/// The most hops a traceroute goes.
pub const MAX_HOPS: u8 = 30;

/// How the probes run. [`Default`] gives the documented defaults.
#[derive(Clone, Debug)]
pub struct ProbeSettings {
    /// Bound on each probe; for a download, on the time to its first byte.
    pub timeout: Duration,
    /// Echo requests per ICMP probe.
    pub ping_count: u16,
    /// Time between ICMP echo requests.
    pub ping_interval: Duration,
    /// How long to wait for an answer once the last request of a series is
    /// out, and for each traceroute hop.
    pub reply_wait: Duration,
    /// The most hops a traceroute goes (at most [`MAX_HOPS`]).
    pub max_hops: u8,
    /// The most an HTTP probe reads of a response body, in bytes.
    pub max_body_bytes: u64,
    /// Datagrams in a tier-2 UDP jitter series.
    pub jitter_count: u16,
    /// Time between the datagrams of a jitter series.
    pub jitter_interval: Duration,
    /// Tier 2's bandwidth sample: at most this many bytes (at most
    /// [`MAX_SAMPLE_BYTES`]) ...
    pub sample_bytes: u64,
    /// ... or this long after the first byte, whichever comes first.
    pub sample_time: Duration,
    /// Tier 3's long download: at most this many bytes ...
    pub long_bytes: u64,
    /// ... or this long after the first byte.
    pub long_time: Duration,
    /// The cookie carried in UDP probes; Tidepool's own UDP echo answers only
    /// datagrams with the cookie of a grant ([`tidepool_protocol::pod::UdpGrant`]).
    pub udp_cookie: u64,
    /// How many probes of a tier run at once (downloads always run alone).
    pub parallel: usize,
    /// When to escalate.
    pub thresholds: Thresholds,
    /// The CAs that TLS and HTTPS probes trust: Mozilla's (webpki-roots) by default.
    pub roots: Arc<RootCertStore>,
    /// What the probes may reach: by default the public internet only.
    pub egress: Arc<EgressPolicy>,
    /// The bytes the probes may move, shared by every run that holds it:
    /// unlimited by default; the pod gives each session's runs its cap.
    pub budget: Arc<TrafficBudget>,
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            ping_count: 4,
            ping_interval: Duration::from_millis(200),
            reply_wait: Duration::from_secs(1),
            max_hops: MAX_HOPS,
            max_body_bytes: 10_000_000,
            jitter_count: 20,
            jitter_interval: Duration::from_millis(20),
            sample_bytes: 10_000_000,
            sample_time: Duration::from_secs(10),
            long_bytes: 1_000_000_000,
            long_time: Duration::from_secs(30),
            udp_cookie: 0,
            parallel: 8,
            thresholds: Thresholds::default(),
            roots: Arc::new(RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }),
            egress: Arc::new(EgressPolicy::default()),
            budget: Arc::new(TrafficBudget::unlimited()),
        }
    }
}

impl ProbeSettings {
    /// Trusts one more CA (a DER certificate), for private services and tests.
    pub fn trust(&mut self, ca: CertificateDer<'static>) -> Result<(), rustls::Error> {
        Arc::make_mut(&mut self.roots).add(ca)
    }

    pub(crate) fn sample_bytes(&self) -> u64 {
        self.sample_bytes.min(MAX_SAMPLE_BYTES)
    }

    pub(crate) fn max_hops(&self) -> u8 {
        self.max_hops.clamp(1, MAX_HOPS)
    }
}
