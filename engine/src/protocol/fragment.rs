//! Reassembly of fragmented messages (RFC 6455 section 5.4), with control frames
//! allowed in between, the size limit over the whole message, and UTF-8 validated as
//! fragments arrive.
//!
//! An unfragmented data frame is never copied: its payload is handed on as it lies in
//! the receive buffer. Only fragmented messages are copied, into a buffer that exists
//! while the message is in progress.

use kythera_handler_api::Message;

use super::close::{ClosePayload, parse_close_payload};
use super::codec::{FrameHeader, OpCode, RSV1};
use super::error::ProtocolError;
use super::utf8::{StreamingUtf8, Utf8State};

/// What a frame amounted to.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete message, borrowed from the frame (unfragmented) or from the
    /// assembler's buffer (the last fragment).
    Message(Message<'a>),
    /// A complete compressed message (permessage-deflate: RSV1 on its first frame),
    /// as it arrived, borrowed like [`Event::Message`]; the receiver inflates it and
    /// checks text for UTF-8.
    Compressed {
        /// A binary message (else text).
        binary: bool,
        /// The compressed bytes, without the four-byte tail.
        payload: &'a [u8],
    },
    /// A fragment was buffered; nothing to deliver yet.
    Fragment,
    /// A ping, to be answered with a pong carrying the same payload.
    Ping(&'a [u8]),
    /// A pong.
    Pong(&'a [u8]),
    /// A valid close frame.
    Close(ClosePayload<'a>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Text,
    Binary,
}

/// Reassembles one connection's messages.
#[derive(Debug, Default)]
pub struct Assembler {
    /// The message in progress and its type; `None` between messages.
    kind: Option<Kind>,
    /// The message in progress is compressed (its UTF-8 is checked once inflated).
    compressed: bool,
    buf: Vec<u8>,
    utf8: StreamingUtf8,
    /// The last message was delivered from `buf`: clear it before the next frame.
    delivered: bool,
}

impl Assembler {
    /// Whether a fragmented message is in progress.
    pub fn in_progress(&self) -> bool {
        self.kind.is_some()
    }

    /// While an uncompressed text message is in progress: the bytes at the end of what
    /// arrived of it that begin a code point not finished yet (what a continuation frame
    /// must complete first).
    pub fn text_tail(&self) -> Option<&[u8]> {
        (self.kind == Some(Kind::Text) && !self.compressed && !self.delivered)
            .then(|| self.utf8.tail(&self.buf))
    }

    /// The fragmented message in progress, if any: whether it is binary, whether it is
    /// compressed, and its payload so far (as received: still compressed if it is).
    pub fn message_so_far(&self) -> Option<(bool, bool, &[u8])> {
        let kind = self.kind.filter(|_| !self.delivered)?;
        Some((kind == Kind::Binary, self.compressed, &self.buf))
    }

    /// Bytes held for the message in progress.
    pub fn buffered_len(&self) -> usize {
        if self.delivered { 0 } else { self.buf.len() }
    }

    /// Checks a header before its payload has arrived, so that a frame that breaks the
    /// continuation rules or would take the message over `max_message_bytes` is refused
    /// at once, not after it was received whole.
    pub fn check_header(
        &self,
        header: &FrameHeader,
        max_message_bytes: u64,
    ) -> Result<(), ProtocolError> {
        // RSV1 (allowed only once permessage-deflate is agreed) marks the first frame
        // of a compressed message; on a control frame or a continuation it is an
        // error (RFC 7692 section 6.1).
        if header.rsv & RSV1 != 0 && !matches!(header.opcode, OpCode::Text | OpCode::Binary) {
            return Err(ProtocolError::ReservedBits);
        }
        match header.opcode {
            OpCode::Continuation => {
                if self.kind.is_none() {
                    return Err(ProtocolError::UnexpectedContinuation);
                }
                if self.buffered_len() as u64 + header.payload_len > max_message_bytes {
                    return Err(ProtocolError::MessageTooBig);
                }
            }
            OpCode::Text | OpCode::Binary if self.kind.is_some() => {
                return Err(ProtocolError::ExpectedContinuation);
            }
            _ => {}
        }
        Ok(())
    }

    /// Feeds one whole frame (payload already unmasked) and says what it amounted to.
    pub fn push<'a>(
        &'a mut self,
        header: &FrameHeader,
        payload: &'a [u8],
        max_message_bytes: u64,
    ) -> Result<Event<'a>, ProtocolError> {
        self.check_header(header, max_message_bytes)?;
        self.push_checked(header, payload, None)
    }

    /// [`Assembler::push`] for a frame whose header [`Assembler::check_header`] has
    /// passed already; `ascii`: the payload as text, when the unmasking found it all
    /// ASCII ([`super::mask::unmask_ascii`]), so that a whole text frame needs no UTF-8
    /// pass.
    pub fn push_checked<'a>(
        &'a mut self,
        header: &FrameHeader,
        payload: &'a [u8],
        ascii: Option<&'a str>,
    ) -> Result<Event<'a>, ProtocolError> {
        debug_assert!(
            ascii.is_none_or(|t| std::ptr::eq(t.as_bytes(), payload)),
            "`ascii` is the payload itself"
        );
        if self.delivered {
            self.release();
        }
        match header.opcode {
            OpCode::Ping => Ok(Event::Ping(payload)),
            OpCode::Pong => Ok(Event::Pong(payload)),
            OpCode::Close => Ok(Event::Close(parse_close_payload(payload)?)),
            OpCode::Text | OpCode::Binary if header.fin && header.rsv & RSV1 != 0 => {
                Ok(Event::Compressed {
                    binary: header.opcode == OpCode::Binary,
                    payload,
                })
            }
            OpCode::Text if header.fin => match ascii {
                Some(text) => Ok(Event::Message(Message::Text(text))),
                None => simdutf8::basic::from_utf8(payload)
                    .map(|t| Event::Message(Message::Text(t)))
                    .map_err(|_| ProtocolError::InvalidUtf8),
            },
            OpCode::Binary if header.fin => Ok(Event::Message(Message::Binary(payload))),
            OpCode::Text | OpCode::Binary => {
                let kind = if header.opcode == OpCode::Text {
                    Kind::Text
                } else {
                    Kind::Binary
                };
                self.kind = Some(kind);
                self.compressed = header.rsv & RSV1 != 0;
                self.append(payload, false)?;
                Ok(Event::Fragment)
            }
            OpCode::Continuation => {
                self.append(payload, header.fin)?;
                if !header.fin {
                    return Ok(Event::Fragment);
                }
                let kind = self.kind.take();
                self.delivered = true;
                if std::mem::take(&mut self.compressed) {
                    return Ok(Event::Compressed {
                        binary: kind == Some(Kind::Binary),
                        payload: &self.buf,
                    });
                }
                match kind {
                    Some(Kind::Binary) => Ok(Event::Message(Message::Binary(&self.buf))),
                    // Validated as it streamed in; this second pass only turns the bytes
                    // into a &str without unsafe code (simdutf8 runs at several GB/s).
                    _ => simdutf8::basic::from_utf8(&self.buf)
                        .map(|t| Event::Message(Message::Text(t)))
                        .map_err(|_| ProtocolError::InvalidUtf8),
                }
            }
        }
    }

    fn append(&mut self, payload: &[u8], fin: bool) -> Result<(), ProtocolError> {
        self.buf.extend_from_slice(payload);
        if self.kind == Some(Kind::Text) && !self.compressed {
            match self.utf8.feed(&self.buf) {
                Utf8State::Invalid => return Err(ProtocolError::InvalidUtf8),
                Utf8State::Incomplete if fin => return Err(ProtocolError::InvalidUtf8),
                _ => {}
            }
        }
        Ok(())
    }

    /// Drops the reassembly buffer (after a delivered message, or when the connection
    /// goes idle), so an idle connection holds no reassembly memory.
    pub fn release(&mut self) {
        self.buf = Vec::new();
        self.utf8.reset();
        self.delivered = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(fin: bool, opcode: OpCode, len: usize) -> FrameHeader {
        FrameHeader {
            fin,
            rsv: 0,
            opcode,
            mask: None,
            payload_len: len as u64,
            header_len: 2,
        }
    }

    const MAX: u64 = 1000;

    #[test]
    fn unfragmented_is_borrowed() {
        let mut a = Assembler::default();
        let payload = b"hello".to_vec();
        match a.push(&h(true, OpCode::Text, 5), &payload, MAX).unwrap() {
            Event::Message(Message::Text(t)) => assert!(std::ptr::eq(t.as_ptr(), payload.as_ptr())),
            other => panic!("{other:?}"),
        }
        assert_eq!(a.buffered_len(), 0);
    }

    #[test]
    fn fragments_with_interleaved_ping() {
        let mut a = Assembler::default();
        assert_eq!(
            a.push(&h(false, OpCode::Text, 3), b"Hel", MAX).unwrap(),
            Event::Fragment
        );
        assert_eq!(
            a.push(&h(true, OpCode::Ping, 1), b"p", MAX).unwrap(),
            Event::Ping(b"p")
        );
        assert_eq!(
            a.push(&h(false, OpCode::Continuation, 1), b"l", MAX)
                .unwrap(),
            Event::Fragment
        );
        assert_eq!(
            a.push(&h(true, OpCode::Continuation, 1), b"o", MAX)
                .unwrap(),
            Event::Message(Message::Text("Hello"))
        );
        // Next message starts afresh.
        assert_eq!(
            a.push(&h(true, OpCode::Binary, 2), b"ab", MAX).unwrap(),
            Event::Message(Message::Binary(b"ab"))
        );
        assert_eq!(a.buffered_len(), 0);
    }

    #[test]
    fn continuation_rules() {
        let mut a = Assembler::default();
        assert_eq!(
            a.push(&h(true, OpCode::Continuation, 1), b"x", MAX),
            Err(ProtocolError::UnexpectedContinuation)
        );
        a.push(&h(false, OpCode::Binary, 1), b"x", MAX).unwrap();
        assert_eq!(
            a.push(&h(true, OpCode::Text, 1), b"x", MAX),
            Err(ProtocolError::ExpectedContinuation)
        );
    }

    #[test]
    fn reassembled_size_limit() {
        let mut a = Assembler::default();
        a.push(&h(false, OpCode::Binary, 600), &[0; 600], MAX)
            .unwrap();
        assert_eq!(
            a.check_header(&h(true, OpCode::Continuation, 401), MAX),
            Err(ProtocolError::MessageTooBig)
        );
        assert!(
            a.check_header(&h(true, OpCode::Continuation, 400), MAX)
                .is_ok()
        );
        assert_eq!(ProtocolError::MessageTooBig.close_code().get(), 1009);
    }

    #[test]
    fn utf8_fails_fast_across_fragments() {
        let mut a = Assembler::default();
        let text = "€uro".as_bytes(); // € is 3 bytes
        a.push(&h(false, OpCode::Text, 1), &text[..1], MAX).unwrap();
        a.push(&h(false, OpCode::Continuation, 1), &text[1..2], MAX)
            .unwrap();
        assert_eq!(
            a.push(&h(true, OpCode::Continuation, 4), &text[2..], MAX)
                .unwrap(),
            Event::Message(Message::Text("€uro"))
        );
        // Invalid byte in the middle of a message: refused at that fragment, not at FIN.
        a.push(&h(false, OpCode::Text, 2), b"ok", MAX).unwrap();
        let err = a.push(&h(false, OpCode::Continuation, 2), &[0xce, 0x28], MAX);
        assert_eq!(err, Err(ProtocolError::InvalidUtf8));
        assert_eq!(ProtocolError::InvalidUtf8.close_code().get(), 1007);
    }

    #[test]
    fn unfinished_code_point_at_fin_is_invalid() {
        let mut a = Assembler::default();
        a.push(&h(false, OpCode::Text, 1), &[0xe2], MAX).unwrap();
        assert_eq!(
            a.push(&h(true, OpCode::Continuation, 1), &[0x82], MAX),
            Err(ProtocolError::InvalidUtf8)
        );
        let mut a = Assembler::default();
        assert_eq!(
            a.push(&h(true, OpCode::Text, 2), &[0xe2, 0x82], MAX),
            Err(ProtocolError::InvalidUtf8)
        );
    }
}
