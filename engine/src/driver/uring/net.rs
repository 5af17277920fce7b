//! Sockets as io_uring sees them: a connection's descriptor, which is either a plain fd
//! or a direct descriptor (a slot in the ring's registered file table), and the
//! operations on it; and the raw socket calls `kythera-load` builds its io_uring
//! client from (`tcp_socket`, `set_int_option`, `bind`, `sockaddr_of`: an io_uring
//! `connect` takes the address as the kernel's `sockaddr`). The listeners are
//! [`crate::driver::listener`]'s.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::{opcode, squeue, types};

/// A new TCP socket of `addr`'s family: blocking (io_uring needs no `O_NONBLOCK`) and
/// close-on-exec.
pub fn tcp_socket(addr: SocketAddr) -> io::Result<OwnedFd> {
    let domain = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: socket(2) with constant arguments; the result is checked below.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns; dropping it closes it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `setsockopt` of an integer option.
pub fn set_int_option(fd: RawFd, level: i32, name: i32, value: libc::c_int) -> io::Result<()> {
    // SAFETY: the option value points to a live c_int of the size passed.
    let res = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if res < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `bind(2)` of `socket` to `addr`.
pub fn bind(socket: &OwnedFd, addr: SocketAddr) -> io::Result<()> {
    let (storage, len) = sockaddr_of(addr);
    // SAFETY: `storage` holds a sockaddr of `addr`'s family, `len` bytes long.
    let res = unsafe { libc::bind(socket.as_raw_fd(), std::ptr::from_ref(&storage).cast(), len) };
    if res < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `addr` as the kernel takes it (for `bind`, `connect`), with its length.
pub fn sockaddr_of(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe {
                std::ptr::from_mut(&mut storage)
                    .cast::<libc::sockaddr_in>()
                    .write(sin)
            };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe {
                std::ptr::from_mut(&mut storage)
                    .cast::<libc::sockaddr_in6>()
                    .write(sin6)
            };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// A multishot accept on `listener`. With `direct`, each accepted socket goes into a
/// free slot of the ring's registered file table (`register_files_sparse`) and the
/// completion's result is the slot; otherwise the result is a plain fd, opened
/// close-on-exec.
///
/// A direct descriptor has no fd-table entry, so the kernel refuses `SOCK_CLOEXEC`
/// with it: the request fails with `EINVAL` (seen on Linux 6.18).
pub fn accept_multi(listener: RawFd, direct: bool) -> squeue::Entry {
    let flags = if direct { 0 } else { libc::SOCK_CLOEXEC };
    opcode::AcceptMulti::new(types::Fd(listener))
        .allocate_file_index(direct)
        .flags(flags)
        .build()
}

/// `SO_PEERNAME` from `asm-generic/socket.h` (x86-64, AArch64, RISC-V; not MIPS, SPARC
/// or PA-RISC); the `libc` crate does not export it for Linux.
const SO_PEERNAME: u32 = 28;

/// A connection's descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Socket {
    /// A plain file descriptor.
    Fd(RawFd),
    /// A direct descriptor: a slot in the ring's registered file table, valid only in
    /// operations on that ring.
    Fixed(u32),
}

impl Socket {
    /// The socket accepted by a completion with result `res >= 0`.
    pub fn accepted(res: i32, direct: bool) -> Socket {
        debug_assert!(res >= 0);
        if direct {
            Socket::Fixed(res as u32)
        } else {
            Socket::Fd(res)
        }
    }

    /// The fd or slot number, used as the connection's index.
    pub fn index(self) -> u32 {
        match self {
            Socket::Fd(fd) => fd as u32,
            Socket::Fixed(slot) => slot,
        }
    }

    /// A multishot recv that takes buffers from group `bgid`.
    pub fn recv_multi(self, bgid: u16) -> squeue::Entry {
        match self {
            Socket::Fd(fd) => opcode::RecvMulti::new(types::Fd(fd), bgid).build(),
            Socket::Fixed(slot) => opcode::RecvMulti::new(types::Fixed(slot), bgid).build(),
        }
    }

    /// A send of `len` bytes at `buf` (which must stay valid until the completion: see
    /// [`super::Ring::push`]). `MSG_NOSIGNAL`: a peer that is gone yields `EPIPE`, not a
    /// `SIGPIPE`.
    pub fn send(self, buf: *const u8, len: u32) -> squeue::Entry {
        let flags = libc::MSG_NOSIGNAL;
        match self {
            Socket::Fd(fd) => opcode::Send::new(types::Fd(fd), buf, len)
                .flags(flags)
                .build(),
            Socket::Fixed(slot) => opcode::Send::new(types::Fixed(slot), buf, len)
                .flags(flags)
                .build(),
        }
    }

    /// `sendmsg` of the buffers `msg` points to (its `msg_iov`), without `SIGPIPE`.
    /// The header, its iovecs and the bytes must stay valid until the completion.
    pub fn send_msg(self, msg: *const libc::msghdr) -> squeue::Entry {
        let flags = libc::MSG_NOSIGNAL as u32;
        match self {
            Socket::Fd(fd) => opcode::SendMsg::new(types::Fd(fd), msg)
                .flags(flags)
                .build(),
            Socket::Fixed(slot) => opcode::SendMsg::new(types::Fixed(slot), msg)
                .flags(flags)
                .build(),
        }
    }

    /// `shutdown(SHUT_RDWR)`: a pending recv ends (it reads end-of-file) and a send that
    /// waits for buffer space fails, so the connection's operations finish; queued bytes
    /// are still sent, followed by a FIN.
    pub fn shutdown(self) -> squeue::Entry {
        match self {
            Socket::Fd(fd) => opcode::Shutdown::new(types::Fd(fd), libc::SHUT_RDWR).build(),
            Socket::Fixed(slot) => {
                opcode::Shutdown::new(types::Fixed(slot), libc::SHUT_RDWR).build()
            }
        }
    }

    /// `getsockopt(SOL_SOCKET, SO_PEERNAME)`: writes the peer's address into `addr`,
    /// which must stay valid until the completion; works on direct descriptors, which
    /// `getpeername(2)` cannot reach (Linux 6.7). `len` must be the exact size of the
    /// socket family's address (`sockaddr_in` or `sockaddr_in6`): the kernel refuses a
    /// larger one with `EINVAL`. The completion's result is the length written.
    pub fn peer_name(self, addr: *mut libc::sockaddr_storage, len: u32) -> squeue::Entry {
        let level = libc::SOL_SOCKET as u32;
        let name = SO_PEERNAME;
        match self {
            Socket::Fd(fd) => {
                opcode::GetSockOpt::new(types::Fd(fd), level, name, addr.cast(), len).build()
            }
            Socket::Fixed(slot) => {
                opcode::GetSockOpt::new(types::Fixed(slot), level, name, addr.cast(), len).build()
            }
        }
    }

    /// A zero-copy send (`IORING_OP_SEND_ZC`) of `len` bytes at `buf`: the kernel
    /// sends from these pages instead of copying them. Two completions arrive: the
    /// result (with `more` set when a notification follows) and the notification, after
    /// which the bytes may be reused. The bytes must stay valid until the notification.
    pub fn send_zc(self, buf: *const u8, len: u32) -> squeue::Entry {
        let flags = libc::MSG_NOSIGNAL;
        match self {
            Socket::Fd(fd) => opcode::SendZc::new(types::Fd(fd), buf, len)
                .flags(flags)
                .build(),
            Socket::Fixed(slot) => opcode::SendZc::new(types::Fixed(slot), buf, len)
                .flags(flags)
                .build(),
        }
    }

    /// Closes the fd, or empties the slot of a direct descriptor.
    pub fn close(self) -> squeue::Entry {
        match self {
            Socket::Fd(fd) => opcode::Close::new(types::Fd(fd)).build(),
            Socket::Fixed(slot) => opcode::Close::new(types::Fixed(slot)).build(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_index() {
        assert_eq!(Socket::accepted(7, true), Socket::Fixed(7));
        assert_eq!(Socket::accepted(7, false), Socket::Fd(7));
        assert_eq!(Socket::Fixed(3).index(), 3);
    }
}
