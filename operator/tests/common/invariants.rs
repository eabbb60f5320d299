//! The binding invariants, checked against the API server itself (no cache).

use std::collections::{HashMap, HashSet};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::{Resource, ResourceExt};
use tidepool_crds::TestSession;
use tidepool_crds::test_session::Phase;

/// What the check found wrong; empty when all holds.
pub async fn violations(client: &kube::Client, namespace: &str, settled: bool) -> Vec<String> {
    let sessions: Api<TestSession> = Api::namespaced(client.clone(), namespace);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let sessions = sessions.list(&ListParams::default()).await.unwrap().items;
    let pods = pods.list(&ListParams::default().labels("tidepool.dev/pool")).await.unwrap().items;
    let mut problems = Vec::new();

    let live_sessions: HashMap<String, &TestSession> = sessions.iter().filter_map(|s| Some((s.uid()?, s))).collect();
    let pods_by_name: HashMap<String, &Pod> = pods.iter().map(|p| (p.name_any(), p)).collect();

    // No pod is bound to two sessions, by the sessions' own records.
    let mut seen: HashMap<&str, &str> = HashMap::new();
    for session in &sessions {
        let Some(status) = &session.status else { continue };
        if matches!(status.phase, Phase::Expired | Phase::Completed | Phase::Failed) {
            continue;
        }
        if let Some(pod) = status.pod.as_deref()
            && let Some(other) = seen.insert(pod, session.meta().name.as_deref().unwrap_or(""))
        {
            problems.push(format!("pod {pod} is bound to sessions {other} and {}", session.name_any()));
        }
    }
    // Every claimed pod names one session; a Ready session's pod is claimed by it.
    let mut claimed_by: HashMap<&str, Vec<&str>> = HashMap::new();
    for pod in &pods {
        if let Some(uid) = pod.annotations().get("tidepool.dev/session-uid") {
            claimed_by.entry(uid.as_str()).or_default().push(pod.meta().name.as_deref().unwrap_or(""));
        }
    }
    for session in &sessions {
        let Some(status) = &session.status else { continue };
        if status.phase != Phase::Ready {
            continue;
        }
        let uid = session.uid().unwrap_or_default();
        let pod = status.pod.clone().unwrap_or_default();
        match pods_by_name.get(&pod) {
            None if settled => problems.push(format!("session {} is Ready on missing pod {pod}", session.name_any())),
            None => {}
            Some(p) if p.annotations().get("tidepool.dev/session-uid") != Some(&uid) => problems.push(format!(
                "session {} is Ready on pod {pod}, which is claimed by {:?}",
                session.name_any(),
                p.annotations().get("tidepool.dev/session-uid")
            )),
            Some(_) => {}
        }
        let live_claims: Vec<&&str> = claimed_by
            .get(uid.as_str())
            .map(|v| {
                v.iter()
                    .filter(|n| pods_by_name.get(**n).is_some_and(|p| p.metadata.deletion_timestamp.is_none()))
                    .collect()
            })
            .unwrap_or_default();
        if settled && live_claims.len() > 1 {
            problems.push(format!(
                "session {} has {} live pods claimed: {live_claims:?}",
                session.name_any(),
                live_claims.len()
            ));
        }
    }
    // Once settled, no claimed pod outlives its session.
    if settled {
        let live_uids: HashSet<&String> = live_sessions.keys().collect();
        for pod in &pods {
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            if let Some(uid) = pod.annotations().get("tidepool.dev/session-uid")
                && !live_uids.contains(uid)
            {
                problems.push(format!("pod {} is claimed by session {uid}, which is gone", pod.name_any()));
            }
        }
    }
    problems
}
