//! TLS: client configurations, the handshake, certificate expiry, and the tls probe.

use std::io;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{CertificateError, ClientConfig, ClientConnection, ProtocolVersion, RootCertStore};
use tidepool_crds::test_session::{ProbeKind, ProbeTimings};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::Context;
use super::cert;
use super::net::{self, Deadline, ProbeStream, host_port};
use super::outcome::{ProbeOutcome, ms};

const SECONDS_PER_DAY: f64 = 86_400.0;

/// A client configuration over ring, trusting `roots`; `alpn` offers h2 and
/// HTTP/1.1. The tls probe offers no ALPN: a server that speaks neither may
/// refuse a handshake that offers them.
pub(crate) fn client_config(roots: &Arc<RootCertStore>, alpn: bool) -> Result<Arc<ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| format!("TLS configuration: {error}"))?
        .with_root_certificates(Arc::clone(roots))
        .with_no_client_auth();
    if alpn {
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    Ok(Arc::new(config))
}

/// A failed handshake, and the certificate's days left when it failed for having expired.
pub(crate) struct HandshakeError {
    pub message: String,
    pub days_left: Option<f64>,
}

/// The TLS handshake over `tcp`, verifying the peer as `host`.
pub(crate) async fn handshake(
    config: Arc<ClientConfig>,
    host: &str,
    tcp: ProbeStream,
    deadline: Deadline,
) -> Result<TlsStream<ProbeStream>, HandshakeError> {
    let name = ServerName::try_from(host.to_owned())
        .map_err(|error| HandshakeError { message: format!("TLS server name {host}: {error}"), days_left: None })?;
    let what = format!("TLS handshake with {host}");
    match tokio::time::timeout_at(deadline.at, TlsConnector::from(config).connect(name, tcp)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(error)) => Err(HandshakeError { message: format!("{what}: {error}"), days_left: expired_days(&error) }),
        Err(_) => Err(HandshakeError { message: deadline.expired(what), days_left: None }),
    }
}

/// The days left (negative) of a certificate that failed verification for having expired.
fn expired_days(error: &io::Error) -> Option<f64> {
    match error.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { time, not_after }) => {
            Some((not_after.as_secs() as f64 - time.as_secs() as f64) / SECONDS_PER_DAY)
        }
        _ => None,
    }
}

/// Days from `now` until the end-entity certificate of the chain expires.
pub(crate) fn days_left(chain: Option<&[CertificateDer<'_>]>, now: SystemTime) -> Option<f64> {
    let not_after = cert::not_after(chain?.first()?)?;
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs_f64();
    Some((not_after as f64 - now) / SECONDS_PER_DAY)
}

/// What the handshake found: the certificate's days left.
pub(crate) fn peer_days_left(connection: &ClientConnection) -> Option<f64> {
    days_left(connection.peer_certificates(), SystemTime::now())
}

/// `TLS 1.3`, `TLS 1.2`.
pub(crate) fn version_name(version: Option<ProtocolVersion>) -> Option<String> {
    Some(match version? {
        ProtocolVersion::TLSv1_3 => "TLS 1.3".into(),
        ProtocolVersion::TLSv1_2 => "TLS 1.2".into(),
        other => format!("{other:?}"),
    })
}

/// A TCP connect and TLS handshake: DNS, connect and handshake times, the
/// version, and the days until the peer's certificate expires.
pub(crate) async fn tls_probe(ctx: &Context, host: &str, port: u16) -> ProbeOutcome {
    let mut outcome = ProbeOutcome::new(ProbeKind::Tls, host_port(host, port));
    let config = match ctx.tls_plain.clone() {
        Ok(config) => config,
        Err(error) => return outcome.fail(error),
    };
    let start = Instant::now();
    let deadline = Deadline::after(ctx.settings.timeout);
    let mut timings = ProbeTimings::default();
    let handshaken = async {
        let refused = &mut outcome.facts.egress_refused;
        let addrs = net::resolve_allowed(&ctx.settings, host, Some(port), deadline, refused).await?;
        timings.dns_ms = Some(ms(start.elapsed()));
        let connecting = Instant::now();
        let tcp = net::connect(ctx, &addrs, deadline).await?;
        timings.connect_ms = Some(ms(connecting.elapsed()));
        let shaking = Instant::now();
        let stream = handshake(config, host, tcp, deadline).await.map_err(|error| {
            outcome.facts.cert_days_left = error.days_left;
            error.message
        })?;
        timings.tls_ms = Some(ms(shaking.elapsed()));
        let (_, connection) = stream.get_ref();
        outcome.facts.cert_days_left = peer_days_left(connection);
        outcome.result.protocol = version_name(connection.protocol_version());
        Ok::<_, String>(())
    }
    .await;
    timings.total_ms = ms(start.elapsed());
    outcome.result.timings = Some(timings);
    match handshaken {
        Ok(()) => {
            outcome.result.ok = true;
            outcome
        }
        Err(error) => outcome.fail(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::UnixTime;
    use std::time::Duration;

    #[test]
    fn days_left_of_a_chain() {
        let mut params = rcgen::CertificateParams::new(vec!["probe.test".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2030, 1, 11);
        let key = rcgen::KeyPair::generate().unwrap();
        let der = params.self_signed(&key).unwrap().der().clone();
        let now = UNIX_EPOCH + Duration::from_secs(1_893_456_000); // 2030-01-01
        assert_eq!(days_left(Some(std::slice::from_ref(&der)), now), Some(10.0));
        let later = UNIX_EPOCH + Duration::from_secs(1_893_456_000 + 12 * 86_400);
        assert_eq!(days_left(Some(&[der]), later), Some(-2.0));
        assert_eq!(days_left(None, now), None);
        assert_eq!(days_left(Some(&[]), now), None);
    }

    #[test]
    fn days_of_an_expired_certificate() {
        let expired = rustls::Error::InvalidCertificate(CertificateError::ExpiredContext {
            time: UnixTime::since_unix_epoch(Duration::from_secs(3 * 86_400)),
            not_after: UnixTime::since_unix_epoch(Duration::from_secs(86_400)),
        });
        assert_eq!(expired_days(&io::Error::new(io::ErrorKind::InvalidData, expired)), Some(-2.0));
        assert_eq!(expired_days(&io::Error::other("reset")), None);
    }

    #[test]
    fn versions() {
        assert_eq!(version_name(Some(ProtocolVersion::TLSv1_3)).as_deref(), Some("TLS 1.3"));
        assert_eq!(version_name(Some(ProtocolVersion::TLSv1_2)).as_deref(), Some("TLS 1.2"));
        assert_eq!(version_name(None), None);
    }
}
