//! The least a WebSocket echo server on io_uring can do, as a floor to measure kythera's
//! io_uring driver against (`tools/bench.sh`, server `uring-floor`; issue 18). It sets
//! the ring up as a kythera shard does, through the engine's own ring layer
//! (`kythera_engine::uring`): the same submission and completion queue sizes and flags, a
//! multishot accept into direct descriptors, one multishot recv per connection from a
//! ring of 64 receive buffers of 64 KiB consumed incrementally, and one send per
//! connection per turn, all of a turn's sends submitted together with the wait for the
//! next completions. Per receive every header and piece of payload is answered at once
//! ([`EchoStream`]: appended to the connection's output unmasked, in one pass, so a
//! frame split across receives is not gathered first); that is all: no
//! validation, no limits, no gear, no closing handshake, no timers.
//!
//! ```text
//! uring-floor --port 9004      # prints "listening on 127.0.0.1:9004"
//! ```
//!
//! The 101 is computed (kythera-load checks `Sec-WebSocket-Accept`) with the engine's
//! handshake functions; it is outside the measured window.

use std::io::{self, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;

use benches::floor::{self, EchoStream};
use kythera_engine::uring::completion::{buffer_id, has_more};
use kythera_engine::uring::{BufRing, Ring, Socket, net, probe};

/// What a completion is for: the kind in the high half of its user data, the
/// connection's slot in the low half.
const ACCEPT: u64 = 1;
const RECV: u64 = 2;
const SEND: u64 = 3;
const CLOSE: u64 = 4;

/// A kythera shard's defaults (`ShardTuning`).
const SQ_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 16 * 1024;
const BUF_ENTRIES: u16 = 64;
const BUF_SIZE: u32 = 64 * 1024;
const BGID: u16 = 0;
/// Direct descriptor slots at most (a shard's `MAX_DIRECT_SLOTS`); fewer when the
/// open-file limit, which bounds the registered file table, is lower.
const MAX_SLOTS: usize = 1 << 20;

#[derive(Default)]
struct Conn {
    upgraded: bool,
    /// The request head so far, until the upgrade.
    pending: Vec<u8>,
    /// The echo of the frames after it.
    echo: EchoStream,
    /// What the send in flight sends; it stays put until its completion.
    out: Vec<u8>,
    /// Bytes of `out` sent so far.
    sent: usize,
    sending: bool,
    /// Output made while a send was in flight: it goes next.
    queued: Vec<u8>,
    /// In the turn's list of connections to send for.
    touched: bool,
    closing: bool,
    /// Its descriptor is closed but a send is still in flight: the slot is freed
    /// (and `out` dropped) at the send's completion.
    closed: bool,
}

fn user_data(kind: u64, slot: u32) -> u64 {
    (kind << 32) | u64::from(slot)
}

/// What a connection's received bytes make: the 101 and the echoes, into `queued`.
fn serve(conn: &mut Conn, data: &[u8]) -> io::Result<()> {
    if conn.upgraded {
        conn.echo.echo(data, &mut conn.queued);
        return Ok(());
    }
    conn.pending.extend_from_slice(data);
    let Some((response, head_len)) = floor::upgrade_response(&conn.pending)? else {
        return Ok(());
    };
    conn.queued.extend_from_slice(&response);
    conn.upgraded = true;
    let rest = std::mem::take(&mut conn.pending);
    conn.echo.echo(&rest[head_len..], &mut conn.queued);
    Ok(())
}

struct Floor {
    ring: Ring,
    bufs: BufRing,
    conns: Vec<Option<Conn>>,
    touched: Vec<u32>,
}

impl Floor {
    fn push(&mut self, entry: &io_uring::squeue::Entry) -> io::Result<()> {
        // SAFETY: entries point only at the listener (open for the process's life), a
        // connection's `out` (untouched and kept until its send completes) or nothing.
        unsafe { self.ring.push(entry) }
    }

    fn touch(&mut self, slot: u32) {
        if let Some(Some(conn)) = self.conns.get_mut(slot as usize)
            && !conn.touched
        {
            conn.touched = true;
            self.touched.push(slot);
        }
    }

    fn close(&mut self, slot: u32) -> io::Result<()> {
        let Some(Some(conn)) = self.conns.get_mut(slot as usize) else {
            return Ok(());
        };
        if conn.closing {
            return Ok(());
        }
        conn.closing = true;
        let entry = Socket::Fixed(slot)
            .close()
            .user_data(user_data(CLOSE, slot));
        self.push(&entry)
    }

    fn on_accept(&mut self, res: i32, more: bool, listener: &TcpListener) -> io::Result<()> {
        if res >= 0 {
            let slot = res as u32;
            if self.conns.len() <= slot as usize {
                self.conns.resize_with(slot as usize + 1, || None);
            }
            self.conns[slot as usize] = Some(Conn::default());
            let entry = Socket::Fixed(slot)
                .recv_multi(BGID)
                .user_data(user_data(RECV, slot));
            self.push(&entry)?;
        }
        if !more {
            let entry =
                net::accept_multi(listener.as_raw_fd(), true).user_data(user_data(ACCEPT, 0));
            self.push(&entry)?;
        }
        Ok(())
    }

    fn on_recv(&mut self, slot: u32, res: i32, flags: u32) -> io::Result<()> {
        let more = has_more(flags);
        if res <= 0 {
            if res == -libc::ENOBUFS {
                // Out of receive buffers: the multishot recv ended; start it again.
                let entry = Socket::Fixed(slot)
                    .recv_multi(BGID)
                    .user_data(user_data(RECV, slot));
                return self.push(&entry);
            }
            if !more {
                return self.close(slot);
            }
            return Ok(());
        }
        let bid = buffer_id(flags).ok_or_else(|| io::Error::other("recv without a buffer"))?;
        let len = res as usize;
        let buf_more = io_uring::cqueue::buffer_more(flags);
        // SAFETY: `bid` comes from this completion of a recv that selected from this
        // ring's group, and is released just below.
        let data = unsafe { self.bufs.received(bid, len) };
        let result = match self.conns.get_mut(slot as usize) {
            Some(Some(conn)) if !conn.closing => serve(conn, data),
            _ => Ok(()),
        };
        self.bufs.release(bid, len, buf_more);
        if result.is_err() {
            return self.close(slot);
        }
        if !more {
            let entry = Socket::Fixed(slot)
                .recv_multi(BGID)
                .user_data(user_data(RECV, slot));
            self.push(&entry)?;
        }
        self.touch(slot);
        Ok(())
    }

    fn on_send(&mut self, slot: u32, res: i32) -> io::Result<()> {
        let Some(Some(conn)) = self.conns.get_mut(slot as usize) else {
            return Ok(());
        };
        conn.sending = false;
        if conn.closed {
            self.conns[slot as usize] = None;
            return Ok(());
        }
        if res < 0 {
            return self.close(slot);
        }
        conn.sent += res as usize;
        self.touch(slot);
        Ok(())
    }

    /// Starts a send for every connection touched this turn that has output and no
    /// send in flight.
    fn flush(&mut self) -> io::Result<()> {
        let touched = std::mem::take(&mut self.touched);
        for &slot in &touched {
            let Some(Some(conn)) = self.conns.get_mut(slot as usize) else {
                continue;
            };
            conn.touched = false;
            if conn.sending || conn.closing {
                continue;
            }
            if conn.sent == conn.out.len() {
                conn.out.clear();
                conn.sent = 0;
                std::mem::swap(&mut conn.out, &mut conn.queued);
            }
            if conn.sent == conn.out.len() {
                continue;
            }
            let rest = &conn.out[conn.sent..];
            let entry = Socket::Fixed(slot)
                .send(rest.as_ptr(), rest.len() as u32)
                .user_data(user_data(SEND, slot));
            conn.sending = true;
            self.push(&entry)?;
        }
        self.touched = touched;
        self.touched.clear();
        Ok(())
    }
}

fn main() -> io::Result<()> {
    let listener = floor::listen("uring-floor", 9004)?;
    let ring = Ring::with_cq_entries(SQ_ENTRIES, CQ_ENTRIES).map_err(io::Error::other)?;
    let bufs = match BufRing::new_incremental(&ring, BGID, BUF_ENTRIES, BUF_SIZE) {
        Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
            BufRing::new(&ring, BGID, 1024, 4096)?
        }
        result => result?,
    };
    // As a shard sizes its table: the open-file limit less a margin for other files.
    let slots = probe::open_file_limit()
        .unwrap_or(1024)
        .saturating_sub(64)
        .min(MAX_SLOTS);
    ring.submitter().register_files_sparse(slots as u32)?;
    let mut floor = Floor {
        ring,
        bufs,
        conns: Vec::new(),
        touched: Vec::new(),
    };
    let entry = net::accept_multi(listener.as_raw_fd(), true).user_data(user_data(ACCEPT, 0));
    floor.push(&entry)?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;

    let mut cqes = Vec::new();
    loop {
        floor.ring.submit_and_wait(1)?;
        floor.ring.drain_completions(&mut cqes);
        for cqe in cqes.drain(..) {
            let (data, res, flags) = (cqe.user_data(), cqe.result(), cqe.flags());
            let slot = data as u32;
            match data >> 32 {
                ACCEPT => floor.on_accept(res, has_more(flags), &listener)?,
                RECV => floor.on_recv(slot, res, flags)?,
                SEND => floor.on_send(slot, res)?,
                CLOSE => {
                    if let Some(entry) = floor.conns.get_mut(slot as usize) {
                        match entry {
                            Some(conn) if conn.sending => conn.closed = true,
                            _ => *entry = None,
                        }
                    }
                }
                _ => {}
            }
        }
        floor.flush()?;
    }
}
