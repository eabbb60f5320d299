//! Results that outlive their sessions: every ended TestSession's results
//! are stored as one JSON document in an S3-compatible bucket.
//!
//! The session controller asks [`Exporter::store`] once a session has
//! ended; on success it writes `status.exportedAt`, and only then may the
//! session be deleted when its retention ends. A store that fails opens the
//! [`breaker`]: one trial call at a time, with backoff, while every other
//! session waits its turn. Nothing is lost: a session waits (and stays) for
//! as long as the store is down, and `tidepool_results_export_backlog` says
//! how many wait.
//!
//! - [`s3`]: the store's three calls, signed with Signature Version 4;
//! - [`record`]: the document and its key;
//! - [`breaker`]: when to try a failing store again;
//! - [`history`]: reading stored results back for `GET /api/v1/results`.

pub mod breaker;
pub mod history;
pub mod record;
pub mod s3;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use tidepool_crds::TestSession;
use tidepool_protocol::stored::StoredResult;

use crate::metrics::Metrics;
use crate::scope::Caches;
use breaker::{Admit, Breaker};
use s3::{S3Error, S3Store};

/// Stores ended sessions' results.
pub struct Exporter {
    store: S3Store,
    /// Normalized: empty or ending in `/`.
    prefix: String,
    breaker: Mutex<Breaker>,
    metrics: Arc<Metrics>,
}

/// What became of one session's export.
#[derive(Debug)]
pub enum Outcome {
    /// Stored under this key.
    Stored { key: String },
    /// Not stored: try again after this long. `why` is this call's failure,
    /// or, when it was held back, the failure that opened the breaker.
    Later { after: Duration, why: String },
}

impl Exporter {
    pub fn new(store: S3Store, prefix: &str, metrics: Arc<Metrics>) -> Self {
        Self { store, prefix: record::normalize_prefix(prefix), breaker: Mutex::default(), metrics }
    }

    pub fn store_handle(&self) -> &S3Store {
        &self.store
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Stores `record` (of a session that ended at `ended_at`), unless the
    /// store is failing and it is not this call's turn to try.
    pub async fn store(&self, record: &StoredResult, ended_at: Timestamp) -> Outcome {
        {
            let mut breaker = self.breaker();
            if let Admit::Wait(after) = breaker.admit(Instant::now()) {
                let why = breaker.last_failure().unwrap_or("the store is failing").to_owned();
                return Outcome::Later { after, why };
            }
        }
        let key = record::object_key(&self.prefix, record, ended_at);
        let body = match serde_json::to_vec(record) {
            Ok(body) => body,
            Err(e) => {
                // Cannot happen for these types; counted as a failure, never dropped.
                let failure = S3Error::Config(format!("results do not serialize: {e}"));
                return self.failed(failure);
            }
        };
        let started = Instant::now();
        let put = self.store.put(&key, body, "application/json").await;
        self.metrics.export_call.observe(started.elapsed().as_secs_f64());
        match put {
            Ok(()) => {
                self.breaker().succeeded();
                tracing::debug!(session = %record.name, %key, "results stored");
                self.metrics.exports.with_label_values(&["stored"]).inc();
                let delay = Timestamp::now().duration_since(ended_at).as_secs_f64().max(0.0);
                self.metrics.export_delay.observe(delay);
                Outcome::Stored { key }
            }
            Err(failure) => self.failed(failure),
        }
    }

    fn failed(&self, failure: S3Error) -> Outcome {
        self.metrics.exports.with_label_values(&["failed"]).inc();
        let why = failure.to_string();
        let after = self.breaker().failed(Instant::now(), why.clone());
        tracing::warn!(error = %failure, retry_in = ?after, "the results store failed");
        Outcome::Later { after, why }
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        // The breaker's state is a few numbers, sound after any panic.
        self.breaker.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// How often the backlog gauges are brought up to date.
const BACKLOG_EVERY: Duration = Duration::from_secs(10);

/// Keeps `tidepool_results_export_backlog` and the oldest wait up to date
/// from the session cache: ended sessions with no `exportedAt`.
pub async fn watch_backlog(sessions: Caches<TestSession>, metrics: Arc<Metrics>) {
    let mut tick = tokio::time::interval(BACKLOG_EVERY);
    loop {
        tick.tick().await;
        let now = Timestamp::now();
        let (count, oldest) = backlog(&sessions.state(), now);
        metrics.export_backlog.set(count);
        metrics.export_oldest_pending.set(oldest.as_secs_f64());
    }
}

/// How many ended sessions wait to be stored, and the longest wait.
pub fn backlog(sessions: &[Arc<TestSession>], now: Timestamp) -> (i64, Duration) {
    let mut count = 0;
    let mut oldest = Duration::ZERO;
    for session in sessions {
        let Some(status) = &session.status else { continue };
        if !status.phase.has_ended() || status.exported_at.is_some() || session.metadata.deletion_timestamp.is_some() {
            continue;
        }
        count += 1;
        // When it ended: its Ready condition's last change, as the session controller reads it.
        if let Some(ended) = crate::conditions::last_transition(&status.conditions, crate::conditions::READY) {
            oldest = oldest.max(now.duration_since(ended).unsigned_abs());
        }
    }
    (count, oldest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use tidepool_crds::test_session::{Phase, TestSessionSpec, TestSessionStatus};

    fn session(phase: Phase, ended: i64, exported: bool) -> Arc<TestSession> {
        let mut session = TestSession::new(
            "s",
            TestSessionSpec {
                pool: "p".into(),
                profile: Default::default(),
                ttl_seconds: None,
                sticky_key: None,
                client: None,
                probes: vec![],
            },
        );
        let at = Timestamp::from_second(ended).unwrap();
        let mut status = TestSessionStatus { phase, ..Default::default() };
        crate::conditions::set(&mut status.conditions, crate::conditions::READY, false, "Completed", "", None, at);
        status.exported_at = exported.then_some(Time(at));
        session.status = Some(status);
        Arc::new(session)
    }

    fn exporter() -> Exporter {
        let config = s3::S3Config {
            endpoint: "http://127.0.0.1:1".parse().unwrap(),
            bucket: "results".into(),
            region: "us-east-1".into(),
            access_key_id: "k".into(),
            secret_access_key: "s".into(),
            virtual_hosted: false,
        };
        Exporter::new(S3Store::new(config).unwrap(), "tidepool", Arc::new(Metrics::new().unwrap()))
    }

    #[tokio::test]
    async fn a_store_that_cannot_be_reached_is_tried_once_then_held_back() {
        let exporter = exporter();
        let record =
            record::record(&session(Phase::Completed, 900, false), &TestSessionStatus::default(), Timestamp::now());
        let Outcome::Later { after, why } = exporter.store(&record, Timestamp::now()).await else {
            panic!("a store on a closed port took the results")
        };
        assert_eq!(after, breaker::FIRST_BACKOFF);
        assert!(why.starts_with("the store did not answer"), "{why}");
        // The next session waits its turn instead of calling, and is told why.
        let Outcome::Later { why: held, .. } = exporter.store(&record, Timestamp::now()).await else {
            panic!("a second call went through an open breaker")
        };
        assert_eq!(held, why);
        let failed = exporter.metrics.exports.with_label_values(&["failed"]).get();
        assert_eq!(failed, 1, "the held-back call was not made");
    }

    #[test]
    fn the_backlog_counts_ended_sessions_not_stored() {
        let now = Timestamp::from_second(1_000).unwrap();
        let sessions = [
            session(Phase::Completed, 900, false),
            session(Phase::Expired, 400, false),
            session(Phase::Failed, 100, true),
            session(Phase::Ready, 100, false),
        ];
        assert_eq!(backlog(&sessions, now), (2, Duration::from_secs(600)));
        assert_eq!(backlog(&[], now), (0, Duration::ZERO));
    }
}
