//! The HTTP(S) probe and the downloads of tiers 2 and 3.
//!
//! One connection per probe, timed step by step: DNS, TCP connect, TLS
//! handshake (offering h2 and HTTP/1.1 by ALPN), the first byte of the
//! response, and the body to its end. We speak what ALPN chose.
//!
//! Redirects are not followed: a 3xx is the answer. So the probe reaches
//! only the URL's host, at the addresses the egress policy allowed.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response, Uri, Version, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tidepool_crds::test_session::{ProbeKind, ProbeResult, ProbeTimings};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};

use super::Context;
use super::net::{self, Deadline, error_chain};
use super::outcome::{Download, Facts, ProbeOutcome, ms};
use super::tls;

const USER_AGENT: &str = concat!("tidepool-probe/", env!("CARGO_PKG_VERSION"));

/// An http or https URL, taken apart.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct HttpUrl {
    pub https: bool,
    /// Without brackets, for DNS and the TLS server name.
    pub host: String,
    pub port: u16,
    /// `host[:port]` as in the URL, for the Host header.
    pub authority: String,
    pub path: String,
}

pub(crate) fn parse_url(url: &str) -> Result<HttpUrl, String> {
    let uri: Uri = url.parse().map_err(|error| format!("URL {url}: {error}"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("URL {url}: the scheme must be http or https")),
    };
    let authority = uri.authority().ok_or_else(|| format!("URL {url}: no host"))?;
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("URL {url}: no host"));
    }
    Ok(HttpUrl {
        https,
        host: host.to_owned(),
        port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
        authority: authority.as_str().rsplit('@').next().unwrap_or_default().to_owned(),
        path: uri.path_and_query().map_or("/", |path| path.as_str()).to_owned(),
    })
}

/// How much of the body to read.
#[derive(Clone, Copy, Debug)]
pub(crate) enum BodyRead {
    /// A probe: the whole body up to a cap; not ending in time is a failure.
    Probe { max_bytes: u64 },
    /// A download: until the cap or the time after the first byte, whichever
    /// comes first; its rate is the finding.
    Download { max_bytes: u64, max_time: Duration },
}

/// What one request measured, filled in as it goes.
#[derive(Default)]
struct Measured {
    timings: ProbeTimings,
    protocol: Option<String>,
    facts: Facts,
}

/// GETs `url`; `timeout` bounds everything up to the first byte, and a probe's body too.
pub(crate) async fn http_probe(ctx: &Context, url: &str, read: BodyRead) -> ProbeOutcome {
    let outcome = ProbeOutcome::new(ProbeKind::Http, url.to_owned());
    let parsed = match parse_url(url) {
        Ok(parsed) => parsed,
        Err(error) => return outcome.fail(error),
    };
    let start = Instant::now();
    let mut measured = Measured::default();
    let fetched = fetch(ctx, &parsed, read, start, &mut measured).await;
    measured.timings.total_ms = ms(start.elapsed());
    let mut outcome = ProbeOutcome {
        result: ProbeResult { timings: Some(measured.timings), protocol: measured.protocol, ..outcome.result },
        facts: measured.facts,
    };
    match fetched {
        Ok(()) => {
            outcome.result.ok = true;
            outcome
        }
        Err(error) => outcome.fail(error),
    }
}

async fn fetch(ctx: &Context, url: &HttpUrl, read: BodyRead, start: Instant, out: &mut Measured) -> Result<(), String> {
    let deadline = Deadline::after(ctx.settings.timeout);
    let refused = &mut out.facts.egress_refused;
    let addrs = net::resolve_allowed(&ctx.settings, &url.host, Some(url.port), deadline, refused).await?;
    out.timings.dns_ms = Some(ms(start.elapsed()));
    let connecting = Instant::now();
    let tcp = net::connect(ctx, &addrs, deadline).await?;
    out.timings.connect_ms = Some(ms(connecting.elapsed()));
    if !url.https {
        return exchange(tcp, false, url, read, start, deadline, out).await;
    }
    let shaking = Instant::now();
    let config = ctx.tls_http.clone()?;
    let stream = tls::handshake(config, &url.host, tcp, deadline).await.map_err(|error| {
        out.facts.cert_days_left = error.days_left;
        error.message
    })?;
    out.timings.tls_ms = Some(ms(shaking.elapsed()));
    let (_, connection) = stream.get_ref();
    out.facts.cert_days_left = tls::peer_days_left(connection);
    let h2 = connection.alpn_protocol() == Some(b"h2");
    exchange(stream, h2, url, read, start, deadline, out).await
}

/// The request and response over a connected (and maybe TLS) stream.
async fn exchange<T>(
    io: T,
    h2: bool,
    url: &HttpUrl,
    read: BodyRead,
    start: Instant,
    deadline: Deadline,
    out: &mut Measured,
) -> Result<(), String>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (response, _connection) = deadline.bound("HTTP request", send(io, h2, url)).await?;
    out.timings.first_byte_ms = Some(ms(start.elapsed()));
    out.protocol = Some(version_name(response.version()).into());
    let status = response.status();
    out.facts.status = Some(status.as_u16());
    let first_byte = Instant::now();
    let (max_bytes, stop_at) = match read {
        BodyRead::Probe { max_bytes } => (max_bytes, deadline.at),
        BodyRead::Download { max_bytes, max_time } => (max_bytes, first_byte + max_time),
    };
    let mut body = response.into_body();
    let mut bytes = 0u64;
    loop {
        match timeout_at(stop_at, body.frame()).await {
            Ok(None) => break,
            Ok(Some(Ok(frame))) => {
                bytes += frame.data_ref().map_or(0, |data| data.len() as u64);
                if bytes >= max_bytes {
                    if matches!(read, BodyRead::Probe { .. }) {
                        out.facts.capped_at = Some(bytes);
                    }
                    break;
                }
            }
            Ok(Some(Err(error))) => {
                return Err(format!("reading the body after {bytes} bytes: {}", error_chain(&error)));
            }
            Err(_) if matches!(read, BodyRead::Download { .. }) => break,
            Err(_) => return Err(deadline.expired(format_args!("reading the body ({bytes} bytes so far)"))),
        }
    }
    if let BodyRead::Download { .. } = read {
        out.facts.download = Some(Download { bytes, seconds: first_byte.elapsed().as_secs_f64() });
    }
    if status.is_success() || status.is_redirection() { Ok(()) } else { Err(format!("HTTP status {status}")) }
}

/// Aborts the task that drives a connection when the exchange is over.
struct Connection(JoinHandle<()>);

impl Drop for Connection {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Handshakes HTTP/1.1 or h2 over `io` and sends the GET.
async fn send<T>(io: T, h2: bool, url: &HttpUrl) -> Result<(Response<Incoming>, Connection), String>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let io = TokioIo::new(io);
    let failed = |error: hyper::Error| error_chain(&error);
    if h2 {
        let (mut sender, connection) = http2::handshake(TokioExecutor::new(), io).await.map_err(failed)?;
        let connection = Connection(tokio::spawn(async move {
            let _ = connection.await;
        }));
        let target = format!("https://{}{}", url.authority, url.path);
        let request = request(&target, url)?;
        Ok((sender.send_request(request).await.map_err(failed)?, connection))
    } else {
        let (mut sender, connection) = http1::handshake(io).await.map_err(failed)?;
        let connection = Connection(tokio::spawn(async move {
            let _ = connection.await;
        }));
        let request = request(&url.path, url)?;
        Ok((sender.send_request(request).await.map_err(failed)?, connection))
    }
}

fn request(target: &str, url: &HttpUrl) -> Result<Request<Empty<Bytes>>, String> {
    Request::get(target)
        .header(header::HOST, &url.authority)
        .header(header::USER_AGENT, USER_AGENT)
        .header(header::ACCEPT, "*/*")
        .body(Empty::new())
        .map_err(|error| format!("HTTP request for {target}: {error}"))
}

fn version_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "h2",
        Version::HTTP_3 => "h3",
        _ => "HTTP",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let url = parse_url("https://user:pw@[::1]:8443/a/b?c=d").unwrap();
        assert_eq!(
            url,
            HttpUrl {
                https: true,
                host: "::1".into(),
                port: 8443,
                authority: "[::1]:8443".into(),
                path: "/a/b?c=d".into()
            }
        );
        let url = parse_url("http://example.com").unwrap();
        assert_eq!((url.https, url.port, url.path.as_str(), url.authority.as_str()), (false, 80, "/", "example.com"));
        assert_eq!(parse_url("https://example.com/").unwrap().port, 443);
        assert!(parse_url("ftp://example.com/").unwrap_err().contains("http or https"));
        assert!(parse_url("/just/a/path").is_err());
        assert!(parse_url("http:// spaced").is_err());
    }

    #[test]
    fn versions() {
        assert_eq!(version_name(Version::HTTP_11), "HTTP/1.1");
        assert_eq!(version_name(Version::HTTP_2), "h2");
    }
}
