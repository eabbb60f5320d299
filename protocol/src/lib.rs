//! What Tidepool's programs say to each other over HTTP, free of I/O:
//!
//! - [`pod`]: a client (the CLI, a browser) and a session pod;
//! - [`api`]: a client and the operator's REST API;
//! - [`results`]: measured results, from the client to the pod and from the
//!   pod to the operator, and the checks both apply;
//! - [`grading`]: the grading rules every side applies to results.
//!
//! Session tokens, binding tickets and agent reports live in `tidepool-wire`.

pub mod api;
pub mod grading;
pub mod pod;
pub mod results;

use serde::{Deserialize, Serialize};

/// The header that carries the binding ticket, on the pod's routes and the
/// operator's results route.
pub const BINDING_HEADER: &str = "x-tidepool-binding";

/// Every error answer, from the pod or the operator: a short reason for the
/// caller, and the HTTP status again.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
}
