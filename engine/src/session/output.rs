//! The output queue: the `Tx` box (output, closing and partial receive state, held only
//! while there is some), the [`Output`] handed to the shard and given back once sent,
//! the return of buffers once a connection is quiet, and the slow-consumer limit.
//!
//! Separate because the buffer reuse and chunking here decide a connection's memory,
//! and they do not depend on what the bytes are.

use std::num::NonZeroU64;

use kythera_handler_api::{CloseCode, ConnId, TerminateError, TerminateReason};

use super::partial_frame::Partial;
use super::{Phase, Session};
use crate::gear::{App, Registries};
use crate::protocol::close::Closing;

/// What a connection holds while it sends, closes, waits for a pong or has received
/// part of a frame. Allocated at the accept (for the upgrade request) or by the first
/// thing to send, and dropped once nothing is left in it and the connection
/// has been quiet for [`TX_QUIET_MS`] (at once after a handshake's response, when no
/// frame has been exchanged yet): an idle connection holds none, and one that
/// converses keeps its buffers from message to message instead of allocating them
/// for each.
#[derive(Default)]
pub(super) struct Tx {
    /// The upgrade request while it arrives, then a frame that continues in the next
    /// receive or a fragmented message in progress; `None` between whole frames (the
    /// common case: a frame that lies whole in one receive is decoded with a decoder on
    /// the stack). Here rather than in the session so that an idle connection holds
    /// one pointer for both.
    pub(super) partial: Option<Box<Partial>>,
    /// Frames encoded and not yet handed to the shard, from `out_start` on.
    pub(super) out: Vec<u8>,
    /// Output queued before `out`, in order: when `out` is full, it goes here and a
    /// new buffer is started rather than `out` grown (see [`Tx::room`]); so does a
    /// received frame's buffer echoed in place.
    pub(super) chunks: Vec<Chunk>,
    /// The allocation of the last completed send, reused for the next.
    pub(super) spare: Vec<u8>,
    /// Receive state no longer needed (the frame that crossed receives is done), kept
    /// for the next frame that does, with its pending buffer's allocation: a
    /// conversing connection then allocates nothing per message even when frames
    /// straddle receive buffers (which incremental buffers do once per 64 KiB).
    pub(super) spare_partial: Option<Box<Partial>>,
    /// Bytes handed to the shard and not yet sent.
    in_flight: usize,
    /// When output was last handed to the shard (the quiet period counts from there).
    pub(super) active_ms: u64,
    pub(super) pong_deadline_ms: Option<NonZeroU64>,
    pub(super) closing: Closing,
    /// Where the output starts in `out`: not 0 only when `out` is a received frame's
    /// buffer whose payload is echoed in place (the bytes before are the rest of the
    /// client's header). A chunk carries its own.
    pub(super) out_start: u8,
}

/// How long a connection stays quiet before its output buffers are given back.
pub const TX_QUIET_MS: u64 = 1_000;

impl Tx {
    /// Nothing queued, nothing in flight, no closing handshake or ping under way: the
    /// box can go (what it holds is only an allocation to reuse).
    pub(super) fn is_empty(&self) -> bool {
        self.nothing_queued()
            && self.partial.is_none()
            && self.in_flight == 0
            && self.pong_deadline_ms.is_none()
            && self.closing.is_open()
    }
}

impl Tx {
    /// Output queued or being sent, in bytes.
    pub(super) fn output_len(&self) -> usize {
        self.queued() + self.in_flight
    }

    /// A copy of the output queued (nothing may be in flight), in order: what a
    /// connection handed over to another process leaves for it to send.
    pub(super) fn queued_copy(&self) -> Vec<u8> {
        debug_assert_eq!(self.in_flight, 0, "a send in flight");
        let mut all = Vec::with_capacity(self.queued());
        for chunk in &self.chunks {
            all.extend_from_slice(chunk.bytes());
        }
        all.extend_from_slice(&self.out[usize::from(self.out_start)..]);
        all
    }

    /// No output waits to be handed to the shard.
    pub(super) fn nothing_queued(&self) -> bool {
        self.out.len() == usize::from(self.out_start) && self.chunks.is_empty()
    }

    /// Bytes waiting to be handed to the shard.
    fn queued(&self) -> usize {
        let chunks: usize = self.chunks.iter().map(Chunk::len).sum();
        chunks + self.out.len() - usize::from(self.out_start)
    }

    /// Keeps a buffer that came back (a completed send, or an output replaced by an
    /// echo in place) for reuse: as the spare output buffer if it is the larger, else
    /// as the pending buffer of the spare receive state; large ones are given back.
    pub(super) fn recycle(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() > SPARE_MAX {
            return;
        }
        buf.clear();
        if buf.capacity() > self.spare.capacity() {
            buf = std::mem::replace(&mut self.spare, buf);
        }
        if let Some(p) = self.spare_partial.as_mut()
            && p.pending.capacity() < buf.capacity()
        {
            p.pending = buf;
        }
    }

    /// Drops what is queued (the peer is gone, or stopped reading).
    pub(super) fn discard_queued(&mut self) {
        self.out = Vec::new();
        self.out_start = 0;
        self.chunks = Vec::new();
    }

    /// The output buffer, with room for `n` more bytes. When `out` holds at least
    /// [`CHUNK_MIN`] bytes and `n` more do not fit, it is queued as a chunk and a new
    /// buffer of at least [`CHUNK`] bytes started: growing it would copy all it holds
    /// each time its capacity doubles, and large output piles up behind a send in
    /// flight. The chunks go out in one `sendmsg` (see [`Output`]).
    /// Inlined into every send (the common case is one comparison); the rare new chunk
    /// is out of line.
    #[inline]
    pub(super) fn room(&mut self, n: usize) -> &mut Vec<u8> {
        let out = &self.out;
        // A received frame's buffer echoed in place is as small as that frame: what
        // follows it goes into a buffer of its own too.
        if out.len() + n > out.capacity() && (out.len() >= CHUNK_MIN || self.out_start > 0) {
            self.new_chunk(n);
        }
        &mut self.out
    }

    /// Queues `out` as a chunk and starts a new output buffer with room for `n` bytes.
    #[cold]
    fn new_chunk(&mut self, n: usize) {
        let next = if self.spare.capacity() >= n && self.out.len() < CHUNK_MIN {
            std::mem::take(&mut self.spare)
        } else {
            Vec::with_capacity(n.max(CHUNK))
        };
        self.push_out(next);
    }

    /// Queues `out` as a chunk (with where its bytes start) and makes `next` the output
    /// buffer.
    pub(super) fn push_out(&mut self, next: Vec<u8>) {
        let buf = std::mem::replace(&mut self.out, next);
        let start = usize::from(std::mem::take(&mut self.out_start));
        self.chunks.push(Chunk { buf, start });
    }
}

/// A buffer of output queued before the current one, and where its bytes start (after
/// the rest of a client's header in a received frame's buffer echoed in place; else 0).
#[derive(Debug, Default)]
pub struct Chunk {
    /// The buffer.
    pub buf: Vec<u8>,
    /// Where the bytes to send start in `buf`.
    pub start: usize,
}

impl Chunk {
    /// The bytes to send.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    /// The number of bytes to send.
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Nothing to send.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Output at least this long is queued as a chunk rather than grown ([`Tx::room`]).
const CHUNK_MIN: usize = 16 * 1024;

/// The least capacity of an output chunk started by [`Tx::room`].
pub(super) const CHUNK: usize = 64 * 1024;

/// The largest send buffer a connection keeps from one send to the next (larger ones,
/// after a burst, are given back, so that a burst does not stay resident).
pub(super) const SPARE_MAX: usize = 64 * 1024;

/// Bytes for the shard to send, from [`Session::take_output`]: `first[start..]`, then
/// the bytes of each of `rest` (output that did not fit one buffer, or frames echoed
/// in place in buffers of their own; sent with one `sendmsg`). Give it back with
/// [`Session::sent`] once sent.
#[derive(Debug, Default)]
pub struct Output {
    /// The first buffer.
    pub first: Vec<u8>,
    /// Where the bytes to send start in `first` (before it: the rest of a client's
    /// frame header, when a received frame is echoed in place).
    pub start: usize,
    /// The buffers after the first, in order.
    pub rest: Vec<Chunk>,
}

impl Output {
    /// The number of bytes to send.
    pub fn len(&self) -> usize {
        let rest: usize = self.rest.iter().map(Chunk::len).sum();
        self.first.len().saturating_sub(self.start) + rest
    }

    /// Nothing to send.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All the bytes in order (for tests and tools that do not send from the buffers).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut all = self.first[self.start..].to_vec();
        for chunk in &self.rest {
            all.extend_from_slice(chunk.bytes());
        }
        all
    }
}

/// The connection's `Tx`, allocated if it has none.
pub(super) fn tx(slot: &mut Option<Box<Tx>>) -> &mut Tx {
    slot.get_or_insert_with(Box::default)
}

impl Session {
    /// Takes the bytes to send now, if any. One send per connection is in flight at a
    /// time; give the output back with [`Session::sent`].
    pub fn take_output(&mut self, now_ms: u64) -> Option<Output> {
        let core = &mut *self;
        let tx = core
            .tx
            .as_deref_mut()
            .filter(|t| !t.out.is_empty() || !t.chunks.is_empty())?;
        let next = std::mem::take(&mut tx.spare);
        let last = std::mem::replace(&mut tx.out, next);
        let start = usize::from(std::mem::take(&mut tx.out_start));
        let output = if tx.chunks.is_empty() {
            Output {
                first: last,
                start,
                rest: Vec::new(),
            }
        } else {
            let mut rest = std::mem::take(&mut tx.chunks);
            let first = rest.remove(0);
            rest.push(Chunk { buf: last, start });
            Output {
                first: first.buf,
                start: first.start,
                rest,
            }
        };
        tx.in_flight = output.len();
        tx.active_ms = now_ms;
        Some(output)
    }

    /// The send of an [`Output`] from [`Session::take_output`] completed.
    pub fn sent(&mut self, output: Output) {
        let mut buf = output.first;
        let core = &mut *self;
        let Some(tx) = core.tx.as_deref_mut() else {
            return;
        };
        tx.in_flight = 0;
        // Keep a modest allocation for the next send; give large ones back. A
        // connection that has not exchanged a frame yet (it only sent its 101) keeps
        // nothing: most such connections stay idle, and an idle connection should hold
        // no buffer.
        let conversing = match &mut core.phase {
            Phase::Open(live) => {
                let meta = live.meta();
                meta.frames_in + meta.frames_out > 0
            }
            Phase::Done => false,
        };
        if !conversing {
            if tx.is_empty() {
                core.tx = None;
            }
        } else {
            buf.clear();
            tx.recycle(buf);
            let mut rest = output.rest;
            for chunk in rest.drain(..) {
                tx.recycle(chunk.buf);
            }
            // The list's own allocation too.
            if tx.chunks.capacity() == 0 {
                tx.chunks = rest;
            }
        }
    }

    /// A send stopped before it was over (a live handover, [`crate::driver`]'s
    /// `cancel_send`): what did not go out is queued again, ahead of what was queued
    /// meanwhile.
    pub fn unsent(&mut self, output: Output, sent: usize) {
        let Some(tx) = self.tx.as_deref_mut() else {
            return;
        };
        tx.in_flight = 0;
        let rest = output.to_vec().split_off(sent.min(output.len()));
        if !rest.is_empty() {
            tx.chunks.insert(
                0,
                Chunk {
                    buf: rest,
                    start: 0,
                },
            );
        }
    }

    /// Bytes queued and in flight towards the client.
    pub fn queued_bytes(&self) -> usize {
        self.queued() + self.tx.as_ref().map_or(0, |t| t.in_flight)
    }

    /// The connection still holds its output buffers: it has sent within the last
    /// [`TX_QUIET_MS`] (or has something to send). The shard keeps a TLS connection's
    /// send buffer as long.
    pub fn holds_output_buffers(&self) -> bool {
        self.tx.is_some()
    }

    /// Bytes queued and not handed to the shard yet.
    fn queued(&self) -> usize {
        self.tx.as_ref().map_or(0, |t| t.queued())
    }

    /// Gives the output buffers back if the connection has been quiet long enough.
    pub(super) fn trim(&mut self, now_ms: u64) {
        if self
            .tx
            .as_ref()
            .is_some_and(|t| t.is_empty() && now_ms >= t.active_ms.saturating_add(TX_QUIET_MS))
        {
            self.tx = None;
        }
    }

    /// The slow-consumer limit: a client that stops reading is closed with 1008 and
    /// what was queued for it is freed. Only bytes waiting behind a send still in
    /// flight count: output the kernel can take at once (one large echo, say) is not a
    /// sign of a client that stopped reading.
    /// Inlined: after every callback, and almost always nothing is in flight.
    #[inline]
    pub(super) fn check_outgoing(
        &mut self,
        id: ConnId,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) {
        let in_flight = self.tx.as_ref().map_or(0, |t| t.in_flight);
        if in_flight != 0 && self.queued() > app.limits().max_outgoing_bytes {
            self.slow_consumer(id, now_ms, app, regs);
        }
    }

    /// [`Session::check_outgoing`] found more queued than the limit.
    #[cold]
    fn slow_consumer(&mut self, id: ConnId, now_ms: u64, app: &App, regs: &mut Registries) {
        // Everything it holds goes at once: what is queued (the close frame below
        // could only follow it, and the peer reads nothing), the spare buffer, a frame
        // half received. The close frame goes out if the send in flight ever
        // completes; the shard stops reading and closes the socket after a short
        // grace (`Session::is_abandoned`), so what the peer keeps sending costs
        // nothing.
        let tx = tx(&mut self.tx);
        tx.discard_queued();
        tx.spare = Vec::new();
        tx.partial = None;
        if self.local_close(now_ms, app) {
            self.send_close(Some(CloseCode::POLICY_VIOLATION), "slow consumer", regs);
        }
        self.terminate(
            id,
            TerminateReason::Error(TerminateError::SlowConsumer),
            now_ms,
            app,
            regs,
        );
        self.abandoned = true;
        self.finished = true;
    }

    /// The peer stopped reading and was closed as a slow consumer: stop reading from
    /// it and close the socket soon, whatever is still in flight.
    pub fn is_abandoned(&self) -> bool {
        self.abandoned
    }
}
