//! The UDP echo relay, so the CLI's loss and jitter work from outside the
//! cluster. A client's grant (`POST /s/api/v1/udp`) goes to its pod with
//! the relay ticket, so the pod makes the cookie for the client's address;
//! the gateway learns the cookie's route from the pod's answer and gives
//! the client its own UDP port instead of the pod's. Each probe that then
//! arrives is wrapped with its source address and tag
//! ([`tidepool_protocol::relay`]) and sent to the pod, whose echo comes back
//! wrapped and goes to that address, if it is one that sent that cookie.
//!
//! The routes live in this replica: a client's datagrams must reach the
//! replica that passed on its grant (see docs/gateway.md).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use prometheus::IntCounterVec;
use tidepool_protocol::pod::{UDP_HEADER_BYTES, UDP_MAX_BYTES, UdpProbe};
use tidepool_protocol::relay::{self, RELAY_HEADER_BYTES, RELAY_MAX_BYTES, RelayKey};
use tokio::net::UdpSocket;

/// Routes kept; the oldest goes when another comes.
const MAX_ROUTES: usize = 10_000;
/// Client addresses one cookie answers to: a client that changes port (a
/// NAT rebinding) keeps working, and a cookie cannot become a fan-out.
const CLIENTS_PER_ROUTE: usize = 4;
/// Datagrams one route passes to its pod in a second; the pod's own caps
/// per session stay the real limit, this keeps a flood off the pod.
const DATAGRAMS_PER_SECOND: u32 = 1_000;

/// Why a datagram was not passed on: the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Not a probe (size or magic), or not a wrapped echo from a pod.
    NotAProbe,
    /// A cookie no grant through this replica gave, or one whose session ended.
    UnknownCookie,
    /// More than [`DATAGRAMS_PER_SECOND`] for one route.
    OverRate,
    /// An echo from another address than the route's pod, or with a bad tag.
    BadRelay,
    /// An echo for an address that did not send that cookie.
    UnknownClient,
}

impl Dropped {
    pub const ALL: [Dropped; 5] =
        [Self::NotAProbe, Self::UnknownCookie, Self::OverRate, Self::BadRelay, Self::UnknownClient];

    pub fn label(self) -> &'static str {
        match self {
            Self::NotAProbe => "not_a_probe",
            Self::UnknownCookie => "unknown_cookie",
            Self::OverRate => "over_rate",
            Self::BadRelay => "bad_relay",
            Self::UnknownClient => "unknown_client",
        }
    }
}

/// Where a cookie's datagrams go.
struct Route {
    pod: SocketAddr,
    key: Arc<RelayKey>,
    /// The session token's expiry, Unix seconds: the route ends with it.
    expires: u64,
    clients: VecDeque<SocketAddr>,
    /// The second `sent` counts, Unix seconds.
    second: u64,
    sent: u32,
}

/// The routes by cookie. Pure: the caller gives the time.
#[derive(Default)]
pub struct Routes {
    by_cookie: HashMap<u64, Route>,
    order: VecDeque<u64>,
}

impl Routes {
    /// Learns the route of a granted cookie (again, after a new grant).
    pub fn learn(&mut self, cookie: u64, pod: SocketAddr, key: Arc<RelayKey>, expires: u64) {
        let route = Route { pod, key, expires, clients: VecDeque::new(), second: 0, sent: 0 };
        if self.by_cookie.insert(cookie, route).is_none() {
            self.order.push_back(cookie);
        }
        while self.order.len() > MAX_ROUTES {
            if let Some(oldest) = self.order.pop_front() {
                self.by_cookie.remove(&oldest);
            }
        }
    }

    /// Where a client's probe goes and the key to wrap it with; the
    /// client's address is remembered for the echo.
    pub fn inbound(
        &mut self,
        probe: &[u8],
        from: SocketAddr,
        now: u64,
    ) -> Result<(SocketAddr, Arc<RelayKey>), Dropped> {
        let cookie = UdpProbe::read(probe).map_err(|_| Dropped::NotAProbe)?.cookie;
        let route = self.by_cookie.get_mut(&cookie).filter(|r| r.expires > now).ok_or(Dropped::UnknownCookie)?;
        if route.second != now {
            route.second = now;
            route.sent = 0;
        }
        if route.sent >= DATAGRAMS_PER_SECOND {
            return Err(Dropped::OverRate);
        }
        route.sent += 1;
        if !route.clients.contains(&from) {
            if route.clients.len() == CLIENTS_PER_ROUTE {
                route.clients.pop_front();
            }
            route.clients.push_back(from);
        }
        Ok((route.pod, route.key.clone()))
    }

    /// The client a pod's wrapped echo goes to, once it is known to come
    /// from the route's pod, under its key, for an address that sent it.
    pub fn echo(&self, wrapped: &[u8], from: SocketAddr) -> Result<SocketAddr, Dropped> {
        let probe = wrapped.get(RELAY_HEADER_BYTES..).ok_or(Dropped::NotAProbe)?;
        let cookie = UdpProbe::read(probe).map_err(|_| Dropped::NotAProbe)?.cookie;
        let route = self.by_cookie.get(&cookie).ok_or(Dropped::UnknownCookie)?;
        if route.pod != from {
            return Err(Dropped::BadRelay);
        }
        let client = relay::open(&route.key, wrapped).map_err(|_| Dropped::BadRelay)?;
        if !route.clients.contains(&client) {
            return Err(Dropped::UnknownClient);
        }
        Ok(client)
    }

    pub fn len(&self) -> usize {
        self.by_cookie.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_cookie.is_empty()
    }
}

/// The relay's settings and routes, shared by the proxy (which learns
/// routes from grants) and the relay task.
pub struct UdpRelay {
    /// The port clients are told to send to.
    pub advertised_port: u16,
    routes: Mutex<Routes>,
}

impl UdpRelay {
    pub fn new(advertised_port: u16) -> Self {
        Self { advertised_port, routes: Mutex::new(Routes::default()) }
    }

    /// A poisoned lock holds sound routes (each change is a few plain steps).
    pub fn routes(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Relays until a socket fails: `public` faces the clients, `upstream` the pods.
pub async fn relay(relay: Arc<UdpRelay>, public: UdpSocket, upstream: UdpSocket, datagrams: IntCounterVec) {
    // One byte more than the largest, so an oversized datagram shows.
    let mut inbound = [0u8; UDP_MAX_BYTES + 1];
    let mut wrapped = [0u8; RELAY_MAX_BYTES + 1];
    let count = |direction: &str, outcome: &str| datagrams.with_label_values(&[direction, outcome]).inc();
    loop {
        tokio::select! {
            received = public.recv_from(&mut inbound) => {
                let Ok((len, from)) = received else { continue };
                let now = crate::state::now_unix();
                // No lock is held across the send.
                let decided = relay.routes().inbound(&inbound[..len], from, now);
                let (pod, key) = match decided {
                    Ok(route) => route,
                    Err(dropped) => {
                        count("to_pod", dropped.label());
                        continue;
                    }
                };
                let Ok(size) = relay::wrap(&key, from, &inbound[..len], &mut wrapped) else {
                    count("to_pod", Dropped::NotAProbe.label());
                    continue;
                };
                let sent = upstream.send_to(&wrapped[..size], pod).await;
                count("to_pod", if sent.is_ok() { "relayed" } else { "send_failed" });
            }
            received = upstream.recv_from(&mut wrapped) => {
                let Ok((len, from)) = received else { continue };
                if !(RELAY_HEADER_BYTES + UDP_HEADER_BYTES..=RELAY_MAX_BYTES).contains(&len) {
                    count("to_client", Dropped::NotAProbe.label());
                    continue;
                }
                let decided = relay.routes().echo(&wrapped[..len], from);
                let client = match decided {
                    Ok(client) => client,
                    Err(dropped) => {
                        count("to_client", dropped.label());
                        continue;
                    }
                };
                let sent = public.send_to(&wrapped[RELAY_HEADER_BYTES..len], client).await;
                count("to_client", if sent.is_ok() { "relayed" } else { "send_failed" });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(cookie: u64) -> Vec<u8> {
        let mut datagram = vec![0u8; 64];
        UdpProbe { cookie, seq: 1, client_time_us: 2, server_time_us: 0 }.write(&mut datagram).unwrap();
        datagram
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// What the pod sends back for `probe` from `client`, under `key`.
    fn echoed(key: &RelayKey, client: SocketAddr, probe: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; RELAY_MAX_BYTES];
        let len = relay::wrap(key, client, probe, &mut out).unwrap();
        out.truncate(len);
        UdpProbe::stamp_server_time(&mut out[RELAY_HEADER_BYTES..], 99);
        relay::seal(key, &mut out).unwrap();
        out
    }

    fn routes_with(cookie: u64, key: &Arc<RelayKey>) -> Routes {
        let mut routes = Routes::default();
        routes.learn(cookie, addr("10.0.0.5:8080"), key.clone(), 1_000);
        routes
    }

    #[test]
    fn a_granted_cookie_goes_to_its_pod_and_the_echo_to_its_client() {
        let key = Arc::new(RelayKey::new(&[1; 32]));
        let mut routes = routes_with(7, &key);
        let client = addr("198.51.100.7:40000");
        let (pod, _) = routes.inbound(&probe(7), client, 10).unwrap();
        assert_eq!(pod, addr("10.0.0.5:8080"));
        assert_eq!(routes.echo(&echoed(&key, client, &probe(7)), pod), Ok(client));
    }

    #[test]
    fn garbage_unknown_or_expired_cookies_go_nowhere() {
        let key = Arc::new(RelayKey::new(&[1; 32]));
        let mut routes = routes_with(7, &key);
        let client = addr("198.51.100.7:40000");
        assert_eq!(routes.inbound(b"hello", client, 10).map(|_| ()), Err(Dropped::NotAProbe));
        assert_eq!(routes.inbound(&[0u8; UDP_MAX_BYTES + 1], client, 10).map(|_| ()), Err(Dropped::NotAProbe));
        assert_eq!(routes.inbound(&probe(8), client, 10).map(|_| ()), Err(Dropped::UnknownCookie));
        assert_eq!(routes.inbound(&probe(7), client, 1_000).map(|_| ()), Err(Dropped::UnknownCookie), "expired");
    }

    #[test]
    fn an_echo_from_elsewhere_under_another_key_or_for_a_stranger_is_dropped() {
        let key = Arc::new(RelayKey::new(&[1; 32]));
        let mut routes = routes_with(7, &key);
        let (client, stranger) = (addr("198.51.100.7:40000"), addr("203.0.113.9:53"));
        let (pod, _) = routes.inbound(&probe(7), client, 10).unwrap();
        assert_eq!(routes.echo(&echoed(&key, client, &probe(7)), addr("10.0.0.6:8080")), Err(Dropped::BadRelay));
        let forged = echoed(&RelayKey::new(&[2; 32]), client, &probe(7));
        assert_eq!(routes.echo(&forged, pod), Err(Dropped::BadRelay));
        // A reflection: the pod's key, but an address that never sent the cookie.
        assert_eq!(routes.echo(&echoed(&key, stranger, &probe(7)), pod), Err(Dropped::UnknownClient));
        assert_eq!(routes.echo(&echoed(&key, client, &probe(8)), pod), Err(Dropped::UnknownCookie));
        assert_eq!(routes.echo(&[0u8; 20], pod), Err(Dropped::NotAProbe));
    }

    #[test]
    fn a_route_answers_a_few_recent_addresses_and_a_bounded_rate() {
        let key = Arc::new(RelayKey::new(&[1; 32]));
        let mut routes = routes_with(7, &key);
        let first = addr("198.51.100.7:1");
        routes.inbound(&probe(7), first, 10).unwrap();
        for port in 2..=(CLIENTS_PER_ROUTE as u16 + 1) {
            routes.inbound(&probe(7), addr(&format!("198.51.100.7:{port}")), 10).unwrap();
        }
        let pod = addr("10.0.0.5:8080");
        assert_eq!(routes.echo(&echoed(&key, first, &probe(7)), pod), Err(Dropped::UnknownClient), "pushed out");
        let last = addr(&format!("198.51.100.7:{}", CLIENTS_PER_ROUTE + 1));
        assert_eq!(routes.echo(&echoed(&key, last, &probe(7)), pod), Ok(last));

        let mut routes = routes_with(7, &key);
        for _ in 0..DATAGRAMS_PER_SECOND {
            routes.inbound(&probe(7), first, 20).unwrap();
        }
        assert_eq!(routes.inbound(&probe(7), first, 20).map(|_| ()), Err(Dropped::OverRate));
        assert!(routes.inbound(&probe(7), first, 21).is_ok(), "the next second starts afresh");
    }

    #[test]
    fn routes_are_bounded_and_a_new_grant_replaces_its_route() {
        let key = Arc::new(RelayKey::new(&[1; 32]));
        let mut routes = Routes::default();
        for cookie in 0..(MAX_ROUTES as u64 + 5) {
            routes.learn(cookie, addr("10.0.0.5:8080"), key.clone(), 1_000);
        }
        assert_eq!(routes.len(), MAX_ROUTES);
        assert_eq!(routes.inbound(&probe(0), addr("198.51.100.7:1"), 10).map(|_| ()), Err(Dropped::UnknownCookie));
        routes.learn(MAX_ROUTES as u64 + 4, addr("10.0.0.6:8080"), key, 1_000);
        assert_eq!(routes.len(), MAX_ROUTES);
        let moved = routes.inbound(&probe(MAX_ROUTES as u64 + 4), addr("198.51.100.7:1"), 10).unwrap();
        assert_eq!(moved.0, addr("10.0.0.6:8080"));
    }
}
