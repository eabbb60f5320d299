//! The command line: `tidepool run`, `tidepool ping`, `tidepool session` and `tidepool results`.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use futures::{SinkExt, StreamExt};
use tidepool_crds::test_session::{ClientHints, ProbeTarget, Profile, SessionResults};
use tidepool_protocol::grading;
use tidepool_protocol::pod::{ClientMessage, LATENCY_WS_PATH, PodInfo, ServerMessage};
use tidepool_protocol::stored::ResultsQuery;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::engine::{self, Settings, plan};
use crate::error::{Error, Result};
use crate::operator::{CreateSession, OperatorClient, SessionView};
use crate::output::{self, Report, number};
use crate::pod::{Credentials, PodClient};
use crate::progress::Bar;

/// The environment variable that may hold the operator's API token.
pub const API_TOKEN_ENV: &str = "TIDEPOOL_API_TOKEN";
/// How long `ping` waits for a session to move to a new pod.
const HEAL_TIMEOUT: Duration = Duration::from_secs(120);
/// How often `ping` asks the operator while it waits.
const HEAL_POLL: Duration = Duration::from_millis(500);

/// Run Tidepool network sessions from a terminal.
#[derive(Parser, Debug)]
#[command(name = "tidepool", version, about, max_term_width = 100)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Get a session, run a test profile against its pod, and show the results.
    Run(RunArgs),
    /// Ping the session pod until Ctrl-C, showing which pod answers.
    Ping(PingArgs),
    /// Create, show or delete sessions through the operator's API (prints JSON).
    #[command(subcommand)]
    Session(SessionCommand),
    /// List ended sessions' results from the results store, newest first.
    Results(ResultsArgs),
    /// Tunnel local TCP connections into the cluster through a tube (a
    /// WebRTC data channel to a session pod), until Ctrl-C.
    Tube(TubeArgs),
}

#[derive(Args, Debug, Clone)]
struct TubeArgs {
    #[command(flatten)]
    operator: OperatorArgs,
    /// The WarmPool whose next free pod terminates the tube.
    #[arg(long, value_name = "POOL")]
    pool: Option<String>,
    /// An existing session whose pod terminates the tube, instead of a pool's free pod.
    #[arg(long, value_name = "SESSION")]
    session: Option<String>,
    /// The namespace of the pool or session (the operator's own when absent).
    #[arg(long, short = 'n', value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// Forward every local connection to this target, as the pod reaches it.
    #[arg(long, value_name = "HOST:PORT")]
    target: Option<String>,
    /// Where to listen for the connections --target forwards (port 0: any free port).
    #[arg(long, value_name = "ADDRESS:PORT")]
    listen: Option<std::net::SocketAddr>,
    /// Run a local SOCKS5 server here (CONNECT and UDP ASSOCIATE) whose connections go through the tube.
    #[arg(long, value_name = "ADDRESS:PORT")]
    socks5: Option<std::net::SocketAddr>,
    /// For a tube on a pool: how long its session lives (the pool's default when absent).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(i64).range(1..=86_400))]
    ttl: Option<i64>,
    /// Close the tube after this long with no connection open and nothing carried [default: 600].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(i64).range(10..=86_400))]
    idle_timeout: Option<i64>,
    /// Where the tube's UDP sockets bind, comma-separated [default: every interface, and loopback].
    #[arg(long, env = "TIDEPOOL_TUBE_ADDRESS", value_name = "IP", value_delimiter = ',')]
    ice_address: Vec<std::net::IpAddr>,
    /// A STUN or TURN server for this end's peer (stun:, turn: or turns: URL); repeatable.
    #[arg(long, value_name = "URL", value_parser = parse_ice_url)]
    ice_server: Vec<String>,
    /// The TURN servers' user name and credential.
    #[arg(long, env = "TIDEPOOL_TURN_USERNAME", value_name = "NAME", requires = "turn_credential")]
    turn_username: Option<String>,
    #[arg(
        long,
        env = "TIDEPOOL_TURN_CREDENTIAL",
        value_name = "SECRET",
        requires = "turn_username",
        hide_env_values = true
    )]
    turn_credential: Option<String>,
}

/// A STUN or TURN URL, as the Tube's `spec.iceServers` takes it.
fn parse_ice_url(text: &str) -> std::result::Result<String, String> {
    let scheme_ok = ["stun:", "stuns:", "turn:", "turns:"].iter().any(|s| text.starts_with(s));
    let fits = (6..=512).contains(&text.len()) && !text.chars().any(char::is_whitespace);
    if scheme_ok && fits {
        Ok(text.to_string())
    } else {
        Err(format!("{text:?}: expected a stun:, stuns:, turn: or turns: URL of at most 512 characters"))
    }
}

#[derive(Args, Debug, Clone)]
struct ResultsArgs {
    #[command(flatten)]
    operator: OperatorArgs,
    /// Only this WarmPool's sessions.
    #[arg(long, value_name = "POOL")]
    pool: Option<String>,
    /// The namespace (the operator's own when absent).
    #[arg(long, short = 'n', value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// Sessions that ended since: an RFC 3339 time or a span back from now (90m, 2h, 7d) [default: 24h].
    #[arg(long, value_name = "WHEN")]
    since: Option<String>,
    /// Sessions that ended until: as --since [default: now].
    #[arg(long, value_name = "WHEN")]
    until: Option<String>,
    /// Only these overall grades, comma-separated (D,F).
    #[arg(long, value_name = "GRADES")]
    grade: Option<String>,
    /// Only this client: its address, or the identity that created the session.
    #[arg(long, value_name = "CLIENT")]
    client: Option<String>,
    /// At most this many results.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=500))]
    limit: Option<u32>,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug, Clone, Default)]
struct OperatorArgs {
    /// The operator's API, for example https://tidepool.example.net.
    #[arg(long, env = "TIDEPOOL_OPERATOR", value_name = "URL")]
    operator: Option<String>,
    /// A file holding the API's bearer token; else the token itself is taken
    /// from TIDEPOOL_API_TOKEN.
    #[arg(long, env = "TIDEPOOL_API_TOKEN_FILE", value_name = "FILE")]
    api_token_file: Option<PathBuf>,
}

#[derive(Args, Debug, Clone, Default)]
struct PlacementArgs {
    /// The WarmPool to take the session's pod from.
    #[arg(long, value_name = "POOL")]
    pool: Option<String>,
    /// The namespace of the pool and the session (the operator's own when absent).
    #[arg(long, short = 'n', value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// How long the session lives (the pool's default when absent).
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(i64).range(1..=86_400))]
    ttl: Option<i64>,
    /// Sessions with the same key go to the same backend while it has room.
    #[arg(long, value_name = "KEY")]
    sticky_key: Option<String>,
    /// Where you are, in degrees, so placement picks a backend near you
    /// (else the operator may place you by your address).
    #[arg(long, value_name = "LAT,LON", value_parser = parse_location)]
    location: Option<(f64, f64)>,
}

/// `LAT,LON` in degrees: latitude -90 to 90, longitude -180 to 180.
fn parse_location(text: &str) -> std::result::Result<(f64, f64), String> {
    let expected = || format!("{text:?}: expected LATITUDE,LONGITUDE in degrees, as 48.86,2.35");
    let (latitude, longitude) = text.split_once(',').ok_or_else(expected)?;
    let latitude: f64 = latitude.trim().parse().map_err(|_| expected())?;
    let longitude: f64 = longitude.trim().parse().map_err(|_| expected())?;
    if !((-90.0..=90.0).contains(&latitude) && (-180.0..=180.0).contains(&longitude)) {
        return Err(format!("{text:?}: latitude is -90 to 90 and longitude -180 to 180"));
    }
    Ok((latitude, longitude))
}

#[derive(Args, Debug, Clone, Default)]
struct DirectArgs {
    /// Run against this session pod directly, with no operator (http://host:port).
    #[arg(long, value_name = "URL")]
    endpoint: Option<String>,
    /// The session token, with --endpoint. Base64url, so it may begin with '-'.
    #[arg(
        long,
        env = "TIDEPOOL_SESSION_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true,
        allow_hyphen_values = true
    )]
    token: Option<String>,
    /// The binding ticket for that pod, with --endpoint. May begin with '-' too.
    #[arg(long, env = "TIDEPOOL_BINDING", value_name = "TICKET", hide_env_values = true, allow_hyphen_values = true)]
    binding: Option<String>,
}

#[derive(Args, Debug, Clone)]
struct EngineArgs {
    /// Latency pings per second.
    #[arg(long, default_value_t = 10, value_name = "HZ", value_parser = clap::value_parser!(u32).range(1..=100))]
    ping_hz: u32,
    /// Parallel TCP streams per direction while loading the line.
    #[arg(long, default_value_t = 4, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=16))]
    streams: u32,
    /// Seconds per loaded phase; an idle phase lasts 0.8 of it.
    #[arg(long, default_value_t = 2.5, value_name = "SECONDS")]
    duration: f64,
    /// The line's download capacity in Mbit/s: skips the household's pre-test.
    #[arg(long, value_name = "MBPS")]
    line_mbps: Option<f64>,
    /// How long the household's users run after their baseline.
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS")]
    household_seconds: f64,
    /// How often each household user pings while its traffic runs.
    #[arg(long, default_value_t = 500, value_name = "MS")]
    household_ping_ms: u64,
}

impl Default for EngineArgs {
    fn default() -> Self {
        let defaults = Settings::default();
        Self {
            ping_hz: defaults.ping_hz,
            streams: defaults.streams as u32,
            duration: defaults.phase.as_secs_f64(),
            line_mbps: None,
            household_seconds: defaults.household.as_secs_f64(),
            household_ping_ms: 500,
        }
    }
}

impl EngineArgs {
    /// The engine's settings, checked.
    fn settings(&self, probes: Vec<ProbeTarget>) -> Result<Settings> {
        let seconds = |flag: &str, value: f64| {
            Duration::try_from_secs_f64(value)
                .map_err(|_| Error::usage(format!("{flag} must be a number of seconds, not {value}")))
        };
        let settings = Settings {
            ping_hz: self.ping_hz,
            streams: self.streams as usize,
            phase: seconds("--duration", self.duration)?,
            line_mbps: self.line_mbps,
            household: seconds("--household-seconds", self.household_seconds)?,
            household_ping: Duration::from_millis(self.household_ping_ms),
            probes,
        };
        settings.validate().map_err(Error::Usage)?;
        Ok(settings)
    }
}

/// A test profile.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ProfileArg {
    /// Idle latency, jitter and loss (2 s).
    Latency,
    /// Download then upload throughput (5 s).
    Speed,
    /// Latency idle and under download, upload and both; the bufferbloat grade (9.5 s).
    Bufferbloat,
    /// Four simulated users sharing the line (13 s).
    Household,
    /// The pod probes the session's targets.
    Probes,
}

impl From<ProfileArg> for Profile {
    fn from(profile: ProfileArg) -> Self {
        match profile {
            ProfileArg::Latency => Profile::Latency,
            ProfileArg::Speed => Profile::Speed,
            ProfileArg::Bufferbloat => Profile::Bufferbloat,
            ProfileArg::Household => Profile::Household,
            ProfileArg::Probes => Profile::Probes,
        }
    }
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    #[command(flatten)]
    operator: OperatorArgs,
    #[command(flatten)]
    placement: PlacementArgs,
    #[command(flatten)]
    direct: DirectArgs,
    /// The test profile [default: bufferbloat; with --endpoint, the session's own].
    #[arg(long, value_enum)]
    profile: Option<ProfileArg>,
    /// A probe target as JSON, e.g. '{"type":"tcp","host":"example.com","port":443}',
    /// or a JSON list of them; repeatable.
    #[arg(long = "probe", value_name = "JSON", value_parser = parse_probes)]
    probes: Vec<Vec<ProbeTarget>>,
    #[command(flatten)]
    engine: EngineArgs,
    /// Print the results as JSON (no progress bar).
    #[arg(long)]
    json: bool,
    /// Keep the session: submit the results as not final.
    #[arg(long)]
    keep: bool,
    /// Do not send the results to the pod (and the operator).
    #[arg(long)]
    no_submit: bool,
}

#[derive(Args, Debug, Clone)]
struct PingArgs {
    #[command(flatten)]
    operator: OperatorArgs,
    #[command(flatten)]
    placement: PlacementArgs,
    #[command(flatten)]
    direct: DirectArgs,
    /// Ping an existing session instead of creating one.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["pool", "endpoint"])]
    session: Option<String>,
    /// Pings per second.
    #[arg(long, default_value_t = 1, value_name = "HZ", value_parser = clap::value_parser!(u32).range(1..=100))]
    ping_hz: u32,
    /// Stop after this many pings.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// After this many answers, ask the pod to end itself, wait for the
    /// operator to move the session to a new pod, and go on there.
    #[arg(long, value_name = "N")]
    terminate_after: Option<u64>,
    /// Keep a session this command created when it ends.
    #[arg(long)]
    keep: bool,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug, Clone)]
enum SessionCommand {
    /// Create a session and wait until it is Ready.
    Create {
        #[command(flatten)]
        operator: OperatorArgs,
        #[command(flatten)]
        placement: PlacementArgs,
        /// The test profile (the operator's default, latency, when absent).
        #[arg(long, value_enum)]
        profile: Option<ProfileArg>,
        /// A probe target as JSON, or a JSON list of them; repeatable.
        #[arg(long = "probe", value_name = "JSON", value_parser = parse_probes)]
        probes: Vec<Vec<ProbeTarget>>,
    },
    /// Show a session.
    Get {
        #[command(flatten)]
        operator: OperatorArgs,
        name: String,
        #[arg(long, short = 'n', value_name = "NAMESPACE")]
        namespace: Option<String>,
    },
    /// Delete a session.
    Delete {
        #[command(flatten)]
        operator: OperatorArgs,
        name: String,
        #[arg(long, short = 'n', value_name = "NAMESPACE")]
        namespace: Option<String>,
    },
}

/// One probe target, or a list of them.
fn parse_probes(text: &str) -> std::result::Result<Vec<ProbeTarget>, String> {
    let parsed = if text.trim_start().starts_with('[') {
        serde_json::from_str(text)
    } else {
        serde_json::from_str(text).map(|target| vec![target])
    };
    parsed.map_err(|e| format!("not a probe target: {e}"))
}

/// The process's entry: parses the command line (usage errors exit with 2),
/// runs the command and turns its failure into an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tidepool: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(cli.execute());
    runtime.shutdown_background();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidepool: {e}");
            e.into()
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDEPOOL_LOG")
        // The WebRTC stack's warnings come with every tube and say nothing
        // wrong; its errors (a failed send) are shown.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rtc=error,webrtc=error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    // The WebRTC stack logs through `log`. After the subscriber, so `log`
    // skips at once what its filter drops.
    let level = tracing_log::AsLog::as_log(&tracing::level_filters::LevelFilter::current());
    let _ = tracing_log::LogTracer::builder().with_max_level(level).init();
}

impl Cli {
    pub async fn execute(self) -> Result<()> {
        match self.command {
            Command::Run(args) => run(args).await,
            Command::Ping(args) => ping(args).await,
            Command::Session(command) => session(command).await,
            Command::Results(args) => results(args).await,
            Command::Tube(args) => tube(args).await,
        }
    }
}

/// `tidepool tube`: a tunnel through a tube until Ctrl-C.
async fn tube(args: TubeArgs) -> Result<()> {
    let (place, mode) =
        crate::tube::request(args.pool, args.session, args.target.as_deref(), args.listen, args.socks5)?;
    let operator = operator_client(&args.operator, api_token_env())?;
    let ice_addresses = if args.ice_address.is_empty() {
        // A wildcard binds every interface but loopback; a pod on this machine needs loopback too.
        vec![std::net::Ipv4Addr::UNSPECIFIED.into(), std::net::Ipv4Addr::LOCALHOST.into()]
    } else {
        args.ice_address
    };
    let ice_servers = args
        .ice_server
        .into_iter()
        .map(|url| tidepool_crds::tube::IceServer {
            username: args.turn_username.clone().filter(|_| url.starts_with("turn")),
            credential: args.turn_credential.clone().filter(|_| url.starts_with("turn")),
            urls: vec![tidepool_crds::tube::IceUrl(url)],
        })
        .collect();
    let request = crate::tube::TubeRequest {
        place,
        namespace: args.namespace,
        mode,
        ttl_seconds: args.ttl,
        idle_timeout_seconds: args.idle_timeout,
        ice_addresses,
        ice_servers,
    };
    crate::tube::run(operator, request).await
}

/// `tidepool results`: stored results through the operator, as a table or JSON.
async fn results(args: ResultsArgs) -> Result<()> {
    let operator = operator_client(&args.operator, api_token_env())?;
    let query = ResultsQuery {
        namespace: args.namespace,
        pool: args.pool,
        since: args.since,
        until: args.until,
        grade: args.grade,
        client: args.client,
        limit: args.limit.map(|n| n as usize),
    };
    let page = operator.stored_results(&query).await?;
    let text = if args.json {
        // A tree of plain structs, strings and finite numbers always serialises.
        serde_json::to_string_pretty(&page).unwrap_or_default() + "\n"
    } else {
        output::stored_table(&page, std::io::stdout().is_terminal())
    };
    print!("{text}");
    Ok(())
}

/// Where a command finds its session.
#[derive(Debug)]
enum Target {
    /// Through the operator.
    Operator(OperatorClient),
    /// At a pod, with credentials in hand.
    Direct { endpoint: String, credentials: Credentials },
}

/// The target from the flags: `--endpoint` with `--token` and `--binding`,
/// or the operator with its token. `api_token_env` is TIDEPOOL_API_TOKEN.
fn target(
    operator: &OperatorArgs,
    placement: &PlacementArgs,
    direct: &DirectArgs,
    api_token_env: Option<String>,
) -> Result<Target> {
    if let Some(endpoint) = &direct.endpoint {
        if placement.pool.is_some() {
            return Err(Error::usage("--endpoint runs against a pod without the operator: leave out --pool"));
        }
        let (Some(token), Some(binding)) = (&direct.token, &direct.binding) else {
            return Err(Error::usage(
                "--endpoint needs --token and --binding (or TIDEPOOL_SESSION_TOKEN and TIDEPOOL_BINDING)",
            ));
        };
        let credentials = Credentials { token: token.clone(), binding: binding.clone() };
        return Ok(Target::Direct { endpoint: endpoint.clone(), credentials });
    }
    Ok(Target::Operator(operator_client(operator, api_token_env)?))
}

fn operator_client(args: &OperatorArgs, api_token_env: Option<String>) -> Result<OperatorClient> {
    let Some(url) = &args.operator else {
        return Err(Error::usage(
            "--operator (or TIDEPOOL_OPERATOR) is required, or --endpoint to run against a pod directly",
        ));
    };
    let token = api_token(args.api_token_file.as_deref(), api_token_env)?;
    OperatorClient::new(url, &token)
}

/// The operator's token: from the file, else from the environment.
fn api_token(file: Option<&Path>, env: Option<String>) -> Result<String> {
    let token = match (file, env) {
        (Some(file), _) => std::fs::read_to_string(file)
            .map_err(|e| Error::usage(format!("cannot read the API token from {}: {e}", file.display())))?,
        (None, Some(token)) => token,
        (None, None) => {
            return Err(Error::usage(format!("the operator needs a token: --api-token-file or {API_TOKEN_ENV}")));
        }
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(Error::usage("the API token is empty"));
    }
    Ok(token)
}

fn api_token_env() -> Option<String> {
    std::env::var(API_TOKEN_ENV).ok()
}

fn create_request(
    placement: &PlacementArgs,
    profile: Option<Profile>,
    probes: Vec<ProbeTarget>,
) -> Result<CreateSession> {
    let Some(pool) = placement.pool.clone() else {
        return Err(Error::usage("--pool is required to create a session"));
    };
    Ok(CreateSession {
        pool,
        namespace: placement.namespace.clone(),
        profile,
        ttl_seconds: placement.ttl,
        sticky_key: placement.sticky_key.clone(),
        client: placement.location.map(|(latitude, longitude)| ClientHints {
            address: None,
            latitude: Some(latitude),
            longitude: Some(longitude),
        }),
        probes,
    })
}

/// Resolves when Ctrl-C is pressed (and stays resolved).
struct Interrupt(watch::Receiver<bool>);

impl Interrupt {
    fn listen() -> Self {
        let (sender, receiver) = watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = sender.send(true);
            }
        });
        Self(receiver)
    }

    async fn wait(&mut self) {
        if self.0.wait_for(|pressed| *pressed).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let probes: Vec<ProbeTarget> = args.probes.iter().flatten().cloned().collect();
    let settings = args.engine.settings(probes.clone())?;
    let profile = args.profile.map(Profile::from);
    let mut interrupt = Interrupt::listen();
    match target(&args.operator, &args.placement, &args.direct, api_token_env())? {
        Target::Direct { endpoint, credentials } => {
            let pod = PodClient::new(&endpoint, credentials)?;
            run_session(&args, &pod, profile, &settings, None, interrupt).await.map(|_| ())
        }
        Target::Operator(operator) => {
            let profile = profile.unwrap_or(Profile::Bufferbloat);
            let request = create_request(&args.placement, Some(profile), probes)?;
            if profile == Profile::Probes && request.probes.is_empty() {
                return Err(Error::usage("the probes profile needs targets: --probe"));
            }
            let status = !args.json && std::io::stderr().is_terminal();
            if status {
                eprintln!(
                    "asking {} for a session in pool {}…",
                    args.operator.operator.as_deref().unwrap_or(""),
                    request.pool
                );
            }
            let (view, _) = tokio::select! {
                created = operator.create(&request, !args.keep) => created?,
                () = interrupt.wait() => return Err(Error::Interrupted),
            };
            let outcome = match session_pod(&view) {
                Ok(pod) => run_session(&args, &pod, Some(profile), &settings, Some(&view), interrupt).await,
                Err(e) => Err(e),
            };
            // The operator releases the pod of a session that reported final
            // results; one that reported nothing would hold its pod until its
            // TTL, so it goes, unless kept.
            let released = matches!(outcome, Ok(Some(true)));
            if !args.keep
                && !released
                && let Err(e) = operator.delete(&view.name, Some(&view.namespace)).await
            {
                eprintln!("tidepool: could not delete session {}: {e}", view.name);
            }
            outcome.map(|_| ())
        }
    }
}

/// A client of the session's pod, from the operator's view of it.
fn session_pod(view: &SessionView) -> Result<PodClient> {
    let (Some(endpoint), Some(token), Some(binding)) = (&view.endpoint, &view.token, &view.binding) else {
        return Err(Error::Protocol(format!(
            "the operator's session {} is {} but has no endpoint or credentials",
            view.name, view.phase
        )));
    };
    PodClient::new(endpoint, Credentials { token: token.clone(), binding: binding.clone() })
}

/// Runs the profile against `pod`, submits the results, and prints them.
/// Returns whether the operator took the results (`None`: not submitted).
async fn run_session(
    args: &RunArgs,
    pod: &PodClient,
    profile: Option<Profile>,
    settings: &Settings,
    view: Option<&SessionView>,
    mut interrupt: Interrupt,
) -> Result<Option<bool>> {
    let info = pod.first_info().await?;
    let profile = profile.unwrap_or_else(|| session_profile(&info));
    if profile == Profile::Probes && settings.probes.is_empty() {
        return Err(Error::usage("the probes profile needs the session's targets: --probe"));
    }
    let visible = !args.json && std::io::stderr().is_terminal();
    let bar = Bar::start(plan::total(&plan(profile, settings)), visible);
    let outcome = tokio::select! {
        outcome = engine::run(pod, profile, settings, bar.clone()) => outcome,
        () = interrupt.wait() => Err(Error::Interrupted),
    };
    bar.finish();
    let mut report = report(pod, profile, &info, view, outcome?);
    let mut submission = Ok(());
    if !args.no_submit {
        match pod.submit(&report.results, !args.keep).await {
            Ok(accepted) => {
                report.reported = Some(accepted.reported);
                if let Some(why) = accepted.report_error.filter(|_| !accepted.reported) {
                    bar.println(&format!("warning: the results did not reach the operator: {why}"));
                }
            }
            Err(e) => submission = Err(e),
        }
    }
    print(&report, args.json);
    submission.map(|()| report.reported)
}

/// The profile the session was made for, from its pod.
fn session_profile(info: &PodInfo) -> Profile {
    serde_json::from_value(serde_json::Value::String(info.profile.clone())).unwrap_or(Profile::Bufferbloat)
}

fn report(
    pod: &PodClient,
    profile: Profile,
    info: &PodInfo,
    view: Option<&SessionView>,
    results: SessionResults,
) -> Report {
    let known = |text: &str| (!text.is_empty()).then(|| text.to_string());
    Report {
        name: view.map(|v| v.name.clone()).or_else(|| known(&info.session_name)),
        namespace: view.map(|v| v.namespace.clone()).or_else(|| known(&info.namespace)),
        pod: view.and_then(|v| v.pod.clone()).or_else(|| known(&info.pod)),
        node: view.and_then(|v| v.node.clone()),
        backend: view.and_then(|v| v.backend.clone()),
        region: view.and_then(|v| v.region.clone()),
        distance_km: view.and_then(|v| v.distance_km),
        endpoint: endpoint(pod),
        profile,
        reported: None,
        results,
    }
}

/// The pod's endpoint as people write it: no trailing slash.
fn endpoint(pod: &PodClient) -> String {
    pod.endpoint().as_str().trim_end_matches('/').to_string()
}

fn print(report: &Report, json: bool) {
    let text = if json {
        output::json(report) + "\n"
    } else {
        let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        output::table(report, color)
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
}

async fn session(command: SessionCommand) -> Result<()> {
    let value = match command {
        SessionCommand::Create { operator, placement, profile, probes } => {
            let request =
                create_request(&placement, profile.map(Profile::from), probes.into_iter().flatten().collect())?;
            operator_client(&operator, api_token_env())?.create(&request, false).await?.1
        }
        SessionCommand::Get { operator, name, namespace } => {
            operator_client(&operator, api_token_env())?.get(&name, namespace.as_deref()).await?.1
        }
        SessionCommand::Delete { operator, name, namespace } => {
            operator_client(&operator, api_token_env())?.delete(&name, namespace.as_deref()).await?;
            serde_json::json!({ "name": name, "namespace": namespace, "deleted": true })
        }
    };
    println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
    Ok(())
}

/// The session `ping` follows, and how to find it again after a heal.
struct Followed {
    pod: PodClient,
    pod_name: String,
    /// The operator and the session's name and namespace, when there is one.
    operator: Option<(OperatorClient, String, String)>,
    /// Whether this command created the session.
    created: bool,
}

async fn ping(args: PingArgs) -> Result<()> {
    let mut followed = match target(&args.operator, &args.placement, &args.direct, api_token_env())? {
        Target::Direct { endpoint, credentials } => {
            if args.terminate_after.is_some() {
                return Err(Error::usage("--terminate-after needs the operator to heal the session, not --endpoint"));
            }
            let pod = PodClient::new(&endpoint, credentials)?;
            let pod_name = pod.first_info().await?.pod;
            Followed { pod, pod_name, operator: None, created: false }
        }
        Target::Operator(operator) => {
            let (view, created) = match &args.session {
                Some(name) => (operator.get(name, args.placement.namespace.as_deref()).await?.0, false),
                None => {
                    let request = create_request(&args.placement, Some(Profile::Latency), Vec::new())?;
                    (operator.create(&request, true).await?.0, true)
                }
            };
            if !view.usable() {
                let reason = view.reason.clone().unwrap_or_default();
                return Err(Error::Operator(format!("session {} is {}, not Ready {reason}", view.name, view.phase)));
            }
            let pod = session_pod(&view)?;
            let pod_name = view.pod.clone().unwrap_or_default();
            Followed { pod, pod_name, operator: Some((operator, view.name, view.namespace)), created }
        }
    };
    let outcome = follow(&args, &mut followed).await.map(|_| ());
    if let Some((operator, name, namespace)) = &followed.operator
        && followed.created
        && !args.keep
        && let Err(e) = operator.delete(name, Some(namespace)).await
    {
        eprintln!("tidepool: could not delete session {name}: {e}");
    }
    outcome
}

/// How a ping connection ended.
enum Ended {
    /// Ctrl-C, or the count reached.
    Done,
    /// The pod went away (asked to, or not).
    Lost(Error),
    /// The pod refused: no use going on.
    Failed(Error),
}

/// What `ping` saw, over every pod.
#[derive(Default)]
struct PingTally {
    sent: u64,
    rtts_ms: Vec<f64>,
    terminated: bool,
}

/// Pings until Ctrl-C or the count, healing onto new pods on the way;
/// prints a summary and returns what it saw.
async fn follow(args: &PingArgs, followed: &mut Followed) -> Result<PingTally> {
    let mut tally = PingTally::default();
    let mut interrupt = Interrupt::listen();
    let clock = Instant::now();
    if !args.json {
        println!("pinging {} on pod {} ({} per second)", endpoint(&followed.pod), followed.pod_name, args.ping_hz);
    }
    loop {
        let ended = tokio::select! {
            ended = ping_pod(args, &followed.pod, clock, &mut tally) => ended,
            () = interrupt.wait() => Ended::Done,
        };
        let error = match ended {
            Ended::Done => break,
            Ended::Failed(error) => return Err(error),
            Ended::Lost(error) => error,
        };
        let Some((operator, name, namespace)) = &followed.operator else { return Err(error) };
        if !args.json {
            println!("lost pod {}: {error}; waiting for the session to heal", followed.pod_name);
        }
        let waited = Instant::now();
        let view = tokio::select! {
            view = heal(operator, name, namespace, &followed.pod_name) => view?,
            () = interrupt.wait() => break,
        };
        followed.pod = followed
            .pod
            .rebound(view.endpoint.as_deref().unwrap_or_default(), view.binding.as_deref().unwrap_or_default())?;
        followed.pod_name = view.pod.unwrap_or_default();
        let healed = waited.elapsed().as_secs_f64();
        if args.json {
            let line = serde_json::json!({ "healed": true, "pod": followed.pod_name, "endpoint": endpoint(&followed.pod), "seconds": healed });
            println!("{line}");
        } else {
            println!(
                "session healed onto pod {} at {} after {healed:.1} s",
                followed.pod_name,
                endpoint(&followed.pod)
            );
        }
    }
    let summary = grading::summarize(&tally.rtts_ms, tally.sent);
    if args.json {
        println!("{}", serde_json::json!({ "summary": summary }));
    } else {
        println!(
            "{} sent, {} answered, {:.1} % lost; rtt median {} ms, p95 {} ms, jitter {} ms",
            tally.sent,
            tally.rtts_ms.len(),
            summary.loss_percent,
            number(summary.p50_ms),
            number(summary.p95_ms),
            number(summary.jitter_ms)
        );
    }
    Ok(tally)
}

/// How long `ping` waits for the last pongs once it has sent its count.
const LAST_PONGS: Duration = Duration::from_secs(1);

/// Pings one pod until done or the pod is lost.
async fn ping_pod(args: &PingArgs, pod: &PodClient, clock: Instant, tally: &mut PingTally) -> Ended {
    let mut socket = match crate::pod::retry_unreachable(|| pod.websocket(LATENCY_WS_PATH)).await {
        Ok(socket) => socket,
        // A refusal is no lost pod: healing would not help.
        Err(e @ (Error::Refused(_) | Error::Usage(_) | Error::Pod { .. })) => return Ended::Failed(e),
        Err(e) => return Ended::Lost(e),
    };
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / args.ping_hz);
    let mut last_pongs: Option<Instant> = None;
    let now_us = || u64::try_from(clock.elapsed().as_micros()).unwrap_or(u64::MAX);
    loop {
        let counted = args.count.is_some_and(|count| tally.sent >= count);
        if counted && (tally.rtts_ms.len() as u64 >= tally.sent || last_pongs.is_some_and(|at| Instant::now() >= at)) {
            return Ended::Done;
        }
        if counted && last_pongs.is_none() {
            last_pongs = Some(Instant::now() + LAST_PONGS);
        }
        tokio::select! {
            _ = ticks.tick(), if !counted => {
                let ping = ClientMessage::Ping { seq: tally.sent, client_time_us: now_us() };
                if let Err(e) = socket.send(Message::text(serde_json::to_string(&ping).unwrap_or_default())).await {
                    return Ended::Lost(Error::test(format!("the WebSocket broke: {e}")));
                }
                tally.sent += 1;
            }
            () = tokio::time::sleep_until(last_pongs.unwrap_or_else(Instant::now)), if last_pongs.is_some() => {}
            message = socket.next() => {
                let text = match message {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None => return Ended::Lost(Error::test("the pod closed the WebSocket")),
                    Some(Err(e)) => return Ended::Lost(Error::test(format!("the WebSocket broke: {e}"))),
                    Some(Ok(_)) => continue,
                };
                match serde_json::from_str::<ServerMessage>(&text) {
                    Ok(ServerMessage::Pong { seq, client_time_us, pod, region, .. }) => {
                        let rtt_ms = now_us().saturating_sub(client_time_us) as f64 / 1000.0;
                        tally.rtts_ms.push(rtt_ms);
                        if args.json {
                            println!("{}", serde_json::json!({ "seq": seq, "rttMs": rtt_ms, "pod": pod, "region": region }));
                        } else {
                            println!("seq={seq}  rtt {} ms  pod {pod}  region {region}", number(rtt_ms));
                        }
                        if args.terminate_after.is_some_and(|n| tally.rtts_ms.len() as u64 >= n) && !tally.terminated {
                            tally.terminated = true;
                            if !args.json {
                                println!("asking pod {pod} to terminate");
                            }
                            let terminate = serde_json::to_string(&ClientMessage::Terminate).unwrap_or_default();
                            let _ = socket.send(Message::text(terminate)).await;
                        }
                    }
                    Ok(ServerMessage::Terminating { pod }) => {
                        if !args.json {
                            println!("pod {pod} is terminating");
                        }
                    }
                    Ok(ServerMessage::Error { message }) => {
                        return Ended::Failed(Error::Protocol(format!("the pod refused a ping: {message}")));
                    }
                    Ok(_) | Err(_) => {}
                }
            }
        }
    }
}

/// Asks the operator until the session is Ready on a pod other than `old_pod`.
async fn heal(operator: &OperatorClient, name: &str, namespace: &str, old_pod: &str) -> Result<SessionView> {
    let deadline = Instant::now() + HEAL_TIMEOUT;
    loop {
        let last = match operator.get(name, Some(namespace)).await {
            Ok((view, _)) if view.usable() && view.pod.as_deref() != Some(old_pod) => return Ok(view),
            Ok((view, _)) if view.phase.has_ended() => {
                let reason = view.reason.map(|r| format!(": {r}")).unwrap_or_default();
                return Err(Error::Operator(format!("session {name} is {}{reason}", view.phase)));
            }
            Ok((view, _)) => format!("{} on pod {}", view.phase, view.pod.unwrap_or_default()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(Error::Operator(format!("session {name} did not heal within {HEAL_TIMEOUT:?} (last: {last})")));
        }
        tokio::time::sleep(HEAL_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tidepool").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(&[&["run"], args].concat()).unwrap().command {
            Command::Run(args) => args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn engine_flags_become_settings() {
        let args = run_args(&["--endpoint", "http://x", "--ping-hz", "50", "--streams", "8", "--duration", "1.5"]);
        let settings = args.engine.settings(Vec::new()).unwrap();
        assert_eq!(settings.ping_hz, 50);
        assert_eq!(settings.streams, 8);
        assert_eq!(settings.phase, Duration::from_millis(1_500));
        assert_eq!(settings.household, Duration::from_secs(10));
        let defaults = run_args(&[]).engine.settings(Vec::new()).unwrap();
        assert_eq!(defaults, Settings::default());
    }

    #[test]
    fn out_of_range_flags_are_usage_errors() {
        for bad in [["--ping-hz", "101"], ["--ping-hz", "0"], ["--streams", "0"], ["--ttl", "0"], ["--profile", "fast"]]
        {
            let error = parse(&[&["run"], &bad[..]].concat()).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{bad:?}");
        }
        for bad in [["--duration=-1"], ["--duration=0.1"], ["--line-mbps=0"], ["--household-seconds=0"]] {
            let error = run_args(&bad).engine.settings(Vec::new()).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{bad:?}");
        }
    }

    #[test]
    fn probes_parse_one_at_a_time_or_as_a_list() {
        let args = run_args(&[
            "--probe",
            r#"{"type":"tcp","host":"example.com","port":443}"#,
            "--probe",
            r#"[{"type":"dns","host":"example.com"},{"type":"http","url":"https://example.com/"}]"#,
        ]);
        let probes: Vec<ProbeTarget> = args.probes.into_iter().flatten().collect();
        assert_eq!(probes.len(), 3);
        assert_eq!(probes[2].url.as_deref(), Some("https://example.com/"));
        assert_eq!(parse(&["run", "--probe", "{"]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn the_target_is_a_pod_or_the_operator() {
        let direct = run_args(&["--endpoint", "http://127.0.0.1:8080", "--token", "t", "--binding", "b"]);
        let target = target(&direct.operator, &direct.placement, &direct.direct, None).unwrap();
        assert!(matches!(target, Target::Direct { ref endpoint, .. } if endpoint == "http://127.0.0.1:8080"));

        // Base64url credentials may begin with '-'; they are values, not flags.
        let hyphenated = run_args(&["--endpoint", "http://x", "--token", "-Tq9", "--binding", "-b_1"]);
        assert_eq!(hyphenated.direct.token.as_deref(), Some("-Tq9"));
        assert_eq!(hyphenated.direct.binding.as_deref(), Some("-b_1"));

        let usage = |args: &[&str], env: Option<&str>| {
            let args = run_args(args);
            let error =
                super::target(&args.operator, &args.placement, &args.direct, env.map(String::from)).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{args:?}");
            error.to_string()
        };
        assert!(usage(&["--endpoint", "http://x"], None).contains("--token"));
        assert!(
            usage(&["--endpoint", "http://x", "--token", "t", "--binding", "b", "--pool", "p"], None)
                .contains("--pool")
        );
        assert!(usage(&["--pool", "p"], Some("t")).contains("--operator"));
        assert!(usage(&["--operator", "http://op", "--pool", "p"], None).contains("TIDEPOOL_API_TOKEN"));

        let operator = run_args(&["--operator", "http://op:8080", "--pool", "edge"]);
        assert!(matches!(
            super::target(&operator.operator, &operator.placement, &operator.direct, Some("secret\n".into())),
            Ok(Target::Operator(_))
        ));
    }

    #[test]
    fn the_api_token_comes_from_its_file_before_the_environment() {
        let file = std::env::temp_dir().join(format!("tidepool-cli-token-{}", std::process::id()));
        std::fs::write(&file, "from-file\n").unwrap();
        assert_eq!(api_token(Some(&file), Some("from-env".into())).unwrap(), "from-file");
        assert_eq!(api_token(None, Some(" from-env ".into())).unwrap(), "from-env");
        std::fs::remove_file(&file).unwrap();
        assert_eq!(api_token(Some(&file), None).unwrap_err().exit_code(), 2);
        assert_eq!(api_token(None, Some("  ".into())).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn sessions_need_a_pool() {
        let args = run_args(&["--operator", "http://op", "--namespace", "ns", "--ttl", "60"]);
        assert_eq!(create_request(&args.placement, None, Vec::new()).unwrap_err().exit_code(), 2);
        let args = run_args(&["--pool", "edge", "--sticky-key", "alice", "--ttl", "60", "--location", "48.86, 2.35"]);
        let request = create_request(&args.placement, Some(Profile::Speed), Vec::new()).unwrap();
        assert_eq!(request.ttl_seconds, Some(60));
        assert_eq!(request.sticky_key.as_deref(), Some("alice"));
        let client = request.client.unwrap();
        assert_eq!((client.latitude, client.longitude, client.address), (Some(48.86), Some(2.35), None));
        for bad in ["48.86", "91,0", "0,181", "north,east", "NaN,0"] {
            assert!(parse_location(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ping_and_session_commands_parse() {
        assert!(parse(&["ping", "--session", "s", "--pool", "p"]).is_err());
        assert!(parse(&["ping", "--pool", "p", "--terminate-after", "5", "--ping-hz", "5"]).is_ok());
        assert!(parse(&["session", "get", "session-abc", "-n", "ns"]).is_ok());
        assert!(parse(&["session", "delete"]).is_err());
        assert!(parse(&["session", "create", "--pool", "p", "--profile", "household"]).is_ok());
    }

    /// A stand-in for the operator's `GET /api/v1/sessions/{name}`: it
    /// answers `views` in turn, the last one from then on.
    async fn operator_answering(views: Vec<serde_json::Value>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            for answer in (0..).map(|i: usize| views[i.min(views.len() - 1)].to_string()) {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut request = Vec::new();
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    let mut chunk = [0u8; 1024];
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&chunk[..n]),
                    }
                }
                assert!(request.starts_with(b"GET /api/v1/sessions/alice?namespace=default "));
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                    answer.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        format!("http://{address}")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ping_follows_the_session_onto_a_new_pod_after_terminate() {
        use tidepool_session::server::{Server, ServerConfig};
        use tidepool_session::state::PodIdentity;
        use tidepool_wire::token::{PoolSigningKey, SessionClaims};

        let key = PoolSigningKey::generate().unwrap();
        let start = async |pod: &str| {
            let identity =
                PodIdentity { pod: pod.into(), namespace: "default".into(), pool: "edge".into(), region: "lab".into() };
            let mut config = ServerConfig::new(identity, key.public());
            config.listen = "127.0.0.1:0".parse().unwrap();
            config.udp_port = Some(0);
            Server::start(config).await.unwrap()
        };
        let (a, b) = (start("edge-a").await, start("edge-b").await);
        let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
        let claims = SessionClaims {
            sid: "sid".into(),
            ns: "default".into(),
            name: "alice".into(),
            pool: "edge".into(),
            profile: "latency".into(),
            exp,
            probes: None,
            tier: 1,
            thresholds: None,
            kid: String::new(),
        };
        let token = key.sign_session(&claims);
        let view = |pod: &str, server: &Server| {
            serde_json::json!({
                "name": "alice", "namespace": "default", "pool": "edge", "phase": "Ready", "pod": pod,
                "endpoint": format!("http://{}", server.http_addr()), "token": token, "binding": key.sign_binding("sid", pod),
            })
        };
        // The operator has not noticed at first: the old pod, twice.
        let operator = operator_answering(vec![view("edge-a", &a), view("edge-a", &a), view("edge-b", &b)]).await;

        let Command::Ping(args) =
            parse(&["ping", "--count", "6", "--terminate-after", "2", "--ping-hz", "20"]).unwrap().command
        else {
            panic!("not ping");
        };
        let credentials = Credentials { token: token.clone(), binding: key.sign_binding("sid", "edge-a") };
        let mut followed = Followed {
            pod: PodClient::new(&format!("http://{}", a.http_addr()), credentials).unwrap(),
            pod_name: "edge-a".into(),
            operator: Some((OperatorClient::new(&operator, "api-token").unwrap(), "alice".into(), "default".into())),
            created: false,
        };
        let terminated = tokio::spawn(async move { a.terminate_requested().await });
        let tally = tokio::time::timeout(Duration::from_secs(30), follow(&args, &mut followed)).await.unwrap().unwrap();
        assert!(tally.terminated);
        terminated.await.unwrap();
        assert_eq!(followed.pod_name, "edge-b");
        assert_eq!(followed.pod.endpoint().as_str(), format!("http://{}/", b.http_addr()));
        assert_eq!(tally.sent, 6);
        // The pings sent to the ending pod after the terminate may be lost.
        assert!(tally.rtts_ms.len() >= 4, "{} answered", tally.rtts_ms.len());
    }

    #[test]
    fn the_session_profile_comes_from_the_pod() {
        let info = PodInfo {
            pod: "p".into(),
            namespace: "ns".into(),
            pool: "edge".into(),
            region: "r".into(),
            session_id: "sid".into(),
            session_name: "s".into(),
            profile: "household".into(),
            expires_at: 0,
            udp_port: 8080,
        };
        assert_eq!(session_profile(&info), Profile::Household);
        assert_eq!(session_profile(&PodInfo { profile: "?".into(), ..info }), Profile::Bufferbloat);
    }
}
