//! The least a WebSocket echo server on epoll can do, as a floor to measure kythera's
//! epoll driver against (`tools/bench.sh`, server `epoll-floor`): one thread, one
//! edge-triggered epoll instance, non-blocking sockets; per readable socket one read
//! (`recv`, as std's `TcpStream` does it) into one 64 KiB buffer (a second next turn
//! when it came back full), every header and piece of payload in it answered at once
//! ([`EchoStream`]: appended to the output unmasked, in one pass, so a frame split
//! across reads is not gathered first) and written back in one write (`send`),
//! `EPOLLOUT` asked for only while output waits. No validation, no limits, no gear, no
//! closing handshake, no timers. (Until the echo was streamed, a frame split across
//! reads was gathered and what followed moved down with `Vec::drain`: `memmove` was a
//! third of its samples at 16 KiB in `perf record -e cpu-clock -g -C 0` during
//! `kythera-load echo -c 100 -b 16384 -p 1`.)
//!
//! ```text
//! epoll-floor --port 9003      # prints "listening on 127.0.0.1:9003"
//! ```
//!
//! The 101 is computed (kythera-load checks `Sec-WebSocket-Accept`) with the engine's
//! handshake functions; it is outside the measured window.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, RawFd};

use benches::floor::{self, EchoStream};

const LISTENER: u64 = u64::MAX;
const MAX_EVENTS: usize = 1024;
/// A connection's registrations: readable, and writable while output waits.
const READ: u32 = (libc::EPOLLIN | libc::EPOLLET) as u32;
const WRITE: u32 = libc::EPOLLOUT as u32;

struct Conn {
    stream: TcpStream,
    upgraded: bool,
    /// The request head so far, until the upgrade.
    pending: Vec<u8>,
    /// The echo of the frames after it.
    echo: EchoStream,
    /// Output the socket did not take yet.
    unsent: Vec<u8>,
    /// Registered for `EPOLLOUT` (only while `unsent` has bytes: otherwise every ACK
    /// that frees send buffer space would wake the loop).
    want_out: bool,
}

fn epoll_ctl(epoll: RawFd, op: i32, fd: RawFd, events: u32, data: u64) -> io::Result<()> {
    let mut event = libc::epoll_event { events, u64: data };
    // SAFETY: epoll_ctl reads the event, which lives on this stack; both descriptors
    // are open.
    if unsafe { libc::epoll_ctl(epoll, op, fd, &mut event) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes what the socket takes of `conn.unsent`.
fn flush(conn: &mut Conn) -> io::Result<()> {
    while !conn.unsent.is_empty() {
        match conn.stream.write(&conn.unsent) {
            Ok(n) => {
                conn.unsent.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One read, and the echo of what it completed. `Ok(true)` when the read filled the
/// buffer (read again next turn).
fn serve(conn: &mut Conn, buf: &mut [u8], out: &mut Vec<u8>) -> io::Result<bool> {
    let n = match conn.stream.read(buf) {
        Ok(0) => return Err(io::Error::from(ErrorKind::UnexpectedEof)),
        Ok(n) => n,
        Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
        Err(e) => return Err(e),
    };
    if !conn.upgraded {
        conn.pending.extend_from_slice(&buf[..n]);
        let Some((response, head_len)) = floor::upgrade_response(&conn.pending)? else {
            return Ok(false);
        };
        conn.unsent.extend_from_slice(&response);
        conn.upgraded = true;
        let rest = std::mem::take(&mut conn.pending);
        conn.echo.echo(&rest[head_len..], &mut conn.unsent);
    } else if conn.unsent.is_empty() {
        // The usual case: one write straight from the echo buffer.
        out.clear();
        conn.echo.echo(&buf[..n], out);
        match conn.stream.write(out) {
            Ok(w) => conn.unsent.extend_from_slice(&out[w..]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => conn.unsent.extend_from_slice(out),
            Err(e) => return Err(e),
        }
    } else {
        conn.echo.echo(&buf[..n], &mut conn.unsent);
    }
    flush(conn)?;
    Ok(n == buf.len())
}

/// One readiness event (or a read-again) of connection `key`.
fn handle(
    epoll: RawFd,
    conns: &mut HashMap<u64, Conn>,
    key: u64,
    flags: u32,
    buf: &mut [u8],
    out: &mut Vec<u8>,
    again: &mut Vec<u64>,
) {
    let Some(conn) = conns.get_mut(&key) else {
        return;
    };
    let mut result = Ok(false);
    if flags & libc::EPOLLOUT as u32 != 0 {
        result = flush(conn).map(|()| false);
    }
    if result.is_ok() && flags & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
        result = serve(conn, buf, out);
    }
    let want_out = !conn.unsent.is_empty();
    if result.is_ok() && want_out != conn.want_out {
        let events = if want_out { READ | WRITE } else { READ };
        let fd = conn.stream.as_raw_fd();
        result = epoll_ctl(epoll, libc::EPOLL_CTL_MOD, fd, events, key).map(|()| false);
        conn.want_out = want_out;
    }
    match result {
        Ok(true) => again.push(key),
        Ok(false) => {}
        Err(_) => {
            conns.remove(&key); // closes the socket, which leaves the epoll set
        }
    }
}

fn main() -> io::Result<()> {
    let listener = floor::listen("epoll-floor", 9003)?;
    listener.set_nonblocking(true)?;
    // SAFETY: epoll_create1 takes no pointers.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(io::Error::last_os_error());
    }
    epoll_ctl(
        epoll,
        libc::EPOLL_CTL_ADD,
        listener.as_raw_fd(),
        libc::EPOLLIN as u32,
        LISTENER,
    )?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;

    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut out = Vec::with_capacity(64 * 1024);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
    let mut again: Vec<u64> = Vec::new();
    let mut next_again: Vec<u64> = Vec::new();
    loop {
        let timeout = if again.is_empty() { -1 } else { 0 };
        // SAFETY: the kernel writes at most MAX_EVENTS events into `events`, which
        // holds that many.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), MAX_EVENTS as i32, timeout) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        for event in &events[..n as usize] {
            let (key, flags) = (event.u64, event.events);
            if key == LISTENER {
                while let Ok((stream, _)) = listener.accept() {
                    stream.set_nonblocking(true)?;
                    let fd = stream.as_raw_fd();
                    epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, READ, fd as u64)?;
                    let conn = Conn {
                        stream,
                        upgraded: false,
                        pending: Vec::new(),
                        echo: EchoStream::default(),
                        unsent: Vec::new(),
                        want_out: false,
                    };
                    conns.insert(fd as u64, conn);
                }
                continue;
            }
            handle(
                epoll,
                &mut conns,
                key,
                flags,
                &mut buf,
                &mut out,
                &mut next_again,
            );
        }
        for key in again.drain(..) {
            handle(
                epoll,
                &mut conns,
                key,
                libc::EPOLLIN as u32,
                &mut buf,
                &mut out,
                &mut next_again,
            );
        }
        std::mem::swap(&mut again, &mut next_again);
    }
}
