//! What Tidepool's programs say to each other, kept free of I/O.
//!
//! - [`token`]: the session token the operator signs and the session pod
//!   verifies, and the binding ticket that pins a session to one pod.
//! - [`report`]: the node agent's report to the operator, and its checks.

pub mod report;
pub mod token;
