//! Mounted gears: the type-erased face of a `Websocket` implementation that the
//! shards drive, and the `App` that routes requests to them.

use std::any::Any;
use std::net::SocketAddr;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use kythera_handler_api::{
    CloseFrame, Conn, ConnId, Context, Frame, FrameSink, Message, NameTable, NoRegistry,
    RegistryOps, Response, TerminateReason, Websocket,
};
use kythera_registry::cluster::{Backplane, MessageCodec};
use kythera_registry::{
    Inbound, Registry, RegistryConfig, RegistryHandle, RegistryStats, RelaySink, ShardRegistry,
    SharedFrame, Wakeup,
};

use crate::config::Limits;
use crate::observe::{GearCounters, Http, HttpAnswer};
use crate::origin::OriginPolicy;
use crate::route::{InvalidRoute, Router};

/// What a session knows of a connection while it is open, for the DISCONNECTED log
/// line. Lives in the same allocation as the gear's state.
///
/// Kept to 40 bytes so that, with the mount's pointer, a zero-sized gear state (the
/// echo gear's) makes a 48-byte allocation. The gear's index is in the session.
#[derive(Debug)]
pub(crate) struct Meta {
    pub frames_in: u64,
    pub frames_out: u64,
    pub peer: PeerAddr,
    /// When the upgrade completed (for the connection's duration).
    pub opened: Millis40,
}

impl Meta {
    /// A connection upgraded at `now_ms` that has exchanged nothing yet.
    pub fn new(peer: Option<SocketAddr>, now_ms: u64) -> Meta {
        Meta {
            frames_in: 0,
            frames_out: 0,
            peer: PeerAddr::new(peer),
            opened: Millis40::new(now_ms),
        }
    }
}

/// A time on the shard clock (milliseconds since the server started) in 5 bytes, good
/// for 34 years: with a `u64` the echo gear's box would be 56 bytes instead of 48, and
/// the session (where the time was before) 8 bytes larger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Millis40([u8; 5]);

impl Millis40 {
    const MAX: u64 = (1 << 40) - 1;

    /// `ms`, or the largest time it holds if `ms` is later.
    pub fn new(ms: u64) -> Millis40 {
        let [a, b, c, d, e, ..] = ms.min(Self::MAX).to_le_bytes();
        Millis40([a, b, c, d, e])
    }

    /// The time in milliseconds.
    pub fn get(self) -> u64 {
        let [a, b, c, d, e] = self.0;
        u64::from_le_bytes([a, b, c, d, e, 0, 0, 0])
    }
}

/// A peer address in 19 bytes rather than `Option<SocketAddr>`'s 32: every open
/// connection keeps one (for its DISCONNECTED line), and memory per idle connection is
/// counted in bytes. IPv6 flow information and scope ids are not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerAddr {
    ip: [u8; 16],
    port: [u8; 2],
    /// 0: unknown, 4 or 6.
    family: u8,
}

impl PeerAddr {
    /// Packs an address.
    pub fn new(addr: Option<SocketAddr>) -> PeerAddr {
        let mut ip = [0; 16];
        let (family, port) = match addr {
            None => (0, 0),
            Some(SocketAddr::V4(a)) => {
                ip[..4].copy_from_slice(&a.ip().octets());
                (4, a.port())
            }
            Some(SocketAddr::V6(a)) => {
                ip = a.ip().octets();
                (6, a.port())
            }
        };
        PeerAddr {
            ip,
            port: port.to_be_bytes(),
            family,
        }
    }

    /// The address.
    pub fn get(&self) -> Option<SocketAddr> {
        let port = u16::from_be_bytes(self.port);
        match self.family {
            4 => {
                let [a, b, c, d, ..] = self.ip;
                Some(SocketAddr::from(([a, b, c, d], port)))
            }
            6 => Some(SocketAddr::from((self.ip, port))),
            _ => None,
        }
    }
}

/// A gear's state for one connection, behind a trait object so that one shard can hold
/// connections of several gears.
pub(crate) trait LiveConn {
    /// Calls `handle_client_message`. `gear`: the mount's index, as in `App`.
    fn client_message(
        &mut self,
        gear: usize,
        id: ConnId,
        msg: Message<'_>,
        sink: &mut dyn FrameSink,
        regs: &mut Registries,
    );
    /// Calls `handle_server_message` with the message in `msg` (an `Option` of the
    /// gear's message type, taken out here); does nothing if the type is not the gear's.
    fn server_message(
        &mut self,
        gear: usize,
        id: ConnId,
        msg: &mut dyn Any,
        sink: &mut dyn FrameSink,
        regs: &mut Registries,
    );
    /// Calls `terminate`, consuming the state (and giving back the connection's place
    /// in the gear's limit).
    fn terminate(
        self: Box<Self>,
        gear: usize,
        id: ConnId,
        reason: &TerminateReason,
        sink: &mut dyn FrameSink,
        regs: &mut Registries,
    );
    /// The connection's bookkeeping.
    fn meta(&mut self) -> &mut Meta;
    /// The gear's [`Websocket::freeze`] of the state (a live handover), or `None` if
    /// the gear does not opt in (or panicked).
    fn freeze(&self) -> Option<Vec<u8>>;
}

struct Live<G: Websocket> {
    mount: Place<G>,
    state: G::State,
    meta: Meta,
}

/// A gear as mounted on one path: the gear (shared by its mounts) and the count of
/// the mount's open connections.
struct Mount<G: Websocket> {
    gear: Arc<G>,
    live: Arc<AtomicUsize>,
    /// How the gear's server messages cross processes; `None`: the gear stays on its
    /// node in a cluster.
    codec: Option<MessageCodec<G::Message>>,
}

/// One connection's place in its mount's connection limit, and the way to its gear:
/// one pointer for both. Gives the place back when dropped.
struct Place<G: Websocket>(Arc<Mount<G>>);

impl<G: Websocket> Drop for Place<G> {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<G: Websocket> Live<G> {
    /// Runs `f` with the gear, its state and a context holding this shard's registry.
    fn call(
        &mut self,
        gear: usize,
        id: ConnId,
        sink: &mut dyn FrameSink,
        regs: &mut Registries,
        f: impl FnOnce(&G, &mut G::State, &mut Context<'_, G::Message>),
    ) {
        let mut none = NoRegistry;
        let registry = regs.ops::<G::Message>(gear, &mut none);
        let mut ctx = Context::new(id, false, sink, registry);
        f(&self.mount.0.gear, &mut self.state, &mut ctx);
    }
}

impl<G: Websocket> LiveConn for Live<G> {
    fn client_message(
        &mut self,
        gear: usize,
        id: ConnId,
        msg: Message<'_>,
        sink: &mut dyn FrameSink,
        regs: &mut Registries,
    ) {
        self.call(gear, id, sink, regs, |gear, state, ctx| {
            gear.handle_client_message(state, msg, ctx)
        });
    }

    fn server_message(
        &mut self,
        gear: usize,
        id: ConnId,
        msg: &mut dyn Any,
        sink: &mut dyn FrameSink,
        regs: &mut Registries,
    ) {
        let Some(msg) = msg
            .downcast_mut::<Option<G::Message>>()
            .and_then(Option::take)
        else {
            return;
        };
        self.call(gear, id, sink, regs, |gear, state, ctx| {
            gear.handle_server_message(state, msg, ctx)
        });
    }

    fn terminate(
        self: Box<Self>,
        gear_index: usize,
        id: ConnId,
        reason: &TerminateReason,
        sink: &mut dyn FrameSink,
        regs: &mut Registries,
    ) {
        // Names and memberships go first, so that `terminate` publishing a farewell
        // does not reach the leaving connection itself ...
        regs.remove_conn(gear_index, id);
        let mut none = NoRegistry;
        let registry = regs.ops::<G::Message>(gear_index, &mut none);
        let mut ctx = Context::new(id, true, sink, registry);
        let Live { mount, state, .. } = *self;
        mount.0.gear.terminate(state, reason, &mut ctx);
        // ... and again after, in case `terminate` registered or joined anything.
        regs.remove_conn(gear_index, id);
    }

    fn meta(&mut self) -> &mut Meta {
        &mut self.meta
    }

    fn freeze(&self) -> Option<Vec<u8>> {
        let gear = &self.mount.0.gear;
        catch_unwind(AssertUnwindSafe(|| gear.freeze(&self.state))).unwrap_or(None)
    }
}

/// A mounted gear without its type.
trait DynGear: Send + Sync {
    fn connect(&self, conn: &mut Conn) -> Result<(), Response>;
    fn init(
        &self,
        gear: usize,
        conn: &mut Conn,
        sink: &mut dyn FrameSink,
        meta: Meta,
        admission: Admission,
        regs: &mut Registries,
    ) -> Box<dyn LiveConn>;
    /// The gear's registry across `wakeup.shards()` shards, clustered through
    /// `backplane` if there is one and the gear's messages can cross processes.
    fn make_registry(
        &self,
        config: RegistryConfig,
        wakeup: Arc<Wakeup>,
        backplane: Option<&Arc<dyn Backplane>>,
        pattern: &str,
    ) -> Box<dyn AnyRegistry>;
    /// Whether the gear's messages can cross processes (mounted with a codec).
    fn crosses_nodes(&self) -> bool;
    /// A connection's state from its [`Websocket::freeze`] on another process, or
    /// `None` if the gear refuses it (or panicked).
    fn thaw(&self, frozen: &[u8], meta: Meta, admission: Admission) -> Option<Box<dyn LiveConn>>;
}

impl<G: Websocket> DynGear for Arc<Mount<G>> {
    fn connect(&self, conn: &mut Conn) -> Result<(), Response> {
        G::connect(&self.gear, conn)
    }

    fn init(
        &self,
        gear: usize,
        conn: &mut Conn,
        sink: &mut dyn FrameSink,
        meta: Meta,
        admission: Admission,
        regs: &mut Registries,
    ) -> Box<dyn LiveConn> {
        regs.adopt_names(gear, conn.id(), conn.take_registered());
        let mut none = NoRegistry;
        let registry = regs.ops::<G::Message>(gear, &mut none);
        let mut ctx = Context::new(conn.id(), false, sink, registry);
        let state = G::init(&self.gear, conn, &mut ctx);
        regs.adopt_names(gear, conn.id(), conn.take_registered());
        // The place taken at the handshake now belongs to the state (if `init`
        // panicked, the admission, dropped while unwinding, gave it back).
        admission.keep();
        Box::new(Live {
            mount: Place(Arc::clone(self)),
            state,
            meta,
        })
    }

    fn make_registry(
        &self,
        config: RegistryConfig,
        wakeup: Arc<Wakeup>,
        backplane: Option<&Arc<dyn Backplane>>,
        pattern: &str,
    ) -> Box<dyn AnyRegistry> {
        let encode = crate::protocol::codec::encode_server_frame;
        Box::new(match (backplane, self.codec) {
            (Some(backplane), Some(codec)) => Registry::<G::Message>::clustered(
                config,
                wakeup,
                encode,
                Arc::clone(backplane),
                pattern,
                codec,
            ),
            _ => Registry::<G::Message>::new(config, wakeup, encode),
        })
    }

    fn crosses_nodes(&self) -> bool {
        self.codec.is_some()
    }

    fn thaw(&self, frozen: &[u8], meta: Meta, admission: Admission) -> Option<Box<dyn LiveConn>> {
        let gear = &self.gear;
        let state = catch_unwind(AssertUnwindSafe(|| gear.thaw(frozen))).unwrap_or(None)?;
        admission.keep();
        Some(Box::new(Live {
            mount: Place(Arc::clone(self)),
            state,
            meta,
        }))
    }
}

/// Makes a gear's relay sink for a live handover, given its mount pattern.
pub(crate) type RelayFor<'a> = dyn Fn(&str) -> Arc<dyn RelaySink> + 'a;

/// A gear's [`Registry`] without its message type.
trait AnyRegistry: Send + Sync {
    fn shard(&self, index: usize) -> Option<Box<dyn GearShard>>;
    fn names(&self) -> Arc<dyn NameTable>;
    fn stats(&self) -> RegistryStats;
    fn as_any(&self) -> &dyn Any;
    fn set_relay(&self, sink: Option<Arc<dyn RelaySink>>);
    fn publish_relayed(&self, group: &str, frame: Frame) -> usize;
}

impl<M: Clone + Send + 'static> AnyRegistry for Registry<M> {
    fn shard(&self, index: usize) -> Option<Box<dyn GearShard>> {
        Some(Box::new(TypedShard {
            reg: Registry::shard(self, index)?,
        }))
    }
    fn names(&self) -> Arc<dyn NameTable> {
        Registry::names(self)
    }
    fn stats(&self) -> RegistryStats {
        Registry::stats(self)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn set_relay(&self, sink: Option<Arc<dyn RelaySink>>) {
        Registry::set_relay(self, sink);
    }
    fn publish_relayed(&self, group: &str, frame: Frame) -> usize {
        Registry::publish_relayed(self, group, frame)
    }
}

/// Where inbound registry messages go: implemented by the shard, which finds the
/// connection and runs its session.
pub(crate) trait Deliveries {
    /// A server message for `conn` (`msg` is an `Option<M>` of the gear's type); false
    /// if the connection is gone or closing.
    fn message(&mut self, conn: ConnId, msg: &mut dyn Any, regs: &mut Registries) -> bool;
    /// A frame of a `publish_frame` for `conn`.
    fn frame(&mut self, conn: ConnId, frame: &SharedFrame, regs: &mut Registries) -> bool;
    /// A `publish_frame` of a close for `conn`.
    fn close(&mut self, conn: ConnId, close: Option<CloseFrame>, regs: &mut Registries) -> bool;
    /// `conn` lost `name` to a connection on another node.
    fn name_lost(&mut self, conn: ConnId, name: &str, regs: &mut Registries) -> bool;
    /// The names `conn` claimed in `connect` were decided (`lost`: one it lost).
    fn names_decided(&mut self, conn: ConnId, lost: Option<&str>, regs: &mut Registries) -> bool;
}

/// One shard's part of one gear's registry, without the message type.
trait GearShard: Any {
    fn has_inbound(&self) -> bool;
    fn await_names(&mut self, conn: ConnId, names: &[Box<str>]) -> bool;
    fn take_wakeups(&mut self, each: &mut dyn FnMut(usize));
    fn remove_conn(&mut self, conn: ConnId);
    /// The connection's names and groups, then freed (a live handover).
    fn take_holdings(&mut self, conn: ConnId) -> (Vec<Box<str>>, Vec<Box<str>>);
    /// Takes `names` and joins `groups` for a connection handed over from another
    /// process; how many failed (a name taken meanwhile, a full group).
    fn restore(&mut self, conn: ConnId, names: &[String], groups: &[String]) -> usize;
    fn adopt_names(&mut self, conn: ConnId, names: Vec<Box<str>>);
    /// Takes up to `max` envelopes into `batch` (a `Vec<Inbound<M>>` of the gear's
    /// type, kept by [`Registries`] from turn to turn so that delivering allocates
    /// nothing); returns how many were taken.
    fn take_batch(&mut self, max: usize, batch: &mut dyn Any) -> usize;
    fn undeliverable(&mut self, n: u64);
    fn inbound_len(&self) -> usize;
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

struct TypedShard<M> {
    reg: ShardRegistry<M>,
}

impl<M: Clone + Send + 'static> GearShard for TypedShard<M> {
    fn has_inbound(&self) -> bool {
        self.reg.has_inbound()
    }
    fn await_names(&mut self, conn: ConnId, names: &[Box<str>]) -> bool {
        self.reg.await_names(conn, names)
    }
    fn take_wakeups(&mut self, each: &mut dyn FnMut(usize)) {
        self.reg.take_wakeups(each);
    }
    fn remove_conn(&mut self, conn: ConnId) {
        self.reg.remove_conn(conn);
    }
    fn take_holdings(&mut self, conn: ConnId) -> (Vec<Box<str>>, Vec<Box<str>>) {
        self.reg.take_holdings(conn)
    }
    fn restore(&mut self, conn: ConnId, names: &[String], groups: &[String]) -> usize {
        let mut failed = 0;
        for name in names {
            failed += usize::from(self.reg.register_moved(conn, name).is_err());
        }
        for group in groups {
            failed += usize::from(self.reg.join(conn, group).is_err());
        }
        failed
    }
    fn adopt_names(&mut self, conn: ConnId, names: Vec<Box<str>>) {
        self.reg.adopt_names(conn, names);
    }
    fn take_batch(&mut self, max: usize, batch: &mut dyn Any) -> usize {
        match batch.downcast_mut::<Vec<Inbound<M>>>() {
            Some(batch) => self.reg.take_inbound(max, batch),
            None => 0,
        }
    }
    fn undeliverable(&mut self, n: u64) {
        self.reg.undeliverable(n);
    }
    fn inbound_len(&self) -> usize {
        self.reg.inbound_len()
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// One shard's parts of every gear's registry, and its per-gear counters, by gear
/// index. Empty in unit tests of a session, where gears get [`NoRegistry`].
#[derive(Default)]
pub struct Registries {
    gears: Vec<Option<Box<dyn GearShard>>>,
    /// Typed delivery of a gear's batch (`deliver_batch::<M>`), by gear index.
    deliver: Vec<DeliverFn>,
    /// Each gear's delivery batch (a `Vec<Inbound<M>>`), allocated once and kept; `None`
    /// only while it is being delivered.
    batches: Vec<Option<Box<dyn Any>>>,
    /// This shard's counters per gear; the last entry is for requests that matched no
    /// gear. Empty in unit tests (nothing is counted).
    counters: Option<Arc<[GearCounters]>>,
}

type DeliverFn = fn(&mut Registries, usize, &mut dyn Any, &mut dyn Deliveries);

impl std::fmt::Debug for Registries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registries")
            .field("gears", &self.gears.len())
            .finish()
    }
}

impl Registries {
    /// No registries: every gear gets [`NoRegistry`].
    pub fn none() -> Registries {
        Registries::default()
    }

    fn typed<M: Clone + Send + 'static>(&mut self, gear: usize) -> Option<&mut TypedShard<M>> {
        self.gears
            .get_mut(gear)?
            .as_mut()?
            .as_any_mut()
            .downcast_mut::<TypedShard<M>>()
    }

    /// The registry a callback of `gear` gets: the shard's part, or `fallback`.
    fn ops<'a, M: Clone + Send + 'static>(
        &'a mut self,
        gear: usize,
        fallback: &'a mut NoRegistry,
    ) -> &'a mut dyn RegistryOps<M> {
        match self.typed::<M>(gear) {
            Some(t) => &mut t.reg,
            None => fallback,
        }
    }

    pub(crate) fn remove_conn(&mut self, gear: usize, conn: ConnId) {
        if let Some(Some(g)) = self.gears.get_mut(gear) {
            g.remove_conn(conn);
        }
    }

    /// The names and groups `conn` holds in `gear`'s registry, then freed: for a
    /// connection handed over to another process.
    pub(crate) fn take_holdings(
        &mut self,
        gear: usize,
        conn: ConnId,
    ) -> (Vec<Box<str>>, Vec<Box<str>>) {
        match self.gears.get_mut(gear) {
            Some(Some(g)) => g.take_holdings(conn),
            _ => (Vec::new(), Vec::new()),
        }
    }

    /// Takes `names` and joins `groups` for a connection handed over from another
    /// process; how many of them failed.
    pub(crate) fn restore(
        &mut self,
        gear: usize,
        conn: ConnId,
        names: &[String],
        groups: &[String],
    ) -> usize {
        match self.gears.get_mut(gear) {
            Some(Some(g)) => g.restore(conn, names, groups),
            _ => names.len() + groups.len(),
        }
    }

    fn adopt_names(&mut self, gear: usize, conn: ConnId, names: Vec<Box<str>>) {
        if let Some(Some(g)) = self.gears.get_mut(gear) {
            g.adopt_names(conn, names);
        }
    }

    /// After `connect` claimed `names`: whether the handshake must wait for the
    /// cluster to decide them (see `kythera_registry::ShardRegistry::await_names`).
    pub(crate) fn await_names(&mut self, gear: usize, conn: ConnId, names: &[Box<str>]) -> bool {
        match self.gears.get_mut(gear) {
            Some(Some(g)) => g.await_names(conn, names),
            _ => false,
        }
    }

    /// This shard's counters of `gear` (`None` for requests that matched no gear).
    pub(crate) fn counters(&self, gear: Option<usize>) -> Option<&GearCounters> {
        let counters = self.counters.as_deref()?;
        counters.get(gear.unwrap_or(counters.len().saturating_sub(1)))
    }

    /// Envelopes waiting in this shard's inbound queues, all gears.
    pub(crate) fn inbound_len(&self) -> usize {
        self.gears.iter().flatten().map(|g| g.inbound_len()).sum()
    }

    /// Whether any gear has inbound messages waiting on this shard.
    pub(crate) fn has_inbound(&self) -> bool {
        self.gears.iter().flatten().any(|g| g.has_inbound())
    }

    /// Shards pushed to since the last call (each once per gear; the caller dedupes).
    pub(crate) fn take_wakeups(&mut self, each: &mut dyn FnMut(usize)) {
        for g in self.gears.iter_mut().flatten() {
            g.take_wakeups(each);
        }
    }

    /// Takes up to `max` envelopes per gear from the inbound queues and delivers them;
    /// returns how many envelopes were taken.
    pub(crate) fn deliver(&mut self, max: usize, to: &mut dyn Deliveries) -> usize {
        let mut taken = 0;
        for gear in 0..self.gears.len() {
            let Some(Some(g)) = self.gears.get_mut(gear) else {
                continue;
            };
            if !g.has_inbound() {
                continue;
            }
            let Some(mut batch) = self.batches.get_mut(gear).and_then(Option::take) else {
                continue;
            };
            taken += g.take_batch(max, &mut *batch);
            let deliver = self.deliver[gear];
            deliver(self, gear, &mut *batch, to);
            self.batches[gear] = Some(batch);
        }
        taken
    }
}

/// Delivers a batch of gear messages of type `M` (see [`Registries::deliver`]) and
/// leaves it empty for the next turn.
fn deliver_batch<M: Clone + Send + 'static>(
    regs: &mut Registries,
    gear: usize,
    batch: &mut dyn Any,
    to: &mut dyn Deliveries,
) {
    let Some(batch) = batch.downcast_mut::<Vec<Inbound<M>>>() else {
        return;
    };
    let mut gone = 0;
    for item in batch.drain(..) {
        let delivered = match item {
            Inbound::Message(conn, msg) => to.message(conn, &mut Some(msg), regs),
            Inbound::Frame(conn, frame) => to.frame(conn, &frame, regs),
            Inbound::Close(conn, close) => to.close(conn, close, regs),
            Inbound::NameLost(conn, name) => {
                // Not a message: a connection that ended meanwhile is not a drop.
                to.name_lost(conn, &name, regs);
                true
            }
            Inbound::NamesDecided(conn, lost) => {
                to.names_decided(conn, lost.as_deref(), regs);
                true
            }
        };
        gone += u64::from(!delivered);
    }
    // A burst's capacity is not kept for ever.
    if batch.capacity() > BATCH_KEEP_MAX {
        *batch = Vec::new();
    }
    if gone > 0
        && let Some(Some(g)) = regs.gears.get_mut(gear)
    {
        g.undeliverable(gone);
    }
}

/// The most delivery slots a gear's batch keeps between turns.
const BATCH_KEEP_MAX: usize = 64 * 1024;

/// A gear's empty delivery batch (`Vec<Inbound<M>>`).
fn new_batch<M: Clone + Send + 'static>() -> Box<dyn Any> {
    Box::new(Vec::<Inbound<M>>::new())
}

/// Holds one place of a gear's connection limit during the handshake; gives it back
/// when dropped, unless the connection opened ([`Admission::keep`]: its gear state
/// holds the place from then on).
#[derive(Debug)]
pub(crate) struct Admission(Option<Arc<AtomicUsize>>);

impl Admission {
    /// The connection opened: the place is now held by its gear state.
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(live) = &self.0 {
            live.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

struct Mounted {
    pattern: String,
    gear: Box<dyn DynGear>,
    max_connections: usize,
    /// Which pages may connect (see [`crate::origin`]).
    origins: OriginPolicy,
    live: Arc<AtomicUsize>,
    /// Made when the shard count is known ([`App::start_registries`]).
    registry: OnceLock<Box<dyn AnyRegistry>>,
    /// Delivers the gear's typed registry messages.
    deliver: DeliverFn,
    /// Makes the gear's (empty) delivery batch.
    new_batch: fn() -> Box<dyn Any>,
}

/// The gears of an engine, routed by path, with their connection counts, and the
/// limits every connection runs under. Shared by all shards (`Arc<App>`).
pub struct App {
    router: Router<usize>,
    gears: Vec<Mounted>,
    limits: Limits,
    /// Metrics, health and static files (set when the server is built).
    http: OnceLock<Http>,
    /// The cluster's backplane (set when the server is built, if it has one).
    backplane: OnceLock<Arc<dyn Backplane>>,
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
            http: OnceLock::new(),
            backplane: OnceLock::new(),
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
        self.mount_with_codec(pattern, gear, max_connections, None)
    }

    /// Mounts a gear whose server messages cross processes through `codec` in a
    /// cluster (`None`: the gear stays on its node).
    pub fn mount_with_codec<G: Websocket>(
        &mut self,
        pattern: &str,
        gear: Arc<G>,
        max_connections: Option<usize>,
        codec: Option<MessageCodec<G::Message>>,
    ) -> Result<(), InvalidRoute> {
        self.router.mount(pattern, self.gears.len())?;
        let live = Arc::new(AtomicUsize::new(0));
        let mount = Arc::new(Mount {
            gear,
            live: Arc::clone(&live),
            codec,
        });
        self.gears.push(Mounted {
            pattern: pattern.to_owned(),
            gear: Box::new(mount),
            max_connections: max_connections.unwrap_or(self.limits.max_connections_per_gear),
            origins: OriginPolicy::default(),
            live,
            registry: OnceLock::new(),
            deliver: deliver_batch::<G::Message>,
            new_batch: new_batch::<G::Message>,
        });
        Ok(())
    }

    /// Sets which pages may connect to the gear mounted on `pattern` (every gear:
    /// `None`). Returns false if no gear is mounted there.
    pub fn set_origins(&mut self, pattern: Option<&str>, policy: OriginPolicy) -> bool {
        let mut found = false;
        for g in &mut self.gears {
            if pattern.is_none_or(|p| p == g.pattern) {
                g.origins = policy.clone();
                found = true;
            }
        }
        found
    }

    /// Whether a page with `origin` may open a connection to `gear` on `host`.
    pub(crate) fn origin_allowed(
        &self,
        gear: usize,
        origin: Option<&[u8]>,
        host: Option<&[u8]>,
    ) -> bool {
        self.gears[gear].origins.allows(origin, host)
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

    /// Makes every gear's registry for `wakeup.shards()` shards, clustered through
    /// `backplane` for the gears whose messages can cross processes (each mount says at
    /// start which it is). Called once, when the server is built.
    pub(crate) fn start_registries(
        &self,
        config: RegistryConfig,
        wakeup: &Arc<Wakeup>,
        backplane: Option<&Arc<dyn Backplane>>,
    ) {
        for g in &self.gears {
            if let Some(b) = backplane {
                let node = b.link().node_id();
                if g.gear.crosses_nodes() {
                    tracing::info!(gear = %g.pattern, node = %node, "gear is cluster-wide: names, groups and server messages span every node");
                } else {
                    tracing::warn!(gear = %g.pattern, node = %node, "gear stays on this node: its message type was not mounted as serializable (ServerBuilder::mount_clustered), so its names, groups and messages do not reach other nodes");
                }
                let _ = self.backplane.set(Arc::clone(b));
            }
            let _ = g.registry.set(g.gear.make_registry(
                config,
                Arc::clone(wakeup),
                backplane,
                &g.pattern,
            ));
        }
    }

    /// The cluster backplane, if the server is part of a cluster.
    pub fn backplane(&self) -> Option<&Arc<dyn Backplane>> {
        self.backplane.get()
    }

    /// Whether the gear mounted on `pattern` spans the cluster (`None`: no such gear).
    pub fn is_clustered(&self, pattern: &str) -> Option<bool> {
        let g = self.gears.iter().find(|g| g.pattern == pattern)?;
        Some(self.crosses_nodes(g))
    }

    /// Whether `g`'s names, groups and messages span the cluster.
    fn crosses_nodes(&self, g: &Mounted) -> bool {
        self.backplane.get().is_some() && g.gear.crosses_nodes()
    }

    /// Shard `index`'s parts of every gear's registry (each can be taken once), with
    /// its counters.
    pub(crate) fn shard_registries(
        &self,
        index: usize,
        counters: Arc<[GearCounters]>,
    ) -> Registries {
        Registries {
            counters: Some(counters),
            gears: self
                .gears
                .iter()
                .map(|g| g.registry.get().and_then(|r| r.shard(index)))
                .collect(),
            deliver: self.gears.iter().map(|g| g.deliver).collect(),
            batches: self.gears.iter().map(|g| Some((g.new_batch)())).collect(),
        }
    }

    /// How many gears are mounted.
    pub fn gear_count(&self) -> usize {
        self.gears.len()
    }

    /// Open connections of `gear` and its limit.
    pub(crate) fn connections_of(&self, gear: usize) -> (usize, usize) {
        let g = &self.gears[gear];
        (g.live.load(Ordering::Relaxed), g.max_connections)
    }

    /// The registry figures of `gear`.
    pub(crate) fn registry_stats_of(&self, gear: usize) -> Option<RegistryStats> {
        Some(self.gears[gear].registry.get()?.stats())
    }

    /// Envelopes waiting for `shard`, as it last saw them.
    pub(crate) fn registry_depth(&self, shard: usize) -> u64 {
        self.http
            .get()
            .map_or(0, |h| h.shared.stats[shard].registry_depth())
    }

    /// Sets what plain HTTP requests are answered with (once, when the server is built).
    pub(crate) fn set_http(&self, http: Http) {
        let _ = self.http.set(http);
    }

    /// Whether the server drains (upgrades are refused with 503 meanwhile).
    pub(crate) fn is_draining(&self) -> bool {
        self.http.get().is_some_and(|h| h.shared.is_draining())
    }

    /// The answer to a plain (non-upgrade) request, if its path is one of ours.
    pub(crate) fn http_answer(&self, method: &str, path: &str) -> Option<HttpAnswer> {
        self.http.get()?.answer(self, method, path)
    }

    /// The name table of `gear`, for `connect`.
    pub(crate) fn names(&self, gear: usize) -> Option<Arc<dyn NameTable>> {
        self.gears[gear].registry.get().map(|r| r.names())
    }

    /// A handle to the registry of the gear mounted on `pattern`, for threads outside
    /// the shards; `None` if no gear is mounted there, its message type is not `M`, or
    /// the server is not built yet.
    pub fn registry<M: Clone + Send + 'static>(&self, pattern: &str) -> Option<RegistryHandle<M>> {
        let g = self.gears.iter().find(|g| g.pattern == pattern)?;
        let reg = g.registry.get()?.as_any().downcast_ref::<Registry<M>>()?;
        Some(reg.handle())
    }

    /// Live handover: hands every frame published from now on in each gear's registry
    /// to the sink `sink_for` makes for that gear's pattern (clustered gears' only with
    /// `clustered_too`: between two nodes Redis carries them already); `None` stops.
    pub(crate) fn set_relays(&self, sink_for: Option<&RelayFor<'_>>, clustered_too: bool) {
        for g in &self.gears {
            if let Some(reg) = g.registry.get() {
                let sink = sink_for.filter(|_| clustered_too || !self.crosses_nodes(g));
                reg.set_relay(sink.map(|f| f(&g.pattern)));
            }
        }
    }

    /// This process's cluster node id, if it is in a cluster.
    pub(crate) fn node_id(&self) -> Option<String> {
        self.backplane.get().map(|b| b.link().node_id().to_string())
    }

    /// Live handover: publishes a frame the other process relayed to this process's
    /// members of `group` in the gear mounted on `pattern` (not relayed back).
    pub(crate) fn publish_relayed(&self, pattern: &str, group: &str, frame: Frame) -> usize {
        let Some(g) = self.gears.iter().find(|g| g.pattern == pattern) else {
            return 0;
        };
        g.registry
            .get()
            .map_or(0, |reg| reg.publish_relayed(group, frame))
    }

    /// The registry figures of the gear mounted on `pattern`.
    pub fn registry_stats(&self, pattern: &str) -> Option<RegistryStats> {
        let g = self.gears.iter().find(|g| g.pattern == pattern)?;
        Some(g.registry.get()?.stats())
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

    /// The gear mounted on `pattern` (a connection handed over names its gear so).
    pub(crate) fn gear_by_pattern(&self, pattern: &str) -> Option<usize> {
        self.gears.iter().position(|g| g.pattern == pattern)
    }

    /// A handed-over connection's gear state, thawed; `None` if the gear refused it.
    pub(crate) fn thaw(
        &self,
        gear: usize,
        frozen: &[u8],
        meta: Meta,
        admission: Admission,
    ) -> Option<Box<dyn LiveConn>> {
        self.gears[gear].gear.thaw(frozen, meta, admission)
    }

    /// Takes a place in the gear's connection limit, or `None` when it is full.
    pub(crate) fn admit(&self, gear: usize) -> Option<Admission> {
        let g = &self.gears[gear];
        let before = g.live.fetch_add(1, Ordering::Relaxed);
        let admission = Admission(Some(Arc::clone(&g.live)));
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
        meta: Meta,
        admission: Admission,
        regs: &mut Registries,
    ) -> Box<dyn LiveConn> {
        self.gears[gear]
            .gear
            .init(gear, conn, sink, meta, admission, regs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addresses_pack_and_unpack() {
        for addr in [
            None,
            Some("127.0.0.1:8080".parse().unwrap()),
            Some("[2001:db8::1]:65535".parse().unwrap()),
            Some("[::ffff:10.0.0.1]:1".parse().unwrap()),
        ] {
            assert_eq!(PeerAddr::new(addr).get(), addr);
        }
        assert_eq!(size_of::<PeerAddr>(), 19);
    }

    /// See `shard::tests::an_idle_connection_slot_is_80_bytes`: a gear whose state is
    /// zero-sized costs one 48-byte allocation per connection (mimalloc has a 48-byte
    /// size class; 49 bytes would take 64).
    #[test]
    fn a_zero_sized_gear_state_makes_a_48_byte_box() {
        struct Stateless;
        impl Websocket for Stateless {
            type State = ();
            type Message = ();
            fn init(&self, _: &mut Conn, _: &mut Context<'_, ()>) {}
            fn handle_client_message(&self, _: &mut (), _: Message<'_>, _: &mut Context<'_, ()>) {}
            fn handle_server_message(&self, _: &mut (), _: (), _: &mut Context<'_, ()>) {}
        }
        assert_eq!(size_of::<Live<Stateless>>(), 48);
    }

    #[test]
    fn opening_times_keep_40_bits() {
        for ms in [0, 1, 86_400_000 * 365 * 34, Millis40::MAX] {
            assert_eq!(Millis40::new(ms).get(), ms);
        }
        assert_eq!(Millis40::new(u64::MAX).get(), Millis40::MAX);
        assert_eq!(size_of::<Meta>(), 40);
    }
}
