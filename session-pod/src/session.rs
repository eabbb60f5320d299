//! The session a pod serves, once a client's credentials verified.

use tidepool_wire::token::SessionClaims;

/// The session this pod serves: the first whose credentials verified.
#[derive(Debug)]
pub struct BoundSession {
    pub claims: SessionClaims,
    /// The raw credentials, for posting results to the operator.
    pub token: String,
    pub ticket: String,
}
