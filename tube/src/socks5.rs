//! A SOCKS5 server (RFC 1928) in front of a tube's client end: `CONNECT`
//! opens a connection through the tube, `UDP ASSOCIATE` relays datagrams
//! through an association; `BIND` is not served.
//!
//! Only "no authentication" is offered: the listener is the user's own,
//! on their machine. Parsing is kept apart from I/O (pure functions on
//! bytes) so every malformed shape is tested without a socket. Requests are
//! read exactly, never past their end, so bytes a client sends early stay
//! in the socket for the tube to carry.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tidepool_wire::tube::Refusal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::mux::Mux;
use crate::udp::{Association, Datagram, DatagramError};

const VERSION: u8 = 5;
const NO_AUTHENTICATION: u8 = 0x00;
const NO_ACCEPTABLE_METHOD: u8 = 0xFF;

const CONNECT: u8 = 1;
const BIND: u8 = 2;
const UDP_ASSOCIATE: u8 = 3;

const IPV4: u8 = 1;
const DOMAIN: u8 = 3;
const IPV6: u8 = 4;

const SUCCEEDED: u8 = 0x00;
const GENERAL_FAILURE: u8 = 0x01;
const COMMAND_NOT_SUPPORTED: u8 = 0x07;
const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;

/// How long a refused client has to read its reply before it is closed.
const LINGER: Duration = Duration::from_secs(2);
/// The largest datagram a SOCKS5 client may send (UDP's own limit).
const MAX_UDP: usize = 65_535;
/// Bytes read at once from an association's control connection, only to
/// see it close.
const CONTROL_READ: usize = 512;

/// What a SOCKS5 server may hold.
#[derive(Clone, Copy, Debug)]
pub struct Socks5Limits {
    /// Local clients served at once: handshakes and UDP associations (a
    /// `CONNECT`'s connection counts against the tube's connections once
    /// carried). A client beyond is closed at once.
    pub clients: usize,
    /// How long the greeting and the request may take, and each reply.
    pub handshake_timeout: Duration,
    /// How long the pod may take to answer a `CONNECT`; beyond, the client
    /// is answered "host unreachable".
    pub open_timeout: Duration,
}

impl Default for Socks5Limits {
    fn default() -> Self {
        Self { clients: 256, handshake_timeout: Duration::from_secs(10), open_timeout: Duration::from_secs(30) }
    }
}

/// Serves SOCKS5 clients from `listener` through `mux` until the tube
/// ends; then `Ok`. Dropping the future closes every client it serves.
/// Failed accepts (a client gone, no file descriptors) are logged and
/// retried after a pause.
pub async fn serve(listener: TcpListener, mux: Mux, limits: Socks5Limits) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.clients));
    let mut clients = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let tcp = match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(e) => {
                        tracing::warn!(error = %e, "SOCKS5: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                // Beyond the cap the client is closed: dropping `tcp` does it.
                let Ok(permit) = permits.clone().try_acquire_owned() else { continue };
                let mux = mux.clone();
                clients.spawn(async move {
                    serve_client(tcp, &mux, limits).await;
                    drop(permit);
                });
            }
            Some(_) = clients.join_next() => {}
            () = mux.ended() => return Ok(()),
        }
    }
}

/// Why a handshake stopped short.
enum Refused {
    /// Nothing can be said: the connection closes.
    Silently,
    /// The client offered no method we take.
    NoMethod,
    /// The request is answered with this code.
    Reply(u8),
}

async fn serve_client(mut tcp: TcpStream, mux: &Mux, limits: Socks5Limits) {
    let request = match timeout(limits.handshake_timeout, handshake(&mut tcp)).await {
        Ok(Ok(request)) => request,
        Ok(Err(Refused::NoMethod)) => return close_after(tcp, &[VERSION, NO_ACCEPTABLE_METHOD]).await,
        Ok(Err(Refused::Reply(code))) => return close_after(tcp, &reply(code, UNSPECIFIED)).await,
        Ok(Err(Refused::Silently)) | Err(_) => return,
    };
    match request.command {
        Command::Connect => connect(tcp, mux, &request, limits).await,
        Command::UdpAssociate => associate(tcp, mux, limits).await,
        Command::Bind | Command::Other(_) => close_after(tcp, &reply(COMMAND_NOT_SUPPORTED, UNSPECIFIED)).await,
    }
}

async fn handshake(tcp: &mut TcpStream) -> Result<Request, Refused> {
    let methods = read_parsed(tcp, parse_greeting).await.map_err(|_| Refused::Silently)?;
    if !methods.contains(&NO_AUTHENTICATION) {
        return Err(Refused::NoMethod);
    }
    tcp.write_all(&[VERSION, NO_AUTHENTICATION]).await.map_err(|_| Refused::Silently)?;
    read_parsed(tcp, parse_request).await.map_err(|e| match e {
        ReadError::Io => Refused::Silently,
        ReadError::Parse(e) => Refused::Reply(e.reply()),
    })
}

enum ReadError {
    /// The client went, or sent too little.
    Io,
    Parse(Socks5Error),
}

/// Reads exactly as many bytes as `parse` asks for, until it has its value.
async fn read_parsed<T>(
    tcp: &mut TcpStream,
    parse: fn(&[u8]) -> Result<Parse<T>, Socks5Error>,
) -> Result<T, ReadError> {
    let mut bytes = Vec::with_capacity(16);
    loop {
        match parse(&bytes).map_err(ReadError::Parse)? {
            Parse::Done(value) => return Ok(value),
            Parse::Need(total) if total > bytes.len() => {
                let start = bytes.len();
                bytes.resize(total, 0);
                tcp.read_exact(&mut bytes[start..]).await.map_err(|_| ReadError::Io)?;
            }
            // A parser that asks for nothing more and is not done would loop.
            Parse::Need(_) => return Err(ReadError::Parse(Socks5Error::Short(bytes.len()))),
        }
    }
}

/// Writes `answer`, then closes so that the client can read it: closing
/// with its unread bytes in the socket would reset the connection, and a
/// reset may lose the answer.
async fn close_after(mut tcp: TcpStream, answer: &[u8]) {
    let _ = timeout(LINGER, async {
        tcp.write_all(answer).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; CONTROL_READ];
        while tcp.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

async fn connect(mut tcp: TcpStream, mux: &Mux, request: &Request, limits: Socks5Limits) {
    let host = request.address.host();
    let dialled =
        timeout(limits.open_timeout, mux.dial(&host, request.port)).await.unwrap_or(Err(Refusal::HostUnreachable));
    match dialled {
        Ok(dialled) => {
            // The reply goes before any byte of the target's, then the tube carries the socket.
            let answered = timeout(limits.handshake_timeout, tcp.write_all(&reply(SUCCEEDED, UNSPECIFIED))).await;
            if matches!(answered, Ok(Ok(()))) {
                dialled.carry(tcp);
            }
        }
        Err(refusal) => close_after(tcp, &reply(refusal.socks5_reply(), UNSPECIFIED)).await,
    }
}

/// UDP ASSOCIATE: a socket of our own beside the listener's address, and a
/// relay between it and an association, until the control connection closes.
async fn associate(mut tcp: TcpStream, mux: &Mux, limits: Socks5Limits) {
    let (Ok(local), Ok(client)) = (tcp.local_addr(), tcp.peer_addr()) else { return };
    let udp = match UdpSocket::bind(SocketAddr::new(local.ip(), 0)).await {
        Ok(udp) => udp,
        Err(_) => return close_after(tcp, &reply(GENERAL_FAILURE, UNSPECIFIED)).await,
    };
    let Ok(bound) = udp.local_addr() else { return close_after(tcp, &reply(GENERAL_FAILURE, UNSPECIFIED)).await };
    let bound = SocketAddr::new(bound.ip().to_canonical(), bound.port());
    if !matches!(timeout(limits.handshake_timeout, tcp.write_all(&reply(SUCCEEDED, bound))).await, Ok(Ok(()))) {
        return;
    }
    let mut relay = UdpRelay { udp, mux, client_ip: client.ip().to_canonical(), client_port: None, association: None };
    let mut control = [0u8; CONTROL_READ];
    let mut buffer = vec![0u8; MAX_UDP];
    loop {
        tokio::select! {
            // Nothing is expected on the control connection but its end.
            read = tcp.read(&mut control) => match read {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            },
            received = relay.udp.recv_from(&mut buffer) => {
                if let Ok((len, from)) = received {
                    relay.client_sent(&buffer[..len], from).await;
                }
            }
            datagram = next_datagram(&mut relay.association) => match datagram {
                Some(datagram) => relay.tube_sent(&datagram).await,
                // Ended (idle at the pod): the next datagram opens another.
                None => relay.association = None,
            },
        }
    }
}

async fn next_datagram(association: &mut Option<Association>) -> Option<Datagram> {
    match association {
        Some(association) => association.recv().await,
        None => std::future::pending().await,
    }
}

/// One UDP ASSOCIATE's state.
struct UdpRelay<'a> {
    udp: UdpSocket,
    mux: &'a Mux,
    /// Datagrams are taken only from the control connection's address...
    client_ip: IpAddr,
    /// ...and, once the first has come, only from its port.
    client_port: Option<u16>,
    association: Option<Association>,
}

impl UdpRelay<'_> {
    /// A datagram from the client: unwrapped and sent through the tube, or
    /// dropped (a stranger's, a fragment, a malformed one).
    async fn client_sent(&mut self, datagram: &[u8], from: SocketAddr) {
        if from.ip().to_canonical() != self.client_ip || self.client_port.is_some_and(|port| port != from.port()) {
            return;
        }
        let Ok((address, port, payload)) = parse_udp(datagram) else { return };
        self.client_port = Some(from.port());
        if self.association.as_ref().is_none_or(Association::is_ended) {
            self.association = self.mux.associate().await.ok();
        }
        let Some(association) = &self.association else { return };
        if let Err(DatagramError::Ended) = association.send(&address.host(), port, payload).await {
            self.association = None;
        }
    }

    /// A datagram from the tube: wrapped and sent to the client.
    async fn tube_sent(&self, datagram: &Datagram) {
        let Some(port) = self.client_port else { return };
        let Ok(wrapped) = encode_udp(&Address::of_host(&datagram.host), datagram.port, &datagram.payload) else {
            return;
        };
        let _ = self.udp.send_to(&wrapped, SocketAddr::new(self.client_ip, port)).await;
    }
}

// The protocol itself: pure functions on bytes.

/// What a parser needs: its value, or this many bytes in all to go on.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Parse<T> {
    Done(T),
    Need(usize),
}

/// What is wrong with a client's bytes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum Socks5Error {
    #[error("SOCKS version {0}, not 5")]
    Version(u8),
    #[error("address type {0} is not supported")]
    AddressType(u8),
    #[error("a domain name must be 1 to 255 bytes of UTF-8")]
    BadDomain,
    #[error("{0} bytes are too few for a SOCKS5 header")]
    Short(usize),
    #[error("fragment {0}: fragmented datagrams are not relayed")]
    Fragmented(u8),
}

impl Socks5Error {
    /// The reply a request with this fault gets (RFC 1928, section 6).
    fn reply(&self) -> u8 {
        match self {
            Self::AddressType(_) => ADDRESS_TYPE_NOT_SUPPORTED,
            _ => GENERAL_FAILURE,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Connect,
    Bind,
    UdpAssociate,
    Other(u8),
}

impl Command {
    fn of(code: u8) -> Self {
        match code {
            CONNECT => Self::Connect,
            BIND => Self::Bind,
            UDP_ASSOCIATE => Self::UdpAssociate,
            other => Self::Other(other),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Address {
    Ip(IpAddr),
    Domain(String),
}

impl Address {
    /// The host as the tube names it.
    fn host(&self) -> String {
        match self {
            Self::Ip(ip) => ip.to_string(),
            Self::Domain(name) => name.clone(),
        }
    }

    /// A host as the tube names it: an address if it reads as one.
    fn of_host(host: &str) -> Self {
        host.parse().map_or_else(|_| Self::Domain(host.to_string()), Self::Ip)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Request {
    command: Command,
    address: Address,
    port: u16,
}

const UNSPECIFIED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// VER NMETHODS METHODS: the methods offered.
fn parse_greeting(bytes: &[u8]) -> Result<Parse<Vec<u8>>, Socks5Error> {
    let Some((&[version, count], methods)) = bytes.split_first_chunk::<2>() else { return Ok(Parse::Need(2)) };
    if version != VERSION {
        return Err(Socks5Error::Version(version));
    }
    let count = usize::from(count);
    Ok(match methods.get(..count) {
        Some(methods) => Parse::Done(methods.to_vec()),
        None => Parse::Need(2 + count),
    })
}

/// VER CMD RSV ATYP DST.ADDR DST.PORT. An unknown address type is refused
/// as soon as it is read, since its length is unknown.
fn parse_request(bytes: &[u8]) -> Result<Parse<Request>, Socks5Error> {
    let Some((&[version, command, _reserved, kind], rest)) = bytes.split_first_chunk::<4>() else {
        return Ok(Parse::Need(4));
    };
    if version != VERSION {
        return Err(Socks5Error::Version(version));
    }
    Ok(match parse_address(kind, rest)? {
        Parse::Done((address, port, _)) => Parse::Done(Request { command: Command::of(command), address, port }),
        Parse::Need(more) => Parse::Need(4 + more),
    })
}

/// ADDR PORT after an ATYP of `kind`: the address, the port and the bytes
/// they took, or how many bytes they need.
fn parse_address(kind: u8, bytes: &[u8]) -> Result<Parse<(Address, u16, usize)>, Socks5Error> {
    let (address, len) = match kind {
        IPV4 => match bytes.first_chunk::<4>() {
            Some(octets) => (Address::Ip(IpAddr::from(*octets)), 4),
            None => return Ok(Parse::Need(4 + 2)),
        },
        IPV6 => match bytes.first_chunk::<16>() {
            Some(octets) => (Address::Ip(IpAddr::from(*octets)), 16),
            None => return Ok(Parse::Need(16 + 2)),
        },
        DOMAIN => {
            let Some((&len, rest)) = bytes.split_first() else { return Ok(Parse::Need(1)) };
            let len = usize::from(len);
            let Some(name) = rest.get(..len) else { return Ok(Parse::Need(1 + len + 2)) };
            let name = std::str::from_utf8(name).ok().filter(|name| !name.is_empty()).ok_or(Socks5Error::BadDomain)?;
            (Address::Domain(name.to_string()), 1 + len)
        }
        other => return Err(Socks5Error::AddressType(other)),
    };
    Ok(match bytes.get(len..).and_then(<[u8]>::first_chunk::<2>) {
        Some(port) => Parse::Done((address, u16::from_be_bytes(*port), len + 2)),
        None => Parse::Need(len + 2),
    })
}

/// RSV RSV FRAG ATYP DST.ADDR DST.PORT DATA: the target and the payload.
fn parse_udp(datagram: &[u8]) -> Result<(Address, u16, &[u8]), Socks5Error> {
    let short = Socks5Error::Short(datagram.len());
    let Some((&[_, _, fragment, kind], rest)) = datagram.split_first_chunk::<4>() else { return Err(short) };
    if fragment != 0 {
        return Err(Socks5Error::Fragmented(fragment));
    }
    match parse_address(kind, rest)? {
        Parse::Done((address, port, used)) => Ok((address, port, rest.get(used..).ok_or(short)?)),
        Parse::Need(_) => Err(short),
    }
}

/// The UDP header before `payload`, for a datagram to the client.
fn encode_udp(address: &Address, port: u16, payload: &[u8]) -> Result<Vec<u8>, Socks5Error> {
    let mut out = Vec::with_capacity(4 + 1 + 255 + 2 + payload.len());
    out.extend_from_slice(&[0, 0, 0]);
    encode_address(address, port, &mut out)?;
    out.extend_from_slice(payload);
    Ok(out)
}

/// VER REP RSV ATYP BND.ADDR BND.PORT.
fn reply(code: u8, bound: SocketAddr) -> Vec<u8> {
    let mut out = vec![VERSION, code, 0];
    push_ip(bound.ip(), bound.port(), &mut out);
    out
}

fn encode_address(address: &Address, port: u16, out: &mut Vec<u8>) -> Result<(), Socks5Error> {
    match address {
        Address::Ip(ip) => push_ip(*ip, port, out),
        Address::Domain(name) => {
            let len = u8::try_from(name.len()).ok().filter(|len| *len > 0).ok_or(Socks5Error::BadDomain)?;
            out.push(DOMAIN);
            out.push(len);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&port.to_be_bytes());
        }
    }
    Ok(())
}

fn push_ip(ip: IpAddr, port: u16, out: &mut Vec<u8>) {
    match ip {
        IpAddr::V4(ip) => {
            out.push(IPV4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(IPV6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&port.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    #[test]
    fn a_greeting_is_read_whole_and_no_further() {
        assert_eq!(parse_greeting(&[]), Ok(Parse::Need(2)));
        assert_eq!(parse_greeting(&[5]), Ok(Parse::Need(2)));
        assert_eq!(parse_greeting(&[5, 2]), Ok(Parse::Need(4)));
        assert_eq!(parse_greeting(&[5, 2, 0]), Ok(Parse::Need(4)));
        assert_eq!(parse_greeting(&[5, 2, 0, 2]), Ok(Parse::Done(vec![0, 2])));
        assert_eq!(parse_greeting(&[5, 0]), Ok(Parse::Done(vec![])));
        assert_eq!(parse_greeting(&[4, 1]), Err(Socks5Error::Version(4)));
    }

    #[test]
    fn a_request_names_its_target_by_any_address_type() {
        let connect = [5, 1, 0, 1, 127, 0, 0, 1, 0x1F, 0x90];
        for cut in 0..connect.len() {
            assert!(matches!(parse_request(&connect[..cut]), Ok(Parse::Need(n)) if n > cut), "cut at {cut}");
        }
        let expected = Request { command: Command::Connect, address: Address::Ip([127, 0, 0, 1].into()), port: 8080 };
        assert_eq!(parse_request(&connect), Ok(Parse::Done(expected)));

        let mut v6 = vec![5, 3, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0, 53]);
        assert_eq!(parse_request(&v6[..10]), Ok(Parse::Need(22)));
        let request = parse_request(&v6);
        assert_eq!(
            request,
            Ok(Parse::Done(Request {
                command: Command::UdpAssociate,
                address: Address::Ip(Ipv6Addr::LOCALHOST.into()),
                port: 53
            }))
        );

        let mut named = vec![5, 2, 0, 3, 11];
        named.extend_from_slice(b"example.org");
        assert_eq!(parse_request(&named[..4]), Ok(Parse::Need(5)));
        assert_eq!(parse_request(&named[..5]), Ok(Parse::Need(18)));
        named.extend_from_slice(&[1, 187]);
        let request = parse_request(&named);
        assert_eq!(
            request,
            Ok(Parse::Done(Request {
                command: Command::Bind,
                address: Address::Domain("example.org".into()),
                port: 443
            }))
        );
    }

    #[test]
    fn a_malformed_request_is_answered_with_its_code() {
        assert_eq!(parse_request(&[4, 1, 0, 1]), Err(Socks5Error::Version(4)));
        assert_eq!(parse_request(&[5, 1, 0, 9]), Err(Socks5Error::AddressType(9)));
        assert_eq!(parse_request(&[5, 1, 0, 3, 0]), Err(Socks5Error::BadDomain), "an empty name");
        assert_eq!(parse_request(&[5, 1, 0, 3, 2, 0xFF, 0xFE, 0, 80]), Err(Socks5Error::BadDomain), "not UTF-8");
        assert_eq!(Socks5Error::AddressType(9).reply(), ADDRESS_TYPE_NOT_SUPPORTED);
        assert_eq!(Socks5Error::Version(4).reply(), GENERAL_FAILURE);
        assert_eq!(Socks5Error::BadDomain.reply(), GENERAL_FAILURE);
        let Ok(Parse::Done(other)) = parse_request(&[5, 9, 0, 1, 1, 2, 3, 4, 0, 1]) else { panic!("not parsed") };
        assert_eq!(other.command, Command::Other(9));
    }

    #[test]
    fn replies_carry_the_bound_address() {
        assert_eq!(reply(SUCCEEDED, UNSPECIFIED), [5, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(reply(0x05, "10.0.0.1:1080".parse().unwrap()), [5, 5, 0, 1, 10, 0, 0, 1, 4, 56]);
        let v6 = reply(SUCCEEDED, "[::1]:9".parse().unwrap());
        assert_eq!((v6.len(), v6[3], v6[19], v6[21]), (22, IPV6, 1, 9));
    }

    #[test]
    fn udp_headers_wrap_and_unwrap() {
        let wrapped = encode_udp(&Address::Ip([127, 0, 0, 1].into()), 53, b"query").unwrap();
        assert_eq!(wrapped[..10], [0, 0, 0, 1, 127, 0, 0, 1, 0, 53]);
        assert_eq!(parse_udp(&wrapped), Ok((Address::Ip([127, 0, 0, 1].into()), 53, &b"query"[..])));
        let named = encode_udp(&Address::Domain("dns.example".into()), 853, b"").unwrap();
        assert_eq!(parse_udp(&named), Ok((Address::Domain("dns.example".into()), 853, &b""[..])));
        let v6 = encode_udp(&Address::of_host("::1"), 7, b"x").unwrap();
        assert_eq!(parse_udp(&v6), Ok((Address::Ip(Ipv6Addr::LOCALHOST.into()), 7, &b"x"[..])));
        assert_eq!(encode_udp(&Address::Domain("a".repeat(256)), 1, b""), Err(Socks5Error::BadDomain));
    }

    #[test]
    fn malformed_udp_headers_are_dropped_by_what_is_wrong() {
        assert_eq!(parse_udp(&[0, 0, 1, 1, 127, 0, 0, 1, 0, 53, 9]), Err(Socks5Error::Fragmented(1)));
        assert_eq!(parse_udp(&[0, 0, 0]), Err(Socks5Error::Short(3)));
        assert_eq!(parse_udp(&[0, 0, 0, 1, 127, 0, 0, 1, 0]), Err(Socks5Error::Short(9)));
        assert_eq!(parse_udp(&[0, 0, 0, 3, 5, b'a']), Err(Socks5Error::Short(6)));
        assert_eq!(parse_udp(&[0, 0, 0, 2, 0]), Err(Socks5Error::AddressType(2)));
    }

    #[test]
    fn hosts_read_as_addresses_where_they_are() {
        assert_eq!(Address::of_host("10.1.2.3"), Address::Ip([10, 1, 2, 3].into()));
        assert_eq!(Address::of_host("fe80::1"), Address::Ip("fe80::1".parse().unwrap()));
        assert_eq!(Address::of_host("db.default.svc"), Address::Domain("db.default.svc".into()));
        assert_eq!(Address::Ip(Ipv6Addr::LOCALHOST.into()).host(), "::1");
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        fn address() -> impl Strategy<Value = Address> {
            prop_oneof![
                any::<[u8; 4]>().prop_map(|octets| Address::Ip(IpAddr::from(octets))),
                any::<[u8; 16]>().prop_map(|octets| Address::Ip(IpAddr::from(octets))),
                "[a-z0-9.-]{1,255}".prop_map(Address::Domain),
            ]
        }

        proptest! {
            #[test]
            fn any_bytes_parse_or_are_refused_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
                let _ = parse_greeting(&bytes);
                let _ = parse_udp(&bytes);
                // Asks only for more than it has, or is done.
                if let Ok(Parse::Need(total)) = parse_request(&bytes) {
                    prop_assert!(total > bytes.len());
                }
            }

            #[test]
            fn any_request_reads_back_as_written(command in any::<u8>(), address in address(), port in any::<u16>()) {
                let mut bytes = vec![5, command, 0];
                encode_address(&address, port, &mut bytes).unwrap();
                let expected = Request { command: Command::of(command), address, port };
                prop_assert_eq!(parse_request(&bytes), Ok(Parse::Done(expected)));
                // Read exactly: nothing past its end is asked for.
                for cut in 0..bytes.len() {
                    let need = parse_request(&bytes[..cut]);
                    prop_assert!(matches!(need, Ok(Parse::Need(n)) if n > cut && n <= bytes.len()), "cut at {}", cut);
                }
            }

            #[test]
            fn any_datagram_unwraps_as_wrapped(address in address(), port in any::<u16>(), payload in proptest::collection::vec(any::<u8>(), 0..1500)) {
                let wrapped = encode_udp(&address, port, &payload).unwrap();
                prop_assert_eq!(parse_udp(&wrapped), Ok((address, port, payload.as_slice())));
            }
        }
    }
}
