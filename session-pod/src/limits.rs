//! Abuse limits per client address, and the per-socket ping budget.
//!
//! Pure: every call takes the time, so the tests can move the clock. The
//! server keeps one [`Limiter`] behind a mutex and never holds it across an
//! await.
//!
//! What counts:
//! - a **test** is one latency WebSocket (`/ws`) or one household run, which
//!   is counted once, on its `bulk` WebSocket (the other three users of the
//!   same run are free);
//! - **bytes** are download, upload, household and UDP echo bytes;
//! - **sockets** are the WebSockets and download/upload streams open at once.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use tidepool_protocol::pod::MAX_UPLOAD_BYTES;

/// The window of the hourly limits.
pub const HOUR: Duration = Duration::from_secs(3600);
/// Bytes are counted in buckets of this length: a client's byte history is
/// at most 60 numbers.
const BYTE_BUCKET: Duration = Duration::from_secs(60);

/// The limits, all per client address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    pub tests_per_hour: u32,
    pub bytes_per_hour: u64,
    pub concurrent_sockets: u32,
    /// The most one upload request may carry.
    pub max_upload_bytes: u64,
    /// How many client addresses are remembered; the least recently seen
    /// is forgotten first.
    pub tracked_clients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            tests_per_hour: 16,
            bytes_per_hour: 45_000_000_000,
            concurrent_sockets: 16,
            max_upload_bytes: MAX_UPLOAD_BYTES,
            tracked_clients: 4096,
        }
    }
}

/// Why a client was refused, and when it may try again.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("limit tests_per_hour: {limit} tests an hour per address; the next frees up in {} s", secs(*retry_after))]
    Tests { limit: u32, retry_after: Duration },
    #[error("limit bytes_per_hour: {limit} bytes an hour per address; traffic frees up in {} s", secs(*retry_after))]
    Bytes { limit: u64, retry_after: Duration },
    #[error(
        "limit concurrent_sockets: {limit} sockets open at once per address; one frees up when one of yours closes"
    )]
    Sockets { limit: u32 },
}

impl Refusal {
    /// The limit's name, as in the flags and the metrics.
    pub fn limit(&self) -> &'static str {
        match self {
            Self::Tests { .. } => "tests_per_hour",
            Self::Bytes { .. } => "bytes_per_hour",
            Self::Sockets { .. } => "concurrent_sockets",
        }
    }

    /// When to try again. A socket frees up when the client closes one, which
    /// we cannot foresee: a second is a fair guess.
    pub fn retry_after(&self) -> Duration {
        match self {
            Self::Tests { retry_after, .. } | Self::Bytes { retry_after, .. } => *retry_after,
            Self::Sockets { .. } => Duration::from_secs(1),
        }
    }
}

/// What one session's UDP echo may send back in all (a pod serves one session).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpCaps {
    /// Datagrams echoed per session.
    pub packets_per_session: u64,
    /// Bytes echoed per session.
    pub bytes_per_session: u64,
}

impl Default for UdpCaps {
    /// 100 datagrams a second for an hour (the CLI sends 10 a second), and 100 MB.
    fn default() -> Self {
        Self { packets_per_session: 360_000, bytes_per_session: 100_000_000 }
    }
}

/// What one session's probe runs may spend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeLimits {
    /// Bytes all its probes may send and receive, downloads included.
    pub bytes_per_session: u64,
    /// Runs it may start in any minute (once or continuous).
    pub runs_per_minute: u32,
}

impl Default for ProbeLimits {
    /// Two tier-3 runs' worth of bytes (each may download 1 GB), and ten
    /// runs a minute (continuous runs come every 10 s at most).
    fn default() -> Self {
        Self { bytes_per_session: 2_000_000_000, runs_per_minute: 10 }
    }
}

/// Whole seconds, rounded up, so a client that waits that long is let in.
pub fn secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// What a client asks to open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opening {
    /// A socket that starts a test.
    Test,
    /// Any other socket: a stream, or a household user other than bulk.
    Socket,
}

#[derive(Debug)]
struct Client {
    /// When its tests of the last hour began, oldest first.
    tests: VecDeque<Instant>,
    /// `(bucket start, bytes)` of the last hour, oldest first.
    bytes: VecDeque<(Instant, u64)>,
    open_sockets: u32,
    last_seen: Instant,
}

impl Client {
    fn new(now: Instant) -> Self {
        Self { tests: VecDeque::new(), bytes: VecDeque::new(), open_sockets: 0, last_seen: now }
    }

    fn forget_before(&mut self, now: Instant) {
        while self.tests.front().is_some_and(|start| now.saturating_duration_since(*start) >= HOUR) {
            self.tests.pop_front();
        }
        while self.bytes.front().is_some_and(|(start, _)| now.saturating_duration_since(*start) >= HOUR) {
            self.bytes.pop_front();
        }
    }

    fn bytes_in_window(&self) -> u64 {
        self.bytes.iter().map(|(_, bytes)| bytes).sum()
    }

    /// Refuses when the hour's bytes reached `limit`; the wait is until
    /// enough old buckets leave the window to bring the total under it.
    fn check_bytes(&self, limit: u64, now: Instant) -> Result<(), Refusal> {
        let mut total = self.bytes_in_window();
        if total < limit {
            return Ok(());
        }
        let mut frees_at = now;
        for (start, bytes) in &self.bytes {
            total -= bytes;
            frees_at = *start + HOUR;
            if total < limit {
                break;
            }
        }
        Err(Refusal::Bytes { limit, retry_after: frees_at.saturating_duration_since(now) })
    }
}

/// The usage of every tracked client address.
#[derive(Debug)]
pub struct Limiter {
    limits: Limits,
    clients: HashMap<IpAddr, Client>,
}

impl Limiter {
    pub fn new(limits: Limits) -> Self {
        Self { limits, clients: HashMap::new() }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// How many addresses are remembered.
    pub fn tracked(&self) -> usize {
        self.clients.len()
    }

    /// Lets `ip` open a socket, or says why not. On success the socket is
    /// counted until [`Limiter::close`].
    pub fn open(&mut self, ip: IpAddr, opening: Opening, now: Instant) -> Result<(), Refusal> {
        let limits = self.limits.clone();
        let client = self.client(ip, now);
        client.check_bytes(limits.bytes_per_hour, now)?;
        if client.open_sockets >= limits.concurrent_sockets {
            return Err(Refusal::Sockets { limit: limits.concurrent_sockets });
        }
        if opening == Opening::Test {
            if client.tests.len() >= limits.tests_per_hour as usize {
                let retry_after =
                    client.tests.front().map_or(HOUR, |oldest| (*oldest + HOUR).saturating_duration_since(now));
                return Err(Refusal::Tests { limit: limits.tests_per_hour, retry_after });
            }
            client.tests.push_back(now);
        }
        client.open_sockets += 1;
        Ok(())
    }

    /// A socket of `ip` closed.
    pub fn close(&mut self, ip: IpAddr) {
        // A client forgotten while its socket was open has nothing to release.
        if let Some(client) = self.clients.get_mut(&ip) {
            client.open_sockets = client.open_sockets.saturating_sub(1);
        }
    }

    /// Counts `bytes` of traffic for `ip`; refuses once the hour's total
    /// reached the limit (the bytes are counted all the same: they flowed).
    pub fn charge(&mut self, ip: IpAddr, bytes: u64, now: Instant) -> Result<(), Refusal> {
        let limit = self.limits.bytes_per_hour;
        let client = self.client(ip, now);
        match client.bytes.back_mut() {
            Some((start, total)) if now.saturating_duration_since(*start) < BYTE_BUCKET => *total += bytes,
            _ => client.bytes.push_back((now, bytes)),
        }
        client.check_bytes(limit, now)
    }

    /// Whether `ip` may still move bytes this hour.
    pub fn check_bytes(&mut self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        let limit = self.limits.bytes_per_hour;
        self.client(ip, now).check_bytes(limit, now)
    }

    /// The client's record, made (forgetting the least recently seen other
    /// client when full) if new, with its old history dropped.
    fn client(&mut self, ip: IpAddr, now: Instant) -> &mut Client {
        if !self.clients.contains_key(&ip) && self.clients.len() >= self.limits.tracked_clients.max(1) {
            // Rare (only a new address when full) and bounded: a linear scan is fine.
            let oldest = self.clients.iter().min_by_key(|(_, client)| client.last_seen).map(|(ip, _)| *ip);
            if let Some(oldest) = oldest {
                self.clients.remove(&oldest);
            }
        }
        let client = self.clients.entry(ip).or_insert_with(|| Client::new(now));
        client.last_seen = client.last_seen.max(now);
        client.forget_before(now);
        client
    }
}

/// Starts of something (probe runs) allowed at most `per_minute` times in
/// any minute.
#[derive(Clone, Debug)]
pub struct MinuteWindow {
    per_minute: u32,
    starts: VecDeque<Instant>,
}

impl MinuteWindow {
    pub const MINUTE: Duration = Duration::from_secs(60);

    pub fn new(per_minute: u32) -> Self {
        Self { per_minute, starts: VecDeque::new() }
    }

    pub fn per_minute(&self) -> u32 {
        self.per_minute
    }

    /// Counts a start at `now`, or says how long until one is allowed.
    pub fn start(&mut self, now: Instant) -> Result<(), Duration> {
        while self.starts.front().is_some_and(|start| now.saturating_duration_since(*start) >= Self::MINUTE) {
            self.starts.pop_front();
        }
        if self.starts.len() >= self.per_minute as usize {
            let oldest = self.starts.front().copied().unwrap_or(now);
            return Err((oldest + Self::MINUTE).saturating_duration_since(now));
        }
        self.starts.push_back(now);
        Ok(())
    }
}

/// A token bucket: at most `per_second` a second on average, in bursts of
/// at most `per_second`.
#[derive(Clone, Debug)]
pub struct RateBudget {
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl RateBudget {
    pub fn new(per_second: u32, now: Instant) -> Self {
        let per_second = f64::from(per_second.max(1));
        Self { per_second, tokens: per_second, last: now }
    }

    /// Takes one token if there is one.
    pub fn allow(&mut self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.per_second);
        self.last = self.last.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            tests_per_hour: 2,
            bytes_per_hour: 1_000,
            concurrent_sockets: 3,
            tracked_clients: 2,
            ..Limits::default()
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn tests_per_hour_free_up_an_hour_after_the_oldest() {
        let t0 = Instant::now();
        let mut limiter = Limiter::new(limits());
        limiter.open(ip(1), Opening::Test, t0).unwrap();
        limiter.open(ip(1), Opening::Test, t0 + Duration::from_secs(600)).unwrap();
        limiter.close(ip(1));
        limiter.close(ip(1));
        let refused = limiter.open(ip(1), Opening::Test, t0 + Duration::from_secs(900)).unwrap_err();
        assert_eq!(refused, Refusal::Tests { limit: 2, retry_after: Duration::from_secs(2700) });
        assert_eq!(refused.limit(), "tests_per_hour");
        assert!(refused.to_string().contains("2700 s"), "{refused}");
        // Other addresses and plain sockets are not affected.
        limiter.open(ip(2), Opening::Test, t0 + Duration::from_secs(900)).unwrap();
        limiter.open(ip(1), Opening::Socket, t0 + Duration::from_secs(900)).unwrap();
        limiter.open(ip(1), Opening::Test, t0 + HOUR).unwrap();
    }

    #[test]
    fn concurrent_sockets_free_up_on_close() {
        let t0 = Instant::now();
        let mut limiter = Limiter::new(limits());
        for _ in 0..3 {
            limiter.open(ip(1), Opening::Socket, t0).unwrap();
        }
        let refused = limiter.open(ip(1), Opening::Socket, t0).unwrap_err();
        assert_eq!(refused, Refusal::Sockets { limit: 3 });
        assert_eq!(refused.retry_after(), Duration::from_secs(1));
        limiter.close(ip(1));
        limiter.open(ip(1), Opening::Socket, t0).unwrap();
    }

    #[test]
    fn bytes_per_hour_free_up_as_old_buckets_leave_the_window() {
        let t0 = Instant::now();
        let mut limiter = Limiter::new(limits());
        limiter.charge(ip(1), 600, t0).unwrap();
        limiter.charge(ip(1), 300, t0 + Duration::from_secs(30)).unwrap();
        let at = t0 + Duration::from_secs(120);
        let refused = limiter.charge(ip(1), 200, at).unwrap_err();
        // 1100 in the window; without the first bucket (900 from t0) it is 500.
        assert_eq!(refused, Refusal::Bytes { limit: 1_000, retry_after: HOUR - Duration::from_secs(120) });
        assert!(limiter.open(ip(1), Opening::Socket, at).is_err());
        assert!(limiter.check_bytes(ip(1), t0 + HOUR).is_ok());
        limiter.open(ip(1), Opening::Socket, t0 + HOUR).unwrap();
    }

    #[test]
    fn the_least_recently_seen_client_is_forgotten() {
        let t0 = Instant::now();
        let mut limiter = Limiter::new(limits());
        limiter.charge(ip(1), 1_000, t0).unwrap_err();
        limiter.charge(ip(2), 1, t0 + Duration::from_secs(1)).unwrap();
        limiter.charge(ip(3), 1, t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(limiter.tracked(), 2);
        // ip(1) was forgotten, with its spent bytes.
        assert!(limiter.check_bytes(ip(1), t0 + Duration::from_secs(3)).is_ok());
        // Closing a socket of a forgotten client is harmless.
        limiter.close(ip(9));
    }

    #[test]
    fn the_rate_budget_allows_bursts_then_the_rate() {
        let t0 = Instant::now();
        let mut budget = RateBudget::new(100, t0);
        let allowed = (0..150).filter(|_| budget.allow(t0)).count();
        assert_eq!(allowed, 100);
        assert!(!budget.allow(t0 + Duration::from_millis(5)));
        assert!(budget.allow(t0 + Duration::from_millis(10)));
        // A second later the bucket is full again, but no fuller.
        let later = t0 + Duration::from_secs(5);
        assert_eq!((0..150).filter(|_| budget.allow(later)).count(), 100);
    }

    #[test]
    fn the_minute_window_frees_a_start_a_minute_after_it() {
        let t0 = Instant::now();
        let mut window = MinuteWindow::new(2);
        window.start(t0).unwrap();
        window.start(t0 + Duration::from_secs(10)).unwrap();
        assert_eq!(window.start(t0 + Duration::from_secs(20)), Err(Duration::from_secs(40)));
        window.start(t0 + Duration::from_secs(60)).unwrap();
        assert_eq!(window.start(t0 + Duration::from_secs(61)), Err(Duration::from_secs(9)));
        assert!(MinuteWindow::new(0).start(t0).is_err(), "a cap of 0 allows nothing");
    }

    #[test]
    fn seconds_round_up() {
        assert_eq!(secs(Duration::from_millis(1)), 1);
        assert_eq!(secs(Duration::from_secs(2)), 2);
        assert_eq!(secs(Duration::from_millis(2_001)), 3);
    }
}
