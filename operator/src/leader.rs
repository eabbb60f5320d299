//! Leader election through a coordination.k8s.io Lease, so two replicas can
//! run and only one writes. Expiry is judged by the local clock: a follower
//! takes over when the lease record has not changed for a whole lease
//! duration since it first saw it, so clock skew between replicas does not
//! matter.

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

/// Holds the lease for one replica.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The last record seen from another holder, and when we first saw it.
    observed: Option<(String, Instant)>,
}

impl Elector {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Self { api: Api::namespaced(client, &settings.namespace), settings, observed: None }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&mut self) {
        let retry = (self.settings.duration / 5).clamp(Duration::from_millis(200), Duration::from_secs(1));
        loop {
            match self.try_acquire().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "lease: could not read or write"),
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews the lease until it is lost; returns then. A replica that can't
    /// renew for a whole lease duration must assume another has taken over.
    pub async fn hold(&mut self) {
        let period = self.settings.duration / 3;
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(period).await;
            match self.try_acquire().await {
                Ok(true) => last_renewal = Instant::now(),
                Ok(false) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "lease: renewal failed");
                    if last_renewal.elapsed() >= self.settings.duration {
                        return;
                    }
                }
            }
        }
    }

    /// Gives the lease up so a follower takes over at once (on shutdown).
    pub async fn release(&mut self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.settings.name).await
            && self.holder(&lease) == Some(self.settings.identity.as_str())
        {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            spec.holder_identity = None;
            let _ = self.api.replace(&self.settings.name, &PostParams::default(), &lease).await;
        }
    }

    async fn try_acquire(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let seconds = i32::try_from(self.settings.duration.as_secs().max(1)).unwrap_or(15);
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
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
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let mine = self.holder(&lease) == Some(self.settings.identity.as_str());
        if !mine && !self.expired(&lease) {
            return Ok(false);
        }
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if !mine {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.settings.identity.clone());
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(now);
        // replace carries the resourceVersion we read: a concurrent change wins.
        match self.api.replace(&self.settings.name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn holder<'a>(&self, lease: &'a Lease) -> Option<&'a str> {
        lease.spec.as_ref().and_then(|s| s.holder_identity.as_deref()).filter(|h| !h.is_empty())
    }

    /// Free, or unchanged for a whole lease duration since we first saw it.
    fn expired(&mut self, lease: &Lease) -> bool {
        if self.holder(lease).is_none() {
            return true;
        }
        let version = lease.resource_version().unwrap_or_default();
        match &self.observed {
            Some((seen, since)) if *seen == version => since.elapsed() >= self.lease_duration(lease),
            _ => {
                self.observed = Some((version, Instant::now()));
                false
            }
        }
    }

    fn lease_duration(&self, lease: &Lease) -> Duration {
        lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map_or(self.settings.duration, Duration::from_secs)
    }
}
