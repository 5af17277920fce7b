//! A connection's whole life against the real engine: each test starts a kythera server
//! in-process (`Server::builder()...spawn()`, two shards, 127.0.0.1:0) with the test
//! gear below, talks to it over real sockets, and stops it again.
//!
//! Clients are tokio-tungstenite (an independent implementation) where a well-behaved
//! client is wanted, and a raw TCP socket with hand-made frames where the test needs a
//! misbehaving one (unmasked frames, invalid UTF-8, a half-sent request, a client that
//! never reads). What the gear's `terminate` is told is recorded in a shared log and
//! awaited with a generous timeout; no test asserts on timing beyond such timeouts.
//!
//! Covered: echo of text and binary of several sizes, a first frame from `init`,
//! `connect` rejecting with its own response, subprotocol selection, client-initiated
//! and gear-initiated close, a panicking handler (1011, other connections unaffected),
//! idle timeout, message size limit, protocol errors (1002, 1007), the per-gear
//! connection limit (503), handshake timeout, slow consumer, drain (1001), 404 and 426.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use kythera_engine::config::Limits;
use kythera_handler_api::{
    CloseCode, Conn, Context, Message, Response, TerminateError, TerminateReason, Websocket,
};
use kythera_testkit::raw::{masked, unmasked, upgrade_request};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WireCode;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any awaited event may take before the test fails.
const WAIT: Duration = Duration::from_secs(10);

/// The drain reason of SPEC section 3.
const DRAIN_REASON: &str = "server shutting down; please reconnect";

type Log = Arc<Mutex<Vec<TerminateReason>>>;
type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

// ---------------------------------------------------------------------------------
// The test gear
// ---------------------------------------------------------------------------------

/// Echoes, and does what some requests and messages ask:
///
/// - `?reject=1`: `connect` answers 418 with a header and a body;
/// - subprotocols: picks `v2.kythera`, else `v1.kythera`, when offered;
/// - `?greet=1`: `init` sends "welcome";
/// - "close": closes with 4000 "bye" (and tries to send one more frame);
/// - "panic": panics;
/// - "flood:N": sends N binary frames of 64 KiB.
///
/// `terminate` records its reason in `log`.
struct Lab {
    log: Log,
}

impl Websocket for Lab {
    type State = ();
    type Message = ();

    fn connect(&self, conn: &mut Conn) -> Result<(), Response> {
        if conn.query_param("reject").is_some() {
            return Err(Response::new(418)
                .header("x-why", "teapot")
                .expect("valid header")
                .body("no upgrade for you"));
        }
        for wanted in ["v2.kythera", "v1.kythera"] {
            if conn.select_subprotocol(wanted).is_ok() {
                break;
            }
        }
        Ok(())
    }

    fn init(&self, conn: &mut Conn, ctx: &mut Context<'_, ()>) {
        if conn.query_param("greet").is_some() {
            ctx.send_text("welcome");
        }
    }

    fn handle_client_message(&self, _: &mut (), msg: Message<'_>, ctx: &mut Context<'_, ()>) {
        match msg {
            Message::Text("close") => {
                ctx.close_with(CloseCode::new(4000).expect("valid code"), "bye");
                ctx.send_text("never sent");
            }
            Message::Text("panic") => panic!("boom"),
            Message::Text(t) if t.starts_with("flood:") => {
                let n: usize = t["flood:".len()..].parse().expect("flood:N");
                let chunk = vec![0x5a; 64 * 1024];
                for _ in 0..n {
                    ctx.send_binary(&chunk);
                }
            }
            Message::Text(t) => ctx.send_text(t),
            Message::Binary(b) => ctx.send_binary(b),
        }
    }

    fn handle_server_message(&self, _: &mut (), _: (), _: &mut Context<'_, ()>) {}

    fn terminate(&self, _: (), reason: &TerminateReason, _: &mut Context<'_, ()>) {
        self.log.lock().unwrap().push(reason.clone());
    }
}

// ---------------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------------

/// A kythera server on 127.0.0.1:0 with two shards: `Lab` at `/echo`, and at
/// `/limited` with a limit of one connection. Dropping it (a failed test) drains and
/// joins through `RunningServer`'s own `Drop`; passing tests call [`TestServer::stop`].
struct TestServer {
    running: Option<kythera_engine::RunningServer>,
    addr: SocketAddr,
    log: Log,
}

impl TestServer {
    fn start(limits: Limits) -> TestServer {
        let log: Log = Arc::default();
        let running = kythera_engine::Server::builder()
            .listen("127.0.0.1:0".parse().unwrap())
            .shards(2)
            .limits(limits)
            .mount("/echo", Lab { log: log.clone() })
            .mount_with_limit("/limited", Lab { log: log.clone() }, 1)
            .build()
            .expect("server builds")
            .spawn();
        let addr = running.addrs()[0];
        TestServer {
            running: Some(running),
            addr,
            log,
        }
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }

    fn handle(&self) -> kythera_engine::ServerHandle {
        self.running.as_ref().expect("running").handle().clone()
    }

    /// The terminate reasons recorded so far.
    fn reasons(&self) -> Vec<TerminateReason> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until at least `n` terminate reasons are recorded; returns them all.
    async fn wait_reasons(&self, n: usize) -> Vec<TerminateReason> {
        let start = Instant::now();
        loop {
            let reasons = self.reasons();
            if reasons.len() >= n {
                return reasons;
            }
            assert!(
                start.elapsed() < WAIT,
                "waited {WAIT:?} for {n} terminate call(s), saw {reasons:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Drains the server and waits for its thread to finish; returns every terminate
    /// reason recorded over the server's life.
    async fn stop(mut self) -> Vec<TerminateReason> {
        let running = self.running.take().expect("running");
        running.handle().drain();
        let joined = tokio::task::spawn_blocking(move || running.join());
        tokio::time::timeout(WAIT, joined)
            .await
            .expect("the server did not stop within the timeout after drain()")
            .expect("the join thread panicked")
            .expect("the server ended with an error");
        self.reasons()
    }
}

// ---------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------

/// Fails the test if `fut` takes longer than [`WAIT`].
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?}: {what}"),
    }
}

async fn ws_connect(url: &str) -> Client {
    let (ws, resp) = within(url, tokio_tungstenite::connect_async(url))
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    assert_eq!(resp.status(), 101);
    ws
}

/// The next data message; pings and pongs are skipped, a close fails the test.
async fn next_data(ws: &mut Client) -> WsMessage {
    loop {
        match within("the next message", ws.next()).await {
            Some(Ok(m @ (WsMessage::Text(_) | WsMessage::Binary(_)))) => return m,
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => {}
            other => panic!("expected a data message, got {other:?}"),
        }
    }
}

/// Reads until the server's close frame and the end of the stream (letting
/// tungstenite answer the close); returns the close code and reason. Data messages
/// before the close are returned too.
async fn expect_close(ws: &mut Client) -> (Option<u16>, String, Vec<WsMessage>) {
    let mut before = Vec::new();
    let mut close = None;
    loop {
        match within("the server's close", ws.next()).await {
            Some(Ok(WsMessage::Close(frame))) => {
                close = Some(frame.map(|f| (u16::from(f.code), f.reason.as_str().to_owned())));
            }
            Some(Ok(m)) => {
                assert!(close.is_none(), "data after the server's close: {m:?}");
                before.push(m);
            }
            Some(Err(tungstenite::Error::ConnectionClosed)) | None => break,
            Some(Err(e)) => {
                if close.is_some() {
                    break; // the socket went away after the close handshake
                }
                panic!("error before the server's close: {e}");
            }
        }
    }
    match close {
        Some(Some((code, reason))) => (Some(code), reason, before),
        Some(None) => (None, String::new(), before),
        None => panic!("the stream ended without a close frame (after {before:?})"),
    }
}

async fn echo_roundtrip(ws: &mut Client, msg: WsMessage) {
    within("send", ws.send(msg.clone())).await.expect("send");
    let got = next_data(ws).await;
    assert!(got == msg, "echo differs: sent {msg:?}, got {got:?}");
}

/// Closes from the client with 1000 and waits for the server's answer.
async fn client_close(mut ws: Client) {
    within("close", ws.close(None)).await.expect("close");
    let (code, _, _) = expect_close(&mut ws).await;
    assert_eq!(code, None, "an empty close is answered with an empty close");
}

/// Sends `request` on a fresh connection and reads the whole answer (the server closes
/// the socket after a rejection): status, head and body.
async fn http(addr: SocketAddr, request: &str) -> (u16, String, Vec<u8>) {
    let mut s = within("connect", TcpStream::connect(addr)).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    within("the response and EOF", s.read_to_end(&mut all))
        .await
        .expect("read the response");
    let end = all
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&all)))
        + 4;
    let head = String::from_utf8_lossy(&all[..end]).into_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    (status, head, all[end..].to_vec())
}

/// A client with a small receive buffer, upgraded on `/echo`, that the tests never let
/// read: what the server sends it piles up.
async fn never_reading_client(addr: SocketAddr) -> Raw {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = within("connect", socket.connect(addr)).await.unwrap();
    Raw::upgrade(stream, "/echo").await
}

/// Sends `request` on a fresh connection and returns the response head; the
/// connection is then dropped.
async fn response_head(addr: SocketAddr, request: &str) -> String {
    let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
    let mut raw = Raw {
        stream,
        buf: Vec::new(),
    };
    raw.send(request.as_bytes()).await;
    loop {
        if let Some(end) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return String::from_utf8_lossy(&raw.buf[..end + 4]).into_owned();
        }
        assert!(raw.fill().await, "EOF before the response head");
    }
}

/// A websocket client on a raw socket, for what a well-behaved library will not do.
struct Raw {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    /// Connects and upgrades; fails the test unless the answer is 101.
    async fn open(addr: SocketAddr, path: &str) -> Raw {
        let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
        Raw::upgrade(stream, path).await
    }

    async fn upgrade(stream: TcpStream, path: &str) -> Raw {
        let mut raw = Raw {
            stream,
            buf: Vec::new(),
        };
        raw.send(upgrade_request(path).as_bytes()).await;
        let end = loop {
            if let Some(p) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            assert!(raw.fill().await, "EOF before the 101");
        };
        let head = String::from_utf8_lossy(&raw.buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        raw.buf.drain(..end);
        raw
    }

    async fn send(&mut self, bytes: &[u8]) {
        within("write", self.stream.write_all(bytes))
            .await
            .expect("write");
    }

    /// Reads more bytes; false at EOF or on a socket error (a reset after the close).
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match within("read", self.stream.read(&mut chunk)).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next server frame as (opcode, payload), or None at EOF.
    async fn frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((op, payload, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Some((op, payload));
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// Reads frames until a close; returns its code. Then expects EOF: a failed
    /// connection is closed by the server without waiting for our close.
    async fn expect_close_and_eof(&mut self) -> u16 {
        loop {
            match self.frame().await {
                Some((0x8, payload)) => {
                    assert!(payload.len() >= 2, "close without a code");
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    while self.fill().await {}
                    return code;
                }
                Some(_) => {}
                None => panic!("EOF without a close frame"),
            }
        }
    }
}

/// Parses one unmasked server frame at the start of `buf`.
fn parse_server_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames are not masked");
    let (len, at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if buf.len() < at + len {
        return None;
    }
    Some((buf[0] & 0x0f, buf[at..at + len].to_vec(), at + len))
}

// ---------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------

/// Text that is `n` bytes of UTF-8 with multi-byte characters (and ASCII to fill).
fn text_of(n: usize) -> String {
    let mut s = String::with_capacity(n);
    let pieces = ["k", "ü", "€", "🦀"];
    let mut i = 0;
    while n - s.len() >= 4 {
        s.push_str(pieces[i % pieces.len()]);
        i += 1;
    }
    while s.len() < n {
        s.push('.');
    }
    s
}

fn binary_of(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test]
async fn echo_text_and_binary_up_to_64_kib() {
    let server = TestServer::start(Limits::default());
    let mut ws = ws_connect(&server.url("/echo")).await;
    for size in [0, 1, 125, 126, 127, 65535, 65536, 65537] {
        echo_roundtrip(&mut ws, WsMessage::text(text_of(size))).await;
        echo_roundtrip(&mut ws, WsMessage::binary(binary_of(size))).await;
    }
    client_close(ws).await;
    server.wait_reasons(1).await;
    let reasons = server.stop().await;
    assert_eq!(
        reasons,
        [TerminateReason::RemoteClose {
            code: None,
            reason: String::new()
        }]
    );
}

/// A 1 MiB message echoed with the default limits: the echo is one frame of 1 MiB plus
/// its header, over the default outgoing limit of exactly 1 MiB, yet the client reads
/// everything; it must not be treated as a slow consumer.
#[tokio::test]
async fn echo_one_mebibyte_with_default_limits() {
    let server = TestServer::start(Limits::default());
    let mut ws = ws_connect(&server.url("/echo")).await;
    echo_roundtrip(&mut ws, WsMessage::text(text_of(1 << 20))).await;
    echo_roundtrip(&mut ws, WsMessage::binary(binary_of(1 << 20))).await;
    client_close(ws).await;
    server.wait_reasons(1).await;
    server.stop().await;
}

#[tokio::test]
async fn init_sends_a_first_frame() {
    let server = TestServer::start(Limits::default());
    let mut ws = ws_connect(&server.url("/echo?greet=1")).await;
    assert_eq!(next_data(&mut ws).await, WsMessage::text("welcome"));
    echo_roundtrip(&mut ws, WsMessage::text("after the greeting")).await;
    client_close(ws).await;
    server.wait_reasons(1).await;
    server.stop().await;
}

#[tokio::test]
async fn connect_rejects_with_its_own_response() {
    let server = TestServer::start(Limits::default());
    let url = server.url("/echo?reject=1");
    match within("connect", tokio_tungstenite::connect_async(url.as_str())).await {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 418);
            assert_eq!(resp.headers()["x-why"], "teapot");
            assert_eq!(resp.body().as_deref(), Some(&b"no upgrade for you"[..]));
        }
        other => panic!("expected an HTTP rejection, got {:?}", other.map(|_| ())),
    }
    // The same through a raw socket: the body is exactly the gear's.
    let (status, head, body) = http(server.addr, &upgrade_request("/echo?reject=1")).await;
    assert_eq!(status, 418, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("x-why: teapot"),
        "{head}"
    );
    assert_eq!(body, b"no upgrade for you");
    // A rejected connection never reached init, so terminate is not called.
    let reasons = server.stop().await;
    assert!(reasons.is_empty(), "{reasons:?}");
}

#[tokio::test]
async fn subprotocol_selected_by_the_gear() {
    let server = TestServer::start(Limits::default());
    let mut req = server.url("/echo").into_client_request().unwrap();
    req.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "v1.kythera, v2.kythera, other".parse().unwrap(),
    );
    let (ws, resp) = within("connect", tokio_tungstenite::connect_async(req))
        .await
        .expect("upgrade with a subprotocol");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "v2.kythera");
    client_close(ws).await;

    let mut req = server.url("/echo").into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "v1.kythera".parse().unwrap());
    let (ws, resp) = within("connect", tokio_tungstenite::connect_async(req))
        .await
        .expect("upgrade with a subprotocol");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "v1.kythera");
    client_close(ws).await;

    // None offered that the gear knows: a 101 without the header.
    let request =
        upgrade_request("/echo").replace("\r\n\r\n", "\r\nSec-WebSocket-Protocol: v9\r\n\r\n");
    let head = response_head(server.addr, &request).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("sec-websocket-protocol"),
        "{head}"
    );
    // Two clean closes and the raw socket's EOF.
    server.wait_reasons(3).await;
    server.stop().await;
}

#[tokio::test]
async fn client_close_is_answered_and_reported() {
    let server = TestServer::start(Limits::default());
    let mut ws = ws_connect(&server.url("/echo")).await;
    echo_roundtrip(&mut ws, WsMessage::text("hello")).await;
    within(
        "close",
        ws.close(Some(CloseFrame {
            code: WireCode::from(3003),
            reason: "client leaving".into(),
        })),
    )
    .await
    .expect("close");
    let (code, _, before) = expect_close(&mut ws).await;
    assert_eq!(
        code,
        Some(3003),
        "the server answers with the client's code"
    );
    assert!(before.is_empty());
    let expected = TerminateReason::RemoteClose {
        code: CloseCode::new(3003),
        reason: "client leaving".into(),
    };
    assert_eq!(
        server.wait_reasons(1).await,
        std::slice::from_ref(&expected)
    );
    assert_eq!(
        server.stop().await,
        [expected],
        "terminate runs exactly once"
    );
}

#[tokio::test]
async fn gear_closes_with_4000() {
    let server = TestServer::start(Limits::default());
    let mut ws = ws_connect(&server.url("/echo")).await;
    within("send", ws.send(WsMessage::text("close")))
        .await
        .unwrap();
    let (code, reason, before) = expect_close(&mut ws).await;
    assert_eq!(code, Some(4000));
    assert_eq!(reason, "bye");
    assert!(
        before.is_empty(),
        "nothing after the gear's close: {before:?}"
    );
    assert_eq!(server.wait_reasons(1).await, [TerminateReason::Stop]);
    assert_eq!(server.stop().await, [TerminateReason::Stop]);
}

#[tokio::test]
async fn handler_panic_closes_1011_and_spares_other_connections() {
    let server = TestServer::start(Limits::default());
    let mut bystander = ws_connect(&server.url("/echo")).await;
    echo_roundtrip(&mut bystander, WsMessage::text("before")).await;
    let mut victim = ws_connect(&server.url("/echo")).await;
    echo_roundtrip(&mut victim, WsMessage::text("still fine")).await;

    within("send", victim.send(WsMessage::text("panic")))
        .await
        .unwrap();
    let (code, _, _) = expect_close(&mut victim).await;
    assert_eq!(code, Some(1011));
    assert_eq!(
        server.wait_reasons(1).await,
        [TerminateReason::Error(TerminateError::HandlerPanic(
            "boom".into()
        ))]
    );

    // The connection that was open all along still works, and so do new ones.
    echo_roundtrip(&mut bystander, WsMessage::binary(binary_of(1000))).await;
    let mut fresh = ws_connect(&server.url("/echo")).await;
    echo_roundtrip(&mut fresh, WsMessage::text("after")).await;
    client_close(bystander).await;
    client_close(fresh).await;
    let reasons = server.wait_reasons(3).await;
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    server.stop().await;
}

#[tokio::test]
async fn idle_timeout_closes_1000() {
    let server = TestServer::start(Limits {
        idle_timeout: Duration::from_secs(1),
        ..Limits::default()
    });
    let mut ws = ws_connect(&server.url("/echo")).await;
    echo_roundtrip(&mut ws, WsMessage::text("then silence")).await;
    let (code, _, before) = expect_close(&mut ws).await;
    assert_eq!(code, Some(1000));
    assert!(before.is_empty());
    assert_eq!(server.wait_reasons(1).await, [TerminateReason::Timeout]);
    assert_eq!(server.stop().await, [TerminateReason::Timeout]);
}

#[tokio::test]
async fn message_over_the_limit_closes_1009() {
    let server = TestServer::start(Limits {
        max_message_bytes: 1000,
        ..Limits::default()
    });
    let mut ws = ws_connect(&server.url("/echo")).await;
    echo_roundtrip(&mut ws, WsMessage::binary(binary_of(1000))).await;
    within("send", ws.send(WsMessage::binary(binary_of(1001))))
        .await
        .unwrap();
    let (code, _, before) = expect_close(&mut ws).await;
    assert_eq!(code, Some(1009));
    assert!(before.is_empty());
    let expected = [TerminateReason::Error(TerminateError::MessageTooBig)];
    assert_eq!(server.wait_reasons(1).await, expected);
    assert_eq!(server.stop().await, expected);
}

#[tokio::test]
async fn unmasked_frame_closes_1002() {
    let server = TestServer::start(Limits::default());
    let mut raw = Raw::open(server.addr, "/echo").await;
    raw.send(&masked(0x1, b"masked is fine")).await;
    assert_eq!(raw.frame().await, Some((0x1, b"masked is fine".to_vec())));
    raw.send(&unmasked(0x1, b"unmasked is not")).await;
    assert_eq!(raw.expect_close_and_eof().await, 1002);
    let reasons = server.wait_reasons(1).await;
    assert!(
        matches!(
            reasons[..],
            [TerminateReason::Error(TerminateError::Protocol(_))]
        ),
        "{reasons:?}"
    );
    assert_eq!(server.stop().await.len(), 1);
}

#[tokio::test]
async fn invalid_utf8_text_closes_1007() {
    let server = TestServer::start(Limits::default());
    let mut raw = Raw::open(server.addr, "/echo").await;
    // "ok κό" (U+03BA, U+1F79): valid multi-byte UTF-8 is echoed.
    let valid = b"ok \xce\xba\xe1\xbd\xb9";
    raw.send(&masked(0x1, valid)).await;
    assert_eq!(raw.frame().await, Some((0x1, valid.to_vec())));
    raw.send(&masked(0x1, b"bad \xff\xfe")).await;
    assert_eq!(raw.expect_close_and_eof().await, 1007);
    let expected = [TerminateReason::Error(TerminateError::InvalidUtf8)];
    assert_eq!(server.wait_reasons(1).await, expected);
    assert_eq!(server.stop().await, expected);
}

#[tokio::test]
async fn per_gear_limit_answers_503() {
    let server = TestServer::start(Limits::default());
    let mut first = ws_connect(&server.url("/limited")).await;
    echo_roundtrip(&mut first, WsMessage::text("I hold the only slot")).await;

    match within(
        "connect",
        tokio_tungstenite::connect_async(server.url("/limited")),
    )
    .await
    {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            assert_eq!(
                resp.body().as_deref(),
                Some(&b"TooManyWebsocketConnections"[..])
            );
        }
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    let (status, _, body) = http(server.addr, &upgrade_request("/limited")).await;
    assert_eq!(status, 503);
    assert_eq!(body, b"TooManyWebsocketConnections");

    // Other gears are not limited by it.
    let other = ws_connect(&server.url("/echo")).await;
    client_close(other).await;

    // Once the first connection is gone, its slot is free again.
    client_close(first).await;
    server.wait_reasons(2).await;
    let start = Instant::now();
    let again = loop {
        match tokio_tungstenite::connect_async(server.url("/limited")).await {
            Ok((ws, _)) => break ws,
            Err(tungstenite::Error::Http(resp)) if resp.status() == 503 => {
                assert!(start.elapsed() < WAIT, "the slot was never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("reconnecting: {e}"),
        }
    };
    client_close(again).await;
    server.wait_reasons(3).await;
    server.stop().await;
}

#[tokio::test]
async fn handshake_timeout_closes_the_socket() {
    let server = TestServer::start(Limits {
        handshake_timeout: Duration::from_secs(1),
        ..Limits::default()
    });
    let mut s = within("connect", TcpStream::connect(server.addr))
        .await
        .unwrap();
    s.write_all(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    // EOF (or a reset) without a response.
    let _ = within("the server to close the socket", s.read_to_end(&mut got)).await;
    assert!(
        got.is_empty(),
        "no response on a handshake timeout, got {:?}",
        String::from_utf8_lossy(&got)
    );
    let reasons = server.stop().await;
    assert!(reasons.is_empty(), "no init, so no terminate: {reasons:?}");
}

#[tokio::test]
async fn slow_consumer_is_closed_and_others_go_on() {
    let server = TestServer::start(Limits {
        max_outgoing_bytes: 256 * 1024,
        ..Limits::default()
    });
    let mut bystander = ws_connect(&server.url("/echo")).await;

    // A client with a small receive buffer that asks for 128 KiB at a time (under the
    // limit per request) and never reads.
    let mut raw = never_reading_client(server.addr).await;
    let request = masked(0x1, b"flood:2");
    let start = Instant::now();
    while server.reasons().is_empty() {
        assert!(
            start.elapsed() < WAIT,
            "the client that never reads was not closed"
        );
        // The server keeps reading requests; once it closes the socket, writes fail.
        if within("write", raw.stream.write_all(&request))
            .await
            .is_err()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(
        server.wait_reasons(1).await,
        [TerminateReason::Error(TerminateError::SlowConsumer)]
    );
    drop(raw);

    echo_roundtrip(&mut bystander, WsMessage::binary(binary_of(200_000))).await;
    client_close(bystander).await;
    server.wait_reasons(2).await;
    server.stop().await;
}

/// Once a client is judged a slow consumer (1008), the server stops reading it: what
/// it keeps sending is not received (its bytes stop counting, its TCP window closes),
/// and its socket is closed after a short grace rather than the closing timeout.
#[tokio::test]
async fn a_slow_consumer_is_not_read_after_its_1008() {
    let server = TestServer::start(Limits {
        max_outgoing_bytes: 64 * 1024,
        ..Limits::default()
    });
    let mut raw = never_reading_client(server.addr).await;
    let request = masked(0x1, b"flood:2");
    let start = Instant::now();
    while server.reasons().is_empty() {
        assert!(start.elapsed() < WAIT, "the client was not judged slow");
        let _ = raw.stream.try_write(&request);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        server.wait_reasons(1).await,
        [TerminateReason::Error(TerminateError::SlowConsumer)]
    );
    let received = |server: &TestServer| -> u64 {
        server
            .handle()
            .stats()
            .iter()
            .map(|s| s.bytes_received)
            .sum()
    };
    // Give the cancellation a moment, then flood with data the server must not read.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = received(&server);
    let filler = masked(0x2, &[7u8; 8192]);
    let mut written = 0usize;
    let flood_until = Instant::now() + Duration::from_millis(600);
    let mut ended = false;
    while Instant::now() < flood_until {
        match raw.stream.try_write(&filler) {
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(_) => {
                ended = true;
                break;
            }
        }
    }
    let read_meanwhile = received(&server) - before;
    assert!(
        read_meanwhile < 64 * 1024,
        "the server read {read_meanwhile} of the {written} bytes a slow consumer sent after its 1008"
    );
    // And the socket is gone within the grace (writes fail, or reads see its end).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !ended {
        assert!(
            Instant::now() < deadline,
            "the slow consumer's socket stayed open"
        );
        let mut buf = [0u8; 65536];
        match tokio::time::timeout(Duration::from_millis(100), raw.stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => ended = true,
            _ => {}
        }
        if let Err(e) = raw.stream.try_write(&filler)
            && e.kind() != std::io::ErrorKind::WouldBlock
        {
            ended = true;
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn drain_closes_1001_and_terminates_with_stop() {
    let server = TestServer::start(Limits::default());
    let mut clients = Vec::new();
    for _ in 0..4 {
        let mut ws = ws_connect(&server.url("/echo")).await;
        echo_roundtrip(&mut ws, WsMessage::text("connected")).await;
        clients.push(ws);
    }
    let handle = server.handle();
    assert!(!handle.is_draining());
    handle.drain();
    assert!(handle.is_draining());
    for ws in &mut clients {
        let (code, reason, _) = expect_close(ws).await;
        assert_eq!(code, Some(1001));
        assert_eq!(reason, DRAIN_REASON);
    }
    let reasons = server.stop().await;
    assert_eq!(reasons, vec![TerminateReason::Stop; 4]);
}

#[tokio::test]
async fn unknown_path_is_404() {
    let server = TestServer::start(Limits::default());
    let (status, head, _) = http(server.addr, &upgrade_request("/nowhere")).await;
    assert_eq!(status, 404, "{head}");
    server.stop().await;
}

#[tokio::test]
async fn plain_get_on_a_websocket_route_is_426() {
    let server = TestServer::start(Limits::default());
    let (status, head, _) =
        http(server.addr, "GET /echo HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(status, 426, "{head}");
    server.stop().await;
}
