//! The command line and environment of `tidepool-session`.

use std::net::SocketAddr;

use clap::Parser;
use tidepool_wire::token::PublicKeys;

use crate::limits::Limits;
use crate::server::ServerConfig;
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
    /// Runtime worker threads.
    #[arg(long, env = "TIDEPOOL_WORKER_THREADS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: u16,
}

impl Flags {
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
            operator_url: self.operator_url.clone(),
            ..ServerConfig::new(identity, self.pool_public_key.clone())
        }
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
        assert_eq!(config.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.udp_port, None);
        assert_eq!(config.limits, Limits::default());
        assert_eq!(config.identity.pod, "edge-abc");

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
        ] {
            let error = Flags::try_parse_from(&args).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{args:?}: {error}");
        }
    }
}
