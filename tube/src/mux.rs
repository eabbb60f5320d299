//! The multiplexer: one task drives the tube (reads every incoming frame,
//! owns the tables of connections and UDP associations, and their tasks);
//! each connection is one task that pumps its TCP socket both ways within
//! its credit, and each association at the pod's end one task that relays
//! its datagrams ([`crate::udp`]).
//!
//! A stalled reader on one connection stops only that connection: its
//! inbox fills to the window, no credit goes back, and its peer's sender
//! waits, while the driver goes on delivering every other connection's
//! frames (an inbox is never waited on).
//!
//! Datagrams (SOCKS5 UDP ASSOCIATE): the client opens an association
//! ([`Mux::associate`]) with a number from the same counter as its
//! connections', so a `CLOSE` names one or the other without doubt. The
//! pod's end learns of an association from its first `DATAGRAM`; either
//! end ends it with `CLOSE` (the client when its [`Association`] is
//! dropped, the pod when it has been idle). UDP has neither refusal nor
//! back pressure, so a datagram with no room (a full inbox) or no
//! permission is dropped and counted, and the driver never waits for one.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tidepool_wire::tube::{CloseReason, Frame, MAX_DATA, ReceiveWindow, Refusal, SendWindow};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard, PollSender};

pub use crate::link::{Ended, Policy, Stats};
use crate::link::{encode, send};
use crate::udp::{self, Association, Datagram};

/// Frames waiting for the channel. Small: the channel has its own buffer,
/// and a short queue keeps a keystroke from waiting behind a bulk transfer.
pub const OUTGOING_FRAMES: usize = 64;
/// Requests to open connections or associations waiting for the driver
/// (the client's end).
const COMMANDS: usize = 64;
/// Control frames the driver may hold back while the channel is busy. The
/// driver never waits to send: it must always take the next incoming frame,
/// or two ends whose queues are full of data would wait on each other. A
/// peer that makes it owe more (a flood of pings or refused opens) is cut.
const CONTROL_BACKLOG: usize = 4096;
/// Datagrams one association holds: for its reader at the client's end,
/// for its sockets at the pod's. When full the newest is dropped, as a
/// full UDP socket buffer would.
pub const ASSOCIATION_INBOX: usize = 64;
/// Associations the pod remembers closing, against datagrams still on
/// their way (a few for each it may hold at once).
const CLOSED_KEPT: usize = 64;

/// The two queues a tube's messages pass through.
pub struct Channel {
    pub incoming: mpsc::Receiver<Bytes>,
    pub outgoing: mpsc::Sender<Bytes>,
}

/// What one tube may hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once; an `OPEN` beyond is refused.
    pub connections: usize,
    /// Connections being dialled at once (the pod's end); more wait.
    pub dialling: usize,
    /// How long dialling a target may take.
    pub connect_timeout: Duration,
    /// How often the tube measures its round trip.
    pub ping_every: Duration,
    /// UDP associations open at once. The client's end refuses more; the
    /// pod's end drops a new association's datagrams beyond it and closes it.
    pub associations: usize,
    /// An association with no datagram either way for this long ends (the
    /// pod's end closes it).
    pub association_idle: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 256,
            dialling: 16,
            connect_timeout: Duration::from_secs(10),
            ping_every: Duration::from_secs(5),
            associations: 16,
            association_idle: Duration::from_secs(120),
        }
    }
}

/// A tube's end. Dropping it does not stop the tube; [`Mux::close`] does.
#[derive(Clone)]
pub struct Mux {
    commands: mpsc::Sender<Command>,
    stats: Arc<Stats>,
    stop: CancellationToken,
    /// Cancelled when the driver returns (or is dropped).
    ended: CancellationToken,
}

enum Command {
    Open { host: String, port: u16, reply: oneshot::Sender<Result<Dialled, Refusal>> },
    Associate { reply: oneshot::Sender<Result<Association, Refusal>> },
}

/// A connection the pod has dialled, waiting for the socket it will carry
/// ([`Mux::dial`]). What the target sends meanwhile waits, within the
/// window; dropping it closes the connection at the pod too.
#[derive(Debug)]
pub struct Dialled {
    carry: oneshot::Sender<TcpStream>,
}

impl Dialled {
    /// Carries `tcp` both ways from now on. If the tube has ended, `tcp`
    /// is closed.
    pub fn carry(self, tcp: TcpStream) {
        let _ = self.carry.send(tcp);
    }
}

impl Mux {
    /// The client's end: it opens connections, and refuses every `OPEN`.
    /// Returns the end and its driver, which the caller runs (and supervises).
    pub fn client(channel: Channel, limits: Limits) -> (Self, impl Future<Output = Ended> + Send + 'static) {
        Self::start(channel, limits, None::<Arc<NoPolicy>>)
    }

    /// The pod's end: it dials what `policy` allows for each `OPEN`, and
    /// relays what it allows of each association's datagrams.
    pub fn server<P: Policy>(
        channel: Channel,
        limits: Limits,
        policy: Arc<P>,
    ) -> (Self, impl Future<Output = Ended> + Send + 'static) {
        Self::start(channel, limits, Some(policy))
    }

    fn start<P: Policy>(
        channel: Channel,
        limits: Limits,
        policy: Option<Arc<P>>,
    ) -> (Self, impl Future<Output = Ended> + Send + 'static) {
        let (commands, command_queue) = mpsc::channel(COMMANDS);
        let stats = Arc::new(Stats::default());
        let (stop, ended) = (CancellationToken::new(), CancellationToken::new());
        let driver = Driver {
            outgoing: channel.outgoing,
            conns: HashMap::new(),
            dials: HashMap::new(),
            lowest_open: 0,
            pending: HashMap::new(),
            assocs: HashMap::new(),
            closed_assocs: VecDeque::new(),
            next_conn: 1,
            next_serial: 0,
            tasks: JoinSet::new(),
            stats: stats.clone(),
            limits,
            policy,
            dialling: Arc::new(Semaphore::new(limits.dialling)),
            pings: HashMap::new(),
            next_nonce: 0,
            control: VecDeque::new(),
        };
        // Moved into the driver's future: dropped with it, polled or not.
        let run = driver.run(channel.incoming, command_queue, stop.clone(), ended.clone().drop_guard());
        (Self { commands, stats, stop, ended }, run)
    }

    /// Carries `tcp` through the tube to `host:port`: once the pod has
    /// dialled it, or with the pod's reason why not.
    pub async fn open(&self, tcp: TcpStream, host: &str, port: u16) -> Result<(), Refusal> {
        self.dial(host, port).await?.carry(tcp);
        Ok(())
    }

    /// Has the pod dial `host:port`, and returns once it has, before any
    /// socket is carried: so a SOCKS5 server can answer its client first.
    /// A host that cannot be framed (empty, too long, with spaces) is
    /// `host_unreachable`.
    pub async fn dial(&self, host: &str, port: u16) -> Result<Dialled, Refusal> {
        let (reply, answer) = oneshot::channel();
        let command = Command::Open { host: host.to_string(), port, reply };
        self.commands.send(command).await.map_err(|_| Refusal::Failed)?;
        answer.await.unwrap_or(Err(Refusal::Failed))
    }

    /// Opens a UDP association (the client's end; the pod's end refuses,
    /// `failed`). At most [`Limits::associations`] at once, beyond which
    /// `too_many_connections`. The pod hears of it with its first datagram.
    pub async fn associate(&self) -> Result<Association, Refusal> {
        let (reply, answer) = oneshot::channel();
        self.commands.send(Command::Associate { reply }).await.map_err(|_| Refusal::Failed)?;
        answer.await.unwrap_or(Err(Refusal::Failed))
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Ends the tube: every connection and association closes, and the
    /// driver returns.
    pub fn close(&self) {
        self.stop.cancel();
    }

    /// Returns once the tube has ended, however it ended.
    pub async fn ended(&self) {
        self.ended.cancelled().await;
    }
}

/// The client's end dials nothing.
struct NoPolicy;

impl Policy for NoPolicy {
    fn allows_name(&self, _: &str, _: u16) -> bool {
        false
    }
    fn allows_address(&self, _: &str, _: SocketAddr) -> bool {
        false
    }
}

/// One connection's state, shared by the driver and its task.
struct Conn {
    state: Mutex<ConnState>,
    /// Credit came (the task's TCP reader waits on it).
    credit: Notify,
    /// Bytes, an EOF or the end came (the task's TCP writer waits on it).
    inbox_changed: Notify,
    /// The peer closed the connection, or the tube ends.
    gone: CancellationToken,
}

#[derive(Default)]
struct ConnState {
    send: SendWindow,
    receive: ReceiveWindow,
    inbox: BytesMut,
    /// The peer will send no more.
    eof: bool,
}

impl Conn {
    fn new(gone: CancellationToken) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ConnState::default()),
            credit: Notify::new(),
            inbox_changed: Notify::new(),
            gone,
        })
    }

    /// A poisoned lock holds sound state (each change is a few plain steps).
    fn state(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One association as the driver knows it.
struct Assoc {
    /// Its inbox (the client's end) or its relay's queue (the pod's).
    datagrams: mpsc::Sender<Datagram>,
    /// The peer closed it, or the tube ends.
    gone: CancellationToken,
    /// Tells this association from a later one under the same number, so
    /// a task that ends late forgets only its own.
    serial: u64,
}

/// The socket a connection carries: the pod's dial, whose `OPENED` its own
/// task sends first, or the client's, when its opener hands it over
/// ([`Dialled::carry`]).
enum Carried {
    Dialled(TcpStream),
    Later(oneshot::Receiver<TcpStream>),
}

struct Driver<P> {
    outgoing: mpsc::Sender<Bytes>,
    conns: HashMap<u32, Arc<Conn>>,
    /// The pod's dials in progress, each until its task reports: a `CLOSE`
    /// cancels one but it holds its place among the connections till then.
    dials: HashMap<u32, CancellationToken>,
    /// The pod's end: the lowest number a new `OPEN` may take. The client
    /// numbers upwards and its opens arrive in order, so a number at or
    /// below one seen before is a breach, and no number serves twice.
    lowest_open: u32,
    /// The client's opens waiting for `OPENED` or `REFUSED`.
    pending: HashMap<u32, oneshot::Sender<Result<Dialled, Refusal>>>,
    assocs: HashMap<u32, Assoc>,
    /// The pod's end: associations it closed or refused lately, so that a
    /// datagram already on its way neither opens one again nor draws a
    /// second `CLOSE`. The oldest is forgotten beyond [`CLOSED_KEPT`].
    closed_assocs: VecDeque<u32>,
    /// Numbers connections and associations alike (the client's end).
    next_conn: u32,
    next_serial: u64,
    /// The connection tasks, the pod's dialling tasks and the association
    /// tasks; each yields what it served, so the driver forgets it.
    tasks: JoinSet<Finished>,
    stats: Arc<Stats>,
    limits: Limits,
    policy: Option<Arc<P>>,
    dialling: Arc<Semaphore>,
    /// Pings sent, by nonce, with when.
    pings: HashMap<u64, tokio::time::Instant>,
    /// A counter: unique among the outstanding pings is all a nonce must be.
    next_nonce: u64,
    /// Control frames not yet sent (see [`CONTROL_BACKLOG`]).
    control: VecDeque<Bytes>,
}

/// How a task of the driver's ended.
enum Finished {
    /// A connection is done: forget it.
    Conn(u32),
    /// The pod dialled (or failed to dial) a target.
    Dialled { conn: u32, result: Result<TcpStream, Refusal> },
    /// An association's owner let it go (the client's end) or its relay
    /// ended (the pod's): forget it, and tell the peer why.
    Assoc { assoc: u32, serial: u64, reason: CloseReason },
}

impl<P: Policy> Driver<P> {
    async fn run(
        mut self,
        mut incoming: mpsc::Receiver<Bytes>,
        mut commands: mpsc::Receiver<Command>,
        stop: CancellationToken,
        _ended: DropGuard,
    ) -> Ended {
        let mut ping = tokio::time::interval(self.limits.ping_every);
        // One wait for room that keeps its place in the queue across passes:
        // a wait made afresh each pass would go behind every connection
        // task's, and under load the control frames would starve.
        let mut outgoing = PollSender::new(self.outgoing.clone());
        let ended = loop {
            tokio::select! {
                room = std::future::poll_fn(|cx| outgoing.poll_reserve(cx)), if !self.control.is_empty() => {
                    if room.is_err() {
                        break Ended::ChannelClosed;
                    }
                    if let Some(frame) = self.control.pop_front()
                        && outgoing.send_item(frame).is_err()
                    {
                        break Ended::ChannelClosed;
                    }
                }
                message = incoming.recv() => {
                    let Some(message) = message else { break Ended::ChannelClosed };
                    if let Err(ended) = self.on_message(&message) {
                        break ended;
                    }
                }
                Some(command) = commands.recv() => {
                    if let Err(ended) = self.on_command(command) {
                        break ended;
                    }
                }
                Some(finished) = self.tasks.join_next() => {
                    if let Err(ended) = self.on_finished(finished) {
                        break ended;
                    }
                }
                _ = ping.tick() => {
                    let nonce = self.next_nonce;
                    self.next_nonce = self.next_nonce.wrapping_add(1);
                    self.pings.insert(nonce, tokio::time::Instant::now());
                    // At most a few outstanding: a peer that never answers costs nothing.
                    if self.pings.len() > 4 && let Some(oldest) = self.pings.iter().min_by_key(|(_, at)| **at).map(|(n, _)| *n) {
                        self.pings.remove(&oldest);
                    }
                    if let Err(ended) = self.send(&Frame::Ping { nonce }) {
                        break ended;
                    }
                }
                () = stop.cancelled() => break Ended::Closed,
            }
        };
        // Every connection and association ends with the tube; their tasks
        // see it and stop.
        for conn in self.conns.values() {
            conn.gone.cancel();
        }
        for dial in self.dials.values() {
            dial.cancel();
        }
        for assoc in self.assocs.values() {
            assoc.gone.cancel();
        }
        for (_, reply) in self.pending.drain() {
            let _ = reply.send(Err(Refusal::Failed));
        }
        self.tasks.shutdown().await;
        self.stats.open_connections.store(0, Ordering::Relaxed);
        self.stats.open_associations.store(0, Ordering::Relaxed);
        ended
    }

    /// Queues a control frame without waiting.
    fn send(&mut self, frame: &Frame<'_>) -> Result<(), Ended> {
        let message = encode(frame).map_err(Ended::BadFrame)?;
        self.queue(message)
    }

    fn queue(&mut self, message: Bytes) -> Result<(), Ended> {
        if self.control.len() >= CONTROL_BACKLOG {
            return Err(Ended::Protocol("the peer is owed too many control frames"));
        }
        self.control.push_back(message);
        Ok(())
    }

    fn on_message(&mut self, message: &[u8]) -> Result<(), Ended> {
        let frame = Frame::decode(message).map_err(Ended::BadFrame)?;
        match frame {
            Frame::Data { conn, bytes } => {
                let Some(state) = self.conns.get(&conn) else { return Ok(()) };
                let mut guard = state.state();
                if guard.eof || guard.receive.receive(bytes.len()).is_err() {
                    drop(guard);
                    return self.close_conn(conn, CloseReason::FlowViolation);
                }
                guard.inbox.extend_from_slice(bytes);
                drop(guard);
                state.inbox_changed.notify_one();
                Stats::count(&self.stats.received, bytes.len());
            }
            Frame::Credit { conn, bytes } => {
                let Some(state) = self.conns.get(&conn) else { return Ok(()) };
                let credited = state.state().send.credit(bytes);
                if credited.is_err() {
                    return self.close_conn(conn, CloseReason::FlowViolation);
                }
                state.credit.notify_one();
            }
            Frame::Eof { conn } => {
                if let Some(state) = self.conns.get(&conn) {
                    state.state().eof = true;
                    state.inbox_changed.notify_one();
                }
            }
            Frame::Close { conn, .. } => {
                if let Some(state) = self.conns.remove(&conn) {
                    state.gone.cancel();
                }
                if let Some(dial) = self.dials.get(&conn) {
                    dial.cancel();
                }
                self.recount();
                if let Some(reply) = self.pending.remove(&conn) {
                    let _ = reply.send(Err(Refusal::Failed));
                }
                self.forget_assoc(conn);
            }
            Frame::Ping { nonce } => self.send(&Frame::Pong { nonce })?,
            Frame::Pong { nonce } => {
                if let Some(sent) = self.pings.remove(&nonce) {
                    let rtt = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                    self.stats.rtt_us.store(rtt.max(1), Ordering::Relaxed);
                }
            }
            Frame::Open { conn, host, port } => self.on_open(conn, host, port)?,
            Frame::Opened { conn } => {
                tracing::debug!(conn, "opened");
                let reply = self.pending.remove(&conn).ok_or(Ended::Protocol("OPENED for no open"))?;
                let (carry, carried) = oneshot::channel();
                if reply.send(Ok(Dialled { carry })).is_ok() {
                    self.start_conn(conn, Carried::Later(carried));
                } else {
                    // The client gave up waiting: the pod's side goes too.
                    self.send(&Frame::Close { conn, reason: CloseReason::Reset })?;
                }
            }
            Frame::Refused { conn, reason } => {
                tracing::debug!(conn, %reason, "refused");
                let reply = self.pending.remove(&conn).ok_or(Ended::Protocol("REFUSED for no open"))?;
                let _ = reply.send(Err(reason));
            }
            Frame::Datagram { assoc, host, port, payload } => self.on_datagram(assoc, host, port, payload)?,
        }
        Ok(())
    }

    /// The pod's end: dial `host:port` if the policy allows, in a task.
    fn on_open(&mut self, conn: u32, host: &str, port: u16) -> Result<(), Ended> {
        tracing::debug!(conn, host, port, "open asked");
        let Some(policy) = self.policy.clone() else { return Err(Ended::Protocol("OPEN sent to the client")) };
        if conn < self.lowest_open || self.assocs.contains_key(&conn) {
            return Err(Ended::Protocol("OPEN for a number already used"));
        }
        self.lowest_open = conn.checked_add(1).ok_or(Ended::Protocol("connection numbers ran out"))?;
        let refuse = |reason| Frame::Refused { conn, reason };
        if self.live_conns() >= self.limits.connections {
            return self.send(&refuse(Refusal::TooManyConnections));
        }
        if !policy.allows_name(host, port) {
            return self.send(&refuse(Refusal::NotAllowed));
        }
        let closed = CancellationToken::new();
        self.dials.insert(conn, closed.clone());
        self.recount();
        let (host, timeout, dialling) = (host.to_string(), self.limits.connect_timeout, self.dialling.clone());
        // At most `dialling` at once; the others wait their turn (as many
        // as the tube's connections, which are bounded above). A `CLOSE`
        // from the client ends the wait or the dial.
        self.tasks.spawn(async move {
            let dialled = async {
                let Ok(_permit) = dialling.acquire_owned().await else { return Err(Refusal::Failed) };
                tokio::time::timeout(timeout, dial(policy.as_ref(), &host, port))
                    .await
                    .unwrap_or(Err(Refusal::HostUnreachable))
            };
            let result = tokio::select! {
                result = dialled => result,
                () = closed.cancelled() => Err(Refusal::Failed),
            };
            Finished::Dialled { conn, result }
        });
        Ok(())
    }

    /// A datagram for an association. Nothing here waits: no room, and it
    /// is dropped.
    fn on_datagram(&mut self, assoc: u32, host: &str, port: u16, payload: &[u8]) -> Result<(), Ended> {
        if self.conns.contains_key(&assoc) || self.dials.contains_key(&assoc) || self.pending.contains_key(&assoc) {
            return Err(Ended::Protocol("DATAGRAM for a connection"));
        }
        Stats::count(&self.stats.received, payload.len());
        match self.policy.clone() {
            // The client's end: a number it never gave out is the pod's
            // error; one it has closed may still have datagrams on the way.
            None if assoc >= self.next_conn => return Err(Ended::Protocol("DATAGRAM for no association")),
            None => {}
            // The pod's end: a late datagram of one it closed is dropped.
            Some(_) if self.closed_assocs.contains(&assoc) => {
                Stats::count(&self.stats.datagrams_dropped, 1);
                return Ok(());
            }
            // The first datagram opens the association.
            Some(policy) if !self.assocs.contains_key(&assoc) => {
                if self.assocs.len() >= self.limits.associations {
                    Stats::count(&self.stats.datagrams_dropped, 1);
                    self.remember_closed(assoc);
                    return self.send(&Frame::Close { conn: assoc, reason: CloseReason::Reset });
                }
                self.start_relay(assoc, policy);
            }
            Some(_) => {}
        }
        let datagram = Datagram { host: host.to_string(), port, payload: Bytes::copy_from_slice(payload) };
        let delivered = self.assocs.get(&assoc).is_some_and(|a| a.datagrams.try_send(datagram).is_ok());
        if !delivered {
            Stats::count(&self.stats.datagrams_dropped, 1);
        }
        Ok(())
    }

    fn on_command(&mut self, command: Command) -> Result<(), Ended> {
        match command {
            Command::Open { host, port, reply } => self.on_open_command(&host, port, reply),
            Command::Associate { reply } => self.on_associate(reply),
        }
    }

    fn on_open_command(
        &mut self,
        host: &str,
        port: u16,
        reply: oneshot::Sender<Result<Dialled, Refusal>>,
    ) -> Result<(), Ended> {
        if self.conns.len() + self.pending.len() >= self.limits.connections {
            let _ = reply.send(Err(Refusal::TooManyConnections));
            return Ok(());
        }
        let conn = self.next_id()?;
        // A host the frame cannot carry is the caller's mistake, not the tube's.
        let Ok(message) = encode(&Frame::Open { conn, host, port }) else {
            let _ = reply.send(Err(Refusal::HostUnreachable));
            return Ok(());
        };
        self.pending.insert(conn, reply);
        self.queue(message)
    }

    /// The client's end: a new association, and a task that tells the
    /// driver when its owner lets it go.
    fn on_associate(&mut self, reply: oneshot::Sender<Result<Association, Refusal>>) -> Result<(), Ended> {
        if self.policy.is_some() {
            let _ = reply.send(Err(Refusal::Failed));
            return Ok(());
        }
        if self.assocs.len() >= self.limits.associations {
            let _ = reply.send(Err(Refusal::TooManyConnections));
            return Ok(());
        }
        let assoc = self.next_id()?;
        let (inbox, received) = mpsc::channel(ASSOCIATION_INBOX);
        let gone = CancellationToken::new();
        let association =
            Association::new(assoc, received, self.outgoing.downgrade(), self.stats.clone(), gone.clone());
        if reply.send(Ok(association)).is_err() {
            // Nobody took it, and the pod never heard of it.
            return Ok(());
        }
        let serial = self.insert_assoc(assoc, inbox.clone(), gone.clone());
        self.tasks.spawn(async move {
            tokio::select! {
                () = inbox.closed() => {}
                () = gone.cancelled() => {}
            }
            Finished::Assoc { assoc, serial, reason: CloseReason::Reset }
        });
        Ok(())
    }

    /// The pod's end: an association's relay, its sockets bound as needed.
    fn start_relay(&mut self, assoc: u32, policy: Arc<P>) {
        let (datagrams, queue) = mpsc::channel(ASSOCIATION_INBOX);
        let gone = CancellationToken::new();
        let serial = self.insert_assoc(assoc, datagrams, gone.clone());
        let (outgoing, stats, idle) = (self.outgoing.clone(), self.stats.clone(), self.limits.association_idle);
        self.tasks.spawn(async move {
            let reason = tokio::select! {
                reason = udp::relay(assoc, queue, policy.as_ref(), &outgoing, &stats, idle) => reason,
                // Already forgotten: the reason goes nowhere.
                () = gone.cancelled() => CloseReason::Reset,
            };
            Finished::Assoc { assoc, serial, reason }
        });
    }

    fn insert_assoc(&mut self, assoc: u32, datagrams: mpsc::Sender<Datagram>, gone: CancellationToken) -> u64 {
        let serial = self.next_serial;
        self.next_serial = self.next_serial.wrapping_add(1);
        self.assocs.insert(assoc, Assoc { datagrams, gone, serial });
        self.stats.open_associations.store(self.assocs.len(), Ordering::Relaxed);
        serial
    }

    fn forget_assoc(&mut self, assoc: u32) {
        if let Some(gone) = self.assocs.remove(&assoc) {
            gone.gone.cancel();
            self.stats.open_associations.store(self.assocs.len(), Ordering::Relaxed);
            if self.policy.is_some() {
                self.remember_closed(assoc);
            }
        }
    }

    fn remember_closed(&mut self, assoc: u32) {
        if self.closed_assocs.len() >= CLOSED_KEPT {
            self.closed_assocs.pop_front();
        }
        self.closed_assocs.push_back(assoc);
    }

    /// The next number for a connection or an association (the client's end).
    fn next_id(&mut self) -> Result<u32, Ended> {
        let id = self.next_conn;
        self.next_conn = self.next_conn.checked_add(1).ok_or(Ended::Protocol("connection numbers ran out"))?;
        Ok(id)
    }

    fn on_finished(&mut self, finished: Result<Finished, tokio::task::JoinError>) -> Result<(), Ended> {
        match finished {
            Ok(Finished::Conn(conn)) => {
                self.conns.remove(&conn);
                self.recount();
            }
            Ok(Finished::Dialled { conn, result }) => {
                tracing::debug!(conn, ok = result.is_ok(), "dialled");
                let closed = self.dials.remove(&conn).is_none_or(|closed| closed.is_cancelled());
                self.recount();
                // The client closed it while it was being dialled: nobody wants it.
                if closed {
                    return Ok(());
                }
                match result {
                    Ok(tcp) => self.start_conn(conn, Carried::Dialled(tcp)),
                    Err(reason) => self.send(&Frame::Refused { conn, reason })?,
                }
            }
            Ok(Finished::Assoc { assoc, serial, reason }) => {
                // Forgotten already if the peer closed it (or a later one has the number).
                if self.assocs.get(&assoc).is_some_and(|a| a.serial == serial) {
                    self.forget_assoc(assoc);
                    self.send(&Frame::Close { conn: assoc, reason })?;
                }
            }
            Err(e) if e.is_panic() => {
                // A connection's task panicked: its connection is lost, the tube goes on.
                tracing::error!(error = %e, "a tube connection's task panicked");
            }
            Err(_) => {}
        }
        Ok(())
    }

    fn start_conn(&mut self, conn: u32, tcp: Carried) {
        let state = Conn::new(CancellationToken::new());
        self.conns.insert(conn, state.clone());
        self.recount();
        let (outgoing, stats) = (self.outgoing.clone(), self.stats.clone());
        self.tasks.spawn(async move {
            let opened = Frame::Opened { conn };
            let tcp = match tcp {
                // On the path its data takes: a target that speaks first (a
                // banner) must not reach the client before the news that the
                // connection is open, which the control backlog could let it.
                Carried::Dialled(tcp) => tokio::select! {
                    sent = send(&outgoing, &opened) => match sent {
                        Ok(()) => Some(tcp),
                        Err(_) => return Finished::Conn(conn),
                    },
                    () = state.gone.cancelled() => return Finished::Conn(conn),
                },
                Carried::Later(handed) => tokio::select! {
                    handed = handed => handed.ok(),
                    () = state.gone.cancelled() => return Finished::Conn(conn),
                },
            };
            match tcp {
                Some(tcp) => pump(conn, &state, tcp, &outgoing, &stats).await,
                // Dropped uncarried: the pod's side goes too.
                None => {
                    let close = Frame::Close { conn, reason: CloseReason::Reset };
                    tokio::select! {
                        _ = send(&outgoing, &close) => {}
                        () = state.gone.cancelled() => {}
                    }
                }
            }
            Finished::Conn(conn)
        });
    }

    /// Connections carried and being dialled: what the cap counts.
    fn live_conns(&self) -> usize {
        self.conns.len() + self.dials.len()
    }

    /// Every change to the connections goes through here, so the count the
    /// idle check reads never stays behind.
    fn recount(&self) {
        self.stats.open_connections.store(self.live_conns(), Ordering::Relaxed);
    }

    fn close_conn(&mut self, conn: u32, reason: CloseReason) -> Result<(), Ended> {
        if let Some(state) = self.conns.remove(&conn) {
            state.gone.cancel();
        }
        self.recount();
        self.send(&Frame::Close { conn, reason })
    }
}

/// Resolves `host` and dials the first address the policy allows.
async fn dial<P: Policy + ?Sized>(policy: &P, host: &str, port: u16) -> Result<TcpStream, Refusal> {
    let addresses: Vec<SocketAddr> =
        tokio::net::lookup_host((host, port)).await.map_err(|_| Refusal::HostUnreachable)?.collect();
    let allowed: Vec<SocketAddr> = addresses.into_iter().filter(|a| policy.allows_address(host, *a)).collect();
    if allowed.is_empty() {
        return Err(Refusal::NotAllowed);
    }
    let mut last = Refusal::HostUnreachable;
    for address in allowed {
        match TcpStream::connect(address).await {
            Ok(tcp) => {
                let _ = tcp.set_nodelay(true);
                return Ok(tcp);
            }
            Err(e) => last = refusal_of(&e),
        }
    }
    Err(last)
}

fn refusal_of(error: &std::io::Error) -> Refusal {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::ConnectionRefused => Refusal::ConnectionRefused,
        ErrorKind::NetworkUnreachable => Refusal::NetworkUnreachable,
        ErrorKind::HostUnreachable | ErrorKind::TimedOut => Refusal::HostUnreachable,
        _ => Refusal::Failed,
    }
}

/// Pumps one connection both ways until both directions have ended, or
/// either fails, or the peer or the tube ends it.
async fn pump(conn: u32, state: &Conn, tcp: TcpStream, outgoing: &mpsc::Sender<Bytes>, stats: &Stats) {
    let _ = tcp.set_nodelay(true);
    let (mut reader, mut writer) = tcp.into_split();
    let upstream = async {
        let mut buffer = vec![0u8; MAX_DATA];
        loop {
            // Credit first: without it nothing is read, and TCP pushes back.
            let allowed = loop {
                let credit = state.credit.notified();
                let allowed = state.state().send.allows(MAX_DATA);
                if allowed > 0 {
                    break allowed;
                }
                credit.await;
            };
            let read = reader.read(&mut buffer[..allowed]).await.map_err(|_| ())?;
            if read == 0 {
                return send(outgoing, &Frame::Eof { conn }).await.map_err(|_| ());
            }
            state.state().send.spend(read);
            send(outgoing, &Frame::Data { conn, bytes: &buffer[..read] }).await.map_err(|_| ())?;
            stats.sent.fetch_add(read as u64, Ordering::Relaxed);
        }
    };
    let downstream = async {
        loop {
            let changed = state.inbox_changed.notified();
            let (chunk, eof) = {
                let mut guard = state.state();
                (guard.inbox.split().freeze(), guard.eof)
            };
            if chunk.is_empty() {
                if eof {
                    return writer.shutdown().await.map_err(|_| ());
                }
                changed.await;
                continue;
            }
            writer.write_all(&chunk).await.map_err(|_| ())?;
            let credit = state.state().receive.written(chunk.len());
            if let Some(bytes) = credit {
                send(outgoing, &Frame::Credit { conn, bytes }).await.map_err(|_| ())?;
            }
        }
    };
    let both = async { tokio::try_join!(upstream, downstream) };
    tokio::select! {
        result = both => {
            if result.is_err() {
                // Our side failed: the peer's side goes too.
                let _ = send(outgoing, &Frame::Close { conn, reason: CloseReason::Reset }).await;
            }
        }
        () = state.gone.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    //! Both ends in one process, joined by a pair of queues in place of the
    //! data channel; real TCP targets on loopback.

    use super::*;
    use std::sync::atomic::AtomicU64;
    use tidepool_tests::targets::{echo_target, echoed, pattern, udp_echo_target as udp_echo};
    use tidepool_tests::until;
    use tidepool_wire::tube::FrameError;
    use tidepool_wire::tube::WINDOW;
    use tokio::net::TcpListener;

    /// Allows loopback only (the real policy forbids it by default).
    struct Loopback;

    impl Policy for Loopback {
        fn allows_name(&self, host: &str, _: u16) -> bool {
            host == "127.0.0.1" || host == "localhost"
        }
        fn allows_address(&self, _: &str, address: SocketAddr) -> bool {
            address.ip().is_loopback()
        }
    }

    fn link() -> (Channel, Channel) {
        let (a_out, b_in) = mpsc::channel(OUTGOING_FRAMES);
        let (b_out, a_in) = mpsc::channel(OUTGOING_FRAMES);
        (Channel { incoming: a_in, outgoing: a_out }, Channel { incoming: b_in, outgoing: b_out })
    }

    /// A client end and a pod end, joined, their drivers running.
    struct Pair {
        client: Mux,
        server: Mux,
        client_ended: tokio::task::JoinHandle<Ended>,
        server_ended: tokio::task::JoinHandle<Ended>,
    }

    fn pair() -> Pair {
        pair_with(Limits::default())
    }

    fn pair_with(limits: Limits) -> Pair {
        let (a, b) = link();
        let (client, client_driver) = Mux::client(a, limits);
        let (server, server_driver) = Mux::server(b, limits, Arc::new(Loopback));
        Pair { client, server, client_ended: tokio::spawn(client_driver), server_ended: tokio::spawn(server_driver) }
    }

    /// A TCP server on loopback that runs `serve` for each connection.
    async fn target<F, Fut>(serve: F) -> u16
    where
        F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let serve = Arc::new(serve);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve(tcp));
            }
        });
        port
    }

    /// A local TCP pair: the application's socket, and the one the tube carries.
    async fn local_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (carried, _) = listener.accept().await.unwrap();
        (app, carried)
    }

    /// Opens a connection through the tube to `port`; the application's socket.
    async fn connect(mux: &Mux, port: u16) -> Result<TcpStream, Refusal> {
        let (app, carried) = local_pair().await;
        mux.open(carried, "127.0.0.1", port).await.map(|()| app)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sixty_four_connections_at_once_carry_their_own_bytes_both_ways() {
        let pair = pair();
        let port = echo_target().await;
        let mut connections = JoinSet::new();
        for i in 0..64u32 {
            let client = pair.client.clone();
            connections.spawn(async move {
                let app = connect(&client, port).await.unwrap();
                let sent = pattern(i, 300_000 + i as usize * 1_000);
                let echoed = echoed(app, &sent).await;
                assert!(echoed == sent, "connection {i}: {} bytes back of {}", echoed.len(), sent.len());
            });
        }
        while let Some(done) = connections.join_next().await {
            done.unwrap();
        }
        let total: u64 = (0..64u64).map(|i| 300_000 + i * 1_000).sum();
        assert_eq!(pair.client.stats().sent.load(Ordering::Relaxed), total);
        assert_eq!(pair.client.stats().received.load(Ordering::Relaxed), total);
        assert_eq!(pair.server.stats().received.load(Ordering::Relaxed), total);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_target_that_speaks_first_is_heard_whole() {
        // A target that greets (a banner, then the end) the moment the pod
        // connects, as sshd, SMTP and database servers do: nothing of it may
        // reach the client before the news that the connection is open,
        // which the client would drop. Before the fix, the greetings
        // overtook OPENED here and were lost.
        //
        // The pod's frames reach the client slowly, as through a channel
        // whose send buffer is full, so the pod's queue to the peer stays full.
        let (client_end, mut pod_end) = link();
        let (slowed, mut from_pod) = mpsc::channel::<Bytes>(OUTGOING_FRAMES);
        let to_client = std::mem::replace(&mut pod_end.outgoing, slowed);
        tokio::spawn(async move {
            while let Some(frame) = from_pod.recv().await {
                tokio::time::sleep(Duration::from_micros(200)).await;
                if to_client.send(frame).await.is_err() {
                    break;
                }
            }
        });
        let (client, client_driver) = Mux::client(client_end, Limits::default());
        let (_pod, pod_driver) = Mux::server(pod_end, Limits::default(), Arc::new(Loopback));
        let (_client_ended, _pod_ended) = (tokio::spawn(client_driver), tokio::spawn(pod_driver));
        let port = target(|mut tcp: TcpStream| async move {
            let _ = tcp.write_all(b"SSH-2.0-tidepool-test\r\n").await;
        })
        .await;
        // Bulk bytes both ways on the same tube keep its queue to the peer full.
        let bulk = connect(&client, echo_target().await).await.unwrap();
        let sent = pattern(1, 8 << 20);
        let busy = tokio::spawn(async move { echoed(bulk, &sent).await.len() });
        let mut connections = JoinSet::new();
        for _ in 0..64 {
            let client = client.clone();
            connections.spawn(async move {
                let mut app = connect(&client, port).await.unwrap();
                let mut heard = Vec::new();
                tokio::time::timeout(Duration::from_secs(10), app.read_to_end(&mut heard))
                    .await
                    .expect("the banner's end never came")
                    .unwrap();
                assert_eq!(heard, b"SSH-2.0-tidepool-test\r\n");
            });
        }
        while let Some(done) = connections.join_next().await {
            done.unwrap();
        }
        assert_eq!(busy.await.unwrap(), 8 << 20);
    }

    #[tokio::test]
    async fn a_half_closed_connection_still_gets_its_answer() {
        let pair = pair();
        // Reads until the client is done, then answers with what it counted.
        let port = target(|mut tcp: TcpStream| async move {
            let mut got = Vec::new();
            tcp.read_to_end(&mut got).await.unwrap();
            tcp.write_all(format!("got {}", got.len()).as_bytes()).await.unwrap();
        })
        .await;
        let mut app = connect(&pair.client, port).await.unwrap();
        app.write_all(&[1u8; 100_000]).await.unwrap();
        app.shutdown().await.unwrap();
        let mut answer = String::new();
        app.read_to_string(&mut answer).await.unwrap();
        assert_eq!(answer, "got 100000");
    }

    #[tokio::test]
    async fn a_refused_target_is_answered_with_its_reason() {
        let pair = pair();
        // A port nobody listens on: bound, then let go.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        assert_eq!(connect(&pair.client, closed).await.unwrap_err(), Refusal::ConnectionRefused);
        let (_, carried) = local_pair().await;
        let elsewhere = pair.client.open(carried, "10.1.2.3", 5432).await;
        assert_eq!(elsewhere.unwrap_err(), Refusal::NotAllowed);
        let (_, carried) = local_pair().await;
        assert_eq!(pair.client.open(carried, "no-such-host.invalid", 80).await.unwrap_err(), Refusal::NotAllowed);
        // The tube goes on.
        let port = echo_target().await;
        let mut app = connect(&pair.client, port).await.unwrap();
        app.write_all(b"ping").await.unwrap();
        let mut pong = [0u8; 4];
        app.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"ping");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_reader_stops_only_its_own_connection() {
        let pair = pair();
        // Sends without end; its client never reads.
        let flood = target(|mut tcp: TcpStream| async move {
            let chunk = vec![7u8; 64 * 1024];
            while tcp.write_all(&chunk).await.is_ok() {}
        })
        .await;
        let _stalled = connect(&pair.client, flood).await.unwrap();
        // The client's end writes on what it gets into the application's
        // socket until the kernel's buffers are full, and credits that; then
        // no credit goes back, and the pod's end stops sending.
        let mut sent = 0;
        for _ in 0..50 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = pair.server.stats().sent.load(Ordering::Relaxed);
            if now == sent {
                break;
            }
            sent = now;
        }
        assert_eq!(
            pair.server.stats().sent.load(Ordering::Relaxed),
            sent,
            "still sending to a reader that takes nothing"
        );
        assert!(sent < 64 << 20, "the pod sent {sent} bytes to a reader that takes nothing");
        // Another connection is served as if nothing were wrong.
        let port = echo_target().await;
        let mut app = connect(&pair.client, port).await.unwrap();
        let data = pattern(9, 1 << 20);
        let (mut reader, mut writer) = app.split();
        let (_, echoed) = tokio::join!(async { writer.write_all(&data).await.unwrap() }, async {
            let mut echoed = vec![0u8; data.len()];
            reader.read_exact(&mut echoed).await.unwrap();
            echoed
        });
        assert!(echoed == data);
        assert_eq!(pair.server.stats().sent.load(Ordering::Relaxed), sent + (1 << 20));
    }

    #[tokio::test]
    async fn when_the_peer_goes_its_connections_close_and_the_driver_says_why() {
        let pair = pair();
        let port = echo_target().await;
        let mut app = connect(&pair.client, port).await.unwrap();
        app.write_all(b"hello").await.unwrap();
        let mut hello = [0u8; 5];
        app.read_exact(&mut hello).await.unwrap();
        pair.server.close();
        assert_eq!(pair.server_ended.await.unwrap(), Ended::Closed);
        assert_eq!(pair.client_ended.await.unwrap(), Ended::ChannelClosed);
        // Whoever holds an end hears of it.
        tokio::time::timeout(Duration::from_secs(5), pair.client.ended()).await.unwrap();
        // The application's socket ends rather than hanging.
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), app.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "the connection hung after its tube ended");
        let (_, carried) = local_pair().await;
        assert_eq!(pair.client.open(carried, "127.0.0.1", port).await, Err(Refusal::Failed));
    }

    /// A pod end fed frames by the test, its answers read back.
    fn raw_server() -> (mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>, tokio::task::JoinHandle<Ended>) {
        let (to_server, from_server, _, ended) = raw_server_with(Limits::default());
        (to_server, from_server, ended)
    }

    fn raw_server_with(
        limits: Limits,
    ) -> (mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>, Mux, tokio::task::JoinHandle<Ended>) {
        let (to_server, incoming) = mpsc::channel(OUTGOING_FRAMES);
        let (outgoing, from_server) = mpsc::channel(OUTGOING_FRAMES);
        let (server, driver) = Mux::server(Channel { incoming, outgoing }, limits, Arc::new(Loopback));
        (to_server, from_server, server, tokio::spawn(driver))
    }

    /// A client end fed frames by the test, its frames read back.
    fn raw_client() -> (Mux, mpsc::Sender<Bytes>, mpsc::Receiver<Bytes>, tokio::task::JoinHandle<Ended>) {
        let (to_client, incoming) = mpsc::channel(OUTGOING_FRAMES);
        let (outgoing, from_client) = mpsc::channel(OUTGOING_FRAMES);
        let (client, driver) = Mux::client(Channel { incoming, outgoing }, Limits::default());
        (client, to_client, from_client, tokio::spawn(driver))
    }

    /// The next frame that is not a ping.
    async fn next_frame(from: &mut mpsc::Receiver<Bytes>) -> Bytes {
        loop {
            let message = from.recv().await.unwrap();
            if !matches!(Frame::decode(&message).unwrap(), Frame::Ping { .. } | Frame::Pong { .. }) {
                return message;
            }
        }
    }

    fn frame(frame: Frame<'_>) -> Bytes {
        let mut out = Vec::new();
        frame.encode(&mut out).unwrap();
        Bytes::from(out)
    }

    #[tokio::test]
    async fn a_malformed_frame_ends_the_tube() {
        let (to_server, _from_server, ended) = raw_server();
        to_server.send(Bytes::from_static(&[42, 0, 0, 0, 1])).await.unwrap();
        assert_eq!(ended.await.unwrap(), Ended::BadFrame(FrameError::UnknownKind(42)));
        let (to_server, _from_server, ended) = raw_server();
        to_server.send(frame(Frame::Opened { conn: 1 })).await.unwrap();
        assert_eq!(ended.await.unwrap(), Ended::Protocol("OPENED for no open"));
    }

    #[tokio::test]
    async fn a_dial_the_client_closed_holds_its_place_until_it_ends() {
        // No dial slot is ever free: every dial waits until it is closed.
        let limits = Limits { connections: 2, dialling: 0, ..Limits::default() };
        let (to_server, mut from_server, server, _ended) = raw_server_with(limits);
        let port = echo_target().await;
        let open = |conn| frame(Frame::Open { conn, host: "127.0.0.1", port });
        let open_count = || server.stats().open_connections.load(Ordering::Relaxed);
        for conn in [1, 2] {
            to_server.send(open(conn)).await.unwrap();
        }
        until("both dials counted", || open_count() == 2).await;
        // Beyond the cap, refused, dialling ones counted.
        to_server.send(open(3)).await.unwrap();
        let refused = next_frame(&mut from_server).await;
        assert_eq!(Frame::decode(&refused).unwrap(), Frame::Refused { conn: 3, reason: Refusal::TooManyConnections });
        // A close ends the dial: its place frees, and nothing answers it.
        to_server.send(frame(Frame::Close { conn: 1, reason: CloseReason::Reset })).await.unwrap();
        until("the closed dial to free its place", || open_count() == 1).await;
        to_server.send(open(4)).await.unwrap();
        until("the new dial counted", || open_count() == 2).await;
        assert!(only_pings_waiting(&mut from_server), "a closed dial was answered");
    }

    /// Whether all the frames waiting are pings.
    fn only_pings_waiting(from: &mut mpsc::Receiver<Bytes>) -> bool {
        while let Ok(message) = from.try_recv() {
            if !matches!(Frame::decode(&message).unwrap(), Frame::Ping { .. }) {
                return false;
            }
        }
        true
    }

    #[tokio::test]
    async fn an_open_with_a_number_already_used_ends_the_tube() {
        let (to_server, _from_server, _, ended) = raw_server_with(Limits { dialling: 0, ..Limits::default() });
        let port = echo_target().await;
        for message in [
            frame(Frame::Open { conn: 5, host: "127.0.0.1", port }),
            frame(Frame::Close { conn: 5, reason: CloseReason::Reset }),
            frame(Frame::Open { conn: 5, host: "127.0.0.1", port }),
        ] {
            to_server.send(message).await.unwrap();
        }
        assert_eq!(ended.await.unwrap(), Ended::Protocol("OPEN for a number already used"));
        // Nor may a number go backwards.
        let (to_server, _from_server, _, ended) = raw_server_with(Limits { dialling: 0, ..Limits::default() });
        to_server.send(frame(Frame::Open { conn: 7, host: "127.0.0.1", port })).await.unwrap();
        to_server.send(frame(Frame::Open { conn: 6, host: "127.0.0.1", port })).await.unwrap();
        assert_eq!(ended.await.unwrap(), Ended::Protocol("OPEN for a number already used"));
    }

    #[tokio::test]
    async fn a_peer_that_sends_beyond_its_credit_loses_the_connection() {
        let (to_server, mut from_server, _ended) = raw_server();
        let port = echo_target().await;
        to_server.send(frame(Frame::Open { conn: 1, host: "127.0.0.1", port })).await.unwrap();
        let opened = loop {
            let answer = from_server.recv().await.unwrap();
            if !matches!(Frame::decode(&answer).unwrap(), Frame::Ping { .. }) {
                break answer;
            }
        };
        assert_eq!(Frame::decode(&opened).unwrap(), Frame::Opened { conn: 1 });
        // The echo target sends back; the test never credits it, and sends
        // more than the window itself.
        let chunk = vec![1u8; MAX_DATA];
        for _ in 0..(WINDOW as usize / MAX_DATA + 1) {
            to_server.send(frame(Frame::Data { conn: 1, bytes: &chunk })).await.unwrap();
        }
        let closed = loop {
            let answer = from_server.recv().await.unwrap();
            if let Frame::Close { conn, reason } = Frame::decode(&answer).unwrap() {
                break (conn, reason);
            }
        };
        assert_eq!(closed, (1, CloseReason::FlowViolation));
    }

    fn load(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn a_datagram_reaches_its_target_and_its_answer_comes_back() {
        let pair = pair();
        let port = udp_echo().await;
        let mut association = pair.client.associate().await.unwrap();
        association.send("127.0.0.1", port, b"hello").await.unwrap();
        let back = association.recv().await.unwrap();
        assert_eq!(back, Datagram { host: "127.0.0.1".into(), port, payload: Bytes::from_static(b"hello") });
        let big = pattern(3, 60_000);
        association.send("127.0.0.1", port, &big).await.unwrap();
        assert!(association.recv().await.unwrap().payload == big);
        let too_big = vec![0u8; tidepool_wire::tube::MAX_DATAGRAM + 1];
        assert_eq!(
            association.send("127.0.0.1", port, &too_big).await,
            Err(crate::DatagramError::TooLong(too_big.len()))
        );
        assert!(matches!(association.send("a b", port, b"x").await, Err(crate::DatagramError::Frame(_))));
        for stats in [pair.client.stats(), pair.server.stats()] {
            assert_eq!((load(&stats.sent), load(&stats.received)), (60_005, 60_005));
        }
        assert_eq!(pair.server.stats().open_associations.load(Ordering::Relaxed), 1);
        assert_eq!(pair.server.associate().await.unwrap_err(), Refusal::Failed, "the pod's end opens none");
    }

    #[tokio::test]
    async fn a_datagram_the_policy_refuses_is_dropped_and_counted() {
        let pair = pair();
        let port = udp_echo().await;
        let mut association = pair.client.associate().await.unwrap();
        association.send("10.1.2.3", port, b"not allowed").await.unwrap();
        until("refused", || load(&pair.server.stats().datagrams_refused) == 1).await;
        // The association goes on; nothing came back for the refused one.
        association.send("127.0.0.1", port, b"allowed").await.unwrap();
        assert_eq!(association.recv().await.unwrap().payload, Bytes::from_static(b"allowed"));
        assert_eq!(load(&pair.server.stats().datagrams_dropped), 0);
    }

    #[tokio::test]
    async fn a_dropped_association_is_forgotten_at_both_ends() {
        let pair = pair();
        let port = udp_echo().await;
        let mut association = pair.client.associate().await.unwrap();
        association.send("127.0.0.1", port, b"x").await.unwrap();
        association.recv().await.unwrap();
        let open = |mux: &Mux| mux.stats().open_associations.load(Ordering::Relaxed);
        assert_eq!((open(&pair.client), open(&pair.server)), (1, 1));
        drop(association);
        until("forgotten at both ends", || open(&pair.client) == 0 && open(&pair.server) == 0).await;
        // Connections and associations share their numbers: the next connection is 2.
        let port = echo_target().await;
        let mut app = connect(&pair.client, port).await.unwrap();
        app.write_all(b"ok").await.unwrap();
        let mut ok = [0u8; 2];
        app.read_exact(&mut ok).await.unwrap();
    }

    #[tokio::test]
    async fn an_idle_association_is_ended_by_the_pod() {
        let limits = Limits { association_idle: Duration::from_millis(300), ..Limits::default() };
        let pair = pair_with(limits);
        let port = udp_echo().await;
        let mut association = pair.client.associate().await.unwrap();
        association.send("127.0.0.1", port, b"x").await.unwrap();
        association.recv().await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(5), association.recv()).await;
        assert_eq!(ended, Ok(None), "the association outlived its idle time");
        assert!(association.is_ended());
        assert_eq!(association.send("127.0.0.1", port, b"y").await, Err(crate::DatagramError::Ended));
        assert_eq!(pair.server.stats().open_associations.load(Ordering::Relaxed), 0);
        assert_eq!(pair.client.stats().open_associations.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn associations_beyond_the_limit_are_refused() {
        let pair = pair_with(Limits { associations: 2, ..Limits::default() });
        let first = pair.client.associate().await.unwrap();
        let _second = pair.client.associate().await.unwrap();
        assert_eq!(pair.client.associate().await.unwrap_err(), Refusal::TooManyConnections);
        drop(first);
        until("a place freed", || pair.client.stats().open_associations.load(Ordering::Relaxed) == 1).await;
        pair.client.associate().await.unwrap();

        // The pod's end: beyond its limit, a new association is closed and its datagram dropped.
        let (to_server, mut from_server, server, _ended) =
            raw_server_with(Limits { associations: 1, ..Limits::default() });
        let port = udp_echo().await;
        to_server.send(frame(Frame::Datagram { assoc: 1, host: "127.0.0.1", port, payload: b"a" })).await.unwrap();
        to_server.send(frame(Frame::Datagram { assoc: 3, host: "127.0.0.1", port, payload: b"b" })).await.unwrap();
        let mut answers = Vec::new();
        for _ in 0..2 {
            answers.push(next_frame(&mut from_server).await);
        }
        let answers: Vec<Frame<'_>> = answers.iter().map(|a| Frame::decode(a).unwrap()).collect();
        assert!(answers.contains(&Frame::Close { conn: 3, reason: CloseReason::Reset }), "{answers:?}");
        assert!(answers.contains(&Frame::Datagram { assoc: 1, host: "127.0.0.1", port, payload: b"a" }), "{answers:?}");
        assert_eq!(load(&server.stats().datagrams_dropped), 1);
        // More datagrams of the refused one are dropped without a second CLOSE.
        to_server.send(frame(Frame::Datagram { assoc: 3, host: "127.0.0.1", port, payload: b"c" })).await.unwrap();
        until("the late datagram dropped", || load(&server.stats().datagrams_dropped) == 2).await;
        assert!(only_pings_waiting(&mut from_server), "a refused association was closed twice");
    }

    #[tokio::test]
    async fn a_late_datagram_does_not_reopen_an_association_the_pod_closed() {
        let limits = Limits { association_idle: Duration::from_millis(200), ..Limits::default() };
        let (to_server, mut from_server, server, _ended) = raw_server_with(limits);
        let port = udp_echo().await;
        let datagram = |payload| frame(Frame::Datagram { assoc: 1, host: "127.0.0.1", port, payload });
        to_server.send(datagram(b"a")).await.unwrap();
        assert!(matches!(Frame::decode(&next_frame(&mut from_server).await).unwrap(), Frame::Datagram { .. }));
        // Idle: the pod closes it.
        let closed = next_frame(&mut from_server).await;
        assert_eq!(Frame::decode(&closed).unwrap(), Frame::Close { conn: 1, reason: CloseReason::Idle });
        to_server.send(datagram(b"late")).await.unwrap();
        until("the late datagram dropped", || load(&server.stats().datagrams_dropped) == 1).await;
        assert_eq!(server.stats().open_associations.load(Ordering::Relaxed), 0, "the late datagram reopened it");
    }

    #[tokio::test]
    async fn a_full_inbox_drops_the_newest_and_a_late_datagram_is_only_counted() {
        let (client, to_client, _from_client, ended) = raw_client();
        let mut association = client.associate().await.unwrap();
        let assoc = association.id();
        for i in 0..100u8 {
            to_client.send(frame(Frame::Datagram { assoc, host: "10.0.0.1", port: 53, payload: &[i] })).await.unwrap();
        }
        until("the newest dropped", || load(&client.stats().datagrams_dropped) == 36).await;
        for i in 0..ASSOCIATION_INBOX as u8 {
            assert_eq!(association.recv().await.unwrap().payload[..], [i]);
        }
        drop(association);
        until("forgotten", || client.stats().open_associations.load(Ordering::Relaxed) == 0).await;
        // Closed here, still on its way from the pod: UDP, so dropped.
        to_client.send(frame(Frame::Datagram { assoc, host: "10.0.0.1", port: 53, payload: b"late" })).await.unwrap();
        until("the late one dropped", || load(&client.stats().datagrams_dropped) == 37).await;
        // A number the client never gave out is the pod's error.
        to_client.send(frame(Frame::Datagram { assoc: 99, host: "10.0.0.1", port: 53, payload: b"" })).await.unwrap();
        assert_eq!(ended.await.unwrap(), Ended::Protocol("DATAGRAM for no association"));
    }

    #[tokio::test]
    async fn a_datagram_naming_a_connection_ends_the_tube() {
        let (to_server, mut from_server, ended) = raw_server();
        let port = echo_target().await;
        to_server.send(frame(Frame::Open { conn: 1, host: "127.0.0.1", port })).await.unwrap();
        assert_eq!(Frame::decode(&next_frame(&mut from_server).await).unwrap(), Frame::Opened { conn: 1 });
        to_server.send(frame(Frame::Datagram { assoc: 1, host: "127.0.0.1", port, payload: b"" })).await.unwrap();
        assert_eq!(ended.await.unwrap(), Ended::Protocol("DATAGRAM for a connection"));
    }

    #[tokio::test]
    async fn a_dialled_connection_keeps_what_came_before_its_socket() {
        let pair = pair();
        // Speaks first, as SSH and SMTP servers do.
        let port = target(|mut tcp: TcpStream| async move {
            tcp.write_all(b"banner\n").await.unwrap();
            let (mut reader, mut writer) = tcp.split();
            let _ = tokio::io::copy(&mut reader, &mut writer).await;
        })
        .await;
        let dialled = pair.client.dial("127.0.0.1", port).await.unwrap();
        let (mut app, carried) = local_pair().await;
        // What a SOCKS5 server would write before the tube carries the socket.
        let mut carried = carried;
        carried.write_all(b"reply;").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        dialled.carry(carried);
        let mut got = [0u8; 13];
        app.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"reply;banner\n");

        // Dropped uncarried: the pod lets go of the connection too.
        let dialled = pair.client.dial("127.0.0.1", port).await.unwrap();
        let open = |mux: &Mux| mux.stats().open_connections.load(Ordering::Relaxed);
        until("both open", || open(&pair.server) == 2).await;
        drop(dialled);
        until("closed at the pod", || open(&pair.server) == 1 && open(&pair.client) == 1).await;
    }

    #[tokio::test]
    async fn a_host_the_frame_cannot_carry_is_refused_and_the_tube_goes_on() {
        let pair = pair();
        assert_eq!(pair.client.dial("no such host", 80).await.unwrap_err(), Refusal::HostUnreachable);
        assert_eq!(pair.client.dial("", 80).await.unwrap_err(), Refusal::HostUnreachable);
        let port = echo_target().await;
        let mut app = connect(&pair.client, port).await.unwrap();
        app.write_all(b"ok").await.unwrap();
        let mut ok = [0u8; 2];
        app.read_exact(&mut ok).await.unwrap();
    }
}
