//! Scenario tests of the operator's API writes, as kube-rs's controller-rs
//! does them: the controllers talk to a mocked API server (tower-test), and
//! the test answers each request in the order it expects, checking its
//! method, path and body. A request the scenario does not expect, or one it
//! waits for in vain, fails the test.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::Event;
use tidepool_crds::{TestSession, WarmPool};
use tower_test::mock::{self, Handle, SendResponse};

use crate::clock::SystemClock;
use crate::context::{Context, Settings};
use crate::fleet::{Fleet, FleetSettings};
use crate::keys::Keys;
use crate::memory::Memory;
use crate::metrics::Metrics;
use crate::placement::Spread;
use crate::pod_index::PodIndex;
use crate::scope;

/// The mocked API server's side of a scenario.
pub struct ApiServer(Handle<Request<Body>, Response<Body>>);

/// One request the scenario received, to be answered.
pub struct Call {
    pub method: Method,
    pub path: String,
    pub body: serde_json::Value,
    send: SendResponse<Response<Body>>,
}

impl ApiServer {
    /// Waits (at most a second) for the next request, which must be `method`
    /// on `path` (its query left out).
    pub async fn expect(&mut self, method: Method, path: &str) -> Call {
        let next = tokio::time::timeout(Duration::from_secs(1), self.0.next_request()).await;
        let (request, send) = next
            .unwrap_or_else(|_| panic!("no {method} {path} within a second"))
            .unwrap_or_else(|| panic!("the client went away before {method} {path}"));
        let (parts, body) = request.into_parts();
        let bytes = body.collect_bytes().await.unwrap_or_default();
        let call = Call {
            method: parts.method,
            path: parts.uri.path().to_string(),
            body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
            send,
        };
        assert_eq!((&call.method, call.path.as_str()), (&method, path), "an unexpected request");
        call
    }

    /// Fails if any request arrives within `wait`.
    pub async fn expect_nothing(&mut self, wait: Duration) {
        if let Ok(Some((request, _))) = tokio::time::timeout(wait, self.0.next_request()).await {
            panic!("an unexpected request: {} {}", request.method(), request.uri());
        }
    }
}

impl Call {
    /// Answers with `status` and a JSON body.
    pub fn answer(self, status: StatusCode, body: &impl serde::Serialize) {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        let mut response = Response::new(Body::from(bytes));
        *response.status_mut() = status;
        self.send.send_response(response);
    }

    /// Answers with a Kubernetes `Status` failure.
    pub fn refuse(self, code: u16, reason: &str) {
        let status = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "status": "Failure",
            "message": format!("{reason} (from the scenario)"), "reason": reason, "code": code,
        });
        self.answer(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), &status);
    }
}

/// Writers for the caches of a test [`Context`].
pub struct Caches {
    pub pods: reflector::store::Writer<Pod>,
    pub pools: reflector::store::Writer<WarmPool>,
    pub index: Arc<Mutex<PodIndex>>,
}

impl Caches {
    /// Puts a pod in the pod cache and index, as the pod watch would.
    pub fn pod(&mut self, pod: Pod) {
        let event = Event::Apply(pod);
        self.index.lock().unwrap_or_else(std::sync::PoisonError::into_inner).apply(None, &event);
        self.pods.apply_watcher_event(&event);
    }

    pub fn pool(&mut self, pool: WarmPool) {
        self.pools.apply_watcher_event(&Event::Apply(pool));
    }
}

/// A context whose client is the mocked API server, with empty caches.
pub fn context() -> (Arc<Context>, ApiServer, Caches) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (pods, pods_writer): (Store<Pod>, _) = reflector::store();
    let (sessions, _): (Store<TestSession>, _) = reflector::store();
    let (pools, pools_writer): (Store<WarmPool>, _) = reflector::store();
    let (nodes, _): (Store<Node>, _) = reflector::store();
    let index = Arc::new(Mutex::new(PodIndex::default()));
    let reporter = Reporter { controller: "tidepool-test".into(), instance: None };
    let ctx = Context {
        client: client.clone(),
        settings: Settings {
            create_batch: 10,
            result_retention: Duration::from_secs(60),
            session_port: 8080,
            results_url: None,
            cluster_cidrs: Vec::new(),
            fault_claim_delay: None,
        },
        metrics: Arc::new(Metrics::new().unwrap_or_else(|e| panic!("metrics: {e}"))),
        recorder: Recorder::new(client, reporter),
        keys: Arc::new(Keys::default()),
        pods: scope::Caches::new(vec![(None, pods)]),
        sessions: scope::Caches::new(vec![(None, sessions)]),
        pools: scope::Caches::new(vec![(None, pools)]),
        nodes,
        placement: Box::new(Spread),
        fleet: Arc::new(Fleet::new(FleetSettings::default())),
        memory: Memory::new(Arc::new(SystemClock)),
        pod_index: index.clone(),
        monitor_http: reqwest::Client::new(),
        exporter: None,
    };
    let caches = Caches { pods: pods_writer, pools: pools_writer, index };
    (Arc::new(ctx), ApiServer(handle), caches)
}
