//! Traceroute: UDP datagrams with growing TTL to ports 33434 and up; the ICMP
//! answers ("time exceeded" from each router, "port unreachable" from the
//! destination) come back on each socket's error queue (`IP_RECVERR`), which
//! needs no privilege on Linux.
//!
//! Each hop gets one datagram from its own socket. Hops go out in waves of
//! [`WAVE`] at once; the trace ends as soon as the destination (or a router
//! that refuses to go on) has answered and every hop before it has answered
//! or had its time.

use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tidepool_crds::test_session::{ProbeKind, ProbeTimings};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout, timeout_at};

use super::Context;
use super::net::{self, Deadline};
use super::outcome::{Hop, ProbeOutcome, ms};

/// The first destination port, as traditional traceroute's.
pub const BASE_PORT: u16 = 33434;
/// Hops probed at once.
const WAVE: u8 = 10;
const PAYLOAD: &[u8] = b"tidepool traceroute";

/// `sock_extended_err.ee_origin` for ICMP and ICMPv6 (linux/errqueue.h).
const ORIGIN_ICMP: u8 = 2;
const ORIGIN_ICMP6: u8 = 3;

/// An ICMP error as `IP_RECVERR` / `IPV6_RECVERR` hands it over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ExtendedError {
    pub origin: u8,
    pub icmp_type: u8,
    pub code: u8,
    /// Who sent the ICMP error.
    pub offender: Option<IpAddr>,
}

/// Reads a `struct sock_extended_err` and the offender's address after it:
/// `errno u32, origin u8, type u8, code u8, pad u8, info u32, data u32`, then
/// a `sockaddr_in` or `sockaddr_in6`.
pub(crate) fn parse_extended_error(bytes: &[u8]) -> Option<ExtendedError> {
    let header = bytes.get(..16)?;
    let addr = &bytes[16..];
    let family = addr.get(..2).map(|family| i32::from(u16::from_ne_bytes([family[0], family[1]])));
    let offender = match family {
        Some(libc::AF_INET) => <[u8; 4]>::try_from(addr.get(4..8)?).ok().map(|ip| IpAddr::from(Ipv4Addr::from(ip))),
        Some(libc::AF_INET6) => <[u8; 16]>::try_from(addr.get(8..24)?).ok().map(|ip| IpAddr::from(Ipv6Addr::from(ip))),
        _ => None,
    };
    Some(ExtendedError { origin: header[4], icmp_type: header[5], code: header[6], offender })
}

/// What answered one hop's datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Answer {
    /// A router on the way: the TTL ran out there.
    TimeExceeded(IpAddr),
    /// Destination unreachable: `port` for "port unreachable", which the
    /// destination itself answers.
    Unreachable { from: IpAddr, code: u8, port: bool },
    /// The destination answered the datagram itself.
    Reply(IpAddr),
}

impl Answer {
    pub fn from(&self) -> IpAddr {
        match *self {
            Self::TimeExceeded(from) | Self::Unreachable { from, .. } | Self::Reply(from) => from,
        }
    }
}

pub(crate) fn classify(error: &ExtendedError) -> Option<Answer> {
    let from = error.offender?;
    match (error.origin, error.icmp_type) {
        (ORIGIN_ICMP, 11) | (ORIGIN_ICMP6, 3) => Some(Answer::TimeExceeded(from)),
        (ORIGIN_ICMP, 3) => Some(Answer::Unreachable { from, code: error.code, port: error.code == 3 }),
        (ORIGIN_ICMP6, 1) => Some(Answer::Unreachable { from, code: error.code, port: error.code == 4 }),
        _ => None,
    }
}

/// "host unreachable" and the like, for an unreachable answer that ends the trace.
fn unreachable_name(v6: bool, code: u8) -> String {
    let name = match (v6, code) {
        (false, 0) => "network unreachable",
        (false, 1) => "host unreachable",
        (false, 2) => "protocol unreachable",
        (false, 9 | 10 | 13) | (true, 1) => "administratively prohibited",
        (true, 0) => "no route to destination",
        (true, 3) => "address unreachable",
        _ => return format!("destination unreachable (code {code})"),
    };
    name.to_owned()
}

/// What the socket's error queue held.
enum Queued {
    Empty,
    Answer(Answer),
    /// An error that answers nothing (a redirect, a local error).
    Other,
}

/// Takes one message off the socket's error queue.
fn read_error_queue(fd: RawFd) -> io::Result<Queued> {
    let mut data = [0u8; 64];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    // u64 keeps the control buffer aligned for cmsghdr.
    let mut control = [0u64; 64];
    // SAFETY: msghdr is plain data; all-zero is a valid (empty) value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&control) as _;
    // SAFETY: the iovec and the control buffer point to live local buffers of
    // the lengths given, and outlive the call.
    if unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) } < 0 {
        let error = io::Error::last_os_error();
        return if error.kind() == io::ErrorKind::WouldBlock { Ok(Queued::Empty) } else { Err(error) };
    }
    // SAFETY: msg is the header recvmsg just filled in; the CMSG macros stay
    // within its control buffer, and CMSG_DATA points to cmsg_len - CMSG_LEN(0)
    // bytes of it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while let Some(header) = cmsg.as_ref() {
            let recverr = (header.cmsg_level, header.cmsg_type) == (libc::SOL_IP, libc::IP_RECVERR)
                || (header.cmsg_level, header.cmsg_type) == (libc::SOL_IPV6, libc::IPV6_RECVERR);
            if recverr {
                #[allow(clippy::unnecessary_cast)] // cmsg_len is usize on glibc, u32 on musl
                let len = (header.cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let bytes = std::slice::from_raw_parts(libc::CMSG_DATA(cmsg), len);
                let answer = parse_extended_error(bytes).as_ref().and_then(classify);
                return Ok(answer.map_or(Queued::Other, Queued::Answer));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Queued::Other)
}

/// A UDP socket sending with `ttl`, its ICMP errors queued, connected to the hop's port.
fn hop_socket(dest: IpAddr, ttl: u8) -> io::Result<UdpSocket> {
    let domain = if dest.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let socket = Socket::new(domain, Type::DGRAM, None)?;
    let on: libc::c_int = 1;
    let (level, option) = if dest.is_ipv4() {
        socket.set_ttl_v4(u32::from(ttl))?;
        (libc::SOL_IP, libc::IP_RECVERR)
    } else {
        socket.set_unicast_hops_v6(u32::from(ttl))?;
        (libc::SOL_IPV6, libc::IPV6_RECVERR)
    };
    // SAFETY: the option value is a live c_int and its size is given.
    let set = unsafe {
        libc::setsockopt(socket.as_raw_fd(), level, option, (&raw const on).cast(), mem::size_of_val(&on) as _)
    };
    if set < 0 {
        return Err(io::Error::last_os_error());
    }
    socket.set_nonblocking(true)?;
    socket.connect(&SocketAddr::new(dest, BASE_PORT + u16::from(ttl) - 1).into())?;
    UdpSocket::from_std(socket.into())
}

/// Sends one datagram with `ttl`: the socket to wait on, and when it went.
async fn send_hop(dest: IpAddr, ttl: u8) -> io::Result<(UdpSocket, Instant)> {
    let socket = hop_socket(dest, ttl)?;
    socket.send(PAYLOAD).await?;
    Ok((socket, Instant::now()))
}

/// Waits up to `wait` for what answers a hop's datagram: the answer and its round trip.
async fn answer(socket: UdpSocket, sent: Instant, dest: IpAddr, wait: Duration) -> Option<(Answer, f64)> {
    let answered = socket.async_io(Interest::ERROR | Interest::READABLE, || {
        loop {
            match read_error_queue(socket.as_raw_fd())? {
                Queued::Answer(answer) => return Ok(answer),
                Queued::Other => {}
                Queued::Empty => break,
            }
        }
        // Nothing queued: the destination may have answered the datagram itself.
        let mut buf = [0u8; 64];
        // SAFETY: buf is a live local buffer of the length given.
        let read = unsafe { libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if read < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Answer::Reply(dest))
    });
    // An error here is a pending socket error with nothing queued to tell who
    // sent it: the hop stays silent, as it does when nothing comes in time.
    let answer = timeout(wait, answered).await.ok()?.ok()?;
    Some((answer, ms(sent.elapsed())))
}

/// What came back for one hop: who answered and the round trip, or nothing in time.
type Heard = Option<(Answer, f64)>;

/// Whether the hops heard so far, in TTL order, already end the trace: the
/// first hop that did not just pass the datagram on has answered.
fn settled(wave: &[Option<io::Result<Heard>>]) -> bool {
    for hop in wave {
        match hop {
            None => return false,
            Some(Ok(None | Some((Answer::TimeExceeded(_), _)))) => {}
            Some(Err(_) | Ok(Some(_))) => return true,
        }
    }
    false
}

/// Sends hops `first..=last` at once (in TTL order, so that a destination that
/// answers only a few of them sees the lowest TTL first) and listens until
/// the trace is settled, each hop has answered or waited `wait`, or the
/// deadline passes (`true` then).
async fn wave(dest: IpAddr, first: u8, last: u8, wait: Duration, deadline: Instant) -> (Vec<io::Result<Heard>>, bool) {
    let mut heard: Vec<Option<io::Result<Heard>>> = (first..=last).map(|_| None).collect();
    let mut listening = JoinSet::new();
    for ttl in first..=last {
        match send_hop(dest, ttl).await {
            Ok((socket, sent)) => {
                listening.spawn(async move { (ttl, answer(socket, sent, dest, wait).await) });
            }
            Err(error) => heard[usize::from(ttl - first)] = Some(Err(error)),
        }
    }
    let mut expired = false;
    while !settled(&heard) {
        match timeout_at(deadline, listening.join_next()).await {
            Ok(Some(Ok((ttl, answer)))) => heard[usize::from(ttl - first)] = Some(Ok(answer)),
            // A hop whose task failed stays silent.
            Ok(Some(Err(_))) => {}
            Ok(None) => break,
            Err(_) => {
                expired = true;
                break;
            }
        }
    }
    (heard.into_iter().map(|hop| hop.unwrap_or(Ok(None))).collect(), expired)
}

/// The route to `host`, hop by hop, up to `max_hops`.
pub(crate) async fn traceroute_probe(ctx: &Context, host: &str) -> ProbeOutcome {
    let mut outcome = ProbeOutcome::new(ProbeKind::Traceroute, host.to_owned());
    outcome.result.protocol = Some("UDP".into());
    let settings = &ctx.settings;
    let start = Instant::now();
    let deadline = Deadline::after(settings.timeout);
    let dest = match net::resolve_allowed(settings, host, None, deadline, &mut outcome.facts.egress_refused).await {
        Ok(addrs) => addrs[0].ip(),
        Err(error) => return outcome.fail(error),
    };
    let dns_ms = ms(start.elapsed());
    let max_hops = settings.max_hops();
    let mut hops: Vec<Hop> = Vec::new();
    // The destination's round trip once reached, or why the trace ended.
    let mut end: Option<Result<f64, String>> = None;
    'trace: for first in (1..=max_hops).step_by(usize::from(WAVE)) {
        let last = first.saturating_add(WAVE - 1).min(max_hops);
        if let Err(spent) = settings.budget.charge(u64::from(last - first + 1) * PAYLOAD.len() as u64) {
            end = Some(Err(format!("traceroute to {dest}: {spent}")));
            break;
        }
        let (heard, expired) = wave(dest, first, last, settings.reply_wait, deadline.at).await;
        for (ttl, hop) in (first..=last).zip(heard) {
            let (answer, rtt) = match hop {
                Err(error) => {
                    end = Some(Err(format!("traceroute to {dest}: hop {ttl}: {error}")));
                    break 'trace;
                }
                Ok(None) => {
                    hops.push(Hop { ttl, addr: None, rtt_ms: None });
                    continue;
                }
                Ok(Some(answered)) => answered,
            };
            hops.push(Hop { ttl, addr: Some(answer.from()), rtt_ms: Some(rtt) });
            match answer {
                Answer::TimeExceeded(_) => continue,
                Answer::Reply(_) | Answer::Unreachable { port: true, .. } => end = Some(Ok(rtt)),
                Answer::Unreachable { from, .. } if from == dest => end = Some(Ok(rtt)),
                Answer::Unreachable { from, code, .. } => {
                    let why = unreachable_name(dest.is_ipv6(), code);
                    end = Some(Err(format!("traceroute to {dest}: hop {ttl} ({from}) says {why}")));
                }
            }
            break 'trace;
        }
        if expired {
            end = Some(Err(deadline.expired(format_args!("traceroute to {dest}"))));
            break;
        }
    }
    let total_ms = match end {
        Some(Ok(rtt)) => rtt,
        _ => ms(start.elapsed()),
    };
    outcome.result.timings = Some(ProbeTimings { dns_ms: Some(dns_ms), total_ms, ..ProbeTimings::default() });
    outcome.facts.hops = hops;
    match end {
        Some(Ok(_)) => {
            outcome.result.ok = true;
            outcome
        }
        Some(Err(error)) => outcome.fail(error),
        None => outcome.fail(format!("traceroute to {dest}: not reached within {max_hops} hops")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extended(origin: u8, icmp_type: u8, code: u8, offender: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend(113u32.to_ne_bytes()); // errno
        bytes.extend([origin, icmp_type, code, 0]);
        bytes.extend(0u32.to_ne_bytes()); // info
        bytes.extend(0u32.to_ne_bytes()); // data
        bytes.extend(offender);
        bytes
    }

    fn sockaddr_in(ip: [u8; 4]) -> Vec<u8> {
        let mut addr = (libc::AF_INET as u16).to_ne_bytes().to_vec();
        addr.extend([0, 0]);
        addr.extend(ip);
        addr.extend([0; 8]);
        addr
    }

    fn sockaddr_in6(ip: Ipv6Addr) -> Vec<u8> {
        let mut addr = (libc::AF_INET6 as u16).to_ne_bytes().to_vec();
        addr.extend([0; 6]); // port, flow info
        addr.extend(ip.octets());
        addr.extend([0; 4]); // scope
        addr
    }

    #[test]
    fn reads_time_exceeded_and_port_unreachable() {
        let router = extended(ORIGIN_ICMP, 11, 0, &sockaddr_in([198, 18, 1, 1]));
        let parsed = parse_extended_error(&router).unwrap();
        assert_eq!(classify(&parsed), Some(Answer::TimeExceeded("198.18.1.1".parse().unwrap())));

        let dest = extended(ORIGIN_ICMP, 3, 3, &sockaddr_in([198, 18, 2, 2]));
        let answer = classify(&parse_extended_error(&dest).unwrap()).unwrap();
        assert_eq!(answer, Answer::Unreachable { from: "198.18.2.2".parse().unwrap(), code: 3, port: true });

        let v6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let hop = classify(&parse_extended_error(&extended(ORIGIN_ICMP6, 3, 0, &sockaddr_in6(v6))).unwrap());
        assert_eq!(hop, Some(Answer::TimeExceeded(v6.into())));
        let port = classify(&parse_extended_error(&extended(ORIGIN_ICMP6, 1, 4, &sockaddr_in6(v6))).unwrap());
        assert_eq!(port, Some(Answer::Unreachable { from: v6.into(), code: 4, port: true }));
    }

    #[test]
    fn ignores_what_it_cannot_read() {
        assert_eq!(parse_extended_error(&[0; 15]), None);
        let local = parse_extended_error(&extended(1, 0, 0, &[])).unwrap();
        assert_eq!(local.offender, None);
        assert_eq!(classify(&local), None);
        let odd = parse_extended_error(&extended(ORIGIN_ICMP, 5, 0, &sockaddr_in([10, 0, 0, 1]))).unwrap();
        assert_eq!(classify(&odd), None, "a redirect is no answer");
    }

    #[test]
    fn a_wave_settles_once_the_hops_before_the_end_are_in() {
        let router = Some(Ok(Some((Answer::TimeExceeded("198.18.1.1".parse().unwrap()), 1.0))));
        let dest = || Some(Ok(Some((Answer::Reply("198.18.2.2".parse().unwrap()), 2.0))));
        assert!(!settled(&[None, dest()]), "hop 1 may still answer");
        assert!(settled(&[router, dest(), None]), "later hops do not matter");
        assert!(settled(&[Some(Ok(None)), dest()]), "a silent hop is passed over");
        assert!(!settled(&[Some(Ok(None)), Some(Ok(None))]), "nothing ended it");
        assert!(settled(&[Some(Err(io::ErrorKind::NetworkUnreachable.into())), None]));
    }

    #[test]
    fn names_unreachables() {
        assert_eq!(unreachable_name(false, 1), "host unreachable");
        assert_eq!(unreachable_name(false, 13), "administratively prohibited");
        assert_eq!(unreachable_name(true, 1), "administratively prohibited");
        assert_eq!(unreachable_name(true, 9), "destination unreachable (code 9)");
    }
}
