//! The frame codec and unmasking. The first input byte picks the mode:
//! - 0: raw bytes into `parse_header` and the payload's unmasking (`decode_frame`
//!   below), compared with a reference header parser written
//!   here; a decoded frame's header re-encodes to exactly the input's header bytes;
//! - 1: a frame built from arbitrary fields, encoded with `encode_frame_into`, decoded
//!   whole and cut at an arbitrary point (Incomplete, the specific error, or the
//!   original frame back);
//! - 2: `unmask` against `unmask_reference` at an arbitrary offset and alignment, in
//!   one piece and in two; `unmask_ascii` against the same, and its verdict against
//!   `is_ascii`.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use kythera_engine::protocol::codec::{
    Decoded, DecoderConfig, FrameHeader, MAX_HEADER_BYTES, OpCode, RSV1, Role,
    encode_frame_into, encode_frame_to_slice, encode_header, parse_header,
};
use kythera_engine::protocol::error::ProtocolError;
use kythera_engine::protocol::mask::{unmask, unmask_ascii, unmask_reference};
use libfuzzer_sys::fuzz_target;

/// A decoded frame: its header and its payload, unmasked in place.
#[derive(Debug, PartialEq, Eq)]
struct FrameRef<'a> {
    header: FrameHeader,
    payload: &'a mut [u8],
}

/// One frame from the start of `buf` as the engine's decoder reads it: `parse_header`,
/// then the payload unmasked in place once all of it is there.
fn decode_frame<'a>(
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

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => raw(rest),
        1 => {
            if let Ok(rt) = RoundTrip::arbitrary_take_rest(Unstructured::new(rest)) {
                round_trip(rt);
            }
        }
        _ => {
            if let Ok(m) = Unmask::arbitrary_take_rest(Unstructured::new(rest)) {
                unmask_case(m);
            }
        }
    }
});

/// Size limits worth testing: around the length encodings and the SPEC default.
const LIMITS: [u64; 10] = [
    0,
    1,
    125,
    126,
    65535,
    65536,
    5_000_000,
    u64::MAX >> 1,
    u64::MAX,
    300,
];

fn config(sel: u8) -> DecoderConfig {
    DecoderConfig {
        role: if sel & 0x80 != 0 {
            Role::Client
        } else {
            Role::Server
        },
        max_message_bytes: LIMITS[(sel & 0x0f) as usize % LIMITS.len()],
        allowed_rsv: (sel >> 4) & 0b111,
    }
}

// ---------------------------------------------------------------------------------
// (a) Raw bytes.

/// What RFC 6455 section 5.2 (and the engine's order of checks) says about `buf`.
#[derive(Debug, PartialEq, Eq)]
enum Expect {
    Incomplete(u64),
    Error(ProtocolError),
    Header {
        fin: bool,
        rsv: u8,
        opcode: OpCode,
        mask: Option<[u8; 4]>,
        payload_len: u64,
        header_len: usize,
    },
}

fn reference_header(buf: &[u8], cfg: &DecoderConfig) -> Expect {
    if buf.len() < 2 {
        return Expect::Incomplete(2);
    }
    let fin = buf[0] >> 7 == 1;
    let rsv = (buf[0] >> 4) & 7;
    let bits = buf[0] & 15;
    let opcode = match bits {
        0 => OpCode::Continuation,
        1 => OpCode::Text,
        2 => OpCode::Binary,
        8 => OpCode::Close,
        9 => OpCode::Ping,
        10 => OpCode::Pong,
        b => return Expect::Error(ProtocolError::UnknownOpcode(b)),
    };
    if rsv & !cfg.allowed_rsv != 0 {
        return Expect::Error(ProtocolError::ReservedBits);
    }
    let masked = buf[1] >> 7 == 1;
    if cfg.role == Role::Server && !masked {
        return Expect::Error(ProtocolError::UnmaskedFrame);
    }
    if cfg.role == Role::Client && masked {
        return Expect::Error(ProtocolError::MaskedFrame);
    }
    let len7 = u64::from(buf[1] & 127);
    let control = bits >= 8;
    if control && !fin {
        return Expect::Error(ProtocolError::FragmentedControlFrame);
    }
    if control && len7 > 125 {
        return Expect::Error(ProtocolError::ControlFrameTooLong);
    }
    let ext = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let header_len = 2 + ext + 4 * usize::from(masked);
    if buf.len() < header_len {
        return Expect::Incomplete(header_len as u64);
    }
    let payload_len = match ext {
        0 => len7,
        _ => buf[2..2 + ext]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b)),
    };
    if ext == 8 && payload_len >= 1 << 63 {
        return Expect::Error(ProtocolError::LengthOverflow);
    }
    if (ext == 2 && payload_len < 126) || (ext == 8 && payload_len < 65536) {
        return Expect::Error(ProtocolError::NonMinimalLength);
    }
    if payload_len > cfg.max_message_bytes {
        return Expect::Error(ProtocolError::MessageTooBig);
    }
    let mask = masked.then(|| {
        let m = &buf[2 + ext..6 + ext];
        [m[0], m[1], m[2], m[3]]
    });
    Expect::Header {
        fin,
        rsv,
        opcode,
        mask,
        payload_len,
        header_len,
    }
}

fn raw(data: &[u8]) {
    let Some((&sel, input)) = data.split_first() else {
        return;
    };
    let cfg = config(sel);
    let expect = reference_header(input, &cfg);

    // parse_header agrees with the reference.
    match (parse_header(input, &cfg), &expect) {
        (Ok(Decoded::Incomplete { needed }), Expect::Incomplete(n)) => assert_eq!(needed, *n),
        (Err(e), Expect::Error(want)) => assert_eq!(e, *want),
        (
            Ok(Decoded::Complete(h, used)),
            Expect::Header {
                fin,
                rsv,
                opcode,
                mask,
                payload_len,
                header_len,
            },
        ) => {
            assert_eq!(used, *header_len);
            assert_eq!(
                (h.fin, h.rsv, h.opcode, h.mask, h.payload_len, h.header_len),
                (*fin, *rsv, *opcode, *mask, *payload_len, *header_len)
            );
        }
        (got, want) => panic!("parse_header: {got:?}, reference: {want:?}"),
    }

    let mut buf = input.to_vec();
    let got = decode_frame(&mut buf, &cfg);
    match got {
        Ok(Decoded::Complete(frame, used)) => {
            let h = frame.header;
            let decoded = frame.payload.to_vec();
            let Expect::Header { payload_len, .. } = expect else {
                panic!("decoded {h:?}, reference: {expect:?}");
            };
            assert_eq!(h.payload_len, payload_len);
            assert_eq!(used as u64, h.header_len as u64 + h.payload_len);
            assert_eq!(decoded.len() as u64, h.payload_len);
            assert!(used <= input.len());
            // The header re-encodes to exactly the bytes it came from (lengths are
            // minimal, so there is one encoding).
            let again = encode_header(h.fin, h.rsv, h.opcode, h.payload_len, h.mask);
            assert_eq!(again.as_bytes(), &input[..h.header_len]);
            // The payload is the input's, unmasked byte by byte.
            let mut want = input[h.header_len..used].to_vec();
            if let Some(m) = h.mask {
                unmask_reference(&mut want, m, 0);
            }
            assert_eq!(decoded, want);
            assert_eq!(&buf[h.header_len..used], &want[..], "unmasked in place");
            // Nothing outside the frame was touched.
            assert_eq!(&buf[..h.header_len], &input[..h.header_len]);
            assert_eq!(&buf[used..], &input[used..]);
        }
        Ok(Decoded::Incomplete { needed }) => {
            assert!(needed > input.len() as u64, "needed {needed} of {}", input.len());
            match expect {
                Expect::Incomplete(n) => assert_eq!(needed, n),
                Expect::Header {
                    payload_len,
                    header_len,
                    ..
                } => assert_eq!(needed, header_len as u64 + payload_len),
                Expect::Error(e) => panic!("incomplete, reference: {e:?}"),
            }
            assert_eq!(buf, input, "bytes changed while incomplete");
        }
        Err(e) => {
            assert_eq!(expect, Expect::Error(e));
            assert_eq!(buf, input, "bytes changed on error");
            let code = e.close_code().get();
            let want = if e == ProtocolError::MessageTooBig {
                1009
            } else {
                1002
            };
            assert_eq!(code, want, "{e:?}");
        }
    }
}

// ---------------------------------------------------------------------------------
// (b) Structured round trip.

#[derive(Arbitrary, Debug)]
struct RoundTrip {
    opcode: u8,
    fin: bool,
    rsv: u8,
    cfg: u8,
    mask: Option<[u8; 4]>,
    payload: Vec<u8>,
    /// Stretch the payload (repeating it) to this length: reaches the 16- and 64-bit
    /// length encodings.
    stretch: Option<u32>,
    split: u32,
    /// Spare bytes after the frame in the slice that `encode_frame_to_slice` writes to
    /// (negative: too short by that much).
    slack: i8,
    /// Also send the length in a longer form than needed: 1 = 16-bit, 2 = 64-bit.
    long_form: u8,
}

fn round_trip(rt: RoundTrip) {
    let opcode = [
        OpCode::Continuation,
        OpCode::Text,
        OpCode::Binary,
        OpCode::Close,
        OpCode::Ping,
        OpCode::Pong,
    ][rt.opcode as usize % 6];
    let cfg = config(rt.cfg);
    let rsv = rt.rsv & 0b111;
    let mut payload = rt.payload;
    if let Some(n) = rt.stretch {
        // Near the edges of the length encodings, or anywhere up to 1 KiB.
        let near = |base: i64| (base + i64::from((n >> 3) % 9) - 4).max(0) as usize;
        let n = match n % 8 {
            0 => near(0),
            1 => near(125),
            2 => near(126),
            3 => near(65535),
            4 => near(65536),
            _ => (n >> 3) as usize % 1024,
        };
        let seed = if payload.is_empty() { vec![0x5a] } else { payload };
        payload = seed.iter().copied().cycle().take(n).collect();
    }
    let len = payload.len() as u64;

    let mut wire = Vec::new();
    encode_frame_into(&mut wire, rt.fin, rsv, opcode, &payload, rt.mask);
    let header_len = match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    } + if rt.mask.is_some() { 4 } else { 0 };
    assert_eq!(wire.len(), header_len + payload.len());
    // The header encodes the fields as RFC 6455 section 5.2 lays them out.
    assert_eq!(
        wire[0],
        (u8::from(rt.fin) << 7) | (rsv << 4) | opcode.bits()
    );
    assert_eq!(wire[1] >> 7, u8::from(rt.mask.is_some()));

    // Encoding into a slice writes the same frame, or nothing if it does not fit. Bytes
    // after the frame may be overwritten, but only within the header block's reach.
    let slack = i64::from(rt.slack % 32);
    let room = (wire.len() as i64 + slack).max(0) as usize;
    let mut dst = vec![0xeeu8; room];
    let n = encode_frame_to_slice(&mut dst, rt.fin, rsv, opcode, &payload, rt.mask);
    if room >= wire.len() {
        assert_eq!(n, Some(wire.len()));
        assert_eq!(&dst[..wire.len()], &wire[..]);
        let reach = MAX_HEADER_BYTES.max(wire.len()).min(room);
        assert!(dst[reach..].iter().all(|&b| b == 0xee), "wrote past the header block");
    } else {
        assert_eq!(n, None);
        assert!(dst.iter().all(|&b| b == 0xee), "wrote into a slice too short");
    }

    // What must come out, in the order the header reveals it: first two bytes, then
    // the whole header.
    let early: Option<ProtocolError> = if rsv & !cfg.allowed_rsv != 0 {
        Some(ProtocolError::ReservedBits)
    } else if cfg.role == Role::Server && rt.mask.is_none() {
        Some(ProtocolError::UnmaskedFrame)
    } else if cfg.role == Role::Client && rt.mask.is_some() {
        Some(ProtocolError::MaskedFrame)
    } else if opcode.is_control() && !rt.fin {
        Some(ProtocolError::FragmentedControlFrame)
    } else if opcode.is_control() && len > 125 {
        Some(ProtocolError::ControlFrameTooLong)
    } else {
        None
    };
    let late = (len > cfg.max_message_bytes).then_some(ProtocolError::MessageTooBig);

    // Whole.
    let mut buf = wire.clone();
    match (decode_frame(&mut buf, &cfg), early.or(late)) {
        (Err(e), Some(want)) => assert_eq!(e, want),
        (Ok(Decoded::Complete(frame, used)), None) => {
            assert_eq!(used, wire.len());
            let h = frame.header;
            assert_eq!(
                (h.fin, h.rsv, h.opcode, h.mask, h.payload_len, h.header_len),
                (rt.fin, rsv, opcode, rt.mask, len, header_len)
            );
            assert_eq!(&frame.payload[..], &payload[..]);
        }
        (got, want) => panic!("whole frame: {got:?}, expected error {want:?}"),
    }

    // Cut.
    let split = rt.split as usize % (wire.len() + 1);
    let mut part = wire[..split].to_vec();
    let got = decode_frame(&mut part, &cfg);
    let want: Result<Option<u64>, ProtocolError> = if split < 2 {
        Ok(Some(2))
    } else if let Some(e) = early {
        Err(e)
    } else if split < header_len {
        Ok(Some(header_len as u64))
    } else if let Some(e) = late {
        Err(e)
    } else if split < wire.len() {
        Ok(Some(wire.len() as u64))
    } else {
        Ok(None)
    };
    match (got, want) {
        (Ok(Decoded::Incomplete { needed }), Ok(Some(n))) => {
            assert_eq!(needed, n);
            assert!(needed > split as u64);
            assert_eq!(part, &wire[..split], "bytes changed while incomplete");
        }
        (Ok(Decoded::Complete(frame, used)), Ok(None)) => {
            assert_eq!(used, wire.len());
            assert_eq!(&frame.payload[..], &payload[..]);
        }
        (Err(e), Err(w)) => assert_eq!(e, w),
        (got, want) => panic!("cut at {split} of {}: {got:?}, expected {want:?}", wire.len()),
    }

    // The length in more bytes than needed: refused as soon as the header is whole,
    // unless the first two bytes already are an error (a control frame's 7-bit length
    // of 126 or 127 is ControlFrameTooLong).
    let form = rt.long_form % 3;
    let minimal_form = match len {
        0..=125 => 0,
        126..=65535 => 1,
        _ => 2,
    };
    if form > minimal_form {
        let mut nm = vec![wire[0], (wire[1] & 0x80) | if form == 1 { 126 } else { 127 }];
        if form == 1 {
            nm.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            nm.extend_from_slice(&len.to_be_bytes());
        }
        let nm_header = nm.len() + if rt.mask.is_some() { 4 } else { 0 };
        nm.extend_from_slice(&wire[header_len - if rt.mask.is_some() { 4 } else { 0 }..]);
        assert_eq!(nm.len(), nm_header + payload.len());
        let want = if opcode.is_control() && early.is_none() {
            ProtocolError::ControlFrameTooLong
        } else {
            early.unwrap_or(ProtocolError::NonMinimalLength)
        };
        let from_two = opcode.is_control() || early.is_some();
        for cut in [2, nm_header - 1, nm_header, nm.len()] {
            let mut part = nm[..cut].to_vec();
            match decode_frame(&mut part, &cfg) {
                Err(e) => assert_eq!(e, want, "cut {cut}"),
                Ok(Decoded::Incomplete { needed }) => {
                    assert!(!from_two && cut < nm_header, "cut {cut}: incomplete");
                    assert_eq!(needed, nm_header as u64);
                }
                Ok(other) => panic!("non-minimal length accepted: {other:?}"),
            }
        }
    }

    // The same frame with RSV1 allowed (as permessage-deflate would) still decodes.
    if rsv == RSV1 && early == Some(ProtocolError::ReservedBits) {
        let cfg = DecoderConfig {
            allowed_rsv: RSV1,
            ..cfg
        };
        let mut buf = wire.clone();
        assert_ne!(
            decode_frame(&mut buf, &cfg).err(),
            Some(ProtocolError::ReservedBits)
        );
    }
}

// ---------------------------------------------------------------------------------
// (c) Unmasking.

#[derive(Arbitrary, Debug)]
struct Unmask {
    payload: Vec<u8>,
    mask: [u8; 4],
    offset: u16,
    align: u8,
    split: u16,
}

fn unmask_case(m: Unmask) {
    let len = m.payload.len();
    let align = m.align as usize % 64;
    let offset = m.offset as usize;
    // The payload at some misalignment inside a larger buffer with guard bytes around.
    let mut backing = vec![0xa5u8; align + len + 64];
    backing[align..align + len].copy_from_slice(&m.payload);
    let mut want = m.payload.clone();
    unmask_reference(&mut want, m.mask, offset);
    unmask(&mut backing[align..align + len], m.mask, offset);
    assert_eq!(&backing[align..align + len], &want[..]);
    assert!(backing[..align].iter().all(|&b| b == 0xa5));
    assert!(backing[align + len..].iter().all(|&b| b == 0xa5));

    // In two pieces, the second continuing at its position in the payload.
    let split = m.split as usize % (len + 1);
    let mut pieces = m.payload.clone();
    let (a, b) = pieces.split_at_mut(split);
    unmask(a, m.mask, offset);
    unmask(b, m.mask, offset + split);
    assert_eq!(pieces, want);

    // Masking is an involution.
    unmask(&mut pieces, m.mask, offset);
    assert_eq!(pieces, m.payload);

    // unmask_ascii (offset 0, in place at the same misalignment): the same bytes, and
    // text exactly when every unmasked byte is ASCII.
    let mut want = m.payload.clone();
    unmask_reference(&mut want, m.mask, 0);
    let mut backing = vec![0xa5u8; align + len + 64];
    backing[align..align + len].copy_from_slice(&m.payload);
    match unmask_ascii(&mut backing[align..align + len], m.mask) {
        Ok(text) => {
            assert!(want.is_ascii());
            assert_eq!(text.as_bytes(), &want[..]);
        }
        Err(bytes) => {
            assert!(!want.is_ascii());
            assert_eq!(bytes, &want[..]);
        }
    }
    assert!(backing[..align].iter().all(|&b| b == 0xa5));
    assert!(backing[align + len..].iter().all(|&b| b == 0xa5));
}
