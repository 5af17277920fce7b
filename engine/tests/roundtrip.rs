//! Property tests: whatever a client encodes (masked, fragmented, with pings in
//! between), split into receives at any points, decodes back to the same messages.

use kythera_engine::protocol::codec::{encode_frame_into, parse_header};
use kythera_engine::protocol::decoder::{Decoder, Step};
use kythera_engine::protocol::fragment::Event;
use kythera_engine::protocol::{DecoderConfig, OpCode, ProtocolError};
use kythera_handler_api::Message;
use proptest::prelude::*;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Msg {
    Text(String),
    Binary(Vec<u8>),
}

#[derive(Debug, Clone)]
struct Planned {
    msg: Msg,
    /// Fragment sizes (the last fragment takes the rest).
    cuts: Vec<usize>,
    /// Send a ping after the first fragment.
    ping: bool,
    mask: [u8; 4],
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        ".{0,300}".prop_map(Msg::Text),
        prop::collection::vec(any::<u8>(), 0..600).prop_map(Msg::Binary),
        // Sizes that need the 16-bit and 64-bit length encodings.
        (65_530usize..65_600).prop_map(|n| Msg::Binary(vec![0x5a; n])),
    ]
}

fn planned() -> impl Strategy<Value = Planned> {
    (
        msg(),
        prop::collection::vec(0usize..200, 0..4),
        any::<bool>(),
        any::<[u8; 4]>(),
    )
        .prop_map(|(msg, cuts, ping, mask)| Planned {
            msg,
            cuts,
            ping,
            mask,
        })
}

fn encode(p: &Planned, out: &mut Vec<u8>) {
    let (op, bytes) = match &p.msg {
        Msg::Text(t) => (OpCode::Text, t.as_bytes()),
        Msg::Binary(b) => (OpCode::Binary, b.as_slice()),
    };
    // Fragments at byte offsets, which may split a UTF-8 code point: the decoder must
    // cope with that.
    let mut pieces = Vec::new();
    let mut rest = bytes;
    for &c in &p.cuts {
        let c = c.min(rest.len());
        pieces.push(&rest[..c]);
        rest = &rest[c..];
    }
    pieces.push(rest);
    let last = pieces.len() - 1;
    for (i, piece) in pieces.iter().enumerate() {
        let opcode = if i == 0 { op } else { OpCode::Continuation };
        encode_frame_into(out, i == last, 0, opcode, piece, Some(p.mask));
        if i == 0 && p.ping {
            encode_frame_into(out, true, 0, OpCode::Ping, b"are you there", Some(p.mask));
        }
    }
}

/// The engine's receive loop in miniature: bytes arrive in chunks; complete frames are
/// decoded in place; an incomplete tail is kept for the next chunk.
fn receive_all(wire: &[u8], chunk_sizes: &[usize]) -> Result<(Vec<Msg>, usize), ProtocolError> {
    let mut dec = Decoder::new(DecoderConfig::SERVER_DEFAULT);
    let mut pending: Vec<u8> = Vec::new();
    let mut msgs = Vec::new();
    let mut pings = 0;
    let mut offset = 0;
    let mut sizes = chunk_sizes.iter().cycle();
    while offset < wire.len() {
        let n = (*sizes.next().unwrap()).clamp(1, wire.len() - offset);
        pending.extend_from_slice(&wire[offset..offset + n]);
        offset += n;
        let mut start = 0;
        loop {
            match dec.step(&mut pending[start..])? {
                Step::Event(ev, used) => {
                    match ev {
                        Event::Message(Message::Text(t)) => msgs.push(Msg::Text(t.to_owned())),
                        Event::Message(Message::Binary(b)) => msgs.push(Msg::Binary(b.to_vec())),
                        Event::Ping(p) => {
                            assert_eq!(p, b"are you there");
                            pings += 1;
                        }
                        Event::Fragment => {}
                        other => panic!("unexpected {other:?}"),
                    }
                    start += used;
                }
                Step::NeedMore { needed } => {
                    assert!(needed > (pending.len() - start) as u64);
                    break;
                }
            }
        }
        pending.drain(..start);
    }
    assert!(pending.is_empty(), "bytes left over");
    Ok((msgs, pings))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn encode_mask_split_decode(plan in prop::collection::vec(planned(), 1..6),
                                chunks in prop::collection::vec(1usize..700, 1..8)) {
        let mut wire = Vec::new();
        for p in &plan {
            encode(p, &mut wire);
        }
        let (got, pings) = receive_all(&wire, &chunks).expect("valid input decodes");
        let want: Vec<Msg> = plan.iter().map(|p| p.msg.clone()).collect();
        prop_assert_eq!(got, want);
        prop_assert_eq!(pings, plan.iter().filter(|p| p.ping).count());
    }

    #[test]
    fn header_round_trip(fin in any::<bool>(), op in prop::sample::select(vec![OpCode::Text, OpCode::Binary, OpCode::Continuation]),
                         len in prop_oneof![0u64..200, 100u64..70_000, 65_536u64..5_000_000],
                         mask in any::<[u8; 4]>()) {
        let h = kythera_engine::protocol::codec::encode_header(fin, 0, op, len, Some(mask));
        match parse_header(h.as_bytes(), &DecoderConfig::SERVER_DEFAULT).unwrap() {
            kythera_engine::protocol::codec::Decoded::Complete(p, used) => {
                prop_assert_eq!(used, h.as_bytes().len());
                prop_assert_eq!((p.fin, p.opcode, p.payload_len, p.mask), (fin, op, len, Some(mask)));
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn invalid_utf8_anywhere_is_1007(prefix in ".{0,50}", bad in prop::sample::select(vec![
            vec![0xffu8], vec![0xc0, 0x80], vec![0xed, 0xa0, 0x80], vec![0xf4, 0x90, 0x80, 0x80], vec![0x80]]),
            cut in 0usize..60, mask in any::<[u8; 4]>()) {
        let mut payload = prefix.into_bytes();
        payload.extend_from_slice(&bad);
        let cut = cut.min(payload.len());
        let mut wire = Vec::new();
        encode_frame_into(&mut wire, false, 0, OpCode::Text, &payload[..cut], Some(mask));
        encode_frame_into(&mut wire, true, 0, OpCode::Continuation, &payload[cut..], Some(mask));
        let err = receive_all(&wire, &[wire.len()]).unwrap_err();
        prop_assert_eq!(err, ProtocolError::InvalidUtf8);
        prop_assert_eq!(err.close_code().get(), 1007);
    }
}
