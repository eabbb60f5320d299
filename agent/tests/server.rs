//! The agent's /metrics and /healthz server keeps its limits whatever its
//! clients do: a connection cap, a header timeout and an idle timeout.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::{Agent, TempDir, fixture_proc};

/// Reads until the agent closes the connection; how long that took.
fn closed_after(stream: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut sink = Vec::new();
    match stream.read_to_end(&mut sink) {
        Ok(_) => Some(started.elapsed()),
        Err(_) => None,
    }
}

#[test]
fn the_metrics_server_keeps_its_limits() {
    let dir = TempDir::new("server-limits");
    let proc_root = fixture_proc();
    let args = [
        "--operator-url",
        "http://127.0.0.1:1",
        "--node-name",
        "node-1",
        "--token-file",
        "/nonexistent",
        "--proc-root",
        proc_root.to_str().unwrap(),
        "--disk-path",
        dir.path().to_str().unwrap(),
        "--no-gpu",
        "--max-connections",
        "2",
        "--header-timeout-seconds",
        "1",
        "--idle-timeout-seconds",
        "1",
    ];
    let agent = Agent::start(&dir, &args, &[]);
    let address = ("127.0.0.1", agent.port);

    // A half-sent request head is dropped after the header timeout.
    let mut slow = TcpStream::connect(address).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").unwrap();
    let took = closed_after(&mut slow, Duration::from_secs(5)).expect("the half-sent head is dropped");
    assert!(took >= Duration::from_millis(900), "dropped after {took:?}");

    // A kept-alive connection that goes quiet is closed.
    let mut idle = TcpStream::connect(address).unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = [0u8; 256];
    let n = idle.read(&mut answer).unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));
    let took = closed_after(&mut idle, Duration::from_secs(5)).expect("the idle connection is closed");
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");

    // Two held connections fill the cap: a third is closed unanswered, and
    // once one goes, the agent answers again.
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(address).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut third = TcpStream::connect(address).unwrap();
    let _ = third.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut reply = Vec::new();
    third.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let _ = third.read_to_end(&mut reply);
    assert!(reply.is_empty(), "a connection beyond the cap was answered: {}", String::from_utf8_lossy(&reply));
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    let metrics = agent.get("/metrics").expect("answers again").1;
    for reason in ["connection_cap", "idle"] {
        let line = format!("tidepool_agent_connection_refusals_total{{reason=\"{reason}\"}}");
        let count: f64 =
            metrics.lines().find_map(|l| l.strip_prefix(&line).map(|v| v.trim().parse().unwrap_or(0.0))).unwrap_or(0.0);
        assert!(count >= 1.0, "{reason} not counted:\n{metrics}");
    }
}
