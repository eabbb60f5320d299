//! The agent against a stand-in for the operator's report endpoint: what it
//! sends, with which token, and how the breaker behaves when the endpoint
//! answers 503 or refuses.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{Agent, TempDir, fixture_proc, wait_until, write_atomically};
use tidepool_wire::report::{AgentReport, REPORT_PATH, ReportKind};

/// One request the receiver got.
#[derive(Clone, Debug)]
struct Received {
    at: Instant,
    /// Unix milliseconds when the report arrived.
    arrived_ms: u64,
    method: String,
    path: String,
    authorization: String,
    content_type: String,
    /// The status it was answered with.
    status: u16,
    report: AgentReport,
}

/// A tiny HTTP/1.1 server that records reports and answers with `status`.
struct Receiver {
    port: u16,
    status: Arc<AtomicU16>,
    received: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn start(status: u16) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let status = Arc::new(AtomicU16::new(status));
        let received = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (status.clone(), received.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (s, r) = (s.clone(), r.clone());
                std::thread::spawn(move || serve(stream, &s, &r));
            }
        });
        Receiver { port, status, received }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

/// Serves requests on one kept-alive connection until it closes.
fn serve(stream: TcpStream, status: &AtomicU16, received: &Mutex<Vec<Received>>) {
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = request_line.split_whitespace();
        let (method, path) = (parts.next().unwrap_or("").to_owned(), parts.next().unwrap_or("").to_owned());
        let (mut length, mut authorization, mut content_type) = (0usize, String::new(), String::new());
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            let value = value.trim().to_owned();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().unwrap(),
                "authorization" => authorization = value,
                "content-type" => content_type = value,
                _ => {}
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let report: AgentReport = serde_json::from_slice(&body).expect("the body is an AgentReport");
        let code = status.load(Ordering::SeqCst);
        received.lock().unwrap().push(Received {
            at: Instant::now(),
            arrived_ms: unix_ms(),
            method,
            path,
            authorization,
            content_type,
            status: code,
            report,
        });
        let response = match code {
            204 => "HTTP/1.1 204 No Content\r\n\r\n".to_owned(),
            code => {
                let body = format!(r#"{{"error":"windows: refused by the test","code":{code}}}"#);
                format!(
                    "HTTP/1.1 {code} Test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            }
        };
        if writer.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn start_agent(dir: &TempDir, receiver: &Receiver, extra: &[&str]) -> Agent {
    let token = dir.join("token");
    write_atomically(&token, "token-one\n");
    let url = receiver.url();
    let proc_root = fixture_proc();
    let mut args = vec![
        "--operator-url",
        &url,
        "--token-file",
        token.to_str().unwrap(),
        "--proc-root",
        proc_root.to_str().unwrap(),
        "--node-name",
        "node-7",
        "--address",
        "10.1.2.3",
        "--region",
        "test-region",
        "--no-gpu",
        "--report-interval-ms",
        "100",
        "--sample-interval-ms",
        "100",
        "--windows",
        "3s,1s",
    ];
    args.extend_from_slice(extra);
    Agent::start(dir, &args, &[])
}

#[test]
fn reports_are_valid_signed_and_numbered() {
    let dir = TempDir::new("reports");
    let receiver = Receiver::start(204);
    let agent = start_agent(&dir, &receiver, &[]);
    assert!(wait_until(Duration::from_secs(10), || receiver.count() >= 5), "no reports came");

    // The token file rotates: the new token is used.
    write_atomically(&dir.join("token"), "token-two\n");
    let rotated = wait_until(Duration::from_secs(10), || {
        receiver.received().iter().any(|r| r.authorization == "Bearer token-two")
    });
    assert!(rotated, "the rotated token was never sent");

    let received = receiver.received();
    assert_eq!(received[0].report.seq, 0, "seq starts from 0");
    assert!(received.windows(2).all(|w| w[1].report.seq == w[0].report.seq + 1), "seq counts up by one");
    for r in &received {
        assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", REPORT_PATH));
        assert_eq!(r.content_type, "application/json");
        assert!(r.authorization == "Bearer token-one" || r.authorization == "Bearer token-two");
        let report = &r.report;
        assert_eq!(report.validate(), Ok(()), "{report:?}");
        assert_eq!(report.backend, "node-7");
        assert_eq!(report.kind, ReportKind::Node);
        assert_eq!(report.address.as_deref(), Some("10.1.2.3"));
        assert_eq!(report.region.as_deref(), Some("test-region"));
        assert_eq!(report.health_port, Some(agent.port));
        assert_eq!(report.interval_ms, 100);
        let seconds: Vec<u32> = report.windows.iter().map(|w| w.seconds).collect();
        assert_eq!(seconds, vec![1, 3], "shortest window first");
        assert_eq!(report.capacity.cores, 4);
        assert_eq!(report.capacity.memory_bytes, 8_388_608 * 1024);
        assert!(report.capacity.gpus.is_empty());
        assert!(report.sampled_at_ms <= r.arrived_ms, "sampled after it arrived?");
    }
    // Each report leaves right after its sample: the view is fresh.
    let mut ages: Vec<u64> = received.iter().map(|r| r.arrived_ms - r.report.sampled_at_ms).collect();
    ages.sort_unstable();
    eprintln!("sample-to-arrival ms: {ages:?}");
    assert!(ages[ages.len() / 2] <= 50, "median sample age on arrival {} ms", ages[ages.len() / 2]);
    // Tokens change once, from one to two.
    let first_two = received.iter().position(|r| r.authorization == "Bearer token-two").unwrap();
    assert!(received[first_two..].iter().all(|r| r.authorization == "Bearer token-two"));
    // Reports come every 100 ms or so.
    let span = received.last().unwrap().at - received[0].at;
    let per_report = span / (received.len() as u32 - 1);
    // (Loose bounds: a loaded CI machine can delay a tick.)
    assert!(per_report > Duration::from_millis(50) && per_report < Duration::from_millis(400), "{per_report:?}");
    assert_eq!(
        agent.metrics().value("tidepool_agent_reports_total{result=\"accepted\"}").map(|v| v >= 5.0),
        Some(true)
    );
}

#[test]
fn the_breaker_opens_on_503_and_closes_when_the_operator_is_back() {
    let dir = TempDir::new("breaker");
    let receiver = Receiver::start(204);
    let agent = start_agent(&dir, &receiver, &["--breaker-failures", "3", "--breaker-open-seconds", "3"]);
    assert!(wait_until(Duration::from_secs(10), || receiver.count() >= 5), "no reports came");

    receiver.set_status(503);
    let opened =
        wait_until(Duration::from_secs(10), || agent.metrics().value("tidepool_agent_breaker_open") == Some(1.0));
    assert!(opened, "the breaker did not open");
    // Open: nothing is sent for the next second.
    let held = receiver.count();
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(receiver.count(), held, "reports went out while the breaker was open");
    let failures = receiver.received().iter().filter(|r| r.status == 503).count();
    assert_eq!(failures, 3, "the third 503 in a row opens the breaker");

    receiver.set_status(204);
    let closed = wait_until(Duration::from_secs(10), || {
        agent.metrics().value("tidepool_agent_breaker_open") == Some(0.0)
            && receiver.received().last().is_some_and(|r| r.status == 204)
    });
    assert!(closed, "the breaker did not close");
    let resumed = wait_until(Duration::from_secs(5), || receiver.count() >= held + 5);
    assert!(resumed, "reports did not resume");

    let received = receiver.received();
    // Held-back reports are not numbered: seq counts what was sent.
    assert!(received.windows(2).all(|w| w[1].report.seq == w[0].report.seq + 1), "seq counts up by one");
    // The windows went on while the operator was away: the first report
    // after it came back carries full windows (3 s of 100 ms samples).
    let back = &received[held].report;
    assert_eq!(back.validate(), Ok(()));
    assert_eq!(back.windows[1].seconds, 3);
    // 30 samples when every tick ran; a loaded machine may skip one or two.
    assert!(back.windows[1].samples >= 25, "{back:?}");
    let metrics = agent.metrics();
    assert_eq!(metrics.value("tidepool_agent_reports_total{result=\"failed\"}"), Some(3.0));
}

#[test]
fn refusals_are_counted_and_logged_once() {
    let dir = TempDir::new("refused");
    let receiver = Receiver::start(400);
    let agent = start_agent(&dir, &receiver, &["--breaker-failures", "100"]);
    let refused = wait_until(Duration::from_secs(10), || {
        agent.metrics().value("tidepool_agent_reports_total{result=\"refused\"}") >= Some(5.0)
    });
    assert!(refused, "refusals were not counted");
    let log = agent.log_text();
    assert_eq!(log.matches("the operator refused the report").count(), 1, "logged once a minute:\n{log}");
    assert!(log.contains("windows: refused by the test"), "the operator's message is logged:\n{log}");
}
