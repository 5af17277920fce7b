//! The frame codec (RFC 6455 section 5.2): decoding in place, encoding with a small
//! header buffer and a separate payload.

use super::error::ProtocolError;
use super::mask::unmask;

/// Frame opcodes that RFC 6455 defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    /// 0x0: continues a fragmented message.
    Continuation,
    /// 0x1: first frame of a text message.
    Text,
    /// 0x2: first frame of a binary message.
    Binary,
    /// 0x8: close.
    Close,
    /// 0x9: ping.
    Ping,
    /// 0xA: pong.
    Pong,
}

impl OpCode {
    /// The opcode for a 4-bit value, or the error RFC 6455 asks for.
    pub fn from_bits(bits: u8) -> Result<OpCode, ProtocolError> {
        Ok(match bits {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            other => return Err(ProtocolError::UnknownOpcode(other)),
        })
    }

    /// The 4-bit value.
    pub fn bits(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, ping and pong.
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// Which end of the connection this codec is: decides whether incoming frames must be
/// masked (server) or must not be (client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// kythera as a server: client frames must be masked.
    Server,
    /// kythera as a client (the load generator): server frames must not be masked.
    Client,
}

/// RSV1, the bit permessage-deflate uses.
pub const RSV1: u8 = 0b100;

/// What the decoder accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecoderConfig {
    /// Our role.
    pub role: Role,
    /// The largest payload of a frame, and of a reassembled message, in bytes.
    pub max_message_bytes: u64,
    /// RSV bits (as `0b100` = RSV1, `0b010`, `0b001`) that a negotiated extension allows.
    pub allowed_rsv: u8,
}

impl DecoderConfig {
    /// Server role, the SPEC's 5,000,000-byte limit, no extensions.
    pub const SERVER_DEFAULT: DecoderConfig = DecoderConfig {
        role: Role::Server,
        max_message_bytes: 5_000_000,
        allowed_rsv: 0,
    };
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// FIN: last frame of the message.
    pub fin: bool,
    /// The RSV bits, as `0b100` = RSV1 etc.
    pub rsv: u8,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key, if the frame is masked.
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes.
    pub payload_len: u64,
    /// Header length in bytes (2 to 14).
    pub header_len: usize,
}

impl FrameHeader {
    /// Header plus payload, in bytes.
    pub fn frame_len(&self) -> u64 {
        self.header_len as u64 + self.payload_len
    }
}

/// The outcome of parsing or decoding from a buffer that may hold a partial frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<T> {
    /// A whole item, and how many bytes of the buffer it used.
    Complete(T, usize),
    /// The buffer must hold at least this many bytes (from its start) to go on.
    Incomplete {
        /// Total bytes needed in the buffer.
        needed: u64,
    },
}

/// Parses a frame header and checks it against `cfg`: opcode, RSV bits, masking, control
/// frame rules, length encoding and the size limit. Nothing is copied. Inlined into
/// the decoder's step, so that the header is not returned through memory (measured with
/// callgrind: 30 instructions per frame; a plain `#[inline]` is not taken).
#[inline(always)]
pub fn parse_header(
    buf: &[u8],
    cfg: &DecoderConfig,
) -> Result<Decoded<FrameHeader>, ProtocolError> {
    if buf.len() < 2 {
        return Ok(Decoded::Incomplete { needed: 2 });
    }
    let b0 = buf[0];
    let b1 = buf[1];
    // The usual frame from a client first: final, text or binary, no RSV bits,
    // masked, its length in 7 or 16 bits. It agrees with the general path below (see
    // the test); callgrind at 100 x 512 B x 16: about 60 instructions per echo less.
    if cfg.role == Role::Server && (b0 == 0x81 || b0 == 0x82) && b1 >= 0x80 && b1 != 0xff {
        let header_len = if b1 == 0xfe { 8 } else { 6 };
        if buf.len() < header_len {
            return Ok(Decoded::Incomplete {
                needed: header_len as u64,
            });
        }
        let payload_len = if b1 == 0xfe {
            let n = u64::from(u16::from_be_bytes([buf[2], buf[3]]));
            if n < 126 {
                return Err(ProtocolError::NonMinimalLength);
            }
            n
        } else {
            u64::from(b1 & 0x7f)
        };
        if payload_len > cfg.max_message_bytes {
            return Err(ProtocolError::MessageTooBig);
        }
        let m = header_len - 4;
        let header = FrameHeader {
            fin: true,
            rsv: 0,
            opcode: if b0 == 0x81 {
                OpCode::Text
            } else {
                OpCode::Binary
            },
            mask: Some(<[u8; 4]>::try_from(&buf[m..header_len]).expect("4 bytes")),
            payload_len,
            header_len,
        };
        return Ok(Decoded::Complete(header, header_len));
    }
    parse_header_general(buf, cfg)
}

/// [`parse_header`] for every frame: what its fast path must agree with.
#[inline(always)]
fn parse_header_general(
    buf: &[u8],
    cfg: &DecoderConfig,
) -> Result<Decoded<FrameHeader>, ProtocolError> {
    let b0 = buf[0];
    let b1 = buf[1];
    let fin = b0 & 0x80 != 0;
    let rsv = (b0 >> 4) & 0b111;
    let opcode = OpCode::from_bits(b0 & 0x0f)?;
    if rsv & !cfg.allowed_rsv != 0 {
        return Err(ProtocolError::ReservedBits);
    }
    let masked = b1 & 0x80 != 0;
    match (cfg.role, masked) {
        (Role::Server, false) => return Err(ProtocolError::UnmaskedFrame),
        (Role::Client, true) => return Err(ProtocolError::MaskedFrame),
        _ => {}
    }
    let len7 = b1 & 0x7f;
    if opcode.is_control() {
        if !fin {
            return Err(ProtocolError::FragmentedControlFrame);
        }
        if len7 > 125 {
            return Err(ProtocolError::ControlFrameTooLong);
        }
    }
    let len_bytes = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let header_len = 2 + len_bytes + if masked { 4 } else { 0 };
    if buf.len() < header_len {
        return Ok(Decoded::Incomplete {
            needed: header_len as u64,
        });
    }
    let payload_len = match len_bytes {
        0 => u64::from(len7),
        2 => {
            let n = u64::from(u16::from_be_bytes([buf[2], buf[3]]));
            if n < 126 {
                return Err(ProtocolError::NonMinimalLength);
            }
            n
        }
        _ => {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(raw);
            if n >> 63 != 0 {
                return Err(ProtocolError::LengthOverflow);
            }
            if n <= u64::from(u16::MAX) {
                return Err(ProtocolError::NonMinimalLength);
            }
            n
        }
    };
    if payload_len > cfg.max_message_bytes {
        return Err(ProtocolError::MessageTooBig);
    }
    // One 4-byte read (`header_len` bytes are there, checked above).
    let mask = masked.then(|| {
        let m = 2 + len_bytes;
        <[u8; 4]>::try_from(&buf[m..m + 4]).expect("4 bytes")
    });
    Ok(Decoded::Complete(
        FrameHeader {
            fin,
            rsv,
            opcode,
            mask,
            payload_len,
            header_len,
        },
        header_len,
    ))
}

/// A decoded frame: its header and its payload, unmasked in place.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameRef<'a> {
    /// The header.
    pub header: FrameHeader,
    /// The payload, unmasked, borrowed from the input buffer.
    pub payload: &'a mut [u8],
}

/// Decodes one frame from the start of `buf`, unmasking its payload in place. Answers
/// `Incomplete { needed }` (without copying or unmasking anything) when the frame is
/// not all there yet.
pub fn decode_frame<'a>(
    buf: &'a mut [u8],
    cfg: &DecoderConfig,
) -> Result<Decoded<FrameRef<'a>>, ProtocolError> {
    let header = match parse_header(buf, cfg)? {
        Decoded::Complete(h, _) => h,
        Decoded::Incomplete { needed } => return Ok(Decoded::Incomplete { needed }),
    };
    let total = header.frame_len();
    if (buf.len() as u64) < total {
        return Ok(Decoded::Incomplete { needed: total });
    }
    let total = total as usize;
    let payload = &mut buf[header.header_len..total];
    if let Some(mask) = header.mask {
        unmask(payload, mask, 0);
    }
    Ok(Decoded::Complete(FrameRef { header, payload }, total))
}

/// The largest frame header: 2 bytes, 8 of extended length, 4 of mask.
pub const MAX_HEADER_BYTES: usize = 14;

/// The length of a header without a mask (as a server sends it) for a payload of
/// `payload_len` bytes: 2, or 4 with a 16-bit length, or 10 with a 64-bit one.
#[inline]
pub const fn unmasked_header_len(payload_len: u64) -> usize {
    if payload_len < 126 {
        2
    } else if payload_len <= u16::MAX as u64 {
        4
    } else {
        10
    }
}

/// A frame header encoded into a small stack buffer; the payload travels separately so
/// that a shared payload is never copied.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct EncodedHeader {
    bytes: [u8; MAX_HEADER_BYTES],
    len: u8,
}

impl std::fmt::Debug for EncodedHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EncodedHeader({:02x?})", self.as_bytes())
    }
}

impl EncodedHeader {
    /// The header bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

/// Encodes a frame header: FIN, RSV bits, opcode, length in the fewest bytes, and the
/// mask when given (client role). The caller masks the payload itself.
#[inline]
pub fn encode_header(
    fin: bool,
    rsv: u8,
    opcode: OpCode,
    payload_len: u64,
    mask: Option<[u8; 4]>,
) -> EncodedHeader {
    let mut bytes = [0u8; MAX_HEADER_BYTES];
    bytes[0] = (u8::from(fin) << 7) | ((rsv & 0b111) << 4) | opcode.bits();
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    let mut len = unmasked_header_len(payload_len);
    match len {
        2 => bytes[1] = mask_bit | payload_len as u8,
        4 => {
            bytes[1] = mask_bit | 126;
            bytes[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        }
        _ => {
            bytes[1] = mask_bit | 127;
            bytes[2..10].copy_from_slice(&payload_len.to_be_bytes());
        }
    }
    if let Some(m) = mask {
        bytes[len..len + 4].copy_from_slice(&m);
        len += 4;
    }
    EncodedHeader {
        bytes,
        len: len as u8,
    }
}

/// Writes a whole frame (header then payload) at the start of `dst`, masking the
/// payload when `mask` is given, and returns its length; `None` if `dst` is too short.
/// This is how a frame goes into a connection's pre-allocated send buffer. Bytes of
/// `dst` after the frame may be overwritten (the header is copied as one fixed-size
/// block).
#[inline]
pub fn encode_frame_to_slice(
    dst: &mut [u8],
    fin: bool,
    rsv: u8,
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> Option<usize> {
    let header = encode_header(fin, rsv, opcode, payload.len() as u64, mask);
    let head = header.len as usize;
    let total = head + payload.len();
    if dst.len() < total {
        return None;
    }
    match dst.get_mut(..MAX_HEADER_BYTES) {
        Some(block) => block.copy_from_slice(&header.bytes),
        None => dst[..head].copy_from_slice(header.as_bytes()),
    }
    dst[head..total].copy_from_slice(payload);
    if let Some(m) = mask {
        unmask(&mut dst[head..total], m, 0);
    }
    Some(total)
}

/// Encodes a gear's data frame as the server sends it (one unmasked frame, FIN set),
/// appending to `out`; a close frame is written with its status and reason. The
/// registry's `publish_frame` encodes through this once per publish.
pub fn encode_server_frame(frame: &kythera_handler_api::Frame, out: &mut Vec<u8>) {
    match frame {
        kythera_handler_api::Frame::Text(t) => {
            encode_frame_into(out, true, 0, OpCode::Text, t.as_bytes(), None)
        }
        kythera_handler_api::Frame::Binary(b) => {
            encode_frame_into(out, true, 0, OpCode::Binary, b, None)
        }
        kythera_handler_api::Frame::Close(close) => {
            let mut payload = [0u8; 125];
            let n = match close {
                Some(c) => crate::protocol::close::encode_close_payload(
                    Some(c.code),
                    c.reason.as_str(),
                    &mut payload,
                ),
                None => 0,
            };
            encode_frame_into(out, true, 0, OpCode::Close, &payload[..n], None);
        }
    }
}

/// Appends a whole frame (header then payload) to `out`; masks the copy when `mask` is
/// given. For payloads that should not be copied, use [`encode_header`] and send the
/// payload as a second buffer.
///
/// Always inlined: every call but the client's passes no mask and no RSV bits, and
/// with those constant the header is a few stores (callgrind, 100 x 512 B x 16: the
/// call cost 67 instructions per echo besides the copy).
#[inline(always)]
pub fn encode_frame_into(
    out: &mut Vec<u8>,
    fin: bool,
    rsv: u8,
    opcode: OpCode,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) {
    let header = encode_header(fin, rsv, opcode, payload.len() as u64, mask);
    out.reserve(MAX_HEADER_BYTES + payload.len());
    // Copy all 14 header bytes (a fixed-size copy, two moves) and cut back, rather
    // than a variable-length memcpy for 2 to 14 bytes.
    let at = out.len();
    out.extend_from_slice(&header.bytes);
    out.truncate(at + header.len as usize);
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(m) = mask {
        unmask(&mut out[start..], m, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast path of `parse_header` agrees with the general one on every first two
    /// bytes, with each length encoding, every buffer length up to a whole header and
    /// limits and RSV rules either side of the fast path's.
    #[test]
    fn parse_header_fast_path_agrees_with_the_general_path() {
        let tails: [&[u8]; 6] = [
            &[0, 5, 1, 2, 3, 4, 9, 9, 9, 9, 9, 9],
            &[0, 125, 1, 2, 3, 4, 9, 9, 9, 9, 9, 9],
            &[0, 126, 1, 2, 3, 4, 9, 9, 9, 9, 9, 9],
            &[0x01, 0x00, 1, 2, 3, 4, 9, 9, 9, 9, 9, 9],
            &[0, 0, 0, 0, 0, 1, 0, 0, 1, 2, 3, 4],
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4],
        ];
        let configs = [
            DecoderConfig {
                role: Role::Server,
                max_message_bytes: 1 << 20,
                allowed_rsv: 0,
            },
            DecoderConfig {
                role: Role::Server,
                max_message_bytes: 200,
                allowed_rsv: RSV1,
            },
            DecoderConfig {
                role: Role::Server,
                max_message_bytes: 10,
                allowed_rsv: 0,
            },
            DecoderConfig {
                role: Role::Client,
                max_message_bytes: 1 << 20,
                allowed_rsv: 0,
            },
        ];
        let mut fast = 0;
        for b0 in 0..=255u8 {
            for b1 in 0..=255u8 {
                for tail in tails {
                    let mut whole = vec![b0, b1];
                    whole.extend_from_slice(tail);
                    for len in 2..=whole.len() {
                        for cfg in &configs {
                            let buf = &whole[..len];
                            let general = parse_header_general(buf, cfg);
                            assert_eq!(parse_header(buf, cfg), general, "{buf:02x?} {cfg:?}");
                            fast += usize::from(
                                cfg.role == Role::Server
                                    && (b0 == 0x81 || b0 == 0x82)
                                    && (0x80..0xff).contains(&b1)
                                    && matches!(general, Ok(Decoded::Complete(..))),
                            );
                        }
                    }
                }
            }
        }
        assert!(fast > 1000, "the fast path was taken {fast} times");
    }

    const CLIENT: DecoderConfig = DecoderConfig {
        role: Role::Client,
        max_message_bytes: u64::MAX >> 1,
        allowed_rsv: 0,
    };

    fn decode_one(bytes: &[u8], cfg: &DecoderConfig) -> (FrameHeader, Vec<u8>) {
        let mut buf = bytes.to_vec();
        match decode_frame(&mut buf, cfg).unwrap() {
            Decoded::Complete(f, used) => {
                assert_eq!(used, bytes.len());
                (f.header, f.payload.to_vec())
            }
            other => panic!("{other:?}"),
        }
    }

    // RFC 6455 section 5.7, every example.
    #[test]
    fn rfc_5_7_single_frame_unmasked_text() {
        let (h, p) = decode_one(&[0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f], &CLIENT);
        assert!(h.fin);
        assert_eq!(h.opcode, OpCode::Text);
        assert_eq!(p, b"Hello");
        assert_eq!(
            encode_header(true, 0, OpCode::Text, 5, None).as_bytes(),
            &[0x81, 0x05]
        );
    }

    #[test]
    fn rfc_5_7_single_frame_masked_text() {
        let wire = [
            0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let (h, p) = decode_one(&wire, &DecoderConfig::SERVER_DEFAULT);
        assert_eq!(h.mask, Some([0x37, 0xfa, 0x21, 0x3d]));
        assert_eq!(p, b"Hello");
        let mut out = Vec::new();
        encode_frame_into(
            &mut out,
            true,
            0,
            OpCode::Text,
            b"Hello",
            Some([0x37, 0xfa, 0x21, 0x3d]),
        );
        assert_eq!(out, wire);
    }

    #[test]
    fn rfc_5_7_fragmented_unmasked_text() {
        let (h1, p1) = decode_one(&[0x01, 0x03, 0x48, 0x65, 0x6c], &CLIENT);
        let (h2, p2) = decode_one(&[0x80, 0x02, 0x6c, 0x6f], &CLIENT);
        assert!(!h1.fin && h1.opcode == OpCode::Text);
        assert!(h2.fin && h2.opcode == OpCode::Continuation);
        assert_eq!([p1, p2].concat(), b"Hello");
    }

    #[test]
    fn rfc_5_7_ping_and_pong() {
        let (h, p) = decode_one(&[0x89, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f], &CLIENT);
        assert_eq!((h.opcode, p.as_slice()), (OpCode::Ping, &b"Hello"[..]));
        let wire = [
            0x8a, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
        ];
        let (h, p) = decode_one(&wire, &DecoderConfig::SERVER_DEFAULT);
        assert_eq!((h.opcode, p.as_slice()), (OpCode::Pong, &b"Hello"[..]));
    }

    #[test]
    fn rfc_5_7_binary_256_and_64k() {
        let mut wire = vec![0x82, 0x7e, 0x01, 0x00];
        wire.extend(std::iter::repeat_n(0xab, 256));
        let (h, p) = decode_one(&wire, &CLIENT);
        assert_eq!((h.payload_len, p.len()), (256, 256));
        assert_eq!(
            encode_header(true, 0, OpCode::Binary, 256, None).as_bytes(),
            &wire[..4]
        );
        let mut wire = vec![0x82, 0x7f, 0, 0, 0, 0, 0, 1, 0, 0];
        wire.extend(std::iter::repeat_n(0xcd, 65536));
        let (h, p) = decode_one(&wire, &CLIENT);
        assert_eq!((h.payload_len, p.len()), (65536, 65536));
        assert_eq!(
            encode_header(true, 0, OpCode::Binary, 65536, None).as_bytes(),
            &wire[..10]
        );
    }

    #[test]
    fn incomplete_says_how_much() {
        let cfg = DecoderConfig::SERVER_DEFAULT;
        let mut wire = Vec::new();
        encode_frame_into(
            &mut wire,
            true,
            0,
            OpCode::Binary,
            &[7; 300],
            Some([1, 2, 3, 4]),
        );
        assert_eq!(
            decode_frame(&mut wire[..1].to_vec(), &cfg).unwrap(),
            Decoded::Incomplete { needed: 2 }
        );
        assert_eq!(
            decode_frame(&mut wire[..3].to_vec(), &cfg).unwrap(),
            Decoded::Incomplete { needed: 8 }
        );
        assert_eq!(
            decode_frame(&mut wire[..100].to_vec(), &cfg).unwrap(),
            Decoded::Incomplete { needed: 308 }
        );
        // Nothing was unmasked while incomplete: the bytes are as sent.
        let mut partial = wire[..100].to_vec();
        let _ = decode_frame(&mut partial, &cfg).unwrap();
        assert_eq!(partial, wire[..100]);
    }

    fn err(bytes: &[u8], cfg: &DecoderConfig) -> ProtocolError {
        decode_frame(&mut bytes.to_vec(), cfg).unwrap_err()
    }

    #[test]
    fn header_errors_and_their_close_codes() {
        let s = DecoderConfig::SERVER_DEFAULT;
        let m = [0x80u8, 1, 2, 3, 4];
        let cases: &[(&[u8], ProtocolError, u16)] = &[
            (&[0x81, 0x00], ProtocolError::UnmaskedFrame, 1002),
            (&[0xc1, m[0], 1, 2, 3, 4], ProtocolError::ReservedBits, 1002),
            (&[0x91, m[0], 1, 2, 3, 4], ProtocolError::ReservedBits, 1002),
            (
                &[0x83, m[0], 1, 2, 3, 4],
                ProtocolError::UnknownOpcode(3),
                1002,
            ),
            (
                &[0x8b, m[0], 1, 2, 3, 4],
                ProtocolError::UnknownOpcode(0xb),
                1002,
            ),
            (
                &[0x09, m[0], 1, 2, 3, 4],
                ProtocolError::FragmentedControlFrame,
                1002,
            ),
            (
                &[0x89, 0x80 | 126, 0, 126, 1, 2, 3, 4],
                ProtocolError::ControlFrameTooLong,
                1002,
            ),
            (
                &[0x82, 0x80 | 126, 0, 5, 1, 2, 3, 4],
                ProtocolError::NonMinimalLength,
                1002,
            ),
            (
                &[0x82, 0x80 | 127, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 1, 2, 3, 4],
                ProtocolError::NonMinimalLength,
                1002,
            ),
            (
                &[0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4],
                ProtocolError::LengthOverflow,
                1002,
            ),
            (
                &[0x82, 0x80 | 127, 0, 0, 0, 0, 0x10, 0, 0, 0, 1, 2, 3, 4],
                ProtocolError::MessageTooBig,
                1009,
            ),
        ];
        for (wire, want, code) in cases {
            let got = err(wire, &s);
            assert_eq!(got, *want, "{wire:02x?}");
            assert_eq!(got.close_code().get(), *code, "{wire:02x?}");
        }
        assert_eq!(
            err(&[0x81, 0x80, 1, 2, 3, 4], &CLIENT),
            ProtocolError::MaskedFrame
        );
    }

    #[test]
    fn slice_encoding_equals_vec_encoding() {
        for len in [0usize, 1, 12, 13, 125, 126, 65_535, 65_536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut want = Vec::new();
                encode_frame_into(&mut want, true, 0, OpCode::Binary, &payload, mask);
                let mut dst = vec![0xee; want.len() + 20];
                let n = encode_frame_to_slice(&mut dst, true, 0, OpCode::Binary, &payload, mask);
                assert_eq!(n, Some(want.len()));
                assert_eq!(&dst[..want.len()], &want[..]);
                let mut exact = vec![0; want.len()];
                assert!(
                    encode_frame_to_slice(&mut exact, true, 0, OpCode::Binary, &payload, mask)
                        .is_some()
                );
                assert_eq!(exact, want);
                let mut short = vec![0; want.len() - 1];
                assert_eq!(
                    encode_frame_to_slice(&mut short, true, 0, OpCode::Binary, &payload, mask),
                    None
                );
            }
        }
    }

    #[test]
    fn size_limit_is_inclusive() {
        let cfg = DecoderConfig {
            max_message_bytes: 300,
            ..DecoderConfig::SERVER_DEFAULT
        };
        let mut ok = Vec::new();
        encode_frame_into(
            &mut ok,
            true,
            0,
            OpCode::Binary,
            &[1; 300],
            Some([1, 1, 1, 1]),
        );
        assert!(matches!(
            decode_frame(&mut ok, &cfg),
            Ok(Decoded::Complete(..))
        ));
        let mut big = Vec::new();
        encode_frame_into(
            &mut big,
            true,
            0,
            OpCode::Binary,
            &[1; 301],
            Some([1, 1, 1, 1]),
        );
        // Rejected from the header alone, before the payload arrives.
        assert_eq!(
            decode_frame(&mut big[..8], &cfg).unwrap_err(),
            ProtocolError::MessageTooBig
        );
    }

    #[test]
    fn rsv1_allowed_when_negotiated() {
        let cfg = DecoderConfig {
            allowed_rsv: RSV1,
            ..DecoderConfig::SERVER_DEFAULT
        };
        let mut wire = Vec::new();
        encode_frame_into(&mut wire, true, RSV1, OpCode::Text, b"x", Some([0; 4]));
        match decode_frame(&mut wire, &cfg).unwrap() {
            Decoded::Complete(f, _) => assert_eq!(f.header.rsv, RSV1),
            other => panic!("{other:?}"),
        }
    }
}
