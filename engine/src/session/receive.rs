//! Received bytes to frames: whole frames are decoded and unmasked in place in the
//! receive buffer with a decoder on the stack; a frame that continues in the next
//! receive is completed in `pending` (see `partial_frame`) and decoded from there.
//!
//! Separate from `events` so that the way bytes become frames (and which buffer a
//! frame lies in) is apart from what a frame does.

use kythera_handler_api::ConnId;

use super::handshake::EARLY_BYTES_MAX;
use super::output::{SPARE_MAX, tx};
use super::partial_frame::{
    Partial, append_pending, check_partial_text, reserve_frame, started_frame, unmask_started,
};
use super::staged_echo::may_stage;
use super::{Session, ms};
use crate::gear::{App, Registries};
use crate::protocol::ProtocolError;
use crate::protocol::codec::{DecoderConfig, OpCode, RSV1, Role};
use crate::protocol::decoder::{Decoder, Step};
use crate::protocol::fragment::Event;

impl Session {
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
    pub(super) fn feed(
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

    /// How this connection's frames are decoded: the server's side, the message limit,
    /// RSV1 once permessage-deflate is agreed.
    pub(super) fn decoder_config(&self, app: &App) -> DecoderConfig {
        DecoderConfig {
            role: Role::Server,
            max_message_bytes: app.limits().max_message_bytes,
            allowed_rsv: if self.pmd.is_some() { RSV1 } else { 0 },
        }
    }
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
        // A frame in a receive buffer (not `pending`, whose echo goes out in place):
        // unmasked straight into the output as its own echo, if it is a message.
        if !owned
            && may_stage(&buf[start..])
            && let Some(used) = core.stage_echo(decoder, id, &buf[start..], now_ms, app, regs)
        {
            start += used;
            echo = None;
            continue;
        }
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
