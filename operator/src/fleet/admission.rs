//! Who may speak for which backend, and what of it is believed: pure checks
//! of an authenticated agent against the report it sends and what the
//! cluster says. The report route (`http::agents`) asks.
//!
//! - A node's report comes from the agents' ServiceAccount with a token
//!   bound to a pod on that very node. Its capacity is clamped to what the
//!   Node declares: an agent cannot claim cores, memory or GPUs its node does
//!   not have.
//! - An external backend exists only once an admin made its Backend object
//!   (kind External); the address clients are sent to is the admin's, never
//!   the agent's.
//! - Loopback, link-local and unspecified addresses are refused unless the
//!   operator is told to allow them (the local harness is).

use std::net::IpAddr;

use tidepool_wire::report::{AgentReport, ReportKind};

use super::Fleet;
use super::auth::Caller;
use super::geo::Place;

/// Why an agent may not send a report.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The token is not the agents' ServiceAccount's.
    Stranger(String),
    /// The token may not speak for this backend.
    WrongNode(String),
    /// The external backend's name is taken by a node.
    NodeName(String),
    /// No admin registered this external backend.
    Unregistered(String),
    /// The backend's address is loopback, link-local or unspecified.
    LocalAddress(String),
    /// The node is not in this replica's cache (yet): try again.
    UnknownNode(String),
}

impl Refusal {
    /// The bounded label of the refusal metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Stranger(_) => "forbidden",
            Self::WrongNode(_) | Self::NodeName(_) => "wrong_node",
            Self::Unregistered(_) => "unregistered",
            Self::LocalAddress(_) => "local_address",
            Self::UnknownNode(_) => "unknown_node",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Stranger(m)
            | Self::WrongNode(m)
            | Self::NodeName(m)
            | Self::Unregistered(m)
            | Self::LocalAddress(m)
            | Self::UnknownNode(m) => m,
        }
    }
}

/// What a Node declares it can run, and where its labels say it is.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeCapacity {
    pub cores: u32,
    pub memory_bytes: u64,
    /// `nvidia.com/gpu`, as the device plugin advertises it.
    pub gpus: u32,
    pub place: Place,
}

/// What the cluster says, as the checks need it.
pub trait Registry {
    /// The address an admin gave external backend `name` (its Backend's
    /// `spec.address`), when such a Backend exists.
    fn external(&self, name: &str) -> Option<Option<String>>;
    /// What Node `name` declares, when it exists.
    fn node(&self, name: &str) -> Option<NodeCapacity>;
}

/// The report as believed: checked against `caller` and the cluster, with
/// its capacity clamped and, for an external backend, the admin's address.
pub fn admit(
    fleet: &Fleet,
    caller: &Caller,
    mut report: AgentReport,
    registry: &dyn Registry,
    allow_local_addresses: bool,
) -> Result<AgentReport, Refusal> {
    let expected =
        format!("system:serviceaccount:{}:{}", fleet.settings.agent_namespace, fleet.settings.agent_service_account);
    if caller.username != expected {
        return Err(Refusal::Stranger(format!("{} is not the agents' ServiceAccount {expected}", caller.username)));
    }
    match (report.kind, caller.node.as_deref()) {
        (ReportKind::Node, Some(node)) if node == report.backend => {
            let declared = registry
                .node(node)
                .ok_or_else(|| Refusal::UnknownNode(format!("node {node} is not known yet; try again")))?;
            clamp(&mut report, &declared);
            // What the agent was told of its place wins; else the Node's labels say.
            if report.region.is_none() {
                report.region = declared.place.region;
            }
            if report.coordinates.is_none() {
                report.coordinates = declared.place.coordinates;
            }
        }
        (ReportKind::Node, Some(node)) => {
            return Err(Refusal::WrongNode(format!(
                "the token is bound to a pod on node {node}, not on node {}",
                report.backend
            )));
        }
        (ReportKind::Node, None) => {
            return Err(Refusal::WrongNode("a node report needs a token bound to the agent's pod on that node".into()));
        }
        (ReportKind::External, Some(node)) => {
            return Err(Refusal::WrongNode(format!("the agent on node {node} may not report an external backend")));
        }
        (ReportKind::External, None) if caller.pod_bound => {
            return Err(Refusal::WrongNode("a token bound to a pod may not report an external backend".into()));
        }
        (ReportKind::External, None) => {
            let node_named = registry.node(&report.backend).is_some()
                || fleet.with_router(|r| r.view(&report.backend).is_some_and(|v| v.kind == ReportKind::Node));
            if node_named {
                return Err(Refusal::NodeName(format!(
                    "{} is a node's name; pick another for the external backend",
                    report.backend
                )));
            }
            let address = registry.external(&report.backend).ok_or_else(|| {
                Refusal::Unregistered(format!(
                    "no Backend {} of kind External: an admin registers external backends",
                    report.backend
                ))
            })?;
            // Clients go where the admin said, whatever the agent claims.
            if address.is_some() {
                report.address = address;
            }
        }
    }
    if !allow_local_addresses
        && let Some(address) = &report.address
        && let Some(why) = local(address)
    {
        return Err(Refusal::LocalAddress(format!("address {address} is {why}; such backends are not placed on")));
    }
    Ok(report)
}

/// Cuts what a node report claims down to what its Node declares.
fn clamp(report: &mut AgentReport, declared: &NodeCapacity) {
    let capacity = &mut report.capacity;
    capacity.cores = capacity.cores.min(declared.cores.max(1));
    capacity.memory_bytes = capacity.memory_bytes.min(declared.memory_bytes.max(1));
    capacity.gpus.truncate(declared.gpus as usize);
    let cores = capacity.cores as usize;
    let gpus = capacity.gpus.len();
    for window in &mut report.windows {
        window.cores.truncate(cores);
        window.gpus.truncate(gpus);
    }
}

/// Why an address (`host[:port]` or `[v6]:port`) is local, if it is.
fn local(address: &str) -> Option<&'static str> {
    let host = if let Some(rest) = address.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        match address.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
            _ => address,
        }
    };
    if host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost") {
        return Some("loopback");
    }
    let ip: IpAddr = host.parse().ok()?;
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match ip {
        ip if ip.is_loopback() => Some("loopback"),
        ip if ip.is_unspecified() => Some("unspecified"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some("link-local"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::FleetSettings;
    use std::collections::HashMap;
    use std::time::Instant;
    use tidepool_wire::report::{Capacity, Coordinates, Gpu, Window};

    #[derive(Default)]
    struct Cluster {
        externals: HashMap<String, Option<String>>,
        nodes: HashMap<String, NodeCapacity>,
    }

    impl Registry for Cluster {
        fn external(&self, name: &str) -> Option<Option<String>> {
            self.externals.get(name).cloned()
        }
        fn node(&self, name: &str) -> Option<NodeCapacity> {
            self.nodes.get(name).cloned()
        }
    }

    fn cluster() -> Cluster {
        let mut cluster = Cluster::default();
        let place = Place { region: Some("eu-west".into()), coordinates: Some(PARIS) };
        cluster.nodes.insert("n1".into(), NodeCapacity { cores: 8, memory_bytes: 32 << 30, gpus: 1, place });
        cluster.externals.insert("ext".into(), Some("203.0.113.7:8443".into()));
        cluster
    }

    fn report(kind: ReportKind, backend: &str) -> AgentReport {
        let mut report = AgentReport::new(
            backend,
            kind,
            Capacity { cores: 1, memory_bytes: 1, disk_bytes: 0, gpus: vec![] },
            vec![Window { seconds: 10, cores: vec![0.0], ..Window::default() }],
        );
        report.address = Some("198.51.100.4:9101".into());
        report
    }

    fn agent(node: Option<&str>) -> Caller {
        Caller {
            username: "system:serviceaccount:default:tidepool-agent".into(),
            node: node.map(Into::into),
            pod_bound: node.is_some(),
        }
    }

    fn check(caller: &Caller, report: AgentReport) -> Result<AgentReport, Refusal> {
        admit(&Fleet::new(FleetSettings::default()), caller, report, &cluster(), false)
    }

    #[test]
    fn an_agent_speaks_only_for_its_own_node() {
        assert!(check(&agent(Some("n1")), report(ReportKind::Node, "n1")).is_ok());
        let wrong = check(&agent(Some("n1")), report(ReportKind::Node, "n2")).unwrap_err();
        assert!(matches!(wrong, Refusal::WrongNode(_)), "{wrong:?}");
        assert!(check(&agent(None), report(ReportKind::Node, "n1")).is_err());
        assert!(check(&agent(Some("n1")), report(ReportKind::External, "ext")).is_err());
        let pod_without_node = Caller { pod_bound: true, ..agent(None) };
        assert!(check(&pod_without_node, report(ReportKind::External, "ext")).is_err());
        let stranger =
            Caller { username: "system:serviceaccount:default:other".into(), node: Some("n1".into()), pod_bound: true };
        assert_eq!(check(&stranger, report(ReportKind::Node, "n1")).unwrap_err().reason(), "forbidden");
        let unknown = check(&agent(Some("n9")), report(ReportKind::Node, "n9")).unwrap_err();
        assert_eq!(unknown.reason(), "unknown_node");
    }

    const PARIS: Coordinates = Coordinates { latitude: 48.86, longitude: 2.35 };

    #[test]
    fn a_node_report_is_placed_where_its_node_is_unless_the_agent_says() {
        let placed = check(&agent(Some("n1")), report(ReportKind::Node, "n1")).unwrap();
        assert_eq!((placed.region.as_deref(), placed.coordinates), (Some("eu-west"), Some(PARIS)));
        let sydney = Coordinates { latitude: -33.87, longitude: 151.21 };
        let mut told = report(ReportKind::Node, "n1");
        told.region = Some("au-east".into());
        told.coordinates = Some(sydney);
        let placed = check(&agent(Some("n1")), told).unwrap();
        assert_eq!((placed.region.as_deref(), placed.coordinates), (Some("au-east"), Some(sydney)));
    }

    #[test]
    fn a_node_cannot_claim_more_than_its_node_declares() {
        let mut claims = report(ReportKind::Node, "n1");
        claims.capacity = Capacity {
            cores: 512,
            memory_bytes: 1 << 50,
            disk_bytes: 10,
            gpus: (0..4).map(|index| Gpu { index, model: "H100".into(), memory_bytes: 80 << 30 }).collect(),
        };
        claims.windows[0].cores = vec![0.0; 512];
        let believed = check(&agent(Some("n1")), claims).unwrap();
        assert_eq!((believed.capacity.cores, believed.capacity.memory_bytes), (8, 32 << 30));
        assert_eq!(believed.capacity.gpus.len(), 1);
        assert_eq!(believed.windows[0].cores.len(), 8);
        // A report within what the node declares is believed as it is
        // (placed where its node is).
        let mut modest = report(ReportKind::Node, "n1");
        modest.region = Some("eu-west".into());
        modest.coordinates = Some(PARIS);
        assert_eq!(check(&agent(Some("n1")), modest.clone()).unwrap(), modest);
    }

    #[test]
    fn an_external_backend_must_be_registered_and_goes_where_the_admin_said() {
        let believed = check(&agent(None), report(ReportKind::External, "ext")).unwrap();
        assert_eq!(believed.address.as_deref(), Some("203.0.113.7:8443"));
        let unregistered = check(&agent(None), report(ReportKind::External, "rogue")).unwrap_err();
        assert_eq!(unregistered.reason(), "unregistered");
        // A node's name is a node's, registered or not.
        let clash = check(&agent(None), report(ReportKind::External, "n1")).unwrap_err();
        assert!(matches!(clash, Refusal::NodeName(_)), "{clash:?}");
        let fleet = Fleet::new(FleetSettings::default());
        let mut reported = report(ReportKind::Node, "n2");
        reported.address = None;
        fleet.with_router(|r| r.ingest(reported, Instant::now()));
        let mut registry = cluster();
        registry.externals.insert("n2".into(), None);
        let clash = admit(&fleet, &agent(None), report(ReportKind::External, "n2"), &registry, false).unwrap_err();
        assert!(matches!(clash, Refusal::NodeName(_)), "{clash:?}");
    }

    #[test]
    fn local_addresses_are_refused_unless_allowed() {
        for address in [
            "127.0.0.1:9101",
            "[::1]:9101",
            "169.254.169.254",
            "localhost:80",
            "0.0.0.0",
            "[fe80::1]:1",
            "[::ffff:127.0.0.1]:9",
        ] {
            let mut local = report(ReportKind::Node, "n1");
            local.address = Some(address.into());
            let refused = check(&agent(Some("n1")), local.clone()).unwrap_err();
            assert_eq!(refused.reason(), "local_address", "{address}");
            let fleet = Fleet::new(FleetSettings::default());
            assert!(admit(&fleet, &agent(Some("n1")), local, &cluster(), true).is_ok(), "{address} allowed");
        }
        for address in ["10.0.0.5:9101", "node.example:9101", "[2001:db8::1]:443"] {
            let mut fine = report(ReportKind::Node, "n1");
            fine.address = Some(address.into());
            assert!(check(&agent(Some("n1")), fine).is_ok(), "{address}");
        }
        // The admin's address is judged too.
        let mut registry = cluster();
        registry.externals.insert("ext".into(), Some("127.0.0.1:8443".into()));
        let fleet = Fleet::new(FleetSettings::default());
        let refused = admit(&fleet, &agent(None), report(ReportKind::External, "ext"), &registry, false).unwrap_err();
        assert_eq!(refused.reason(), "local_address");
    }
}
