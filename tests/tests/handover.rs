//! Live handover between two servers (issue 20), through the engine's API: a gear's
//! state (`freeze` / `thaw`), its names and its groups move to the new server with
//! the connection; a gear that does not opt in gets 1001 and is terminated on the old
//! server only; a state the new build refuses, or one too large to send, stays behind
//! and gets 1001 there; what was received of a message not whole yet, and output the
//! client has not read, move along; the
//! old server's `run` returns once it holds nothing. Both drivers:
//! the suite runs again with `KYTHERA_IO=epoll`. The binary's end-to-end scenarios
//! (1,000 clients, a new process killed midway, permessage-deflate, a half-received
//! frame, drivers mixed) are `tools/conformance/handover.py`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kythera_engine::{RunningServer, Server, ServerBuilder};
use kythera_handler_api::{Conn, Context, Frame, Message, TerminateReason, Websocket};
use kythera_testkit::raw::{RawClient, masked};
use tungstenite::{Message as WsMessage, WebSocket};

const TIMEOUT: Duration = Duration::from_secs(10);

static COUNTER_TERMINATED: AtomicUsize = AtomicUsize::new(0);
static PLAIN_TERMINATED: AtomicUsize = AtomicUsize::new(0);
static RELAY_TERMINATED: AtomicUsize = AtomicUsize::new(0);

/// Counts each connection's messages and answers `count N`; `name:X` registers `X`
/// and joins the group `all`; `all:X` publishes the frame `pub:X` to `all` (trailing
/// spaces cut), `big` a 300 KiB binary frame, `say:X` answers `said X` first,
/// `flood:N` a 16 KiB binary frame of bytes N first; server messages come back as
/// `srv:` and the text.
struct Counter {
    /// Answers start with this, to tell the two servers apart.
    tag: &'static str,
    /// Counts `terminate` calls (one counter per test: they run in parallel).
    terminated: &'static AtomicUsize,
}

impl Websocket for Counter {
    type State = u64;
    type Message = String;

    fn init(&self, _conn: &mut Conn, _ctx: &mut Context<'_, String>) -> u64 {
        0
    }

    fn handle_client_message(&self, n: &mut u64, msg: Message<'_>, ctx: &mut Context<'_, String>) {
        let Message::Text(text) = msg else { return };
        if let Some(name) = text.strip_prefix("name:") {
            ctx.register(name).unwrap();
            ctx.join("all").unwrap();
        }
        if text == "big" {
            // Larger than one message on the handover socket: never relayed.
            ctx.publish_frame("all", Frame::Binary(vec![7; 300 * 1024].into()))
                .unwrap();
        }
        if let Some(what) = text.strip_prefix("all:") {
            ctx.publish_frame("all", Frame::text(format!("pub:{}", what.trim_end())))
                .unwrap();
        }
        if let Some(n) = text.strip_prefix("flood:") {
            ctx.send_binary(&[n.parse::<u8>().unwrap(); 16 * 1024]);
        }
        if let Some(what) = text.strip_prefix("say:") {
            ctx.send_text(&format!("{} said {what}", self.tag));
        }
        *n += 1;
        ctx.send_text(&format!("{} count {n}", self.tag));
    }

    fn handle_server_message(&self, _n: &mut u64, msg: String, ctx: &mut Context<'_, String>) {
        ctx.send_text(&format!("srv:{msg}"));
    }

    fn terminate(&self, _n: u64, _reason: &TerminateReason, _ctx: &mut Context<'_, String>) {
        self.terminated.fetch_add(1, Ordering::SeqCst);
    }

    fn freeze(&self, n: &u64) -> Option<Vec<u8>> {
        let mut bytes = vec![1u8];
        bytes.extend_from_slice(&n.to_le_bytes());
        Some(bytes)
    }

    fn thaw(&self, frozen: &[u8]) -> Option<u64> {
        match frozen {
            [1, rest @ ..] => Some(u64::from_le_bytes(rest.try_into().ok()?)),
            _ => None,
        }
    }
}

/// Echoes, and does not opt in to handover.
struct Plain;

impl Websocket for Plain {
    type State = ();
    type Message = ();

    fn init(&self, _conn: &mut Conn, _ctx: &mut Context<'_, ()>) {}

    fn handle_client_message(&self, _: &mut (), msg: Message<'_>, ctx: &mut Context<'_, ()>) {
        if let Message::Text(t) = msg {
            ctx.send_text(t);
        }
    }

    fn handle_server_message(&self, _: &mut (), _: (), _: &mut Context<'_, ()>) {}

    fn terminate(&self, _: (), _: &TerminateReason, _: &mut Context<'_, ()>) {
        PLAIN_TERMINATED.fetch_add(1, Ordering::SeqCst);
    }
}

fn client(addr: std::net::SocketAddr, path: &str) -> WebSocket<TcpStream> {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    let (ws, _) = tungstenite::client(format!("ws://{addr}{path}"), stream).unwrap();
    ws
}

fn ask(ws: &mut WebSocket<TcpStream>, text: &str) -> String {
    ws.send(WsMessage::text(text)).unwrap();
    read_text(ws)
}

fn read_text(ws: &mut WebSocket<TcpStream>) -> String {
    match ws.read().unwrap() {
        WsMessage::Text(t) => t.to_string(),
        other => panic!("expected text, got {other:?}"),
    }
}

fn socket_path() -> PathBuf {
    std::env::temp_dir().join(format!("kythera-handover-test-{}.sock", std::process::id()))
}

#[test]
fn state_names_and_groups_move_and_a_gear_that_does_not_opt_in_gets_1001() {
    let path = socket_path();
    let old = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(2)
        .handover_socket(&path)
        .mount(
            "/c",
            Counter {
                tag: "old",
                terminated: &COUNTER_TERMINATED,
            },
        )
        .mount("/p", Plain)
        .build()
        .unwrap()
        .spawn();
    let addr = old.addr();
    let mut counters: Vec<_> = (0..4)
        .map(|i| {
            let mut ws = client(addr, "/c");
            assert_eq!(ask(&mut ws, &format!("name:n{i}")), "old count 1");
            assert_eq!(ask(&mut ws, "x"), "old count 2");
            ws
        })
        .collect();
    let mut plain = client(addr, "/p");
    assert_eq!(ask(&mut plain, "hi"), "hi");

    // The new server takes the listener at build time, the connections once it runs.
    let new = Server::builder()
        .listen(addr)
        .shards(2)
        .take_over(&path)
        .mount(
            "/c",
            Counter {
                tag: "new",
                terminated: &COUNTER_TERMINATED,
            },
        )
        .mount("/p", Plain)
        .build()
        .unwrap()
        .spawn();

    // The connection of the gear that does not opt in: 1001, terminated on the old
    // server.
    match plain.read() {
        Ok(WsMessage::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected a 1001 close, got {other:?}"),
    }
    let deadline = Instant::now() + TIMEOUT;
    while PLAIN_TERMINATED.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "Plain's terminate did not run");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(plain);
    // The old server holds nothing more: its run returns.
    old.join().unwrap();
    assert_eq!(
        COUNTER_TERMINATED.load(Ordering::SeqCst),
        0,
        "moved, not terminated"
    );

    // The state moved: the count goes on, answered by the new server.
    for ws in &mut counters {
        assert_eq!(ask(ws, "y"), "new count 3");
    }
    // The names and the group moved.
    let registry = new.handle().registry::<String>("/c").unwrap();
    assert_eq!(registry.send_message("n2", "to n2".into()), Ok(true));
    assert_eq!(read_text(&mut counters[2]), "srv:to n2");
    assert_eq!(registry.publish("all", "to all".into()), Ok(4));
    for ws in &mut counters {
        assert_eq!(read_text(ws), "srv:to all");
    }
    // New connections go to the new server, on the same address.
    let mut fresh = client(addr, "/c");
    assert_eq!(ask(&mut fresh, "z"), "new count 1");

    drop(counters);
    drop(fresh);
    new.stop().unwrap();
    assert_eq!(
        COUNTER_TERMINATED.load(Ordering::SeqCst),
        5,
        "terminated once, on the new server"
    );
    assert_eq!(PLAIN_TERMINATED.load(Ordering::SeqCst), 1);
}

/// The text of the next frame `raw` gets.
fn raw_text(raw: &mut RawClient) -> String {
    let mut buf = [0u8; 256];
    let (opcode, len) = raw.read_frame_into(&mut buf).unwrap();
    assert_eq!(opcode, 1, "expected a text frame");
    String::from_utf8(buf[..len].to_vec()).unwrap()
}

/// While a group's members are split between the two servers (one has moved, the
/// other waits on the old server for the rest of a frame), what either publishes
/// reaches both.
#[test]
fn frames_published_during_the_handover_reach_members_on_both_servers() {
    let (path, old) = old_counter("relay", 2, &RELAY_TERMINATED);
    let addr = old.addr();
    let mut a = client(addr, "/c");
    assert_eq!(ask(&mut a, "name:a"), "old count 1");
    let mut b = RawClient::open(addr, "/c");
    b.send(&masked(1, b"name:b"));
    assert_eq!(raw_text(&mut b), "old count 1");
    // The first fragment of b's next message, more than a connection takes along: b
    // cannot move before the message is whole. A ping behind it: its pong says the
    // server has read the fragment.
    let mut text = b"all:from-b".to_vec();
    text.resize(140 * 1024, b' ');
    let mut first = masked(1, &text);
    first[0] &= 0x7f; // FIN clear
    b.send(&first);
    b.send(&masked(9, b"p"));
    let mut buf = [0u8; 16];
    assert_eq!(b.read_frame_into(&mut buf).unwrap(), (10, 1), "a pong");

    let new = new_counter(addr, &path, 2, &RELAY_TERMINATED);
    // a moves; b stays behind.
    let deadline = Instant::now() + TIMEOUT;
    while !ask(&mut a, "x").starts_with("new") {
        assert!(Instant::now() < deadline, "a did not move");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Published on the new server: a gets it there, b on the old server.
    a.send(WsMessage::text("all:from-a")).unwrap();
    let got: Vec<_> = (0..2).map(|_| read_text(&mut a)).collect();
    assert!(got.contains(&"pub:from-a".to_string()), "{got:?}");
    assert_eq!(raw_text(&mut b), "pub:from-a");
    // Too large to relay: a gets it, b does not, it is counted, and the handover goes
    // on (b's next frame is the next text below).
    a.send(WsMessage::text("big")).unwrap();
    let big = (0..2)
        .map(|_| a.read().unwrap())
        .filter(|m| matches!(m, WsMessage::Binary(b) if b.len() == 300 * 1024))
        .count();
    assert_eq!(big, 1);
    assert!(new.handle().registry_stats("/c").unwrap().unrelayed >= 1);
    // Published on the old server (b's message completes there): b gets it there, a
    // on the new server.
    b.send(&masked(0, b""));
    let got: Vec<_> = (0..2).map(|_| raw_text(&mut b)).collect();
    assert!(got.contains(&"pub:from-b".to_string()), "{got:?}");
    assert!(got.contains(&"old count 2".to_string()), "{got:?}");
    assert_eq!(read_text(&mut a), "pub:from-b");
    let old_stats = old.handle().registry_stats("/c").unwrap();
    assert!(old_stats.relayed >= 1, "{old_stats:?}");

    // Then b moves too, and the old server is done.
    old.join().unwrap();
    b.send(&masked(1, b"y"));
    assert_eq!(raw_text(&mut b), "new count 3");
    let new_stats = new.handle().registry_stats("/c").unwrap();
    assert!(new_stats.relayed >= 1, "{new_stats:?}");
    // Relaying ended with the handover.
    a.send(WsMessage::text("all:after")).unwrap();
    let got: Vec<_> = (0..2).map(|_| read_text(&mut a)).collect();
    assert!(got.contains(&"pub:after".to_string()), "{got:?}");
    assert_eq!(raw_text(&mut b), "pub:after");
    assert_eq!(
        new.handle().registry_stats("/c").unwrap().relayed,
        new_stats.relayed
    );
    drop(a);
    drop(b);
    new.stop().unwrap();
    assert_eq!(
        RELAY_TERMINATED.load(Ordering::SeqCst),
        2,
        "once each, on the new server"
    );
}

/// An old server of `shards` shards with the `Counter` gear on `/c` (answers tagged
/// `old`), listening for a successor on a socket named after `name`.
fn old_counter(
    name: &str,
    shards: usize,
    terminated: &'static AtomicUsize,
) -> (PathBuf, RunningServer) {
    let path = std::env::temp_dir().join(format!("kythera-{name}-{}.sock", std::process::id()));
    let old = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(shards)
        .handover_socket(&path)
        .mount(
            "/c",
            Counter {
                tag: "old",
                terminated,
            },
        )
        .build()
        .unwrap()
        .spawn();
    (path, old)
}

/// The new server of `shards` shards that takes over from [`old_counter`]'s (answers
/// tagged `new`).
fn new_counter(
    addr: std::net::SocketAddr,
    path: &std::path::Path,
    shards: usize,
    terminated: &'static AtomicUsize,
) -> RunningServer {
    Server::builder()
        .listen(addr)
        .shards(shards)
        .take_over(path)
        .mount(
            "/c",
            Counter {
                tag: "new",
                terminated,
            },
        )
        .build()
        .unwrap()
        .spawn()
}

static PARTIAL_TERMINATED: AtomicUsize = AtomicUsize::new(0);

/// What was received of a message not whole yet moves with the connection: a first
/// fragment whose text ends inside a character, and half of the last fragment. The new
/// server completes the message with the rest, which only it receives.
#[test]
fn a_message_half_received_moves_with_its_connection() {
    let (path, old) = old_counter("partial", 1, &PARTIAL_TERMINATED);
    let addr = old.addr();
    let mut c = RawClient::open(addr, "/c");
    // "say:hé" with é cut in two, then "llo wörld" in the last fragment.
    let mut first = masked(1, b"say:h\xc3");
    first[0] &= 0x7f; // FIN clear
    let last = masked(0, "\u{a9}llo w\u{f6}rld".as_bytes()[1..].as_ref());
    // Half of the last fragment behind a ping, in one write: its pong says the server
    // has read the half too.
    let mut bytes = first;
    bytes.extend_from_slice(&masked(9, b"p"));
    bytes.extend_from_slice(&last[..9]);
    c.send(&bytes);
    let mut buf = [0u8; 64];
    assert_eq!(c.read_frame_into(&mut buf).unwrap(), (10, 1), "a pong");

    let new = new_counter(addr, &path, 1, &PARTIAL_TERMINATED);
    // The old server lets go of c, half message and all, and is done.
    old.join().unwrap();
    c.send(&last[9..]);
    assert_eq!(raw_text(&mut c), "new said h\u{e9}llo w\u{f6}rld");
    assert_eq!(raw_text(&mut c), "new count 1");
    let taken: u64 = new.handle().stats().iter().map(|s| s.handover_taken).sum();
    assert_eq!(taken, 1);
    drop(c);
    new.stop().unwrap();
    assert_eq!(PARTIAL_TERMINATED.load(Ordering::SeqCst), 1);
}

static UNSENT_TERMINATED: AtomicUsize = AtomicUsize::new(0);

/// Output waiting for a client that does not read moves with its connection: the send
/// in flight is stopped, and what it had not sent is sent by the new server, in order,
/// before its own answers.
#[test]
fn output_a_client_has_not_read_moves_with_its_connection() {
    let (path, old) = old_counter("unsent", 1, &UNSENT_TERMINATED);
    let addr = old.addr();
    // A client with a small receive buffer, which reads nothing for now.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&addr.into()).unwrap();
    let mut stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream
        .write_all(kythera_testkit::raw::upgrade_request("/c").as_bytes())
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let mut c = RawClient { stream };
    // 16 KiB answers until the server's send waits for the client (a partial send).
    let partial = |server: &RunningServer| -> u64 {
        server
            .handle()
            .stats()
            .iter()
            .map(|s| s.partial_sends)
            .sum()
    };
    let before = partial(&old);
    let mut floods = 0u8;
    while partial(&old) == before {
        assert!(floods < 200, "the server's send never had to wait");
        c.send(&masked(1, format!("flood:{floods}").as_bytes()));
        floods += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    let new = new_counter(addr, &path, 1, &UNSENT_TERMINATED);
    // The old server lets go of c, unsent output and all, and is done.
    old.join().unwrap();
    let taken: u64 = new.handle().stats().iter().map(|s| s.handover_taken).sum();
    assert_eq!(taken, 1);
    c.send(&masked(1, b"x"));
    let mut buf = vec![0u8; 32 * 1024];
    for i in 0..floods {
        let (op, len) = c.read_frame_into(&mut buf).unwrap();
        assert_eq!((op, len), (2, 16 * 1024), "flood {i}");
        assert!(buf[..len].iter().all(|&b| b == i), "flood {i}");
        let (op, len) = c.read_frame_into(&mut buf).unwrap();
        assert_eq!(op, 1);
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        assert_eq!(text, format!("old count {}", u64::from(i) + 1));
    }
    assert_eq!(
        raw_text(&mut c),
        format!("new count {}", u64::from(floods) + 1)
    );
    drop(c);
    new.stop().unwrap();
    assert_eq!(UNSENT_TERMINATED.load(Ordering::SeqCst), 1);
}

#[test]
fn taking_over_from_nobody_fails_to_build() {
    let path = std::env::temp_dir().join(format!("kythera-nobody-{}.sock", std::process::id()));
    let err = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .take_over(&path)
        .mount(
            "/c",
            Counter {
                tag: "x",
                terminated: &RELAY_TERMINATED,
            },
        )
        .build()
        .unwrap_err();
    assert!(err.to_string().contains("handover socket"), "{err}");
}

static REFUSED_TERMINATED: AtomicUsize = AtomicUsize::new(0);

/// Opts in with a state of `size` bytes, which `thaw` refuses when `refuse` is set.
struct Picky {
    size: usize,
    refuse: bool,
}

impl Websocket for Picky {
    type State = ();
    type Message = ();

    fn init(&self, _conn: &mut Conn, _ctx: &mut Context<'_, ()>) {}

    fn handle_client_message(&self, _: &mut (), msg: Message<'_>, ctx: &mut Context<'_, ()>) {
        if let Message::Text(t) = msg {
            ctx.send_text(t);
        }
    }

    fn handle_server_message(&self, _: &mut (), _: (), _: &mut Context<'_, ()>) {}

    fn terminate(&self, _: (), _: &TerminateReason, _: &mut Context<'_, ()>) {
        REFUSED_TERMINATED.fetch_add(1, Ordering::SeqCst);
    }

    fn freeze(&self, _: &()) -> Option<Vec<u8>> {
        Some(vec![1; self.size])
    }

    fn thaw(&self, _frozen: &[u8]) -> Option<()> {
        (!self.refuse).then_some(())
    }
}

/// The three gears of the next test: `/refused` (whose `thaw` says no with `refuse`),
/// `/large` (a 1 MiB state) and `/fine`.
trait MountPicky {
    fn mount_picky(self, refuse: bool) -> Self;
}

impl MountPicky for ServerBuilder {
    fn mount_picky(self, refuse: bool) -> Self {
        let picky = |size, refuse| Picky { size, refuse };
        self.mount("/refused", picky(8, refuse))
            .mount("/large", picky(1 << 20, false))
            .mount("/fine", picky(8, false))
    }
}

#[test]
fn a_state_refused_by_the_new_build_or_too_large_stays_behind_with_1001() {
    let path = std::env::temp_dir().join(format!("kythera-picky-{}.sock", std::process::id()));
    let old = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .handover_socket(&path)
        .mount_picky(false)
        .build()
        .unwrap()
        .spawn();
    let addr = old.addr();
    let mut refused = client(addr, "/refused");
    let mut large = client(addr, "/large");
    let mut fine = client(addr, "/fine");
    for ws in [&mut refused, &mut large, &mut fine] {
        assert_eq!(ask(ws, "a"), "a");
    }
    let new = Server::builder()
        .listen(addr)
        .shards(1)
        .take_over(&path)
        .mount_picky(true)
        .build()
        .unwrap()
        .spawn();
    // Both are closed by the old process, which terminates them there.
    for ws in [&mut refused, &mut large] {
        match ws.read() {
            Ok(WsMessage::Close(Some(frame))) => assert_eq!(u16::from(frame.code), 1001),
            other => panic!("expected a 1001 close, got {other:?}"),
        }
    }
    drop(refused);
    drop(large);
    old.join().unwrap();
    assert_eq!(
        REFUSED_TERMINATED.load(Ordering::SeqCst),
        2,
        "terminated on the old server"
    );
    assert_eq!(ask(&mut fine, "b"), "b");
    let stats = new.handle().stats();
    assert_eq!(stats.iter().map(|s| s.handover_taken).sum::<u64>(), 1);
    assert_eq!(stats.iter().map(|s| s.handover_refused).sum::<u64>(), 1);
    drop(fine);
    new.stop().unwrap();
    assert_eq!(REFUSED_TERMINATED.load(Ordering::SeqCst), 3);
}
