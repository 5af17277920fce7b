//! The Unix socket two processes talk over during a handover: `SOCK_SEQPACKET`, so
//! that each message arrives whole and alone with its descriptors (`SCM_RIGHTS`).
//! Through rustix's safe calls: no `unsafe` here.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketType,
};

/// The most descriptors one message carries (the listeners: shards times addresses).
pub(crate) const MAX_FDS: usize = 253;
/// The largest message: a connection's frozen state must fit (else it is not moved).
pub(crate) const MAX_MESSAGE: usize = 256 * 1024;

/// One end of a handover connection.
#[derive(Debug)]
pub(crate) struct Channel(OwnedFd);

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Listens on `path` (a stale socket file from a process that died is replaced).
pub(crate) fn listen(path: &Path) -> io::Result<OwnedFd> {
    let _ = std::fs::remove_file(path);
    let fd = seqpacket()?;
    rustix::net::bind(&fd, &SocketAddrUnix::new(path)?)?;
    rustix::net::listen(&fd, 1)?;
    // Big messages (a connection's state) need a send buffer to match.
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&fd, 2 * MAX_MESSAGE);
    Ok(fd)
}

/// Waits for the next process to connect to `listener`.
pub(crate) fn accept(listener: &OwnedFd) -> io::Result<Channel> {
    let fd = rustix::net::accept_with(listener, rustix::net::SocketFlags::CLOEXEC)?;
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&fd, 2 * MAX_MESSAGE);
    Ok(Channel(fd))
}

/// Connects to the process listening on `path`.
pub(crate) fn connect(path: &Path) -> io::Result<Channel> {
    let fd = seqpacket()?;
    rustix::net::connect(&fd, &SocketAddrUnix::new(path)?)?;
    let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&fd, 2 * MAX_MESSAGE);
    let _ = rustix::net::sockopt::set_socket_send_buffer_size(&fd, 2 * MAX_MESSAGE);
    Ok(Channel(fd))
}

impl Channel {
    /// Sends one message with `fds` attached (blocking; `EPIPE` once the other side
    /// is gone, never `SIGPIPE`).
    pub(crate) fn send(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        self.send_with(bytes, fds, SendFlags::NOSIGNAL)
    }

    /// Sends one message without descriptors, or fails with `WouldBlock` at once if
    /// the socket is full (a shard thread must not wait on the other process).
    pub(crate) fn send_now(&self, bytes: &[u8]) -> io::Result<()> {
        self.send_with(bytes, &[], SendFlags::NOSIGNAL | SendFlags::DONTWAIT)
    }

    fn send_with(&self, bytes: &[u8], fds: &[BorrowedFd<'_>], flags: SendFlags) -> io::Result<()> {
        if bytes.len() > MAX_MESSAGE {
            // The other side's receive buffer is this large: it could not take it.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "handover message too large",
            ));
        }
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(io::Error::other("too many descriptors for one message"));
        }
        let n = rustix::net::sendmsg(&self.0, &[IoSlice::new(bytes)], &mut control, flags)?;
        if n != bytes.len() {
            return Err(io::Error::other("message cut short"));
        }
        Ok(())
    }

    /// Receives one message and its descriptors; `None` when the other side is gone.
    /// `wait: false` returns `WouldBlock` at once when nothing has arrived.
    pub(crate) fn recv(&self, wait: bool) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut flags = RecvFlags::CMSG_CLOEXEC;
        if !wait {
            flags |= RecvFlags::DONTWAIT;
        }
        let msg = rustix::net::recvmsg(
            &self.0,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            flags,
        )?;
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if msg.bytes == 0 && fds.is_empty() {
            return Ok(None);
        }
        if msg.flags.contains(rustix::net::ReturnFlags::TRUNC) {
            // This message alone is lost, not the channel (see `too_large`).
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "handover message too large",
            ));
        }
        buf.truncate(msg.bytes);
        Ok(Some((buf, fds)))
    }

    /// Whether a [`Channel::recv`] error was one message too large (the channel goes
    /// on) rather than the channel failing.
    pub(crate) fn too_large(err: &io::Error) -> bool {
        err.kind() == io::ErrorKind::InvalidData
    }

    /// Another descriptor of the same socket (a reader thread beside a writer).
    pub(crate) fn try_clone(&self) -> io::Result<Channel> {
        Ok(Channel(self.0.try_clone()?))
    }

    /// Ends both directions: a thread blocked in [`Channel::recv`] returns.
    pub(crate) fn shutdown(&self) -> io::Result<()> {
        Ok(rustix::net::shutdown(&self.0, rustix::net::Shutdown::Both)?)
    }
}
