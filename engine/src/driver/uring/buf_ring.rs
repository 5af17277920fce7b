//! A provided-buffer ring: receive buffers the kernel picks only when data arrives.
//!
//! One page-aligned anonymous mapping holds, in this order, the ring of `io_uring_buf`
//! entries (rounded up to a page) and `entries` buffers of `buf_size` bytes. The kernel
//! takes buffers from the ring's head when a recv with `BUFFER_SELECT` on this group has
//! data, and reports the buffer id in the completion's flags
//! ([`super::completion::buffer_id`]). The user reads the bytes with
//! [`BufRing::received`] and gives the buffer back with [`BufRing::recycle`], which writes
//! an entry at the tail and publishes the new tail with a release store (the kernel reads
//! it with an acquire load).
//!
//! With incremental consumption ([`BufRing::new_incremental`], `IOU_PBUF_RING_INC`,
//! used from Linux 6.15) a buffer is not used up by one completion: each completion
//! takes only the bytes it received, the next one of the same buffer (from any socket)
//! continues where it left off, and the kernel flags (`IORING_CQE_F_BUF_MORE`) a completion whose
//! buffer it keeps using. Large buffers then serve small receives without waste, and a
//! large message arrives in few completions. The user reads the bytes with
//! [`BufRing::received`] (which knows where they start) and ends with
//! [`BufRing::release`], which gives the buffer back only once the kernel is done with
//! it.
//!
//! Ownership of every buffer is tracked in a bitset: a buffer is either in the ring
//! (the kernel may write it at any time) or taken by the user (between `buffer` and
//! `recycle`). Recycling a buffer that is not taken panics, because putting a buffer in
//! the ring twice would let the kernel write into bytes the user is reading.
//!
//! On drop the group is unregistered first and the memory unmapped after; if the
//! unregistration fails the memory is leaked rather than freed under the kernel.
//! `BufRing` keeps its own duplicate of the ring's file descriptor, so the io_uring
//! instance outlives it whatever the drop order of the owner's fields.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU16, Ordering};

use super::ring::Ring;

/// `struct io_uring_buf` from the kernel's uapi: one ring entry. The `resv` field of
/// entry 0 is the ring's tail.
#[repr(C)]
struct BufEntry {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

const _: () = assert!(size_of::<BufEntry>() == 16);
const _: () = assert!(size_of::<BufEntry>() == size_of::<io_uring::types::BufRingEntry>());

/// `struct io_uring_buf_reg`, for `IORING_UNREGISTER_PBUF_RING` (the io-uring crate's
/// `Submitter` is not reachable from `Drop`, so unregistration uses the system call).
#[repr(C)]
#[derive(Default)]
struct BufReg {
    ring_addr: u64,
    ring_entries: u32,
    bgid: u16,
    flags: u16,
    resv: [u64; 3],
}

const _: () = assert!(size_of::<BufReg>() == 40);

/// `IORING_UNREGISTER_PBUF_RING` from the kernel's uapi.
const IORING_UNREGISTER_PBUF_RING: libc::c_uint = 23;

/// `IOU_PBUF_RING_INC` from the kernel's uapi: the ring's buffers are consumed
/// incrementally.
const IOU_PBUF_RING_INC: u16 = 2;

/// The most entries a buffer ring may have (the kernel's limit).
pub const MAX_ENTRIES: u16 = 1 << 15;

/// A registered provided-buffer ring of `entries` buffers of `buf_size` bytes each.
///
/// Not `Send`: like [`Ring`], it is registered with and must be unregistered from the
/// ring's own thread.
pub struct BufRing {
    /// Start of the mapping: the ring entries, then the buffers.
    map: NonNull<u8>,
    map_len: usize,
    /// Offset of buffer 0 in the mapping.
    buffers_offset: usize,
    entries: u16,
    buf_size: u32,
    bgid: u16,
    /// The tail as last published to the kernel.
    tail: u16,
    /// Bit `bid` is set while buffer `bid` is taken by the user.
    taken: Vec<u64>,
    taken_count: u32,
    /// Incremental consumption: where the next completion's bytes start in each
    /// buffer. Empty otherwise.
    offsets: Vec<u32>,
    /// Our own reference to the io_uring instance, for unregistering in `Drop`.
    ring_fd: OwnedFd,
    registered: bool,
}

impl fmt::Debug for BufRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufRing")
            .field("bgid", &self.bgid)
            .field("entries", &self.entries)
            .field("buf_size", &self.buf_size)
            .field("taken", &self.taken_count)
            .field("incremental", &self.is_incremental())
            .field("registered", &self.registered)
            .finish()
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(4096)
}

/// Major and minor version in a kernel release string such as `6.18.44-fc-v657`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split('.');
    let number = |part: Option<&str>| -> Option<u32> {
        let part = part?;
        let end = part
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(part.len());
        part[..end].parse().ok()
    };
    Some((number(parts.next())?, number(parts.next())?))
}

fn invalid(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl BufRing {
    /// Maps `entries` buffers of `buf_size` bytes, puts them all in the ring and
    /// registers the ring with `ring` as buffer group `bgid`.
    ///
    /// `entries` must be a power of two no larger than [`MAX_ENTRIES`]. Fails with
    /// `EEXIST` if the group id is taken on this ring.
    pub fn new(ring: &Ring, bgid: u16, entries: u16, buf_size: u32) -> io::Result<BufRing> {
        BufRing::with_flags(ring, bgid, entries, buf_size, 0)
    }

    /// Like [`BufRing::new`], with buffers consumed incrementally (see the module
    /// documentation). Fails with `EINVAL` on kernels before 6.15: the flag exists
    /// from 6.12, but until upstream commit 687b2bae ("ensure deferred completions are
    /// flushed for multishot", 6.15) completions of different multishot requests on
    /// one buffer ring could be posted out of order when the completion queue
    /// overflowed, and with incremental buffers the offsets would then give one
    /// connection's bytes to another. (Stable kernels that took the fix are refused
    /// too: the release number is all there is to go by.)
    pub fn new_incremental(
        ring: &Ring,
        bgid: u16,
        entries: u16,
        buf_size: u32,
    ) -> io::Result<BufRing> {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        if kernel_version(&release).is_none_or(|v| v < (6, 15)) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        BufRing::with_flags(ring, bgid, entries, buf_size, IOU_PBUF_RING_INC)
    }

    fn with_flags(
        ring: &Ring,
        bgid: u16,
        entries: u16,
        buf_size: u32,
        flags: u16,
    ) -> io::Result<BufRing> {
        if !entries.is_power_of_two() || entries > MAX_ENTRIES {
            return Err(invalid(
                "buffer ring entries must be a power of two <= 32768",
            ));
        }
        if buf_size == 0 {
            return Err(invalid("buffer size must not be 0"));
        }
        let page = page_size();
        let ring_bytes = (usize::from(entries) * size_of::<BufEntry>()).next_multiple_of(page);
        let buf_bytes = usize::from(entries)
            .checked_mul(buf_size as usize)
            .and_then(|n| n.checked_next_multiple_of(page))
            .ok_or_else(|| invalid("buffer ring too large"))?;
        let map_len = ring_bytes
            .checked_add(buf_bytes)
            .ok_or_else(|| invalid("buffer ring too large"))?;

        // SAFETY: F_DUPFD_CLOEXEC on a descriptor we borrow for the duration of the call.
        let dup = unsafe { libc::fcntl(ring.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `dup` is a fresh descriptor that nothing else owns.
        let ring_fd = unsafe { OwnedFd::from_raw_fd(dup) };

        // Populated at once (`MAP_POPULATE`): the kernel picks buffers in ring order, so
        // every page is written within the first `entries` receives anyway; faulting
        // them in here keeps page faults out of the receive path and makes the
        // process's resident memory show this fixed cost from the start, not spread
        // over the first connections as if it were theirs.

        // SAFETY: an anonymous private mapping at an address of the kernel's choosing;
        // it aliases no Rust object.
        let addr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let map = NonNull::new(addr.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;

        let mut this = BufRing {
            map,
            map_len,
            buffers_offset: ring_bytes,
            entries,
            buf_size,
            bgid,
            tail: 0,
            // Start with every buffer "taken", then recycle them all into the ring.
            taken: vec![u64::MAX; usize::from(entries).div_ceil(64)],
            taken_count: u32::from(entries),
            offsets: if flags & IOU_PBUF_RING_INC != 0 {
                vec![0; usize::from(entries)]
            } else {
                Vec::new()
            },
            ring_fd,
            registered: false,
        };
        for bid in 0..entries {
            this.recycle(bid);
        }
        // SAFETY: the mapping starts page-aligned, holds `entries` ring entries and
        // stays mapped until `Drop`, which unregisters the group before unmapping.
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                this.map.as_ptr() as u64,
                entries,
                bgid,
                flags,
            )
        }?;
        this.registered = true;
        Ok(this)
    }

    /// The buffer group id to put in recvs (`RecvMulti::new(fd, bgid)`).
    pub fn bgid(&self) -> u16 {
        self.bgid
    }

    /// How many buffers the ring has.
    pub fn entries(&self) -> u16 {
        self.entries
    }

    /// The size of each buffer in bytes.
    pub fn buf_size(&self) -> u32 {
        self.buf_size
    }

    /// Whether buffers are consumed incrementally.
    pub fn is_incremental(&self) -> bool {
        !self.offsets.is_empty()
    }

    /// How many buffers are taken by the user (not yet recycled).
    pub fn taken(&self) -> u32 {
        self.taken_count
    }

    fn is_taken(&self, bid: u16) -> bool {
        self.taken[usize::from(bid / 64)] & (1 << (bid % 64)) != 0
    }

    fn set_taken(&mut self, bid: u16, taken: bool) {
        let word = &mut self.taken[usize::from(bid / 64)];
        if taken {
            *word |= 1 << (bid % 64);
        } else {
            *word &= !(1 << (bid % 64));
        }
    }

    fn entry_ptr(&self, index: u16) -> *mut BufEntry {
        debug_assert!(index < self.entries);
        // SAFETY: `index < entries` and the first `entries * 16` bytes of the mapping
        // are the ring.
        unsafe { self.map.as_ptr().cast::<BufEntry>().add(usize::from(index)) }
    }

    fn buffer_ptr(&self, bid: u16) -> *mut u8 {
        debug_assert!(bid < self.entries);
        let offset = self.buffers_offset + usize::from(bid) * self.buf_size as usize;
        // SAFETY: buffer `bid < entries` lies inside the mapping (see `new`).
        unsafe { self.map.as_ptr().add(offset) }
    }

    /// The `len` bytes a completion received into buffer `bid`: from the start of the
    /// buffer, or with incremental consumption from where the previous completion of
    /// this buffer ended. End with [`BufRing::release`].
    ///
    /// # Panics
    ///
    /// If `bid` is not a buffer of this ring or the bytes would overrun it.
    ///
    /// # Safety
    ///
    /// `bid` must come from a completion (`IORING_CQE_F_BUFFER`) of an operation that
    /// selected from this group, and must not have been recycled since: otherwise the
    /// kernel may be writing into the bytes while the slice exists. With incremental consumption the kernel may write
    /// the rest of the buffer (after these bytes) while the slice exists, never these.
    pub unsafe fn received(&mut self, bid: u16, len: usize) -> &mut [u8] {
        assert!(bid < self.entries, "buffer id {bid} out of range");
        let start = self
            .offsets
            .get(usize::from(bid))
            .map_or(0, |&o| o as usize);
        assert!(
            start + len <= self.buf_size as usize,
            "{len} bytes at {start} overrun buffer {bid}"
        );
        if !self.is_taken(bid) {
            self.set_taken(bid, true);
            self.taken_count += 1;
        }
        // SAFETY: the bytes lie in buffer `bid` (checked above), inside the mapping; the
        // kernel handed them over and writes none (the caller's promise), and `&mut self`
        // keeps `release` and `recycle` away while the slice lives.
        unsafe { std::slice::from_raw_parts_mut(self.buffer_ptr(bid).add(start), len) }
    }

    /// Done with the `len` bytes of buffer `bid` from [`BufRing::received`]. `more` is
    /// the completion's `IORING_CQE_F_BUF_MORE`: the kernel goes on filling the rest of
    /// the buffer, which stays in the ring; otherwise the buffer is recycled.
    ///
    /// # Panics
    ///
    /// As for [`BufRing::recycle`], or if `more` is set on a ring that does not
    /// consume incrementally.
    pub fn release(&mut self, bid: u16, len: usize, more: bool) {
        let Some(offset) = self.offsets.get_mut(usize::from(bid)) else {
            assert!(!more, "buffer {bid} kept by the kernel on a plain ring");
            return self.recycle(bid);
        };
        if more {
            *offset += u32::try_from(len).expect("a receive fits in a buffer");
            assert!(self.is_taken(bid), "buffer {bid} released but not taken");
            self.set_taken(bid, false);
            self.taken_count -= 1;
        } else {
            self.recycle(bid);
        }
    }

    /// Gives buffer `bid` back to the kernel.
    ///
    /// # Panics
    ///
    /// If `bid` is not taken (never handed out through [`BufRing::received`], or recycled
    /// already): the same buffer twice in the ring would be written twice.
    pub fn recycle(&mut self, bid: u16) {
        assert!(bid < self.entries, "buffer id {bid} out of range");
        assert!(self.is_taken(bid), "buffer {bid} recycled but not taken");
        self.set_taken(bid, false);
        self.taken_count -= 1;
        if let Some(offset) = self.offsets.get_mut(usize::from(bid)) {
            *offset = 0; // back in the ring, it is filled from its start again
        }

        let entry = self.entry_ptr(self.tail & (self.entries - 1));
        // SAFETY: the slot at the tail is outside [head, tail), so the kernel does not
        // read it; only the fields addr, len and bid are written, never `resv` (which is
        // the tail in entry 0 and is read by the kernel concurrently).
        unsafe {
            ptr::addr_of_mut!((*entry).addr).write(self.buffer_ptr(bid) as u64);
            ptr::addr_of_mut!((*entry).len).write(self.buf_size);
            ptr::addr_of_mut!((*entry).bid).write(bid);
        }
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field of entry 0 is a naturally aligned u16 inside the
        // mapping; it is only accessed atomically (by the kernel with an acquire load).
        let tail = unsafe { AtomicU16::from_ptr(ptr::addr_of_mut!((*self.entry_ptr(0)).resv)) };
        // Release: the entry written above is visible before the new tail.
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.registered {
            let reg = BufReg {
                bgid: self.bgid,
                ..BufReg::default()
            };
            // SAFETY: IORING_UNREGISTER_PBUF_RING reads one `io_uring_buf_reg` from a
            // pointer that is valid for the call; `ring_fd` is our own open descriptor
            // of the io_uring instance.
            let res = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_register,
                    self.ring_fd.as_raw_fd(),
                    IORING_UNREGISTER_PBUF_RING,
                    ptr::from_ref(&reg),
                    1,
                )
            };
            if res < 0 {
                // The kernel may still select these buffers: leaking is the only safe
                // answer.
                return;
            }
        }
        // SAFETY: the mapping is ours and the group is unregistered, so the kernel selects
        // no more buffers; selection and copy happen within one issue on this thread
        // (`BufRing` is not `Send`), so no recv is copying into a buffer now.
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), self.map_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::{opcode, squeue, types};
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.18.44-fc-v657\n"), Some((6, 18)));
        assert_eq!(kernel_version("6.15-rc1"), Some((6, 15)));
        assert_eq!(kernel_version("5.10.0"), Some((5, 10)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version("6.14.3").unwrap() < (6, 15));
    }

    #[test]
    fn rejects_bad_sizes() {
        let ring = Ring::new(4).expect("ring");
        assert!(BufRing::new(&ring, 0, 3, 64).is_err());
        assert!(BufRing::new(&ring, 0, 0, 64).is_err());
        assert!(BufRing::new(&ring, 0, 4, 0).is_err());
    }

    #[test]
    fn registers_and_unregisters() {
        let ring = Ring::new(4).expect("ring");
        let bufs = BufRing::new(&ring, 7, 16, 1024).expect("buf ring");
        assert_eq!(bufs.bgid(), 7);
        assert_eq!(bufs.taken(), 0);
        // The same group id again is refused while registered...
        let err = BufRing::new(&ring, 7, 16, 1024).expect_err("duplicate group");
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST), "{err}");
        drop(bufs);
        // ...and accepted once the first one is dropped (unregistered).
        BufRing::new(&ring, 7, 16, 1024).expect("group id free again");
    }

    #[test]
    fn ring_may_be_dropped_first() {
        let ring = Ring::new(4).expect("ring");
        let bufs = BufRing::new(&ring, 1, 8, 256).expect("buf ring");
        drop(ring);
        drop(bufs);
    }

    #[test]
    #[should_panic(expected = "recycled but not taken")]
    fn double_recycle_panics() {
        let ring = Ring::new(4).expect("ring");
        let mut bufs = BufRing::new(&ring, 1, 8, 256).expect("buf ring");
        bufs.recycle(3);
    }

    /// Receives `data` through a one-shot recv selecting from `bufs`; returns the
    /// buffer id and length.
    fn recv_one(
        ring: &mut Ring,
        bufs: &BufRing,
        rx: &UnixStream,
        tx: &mut UnixStream,
        data: &[u8],
    ) -> (u16, usize) {
        tx.write_all(data).expect("write");
        let (bid, len, _) = recv_any(ring, bufs, rx);
        assert_eq!(len, data.len());
        (bid, len)
    }

    /// One one-shot recv selecting from `bufs`: the buffer id, the length and whether
    /// the kernel keeps the buffer (`IORING_CQE_F_BUF_MORE`).
    fn recv_any(ring: &mut Ring, bufs: &BufRing, rx: &UnixStream) -> (u16, usize, bool) {
        let recv = opcode::Recv::new(types::Fd(rx.as_raw_fd()), ptr::null_mut(), 0)
            .buf_group(bufs.bgid())
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(1);
        // SAFETY: the recv writes only into a buffer of `bufs`, which outlives it (we
        // wait for the completion below).
        unsafe { ring.push(&recv) }.expect("push");
        let mut cqes = Vec::new();
        while cqes.is_empty() {
            ring.submit_and_wait(1).expect("wait");
            ring.drain_completions(&mut cqes);
        }
        let cqe = &cqes[0];
        let len = usize::try_from(cqe.result()).expect("a receive");
        let bid = crate::uring::completion::buffer_id(cqe.flags()).expect("a buffer");
        (bid, len, io_uring::cqueue::buffer_more(cqe.flags()))
    }

    /// Two sockets share an incremental ring through multishot recvs: writes
    /// interleaved between them, bursts larger than all the buffers together (ENOBUFS,
    /// re-armed), an end of file in the middle of a buffer. Every byte arrives in order
    /// at the offset `received` tracks, and no completion without bytes carries a
    /// buffer.
    #[test]
    fn incremental_buffers_shared_by_multishot_recvs() {
        let mut ring = Ring::new(64).expect("ring");
        let mut bufs = BufRing::new_incremental(&ring, 5, 4, 256).expect("incremental ring");
        let bgid = bufs.bgid();
        let (rx0, tx0) = UnixStream::pair().expect("socketpair");
        let (rx1, tx1) = UnixStream::pair().expect("socketpair");
        let rxs = [rx0.as_raw_fd(), rx1.as_raw_fd()];
        let mut txs = [Some(tx0), Some(tx1)];
        let arm = |ring: &mut Ring, s: usize| {
            let recv = opcode::RecvMulti::new(types::Fd(rxs[s]), bgid)
                .build()
                .user_data(s as u64);
            // SAFETY: the recv writes only into buffers of `bufs`; both recvs end (end
            // of file) before the test returns and drops `bufs`.
            unsafe { ring.push(&recv) }.expect("push");
        };
        arm(&mut ring, 0);
        arm(&mut ring, 1);
        let mut sent = [Vec::new(), Vec::new()];
        let mut got = [Vec::new(), Vec::new()];
        let mut ended = [false, false];
        let (mut enobufs, mut seed) = (0, 12_345u32);
        let mut rnd = move || {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (seed >> 16) as usize
        };
        let mut cqes = Vec::new();
        for round in 0..3_000usize {
            for s in 0..2 {
                let Some(tx) = txs[s].as_mut().filter(|_| rnd() % 2 == 0) else {
                    continue;
                };
                let n = if rnd() % 50 == 0 {
                    1_500
                } else {
                    1 + rnd() % 120
                };
                let chunk: Vec<u8> = (0..n)
                    .map(|i| (round * 7 + i * 13 + s * 101) as u8)
                    .collect();
                tx.write_all(&chunk).expect("write");
                sent[s].extend_from_slice(&chunk);
            }
            if round == 1_500 || round == 2_999 {
                txs[0] = None; // end of file, most likely in the middle of a buffer
            }
            if round == 2_999 {
                txs[1] = None;
            }
            let done = |got: &[Vec<u8>; 2], ended: &[bool; 2]| {
                got[0].len() == sent[0].len()
                    && got[1].len() == sent[1].len()
                    && (round < 2_999 || ended.iter().all(|&e| e))
            };
            while !done(&got, &ended) {
                ring.submit_and_wait(1).expect("wait");
                cqes.clear();
                ring.drain_completions(&mut cqes);
                for cqe in &cqes {
                    let s = cqe.user_data() as usize;
                    let res = cqe.result();
                    match crate::uring::completion::buffer_id(cqe.flags()) {
                        Some(bid) => {
                            assert!(res > 0, "a buffer with result {res}");
                            let len = res as usize;
                            // SAFETY: a buffer of this completion, on this group.
                            let bytes = unsafe { bufs.received(bid, len) };
                            got[s].extend_from_slice(bytes);
                            assert_eq!(got[s][..], sent[s][..got[s].len()], "socket {s}");
                            bufs.release(bid, len, io_uring::cqueue::buffer_more(cqe.flags()));
                        }
                        None if res == 0 => ended[s] = true,
                        None if res == -libc::ENOBUFS => enobufs += 1,
                        None => panic!("recv failed: {res}"),
                    }
                    if !io_uring::cqueue::more(cqe.flags()) && res != 0 {
                        arm(&mut ring, s);
                    }
                }
            }
        }
        assert_eq!(got, sent);
        assert!(enobufs > 0, "bursts larger than the ring ran it dry");
        assert_eq!(bufs.taken(), 0);
    }

    /// With incremental consumption, receives share a buffer until it is full, each
    /// continuing where the last ended, and a buffer goes back to the ring only when
    /// the kernel is done with it; over many rounds (ring indexes wrap) every byte
    /// arrives in order.
    #[test]
    fn incremental_buffers_fill_up_before_they_are_recycled() {
        let mut ring = Ring::new(8).expect("ring");
        let mut bufs =
            BufRing::new_incremental(&ring, 3, 4, 256).expect("incremental ring (Linux 6.15)");
        assert!(bufs.is_incremental());
        let (rx, mut tx) = UnixStream::pair().expect("socketpair");

        // Two receives of 100 bytes share the first buffer, back to back.
        tx.write_all(&[1; 100]).expect("write");
        let (a, len, more) = recv_any(&mut ring, &bufs, &rx);
        assert_eq!((len, more), (100, true));
        // SAFETY: `a` comes from the completion of a recv on this group.
        let first = unsafe { bufs.received(a, len) }.as_ptr() as usize;
        bufs.release(a, len, more);
        assert_eq!(bufs.taken(), 0);
        tx.write_all(&[2; 100]).expect("write");
        let (b, len, more) = recv_any(&mut ring, &bufs, &rx);
        assert_eq!((b, len, more), (a, 100, true));
        // SAFETY: as above.
        let second = unsafe { bufs.received(b, len) };
        assert!(second.iter().all(|&x| x == 2));
        assert_eq!(second.as_ptr() as usize, first + 100);
        bufs.release(b, len, more);

        // Every byte in order over many buffers' worth of receives of varied sizes.
        let mut sent = Vec::new();
        let mut got = Vec::new();
        let mut seed = 7u32;
        for round in 0..5_000u32 {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            let n = 1 + (seed >> 16) as usize % 300;
            let chunk: Vec<u8> = (0..n).map(|i| (round as usize + i) as u8).collect();
            tx.write_all(&chunk).expect("write");
            sent.extend_from_slice(&chunk);
            while got.len() < sent.len() {
                let (bid, len, more) = recv_any(&mut ring, &bufs, &rx);
                // SAFETY: a buffer of this completion, on this group.
                let bytes = unsafe { bufs.received(bid, len) };
                got.extend_from_slice(bytes);
                bufs.release(bid, len, more);
                assert_eq!(bufs.taken(), 0);
            }
        }
        assert_eq!(got, sent);
    }

    #[test]
    fn recv_selects_buffers_and_recycle_returns_them() {
        let mut ring = Ring::new(8).expect("ring");
        let mut bufs = BufRing::new(&ring, 2, 4, 100).expect("buf ring");
        let (rx, mut tx) = UnixStream::pair().expect("socketpair");

        // Take all four buffers: they are distinct and 100 bytes apart.
        let mut taken = Vec::new();
        for i in 0..4u8 {
            let (bid, len) = recv_one(&mut ring, &bufs, &rx, &mut tx, &[i; 100]);
            // SAFETY: `bid` comes from the completion of a recv on this group.
            let buf = unsafe { bufs.received(bid, len) };
            assert!(buf.iter().all(|&b| b == i));
            taken.push((bid, buf.as_ptr() as usize));
        }
        assert_eq!(bufs.taken(), 4);
        let mut addrs: Vec<usize> = taken.iter().map(|t| t.1).collect();
        addrs.sort_unstable();
        for pair in addrs.windows(2) {
            assert_eq!(pair[1] - pair[0], 100);
        }
        for (bid, _) in &taken {
            bufs.recycle(*bid);
        }
        assert_eq!(bufs.taken(), 0);

        // Many more rounds than buffers, so ring indexes wrap; the u16 tail wraps too.
        for round in 0..70_000u32 {
            let (bid, len) = recv_one(&mut ring, &bufs, &rx, &mut tx, &round.to_le_bytes());
            // SAFETY: as above.
            let buf = unsafe { bufs.received(bid, len) };
            assert_eq!(buf, round.to_le_bytes());
            bufs.recycle(bid);
        }
    }
}
