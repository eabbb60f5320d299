//! ICMP echo (ping), IPv4 and IPv6.
//!
//! First an ICMP datagram socket (`SOCK_DGRAM`, allowed to the groups in
//! `net.ipv4.ping_group_range`; the kernel fills in the identifier and
//! checksum and hands us only our replies), else a raw socket (needs
//! `CAP_NET_RAW`; we filter the replies by identifier and source ourselves).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use socket2::{Domain, Protocol, Socket, Type};
use tidepool_crds::test_session::{ProbeKind, ProbeTimings};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::Context;
use super::budget::TrafficBudget;
use super::net::{self, Deadline};
use super::outcome::{IcmpSocket, ProbeOutcome, ms};
use super::series::{Echo, series};

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;
/// The header, then our payload.
const PAYLOAD: &[u8; 56] = b"tidepool probe: ICMP echo, 56 bytes like ping's default.";
const PING_GROUP_RANGE: &str = "/proc/sys/net/ipv4/ping_group_range";

/// An echo request: type, code, checksum, identifier, sequence, payload.
/// The checksum is ours for IPv4; for ICMPv6 the kernel computes it.
pub(crate) fn echo_request(v6: bool, id: u16, seq: u16) -> Vec<u8> {
    let mut packet = Vec::with_capacity(8 + PAYLOAD.len());
    packet.extend([if v6 { ECHO_REQUEST_V6 } else { ECHO_REQUEST_V4 }, 0, 0, 0]);
    packet.extend(id.to_be_bytes());
    packet.extend(seq.to_be_bytes());
    packet.extend(PAYLOAD);
    if !v6 {
        let sum = checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    packet
}

/// The Internet checksum (RFC 1071).
pub(crate) fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 =
        data.chunks(2).map(|pair| u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The sequence number of an echo reply to us, or `None` for any other
/// packet. A raw IPv4 socket hands us the IP header too; `id` is checked
/// where the kernel did not already (raw sockets).
pub(crate) fn parse_reply(packet: &[u8], v6: bool, has_ip_header: bool, id: Option<u16>) -> Option<u16> {
    let icmp = if has_ip_header { packet.get(usize::from(packet.first()? & 0x0f) * 4..)? } else { packet };
    let reply = if v6 { ECHO_REPLY_V6 } else { ECHO_REPLY_V4 };
    if icmp.len() < 8 || icmp[0] != reply || icmp[1] != 0 {
        return None;
    }
    if id.is_some_and(|id| id != u16::from_be_bytes([icmp[4], icmp[5]])) {
        return None;
    }
    Some(u16::from_be_bytes([icmp[6], icmp[7]]))
}

/// Why no ICMP socket could be opened, saying which permission is missing.
pub(crate) fn open_error(datagram: &io::Error, raw: &io::Error, gid: u32, ping_group_range: Option<&str>) -> String {
    let denied = |error: &io::Error| matches!(error.raw_os_error(), Some(libc::EACCES | libc::EPERM));
    if denied(datagram) && denied(raw) {
        let range = ping_group_range.map_or_else(|| "unreadable".to_owned(), |range| format!("\"{range}\""));
        format!(
            "ICMP is not permitted: an ICMP datagram socket needs net.ipv4.ping_group_range to cover \
             the process's group {gid} (it is {range}), a raw socket needs CAP_NET_RAW"
        )
    } else {
        format!("cannot open an ICMP socket: datagram socket: {datagram}; raw socket: {raw}")
    }
}

/// An ICMP socket for the address family, the datagram kind if permitted.
fn open(v6: bool) -> Result<(Socket, IcmpSocket), String> {
    let (domain, protocol) = if v6 { (Domain::IPV6, Protocol::ICMPV6) } else { (Domain::IPV4, Protocol::ICMPV4) };
    let datagram = match Socket::new(domain, Type::DGRAM, Some(protocol)) {
        Ok(socket) => return Ok((socket, IcmpSocket::Datagram)),
        Err(error) => error,
    };
    match Socket::new(domain, Type::RAW, Some(protocol)) {
        Ok(socket) => Ok((socket, IcmpSocket::Raw)),
        Err(raw) => {
            // SAFETY: getegid has no preconditions and cannot fail.
            let gid = unsafe { libc::getegid() };
            let range = std::fs::read_to_string(PING_GROUP_RANGE).ok();
            let range = range.map(|text| text.split_whitespace().collect::<Vec<_>>().join(" "));
            Err(open_error(&datagram, &raw, gid, range.as_deref()))
        }
    }
}

/// A distinct identifier per raw-socket ping of this process.
fn next_id() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    (std::process::id() as u16).wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(7919))
}

struct Pinger {
    socket: UdpSocket,
    dest: SocketAddr,
    v6: bool,
    kind: IcmpSocket,
    id: u16,
    budget: Arc<TrafficBudget>,
}

impl Echo for Pinger {
    async fn send(&self, seq: u16) -> io::Result<()> {
        self.budget.check()?;
        let request = echo_request(self.v6, self.id, seq);
        self.socket.send_to(&request, self.dest).await?;
        let _ = self.budget.charge(request.len() as u64);
        Ok(())
    }

    async fn recv(&self) -> io::Result<Option<u16>> {
        let mut buf = [0u8; 1500];
        let (len, from) = self.socket.recv_from(&mut buf).await?;
        let _ = self.budget.charge(len as u64);
        if from.ip() != self.dest.ip() {
            return Ok(None);
        }
        let raw = self.kind == IcmpSocket::Raw;
        Ok(parse_reply(&buf[..len], self.v6, raw && !self.v6, raw.then_some(self.id)))
    }
}

/// `ping_count` echo requests; round trips and loss. `total_ms` is the mean
/// round trip (or, when nothing answered, the time waited).
pub(crate) async fn icmp_probe(ctx: &Context, host: &str) -> ProbeOutcome {
    let mut outcome = ProbeOutcome::new(ProbeKind::Icmp, host.to_owned());
    let settings = &ctx.settings;
    let start = Instant::now();
    let deadline = Deadline::after(settings.timeout);
    let ip: IpAddr = match net::resolve_allowed(settings, host, None, deadline, &mut outcome.facts.egress_refused).await
    {
        Ok(addrs) => addrs[0].ip(),
        Err(error) => return outcome.fail(error),
    };
    let dns_ms = ms(start.elapsed());
    let v6 = ip.is_ipv6();
    outcome.result.protocol = Some(if v6 { "ICMPv6" } else { "ICMP" }.into());
    let pinger = match open(v6).and_then(|(socket, kind)| {
        socket.set_nonblocking(true).map_err(|error| format!("ICMP socket: {error}"))?;
        let socket = UdpSocket::from_std(socket.into()).map_err(|error| format!("ICMP socket: {error}"))?;
        Ok(Pinger { socket, dest: SocketAddr::new(ip, 0), v6, kind, id: next_id(), budget: settings.budget.clone() })
    }) {
        Ok(pinger) => pinger,
        Err(error) => return outcome.fail(error),
    };
    outcome.facts.icmp_socket = Some(pinger.kind);
    let waited = Instant::now();
    let done = series(&pinger, settings.ping_count, settings.ping_interval, settings.reply_wait, deadline.at).await;
    let total_ms = if done.stats.received > 0 { done.stats.mean_ms } else { ms(waited.elapsed()) };
    outcome.result.timings = Some(ProbeTimings { dns_ms: Some(dns_ms), total_ms, ..ProbeTimings::default() });
    let (sent, received) = (done.stats.sent, done.stats.received);
    outcome.facts.rtt = Some(done.stats);
    match (done.error, received) {
        (Some(error), _) => outcome.fail(format!("ping {ip}: {error}")),
        (None, 0) => outcome.fail(format!("ping {ip}: no reply to {sent} echo requests")),
        (None, _) => {
            outcome.result.ok = true;
            outcome
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_a_valid_checksum() {
        let packet = echo_request(false, 0x1234, 7);
        assert_eq!(&packet[..8], &[8, 0, packet[2], packet[3], 0x12, 0x34, 0, 7]);
        assert_eq!(checksum(&packet), 0, "a packet with its checksum sums to zero");
        let v6 = echo_request(true, 1, 2);
        assert_eq!(&v6[..8], &[128, 0, 0, 0, 0, 1, 0, 2]);
    }

    #[test]
    fn checksum_of_odd_lengths() {
        // RFC 1071's example words, then a trailing odd byte padded with zero.
        assert_eq!(checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), !0xddf2);
        assert_eq!(checksum(&[0xff]), !0xff00);
    }

    #[test]
    fn replies_are_recognized() {
        let mut reply = echo_request(false, 9, 3);
        reply[0] = ECHO_REPLY_V4;
        assert_eq!(parse_reply(&reply, false, false, None), Some(3));
        assert_eq!(parse_reply(&reply, false, false, Some(9)), Some(3));
        assert_eq!(parse_reply(&reply, false, false, Some(10)), None);
        let mut with_header = vec![0x45; 20];
        with_header.extend(&reply);
        assert_eq!(parse_reply(&with_header, false, true, Some(9)), Some(3));
        let request = echo_request(false, 9, 3);
        assert_eq!(parse_reply(&request, false, false, None), None, "our own request on a raw socket");
        let mut v6 = echo_request(true, 9, 4);
        v6[0] = ECHO_REPLY_V6;
        assert_eq!(parse_reply(&v6, true, false, Some(9)), Some(4));
        assert_eq!(parse_reply(&[0, 0, 0], false, false, None), None);
        assert_eq!(parse_reply(&[0x4f], false, true, None), None);
    }

    #[test]
    fn missing_permission_is_named() {
        let datagram = io::Error::from_raw_os_error(libc::EACCES);
        let raw = io::Error::from_raw_os_error(libc::EPERM);
        let message = open_error(&datagram, &raw, 1000, Some("1 0"));
        assert_eq!(
            message,
            "ICMP is not permitted: an ICMP datagram socket needs net.ipv4.ping_group_range to cover \
             the process's group 1000 (it is \"1 0\"), a raw socket needs CAP_NET_RAW"
        );
        assert!(open_error(&datagram, &raw, 0, None).contains("(it is unreadable)"));
        let unsupported = io::Error::from_raw_os_error(libc::EAFNOSUPPORT);
        let message = open_error(&unsupported, &unsupported, 0, None);
        assert!(message.starts_with("cannot open an ICMP socket: datagram socket: "), "{message}");
    }
}
