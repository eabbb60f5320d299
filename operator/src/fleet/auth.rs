//! Who sent a report: the bearer token is checked with a TokenReview, and
//! the answer cached so a report a second per node costs no API call.
//!
//! Hostile tokens cost little: one that is not a JWT naming the agents'
//! ServiceAccount and audience, and not expired, is refused without asking
//! the API server; accepted and refused answers are cached apart, each
//! bounded, so a flood of bad tokens cannot push the good ones out; and
//! TokenReviews for tokens not seen before are rationed.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::Client;
use kube::api::{Api, PostParams};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::ttl_cache::TtlCache;

/// The extras the API server adds to tokens bound to a pod (and its node).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";

/// How long a review's answer is trusted.
const ACCEPTED_FOR: Duration = Duration::from_secs(60);
const REFUSED_FOR: Duration = Duration::from_secs(10);
const CAPACITY: usize = 10_000;
/// TokenReviews of unseen tokens: this many a second, in bursts of twice that.
const REVIEWS_PER_SECOND: f64 = 20.0;

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
    #[error("too many new tokens to review just now; retry")]
    Busy,
}

/// Whose token may report, as the token itself must claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected<'a> {
    /// `system:serviceaccount:<namespace>:<name>`.
    pub subject: &'a str,
    pub audience: &'a str,
}

/// What a ServiceAccount token says of itself, unchecked.
#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    aud: Audience,
    exp: u64,
}

#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Audience {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Audience {
    fn contains(&self, audience: &str) -> bool {
        match self {
            Self::None => false,
            Self::One(one) => one == audience,
            Self::Many(many) => many.iter().any(|a| a == audience),
        }
    }
}

/// Whether `token` could be an agent's token at all: a JWT for the agents'
/// ServiceAccount and audience that has not expired at `now` (Unix seconds).
/// Its signature is the API server's to check; this only spares it the
/// tokens that cannot be.
pub fn plausible(token: &str, expected: &Expected<'_>, now: u64) -> Result<(), String> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("not a JWT".into());
    };
    if token.len() > 16 * 1024 {
        return Err("too long for a token".into());
    }
    let bytes = URL_SAFE_NO_PAD.decode(payload).map_err(|_| "its claims are not base64url".to_string())?;
    let claims: Claims = serde_json::from_slice(&bytes).map_err(|_| "its claims are not a token's".to_string())?;
    if claims.sub != expected.subject {
        return Err("it is not the agents' ServiceAccount's".into());
    }
    if !claims.aud.contains(expected.audience) {
        return Err(format!("it is not for audience {}", expected.audience));
    }
    if claims.exp <= now {
        return Err("it has expired".into());
    }
    Ok(())
}

type Digest32 = [u8; 32];

/// Reviewed tokens (by digest), accepted and refused apart, and the
/// ration of new reviews.
pub struct TokenCache {
    accepted: Mutex<TtlCache<Digest32, Caller>>,
    refused: Mutex<TtlCache<Digest32, String>>,
    reviews: Mutex<Bucket>,
}

impl Default for TokenCache {
    fn default() -> Self {
        Self {
            accepted: Mutex::new(TtlCache::new(CAPACITY)),
            refused: Mutex::new(TtlCache::new(CAPACITY)),
            reviews: Mutex::new(Bucket::new(REVIEWS_PER_SECOND, 2.0 * REVIEWS_PER_SECOND)),
        }
    }
}

/// A token bucket: `rate` a second, up to `burst`.
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Option<Instant>,
}

impl Bucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        Self { rate, burst, tokens: burst, at: None }
    }

    /// Takes one, if there is one at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        if let Some(at) = self.at {
            self.tokens = (self.tokens + now.saturating_duration_since(at).as_secs_f64() * self.rate).min(self.burst);
        }
        self.at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The operator's rule for a poisoned lock: take it over.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl TokenCache {
    /// Who holds `token`, asking the API server when the cache has no answer.
    pub async fn authenticate(
        &self,
        client: &Client,
        token: &str,
        expected: &Expected<'_>,
    ) -> Result<Caller, AuthError> {
        let unix_now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        plausible(token, expected, unix_now).map_err(AuthError::Unauthenticated)?;
        let key: Digest32 = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        let accepted = lock(&self.accepted).get(&key, now);
        if let Some(caller) = accepted {
            return Ok(caller);
        }
        let refused = lock(&self.refused).get(&key, now);
        if let Some(reason) = refused {
            return Err(AuthError::Unauthenticated(reason));
        }
        let may_review = lock(&self.reviews).take(now);
        if !may_review {
            return Err(AuthError::Busy);
        }
        let answer = review(client, token, expected.audience).await;
        match &answer {
            Ok(caller) => lock(&self.accepted).insert(key, caller.clone(), ACCEPTED_FOR, Instant::now()),
            Err(AuthError::Unauthenticated(reason)) => {
                lock(&self.refused).insert(key, reason.clone(), REFUSED_FOR, Instant::now());
            }
            // A failed review says nothing about the token: do not remember it.
            Err(_) => {}
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
    use proptest::prelude::*;

    const SUBJECT: &str = "system:serviceaccount:tidepool:tidepool-agent";

    fn expected() -> Expected<'static> {
        Expected { subject: SUBJECT, audience: "tidepool" }
    }

    fn jwt(claims: serde_json::Value) -> String {
        let part = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap());
        format!("{}.{}.c2ln", part(&serde_json::json!({ "alg": "RS256" })), part(&claims))
    }

    #[test]
    fn only_a_plausible_agent_token_is_worth_a_review() {
        let good = jwt(serde_json::json!({ "sub": SUBJECT, "aud": ["tidepool"], "exp": 2_000 }));
        assert_eq!(plausible(&good, &expected(), 1_000), Ok(()));
        let one_audience = jwt(serde_json::json!({ "sub": SUBJECT, "aud": "tidepool", "exp": 2_000 }));
        assert_eq!(plausible(&one_audience, &expected(), 1_000), Ok(()));
        let cases = [
            ("random", "x".repeat(40)),
            ("two parts", "a.b".into()),
            ("bad base64", "a.!!!.c".into()),
            ("not JSON", format!("a.{}.c", URL_SAFE_NO_PAD.encode(b"nope"))),
            (
                "someone else",
                jwt(serde_json::json!({ "sub": "system:serviceaccount:x:y", "aud": ["tidepool"], "exp": 2_000 })),
            ),
            ("another audience", jwt(serde_json::json!({ "sub": SUBJECT, "aud": ["kubernetes"], "exp": 2_000 }))),
            ("expired", jwt(serde_json::json!({ "sub": SUBJECT, "aud": ["tidepool"], "exp": 999 }))),
            ("huge", format!("a.{}.c", "A".repeat(20_000))),
        ];
        for (what, token) in cases {
            assert!(plausible(&token, &expected(), 1_000).is_err(), "{what}");
        }
    }

    #[test]
    fn reviews_of_new_tokens_are_rationed() {
        let start = Instant::now();
        let mut bucket = Bucket::new(2.0, 4.0);
        assert!((0..4).all(|_| bucket.take(start)));
        assert!(!bucket.take(start), "the burst is spent");
        assert!(bucket.take(start + Duration::from_millis(500)), "one more after half a second at 2/s");
        assert!(!bucket.take(start + Duration::from_millis(500)));
        assert!((0..4).all(|_| bucket.take(start + Duration::from_secs(60))), "it refills up to the burst");
        assert!(!bucket.take(start + Duration::from_secs(60)));
    }

    #[test]
    fn refusals_cannot_push_accepted_tokens_out() {
        let cache = TokenCache::default();
        let caller = Caller { username: SUBJECT.into(), node: Some("n".into()), pod_bound: true };
        let now = Instant::now();
        lock(&cache.accepted).insert([1; 32], caller.clone(), ACCEPTED_FOR, now);
        for i in 0..CAPACITY + 50 {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64).to_be_bytes());
            lock(&cache.refused).insert(key, "no".into(), REFUSED_FOR, now);
        }
        assert_eq!(lock(&cache.accepted).get(&[1; 32], now), Some(caller));
        assert!(lock(&cache.refused).len() <= CAPACITY);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn no_bytes_make_the_check_panic(token in "\\PC{0,300}") {
            let _ = plausible(&token, &expected(), 1_000);
        }

        #[test]
        fn no_claims_but_the_agents_pass(sub in "[a-z:-]{0,40}", aud in "[a-z]{0,10}", exp in 0u64..3_000) {
            let token = jwt(serde_json::json!({ "sub": sub, "aud": [aud.clone()], "exp": exp }));
            let passes = plausible(&token, &expected(), 1_000).is_ok();
            prop_assert_eq!(passes, sub == SUBJECT && aud == "tidepool" && exp > 1_000);
        }
    }
}
