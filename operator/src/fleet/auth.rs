//! Who sent a report: the bearer token is checked with a TokenReview, and
//! the answer cached so a report a second per node costs no API call.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::Client;
use kube::api::{Api, PostParams};

/// The extras the API server adds to tokens bound to a pod (and its node).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

/// How long a review's answer is trusted.
const ACCEPTED_FOR: Duration = Duration::from_secs(60);
const REFUSED_FOR: Duration = Duration::from_secs(10);
const CAPACITY: usize = 10_000;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub username: String,
    /// The node of the pod the token is bound to, if it is bound to one.
    pub node: Option<String>,
    /// The token is bound to a pod (whether or not the node is named).
    pub pod_bound: bool,
}

/// Why a token is not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the token was not accepted: {0}")]
    Unauthenticated(String),
    #[error("TokenReview failed: {0}")]
    Review(String),
}

/// A review's answer, and until when it is trusted.
type Answer = (Result<Caller, AuthError>, Instant);

/// Reviewed tokens, bounded.
#[derive(Default)]
pub struct TokenCache {
    entries: Mutex<HashMap<String, Answer>>,
}

impl TokenCache {
    fn lookup(&self, token: &str) -> Option<Result<Caller, AuthError>> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let (answer, until) = entries.get(token)?;
        (Instant::now() < *until).then(|| answer.clone())
    }

    fn store(&self, token: &str, answer: Result<Caller, AuthError>) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if entries.len() >= CAPACITY {
            entries.retain(|_, (_, until)| *until > now);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        let ttl = if answer.is_ok() { ACCEPTED_FOR } else { REFUSED_FOR };
        entries.insert(token.to_owned(), (answer, now + ttl));
    }

    /// Who holds `token`, asking the API server when the cache has no answer.
    pub async fn authenticate(&self, client: &Client, token: &str, audience: &str) -> Result<Caller, AuthError> {
        if let Some(answer) = self.lookup(token) {
            return answer;
        }
        let answer = review(client, token, audience).await;
        // A failed review says nothing about the token: do not remember it.
        if !matches!(answer, Err(AuthError::Review(_))) {
            self.store(token, answer.clone());
        }
        answer
    }
}

async fn review(client: &Client, token: &str, audience: &str) -> Result<Caller, AuthError> {
    let api: Api<TokenReview> = Api::all(client.clone());
    let request = TokenReview {
        spec: TokenReviewSpec { token: Some(token.to_owned()), audiences: Some(vec![audience.to_owned()]) },
        ..Default::default()
    };
    let answer = api.create(&PostParams::default(), &request).await.map_err(|e| AuthError::Review(e.to_string()))?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        return Err(AuthError::Unauthenticated(status.error.unwrap_or_else(|| "not authenticated".into())));
    }
    let user = status.user.unwrap_or_default();
    let extra = |key: &str| user.extra.as_ref().and_then(|extra| extra.get(key)).and_then(|v| v.first()).cloned();
    let node = extra(NODE_NAME_EXTRA);
    let pod_bound = extra(POD_NAME_EXTRA).is_some() || node.is_some();
    Ok(Caller { username: user.username.clone().unwrap_or_default(), node, pod_bound })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_cached_and_bounded() {
        let cache = TokenCache::default();
        let caller = Caller { username: "u".into(), node: Some("n".into()), pod_bound: true };
        cache.store("t", Ok(caller.clone()));
        assert_eq!(cache.lookup("t"), Some(Ok(caller)));
        assert_eq!(cache.lookup("other"), None);
        for i in 0..CAPACITY + 5 {
            cache.store(&format!("k{i}"), Err(AuthError::Unauthenticated("no".into())));
        }
        assert!(cache.entries.lock().unwrap().len() <= CAPACITY);
    }
}
