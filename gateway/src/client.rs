//! Who a request comes from: the connection's peer, or, when the peer is a
//! proxy we trust, the address that proxy says it forwarded for. Pure.

use std::net::IpAddr;

use tidepool_protocol::egress::Cidr;

/// At most this many `X-Forwarded-For` entries are read; a longer chain is
/// refused rather than walked.
pub const MAX_FORWARDED_ENTRIES: usize = 32;

/// Why a request's forwarding header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BadForwarded {
    #[error("X-Forwarded-For is not a list of IP addresses")]
    NotAnAddress,
    #[error("X-Forwarded-For lists more than {MAX_FORWARDED_ENTRIES} addresses")]
    TooLong,
}

/// The client's address. A peer outside `trusted` is the client, whatever
/// it claims. A trusted peer forwarded the request: the client is the
/// rightmost `X-Forwarded-For` entry that is not itself a trusted proxy
/// (entries to its left are whatever the client wrote, so never believed);
/// if every entry is trusted, the leftmost.
pub fn client_address(peer: IpAddr, forwarded_for: &[&str], trusted: &[Cidr]) -> Result<IpAddr, BadForwarded> {
    let peer = canonical(peer);
    let is_trusted = |ip: IpAddr| trusted.iter().any(|cidr| cidr.contains(ip));
    if !is_trusted(peer) {
        return Ok(peer);
    }
    let mut entries = Vec::new();
    for header in forwarded_for {
        for entry in header.split(',') {
            if entries.len() == MAX_FORWARDED_ENTRIES {
                return Err(BadForwarded::TooLong);
            }
            let ip: IpAddr = entry.trim().parse().map_err(|_| BadForwarded::NotAnAddress)?;
            entries.push(canonical(ip));
        }
    }
    let Some(&leftmost) = entries.first() else { return Ok(peer) };
    Ok(entries.iter().rev().copied().find(|ip| !is_trusted(*ip)).unwrap_or(leftmost))
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is, so one client
/// counts once whichever socket family it came in on.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Whether `ip` may start anonymous sessions: every address when the
/// allowlist is empty, else those inside it.
pub fn allowed(ip: IpAddr, allowlist: &[Cidr]) -> bool {
    allowlist.is_empty() || allowlist.iter().any(|cidr| cidr.contains(ip))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidepool_protocol::egress::parse_deny;

    fn cidrs(text: &str) -> Vec<Cidr> {
        parse_deny(text).unwrap()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_forwards() {
        let trusted = cidrs("10.0.0.0/8");
        assert_eq!(client_address(ip("203.0.113.7"), &["198.51.100.1"], &trusted), Ok(ip("203.0.113.7")));
        // Not even a malformed header matters then.
        assert_eq!(client_address(ip("203.0.113.7"), &["garbage"], &trusted), Ok(ip("203.0.113.7")));
    }

    #[test]
    fn a_trusted_peer_without_the_header_is_the_client() {
        assert_eq!(client_address(ip("10.1.2.3"), &[], &cidrs("10.0.0.0/8")), Ok(ip("10.1.2.3")));
    }

    #[test]
    fn the_rightmost_untrusted_entry_is_the_client() {
        let trusted = cidrs("10.0.0.0/8");
        // The client wrote 1.1.1.1 itself; the proxy appended what it saw.
        let header = ["1.1.1.1, 203.0.113.7, 10.0.0.9"];
        assert_eq!(client_address(ip("10.0.0.2"), &header, &trusted), Ok(ip("203.0.113.7")));
        // Several headers are one list, in order.
        let headers = ["1.1.1.1", "203.0.113.8"];
        assert_eq!(client_address(ip("10.0.0.2"), &headers, &trusted), Ok(ip("203.0.113.8")));
    }

    #[test]
    fn when_every_entry_is_trusted_the_leftmost_is_the_client() {
        let trusted = cidrs("10.0.0.0/8");
        assert_eq!(client_address(ip("10.0.0.2"), &["10.0.0.5, 10.0.0.6"], &trusted), Ok(ip("10.0.0.5")));
    }

    #[test]
    fn a_bad_or_long_header_from_a_trusted_peer_is_refused() {
        let trusted = cidrs("10.0.0.0/8");
        assert_eq!(client_address(ip("10.0.0.2"), &["not-an-ip"], &trusted), Err(BadForwarded::NotAnAddress));
        assert_eq!(client_address(ip("10.0.0.2"), &["1.2.3.4,"], &trusted), Err(BadForwarded::NotAnAddress));
        let long = vec!["1.2.3.4"; MAX_FORWARDED_ENTRIES + 1];
        assert_eq!(client_address(ip("10.0.0.2"), &long, &trusted), Err(BadForwarded::TooLong));
    }

    #[test]
    fn mapped_addresses_count_as_ipv4() {
        assert_eq!(client_address(ip("::ffff:203.0.113.7"), &[], &[]), Ok(ip("203.0.113.7")));
        let trusted = cidrs("10.0.0.0/8");
        assert_eq!(client_address(ip("::ffff:10.0.0.2"), &["::ffff:198.51.100.4"], &trusted), Ok(ip("198.51.100.4")));
    }

    #[test]
    fn the_allowlist_allows_all_when_empty_and_only_its_ranges_otherwise() {
        assert!(allowed(ip("203.0.113.7"), &[]));
        let list = cidrs("203.0.113.0/24,2001:db8::/32");
        assert!(allowed(ip("203.0.113.7"), &list));
        assert!(allowed(ip("2001:db8::1"), &list));
        assert!(!allowed(ip("198.51.100.1"), &list));
    }
}
