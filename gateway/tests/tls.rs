//! TLS as the gateway serves it: the shared server with the reloading
//! certificate resolver, on loopback, with real handshakes from a client
//! that trusts one certificate at a time.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use tidepool_gateway::tls::{Files, Reloading};
use tidepool_serve::{BodyTimeout, Limits, Refusal, Server};
use tokio::io::AsyncWriteExt;

struct Pair {
    cert_pem: String,
    key_pem: String,
}

fn pair() -> Pair {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    Pair { cert_pem: certified.cert.pem(), key_pem: certified.signing_key.serialize_pem() }
}

fn client_trusting(pair: &Pair, addr: SocketAddr) -> reqwest::Client {
    let root = reqwest::Certificate::from_pem(pair.cert_pem.as_bytes()).unwrap();
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root)
        .resolve("localhost", addr)
        // Each request on a new connection, so each sees the certificate served now.
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

async fn fetch(client: &reqwest::Client, addr: SocketAddr) -> Result<String, reqwest::Error> {
    client.get(format!("https://localhost:{}/", addr.port())).send().await?.text().await
}

#[tokio::test]
async fn the_certificate_is_served_reloaded_when_its_files_change_and_kept_when_they_break() {
    let dir = std::env::temp_dir().join(format!("tidepool-gateway-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = Files { certificate: dir.join("tls.crt"), key: dir.join("tls.key") };
    let first = pair();
    std::fs::write(&files.certificate, &first.cert_pem).unwrap();
    std::fs::write(&files.key, &first.key_pem).unwrap();
    let reloading = Reloading::load(files.clone()).unwrap();

    let handshakes_refused = Arc::new(AtomicU64::new(0));
    let counted = handshakes_refused.clone();
    let limits = Limits {
        max_connections: 16,
        header_timeout: Duration::from_millis(500),
        body_timeout: BodyTimeout::Whole(Duration::from_secs(5)),
        idle_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(5),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = Server::new(limits)
        .tls(tokio_rustls::TlsAcceptor::from(reloading.server_config().unwrap()))
        .on_refusal(move |refusal| {
            if refusal == Refusal::TlsHandshake {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        });
    let router = Router::new().route("/", get(|| async { "served" }));
    tokio::spawn(server.serve(listener, router, std::future::pending()));

    assert_eq!(fetch(&client_trusting(&first, addr), addr).await.unwrap(), "served");

    // Renewed: the next handshake gets the new certificate, and a client
    // that trusts only the old one is refused.
    let second = pair();
    std::fs::write(&files.certificate, &second.cert_pem).unwrap();
    std::fs::write(&files.key, &second.key_pem).unwrap();
    assert!(reloading.reload().unwrap());
    assert!(!reloading.reload().unwrap(), "nothing changed since");
    assert_eq!(fetch(&client_trusting(&second, addr), addr).await.unwrap(), "served");
    assert!(fetch(&client_trusting(&first, addr), addr).await.is_err());

    // Half-written (a key of the old pair, or no key at all): the new pair stays.
    std::fs::write(&files.key, &first.key_pem).unwrap();
    assert!(reloading.reload().unwrap_err().to_string().contains("does not match"));
    std::fs::write(&files.key, "not a key").unwrap();
    assert!(reloading.reload().unwrap_err().to_string().contains("no PEM private key"));
    assert_eq!(fetch(&client_trusting(&second, addr), addr).await.unwrap(), "served");

    // Plain HTTP on the TLS port, and a client that never says hello, are
    // both cut and counted.
    let before = handshakes_refused.load(Ordering::Relaxed);
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(handshakes_refused.load(Ordering::Relaxed) - before, 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_or_empty_pair_is_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("tidepool-gateway-tls-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let files = Files { certificate: dir.join("tls.crt"), key: dir.join("tls.key") };
    assert!(Reloading::load(files.clone()).unwrap_err().to_string().starts_with("cannot read"));
    std::fs::write(&files.certificate, "").unwrap();
    std::fs::write(&files.key, "").unwrap();
    assert!(Reloading::load(files).unwrap_err().to_string().contains("no PEM certificate"));
    let _ = std::fs::remove_dir_all(&dir);
}
