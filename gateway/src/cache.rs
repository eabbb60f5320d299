//! What the gateway reads without an API call: the served namespaces'
//! TestSessions, WarmPools and pool pods, each kept by a watch.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tidepool_crds::test_session::Phase;
use tidepool_crds::{TestSession, WarmPool};

use crate::anonymous::Seen;
use crate::client::canonical;
use crate::tasks::Tasks;

/// The label every pool pod carries.
const POOL_LABEL: &str = "tidepool.dev/pool";

/// One watch per kind and namespace.
#[derive(Clone)]
pub struct Caches {
    sessions: HashMap<String, Store<TestSession>>,
    pools: HashMap<String, Store<WarmPool>>,
    pods: HashMap<String, Store<Pod>>,
}

impl Caches {
    /// Starts the watches in `namespaces`, each a task of `tasks`.
    pub fn start(client: &Client, namespaces: &[String], tasks: &mut Tasks) -> Self {
        let mut caches = Self { sessions: HashMap::new(), pools: HashMap::new(), pods: HashMap::new() };
        for namespace in namespaces {
            let sessions = watch::<TestSession>(client, namespace, watcher::Config::default(), tasks);
            caches.sessions.insert(namespace.clone(), sessions);
            let pools = watch::<WarmPool>(client, namespace, watcher::Config::default(), tasks);
            caches.pools.insert(namespace.clone(), pools);
            let pods = watch::<Pod>(client, namespace, watcher::Config::default().labels(POOL_LABEL), tasks);
            caches.pods.insert(namespace.clone(), pods);
        }
        caches
    }

    /// Waits until every watch has listed once.
    pub async fn wait_until_ready(&self) {
        for store in self.sessions.values() {
            let _ = store.wait_until_ready().await;
        }
        for store in self.pools.values() {
            let _ = store.wait_until_ready().await;
        }
        for store in self.pods.values() {
            let _ = store.wait_until_ready().await;
        }
    }

    pub fn serves(&self, namespace: &str) -> bool {
        self.sessions.contains_key(namespace)
    }

    pub fn session(&self, namespace: &str, name: &str) -> Option<Arc<TestSession>> {
        self.sessions.get(namespace)?.get(&ObjectRef::new(name).within(namespace))
    }

    /// Every watched session, in every served namespace.
    pub fn all_sessions(&self) -> Vec<Arc<TestSession>> {
        self.sessions.values().flat_map(|store| store.state()).collect()
    }

    pub fn pool(&self, namespace: &str, name: &str) -> Option<Arc<WarmPool>> {
        self.pools.get(namespace)?.get(&ObjectRef::new(name).within(namespace))
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        self.pods.get(namespace)?.get(&ObjectRef::new(name).within(namespace))
    }

    /// The pods of `pool`, for its public keys when no session pod is at hand.
    pub fn pool_pods(&self, namespace: &str, pool: &str) -> Vec<Arc<Pod>> {
        let Some(store) = self.pods.get(namespace) else { return Vec::new() };
        store.state().into_iter().filter(|p| p.labels().get(POOL_LABEL).map(String::as_str) == Some(pool)).collect()
    }

    /// The pools their owners made public, in every served namespace, by
    /// namespace and name.
    pub fn public_pools(&self) -> Vec<Arc<WarmPool>> {
        let mut pools: Vec<Arc<WarmPool>> =
            self.pools.values().flat_map(|store| store.state()).filter(|p| p.spec.public).collect();
        pools.sort_by_key(|p| (p.namespace(), p.name_any()));
        pools
    }

    /// Every session made for client address `ip`, in any served namespace.
    /// A scan: the anonymous create path is rare next to the streams.
    pub fn sessions_for(&self, ip: IpAddr) -> (Vec<Seen>, Vec<String>) {
        let mut seen = Vec::new();
        let mut names = Vec::new();
        for store in self.sessions.values() {
            for session in store.state() {
                let address = session.spec.client.as_ref().and_then(|c| c.address.as_deref());
                if address.and_then(|a| a.parse::<IpAddr>().ok()).map(canonical) != Some(ip) {
                    continue;
                }
                seen.push(seen_of(&session));
                names.push(format!("{}/{}", session.namespace().unwrap_or_default(), session.name_any()));
            }
        }
        (seen, names)
    }
}

/// A session as the limits count it.
fn seen_of(session: &TestSession) -> Seen {
    let created = session.meta().creation_timestamp.as_ref().map_or(0, |t| unix_seconds(t.0));
    let status = session.status.as_ref();
    let ended = status.is_some_and(|s| matches!(s.phase, Phase::Completed | Phase::Expired | Phase::Failed));
    let ttl = u64::try_from(session.spec.ttl_seconds.unwrap_or(3600)).unwrap_or(3600);
    let expires = status.and_then(|s| s.expires_at.as_ref()).map_or(created + ttl, |t| unix_seconds(t.0));
    let bytes = crate::traffic::proxied_bytes(session.annotations());
    Seen { created, live_until: (!ended).then_some(expires), bytes }
}

fn unix_seconds(time: k8s_openapi::jiff::Timestamp) -> u64 {
    u64::try_from(time.as_second()).unwrap_or(0)
}

fn watch<K>(client: &Client, namespace: &str, config: watcher::Config, tasks: &mut Tasks) -> Store<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    let kind = K::kind(&K::DynamicType::default()).to_string();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    tasks.spawn(format!("watch {kind} in {namespace}"), stream.for_each(|_| async {}));
    store
}
