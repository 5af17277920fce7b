//! The frame codec, kythera side by side with fastwebsockets 0.10 and tungstenite 0.30.
//!
//! Three benchmarks, one criterion group per payload size, `Throughput::Bytes` set to
//! the payload size:
//!
//! - `decode/<size>` (text) and `decode_binary/1MiB`: the receive path for one masked
//!   client->server frame: frame decode + unmask + UTF-8 validation (text frames).
//!   - kythera: the frame is copied into a reused, pre-allocated buffer, then
//!     `Decoder::step` decodes, unmasks and validates it in place.
//!   - fastwebsockets: `WebSocket::after_handshake(_, Role::Server)` and
//!     `read_frame()`. Plain `read_frame` does validate UTF-8: `ReadHalf::read_frame_inner`
//!     calls `Frame::is_utf8` (simdutf8, the crate's default `simd` feature) on every
//!     final text frame, so no `FragmentCollector` is needed for these unfragmented
//!     frames.
//!   - tungstenite: `WebSocket::from_raw_socket(_, Role::Server, None)` and `read()`,
//!     which turns the payload of a text frame into `Utf8Bytes` (`std::str::from_utf8`).
//!
//!   Fairness rule: every implementation copies the wire bytes once per frame
//!   (simulating the kernel filling a receive buffer) and then parses. kythera copies
//!   the frame explicitly; the other two read from [`benches::EndlessWire`], an
//!   in-memory socket whose peer sends the same frame forever and whose reads copy the
//!   next bytes into the library's own receive buffer (so their per-frame copy happens
//!   in their reads, amortised over as many frames as their buffer takes, frames split
//!   across reads as on a real socket). fastwebsockets' future is polled once with a
//!   no-op waker ([`benches::poll_once`]): no executor overhead is charged to it.
//!
//! - `unmask/<size>`: unmasking 20 B, 512 B and 16 KiB (one byte past a 16-byte
//!   boundary) and 1 MiB in place: kythera's `mask::unmask` (fast path) and
//!   `fastwebsockets::unmask` (public); at 1 MiB also `mask::unmask_reference` (byte by
//!   byte).
//!   tungstenite's `apply_mask` lives in a private module and cannot be called.
//!
//! - `encode/<size>`: one unmasked server->client text frame into a reused `Vec<u8>`:
//!   kythera `codec::encode_frame_to_slice` (into a vector sized once and reused, as the
//!   engine's send buffer is),
//!   fastwebsockets `Frame::write` (its API overwrites the vector from index 0 and grows
//!   it only when too short, which is how its own `write_frame` reuses its buffer; the
//!   vector is not cleared, since clearing would make it zero-fill the frame's length
//!   every time), tungstenite `Frame::format` (appends through `io::Write`; vector
//!   cleared each iteration; the payload is a `Bytes` whose clone is a reference count
//!   increment). All three produce identical bytes.
//!
//! Every input is checked once outside the timing loop (decoded payload equals the
//! original, invalid UTF-8 is refused, the encoders agree byte for byte, the unmaskers
//! agree), so a wrong benchmark cannot silently measure nothing.
//!
//! Run with `cargo bench -p benches --bench codec`.

use std::hint::black_box;

use benches::{EndlessWire, masked_frame, masked_frame_with, payload, poll_once};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kythera_engine::protocol::codec::{MAX_HEADER_BYTES, encode_frame_into, encode_frame_to_slice};
use kythera_engine::protocol::mask::{unmask, unmask_reference};
use kythera_engine::protocol::{Decoder, DecoderConfig, Event, OpCode, ProtocolError, Step};
use kythera_handler_api::Message;

type FwsSocket = fastwebsockets::WebSocket<EndlessWire>;
type TungSocket = tungstenite::WebSocket<EndlessWire>;

const SIZES: [(usize, &str); 4] = [
    (20, "20B"),
    (512, "512B"),
    (16 * 1024, "16KiB"),
    (1024 * 1024, "1MiB"),
];

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

// ---------------------------------------------------------------------------------------
// decode

/// kythera's receive path: copy the frame into the receive buffer, decode it in place.
#[inline]
fn kythera_recv<'a>(decoder: &'a mut Decoder, buf: &'a mut [u8], wire: &[u8]) -> Message<'a> {
    buf.copy_from_slice(wire);
    let len = wire.len();
    match decoder.step(buf) {
        Ok(Step::Event(Event::Message(m), used)) if used == len => m,
        other => panic!("kythera: unexpected {other:?}"),
    }
}

fn fws_socket(wire: &[u8]) -> FwsSocket {
    fastwebsockets::WebSocket::after_handshake(
        EndlessWire::new(wire.to_vec()),
        fastwebsockets::Role::Server,
    )
}

#[inline]
fn fws_recv(ws: &mut FwsSocket) -> fastwebsockets::Frame<'static> {
    poll_once(ws.read_frame()).expect("fastwebsockets: read_frame")
}

fn tung_socket(wire: &[u8]) -> TungSocket {
    tungstenite::WebSocket::from_raw_socket(
        EndlessWire::new(wire.to_vec()),
        tungstenite::protocol::Role::Server,
        None,
    )
}

#[inline]
fn tung_recv(ws: &mut TungSocket) -> tungstenite::Message {
    ws.read().expect("tungstenite: read")
}

/// Checks, outside any timing, that each implementation decodes `wire` to `want`
/// (several frames in a row, so that frames split across reads are covered too), and
/// that each refuses a text frame with invalid UTF-8.
fn check_decode(wire: &[u8], want: &[u8], text: bool) {
    let mut decoder = Decoder::new(DecoderConfig::SERVER_DEFAULT);
    let mut buf = vec![0u8; wire.len()];
    let mut fws = fws_socket(wire);
    let mut tung = tung_socket(wire);
    for _ in 0..3 {
        match (kythera_recv(&mut decoder, &mut buf, wire), text) {
            (Message::Text(t), true) => assert_eq!(t.as_bytes(), want, "kythera text"),
            (Message::Binary(b), false) => assert_eq!(b, want, "kythera binary"),
            (other, _) => panic!("kythera: wrong message type {other:?}"),
        }

        let frame = fws_recv(&mut fws);
        let opcode = if text {
            fastwebsockets::OpCode::Text
        } else {
            fastwebsockets::OpCode::Binary
        };
        assert!(frame.fin && frame.opcode == opcode, "fastwebsockets header");
        assert_eq!(&frame.payload[..], want, "fastwebsockets payload");

        match (tung_recv(&mut tung), text) {
            (tungstenite::Message::Text(t), true) => {
                assert_eq!(t.as_bytes(), want, "tungstenite text")
            }
            (tungstenite::Message::Binary(b), false) => {
                assert_eq!(&b[..], want, "tungstenite binary")
            }
            (other, _) => panic!("tungstenite: wrong message type {other:?}"),
        }
    }

    if text {
        // The same frame with one invalid byte (a lone continuation byte) at the end:
        // every implementation must refuse it, which shows that it validates UTF-8.
        let mut bad = want.to_vec();
        *bad.last_mut().expect("non-empty payload") = 0x80;
        let bad_wire = masked_frame_with(OpCode::Text, &bad);
        let mut buf = bad_wire.clone();
        let mut decoder = Decoder::new(DecoderConfig::SERVER_DEFAULT);
        assert_eq!(
            decoder.step(&mut buf),
            Err(ProtocolError::InvalidUtf8),
            "kythera accepted invalid UTF-8"
        );
        match poll_once(fws_socket(&bad_wire).read_frame()) {
            Err(fastwebsockets::WebSocketError::InvalidUTF8) => {}
            Err(e) => panic!("fastwebsockets: unexpected error {e:?}"),
            Ok(_) => panic!("fastwebsockets accepted invalid UTF-8"),
        }
        match tung_socket(&bad_wire).read() {
            Err(tungstenite::Error::Utf8(_)) => {}
            other => panic!("tungstenite accepted invalid UTF-8: {other:?}"),
        }
    }
}

fn decode_group(c: &mut Criterion, group: &str, label: &str, len: usize, text: bool) {
    let want = payload(len);
    let wire = masked_frame(len, text);
    check_decode(&wire, &want, text);

    let mut g = c.benchmark_group(format!("{group}/{label}"));
    g.throughput(Throughput::Bytes(len as u64));

    let mut decoder = Decoder::new(DecoderConfig::SERVER_DEFAULT);
    let mut buf = vec![0u8; wire.len()];
    g.bench_function("kythera", |b| {
        b.iter(|| {
            black_box(kythera_recv(&mut decoder, &mut buf, black_box(&wire)));
        })
    });

    let mut fws = fws_socket(&wire);
    g.bench_function("fastwebsockets", |b| {
        b.iter(|| black_box(fws_recv(&mut fws)))
    });

    let mut tung = tung_socket(&wire);
    g.bench_function("tungstenite", |b| {
        b.iter(|| black_box(tung_recv(&mut tung)))
    });

    g.finish();
}

fn decode(c: &mut Criterion) {
    for (len, label) in SIZES {
        decode_group(c, "decode", label, len, true);
    }
    decode_group(c, "decode_binary", "1MiB", 1024 * 1024, false);
}

// ---------------------------------------------------------------------------------------
// unmask

fn unmask_bench(c: &mut Criterion) {
    const LEN: usize = 1024 * 1024;
    let orig = payload(LEN);

    // Check once: all three agree, on the whole buffer and on a misaligned piece.
    for range in [0..LEN, 3..LEN - 5] {
        let mut want = orig[range.clone()].to_vec();
        unmask_reference(&mut want, MASK, 0);
        let mut fast = orig[range.clone()].to_vec();
        unmask(&mut fast, MASK, 0);
        assert_eq!(fast, want, "kythera unmask != unmask_reference");
        let mut fws = orig[range.clone()].to_vec();
        fastwebsockets::unmask(&mut fws, MASK);
        assert_eq!(fws, want, "fastwebsockets::unmask != unmask_reference");
        assert_ne!(want, orig[range], "unmasking changed nothing");
    }

    // The sizes of the load matrix (a frame's payload starts 6 or 8 bytes into its
    // receive buffer: one byte past a 16-byte boundary is as misaligned as it gets), and
    // 1 MiB with the byte-by-byte reference beside.
    for (label, len, start) in [
        ("20B", 20, 1),
        ("512B", 512, 1),
        ("16KiB", 16 * 1024, 1),
        ("1MiB", LEN, 0),
    ] {
        let mut g = c.benchmark_group(format!("unmask/{label}"));
        g.throughput(Throughput::Bytes(len as u64));
        let mut buf = orig.clone();
        let piece = start..start + len;
        g.bench_function("kythera", |b| {
            b.iter(|| unmask(black_box(&mut buf[piece.clone()]), black_box(MASK), 0))
        });
        if len == LEN {
            g.bench_function("kythera_reference", |b| {
                b.iter(|| unmask_reference(black_box(&mut buf), black_box(MASK), 0))
            });
        }
        g.bench_function("fastwebsockets", |b| {
            b.iter(|| fastwebsockets::unmask(black_box(&mut buf[piece.clone()]), black_box(MASK)))
        });
        g.finish();
    }
}

// ---------------------------------------------------------------------------------------
// encode

#[inline]
fn kythera_encode<'a>(out: &'a mut Vec<u8>, payload: &[u8]) -> &'a [u8] {
    // Like fastwebsockets' `write`: the buffer is sized once and reused, as the
    // engine's send buffer is.
    if out.len() < payload.len() + MAX_HEADER_BYTES {
        out.resize(payload.len() + MAX_HEADER_BYTES, 0);
    }
    let n = encode_frame_to_slice(out, true, 0, OpCode::Text, payload, None)
        .expect("buffer sized for the frame");
    &out[..n]
}

#[inline]
fn fws_encode<'a>(out: &'a mut Vec<u8>, payload: &[u8]) -> &'a [u8] {
    let mut frame = fastwebsockets::Frame::text(fastwebsockets::Payload::Borrowed(payload));
    frame.write(out)
}

#[inline]
fn tung_encode<'a>(out: &'a mut Vec<u8>, payload: &tungstenite::Bytes) -> &'a [u8] {
    use tungstenite::protocol::frame::Frame;
    use tungstenite::protocol::frame::coding::{Data, OpCode};
    out.clear();
    Frame::message(payload.clone(), OpCode::Data(Data::Text), true)
        .format(out)
        .expect("tungstenite: format into a Vec");
    out
}

fn encode(c: &mut Criterion) {
    for (len, label) in SIZES {
        let data = payload(len);
        let shared = tungstenite::Bytes::from(data.clone());

        // Check once: the three encoders produce the same frame, twice in a row (the
        // second time into the reused vector).
        let mut want = Vec::new();
        encode_frame_into(&mut want, true, 0, OpCode::Text, &data, None);
        assert_eq!(&want[want.len() - len..], &data[..]);
        let (mut k, mut f, mut t) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..2 {
            assert_eq!(kythera_encode(&mut k, &data), &want[..], "kythera");
            assert_eq!(fws_encode(&mut f, &data), &want[..], "fastwebsockets");
            assert_eq!(tung_encode(&mut t, &shared), &want[..], "tungstenite");
        }

        let mut g = c.benchmark_group(format!("encode/{label}"));
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_function("kythera", |b| {
            b.iter(|| black_box(kythera_encode(&mut k, black_box(&data))).len())
        });
        g.bench_function("fastwebsockets", |b| {
            b.iter(|| black_box(fws_encode(&mut f, black_box(&data))).len())
        });
        g.bench_function("tungstenite", |b| {
            b.iter(|| black_box(tung_encode(&mut t, black_box(&shared))).len())
        });
        g.finish();
    }
}

criterion_group!(codec, decode, unmask_bench, encode);
criterion_main!(codec);
