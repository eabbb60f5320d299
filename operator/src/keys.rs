//! Each pool's Ed25519 session key, kept in a Secret the pool owns.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use kube::{Client, Resource, ResourceExt};
use tidepool_crds::WarmPool;
use tidepool_wire::token::PoolSigningKey;

use crate::error::{Error, Result};

const PRIVATE: &str = "private";
const PUBLIC: &str = "public";

/// The name of a pool's key Secret.
pub fn secret_name(pool: &str) -> String {
    format!("{pool}-session-key")
}

/// Pool keys, read once from their Secrets and then kept in memory by pool UID.
#[derive(Default)]
pub struct Keys {
    cache: Mutex<HashMap<String, PoolSigningKey>>,
}

impl Keys {
    /// The pool's key, from memory or its Secret; None when the Secret does not exist yet.
    pub async fn load(
        &self,
        client: &Client,
        namespace: &str,
        pool: &str,
        pool_uid: &str,
    ) -> Result<Option<PoolSigningKey>> {
        if let Some(key) = self.cached(pool_uid) {
            return Ok(Some(key));
        }
        let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let Some(secret) = secrets.get_opt(&secret_name(pool)).await? else {
            return Ok(None);
        };
        let key = parse(&secret)?;
        self.remember(pool_uid, &key);
        Ok(Some(key))
    }

    /// The pool's key, creating its Secret (owned by the pool) when missing.
    pub async fn ensure(&self, client: &Client, pool: &WarmPool) -> Result<PoolSigningKey> {
        let namespace = pool.namespace().ok_or(Error::Missing("WarmPool", "namespace"))?;
        let uid = pool.uid().ok_or(Error::Missing("WarmPool", "uid"))?;
        if let Some(key) = self.load(client, &namespace, &pool.name_any(), &uid).await? {
            return Ok(key);
        }
        let key = PoolSigningKey::generate()?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(secret_name(&pool.name_any())),
                namespace: Some(namespace.clone()),
                owner_references: pool.controller_owner_ref(&()).map(|r| vec![r]),
                labels: Some(BTreeMap::from([(crate::labels::POOL.to_string(), pool.name_any())])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([
                (PRIVATE.to_string(), ByteString(key.to_base64().into_bytes())),
                (PUBLIC.to_string(), ByteString(key.public().to_base64().into_bytes())),
            ])),
            ..Default::default()
        };
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(_) => {
                self.remember(&uid, &key);
                Ok(key)
            }
            // Made meanwhile (another pass, or before a restart): use that one.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let existing = secrets.get(&secret_name(&pool.name_any())).await?;
                let key = parse(&existing)?;
                self.remember(&uid, &key);
                Ok(key)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn cached(&self, pool_uid: &str) -> Option<PoolSigningKey> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner).get(pool_uid).cloned()
    }

    fn remember(&self, pool_uid: &str, key: &PoolSigningKey) {
        // The operator's rule for a poisoned lock: take it over (one insert
        // cannot leave the map half-changed).
        self.cache.lock().unwrap_or_else(PoisonError::into_inner).insert(pool_uid.to_string(), key.clone());
    }
}

fn parse(secret: &Secret) -> Result<PoolSigningKey> {
    let bytes = secret.data.as_ref().and_then(|d| d.get(PRIVATE)).ok_or_else(|| Error::Invalid {
        kind: "Secret",
        name: secret.name_any(),
        reason: format!("no `{PRIVATE}` key"),
    })?;
    Ok(PoolSigningKey::from_base64(&String::from_utf8_lossy(&bytes.0))?)
}
