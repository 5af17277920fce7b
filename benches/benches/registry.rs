//! The registry's throughput (issue 4's goals): `send_message` streaming to a name on
//! the other shard; `publish` to 10,000 members spread over two shards; and
//! `publish_frame` to 10,000 connected members end to end through a one-shard engine,
//! counted as frames delivered to the clients' sockets.
//!
//! Each "shard" of the first two benches is a thread pinned to its own core, driving
//! its `ShardRegistry` the way the engine does (push, then `take_inbound` in batches).
//! Run: `cargo bench -p benches --bench registry`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kythera_engine::config::Limits;
use kythera_handler_api::{
    Conn, ConnId, Context, Frame, Message, RegistryError, RegistryOps, Websocket,
};
use kythera_registry::{Inbound, Registry, RegistryConfig, ShardRegistry, Wakeup};

/// Pins the calling thread to `cpu` (ignored where not allowed).
fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain old data; zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE on these machines (2 cores).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: reads the set on this stack; 0 is the calling thread.
    unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) };
}

/// A receiving shard on its own thread: takes its inbound queues in batches and counts
/// the deliveries (members reached), until told to stop.
struct Receiver {
    delivered: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn spawn(mut shard: ShardRegistry<u64>, members: Vec<ConnId>, cpu: usize) -> Receiver {
        let delivered = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (Arc::clone(&delivered), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            pin(cpu);
            for m in members {
                shard.join(m, "room").expect("join");
            }
            let mut batch = Vec::with_capacity(4096);
            while !s.load(Ordering::Relaxed) {
                batch.clear();
                shard.take_inbound(4096, &mut batch);
                if batch.is_empty() {
                    std::hint::spin_loop();
                    continue;
                }
                let mut sum = 0u64;
                for item in &batch {
                    if let Inbound::Message(_, m) = item {
                        sum = sum.wrapping_add(*m);
                    }
                }
                std::hint::black_box(sum);
                d.fetch_add(batch.len() as u64, Ordering::Release);
            }
        });
        Receiver {
            delivered,
            stop,
            thread: Some(thread),
        }
    }

    fn wait_for(&self, n: u64) {
        while self.delivered.load(Ordering::Acquire) < n {
            std::hint::spin_loop();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn two_shards() -> (Registry<u64>, ShardRegistry<u64>, ShardRegistry<u64>) {
    let reg = Registry::new(
        RegistryConfig::default(),
        Arc::new(Wakeup::new(2)),
        kythera_engine::protocol::codec::encode_server_frame,
    );
    let s0 = reg.shard(0).unwrap();
    let s1 = reg.shard(1).unwrap();
    (reg, s0, s1)
}

fn cross_shard_send(c: &mut Criterion) {
    pin(0);
    let (reg, mut s0, mut s1) = two_shards();
    s1.register(ConnId::new(1, 1), "sink").unwrap();
    let rx = Receiver::spawn(s1, Vec::new(), 1);
    let mut sent = 0u64;
    let mut group = c.benchmark_group("registry");
    group.throughput(Throughput::Elements(1));
    group.bench_function("send_message to the other shard (streaming)", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for i in 0..iters {
                loop {
                    match s0.send_message("sink", i) {
                        Ok(true) => break,
                        // End the turn (the staged messages go into the queue) and
                        // back off while the receiver catches up.
                        Err(RegistryError::Full) => {
                            s0.take_wakeups(|_| {});
                            for _ in 0..256 {
                                std::hint::spin_loop();
                            }
                        }
                        other => panic!("{other:?}"),
                    }
                }
                // A shard's turn ends after a batch of work; 64 sends stand for one.
                if i % 64 == 63 {
                    s0.take_wakeups(|_| {});
                }
            }
            s0.take_wakeups(|_| {});
            sent += iters;
            rx.wait_for(sent);
            start.elapsed()
        })
    });
    group.finish();
    drop(rx);
    let stats = reg.stats();
    println!(
        "send_message: forwarded {}, refused at the bound (then retried) {}",
        stats.forwarded, stats.dropped_full
    );
}

fn publish_10k(c: &mut Criterion) {
    const MEMBERS: u64 = 10_000;
    pin(0);
    let (_reg, mut s0, s1) = two_shards();
    for i in 0..MEMBERS / 2 {
        s0.join(ConnId::new(0, i), "room").unwrap();
    }
    let rx = Receiver::spawn(s1, (0..MEMBERS / 2).map(|i| ConnId::new(1, i)).collect(), 1);
    while s0.count("room").unwrap() < MEMBERS as usize {
        std::thread::yield_now();
    }
    let mut remote_expected = 0u64;
    let mut batch = Vec::with_capacity(8192);
    let mut group = c.benchmark_group("registry");
    group.throughput(Throughput::Elements(MEMBERS));
    group.bench_function(
        "publish to 10,000 members on 2 shards (members reached)",
        |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for i in 0..iters {
                    // Keep at most 64 publishes ahead of the other shard, far below the
                    // queue's bound, so that every publish reaches every member.
                    rx.wait_for(remote_expected.saturating_sub(64 * (MEMBERS / 2)));
                    let n = s0.publish("room", i).expect("publish");
                    assert_eq!(n, MEMBERS as usize);
                    remote_expected += MEMBERS / 2;
                    // The end of this shard's turn: its own members get the message
                    // (the engine delivers them from this batch) and the message
                    // staged for the other shard goes into the queue.
                    batch.clear();
                    s0.take_inbound(usize::MAX, &mut batch);
                    std::hint::black_box(&batch);
                    s0.take_wakeups(|_| {});
                }
                rx.wait_for(remote_expected);
                start.elapsed()
            })
        },
    );
    group.finish();
}

/// Joins `feed` and does nothing else: the members of the end-to-end bench.
struct Member;

impl Websocket for Member {
    type State = ();
    type Message = ();

    fn init(&self, _: &mut Conn, ctx: &mut Context<'_, ()>) {
        ctx.join("feed").expect("join");
    }

    fn handle_client_message(&self, _: &mut (), _: Message<'_>, _: &mut Context<'_, ()>) {}

    fn handle_server_message(&self, _: &mut (), _: (), _: &mut Context<'_, ()>) {}
}

/// Raises the soft open-file limit to the hard one (10,000 client sockets).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: writes into the struct on this stack.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: reads the struct on this stack.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}

/// Opens a WebSocket client connection and reads the 101.
fn ws_client(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    write!(
        s,
        "GET /feed HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("response");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s.set_nonblocking(true).unwrap();
    s
}

/// Reads every client socket with epoll and counts the bytes, on core 1.
fn spawn_drainer(
    clients: Vec<TcpStream>,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        pin(1);
        // SAFETY: epoll_create1 takes no pointers.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(ep >= 0);
        for (i, c) in clients.iter().enumerate() {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: registers a live socket; the event struct is on this stack.
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, c.as_raw_fd(), &mut ev) };
        }
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        let mut buf = vec![0u8; 256 * 1024];
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: `events` holds 1024 entries for the kernel to fill.
            let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), 1024, 10) };
            for ev in events.iter().take(n.max(0) as usize) {
                let mut s = &clients[ev.u64 as usize];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => panic!("the server closed a member"),
                        Ok(k) => {
                            received.fetch_add(k as u64, Ordering::Release);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        }
        // SAFETY: closes the epoll descriptor made above.
        unsafe { libc::close(ep) };
    })
}

fn publish_frame_end_to_end(c: &mut Criterion) {
    const MEMBERS: usize = 10_000;
    const PAYLOAD: usize = 16;
    raise_nofile();
    let limits = Limits {
        max_outgoing_bytes: 64 * 1024 * 1024,
        idle_timeout: Duration::from_secs(3600),
        max_connections_per_gear: MEMBERS * 2,
        ..Limits::default()
    };
    let server = kythera_engine::Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(1)
        .limits(limits)
        .mount("/feed", Member)
        .build()
        .expect("build")
        .spawn();
    let clients: Vec<TcpStream> = (0..MEMBERS).map(|_| ws_client(server.addr())).collect();
    let feed = server
        .handle()
        .registry::<()>("/feed")
        .expect("the gear's registry");
    while feed.count("feed") < MEMBERS {
        std::thread::sleep(Duration::from_millis(1));
    }
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let drainer = spawn_drainer(clients, Arc::clone(&received), Arc::clone(&stop));
    pin(1);
    let frame = Frame::Binary(Bytes::from(vec![7u8; PAYLOAD]));
    let wire_len = 2 + PAYLOAD as u64;
    let mut expected = 0u64;
    let mut group = c.benchmark_group("registry");
    group.sample_size(20);
    group.throughput(Throughput::Elements(MEMBERS as u64));
    group.bench_function(
        "publish_frame to 10,000 connected members, 1 shard (frames delivered)",
        |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    while feed.publish_frame("feed", frame.clone()).expect("publish") == 0 {
                        std::thread::yield_now(); // the shard's queue is full
                    }
                }
                expected += iters * MEMBERS as u64 * wire_len;
                while received.load(Ordering::Acquire) < expected {
                    std::hint::spin_loop();
                }
                start.elapsed()
            })
        },
    );
    group.finish();
    stop.store(true, Ordering::Relaxed);
    drainer.join().expect("drainer");
    let stats = feed.stats();
    println!(
        "publish_frame: {} frames published through the foreign queue, {} dropped at the bound (retried)",
        stats.from_foreign, stats.dropped_full
    );
    server.stop().expect("stop");
}

criterion_group!(
    benches,
    cross_shard_send,
    publish_10k,
    publish_frame_end_to_end
);
criterion_main!(benches);
