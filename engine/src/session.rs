//! One connection's websocket life, without I/O: bytes in, callbacks run, bytes out.
//!
//! The shard moves bytes between the socket and a `Session`; everything else is here:
//! the upgrade, routing, `connect`/`init`, frames, pongs, the closing handshake in both
//! directions, timeouts, the slow-consumer limit, panics in callbacks, and `terminate`
//! exactly once. Time comes in as milliseconds on the shard's monotonic clock.
//!
//! Copies on the receive side: a frame that lies whole in the received bytes is
//! unmasked in place and handed to the gear from there. Only the tail of a frame that
//! continues in the next receive is copied, into `pending`, and processed from there
//! once complete; fragmented messages are copied by the reassembler. Once the header of
//! such a frame is in `pending`, its payload is unmasked piece by piece as it is
//! appended (while the piece is still in the cache), so completing the frame takes no
//! separate unmasking pass. When the gear echoes that frame's payload as it is (the
//! echo gear does), the frame's own buffer becomes the output: the server's header is
//! written in front of the payload, over the end of the client's longer header, and the
//! payload is sent from where it lies instead of being copied into the output.

use std::any::Any;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::panic::{AssertUnwindSafe, catch_unwind};

use handler_api::{
    CloseCode, Conn, ConnId, DataKind, Frame, FrameSink, Message, RequestParts, TerminateError,
    TerminateReason,
};
use tracing::{info, warn};

use crate::gear::{Admission, App, LiveConn, Meta, Registries};
use crate::protocol::ProtocolError;
use crate::protocol::close::{Closing, PeerCloseAction, encode_close_payload};
use crate::protocol::codec::{
    Decoded, DecoderConfig, MAX_HEADER_BYTES, OpCode, RSV1, Role, encode_frame_into, encode_header,
    parse_header, unmasked_header_len,
};
use crate::protocol::decoder::{Decoder, Step};
use crate::protocol::deflate::{Agreed, ConnDeflate, negotiate, with_scratch};
use crate::protocol::fragment::Event;
use crate::protocol::handshake::{
    MAX_HEADERS, Rejection, parse_request, validate_upgrade, write_response,
    write_switching_protocols,
};
use crate::protocol::mask::{extend_unmasked, unmask};
use crate::protocol::utf8::{ChunkedUtf8, Utf8State};
use registry::SharedFrame;

/// A deadline at `at_ms` (`None` only for 0, which no deadline is).
fn deadline(at_ms: u64) -> Option<NonZeroU64> {
    NonZeroU64::new(at_ms.max(1))
}

/// The close reason sent to every connection on drain (SPEC section 3).
pub const DRAIN_REASON: &str = "server shutting down; please reconnect";

/// Whether the gear runs. Two variants, so that the enum is the size of its box
/// pointer; the handshake is `Done` with `Session::handshaking` set.
enum Phase {
    /// The gear runs.
    Open(Box<dyn LiveConn>),
    /// Reading the upgrade request (`Session::handshaking`; what it needs is in the
    /// `Tx` box's `partial`: it is short-lived, and an open connection should not carry
    /// its size), or `terminate` has run (or the gear never started): only the closing
    /// handshake and flushing are left.
    Done,
}

/// A connection whose upgrade request is still arriving (the request's bytes so far
/// are in `Partial::pending`), or whose names Redis is deciding.
struct Handshaking {
    deadline_ms: u64,
    peer: Option<SocketAddr>,
    /// `connect` accepted and claimed names of a clustered gear: the 101 waits for
    /// Redis to decide them ([`Session::on_names_decided`]).
    awaiting: Option<Box<AwaitingNames>>,
}

/// A handshake that `connect` accepted, held until Redis decides the names it claimed:
/// everything needed to answer it then.
struct AwaitingNames {
    conn: Conn,
    key: String,
    deflate: Option<Agreed>,
    admission: Admission,
    gear: usize,
    /// Where the client's first frames start in `Partial::pending` (after the head).
    head_len: usize,
}

/// At most this many bytes of frames may arrive after the request head while its names
/// are decided (clients wait for the 101; these are the ones that do not).
const EARLY_BYTES_MAX: usize = 64 * 1024;

/// One connection, from the accept to the close of its socket.
///
/// What an idle connection needs is all that is kept inline; receive and send state
/// live in the [`Tx`] box, which exists only while it holds something, so that memory
/// per idle connection stays small (docs/architecture.md, "Memory per idle
/// connection").
pub struct Session {
    /// The gear, once routed (for its counters); `u32::MAX` before.
    gear: u32,
    /// Close the socket once the output is flushed.
    finished: bool,
    terminated: bool,
    /// The upgrade request is still arriving.
    handshaking: bool,
    /// The peer stopped reading (slow consumer): the shard stops reading from it and
    /// closes the socket after a short grace instead of the closing timeout.
    abandoned: bool,
    phase: Phase,
    /// When the idle timeout closes the connection: the last receive plus the idle
    /// timeout (pings are due `ping_interval` after the last receive: see
    /// [`Session::ping_due_ms`]).
    idle_deadline_ms: u64,
    /// permessage-deflate, when agreed (boxed: most connections have none, and an
    /// idle connection's size matters).
    pmd: Option<Box<ConnDeflate>>,
    /// Output, closing and partial receive state; `None` while there is none (see
    /// [`Tx`]).
    tx: Option<Box<Tx>>,
}

/// What a connection holds while it sends, closes, waits for a pong or has received
/// part of a frame. Allocated at the accept (for the upgrade request) or by the first
/// thing to send, and dropped once nothing is left in it and the connection
/// has been quiet for [`TX_QUIET_MS`] (at once after a handshake's response, when no
/// frame has been exchanged yet): an idle connection holds none, and one that
/// converses keeps its buffers from message to message instead of allocating them
/// for each.
#[derive(Default)]
struct Tx {
    /// The upgrade request while it arrives, then a frame that continues in the next
    /// receive or a fragmented message in progress; `None` between whole frames (the
    /// common case: a frame that lies whole in one receive is decoded with a decoder on
    /// the stack). Here rather than in the session so that an idle connection holds
    /// one pointer for both.
    partial: Option<Box<Partial>>,
    /// Frames encoded and not yet handed to the shard, from `out_start` on.
    out: Vec<u8>,
    /// Output queued before `out`, in order: when `out` is full, it goes here and a
    /// new buffer is started rather than `out` grown (see [`Tx::room`]).
    chunks: Vec<Vec<u8>>,
    /// The allocation of the last completed send, reused for the next.
    spare: Vec<u8>,
    /// Receive state no longer needed (the frame that crossed receives is done), kept
    /// for the next frame that does, with its pending buffer's allocation: a
    /// conversing connection then allocates nothing per message even when frames
    /// straddle receive buffers (which incremental buffers do once per 64 KiB).
    spare_partial: Option<Box<Partial>>,
    /// Bytes handed to the shard and not yet sent.
    in_flight: usize,
    /// When output was last handed to the shard (the quiet period counts from there).
    active_ms: u64,
    pong_deadline_ms: Option<NonZeroU64>,
    closing: Closing,
    /// Where the output starts in the first buffer queued (`out`, or the first of
    /// `chunks` if there are any): not 0 only when that is a received frame's buffer
    /// whose payload is echoed in place (the bytes before are the rest of the client's
    /// header).
    out_start: u8,
}

/// How long a connection stays quiet before its output buffers are given back.
pub const TX_QUIET_MS: u64 = 1_000;

impl Tx {
    /// Nothing queued, nothing in flight, no closing handshake or ping under way: the
    /// box can go (what it holds is only an allocation to reuse).
    fn is_empty(&self) -> bool {
        self.nothing_queued()
            && self.partial.is_none()
            && self.in_flight == 0
            && self.pong_deadline_ms.is_none()
            && self.closing.is_open()
    }
}

impl Tx {
    /// No output waits to be handed to the shard.
    fn nothing_queued(&self) -> bool {
        self.out.len() == usize::from(self.out_start) && self.chunks.is_empty()
    }

    /// Bytes waiting to be handed to the shard.
    fn queued(&self) -> usize {
        let chunks: usize = self.chunks.iter().map(Vec::len).sum();
        chunks + self.out.len() - usize::from(self.out_start)
    }

    /// Keeps a buffer that came back (a completed send, or an output replaced by an
    /// echo in place) for reuse: as the spare output buffer if it is the larger, else
    /// as the pending buffer of the spare receive state; large ones are given back.
    fn recycle(&mut self, mut buf: Vec<u8>) {
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
    fn discard_queued(&mut self) {
        self.out = Vec::new();
        self.out_start = 0;
        self.chunks = Vec::new();
    }

    /// The output buffer, with room for `n` more bytes. When `out` holds at least
    /// [`CHUNK_MIN`] bytes and `n` more do not fit, it is queued as a chunk and a new
    /// buffer of at least [`CHUNK`] bytes started: growing it would copy all it holds
    /// each time its capacity doubles, and large output piles up behind a send in
    /// flight. The chunks go out in one `sendmsg` (see [`Output`]).
    fn room(&mut self, n: usize) -> &mut Vec<u8> {
        let out = &self.out;
        // A received frame's buffer echoed in place is as small as that frame: what
        // follows it goes into a buffer of its own too.
        if out.len() + n > out.capacity() && (out.len() >= CHUNK_MIN || self.out_start > 0) {
            let next = if self.spare.capacity() >= n && out.len() < CHUNK_MIN {
                std::mem::take(&mut self.spare)
            } else {
                Vec::with_capacity(n.max(CHUNK))
            };
            let full = std::mem::replace(&mut self.out, next);
            self.chunks.push(full);
        }
        &mut self.out
    }
}

/// Output at least this long is queued as a chunk rather than grown ([`Tx::room`]).
const CHUNK_MIN: usize = 16 * 1024;
/// The least capacity of an output chunk started by [`Tx::room`].
const CHUNK: usize = 64 * 1024;

/// The largest send buffer a connection keeps from one send to the next (larger ones,
/// after a burst, are given back, so that a burst does not stay resident).
const SPARE_MAX: usize = 64 * 1024;

/// Bytes for the shard to send, from [`Session::take_output`]: `first[start..]`, then
/// each of `rest` whole (output that did not fit one buffer, sent with one
/// `sendmsg`). Give it back with [`Session::sent`] once sent.
#[derive(Debug, Default)]
pub struct Output {
    /// The first buffer.
    pub first: Vec<u8>,
    /// Where the bytes to send start in `first` (before it: the rest of a client's
    /// frame header, when a received frame is echoed in place).
    pub start: usize,
    /// The buffers after the first, in order.
    pub rest: Vec<Vec<u8>>,
}

impl Output {
    /// The number of bytes to send.
    pub fn len(&self) -> usize {
        let rest: usize = self.rest.iter().map(Vec::len).sum();
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
            all.extend_from_slice(chunk);
        }
        all
    }
}

/// The connection's `Tx`, allocated if it has none.
fn tx(slot: &mut Option<Box<Tx>>) -> &mut Tx {
    slot.get_or_insert_with(Box::default)
}

/// Receive state that outlives one receive.
struct Partial {
    /// Its reassembler holds the fragments of a message in progress.
    decoder: Decoder,
    /// The start of a frame whose rest has not arrived yet. Once the frame's header is
    /// whole in it, the payload bytes in it are unmasked already (and unmasked as they
    /// are appended). During the handshake: the request so far.
    pending: Vec<u8>,
    /// Only during the handshake.
    handshake: Option<Handshaking>,
    /// A text frame (or a continuation of a text message) whose payload is arriving:
    /// its UTF-8 so far, and how far into `pending` it was checked. A frame with
    /// invalid text is failed (1007) as soon as the bad byte arrives, not when the
    /// frame is whole.
    text: Option<(ChunkedUtf8, usize)>,
}

impl Partial {
    /// Whether it still holds anything (else it is dropped).
    fn holds_something(&mut self) -> bool {
        !self.pending.is_empty() || self.decoder.assembler_mut().in_progress()
    }
}

/// The frame at the start of a buffer, when its header is whole.
#[derive(Debug, Clone, Copy)]
struct StartedFrame {
    mask: [u8; 4],
    /// Where the payload starts (the header's length).
    payload_start: usize,
    /// Where the frame ends.
    end: usize,
}

/// The header of the frame that starts `bytes`, if it is whole and masked (the decoder
/// has checked it already, or will when the frame is complete).
fn started_frame(bytes: &[u8], cfg: &DecoderConfig) -> Option<StartedFrame> {
    match parse_header(bytes, cfg) {
        Ok(Decoded::Complete(h, _)) => Some(StartedFrame {
            mask: h.mask?,
            payload_start: h.header_len,
            end: usize::try_from(h.frame_len()).ok()?,
        }),
        _ => None,
    }
}

/// `buf` starts with a frame none of whose payload is unmasked yet: if its header is
/// whole, unmasks the part of the payload that is there.
fn unmask_started(buf: &mut [u8], cfg: &DecoderConfig) {
    if let Some(f) = started_frame(buf, cfg) {
        let to = buf.len().min(f.end);
        unmask(&mut buf[f.payload_start..to], f.mask, 0);
    }
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("finished", &self.finished)
            .field("terminated", &self.terminated)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A session for a socket just accepted.
    pub fn new(peer: Option<SocketAddr>, now_ms: u64, app: &App) -> Session {
        let mut session = Session {
            gear: u32::MAX,
            phase: Phase::Done,
            handshaking: true,
            abandoned: false,
            finished: false,
            terminated: false,
            idle_deadline_ms: u64::MAX,
            pmd: None,
            tx: None,
        };
        // The request arrives into the partial box's `pending`.
        let mut partial = session.new_partial(app);
        partial.handshake = Some(Handshaking {
            deadline_ms: now_ms + ms(app.limits().handshake_timeout),
            peer,
            awaiting: None,
        });
        session.put_partial(partial);
        session
    }

    fn take_partial(&mut self) -> Option<Box<Partial>> {
        self.tx.as_mut()?.partial.take()
    }

    fn put_partial(&mut self, partial: Box<Partial>) {
        tx(&mut self.tx).partial = Some(partial);
    }

    /// When the upgrade request must be whole, during the handshake.
    fn handshake_deadline_ms(&self) -> Option<u64> {
        let partial = self.tx.as_ref()?.partial.as_ref()?;
        let hs = partial.handshake.as_ref()?;
        Some(hs.deadline_ms)
    }

    /// Received bytes, borrowed from the receive buffer; frames are unmasked in place.
    pub fn on_recv(
        &mut self,
        id: ConnId,
        data: &mut [u8],
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) {
        if self.finished {
            return;
        }
        if self.handshaking {
            let Some(mut hs) = self.take_partial() else {
                return;
            };
            if hs.handshake.as_ref().is_some_and(|h| h.awaiting.is_some()) {
                // Frames before the 101: kept for when the names are decided.
                hs.pending.extend_from_slice(data);
                if hs.pending.len() > app.limits().max_head_bytes + EARLY_BYTES_MAX {
                    self.abandon_handshake(&mut hs, app);
                }
                self.put_partial(hs);
                return;
            }
            let rest = self.handshake(id, &mut hs, data, now_ms, app, regs);
            if self.handshaking {
                self.put_partial(hs); // the request is not whole yet
                return;
            }
            if let Some(mut rest) = rest.filter(|r| !r.is_empty()) {
                // Bytes after the request head are the client's first frames.
                self.feed(id, &mut rest, now_ms, app, regs);
            }
            return;
        }
        self.idle_deadline_ms = now_ms.saturating_add(ms(app.limits().idle_timeout));
        if let Some(c) = regs.counters(self.gear()) {
            c.bytes_in.add(data.len() as u64);
        }
        // A connection that keeps receiving keeps its buffers too (see `Tx`), even if
        // it sends nothing.
        if let Some(tx) = self.tx.as_deref_mut() {
            tx.active_ms = now_ms;
        }
        self.feed(id, data, now_ms, app, regs);
    }

    /// Decodes and acts on received frame bytes.
    fn feed(
        &mut self,
        id: ConnId,
        mut data: &mut [u8],
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) {
        loop {
            let Some(mut partial) = self.take_partial() else {
                self.feed_whole(id, data, now_ms, app, regs);
                return;
            };
            // A frame continues from an earlier receive: complete it in `pending`,
            // and go on with what follows it as with a fresh receive (so that the
            // pending buffer holds that one frame and can be echoed as it is, and
            // does not grow for the start of the next one).
            let Some(used) = append_pending(&mut partial, data) else {
                if !check_partial_text(&mut partial) {
                    self.fail(id, ProtocolError::InvalidUtf8, now_ms, app, regs);
                    return;
                }
                self.put_partial(partial);
                return;
            };
            self.process_pending(id, partial, now_ms, app, regs);
            let rest = std::mem::take(&mut data);
            data = &mut rest[used..];
            if data.is_empty() || self.finished {
                return;
            }
        }
    }

    /// Decodes the frames at the start of `data` with no receive state kept (a decoder
    /// on the stack), and boxes one only if something is left over: a frame that
    /// continues, or a fragmented message in progress.
    fn feed_whole(
        &mut self,
        id: ConnId,
        data: &mut [u8],
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) {
        let mut decoder = Decoder::new(self.decoder_config(app));
        let (used, needed, _) = process(
            &mut decoder,
            self,
            id,
            data,
            false,
            false,
            now_ms,
            app,
            regs,
        );
        if self.finished {
            return;
        }
        let leftover = used < data.len();
        if leftover || decoder.assembler_mut().in_progress() {
            let spare = self.tx.as_mut().and_then(|t| t.spare_partial.take());
            let mut partial = match spare {
                Some(mut p) => {
                    p.decoder = decoder;
                    p.pending.clear();
                    p
                }
                None => Box::new(Partial {
                    decoder,
                    pending: Vec::new(),
                    handshake: None,
                    text: None,
                }),
            };
            if leftover {
                // An incomplete frame: all of it goes to `pending`.
                reserve_frame(&mut partial.pending, needed, app);
                append_pending(&mut partial, &data[used..]);
                if !check_partial_text(&mut partial) {
                    self.fail(id, ProtocolError::InvalidUtf8, now_ms, app, regs);
                    return;
                }
            }
            self.put_partial(partial);
        }
    }

    /// Decodes what `pending` holds (its first frame is whole) and keeps `partial` if
    /// it still holds something.
    fn process_pending(
        &mut self,
        id: ConnId,
        mut partial: Box<Partial>,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) {
        let mut buf = std::mem::take(&mut partial.pending);
        partial.text = None;
        let unmasked = started_frame(&buf, partial.decoder.config()).is_some();
        let core = &mut *self;
        let (used, needed, echo) = process(
            &mut partial.decoder,
            core,
            id,
            &mut buf,
            unmasked,
            true,
            now_ms,
            app,
            regs,
        );
        let mut done_with = None;
        if let Some((op, len)) = echo {
            // The frame was the whole buffer and its payload is echoed as it is; the
            // output buffer it replaced becomes the next pending buffer.
            done_with = Some(core.echo_in_place(buf, op, len));
            core.check_outgoing(id, now_ms, app, regs);
        } else if used < buf.len() && !core.finished {
            if used > 0 {
                buf.drain(..used);
                unmask_started(&mut buf, partial.decoder.config());
            }
            reserve_frame(&mut buf, needed, app);
            partial.pending = buf;
        } else {
            done_with = Some(buf);
        }
        if core.finished {
            return;
        }
        if partial.holds_something() {
            self.put_partial(partial);
            return;
        }
        // Kept for the next frame that crosses receives (see `Tx::spare_partial`).
        if let Some(mut buf) = done_with.filter(|b| b.capacity() <= SPARE_MAX) {
            buf.clear();
            partial.pending = buf;
        }
        tx(&mut self.tx).spare_partial = Some(partial);
    }

    /// The peer is gone: `None` for EOF, `Some(errno)` for a socket error.
    pub fn on_peer_gone(
        &mut self,
        id: ConnId,
        errno: Option<i32>,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) {
        let reason = match errno {
            Some(e) => TerminateReason::Error(TerminateError::Io(e)),
            None => TerminateReason::Remote,
        };
        if self.handshaking {
            self.give_up_handshake(app);
        }
        self.terminate(id, reason, now_ms, app, regs);
        if let Some(tx) = &mut self.tx {
            tx.discard_queued();
        }
        self.finished = true;
    }

    /// Timers: handshake, idle, ping/pong and closing deadlines.
    pub fn on_tick(&mut self, id: ConnId, now_ms: u64, app: &App, regs: &mut Registries) {
        let handshake_deadline = self.handshake_deadline_ms();
        let core = &mut *self;
        if core.finished {
            return;
        }
        if core.handshaking {
            if handshake_deadline.is_none_or(|d| now_ms >= d) {
                core.give_up_handshake(app);
            }
            return;
        }
        if core
            .tx
            .as_mut()
            .is_some_and(|t| t.closing.poll_timeout(now_ms))
        {
            if !core.terminated {
                core.terminate(
                    id,
                    TerminateReason::Error(TerminateError::ClosingTimeout),
                    now_ms,
                    app,
                    regs,
                );
            }
            core.finished = true;
            return;
        }
        if !core.closing_open() {
            return;
        }
        if now_ms >= core.idle_deadline_ms {
            core.close(CloseCode::NORMAL, "idle timeout", now_ms, app, regs);
            core.terminate(id, TerminateReason::Timeout, now_ms, app, regs);
            return;
        }
        let pong_deadline = core.tx.as_ref().and_then(|t| t.pong_deadline_ms);
        if pong_deadline.is_some_and(|d| now_ms >= d.get()) {
            core.terminate(
                id,
                TerminateReason::Error(TerminateError::PongTimeout),
                now_ms,
                app,
                regs,
            );
            core.finished = true;
            return;
        }
        if core.ping_due_ms(app).is_some_and(|at| now_ms >= at) {
            let tx = tx(&mut core.tx);
            encode_frame_into(&mut tx.out, true, 0, OpCode::Ping, b"kythera", None);
            tx.pong_deadline_ms = deadline(now_ms + ms(app.limits().pong_timeout));
        }
        core.trim(now_ms);
    }

    /// The server drains: close 1001, terminate `Stop`.
    pub fn start_drain(&mut self, id: ConnId, now_ms: u64, app: &App, regs: &mut Registries) {
        let core = &mut *self;
        match core.phase {
            _ if core.handshaking => core.give_up_handshake(app),
            Phase::Open(_) if core.closing_open() => {
                core.close(CloseCode::GOING_AWAY, DRAIN_REASON, now_ms, app, regs);
                core.terminate(id, TerminateReason::Stop, now_ms, app, regs);
            }
            _ => {}
        }
    }

    /// A message from the registry or a connection handle: runs
    /// `handle_server_message`. `msg` is an `Option` of the gear's message type.
    /// Returns false if the connection no longer takes messages (closing or closed).
    pub fn on_server_message(
        &mut self,
        id: ConnId,
        msg: &mut dyn Any,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> bool {
        let core = &mut *self;
        core.accepts_frames()
            && core.run_callback(id, now_ms, app, regs, |live, gear, id, sink, regs| {
                live.server_message(gear, id, msg, sink, regs)
            })
    }

    /// Frame bytes of a `publish_frame`, encoded once for every member: appended to
    /// the output as they are. Returns false if the connection no longer takes frames.
    pub fn on_published_frame(
        &mut self,
        id: ConnId,
        frame: &SharedFrame,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> bool {
        let core = &mut *self;
        if !core.accepts_frames() {
            return false;
        }
        if let Phase::Open(live) = &mut core.phase {
            live.meta().frames_out += 1;
        }
        let payload = frame.payload();
        let out = tx(&mut core.tx).room(frame.encoded.len());
        let before = out.len();
        match core.pmd.as_deref_mut() {
            Some(pmd) if pmd.compresses(payload.len()) => {
                let op = match frame.frame {
                    Frame::Binary(_) => OpCode::Binary,
                    _ => OpCode::Text,
                };
                // Compressed once for every member that would compress it the same way;
                // with context takeover (or other parameters) for this member alone.
                let shared = pmd.shared_key().and_then(|key| {
                    frame.compressed(key, || {
                        let mut wire = Vec::new();
                        pmd.encode_frame(&mut wire, op, payload, None);
                        wire.into()
                    })
                });
                match shared {
                    Some(bytes) => out.extend_from_slice(bytes),
                    None => pmd.encode_frame(out, op, payload, None),
                }
            }
            _ => out.extend_from_slice(&frame.encoded),
        }
        let bytes = (out.len() - before) as u64;
        if let Some(c) = regs.counters(core.gear()) {
            c.frames_out.add(1);
            c.bytes_out.add(bytes);
        }
        core.check_outgoing(id, now_ms, app, regs);
        true
    }

    /// The connection lost `name` to a connection on another node: close 3409,
    /// terminate with [`TerminateError::NameConflict`]. Returns false if the connection
    /// was closing or closed already.
    pub fn on_name_lost(
        &mut self,
        id: ConnId,
        name: &str,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> bool {
        if !self.accepts_frames() {
            return false;
        }
        let reason = format!("name {name:?} is held by a connection on another node");
        self.close(CloseCode::NAME_CONFLICT, &reason, now_ms, app, regs);
        self.terminate(
            id,
            TerminateReason::Error(TerminateError::NameConflict(name.to_owned())),
            now_ms,
            app,
            regs,
        );
        true
    }

    /// A `publish_frame` of a close: the connection closes as if its gear had sent it.
    pub fn on_published_close(
        &mut self,
        id: ConnId,
        close: Option<handler_api::CloseFrame>,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> bool {
        let core = &mut *self;
        if !core.accepts_frames() {
            return false;
        }
        let mut sink = OutSink::new(&mut core.tx, core.pmd.as_deref_mut());
        sink.send_frame(handler_api::Frame::Close(close));
        let outcome = sink.finish();
        core.after_callback(id, outcome, now_ms, app, regs);
        true
    }

    /// The shard stops with this session still open (the end of a drain): `terminate`
    /// runs with `Stop`, with the registry at hand so that names and groups are freed.
    pub fn shut_down(&mut self, id: ConnId, now_ms: u64, app: &App, regs: &mut Registries) {
        if self.handshaking {
            self.give_up_handshake(app);
        }
        self.terminate(id, TerminateReason::Stop, now_ms, app, regs);
        self.finished = true;
    }

    /// The earliest of the deadlines that the shard's sweep looks after: the
    /// handshake's, the idle timeout, the next ping, the pong awaited, and the return
    /// of the output buffers once quiet. Every open connection has one, so keeping a
    /// timer entry for each would cost memory per idle connection; they are coarse
    /// (a second late is fine), so the shard looks at every connection once per sweep
    /// instead and calls [`Session::on_tick`] when this has passed.
    pub fn swept_deadline_ms(&self, app: &App) -> Option<u64> {
        let core = self;
        if core.finished {
            return None;
        }
        if core.handshaking {
            return self.handshake_deadline_ms();
        }
        if !core.closing_open() {
            return None;
        }
        let tx = core.tx.as_deref();
        [
            Some(core.idle_deadline_ms),
            core.ping_due_ms(app),
            tx.and_then(|t| t.pong_deadline_ms).map(NonZeroU64::get),
            // Give the output buffers back once quiet.
            tx.filter(|t| t.is_empty())
                .map(|t| t.active_ms.saturating_add(TX_QUIET_MS)),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The deadline that needs a timer's precision, if any: the end of the wait for
    /// the peer's close. Call [`Session::on_tick`] once it has passed.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        if self.finished {
            return None;
        }
        self.tx.as_ref()?.closing.deadline_ms()
    }

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
            // `start` is where the first chunk's bytes start.
            let mut rest = std::mem::take(&mut tx.chunks);
            let first = rest.remove(0);
            rest.push(last);
            Output { first, start, rest }
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
                tx.recycle(chunk);
            }
            // The list's own allocation too.
            if tx.chunks.capacity() == 0 {
                tx.chunks = rest;
            }
        }
    }

    /// Whether the socket should be closed once the output is flushed.
    pub fn should_close(&self) -> bool {
        self.finished
    }

    /// Whether `terminate` has run (or the connection never reached `init`).
    pub fn is_terminated(&self) -> bool {
        self.terminated || matches!(self.phase, Phase::Done)
    }

    /// Bytes queued and in flight towards the client.
    pub fn queued_bytes(&self) -> usize {
        self.queued() + self.tx.as_ref().map_or(0, |t| t.in_flight)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // The session does not hold its id (the shard derives it from the slot and its
        // generation), so it cannot run a terminate still owed here: the shard runs it
        // ([`Session::shut_down`]) before it drops a session. Catch a path that does
        // not in the tests.
        debug_assert!(
            std::thread::panicking() || self.is_terminated(),
            "session dropped with its gear running"
        );
    }
}

impl Session {
    /// Feeds the upgrade request; on success returns the bytes after its head.
    fn handshake(
        &mut self,
        id: ConnId,
        hs: &mut Partial,
        data: &[u8],
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> Option<Vec<u8>> {
        hs.pending.extend_from_slice(data);
        let peer = hs.handshake.as_ref().and_then(|h| h.peer);
        let head = &hs.pending;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let req = match parse_request(head, &mut headers, app.limits().max_head_bytes) {
            Ok(Some(req)) => req,
            Ok(None) => return None,
            Err(rej) => return self.reject(rej, regs),
        };
        if !is_upgrade(&req)
            && let Some(answer) = app.http_answer(req.method, req.path)
        {
            let headers = [
                ("content-type", answer.content_type),
                ("cache-control", "no-store"),
            ];
            write_response(
                &mut tx(&mut self.tx).out,
                answer.status,
                headers,
                &answer.body,
            );
            return self.end_handshake();
        }
        let Some(routed) = app.route(req.path) else {
            return self.reject(Rejection::NotFound, regs);
        };
        self.gear = routed.gear as u32;
        let up = match validate_upgrade(&req) {
            Ok(up) => up,
            Err(rej) => return self.reject(rej, regs),
        };
        if !app.origin_allowed(routed.gear, req.header("origin"), req.header("host")) {
            return self.reject(Rejection::ForbiddenOrigin, regs);
        }
        let deflate = negotiate(
            req.header_all("sec-websocket-extensions"),
            &app.limits().deflate,
        );
        if app.is_draining() {
            return self.reject(Rejection::Draining, regs);
        }
        let Some(admission) = app.admit(routed.gear) else {
            return self.reject(Rejection::TooManyConnections, regs);
        };
        let parts = RequestParts {
            method: req.method.to_owned(),
            path: req.path.to_owned(),
            query: req.query.to_owned(),
            path_params: routed.params,
            headers: req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect(),
            peer,
        };
        let key = up.key.to_owned();
        let head_len = req.head_len;
        let mut conn = match app.names(routed.gear) {
            Some(names) => Conn::with_names(id, parts, names),
            None => Conn::new(id, parts),
        };
        let gear = routed.gear;
        match catch_unwind(AssertUnwindSafe(|| app.connect(gear, &mut conn))) {
            Ok(Ok(())) => {}
            Ok(Err(resp)) => {
                release_names(&mut conn, app, gear);
                if let Some(c) = regs.counters(Some(gear)) {
                    c.rejected(resp.status());
                }
                let headers = resp.headers().iter().map(|(k, v)| (k.as_str(), v.as_str()));
                let out = &mut tx(&mut self.tx).out;
                write_response(out, resp.status(), headers, resp.body_bytes());
                return self.end_handshake();
            }
            Err(panic) => {
                release_names(&mut conn, app, gear);
                warn!(conn = %id, gear = app.pattern(gear), panic = panic_message(&panic), "connect panicked");
                write_response(&mut tx(&mut self.tx).out, 500, [], b"internal error");
                return self.end_handshake();
            }
        }
        let waiting = AwaitingNames {
            conn,
            key,
            deflate,
            admission,
            gear,
            head_len,
        };
        if regs.await_names(gear, id, waiting.conn.registered()) {
            if let Some(h) = hs.handshake.as_mut() {
                h.awaiting = Some(Box::new(waiting));
            }
            return None; // still handshaking: Redis decides the names
        }
        self.open(id, waiting, peer, now_ms, app, regs)
            .then(|| hs.pending[head_len..].to_vec())
    }

    /// Redis decided the names `connect` claimed (`lost`: one it lost): the handshake
    /// is answered with the 101 and `init` runs, or with 409. Returns false if the
    /// session was not waiting.
    pub fn on_names_decided(
        &mut self,
        id: ConnId,
        lost: Option<&str>,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> bool {
        if self.finished || !self.handshaking {
            return false;
        }
        let Some(mut hs) = self.take_partial() else {
            return false;
        };
        let Some(h) = hs.handshake.as_mut() else {
            self.put_partial(hs);
            return false;
        };
        let (peer, Some(waiting)) = (h.peer, h.awaiting.take()) else {
            self.put_partial(hs);
            return false;
        };
        let head_len = waiting.head_len;
        match lost {
            None => {
                if self.open(id, *waiting, peer, now_ms, app, regs) && hs.pending.len() > head_len {
                    let mut rest = hs.pending.split_off(head_len);
                    self.feed(id, &mut rest, now_ms, app, regs);
                }
            }
            Some(name) => {
                let AwaitingNames { mut conn, gear, .. } = *waiting;
                release_names(&mut conn, app, gear);
                if let Some(c) = regs.counters(Some(gear)) {
                    c.rejected(409);
                }
                let body = format!("name \"{name}\" is already taken");
                let headers = [("content-type", "text/plain; charset=utf-8")];
                write_response(&mut tx(&mut self.tx).out, 409, headers, body.as_bytes());
                self.end_handshake();
            }
        }
        true
    }

    /// Ends the handshake without an answer (timeout, peer gone, drain, shutdown).
    fn give_up_handshake(&mut self, app: &App) {
        match self.take_partial() {
            Some(mut hs) => {
                self.abandon_handshake(&mut hs, app);
                self.put_partial(hs);
            }
            None => self.finished = true,
        }
    }

    /// Gives up a handshake (timeout, peer gone, drain, too many early bytes): the
    /// names it claimed are given back.
    fn abandon_handshake(&mut self, hs: &mut Partial, app: &App) {
        if let Some(w) = hs.handshake.as_mut().and_then(|h| h.awaiting.take()) {
            let AwaitingNames { mut conn, gear, .. } = *w;
            release_names(&mut conn, app, gear);
        }
        self.finished = true;
    }

    /// Answers an accepted handshake with the 101 and runs `init`. Returns false if
    /// `init` panicked (the connection is closing with 1011).
    fn open(
        &mut self,
        id: ConnId,
        waiting: AwaitingNames,
        peer: Option<SocketAddr>,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> bool {
        let AwaitingNames {
            mut conn,
            key,
            deflate,
            admission,
            gear,
            ..
        } = waiting;
        let headers = conn
            .response_headers()
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()));
        let extensions = deflate.map(|agreed| agreed.response());
        write_switching_protocols(
            &mut tx(&mut self.tx).out,
            &key,
            conn.subprotocol(),
            extensions.as_deref(),
            headers,
        );
        self.pmd = deflate.map(|agreed| Box::new(ConnDeflate::new(agreed, &app.limits().deflate)));
        self.idle_deadline_ms = now_ms.saturating_add(ms(app.limits().idle_timeout));
        self.handshaking = false;
        self.phase = Phase::Done;
        let mut sink = OutSink::new(&mut self.tx, self.pmd.as_deref_mut());
        let init = catch_unwind(AssertUnwindSafe(|| {
            app.init(
                gear,
                &mut conn,
                &mut sink,
                Meta::new(peer, now_ms),
                admission,
                regs,
            )
        }));
        let outcome = sink.finish();
        match init {
            Ok(mut live) => {
                live.meta().frames_out += outcome.frames;
                if let Some(c) = regs.counters(Some(gear)) {
                    c.opened.add(1);
                    c.frames_out.add(outcome.frames);
                    c.bytes_out.add(outcome.bytes);
                }
                info!(conn = %id, gear = app.pattern(gear), peer = ?peer, "CONNECTED");
                self.phase = Phase::Open(live);
                self.after_callback(id, outcome, now_ms, app, regs);
                true
            }
            Err(panic) => {
                // No state was built, so there is nothing to terminate; what the
                // connection took in the registry is given back.
                release_names(&mut conn, app, gear);
                regs.remove_conn(gear, id);
                warn!(conn = %id, gear = app.pattern(gear), panic = panic_message(&panic), "init panicked");
                self.send_close(Some(CloseCode::INTERNAL_ERROR), "", regs);
                self.finished = true;
                false
            }
        }
    }

    fn reject(&mut self, rej: Rejection, regs: &mut Registries) -> Option<Vec<u8>> {
        if let Some(c) = regs.counters(self.gear()) {
            c.rejected(rej.status());
        }
        rej.write_response(&mut tx(&mut self.tx).out);
        self.end_handshake()
    }

    fn end_handshake(&mut self) -> Option<Vec<u8>> {
        self.handshaking = false;
        self.phase = Phase::Done;
        self.finished = true;
        None
    }

    /// Acts on one frame's event. `in_place`: the frame is all of a buffer that ends
    /// there and that the session may give away; if the gear's first send is this
    /// message's payload as it is, with nothing queued before it, that echo is not
    /// copied but returned (opcode, length), for the caller to queue it in place
    /// ([`Session::echo_in_place`]).
    fn on_event(
        &mut self,
        id: ConnId,
        event: Event<'_>,
        in_place: Option<*const u8>,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> Option<(OpCode, usize)> {
        match event {
            Event::Message(msg) => {
                if !self.closing_open() {
                    return None; // after our close, data is read and dropped
                }
                let counters = regs.counters(self.gear());
                if let Some(c) = counters {
                    c.frames_in.add(1);
                }
                let Phase::Open(live) = &mut self.phase else {
                    return None;
                };
                live.meta().frames_in += 1;
                let gear_index = self.gear as usize;
                let payload = match msg {
                    handler_api::Message::Text(t) => t.as_bytes(),
                    handler_api::Message::Binary(b) => b,
                };
                let compressing = self.pmd.is_some();
                let mut sink = OutSink::new(&mut self.tx, self.pmd.as_deref_mut());
                // Only a payload that ends the buffer lies in it (a reassembled one
                // lies in the assembler's buffer). With compression agreed, echoes are
                // compressed, not sent in place.
                if !compressing && in_place.is_some_and(|end| payload.as_ptr_range().end == end) {
                    sink.echo_candidate = Some(payload);
                }
                let result = catch_unwind(AssertUnwindSafe(|| {
                    live.client_message(gear_index, id, msg, &mut sink, regs)
                }));
                let mut outcome = sink.finish();
                live.meta().frames_out += outcome.frames;
                if let Some(c) = regs.counters(self.gear()) {
                    c.frames_out.add(outcome.frames);
                    c.bytes_out.add(outcome.bytes);
                }
                if let Err(panic) = result {
                    outcome.panic = Some(panic_message(&panic));
                }
                let mut echo = outcome.echo.take();
                if let Some(op) = echo
                    && (outcome.panic.is_some() || outcome.gear_error.is_some() || outcome.closed)
                {
                    // Nothing was queued after the echo (a later send would have
                    // queued it first): queue it now, before what the outcome adds.
                    let out = &mut tx(&mut self.tx).out;
                    encode_frame_into(out, true, 0, op, payload, None);
                    echo = None;
                }
                self.after_callback(id, outcome, now_ms, app, regs);
                return echo.map(|op| (op, payload.len()));
            }
            // Inflated by `on_compressed` first, which hands the message on.
            Event::Fragment | Event::Compressed { .. } => {}
            Event::Ping(payload) => {
                if self.closing_open() {
                    let out = &mut tx(&mut self.tx).out;
                    encode_frame_into(out, true, 0, OpCode::Pong, payload, None);
                    self.check_outgoing(id, now_ms, app, regs);
                }
            }
            Event::Pong(_) => {
                if let Some(tx) = &mut self.tx {
                    tx.pong_deadline_ms = None;
                }
            }
            Event::Close(close) => {
                if let Some(c) = regs.counters(self.gear()) {
                    c.close_received(close.code.map(CloseCode::get));
                }
                match tx(&mut self.tx).closing.peer_close(close.code) {
                    PeerCloseAction::Reply(code) => {
                        self.send_close(code, "", regs);
                        self.terminate(
                            id,
                            TerminateReason::RemoteClose {
                                code: close.code,
                                reason: close.reason.to_owned(),
                            },
                            now_ms,
                            app,
                            regs,
                        );
                    }
                    PeerCloseAction::Finished => {}
                }
                self.finished = true;
            }
        }
        None
    }

    /// Queues the echo that [`Session::on_event`] returned: `buf` is the frame that was
    /// echoed, its payload the last `len` bytes. The server's header goes in front of
    /// the payload (the client's header is 4 bytes longer: it carries the mask), and
    /// `buf` becomes the output. The caller checks the output limit.
    fn echo_in_place(&mut self, mut buf: Vec<u8>, op: OpCode, len: usize) -> Vec<u8> {
        let payload_start = buf.len() - len;
        let header = encode_header(true, 0, op, len as u64, None);
        let header = header.as_bytes();
        let start = payload_start
            .checked_sub(header.len())
            .and_then(|s| u8::try_from(s).ok());
        let tx = tx(&mut self.tx);
        match start {
            Some(start) if tx.out.is_empty() && tx.chunks.is_empty() => {
                buf[usize::from(start)..payload_start].copy_from_slice(header);
                tx.out_start = start;
                std::mem::replace(&mut tx.out, buf)
            }
            // Not reached (nothing is queued after a deferred echo, and a client's
            // header is longer than ours), but correct: copy.
            _ => {
                encode_frame_into(&mut tx.out, true, 0, op, &buf[payload_start..], None);
                buf
            }
        }
    }

    /// How this connection's frames are decoded: the server's side, the message limit,
    /// RSV1 once permessage-deflate is agreed.
    fn decoder_config(&self, app: &App) -> DecoderConfig {
        DecoderConfig {
            role: Role::Server,
            max_message_bytes: app.limits().max_message_bytes,
            allowed_rsv: if self.pmd.is_some() { RSV1 } else { 0 },
        }
    }

    /// Empty receive state, for a frame that continues in the next receive.
    fn new_partial(&self, app: &App) -> Box<Partial> {
        Box::new(Partial {
            decoder: Decoder::new(self.decoder_config(app)),
            pending: Vec::new(),
            handshake: None,
            text: None,
        })
    }

    /// Bytes queued and not handed to the shard yet.
    fn queued(&self) -> usize {
        self.tx.as_ref().map_or(0, |t| t.queued())
    }

    /// When to ping, with pings on and no pong awaited: `ping_interval` after the last
    /// receive. A connection that keeps sending is known to be there and is not
    /// pinged; a quiet one is pinged once per interval (a pong counts as a receive).
    fn ping_due_ms(&self, app: &App) -> Option<u64> {
        let every = app.limits().ping_interval?;
        if self
            .tx
            .as_ref()
            .is_some_and(|t| t.pong_deadline_ms.is_some())
        {
            return None;
        }
        let last_receive = self
            .idle_deadline_ms
            .saturating_sub(ms(app.limits().idle_timeout));
        Some(last_receive.saturating_add(ms(every)))
    }

    /// Whether no close has been sent or received: data still flows both ways.
    fn closing_open(&self) -> bool {
        self.tx.as_ref().is_none_or(|t| t.closing.is_open())
    }

    /// Starts the closing handshake from our side; false if a close was sent already.
    fn local_close(&mut self, now_ms: u64, app: &App) -> bool {
        tx(&mut self.tx)
            .closing
            .local_close(now_ms, ms(app.limits().closing_timeout))
    }

    /// Gives the output buffers back if the connection has been quiet long enough.
    fn trim(&mut self, now_ms: u64) {
        if self
            .tx
            .as_ref()
            .is_some_and(|t| t.is_empty() && now_ms >= t.active_ms.saturating_add(TX_QUIET_MS))
        {
            self.tx = None;
        }
    }

    /// The routed gear, if any.
    fn gear(&self) -> Option<usize> {
        (self.gear != u32::MAX).then_some(self.gear as usize)
    }

    /// Whether the gear is running and no close has been sent: the connection takes
    /// server messages and published frames.
    fn accepts_frames(&self) -> bool {
        !self.finished && self.closing_open() && matches!(self.phase, Phase::Open(_))
    }

    /// Runs one gear callback on an open connection: its frames go to the output, a
    /// panic is caught, and what it left behind is acted on. False if the gear is not
    /// running.
    fn run_callback(
        &mut self,
        id: ConnId,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
        call: impl FnOnce(&mut dyn LiveConn, usize, ConnId, &mut dyn FrameSink, &mut Registries),
    ) -> bool {
        let Phase::Open(live) = &mut self.phase else {
            return false;
        };
        let gear = self.gear as usize;
        let mut sink = OutSink::new(&mut self.tx, self.pmd.as_deref_mut());
        let result = catch_unwind(AssertUnwindSafe(|| {
            call(&mut **live, gear, id, &mut sink, regs)
        }));
        let mut outcome = sink.finish();
        live.meta().frames_out += outcome.frames;
        if let Some(c) = regs.counters(self.gear()) {
            c.frames_out.add(outcome.frames);
            c.bytes_out.add(outcome.bytes);
        }
        if let Err(panic) = result {
            outcome.panic = Some(panic_message(&panic));
        }
        self.after_callback(id, outcome, now_ms, app, regs);
        true
    }

    /// What a callback left behind: a close, a gear bug, a panic, too much output.
    fn after_callback(
        &mut self,
        id: ConnId,
        outcome: SinkOutcome,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) {
        if let Some(msg) = outcome.panic {
            warn!(conn = %id, panic = %msg, "handler panicked; closing with 1011");
            self.close(CloseCode::INTERNAL_ERROR, "", now_ms, app, regs);
            self.terminate(
                id,
                TerminateReason::Error(TerminateError::HandlerPanic(msg)),
                now_ms,
                app,
                regs,
            );
            return;
        }
        if let Some(err) = outcome.gear_error {
            warn!(conn = %id, error = %err, "gear error; closing");
            // The context already queued the close frame (1011).
            self.local_close(now_ms, app);
            self.terminate(id, TerminateReason::Error(err), now_ms, app, regs);
            return;
        }
        if outcome.closed {
            if let Some(c) = regs.counters(self.gear()) {
                c.close_sent(outcome.close_code);
            }
            self.local_close(now_ms, app);
            self.terminate(id, TerminateReason::Stop, now_ms, app, regs);
            return;
        }
        self.check_outgoing(id, now_ms, app, regs);
    }

    /// The slow-consumer limit: a client that stops reading is closed with 1008 and
    /// what was queued for it is freed. Only bytes waiting behind a send still in
    /// flight count: output the kernel can take at once (one large echo, say) is not a
    /// sign of a client that stopped reading.
    fn check_outgoing(&mut self, id: ConnId, now_ms: u64, app: &App, regs: &mut Registries) {
        let in_flight = self.tx.as_ref().map_or(0, |t| t.in_flight);
        if in_flight == 0 || self.queued() <= app.limits().max_outgoing_bytes {
            return;
        }
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

    /// A protocol error: close with its code and close the socket without waiting for
    /// the peer's answer (RFC 6455 section 7.1.7, failing the connection).
    /// A compressed message: inflated (at most the message size limit) into a scratch
    /// buffer of the shard's, checked for UTF-8 if text, and handed on as a message.
    fn on_compressed(
        &mut self,
        id: ConnId,
        binary: bool,
        payload: &[u8],
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) {
        if !self.closing_open() {
            return; // after our close, data is read and dropped (not inflated)
        }
        let limit = usize::try_from(app.limits().max_message_bytes).unwrap_or(usize::MAX);
        with_scratch(|inflated| {
            let result = match self.pmd.as_mut() {
                Some(pmd) => pmd.inflate(payload, inflated, limit),
                // RSV1 is refused by the decoder unless the extension was agreed.
                None => Err(ProtocolError::ReservedBits),
            };
            let msg = match result {
                Ok(()) if binary => Message::Binary(inflated),
                Ok(()) => match simdutf8::basic::from_utf8(inflated) {
                    Ok(text) => Message::Text(text),
                    Err(_) => return self.fail(id, ProtocolError::InvalidUtf8, now_ms, app, regs),
                },
                Err(e) => return self.fail(id, e, now_ms, app, regs),
            };
            self.on_event(id, Event::Message(msg), None, now_ms, app, regs);
        });
    }

    fn fail(
        &mut self,
        id: ConnId,
        e: ProtocolError,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) {
        if self.local_close(now_ms, app) {
            self.send_close(Some(e.close_code()), e.as_str(), regs);
        }
        self.terminate(
            id,
            TerminateReason::Error(e.to_terminate_error()),
            now_ms,
            app,
            regs,
        );
        self.finished = true;
    }

    /// Starts the closing handshake from our side.
    fn close(&mut self, code: CloseCode, reason: &str, now_ms: u64, app: &App, regs: &Registries) {
        if self.local_close(now_ms, app) {
            self.send_close(Some(code), reason, regs);
        }
    }

    fn send_close(&mut self, code: Option<CloseCode>, reason: &str, regs: &Registries) {
        if let Some(c) = regs.counters(self.gear()) {
            c.close_sent(code.map(CloseCode::get));
        }
        let mut payload = [0u8; 125];
        let n = encode_close_payload(code, reason, &mut payload);
        let out = &mut tx(&mut self.tx).out;
        encode_frame_into(out, true, 0, OpCode::Close, &payload[..n], None);
    }

    /// Calls the gear's `terminate` once and logs the DISCONNECTED line.
    fn terminate(
        &mut self,
        id: ConnId,
        reason: TerminateReason,
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) {
        if self.terminated {
            return;
        }
        self.terminated = true;
        let Phase::Open(mut live) = std::mem::replace(&mut self.phase, Phase::Done) else {
            return;
        };
        let meta = live.meta();
        let gear = self.gear as usize;
        if let Some(c) = regs.counters(Some(gear)) {
            c.terminated.add(1);
        }
        info!(
            conn = %id,
            gear = app.pattern(gear),
            peer = ?meta.peer.get(),
            frames_in = meta.frames_in,
            frames_out = meta.frames_out,
            duration_ms = now_ms.saturating_sub(meta.opened.get()),
            reason = %reason,
            "DISCONNECTED"
        );
        let mut sink = Discard;
        if let Err(panic) = catch_unwind(AssertUnwindSafe(move || {
            live.terminate(gear, id, &reason, &mut sink, regs)
        })) {
            warn!(conn = %id, panic = panic_message(&panic), "terminate panicked");
        }
    }
}

/// Checks the UTF-8 of what arrived of the text frame in `pending` that is not whole
/// yet (a whole one is checked by the decoder); false once it cannot be valid.
fn check_partial_text(partial: &mut Partial) -> bool {
    let cfg = partial.decoder.config();
    let Some(f) = started_frame(&partial.pending, cfg) else {
        return true;
    };
    let upto = partial.pending.len().min(f.end);
    if upto >= f.end {
        return true;
    }
    if partial.text.is_none() {
        let first = partial.pending[0];
        // The first byte: FIN, RSV1-3 (RSV1 = 0x40), opcode.
        let compressed = (first >> 4) & RSV1 != 0;
        let v = match OpCode::from_bits(first & 0x0f).ok() {
            Some(OpCode::Text) if !compressed => ChunkedUtf8::default(),
            Some(OpCode::Continuation) => match partial.decoder.assembler_mut().text_tail() {
                Some(tail) => ChunkedUtf8::after(tail),
                None => return true,
            },
            _ => return true,
        };
        partial.text = Some((v, f.payload_start));
    }
    let Some((v, from)) = partial.text.as_mut() else {
        return true;
    };
    let ok = v.feed(&partial.pending[*from..upto]) != Utf8State::Invalid;
    *from = upto;
    ok
}

/// Appends received bytes to `pending`, unmasking those that belong to the payload of
/// its first frame as they are copied, up to the end of that frame if its header is
/// whole. Returns how many bytes of `data` it took once that frame may be whole (all of
/// `data` if the header was not whole: the decoder then decides), `None` while the
/// frame is not whole (all of `data` taken).
fn append_pending(partial: &mut Partial, data: &[u8]) -> Option<usize> {
    let cfg = partial.decoder.config();
    let pending = &mut partial.pending;
    let at = pending.len();
    let frame = if at == 0 {
        started_frame(data, cfg)
    } else {
        started_frame(pending, cfg)
    };
    let Some(f) = frame else {
        // The header was not whole before: unmask what is there if it is now.
        pending.extend_from_slice(data);
        unmask_started(pending, cfg);
        return Some(data.len());
    };
    // The header (when `pending` was empty), then the payload, unmasked as it is
    // copied; what follows the frame stays in `data`.
    let head = f.payload_start.saturating_sub(at).min(data.len());
    let (header, rest) = data.split_at(head);
    let body = f.end.saturating_sub(at + head).min(rest.len());
    pending.extend_from_slice(header);
    extend_unmasked(pending, &rest[..body], f.mask, at + head - f.payload_start);
    (pending.len() >= f.end).then_some(head + body)
}

/// Decodes and acts on every whole frame at the start of `buf`; returns how many bytes
/// were used, if a frame is incomplete how many bytes it needs from where it starts,
/// and, when `owned` (`buf` is `pending`, to be given away) and the gear echoed a frame
/// that was all of `buf` as it is, that echo's opcode and length (not queued yet: see
/// [`Session::echo_in_place`]). `first_unmasked`: the first frame's payload is unmasked
/// already.
#[allow(clippy::too_many_arguments)]
fn process(
    decoder: &mut Decoder,
    core: &mut Session,
    id: ConnId,
    buf: &mut [u8],
    first_unmasked: bool,
    owned: bool,
    now_ms: u64,
    app: &App,
    regs: &mut Registries,
) -> (usize, u64, Option<(OpCode, usize)>) {
    let mut start = 0;
    let mut needed = 0;
    let mut unmasked = first_unmasked;
    // Only ever set for the last frame of `buf`, which ends the loop.
    let mut echo = None;
    // Where `buf` ends: a message whose payload ends there, in a frame that starts the
    // buffer, can be echoed in place.
    let (len, end) = (buf.len(), buf.as_ptr_range().end);
    while start < len && !core.finished {
        let whole_buffer = owned && start == 0;
        match decoder.step_with(&mut buf[start..], std::mem::take(&mut unmasked)) {
            Ok(Step::Event(Event::Compressed { binary, payload }, used)) => {
                start += used;
                echo = None;
                core.on_compressed(id, binary, payload, now_ms, app, regs);
            }
            Ok(Step::Event(event, used)) => {
                start += used;
                let in_place = (whole_buffer && start == len).then_some(end);
                echo = core.on_event(id, event, in_place, now_ms, app, regs);
            }
            Ok(Step::NeedMore { needed: n }) => {
                needed = n;
                break;
            }
            Err(e) => {
                core.fail(id, e, now_ms, app, regs);
                break;
            }
        }
    }
    if !decoder.assembler_mut().in_progress() {
        decoder.assembler_mut().release();
    }
    (start, needed, echo)
}

/// Gives back the names `connect` or `init` registered, when the handshake fails.
/// Whether the request asks for a WebSocket upgrade at all (plain GETs of the metrics,
/// health and static paths do not).
fn is_upgrade(req: &crate::protocol::handshake::Request<'_>) -> bool {
    req.header("upgrade").is_some_and(|v| {
        v.split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"))
    })
}

fn release_names(conn: &mut Conn, app: &App, gear: usize) {
    let names = conn.take_registered();
    if let (Some(table), false) = (app.names(gear), names.is_empty()) {
        for name in names {
            let _ = table.unregister(conn.id(), &name);
        }
    }
}

/// Grows a pending-frame buffer once to the whole frame's size (`needed`, known from
/// its header) instead of doubling as the frame arrives; capped by the message limit.
fn reserve_frame(buf: &mut Vec<u8>, needed: u64, app: &App) {
    let cap = app
        .limits()
        .max_message_bytes
        .saturating_add(MAX_HEADER_BYTES as u64);
    let want = usize::try_from(needed.min(cap)).unwrap_or(usize::MAX);
    if buf.capacity() < want {
        buf.reserve_exact(want.saturating_sub(buf.len()));
    }
}

fn ms(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn panic_message(panic: &Box<dyn Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// What a callback did through its sink.
#[derive(Default)]
struct SinkOutcome {
    frames: u64,
    /// Bytes of the frames encoded.
    bytes: u64,
    closed: bool,
    /// The code of the gear's close frame (`None`: a close without a status).
    close_code: Option<u16>,
    /// The callback's first send echoed the incoming payload (the sink's
    /// `echo_candidate`) with this opcode, and nothing was sent after it: not queued.
    echo: Option<OpCode>,
    gear_error: Option<TerminateError>,
    panic: Option<String>,
}

/// Encodes a callback's frames straight into the connection's output (allocating its
/// `Tx` only if the callback sends something).
struct OutSink<'a, 'p> {
    tx: &'a mut Option<Box<Tx>>,
    /// permessage-deflate, when agreed: data frames from its threshold on are
    /// compressed.
    pmd: Option<&'a mut ConnDeflate>,
    outcome: SinkOutcome,
    /// The incoming payload, when an echo of it as the first frame queued may be left
    /// to the session to queue in place ([`Session::echo_in_place`]).
    echo_candidate: Option<&'p [u8]>,
}

impl<'a, 'p> OutSink<'a, 'p> {
    fn new(tx: &'a mut Option<Box<Tx>>, pmd: Option<&'a mut ConnDeflate>) -> Self {
        OutSink {
            tx,
            pmd,
            outcome: SinkOutcome::default(),
            echo_candidate: None,
        }
    }

    fn finish(self) -> SinkOutcome {
        self.outcome
    }

    fn out(&mut self) -> &mut Vec<u8> {
        &mut tx(self.tx).out
    }

    /// Queues the deferred echo, if any, before anything else is queued.
    #[cold]
    #[inline(never)]
    fn undefer(&mut self) {
        if let (Some(op), Some(payload)) = (self.outcome.echo.take(), self.echo_candidate) {
            encode_frame_into(self.out(), true, 0, op, payload, None);
        }
    }

    /// With an echo candidate: defers this frame if it is the first and echoes the
    /// candidate as it is (true), or else queues a deferred echo first (false).
    #[cold]
    #[inline(never)]
    fn defer_echo(&mut self, op: OpCode, payload: &[u8]) -> bool {
        if let Some(candidate) = self.echo_candidate
            && self.outcome.frames == 0
            && self.tx.as_ref().is_none_or(|t| t.nothing_queued())
            && payload.as_ptr() == candidate.as_ptr()
            && payload.len() == candidate.len()
        {
            self.outcome.echo = Some(op);
            self.outcome.frames += 1;
            let header = unmasked_header_len(payload.len() as u64);
            self.outcome.bytes += (payload.len() + header) as u64;
            return true;
        }
        self.undefer();
        false
    }

    fn data(&mut self, op: OpCode, payload: &[u8]) {
        if self.outcome.closed {
            return;
        }
        if self.echo_candidate.is_some() && self.defer_echo(op, payload) {
            return;
        }
        // The frame's length at most (a compressed one is shorter, or stored).
        let out = tx(self.tx).room(payload.len() + MAX_HEADER_BYTES);
        let before = out.len();
        match self.pmd.as_deref_mut() {
            Some(pmd) if pmd.compresses(payload.len()) => pmd.encode_frame(out, op, payload, None),
            _ => encode_frame_into(out, true, 0, op, payload, None),
        }
        self.outcome.frames += 1;
        self.outcome.bytes += (out.len() - before) as u64;
    }
}

impl FrameSink for OutSink<'_, '_> {
    fn send_copied(&mut self, kind: DataKind, payload: &[u8]) {
        let op = match kind {
            DataKind::Text => OpCode::Text,
            DataKind::Binary => OpCode::Binary,
        };
        self.data(op, payload);
    }

    fn send_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Text(t) => self.data(OpCode::Text, t.as_bytes()),
            Frame::Binary(b) => self.data(OpCode::Binary, &b),
            Frame::Close(close) => {
                if self.outcome.closed {
                    return;
                }
                if self.echo_candidate.is_some() {
                    self.undefer();
                }
                let mut payload = [0u8; 125];
                let n = match &close {
                    Some(c) => encode_close_payload(Some(c.code), c.reason.as_str(), &mut payload),
                    None => 0,
                };
                encode_frame_into(self.out(), true, 0, OpCode::Close, &payload[..n], None);
                self.outcome.frames += 1;
                self.outcome.bytes += 2 + n as u64;
                self.outcome.closed = true;
                self.outcome.close_code = close.as_ref().map(|c| c.code.get());
            }
        }
    }

    fn gear_error(&mut self, error: TerminateError) {
        self.outcome.gear_error = Some(error);
    }
}

/// The sink of `terminate`: the connection is closed, frames go nowhere.
struct Discard;

impl FrameSink for Discard {
    fn send_copied(&mut self, _: DataKind, _: &[u8]) {}
    fn send_frame(&mut self, _: Frame) {}
    fn gear_error(&mut self, _: TerminateError) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::protocol::codec::Decoded;
    use handler_api::{Context, Message, Response, Websocket};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    /// Echoes, and does what some messages ask: "close", "panic", "badcode", "flood".
    struct TestGear {
        terminated: Arc<Mutex<Vec<TerminateReason>>>,
    }

    impl Websocket for TestGear {
        type State = ();
        type Message = ();

        fn connect(&self, conn: &mut Conn) -> Result<(), Response> {
            if conn.query_param("reject").is_some() {
                return Err(Response::new(403).body("no"));
            }
            if conn.offered_subprotocols().any(|p| p == "v1") {
                conn.select_subprotocol("v1").unwrap();
            }
            Ok(())
        }

        fn init(&self, conn: &mut Conn, ctx: &mut Context<'_, ()>) {
            if conn.query_param("greet").is_some() {
                ctx.send_text("hello");
            }
        }

        fn handle_client_message(&self, _: &mut (), msg: Message<'_>, ctx: &mut Context<'_, ()>) {
            match msg {
                Message::Text("close") => {
                    ctx.close_with(CloseCode::new(4000).unwrap(), "bye");
                    ctx.send_text("never sent");
                }
                Message::Text("panic") => {
                    ctx.send_text("before panic");
                    panic!("boom");
                }
                Message::Text("badcode") => ctx.close_with_code(1005, ""),
                Message::Text("flood") => {
                    for _ in 0..40 {
                        ctx.send_binary(&[0u8; 64 * 1024]);
                    }
                }
                Message::Text(t) => ctx.send_text(t),
                Message::Binary(b) if b.starts_with(b"twice") => {
                    ctx.send_binary(b);
                    ctx.send_text("after");
                }
                Message::Binary(b) if b.starts_with(b"echo then close") => {
                    ctx.send_binary(b);
                    ctx.close_with(CloseCode::new(4000).unwrap(), "bye");
                }
                Message::Binary(b) if b.starts_with(b"echo then panic") => {
                    ctx.send_binary(b);
                    panic!("boom");
                }
                Message::Binary(b) if b.starts_with(b"text first") => {
                    ctx.send_text("first");
                    ctx.send_binary(b);
                }
                Message::Binary(b) => ctx.send_binary(b),
            }
        }

        fn handle_server_message(&self, _: &mut (), _: (), _: &mut Context<'_, ()>) {}

        fn terminate(&self, _: (), reason: &TerminateReason, _: &mut Context<'_, ()>) {
            self.terminated.lock().unwrap().push(reason.clone());
        }
    }

    struct Harness {
        app: App,
        terminated: Arc<Mutex<Vec<TerminateReason>>>,
        session: Session,
        now: u64,
    }

    /// The id the shard would pass (the session does not hold it).
    const ID: ConnId = ConnId::new(0, 1);

    impl Drop for Harness {
        fn drop(&mut self) {
            // What the shard does before it drops a session.
            if !self.session.is_terminated() {
                let (now, app) = (self.now, &self.app);
                self.session
                    .shut_down(ID, now, app, &mut Registries::none());
            }
        }
    }

    const UPGRADE: &str = "GET /ws?greet=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn harness(limits: Limits, max_conns: Option<usize>) -> Harness {
        let terminated = Arc::new(Mutex::new(Vec::new()));
        let mut app = App::new(limits);
        app.mount(
            "/ws",
            TestGear {
                terminated: Arc::clone(&terminated),
            },
            max_conns,
        )
        .unwrap();
        let session = Session::new(None, 0, &app);
        Harness {
            app,
            terminated,
            session,
            now: 0,
        }
    }

    impl Harness {
        fn recv(&mut self, bytes: &[u8]) {
            let mut data = bytes.to_vec();
            self.session
                .on_recv(ID, &mut data, self.now, &self.app, &mut Registries::none());
        }

        fn output(&mut self) -> Vec<u8> {
            match self.session.take_output(self.now) {
                Some(output) => {
                    let copy = output.to_vec();
                    self.session.sent(output);
                    copy
                }
                None => Vec::new(),
            }
        }

        fn open(&mut self) -> String {
            self.recv(UPGRADE.as_bytes());
            let out = self.output();
            let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let head = String::from_utf8(out[..end].to_vec()).unwrap();
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            // The greeting sent by init follows the 101.
            assert_eq!(frames(&out[end..]), [(OpCode::Text, b"hello".to_vec())]);
            head
        }

        fn send(&mut self, op: OpCode, payload: &[u8]) {
            self.recv(&client_frame(op, payload));
        }

        fn reasons(&self) -> Vec<TerminateReason> {
            self.terminated.lock().unwrap().clone()
        }
    }

    fn client_frame(op: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame_into(&mut out, true, 0, op, payload, Some([1, 2, 3, 4]));
        out
    }

    /// The server's frames, decoded as a client would.
    fn frames(mut bytes: &[u8]) -> Vec<(OpCode, Vec<u8>)> {
        let cfg = DecoderConfig {
            role: Role::Client,
            max_message_bytes: u64::MAX >> 1,
            allowed_rsv: 0,
        };
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let mut copy = bytes.to_vec();
            match crate::protocol::codec::decode_frame(&mut copy, &cfg).unwrap() {
                Decoded::Complete(f, used) => {
                    out.push((f.header.opcode, f.payload.to_vec()));
                    bytes = &bytes[used..];
                }
                Decoded::Incomplete { .. } => panic!("partial server frame"),
            }
        }
        out
    }

    fn client_fragment(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame_into(
            &mut out,
            fin,
            0,
            op,
            payload,
            Some([0x9a, 0x41, 0x07, 0xe3]),
        );
        out
    }

    fn big(n: usize, prefix: &[u8]) -> Vec<u8> {
        let mut v = prefix.to_vec();
        v.extend((0..n as u32).map(|i| (i.wrapping_mul(31) + 7) as u8));
        v
    }

    /// Frames that span receives (gathered in `pending`, unmasked as they arrive, and
    /// echoed in place when they were the whole buffer), fed in pieces of every size,
    /// with the output taken after every piece or only at the end.
    #[test]
    fn frames_across_receives_in_pieces() {
        let text = "é".repeat(20_000) + "€";
        let frag_a = big(30_000, b"");
        let frag_b = big(25_001, b"x");
        let mut wire = Vec::new();
        let mut want = Vec::new();
        for (op, payload) in [
            (OpCode::Binary, big(70_000, b"")),
            (OpCode::Ping, b"ping in between".to_vec()),
            (OpCode::Text, text.clone().into_bytes()),
            (OpCode::Binary, big(300, b"")),
            (OpCode::Binary, big(20_000, b"twice")),
            (OpCode::Binary, big(66_000, b"text first")),
            (OpCode::Binary, Vec::new()),
            (OpCode::Binary, big(65_530, b"")),
        ] {
            wire.extend(client_frame(op, &payload));
            match op {
                OpCode::Ping => want.push((OpCode::Pong, payload)),
                _ if payload.starts_with(b"twice") => {
                    want.push((op, payload));
                    want.push((OpCode::Text, b"after".to_vec()));
                }
                _ if payload.starts_with(b"text first") => {
                    want.push((OpCode::Text, b"first".to_vec()));
                    want.push((op, payload));
                }
                _ => want.push((op, payload)),
            }
        }
        wire.extend(client_fragment(false, OpCode::Binary, &frag_a));
        wire.extend(client_fragment(false, OpCode::Continuation, b""));
        wire.extend(client_frame(OpCode::Ping, b"p"));
        wire.extend(client_fragment(true, OpCode::Continuation, &frag_b));
        want.push((OpCode::Pong, b"p".to_vec()));
        want.push((OpCode::Binary, [frag_a, frag_b].concat()));
        for piece in [1, 2, 3, 13, 125, 1000, 4096, 16_384, 65_536, 200_000] {
            for take_each in [false, true] {
                let mut h = harness(Limits::default(), None);
                h.open();
                let mut out = Vec::new();
                for chunk in wire.chunks(piece) {
                    h.recv(chunk);
                    if take_each {
                        out.extend(h.output());
                    }
                }
                out.extend(h.output());
                assert!(
                    frames(&out) == want,
                    "pieces of {piece}, take_each {take_each}"
                );
                assert!(h.reasons().is_empty());
            }
        }
    }

    /// An echo left to be queued in place is queued before a close or a panic's 1011.
    #[test]
    fn echo_in_place_then_close_or_panic() {
        for (prefix, code, reason) in [
            (&b"echo then close"[..], 4000u16, "bye"),
            (&b"echo then panic"[..], 1011, ""),
        ] {
            let payload = big(40_000, prefix);
            let wire = client_frame(OpCode::Binary, &payload);
            let mut h = harness(Limits::default(), None);
            h.open();
            for chunk in wire.chunks(4096) {
                h.recv(chunk);
            }
            assert_eq!(
                frames(&h.output()),
                [
                    (OpCode::Binary, payload),
                    (OpCode::Close, close_payload(code, reason))
                ]
            );
        }
    }

    /// Protocol errors in frames gathered across receives keep their close codes.
    #[test]
    fn errors_across_receives() {
        let bad_text = [vec![b'a'; 5000], vec![0xff], vec![b'b'; 5000]].concat();
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (client_frame(OpCode::Text, &bad_text), 1007),
            (client_frame(OpCode::Binary, &[0; 2000]), 1009),
            (client_fragment(true, OpCode::Continuation, &[0; 500]), 1002),
        ];
        for (wire, code) in cases {
            for piece in [1, 7, 1000] {
                let limits = Limits {
                    max_message_bytes: 1500,
                    ..Limits::default()
                };
                let limits = if code == 1009 {
                    limits
                } else {
                    Limits::default()
                };
                let mut h = harness(limits, None);
                h.open();
                for chunk in wire.chunks(piece) {
                    h.recv(chunk);
                }
                let out = frames(&h.output());
                assert_eq!(out.len(), 1, "{code} in pieces of {piece}");
                assert_eq!(u16::from_be_bytes([out[0].1[0], out[0].1[1]]), code);
                assert!(h.session.should_close());
            }
        }
    }

    fn close_payload(code: u16, reason: &str) -> Vec<u8> {
        let mut p = code.to_be_bytes().to_vec();
        p.extend_from_slice(reason.as_bytes());
        p
    }

    #[test]
    fn echo_and_client_close() {
        let mut h = harness(Limits::default(), None);
        h.open();
        h.send(OpCode::Text, b"hi");
        h.send(OpCode::Binary, &[1, 2, 3]);
        h.send(OpCode::Ping, b"p");
        assert_eq!(
            frames(&h.output()),
            [
                (OpCode::Text, b"hi".to_vec()),
                (OpCode::Binary, vec![1, 2, 3]),
                (OpCode::Pong, b"p".to_vec())
            ]
        );
        h.send(OpCode::Close, &close_payload(1001, "away"));
        assert_eq!(
            frames(&h.output()),
            [(OpCode::Close, 1001u16.to_be_bytes().to_vec())]
        );
        assert!(h.session.should_close());
        assert_eq!(
            h.reasons(),
            [TerminateReason::RemoteClose {
                code: CloseCode::new(1001),
                reason: "away".into()
            }]
        );
        h.session
            .on_peer_gone(ID, None, h.now, &h.app, &mut Registries::none());
        assert_eq!(h.reasons().len(), 1, "terminate runs once");
        assert_eq!(h.app.connections("/ws"), Some(0));
    }

    #[test]
    fn byte_by_byte_and_pipelined() {
        let mut h = harness(Limits::default(), None);
        let mut wire = UPGRADE.as_bytes().to_vec();
        wire.extend(client_frame(OpCode::Text, b"first"));
        wire.extend(client_frame(OpCode::Binary, &vec![7u8; 300]));
        for b in wire {
            h.recv(&[b]);
        }
        let out = h.output();
        let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(
            frames(&out[end..]),
            [
                (OpCode::Text, b"hello".to_vec()),
                (OpCode::Text, b"first".to_vec()),
                (OpCode::Binary, vec![7u8; 300])
            ]
        );
    }

    #[test]
    fn rejections() {
        let cases = [
            ("GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", "404"),
            ("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", "426"),
            ("POST /ws HTTP/1.1\r\nHost: x\r\n\r\n", "405"),
            ("\x01\x02garbage\r\n\r\n", "400"),
            (
                "GET /ws?reject=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                "403",
            ),
        ];
        for (req, status) in cases {
            let mut h = harness(Limits::default(), None);
            h.recv(req.as_bytes());
            let out = String::from_utf8(h.output()).unwrap();
            assert!(
                out.starts_with(&format!("HTTP/1.1 {status}")),
                "{req:?} -> {out}"
            );
            assert!(h.session.should_close());
            assert!(h.reasons().is_empty(), "no terminate without init");
        }
        let mut h = harness(Limits::default(), None);
        h.recv(format!("GET /ws HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000)).as_bytes());
        assert!(
            String::from_utf8(h.output())
                .unwrap()
                .starts_with("HTTP/1.1 431")
        );
    }

    /// Cross-site WebSocket hijacking: a browser upgrade from another site's page gets
    /// 403 (before `connect` runs); the server's own pages, clients without `Origin`,
    /// and origins the gear allows pass.
    #[test]
    fn origins_other_than_the_host_get_403() {
        let upgrade = |origin: Option<&str>| {
            let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
            format!(
                "GET /ws HTTP/1.1\r\nHost: chat.example:8080\r\n{origin}Upgrade: websocket\r\n\
                 Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Sec-WebSocket-Version: 13\r\n\r\n"
            )
        };
        let status = |h: &mut Harness, origin: Option<&str>| {
            h.recv(upgrade(origin).as_bytes());
            let out = String::from_utf8(h.output()).unwrap();
            let status = out[9..12].to_owned();
            if status == "101" {
                h.session
                    .shut_down(ID, h.now, &h.app, &mut Registries::none());
            }
            status
        };
        let cases = [
            (None, "101"),
            (Some("http://chat.example:8080"), "101"),
            (Some("http://evil.example"), "403"),
            (Some("null"), "403"),
            (Some("https://app.example"), "403"),
        ];
        for (origin, want) in cases {
            let mut h = harness(Limits::default(), None);
            assert_eq!(status(&mut h, origin), want, "{origin:?}");
        }
        let mut h = harness(Limits::default(), None);
        h.app.set_origins(
            Some("/ws"),
            crate::origin::OriginPolicy::from_list(&["https://app.example".into()]),
        );
        assert_eq!(status(&mut h, Some("https://app.example")), "101");
        let mut h = harness(Limits::default(), None);
        h.app
            .set_origins(Some("/ws"), crate::origin::OriginPolicy::Any);
        assert_eq!(status(&mut h, Some("http://evil.example")), "101");
    }

    /// Autobahn 6.4.3 and 6.4.4: a text frame whose bytes turn invalid before it is
    /// whole is failed with 1007 when the bad bytes arrive, also in a continuation
    /// frame whose first bytes finish a code point the previous fragment cut.
    #[test]
    fn invalid_utf8_fails_before_the_frame_is_whole() {
        /// The first fragment's bytes (empty: no fragment), the valid bytes, the bad.
        type Case<'a> = (&'a [u8], &'a [u8], Option<&'a [u8]>);
        let cases: [Case; 3] = [
            // one text frame: valid, then a surrogate, then the rest never comes
            (b"", "κόσμε".as_bytes(), Some(&[0xed, 0xa0, 0x80])),
            // the bad byte is the last one that arrived
            (b"", b"hello", Some(&[0xf4, 0x90])),
            // a continuation that finishes the first fragment's cut code point, then
            // breaks
            (&"€".as_bytes()[..2], &[0x82, b'a'], Some(&[0xff])),
        ];
        for (first_fragment, valid, bad) in cases {
            let mut h = harness(Limits::default(), None);
            h.open();
            let continuation = !first_fragment.is_empty();
            if continuation {
                h.recv(&client_fragment(false, OpCode::Text, first_fragment));
            }
            let mut payload = valid.to_vec();
            payload.extend_from_slice(bad.unwrap_or_default());
            payload.extend_from_slice(&[b'x'; 100]);
            let op = if continuation {
                OpCode::Continuation
            } else {
                OpCode::Text
            };
            let frame = client_fragment(true, op, &payload);
            // The header and the valid part, then the bad bytes: nothing yet, then 1007.
            let cut = frame.len() - 100 - bad.map_or(0, <[u8]>::len);
            h.recv(&frame[..cut]);
            assert!(h.output().is_empty(), "valid so far");
            assert!(!h.session.should_close());
            h.recv(&frame[cut..frame.len() - 100]);
            assert_eq!(close_code(&h.output()), Some(1007), "{payload:?}");
            assert!(h.session.should_close());
        }
        // Valid text in pieces stays valid and arrives whole.
        let mut h = harness(Limits::default(), None);
        h.open();
        let text = "κόσμε € 𝄞".repeat(50);
        let frame = client_frame(OpCode::Text, text.as_bytes());
        for piece in frame.chunks(7) {
            h.recv(piece);
        }
        let out = frames(&h.output());
        assert_eq!(out, vec![(OpCode::Text, text.into_bytes())]);
    }

    #[test]
    fn per_gear_limit_503() {
        let mut first = harness(Limits::default(), Some(1));
        first.open();
        let mut second = Session::new(None, 0, &first.app);
        second.on_recv(
            ID,
            &mut UPGRADE.as_bytes().to_vec(),
            0,
            &first.app,
            &mut Registries::none(),
        );
        let out = String::from_utf8(second.take_output(0).unwrap().to_vec()).unwrap();
        assert!(out.starts_with("HTTP/1.1 503"));
        assert!(out.ends_with("TooManyWebsocketConnections"));
        assert_eq!(first.app.connections("/ws"), Some(1));
        first
            .session
            .on_peer_gone(ID, None, first.now, &first.app, &mut Registries::none());
        assert_eq!(first.app.connections("/ws"), Some(0));
    }

    #[test]
    fn gear_close_then_peer_answers() {
        let mut h = harness(Limits::default(), None);
        h.open();
        h.send(OpCode::Text, b"close");
        assert_eq!(
            frames(&h.output()),
            [(OpCode::Close, close_payload(4000, "bye"))]
        );
        assert_eq!(h.reasons(), [TerminateReason::Stop]);
        assert!(!h.session.should_close(), "waits for the peer's close");
        h.send(OpCode::Text, b"ignored after close");
        assert!(h.output().is_empty());
        h.send(OpCode::Close, &close_payload(4000, ""));
        assert!(h.session.should_close());
        assert!(h.output().is_empty(), "no second close");
    }

    #[test]
    fn closing_timeout() {
        let mut h = harness(Limits::default(), None);
        h.open();
        h.send(OpCode::Text, b"close");
        let deadline = h.session.next_deadline_ms().unwrap();
        assert_eq!(deadline, 5000);
        h.session.on_tick(ID, 4999, &h.app, &mut Registries::none());
        assert!(!h.session.should_close());
        h.session.on_tick(ID, 5000, &h.app, &mut Registries::none());
        assert!(h.session.should_close());
        assert_eq!(h.reasons(), [TerminateReason::Stop]);
    }

    #[test]
    fn panic_closes_1011() {
        let mut h = harness(Limits::default(), None);
        h.open();
        h.send(OpCode::Text, b"panic");
        assert_eq!(
            frames(&h.output()),
            [
                (OpCode::Text, b"before panic".to_vec()),
                (OpCode::Close, 1011u16.to_be_bytes().to_vec())
            ]
        );
        assert_eq!(
            h.reasons(),
            [TerminateReason::Error(TerminateError::HandlerPanic(
                "boom".into()
            ))]
        );
    }

    #[test]
    fn invalid_close_code_closes_1011() {
        let mut h = harness(Limits::default(), None);
        h.open();
        h.send(OpCode::Text, b"badcode");
        assert_eq!(
            frames(&h.output()),
            [(OpCode::Close, 1011u16.to_be_bytes().to_vec())]
        );
        assert_eq!(
            h.reasons(),
            [TerminateReason::Error(TerminateError::InvalidCloseCode(
                1005
            ))]
        );
    }

    #[test]
    fn protocol_errors_close_with_their_code() {
        let unmasked = {
            let mut v = Vec::new();
            encode_frame_into(&mut v, true, 0, OpCode::Text, b"x", None);
            v
        };
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (unmasked, 1002),
            (client_frame(OpCode::Text, &[0xff, 0xfe]), 1007),
            (client_frame(OpCode::Binary, &[0; 2000]), 1009),
            (client_frame(OpCode::Close, &close_payload(1005, "")), 1002),
            (client_frame(OpCode::Continuation, b"x"), 1002),
        ];
        for (wire, code) in cases {
            let limits = Limits {
                max_message_bytes: 1000,
                ..Limits::default()
            };
            let mut h = harness(limits, None);
            h.open();
            h.recv(&wire);
            let out = frames(&h.output());
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].0, OpCode::Close);
            assert_eq!(u16::from_be_bytes([out[0].1[0], out[0].1[1]]), code);
            assert!(
                h.session.should_close(),
                "a failed connection is closed at once"
            );
            assert!(matches!(h.reasons()[..], [TerminateReason::Error(_)]));
        }
    }

    #[test]
    fn idle_timeout_1000() {
        let limits = Limits {
            idle_timeout: Duration::from_secs(3),
            ..Limits::default()
        };
        let mut h = harness(limits, None);
        h.open();
        h.now = 2000;
        h.send(OpCode::Text, b"keepalive");
        h.output();
        // First the output buffers are given back, once quiet.
        assert_eq!(
            h.session.swept_deadline_ms(&h.app),
            Some(2000 + TX_QUIET_MS)
        );
        h.session
            .on_tick(ID, 2000 + TX_QUIET_MS, &h.app, &mut Registries::none());
        assert!(h.session.tx.is_none());
        assert_eq!(h.session.next_deadline_ms(), None, "no timer needed");
        assert_eq!(
            h.session.swept_deadline_ms(&h.app),
            Some(5000),
            "reset by incoming data"
        );
        h.session.on_tick(ID, 5000, &h.app, &mut Registries::none());
        assert_eq!(
            frames(&h.output()),
            [(OpCode::Close, close_payload(1000, "idle timeout"))]
        );
        assert_eq!(h.reasons(), [TerminateReason::Timeout]);
    }

    #[test]
    fn handshake_timeout() {
        let mut h = harness(Limits::default(), None);
        h.recv(b"GET /ws HTTP/1.1\r\n");
        assert_eq!(h.session.swept_deadline_ms(&h.app), Some(10_000));
        assert_eq!(h.session.next_deadline_ms(), None);
        h.session
            .on_tick(ID, 10_000, &h.app, &mut Registries::none());
        assert!(h.session.should_close());
        assert!(h.output().is_empty());
    }

    #[test]
    fn slow_consumer_1008_and_memory_freed() {
        let mut h = harness(Limits::default(), None);
        h.open();
        // 2.5 MiB with nothing in flight: the kernel can take it, no slow consumer.
        h.send(OpCode::Text, b"flood");
        assert!(h.reasons().is_empty());
        // The client does not read: that send stays in flight, and the next flood
        // waits behind it.
        let stuck = h.session.take_output(h.now).unwrap();
        assert!(stuck.len() > 2_500_000);
        h.send(OpCode::Text, b"flood");
        assert!(h.session.queued_bytes() - stuck.len() < 1024, "queue freed");
        h.session.sent(stuck);
        assert_eq!(
            frames(&h.output()),
            [(OpCode::Close, close_payload(1008, "slow consumer"))]
        );
        assert_eq!(
            h.reasons(),
            [TerminateReason::Error(TerminateError::SlowConsumer)]
        );
    }

    /// `output` holds the echoes of the 16 KiB payloads `echoes` (each payload the
    /// byte `i` repeated), in buffers none of which grew past a chunk; it is given back.
    fn assert_chunked_echoes(
        h: &mut Harness,
        output: Output,
        echoes: std::ops::RangeInclusive<u8>,
    ) {
        for buf in std::iter::once(&output.first).chain(&output.rest) {
            assert!(
                buf.capacity() <= CHUNK,
                "a buffer grew to {}",
                buf.capacity()
            );
        }
        let want: Vec<_> = echoes
            .map(|i| (OpCode::Binary, vec![i; 16 * 1024]))
            .collect();
        assert_eq!(frames(&output.to_vec()), want);
        h.session.sent(output);
        assert!(h.output().is_empty());
    }

    #[test]
    fn output_behind_a_send_is_queued_in_chunks_not_grown() {
        let mut h = harness(Limits::default(), None);
        h.open();
        let payload = |i: u8| vec![i; 16 * 1024];
        h.send(OpCode::Binary, &payload(0));
        let in_flight = h.session.take_output(h.now).unwrap();
        assert!(in_flight.rest.is_empty());
        // Echoes queue behind the send in flight: full buffers are set aside as they
        // are, not grown (and copied).
        for i in 1..=12 {
            h.send(OpCode::Binary, &payload(i));
        }
        let queued = h.session.queued_bytes() - in_flight.len();
        assert_eq!(queued, 12 * (16 * 1024 + 4));
        h.session.sent(in_flight);
        let output = h.session.take_output(h.now).unwrap();
        assert_eq!(output.len(), queued);
        assert!(output.rest.len() >= 3, "{} buffers", output.rest.len() + 1);
        assert_chunked_echoes(&mut h, output, 1..=12);
    }

    #[test]
    fn output_after_an_echo_in_place_is_chunked_too() {
        let mut h = harness(Limits::default(), None);
        h.open();
        let payload = |i: u8| vec![i; 16 * 1024];
        h.send(OpCode::Binary, &payload(0));
        let in_flight = h.session.take_output(h.now).unwrap();
        // Frames that arrive in 4 KiB pieces are completed in `pending` and the first
        // is echoed in place (its buffer becomes the output, starting after the rest
        // of the client's header); the next ones queue after it in chunks.
        let mut wire = Vec::new();
        for i in 1..=12 {
            wire.extend_from_slice(&client_frame(OpCode::Binary, &payload(i)));
        }
        for piece in wire.chunks(4096) {
            h.recv(piece);
        }
        h.session.sent(in_flight);
        let output = h.session.take_output(h.now).unwrap();
        assert!(output.start > 0, "the first echo went out in place");
        assert!(!output.rest.is_empty());
        assert_chunked_echoes(&mut h, output, 1..=12);
    }

    #[test]
    fn drain_sends_1001() {
        let mut h = harness(Limits::default(), None);
        h.open();
        h.session
            .start_drain(ID, 0, &h.app, &mut Registries::none());
        assert_eq!(
            frames(&h.output()),
            [(OpCode::Close, close_payload(1001, DRAIN_REASON))]
        );
        assert_eq!(h.reasons(), [TerminateReason::Stop]);
    }

    #[test]
    fn server_pings_quiet_connections_and_pong_deadline() {
        let limits = Limits {
            ping_interval: Some(Duration::from_secs(1)),
            pong_timeout: Duration::from_secs(2),
            ..Limits::default()
        };
        let mut h = harness(limits, None);
        h.open();
        assert_eq!(h.session.swept_deadline_ms(&h.app), Some(1000));
        h.session.on_tick(ID, 1000, &h.app, &mut Registries::none());
        assert_eq!(frames(&h.output()), [(OpCode::Ping, b"kythera".to_vec())]);
        assert_eq!(
            h.session.swept_deadline_ms(&h.app),
            Some(3000),
            "the pong's"
        );
        h.now = 1500;
        h.send(OpCode::Pong, b"kythera");
        h.session.on_tick(ID, 2000, &h.app, &mut Registries::none());
        assert!(h.output().is_empty(), "the pong was a receive at 1500");
        // A connection that sends is not pinged.
        h.now = 2400;
        h.send(OpCode::Text, b"still here");
        h.output();
        h.session.on_tick(ID, 2500, &h.app, &mut Registries::none());
        assert!(h.output().is_empty());
        h.session.on_tick(ID, 3400, &h.app, &mut Registries::none());
        assert_eq!(frames(&h.output()), [(OpCode::Ping, b"kythera".to_vec())]);
        h.session.on_tick(ID, 5399, &h.app, &mut Registries::none());
        assert!(!h.session.should_close());
        h.session.on_tick(ID, 5400, &h.app, &mut Registries::none());
        assert!(h.session.should_close(), "no pong for the ping at 3400");
        assert_eq!(
            h.reasons(),
            [TerminateReason::Error(TerminateError::PongTimeout)]
        );
    }

    #[test]
    fn peer_gone_and_shut_down() {
        let mut h = harness(Limits::default(), None);
        h.open();
        h.session
            .on_peer_gone(ID, Some(104), h.now, &h.app, &mut Registries::none());
        assert_eq!(
            h.reasons(),
            [TerminateReason::Error(TerminateError::Io(104))]
        );
        let mut h = harness(Limits::default(), None);
        h.open();
        h.session
            .shut_down(ID, h.now, &h.app, &mut Registries::none());
        assert!(h.session.is_terminated() && h.session.should_close());
        assert_eq!(
            h.reasons(),
            [TerminateReason::Stop],
            "a session shut down terminates"
        );
    }

    #[test]
    fn subprotocol_selected_in_connect() {
        let mut h = harness(Limits::default(), None);
        let req = UPGRADE.replace("\r\n\r\n", "\r\nSec-WebSocket-Protocol: v0, v1\r\n\r\n");
        h.recv(req.as_bytes());
        let out = String::from_utf8_lossy(&h.output()).into_owned();
        assert!(out.contains("Sec-WebSocket-Protocol: v1\r\n"), "{out}");
    }

    // ----- permessage-deflate -----

    const UPGRADE_DEFLATE: &str = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n";

    /// Server frames, with RSV1 frames inflated: (opcode, compressed, payload).
    fn deflate_frames(mut bytes: &[u8], inflater: &mut Inflater) -> Vec<(OpCode, bool, Vec<u8>)> {
        let cfg = DecoderConfig {
            role: Role::Client,
            max_message_bytes: u64::MAX >> 1,
            allowed_rsv: RSV1,
        };
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let mut copy = bytes.to_vec();
            match crate::protocol::codec::decode_frame(&mut copy, &cfg).unwrap() {
                Decoded::Complete(f, used) => {
                    let compressed = f.header.rsv & RSV1 != 0;
                    let payload = if compressed {
                        let mut plain = Vec::new();
                        inflater
                            .inflate(f.payload, &mut plain, usize::MAX >> 1, false)
                            .unwrap();
                        plain
                    } else {
                        f.payload.to_vec()
                    };
                    out.push((f.header.opcode, compressed, payload));
                    bytes = &bytes[used..];
                }
                Decoded::Incomplete { .. } => panic!("partial server frame"),
            }
        }
        out
    }

    fn compressed_client_frame(op: OpCode, payload: &[u8], deflater: &mut Deflater) -> Vec<u8> {
        let mut compressed = Vec::new();
        deflater.compress(payload, &mut compressed, false);
        let mut out = Vec::new();
        encode_frame_into(&mut out, true, RSV1, op, &compressed, Some([9, 8, 7, 6]));
        out
    }

    fn open_deflate(limits: Limits) -> (Harness, String) {
        let mut h = harness(limits, None);
        h.recv(UPGRADE_DEFLATE.as_bytes());
        let out = h.output();
        let head = String::from_utf8(out).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        (h, head)
    }

    use crate::protocol::deflate::{DeflateConfig, Deflater, Inflater};

    /// The code of the close frame that ends the output, if it ends with one.
    fn close_code(out: &[u8]) -> Option<u16> {
        let got = deflate_frames(out, &mut Inflater::new(15));
        match got.last() {
            Some((OpCode::Close, false, payload)) if payload.len() >= 2 => {
                Some(u16::from_be_bytes([payload[0], payload[1]]))
            }
            _ => None,
        }
    }

    #[test]
    fn deflate_is_agreed_and_messages_go_both_ways_compressed() {
        let (mut h, head) = open_deflate(Limits::default());
        assert!(
            head.contains("Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"),
            "{head}"
        );
        let (mut client, mut inflater) = (Deflater::new(6, 15), Inflater::new(15));
        let text = "héllo, compressed world ".repeat(100);
        h.recv(&compressed_client_frame(
            OpCode::Text,
            text.as_bytes(),
            &mut client,
        ));
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        h.recv(&compressed_client_frame(OpCode::Binary, &big, &mut client));
        // An uncompressed message on the same connection is fine too.
        h.send(OpCode::Text, b"plain");
        let out = h.output();
        let got = deflate_frames(&out, &mut inflater);
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], (OpCode::Text, true, text.into_bytes()));
        assert_eq!(got[1], (OpCode::Binary, true, big));
        assert_eq!(got[2], (OpCode::Text, true, b"plain".to_vec()));
        assert!(
            out.len() < 100_000,
            "the replies were compressed: {}",
            out.len()
        );
        // Pings are never compressed.
        h.send(OpCode::Ping, b"p");
        assert_eq!(
            deflate_frames(&h.output(), &mut inflater),
            [(OpCode::Pong, false, b"p".to_vec())]
        );
    }

    #[test]
    fn fragmented_compressed_message() {
        let (mut h, _) = open_deflate(Limits::default());
        let mut compressed = Vec::new();
        Deflater::new(1, 15).compress("fragmented ".repeat(50).as_bytes(), &mut compressed, true);
        let (a, b) = compressed.split_at(compressed.len() / 2);
        let mut wire = Vec::new();
        encode_frame_into(&mut wire, false, RSV1, OpCode::Text, a, Some([1, 2, 3, 4]));
        encode_frame_into(&mut wire, true, 0, OpCode::Ping, b"x", Some([1, 2, 3, 4]));
        encode_frame_into(
            &mut wire,
            true,
            0,
            OpCode::Continuation,
            b,
            Some([1, 2, 3, 4]),
        );
        // Delivered in two receives, split inside the second frame.
        let (first, second) = wire.split_at(a.len() + 5);
        h.recv(first);
        h.recv(second);
        let got = deflate_frames(&h.output(), &mut Inflater::new(15));
        assert_eq!(got[0], (OpCode::Pong, false, b"x".to_vec()));
        assert_eq!(
            got[1],
            (OpCode::Text, true, "fragmented ".repeat(50).into_bytes())
        );
    }

    #[test]
    fn context_takeover_when_configured() {
        let limits = Limits {
            deflate: DeflateConfig {
                server_no_context_takeover: false,
                client_no_context_takeover: false,
                client_max_window_bits: 10,
                ..DeflateConfig::default()
            },
            ..Limits::default()
        };
        let (mut h, head) = open_deflate(limits);
        assert!(
            head.contains(
                "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=10\r\n"
            ),
            "{head}"
        );
        let (mut client, mut inflater) = (Deflater::new(6, 10), Inflater::new(15));
        let msg = br#"{"from":"ann","text":"the same words, again and again"}"#;
        let mut sizes = Vec::new();
        for _ in 0..3 {
            h.recv(&compressed_client_frame(OpCode::Text, msg, &mut client));
            let out = h.output();
            sizes.push(out.len());
            assert_eq!(
                deflate_frames(&out, &mut inflater),
                [(OpCode::Text, true, msg.to_vec())]
            );
        }
        assert!(
            sizes[2] < sizes[0] / 2,
            "later replies refer back: {sizes:?}"
        );
    }

    #[test]
    fn a_compression_bomb_is_closed_with_1009() {
        let limits = Limits {
            max_message_bytes: 100_000,
            ..Limits::default()
        };
        let (mut h, _) = open_deflate(limits);
        let zeros = vec![0u8; 10_000_000];
        let mut wire = Vec::new();
        Deflater::new(9, 15).compress(&zeros, &mut wire, true);
        assert!(wire.len() < 20_000);
        let mut frame = Vec::new();
        encode_frame_into(
            &mut frame,
            true,
            RSV1,
            OpCode::Binary,
            &wire,
            Some([1, 2, 3, 4]),
        );
        h.recv(&frame);
        assert_eq!(close_code(&h.output()), Some(1009));
        assert_eq!(
            h.reasons(),
            [TerminateReason::Error(TerminateError::MessageTooBig)]
        );
    }

    #[test]
    fn deflate_errors_and_their_close_codes() {
        let cases: [(&str, Vec<u8>, u16); 4] = [
            (
                "not deflate data",
                {
                    let mut f = Vec::new();
                    encode_frame_into(
                        &mut f,
                        true,
                        RSV1,
                        OpCode::Binary,
                        &[0xff; 8],
                        Some([1, 2, 3, 4]),
                    );
                    f
                },
                1007,
            ),
            (
                "invalid UTF-8 once inflated",
                {
                    compressed_client_frame(
                        OpCode::Text,
                        &[b'a', 0xff, 0xfe],
                        &mut Deflater::new(1, 15),
                    )
                },
                1007,
            ),
            (
                "RSV1 on a control frame",
                {
                    let mut f = Vec::new();
                    encode_frame_into(&mut f, true, RSV1, OpCode::Ping, b"", Some([1, 2, 3, 4]));
                    f
                },
                1002,
            ),
            (
                "RSV1 on a continuation",
                {
                    let mut f = Vec::new();
                    encode_frame_into(&mut f, false, 0, OpCode::Text, b"a", Some([1, 2, 3, 4]));
                    encode_frame_into(
                        &mut f,
                        true,
                        RSV1,
                        OpCode::Continuation,
                        b"b",
                        Some([1, 2, 3, 4]),
                    );
                    f
                },
                1002,
            ),
        ];
        for (what, wire, code) in cases {
            let (mut h, _) = open_deflate(Limits::default());
            h.recv(&wire);
            assert_eq!(close_code(&h.output()), Some(code), "{what}");
        }
        // Without the extension agreed, RSV1 is a protocol error.
        let mut h = harness(Limits::default(), None);
        h.open();
        h.recv(&compressed_client_frame(
            OpCode::Text,
            b"hello",
            &mut Deflater::new(1, 15),
        ));
        assert_eq!(close_code(&h.output()), Some(1002));
    }

    #[test]
    fn deflate_switched_off_or_declined() {
        let limits = Limits {
            deflate: DeflateConfig {
                enabled: false,
                ..DeflateConfig::default()
            },
            ..Limits::default()
        };
        let (_, head) = open_deflate(limits);
        assert!(!head.contains("Sec-WebSocket-Extensions"), "{head}");
        let mut h = harness(Limits::default(), None);
        h.recv(
            UPGRADE_DEFLATE
                .replace("client_max_window_bits", "server_max_window_bits=8")
                .as_bytes(),
        );
        let head = String::from_utf8(h.output()).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            !head.contains("Sec-WebSocket-Extensions"),
            "8-bit windows are declined: {head}"
        );
    }
}
