//! The registry across several nodes: what a gear's registry shares with a
//! [`Backplane`] (the `cluster` crate implements one over Redis).
//!
//! # The split
//!
//! Everything a shard reads to answer a gear at once lives here, in memory, and is kept
//! current by the backplane's own thread; shards never wait on the network:
//!
//! - a [`Replica`] per gear: the names other nodes hold (with a local alias
//!   [`ConnId`] per remote connection, see [`ConnId::REMOTE_SHARD`]) and how many
//!   members other nodes have in each group;
//! - an outbox per gear: server messages and `publish_frame` frames bound for other
//!   nodes, typed (the backplane serializes them on its thread through the gear's
//!   [`MessageCodec`]), bounded (full: dropped and counted);
//! - a control queue per gear: name claims and releases and group membership changes,
//!   unbounded because none of them may be lost (their number is bounded by what the
//!   node's connections hold);
//! - per shard, a queue of claim decisions coming back ([`crate::Inbound::NameLost`],
//!   [`crate::Inbound::NamesDecided`]).
//!
//! The backplane drives a gear through [`ClusterGear`]: it takes the outbox and the
//! control queue, hands in what other nodes sent ([`Incoming`]), keeps the replica, and
//! reports each claim's outcome.
//!
//! # Names: who wins
//!
//! A name is claimed locally first (so that the node itself never has two holders), then
//! in Redis, which decides between nodes: the first claim to reach Redis wins.
//!
//! - A name claimed in `connect` (through [`kythera_handler_api::Conn::register`]) is decided
//!   before the handshake is answered: the engine holds the 101 until Redis has
//!   answered, and answers 409 if the name went to another node meanwhile.
//! - A name claimed later, from a callback, cannot wait: it is held at once, and if
//!   Redis gives it to another node's connection, this connection loses it and is
//!   closed with 3409 ([`kythera_handler_api::CloseCode::NAME_CONFLICT`], terminate reason
//!   [`kythera_handler_api::TerminateError::NameConflict`]).
//! - While Redis cannot be reached, claims are decided locally and re-announced on
//!   reconnection, where the same rule settles any conflict.
//!
//! So after any race exactly one holder remains, and every loser was told.

mod replica;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use kythera_handler_api::{ConnId, Frame};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use replica::{RemoteConn, Replica};

/// A node's index in this process's table of node ids; 0 is this node.
pub type NodeIdx = u16;

/// The node ids this process has heard of, interned: replicas and messages name nodes
/// by index.
#[derive(Debug)]
pub struct NodeTable {
    inner: RwLock<NodesInner>,
}

#[derive(Debug, Default)]
struct NodesInner {
    names: Vec<Arc<str>>,
    index: HashMap<Arc<str>, NodeIdx>,
}

impl NodeTable {
    /// A table whose node 0 is `this_node`.
    pub fn new(this_node: &str) -> NodeTable {
        let table = NodeTable {
            inner: RwLock::new(NodesInner::default()),
        };
        table.intern(this_node);
        table
    }

    /// The index of `node`, added if new. `None` if the table is full (65,536 ids
    /// heard of in one process's life).
    pub fn intern(&self, node: &str) -> Option<NodeIdx> {
        if let Some(&i) = self.inner.read().ok()?.index.get(node) {
            return Some(i);
        }
        let mut inner = self.inner.write().ok()?;
        if let Some(&i) = inner.index.get(node) {
            return Some(i);
        }
        let i = NodeIdx::try_from(inner.names.len()).ok()?;
        let name: Arc<str> = node.into();
        inner.names.push(Arc::clone(&name));
        inner.index.insert(name, i);
        Some(i)
    }

    /// The id of node `i`.
    pub fn name(&self, i: NodeIdx) -> Option<Arc<str>> {
        self.inner.read().ok()?.names.get(usize::from(i)).cloned()
    }

    /// The index of `node`, if known.
    pub fn find(&self, node: &str) -> Option<NodeIdx> {
        self.inner.read().ok()?.index.get(node).copied()
    }

    /// This node (index 0) takes the id `node`: a process that ran under a temporary
    /// id while it took over `node` from another process (a live handover). If `node`
    /// was known as another node (the process taken over), its old index is returned:
    /// it keeps the name for whatever still refers to it, but the name now finds
    /// index 0, and what is still addressed to the old index is the old process's
    /// (the caller drops it).
    pub fn rename_this(&self, node: &str) -> Option<NodeIdx> {
        let mut inner = self.inner.write().ok()?;
        let name: Arc<str> = node.into();
        if let Some(old) = inner.names.first().cloned() {
            inner.index.remove(&old);
            inner.names[0] = Arc::clone(&name);
        }
        inner.index.insert(name, 0).filter(|&i| i != 0)
    }
}

/// Why a message between nodes was dropped (each cause is counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropCause {
    /// The backplane was not connected to Redis when the message was sent, or lost the
    /// connection before Redis took it.
    Disconnected,
    /// The outbox towards the backplane was full.
    OutboxFull,
    /// A message from another node found the target shard's queue full.
    InboundFull,
    /// A message from another node could not be decoded (another build of the gear's
    /// message type, say).
    Undecodable,
    /// A message from another node named a gear or connection this node does not have.
    Unknown,
    /// No node took a batch published to its channel (the target node is gone, or
    /// left the group meanwhile): its messages are counted.
    NoReceiver,
}

impl DropCause {
    /// Every cause, in the order of [`ClusterLink::drops`].
    pub const ALL: [DropCause; 6] = [
        DropCause::Disconnected,
        DropCause::OutboxFull,
        DropCause::InboundFull,
        DropCause::Undecodable,
        DropCause::Unknown,
        DropCause::NoReceiver,
    ];

    /// The cause's label in metrics.
    pub fn label(self) -> &'static str {
        match self {
            DropCause::Disconnected => "disconnected",
            DropCause::OutboxFull => "outbox_full",
            DropCause::InboundFull => "inbound_full",
            DropCause::Undecodable => "undecodable",
            DropCause::Unknown => "unknown_target",
            DropCause::NoReceiver => "no_receiver",
        }
    }
}

/// What every clustered gear's registry and the backplane share: this node's id, the
/// node table, whether Redis is reachable, and the drop counters.
#[derive(Debug)]
pub struct ClusterLink {
    nodes: NodeTable,
    connected: AtomicBool,
    drops: [AtomicU64; DropCause::ALL.len()],
    conflicts: AtomicU64,
}

impl ClusterLink {
    /// The link of node `this_node`, not connected yet.
    pub fn new(this_node: &str) -> ClusterLink {
        ClusterLink {
            nodes: NodeTable::new(this_node),
            connected: AtomicBool::new(false),
            drops: Default::default(),
            conflicts: AtomicU64::new(0),
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> Arc<str> {
        self.nodes.name(0).unwrap_or_else(|| "".into())
    }

    /// The node table.
    pub fn nodes(&self) -> &NodeTable {
        &self.nodes
    }

    /// Whether the backplane is connected (set by the backplane).
    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    /// Sets whether the backplane is connected.
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
    }

    /// Counts `n` messages dropped for `cause`.
    pub fn dropped(&self, cause: DropCause, n: u64) {
        self.drops[cause as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Messages dropped so far, per cause, in the order of [`DropCause::ALL`].
    pub fn drops(&self) -> [u64; DropCause::ALL.len()] {
        std::array::from_fn(|i| self.drops[i].load(Ordering::Relaxed))
    }

    /// Counts a name this node lost to another node.
    pub fn conflict(&self) {
        self.conflicts.fetch_add(1, Ordering::Relaxed);
    }

    /// Names this node lost to other nodes so far.
    pub fn conflicts(&self) -> u64 {
        self.conflicts.load(Ordering::Relaxed)
    }
}

/// A node's connection to the other nodes of its cluster: implemented by the `cluster`
/// crate over Redis. The engine hands one to every clustered gear's registry.
pub trait Backplane: Send + Sync + fmt::Debug {
    /// What the registries share with the backplane.
    fn link(&self) -> &Arc<ClusterLink>;
    /// Adds a clustered gear; called once per gear, before the server runs.
    fn attach(&self, gear: Arc<dyn ClusterGear>);
    /// Something was queued for the backplane (outbox or control queue). Cheap when
    /// the backplane is awake or already woken.
    fn wake(&self);
    /// The nodes this node believes alive, itself included, sorted.
    fn live_nodes(&self) -> Vec<String>;
    /// Appends the backplane's metrics in the Prometheus text format (without `# EOF`).
    fn write_metrics(&self, out: &mut String);
    /// Sends what is still queued, gives up this node's names and memberships in Redis
    /// and stops the backplane. Called once the shards have stopped.
    fn shutdown(&self);
    /// The live handover this process took over with is over: the old process is done
    /// with it, or gone. A backplane that took the node over under a temporary id
    /// (`kythera_cluster::ClusterConfig::takes_over`) may take the node's id once the
    /// old process has also left the cluster. Called by the server; the default does
    /// nothing.
    fn predecessor_done(&self) {}
}

/// How a gear's server messages cross processes: written by the sending node's
/// backplane thread, read by the receiving node's.
pub struct MessageCodec<M> {
    /// Appends `msg`'s bytes to the buffer; false if it cannot be encoded.
    pub encode: fn(&M, &mut Vec<u8>) -> bool,
    /// The message from its bytes; `None` if they are not one.
    pub decode: fn(&[u8]) -> Option<M>,
}

impl<M> Clone for MessageCodec<M> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<M> Copy for MessageCodec<M> {}

impl<M> fmt::Debug for MessageCodec<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageCodec").finish_non_exhaustive()
    }
}

impl<M: Serialize + DeserializeOwned> MessageCodec<M> {
    /// serde with postcard: compact (varints, no field names), and a reader that
    /// refuses malformed input instead of trusting it.
    pub fn postcard() -> MessageCodec<M> {
        MessageCodec {
            encode: |msg, out| {
                let buf = std::mem::take(out);
                match postcard::to_extend(msg, buf) {
                    Ok(buf) => {
                        *out = buf;
                        true
                    }
                    Err(_) => false,
                }
            },
            decode: |bytes| postcard::from_bytes(bytes).ok(),
        }
    }
}

/// Name claims and releases and membership changes, in the order they happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    /// `conn` took `name` on this node; Redis must decide.
    Claim {
        /// The name.
        name: Box<str>,
        /// Its holder here.
        conn: ConnId,
        /// The name comes with a connection handed over from another process (a live
        /// handover): the claim also wins over that process's entry, which it may
        /// not have released in Redis yet.
        moved: bool,
    },
    /// `conn` gave `name` up.
    Release {
        /// The name.
        name: Box<str>,
        /// Its holder until now.
        conn: ConnId,
    },
    /// The number of this node's members of the group changed.
    Group(Box<str>),
}

/// What a gear's registry has for other nodes, serialized by [`ClusterGear::take_outgoing`].
#[derive(Debug)]
pub enum Outgoing<'a> {
    /// A server message for connection `conn` (its id on its node) on node `node`.
    To {
        /// The holder's node.
        node: NodeIdx,
        /// The holder's id on its node.
        conn: u64,
        /// The message, encoded.
        msg: &'a [u8],
    },
    /// A server message for every member of `group` on other nodes.
    Publish {
        /// The group.
        group: &'a str,
        /// The message, encoded.
        msg: &'a [u8],
    },
    /// A `publish_frame` frame for every member of `group` on other nodes.
    Frame {
        /// The group.
        group: &'a str,
        /// The frame.
        frame: &'a Frame,
    },
}

/// What another node sent a gear's connections.
#[derive(Debug)]
pub enum Incoming<'a> {
    /// A server message for this node's connection `conn`.
    To {
        /// The connection's id on this node.
        conn: u64,
        /// The message, encoded.
        msg: &'a [u8],
    },
    /// A server message for this node's members of `group`.
    Publish {
        /// The group.
        group: &'a str,
        /// The message, encoded.
        msg: &'a [u8],
    },
    /// A frame for this node's members of `group`, encoded here once for all of them.
    Frame {
        /// The group.
        group: &'a str,
        /// The frame.
        frame: Frame,
    },
}

/// A clustered gear's registry as the backplane drives it.
pub trait ClusterGear: Send + Sync {
    /// The gear's name in the cluster: its mount pattern (every node mounts the same
    /// gear on the same pattern).
    fn key(&self) -> &str;
    /// What this node knows of the gear's names and groups on other nodes.
    fn replica(&self) -> &Replica;
    /// Takes the claims, releases and membership changes queued since the last call.
    fn take_control(&self, out: &mut Vec<Control>);
    /// Takes up to `max` messages bound for other nodes, serializing each for `out`;
    /// returns how many were taken.
    fn take_outgoing(&self, max: usize, out: &mut dyn FnMut(Outgoing<'_>)) -> usize;
    /// Whether messages wait in the outbox.
    fn has_outgoing(&self) -> bool;
    /// Delivers what another node sent; returns to how many connections.
    fn deliver(&self, item: Incoming<'_>) -> Result<usize, DropCause>;
    /// Redis decided `conn`'s claim of `name` (also when the backplane decided it
    /// locally, because Redis could not be reached). A lost claim takes the name from
    /// the connection, which is then closed (or its handshake answered 409).
    fn claim_decided(&self, name: &str, conn: ConnId, won: bool);
    /// The names this node's connections hold, for re-announcing them.
    fn local_names(&self, out: &mut Vec<(Box<str>, ConnId)>);
    /// This node's member count of `group`.
    fn local_count(&self, group: &str) -> usize;
    /// This node's groups with members and their counts, for re-announcing them.
    fn local_groups(&self, out: &mut Vec<(Box<str>, usize)>);
}
