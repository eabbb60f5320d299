//! The session pod: the warm pod that becomes one user's session.

pub mod grading;
pub mod protocol;
