//! Sightings of clients, and the bytes proxied: the gateway writes on each session it serves when
//! its client last had a stream open (`tidepool.dev/client-seen`), so the
//! operator can release the session of a client that went away, on the
//! pool's `releaseWhenClientGoneSeconds`. Every replica writes for the
//! streams it holds; the newest write wins, and a client is gone only when
//! no replica has seen it for the grace.
//!
//! Writes are spaced by a third of the grace (at least [`MIN_SPACING`]), so
//! a long session costs the API server a few writes, not one per stream; a
//! session's last stream closing is written at the next tick.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{Api, Patch, PatchParams};
use tidepool_crds::TestSession;
use tidepool_protocol::api::CLIENT_SEEN_ANNOTATION;

use crate::proxy::SessionRef;
use crate::state::Gateway;

/// How often the open streams are looked at.
pub const TICK: Duration = Duration::from_secs(2);
/// The least time between two sightings written for one session.
pub const MIN_SPACING: Duration = Duration::from_secs(5);
/// The least time between two writes of a session's bytes while its
/// streams are open: a thousand streaming sessions cost the API server
/// under 70 writes a second, and a replica is at most this far behind.
pub const BYTES_SPACING: Duration = Duration::from_secs(15);
pub const FIELD_MANAGER: &str = "tidepool-gateway";

/// Whether a sighting of a session with an open stream is due: none was
/// written yet, or the last is older than a third of the grace (and at
/// least [`MIN_SPACING`]).
pub fn due(last_written: Option<Instant>, grace: Duration, now: Instant) -> bool {
    let spacing = (grace / 3).max(MIN_SPACING);
    last_written.is_none_or(|last| now.duration_since(last) >= spacing)
}

/// The pool's grace for `session`, when its pool sets one.
fn grace(gateway: &Gateway, session: &SessionRef) -> Option<Duration> {
    let pool = gateway.caches.session(&session.namespace, &session.name)?.spec.pool.clone();
    let seconds = gateway.caches.pool(&session.namespace, &pool)?.spec.release_when_client_gone_seconds?;
    Some(Duration::from_secs(u64::try_from(seconds).ok()?))
}

/// Writes a sighting of `namespace/name`'s client now.
pub async fn write(client: &kube::Client, namespace: &str, name: &str) -> Result<(), kube::Error> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let patch = serde_json::json!({ "metadata": { "annotations": { CLIENT_SEEN_ANNOTATION: now } } });
    let api: Api<TestSession> = Api::namespaced(client.clone(), namespace);
    api.patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(&patch)).await.map(|_| ())
}

/// Writes `bytes` as this replica's figure (`key`) on `namespace/name`.
pub async fn write_bytes(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    key: &str,
    bytes: u64,
) -> Result<(), kube::Error> {
    let patch = serde_json::json!({ "metadata": { "annotations": { key: bytes.to_string() } } });
    let api: Api<TestSession> = Api::namespaced(client.clone(), namespace);
    api.patch(name, &PatchParams::apply(FIELD_MANAGER), &Patch::Merge(&patch)).await.map(|_| ())
}

/// Writes sightings, and the bytes proxied, for as long as the gateway runs.
pub async fn keep_writing(gateway: Arc<Gateway>) {
    let mut written: HashMap<String, Instant> = HashMap::new();
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let (open, closed) = gateway.streams.sightings();
        let now = Instant::now();
        let mut writes = Vec::new();
        for session in &open {
            if let Some(grace) = grace(&gateway, session)
                && due(written.get(&session.sid).copied(), grace, now)
            {
                writes.push(session.clone());
            }
        }
        // A last stream closed: that moment is the client's last sighting.
        writes.extend(closed.into_iter().filter(|s| grace(&gateway, s).is_some()));
        written.retain(|sid, _| open.iter().any(|s| &s.sid == sid));
        for session in writes {
            match write(&gateway.kube, &session.namespace, &session.name).await {
                Ok(()) => {
                    written.insert(session.sid.clone(), now);
                }
                // A session deleted meanwhile, or the API server away: the
                // next tick tries again while its streams are open.
                Err(e) => tracing::debug!(error = %e, session = %session.name, "cannot write a sighting"),
            }
        }
        for (session, bytes) in gateway.streams.bytes_due(now, BYTES_SPACING) {
            let key = &gateway.settings.bytes_key;
            match write_bytes(&gateway.kube, &session.namespace, &session.name, key, bytes).await {
                Ok(()) => gateway.streams.bytes_written(&session.sid, bytes, now),
                // Tried again at the next tick; a session deleted meanwhile is
                // forgotten once its streams close.
                Err(e) => tracing::debug!(error = %e, session = %session.name, "cannot write the bytes proxied"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sighting_is_due_first_then_every_third_of_the_grace() {
        let start = Instant::now();
        let grace = Duration::from_secs(60);
        assert!(due(None, grace, start));
        assert!(!due(Some(start), grace, start + Duration::from_secs(19)));
        assert!(due(Some(start), grace, start + Duration::from_secs(20)));
    }

    #[test]
    fn short_graces_are_written_no_more_often_than_the_minimum_spacing() {
        let start = Instant::now();
        let grace = Duration::from_secs(10);
        assert!(!due(Some(start), grace, start + Duration::from_secs(4)));
        assert!(due(Some(start), grace, start + MIN_SPACING));
    }
}
