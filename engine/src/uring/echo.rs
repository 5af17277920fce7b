//! A TCP echo loop: the smallest whole use of the pieces in this module, and the proof
//! that they fit (multishot accept, direct descriptors, multishot recv from a buffer
//! ring, sends that own their bytes, close). The shard loop will have the same shape
//! with the protocol core between recv and send.
//!
//! Rules the loop keeps:
//!
//! - **Every operation in flight is counted**, and the count drops on a completion
//!   without the `more` flag; shutdown cancels everything and waits for the count to
//!   reach zero before anything a pending operation points to is freed.
//! - **A multishot that ends is re-armed**: accept always (unless stopping); recv unless
//!   the peer is gone. `ENOBUFS` (the buffer ring ran dry) ends the recv too; it is
//!   re-armed at the end of the batch, after the batch's buffers were recycled.
//! - **Received bytes are copied out and the buffer recycled at once**, so a slow peer
//!   never holds a ring buffer. The copy goes to the connection's queue; one send per
//!   connection is in flight at a time (ordering, and partial sends continue from the
//!   right byte), and the bytes it points to stay in the connection until its
//!   completion arrives.
//! - **A connection is closed only when nothing of it is in flight** (recv ended, no
//!   send pending), and its slot is freed when the close completes, so no completion
//!   can arrive for a slot after it has been reused.
//!
//! Not bounded yet: the queue of bytes waiting to be echoed to a peer that does not
//! read (the shard loop will stop re-arming recv above a limit).

use std::io;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::types::CancelBuilder;
use io_uring::{cqueue, opcode, squeue};

use super::buf_ring::BufRing;
use super::completion::{Op, UserData, buffer_id, has_more};
use super::net::{Socket, accept_multi};
use super::ring::{Ring, RingFlags};

/// Sizes for an [`Echo`] loop.
#[derive(Debug, Clone, Copy)]
pub struct EchoConfig {
    /// Submission queue entries (completion queue: four times as many).
    pub sq_entries: u32,
    /// Buffers in the provided-buffer ring (a power of two).
    pub buf_entries: u16,
    /// Bytes per buffer.
    pub buf_size: u32,
    /// Slots in the registered file table for direct descriptors; 0 uses plain fds.
    pub direct_slots: u32,
}

impl Default for EchoConfig {
    fn default() -> Self {
        EchoConfig {
            sq_entries: 256,
            buf_entries: 256,
            buf_size: 4096,
            direct_slots: 1024,
        }
    }
}

/// Counters of an [`Echo`] loop, for tests and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EchoStats {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections whose close completed.
    pub closed: u64,
    /// Bytes received (and queued for echo).
    pub bytes_received: u64,
    /// Bytes sent back.
    pub bytes_sent: u64,
    /// Recv completions with `ENOBUFS` (buffer ring empty).
    pub enobufs: u64,
    /// Multishot recvs submitted again after they ended.
    pub recv_rearms: u64,
    /// Multishot accepts submitted again after they ended.
    pub accept_rearms: u64,
    /// Accept completions with an error.
    pub accept_errors: u64,
    /// Sends that sent fewer bytes than asked and were continued.
    pub partial_sends: u64,
}

/// Bytes handed to a send: owned here until the send's completion.
#[derive(Debug)]
struct InFlightSend {
    bytes: Vec<u8>,
    sent: usize,
}

#[derive(Debug)]
struct Conn {
    socket: Socket,
    recv_armed: bool,
    /// The peer is gone (EOF or error): no more recv, close when idle.
    done: bool,
    closing: bool,
    sending: Option<InFlightSend>,
    queued: Vec<u8>,
}

/// The echo loop. Create it on the thread that will run it (see [`Ring`]).
#[derive(Debug)]
pub struct Echo {
    ring: Ring,
    bufs: BufRing,
    listener: TcpListener,
    /// Accepted sockets are direct descriptors.
    direct: bool,
    accept_armed: bool,
    stopping: bool,
    /// Operations submitted whose last completion has not arrived.
    in_flight: usize,
    /// Connections by fd or slot number.
    conns: Vec<Option<Conn>>,
    /// Connections whose recv is to be re-armed at the end of the batch.
    rearm: Vec<u32>,
    cqes: Vec<cqueue::Entry>,
    stats: EchoStats,
}

/// Group id of the echo loop's buffer ring.
const BGID: u16 = 0;

impl Echo {
    /// Sets up the ring, the buffer ring and (when `direct_slots > 0` and the kernel
    /// allows) the direct descriptor table, and arms a multishot accept on `listener`.
    pub fn new(listener: TcpListener, config: EchoConfig) -> io::Result<Echo> {
        let ring = Ring::new(config.sq_entries).map_err(io::Error::other)?;
        let bufs = BufRing::new(&ring, BGID, config.buf_entries, config.buf_size)?;
        let direct = config.direct_slots > 0
            && ring
                .submitter()
                .register_files_sparse(config.direct_slots)
                .is_ok();
        let mut echo = Echo {
            ring,
            bufs,
            listener,
            direct,
            accept_armed: false,
            stopping: false,
            in_flight: 0,
            conns: Vec::new(),
            rearm: Vec::new(),
            cqes: Vec::new(),
            stats: EchoStats::default(),
        };
        echo.arm_accept()?;
        Ok(echo)
    }

    /// Whether accepted sockets are direct descriptors.
    pub fn uses_direct_descriptors(&self) -> bool {
        self.direct
    }

    /// Whether a multishot accept is armed (false once shut down).
    pub fn accepting(&self) -> bool {
        self.accept_armed
    }

    /// The flags the ring got.
    pub fn ring_flags(&self) -> RingFlags {
        self.ring.flags()
    }

    /// The counters so far.
    pub fn stats(&self) -> EchoStats {
        self.stats
    }

    /// Operations in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Connections open (accepted and not yet closed).
    pub fn open_connections(&self) -> usize {
        self.conns.iter().filter(|c| c.is_some()).count()
    }

    /// Submits, waits up to `timeout` for completions and handles them.
    pub fn turn(&mut self, timeout: Duration) -> io::Result<()> {
        self.ring.wait(1, timeout)?;
        let mut cqes = std::mem::take(&mut self.cqes);
        self.ring.drain_completions(&mut cqes);
        for cqe in cqes.drain(..) {
            self.complete(&cqe)?;
        }
        self.cqes = cqes;
        for index in std::mem::take(&mut self.rearm) {
            self.arm_recv(index)?;
        }
        Ok(())
    }

    /// Runs until `done(&stats)` says so, then shuts down (see [`Echo::shutdown`]).
    pub fn run_until(&mut self, mut done: impl FnMut(&EchoStats) -> bool) -> io::Result<()> {
        while !done(&self.stats) {
            self.turn(Duration::from_millis(10))?;
        }
        self.shutdown(Duration::from_secs(5))
    }

    /// Cancels every operation, closes every connection and waits until nothing is in
    /// flight. Fails with `TimedOut` if that takes longer than `timeout`.
    pub fn shutdown(&mut self, timeout: Duration) -> io::Result<()> {
        if !self.stopping {
            self.stopping = true;
            let cancel = opcode::AsyncCancel2::new(CancelBuilder::any())
                .build()
                .user_data(UserData::new(Op::Cancel, 0).encode());
            // SAFETY: a cancellation points to no memory.
            unsafe { self.push(&cancel) }?;
            for index in 0..self.conns.len() as u32 {
                self.maybe_close(index)?;
            }
        }
        let deadline = Instant::now() + timeout;
        while self.in_flight > 0 || self.open_connections() > 0 {
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} operations still in flight, {} connections open",
                        self.in_flight,
                        self.open_connections()
                    ),
                ));
            }
            self.turn(Duration::from_millis(10))?;
        }
        Ok(())
    }

    /// # Safety
    ///
    /// As [`Ring::push`].
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: passed on to the caller.
        unsafe { self.ring.push(entry) }?;
        self.in_flight += 1;
        Ok(())
    }

    fn arm_accept(&mut self) -> io::Result<()> {
        let entry = accept_multi(self.listener.as_raw_fd(), self.direct)
            .user_data(UserData::new(Op::Accept, 0).encode());
        // SAFETY: the listener is owned by `self`, and `Drop` waits for the accept's
        // last completion (shutdown) before the listener is closed.
        unsafe { self.push(&entry) }?;
        self.accept_armed = true;
        Ok(())
    }

    fn arm_recv(&mut self, index: u32) -> io::Result<()> {
        let Some(conn) = conn_in(&mut self.conns, index) else {
            return Ok(());
        };
        if conn.recv_armed || conn.done || conn.closing || self.stopping {
            return Ok(());
        }
        conn.recv_armed = true;
        let entry = conn
            .socket
            .recv_multi(BGID)
            .user_data(UserData::new(Op::Recv, index).encode());
        // SAFETY: the recv writes only into buffers of `self.bufs`, which lives as long
        // as the ring's use of it (unregistered on drop after shutdown).
        unsafe { self.push(&entry) }
    }

    fn conn_mut(&mut self, index: u32) -> Option<&mut Conn> {
        conn_in(&mut self.conns, index)
    }

    fn complete(&mut self, cqe: &cqueue::Entry) -> io::Result<()> {
        let more = has_more(cqe.flags());
        if !more {
            self.in_flight -= 1;
        }
        let Some(ud) = UserData::decode(cqe.user_data()) else {
            debug_assert!(false, "unknown user_data {:#x}", cqe.user_data());
            return Ok(());
        };
        match ud.op {
            Op::Accept => self.on_accept(cqe.result(), more),
            Op::Recv => self.on_recv(ud.index, cqe.result(), cqe.flags(), more),
            Op::Send => self.on_send(ud.index, cqe.result()),
            Op::Close => {
                if let Some(slot) = self.conns.get_mut(ud.index as usize) {
                    *slot = None;
                }
                self.stats.closed += 1;
                Ok(())
            }
            // The echo loop submits none of these.
            Op::Cancel | Op::Shutdown | Op::PeerName | Op::Wake | Op::MsgRing | Op::EventFd => {
                Ok(())
            }
        }
    }

    fn on_accept(&mut self, res: i32, more: bool) -> io::Result<()> {
        if res >= 0 {
            self.stats.accepted += 1;
            let socket = Socket::accepted(res, self.direct);
            let index = socket.index() as usize;
            if self.conns.len() <= index {
                self.conns.resize_with(index + 1, || None);
            }
            debug_assert!(
                self.conns[index].is_none(),
                "slot {index} reused while open"
            );
            self.conns[index] = Some(Conn {
                socket,
                recv_armed: false,
                done: false,
                closing: false,
                sending: None,
                queued: Vec::new(),
            });
            if self.stopping {
                self.maybe_close(index as u32)?;
            } else {
                self.arm_recv(index as u32)?;
            }
        } else {
            self.stats.accept_errors += 1;
            // A kernel without direct accept rejects the request itself: use plain fds.
            if self.direct && res == -libc::EINVAL && self.stats.accepted == 0 {
                self.direct = false;
            }
        }
        if !more {
            self.accept_armed = false;
            if !self.stopping {
                self.stats.accept_rearms += 1;
                self.arm_accept()?;
            }
        }
        Ok(())
    }

    fn on_recv(&mut self, index: u32, res: i32, flags: u32, more: bool) -> io::Result<()> {
        // Copy the bytes out and give the buffer back before anything else.
        if let Some(bid) = buffer_id(flags) {
            let len = usize::try_from(res).unwrap_or(0);
            // SAFETY: the buffer id comes from this completion of a recv on `BGID`.
            let bytes = unsafe { self.bufs.buffer(bid, len) };
            if let Some(conn) = conn_in(&mut self.conns, index) {
                if !self.stopping {
                    conn.queued.extend_from_slice(bytes);
                }
            }
            self.bufs.recycle(bid);
            self.stats.bytes_received += len as u64;
        }
        if res == -libc::ENOBUFS {
            self.stats.enobufs += 1;
        }
        let Some(conn) = conn_in(&mut self.conns, index) else {
            debug_assert!(false, "recv completion for closed slot {index}");
            return Ok(());
        };
        // EOF (0) or an error: the peer is gone. ENOBUFS only ends this multishot.
        if res == 0 || (res < 0 && res != -libc::ENOBUFS) {
            conn.done = true;
        }
        if !more {
            conn.recv_armed = false;
            if !conn.done && !self.stopping {
                self.stats.recv_rearms += 1;
                self.rearm.push(index);
            }
        }
        self.start_send(index)?;
        self.maybe_close(index)
    }

    fn on_send(&mut self, index: u32, res: i32) -> io::Result<()> {
        let Some(conn) = conn_in(&mut self.conns, index) else {
            debug_assert!(false, "send completion for closed slot {index}");
            return Ok(());
        };
        let Some(mut send) = conn.sending.take() else {
            debug_assert!(false, "send completion without a send on {index}");
            return Ok(());
        };
        if res < 0 {
            // The peer is gone (EPIPE, ECONNRESET) or the send was cancelled: stop
            // receiving too, and close once the recv has ended.
            conn.done = true;
            conn.queued = Vec::new();
            if conn.recv_armed && !self.stopping {
                let cancel = opcode::AsyncCancel2::new(CancelBuilder::user_data(
                    UserData::new(Op::Recv, index).encode(),
                ))
                .build()
                .user_data(UserData::new(Op::Cancel, index).encode());
                // SAFETY: a cancellation points to no memory.
                unsafe { self.push(&cancel) }?;
            }
            return self.maybe_close(index);
        }
        send.sent += res as usize;
        self.stats.bytes_sent += res as u64;
        if send.sent < send.bytes.len() {
            self.stats.partial_sends += 1;
            conn.sending = Some(send);
            return self.submit_send(index);
        }
        // Reuse the sent Vec's allocation for the next bytes to queue.
        if conn.queued.is_empty() {
            let mut spare = send.bytes;
            spare.clear();
            conn.queued = spare;
        }
        self.start_send(index)?;
        self.maybe_close(index)
    }

    /// Starts a send of the queued bytes if none is in flight.
    fn start_send(&mut self, index: u32) -> io::Result<()> {
        let stopping = self.stopping;
        let Some(conn) = self.conn_mut(index) else {
            return Ok(());
        };
        if conn.sending.is_some() || conn.queued.is_empty() || conn.closing || stopping {
            return Ok(());
        }
        let bytes = std::mem::take(&mut conn.queued);
        conn.sending = Some(InFlightSend { bytes, sent: 0 });
        self.submit_send(index)
    }

    /// Submits the unsent part of the connection's in-flight bytes.
    fn submit_send(&mut self, index: u32) -> io::Result<()> {
        let Some(conn) = self.conn_mut(index) else {
            return Ok(());
        };
        let Some(send) = &conn.sending else {
            return Ok(());
        };
        let rest = &send.bytes[send.sent..];
        let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
        let entry = conn
            .socket
            .send(rest.as_ptr(), len)
            .user_data(UserData::new(Op::Send, index).encode());
        // SAFETY: `conn.sending` owns the bytes until this send's completion (`on_send`);
        // the connection is not removed while a send is in flight (`maybe_close`), and
        // `Drop` leaks them if shutdown could not wait for the completion.
        unsafe { self.push(&entry) }
    }

    /// Closes the connection if it is finished (or the loop is stopping) and nothing of
    /// it is in flight.
    fn maybe_close(&mut self, index: u32) -> io::Result<()> {
        let stopping = self.stopping;
        let Some(conn) = self.conn_mut(index) else {
            return Ok(());
        };
        if conn.closing || !(conn.done || stopping) || conn.recv_armed || conn.sending.is_some() {
            return Ok(());
        }
        conn.closing = true;
        let entry = conn
            .socket
            .close()
            .user_data(UserData::new(Op::Close, index).encode());
        // SAFETY: a close points to no memory.
        unsafe { self.push(&entry) }
    }
}

/// The connection at `index`, borrowing only the table (so other fields stay usable).
fn conn_in(conns: &mut [Option<Conn>], index: u32) -> Option<&mut Conn> {
    conns.get_mut(index as usize)?.as_mut()
}

impl Drop for Echo {
    fn drop(&mut self) {
        if self.shutdown(Duration::from_secs(1)).is_err() {
            // The kernel may still read bytes of sends in flight: leak them rather than
            // free memory it points to. (The buffer ring is unregistered before it is
            // unmapped by its own Drop.)
            for conn in self.conns.drain(..).flatten() {
                if let Some(send) = conn.sending {
                    std::mem::forget(send.bytes);
                }
            }
        }
    }
}
