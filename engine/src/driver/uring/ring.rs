//! One io_uring instance, set up with the best flags this kernel accepts.
//!
//! [`Ring::new`] tries, in order:
//!
//! 1. `SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN` (Linux 6.1): completions are
//!    processed only when the ring's own thread asks for them, with no interrupts of
//!    that thread and no locking between submitters;
//! 2. `COOP_TASKRUN` (5.19): completion work is not forced on the thread with an IPI;
//! 3. no flags.
//!
//! Only `EINVAL` (a flag the kernel does not know) moves on to the next attempt; any
//! other error is final and becomes an [`Unavailable`].
//!
//! # Threads
//!
//! With `SINGLE_ISSUER` only the thread that created the ring may submit to it or
//! register resources with it (the kernel answers `EEXIST` to others). With
//! `DEFER_TASKRUN` the kernel runs completion work (and so posts CQEs) only while that
//! thread is inside `io_uring_enter` with `GETEVENTS`, that is in
//! [`Ring::submit_and_wait`] or [`Ring::wait`]: a loop that only peeks at the CQ would
//! never see a completion. To keep these rules out of reach of mistakes, `Ring` is
//! neither `Send` nor `Sync`: create it on the thread that will drive it.

use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use io_uring::types::{SubmitArgs, Timespec};
use io_uring::{IoUring, Parameters, Submitter, cqueue, squeue};

use super::probe::Unavailable;

/// The setup flags a ring was created with, for a start-up banner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RingFlags {
    /// `IORING_SETUP_SINGLE_ISSUER`: only the creating thread submits.
    pub single_issuer: bool,
    /// `IORING_SETUP_DEFER_TASKRUN`: completion work runs only in the creating thread's
    /// `io_uring_enter(GETEVENTS)`.
    pub defer_taskrun: bool,
    /// `IORING_SETUP_COOP_TASKRUN`: no IPI to run completion work.
    pub coop_taskrun: bool,
}

impl RingFlags {
    /// The attempts of [`Ring::new`], best first.
    pub const ATTEMPTS: [RingFlags; 3] = [
        RingFlags {
            single_issuer: true,
            defer_taskrun: true,
            coop_taskrun: true,
        },
        RingFlags {
            single_issuer: false,
            defer_taskrun: false,
            coop_taskrun: true,
        },
        RingFlags {
            single_issuer: false,
            defer_taskrun: false,
            coop_taskrun: false,
        },
    ];

    fn apply(self, builder: &mut io_uring::Builder) {
        if self.single_issuer {
            builder.setup_single_issuer();
        }
        if self.defer_taskrun {
            builder.setup_defer_taskrun();
        }
        if self.coop_taskrun {
            builder.setup_coop_taskrun();
        }
    }
}

impl fmt::Display for RingFlags {
    /// `SINGLE_ISSUER|DEFER_TASKRUN|COOP_TASKRUN`, or `none`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [
            (self.single_issuer, "SINGLE_ISSUER"),
            (self.defer_taskrun, "DEFER_TASKRUN"),
            (self.coop_taskrun, "COOP_TASKRUN"),
        ];
        let mut first = true;
        for (_, name) in names.iter().filter(|(on, _)| *on) {
            if !first {
                f.write_str("|")?;
            }
            f.write_str(name)?;
            first = false;
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// An io_uring instance owned by one thread. See the module docs for the thread rules.
pub struct Ring {
    uring: IoUring,
    flags: RingFlags,
    /// `*const ()` makes `Ring` neither `Send` nor `Sync` (see the module docs).
    _one_thread: PhantomData<*const ()>,
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("fd", &self.uring.as_raw_fd())
            .field("flags", &self.flags)
            .field("sq_entries", &self.uring.params().sq_entries())
            .field("cq_entries", &self.uring.params().cq_entries())
            .finish()
    }
}

impl Ring {
    /// A ring with `sq_entries` submission entries and four times as many completion
    /// entries (multishot operations post many completions per submission).
    pub fn new(sq_entries: u32) -> Result<Ring, Unavailable> {
        Self::with_cq_entries(sq_entries, sq_entries.saturating_mul(4))
    }

    /// A ring with the given queue sizes (the kernel rounds them up to powers of two).
    pub fn with_cq_entries(sq_entries: u32, cq_entries: u32) -> Result<Ring, Unavailable> {
        let mut last = None;
        for flags in RingFlags::ATTEMPTS {
            let mut builder = IoUring::builder();
            builder.setup_cqsize(cq_entries);
            flags.apply(&mut builder);
            match builder.build(sq_entries) {
                Ok(uring) => {
                    return Ok(Ring {
                        uring,
                        flags,
                        _one_thread: PhantomData,
                    });
                }
                Err(err) if err.raw_os_error() == Some(libc::EINVAL) => last = Some(err),
                Err(err) => return Err(Unavailable::from_setup_error(err)),
            }
        }
        let err = last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL));
        Err(Unavailable::from_setup_error(err))
    }

    /// The setup flags this ring got.
    pub fn flags(&self) -> RingFlags {
        self.flags
    }

    /// The kernel's answer to setup: queue sizes and `IORING_FEAT_*` bits.
    pub fn params(&self) -> &Parameters {
        self.uring.params()
    }

    /// The submitter, for registering resources (files, buffer rings).
    pub fn submitter(&self) -> Submitter<'_> {
        self.uring.submitter()
    }

    /// The ring's file descriptor.
    pub fn as_raw_fd(&self) -> RawFd {
        self.uring.as_raw_fd()
    }

    /// Queues one submission; when the submission queue is full, submits what is queued
    /// first. Nothing reaches the kernel before the next submit or wait.
    ///
    /// # Safety
    ///
    /// Every buffer and file the entry points to must stay valid until the kernel has
    /// posted the operation's last completion (the one without the `more` flag).
    pub unsafe fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: the caller guarantees the entry's buffers live until its last
            // completion, which is `SubmissionQueue::push`'s contract.
            if unsafe { self.uring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            match self.uring.submit() {
                Ok(_) => {}
                Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// Submits what is queued and waits until at least `want` completions are ready.
    /// An interrupted wait (`EINTR`) returns `Ok(0)`.
    pub fn submit_and_wait(&mut self, want: usize) -> io::Result<usize> {
        match self.uring.submit_and_wait(want) {
            Err(err) if err.raw_os_error() == Some(libc::EINTR) => Ok(0),
            other => other,
        }
    }

    /// Submits what is queued and waits until at least `want` completions are ready or
    /// `timeout` has passed (needs `IORING_FEAT_EXT_ARG`, Linux 5.11). A wait that times
    /// out (`ETIME`) or is interrupted (`EINTR`) returns `Ok(0)`.
    pub fn wait(&mut self, want: usize, timeout: Duration) -> io::Result<usize> {
        let ts = Timespec::from(timeout);
        let args = SubmitArgs::new().timespec(&ts);
        match self.uring.submitter().submit_with_args(want, &args) {
            Err(err) if matches!(err.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => Ok(0),
            other => other,
        }
    }

    /// Moves every ready completion into `out` (appending), and returns how many.
    pub fn drain_completions(&mut self, out: &mut Vec<cqueue::Entry>) -> usize {
        let before = out.len();
        out.extend(self.uring.completion());
        out.len() - before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::opcode;

    #[test]
    fn flags_display_for_a_banner() {
        assert_eq!(
            RingFlags::ATTEMPTS[0].to_string(),
            "SINGLE_ISSUER|DEFER_TASKRUN|COOP_TASKRUN"
        );
        assert_eq!(RingFlags::ATTEMPTS[1].to_string(), "COOP_TASKRUN");
        assert_eq!(RingFlags::ATTEMPTS[2].to_string(), "none");
    }

    #[test]
    fn this_kernel_takes_the_best_flags() {
        let ring = Ring::new(8).expect("ring");
        // Linux 6.18 on the test machines: the first attempt succeeds.
        assert_eq!(ring.flags(), RingFlags::ATTEMPTS[0], "{ring:?}");
        assert!(ring.params().cq_entries() >= 32);
    }

    #[test]
    fn nop_round_trip() {
        let mut ring = Ring::new(4).expect("ring");
        let nop = opcode::Nop::new().build().user_data(42);
        // SAFETY: a NOP points to no memory.
        unsafe { ring.push(&nop) }.expect("push");
        ring.submit_and_wait(1).expect("wait");
        let mut cqes = Vec::new();
        assert_eq!(ring.drain_completions(&mut cqes), 1);
        assert_eq!(cqes[0].user_data(), 42);
        assert_eq!(cqes[0].result(), 0);
    }

    #[test]
    fn push_submits_when_the_queue_is_full() {
        let mut ring = Ring::with_cq_entries(2, 64).expect("ring");
        for i in 0..10 {
            let nop = opcode::Nop::new().build().user_data(i);
            // SAFETY: a NOP points to no memory.
            unsafe { ring.push(&nop) }.expect("push");
        }
        let mut cqes = Vec::new();
        while cqes.len() < 10 {
            ring.submit_and_wait(1).expect("wait");
            ring.drain_completions(&mut cqes);
        }
        let mut seen: Vec<u64> = cqes.iter().map(|c| c.user_data()).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn wait_times_out_with_nothing_in_flight() {
        let mut ring = Ring::new(4).expect("ring");
        let start = std::time::Instant::now();
        assert_eq!(ring.wait(1, Duration::from_millis(20)).expect("wait"), 0);
        assert!(start.elapsed() >= Duration::from_millis(15));
    }
}
