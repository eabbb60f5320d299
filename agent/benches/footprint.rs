//! The agent's footprint beside Prometheus' node_exporter.
//!
//! Runs the release-built agent at 1 Hz, reporting to a receiver here that
//! answers 204, and Debian's `prometheus-node-exporter`, scraped here once a
//! second. The agent's own /metrics is scraped every 15 s, as a Prometheus
//! would. After a warm-up it measures each process for
//! `TIDEPOOL_BENCH_SECONDS` (default 60): resident memory (VmRSS, sampled
//! each second) and CPU (utime + stime over the interval, as % of one core;
//! also the finer schedstat time, since clock ticks are 10 ms).
//!
//!     cargo bench -p tidepool-agent --bench footprint
//!
//! Needs `prometheus-node-exporter` on PATH (apt-get install
//! prometheus-node-exporter), or its path in `NODE_EXPORTER`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A child process killed when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_seconds(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0)
}

fn find_node_exporter() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("NODE_EXPORTER") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join("prometheus-node-exporter")).find(|p| p.is_file())
}

/// Answers every request with 204 and counts them.
fn receiver(count: Arc<AtomicU64>) -> std::io::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let count = count.clone();
            std::thread::spawn(move || answer_204(stream, &count));
        }
    });
    Ok(port)
}

fn answer_204(stream: TcpStream, count: &AtomicU64) {
    let Ok(mut writer) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    loop {
        let mut length = 0usize;
        let mut first = true;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() && !first {
                break;
            }
            first = false;
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() || writer.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").is_err() {
            return;
        }
        count.fetch_add(1, Ordering::Relaxed);
    }
}

/// GETs a page over a fresh connection; returns its size.
fn scrape(port: u16, path: &str) -> usize {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else { return 0 };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").is_err() {
        return 0;
    }
    let mut body = Vec::new();
    let _ = stream.read_to_end(&mut body);
    body.len()
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Nanoseconds on a CPU, summed over the process's live threads, from
/// schedstat: finer than clock ticks, which at 10 ms are coarse for a
/// process that works well under a millisecond a second.
fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let text = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        total += text.split(' ').next().and_then(|n| n.parse::<u64>().ok()).unwrap_or(0);
    }
    Some(total)
}

/// A `kB` line of /proc/PID/status, in bytes.
fn status_bytes(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    Some(line[key.len()..].trim().trim_end_matches("kB").trim().parse::<u64>().ok()? * 1024)
}

struct Measured {
    rss_mean: f64,
    rss_max: u64,
    cpu_percent: f64,
    cpu_percent_ns: f64,
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

fn wait_for_port(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn main() -> ExitCode {
    // `cargo bench` passes --bench; nothing else is taken.
    let Some(node_exporter) = find_node_exporter() else {
        eprintln!(
            "footprint: prometheus-node-exporter is not installed; \
             run `apt-get install -y prometheus-node-exporter` (or set NODE_EXPORTER=/path/to/node_exporter)"
        );
        return ExitCode::FAILURE;
    };
    let seconds = env_seconds("TIDEPOOL_BENCH_SECONDS", 60).max(1);
    let warmup = env_seconds("TIDEPOOL_BENCH_WARMUP_SECONDS", 10);
    let clock_ticks = {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks > 0 { ticks as f64 } else { 100.0 }
    };

    let reports = Arc::new(AtomicU64::new(0));
    let receiver_port = match receiver(reports.clone()) {
        Ok(port) => port,
        Err(error) => {
            eprintln!("footprint: cannot start the receiver: {error}");
            return ExitCode::FAILURE;
        }
    };
    let dir = std::env::temp_dir().join(format!("tidepool-footprint-{}", std::process::id()));
    let token = dir.join("token");
    if let Err(error) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&token, "bench-token\n")) {
        eprintln!("footprint: cannot write the token file: {error}");
        return ExitCode::FAILURE;
    }

    let agent_port = free_port();
    let agent = Command::new(env!("CARGO_BIN_EXE_tidepool-agent"))
        .args(["--operator-url", &format!("http://127.0.0.1:{receiver_port}")])
        .args(["--node-name", "bench-node", "--listen", &format!("127.0.0.1:{agent_port}")])
        .arg("--token-file")
        .arg(&token)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn();
    let exporter_port = free_port();
    let exporter = Command::new(&node_exporter)
        .arg(format!("--web.listen-address=127.0.0.1:{exporter_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let (agent, exporter) = match (agent, exporter) {
        (Ok(a), Ok(e)) => (Guard(a), Guard(e)),
        (a, e) => {
            eprintln!("footprint: cannot start the agent ({:?}) or node_exporter ({:?})", a.err(), e.err());
            return ExitCode::FAILURE;
        }
    };
    if !wait_for_port(agent_port, Duration::from_secs(10)) || !wait_for_port(exporter_port, Duration::from_secs(10)) {
        eprintln!("footprint: the agent or node_exporter did not start listening");
        return ExitCode::FAILURE;
    }
    let pids = [agent.0.id(), exporter.0.id()];
    let node_exporter_version = Command::new(&node_exporter)
        .arg("--version")
        .output()
        .map(|o| {
            let text = [o.stdout, o.stderr].concat();
            String::from_utf8_lossy(&text).lines().next().unwrap_or("").to_owned()
        })
        .unwrap_or_default();

    println!("footprint: warm-up {warmup} s, then {seconds} s of measurement");
    let mut scrape_bytes = 0;
    let tick = |second: u64, scrape_bytes: &mut usize| {
        *scrape_bytes = scrape(exporter_port, "/metrics");
        if second.is_multiple_of(15) {
            scrape(agent_port, "/metrics");
        }
    };
    let start = Instant::now();
    for second in 0..warmup {
        tick(second, &mut scrape_bytes);
        std::thread::sleep((start + Duration::from_secs(second + 1)).saturating_duration_since(Instant::now()));
    }

    let reports_before = reports.load(Ordering::Relaxed);
    let cpu_before = pids.map(|pid| cpu_ticks(pid).unwrap_or(0));
    let ns_before = pids.map(|pid| cpu_ns(pid).unwrap_or(0));
    let measure_start = Instant::now();
    let mut rss_sum = [0u64; 2];
    let mut rss_max = [0u64; 2];
    for second in 0..seconds {
        tick(second, &mut scrape_bytes);
        for (i, pid) in pids.iter().enumerate() {
            let rss = status_bytes(*pid, "VmRSS:").unwrap_or(0);
            rss_sum[i] += rss;
            rss_max[i] = rss_max[i].max(rss);
        }
        std::thread::sleep((measure_start + Duration::from_secs(second + 1)).saturating_duration_since(Instant::now()));
    }
    let elapsed = measure_start.elapsed().as_secs_f64();
    let cpu_after = pids.map(|pid| cpu_ticks(pid).unwrap_or(0));
    let ns_after = pids.map(|pid| cpu_ns(pid).unwrap_or(0));
    let reports_during = reports.load(Ordering::Relaxed) - reports_before;
    let measured: Vec<Measured> = (0..2)
        .map(|i| Measured {
            rss_mean: rss_sum[i] as f64 / seconds as f64,
            rss_max: rss_max[i],
            cpu_percent: (cpu_after[i].saturating_sub(cpu_before[i])) as f64 / clock_ticks / elapsed * 100.0,
            cpu_percent_ns: (ns_after[i].saturating_sub(ns_before[i])) as f64 / 1e9 / elapsed * 100.0,
        })
        .collect();
    let (a, n) = (&measured[0], &measured[1]);

    println!();
    println!("measured over {elapsed:.1} s; node_exporter: {node_exporter_version}");
    println!("agent reports received: {reports_during} ({:.2}/s)", reports_during as f64 / elapsed);
    println!("node_exporter scrape size: {scrape_bytes} bytes");
    println!();
    println!("| process | RSS mean MiB | RSS max MiB | CPU % of one core (utime+stime) | CPU % (schedstat) |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, m) in [("tidepool-agent", a), ("node_exporter", n)] {
        println!(
            "| {name} | {:.2} | {:.2} | {:.3} | {:.4} |",
            mib(m.rss_mean),
            mib(m.rss_max as f64),
            m.cpu_percent,
            m.cpu_percent_ns
        );
    }
    let ratio = |x: f64, y: f64| if y > 0.0 { format!("{:.3}", x / y) } else { "n/a".to_owned() };
    println!(
        "| agent / node_exporter | {} | {} | {} | {} |",
        ratio(a.rss_mean, n.rss_mean),
        ratio(a.rss_max as f64, n.rss_max as f64),
        ratio(a.cpu_percent, n.cpu_percent),
        ratio(a.cpu_percent_ns, n.cpu_percent_ns)
    );
    let peak = status_bytes(pids[0], "VmHWM:").unwrap_or(0);
    println!();
    println!("agent peak RSS (VmHWM): {:.2} MiB", mib(peak as f64));
    drop(agent);
    drop(exporter);
    let _ = std::fs::remove_dir_all(&dir);
    ExitCode::SUCCESS
}
