//! kythera's cluster backplane: one registry across several kythera processes
//! ("nodes"), through Redis.
//!
//! [`RedisBackplane::start`] starts a thread of its own (a tokio current-thread runtime
//! with one RESP3 connection to Redis) and returns the [`Backplane`] to hand to
//! `kythera_engine::ServerBuilder::cluster`. Shards never wait on Redis: they queue what is for
//! other nodes in their gear's outbox and control queue (see `kythera_registry::cluster`), and
//! this thread sends it, batched, and brings back what other nodes sent through the
//! shards' existing inbound queues.
//!
//! # What goes over Redis
//!
//! - A message to a name held on another node: one publish to that node's channel per
//!   flush, holding every message for that node since the last flush.
//! - A publish to a group with members on other nodes: one publish to the group's
//!   channel (every node with members subscribes to it and fans out through its own
//!   shards). Never one command per member or per node.
//! - Names and group counts: a Lua script per gear per flush applies this node's
//!   claims, releases and member counts in order and publishes them as one numbered
//!   event; every node keeps a replica of the others' names and counts from those
//!   events (and reads the whole state again when it misses one).
//! - Liveness: each node refreshes a key with a TTL; survivors that find a node's key
//!   expired remove what it held (a periodic check of the node set, once per
//!   heartbeat: keyspace notifications would need a server setting and do not work
//!   across a Redis Cluster's nodes).
//!
//! Key names and the scripts are in [`keys`] and [`scripts`], the message format in
//! [`wire`].
//!
//! # When Redis is away
//!
//! A node that cannot reach Redis, at start or later, serves its own connections as a
//! single process would: messages to names on other nodes answer
//! `RegistryError::Unreachable` (and are counted), names are claimed locally. It
//! reconnects with back-off (100 ms doubling to 2 s), then re-announces its names and
//! memberships; a name another node took meanwhile is settled by the rule of
//! `kythera_registry::cluster` (the later claim loses and its connection is closed with 3409).
//! It does not refuse to start: a Redis outage should not turn a restart into a
//! service outage, and the log, `/metrics` (`kythera_cluster_connected 0`) and the
//! retries say what is going on.
//!
//! # Two nodes on one Redis
//!
//! Runs as a doctest with Debian's `redis-server` on the `PATH` (the test harness
//! starts one on a free port): a client on node A receives what node B publishes.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use kythera_cluster::{ClusterConfig, RedisBackplane};
//! use kythera_engine::Server;
//! use kythera_handler_api::{Conn, Context, Message, Websocket};
//!
//! struct Feed;
//! impl Websocket for Feed {
//!     type State = ();
//!     type Message = String; // crosses nodes: serde, through postcard
//!     fn init(&self, _: &mut Conn, ctx: &mut Context<'_, String>) {
//!         ctx.join("all").expect("joined");
//!         ctx.send_text("joined");
//!     }
//!     fn handle_client_message(&self, _: &mut (), _: Message<'_>, _: &mut Context<'_, String>) {}
//!     fn handle_server_message(&self, _: &mut (), news: String, ctx: &mut Context<'_, String>) {
//!         ctx.send_text(&news);
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = kythera_testkit::redis::RedisServer::start();
//! let node = |id: &str| -> Result<_, Box<dyn std::error::Error>> {
//!     let mut config = ClusterConfig::new(vec![redis.url()]);
//!     config.node_id = id.into();
//!     let server = Server::builder()
//!         .listen("127.0.0.1:0".parse()?)
//!         .cluster(RedisBackplane::start(config)?)
//!         .mount_clustered("/feed", Feed)
//!         .build()?;
//!     Ok(server.spawn())
//! };
//! let (a, b) = (node("a")?, node("b")?);
//!
//! let mut client = kythera_testkit::connect(a.addr(), "/feed");
//! assert_eq!(client.recv_text(), "joined");
//! // Group counts reach the other node through Redis, a moment later.
//! let feed_b = b.handle().registry::<String>("/feed").expect("a gear on /feed");
//! let deadline = Instant::now() + Duration::from_secs(10);
//! while feed_b.count("all") == 0 && Instant::now() < deadline {
//!     std::thread::sleep(Duration::from_millis(10));
//! }
//! assert_eq!(feed_b.publish("all", "from b".to_string())?, 1);
//! assert_eq!(client.recv_text(), "from b");
//! client.close();
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

mod connection;
mod driver;
pub mod keys;
pub mod scripts;
pub mod wire;

use std::fmt;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kythera_registry::cluster::{Backplane, ClusterGear, ClusterLink, DropCause};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry as PromRegistry;

/// How a node joins its cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Redis URLs (`redis://HOST:PORT[/DB]`): one for a single Redis, one or more seed
    /// nodes for a Redis Cluster (found out by asking the first).
    pub redis: Vec<String>,
    /// This node's id, unique in the cluster ([`keys::valid_node_id`]).
    pub node_id: String,
    /// How long a node's liveness key lives; it is refreshed every third of it, and the
    /// others remove what a silent node held within `ttl` plus one refresh. Default 3 s.
    pub ttl: Duration,
    /// This process takes `node_id` over from a running process (a live handover to
    /// a new process, `--take-over`): until that process has left the cluster, this
    /// one is a node of its own under a temporary id ([`handover_node_id`]); then it
    /// becomes `node_id`. "Left" is both: the server said the handover is over
    /// (`Backplane::predecessor_done`, which `ServerBuilder::take_over`'s server
    /// calls), and the node's liveness key is gone (the old process deletes it when
    /// it leaves; it expires if it died). Default `false`.
    pub takes_over: bool,
}

impl ClusterConfig {
    /// A configuration with a generated node id and the default TTL.
    pub fn new(redis: Vec<String>) -> ClusterConfig {
        ClusterConfig {
            redis,
            node_id: default_node_id(),
            ttl: DEFAULT_TTL,
            takes_over: false,
        }
    }
}

/// The default liveness TTL.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3);

/// A node id unique per process start: the host name (cut to what a node id may hold),
/// the process id and the start time in milliseconds, in base 36.
pub fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        .take(32)
        .collect();
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let host = if host.is_empty() { "node".into() } else { host };
    format!("{host}-{}-{}", std::process::id(), base36(ms))
}

/// The temporary id of a process taking `node` over from a running process while the
/// two run side by side: `node` (cut so that the whole stays a valid id), `.next-`
/// and this process's id and start time in base 36, so that it is unique too.
pub fn handover_node_id(node: &str) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let suffix = format!(
        ".next-{}-{}",
        base36(u64::from(std::process::id())),
        base36(ms)
    );
    let keep = node.len().min(64usize.saturating_sub(suffix.len()));
    format!("{}{suffix}", &node[..keep])
}

fn base36(mut n: u64) -> String {
    let mut out = Vec::new();
    loop {
        out.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// Why a backplane could not start.
#[derive(Debug)]
pub enum StartError {
    /// The node id is not valid.
    InvalidNodeId(String),
    /// A Redis URL is not valid; the text says why.
    InvalidUrl(String, String),
    /// No Redis URL was given.
    NoUrl,
    /// The ttl is under 300 ms (a refresh every 100 ms would be busy work, and
    /// shorter would invite false deaths).
    TtlTooShort,
    /// The backplane's thread could not be started.
    Spawn(std::io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::InvalidNodeId(id) => write!(
                f,
                "invalid node id {id:?}: 1 to 64 ASCII letters, digits, '.', '_' or '-'"
            ),
            StartError::InvalidUrl(url, why) => write!(f, "invalid Redis URL {url:?}: {why}"),
            StartError::NoUrl => f.write_str("no Redis URL"),
            StartError::TtlTooShort => f.write_str("the liveness TTL must be at least 300 ms"),
            StartError::Spawn(e) => write!(f, "cannot start the cluster thread: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// Counters of the backplane's traffic.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub commands: AtomicU64,
    pub messages_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
    pub reconnects: AtomicU64,
    pub resyncs: AtomicU64,
    pub nodes_removed: AtomicU64,
    pub events: AtomicU64,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// What the backplane's thread and its handle share.
pub(crate) struct Shared {
    pub link: Arc<ClusterLink>,
    pub config: ClusterConfig,
    pub gears: Mutex<Vec<Arc<dyn ClusterGear>>>,
    pub notify: tokio::sync::Notify,
    pub stop: AtomicBool,
    /// The handover this process took over with is over (`Backplane::predecessor_done`).
    pub predecessor_done: AtomicBool,
    pub live: Mutex<Vec<String>>,
    pub stats: Stats,
    /// Round trips of the flushes (one pipeline each), in seconds.
    pub roundtrip: Histogram,
}

/// The Redis backplane of one node: see the crate documentation.
pub struct RedisBackplane {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("node", &self.shared.config.node_id)
            .field("redis", &self.shared.config.redis)
            .field("connected", &self.shared.link.is_connected())
            .finish()
    }
}

impl RedisBackplane {
    /// Checks `config` and starts the backplane's thread, which connects to Redis (and
    /// keeps trying, logging why, while it cannot).
    pub fn start(config: ClusterConfig) -> Result<Arc<RedisBackplane>, StartError> {
        if !keys::valid_node_id(&config.node_id) {
            return Err(StartError::InvalidNodeId(config.node_id));
        }
        if config.redis.is_empty() {
            return Err(StartError::NoUrl);
        }
        if config.ttl < Duration::from_millis(300) {
            return Err(StartError::TtlTooShort);
        }
        for url in &config.redis {
            redis::Client::open(url.as_str())
                .map_err(|e| StartError::InvalidUrl(url.clone(), e.to_string()))?;
            if !url.starts_with("redis://") {
                return Err(StartError::InvalidUrl(
                    url.clone(),
                    "only redis:// is supported (rediss:// comes with TLS)".into(),
                ));
            }
        }
        let shared = Arc::new(Shared {
            link: Arc::new(ClusterLink::new(&if config.takes_over {
                handover_node_id(&config.node_id)
            } else {
                config.node_id.clone()
            })),
            config,
            gears: Mutex::new(Vec::new()),
            notify: tokio::sync::Notify::new(),
            stop: AtomicBool::new(false),
            predecessor_done: AtomicBool::new(false),
            live: Mutex::new(Vec::new()),
            stats: Stats::default(),
            roundtrip: Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
            ]),
        });
        let for_thread = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("kythera-cluster".into())
            .spawn(move || driver::run(for_thread))
            .map_err(StartError::Spawn)?;
        Ok(Arc::new(RedisBackplane {
            shared,
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// This node's id (with [`ClusterConfig::takes_over`], the id it takes over; it
    /// runs under a temporary one until then).
    pub fn node_id(&self) -> &str {
        &self.shared.config.node_id
    }

    /// Whether the backplane is connected to Redis now.
    pub fn is_connected(&self) -> bool {
        self.shared.link.is_connected()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabel {
    cause: &'static str,
}

impl Backplane for RedisBackplane {
    fn link(&self) -> &Arc<ClusterLink> {
        &self.shared.link
    }

    fn attach(&self, gear: Arc<dyn ClusterGear>) {
        if let Ok(mut gears) = self.shared.gears.lock() {
            gears.push(gear);
        }
        self.shared.notify.notify_one();
    }

    fn wake(&self) {
        self.shared.notify.notify_one();
    }

    fn live_nodes(&self) -> Vec<String> {
        let live = self
            .shared
            .live
            .lock()
            .map(|l| l.clone())
            .unwrap_or_default();
        if live.is_empty() {
            vec![self.shared.link.node_id().to_string()]
        } else {
            live
        }
    }

    fn write_metrics(&self, out: &mut String) {
        let s = &self.shared;
        let mut reg = PromRegistry::with_prefix("kythera_cluster");
        let info = Family::<NodeLabel, Gauge>::default();
        reg.register(
            "node",
            "This node's id in the cluster (value 1)",
            info.clone(),
        );
        info.get_or_create(&NodeLabel {
            node: s.link.node_id().to_string(),
        })
        .set(1);
        let gauge = |reg: &mut PromRegistry, name: &str, help: &str, v: i64| {
            let g = Gauge::<i64>::default();
            g.set(v);
            reg.register(name, help, g);
        };
        let counter = |reg: &mut PromRegistry, name: &str, help: &str, v: &AtomicU64| {
            let c = Counter::<u64>::default();
            c.inc_by(v.load(Ordering::Relaxed));
            reg.register(name, help, c);
        };
        gauge(
            &mut reg,
            "connected",
            "Whether the backplane is connected to Redis (1) or not (0)",
            i64::from(s.link.is_connected()),
        );
        gauge(
            &mut reg,
            "live_nodes",
            "Nodes this node believes alive, itself included",
            self.live_nodes().len() as i64,
        );
        counter(
            &mut reg,
            "commands",
            "Redis commands sent",
            &s.stats.commands,
        );
        counter(
            &mut reg,
            "messages_sent",
            "Messages sent to other nodes (server messages, published messages and frames)",
            &s.stats.messages_sent,
        );
        counter(
            &mut reg,
            "messages_received",
            "Messages received from other nodes",
            &s.stats.messages_received,
        );
        counter(
            &mut reg,
            "bytes_sent",
            "Bytes of message batches published",
            &s.stats.bytes_sent,
        );
        counter(
            &mut reg,
            "bytes_received",
            "Bytes of message batches and events received",
            &s.stats.bytes_received,
        );
        counter(
            &mut reg,
            "reconnects",
            "Connections to Redis made after the first",
            &s.stats.reconnects,
        );
        counter(
            &mut reg,
            "resyncs",
            "Times a gear's names and groups were read again from Redis",
            &s.stats.resyncs,
        );
        counter(
            &mut reg,
            "events_received",
            "Name and membership events received (every node receives every clustered gear's events)",
            &s.stats.events,
        );
        counter(
            &mut reg,
            "nodes_removed",
            "Nodes whose liveness key expired, removed by this node",
            &s.stats.nodes_removed,
        );
        let conflicts = Counter::<u64>::default();
        conflicts.inc_by(s.link.conflicts());
        reg.register(
            "name_conflicts",
            "Names this node's connections lost to other nodes",
            conflicts,
        );
        let dropped = Family::<CauseLabel, Counter>::default();
        reg.register(
            "dropped",
            "Messages between nodes dropped, by cause",
            dropped.clone(),
        );
        for (cause, n) in DropCause::ALL.iter().zip(s.link.drops()) {
            dropped
                .get_or_create(&CauseLabel {
                    cause: cause.label(),
                })
                .inc_by(n);
        }
        reg.register(
            "roundtrip_seconds",
            "Round trips of the backplane's flushes to Redis",
            s.roundtrip.clone(),
        );
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &reg).is_err() {
            let _ = writeln!(out, "# cluster metrics failed to encode");
            return;
        }
        out.push_str(text.strip_suffix("# EOF\n").unwrap_or(&text));
    }

    fn predecessor_done(&self) {
        self.shared.predecessor_done.store(true, Ordering::Release);
        self.shared.notify.notify_one();
    }

    fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.notify.notify_one();
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_node_ids_are_valid() {
        let id = default_node_id();
        assert!(keys::valid_node_id(&id), "{id}");
        assert_eq!(base36(0), "0");
        assert_eq!(base36(36 * 36 + 35), "10z");
        for node in ["n", &"x".repeat(64)] {
            let temp = handover_node_id(node);
            assert!(keys::valid_node_id(&temp), "{temp}");
            assert!(temp.starts_with(&node[..8.min(node.len())]), "{temp}");
            assert_ne!(temp, node);
        }
    }

    #[test]
    fn bad_configurations_are_refused() {
        let mut c = ClusterConfig::new(vec!["redis://127.0.0.1:1".into()]);
        c.node_id = "a b".into();
        assert!(matches!(
            RedisBackplane::start(c.clone()),
            Err(StartError::InvalidNodeId(_))
        ));
        c.node_id = "n".into();
        c.redis = vec!["http://x".into()];
        assert!(matches!(
            RedisBackplane::start(c.clone()),
            Err(StartError::InvalidUrl(..))
        ));
        c.redis = vec![];
        assert!(matches!(RedisBackplane::start(c), Err(StartError::NoUrl)));
    }
}
