//! Helpers for the integration tests: a temporary directory, the agent as a
//! child process that dies with the test, and a tiny HTTP client.

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("tidepool-agent-it-{name}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Writes `text` to `path` through a rename, so a reader never sees half.
pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).expect("write temp file");
    fs::rename(&tmp, path).expect("rename into place");
}

/// The fixture /proc the tests point --proc-root at.
pub fn fixture_proc() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/proc")
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// The agent, killed when dropped. Its log goes to a file, for reading.
pub struct Agent {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Agent {
    /// Starts the agent with `args`, listening on a free port; `env` adds
    /// variables. The log is written under `dir`.
    pub fn start(dir: &TempDir, args: &[&str], env: &[(&str, &str)]) -> Agent {
        let port = free_port();
        let log = dir.join("agent.log");
        let log_file = fs::File::create(&log).expect("create log");
        let mut command = Command::new(env!("CARGO_BIN_EXE_tidepool-agent"));
        command
            .args(args)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .env_remove("NODE_NAME")
            .env_remove("TIDEPOOL_OPERATOR_URL")
            .env_remove("TIDEPOOL_AGENT_TOKEN_FILE")
            .env_remove("TIDEPOOL_AGENT_ADDRESS")
            .env_remove("FAKE_NVML_STATE")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("start the agent binary");
        let mut agent = Agent { child, port, log };
        let ready = wait_until(Duration::from_secs(10), || agent.get("/healthz").is_some_and(|(s, _)| s == 200));
        assert!(ready, "the agent did not answer /healthz within 10 s; log:\n{}", agent.log_text());
        assert!(agent.running(), "the agent exited; log:\n{}", agent.log_text());
        agent
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path`: the status and body, or None if the agent did not answer.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.port, path)
    }

    /// The agent's /metrics, parsed.
    pub fn metrics(&self) -> Metrics {
        let (status, body) = self.get("/metrics").expect("/metrics answers");
        assert_eq!(status, 200);
        Metrics(body)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One GET over a fresh connection, bounded to 2 s.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Some((status, body))
}

/// Polls `done` every 50 ms until it holds or `limit` passes.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A /metrics page.
pub struct Metrics(pub String);

impl Metrics {
    /// The value of the series written exactly as `series` (name and labels).
    pub fn value(&self, series: &str) -> Option<f64> {
        self.0.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
    }

    pub fn has(&self, prefix: &str) -> bool {
        self.0.lines().any(|line| line.starts_with(prefix))
    }
}
