//! Live handover: a new process takes the listeners and the open connections of a
//! running one, so that a deploy closes no connection (README, "Deploying without
//! disconnecting"; docs/architecture.md, "Live handover").
//!
//! The old process, started with a handover socket ([`crate::ServerBuilder::handover_socket`]),
//! listens on it with a thread of its own (`give`). A new process started with
//! [`crate::ServerBuilder::take_over`] connects before it binds anything, says which
//! format it speaks, and gets the listening sockets (`SCM_RIGHTS`): it accepts on
//! them from then on, so no connection is refused meanwhile (the old process stops
//! accepting on them). Then each shard of the old process moves its connections, one
//! by one as each is quiet: its recv is cancelled, a plain descriptor is made of its
//! socket (`Driver::detach`), the session and the gear's state are
//! frozen (`FrozenConn`), and the pair goes to the new process, whose shard adopts
//! the socket (`Driver::adopt`) and thaws the session. Bytes the
//! client sent meanwhile wait in the socket's receive queue and are read by the new
//! process, so every message is answered exactly once, by one side or the other.
//!
//! The old process lets go of a connection only when the new one says it took it
//! (`Ack`); until then the connection is parked, its state intact. So if the new
//! process goes away midway, the old one keeps every connection it has not had an
//! answer for, reads them again and accepts again, then waits for another taker; and
//! a connection the new build refuses (its gear's `thaw` says no) is closed by the old
//! process with 1001, `terminate` running there. The old process exits (its `run`
//! returns) once it holds nothing.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use kythera_handler_api::{CloseCode, CloseFrame, Frame};
use kythera_registry::RelaySink;

use crate::gear::App;
use crate::protocol::deflate::Agreed;
use crate::server::Shared;

pub(crate) mod socket;

use socket::Channel;

/// The version of what crosses the socket. A process refuses a taker that speaks
/// another (a newer build bumps it when the format changes, and may keep reading the
/// older one).
pub const FORMAT: u32 = 3;

/// How long an old process keeps handing over after the new one took the listeners:
/// the connections that were never quiet meanwhile then get 1001, as in a drain.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// One connection on its way to the new process, apart from its socket.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct FrozenConn {
    /// The mount pattern of its gear (gear indexes may differ between builds).
    pub gear: String,
    /// Its connection id in the old process, for the answer ([`Message::Ack`]).
    pub origin: u64,
    pub peer: Option<SocketAddr>,
    /// How long it has been open.
    pub age_ms: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    /// permessage-deflate, when agreed (only without context takeover both ways).
    pub deflate: Option<Agreed>,
    pub names: Vec<String>,
    pub groups: Vec<String>,
    /// What the gear's `freeze` gave.
    pub state: Vec<u8>,
    /// What was received of a frame or message not whole yet, as the client sent it
    /// (see `session::handover`): read first by the new process.
    pub input: Vec<u8>,
    /// Output the old process had not sent (queued, or left by its send in flight):
    /// sent first by the new process.
    pub output: Vec<u8>,
}

/// What becomes of a connection sent to the new process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Verdict {
    /// The new process took it: the old one lets go of it.
    Taken,
    /// The new build refused its state: the old process closes it with 1001.
    Refused,
    /// It never reached the new process (its message could not be sent): the old
    /// process keeps serving it.
    Kept,
}

/// An answer about a connection: its id in the old process, and its fate.
pub(crate) type Answer = (u64, Verdict);

impl FrozenConn {
    /// About how many bytes it takes on the handover socket (a bound: postcard
    /// writes lengths as varints).
    pub(crate) fn approximate_size(&self) -> usize {
        let strings: usize = self
            .names
            .iter()
            .chain(&self.groups)
            .map(|s| s.len() + 10)
            .sum();
        self.state.len() + self.input.len() + self.output.len() + self.gear.len() + strings + 128
    }
}

/// A connection with its socket.
#[derive(Debug)]
pub(crate) struct Moved {
    pub fd: OwnedFd,
    pub conn: FrozenConn,
}

/// What the old process's shards and registries queue for the new process, in the
/// order it happened: a connection, or a frame published meanwhile.
#[derive(Debug)]
pub(crate) enum ToNew {
    Conn(Moved),
    Publish(Relayed),
}

/// A frame published to a group in one process during a handover, for the members the
/// other process holds (see `kythera_registry::RelaySink`).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Relayed {
    /// The gear's mount pattern.
    gear: String,
    group: String,
    frame: WireFrame,
}

/// A published frame as it crosses the handover socket.
#[derive(Debug, Serialize, Deserialize)]
enum WireFrame {
    Text(String),
    Binary(Vec<u8>),
    Close(Option<(u16, String)>),
}

impl Relayed {
    /// `None` when it would not fit in one message on the handover socket.
    fn new(gear: &str, group: &str, frame: &Frame) -> Option<Relayed> {
        let payload = match frame {
            Frame::Text(t) => t.as_str().len(),
            Frame::Binary(b) => b.len(),
            Frame::Close(_) => 0,
        };
        if payload + gear.len() + group.len() > socket::MAX_MESSAGE - 1024 {
            return None;
        }
        let frame = match frame {
            Frame::Text(t) => WireFrame::Text(t.as_str().to_owned()),
            Frame::Binary(b) => WireFrame::Binary(b.to_vec()),
            Frame::Close(c) => WireFrame::Close(
                c.as_ref()
                    .map(|c| (u16::from(c.code), c.reason.as_str().to_owned())),
            ),
        };
        Some(Relayed {
            gear: gear.to_owned(),
            group: group.to_owned(),
            frame,
        })
    }

    /// Publishes it to this process's members of its group.
    fn publish_here(self, app: &App) {
        let frame = match self.frame {
            WireFrame::Text(t) => Frame::text(t),
            WireFrame::Binary(b) => Frame::Binary(b.into()),
            WireFrame::Close(None) => Frame::Close(None),
            WireFrame::Close(Some((code, reason))) => match CloseCode::try_from(code) {
                Ok(code) => Frame::Close(Some(CloseFrame {
                    code,
                    reason: reason.into(),
                })),
                Err(_) => Frame::Close(None),
            },
        };
        app.publish_relayed(&self.gear, &self.group, frame);
    }
}

/// The old process's relay: frames go into the handover thread's queue, behind the
/// connections queued before them.
struct ToNewRelay {
    gear: String,
    tx: Mutex<mpsc::Sender<ToNew>>,
}

impl RelaySink for ToNewRelay {
    fn frame(&self, group: &str, frame: &Frame) -> bool {
        let Some(relayed) = Relayed::new(&self.gear, group, frame) else {
            return false;
        };
        self.tx
            .lock()
            .is_ok_and(|tx| tx.send(ToNew::Publish(relayed)).is_ok())
    }
}

/// The new process's relay: frames go to the old process at once, on the socket its
/// answers take (so a frame published before a connection was answered for arrives
/// before that answer), without waiting: with the socket full, the frame is not
/// relayed (and counted so) rather than a shard stalled.
struct ToOldRelay {
    gear: String,
    channel: Arc<Channel>,
}

impl RelaySink for ToOldRelay {
    fn frame(&self, group: &str, frame: &Frame) -> bool {
        let Some(relayed) = Relayed::new(&self.gear, group, frame) else {
            return false;
        };
        encode(&Message::Publish(relayed)).is_ok_and(|bytes| self.channel.send_now(&bytes).is_ok())
    }
}

#[derive(Debug, Serialize, Deserialize)]
enum Message {
    /// New to old: the format the new process speaks, and its cluster node id.
    Hello { format: u32, node: Option<String> },
    /// Old to new: the listening sockets (attached in this order), and whether the two
    /// processes are the same cluster node (then clustered gears' frames are relayed
    /// too: Redis does not carry them between a node and itself).
    Listeners {
        listeners: Vec<ListenerInfo>,
        same_node: bool,
    },
    /// Old to new: a connection (its socket attached).
    Conn(FrozenConn),
    /// New to old: the connection `origin` was taken (the old process lets go of it),
    /// or refused (the old process keeps it and closes it with 1001).
    Ack { origin: u64, verdict: Verdict },
    /// Either way: a frame published to a group, for the members this side holds.
    Publish(Relayed),
    /// Old to new: the old process holds nothing more and exits.
    Done { moved: u64 },
    /// Old to new: refused (another format).
    Refused { reason: String },
}

/// A listening socket handed over.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ListenerInfo {
    pub addr: SocketAddr,
    pub tls: bool,
}

/// What the shards and the handover thread share, in both roles.
#[derive(Debug)]
pub(crate) struct HandoverState {
    /// Old process: attempts so far (each gets the next number).
    attempts: AtomicU64,
    /// Old process: the number of the attempt under way, 0 when none.
    active: AtomicU64,
    outbox: Mutex<Option<mpsc::Sender<ToNew>>>,
    /// Old process: per shard, it holds nothing (it stays up until `committed`, so
    /// that it can take connections back should the attempt fail).
    empty: Box<[AtomicBool]>,
    /// Old process: the new process took everything; the shards may exit.
    committed: AtomicBool,
    /// New process: connections received, per shard, for it to adopt.
    inbox: Box<[Mutex<Vec<Moved>>]>,
    inbox_any: Box<[AtomicBool]>,
    /// Old process: the new process's answers, per shard.
    acks: Box<[Mutex<Vec<Answer>>]>,
    acks_any: Box<[AtomicBool]>,
    /// New process: where the shards answer.
    answer: Mutex<Option<Arc<Channel>>>,
}

impl HandoverState {
    pub(crate) fn new(shards: usize) -> HandoverState {
        HandoverState {
            attempts: AtomicU64::new(0),
            active: AtomicU64::new(0),
            outbox: Mutex::new(None),
            empty: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            committed: AtomicBool::new(false),
            inbox: (0..shards).map(|_| Mutex::new(Vec::new())).collect(),
            inbox_any: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            acks: (0..shards).map(|_| Mutex::new(Vec::new())).collect(),
            acks_any: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            answer: Mutex::new(None),
        }
    }

    /// Old process: whether shard `shard` has answers from the new process.
    pub(crate) fn has_acks(&self, shard: usize) -> bool {
        self.acks_any[shard].load(Ordering::Acquire)
    }

    pub(crate) fn take_acks(&self, shard: usize) -> Vec<Answer> {
        self.acks_any[shard].store(false, Ordering::Release);
        self.acks[shard]
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    fn push_ack(&self, shard: usize, origin: u64, verdict: Verdict) {
        if let Some(acks) = self.acks.get(shard) {
            if let Ok(mut v) = acks.lock() {
                v.push((origin, verdict));
            }
            self.acks_any[shard].store(true, Ordering::Release);
        }
    }

    /// New process: tells the old one whether connection `origin` was taken. A
    /// message of a few bytes on a socket with room for hundreds of kilobytes: it does
    /// not block the shard in practice. Written here, before the shard does any I/O on
    /// the adopted socket, and not from a queue: should this process die, the old one
    /// must know of every connection this one has written to or read from (else it
    /// would take back a connection whose stream this one has already used). An old
    /// process that stops reading could stall the shard: the price of that order.
    pub(crate) fn answer(&self, origin: u64, verdict: Verdict) {
        let channel = self.answer.lock().ok().and_then(|a| a.clone());
        if let Some(channel) = channel
            && let Ok(bytes) = encode(&Message::Ack { origin, verdict })
            && let Err(err) = channel.send(&bytes, &[])
        {
            debug!(error = %err, "handover: the old process is gone; no answer");
        }
    }

    /// The number of the attempt under way (0: none). Every attempt has a number of
    /// its own, so a shard that did not look between the end of one and the start of
    /// the next still sees that the first ended.
    pub(crate) fn attempt(&self) -> u64 {
        self.active.load(Ordering::Acquire)
    }

    /// Old process: shard `shard` holds nothing (or holds something again).
    pub(crate) fn set_empty(&self, shard: usize, empty: bool) {
        self.empty[shard].store(empty, Ordering::Release);
    }

    fn all_empty(&self) -> bool {
        self.empty.iter().all(|e| e.load(Ordering::Acquire))
    }

    /// Old process: the new process took everything; a shard that holds nothing exits.
    pub(crate) fn committed(&self) -> bool {
        self.committed.load(Ordering::Acquire)
    }

    pub(crate) fn outbox(&self) -> Option<mpsc::Sender<ToNew>> {
        self.outbox.lock().ok()?.clone()
    }

    fn begin(&self, outbox: mpsc::Sender<ToNew>) -> u64 {
        if let Ok(mut o) = self.outbox.lock() {
            *o = Some(outbox);
        }
        let attempt = self.attempts.fetch_add(1, Ordering::AcqRel) + 1;
        self.active.store(attempt, Ordering::Release);
        attempt
    }

    fn abort(&self, attempt: u64) {
        if let Ok(mut o) = self.outbox.lock() {
            *o = None;
        }
        let _ = self
            .active
            .compare_exchange(attempt, 0, Ordering::AcqRel, Ordering::Acquire);
    }

    /// New process: whether shard `shard` has connections to adopt.
    pub(crate) fn has_incoming(&self, shard: usize) -> bool {
        self.inbox_any[shard].load(Ordering::Acquire)
    }

    pub(crate) fn take_incoming(&self, shard: usize) -> Vec<Moved> {
        self.inbox_any[shard].store(false, Ordering::Release);
        self.inbox[shard]
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default()
    }

    fn push_incoming(&self, shard: usize, moved: Moved) {
        if let Ok(mut v) = self.inbox[shard].lock() {
            v.push(moved);
        }
        self.inbox_any[shard].store(true, Ordering::Release);
    }
}

/// Wakes every shard (a handover began or ended; a shard also looks every tick).
fn wake_all(shared: &Shared) {
    for shard in 0..shared.event_fds.len() {
        shared.wakeup.notify_from_foreign(shard);
    }
}

fn encode(message: &Message) -> io::Result<Vec<u8>> {
    postcard::to_stdvec(message).map_err(io::Error::other)
}

fn decode(bytes: &[u8]) -> io::Result<Message> {
    postcard::from_bytes(bytes).map_err(|err| io::Error::new(io::ErrorKind::InvalidData, err))
}

/// The old process's side: listens on `path` and hands everything over to the first
/// process that asks, then to the next if that one goes away midway.
pub(crate) struct Giver {
    pub path: PathBuf,
    /// `None` until bound ([`Giver::run`] binds it when it was not bound at once).
    pub socket: Option<OwnedFd>,
    /// Copies of every shard's listening sockets, with what they are.
    pub listeners: Vec<(ListenerInfo, TcpListener)>,
}

impl Giver {
    /// Binds the handover socket now (before the shards start, so that a taker can
    /// come as soon as the process runs), or, with `now` false, in [`Giver::run`]: a
    /// process that takes over on the same path binds it once the old process is
    /// done, since the old one still listens there for another taker until then.
    pub(crate) fn bind(
        path: &Path,
        listeners: Vec<(ListenerInfo, TcpListener)>,
        now: bool,
    ) -> io::Result<Giver> {
        Ok(Giver {
            path: path.to_owned(),
            socket: if now {
                Some(socket::listen(path)?)
            } else {
                None
            },
            listeners,
        })
    }

    /// The handover thread: serves takers until one took everything.
    pub(crate) fn run(mut self, shared: Arc<Shared>, app: Arc<App>) {
        let listener = match self.socket.take() {
            Some(s) => s,
            None => match socket::listen(&self.path) {
                Ok(s) => s,
                Err(err) => {
                    warn!(path = %self.path.display(), error = %err, "cannot listen for a handover");
                    return;
                }
            },
        };
        loop {
            let channel = match socket::accept(&listener) {
                Ok(c) => c,
                Err(err) => {
                    warn!(error = %err, "handover socket failed; no handover possible");
                    return;
                }
            };
            let served = self.serve(&channel, &shared, &app);
            // Relaying ends with the attempt, however it ended.
            app.set_relays(None, true);
            match served {
                Ok(true) => break,
                Ok(false) => continue,
                Err(err) => warn!(error = %err, "handover failed"),
            }
        }
    }

    /// One taker. `Ok(true)`: it took everything.
    fn serve(&self, channel: &Channel, shared: &Arc<Shared>, app: &Arc<App>) -> io::Result<bool> {
        let Some((hello, _)) = channel.recv(true)? else {
            return Ok(false);
        };
        let same_node = match decode(&hello)? {
            Message::Hello { format, node } if format == FORMAT => {
                node.is_some() && node == app.node_id()
            }
            Message::Hello { format, .. } => {
                let reason = format!("this process speaks format {FORMAT}, not {format}");
                warn!(format, "handover refused: {reason}");
                channel.send(&encode(&Message::Refused { reason })?, &[])?;
                return Ok(false);
            }
            _ => return Err(io::Error::other("expected a hello")),
        };
        let started = Instant::now();
        let infos = self.listeners.iter().map(|(i, _)| i.clone()).collect();
        let fds: Vec<_> = self.listeners.iter().map(|(_, l)| l.as_fd()).collect();
        let listeners = Message::Listeners {
            listeners: infos,
            same_node,
        };
        channel.send(&encode(&listeners)?, &fds)?;
        let (tx, rx) = mpsc::channel::<ToNew>();
        // The answers come on the same socket: a thread of their own reads them.
        let gone = Arc::new(AtomicBool::new(false));
        let reader = {
            let (channel, shared, gone, app) = (
                channel.try_clone()?,
                Arc::clone(shared),
                Arc::clone(&gone),
                Arc::clone(app),
            );
            std::thread::Builder::new()
                .name("kythera-handover-acks".into())
                .spawn(move || read_acks(&channel, &shared, &gone, &app))?
        };
        // From now on the groups' members are split between the two processes: what
        // is published here goes to the new process too, in order with the
        // connections (a frame published before a connection left is not delivered
        // to it there).
        // (A clustered gear's frames reach the other process through Redis, unless
        // both are the same node.)
        app.set_relays(
            Some(&|gear: &str| {
                Arc::new(ToNewRelay {
                    gear: gear.to_owned(),
                    tx: Mutex::new(tx.clone()),
                }) as Arc<dyn RelaySink>
            }),
            same_node,
        );
        let attempt = shared.handover.begin(tx);
        wake_all(shared);
        info!(
            listeners = fds.len(),
            "handover: listeners handed over; moving connections"
        );
        let mut moved = 0u64;
        let mut checked = Instant::now();
        let outcome = loop {
            let next = rx.recv_timeout(Duration::from_millis(20));
            let timed_out = matches!(next, Err(mpsc::RecvTimeoutError::Timeout));
            match next {
                Ok(ToNew::Publish(relayed)) => {
                    let sent = encode(&Message::Publish(relayed))
                        .and_then(|bytes| channel.send(&bytes, &[]));
                    match sent {
                        Err(err) if peer_gone(&err) => break Err(err),
                        Err(err) => {
                            warn!(error = %err, "handover: a published frame could not be relayed")
                        }
                        Ok(()) => {}
                    }
                }
                Ok(ToNew::Conn(m)) => {
                    let origin = m.conn.origin;
                    let sent = encode(&Message::Conn(m.conn))
                        .and_then(|bytes| channel.send(&bytes, &[m.fd.as_fd()]));
                    match sent {
                        Ok(()) => moved += 1,
                        Err(err) if peer_gone(&err) => break Err(err),
                        Err(err) => {
                            // This one did not go (too large, say): its shard keeps it.
                            warn!(error = %err, "handover: a connection could not be sent; kept here");
                            let shard = (origin >> 56) as usize;
                            shared.handover.push_ack(shard, origin, Verdict::Kept);
                            shared.wakeup.notify_from_foreign(shard);
                        }
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break Ok(()),
            }
            // Every 20 ms, however busy the queue is (a gear publishing all the time
            // keeps it from ever timing out).
            if !timed_out && checked.elapsed() < Duration::from_millis(20) {
                continue;
            }
            checked = Instant::now();
            if gone.load(Ordering::Acquire) {
                break Err(io::Error::other("the new process went away"));
            }
            // Every shard holds nothing (a shard says so only once its last connection
            // was answered for): what is queued goes out, then done. Connections cannot
            // be queued any more; frames can, from threads outside the shards, for as
            // long as this takes: a bounded number goes, so that a busy publisher
            // cannot hold the handover open.
            if shared.handover.all_empty() {
                for _ in 0..100_000 {
                    match rx.try_recv() {
                        Ok(ToNew::Publish(relayed)) => {
                            if let Ok(bytes) = encode(&Message::Publish(relayed)) {
                                let _ = channel.send(&bytes, &[]);
                            }
                        }
                        Ok(ToNew::Conn(m)) => {
                            warn!("handover: a connection after the shards were done; dropped");
                            drop(m);
                        }
                        Err(_) => break,
                    }
                }
                break Ok(());
            }
        };
        match outcome {
            Ok(()) => {
                shared.handover.committed.store(true, Ordering::Release);
                wake_all(shared);
                // Before `Done`: the new process binds the same path once it has it,
                // and that socket must not be the one removed.
                let _ = std::fs::remove_file(&self.path);
                let _ = channel.send(&encode(&Message::Done { moved })?, &[]);
                let _ = channel.shutdown();
                let _ = reader.join();
                info!(
                    moved,
                    took_ms = started.elapsed().as_millis() as u64,
                    "handover complete"
                );
                Ok(true)
            }
            Err(err) => {
                // Every answer is in before the shards hear of the abort, so that
                // they take back exactly the connections without one.
                let _ = channel.shutdown();
                let _ = reader.join();
                shared.handover.abort(attempt);
                wake_all(shared);
                warn!(
                    sent = moved,
                    error = %err,
                    "handover aborted: keeping the connections not taken, accepting again"
                );
                Ok(false)
            }
        }
    }
}

/// Whether a send failed because the other process is gone (rather than for this
/// message alone).
fn peer_gone(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EPIPE | libc::ECONNRESET | libc::ENOTCONN | libc::ECONNREFUSED)
    )
}

/// The old process's reader of the new one's answers, until the socket closes.
fn read_acks(channel: &Channel, shared: &Shared, gone: &AtomicBool, app: &App) {
    loop {
        match channel.recv(true) {
            Ok(Some((bytes, _))) => match decode(&bytes) {
                Ok(Message::Ack { origin, verdict }) => {
                    let shard = (origin >> 56) as usize;
                    shared.handover.push_ack(shard, origin, verdict);
                    if shard < shared.event_fds.len() {
                        shared.wakeup.notify_from_foreign(shard);
                    }
                }
                Ok(Message::Publish(relayed)) => relayed.publish_here(app),
                Ok(_) => warn!("handover: unexpected message from the new process"),
                Err(err) => warn!(error = %err, "handover: undecodable answer"),
            },
            Err(err) if Channel::too_large(&err) => {
                warn!("handover: a message from the new process was too large; skipped");
            }
            Ok(None) | Err(_) => {
                gone.store(true, Ordering::Release);
                return;
            }
        }
    }
}

/// The new process's side, connected to the old one.
#[derive(Debug)]
pub(crate) struct Taker {
    channel: Channel,
    started: Instant,
    /// The old process is the same cluster node as this one.
    same_node: bool,
}

impl Taker {
    /// Connects to the old process on `path` and takes its listening sockets.
    /// `node`: this process's cluster node id, if it is in a cluster.
    pub(crate) fn connect(
        path: &Path,
        node: Option<String>,
    ) -> io::Result<(Taker, Vec<(ListenerInfo, TcpListener)>)> {
        let channel = socket::connect(path)?;
        let started = Instant::now();
        channel.send(
            &encode(&Message::Hello {
                format: FORMAT,
                node,
            })?,
            &[],
        )?;
        let Some((bytes, fds)) = channel.recv(true)? else {
            return Err(io::Error::other(
                "the old process closed the handover socket",
            ));
        };
        let (listeners, same_node) = match decode(&bytes)? {
            Message::Listeners {
                listeners,
                same_node,
            } => (listeners, same_node),
            Message::Refused { reason } => {
                return Err(io::Error::other(format!("handover refused: {reason}")));
            }
            _ => return Err(io::Error::other("expected the listeners")),
        };
        if listeners.len() != fds.len() {
            return Err(io::Error::other("listeners and descriptors do not match"));
        }
        let listeners = listeners
            .into_iter()
            .zip(fds)
            .map(|(info, fd)| (info, TcpListener::from(fd)))
            .collect();
        Ok((
            Taker {
                channel,
                started,
                same_node,
            },
            listeners,
        ))
    }

    /// The thread that receives the connections and gives each to a shard in turn.
    /// Returns whether the old process is done or gone (so the handover socket's path
    /// is free for this process to listen on); on any other end the channel is shut
    /// down, so that the old process sees this one go and keeps what it has.
    pub(crate) fn run(self, shared: Arc<Shared>, app: Arc<App>) -> bool {
        let shards = shared.event_fds.len();
        match self.channel.try_clone() {
            Ok(c) => {
                let c = Arc::new(c);
                if let Ok(mut a) = shared.handover.answer.lock() {
                    *a = Some(Arc::clone(&c));
                }
                // The groups' members are split between the two processes until the
                // old one is done: what is published here goes there too.
                app.set_relays(
                    Some(&|gear: &str| {
                        Arc::new(ToOldRelay {
                            gear: gear.to_owned(),
                            channel: Arc::clone(&c),
                        }) as Arc<dyn RelaySink>
                    }),
                    self.same_node,
                );
            }
            Err(err) => warn!(error = %err, "handover: cannot answer the old process"),
        }
        // A test's way to die midway (`tools/tests/handover.rs`).
        let die_after: Option<u64> = std::env::var("KYTHERA_TEST_TAKER_DIES_AFTER")
            .ok()
            .and_then(|v| v.parse().ok());
        let mut taken = 0u64;
        loop {
            let (bytes, mut fds) = match self.channel.recv(true) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    warn!(taken, "handover: the old process went away");
                    self.hang_up(&shared, &app);
                    return true;
                }
                Err(err) if Channel::too_large(&err) => {
                    warn!("handover: a message from the old process was too large; skipped");
                    continue;
                }
                Err(err) => {
                    warn!(taken, error = %err, "handover: receiving failed; giving up");
                    self.hang_up(&shared, &app);
                    return false;
                }
            };
            match decode(&bytes) {
                Ok(Message::Conn(conn)) => {
                    let Some(fd) = fds.pop() else {
                        warn!("handover: a connection came without its socket");
                        continue;
                    };
                    let shard = (taken % shards as u64) as usize;
                    shared.handover.push_incoming(shard, Moved { fd, conn });
                    shared.wakeup.notify_from_foreign(shard);
                    taken += 1;
                    if die_after.is_some_and(|n| taken >= n) {
                        warn!(taken, "KYTHERA_TEST_TAKER_DIES_AFTER: exiting");
                        std::process::exit(70);
                    }
                }
                Ok(Message::Done { moved }) => {
                    info!(
                        taken,
                        moved,
                        took_ms = self.started.elapsed().as_millis() as u64,
                        "handover complete: the old process exits"
                    );
                    self.hang_up(&shared, &app);
                    return true;
                }
                Ok(Message::Publish(relayed)) => relayed.publish_here(&app),
                Ok(_) => warn!("handover: unexpected message"),
                Err(err) => warn!(error = %err, "handover: undecodable message"),
            }
        }
    }

    /// No more answers; the old process sees the channel close.
    fn hang_up(&self, shared: &Shared, app: &App) {
        app.set_relays(None, true);
        if let Ok(mut a) = shared.handover.answer.lock() {
            *a = None;
        }
        let _ = self.channel.shutdown();
    }
}
