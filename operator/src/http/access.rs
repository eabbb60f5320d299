//! Who may call the session and route API, as kube-rbac-proxy decides: the
//! caller's bearer token is checked with a TokenReview, and what it may do
//! with a SubjectAccessReview (`create`, `get` or `delete` on `testsessions`
//! in the session's namespace; `get` on `backends` for routing). Both
//! answers are cached, bounded and briefly, and tokens are kept only as
//! digests. A static token is an opt-in for small setups, and may act only
//! in the namespaces it is given.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use kube::Client;
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use tidepool_crds::GROUP;

use crate::ttl_cache::TtlCache;

/// How long an accepted token or an allowed request is trusted.
const ALLOWED_FOR: Duration = Duration::from_secs(60);
/// How long a refused token or a denied request is trusted.
const DENIED_FOR: Duration = Duration::from_secs(10);
/// Entries each cache keeps at most.
const CAPACITY: usize = 10_000;

/// A static token, and the namespaces it may act in.
#[derive(Clone, Debug)]
pub struct StaticToken {
    pub token: String,
    pub namespaces: Vec<String>,
}

/// A Kubernetes identity, as a TokenReview gives it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: BTreeMap<String, Vec<String>>,
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The holder of the static token.
    Static,
    User(Arc<Identity>),
}

impl Caller {
    /// The name sessions record as their creator.
    pub fn name(&self) -> &str {
        match self {
            Self::Static => "static-token",
            Self::User(identity) => &identity.username,
        }
    }
}

/// What a request asks to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask<'a> {
    /// `verb` on TestSessions in `namespace` (one named, or any).
    Sessions { verb: &'static str, namespace: &'a str, name: Option<&'a str> },
    /// Routing a client: reading Backends.
    Route,
    /// Speaking for sessions' clients to their pods (naming the client's
    /// address, relaying its UDP echo): `create` on `testsessions/relay`,
    /// which only the gateway is given.
    Relay { namespace: &'a str },
    /// `verb` on Tubes in `namespace` (one named, or any).
    Tubes { verb: &'static str, namespace: &'a str, name: Option<&'a str> },
}

/// Why a caller was turned away.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("a bearer token is required")]
    NoToken,
    #[error("the bearer token was not accepted")]
    BadToken,
    #[error("{0}")]
    Forbidden(String),
    #[error("the Kubernetes API could not check the caller; retry")]
    Unavailable,
}

impl Denied {
    /// The bounded metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoToken => "no_token",
            Self::BadToken => "bad_token",
            Self::Forbidden(_) => "forbidden",
            Self::Unavailable => "review_failed",
        }
    }
}

type Digest32 = [u8; 32];

/// A decision cached per identity and request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct DecisionKey {
    identity: Arc<Identity>,
    verb: &'static str,
    resource: &'static str,
    subresource: Option<&'static str>,
    namespace: Option<String>,
    name: Option<String>,
}

/// What a SubjectAccessReview asks about.
struct Target<'a> {
    resource: &'a str,
    subresource: Option<&'a str>,
    namespace: Option<&'a str>,
    name: Option<&'a str>,
}

/// The access checks and their caches.
pub struct Access {
    client: Client,
    static_token: Option<StaticToken>,
    /// Accepted tokens (by digest) and refused ones, apart: a flood of bad
    /// tokens cannot push the good ones out.
    accepted: Mutex<TtlCache<Digest32, Arc<Identity>>>,
    refused: Mutex<TtlCache<Digest32, ()>>,
    decisions: Mutex<TtlCache<DecisionKey, bool>>,
}

fn digest(token: &str) -> Digest32 {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares without an early exit, so the time taken says nothing of the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Access {
    pub fn new(client: Client, static_token: Option<StaticToken>) -> Self {
        Self {
            client,
            static_token,
            accepted: Mutex::new(TtlCache::new(CAPACITY)),
            refused: Mutex::new(TtlCache::new(CAPACITY)),
            decisions: Mutex::new(TtlCache::new(CAPACITY)),
        }
    }

    /// Who holds `bearer` (the `Authorization` header's token).
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, Denied> {
        let token = bearer.map(str::trim).filter(|t| !t.is_empty()).ok_or(Denied::NoToken)?;
        if let Some(static_token) = &self.static_token
            && constant_time_eq(token.as_bytes(), static_token.token.as_bytes())
        {
            return Ok(Caller::Static);
        }
        // Anything that is not a JWT (three base64url parts) is refused
        // without asking the API server.
        let looks_like_a_jwt = token.len() <= 16 * 1024
            && token.split('.').count() == 3
            && token.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !looks_like_a_jwt {
            return Err(Denied::BadToken);
        }
        let key = digest(token);
        let now = Instant::now();
        let accepted = lock(&self.accepted).get(&key, now);
        if let Some(identity) = accepted {
            return Ok(Caller::User(identity));
        }
        let refused = lock(&self.refused).get(&key, now).is_some();
        if refused {
            return Err(Denied::BadToken);
        }
        match self.review_token(token).await {
            Ok(Some(identity)) => {
                let identity = Arc::new(identity);
                lock(&self.accepted).insert(key, identity.clone(), ALLOWED_FOR, Instant::now());
                Ok(Caller::User(identity))
            }
            Ok(None) => {
                lock(&self.refused).insert(key, (), DENIED_FOR, Instant::now());
                Err(Denied::BadToken)
            }
            Err(e) => {
                tracing::warn!(error = %e, "TokenReview failed");
                Err(Denied::Unavailable)
            }
        }
    }

    /// Whether `caller` may do what `ask` says.
    pub async fn authorize(&self, caller: &Caller, ask: Ask<'_>) -> Result<(), Denied> {
        let identity = match caller {
            Caller::Static => return self.static_may(ask),
            Caller::User(identity) => identity.clone(),
        };
        let (verb, resource, subresource, namespace, name) = match ask {
            Ask::Sessions { verb, namespace, name } => (verb, "testsessions", None, Some(namespace), name),
            Ask::Route => ("get", "backends", None, None, None),
            Ask::Relay { namespace } => ("create", "testsessions", Some("relay"), Some(namespace), None),
            Ask::Tubes { verb, namespace, name } => (verb, "tubes", None, Some(namespace), name),
        };
        let key = DecisionKey {
            identity: identity.clone(),
            verb,
            resource,
            subresource,
            namespace: namespace.map(String::from),
            name: name.map(String::from),
        };
        // Looked up first, so no lock is held across the review below.
        let cached = lock(&self.decisions).get(&key, Instant::now());
        let allowed = match cached {
            Some(allowed) => allowed,
            None => {
                let target = Target { resource, subresource, namespace, name };
                let allowed = self.review_access(&identity, verb, target).await.map_err(|e| {
                    tracing::warn!(error = %e, "SubjectAccessReview failed");
                    Denied::Unavailable
                })?;
                let ttl = if allowed { ALLOWED_FOR } else { DENIED_FOR };
                lock(&self.decisions).insert(key, allowed, ttl, Instant::now());
                allowed
            }
        };
        if allowed {
            return Ok(());
        }
        let resource = match subresource {
            Some(sub) => format!("{resource}.{GROUP}/{sub}"),
            None => format!("{resource}.{GROUP}"),
        };
        Err(Denied::Forbidden(match namespace {
            Some(ns) => format!("{} may not {verb} {resource} in namespace {ns}", identity.username),
            None => format!("{} may not {verb} {resource}", identity.username),
        }))
    }

    fn static_may(&self, ask: Ask<'_>) -> Result<(), Denied> {
        let namespaces = self.static_token.as_ref().map(|t| t.namespaces.as_slice()).unwrap_or_default();
        match ask {
            Ask::Route => Ok(()),
            // The static token's holder runs the small setup, gateway included.
            Ask::Relay { namespace } | Ask::Sessions { namespace, .. } | Ask::Tubes { namespace, .. }
                if namespaces.iter().any(|n| n == namespace) =>
            {
                Ok(())
            }
            Ask::Relay { namespace } | Ask::Sessions { namespace, .. } | Ask::Tubes { namespace, .. } => {
                Err(Denied::Forbidden(format!("the static token may not act in namespace {namespace}")))
            }
        }
    }

    async fn review_token(&self, token: &str) -> Result<Option<Identity>, kube::Error> {
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: None },
            ..Default::default()
        };
        let status = api.create(&PostParams::default(), &review).await?.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Ok(None);
        }
        let user = status.user.unwrap_or_default();
        Ok(Some(Identity {
            username: user.username.unwrap_or_default(),
            uid: user.uid.unwrap_or_default(),
            groups: user.groups.unwrap_or_default(),
            extra: user.extra.unwrap_or_default(),
        }))
    }

    async fn review_access(&self, identity: &Identity, verb: &str, target: Target<'_>) -> Result<bool, kube::Error> {
        let Target { resource, subresource, namespace, name } = target;
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(identity.username.clone()),
                uid: Some(identity.uid.clone()).filter(|u| !u.is_empty()),
                groups: Some(identity.groups.clone()),
                extra: Some(identity.extra.clone()).filter(|e| !e.is_empty()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(GROUP.into()),
                    resource: Some(resource.into()),
                    subresource: subresource.map(String::from),
                    verb: Some(verb.into()),
                    namespace: namespace.map(String::from),
                    name: name.map(String::from),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let status = api.create(&PostParams::default(), &review).await?.status.unwrap_or_default();
        Ok(status.allowed && status.denied != Some(true))
    }
}

/// The operator's rule for a poisoned lock: take it over (each cache
/// operation leaves the map whole).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offline() -> Access {
        // A client that is never reached: the cases below decide before any call.
        let config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        let client = Client::try_from(config).unwrap();
        Access::new(client, Some(StaticToken { token: "s3cret-static".into(), namespaces: vec!["team-a".into()] }))
    }

    #[tokio::test]
    async fn a_missing_or_malformed_token_is_refused_without_asking_anyone() {
        let access = offline();
        assert_eq!(access.authenticate(None).await, Err(Denied::NoToken));
        assert_eq!(access.authenticate(Some("  ")).await, Err(Denied::NoToken));
        for junk in ["nope", "a.b", "a.b.c.d", "<script>.x.y", &"x.y.".repeat(10_000)] {
            assert_eq!(access.authenticate(Some(junk)).await, Err(Denied::BadToken), "{junk:.20}");
        }
    }

    #[tokio::test]
    async fn the_static_token_acts_only_in_its_namespaces() {
        let access = offline();
        let caller = access.authenticate(Some("s3cret-static")).await.unwrap();
        assert_eq!(caller, Caller::Static);
        let create = |namespace| Ask::Sessions { verb: "create", namespace, name: None };
        assert_eq!(access.authorize(&caller, create("team-a")).await, Ok(()));
        assert!(matches!(access.authorize(&caller, create("kube-system")).await, Err(Denied::Forbidden(_))));
        assert_eq!(access.authorize(&caller, Ask::Route).await, Ok(()));
        assert_eq!(access.authorize(&caller, Ask::Relay { namespace: "team-a" }).await, Ok(()));
        let elsewhere = Ask::Relay { namespace: "kube-system" };
        assert!(matches!(access.authorize(&caller, elsewhere).await, Err(Denied::Forbidden(_))));
        // A token that differs from the static one is not it, however close.
        assert!(access.authenticate(Some("s3cret-statiC")).await.is_err());
    }

    #[tokio::test]
    async fn a_cached_answer_is_reused_and_a_refusal_is_kept_apart() {
        let access = offline();
        let token = "aaaa.bbbb.cccc";
        let identity = Arc::new(Identity {
            username: "system:serviceaccount:team-a:alice".into(),
            uid: "u".into(),
            groups: vec![],
            extra: BTreeMap::new(),
        });
        lock(&access.accepted).insert(digest(token), identity.clone(), ALLOWED_FOR, Instant::now());
        assert_eq!(access.authenticate(Some(token)).await, Ok(Caller::User(identity.clone())));
        lock(&access.refused).insert(digest("dddd.eeee.ffff"), (), DENIED_FOR, Instant::now());
        assert_eq!(access.authenticate(Some("dddd.eeee.ffff")).await, Err(Denied::BadToken));
        let key = DecisionKey {
            identity: identity.clone(),
            verb: "get",
            resource: "testsessions",
            subresource: None,
            namespace: Some("team-a".into()),
            name: Some("s1".into()),
        };
        lock(&access.decisions).insert(key, false, DENIED_FOR, Instant::now());
        let ask = Ask::Sessions { verb: "get", namespace: "team-a", name: Some("s1") };
        let denied = access.authorize(&Caller::User(identity), ask).await.unwrap_err();
        assert_eq!(
            denied.to_string(),
            "system:serviceaccount:team-a:alice may not get testsessions.tidepool.dev in namespace team-a"
        );
    }
}
