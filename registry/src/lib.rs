//! kythera's registry: unique names and groups per gear, sharded across cores.
//!
//! One [`Registry`] per gear (a gear can never reach another gear's names or groups).
//! Its parts:
//!
//! - **Names** ([`Names`]): a concurrent map from name to connection id, so that
//!   `register` answers at once from any shard and `send_message` finds the owning
//!   shard (it is in the id) without a global lock.
//! - **Groups**: each shard owns its own members of each group; a shared [`Group`] per
//!   name holds per-shard member counts, which tell a publisher which shards to send
//!   one message to (never one per member) and how many members that reaches.
//! - **Queues**: an N x N mesh of bounded SPSC queues (`rtrb`) between shards, one
//!   bounded MPSC queue per shard for threads outside the shards (`crossbeam`
//!   `ArrayQueue`), and a bounded local queue per shard for messages to itself. Order
//!   is kept per (sender, receiver) pair, since one sender always uses one queue.
//! - **Wake-ups** ([`Wakeup`]): a shard is woken only when it may be asleep.
//!
//! The engine drives each shard's [`ShardRegistry`]: gear callbacks reach it through
//! [`kythera_handler_api::Context`] ([`RegistryOps`]); once per loop turn the engine takes the
//! inbound messages ([`ShardRegistry::take_inbound`]), delivers them, and wakes the
//! shards it pushed to ([`ShardRegistry::take_wakeups`], [`Wakeup::notify`]).
//! Everything here is sans-I/O: tests drive several shards from one thread.
//!
//! **At the bound**: when a queue towards a shard is full, the message is dropped and
//! counted (`dropped_full`); `send_message` answers [`RegistryError::Full`], a
//! [`ConnHandle`] answers [`DeliverError::Full`] with the message, and `publish` /
//! `publish_frame` count only the members on shards whose queue took the message. No
//! shard ever waits for another.
//!
//! # Two shards driven by hand
//!
//! What the engine does every loop turn, on one thread: a connection on shard 1 takes a
//! name, shard 0 sends to that name, and the message is in shard 1's inbound queue once
//! shard 0 has ended its turn.
//!
//! ```
//! use std::sync::Arc;
//! use kythera_handler_api::{ConnId, RegistryOps};
//! use kythera_registry::{Inbound, Registry, RegistryConfig, Wakeup};
//!
//! let wakeup = Arc::new(Wakeup::new(2));
//! // The engine passes its frame encoder (used by `publish_frame`); none is needed here.
//! let registry: Registry<String> = Registry::new(RegistryConfig::default(), wakeup, |_, _| {});
//! let (mut shard0, mut shard1) = (registry.shard(0).unwrap(), registry.shard(1).unwrap());
//!
//! let alice = ConnId::new(1, 7); // connection 7 of shard 1
//! shard1.register(alice, "alice")?;
//! assert_eq!(shard0.send_message("alice", "hi".to_string()), Ok(true));
//!
//! // The end of shard 0's turn: its staged messages go out, and it is told whom to wake.
//! let mut woken = Vec::new();
//! shard0.take_wakeups(|shard| woken.push(shard));
//! assert_eq!(woken, [1]);
//!
//! let mut inbound = Vec::new();
//! shard1.take_inbound(usize::MAX, &mut inbound);
//! assert!(matches!(&inbound[..], [Inbound::Message(to, text)] if *to == alice && text == "hi"));
//! # Ok::<(), kythera_handler_api::RegistryError>(())
//! ```
#![deny(missing_docs)]

pub mod cluster;
mod groups;
mod names;
mod relay;
mod shard;
mod wake;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use crossbeam_queue::{ArrayQueue, SegQueue};
use crossbeam_utils::CachePadded;
use kythera_handler_api::{
    CloseFrame, ConnHandle, ConnId, Deliver, DeliverError, Frame, NameTable,
};

use cluster::{
    Backplane, ClusterGear, ClusterLink, Control, DropCause, Incoming, MessageCodec, Outgoing,
    RemoteConn, Replica,
};
pub use kythera_handler_api::{RegistryError, RegistryOps};

pub use groups::Group;
use groups::Groups;
pub use names::{MAX_NAME_BYTES, Names};
use relay::Relay;
pub use relay::RelaySink;
pub use shard::{Inbound, ShardRegistry};
pub use wake::{ForeignWaker, Wakeup};

/// Encodes a data frame as the engine writes it (server to client, unmasked).
pub type FrameEncoder = fn(&Frame, &mut Vec<u8>);

/// A data frame of `publish_frame`, shared by every member: encoded once as it goes
/// to connections without compression, and compressed once for the members whose
/// compressed form of it is the same (permessage-deflate without context takeover, one
/// window size and level: the first such member's parameters are cached, members with
/// other parameters compress for themselves).
#[derive(Debug)]
pub struct SharedFrame {
    /// The frame on the wire, uncompressed.
    pub encoded: Bytes,
    /// The frame itself (text or binary), for members that compress.
    pub frame: Frame,
    compressed: OnceLock<((u8, u8), Bytes)>,
}

impl SharedFrame {
    /// The compressed frame for parameters `key`: made by `make` the first time it is
    /// asked for; `None` if it was made for other parameters already.
    pub fn compressed(&self, key: (u8, u8), make: impl FnOnce() -> Bytes) -> Option<&Bytes> {
        let (made_for, bytes) = self.compressed.get_or_init(|| (key, make()));
        (*made_for == key).then_some(bytes)
    }

    /// The frame's payload.
    pub fn payload(&self) -> &[u8] {
        match &self.frame {
            Frame::Text(t) => t.as_bytes(),
            Frame::Binary(b) => b,
            Frame::Close(_) => &[],
        }
    }
}

/// The size of the queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryConfig {
    /// Messages each queue holds: each shard-to-shard queue, each shard's queue to
    /// itself, and each shard's queue from foreign threads. Default 8,192.
    pub queue_capacity: usize,
    /// Messages a clustered gear's outbox towards the backplane holds (messages for
    /// other nodes wait there until the backplane's thread sends them to Redis in one
    /// batch). Default 65,536: at 100,000 messages a second, well over half a second
    /// of Redis being slow before anything is dropped.
    pub cluster_outbox_capacity: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            queue_capacity: 8192,
            cluster_outbox_capacity: 65_536,
        }
    }
}

/// What travels in the queues.
#[derive(Debug)]
pub(crate) enum Envelope<M> {
    /// To one connection's `handle_server_message`.
    To(ConnId, M),
    /// To every member of the group on the receiving shard.
    Publish(Arc<Group>, M),
    /// A frame for every member of the group on the receiving shard.
    Frame(Arc<Group>, Arc<PublishedFrame>),
}

/// A message for another node, as the gear's code queued it (serialized later, on the
/// backplane's thread).
#[derive(Debug)]
pub(crate) enum Out<M> {
    To(RemoteConn, M),
    Publish(Box<str>, M),
    Frame(Box<str>, Frame),
}

/// The outcome of one claim of a name in Redis, for the shard that owns the claimant.
#[derive(Debug)]
pub(crate) struct Decision {
    conn: ConnId,
    name: Box<str>,
    won: bool,
}

/// A gear's side of the cluster (see [`cluster`]).
pub(crate) struct ClusterPart<M> {
    backplane: Arc<dyn Backplane>,
    link: Arc<ClusterLink>,
    key: Box<str>,
    codec: MessageCodec<M>,
    replica: Replica,
    outbox: ArrayQueue<Out<M>>,
    control: SegQueue<Control>,
}

impl<M> ClusterPart<M> {
    /// Queues a claim, release or membership change and wakes the backplane.
    pub(crate) fn control(&self, c: Control) {
        self.control.push(c);
        self.backplane.wake();
    }

    /// Queues a message for another node; the caller wakes the backplane.
    pub(crate) fn send(&self, out: Out<M>) -> Result<(), RegistryError> {
        if !self.link.is_connected() {
            self.link.dropped(DropCause::Disconnected, 1);
            return Err(RegistryError::Unreachable);
        }
        self.outbox.push(out).map_err(|_| {
            self.link.dropped(DropCause::OutboxFull, 1);
            RegistryError::Full
        })
    }

    pub(crate) fn wake(&self) {
        self.backplane.wake();
    }
}

/// A frame of `publish_frame`, prepared once for every member.
#[derive(Debug)]
pub(crate) enum PublishedFrame {
    /// A data frame, encoded once.
    Data(Arc<SharedFrame>),
    /// A close: each member's session closes with it (and terminates with `Stop`).
    Close(Option<CloseFrame>),
}

/// A counter written by one thread only (its shard): a relaxed load and store, no
/// locked instruction, on a cache line of its own.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n` (only from the one thread that owns the counter).
    pub fn add(&self, n: u64) {
        self.0
            .store(self.0.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }

    /// The value now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One shard's counters for one gear's registry.
#[derive(Debug, Default)]
pub(crate) struct ShardCounters {
    forwarded: Counter,
    received: Counter,
    dropped_full: Counter,
    dropped_gone: Counter,
}

/// A gear's registry figures, summed over shards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// Messages pushed from one shard to another.
    pub forwarded: u64,
    /// Messages pushed by threads outside the shards.
    pub from_foreign: u64,
    /// Envelopes taken from the queues by their shard.
    pub received: u64,
    /// Messages dropped because a queue was full.
    pub dropped_full: u64,
    /// Messages dropped because their connection had ended when they arrived.
    pub dropped_gone: u64,
    /// Names held.
    pub names: u64,
    /// Groups with members.
    pub groups: u64,
    /// Names held on other nodes, as this node knows them (clustered gears).
    pub remote_names: u64,
    /// Group memberships on other nodes, as this node knows them (clustered gears).
    pub remote_members: u64,
    /// Frames published during a live handover and relayed to the other process.
    pub relayed: u64,
    /// Typed messages published during a live handover (they reach this process's
    /// members only), and frames that could not be relayed (see [`RelaySink`]).
    pub unrelayed: u64,
}

/// What every shard's part of a gear's registry shares.
pub(crate) struct Shared<M> {
    pub(crate) names: Names,
    pub(crate) groups: Groups,
    pub(crate) foreign: Box<[ArrayQueue<Envelope<M>>]>,
    pub(crate) capacity: usize,
    pub(crate) stats: Box<[CachePadded<ShardCounters>]>,
    from_foreign: AtomicU64,
    foreign_dropped: AtomicU64,
    wakeup: Arc<Wakeup>,
    encode: FrameEncoder,
    /// The gear's side of the cluster; `None` for a gear that stays on this node.
    pub(crate) cluster: Option<ClusterPart<M>>,
    /// Per shard: claim decisions coming back from the backplane. Unbounded, because
    /// none may be lost; at most one per name claim.
    pub(crate) decisions: Box<[SegQueue<Decision>]>,
    /// Publishes relayed to another process during a live handover.
    pub(crate) relay: Relay,
}

impl<M: Clone + Send + 'static> Shared<M> {
    /// Registers `name` for `conn`: refused if another node holds it as far as this
    /// node knows (unless `moved`: the name comes with a connection handed over from
    /// another process, which held it until now); a new claim of a clustered gear
    /// goes to Redis.
    pub(crate) fn register(
        &self,
        conn: ConnId,
        name: &str,
        moved: bool,
    ) -> Result<bool, RegistryError> {
        if !moved
            && let Some(c) = &self.cluster
            && c.replica.holder(name).is_some()
        {
            names::check_name(name)?;
            return Err(RegistryError::Taken);
        }
        let fresh = self.names.claim(conn, name)?;
        if fresh && let Some(c) = &self.cluster {
            c.control(Control::Claim {
                name: name.into(),
                conn,
                moved,
            });
        }
        Ok(fresh)
    }

    /// Gives `name` up for `conn` (in Redis too for a clustered gear).
    pub(crate) fn unregister(&self, conn: ConnId, name: &str) -> Result<(), RegistryError> {
        self.names.unregister(conn, name)?;
        if let Some(c) = &self.cluster {
            c.control(Control::Release {
                name: name.into(),
                conn,
            });
        }
        Ok(())
    }

    /// Who holds `name`: a connection here, or the alias of one on another node.
    pub(crate) fn lookup(&self, name: &str) -> Option<ConnId> {
        self.names
            .lookup(name)
            .or_else(|| self.cluster.as_ref()?.replica.holder(name))
    }

    /// A count that moves whenever a name is given up here or changes holder on
    /// another node (see [`Names`]).
    pub(crate) fn released(&self) -> u64 {
        self.names.released() + self.cluster.as_ref().map_or(0, |c| c.replica.changed())
    }

    /// Members of `group` here and, for a clustered gear, on other nodes.
    pub(crate) fn count(&self, group: &str) -> usize {
        self.groups.get(group).map_or(0, |g| g.total())
            + self.cluster.as_ref().map_or(0, |c| c.replica.count(group))
    }

    /// A member of `group` joined or left on this node: tells the backplane.
    pub(crate) fn membership_changed(&self, group: &str) {
        if let Some(c) = &self.cluster {
            c.control(Control::Group(group.into()));
        }
    }

    /// Queues `msg` for the members of `group` on other nodes, if any are known; returns
    /// how many. The caller wakes the backplane.
    pub(crate) fn publish_remote(&self, group: &str, msg: impl FnOnce() -> Out<M>) -> usize {
        let Some(c) = &self.cluster else {
            return 0;
        };
        let remote = c.replica.count(group);
        if remote == 0 {
            return 0;
        }
        match c.send(msg()) {
            Ok(()) => remote,
            Err(_) => 0,
        }
    }

    /// Publishes `frame` to this process's members of `group` only, from outside the
    /// shards (a frame from another node, or relayed by another process in a live
    /// handover); encoded once for all of them.
    pub(crate) fn publish_frame_here(&self, group: &str, frame: Frame) -> usize {
        let Some(g) = self.groups.get(group) else {
            return 0;
        };
        let frame = Arc::new(self.prepare(frame));
        to_each_shard(&g, frame, |shard, f| {
            self.push_foreign(shard, Envelope::Frame(Arc::clone(&g), f))
                .is_ok()
        })
    }

    pub(crate) fn prepare(&self, frame: Frame) -> PublishedFrame {
        match frame {
            Frame::Close(close) => PublishedFrame::Close(close),
            data => {
                let mut buf = Vec::new();
                (self.encode)(&data, &mut buf);
                PublishedFrame::Data(Arc::new(SharedFrame {
                    encoded: Bytes::from(buf),
                    frame: data,
                    compressed: OnceLock::new(),
                }))
            }
        }
    }

    /// Pushes from a foreign thread towards `shard` and wakes it if needed.
    fn push_foreign(&self, shard: usize, env: Envelope<M>) -> Result<(), Envelope<M>> {
        match self.foreign[shard].push(env) {
            Ok(()) => {
                self.from_foreign.fetch_add(1, Ordering::Relaxed);
                self.wakeup.notify_from_foreign(shard);
                Ok(())
            }
            Err(env) => {
                self.foreign_dropped.fetch_add(1, Ordering::Relaxed);
                Err(env)
            }
        }
    }

    pub(crate) fn deliverer(self: &Arc<Self>) -> Arc<dyn Deliver<M>> {
        Arc::clone(self) as Arc<dyn Deliver<M>>
    }
}

impl<M: Clone + Send + 'static> Deliver<M> for Shared<M> {
    fn deliver(&self, conn: ConnId, msg: M) -> Result<(), DeliverError<M>> {
        if conn.is_remote() {
            let Some(c) = &self.cluster else {
                return Err(DeliverError::Closed(msg));
            };
            let Some(target) = c.replica.target(conn) else {
                return Err(DeliverError::Closed(msg));
            };
            if !c.link.is_connected() {
                c.link.dropped(DropCause::Disconnected, 1);
                return Err(DeliverError::Closed(msg));
            }
            return match c.outbox.push(Out::To(target, msg)) {
                Ok(()) => {
                    c.wake();
                    Ok(())
                }
                Err(Out::To(_, msg)) => {
                    c.link.dropped(DropCause::OutboxFull, 1);
                    Err(DeliverError::Full(msg))
                }
                Err(_) => unreachable!("pushed a To"),
            };
        }
        let shard = usize::from(conn.shard());
        if shard >= self.foreign.len() {
            return Err(DeliverError::Closed(msg));
        }
        self.push_foreign(shard, Envelope::To(conn, msg))
            .map_err(|env| match env {
                Envelope::To(_, msg) => DeliverError::Full(msg),
                _ => unreachable!("pushed a To envelope"),
            })
    }
}

/// Where the handles of one connection deliver: the registry plus whether the
/// connection is still open (one allocation per connection that takes a handle).
pub(crate) struct ConnTarget<M> {
    shared: Arc<Shared<M>>,
    open: std::sync::atomic::AtomicBool,
}

impl<M> ConnTarget<M> {
    pub(crate) fn new(shared: Arc<Shared<M>>) -> Self {
        ConnTarget {
            shared,
            open: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// The connection ended: later deliveries answer `Closed`. (One that raced with the
    /// end is dropped at the shard and counted as `dropped_gone`.)
    pub(crate) fn close(&self) {
        self.open.store(false, Ordering::Release);
    }
}

impl<M: Clone + Send + 'static> Deliver<M> for ConnTarget<M> {
    fn deliver(&self, conn: ConnId, msg: M) -> Result<(), DeliverError<M>> {
        if !self.open.load(Ordering::Acquire) {
            return Err(DeliverError::Closed(msg));
        }
        self.shared.deliver(conn, msg)
    }
}

/// Hands one copy of `msg` to `push` for each shard with members of `group` (clones
/// for all but the last, which gets the original): one message per shard, never one
/// per member. Returns the members on the shards whose queue took it.
pub(crate) fn to_each_shard<T: Clone>(
    group: &Group,
    msg: T,
    mut push: impl FnMut(usize, T) -> bool,
) -> usize {
    let Some(last) = (0..group.shards()).rev().find(|&s| group.count_on(s) > 0) else {
        return 0;
    };
    let mut queued = 0;
    let mut msg = Some(msg);
    for shard in 0..=last {
        let n = group.count_on(shard);
        if n == 0 && shard != last {
            continue;
        }
        let copy = if shard == last {
            msg.take()
        } else {
            msg.clone()
        };
        if copy.is_some_and(|m| push(shard, m)) {
            queued += n;
        }
    }
    queued
}

type Endpoints<M> = (
    Vec<Option<rtrb::Producer<Envelope<M>>>>,
    Vec<Option<rtrb::Consumer<Envelope<M>>>>,
);

/// One gear's registry across all shards.
pub struct Registry<M> {
    shared: Arc<Shared<M>>,
    endpoints: Mutex<Vec<Option<Endpoints<M>>>>,
}

impl<M> std::fmt::Debug for Registry<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("shards", &self.shared.foreign.len())
            .field("queue_capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

impl<M: Clone + Send + 'static> Registry<M> {
    /// A registry for as many shards as `wakeup` has, with the queues of `config`;
    /// `encode` writes `publish_frame`'s frames as they go on the wire.
    pub fn new(config: RegistryConfig, wakeup: Arc<Wakeup>, encode: FrameEncoder) -> Self {
        Self::build(config, wakeup, encode, None)
    }

    /// A registry whose names, groups and messages span every node that mounts the gear
    /// on the same `key` (its pattern), through `backplane`; `codec` carries the gear's
    /// server messages between processes. Attaches itself to the backplane.
    pub fn clustered(
        config: RegistryConfig,
        wakeup: Arc<Wakeup>,
        encode: FrameEncoder,
        backplane: Arc<dyn Backplane>,
        key: &str,
        codec: MessageCodec<M>,
    ) -> Self {
        let part = ClusterPart {
            link: Arc::clone(backplane.link()),
            backplane: Arc::clone(&backplane),
            key: key.into(),
            codec,
            replica: Replica::new(),
            outbox: ArrayQueue::new(config.cluster_outbox_capacity.max(1)),
            control: SegQueue::new(),
        };
        let registry = Self::build(config, wakeup, encode, Some(part));
        backplane.attach(Arc::new(GearLink(Arc::clone(&registry.shared))));
        registry
    }

    fn build(
        config: RegistryConfig,
        wakeup: Arc<Wakeup>,
        encode: FrameEncoder,
        cluster: Option<ClusterPart<M>>,
    ) -> Self {
        let shards = wakeup.shards();
        let capacity = config.queue_capacity.max(1);
        let mut producers: Vec<Vec<Option<rtrb::Producer<Envelope<M>>>>> = (0..shards)
            .map(|_| (0..shards).map(|_| None).collect())
            .collect();
        let mut consumers: Vec<Vec<Option<rtrb::Consumer<Envelope<M>>>>> = (0..shards)
            .map(|_| (0..shards).map(|_| None).collect())
            .collect();
        for from in 0..shards {
            for to in 0..shards {
                if from != to {
                    let (p, c) = rtrb::RingBuffer::new(capacity);
                    producers[from][to] = Some(p);
                    consumers[to][from] = Some(c);
                }
            }
        }
        let endpoints = producers
            .into_iter()
            .zip(consumers)
            .map(Some)
            .collect::<Vec<_>>();
        Registry {
            shared: Arc::new(Shared {
                names: Names::new(),
                groups: Groups::new(shards),
                foreign: (0..shards).map(|_| ArrayQueue::new(capacity)).collect(),
                capacity,
                stats: (0..shards).map(|_| CachePadded::default()).collect(),
                from_foreign: AtomicU64::new(0),
                foreign_dropped: AtomicU64::new(0),
                wakeup,
                encode,
                cluster,
                decisions: (0..shards).map(|_| SegQueue::new()).collect(),
                relay: Relay::default(),
            }),
            endpoints: Mutex::new(endpoints),
        }
    }

    /// Shard `index`'s part, to be owned by that shard's thread. `None` if it was
    /// taken already or `index` is out of range.
    pub fn shard(&self, index: usize) -> Option<ShardRegistry<M>> {
        let mut endpoints = self.endpoints.lock().ok()?;
        let (to, from) = endpoints.get_mut(index)?.take()?;
        Some(ShardRegistry::new(
            index,
            Arc::clone(&self.shared),
            to,
            from,
        ))
    }

    /// A handle for threads outside the shards.
    pub fn handle(&self) -> RegistryHandle<M> {
        RegistryHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The gear's names, for [`kythera_handler_api::Conn::with_names`].
    pub fn names(&self) -> Arc<dyn NameTable> {
        Arc::new(NamesRef(Arc::clone(&self.shared)))
    }

    /// Hands every frame published from now on to `sink` as well (`None`: stops), for a
    /// live handover (see [`RelaySink`]).
    pub fn set_relay(&self, sink: Option<Arc<dyn RelaySink>>) {
        self.shared.relay.set(sink);
    }

    /// Publishes a frame relayed from another process to this process's members of
    /// `group` only (it is not relayed back); returns for how many shards' members it
    /// was queued.
    pub fn publish_relayed(&self, group: &str, frame: Frame) -> usize {
        self.shared.publish_frame_here(group, frame)
    }

    /// The figures, summed over shards.
    pub fn stats(&self) -> RegistryStats {
        self.handle().stats()
    }
}

/// The names of a registry, shared.
struct NamesRef<M>(Arc<Shared<M>>);

impl<M: Clone + Send + 'static> NameTable for NamesRef<M> {
    fn register(&self, conn: ConnId, name: &str) -> Result<(), RegistryError> {
        self.0.register(conn, name, false).map(|_| ())
    }
    fn unregister(&self, conn: ConnId, name: &str) -> Result<(), RegistryError> {
        self.0.unregister(conn, name)
    }
    fn lookup(&self, name: &str) -> Option<ConnId> {
        self.0.lookup(name)
    }
}

/// A clustered gear's registry as its backplane drives it.
struct GearLink<M>(Arc<Shared<M>>);

impl<M: Clone + Send + 'static> GearLink<M> {
    fn part(&self) -> &ClusterPart<M> {
        self.0
            .cluster
            .as_ref()
            .expect("a GearLink is made for clustered registries only")
    }
}

impl<M: Clone + Send + 'static> ClusterGear for GearLink<M> {
    fn key(&self) -> &str {
        &self.part().key
    }

    fn replica(&self) -> &Replica {
        &self.part().replica
    }

    fn take_control(&self, out: &mut Vec<Control>) {
        while let Some(c) = self.part().control.pop() {
            out.push(c);
        }
    }

    fn has_outgoing(&self) -> bool {
        !self.part().outbox.is_empty()
    }

    fn take_outgoing(&self, max: usize, out: &mut dyn FnMut(Outgoing<'_>)) -> usize {
        let part = self.part();
        let mut buf = Vec::new();
        let mut taken = 0;
        while taken < max {
            let Some(item) = part.outbox.pop() else {
                break;
            };
            taken += 1;
            buf.clear();
            match &item {
                Out::To(target, msg) => {
                    if (part.codec.encode)(msg, &mut buf) {
                        out(Outgoing::To {
                            node: target.node,
                            conn: target.conn,
                            msg: &buf,
                        });
                    } else {
                        part.link.dropped(DropCause::Undecodable, 1);
                    }
                }
                Out::Publish(group, msg) => {
                    if (part.codec.encode)(msg, &mut buf) {
                        out(Outgoing::Publish { group, msg: &buf });
                    } else {
                        part.link.dropped(DropCause::Undecodable, 1);
                    }
                }
                Out::Frame(group, frame) => out(Outgoing::Frame { group, frame }),
            }
        }
        taken
    }

    fn deliver(&self, item: Incoming<'_>) -> Result<usize, DropCause> {
        let shared = &self.0;
        let part = self.part();
        match item {
            Incoming::To { conn, msg } => {
                let conn = ConnId::new((conn >> 56) as u8, conn);
                let shard = usize::from(conn.shard());
                if shard >= shared.foreign.len() {
                    return Err(DropCause::Unknown);
                }
                let msg = (part.codec.decode)(msg).ok_or(DropCause::Undecodable)?;
                shared
                    .push_foreign(shard, Envelope::To(conn, msg))
                    .map(|()| 1)
                    .map_err(|_| DropCause::InboundFull)
            }
            Incoming::Publish { group, msg } => {
                let Some(g) = shared.groups.get(group) else {
                    return Ok(0);
                };
                let msg = (part.codec.decode)(msg).ok_or(DropCause::Undecodable)?;
                Ok(to_each_shard(&g, msg, |shard, m| {
                    shared
                        .push_foreign(shard, Envelope::Publish(Arc::clone(&g), m))
                        .is_ok()
                }))
            }
            Incoming::Frame { group, frame } => Ok(shared.publish_frame_here(group, frame)),
        }
    }

    fn claim_decided(&self, name: &str, conn: ConnId, won: bool) {
        let shared = &self.0;
        if !won && shared.names.unregister(conn, name).is_ok() {
            self.part().link.conflict();
        }
        let shard = usize::from(conn.shard());
        let Some(queue) = shared.decisions.get(shard) else {
            return;
        };
        queue.push(Decision {
            conn,
            name: name.into(),
            won,
        });
        shared.wakeup.notify_from_foreign(shard);
    }

    fn local_names(&self, out: &mut Vec<(Box<str>, ConnId)>) {
        self.0
            .names
            .each(|name, conn| out.push((name.into(), conn)));
    }

    fn local_count(&self, group: &str) -> usize {
        self.0.groups.get(group).map_or(0, |g| g.total())
    }

    fn local_groups(&self, out: &mut Vec<(Box<str>, usize)>) {
        self.0.groups.each(|g| {
            let n = g.total();
            if n > 0 {
                out.push((g.name.clone(), n));
            }
        });
    }
}

/// A gear's registry as threads outside the shards reach it (a tokio task that got a
/// database notification, say): `Send + Sync + Clone`.
///
/// It sends, publishes, counts and looks up. Registering names and joining groups are
/// things a connection does for itself, from its callbacks: to make a connection join a
/// group from outside, send it a server message that asks it to.
pub struct RegistryHandle<M> {
    shared: Arc<Shared<M>>,
}

impl<M> Clone for RegistryHandle<M> {
    fn clone(&self) -> Self {
        RegistryHandle {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<M> std::fmt::Debug for RegistryHandle<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryHandle").finish_non_exhaustive()
    }
}

impl<M: Clone + Send + 'static> RegistryHandle<M> {
    /// Queues `msg` for the holder of `name`: `Ok(true)` if queued, `Ok(false)` if
    /// nobody holds it, [`RegistryError::Full`] if the queue to its shard is full.
    pub fn send_message(&self, name: &str, msg: M) -> Result<bool, RegistryError> {
        let Some(target) = self.shared.lookup(name) else {
            return Ok(false);
        };
        if target.is_remote() {
            return self.send_remote(target, msg);
        }
        self.shared
            .push_foreign(usize::from(target.shard()), Envelope::To(target, msg))
            .map(|()| true)
            .map_err(|_| RegistryError::Full)
    }

    fn send_remote(&self, alias: ConnId, msg: M) -> Result<bool, RegistryError> {
        let Some(c) = &self.shared.cluster else {
            return Ok(false);
        };
        let Some(target) = c.replica.target(alias) else {
            return Ok(false);
        };
        c.send(Out::To(target, msg))?;
        c.wake();
        Ok(true)
    }

    /// Queues `msg` for every member of `group`, on every node for a clustered gear;
    /// returns for how many (members on other nodes as this node knows them).
    pub fn publish(&self, group: &str, msg: M) -> Result<usize, RegistryError> {
        let remote = self
            .shared
            .publish_remote(group, || Out::Publish(group.into(), msg.clone()));
        self.shared.relay.message();
        if remote > 0 {
            self.wake_backplane();
        }
        let Some(g) = self.shared.groups.get(group) else {
            return Ok(remote);
        };
        Ok(remote
            + to_each_shard(&g, msg, |shard, m| {
                self.shared
                    .push_foreign(shard, Envelope::Publish(Arc::clone(&g), m))
                    .is_ok()
            }))
    }

    /// Sends `frame` to every member of `group`, encoded once per node, without calling
    /// their handlers; returns for how many.
    pub fn publish_frame(&self, group: &str, frame: Frame) -> Result<usize, RegistryError> {
        let remote = self
            .shared
            .publish_remote(group, || Out::Frame(group.into(), frame.clone()));
        self.shared.relay.frame(group, &frame);
        if remote > 0 {
            self.wake_backplane();
        }
        let Some(g) = self.shared.groups.get(group) else {
            return Ok(remote);
        };
        let frame = Arc::new(self.shared.prepare(frame));
        Ok(remote
            + to_each_shard(&g, frame, |shard, f| {
                self.shared
                    .push_foreign(shard, Envelope::Frame(Arc::clone(&g), f))
                    .is_ok()
            }))
    }

    fn wake_backplane(&self) {
        if let Some(c) = &self.shared.cluster {
            c.wake();
        }
    }

    /// How many members `group` has (on every node, for a clustered gear, as this node
    /// knows them).
    pub fn count(&self, group: &str) -> usize {
        self.shared.count(group)
    }

    /// Who holds `name` (an alias for a connection on another node: see
    /// [`ConnId::REMOTE_SHARD`]).
    pub fn lookup(&self, name: &str) -> Option<ConnId> {
        self.shared.lookup(name)
    }

    /// A handle that delivers to `conn`.
    pub fn conn(&self, conn: ConnId) -> ConnHandle<M> {
        ConnHandle::new(conn, self.shared.deliverer())
    }

    /// The figures, summed over shards.
    pub fn stats(&self) -> RegistryStats {
        let s = &self.shared;
        let mut out = RegistryStats {
            from_foreign: s.from_foreign.load(Ordering::Relaxed),
            dropped_full: s.foreign_dropped.load(Ordering::Relaxed),
            names: s.names.len() as u64,
            groups: s.groups.len() as u64,
            remote_names: s.cluster.as_ref().map_or(0, |c| c.replica.names_len()) as u64,
            remote_members: s.cluster.as_ref().map_or(0, |c| c.replica.members_len()) as u64,
            relayed: s.relay.relayed.load(Ordering::Relaxed),
            unrelayed: s.relay.unrelayed.load(Ordering::Relaxed),
            ..RegistryStats::default()
        };
        for c in s.stats.iter() {
            out.forwarded += c.forwarded.get();
            out.received += c.received.get();
            out.dropped_full += c.dropped_full.get();
            out.dropped_gone += c.dropped_gone.get();
        }
        out
    }
}

#[cfg(test)]
mod tests;
