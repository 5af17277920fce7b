//! A connection's receive side, `Decoder::step`, against a reference model.
//!
//! An arbitrary sequence of frames (well-formed fragmented messages with control frames
//! in between, and free-form frames that may break any rule) is encoded masked,
//! delivered to the decoder in arbitrary chunks, and every step is compared with a
//! straightforward reassembler written here: the same events in the same order, or the
//! same `ProtocolError` (hence close code) at the same frame, reported as soon as the
//! bytes that reveal it have arrived and not before.

#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use kythera_engine::protocol::codec::{DecoderConfig, OpCode, Role, encode_frame_into};
use kythera_engine::protocol::decoder::{Decoder, Step};
use kythera_engine::protocol::error::ProtocolError;
use kythera_engine::protocol::fragment::Event;
use kythera_engine::protocol::mask::unmask_reference;
use kythera_handler_api::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(input);
    }
});

const LIMITS: [u64; 12] = [
    5_000_000, 0, 1, 2, 7, 64, 125, 126, 300, 1000, 65535, 65536,
];
const MAX_FRAMES: usize = 256;
const MAX_BYTES: usize = 200_000;

#[derive(Arbitrary, Debug)]
struct Input {
    limit: u8,
    /// Sizes of the reads the bytes arrive in, cycled (0: all the rest at once).
    chunks: Vec<u16>,
    items: Vec<Item>,
}

#[derive(Arbitrary, Debug)]
enum Item {
    /// One frame, as given.
    Frame(RawFrame),
    /// A message cut into fragments at these byte positions (none: one frame), with
    /// control frames after some fragments.
    Message {
        binary: bool,
        body: Body,
        cuts: Vec<u16>,
        /// Overwrite one byte of the body (to break its UTF-8 somewhere).
        corrupt: Option<(u16, u8)>,
        controls: Vec<(u8, Control)>,
    },
}

#[derive(Arbitrary, Debug)]
enum Body {
    Str(String),
    Bytes(Vec<u8>),
    /// A run of one byte (reaches the 16- and 64-bit lengths, and the size limits).
    Repeat(u8, u16, bool),
    /// A close payload: code then reason.
    Close(u16, String),
}

impl Body {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Body::Str(s) => s.as_bytes().to_vec(),
            Body::Bytes(b) => b.clone(),
            Body::Repeat(b, n, long) => {
                let n = *n as usize + if *long { 65_000 } else { 0 };
                vec![*b; n]
            }
            Body::Close(code, reason) => {
                let mut v = code.to_be_bytes().to_vec();
                v.extend_from_slice(reason.as_bytes());
                v
            }
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Control {
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Body),
}

#[derive(Arbitrary, Debug)]
struct RawFrame {
    op: Op,
    fin: bool,
    body: Body,
    mask: [u8; 4],
    oddity: Option<Oddity>,
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Op {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl Op {
    fn code(self) -> OpCode {
        match self {
            Op::Continuation => OpCode::Continuation,
            Op::Text => OpCode::Text,
            Op::Binary => OpCode::Binary,
            Op::Close => OpCode::Close,
            Op::Ping => OpCode::Ping,
            Op::Pong => OpCode::Pong,
        }
    }
}

/// Ways a frame can break RFC 6455 section 5.2 beyond its opcode, FIN and payload.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Oddity {
    /// RSV bits (none negotiated).
    Rsv(u8),
    /// No mask on a client frame.
    Unmasked,
    /// The length in more bytes than needed.
    NonMinimal,
    /// A raw opcode nibble (3-7 and 11-15 are unknown).
    Opcode(u8),
}

/// A frame as it goes on the wire.
#[derive(Debug)]
struct Frame {
    bits: u8,
    fin: bool,
    rsv: u8,
    masked: bool,
    mask: [u8; 4],
    nonminimal: bool,
    payload: Vec<u8>,
}

impl Frame {
    fn new(op: OpCode, fin: bool, payload: Vec<u8>, mask: [u8; 4]) -> Frame {
        Frame {
            bits: op.bits(),
            fin,
            rsv: 0,
            masked: true,
            mask,
            nonminimal: false,
            payload,
        }
    }

    fn ext_len(&self) -> usize {
        let len = self.payload.len();
        match (len, self.nonminimal) {
            (0..=125, false) => 0,
            (0..=125, true) | (126..=65535, false) => 2,
            _ => 8,
        }
    }

    fn header_len(&self) -> usize {
        2 + self.ext_len() + if self.masked { 4 } else { 0 }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let len = self.payload.len();
        out.push((u8::from(self.fin) << 7) | (self.rsv << 4) | self.bits);
        let m = if self.masked { 0x80 } else { 0 };
        match self.ext_len() {
            0 => out.push(m | len as u8),
            2 => {
                out.push(m | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(m | 127);
                out.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if self.masked {
            out.extend_from_slice(&self.mask);
        }
        let p = out.len();
        out.extend_from_slice(&self.payload);
        if self.masked {
            unmask_reference(&mut out[p..], self.mask, 0);
        }
        // A well-formed frame: the engine's encoder writes the very same bytes.
        if let (Ok(op), 0, false, true) = (
            OpCode::from_bits(self.bits),
            self.rsv,
            self.nonminimal,
            self.masked,
        ) {
            let mut theirs = Vec::new();
            encode_frame_into(&mut theirs, self.fin, 0, op, &self.payload, Some(self.mask));
            assert_eq!(theirs, out[start..]);
        }
    }
}

fn expand(items: Vec<Item>) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut bytes = 0usize;
    let mut push = |frames: &mut Vec<Frame>, f: Frame| {
        bytes += f.payload.len();
        if frames.len() < MAX_FRAMES && bytes <= MAX_BYTES {
            frames.push(f);
            true
        } else {
            false
        }
    };
    for item in items {
        match item {
            Item::Frame(r) => {
                let mut f = Frame::new(r.op.code(), r.fin, r.body.bytes(), r.mask);
                match r.oddity {
                    None => {}
                    Some(Oddity::Rsv(b)) => f.rsv = (b & 7).max(1),
                    Some(Oddity::Unmasked) => f.masked = false,
                    Some(Oddity::NonMinimal) => f.nonminimal = f.payload.len() <= 65535,
                    Some(Oddity::Opcode(b)) => f.bits = b & 15,
                }
                if !push(&mut frames, f) {
                    break;
                }
            }
            Item::Message {
                binary,
                body,
                cuts,
                corrupt,
                controls,
            } => {
                let mut body = body.bytes();
                if let (Some((at, b)), false) = (corrupt, body.is_empty()) {
                    let at = at as usize % body.len();
                    body[at] = b;
                }
                let mut cuts: Vec<usize> = cuts
                    .iter()
                    .take(16)
                    .map(|&c| c as usize % (body.len() + 1))
                    .collect();
                cuts.sort_unstable();
                let mut bounds = vec![0];
                bounds.extend(cuts);
                bounds.push(body.len());
                let n = bounds.len() - 1;
                let mut out = Vec::new();
                for k in 0..n {
                    let op = match (k, binary) {
                        (0, true) => OpCode::Binary,
                        (0, false) => OpCode::Text,
                        _ => OpCode::Continuation,
                    };
                    let payload = body[bounds[k]..bounds[k + 1]].to_vec();
                    let mask = [k as u8, 0x5a, 0xc3, bounds[k] as u8];
                    out.push(Frame::new(op, k == n - 1, payload, mask));
                    for (at, c) in controls.iter().take(8) {
                        if *at as usize % n == k {
                            let (op, p) = match c {
                                Control::Ping(p) => (OpCode::Ping, p.clone()),
                                Control::Pong(p) => (OpCode::Pong, p.clone()),
                                Control::Close(b) => (OpCode::Close, b.bytes()),
                            };
                            out.push(Frame::new(op, true, p, [1, 2, 3, *at]));
                        }
                    }
                }
                let mut full = false;
                for f in out {
                    if !push(&mut frames, f) {
                        full = true;
                        break;
                    }
                }
                if full {
                    break;
                }
            }
        }
    }
    frames
}

// ---------------------------------------------------------------------------------
// The reference model.

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Text(String),
    Binary(Vec<u8>),
    Fragment,
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

/// What the decoder must say about a frame: an event, or an error that the first
/// `at` bytes of the frame already reveal (and fewer do not).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Event(Ev),
    Error(ProtocolError, usize),
}

#[derive(Debug, Default)]
struct Model {
    /// The fragmented message in progress: text or not, and its bytes so far.
    message: Option<(bool, Vec<u8>)>,
}

impl Model {
    fn frame(&mut self, f: &Frame, max: u64) -> Expect {
        use ProtocolError as E;
        let len = f.payload.len();
        let hl = f.header_len();
        let fl = hl + len;
        let control = f.bits >= 8;
        // Visible in the first two bytes.
        if !matches!(f.bits, 0 | 1 | 2 | 8 | 9 | 10) {
            return Expect::Error(E::UnknownOpcode(f.bits), 2);
        }
        if f.rsv != 0 {
            return Expect::Error(E::ReservedBits, 2);
        }
        if !f.masked {
            return Expect::Error(E::UnmaskedFrame, 2);
        }
        if control && !f.fin {
            return Expect::Error(E::FragmentedControlFrame, 2);
        }
        if control && (len > 125 || f.nonminimal) {
            return Expect::Error(E::ControlFrameTooLong, 2);
        }
        // Visible once the header is whole.
        if f.nonminimal {
            return Expect::Error(E::NonMinimalLength, hl);
        }
        if len as u64 > max {
            return Expect::Error(E::MessageTooBig, hl);
        }
        match (f.bits, &self.message) {
            (0, None) => return Expect::Error(E::UnexpectedContinuation, hl),
            (0, Some((_, buf))) if (buf.len() + len) as u64 > max => {
                return Expect::Error(E::MessageTooBig, hl);
            }
            (1 | 2, Some(_)) => return Expect::Error(E::ExpectedContinuation, hl),
            _ => {}
        }
        // Visible once the payload is whole.
        let p = &f.payload;
        let ev = match f.bits {
            9 => Ev::Ping(p.clone()),
            10 => Ev::Pong(p.clone()),
            8 => match p.len() {
                0 => Ev::Close(None, String::new()),
                1 => return Expect::Error(E::CloseFrameTooShort, fl),
                _ => {
                    let code = u16::from_be_bytes([p[0], p[1]]);
                    // RFC 6455 section 7.4 and the IANA registry.
                    if !matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999) {
                        return Expect::Error(E::InvalidCloseCode(code), fl);
                    }
                    match std::str::from_utf8(&p[2..]) {
                        Ok(r) => Ev::Close(Some(code), r.to_owned()),
                        Err(_) => return Expect::Error(E::InvalidCloseReason, fl),
                    }
                }
            },
            1 if f.fin => match std::str::from_utf8(p) {
                Ok(t) => Ev::Text(t.to_owned()),
                Err(_) => return Expect::Error(E::InvalidUtf8, fl),
            },
            2 if f.fin => Ev::Binary(p.clone()),
            _ => {
                // A first fragment or a continuation.
                let (text, mut buf) = self.message.take().unwrap_or((f.bits == 1, Vec::new()));
                buf.extend_from_slice(p);
                if text {
                    match std::str::from_utf8(&buf) {
                        Ok(_) => {}
                        // No continuation can make these bytes UTF-8: fail now.
                        Err(e) if e.error_len().is_some() => {
                            return Expect::Error(E::InvalidUtf8, fl);
                        }
                        // Ends inside a code point: fine unless the message ends here.
                        Err(_) if f.fin => return Expect::Error(E::InvalidUtf8, fl),
                        Err(_) => {}
                    }
                }
                if !f.fin {
                    self.message = Some((text, buf));
                    Ev::Fragment
                } else if text {
                    Ev::Text(String::from_utf8(buf).unwrap())
                } else {
                    Ev::Binary(buf)
                }
            }
        };
        Expect::Event(ev)
    }

    fn buffered(&self) -> usize {
        self.message.as_ref().map_or(0, |(_, b)| b.len())
    }
}

// ---------------------------------------------------------------------------------

fn run(input: Input) {
    let max = LIMITS[input.limit as usize % LIMITS.len()];
    let frames = expand(input.items);
    let mut wire = Vec::new();
    let mut starts = Vec::new();
    for f in &frames {
        starts.push(wire.len());
        f.encode(&mut wire);
        assert_eq!(wire.len() - starts.last().unwrap(), f.header_len() + f.payload.len());
    }
    let min_chunk = wire.len() / 512;
    let mut chunks = input.chunks.iter().cycle().map(|&c| {
        if c == 0 {
            usize::MAX
        } else {
            (c as usize).max(min_chunk)
        }
    });

    let mut decoder = Decoder::new(DecoderConfig {
        role: Role::Server,
        max_message_bytes: max,
        allowed_rsv: 0,
    });
    let mut model = Model::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut delivered = 0usize; // bytes of `wire` handed to the decoder so far
    let mut consumed = 0usize; // bytes of `wire` the decoder has consumed
    let mut i = 0usize; // the frame at the start of `pending`
    let mut expect: Option<Expect> = None;

    let mut failed = false;
    'reads: while delivered < wire.len() {
        let n = chunks.next().unwrap_or(usize::MAX).min(wire.len() - delivered);
        pending.extend_from_slice(&wire[delivered..delivered + n]);
        delivered += n;
        loop {
            if i == frames.len() {
                assert!(pending.is_empty());
                break;
            }
            let f = &frames[i];
            let hl = f.header_len();
            let fl = hl + f.payload.len();
            let b = pending.len();
            let exp = expect.get_or_insert_with(|| model.frame(f, max)).clone();
            let range = pending.as_ptr_range();
            match decoder.step(&mut pending) {
                Err(e) => {
                    let Expect::Error(want, at) = exp else {
                        panic!("frame {i} of {}: {e:?}, expected {exp:?}; {f:?}", frames.len())
                    };
                    assert_eq!(e, want, "frame {i} of {}: {f:?}", frames.len());
                    assert!(b >= at, "{e:?} after {b} bytes, but it needs {at} to be known");
                    assert_eq!(e.close_code().get(), close_code_of(e));
                    failed = true;
                    break 'reads;
                }
                Ok(Step::NeedMore { needed }) => {
                    assert!(needed > b as u64);
                    let want = if b < 2 {
                        2
                    } else if b < hl {
                        hl
                    } else {
                        fl
                    };
                    assert_eq!(needed, want as u64, "frame {i}: {f:?}");
                    match exp {
                        Expect::Error(e, at) => {
                            assert!(b < at, "{e:?} known after {at} bytes, not said at {b}")
                        }
                        Expect::Event(_) => assert!(b < fl),
                    }
                    // Nothing was unmasked or moved.
                    if b <= 64 {
                        assert_eq!(pending, wire[consumed..consumed + b]);
                    }
                    break;
                }
                Ok(Step::Event(ev, used)) => {
                    assert_eq!(used, fl, "frame {i}");
                    let got = match ev {
                        Event::Message(Message::Text(t)) => {
                            if f.bits == 1 {
                                // Unfragmented: borrowed from the receive buffer.
                                assert!(range.contains(&t.as_ptr()) || t.is_empty());
                            }
                            Ev::Text(t.to_owned())
                        }
                        Event::Message(Message::Binary(d)) => {
                            if f.bits == 2 {
                                assert!(range.contains(&d.as_ptr()) || d.is_empty());
                            }
                            Ev::Binary(d.to_vec())
                        }
                        Event::Fragment => Ev::Fragment,
                        Event::Ping(p) => Ev::Ping(p.to_vec()),
                        Event::Pong(p) => Ev::Pong(p.to_vec()),
                        Event::Close(c) => {
                            Ev::Close(c.code.map(|c| c.get()), c.reason.to_owned())
                        }
                        // RSV1 is not allowed here (no extension agreed): the decoder
                        // refuses it before the assembler sees it.
                        Event::Compressed { .. } => panic!("frame {i}: a compressed event"),
                    };
                    assert_eq!(Expect::Event(got), exp, "frame {i}: {f:?}");
                    let a = decoder.assembler_mut();
                    assert_eq!(a.in_progress(), model.message.is_some(), "frame {i}");
                    assert_eq!(a.buffered_len(), model.buffered(), "frame {i}");
                    pending.drain(..used);
                    consumed += used;
                    i += 1;
                    expect = None;
                }
            }
        }
    }
    if !failed {
        // Everything arrived: every frame was decoded, nothing is left over.
        assert_eq!(i, frames.len());
        assert!(pending.is_empty());
        assert_eq!(consumed, wire.len());
    }
}

fn close_code_of(e: ProtocolError) -> u16 {
    match e {
        ProtocolError::MessageTooBig => 1009,
        ProtocolError::InvalidUtf8 | ProtocolError::InvalidCloseReason => 1007,
        _ => 1002,
    }
}
