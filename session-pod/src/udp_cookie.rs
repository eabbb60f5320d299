//! Who gets a UDP echo: the cookies of grants, one per client address, and
//! the check of each datagram against the cookie of its own source. Pure
//! but for the secret's randomness.
//!
//! The cookie is the first 8 bytes of HMAC-SHA256(a random secret of the
//! pod, session id || client IP), so a datagram whose source was spoofed to
//! aim the echo at someone else carries a cookie that is not its source's:
//! the echo cannot be used for reflection.

use std::collections::{HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

use ring::hmac;

use crate::random::NoRandomness;
use tidepool_protocol::pod::{UdpError, UdpProbe};

/// How many granted cookies the pod remembers, to tell a datagram from the
/// wrong address (`wrong_source`) from one with a made-up cookie.
const GRANTS_REMEMBERED: usize = 4096;

/// Makes and remembers the cookies of UDP grants.
pub struct UdpCookies {
    key: hmac::Key,
    granted: Mutex<Granted>,
}

#[derive(Default)]
struct Granted {
    order: VecDeque<u64>,
    set: HashSet<u64>,
}

impl UdpCookies {
    /// With a fresh random secret.
    pub fn new() -> Result<Self, NoRandomness> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret)?;
        Ok(Self::with_secret(&secret))
    }

    pub fn with_secret(secret: &[u8]) -> Self {
        Self { key: hmac::Key::new(hmac::HMAC_SHA256, secret), granted: Mutex::new(Granted::default()) }
    }

    /// The cookie of session `sid` for datagrams from `ip`: the first 8
    /// bytes, big-endian, of HMAC-SHA256(secret, sid || the address's 4 or
    /// 16 bytes). An IPv4-mapped IPv6 address counts as its IPv4 address.
    pub fn cookie(&self, sid: &str, ip: IpAddr) -> u64 {
        let mut context = hmac::Context::with_key(&self.key);
        context.update(sid.as_bytes());
        match ip.to_canonical() {
            IpAddr::V4(v4) => context.update(&v4.octets()),
            IpAddr::V6(v6) => context.update(&v6.octets()),
        }
        let tag = context.sign();
        let mut first = [0u8; 8];
        first.copy_from_slice(&tag.as_ref()[..8]);
        u64::from_be_bytes(first)
    }

    /// A grant's cookie for `ip`, remembered.
    pub fn grant(&self, sid: &str, ip: IpAddr) -> u64 {
        let cookie = self.cookie(sid, ip);
        let mut granted = self.granted();
        if granted.set.insert(cookie) {
            granted.order.push_back(cookie);
            if granted.order.len() > GRANTS_REMEMBERED
                && let Some(oldest) = granted.order.pop_front()
            {
                granted.set.remove(&oldest);
            }
        }
        cookie
    }

    /// Whether `cookie` was granted (to some address).
    pub fn was_granted(&self, cookie: u64) -> bool {
        self.granted().set.contains(&cookie)
    }

    /// A poisoned lock holds a sound set (each update is a few plain steps).
    fn granted(&self) -> MutexGuard<'_, Granted> {
        self.granted.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Why a datagram was dropped: the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    BadSize,
    BadMagic,
    /// A cookie no grant gave (and every datagram before a session bound the pod).
    BadCookie,
    /// A granted cookie from another address than the one it was granted to:
    /// a spoofed source, most likely.
    WrongSource,
    /// The address's hourly bytes are spent.
    OverLimit,
    /// The session's datagrams or bytes are spent.
    SessionLimit,
    /// A relayed datagram (`TPR1`) with a bad frame or tag, or before the
    /// gateway's relay ticket reached the pod.
    BadRelay,
}

impl Dropped {
    pub const ALL: [Dropped; 7] = [
        Self::BadSize,
        Self::BadMagic,
        Self::BadCookie,
        Self::WrongSource,
        Self::OverLimit,
        Self::SessionLimit,
        Self::BadRelay,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::BadSize => "bad_size",
            Self::BadMagic => "bad_magic",
            Self::BadCookie => "bad_cookie",
            Self::WrongSource => "wrong_source",
            Self::OverLimit => "over_limit",
            Self::SessionLimit => "session_limit",
            Self::BadRelay => "bad_relay",
        }
    }
}

/// Whether `datagram` is a probe with `expected`, the cookie made for its
/// source address (`None` before a session bound the pod), asked for only
/// once the datagram is a well-formed probe: garbage costs no HMAC.
pub fn check(datagram: &[u8], expected: impl FnOnce() -> Option<u64>, cookies: &UdpCookies) -> Result<(), Dropped> {
    let probe = UdpProbe::read(datagram).map_err(|e| match e {
        UdpError::Size(_) => Dropped::BadSize,
        UdpError::Magic => Dropped::BadMagic,
    })?;
    let Some(expected) = expected() else { return Err(Dropped::BadCookie) };
    if probe.cookie == expected {
        Ok(())
    } else if cookies.was_granted(probe.cookie) {
        Err(Dropped::WrongSource)
    } else {
        Err(Dropped::BadCookie)
    }
}

/// The cookie of the last source address seen: a client sends from one
/// address, so the echo makes its HMAC once, not per datagram.
#[derive(Debug, Default)]
pub(crate) struct LastCookie(Option<(IpAddr, u64)>);

impl LastCookie {
    pub(crate) fn get(&mut self, cookies: &UdpCookies, sid: &str, source: IpAddr) -> u64 {
        match self.0 {
            Some((ip, cookie)) if ip == source => cookie,
            _ => {
                let cookie = cookies.cookie(sid, source);
                self.0 = Some((source, cookie));
                cookie
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_protocol::pod::{UDP_HEADER_BYTES, UDP_MAX_BYTES};

    fn probe(cookie: u64, len: usize) -> Vec<u8> {
        let mut datagram = vec![0u8; len];
        UdpProbe { cookie, seq: 1, client_time_us: 2, server_time_us: 0 }.write(&mut datagram).unwrap();
        datagram
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn cookies_are_hmacs_of_the_session_and_the_address() {
        let cookies = UdpCookies::with_secret(b"pod secret");
        // HMAC-SHA256("pod secret", "sid-1" || 127.0.0.1), its first 8 bytes.
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"pod secret");
        let tag = hmac::sign(&key, b"sid-1\x7f\x00\x00\x01");
        let expected = u64::from_be_bytes(tag.as_ref()[..8].try_into().unwrap());
        assert_eq!(cookies.cookie("sid-1", ip("127.0.0.1")), expected);
        assert_eq!(cookies.cookie("sid-1", ip("::ffff:127.0.0.1")), expected, "mapped is the IPv4 address");
        assert_ne!(cookies.cookie("sid-1", ip("127.0.0.2")), expected);
        assert_ne!(cookies.cookie("sid-2", ip("127.0.0.1")), expected);
        assert_ne!(UdpCookies::with_secret(b"another pod").cookie("sid-1", ip("127.0.0.1")), expected);
    }

    #[test]
    fn only_probes_with_their_sources_cookie_pass() {
        let cookies = UdpCookies::with_secret(b"s");
        let (alice, mallory) = (ip("198.51.100.7"), ip("203.0.113.9"));
        let granted = cookies.grant("sid", alice);
        let cookies = &cookies;
        let from = |source: IpAddr| move || Some(cookies.cookie("sid", source));
        assert_eq!(check(&probe(granted, 64), from(alice), cookies), Ok(()));
        assert_eq!(check(&probe(granted, 64), from(mallory), cookies), Err(Dropped::WrongSource));
        assert_eq!(check(&probe(granted ^ 1, 64), from(alice), cookies), Err(Dropped::BadCookie));
        assert_eq!(check(&probe(granted, 64), || None, cookies), Err(Dropped::BadCookie));
        let never = || -> Option<u64> { panic!("no HMAC for a datagram that is not a probe") };
        assert_eq!(check(&[0u8; UDP_HEADER_BYTES - 1], never, cookies), Err(Dropped::BadSize));
        assert_eq!(check(&[0u8; UDP_MAX_BYTES + 1], never, cookies), Err(Dropped::BadSize));
        assert_eq!(check(&[0u8; 64], never, cookies), Err(Dropped::BadMagic));

        let mut last = LastCookie::default();
        assert_eq!(last.get(cookies, "sid", alice), granted);
        assert_eq!(last.get(cookies, "sid", alice), granted);
        assert_eq!(last.get(cookies, "sid", mallory), cookies.cookie("sid", mallory));
    }

    #[test]
    fn the_grants_remembered_are_bounded() {
        let cookies = UdpCookies::with_secret(b"s");
        let first = cookies.grant("sid", ip("10.0.0.1"));
        for n in 0..GRANTS_REMEMBERED as u32 {
            cookies.grant("sid", IpAddr::from(0x0b00_0000u32.wrapping_add(n).to_be_bytes()));
        }
        assert_eq!(cookies.granted().order.len(), GRANTS_REMEMBERED);
        assert_eq!(cookies.granted().set.len(), GRANTS_REMEMBERED);
        assert!(!cookies.was_granted(first), "the oldest is forgotten first");
    }
}
