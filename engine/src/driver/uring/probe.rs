//! Is io_uring usable here, and with which features?
//!
//! [`probe`] creates a small ring the same way a shard will ([`Ring::new`]), asks the
//! kernel which opcodes it knows and runs one no-op through it, so that each of the
//! three io_uring system calls has been made once. When one fails, its `errno` is
//! mapped to an [`Unavailable`] error whose `Display` says what is wrong and how to fix
//! it, so a server can print it at start-up and exit.
//!
//! | errno | usual cause |
//! |---|---|
//! | `ENOSYS` | kernel older than 5.1 or built without `CONFIG_IO_URING`; some sandboxes (gVisor, seccomp profiles) answer `ENOSYS` too |
//! | `EPERM` | `kernel.io_uring_disabled=2`; or `=1` and the process is neither privileged nor in `kernel.io_uring_group`; or a seccomp filter (Docker's default profile since 25.0, systemd `SystemCallFilter=`) |
//! | `ENOMEM` | kernels before 5.12 charge ring memory to `RLIMIT_MEMLOCK` |
//! | `EMFILE` / `ENFILE` | no file descriptor left for the ring |

use std::fmt;
use std::io;

use io_uring::{Probe, opcode};

use super::ring::{Ring, RingFlags};

/// Where the kernel exposes the io_uring switch (Linux 6.6 and later).
const DISABLED_SYSCTL: &str = "/proc/sys/kernel/io_uring_disabled";
/// Which group may still use io_uring when `io_uring_disabled` is 1.
const GROUP_SYSCTL: &str = "/proc/sys/kernel/io_uring_group";

/// Why io_uring cannot be used, as far as the `errno` and the sysctls tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// `ENOSYS`: the kernel has no io_uring (too old, or built without it), or a
    /// sandbox filter answers `ENOSYS` for it.
    NotInKernel,
    /// `EPERM` with `kernel.io_uring_disabled=2`: io_uring is off for every process.
    DisabledBySysctl,
    /// `EPERM` with `kernel.io_uring_disabled=1`: only privileged processes and members
    /// of `kernel.io_uring_group` may create rings.
    RestrictedToGroup {
        /// The group id from `/proc/sys/kernel/io_uring_group`, when readable
        /// (`-1` there means no group is allowed).
        gid: Option<i64>,
    },
    /// `EPERM` while the sysctl allows io_uring (or does not exist): a seccomp filter or
    /// container policy refuses the system call.
    BlockedBySandbox,
    /// `ENOMEM`: the ring's memory could not be locked (`RLIMIT_MEMLOCK` on kernels
    /// before 5.12) or allocated.
    OutOfMemory,
    /// `EMFILE` / `ENFILE`: no file descriptor left for the ring.
    OutOfFileDescriptors,
    /// Any other error.
    Other,
}

/// The sysctls that decide whether unprivileged processes may use io_uring.
///
/// Read with [`IoUringSysctl::read`]; tests build it by hand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoUringSysctl {
    /// `kernel.io_uring_disabled`: 0 allowed, 1 restricted to a group, 2 disabled.
    /// `None` when the file does not exist (kernels before 6.6) or cannot be read.
    pub disabled: Option<u8>,
    /// `kernel.io_uring_group`, `None` when absent or unreadable.
    pub group: Option<i64>,
}

impl IoUringSysctl {
    /// Reads `/proc/sys/kernel/io_uring_disabled` and `/proc/sys/kernel/io_uring_group`.
    pub fn read() -> Self {
        fn read_number<T: std::str::FromStr>(path: &str) -> Option<T> {
            std::fs::read_to_string(path).ok()?.trim().parse().ok()
        }
        IoUringSysctl {
            disabled: read_number(DISABLED_SYSCTL),
            group: read_number(GROUP_SYSCTL),
        }
    }
}

/// io_uring cannot be used: what the kernel said and what to do about it.
///
/// `Display` gives a sentence for an operator; [`Unavailable::reason`] lets code branch;
/// [`std::error::Error::source`] is the `io::Error` of the failed system call.
#[derive(Debug)]
pub struct Unavailable {
    reason: Reason,
    source: io::Error,
}

impl Unavailable {
    /// Maps the error of `io_uring_setup(2)` to a reason, using the sysctls to tell a
    /// disabled kernel from a seccomp filter. Pure: no system calls.
    pub fn classify(source: io::Error, sysctl: IoUringSysctl) -> Self {
        let reason = match source.raw_os_error() {
            Some(libc::ENOSYS) => Reason::NotInKernel,
            Some(libc::EPERM) => match sysctl.disabled {
                Some(2) => Reason::DisabledBySysctl,
                Some(1) => Reason::RestrictedToGroup { gid: sysctl.group },
                _ => Reason::BlockedBySandbox,
            },
            Some(libc::ENOMEM) => Reason::OutOfMemory,
            Some(libc::EMFILE | libc::ENFILE) => Reason::OutOfFileDescriptors,
            _ => Reason::Other,
        };
        Unavailable { reason, source }
    }

    /// Like [`Unavailable::classify`], reading the sysctls of this machine.
    pub fn from_setup_error(source: io::Error) -> Self {
        Self::classify(source, IoUringSysctl::read())
    }

    /// Why io_uring is unavailable.
    pub fn reason(&self) -> Reason {
        self.reason
    }

    /// The error of the failed system call.
    pub fn io_error(&self) -> &io::Error {
        &self.source
    }
}

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "io_uring is unavailable ({}): ", self.source)?;
        match self.reason {
            Reason::NotInKernel => f.write_str(
                "this kernel does not provide io_uring (it needs Linux 6.1 or later built with \
                 CONFIG_IO_URING), or a sandbox such as gVisor or a seccomp profile answers \
                 ENOSYS for it; run on a newer kernel or allow the io_uring_setup, \
                 io_uring_enter and io_uring_register system calls",
            ),
            Reason::DisabledBySysctl => f.write_str(
                "it is disabled for all processes by kernel.io_uring_disabled=2; \
                 enable it with `sysctl kernel.io_uring_disabled=0`",
            ),
            Reason::RestrictedToGroup { gid } => {
                f.write_str(
                    "kernel.io_uring_disabled=1 restricts it to privileged processes and \
                     members of kernel.io_uring_group",
                )?;
                match gid {
                    Some(gid) if gid >= 0 => write!(f, " (gid {gid})")?,
                    Some(_) => f.write_str(" (set to -1: no group)")?,
                    None => {}
                }
                f.write_str(
                    "; run as a member of that group, or allow everyone with \
                     `sysctl kernel.io_uring_disabled=0`",
                )
            }
            Reason::BlockedBySandbox => f.write_str(
                "a seccomp filter or container policy refuses the io_uring system calls \
                 (Docker blocks them by default since 25.0); run the container with \
                 `--security-opt seccomp=<profile allowing io_uring_setup, io_uring_enter, \
                 io_uring_register>` (or `seccomp=unconfined`), or lift the systemd \
                 SystemCallFilter= that blocks them",
            ),
            Reason::OutOfMemory => f.write_str(
                "the ring's memory could not be allocated or locked; on kernels before 5.12 \
                 raise the locked-memory limit (`ulimit -l`, LimitMEMLOCK= in systemd) or use \
                 fewer ring entries",
            ),
            Reason::OutOfFileDescriptors => f.write_str(
                "no file descriptor is left for the ring; raise the limit (`ulimit -n`, \
                 LimitNOFILE= in systemd)",
            ),
            Reason::Other => f.write_str("an io_uring system call failed unexpectedly"),
        }
    }
}

impl std::error::Error for Unavailable {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// What the kernel offers, found by [`probe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// The setup flags a ring got on this kernel (see [`Ring::new`]).
    pub ring_flags: RingFlags,
    /// `IORING_OP_ACCEPT` (multishot accept itself needs 5.19).
    pub accept: bool,
    /// `IORING_OP_RECV` (multishot recv and buffer rings need 6.0 / 5.19).
    pub recv: bool,
    /// `IORING_OP_SEND`.
    pub send: bool,
    /// `IORING_OP_CLOSE` (closing direct descriptors needs 5.15).
    pub close: bool,
    /// `IORING_OP_MSG_RING`, to wake another shard's ring.
    pub msg_ring: bool,
    /// `IORING_FEAT_EXT_ARG`: a wait with a timeout without a timeout SQE.
    pub ext_arg: bool,
    /// `IORING_FEAT_NODROP`: completions are never dropped when the CQ is full.
    pub nodrop: bool,
}

impl Features {
    /// Whether everything the engine needs is present.
    pub fn is_sufficient(&self) -> bool {
        self.accept && self.recv && self.send && self.close && self.ext_arg && self.nodrop
    }
}

/// Creates a small ring and reports the features of this kernel, or why io_uring cannot
/// be used.
pub fn probe() -> Result<Features, Unavailable> {
    let mut ring = Ring::new(8)?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(Unavailable::from_setup_error)?;
    // A sandbox may allow `io_uring_setup` and `io_uring_register` and refuse
    // `io_uring_enter` (a hand-written seccomp profile): every shard would then fail at
    // its first submission. One no-op, submitted and waited for, finds that here.
    let nop = opcode::Nop::new().build().user_data(0);
    // SAFETY: a no-op points at no memory.
    unsafe { ring.push(&nop) }.map_err(Unavailable::from_setup_error)?;
    ring.submit_and_wait(1)
        .map_err(Unavailable::from_setup_error)?;
    let params = ring.params();
    Ok(Features {
        ring_flags: ring.flags(),
        accept: probe.is_supported(opcode::AcceptMulti::CODE),
        recv: probe.is_supported(opcode::RecvMulti::CODE),
        send: probe.is_supported(opcode::Send::CODE),
        close: probe.is_supported(opcode::Close::CODE),
        msg_ring: probe.is_supported(opcode::MsgRingData::CODE),
        ext_arg: params.is_feature_ext_arg(),
        nodrop: params.is_feature_nodrop(),
    })
}

/// The process's soft open-file limit (RLIMIT_NOFILE), which also bounds each ring's
/// registered file table.
pub fn open_file_limit() -> Option<usize> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct passed, which lives on this stack.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0;
    ok.then_some(lim.rlim_cur as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(errno: i32, disabled: Option<u8>, group: Option<i64>) -> Unavailable {
        Unavailable::classify(
            io::Error::from_raw_os_error(errno),
            IoUringSysctl { disabled, group },
        )
    }

    #[test]
    fn enosys_means_no_io_uring_in_kernel() {
        let err = classify(libc::ENOSYS, Some(0), None);
        assert_eq!(err.reason(), Reason::NotInKernel);
        let text = err.to_string();
        assert!(text.contains("does not provide io_uring"), "{text}");
        assert!(text.contains("CONFIG_IO_URING"), "{text}");
    }

    #[test]
    fn eperm_with_sysctl_2_says_disabled_and_how_to_enable() {
        let err = classify(libc::EPERM, Some(2), Some(-1));
        assert_eq!(err.reason(), Reason::DisabledBySysctl);
        let text = err.to_string();
        assert!(text.contains("kernel.io_uring_disabled=2"), "{text}");
        assert!(text.contains("sysctl kernel.io_uring_disabled=0"), "{text}");
    }

    #[test]
    fn eperm_with_sysctl_1_names_the_group() {
        let err = classify(libc::EPERM, Some(1), Some(1234));
        assert_eq!(err.reason(), Reason::RestrictedToGroup { gid: Some(1234) });
        let text = err.to_string();
        assert!(text.contains("io_uring_group"), "{text}");
        assert!(text.contains("gid 1234"), "{text}");
        assert!(text.contains("sysctl kernel.io_uring_disabled=0"), "{text}");

        let none = classify(libc::EPERM, Some(1), Some(-1)).to_string();
        assert!(none.contains("no group"), "{none}");
    }

    #[test]
    fn eperm_with_sysctl_allowing_it_is_a_sandbox() {
        for disabled in [Some(0), None] {
            let err = classify(libc::EPERM, disabled, None);
            assert_eq!(err.reason(), Reason::BlockedBySandbox);
            let text = err.to_string();
            assert!(text.contains("seccomp"), "{text}");
            assert!(text.contains("--security-opt seccomp="), "{text}");
        }
    }

    #[test]
    fn other_errnos() {
        assert_eq!(
            classify(libc::ENOMEM, None, None).reason(),
            Reason::OutOfMemory
        );
        assert!(
            classify(libc::ENOMEM, None, None)
                .to_string()
                .contains("ulimit -l")
        );
        assert_eq!(
            classify(libc::EMFILE, None, None).reason(),
            Reason::OutOfFileDescriptors
        );
        assert_eq!(
            classify(libc::ENFILE, None, None).reason(),
            Reason::OutOfFileDescriptors
        );
        assert_eq!(classify(libc::EINVAL, None, None).reason(), Reason::Other);
    }

    #[test]
    fn the_source_is_the_system_call_error() {
        let err = classify(libc::EPERM, Some(2), None);
        let source = std::error::Error::source(&err).expect("a source");
        assert!(source.to_string().contains("not permitted"), "{source}");
        assert_eq!(err.io_error().raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn probe_finds_what_the_engine_needs_on_this_kernel() {
        let features = probe().expect("io_uring is available on the test machines");
        assert!(features.is_sufficient(), "{features:?}");
        assert!(features.msg_ring, "{features:?}");
    }

    #[test]
    fn sysctl_read_does_not_panic() {
        let sysctl = IoUringSysctl::read();
        if let Some(disabled) = sysctl.disabled {
            assert!(disabled <= 2, "{sysctl:?}");
        }
    }
}
