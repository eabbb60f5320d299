//! Tubes on loopback, beside what people use today (issue 15's figures):
//! `cargo bench -p tidepool-tube --bench tube` (needs Debian's
//! openssh-server and openssh-client for the `ssh -L` column; run as root
//! for sshd's privilege separation directory).
//!
//! - one TCP stream, 256 MiB, to a sink: raw loopback TCP, through a tube,
//!   through `ssh -L` to sshd; three rounds taking turns, medians;
//! - setup: both peers built to the first byte through the channel, in one
//!   process, 30 times;
//! - a one-byte echo's round trip, 2,000 times, through a tube and direct;
//! - 16 connections at once for 3 s: Jain's fairness index, and the others'
//!   total with one of them stalled;
//! - resident memory per idle tube end (50 tubes) and per busy one;
//! - 100 tubes set up at once: time to connected, p50 and p99.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[path = "../tests/common/mod.rs"]
mod common;

use common::{Loopback, connect, echo_target};
use tidepool_tests::sshd::{Forward, Sshd};
use tidepool_tube::{Closer, Limits, Mux, Peer, Settings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const STREAM_BYTES: usize = 256 << 20;

/// Both ends of a tube in this process.
struct Pair {
    client: Mux,
    server: Mux,
    ends: Vec<Closer>,
}

impl Pair {
    async fn close(self) {
        self.client.close();
        self.server.close();
        for end in &self.ends {
            end.close().await;
        }
    }
}

/// The tube's settings, with any the environment overrides (to measure
/// what each one moves): `TUBE_ICE_CHECK_MS`, `TUBE_SOCKET_BUFFER`,
/// `TUBE_SCTP_MTU`.
fn settings() -> Settings {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let mut settings = Settings::loopback();
    if let Some(ms) = env("TUBE_ICE_CHECK_MS") {
        settings.ice_check_interval = Duration::from_millis(ms);
    }
    if let Some(bytes) = env("TUBE_SOCKET_BUFFER") {
        settings.socket_buffer = bytes as usize;
    }
    if let Some(mtu) = env("TUBE_SCTP_MTU") {
        settings.sctp_mtu = mtu as u32;
    }
    settings
}

async fn pair() -> Pair {
    let settings = settings();
    let (client, server) = tokio::try_join!(Peer::new(&settings), Peer::new(&settings)).unwrap();
    let offer = client.offer().await.unwrap();
    let answer = server.answer(&offer).await.unwrap();
    client.accept(&answer).await.unwrap();
    let within = Duration::from_secs(20);
    let (mut client, mut server) = tokio::try_join!(client.open(within), server.open(within)).unwrap();
    let (client_mux, client_driver) = Mux::client(client.take_channel().unwrap(), Limits::default());
    let (server_mux, server_driver) =
        Mux::server(server.take_channel().unwrap(), Limits::default(), Arc::new(Loopback));
    tokio::spawn(client_driver);
    tokio::spawn(server_driver);
    let ends = vec![client.closer(), server.closer()];
    for mut end in [client, server] {
        tokio::spawn(async move { end.bridge().await });
    }
    Pair { client: client_mux, server: server_mux, ends }
}

/// A sink on loopback that counts what each connection sends it.
struct Sink {
    port: u16,
    received: Arc<AtomicU64>,
    /// Connections whose reader stops (for the stalled connection).
    stall_next: Arc<AtomicBool>,
}

async fn sink() -> Sink {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(AtomicU64::new(0));
    let stall_next = Arc::new(AtomicBool::new(false));
    let (counting, stalling) = (received.clone(), stall_next.clone());
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let counting = counting.clone();
            let stalled = stalling.swap(false, Ordering::Relaxed);
            tokio::spawn(async move {
                if stalled {
                    // Holds the connection and never reads.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                }
                let mut buffer = vec![0u8; 256 * 1024];
                while let Ok(n) = tcp.read(&mut buffer).await {
                    if n == 0 {
                        break;
                    }
                    counting.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
    Sink { port, received, stall_next }
}

/// An application socket carried through `mux` to `port`.
async fn through(mux: &Mux, port: u16) -> TcpStream {
    connect(mux, port).await.unwrap()
}

/// MiB/s of one stream of `STREAM_BYTES` from `app` into the sink.
async fn stream(mut app: TcpStream, sink: &Sink) -> f64 {
    let before = sink.received.load(Ordering::Relaxed);
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    for _ in 0..STREAM_BYTES / chunk.len() {
        app.write_all(&chunk).await.unwrap();
    }
    while sink.received.load(Ordering::Relaxed) - before < STREAM_BYTES as u64 {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    STREAM_BYTES as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    percentile(values, 0.5)
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `ssh -L` from a local port to `target` through Debian's sshd on
/// loopback, ready; `None` without sshd.
async fn ssh_forward(target: u16) -> Option<(Sshd, Forward, u16)> {
    let sshd = Sshd::start("tube-bench").await?;
    let forward = sshd.forward(target)?;
    drop(forward.ready().await?);
    let port = forward.port;
    Some((sshd, forward, port))
}

fn version(program: &str, flag: &str) -> String {
    let out = Command::new(program).arg(flag).output().map(|o| [o.stdout, o.stderr].concat()).unwrap_or_default();
    String::from_utf8_lossy(&out).lines().next().unwrap_or("?").trim().to_string()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!(
        "tube bench on loopback, {} cores; {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        version("ssh", "-V")
    );
    let sink = sink().await;

    // One stream each way through each path, taking turns.
    let tube = pair().await;
    let forward = ssh_forward(sink.port).await;
    let mut rates: [Vec<f64>; 3] = Default::default();
    for _ in 0..3 {
        rates[0].push(stream(TcpStream::connect(("127.0.0.1", sink.port)).await.unwrap(), &sink).await);
        rates[1].push(stream(through(&tube.client, sink.port).await, &sink).await);
        if let Some((_, _, local)) = &forward {
            rates[2].push(stream(TcpStream::connect(("127.0.0.1", *local)).await.unwrap(), &sink).await);
        }
    }
    let [raw, tubed, ssh] = rates.map(|mut r| if r.is_empty() { f64::NAN } else { median(&mut r) });
    println!("one stream  raw TCP {raw:>8.1} MiB/s  tube {tubed:>8.1} MiB/s  ssh -L {ssh:>8.1} MiB/s");
    println!("            tube / raw {:.3}  tube / ssh {:.3}", tubed / raw, tubed / ssh);
    drop(forward);

    let quick = std::env::var("TUBE_BENCH_QUICK").is_ok();
    if !quick {
        others(&tube, &sink).await;
    }
    tube.close().await;
    if !quick {
        memory(&sink).await;
    }
    setup().await;
    if !quick {
        hundred().await;
    }
}

/// The echo round trips and the sixteen connections.
async fn others(tube: &Pair, sink: &Sink) {
    // One byte echoed, one at a time.
    let echo_port = echo_target().await;
    let mut direct = TcpStream::connect(("127.0.0.1", echo_port)).await.unwrap();
    direct.set_nodelay(true).unwrap();
    let mut tubed = through(&tube.client, echo_port).await;
    tubed.set_nodelay(true).unwrap();
    for (name, socket) in [("direct", &mut direct), ("tube", &mut tubed)] {
        let mut rtts = Vec::new();
        let mut byte = [0u8; 1];
        for i in 0..2_000 {
            let start = Instant::now();
            socket.write_all(&[i as u8]).await.unwrap();
            socket.read_exact(&mut byte).await.unwrap();
            rtts.push(start.elapsed().as_secs_f64() * 1e6);
        }
        rtts.sort_by(f64::total_cmp);
        println!(
            "echo 1 B    {name:<7} p50 {:>7.1} µs  p99 {:>7.1} µs",
            percentile(&rtts, 0.5),
            percentile(&rtts, 0.99)
        );
    }
    // The same while another connection of the tube streams flat out.
    let mut bulk = through(&tube.client, sink.port).await;
    let loading = Arc::new(AtomicBool::new(true));
    let still = loading.clone();
    let load = tokio::spawn(async move {
        let chunk = vec![3u8; 256 * 1024];
        while still.load(Ordering::Relaxed) && bulk.write_all(&chunk).await.is_ok() {}
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut rtts = Vec::new();
    let mut byte = [0u8; 1];
    for i in 0..500 {
        let start = Instant::now();
        tubed.write_all(&[i as u8]).await.unwrap();
        tubed.read_exact(&mut byte).await.unwrap();
        rtts.push(start.elapsed().as_secs_f64() * 1e6);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    loading.store(false, Ordering::Relaxed);
    let _ = load.await;
    rtts.sort_by(f64::total_cmp);
    println!(
        "echo 1 B    tube beside a bulk stream  p50 {:>7.1} µs  p99 {:>7.1} µs",
        percentile(&rtts, 0.5),
        percentile(&rtts, 0.99)
    );

    // Sixteen connections at once, each counted at its own sink connection.
    for stalled in [false, true] {
        let counters: Vec<Arc<AtomicU64>> = (0..16).map(|_| Arc::new(AtomicU64::new(0))).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for (i, counter) in counters.iter().enumerate() {
            sink.stall_next.store(stalled && i == 0, Ordering::Relaxed);
            let mut app = through(&tube.client, sink.port).await;
            let (counter, stop) = (counter.clone(), stop.clone());
            writers.push(tokio::spawn(async move {
                let chunk = vec![1u8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    // A write that waits (a stalled connection) is cut at the end.
                    match tokio::time::timeout(Duration::from_millis(200), app.write_all(&chunk)).await {
                        Ok(Ok(())) => {
                            counter.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        }
                        Ok(Err(_)) => break,
                        Err(_) => {}
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let start: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let moved: Vec<f64> = counters
            .iter()
            .zip(&start)
            .map(|(c, s)| (c.load(Ordering::Relaxed) - s) as f64 / 3.0 / (1 << 20) as f64)
            .collect();
        stop.store(true, Ordering::Relaxed);
        for writer in writers {
            let _ = writer.await;
        }
        let others: Vec<f64> = if stalled { moved[1..].to_vec() } else { moved.clone() };
        let sum: f64 = others.iter().sum();
        let jain = sum * sum / (others.len() as f64 * others.iter().map(|x| x * x).sum::<f64>());
        let label = if stalled { "16, one stalled" } else { "16 at once" };
        println!(
            "{label:<16} others' total {sum:>8.1} MiB/s  Jain {jain:.3}  (min {:.1}, max {:.1})",
            others.iter().copied().fold(f64::MAX, f64::min),
            others.iter().copied().fold(0.0, f64::max)
        );
    }
}

/// Resident memory of idle and busy tube ends.
async fn memory(sink: &Sink) {
    // Memory: 50 idle tubes (100 ends in this process).
    let before = rss_kib();
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(pair().await);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib();
    println!(
        "memory      idle: {:.0} KiB per end ({} → {} MiB for 100 ends)",
        (after - before) as f64 / 100.0,
        before / 1024,
        after / 1024
    );
    // Busy: 10 of them each carrying a stream.
    let stop = Arc::new(AtomicBool::new(false));
    let mut busy = Vec::new();
    for tube in idle.iter().take(10) {
        let mut app = through(&tube.client, sink.port).await;
        let stop = stop.clone();
        busy.push(tokio::spawn(async move {
            let chunk = vec![2u8; 64 * 1024];
            while !stop.load(Ordering::Relaxed) && app.write_all(&chunk).await.is_ok() {}
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = rss_kib();
    println!("memory      busy: {:.0} KiB more per busy end pair", (loaded.saturating_sub(after)) as f64 / 10.0);
    stop.store(true, Ordering::Relaxed);
    for task in busy {
        let _ = task.await;
    }
    for tube in idle {
        tube.close().await;
    }
}

/// Setup, one at a time.
async fn setup() {
    let (mut setups, mut opens) = (Vec::new(), Vec::new());
    let port = echo_target().await;
    for _ in 0..30 {
        let start = Instant::now();
        let tube = pair().await;
        opens.push(start.elapsed().as_secs_f64() * 1e3);
        let mut app = through(&tube.client, port).await;
        app.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        app.read_exact(&mut byte).await.unwrap();
        setups.push(start.elapsed().as_secs_f64() * 1e3);
        tube.close().await;
    }
    setups.sort_by(f64::total_cmp);
    opens.sort_by(f64::total_cmp);
    println!(
        "setup       to the first byte: p50 {:.1} ms  p99 {:.1} ms  (channel open: p50 {:.1} ms)",
        percentile(&setups, 0.5),
        percentile(&setups, 0.99),
        percentile(&opens, 0.5)
    );
}

/// A hundred at once.
async fn hundred() {
    let start = Instant::now();
    let mut making = tokio::task::JoinSet::new();
    for _ in 0..100 {
        making.spawn(async move {
            let tube = pair().await;
            let took = start.elapsed().as_secs_f64() * 1e3;
            (tube, took)
        });
    }
    let mut times = Vec::new();
    let mut tubes = Vec::new();
    while let Some(made) = making.join_next().await {
        if let Ok((tube, took)) = made {
            times.push(took);
            tubes.push(tube);
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "100 at once connected {} of 100: p50 {:.0} ms  p99 {:.0} ms",
        times.len(),
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
    for tube in tubes {
        tube.close().await;
    }
}
