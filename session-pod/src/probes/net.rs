//! Name resolution, TCP connects and deadlines, and the tcp and dns probes.

use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tidepool_crds::test_session::{ProbeKind, ProbeTimings};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use super::outcome::{ProbeOutcome, ms};

/// When a probe gives up, and the budget that came from, for the message.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline {
    pub at: Instant,
    budget: Duration,
}

impl Deadline {
    pub fn after(budget: Duration) -> Self {
        Self { at: Instant::now() + budget, budget }
    }

    /// Awaits `step`, naming it in the error: its own, or the timeout's.
    pub async fn bound<T, E: Display>(
        &self,
        what: &str,
        step: impl Future<Output = Result<T, E>>,
    ) -> Result<T, String> {
        match timeout_at(self.at, step).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(format!("{what}: {error}")),
            Err(_) => Err(self.expired(what)),
        }
    }

    pub fn expired(&self, what: impl Display) -> String {
        format!("{what}: no answer within {} s", seconds(self.budget))
    }
}

/// Seconds for messages: `5`, `0.25`.
pub(crate) fn seconds(duration: Duration) -> String {
    let text = format!("{:.3}", duration.as_secs_f64());
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

pub(crate) use tidepool_wire::error_chain;

/// `host:port`, with brackets around an IPv6 address.
pub(crate) fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// Resolves `host` through the system resolver (`getaddrinfo`).
pub(crate) async fn resolve(host: &str, port: u16, deadline: Deadline) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> =
        deadline.bound(&format!("DNS lookup of {host}"), tokio::net::lookup_host((host, port))).await?.collect();
    if addrs.is_empty() { Err(format!("DNS lookup of {host}: no addresses")) } else { Ok(addrs) }
}

/// Connects to the first address that accepts, in the resolver's order.
pub(crate) async fn connect(addrs: &[SocketAddr], deadline: Deadline) -> Result<TcpStream, String> {
    let mut last = String::from("no address to connect to");
    for addr in addrs {
        match timeout_at(deadline.at, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Ok(Err(error)) => last = format!("connect to {}: {error}", host_port(&addr.ip().to_string(), addr.port())),
            Err(_) => return Err(deadline.expired(format_args!("connect to {addr}"))),
        }
    }
    Err(last)
}

/// A TCP connect: DNS and connect times.
pub(crate) async fn tcp_probe(host: &str, port: u16, timeout: Duration) -> ProbeOutcome {
    let mut outcome = ProbeOutcome::new(ProbeKind::Tcp, host_port(host, port));
    outcome.result.protocol = Some("TCP".into());
    let start = Instant::now();
    let deadline = Deadline::after(timeout);
    let mut timings = ProbeTimings::default();
    let connected = async {
        let addrs = resolve(host, port, deadline).await?;
        timings.dns_ms = Some(ms(start.elapsed()));
        let connecting = Instant::now();
        connect(&addrs, deadline).await?;
        timings.connect_ms = Some(ms(connecting.elapsed()));
        Ok::<_, String>(())
    }
    .await;
    timings.total_ms = ms(start.elapsed());
    outcome.result.timings = Some(timings);
    match connected {
        Ok(()) => {
            outcome.result.ok = true;
            outcome
        }
        Err(error) => outcome.fail(error),
    }
}

/// A lookup through the system resolver: its time and the addresses.
pub(crate) async fn dns_probe(host: &str, timeout: Duration) -> ProbeOutcome {
    let mut outcome = ProbeOutcome::new(ProbeKind::Dns, host.to_owned());
    let start = Instant::now();
    let resolved = resolve(host, 0, Deadline::after(timeout)).await;
    let elapsed = ms(start.elapsed());
    outcome.result.timings = Some(ProbeTimings { dns_ms: Some(elapsed), total_ms: elapsed, ..ProbeTimings::default() });
    match resolved {
        Ok(addrs) => {
            let mut ips: Vec<IpAddr> = Vec::with_capacity(addrs.len());
            for ip in addrs.iter().map(SocketAddr::ip) {
                if !ips.contains(&ip) {
                    ips.push(ip);
                }
            }
            outcome.facts.addresses = ips;
            outcome.result.ok = true;
            outcome
        }
        Err(error) => outcome.fail(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_seconds() {
        assert_eq!(host_port("::1", 443), "[::1]:443");
        assert_eq!(host_port("example.com", 80), "example.com:80");
        assert_eq!(seconds(Duration::from_secs(5)), "5");
        assert_eq!(seconds(Duration::from_millis(250)), "0.25");
    }

    #[tokio::test]
    async fn deadline_names_the_step() {
        let deadline = Deadline::after(Duration::from_millis(10));
        let never = std::future::pending::<Result<(), std::io::Error>>();
        assert_eq!(deadline.bound("reading", never).await, Err("reading: no answer within 0.01 s".into()));
        let refused = async { Err::<(), _>(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)) };
        assert_eq!(deadline.bound("connect", refused).await, Err("connect: connection refused".into()));
    }
}
