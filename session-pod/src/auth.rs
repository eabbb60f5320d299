//! Credentials: the session token and the binding ticket, from headers or
//! the query string, and the lock that makes the pod serve one session.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tidepool_wire::token::{PublicKeys, SessionClaims, TokenError};

use crate::clock::unix_seconds;
use crate::error::{ApiError, Reason};
use crate::session::BoundSession;
use crate::state::PodState;
use tidepool_protocol::BINDING_HEADER;

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
}

impl AuthError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingToken
            | Self::MissingTicket
            | Self::Token(TokenError::Expired { .. } | TokenError::Malformed) => StatusCode::UNAUTHORIZED,
            _ => StatusCode::FORBIDDEN,
        }
    }

    /// The reason the refusal metric counts it by.
    pub fn reason(&self) -> Reason {
        match (self, self.status()) {
            (Self::OtherSession(_), _) => Reason::OtherSession,
            (_, StatusCode::UNAUTHORIZED) => Reason::Unauthenticated,
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

/// Middleware: lets a request through only with credentials of the session
/// this pod serves, binding the pod to the first such session, and hands
/// the handlers that session as an `Arc<BoundSession>` extension.
pub async fn require_session(State(state): State<Arc<PodState>>, mut request: Request, next: Next) -> Response {
    match authorize(&state, request.headers(), request.uri().query()) {
        Ok(session) => {
            request.extensions_mut().insert(session);
            next.run(request).await
        }
        // Counted by the request counter, by the answer's reason.
        Err(error) => ApiError::from(error).into_response(),
    }
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
}
