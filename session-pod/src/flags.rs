//! The command line and environment of `tidepool-session`.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tidepool_protocol::egress::{self, Cidr, EgressPolicy};
use tidepool_wire::token::PublicKeys;

use crate::limits::{Limits, ProbeLimits, UdpCaps};
use crate::server::{HttpLimits, ServerConfig};
use crate::state::PodIdentity;
use tidepool_protocol::pod::MAX_UPLOAD_BYTES;

/// Tidepool's session pod: serves one user's latency, throughput, UDP and
/// household tests, and reports the results to the operator.
#[derive(Parser, Debug, Clone)]
#[command(name = "tidepool-session", version)]
pub struct Flags {
    /// TCP address for HTTP and WebSockets.
    #[arg(long, env = "TIDEPOOL_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// UDP echo port, on the listen address [default: the TCP port's number].
    #[arg(long, env = "TIDEPOOL_UDP_PORT")]
    pub udp_port: Option<u16>,
    /// The pool's Ed25519 public keys (base64url, comma-separated, current
    /// first; two while a key rotation goes on), which sign session tokens
    /// and binding tickets. Base64url, so it may begin with '-'.
    #[arg(
        long,
        env = "TIDEPOOL_POOL_PUBLIC_KEY",
        value_parser = parse_public_key,
        hide_env_values = true,
        allow_hyphen_values = true
    )]
    pub pool_public_key: PublicKeys,
    /// This pod's name: binding tickets name it.
    #[arg(long, env = "TIDEPOOL_POD_NAME", value_parser = non_empty)]
    pub pod_name: String,
    /// This pod's namespace.
    #[arg(long, env = "TIDEPOOL_POD_NAMESPACE", default_value = "")]
    pub pod_namespace: String,
    /// The WarmPool; when set, tokens of other pools are refused.
    #[arg(long, env = "TIDEPOOL_POOL", default_value = "")]
    pub pool: String,
    /// Where the pod runs, as pongs and /api/v1/info report it.
    #[arg(long, env = "TIDEPOOL_REGION", default_value = "")]
    pub region: String,
    /// The operator's base URL (`http://host:port`), to post results to.
    #[arg(long, env = "TIDEPOOL_OPERATOR_URL", value_parser = parse_url)]
    pub operator_url: Option<reqwest::Url>,
    /// Tests (latency WebSockets and household runs) one client address may start an hour.
    #[arg(long, env = "TIDEPOOL_TESTS_PER_HOUR", default_value_t = Limits::default().tests_per_hour)]
    pub tests_per_hour: u32,
    /// Bytes (download, upload, household, UDP) one client address may move an hour.
    #[arg(long, env = "TIDEPOOL_BYTES_PER_HOUR", default_value_t = Limits::default().bytes_per_hour)]
    pub bytes_per_hour: u64,
    /// WebSockets and streams one client address may hold open at once.
    #[arg(long, env = "TIDEPOOL_CONCURRENT_SOCKETS", default_value_t = Limits::default().concurrent_sockets)]
    pub concurrent_sockets: u32,
    /// The most one upload may carry, in bytes.
    #[arg(long, env = "TIDEPOOL_MAX_UPLOAD_BYTES", default_value_t = MAX_UPLOAD_BYTES)]
    pub max_upload_bytes: u64,
    /// How many client addresses the limits remember.
    #[arg(long, env = "TIDEPOOL_TRACKED_CLIENTS", default_value_t = Limits::default().tracked_clients)]
    pub tracked_clients: usize,
    /// What the session's probes may reach beyond the public internet: a JSON
    /// array of the pool's egress rules, `{"cidr": "10.1.0.0/16", "ports": [5432]}`
    /// or `{"host": "db.default.svc"}` or `{"host": "*.example.org"}` (every
    /// port when none are listed). The operator sets it from `spec.egress.allow`.
    #[arg(long, env = egress::ALLOW_ENV, default_value = "", value_parser = parse_egress_allow, hide_default_value = true)]
    pub egress_allow: EgressPolicy,
    /// The cluster's pod and service ranges, comma-separated CIDRs, refused to
    /// the probes as loopback and private addresses are. The operator sets it.
    #[arg(long, env = egress::DENY_ENV, default_value = "", value_parser = parse_egress_deny, hide_default_value = true)]
    pub egress_deny: DenyRanges,
    /// Bytes one session's probes may send and receive in all, downloads included.
    #[arg(long, env = "TIDEPOOL_PROBE_BYTES_PER_SESSION", default_value_t = ProbeLimits::default().bytes_per_session)]
    pub probe_bytes_per_session: u64,
    /// Probe runs (once or continuous) one session may start in any minute.
    #[arg(long, env = "TIDEPOOL_PROBE_RUNS_PER_MINUTE", default_value_t = ProbeLimits::default().runs_per_minute)]
    pub probe_runs_per_minute: u32,
    /// UDP datagrams the echo sends back to one session in all.
    #[arg(long, env = "TIDEPOOL_UDP_PACKETS_PER_SESSION", default_value_t = UdpCaps::default().packets_per_session)]
    pub udp_packets_per_session: u64,
    /// UDP bytes the echo sends back to one session in all.
    #[arg(long, env = "TIDEPOOL_UDP_BYTES_PER_SESSION", default_value_t = UdpCaps::default().bytes_per_session)]
    pub udp_bytes_per_session: u64,
    /// HTTP connections open at once (WebSockets included); one beyond is closed at once.
    #[arg(long, env = "TIDEPOOL_MAX_CONNECTIONS", default_value_t = HttpLimits::default().max_connections,
        value_parser = parse_connections)]
    pub max_connections: usize,
    /// Seconds a client has to send a request's head, from its first byte.
    #[arg(long, env = "TIDEPOOL_HEADER_READ_TIMEOUT", default_value = "10", value_parser = parse_seconds)]
    pub header_read_timeout: Duration,
    /// Seconds a request body may pause; a JSON body must come in full within it.
    #[arg(long, env = "TIDEPOOL_BODY_READ_TIMEOUT", default_value = "10", value_parser = parse_seconds)]
    pub body_read_timeout: Duration,
    /// Seconds a kept-alive connection may sit with no request.
    #[arg(long, env = "TIDEPOOL_IDLE_TIMEOUT", default_value = "30", value_parser = parse_seconds)]
    pub idle_timeout: Duration,
    /// Seconds a client may take no bytes of an answer before it is cut.
    #[arg(long, env = "TIDEPOOL_WRITE_TIMEOUT", default_value = "60", value_parser = parse_seconds)]
    pub write_timeout: Duration,
    /// Where tubes' UDP sockets bind (their ICE host candidates)
    /// [default: the listen address's IP; a wildcard binds every interface
    /// but loopback].
    #[arg(long, env = "TIDEPOOL_TUBE_ADDRESS")]
    pub tube_address: Option<std::net::IpAddr>,
    /// Tubes the pod carries at once.
    #[arg(long, env = "TIDEPOOL_MAX_TUBES", default_value_t = crate::tubes::TubeLimits::default().tubes)]
    pub max_tubes: usize,
    /// Tubes being set up (answered, not yet connected) at once; more are refused.
    #[arg(long, env = "TIDEPOOL_MAX_TUBE_CREATIONS", default_value_t = crate::tubes::TubeLimits::default().creations)]
    pub max_tube_creations: usize,
    /// Runtime worker threads.
    #[arg(long, env = "TIDEPOOL_WORKER_THREADS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: u16,
}

impl Flags {
    fn tube_limits(&self) -> crate::tubes::TubeLimits {
        let defaults = crate::tubes::TubeLimits::default();
        let address = self.tube_address.unwrap_or(self.listen.ip());
        crate::tubes::TubeLimits {
            tubes: self.max_tubes.max(1),
            creations: self.max_tube_creations.max(1),
            peer: tidepool_tube::Settings { udp: vec![SocketAddr::new(address, 0)], ..defaults.peer.clone() },
            ..defaults
        }
    }

    pub fn server_config(&self) -> ServerConfig {
        let identity = PodIdentity {
            pod: self.pod_name.clone(),
            namespace: self.pod_namespace.clone(),
            pool: self.pool.clone(),
            region: self.region.clone(),
        };
        ServerConfig {
            listen: self.listen,
            udp_port: self.udp_port,
            limits: Limits {
                tests_per_hour: self.tests_per_hour,
                bytes_per_hour: self.bytes_per_hour,
                concurrent_sockets: self.concurrent_sockets,
                max_upload_bytes: self.max_upload_bytes,
                tracked_clients: self.tracked_clients,
            },
            http: HttpLimits {
                max_connections: self.max_connections,
                header_read_timeout: self.header_read_timeout,
                body_read_timeout: self.body_read_timeout,
                idle_timeout: self.idle_timeout,
                write_timeout: self.write_timeout,
            },
            egress: self.egress_allow.clone().with_deny(self.egress_deny.0.clone()),
            probe_limits: ProbeLimits {
                bytes_per_session: self.probe_bytes_per_session,
                runs_per_minute: self.probe_runs_per_minute,
            },
            udp_caps: UdpCaps {
                packets_per_session: self.udp_packets_per_session,
                bytes_per_session: self.udp_bytes_per_session,
            },
            operator_url: self.operator_url.clone(),
            tubes: self.tube_limits(),
            ..ServerConfig::new(identity, self.pool_public_key.clone())
        }
    }
}

/// The cluster's ranges (a type of its own: clap would take a `Vec` for a repeated flag).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DenyRanges(pub Vec<Cidr>);

fn parse_egress_allow(text: &str) -> Result<EgressPolicy, String> {
    EgressPolicy::parse(text, "").map_err(|e| e.to_string())
}

fn parse_egress_deny(text: &str) -> Result<DenyRanges, String> {
    egress::parse_deny(text).map(DenyRanges).map_err(|e| e.to_string())
}

fn parse_connections(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(count) if count > 0 => Ok(count),
        _ => Err(format!("{text:?} is not a count of at least 1")),
    }
}

/// Seconds, whole or not, more than 0 and at most a day.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text.trim().parse().map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if seconds > 0.0 && seconds <= 86_400.0 {
        Ok(Duration::from_secs_f64(seconds))
    } else {
        Err(format!("{text} must be more than 0 and at most 86400 seconds"))
    }
}

fn parse_public_key(text: &str) -> Result<PublicKeys, String> {
    PublicKeys::from_base64_list(text).map_err(|e| e.to_string())
}

fn non_empty(text: &str) -> Result<String, String> {
    if text.trim().is_empty() { Err("must not be empty".into()) } else { Ok(text.to_owned()) }
}

fn parse_url(text: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(text).map_err(|e| e.to_string())?;
    match url.scheme() {
        "http" | "https" => Ok(url),
        other => Err(format!("the scheme must be http or https, not {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_wire::token::PoolSigningKey;

    #[test]
    fn defaults_and_required_identity() {
        let key = PoolSigningKey::generate().unwrap().public().to_base64();
        let flags =
            Flags::try_parse_from(["tidepool-session", "--pool-public-key", &key, "--pod-name", "edge-abc"]).unwrap();
        let config = flags.server_config();
        assert_eq!(config.listen, "0.0.0.0:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(config.udp_port, None);
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.identity.pod, "edge-abc");
        assert_eq!(config.http, HttpLimits::default());
        assert_eq!(config.egress, EgressPolicy::default());
        assert_eq!(config.probe_limits, ProbeLimits::default());
        assert_eq!(config.udp_caps, UdpCaps::default());

        // A key that begins with '-' is a value, not a flag (1 key in 64 does).
        let hyphenated = std::iter::repeat_with(|| PoolSigningKey::generate().unwrap().public().to_base64())
            .take(10_000)
            .find(|key| key.starts_with('-'))
            .unwrap();
        Flags::try_parse_from(["tidepool-session", "--pool-public-key", &hyphenated, "--pod-name", "p"]).unwrap();

        // Missing or malformed identity is a usage error (exit code 2).
        for args in [
            vec!["tidepool-session", "--pod-name", "edge-abc"],
            vec!["tidepool-session", "--pool-public-key", "short", "--pod-name", "edge-abc"],
            vec!["tidepool-session", "--pool-public-key", &key, "--pod-name", ""],
            vec!["tidepool-session", "--pool-public-key", &key, "--pod-name", "p", "--operator-url", "ftp://x"],
            vec!["tidepool-session", "--pool-public-key", &key, "--pod-name", "p", "--egress-allow", "[{}]"],
            vec!["tidepool-session", "--pool-public-key", &key, "--pod-name", "p", "--egress-deny", "10.0.0.0/40"],
            vec!["tidepool-session", "--pool-public-key", &key, "--pod-name", "p", "--idle-timeout", "0"],
            vec!["tidepool-session", "--pool-public-key", &key, "--pod-name", "p", "--max-connections", "0"],
        ] {
            let error = Flags::try_parse_from(&args).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{args:?}: {error}");
        }
    }

    #[test]
    fn the_egress_policy_and_the_caps_come_from_the_environments_names_too() {
        let key = PoolSigningKey::generate().unwrap().public().to_base64();
        let flags = Flags::try_parse_from([
            "tidepool-session",
            "--pool-public-key",
            &key,
            "--pod-name",
            "p",
            "--egress-allow",
            r#"[{"cidr":"127.0.0.0/8","ports":[80]},{"host":"db.default.svc"}]"#,
            "--egress-deny",
            "10.96.0.0/12, 10.244.0.0/16",
            "--probe-bytes-per-session",
            "1000",
            "--probe-runs-per-minute",
            "3",
            "--udp-packets-per-session",
            "5",
            "--udp-bytes-per-session",
            "640",
            "--max-connections",
            "8",
            "--header-read-timeout",
            "0.5",
            "--body-read-timeout",
            "2",
            "--idle-timeout",
            "7",
        ])
        .unwrap();
        let config = flags.server_config();
        let expected = EgressPolicy::parse(
            r#"[{"cidr":"127.0.0.0/8","ports":[80]},{"host":"db.default.svc"}]"#,
            "10.96.0.0/12,10.244.0.0/16",
        )
        .unwrap();
        assert_eq!(config.egress, expected);
        assert!(config.egress.check("127.0.0.1", "127.0.0.1".parse().unwrap(), Some(80)).is_ok());
        assert!(config.egress.check("x", "10.96.0.1".parse().unwrap(), Some(80)).is_err());
        assert_eq!(config.probe_limits, ProbeLimits { bytes_per_session: 1000, runs_per_minute: 3 });
        assert_eq!(config.udp_caps, UdpCaps { packets_per_session: 5, bytes_per_session: 640 });
        assert_eq!(
            config.http,
            HttpLimits {
                max_connections: 8,
                header_read_timeout: Duration::from_millis(500),
                body_read_timeout: Duration::from_secs(2),
                idle_timeout: Duration::from_secs(7),
                write_timeout: Duration::from_secs(60),
            }
        );
        let long = [egress::ALLOW_ENV, egress::DENY_ENV];
        assert_eq!(long, ["TIDEPOOL_EGRESS_ALLOW", "TIDEPOOL_EGRESS_DENY"]);
    }
}
