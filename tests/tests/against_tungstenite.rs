//! kythera's protocol core against an independent implementation: tungstenite plays
//! the client (handshake, masked frames, fragments, close) over an in-memory stream,
//! kythera's handshake and decoder play the server.

use std::collections::VecDeque;
use std::io::{self, Read, Write};

use kythera_engine::protocol::close::{encode_close_payload, parse_close_payload};
use kythera_engine::protocol::codec::encode_frame_into;
use kythera_engine::protocol::decoder::{Decoder, Step};
use kythera_engine::protocol::fragment::Event;
use kythera_engine::protocol::handshake::{
    MAX_HEADERS, parse_request, validate_upgrade, write_switching_protocols,
};
use kythera_engine::protocol::{DecoderConfig, OpCode};
use kythera_handler_api::{CloseCode, Message as Msg};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::client::ClientHandshake;
use tungstenite::protocol::frame::Frame;
use tungstenite::protocol::frame::coding::{Data, OpCode as TOp};
use tungstenite::{HandshakeError, Message, WebSocket};

/// A socket in memory: the client reads what the server wrote, and vice versa.
#[derive(Default)]
struct Pipe {
    to_client: VecDeque<u8>,
    to_server: Vec<u8>,
    /// The server closed the socket: reads past the queued bytes see EOF.
    closed: bool,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.to_client.is_empty() {
            if self.closed {
                return Ok(0);
            }
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.to_client.len());
        for (dst, src) in buf.iter_mut().zip(self.to_client.drain(..n)) {
            *dst = src;
        }
        Ok(n)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.to_server.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Handshake: tungstenite's request through kythera's parser, kythera's 101 through
/// tungstenite's checks (it verifies Sec-WebSocket-Accept and the subprotocol).
fn connect() -> WebSocket<Pipe> {
    let mut req = "ws://localhost/chat?room=a".into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "v1.kythera".parse().unwrap());
    let mid = match ClientHandshake::start(Pipe::default(), req, None)
        .unwrap()
        .handshake()
    {
        Err(HandshakeError::Interrupted(mid)) => mid,
        other => panic!(
            "expected to wait for the response, got {:?}",
            other.map(|_| ())
        ),
    };
    let mut mid = mid;
    let pipe = mid.get_mut().get_mut();
    let request = std::mem::take(&mut pipe.to_server);
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let parsed = parse_request(&request, &mut headers, 8192)
        .unwrap()
        .unwrap();
    assert_eq!(parsed.head_len, request.len());
    assert_eq!((parsed.path, parsed.query), ("/chat", "room=a"));
    let up = validate_upgrade(&parsed).expect("tungstenite's request is a valid upgrade");
    let mut resp = Vec::new();
    write_switching_protocols(
        &mut resp,
        up.key,
        Some("v1.kythera"),
        None,
        [("X-Served-By", "kythera")],
    );
    pipe.to_client.extend(resp);
    let (ws, response) = mid.handshake().expect("tungstenite accepts kythera's 101");
    assert_eq!(response.headers()["x-served-by"], "kythera");
    ws
}

/// Decodes everything the client wrote; returns the events as owned values.
fn server_receive(dec: &mut Decoder, ws: &mut WebSocket<Pipe>) -> Vec<String> {
    let mut bytes = std::mem::take(&mut ws.get_mut().to_server);
    let mut out = Vec::new();
    let mut start = 0;
    while start < bytes.len() {
        match dec
            .step(&mut bytes[start..])
            .expect("tungstenite's frames are valid")
        {
            Step::Event(ev, used) => {
                start += used;
                out.push(match ev {
                    Event::Message(Msg::Text(t)) => format!("text:{t}"),
                    Event::Message(Msg::Binary(b)) => format!("binary:{}", b.len()),
                    Event::Ping(p) => format!("ping:{}", String::from_utf8_lossy(p)),
                    Event::Pong(p) => format!("pong:{}", String::from_utf8_lossy(p)),
                    Event::Close(c) => {
                        format!("close:{:?}:{}", c.code.map(CloseCode::get), c.reason)
                    }
                    Event::Fragment => continue,
                    Event::Compressed { .. } => panic!("no extension was agreed"),
                });
            }
            Step::NeedMore { .. } => panic!("tungstenite wrote a partial frame"),
        }
    }
    out
}

fn server_send(ws: &mut WebSocket<Pipe>, opcode: OpCode, payload: &[u8]) {
    let mut wire = Vec::new();
    encode_frame_into(&mut wire, true, 0, opcode, payload, None);
    ws.get_mut().to_client.extend(wire);
}

#[test]
fn messages_both_ways() {
    let mut ws = connect();
    let mut dec = Decoder::new(DecoderConfig::SERVER_DEFAULT);
    for size in [0usize, 1, 125, 126, 65_535, 65_536, 300_000] {
        let text: String = "κόσμε".chars().cycle().take(size / 2).collect();
        ws.send(Message::text(text.clone())).unwrap();
        assert_eq!(server_receive(&mut dec, &mut ws), [format!("text:{text}")]);
        server_send(&mut ws, OpCode::Text, text.as_bytes());
        assert_eq!(ws.read().unwrap(), Message::text(text));

        let data = vec![0xa5u8; size];
        ws.send(Message::binary(data.clone())).unwrap();
        assert_eq!(
            server_receive(&mut dec, &mut ws),
            [format!("binary:{size}")]
        );
        server_send(&mut ws, OpCode::Binary, &data);
        assert_eq!(ws.read().unwrap(), Message::binary(data));
    }
}

#[test]
fn fragments_and_control_frames_from_tungstenite() {
    let mut ws = connect();
    let mut dec = Decoder::new(DecoderConfig::SERVER_DEFAULT);
    let text = "€ splits across frames €";
    let bytes = text.as_bytes();
    // Cut inside the first '€' (3 bytes) on purpose.
    ws.write(Message::Frame(Frame::message(
        bytes[..1].to_vec(),
        TOp::Data(Data::Text),
        false,
    )))
    .unwrap();
    ws.write(Message::Ping("p1".into())).unwrap();
    ws.write(Message::Frame(Frame::message(
        bytes[1..10].to_vec(),
        TOp::Data(Data::Continue),
        false,
    )))
    .unwrap();
    ws.write(Message::Frame(Frame::message(
        bytes[10..].to_vec(),
        TOp::Data(Data::Continue),
        true,
    )))
    .unwrap();
    ws.flush().unwrap();
    assert_eq!(
        server_receive(&mut dec, &mut ws),
        ["ping:p1".to_owned(), format!("text:{text}")]
    );

    // Server ping: tungstenite answers with a pong carrying the same payload.
    server_send(&mut ws, OpCode::Ping, b"hb");
    let _ = ws.read(); // delivers the ping and queues the pong
    ws.flush().unwrap();
    assert_eq!(server_receive(&mut dec, &mut ws), ["pong:hb"]);
}

#[test]
fn closing_handshake_started_by_client() {
    let mut ws = connect();
    let mut dec = Decoder::new(DecoderConfig::SERVER_DEFAULT);
    ws.close(Some(tungstenite::protocol::CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Away,
        reason: "leaving".into(),
    }))
    .unwrap();
    assert_eq!(
        server_receive(&mut dec, &mut ws),
        ["close:Some(1001):leaving"]
    );
    // Echo the code, as RFC 6455 section 5.5.1 suggests.
    let mut payload = [0u8; 125];
    let n = encode_close_payload(CloseCode::new(1001), "", &mut payload);
    server_send(&mut ws, OpCode::Close, &payload[..n]);
    // The server closes the TCP connection first (RFC 6455 section 7.1.1).
    ws.get_mut().closed = true;
    // tungstenite shows the server's answer, then reports the connection closed.
    match ws.read() {
        Ok(Message::Close(Some(cf))) => assert_eq!(u16::from(cf.code), 1001),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        ws.read(),
        Err(tungstenite::Error::ConnectionClosed)
    ));
}

#[test]
fn closing_handshake_started_by_server() {
    let mut ws = connect();
    let mut dec = Decoder::new(DecoderConfig::SERVER_DEFAULT);
    let mut payload = [0u8; 125];
    let n = encode_close_payload(
        Some(CloseCode::GOING_AWAY),
        "server shutting down; please reconnect",
        &mut payload,
    );
    server_send(&mut ws, OpCode::Close, &payload[..n]);
    match ws.read().unwrap() {
        Message::Close(Some(cf)) => {
            assert_eq!(u16::from(cf.code), 1001);
            assert_eq!(cf.reason.as_str(), "server shutting down; please reconnect");
        }
        other => panic!("{other:?}"),
    }
    ws.flush().unwrap();
    // tungstenite echoes our close, reason included; our decoder accepts it.
    let reply = server_receive(&mut dec, &mut ws);
    assert_eq!(
        reply,
        ["close:Some(1001):server shutting down; please reconnect"]
    );
    assert!(parse_close_payload(&1001u16.to_be_bytes()).is_ok());
}
