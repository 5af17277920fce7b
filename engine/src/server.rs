//! The server: binds the listeners, starts one shard thread per core, and drains.
//!
//! ```no_run
//! use kythera_engine::Server;
//! # struct Echo;
//! # impl kythera_handler_api::Websocket for Echo {
//! #     type State = ();
//! #     type Message = ();
//! #     fn init(&self, _: &mut kythera_handler_api::Conn, _: &mut kythera_handler_api::Context<'_, ()>) {}
//! #     fn handle_client_message(&self, _: &mut (), _: kythera_handler_api::Message<'_>, _: &mut kythera_handler_api::Context<'_, ()>) {}
//! #     fn handle_server_message(&self, _: &mut (), _: (), _: &mut kythera_handler_api::Context<'_, ()>) {}
//! # }
//! let server = Server::builder()
//!     .listen("127.0.0.1:8080".parse().unwrap())
//!     .mount("/echo", Echo)
//!     .build()?;
//! let handle = server.handle(); // handle.drain() from a signal handler thread
//! server.run()?; // returns once every shard has drained
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Binding
//!
//! Each shard gets its own `SO_REUSEPORT` listener on every address, so the kernel
//! spreads new connections over the shards and no accept is shared between threads.
//! Port 0 is resolved once: the first listener picks the port, the others bind it.
//!
//! # Draining
//!
//! [`ServerHandle::drain`] sets a flag that every shard reads once per loop turn (at
//! least once per timer tick, 64 ms). A draining shard stops accepting websocket
//! connections (an upgrade gets 503 `ServerDraining` with `Retry-After: 1`), sends close
//! 1001 "server shutting down; please reconnect" to its connections spread over
//! [`Limits::drain_window`], waits for the closing handshakes (at most
//! [`Limits::closing_timeout`] more), closes whatever is still open, and exits.
//! [`Server::run`] returns when every shard has exited.
//!
//! The listeners stay open while connections from before the drain remain (at most for
//! the drain window), so that a load balancer polling `GET /healthz` sees 503 and stops
//! sending clients here; plain HTTP requests (`/healthz`, `/metrics`, static files) are
//! answered meanwhile. A shard with no connections closes its listeners at once.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use kythera_handler_api::Websocket;

use kythera_registry::cluster::{Backplane, MessageCodec};
use kythera_registry::{RegistryConfig, RegistryHandle, RegistryStats, Wakeup};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{Limits, default_max_connections};
use crate::driver::listener::{bind_reuseport, ensure_unused};
use crate::driver::{DriverKind, IoChoice};
use crate::gear::App;
use crate::handover::{Giver, HandoverState, ListenerInfo, Taker};
use crate::observe::{AllGearCounters, GearCounters, Http, HttpConfig};
use crate::origin::OriginPolicy;
use crate::route::InvalidRoute;
use crate::shard::{self, ShardCounters, ShardSetup, ShardStats, ShardTuning};
use crate::tls::TlsConfig;
use crate::uring::probe;
use crate::uring::probe::{Features, Unavailable};

/// The most shards a server may have: a connection id keeps the shard in 8 bits, and
/// shard 255 stands for connections on other nodes ([`kythera_handler_api::ConnId::REMOTE_SHARD`]).
pub const MAX_SHARDS: usize = 255;

/// What the shards share: the drain flag, the clock, the counters, and how to wake
/// each other.
#[derive(Debug)]
pub(crate) struct Shared {
    draining: AtomicBool,
    epoch: Instant,
    pub(crate) stats: Box<[ShardStats]>,
    /// The sleep state of every shard (see [`kythera_registry::Wakeup`]).
    pub(crate) wakeup: Arc<Wakeup>,
    /// Each shard's ring descriptor, for `MSG_RING` wake-ups; -1 while it is not running.
    pub(crate) ring_fds: Box<[AtomicI32]>,
    /// Each shard's eventfd: foreign threads write to it to wake the shard.
    pub(crate) event_fds: Arc<[OwnedFd]>,
    /// Per shard, per gear (plus one for unrouted requests): the metrics' counters.
    pub(crate) gear_counters: AllGearCounters,
    /// The I/O driver every shard runs on.
    pub(crate) driver: DriverKind,
    /// A live handover to or from another process.
    pub(crate) handover: HandoverState,
}

impl Shared {
    /// Milliseconds on the server's monotonic clock (the sessions' time).
    pub(crate) fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

/// Why a server could not start.
#[derive(Debug)]
pub enum StartError {
    /// io_uring cannot be used here; the message says why and how to fix it.
    Uring(Unavailable),
    /// io_uring works but lacks an operation the engine needs (the kernel is too old).
    MissingFeatures(Features),
    /// No address to listen on was given.
    NoListenAddress,
    /// TLS listeners were asked for without a certificate ([`ServerBuilder::tls`]).
    TlsWithoutCertificate,
    /// The shard count is 0 or above [`MAX_SHARDS`].
    InvalidShards(usize),
    /// A listener could not be bound.
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error of `socket`, `bind` or `listen`.
        source: io::Error,
    },
    /// A gear's route pattern is invalid or mounted twice.
    Route(InvalidRoute),
    /// The eventfd that wakes a shard for foreign threads could not be made.
    EventFd(io::Error),
    /// `KYTHERA_IO` names no driver.
    InvalidIo(String),
    /// The handover socket could not be bound, or taking over from the process on it
    /// failed ([`ServerBuilder::handover_socket`], [`ServerBuilder::take_over`]).
    Handover {
        /// The socket's path.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Uring(err) => err.fmt(f),
            StartError::MissingFeatures(features) => write!(
                f,
                "io_uring lacks operations the engine needs (multishot accept and recv, \
                 send, close, IORING_FEAT_EXT_ARG, IORING_FEAT_NODROP); kythera needs \
                 Linux 6.1 or later: {features:?}"
            ),
            StartError::NoListenAddress => f.write_str("no address to listen on"),
            StartError::TlsWithoutCertificate => {
                f.write_str("TLS listeners need a certificate and a key")
            }
            StartError::InvalidShards(n) => {
                write!(f, "invalid shard count {n}: must be 1 to {MAX_SHARDS}")
            }
            StartError::Bind { addr, source } => write!(f, "cannot listen on {addr}: {source}"),
            StartError::Route(err) => err.fmt(f),
            StartError::EventFd(err) => write!(f, "cannot create a shard's eventfd: {err}"),
            StartError::InvalidIo(msg) => write!(f, "KYTHERA_IO: {msg}"),
            StartError::Handover { path, source } => {
                write!(f, "handover socket {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Uring(err) => Some(err),
            StartError::Bind { source, .. } => Some(source),
            StartError::Route(err) => Some(err),
            StartError::EventFd(err) => Some(err),
            StartError::Handover { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Why a running server stopped with an error.
#[derive(Debug)]
pub enum RunError {
    /// A shard thread could not be started.
    Spawn(io::Error),
    /// A shard failed (its ring could not be set up, or a submission failed); the other
    /// shards were drained.
    Shard {
        /// The shard's index.
        shard: usize,
        /// What failed.
        source: io::Error,
    },
    /// A shard thread panicked (a bug in the engine: gear panics are caught per
    /// connection); the other shards were drained.
    ShardPanicked {
        /// The shard's index.
        shard: usize,
    },
    /// The thread of [`Server::spawn`] panicked.
    ServerPanicked,
}

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Spawn(err) => write!(f, "cannot start a shard thread: {err}"),
            RunError::Shard { shard, source } => write!(f, "shard {shard} failed: {source}"),
            RunError::ShardPanicked { shard } => write!(f, "shard {shard} panicked"),
            RunError::ServerPanicked => f.write_str("the server thread panicked"),
        }
    }
}

impl std::error::Error for RunError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RunError::Spawn(err) | RunError::Shard { source: err, .. } => Some(err),
            RunError::ShardPanicked { .. } | RunError::ServerPanicked => None,
        }
    }
}

/// Configures a [`Server`]; see [`Server::builder`].
pub struct ServerBuilder {
    addrs: Vec<SocketAddr>,
    tls_addrs: Vec<SocketAddr>,
    tls: Option<TlsConfig>,
    shards: Option<usize>,
    limits: Option<Limits>,
    tuning: ShardTuning,
    release_memory: Option<fn()>,
    registry: RegistryConfig,
    http: HttpConfig,
    app: App,
    route_error: Option<InvalidRoute>,
    backplane: Option<Arc<dyn Backplane>>,
    io: Option<IoChoice>,
    handover_socket: Option<PathBuf>,
    take_over: Option<PathBuf>,
}

impl fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("addrs", &self.addrs)
            .field("tls_addrs", &self.tls_addrs)
            .field("shards", &self.shards)
            .field("limits", &self.limits)
            .field("tuning", &self.tuning)
            .field("io", &self.io)
            .field("app", &self.app)
            .finish()
    }
}

impl ServerBuilder {
    /// Listens on the Unix socket `path` for a new process that takes over this one's
    /// listeners and connections ([`ServerBuilder::take_over`]; README, "Deploying
    /// without disconnecting"). Once it has, [`Server::run`] returns when this process
    /// holds nothing more.
    pub fn handover_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.handover_socket = Some(path.into());
        self
    }

    /// Takes over the listeners and connections of the process listening on the Unix
    /// socket `path` ([`ServerBuilder::handover_socket`]) instead of binding: the
    /// listeners when the server is built, the connections once it runs. The addresses
    /// given to [`ServerBuilder::listen`] and [`ServerBuilder::tls_listen`] must be the
    /// old process's (any not handed over is bound as usual).
    pub fn take_over(mut self, path: impl Into<PathBuf>) -> Self {
        self.take_over = Some(path.into());
        self
    }

    /// The I/O driver: [`IoChoice::Auto`] (io_uring when the start-up probe passes,
    /// else epoll, with one log line that says why), [`IoChoice::Uring`] (or refuse to
    /// start with the probe's explanation) or [`IoChoice::Epoll`]. Without this call
    /// the choice comes from the `KYTHERA_IO` environment variable (`auto`, `uring`,
    /// `epoll`) when it is set, as tokio's runtime takes `TOKIO_WORKER_THREADS`, so that
    /// a deployment can pick the driver of a program that embeds the engine; else
    /// `Auto`.
    pub fn io(mut self, choice: IoChoice) -> Self {
        self.io = Some(choice);
        self
    }

    /// Listens on `addr` (may be given several times). Port 0 picks a free port; see
    /// [`Server::local_addrs`].
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.addrs.push(addr);
        self
    }

    /// Listens on `addr` for `wss://` (and `https://`) with the settings of
    /// [`ServerBuilder::tls`], which must be given too (may be given several times).
    pub fn tls_listen(mut self, addr: SocketAddr) -> Self {
        self.tls_addrs.push(addr);
        self
    }

    /// The certificate, key and TLS settings of the [`ServerBuilder::tls_listen`]
    /// listeners. Keep a clone to [`TlsConfig::reload`] it while the server runs.
    pub fn tls(mut self, config: TlsConfig) -> Self {
        self.tls = Some(config);
        self
    }

    /// The number of shards (threads, each pinned to a core). Default: the number of
    /// CPUs this process may use.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards);
        self
    }

    /// The limits of every connection. Default: [`Limits::default`], with the
    /// per-gear connection limit sized to the shard count
    /// ([`default_max_connections`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// The size of the registry's queues between shards (see the `registry` crate for
    /// what happens when one is full).
    pub fn registry(mut self, config: RegistryConfig) -> Self {
        self.registry = config;
        self
    }

    /// What plain (non-upgrade) GET requests are answered with: metrics, health,
    /// static files ([`HttpConfig`]; by default `/metrics` and `/healthz`).
    pub fn http(mut self, config: HttpConfig) -> Self {
        self.http = config;
        self
    }

    /// Sizes of the shards' io_uring resources (buffers, queues, timer tick).
    pub fn tuning(mut self, tuning: ShardTuning) -> Self {
        self.tuning = tuning;
        self
    }

    /// A function each shard's thread calls to hand memory its allocator keeps cached
    /// back to the kernel (the `kythera` binary passes mimalloc's `mi_collect`). A
    /// shard calls it once no connection has opened or closed on it for a second after
    /// some did, and at least every 10 seconds while they keep doing so; never while
    /// its connections only exchange messages. Default: none. What it saved, measured:
    /// README, "Memory per idle connection".
    pub fn release_memory(mut self, hook: fn()) -> Self {
        self.release_memory = Some(hook);
        self
    }

    /// Makes this server a node of a cluster: the registries of the gears mounted with
    /// [`ServerBuilder::mount_clustered`] span every node through `backplane` (the
    /// `cluster` crate's Redis backplane). [`Server::run`] shuts it down once the
    /// shards have drained. Default: none, a single process.
    pub fn cluster(mut self, backplane: Arc<dyn Backplane>) -> Self {
        self.backplane = Some(backplane);
        self
    }

    /// Mounts `gear` on the path `pattern` (see [`crate::route`]), with the default
    /// connection limit. In a cluster the gear stays on this node (its names, groups
    /// and messages do not reach other nodes, and the server says so at start): use
    /// [`ServerBuilder::mount_clustered`] for a gear whose messages can cross processes.
    pub fn mount<G: Websocket>(self, pattern: &str, gear: G) -> Self {
        self.mount_inner(pattern, gear, None, None)
    }

    /// Mounts `gear` on `pattern` so that, in a cluster, its names, groups and server
    /// messages span every node that mounts it on the same pattern: messages cross
    /// processes through serde (postcard). Without [`ServerBuilder::cluster`] this is
    /// [`ServerBuilder::mount`].
    pub fn mount_clustered<G>(self, pattern: &str, gear: G) -> Self
    where
        G: Websocket,
        G::Message: Serialize + DeserializeOwned,
    {
        self.mount_inner(pattern, gear, None, Some(MessageCodec::postcard()))
    }

    /// Which pages may open connections to the gear mounted on `pattern` (every gear
    /// mounted so far: `"*"`): see [`crate::origin`]. Default: pages of this server
    /// ([`OriginPolicy::SameHost`]) and clients that send no `Origin`. An unknown
    /// pattern is an error at [`ServerBuilder::build`].
    pub fn allowed_origins(mut self, pattern: &str, policy: OriginPolicy) -> Self {
        let which = (pattern != "*").then_some(pattern);
        if !self.app.set_origins(which, policy) {
            self.route_error.get_or_insert(InvalidRoute {
                pattern: pattern.to_owned(),
                reason: "allowed_origins: no gear is mounted there (mount it first)",
            });
        }
        self
    }

    /// Mounts `gear` on `pattern` with at most `max_connections` connections across all
    /// shards (over it: HTTP 503 `TooManyWebsocketConnections`).
    pub fn mount_with_limit<G: Websocket>(
        self,
        pattern: &str,
        gear: G,
        max_connections: usize,
    ) -> Self {
        self.mount_inner(pattern, gear, Some(max_connections), None)
    }

    fn mount_inner<G: Websocket>(
        mut self,
        pattern: &str,
        gear: G,
        max_connections: Option<usize>,
        codec: Option<MessageCodec<G::Message>>,
    ) -> Self {
        if let Err(err) = self
            .app
            .mount_with_codec(pattern, Arc::new(gear), max_connections, codec)
        {
            self.route_error.get_or_insert(err);
        }
        self
    }

    /// Checks that io_uring is usable and binds the listeners (one per shard and
    /// address). Nothing is accepted before [`Server::run`], but connections wait in
    /// the listeners' backlogs from now on.
    pub fn build(self) -> Result<Server, StartError> {
        let ServerBuilder {
            mut addrs,
            tls_addrs,
            tls,
            shards,
            limits,
            tuning,
            release_memory,
            registry: registry_config,
            http,
            mut app,
            route_error,
            backplane,
            io,
            handover_socket,
            take_over,
        } = self;
        if let Some(err) = route_error {
            return Err(StartError::Route(err));
        }
        if addrs.is_empty() && tls_addrs.is_empty() {
            return Err(StartError::NoListenAddress);
        }
        if !tls_addrs.is_empty() && tls.is_none() {
            return Err(StartError::TlsWithoutCertificate);
        }
        // The TLS listeners come after the plain ones, in each shard's list too.
        let tls_from = addrs.len();
        addrs.extend(tls_addrs);
        let shards = shards.unwrap_or_else(default_shards);
        if shards == 0 || shards > MAX_SHARDS {
            return Err(StartError::InvalidShards(shards));
        }
        let choice = match io {
            Some(choice) => choice,
            None => IoChoice::from_env().map_err(StartError::InvalidIo)?,
        };
        let (driver, features) = choose_driver(choice)?;
        app.set_limits(limits.unwrap_or_else(|| Limits {
            max_connections_per_gear: default_max_connections(shards),
            ..Limits::default()
        }));

        // Taking over: the old process's listeners first (it stops accepting on them
        // once we have them, so no connection waits for a listener meanwhile).
        let (taker, mut taken) = match &take_over {
            Some(path) => {
                let node = backplane.as_ref().map(|b| b.link().node_id().to_string());
                let (taker, taken) =
                    Taker::connect(path, node).map_err(|source| StartError::Handover {
                        path: path.clone(),
                        source,
                    })?;
                (Some(taker), taken)
            }
            None => (None, Vec::new()),
        };
        let mut listeners: Vec<Vec<(TcpListener, bool)>> =
            (0..shards).map(|_| Vec::new()).collect();
        let mut local_addrs = Vec::with_capacity(addrs.len());
        for (i, addr) in addrs.into_iter().enumerate() {
            let tls = i >= tls_from;
            let bind = |addr: SocketAddr| {
                bind_reuseport(addr, tuning.backlog)
                    .map_err(|source| StartError::Bind { addr, source })
            };
            let mut mine: Vec<TcpListener> = Vec::new();
            let (matching, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut taken)
                .into_iter()
                .partition(|(info, _)| info.addr == addr && info.tls == tls);
            taken = rest;
            mine.extend(matching.into_iter().map(|(_, l)| l));
            if !mine.is_empty() {
                // Every shard gets at least one of the address's listeners: the old
                // process's, spread over the shards, and new ones in the same
                // SO_REUSEPORT group where there are fewer.
                let mut i = 0;
                for l in mine {
                    listeners[i % shards].push((l, tls));
                    i += 1;
                }
                for shard in listeners.iter_mut().skip(i) {
                    shard.push((bind(addr)?, tls));
                }
                local_addrs.push(addr);
                continue;
            }
            // SO_REUSEPORT would let this server join another's listeners on the
            // address; refuse as for any other address in use. (Port 0 asks for a
            // fresh port, which nobody holds.)
            if addr.port() != 0 {
                ensure_unused(addr).map_err(|source| StartError::Bind { addr, source })?;
            }
            let first = bind(addr)?;
            let actual = first
                .local_addr()
                .map_err(|source| StartError::Bind { addr, source })?;
            listeners[0].push((first, tls));
            for shard in listeners.iter_mut().skip(1) {
                shard.push((bind(actual)?, tls));
            }
            local_addrs.push(actual);
        }
        for (info, _) in &taken {
            tracing::warn!(addr = %info.addr, tls = info.tls, "handover: the old process listened on an address this one does not; closing it");
        }
        let giver = match &handover_socket {
            Some(path) => {
                let mut copies = Vec::new();
                for (l, tls) in listeners.iter().flatten() {
                    let addr = l.local_addr().map_err(|source| StartError::Handover {
                        path: path.clone(),
                        source,
                    })?;
                    let copy = l.try_clone().map_err(|source| StartError::Handover {
                        path: path.clone(),
                        source,
                    })?;
                    copies.push((ListenerInfo { addr, tls: *tls }, copy));
                }
                Some(
                    Giver::bind(path, copies, take_over.is_none()).map_err(|source| {
                        StartError::Handover {
                            path: path.clone(),
                            source,
                        }
                    })?,
                )
            }
            None => None,
        };
        let event_fds: Arc<[OwnedFd]> = (0..shards)
            .map(|_| crate::driver::sys::eventfd())
            .collect::<io::Result<Vec<_>>>()
            .map_err(StartError::EventFd)?
            .into();
        let wakeup = Arc::new(Wakeup::new(shards));
        let fds = Arc::clone(&event_fds);
        // The closure holds the Arc, so the eventfds stay open while it can run.
        wakeup.set_foreign_waker(Box::new(move |shard| {
            crate::driver::sys::eventfd_write(fds[shard].as_fd());
        }));
        app.start_registries(registry_config, &wakeup, backplane.as_ref());
        let shared = Arc::new(Shared {
            draining: AtomicBool::new(false),
            epoch: Instant::now(),
            stats: (0..shards).map(|_| ShardStats::default()).collect(),
            wakeup,
            ring_fds: (0..shards).map(|_| AtomicI32::new(-1)).collect(),
            event_fds,
            gear_counters: (0..shards)
                .map(|_| {
                    (0..=app.gear_count())
                        .map(|_| GearCounters::default())
                        .collect()
                })
                .collect(),
            driver,
            handover: HandoverState::new(shards),
        });
        app.set_http(Http {
            config: http,
            shared: Arc::clone(&shared),
        });
        Ok(Server {
            app: Arc::new(app),
            tls,
            tls_from,
            giver,
            taker,
            listeners,
            local_addrs,
            shared,
            tuning,
            release_memory,
            features,
            driver,
        })
    }
}

/// The driver for `choice`, and what the io_uring probe found when it ran and passed.
fn choose_driver(choice: IoChoice) -> Result<(DriverKind, Option<Features>), StartError> {
    match choice {
        IoChoice::Epoll => Ok((DriverKind::Epoll, None)),
        IoChoice::Uring => {
            let features = probe_off_thread().map_err(StartError::Uring)?;
            if !features.is_sufficient() {
                return Err(StartError::MissingFeatures(features));
            }
            Ok((DriverKind::Uring, Some(features)))
        }
        IoChoice::Auto => match probe_off_thread() {
            Ok(features) if features.is_sufficient() => Ok((DriverKind::Uring, Some(features))),
            Ok(features) => {
                tracing::warn!(
                    "running on epoll: {}",
                    StartError::MissingFeatures(features)
                );
                Ok((DriverKind::Epoll, None))
            }
            Err(err) => {
                let why = err.to_string().replace('\n', " ");
                tracing::warn!("running on epoll: {why}");
                Ok((DriverKind::Epoll, None))
            }
        },
    }
}

/// Turns transparent huge pages off for this process (`PR_SET_THP_DISABLE`), whatever
/// the allocator asked for with `madvise`.
///
/// mimalloc backs its heap with 2 MiB pages where it can. A connection server's heap is
/// many small, long-lived objects, so with huge pages its resident memory grows in
/// 2 MiB steps and starts about 8 MiB higher (README, "Memory"), and echo throughput
/// measured the same either way. The `kythera` binary calls this before it starts;
/// a program that embeds the engine decides for itself.
pub fn disable_transparent_huge_pages() -> io::Result<()> {
    crate::driver::sys::disable_thp()
}

/// Runs the io_uring probe on a thread of its own. When a ring is torn down, the kernel
/// queues work with `TWA_SIGNAL` to every thread that used it, and a blocking socket
/// call with a timeout in that thread fails with `EINTR`: the caller of
/// [`ServerBuilder::build`] should not get that surprise.
fn probe_off_thread() -> Result<Features, Unavailable> {
    match std::thread::Builder::new()
        .name("kythera-probe".into())
        .spawn(probe)
    {
        Ok(thread) => thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
        Err(_) => probe(),
    }
}

/// The number of CPUs this process may run on.
fn default_shards() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A server whose listeners are bound; [`Server::run`] starts the shards.
pub struct Server {
    app: Arc<App>,
    tls: Option<TlsConfig>,
    /// Where the TLS listeners start in each shard's list (and in `local_addrs`).
    tls_from: usize,
    giver: Option<Giver>,
    taker: Option<Taker>,
    listeners: Vec<Vec<(TcpListener, bool)>>,
    local_addrs: Vec<SocketAddr>,
    shared: Arc<Shared>,
    tuning: ShardTuning,
    release_memory: Option<fn()>,
    features: Option<Features>,
    driver: DriverKind,
}

impl fmt::Debug for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("local_addrs", &self.local_addrs)
            .field("shards", &self.listeners.len())
            .field("features", &self.features)
            .field("driver", &self.driver)
            .field("app", &self.app)
            .finish()
    }
}

impl Server {
    /// A builder with no address, no gear, default limits and one shard per CPU.
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            addrs: Vec::new(),
            tls_addrs: Vec::new(),
            tls: None,
            shards: None,
            limits: None,
            tuning: ShardTuning::default(),
            release_memory: None,
            registry: RegistryConfig::default(),
            http: HttpConfig::default(),
            app: App::new(Limits::default()),
            route_error: None,
            backplane: None,
            io: None,
            handover_socket: None,
            take_over: None,
        }
    }

    /// The bound addresses, in the order given to [`ServerBuilder::listen`] (with the
    /// port picked for port 0), then those given to [`ServerBuilder::tls_listen`].
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.local_addrs.clone()
    }

    /// The bound TLS addresses, in the order given to [`ServerBuilder::tls_listen`].
    pub fn tls_addrs(&self) -> Vec<SocketAddr> {
        self.local_addrs[self.tls_from..].to_vec()
    }

    /// The number of shards.
    pub fn shards(&self) -> usize {
        self.listeners.len()
    }

    /// What the io_uring probe found (`None` on epoll).
    pub fn features(&self) -> Option<Features> {
        self.features
    }

    /// The I/O driver the shards run on.
    pub fn driver(&self) -> DriverKind {
        self.driver
    }

    /// The gears and limits.
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// A handle to drain the server from another thread.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            shared: Arc::clone(&self.shared),
            app: Arc::clone(&self.app),
        }
    }

    /// Runs the shards on this thread's behalf and blocks until all of them have drained
    /// (after [`ServerHandle::drain`]) and exited. If one shard fails, the others are
    /// drained and the first error is returned.
    pub fn run(self) -> Result<(), RunError> {
        let Server {
            app,
            listeners,
            shared,
            tuning,
            release_memory,
            driver,
            tls,
            giver,
            taker,
            ..
        } = self;
        // Taking over: the connections arrive on a thread of their own, which then
        // listens for the next taker if asked to (the old process listened on the
        // socket until it was done).
        let giver_thread = if giver.is_some() || taker.is_some() {
            let shared = Arc::clone(&shared);
            let app = Arc::clone(&app);
            Some(
                std::thread::Builder::new()
                    .name("kythera-handover".into())
                    .spawn(move || {
                        // The path is the old process's until it is done (or gone).
                        let free = taker.is_none_or(|t| {
                            let done = t.run(Arc::clone(&shared), Arc::clone(&app));
                            // A cluster backplane that took the node over under a
                            // temporary id may take the node's own id now.
                            if done && let Some(b) = app.backplane() {
                                b.predecessor_done();
                            }
                            done
                        });
                        match giver {
                            Some(giver) if free => giver.run(shared, app),
                            Some(giver) => tracing::warn!(
                                path = %giver.path.display(),
                                "the old process still listens on the handover socket; \
                                 this one does not"
                            ),
                            None => {}
                        }
                    }),
            )
        } else {
            None
        };
        let giver_thread = match giver_thread.transpose() {
            Ok(t) => t,
            Err(err) => return Err(RunError::Spawn(err)),
        };
        let mut threads: Vec<(usize, JoinHandle<io::Result<()>>)> = Vec::new();
        let mut first_error = None;
        for (index, listeners) in listeners.into_iter().enumerate() {
            let setup = ShardSetup {
                index,
                listeners,
                app: Arc::clone(&app),
                shared: Arc::clone(&shared),
                tuning,
                release_memory,
                driver,
                tls: tls.clone(),
            };
            let shared_for_thread = Arc::clone(&shared);
            // In a cluster every log line of the shard names the node.
            let node = app.backplane().map(|b| b.link().node_id());
            let spawned = std::thread::Builder::new()
                .name(format!("kythera-shard-{index}"))
                .spawn(move || {
                    let _node = node.map(|n| tracing::info_span!("node", id = %n).entered());
                    let result = shard::run(setup);
                    if result.is_err() {
                        // One shard down: take the others down gracefully too.
                        shared_for_thread.drain();
                    }
                    result
                });
            match spawned {
                Ok(handle) => threads.push((index, handle)),
                Err(err) => {
                    shared.drain();
                    first_error = Some(RunError::Spawn(err));
                    break;
                }
            }
        }
        for (shard, handle) in threads {
            let result = match handle.join() {
                Ok(Ok(())) => continue,
                Ok(Err(source)) => RunError::Shard { shard, source },
                Err(_) => {
                    shared.drain();
                    RunError::ShardPanicked { shard }
                }
            };
            first_error.get_or_insert(result);
        }
        // Handed over: the handover thread has said done (it ends right after). Without
        // a handover it is waiting for a taker: not joined.
        if let Some(thread) = giver_thread
            && shared.handover.committed()
        {
            let _ = thread.join();
        }
        // The shards have let go of every connection (and so given up their names and
        // memberships): the backplane sends that to Redis and leaves the cluster.
        if let Some(backplane) = app.backplane() {
            backplane.shutdown();
        }
        match first_error {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Runs the server on a background thread (for tests and embedding). Dropping the
    /// returned [`RunningServer`] drains it and waits for it.
    pub fn spawn(self) -> RunningServer {
        let addrs = self.local_addrs();
        let tls_from = self.tls_from;
        let handle = self.handle();
        let thread = std::thread::Builder::new()
            .name("kythera-server".into())
            .spawn(move || self.run())
            .expect("spawn the server thread");
        RunningServer {
            addrs,
            tls_from,
            handle,
            thread: Some(thread),
        }
    }
}

/// Drains a server from any thread. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ServerHandle {
    shared: Arc<Shared>,
    app: Arc<App>,
}

impl ServerHandle {
    /// Starts a graceful drain (see the module docs). Calling it again does nothing.
    pub fn drain(&self) {
        self.shared.drain();
    }

    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        self.shared.is_draining()
    }

    /// The counters of each shard, in shard order (with the gear figures of the shard
    /// summed over its gears).
    pub fn stats(&self) -> Vec<ShardCounters> {
        self.shared
            .stats
            .iter()
            .zip(self.shared.gear_counters.iter())
            .map(|(stats, gears)| {
                let mut snap = stats.snapshot();
                for g in gears.iter() {
                    snap.websockets += g.opened.get().saturating_sub(g.terminated.get());
                    snap.frames_in += g.frames_in.get();
                    snap.frames_out += g.frames_out.get();
                }
                snap
            })
            .collect()
    }

    /// A handle to the registry of the gear mounted on `pattern`, for threads outside
    /// the shards (`M` is the gear's message type); `None` if there is no such gear.
    pub fn registry<M: Clone + Send + 'static>(&self, pattern: &str) -> Option<RegistryHandle<M>> {
        self.app.registry(pattern)
    }

    /// The registry figures of the gear mounted on `pattern`.
    pub fn registry_stats(&self, pattern: &str) -> Option<RegistryStats> {
        self.app.registry_stats(pattern)
    }

    /// The cluster's backplane, if this server is a node of one (its node id, the live
    /// nodes).
    pub fn backplane(&self) -> Option<&Arc<dyn Backplane>> {
        self.app.backplane()
    }
}

/// A server running on a background thread ([`Server::spawn`]). Dropping it drains the
/// server and waits for it, so a test stops whatever it starts.
#[derive(Debug)]
pub struct RunningServer {
    addrs: Vec<SocketAddr>,
    tls_from: usize,
    handle: ServerHandle,
    thread: Option<JoinHandle<Result<(), RunError>>>,
}

impl RunningServer {
    /// The bound TLS addresses (see [`Server::tls_addrs`]).
    pub fn tls_addrs(&self) -> &[SocketAddr] {
        &self.addrs[self.tls_from..]
    }

    /// The bound addresses.
    pub fn addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The first bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// A handle to drain it.
    pub fn handle(&self) -> &ServerHandle {
        &self.handle
    }

    /// Waits until the server has stopped (someone must drain it) and returns how
    /// [`Server::run`] ended.
    pub fn join(mut self) -> Result<(), RunError> {
        self.wait()
    }

    /// Drains the server and waits until it has stopped.
    pub fn stop(self) -> Result<(), RunError> {
        self.handle.drain();
        self.join()
    }

    fn wait(&mut self) -> Result<(), RunError> {
        match self.thread.take() {
            Some(thread) => thread.join().unwrap_or(Err(RunError::ServerPanicked)),
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.handle.drain();
        let _ = self.wait();
    }
}
