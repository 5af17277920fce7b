//! A whole data frame that lies in the receive buffer is unmasked straight into the
//! output, behind the header its echo would have, and the gear is handed the payload
//! there: if the gear echoes it as it is (its first send is that payload), the echo is
//! already queued; otherwise the staged bytes are dropped from the output.
//!
//! This is the echo's only pass over the payload: the in-place path unmasks the
//! payload in the receive buffer and then copies it into the output, two passes, and
//! the copy (glibc's `rep movsb` above a few KiB) is slow on these machines when source
//! and destination do not line up. Separate from `receive` because the output is
//! lent out and given back around the callback here, and that bookkeeping is easier to
//! check alone.

use kythera_handler_api::{ConnId, Message};

use super::callback::with_sink;
use super::output::{Chunk, tx};
use super::{Phase, Session};
use crate::gear::{App, Registries};
use crate::protocol::ProtocolError;
use crate::protocol::codec::{Decoded, MAX_HEADER_BYTES, OpCode, encode_header, parse_header};
use crate::protocol::decoder::Decoder;
use crate::protocol::mask::{extend_unmasked, extend_unmasked_text};

/// The least payload staged: below it the in-place path's copy is a few instructions,
/// and the staging's bookkeeping (lending the output out and back) costs more than it
/// saves. Also the least payload of a frame completed in `pending` that is echoed in
/// its own buffer behind other output (`Session::echo_in_place`).
pub(super) const STAGE_MIN: usize = 1024;

/// Whether the frame at the start of `buf` may be staged, from its length bytes alone:
/// one comparison for the small frames that are not, before any header is parsed.
#[inline(always)]
pub(super) fn may_stage(buf: &[u8]) -> bool {
    match buf.get(1).map(|b| b & 0x7f) {
        Some(127) => true,
        Some(126) => buf
            .get(2..4)
            .is_some_and(|n| usize::from(u16::from_be_bytes([n[0], n[1]])) >= STAGE_MIN),
        _ => false,
    }
}

/// The output lent out while the gear handles a staged message, and what
/// [`Session::unstage`] needs to put it back in order with what the gear queued.
struct Staged {
    /// The output as it was, with the staged frame from `at` on.
    out: Vec<u8>,
    at: usize,
    /// The number of chunks queued before.
    chunks: usize,
    /// Where its bytes start (`Tx::out_start`).
    out_start: u8,
}

impl Session {
    /// If the frame at the start of `buf` is a whole, uncompressed, unfragmented text
    /// or binary message of at least [`STAGE_MIN`] bytes, on an open connection
    /// without permessage-deflate: acts on it through the staging above and returns
    /// how many bytes of `buf` it used. `None`: anything else, for the decoder (which
    /// also gives every malformed frame its error).
    #[inline]
    pub(super) fn stage_echo(
        &mut self,
        decoder: &mut Decoder,
        id: ConnId,
        buf: &[u8],
        now_ms: u64,
        app: &App,
        regs: &mut Registries,
    ) -> Option<usize> {
        if buf.len() < STAGE_MIN || self.pmd.is_some() || decoder.assembler_mut().in_progress() {
            return None;
        }
        let Ok(Decoded::Complete(h, _)) = parse_header(buf, decoder.config()) else {
            return None;
        };
        let total = usize::try_from(h.frame_len()).ok()?;
        let len = total - h.header_len;
        let text = match h.opcode {
            OpCode::Text => true,
            OpCode::Binary => false,
            _ => return None,
        };
        if !h.fin || h.rsv != 0 || len < STAGE_MIN || total > buf.len() || !self.closing_open() {
            return None;
        }
        let Phase::Open(live) = &mut self.phase else {
            return None;
        };
        let mask = h.mask?;
        let payload = &buf[h.header_len..total];
        let gear_index = self.gear as usize;

        // Lend the output out: the staged frame goes at its end, and the gear's own
        // sends go to a fresh buffer (the spare) until `unstage` puts them in order.
        let t = tx(&mut self.tx);
        t.room(len + MAX_HEADER_BYTES);
        let chunks = t.chunks.len();
        let out_start = std::mem::take(&mut t.out_start);
        let fresh = std::mem::take(&mut t.spare);
        let mut out = std::mem::replace(&mut t.out, fresh);
        let at = out.len();
        out.extend_from_slice(encode_header(true, 0, h.opcode, len as u64, None).as_bytes());
        let payload_at = out.len();
        let msg = if text {
            match extend_unmasked_text(&mut out, payload, mask) {
                Ok(t) => Ok(Message::Text(t)),
                Err(bytes) => simdutf8::basic::from_utf8(bytes).map(Message::Text),
            }
        } else {
            extend_unmasked(&mut out, payload, mask, 0);
            Ok(Message::Binary(&out[payload_at..]))
        };
        let Ok(msg) = msg else {
            let staged = Staged {
                out,
                at,
                chunks,
                out_start,
            };
            self.unstage(staged, false);
            self.fail(id, ProtocolError::InvalidUtf8, now_ms, app, regs);
            return Some(total);
        };

        let candidate = match msg {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
        };
        let mut outcome = with_sink(&mut self.tx, None, Some(candidate), |sink| {
            live.client_message(gear_index, id, msg, sink, regs)
        });
        // The echo stood (the gear's first send, nothing after it): it is the staged
        // frame, queued already.
        let echoed = outcome.echo.take().is_some();
        let staged = Staged {
            out,
            at,
            chunks,
            out_start,
        };
        self.unstage(staged, echoed);
        self.count_message(&outcome, regs);
        self.after_callback(id, outcome, now_ms, app, regs);
        Some(total)
    }

    /// Gives the lent output back: the staged frame stays if `echoed` and is dropped
    /// otherwise, and what the gear queued meanwhile follows it.
    #[inline]
    fn unstage(&mut self, staged: Staged, echoed: bool) {
        let Staged {
            mut out,
            at,
            chunks,
            out_start,
        } = staged;
        if !echoed {
            out.truncate(at);
        }
        let t = tx(&mut self.tx);
        let start = usize::from(out_start);
        if out.is_empty() {
            // Nothing was queued before and nothing stays: what the gear queued is
            // all the output.
            t.recycle(out);
        } else if t.chunks.len() > chunks {
            // The gear's sends filled chunks of their own: the lent output goes
            // before them.
            t.chunks.insert(chunks, Chunk { buf: out, start });
        } else if t.out.len() <= REPLY_COPY_MAX {
            // The usual case: nothing (an echo) or a short reply after the lent output.
            let fresh = std::mem::replace(&mut t.out, out);
            t.out.extend_from_slice(&fresh);
            t.out_start = out_start;
            t.recycle(fresh);
        } else {
            // A long reply: queued after the lent output rather than copied behind it.
            t.chunks.push(Chunk { buf: out, start });
        }
    }
}

/// The longest reply a gear queues during a staged message that is copied behind the
/// lent output rather than queued as a chunk of its own.
const REPLY_COPY_MAX: usize = 4 * 1024;
