//! Receive state that outlives one receive: the start of a frame whose rest has not
//! arrived (unmasked and UTF-8-checked piece by piece as it is appended), a fragmented
//! message in progress, and, during the handshake, the request so far.
//!
//! Separate because this is where a frame that straddles receives is copied, and its
//! byte-level bookkeeping (where the header ends, how far the payload is unmasked and
//! its text checked) is easier to check alone.

use super::Session;
use super::handshake::Handshaking;
use super::output::tx;
use crate::gear::App;
use crate::protocol::codec::{
    Decoded, DecoderConfig, MAX_HEADER_BYTES, OpCode, RSV1, parse_header,
};
use crate::protocol::decoder::Decoder;
use crate::protocol::mask::{extend_unmasked, unmask};
use crate::protocol::utf8::{ChunkedUtf8, Utf8State};

/// Receive state that outlives one receive.
pub(super) struct Partial {
    /// Its reassembler holds the fragments of a message in progress.
    pub(super) decoder: Decoder,
    /// The start of a frame whose rest has not arrived yet. Once the frame's header is
    /// whole in it, the payload bytes in it are unmasked already (and unmasked as they
    /// are appended). During the handshake: the request so far.
    pub(super) pending: Vec<u8>,
    /// Only during the handshake.
    pub(super) handshake: Option<Handshaking>,
    /// A text frame (or a continuation of a text message) whose payload is arriving:
    /// its UTF-8 so far, and how far into `pending` it was checked. A frame with
    /// invalid text is failed (1007) as soon as the bad byte arrives, not when the
    /// frame is whole.
    pub(super) text: Option<(ChunkedUtf8, usize)>,
}

impl Partial {
    /// Whether it still holds anything (else it is dropped).
    pub(super) fn holds_something(&mut self) -> bool {
        !self.pending.is_empty() || self.decoder.assembler_mut().in_progress()
    }
}

/// The frame at the start of a buffer, when its header is whole.
#[derive(Debug, Clone, Copy)]
pub(super) struct StartedFrame {
    mask: [u8; 4],
    /// Where the payload starts (the header's length).
    payload_start: usize,
    /// Where the frame ends.
    end: usize,
}

/// The header of the frame that starts `bytes`, if it is whole and masked (the decoder
/// has checked it already, or will when the frame is complete).
pub(super) fn started_frame(bytes: &[u8], cfg: &DecoderConfig) -> Option<StartedFrame> {
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
pub(super) fn unmask_started(buf: &mut [u8], cfg: &DecoderConfig) {
    if let Some(f) = started_frame(buf, cfg) {
        let to = buf.len().min(f.end);
        unmask(&mut buf[f.payload_start..to], f.mask, 0);
    }
}

impl Session {
    pub(super) fn take_partial(&mut self) -> Option<Box<Partial>> {
        self.tx.as_mut()?.partial.take()
    }

    pub(super) fn put_partial(&mut self, partial: Box<Partial>) {
        tx(&mut self.tx).partial = Some(partial);
    }

    /// Empty receive state, for a frame that continues in the next receive.
    pub(super) fn new_partial(&self, app: &App) -> Box<Partial> {
        Box::new(Partial {
            decoder: Decoder::new(self.decoder_config(app)),
            pending: Vec::new(),
            handshake: None,
            text: None,
        })
    }
}

/// Checks the UTF-8 of what arrived of the text frame in `pending` that is not whole
/// yet (a whole one is checked by the decoder); false once it cannot be valid.
pub(super) fn check_partial_text(partial: &mut Partial) -> bool {
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
pub(super) fn append_pending(partial: &mut Partial, data: &[u8]) -> Option<usize> {
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

/// Grows a pending-frame buffer once to the whole frame's size (`needed`, known from
/// its header) instead of doubling as the frame arrives; capped by the message limit.
pub(super) fn reserve_frame(buf: &mut Vec<u8>, needed: u64, app: &App) {
    let cap = app
        .limits()
        .max_message_bytes
        .saturating_add(MAX_HEADER_BYTES as u64);
    let want = usize::try_from(needed.min(cap)).unwrap_or(usize::MAX);
    if buf.capacity() < want {
        buf.reserve_exact(want.saturating_sub(buf.len()));
    }
}
