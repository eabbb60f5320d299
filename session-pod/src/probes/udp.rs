//! The udp probe (any reply counts) and tier 2's UDP jitter series.
//!
//! Both send Tidepool's `TPU1` echo datagrams, so the pod's own echo answers
//! them (given the grant's cookie); any other service's reply counts for the
//! probe, and for the series whatever echoes our datagrams back.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tidepool_crds::test_session::{ProbeKind, ProbeTimings};
use tokio::net::UdpSocket;
use tokio::time::{Instant, timeout_at};

use super::Context;
use super::budget::TrafficBudget;
use super::net::{self, Deadline, host_port};
use super::outcome::{ProbeOutcome, RttStats, ms};
use super::series::{Echo, series};
use tidepool_protocol::pod::{UDP_HEADER_BYTES, UdpProbe};

/// The size of our datagrams: the echo header and a little padding.
const DATAGRAM_BYTES: usize = 64;
const _: () = assert!(DATAGRAM_BYTES >= UDP_HEADER_BYTES);

/// A `TPU1` datagram.
fn datagram(cookie: u64, seq: u32) -> [u8; DATAGRAM_BYTES] {
    let client_time_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_micros() as u64);
    let mut datagram = [0u8; DATAGRAM_BYTES];
    let probe = UdpProbe { cookie, seq, client_time_us, server_time_us: 0 };
    // Cannot fail: the buffer is within the echo's sizes, as asserted above.
    let _ = probe.write(&mut datagram);
    datagram
}

/// A UDP socket connected to `host:port` (the first address the egress
/// policy allows), and the time DNS took.
async fn connect(
    ctx: &Context,
    host: &str,
    port: u16,
    deadline: Deadline,
    refused: &mut Option<&'static str>,
) -> Result<(UdpSocket, f64), String> {
    let start = Instant::now();
    let addrs = net::resolve_allowed(&ctx.settings, host, Some(port), deadline, refused).await?;
    let dns_ms = ms(start.elapsed());
    let addr = addrs[0];
    let local: SocketAddr =
        if addr.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let socket = UdpSocket::bind(local).await.map_err(|error| format!("UDP socket: {error}"))?;
    socket.connect(addr).await.map_err(|error| format!("UDP connect to {addr}: {error}"))?;
    Ok((socket, dns_ms))
}

/// Why a connected UDP socket failed, in words.
fn udp_error(addr: &str, error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => format!("{addr}: nothing listens there (ICMP port unreachable)"),
        _ => format!("{addr}: {error}"),
    }
}

/// Sends a datagram every `reply_wait` until anything comes back, within the timeout.
pub(crate) async fn udp_probe(ctx: &Context, host: &str, port: u16) -> ProbeOutcome {
    let label = host_port(host, port);
    let mut outcome = ProbeOutcome::new(ProbeKind::Udp, label.clone());
    outcome.result.protocol = Some("UDP".into());
    let start = Instant::now();
    let deadline = Deadline::after(ctx.settings.timeout);
    let (socket, dns_ms) = match connect(ctx, host, port, deadline, &mut outcome.facts.egress_refused).await {
        Ok(connected) => connected,
        Err(error) => return outcome.fail(error),
    };
    let mut timings = ProbeTimings { dns_ms: Some(dns_ms), ..ProbeTimings::default() };
    let mut buf = [0u8; 2048];
    let mut sent = 0u32;
    let budget = &ctx.settings.budget;
    let answer = loop {
        if let Err(spent) = budget.check() {
            break Err(spent.to_string());
        }
        if let Err(error) = socket.send(&datagram(ctx.settings.udp_cookie, sent)).await {
            break Err(udp_error(&label, &error));
        }
        let _ = budget.charge(DATAGRAM_BYTES as u64);
        sent += 1;
        let sent_at = Instant::now();
        let wait_until = deadline.at.min(sent_at + ctx.settings.reply_wait);
        match timeout_at(wait_until, socket.recv(&mut buf)).await {
            Ok(Ok(len)) => {
                let _ = budget.charge(len as u64);
                break Ok(ms(sent_at.elapsed()));
            }
            Ok(Err(error)) => break Err(udp_error(&label, &error)),
            Err(_) if wait_until == deadline.at => break Err(deadline.expired(format_args!("UDP {label}"))),
            Err(_) => {}
        }
    };
    timings.total_ms = ms(start.elapsed());
    match answer {
        Ok(rtt) => {
            timings.first_byte_ms = Some(timings.total_ms);
            outcome.result.timings = Some(timings);
            outcome.facts.rtt = Some(RttStats::new(sent, &[rtt]));
            outcome.result.ok = true;
            outcome
        }
        Err(error) => {
            outcome.result.timings = Some(timings);
            outcome.fail(error)
        }
    }
}

/// Our echo datagrams over a connected socket.
struct UdpEcho {
    socket: UdpSocket,
    cookie: u64,
    budget: Arc<TrafficBudget>,
}

impl Echo for UdpEcho {
    async fn send(&self, seq: u16) -> io::Result<()> {
        self.budget.check()?;
        self.socket.send(&datagram(self.cookie, u32::from(seq))).await?;
        let _ = self.budget.charge(DATAGRAM_BYTES as u64);
        Ok(())
    }

    async fn recv(&self) -> io::Result<Option<u16>> {
        let mut buf = [0u8; 2048];
        let len = self.socket.recv(&mut buf).await?;
        let _ = self.budget.charge(len as u64);
        Ok(UdpProbe::read(&buf[..len]).ok().and_then(|reply| u16::try_from(reply.seq).ok()))
    }
}

/// Tier 2: `jitter_count` datagrams `jitter_interval` apart; the round trips,
/// their jitter and the loss.
pub(crate) async fn jitter_probe(ctx: &Context, host: &str, port: u16) -> ProbeOutcome {
    let label = host_port(host, port);
    let mut outcome = ProbeOutcome::new(ProbeKind::Udp, label.clone());
    outcome.result.protocol = Some("UDP".into());
    let settings = &ctx.settings;
    let deadline = Deadline::after(settings.timeout);
    let (socket, dns_ms) = match connect(ctx, host, port, deadline, &mut outcome.facts.egress_refused).await {
        Ok(connected) => connected,
        Err(error) => return outcome.fail(error),
    };
    let echo = UdpEcho { socket, cookie: settings.udp_cookie, budget: settings.budget.clone() };
    let (count, interval) = (settings.jitter_count, settings.jitter_interval);
    let done = series(&echo, count, interval, settings.reply_wait, deadline.at).await;
    let mean = if done.stats.received > 0 { done.stats.mean_ms } else { 0.0 };
    outcome.result.timings = Some(ProbeTimings { dns_ms: Some(dns_ms), total_ms: mean, ..ProbeTimings::default() });
    let received = done.stats.received;
    outcome.facts.rtt = Some(done.stats);
    match (done.error, received) {
        (Some(error), _) => outcome.fail(udp_error(&label, &error)),
        (None, 0) => outcome.fail(format!("{label}: no echo of {count} datagrams")),
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
    fn datagrams_are_valid_echo_probes() {
        let bytes = datagram(7, 3);
        let probe = UdpProbe::read(&bytes).unwrap();
        assert_eq!((probe.cookie, probe.seq, probe.server_time_us), (7, 3, 0));
        assert!(probe.client_time_us > 0);
    }

    #[test]
    fn refused_is_said_plainly() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(udp_error("h:9", &refused), "h:9: nothing listens there (ICMP port unreachable)");
    }
}
