//! The gateway's command line. Every flag can come from the environment.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tidepool_protocol::egress::{Cidr, parse_deny};

use crate::anonymous;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "tidepool-gateway",
    about = "Tidepool's front door: sessions and their streams, proxied to their pods"
)]
pub struct Flags {
    /// Where users reach the gateway.
    #[arg(long, env = "TIDEPOOL_GATEWAY_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Where the UDP echo relay listens: `same` (the --listen address, as
    /// UDP), an address, or `off`.
    #[arg(long, env = "TIDEPOOL_GATEWAY_UDP_LISTEN", default_value = "same")]
    pub udp_listen: String,
    /// The UDP port clients are told to send to (the Service's); by default
    /// the one the relay listens on.
    #[arg(long, env = "TIDEPOOL_GATEWAY_UDP_ADVERTISED_PORT")]
    pub udp_advertised_port: Option<u16>,
    /// `/metrics`, `/healthz` and `/readyz`: kept off the users' port.
    #[arg(long, env = "TIDEPOOL_GATEWAY_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
    /// The operator's API, which creates sessions and signs their credentials.
    #[arg(long, env = "TIDEPOOL_OPERATOR_URL", default_value = "http://tidepool-operator:8080")]
    pub operator_url: String,
    /// The gateway's own token for the operator's API (its ServiceAccount's,
    /// read again before each use, as the kubelet rotates it).
    #[arg(
        long,
        env = "TIDEPOOL_GATEWAY_TOKEN_FILE",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )]
    pub token_file: PathBuf,
    /// The namespaces whose sessions the gateway serves (comma-separated).
    #[arg(long, env = "TIDEPOOL_NAMESPACES", value_delimiter = ',', default_value = "default")]
    pub namespaces: Vec<String>,
    /// The namespace of a create that names none.
    #[arg(long, env = "TIDEPOOL_SESSION_NAMESPACE", default_value = "default")]
    pub session_namespace: String,
    /// The URL users reach the gateway at, for the session endpoints it
    /// hands out; when not set, the scheme and Host of each request.
    #[arg(long, env = "TIDEPOOL_GATEWAY_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// Proxies whose `X-Forwarded-For` is believed (comma-separated CIDRs):
    /// the Ingress controller's or load balancer's addresses.
    #[arg(long, env = "TIDEPOOL_GATEWAY_TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: String,
    /// When set, only these addresses (comma-separated CIDRs) may start anonymous sessions.
    #[arg(long, env = "TIDEPOOL_GATEWAY_ANONYMOUS_ALLOW", default_value = "")]
    pub anonymous_allow: String,
    /// Anonymous sessions one client address may start in an hour.
    #[arg(long, env = "TIDEPOOL_GATEWAY_ANONYMOUS_SESSIONS_PER_HOUR", default_value_t = 30)]
    pub anonymous_sessions_per_hour: u32,
    /// Anonymous sessions one client address may hold at once.
    #[arg(long, env = "TIDEPOOL_GATEWAY_ANONYMOUS_CONCURRENT_SESSIONS", default_value_t = 2)]
    pub anonymous_concurrent_sessions: u32,
    /// Mebibytes the sessions one client address started in the last hour
    /// may move through the gateway, both ways, every replica; 0: no limit.
    #[arg(long, env = "TIDEPOOL_GATEWAY_ANONYMOUS_MIB_PER_HOUR", default_value_t = 51_200)]
    pub anonymous_mib_per_hour: u64,
    /// This replica's name, unique among the replicas (the chart gives the
    /// pod's): the bytes it proxies are written on sessions under it.
    /// Default: the host name.
    #[arg(long, env = "TIDEPOOL_GATEWAY_REPLICA")]
    pub replica: Option<String>,
    /// Streams (HTTP requests and WebSockets) one session may have open through this replica.
    #[arg(long, env = "TIDEPOOL_GATEWAY_STREAMS_PER_SESSION", default_value_t = 16)]
    pub streams_per_session: usize,
    /// Serve TLS with this PEM certificate chain (a mounted Secret's
    /// `tls.crt`), read again every few seconds so renewals take effect.
    #[arg(long, env = "TIDEPOOL_GATEWAY_TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<PathBuf>,
    /// The PEM private key of `--tls-cert-file` (the Secret's `tls.key`).
    #[arg(long, env = "TIDEPOOL_GATEWAY_TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<PathBuf>,
    /// Origins (comma-separated, `https://host[:port]`) whose pages may call
    /// the gateway from a browser; none when empty.
    #[arg(long, env = "TIDEPOOL_GATEWAY_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Serve the web UI from this directory (`npm --prefix web run build`
    /// leaves it in `web/dist`); no UI when unset.
    #[arg(long, env = "TIDEPOOL_GATEWAY_UI_DIR")]
    pub ui_dir: Option<PathBuf>,
    /// Path prefixes (comma-separated, such as `/app`) proxied to the backend
    /// the operator's router picks for each request's tier; none when empty.
    #[arg(long, env = "TIDEPOOL_GATEWAY_ROUTED_PATHS", value_delimiter = ',')]
    pub routed_paths: Vec<String>,
    /// The routed requests' tiers by name, as JSON:
    /// `{"small": {"vcpu": 1, "memoryMiB": 2048}}`.
    #[arg(long, env = "TIDEPOOL_GATEWAY_ROUTED_TIERS", default_value = "{}")]
    pub routed_tiers: String,
    /// The tier of a routed request that names none; without it, such a request is refused.
    #[arg(long, env = "TIDEPOOL_GATEWAY_ROUTED_DEFAULT_TIER")]
    pub routed_default_tier: Option<String>,
    /// The header in which a routed request names its tier.
    #[arg(long, env = "TIDEPOOL_GATEWAY_ROUTED_TIER_HEADER", default_value = "x-tidepool-tier")]
    pub routed_tier_header: String,
    /// The query parameter in which a routed request names its tier.
    #[arg(long, env = "TIDEPOOL_GATEWAY_ROUTED_TIER_QUERY", default_value = "tier")]
    pub routed_tier_query: String,
    /// The field of a JSON body in which a routed request names its tier
    /// (read only when the header and query name none); empty: bodies are not read.
    #[arg(long, env = "TIDEPOOL_GATEWAY_ROUTED_TIER_FIELD", default_value = "tier")]
    pub routed_tier_field: String,
    /// The header whose value keeps a client on one backend (the client's address does without it).
    #[arg(long, env = "TIDEPOOL_GATEWAY_ROUTED_STICKY_HEADER", default_value = "x-tidepool-sticky")]
    pub routed_sticky_header: String,
    /// The port of a routed backend whose address names none.
    #[arg(long, env = "TIDEPOOL_GATEWAY_ROUTED_BACKEND_PORT", default_value_t = 80)]
    pub routed_backend_port: u16,
    /// Connections open at once; one beyond is closed unanswered.
    #[arg(long, env = "TIDEPOOL_GATEWAY_MAX_CONNECTIONS", default_value_t = 4096)]
    pub max_connections: usize,
    /// A request head must come in full within this many seconds.
    #[arg(long, env = "TIDEPOOL_GATEWAY_HEADER_TIMEOUT_SECONDS", default_value_t = 10)]
    pub header_timeout_seconds: u64,
    /// A request body may pause at most this many seconds.
    #[arg(long, env = "TIDEPOOL_GATEWAY_BODY_TIMEOUT_SECONDS", default_value_t = 10)]
    pub body_timeout_seconds: u64,
    /// A kept-alive connection with nothing coming is closed after this many seconds.
    #[arg(long, env = "TIDEPOOL_GATEWAY_IDLE_TIMEOUT_SECONDS", default_value_t = 60)]
    pub idle_timeout_seconds: u64,
    /// A client that takes no bytes of an answer (a download, a WebSocket's
    /// frames) for this many seconds is cut.
    #[arg(long, env = "TIDEPOOL_GATEWAY_WRITE_TIMEOUT_SECONDS", default_value_t = 60)]
    pub write_timeout_seconds: u64,
}

/// A flag that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("--{flag}: {reason}")]
pub struct BadFlag {
    pub flag: &'static str,
    pub reason: String,
}

/// The settings the server runs with, parsed from [`Flags`].
#[derive(Clone, Debug)]
pub struct Settings {
    pub operator_url: String,
    pub token_file: PathBuf,
    pub namespaces: Vec<String>,
    pub session_namespace: String,
    pub public_url: Option<String>,
    pub trusted_proxies: Vec<Cidr>,
    pub anonymous_allow: Vec<Cidr>,
    pub anonymous: anonymous::Limits,
    pub streams_per_session: usize,
    /// The annotation this replica writes its bytes under (`traffic.rs`).
    pub bytes_key: String,
    pub limits: tidepool_serve::Limits,
    /// A create's body must come in full within this.
    pub body_deadline: Duration,
    pub tls: Option<crate::tls::Files>,
    pub cors_origins: Vec<String>,
    pub ui_dir: Option<PathBuf>,
    /// The router's reverse proxy, when paths are routed.
    pub routes: Option<crate::routed::Routes>,
    /// Send `Strict-Transport-Security`: the gateway serves TLS, or its
    /// public URL is https (TLS ends in front of it).
    pub hsts: bool,
}

impl Flags {
    /// Where the UDP echo relay listens, if anywhere.
    pub fn udp_address(&self) -> Result<Option<SocketAddr>, BadFlag> {
        match self.udp_listen.trim() {
            "same" => Ok(Some(self.listen)),
            "off" => Ok(None),
            address => address.parse().map(Some).map_err(|_| BadFlag {
                flag: "udp-listen",
                reason: format!("{address:?} is not `same`, `off` or an address with a port"),
            }),
        }
    }

    pub fn settings(&self) -> Result<Settings, BadFlag> {
        self.udp_address()?;
        let cidrs =
            |flag: &'static str, text: &str| parse_deny(text).map_err(|e| BadFlag { flag, reason: e.to_string() });
        for namespace in self.namespaces.iter().chain([&self.session_namespace]) {
            tidepool_protocol::names::namespace(namespace)
                .map_err(|e| BadFlag { flag: "namespaces", reason: e.to_string() })?;
        }
        if !self.namespaces.contains(&self.session_namespace) {
            return Err(BadFlag { flag: "session-namespace", reason: "must be one of --namespaces".into() });
        }
        let cors_origins = self
            .cors_origins
            .iter()
            .filter(|o| !o.trim().is_empty())
            .map(|o| crate::cors::parse_origin(o.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| BadFlag { flag: "cors-origins", reason: e.to_string() })?;
        let tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(certificate), Some(key)) => {
                Some(crate::tls::Files { certificate: certificate.clone(), key: key.clone() })
            }
            _ => None,
        };
        let routes = crate::routed::Routes::parse(&crate::routed::RouteFlags {
            prefixes: &self.routed_paths,
            tiers_json: &self.routed_tiers,
            default_tier: self.routed_default_tier.as_deref(),
            tier_header: &self.routed_tier_header,
            tier_query: &self.routed_tier_query,
            tier_field: &self.routed_tier_field,
            sticky_header: &self.routed_sticky_header,
            backend_port: self.routed_backend_port,
        })
        .map_err(|reason| BadFlag { flag: "routed-paths", reason })?;
        let https_url = self.public_url.as_deref().is_some_and(|u| u.starts_with("https://"));
        Ok(Settings {
            hsts: tls.is_some() || https_url,
            tls,
            cors_origins,
            ui_dir: self.ui_dir.clone(),
            routes,
            operator_url: self.operator_url.trim_end_matches('/').to_string(),
            token_file: self.token_file.clone(),
            namespaces: self.namespaces.clone(),
            session_namespace: self.session_namespace.clone(),
            public_url: self.public_url.as_ref().map(|u| u.trim_end_matches('/').to_string()),
            trusted_proxies: cidrs("trusted-proxies", &self.trusted_proxies)?,
            anonymous_allow: cidrs("anonymous-allow", &self.anonymous_allow)?,
            anonymous: anonymous::Limits {
                sessions_per_hour: self.anonymous_sessions_per_hour,
                concurrent_sessions: self.anonymous_concurrent_sessions,
                bytes_per_hour: self.anonymous_mib_per_hour.saturating_mul(1 << 20),
            },
            bytes_key: crate::traffic::annotation_key(&self.replica.clone().unwrap_or_else(host_name)),
            streams_per_session: self.streams_per_session.max(1),
            body_deadline: Duration::from_secs(self.body_timeout_seconds.max(1)),
            limits: tidepool_serve::Limits {
                max_connections: self.max_connections.max(1),
                header_timeout: Duration::from_secs(self.header_timeout_seconds.max(1)),
                // Uploads stream for as long as a test runs; each pause is bounded.
                body_timeout: tidepool_serve::BodyTimeout::Pause(Duration::from_secs(self.body_timeout_seconds.max(1))),
                idle_timeout: Duration::from_secs(self.idle_timeout_seconds.max(1)),
                write_timeout: Duration::from_secs(self.write_timeout_seconds.max(1)),
            },
        })
    }
}

/// The host's name: in a pod, the pod's.
fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "gateway".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Flags {
        Flags::try_parse_from([&["tidepool-gateway"], args].concat()).unwrap()
    }

    #[test]
    fn defaults_parse() {
        let settings = parse(&[]).settings().unwrap();
        assert_eq!(settings.namespaces, ["default"]);
        assert!(settings.trusted_proxies.is_empty() && settings.anonymous_allow.is_empty());
        assert_eq!(settings.anonymous.concurrent_sessions, 2);
        assert!(settings.routes.is_none());
        assert_eq!(settings.anonymous.bytes_per_hour, 50 << 30);
        let named = parse(&["--replica", "gw-1"]).settings().unwrap();
        assert_eq!(named.bytes_key, "bytes.tidepool.dev/gw-1");
        assert_eq!(parse(&[]).udp_address().unwrap(), Some("0.0.0.0:8080".parse().unwrap()));
        assert_eq!(parse(&["--udp-listen", "off"]).udp_address().unwrap(), None);
        assert_eq!(parse(&["--udp-listen", "[::]:5000"]).udp_address().unwrap(), Some("[::]:5000".parse().unwrap()));
        assert_eq!(parse(&["--udp-listen", "5000"]).settings().unwrap_err().flag, "udp-listen");
        let routed = parse(&["--routed-paths", "/app", "--routed-tiers", r#"{"small":{"vcpu":1,"memoryMiB":64}}"#]);
        assert_eq!(routed.settings().unwrap().routes.unwrap().prefixes, ["/app"]);
    }

    #[test]
    fn bad_ranges_and_names_are_refused_by_flag() {
        let error = parse(&["--trusted-proxies", "10.0.0.0/8,nonsense"]).settings().unwrap_err();
        assert_eq!(error.flag, "trusted-proxies");
        let error = parse(&["--namespaces", "Not_A_Name"]).settings().unwrap_err();
        assert_eq!(error.flag, "namespaces");
        let error = parse(&["--namespaces", "a,b", "--session-namespace", "c"]).settings().unwrap_err();
        assert_eq!(error.flag, "session-namespace");
        let error = parse(&["--cors-origins", "https://ok.example,*"]).settings().unwrap_err();
        assert_eq!(error.flag, "cors-origins");
        let error = parse(&["--routed-paths", "/s"]).settings().unwrap_err();
        assert_eq!(error.flag, "routed-paths");
        // A certificate needs its key.
        assert!(Flags::try_parse_from(["tidepool-gateway", "--tls-cert-file", "/c"]).is_err());
    }

    #[test]
    fn strict_transport_security_goes_with_tls_here_or_in_front() {
        assert!(!parse(&[]).settings().unwrap().hsts);
        assert!(parse(&["--public-url", "https://speed.example.com"]).settings().unwrap().hsts);
        let tls = parse(&["--tls-cert-file", "/c", "--tls-key-file", "/k"]).settings().unwrap();
        assert!(tls.hsts && tls.tls.is_some());
    }
}
