//! The load client's io_uring side: the only `unsafe` of `kythera-load`.
//!
//! [`Io`] owns everything a submitted operation points to (the peer address of a
//! connect, the bytes of a send) until that operation's last completion, so its methods
//! are safe: the client loop hands bytes over and gets them back in the completion.
//! Operations on a slot (a connection's index) are kept apart by packing the kind and
//! the slot into `user_data`; slots are never reused within a run, so no generation tag
//! is needed.
//!
//! What `kythera_engine::uring` lacks for a client is the connect: it is built here from the
//! io-uring crate's `Connect` opcode rather than added to the engine, so that the engine
//! stays as it is. Sockets are plain descriptors made with `socket(2)`; connections
//! are not direct descriptors because a client opens and binds its own sockets.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::types::CancelBuilder;
use io_uring::{cqueue, opcode, squeue, types};
use kythera_engine::uring::completion::{buffer_id, has_more};
use kythera_engine::uring::net::{self, sockaddr_of};
use kythera_engine::uring::{BufRing, Ring};

/// Group id of the receive buffer ring.
const BGID: u16 = 0;

/// Operation kinds in the top byte of `user_data`.
const OP_CONNECT: u64 = 1;
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 3;
const OP_CANCEL: u64 = 4;

fn user_data(op: u64, slot: u32) -> u64 {
    (op << 56) | u64::from(slot)
}

/// What a completion means for the client loop.
#[derive(Debug)]
pub(crate) enum Completion<'a> {
    /// The connect of `slot` finished: `res` is 0 or `-errno`.
    Connected { slot: u32, res: i32 },
    /// Bytes arrived on `slot` (borrowed from a ring buffer, recycled afterwards).
    Data { slot: u32, bytes: &'a [u8] },
    /// The multishot recv of `slot` ended: `res` is 0 (end of file), `-ENOBUFS` (the
    /// buffer ring ran dry) or a byte count (the kernel stopped it after data: both mean
    /// arm it again), or another `-errno`.
    RecvEnded { slot: u32, res: i32 },
    /// The send of `slot` finished, wholly (`res >= 0`) or with `-errno`; the bytes come
    /// back for reuse.
    Sent { slot: u32, res: i32, buf: Vec<u8> },
}

/// A send in flight: its bytes and how many went out so far (partial sends go on from
/// there).
#[derive(Debug)]
struct PendingSend {
    fd: RawFd,
    bytes: Vec<u8>,
    sent: usize,
}

/// A peer address that a connect in flight points to.
#[derive(Debug)]
struct SockAddr {
    storage: libc::sockaddr_storage,
    len: libc::socklen_t,
}

/// One thread's ring, receive buffers and the memory its operations point to.
#[derive(Debug)]
pub(crate) struct Io {
    ring: Ring,
    bufs: BufRing,
    /// Per slot: the send in flight.
    sends: Vec<Option<PendingSend>>,
    /// Per slot: the address of the connect in flight.
    addrs: Vec<Option<Box<SockAddr>>>,
    /// Operations submitted whose last completion has not arrived.
    in_flight: usize,
    cqes: Vec<cqueue::Entry>,
}

impl Io {
    /// A ring for `slots` connections, with 16 MiB of receive buffers: 256 of 64 KiB
    /// consumed incrementally (Linux 6.15), else 4,096 of 4 KiB.
    pub(crate) fn new(slots: usize) -> io::Result<Io> {
        let sq = (slots as u32).clamp(256, 4096).next_power_of_two();
        let ring = Ring::with_cq_entries(sq, sq * 8).map_err(io::Error::other)?;
        // Incremental consumption where the kernel has it: echoes of 20 bytes then
        // share a buffer instead of each taking a whole one, and large ones arrive in
        // fewer completions.
        let bufs = match BufRing::new_incremental(&ring, BGID, 256, 64 * 1024) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                BufRing::new(&ring, BGID, 4096, 4096)?
            }
            result => result?,
        };
        Ok(Io {
            ring,
            bufs,
            sends: (0..slots).map(|_| None).collect(),
            addrs: (0..slots).map(|_| None).collect(),
            in_flight: 0,
            cqes: Vec::with_capacity(1024),
        })
    }

    /// Whether `slot` has a send in flight.
    pub(crate) fn sending(&self, slot: u32) -> bool {
        self.sends[slot as usize].is_some()
    }

    /// # Safety
    ///
    /// As [`Ring::push`]: what the entry points to lives until its last completion.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: passed on to the caller.
        unsafe { self.ring.push(entry) }?;
        self.in_flight += 1;
        Ok(())
    }

    /// Starts connecting `fd` (of `slot`) to `addr`.
    pub(crate) fn connect(&mut self, slot: u32, fd: RawFd, addr: SocketAddr) -> io::Result<()> {
        let (storage, len) = sockaddr_of(addr);
        let boxed = self.addrs[slot as usize].insert(Box::new(SockAddr { storage, len }));
        let entry = opcode::Connect::new(
            types::Fd(fd),
            std::ptr::from_ref(&boxed.storage).cast(),
            boxed.len,
        )
        .build()
        .user_data(user_data(OP_CONNECT, slot));
        // SAFETY: the address is boxed in `self.addrs[slot]`, which is only emptied by
        // the connect's completion (or leaked by `Drop` if it never comes).
        unsafe { self.push(&entry) }
    }

    /// Arms a multishot recv on `fd` (of `slot`) into the buffer ring.
    pub(crate) fn recv(&mut self, slot: u32, fd: RawFd) -> io::Result<()> {
        let entry = opcode::RecvMulti::new(types::Fd(fd), BGID)
            .build()
            .user_data(user_data(OP_RECV, slot));
        // SAFETY: the recv writes only into buffers of `self.bufs`, which stays
        // registered until `Drop` (after the ring has no recv left, or leaked).
        unsafe { self.push(&entry) }
    }

    /// Sends `bytes` on `fd` (of `slot`); they come back in [`Completion::Sent`].
    ///
    /// # Panics
    ///
    /// If a send of `slot` is in flight already (one at a time keeps bytes in order).
    pub(crate) fn send(&mut self, slot: u32, fd: RawFd, bytes: Vec<u8>) -> io::Result<()> {
        assert!(!self.sending(slot), "two sends in flight on slot {slot}");
        self.sends[slot as usize] = Some(PendingSend { fd, bytes, sent: 0 });
        self.submit_send(slot)
    }

    fn submit_send(&mut self, slot: u32) -> io::Result<()> {
        let pending = self.sends[slot as usize].as_ref().expect("a pending send");
        let rest = &pending.bytes[pending.sent..];
        let entry = opcode::Send::new(types::Fd(pending.fd), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(OP_SEND, slot));
        // SAFETY: the bytes are in `self.sends[slot]`, which is only emptied by this
        // send's completion (or leaked by `Drop` if it never comes); a Vec's heap buffer
        // does not move while the Vec itself moves.
        unsafe { self.push(&entry) }
    }

    /// Cancels every operation in flight (their completions still arrive).
    pub(crate) fn cancel_all(&mut self) -> io::Result<()> {
        let entry = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(user_data(OP_CANCEL, 0));
        // SAFETY: a cancellation points to no memory.
        unsafe { self.push(&entry) }
    }

    /// Submits what is queued and waits up to `timeout` for at least one completion.
    pub(crate) fn wait(&mut self, timeout: Duration) -> io::Result<()> {
        self.ring.wait(1, timeout).map(|_| ())
    }

    /// Hands every ready completion to `handle`. Partial sends are continued here and
    /// reported only once all their bytes went out.
    pub(crate) fn drain(&mut self, mut handle: impl FnMut(Completion<'_>)) -> io::Result<()> {
        let mut cqes = std::mem::take(&mut self.cqes);
        self.ring.drain_completions(&mut cqes);
        for cqe in cqes.drain(..) {
            let flags = cqe.flags();
            let res = cqe.result();
            let more = has_more(flags);
            if !more {
                self.in_flight -= 1;
            }
            let raw = cqe.user_data();
            let slot = raw as u32;
            match raw >> 56 {
                OP_CONNECT => {
                    self.addrs[slot as usize] = None;
                    handle(Completion::Connected { slot, res });
                }
                OP_RECV => {
                    if let Some(bid) = buffer_id(flags) {
                        let len = usize::try_from(res).unwrap_or(0);
                        // SAFETY: the buffer id comes from this completion of a recv on
                        // `BGID`, and it is released right after the slice's last use.
                        let bytes = unsafe { self.bufs.received(bid, len) };
                        if !bytes.is_empty() {
                            handle(Completion::Data { slot, bytes });
                        }
                        self.bufs
                            .release(bid, len, io_uring::cqueue::buffer_more(flags));
                    }
                    if !more {
                        handle(Completion::RecvEnded { slot, res });
                    }
                }
                OP_SEND => {
                    let mut pending = self.sends[slot as usize].take().expect("send pending");
                    if res > 0 && pending.sent + (res as usize) < pending.bytes.len() {
                        pending.sent += res as usize;
                        self.sends[slot as usize] = Some(pending);
                        self.submit_send(slot)?;
                    } else {
                        // A send of 0 bytes for a non-empty buffer means the peer is gone.
                        let res = if res == 0 && !pending.bytes.is_empty() {
                            -libc::EPIPE
                        } else {
                            res
                        };
                        handle(Completion::Sent {
                            slot,
                            res,
                            buf: pending.bytes,
                        });
                    }
                }
                _ => {}
            }
        }
        self.cqes = cqes;
        Ok(())
    }

    /// Cancels everything and waits up to `timeout` until nothing is in flight.
    pub(crate) fn quiesce(&mut self, timeout: Duration) {
        if self.in_flight == 0 {
            return;
        }
        let _ = self.cancel_all();
        let deadline = Instant::now() + timeout;
        while self.in_flight > 0 && Instant::now() < deadline {
            let _ = self.wait(Duration::from_millis(10));
            let _ = self.drain(|_| {});
        }
    }
}

impl Drop for Io {
    fn drop(&mut self) {
        self.quiesce(Duration::from_secs(1));
        if self.in_flight > 0 {
            // The kernel may still read these bytes and addresses: leaking them is the
            // only safe answer (it happens only when a cancellation does not finish).
            std::mem::forget(std::mem::take(&mut self.sends));
            std::mem::forget(std::mem::take(&mut self.addrs));
        }
    }
}

/// A new TCP socket for `peer` (close-on-exec, blocking: io_uring needs no
/// `O_NONBLOCK`), with `TCP_NODELAY`, bound to `source` (port chosen at connect time)
/// when given.
pub(crate) fn tcp_socket(peer: SocketAddr, source: Option<IpAddr>) -> io::Result<OwnedFd> {
    let socket = net::tcp_socket(peer)?;
    let fd = socket.as_raw_fd();
    // Small messages must go out at once, not wait for an ACK (Nagle).
    net::set_int_option(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
    if let Some(ip) = source {
        // Without this, bind(port 0) would reserve a port for every destination; with
        // it the port is picked at connect time for the whole 4-tuple.
        net::set_int_option(fd, libc::IPPROTO_IP, libc::IP_BIND_ADDRESS_NO_PORT, 1)?;
        net::bind(&socket, SocketAddr::new(ip, 0))?;
    }
    Ok(socket)
}

/// `shutdown(SHUT_RDWR)`: ends a pending multishot recv (it reads end of file), which
/// otherwise would hold the socket open after its descriptor is closed.
pub(crate) fn shutdown(fd: &OwnedFd) {
    // SAFETY: shutdown(2) on a descriptor we own; failure (not connected) is harmless.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
}

/// Raises the soft limit of open files to the hard limit; returns the new soft limit.
pub(crate) fn raise_nofile_limit() -> u64 {
    // SAFETY: rlimit is plain old data.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes one rlimit into a live value.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from a live value.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    lim.rlim_cur
}

/// Clock ticks per second of `/proc/PID/stat`'s `utime` and `stime` (`USER_HZ`).
pub(crate) fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf(3) only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}
