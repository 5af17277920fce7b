//! One shard: a thread pinned to a core, with its own io_uring ring, provided-buffer
//! ring, direct-descriptor table, listeners and connections. Shards share nothing but
//! the [`App`] (gears, limits, per-gear counters) and the drain flag.
//!
//! The loop has the shape of [`crate::uring::echo`] and keeps its rules, with a
//! [`Session`] between recv and send:
//!
//! 1. submit what is queued and wait for a completion or the next timer tick;
//! 2. handle every completion: accepts create connections, recvs feed sessions with
//!    bytes borrowed from the buffer ring (recycled right after), sends complete;
//! 3. fire the timers that are due ([`TimerWheel`], lazy cancellation: only closing
//!    timeouts, accept back-offs and forced closes), and sweep a share of the slots for
//!    the coarse per-connection deadlines (handshake, idle, ping, pong, quiet output
//!    buffers: [`Session::swept_deadline_ms`]) so that an idle connection needs no
//!    timer entry;
//! 4. on drain, start closes (1001) spread over the drain window, and close the
//!    listeners once the connections from before the drain are gone;
//! 5. re-arm the recvs that ended with `ENOBUFS` (their buffers are back by now);
//! 6. for every connection touched in this iteration: start a send of everything its
//!    session queued (one send in flight per connection, so several frames go out in
//!    one send), schedule its next deadline, and close it when it is finished.
//!
//! # Lifecycle of a connection
//!
//! accept → `getsockopt(SO_PEERNAME)` (also on direct descriptors) → [`Session::new`]
//! and a multishot recv → ... → the session says [`Session::should_close`] → once no
//! send is in flight: `shutdown(SHUT_RDWR)` if the recv is still armed (it then ends)
//! → `close` once nothing of the connection is in flight → the slot is freed when the
//! close completes, so no completion can ever arrive for a slot that was reused. A send
//! that does not complete within the closing timeout after the session finished (a
//! peer that stopped reading) is ended by the same shutdown.
//!
//! # Running out of descriptors or memory
//!
//! An accept that fails with `EMFILE`, `ENFILE` (also: the direct-descriptor table is
//! full), `ENOMEM` or `ENOBUFS` is not re-armed at once but after
//! [`ShardTuning::accept_backoff_ms`], through the timer wheel, so the core does not spin
//! while open connections keep working. With direct descriptors the kernel has already
//! taken the connection off the backlog when it finds the table full, and closes it.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::any::Any;

use handler_api::{CloseFrame, ConnId};
use io_uring::cqueue;
use io_uring::opcode;
use io_uring::squeue;
use io_uring::types::{self, CancelBuilder};
use registry::SharedFrame;
use tracing::{debug, info, warn};

use crate::gear::{App, Deliveries, Registries};
use crate::server::Shared;
use crate::session::{Output, Session};
use crate::side_table::{Key, SideTable};
use crate::timer::{self, TimerWheel};
use crate::uring::buf_ring::BufRing;
use crate::uring::completion::{Op, UserData, buffer_id, has_more};
use crate::uring::net::{Socket, accept_multi};
use crate::uring::ring::Ring;

/// Sizes and delays of a shard's io_uring resources and loop. The defaults serve; tests
/// shrink them to reach the edges (an empty buffer ring, a full descriptor table).
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

/// Descriptors kept out of the direct table's size: the ring, listeners, logs.
const DIRECT_SLOTS_MARGIN: usize = 64;
/// The kernel's bound on a registered file table (`IORING_MAX_FIXED_FILES`).
const MAX_DIRECT_SLOTS: usize = 1 << 20;
/// After the drain window and the closing timeout, how long to wait for the forced
/// closes to complete before giving up on them.
const FORCED_CLOSE_GRACE_MS: u64 = 2_000;

/// How long a slow consumer's socket stays open after its 1008 (its recv cancelled,
/// its queue freed) for the send in flight and the close frame to go out if it reads
/// after all; then it is shut down.
const SLOW_CONSUMER_GRACE_MS: u64 = 1_000;

/// A shard's counters, written by its thread only (relaxed atomics), readable from any
/// thread.
#[derive(Debug, Default)]
pub struct ShardStats {
    accepted: AtomicU64,
    closed: AtomicU64,
    accept_errors: AtomicU64,
    accept_backoffs: AtomicU64,
    enobufs: AtomicU64,
    recv_rearms: AtomicU64,
    memory_releases: AtomicU64,
    vectored_sends: AtomicU64,
    partial_sends: AtomicU64,
    zero_copy_notifications: AtomicU64,
    forced_closes: AtomicU64,
    bytes_received: AtomicU64,
    bytes_sent: AtomicU64,
    loop_iterations: AtomicU64,
    submissions: AtomicU64,
    registry_in: AtomicU64,
    wakeups_sent: AtomicU64,
    wakeups_received: AtomicU64,
    /// Registry envelopes waiting when the shard last looked (a gauge).
    registry_depth: AtomicU64,
}

/// A snapshot of a shard's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardCounters {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections whose socket close completed.
    pub closed: u64,
    /// Accept completions with an error.
    pub accept_errors: u64,
    /// Accepts put off for lack of descriptors or memory.
    pub accept_backoffs: u64,
    /// Recvs that ended because the buffer ring was empty.
    pub enobufs: u64,
    /// Multishot recvs armed again after they ended.
    pub recv_rearms: u64,
    /// Calls of the server's memory-release hook ([`crate::ServerBuilder::release_memory`]).
    pub memory_releases: u64,
    /// Sends that sent less than asked and were continued.
    pub partial_sends: u64,
    /// Outputs queued in several buffers, sent with `sendmsg` (counted once, however
    /// many submissions they took).
    pub vectored_sends: u64,
    /// Zero-copy send notifications received (sends whose pages the kernel released).
    pub zero_copy_notifications: u64,
    /// Connections shut down without waiting any longer for their sends (a peer that
    /// stopped reading, or the end of a drain).
    pub forced_closes: u64,
    /// Bytes received.
    pub bytes_received: u64,
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Turns of the loop.
    pub loop_iterations: u64,
    /// Operations submitted.
    pub submissions: u64,
    /// Registry envelopes taken from this shard's inbound queues.
    pub registry_in: u64,
    /// `MSG_RING` wake-ups sent to other shards.
    pub wakeups_sent: u64,
    /// Wake-ups received (from other shards or from foreign threads' eventfd writes).
    pub wakeups_received: u64,
    /// Connections running a gear now (upgraded, `terminate` not run yet), all gears.
    pub websockets: u64,
    /// Data messages received from clients, all gears.
    pub frames_in: u64,
    /// Frames sent to clients, all gears.
    pub frames_out: u64,
}

impl ShardCounters {
    /// Connections accepted and not yet closed.
    pub fn open(&self) -> u64 {
        self.accepted.saturating_sub(self.closed)
    }
}

impl ShardStats {
    /// Registry envelopes waiting in the shard's inbound queues when it last looked.
    pub(crate) fn registry_depth(&self) -> u64 {
        self.registry_depth.load(Ordering::Relaxed)
    }

    /// The counters now.
    pub fn snapshot(&self) -> ShardCounters {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ShardCounters {
            accepted: get(&self.accepted),
            closed: get(&self.closed),
            accept_errors: get(&self.accept_errors),
            accept_backoffs: get(&self.accept_backoffs),
            enobufs: get(&self.enobufs),
            recv_rearms: get(&self.recv_rearms),
            memory_releases: get(&self.memory_releases),
            vectored_sends: get(&self.vectored_sends),
            partial_sends: get(&self.partial_sends),
            zero_copy_notifications: get(&self.zero_copy_notifications),
            forced_closes: get(&self.forced_closes),
            bytes_received: get(&self.bytes_received),
            bytes_sent: get(&self.bytes_sent),
            loop_iterations: get(&self.loop_iterations),
            submissions: get(&self.submissions),
            registry_in: get(&self.registry_in),
            wakeups_sent: get(&self.wakeups_sent),
            wakeups_received: get(&self.wakeups_received),
            // Gear figures are kept per gear; `ServerHandle::stats` adds them.
            websockets: 0,
            frames_in: 0,
            frames_out: 0,
        }
    }
}

/// Adds to a counter that only this shard's thread writes.
fn bump(counter: &AtomicU64, by: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

/// What a shard thread is given.
pub(crate) struct ShardSetup {
    pub index: usize,
    pub listeners: Vec<TcpListener>,
    pub app: Arc<App>,
    pub shared: Arc<Shared>,
    pub tuning: ShardTuning,
    pub release_memory: Option<fn()>,
}

/// The body of a shard thread: pins it, sets the shard up and runs it until it has
/// drained.
pub(crate) fn run(setup: ShardSetup) -> io::Result<()> {
    pin_to_core(setup.index);
    let mut shard = Shard::new(setup)?;
    let result = shard.run();
    if let Err(err) = &result {
        tracing::error!(shard = shard.index, error = %err, "shard failed");
    }
    result
}

/// Pins the calling thread to the `shard`-th CPU it may run on (modulo their count).
/// Failure (a restricted container, say) is ignored: the shard runs unpinned.
fn pin_to_core(shard: usize) {
    // SAFETY: cpu_set_t is plain old data; all zeroes is the empty set.
    let mut allowed: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most `size_of::<cpu_set_t>()` bytes into the
    // set, which lives on this stack.
    let ok = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut allowed) };
    if ok != 0 {
        return;
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu < CPU_SETSIZE`, the size of the set.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &allowed) })
        .collect();
    let Some(&cpu) = cpus.get(shard % cpus.len().max(1)) else {
        return;
    };
    // SAFETY: as above, plain old data.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu < CPU_SETSIZE`.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity reads the set, which lives on this stack; thread 0 is
    // the calling thread.
    let res = unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
    if res != 0 {
        debug!(shard, cpu, "could not pin the shard thread");
    }
}

/// The ring and the count of operations in flight: every push goes through here.
struct Io {
    ring: Ring,
    /// Operations submitted whose last completion has not arrived.
    in_flight: usize,
    shared: Arc<Shared>,
    shard: usize,
}

impl Io {
    /// # Safety
    ///
    /// As [`Ring::push`]: whatever the entry points to stays valid until its last
    /// completion.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: passed on to the caller.
        unsafe { self.ring.push(entry) }?;
        self.in_flight += 1;
        bump(&self.shared.stats[self.shard].submissions, 1);
        Ok(())
    }

    /// Pushes an operation that the drain does not wait for (wake-ups, the eventfd
    /// read): its completions must not decrement `in_flight`.
    ///
    /// # Safety
    ///
    /// As [`Ring::push`].
    unsafe fn push_uncounted(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: passed on to the caller.
        unsafe { self.ring.push(entry) }?;
        bump(&self.shared.stats[self.shard].submissions, 1);
        Ok(())
    }

    /// Cancels every operation with `user_data` (a cancellation points to no memory).
    fn cancel(&mut self, user_data: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel2::new(CancelBuilder::user_data(user_data).all())
            .build()
            .user_data(UserData::new(Op::Cancel, 0).encode());
        // SAFETY: a cancellation points to no memory.
        unsafe { self.push(&entry) }
    }
}

/// A listener and the state of its multishot accept.
struct Listener {
    /// `None` once closed (drain).
    socket: Option<TcpListener>,
    ipv6: bool,
    armed: bool,
    /// The last accept failed for lack of resources: re-arm after the back-off.
    backoff_needed: bool,
    /// A back-off timer is pending.
    backing_off: bool,
    /// Resource failures since the last successful accept (for light logging).
    failure_streak: u64,
}

/// The peer address as `getsockopt(SO_PEERNAME)` writes it; boxed so that its address
/// stays put while the operation is in flight.
struct PeerBuf(libc::sockaddr_storage);

/// Bytes handed to a send: owned here until the send's completion.
struct InFlightSend {
    output: Output,
    /// Bytes of the output sent so far.
    sent: usize,
    /// Bytes of the output in all.
    len: usize,
    /// For an output of several buffers: the `sendmsg` header and its iovecs, boxed so
    /// that they stay put (the side table may move its entries) until the completion.
    msg: Option<Box<SendMsg>>,
    /// Zero-copy notifications still to come: the kernel may read `bytes` until then.
    zc_notifs: u32,
    /// Every byte was sent (or the send failed); only notifications are awaited.
    done: bool,
}

/// A `sendmsg` header and the iovecs it points to.
struct SendMsg {
    hdr: libc::msghdr,
    iov: Vec<libc::iovec>,
}

/// The most iovecs one `sendmsg` takes (`UIO_MAXIOV`); the rest goes in the next.
const MAX_IOVECS: usize = 1024;

impl SendMsg {
    fn new() -> SendMsg {
        SendMsg {
            // SAFETY: all-zero is a valid msghdr (no name, no iovecs, no control data).
            hdr: unsafe { std::mem::zeroed() },
            iov: Vec::new(),
        }
    }

    /// Points the header at the bytes of `output` from `skip` on (at most
    /// [`MAX_IOVECS`] pieces).
    fn point_at(&mut self, output: &Output, mut skip: usize) -> *const libc::msghdr {
        self.iov.clear();
        let pieces = std::iter::once(&output.first[output.start..])
            .chain(output.rest.iter().map(Vec::as_slice));
        for piece in pieces {
            if skip >= piece.len() {
                skip -= piece.len();
                continue;
            }
            let piece = &piece[skip..];
            skip = 0;
            self.iov.push(libc::iovec {
                iov_base: piece.as_ptr() as *mut libc::c_void,
                iov_len: piece.len(),
            });
            if self.iov.len() == MAX_IOVECS {
                break;
            }
        }
        self.hdr.msg_iov = self.iov.as_mut_ptr();
        self.hdr.msg_iovlen = self.iov.len();
        &self.hdr
    }
}

/// A connection's slot. Its socket is not stored: the slot's index is the socket's
/// (its direct descriptor, or its fd), and the shard knows which kind it uses.
struct Conn {
    /// `None` while the peer address is read.
    session: Option<Session>,
    /// Distinguishes this connection from earlier ones in the same slot (timers).
    generation: u32,
    /// The `SO_PEERNAME` operation is in flight, writing into this buffer (in
    /// `Shard::peer_bufs`).
    peer_buf: Key,
    /// The send in flight, if any (in `Shard::sends`).
    sending: Key,
    flags: ConnFlags,
}

/// A connection's state bits (one `u16` rather than a `bool` each: memory per idle
/// connection is counted in bytes).
#[derive(Debug, Clone, Copy, Default)]
struct ConnFlags(u16);

impl ConnFlags {
    const RECV_ARMED: u16 = 1;
    /// The recv saw end-of-file or an error: never re-armed.
    const RECV_ENDED: u16 = 1 << 1;
    const SHUTDOWN_SENT: u16 = 1 << 2;
    const SHUTDOWN_IN_FLIGHT: u16 = 1 << 3;
    const CLOSE_SENT: u16 = 1 << 4;
    /// Stop waiting for sends: shut down and close.
    const FORCED: u16 = 1 << 5;
    const FORCE_SCHEDULED: u16 = 1 << 6;
    /// A timer entry stands for the session's next deadline.
    const TIMER_ARMED: u16 = 1 << 7;
    /// In the shard's list of connections to flush after this turn.
    const TOUCHED: u16 = 1 << 8;
    /// Open when the drain started: the listeners stay open until every such
    /// connection is gone (or the drain window is over).
    const BEFORE_DRAIN: u16 = 1 << 9;
    /// The recv was cancelled (a slow consumer: nothing it sends is read any more).
    const RECV_CANCELLED: u16 = 1 << 10;

    fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }

    fn set(&mut self, bit: u16, on: bool) {
        if on {
            self.0 |= bit;
        } else {
            self.0 &= !bit;
        }
    }
}

impl Conn {
    /// Whether the connection is to be closed (by the session, or by force).
    fn finished(&self) -> bool {
        if self.flags.has(ConnFlags::FORCED) {
            return true;
        }
        match &self.session {
            Some(session) => session.should_close(),
            None => self.peer_buf.is_none(),
        }
    }

    /// The session, while the shard still talks to it.
    fn live_session(&mut self) -> Option<&mut Session> {
        if self.flags.has(ConnFlags::FORCED) {
            return None;
        }
        self.session.as_mut().filter(|s| !s.should_close())
    }

    fn user_data(&self, op: Op, index: u32) -> u64 {
        UserData {
            op,
            index,
            tag: self.generation,
        }
        .encode()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TimerKey {
    /// A session deadline.
    Session { index: u32, generation: u32 },
    /// The session finished but a send is still in flight: stop waiting for it.
    ForceClose { index: u32, generation: u32 },
    /// Arm a listener's accept again after a back-off.
    AcceptRetry { listener: u32 },
}

/// The progress of a drain on this shard.
struct Drain {
    started_ms: u64,
    /// Connections to send the drain close to, in order.
    queue: VecDeque<(u32, u32)>,
    total: usize,
    forced: bool,
    /// Connections open when the drain started that are not closed yet.
    before_left: usize,
    /// The listeners were closed (accepts cancelled).
    listeners_closed: bool,
}

struct Shard {
    index: usize,
    io: Io,
    bufs: BufRing,
    direct: bool,
    app: Arc<App>,
    shared: Arc<Shared>,
    tuning: ShardTuning,
    listeners: Vec<Listener>,
    conns: Vec<Option<Conn>>,
    /// Sends in flight and peer-address buffers, out of the connection slots.
    sends: SideTable<InFlightSend>,
    peer_bufs: SideTable<Box<PeerBuf>>,
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
    cqes: Vec<cqueue::Entry>,
    touched: Vec<u32>,
    rearm: Vec<u32>,
    drain: Option<Drain>,
    now_ms: u64,
    /// This shard's parts of the gears' registries.
    regs: Registries,
    /// Shards to notify after this turn (deduplicated across gears).
    wake_list: Vec<usize>,
    wake_seen: Vec<bool>,
    /// Where the eventfd read writes its count: leaked on purpose, 8 bytes per shard,
    /// so that a read still armed when the ring goes away never writes into freed
    /// memory.
    event_buf: &'static mut u64,
    /// When to hand cached heap memory back after connections opened or closed.
    release: MemoryRelease,
}

/// How long no connection has opened or closed before a shard calls the release hook.
const RELEASE_QUIET_MS: u64 = 1_000;
/// While connections keep opening or closing, the hook runs at least this often.
const RELEASE_EVERY_MS: u64 = 10_000;

/// When a shard calls the server's memory-release hook
/// ([`crate::ServerBuilder::release_memory`]): once no connection has opened or closed
/// for [`RELEASE_QUIET_MS`] after some did (and every [`RELEASE_EVERY_MS`] while they
/// keep doing so), never while nothing changes.
///
/// Why: a burst of handshakes allocates and frees request, response and session
/// buffers in many size classes, and the allocator keeps what it freed for reuse
/// (mimalloc keeps the last page of each size class and purges freed pages only when
/// it is called again, which an idle shard never does). Measured with 10,000 idle
/// connections: about 230 KiB stayed resident after the handshakes (23 bytes per
/// connection), none once the hook had run (README, "Memory per idle connection").
/// Connections that only exchange messages do not trigger it: what they free they
/// allocate again.
struct MemoryRelease {
    hook: Option<fn()>,
    /// The first and the last open or close since the hook last ran.
    churn: Option<(u64, u64)>,
}

impl MemoryRelease {
    fn new(hook: Option<fn()>) -> MemoryRelease {
        MemoryRelease { hook, churn: None }
    }

    /// A connection opened or closed.
    fn churned(&mut self, now_ms: u64) {
        if self.hook.is_some() {
            let first = self.churn.map_or(now_ms, |(first, _)| first);
            self.churn = Some((first, now_ms));
        }
    }

    /// The hook to call now, if it is due (and then not again until more churn).
    fn due(&mut self, now_ms: u64) -> Option<fn()> {
        let (first, last) = self.churn?;
        let quiet = now_ms.saturating_sub(last) >= RELEASE_QUIET_MS;
        let overdue = now_ms.saturating_sub(first) >= RELEASE_EVERY_MS;
        if !(quiet || overdue) {
            return None;
        }
        self.churn = None;
        self.hook
    }
}

/// Envelopes taken from each gear's inbound queues per loop turn: enough to batch,
/// few enough that sockets are not starved while a flood is delivered.
const REGISTRY_BATCH: usize = 4096;

/// The buffer group of every shard's buffer ring (each shard has its own ring).
const BGID: u16 = 0;

fn conn_in(conns: &mut [Option<Conn>], index: u32) -> Option<&mut Conn> {
    conns.get_mut(index as usize)?.as_mut()
}

impl Shard {
    fn new(setup: ShardSetup) -> io::Result<Shard> {
        let ShardSetup {
            index,
            listeners,
            app,
            shared,
            tuning,
            release_memory,
        } = setup;
        let ring = Ring::with_cq_entries(tuning.sq_entries, tuning.cq_entries)
            .map_err(io::Error::other)?;
        let bufs = receive_buffers(&ring, index, &tuning)?;
        let slots = match tuning.direct_slots {
            Some(n) => n as usize,
            None => crate::uring::probe::open_file_limit()
                .unwrap_or(1024)
                .saturating_sub(DIRECT_SLOTS_MARGIN)
                .min(MAX_DIRECT_SLOTS),
        };
        let direct = slots > 0
            && match ring.submitter().register_files_sparse(slots as u32) {
                Ok(()) => true,
                Err(err) => {
                    warn!(shard = index, slots, error = %err, "no direct descriptors; using plain file descriptors");
                    false
                }
            };
        info!(
            shard = index,
            ring = %ring.flags(),
            direct_slots = if direct { slots } else { 0 },
            buffers = bufs.entries(),
            buffer_bytes = bufs.buf_size(),
            incremental = bufs.is_incremental(),
            "shard started"
        );
        let now_ms = shared.now_ms();
        let sweep_ms = idle_sweep_ms(&app, &tuning);
        let regs = app.shard_registries(index, Arc::clone(&shared.gear_counters[index]));
        shared.ring_fds[index].store(ring.as_raw_fd(), Ordering::Release);
        let shards = shared.ring_fds.len();
        let listeners = listeners
            .into_iter()
            .map(|l| Listener {
                ipv6: l.local_addr().map(|a| a.is_ipv6()).unwrap_or(false),
                socket: Some(l),
                armed: false,
                backoff_needed: false,
                backing_off: false,
                failure_streak: 0,
            })
            .collect();
        Ok(Shard {
            index,
            io: Io {
                ring,
                in_flight: 0,
                shared: Arc::clone(&shared),
                shard: index,
            },
            bufs,
            direct,
            app,
            timers: TimerWheel::new(tuning.tick_ms, tuning.timer_slots, now_ms),
            shared,
            tuning,
            listeners,
            // Reserved once for every slot the shard can use (direct descriptor slots,
            // or the open-file limit): address space only until a slot is first used.
            // Growing by doubling instead left each outgrown copy resident (the
            // allocator keeps freed large blocks), ~500 bytes per connection at 18,000.
            conns: Vec::with_capacity(if direct {
                slots
            } else {
                crate::uring::probe::open_file_limit().unwrap_or(1024)
            }),
            sends: SideTable::default(),
            peer_bufs: SideTable::default(),
            sweep_next: 0,
            sweep_credit: 0,
            swept_ms: now_ms,
            sweep_ms,
            open: 0,
            next_generation: 0,
            fired: Vec::new(),
            cqes: Vec::new(),
            touched: Vec::new(),
            rearm: Vec::new(),
            drain: None,
            now_ms,
            regs,
            wake_list: Vec::new(),
            wake_seen: vec![false; shards],
            event_buf: Box::leak(Box::new(0u64)),
            release: MemoryRelease::new(release_memory),
        })
    }

    fn stats(&self) -> &ShardStats {
        &self.shared.stats[self.index]
    }

    fn run(&mut self) -> io::Result<()> {
        for listener in 0..self.listeners.len() as u32 {
            self.arm_accept(listener)?;
        }
        self.arm_eventfd()?;
        loop {
            // Block only with nothing inbound and no notification pending (see
            // `registry::Wakeup`); otherwise just submit and turn again.
            let may_sleep =
                !self.regs.has_inbound() && self.shared.wakeup.prepare_sleep(self.index);
            let wait_ms = if may_sleep {
                self.timers.until_next_tick_ms(self.now_ms)
            } else {
                0
            };
            let waited = self.io.ring.wait(1, Duration::from_millis(wait_ms));
            if may_sleep {
                self.shared.wakeup.woke(self.index);
            }
            match waited {
                Ok(_) => {}
                // The completion queue overflowed: drain it below, then submit again.
                Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {}
                Err(err) => return Err(err),
            }
            self.now_ms = self.shared.now_ms();
            self.turn()?;
            bump(&self.stats().loop_iterations, 1);
            if self.drained() {
                break;
            }
        }
        info!(shard = self.index, "shard drained");
        Ok(())
    }

    /// One iteration after the wait: completions, timers, drain, re-arms, sends.
    fn turn(&mut self) -> io::Result<()> {
        let mut cqes = std::mem::take(&mut self.cqes);
        self.io.ring.drain_completions(&mut cqes);
        for cqe in cqes.drain(..) {
            self.complete(&cqe)?;
        }
        self.cqes = cqes;

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

    /// Wakes, with `MSG_RING`, the shards this turn queued messages for that may be
    /// asleep; once per target per turn, never per message.
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
            if !self.shared.wakeup.notify(target) {
                continue;
            }
            let fd = self.shared.ring_fds[target].load(Ordering::Acquire);
            if fd < 0 {
                continue; // not running yet (it drains its queues when it starts) or gone
            }
            let entry = opcode::MsgRingData::new(
                types::Fd(fd),
                0,
                UserData::new(Op::Wake, 0).encode(),
                None,
            )
            .build()
            .user_data(UserData::new(Op::MsgRing, target as u32).encode());
            // SAFETY: MSG_RING points to no memory of this process; a target ring that
            // closed meanwhile makes it fail with EBADF, which `complete` ignores.
            unsafe { self.io.push_uncounted(&entry) }?;
            bump(&self.shared.stats[self.index].wakeups_sent, 1);
        }
        self.wake_list.clear();
        Ok(())
    }

    /// Arms the read of this shard's eventfd, which foreign threads write to.
    fn arm_eventfd(&mut self) -> io::Result<()> {
        let fd = self.shared.event_fds[self.index].as_raw_fd();
        let entry = opcode::Read::new(types::Fd(fd), std::ptr::from_mut(self.event_buf).cast(), 8)
            .build()
            .user_data(UserData::new(Op::EventFd, 0).encode());
        // SAFETY: the buffer is leaked (`event_buf`), so it outlives the operation; the
        // eventfd lives in `Shared`, which outlives this shard.
        unsafe { self.io.push_uncounted(&entry) }
    }

    fn touch(&mut self, index: u32) {
        if let Some(conn) = conn_in(&mut self.conns, index)
            && !conn.flags.has(ConnFlags::TOUCHED)
        {
            conn.flags.set(ConnFlags::TOUCHED, true);
            self.touched.push(index);
        }
    }

    fn complete(&mut self, cqe: &cqueue::Entry) -> io::Result<()> {
        let more = has_more(cqe.flags());
        let Some(ud) = UserData::decode(cqe.user_data()) else {
            debug_assert!(false, "unknown user_data {:#x}", cqe.user_data());
            return Ok(());
        };
        let res = cqe.result();
        match ud.op {
            // Woken by another shard: the turn delivers whatever it queued.
            Op::Wake => {
                bump(&self.stats().wakeups_received, 1);
                return Ok(());
            }
            Op::MsgRing => return Ok(()),
            Op::EventFd => {
                bump(&self.stats().wakeups_received, 1);
                if res == -libc::ECANCELED && self.drain.is_some() {
                    return Ok(());
                }
                return self.arm_eventfd();
            }
            _ => {}
        }
        if !more {
            self.io.in_flight -= 1;
        }
        if !matches!(ud.op, Op::Accept | Op::Cancel) {
            debug_assert_eq!(
                self.conns
                    .get(ud.index as usize)
                    .and_then(|c| c.as_ref())
                    .map(|c| c.generation),
                Some(ud.tag),
                "{:?} completion for slot {} of another connection",
                ud.op,
                ud.index
            );
        }
        match ud.op {
            Op::Accept => self.on_accept(ud.index, res, more),
            Op::Recv => self.on_recv(ud.index, res, cqe.flags(), more),
            Op::Send if cqueue::notif(cqe.flags()) => {
                self.on_send_notif(ud.index);
                Ok(())
            }
            Op::Send => self.on_send(ud.index, res, more),
            Op::PeerName => self.on_peer_name(ud.index, res),
            Op::Shutdown => self.on_shutdown(ud.index, res),
            Op::Close => {
                self.on_close(ud.index, res);
                Ok(())
            }
            Op::Cancel => Ok(()),
            Op::Wake | Op::MsgRing | Op::EventFd => Ok(()),
        }
    }

    // ----- accept -----

    fn arm_accept(&mut self, listener: u32) -> io::Result<()> {
        let direct = self.direct;
        let Some(l) = self.listeners.get_mut(listener as usize) else {
            return Ok(());
        };
        let Some(socket) = &l.socket else {
            return Ok(());
        };
        if l.armed || l.backing_off {
            return Ok(());
        }
        let entry = accept_multi(socket.as_raw_fd(), direct)
            .user_data(UserData::new(Op::Accept, listener).encode());
        l.armed = true;
        // SAFETY: the accept points to no memory (no address buffer); the listener it
        // reads stays open until the accept's last completion (see `on_accept`).
        unsafe { self.io.push(&entry) }
    }

    fn on_accept(&mut self, listener: u32, res: i32, more: bool) -> io::Result<()> {
        if res >= 0 {
            bump(&self.stats().accepted, 1);
            let l = &mut self.listeners[listener as usize];
            l.failure_streak = 0;
            let ipv6 = l.ipv6;
            self.add_conn(Socket::accepted(res, self.direct), ipv6)?;
        } else {
            bump(&self.stats().accept_errors, 1);
            let errno = -res;
            let accepted = self.stats().accepted.load(Ordering::Relaxed);
            if self.direct && errno == libc::EINVAL && accepted == 0 {
                // A kernel without direct accept refuses the request itself.
                warn!(
                    shard = self.index,
                    "direct accept refused; using plain file descriptors"
                );
                self.direct = false;
            } else if matches!(
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
                if more {
                    // The multishot should have ended; end it so it does not spin.
                    self.io
                        .cancel(UserData::new(Op::Accept, listener).encode())?;
                }
            } else if errno != libc::ECANCELED {
                debug!(shard = self.index, errno, "accept failed");
            }
        }
        if !more {
            let closing = self.drain.as_ref().is_some_and(|d| d.listeners_closed);
            let l = &mut self.listeners[listener as usize];
            l.armed = false;
            if closing {
                l.socket = None;
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

    fn add_conn(&mut self, socket: Socket, ipv6: bool) -> io::Result<()> {
        let index = socket.index();
        let slot = index as usize;
        if self.conns.len() <= slot {
            self.conns.resize_with(slot + 1, || None);
        }
        debug_assert!(self.conns[slot].is_none(), "slot {slot} reused while open");
        let generation = self.next_generation;
        self.next_generation = (self.next_generation + 1) & UserData::MAX_TAG;
        // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
        let storage = unsafe { std::mem::zeroed() };
        let peer_buf = self.peer_bufs.insert(Box::new(PeerBuf(storage)));
        self.conns[slot] = Some(Conn {
            session: None,
            generation,
            peer_buf,
            sending: Key::NONE,
            flags: ConnFlags::default(),
        });
        self.open += 1;
        self.release.churned(self.now_ms);
        let Some(conn) = conn_in(&mut self.conns, index) else {
            return Ok(());
        };
        let len = if ipv6 {
            size_of::<libc::sockaddr_in6>()
        } else {
            size_of::<libc::sockaddr_in>()
        };
        let buf = self.peer_bufs.get_mut(conn.peer_buf).map(|b| &raw mut b.0);
        let Some(buf) = buf else { return Ok(()) };
        let entry = socket_at(index, self.direct)
            .peer_name(buf, len as u32)
            .user_data(conn.user_data(Op::PeerName, index));
        // SAFETY: the address buffer is boxed in the connection and dropped only in
        // `on_peer_name`, at this operation's completion; the connection is not removed
        // while it is in flight (`begin_close` waits for it).
        unsafe { self.io.push(&entry) }
    }

    fn on_peer_name(&mut self, index: u32, res: i32) -> io::Result<()> {
        let Some(conn) = conn_in(&mut self.conns, index) else {
            return Ok(());
        };
        let Some(buf) = self.peer_bufs.take(&mut conn.peer_buf) else {
            return Ok(());
        };
        let peer = if res > 0 {
            sockaddr_to_std(&buf.0)
        } else {
            // Kernels before 6.7 have no getsockopt in io_uring; a plain fd can still be
            // asked directly.
            match socket_at(index, self.direct) {
                Socket::Fd(fd) => getpeername(fd),
                Socket::Fixed(_) => None,
            }
        };
        conn.session = Some(Session::new(peer, self.now_ms, &self.app));
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
        let entry = socket_at(index, self.direct)
            .recv_multi(BGID)
            .user_data(conn.user_data(Op::Recv, index));
        // SAFETY: the recv writes only into buffers of `self.bufs`, which stays
        // registered and mapped while the ring lives (it is dropped after the loop has
        // waited for every operation, or leaked by its own Drop if unregistering fails).
        unsafe { self.io.push(&entry) }
    }

    fn on_recv(&mut self, index: u32, res: i32, flags: u32, more: bool) -> io::Result<()> {
        let now_ms = self.now_ms;
        let shard = self.index;
        let conn = conn_in(&mut self.conns, index);
        if let Some(bid) = buffer_id(flags) {
            let len = usize::try_from(res).unwrap_or(0);
            // SAFETY: the buffer id comes from this completion of a recv on this ring's
            // group, and is released below before any other completion is handled.
            let data = unsafe { self.bufs.received(bid, len) };
            if let Some(conn) = conn {
                let id = conn_id(shard, index, conn.generation);
                if let Some(session) = conn.live_session() {
                    session.on_recv(id, data, now_ms, &self.app, &mut self.regs);
                }
            }
            self.bufs.release(bid, len, cqueue::buffer_more(flags));
            bump(&self.shared.stats[self.index].bytes_received, len as u64);
        }
        let Some(conn) = conn_in(&mut self.conns, index) else {
            debug_assert!(false, "recv completion for empty slot {index}");
            return Ok(());
        };
        if res == -libc::ENOBUFS {
            bump(&self.shared.stats[self.index].enobufs, 1);
        } else if res <= 0 {
            // End-of-file, or an error (ECANCELED after a failed shutdown).
            conn.flags.set(ConnFlags::RECV_ENDED, true);
            let errno = (res < 0).then_some(-res);
            let id = conn_id(shard, index, conn.generation);
            if let Some(session) = conn.live_session() {
                session.on_peer_gone(id, errno, now_ms, &self.app, &mut self.regs);
            }
        }
        if !more {
            conn.flags.set(ConnFlags::RECV_ARMED, false);
            if !conn.flags.has(ConnFlags::RECV_ENDED) {
                bump(&self.shared.stats[self.index].recv_rearms, 1);
                self.rearm.push(index);
            }
        }
        self.touch(index);
        Ok(())
    }

    // ----- send -----

    /// Submits the unsent part of the connection's send.
    fn submit_send(&mut self, index: u32) -> io::Result<()> {
        let zc_min = self.tuning.send_zc_min_bytes;
        let Some(conn) = conn_in(&mut self.conns, index) else {
            return Ok(());
        };
        let Some(send) = self.sends.get_mut(conn.sending) else {
            return Ok(());
        };
        let socket = socket_at(index, self.direct);
        let entry = if send.output.rest.is_empty() {
            let rest = &send.output.first[send.output.start + send.sent..];
            let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
            if zc_min.is_some_and(|min| rest.len() >= min) {
                socket.send_zc(rest.as_ptr(), len)
            } else {
                socket.send(rest.as_ptr(), len)
            }
        } else {
            let msg = send.msg.get_or_insert_with(|| Box::new(SendMsg::new()));
            if send.sent == 0 {
                bump(&self.shared.stats[self.index].vectored_sends, 1);
            }
            socket.send_msg(msg.point_at(&send.output, send.sent))
        };
        let entry = entry.user_data(conn.user_data(Op::Send, index));
        // SAFETY: `self.sends` owns the bytes (and the boxed `sendmsg` header and
        // iovecs) until the send's last completion (and a zero-copy send's
        // notification); the slot is not freed while a send is in flight
        // (`begin_close`), and Drop leaks them if it could not wait.
        unsafe { self.io.push(&entry) }
    }

    /// A zero-copy send's notification: the kernel no longer reads the bytes.
    fn on_send_notif(&mut self, index: u32) {
        let Some(conn) = conn_in(&mut self.conns, index) else {
            debug_assert!(false, "send notification for empty slot {index}");
            return;
        };
        let Some(send) = self.sends.get_mut(conn.sending) else {
            debug_assert!(false, "send notification without a send on {index}");
            return;
        };
        send.zc_notifs -= 1;
        bump(&self.shared.stats[self.index].zero_copy_notifications, 1);
        if send.done
            && send.zc_notifs == 0
            && let Some(send) = self.sends.take(&mut conn.sending)
            && let Some(session) = conn.session.as_mut()
        {
            session.sent(send.output);
        }
        self.touch(index);
    }

    fn on_send(&mut self, index: u32, res: i32, notif_follows: bool) -> io::Result<()> {
        let Some(conn) = conn_in(&mut self.conns, index) else {
            debug_assert!(false, "send completion for empty slot {index}");
            return Ok(());
        };
        let Some(send) = self.sends.get_mut(conn.sending) else {
            debug_assert!(false, "send completion without a send on {index}");
            return Ok(());
        };
        if notif_follows {
            send.zc_notifs += 1;
        }
        let stats = &self.shared.stats[self.index];
        if res <= 0 {
            // EPIPE, ECONNRESET, or the shutdown of a forced close. (A send of a
            // non-empty buffer never returns 0 on a stream socket; treat it as an error
            // rather than loop on it.)
            let errno = if res < 0 { -res } else { libc::EPIPE };
            let id = conn_id(self.index, index, conn.generation);
            if let Some(session) = conn.live_session() {
                session.on_peer_gone(id, Some(errno), self.now_ms, &self.app, &mut self.regs);
            }
            send.done = true;
        } else {
            send.sent += res as usize;
            bump(&stats.bytes_sent, res as u64);
            if send.sent < send.len {
                bump(&stats.partial_sends, 1);
                if !conn.flags.has(ConnFlags::FORCED) {
                    return self.submit_send(index);
                }
                // Forced: the rest is dropped.
            }
            send.done = true;
        }
        // While notifications are due, the kernel may still read the bytes: they are
        // kept until the last one.
        if send.zc_notifs == 0
            && let Some(send) = self.sends.take(&mut conn.sending)
            && let (Some(session), true) = (conn.session.as_mut(), send.sent == send.len)
        {
            session.sent(send.output);
        }
        self.touch(index);
        Ok(())
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
        let abandoned = conn.session.as_ref().is_some_and(Session::is_abandoned);
        if conn.sending.is_some() && !conn.flags.has(ConnFlags::FORCED) {
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
                let ud = conn.user_data(Op::Recv, index);
                self.io.cancel(ud)?;
            }
            return Ok(());
        }
        if conn.flags.has(ConnFlags::RECV_ARMED) || conn.sending.is_some() {
            if !conn.flags.has(ConnFlags::SHUTDOWN_SENT) {
                conn.flags.set(ConnFlags::SHUTDOWN_SENT, true);
                conn.flags.set(ConnFlags::SHUTDOWN_IN_FLIGHT, true);
                let entry = socket_at(index, self.direct)
                    .shutdown()
                    .user_data(conn.user_data(Op::Shutdown, index));
                // SAFETY: a shutdown points to no memory.
                unsafe { self.io.push(&entry) }?;
            }
            return Ok(());
        }
        if conn.flags.has(ConnFlags::SHUTDOWN_IN_FLIGHT) || conn.peer_buf.is_some() {
            return Ok(());
        }
        conn.flags.set(ConnFlags::CLOSE_SENT, true);
        let entry = socket_at(index, self.direct)
            .close()
            .user_data(conn.user_data(Op::Close, index));
        // SAFETY: a close points to no memory.
        unsafe { self.io.push(&entry) }
    }

    fn on_shutdown(&mut self, index: u32, res: i32) -> io::Result<()> {
        let Some(conn) = conn_in(&mut self.conns, index) else {
            return Ok(());
        };
        conn.flags.set(ConnFlags::SHUTDOWN_IN_FLIGHT, false);
        if res < 0 && conn.flags.has(ConnFlags::RECV_ARMED) {
            // ENOTCONN (the peer reset already, yet the recv has not ended): cancel it.
            let ud = conn.user_data(Op::Recv, index);
            self.io.cancel(ud)?;
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
        if conn.flags.has(ConnFlags::CLOSE_SENT) {
            return Ok(());
        }
        let mut start_send = false;
        if !conn.flags.has(ConnFlags::FORCED)
            && conn.sending.is_none()
            && let Some(session) = conn.session.as_mut()
        {
            while let Some(output) = session.take_output(now_ms) {
                let len = output.len();
                if len == 0 {
                    session.sent(output);
                    continue;
                }
                conn.sending = self.sends.insert(InFlightSend {
                    output,
                    sent: 0,
                    len,
                    msg: None,
                    zc_notifs: 0,
                    done: false,
                });
                start_send = true;
                break;
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
        let finished = conn.finished();
        if start_send {
            self.submit_send(index)?;
        }
        if finished {
            self.begin_close(index)?;
        }
        Ok(())
    }

    // ----- timers -----

    fn on_timer(&mut self, entry: timer::Entry<TimerKey>) -> io::Result<()> {
        match entry.key {
            TimerKey::Session { index, generation } => {
                let now_ms = self.now_ms;
                let Some(conn) = conn_in(&mut self.conns, index) else {
                    return Ok(());
                };
                // Lazy cancellation: an entry of an earlier connection in this slot
                // means nothing.
                if conn.generation != generation {
                    return Ok(());
                }
                conn.flags.set(ConnFlags::TIMER_ARMED, false);
                let id = conn_id(self.index, index, generation);
                if let Some(session) = conn.live_session()
                    && session.next_deadline_ms().is_some_and(|d| d <= now_ms)
                {
                    session.on_tick(id, now_ms, &self.app, &mut self.regs);
                }
                self.touch(index);
            }
            TimerKey::ForceClose { index, generation } => {
                let Some(conn) = conn_in(&mut self.conns, index) else {
                    return Ok(());
                };
                if conn.generation != generation
                    || conn.flags.has(ConnFlags::CLOSE_SENT)
                    || conn.flags.has(ConnFlags::FORCED)
                {
                    return Ok(());
                }
                self.force(index);
            }
            TimerKey::AcceptRetry { listener } => {
                if let Some(l) = self.listeners.get_mut(listener as usize) {
                    l.backing_off = false;
                }
                if self.drain.as_ref().is_some_and(|d| d.listeners_closed) {
                    if let Some(l) = self.listeners.get_mut(listener as usize) {
                        l.socket = None;
                    }
                } else {
                    self.arm_accept(listener)?;
                }
            }
        }
        Ok(())
    }

    /// The coarse deadlines every connection has (handshake, idle, ping, pong, the
    /// return of quiet output buffers: [`Session::swept_deadline_ms`]) are not in the
    /// timer wheel: an entry per connection would cost 24 bytes per idle connection,
    /// and the idle deadline moves with every message. Instead every slot is looked at
    /// once per `sweep_ms`, a share of them at each turn in proportion to the time
    /// since the last, so such a deadline is acted on at most `sweep_ms` (plus a tick)
    /// after it passed. The wheel keeps the closing timeouts, which are rare.
    fn sweep_idle(&mut self) {
        let len = self.conns.len();
        let elapsed = self.now_ms.saturating_sub(self.swept_ms);
        self.swept_ms = self.now_ms;
        if len == 0 {
            return;
        }
        self.sweep_credit += len as u64 * elapsed;
        let due = self.sweep_credit / self.sweep_ms;
        if due == 0 {
            return;
        }
        self.sweep_credit -= due * self.sweep_ms;
        let due = if due >= len as u64 {
            self.sweep_credit = 0;
            len
        } else {
            due as usize
        };
        let now_ms = self.now_ms;
        for _ in 0..due {
            let index = self.sweep_next % len;
            self.sweep_next = index + 1;
            let Some(conn) = self.conns[index].as_mut() else {
                continue;
            };
            let id = conn_id(self.index, index as u32, conn.generation);
            let Some(session) = conn.live_session() else {
                continue;
            };
            if session
                .swept_deadline_ms(&self.app)
                .is_some_and(|d| d <= now_ms)
            {
                session.on_tick(id, now_ms, &self.app, &mut self.regs);
                self.touch(index as u32);
            }
        }
    }

    /// Stops waiting for the connection's sends and closes it.
    fn force(&mut self, index: u32) {
        if let Some(conn) = conn_in(&mut self.conns, index) {
            conn.flags.set(ConnFlags::FORCED, true);
            bump(&self.shared.stats[self.index].forced_closes, 1);
            self.touch(index);
        }
    }

    // ----- drain -----

    /// Starts the drain. The listeners stay open until the connections open now are
    /// gone or the drain window is over, so that `/healthz` can answer 503 to load
    /// balancers meanwhile; upgrades that arrive during the drain are refused with 503
    /// (`ServerDraining`) by the session.
    fn start_drain(&mut self) -> io::Result<()> {
        info!(
            shard = self.index,
            connections = self.open,
            "draining: refusing upgrades, closing connections"
        );
        let mut queue = VecDeque::new();
        for (i, c) in self.conns.iter_mut().enumerate() {
            if let Some(c) = c {
                c.flags.set(ConnFlags::BEFORE_DRAIN, true);
                queue.push_back((i as u32, c.generation));
            }
        }
        self.drain = Some(Drain {
            started_ms: self.now_ms,
            total: queue.len(),
            before_left: queue.len(),
            queue,
            forced: false,
            listeners_closed: false,
        });
        self.close_listeners_when_done()
    }

    /// Closes the listeners once every connection open when the drain started is gone,
    /// or the drain window is over.
    fn close_listeners_when_done(&mut self) -> io::Result<()> {
        let window_ms = ms(self.app.limits().drain_window);
        let Some(drain) = self.drain.as_mut() else {
            return Ok(());
        };
        let elapsed = self.now_ms.saturating_sub(drain.started_ms);
        if drain.listeners_closed || (drain.before_left > 0 && elapsed < window_ms) {
            return Ok(());
        }
        drain.listeners_closed = true;
        debug!(shard = self.index, "drain: closing the listeners");
        for (i, l) in self.listeners.iter_mut().enumerate() {
            if l.armed {
                // The listener closes when the accept's last completion arrives.
                let ud = UserData::new(Op::Accept, i as u32).encode();
                self.io.cancel(ud)?;
            } else {
                l.socket = None;
            }
        }
        Ok(())
    }

    /// Sends the drain close to the share of connections due by now, and forces the
    /// rest closed once the window and the closing timeout have passed.
    fn drain_step(&mut self) {
        let now_ms = self.now_ms;
        let window_ms = ms(self.app.limits().drain_window);
        let closing_ms = ms(self.app.limits().closing_timeout);
        let Some(drain) = self.drain.as_mut() else {
            return;
        };
        let elapsed = now_ms.saturating_sub(drain.started_ms);
        let due = if window_ms == 0 || elapsed >= window_ms {
            drain.total
        } else {
            // Proportional to the time elapsed, rounded up: the first ones go at once.
            ((drain.total as u128 * (u128::from(elapsed) + 1)).div_ceil(u128::from(window_ms)))
                as usize
        };
        let started = drain.total - drain.queue.len();
        let mut to_start = Vec::new();
        for _ in started..due.min(drain.total) {
            if let Some(item) = drain.queue.pop_front() {
                to_start.push(item);
            }
        }
        let force_now = !drain.forced && elapsed >= window_ms + closing_ms;
        if force_now {
            drain.forced = true;
        }
        for (index, generation) in to_start {
            let Some(conn) = conn_in(&mut self.conns, index) else {
                continue;
            };
            if conn.generation != generation {
                continue;
            }
            let id = conn_id(self.index, index, generation);
            if let Some(session) = conn.live_session() {
                session.start_drain(id, now_ms, &self.app, &mut self.regs);
            }
            self.touch(index);
        }
        if force_now {
            let open: Vec<u32> = self
                .conns
                .iter()
                .enumerate()
                .filter(|(_, c)| {
                    c.as_ref()
                        .is_some_and(|c| !c.flags.has(ConnFlags::CLOSE_SENT))
                })
                .map(|(i, _)| i as u32)
                .collect();
            if !open.is_empty() {
                warn!(
                    shard = self.index,
                    connections = open.len(),
                    "drain window over: closing the remaining connections"
                );
            }
            for index in open {
                self.force(index);
            }
        }
    }

    /// Whether the shard may stop: draining, and nothing left open or in flight (or
    /// the grace after forcing closes has run out).
    fn drained(&self) -> bool {
        let Some(drain) = &self.drain else {
            return false;
        };
        if self.open == 0 && self.io.in_flight == 0 {
            return true;
        }
        let limits = self.app.limits();
        let give_up = ms(limits.drain_window) + ms(limits.closing_timeout) + FORCED_CLOSE_GRACE_MS;
        let elapsed = self.now_ms.saturating_sub(drain.started_ms);
        if elapsed >= give_up {
            warn!(
                shard = self.index,
                connections = self.open,
                in_flight = self.io.in_flight,
                "drain: giving up on operations that did not complete"
            );
            return true;
        }
        false
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        self.shared.ring_fds[self.index].store(-1, Ordering::Release);
        // Connections still open (a drain that gave up) terminate with the registry at
        // hand, so that their names and memberships do not outlive them.
        for (index, slot) in self.conns.iter_mut().enumerate() {
            let Some(conn) = slot else { continue };
            let id = conn_id(self.index, index as u32, conn.generation);
            if let Some(session) = conn.session.as_mut()
                && !session.is_terminated()
            {
                session.shut_down(id, self.now_ms, &self.app, &mut self.regs);
            }
        }
        if self.io.in_flight == 0 {
            return;
        }
        // The kernel may still use memory of operations in flight (send bytes, peer
        // address buffers): cancel everything, wait a little, and leak what is still
        // pointed to rather than free it under the kernel.
        let cancel = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(UserData::new(Op::Cancel, 0).encode());
        // SAFETY: a cancellation points to no memory.
        if unsafe { self.io.push(&cancel) }.is_ok() {
            let mut cqes = Vec::new();
            for _ in 0..50 {
                if self.io.in_flight == 0 {
                    break;
                }
                if self.io.ring.wait(1, Duration::from_millis(20)).is_err() {
                    break;
                }
                cqes.clear();
                self.io.ring.drain_completions(&mut cqes);
                for cqe in &cqes {
                    if !has_more(cqe.flags()) {
                        self.io.in_flight -= 1;
                    }
                    if let Some(bid) = buffer_id(cqe.flags()) {
                        let len = usize::try_from(cqe.result()).unwrap_or(0);
                        // SAFETY: a buffer id from a completion of this group; it is
                        // released at once.
                        let _ = unsafe { self.bufs.received(bid, len) };
                        self.bufs
                            .release(bid, len, cqueue::buffer_more(cqe.flags()));
                    }
                    if let Some(ud) = UserData::decode(cqe.user_data())
                        && let Some(conn) = conn_in(&mut self.conns, ud.index)
                    {
                        match ud.op {
                            Op::Send => drop(self.sends.take(&mut conn.sending)),
                            Op::PeerName => drop(self.peer_bufs.take(&mut conn.peer_buf)),
                            _ => {}
                        }
                    }
                }
            }
        }
        if self.io.in_flight > 0 {
            for send in self.sends.drain() {
                std::mem::forget(send);
            }
            for buf in self.peer_bufs.drain() {
                std::mem::forget(buf);
            }
        }
    }
}

/// The socket of slot `index`: slots are numbered by direct descriptor, or by fd.
fn socket_at(index: u32, direct: bool) -> Socket {
    Socket::accepted(index as i32, direct)
}

/// How long one pass of the sweep takes: an eighth of the shortest swept timeout, at
/// least a tick and at most a second (so with the defaults a 60 s idle connection is
/// closed within 61 s).
fn idle_sweep_ms(app: &App, tuning: &ShardTuning) -> u64 {
    let l = app.limits();
    let shortest = [
        Some(l.idle_timeout),
        Some(l.handshake_timeout),
        Some(l.pong_timeout),
        l.ping_interval,
    ]
    .into_iter()
    .flatten()
    .map(ms)
    .min()
    .unwrap_or(u64::MAX);
    (shortest / 8).clamp(tuning.tick_ms.max(1), 1_000)
}

/// A connection's id: the shard, the slot and the slot's generation, so that a
/// registry message finds its connection without a lookup table and never reaches a
/// later connection in the same slot (unless 2^24 connections used the slot between).
fn conn_id(shard: usize, index: u32, generation: u32) -> ConnId {
    ConnId::new(
        shard as u8,
        (u64::from(generation & UserData::MAX_TAG) << 32) | u64::from(index),
    )
}

/// The slot and generation in a connection id made by [`conn_id`].
fn conn_slot(id: ConnId) -> (u32, u32) {
    let raw = id.get();
    (raw as u32, ((raw >> 32) as u32) & UserData::MAX_TAG)
}

/// The shard's side of [`Deliveries`]: finds the connection by id and runs its session.
struct ShardDeliveries<'a> {
    conns: &'a mut Vec<Option<Conn>>,
    touched: &'a mut Vec<u32>,
    app: &'a App,
    now_ms: u64,
}

impl ShardDeliveries<'_> {
    fn session(&mut self, id: ConnId) -> Option<(u32, &mut Session)> {
        let (index, generation) = conn_slot(id);
        let conn = conn_in(self.conns, index)?;
        if conn.generation != generation {
            return None;
        }
        if !conn.flags.has(ConnFlags::TOUCHED) {
            conn.flags.set(ConnFlags::TOUCHED, true);
            self.touched.push(index);
        }
        Some((index, conn.live_session()?))
    }
}

impl Deliveries for ShardDeliveries<'_> {
    fn message(&mut self, conn: ConnId, msg: &mut dyn Any, regs: &mut Registries) -> bool {
        let (now, app) = (self.now_ms, self.app);
        self.session(conn)
            .is_some_and(|(_, s)| s.on_server_message(conn, msg, now, app, regs))
    }

    fn frame(&mut self, conn: ConnId, frame: &SharedFrame, regs: &mut Registries) -> bool {
        let (now, app) = (self.now_ms, self.app);
        self.session(conn)
            .is_some_and(|(_, s)| s.on_published_frame(conn, frame, now, app, regs))
    }

    fn close(&mut self, conn: ConnId, close: Option<CloseFrame>, regs: &mut Registries) -> bool {
        let (now, app) = (self.now_ms, self.app);
        self.session(conn)
            .is_some_and(|(_, s)| s.on_published_close(conn, close, now, app, regs))
    }

    fn name_lost(&mut self, conn: ConnId, name: &str, regs: &mut Registries) -> bool {
        let (now, app) = (self.now_ms, self.app);
        self.session(conn)
            .is_some_and(|(_, s)| s.on_name_lost(conn, name, now, app, regs))
    }

    fn names_decided(&mut self, conn: ConnId, lost: Option<&str>, regs: &mut Registries) -> bool {
        let (now, app) = (self.now_ms, self.app);
        self.session(conn)
            .is_some_and(|(_, s)| s.on_names_decided(conn, lost, now, app, regs))
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The shard's receive buffers as `tuning` asks. Without incremental consumption
/// (kernels before 6.15) a receive takes a whole buffer, so large buffers would be
/// wasted on small messages: the same memory is then cut into 4 KiB buffers.
fn receive_buffers(ring: &Ring, shard: usize, tuning: &ShardTuning) -> io::Result<BufRing> {
    let (entries, size) = (tuning.buf_entries, tuning.buf_size);
    if !tuning.incremental_buffers {
        return BufRing::new(ring, BGID, entries, size);
    }
    match BufRing::new_incremental(ring, BGID, entries, size) {
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            let (entries, size) = whole_buffers(entries, size);
            info!(
                shard,
                buffers = entries,
                buffer_bytes = size,
                "no incremental receive buffers here; each receive takes a whole buffer"
            );
            BufRing::new(ring, BGID, entries, size)
        }
        result => result,
    }
}

/// The receive buffers for `entries` buffers of `size` bytes where each receive takes
/// a whole buffer: the same memory in 4 KiB buffers (as many as fit, a power of two),
/// or the buffers as they are if they are no larger.
fn whole_buffers(entries: u16, size: u32) -> (u16, u32) {
    if size <= 4096 {
        return (entries, size);
    }
    let total = u64::from(entries) * u64::from(size);
    let n = (total / 4096).clamp(1, u64::from(crate::uring::buf_ring::MAX_ENTRIES));
    (1 << (63 - n.leading_zeros()), 4096)
}

/// The address in a `sockaddr_storage` filled by the kernel, if it is IPv4 or IPv6.
fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, and
            // sockaddr_storage is larger than and aligned for it.
            let sin = unsafe { &*std::ptr::from_ref(storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6, and
            // sockaddr_storage is larger than and aligned for it.
            let sin6 = unsafe { &*std::ptr::from_ref(storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// `getpeername(2)` on a plain fd.
fn getpeername(fd: i32) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into the storage, which lives on
    // this stack, and the new length into `len`.
    let res = unsafe { libc::getpeername(fd, (&raw mut storage).cast(), &mut len) };
    if res != 0 {
        return None;
    }
    sockaddr_to_std(&storage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_round_trip() {
        let v4: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let listener = TcpListener::bind(v4).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (server, peer) = listener.accept().unwrap();
        assert_eq!(getpeername(server.as_raw_fd()), Some(peer));
        assert_eq!(peer, client.local_addr().unwrap());
    }

    #[test]
    fn whole_buffers_keep_the_memory_in_4_kib_buffers() {
        assert_eq!(whole_buffers(64, 64 * 1024), (1024, 4096));
        assert_eq!(whole_buffers(16, 256), (16, 256));
        assert_eq!(whole_buffers(3, 5000), (2, 4096));
        assert_eq!(whole_buffers(32768, 1 << 20), (32768, 4096));
    }

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

    #[test]
    fn sendmsg_points_past_what_was_sent() {
        let output = Output {
            first: b"xxhello".to_vec(),
            start: 2,
            rest: vec![b" big".to_vec(), b" world".to_vec()],
        };
        let mut msg = SendMsg::new();
        let pieces = |msg: &SendMsg| -> Vec<Vec<u8>> {
            msg.iov
                .iter()
                .map(|v| {
                    let (base, len) = (v.iov_base as *const u8, v.iov_len);
                    // SAFETY: the iovecs point into `output`, alive and unchanged here.
                    unsafe { std::slice::from_raw_parts(base, len) }.to_vec()
                })
                .collect()
        };
        let hdr = msg.point_at(&output, 0);
        assert_eq!(hdr, &msg.hdr as *const _);
        assert_eq!(msg.hdr.msg_iovlen, 3);
        assert_eq!(pieces(&msg), [&b"hello"[..], b" big", b" world"]);
        // After a partial send of 7 bytes: "hello b" went.
        msg.point_at(&output, 7);
        assert_eq!(pieces(&msg), [&b"ig"[..], b" world"]);
        msg.point_at(&output, 9);
        assert_eq!(pieces(&msg), [&b" world"[..]]);
        msg.point_at(&output, 14);
        assert_eq!(pieces(&msg), [&b"d"[..]]);
        assert_eq!(output.len(), 15);
        // At most MAX_IOVECS per sendmsg.
        let many = Output {
            first: vec![1],
            start: 0,
            rest: vec![vec![2]; 2000],
        };
        msg.point_at(&many, 0);
        assert_eq!(msg.iov.len(), MAX_IOVECS);
        msg.point_at(&many, 1500);
        assert_eq!(msg.iov.len(), 501);
    }

    #[test]
    fn memory_is_released_after_churn_once_quiet() {
        fn hook() {}
        let mut r = MemoryRelease::new(Some(hook));
        assert!(r.due(5_000).is_none(), "nothing opened or closed yet");
        r.churned(1_000);
        r.churned(1_500);
        assert!(r.due(2_499).is_none(), "not quiet for a second yet");
        assert!(r.due(2_500).is_some());
        assert!(r.due(9_000).is_none(), "once per burst");
        // Steady churn: every RELEASE_EVERY_MS at least.
        let mut t = 10_000;
        let mut calls = 0;
        while t < 40_000 {
            r.churned(t);
            if r.due(t).is_some() {
                calls += 1;
            }
            t += 500;
        }
        assert_eq!(calls, 2, "released at 20 s and 30.5 s");
        let mut none = MemoryRelease::new(None);
        none.churned(0);
        assert!(none.due(60_000).is_none());
    }

    /// Memory per idle connection is a goal in bytes (README, "Memory"): the slot of
    /// an open, idle connection is 64 bytes (with the session's 48), and the echo
    /// gear's state box 48 (`gear::tests`). Growing either should be a decision.
    #[test]
    fn an_idle_connection_slot_is_64_bytes() {
        assert_eq!(size_of::<Session>(), 48);
        assert_eq!(size_of::<Option<Conn>>(), 64);
    }
}
