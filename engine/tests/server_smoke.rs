//! The server end to end over real sockets, with a handwritten client on a blocking
//! `std` TcpStream: upgrade, echo, close, 404, drain, the peer address, messages that
//! span many receive buffers, and the accept back-off when descriptors run out.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use kythera_engine::config::Limits;
use kythera_engine::protocol::OpCode;
use kythera_engine::protocol::codec::encode_frame_into;
use kythera_engine::shard::ShardTuning;
use kythera_engine::{IoChoice, RunningServer, Server};
use kythera_handler_api::{Conn, Context, Message, Websocket};
use kythera_testkit::Echo;
use kythera_testkit::raw::upgrade_request;

/// Sends the peer address the gear was given as its first frame.
struct WhoAmI;

impl Websocket for WhoAmI {
    type State = ();
    type Message = ();
    fn init(&self, conn: &mut Conn, ctx: &mut Context<'_, ()>) {
        let peer = conn
            .peer()
            .map_or_else(|| "none".to_owned(), |p| p.to_string());
        ctx.send_text(&peer);
    }
    fn handle_client_message(&self, _: &mut (), _: Message<'_>, _: &mut Context<'_, ()>) {}
    fn handle_server_message(&self, _: &mut (), _: (), _: &mut Context<'_, ()>) {}
}

fn fast_limits() -> Limits {
    Limits {
        drain_window: Duration::from_millis(200),
        closing_timeout: Duration::from_millis(500),
        ..Limits::default()
    }
}

fn start(shards: usize) -> RunningServer {
    Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(shards)
        .limits(fast_limits())
        .mount("/echo", Echo)
        .mount("/whoami", WhoAmI)
        .build()
        .expect("server builds")
        .spawn()
}

/// One shard with the echo gear and the given io_uring tuning.
/// On io_uring whatever `KYTHERA_IO` says: the tests that tune the shard reach the
/// edges of io_uring's resources (the buffer ring, the direct-descriptor table,
/// zero-copy sends).
fn start_echo_tuned(tuning: ShardTuning) -> RunningServer {
    Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .io(IoChoice::Uring)
        .tuning(tuning)
        .limits(fast_limits())
        .mount("/echo", Echo)
        .build()
        .expect("server builds")
        .spawn()
}

const TIMEOUT: Duration = Duration::from_secs(10);

fn tcp(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(TIMEOUT)).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Reads an HTTP response head (up to the blank line).
fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => head.push(byte[0]),
            Err(err) => panic!("reading the response head: {err}"),
        }
    }
    String::from_utf8(head).expect("ASCII head")
}

/// Connects and upgrades; `None` if the server closes or resets the connection first.
fn try_upgrade(addr: SocketAddr) -> Option<TcpStream> {
    let mut stream = tcp(addr);
    stream.write_all(upgrade_request("/echo").as_bytes()).ok()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    head.starts_with(b"HTTP/1.1 101").then_some(stream)
}

/// Connects and upgrades; panics unless the answer is 101.
fn ws(addr: SocketAddr, path: &str) -> TcpStream {
    let mut stream = tcp(addr);
    stream.write_all(upgrade_request(path).as_bytes()).unwrap();
    let head = read_head(&mut stream);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // RFC 6455 section 1.3's example key and answer.
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    stream
}

fn send_frame(stream: &mut TcpStream, opcode: OpCode, payload: &[u8]) {
    let mut out = Vec::new();
    encode_frame_into(&mut out, true, 0, opcode, payload, Some([1, 2, 3, 4]));
    stream.write_all(&out).unwrap();
}

/// Reads one unmasked server frame: (opcode bits, payload).
fn read_frame(stream: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).expect("frame header");
    assert_eq!(head[0] & 0x80, 0x80, "FIN");
    assert_eq!(head[1] & 0x80, 0, "server frames are not masked");
    let len = match head[1] & 0x7f {
        126 => {
            let mut ext = [0u8; 2];
            stream.read_exact(&mut ext).unwrap();
            u64::from(u16::from_be_bytes(ext))
        }
        127 => {
            let mut ext = [0u8; 8];
            stream.read_exact(&mut ext).unwrap();
            u64::from_be_bytes(ext)
        }
        n => u64::from(n),
    };
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).expect("frame payload");
    (head[0] & 0x0f, payload)
}

/// Reads end-of-file (a reset counts too); panics on data or a timeout.
fn expect_eof(stream: &mut TcpStream) {
    let mut buf = [0u8; 256];
    match stream.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("unexpected {n} bytes before EOF: {:?}", &buf[..n]),
        Err(err) if err.kind() == ErrorKind::ConnectionReset => {}
        Err(err) => panic!("waiting for EOF: {err}"),
    }
}

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

#[test]
fn echo_close_and_404_on_two_shards() {
    let server = start(2);
    let addr = server.addr();

    let mut ws = ws(addr, "/echo");
    send_frame(&mut ws, OpCode::Text, b"hello");
    assert_eq!(read_frame(&mut ws), (0x1, b"hello".to_vec()));
    send_frame(&mut ws, OpCode::Binary, &[0, 1, 2, 255]);
    assert_eq!(read_frame(&mut ws), (0x2, vec![0, 1, 2, 255]));
    // Several frames in one write come back (possibly in one send).
    let mut batch = Vec::new();
    for i in 0..20u8 {
        encode_frame_into(
            &mut batch,
            true,
            0,
            OpCode::Text,
            &[b'a' + i],
            Some([9, 8, 7, 6]),
        );
    }
    ws.write_all(&batch).unwrap();
    for i in 0..20u8 {
        assert_eq!(read_frame(&mut ws), (0x1, vec![b'a' + i]));
    }
    // A ping is answered by the engine with a pong.
    send_frame(&mut ws, OpCode::Ping, b"p");
    assert_eq!(read_frame(&mut ws), (0xA, b"p".to_vec()));

    send_frame(&mut ws, OpCode::Close, &close_payload(1000, "bye"));
    let (opcode, payload) = read_frame(&mut ws);
    assert_eq!(opcode, 0x8);
    assert_eq!(&payload[..2], &1000u16.to_be_bytes());
    expect_eof(&mut ws);

    let mut other = tcp(addr);
    other
        .write_all(upgrade_request("/nowhere").as_bytes())
        .unwrap();
    let head = read_head(&mut other);
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");

    // Many connections, spread over both shards by SO_REUSEPORT.
    let mut clients: Vec<TcpStream> = (0..16).map(|_| ws_echo(addr)).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        send_frame(c, OpCode::Text, format!("client {i}").as_bytes());
    }
    for (i, c) in clients.iter_mut().enumerate() {
        assert_eq!(read_frame(c), (0x1, format!("client {i}").into_bytes()));
    }
    drop(clients);

    let started = Instant::now();
    let handle = server.handle().clone();
    drop(server); // drains and joins
    assert!(handle.is_draining());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let stats = handle.stats();
    assert_eq!(stats.len(), 2);
    let accepted: u64 = stats.iter().map(|s| s.accepted).sum();
    assert_eq!(accepted, 18, "{stats:?}");
    assert!(stats.iter().all(|s| s.open() == 0), "{stats:?}");
}

fn ws_echo(addr: SocketAddr) -> TcpStream {
    ws(addr, "/echo")
}

#[test]
fn drain_sends_1001_and_run_returns() {
    let server = start(2);
    let addr = server.addr();
    let mut a = ws(addr, "/echo");
    let mut b = ws(addr, "/echo");
    send_frame(&mut a, OpCode::Text, b"x");
    assert_eq!(read_frame(&mut a), (0x1, b"x".to_vec()));

    let handle = server.handle().clone();
    let stopper = std::thread::spawn(move || server.stop());
    for client in [&mut a, &mut b] {
        let (opcode, payload) = read_frame(client);
        assert_eq!(opcode, 0x8);
        assert_eq!(&payload[..2], &1001u16.to_be_bytes());
        assert_eq!(
            &payload[2..],
            kythera_engine::session::DRAIN_REASON.as_bytes()
        );
        send_frame(client, OpCode::Close, &payload[..2]);
        expect_eof(client);
    }
    stopper.join().unwrap().expect("run ends well");
    assert!(handle.is_draining());
    // The listeners are closed.
    assert!(TcpStream::connect(addr).is_err());
}

#[test]
fn drain_closes_a_peer_that_never_answers() {
    let server = start(1);
    let mut silent = ws(server.addr(), "/echo");
    let started = Instant::now();
    let stopper = std::thread::spawn(move || server.stop());
    let (opcode, _) = read_frame(&mut silent);
    assert_eq!(opcode, 0x8);
    // No close back: the server closes the socket after the closing timeout.
    expect_eof(&mut silent);
    stopper.join().unwrap().expect("run ends well");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn the_gear_sees_the_peer_address() {
    // Direct descriptors (the default) have no fd for getpeername: the shard reads the
    // address with getsockopt(SO_PEERNAME) through io_uring.
    for direct_slots in [None, Some(0)] {
        let server = Server::builder()
            .listen("127.0.0.1:0".parse().unwrap())
            .shards(1)
            .tuning(ShardTuning {
                direct_slots,
                ..ShardTuning::default()
            })
            .mount("/whoami", WhoAmI)
            .build()
            .unwrap()
            .spawn();
        let mut stream = ws(server.addr(), "/whoami");
        let (opcode, payload) = read_frame(&mut stream);
        assert_eq!(opcode, 0x1);
        let local = stream.local_addr().unwrap().to_string();
        assert_eq!(
            String::from_utf8(payload).unwrap(),
            local,
            "{direct_slots:?}"
        );
    }
}

#[test]
fn large_messages_span_many_small_buffers() {
    // Buffers consumed incrementally (the default) and taken whole by each receive.
    for incremental_buffers in [true, false] {
        large_messages_span_many_small_buffers_with(incremental_buffers);
    }
}

fn large_messages_span_many_small_buffers_with(incremental_buffers: bool) {
    // 16 buffers of 256 bytes: a 200 KB message crosses hundreds of receives, empties
    // the buffer ring (ENOBUFS, re-armed recv) and is echoed with large sends.
    let server = start_echo_tuned(ShardTuning {
        buf_entries: 16,
        buf_size: 256,
        incremental_buffers,
        ..ShardTuning::default()
    });
    let mut stream = ws(server.addr(), "/echo");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut out = Vec::new();
    encode_frame_into(
        &mut out,
        true,
        0,
        OpCode::Binary,
        &payload,
        Some([5, 6, 7, 8]),
    );
    // Write and read at once so that neither side's buffers fill up.
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        for _ in 0..3 {
            writer.write_all(&out).unwrap();
        }
    });
    for _ in 0..3 {
        let (opcode, echoed) = read_frame(&mut stream);
        assert_eq!(opcode, 0x2);
        assert!(echoed == payload, "echo differs");
    }
    sender.join().unwrap();
    let stats = server.handle().stats();
    assert!(stats[0].bytes_received > 600_000, "{stats:?}");
    // The ring ran dry and the recv was armed again.
    assert!(stats[0].enobufs > 0, "{stats:?}");
    assert!(stats[0].recv_rearms >= stats[0].enobufs, "{stats:?}");
}

#[test]
fn a_full_descriptor_table_backs_off_and_recovers() {
    // Four direct slots: the fifth connection finds the table full (ENFILE). The accept
    // backs off instead of spinning; open connections keep working; once one closes,
    // new connections are accepted again.
    let server = start_echo_tuned(ShardTuning {
        direct_slots: Some(4),
        accept_backoff_ms: 100,
        ..ShardTuning::default()
    });
    let addr = server.addr();
    let mut clients: Vec<TcpStream> = (0..4).map(|_| ws(addr, "/echo")).collect();

    let before = server.handle().stats()[0];
    let mut extra = tcp(addr);
    extra
        .write_all(upgrade_request("/echo").as_bytes())
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let during = server.handle().stats()[0];
    assert!(during.accept_backoffs >= 1, "{during:?}");
    // Backing off, not spinning: a few wake-ups per tick at most.
    let turns = during.loop_iterations - before.loop_iterations;
    assert!(turns < 200, "{turns} loop turns in 500 ms");

    // The open connections still work.
    for c in &mut clients {
        send_frame(c, OpCode::Text, b"still here");
        assert_eq!(read_frame(c), (0x1, b"still here".to_vec()));
    }

    // Free a slot: a new connection gets through after the back-off.
    let mut first = clients.remove(0);
    send_frame(&mut first, OpCode::Close, &close_payload(1000, ""));
    let _ = read_frame(&mut first);
    expect_eof(&mut first);
    // The kernel took `extra` off the backlog and closed it when the table was full
    // (direct accept installs the descriptor after accepting); a new one succeeds.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut again = loop {
        if let Some(stream) = try_upgrade(addr) {
            break stream;
        }
        assert!(Instant::now() < deadline, "no connection accepted again");
        std::thread::sleep(Duration::from_millis(50));
    };
    send_frame(&mut again, OpCode::Text, b"back");
    assert_eq!(read_frame(&mut again), (0x1, b"back".to_vec()));
}

#[test]
fn build_errors_are_explained() {
    let err = Server::builder()
        .mount("/echo", Echo)
        .build()
        .expect_err("no address");
    assert_eq!(err.to_string(), "no address to listen on");

    let err = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .mount("no-slash", Echo)
        .build()
        .expect_err("bad route");
    assert!(err.to_string().contains("must start with '/'"), "{err}");

    let err = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(0)
        .build()
        .expect_err("no shards");
    assert!(err.to_string().contains("shard count 0"), "{err}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let err = Server::builder()
        .listen(taken.local_addr().unwrap())
        .build()
        .expect_err("address in use");
    assert!(err.to_string().contains("cannot listen on"), "{err}");
}

#[test]
fn port_zero_is_shared_by_all_shards_and_addresses_are_reported() {
    let server = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(2)
        .mount("/echo", Echo)
        .build()
        .unwrap();
    let addrs = server.local_addrs();
    assert_eq!(addrs.len(), 2);
    assert_ne!(addrs[0].port(), 0);
    assert_ne!(addrs[0], addrs[1]);
    let server = server.spawn();
    for addr in server.addrs().to_vec() {
        let mut s = ws(addr, "/echo");
        send_frame(&mut s, OpCode::Text, b"ok");
        assert_eq!(read_frame(&mut s), (0x1, b"ok".to_vec()));
    }
}

/// On the text "flood", sends 32 frames of 1 MiB at once.
struct Flood;

impl Websocket for Flood {
    type State = ();
    type Message = ();
    fn init(&self, _: &mut Conn, _: &mut Context<'_, ()>) {}
    fn handle_client_message(&self, _: &mut (), msg: Message<'_>, ctx: &mut Context<'_, ()>) {
        if let Message::Text("flood") = msg {
            let chunk = vec![7u8; 1 << 20];
            for _ in 0..32 {
                ctx.send_binary(&chunk);
            }
        }
    }
    fn handle_server_message(&self, _: &mut (), _: (), _: &mut Context<'_, ()>) {}
}

#[test]
fn a_send_stuck_on_a_peer_that_stopped_reading_is_cut_off() {
    // 32 MiB go out in one send to a client that never reads: the socket buffers take a
    // few MiB and the send waits. The client's close finishes the session, but the
    // send cannot complete; after the closing timeout the shard stops waiting for it,
    // shuts the socket down and closes it.
    let server = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .limits(Limits {
            max_outgoing_bytes: 64 << 20,
            closing_timeout: Duration::from_millis(300),
            ..Limits::default()
        })
        .mount("/flood", Flood)
        .build()
        .unwrap()
        .spawn();
    let mut stream = ws(server.addr(), "/flood");
    send_frame(&mut stream, OpCode::Text, b"flood");
    std::thread::sleep(Duration::from_millis(200));
    send_frame(&mut stream, OpCode::Close, &close_payload(1000, ""));
    let handle = server.handle().clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = handle.stats()[0];
        if stats.open() == 0 {
            assert_eq!(stats.forced_closes, 1, "{stats:?}");
            assert!(stats.bytes_sent < 32 << 20, "{stats:?}");
            break;
        }
        assert!(Instant::now() < deadline, "not cut off: {stats:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn zero_copy_sends_echo_every_size() {
    // Every send is a SEND_ZC (threshold 1 byte): small frames, large frames, frames
    // batched into one send; the bytes must stay alive until each notification.
    let server = start_echo_tuned(ShardTuning {
        send_zc_min_bytes: Some(1),
        ..ShardTuning::default()
    });
    let mut stream = ws(server.addr(), "/echo");
    for size in [0usize, 1, 125, 126, 20_000, 300_000] {
        let payload: Vec<u8> = (0..size).map(|i| (i * 13 % 251) as u8).collect();
        let mut out = Vec::new();
        for _ in 0..3 {
            encode_frame_into(
                &mut out,
                true,
                0,
                OpCode::Binary,
                &payload,
                Some([1, 2, 3, 4]),
            );
        }
        let mut writer = stream.try_clone().unwrap();
        let sender = std::thread::spawn(move || writer.write_all(&out).unwrap());
        for _ in 0..3 {
            let (opcode, echoed) = read_frame(&mut stream);
            assert_eq!(opcode, 0x2);
            assert!(echoed == payload, "echo of {size} bytes differs");
        }
        sender.join().unwrap();
    }
    send_frame(&mut stream, OpCode::Close, &close_payload(1000, ""));
    let (opcode, _) = read_frame(&mut stream);
    assert_eq!(opcode, 0x8);
    expect_eof(&mut stream);
    let stats = server.handle().stats();
    assert!(stats[0].zero_copy_notifications > 0, "{stats:?}");
}

/// Calls of [`count_release`]: only the test below installs it.
static RELEASES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn count_release() {
    RELEASES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// Waits until the release hook has run `n` times (and not more).
fn await_releases(server: &RunningServer, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while RELEASES.load(std::sync::atomic::Ordering::Relaxed) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(RELEASES.load(std::sync::atomic::Ordering::Relaxed), n);
    assert_eq!(server.handle().stats()[0].memory_releases, n);
}

#[test]
fn memory_is_released_once_connections_stop_opening_and_closing() {
    let server = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .limits(fast_limits())
        .release_memory(count_release)
        .mount("/echo", Echo)
        .build()
        .expect("server builds")
        .spawn();
    let addr = server.addr();
    let mut clients: Vec<TcpStream> = (0..3).map(|_| ws_echo(addr)).collect();
    // Once after the connections opened, when a second has passed without another.
    await_releases(&server, 1);
    // Messages alone do not call it again.
    for round in 0..15u8 {
        for c in clients.iter_mut() {
            send_frame(c, OpCode::Binary, &[round; 100]);
            assert_eq!(read_frame(c), (0x2, vec![round; 100]));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(RELEASES.load(std::sync::atomic::Ordering::Relaxed), 1);
    // A close is churn too.
    let mut gone = clients.pop().unwrap();
    send_frame(&mut gone, OpCode::Close, &close_payload(1000, ""));
    assert_eq!(read_frame(&mut gone).0, 0x8);
    expect_eof(&mut gone);
    await_releases(&server, 2);
    let metrics = http_get(addr, "/metrics");
    assert!(
        metrics.contains("kythera_memory_releases_total{shard=\"0\"} 2"),
        "{metrics}"
    );
}

/// A plain GET; the whole response (the server closes after it).
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = tcp(addr);
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn pipelined_large_echoes_queue_in_chunks_and_go_out_whole() {
    // Room for 4 MiB queued behind a send (the default limit would close this client
    // as a slow consumer).
    let server = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .limits(Limits {
            max_outgoing_bytes: 64 << 20,
            ..fast_limits()
        })
        .mount("/echo", Echo)
        .build()
        .expect("server builds");
    let driver = server.driver();
    let server = server.spawn();
    let mut stream = ws(server.addr(), "/echo");
    // 256 messages of 16 KiB written at once while the client does not read yet: the
    // echoes queue behind a send in flight, in chunks sent by one sendmsg, which the
    // kernel takes only in part while the client's receive buffer is full (and the
    // send is continued from there).
    let payload =
        |i: u32| -> Vec<u8> { (0..16_384u32).map(|j| (i * 31 + j % 253) as u8).collect() };
    let mut out = Vec::new();
    for i in 0..256 {
        encode_frame_into(
            &mut out,
            true,
            0,
            OpCode::Binary,
            &payload(i),
            Some([1, 2, 3, 4]),
        );
    }
    let mut writer = stream.try_clone().unwrap();
    let sender = std::thread::spawn(move || writer.write_all(&out).unwrap());
    std::thread::sleep(Duration::from_millis(300));
    for i in 0..256 {
        let (opcode, echoed) = read_frame(&mut stream);
        assert_eq!(opcode, 0x2);
        assert!(echoed == payload(i), "echo {i} differs");
    }
    sender.join().unwrap();
    let stats = server.handle().stats();
    assert!(stats[0].vectored_sends > 0, "{stats:?}");
    // io_uring's sends return short here; epoll's socket takes the 4 MiB whole on
    // loopback (its waits for EPOLLOUT are tested by the stuck peer above).
    if driver == kythera_engine::DriverKind::Uring {
        assert!(stats[0].partial_sends > 0, "{stats:?}");
    }
}
