//! A probe's outcome: the CRD's [`ProbeResult`] and the facts it has no field for.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::Duration;

use tidepool_crds::test_session::{ProbeKind, ProbeResult};

/// The CRD's limit on `protocol`, in bytes.
const PROTOCOL_MAX: usize = 32;
/// The CRD's limit on `error`, in bytes.
const ERROR_MAX: usize = 1024;

/// One probe's result, with what [`ProbeResult`] has no field for.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeOutcome {
    /// What goes into the TestSession's status (see [`ProbeOutcome::into_result`]).
    pub result: ProbeResult,
    pub facts: Facts,
}

/// What a probe found beyond its timings.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Facts {
    /// dns: the addresses the name resolved to.
    pub addresses: Vec<IpAddr>,
    /// icmp, udp and the UDP jitter series: round trips and loss.
    pub rtt: Option<RttStats>,
    /// icmp: the kind of socket the pings went out on.
    pub icmp_socket: Option<IcmpSocket>,
    /// traceroute: the hops, up to the destination when it was reached.
    pub hops: Vec<Hop>,
    /// tls and https: days until the peer's certificate expires (negative once it has).
    pub cert_days_left: Option<f64>,
    /// http: the response status.
    pub status: Option<u16>,
    /// http: the body was cut off at this many bytes.
    pub capped_at: Option<u64>,
    /// The bandwidth sample and the long download: what came and how fast.
    pub download: Option<Download>,
    /// ssh: what the server said of itself.
    pub ssh: Option<SshFacts>,
    /// The egress policy refused every address of the target: the reason's
    /// metric label (`loopback`, `private`, `cluster`, ...).
    pub egress_refused: Option<&'static str>,
}

/// Round-trip statistics of a series, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RttStats {
    pub sent: u32,
    pub received: u32,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub max_ms: f64,
    /// The mean change between consecutive round trips.
    pub jitter_ms: f64,
}

impl RttStats {
    /// From the round trips of the replies, in the order their requests went out.
    pub fn new(sent: u32, rtts_ms: &[f64]) -> Self {
        let received = u32::try_from(rtts_ms.len()).unwrap_or(u32::MAX).min(sent);
        if rtts_ms.is_empty() {
            return Self { sent, received, ..Self::default() };
        }
        let count = rtts_ms.len() as f64;
        let steps: f64 = rtts_ms.windows(2).map(|pair| (pair[1] - pair[0]).abs()).sum();
        Self {
            sent,
            received,
            min_ms: rtts_ms.iter().copied().fold(f64::INFINITY, f64::min),
            mean_ms: rtts_ms.iter().sum::<f64>() / count,
            max_ms: rtts_ms.iter().copied().fold(0.0, f64::max),
            jitter_ms: if rtts_ms.len() < 2 { 0.0 } else { steps / (count - 1.0) },
        }
    }

    /// Lost requests, percent.
    pub fn loss_percent(&self) -> f64 {
        if self.sent == 0 { 0.0 } else { 100.0 * f64::from(self.sent - self.received) / f64::from(self.sent) }
    }
}

/// What an SSH server said of itself, as far as the probe got.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SshFacts {
    /// Its version line, for example `SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10`.
    pub banner: Option<String>,
    /// The key exchange agreed on.
    pub kex: Option<String>,
    /// The type of the host key it answered with.
    pub host_key: Option<String>,
}

/// The kind of socket ICMP echo went out on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpSocket {
    /// `SOCK_DGRAM`/`IPPROTO_ICMP`: allowed by `net.ipv4.ping_group_range`.
    Datagram,
    /// `SOCK_RAW`: needs `CAP_NET_RAW`.
    Raw,
}

/// One traceroute hop.
#[derive(Clone, Debug, PartialEq)]
pub struct Hop {
    pub ttl: u8,
    /// Who answered; `None` when nothing did in time.
    pub addr: Option<IpAddr>,
    pub rtt_ms: Option<f64>,
}

/// A download's size and rate.
#[derive(Clone, Debug, PartialEq)]
pub struct Download {
    /// Body bytes received.
    pub bytes: u64,
    /// From the first byte to the last.
    pub seconds: f64,
}

impl Download {
    /// Megabits per second.
    pub fn mbps(&self) -> f64 {
        if self.seconds > 0.0 { self.bytes as f64 * 8.0 / self.seconds / 1e6 } else { 0.0 }
    }
}

impl ProbeOutcome {
    /// An outcome that has not succeeded (yet): `ok` false, tier 1, nothing measured.
    pub(crate) fn new(kind: ProbeKind, target: String) -> Self {
        let result =
            ProbeResult { kind, target, ok: false, tier: 1, timings: None, protocol: None, error: None, detail: None };
        Self { result, facts: Facts::default() }
    }

    pub(crate) fn failed(kind: ProbeKind, target: String, error: impl Into<String>) -> Self {
        Self::new(kind, target).fail(error)
    }

    pub(crate) fn fail(mut self, error: impl Into<String>) -> Self {
        self.result.ok = false;
        self.result.error = Some(error.into());
        self
    }

    /// The result for the TestSession's status: the facts' one-line summary
    /// goes into `detail`, the failure (if any) into `error`; `protocol`,
    /// `error` and `detail` are cut to the CRD's limits.
    pub fn into_result(self) -> ProbeResult {
        let mut result = self.result;
        let summary = self.facts.summary();
        result.detail = summary.map(|text| truncate(text, ERROR_MAX));
        result.error = result.error.map(|text| truncate(text, ERROR_MAX));
        result.protocol = result.protocol.map(|text| truncate(text, PROTOCOL_MAX));
        result
    }
}

impl Facts {
    /// One line of what was found, or `None` when there is nothing to add to the timings.
    pub fn summary(&self) -> Option<String> {
        let mut parts = Vec::new();
        if !self.addresses.is_empty() {
            let list: Vec<String> = self.addresses.iter().map(IpAddr::to_string).collect();
            parts.push(format!("addresses {}", list.join(", ")));
        }
        if let Some(rtt) = &self.rtt {
            let mut text = format!("{}/{} replies, {:.0}% loss", rtt.received, rtt.sent, rtt.loss_percent());
            if rtt.received > 0 {
                let (min, mean, max, jitter) = (rtt.min_ms, rtt.mean_ms, rtt.max_ms, rtt.jitter_ms);
                let _ = write!(text, ", rtt min/mean/max {min:.3}/{mean:.3}/{max:.3} ms, jitter {jitter:.3} ms");
            }
            match self.icmp_socket {
                Some(IcmpSocket::Datagram) => text.push_str(", datagram socket"),
                Some(IcmpSocket::Raw) => text.push_str(", raw socket"),
                None => {}
            }
            parts.push(text);
        }
        if !self.hops.is_empty() {
            let hops: Vec<String> = self.hops.iter().map(Hop::to_string).collect();
            parts.push(format!("{} hops: {}", self.hops.len(), hops.join(", ")));
        }
        if let Some(days) = self.cert_days_left {
            parts.push(if days < 0.0 {
                format!("certificate expired {:.1} days ago", -days)
            } else {
                format!("certificate expires in {days:.1} days")
            });
        }
        if let Some(ssh) = &self.ssh {
            let parts_of = [("banner", &ssh.banner), ("kex", &ssh.kex), ("host key", &ssh.host_key)];
            let said: Vec<String> =
                parts_of.iter().filter_map(|(name, value)| Some(format!("{name} {}", value.as_ref()?))).collect();
            parts.push(said.join(", "));
        }
        if let Some(bytes) = self.capped_at {
            parts.push(format!("body cut off at {bytes} bytes"));
        }
        if let Some(download) = &self.download {
            let (bytes, seconds, mbps) = (download.bytes, download.seconds, download.mbps());
            parts.push(format!("{bytes} bytes in {seconds:.3} s, {mbps:.1} Mbit/s"));
        }
        (!parts.is_empty()).then(|| parts.join("; "))
    }
}

impl std::fmt::Display for Hop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.addr, self.rtt_ms) {
            (Some(addr), Some(rtt)) => write!(f, "{} {addr} {rtt:.3} ms", self.ttl),
            (Some(addr), None) => write!(f, "{} {addr}", self.ttl),
            (None, _) => write!(f, "{} *", self.ttl),
        }
    }
}

/// Milliseconds, to the microsecond.
pub(crate) fn ms(duration: Duration) -> f64 {
    duration.as_micros() as f64 / 1000.0
}

/// Cuts `text` to at most `max` bytes, on a character boundary, marking the cut.
fn truncate(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_a_series() {
        let stats = RttStats::new(4, &[10.0, 14.0, 12.0]);
        assert_eq!((stats.sent, stats.received), (4, 3));
        assert_eq!((stats.min_ms, stats.max_ms), (10.0, 14.0));
        assert_eq!(stats.mean_ms, 12.0);
        assert_eq!(stats.jitter_ms, 3.0);
        assert_eq!(stats.loss_percent(), 25.0);
        let lost = RttStats::new(4, &[]);
        assert_eq!((lost.received, lost.loss_percent(), lost.jitter_ms), (0, 100.0, 0.0));
        assert_eq!(RttStats::new(0, &[]).loss_percent(), 0.0);
    }

    #[test]
    fn milliseconds_keep_microseconds() {
        assert_eq!(ms(Duration::from_micros(1_234_567)), 1234.567);
        assert_eq!(ms(Duration::from_nanos(999)), 0.0);
    }

    #[test]
    fn download_rate() {
        assert_eq!(Download { bytes: 1_250_000, seconds: 1.0 }.mbps(), 10.0);
        assert_eq!(Download { bytes: 5, seconds: 0.0 }.mbps(), 0.0);
    }

    #[test]
    fn facts_go_into_error_within_the_crd_limits() {
        let mut outcome = ProbeOutcome::new(ProbeKind::Traceroute, "host".into());
        outcome.result.ok = true;
        outcome.facts.hops = vec![
            Hop { ttl: 1, addr: Some("198.18.1.1".parse().unwrap()), rtt_ms: Some(0.1234) },
            Hop { ttl: 2, addr: None, rtt_ms: None },
        ];
        let result = outcome.clone().into_result();
        assert_eq!(result.detail.as_deref(), Some("2 hops: 1 198.18.1.1 0.123 ms, 2 *"));
        assert_eq!(result.error, None);

        let failed = outcome.fail("no answer from 198.18.2.2 within 2 hops").into_result();
        assert_eq!(failed.error.as_deref(), Some("no answer from 198.18.2.2 within 2 hops"));
        assert_eq!(failed.detail.as_deref(), Some("2 hops: 1 198.18.1.1 0.123 ms, 2 *"));

        let mut long = ProbeOutcome::failed(ProbeKind::Http, "u".into(), "é".repeat(600));
        long.result.protocol = Some("p".repeat(40));
        let result = long.into_result();
        assert!(result.error.as_ref().unwrap().len() <= ERROR_MAX);
        assert!(result.error.unwrap().ends_with('…'));
        assert_eq!(result.protocol.unwrap().len(), PROTOCOL_MAX);
    }

    #[test]
    fn nothing_to_summarize_leaves_error_empty() {
        let mut outcome = ProbeOutcome::new(ProbeKind::Tcp, "h:1".into());
        outcome.result.ok = true;
        let result = outcome.into_result();
        assert_eq!((result.error, result.detail), (None, None));
    }

    #[test]
    fn summary_of_pings_and_certificates() {
        let facts = Facts {
            rtt: Some(RttStats::new(4, &[1.0, 2.0, 1.0, 2.0])),
            icmp_socket: Some(IcmpSocket::Raw),
            cert_days_left: Some(-2.5),
            ..Facts::default()
        };
        assert_eq!(
            facts.summary().unwrap(),
            "4/4 replies, 0% loss, rtt min/mean/max 1.000/1.500/2.000 ms, jitter 1.000 ms, raw socket; \
             certificate expired 2.5 days ago"
        );
    }
}
