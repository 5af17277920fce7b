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
//! [`handler_api::Context`] ([`RegistryOps`]); once per loop turn the engine takes the
//! inbound messages ([`ShardRegistry::take_inbound`]), delivers them, and wakes the
//! shards it pushed to ([`ShardRegistry::take_wakeups`], [`Wakeup::notify`]).
//! Everything here is sans-I/O: tests drive several shards from one thread.
//!
//! **At the bound**: when a queue towards a shard is full, the message is dropped and
//! counted (`dropped_full`); `send_message` answers [`RegistryError::Full`], a
//! [`ConnHandle`] answers [`DeliverError::Full`] with the message, and `publish` /
//! `publish_frame` count only the members on shards whose queue took the message. No
//! shard ever waits for another.
#![deny(missing_docs)]

mod groups;
mod names;
mod shard;
mod wake;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;
use handler_api::{CloseFrame, ConnHandle, ConnId, Deliver, DeliverError, Frame, NameTable};
pub use handler_api::{RegistryError, RegistryOps};

pub use groups::Group;
use groups::Groups;
pub use names::{MAX_NAME_BYTES, Names};
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
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            queue_capacity: 8192,
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
}

impl<M: Clone + Send + 'static> Shared<M> {
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

    /// The gear's names, for [`handler_api::Conn::with_names`].
    pub fn names(&self) -> Arc<dyn NameTable> {
        Arc::new(NamesRef(Arc::clone(&self.shared)))
    }

    /// The figures, summed over shards.
    pub fn stats(&self) -> RegistryStats {
        self.handle().stats()
    }
}

/// The names of a registry, shared.
struct NamesRef<M>(Arc<Shared<M>>);

impl<M: Send + 'static> NameTable for NamesRef<M> {
    fn register(&self, conn: ConnId, name: &str) -> Result<(), RegistryError> {
        self.0.names.register(conn, name)
    }
    fn unregister(&self, conn: ConnId, name: &str) -> Result<(), RegistryError> {
        self.0.names.unregister(conn, name)
    }
    fn lookup(&self, name: &str) -> Option<ConnId> {
        self.0.names.lookup(name)
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
        let Some(target) = self.shared.names.lookup(name) else {
            return Ok(false);
        };
        self.shared
            .push_foreign(usize::from(target.shard()), Envelope::To(target, msg))
            .map(|()| true)
            .map_err(|_| RegistryError::Full)
    }

    /// Queues `msg` for every member of `group`; returns for how many.
    pub fn publish(&self, group: &str, msg: M) -> Result<usize, RegistryError> {
        let Some(g) = self.shared.groups.get(group) else {
            return Ok(0);
        };
        Ok(to_each_shard(&g, msg, |shard, m| {
            self.shared
                .push_foreign(shard, Envelope::Publish(Arc::clone(&g), m))
                .is_ok()
        }))
    }

    /// Sends `frame` to every member of `group`, encoded once, without calling their
    /// handlers; returns for how many.
    pub fn publish_frame(&self, group: &str, frame: Frame) -> Result<usize, RegistryError> {
        let Some(g) = self.shared.groups.get(group) else {
            return Ok(0);
        };
        let frame = Arc::new(self.shared.prepare(frame));
        Ok(to_each_shard(&g, frame, |shard, f| {
            self.shared
                .push_foreign(shard, Envelope::Frame(Arc::clone(&g), f))
                .is_ok()
        }))
    }

    /// How many members `group` has.
    pub fn count(&self, group: &str) -> usize {
        self.shared.groups.get(group).map_or(0, |g| g.total())
    }

    /// Who holds `name`.
    pub fn lookup(&self, name: &str) -> Option<ConnId> {
        self.shared.names.lookup(name)
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
