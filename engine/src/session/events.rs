//! What a received frame does: a message runs the gear's `handle_client_message` (and
//! may be echoed in place), a ping is answered, a pong ends the wait for it, the
//! peer's close is answered; compressed messages are inflated first.
//!
//! Separate from `receive`, which finds the frames, so that each event's handling
//! reads in one place.

use kythera_handler_api::{CloseCode, ConnId, Message, TerminateReason};

use super::callback::{SinkOutcome, with_sink};
use super::output::tx;
use super::staged_echo::STAGE_MIN;
use super::{Phase, Session};
use crate::gear::{App, Registries};
use crate::protocol::ProtocolError;
use crate::protocol::close::PeerCloseAction;
use crate::protocol::codec::{OpCode, encode_frame_into, encode_header};
use crate::protocol::deflate::with_scratch;
use crate::protocol::fragment::Event;

impl Session {
    /// Acts on one frame's event. `in_place`: the frame is all of a buffer that ends
    /// there and that the session may give away; if the gear's first send is this
    /// message's payload as it is, and it sends nothing after it, that echo is not
    /// copied but returned (opcode, length), for the caller to queue it in place
    /// ([`Session::echo_in_place`]).
    pub(super) fn on_event(
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
                let Phase::Open(live) = &mut self.phase else {
                    if let Some(c) = regs.counters(self.gear()) {
                        c.frames_in.add(1);
                    }
                    return None;
                };
                let gear_index = self.gear as usize;
                let payload = match msg {
                    kythera_handler_api::Message::Text(t) => t.as_bytes(),
                    kythera_handler_api::Message::Binary(b) => b,
                };
                // Only a payload that ends the buffer lies in it (a reassembled one
                // lies in the assembler's buffer). With compression agreed, echoes are
                // compressed, not sent in place.
                let candidate = (self.pmd.is_none()
                    && in_place.is_some_and(|end| payload.as_ptr_range().end == end))
                .then_some(payload);
                let pmd = self.pmd.as_deref_mut();
                let mut outcome = with_sink(&mut self.tx, pmd, candidate, |sink| {
                    live.client_message(gear_index, id, msg, sink, regs)
                });
                self.count_message(&outcome, regs);
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

    /// Counts a client message and what the gear sent for it. After the callback, with
    /// what it sent: one look-up of the counters and one call through the gear's
    /// vtable per message.
    #[inline(always)]
    pub(super) fn count_message(&mut self, outcome: &SinkOutcome, regs: &mut Registries) {
        if let Phase::Open(live) = &mut self.phase {
            let meta = live.meta();
            meta.frames_in += 1;
            meta.frames_out += outcome.frames;
        }
        if let Some(c) = regs.counters(self.gear()) {
            c.frames_in.add(1);
            c.frames_out.add(outcome.frames);
            c.bytes_out.add(outcome.bytes);
        }
    }

    /// Queues the echo that [`Session::on_event`] returned: `buf` is the frame that was
    /// echoed, its payload the last `len` bytes. The server's header goes in front of
    /// the payload (the client's header is 4 bytes longer: it carries the mask), and
    /// `buf` becomes the output, after what was queued before (as a chunk of its own).
    /// Returns an empty buffer to reuse, if there is one. The caller checks the output
    /// limit.
    pub(super) fn echo_in_place(&mut self, mut buf: Vec<u8>, op: OpCode, len: usize) -> Vec<u8> {
        let payload_start = buf.len() - len;
        let header = encode_header(true, 0, op, len as u64, None);
        let header = header.as_bytes();
        let start = payload_start
            .checked_sub(header.len())
            .and_then(|s| u8::try_from(s).ok());
        let tx = tx(&mut self.tx);
        let queued = tx.out.len() > usize::from(tx.out_start);
        match start {
            // Behind other output a small payload is copied: a buffer of its own would
            // cost an allocation for the next pending frame and an iovec, more than
            // the copy.
            Some(start) if !queued || len >= STAGE_MIN => {
                buf[usize::from(start)..payload_start].copy_from_slice(header);
                if queued {
                    tx.push_out(buf);
                    tx.out_start = start;
                    return Vec::new();
                }
                tx.out_start = start;
                std::mem::replace(&mut tx.out, buf)
            }
            // A client's header is longer than ours, so only a small payload behind
            // other output comes here.
            _ => {
                encode_frame_into(&mut tx.out, true, 0, op, &buf[payload_start..], None);
                buf
            }
        }
    }

    /// A compressed message: inflated (at most the message size limit) into a scratch
    /// buffer of the shard's, checked for UTF-8 if text, and handed on as a message.
    pub(super) fn on_compressed(
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
}
