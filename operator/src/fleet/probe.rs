//! Health probes: an HTTP GET of the agent's `/healthz`, or for an external
//! server a TCP connect to its service port, every interval, each bounded
//! by a timeout. The
//! verdict and the latency EWMA live in the router's view.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use tidepool_wire::report::ReportKind;

use super::Fleet;
use crate::placement::view::BackendView;

/// Probes in flight at most.
const CONCURRENCY: usize = 64;

/// What to probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// HTTP path; None for a TCP connect.
    pub path: Option<String>,
}

/// The host part of `host[:port]` or `[v6]:port`.
pub fn host_of(address: &str) -> &str {
    if let Some(rest) = address.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match address.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => address,
    }
}

/// The port of `host:port` or `[v6]:port`, if it names one.
pub fn port_of(address: &str) -> Option<u16> {
    let (host, port) = address.rsplit_once(':')?;
    if host.contains(':') && !host.ends_with(']') {
        return None;
    }
    port.parse().ok()
}

/// What to probe for a backend. An external server that names its service
/// port gets a TCP connect to it: what its clients need is that port. Every
/// other backend gets an HTTP GET of its agent's `/healthz`.
pub fn target_of(view: &BackendView) -> Option<Target> {
    let address = view.address.as_deref()?;
    let host = host_of(address).to_owned();
    match (view.kind, port_of(address)) {
        (ReportKind::External, Some(port)) => Some(Target { host, port, path: None }),
        _ => Some(Target { host, port: view.health_port?, path: Some("/healthz".into()) }),
    }
}

/// One probe: Some(latency in ms) on success.
pub async fn probe(target: &Target, timeout: Duration) -> Option<f64> {
    let started = Instant::now();
    let attempt = async {
        let mut stream = TcpStream::connect((target.host.as_str(), target.port)).await.ok()?;
        let Some(path) = &target.path else { return Some(()) };
        let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", target.host);
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut head = [0u8; 16];
        let mut read = 0;
        while read < 12 {
            let n = stream.read(&mut head[read..]).await.ok()?;
            if n == 0 {
                break;
            }
            read += n;
        }
        // "HTTP/1.1 200": 2xx and 3xx count as healthy.
        let code = std::str::from_utf8(&head[..read]).ok()?.split_whitespace().nth(1)?;
        matches!(code.as_bytes().first(), Some(b'2' | b'3')).then_some(())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Some(())) => Some(started.elapsed().as_secs_f64() * 1000.0),
        _ => None,
    }
}

/// Probes every backend that says where its agent listens; runs while this replica leads.
pub async fn run(fleet: Arc<Fleet>) {
    let interval = fleet.settings.probe_interval;
    let timeout = fleet.settings.probe_timeout;
    let mut last: HashMap<String, Instant> = HashMap::new();
    let mut in_flight: JoinSet<(String, Option<f64>)> = JoinSet::new();
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            Some(Ok((name, outcome))) = in_flight.join_next() => {
                if let Some(health) = fleet.with_router(|r| r.observe_probe(&name, outcome)) {
                    tracing::info!(backend = %name, ?health, "backend health changed");
                }
                continue;
            }
        }
        let now = Instant::now();
        let mut due: Vec<(Option<Instant>, String, Target)> = fleet.with_router(|router| {
            router
                .views()
                // A stale backend is out of placement already; probe it again once it reports.
                .filter(|v| router.is_fresh(v, now))
                .filter(|v| last.get(&v.name).is_none_or(|at| now.saturating_duration_since(*at) >= interval))
                .filter_map(|v| Some((last.get(&v.name).copied(), v.name.clone(), target_of(v)?)))
                .collect()
        });
        // Never probed first, then the longest unprobed: slow probes cannot starve the tail.
        due.sort_by_key(|(at, _, _)| *at);
        for (_, name, target) in due {
            if in_flight.len() >= CONCURRENCY {
                break;
            }
            last.insert(name.clone(), now);
            in_flight.spawn(async move { (name, probe(&target, timeout).await) });
        }
        if last.len() > 2 * fleet.with_router(|r| r.len()).max(64) {
            last.retain(|_, at| now.saturating_duration_since(*at) < 10 * interval);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_cut_from_addresses() {
        assert_eq!(host_of("10.0.0.1:9101"), "10.0.0.1");
        assert_eq!(host_of("10.0.0.1"), "10.0.0.1");
        assert_eq!(host_of("node.example"), "node.example");
        assert_eq!(host_of("[fd00::1]:9101"), "fd00::1");
        assert_eq!(host_of("fd00::1"), "fd00::1");
        assert_eq!(port_of("10.0.0.1:9101"), Some(9101));
        assert_eq!(port_of("[fd00::1]:443"), Some(443));
        assert_eq!(port_of("fd00::1"), None);
        assert_eq!(port_of("node.example"), None);
    }

    #[tokio::test]
    async fn http_and_tcp_probes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for answer in ["HTTP/1.1 200 OK\r\n\r\nok", "HTTP/1.1 500 Oops\r\n\r\n", ""] {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 256];
                let _ = socket.read(&mut buf).await;
                socket.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let http = Target { host: "127.0.0.1".into(), port, path: Some("/healthz".into()) };
        let second = Duration::from_secs(1);
        assert!(probe(&http, second).await.is_some());
        assert!(probe(&http, second).await.is_none());
        let tcp = Target { path: None, ..http.clone() };
        assert!(probe(&tcp, second).await.is_some());
        // Nothing listens: a failure, within the timeout.
        drop(tcp);
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = Target { host: "127.0.0.1".into(), port: closed.local_addr().unwrap().port(), path: None };
        drop(closed);
        assert!(probe(&dead, second).await.is_none());
    }
}
