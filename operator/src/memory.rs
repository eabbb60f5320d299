//! What the leading replica remembers between passes, beside its caches:
//! pods it reserved for a binding, bindings it wrote that the caches may not
//! show yet, the statuses of sessions it ended (and stored) that the caches
//! may not show yet, each binding's progress, the pacing of pool passes, sweeps and
//! status writes, and pods it created that the cache has not shown.
//!
//! One structure behind one lock, with one rule for a poisoned lock: every
//! method leaves the maps consistent before anything can panic (each is a
//! few map operations), so a poisoned lock is taken over as it is. Time
//! comes from an injected [`Clock`]. Every map is bounded: at its bound,
//! entries past their use are dropped first, then the oldest. Nothing here
//! is needed for correctness (the API server's preconditions are); it saves
//! writes that would fail, and waits that would be needless.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tidepool_crds::test_session::TestSessionStatus;

use crate::clock::Clock;

/// How long a claimed pod stays reserved, and a created pod counts as in
/// flight: far longer than the caches lag.
pub const CACHE_LAG_LIMIT: Duration = Duration::from_secs(30);

/// The shortest time between two full passes over one pool. Under load every
/// pod and session event triggers the pool: unbounded, passes would run back
/// to back.
pub const POOL_PASS_INTERVAL: Duration = Duration::from_millis(100);

/// The shortest time between two looks over one pool's held pods for
/// sessions that are gone.
pub const ORPHAN_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// The most entries any one map holds.
pub const MAX_ENTRIES: usize = 10_000;

/// How long a session's way to Ready is followed; one not Ready by then is
/// not measured.
const PROGRESS_LIMIT: Duration = Duration::from_secs(600);

/// A binding this process made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub pod: String,
    /// The session's Ready status naming this pod is written.
    pub ready: bool,
}

/// One session's way to Ready, as this process saw it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    /// From the first sight of the session to now.
    pub elapsed: Duration,
    /// API writes made for it.
    pub writes: u32,
}

#[derive(Default)]
struct Maps {
    /// Pod (`namespace/name`) → when a binding chose it.
    reserved: HashMap<String, Instant>,
    /// Session UID → the binding and when it was made.
    bindings: HashMap<String, (Binding, Instant)>,
    /// Session UID → the status this process wrote when it ended the
    /// session or stored its results, and when.
    ended: HashMap<String, (TestSessionStatus, Instant)>,
    /// Session UID → first sight and writes.
    progress: HashMap<String, (Instant, u32)>,
    /// Pool UID → when its last full pass started.
    pool_passes: HashMap<String, Instant>,
    /// Pool UID → when its held pods were last looked over.
    orphan_sweeps: HashMap<String, Instant>,
    /// Pool UID → when its status was last written.
    status_written: HashMap<String, Instant>,
    /// (pool UID, pod name) → when the pool created the pod.
    creating: HashMap<(String, String), Instant>,
}

/// The operator's memory; see the module docs.
pub struct Memory {
    clock: Arc<dyn Clock>,
    maps: Mutex<Maps>,
}

impl Memory {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self { clock, maps: Mutex::new(Maps::default()) }
    }

    pub fn now(&self) -> Instant {
        self.clock.now()
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves `pod` (namespace/name) for a binding; false if it already is.
    pub fn reserve(&self, pod: &str) -> bool {
        let now = self.now();
        let mut maps = self.maps();
        if maps.reserved.get(pod).is_some_and(|at| now.saturating_duration_since(*at) < CACHE_LAG_LIMIT) {
            return false;
        }
        insert_bounded(&mut maps.reserved, pod.to_owned(), now, now, |at| *at, CACHE_LAG_LIMIT);
        true
    }

    /// Frees a pod whose claim failed.
    pub fn release(&self, pod: &str) {
        self.maps().reserved.remove(pod);
    }

    pub fn is_reserved(&self, pod: &str) -> bool {
        let now = self.now();
        self.maps().reserved.get(pod).is_some_and(|at| now.saturating_duration_since(*at) < CACHE_LAG_LIMIT)
    }

    /// The binding this process made for session `uid`, if it remembers one.
    pub fn binding(&self, uid: &str) -> Option<Binding> {
        self.maps().bindings.get(uid).map(|(binding, _)| binding.clone())
    }

    /// Remembers a binding until the caches show it.
    pub fn remember(&self, uid: &str, binding: Binding) {
        let now = self.now();
        let mut maps = self.maps();
        insert_bounded(&mut maps.bindings, uid.to_owned(), (binding, now), now, |(_, at)| *at, CACHE_LAG_LIMIT);
    }

    pub fn forget(&self, uid: &str) {
        self.maps().bindings.remove(uid);
    }

    /// Remembers the status written when session `uid` ended, or when its
    /// results were stored, until the cache shows it.
    pub fn remember_ended(&self, uid: &str, status: TestSessionStatus) {
        let now = self.now();
        let mut maps = self.maps();
        insert_bounded(&mut maps.ended, uid.to_owned(), (status, now), now, |(_, at)| *at, CACHE_LAG_LIMIT);
    }

    /// The status a pass starts from: the cached one, or the one this
    /// process wrote when it ended the session (or stored its results) if
    /// the cache does not show that yet. A pass handed the older object
    /// would otherwise end the session a second time, writing its old
    /// conditions back and dropping `exportedAt`.
    pub fn newest_status(&self, uid: &str, cached: TestSessionStatus) -> TestSessionStatus {
        let now = self.now();
        let mut maps = self.maps();
        let Some((written, at)) = maps.ended.get(uid) else { return cached };
        let fresh = now.saturating_duration_since(*at) < CACHE_LAG_LIMIT;
        let cache_behind = !cached.phase.has_ended() || (written.exported_at.is_some() && cached.exported_at.is_none());
        if fresh && cache_behind {
            return written.clone();
        }
        // The cache caught up (or the entry is too old to trust).
        maps.ended.remove(uid);
        cached
    }

    /// Notes that session `uid` is seen still binding; the first sight
    /// starts its create-to-Ready clock.
    pub fn binding_seen(&self, uid: &str) {
        self.with_progress(uid, |_| ());
    }

    /// Counts one API write made for session `uid`.
    pub fn count_write(&self, uid: &str) {
        self.with_progress(uid, |writes| *writes += 1);
    }

    fn with_progress(&self, uid: &str, change: impl FnOnce(&mut u32)) {
        let now = self.now();
        let mut maps = self.maps();
        if !maps.progress.contains_key(uid) {
            insert_bounded(&mut maps.progress, uid.to_owned(), (now, 0), now, |(at, _)| *at, PROGRESS_LIMIT);
        }
        if let Some((_, writes)) = maps.progress.get_mut(uid) {
            change(writes);
        }
    }

    /// Session `uid`'s way to Ready, forgetting it: it is Ready.
    pub fn take_progress(&self, uid: &str) -> Option<Progress> {
        let now = self.now();
        let (first_seen, writes) = self.maps().progress.remove(uid)?;
        Some(Progress { elapsed: now.saturating_duration_since(first_seen), writes })
    }

    /// How long before the next full pass over pool `uid`; None when one may
    /// run now (and it is recorded as started).
    pub fn pool_pass_wait(&self, uid: &str) -> Option<Duration> {
        let now = self.now();
        pace(&mut self.maps().pool_passes, uid, POOL_PASS_INTERVAL, now)
    }

    /// How long until pool `uid`'s held pods may be looked over again; None
    /// when now (and it is recorded as done).
    pub fn orphan_sweep_wait(&self, uid: &str) -> Option<Duration> {
        let now = self.now();
        pace(&mut self.maps().orphan_sweeps, uid, ORPHAN_SWEEP_INTERVAL, now)
    }

    /// When pool `uid`'s status was last written, as time since.
    pub fn since_status_written(&self, uid: &str) -> Option<Duration> {
        let now = self.now();
        self.maps().status_written.get(uid).map(|at| now.saturating_duration_since(*at))
    }

    pub fn status_written(&self, uid: &str) {
        let now = self.now();
        let mut maps = self.maps();
        insert_bounded(&mut maps.status_written, uid.to_owned(), now, now, |at| *at, Duration::from_secs(60));
    }

    /// Notes that pool `pool_uid` created `pod`.
    pub fn created(&self, pool_uid: &str, pod: String) {
        let now = self.now();
        let mut maps = self.maps();
        insert_bounded(&mut maps.creating, (pool_uid.to_owned(), pod), now, now, |at| *at, CACHE_LAG_LIMIT);
    }

    /// Pods pool `pool_uid` created that the cache does not show yet.
    /// Forgets those it now shows, and those it never showed in time
    /// (deleted before it saw them), so a lost pod cannot hold the pool
    /// below its size.
    pub fn creates_in_flight(&self, pool_uid: &str, cached: impl Fn(&str) -> bool) -> u32 {
        let now = self.now();
        let mut maps = self.maps();
        let mut count = 0;
        maps.creating.retain(|(pool, pod), at| {
            if pool != pool_uid {
                return true;
            }
            let keep = !cached(pod) && now.saturating_duration_since(*at) < CACHE_LAG_LIMIT;
            count += u32::from(keep);
            keep
        });
        count
    }

    /// How many entries each map holds (for tests and the bound).
    #[cfg(test)]
    fn sizes(&self) -> [usize; 7] {
        let maps = self.maps();
        [
            maps.reserved.len(),
            maps.bindings.len(),
            maps.progress.len(),
            maps.pool_passes.len(),
            maps.orphan_sweeps.len(),
            maps.status_written.len(),
            maps.creating.len(),
        ]
    }
}

/// Inserts into a map kept under [`MAX_ENTRIES`]: at the bound, entries
/// older than `useful_for` go first, then the oldest tenth.
fn insert_bounded<K: Hash + Eq + Clone, V>(
    map: &mut HashMap<K, V>,
    key: K,
    value: V,
    now: Instant,
    stamp: impl Fn(&V) -> Instant,
    useful_for: Duration,
) {
    if map.len() >= MAX_ENTRIES && !map.contains_key(&key) {
        map.retain(|_, v| now.saturating_duration_since(stamp(v)) < useful_for);
        if map.len() >= MAX_ENTRIES {
            let mut stamps: Vec<(Instant, K)> = map.iter().map(|(k, v)| (stamp(v), k.clone())).collect();
            stamps.sort_unstable_by_key(|(at, _)| *at);
            for (_, oldest) in stamps.into_iter().take(MAX_ENTRIES / 10) {
                map.remove(&oldest);
            }
        }
    }
    map.insert(key, value);
}

/// How long until something done per key may run again, or None when it may
/// run now (and it is recorded as run).
fn pace(last_runs: &mut HashMap<String, Instant>, key: &str, interval: Duration, now: Instant) -> Option<Duration> {
    if let Some(last) = last_runs.get(key) {
        let since = now.saturating_duration_since(*last);
        if since < interval {
            return Some(interval - since);
        }
    }
    insert_bounded(last_runs, key.to_owned(), now, now, |at| *at, interval.max(Duration::from_secs(60)));
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn memory() -> (Memory, ManualClock) {
        let clock = ManualClock::default();
        (Memory::new(Arc::new(clock.clone())), clock)
    }

    #[test]
    fn a_reservation_holds_until_released_or_the_cache_has_caught_up() {
        let (memory, clock) = memory();
        assert!(memory.reserve("ns/a"));
        assert!(!memory.reserve("ns/a"));
        assert!(memory.is_reserved("ns/a"));
        memory.release("ns/a");
        assert!(!memory.is_reserved("ns/a"));
        assert!(memory.reserve("ns/a"));
        clock.advance(CACHE_LAG_LIMIT);
        assert!(!memory.is_reserved("ns/a"));
        assert!(memory.reserve("ns/a"));
    }

    #[test]
    fn an_ended_status_stands_in_for_a_cache_that_lags_until_it_catches_up() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        use tidepool_crds::test_session::Phase;
        let (memory, clock) = memory();
        let ready = TestSessionStatus { phase: Phase::Ready, ..Default::default() };
        // Nothing remembered: the cache's.
        assert_eq!(memory.newest_status("s1", ready.clone()), ready);
        let ended = TestSessionStatus { phase: Phase::Completed, ..Default::default() };
        memory.remember_ended("s1", ended.clone());
        assert_eq!(memory.newest_status("s1", ready.clone()), ended);
        // Stored too, and the cache shows it ended but not stored.
        let stored =
            TestSessionStatus { exported_at: Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH)), ..ended.clone() };
        memory.remember_ended("s1", stored.clone());
        assert_eq!(memory.newest_status("s1", ended.clone()), stored);
        // The cache caught up: its own, and the entry goes.
        assert_eq!(memory.newest_status("s1", stored.clone()), stored);
        assert_eq!(memory.newest_status("s1", ready.clone()), ready);
        // An entry older than the caches ever lag is not trusted.
        memory.remember_ended("s2", ended.clone());
        clock.advance(CACHE_LAG_LIMIT);
        assert_eq!(memory.newest_status("s2", ready.clone()), ready);
    }

    #[test]
    fn bindings_are_remembered_and_forgotten() {
        let (memory, _) = memory();
        assert_eq!(memory.binding("s1"), None);
        memory.remember("s1", Binding { pod: "p".into(), ready: false });
        memory.remember("s1", Binding { pod: "p".into(), ready: true });
        assert_eq!(memory.binding("s1"), Some(Binding { pod: "p".into(), ready: true }));
        memory.forget("s1");
        assert_eq!(memory.binding("s1"), None);
    }

    #[test]
    fn progress_runs_from_the_first_sight_and_counts_writes() {
        let (memory, clock) = memory();
        memory.binding_seen("s1");
        clock.advance(Duration::from_millis(40));
        memory.binding_seen("s1");
        memory.count_write("s1");
        memory.count_write("s1");
        clock.advance(Duration::from_millis(10));
        assert_eq!(memory.take_progress("s1"), Some(Progress { elapsed: Duration::from_millis(50), writes: 2 }));
        assert_eq!(memory.take_progress("s1"), None);
    }

    #[test]
    fn passes_and_sweeps_are_paced_per_pool() {
        let (memory, clock) = memory();
        assert_eq!(memory.pool_pass_wait("a"), None);
        assert_eq!(memory.pool_pass_wait("b"), None);
        clock.advance(Duration::from_millis(30));
        assert_eq!(memory.pool_pass_wait("a"), Some(POOL_PASS_INTERVAL - Duration::from_millis(30)));
        clock.advance(POOL_PASS_INTERVAL);
        assert_eq!(memory.pool_pass_wait("a"), None);
        assert_eq!(memory.orphan_sweep_wait("a"), None);
        assert_eq!(memory.orphan_sweep_wait("a"), Some(ORPHAN_SWEEP_INTERVAL));
    }

    #[test]
    fn status_writes_are_timed() {
        let (memory, clock) = memory();
        assert_eq!(memory.since_status_written("a"), None);
        memory.status_written("a");
        clock.advance(Duration::from_millis(300));
        assert_eq!(memory.since_status_written("a"), Some(Duration::from_millis(300)));
    }

    #[test]
    fn a_created_pod_is_in_flight_until_seen_or_too_late() {
        let (memory, clock) = memory();
        memory.created("pool", "seen".into());
        memory.created("pool", "lost".into());
        memory.created("other", "x".into());
        let cached = |name: &str| name == "seen";
        assert_eq!(memory.creates_in_flight("pool", cached), 1);
        clock.advance(CACHE_LAG_LIMIT);
        // "lost" was deleted before the cache saw it: it stops holding the pool back.
        assert_eq!(memory.creates_in_flight("pool", cached), 0);
        assert_eq!(memory.sizes()[6], 1, "another pool's pods are its own business");
    }

    #[test]
    fn every_map_stays_within_its_bound() {
        let (memory, clock) = memory();
        for i in 0..MAX_ENTRIES + 500 {
            let key = format!("k{i}");
            memory.reserve(&key);
            memory.remember(&key, Binding { pod: key.clone(), ready: true });
            memory.binding_seen(&key);
            memory.pool_pass_wait(&key);
            memory.orphan_sweep_wait(&key);
            memory.status_written(&key);
            memory.created("pool", key);
            clock.advance(Duration::from_micros(1));
        }
        for size in memory.sizes() {
            assert!(size <= MAX_ENTRIES, "{:?}", memory.sizes());
        }
        // The newest entries are the ones kept.
        let newest = format!("k{}", MAX_ENTRIES + 499);
        assert!(memory.is_reserved(&newest));
        assert!(memory.binding(&newest).is_some());
    }

    #[test]
    fn a_poisoned_lock_is_taken_over_as_it_is() {
        let (memory, _) = memory();
        memory.reserve("ns/a");
        let memory = Arc::new(memory);
        let poisoner = memory.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.maps.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        assert!(memory.maps.is_poisoned());
        // Every method goes on with the same data.
        assert!(memory.is_reserved("ns/a"));
        assert!(!memory.reserve("ns/a"));
        memory.remember("s", Binding { pod: "p".into(), ready: false });
        assert!(memory.binding("s").is_some());
        assert_eq!(memory.pool_pass_wait("pool"), None);
        assert!(memory.pool_pass_wait("pool").is_some());
    }
}
