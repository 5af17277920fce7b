//! The shard's I/O, behind one small interface with two implementations.
//!
//! A shard ([`crate::shard`]) owns its connections and their sessions; a `Driver` owns
//! the kernel side: descriptors, operations in flight and the bytes they point to. The
//! interface is completion-shaped (the shard asks for an operation, an `Event` later
//! says how it ended), which is io_uring's own shape; the epoll driver produces the
//! same events from readiness. All the `unsafe` of the shard's I/O lives below this
//! line: the shard hands buffers over by value ([`Output`]) and gets them back in
//! `Event::Sent`, so it cannot free what the kernel may still read.
//!
//! | module | holds |
//! |---|---|
//! | [`uring`] | the io_uring layer (ring, provided buffers, probe) and `uring::UringDriver` |
//! | [`epoll`] | `epoll::EpollDriver`: non-blocking sockets, `epoll_wait`, an eventfd for wake-ups |
//! | [`iovec`] | the iovecs of an [`Output`] of several buffers, for `sendmsg` (both drivers) |
//! | [`listener`] | the `SO_REUSEPORT` listeners every shard binds (`socket2`) |
//! | [`sys`] | the few plain system calls both use (thread affinity, peer address) |
//!
//! # The contract
//!
//! - Connections are named by their slot index (the fd, or the direct descriptor) and
//!   the slot's generation; an event never arrives for a slot whose close completed.
//! - `arm_accept` and `arm_recv` are multishot: they produce events with `more` set
//!   until one without, after which the shard arms them again if it wants more.
//! - One send at a time per connection; the driver continues a partial send itself and
//!   reports once, when every byte went out or the send failed (at once, from
//!   `Driver::send`, when that is known right away).
//! - `Driver::in_flight` counts operations whose last event has not arrived; a
//!   draining shard stops when it is zero.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::str::FromStr;

use crate::session::Output;

pub mod epoll;
pub mod iovec;
pub mod listener;
pub mod sys;
pub mod uring;

/// Which I/O driver the shards run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoChoice {
    /// io_uring when the start-up probe passes, else epoll (with one log line that
    /// says why).
    #[default]
    Auto,
    /// io_uring, or refuse to start with the probe's explanation.
    Uring,
    /// epoll, without probing io_uring.
    Epoll,
}

impl FromStr for IoChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(IoChoice::Auto),
            "uring" | "io_uring" => Ok(IoChoice::Uring),
            "epoll" => Ok(IoChoice::Epoll),
            other => Err(format!(
                "unknown I/O driver {other:?} (expected auto, uring or epoll)"
            )),
        }
    }
}

impl IoChoice {
    /// The choice named by the `KYTHERA_IO` environment variable (`Auto` when it is
    /// not set; an error naming the value when it names no driver).
    /// [`crate::ServerBuilder`] starts from it, as tokio's runtime builder starts from
    /// `TOKIO_WORKER_THREADS`: so that a deployment (or a test run) can pick the driver
    /// of a program that embeds the engine without rebuilding it.
    pub fn from_env() -> Result<IoChoice, String> {
        match std::env::var("KYTHERA_IO") {
            Ok(value) => value.parse(),
            Err(_) => Ok(IoChoice::Auto),
        }
    }
}

/// The driver a server runs on, once chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    /// `uring::UringDriver`.
    Uring,
    /// `epoll::EpollDriver`.
    Epoll,
}

impl DriverKind {
    /// `uring` or `epoll`, as in logs and `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            DriverKind::Uring => "uring",
            DriverKind::Epoll => "epoll",
        }
    }
}

impl std::fmt::Display for DriverKind {
    /// `io_uring` or `epoll`, as in the banner.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DriverKind::Uring => "io_uring",
            DriverKind::Epoll => "epoll",
        })
    }
}

/// A connection as the driver knows it: its slot and the slot's generation (so that an
/// event can be checked against the connection now in the slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    pub index: u32,
    pub generation: u32,
}

/// How an operation ended, or what arrived.
pub(crate) enum Event<R> {
    /// A listener accepted a connection (its slot index) or failed (an errno).
    Accept {
        listener: u32,
        result: Result<u32, i32>,
        more: bool,
    },
    /// The peer address of a new connection ([`Driver::peer_name`]); `None` when it
    /// could not be read.
    Peer {
        index: u32,
        addr: Option<SocketAddr>,
    },
    /// The connection's recv has something: bytes, the end, or an error. Read it with
    /// [`Driver::receive`].
    Recv { index: u32, token: R },
    /// The connection's send is over: every byte sent (the output comes back for
    /// reuse), or it failed with an errno.
    Sent {
        index: u32,
        result: Result<Output, i32>,
    },
    /// The connection's send was stopped ([`Driver::cancel_send`]) before it was over:
    /// the output comes back with how many of its bytes went out.
    Unsent {
        index: u32,
        output: Output,
        sent: usize,
    },
    /// A shutdown completed (its result: 0 or a negative errno).
    Shutdown { index: u32, res: i32 },
    /// A close completed: the slot is free.
    Closed { index: u32, res: i32 },
    /// Another shard or a foreign thread asked this shard to look at its queues.
    Woken,
    /// [`Driver::detach`] is over: a descriptor of the connection's socket of its own
    /// (the slot stays the connection's until it is closed), or an errno.
    Detached {
        index: u32,
        result: Result<OwnedFd, i32>,
    },
    /// [`Driver::adopt`] is over: the socket's slot, or an errno (the socket was
    /// closed).
    Adopted {
        token: u32,
        result: Result<u32, i32>,
    },
}

/// What a recv event carries, read by [`Driver::receive`].
pub(crate) struct Received<'a> {
    /// Bytes received (possibly none), the session may unmask them in place.
    pub data: &'a mut [u8],
    /// The recv ended or paused: why.
    pub end: Option<RecvEnd>,
    /// The recv stays armed.
    pub more: bool,
}

/// Why a recv produced no more bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecvEnd {
    /// The receive buffers ran out: arm again later (io_uring's `ENOBUFS`).
    NoBuffers,
    /// End of file (0), or an error (a positive errno, `ECANCELED` after a cancel).
    Closed(Option<i32>),
}

/// The shard's I/O. See the module docs for the contract.
pub(crate) trait Driver {
    /// What a recv event carries until [`Driver::receive`] reads it.
    type RecvToken;

    /// The most connection slots this driver hands out (for the shard's table).
    fn max_slots(&self) -> usize;
    /// Waits up to `timeout_ms` for an event (not at all when some are pending), after
    /// submitting what was asked; then appends every event to `events`.
    fn wait(&mut self, timeout_ms: u64, events: &mut Vec<Event<Self::RecvToken>>)
    -> io::Result<()>;
    /// Operations whose last event has not arrived.
    fn in_flight(&self) -> usize;

    /// Starts accepting on `listener` (multishot); `socket` stays open until the
    /// accept's last event.
    fn arm_accept(&mut self, listener: u32, socket: &TcpListener) -> io::Result<()>;
    /// Stops accepting on `listener`: its last event follows.
    fn cancel_accept(&mut self, listener: u32, socket: &TcpListener) -> io::Result<()>;
    /// Reads a new connection's peer address ([`Event::Peer`]).
    fn peer_name(&mut self, slot: Slot, ipv6: bool) -> io::Result<()>;
    /// Starts receiving on a connection (multishot).
    fn arm_recv(&mut self, slot: Slot) -> io::Result<()>;
    /// Stops receiving: nothing more is read; the recv's last event follows.
    fn cancel_recv(&mut self, slot: Slot) -> io::Result<()>;
    /// The bytes or the end a recv event stands for. The bytes stay valid until
    /// [`Driver::release`].
    fn receive(&mut self, index: u32, token: &Self::RecvToken) -> Received<'_>;
    /// Done with what [`Driver::receive`] returned.
    fn release(&mut self, token: Self::RecvToken);
    /// Sends `output` (not empty) on a connection with no send in flight. `Some` when
    /// the send is already over (epoll, when the socket took every byte or failed):
    /// then no [`Event::Sent`] follows.
    fn send(&mut self, slot: Slot, output: Output) -> io::Result<Option<Result<Output, i32>>>;
    /// Stops the send in flight (live handover: output waiting for a client that does
    /// not read moves to the new process): its last event is [`Event::Unsent`], or
    /// [`Event::Sent`] if it was over meanwhile.
    fn cancel_send(&mut self, slot: Slot) -> io::Result<()>;
    /// `shutdown(SHUT_RDWR)`: the recv ends, a waiting send fails.
    fn shutdown(&mut self, slot: Slot) -> io::Result<()>;
    /// Closes the connection's descriptor ([`Event::Closed`] frees the slot).
    fn close(&mut self, slot: Slot) -> io::Result<()>;
    /// Wakes shard `target` (which may be asleep in its wait).
    fn wake(&mut self, target: usize) -> io::Result<()>;
    /// Makes a plain descriptor of a connection's socket, for another process (live
    /// handover); [`Event::Detached`] follows. The connection has nothing in flight.
    fn detach(&mut self, slot: Slot) -> io::Result<()>;
    /// Takes a connected socket from another process into a slot of this driver;
    /// [`Event::Adopted`] follows with `token`.
    fn adopt(&mut self, fd: OwnedFd, token: u32) -> io::Result<()>;
}

/// Adds to a counter that only the owning shard's thread writes.
pub(crate) fn bump(counter: &std::sync::atomic::AtomicU64, by: u64) {
    use std::sync::atomic::Ordering;
    counter.store(
        counter.load(Ordering::Relaxed).wrapping_add(by),
        Ordering::Relaxed,
    );
}

/// Values that some connections hold at a time (a send in flight, a peer-address
/// buffer), by slot index, kept out of the connection slots so that an idle connection
/// does not carry their size. The map keeps its capacity, so it stops allocating once
/// warmed up.
pub(crate) type ByIndex<T> = HashMap<u32, T, BuildHasherDefault<IndexHasher>>;

/// Fibonacci hashing of a slot index: indexes are distinct small integers, so one
/// multiplication spreads them over the table's groups and control bits.
#[derive(Debug, Default)]
pub(crate) struct IndexHasher(u64);

impl Hasher for IndexHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}
