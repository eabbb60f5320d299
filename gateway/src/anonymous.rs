//! Whether one more anonymous session may start for a client address. Pure:
//! the caller gathers what the watch cache shows for that address and the
//! creates this replica has in flight.
//!
//! The counts come from the TestSessions themselves (each carries its
//! client's address in `spec.client.address`, and the bytes each replica
//! proxied for it in an annotation of that replica's, `traffic.rs`), so
//! every replica sees every replica's sessions without a store of its own; a replica also counts the
//! creates it has made that its cache does not show yet, so a burst at one
//! replica cannot pass a limit while the watch catches up.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The window `sessions_per_hour` counts over.
pub const HOUR: Duration = Duration::from_secs(3600);

/// Limits on what one client address may hold and start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Sessions started in the last hour.
    pub sessions_per_hour: u32,
    /// Sessions live at once.
    pub concurrent_sessions: u32,
    /// Bytes proxied (both ways, every replica) for the sessions started in
    /// the last hour; 0: no limit.
    pub bytes_per_hour: u64,
}

/// One session made for the address, as seen. Times are seconds since the
/// Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub created: u64,
    /// Still live (not Completed, Expired or Failed), and when it will end at the latest.
    pub live_until: Option<u64>,
    /// Bytes the gateway's replicas have proxied for it, as they wrote on it.
    pub bytes: u64,
}

/// Why a session may not start now, and when to try again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The metric label.
    pub reason: &'static str,
    pub message: String,
    pub retry_after_seconds: u64,
}

/// `seen`: the address's sessions in the cache; `in_flight`: creates this
/// replica made (or is making) that the cache does not show yet, each as
/// live and created now.
pub fn admit(limits: Limits, seen: &[Seen], in_flight: u32, now: u64) -> Result<(), Refusal> {
    let window_start = now.saturating_sub(HOUR.as_secs());
    let in_window: Vec<u64> = seen.iter().map(|s| s.created).filter(|&created| created > window_start).collect();
    let started = u32::try_from(in_window.len()).unwrap_or(u32::MAX).saturating_add(in_flight);
    if started >= limits.sessions_per_hour {
        // A place frees when the oldest start in the window leaves it.
        let oldest = in_window.iter().min().copied().unwrap_or(now);
        let retry = (oldest + HOUR.as_secs()).saturating_sub(now).max(1);
        return Err(Refusal {
            reason: "sessions_per_hour",
            message: format!(
                "this address started {started} sessions in the last hour, the most it may ({})",
                limits.sessions_per_hour
            ),
            retry_after_seconds: retry,
        });
    }
    let live_until: Vec<u64> = seen.iter().filter_map(|s| s.live_until).collect();
    let live = u32::try_from(live_until.len()).unwrap_or(u32::MAX).saturating_add(in_flight);
    if live >= limits.concurrent_sessions {
        // A place frees when the first live session ends; a create in
        // flight has no end known yet, so at most a minute is promised.
        let first_end = live_until.iter().min().map_or(60, |&end| end.saturating_sub(now));
        return Err(Refusal {
            reason: "concurrent_sessions",
            message: format!(
                "this address holds {live} live sessions, the most it may ({}); end one first",
                limits.concurrent_sessions
            ),
            retry_after_seconds: first_end.clamp(1, 60),
        });
    }
    Ok(())
}

/// Whether the address's sessions of the last hour are within its bytes:
/// `seen` as the replicas wrote them, `unwritten` what this replica has
/// proxied since it last wrote.
pub fn within_bytes(limits: Limits, seen: &[Seen], unwritten: u64, now: u64) -> Result<(), Refusal> {
    if limits.bytes_per_hour == 0 {
        return Ok(());
    }
    let window_start = now.saturating_sub(HOUR.as_secs());
    let in_window: Vec<&Seen> = seen.iter().filter(|s| s.created > window_start).collect();
    let used = in_window.iter().map(|s| s.bytes).fold(unwritten, u64::saturating_add);
    if used < limits.bytes_per_hour {
        return Ok(());
    }
    // Room comes back when the oldest session that used any leaves the window.
    let oldest = in_window.iter().filter(|s| s.bytes > 0).map(|s| s.created).min().unwrap_or(now);
    Err(Refusal {
        reason: "bytes_per_hour",
        message: format!(
            "this address's sessions moved {} MiB in the last hour, the most they may ({} MiB)",
            used >> 20,
            limits.bytes_per_hour >> 20
        ),
        retry_after_seconds: (oldest + HOUR.as_secs()).saturating_sub(now).max(1),
    })
}

/// How long a create this replica made counts as in flight when its
/// cache never shows the session (deleted at once, or a slow watch).
const PENDING_FOR: Duration = Duration::from_secs(30);

/// Creates this replica has in flight, or made and its cache does not show
/// yet, by client address.
#[derive(Default)]
pub struct Pending {
    by_client: Mutex<HashMap<IpAddr, Vec<Create>>>,
    next_id: AtomicU64,
}

struct Create {
    id: u64,
    /// `namespace/name` once the operator made it.
    session: Option<String>,
    at: Instant,
}

impl Pending {
    /// Checks the limits for `ip` (its sessions as the cache shows them:
    /// `seen`, and their `namespace/name`s) and, when one more may start,
    /// takes its place until the cache shows it.
    pub fn reserve(
        &self,
        ip: IpAddr,
        limits: Limits,
        seen: &[Seen],
        seen_names: &[String],
        now: u64,
    ) -> Result<Reservation<'_>, Refusal> {
        let mut by_client = self.by_client.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Forget clients whose creates all landed or lapsed, so the map stays small.
        let moment = Instant::now();
        by_client.retain(|_, creates| {
            creates.retain(|c| {
                moment.duration_since(c.at) < PENDING_FOR
                    && c.session.as_ref().is_none_or(|name| !seen_names.contains(name))
            });
            !creates.is_empty()
        });
        let creates = by_client.entry(ip).or_default();
        admit(limits, seen, u32::try_from(creates.len()).unwrap_or(u32::MAX), now)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        creates.push(Create { id, session: None, at: moment });
        Ok(Reservation { pending: self, ip, id, kept: false })
    }

    fn finish(&self, ip: IpAddr, id: u64, session: Option<String>) {
        let mut by_client = self.by_client.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(creates) = by_client.get_mut(&ip) {
            match session {
                Some(name) => {
                    if let Some(create) = creates.iter_mut().find(|c| c.id == id) {
                        create.session = Some(name);
                    }
                }
                None => creates.retain(|c| c.id != id),
            }
        }
    }
}

/// A place taken for one create: given back when dropped, unless the create
/// made a session, which then counts until the cache shows it.
pub struct Reservation<'a> {
    pending: &'a Pending,
    ip: IpAddr,
    id: u64,
    kept: bool,
}

impl Reservation<'_> {
    /// The create made session `namespace/name`.
    pub fn made(mut self, session: String) {
        self.kept = true;
        self.pending.finish(self.ip, self.id, Some(session));
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.pending.finish(self.ip, self.id, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const LIMITS: Limits = Limits { sessions_per_hour: 3, concurrent_sessions: 2, bytes_per_hour: 0 };

    fn ended(ago: u64) -> Seen {
        Seen { created: NOW - ago, live_until: None, bytes: 0 }
    }

    fn live(ago: u64, ends_in: u64) -> Seen {
        Seen { created: NOW - ago, live_until: Some(NOW + ends_in), bytes: 0 }
    }

    fn moved(ago: u64, bytes: u64) -> Seen {
        Seen { bytes, ..ended(ago) }
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn the_bytes_of_the_hours_sessions_and_the_unwritten_ones_count() {
        let limits = Limits { bytes_per_hour: 100 * MIB, ..LIMITS };
        // Under: 60 + 30 written, 9 unwritten; the session of two hours ago does not count.
        let seen = [moved(3000, 60 * MIB), moved(100, 30 * MIB), moved(7200, 500 * MIB)];
        assert_eq!(within_bytes(limits, &seen, 9 * MIB, NOW), Ok(()));
        // The unwritten megabyte that reaches the limit is refused, until the
        // oldest session that used any leaves the hour.
        let refused = within_bytes(limits, &seen, 10 * MIB, NOW).unwrap_err();
        assert_eq!((refused.reason, refused.retry_after_seconds), ("bytes_per_hour", 600));
        assert!(refused.message.contains("100 MiB in the last hour"), "{}", refused.message);
        // A session that moved nothing does not set the retry.
        let seen = [moved(3500, 0), moved(100, 100 * MIB)];
        assert_eq!(within_bytes(limits, &seen, 0, NOW).unwrap_err().retry_after_seconds, 3500);
    }

    #[test]
    fn no_bytes_limit_when_it_is_zero() {
        assert_eq!(within_bytes(LIMITS, &[moved(10, u64::MAX)], u64::MAX, NOW), Ok(()));
    }

    #[test]
    fn a_new_address_may_start() {
        assert_eq!(admit(LIMITS, &[], 0, NOW), Ok(()));
    }

    #[test]
    fn the_hourly_count_refuses_and_says_when_the_oldest_leaves_the_window() {
        let seen = [ended(3000), ended(1000), ended(10)];
        let refused = admit(LIMITS, &seen, 0, NOW).unwrap_err();
        assert_eq!(refused.reason, "sessions_per_hour");
        assert_eq!(refused.retry_after_seconds, 600);
        assert!(refused.message.contains("3 sessions"), "{}", refused.message);
    }

    #[test]
    fn starts_older_than_an_hour_do_not_count() {
        let seen = [ended(3600), ended(7200), ended(10)];
        assert_eq!(admit(LIMITS, &seen, 0, NOW), Ok(()));
    }

    #[test]
    fn creates_in_flight_count_against_both_limits() {
        assert_eq!(admit(LIMITS, &[ended(10)], 2, NOW).unwrap_err().reason, "sessions_per_hour");
        let limits = Limits { sessions_per_hour: 10, concurrent_sessions: 2, bytes_per_hour: 0 };
        let refused = admit(limits, &[], 2, NOW).unwrap_err();
        assert_eq!(refused.reason, "concurrent_sessions");
        assert_eq!(refused.retry_after_seconds, 60);
    }

    #[test]
    fn the_concurrent_limit_refuses_until_the_first_live_session_ends() {
        let limits = Limits { sessions_per_hour: 10, concurrent_sessions: 2, bytes_per_hour: 0 };
        let seen = [live(100, 40), live(50, 500), ended(30)];
        let refused = admit(limits, &seen, 0, NOW).unwrap_err();
        assert_eq!(refused.reason, "concurrent_sessions");
        assert_eq!(refused.retry_after_seconds, 40);
        // A session past its end that the operator has not ended yet: retry soon, not never.
        let seen = [live(100, 0), live(50, 500)];
        assert_eq!(admit(limits, &seen, 0, NOW).unwrap_err().retry_after_seconds, 1);
        // One live is fine.
        assert_eq!(admit(limits, &[live(100, 40), ended(30)], 0, NOW), Ok(()));
    }

    #[test]
    fn reservations_count_until_the_cache_shows_the_session() {
        let pending = Pending::default();
        let limits = Limits { sessions_per_hour: 10, concurrent_sessions: 2, bytes_per_hour: 0 };
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let other: IpAddr = "203.0.113.8".parse().unwrap();
        let Ok(first) = pending.reserve(ip, limits, &[], &[], NOW) else { panic!() };
        let Ok(second) = pending.reserve(ip, limits, &[], &[], NOW) else { panic!() };
        assert_eq!(pending.reserve(ip, limits, &[], &[], NOW).err().unwrap().reason, "concurrent_sessions");
        // Another address has its own count.
        assert!(pending.reserve(other, limits, &[], &[], NOW).is_ok());
        // A create that failed gives its place back.
        drop(second);
        let Ok(third) = pending.reserve(ip, limits, &[], &[], NOW) else { panic!() };
        // A create that made a session keeps its place...
        first.made("default/s1".into());
        third.made("default/s2".into());
        assert!(pending.reserve(ip, limits, &[], &[], NOW).is_err());
        // ...until the cache shows it, when the cache's count takes over.
        let seen = [live(0, 600), live(0, 600)];
        let names = ["default/s1".to_string(), "default/s2".to_string()];
        assert_eq!(pending.reserve(ip, limits, &seen, &names, NOW).err().unwrap().retry_after_seconds, 60);
        let seen = [live(0, 600)];
        assert!(pending.reserve(ip, limits, &seen, &names, NOW).is_ok());
    }

    #[test]
    fn zero_limits_refuse_everything() {
        let limits = Limits { sessions_per_hour: 0, concurrent_sessions: 0, bytes_per_hour: 0 };
        assert_eq!(admit(limits, &[], 0, NOW).unwrap_err().reason, "sessions_per_hour");
    }
}
