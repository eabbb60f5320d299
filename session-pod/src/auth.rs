//! Credentials: the session token and the binding ticket, from headers or
//! the query string, and the lock that makes the pod serve one session.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tidepool_protocol::relay::RelayKey;
use tidepool_wire::token::{PublicKeys, SessionClaims, TokenError, relay_key};

use crate::clock::unix_seconds;
use crate::connection::ClientAddr;
use crate::error::{ApiError, Reason};
use crate::session::BoundSession;
use crate::state::PodState;
use tidepool_protocol::{BINDING_HEADER, RELAY_HEADER};

/// Why a request's credentials were refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing session token: send `Authorization: Bearer <token>` or `?token=`")]
    MissingToken,
    #[error("missing binding ticket: send the `{BINDING_HEADER}` header or `?binding=`")]
    MissingTicket,
    #[error("session token refused: {0}")]
    Token(TokenError),
    #[error("the binding ticket does not bind session {sid} to pod {pod}")]
    Ticket { sid: String, pod: String },
    #[error("the session belongs to pool {session_pool}, this pod to pool {pod_pool}")]
    WrongPool { session_pool: String, pod_pool: String },
    #[error("this pod serves session {0}")]
    OtherSession(String),
    #[error("the relay ticket does not let its holder relay for session {sid} at pod {pod}")]
    Relay { sid: String, pod: String },
    #[error("a relayed request must name its client's address in X-Forwarded-For")]
    RelayedClient,
}

impl AuthError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingToken
            | Self::MissingTicket
            | Self::Token(TokenError::Expired { .. } | TokenError::Malformed) => StatusCode::UNAUTHORIZED,
            Self::RelayedClient => StatusCode::BAD_REQUEST,
            _ => StatusCode::FORBIDDEN,
        }
    }

    /// The reason the refusal metric counts it by.
    pub fn reason(&self) -> Reason {
        match (self, self.status()) {
            (Self::OtherSession(_), _) => Reason::OtherSession,
            (_, StatusCode::UNAUTHORIZED) => Reason::Unauthenticated,
            (Self::RelayedClient, _) => Reason::BadForwarded,
            _ => Reason::Forbidden,
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        ApiError::new(error.reason(), error.status(), error.to_string())
    }
}

#[derive(Deserialize)]
struct CredentialQuery {
    token: Option<String>,
    binding: Option<String>,
}

/// The token and ticket of a request: headers first, then the query string
/// (browsers cannot set headers on a WebSocket).
pub fn presented_credentials(headers: &HeaderMap, query: Option<&str>) -> (Option<String>, Option<String>) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let bearer = header(header::AUTHORIZATION.as_str()).and_then(tidepool_protocol::bearer_token).map(str::to_owned);
    let ticket = header(BINDING_HEADER).map(str::to_owned);
    if bearer.is_some() && ticket.is_some() {
        return (bearer, ticket);
    }
    // A query that does not parse carries no credentials.
    let from_query = serde_urlencoded::from_str::<CredentialQuery>(query.unwrap_or_default())
        .unwrap_or(CredentialQuery { token: None, binding: None });
    (bearer.or(from_query.token), ticket.or(from_query.binding))
}

/// Checks a token and ticket for pod `pod` (of pool `pool`, when known).
pub fn verify(
    keys: &PublicKeys,
    pod: &str,
    pool: &str,
    token: Option<&str>,
    ticket: Option<&str>,
    now: u64,
) -> Result<SessionClaims, AuthError> {
    let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::MissingToken)?;
    let ticket = ticket.filter(|t| !t.is_empty()).ok_or(AuthError::MissingTicket)?;
    let claims = keys.verify_session(token, now).map_err(AuthError::Token)?;
    keys.verify_binding(ticket, &claims.sid, pod)
        .map_err(|_| AuthError::Ticket { sid: claims.sid.clone(), pod: pod.to_owned() })?;
    if !pool.is_empty() && claims.pool != pool {
        return Err(AuthError::WrongPool { session_pool: claims.pool, pod_pool: pool.to_owned() });
    }
    Ok(claims)
}

/// A request relayed by the gateway: the client's address it names, and
/// the relay ticket that vouches for it.
#[derive(Debug, PartialEq, Eq)]
pub struct Relayed<'a> {
    pub client: IpAddr,
    pub ticket: &'a str,
}

/// Whether `headers` carry a relay ticket for session `sid` at pod `pod`
/// and, if so, the client's address they name (the last `X-Forwarded-For`
/// entry: the gateway sets it to the one address it saw). Without a
/// ticket `X-Forwarded-For` is anyone's word and is not read.
pub fn relayed<'a>(
    keys: &PublicKeys,
    sid: &str,
    pod: &str,
    headers: &'a HeaderMap,
) -> Result<Option<Relayed<'a>>, AuthError> {
    let Some(ticket) = headers.get(RELAY_HEADER) else { return Ok(None) };
    let ticket = ticket.to_str().map_err(|_| AuthError::Relay { sid: sid.to_owned(), pod: pod.to_owned() })?.trim();
    keys.verify_relay(ticket, sid, pod).map_err(|_| AuthError::Relay { sid: sid.to_owned(), pod: pod.to_owned() })?;
    let forwarded = headers.get_all("x-forwarded-for").iter().next_back().and_then(|v| v.to_str().ok());
    let last = forwarded.and_then(|v| v.rsplit(',').next()).map(str::trim).unwrap_or_default();
    let client = last.parse::<IpAddr>().map_err(|_| AuthError::RelayedClient)?;
    Ok(Some(Relayed { client: client.to_canonical(), ticket }))
}

/// Middleware: lets a request through only with credentials of the session
/// this pod serves, binding the pod to the first such session, and hands
/// the handlers that session as an `Arc<BoundSession>` extension. A request
/// the gateway relays is told its client's address instead of the gateway's.
pub async fn require_session(State(state): State<Arc<PodState>>, mut request: Request, next: Next) -> Response {
    let session = match authorize(&state, request.headers(), request.uri().query()) {
        Ok(session) => session,
        // Counted by the request counter, by the answer's reason.
        Err(error) => return ApiError::from(error).into_response(),
    };
    match relayed(&state.public_keys, &session.claims.sid, &state.identity.pod, request.headers()) {
        Ok(None) => {}
        Ok(Some(relayed)) => {
            if state.relay_key.get().is_none()
                && let Some(key) = relay_key(relayed.ticket)
            {
                let _ = state.relay_key.set(RelayKey::new(&key));
            }
            let client = ClientAddr(SocketAddr::new(relayed.client, 0));
            request.extensions_mut().insert(client);
        }
        Err(error) => return ApiError::from(error).into_response(),
    }
    request.extensions_mut().insert(session);
    next.run(request).await
}

fn authorize(state: &PodState, headers: &HeaderMap, query: Option<&str>) -> Result<Arc<BoundSession>, AuthError> {
    let (token, ticket) = presented_credentials(headers, query);
    let identity = &state.identity;
    let claims =
        verify(&state.public_keys, &identity.pod, &identity.pool, token.as_deref(), ticket.as_deref(), unix_seconds())?;
    let bound = state.bind(|| BoundSession {
        claims: claims.clone(),
        token: token.unwrap_or_default(),
        ticket: ticket.unwrap_or_default(),
    });
    if bound.claims.sid != claims.sid {
        return Err(AuthError::OtherSession(bound.claims.sid.clone()));
    }
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use tidepool_wire::token::PoolSigningKey;

    fn claims(exp: u64) -> SessionClaims {
        SessionClaims {
            sid: "sid-1".into(),
            ns: "default".into(),
            name: "alice".into(),
            pool: "edge".into(),
            profile: "latency".into(),
            exp,
            probes: None,
            tier: 1,
            thresholds: None,
            kid: String::new(),
        }
    }

    #[test]
    fn statuses_follow_the_kind_of_refusal() {
        let key = PoolSigningKey::generate().unwrap();
        let public = key.public();
        let token = key.sign_session(&claims(100));
        let ticket = key.sign_binding("sid-1", "pod-a");
        let check = |token: Option<&str>, ticket: Option<&str>, pod: &str, now: u64| {
            verify(&public.clone().into(), pod, "edge", token, ticket, now).map_err(|e| e.status())
        };
        assert_eq!(check(Some(&token), Some(&ticket), "pod-a", 50).unwrap().name, "alice");
        assert_eq!(check(None, Some(&ticket), "pod-a", 50), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(check(Some(&token), None, "pod-a", 50), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(check(Some(&token), Some(&ticket), "pod-a", 100), Err(StatusCode::UNAUTHORIZED));
        assert_eq!(check(Some(&token), Some(&ticket), "pod-b", 50), Err(StatusCode::FORBIDDEN));
        let foreign = PoolSigningKey::generate().unwrap().sign_session(&claims(100));
        assert_eq!(check(Some(&foreign), Some(&ticket), "pod-a", 50), Err(StatusCode::FORBIDDEN));
        assert_eq!(
            verify(&public.clone().into(), "pod-a", "other-pool", Some(&token), Some(&ticket), 50)
                .unwrap_err()
                .status(),
            StatusCode::FORBIDDEN
        );
    }

    #[test]
    fn headers_win_over_the_query_and_the_query_fills_gaps() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            presented_credentials(&headers, Some("seconds=3&token=t.q&binding=b%2Dq")),
            (Some("t.q".into()), Some("b-q".into()))
        );
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer t.h"));
        assert_eq!(presented_credentials(&headers, Some("binding=b")), (Some("t.h".into()), Some("b".into())));
        headers.insert(BINDING_HEADER, HeaderValue::from_static("b.h"));
        assert_eq!(
            presented_credentials(&headers, Some("token=x&binding=y")),
            (Some("t.h".into()), Some("b.h".into()))
        );
        assert_eq!(presented_credentials(&HeaderMap::new(), Some("%%%")), (None, None));
    }

    #[test]
    fn only_a_relay_ticket_for_this_session_and_pod_makes_forwarded_for_count() {
        let key = PoolSigningKey::generate().unwrap();
        let keys: PublicKeys = key.public().into();
        let relay = key.sign_relay("sid-1", "pod-a");
        let headers = |ticket: Option<&str>, forwarded: &[&str]| {
            let mut headers = HeaderMap::new();
            if let Some(ticket) = ticket {
                headers.insert(RELAY_HEADER, HeaderValue::from_str(ticket).unwrap());
            }
            for value in forwarded {
                headers.append("x-forwarded-for", HeaderValue::from_str(value).unwrap());
            }
            headers
        };
        let client = |h: &HeaderMap| relayed(&keys, "sid-1", "pod-a", h).map(|r| r.map(|r| r.client.to_string()));
        // No ticket: X-Forwarded-For is anyone's word, and is not read.
        assert_eq!(client(&headers(None, &["203.0.113.9"])), Ok(None));
        assert_eq!(client(&headers(Some(&relay), &["203.0.113.9"])), Ok(Some("203.0.113.9".into())));
        // The last entry of the last header: what the gateway set.
        assert_eq!(
            client(&headers(Some(&relay), &["10.0.0.1", "1.2.3.4, ::ffff:198.51.100.7"])),
            Ok(Some("198.51.100.7".into()))
        );
        for bad in [&[][..], &["garbage"], &["203.0.113.9, "]] {
            let refused = client(&headers(Some(&relay), bad)).unwrap_err();
            assert_eq!(
                (refused.status(), refused.reason()),
                (StatusCode::BAD_REQUEST, Reason::BadForwarded),
                "{bad:?}"
            );
        }
        let foreign = [
            key.sign_relay("sid-1", "pod-b"),
            key.sign_relay("sid-2", "pod-a"),
            key.sign_binding("sid-1", "pod-a"),
            PoolSigningKey::generate().unwrap().sign_relay("sid-1", "pod-a"),
            "garbage".into(),
        ];
        for ticket in foreign {
            let refused = client(&headers(Some(&ticket), &["203.0.113.9"])).unwrap_err();
            assert_eq!((refused.status(), refused.reason()), (StatusCode::FORBIDDEN, Reason::Forbidden), "{ticket}");
        }
    }
}
