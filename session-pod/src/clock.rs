//! The wall clock, as tokens and probes count it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::session::BoundSession;

/// Now, in Unix seconds.
pub fn unix_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Now, in Unix microseconds.
pub fn unix_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// The instant the session's token expires.
pub fn expiry(session: &BoundSession) -> tokio::time::Instant {
    let left = session.claims.exp.saturating_sub(unix_seconds());
    tokio::time::Instant::now() + Duration::from_secs(left.min(u64::from(u32::MAX)))
}
