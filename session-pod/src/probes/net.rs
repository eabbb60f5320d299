//! Name resolution (and the egress policy on what it gives), TCP connects
//! and deadlines, and the tcp and dns probes.

use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tidepool_crds::test_session::{ProbeKind, ProbeTimings};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use super::Context;
use super::budget::Metered;
use super::outcome::{ProbeOutcome, ms};
use super::settings::ProbeSettings;

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

/// Resolves `host` and keeps the addresses the egress policy lets a probe
/// on `port` (none for icmp and traceroute) reach; the probe then uses only
/// these, never resolving again. When the policy refuses every address, the
/// error is the first refusal, and `refused` gets its metric label.
pub(crate) async fn resolve_allowed(
    settings: &ProbeSettings,
    host: &str,
    port: Option<u16>,
    deadline: Deadline,
    refused: &mut Option<&'static str>,
) -> Result<Vec<SocketAddr>, String> {
    let addrs = resolve(host, port.unwrap_or(0), deadline).await?;
    allowed(settings, host, port, addrs, refused)
}

/// The addresses of `addrs` the policy allows, or the first refusal.
fn allowed(
    settings: &ProbeSettings,
    host: &str,
    port: Option<u16>,
    addrs: Vec<SocketAddr>,
    refused: &mut Option<&'static str>,
) -> Result<Vec<SocketAddr>, String> {
    let mut first_refusal = None;
    let mut kept = Vec::with_capacity(addrs.len());
    for addr in addrs {
        match settings.egress.check(host, addr.ip(), port) {
            Ok(()) => kept.push(addr),
            Err(refusal) => {
                first_refusal.get_or_insert(refusal);
            }
        }
    }
    match (kept.is_empty(), first_refusal) {
        (true, Some(refusal)) => {
            *refused = Some(refusal.reason.label());
            Err(refusal.to_string())
        }
        _ => Ok(kept),
    }
}

/// A probe's TCP stream: its bytes count against the session's budget.
pub(crate) type ProbeStream = Metered<TcpStream>;

/// Connects to the first address that accepts, in the resolver's order.
pub(crate) async fn connect(ctx: &Context, addrs: &[SocketAddr], deadline: Deadline) -> Result<ProbeStream, String> {
    let mut last = String::from("no address to connect to");
    for addr in addrs {
        match timeout_at(deadline.at, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok(Metered::new(stream, ctx.settings.budget.clone()));
            }
            Ok(Err(error)) => last = format!("connect to {}: {error}", host_port(&addr.ip().to_string(), addr.port())),
            Err(_) => return Err(deadline.expired(format_args!("connect to {addr}"))),
        }
    }
    Err(last)
}

/// A TCP connect: DNS and connect times.
pub(crate) async fn tcp_probe(ctx: &Context, host: &str, port: u16) -> ProbeOutcome {
    let mut outcome = ProbeOutcome::new(ProbeKind::Tcp, host_port(host, port));
    outcome.result.protocol = Some("TCP".into());
    let start = Instant::now();
    let deadline = Deadline::after(ctx.settings.timeout);
    let mut timings = ProbeTimings::default();
    let refused = &mut outcome.facts.egress_refused;
    let connected = async {
        let addrs = resolve_allowed(&ctx.settings, host, Some(port), deadline, refused).await?;
        timings.dns_ms = Some(ms(start.elapsed()));
        let connecting = Instant::now();
        connect(ctx, &addrs, deadline).await?;
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

/// A lookup through the system resolver: its time and the addresses. Only
/// addresses the policy lets a probe reach on every port are shown, so the
/// probe cannot map the cluster's names to its addresses; a name with none
/// fails as refused.
pub(crate) async fn dns_probe(ctx: &Context, host: &str) -> ProbeOutcome {
    let mut outcome = ProbeOutcome::new(ProbeKind::Dns, host.to_owned());
    let start = Instant::now();
    let refused = &mut outcome.facts.egress_refused;
    let resolved = resolve_allowed(&ctx.settings, host, None, Deadline::after(ctx.settings.timeout), refused).await;
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

    #[test]
    fn only_allowed_addresses_are_kept() {
        use std::sync::Arc;
        use tidepool_protocol::egress::EgressPolicy;
        let public: SocketAddr = "93.184.216.34:80".parse().unwrap();
        let private: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let loopback: SocketAddr = "[::1]:80".parse().unwrap();
        let settings = ProbeSettings::default();
        let mut refused = None;
        assert_eq!(allowed(&settings, "h", Some(80), vec![private, public], &mut refused), Ok(vec![public]));
        assert_eq!(refused, None);
        let all_refused = allowed(&settings, "h", Some(80), vec![loopback, private], &mut refused);
        assert_eq!(
            all_refused,
            Err("refused by the pool's egress policy: h resolves to ::1, which is loopback".to_owned())
        );
        assert_eq!(refused, Some("loopback"));
        let open = ProbeSettings {
            egress: Arc::new(EgressPolicy::parse(r#"[{"cidr":"10.0.0.0/8","ports":[80]}]"#, "").unwrap()),
            ..ProbeSettings::default()
        };
        let mut refused = None;
        assert_eq!(allowed(&open, "h", Some(80), vec![private], &mut refused), Ok(vec![private]));
        assert!(allowed(&open, "h", Some(81), vec![private], &mut refused).is_err());
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
