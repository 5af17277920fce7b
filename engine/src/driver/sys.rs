//! The plain system calls both drivers, the shard threads and the server need that
//! have no safe wrapper in std: thread affinity, the peer address of a socket, the
//! wake-up eventfd, and `PR_SET_THP_DISABLE`.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use tracing::debug;

/// A non-blocking, close-on-exec eventfd: foreign threads and other shards write to a
/// shard's to wake it.
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor
    // that nothing else owns.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd (wakes whoever waits on it). A full counter (`EAGAIN`) is
/// still a pending wake-up, so the result is not needed.
pub(crate) fn eventfd_write(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an open descriptor.
    let _ = unsafe {
        libc::write(
            fd.as_raw_fd(),
            std::ptr::from_ref(&one).cast(),
            size_of::<u64>(),
        )
    };
}

/// Resets an eventfd's counter (non-blocking: nothing to read is fine).
pub(crate) fn eventfd_read(fd: BorrowedFd<'_>) {
    let mut count = 0u64;
    // SAFETY: reads at most 8 bytes into a live u64 from an open descriptor.
    let _ = unsafe {
        libc::read(
            fd.as_raw_fd(),
            std::ptr::from_mut(&mut count).cast(),
            size_of::<u64>(),
        )
    };
}

/// `prctl(PR_SET_THP_DISABLE)`: no transparent huge pages for this process.
pub(crate) fn disable_thp() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only; it changes a flag of this process.
    let res = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if res != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread to the `shard`-th CPU it may run on (modulo their count).
/// Failure (a restricted container, say) is ignored: the shard runs unpinned.
pub(crate) fn pin_to_core(shard: usize) {
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

/// The address in a `sockaddr_storage` filled by the kernel, if it is IPv4 or IPv6.
pub(crate) fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
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
pub(crate) fn getpeername(fd: i32) -> Option<SocketAddr> {
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
        use std::net::TcpListener;
        use std::os::fd::AsRawFd;
        let v4: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let listener = TcpListener::bind(v4).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(addr).unwrap();
        let (server, peer) = listener.accept().unwrap();
        assert_eq!(getpeername(server.as_raw_fd()), Some(peer));
        assert_eq!(peer, client.local_addr().unwrap());
    }
}
