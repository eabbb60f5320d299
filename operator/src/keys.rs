//! Each pool's Ed25519 session keys, kept in a Secret the pool owns.
//!
//! The Secret holds the current private key and, for a while after a
//! rotation, the previous one. Every replica caches what it read for a short
//! time, so a replaced Secret reaches every replica within
//! [`CACHE_FOR`]; a Secret that is not owned by its pool (made by someone
//! else under the same name) is never used.
//!
//! A rotation is asked for by setting the pool's annotation
//! [`ROTATE_ANNOTATION`] to a new value: the operator makes a new key, keeps
//! the old one as the previous, and records the value on the Secret. Pods
//! carry the key id they were made with; the pool rolls its warm pods onto
//! the new key, while sessions bound to older pods keep credentials signed
//! with the key their pod holds.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, Resource, ResourceExt};
use tidepool_crds::WarmPool;
use tidepool_wire::token::{PoolSigningKey, PublicKeys};

use crate::error::{Error, Result};

const PRIVATE: &str = "private";
const PUBLIC: &str = "public";
const PREVIOUS: &str = "previous-private";

/// On a WarmPool: change its value to rotate the pool's key.
pub const ROTATE_ANNOTATION: &str = "tidepool.dev/rotate-key";

/// How long a replica trusts what it read of a key Secret.
pub const CACHE_FOR: Duration = Duration::from_secs(30);
/// How long "this pool has no key" is trusted.
const ABSENT_FOR: Duration = Duration::from_secs(5);
/// The most pools whose keys a replica keeps.
const CAPACITY: usize = 10_000;

/// The name of a pool's key Secret.
pub fn secret_name(pool: &str) -> String {
    format!("{pool}-session-key")
}

/// A pool's keys: the current one signs; the previous one, during a
/// rotation, still signs for pods made before it.
#[derive(Clone, Debug)]
pub struct PoolKeys {
    pub current: PoolSigningKey,
    pub previous: Option<PoolSigningKey>,
}

impl PoolKeys {
    /// The public keys pods get: current first.
    pub fn public(&self) -> PublicKeys {
        PublicKeys::new(std::iter::once(&self.current).chain(&self.previous).map(PoolSigningKey::public).collect())
    }

    /// The current key's id.
    pub fn kid(&self) -> String {
        self.current.public().kid()
    }

    /// The key to sign with for a pod that holds key `kid`: that one while
    /// this pool still has it, the current one otherwise.
    pub fn signer_for(&self, kid: Option<&str>) -> &PoolSigningKey {
        self.previous.as_ref().filter(|previous| kid == Some(previous.public().kid().as_str())).unwrap_or(&self.current)
    }
}

/// What a replica read of one pool's Secret, and when.
#[derive(Clone)]
struct Entry {
    pool_uid: String,
    keys: Option<PoolKeys>,
    read: Instant,
}

/// Pool keys, read from their Secrets and kept for a short while, by
/// namespace and pool name.
#[derive(Default)]
pub struct Keys {
    cache: Mutex<HashMap<(String, String), Entry>>,
}

impl Keys {
    /// The keys of pool `namespace/pool` (with UID `pool_uid`), from memory
    /// or its Secret; None when it has no Secret it owns.
    pub async fn load(&self, client: &Client, namespace: &str, pool: &str, pool_uid: &str) -> Result<Option<PoolKeys>> {
        let key = (namespace.to_owned(), pool.to_owned());
        if let Some(entry) = self.cached(&key, pool_uid) {
            return Ok(entry.keys);
        }
        let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let keys = match secrets.get_opt(&secret_name(pool)).await? {
            Some(secret) if owned_by_uid(&secret, pool_uid) => Some(parse(&secret)?),
            Some(_) => {
                tracing::warn!(namespace, pool, "the key Secret is not owned by its pool; not using it");
                None
            }
            None => None,
        };
        self.remember(key, pool_uid, keys.clone());
        Ok(keys)
    }

    /// The pool's keys, making its Secret (owned by the pool) when missing
    /// and rotating them when the pool asks. Refuses a Secret of that name
    /// that the pool does not own.
    pub async fn ensure(&self, client: &Client, pool: &WarmPool) -> Result<PoolKeys> {
        let namespace = pool.namespace().ok_or(Error::Missing("WarmPool", "namespace"))?;
        let uid = pool.uid().ok_or(Error::Missing("WarmPool", "uid"))?;
        let name = secret_name(&pool.name_any());
        let asked = pool.annotations().get(ROTATE_ANNOTATION).cloned();
        let cache_key = (namespace.clone(), pool.name_any());
        if let Some(Entry { keys: Some(keys), .. }) = self.cached(&cache_key, &uid)
            && asked.is_none()
        {
            return Ok(keys);
        }
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        let keys = match secrets.get_opt(&name).await? {
            None => {
                let keys = PoolKeys { current: PoolSigningKey::generate()?, previous: None };
                match secrets.create(&PostParams::default(), &secret_for(pool, &keys, asked.as_deref())).await {
                    Ok(_) => keys,
                    // Made meanwhile (another pass): use that one next time.
                    Err(kube::Error::Api(status)) if status.code == 409 => {
                        let existing = secrets.get(&name).await?;
                        check_owner(&existing, pool)?;
                        parse(&existing)?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            Some(secret) => {
                check_owner(&secret, pool)?;
                let keys = parse(&secret)?;
                let done = secret.annotations().get(ROTATE_ANNOTATION).cloned();
                match asked {
                    Some(asked) if Some(&asked) != done.as_ref() => {
                        let rotated = PoolKeys { current: PoolSigningKey::generate()?, previous: Some(keys.current) };
                        let mut replaced = secret_for(pool, &rotated, Some(&asked));
                        // Conditional on what was read: two passes never rotate twice.
                        replaced.metadata.resource_version = secret.resource_version();
                        secrets.replace(&name, &PostParams::default(), &replaced).await?;
                        tracing::info!(pool = %pool.name_any(), kid = %rotated.kid(), "rotated the pool's key");
                        rotated
                    }
                    _ => keys,
                }
            }
        };
        self.remember(cache_key, &uid, Some(keys.clone()));
        Ok(keys)
    }

    fn cached(&self, key: &(String, String), pool_uid: &str) -> Option<Entry> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = cache.get(key)?;
        let fresh_for = if entry.keys.is_some() { CACHE_FOR } else { ABSENT_FOR };
        (entry.pool_uid == pool_uid && entry.read.elapsed() < fresh_for).then(|| entry.clone())
    }

    fn remember(&self, key: (String, String), pool_uid: &str, keys: Option<PoolKeys>) {
        // The operator's rule for a poisoned lock: take it over (one insert
        // cannot leave the map half-changed).
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= CAPACITY && !cache.contains_key(&key) {
            cache.retain(|_, entry| entry.read.elapsed() < CACHE_FOR);
            if cache.len() >= CAPACITY
                && let Some(oldest) = cache.iter().min_by_key(|(_, e)| e.read).map(|(k, _)| k.clone())
            {
                cache.remove(&oldest);
            }
        }
        cache.insert(key, Entry { pool_uid: pool_uid.to_owned(), keys, read: Instant::now() });
    }
}

fn owned_by_uid(secret: &Secret, pool_uid: &str) -> bool {
    secret.owner_references().iter().any(|o| o.kind == "WarmPool" && o.uid == pool_uid && o.controller == Some(true))
}

fn check_owner(secret: &Secret, pool: &WarmPool) -> Result<()> {
    if owned_by_uid(secret, pool.metadata.uid.as_deref().unwrap_or_default()) {
        return Ok(());
    }
    Err(Error::KeyNotOwned { secret: secret.name_any(), pool: pool.name_any() })
}

fn secret_for(pool: &WarmPool, keys: &PoolKeys, rotation: Option<&str>) -> Secret {
    let mut data = BTreeMap::from([
        (PRIVATE.to_string(), ByteString(keys.current.to_base64().into_bytes())),
        (PUBLIC.to_string(), ByteString(keys.current.public().to_base64().into_bytes())),
    ]);
    if let Some(previous) = &keys.previous {
        data.insert(PREVIOUS.to_string(), ByteString(previous.to_base64().into_bytes()));
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(&pool.name_any())),
            namespace: pool.namespace(),
            owner_references: pool.controller_owner_ref(&()).map(|r| vec![r]),
            labels: Some(BTreeMap::from([(crate::labels::POOL.to_string(), pool.name_any())])),
            annotations: rotation.map(|r| BTreeMap::from([(ROTATE_ANNOTATION.to_string(), r.to_string())])),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    }
}

fn parse(secret: &Secret) -> Result<PoolKeys> {
    let field =
        |name: &str| secret.data.as_ref().and_then(|d| d.get(name)).map(|b| String::from_utf8_lossy(&b.0).to_string());
    let current = field(PRIVATE).ok_or_else(|| Error::Invalid {
        kind: "Secret",
        name: secret.name_any(),
        reason: format!("no `{PRIVATE}` key"),
    })?;
    let previous = field(PREVIOUS).map(|text| PoolSigningKey::from_base64(&text)).transpose()?;
    Ok(PoolKeys { current: PoolSigningKey::from_base64(&current)?, previous })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(uid: &str) -> WarmPool {
        serde_json::from_value(serde_json::json!({
            "apiVersion": tidepool_crds::API_VERSION, "kind": "WarmPool",
            "metadata": { "name": "edge", "namespace": "ns", "uid": uid },
            "spec": { "size": 1, "tier": { "vcpu": 1, "memoryMiB": 64 },
                      "template": { "spec": { "containers": [{ "name": "s", "image": "i" }] } } }
        }))
        .unwrap()
    }

    #[test]
    fn a_secret_carries_both_keys_during_a_rotation_and_its_owner() {
        let old = PoolSigningKey::generate().unwrap();
        let keys = PoolKeys { current: PoolSigningKey::generate().unwrap(), previous: Some(old.clone()) };
        let secret = secret_for(&pool("u1"), &keys, Some("2026-12"));
        let back = parse(&secret).unwrap();
        assert_eq!(back.public(), keys.public());
        assert_eq!(back.public().current(), Some(&keys.current.public()));
        assert!(check_owner(&secret, &pool("u1")).is_ok());
        // A pool of the same name made later (another UID) does not own it.
        assert!(matches!(check_owner(&secret, &pool("u2")), Err(Error::KeyNotOwned { .. })));
        let mut stranger = secret.clone();
        stranger.metadata.owner_references = None;
        assert!(!owned_by_uid(&stranger, "u1"));
    }

    #[test]
    fn credentials_are_signed_with_the_key_the_pod_holds() {
        let old = PoolSigningKey::generate().unwrap();
        let keys = PoolKeys { current: PoolSigningKey::generate().unwrap(), previous: Some(old.clone()) };
        assert_eq!(keys.signer_for(Some(&old.public().kid())).public(), old.public());
        assert_eq!(keys.signer_for(Some(&keys.kid())).public(), keys.current.public());
        // A pod of a key long gone, or one that says nothing: the current key.
        assert_eq!(keys.signer_for(Some("gone")).public(), keys.current.public());
        assert_eq!(keys.signer_for(None).public(), keys.current.public());
    }

    #[test]
    fn the_cache_forgets_after_a_while_and_for_another_pool_uid() {
        let cache = Keys::default();
        let key = ("ns".to_string(), "edge".to_string());
        let keys = PoolKeys { current: PoolSigningKey::generate().unwrap(), previous: None };
        cache.remember(key.clone(), "u1", Some(keys));
        assert!(cache.cached(&key, "u1").is_some());
        assert!(cache.cached(&key, "u2").is_none(), "a recreated pool reads its own Secret");
        cache.remember(key.clone(), "u1", None);
        assert!(cache.cached(&key, "u1").is_some_and(|e| e.keys.is_none()));
        for i in 0..CAPACITY + 10 {
            cache.remember(("ns".into(), format!("p{i}")), "u", None);
        }
        assert!(cache.cache.lock().unwrap().len() <= CAPACITY);
    }
}
