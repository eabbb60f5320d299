//! What the HTTP handlers share.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::runtime::reflector::Store;
use tidepool_crds::{Backend, TestSession, Tube, WarmPool};

use super::access::Access;
use crate::creators::Creators;
use crate::fleet::Fleet;
use crate::fleet::geo::GeoIp;
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::scope::{Caches, Scope};

/// The address a request's connection came from (a proxy's, behind one).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub std::net::SocketAddr);

pub struct ApiState {
    pub client: Client,
    pub keys: Arc<Keys>,
    pub metrics: Arc<Metrics>,
    /// Who may call, and what they may do.
    pub access: Access,
    /// Where sessions go when a request names no namespace.
    pub namespace: String,
    /// The namespaces the operator works in.
    pub scope: Scope,
    /// Every pool and session in those namespaces, as this replica's watch
    /// shows them: which pools exist and whose sessions are live, read
    /// without an API call.
    pub pools: Caches<WarmPool>,
    pub sessions: Caches<TestSession>,
    /// Every tube in those namespaces, for the cluster view.
    pub tubes: Caches<Tube>,
    /// Every Backend (admins register external ones) and Node (what each
    /// declares it can run), for agent reports.
    pub backends: Store<Backend>,
    pub nodes: Store<Node>,
    /// Live sessions one caller may hold at once, and how many each holds.
    pub sessions_per_caller: usize,
    /// Callers the cap does not apply to (front doors with limits of their own).
    pub uncapped_callers: std::collections::HashSet<String>,
    pub creators: Creators,
    /// How long POST waits for a session to turn Ready before answering 504.
    pub ready_deadline: Duration,
    /// Set once the API server has answered.
    pub ready: AtomicBool,
    /// Agents' reports and the router.
    pub fleet: Arc<Fleet>,
    /// Where clients are that do not say.
    pub geoip: Option<Arc<GeoIp>>,
    /// The results store, for reading stored results back.
    pub exporter: Option<Arc<crate::export::Exporter>>,
    /// Cluster views streaming now, against their cap.
    pub cluster_streams: Arc<tokio::sync::Semaphore>,
    /// Tube creations waiting for their answer now, against their cap.
    pub tube_creations: Arc<tokio::sync::Semaphore>,
}
