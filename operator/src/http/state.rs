//! What the HTTP handlers share.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use kube::Client;

use crate::fleet::Fleet;
use crate::keys::Keys;
use crate::metrics::Metrics;

pub struct ApiState {
    pub client: Client,
    pub keys: Arc<Keys>,
    pub metrics: Arc<Metrics>,
    /// The bearer token every session and route request must carry.
    pub token: String,
    /// Where sessions go when a request names no namespace.
    pub namespace: String,
    /// How long POST waits for a session to turn Ready before answering 504.
    pub ready_deadline: Duration,
    /// Set once the API server has answered.
    pub ready: AtomicBool,
    /// Agents' reports and the router.
    pub fleet: Arc<Fleet>,
}
