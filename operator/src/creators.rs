//! How many live sessions each caller holds, for `--sessions-per-caller`.
//!
//! Fed by the session watch, so a create looks one number up instead of
//! scanning every cached session. The watch lags this replica's own
//! creates, and callers can send many creates at once, so a create first
//! reserves a place (under the lock, before its API call), and a session
//! this replica made counts as pending until the watch shows it. The cap is
//! exact on one replica; with several, each counts the others' sessions once
//! its watch shows them.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kube::runtime::watcher::Event;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};
use tidepool_crds::TestSession;

/// On a TestSession made through the API: who asked for it (a label, so
/// sessions can be counted per caller; a digest, since a user name is not a
/// label value).
pub const CREATOR_LABEL: &str = "tidepool.dev/creator";
/// On a TestSession made through the API: who asked for it, as named.
pub const CREATED_BY_ANNOTATION: &str = "tidepool.dev/created-by";

/// A session this replica made is counted for this long at most before the
/// watch shows it (a watch that lags longer has lost the event to a relist,
/// which shows it anyway).
const PENDING_FOR: Duration = Duration::from_secs(60);

/// A session's namespace and name.
type SessionKey = (String, String);

/// The label value for a caller: 16 hex digits of the SHA-256 of its name.
pub fn creator_label(caller: &str) -> String {
    Sha256::digest(caller.as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Live sessions by creator, as the watch and this replica's creates say.
#[derive(Debug, Default)]
pub struct CreatorIndex {
    /// Each live session with a creator, and who.
    live: HashMap<SessionKey, String>,
    /// Live sessions per creator.
    counts: HashMap<String, usize>,
    /// Sessions this replica made that the watch has not shown yet.
    pending: HashMap<SessionKey, (String, Instant)>,
    /// Creates in flight per creator.
    reserved: HashMap<String, usize>,
    /// For each watch (by the namespace it covers), the sessions seen since
    /// its relist began; the rest of its sessions are gone at its end.
    relisted: HashMap<Option<String>, HashSet<SessionKey>>,
}

impl CreatorIndex {
    /// Folds one event of a session watch in.
    pub fn apply(&mut self, watch: Option<&str>, event: &Event<TestSession>) {
        match event {
            Event::Apply(session) => self.upsert(session),
            Event::Delete(session) => {
                let key = key(session);
                self.pending.remove(&key);
                self.remove(&key);
            }
            Event::Init => {
                self.relisted.insert(watch.map(String::from), HashSet::new());
            }
            Event::InitApply(session) => {
                if let Some(seen) = self.relisted.get_mut(&watch.map(String::from)) {
                    seen.insert(key(session));
                }
                self.upsert(session);
            }
            Event::InitDone => {
                if let Some(seen) = self.relisted.remove(&watch.map(String::from)) {
                    let covered = |k: &SessionKey| watch.is_none_or(|ns| k.0 == ns);
                    let gone: Vec<SessionKey> =
                        self.live.keys().filter(|k| covered(k) && !seen.contains(*k)).cloned().collect();
                    gone.iter().for_each(|k| self.remove(k));
                }
            }
        }
    }

    /// The live sessions `creator` holds, its creates in flight included.
    pub fn held(&self, creator: &str, now: Instant) -> usize {
        let pending =
            self.pending.values().filter(|(who, at)| who == creator && now.duration_since(*at) < PENDING_FOR).count();
        self.counts.get(creator).copied().unwrap_or(0) + pending + self.reserved.get(creator).copied().unwrap_or(0)
    }

    /// Takes a place for one more session of `creator`, or says how many it
    /// holds when that is `limit` already.
    pub fn reserve(&mut self, creator: &str, limit: usize, now: Instant) -> Result<(), usize> {
        self.pending.retain(|_, (_, at)| now.duration_since(*at) < PENDING_FOR);
        let held = self.held(creator, now);
        if held >= limit {
            return Err(held);
        }
        *self.reserved.entry(creator.to_owned()).or_default() += 1;
        Ok(())
    }

    /// The reserved create made session `key`: it counts as pending until
    /// the watch shows it.
    pub fn created(&mut self, creator: &str, key: SessionKey, now: Instant) {
        self.release(creator);
        if !self.live.contains_key(&key) {
            self.pending.insert(key, (creator.to_owned(), now));
        }
    }

    /// The reserved create made nothing.
    pub fn release(&mut self, creator: &str) {
        if let Some(count) = self.reserved.get_mut(creator) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.reserved.remove(creator);
            }
        }
    }

    fn upsert(&mut self, session: &TestSession) {
        let key = key(session);
        self.pending.remove(&key);
        let creator = session.labels().get(CREATOR_LABEL);
        let ended = session.status.as_ref().is_some_and(|s| s.phase.has_ended());
        match creator {
            Some(creator) if session.meta().deletion_timestamp.is_none() && !ended => {
                if self.live.get(&key) != Some(creator) {
                    self.remove(&key);
                    self.live.insert(key, creator.clone());
                    *self.counts.entry(creator.clone()).or_default() += 1;
                }
            }
            _ => self.remove(&key),
        }
    }

    fn remove(&mut self, key: &SessionKey) {
        let Some(creator) = self.live.remove(key) else { return };
        if let Some(count) = self.counts.get_mut(&creator) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.counts.remove(&creator);
            }
        }
    }
}

fn key(session: &TestSession) -> SessionKey {
    (session.namespace().unwrap_or_default(), session.name_any())
}

/// The index, shared by the session watch and the API's handlers. No
/// caller holds the lock across an await.
#[derive(Clone, Debug, Default)]
pub struct Creators(Arc<Mutex<CreatorIndex>>);

impl Creators {
    /// The watch tap that keeps the index.
    pub fn apply(&self, watch: Option<&str>, event: &Event<TestSession>) {
        self.lock().apply(watch, event);
    }

    /// A place for one more session of `creator`, held until the returned
    /// reservation is used or dropped; or how many it holds already.
    pub fn reserve(&self, creator: &str, limit: usize) -> Result<Reservation, usize> {
        self.lock().reserve(creator, limit, Instant::now())?;
        Ok(Reservation { creators: self.clone(), creator: creator.to_owned(), used: false })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CreatorIndex> {
        // The index is counts only: one a panic left half-updated can only
        // be off by a session until the next relist.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One create's place under the caller's cap.
#[derive(Debug)]
pub struct Reservation {
    creators: Creators,
    creator: String,
    used: bool,
}

impl Reservation {
    /// The creator label the session gets.
    pub fn creator(&self) -> &str {
        &self.creator
    }

    /// The create made `namespace/name`.
    pub fn created(mut self, namespace: &str, name: &str) {
        self.used = true;
        self.creators.lock().created(&self.creator, (namespace.to_owned(), name.to_owned()), Instant::now());
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.used {
            self.creators.lock().release(&self.creator);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn session(name: &str, creator: Option<&str>, phase: &str, deleting: bool) -> TestSession {
        let mut metadata = json!({ "name": name, "namespace": "ns" });
        if let Some(creator) = creator {
            metadata["labels"] = json!({ CREATOR_LABEL: creator });
        }
        if deleting {
            metadata["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(json!({
            "apiVersion": "tidepool.dev/v1alpha1", "kind": "TestSession", "metadata": metadata,
            "spec": { "pool": "edge" }, "status": { "phase": phase }
        }))
        .unwrap()
    }

    fn key(name: &str) -> SessionKey {
        ("ns".into(), name.into())
    }

    #[test]
    fn a_creators_live_sessions_are_counted_and_ended_ones_are_not() {
        let now = Instant::now();
        let mut index = CreatorIndex::default();
        index.apply(None, &Event::Apply(session("a", Some("alice"), "Ready", false)));
        index.apply(None, &Event::Apply(session("b", Some("alice"), "Pending", false)));
        index.apply(None, &Event::Apply(session("c", Some("bob"), "Ready", false)));
        index.apply(None, &Event::Apply(session("k", None, "Ready", false)));
        assert_eq!((index.held("alice", now), index.held("bob", now)), (2, 1));
        // The same event again changes nothing.
        index.apply(None, &Event::Apply(session("a", Some("alice"), "Ready", false)));
        assert_eq!(index.held("alice", now), 2);
        index.apply(None, &Event::Apply(session("a", Some("alice"), "Completed", false)));
        index.apply(None, &Event::Apply(session("b", Some("alice"), "Ready", true)));
        assert_eq!(index.held("alice", now), 0);
        index.apply(None, &Event::Delete(session("c", Some("bob"), "Ready", false)));
        assert_eq!(index.held("bob", now), 0);
        assert!(index.counts.is_empty(), "no creator is kept at zero");
    }

    #[test]
    fn a_relabelled_session_moves_to_its_new_creator() {
        let now = Instant::now();
        let mut index = CreatorIndex::default();
        index.apply(None, &Event::Apply(session("a", Some("alice"), "Ready", false)));
        index.apply(None, &Event::Apply(session("a", Some("bob"), "Ready", false)));
        assert_eq!((index.held("alice", now), index.held("bob", now)), (0, 1));
        index.apply(None, &Event::Apply(session("a", None, "Ready", false)));
        assert_eq!(index.held("bob", now), 0);
    }

    #[test]
    fn a_relist_drops_only_its_own_namespaces_gone_sessions() {
        let now = Instant::now();
        let mut index = CreatorIndex::default();
        index.apply(Some("ns"), &Event::Apply(session("a", Some("alice"), "Ready", false)));
        index.apply(Some("ns"), &Event::Apply(session("b", Some("alice"), "Ready", false)));
        index.apply(Some("other"), &Event::Init);
        index.apply(Some("other"), &Event::InitDone);
        assert_eq!(index.held("alice", now), 2, "another namespace's relist keeps these");
        index.apply(Some("ns"), &Event::Init);
        index.apply(Some("ns"), &Event::InitApply(session("b", Some("alice"), "Ready", false)));
        index.apply(Some("ns"), &Event::InitDone);
        assert_eq!(index.held("alice", now), 1, "a, gone while the watch was down, is dropped");
    }

    #[test]
    fn creates_in_flight_count_until_the_watch_shows_them_or_they_fail() {
        let now = Instant::now();
        let mut index = CreatorIndex::default();
        index.apply(None, &Event::Apply(session("a", Some("alice"), "Ready", false)));
        assert_eq!(index.reserve("alice", 3, now), Ok(()));
        assert_eq!(index.reserve("alice", 3, now), Ok(()));
        assert_eq!(index.reserve("alice", 3, now), Err(3), "two in flight and one live fill a cap of 3");
        assert_eq!(index.reserve("bob", 3, now), Ok(()), "each caller has its own cap");
        // One create fails: its place is free again.
        index.release("alice");
        assert_eq!(index.held("alice", now), 2);
        // The other made b: pending until the watch shows it, counted once.
        index.created("alice", key("b"), now);
        assert_eq!(index.held("alice", now), 2);
        index.apply(None, &Event::Apply(session("b", Some("alice"), "Pending", false)));
        assert_eq!(index.held("alice", now), 2);
        assert!(index.pending.is_empty());
    }

    #[test]
    fn a_session_the_watch_showed_first_is_not_pending_and_a_stale_pending_one_expires() {
        let now = Instant::now();
        let mut index = CreatorIndex::default();
        index.reserve("alice", 5, now).unwrap();
        index.apply(None, &Event::Apply(session("a", Some("alice"), "Pending", false)));
        index.created("alice", key("a"), now);
        assert_eq!(index.held("alice", now), 1, "seen by the watch before the create returned: counted once");

        // A pending session whose events never come stops counting.
        index.reserve("alice", 5, now).unwrap();
        index.created("alice", key("b"), now);
        assert_eq!(index.held("alice", now), 2);
        let later = now + PENDING_FOR;
        assert_eq!(index.held("alice", later), 1);
        index.reserve("alice", 5, later).unwrap();
        assert!(!index.pending.contains_key(&key("b")), "reserving sweeps expired pending sessions");
        // Deleted before the watch showed it live: gone at once.
        index.created("alice", key("c"), later);
        index.apply(None, &Event::Delete(session("c", Some("alice"), "Pending", false)));
        assert_eq!(index.held("alice", later), 1);
    }

    #[test]
    fn a_dropped_reservation_gives_its_place_back_and_a_used_one_keeps_it() {
        let creators = Creators::default();
        let first = creators.reserve("alice", 2).unwrap();
        let second = creators.reserve("alice", 2).unwrap();
        assert_eq!(creators.reserve("alice", 2).unwrap_err(), 2);
        drop(first);
        second.created("ns", "a");
        let third = creators.reserve("alice", 2).unwrap();
        assert_eq!(creators.reserve("alice", 2).unwrap_err(), 2);
        drop(third);
        assert_eq!(creators.lock().held("alice", Instant::now()), 1);
    }

    #[test]
    fn a_creator_label_is_a_valid_label_value_and_tells_callers_apart() {
        let label = creator_label("system:serviceaccount:team-a:alice");
        assert_eq!(label.len(), 16);
        assert!(label.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(label, creator_label("system:serviceaccount:team-a:bob"));
        assert_eq!(label, creator_label("system:serviceaccount:team-a:alice"));
    }
}
