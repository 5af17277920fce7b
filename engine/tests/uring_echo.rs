//! The io_uring layer end to end: an [`Echo`] loop on a real listener on 127.0.0.1,
//! with std `TcpStream` clients on other threads sending messages (several larger than
//! a receive buffer) over several connections, and checking the echo byte for byte.
//!
//! The buffer ring is deliberately small (8 buffers of 256 bytes), so a 64 KiB message
//! drains it: the recv ends with `ENOBUFS` and must be re-armed.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use engine::uring::{Echo, EchoConfig, EchoStats, RingFlags, bind_reuseport};

const CLIENTS: usize = 3;
const CONNECTIONS_PER_CLIENT: usize = 2;
const SIZES: [usize; 7] = [1, 100, 256, 257, 1000, 5000, 64 * 1024];

/// What the server thread reports after it stopped.
struct ServerReport {
    stats: EchoStats,
    direct: bool,
    flags: RingFlags,
}

fn pattern(conn: usize, msg: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(31)
                .wrapping_add((conn * 7 + msg) as u32) as u8
        })
        .collect()
}

/// Sends every message on one connection and reads its echo; the write runs on its own
/// thread so a large message cannot dead-lock against the echo filling our receive buffer.
fn client_connection(addr: SocketAddr, conn: usize) {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    for (msg, &len) in SIZES.iter().enumerate() {
        let sent = pattern(conn, msg, len);
        let mut writer = stream.try_clone().expect("clone");
        let to_send = sent.clone();
        let write = thread::spawn(move || writer.write_all(&to_send).expect("write"));
        let mut echoed = vec![0; len];
        (&stream).read_exact(&mut echoed).expect("read echo");
        write.join().expect("writer");
        assert!(
            echoed == sent,
            "connection {conn} message {msg}: echo differs"
        );
    }
}

fn run(config: EchoConfig) -> ServerReport {
    let listener = bind_reuseport("127.0.0.1:0".parse().unwrap(), 128).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let total = (CLIENTS * CONNECTIONS_PER_CLIENT) as u64;

    // The ring is created on the thread that drives it (SINGLE_ISSUER).
    let server = thread::spawn(move || {
        let mut echo = Echo::new(listener, config).expect("echo loop");
        let deadline = Instant::now() + Duration::from_secs(30);
        echo.run_until(|stats| stats.closed == total || Instant::now() > deadline)
            .expect("run and shut down");
        assert_eq!(echo.in_flight(), 0);
        assert_eq!(echo.open_connections(), 0);
        assert!(!echo.accepting());
        ServerReport {
            stats: echo.stats(),
            direct: echo.uses_direct_descriptors(),
            flags: echo.ring_flags(),
        }
    });

    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            thread::spawn(move || {
                for i in 0..CONNECTIONS_PER_CLIENT {
                    client_connection(addr, client * CONNECTIONS_PER_CLIENT + i);
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client");
    }
    let report = server.join().expect("server");

    let stats = report.stats;
    let per_connection: u64 = SIZES.iter().map(|&n| n as u64).sum();
    assert_eq!(stats.accepted, total, "{stats:?}");
    // Every connection was closed by the server after the client's EOF.
    assert_eq!(stats.closed, total, "{stats:?}");
    assert_eq!(stats.bytes_received, total * per_connection, "{stats:?}");
    assert_eq!(stats.bytes_sent, total * per_connection, "{stats:?}");
    report
}

fn small_buffers(direct_slots: u32) -> EchoConfig {
    EchoConfig {
        sq_entries: 64,
        buf_entries: 8,
        buf_size: 256,
        direct_slots,
    }
}

#[test]
fn echo_with_direct_descriptors() {
    let report = run(small_buffers(64));
    assert!(report.direct, "direct descriptors work on Linux 6.18");
    assert_eq!(report.flags, RingFlags::ATTEMPTS[0]);
    // 64 KiB through 8 x 256 bytes: the ring runs dry and recv is re-armed.
    assert!(report.stats.enobufs > 0, "{:?}", report.stats);
    assert!(report.stats.recv_rearms > 0, "{:?}", report.stats);
}

#[test]
fn echo_with_plain_fds() {
    let report = run(small_buffers(0));
    assert!(!report.direct);
    assert!(report.stats.enobufs > 0, "{:?}", report.stats);
}

#[test]
fn echo_with_default_sizes() {
    let report = run(EchoConfig::default());
    assert!(report.direct);
}

#[test]
fn shutdown_closes_connections_still_open() {
    let listener = bind_reuseport("127.0.0.1:0".parse().unwrap(), 16).expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    let server = thread::spawn(move || {
        let mut echo = Echo::new(listener, small_buffers(16)).expect("echo loop");
        let mut told = false;
        echo.run_until(|stats| {
            if stats.bytes_sent == 5 && !told {
                ready_tx.send(()).expect("ready");
                told = true;
            }
            stop_rx.try_recv().is_ok()
        })
        .expect("shutdown");
        echo.stats()
    });

    // A client that stays connected while the server stops.
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(b"hello").expect("write");
    let mut echoed = [0; 5];
    stream.read_exact(&mut echoed).expect("echo");
    assert_eq!(&echoed, b"hello");
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("server saw the send complete");
    stop_tx.send(()).expect("stop");
    let stats = server.join().expect("server");
    assert_eq!(stats.accepted, 1);
    assert_eq!(stats.closed, 1);
    // The server closed the socket: the client reads EOF.
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).expect("EOF");
    assert!(rest.is_empty());
}
