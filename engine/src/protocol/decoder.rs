//! One connection's receive side: frames decoded in place from the receive buffer,
//! checked as early as their header allows, and reassembled into messages.

use super::codec::{Decoded, DecoderConfig, OpCode, parse_header};
use super::error::ProtocolError;
use super::fragment::{Assembler, Event};
use super::mask::{unmask, unmask_ascii};

/// The result of one step over the receive buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// A frame was consumed (`usize` bytes from the start of the buffer) and amounted to
    /// this event.
    Event(Event<'a>, usize),
    /// The next frame is not all there: the buffer must hold at least `needed` bytes.
    /// Its header, when present, has already been checked.
    NeedMore {
        /// Total bytes needed from the start of the buffer.
        needed: u64,
    },
}

/// Decodes frames and reassembles messages for one connection.
#[derive(Debug)]
pub struct Decoder {
    cfg: DecoderConfig,
    assembler: Assembler,
}

impl Decoder {
    /// A decoder with this configuration.
    pub fn new(cfg: DecoderConfig) -> Decoder {
        Decoder {
            cfg,
            assembler: Assembler::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// The reassembler.
    pub fn assembler(&self) -> &Assembler {
        &self.assembler
    }

    /// The reassembler (to see whether a message is in progress, or release memory).
    pub fn assembler_mut(&mut self) -> &mut Assembler {
        &mut self.assembler
    }

    /// Decodes the frame at the start of `buf`, unmasking it in place. Returns the
    /// error whose close code answers the peer as soon as the header shows it (a frame
    /// over the size limit is refused before its payload arrives).
    #[inline]
    pub fn step<'a>(&'a mut self, buf: &'a mut [u8]) -> Result<Step<'a>, ProtocolError> {
        self.step_with(buf, false)
    }

    /// [`Decoder::step`], for a frame whose payload the caller has already unmasked
    /// (`payload_unmasked`): a frame that spanned several receives is unmasked piece by
    /// piece as it is gathered, and must not be unmasked a second time. Everything else
    /// (header checks, size limits, reassembly, UTF-8) is the same.
    #[inline]
    pub fn step_with<'a>(
        &'a mut self,
        buf: &'a mut [u8],
        payload_unmasked: bool,
    ) -> Result<Step<'a>, ProtocolError> {
        let header = match parse_header(buf, &self.cfg)? {
            Decoded::Complete(h, _) => h,
            Decoded::Incomplete { needed } => return Ok(Step::NeedMore { needed }),
        };
        self.assembler
            .check_header(&header, self.cfg.max_message_bytes)?;
        let total = header.frame_len();
        if (buf.len() as u64) < total {
            return Ok(Step::NeedMore { needed: total });
        }
        let total = total as usize;
        let payload = &mut buf[header.header_len..total];
        let (payload, ascii): (&[u8], _) = match (header.mask, payload_unmasked) {
            // A whole uncompressed text message: unmasked and checked for ASCII in one
            // pass; only other text goes through the UTF-8 validator.
            (Some(mask), false)
                if header.opcode == OpCode::Text && header.fin && header.rsv == 0 =>
            {
                match unmask_ascii(payload, mask) {
                    Ok(text) => (text.as_bytes(), Some(text)),
                    Err(bytes) => (bytes, None),
                }
            }
            (Some(mask), false) => {
                unmask(payload, mask, 0);
                (payload, None)
            }
            _ => (payload, None),
        };
        let event = self.assembler.push_checked(&header, payload, ascii)?;
        Ok(Step::Event(event, total))
    }
}
