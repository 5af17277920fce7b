//! `echo-load`: a WebSocket echo load client for `tools/bench_echo.sh`.
//!
//! It opens `--connections` connections to `--url` (raw TCP; the upgrade is written by
//! hand and the answer must be `101` with the right `Sec-WebSocket-Accept`), keeps
//! `--inflight` messages of `--size` bytes in flight on each (text, or binary with
//! `--binary`), and sends the next message on a connection as soon as one of its echoes
//! is back. Every echo is checked: a whole unmasked frame of the same opcode carrying
//! exactly the payload that was sent (each connection cycles through four payloads that
//! name the connection, so crossed or reordered echoes are caught). After `--warmup`
//! seconds it measures for `--duration` seconds: round trips per second and the latency
//! of each round trip (send to echo, in an HDR histogram). Then it sends a close frame
//! on every connection and waits up to two seconds for the servers' close frames.
//!
//! With `--server-pid PID` it also reads the server's CPU time (utime + stime from
//! `/proc/PID/stat`, and the sum of `/proc/PID/task/*/schedstat` in nanoseconds) at the
//! exact start and end of the measured window, and its own CPU time (`getrusage`), so
//! that CPU per echoed message and both processes' utilisation come from the same
//! window as the message count. A client at ~100% CPU while the server is below it
//! means the client is the limit.
//!
//! Two engines: `--engine epoll` (default) is a hand-rolled level-triggered epoll loop
//! on one thread: one `read` per readable socket, the next frames written with one
//! `write`, the shared read buffer reused; `--engine tokio` is the same client on a
//! tokio current-thread runtime with one task per connection (kept to measure which one
//! costs less per message). Measured on the 2-core dev machine against fastwebsockets
//! (100 and 1000 connections, 20 B): the epoll engine spends 0.1 to 0.5 µs of user time
//! per round trip, tokio 0.4 to 0.7 µs; both spend about 3.3 µs in the kernel (loopback
//! TCP: the client's send also runs the server socket's receive path), so one client
//! core tops out near 300,000 round trips/s whatever its loop, and io_uring would save
//! only the ~0.1 µs syscall entries. Handshakes run on up to `--handshake-concurrency`
//! (default 200) threads at once before the loop starts.
//!
//! ```sh
//! cargo run --release -p benches --bin echo-load -- \
//!     --url ws://127.0.0.1:9001/echo --connections 100 --size 20 \
//!     --warmup 2 --duration 5 --json --server-pid "$SERVER_PID"
//! ```
//!
//! Output: one JSON line with `--json` (fields listed in [`Report::json`]), otherwise a
//! short human summary. Exit status 0 only if every handshake succeeded and no echo was
//! wrong or lost to a connection error; 1 otherwise; 2 for bad arguments.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use engine::protocol::codec::{self, Decoded, DecoderConfig, OpCode, Role};
use hdrhistogram::Histogram;

const USAGE: &str = "\
usage: echo-load --url ws://HOST:PORT/PATH [options]
  --connections C            connections (default 100)
  --size B                   payload bytes (default 20)
  --binary                   binary messages (default: text)
  --inflight P               messages in flight per connection (default 1)
  --warmup W                 seconds of warm-up (default 2)
  --duration D               seconds measured (default 5)
  --server-pid PID           read this process's CPU time around the measured window
  --engine epoll|tokio       client event loop (default epoll)
  --handshake-concurrency N  handshakes at once (default 200)
  --json                     one JSON line on stdout";

/// How many different payloads each connection cycles through.
const VARIANTS: usize = 4;
/// Errors described on stderr before they are only counted.
const MAX_ERROR_LINES: u64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EngineKind {
    Epoll,
    Tokio,
}

#[derive(Debug, Clone)]
struct Args {
    url: String,
    connections: usize,
    size: usize,
    binary: bool,
    inflight: usize,
    warmup: f64,
    duration: f64,
    server_pid: Option<i32>,
    engine: EngineKind,
    handshake_concurrency: usize,
    json: bool,
}

fn parse_args(argv: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        url: String::new(),
        connections: 100,
        size: 20,
        binary: false,
        inflight: 1,
        warmup: 2.0,
        duration: 5.0,
        server_pid: None,
        engine: EngineKind::Epoll,
        handshake_concurrency: 200,
        json: false,
    };
    let mut it = argv.into_iter();
    fn val(it: &mut impl Iterator<Item = String>, name: &str) -> Result<String, String> {
        it.next().ok_or_else(|| format!("{name} needs a value"))
    }
    fn num<T: std::str::FromStr>(v: String, name: &str) -> Result<T, String> {
        v.parse().map_err(|_| format!("bad {name} {v:?}"))
    }
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--url" => a.url = val(&mut it, "--url")?,
            "--connections" => a.connections = num(val(&mut it, &arg)?, &arg)?,
            "--size" => a.size = num(val(&mut it, &arg)?, &arg)?,
            "--binary" => a.binary = true,
            "--text" => a.binary = false,
            "--inflight" => a.inflight = num(val(&mut it, &arg)?, &arg)?,
            "--warmup" => a.warmup = num(val(&mut it, &arg)?, &arg)?,
            "--duration" => a.duration = num(val(&mut it, &arg)?, &arg)?,
            "--server-pid" => a.server_pid = Some(num(val(&mut it, &arg)?, &arg)?),
            "--handshake-concurrency" => {
                a.handshake_concurrency = num(val(&mut it, &arg)?, &arg)?;
            }
            "--engine" => {
                a.engine = match val(&mut it, &arg)?.as_str() {
                    "epoll" => EngineKind::Epoll,
                    "tokio" => EngineKind::Tokio,
                    other => return Err(format!("--engine is epoll or tokio, not {other:?}")),
                }
            }
            "--json" => a.json = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if a.url.is_empty() {
        return Err("--url is required".into());
    }
    if a.connections == 0 || a.inflight == 0 || a.handshake_concurrency == 0 {
        return Err("--connections, --inflight and --handshake-concurrency must be > 0".into());
    }
    if !(a.warmup >= 0.0 && a.duration > 0.0 && a.warmup.is_finite() && a.duration.is_finite()) {
        return Err("--warmup must be >= 0 and --duration > 0".into());
    }
    Ok(a)
}

/// `ws://HOST:PORT/PATH` split into the address to connect to, the `Host` header and
/// the request target.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
}

fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("only ws:// URLs are supported, not {url:?}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("no host in {url:?}"));
    }
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !authority.ends_with(']')
    {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let addr = with_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {authority:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority:?} resolves to no address"))?;
    Ok(Target {
        addr,
        host: authority.to_string(),
        path: path.to_string(),
    })
}

/// A small deterministic generator for keys and masks (no need for crypto here).
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// The payload of variant `k` on connection `conn`: it starts with `conn:k:` so that an
/// echo that went to the wrong connection, or came back out of order, differs. Text
/// payloads are ASCII; binary ones include bytes that are not UTF-8.
fn payload(conn: usize, k: usize, size: usize, binary: bool) -> Vec<u8> {
    let mut p = format!("{conn}:{k}:").into_bytes();
    let mut j = 0usize;
    while p.len() < size {
        let b = if binary {
            (conn.wrapping_mul(31) ^ k.wrapping_mul(17) ^ j.wrapping_mul(7)) as u8 | 0x80
        } else {
            b'a' + ((conn + k * 7 + j) % 26) as u8
        };
        p.push(b);
        j += 1;
    }
    p.truncate(size);
    p
}

/// What one connection sends and expects back.
struct Script {
    /// The masked frames, one per variant.
    frames: Vec<Vec<u8>>,
    /// The payloads they carry.
    payloads: Vec<Vec<u8>>,
    /// A masked close frame (1000).
    close: Vec<u8>,
}

impl Script {
    fn new(conn: usize, size: usize, binary: bool, rng: &mut XorShift) -> Script {
        let opcode = if binary { OpCode::Binary } else { OpCode::Text };
        let mask = (rng.next() as u32).to_ne_bytes();
        let payloads: Vec<Vec<u8>> = (0..VARIANTS)
            .map(|k| payload(conn, k, size, binary))
            .collect();
        let frames = payloads
            .iter()
            .map(|p| {
                let mut f = Vec::with_capacity(p.len() + codec::MAX_HEADER_BYTES);
                codec::encode_frame_into(&mut f, true, 0, opcode, p, Some(mask));
                f
            })
            .collect();
        let mut close = Vec::with_capacity(8);
        codec::encode_frame_into(
            &mut close,
            true,
            0,
            OpCode::Close,
            &1000u16.to_be_bytes(),
            Some(mask),
        );
        Script {
            frames,
            payloads,
            close,
        }
    }
}

/// The decoder settings for the server's frames: unmasked, no extensions.
const CLIENT_DECODER: DecoderConfig = DecoderConfig {
    role: Role::Client,
    max_message_bytes: u64::MAX >> 1,
    allowed_rsv: 0,
};

/// What a frame from the server turned out to be.
enum Echo {
    /// The expected echo.
    Ok,
    /// A close frame.
    Close,
}

/// Checks one decoded server frame against the payload expected next.
fn check_frame(frame: &codec::FrameRef<'_>, expected: &[u8], binary: bool) -> Result<Echo, String> {
    let h = &frame.header;
    match h.opcode {
        OpCode::Close => return Ok(Echo::Close),
        OpCode::Text | OpCode::Binary => {}
        other => return Err(format!("unexpected {other:?} frame from the server")),
    }
    if !h.fin {
        return Err("fragmented echo (FIN not set); this client expects whole frames".into());
    }
    let want = if binary { OpCode::Binary } else { OpCode::Text };
    if h.opcode != want {
        return Err(format!("sent {want:?}, got {:?} back", h.opcode));
    }
    if frame.payload != expected {
        let n = frame.payload.len().min(24);
        return Err(format!(
            "payload mismatch: sent {} bytes starting {:?}, got {} bytes starting {:?}",
            expected.len(),
            String::from_utf8_lossy(&expected[..expected.len().min(24)]),
            frame.payload.len(),
            String::from_utf8_lossy(&frame.payload[..n]),
        ));
    }
    Ok(Echo::Ok)
}

/// One connection after its handshake: the blocking socket and any bytes that arrived
/// after the 101's head.
struct Opened {
    stream: TcpStream,
    leftover: Vec<u8>,
}

/// Connects and upgrades one connection (blocking, with timeouts).
fn handshake(target: &Target, rng_seed: u64) -> Result<Opened, String> {
    let timeout = Duration::from_secs(10);
    let stream = TcpStream::connect_timeout(&target.addr, timeout)
        .map_err(|e| format!("connect to {}: {e}", target.addr))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut rng = XorShift::new(rng_seed);
    let mut raw_key = [0u8; 16];
    raw_key[..8].copy_from_slice(&rng.next().to_ne_bytes());
    raw_key[8..].copy_from_slice(&rng.next().to_ne_bytes());
    let key = base64::engine::general_purpose::STANDARD.encode(raw_key);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.path, target.host
    );
    (&stream)
        .write_all(request.as_bytes())
        .map_err(|e| format!("sending the upgrade request: {e}"))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    let head_len = loop {
        let n = (&stream)
            .read(&mut chunk)
            .map_err(|e| format!("reading the upgrade response: {e}"))?;
        if n == 0 {
            return Err(format!(
                "server closed the connection during the handshake (got {:?})",
                String::from_utf8_lossy(&buf)
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                if resp.code != Some(101) {
                    let head = String::from_utf8_lossy(&buf[..len]);
                    return Err(format!(
                        "expected 101 Switching Protocols, got {:?}",
                        head.lines().next().unwrap_or("")
                    ));
                }
                let accept = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
                    .map(|h| h.value)
                    .ok_or("101 without Sec-WebSocket-Accept")?;
                let want = engine::protocol::handshake::accept_key(&key);
                if accept != want.as_bytes() {
                    return Err(format!(
                        "Sec-WebSocket-Accept is {:?}, expected {want:?}",
                        String::from_utf8_lossy(accept)
                    ));
                }
                break len;
            }
            Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => {}
            Ok(httparse::Status::Partial) => return Err("response head over 16 KiB".into()),
            Err(e) => return Err(format!("malformed upgrade response: {e}")),
        }
    };
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok(Opened {
        leftover: buf.split_off(head_len),
        stream,
    })
}

/// Opens all connections, at most `concurrency` handshakes at once.
fn open_all(target: &Target, count: usize, concurrency: usize) -> Result<Vec<Opened>, String> {
    let next = AtomicUsize::new(0);
    let slots: Mutex<Vec<Option<Opened>>> = Mutex::new((0..count).map(|_| None).collect());
    let first_error: Mutex<Option<String>> = Mutex::new(None);
    let seed = std::process::id() as u64 ^ (now_nanos() << 16);
    std::thread::scope(|s| {
        for _ in 0..concurrency.min(count) {
            s.spawn(|| {
                loop {
                    if first_error.lock().unwrap().is_some() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    match handshake(target, seed ^ (i as u64).wrapping_mul(0x51_7CC1_B727_220A)) {
                        Ok(o) => slots.lock().unwrap()[i] = Some(o),
                        Err(e) => {
                            first_error
                                .lock()
                                .unwrap()
                                .get_or_insert(format!("connection {i}: {e}"));
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    Ok(slots
        .into_inner()
        .unwrap()
        .into_iter()
        .map(|o| o.expect("every slot filled"))
        .collect())
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return lim.rlim_max;
        }
    }
    lim.rlim_cur
}

/// A process's CPU time: `utime + stime` ticks from `/proc/PID/stat` (all threads) and
/// the sum of the first field of `/proc/PID/task/*/schedstat` (nanoseconds on a CPU).
#[derive(Debug, Clone, Copy, Default)]
struct ProcCpu {
    ticks: u64,
    user_ticks: u64,
    sched_ns: u64,
}

fn read_proc_cpu(pid: i32) -> Result<ProcCpu, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("reading /proc/{pid}/stat: {e}"))?;
    let after = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("malformed /proc/PID/stat")?;
    // Fields after "(comm)": state is field 3, utime field 14, stime field 15.
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields
        .get(11)
        .and_then(|f| f.parse().ok())
        .ok_or("no utime")?;
    let stime: u64 = fields
        .get(12)
        .and_then(|f| f.parse().ok())
        .ok_or("no stime")?;
    let mut sched_ns = 0u64;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for entry in dir.flatten() {
            if let Ok(s) = std::fs::read_to_string(entry.path().join("schedstat"))
                && let Some(ns) = s
                    .split_whitespace()
                    .next()
                    .and_then(|f| f.parse::<u64>().ok())
            {
                sched_ns += ns;
            }
        }
    }
    Ok(ProcCpu {
        ticks: utime + stime,
        user_ticks: utime,
        sched_ns,
    })
}

/// Busy ticks of the whole machine (all CPUs: user, nice, system, irq, softirq, steal)
/// from the first line of `/proc/stat`; with the server's and the client's own CPU time
/// it tells how much else ran during the window.
fn system_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    if f.len() < 8 {
        return None;
    }
    Some(f[0] + f[1] + f[2] + f[5] + f[6] + f[7])
}

/// This process's CPU time (user, system), in microseconds.
fn self_cpu_us() -> (u64, u64) {
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we pass, which lives for the call.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    (tv(ru.ru_utime), tv(ru.ru_stime))
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as u64 } else { 100 }
}

/// A snapshot at one edge of the measured window.
#[derive(Debug, Clone, Copy)]
struct Edge {
    at: Instant,
    messages: u64,
    /// (user, system) µs.
    client_cpu_us: (u64, u64),
    server: Option<ProcCpu>,
    system_busy: Option<u64>,
}

/// The counters a run keeps, whatever the engine.
struct Stats {
    binary: bool,
    /// Round trips completed (all phases).
    messages: u64,
    /// Latencies (ns) of round trips completed in the measured window.
    hist: Histogram<u64>,
    measuring: bool,
    errors: u64,
    server_pid: Option<i32>,
    server_cpu_error: Option<String>,
}

impl Stats {
    fn new(binary: bool, server_pid: Option<i32>) -> Stats {
        Stats {
            binary,
            messages: 0,
            hist: Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram bounds"),
            measuring: false,
            errors: 0,
            server_pid,
            server_cpu_error: None,
        }
    }

    fn error(&mut self, conn: usize, what: &str) {
        self.errors += 1;
        if self.errors <= MAX_ERROR_LINES {
            eprintln!("echo-load: connection {conn}: {what}");
        } else if self.errors == MAX_ERROR_LINES + 1 {
            eprintln!("echo-load: (further errors only counted)");
        }
    }

    #[inline]
    fn round_trip(&mut self, sent: Instant, now: Instant) {
        self.messages += 1;
        if self.measuring {
            let ns = now.saturating_duration_since(sent).as_nanos() as u64;
            self.hist.saturating_record(ns.max(1));
        }
    }

    fn edge(&mut self) -> Edge {
        let server = match self.server_pid {
            Some(pid) => match read_proc_cpu(pid) {
                Ok(c) => Some(c),
                Err(e) => {
                    self.server_cpu_error.get_or_insert(e);
                    None
                }
            },
            None => None,
        };
        Edge {
            at: Instant::now(),
            messages: self.messages,
            client_cpu_us: self_cpu_us(),
            server,
            system_busy: system_busy_ticks(),
        }
    }
}

/// Where a connection of the epoll engine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// Our close frame is sent; waiting for the server's.
    Closing,
    /// Closed cleanly, or dropped after an error.
    Done,
}

struct Conn {
    stream: TcpStream,
    script: Script,
    /// Bytes of a partial frame carried to the next read.
    pending: Vec<u8>,
    /// How many bytes that frame needs in all (0: no partial frame).
    need: usize,
    /// Bytes not yet written (the socket was full).
    out: Vec<u8>,
    /// When each message in flight was sent, oldest first.
    sent: VecDeque<Instant>,
    /// Variant of the next message to send / expected back.
    next_send: usize,
    next_recv: usize,
    state: State,
    clean_close: bool,
}

/// The epoll engine. Returns the two window edges.
fn run_epoll(
    args: &Args,
    opened: Vec<Opened>,
    scripts: Vec<Script>,
    stats: &mut Stats,
) -> Result<(Edge, Edge, u64), String> {
    let frame_len = scripts[0].frames[0].len();
    // SAFETY: epoll_create1 has no memory-safety preconditions.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        return Err(format!(
            "epoll_create1: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut conns: Vec<Conn> = Vec::with_capacity(opened.len());
    for (i, (o, script)) in opened.into_iter().zip(scripts).enumerate() {
        o.stream
            .set_nonblocking(true)
            .map_err(|e| format!("set_nonblocking: {e}"))?;
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: the fd is open (owned by `o.stream`) and `ev` lives for the call.
        if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, o.stream.as_raw_fd(), &mut ev) } != 0
        {
            return Err(format!("epoll_ctl: {}", std::io::Error::last_os_error()));
        }
        conns.push(Conn {
            stream: o.stream,
            script,
            pending: o.leftover,
            need: 0,
            out: Vec::new(),
            sent: VecDeque::with_capacity(args.inflight),
            next_send: 0,
            next_recv: 0,
            state: State::Running,
            clean_close: false,
        });
    }
    let mut rbuf = vec![0u8; (256 * 1024).max(4 * frame_len * args.inflight + 64 * 1024)];
    let mut wbuf: Vec<u8> = Vec::with_capacity(frame_len * args.inflight + 64);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];

    let t0 = Instant::now();
    for (i, c) in conns.iter_mut().enumerate() {
        wbuf.clear();
        for _ in 0..args.inflight {
            wbuf.extend_from_slice(&c.script.frames[c.next_send]);
            c.next_send = (c.next_send + 1) % VARIANTS;
            c.sent.push_back(t0);
        }
        if let Err(e) = send(epfd, i, c, &wbuf) {
            c.state = State::Done;
            stats.error(i, &e);
        }
    }
    // Bytes that arrived with the 101 (none from a well-behaved echo server).
    for (i, c) in conns.iter_mut().enumerate() {
        if !c.pending.is_empty() {
            let mut own = std::mem::take(&mut c.pending);
            let used = process(epfd, i, c, &mut own, &mut wbuf, stats);
            if c.state != State::Done && used < own.len() {
                own.drain(..used);
                c.pending = own;
            }
        }
    }

    let warm_end = t0 + Duration::from_secs_f64(args.warmup);
    let end = warm_end + Duration::from_secs_f64(args.duration);
    let mut start_edge: Option<Edge> = None;
    let mut end_edge: Option<Edge> = None;
    let mut close_deadline: Option<Instant> = None;

    loop {
        let now = Instant::now();
        if start_edge.is_none() && now >= warm_end {
            start_edge = Some(stats.edge());
            stats.measuring = true;
        }
        if end_edge.is_none() && now >= end {
            stats.measuring = false;
            end_edge = Some(stats.edge());
            for (i, c) in conns.iter_mut().enumerate() {
                if c.state == State::Running {
                    c.state = State::Closing;
                    let close = c.script.close.clone();
                    if send(epfd, i, c, &close).is_err() {
                        c.state = State::Done;
                    }
                }
            }
            close_deadline = Some(Instant::now() + Duration::from_secs(2));
        }
        if let Some(d) = close_deadline
            && (now >= d || conns.iter().all(|c| c.state == State::Done))
        {
            break;
        }
        if end_edge.is_none() && stats.errors >= conns.len() as u64 {
            return Err("every connection failed".into());
        }
        let next = if start_edge.is_none() {
            warm_end
        } else if end_edge.is_none() {
            end
        } else {
            close_deadline.unwrap_or(now)
        };
        let timeout_ms = next
            .saturating_duration_since(now)
            .as_micros()
            .div_ceil(1000)
            .min(1000) as i32;
        // SAFETY: `events` is a valid buffer of `events.len()` entries.
        let n =
            unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), events.len() as i32, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("epoll_wait: {e}"));
        }
        for ev in &events[..n as usize] {
            let i = ev.u64 as usize;
            let flags = ev.events;
            let c = &mut conns[i];
            if c.state == State::Done {
                continue;
            }
            if flags & libc::EPOLLOUT as u32 != 0 && !c.out.is_empty() {
                if let Err(e) = flush(epfd, i, c) {
                    fail(epfd, i, c, stats, &e);
                    continue;
                }
            }
            if flags & (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP) as u32 == 0 {
                continue;
            }
            // Normally the socket is read into the shared buffer. A frame that came in
            // part (rare for small messages) is completed in the connection's own
            // buffer, sized for the whole frame, and decoded once all of it is there.
            let mut own = std::mem::take(&mut c.pending);
            let have = own.len();
            let res = if have == 0 {
                (&c.stream).read(&mut rbuf)
            } else {
                let room = c.need.max(have + 64 * 1024);
                own.resize(room, 0);
                (&c.stream).read(&mut own[have..])
            };
            match res {
                Ok(0) => {
                    if c.state == State::Closing {
                        c.state = State::Done;
                        deregister(epfd, c);
                    } else {
                        fail(epfd, i, c, stats, "server closed the connection");
                    }
                }
                Ok(got) if have == 0 => {
                    let used = process(epfd, i, c, &mut rbuf[..got], &mut wbuf, stats);
                    if c.state != State::Done && used < got {
                        c.pending.extend_from_slice(&rbuf[used..got]);
                    }
                }
                Ok(got) => {
                    own.truncate(have + got);
                    if own.len() < c.need {
                        c.pending = own;
                        continue;
                    }
                    let used = process(epfd, i, c, &mut own, &mut wbuf, stats);
                    if c.state != State::Done && used < own.len() {
                        own.drain(..used);
                        c.pending = own;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
                    ) =>
                {
                    own.truncate(have);
                    c.pending = own;
                }
                Err(e) => {
                    if c.state == State::Closing {
                        c.state = State::Done;
                        deregister(epfd, c);
                    } else {
                        fail(epfd, i, c, stats, &format!("read: {e}"));
                    }
                }
            }
        }
    }
    let unclean = conns.iter().filter(|c| !c.clean_close).count() as u64;
    drop(conns);
    // SAFETY: epfd is ours and no longer used.
    unsafe { libc::close(epfd) };
    Ok((
        start_edge.expect("window started"),
        end_edge.expect("window ended"),
        unclean,
    ))
}

/// Decodes and checks every whole frame in `buf` (this connection's bytes, from the
/// start of a frame) and answers each echo with the next message. Returns how many
/// bytes it used; the rest is the start of a frame of `c.need` bytes.
fn process(
    epfd: i32,
    i: usize,
    c: &mut Conn,
    buf: &mut [u8],
    wbuf: &mut Vec<u8>,
    stats: &mut Stats,
) -> usize {
    wbuf.clear();
    let mut at = 0usize;
    let now = Instant::now();
    while at < buf.len() {
        let (used, outcome) = match codec::decode_frame(&mut buf[at..], &CLIENT_DECODER) {
            Ok(Decoded::Incomplete { needed }) => {
                c.need = usize::try_from(needed).unwrap_or(usize::MAX);
                break;
            }
            Ok(Decoded::Complete(frame, used)) => {
                let outcome = check_frame(&frame, &c.script.payloads[c.next_recv], stats.binary);
                (used, outcome)
            }
            Err(e) => {
                fail(
                    epfd,
                    i,
                    c,
                    stats,
                    &format!("bad frame from the server: {e:?}"),
                );
                return at;
            }
        };
        at += used;
        match outcome {
            Ok(Echo::Ok) => {
                let Some(sent) = c.sent.pop_front() else {
                    fail(epfd, i, c, stats, "an echo arrived with nothing in flight");
                    return at;
                };
                c.next_recv = (c.next_recv + 1) % VARIANTS;
                stats.round_trip(sent, now);
                if c.state == State::Running {
                    wbuf.extend_from_slice(&c.script.frames[c.next_send]);
                    c.next_send = (c.next_send + 1) % VARIANTS;
                    c.sent.push_back(now);
                }
            }
            Ok(Echo::Close) => {
                if c.state == State::Closing {
                    c.clean_close = true;
                    c.state = State::Done;
                    deregister(epfd, c);
                } else {
                    fail(epfd, i, c, stats, "server sent a close frame");
                }
                return at;
            }
            Err(e) => {
                fail(epfd, i, c, stats, &e);
                return at;
            }
        }
    }
    if at == buf.len() {
        c.need = 0;
    }
    if !wbuf.is_empty()
        && let Err(e) = send(epfd, i, c, wbuf)
    {
        fail(epfd, i, c, stats, &e);
    }
    at
}

fn fail(epfd: i32, i: usize, c: &mut Conn, stats: &mut Stats, what: &str) {
    if c.state == State::Done {
        return;
    }
    stats.error(i, what);
    c.state = State::Done;
    deregister(epfd, c);
}

fn deregister(epfd: i32, c: &mut Conn) {
    // SAFETY: the fd is still open (owned by `c.stream`); a null event is allowed for DEL.
    unsafe {
        libc::epoll_ctl(
            epfd,
            libc::EPOLL_CTL_DEL,
            c.stream.as_raw_fd(),
            std::ptr::null_mut(),
        )
    };
    let _ = c.stream.shutdown(std::net::Shutdown::Both);
}

/// Writes `bytes` (after anything already queued); what the socket does not take is
/// queued and EPOLLOUT armed.
fn send(epfd: i32, i: usize, c: &mut Conn, bytes: &[u8]) -> Result<(), String> {
    if !c.out.is_empty() {
        c.out.extend_from_slice(bytes);
        return Ok(());
    }
    let mut done = 0;
    while done < bytes.len() {
        match (&c.stream).write(&bytes[done..]) {
            Ok(0) => return Err("write returned 0".into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                c.out.extend_from_slice(&bytes[done..]);
                return arm(epfd, i, c, true);
            }
            Err(e) => return Err(format!("write: {e}")),
        }
    }
    Ok(())
}

fn flush(epfd: i32, i: usize, c: &mut Conn) -> Result<(), String> {
    let mut done = 0;
    while done < c.out.len() {
        match (&c.stream).write(&c.out[done..]) {
            Ok(0) => return Err("write returned 0".into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(format!("write: {e}")),
        }
    }
    c.out.drain(..done);
    if c.out.is_empty() {
        arm(epfd, i, c, false)?;
    }
    Ok(())
}

fn arm(epfd: i32, i: usize, c: &Conn, out: bool) -> Result<(), String> {
    let mut ev = libc::epoll_event {
        events: (libc::EPOLLIN | if out { libc::EPOLLOUT } else { 0 }) as u32,
        u64: i as u64,
    };
    // SAFETY: the fd is open (owned by `c.stream`) and `ev` lives for the call.
    if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_MOD, c.stream.as_raw_fd(), &mut ev) } != 0 {
        return Err(format!("epoll_ctl: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The tokio engine: one task per connection on a current-thread runtime.
fn run_tokio(
    args: &Args,
    opened: Vec<Opened>,
    scripts: Vec<Script>,
    stats: Stats,
) -> Result<(Edge, Edge, u64, Stats), String> {
    use std::cell::RefCell;
    use std::rc::Rc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))?;
    let stats = Rc::new(RefCell::new(stats));
    let local = tokio::task::LocalSet::new();
    let inflight = args.inflight;
    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);
    let edges = local.block_on(&rt, async {
        let t0 = Instant::now();
        for (i, (o, script)) in opened.into_iter().zip(scripts).enumerate() {
            o.stream
                .set_nonblocking(true)
                .map_err(|e| format!("set_nonblocking: {e}"))?;
            let mut stream = tokio::net::TcpStream::from_std(o.stream)
                .map_err(|e| format!("tokio TcpStream: {e}"))?;
            let stats = Rc::clone(&stats);
            let mut buf = o.leftover;
            tokio::task::spawn_local(async move {
                let res: Result<(), String> = async {
                    let frame_len = script.frames[0].len();
                    let mut wbuf = Vec::with_capacity(frame_len * inflight);
                    let mut sent = VecDeque::with_capacity(inflight);
                    let (mut next_send, mut next_recv) = (0usize, 0usize);
                    for _ in 0..inflight {
                        wbuf.extend_from_slice(&script.frames[next_send]);
                        next_send = (next_send + 1) % VARIANTS;
                        sent.push_back(t0);
                    }
                    stream
                        .write_all(&wbuf)
                        .await
                        .map_err(|e| format!("write: {e}"))?;
                    let mut filled = buf.len();
                    buf.resize((64 * 1024).max(4 * frame_len * inflight), 0);
                    loop {
                        if filled == buf.len() {
                            buf.resize(buf.len() * 2, 0);
                        }
                        let n = stream
                            .read(&mut buf[filled..])
                            .await
                            .map_err(|e| format!("read: {e}"))?;
                        if n == 0 {
                            return Err("server closed the connection".into());
                        }
                        filled += n;
                        let now = Instant::now();
                        wbuf.clear();
                        let mut at = 0;
                        {
                            let mut st = stats.borrow_mut();
                            while at < filled {
                                match codec::decode_frame(&mut buf[at..filled], &CLIENT_DECODER) {
                                    Ok(Decoded::Incomplete { .. }) => break,
                                    Ok(Decoded::Complete(frame, used)) => {
                                        match check_frame(
                                            &frame,
                                            &script.payloads[next_recv],
                                            st.binary,
                                        )? {
                                            Echo::Ok => {}
                                            Echo::Close => {
                                                return Err("server sent a close frame".into());
                                            }
                                        }
                                        at += used;
                                        let s = sent
                                            .pop_front()
                                            .ok_or("an echo arrived with nothing in flight")?;
                                        next_recv = (next_recv + 1) % VARIANTS;
                                        st.round_trip(s, now);
                                        wbuf.extend_from_slice(&script.frames[next_send]);
                                        next_send = (next_send + 1) % VARIANTS;
                                        sent.push_back(now);
                                    }
                                    Err(e) => {
                                        return Err(format!("bad frame from the server: {e:?}"));
                                    }
                                }
                            }
                        }
                        buf.copy_within(at..filled, 0);
                        filled -= at;
                        if !wbuf.is_empty() {
                            stream
                                .write_all(&wbuf)
                                .await
                                .map_err(|e| format!("write: {e}"))?;
                        }
                    }
                }
                .await;
                if let Err(e) = res {
                    stats.borrow_mut().error(i, &e);
                }
            });
        }
        tokio::time::sleep_until((t0 + warmup).into()).await;
        let start = {
            let mut st = stats.borrow_mut();
            let e = st.edge();
            st.measuring = true;
            e
        };
        tokio::time::sleep_until((start.at + duration).into()).await;
        let end = {
            let mut st = stats.borrow_mut();
            st.measuring = false;
            st.edge()
        };
        Ok::<_, String>((start, end))
    })?;
    // The tasks are dropped with the runtime (no closing handshake in this engine).
    drop(local);
    drop(rt);
    let stats = Rc::try_unwrap(stats)
        .map_err(|_| "stats still shared")?
        .into_inner();
    let unclean = args.connections as u64;
    Ok((edges.0, edges.1, unclean, stats))
}

/// The result of a run.
struct Report<'a> {
    args: &'a Args,
    start: Edge,
    end: Edge,
    stats: &'a Stats,
    unclean_closes: u64,
    nofile: u64,
}

impl Report<'_> {
    fn window_s(&self) -> f64 {
        self.end.at.duration_since(self.start.at).as_secs_f64()
    }
    fn messages(&self) -> u64 {
        self.end.messages - self.start.messages
    }
    fn rate(&self) -> f64 {
        self.messages() as f64 / self.window_s()
    }
    fn q_us(&self, q: f64) -> f64 {
        self.stats.hist.value_at_quantile(q) as f64 / 1000.0
    }

    /// The JSON line: the run's parameters, `messages`, `window_s`,
    /// `messages_per_sec`, latency `p50_us` / `p90_us` / `p99_us` / `p999_us` /
    /// `max_us` / `mean_us`, `errors`, `unclean_closes`, the client's `client_cpu_util`,
    /// `client_cpu_us_per_msg` and `client_user_us_per_msg` (its user-space part), and with `--server-pid` the server's
    /// `server_cpu_ticks`, `server_cpu_us` (from the ticks), `server_cpu_util`,
    /// `server_cpu_us_per_msg` (split into `server_user_us_per_msg` and
    /// `server_sys_us_per_msg`: utime and stime), `server_sched_ns` and
    /// `server_sched_us_per_msg`; and
    /// `system_busy_cores`: the whole machine's busy CPU time in the window, in cores
    /// (server + client + anything else; 2.0 is all of a 2-core machine).
    fn json(&self) -> String {
        let a = self.args;
        let w = self.window_s();
        let m = self.messages().max(1) as f64;
        let client_user = (self.end.client_cpu_us.0 - self.start.client_cpu_us.0) as f64;
        let client_us =
            client_user + (self.end.client_cpu_us.1 - self.start.client_cpu_us.1) as f64;
        let mut s = format!(
            "{{\"engine\":\"{}\",\"url\":\"{}\",\"connections\":{},\"size\":{},\"kind\":\"{}\",\
             \"inflight\":{},\"warmup_s\":{},\"duration_s\":{},\"window_s\":{:.6},\
             \"messages\":{},\"messages_per_sec\":{:.1},\"p50_us\":{:.1},\"p90_us\":{:.1},\
             \"p99_us\":{:.1},\"p999_us\":{:.1},\"max_us\":{:.1},\"mean_us\":{:.1},\
             \"errors\":{},\"unclean_closes\":{},\"nofile_limit\":{},\
             \"client_cpu_util\":{:.4},\"client_cpu_us_per_msg\":{:.4},\
             \"client_user_us_per_msg\":{:.4}",
            match a.engine {
                EngineKind::Epoll => "epoll",
                EngineKind::Tokio => "tokio",
            },
            a.url.replace('\\', "\\\\").replace('"', "\\\""),
            a.connections,
            a.size,
            if a.binary { "binary" } else { "text" },
            a.inflight,
            a.warmup,
            a.duration,
            w,
            self.messages(),
            self.rate(),
            self.q_us(0.5),
            self.q_us(0.9),
            self.q_us(0.99),
            self.q_us(0.999),
            self.stats.hist.max() as f64 / 1000.0,
            self.stats.hist.mean() / 1000.0,
            self.stats.errors,
            self.unclean_closes,
            self.nofile,
            client_us / 1e6 / w,
            client_us / m,
            client_user / m,
        );
        if let (Some(b), Some(e)) = (self.start.system_busy, self.end.system_busy) {
            let cores = e.saturating_sub(b) as f64 / clock_ticks_per_sec() as f64 / w;
            s.push_str(&format!(",\"system_busy_cores\":{cores:.4}"));
        }
        if let (Some(pid), Some(b), Some(e)) = (a.server_pid, self.start.server, self.end.server) {
            let ticks = e.ticks - b.ticks;
            let us = ticks as f64 * 1e6 / clock_ticks_per_sec() as f64;
            let user_us = (e.user_ticks - b.user_ticks) as f64 * 1e6 / clock_ticks_per_sec() as f64;
            let sched = e.sched_ns.saturating_sub(b.sched_ns);
            s.push_str(&format!(
                ",\"server_pid\":{pid},\"server_cpu_ticks\":{ticks},\"server_cpu_us\":{us:.0},\
                 \"server_cpu_util\":{:.4},\"server_cpu_us_per_msg\":{:.4},\
                 \"server_user_us_per_msg\":{:.4},\"server_sys_us_per_msg\":{:.4},\
                 \"server_sched_ns\":{sched},\"server_sched_us_per_msg\":{:.4}",
                us / 1e6 / w,
                us / m,
                user_us / m,
                (us - user_us) / m,
                sched as f64 / 1000.0 / m,
            ));
        }
        s.push('}');
        s
    }

    fn human(&self) -> String {
        let mut s = format!(
            "{} connections, {} B {}, {} in flight: {:.0} messages/s over {:.2} s \
             ({} messages); latency p50 {:.1} µs, p90 {:.1} µs, p99 {:.1} µs, max {:.1} µs; \
             {} errors; client CPU {:.0}%",
            self.args.connections,
            self.args.size,
            if self.args.binary { "binary" } else { "text" },
            self.args.inflight,
            self.rate(),
            self.window_s(),
            self.messages(),
            self.q_us(0.5),
            self.q_us(0.9),
            self.q_us(0.99),
            self.stats.hist.max() as f64 / 1000.0,
            self.stats.errors,
            (self.end.client_cpu_us.0 + self.end.client_cpu_us.1
                - self.start.client_cpu_us.0
                - self.start.client_cpu_us.1) as f64
                / 1e4
                / self.window_s(),
        );
        if let (Some(b), Some(e)) = (self.start.server, self.end.server) {
            let us = (e.ticks - b.ticks) as f64 * 1e6 / clock_ticks_per_sec() as f64;
            s.push_str(&format!(
                "; server CPU {:.0}%, {:.2} µs per message",
                us / 1e4 / self.window_s(),
                us / self.messages().max(1) as f64
            ));
        }
        s
    }
}

fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("echo-load: {e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let target = match parse_url(&args.url) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("echo-load: {e}");
            std::process::exit(2);
        }
    };
    let nofile = raise_nofile();
    if nofile != 0 && (args.connections as u64) + 64 > nofile {
        eprintln!(
            "echo-load: {} connections need more descriptors than RLIMIT_NOFILE allows ({nofile})",
            args.connections
        );
        std::process::exit(1);
    }
    if let Some(pid) = args.server_pid
        && let Err(e) = read_proc_cpu(pid)
    {
        eprintln!("echo-load: --server-pid {pid}: {e}");
        std::process::exit(2);
    }
    let opened = match open_all(&target, args.connections, args.handshake_concurrency) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("echo-load: handshake failed: {e}");
            std::process::exit(1);
        }
    };
    let mut rng = XorShift::new(now_nanos());
    let scripts: Vec<Script> = (0..args.connections)
        .map(|i| Script::new(i, args.size, args.binary, &mut rng))
        .collect();
    let stats = Stats::new(args.binary, args.server_pid);
    let result = match args.engine {
        EngineKind::Epoll => {
            let mut stats = stats;
            run_epoll(&args, opened, scripts, &mut stats).map(|(b, e, u)| (b, e, u, stats))
        }
        EngineKind::Tokio => run_tokio(&args, opened, scripts, stats),
    };
    let (start, end, unclean_closes, stats) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("echo-load: {e}");
            std::process::exit(1);
        }
    };
    if let Some(e) = &stats.server_cpu_error {
        eprintln!("echo-load: could not read the server's CPU time: {e}");
    }
    let report = Report {
        args: &args,
        start,
        end,
        stats: &stats,
        unclean_closes,
        nofile,
    };
    if args.json {
        println!("{}", report.json());
    } else {
        println!("{}", report.human());
    }
    if stats.errors > 0 || report.messages() == 0 {
        if report.messages() == 0 {
            eprintln!("echo-load: no round trip completed in the measured window");
        }
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let t = parse_url("ws://127.0.0.1:9001/echo").unwrap();
        assert_eq!(t.addr, "127.0.0.1:9001".parse().unwrap());
        assert_eq!(t.host, "127.0.0.1:9001");
        assert_eq!(t.path, "/echo");
        let t = parse_url("ws://127.0.0.1:9001").unwrap();
        assert_eq!(t.path, "/");
        assert!(parse_url("wss://127.0.0.1:9001/").is_err());
        assert!(parse_url("ws:///x").is_err());
    }

    #[test]
    fn payloads_differ_and_have_the_size() {
        for &binary in &[false, true] {
            for size in [0, 1, 5, 20, 512] {
                let a = payload(3, 0, size, binary);
                assert_eq!(a.len(), size);
                if !binary {
                    assert!(std::str::from_utf8(&a).is_ok());
                }
            }
            assert_ne!(payload(3, 0, 20, binary), payload(3, 1, 20, binary));
            assert_ne!(payload(3, 0, 20, binary), payload(4, 0, 20, binary));
        }
    }

    #[test]
    fn script_frames_decode_to_the_payloads() {
        let mut rng = XorShift::new(1);
        let s = Script::new(7, 512, false, &mut rng);
        for k in 0..VARIANTS {
            let mut f = s.frames[k].clone();
            let cfg = DecoderConfig {
                role: Role::Server,
                ..CLIENT_DECODER
            };
            match codec::decode_frame(&mut f, &cfg).unwrap() {
                Decoded::Complete(frame, used) => {
                    assert_eq!(used, s.frames[k].len());
                    assert_eq!(frame.payload, &s.payloads[k][..]);
                }
                Decoded::Incomplete { .. } => panic!("incomplete"),
            }
        }
    }

    #[test]
    fn check_frame_catches_mismatches() {
        let p = payload(1, 0, 20, false);
        let mut f = Vec::new();
        codec::encode_frame_into(&mut f, true, 0, OpCode::Text, &p, None);
        let Decoded::Complete(frame, _) = codec::decode_frame(&mut f, &CLIENT_DECODER).unwrap()
        else {
            panic!()
        };
        assert!(matches!(check_frame(&frame, &p, false), Ok(Echo::Ok)));
        assert!(check_frame(&frame, &p, true).is_err());
        assert!(check_frame(&frame, &payload(1, 1, 20, false), false).is_err());
    }

    #[test]
    fn proc_cpu_of_self() {
        let c = read_proc_cpu(std::process::id() as i32).unwrap();
        assert!(c.sched_ns > 0);
    }
}
