//! The UDP echo through the gateway: the gateway wraps each client probe
//! with the client's address and passes it to the pod; the pod echoes the
//! wrapped datagram back to the gateway, which sends the probe on to that
//! address. The pod checks the probe's cookie against the wrapped address,
//! as it checks a direct probe against its source, so the cookie stays
//! bound to the client.
//!
//! Layout, big-endian: magic `TPR1` | tag (16 bytes) | client IP (16
//! bytes, IPv4 as IPv4-mapped IPv6) | client port u16 | the probe
//! ([`crate::pod::UdpProbe`], 32 to 1472 bytes). The tag is the first 16
//! bytes of HMAC-SHA256 under the relay key (which only the gateway and the
//! pod can derive, from the relay ticket) of the address, the port and the
//! probe's 32-byte header, so nobody else can name a client address to the
//! pod, or an address the gateway should send an echo to.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use ring::hmac;

use crate::pod::{UDP_HEADER_BYTES, UDP_MAX_BYTES};

pub const RELAY_MAGIC: [u8; 4] = *b"TPR1";
const TAG_BYTES: usize = 16;
const TAG_AT: usize = 4;
const ADDRESS_AT: usize = TAG_AT + TAG_BYTES;
/// Magic, tag, address and port.
pub const RELAY_HEADER_BYTES: usize = ADDRESS_AT + 16 + 2;
/// The largest relayed datagram: the header and the largest probe.
pub const RELAY_MAX_BYTES: usize = RELAY_HEADER_BYTES + UDP_MAX_BYTES;

/// The key that tags relayed datagrams (see
/// [`tidepool_wire::token::relay_key`]).
pub struct RelayKey(hmac::Key);

impl RelayKey {
    pub fn new(bytes: &[u8; 32]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    fn tag(&self, datagram: &[u8]) -> [u8; TAG_BYTES] {
        let mut context = hmac::Context::with_key(&self.0);
        // The address, the port and the probe's header.
        context.update(&datagram[ADDRESS_AT..RELAY_HEADER_BYTES + UDP_HEADER_BYTES]);
        let mut tag = [0u8; TAG_BYTES];
        tag.copy_from_slice(&context.sign().as_ref()[..TAG_BYTES]);
        tag
    }
}

impl std::fmt::Debug for RelayKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RelayKey(<secret>)")
    }
}

/// Why a datagram was not a sound relayed probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    #[error("relayed datagram of {0} bytes is outside {min}..={RELAY_MAX_BYTES}", min = RELAY_HEADER_BYTES + UDP_HEADER_BYTES)]
    Size(usize),
    #[error("datagram does not start with TPR1")]
    Magic,
    #[error("the relay tag does not match")]
    Tag,
}

/// Whether `datagram` claims to be relayed (its tag still unchecked).
pub fn is_relayed(datagram: &[u8]) -> bool {
    datagram.starts_with(&RELAY_MAGIC)
}

/// Writes `probe`, wrapped for `client` and tagged, into `out`; the
/// wrapped length. `probe` must be a probe's size.
pub fn wrap(key: &RelayKey, client: SocketAddr, probe: &[u8], out: &mut [u8]) -> Result<usize, RelayError> {
    if !(UDP_HEADER_BYTES..=UDP_MAX_BYTES).contains(&probe.len()) {
        return Err(RelayError::Size(probe.len() + RELAY_HEADER_BYTES));
    }
    let len = RELAY_HEADER_BYTES + probe.len();
    let out = out.get_mut(..len).ok_or(RelayError::Size(len))?;
    out[..TAG_AT].copy_from_slice(&RELAY_MAGIC);
    let ip = match client.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out[ADDRESS_AT..ADDRESS_AT + 16].copy_from_slice(&ip.octets());
    out[ADDRESS_AT + 16..RELAY_HEADER_BYTES].copy_from_slice(&client.port().to_be_bytes());
    out[RELAY_HEADER_BYTES..].copy_from_slice(probe);
    seal(key, out)?;
    Ok(len)
}

/// Tags a wrapped datagram again after its probe changed (the pod stamps
/// its time into it before echoing).
pub fn seal(key: &RelayKey, datagram: &mut [u8]) -> Result<(), RelayError> {
    check_frame(datagram)?;
    let tag = key.tag(datagram);
    datagram[TAG_AT..ADDRESS_AT].copy_from_slice(&tag);
    Ok(())
}

/// Checks a wrapped datagram's frame and tag; the client it names and where
/// its probe starts (at [`RELAY_HEADER_BYTES`]).
pub fn open(key: &RelayKey, datagram: &[u8]) -> Result<SocketAddr, RelayError> {
    check_frame(datagram)?;
    let expected = key.tag(datagram);
    // Constant time: a forger learns nothing from how long a refusal took.
    let difference = expected.iter().zip(&datagram[TAG_AT..ADDRESS_AT]).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if difference != 0 {
        return Err(RelayError::Tag);
    }
    Ok(client_of(datagram))
}

fn check_frame(datagram: &[u8]) -> Result<(), RelayError> {
    if !(RELAY_HEADER_BYTES + UDP_HEADER_BYTES..=RELAY_MAX_BYTES).contains(&datagram.len()) {
        return Err(RelayError::Size(datagram.len()));
    }
    if !is_relayed(datagram) {
        return Err(RelayError::Magic);
    }
    Ok(())
}

fn client_of(datagram: &[u8]) -> SocketAddr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&datagram[ADDRESS_AT..ADDRESS_AT + 16]);
    let port = u16::from_be_bytes([datagram[ADDRESS_AT + 16], datagram[ADDRESS_AT + 17]]);
    SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)).to_canonical(), port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pod::UdpProbe;

    fn probe(len: usize) -> Vec<u8> {
        let mut datagram = vec![7u8; len];
        UdpProbe { cookie: 9, seq: 3, client_time_us: 100, server_time_us: 0 }.write(&mut datagram).unwrap();
        datagram
    }

    fn key(byte: u8) -> RelayKey {
        RelayKey::new(&[byte; 32])
    }

    #[test]
    fn a_wrapped_probe_opens_with_its_client_and_probe_intact() {
        for client in ["198.51.100.7:40000", "[2001:db8::1]:5"] {
            let client: SocketAddr = client.parse().unwrap();
            let mut out = [0u8; RELAY_MAX_BYTES];
            let len = wrap(&key(1), client, &probe(64), &mut out).unwrap();
            assert_eq!(len, RELAY_HEADER_BYTES + 64);
            assert_eq!(open(&key(1), &out[..len]), Ok(client));
            assert_eq!(&out[RELAY_HEADER_BYTES..len], probe(64).as_slice());
        }
    }

    #[test]
    fn another_key_a_changed_header_or_a_changed_address_fails_the_tag() {
        let client: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let mut out = [0u8; RELAY_MAX_BYTES];
        let len = wrap(&key(1), client, &probe(64), &mut out).unwrap();
        assert_eq!(open(&key(2), &out[..len]), Err(RelayError::Tag));
        for at in [TAG_AT, ADDRESS_AT + 15, RELAY_HEADER_BYTES - 1, RELAY_HEADER_BYTES + 12, RELAY_HEADER_BYTES + 31] {
            let mut changed = out;
            changed[at] ^= 1;
            assert_eq!(open(&key(1), &changed[..len]), Err(RelayError::Tag), "byte {at}");
        }
        // The padding after the probe's header is not covered: it carries nothing.
        let mut padded = out;
        padded[RELAY_HEADER_BYTES + 40] ^= 1;
        assert_eq!(open(&key(1), &padded[..len]), Ok(client));
    }

    #[test]
    fn a_stamped_echo_is_sealed_again() {
        let client: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        let mut out = [0u8; RELAY_MAX_BYTES];
        let len = wrap(&key(1), client, &probe(64), &mut out).unwrap();
        UdpProbe::stamp_server_time(&mut out[RELAY_HEADER_BYTES..len], 555);
        assert_eq!(open(&key(1), &out[..len]), Err(RelayError::Tag));
        seal(&key(1), &mut out[..len]).unwrap();
        assert_eq!(open(&key(1), &out[..len]), Ok(client));
        assert_eq!(UdpProbe::read(&out[RELAY_HEADER_BYTES..len]).unwrap().server_time_us, 555);
    }

    #[test]
    fn frames_of_the_wrong_size_or_magic_are_refused() {
        let client: SocketAddr = "198.51.100.7:1".parse().unwrap();
        let mut out = [0u8; RELAY_MAX_BYTES + 1];
        assert_eq!(wrap(&key(1), client, &[0u8; 31], &mut out), Err(RelayError::Size(31 + RELAY_HEADER_BYTES)));
        assert!(wrap(&key(1), client, &probe(UDP_MAX_BYTES), &mut out).is_ok());
        assert_eq!(wrap(&key(1), client, &probe(64), &mut [0u8; 80]), Err(RelayError::Size(RELAY_HEADER_BYTES + 64)));
        assert_eq!(open(&key(1), &out[..RELAY_MAX_BYTES + 1]), Err(RelayError::Size(RELAY_MAX_BYTES + 1)));
        assert_eq!(open(&key(1), &out[..RELAY_HEADER_BYTES + 31]), Err(RelayError::Size(RELAY_HEADER_BYTES + 31)));
        assert_eq!(open(&key(1), &[0u8; 100]), Err(RelayError::Magic));
        assert!(!is_relayed(&probe(64)) && is_relayed(b"TPR1..."));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn any_bytes_open_or_fail_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1600)) {
                let mut framed = bytes.clone();
                if framed.len() >= 4 {
                    framed[..4].copy_from_slice(&RELAY_MAGIC);
                }
                for datagram in [&bytes, &framed] {
                    prop_assert!(open(&key(1), datagram).is_err());
                }
            }

            #[test]
            fn any_probe_and_address_round_trip(len in UDP_HEADER_BYTES..=UDP_MAX_BYTES, ip in any::<[u8; 16]>(), port in any::<u16>()) {
                let client = SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)).to_canonical(), port);
                let mut out = [0u8; RELAY_MAX_BYTES];
                let written = wrap(&key(3), client, &probe(len), &mut out).unwrap();
                prop_assert_eq!(open(&key(3), &out[..written]), Ok(client));
            }
        }
    }
}
