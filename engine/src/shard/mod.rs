//! One shard: a thread pinned to a core, with its own I/O driver (io_uring or epoll:
//! [`crate::driver`]), listeners and connections. Shards share nothing but the [`App`]
//! (gears, limits, per-gear counters) and the drain flag.
//!
//! The shard holds no `unsafe`: it asks its `Driver` for operations, hands it the
//! bytes to send by value, and handles the `Event`s that say how they ended. Each turn
//! of the loop:
//!
//! 1. wait for events or the next timer tick (the driver submits what was asked);
//! 2. handle every event: accepts create connections, recvs feed sessions with bytes
//!    borrowed from the driver's receive buffers (given back right after), sends
//!    complete;
//! 3. fire the timers that are due ([`TimerWheel`], lazy cancellation: only closing
//!    timeouts, accept back-offs and forced closes), and sweep a share of the slots for
//!    the coarse per-connection deadlines (handshake, idle, ping, pong, quiet output
//!    buffers: [`Session::swept_deadline_ms`]) so that an idle connection needs no
//!    timer entry (`deadlines`);
//! 4. on drain, start closes (1001) spread over the drain window, and close the
//!    listeners once the connections from before the drain are gone (`drain`);
//! 5. re-arm the recvs that ran out of receive buffers (theirs are back by now);
//! 6. for every connection touched in this turn: start a send of everything its
//!    session queued (one send in flight per connection, so several frames go out in
//!    one send), schedule its next deadline, and close it when it is finished.
//!
//! | module | holds |
//! |---|---|
//! | this one | the loop, accepts, recvs, sends and closes |
//! | `conn` | a connection's slot and flags, connection ids, registry deliveries |
//! | `deadlines` | timers and the idle sweep |
//! | `drain` | the graceful drain |
//! | `memory_release` | when to call the memory-release hook |
//! | `stats` | the counters behind `/metrics` |
//!
//! # Lifecycle of a connection
//!
//! accept → peer address (`Driver::peer_name`) → [`Session::new`] and a multishot
//! recv → ... → the session says [`Session::should_close`] → once no send is in
//! flight: shutdown if the recv is still armed (it then ends) → close once nothing of
//! the connection is in flight → the slot is freed when the close completes, so no
//! event can ever arrive for a slot that was reused. A send that does not complete
//! within the closing timeout after the session finished (a peer that stopped reading)
//! is ended by the same shutdown.
//!
//! # Running out of descriptors or memory
//!
//! An accept that fails with `EMFILE`, `ENFILE` (also: the direct-descriptor table is
//! full), `ENOMEM` or `ENOBUFS` is not re-armed at once but after
//! [`ShardTuning::accept_backoff_ms`], through the timer wheel, so the core does not spin
//! while open connections keep working. With direct descriptors the kernel has already
//! taken the connection off the backlog when it finds the table full, and closes it.

use std::io;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{debug, info, warn};

use crate::driver::epoll::EpollDriver;
use crate::driver::uring::UringDriver;
use crate::driver::{ByIndex, Driver, DriverKind, Event, RecvEnd, bump};
use crate::gear::{App, Registries};
use crate::server::Shared;
use crate::session::Readiness;
use crate::session::Session;
use crate::timer::{self, TimerWheel};
use crate::tls::{Failure, TlsConfig, TlsConn};

mod conn;
mod deadlines;
mod drain;
mod handover;
mod memory_release;
mod stats;

pub(crate) use conn::MAX_GENERATION;
use conn::{Conn, ConnFlags, ShardDeliveries, conn_id, conn_in};
use deadlines::TimerKey;
use drain::Drain;
use memory_release::MemoryRelease;
pub use stats::{ShardCounters, ShardStats};

/// Sizes and delays of a shard's I/O resources and loop. The defaults serve; tests
/// shrink them to reach the edges (an empty buffer ring, a full descriptor table). The
/// ring, buffer-ring and descriptor-table sizes are io_uring's; the epoll driver reads
/// into one buffer of `buf_size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardTuning {
    /// Submission queue entries.
    pub sq_entries: u32,
    /// Completion queue entries: multishot recvs post many completions per submission.
    pub cq_entries: u32,
    /// Buffers in the provided-buffer ring (a power of two, at most 32768).
    pub buf_entries: u16,
    /// Bytes per receive buffer. By default 64 buffers of 64 KiB (4 MiB per shard),
    /// consumed incrementally, so that a large frame arrives in one or two receives and
    /// several small ones share a buffer (the measurements behind this default: README,
    /// "Receive buffers consumed incrementally").
    pub buf_size: u32,
    /// Consume receive buffers incrementally (`IOU_PBUF_RING_INC`, from Linux 6.15:
    /// see `BufRing::new_incremental`): a receive takes only the bytes it got, the next
    /// continues in the same buffer. Where the kernel refuses it, the same memory is
    /// cut into 4 KiB buffers that each receive takes whole (large buffers would be
    /// wasted on small receives).
    pub incremental_buffers: bool,
    /// Slots of the registered file table (direct descriptors): `None` sizes it to the
    /// open-file limit minus a margin, `Some(0)` uses plain file descriptors.
    pub direct_slots: Option<u32>,
    /// Timer tick: timers fire at most this late, and the loop wakes at least this often
    /// (so a drain is noticed within a tick).
    pub tick_ms: u64,
    /// Slots of the timer wheel (a round is `tick_ms * timer_slots`).
    pub timer_slots: usize,
    /// How long an accept that failed for lack of descriptors or memory waits before it
    /// is armed again.
    pub accept_backoff_ms: u64,
    /// The listen backlog of each listener (the kernel caps it at `net.core.somaxconn`).
    pub backlog: i32,
    /// Sends of at least this many bytes use `IORING_OP_SEND_ZC` (zero copy); `None`
    /// (the default) never does. On loopback it measured slower than a plain send at
    /// 16 KiB to 1 MiB (README), so it is off unless asked for.
    pub send_zc_min_bytes: Option<usize>,
}

impl Default for ShardTuning {
    fn default() -> Self {
        ShardTuning {
            sq_entries: 1024,
            cq_entries: 16 * 1024,
            buf_entries: 64,
            buf_size: 64 * 1024,
            incremental_buffers: true,
            direct_slots: None,
            tick_ms: timer::DEFAULT_TICK_MS,
            timer_slots: timer::DEFAULT_SLOTS,
            accept_backoff_ms: 100,
            backlog: 4096,
            send_zc_min_bytes: None,
        }
    }
}

/// After the drain window and the closing timeout, how long to wait for the forced
/// closes to complete before giving up on them.
const FORCED_CLOSE_GRACE_MS: u64 = 2_000;

/// How long a slow consumer's socket stays open after its 1008 (its recv cancelled,
/// its queue freed) for the send in flight and the close frame to go out if it reads
/// after all; then it is shut down.
const SLOW_CONSUMER_GRACE_MS: u64 = 1_000;

/// Envelopes taken from each gear's inbound queues per loop turn: enough to batch,
/// few enough that sockets are not starved while a flood is delivered.
const REGISTRY_BATCH: usize = 4096;

/// What a shard thread is given.
pub(crate) struct ShardSetup {
    pub index: usize,
    /// The listeners, each with whether its connections speak TLS.
    pub listeners: Vec<(TcpListener, bool)>,
    pub app: Arc<App>,
    pub shared: Arc<Shared>,
    pub tuning: ShardTuning,
    pub release_memory: Option<fn()>,
    pub driver: DriverKind,
    /// The TLS settings of the TLS listeners.
    pub tls: Option<TlsConfig>,
}

/// The body of a shard thread: pins it, sets the shard up on the chosen driver and
/// runs it until it has drained.
pub(crate) fn run(setup: ShardSetup) -> io::Result<()> {
    crate::driver::sys::pin_to_core(setup.index);
    match setup.driver {
        DriverKind::Uring => {
            let driver = UringDriver::new(setup.index, Arc::clone(&setup.shared), &setup.tuning)?;
            run_on(setup, driver)
        }
        DriverKind::Epoll => {
            let driver = EpollDriver::new(setup.index, Arc::clone(&setup.shared), &setup.tuning)?;
            run_on(setup, driver)
        }
    }
}

fn run_on<D: Driver>(setup: ShardSetup, driver: D) -> io::Result<()> {
    let mut shard = Shard::new(setup, driver);
    let result = shard.run();
    if let Err(err) = &result {
        tracing::error!(shard = shard.index, error = %err, "shard failed");
    }
    result
}

/// A listener and the state of its multishot accept.
struct Listener {
    /// `None` once closed (drain).
    socket: Option<TcpListener>,
    ipv6: bool,
    /// Its connections speak TLS.
    tls: bool,
    armed: bool,
    /// The last accept failed for lack of resources: re-arm after the back-off.
    backoff_needed: bool,
    /// A back-off timer is pending.
    backing_off: bool,
    /// Resource failures since the last successful accept (for light logging).
    failure_streak: u64,
}

struct Shard<D: Driver> {
    index: usize,
    driver: D,
    app: Arc<App>,
    shared: Arc<Shared>,
    tuning: ShardTuning,
    listeners: Vec<Listener>,
    conns: Vec<Option<Conn>>,
    /// The idle sweep ([`Shard::sweep_idle`]): the next slot to look at, slots owed
    /// (times `sweep_ms`), when it last ran, and how long a whole pass takes.
    sweep_next: usize,
    sweep_credit: u64,
    swept_ms: u64,
    sweep_ms: u64,
    open: usize,
    next_generation: u32,
    timers: TimerWheel<TimerKey>,
    fired: Vec<timer::Entry<TimerKey>>,
    events: Vec<Event<D::RecvToken>>,
    touched: Vec<u32>,
    rearm: Vec<u32>,
    drain: Option<Drain>,
    now_ms: u64,
    /// This shard's parts of the gears' registries.
    regs: Registries,
    /// Shards to notify after this turn (deduplicated across gears).
    wake_list: Vec<usize>,
    wake_seen: Vec<bool>,
    /// When to hand cached heap memory back after connections opened or closed.
    release: MemoryRelease,
    /// The TLS listeners' settings, and the rustls configuration last taken from them
    /// (with its generation, to see a reload).
    tls: Option<TlsConfig>,
    tls_current: Option<(u64, Arc<rustls::ServerConfig>)>,
    /// The TLS state of the connections that have one (kept out of the slots, so that
    /// a plain connection does not carry its size).
    tls_conns: ByIndex<Box<TlsConn>>,
    /// Where a TLS connection's received bytes are decrypted to, for its session.
    tls_plain: Vec<u8>,
    /// Handing connections over to a new process (`handover`).
    handing: Option<handover::Handing>,
    /// Connections sent to a new process, until it answers (`handover`).
    parked: ByIndex<handover::Parked>,
    /// Connections from an old process whose sockets are being adopted, by token.
    adopting: ByIndex<crate::session::Thawed>,
    next_adopt_token: u32,
}

impl<D: Driver> Shard<D> {
    fn new(setup: ShardSetup, driver: D) -> Shard<D> {
        let ShardSetup {
            index,
            listeners,
            app,
            shared,
            tuning,
            release_memory,
            driver: _,
            tls,
        } = setup;
        let now_ms = shared.now_ms();
        let sweep_ms = deadlines::idle_sweep_ms(&app, &tuning);
        let regs = app.shard_registries(index, Arc::clone(&shared.gear_counters[index]));
        let shards = shared.event_fds.len();
        let listeners = listeners
            .into_iter()
            .map(|(l, tls)| Listener {
                ipv6: l.local_addr().map(|a| a.is_ipv6()).unwrap_or(false),
                tls,
                socket: Some(l),
                armed: false,
                backoff_needed: false,
                backing_off: false,
                failure_streak: 0,
            })
            .collect();
        Shard {
            index,
            // Reserved once for every slot the shard can use (direct descriptor slots,
            // or the open-file limit): address space only until a slot is first used.
            // Growing by doubling instead left each outgrown copy resident (the
            // allocator keeps freed large blocks), ~500 bytes per connection at 18,000.
            conns: Vec::with_capacity(driver.max_slots()),
            driver,
            app,
            timers: TimerWheel::new(tuning.tick_ms, tuning.timer_slots, now_ms),
            shared,
            tuning,
            listeners,
            sweep_next: 0,
            sweep_credit: 0,
            swept_ms: now_ms,
            sweep_ms,
            open: 0,
            next_generation: 0,
            fired: Vec::new(),
            events: Vec::new(),
            touched: Vec::new(),
            rearm: Vec::new(),
            drain: None,
            now_ms,
            regs,
            wake_list: Vec::new(),
            wake_seen: vec![false; shards],
            release: MemoryRelease::new(release_memory),
            tls,
            tls_current: None,
            tls_conns: ByIndex::default(),
            tls_plain: Vec::new(),
            handing: None,
            parked: ByIndex::default(),
            adopting: ByIndex::default(),
            next_adopt_token: 0,
        }
    }

    fn stats(&self) -> &ShardStats {
        &self.shared.stats[self.index]
    }

    fn run(&mut self) -> io::Result<()> {
        for listener in 0..self.listeners.len() as u32 {
            self.arm_accept(listener)?;
        }
        loop {
            // Block only with nothing inbound and no notification pending (see
            // `kythera_registry::Wakeup`); otherwise just submit and turn again.
            let may_sleep = !self.regs.has_inbound()
                && !self.shared.handover.has_incoming(self.index)
                && !self.shared.handover.has_acks(self.index)
                && self.shared.wakeup.prepare_sleep(self.index);
            let wait_ms = if may_sleep {
                self.timers.until_next_tick_ms(self.now_ms)
            } else {
                0
            };
            let mut events = std::mem::take(&mut self.events);
            let waited = self.driver.wait(wait_ms, &mut events);
            if may_sleep {
                self.shared.wakeup.woke(self.index);
            }
            waited?;
            self.now_ms = self.shared.now_ms();
            for event in events.drain(..) {
                self.handle(event)?;
            }
            self.events = events;
            self.turn()?;
            bump(&self.stats().loop_iterations, 1);
            if self.drained() {
                break;
            }
        }
        info!(shard = self.index, "shard drained");
        Ok(())
    }

    /// The rest of a turn after the events: timers, drain, re-arms, sends.
    fn turn(&mut self) -> io::Result<()> {
        let mut fired = std::mem::take(&mut self.fired);
        self.timers.advance(self.now_ms, &mut fired);
        for entry in fired.drain(..) {
            self.on_timer(entry)?;
        }
        self.fired = fired;
        self.sweep_idle();

        if self.drain.is_none() && self.shared.is_draining() {
            self.start_drain()?;
        }
        if self.drain.is_some() {
            self.drain_step();
            self.close_listeners_when_done()?;
        }
        self.take_acks();
        self.handover_step()?;
        self.take_incoming()?;
        self.deliver_registry();
        if let Some(hook) = self.release.due(self.now_ms) {
            let started = std::time::Instant::now();
            hook();
            bump(&self.stats().memory_releases, 1);
            debug!(
                shard = self.index,
                open = self.open,
                took_us = started.elapsed().as_micros() as u64,
                "memory released"
            );
        }

        for index in std::mem::take(&mut self.rearm) {
            self.arm_recv(index)?;
        }
        let mut touched = std::mem::take(&mut self.touched);
        for index in touched.drain(..) {
            self.flush(index)?;
        }
        self.touched = touched;
        self.send_wakeups()
    }

    fn handle(&mut self, event: Event<D::RecvToken>) -> io::Result<()> {
        if let Some(index) = event_slot(&event) {
            debug_assert!(
                self.conns.get(index as usize).is_some_and(Option::is_some),
                "event for empty slot {index}"
            );
        }
        match event {
            Event::Accept {
                listener,
                result,
                more,
            } => self.on_accept(listener, result, more),
            Event::Peer { index, addr } => self.on_peer(index, addr),
            Event::Recv { index, token } => {
                self.on_recv(index, token);
                Ok(())
            }
            Event::Sent { index, result } => {
                self.on_sent(index, result);
                Ok(())
            }
            Event::Unsent {
                index,
                output,
                sent,
            } => {
                self.on_unsent(index, output, sent);
                Ok(())
            }
            Event::Shutdown { index, res } => self.on_shutdown(index, res),
            Event::Closed { index, res } => {
                self.on_close(index, res);
                Ok(())
            }
            // The turn delivers whatever other shards queued.
            Event::Woken => Ok(()),
            Event::Detached { index, result } => self.on_detached(index, result),
            Event::Adopted { token, result } => self.on_adopted(token, result),
        }
    }

    // ----- registry -----

    /// Delivers what other shards, foreign threads and this shard's own callbacks
    /// queued for this shard's connections.
    fn deliver_registry(&mut self) {
        let waiting = self.regs.inbound_len() as u64;
        self.shared.stats[self.index]
            .registry_depth
            .store(waiting, Ordering::Relaxed);
        if waiting == 0 {
            return;
        }
        let mut to = ShardDeliveries {
            conns: &mut self.conns,
            touched: &mut self.touched,
            app: &self.app,
            now_ms: self.now_ms,
        };
        let taken = self.regs.deliver(REGISTRY_BATCH, &mut to);
        bump(&self.shared.stats[self.index].registry_in, taken as u64);
    }

    /// Wakes the shards this turn queued messages for that may be asleep; once per
    /// target per turn, never per message.
    fn send_wakeups(&mut self) -> io::Result<()> {
        let (list, seen) = (&mut self.wake_list, &mut self.wake_seen);
        self.regs.take_wakeups(&mut |t| {
            if !seen[t] {
                seen[t] = true;
                list.push(t);
            }
        });
        for i in 0..self.wake_list.len() {
            let target = self.wake_list[i];
            self.wake_seen[target] = false;
            if self.shared.wakeup.notify(target) {
                self.driver.wake(target)?;
            }
        }
        self.wake_list.clear();
        Ok(())
    }

    fn touch(&mut self, index: u32) {
        if let Some(conn) = conn_in(&mut self.conns, index)
            && !conn.flags.has(ConnFlags::TOUCHED)
        {
            conn.flags.set(ConnFlags::TOUCHED, true);
            self.touched.push(index);
        }
    }

    // ----- accept -----

    fn arm_accept(&mut self, listener: u32) -> io::Result<()> {
        let Some(l) = self.listeners.get_mut(listener as usize) else {
            return Ok(());
        };
        let Some(socket) = &l.socket else {
            return Ok(());
        };
        // Handing over: the new process accepts on these sockets.
        if l.armed || l.backing_off || self.handing.is_some() {
            return Ok(());
        }
        l.armed = true;
        self.driver.arm_accept(listener, socket)
    }

    fn on_accept(&mut self, listener: u32, result: Result<u32, i32>, more: bool) -> io::Result<()> {
        match result {
            Ok(index) => {
                bump(&self.stats().accepted, 1);
                let l = &mut self.listeners[listener as usize];
                l.failure_streak = 0;
                let (ipv6, tls) = (l.ipv6, l.tls);
                self.add_conn(index, ipv6, tls)?;
            }
            Err(errno) => {
                bump(&self.stats().accept_errors, 1);
                if matches!(
                    errno,
                    libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS
                ) {
                    bump(&self.stats().accept_backoffs, 1);
                    let index = self.index;
                    let backoff_ms = self.tuning.accept_backoff_ms;
                    let l = &mut self.listeners[listener as usize];
                    l.backoff_needed = true;
                    l.failure_streak += 1;
                    if l.failure_streak == 1 {
                        warn!(
                            shard = index,
                            error = %io::Error::from_raw_os_error(errno),
                            backoff_ms,
                            "accept failed for lack of resources; retrying after a back-off"
                        );
                    }
                    if more && let Some(socket) = &l.socket {
                        // The multishot should have ended; end it so it does not spin.
                        self.driver.cancel_accept(listener, socket)?;
                    }
                } else if errno != libc::ECANCELED {
                    debug!(shard = self.index, errno, "accept failed");
                }
            }
        }
        if !more {
            let closing = self.drain.as_ref().is_some_and(|d| d.listeners_closed);
            let l = &mut self.listeners[listener as usize];
            l.armed = false;
            if closing {
                l.socket = None;
            } else if self.handing.is_some() {
                // Handing over: the new process accepts on this socket now.
            } else if std::mem::take(&mut l.backoff_needed) {
                l.backing_off = true;
                let at = self.now_ms + self.tuning.accept_backoff_ms;
                self.timers.insert(at, TimerKey::AcceptRetry { listener });
            } else {
                self.arm_accept(listener)?;
            }
        }
        Ok(())
    }

    /// Makes room for a new connection in slot `index` (a socket just accepted or
    /// adopted) and gives it the next generation.
    fn claim_slot(&mut self, index: u32) -> u32 {
        let slot = index as usize;
        if self.conns.len() <= slot {
            self.conns.resize_with(slot + 1, || None);
        }
        debug_assert!(self.conns[slot].is_none(), "slot {slot} reused while open");
        let generation = self.next_generation;
        self.next_generation = (self.next_generation + 1) & MAX_GENERATION;
        generation
    }

    fn add_conn(&mut self, index: u32, ipv6: bool, tls: bool) -> io::Result<()> {
        let slot = index as usize;
        let generation = self.claim_slot(index);
        let mut flags = ConnFlags::default();
        flags.set(ConnFlags::PEER_PENDING, true);
        if tls {
            match self.new_tls_conn() {
                Some(state) => {
                    flags.set(ConnFlags::TLS, true);
                    self.tls_conns.insert(index, state);
                }
                // Without TLS state the connection cannot speak: it is closed at once.
                None => flags.set(ConnFlags::FORCED, true),
            }
        }
        let conn = Conn {
            session: None,
            generation,
            flags,
        };
        let slot_id = conn.slot(index);
        self.conns[slot] = Some(conn);
        self.open += 1;
        self.release.churned(self.now_ms);
        self.driver.peer_name(slot_id, ipv6)
    }

    /// TLS state for a new connection, with the current certificate (taken again
    /// after a reload).
    fn new_tls_conn(&mut self) -> Option<Box<TlsConn>> {
        let tls = self.tls.as_ref()?;
        let generation = tls.generation();
        if self
            .tls_current
            .as_ref()
            .is_none_or(|(g, _)| *g != generation)
        {
            self.tls_current = Some(tls.current());
        }
        let (_, config) = self.tls_current.as_ref()?;
        match TlsConn::new(Arc::clone(config)) {
            Ok(state) => Some(Box::new(state)),
            Err(err) => {
                warn!(shard = self.index, error = %err, "TLS connection refused");
                bump(&self.stats().tls_failed_protocol, 1);
                None
            }
        }
    }

    fn on_peer(&mut self, index: u32, addr: Option<std::net::SocketAddr>) -> io::Result<()> {
        let Some(conn) = conn_in(&mut self.conns, index) else {
            return Ok(());
        };
        conn.flags.set(ConnFlags::PEER_PENDING, false);
        conn.session = Some(Session::new(addr, self.now_ms, &self.app));
        self.touch(index);
        self.arm_recv(index)
    }

    // ----- recv -----

    fn arm_recv(&mut self, index: u32) -> io::Result<()> {
        let Some(conn) = conn_in(&mut self.conns, index) else {
            return Ok(());
        };
        if conn.flags.has(ConnFlags::RECV_ARMED)
            || conn.flags.has(ConnFlags::RECV_ENDED)
            || conn.flags.has(ConnFlags::CLOSE_SENT)
            || conn.finished()
        {
            return Ok(());
        }
        conn.flags.set(ConnFlags::RECV_ARMED, true);
        let slot = conn.slot(index);
        self.driver.arm_recv(slot)
    }

    fn on_recv(&mut self, index: u32, token: D::RecvToken) {
        let now_ms = self.now_ms;
        let shard = self.index;
        let received = self.driver.receive(index, &token);
        let (end, more) = (received.end, received.more);
        if let Some(conn) = conn_in(&mut self.conns, index) {
            if !received.data.is_empty() {
                let id = conn_id(shard, index, conn.generation);
                if conn.flags.has(ConnFlags::TLS) {
                    let stats = &self.shared.stats[shard];
                    let plain = &mut self.tls_plain;
                    if let Some(tls) = self.tls_conns.get_mut(&index) {
                        tls_receive(
                            tls,
                            conn,
                            id,
                            received.data,
                            plain,
                            stats,
                            now_ms,
                            &self.app,
                            &mut self.regs,
                        );
                    }
                } else if let Some(session) = conn.live_session() {
                    session.on_recv(id, received.data, now_ms, &self.app, &mut self.regs);
                }
            }
            let paused = conn.flags.has(ConnFlags::HANDOVER)
                && end == Some(RecvEnd::Closed(Some(libc::ECANCELED)));
            match end {
                None | Some(RecvEnd::NoBuffers) => {}
                // The recv was cancelled to hand the connection over (`handover`).
                Some(RecvEnd::Closed(_)) if paused => {}
                Some(RecvEnd::Closed(errno)) => {
                    // End-of-file, or an error (ECANCELED after a failed shutdown).
                    conn.flags.set(ConnFlags::RECV_ENDED, true);
                    let id = conn_id(shard, index, conn.generation);
                    if let Some(session) = conn.live_session() {
                        session.on_peer_gone(id, errno, now_ms, &self.app, &mut self.regs);
                    }
                }
            }
            if !more {
                conn.flags.set(ConnFlags::RECV_ARMED, false);
                // However it ended (cancelled, or out of buffers at the same moment),
                // a recv of a connection being handed over is not armed again here.
                if conn.flags.has(ConnFlags::HANDOVER) && !conn.flags.has(ConnFlags::RECV_ENDED) {
                    self.driver.release(token);
                    self.recv_paused(index);
                    self.touch(index);
                    return;
                }
                if !conn.flags.has(ConnFlags::RECV_ENDED) {
                    bump(&self.shared.stats[shard].recv_rearms, 1);
                    self.rearm.push(index);
                }
            }
        }
        self.driver.release(token);
        self.touch(index);
    }

    // ----- send -----

    fn on_sent(&mut self, index: u32, result: Result<crate::session::Output, i32>) {
        let Some(conn) = conn_in(&mut self.conns, index) else {
            return;
        };
        conn.flags.set(ConnFlags::SENDING, false);
        // Rare (a live handover): looked up again only then.
        let stopping = conn.flags.has(ConnFlags::SEND_STOPPING);
        match result {
            Ok(output) => {
                let tls = self.tls_conns.get_mut(&index);
                if let Some(session) = conn.session.as_mut() {
                    give_back(session, tls, output);
                }
            }
            Err(errno) => {
                if let Some(tls) = self.tls_conns.get_mut(&index) {
                    tls.held.clear();
                }
                // EPIPE, ECONNRESET, or the shutdown of a forced close.
                let id = conn_id(self.index, index, conn.generation);
                if let Some(session) = conn.live_session() {
                    session.on_peer_gone(id, Some(errno), self.now_ms, &self.app, &mut self.regs);
                }
            }
        }
        if stopping {
            self.send_stopped(index);
        }
        self.touch(index);
    }

    // ----- close -----

    /// Moves a finished connection towards its close: waits for its send (up to the
    /// closing timeout), shuts the socket down to end its recv, then closes it.
    fn begin_close(&mut self, index: u32) -> io::Result<()> {
        let closing_ms = ms(self.app.limits().closing_timeout);
        let now_ms = self.now_ms;
        let Some(conn) = conn_in(&mut self.conns, index) else {
            return Ok(());
        };
        if conn.flags.has(ConnFlags::CLOSE_SENT) {
            return Ok(());
        }
        let slot = conn.slot(index);
        let abandoned = conn.session.as_ref().is_some_and(Session::is_abandoned);
        let sending = conn.flags.has(ConnFlags::SENDING);
        if sending && !conn.flags.has(ConnFlags::FORCED) {
            if !conn.flags.has(ConnFlags::FORCE_SCHEDULED) {
                conn.flags.set(ConnFlags::FORCE_SCHEDULED, true);
                let key = TimerKey::ForceClose {
                    index,
                    generation: conn.generation,
                };
                let wait_ms = if abandoned {
                    SLOW_CONSUMER_GRACE_MS.min(closing_ms)
                } else {
                    closing_ms
                };
                self.timers.insert(now_ms + wait_ms, key);
            }
            if abandoned
                && conn.flags.has(ConnFlags::RECV_ARMED)
                && !conn.flags.has(ConnFlags::RECV_CANCELLED)
            {
                // A slow consumer: what it keeps sending is not read (its socket
                // buffer fills, then its TCP window closes), so it costs no CPU here.
                conn.flags.set(ConnFlags::RECV_CANCELLED, true);
                self.driver.cancel_recv(slot)?;
            }
            return Ok(());
        }
        if conn.flags.has(ConnFlags::RECV_ARMED) || sending {
            if !conn.flags.has(ConnFlags::SHUTDOWN_SENT) {
                conn.flags.set(ConnFlags::SHUTDOWN_SENT, true);
                conn.flags.set(ConnFlags::SHUTDOWN_IN_FLIGHT, true);
                self.driver.shutdown(slot)?;
            }
            return Ok(());
        }
        if conn.flags.has(ConnFlags::SHUTDOWN_IN_FLIGHT) || conn.flags.has(ConnFlags::PEER_PENDING)
        {
            return Ok(());
        }
        conn.flags.set(ConnFlags::CLOSE_SENT, true);
        self.driver.close(slot)
    }

    fn on_shutdown(&mut self, index: u32, res: i32) -> io::Result<()> {
        let Some(conn) = conn_in(&mut self.conns, index) else {
            return Ok(());
        };
        conn.flags.set(ConnFlags::SHUTDOWN_IN_FLIGHT, false);
        if res < 0 && conn.flags.has(ConnFlags::RECV_ARMED) {
            // ENOTCONN (the peer reset already, yet the recv has not ended): cancel it.
            let slot = conn.slot(index);
            self.driver.cancel_recv(slot)?;
        }
        self.touch(index);
        Ok(())
    }

    fn on_close(&mut self, index: u32, res: i32) {
        if res < 0 {
            debug!(
                shard = self.index,
                slot = index,
                errno = -res,
                "close failed"
            );
        }
        if let Some(slot) = self.conns.get_mut(index as usize) {
            let Some(mut conn) = slot.take() else { return };
            if let Some(tls) = self.tls_conns.remove(&index)
                && !tls.is_established()
                && !tls.has_failed()
            {
                // Closed before the handshake completed: the handshake timeout, or a
                // peer that left (or never spoke).
                bump(&self.shared.stats[self.index].tls_failed_incomplete, 1);
            }
            // A terminate still owed (the end of a drain) runs before the session goes.
            if let Some(session) = conn.session.as_mut().filter(|s| !s.is_terminated()) {
                let id = conn_id(self.index, index, conn.generation);
                session.shut_down(id, self.now_ms, &self.app, &mut self.regs);
            }
            if let Some(drain) = self.drain.as_mut()
                && conn.flags.has(ConnFlags::BEFORE_DRAIN)
            {
                drain.before_left -= 1;
            }
            self.open -= 1;
            self.release.churned(self.now_ms);
            bump(&self.shared.stats[self.index].closed, 1);
        }
    }

    // ----- after the batch -----

    /// Sends what the session queued (if no send is in flight), schedules its next
    /// deadline, and closes it when it is finished.
    fn flush(&mut self, index: u32) -> io::Result<()> {
        let now_ms = self.now_ms;
        let Some(conn) = conn_in(&mut self.conns, index) else {
            return Ok(());
        };
        conn.flags.set(ConnFlags::TOUCHED, false);
        // Parked: sent to a new process (`handover`), which has not answered. Nothing
        // is written here meanwhile, where it could interleave with what the new
        // process writes; should it go away, what was queued goes out then.
        if conn.flags.has(ConnFlags::CLOSE_SENT) || conn.flags.has(ConnFlags::PARKED) {
            return Ok(());
        }
        let slot = conn.slot(index);
        // Being handed over: what is queued goes to the new process with it.
        let holding = conn.flags.has(ConnFlags::HANDOVER)
            && conn
                .live_session()
                .is_some_and(|s| s.movable_state() == Readiness::Movable);
        // Everything the session queued goes out in one send; a send that the driver
        // finished at once (epoll) lets the session queue more, which goes out too.
        while !holding && !conn.flags.has(ConnFlags::FORCED) && !conn.flags.has(ConnFlags::SENDING)
        {
            let Some(session) = conn.session.as_mut() else {
                break;
            };
            let plain = session.take_output(now_ms);
            let output = if conn.flags.has(ConnFlags::TLS) {
                let Some(tls) = self.tls_conns.get_mut(&index) else {
                    break;
                };
                let Ok(sealed) = tls.seal(plain, session.should_close()) else {
                    // A record that could not be sealed (a TLS 1.2 key worn out): the
                    // connection ends as a broken one.
                    let id = conn_id(self.index, index, conn.generation);
                    if let Some(session) = conn.live_session() {
                        session.on_peer_gone(
                            id,
                            Some(libc::EPROTO),
                            now_ms,
                            &self.app,
                            &mut self.regs,
                        );
                    }
                    break;
                };
                match sealed {
                    Some(records) => records,
                    None => {
                        // Nothing to send (an empty output): it goes straight back.
                        let any = !tls.held.is_empty();
                        for output in tls.held.drain(..) {
                            session.sent(output);
                        }
                        if any {
                            continue;
                        }
                        break;
                    }
                }
            } else {
                let Some(output) = plain else {
                    break;
                };
                output
            };
            if output.is_empty() {
                session.sent(output);
                continue;
            }
            conn.flags.set(ConnFlags::SENDING, true);
            let Some(result) = self.driver.send(slot, output)? else {
                break; // in flight: Event::Sent follows
            };
            conn.flags.set(ConnFlags::SENDING, false);
            match result {
                Ok(output) => give_back(session, self.tls_conns.get_mut(&index), output),
                Err(errno) => {
                    if let Some(tls) = self.tls_conns.get_mut(&index) {
                        tls.held.clear();
                    }
                    let id = conn_id(self.index, index, conn.generation);
                    if let Some(session) = conn.live_session() {
                        session.on_peer_gone(id, Some(errno), now_ms, &self.app, &mut self.regs);
                    }
                }
            }
        }
        // The only deadline kept in the wheel is the closing timeout, set once: one
        // entry per connection at a time is enough.
        let deadline = conn.live_session().and_then(|s| s.next_deadline_ms());
        if let Some(deadline) = deadline
            && !conn.flags.has(ConnFlags::TIMER_ARMED)
        {
            conn.flags.set(ConnFlags::TIMER_ARMED, true);
            let key = TimerKey::Session {
                index,
                generation: conn.generation,
            };
            self.timers.insert(deadline, key);
        }
        if conn.finished() {
            self.begin_close(index)?;
        }
        Ok(())
    }
}

impl<D: Driver> Drop for Shard<D> {
    fn drop(&mut self) {
        // Connections still open (a drain that gave up) terminate with the registry at
        // hand, so that their names and memberships do not outlive them. What the
        // kernel may still use of their operations is the driver's to wait for or leak.
        for (index, slot) in self.conns.iter_mut().enumerate() {
            let Some(conn) = slot else { continue };
            // Parked: the new process may own it, and terminates it there.
            if conn.flags.has(ConnFlags::PARKED) {
                continue;
            }
            let id = conn_id(self.index, index as u32, conn.generation);
            if let Some(session) = conn.session.as_mut()
                && !session.is_terminated()
            {
                session.shut_down(id, self.now_ms, &self.app, &mut self.regs);
            }
        }
    }
}

/// A completed send's output goes back to where it came from: the session, or (on a
/// TLS connection) the TLS state, which gives the session back what it sealed.
fn give_back(
    session: &mut Session,
    tls: Option<&mut Box<TlsConn>>,
    output: crate::session::Output,
) {
    match tls {
        Some(tls) => {
            tls.recycle(output);
            for plain in tls.held.drain(..) {
                session.sent(plain);
            }
        }
        None => session.sent(output),
    }
}

/// Received bytes of a TLS connection: decrypted and given to its session; the end of
/// the handshake counted and told to the session; a failure counted, and the session
/// ended as by a broken connection.
#[allow(clippy::too_many_arguments)]
fn tls_receive(
    tls: &mut TlsConn,
    conn: &mut Conn,
    id: kythera_handler_api::ConnId,
    data: &mut [u8],
    plain: &mut Vec<u8>,
    stats: &ShardStats,
    now_ms: u64,
    app: &App,
    regs: &mut Registries,
) {
    plain.clear();
    let mut deliver = |conn: &mut Conn, bytes: &mut [u8]| {
        if let Some(session) = conn.live_session() {
            session.on_recv(id, bytes, now_ms, app, regs);
        }
    };
    let mut result = tls.receive(data, plain, &mut |bytes| deliver(conn, bytes));
    if result == Ok(true) {
        bump(&stats.tls_handshakes, 1);
        let parts = tls.parts();
        if let Some(session) = conn.live_session() {
            session.set_tls(parts);
        }
        // The handshake's own plaintext (the upgrade request, if it came with the
        // client's last flight), then the records that came behind it.
        if !plain.is_empty() {
            deliver(conn, plain);
        }
        result = tls.receive(&mut [], plain, &mut |bytes| deliver(conn, bytes));
    }
    if let Err(failure) = result {
        let counter = match failure {
            Failure::NotTls => &stats.tls_failed_not_tls,
            Failure::RefusedByClient => &stats.tls_failed_refused,
            Failure::Protocol => &stats.tls_failed_protocol,
        };
        bump(counter, 1);
        if let Some(session) = conn.live_session() {
            session.on_peer_gone(id, Some(libc::EPROTO), now_ms, app, regs);
        }
    }
    // A large burst's plaintext is not kept for every later receive.
    if plain.capacity() > 256 * 1024 {
        *plain = Vec::new();
    }
}

/// The connection slot an event is about, if any.
fn event_slot<R>(event: &Event<R>) -> Option<u32> {
    match event {
        Event::Peer { index, .. }
        | Event::Recv { index, .. }
        | Event::Sent { index, .. }
        | Event::Unsent { index, .. }
        | Event::Shutdown { index, .. }
        | Event::Closed { index, .. }
        | Event::Detached { index, .. } => Some(*index),
        Event::Accept { .. } | Event::Woken | Event::Adopted { .. } => None,
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_defaults_are_valid() {
        let t = ShardTuning::default();
        assert!(t.buf_entries.is_power_of_two());
        assert!(t.cq_entries >= t.sq_entries);
        assert_eq!(t.tick_ms, 64);
    }

    #[test]
    fn counters_snapshot() {
        let stats = ShardStats::default();
        bump(&stats.accepted, 3);
        bump(&stats.closed, 1);
        let snap = stats.snapshot();
        assert_eq!(snap.accepted, 3);
        assert_eq!(snap.open(), 2);
    }
}
