//! Tests of the whole session: a gear that echoes and misbehaves on request, driven
//! through `on_recv`, `on_tick` and the output as the shard would drive it.

use super::output::CHUNK;
use super::staged_echo::STAGE_MIN;
use super::*;
use crate::config::Limits;
use crate::gear::Registries;
use crate::protocol::codec::{Decoded, DecoderConfig, OpCode, RSV1, Role, encode_frame_into};
use kythera_handler_api::{
    CloseCode, Conn, ConnId, Context, Message, Response, TerminateError, TerminateReason, Websocket,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Echoes, and does what some messages ask: "close", "panic", "badcode", "flood".
struct TestGear {
    terminated: Arc<Mutex<Vec<TerminateReason>>>,
}

impl Websocket for TestGear {
    type State = ();
    type Message = ();

    fn connect(&self, conn: &mut Conn) -> Result<(), Response> {
        if conn.query_param("reject").is_some() {
            return Err(Response::new(403).body("no"));
        }
        if conn.offered_subprotocols().any(|p| p == "v1") {
            conn.select_subprotocol("v1").unwrap();
        }
        Ok(())
    }

    fn init(&self, conn: &mut Conn, ctx: &mut Context<'_, ()>) {
        if conn.query_param("greet").is_some() {
            ctx.send_text("hello");
        }
    }

    fn handle_client_message(&self, _: &mut (), msg: Message<'_>, ctx: &mut Context<'_, ()>) {
        match msg {
            Message::Text("close") => {
                ctx.close_with(CloseCode::new(4000).unwrap(), "bye");
                ctx.send_text("never sent");
            }
            Message::Text("panic") => {
                ctx.send_text("before panic");
                panic!("boom");
            }
            Message::Text("badcode") => ctx.close_with_code(1005, ""),
            Message::Text("flood") => {
                for _ in 0..40 {
                    ctx.send_binary(&[0u8; 64 * 1024]);
                }
            }
            Message::Text(t) => ctx.send_text(t),
            Message::Binary(b) if b.starts_with(b"twice") => {
                ctx.send_binary(b);
                ctx.send_text("after");
            }
            Message::Binary(b) if b.starts_with(b"echo then close") => {
                ctx.send_binary(b);
                ctx.close_with(CloseCode::new(4000).unwrap(), "bye");
            }
            Message::Binary(b) if b.starts_with(b"echo then panic") => {
                ctx.send_binary(b);
                panic!("boom");
            }
            Message::Binary(b) if b.starts_with(b"short reply") => ctx.send_text("short"),
            Message::Binary(b) if b.starts_with(b"long reply") => ctx.send_binary(&[7; 20_000]),
            Message::Binary(b) if b.starts_with(b"nothing") => {}
            Message::Binary(b) if b.starts_with(b"text first") => {
                ctx.send_text("first");
                ctx.send_binary(b);
            }
            Message::Binary(b) => ctx.send_binary(b),
        }
    }

    fn handle_server_message(&self, _: &mut (), _: (), _: &mut Context<'_, ()>) {}

    fn terminate(&self, _: (), reason: &TerminateReason, _: &mut Context<'_, ()>) {
        self.terminated.lock().unwrap().push(reason.clone());
    }
}

struct Harness {
    app: App,
    terminated: Arc<Mutex<Vec<TerminateReason>>>,
    session: Session,
    now: u64,
}

/// The id the shard would pass (the session does not hold it).
const ID: ConnId = ConnId::new(0, 1);

impl Drop for Harness {
    fn drop(&mut self) {
        // What the shard does before it drops a session.
        if !self.session.is_terminated() {
            let (now, app) = (self.now, &self.app);
            self.session
                .shut_down(ID, now, app, &mut Registries::none());
        }
    }
}

const UPGRADE: &str = "GET /ws?greet=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

fn harness(limits: Limits, max_conns: Option<usize>) -> Harness {
    let terminated = Arc::new(Mutex::new(Vec::new()));
    let mut app = App::new(limits);
    app.mount(
        "/ws",
        TestGear {
            terminated: Arc::clone(&terminated),
        },
        max_conns,
    )
    .unwrap();
    let session = Session::new(None, 0, &app);
    Harness {
        app,
        terminated,
        session,
        now: 0,
    }
}

impl Harness {
    fn recv(&mut self, bytes: &[u8]) {
        let mut data = bytes.to_vec();
        self.session
            .on_recv(ID, &mut data, self.now, &self.app, &mut Registries::none());
    }

    fn output(&mut self) -> Vec<u8> {
        match self.session.take_output(self.now) {
            Some(output) => {
                let copy = output.to_vec();
                self.session.sent(output);
                copy
            }
            None => Vec::new(),
        }
    }

    fn open(&mut self) -> String {
        self.recv(UPGRADE.as_bytes());
        let out = self.output();
        let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let head = String::from_utf8(out[..end].to_vec()).unwrap();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // The greeting sent by init follows the 101.
        assert_eq!(frames(&out[end..]), [(OpCode::Text, b"hello".to_vec())]);
        head
    }

    fn send(&mut self, op: OpCode, payload: &[u8]) {
        self.recv(&client_frame(op, payload));
    }

    fn reasons(&self) -> Vec<TerminateReason> {
        self.terminated.lock().unwrap().clone()
    }
}

fn client_frame(op: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame_into(&mut out, true, 0, op, payload, Some([1, 2, 3, 4]));
    out
}

/// The server's frames, decoded as a client would.
fn frames(mut bytes: &[u8]) -> Vec<(OpCode, Vec<u8>)> {
    let cfg = DecoderConfig {
        role: Role::Client,
        max_message_bytes: u64::MAX >> 1,
        allowed_rsv: 0,
    };
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut copy = bytes.to_vec();
        match crate::protocol::codec::decode_frame(&mut copy, &cfg).unwrap() {
            Decoded::Complete(f, used) => {
                out.push((f.header.opcode, f.payload.to_vec()));
                bytes = &bytes[used..];
            }
            Decoded::Incomplete { .. } => panic!("partial server frame"),
        }
    }
    out
}

fn client_fragment(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame_into(
        &mut out,
        fin,
        0,
        op,
        payload,
        Some([0x9a, 0x41, 0x07, 0xe3]),
    );
    out
}

fn big(n: usize, prefix: &[u8]) -> Vec<u8> {
    let mut v = prefix.to_vec();
    v.extend((0..n as u32).map(|i| (i.wrapping_mul(31) + 7) as u8));
    v
}

/// Frames that span receives (gathered in `pending`, unmasked as they arrive, and
/// echoed in place when they were the whole buffer), fed in pieces of every size,
/// with the output taken after every piece or only at the end.
#[test]
fn frames_across_receives_in_pieces() {
    let text = "é".repeat(20_000) + "€";
    let frag_a = big(30_000, b"");
    let frag_b = big(25_001, b"x");
    let mut wire = Vec::new();
    let mut want = Vec::new();
    for (op, payload) in [
        (OpCode::Binary, big(70_000, b"")),
        (OpCode::Ping, b"ping in between".to_vec()),
        (OpCode::Text, text.clone().into_bytes()),
        (OpCode::Binary, big(300, b"")),
        (OpCode::Binary, big(20_000, b"twice")),
        (OpCode::Binary, big(66_000, b"text first")),
        (OpCode::Binary, Vec::new()),
        (OpCode::Binary, big(65_530, b"")),
    ] {
        wire.extend(client_frame(op, &payload));
        match op {
            OpCode::Ping => want.push((OpCode::Pong, payload)),
            _ if payload.starts_with(b"twice") => {
                want.push((op, payload));
                want.push((OpCode::Text, b"after".to_vec()));
            }
            _ if payload.starts_with(b"text first") => {
                want.push((OpCode::Text, b"first".to_vec()));
                want.push((op, payload));
            }
            _ => want.push((op, payload)),
        }
    }
    wire.extend(client_fragment(false, OpCode::Binary, &frag_a));
    wire.extend(client_fragment(false, OpCode::Continuation, b""));
    wire.extend(client_frame(OpCode::Ping, b"p"));
    wire.extend(client_fragment(true, OpCode::Continuation, &frag_b));
    want.push((OpCode::Pong, b"p".to_vec()));
    want.push((OpCode::Binary, [frag_a, frag_b].concat()));
    for piece in [1, 2, 3, 13, 125, 1000, 4096, 16_384, 65_536, 200_000] {
        for take_each in [false, true] {
            let mut h = harness(Limits::default(), None);
            h.open();
            let mut out = Vec::new();
            for chunk in wire.chunks(piece) {
                h.recv(chunk);
                if take_each {
                    out.extend(h.output());
                }
            }
            out.extend(h.output());
            assert!(
                frames(&out) == want,
                "pieces of {piece}, take_each {take_each}"
            );
            assert!(h.reasons().is_empty());
        }
    }
}

/// An echo left to be queued in place is queued before a close or a panic's 1011.
#[test]
fn echo_in_place_then_close_or_panic() {
    for (prefix, code, reason) in [
        (&b"echo then close"[..], 4000u16, "bye"),
        (&b"echo then panic"[..], 1011, ""),
    ] {
        let payload = big(40_000, prefix);
        let wire = client_frame(OpCode::Binary, &payload);
        // In pieces (gathered in `pending`), and whole (staged in the output).
        for piece in [4096, wire.len()] {
            let mut h = harness(Limits::default(), None);
            h.open();
            for chunk in wire.chunks(piece) {
                h.recv(chunk);
            }
            assert_eq!(
                frames(&h.output()),
                [
                    (OpCode::Binary, payload.clone()),
                    (OpCode::Close, close_payload(code, reason))
                ],
                "pieces of {piece}"
            );
        }
    }
}

/// Whole messages in a receive buffer are unmasked into the output behind their
/// echo's header (`staged_echo`): whatever the gear does with them (echo, a short or a
/// long reply, nothing, a reply before the echo), and whatever was queued before (an
/// echo in place from `pending`, chunks behind a send in flight), the output stays in
/// order and holds no staged bytes that were not echoed.
#[test]
fn staged_messages_keep_the_output_in_order() {
    let text = "é".repeat(3000);
    let mut whole = Vec::new();
    let mut want = Vec::new();
    for (op, payload) in [
        (OpCode::Binary, big(20_000, b"short reply")),
        (OpCode::Binary, big(20_000, b"")),
        (OpCode::Binary, big(5000, b"nothing")),
        (OpCode::Binary, big(20_000, b"long reply")),
        (OpCode::Text, text.clone().into_bytes()),
        (OpCode::Binary, big(3000, b"twice")),
        (OpCode::Binary, big(70_000, b"text first")),
        (OpCode::Binary, big(1500, b"")),
    ] {
        whole.extend(client_frame(op, &payload));
        if payload.starts_with(b"short reply") {
            want.push((OpCode::Text, b"short".to_vec()));
        } else if payload.starts_with(b"long reply") {
            want.push((OpCode::Binary, vec![7; 20_000]));
        } else if payload.starts_with(b"twice") {
            want.push((op, payload));
            want.push((OpCode::Text, b"after".to_vec()));
        } else if payload.starts_with(b"text first") {
            want.push((OpCode::Text, b"first".to_vec()));
            want.push((op, payload));
        } else if !payload.starts_with(b"nothing") {
            want.push((op, payload));
        }
    }
    let first = big(30_000, b"");
    for in_flight in [false, true] {
        for in_place_first in [false, true] {
            let mut h = harness(Limits::default(), None);
            h.open();
            let mut expected = Vec::new();
            let sending = in_flight.then(|| {
                h.send(OpCode::Binary, &big(16_384, b""));
                h.session.take_output(h.now).unwrap()
            });
            if in_place_first {
                // Gathered across two receives and echoed in place: the output then
                // starts inside its buffer (`out_start`).
                let wire = client_frame(OpCode::Binary, &first);
                let (a, b) = wire.split_at(10_000);
                h.recv(a);
                h.recv(b);
                expected.push((OpCode::Binary, first.clone()));
            }
            h.recv(&whole);
            expected.extend(want.iter().cloned());
            let mut out = Vec::new();
            if let Some(sending) = sending {
                out.extend(sending.to_vec());
                h.session.sent(sending);
                expected.insert(0, (OpCode::Binary, big(16_384, b"")));
            }
            out.extend(h.output());
            assert!(
                frames(&out) == expected,
                "in flight {in_flight}, in place first {in_place_first}"
            );
            assert!(h.reasons().is_empty());
        }
    }
}

/// A whole text message with invalid UTF-8 is failed with 1007 after what was queued
/// before it, and none of its bytes are sent.
#[test]
fn staged_text_with_invalid_utf8_closes_1007() {
    let bad = [vec![b'a'; 3000], vec![0xc3, 0x28], vec![b'b'; 3000]].concat();
    let echo = big(20_000, b"");
    let mut wire = client_frame(OpCode::Binary, &echo);
    wire.extend(client_frame(OpCode::Text, &bad));
    wire.extend(client_frame(OpCode::Binary, &echo));
    let mut h = harness(Limits::default(), None);
    h.open();
    h.recv(&wire);
    let got = frames(&h.output());
    let ops: Vec<_> = got.iter().map(|(op, _)| *op).collect();
    assert_eq!(ops, [OpCode::Binary, OpCode::Close]);
    assert!(got[0].1 == echo);
    assert_eq!(got[1].1[..2], 1007u16.to_be_bytes());
}

/// Protocol errors in frames gathered across receives keep their close codes.
#[test]
fn errors_across_receives() {
    let bad_text = [vec![b'a'; 5000], vec![0xff], vec![b'b'; 5000]].concat();
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (client_frame(OpCode::Text, &bad_text), 1007),
        (client_frame(OpCode::Binary, &[0; 2000]), 1009),
        (client_fragment(true, OpCode::Continuation, &[0; 500]), 1002),
    ];
    for (wire, code) in cases {
        for piece in [1, 7, 1000] {
            let limits = Limits {
                max_message_bytes: 1500,
                ..Limits::default()
            };
            let limits = if code == 1009 {
                limits
            } else {
                Limits::default()
            };
            let mut h = harness(limits, None);
            h.open();
            for chunk in wire.chunks(piece) {
                h.recv(chunk);
            }
            let out = frames(&h.output());
            assert_eq!(out.len(), 1, "{code} in pieces of {piece}");
            assert_eq!(u16::from_be_bytes([out[0].1[0], out[0].1[1]]), code);
            assert!(h.session.should_close());
        }
    }
}

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

#[test]
fn echo_and_client_close() {
    let mut h = harness(Limits::default(), None);
    h.open();
    h.send(OpCode::Text, b"hi");
    h.send(OpCode::Binary, &[1, 2, 3]);
    h.send(OpCode::Ping, b"p");
    assert_eq!(
        frames(&h.output()),
        [
            (OpCode::Text, b"hi".to_vec()),
            (OpCode::Binary, vec![1, 2, 3]),
            (OpCode::Pong, b"p".to_vec())
        ]
    );
    h.send(OpCode::Close, &close_payload(1001, "away"));
    assert_eq!(
        frames(&h.output()),
        [(OpCode::Close, 1001u16.to_be_bytes().to_vec())]
    );
    assert!(h.session.should_close());
    assert_eq!(
        h.reasons(),
        [TerminateReason::RemoteClose {
            code: CloseCode::new(1001),
            reason: "away".into()
        }]
    );
    h.session
        .on_peer_gone(ID, None, h.now, &h.app, &mut Registries::none());
    assert_eq!(h.reasons().len(), 1, "terminate runs once");
    assert_eq!(h.app.connections("/ws"), Some(0));
}

#[test]
fn byte_by_byte_and_pipelined() {
    let mut h = harness(Limits::default(), None);
    let mut wire = UPGRADE.as_bytes().to_vec();
    wire.extend(client_frame(OpCode::Text, b"first"));
    wire.extend(client_frame(OpCode::Binary, &vec![7u8; 300]));
    for b in wire {
        h.recv(&[b]);
    }
    let out = h.output();
    let end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(
        frames(&out[end..]),
        [
            (OpCode::Text, b"hello".to_vec()),
            (OpCode::Text, b"first".to_vec()),
            (OpCode::Binary, vec![7u8; 300])
        ]
    );
}

#[test]
fn rejections() {
    let cases = [
        ("GET /nope HTTP/1.1\r\nHost: x\r\n\r\n", "404"),
        ("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", "426"),
        ("POST /ws HTTP/1.1\r\nHost: x\r\n\r\n", "405"),
        ("\x01\x02garbage\r\n\r\n", "400"),
        (
            "GET /ws?reject=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            "403",
        ),
    ];
    for (req, status) in cases {
        let mut h = harness(Limits::default(), None);
        h.recv(req.as_bytes());
        let out = String::from_utf8(h.output()).unwrap();
        assert!(
            out.starts_with(&format!("HTTP/1.1 {status}")),
            "{req:?} -> {out}"
        );
        assert!(h.session.should_close());
        assert!(h.reasons().is_empty(), "no terminate without init");
    }
    let mut h = harness(Limits::default(), None);
    h.recv(format!("GET /ws HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000)).as_bytes());
    assert!(
        String::from_utf8(h.output())
            .unwrap()
            .starts_with("HTTP/1.1 431")
    );
}

/// Cross-site WebSocket hijacking: a browser upgrade from another site's page gets
/// 403 (before `connect` runs); the server's own pages, clients without `Origin`,
/// and origins the gear allows pass.
#[test]
fn origins_other_than_the_host_get_403() {
    let upgrade = |origin: Option<&str>| {
        let origin = origin.map_or(String::new(), |o| format!("Origin: {o}\r\n"));
        format!(
            "GET /ws HTTP/1.1\r\nHost: chat.example:8080\r\n{origin}Upgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    let status = |h: &mut Harness, origin: Option<&str>| {
        h.recv(upgrade(origin).as_bytes());
        let out = String::from_utf8(h.output()).unwrap();
        let status = out[9..12].to_owned();
        if status == "101" {
            h.session
                .shut_down(ID, h.now, &h.app, &mut Registries::none());
        }
        status
    };
    let cases = [
        (None, "101"),
        (Some("http://chat.example:8080"), "101"),
        (Some("http://evil.example"), "403"),
        (Some("null"), "403"),
        (Some("https://app.example"), "403"),
    ];
    for (origin, want) in cases {
        let mut h = harness(Limits::default(), None);
        assert_eq!(status(&mut h, origin), want, "{origin:?}");
    }
    let mut h = harness(Limits::default(), None);
    h.app.set_origins(
        Some("/ws"),
        crate::origin::OriginPolicy::from_list(&["https://app.example".into()]),
    );
    assert_eq!(status(&mut h, Some("https://app.example")), "101");
    let mut h = harness(Limits::default(), None);
    h.app
        .set_origins(Some("/ws"), crate::origin::OriginPolicy::Any);
    assert_eq!(status(&mut h, Some("http://evil.example")), "101");
}

/// Autobahn 6.4.3 and 6.4.4: a text frame whose bytes turn invalid before it is
/// whole is failed with 1007 when the bad bytes arrive, also in a continuation
/// frame whose first bytes finish a code point the previous fragment cut.
#[test]
fn invalid_utf8_fails_before_the_frame_is_whole() {
    /// The first fragment's bytes (empty: no fragment), the valid bytes, the bad.
    type Case<'a> = (&'a [u8], &'a [u8], Option<&'a [u8]>);
    let cases: [Case; 3] = [
        // one text frame: valid, then a surrogate, then the rest never comes
        (b"", "κόσμε".as_bytes(), Some(&[0xed, 0xa0, 0x80])),
        // the bad byte is the last one that arrived
        (b"", b"hello", Some(&[0xf4, 0x90])),
        // a continuation that finishes the first fragment's cut code point, then
        // breaks
        (&"€".as_bytes()[..2], &[0x82, b'a'], Some(&[0xff])),
    ];
    for (first_fragment, valid, bad) in cases {
        let mut h = harness(Limits::default(), None);
        h.open();
        let continuation = !first_fragment.is_empty();
        if continuation {
            h.recv(&client_fragment(false, OpCode::Text, first_fragment));
        }
        let mut payload = valid.to_vec();
        payload.extend_from_slice(bad.unwrap_or_default());
        payload.extend_from_slice(&[b'x'; 100]);
        let op = if continuation {
            OpCode::Continuation
        } else {
            OpCode::Text
        };
        let frame = client_fragment(true, op, &payload);
        // The header and the valid part, then the bad bytes: nothing yet, then 1007.
        let cut = frame.len() - 100 - bad.map_or(0, <[u8]>::len);
        h.recv(&frame[..cut]);
        assert!(h.output().is_empty(), "valid so far");
        assert!(!h.session.should_close());
        h.recv(&frame[cut..frame.len() - 100]);
        assert_eq!(close_code(&h.output()), Some(1007), "{payload:?}");
        assert!(h.session.should_close());
    }
    // Valid text in pieces stays valid and arrives whole.
    let mut h = harness(Limits::default(), None);
    h.open();
    let text = "κόσμε € 𝄞".repeat(50);
    let frame = client_frame(OpCode::Text, text.as_bytes());
    for piece in frame.chunks(7) {
        h.recv(piece);
    }
    let out = frames(&h.output());
    assert_eq!(out, vec![(OpCode::Text, text.into_bytes())]);
}

#[test]
fn per_gear_limit_503() {
    let mut first = harness(Limits::default(), Some(1));
    first.open();
    let mut second = Session::new(None, 0, &first.app);
    second.on_recv(
        ID,
        &mut UPGRADE.as_bytes().to_vec(),
        0,
        &first.app,
        &mut Registries::none(),
    );
    let out = String::from_utf8(second.take_output(0).unwrap().to_vec()).unwrap();
    assert!(out.starts_with("HTTP/1.1 503"));
    assert!(out.ends_with("TooManyWebsocketConnections"));
    assert_eq!(first.app.connections("/ws"), Some(1));
    first
        .session
        .on_peer_gone(ID, None, first.now, &first.app, &mut Registries::none());
    assert_eq!(first.app.connections("/ws"), Some(0));
}

#[test]
fn gear_close_then_peer_answers() {
    let mut h = harness(Limits::default(), None);
    h.open();
    h.send(OpCode::Text, b"close");
    assert_eq!(
        frames(&h.output()),
        [(OpCode::Close, close_payload(4000, "bye"))]
    );
    assert_eq!(h.reasons(), [TerminateReason::Stop]);
    assert!(!h.session.should_close(), "waits for the peer's close");
    h.send(OpCode::Text, b"ignored after close");
    assert!(h.output().is_empty());
    h.send(OpCode::Close, &close_payload(4000, ""));
    assert!(h.session.should_close());
    assert!(h.output().is_empty(), "no second close");
}

#[test]
fn closing_timeout() {
    let mut h = harness(Limits::default(), None);
    h.open();
    h.send(OpCode::Text, b"close");
    let deadline = h.session.next_deadline_ms().unwrap();
    assert_eq!(deadline, 5000);
    h.session.on_tick(ID, 4999, &h.app, &mut Registries::none());
    assert!(!h.session.should_close());
    h.session.on_tick(ID, 5000, &h.app, &mut Registries::none());
    assert!(h.session.should_close());
    assert_eq!(h.reasons(), [TerminateReason::Stop]);
}

#[test]
fn panic_closes_1011() {
    let mut h = harness(Limits::default(), None);
    h.open();
    h.send(OpCode::Text, b"panic");
    assert_eq!(
        frames(&h.output()),
        [
            (OpCode::Text, b"before panic".to_vec()),
            (OpCode::Close, 1011u16.to_be_bytes().to_vec())
        ]
    );
    assert_eq!(
        h.reasons(),
        [TerminateReason::Error(TerminateError::HandlerPanic(
            "boom".into()
        ))]
    );
}

#[test]
fn invalid_close_code_closes_1011() {
    let mut h = harness(Limits::default(), None);
    h.open();
    h.send(OpCode::Text, b"badcode");
    assert_eq!(
        frames(&h.output()),
        [(OpCode::Close, 1011u16.to_be_bytes().to_vec())]
    );
    assert_eq!(
        h.reasons(),
        [TerminateReason::Error(TerminateError::InvalidCloseCode(
            1005
        ))]
    );
}

#[test]
fn protocol_errors_close_with_their_code() {
    let unmasked = {
        let mut v = Vec::new();
        encode_frame_into(&mut v, true, 0, OpCode::Text, b"x", None);
        v
    };
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (unmasked, 1002),
        (client_frame(OpCode::Text, &[0xff, 0xfe]), 1007),
        (client_frame(OpCode::Binary, &[0; 2000]), 1009),
        (client_frame(OpCode::Close, &close_payload(1005, "")), 1002),
        (client_frame(OpCode::Continuation, b"x"), 1002),
    ];
    for (wire, code) in cases {
        let limits = Limits {
            max_message_bytes: 1000,
            ..Limits::default()
        };
        let mut h = harness(limits, None);
        h.open();
        h.recv(&wire);
        let out = frames(&h.output());
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].0, OpCode::Close);
        assert_eq!(u16::from_be_bytes([out[0].1[0], out[0].1[1]]), code);
        assert!(
            h.session.should_close(),
            "a failed connection is closed at once"
        );
        assert!(matches!(h.reasons()[..], [TerminateReason::Error(_)]));
    }
}

#[test]
fn idle_timeout_1000() {
    let limits = Limits {
        idle_timeout: Duration::from_secs(3),
        ..Limits::default()
    };
    let mut h = harness(limits, None);
    h.open();
    h.now = 2000;
    h.send(OpCode::Text, b"keepalive");
    h.output();
    // First the output buffers are given back, once quiet.
    assert_eq!(
        h.session.swept_deadline_ms(&h.app),
        Some(2000 + TX_QUIET_MS)
    );
    h.session
        .on_tick(ID, 2000 + TX_QUIET_MS, &h.app, &mut Registries::none());
    assert!(h.session.tx.is_none());
    assert_eq!(h.session.next_deadline_ms(), None, "no timer needed");
    assert_eq!(
        h.session.swept_deadline_ms(&h.app),
        Some(5000),
        "reset by incoming data"
    );
    h.session.on_tick(ID, 5000, &h.app, &mut Registries::none());
    assert_eq!(
        frames(&h.output()),
        [(OpCode::Close, close_payload(1000, "idle timeout"))]
    );
    assert_eq!(h.reasons(), [TerminateReason::Timeout]);
}

#[test]
fn handshake_timeout() {
    let mut h = harness(Limits::default(), None);
    h.recv(b"GET /ws HTTP/1.1\r\n");
    assert_eq!(h.session.swept_deadline_ms(&h.app), Some(10_000));
    assert_eq!(h.session.next_deadline_ms(), None);
    h.session
        .on_tick(ID, 10_000, &h.app, &mut Registries::none());
    assert!(h.session.should_close());
    assert!(h.output().is_empty());
}

#[test]
fn slow_consumer_1008_and_memory_freed() {
    let mut h = harness(Limits::default(), None);
    h.open();
    // 2.5 MiB with nothing in flight: the kernel can take it, no slow consumer.
    h.send(OpCode::Text, b"flood");
    assert!(h.reasons().is_empty());
    // The client does not read: that send stays in flight, and the next flood
    // waits behind it.
    let stuck = h.session.take_output(h.now).unwrap();
    assert!(stuck.len() > 2_500_000);
    h.send(OpCode::Text, b"flood");
    assert!(h.session.queued_bytes() - stuck.len() < 1024, "queue freed");
    h.session.sent(stuck);
    assert_eq!(
        frames(&h.output()),
        [(OpCode::Close, close_payload(1008, "slow consumer"))]
    );
    assert_eq!(
        h.reasons(),
        [TerminateReason::Error(TerminateError::SlowConsumer)]
    );
}

/// `output` holds the echoes of the 16 KiB payloads `echoes` (each payload the
/// byte `i` repeated), in buffers none of which grew past a chunk; it is given back.
fn assert_chunked_echoes(h: &mut Harness, output: Output, echoes: std::ops::RangeInclusive<u8>) {
    for buf in std::iter::once(&output.first).chain(output.rest.iter().map(|c| &c.buf)) {
        assert!(
            buf.capacity() <= CHUNK,
            "a buffer grew to {}",
            buf.capacity()
        );
    }
    let want: Vec<_> = echoes
        .map(|i| (OpCode::Binary, vec![i; 16 * 1024]))
        .collect();
    assert_eq!(frames(&output.to_vec()), want);
    h.session.sent(output);
    assert!(h.output().is_empty());
}

#[test]
fn output_behind_a_send_is_queued_in_chunks_not_grown() {
    let mut h = harness(Limits::default(), None);
    h.open();
    let payload = |i: u8| vec![i; 16 * 1024];
    h.send(OpCode::Binary, &payload(0));
    let in_flight = h.session.take_output(h.now).unwrap();
    assert!(in_flight.rest.is_empty());
    // Echoes queue behind the send in flight: full buffers are set aside as they
    // are, not grown (and copied).
    for i in 1..=12 {
        h.send(OpCode::Binary, &payload(i));
    }
    let queued = h.session.queued_bytes() - in_flight.len();
    assert_eq!(queued, 12 * (16 * 1024 + 4));
    h.session.sent(in_flight);
    let output = h.session.take_output(h.now).unwrap();
    assert_eq!(output.len(), queued);
    assert!(output.rest.len() >= 3, "{} buffers", output.rest.len() + 1);
    assert_chunked_echoes(&mut h, output, 1..=12);
}

#[test]
fn output_after_an_echo_in_place_is_chunked_too() {
    let mut h = harness(Limits::default(), None);
    h.open();
    let payload = |i: u8| vec![i; 16 * 1024];
    h.send(OpCode::Binary, &payload(0));
    let in_flight = h.session.take_output(h.now).unwrap();
    // Frames that arrive in 4 KiB pieces are completed in `pending` and the first
    // is echoed in place (its buffer becomes the output, starting after the rest
    // of the client's header); the next ones queue after it in chunks.
    let mut wire = Vec::new();
    for i in 1..=12 {
        wire.extend_from_slice(&client_frame(OpCode::Binary, &payload(i)));
    }
    for piece in wire.chunks(4096) {
        h.recv(piece);
    }
    h.session.sent(in_flight);
    let output = h.session.take_output(h.now).unwrap();
    assert!(output.start > 0, "the first echo went out in place");
    assert!(!output.rest.is_empty());
    assert_chunked_echoes(&mut h, output, 1..=12);
}

/// Frames completed in `pending` are echoed in place whatever was queued before them:
/// each buffer goes out as a chunk of its own, from after the rest of the client's
/// header, between the other output.
#[test]
fn several_echoes_in_place_share_one_output() {
    // Frames of 20,000 bytes in pieces of 7,000, and of 600 in pieces of 210: every
    // one crosses a receive. The small ones are copied behind other output.
    for (size, piece, in_place_max) in [(20_000, 7000, 4), (600, 210, 1)] {
        let mut h = harness(Limits::default(), None);
        h.open();
        let payload = |i: u8| vec![i; size];
        let mut wire = Vec::new();
        let mut want = Vec::new();
        for i in 1..=4 {
            wire.extend_from_slice(&client_frame(OpCode::Binary, &payload(i)));
            wire.extend_from_slice(&client_frame(OpCode::Text, b"small"));
            want.push((OpCode::Binary, payload(i)));
            want.push((OpCode::Text, b"small".to_vec()));
        }
        for piece in wire.chunks(piece) {
            h.recv(piece);
        }
        let output = h.session.take_output(h.now).unwrap();
        let in_place = std::iter::once(output.start)
            .chain(output.rest.iter().map(|c| c.start))
            .filter(|&start| start > 0)
            .count();
        if size > STAGE_MIN {
            assert_eq!(in_place, in_place_max, "every large echo went out in place");
        } else {
            assert!(in_place <= in_place_max, "{in_place} small echoes in place");
        }
        assert!(frames(&output.to_vec()) == want, "size {size}");
        h.session.sent(output);
        assert!(h.output().is_empty());
    }
}

#[test]
fn drain_sends_1001() {
    let mut h = harness(Limits::default(), None);
    h.open();
    h.session
        .start_drain(ID, 0, &h.app, &mut Registries::none());
    assert_eq!(
        frames(&h.output()),
        [(OpCode::Close, close_payload(1001, DRAIN_REASON))]
    );
    assert_eq!(h.reasons(), [TerminateReason::Stop]);
}

#[test]
fn server_pings_quiet_connections_and_pong_deadline() {
    let limits = Limits {
        ping_interval: Some(Duration::from_secs(1)),
        pong_timeout: Duration::from_secs(2),
        ..Limits::default()
    };
    let mut h = harness(limits, None);
    h.open();
    assert_eq!(h.session.swept_deadline_ms(&h.app), Some(1000));
    h.session.on_tick(ID, 1000, &h.app, &mut Registries::none());
    assert_eq!(frames(&h.output()), [(OpCode::Ping, b"kythera".to_vec())]);
    assert_eq!(
        h.session.swept_deadline_ms(&h.app),
        Some(3000),
        "the pong's"
    );
    h.now = 1500;
    h.send(OpCode::Pong, b"kythera");
    h.session.on_tick(ID, 2000, &h.app, &mut Registries::none());
    assert!(h.output().is_empty(), "the pong was a receive at 1500");
    // A connection that sends is not pinged.
    h.now = 2400;
    h.send(OpCode::Text, b"still here");
    h.output();
    h.session.on_tick(ID, 2500, &h.app, &mut Registries::none());
    assert!(h.output().is_empty());
    h.session.on_tick(ID, 3400, &h.app, &mut Registries::none());
    assert_eq!(frames(&h.output()), [(OpCode::Ping, b"kythera".to_vec())]);
    h.session.on_tick(ID, 5399, &h.app, &mut Registries::none());
    assert!(!h.session.should_close());
    h.session.on_tick(ID, 5400, &h.app, &mut Registries::none());
    assert!(h.session.should_close(), "no pong for the ping at 3400");
    assert_eq!(
        h.reasons(),
        [TerminateReason::Error(TerminateError::PongTimeout)]
    );
}

#[test]
fn peer_gone_and_shut_down() {
    let mut h = harness(Limits::default(), None);
    h.open();
    h.session
        .on_peer_gone(ID, Some(104), h.now, &h.app, &mut Registries::none());
    assert_eq!(
        h.reasons(),
        [TerminateReason::Error(TerminateError::Io(104))]
    );
    let mut h = harness(Limits::default(), None);
    h.open();
    h.session
        .shut_down(ID, h.now, &h.app, &mut Registries::none());
    assert!(h.session.is_terminated() && h.session.should_close());
    assert_eq!(
        h.reasons(),
        [TerminateReason::Stop],
        "a session shut down terminates"
    );
}

#[test]
fn subprotocol_selected_in_connect() {
    let mut h = harness(Limits::default(), None);
    let req = UPGRADE.replace("\r\n\r\n", "\r\nSec-WebSocket-Protocol: v0, v1\r\n\r\n");
    h.recv(req.as_bytes());
    let out = String::from_utf8_lossy(&h.output()).into_owned();
    assert!(out.contains("Sec-WebSocket-Protocol: v1\r\n"), "{out}");
}

// ----- permessage-deflate -----

const UPGRADE_DEFLATE: &str = "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n";

/// Server frames, with RSV1 frames inflated: (opcode, compressed, payload).
fn deflate_frames(mut bytes: &[u8], inflater: &mut Inflater) -> Vec<(OpCode, bool, Vec<u8>)> {
    let cfg = DecoderConfig {
        role: Role::Client,
        max_message_bytes: u64::MAX >> 1,
        allowed_rsv: RSV1,
    };
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let mut copy = bytes.to_vec();
        match crate::protocol::codec::decode_frame(&mut copy, &cfg).unwrap() {
            Decoded::Complete(f, used) => {
                let compressed = f.header.rsv & RSV1 != 0;
                let payload = if compressed {
                    let mut plain = Vec::new();
                    inflater
                        .inflate(f.payload, &mut plain, usize::MAX >> 1, false)
                        .unwrap();
                    plain
                } else {
                    f.payload.to_vec()
                };
                out.push((f.header.opcode, compressed, payload));
                bytes = &bytes[used..];
            }
            Decoded::Incomplete { .. } => panic!("partial server frame"),
        }
    }
    out
}

fn compressed_client_frame(op: OpCode, payload: &[u8], deflater: &mut Deflater) -> Vec<u8> {
    let mut compressed = Vec::new();
    deflater.compress(payload, &mut compressed, false);
    let mut out = Vec::new();
    encode_frame_into(&mut out, true, RSV1, op, &compressed, Some([9, 8, 7, 6]));
    out
}

fn open_deflate(limits: Limits) -> (Harness, String) {
    let mut h = harness(limits, None);
    h.recv(UPGRADE_DEFLATE.as_bytes());
    let out = h.output();
    let head = String::from_utf8(out).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (h, head)
}

use crate::protocol::deflate::{DeflateConfig, Deflater, Inflater};

/// The code of the close frame that ends the output, if it ends with one.
fn close_code(out: &[u8]) -> Option<u16> {
    let got = deflate_frames(out, &mut Inflater::new(15));
    match got.last() {
        Some((OpCode::Close, false, payload)) if payload.len() >= 2 => {
            Some(u16::from_be_bytes([payload[0], payload[1]]))
        }
        _ => None,
    }
}

#[test]
fn deflate_is_agreed_and_messages_go_both_ways_compressed() {
    let (mut h, head) = open_deflate(Limits::default());
    assert!(
        head.contains("Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"),
        "{head}"
    );
    let (mut client, mut inflater) = (Deflater::new(6, 15), Inflater::new(15));
    let text = "héllo, compressed world ".repeat(100);
    h.recv(&compressed_client_frame(
        OpCode::Text,
        text.as_bytes(),
        &mut client,
    ));
    let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    h.recv(&compressed_client_frame(OpCode::Binary, &big, &mut client));
    // An uncompressed message on the same connection is fine too.
    h.send(OpCode::Text, b"plain");
    let out = h.output();
    let got = deflate_frames(&out, &mut inflater);
    assert_eq!(got.len(), 3);
    assert_eq!(got[0], (OpCode::Text, true, text.into_bytes()));
    assert_eq!(got[1], (OpCode::Binary, true, big));
    assert_eq!(got[2], (OpCode::Text, true, b"plain".to_vec()));
    assert!(
        out.len() < 100_000,
        "the replies were compressed: {}",
        out.len()
    );
    // Pings are never compressed.
    h.send(OpCode::Ping, b"p");
    assert_eq!(
        deflate_frames(&h.output(), &mut inflater),
        [(OpCode::Pong, false, b"p".to_vec())]
    );
}

#[test]
fn fragmented_compressed_message() {
    let (mut h, _) = open_deflate(Limits::default());
    let mut compressed = Vec::new();
    Deflater::new(1, 15).compress("fragmented ".repeat(50).as_bytes(), &mut compressed, true);
    let (a, b) = compressed.split_at(compressed.len() / 2);
    let mut wire = Vec::new();
    encode_frame_into(&mut wire, false, RSV1, OpCode::Text, a, Some([1, 2, 3, 4]));
    encode_frame_into(&mut wire, true, 0, OpCode::Ping, b"x", Some([1, 2, 3, 4]));
    encode_frame_into(
        &mut wire,
        true,
        0,
        OpCode::Continuation,
        b,
        Some([1, 2, 3, 4]),
    );
    // Delivered in two receives, split inside the second frame.
    let (first, second) = wire.split_at(a.len() + 5);
    h.recv(first);
    h.recv(second);
    let got = deflate_frames(&h.output(), &mut Inflater::new(15));
    assert_eq!(got[0], (OpCode::Pong, false, b"x".to_vec()));
    assert_eq!(
        got[1],
        (OpCode::Text, true, "fragmented ".repeat(50).into_bytes())
    );
}

#[test]
fn context_takeover_when_configured() {
    let limits = Limits {
        deflate: DeflateConfig {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            client_max_window_bits: 10,
            ..DeflateConfig::default()
        },
        ..Limits::default()
    };
    let (mut h, head) = open_deflate(limits);
    assert!(
        head.contains(
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits=10\r\n"
        ),
        "{head}"
    );
    let (mut client, mut inflater) = (Deflater::new(6, 10), Inflater::new(15));
    let msg = br#"{"from":"ann","text":"the same words, again and again"}"#;
    let mut sizes = Vec::new();
    for _ in 0..3 {
        h.recv(&compressed_client_frame(OpCode::Text, msg, &mut client));
        let out = h.output();
        sizes.push(out.len());
        assert_eq!(
            deflate_frames(&out, &mut inflater),
            [(OpCode::Text, true, msg.to_vec())]
        );
    }
    assert!(
        sizes[2] < sizes[0] / 2,
        "later replies refer back: {sizes:?}"
    );
}

#[test]
fn a_compression_bomb_is_closed_with_1009() {
    let limits = Limits {
        max_message_bytes: 100_000,
        ..Limits::default()
    };
    let (mut h, _) = open_deflate(limits);
    let zeros = vec![0u8; 10_000_000];
    let mut wire = Vec::new();
    Deflater::new(9, 15).compress(&zeros, &mut wire, true);
    assert!(wire.len() < 20_000);
    let mut frame = Vec::new();
    encode_frame_into(
        &mut frame,
        true,
        RSV1,
        OpCode::Binary,
        &wire,
        Some([1, 2, 3, 4]),
    );
    h.recv(&frame);
    assert_eq!(close_code(&h.output()), Some(1009));
    assert_eq!(
        h.reasons(),
        [TerminateReason::Error(TerminateError::MessageTooBig)]
    );
}

#[test]
fn deflate_errors_and_their_close_codes() {
    let cases: [(&str, Vec<u8>, u16); 4] = [
        (
            "not deflate data",
            {
                let mut f = Vec::new();
                encode_frame_into(
                    &mut f,
                    true,
                    RSV1,
                    OpCode::Binary,
                    &[0xff; 8],
                    Some([1, 2, 3, 4]),
                );
                f
            },
            1007,
        ),
        (
            "invalid UTF-8 once inflated",
            {
                compressed_client_frame(
                    OpCode::Text,
                    &[b'a', 0xff, 0xfe],
                    &mut Deflater::new(1, 15),
                )
            },
            1007,
        ),
        (
            "RSV1 on a control frame",
            {
                let mut f = Vec::new();
                encode_frame_into(&mut f, true, RSV1, OpCode::Ping, b"", Some([1, 2, 3, 4]));
                f
            },
            1002,
        ),
        (
            "RSV1 on a continuation",
            {
                let mut f = Vec::new();
                encode_frame_into(&mut f, false, 0, OpCode::Text, b"a", Some([1, 2, 3, 4]));
                encode_frame_into(
                    &mut f,
                    true,
                    RSV1,
                    OpCode::Continuation,
                    b"b",
                    Some([1, 2, 3, 4]),
                );
                f
            },
            1002,
        ),
    ];
    for (what, wire, code) in cases {
        let (mut h, _) = open_deflate(Limits::default());
        h.recv(&wire);
        assert_eq!(close_code(&h.output()), Some(code), "{what}");
    }
    // Without the extension agreed, RSV1 is a protocol error.
    let mut h = harness(Limits::default(), None);
    h.open();
    h.recv(&compressed_client_frame(
        OpCode::Text,
        b"hello",
        &mut Deflater::new(1, 15),
    ));
    assert_eq!(close_code(&h.output()), Some(1002));
}

#[test]
fn deflate_switched_off_or_declined() {
    let limits = Limits {
        deflate: DeflateConfig {
            enabled: false,
            ..DeflateConfig::default()
        },
        ..Limits::default()
    };
    let (_, head) = open_deflate(limits);
    assert!(!head.contains("Sec-WebSocket-Extensions"), "{head}");
    let mut h = harness(Limits::default(), None);
    h.recv(
        UPGRADE_DEFLATE
            .replace("client_max_window_bits", "server_max_window_bits=8")
            .as_bytes(),
    );
    let head = String::from_utf8(h.output()).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        !head.contains("Sec-WebSocket-Extensions"),
        "8-bit windows are declined: {head}"
    );
}
