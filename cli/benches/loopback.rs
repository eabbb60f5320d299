//! The session pod and the `tidepool` CLI against iperf3 and irtt, on loopback.
//!
//!     cargo bench -p tidepool-cli --bench loopback
//!
//! Starts one release-built `tidepool-session` (limits raised for
//! benchmarking), an `iperf3 -s` and an `irtt server`, all on 127.0.0.1,
//! and measures, alternating the tools round by round:
//!
//! 1. Single-stream throughput: `tidepool run --profile speed --streams 1`
//!    (its download and upload, after warm-up, as the engine computes them)
//!    against `iperf3 -c -R` (server to client) and `iperf3 -c`. CPU per
//!    Gbit/s of each side comes from utime+stime in /proc/<pid>/stat,
//!    sampled every 50 ms, over the same part of each transfer (its last
//!    75 %, found from the pod's byte counters, or for iperf3 from the
//!    loopback device's byte count).
//! 2. Idle latency: the pod's UDP echo, driven from here at 100 probes a
//!    second, and the CLI's WebSocket pings (`--profile latency
//!    --ping-hz 100`) against `irtt client -i 10ms -d 5s`.
//! 3. UDP at 100 Mbit/s: 1200-byte probes paced from here for 5 s, loss
//!    counted, against `iperf3 -u -b 100M -t 5`.
//! 4. Eight users at once: eight `tidepool` processes, one download stream
//!    each, against `iperf3 -P 8 -R`.
//!
//! `TIDEPOOL_BENCH_ROUNDS` (default 5) sets the rounds of 1 and 2; the
//! figures are medians over them. Every child is killed when the bench
//! ends, panics included (and by the kernel if the bench itself dies), and
//! the whole run is bounded by a watchdog.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tidepool_protocol::pod::{METRICS_PATH, UDP_GRANT_PATH, UdpGrant, UdpProbe};
use tidepool_tests::dies_with_parent;
use tidepool_wire::token::{PoolSigningKey, SessionClaims};

const POD: &str = "bench-pod";
const SID: &str = "bench-session";
/// Seconds of each transfer, and of each latency series.
const SECONDS: u64 = 5;
/// The part of a transfer the engine skips as warm-up; CPU skips it too.
const WARMUP_SHARE: f64 = 0.25;
/// How often CPU and byte counters are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// The measurements may take no longer than this, and this per round (a
/// round takes about 45 s).
const WATCHDOG_BASE: Duration = Duration::from_secs(120);
const WATCHDOG_PER_ROUND: Duration = Duration::from_secs(90);
/// Any one client process may take no longer than this.
const CLIENT_LIMIT: Duration = Duration::from_secs(60);
/// The latency series: a probe every 10 ms, 60 bytes (irtt's default size).
const PROBE_EVERY: Duration = Duration::from_millis(10);
const PROBE_BYTES: usize = 60;
/// The UDP load: 1200-byte datagrams at 100 Mbit/s.
const LOAD_BYTES: usize = 1200;
const LOAD_MBPS: f64 = 100.0;
const USERS: usize = 8;

fn main() {
    // `cargo bench` passes --bench; nothing else is taken.
    let rounds: usize = std::env::var("TIDEPOOL_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(5).max(1);
    let iperf3 = tool("iperf3", "IPERF3", "apt-get install -y iperf3");
    let irtt = tool("irtt", "IRTT", "apt-get install -y irtt");
    let session_bin = workspace_binary("tidepool-session", "tidepool-session");
    // The measurements are bounded as a whole (the build above by cargo's own
    // end); each client also has its own limit.
    let limit = WATCHDOG_BASE + WATCHDOG_PER_ROUND * rounds as u32;
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        // Exiting kills every child: each dies with its parent (PDEATHSIG).
        eprintln!("loopback: still running after {limit:?}; giving up");
        std::process::exit(2);
    });
    let cli = PathBuf::from(env!("CARGO_BIN_EXE_tidepool"));
    let dir = TempDir::new();

    println!("loopback: {} cores, load average {}", cores(), first_line("/proc/loadavg"));
    println!("loopback: {}; {}", version(&iperf3, "--version"), version(&irtt, "version"));

    let pod = Pod::start(&session_bin, &cli, &dir.0);
    let iperf_port = free_tcp_port();
    let iperf_server = Server::spawn(
        "iperf3",
        Command::new(&iperf3).args(["-s", "-B", "127.0.0.1", "-p", &iperf_port.to_string()]),
        &dir.0,
    );
    wait_tcp(iperf_port, &iperf_server);
    let irtt_port = free_udp_port();
    let irtt_server =
        Server::spawn("irtt", Command::new(&irtt).args(["server", "-b", &format!("127.0.0.1:{irtt_port}")]), &dir.0);
    std::thread::sleep(Duration::from_millis(300));
    irtt_server.check();

    // 1. Throughput, one stream.
    let mut ours_rounds = Vec::new();
    let mut peer_down = Vec::new();
    let mut peer_up = Vec::new();
    for round in 1..=rounds {
        let ours = pod.speed();
        println!("round {round}: tidepool download {}", ours.download);
        println!("round {round}: tidepool upload   {}", ours.upload);
        ours_rounds.push(ours);
        let down = iperf_tcp(&iperf3, iperf_port, iperf_server.pid(), true);
        println!("round {round}: iperf3 -R         {down}");
        peer_down.push(down);
        let up = iperf_tcp(&iperf3, iperf_port, iperf_server.pid(), false);
        println!("round {round}: iperf3            {up}");
        peer_up.push(up);
    }
    let ours_down: Vec<Transfer> = ours_rounds.iter().map(|r| r.download).collect();
    let ours_up: Vec<Transfer> = ours_rounds.iter().map(|r| r.upload).collect();

    // 2. Idle latency.
    let mut irtt_runs = Vec::new();
    let mut udp_runs = Vec::new();
    let mut ws_runs = Vec::new();
    for round in 1..=rounds {
        let peer = irtt_latency(&irtt, irtt_port, &dir.0, round);
        println!(
            "round {round}: irtt p50 {:.1} µs, p99 {:.1} µs ({} samples; as its client saw them p50 {:.1}, p99 {:.1})",
            peer.rtt.p50, peer.rtt.p99, peer.rtt.samples, peer.client_rtt.p50, peer.client_rtt.p99
        );
        irtt_runs.push(peer);
        let udp = pod.udp_latency();
        println!("round {round}: pod UDP p50 {:.1} µs, p99 {:.1} µs ({} samples)", udp.p50, udp.p99, udp.samples);
        udp_runs.push(udp);
        let ws = pod.websocket_latency();
        println!("round {round}: pod WebSocket p50 {:.1} µs, p99 {:.1} µs ({} samples)", ws.p50, ws.p99, ws.samples);
        ws_runs.push(ws);
    }

    // 3. UDP at 100 Mbit/s.
    let udp_load = pod.udp_load();
    println!(
        "pod UDP at 100 Mbit/s: {} sent, {} echoed by the pod, {} back, {:.3} % lost",
        udp_load.sent, udp_load.echoed_by_pod, udp_load.received, udp_load.loss_percent
    );
    let peer_udp = iperf_udp(&iperf3, iperf_port, None);
    println!(
        "iperf3 -u -b 100M: {:.3} % lost ({} of {}, {} B datagrams)",
        peer_udp.loss_percent, peer_udp.lost, peer_udp.packets, peer_udp.datagram
    );
    let iperf_udp_1200 = iperf_udp(&iperf3, iperf_port, Some(LOAD_BYTES));
    println!(
        "iperf3 -u -b 100M -l 1200: {:.3} % lost ({} of {})",
        iperf_udp_1200.loss_percent, iperf_udp_1200.lost, iperf_udp_1200.packets
    );

    // 4. Eight users.
    let users = pod.users();
    println!("{USERS} tidepool users, Mbit/s: {:?}", users.iter().map(|r| r.round()).collect::<Vec<_>>());
    let streams = iperf_streams(&iperf3, iperf_port);
    println!("iperf3 -P {USERS} -R, Mbit/s: {:?}", streams.iter().map(|r| r.round()).collect::<Vec<_>>());

    let report = Report {
        rounds,
        ours_down,
        ours_up,
        peer_down,
        peer_up,
        irtt: irtt_runs,
        udp: udp_runs,
        ws: ws_runs,
        udp_load,
        iperf_udp: peer_udp,
        iperf_udp_1200,
        users,
        streams,
    };
    report.print();
    println!();
    println!("loopback: load average at the end {}", first_line("/proc/loadavg"));
    drop(pod);
    drop(iperf_server);
    drop(irtt_server);
}

// ---------------------------------------------------------------------------
// Processes

/// A server that logs to a file and is killed when dropped.
struct Server {
    name: String,
    log: PathBuf,
    child: Child,
}

impl Server {
    fn spawn(name: &str, command: &mut Command, dir: &Path) -> Self {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).expect("creating a server log");
        let err = out.try_clone().expect("cloning a log handle");
        let child = dies_with_parent(command.stdin(Stdio::null()).stdout(out).stderr(err))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self { name: name.to_string(), log, child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics with the end of the log if the server has exited.
    fn check(&self) {
        // An exited child stays a zombie until reaped, which only Drop does.
        let exited = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .map(|s| s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
            .unwrap_or(true);
        if exited {
            panic!("{} exited; its log:\n{}", self.name, self.log_tail());
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client whose output is read as it comes, killed when dropped.
struct Client {
    what: String,
    child: Child,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl Client {
    fn spawn(what: &str, command: &mut Command) -> Self {
        let mut child = dies_with_parent(command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        let drain = |mut pipe: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                let _ = pipe.read_to_end(&mut bytes);
                bytes
            })
        };
        let stdout = child.stdout.take().map(|p| drain(Box::new(p)));
        let stderr = child.stderr.take().map(|p| drain(Box::new(p)));
        Self { what: what.to_string(), child, stdout, stderr }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the exit, within [`CLIENT_LIMIT`]; its stdout, which must
    /// be a success's.
    fn finish(mut self) -> String {
        let deadline = Instant::now() + CLIENT_LIMIT;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    let _ = self.child.kill();
                    panic!("{} did not finish within {CLIENT_LIMIT:?}", self.what);
                }
                Err(e) => panic!("waiting for {}: {e}", self.what),
            }
        };
        let take = |handle: Option<JoinHandle<Vec<u8>>>| {
            String::from_utf8_lossy(&handle.and_then(|h| h.join().ok()).unwrap_or_default()).into_owned()
        };
        let stdout = take(self.stdout.take());
        let stderr = take(self.stderr.take());
        if !status.success() {
            panic!("{} failed ({status}):\n{stderr}\n{stdout}", self.what);
        }
        stdout
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A scratch directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("tidepool-loopback-{}", std::process::id()));
        std::fs::create_dir_all(&path).expect("creating a scratch directory");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds `bin` of `package` in the profile we run in (release for
/// benches; a no-op when up to date) and returns its path beside ours.
fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "--quiet", "-p", package, "--bin", bin]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let status = build.status().expect("running cargo build");
    assert!(status.success(), "building {bin} failed: {status}");
    let here = std::env::current_exe().expect("finding the running bench");
    let dir = here.parent().expect("the bench has a directory");
    // Benches live in target/<profile>/deps; programs one level up.
    let dir = if dir.ends_with("deps") { dir.parent().unwrap_or(dir) } else { dir };
    dir.join(bin)
}

/// The path of a peer tool: `$ENV`, else `name` on PATH.
fn tool(name: &str, env: &str, install: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed: run `{install}` (or set {env}=/path/to/{name})"))
}

fn version(tool: &Path, flag: &str) -> String {
    Command::new(tool)
        .arg(flag)
        .output()
        .map(|o| String::from_utf8_lossy(&[o.stdout, o.stderr].concat()).lines().next().unwrap_or("").to_owned())
        .unwrap_or_default()
}

fn first_line(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default().lines().next().unwrap_or("").trim().to_owned()
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free TCP port").port()
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("a free UDP port").port()
}

fn wait_tcp(port: u16, server: &Server) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        server.check();
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{} never listened on {port}; its log:\n{}", server.name, server.log_tail());
}

// ---------------------------------------------------------------------------
// HTTP, by hand: a request on a fresh connection, its status and body.

fn http(port: u16, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connecting to the pod");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("setting a read timeout");
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).expect("sending a request to the pod");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).expect("reading the pod's answer");
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP answer");
    let head = String::from_utf8_lossy(&response[..split]).to_ascii_lowercase();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("an HTTP status");
    let body = response[split + 4..].to_vec();
    let body = if head.contains("transfer-encoding: chunked") { dechunk(&body) } else { body };
    (status, body)
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(end) = body.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&body[..end]).trim(), 16).unwrap_or(0);
        if size == 0 || body.len() < end + 2 + size {
            break;
        }
        out.extend_from_slice(&body[end + 2..end + 2 + size]);
        body = &body[(end + 4 + size).min(body.len())..];
    }
    out
}

/// The pod's counters: (download bytes, upload bytes, UDP datagrams echoed).
fn pod_counters(port: u16) -> [u64; 3] {
    let (_, body) = http(port, "GET", METRICS_PATH, &[]);
    let text = String::from_utf8_lossy(&body);
    let value = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name).and_then(|v| v.trim().parse::<f64>().ok()))
            .map_or(0, |v| v as u64)
    };
    [
        value("tidepool_session_download_bytes_total "),
        value("tidepool_session_upload_bytes_total "),
        value("tidepool_session_udp_datagrams_total{outcome=\"echoed\"} "),
    ]
}

/// Bytes sent through the loopback device, from /proc/net/dev.
fn loopback_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
    text.lines()
        .find_map(|line| {
            let (name, rest) = line.split_once(':')?;
            // Receive bytes are the first field; on lo they equal those sent.
            (name.trim() == "lo").then(|| rest.split_whitespace().next()?.parse().ok())?
        })
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// CPU and counters over time

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split(' ').collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    /// The server's and the client's CPU ticks.
    ticks: [u64; 2],
    counters: [u64; 2],
}

/// Where a sampler reads its byte counters.
#[derive(Clone, Copy)]
enum Counters {
    /// The pod's download and upload counts.
    Pod(u16),
    /// Bytes through the loopback device (both slots).
    Loopback,
}

/// Samples CPU ticks and byte counters in the background until stopped.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(server: u32, client: u32, counters: Counters) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples: Vec<Sample> = Vec::new();
            let mut next = Instant::now();
            while !stopped.load(Ordering::Relaxed) {
                let last = samples.last().map_or([0, 0], |s| s.ticks);
                let ticks = [cpu_ticks(server).unwrap_or(last[0]), cpu_ticks(client).unwrap_or(last[1])];
                let counters = match counters {
                    Counters::Pod(port) => {
                        let [down, up, _] = pod_counters(port);
                        [down, up]
                    }
                    Counters::Loopback => [loopback_bytes(); 2],
                };
                samples.push(Sample { at: Instant::now(), ticks, counters });
                next += SAMPLE_EVERY;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            samples
        });
        Self { stop, thread }
    }

    fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("the sampler panicked")
    }
}

/// CPU of the server and the client, in % of one core, over the last 75 %
/// of the span in which counter `which` grew (by more than a tenth of its
/// largest step: other traffic on the loopback device is not a transfer).
fn transfer_cpu(samples: &[Sample], which: usize) -> [f64; 2] {
    let step = |i: usize| samples[i].counters[which].saturating_sub(samples[i - 1].counters[which]);
    let largest = (1..samples.len()).map(step).max().unwrap_or(0);
    let rose: Vec<usize> = (1..samples.len()).filter(|&i| step(i) > largest / 10).collect();
    let (Some(&first), Some(&last)) = (rose.first(), rose.last()) else {
        panic!("no bytes moved while sampling");
    };
    // The transfer began after sample first-1 and was still going at last-1.
    let begin = samples[first - 1].at;
    let end_index = last.saturating_sub(1).max(first);
    let span = samples[end_index].at - begin;
    let from = begin + span.mul_f64(WARMUP_SHARE);
    let start_index = (first..=end_index).find(|&i| samples[i].at >= from).unwrap_or(first);
    let (a, b) = (samples[start_index], samples[end_index]);
    let seconds = (b.at - a.at).as_secs_f64().max(1e-3);
    let ticks = clock_ticks();
    [0, 1].map(|i| 100.0 * (b.ticks[i] - a.ticks[i]) as f64 / ticks / seconds)
}

// ---------------------------------------------------------------------------
// The pod and our client

struct Pod {
    server: Server,
    port: u16,
    udp: SocketAddr,
    cookie: u64,
    cli: PathBuf,
    token: String,
    binding: String,
}

/// One round of `tidepool run --profile speed`.
struct Speed {
    download: Transfer,
    upload: Transfer,
}

/// A transfer's rate and each side's CPU per Gbit/s (% of a core).
#[derive(Clone, Copy, Debug)]
struct Transfer {
    gbps: f64,
    server_cpu: f64,
    client_cpu: f64,
}

impl std::fmt::Display for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.2} Gbit/s; % of a core per Gbit/s: server {:.2}, client {:.2}",
            self.gbps, self.server_cpu, self.client_cpu
        )
    }
}

impl Transfer {
    fn new(gbps: f64, cpu: [f64; 2]) -> Self {
        Self { gbps, server_cpu: cpu[0] / gbps, client_cpu: cpu[1] / gbps }
    }
}

impl Pod {
    fn start(binary: &Path, cli: &Path, dir: &Path) -> Self {
        let key = PoolSigningKey::generate().expect("making a pool key");
        let exp = SystemTime::now().duration_since(UNIX_EPOCH).expect("the clock is after 1970").as_secs() + 24 * 3600;
        let claims = SessionClaims {
            sid: SID.into(),
            ns: "default".into(),
            name: "bench".into(),
            pool: "bench".into(),
            profile: "speed".into(),
            exp,
            probes: None,
            tier: 1,
            thresholds: None,
            kid: String::new(),
        };
        let port = free_tcp_port();
        let udp_port = free_udp_port();
        let server = Server::spawn(
            "tidepool-session",
            Command::new(binary)
                .args(["--listen", &format!("127.0.0.1:{port}"), "--udp-port", &udp_port.to_string()])
                .args(["--pod-name", POD, "--pool", "bench"])
                // Far above what a person would use: a bench moves hundreds
                // of gigabytes and opens many streams from one address.
                .args(["--tests-per-hour", "100000", "--bytes-per-hour", "1000000000000000"])
                .args(["--concurrent-sockets", "1000"])
                .env("TIDEPOOL_POOL_PUBLIC_KEY", key.public().to_base64())
                .env("RUST_LOG", "warn"),
            dir,
        );
        wait_tcp(port, &server);
        let token = key.sign_session(&claims);
        let binding = key.sign_binding(SID, POD);
        // The first authenticated request binds the pod to the session.
        let bearer = format!("Bearer {token}");
        let headers = [("Authorization", bearer.as_str()), ("x-tidepool-binding", binding.as_str())];
        let (status, body) = http(port, "POST", UDP_GRANT_PATH, &headers);
        assert_eq!(status, 200, "the UDP grant: {}", String::from_utf8_lossy(&body));
        let grant: UdpGrant = serde_json::from_slice(&body).expect("a UdpGrant");
        let udp = SocketAddr::from(([127, 0, 0, 1], grant.port));
        Self { server, port, udp, cookie: grant.cookie, cli: cli.to_path_buf(), token, binding }
    }

    /// `tidepool run` against the pod, with the credentials in its environment.
    fn cli(&self, what: &str, args: &[&str]) -> Client {
        let endpoint = format!("http://127.0.0.1:{}", self.port);
        let mut command = Command::new(&self.cli);
        command
            .args(["run", "--endpoint", &endpoint, "--json", "--no-submit"])
            .args(args)
            .env("TIDEPOOL_SESSION_TOKEN", &self.token)
            .env("TIDEPOOL_BINDING", &self.binding)
            .env_remove("TIDEPOOL_LOG");
        Client::spawn(what, &mut command)
    }

    fn results(&self, client: Client) -> Value {
        let what = client.what.clone();
        let out = client.finish();
        self.server.check();
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{what}: the JSON does not parse: {e}\n{out}"))
    }

    fn speed(&self) -> Speed {
        let duration = SECONDS.to_string();
        let client = self
            .cli("tidepool run --profile speed", &["--profile", "speed", "--streams", "1", "--duration", &duration]);
        let sampler = Sampler::start(self.server.pid(), client.pid(), Counters::Pod(self.port));
        let results = self.results(client);
        let samples = sampler.finish();
        let gbps = |key: &str| results[key].as_f64().unwrap_or_else(|| panic!("no {key} in {results}")) / 1000.0;
        Speed {
            download: Transfer::new(gbps("downloadMbps"), transfer_cpu(&samples, 0)),
            upload: Transfer::new(gbps("uploadMbps"), transfer_cpu(&samples, 1)),
        }
    }

    /// UDP probes every 10 ms for [`SECONDS`], one at a time: their round trips.
    fn udp_latency(&self) -> Quantiles {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
        socket.connect(self.udp).expect("connecting the UDP socket");
        let mut datagram = [0u8; PROBE_BYTES];
        let mut reply = [0u8; 2048];
        let count = (Duration::from_secs(SECONDS).as_micros() / PROBE_EVERY.as_micros()) as u32;
        let start = Instant::now();
        let mut rtts = Vec::new();
        for seq in 0..count {
            let due = start + PROBE_EVERY * seq;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let probe = UdpProbe { cookie: self.cookie, seq, client_time_us: 0, server_time_us: 0 };
            probe.write(&mut datagram).expect("a probe fits");
            let sent = Instant::now();
            socket.send(&datagram).expect("sending a probe");
            // Wait for this probe's echo until the next is due; later ones are lost.
            let give_up = due + PROBE_EVERY;
            loop {
                let left = give_up.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                socket.set_read_timeout(Some(left)).expect("setting a read timeout");
                let Ok(len) = socket.recv(&mut reply) else { break };
                if UdpProbe::read(&reply[..len]).is_ok_and(|p| p.seq == seq && p.cookie == self.cookie) {
                    rtts.push(sent.elapsed().as_secs_f64() * 1e6);
                    break;
                }
            }
        }
        Quantiles::of(rtts, u64::from(count))
    }

    /// The CLI's WebSocket pings at 100 Hz for an idle phase of [`SECONDS`].
    fn websocket_latency(&self) -> Quantiles {
        // The idle phase is 0.8 of --duration.
        let duration = format!("{}", SECONDS as f64 / 0.8);
        let client = self.cli(
            "tidepool run --profile latency",
            &["--profile", "latency", "--ping-hz", "100", "--duration", &duration],
        );
        let results = self.results(client);
        let latency = &results["latency"];
        let ms = |key: &str| latency[key].as_f64().unwrap_or_else(|| panic!("no latency.{key} in {results}"));
        let samples = latency["samples"].as_u64().unwrap_or(0);
        Quantiles { p50: ms("p50Ms") * 1000.0, p99: ms("p99Ms") * 1000.0, samples, sent: samples }
    }

    /// 1200-byte probes at 100 Mbit/s for [`SECONDS`], paced here; the loss.
    fn udp_load(&self) -> UdpLoad {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
        socket.connect(self.udp).expect("connecting the UDP socket");
        large_buffers(&socket);
        let receiver = socket.try_clone().expect("cloning the UDP socket");
        receiver.set_read_timeout(Some(Duration::from_millis(50))).expect("setting a read timeout");
        let per_second = LOAD_MBPS * 1e6 / 8.0 / LOAD_BYTES as f64;
        let total = (per_second * SECONDS as f64).round() as u32;
        let done = Arc::new(AtomicBool::new(false));
        let cookie = self.cookie;
        let receiving = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut seen = vec![false; total as usize];
                let mut buffer = [0u8; 2048];
                let mut received = 0u64;
                while !done.load(Ordering::Relaxed) {
                    let Ok(len) = receiver.recv(&mut buffer) else { continue };
                    let Ok(probe) = UdpProbe::read(&buffer[..len]) else { continue };
                    if probe.cookie == cookie
                        && let Some(slot) = seen.get_mut(probe.seq as usize)
                        && !*slot
                    {
                        *slot = true;
                        received += 1;
                    }
                }
                received
            })
        };
        let before = pod_counters(self.port)[2];
        let mut datagram = vec![0u8; LOAD_BYTES];
        let start = Instant::now();
        let mut sent = 0u32;
        while sent < total {
            let due = ((start.elapsed().as_secs_f64() * per_second) as u32 + 1).min(total);
            while sent < due {
                let probe = UdpProbe { cookie, seq: sent, client_time_us: 0, server_time_us: 0 };
                probe.write(&mut datagram).expect("a probe fits");
                socket.send(&datagram).expect("sending a probe");
                sent += 1;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let elapsed = start.elapsed();
        std::thread::sleep(Duration::from_secs(1));
        done.store(true, Ordering::Relaxed);
        let received = receiving.join().expect("the receiver panicked");
        let echoed_by_pod = pod_counters(self.port)[2] - before;
        self.server.check();
        UdpLoad {
            sent: u64::from(sent),
            received,
            echoed_by_pod,
            loss_percent: 100.0 * (u64::from(sent) - received) as f64 / f64::from(sent),
            mbps: f64::from(sent) * LOAD_BYTES as f64 * 8.0 / elapsed.as_secs_f64() / 1e6,
        }
    }

    /// Eight `tidepool run --profile speed --streams 1` at once: their download rates.
    fn users(&self) -> Vec<f64> {
        let duration = SECONDS.to_string();
        let clients: Vec<Client> = (0..USERS)
            .map(|i| self.cli(&format!("user {i}"), &["--profile", "speed", "--streams", "1", "--duration", &duration]))
            .collect();
        clients
            .into_iter()
            .map(|client| {
                let results = self.results(client);
                results["downloadMbps"].as_f64().unwrap_or_else(|| panic!("no downloadMbps in {results}"))
            })
            .collect()
    }
}

/// Asks for 4 MiB socket buffers each way, as the pod does.
fn large_buffers(socket: &UdpSocket) {
    use std::os::fd::AsRawFd;
    let bytes: libc::c_int = 4 * 1024 * 1024;
    for (force, plain) in [(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF), (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF)] {
        for option in [force, plain] {
            // SAFETY: the fd is the live socket; the value outlives the call.
            let set = unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    option,
                    (&raw const bytes).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if set == 0 {
                break;
            }
        }
    }
}

struct UdpLoad {
    sent: u64,
    received: u64,
    echoed_by_pod: u64,
    loss_percent: f64,
    mbps: f64,
}

// ---------------------------------------------------------------------------
// The peers

fn iperf_json(iperf3: &Path, what: &str, args: &[&str], sample: Option<u32>) -> (Value, Option<Vec<Sample>>) {
    let mut command = Command::new(iperf3);
    command.arg("-J").args(args);
    let client = Client::spawn(what, &mut command);
    let sampler = sample.map(|server| Sampler::start(server, client.pid(), Counters::Loopback));
    let out = client.finish();
    let samples = sampler.map(Sampler::finish);
    let value: Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{what}: the JSON does not parse: {e}\n{out}"));
    if let Some(error) = value.get("error") {
        panic!("{what} failed: {error}");
    }
    (value, samples)
}

/// `iperf3 -c -t 5` (with `-R`: the server sends).
fn iperf_tcp(iperf3: &Path, port: u16, server: u32, reverse: bool) -> Transfer {
    let (port, seconds) = (port.to_string(), SECONDS.to_string());
    let mut args = vec!["-c", "127.0.0.1", "-p", &port, "-t", &seconds];
    if reverse {
        args.push("-R");
    }
    let (value, samples) = iperf_json(iperf3, "iperf3 -c", &args, Some(server));
    let bps = value["end"]["sum_received"]["bits_per_second"].as_f64().expect("iperf3's received rate");
    Transfer::new(bps / 1e9, transfer_cpu(&samples.unwrap_or_default(), 0))
}

struct IperfUdp {
    loss_percent: f64,
    lost: u64,
    packets: u64,
    datagram: u64,
}

/// `iperf3 -u -b 100M -t 5`, with its default datagram size or `length`.
fn iperf_udp(iperf3: &Path, port: u16, length: Option<usize>) -> IperfUdp {
    let (port, seconds) = (port.to_string(), SECONDS.to_string());
    let length = length.map(|l| l.to_string());
    let mut args = vec!["-c", "127.0.0.1", "-p", &port, "-u", "-b", "100M", "-t", &seconds];
    if let Some(length) = &length {
        args.extend(["-l", length]);
    }
    let (value, _) = iperf_json(iperf3, "iperf3 -u", &args, None);
    // The server's count, which the client fetches at the end.
    let sum = &value["end"]["sum_received"];
    let sum = if sum.is_object() { sum } else { &value["end"]["sum"] };
    IperfUdp {
        loss_percent: sum["lost_percent"].as_f64().expect("iperf3's loss"),
        lost: sum["lost_packets"].as_u64().unwrap_or(0),
        packets: sum["packets"].as_u64().unwrap_or(0),
        datagram: value["start"]["test_start"]["blksize"].as_u64().unwrap_or(0),
    }
}

/// `iperf3 -P 8 -R -t 5`: each stream's rate, in Mbit/s.
fn iperf_streams(iperf3: &Path, port: u16) -> Vec<f64> {
    let (port, seconds, streams) = (port.to_string(), SECONDS.to_string(), USERS.to_string());
    let args = ["-c", "127.0.0.1", "-p", &port, "-t", &seconds, "-P", &streams, "-R"];
    let (value, _) = iperf_json(iperf3, "iperf3 -P", &args, None);
    value["end"]["streams"]
        .as_array()
        .expect("iperf3's streams")
        .iter()
        .map(|s| s["receiver"]["bits_per_second"].as_f64().expect("a stream's rate") / 1e6)
        .collect()
}

struct IrttRun {
    /// irtt's own round trips (it takes the server's processing time off).
    rtt: Quantiles,
    /// Receive less send on its client's clock, the server's time included.
    client_rtt: Quantiles,
}

/// `irtt client -i 10ms -d 5s -q`, its JSON written to a file.
fn irtt_latency(irtt: &Path, port: u16, dir: &Path, round: usize) -> IrttRun {
    let out = dir.join(format!("irtt-{round}.json"));
    let mut command = Command::new(irtt);
    command
        .args(["client", "-i", "10ms", "-d", &format!("{SECONDS}s"), "-q", "-o"])
        .arg(&out)
        .arg(format!("127.0.0.1:{port}"));
    Client::spawn("irtt client", &mut command).finish();
    let value: Value = serde_json::from_slice(&std::fs::read(&out).expect("irtt's JSON")).expect("irtt's JSON parses");
    let trips = value["round_trips"].as_array().expect("irtt's round trips");
    let sent = trips.len() as u64;
    let mut rtt = Vec::new();
    let mut client_rtt = Vec::new();
    for trip in trips.iter().filter(|t| t["lost"].as_str() == Some("false")) {
        rtt.push(trip["delay"]["rtt"].as_f64().expect("a round trip") / 1000.0);
        let client = &trip["timestamps"]["client"];
        let monotonic = |which: &str| client[which]["monotonic"].as_f64().expect("a client timestamp");
        client_rtt.push((monotonic("receive") - monotonic("send")) / 1000.0);
    }
    IrttRun { rtt: Quantiles::of(rtt, sent), client_rtt: Quantiles::of(client_rtt, sent) }
}

// ---------------------------------------------------------------------------
// Statistics and the report

/// Round-trip quantiles in µs, by nearest rank.
#[derive(Clone, Copy, Debug)]
struct Quantiles {
    p50: f64,
    p99: f64,
    samples: u64,
    sent: u64,
}

impl Quantiles {
    fn of(mut values: Vec<f64>, sent: u64) -> Self {
        assert!(!values.is_empty(), "no round trip came back");
        values.sort_by(f64::total_cmp);
        let rank = |q: f64| values[((q * values.len() as f64).ceil() as usize).clamp(1, values.len()) - 1];
        Self { p50: rank(0.50), p99: rank(0.99), samples: values.len() as u64, sent }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 }
}

/// Each rate's share of the fair share (total / n), and Jain's index.
fn fairness(rates: &[f64]) -> (f64, f64, f64) {
    let n = rates.len() as f64;
    let total: f64 = rates.iter().sum();
    let squares: f64 = rates.iter().map(|r| r * r).sum();
    let fair = total / n;
    let min = rates.iter().copied().fold(f64::INFINITY, f64::min) / fair;
    let max = rates.iter().copied().fold(0.0, f64::max) / fair;
    (min, max, total * total / (n * squares))
}

struct Report {
    rounds: usize,
    ours_down: Vec<Transfer>,
    ours_up: Vec<Transfer>,
    peer_down: Vec<Transfer>,
    peer_up: Vec<Transfer>,
    irtt: Vec<IrttRun>,
    udp: Vec<Quantiles>,
    ws: Vec<Quantiles>,
    udp_load: UdpLoad,
    iperf_udp: IperfUdp,
    iperf_udp_1200: IperfUdp,
    users: Vec<f64>,
    streams: Vec<f64>,
}

fn met(yes: bool) -> &'static str {
    if yes { "met" } else { "MISSED" }
}

impl Report {
    fn print(&self) {
        let m = |runs: &[Transfer], f: fn(&Transfer) -> f64| median(runs.iter().map(f).collect());
        println!();
        println!("## Results (medians of {} rounds where rounds apply)", self.rounds);
        println!();
        println!("| | tidepool | peer | ratio (tidepool / peer) | goal |");
        println!("| --- | --- | --- | --- | --- |");
        for (name, peer_name, ours, peer) in [
            ("download (pod → client)", "`iperf3 -R`", &self.ours_down, &self.peer_down),
            ("upload (client → pod)", "`iperf3`", &self.ours_up, &self.peer_up),
        ] {
            let (g, pg) = (m(ours, |t| t.gbps), m(peer, |t| t.gbps));
            let (s, ps) = (m(ours, |t| t.server_cpu), m(peer, |t| t.server_cpu));
            let (c, pc) = (m(ours, |t| t.client_cpu), m(peer, |t| t.client_cpu));
            let (total, peer_total) = (
                median(ours.iter().map(|t| t.server_cpu + t.client_cpu).collect()),
                median(peer.iter().map(|t| t.server_cpu + t.client_cpu).collect()),
            );
            println!(
                "| {name}, Gbit/s, vs {peer_name} | {g:.2} | {pg:.2} | {:.2} | ≥ 0.90: {} |",
                g / pg,
                met(g / pg >= 0.9)
            );
            println!("| … server CPU, % of a core per Gbit/s | {s:.2} | {ps:.2} | {:.2} | |", s / ps);
            println!("| … client CPU, % of a core per Gbit/s | {c:.2} | {pc:.2} | {:.2} | |", c / pc);
            println!(
                "| … both sides, % of a core per Gbit/s | {total:.2} | {peer_total:.2} | {:.2} | ≤ 1.00: {} |",
                total / peer_total,
                met(total <= peer_total)
            );
        }
        let q = |runs: &[Quantiles], f: fn(&Quantiles) -> f64| median(runs.iter().map(f).collect());
        let irtt_rtt: Vec<Quantiles> = self.irtt.iter().map(|r| r.rtt).collect();
        let irtt_client: Vec<Quantiles> = self.irtt.iter().map(|r| r.client_rtt).collect();
        let (p50, p99) = (q(&self.udp, |x| x.p50), q(&self.udp, |x| x.p99));
        let (ip50, ip99) = (q(&irtt_rtt, |x| x.p50), q(&irtt_rtt, |x| x.p99));
        let (cp50, cp99) = (q(&irtt_client, |x| x.p50), q(&irtt_client, |x| x.p99));
        let (wp50, wp99) = (q(&self.ws, |x| x.p50), q(&self.ws, |x| x.p99));
        let samples = |runs: &[Quantiles]| {
            format!("{} of {}", runs.iter().map(|x| x.samples).sum::<u64>(), runs.iter().map(|x| x.sent).sum::<u64>())
        };
        println!(
            "| idle UDP round trip p50, µs, vs irtt | {p50:.1} | {ip50:.1} (its client's view {cp50:.1}) | {:.2} ({:+.1} µs) | within 20 µs: {} |",
            p50 / ip50,
            p50 - ip50,
            met(p50 - ip50 <= 20.0)
        );
        println!(
            "| idle UDP round trip p99, µs, vs irtt | {p99:.1} | {ip99:.1} (its client's view {cp99:.1}) | {:.2} ({:+.1} µs) | within 100 µs: {} |",
            p99 / ip99,
            p99 - ip99,
            met(p99 - ip99 <= 100.0)
        );
        println!("| … echoes back | {} | {} | | |", samples(&self.udp), samples(&irtt_rtt));
        println!(
            "| idle WebSocket ping p50 / p99, µs (the CLI, 100 Hz) | {wp50:.1} / {wp99:.1} | – | {:.2} / {:.2} against irtt | |",
            wp50 / ip50,
            wp99 / ip99
        );
        let load = &self.udp_load;
        println!(
            "| UDP at 100 Mbit/s, loss % ({} B datagrams) vs `iperf3 -u -b 100M` | {:.3} ({} of {} back, {:.1} Mbit/s) | {:.3} ({} B datagrams, {} of {} lost) | – | 0.0 %: {} |",
            LOAD_BYTES,
            load.loss_percent,
            load.received,
            load.sent,
            load.mbps,
            self.iperf_udp.loss_percent,
            self.iperf_udp.datagram,
            self.iperf_udp.lost,
            self.iperf_udp.packets,
            met(load.received == load.sent)
        );
        println!(
            "| … iperf3 at the same size (`-l {LOAD_BYTES}`) | | {:.3} ({} of {} lost) | | |",
            self.iperf_udp_1200.loss_percent, self.iperf_udp_1200.lost, self.iperf_udp_1200.packets
        );
        let (min, max, jain) = fairness(&self.users);
        let (pmin, pmax, pjain) = fairness(&self.streams);
        let total: f64 = self.users.iter().sum();
        let peer_total: f64 = self.streams.iter().sum();
        println!(
            "| {USERS} users at once: min / max share of total / {USERS} vs `iperf3 -P {USERS} -R` | {min:.2} / {max:.2} | {pmin:.2} / {pmax:.2} | – | each within 10 %: {} |",
            met(min >= 0.9 && max <= 1.1)
        );
        println!("| … Jain's fairness index | {jain:.3} | {pjain:.3} | {:.3} | |", jain / pjain);
        println!(
            "| … total, Gbit/s | {:.2} | {:.2} | {:.2} | |",
            total / 1000.0,
            peer_total / 1000.0,
            total / peer_total
        );
    }
}
