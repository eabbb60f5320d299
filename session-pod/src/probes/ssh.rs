//! The ssh probe: the server's banner and the key exchange, timed.
//!
//! It speaks the SSH transport protocol (RFC 4253) as far as the server's
//! answer to our key exchange, and stops there: our version line, the
//! server's, both KEXINITs, our curve25519 public key (RFC 8731) and the
//! server's ECDH reply, which carries its host key. That is the whole cost
//! of a login's first round trips, with no account and no authentication.
//! Nothing the server sends is trusted: the framing is checked and bounded
//! here, and the host key's signature is not verified (the probe measures;
//! it does not log in).

use ring::agreement::{EphemeralPrivateKey, X25519};
use ring::rand::{SecureRandom, SystemRandom};
use tidepool_crds::test_session::{ProbeKind, ProbeTimings};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::Context;
use super::net::{self, Deadline, ProbeStream, host_port};
use super::outcome::{ProbeOutcome, SshFacts, ms};

/// Our version line (RFC 4253 §4.2), sent as soon as we connect.
const OUR_VERSION: &[u8] = b"SSH-2.0-TidepoolProbe_1\r\n";
/// The server's version line and any lines before it, at most (the RFC
/// allows other lines before the version; a server that sends more is not one).
const MAX_PREAMBLE_BYTES: usize = 8 * 1024;
/// One line, at most: 255 bytes with its CR LF (RFC 4253 §4.2).
const MAX_LINE_BYTES: usize = 255;
/// The largest packet we take (RFC 4253 §6.1: implementations must take 35000).
const MAX_PACKET_BYTES: usize = 35_000;

const MSG_DISCONNECT: u8 = 1;
const MSG_IGNORE: u8 = 2;
const MSG_UNIMPLEMENTED: u8 = 3;
const MSG_DEBUG: u8 = 4;
const MSG_KEXINIT: u8 = 20;
const MSG_KEX_ECDH_INIT: u8 = 30;
const MSG_KEX_ECDH_REPLY: u8 = 31;

/// The key exchanges we offer, best first: both spellings of curve25519.
const OUR_KEX: &[&str] = &["curve25519-sha256", "curve25519-sha256@libssh.org"];
/// Host key types we offer; which one the server picks is what it reports.
const OUR_HOST_KEYS: &str =
    "ssh-ed25519,ecdsa-sha2-nistp256,ecdsa-sha2-nistp384,ecdsa-sha2-nistp521,rsa-sha2-512,rsa-sha2-256";
const OUR_CIPHERS: &str = "chacha20-poly1305@openssh.com,aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr";
const OUR_MACS: &str = "hmac-sha2-256-etm@openssh.com,hmac-sha2-256";

/// What the server said that does not follow the protocol, or a refusal.
#[derive(Debug, PartialEq, thiserror::Error)]
pub(crate) enum SshError {
    #[error("the server sent no SSH version line in its first {MAX_PREAMBLE_BYTES} bytes")]
    NoVersion,
    #[error("the server speaks {0:?}, not SSH 2.0")]
    Version(String),
    #[error("a line longer than {MAX_LINE_BYTES} bytes before the version")]
    LongLine,
    #[error("a packet of {0} bytes, over the {MAX_PACKET_BYTES} the protocol asks a peer to take")]
    PacketTooLarge(usize),
    #[error("a malformed packet: {0}")]
    Malformed(&'static str),
    #[error("the server disconnected: {0}")]
    Disconnected(String),
    #[error("expected message {expected}, the server sent {got}")]
    Unexpected { expected: u8, got: u8 },
    #[error("no key exchange in common: the server offers {0}")]
    NoCommonKex(String),
    #[error("no host key type in common: the server offers {0}")]
    NoCommonHostKey(String),
}

/// The server's version line, once it has come: `Ok(None)` while more bytes
/// are needed; `Ok(Some((line, consumed)))` with the line without its CR LF
/// and the bytes it and the lines before it took.
pub(crate) fn version_line(buffer: &[u8]) -> Result<Option<(String, usize)>, SshError> {
    let mut start = 0;
    while let Some(end) = buffer[start..].iter().position(|b| *b == b'\n') {
        let line = &buffer[start..start + end];
        if line.len() + 1 > MAX_LINE_BYTES {
            return Err(SshError::LongLine);
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let consumed = start + end + 1;
        if line.starts_with(b"SSH-") {
            let text = String::from_utf8_lossy(line).into_owned();
            // "1.99" is a server that speaks both 1 and 2 (RFC 4253 §5.1).
            return if text.starts_with("SSH-2.0-") || text.starts_with("SSH-1.99-") {
                Ok(Some((text, consumed)))
            } else {
                Err(SshError::Version(text))
            };
        }
        start = consumed;
    }
    let unfinished = buffer.len() - start;
    if unfinished > MAX_LINE_BYTES {
        return Err(SshError::LongLine);
    }
    if buffer.len() > MAX_PREAMBLE_BYTES {
        return Err(SshError::NoVersion);
    }
    Ok(None)
}

/// One unencrypted binary packet (RFC 4253 §6) at the start of `buffer`:
/// `Ok(None)` while more bytes are needed; else the payload's range and the
/// packet's length.
pub(crate) fn packet(buffer: &[u8]) -> Result<Option<(std::ops::Range<usize>, usize)>, SshError> {
    let Some(header) = buffer.get(..5) else { return Ok(None) };
    let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let padding = usize::from(header[4]);
    if length > MAX_PACKET_BYTES {
        return Err(SshError::PacketTooLarge(length));
    }
    // The padding is at least 4 bytes and leaves room for a message number.
    if padding < 4 || padding + 2 > length {
        return Err(SshError::Malformed("padding does not fit the packet"));
    }
    let total = 4 + length;
    if buffer.len() < total {
        return Ok(None);
    }
    Ok(Some((5..total - padding, total)))
}

/// Frames `payload` as an unencrypted packet: padded to a multiple of 8
/// with at least 4 bytes (zeros: nothing is encrypted yet).
pub(crate) fn frame(payload: &[u8]) -> Vec<u8> {
    let mut padding = 8 - (4 + 1 + payload.len()) % 8;
    if padding < 4 {
        padding += 8;
    }
    let length = 1 + payload.len() + padding;
    let mut out = Vec::with_capacity(4 + length);
    out.extend_from_slice(&(length as u32).to_be_bytes());
    out.push(padding as u8);
    out.extend_from_slice(payload);
    out.resize(4 + length, 0);
    out
}

/// Reads SSH wire types from a payload.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SshError> {
        if self.bytes.len() < n {
            return Err(SshError::Malformed(what));
        }
        let (taken, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(taken)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, SshError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn string(&mut self, what: &'static str) -> Result<&'a [u8], SshError> {
        let length = self.u32(what)? as usize;
        self.take(length, what)
    }

    fn name_list(&mut self, what: &'static str) -> Result<Vec<String>, SshError> {
        let text = std::str::from_utf8(self.string(what)?).map_err(|_| SshError::Malformed(what))?;
        Ok(if text.is_empty() { Vec::new() } else { text.split(',').map(str::to_owned).collect() })
    }
}

fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// The algorithms a KEXINIT offers that the probe cares about.
#[derive(Debug, PartialEq)]
pub(crate) struct KexInit {
    pub kex: Vec<String>,
    pub host_keys: Vec<String>,
}

/// Parses a KEXINIT payload (RFC 4253 §7.1).
pub(crate) fn parse_kexinit(payload: &[u8]) -> Result<KexInit, SshError> {
    let mut reader = Reader { bytes: payload };
    let number = reader.take(1, "an empty message")?[0];
    if number != MSG_KEXINIT {
        return Err(SshError::Unexpected { expected: MSG_KEXINIT, got: number });
    }
    reader.take(16, "KEXINIT's cookie")?;
    let kex = reader.name_list("KEXINIT's key exchanges")?;
    let host_keys = reader.name_list("KEXINIT's host key types")?;
    // Ciphers, MACs, compressions and languages, each way: read past them.
    for _ in 0..8 {
        reader.name_list("KEXINIT's algorithm lists")?;
    }
    reader.take(5, "KEXINIT's end")?;
    Ok(KexInit { kex, host_keys })
}

/// Our KEXINIT payload, with `cookie`.
pub(crate) fn our_kexinit(cookie: [u8; 16]) -> Vec<u8> {
    let mut out = vec![MSG_KEXINIT];
    out.extend_from_slice(&cookie);
    let lists = [
        OUR_KEX.join(","),
        OUR_HOST_KEYS.into(),
        OUR_CIPHERS.into(),
        OUR_CIPHERS.into(),
        OUR_MACS.into(),
        OUR_MACS.into(),
        "none".into(),
        "none".into(),
        String::new(),
        String::new(),
    ];
    for list in lists {
        put_string(&mut out, list.as_bytes());
    }
    out.push(0); // no guessed packet follows
    out.extend_from_slice(&0u32.to_be_bytes());
    out
}

/// The first of our key exchanges that the server offers (RFC 4253 §7.1:
/// the client's preference wins).
pub(crate) fn agree_kex(server: &KexInit) -> Result<&'static str, SshError> {
    OUR_KEX.iter().copied().find(|ours| server.kex.iter().any(|theirs| theirs == ours)).ok_or_else(|| {
        let offered: Vec<&str> = server.kex.iter().map(String::as_str).filter(|k| !k.starts_with("kex-")).collect();
        SshError::NoCommonKex(offered.join(","))
    })
}

/// The first of our host key types that the server offers: without one,
/// the server could not answer our key exchange.
pub(crate) fn agree_host_key(server: &KexInit) -> Result<&'static str, SshError> {
    OUR_HOST_KEYS
        .split(',')
        .find(|ours| server.host_keys.iter().any(|theirs| theirs == ours))
        .ok_or_else(|| SshError::NoCommonHostKey(server.host_keys.join(",")))
}

/// Our ECDH_INIT payload: the client's ephemeral public key.
pub(crate) fn our_ecdh_init(public_key: &[u8]) -> Vec<u8> {
    let mut out = vec![MSG_KEX_ECDH_INIT];
    put_string(&mut out, public_key);
    out
}

/// The host key type in an ECDH reply (RFC 5656 §4): the first string of
/// the key blob. The reply's signature is not checked.
pub(crate) fn parse_ecdh_reply(payload: &[u8]) -> Result<String, SshError> {
    let mut reader = Reader { bytes: payload };
    let number = reader.take(1, "an empty message")?[0];
    if number != MSG_KEX_ECDH_REPLY {
        return Err(SshError::Unexpected { expected: MSG_KEX_ECDH_REPLY, got: number });
    }
    let blob = reader.string("the reply's host key")?;
    let server_public = reader.string("the reply's public key")?;
    if server_public.len() != 32 {
        return Err(SshError::Malformed("the reply's public key is not a curve25519 key"));
    }
    reader.string("the reply's signature")?;
    let key_type = Reader { bytes: blob }.string("the host key's type")?;
    std::str::from_utf8(key_type).map(str::to_owned).map_err(|_| SshError::Malformed("the host key's type"))
}

/// A message that is not the one awaited: a disconnect says why; ignore and
/// debug messages are skipped (`Ok(false)`); anything else is the answer (`Ok(true)`).
fn screen(payload: &[u8]) -> Result<bool, SshError> {
    match payload.first() {
        None => Err(SshError::Malformed("an empty message")),
        Some(&MSG_DISCONNECT) => {
            let mut reader = Reader { bytes: &payload[1..] };
            let _code = reader.u32("the disconnect's code")?;
            let text = reader.string("the disconnect's reason")?;
            Err(SshError::Disconnected(String::from_utf8_lossy(text).chars().take(200).collect()))
        }
        Some(&(MSG_IGNORE | MSG_DEBUG | MSG_UNIMPLEMENTED)) => Ok(false),
        Some(_) => Ok(true),
    }
}

/// Bytes from the server, kept until a whole line or packet is in.
struct Incoming {
    stream: ProbeStream,
    buffer: Vec<u8>,
}

impl Incoming {
    async fn fill(&mut self, deadline: Deadline, what: &str) -> Result<(), String> {
        let mut chunk = [0u8; 4096];
        let n = deadline.bound(what, self.stream.read(&mut chunk)).await?;
        if n == 0 {
            return Err(format!("{what}: the server closed the connection"));
        }
        self.buffer.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    async fn version(&mut self, deadline: Deadline) -> Result<String, String> {
        loop {
            if let Some((line, consumed)) = version_line(&self.buffer).map_err(|e| e.to_string())? {
                self.buffer.drain(..consumed);
                return Ok(line);
            }
            self.fill(deadline, "reading the server's version").await?;
        }
    }

    /// The next message that is not an ignore or debug message.
    async fn message(&mut self, deadline: Deadline, what: &str) -> Result<Vec<u8>, String> {
        loop {
            if let Some((payload, length)) = packet(&self.buffer).map_err(|e| e.to_string())? {
                let message = self.buffer[payload].to_vec();
                self.buffer.drain(..length);
                if screen(&message).map_err(|e| e.to_string())? {
                    return Ok(message);
                }
                continue;
            }
            self.fill(deadline, what).await?;
        }
    }
}

/// Resolve, connect, versions and the key exchange up to the server's
/// reply: DNS and connect times, the banner (first byte) and the key
/// exchange time; the banner, key exchange and host key type in `detail`.
pub(crate) async fn ssh_probe(ctx: &Context, host: &str, port: u16) -> ProbeOutcome {
    let mut outcome = ProbeOutcome::new(ProbeKind::Ssh, host_port(host, port));
    let start = Instant::now();
    let deadline = Deadline::after(ctx.settings.timeout);
    let mut timings = ProbeTimings::default();
    let mut facts = SshFacts::default();
    let exchanged = async {
        let refused = &mut outcome.facts.egress_refused;
        let addrs = net::resolve_allowed(&ctx.settings, host, Some(port), deadline, refused).await?;
        timings.dns_ms = Some(ms(start.elapsed()));
        let connecting = Instant::now();
        let mut stream = net::connect(ctx, &addrs, deadline).await?;
        timings.connect_ms = Some(ms(connecting.elapsed()));
        deadline.bound("sending our version", stream.write_all(OUR_VERSION)).await?;
        let mut incoming = Incoming { stream, buffer: Vec::with_capacity(4096) };
        let banner = incoming.version(deadline).await?;
        timings.first_byte_ms = Some(ms(start.elapsed()));
        facts.banner = Some(banner);

        // The server sends its KEXINIT without waiting for ours; we answer
        // with ours and our key at once, as OpenSSH's client does.
        let server = parse_kexinit(&incoming.message(deadline, "reading the server's KEXINIT").await?)
            .map_err(|e| e.to_string())?;
        let kex = agree_kex(&server).map_err(|e| e.to_string())?;
        agree_host_key(&server).map_err(|e| e.to_string())?;
        facts.kex = Some(kex.to_owned());
        let random = SystemRandom::new();
        let mut cookie = [0u8; 16];
        random.fill(&mut cookie).map_err(|_| "no randomness for the KEXINIT cookie".to_string())?;
        let private = EphemeralPrivateKey::generate(&X25519, &random)
            .map_err(|_| "no randomness for the key exchange".to_string())?;
        let public = private.compute_public_key().map_err(|_| "the key exchange's public key".to_string())?;
        let mut ours = frame(&our_kexinit(cookie));
        ours.extend_from_slice(&frame(&our_ecdh_init(public.as_ref())));
        let exchanging = Instant::now();
        deadline.bound("sending our KEXINIT", incoming.stream.write_all(&ours)).await?;
        let reply = incoming.message(deadline, "awaiting the server's key exchange reply").await?;
        let host_key = parse_ecdh_reply(&reply).map_err(|e| e.to_string())?;
        timings.kex_ms = Some(ms(exchanging.elapsed()));
        facts.host_key = Some(host_key);
        Ok::<_, String>(())
    }
    .await;
    timings.total_ms = ms(start.elapsed());
    outcome.result.timings = Some(timings);
    outcome.result.protocol = facts.banner.as_ref().map(|_| "SSH-2.0".to_owned());
    outcome.facts.ssh = Some(facts).filter(|f| f.banner.is_some());
    match exchanged {
        Ok(()) => {
            outcome.result.ok = true;
            outcome
        }
        Err(error) => outcome.fail(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kexinit_payload(kex: &str, host_keys: &str) -> Vec<u8> {
        let mut out = vec![MSG_KEXINIT];
        out.extend_from_slice(&[7; 16]);
        for list in
            [kex, host_keys, "aes128-ctr", "aes128-ctr", "hmac-sha2-256", "hmac-sha2-256", "none", "none", "", ""]
        {
            put_string(&mut out, list.as_bytes());
        }
        out.extend_from_slice(&[0, 0, 0, 0, 0]);
        out
    }

    #[test]
    fn the_version_line_may_follow_other_lines() {
        assert_eq!(version_line(b"SSH-2.0-Open"), Ok(None));
        let (line, used) = version_line(b"hello\r\nSSH-2.0-OpenSSH_9.2\r\n\x00\x00").unwrap().unwrap();
        assert_eq!((line.as_str(), used), ("SSH-2.0-OpenSSH_9.2", 28));
        assert_eq!(version_line(b"SSH-1.99-old\n").unwrap().unwrap().0, "SSH-1.99-old");
        assert_eq!(version_line(b"SSH-1.5-old\r\n"), Err(SshError::Version("SSH-1.5-old".into())));
        assert_eq!(version_line(&[b'a'; 300]), Err(SshError::LongLine));
        let many_lines = b"x\r\n".repeat(3000);
        assert_eq!(version_line(&many_lines), Err(SshError::NoVersion));
    }

    #[test]
    fn packets_are_framed_and_checked() {
        let framed = frame(b"\x05hello");
        assert_eq!(framed.len() % 8, 0);
        let (payload, length) = packet(&framed).unwrap().unwrap();
        assert_eq!((&framed[payload], length), (&b"\x05hello"[..], framed.len()));
        assert_eq!(packet(&framed[..framed.len() - 1]), Ok(None));
        assert_eq!(packet(&[0, 0]), Ok(None));
        assert_eq!(packet(&[0, 1, 0, 0, 4]), Err(SshError::PacketTooLarge(65_536)));
        assert!(matches!(packet(&[0, 0, 0, 8, 3]), Err(SshError::Malformed(_))));
        assert!(matches!(packet(&[0, 0, 0, 5, 4]), Err(SshError::Malformed(_))));
    }

    #[test]
    fn kexinit_round_trip_and_agreement() {
        let ours = parse_kexinit(&our_kexinit([1; 16])).unwrap();
        assert_eq!(ours.kex, OUR_KEX);
        let server = parse_kexinit(&kexinit_payload(
            "sntrup761x25519-sha512,curve25519-sha256@libssh.org,ecdh-sha2-nistp256,kex-strict-s-v00@openssh.com",
            "rsa-sha2-512,ssh-ed25519",
        ))
        .unwrap();
        assert_eq!(agree_kex(&server), Ok("curve25519-sha256@libssh.org"));
        assert_eq!(agree_host_key(&server), Ok("ssh-ed25519"));
        let old =
            parse_kexinit(&kexinit_payload("diffie-hellman-group14-sha1,kex-strict-s-v00@openssh.com", "ssh-rsa"))
                .unwrap();
        assert_eq!(agree_kex(&old), Err(SshError::NoCommonKex("diffie-hellman-group14-sha1".into())));
        assert_eq!(agree_host_key(&old), Err(SshError::NoCommonHostKey("ssh-rsa".into())));
        assert_eq!(
            parse_kexinit(&[MSG_KEX_ECDH_REPLY]),
            Err(SshError::Unexpected { expected: MSG_KEXINIT, got: MSG_KEX_ECDH_REPLY })
        );
        let cut = kexinit_payload("curve25519-sha256", "ssh-ed25519");
        assert!(matches!(parse_kexinit(&cut[..cut.len() - 6]), Err(SshError::Malformed(_))));
    }

    #[test]
    fn ecdh_replies_name_their_host_key() {
        let mut blob = Vec::new();
        put_string(&mut blob, b"ssh-ed25519");
        put_string(&mut blob, &[9; 32]);
        let mut reply = vec![MSG_KEX_ECDH_REPLY];
        put_string(&mut reply, &blob);
        put_string(&mut reply, &[3; 32]);
        put_string(&mut reply, b"signature");
        assert_eq!(parse_ecdh_reply(&reply).as_deref(), Ok("ssh-ed25519"));
        let mut short_key = vec![MSG_KEX_ECDH_REPLY];
        put_string(&mut short_key, &blob);
        put_string(&mut short_key, &[3; 31]);
        put_string(&mut short_key, b"signature");
        assert!(matches!(parse_ecdh_reply(&short_key), Err(SshError::Malformed(_))));
        assert!(matches!(parse_ecdh_reply(&reply[..reply.len() - 1]), Err(SshError::Malformed(_))));
        assert_eq!(our_ecdh_init(&[4; 32]).len(), 1 + 4 + 32);
    }

    #[test]
    fn disconnects_say_why_and_chatter_is_skipped() {
        let mut disconnect = vec![MSG_DISCONNECT, 0, 0, 0, 2];
        put_string(&mut disconnect, b"too many connections");
        put_string(&mut disconnect, b"");
        assert_eq!(screen(&disconnect), Err(SshError::Disconnected("too many connections".into())));
        assert_eq!(screen(&[MSG_IGNORE, 1, 2]), Ok(false));
        assert_eq!(screen(&[MSG_DEBUG]), Ok(false));
        assert_eq!(screen(&[MSG_KEXINIT]), Ok(true));
        assert!(screen(&[]).is_err());
    }

    proptest! {
        // Whatever a server sends, the parsers answer without panicking,
        // and never claim more bytes than they were given.
        #[test]
        fn parsers_take_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(Some((_, used))) = version_line(&bytes) {
                prop_assert!(used <= bytes.len());
            }
            if let Ok(Some((payload, length))) = packet(&bytes) {
                prop_assert!(payload.end <= length && length <= bytes.len());
            }
            let _ = parse_kexinit(&bytes);
            let _ = parse_ecdh_reply(&bytes);
            let _ = screen(&bytes);
        }

        #[test]
        fn framed_payloads_read_back(payload in proptest::collection::vec(any::<u8>(), 1..2000)) {
            let framed = frame(&payload);
            prop_assert_eq!(framed.len() % 8, 0);
            let (range, length) = packet(&framed).unwrap().unwrap();
            prop_assert_eq!(&framed[range], &payload[..]);
            prop_assert_eq!(length, framed.len());
        }
    }
}
