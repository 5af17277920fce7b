//! The registry as a gear reaches it: errors, the operations the engine provides, and
//! connection handles.
//!
//! The `registry` crate implements [`RegistryOps`]; a gear never names it, it calls the
//! methods of [`Context`](crate::Context), which forward here.

use std::fmt;
use std::sync::Arc;

use crate::conn::ConnId;
use crate::frame::Frame;

/// Why a registry operation did not happen.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RegistryError {
    /// Another live connection of this gear holds the name.
    Taken,
    /// This connection does not hold the name.
    NotRegistered,
    /// This connection is not a member of the group.
    NotInGroup,
    /// A name or group is empty or longer than the registry allows.
    InvalidName,
    /// The queue towards the target shard is full: the message was dropped and counted.
    Full,
    /// The engine runs without a registry (or this call has no registry behind it yet).
    Unavailable,
    /// The holder of the name is on another node of the cluster and this node cannot
    /// reach the cluster's Redis right now: the message was dropped and counted.
    Unreachable,
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RegistryError::Taken => "name is taken by another connection",
            RegistryError::NotRegistered => "name is not registered by this connection",
            RegistryError::NotInGroup => "connection is not a member of the group",
            RegistryError::InvalidName => "invalid name or group",
            RegistryError::Full => "queue to the target shard is full; message dropped",
            RegistryError::Unavailable => "registry unavailable",
            RegistryError::Unreachable => {
                "the holder is on another node and the cluster is unreachable; message dropped"
            }
        })
    }
}

impl std::error::Error for RegistryError {}

/// The registry operations of one gear's namespace, on behalf of one connection.
///
/// Implemented by the engine's registry; gear code calls them through
/// [`Context`](crate::Context).
pub trait RegistryOps<M> {
    /// Registers `name` for `conn`. Registering a name the same connection holds is ok.
    fn register(&mut self, conn: ConnId, name: &str) -> Result<(), RegistryError>;
    /// Gives up `name`.
    fn unregister(&mut self, conn: ConnId, name: &str) -> Result<(), RegistryError>;
    /// Who holds `name`.
    fn lookup(&mut self, name: &str) -> Result<Option<ConnId>, RegistryError>;
    /// Queues `msg` for the holder of `name`: `Ok(true)` if queued, `Ok(false)` if
    /// nobody holds it.
    fn send_message(&mut self, name: &str, msg: M) -> Result<bool, RegistryError>;
    /// Makes `conn` a member of `group`.
    fn join(&mut self, conn: ConnId, group: &str) -> Result<(), RegistryError>;
    /// Ends `conn`'s membership of `group`.
    fn leave(&mut self, conn: ConnId, group: &str) -> Result<(), RegistryError>;
    /// Queues `msg` for every member of `group`; returns for how many.
    fn publish(&mut self, group: &str, msg: M) -> Result<usize, RegistryError>;
    /// Encodes `frame` once and queues the same bytes to every member, without calling
    /// their handlers; returns for how many.
    fn publish_frame(&mut self, group: &str, frame: Frame) -> Result<usize, RegistryError>;
    /// How many members `group` has.
    fn count(&mut self, group: &str) -> Result<usize, RegistryError>;
    /// A handle that delivers server messages to `conn` from any thread.
    fn handle(&mut self, conn: ConnId) -> Result<ConnHandle<M>, RegistryError>;
}

/// A gear's table of unique names, without the message type: what [`Conn`](crate::Conn)
/// uses to register names during `connect`. Implemented by the engine's registry.
pub trait NameTable: Send + Sync {
    /// Registers `name` for `conn`: ok if free or already held by `conn`, else
    /// [`RegistryError::Taken`] (or [`RegistryError::InvalidName`]).
    fn register(&self, conn: ConnId, name: &str) -> Result<(), RegistryError>;
    /// Gives up `name` if `conn` holds it.
    fn unregister(&self, conn: ConnId, name: &str) -> Result<(), RegistryError>;
    /// Who holds `name`.
    fn lookup(&self, name: &str) -> Option<ConnId>;
}

/// A registry that answers every call with [`RegistryError::Unavailable`]: what a
/// context has when no registry is wired in (unit tests of a gear, for instance).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoRegistry;

impl<M> RegistryOps<M> for NoRegistry {
    fn register(&mut self, _: ConnId, _: &str) -> Result<(), RegistryError> {
        Err(RegistryError::Unavailable)
    }
    fn unregister(&mut self, _: ConnId, _: &str) -> Result<(), RegistryError> {
        Err(RegistryError::Unavailable)
    }
    fn lookup(&mut self, _: &str) -> Result<Option<ConnId>, RegistryError> {
        Err(RegistryError::Unavailable)
    }
    fn send_message(&mut self, _: &str, _: M) -> Result<bool, RegistryError> {
        Err(RegistryError::Unavailable)
    }
    fn join(&mut self, _: ConnId, _: &str) -> Result<(), RegistryError> {
        Err(RegistryError::Unavailable)
    }
    fn leave(&mut self, _: ConnId, _: &str) -> Result<(), RegistryError> {
        Err(RegistryError::Unavailable)
    }
    fn publish(&mut self, _: &str, _: M) -> Result<usize, RegistryError> {
        Err(RegistryError::Unavailable)
    }
    fn publish_frame(&mut self, _: &str, _: Frame) -> Result<usize, RegistryError> {
        Err(RegistryError::Unavailable)
    }
    fn count(&mut self, _: &str) -> Result<usize, RegistryError> {
        Err(RegistryError::Unavailable)
    }
    fn handle(&mut self, _: ConnId) -> Result<ConnHandle<M>, RegistryError> {
        Err(RegistryError::Unavailable)
    }
}

/// What a message sent through a [`ConnHandle`] could not reach; the message comes back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliverError<M> {
    /// The connection has terminated.
    Closed(M),
    /// The queue towards the connection's shard is full; the drop is counted.
    Full(M),
}

impl<M> DeliverError<M> {
    /// The message that was not delivered.
    pub fn into_inner(self) -> M {
        match self {
            DeliverError::Closed(m) | DeliverError::Full(m) => m,
        }
    }
}

impl<M> fmt::Display for DeliverError<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeliverError::Closed(_) => f.write_str("connection closed"),
            DeliverError::Full(_) => f.write_str("queue full; message dropped"),
        }
    }
}

impl<M: fmt::Debug> std::error::Error for DeliverError<M> {}

/// Where a [`ConnHandle`] delivers: implemented by the engine.
pub trait Deliver<M>: Send + Sync {
    /// Queues `msg` for `conn`'s `handle_server_message`.
    fn deliver(&self, conn: ConnId, msg: M) -> Result<(), DeliverError<M>>;
}

/// A cheap, cloneable, `Send` handle to one connection: any thread can deliver a server
/// message to exactly that connection with it (antikythera: sending to the pid).
pub struct ConnHandle<M> {
    conn: ConnId,
    target: Arc<dyn Deliver<M>>,
}

impl<M> ConnHandle<M> {
    /// A handle to `conn` that delivers through `target`.
    pub fn new(conn: ConnId, target: Arc<dyn Deliver<M>>) -> ConnHandle<M> {
        ConnHandle { conn, target }
    }

    /// The connection this handle reaches.
    pub fn id(&self) -> ConnId {
        self.conn
    }

    /// Delivers `msg` to the connection's `handle_server_message`.
    pub fn send(&self, msg: M) -> Result<(), DeliverError<M>> {
        self.target.deliver(self.conn, msg)
    }
}

impl<M> Clone for ConnHandle<M> {
    fn clone(&self) -> Self {
        ConnHandle {
            conn: self.conn,
            target: Arc::clone(&self.target),
        }
    }
}

impl<M> fmt::Debug for ConnHandle<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnHandle")
            .field("conn", &self.conn)
            .finish()
    }
}
