//! Which pods are claimed for which session, kept up to date from the pod
//! watch. A session pass looks its pods up here instead of scanning every
//! cached pod for its UID: under load that scan was a third of the
//! operator's CPU.

use std::collections::{BTreeSet, HashMap, HashSet};

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::runtime::watcher::Event;

use crate::labels;

/// A pod's namespace and name.
pub type PodKey = (String, String);

/// Session UID to the pods claimed for it, and back.
#[derive(Debug, Default)]
pub struct ClaimIndex {
    by_session: HashMap<String, BTreeSet<PodKey>>,
    by_pod: HashMap<PodKey, String>,
    /// The pods seen since a relist began; the rest are gone at its end.
    relisted: Option<HashSet<PodKey>>,
}

impl ClaimIndex {
    /// Folds one event of the pod watch in.
    pub fn apply(&mut self, event: &Event<Pod>) {
        match event {
            Event::Apply(pod) => self.upsert(pod),
            Event::Delete(pod) => self.remove(&key(pod)),
            Event::Init => self.relisted = Some(HashSet::new()),
            Event::InitApply(pod) => {
                if let Some(seen) = &mut self.relisted {
                    seen.insert(key(pod));
                }
                self.upsert(pod);
            }
            Event::InitDone => {
                if let Some(seen) = self.relisted.take() {
                    let gone: Vec<PodKey> = self.by_pod.keys().filter(|k| !seen.contains(*k)).cloned().collect();
                    gone.iter().for_each(|k| self.remove(k));
                }
            }
        }
    }

    /// The pods claimed for session `uid`.
    pub fn pods_of(&self, uid: &str) -> Vec<PodKey> {
        self.by_session.get(uid).map(|pods| pods.iter().cloned().collect()).unwrap_or_default()
    }

    fn upsert(&mut self, pod: &Pod) {
        let key = key(pod);
        let claim = pod.annotations().get(labels::SESSION_UID).filter(|_| pod.metadata.deletion_timestamp.is_none());
        match claim {
            Some(uid) if self.by_pod.get(&key) == Some(uid) => {}
            Some(uid) => {
                self.remove(&key);
                self.by_session.entry(uid.clone()).or_default().insert(key.clone());
                self.by_pod.insert(key, uid.clone());
            }
            None => self.remove(&key),
        }
    }

    fn remove(&mut self, key: &PodKey) {
        let Some(uid) = self.by_pod.remove(key) else { return };
        if let Some(pods) = self.by_session.get_mut(&uid) {
            pods.remove(key);
            if pods.is_empty() {
                self.by_session.remove(&uid);
            }
        }
    }
}

fn key(pod: &Pod) -> PodKey {
    (pod.namespace().unwrap_or_default(), pod.name_any())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use std::collections::BTreeMap;

    fn pod(name: &str, claim: Option<&str>) -> Pod {
        let mut pod = Pod::default();
        pod.metadata.name = Some(name.into());
        pod.metadata.namespace = Some("ns".into());
        if let Some(uid) = claim {
            pod.metadata.annotations = Some(BTreeMap::from([(labels::SESSION_UID.to_string(), uid.to_string())]));
        }
        pod
    }

    fn keys(names: &[&str]) -> Vec<PodKey> {
        names.iter().map(|n| ("ns".to_string(), n.to_string())).collect()
    }

    #[test]
    fn claims_follow_the_pods() {
        let mut index = ClaimIndex::default();
        index.apply(&Event::Apply(pod("a", None)));
        assert!(index.pods_of("s1").is_empty());
        index.apply(&Event::Apply(pod("a", Some("s1"))));
        index.apply(&Event::Apply(pod("b", Some("s1"))));
        assert_eq!(index.pods_of("s1"), keys(&["a", "b"]));
        // Moved to another session (never in practice, but kept exact).
        index.apply(&Event::Apply(pod("b", Some("s2"))));
        assert_eq!(index.pods_of("s1"), keys(&["a"]));
        assert_eq!(index.pods_of("s2"), keys(&["b"]));
        // A pod being deleted no longer counts; a deleted one is gone.
        let mut going = pod("a", Some("s1"));
        going.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        index.apply(&Event::Apply(going));
        assert!(index.pods_of("s1").is_empty());
        index.apply(&Event::Delete(pod("b", Some("s2"))));
        assert!(index.pods_of("s2").is_empty());
        assert!(index.by_pod.is_empty() && index.by_session.is_empty());
    }

    #[test]
    fn a_relist_drops_pods_that_went_meanwhile() {
        let mut index = ClaimIndex::default();
        index.apply(&Event::Apply(pod("a", Some("s1"))));
        index.apply(&Event::Apply(pod("b", Some("s1"))));
        index.apply(&Event::Init);
        index.apply(&Event::InitApply(pod("b", Some("s1"))));
        index.apply(&Event::InitApply(pod("c", Some("s3"))));
        // Until the relist ends, what was known stays.
        assert_eq!(index.pods_of("s1"), keys(&["a", "b"]));
        index.apply(&Event::InitDone);
        assert_eq!(index.pods_of("s1"), keys(&["b"]));
        assert_eq!(index.pods_of("s3"), keys(&["c"]));
    }
}
