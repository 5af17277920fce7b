//! Mounted gears: the type-erased face of a `Websocket` implementation that the
//! shards drive, and the `App` that routes requests to them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use handler_api::{
    Conn, ConnId, Context, FrameSink, Message, NoRegistry, Response, TerminateReason, Websocket,
};

use crate::config::Limits;
use crate::route::{InvalidRoute, Router};

/// What a session knows of a connection while it is open, for the DISCONNECTED log
/// line. Lives in the same allocation as the gear's state.
#[derive(Debug)]
pub(crate) struct Meta {
    pub gear: usize,
    pub peer: Option<SocketAddr>,
    pub opened_ms: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    /// Counts this connection against its gear's limit until dropped.
    _admission: Admission,
}

/// A gear's state for one connection, behind a trait object so that one shard can hold
/// connections of several gears.
pub(crate) trait LiveConn {
    /// Calls `handle_client_message`.
    fn client_message(&mut self, id: ConnId, msg: Message<'_>, sink: &mut dyn FrameSink);
    /// Calls `terminate`, consuming the state.
    fn terminate(self: Box<Self>, id: ConnId, reason: &TerminateReason, sink: &mut dyn FrameSink);
    /// The connection's bookkeeping.
    fn meta(&mut self) -> &mut Meta;
}

struct Live<G: Websocket> {
    gear: Arc<G>,
    state: G::State,
    meta: Meta,
}

impl<G: Websocket> LiveConn for Live<G> {
    fn client_message(&mut self, id: ConnId, msg: Message<'_>, sink: &mut dyn FrameSink) {
        let mut registry = NoRegistry;
        let mut ctx = Context::new(id, false, sink, &mut registry);
        self.gear
            .handle_client_message(&mut self.state, msg, &mut ctx);
    }

    fn terminate(self: Box<Self>, id: ConnId, reason: &TerminateReason, sink: &mut dyn FrameSink) {
        let mut registry = NoRegistry;
        let mut ctx = Context::new(id, true, sink, &mut registry);
        let Live { gear, state, .. } = *self;
        gear.terminate(state, reason, &mut ctx);
    }

    fn meta(&mut self) -> &mut Meta {
        &mut self.meta
    }
}

/// A mounted gear without its type.
trait DynGear: Send + Sync {
    fn connect(&self, conn: &mut Conn) -> Result<(), Response>;
    fn init(&self, conn: &mut Conn, sink: &mut dyn FrameSink, meta: Meta) -> Box<dyn LiveConn>;
}

impl<G: Websocket> DynGear for Arc<G> {
    fn connect(&self, conn: &mut Conn) -> Result<(), Response> {
        G::connect(self, conn)
    }

    fn init(&self, conn: &mut Conn, sink: &mut dyn FrameSink, meta: Meta) -> Box<dyn LiveConn> {
        let mut registry = NoRegistry;
        let mut ctx = Context::new(conn.id(), false, sink, &mut registry);
        let state = G::init(self, conn, &mut ctx);
        Box::new(Live {
            gear: Arc::clone(self),
            state,
            meta,
        })
    }
}

/// Holds one place of a gear's connection limit; gives it back when dropped.
#[derive(Debug)]
pub(crate) struct Admission(Arc<AtomicUsize>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Mounted {
    pattern: String,
    gear: Box<dyn DynGear>,
    max_connections: usize,
    live: Arc<AtomicUsize>,
}

/// The gears of an engine, routed by path, with their connection counts, and the
/// limits every connection runs under. Shared by all shards (`Arc<App>`).
pub struct App {
    router: Router<usize>,
    gears: Vec<Mounted>,
    limits: Limits,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field(
                "gears",
                &self.gears.iter().map(|g| &g.pattern).collect::<Vec<_>>(),
            )
            .field("limits", &self.limits)
            .finish()
    }
}

/// A route that matched: the gear and the path parameters.
pub(crate) struct Routed {
    pub gear: usize,
    pub params: Vec<(String, String)>,
}

impl App {
    /// An engine without gears yet.
    pub fn new(limits: Limits) -> App {
        App {
            router: Router::new(),
            gears: Vec::new(),
            limits,
        }
    }

    /// Mounts `gear` on `pattern` (see [`crate::route`]); `max_connections` overrides
    /// [`Limits::max_connections_per_gear`] for this gear.
    pub fn mount<G: Websocket>(
        &mut self,
        pattern: &str,
        gear: G,
        max_connections: Option<usize>,
    ) -> Result<(), InvalidRoute> {
        self.mount_shared(pattern, Arc::new(gear), max_connections)
    }

    /// Mounts a gear that is already shared (one gear value on several paths).
    pub fn mount_shared<G: Websocket>(
        &mut self,
        pattern: &str,
        gear: Arc<G>,
        max_connections: Option<usize>,
    ) -> Result<(), InvalidRoute> {
        self.router.mount(pattern, self.gears.len())?;
        self.gears.push(Mounted {
            pattern: pattern.to_owned(),
            gear: Box::new(gear),
            max_connections: max_connections.unwrap_or(self.limits.max_connections_per_gear),
            live: Arc::new(AtomicUsize::new(0)),
        });
        Ok(())
    }

    /// The limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Replaces the limits (before the engine starts).
    pub fn set_limits(&mut self, limits: Limits) {
        for g in &mut self.gears {
            if g.max_connections == self.limits.max_connections_per_gear {
                g.max_connections = limits.max_connections_per_gear;
            }
        }
        self.limits = limits;
    }

    /// Open connections of the gear mounted on `pattern`, across shards.
    pub fn connections(&self, pattern: &str) -> Option<usize> {
        self.gears
            .iter()
            .find(|g| g.pattern == pattern)
            .map(|g| g.live.load(Ordering::Relaxed))
    }

    pub(crate) fn route(&self, path: &str) -> Option<Routed> {
        self.router.find(path).map(|m| Routed {
            gear: *m.target,
            params: m.params,
        })
    }

    pub(crate) fn pattern(&self, gear: usize) -> &str {
        &self.gears[gear].pattern
    }

    /// Takes a place in the gear's connection limit, or `None` when it is full.
    pub(crate) fn admit(&self, gear: usize) -> Option<Admission> {
        let g = &self.gears[gear];
        let before = g.live.fetch_add(1, Ordering::Relaxed);
        let admission = Admission(Arc::clone(&g.live));
        (before < g.max_connections).then_some(admission)
    }

    pub(crate) fn connect(&self, gear: usize, conn: &mut Conn) -> Result<(), Response> {
        self.gears[gear].gear.connect(conn)
    }

    pub(crate) fn init(
        &self,
        gear: usize,
        conn: &mut Conn,
        sink: &mut dyn FrameSink,
        peer: Option<SocketAddr>,
        admission: Admission,
        now_ms: u64,
    ) -> Box<dyn LiveConn> {
        let meta = Meta {
            gear,
            peer,
            opened_ms: now_ms,
            frames_in: 0,
            frames_out: 0,
            _admission: admission,
        };
        self.gears[gear].gear.init(conn, sink, meta)
    }
}
