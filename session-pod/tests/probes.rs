//! The outbound probes against real servers on loopback: HTTP/1.1, HTTPS
//! with h2 under a CA made here, TCP, TLS, Debian's sshd, a UDP echo, DNS,
//! ICMP echo, the tiers, and continuous mode; the egress policy that refuses loopback unless
//! a rule allows it, and the byte budget.
#![cfg(target_os = "linux")]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tidepool_crds::test_session::{ProbeKind, ProbeResult, ProbeTarget, ProbeTimings};
use tidepool_protocol::egress::EgressPolicy;
use tidepool_session::probes::{
    ContinuousSettings, IcmpSocket, Job, ProbeSettings, Stage, TRACEROUTE_BASE_PORT, Thresholds, TrafficBudget, plan,
    probe, run, run_once, spawn_continuous,
};
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

/// The size of `/big`.
const BIG_BYTES: usize = 3_000_000;

fn target(kind: ProbeKind, host: &str, port: Option<u16>) -> ProbeTarget {
    ProbeTarget { kind, url: None, host: Some(host.into()), port: port.map(i32::from) }
}

fn http_target(url: &str) -> ProbeTarget {
    ProbeTarget { kind: ProbeKind::Http, url: Some(url.into()), host: None, port: None }
}

/// The pool rules that let probes reach the loopback servers of these tests,
/// as an operator would write them into `TIDEPOOL_EGRESS_ALLOW`.
const ALLOW_LOOPBACK: &str = r#"[{"cidr":"127.0.0.0/8"},{"cidr":"::1/128"}]"#;

/// Short bounds, so that a failing test fails fast; loopback allowed.
fn settings() -> ProbeSettings {
    ProbeSettings {
        timeout: Duration::from_secs(3),
        reply_wait: Duration::from_millis(500),
        ping_interval: Duration::from_millis(20),
        egress: Arc::new(EgressPolicy::parse(ALLOW_LOOPBACK, "").unwrap()),
        ..ProbeSettings::default()
    }
}

/// [`settings`] under the default egress policy: the public internet only.
fn public_only() -> ProbeSettings {
    ProbeSettings { egress: Arc::new(EgressPolicy::default()), ..settings() }
}

/// Whether anything connected to `listener` within a little while.
async fn connected(listener: &TcpListener) -> bool {
    tokio::time::timeout(Duration::from_millis(300), listener.accept()).await.is_ok()
}

async fn handle(request: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match request.uri().path() {
        "/" => (StatusCode::OK, Bytes::from_static(b"hello from the probe test\n")),
        "/big" => (StatusCode::OK, Bytes::from(vec![7u8; BIG_BYTES])),
        _ => (StatusCode::NOT_FOUND, Bytes::from_static(b"no such page\n")),
    };
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    Ok(response)
}

/// A server on 127.0.0.1: HTTP/1.1 over TCP, or with `tls`, HTTPS that speaks
/// h2 or HTTP/1.1 as ALPN chose. Aborted when the handle drops.
struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(tls: Option<Arc<ServerConfig>>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let tls = tls.clone();
            tokio::spawn(async move {
                let Some(config) = tls else {
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(handle)).await;
                    return;
                };
                let Ok(stream) = TlsAcceptor::from(config).accept(stream).await else { return };
                if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                    let h2 = http2::Builder::new(TokioExecutor::new());
                    let _ = h2.serve_connection(TokioIo::new(stream), service_fn(handle)).await;
                } else {
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(handle)).await;
                }
            });
        }
    });
    Server { addr, task }
}

/// A CA made for the test, and a server certificate it signed for
/// `localhost` and 127.0.0.1 that expires `days` from now.
struct Pki {
    ca: CertificateDer<'static>,
    server: Arc<ServerConfig>,
}

fn pki(days: u64) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap().der().clone();
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + now + Duration::from_secs(days * 86_400);
    let cert = params.signed_by(&key, &issuer).unwrap().der().clone();

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())))
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Pki { ca, server: Arc::new(server) }
}

fn trusting(ca: &CertificateDer<'static>) -> ProbeSettings {
    let mut settings = settings();
    settings.trust(ca.clone()).unwrap();
    settings
}

/// Every step timed, none negative, in the order they happen.
fn assert_timings_ordered(result: &ProbeResult, tls: bool) {
    let ProbeTimings { dns_ms, connect_ms, tls_ms, first_byte_ms, total_ms, .. } = result.timings.clone().unwrap();
    let (dns, connect) = (dns_ms.unwrap(), connect_ms.unwrap());
    let (first_byte, handshake) = (first_byte_ms.unwrap(), tls_ms.unwrap_or(0.0));
    assert_eq!(tls_ms.is_some(), tls, "{result:?}");
    for value in [dns, connect, handshake, first_byte, total_ms] {
        assert!(value >= 0.0, "{result:?}");
    }
    assert!(dns + connect + handshake <= first_byte, "{result:?}");
    assert!(first_byte <= total_ms, "{result:?}");
}

#[tokio::test]
async fn plain_http_speaks_http1_and_times_each_step() {
    let server = serve(None).await;
    let outcome = probe(&http_target(&format!("http://{}/", server.addr)), &settings()).await;
    let result = outcome.result;
    assert!(result.ok, "{result:?}");
    assert_eq!(result.protocol.as_deref(), Some("HTTP/1.1"));
    assert_eq!(outcome.facts.status, Some(200));
    assert_timings_ordered(&result, false);
}

#[tokio::test]
async fn https_negotiates_h2_under_the_trusted_ca() {
    let pki = pki(90);
    let server = serve(Some(pki.server.clone())).await;
    let url = format!("https://localhost:{}/", server.addr.port());
    let outcome = probe(&http_target(&url), &trusting(&pki.ca)).await;
    let result = outcome.result.clone();
    assert!(result.ok, "{result:?}");
    assert_eq!(result.protocol.as_deref(), Some("h2"));
    assert_timings_ordered(&result, true);
    let days = outcome.facts.cert_days_left.unwrap();
    assert!((89.9..=90.0).contains(&days), "{days}");
    let error = outcome.into_result().detail.unwrap();
    assert!(error.starts_with("certificate expires in ") && error.ends_with(" days"), "{error}");

    // By IP address too: the certificate names 127.0.0.1.
    let by_ip = probe(&http_target(&format!("https://{}/", server.addr)), &trusting(&pki.ca)).await.result;
    assert!(by_ip.ok, "{by_ip:?}");
}

#[tokio::test]
async fn an_unknown_ca_fails_the_handshake_plainly() {
    let pki = pki(90);
    let server = serve(Some(pki.server.clone())).await;
    let url = format!("https://localhost:{}/", server.addr.port());
    let result = probe(&http_target(&url), &settings()).await.result;
    assert!(!result.ok);
    let error = result.error.unwrap();
    assert!(error.starts_with("TLS handshake with localhost: invalid peer certificate"), "{error}");
    let timings = result.timings.unwrap();
    assert!(timings.connect_ms.is_some() && timings.tls_ms.is_none() && timings.first_byte_ms.is_none());
}

#[tokio::test]
async fn an_error_status_fails_with_its_timings() {
    let server = serve(None).await;
    let result = probe(&http_target(&format!("http://{}/missing", server.addr)), &settings()).await.result;
    assert!(!result.ok);
    assert_eq!(result.error.as_deref(), Some("HTTP status 404 Not Found"));
    assert_timings_ordered(&result, false);
}

#[tokio::test]
async fn a_long_body_is_cut_off() {
    let server = serve(None).await;
    let settings = ProbeSettings { max_body_bytes: 100_000, ..settings() };
    let outcome = probe(&http_target(&format!("http://{}/big", server.addr)), &settings).await;
    assert!(outcome.result.ok);
    let capped = outcome.facts.capped_at.unwrap();
    assert!((100_000..BIG_BYTES as u64).contains(&capped), "{capped}");
}

#[tokio::test]
async fn tcp_connects_and_a_closed_port_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let result = probe(&target(ProbeKind::Tcp, "127.0.0.1", Some(port)), &settings()).await.result;
    assert!(result.ok, "{result:?}");
    assert_eq!(result.target, format!("127.0.0.1:{port}"));
    let timings = result.timings.unwrap();
    assert!(timings.dns_ms.is_some() && timings.connect_ms.is_some());
    drop(listener);

    let result = probe(&target(ProbeKind::Tcp, "127.0.0.1", Some(port)), &settings()).await.result;
    assert!(!result.ok);
    assert_eq!(
        result.error.as_deref(),
        Some(&*format!("connect to 127.0.0.1:{port}: Connection refused (os error 111)"))
    );
}

#[tokio::test]
async fn tls_reads_the_days_the_certificate_has_left() {
    let pki = pki(3);
    let server = serve(Some(pki.server.clone())).await;
    let outcome = probe(&target(ProbeKind::Tls, "localhost", Some(server.addr.port())), &trusting(&pki.ca)).await;
    assert!(outcome.result.ok, "{:?}", outcome.result);
    assert_eq!(outcome.result.protocol.as_deref(), Some("TLS 1.3"));
    let timings = outcome.result.timings.clone().unwrap();
    assert!(timings.tls_ms.is_some() && timings.connect_ms.is_some());
    let days = outcome.facts.cert_days_left.unwrap();
    assert!((2.9..=3.0).contains(&days), "{days}");

    // Expiring in under 7 days sends a tier-2 run on to tier 3.
    let run = run(&[target(ProbeKind::Tls, "localhost", Some(server.addr.port()))], 2, &trusting(&pki.ca)).await;
    assert_eq!(run.tier, 3);
    let reasons = &run.escalations[0].1;
    assert!(reasons[0].starts_with("certificate expires in ") && reasons[0].ends_with(" days < 7 days"), "{reasons:?}");
}

/// Echoes every datagram back, as Tidepool's echo does.
async fn udp_echo() -> (SocketAddr, JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 2048];
        while let Ok((len, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..len], from).await;
        }
    });
    (addr, task)
}

#[tokio::test]
async fn udp_echo_answers_and_a_closed_port_says_so() {
    let (addr, echo) = udp_echo().await;
    let result = probe(&target(ProbeKind::Udp, "127.0.0.1", Some(addr.port())), &settings()).await.result;
    assert!(result.ok, "{result:?}");
    let timings = result.timings.unwrap();
    assert!(timings.first_byte_ms.unwrap() <= timings.total_ms);
    echo.abort();

    let closed = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let result = probe(&target(ProbeKind::Udp, "127.0.0.1", Some(port)), &settings()).await.result;
    assert!(!result.ok);
    let expected = format!("127.0.0.1:{port}: nothing listens there (ICMP port unreachable)");
    assert_eq!(result.error.as_deref(), Some(&*expected));
}

#[tokio::test]
async fn dns_resolves_localhost() {
    let outcome = probe(&target(ProbeKind::Dns, "localhost", None), &settings()).await;
    assert!(outcome.result.ok, "{:?}", outcome.result);
    assert!(outcome.facts.addresses.iter().all(|ip| ip.is_loopback()), "{:?}", outcome.facts.addresses);
    assert!(!outcome.facts.addresses.is_empty());
    let timings = outcome.result.timings.unwrap();
    assert_eq!(timings.dns_ms, Some(timings.total_ms));

    let missing = probe(&target(ProbeKind::Dns, "no-such-host.invalid", None), &settings()).await.result;
    assert!(!missing.ok);
    assert!(missing.error.unwrap().starts_with("DNS lookup of no-such-host.invalid: "));
}

#[tokio::test]
async fn icmp_pings_loopback() {
    let outcome = probe(&target(ProbeKind::Icmp, "127.0.0.1", None), &settings()).await;
    assert!(outcome.result.ok, "ICMP needs root, CAP_NET_RAW or ping_group_range: {:?}", outcome.result);
    assert_eq!(outcome.result.protocol.as_deref(), Some("ICMP"));
    let rtt = outcome.facts.rtt.unwrap();
    assert_eq!((rtt.sent, rtt.received), (4, 4));
    assert!(rtt.min_ms <= rtt.mean_ms && rtt.mean_ms <= rtt.max_ms);
    assert!(matches!(outcome.facts.icmp_socket, Some(IcmpSocket::Datagram | IcmpSocket::Raw)));
    assert_eq!(outcome.result.timings.unwrap().total_ms, rtt.mean_ms);

    if UdpSocket::bind("[::1]:0").await.is_err() {
        eprintln!("note: this machine has no IPv6 loopback; ICMPv6 not checked");
        return;
    }
    let v6 = probe(&target(ProbeKind::Icmp, "::1", None), &settings()).await;
    assert!(v6.result.ok, "{:?}", v6.result);
    assert_eq!(v6.result.protocol.as_deref(), Some("ICMPv6"));
    assert_eq!(v6.facts.rtt.unwrap().received, 4);
}

#[tokio::test]
async fn traceroute_to_loopback_is_one_hop() {
    let outcome = probe(&target(ProbeKind::Traceroute, "127.0.0.1", None), &settings()).await;
    assert!(outcome.result.ok, "{:?}", outcome.result);
    let hops: Vec<_> = outcome.facts.hops.iter().map(|hop| (hop.ttl, hop.addr)).collect();
    assert_eq!(hops, [(1, Some("127.0.0.1".parse().unwrap()))]);
    let timings = outcome.result.timings.unwrap();
    assert_eq!(Some(timings.total_ms), outcome.facts.hops[0].rtt_ms);

    if UdpSocket::bind("[::1]:0").await.is_err() {
        eprintln!("note: this machine has no IPv6 loopback; the IPv6 traceroute not checked");
        return;
    }
    let outcome = probe(&target(ProbeKind::Traceroute, "::1", None), &settings()).await;
    assert!(outcome.result.ok, "{:?}", outcome.result);
    let hops: Vec<_> = outcome.facts.hops.iter().map(|hop| (hop.ttl, hop.addr)).collect();
    assert_eq!(hops, [(1, Some("::1".parse().unwrap()))]);
}

#[tokio::test]
async fn traceroute_counts_a_udp_answer_as_the_destination() {
    // A service on the first probe port answers the datagram itself.
    let Ok(socket) = UdpSocket::bind(("127.0.0.2", TRACEROUTE_BASE_PORT)).await else {
        eprintln!("note: 127.0.0.2:{TRACEROUTE_BASE_PORT} is taken; the UDP answer not checked");
        return;
    };
    let echoed = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&echoed);
    let echo = tokio::spawn(async move {
        let mut buf = [0u8; 256];
        while let Ok((len, from)) = socket.recv_from(&mut buf).await {
            counter.fetch_add(1, Ordering::Relaxed);
            let _ = socket.send_to(&buf[..len], from).await;
        }
    });
    let outcome = probe(&target(ProbeKind::Traceroute, "127.0.0.2", None), &settings()).await;
    echo.abort();
    assert!(outcome.result.ok, "{:?}", outcome.result);
    // Hop 1's datagram reached the service, so no ICMP error answered it: its reply did.
    assert_eq!(echoed.load(Ordering::Relaxed), 1);
    assert_eq!(outcome.facts.hops.len(), 1);
}

#[tokio::test]
async fn a_bad_run_climbs_every_tier() {
    let server = serve(None).await;
    let (echo_addr, echo) = udp_echo().await;
    let url = format!("http://{}/big", server.addr);
    let targets = [
        http_target(&url),
        target(ProbeKind::Icmp, "127.0.0.1", None),
        target(ProbeKind::Udp, "127.0.0.1", Some(echo_addr.port())),
    ];
    let settings = ProbeSettings {
        // Loopback is never this bad: trip the ping rule and the hop rule.
        thresholds: Thresholds { ping_ms: 0.0, hops: 0, ..Thresholds::default() },
        sample_bytes: 1_500_000,
        long_bytes: 2_000_000,
        jitter_count: 10,
        jitter_interval: Duration::from_millis(5),
        ..settings()
    };
    let run = run(&targets, 1, &settings).await;
    echo.abort();
    assert_eq!(run.tier, 3, "{:?}", run.escalations);
    assert!(run.escalations[0].1[0].starts_with("ping "), "{:?}", run.escalations);
    assert_eq!(run.escalations[1].1, ["1 hops > 0"]);

    let tiers: Vec<(i32, ProbeKind)> = run.outcomes.iter().map(|o| (o.result.tier, o.result.kind)).collect();
    use ProbeKind::*;
    assert_eq!(tiers, [(1, Http), (1, Icmp), (1, Udp), (2, Traceroute), (2, Udp), (2, Http), (3, Http)]);
    for outcome in &run.outcomes {
        assert!(outcome.result.ok, "{:?}", outcome.result);
    }
    let route = &run.outcomes[3];
    assert_eq!((route.result.target.as_str(), route.facts.hops.len()), ("127.0.0.1", 1));
    let jitter = run.outcomes[4].facts.rtt.clone().unwrap();
    assert_eq!((jitter.sent, jitter.received), (10, 10));
    let sample = run.outcomes[5].facts.download.clone().unwrap();
    assert!((1_500_000..BIG_BYTES as u64).contains(&sample.bytes), "{sample:?}");
    let long = run.outcomes[6].facts.download.clone().unwrap();
    assert!((2_000_000..BIG_BYTES as u64).contains(&long.bytes), "{long:?}");
    assert!(long.mbps() > 0.0);
    assert_eq!(
        plan(&targets, 3),
        [Job::Download { url: url.clone(), stage: Stage::Long }],
        "tier 3 downloads from the http target"
    );

    // The same run as the CRD sees it.
    let results = run.results();
    assert!(results[5].detail.as_deref().unwrap().contains("Mbit/s"), "{:?}", results[5]);
    assert!(results[3].detail.as_deref().unwrap().starts_with("1 hops: 1 127.0.0.1 "), "{:?}", results[3]);
}

#[tokio::test]
async fn a_good_run_stays_in_its_tier() {
    let server = serve(None).await;
    let results = run_once(&[http_target(&format!("http://{}/", server.addr))], 1, &settings()).await;
    assert_eq!(results.len(), 1);
    assert!(results[0].ok && results[0].tier == 1, "{results:?}");
}

#[tokio::test]
async fn continuous_mode_hands_each_run_to_the_sink() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink_seen = Arc::clone(&seen);
    let every = ContinuousSettings { interval: Duration::from_millis(100), start_tier: 1, max_runs: Some(3) };
    let runner =
        spawn_continuous(vec![target(ProbeKind::Tcp, "127.0.0.1", Some(port))], settings(), every, move |run| {
            let seen = Arc::clone(&sink_seen);
            async move { seen.lock().unwrap().push((run.number, run.run.results())) }
        });
    tokio::time::timeout(Duration::from_secs(10), runner.finished()).await.expect("three runs within 10 s");
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert_eq!(seen.iter().map(|(number, _)| *number).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(seen.iter().all(|(_, results)| results.len() == 1 && results[0].ok), "{seen:?}");

    let forever = spawn_continuous(vec![], settings(), ContinuousSettings::default(), |_| async {});
    tokio::time::timeout(Duration::from_secs(5), forever.stop()).await.expect("stops at once");
}

#[tokio::test]
async fn a_loopback_target_is_refused_by_default_and_allowed_by_a_rule() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tcp = target(ProbeKind::Tcp, "127.0.0.1", Some(port));

    let outcome = probe(&tcp, &public_only()).await;
    assert!(!outcome.result.ok);
    assert_eq!(outcome.result.error.as_deref(), Some("refused by the pool's egress policy: 127.0.0.1 is loopback"));
    assert_eq!(outcome.facts.egress_refused, Some("loopback"));
    assert!(!connected(&listener).await, "the refused probe connected");

    // A rule for the port allows it; a rule for another port does not.
    let rule = |ports: &str| ProbeSettings {
        egress: Arc::new(
            EgressPolicy::parse(&format!(r#"[{{"cidr":"127.0.0.1/32","ports":[{ports}]}}]"#), "").unwrap(),
        ),
        ..settings()
    };
    let allowed = probe(&tcp, &rule(&port.to_string())).await;
    assert!(allowed.result.ok, "{:?}", allowed.result);
    assert!(connected(&listener).await, "the allowed probe did not connect");
    let other_port = probe(&tcp, &rule("1")).await;
    let error = other_port.result.error.unwrap();
    assert!(error.ends_with("is loopback (the pool allows it on port 1 only)"), "{error}");
    assert!(!connected(&listener).await);
}

#[tokio::test]
async fn a_name_that_resolves_to_loopback_is_refused_for_every_kind_that_sends() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let targets = [
        http_target(&format!("http://localhost:{port}/")),
        http_target(&format!("https://LocalHost:{port}/")),
        target(ProbeKind::Tcp, "localhost", Some(port)),
        target(ProbeKind::Tls, "localhost", Some(port)),
        target(ProbeKind::Udp, "localhost", Some(port)),
        target(ProbeKind::Ssh, "localhost", Some(port)),
        target(ProbeKind::Icmp, "localhost", None),
        target(ProbeKind::Traceroute, "localhost", None),
        // The IPv6 forms that carry a loopback address are loopback too.
        target(ProbeKind::Tcp, "::ffff:127.0.0.1", Some(port)),
        target(ProbeKind::Tcp, "0.0.0.0", Some(port)),
    ];
    for target in &targets {
        let outcome = probe(target, &public_only()).await;
        let error = outcome.result.error.clone().unwrap_or_default();
        assert!(error.starts_with("refused by the pool's egress policy: "), "{target:?}: {:?}", outcome.result);
        assert!(error.contains(" is loopback") || error.contains(" is unspecified"), "{error}");
        assert!(outcome.facts.egress_refused.is_some(), "{target:?}");
    }
    let named = probe(&targets[2], &public_only()).await.result.error.unwrap();
    assert!(named.starts_with("refused by the pool's egress policy: localhost resolves to "), "{named}");
    assert!(!connected(&listener).await, "a refused probe connected");

    // The dns probe shows no address the policy refuses: it cannot map the
    // cluster's names to their addresses.
    let dns = probe(&target(ProbeKind::Dns, "localhost", None), &public_only()).await;
    assert!(!dns.result.ok, "{:?}", dns.result);
    assert!(dns.facts.addresses.is_empty(), "{:?}", dns.facts.addresses);
    let error = dns.result.error.unwrap_or_default();
    assert!(error.starts_with("refused by the pool's egress policy: localhost resolves to "), "{error}");
    assert!(dns.facts.egress_refused.is_some());

    // A host rule allows the name, whatever it resolves to.
    let by_name =
        ProbeSettings { egress: Arc::new(EgressPolicy::parse(r#"[{"host":"localhost"}]"#, "").unwrap()), ..settings() };
    let outcome = probe(&target(ProbeKind::Tcp, "localhost", Some(port)), &by_name).await;
    assert!(outcome.result.ok, "{:?}", outcome.result);
}

#[tokio::test]
async fn the_byte_budget_cuts_a_download_and_then_every_probe() {
    let server = serve(None).await;
    let budget = Arc::new(TrafficBudget::new(500_000));
    let capped = ProbeSettings { budget: budget.clone(), max_body_bytes: 10_000_000, ..settings() };
    let url = format!("http://{}/big", server.addr);
    let cut = probe(&http_target(&url), &capped).await.result;
    assert!(!cut.ok);
    let error = cut.error.unwrap();
    assert!(error.contains("the session's probe traffic cap of 500000 bytes is spent"), "{error}");
    assert_eq!(budget.used(), 500_000, "reads and writes stop at the cap, to the byte");

    let next = probe(&target(ProbeKind::Dns, "localhost", None), &capped).await.result;
    assert_eq!(next.error.as_deref(), Some("the session's probe traffic cap of 500000 bytes is spent"));

    // Within the budget, a probe's bytes are counted both ways.
    let budget = Arc::new(TrafficBudget::new(10_000_000));
    let roomy = ProbeSettings { budget: budget.clone(), ..settings() };
    assert!(probe(&http_target(&format!("http://{}/", server.addr)), &roomy).await.result.ok);
    let used = budget.used();
    // The request (about 80 bytes) and the answer (its head and 26 bytes of body).
    assert!((100..1_000).contains(&used), "{used} bytes counted");
}

/// Debian's sshd (the openssh-server package) on a free loopback port, with
/// a host key made for it. Killed when dropped.
struct Sshd {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Sshd {
    async fn start() -> Self {
        let binary = std::path::Path::new("/usr/sbin/sshd");
        assert!(binary.exists(), "the ssh probe's test needs Debian's openssh-server (tests/run.sh installs it)");
        // As root, sshd wants its privilege separation directory, which the
        // package's service would make.
        if is_root() {
            std::fs::create_dir_all("/run/sshd").unwrap();
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let dir = std::env::temp_dir().join(format!("tidepool-sshd-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("host_ed25519");
        let made = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .expect("ssh-keygen (openssh-client) makes the host key");
        assert!(made.success());
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nPidFile none\nUsePAM no\nStrictModes no\n",
                key.display()
            ),
        )
        .unwrap();
        let child = std::process::Command::new(binary)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let sshd = Self { child, port, dir };
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return sshd;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("sshd did not listen on port {port} within 5 s");
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

#[tokio::test]
async fn ssh_times_the_banner_and_key_exchange_of_a_real_sshd() {
    let sshd = Sshd::start().await;
    let outcome = probe(&target(ProbeKind::Ssh, "127.0.0.1", Some(sshd.port)), &settings()).await;
    let result = &outcome.result;
    assert!(result.ok, "{result:?}");
    assert_eq!(result.protocol.as_deref(), Some("SSH-2.0"));
    let facts = outcome.facts.ssh.clone().unwrap();
    assert!(facts.banner.as_deref().unwrap().starts_with("SSH-2.0-OpenSSH_"), "{facts:?}");
    assert_eq!(facts.kex.as_deref(), Some("curve25519-sha256"));
    assert_eq!(facts.host_key.as_deref(), Some("ssh-ed25519"));
    let timings = result.timings.clone().unwrap();
    let (dns, connect, banner, kex) =
        (timings.dns_ms.unwrap(), timings.connect_ms.unwrap(), timings.first_byte_ms.unwrap(), timings.kex_ms.unwrap());
    assert!(dns + connect <= banner && banner + kex <= timings.total_ms, "{timings:?}");
    assert!(timings.tls_ms.is_none());
    let detail = outcome.into_result().detail.unwrap();
    assert!(
        detail.starts_with("banner SSH-2.0-OpenSSH_")
            && detail.ends_with("kex curve25519-sha256, host key ssh-ed25519"),
        "{detail}"
    );
}

/// A TCP server that answers each connection with `bytes` and then reads
/// until the client goes.
async fn answering(bytes: Vec<u8>) -> (u16, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let bytes = bytes.clone();
            tokio::spawn(async move {
                let _ = stream.write_all(&bytes).await;
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    (port, task)
}

/// An unencrypted SSH packet around `payload`, padded as the RFC asks.
fn ssh_packet(payload: &[u8]) -> Vec<u8> {
    let mut padding = 8 - (5 + payload.len()) % 8;
    if padding < 4 {
        padding += 8;
    }
    let mut out = ((1 + payload.len() + padding) as u32).to_be_bytes().to_vec();
    out.push(padding as u8);
    out.extend_from_slice(payload);
    out.extend(std::iter::repeat_n(0, padding));
    out
}

#[tokio::test]
async fn ssh_names_what_a_server_got_wrong() {
    let probe_port = |port: u16| async move {
        let outcome = probe(&target(ProbeKind::Ssh, "127.0.0.1", Some(port)), &settings()).await;
        assert!(!outcome.result.ok, "{:?}", outcome.result);
        outcome.result.error.unwrap()
    };
    // Not an SSH server at all.
    let (port, _http) = answering(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()).await;
    let error = probe_port(port).await;
    assert!(error.contains("the server's version"), "{error}");
    // SSH 1 only.
    let (port, _old) = answering(b"SSH-1.5-ancient\r\n".to_vec()).await;
    assert_eq!(probe_port(port).await, r#"the server speaks "SSH-1.5-ancient", not SSH 2.0"#);
    // Only key exchanges the probe does not speak.
    let mut kexinit = vec![20u8];
    kexinit.extend_from_slice(&[0; 16]);
    for list in [
        "diffie-hellman-group14-sha256",
        "rsa-sha2-256",
        "aes128-ctr",
        "aes128-ctr",
        "hmac-sha2-256",
        "hmac-sha2-256",
        "none",
        "none",
        "",
        "",
    ] {
        kexinit.extend_from_slice(&(list.len() as u32).to_be_bytes());
        kexinit.extend_from_slice(list.as_bytes());
    }
    kexinit.extend_from_slice(&[0; 5]);
    let mut answer = b"SSH-2.0-Odd\r\n".to_vec();
    answer.extend_from_slice(&ssh_packet(&kexinit));
    let (port, _odd) = answering(answer).await;
    let error = probe_port(port).await;
    let banner = probe(&target(ProbeKind::Ssh, "127.0.0.1", Some(port)), &settings()).await.facts.ssh.unwrap().banner;
    assert_eq!(error, "no key exchange in common: the server offers diffie-hellman-group14-sha256");
    assert_eq!(banner.as_deref(), Some("SSH-2.0-Odd"));
    // A packet far over the limit is refused before it is read.
    let mut answer = b"SSH-2.0-Huge\r\n".to_vec();
    answer.extend_from_slice(&[0x7f, 0xff, 0xff, 0xff, 4]);
    let (port, _huge) = answering(answer).await;
    assert_eq!(probe_port(port).await, "a packet of 2147483647 bytes, over the 35000 the protocol asks a peer to take");
    // A server that says nothing is bounded by the probe's timeout.
    let (port, _mute) = answering(Vec::new()).await;
    let error = probe_port(port).await;
    assert!(error.contains("reading the server's version"), "{error}");
}
