//! Which namespaces the operator works in, and its caches of namespaced
//! objects: one watch per namespace (so Roles in those namespaces are all
//! it needs), read as one cache.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;

use futures::StreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::names;
use crate::supervisor::Supervisor;

/// The namespaces the operator watches and writes in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace (needs cluster-wide rights; an explicit choice).
    Cluster,
    /// Only these, each a valid namespace name.
    Namespaces(Vec<String>),
}

impl Scope {
    /// From `--namespaces`: empty is the whole cluster.
    pub fn from_list(namespaces: &[String]) -> Result<Self, String> {
        if namespaces.is_empty() {
            return Ok(Self::Cluster);
        }
        let mut list = Vec::new();
        for namespace in namespaces {
            names::namespace(namespace).map_err(|e| format!("--namespaces: {e}"))?;
            if !list.contains(namespace) {
                list.push(namespace.clone());
            }
        }
        Ok(Self::Namespaces(list))
    }

    /// Whether the operator works in `namespace`.
    pub fn contains(&self, namespace: &str) -> bool {
        match self {
            Self::Cluster => true,
            Self::Namespaces(list) => list.iter().any(|n| n == namespace),
        }
    }

    /// One API per namespace watched (one for the whole cluster), with the
    /// namespace it covers.
    pub fn apis<K>(&self, client: &Client) -> Vec<(Option<String>, Api<K>)>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match self {
            Self::Cluster => vec![(None, Api::all(client.clone()))],
            Self::Namespaces(list) => {
                list.iter().map(|ns| (Some(ns.clone()), Api::namespaced(client.clone(), ns))).collect()
            }
        }
    }
}

/// The objects of one kind in the operator's namespaces, from one cache per
/// namespace.
pub struct Caches<K: Resource<DynamicType = ()> + Clone + 'static> {
    stores: Vec<(Option<String>, Store<K>)>,
}

impl<K: Resource<DynamicType = ()> + Clone + 'static> Clone for Caches<K> {
    fn clone(&self) -> Self {
        Self { stores: self.stores.clone() }
    }
}

impl<K> Caches<K>
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    pub fn new(stores: Vec<(Option<String>, Store<K>)>) -> Self {
        Self { stores }
    }

    fn store_for(&self, namespace: Option<&str>) -> Option<&Store<K>> {
        self.stores.iter().find(|(ns, _)| ns.is_none() || ns.as_deref() == namespace).map(|(_, store)| store)
    }

    pub fn get(&self, key: &ObjectRef<K>) -> Option<Arc<K>> {
        self.store_for(key.namespace.as_deref())?.get(key)
    }

    /// Every object, all namespaces together.
    pub fn state(&self) -> Vec<Arc<K>> {
        self.stores.iter().flat_map(|(_, store)| store.state()).collect()
    }

    /// The first object that `predicate` takes, without copying the caches.
    pub fn find(&self, predicate: impl Fn(&K) -> bool) -> Option<Arc<K>> {
        self.stores.iter().find_map(|(_, store)| store.find(|k| predicate(k)))
    }

    /// Waits until every namespace's cache has listed once; false if one never will.
    pub async fn ready(&self) -> bool {
        for (_, store) in &self.stores {
            if store.wait_until_ready().await.is_err() {
                return false;
            }
        }
        true
    }
}

/// Starts one supervised cache per namespace of `scope` (`<name>` or
/// `<name>/<namespace>` in the supervisor), each watch's events passed
/// through `tap` first (with the namespace the watch covers).
pub fn watch<K>(
    supervisor: &mut Supervisor,
    scope: &Scope,
    client: &Client,
    name: &str,
    config: watcher::Config,
    tap: impl Fn(Option<&str>, &watcher::Event<K>) + Clone + Send + Sync + 'static,
) -> Caches<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
{
    let mut stores = Vec::new();
    for (namespace, api) in scope.apis::<K>(client) {
        let (store, writer) = reflector::store();
        let tap = tap.clone();
        let covered = namespace.clone();
        let events = watcher(api, config.clone()).default_backoff().map(move |event| {
            if let Ok(event) = &event {
                tap(covered.as_deref(), event);
            }
            event
        });
        let task = match &namespace {
            Some(ns) => format!("{name}/{ns}"),
            None => name.to_string(),
        };
        supervisor.spawn(task, reflector::reflector(writer, events).for_each(|_| async {}));
        stores.push((namespace, store));
    }
    Caches::new(stores)
}

/// A cache of a cluster-scoped kind.
pub fn watch_cluster<K>(supervisor: &mut Supervisor, client: &Client, name: &str) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    let (store, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(Api::all(client.clone()), Default::default())).default_backoff();
    supervisor.spawn(name, stream.for_each(|_| async {}));
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_namespaces_is_the_cluster_and_bad_names_are_refused() {
        assert_eq!(Scope::from_list(&[]), Ok(Scope::Cluster));
        let listed = Scope::from_list(&["a".into(), "b".into(), "a".into()]).unwrap();
        assert_eq!(listed, Scope::Namespaces(vec!["a".into(), "b".into()]));
        assert!(listed.contains("b") && !listed.contains("c"));
        assert!(Scope::Cluster.contains("anything"));
        assert!(Scope::from_list(&["Bad_Name".into()]).is_err());
        assert!(Scope::from_list(&["kube-system/secrets".into()]).is_err());
    }
}
