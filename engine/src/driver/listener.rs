//! The listening sockets every shard binds, whichever its driver: plain socket calls
//! through `socket2`.

use std::io;
use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Socket, Type};

/// Fails with `EADDRINUSE` when another socket listens on `addr`, even one with
/// `SO_REUSEPORT` (another kythera): binds a socket without `SO_REUSEPORT` (but with
/// `SO_REUSEADDR`, so that connections in `TIME_WAIT` do not count), which the kernel
/// refuses next to any listener, and closes it without listening. Without this check a
/// second server would bind its `SO_REUSEPORT` listeners beside the first one's and take
/// a share of its connections.
pub fn ensure_unused(addr: SocketAddr) -> io::Result<()> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())
}

/// Binds a TCP listener with `SO_REUSEADDR` and `SO_REUSEPORT`, so that every shard can
/// bind its own listener to the same address and the kernel spreads connections over
/// them. The socket is blocking (io_uring needs no `O_NONBLOCK`; the epoll driver sets
/// it) and close-on-exec (`socket2` opens every socket so).
pub fn bind_reuseport(addr: SocketAddr, backlog: i32) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_listeners_share_a_port() {
        let first = bind_reuseport("127.0.0.1:0".parse().unwrap(), 16).expect("bind");
        let addr = first.local_addr().expect("addr");
        let second = bind_reuseport(addr, 16).expect("SO_REUSEPORT lets a second bind");
        assert_eq!(second.local_addr().expect("addr"), addr);
        std::net::TcpStream::connect(addr).expect("connect");
    }

    #[test]
    fn a_listening_address_is_refused() {
        let first = bind_reuseport("127.0.0.1:0".parse().unwrap(), 16).expect("bind");
        let addr = first.local_addr().expect("addr");
        let err = ensure_unused(addr).expect_err("in use");
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        drop(first);
        ensure_unused(addr).expect("free again");
    }

    #[test]
    fn binds_ipv6_loopback_when_available() {
        match bind_reuseport("[::1]:0".parse().unwrap(), 16) {
            Ok(listener) => assert!(listener.local_addr().expect("addr").is_ipv6()),
            // Containers without IPv6 answer EADDRNOTAVAIL or EAFNOSUPPORT.
            Err(err) => assert!(
                matches!(
                    err.raw_os_error(),
                    Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
                ),
                "{err}"
            ),
        }
    }
}
