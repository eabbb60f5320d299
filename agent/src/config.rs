//! The agent's flags, and the checks that turn them into a [`Config`].
//!
//! Everything here is pure: [`Config::from_args`] only looks at the flags,
//! so a bad flag stops the agent before it touches a file or the network.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use thiserror::Error;
use tidepool_wire::report::{Coordinates, ReportKind, is_object_name};

/// The most windows a report may carry (the operator refuses more).
pub const MAX_WINDOWS: usize = 8;
/// The longest window: a day.
pub const MAX_WINDOW_SECONDS: u32 = 24 * 3600;
/// Report and sample intervals, in milliseconds.
pub const INTERVAL_MS: std::ops::RangeInclusive<u32> = 50..=600_000;

/// Samples this node (or server) and reports it to the Tidepool operator.
#[derive(Parser, Debug, Clone)]
#[command(name = "tidepool-agent", version, about)]
pub struct Args {
    /// The operator's base URL (plain HTTP), e.g. http://tidepool-operator.tidepool-system:8080
    #[arg(long, env = "TIDEPOOL_OPERATOR_URL")]
    pub operator_url: String,

    /// The bearer token to send; re-read whenever the file changes.
    #[arg(long, env = "TIDEPOOL_AGENT_TOKEN_FILE", default_value = "/var/run/secrets/tidepool/token")]
    pub token_file: PathBuf,

    /// Report as the node Backend of this name (in the DaemonSet).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// Report as the external Backend of this name (a server outside Kubernetes).
    #[arg(long)]
    pub external: Option<String>,

    /// Where clients reach this backend: HOST or HOST:PORT.
    #[arg(long, env = "TIDEPOOL_AGENT_ADDRESS")]
    pub address: Option<String>,

    /// The backend's region.
    #[arg(long)]
    pub region: Option<String>,

    /// Latitude in degrees (give --longitude too).
    #[arg(long, allow_negative_numbers = true)]
    pub latitude: Option<f64>,

    /// Longitude in degrees (give --latitude too).
    #[arg(long, allow_negative_numbers = true)]
    pub longitude: Option<f64>,

    /// Where to serve /metrics and /healthz; its port is the report's healthPort.
    #[arg(long, default_value = "0.0.0.0:9101")]
    pub listen: SocketAddr,

    /// Open connections to /metrics and /healthz at most (Prometheus, probes).
    #[arg(long, default_value_t = 64)]
    pub max_connections: usize,

    /// Seconds a client has to send a request's head, from its first byte.
    #[arg(long, default_value_t = 5)]
    pub header_timeout_seconds: u64,

    /// Seconds a connection may sit between requests with nothing coming.
    #[arg(long, default_value_t = 60)]
    pub idle_timeout_seconds: u64,

    /// Milliseconds between reports (50 to 600000).
    #[arg(long, default_value_t = 1000)]
    pub report_interval_ms: u32,

    /// Milliseconds between samples (50 to 600000); the agent samples at
    /// least as often as it reports.
    #[arg(long, default_value_t = 1000)]
    pub sample_interval_ms: u32,

    /// Window lengths to average over, e.g. 10s,60s,15m (1 to 8; s, m or h).
    #[arg(long, default_value = "10s,60s,15m")]
    pub windows: String,

    /// A filesystem whose size and use count as the backend's disk; repeat for more.
    #[arg(long = "disk-path", default_value = "/")]
    pub disk_paths: Vec<PathBuf>,

    /// Where the host's /proc is mounted.
    #[arg(long, default_value = "/proc")]
    pub proc_root: PathBuf,

    /// Load NVML from this file instead of the system's libnvidia-ml.
    #[arg(long)]
    pub nvml_library: Option<PathBuf>,

    /// Do not sample GPUs.
    #[arg(long)]
    pub no_gpu: bool,

    /// Consecutive failed reports that open the circuit breaker.
    #[arg(long, default_value_t = 5)]
    pub breaker_failures: u32,

    /// Seconds the open breaker waits before it tries one report.
    #[arg(long, default_value_t = 30)]
    pub breaker_open_seconds: u64,
}

/// Who the agent reports as, and what it says about where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub backend: String,
    pub kind: ReportKind,
    pub address: Option<String>,
    pub region: Option<String>,
    pub coordinates: Option<Coordinates>,
    pub health_port: u16,
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub identity: Identity,
    /// The full URL reports go to.
    pub report_url: String,
    pub token_file: PathBuf,
    pub listen: SocketAddr,
    /// The metrics server's limits.
    pub server_limits: tidepool_serve::Limits,
    pub report_interval: Duration,
    pub sample_interval: Duration,
    /// Window lengths in seconds, shortest first.
    pub windows: Vec<u32>,
    pub disk_paths: Vec<PathBuf>,
    pub proc_root: PathBuf,
    pub gpu: GpuMode,
    pub breaker_failures: u32,
    pub breaker_open: Duration,
}

/// Whether and where to find NVML.
#[derive(Debug, Clone, PartialEq)]
pub enum GpuMode {
    Off,
    /// The system's libnvidia-ml.
    System,
    Library(PathBuf),
}

/// A flag that cannot be used; the message says which and why.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    #[error("give exactly one of --node-name (or NODE_NAME) and --external")]
    Identity,
    #[error("backend name {0:?} must be a lowercase RFC 1123 name (a-z, 0-9, '-', '.') of at most 253 characters")]
    BackendName(String),
    #[error("--operator-url {0:?} must start with http:// and name a host (the agent speaks plain HTTP)")]
    OperatorUrl(String),
    #[error("--address {0:?} must be a host or IP with an optional :port, without spaces or '/'")]
    Address(String),
    #[error("--external needs --address: where clients reach the server")]
    ExternalAddress,
    #[error("--region must be 1 to 63 characters")]
    Region,
    #[error("give both --latitude and --longitude, or neither")]
    CoordinatesHalf,
    #[error("--latitude must be within ±90 and --longitude within ±180")]
    CoordinatesRange,
    #[error("--{flag} must be between 50 and 600000 milliseconds, not {value}")]
    Interval { flag: &'static str, value: u32 },
    #[error("--windows: {0}")]
    Windows(String),
    #[error("--breaker-failures must be at least 1")]
    BreakerFailures,
    #[error("--breaker-open-seconds must be between 1 and 3600")]
    BreakerOpen,
    #[error("--disk-path must not be empty")]
    DiskPath,
}

impl Config {
    /// Checks every flag and derives the values the agent runs on.
    pub fn from_args(args: Args) -> Result<Config, ConfigError> {
        let (backend, kind) = match (args.node_name, args.external) {
            (Some(name), None) => (name, ReportKind::Node),
            (None, Some(name)) => (name, ReportKind::External),
            _ => return Err(ConfigError::Identity),
        };
        if !is_object_name(&backend) {
            return Err(ConfigError::BackendName(backend));
        }
        let base = args.operator_url.trim_end_matches('/');
        // Plain HTTP only: the client is built without TLS to stay small.
        let host = base.strip_prefix("http://");
        if host.is_none_or(|h| h.is_empty() || h.contains(char::is_whitespace)) {
            return Err(ConfigError::OperatorUrl(args.operator_url));
        }
        let report_url = format!("{base}{}", tidepool_wire::report::REPORT_PATH);
        if let Some(address) = &args.address
            && (address.is_empty() || address.len() > 261 || address.chars().any(|c| c.is_whitespace() || c == '/'))
        {
            return Err(ConfigError::Address(address.clone()));
        }
        if kind == ReportKind::External && args.address.is_none() {
            return Err(ConfigError::ExternalAddress);
        }
        if let Some(region) = &args.region
            && (region.is_empty() || region.len() > 63)
        {
            return Err(ConfigError::Region);
        }
        let coordinates = match (args.latitude, args.longitude) {
            (None, None) => None,
            (Some(latitude), Some(longitude)) => {
                if !((-90.0..=90.0).contains(&latitude) && (-180.0..=180.0).contains(&longitude)) {
                    return Err(ConfigError::CoordinatesRange);
                }
                Some(Coordinates { latitude, longitude })
            }
            _ => return Err(ConfigError::CoordinatesHalf),
        };
        for (flag, value) in
            [("report-interval-ms", args.report_interval_ms), ("sample-interval-ms", args.sample_interval_ms)]
        {
            if !INTERVAL_MS.contains(&value) {
                return Err(ConfigError::Interval { flag, value });
            }
        }
        let windows = parse_windows(&args.windows).map_err(ConfigError::Windows)?;
        if args.breaker_failures == 0 {
            return Err(ConfigError::BreakerFailures);
        }
        if !(1..=3600).contains(&args.breaker_open_seconds) {
            return Err(ConfigError::BreakerOpen);
        }
        if args.disk_paths.iter().any(|p| p.as_os_str().is_empty()) {
            return Err(ConfigError::DiskPath);
        }
        let gpu = match (args.no_gpu, args.nvml_library) {
            (true, _) => GpuMode::Off,
            (false, Some(path)) => GpuMode::Library(path),
            (false, None) => GpuMode::System,
        };
        Ok(Config {
            identity: Identity {
                backend,
                kind,
                address: args.address,
                region: args.region,
                coordinates,
                health_port: args.listen.port(),
            },
            report_url,
            token_file: args.token_file,
            listen: args.listen,
            server_limits: tidepool_serve::Limits {
                max_connections: args.max_connections.max(1),
                header_timeout: Duration::from_secs(args.header_timeout_seconds.max(1)),
                // Nothing the agent serves takes a body: one sent has the head's time.
                body_timeout: tidepool_serve::BodyTimeout::Whole(Duration::from_secs(
                    args.header_timeout_seconds.max(1),
                )),
                idle_timeout: Duration::from_secs(args.idle_timeout_seconds.max(1)),
                // What the agent serves is small: a client that takes none of it is gone.
                write_timeout: Duration::from_secs(args.idle_timeout_seconds.max(1)),
            },
            report_interval: Duration::from_millis(args.report_interval_ms.into()),
            sample_interval: Duration::from_millis(args.sample_interval_ms.into()),
            windows,
            disk_paths: args.disk_paths,
            proc_root: args.proc_root,
            gpu,
            breaker_failures: args.breaker_failures,
            breaker_open: Duration::from_secs(args.breaker_open_seconds),
        })
    }

    /// How often the agent samples: often enough for both flags.
    pub fn tick(&self) -> Duration {
        self.sample_interval.min(self.report_interval)
    }
}

/// Parses a list such as `10s,60s,15m` into seconds, shortest first.
pub fn parse_windows(list: &str) -> Result<Vec<u32>, String> {
    let mut windows = Vec::new();
    for item in list.split(',').map(str::trim) {
        if item.is_empty() {
            return Err(format!("{list:?} has an empty entry; write e.g. 10s,60s,15m"));
        }
        let seconds = parse_window(item)?;
        if windows.contains(&seconds) {
            return Err(format!("{item:?} is listed twice"));
        }
        windows.push(seconds);
    }
    if windows.len() > MAX_WINDOWS {
        return Err(format!("at most {MAX_WINDOWS} windows, not {}", windows.len()));
    }
    windows.sort_unstable();
    Ok(windows)
}

fn parse_window(item: &str) -> Result<u32, String> {
    let split = item.len() - item.chars().last().map_or(0, char::len_utf8);
    let (number, unit) = item.split_at(split);
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return Err(format!("{item:?} needs a number and a unit: s, m or h (e.g. 10s, 15m, 1h)")),
    };
    let count: u32 = match number.parse() {
        Ok(n) if !number.starts_with('+') => n,
        _ => return Err(format!("{item:?} needs a whole number before its unit (e.g. 10s, 15m, 1h)")),
    };
    match count.checked_mul(scale) {
        Some(seconds) if (1..=MAX_WINDOW_SECONDS).contains(&seconds) => Ok(seconds),
        _ => Err(format!("{item:?} must be from 1s to 24h")),
    }
}

/// The window's name in metric labels: `10s`, `1m`, `15m`, `1h`.
pub fn window_label(seconds: u32) -> String {
    if seconds.is_multiple_of(3600) {
        format!("{}h", seconds / 3600)
    } else if seconds.is_multiple_of(60) {
        format!("{}m", seconds / 60)
    } else {
        format!("{seconds}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["tidepool-agent", "--operator-url", "http://op:8080/"];
        argv.extend_from_slice(extra);
        Config::from_args(Args::try_parse_from(argv).expect("clap accepts the flags"))
    }

    #[test]
    fn windows_parse_and_sort() {
        assert_eq!(parse_windows("10s,60s,15m"), Ok(vec![10, 60, 900]));
        assert_eq!(parse_windows("1h, 5s"), Ok(vec![5, 3600]));
        for garbage in
            ["", "10", "10x", "s", "-5s", "+5s", "0s", "25h", "10s,,1m", "1m,60s", "5µ", "1s,2s,3s,4s,5s,6s,7s,8s,9s"]
        {
            assert!(parse_windows(garbage).is_err(), "{garbage:?} should be refused");
        }
    }

    #[test]
    fn window_labels() {
        assert_eq!(window_label(10), "10s");
        assert_eq!(window_label(60), "1m");
        assert_eq!(window_label(900), "15m");
        assert_eq!(window_label(90), "90s");
        assert_eq!(window_label(7200), "2h");
    }

    #[test]
    fn defaults() {
        let config = args(&["--node-name", "node-1"]).unwrap();
        assert_eq!(config.identity.backend, "node-1");
        assert_eq!(config.identity.kind, ReportKind::Node);
        assert_eq!(config.identity.health_port, 9101);
        assert_eq!(config.report_url, "http://op:8080/api/v1/agents/report");
        assert_eq!(config.windows, vec![10, 60, 900]);
        assert_eq!(config.tick(), Duration::from_secs(1));
        assert_eq!(config.disk_paths, vec![PathBuf::from("/")]);
        assert_eq!(config.gpu, GpuMode::System);
        assert_eq!(config.breaker_failures, 5);
        assert_eq!(config.breaker_open, Duration::from_secs(30));
    }

    #[test]
    fn external_with_place() {
        let config = args(&[
            "--external",
            "edge-1",
            "--address",
            "203.0.113.7:443",
            "--region",
            "eu-west",
            "--latitude",
            "-33.9",
            "--longitude",
            "151.2",
            "--listen",
            "127.0.0.1:9200",
            "--report-interval-ms",
            "100",
            "--nvml-library",
            "/x/libnvidia-ml.so.1",
        ])
        .unwrap();
        assert_eq!(config.identity.kind, ReportKind::External);
        assert_eq!(config.identity.coordinates, Some(Coordinates { latitude: -33.9, longitude: 151.2 }));
        assert_eq!(config.identity.health_port, 9200);
        assert_eq!(config.tick(), Duration::from_millis(100));
        assert_eq!(config.gpu, GpuMode::Library("/x/libnvidia-ml.so.1".into()));
        assert_eq!(args(&["--external", "e", "--address", "e.example", "--no-gpu"]).unwrap().gpu, GpuMode::Off);
        assert_eq!(args(&["--external", "e"]).unwrap_err(), ConfigError::ExternalAddress);
    }

    #[test]
    fn bad_flags_are_refused_clearly() {
        assert_eq!(args(&[]).unwrap_err(), ConfigError::Identity);
        assert_eq!(args(&["--node-name", "a", "--external", "b"]).unwrap_err(), ConfigError::Identity);
        assert!(matches!(args(&["--node-name", "Node_1"]), Err(ConfigError::BackendName(_))));
        assert_eq!(args(&["--node-name", "a", "--latitude", "1"]).unwrap_err(), ConfigError::CoordinatesHalf);
        assert_eq!(
            args(&["--node-name", "a", "--latitude", "91", "--longitude", "0"]).unwrap_err(),
            ConfigError::CoordinatesRange
        );
        assert!(matches!(args(&["--node-name", "a", "--address", "a b"]), Err(ConfigError::Address(_))));
        assert!(matches!(
            args(&["--node-name", "a", "--report-interval-ms", "10"]),
            Err(ConfigError::Interval { flag: "report-interval-ms", value: 10 })
        ));
        assert!(matches!(args(&["--node-name", "a", "--windows", "10q"]), Err(ConfigError::Windows(_))));
        assert_eq!(args(&["--node-name", "a", "--breaker-failures", "0"]).unwrap_err(), ConfigError::BreakerFailures);
        let url = |u: &str| {
            Config::from_args(Args::try_parse_from(["a", "--operator-url", u, "--node-name", "n"]).unwrap()).map(|_| ())
        };
        assert!(matches!(url("op:8080"), Err(ConfigError::OperatorUrl(_))));
        assert!(matches!(url("http://"), Err(ConfigError::OperatorUrl(_))));
        assert!(matches!(url("https://op.example"), Err(ConfigError::OperatorUrl(_))));
        assert_eq!(url("http://op.example"), Ok(()));
    }
}
