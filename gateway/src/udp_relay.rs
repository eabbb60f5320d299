//! The UDP echo relay, so the CLI's loss and jitter work from outside the
//! cluster. A client's grant (`POST /s/api/v1/udp`) goes to its pod with
//! the relay ticket, so the pod makes the cookie for the client's address;
//! the gateway learns the cookie's route from the pod's answer and gives
//! the client its own UDP port instead of the pod's. Each probe that then
//! arrives is wrapped with its source address and tag
//! ([`tidepool_protocol::relay`]) and sent to the pod, whose echo comes back
//! wrapped and goes to that address, if it is one that sent that cookie.
//!
//! The replica that passed on a grant writes the cookie's route on the
//! session ([`ROUTE_ANNOTATION`]); every replica indexes those from its
//! watch, so a datagram that reaches another replica is routed too, once
//! that replica has fetched the relay ticket for the pod.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kube::ResourceExt;
use prometheus::IntCounterVec;
use tidepool_crds::TestSession;
use tidepool_crds::test_session::Phase;
use tidepool_protocol::pod::{UDP_HEADER_BYTES, UDP_MAX_BYTES, UdpProbe};
use tidepool_protocol::relay::{self, RELAY_HEADER_BYTES, RELAY_MAX_BYTES, RelayKey};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::state::Gateway;

/// The annotation on a session that names its latest grant's route:
/// `<cookie, 16 hex digits> <pod> <pod's UDP port>`.
pub const ROUTE_ANNOTATION: &str = "udp.tidepool.dev/route";
/// How often each replica indexes the routes on the sessions it watches.
const INDEX_EVERY: Duration = Duration::from_millis(500);
/// Cookies waiting for their relay ticket; more are dropped, not queued.
const RESOLVE_QUEUE: usize = 64;

/// Routes kept; the oldest goes when another comes.
const MAX_ROUTES: usize = 10_000;
/// Client addresses one cookie answers to: a client that changes port (a
/// NAT rebinding) keeps working, and a cookie cannot become a fan-out.
const CLIENTS_PER_ROUTE: usize = 4;
/// A route no datagram used for this long is forgotten: the UDP relay's
/// idle timeout (a CLI run sends ten a second while it measures).
const ROUTE_IDLE_SECONDS: u64 = 600;
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
    /// A cookie another replica granted, whose route this one is fetching.
    Resolving,
}

impl Dropped {
    pub const ALL: [Dropped; 6] =
        [Self::NotAProbe, Self::UnknownCookie, Self::OverRate, Self::BadRelay, Self::UnknownClient, Self::Resolving];

    pub fn label(self) -> &'static str {
        match self {
            Self::NotAProbe => "not_a_probe",
            Self::UnknownCookie => "unknown_cookie",
            Self::OverRate => "over_rate",
            Self::BadRelay => "bad_relay",
            Self::UnknownClient => "unknown_client",
            Self::Resolving => "resolving",
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
    /// The second `sent` counts, Unix seconds; the route's last use.
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
    pub fn learn(&mut self, cookie: u64, pod: SocketAddr, key: Arc<RelayKey>, expires: u64, now: u64) {
        let route = Route { pod, key, expires, clients: VecDeque::new(), second: now, sent: 0 };
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
        let live = |r: &&mut Route| r.expires > now && now.saturating_sub(r.second) < ROUTE_IDLE_SECONDS;
        let route = self.by_cookie.get_mut(&cookie).filter(live).ok_or(Dropped::UnknownCookie)?;
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

    pub fn knows(&self, cookie: u64) -> bool {
        self.by_cookie.contains_key(&cookie)
    }

    pub fn len(&self) -> usize {
        self.by_cookie.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_cookie.is_empty()
    }
}

/// A grant's route as the session carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedRoute {
    pub cookie: u64,
    pub pod: String,
    pub port: u16,
}

impl SharedRoute {
    pub fn annotation(&self) -> String {
        format!("{:016x} {} {}", self.cookie, self.pod, self.port)
    }

    /// The route an annotation names; `None` for anything else (an
    /// annotation is anyone's text who may patch the session).
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(' ');
        let (cookie, pod, port) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || cookie.len() != 16 || tidepool_protocol::names::object("pod", pod).is_err() {
            return None;
        }
        Some(Self { cookie: u64::from_str_radix(cookie, 16).ok()?, pod: pod.to_string(), port: port.parse().ok()? })
    }
}

/// Where a cookie's session is, from the routes written on sessions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shared {
    pub namespace: String,
    pub name: String,
    pub route: SharedRoute,
}

/// The relay's settings and routes, shared by the proxy (which learns
/// routes from grants), the relay task and the indexer.
pub struct UdpRelay {
    /// The port clients are told to send to.
    pub advertised_port: u16,
    routes: Mutex<Routes>,
    /// Routes other replicas granted, by cookie, from the sessions.
    shared: Mutex<HashMap<u64, Shared>>,
    /// Cookies queued for their relay ticket.
    pending: Mutex<HashSet<u64>>,
}

impl UdpRelay {
    pub fn new(advertised_port: u16) -> Self {
        Self {
            advertised_port,
            routes: Mutex::new(Routes::default()),
            shared: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashSet::new()),
        }
    }

    /// A poisoned lock holds sound routes (each change is a few plain steps).
    pub fn routes(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn shared(&self) -> MutexGuard<'_, HashMap<u64, Shared>> {
        self.shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn pending(&self) -> MutexGuard<'_, HashSet<u64>> {
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether an unknown `cookie` is another replica's grant, queued (once)
    /// to be resolved; a full queue drops it, to be asked again by the
    /// client's next datagram.
    fn resolve(&self, cookie: u64, queue: &mpsc::Sender<u64>) -> bool {
        if !self.shared().contains_key(&cookie) {
            return false;
        }
        let mut pending = self.pending();
        if pending.insert(cookie) && queue.try_send(cookie).is_err() {
            pending.remove(&cookie);
        }
        true
    }
}

/// The routes written on `sessions`: the ones still running.
pub fn index<'a>(sessions: impl IntoIterator<Item = &'a TestSession>) -> HashMap<u64, Shared> {
    let mut index = HashMap::new();
    for session in sessions {
        let running = session.status.as_ref().is_some_and(|s| matches!(s.phase, Phase::Ready | Phase::Running));
        let route = session.annotations().get(ROUTE_ANNOTATION).and_then(|a| SharedRoute::parse(a));
        if let (true, Some(route)) = (running, route) {
            let shared = Shared { namespace: session.namespace().unwrap_or_default(), name: session.name_any(), route };
            index.insert(shared.route.cookie, shared);
        }
    }
    index
}

/// Writes a grant's route on its session, for the other replicas.
pub async fn share(client: &kube::Client, namespace: &str, name: &str, route: &SharedRoute) -> Result<(), kube::Error> {
    use kube::api::{Api, Patch, PatchParams};
    let patch = serde_json::json!({ "metadata": { "annotations": { ROUTE_ANNOTATION: route.annotation() } } });
    let api: Api<TestSession> = Api::namespaced(client.clone(), namespace);
    api.patch(name, &PatchParams::apply(crate::seen::FIELD_MANAGER), &Patch::Merge(&patch)).await.map(|_| ())
}

/// Indexes the routes on the watched sessions, for as long as the gateway runs.
pub async fn keep_indexing(gateway: Arc<Gateway>, relay: Arc<UdpRelay>) {
    let mut ticks = tokio::time::interval(INDEX_EVERY);
    loop {
        ticks.tick().await;
        let sessions = gateway.caches.all_sessions();
        let index = index(sessions.iter().map(|s| s.as_ref()));
        *relay.shared() = index;
    }
}

/// Fetches the relay ticket for each queued cookie and learns its route,
/// for as long as the gateway runs.
pub async fn keep_resolving(gateway: Arc<Gateway>, relay: Arc<UdpRelay>, mut queue: mpsc::Receiver<u64>) {
    while let Some(cookie) = queue.recv().await {
        if let Err(why) = resolve(&gateway, &relay, cookie).await {
            tracing::debug!(cookie = format!("{cookie:016x}"), why, "no route for a shared cookie");
        }
        relay.pending().remove(&cookie);
    }
}

async fn resolve(gateway: &Gateway, relay: &UdpRelay, cookie: u64) -> Result<(), String> {
    if relay.routes().knows(cookie) {
        return Ok(());
    }
    let shared = relay.shared().get(&cookie).cloned().ok_or("no longer shared")?;
    let session = gateway.caches.session(&shared.namespace, &shared.name).ok_or("no such session")?;
    let status = session.status.as_ref().ok_or("no status")?;
    if status.pod.as_deref() != Some(shared.route.pod.as_str()) {
        return Err("the session has moved to another pod".into());
    }
    let ip = status.endpoint.as_deref().and_then(endpoint_ip).ok_or("no pod address")?;
    let expires = status.expires_at.as_ref().map_or(0, |t| u64::try_from(t.0.as_second()).unwrap_or(0));
    let uid = session.uid().ok_or("no UID")?;
    let tickets = gateway
        .operator
        .tickets(&shared.namespace, &shared.name, &uid, &shared.route.pod)
        .await
        .map_err(|e| e.to_string())?;
    let ticket = tickets.relay.ok_or("the operator gave no relay ticket")?;
    let key = tidepool_wire::token::relay_key(&ticket).ok_or("a relay ticket that does not parse")?;
    let pod = SocketAddr::new(ip, shared.route.port);
    relay.routes().learn(cookie, pod, Arc::new(RelayKey::new(&key)), expires, crate::state::now_unix());
    Ok(())
}

/// The address of a pod's endpoint, `http://<ip>:<port>`.
pub fn endpoint_ip(endpoint: &str) -> Option<IpAddr> {
    let uri = endpoint.parse::<axum::http::Uri>().ok()?;
    uri.host()?.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// The queue of cookies to resolve: its sender for [`relay`], its receiver
/// for [`keep_resolving`].
pub fn resolve_queue() -> (mpsc::Sender<u64>, mpsc::Receiver<u64>) {
    mpsc::channel(RESOLVE_QUEUE)
}

/// Relays until a socket fails: `public` faces the clients, `upstream` the pods.
pub async fn relay(
    relay: Arc<UdpRelay>,
    public: UdpSocket,
    upstream: UdpSocket,
    resolving: mpsc::Sender<u64>,
    datagrams: IntCounterVec,
) {
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
                    Err(Dropped::UnknownCookie) => {
                        // Another replica's grant, perhaps: then its route is fetched.
                        let cookie = UdpProbe::read(&inbound[..len]).map_or(0, |p| p.cookie);
                        let shared = relay.resolve(cookie, &resolving);
                        count("to_pod", if shared { Dropped::Resolving } else { Dropped::UnknownCookie }.label());
                        continue;
                    }
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
        routes.learn(cookie, addr("10.0.0.5:8080"), key.clone(), 1_000, 5);
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
    fn a_route_left_idle_is_forgotten_and_one_in_use_is_not() {
        let key = Arc::new(RelayKey::new(&[1; 32]));
        let client = addr("198.51.100.7:40000");
        let mut routes = Routes::default();
        routes.learn(7, addr("10.0.0.5:8080"), key.clone(), 100_000, 0);
        routes.learn(8, addr("10.0.0.5:8080"), key, 100_000, 0);
        // Route 7 is used every 500 s, route 8 never.
        for now in [500, 1_000, 1_500] {
            assert!(routes.inbound(&probe(7), client, now).is_ok(), "in use at {now}");
        }
        assert_eq!(routes.inbound(&probe(8), client, ROUTE_IDLE_SECONDS).map(|_| ()), Err(Dropped::UnknownCookie));
        assert!(routes.inbound(&probe(7), client, 1_500 + ROUTE_IDLE_SECONDS - 1).is_ok());
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
    fn a_pods_address_comes_from_its_endpoint() {
        assert_eq!(endpoint_ip("http://10.0.0.7:9000"), Some("10.0.0.7".parse().unwrap()));
        assert_eq!(endpoint_ip("http://[fd00::7]:9000"), Some("fd00::7".parse().unwrap()));
        assert_eq!(endpoint_ip("http://pod.example:9000"), None, "a name is not an address");
        assert_eq!(endpoint_ip("not a url"), None);
    }

    #[test]
    fn a_shared_route_round_trips_and_anything_else_is_ignored() {
        let route = SharedRoute { cookie: 0xdead_beef_0000_0001, pod: "open-x7k2p".into(), port: 8080 };
        assert_eq!(route.annotation(), "deadbeef00000001 open-x7k2p 8080");
        assert_eq!(SharedRoute::parse(&route.annotation()), Some(route));
        for bad in [
            "",
            "deadbeef00000001 open-x7k2p",
            "deadbeef00000001 open-x7k2p 8080 extra",
            "deadbeef0000001 open-x7k2p 8080",
            "deadbeef0000000g open-x7k2p 8080",
            "deadbeef00000001 Not_A_Pod 8080",
            "deadbeef00000001 ../../x 8080",
            "deadbeef00000001 open-x7k2p 70000",
        ] {
            assert_eq!(SharedRoute::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_index_holds_the_routes_of_running_sessions_only() {
        let session = |name: &str, phase: &str, route: Option<&str>| -> TestSession {
            let mut annotations = serde_json::Map::new();
            if let Some(route) = route {
                annotations.insert(ROUTE_ANNOTATION.into(), route.into());
            }
            serde_json::from_value(serde_json::json!({
                "apiVersion": "tidepool.dev/v1alpha1",
                "kind": "TestSession",
                "metadata": { "name": name, "namespace": "default", "annotations": annotations },
                "spec": { "pool": "open" },
                "status": { "phase": phase },
            }))
            .unwrap()
        };
        let sessions = [
            session("a", "Running", Some("0000000000000001 pod-a 8080")),
            session("b", "Ready", Some("0000000000000002 pod-b 8080")),
            session("c", "Completed", Some("0000000000000003 pod-c 8080")),
            session("d", "Running", Some("garbage")),
            session("e", "Running", None),
        ];
        let index = index(&sessions);
        let mut names: Vec<&str> = index.values().map(|s| s.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(index[&2].route.pod, "pod-b");
    }

    #[test]
    fn only_a_shared_cookie_is_queued_and_only_once() {
        let relay = UdpRelay::new(8080);
        let route = SharedRoute { cookie: 5, pod: "pod-a".into(), port: 8080 };
        relay.shared().insert(5, Shared { namespace: "default".into(), name: "a".into(), route });
        let (queue, mut queued) = mpsc::channel(1);
        assert!(!relay.resolve(6, &queue), "an unknown cookie");
        assert!(relay.resolve(5, &queue) && relay.resolve(5, &queue));
        assert_eq!(queued.try_recv().ok(), Some(5));
        assert!(queued.try_recv().is_err(), "queued once while pending");
    }

    #[test]
    fn routes_are_bounded_and_a_new_grant_replaces_its_route() {
        let key = Arc::new(RelayKey::new(&[1; 32]));
        let mut routes = Routes::default();
        for cookie in 0..(MAX_ROUTES as u64 + 5) {
            routes.learn(cookie, addr("10.0.0.5:8080"), key.clone(), 1_000, 5);
        }
        assert_eq!(routes.len(), MAX_ROUTES);
        assert_eq!(routes.inbound(&probe(0), addr("198.51.100.7:1"), 10).map(|_| ()), Err(Dropped::UnknownCookie));
        routes.learn(MAX_ROUTES as u64 + 4, addr("10.0.0.6:8080"), key, 1_000, 5);
        assert_eq!(routes.len(), MAX_ROUTES);
        let moved = routes.inbound(&probe(MAX_ROUTES as u64 + 4), addr("198.51.100.7:1"), 10).unwrap();
        assert_eq!(moved.0, addr("10.0.0.6:8080"));
    }
}
