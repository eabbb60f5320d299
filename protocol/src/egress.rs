//! What a pool's session pods may reach with their outbound probes. Pure: no
//! I/O, no resolver.
//!
//! A session's creator picks its probe targets, and the pod probes them from
//! inside the cluster, so by default a probe may reach only the public
//! internet: loopback, unspecified, link-local, private, carrier-grade NAT,
//! multicast, broadcast, reserved, documentation and benchmarking addresses
//! are refused, and so are the IPv6 forms that carry such an IPv4 address
//! (IPv4-mapped, IPv4-compatible, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`),
//! and the cluster's own pod and service ranges (`TIDEPOOL_EGRESS_DENY`).
//! A pool may allow more (`spec.egress.allow`, the pod's
//! `TIDEPOOL_EGRESS_ALLOW`): a CIDR allows the addresses in it, a host rule
//! the name (or every name under `*.domain`) whatever it resolves to, each on
//! its ports or on every port.
//!
//! The check is on each address after resolution; the caller connects only
//! to the addresses that passed, so a name that resolves differently the
//! second time (DNS rebinding) gains nothing.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

pub use tidepool_crds::warm_pool::EgressRule;

/// The environment variable with the pool's allow rules: a JSON array of [`EgressRule`].
pub const ALLOW_ENV: &str = "TIDEPOOL_EGRESS_ALLOW";
/// The environment variable with the cluster's ranges: comma-separated CIDRs.
pub const DENY_ENV: &str = "TIDEPOOL_EGRESS_DENY";
/// The longest host name (RFC 1035), as the CRD's schema says.
const MAX_HOST_BYTES: usize = 253;

/// Why a rule, a CIDR or a list of them was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EgressError {
    #[error("CIDR {0:?}: expected an IPv4 or IPv6 address, `/`, and a prefix length")]
    CidrSyntax(String),
    #[error("CIDR {text:?}: the prefix length must be 0 to {max}")]
    CidrPrefix { text: String, max: u8 },
    #[error("egress rule {index}: {problem}")]
    Rule { index: usize, problem: String },
    #[error("egress rules: not a JSON array of rules: {0}")]
    Json(String),
}

/// An IPv4 or IPv6 network: an address with its host bits cleared, and a
/// prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// The network of `addr` with `prefix` bits; host bits are cleared, as
    /// Kubernetes' `isCIDR` accepts them.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Self> {
        let network = match addr {
            IpAddr::V4(v4) if prefix <= 32 => IpAddr::V4(Ipv4Addr::from_bits(v4.to_bits() & mask32(prefix))),
            IpAddr::V6(v6) if prefix <= 128 => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & mask128(prefix))),
            _ => return None,
        };
        Some(Self { network, prefix })
    }

    pub fn network(&self) -> IpAddr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` is in the network; an address of the other family never is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip) {
            (IpAddr::V4(network), IpAddr::V4(ip)) => ip.to_bits() & mask32(self.prefix) == network.to_bits(),
            (IpAddr::V6(network), IpAddr::V6(ip)) => ip.to_bits() & mask128(self.prefix) == network.to_bits(),
            _ => false,
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix.min(32))).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix.min(128))).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = EgressError;

    /// `10.0.0.0/8`, `fd00::/8`; a bare address is a network of one.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let syntax = || EgressError::CidrSyntax(text.to_owned());
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            // Digits only: `u8::from_str` would also take a sign.
            Some(digits) if !digits.is_empty() && digits.len() <= 3 && digits.bytes().all(|b| b.is_ascii_digit()) => {
                digits.parse::<u8>().map_err(|_| syntax())?
            }
            Some(_) => return Err(syntax()),
        };
        Cidr::new(addr, prefix).ok_or(EgressError::CidrPrefix { text: text.to_owned(), max })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// A range of addresses that is not the public internet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SpecialRange {
    /// `0.0.0.0/8`, `::`.
    Unspecified,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// `169.254.0.0/16`, `fe80::/10`.
    LinkLocal,
    /// `10.0.0.0/8`, `172.16.0.0/12`, `192.168.0.0/16`, `fc00::/7`, and the old site-local `fec0::/10`.
    Private,
    /// `100.64.0.0/10`.
    CarrierGradeNat,
    /// `224.0.0.0/4`, `ff00::/8`.
    Multicast,
    /// `255.255.255.255`.
    Broadcast,
    /// `240.0.0.0/4`, `192.0.0.0/24`, the IETF's `2001::/23` (Teredo among
    /// them), local-use NAT64 `64:ff9b:1::/48`, and all of IPv6 outside
    /// global unicast `2000::/3`.
    Reserved,
    /// `192.0.2.0/24`, `198.51.100.0/24`, `203.0.113.0/24`, `2001:db8::/32`, `3fff::/20`.
    Documentation,
    /// `198.18.0.0/15`, `2001:2::/48`.
    Benchmarking,
}

impl SpecialRange {
    /// In words, as a refusal says it.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Loopback => "loopback",
            Self::LinkLocal => "link-local",
            Self::Private => "private",
            Self::CarrierGradeNat => "carrier-grade NAT",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Reserved => "reserved",
            Self::Documentation => "for documentation",
            Self::Benchmarking => "for benchmarking",
        }
    }

    /// A metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Loopback => "loopback",
            Self::LinkLocal => "link_local",
            Self::Private => "private",
            Self::CarrierGradeNat => "cgnat",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Reserved => "reserved",
            Self::Documentation => "documentation",
            Self::Benchmarking => "benchmarking",
        }
    }
}

/// An IPv6 form that carries an IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Embedding {
    /// `::ffff:a.b.c.d`.
    Mapped,
    /// `::a.b.c.d` (deprecated).
    Compatible,
    /// `64:ff9b::a.b.c.d`, the well-known NAT64 prefix.
    Nat64,
    /// `2002:aabb:ccdd::/48`.
    SixToFour,
}

impl Embedding {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Mapped => "IPv4-mapped",
            Self::Compatible => "IPv4-compatible",
            Self::Nat64 => "NAT64",
            Self::SixToFour => "6to4",
        }
    }
}

/// The IPv4 address an IPv6 address carries, and in which form.
pub fn embedded_ipv4(ip: Ipv6Addr) -> Option<(Embedding, Ipv4Addr)> {
    let s = ip.segments();
    let low32 = Ipv4Addr::from_bits(ip.to_bits() as u32);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some((Embedding::Mapped, low32)),
        // `::` and `::1` are IPv6's own, not IPv4-compatible addresses.
        [0, 0, 0, 0, 0, 0, _, _] if ip.to_bits() > 1 => Some((Embedding::Compatible, low32)),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some((Embedding::Nat64, low32)),
        [0x2002, high, low, ..] => {
            Some((Embedding::SixToFour, Ipv4Addr::from_bits(u32::from(high) << 16 | u32::from(low))))
        }
        _ => None,
    }
}

/// The special range an IPv4 address is in; `None` for the public internet.
pub fn classify_v4(ip: Ipv4Addr) -> Option<SpecialRange> {
    use SpecialRange::*;
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, _, _) => Unspecified,
        (127, _, _) => Loopback,
        (169, 254, _) => LinkLocal,
        (10, _, _) | (172, 16..=31, _) | (192, 168, _) => Private,
        (100, 64..=127, _) => CarrierGradeNat,
        (224..=239, _, _) => Multicast,
        _ if ip == Ipv4Addr::BROADCAST => Broadcast,
        (240..=255, _, _) | (192, 0, 0) => Reserved,
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Documentation,
        (198, 18..=19, _) => Benchmarking,
        _ => return None,
    })
}

/// The special range an IPv6 address is in, judged on its own (a form that
/// carries an IPv4 address is judged by that address: see [`classify`]).
fn classify_v6_own(ip: Ipv6Addr) -> Option<SpecialRange> {
    use SpecialRange::*;
    let s = ip.segments();
    Some(match s {
        _ if ip.is_unspecified() => Unspecified,
        _ if ip.is_loopback() => Loopback,
        [first, ..] if first & 0xffc0 == 0xfe80 => LinkLocal,
        [first, ..] if first & 0xffc0 == 0xfec0 || first & 0xfe00 == 0xfc00 => Private,
        [first, ..] if first & 0xff00 == 0xff00 => Multicast,
        [0x2001, 0x0db8, ..] => Documentation,
        [0x3fff, second, ..] if second < 0x1000 => Documentation,
        [0x2001, 0x0002, 0, ..] => Benchmarking,
        [0x2001, second, ..] if second < 0x0200 => Reserved,
        [0x64, 0xff9b, 1, ..] => Reserved,
        // The public IPv6 internet is global unicast, 2000::/3.
        [first, ..] if first & 0xe000 != 0x2000 => Reserved,
        _ => return None,
    })
}

/// Why an address is not the public internet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Special {
    pub range: SpecialRange,
    /// Set when an IPv6 address was judged by the IPv4 address it carries.
    pub via: Option<(Embedding, Ipv4Addr)>,
}

/// The special range of any address; `None` for the public internet.
pub fn classify(ip: IpAddr) -> Option<Special> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4).map(|range| Special { range, via: None }),
        IpAddr::V6(v6) => match embedded_ipv4(v6) {
            Some((form, v4)) => classify_v4(v4).map(|range| Special { range, via: Some((form, v4)) }),
            None => classify_v6_own(v6).map(|range| Special { range, via: None }),
        },
    }
}

/// A host rule's name: exact, or `*.domain` for every name under the domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// Holds `.domain`, with the leading dot.
    Under(String),
}

impl HostPattern {
    /// A name as the CRD's schema allows it (letters, digits and hyphens in
    /// dot-separated labels, at most 253 bytes), optionally after `*.`;
    /// upper case is taken as lower, and one trailing dot is dropped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let name = normalize_host(text);
        let (wildcard, domain) = match name.strip_prefix("*.") {
            Some(domain) => (true, domain),
            None => (false, name.as_str()),
        };
        if name.is_empty() || name.len() > MAX_HOST_BYTES {
            return Err(format!("host {text:?} must be 1 to {MAX_HOST_BYTES} bytes"));
        }
        let label_ok = |label: &str| {
            let bytes = label.as_bytes();
            !bytes.is_empty()
                && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
                && bytes[0] != b'-'
                && bytes[bytes.len() - 1] != b'-'
        };
        if !domain.split('.').all(label_ok) {
            return Err(format!(
                "host {text:?} is not a name: labels of letters, digits and inner hyphens, optionally after `*.`"
            ));
        }
        Ok(if wildcard { Self::Under(format!(".{domain}")) } else { Self::Exact(domain.to_owned()) })
    }

    /// Whether `host` (a probe's target name) is this pattern's.
    pub fn matches(&self, host: &str) -> bool {
        let host = normalize_host(host);
        match self {
            Self::Exact(name) => host == *name,
            Self::Under(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(name) => f.write_str(name),
            Self::Under(suffix) => write!(f, "*{suffix}"),
        }
    }
}

/// Lower case, without one trailing dot and IPv6 brackets.
fn normalize_host(host: &str) -> String {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase()
}

/// The IPv4 address an IPv6 address carries (mapped, NAT64, 6to4, ...), if any.
fn embedded_of(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V6(v6) => embedded_ipv4(v6).map(|(_, v4)| v4),
        IpAddr::V4(_) => None,
    }
}

/// One allow rule, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allowed {
    Cidr(Cidr),
    Host(HostPattern),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct AllowRule {
    what: Allowed,
    /// Every port when empty.
    ports: Vec<u16>,
}

impl AllowRule {
    fn from_rule(index: usize, rule: &EgressRule) -> Result<Self, EgressError> {
        let problem = |problem: String| EgressError::Rule { index, problem };
        let what = match (&rule.cidr, &rule.host) {
            (Some(cidr), None) => Allowed::Cidr(cidr.parse().map_err(|e: EgressError| problem(e.to_string()))?),
            (None, Some(host)) => Allowed::Host(HostPattern::parse(host).map_err(problem)?),
            _ => return Err(problem("an egress rule names either a cidr or a host".into())),
        };
        let ports = rule
            .ports
            .iter()
            .map(|port| match u16::try_from(*port) {
                Ok(port) if port > 0 => Ok(port),
                _ => Err(problem(format!("port {port} is outside 1 to 65535"))),
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { what, ports })
    }

    fn matches_target(&self, host: &str, ip: IpAddr, embedded: Option<Ipv4Addr>) -> bool {
        match &self.what {
            Allowed::Cidr(cidr) => cidr.contains(ip) || embedded.is_some_and(|v4| cidr.contains(IpAddr::V4(v4))),
            Allowed::Host(pattern) => pattern.matches(host),
        }
    }

    fn matches_port(&self, port: Option<u16>) -> bool {
        self.ports.is_empty() || port.is_some_and(|port| self.ports.contains(&port))
    }
}

/// What a pool's pods may reach: the pool's allow rules, and the cluster's
/// ranges on top of the ranges refused by default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    allow: Vec<AllowRule>,
    deny: Vec<Cidr>,
}

/// Why the policy refused an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Special(Special),
    /// In one of the cluster's ranges (`TIDEPOOL_EGRESS_DENY`).
    Cluster(Cidr),
    /// No rule allows it, and nothing is allowed without one (tubes).
    NotListed,
}

impl Reason {
    /// A bounded metric label: a [`SpecialRange::label`], or `cluster`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Special(special) => special.range.label(),
            Self::Cluster(_) => "cluster",
            Self::NotListed => "not_listed",
        }
    }
}

/// A refused target address, and why; its text is the probe's error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Refused {
    /// The name the target gave (or the address itself).
    pub host: String,
    pub ip: IpAddr,
    pub reason: Reason,
    /// A rule allows the address, but not on this port.
    pub rule_ports: Option<Vec<u16>>,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("refused by the pool's egress policy: ")?;
        let named = self.host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok() != Some(self.ip);
        if named {
            write!(f, "{} resolves to {}, which is ", self.host, self.ip)?;
        } else {
            write!(f, "{} is ", self.ip)?;
        }
        match self.reason {
            Reason::Special(Special { range, via: None }) => f.write_str(range.describe())?,
            Reason::Special(Special { range, via: Some((form, v4)) }) => {
                write!(f, "{} {v4}, which is {}", form.describe(), range.describe())?
            }
            Reason::Cluster(cidr) => write!(f, "in the cluster's range {cidr}")?,
            Reason::NotListed => f.write_str("not on the pool's allowlist")?,
        }
        if let Some(ports) = &self.rule_ports {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            let noun = if list.len() == 1 { "port" } else { "ports" };
            write!(f, " (the pool allows it on {noun} {} only)", list.join(", "))?;
        }
        Ok(())
    }
}

impl EgressPolicy {
    /// The pool's rules and the cluster's ranges, checked.
    pub fn new(allow: &[EgressRule], deny: Vec<Cidr>) -> Result<Self, EgressError> {
        let allow = allow.iter().enumerate().map(|(index, rule)| AllowRule::from_rule(index, rule));
        Ok(Self { allow: allow.collect::<Result<_, _>>()?, deny })
    }

    /// This policy with the cluster's ranges `deny` refused too.
    pub fn with_deny(mut self, deny: Vec<Cidr>) -> Self {
        self.deny.extend(deny);
        self
    }

    /// The policy from the environment's text: [`ALLOW_ENV`] and [`DENY_ENV`].
    pub fn parse(allow: &str, deny: &str) -> Result<Self, EgressError> {
        Self::new(&parse_allow(allow)?, parse_deny(deny)?)
    }

    /// Whether a probe of `host` may send to `ip` (on `port`, when the probe
    /// has one: icmp and traceroute have none, so only a rule for every port
    /// allows them).
    pub fn check(&self, host: &str, ip: IpAddr, port: Option<u16>) -> Result<(), Refused> {
        let ip = ip.to_canonical();
        let embedded = embedded_of(ip);
        let Err(rule_ports) = self.rule_allows(host, ip, embedded, port) else { return Ok(()) };
        let in_cluster =
            self.deny.iter().find(|cidr| cidr.contains(ip) || embedded.is_some_and(|v4| cidr.contains(IpAddr::V4(v4))));
        let reason = match (in_cluster, classify(ip)) {
            (Some(cidr), _) => Reason::Cluster(*cidr),
            (None, Some(special)) => Reason::Special(special),
            (None, None) => return Ok(()),
        };
        Err(Refused { host: host.to_owned(), ip, reason, rule_ports })
    }

    /// Whether a rule allows `host` at `ip` on `port`; if not, the ports of
    /// a rule that names it on others.
    fn rule_allows(
        &self,
        host: &str,
        ip: IpAddr,
        embedded: Option<Ipv4Addr>,
        port: Option<u16>,
    ) -> Result<(), Option<Vec<u16>>> {
        let mut rule_ports = None;
        for rule in &self.allow {
            if rule.matches_target(host, ip, embedded) {
                if rule.matches_port(port) {
                    return Ok(());
                }
                rule_ports = Some(rule.ports.clone());
            }
        }
        Err(rule_ports)
    }

    /// For tubes, which get nothing by default: whether a target named
    /// `host` on `port` may be dialled at all, before its name is resolved
    /// (a host rule names it, or a CIDR rule may hold its addresses).
    pub fn lists_name(&self, host: &str, port: u16) -> bool {
        let literal = host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok();
        self.allow.iter().any(|rule| {
            rule.matches_port(Some(port))
                && match (&rule.what, literal) {
                    (Allowed::Host(pattern), _) => pattern.matches(host),
                    (Allowed::Cidr(cidr), Some(ip)) => cidr.contains(ip.to_canonical()),
                    (Allowed::Cidr(_), None) => true,
                }
        })
    }

    /// For tubes: whether `host`, resolved to `ip`, may be dialled on
    /// `port`. Only a rule allows it; the ranges refused by default are
    /// refused unless a rule names them.
    pub fn check_listed(&self, host: &str, ip: IpAddr, port: u16) -> Result<(), Refused> {
        let ip = ip.to_canonical();
        self.rule_allows(host, ip, embedded_of(ip), Some(port)).map_err(|rule_ports| Refused {
            host: host.to_owned(),
            ip,
            reason: Reason::NotListed,
            rule_ports,
        })
    }

    /// Whether any allow rule or cluster range is set.
    pub fn is_default(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

impl fmt::Display for EgressPolicy {
    /// `public internet; allowed: 10.1.0.0/16 ports 5432, db.default.svc; cluster: 10.96.0.0/12`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("public internet")?;
        let rules: Vec<String> = self
            .allow
            .iter()
            .map(|rule| {
                let what = match &rule.what {
                    Allowed::Cidr(cidr) => cidr.to_string(),
                    Allowed::Host(pattern) => pattern.to_string(),
                };
                let ports: Vec<String> = rule.ports.iter().map(u16::to_string).collect();
                if ports.is_empty() { what } else { format!("{what} ports {}", ports.join(" ")) }
            })
            .collect();
        if !rules.is_empty() {
            write!(f, "; allowed: {}", rules.join(", "))?;
        }
        if !self.deny.is_empty() {
            let deny: Vec<String> = self.deny.iter().map(Cidr::to_string).collect();
            write!(f, "; cluster: {}", deny.join(", "))?;
        }
        Ok(())
    }
}

/// The pool's allow rules from their JSON (an array; empty text is none).
pub fn parse_allow(json: &str) -> Result<Vec<EgressRule>, EgressError> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let rules: Vec<EgressRule> = serde_json::from_str(json).map_err(|e| EgressError::Json(e.to_string()))?;
    // Checked here too, so a bad rule is an error at startup, not at the first probe.
    for (index, rule) in rules.iter().enumerate() {
        AllowRule::from_rule(index, rule)?;
    }
    Ok(rules)
}

/// The cluster's ranges: comma-separated CIDRs (spaces and empty items are
/// ignored; empty text is none).
pub fn parse_deny(text: &str) -> Result<Vec<Cidr>, EgressError> {
    text.split(',').map(str::trim).filter(|item| !item.is_empty()).map(str::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn range(text: &str) -> Option<SpecialRange> {
        classify(ip(text)).map(|special| special.range)
    }

    #[test]
    fn every_ipv4_range_from_end_to_end_and_its_neighbours() {
        use SpecialRange::*;
        let cases: &[(&str, &str, SpecialRange, &[&str])] = &[
            ("0.0.0.0", "0.255.255.255", Unspecified, &["1.0.0.0"]),
            ("127.0.0.0", "127.255.255.255", Loopback, &["126.255.255.255", "128.0.0.0"]),
            ("169.254.0.0", "169.254.255.255", LinkLocal, &["169.253.255.255", "169.255.0.0"]),
            ("10.0.0.0", "10.255.255.255", Private, &["9.255.255.255", "11.0.0.0"]),
            ("172.16.0.0", "172.31.255.255", Private, &["172.15.255.255", "172.32.0.0"]),
            ("192.168.0.0", "192.168.255.255", Private, &["192.167.255.255", "192.169.0.0"]),
            ("100.64.0.0", "100.127.255.255", CarrierGradeNat, &["100.63.255.255", "100.128.0.0"]),
            ("224.0.0.0", "239.255.255.255", Multicast, &["223.255.255.255"]),
            ("240.0.0.0", "255.255.255.254", Reserved, &[]),
            ("255.255.255.255", "255.255.255.255", Broadcast, &[]),
            ("192.0.0.0", "192.0.0.255", Reserved, &["191.255.255.255", "192.0.1.0"]),
            ("192.0.2.0", "192.0.2.255", Documentation, &["192.0.3.0"]),
            ("198.51.100.0", "198.51.100.255", Documentation, &["198.51.99.255", "198.51.101.0"]),
            ("203.0.113.0", "203.0.113.255", Documentation, &["203.0.112.255", "203.0.114.0"]),
            ("198.18.0.0", "198.19.255.255", Benchmarking, &["198.17.255.255", "198.20.0.0"]),
        ];
        for (first, last, expected, outside) in cases {
            assert_eq!(range(first), Some(*expected), "{first}");
            assert_eq!(range(last), Some(*expected), "{last}");
            for neighbour in *outside {
                assert_eq!(range(neighbour), None, "{neighbour} is public");
            }
        }
        for public in ["1.1.1.1", "8.8.8.8", "93.184.216.34", "223.255.255.255"] {
            assert_eq!(range(public), None, "{public}");
        }
    }

    #[test]
    fn every_ipv6_range_and_the_forms_that_carry_ipv4() {
        use SpecialRange::*;
        let cases: &[(&str, SpecialRange)] = &[
            ("::", Unspecified),
            ("::1", Loopback),
            ("fe80::", LinkLocal),
            ("febf:ffff::1", LinkLocal),
            ("fc00::", Private),
            ("fdff:ffff::1", Private),
            ("fec0::1", Private),
            ("ff02::1", Multicast),
            ("ff0e::1", Multicast),
            ("2001:db8::1", Documentation),
            ("3fff::1", Documentation),
            ("2001:2::1", Benchmarking),
            ("2001::1", Reserved),
            ("2001:1ff::1", Reserved),
            ("64:ff9b:1::1", Reserved),
            ("100::1", Reserved),
            ("4000::1", Reserved),
            ("::ffff:0:0:1", Reserved),
        ];
        for (text, expected) in cases {
            assert_eq!(range(text), Some(*expected), "{text}");
        }
        for public in ["2606:4700:4700::1111", "2001:4860:4860::8888", "2a00:1450::1", "2001:200::1", "3fff:1000::1"] {
            assert_eq!(range(public), None, "{public}");
        }
        // The forms that carry IPv4 are judged by the IPv4 address.
        let forms: &[(&str, Embedding, &str, Option<SpecialRange>)] = &[
            ("::ffff:127.0.0.1", Embedding::Mapped, "127.0.0.1", Some(Loopback)),
            ("::ffff:8.8.8.8", Embedding::Mapped, "8.8.8.8", None),
            ("::10.0.0.1", Embedding::Compatible, "10.0.0.1", Some(Private)),
            ("::8.8.8.8", Embedding::Compatible, "8.8.8.8", None),
            ("64:ff9b::a9fe:a9fe", Embedding::Nat64, "169.254.169.254", Some(LinkLocal)),
            ("64:ff9b::808:808", Embedding::Nat64, "8.8.8.8", None),
            ("2002:c0a8:0101::1", Embedding::SixToFour, "192.168.1.1", Some(Private)),
            ("2002:7f00:1::", Embedding::SixToFour, "127.0.0.1", Some(Loopback)),
            ("2002:0808:0808::1", Embedding::SixToFour, "8.8.8.8", None),
            ("2002:6440::1", Embedding::SixToFour, "100.64.0.0", Some(CarrierGradeNat)),
        ];
        for (text, form, v4, expected) in forms {
            let IpAddr::V6(v6) = ip(text) else { unreachable!() };
            assert_eq!(embedded_ipv4(v6), Some((*form, v4.parse().unwrap())), "{text}");
            assert_eq!(range(text), *expected, "{text}");
            if expected.is_some() {
                assert_eq!(classify(ip(text)).unwrap().via, Some((*form, v4.parse().unwrap())), "{text}");
            }
        }
        assert_eq!(embedded_ipv4("::1".parse().unwrap()), None);
        assert_eq!(embedded_ipv4("::".parse().unwrap()), None);
    }

    #[test]
    fn cidrs_parse_mask_and_contain() {
        let cidr: Cidr = "10.96.3.4/12".parse().unwrap();
        assert_eq!(cidr.to_string(), "10.96.0.0/12");
        assert!(cidr.contains(ip("10.96.0.1")) && cidr.contains(ip("10.111.255.255")));
        assert!(!cidr.contains(ip("10.112.0.0")) && !cidr.contains(ip("::ffff:10.96.0.1")));
        assert_eq!("fd00::/8".parse::<Cidr>().unwrap().to_string(), "fd00::/8");
        assert!("fd00::/8".parse::<Cidr>().unwrap().contains(ip("fdab::1")));
        assert_eq!("1.2.3.4".parse::<Cidr>().unwrap().to_string(), "1.2.3.4/32");
        assert_eq!("::1".parse::<Cidr>().unwrap().prefix(), 128);
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("255.1.2.3")));
        assert!("::/0".parse::<Cidr>().unwrap().contains(ip("2001:db8::1")));
        for bad in ["", "/8", "10.0.0.0/", "10.0.0.0/+8", "10.0.0.0/ 8", "10.0.0/8", "example.org/8", "10.0.0.0/8/8"] {
            assert!(matches!(bad.parse::<Cidr>(), Err(EgressError::CidrSyntax(_))), "{bad:?}");
        }
        assert_eq!("10.0.0.0/33".parse::<Cidr>(), Err(EgressError::CidrPrefix { text: "10.0.0.0/33".into(), max: 32 }));
        assert!(matches!("::/129".parse::<Cidr>(), Err(EgressError::CidrPrefix { max: 128, .. })));
    }

    #[test]
    fn host_patterns_match_the_name_or_the_names_under_it() {
        let exact = HostPattern::parse("db.default.svc").unwrap();
        assert!(
            exact.matches("db.default.svc") && exact.matches("DB.Default.SVC.") && !exact.matches("x.db.default.svc")
        );
        let under = HostPattern::parse("*.Example.org").unwrap();
        assert_eq!(under.to_string(), "*.example.org");
        assert!(under.matches("a.example.org") && under.matches("a.b.example.org"));
        assert!(!under.matches("example.org") && !under.matches("badexample.org") && !under.matches(".example.org"));
        for bad in ["", "*", "*.", "a..b", "-a.b", "a-.b", "a_b", "a b", "*.*.b", "a.*.b", "x".repeat(254).as_str()] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    fn rule(cidr: Option<&str>, host: Option<&str>, ports: &[i32]) -> EgressRule {
        EgressRule { cidr: cidr.map(Into::into), host: host.map(Into::into), ports: ports.to_vec() }
    }

    #[test]
    fn by_default_only_the_public_internet_is_allowed() {
        let policy = EgressPolicy::default();
        assert_eq!(policy.check("example.org", ip("93.184.216.34"), Some(443)), Ok(()));
        assert_eq!(policy.check("2606:4700::1", ip("2606:4700::1"), None), Ok(()));
        let refused = policy.check("127.0.0.1", ip("127.0.0.1"), Some(80)).unwrap_err();
        assert_eq!(refused.to_string(), "refused by the pool's egress policy: 127.0.0.1 is loopback");
        assert_eq!(refused.reason.label(), "loopback");
        let named = policy.check("localhost", ip("::1"), Some(80)).unwrap_err();
        assert_eq!(
            named.to_string(),
            "refused by the pool's egress policy: localhost resolves to ::1, which is loopback"
        );
        let metadata = policy.check("[64:ff9b::a9fe:a9fe]", ip("64:ff9b::a9fe:a9fe"), None).unwrap_err();
        assert_eq!(
            metadata.to_string(),
            "refused by the pool's egress policy: 64:ff9b::a9fe:a9fe is NAT64 169.254.169.254, which is link-local"
        );
        // An IPv4-mapped address is the IPv4 address.
        let mapped = policy.check("h", ip("::ffff:10.1.2.3"), None).unwrap_err();
        assert_eq!(mapped.ip, ip("10.1.2.3"));
        assert_eq!(mapped.reason.label(), "private");
    }

    #[test]
    fn the_clusters_ranges_are_refused_even_when_public() {
        let policy = EgressPolicy::new(&[], parse_deny("10.96.0.0/12, 203.1.0.0/16,,fd12::/64").unwrap()).unwrap();
        let service = policy.check("kubernetes.default.svc", ip("10.96.0.1"), Some(443)).unwrap_err();
        assert_eq!(
            service.to_string(),
            "refused by the pool's egress policy: kubernetes.default.svc resolves to 10.96.0.1, which is in the \
             cluster's range 10.96.0.0/12"
        );
        assert_eq!(service.reason.label(), "cluster");
        assert!(policy.check("p", ip("203.1.2.3"), Some(80)).is_err());
        assert!(policy.check("p", ip("64:ff9b::cb01:0203"), Some(80)).is_err(), "NAT64 of a cluster address");
        assert!(policy.check("p", ip("fd12::5"), Some(80)).is_err());
        assert_eq!(policy.check("p", ip("203.2.0.1"), Some(80)), Ok(()));
    }

    #[test]
    fn rules_allow_their_addresses_and_names_on_their_ports() {
        let rules = [
            rule(Some("10.1.0.0/16"), None, &[5432]),
            rule(None, Some("db.default.svc"), &[]),
            rule(None, Some("*.internal.example"), &[443, 8443]),
            rule(Some("127.0.0.0/8"), None, &[]),
        ];
        let deny = parse_deny("10.0.0.0/8").unwrap();
        let policy = EgressPolicy::new(&rules, deny).unwrap();
        assert_eq!(policy.check("10.1.2.3", ip("10.1.2.3"), Some(5432)), Ok(()), "a rule beats the cluster range");
        let wrong_port = policy.check("10.1.2.3", ip("10.1.2.3"), Some(22)).unwrap_err();
        assert_eq!(
            wrong_port.to_string(),
            "refused by the pool's egress policy: 10.1.2.3 is in the cluster's range 10.0.0.0/8 (the pool allows \
             it on port 5432 only)"
        );
        assert!(policy.check("10.1.2.3", ip("10.1.2.3"), None).is_err(), "no port: only an every-port rule");
        assert_eq!(policy.check("DB.default.svc.", ip("10.96.0.9"), None), Ok(()), "whatever it resolves to");
        assert_eq!(policy.check("api.internal.example", ip("192.168.1.1"), Some(8443)), Ok(()));
        let wrong_port = policy.check("api.internal.example", ip("192.168.1.1"), Some(80)).unwrap_err();
        assert!(wrong_port.to_string().ends_with("is private (the pool allows it on ports 443, 8443 only)"));
        assert!(policy.check("internal.example", ip("192.168.1.1"), Some(443)).is_err());
        assert_eq!(policy.check("localhost", ip("127.0.0.1"), None), Ok(()));
        assert_eq!(policy.check("h", ip("::ffff:127.0.0.1"), None), Ok(()), "mapped: the IPv4 rule");
        assert!(policy.check("localhost", ip("::1"), None).is_err(), "an IPv4 rule allows no IPv6 address");
        assert!(!policy.is_default());
    }

    #[test]
    fn tubes_reach_only_what_a_rule_lists() {
        let rules = [
            rule(Some("10.1.0.0/16"), None, &[5432]),
            rule(None, Some("db.default.svc"), &[5432]),
            rule(Some("127.0.0.1/32"), None, &[]),
        ];
        let policy = EgressPolicy::new(&rules, parse_deny("10.0.0.0/8").unwrap()).unwrap();
        // Before resolution: a host rule names it, or some CIDR rule may hold it.
        assert!(policy.lists_name("db.default.svc", 5432));
        assert!(policy.lists_name("anything.example", 5432), "a CIDR rule on 5432 may hold its addresses");
        assert!(policy.lists_name("127.0.0.1", 22));
        assert!(policy.lists_name("[::ffff:127.0.0.1]", 22), "a mapped literal is its IPv4 address");
        assert!(!policy.lists_name("10.2.0.1", 22), "a literal outside every every-port rule");
        let narrow = EgressPolicy::new(&rules[..2], Vec::new()).unwrap();
        assert!(!narrow.lists_name("db.default.svc", 22), "no rule on that port");
        assert!(policy.lists_name("db.default.svc", 22), "the every-port CIDR rule may hold it");
        // After resolution: a rule must allow the address, whatever its range.
        assert_eq!(policy.check_listed("db.default.svc", ip("10.96.0.9"), 5432), Ok(()));
        assert_eq!(policy.check_listed("x", ip("10.1.9.9"), 5432), Ok(()), "listed beats the cluster range");
        assert_eq!(policy.check_listed("localhost", ip("127.0.0.1"), 8080), Ok(()));
        let public = policy.check_listed("example.org", ip("93.184.216.34"), 5432).unwrap_err();
        assert_eq!(public.reason, Reason::NotListed, "no public internet by default");
        assert_eq!(public.reason.label(), "not_listed");
        assert_eq!(
            public.to_string(),
            "refused by the pool's egress policy: example.org resolves to 93.184.216.34, which is not on the \
             pool's allowlist"
        );
        let port = policy.check_listed("10.1.2.3", ip("10.1.2.3"), 22).unwrap_err();
        assert_eq!(port.rule_ports, Some(vec![5432]));
        let empty = EgressPolicy::default();
        assert!(!empty.lists_name("example.org", 443));
        assert!(empty.check_listed("example.org", ip("93.184.216.34"), 443).is_err());
    }

    #[test]
    fn bad_rules_name_their_index() {
        let check = |rules: &[EgressRule]| EgressPolicy::new(rules, Vec::new()).unwrap_err().to_string();
        assert_eq!(
            check(&[rule(Some("10.0.0.0/8"), None, &[]), rule(None, None, &[])]),
            "egress rule 1: an egress rule names either a cidr or a host"
        );
        assert!(check(&[rule(Some("10.0.0.0/8"), Some("a"), &[])]).contains("either a cidr or a host"));
        assert!(check(&[rule(Some("10.0.0.0/99"), None, &[])]).starts_with("egress rule 0: CIDR"));
        assert!(check(&[rule(None, Some("bad host"), &[])]).contains("is not a name"));
        assert_eq!(check(&[rule(None, Some("a"), &[0])]), "egress rule 0: port 0 is outside 1 to 65535");
        assert!(check(&[rule(None, Some("a"), &[65_536])]).contains("65536"));
    }

    #[test]
    fn the_environments_text_parses_as_the_operator_writes_it() {
        let policy = EgressPolicy::parse(
            r#"[{"cidr":"10.1.0.0/16","ports":[5432]},{"host":"db.default.svc"},{"host":"*.example.org","ports":[]}]"#,
            "10.96.0.0/12,10.244.0.0/16",
        )
        .unwrap();
        assert_eq!(
            policy.to_string(),
            "public internet; allowed: 10.1.0.0/16 ports 5432, db.default.svc, *.example.org; cluster: \
             10.96.0.0/12, 10.244.0.0/16"
        );
        assert_eq!(EgressPolicy::default().to_string(), "public internet");
        assert_eq!(
            EgressPolicy::parse(r#"[{"host":"a"}]"#, "").unwrap().with_deny(parse_deny("10.0.0.0/8").unwrap()),
            EgressPolicy::parse(r#"[{"host":"a"}]"#, "10.0.0.0/8").unwrap()
        );
        assert_eq!(EgressPolicy::parse("", "").unwrap(), EgressPolicy::default());
        assert_eq!(EgressPolicy::parse("  ", " , ").unwrap(), EgressPolicy::default());
        assert!(matches!(parse_allow("{}"), Err(EgressError::Json(_))));
        assert!(matches!(parse_allow(r#"[{"cidr":"x"}]"#), Err(EgressError::Rule { index: 0, .. })));
        assert!(matches!(parse_deny("10.0.0.0/8,nope"), Err(EgressError::CidrSyntax(text)) if text == "nope"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn any_ip() -> impl Strategy<Value = IpAddr> {
            prop_oneof![
                any::<u32>().prop_map(|b| IpAddr::V4(Ipv4Addr::from_bits(b))),
                any::<u128>().prop_map(|b| IpAddr::V6(Ipv6Addr::from_bits(b)))
            ]
        }

        fn label() -> impl Strategy<Value = String> {
            "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?"
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn cidr_parsing_never_panics(text in "\\PC{0,48}") {
                let _ = text.parse::<Cidr>();
                let _ = parse_deny(&text);
            }

            #[test]
            fn cidrs_round_trip_and_contain_their_network(ip in any_ip(), prefix in 0u8..=128) {
                let prefix = if ip.is_ipv4() { prefix % 33 } else { prefix };
                let text = format!("{ip}/{prefix}");
                let cidr: Cidr = text.parse().unwrap();
                prop_assert!(cidr.contains(ip), "{} in {}", ip, cidr);
                prop_assert_eq!(cidr.to_string().parse::<Cidr>().unwrap(), cidr);
                prop_assert_eq!(cidr.prefix(), prefix);
            }

            #[test]
            fn containment_is_prefix_equality(a in any::<u32>(), b in any::<u32>(), prefix in 0u8..=32) {
                let cidr = Cidr::new(IpAddr::V4(Ipv4Addr::from_bits(a)), prefix).unwrap();
                let same = prefix == 0 || (a ^ b) >> (32 - u32::from(prefix)) == 0;
                prop_assert_eq!(cidr.contains(IpAddr::V4(Ipv4Addr::from_bits(b))), same);
            }

            #[test]
            fn prefixes_past_the_family_are_refused(ip in any_ip(), extra in 1u16..200) {
                let max: u16 = if ip.is_ipv4() { 32 } else { 128 };
                let refused = format!("{ip}/{}", max + extra).parse::<Cidr>();
                prop_assert!(refused.is_err(), "{:?}", refused);
            }

            #[test]
            fn allow_rules_never_panic(json in "\\PC{0,64}") {
                let _ = parse_allow(&json);
            }

            #[test]
            fn well_formed_rules_are_taken(
                labels in proptest::collection::vec(label(), 1..4),
                wildcard in any::<bool>(),
                ports in proptest::collection::vec(1i32..=65535, 0..4),
            ) {
                let name = labels.join(".");
                let host = if wildcard { format!("*.{name}") } else { name.clone() };
                let rules = [rule(None, Some(&host), &ports), rule(Some("2001:db8::/32"), None, &[])];
                let json = serde_json::to_string(&rules).unwrap();
                let policy = EgressPolicy::parse(&json, "").unwrap();
                let port = ports.first().map(|p| *p as u16);
                let probed = if wildcard { format!("sub.{name}") } else { name.clone() };
                // Whatever it resolves to, on the rule's port.
                prop_assert_eq!(policy.check(&probed, "127.0.0.1".parse().unwrap(), port.or(Some(1))), Ok(()));
                if wildcard {
                    prop_assert!(policy.check(&name, "127.0.0.1".parse().unwrap(), port).is_err());
                }
            }

            #[test]
            fn host_patterns_never_panic(text in "\\PC{0,80}", host in "\\PC{0,80}") {
                if let Ok(pattern) = HostPattern::parse(&text) {
                    let _ = pattern.matches(&host);
                }
            }

            #[test]
            fn every_address_gets_an_answer_and_public_ones_pass(ip in any_ip(), port in any::<u16>()) {
                let policy = EgressPolicy::default();
                let verdict = policy.check("target", ip, Some(port));
                prop_assert_eq!(verdict.is_ok(), classify(ip.to_canonical()).is_none());
                if let Err(refused) = verdict {
                    prop_assert!(refused.to_string().starts_with("refused by the pool's egress policy: target resolves to "));
                }
            }
        }
    }
}
