//! Leader election through a coordination.k8s.io Lease, so two replicas can
//! run and only one writes.
//!
//! Expiry is judged by each follower's own clock: a follower takes over when
//! the lease record has not changed for a whole lease duration since it
//! first saw it, so clock skew between replicas does not matter. The leader
//! renews every third of the duration, each attempt bounded so that it gives
//! up leading at its renew deadline (two thirds of the duration after the
//! last renewal it sent): before any follower can count the lease expired,
//! it has stopped writing. [`decide`] is the pure part; [`Elector`] the I/O.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, ResourceExt};

/// Which lease, and who we are.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
}

impl LeaseSettings {
    /// How often the leader renews, and a follower tries.
    pub fn retry_period(&self) -> Duration {
        (self.duration / 3).max(Duration::from_millis(100))
    }

    /// How long after its last renewal the leader keeps leading without
    /// another: a third of the duration before any follower can take over.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }
}

/// What a replica read of the lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub holder: Option<String>,
    /// The object's resourceVersion: any renewal changes it.
    pub version: String,
    pub duration: Option<Duration>,
}

impl Record {
    pub fn of(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        Self {
            holder: spec.and_then(|s| s.holder_identity.clone()).filter(|h| !h.is_empty()),
            version: lease.resource_version().unwrap_or_default(),
            duration: spec
                .and_then(|s| s.lease_duration_seconds)
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs),
        }
    }
}

/// A record held by another replica, and when this one first saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sighting {
    pub version: String,
    pub since: Instant,
}

/// What to do about the lease now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseStep {
    /// There is no Lease: create it, held by us.
    Create,
    /// We hold it: write a new renew time.
    Renew,
    /// It is free or expired: write ourselves in as holder.
    TakeOver,
    /// Another replica holds it, and it has not expired by our clock.
    Wait,
}

/// Decides from the record read (None: no Lease) and what this replica saw
/// before; returns the step and what to remember for the next decision.
pub fn decide(
    record: Option<&Record>,
    me: &str,
    seen: Option<Sighting>,
    now: Instant,
    default_duration: Duration,
) -> (LeaseStep, Option<Sighting>) {
    let Some(record) = record else { return (LeaseStep::Create, None) };
    match record.holder.as_deref() {
        Some(holder) if holder == me => (LeaseStep::Renew, None),
        None => (LeaseStep::TakeOver, None),
        Some(_) => match seen {
            Some(seen) if seen.version == record.version => {
                let duration = record.duration.unwrap_or(default_duration);
                let step = if now.saturating_duration_since(seen.since) >= duration {
                    LeaseStep::TakeOver
                } else {
                    LeaseStep::Wait
                };
                (step, Some(seen))
            }
            // A new record (or the first look): its clock starts now.
            _ => (LeaseStep::Wait, Some(Sighting { version: record.version.clone(), since: now })),
        },
    }
}

/// Why an attempt on the lease did not settle it.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("the Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("the API server did not answer within {0:?}")]
    Timeout(Duration),
}

/// Holds the lease for one replica.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    seen: Option<Sighting>,
}

impl Elector {
    /// `client` should have short timeouts of its own; every attempt is
    /// bounded here as well.
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Self { api: Api::namespaced(client, &settings.namespace), settings, seen: None }
    }

    /// Waits until this replica holds the lease; returns when the winning
    /// write was sent, which [`Elector::hold`] counts its deadline from.
    pub async fn acquire(&mut self) -> Instant {
        loop {
            let bound = self.settings.renew_deadline();
            let sent = Instant::now();
            match tokio::time::timeout(bound, self.try_acquire()).await {
                Ok(Ok(true)) => return sent,
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "lease: could not read or write"),
                Err(_) => tracing::warn!("lease: the API server did not answer within {bound:?}"),
            }
            tokio::time::sleep(self.settings.retry_period()).await;
        }
    }

    /// Renews the lease until it is lost, or until the renew deadline passes
    /// without a renewal; returns then, and the caller must stop writing at
    /// once. `acquired` is when the lease was last written by us.
    pub async fn hold(&mut self, acquired: Instant) {
        let mut renewed = acquired;
        loop {
            tokio::time::sleep(self.settings.retry_period()).await;
            let deadline = renewed + self.settings.renew_deadline();
            let sent = Instant::now();
            let Some(left) = deadline.checked_duration_since(sent).filter(|d| !d.is_zero()) else {
                tracing::error!("lease: not renewed within the renew deadline");
                return;
            };
            match tokio::time::timeout(left, self.try_acquire()).await {
                // Counted from when the renewal was sent: the API server
                // wrote it no earlier, so followers count from no earlier.
                Ok(Ok(true)) => renewed = sent,
                Ok(Ok(false)) => {
                    tracing::error!("lease: another replica holds it");
                    return;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "lease: renewal failed; retrying within the deadline"),
                Err(_) => {
                    tracing::error!("lease: the API server did not answer before the renew deadline");
                    return;
                }
            }
        }
    }

    /// Gives the lease up so a follower takes over at once (on shutdown, or
    /// when a task failed). Bounded: a hung API server cannot hold the exit.
    pub async fn release(&mut self) {
        let release = async {
            let lease = self.api.get_opt(&self.settings.name).await?;
            if let Some(mut lease) = lease
                && Record::of(&lease).holder.as_deref() == Some(self.settings.identity.as_str())
            {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                spec.holder_identity = None;
                self.api.replace(&self.settings.name, &PostParams::default(), &lease).await?;
            }
            Ok::<(), kube::Error>(())
        };
        match tokio::time::timeout(self.settings.renew_deadline(), release).await {
            Ok(Ok(())) => tracing::info!("lease released"),
            Ok(Err(e)) => tracing::warn!(error = %e, "lease: could not release"),
            Err(_) => tracing::warn!("lease: the API server did not answer the release in time"),
        }
    }

    /// One read and, when due, one write. Ok(true): we hold the lease now.
    async fn try_acquire(&mut self) -> Result<bool, LeaseError> {
        let lease = self.api.get_opt(&self.settings.name).await?;
        let record = lease.as_ref().map(Record::of);
        let (step, seen) =
            decide(record.as_ref(), &self.settings.identity, self.seen.take(), Instant::now(), self.settings.duration);
        self.seen = seen;
        let now = MicroTime(Timestamp::now());
        let seconds = i32::try_from(self.settings.duration.as_secs().max(1)).unwrap_or(15);
        let written = match (step, lease) {
            (LeaseStep::Wait, _) => return Ok(false),
            (LeaseStep::Create, _) | (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.settings.name.clone()),
                        namespace: Some(self.settings.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.settings.identity.clone()),
                        lease_duration_seconds: Some(seconds),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (step, Some(mut lease)) => {
                let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
                if step == LeaseStep::TakeOver {
                    spec.acquire_time = Some(now.clone());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                }
                spec.holder_identity = Some(self.settings.identity.clone());
                spec.lease_duration_seconds = Some(seconds);
                spec.renew_time = Some(now);
                // replace carries the resourceVersion we read: a concurrent change wins.
                self.api.replace(&self.settings.name, &PostParams::default(), &lease).await
            }
        };
        match written {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEN: Duration = Duration::from_secs(10);

    fn held_by(holder: Option<&str>, version: &str) -> Record {
        Record { holder: holder.map(String::from), version: version.into(), duration: Some(TEN) }
    }

    #[test]
    fn no_lease_is_created() {
        assert_eq!(decide(None, "me", None, Instant::now(), TEN), (LeaseStep::Create, None));
    }

    #[test]
    fn our_own_lease_is_renewed() {
        let seen = Some(Sighting { version: "1".into(), since: Instant::now() });
        assert_eq!(decide(Some(&held_by(Some("me"), "7")), "me", seen, Instant::now(), TEN), (LeaseStep::Renew, None));
    }

    #[test]
    fn a_free_lease_is_taken_at_once() {
        assert_eq!(decide(Some(&held_by(None, "3")), "me", None, Instant::now(), TEN), (LeaseStep::TakeOver, None));
    }

    #[test]
    fn anothers_lease_is_taken_only_after_a_whole_unchanged_duration_by_our_clock() {
        let start = Instant::now();
        let theirs = held_by(Some("other"), "5");
        let (step, seen) = decide(Some(&theirs), "me", None, start, TEN);
        assert_eq!((step, seen.clone()), (LeaseStep::Wait, Some(Sighting { version: "5".into(), since: start })));
        let (step, seen) = decide(Some(&theirs), "me", seen, start + TEN - Duration::from_millis(1), TEN);
        assert_eq!(step, LeaseStep::Wait);
        let (step, _) = decide(Some(&theirs), "me", seen.clone(), start + TEN, TEN);
        assert_eq!(step, LeaseStep::TakeOver);
        // A renewal (a new version) starts the clock again.
        let renewed = held_by(Some("other"), "6");
        let (step, seen) = decide(Some(&renewed), "me", seen, start + TEN, TEN);
        assert_eq!((step, seen.map(|s| s.since)), (LeaseStep::Wait, Some(start + TEN)));
    }

    #[test]
    fn a_lease_without_a_duration_uses_ours() {
        let start = Instant::now();
        let theirs = Record { duration: None, ..held_by(Some("other"), "5") };
        let (_, seen) = decide(Some(&theirs), "me", None, start, Duration::from_secs(2));
        assert_eq!(
            decide(Some(&theirs), "me", seen, start + Duration::from_secs(2), Duration::from_secs(2)).0,
            LeaseStep::TakeOver
        );
    }

    #[test]
    fn the_leader_stops_a_third_of_the_duration_before_anyone_can_take_over() {
        let settings = LeaseSettings {
            namespace: "ns".into(),
            name: "l".into(),
            identity: "me".into(),
            duration: Duration::from_secs(3),
        };
        assert_eq!(settings.retry_period(), Duration::from_secs(1));
        assert_eq!(settings.renew_deadline(), Duration::from_secs(2));
        assert!(settings.renew_deadline() + settings.retry_period() <= settings.duration);
    }

    #[test]
    fn a_record_reads_the_holder_and_duration() {
        let lease: Lease = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "l", "resourceVersion": "42" },
            "spec": { "holderIdentity": "", "leaseDurationSeconds": 3 }
        }))
        .unwrap();
        assert_eq!(
            Record::of(&lease),
            Record { holder: None, version: "42".into(), duration: Some(Duration::from_secs(3)) }
        );
    }
}
