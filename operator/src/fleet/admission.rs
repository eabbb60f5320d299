//! Who may speak for which backend: pure checks of an authenticated agent
//! against the report it sends. The report route (`http::agents`) asks.

use tidepool_wire::report::{AgentReport, ReportKind};

use super::Fleet;
use super::auth::Caller;

/// Why an agent may not send a report.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The token is not the agents' ServiceAccount's.
    Stranger(String),
    /// The token may not speak for this backend.
    WrongNode(String),
    /// The external backend's name is taken by a node.
    NodeName(String),
}

impl Refusal {
    /// The bounded label of the refusal metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Stranger(_) => "forbidden",
            Self::WrongNode(_) | Self::NodeName(_) => "wrong_node",
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Stranger(m) | Self::WrongNode(m) | Self::NodeName(m) => m,
        }
    }
}

/// Whether `caller` may speak for the report's backend.
pub fn admit(fleet: &Fleet, caller: &Caller, report: &AgentReport) -> Result<(), Refusal> {
    let expected =
        format!("system:serviceaccount:{}:{}", fleet.settings.agent_namespace, fleet.settings.agent_service_account);
    if caller.username != expected {
        return Err(Refusal::Stranger(format!("{} is not the agents' ServiceAccount {expected}", caller.username)));
    }
    match (report.kind, caller.node.as_deref()) {
        (ReportKind::Node, Some(node)) if node == report.backend => Ok(()),
        (ReportKind::Node, Some(node)) => Err(Refusal::WrongNode(format!(
            "the token is bound to a pod on node {node}, not on node {}",
            report.backend
        ))),
        (ReportKind::Node, None) => {
            Err(Refusal::WrongNode("a node report needs a token bound to the agent's pod on that node".into()))
        }
        (ReportKind::External, Some(node)) => {
            Err(Refusal::WrongNode(format!("the agent on node {node} may not report an external backend")))
        }
        (ReportKind::External, None) if caller.pod_bound => {
            Err(Refusal::WrongNode("a token bound to a pod may not report an external backend".into()))
        }
        (ReportKind::External, None) => {
            let clash = fleet.with_router(|r| r.view(&report.backend).is_some_and(|v| v.kind == ReportKind::Node));
            if clash {
                return Err(Refusal::NodeName(format!(
                    "{} is a node backend; pick another name for the external one",
                    report.backend
                )));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::FleetSettings;
    use std::time::Instant;
    use tidepool_wire::report::{Capacity, Window};

    fn report(kind: ReportKind, backend: &str) -> AgentReport {
        AgentReport::new(
            backend,
            kind,
            Capacity { cores: 1, memory_bytes: 1, disk_bytes: 0, gpus: vec![] },
            vec![Window { seconds: 10, cores: vec![0.0], ..Window::default() }],
        )
    }

    fn agent(node: Option<&str>) -> Caller {
        Caller {
            username: "system:serviceaccount:default:tidepool-agent".into(),
            node: node.map(Into::into),
            pod_bound: node.is_some(),
        }
    }

    #[test]
    fn an_agent_speaks_only_for_its_own_node() {
        let fleet = Fleet::new(FleetSettings::default());
        assert_eq!(admit(&fleet, &agent(Some("n1")), &report(ReportKind::Node, "n1")), Ok(()));
        let wrong = admit(&fleet, &agent(Some("n1")), &report(ReportKind::Node, "n2")).unwrap_err();
        assert!(matches!(wrong, Refusal::WrongNode(_)), "{wrong:?}");
        assert!(admit(&fleet, &agent(None), &report(ReportKind::Node, "n1")).is_err());
        assert!(admit(&fleet, &agent(Some("n1")), &report(ReportKind::External, "ext")).is_err());
        let pod_without_node = Caller { pod_bound: true, ..agent(None) };
        assert!(admit(&fleet, &pod_without_node, &report(ReportKind::External, "ext")).is_err());
        let stranger =
            Caller { username: "system:serviceaccount:default:other".into(), node: Some("n1".into()), pod_bound: true };
        assert_eq!(admit(&fleet, &stranger, &report(ReportKind::Node, "n1")).unwrap_err().reason(), "forbidden");
    }

    #[test]
    fn an_external_backend_cannot_take_a_node_name() {
        let fleet = Fleet::new(FleetSettings::default());
        assert_eq!(admit(&fleet, &agent(None), &report(ReportKind::External, "ext")), Ok(()));
        fleet.with_router(|r| r.ingest(report(ReportKind::Node, "n1"), Instant::now()));
        let clash = admit(&fleet, &agent(None), &report(ReportKind::External, "n1")).unwrap_err();
        assert!(matches!(clash, Refusal::NodeName(_)), "{clash:?}");
    }
}
