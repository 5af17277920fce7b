//! `EpollDriver`: the shard's I/O where io_uring is refused (Docker's and containerd's
//! default seccomp profiles, gVisor, `kernel.io_uring_disabled`), with the same events
//! as the io_uring driver so that everything above it is shared.
//!
//! - Edge-triggered `epoll` for connections, non-blocking sockets. A readable
//!   connection gets one `recv` per turn into the shard's one receive buffer (what a
//!   partial frame needs is kept by its session, as with io_uring's provided buffers),
//!   so an idle connection holds no receive buffer and a busy one cannot starve the
//!   others. A recv that fills the buffer may have left more behind: the connection is
//!   read again in the next turn without waiting for an edge; a shorter one emptied
//!   the socket, so the next bytes raise a new edge. (Level-triggered, the kernel polls
//!   every reported socket again at the next wait: one more poll per message.)
//! - A listener accepts with `accept4` until `EAGAIN` (at most `ACCEPT_BATCH` per
//!   wait); `EMFILE` and its kind end the "multishot" accept as io_uring's does, and
//!   the shard re-arms it after its back-off.
//! - A send is written at once (`send`, or `sendmsg` for an output of several buffers)
//!   and, when the socket takes it whole, is over before `Driver::send` returns (no
//!   event, no extra turn of the loop); what the socket does not take waits for
//!   `EPOLLOUT`, and its event is reported once every byte went out or the send failed.
//! - The peer address, shutdown and close are plain calls whose events are queued and
//!   reported by the next wait (which then does not sleep).
//! - Wake-ups go through each shard's eventfd (no `MSG_RING` without io_uring).
//!
//! A registration is dropped (`EPOLL_CTL_DEL`) as soon as a connection wants neither
//! reading nor writing, since `EPOLLHUP` and `EPOLLERR` are reported whatever was
//! asked and would otherwise wake the loop for nothing.

use std::collections::VecDeque;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use tracing::info;

use crate::driver::iovec::SendMsg;
use crate::driver::sys::{self, getpeername};
use crate::driver::{ByIndex, Driver, Event, Received, RecvEnd, Slot, bump};
use crate::server::Shared;
use crate::session::Output;
use crate::shard::{ShardStats, ShardTuning};

/// Connections accepted per listener per wait, so that a flood of connections does
/// not hold up the connections already open.
const ACCEPT_BATCH: usize = 64;
/// Readiness events taken per `epoll_wait`. Few, so that a turn's connections (their
/// sessions, output and sockets) are still in cache when their sends go out at the end
/// of the turn; the rest stay ready in the kernel for the next wait, which is cheap.
/// Measured with `recv` below: 64 events cost 0.87, 0.92 and 0.94 times the CPU per
/// message of 1,024 with `read` at 100 x 20 B, 1,000 x 20 B and 1,000 x 512 B with 16
/// in flight (paired medians of 5 interleaved runs; the commit has the figures).
const MAX_EVENTS: usize = 64;

/// What an epoll registration stands for, in the top half of its data.
const KIND_CONN: u64 = 0;
const KIND_LISTENER: u64 = 1;
const KIND_EVENTFD: u64 = 2;

/// Edge-triggered (see the module docs); listeners and the eventfd stay
/// level-triggered.
const EPOLLET: u32 = libc::EPOLLET as u32;

/// A connection's interest bits.
const WANT_READ: u8 = 1;
const WANT_WRITE: u8 = 1 << 1;
/// Registered with the epoll instance (with the interest of the other bits).
const REGISTERED: u8 = 1 << 2;
/// Accepted and not closed yet: the driver closes it if it is dropped first.
const OPEN: u8 = 1 << 3;

/// What a recv event stands for.
pub(crate) enum EpollRecv {
    /// The socket is readable: [`Driver::receive`] reads it.
    Ready,
    /// Readable, and the peer has shut its side (`EPOLLRDHUP`): a read that empties
    /// the socket is followed by another, which sees the end of the stream. No edge
    /// would come for it: it arrived with the last bytes.
    ReadyToEnd,
    /// The recv was cancelled ([`Driver::cancel_recv`]).
    Cancelled,
}

/// A send the socket has not taken whole yet.
struct PendingSend {
    output: Output,
    sent: usize,
    len: usize,
}

/// The epoll driver of one shard.
pub(crate) struct EpollDriver {
    epoll: OwnedFd,
    /// The shard's receive buffer: every read goes here and is handed to a session
    /// before the next.
    buf: Box<[u8]>,
    /// Per slot (fd): [`WANT_READ`], [`WANT_WRITE`], [`REGISTERED`].
    interest: Vec<u8>,
    /// Sends waiting for `EPOLLOUT`.
    sends: ByIndex<PendingSend>,
    msg: SendMsg,
    /// Events of calls already made (peer address, shutdown, close, sends that went
    /// out at once, cancels): reported by the next wait.
    queued: VecDeque<Event<EpollRecv>>,
    /// Connections whose last read filled the buffer, or whose peer has shut its side:
    /// read again next turn (with whether the peer has shut its side).
    read_again: Vec<(u32, bool)>,
    /// The listeners' descriptors by listener index, while armed.
    listeners: Vec<Option<RawFd>>,
    ready: Vec<libc::epoll_event>,
    in_flight: usize,
    slots: usize,
    shared: Arc<Shared>,
    shard: usize,
}

impl EpollDriver {
    /// Creates the shard's epoll instance and registers its eventfd.
    pub(crate) fn new(
        shard: usize,
        shared: Arc<Shared>,
        tuning: &ShardTuning,
    ) -> io::Result<EpollDriver> {
        // SAFETY: epoll_create1 takes no pointers; a non-negative result is a new
        // descriptor that nothing else owns.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let slots = crate::uring::probe::open_file_limit().unwrap_or(1024);
        let driver = EpollDriver {
            epoll,
            buf: vec![0; tuning.buf_size.max(4096) as usize].into_boxed_slice(),
            interest: Vec::new(),
            sends: ByIndex::default(),
            msg: SendMsg::new(),
            queued: VecDeque::new(),
            read_again: Vec::new(),
            listeners: Vec::new(),
            ready: Vec::with_capacity(MAX_EVENTS),
            in_flight: 0,
            slots,
            shared,
            shard,
        };
        let event_fd = driver.shared.event_fds[shard].as_raw_fd();
        driver.ctl(
            libc::EPOLL_CTL_ADD,
            event_fd,
            libc::EPOLLIN as u32,
            KIND_EVENTFD << 32,
        )?;
        info!(
            shard,
            io = "epoll",
            buffer_bytes = driver.buf.len(),
            "shard started"
        );
        Ok(driver)
    }

    fn stats(&self) -> &ShardStats {
        &self.shared.stats[self.shard]
    }

    fn ctl(&self, op: i32, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: data };
        // SAFETY: epoll_ctl reads the event, which lives on this stack (and ignores it
        // for EPOLL_CTL_DEL); both descriptors are open.
        let res = unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, fd, &mut event) };
        if res < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sets a connection's interest, registering, changing or dropping its
    /// registration as needed.
    fn set_interest(&mut self, index: u32, want: u8) -> io::Result<()> {
        let want = want & (WANT_READ | WANT_WRITE);
        let slot = index as usize;
        if self.interest.len() <= slot {
            self.interest.resize(slot + 1, 0);
        }
        let old = self.interest[slot];
        let registered = old & REGISTERED != 0;
        let mut events = EPOLLET;
        if want & WANT_READ != 0 {
            events |= (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
        }
        if want & WANT_WRITE != 0 {
            events |= libc::EPOLLOUT as u32;
        }
        let fd = index as RawFd;
        let data = (KIND_CONN << 32) | u64::from(index);
        let now_registered = if want == 0 {
            if registered {
                self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)?;
            }
            false
        } else {
            if !registered {
                self.ctl(libc::EPOLL_CTL_ADD, fd, events, data)?;
            } else if old & (WANT_READ | WANT_WRITE) != want {
                self.ctl(libc::EPOLL_CTL_MOD, fd, events, data)?;
            }
            true
        };
        self.interest[slot] = want | (old & OPEN) | if now_registered { REGISTERED } else { 0 };
        Ok(())
    }

    fn wants(&self, index: u32) -> u8 {
        self.interest.get(index as usize).copied().unwrap_or(0)
    }

    /// Writes what the socket takes of the connection's pending send. `Some` when the
    /// send is over (every byte sent, or failed with the errno).
    fn write_some(&mut self, index: u32) -> Option<Result<Output, i32>> {
        let fd = index as RawFd;
        let stats = &self.shared.stats[self.shard];
        let send = self.sends.get_mut(&index)?;
        loop {
            let res = if send.output.rest.is_empty() {
                let rest = &send.output.first[send.output.start + send.sent..];
                // SAFETY: the pointer and length are those of a live slice; send(2)
                // only reads them during the call.
                unsafe {
                    libc::send(
                        fd,
                        rest.as_ptr().cast(),
                        rest.len(),
                        libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                    )
                }
            } else {
                let hdr = self.msg.point_at(&send.output, send.sent);
                // SAFETY: the header and its iovecs point into `send.output`, alive and
                // unchanged during the call, which only reads them.
                unsafe { libc::sendmsg(fd, hdr, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) }
            };
            if res > 0 {
                send.sent += res as usize;
                bump(&stats.bytes_sent, res as u64);
                if send.sent == send.len {
                    let send = self.sends.remove(&index)?;
                    return Some(Ok(send.output));
                }
                continue;
            }
            let errno = if res == 0 {
                libc::EPIPE
            } else {
                io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO)
            };
            match errno {
                libc::EINTR => continue,
                libc::EAGAIN => {
                    // The socket is full: the rest waits for EPOLLOUT.
                    bump(&stats.partial_sends, 1);
                    return None;
                }
                _ => {
                    self.sends.remove(&index);
                    return Some(Err(errno));
                }
            }
        }
    }

    /// Accepts what a readable listener has, up to [`ACCEPT_BATCH`].
    fn accept_some(&mut self, listener: u32, events: &mut Vec<Event<EpollRecv>>) {
        let Some(Some(fd)) = self.listeners.get(listener as usize).copied() else {
            return;
        };
        for _ in 0..ACCEPT_BATCH {
            // SAFETY: accept4 with no address buffer; a non-negative result is a new
            // descriptor, owned from here on by the shard's connection slot.
            let res = unsafe {
                libc::accept4(
                    fd,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if res >= 0 {
                let slot = res as usize;
                if self.interest.len() <= slot {
                    self.interest.resize(slot + 1, 0);
                }
                self.interest[slot] = OPEN;
                events.push(Event::Accept {
                    listener,
                    result: Ok(res as u32),
                    more: true,
                });
                continue;
            }
            let errno = io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            match errno {
                libc::EAGAIN => return,
                // A connection that went away before it was accepted, or a signal.
                libc::ECONNABORTED | libc::EINTR | libc::EPROTO => continue,
                _ => {
                    // EMFILE, ENFILE, ENOBUFS, ENOMEM...: the accept ends, as io_uring's
                    // multishot does; the shard arms it again after a back-off.
                    let _ = self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0);
                    self.listeners[listener as usize] = None;
                    self.in_flight -= 1;
                    events.push(Event::Accept {
                        listener,
                        result: Err(errno),
                        more: false,
                    });
                    return;
                }
            }
        }
    }

    /// Queues the event of a call made now, for the next wait.
    fn queue(&mut self, event: Event<EpollRecv>) {
        self.in_flight += 1;
        self.queued.push_back(event);
    }
}

impl Driver for EpollDriver {
    type RecvToken = EpollRecv;

    fn max_slots(&self) -> usize {
        self.slots
    }

    fn wait(&mut self, timeout_ms: u64, events: &mut Vec<Event<EpollRecv>>) -> io::Result<()> {
        let timeout = if self.queued.is_empty() && self.read_again.is_empty() {
            i32::try_from(timeout_ms).unwrap_or(i32::MAX)
        } else {
            0
        };
        self.ready.clear();
        // SAFETY: the kernel writes at most MAX_EVENTS events into `ready`, whose
        // capacity is MAX_EVENTS; their count is set from the result below.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                self.ready.as_mut_ptr(),
                MAX_EVENTS as i32,
                timeout,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        } else {
            // SAFETY: the kernel initialised the first `n <= MAX_EVENTS` events.
            unsafe { self.ready.set_len(n as usize) };
        }
        // The calls' events first: they happened before anything this wait saw.
        while let Some(event) = self.queued.pop_front() {
            // A recv's cancel ends in `receive`; every other queued event is the
            // last of its operation.
            if !matches!(event, Event::Recv { .. }) {
                self.in_flight -= 1;
            }
            events.push(event);
        }
        for (index, ending) in self.read_again.drain(..) {
            let token = if ending {
                EpollRecv::ReadyToEnd
            } else {
                EpollRecv::Ready
            };
            events.push(Event::Recv { index, token });
        }
        let ready = std::mem::take(&mut self.ready);
        for event in &ready {
            let (flags, data) = (event.events, event.u64);
            let index = data as u32;
            match data >> 32 {
                KIND_EVENTFD => {
                    sys::eventfd_read(self.shared.event_fds[self.shard].as_fd());
                    bump(&self.stats().wakeups_received, 1);
                    events.push(Event::Woken);
                }
                KIND_LISTENER => self.accept_some(index, events),
                _ => {
                    let want = self.wants(index);
                    let trouble = flags & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0;
                    if want & WANT_WRITE != 0
                        && (flags & libc::EPOLLOUT as u32 != 0 || trouble)
                        && let Some(result) = self.write_some(index)
                    {
                        self.set_interest(index, want & !WANT_WRITE)?;
                        self.in_flight -= 1;
                        events.push(Event::Sent { index, result });
                    }
                    if want & WANT_READ != 0 && (flags & libc::EPOLLIN as u32 != 0 || trouble) {
                        let token = if flags & libc::EPOLLRDHUP as u32 != 0 {
                            EpollRecv::ReadyToEnd
                        } else {
                            EpollRecv::Ready
                        };
                        events.push(Event::Recv { index, token });
                    }
                }
            }
        }
        self.ready = ready;
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn arm_accept(&mut self, listener: u32, socket: &TcpListener) -> io::Result<()> {
        // Non-blocking, so that accepting until EAGAIN never blocks the shard.
        socket.set_nonblocking(true)?;
        let fd = socket.as_raw_fd();
        let slot = listener as usize;
        if self.listeners.len() <= slot {
            self.listeners.resize(slot + 1, None);
        }
        let data = (KIND_LISTENER << 32) | u64::from(listener);
        self.ctl(libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32, data)?;
        self.listeners[slot] = Some(fd);
        self.in_flight += 1;
        Ok(())
    }

    fn cancel_accept(&mut self, listener: u32, socket: &TcpListener) -> io::Result<()> {
        if let Some(armed) = self.listeners.get_mut(listener as usize)
            && armed.take().is_some()
        {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, socket.as_raw_fd(), 0, 0);
            // The armed accept's last event.
            self.queued.push_back(Event::Accept {
                listener,
                result: Err(libc::ECANCELED),
                more: false,
            });
        }
        Ok(())
    }

    fn peer_name(&mut self, slot: Slot, _ipv6: bool) -> io::Result<()> {
        let addr = getpeername(slot.index as RawFd);
        self.queue(Event::Peer {
            index: slot.index,
            addr,
        });
        Ok(())
    }

    fn arm_recv(&mut self, slot: Slot) -> io::Result<()> {
        let want = self.wants(slot.index);
        self.set_interest(slot.index, want | WANT_READ)?;
        self.in_flight += 1;
        Ok(())
    }

    fn cancel_recv(&mut self, slot: Slot) -> io::Result<()> {
        let want = self.wants(slot.index);
        if want & WANT_READ != 0 {
            self.set_interest(slot.index, want & WANT_WRITE)?;
            // The recv's last event ([`Driver::receive`] ends it).
            self.queued.push_back(Event::Recv {
                index: slot.index,
                token: EpollRecv::Cancelled,
            });
        }
        Ok(())
    }

    fn receive(&mut self, index: u32, token: &EpollRecv) -> Received<'_> {
        let nothing = |more| Received {
            data: &mut [],
            end: None,
            more,
        };
        if let EpollRecv::Cancelled = token {
            self.in_flight -= 1;
            return Received {
                data: &mut [],
                end: Some(RecvEnd::Closed(Some(libc::ECANCELED))),
                more: false,
            };
        }
        let want = self.wants(index);
        if want & WANT_READ == 0 {
            // Cancelled after the wait saw it readable: its cancel event follows.
            return nothing(true);
        }
        // `recv` rather than `read`: a socket's `read` goes through the file layer
        // (`vfs_read`, `fdget_pos`) before it reaches the same `sock_recvmsg`.
        // SAFETY: reads at most `buf.len()` bytes into the shard's buffer, which lives
        // as long as the driver.
        let res = unsafe {
            libc::recv(
                index as RawFd,
                self.buf.as_mut_ptr().cast(),
                self.buf.len(),
                0,
            )
        };
        let end = if res > 0 {
            bump(&self.stats().bytes_received, res as u64);
            let ending = matches!(token, EpollRecv::ReadyToEnd);
            if res as usize == self.buf.len() || ending {
                self.read_again.push((index, ending));
            }
            return Received {
                data: &mut self.buf[..res as usize],
                end: None,
                more: true,
            };
        } else if res == 0 {
            None
        } else {
            let errno = io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO);
            if matches!(errno, libc::EAGAIN | libc::EINTR) {
                return nothing(true);
            }
            Some(errno)
        };
        // End of file or an error: the recv is over.
        let _ = self.set_interest(index, want & WANT_WRITE);
        self.in_flight -= 1;
        Received {
            data: &mut [],
            end: Some(RecvEnd::Closed(end)),
            more: false,
        }
    }

    fn release(&mut self, _token: EpollRecv) {}

    fn send(&mut self, slot: Slot, output: Output) -> io::Result<Option<Result<Output, i32>>> {
        let index = slot.index;
        let len = output.len();
        if !output.rest.is_empty() {
            bump(&self.stats().vectored_sends, 1);
        }
        let previous = self.sends.insert(
            index,
            PendingSend {
                output,
                sent: 0,
                len,
            },
        );
        debug_assert!(previous.is_none(), "two sends in flight on {index}");
        // Written at once (the usual case), or waiting for EPOLLOUT.
        let done = self.write_some(index);
        if done.is_none() {
            let want = self.wants(index);
            self.set_interest(index, want | WANT_WRITE)?;
            self.in_flight += 1;
        }
        Ok(done)
    }

    fn cancel_send(&mut self, slot: Slot) -> io::Result<()> {
        let index = slot.index;
        let Some(send) = self.sends.remove(&index) else {
            return Ok(());
        };
        let want = self.wants(index);
        self.set_interest(index, want & !WANT_WRITE)?;
        // The send counts in `in_flight` already (it waited for EPOLLOUT): its last
        // event is queued without counting it again.
        self.queued.push_back(Event::Unsent {
            index,
            output: send.output,
            sent: send.sent,
        });
        Ok(())
    }

    fn shutdown(&mut self, slot: Slot) -> io::Result<()> {
        // SAFETY: shutdown(2) with integer arguments on the connection's descriptor.
        let res = unsafe { libc::shutdown(slot.index as RawFd, libc::SHUT_RDWR) };
        let res = if res < 0 {
            -io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        } else {
            0
        };
        self.queue(Event::Shutdown {
            index: slot.index,
            res,
        });
        Ok(())
    }

    fn detach(&mut self, slot: Slot) -> io::Result<()> {
        // SAFETY: the slot's descriptor is the connection's, open until the shard
        // closes it (`close` below), which it does only after this event.
        let fd = unsafe { BorrowedFd::borrow_raw(slot.index as RawFd) };
        let result = fd
            .try_clone_to_owned()
            .map_err(|err| err.raw_os_error().unwrap_or(libc::EIO));
        self.queue(Event::Detached {
            index: slot.index,
            result,
        });
        Ok(())
    }

    fn adopt(&mut self, fd: OwnedFd, token: u32) -> io::Result<()> {
        // The socket may come from an io_uring process, whose sockets block.
        let result = match socket2::SockRef::from(&fd).set_nonblocking(true) {
            Ok(()) => {
                let index = fd.into_raw_fd() as u32;
                let slot = index as usize;
                if self.interest.len() <= slot {
                    self.interest.resize(slot + 1, 0);
                }
                self.interest[slot] = OPEN;
                Ok(index)
            }
            Err(err) => Err(err.raw_os_error().unwrap_or(libc::EIO)),
        };
        self.queue(Event::Adopted { token, result });
        Ok(())
    }

    fn close(&mut self, slot: Slot) -> io::Result<()> {
        let index = slot.index;
        if self.sends.remove(&index).is_some() {
            // The shard closes only once its send is over; should one still wait for
            // EPOLLOUT, it ends here.
            self.in_flight -= 1;
        }
        self.read_again.retain(|&(i, _)| i != index);
        self.set_interest(index, 0)?;
        self.interest[index as usize] = 0;
        // SAFETY: the connection's descriptor, accepted by this driver and closed only
        // here, once (the shard frees the slot at the Closed event).
        let res = unsafe { libc::close(index as RawFd) };
        let res = if res < 0 {
            -io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        } else {
            0
        };
        self.queue(Event::Closed { index, res });
        Ok(())
    }

    fn wake(&mut self, target: usize) -> io::Result<()> {
        sys::eventfd_write(self.shared.event_fds[target].as_fd());
        bump(&self.stats().wakeups_sent, 1);
        Ok(())
    }
}

impl Drop for EpollDriver {
    fn drop(&mut self) {
        // Connections still open (a drain that gave up) are closed with the shard:
        // their descriptors are this driver's.
        for (index, want) in self.interest.iter().enumerate() {
            if want & OPEN != 0 {
                // SAFETY: a connection this driver accepted and has not closed.
                unsafe { libc::close(index as RawFd) };
            }
        }
    }
}
