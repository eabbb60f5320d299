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
//! - the **binding ticket** (`<key id>.<signature>`): a signature over the
//!   session id and one pod's name. A pod serves a client only if the ticket
//!   names that pod, so a pod serves only the session bound to it. A rebind
//!   hands out a new ticket.
//!
//! Every key has an id (a digest of its public half), which tokens and
//! tickets carry, so a pool's key can be rotated: pods hold the current and
//! the previous public key ([`PublicKeys`]) and check each credential with
//! the key it names.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

/// Separates session-token signatures from binding-ticket signatures, so
/// neither can be replayed as the other.
const SESSION_DOMAIN: &[u8] = b"tidepool/session-token/v1\0";
const BINDING_DOMAIN: &[u8] = b"tidepool/binding-ticket/v1\0";
const RELAY_DOMAIN: &[u8] = b"tidepool/relay-ticket/v1\0";
const RELAY_KEY_DOMAIN: &[u8] = b"tidepool/relay-key/v1\0";
const TUBE_DOMAIN: &[u8] = b"tidepool/tube-ticket/v1\0";

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
    #[error("signed by key {0}, which this pod does not hold")]
    UnknownKey(String),
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
    /// The highest probe tier a client may ask to start at (1 to 3); only
    /// the operator raises it. Escalation past it is the pod's own decision.
    #[serde(default = "first_tier")]
    pub tier: u8,
    /// The escalation rules the session's probe runs use, when not the
    /// pod's own: signed, so only the operator sets them (a monitor's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<ThresholdClaims>,
    /// The id of the key that signed the token; set by the signer.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kid: String,
}

fn first_tier() -> u8 {
    1
}

/// Escalation rules in whole units, as a token carries them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThresholdClaims {
    /// Tier 1 to 2: ICMP mean round trip above this (ms), loss above this
    /// (%), an HTTP probe's total above this (ms), a DNS lookup above this (ms).
    pub ping_ms: u32,
    pub loss_percent: u32,
    pub http_total_ms: u32,
    pub dns_ms: u32,
    /// Tier 2 to 3: a bandwidth sample below this (kbit/s), jitter above
    /// this (ms), more hops than this, a certificate with fewer days left.
    pub bandwidth_kbps: u32,
    pub jitter_ms: u32,
    pub hops: u32,
    pub cert_days: u32,
}

impl Default for ThresholdClaims {
    /// The performance platform's rules (docs/probes.md#escalation).
    fn default() -> Self {
        Self {
            ping_ms: 100,
            loss_percent: 5,
            http_total_ms: 2_000,
            dns_ms: 1_000,
            bandwidth_kbps: 10_000,
            jitter_ms: 50,
            hops: 20,
            cert_days: 7,
        }
    }
}

/// What a tube ticket says: the operator's word to a pod that it may
/// terminate this tube, and what the tube may reach. The pod takes the
/// kind and the target from here, never from the request's body, so only
/// the Tube's spec (which the operator read) decides them. Times are Unix
/// seconds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TubeClaims {
    /// The Tube's UID.
    pub tube: String,
    /// The Tube's namespace and name, for the pod's logs and metrics.
    pub ns: String,
    pub name: String,
    /// The pod that terminates it.
    pub pod: String,
    /// `tunnel` (only `target` may be dialled) or `socks5`.
    pub kind: String,
    /// A tunnel's target, `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The pool's tube allowlist when the ticket was signed: a JSON array
    /// of egress rules (`spec.tubes.allow`).
    pub allow: String,
    /// Seconds with no connection open and no byte carried before the pod
    /// closes the tube.
    pub idle: u64,
    /// When the ticket stops being accepted (a few minutes after signing:
    /// the operator signs one for each call).
    pub exp: u64,
    /// The id of the key that signed the ticket; set by the signer.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kid: String,
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

    /// Signs a session token, naming this key in it.
    pub fn sign_session(&self, claims: &SessionClaims) -> String {
        let claims = SessionClaims { kid: self.public().kid(), ..claims.clone() };
        // Serialising a plain struct of strings and integers cannot fail.
        let payload = serde_json::to_vec(&claims).unwrap_or_default();
        let signature = self.0.sign(&[SESSION_DOMAIN, &payload].concat());
        format!("{}.{}", B64.encode(&payload), B64.encode(signature.to_bytes()))
    }

    /// Signs a binding ticket: session `sid` is served by pod `pod`.
    pub fn sign_binding(&self, sid: &str, pod: &str) -> String {
        let signature = B64.encode(self.0.sign(&binding_message(sid, pod)).to_bytes());
        format!("{}.{signature}", self.public().kid())
    }

    /// Signs a relay ticket: its holder may speak for session `sid`'s
    /// clients to pod `pod` (name their addresses, relay their datagrams).
    /// The operator gives it only to callers allowed to relay: the gateway.
    pub fn sign_relay(&self, sid: &str, pod: &str) -> String {
        let signature = B64.encode(self.0.sign(&relay_message(sid, pod)).to_bytes());
        format!("{}.{signature}", self.public().kid())
    }

    /// Signs a tube ticket, naming this key in it.
    pub fn sign_tube(&self, claims: &TubeClaims) -> String {
        let claims = TubeClaims { kid: self.public().kid(), ..claims.clone() };
        // Serialising a plain struct of strings and integers cannot fail.
        let payload = serde_json::to_vec(&claims).unwrap_or_default();
        let signature = self.0.sign(&[TUBE_DOMAIN, &payload].concat());
        format!("{}.{}", B64.encode(&payload), B64.encode(signature.to_bytes()))
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

    /// The key's id: the first 6 bytes of the SHA-256 of its bytes, in hex
    /// (12 characters). Hex, because pods carry it as a label value, which
    /// may not begin or end with base64url's `-` or `_`.
    pub fn kid(&self) -> String {
        use sha2::Digest;
        sha2::Sha256::digest(self.0.to_bytes())[..6].iter().map(|b| format!("{b:02x}")).collect()
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
        let (_, signature) = split_ticket(ticket);
        let signature = decode_signature(signature)?;
        self.0.verify_strict(&binding_message(sid, pod), &signature).map_err(|_| TokenError::BadSignature)
    }

    /// Checks that `ticket` lets its holder relay for session `sid` at pod `pod`.
    pub fn verify_relay(&self, ticket: &str, sid: &str, pod: &str) -> Result<(), TokenError> {
        let (_, signature) = split_ticket(ticket);
        let signature = decode_signature(signature)?;
        self.0.verify_strict(&relay_message(sid, pod), &signature).map_err(|_| TokenError::BadSignature)
    }

    /// Checks a tube ticket's signature and expiry (`now` in Unix seconds)
    /// and returns its claims.
    pub fn verify_tube(&self, ticket: &str, now: u64) -> Result<TubeClaims, TokenError> {
        let (payload, signature) = ticket.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = B64.decode(payload).map_err(|_| TokenError::Malformed)?;
        let signature = decode_signature(signature)?;
        self.0.verify_strict(&[TUBE_DOMAIN, &payload].concat(), &signature).map_err(|_| TokenError::BadSignature)?;
        let claims: TubeClaims = serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
        if claims.exp <= now {
            return Err(TokenError::Expired { expired_at: claims.exp, now });
        }
        Ok(claims)
    }
}

/// The public keys a pod accepts: the pool's current one and, while a
/// rotation goes on, the previous one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKeys(Vec<PoolPublicKey>);

impl PublicKeys {
    pub fn new(keys: Vec<PoolPublicKey>) -> Self {
        Self(keys)
    }

    /// From their base64url forms, separated by commas (as the pod's
    /// environment carries them), current first.
    pub fn from_base64_list(text: &str) -> Result<Self, TokenError> {
        let keys = text.split(',').map(str::trim).filter(|k| !k.is_empty()).map(PoolPublicKey::from_base64);
        let keys = keys.collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() { Err(TokenError::BadKey) } else { Ok(Self(keys)) }
    }

    /// The comma-separated base64url forms, current first.
    pub fn to_base64_list(&self) -> String {
        self.0.iter().map(PoolPublicKey::to_base64).collect::<Vec<_>>().join(",")
    }

    /// The current key.
    pub fn current(&self) -> Option<&PoolPublicKey> {
        self.0.first()
    }

    fn by_kid(&self, kid: &str) -> Result<&PoolPublicKey, TokenError> {
        self.0.iter().find(|k| k.kid() == kid).ok_or_else(|| TokenError::UnknownKey(kid.chars().take(16).collect()))
    }

    /// Checks a session token with the key it names (see
    /// [`PoolPublicKey::verify_session`]).
    pub fn verify_session(&self, token: &str, now: u64) -> Result<SessionClaims, TokenError> {
        let kid = PoolPublicKey::unverified_claims(token)?.kid;
        self.by_kid(&kid)?.verify_session(token, now)
    }

    /// Checks a binding ticket with the key it names.
    pub fn verify_binding(&self, ticket: &str, sid: &str, pod: &str) -> Result<(), TokenError> {
        let (kid, _) = split_ticket(ticket);
        self.by_kid(kid.ok_or(TokenError::Malformed)?)?.verify_binding(ticket, sid, pod)
    }

    /// Checks a relay ticket with the key it names.
    pub fn verify_relay(&self, ticket: &str, sid: &str, pod: &str) -> Result<(), TokenError> {
        let (kid, _) = split_ticket(ticket);
        self.by_kid(kid.ok_or(TokenError::Malformed)?)?.verify_relay(ticket, sid, pod)
    }

    /// Checks a tube ticket with the key it names.
    pub fn verify_tube(&self, ticket: &str, now: u64) -> Result<TubeClaims, TokenError> {
        let (payload, _) = ticket.split_once('.').ok_or(TokenError::Malformed)?;
        let payload = B64.decode(payload).map_err(|_| TokenError::Malformed)?;
        let claims: TubeClaims = serde_json::from_slice(&payload).map_err(|_| TokenError::Malformed)?;
        self.by_kid(&claims.kid)?.verify_tube(ticket, now)
    }
}

impl From<PoolPublicKey> for PublicKeys {
    fn from(key: PoolPublicKey) -> Self {
        Self(vec![key])
    }
}

/// A ticket's key id (when it names one) and signature.
fn split_ticket(ticket: &str) -> (Option<&str>, &str) {
    match ticket.split_once('.') {
        Some((kid, signature)) => (Some(kid), signature),
        None => (None, ticket),
    }
}

/// The session id is length-prefixed so that no (sid, pod) pair can be read as another.
fn binding_message(sid: &str, pod: &str) -> Vec<u8> {
    let sid_len = (sid.len() as u32).to_be_bytes();
    [BINDING_DOMAIN, &sid_len, sid.as_bytes(), pod.as_bytes()].concat()
}

fn relay_message(sid: &str, pod: &str) -> Vec<u8> {
    let sid_len = (sid.len() as u32).to_be_bytes();
    [RELAY_DOMAIN, &sid_len, sid.as_bytes(), pod.as_bytes()].concat()
}

/// The key that authenticates relayed datagrams between the gateway and
/// the pod: SHA-256 of the relay ticket's signature. Both ends hold the
/// ticket (Ed25519 signs deterministically, so every gateway replica gets
/// the same one from the operator) and nobody else does, so no secret has
/// to be stored or passed around. `None` for a ticket that does not parse.
pub fn relay_key(ticket: &str) -> Option<[u8; 32]> {
    use sha2::Digest;
    let (_, signature) = split_ticket(ticket);
    let signature = B64.decode(signature).ok().filter(|s| s.len() == 64)?;
    Some(sha2::Sha256::digest([RELAY_KEY_DOMAIN, &signature].concat()).into())
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
            tier: 1,
            thresholds: None,
            kid: String::new(),
        }
    }

    #[test]
    fn probes_digest_is_hex_sha256_and_none_when_empty() {
        let digest = probes_digest(b"[]", false).unwrap();
        assert_eq!(digest, "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945");
        assert_eq!(probes_digest(b"[]", true), None);
    }

    #[test]
    fn a_token_round_trips_through_the_public_key_and_names_it() {
        let key = PoolSigningKey::generate().unwrap();
        let token = key.sign_session(&claims());
        let kid = key.public().kid();
        assert_eq!(kid.len(), 12);
        assert_eq!(key.public().verify_session(&token, 1_000).unwrap(), SessionClaims { kid, ..claims() });
    }

    #[test]
    fn during_a_rotation_both_keys_are_accepted_and_each_only_for_its_own() {
        let old = PoolSigningKey::generate().unwrap();
        let new = PoolSigningKey::generate().unwrap();
        let both = PublicKeys::from_base64_list(&format!("{},{}", new.public().to_base64(), old.public().to_base64()))
            .unwrap();
        assert_eq!(both.current(), Some(&new.public()));
        for key in [&old, &new] {
            let token = key.sign_session(&claims());
            assert_eq!(both.verify_session(&token, 0).unwrap().kid, key.public().kid());
            assert_eq!(both.verify_binding(&key.sign_binding("sid-1", "pod"), "sid-1", "pod"), Ok(()));
        }
        // After the rotation ends, the old key's credentials are refused by id.
        let new_only = PublicKeys::new(vec![new.public()]);
        let stale = old.sign_session(&claims());
        assert!(matches!(new_only.verify_session(&stale, 0), Err(TokenError::UnknownKey(_))));
        assert!(matches!(
            new_only.verify_binding(&old.sign_binding("s", "p"), "s", "p"),
            Err(TokenError::UnknownKey(_))
        ));
        // A token that names the new key but carries the old one's signature is refused.
        let (payload, _) =
            new.sign_session(&claims()).split_once('.').map(|(a, b)| (a.to_string(), b.to_string())).unwrap();
        let (_, old_signature) = stale.split_once('.').unwrap();
        assert_eq!(both.verify_session(&format!("{payload}.{old_signature}"), 0), Err(TokenError::BadSignature));
        assert_eq!(both.to_base64_list(), format!("{},{}", new.public().to_base64(), old.public().to_base64()));
        assert!(PublicKeys::from_base64_list(" , ").is_err());
    }

    fn tube_claims() -> TubeClaims {
        TubeClaims {
            tube: "tube-uid".into(),
            ns: "default".into(),
            name: "db".into(),
            pod: "edge-abc".into(),
            kind: "tunnel".into(),
            target: Some("db.default.svc:5432".into()),
            allow: r#"[{"host":"db.default.svc"}]"#.into(),
            idle: 600,
            exp: 2_000,
            kid: String::new(),
        }
    }

    #[test]
    fn a_tube_ticket_is_accepted_only_whole_in_time_and_as_itself() {
        let key = PoolSigningKey::generate().unwrap();
        let keys = PublicKeys::new(vec![key.public()]);
        let ticket = key.sign_tube(&tube_claims());
        assert_eq!(keys.verify_tube(&ticket, 1_000).unwrap(), TubeClaims { kid: key.public().kid(), ..tube_claims() });
        assert!(matches!(keys.verify_tube(&ticket, 2_000), Err(TokenError::Expired { .. })));
        // Its claims changed under the signature: refused.
        let (_, signature) = ticket.split_once('.').unwrap();
        let mut wider = TubeClaims { kind: "socks5".into(), target: None, ..tube_claims() };
        wider.kid = key.public().kid();
        let forged = format!("{}.{signature}", B64.encode(serde_json::to_vec(&wider).unwrap()));
        assert_eq!(keys.verify_tube(&forged, 1_000), Err(TokenError::BadSignature));
        // A session token is not a tube ticket, nor the other way round.
        let session = key.sign_session(&claims());
        assert!(keys.verify_tube(&session, 1_000).is_err());
        assert!(keys.verify_session(&ticket, 1_000).is_err());
        // Another pool's key is unknown here.
        let other = PoolSigningKey::generate().unwrap().sign_tube(&tube_claims());
        assert!(matches!(keys.verify_tube(&other, 1_000), Err(TokenError::UnknownKey(_))));
        assert_eq!(keys.verify_tube("no-dot", 0), Err(TokenError::Malformed));
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
        let ticket = key.sign_binding("4f6c-uid", "alice");
        assert!(key.public().verify_session(&ticket, 0).is_err());
    }

    #[test]
    fn a_relay_ticket_is_its_own_kind_and_binds_one_session_to_one_pod() {
        let key = PoolSigningKey::generate().unwrap();
        let keys = PublicKeys::from(key.public());
        let relay = key.sign_relay("4f6c-uid", "alice");
        assert_eq!(keys.verify_relay(&relay, "4f6c-uid", "alice"), Ok(()));
        assert_eq!(keys.verify_relay(&relay, "4f6c-uid", "bob"), Err(TokenError::BadSignature));
        assert_eq!(keys.verify_relay(&relay, "other-uid", "alice"), Err(TokenError::BadSignature));
        // A binding ticket (which session owners get) does not relay, nor the reverse.
        let binding = key.sign_binding("4f6c-uid", "alice");
        assert_eq!(keys.verify_relay(&binding, "4f6c-uid", "alice"), Err(TokenError::BadSignature));
        assert_eq!(keys.verify_binding(&relay, "4f6c-uid", "alice"), Err(TokenError::BadSignature));
        let other = PoolSigningKey::generate().unwrap().sign_relay("4f6c-uid", "alice");
        assert!(keys.verify_relay(&other, "4f6c-uid", "alice").is_err());
        assert_eq!(keys.verify_relay("garbage", "4f6c-uid", "alice"), Err(TokenError::Malformed));
    }

    #[test]
    fn both_ends_of_a_relay_derive_one_key_and_another_ticket_another() {
        let key = PoolSigningKey::generate().unwrap();
        let ticket = key.sign_relay("4f6c-uid", "alice");
        // Signed again (another gateway replica asking): the same ticket, the same key.
        assert_eq!(key.sign_relay("4f6c-uid", "alice"), ticket);
        let derived = relay_key(&ticket).unwrap();
        assert_eq!(relay_key(&ticket), Some(derived));
        assert_ne!(relay_key(&key.sign_relay("4f6c-uid", "bob")), Some(derived));
        assert_eq!(relay_key("kid.not-base64!"), None);
        assert_eq!(relay_key("kid.c2hvcnQ"), None);
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

/// Tokens and tickets arrive from anyone; whatever the bytes, checking them
/// answers an error and never panics, and no change to a signed credential
/// is accepted.
#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn key(seed: u8) -> PoolSigningKey {
        PoolSigningKey::from_base64(&B64.encode([seed; 32])).unwrap()
    }

    fn claims() -> impl Strategy<Value = SessionClaims> {
        ("[a-z0-9-]{1,36}", "[a-z0-9-]{1,20}", "[a-z0-9-]{1,40}", "[a-z0-9-]{1,20}", 1u64..u64::MAX / 2, 1u8..=3)
            .prop_map(|(sid, ns, name, pool, exp, tier)| SessionClaims {
                sid,
                ns,
                name,
                pool,
                profile: "latency".into(),
                exp,
                probes: None,
                tier,
                thresholds: None,
                kid: String::new(),
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn any_text_is_refused_without_panic(text in "\\PC{0,200}", sid in "\\PC{0,40}", pod in "\\PC{0,40}") {
            let keys = PublicKeys::new(vec![key(1).public()]);
            prop_assert!(keys.verify_session(&text, 0).is_err());
            prop_assert!(keys.verify_binding(&text, &sid, &pod).is_err());
            prop_assert!(keys.verify_tube(&text, 0).is_err());
            let _ = PoolPublicKey::unverified_claims(&text);
            let _ = PublicKeys::from_base64_list(&text);
            let _ = PoolSigningKey::from_base64(&text);
        }

        #[test]
        fn a_signed_token_verifies_and_any_changed_byte_does_not(claims in claims(), at in any::<prop::sample::Index>(), to in any::<u8>()) {
            let signer = key(2);
            let keys = PublicKeys::new(vec![key(3).public(), signer.public()]);
            let token = signer.sign_session(&claims);
            let verified = keys.verify_session(&token, 0).unwrap();
            prop_assert_eq!(&verified, &SessionClaims { kid: signer.public().kid(), ..claims.clone() });
            let mut changed = token.clone().into_bytes();
            let i = at.index(changed.len());
            prop_assume!(changed[i] != to);
            changed[i] = to;
            if let Ok(changed) = String::from_utf8(changed) {
                // Base64 padding bits can change without changing the bytes
                // they carry; what matters is that the claims are the same.
                if let Ok(accepted) = keys.verify_session(&changed, 0) {
                    prop_assert_eq!(accepted, verified);
                }
            }
        }

        #[test]
        fn a_token_from_another_key_or_past_its_expiry_is_refused(claims in claims()) {
            let token = key(4).sign_session(&claims);
            let keys = PublicKeys::new(vec![key(5).public()]);
            prop_assert!(matches!(keys.verify_session(&token, 0), Err(TokenError::UnknownKey(_))));
            let own = PublicKeys::new(vec![key(4).public()]);
            prop_assert!(
                matches!(own.verify_session(&token, claims.exp), Err(TokenError::Expired { .. })),
                "a token is dead at its expiry second"
            );
        }

        #[test]
        fn a_key_id_is_a_label_value(seed in any::<[u8; 32]>()) {
            let kid = PoolSigningKey::from_base64(&B64.encode(seed)).unwrap().public().kid();
            prop_assert_eq!(kid.len(), 12);
            prop_assert!(kid.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{}", kid);
        }

        #[test]
        fn a_ticket_binds_exactly_one_session_to_one_pod(sid in "[a-z0-9-]{1,36}", pod in "[a-z0-9-]{1,63}", other in "[a-z0-9-]{1,63}") {
            let signer = key(6);
            let keys = PublicKeys::new(vec![signer.public()]);
            let ticket = signer.sign_binding(&sid, &pod);
            prop_assert_eq!(keys.verify_binding(&ticket, &sid, &pod), Ok(()));
            if other != pod {
                prop_assert!(keys.verify_binding(&ticket, &sid, &other).is_err());
            }
            if other != sid {
                prop_assert!(keys.verify_binding(&ticket, &other, &pod).is_err());
            }
        }
    }
}
