//! The backplane's thread: connects to Redis, keeps this node's names, memberships and
//! liveness there, sends what the gears queued for other nodes and delivers what
//! other nodes sent.
//!
//! One loop, one connection, nothing in parallel: it waits for a push from Redis, a
//! wake-up from a shard (something was queued) or the heartbeat tick; handles what
//! came; then flushes everything queued as one round trip (one pipeline on a single
//! Redis). Whatever shards queue during that round trip goes out in the next one, so
//! batches grow with the load and Redis commands grow with flushes, not messages.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use kythera_handler_api::{CloseCode, CloseFrame, Frame, Utf8Bytes};
use kythera_registry::cluster::{
    ClusterGear, Control, DropCause, Incoming, NodeIdx, Outgoing, RemoteConn,
};
use redis::{Cmd, PushInfo, PushKind, RedisResult, Value};
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{debug, info, warn};

use crate::connection::Connection;
use crate::keys::{self, GearKeys};
use crate::scripts::{self, Change};
use crate::wire::{self, BatchWriter, Item};
use crate::{Shared, Stats};

/// The first wait before connecting again, doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between attempts to connect.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Messages taken from one gear's outbox per flush (the rest go in the next one).
const MAX_OUTGOING: usize = 16 * 1024;
/// Arguments of one `APPLY` call (3 per operation).
const MAX_APPLY_ARGS: usize = 3 * 2048;
/// Pushes handled before flushing.
const MAX_PUSHES: usize = 4096;
/// How often dropped messages are logged at most.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

/// Runs the backplane on this thread until it is stopped.
pub(crate) fn run(shared: Arc<Shared>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn!(error = %e, "cluster: cannot start the backplane's runtime; this node stays alone");
            return;
        }
    };
    let _node = tracing::info_span!("node", id = %shared.config.node_id).entered();
    runtime.block_on(Driver::new(shared).run());
}

/// One gear as the driver keeps it.
struct GearState {
    gear: Arc<dyn ClusterGear>,
    keys: GearKeys,
    /// The number of the last event applied.
    seq: u64,
    /// Must be read again from Redis and reconciled: new, an event was missed, or this
    /// node was declared dead.
    stale: bool,
    /// Group channels subscribed, by group.
    subscribed: HashMap<Box<str>, String>,
    /// Member counts last announced, by group.
    announced: HashMap<Box<str>, usize>,
}

/// The SHA-1s of the loaded scripts.
#[derive(Default)]
struct Shas {
    apply: String,
    snapshot: String,
    gone: String,
}

/// What a pipeline's replies are for.
enum Reply {
    /// An `APPLY` call with these claims (gear, name, conn), in order.
    Apply(usize, Vec<(Box<str>, kythera_handler_api::ConnId)>),
    /// A publish of this many messages.
    Publish(u64),
}

struct Driver {
    shared: Arc<Shared>,
    node: String,
    node_channel: String,
    alive: String,
    started_ms: u64,
    ttl: Duration,
    gears: Vec<GearState>,
    by_key: HashMap<String, usize>,
    /// Event channel → gear.
    events: HashMap<String, usize>,
    /// Group channel → gear.
    group_channels: HashMap<String, usize>,
    node_channels: HashMap<NodeIdx, String>,
    shas: Shas,
    publish: &'static str,
    control: Vec<Control>,
    /// The connection's pushes (set while a session runs): handled while a flush
    /// waits for its replies too, so that what other nodes send does not wait for
    /// this node's round trip.
    pushes: Option<UnboundedReceiver<PushInfo>>,
    drops_logged: Vec<u64>,
    drops_logged_at: Instant,
    /// The node id this process takes over from a running process (a live handover),
    /// while it runs under a temporary id: taken once that process has left.
    succeeding: Option<String>,
    /// The node whose names `M` claims (names that came with handed-over connections)
    /// may take: the node taken over while this process runs under its temporary id,
    /// the temporary id while the node is taken over.
    alias: Option<String>,
    /// The temporary id this process ran under before it took its node id over, and
    /// that id's node channel while still subscribed: what was sent there meanwhile
    /// is this process's own.
    former: Option<(String, Option<String>)>,
    /// The index the node taken over had while this process ran under its temporary
    /// id: messages still addressed to it were meant for the old process's
    /// connections, whose ids may be this process's too; they are dropped.
    retired: Option<NodeIdx>,
}

/// An error of our own making, as redis-rs reports its own.
fn io_error(what: &'static str) -> redis::RedisError {
    redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::ConnectionReset,
        what,
    ))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Driver {
    fn new(shared: Arc<Shared>) -> Driver {
        // The temporary id while taking over a node; the node id otherwise.
        let node = shared.link.node_id().to_string();
        let succeeding = (node != shared.config.node_id).then(|| shared.config.node_id.clone());
        Driver {
            alias: succeeding.clone(),
            succeeding,
            former: None,
            retired: None,
            node_channel: keys::node_channel(&node),
            alive: keys::alive_key(&node),
            started_ms: now_ms(),
            ttl: shared.config.ttl,
            node,
            shared,
            gears: Vec::new(),
            by_key: HashMap::new(),
            events: HashMap::new(),
            group_channels: HashMap::new(),
            node_channels: HashMap::new(),
            shas: Shas::default(),
            publish: "PUBLISH",
            control: Vec::new(),
            pushes: None,
            drops_logged: Vec::new(),
            drops_logged_at: Instant::now(),
        }
    }

    /// Whether `node` is this process: its node id, or the temporary id it ran under
    /// while it took the node over.
    fn is_self(&self, node: &str) -> bool {
        is_self(node, &self.node, &self.former)
    }

    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }

    async fn run(mut self) {
        let mut backoff = MIN_BACKOFF;
        let mut connected_once = false;
        let mut failing_since: Option<Instant> = None;
        let mut last_warned = Instant::now();
        loop {
            if self.stopping() {
                return;
            }
            self.adopt_new_gears();
            match Connection::open(&self.shared.config.redis).await {
                Ok((conn, pushes)) => {
                    if connected_once {
                        Stats::add(&self.shared.stats.reconnects, 1);
                    }
                    let outage = failing_since.take().map(|t| t.elapsed());
                    match self.session(conn, pushes, outage).await {
                        Ok(()) => return,
                        Err(e) => {
                            self.shared.link.set_connected(false);
                            warn!(node = %self.node, error = %e, "cluster: lost Redis; serving this node's connections alone meanwhile, reconnecting");
                            failing_since = Some(Instant::now());
                            last_warned = Instant::now();
                        }
                    }
                    connected_once = true;
                    backoff = MIN_BACKOFF;
                }
                Err(e) => {
                    if failing_since.is_none() {
                        failing_since = Some(Instant::now());
                        last_warned = Instant::now();
                        warn!(node = %self.node, redis = ?self.shared.config.redis, error = %e, "cluster: cannot reach Redis; serving this node's connections alone meanwhile, retrying");
                    } else if last_warned.elapsed() >= Duration::from_secs(30) {
                        last_warned = Instant::now();
                        warn!(node = %self.node, redis = ?self.shared.config.redis, error = %e, down_for_s = failing_since.map_or(0, |t| t.elapsed().as_secs()), "cluster: still cannot reach Redis, retrying");
                    } else {
                        debug!(error = %e, "cluster: connecting to Redis failed");
                    }
                }
            }
            self.wait_disconnected(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Waits `d` without Redis, keeping the queues empty: claims are decided locally
    /// (re-announced on reconnection), messages for other nodes are dropped and
    /// counted, membership changes are left to the reconciliation.
    async fn wait_disconnected(&mut self, d: Duration) {
        let deadline = tokio::time::Instant::now() + d;
        let shared = Arc::clone(&self.shared);
        loop {
            self.adopt_new_gears();
            self.discard_queued();
            if self.stopping() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = shared.notify.notified() => {}
            }
        }
    }

    fn discard_queued(&mut self) {
        for gs in &self.gears {
            self.control.clear();
            gs.gear.take_control(&mut self.control);
            for c in self.control.drain(..) {
                if let Control::Claim { name, conn, .. } = c {
                    gs.gear.claim_decided(&name, conn, true);
                }
            }
            let n = gs.gear.take_outgoing(usize::MAX, &mut |_| {});
            self.shared.link.dropped(DropCause::Disconnected, n as u64);
        }
    }

    fn adopt_new_gears(&mut self) {
        let Ok(gears) = self.shared.gears.lock() else {
            return;
        };
        for gear in gears.iter().skip(self.gears.len()) {
            self.by_key.insert(gear.key().to_owned(), self.gears.len());
            self.gears.push(GearState {
                keys: GearKeys::new(gear.key()),
                gear: Arc::clone(gear),
                seq: 0,
                stale: true,
                subscribed: HashMap::new(),
                announced: HashMap::new(),
            });
        }
    }

    /// One connection's life: set up, then serve until it fails or the node stops.
    async fn session(
        &mut self,
        conn: Connection,
        pushes: UnboundedReceiver<PushInfo>,
        outage: Option<Duration>,
    ) -> RedisResult<()> {
        self.pushes = Some(pushes);
        let result = self.serve(conn, outage).await;
        self.pushes = None;
        result
    }

    async fn serve(&mut self, mut conn: Connection, outage: Option<Duration>) -> RedisResult<()> {
        self.publish = conn.publish_command();
        self.shas = Shas {
            apply: conn.load_script(&scripts::source(scripts::APPLY)).await?,
            snapshot: conn
                .load_script(&scripts::source(scripts::SNAPSHOT))
                .await?,
            gone: conn.load_script(&scripts::source(scripts::GONE)).await?,
        };
        conn.subscribe(&self.node_channel).await?;
        // Subscriptions went with the old connection.
        if let Some((_, channel)) = &mut self.former {
            *channel = None;
        }
        self.events.clear();
        self.group_channels.clear();
        for gs in &mut self.gears {
            gs.subscribed.clear();
            gs.announced.clear();
            gs.stale = true;
        }
        self.heartbeat(&mut conn, true).await?;
        self.sync_stale(&mut conn).await?;
        self.check_nodes(&mut conn).await?;
        self.take_over_node(&mut conn).await?;
        self.shared.link.set_connected(true);
        info!(
            node = %self.node,
            redis = ?self.shared.config.redis,
            redis_cluster = conn.is_cluster(),
            after_outage_ms = outage.map(|d| d.as_millis() as u64),
            "cluster: connected to Redis"
        );
        let shared = Arc::clone(&self.shared);
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        enum Event {
            Push(Option<PushInfo>),
            Wake,
            Tick,
        }
        loop {
            let Some(pushes) = self.pushes.as_mut() else {
                return Err(io_error("no push channel"));
            };
            let event = tokio::select! {
                biased;
                push = pushes.recv() => Event::Push(push),
                _ = shared.notify.notified() => Event::Wake,
                _ = tick.tick() => Event::Tick,
            };
            match event {
                Event::Push(None) => return Err(io_error("Redis closed the connection")),
                Event::Push(Some(push)) => {
                    self.on_push(push)?;
                    self.take_pushes()?;
                }
                Event::Wake => {}
                Event::Tick => {
                    self.heartbeat(&mut conn, false).await?;
                    self.check_nodes(&mut conn).await?;
                    self.take_over_node(&mut conn).await?;
                    self.log_drops();
                }
            }
            if self.stopping() {
                self.leave(&mut conn).await;
                return Ok(());
            }
            self.adopt_new_gears();
            self.sync_stale(&mut conn).await?;
            self.flush(&mut conn).await?;
        }
    }

    // ----- from Redis -----

    /// Handles the pushes already received, up to [`MAX_PUSHES`].
    fn take_pushes(&mut self) -> RedisResult<()> {
        for _ in 0..MAX_PUSHES {
            let Some(push) = self.pushes.as_mut().and_then(|p| p.try_recv().ok()) else {
                break;
            };
            self.on_push(push)?;
        }
        Ok(())
    }

    fn on_push(&mut self, push: PushInfo) -> RedisResult<()> {
        match push.kind {
            PushKind::Disconnection => Err(io_error("the connection to Redis was closed")),
            PushKind::Message | PushKind::SMessage => {
                let mut data = push.data.into_iter();
                let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
                    (data.next(), data.next())
                else {
                    return Ok(());
                };
                Stats::add(&self.shared.stats.bytes_received, payload.len() as u64);
                let channel = String::from_utf8_lossy(&channel);
                if channel == self.node_channel
                    || self.former.as_ref().and_then(|(_, c)| c.as_deref()) == Some(&*channel)
                {
                    self.deliver_batch(&payload, false);
                } else if let Some(&g) = self.events.get(&*channel) {
                    self.on_event(g, &payload);
                } else if self.group_channels.contains_key(&*channel) {
                    self.deliver_batch(&payload, true);
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Delivers a batch from another node (`group`: published to a group channel, where
    /// this node's own batches come back and are skipped).
    fn deliver_batch(&self, payload: &[u8], group: bool) {
        let link = &self.shared.link;
        let Some(batch) = wire::decode(payload) else {
            link.dropped(DropCause::Undecodable, 1);
            return;
        };
        if group && self.is_self(batch.from) {
            return;
        }
        Stats::add(
            &self.shared.stats.messages_received,
            batch.items.len() as u64,
        );
        for item in batch.items {
            let (gear, incoming) = match item {
                Item::To { gear, conn, msg } => (gear, Incoming::To { conn, msg }),
                Item::Publish { gear, group, msg } => (gear, Incoming::Publish { group, msg }),
                Item::Frame {
                    gear,
                    group,
                    kind,
                    code,
                    payload,
                } => match frame_of(kind, code, payload) {
                    Some(frame) => (gear, Incoming::Frame { group, frame }),
                    None => {
                        link.dropped(DropCause::Undecodable, 1);
                        continue;
                    }
                },
            };
            let Some(&g) = self.by_key.get(gear) else {
                link.dropped(DropCause::Unknown, 1);
                continue;
            };
            if let Err(cause) = self.gears[g].gear.deliver(incoming) {
                link.dropped(cause, 1);
            }
        }
    }

    fn on_event(&mut self, g: usize, payload: &[u8]) {
        Stats::add(&self.shared.stats.events, 1);
        let gs = &mut self.gears[g];
        if gs.stale {
            return; // the snapshot to come covers it
        }
        let Some(event) = scripts::parse_event(payload) else {
            warn!(gear = %gs.keys.names, "cluster: malformed event; reading the gear's state again");
            gs.stale = true;
            return;
        };
        if event.seq <= gs.seq {
            return;
        }
        if event.seq != gs.seq + 1 {
            debug!(
                gear = gs.gear.key(),
                have = gs.seq,
                got = event.seq,
                "cluster: missed events; reading the gear's state again"
            );
            gs.stale = true;
            return;
        }
        gs.seq = event.seq;
        let is_self = |node: &str| is_self(node, &self.node, &self.former);
        let nodes = self.shared.link.nodes();
        let replica = gs.gear.replica();
        for change in event.changes {
            match change {
                Change::Claim { name, node, conn } => {
                    if is_self(node) {
                        // Ours now: a moved name's claim may have taken it from the
                        // process it came from before that one's release.
                        replica.remove_name(name);
                    } else if let Some(node) = nodes.intern(node) {
                        replica.set_name(name, RemoteConn { node, conn });
                    }
                }
                Change::Release { name } => replica.remove_name(name),
                Change::Count { node, group, count } => {
                    if !is_self(node)
                        && let Some(node) = nodes.intern(node)
                    {
                        replica.set_count(group, node, count);
                    }
                }
                // This process's temporary id, given up (`take_over_node`).
                Change::Gone { node } if is_self(node) && node != self.node => {}
                Change::Gone { node } if node == self.node => {
                    warn!(node = %self.node, gear = gs.gear.key(), "cluster: another node removed this node's names and memberships (its liveness key had expired); announcing them again");
                    gs.stale = true;
                }
                Change::Gone { node } => {
                    if let Some(node) = nodes.find(node) {
                        replica.remove_node(node);
                    }
                }
            }
        }
    }

    // ----- the gears' state in Redis -----

    /// Reads every stale gear's state from Redis and reconciles this node's part.
    async fn sync_stale(&mut self, conn: &mut Connection) -> RedisResult<()> {
        for g in 0..self.gears.len() {
            if !self.gears[g].stale {
                continue;
            }
            let events = self.gears[g].keys.events.clone();
            if let std::collections::hash_map::Entry::Vacant(e) = self.events.entry(events) {
                conn.subscribe(e.key()).await?;
                e.insert(g);
            }
            let reply = {
                let k = &self.gears[g].keys;
                let cmd = redis::cmd("EVALSHA")
                    .arg(&self.shas.snapshot)
                    .arg(3)
                    .arg(&k.names)
                    .arg(&k.groups)
                    .arg(&k.seq)
                    .clone();
                conn.run(&[cmd]).await?
            };
            Stats::add(&self.shared.stats.resyncs, 1);
            let (own_names, own_groups) = self.load_snapshot(g, reply.into_iter().next())?;
            self.reconcile(g, own_names, own_groups, conn).await?;
        }
        Ok(())
    }

    /// Replaces gear `g`'s replica with a snapshot; returns this node's own entries.
    #[allow(clippy::type_complexity)]
    fn load_snapshot(
        &mut self,
        g: usize,
        reply: Option<Value>,
    ) -> RedisResult<(Vec<(Box<str>, u64)>, Vec<Box<str>>)> {
        let Some(Value::Array(parts)) = reply else {
            return Err(io_error("unexpected snapshot reply"));
        };
        let mut parts = parts.into_iter();
        let seq: u64 = match parts.next() {
            Some(v) => redis::from_redis_value(v)?,
            None => 0,
        };
        let flat = |v: Option<Value>| -> Vec<Vec<u8>> {
            match v {
                Some(Value::Array(items)) => items
                    .into_iter()
                    .filter_map(|i| match i {
                        Value::BulkString(b) => Some(b),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            }
        };
        let names = flat(parts.next());
        let groups = flat(parts.next());
        let gs = &mut self.gears[g];
        let is_self = |node: &str| is_self(node, &self.node, &self.former);
        let nodes = self.shared.link.nodes();
        let replica = gs.gear.replica();
        replica.clear();
        let mut own_names = Vec::new();
        let mut own_groups = Vec::new();
        for pair in names.chunks_exact(2) {
            let (Ok(name), Some((node, conn))) = (
                std::str::from_utf8(&pair[0]),
                scripts::parse_holder(&pair[1]),
            ) else {
                continue;
            };
            // The temporary id's entries are neither this node's to reconcile nor
            // another node's: they are claimed again as this node's, or removed.
            if is_self(node) {
                if node == self.node {
                    own_names.push((name.into(), conn));
                }
            } else if let Some(node) = nodes.intern(node) {
                replica.set_name(name, RemoteConn { node, conn });
            }
        }
        for pair in groups.chunks_exact(2) {
            let (Some((node, group)), Some(count)) = (
                scripts::parse_group_field(&pair[0]),
                std::str::from_utf8(&pair[1])
                    .ok()
                    .and_then(|c| c.parse::<usize>().ok()),
            ) else {
                continue;
            };
            if is_self(node) {
                if node == self.node {
                    own_groups.push(group.into());
                }
            } else if let Some(node) = nodes.intern(node) {
                replica.set_count(group, node, count);
            }
        }
        gs.seq = seq;
        gs.stale = false;
        Ok((own_names, own_groups))
    }

    /// Makes Redis hold exactly what this node's connections hold in gear `g`: claims
    /// every local name (a name another node took meanwhile is lost here: its
    /// connection is told), releases what Redis still has of this node and nobody here
    /// holds, and announces every local member count.
    async fn reconcile(
        &mut self,
        g: usize,
        own_names: Vec<(Box<str>, u64)>,
        own_groups: Vec<Box<str>>,
        conn: &mut Connection,
    ) -> RedisResult<()> {
        let gear = Arc::clone(&self.gears[g].gear);
        let mut local = Vec::new();
        gear.local_names(&mut local);
        let held: HashSet<(&str, u64)> = local.iter().map(|(n, c)| (&**n, c.get())).collect();
        let mut args: Vec<Vec<u8>> = Vec::new();
        let mut claims = Vec::new();
        for (name, c) in &own_names {
            if !held.contains(&(&**name, *c)) {
                push_op(&mut args, "R", name, &c.to_string());
            }
        }
        // Once the node is taken over, names go from the temporary id to the node id
        // (`M` claims, see `scripts::APPLY`) until the temporary id's entries are gone.
        let claim_op = if self.succeeding.is_none() && self.alias.is_some() {
            "M"
        } else {
            "C"
        };
        for (name, c) in &local {
            push_op(&mut args, claim_op, name, &c.get().to_string());
            claims.push((name.clone(), *c));
        }
        let mut groups = Vec::new();
        gear.local_groups(&mut groups);
        let counted: HashSet<&str> = groups.iter().map(|(n, _)| &**n).collect();
        for group in own_groups {
            if !counted.contains(&*group) {
                push_op(&mut args, "G", &group, "0");
            }
        }
        for (group, n) in &groups {
            self.subscribe_group(g, group, conn).await?;
            push_op(&mut args, "G", group, &n.to_string());
            self.gears[g].announced.insert(group.clone(), *n);
        }
        let mut cmds = Vec::new();
        let mut replies = Vec::new();
        self.apply_cmds(g, args, claims, &mut cmds, &mut replies);
        self.run_flush(conn, cmds, replies).await
    }

    /// `APPLY` calls for gear `g`'s operations `args`, at most [`MAX_APPLY_ARGS`]
    /// arguments each; `claims` are the claims among them, in order.
    fn apply_cmds(
        &self,
        g: usize,
        args: Vec<Vec<u8>>,
        claims: Vec<(Box<str>, kythera_handler_api::ConnId)>,
        cmds: &mut Vec<Cmd>,
        replies: &mut Vec<Reply>,
    ) {
        let k = &self.gears[g].keys;
        let mut claims = claims.into_iter();
        for chunk in args.chunks(MAX_APPLY_ARGS) {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(&self.shas.apply)
                .arg(3)
                .arg(&k.names)
                .arg(&k.groups)
                .arg(&k.seq)
                .arg(&k.events)
                .arg(self.publish)
                .arg(&self.node);
            if let Some(alias) = &self.alias {
                cmd.arg("A").arg(alias).arg("-");
            }
            let mut in_chunk = Vec::new();
            for op in chunk.chunks_exact(3) {
                if op[0] == b"C" || op[0] == b"M" {
                    in_chunk.extend(claims.next());
                }
                cmd.arg(&op[0]).arg(&op[1]).arg(&op[2]);
            }
            cmds.push(cmd);
            replies.push(Reply::Apply(g, in_chunk));
        }
    }

    async fn subscribe_group(
        &mut self,
        g: usize,
        group: &str,
        conn: &mut Connection,
    ) -> RedisResult<()> {
        let gs = &mut self.gears[g];
        if gs.subscribed.contains_key(group) {
            return Ok(());
        }
        let channel = gs.keys.group_channel(group);
        conn.subscribe(&channel).await?;
        self.group_channels.insert(channel.clone(), g);
        gs.subscribed.insert(group.into(), channel);
        Ok(())
    }

    // ----- to Redis -----

    /// Sends everything the gears queued: claims, releases and member counts (one
    /// `APPLY` per gear), and messages (one publish per target channel).
    async fn flush(&mut self, conn: &mut Connection) -> RedisResult<()> {
        let mut cmds = Vec::new();
        let mut replies = Vec::new();
        let mut unsubscribe = Vec::new();
        for g in 0..self.gears.len() {
            let gear = Arc::clone(&self.gears[g].gear);
            self.control.clear();
            gear.take_control(&mut self.control);
            if self.control.is_empty() {
                continue;
            }
            let mut args = Vec::new();
            let mut claims = Vec::new();
            let mut changed: Vec<Box<str>> = Vec::new();
            for c in std::mem::take(&mut self.control) {
                match c {
                    Control::Claim { name, conn, moved } => {
                        let op = if moved { "M" } else { "C" };
                        push_op(&mut args, op, &name, &conn.get().to_string());
                        claims.push((name, conn));
                    }
                    Control::Release { name, conn } => {
                        push_op(&mut args, "R", &name, &conn.get().to_string())
                    }
                    Control::Group(group) => {
                        if !changed.contains(&group) {
                            changed.push(group);
                        }
                    }
                }
            }
            for group in changed {
                let n = gear.local_count(&group);
                let before = self.gears[g].announced.get(&group).copied().unwrap_or(0);
                if n == before {
                    continue;
                }
                if n > 0 {
                    // Subscribed before the count is announced: a node that sees the
                    // count and publishes reaches this node.
                    self.subscribe_group(g, &group, conn).await?;
                    self.gears[g].announced.insert(group.clone(), n);
                } else {
                    self.gears[g].announced.remove(&group);
                    if let Some(channel) = self.gears[g].subscribed.remove(&group) {
                        unsubscribe.push(channel);
                    }
                }
                push_op(&mut args, "G", &group, &n.to_string());
            }
            if !args.is_empty() {
                self.apply_cmds(g, args, claims, &mut cmds, &mut replies);
            }
        }
        let more = self.take_messages(&mut cmds, &mut replies);
        self.run_flush(conn, cmds, replies).await?;
        for channel in unsubscribe {
            self.group_channels.remove(&channel);
            conn.unsubscribe(&channel).await?;
        }
        if more {
            self.shared.notify.notify_one();
        }
        Ok(())
    }

    /// Takes the gears' outboxes into batches, one publish each. Returns whether
    /// messages were left for the next flush.
    fn take_messages(&mut self, cmds: &mut Vec<Cmd>, replies: &mut Vec<Reply>) -> bool {
        let mut batches = Batches::default();
        let mut more = false;
        let link = Arc::clone(&self.shared.link);
        for gs in &self.gears {
            if !gs.gear.has_outgoing() {
                continue;
            }
            let key = gs.gear.key();
            let node_channels = &mut self.node_channels;
            let retired = self.retired;
            gs.gear.take_outgoing(MAX_OUTGOING, &mut |out| match out {
                Outgoing::To { node, .. } if Some(node) == retired => {
                    link.dropped(DropCause::Unknown, 1);
                }
                Outgoing::To { node, conn, msg } => {
                    let channel = match node_channels.get(&node) {
                        Some(c) => c,
                        None => {
                            let Some(name) = link.nodes().name(node) else {
                                link.dropped(DropCause::Unknown, 1);
                                return;
                            };
                            node_channels
                                .entry(node)
                                .or_insert_with(|| keys::node_channel(&name))
                        }
                    };
                    batches.push(
                        channel,
                        false,
                        &Item::To {
                            gear: key,
                            conn,
                            msg,
                        },
                    );
                }
                Outgoing::Publish { group, msg } => {
                    batches.push(
                        &gs.keys.group_channel(group),
                        true,
                        &Item::Publish {
                            gear: key,
                            group,
                            msg,
                        },
                    );
                }
                Outgoing::Frame { group, frame } => {
                    let (kind, code, payload): (u8, u16, &[u8]) = match frame {
                        Frame::Text(t) => (wire::FRAME_TEXT, 0, t.as_bytes()),
                        Frame::Binary(b) => (wire::FRAME_BINARY, 0, b),
                        Frame::Close(None) => (wire::FRAME_CLOSE, 0, b""),
                        Frame::Close(Some(c)) => {
                            (wire::FRAME_CLOSE, c.code.get(), c.reason.as_bytes())
                        }
                    };
                    batches.push(
                        &gs.keys.group_channel(group),
                        true,
                        &Item::Frame {
                            gear: key,
                            group,
                            kind,
                            code,
                            payload,
                        },
                    );
                }
            });
            more |= gs.gear.has_outgoing();
        }
        for (channel, batch) in batches.list {
            let n = batch.len() as u64;
            let bytes = batch.finish(&self.node);
            Stats::add(&self.shared.stats.bytes_sent, bytes.len() as u64);
            cmds.push(redis::cmd(self.publish).arg(channel).arg(bytes).clone());
            replies.push(Reply::Publish(n));
        }
        more
    }

    /// Runs one flush's commands and acts on the replies: claim outcomes go to the
    /// gears, batches nobody received are counted. If the connection fails, the claims
    /// count as won (they are re-announced on reconnection) and the messages as dropped.
    async fn run_flush(
        &mut self,
        conn: &mut Connection,
        cmds: Vec<Cmd>,
        replies: Vec<Reply>,
    ) -> RedisResult<()> {
        if cmds.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let result = {
            // Pushes are handled while the replies are awaited.
            let run = conn.run(&cmds);
            tokio::pin!(run);
            let mut pushes = self.pushes.take();
            let mut failed = None;
            let result = loop {
                let push = match pushes.as_mut() {
                    Some(rx) => tokio::select! {
                        biased;
                        r = &mut run => break r,
                        push = rx.recv() => push,
                    },
                    None => break run.await,
                };
                match push {
                    Some(push) => {
                        if let Err(e) = self.on_push(push) {
                            failed.get_or_insert(e);
                        }
                    }
                    None => {
                        failed.get_or_insert(io_error("Redis closed the connection"));
                        pushes = None;
                    }
                }
            };
            self.pushes = pushes;
            match failed {
                Some(e) => Err(e),
                None => result,
            }
        };
        let stats = &self.shared.stats;
        Stats::add(&stats.commands, cmds.len() as u64);
        let link = &self.shared.link;
        let values = match result {
            Ok(values) => values,
            Err(e) => {
                for reply in replies {
                    match reply {
                        Reply::Apply(g, claims) => {
                            for (name, c) in claims {
                                self.gears[g].gear.claim_decided(&name, c, true);
                            }
                        }
                        Reply::Publish(n) => link.dropped(DropCause::Disconnected, n),
                    }
                }
                return Err(e);
            }
        };
        self.shared
            .roundtrip
            .observe(started.elapsed().as_secs_f64());
        for (reply, value) in replies.into_iter().zip(values) {
            match reply {
                Reply::Apply(g, claims) => {
                    let won: Vec<i64> = redis::from_redis_value(value).unwrap_or_default();
                    for (i, (name, c)) in claims.into_iter().enumerate() {
                        self.gears[g].gear.claim_decided(
                            &name,
                            c,
                            won.get(i).is_none_or(|&w| w == 1),
                        );
                    }
                }
                Reply::Publish(n) => {
                    Stats::add(&stats.messages_sent, n);
                    let receivers: i64 = redis::from_redis_value(value).unwrap_or(1);
                    if receivers == 0 {
                        link.dropped(DropCause::NoReceiver, n);
                    }
                }
            }
        }
        Ok(())
    }

    // ----- liveness -----

    /// Refreshes this node's liveness key (and its entry in the node set). If the key
    /// had expired (the node was paused longer than the TTL, or Redis lost it), the
    /// others may have removed what this node held: every gear is announced again.
    async fn heartbeat(&mut self, conn: &mut Connection, first: bool) -> RedisResult<()> {
        let px = self.ttl.as_millis() as u64;
        let mut set = redis::cmd("SET");
        set.arg(&self.alive).arg(self.started_ms).arg("PX").arg(px);
        if !first {
            set.arg("XX");
        }
        let hset = redis::cmd("HSET")
            .arg(keys::NODES)
            .arg(&self.node)
            .arg(self.started_ms)
            .clone();
        let replies = conn.run(&[set, hset]).await?;
        Stats::add(&self.shared.stats.commands, 2);
        if !first && matches!(replies.first(), Some(Value::Nil)) {
            warn!(node = %self.node, "cluster: this node's liveness key had expired; announcing its names and memberships again");
            let set = redis::cmd("SET")
                .arg(&self.alive)
                .arg(self.started_ms)
                .arg("PX")
                .arg(px)
                .clone();
            conn.run(&[set]).await?;
            for gs in &mut self.gears {
                gs.stale = true;
            }
        }
        Ok(())
    }

    /// Finds nodes whose liveness key expired and removes what they held; refreshes
    /// the list of live nodes.
    async fn check_nodes(&mut self, conn: &mut Connection) -> RedisResult<()> {
        let all = conn
            .run(&[redis::cmd("HKEYS").arg(keys::NODES).clone()])
            .await?;
        let nodes: Vec<String> = match all.into_iter().next() {
            Some(v) => redis::from_redis_value(v)?,
            None => Vec::new(),
        };
        let others: Vec<&String> = nodes.iter().filter(|n| **n != self.node).collect();
        let exists: Vec<Cmd> = others
            .iter()
            .map(|n| redis::cmd("EXISTS").arg(keys::alive_key(n)).clone())
            .collect();
        let alive = conn.run(&exists).await?;
        Stats::add(&self.shared.stats.commands, 1 + exists.len() as u64);
        let mut live = vec![self.node.clone()];
        let mut gone = Vec::new();
        for (node, v) in others.into_iter().zip(alive) {
            if matches!(v, Value::Int(1)) {
                live.push(node.clone());
            } else {
                gone.push(node.clone());
            }
        }
        if !gone.is_empty() {
            let mut cmds = Vec::new();
            for node in &gone {
                for gs in &self.gears {
                    cmds.push(self.gone_cmd(&gs.keys, node));
                }
                cmds.push(redis::cmd("HDEL").arg(keys::NODES).arg(node).clone());
            }
            conn.run(&cmds).await?;
            Stats::add(&self.shared.stats.commands, cmds.len() as u64);
            Stats::add(&self.shared.stats.nodes_removed, gone.len() as u64);
            for node in &gone {
                info!(node = %self.node, gone = %node, "cluster: node is gone (its liveness key expired); its names and memberships were removed");
            }
        }
        live.sort();
        if let Ok(mut l) = self.shared.live.lock() {
            *l = live;
        }
        Ok(())
    }

    /// While this process runs under a temporary id to take a node over from a running
    /// process (a live handover), checks whether that process has left the cluster
    /// (the server said the handover is over, and the node's liveness key is gone: it
    /// left, or it died and expired; the key alone could also go while the old
    /// process is only cut off from Redis for longer than the TTL), and if so becomes
    /// that node: subscribes to its channel, refreshes its liveness key, claims every
    /// local name for it (taking them from the temporary id: `M` claims), announces
    /// every count under it, then removes the temporary id's entries and liveness (tried
    /// again at every tick until it succeeds). Other nodes see the names change holder
    /// and the counts change node; what they sent to the temporary id meanwhile still
    /// arrives, until the next reconnection. The old process's connection ids cannot
    /// reach this one: the node's channel had no subscriber in between.
    async fn take_over_node(&mut self, conn: &mut Connection) -> RedisResult<()> {
        if let Some(node) = self
            .succeeding
            .clone()
            .filter(|_| self.shared.predecessor_done.load(Ordering::Acquire))
        {
            let exists = redis::cmd("EXISTS").arg(keys::alive_key(&node)).clone();
            let alive = conn.run(&[exists]).await?;
            Stats::add(&self.shared.stats.commands, 1);
            if matches!(alive.first(), Some(Value::Int(1))) {
                return Ok(());
            }
            // What the node's last process said before it left (its `X` event) first.
            self.take_pushes()?;
            let temp = std::mem::replace(&mut self.node, node.clone());
            self.alive = keys::alive_key(&node);
            let temp_channel = std::mem::replace(&mut self.node_channel, keys::node_channel(&node));
            self.succeeding = None;
            self.alias = Some(temp.clone());
            self.former = Some((temp, Some(temp_channel)));
            self.retired = self.shared.link.nodes().rename_this(&node);
            if let Some(k) = self.retired {
                self.node_channels.remove(&k);
            }
            conn.subscribe(&self.node_channel).await?;
            self.heartbeat(conn, true).await?;
            for gs in &mut self.gears {
                gs.stale = true;
            }
        }
        let Some(temp) = self.alias.clone().filter(|_| self.succeeding.is_none()) else {
            return Ok(());
        };
        self.sync_stale(conn).await?;
        let mut cmds: Vec<Cmd> = self
            .gears
            .iter()
            .map(|gs| self.gone_cmd(&gs.keys, &temp))
            .collect();
        cmds.push(redis::cmd("DEL").arg(keys::alive_key(&temp)).clone());
        cmds.push(redis::cmd("HDEL").arg(keys::NODES).arg(&temp).clone());
        conn.run(&cmds).await?;
        Stats::add(&self.shared.stats.commands, cmds.len() as u64);
        self.alias = None;
        info!(node = %self.node, was = %temp, "cluster: took the node over from the process handed over from (it has left the cluster)");
        Ok(())
    }

    fn gone_cmd(&self, k: &GearKeys, node: &str) -> Cmd {
        redis::cmd("EVALSHA")
            .arg(&self.shas.gone)
            .arg(3)
            .arg(&k.names)
            .arg(&k.groups)
            .arg(&k.seq)
            .arg(&k.events)
            .arg(self.publish)
            .arg(node)
            .clone()
    }

    /// The node stops: what is still queued goes out, then this node's entries and
    /// liveness key are removed. Best effort: if Redis fails now, the others remove
    /// them once the key expires.
    async fn leave(&mut self, conn: &mut Connection) {
        if let Err(e) = self.flush(conn).await {
            debug!(error = %e, "cluster: last flush failed");
        }
        let gone: Vec<Cmd> = self
            .gears
            .iter()
            .map(|gs| self.gone_cmd(&gs.keys, &self.node))
            .collect();
        // The liveness key last, in a round trip of its own: a process taking this
        // node over waits for it to go (`take_over_node`), and on a Redis Cluster the
        // commands of one pipeline may run on different Redis nodes in any order.
        let alive = [
            redis::cmd("DEL").arg(&self.alive).clone(),
            redis::cmd("HDEL").arg(keys::NODES).arg(&self.node).clone(),
        ];
        let left = match conn.run(&gone).await {
            Ok(_) => conn.run(&alive).await,
            Err(e) => Err(e),
        };
        match left {
            Ok(_) => info!(node = %self.node, "cluster: left the cluster"),
            Err(e) => {
                warn!(node = %self.node, error = %e, "cluster: could not leave cleanly; the others remove this node once its liveness key expires")
            }
        }
        self.shared.link.set_connected(false);
    }

    /// Logs dropped messages, at most once per [`DROP_LOG_EVERY`].
    fn log_drops(&mut self) {
        if self.drops_logged_at.elapsed() < DROP_LOG_EVERY {
            return;
        }
        let drops = self.shared.link.drops();
        if self.drops_logged.len() != drops.len() {
            self.drops_logged = vec![0; drops.len()];
        }
        for ((cause, now), before) in DropCause::ALL
            .iter()
            .zip(drops)
            .zip(self.drops_logged.iter_mut())
        {
            if now > *before {
                warn!(node = %self.node, cause = cause.label(), dropped = now - *before, "cluster: messages between nodes dropped since the last report");
                *before = now;
            }
        }
        self.drops_logged_at = Instant::now();
    }
}

/// A flush's batches, in the order their publishes go out, so that what the outbox
/// held in one order arrives in that order wherever two batches may reach the same
/// connection (on a single Redis, publishes of one pipeline reach a subscriber in
/// order). A message joins its channel's open batch only if no batch that could reach
/// the same connections was started after it: nodes' channels reach disjoint
/// connections, but a group's channel may reach any connection, so a batch for a group
/// takes messages only while it is the newest, and a batch for a node only while no
/// group's batch came after it. Messages to several nodes, or to one group, keep one
/// batch per channel; mixed traffic is split where order requires.
#[derive(Default)]
struct Batches {
    list: Vec<(String, BatchWriter)>,
    open: HashMap<String, usize>,
    last_group: Option<usize>,
}

impl Batches {
    fn push(&mut self, channel: &str, group: bool, item: &Item<'_>) {
        let newest = self.list.len().checked_sub(1);
        let at = self.open.get(channel).copied().filter(|&i| {
            if group {
                Some(i) == newest
            } else {
                self.last_group.is_none_or(|g| g < i)
            }
        });
        let at = match at {
            Some(i) => i,
            None => {
                let i = self.list.len();
                self.list.push((channel.to_owned(), BatchWriter::default()));
                self.open.insert(channel.to_owned(), i);
                if group {
                    self.last_group = Some(i);
                }
                i
            }
        };
        self.list[at].1.push(item);
    }
}

/// Whether `node` is this process, whose node id is `this` and which may have run under
/// a temporary id before (`former`: see [`Driver::take_over_node`]).
fn is_self(node: &str, this: &str, former: &Option<(String, Option<String>)>) -> bool {
    node == this || former.as_ref().is_some_and(|(id, _)| id == node)
}

/// Appends one `APPLY` operation.
fn push_op(args: &mut Vec<Vec<u8>>, op: &str, a: &str, b: &str) {
    args.push(op.as_bytes().to_vec());
    args.push(a.as_bytes().to_vec());
    args.push(b.as_bytes().to_vec());
}

/// The frame a `publish_frame` item carries.
fn frame_of(kind: u8, code: u16, payload: &[u8]) -> Option<Frame> {
    match kind {
        wire::FRAME_TEXT => Utf8Bytes::try_from_bytes(payload.to_vec().into())
            .ok()
            .map(Frame::Text),
        wire::FRAME_BINARY => Some(Frame::binary(payload.to_vec())),
        wire::FRAME_CLOSE if code == 0 => Some(Frame::Close(None)),
        wire::FRAME_CLOSE => Some(Frame::Close(Some(CloseFrame {
            code: CloseCode::new(code)?,
            reason: Utf8Bytes::try_from_bytes(payload.to_vec().into()).ok()?,
        }))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(b: &mut Batches, channel: &str, group: bool) {
        b.push(
            channel,
            group,
            &Item::Publish {
                gear: "/g",
                group: "x",
                msg: b"",
            },
        );
    }

    fn shape(b: &Batches) -> Vec<(String, usize)> {
        b.list.iter().map(|(c, w)| (c.clone(), w.len())).collect()
    }

    #[test]
    fn batches_keep_order_where_receivers_may_overlap() {
        let mut b = Batches::default();
        for _ in 0..3 {
            push(&mut b, "node:a", false);
            push(&mut b, "node:b", false);
        }
        assert_eq!(
            shape(&b),
            [("node:a".into(), 3), ("node:b".into(), 3)],
            "nodes never overlap: one batch each"
        );
        push(&mut b, "grp:1", true);
        push(&mut b, "grp:1", true);
        push(&mut b, "node:a", false);
        push(&mut b, "grp:1", true);
        push(&mut b, "grp:2", true);
        push(&mut b, "grp:1", true);
        assert_eq!(
            shape(&b),
            [
                ("node:a".into(), 3),
                ("node:b".into(), 3),
                ("grp:1".into(), 2),
                ("node:a".into(), 1),
                ("grp:1".into(), 1),
                ("grp:2".into(), 1),
                ("grp:1".into(), 1),
            ]
        );
    }
}
