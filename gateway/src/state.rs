//! What every handler shares.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};

use crate::anonymous::Pending;
use crate::cache::Caches;
use crate::client::client_address;
use crate::flags::Settings;
use crate::metrics::Metrics;
use crate::operator::OperatorApi;
use crate::proxy::{OpenStreams, PodClient};
use crate::reply::Refused;

/// The peer of a request's connection, as the server saw it.
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

pub struct Gateway {
    pub settings: Settings,
    /// For the sightings of clients the gateway writes on sessions.
    pub kube: kube::Client,
    pub caches: Caches,
    pub operator: OperatorApi,
    pub pods: PodClient,
    pub streams: Arc<OpenStreams>,
    pub pending: Pending,
    /// The router's recent picks for routed requests.
    pub picks: crate::routed::Picks,
    pub metrics: Arc<Metrics>,
    /// The web UI's files, when `--ui-dir` names a build.
    pub ui: Option<crate::ui::Ui>,
    /// The UDP echo relay, unless `--udp-listen=off`.
    pub udp: Option<Arc<crate::udp_relay::UdpRelay>>,
}

impl Gateway {
    /// The address a request comes from (see [`client_address`]).
    pub fn client_address(&self, request: &Request<Body>) -> Result<IpAddr, Refused> {
        let peer = request
            .extensions()
            .get::<Peer>()
            .map(|p| p.0.ip())
            .ok_or_else(|| Refused::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "no peer address"))?;
        let forwarded: Vec<&str> =
            request.headers().get_all("x-forwarded-for").iter().filter_map(|v| v.to_str().ok()).collect();
        client_address(peer, &forwarded, &self.settings.trusted_proxies)
            .map_err(|e| Refused::new(StatusCode::BAD_REQUEST, "bad_forwarded_for", e.to_string()))
    }

    /// The URL clients reach this gateway at: the configured one, else the
    /// request's own scheme and Host.
    pub fn public_url(&self, request_host: Option<&str>) -> Option<String> {
        if let Some(url) = &self.settings.public_url {
            return Some(url.clone());
        }
        let host = request_host?;
        // A Host header is the client's own text: only a host and port are used.
        let sane = !host.is_empty()
            && host.len() <= 255
            && host.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
        let scheme = if self.settings.tls.is_some() { "https" } else { "http" };
        sane.then(|| format!("{scheme}://{host}"))
    }
}

/// The request's Host header.
pub fn host_of(request: &Request<Body>) -> Option<String> {
    request.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_string)
}

/// Seconds since the Unix epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
