//! Session tokens and binding tickets.
//!
//! Each WarmPool has an Ed25519 key pair. The operator keeps the private key
//! in a Secret and gives every pod of the pool the public key, so a pod can
//! check a client's credentials on its own, with no round trip.
//!
//! A client holds two things:
//! - the **session token** (`<claims>.<signature>`): who the session is, its
//!   profile and its expiry. It stays the same for the session's whole life,
//!   also when the session is rebound to a new pod.
//! - the **binding ticket**: a signature over the session id and one pod's
//!   name. A pod serves a client only if the ticket names that pod, so a pod
//!   serves only the session bound to it. A rebind hands out a new ticket.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Separates session-token signatures from binding-ticket signatures, so
/// neither can be replayed as the other.
const SESSION_DOMAIN: &[u8] = b"tidepool/session-token/v1\0";
const BINDING_DOMAIN: &[u8] = b"tidepool/binding-ticket/v1\0";

/// Why a credential was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is not of the form <claims>.<signature>")]
    Malformed,
    #[error("the signature does not match this pool's key")]
    BadSignature,
    #[error("the session expired at {expired_at} (now {now})")]
    Expired { expired_at: u64, now: u64 },
    #[error("the key is not a base64url Ed25519 key")]
    BadKey,
    #[error("no randomness for a new key: {0}")]
    Randomness(String),
}

/// What a session token says. Times are Unix seconds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct SessionClaims {
    /// The TestSession's UID.
    pub sid: String,
    /// The TestSession's namespace.
    pub ns: String,
    /// The TestSession's name.
    pub name: String,
    /// The WarmPool that serves it.
    pub pool: String,
    /// The test profile (`latency`, `speed`, ...).
    pub profile: String,
    /// When the session ends.
    pub exp: u64,
    /// The digest of the session's probe targets ([`probes_digest`]): the
    /// pod probes only these, whatever a client sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<String>,
}

/// The hex SHA-256 of the probe targets' compact JSON (`json`), or `None`
/// when there are no targets.
pub fn probes_digest(json: &[u8], empty: bool) -> Option<String> {
    use sha2::Digest;
    if empty {
        return None;
    }
    Some(sha2::Sha256::digest(json).iter().map(|b| format!("{b:02x}")).collect())
}

/// A pool's private key: signs session tokens and binding tickets.
#[derive(Clone)]
pub struct PoolSigningKey(SigningKey);

/// A pool's public key: what its pods verify with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolPublicKey(VerifyingKey);

impl PoolSigningKey {
    /// A fresh random key.
    pub fn generate() -> Result<Self, TokenError> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|e| TokenError::Randomness(e.to_string()))?;
        Ok(Self(SigningKey::from_bytes(&secret)))
    }

    /// The key from its base64url secret, as stored in the pool's Secret.
    pub fn from_base64(text: &str) -> Result<Self, TokenError> {
        let bytes: [u8; 32] = B64.decode(text.trim()).ok().and_then(|b| b.try_into().ok()).ok_or(TokenError::BadKey)?;
        Ok(Self(SigningKey::from_bytes(&bytes)))
    }

    /// The base64url secret, for the pool's Secret.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0.to_bytes())
    }

    /// The public half.
    pub fn public(&self) -> PoolPublicKey {
        PoolPublicKey(self.0.verifying_key())
    }

    /// Signs a session token.
    pub fn sign_session(&self, claims: &SessionClaims) -> String {
        // Serialising a plain struct of strings and integers cannot fail.
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let signature = self.0.sign(&[SESSION_DOMAIN, &payload].concat());
        format!("{}.{}", B64.encode(&payload), B64.encode(signature.to_bytes()))
    }

    /// Signs a binding ticket: session `sid` is served by pod `pod`.
    pub fn sign_binding(&self, sid: &str, pod: &str) -> String {
        B64.encode(self.0.sign(&binding_message(sid, pod)).to_bytes())
    }
}

impl std::fmt::Debug for PoolSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PoolSigningKey(<secret>)")
    }
}

impl PoolPublicKey {
    /// The key from its base64url form, as pods get it in their environment.
    pub fn from_base64(text: &str) -> Result<Self, TokenError> {
        let bytes: [u8; 32] = B64.decode(text.trim()).ok().and_then(|b| b.try_into().ok()).ok_or(TokenError::BadKey)?;
        VerifyingKey::from_bytes(&bytes).map(Self).map_err(|_| TokenError::BadKey)
    }

    /// The base64url form.
    pub fn to_base64(&self) -> String {
        B64.encode(self.0.to_bytes())
    }

    /// Checks a session token's signature and expiry (`now` in Unix seconds)
    /// and returns its claims.
    pub fn verify_session(&self, token: &str, now: u64) -> Result<SessionClaims, TokenError> {
        let (payload, signature) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = B64.decode(payload).map_err(|_| TokenError::Malformed)?;
        let signature = decode_signature(signature)?;
        self.0.verify_strict(&[SESSION_DOMAIN, &payload].concat(), &signature).map_err(|_| TokenError::BadSignature)?;
        let claims: SessionClaims = serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
        if claims.exp <= now {
            return Err(TokenError::Expired { expired_at: claims.exp, now });
        }
        Ok(claims)
    }

    /// What a token claims, signature unchecked: only for routing a request
    /// before the key to check it with is known. Never trust it alone.
    pub fn unverified_claims(token: &str) -> Result<SessionClaims, TokenError> {
        let (payload, _) = token.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = B64.decode(payload).map_err(|_| TokenError::Malformed)?;
        serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)
    }

    /// Checks that `ticket` binds session `sid` to pod `pod`.
    pub fn verify_binding(&self, ticket: &str, sid: &str, pod: &str) -> Result<(), TokenError> {
        let signature = decode_signature(ticket)?;
        self.0.verify_strict(&binding_message(sid, pod), &signature).map_err(|_| TokenError::BadSignature)
    }
}

/// The session id is length-prefixed so that no (sid, pod) pair can be read as another.
fn binding_message(sid: &str, pod: &str) -> Vec<u8> {
    let sid_len = (sid.len() as u32).to_be_bytes();
    [BINDING_DOMAIN, &sid_len, sid.as_bytes(), pod.as_bytes()].concat()
}

fn decode_signature(text: &str) -> Result<Signature, TokenError> {
    let bytes: [u8; 64] = B64.decode(text).ok().and_then(|b| b.try_into().ok()).ok_or(TokenError::Malformed)?;
    Ok(Signature::from_bytes(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> SessionClaims {
        SessionClaims {
            sid: "4f6c-uid".into(),
            ns: "default".into(),
            name: "alice".into(),
            pool: "edge".into(),
            profile: "latency".into(),
            exp: 2_000,
            probes: None,
        }
    }

    #[test]
    fn probes_digest_is_hex_sha256_and_none_when_empty() {
        let digest = probes_digest(b"[]", false).unwrap();
        assert_eq!(digest, "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945");
        assert_eq!(probes_digest(b"[]", true), None);
    }

    #[test]
    fn a_token_round_trips_through_the_public_key() {
        let key = PoolSigningKey::generate().unwrap();
        let token = key.sign_session(&claims());
        assert_eq!(key.public().verify_session(&token, 1_000).unwrap(), claims());
    }

    #[test]
    fn an_expired_token_is_refused() {
        let key = PoolSigningKey::generate().unwrap();
        let token = key.sign_session(&claims());
        assert_eq!(
            key.public().verify_session(&token, 2_000),
            Err(TokenError::Expired { expired_at: 2_000, now: 2_000 })
        );
    }

    #[test]
    fn another_pools_key_or_a_changed_claim_is_refused() {
        let key = PoolSigningKey::generate().unwrap();
        let other = PoolSigningKey::generate().unwrap();
        let token = key.sign_session(&claims());
        assert_eq!(other.public().verify_session(&token, 0), Err(TokenError::BadSignature));

        let (_, signature) = token.split_once('.').unwrap();
        let mut forged = claims();
        forged.exp = u64::MAX;
        let payload = B64.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(key.public().verify_session(&format!("{payload}.{signature}"), 0), Err(TokenError::BadSignature));
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let public = PoolSigningKey::generate().unwrap().public();
        for token in ["", ".", "abc", "a.b", "!!!.???", "e30.AAAA"] {
            assert_eq!(public.verify_session(token, 0), Err(TokenError::Malformed), "{token:?}");
        }
    }

    #[test]
    fn a_ticket_binds_one_session_to_one_pod() {
        let key = PoolSigningKey::generate().unwrap();
        let ticket = key.sign_binding("sid-1", "edge-abcde");
        let public = key.public();
        assert_eq!(public.verify_binding(&ticket, "sid-1", "edge-abcde"), Ok(()));
        assert_eq!(public.verify_binding(&ticket, "sid-1", "edge-zzzzz"), Err(TokenError::BadSignature));
        assert_eq!(public.verify_binding(&ticket, "sid-2", "edge-abcde"), Err(TokenError::BadSignature));
        // "a\0b" + "c" must not collide with "a" + "b\0c".
        assert_ne!(key.sign_binding("a\0b", "c"), key.sign_binding("a", "b\0c"));
    }

    #[test]
    fn a_session_token_is_not_a_binding_ticket() {
        let key = PoolSigningKey::generate().unwrap();
        let token = key.sign_session(&claims());
        let (_, signature) = token.split_once('.').unwrap();
        assert!(key.public().verify_binding(signature, "4f6c-uid", "alice").is_err());
    }

    #[test]
    fn keys_survive_their_text_forms() {
        let key = PoolSigningKey::generate().unwrap();
        let again = PoolSigningKey::from_base64(&key.to_base64()).unwrap();
        assert_eq!(again.public(), key.public());
        assert_eq!(PoolPublicKey::from_base64(&key.public().to_base64()).unwrap(), key.public());
        assert_eq!(PoolSigningKey::from_base64("short").unwrap_err(), TokenError::BadKey);
        assert!(!format!("{key:?}").contains(&key.to_base64()));
    }
}
