//! One shard's side of a gear's registry: its queues to and from the other shards, the
//! members it owns, and the names and memberships of each of its connections.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use indexmap::IndexSet;
use kythera_handler_api::{
    CloseFrame, ConnHandle, ConnId, Deliver, Frame, RegistryError, RegistryOps,
};

use crate::groups::Group;
use crate::names::Hasher;
use crate::{ConnTarget, Envelope, Out, PublishedFrame, Shared, SharedFrame, to_each_shard};

/// What a connection holds, so that its end frees exactly that.
struct Holdings<M> {
    names: Vec<Box<str>>,
    groups: Vec<Arc<Group>>,
    /// The target of the connection's handles, if one was taken: marked closed when
    /// the connection ends, so that handles answer `Closed` from then on.
    target: Option<Arc<ConnTarget<M>>>,
}

impl<M> Default for Holdings<M> {
    fn default() -> Self {
        Holdings {
            names: Vec::new(),
            groups: Vec::new(),
            target: None,
        }
    }
}

/// A message for one of this shard's connections, taken from the inbound queues, with
/// group messages already fanned out to the local members.
#[derive(Debug)]
pub enum Inbound<M> {
    /// For the connection's `handle_server_message`.
    Message(ConnId, M),
    /// A frame of `publish_frame` for the connection's output, no callback.
    Frame(ConnId, Arc<SharedFrame>),
    /// Close the connection with this frame (a `publish_frame` of a close).
    Close(ConnId, Option<CloseFrame>),
    /// The connection lost this name to a connection on another node (clustered
    /// gears): the engine closes it with 3409.
    NameLost(ConnId, Box<str>),
    /// Redis decided the names the connection claimed in `connect` (see
    /// [`ShardRegistry::await_names`]): `None` if it won them all, so the handshake
    /// can be answered with the 101, else a name it lost (409).
    NamesDecided(ConnId, Option<Box<str>>),
}

impl<M> Inbound<M> {
    /// The connection it is for.
    pub fn conn(&self) -> ConnId {
        match self {
            Inbound::Message(c, _)
            | Inbound::Frame(c, _)
            | Inbound::Close(c, _)
            | Inbound::NameLost(c, _)
            | Inbound::NamesDecided(c, _) => *c,
        }
    }
}

/// A handshake waiting for Redis to decide the names claimed in `connect`.
#[derive(Debug)]
struct Pending {
    names: Vec<Box<str>>,
    lost: Option<Box<str>>,
}

/// One shard's view of a gear's registry. Owned by the shard's thread; implements the
/// operations a gear calls on behalf of one of this shard's connections.
pub struct ShardRegistry<M> {
    index: usize,
    shared: Arc<Shared<M>>,
    /// `to[t]`: the queue towards shard `t` (`None` for this shard: see `local`).
    to: Vec<Option<rtrb::Producer<Envelope<M>>>>,
    /// Messages for shard `t` sent during this turn, moved into `to[t]` in one chunk by
    /// [`ShardRegistry::take_wakeups`]: one store of the queue's tail (a cache line the
    /// receiving core reads) per turn instead of one per message.
    staged: Vec<Vec<Envelope<M>>>,
    /// Free slots of `to[t]` as last read; re-read only when `staged[t]` reaches it.
    free: Vec<usize>,
    /// `from[s]`: the queue from shard `s`.
    from: Vec<Option<rtrb::Consumer<Envelope<M>>>>,
    /// Messages from this shard to itself (bounded like the others).
    local: VecDeque<Envelope<M>>,
    /// Shards pushed to since the last [`ShardRegistry::take_wakeups`].
    dirty: Vec<bool>,
    dirty_list: Vec<usize>,
    /// This shard's members of each group, by group id.
    members: HashMap<u64, IndexSet<ConnId, Hasher>, Hasher>,
    holdings: HashMap<ConnId, Holdings<M>, Hasher>,
    /// Names this shard sent to, and their holders, as of `cache_released` (the
    /// count of names given up, see [`crate::Names`]): `send_message` then needs no
    /// read lock on the shared map while no name is given up anywhere.
    name_cache: HashMap<Box<str>, ConnId, Hasher>,
    cache_released: u64,
    /// Handshakes waiting for Redis, by connection.
    pending: HashMap<ConnId, Pending, Hasher>,
    /// This turn queued messages for other nodes: wake the backplane at its end.
    wake_backplane: bool,
}

/// The most names a shard's lookup cache holds before it starts over.
const NAME_CACHE_MAX: usize = 4096;

impl<M> std::fmt::Debug for ShardRegistry<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardRegistry")
            .field("shard", &self.index)
            .field("local_queued", &self.local.len())
            .field("groups_here", &self.members.len())
            .field("connections_holding", &self.holdings.len())
            .finish_non_exhaustive()
    }
}

impl<M: Clone + Send + 'static> ShardRegistry<M> {
    pub(crate) fn new(
        index: usize,
        shared: Arc<Shared<M>>,
        to: Vec<Option<rtrb::Producer<Envelope<M>>>>,
        from: Vec<Option<rtrb::Consumer<Envelope<M>>>>,
    ) -> Self {
        let shards = to.len();
        ShardRegistry {
            index,
            shared,
            to,
            staged: (0..shards).map(|_| Vec::new()).collect(),
            free: vec![0; shards],
            from,
            local: VecDeque::new(),
            dirty: vec![false; shards],
            dirty_list: Vec::new(),
            members: HashMap::default(),
            holdings: HashMap::default(),
            name_cache: HashMap::default(),
            cache_released: 0,
            pending: HashMap::default(),
            wake_backplane: false,
        }
    }

    /// This shard's index.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Sends `env` towards `shard`; on a full queue the message is dropped and counted.
    fn push(&mut self, shard: usize, env: Envelope<M>) -> Result<(), RegistryError> {
        let stats = &self.shared.stats[self.index];
        if shard == self.index {
            if self.local.len() >= self.shared.capacity {
                stats.dropped_full.add(1);
                return Err(RegistryError::Full);
            }
            self.local.push_back(env);
            return Ok(());
        }
        let Some(producer) = self.to[shard].as_ref() else {
            return Err(RegistryError::Unavailable);
        };
        let staged = &mut self.staged[shard];
        if staged.len() >= self.free[shard] {
            self.free[shard] = producer.slots();
            if staged.len() >= self.free[shard] {
                stats.dropped_full.add(1);
                return Err(RegistryError::Full);
            }
        }
        staged.push(env);
        stats.forwarded.add(1);
        if !self.dirty[shard] {
            self.dirty[shard] = true;
            self.dirty_list.push(shard);
        }
        Ok(())
    }

    /// Shards this one pushed to since the last call, for which the caller must then
    /// call [`crate::Wakeup::notify`] (and wake those it answers `true` for).
    /// Moves the messages staged this turn into their queues first: call it once per
    /// turn, after the turn's sends.
    pub fn take_wakeups(&mut self, mut each: impl FnMut(usize)) {
        if std::mem::take(&mut self.wake_backplane)
            && let Some(c) = &self.shared.cluster
        {
            c.wake();
        }
        for shard in self.dirty_list.drain(..) {
            self.dirty[shard] = false;
            let staged = &mut self.staged[shard];
            let n = staged.len();
            if let Some(producer) = self.to[shard].as_mut() {
                // `push` counted on at most `free` slots, so the chunk fits.
                if let Ok(chunk) = producer.write_chunk_uninit(n) {
                    chunk.fill_from_iter(staged.drain(..));
                }
            }
            self.free[shard] = self.free[shard].saturating_sub(n);
            staged.clear();
            each(shard);
        }
    }

    /// Whether anything waits in this shard's inbound queues.
    pub fn has_inbound(&self) -> bool {
        !self.local.is_empty()
            || !self.shared.decisions[self.index].is_empty()
            || self.from.iter().flatten().any(|c| !c.is_empty())
            || !self.shared.foreign[self.index].is_empty()
    }

    /// How many envelopes wait in this shard's inbound queues (for the metrics).
    pub fn inbound_len(&self) -> usize {
        self.local.len()
            + self.shared.decisions[self.index].len()
            + self.from.iter().flatten().map(|c| c.slots()).sum::<usize>()
            + self.shared.foreign[self.index].len()
    }

    /// Takes up to `max` envelopes from the inbound queues (local, other shards, foreign
    /// threads, in turn) and fans group messages out to this shard's members, appending
    /// to `out`. Returns how many envelopes were taken.
    pub fn take_inbound(&mut self, max: usize, out: &mut Vec<Inbound<M>>) -> usize {
        self.take_decisions(out);
        let mut taken = 0;
        while taken < max {
            let Some(env) = self.local.pop_front() else {
                break;
            };
            taken += 1;
            Self::fan_out(&self.members, env, out);
        }
        for s in 0..self.from.len() {
            let Some(consumer) = self.from[s].as_mut() else {
                continue;
            };
            // One chunk per queue: the consumer's head moves (a store the producer
            // sees) once per batch instead of once per message.
            let n = consumer.slots().min(max - taken);
            if n == 0 {
                continue;
            }
            let Ok(chunk) = consumer.read_chunk(n) else {
                continue;
            };
            taken += n;
            for env in chunk {
                Self::fan_out(&self.members, env, out);
            }
        }
        while taken < max {
            let Some(env) = self.shared.foreign[self.index].pop() else {
                break;
            };
            taken += 1;
            Self::fan_out(&self.members, env, out);
        }
        self.shared.stats[self.index].received.add(taken as u64);
        taken
    }

    fn fan_out(
        members: &HashMap<u64, IndexSet<ConnId, Hasher>, Hasher>,
        env: Envelope<M>,
        out: &mut Vec<Inbound<M>>,
    ) {
        match env {
            Envelope::To(conn, msg) => out.push(Inbound::Message(conn, msg)),
            Envelope::Publish(group, msg) => {
                let Some(members) = members.get(&group.id) else {
                    return;
                };
                let Some((&last, rest)) = members.as_slice().split_last() else {
                    return;
                };
                out.extend(rest.iter().map(|&c| Inbound::Message(c, msg.clone())));
                out.push(Inbound::Message(last, msg));
            }
            Envelope::Frame(group, frame) => {
                let Some(members) = members.get(&group.id) else {
                    return;
                };
                match &*frame {
                    PublishedFrame::Data(data) => {
                        out.extend(members.iter().map(|&c| Inbound::Frame(c, Arc::clone(data))))
                    }
                    PublishedFrame::Close(close) => {
                        out.extend(members.iter().map(|&c| Inbound::Close(c, close.clone())))
                    }
                }
            }
        }
    }

    /// Turns the claim decisions the backplane sent into what the engine acts on.
    fn take_decisions(&mut self, out: &mut Vec<Inbound<M>>) {
        while let Some(d) = self.shared.decisions[self.index].pop() {
            if let Some(p) = self.pending.get_mut(&d.conn) {
                let Some(at) = p.names.iter().position(|n| *n == d.name) else {
                    continue;
                };
                p.names.swap_remove(at);
                if !d.won {
                    p.lost.get_or_insert(d.name);
                }
                if p.names.is_empty() {
                    let lost = p.lost.take();
                    self.pending.remove(&d.conn);
                    out.push(Inbound::NamesDecided(d.conn, lost));
                }
                continue;
            }
            if d.won {
                continue;
            }
            let Some(h) = self.holdings.get_mut(&d.conn) else {
                continue; // the connection ended meanwhile
            };
            let before = h.names.len();
            h.names.retain(|n| *n != d.name);
            if h.names.len() < before {
                out.push(Inbound::NameLost(d.conn, d.name));
            }
        }
    }

    /// After `connect` claimed `names` for `conn` (through [`kythera_handler_api::Conn`]):
    /// `true` if the handshake must wait for Redis to decide them
    /// ([`Inbound::NamesDecided`] follows); `false` if it can go on (a gear that
    /// stays on this node, or Redis cannot be reached: the claims are then settled
    /// when it can, with the rule for names claimed from callbacks).
    pub fn await_names(&mut self, conn: ConnId, names: &[Box<str>]) -> bool {
        let Some(c) = &self.shared.cluster else {
            return false;
        };
        if names.is_empty() || !c.link.is_connected() {
            return false;
        }
        self.pending.insert(
            conn,
            Pending {
                names: names.to_vec(),
                lost: None,
            },
        );
        true
    }

    /// A message taken from the queues found no live connection (it ended meanwhile):
    /// counted as dropped.
    pub fn undeliverable(&self, n: u64) {
        self.shared.stats[self.index].dropped_gone.add(n);
    }

    /// Records names that `connect` registered through [`kythera_handler_api::Conn`], so that
    /// the connection's end frees them.
    pub fn adopt_names(&mut self, conn: ConnId, names: Vec<Box<str>>) {
        if names.is_empty() {
            return;
        }
        let holdings = self.holdings.entry(conn).or_default();
        for name in names {
            if !holdings.names.contains(&name) {
                holdings.names.push(name);
            }
        }
    }

    /// Registers `name` for `conn`, a connection handed over from another process in a
    /// live handover, which held the name there until now: in a cluster the claim
    /// wins over that process's entry even if its release has not reached Redis yet.
    pub fn register_moved(&mut self, conn: ConnId, name: &str) -> Result<(), RegistryError> {
        self.claim(conn, name, true)
    }

    fn claim(&mut self, conn: ConnId, name: &str, moved: bool) -> Result<(), RegistryError> {
        self.check_own(conn)?;
        self.shared.register(conn, name, moved)?;
        let holdings = self.holdings.entry(conn).or_default();
        if !holdings.names.iter().any(|n| &**n == name) {
            holdings.names.push(name.into());
        }
        Ok(())
    }

    /// The names and groups `conn` holds (groups by name), freeing the names: for a
    /// connection leaving the process in a live handover, whose new process takes the
    /// same names and joins the same groups. Its memberships stay here until
    /// [`ShardRegistry::remove_conn`] (publishes meanwhile are counted as dropped for
    /// it), and, unlike with `remove_conn`, its connection handles stay open: should
    /// the connection stay after all, it gets its names back and its handles still
    /// reach it.
    pub fn take_holdings(&mut self, conn: ConnId) -> (Vec<Box<str>>, Vec<Box<str>>) {
        let Some(h) = self.holdings.get_mut(&conn) else {
            return (Vec::new(), Vec::new());
        };
        let names = std::mem::take(&mut h.names);
        for name in &names {
            let _ = self.shared.unregister(conn, name);
        }
        // Memberships stay until the connection is gone for good (`remove_conn`):
        // meanwhile what is published to its groups finds it, and, as it cannot be
        // delivered, is counted as dropped rather than missed without a trace.
        let group_names = h.groups.iter().map(|g| g.name.clone()).collect();
        (names, group_names)
    }

    /// Frees everything `conn` holds: its names and memberships. Called when the
    /// connection terminates (before and after its `terminate` callback).
    pub fn remove_conn(&mut self, conn: ConnId) {
        self.pending.remove(&conn);
        let Some(holdings) = self.holdings.remove(&conn) else {
            return;
        };
        for name in &holdings.names {
            let _ = self.shared.unregister(conn, name);
        }
        for group in holdings.groups {
            self.drop_membership(conn, &group);
        }
        if let Some(target) = holdings.target {
            target.close();
        }
    }

    fn drop_membership(&mut self, conn: ConnId, group: &Arc<Group>) {
        if let Some(set) = self.members.get_mut(&group.id) {
            set.swap_remove(&conn);
            if set.is_empty() {
                self.members.remove(&group.id);
            }
        }
        self.shared.groups.member_left(group, self.index);
        self.shared.membership_changed(&group.name);
    }

    /// Who holds `name`, through the cache.
    fn holder(&mut self, name: &str) -> Option<ConnId> {
        // Read the count first: if a name is given up after this, the next call sees
        // a new count and starts over, so a stale entry lives at most until then (as
        // a lookup that raced with the unregister would).
        let released = self.shared.released();
        if released != self.cache_released {
            self.name_cache.clear();
            self.cache_released = released;
        }
        if let Some(&conn) = self.name_cache.get(name) {
            return Some(conn);
        }
        let conn = self.shared.lookup(name)?;
        if self.name_cache.len() >= NAME_CACHE_MAX {
            self.name_cache.clear();
        }
        self.name_cache.insert(name.into(), conn);
        Some(conn)
    }

    fn check_own(&self, conn: ConnId) -> Result<(), RegistryError> {
        if usize::from(conn.shard()) == self.index {
            Ok(())
        } else {
            Err(RegistryError::Unavailable)
        }
    }

    /// Members of groups on this shard, for tests and metrics.
    pub fn local_members(&self, group: &str) -> usize {
        self.shared
            .groups
            .get(group)
            .and_then(|g| self.members.get(&g.id).map(IndexSet::len))
            .unwrap_or(0)
    }
}

impl<M: Clone + Send + 'static> RegistryOps<M> for ShardRegistry<M> {
    fn register(&mut self, conn: ConnId, name: &str) -> Result<(), RegistryError> {
        self.claim(conn, name, false)
    }

    fn unregister(&mut self, conn: ConnId, name: &str) -> Result<(), RegistryError> {
        self.check_own(conn)?;
        self.shared.unregister(conn, name)?;
        if let Some(h) = self.holdings.get_mut(&conn) {
            h.names.retain(|n| &**n != name);
        }
        Ok(())
    }

    fn lookup(&mut self, name: &str) -> Result<Option<ConnId>, RegistryError> {
        Ok(self.holder(name))
    }

    fn send_message(&mut self, name: &str, msg: M) -> Result<bool, RegistryError> {
        let Some(target) = self.holder(name) else {
            return Ok(false);
        };
        if target.is_remote() {
            let Some(c) = &self.shared.cluster else {
                return Ok(false);
            };
            let Some(remote) = c.replica.target(target) else {
                return Ok(false); // gone since the cache was filled
            };
            c.send(Out::To(remote, msg))?;
            self.wake_backplane = true;
            return Ok(true);
        }
        self.push(usize::from(target.shard()), Envelope::To(target, msg))?;
        Ok(true)
    }

    fn join(&mut self, conn: ConnId, group: &str) -> Result<(), RegistryError> {
        self.check_own(conn)?;
        let members = &self.members;
        let (group, added) = self.shared.groups.join(group, self.index, |g| {
            members.get(&g.id).is_some_and(|m| m.contains(&conn))
        })?;
        if added {
            self.members.entry(group.id).or_default().insert(conn);
            self.shared.membership_changed(&group.name);
            self.holdings.entry(conn).or_default().groups.push(group);
        }
        Ok(())
    }

    fn leave(&mut self, conn: ConnId, group: &str) -> Result<(), RegistryError> {
        self.check_own(conn)?;
        let holdings = self
            .holdings
            .get_mut(&conn)
            .ok_or(RegistryError::NotInGroup)?;
        let at = holdings
            .groups
            .iter()
            .position(|g| &*g.name == group)
            .ok_or(RegistryError::NotInGroup)?;
        let g = holdings.groups.swap_remove(at);
        self.drop_membership(conn, &g);
        Ok(())
    }

    fn publish(&mut self, group: &str, msg: M) -> Result<usize, RegistryError> {
        let remote = self
            .shared
            .publish_remote(group, || Out::Publish(group.into(), msg.clone()));
        self.wake_backplane |= remote > 0;
        self.shared.relay.message();
        let Some(g) = self.shared.groups.get(group) else {
            return Ok(remote);
        };
        Ok(remote
            + to_each_shard(&g, msg, |shard, m| {
                self.push(shard, Envelope::Publish(Arc::clone(&g), m))
                    .is_ok()
            }))
    }

    fn publish_frame(&mut self, group: &str, frame: Frame) -> Result<usize, RegistryError> {
        let remote = self
            .shared
            .publish_remote(group, || Out::Frame(group.into(), frame.clone()));
        self.wake_backplane |= remote > 0;
        self.shared.relay.frame(group, &frame);
        let Some(g) = self.shared.groups.get(group) else {
            return Ok(remote);
        };
        let frame = Arc::new(self.shared.prepare(frame));
        Ok(remote
            + to_each_shard(&g, frame, |shard, f| {
                self.push(shard, Envelope::Frame(Arc::clone(&g), f)).is_ok()
            }))
    }

    fn count(&mut self, group: &str) -> Result<usize, RegistryError> {
        Ok(self.shared.count(group))
    }

    fn handle(&mut self, conn: ConnId) -> Result<ConnHandle<M>, RegistryError> {
        self.check_own(conn)?;
        let shared = &self.shared;
        let target = self
            .holdings
            .entry(conn)
            .or_default()
            .target
            .get_or_insert_with(|| Arc::new(ConnTarget::new(Arc::clone(shared))));
        Ok(ConnHandle::new(
            conn,
            Arc::clone(target) as Arc<dyn Deliver<M>>,
        ))
    }
}
