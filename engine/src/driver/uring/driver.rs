//! [`UringDriver`]: the shard's I/O on one io_uring ring, with a provided-buffer ring
//! that multishot recvs pick from, direct descriptors where the kernel has them, and
//! `MSG_RING` to wake other shards.
//!
//! It owns everything the kernel may read or write while an operation is in flight (the
//! bytes of a send and its `sendmsg` header, a `SO_PEERNAME` buffer, the eventfd's count,
//! the receive buffers), which is what makes its pushes sound: nothing the shard does
//! can free them early. At drop it cancels what is in flight, waits a little, and leaks
//! what the kernel still points to rather than free it under the kernel.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use io_uring::types::{self, CancelBuilder};
use io_uring::{cqueue, opcode, squeue};
use tracing::{info, warn};

use super::buf_ring::{BufRing, MAX_ENTRIES};
use super::completion::{Op, UserData, buffer_id, has_more};
use super::net::{Socket, accept_multi};
use super::ring::Ring;
use crate::driver::iovec::SendMsg;
use crate::driver::sys::{getpeername, sockaddr_to_std};
use crate::driver::{ByIndex, Driver, Event, Received, RecvEnd, Slot, bump};
use crate::server::Shared;
use crate::session::Output;
use crate::shard::{ShardStats, ShardTuning};

/// Descriptors kept out of the direct table's size: the ring, listeners, logs.
const DIRECT_SLOTS_MARGIN: usize = 64;
/// The kernel's bound on a registered file table (`IORING_MAX_FIXED_FILES`).
const MAX_DIRECT_SLOTS: usize = 1 << 20;
/// The buffer group of every shard's buffer ring (each shard has its own ring).
const BGID: u16 = 0;

/// The peer address as `getsockopt(SO_PEERNAME)` writes it; boxed so that its address
/// stays put while the operation is in flight.
struct PeerBuf(libc::sockaddr_storage);

/// Bytes handed to a send: owned here until the send's last completion.
struct InFlightSend {
    output: Output,
    /// Bytes of the output sent so far.
    sent: usize,
    /// Bytes of the output in all.
    len: usize,
    /// For an output of several buffers: the `sendmsg` header and its iovecs, boxed so
    /// that they stay put until the completion.
    msg: Option<Box<SendMsg>>,
    /// Zero-copy notifications still to come: the kernel may read the bytes until then.
    zc_notifs: u32,
    /// Every byte was sent (or the send failed); only notifications are awaited.
    done: bool,
    /// The send failed with this errno.
    failed: Option<i32>,
    /// The shard asked to stop it ([`Driver::cancel_send`]): it ends at its next
    /// completion, whatever that says, with what is left unsent.
    cancelled: bool,
    generation: u32,
}

/// What a recv completion carried, until the shard reads it ([`Driver::receive`]) and
/// gives the buffer back ([`Driver::release`]). Not `Clone`: one token, one release.
pub(crate) struct UringRecv {
    res: i32,
    bid: Option<u16>,
    more: bool,
    buffer_more: bool,
}

/// The io_uring driver of one shard.
pub(crate) struct UringDriver {
    // Declared before `bufs`: the ring goes first, then the buffers it pointed to are
    // unmapped (as the shard did before the driver existed).
    ring: Ring,
    bufs: BufRing,
    direct: bool,
    slots: usize,
    /// Operations submitted whose last completion has not arrived.
    in_flight: usize,
    sends: ByIndex<InFlightSend>,
    peer_bufs: ByIndex<Box<PeerBuf>>,
    /// Where the eventfd read writes its count: leaked on purpose, 8 bytes per shard,
    /// so that a read still armed when the ring goes away never writes into freed
    /// memory.
    event_buf: &'static mut u64,
    event_fd: RawFd,
    accepted_any: bool,
    send_zc_min: Option<usize>,
    cqes: Vec<cqueue::Entry>,
    /// Events of calls already made (a handover's descriptors on plain fds), for the
    /// next wait.
    queued: Vec<Event<UringRecv>>,
    /// Sockets from another process on their way into a direct slot, by token: the
    /// slot the kernel picks is written into the box.
    adopting: ByIndex<(Box<RawFd>, OwnedFd)>,
    shared: Arc<Shared>,
    shard: usize,
}

impl UringDriver {
    /// Sets up the shard's ring, its receive buffers and its direct-descriptor table,
    /// and arms the read of the shard's eventfd.
    pub(crate) fn new(
        shard: usize,
        shared: Arc<Shared>,
        tuning: &ShardTuning,
    ) -> io::Result<UringDriver> {
        let ring = Ring::with_cq_entries(tuning.sq_entries, tuning.cq_entries)
            .map_err(io::Error::other)?;
        let bufs = receive_buffers(&ring, shard, tuning)?;
        let file_limit = super::probe::open_file_limit().unwrap_or(1024);
        let slots = match tuning.direct_slots {
            Some(n) => n as usize,
            None => file_limit
                .saturating_sub(DIRECT_SLOTS_MARGIN)
                .min(MAX_DIRECT_SLOTS),
        };
        let direct = slots > 0
            && match ring.submitter().register_files_sparse(slots as u32) {
                Ok(()) => true,
                Err(err) => {
                    warn!(shard, slots, error = %err, "no direct descriptors; using plain file descriptors");
                    false
                }
            };
        info!(
            shard,
            io = "uring",
            ring = %ring.flags(),
            direct_slots = if direct { slots } else { 0 },
            buffers = bufs.entries(),
            buffer_bytes = bufs.buf_size(),
            incremental = bufs.is_incremental(),
            "shard started"
        );
        shared.ring_fds[shard].store(ring.as_raw_fd(), Ordering::Release);
        let event_fd = shared.event_fds[shard].as_raw_fd();
        let mut driver = UringDriver {
            ring,
            bufs,
            direct,
            slots: if direct { slots } else { file_limit },
            in_flight: 0,
            sends: ByIndex::default(),
            queued: Vec::new(),
            adopting: ByIndex::default(),
            peer_bufs: ByIndex::default(),
            event_buf: Box::leak(Box::new(0u64)),
            event_fd,
            accepted_any: false,
            send_zc_min: tuning.send_zc_min_bytes,
            cqes: Vec::new(),
            shared,
            shard,
        };
        driver.arm_eventfd()?;
        Ok(driver)
    }

    fn stats(&self) -> &ShardStats {
        &self.shared.stats[self.shard]
    }

    /// # Safety
    ///
    /// As [`Ring::push`]: whatever the entry points to stays valid until its last
    /// completion.
    unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: passed on to the caller.
        unsafe { self.ring.push(entry) }?;
        self.in_flight += 1;
        bump(&self.stats().submissions, 1);
        Ok(())
    }

    /// Pushes an operation that the drain does not wait for (wake-ups, the eventfd
    /// read): its completions do not decrement `in_flight`.
    ///
    /// # Safety
    ///
    /// As [`Ring::push`].
    unsafe fn push_uncounted(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        // SAFETY: passed on to the caller.
        unsafe { self.ring.push(entry) }?;
        bump(&self.stats().submissions, 1);
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

    /// Arms the read of this shard's eventfd, which foreign threads write to.
    fn arm_eventfd(&mut self) -> io::Result<()> {
        let entry = opcode::Read::new(
            types::Fd(self.event_fd),
            std::ptr::from_mut(self.event_buf).cast(),
            8,
        )
        .build()
        .user_data(UserData::new(Op::EventFd, 0).encode());
        // SAFETY: the buffer is leaked (`event_buf`), so it outlives the operation; the
        // eventfd lives in `Shared`, which outlives this driver.
        unsafe { self.push_uncounted(&entry) }
    }

    fn socket(&self, index: u32) -> Socket {
        Socket::accepted(index as i32, self.direct)
    }

    /// Submits the unsent part of the connection's send.
    fn submit_send(&mut self, index: u32) -> io::Result<()> {
        let socket = self.socket(index);
        let zc_min = self.send_zc_min;
        let Some(send) = self.sends.get_mut(&index) else {
            return Ok(());
        };
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
            socket.send_msg(msg.point_at(&send.output, send.sent))
        };
        let user_data = UserData {
            op: Op::Send,
            index,
            tag: send.generation,
        }
        .encode();
        // SAFETY: `self.sends` owns the bytes (and the boxed `sendmsg` header and
        // iovecs) until the send's last completion (and a zero-copy send's
        // notification): they leave it only in `on_send`, or are leaked by Drop.
        unsafe { self.push(&entry.user_data(user_data)) }
    }

    /// A send's completion (or a zero-copy send's notification): continues a partial
    /// send, or reports the send once it is over.
    fn on_send(
        &mut self,
        index: u32,
        res: i32,
        flags: u32,
        events: &mut Vec<Event<UringRecv>>,
    ) -> io::Result<()> {
        let stats = &self.shared.stats[self.shard];
        let Some(send) = self.sends.get_mut(&index) else {
            debug_assert!(false, "send completion without a send on {index}");
            return Ok(());
        };
        if cqueue::notif(flags) {
            send.zc_notifs -= 1;
            bump(&stats.zero_copy_notifications, 1);
        } else {
            if has_more(flags) {
                send.zc_notifs += 1;
            }
            if res == -libc::ECANCELED && send.cancelled {
                // Stopped while it waited for room: nothing more went out.
                send.done = true;
            } else if res <= 0 {
                // EPIPE, ECONNRESET, or the shutdown of a forced close. (A send of a
                // non-empty buffer never returns 0 on a stream socket; treat it as an
                // error rather than loop on it.)
                send.failed = Some(if res < 0 { -res } else { libc::EPIPE });
                send.done = true;
            } else {
                send.sent += res as usize;
                bump(&stats.bytes_sent, res as u64);
                if send.sent < send.len && !send.cancelled {
                    bump(&stats.partial_sends, 1);
                    return self.submit_send(index);
                }
                send.done = true;
            }
        }
        // While notifications are due, the kernel may still read the bytes: they are
        // kept until the last one.
        if send.done
            && send.zc_notifs == 0
            && let Some(send) = self.sends.remove(&index)
        {
            events.push(match send.failed {
                Some(errno) => Event::Sent {
                    index,
                    result: Err(errno),
                },
                None if send.sent < send.len => Event::Unsent {
                    index,
                    output: send.output,
                    sent: send.sent,
                },
                None => Event::Sent {
                    index,
                    result: Ok(send.output),
                },
            });
        }
        Ok(())
    }

    /// Turns one completion into events.
    fn complete(
        &mut self,
        cqe: &cqueue::Entry,
        events: &mut Vec<Event<UringRecv>>,
    ) -> io::Result<()> {
        let flags = cqe.flags();
        let more = has_more(flags);
        let Some(ud) = UserData::decode(cqe.user_data()) else {
            debug_assert!(false, "unknown user_data {:#x}", cqe.user_data());
            return Ok(());
        };
        let res = cqe.result();
        match ud.op {
            // Woken by another shard: the turn delivers whatever it queued.
            Op::Wake => {
                bump(&self.stats().wakeups_received, 1);
                events.push(Event::Woken);
                return Ok(());
            }
            Op::MsgRing => return Ok(()),
            Op::EventFd => {
                bump(&self.stats().wakeups_received, 1);
                events.push(Event::Woken);
                if res == -libc::ECANCELED {
                    return Ok(());
                }
                return self.arm_eventfd();
            }
            _ => {}
        }
        if !more {
            self.in_flight -= 1;
        }
        let index = ud.index;
        match ud.op {
            Op::Accept => {
                let result = if res >= 0 {
                    self.accepted_any = true;
                    Ok(res as u32)
                } else {
                    if self.direct && -res == libc::EINVAL && !self.accepted_any {
                        // A kernel without direct accept refuses the request itself.
                        warn!(
                            shard = self.shard,
                            "direct accept refused; using plain file descriptors"
                        );
                        self.direct = false;
                        self.slots = super::probe::open_file_limit().unwrap_or(1024);
                    }
                    Err(-res)
                };
                events.push(Event::Accept {
                    listener: index,
                    result,
                    more,
                });
            }
            Op::Recv => {
                let token = UringRecv {
                    res,
                    bid: buffer_id(flags),
                    more,
                    buffer_more: cqueue::buffer_more(flags),
                };
                events.push(Event::Recv { index, token });
            }
            Op::Send => self.on_send(index, res, flags, events)?,
            Op::PeerName => {
                let buf = self.peer_bufs.remove(&index);
                let addr = match buf {
                    Some(buf) if res > 0 => sockaddr_to_std(&buf.0),
                    // Kernels before 6.7 have no getsockopt in io_uring; a plain fd can
                    // still be asked directly.
                    _ => match self.socket(index) {
                        Socket::Fd(fd) => getpeername(fd),
                        Socket::Fixed(_) => None,
                    },
                };
                events.push(Event::Peer { index, addr });
            }
            Op::Shutdown => events.push(Event::Shutdown { index, res }),
            Op::FdInstall => {
                let result = if res >= 0 {
                    // SAFETY: the kernel installed this descriptor for us just now;
                    // nothing else owns it.
                    Ok(unsafe { OwnedFd::from_raw_fd(res) })
                } else {
                    Err(-res)
                };
                events.push(Event::Detached { index, result });
            }
            Op::FilesUpdate => {
                // The kernel holds its own reference in the table now (or failed):
                // our descriptor closes either way.
                let result = match self.adopting.remove(&index) {
                    Some((slot, _fd)) if res == 1 => Ok(*slot as u32),
                    _ => Err(if res < 0 { -res } else { libc::EIO }),
                };
                events.push(Event::Adopted {
                    token: index,
                    result,
                });
            }
            Op::Close => events.push(Event::Closed { index, res }),
            Op::Cancel | Op::Wake | Op::MsgRing | Op::EventFd => {}
        }
        Ok(())
    }
}

impl Driver for UringDriver {
    type RecvToken = UringRecv;

    fn max_slots(&self) -> usize {
        self.slots
    }

    fn wait(&mut self, timeout_ms: u64, events: &mut Vec<Event<UringRecv>>) -> io::Result<()> {
        let timeout_ms = if self.queued.is_empty() {
            timeout_ms
        } else {
            0
        };
        events.append(&mut self.queued);
        match self.ring.wait(1, Duration::from_millis(timeout_ms)) {
            Ok(_) => {}
            // The completion queue overflowed: drain it below, then submit again.
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {}
            Err(err) => return Err(err),
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        self.ring.drain_completions(&mut cqes);
        for cqe in cqes.drain(..) {
            self.complete(&cqe, events)?;
        }
        self.cqes = cqes;
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn arm_accept(&mut self, listener: u32, socket: &TcpListener) -> io::Result<()> {
        let entry = accept_multi(socket.as_raw_fd(), self.direct)
            .user_data(UserData::new(Op::Accept, listener).encode());
        // SAFETY: the accept points to no memory (no address buffer); the shard keeps
        // the listener open until the accept's last completion.
        unsafe { self.push(&entry) }
    }

    fn cancel_accept(&mut self, listener: u32, _socket: &TcpListener) -> io::Result<()> {
        self.cancel(UserData::new(Op::Accept, listener).encode())
    }

    fn peer_name(&mut self, slot: Slot, ipv6: bool) -> io::Result<()> {
        let len = if ipv6 {
            size_of::<libc::sockaddr_in6>()
        } else {
            size_of::<libc::sockaddr_in>()
        };
        // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
        let storage = unsafe { std::mem::zeroed() };
        let buf = self
            .peer_bufs
            .entry(slot.index)
            .insert_entry(Box::new(PeerBuf(storage)));
        let ptr = &raw mut buf.into_mut().0;
        let entry = self
            .socket(slot.index)
            .peer_name(ptr, len as u32)
            .user_data(user_data(Op::PeerName, slot));
        // SAFETY: the address buffer is boxed in `peer_bufs` and leaves it only at this
        // operation's completion (or is leaked by Drop).
        unsafe { self.push(&entry) }
    }

    fn arm_recv(&mut self, slot: Slot) -> io::Result<()> {
        let entry = self
            .socket(slot.index)
            .recv_multi(BGID)
            .user_data(user_data(Op::Recv, slot));
        // SAFETY: the recv writes only into buffers of `self.bufs`, which stays
        // registered and mapped while the ring lives (the ring is dropped first).
        unsafe { self.push(&entry) }
    }

    fn cancel_recv(&mut self, slot: Slot) -> io::Result<()> {
        self.cancel(user_data(Op::Recv, slot))
    }

    fn cancel_send(&mut self, slot: Slot) -> io::Result<()> {
        let Some(send) = self.sends.get_mut(&slot.index) else {
            return Ok(());
        };
        send.cancelled = true;
        // If the send's completion is in the ring already, this finds nothing; the
        // flag ends the send there instead of sending the rest.
        self.cancel(user_data(Op::Send, slot))
    }

    fn receive(&mut self, _index: u32, token: &UringRecv) -> Received<'_> {
        let len = usize::try_from(token.res).unwrap_or(0);
        let end = if token.res == -libc::ENOBUFS {
            bump(&self.stats().enobufs, 1);
            Some(RecvEnd::NoBuffers)
        } else if token.res <= 0 {
            Some(RecvEnd::Closed((token.res < 0).then_some(-token.res)))
        } else {
            None
        };
        let data: &mut [u8] = match token.bid {
            Some(bid) => {
                bump(&self.stats().bytes_received, len as u64);
                // The token is not `Clone` and its buffer goes back only in `release`,
                // which takes the token; the slice's `&mut self` borrow keeps `release`
                // from running while it lives.

                // SAFETY: `bid` comes from a completion of a recv on this ring's group,
                // and is not recycled while the slice lives (see above).
                unsafe { self.bufs.received(bid, len) }
            }
            None => &mut [],
        };
        Received {
            data,
            end,
            more: token.more,
        }
    }

    fn release(&mut self, token: UringRecv) {
        if let Some(bid) = token.bid {
            let len = usize::try_from(token.res).unwrap_or(0);
            self.bufs.release(bid, len, token.buffer_more);
        }
    }

    fn send(&mut self, slot: Slot, output: Output) -> io::Result<Option<Result<Output, i32>>> {
        let len = output.len();
        if !output.rest.is_empty() {
            bump(&self.stats().vectored_sends, 1);
        }
        let previous = self.sends.insert(
            slot.index,
            InFlightSend {
                output,
                sent: 0,
                len,
                msg: None,
                zc_notifs: 0,
                done: false,
                failed: None,
                cancelled: false,
                generation: slot.generation,
            },
        );
        debug_assert!(previous.is_none(), "two sends in flight on {}", slot.index);
        self.submit_send(slot.index)?;
        Ok(None)
    }

    fn shutdown(&mut self, slot: Slot) -> io::Result<()> {
        let entry = self
            .socket(slot.index)
            .shutdown()
            .user_data(user_data(Op::Shutdown, slot));
        // SAFETY: a shutdown points to no memory.
        unsafe { self.push(&entry) }
    }

    fn detach(&mut self, slot: Slot) -> io::Result<()> {
        match self.socket(slot.index) {
            Socket::Fixed(index) => {
                // Flags 0: the new descriptor is close-on-exec.
                let entry = opcode::FixedFdInstall::new(types::Fixed(index), 0)
                    .build()
                    .user_data(user_data(Op::FdInstall, slot));
                // SAFETY: installing a descriptor points to no memory.
                unsafe { self.push(&entry) }
            }
            Socket::Fd(fd) => {
                // SAFETY: the slot's descriptor is the connection's, open until the
                // shard closes it, which it does only after this event.
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                let result = fd
                    .try_clone_to_owned()
                    .map_err(|err| err.raw_os_error().unwrap_or(libc::EIO));
                self.queued.push(Event::Detached {
                    index: slot.index,
                    result,
                });
                Ok(())
            }
        }
    }

    fn adopt(&mut self, fd: OwnedFd, token: u32) -> io::Result<()> {
        if !self.direct {
            let index = fd.into_raw_fd() as u32;
            self.queued.push(Event::Adopted {
                token,
                result: Ok(index),
            });
            return Ok(());
        }
        // The kernel picks a free slot of the table (IORING_FILE_INDEX_ALLOC), as
        // multishot accept does, so the two never race for one.
        const FILE_INDEX_ALLOC: i32 = -1;
        let mut slot = Box::new(fd.as_raw_fd());
        let entry = opcode::FilesUpdate::new(std::ptr::from_mut(&mut *slot), 1)
            .offset(FILE_INDEX_ALLOC)
            .build()
            .user_data(UserData::new(Op::FilesUpdate, token).encode());
        self.adopting.insert(token, (slot, fd));
        // SAFETY: the box the kernel reads the descriptor from and writes the slot into
        // is kept in `adopting` until the completion (leaked at drop if still there).
        unsafe { self.push(&entry) }
    }

    fn close(&mut self, slot: Slot) -> io::Result<()> {
        let entry = self
            .socket(slot.index)
            .close()
            .user_data(user_data(Op::Close, slot));
        // SAFETY: a close points to no memory.
        unsafe { self.push(&entry) }
    }

    fn wake(&mut self, target: usize) -> io::Result<()> {
        let fd = self.shared.ring_fds[target].load(Ordering::Acquire);
        if fd < 0 {
            return Ok(()); // not running yet (it drains its queues when it starts) or gone
        }
        let entry =
            opcode::MsgRingData::new(types::Fd(fd), 0, UserData::new(Op::Wake, 0).encode(), None)
                .build()
                .user_data(UserData::new(Op::MsgRing, target as u32).encode());
        // SAFETY: MSG_RING points to no memory of this process; a target ring that
        // closed meanwhile makes it fail with EBADF, which `complete` ignores.
        unsafe { self.push_uncounted(&entry) }?;
        bump(&self.stats().wakeups_sent, 1);
        Ok(())
    }
}

impl Drop for UringDriver {
    fn drop(&mut self) {
        self.shared.ring_fds[self.shard].store(-1, Ordering::Release);
        if self.in_flight == 0 {
            return;
        }
        // The kernel may still use memory of operations in flight (send bytes, peer
        // address buffers): cancel everything, wait a little, and leak what is still
        // pointed to rather than free it under the kernel.
        let cancel = opcode::AsyncCancel2::new(CancelBuilder::any())
            .build()
            .user_data(UserData::new(Op::Cancel, 0).encode());
        // SAFETY: a cancellation points to no memory.
        if unsafe { self.push(&cancel) }.is_ok() {
            let mut cqes = Vec::new();
            for _ in 0..50 {
                if self.in_flight == 0 {
                    break;
                }
                if self.ring.wait(1, Duration::from_millis(20)).is_err() {
                    break;
                }
                cqes.clear();
                self.ring.drain_completions(&mut cqes);
                for cqe in &cqes {
                    let Some(ud) = UserData::decode(cqe.user_data()) else {
                        continue;
                    };
                    if matches!(ud.op, Op::Wake | Op::MsgRing | Op::EventFd) {
                        continue;
                    }
                    if !has_more(cqe.flags()) {
                        self.in_flight -= 1;
                    }
                    if let Some(bid) = buffer_id(cqe.flags()) {
                        let len = usize::try_from(cqe.result()).unwrap_or(0);
                        // SAFETY: a buffer id from a completion of this group; it is
                        // released at once.
                        let _ = unsafe { self.bufs.received(bid, len) };
                        self.bufs
                            .release(bid, len, cqueue::buffer_more(cqe.flags()));
                    }
                    match ud.op {
                        Op::Send if !has_more(cqe.flags()) => drop(self.sends.remove(&ud.index)),
                        Op::PeerName => drop(self.peer_bufs.remove(&ud.index)),
                        Op::FilesUpdate => drop(self.adopting.remove(&ud.index)),
                        Op::FdInstall if cqe.result() >= 0 => {
                            // SAFETY: the kernel installed this descriptor for us just
                            // now (a detach nobody will read); nothing else owns it, so
                            // it is closed here rather than leaked.
                            drop(unsafe { OwnedFd::from_raw_fd(cqe.result()) });
                        }
                        _ => {}
                    }
                }
            }
        }
        if self.in_flight > 0 {
            for (_, send) in self.sends.drain() {
                std::mem::forget(send);
            }
            for (_, buf) in self.peer_bufs.drain() {
                std::mem::forget(buf);
            }
            for (_, (slot, _fd)) in self.adopting.drain() {
                std::mem::forget(slot);
            }
        }
    }
}

fn user_data(op: Op, slot: Slot) -> u64 {
    UserData {
        op,
        index: slot.index,
        tag: slot.generation,
    }
    .encode()
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
    let n = (total / 4096).clamp(1, u64::from(MAX_ENTRIES));
    (1 << (63 - n.leading_zeros()), 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_buffers_keep_the_memory_in_4_kib_buffers() {
        assert_eq!(whole_buffers(64, 64 * 1024), (1024, 4096));
        assert_eq!(whole_buffers(16, 256), (16, 256));
        assert_eq!(whole_buffers(3, 5000), (2, 4096));
        assert_eq!(whole_buffers(32768, 1 << 20), (32768, 4096));
    }
}
