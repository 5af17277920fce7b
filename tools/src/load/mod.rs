//! `kythera-load`: a WebSocket load generator on kythera's own io_uring layer and codec
//! in client mode (masked frames), for kythera or any other server.
//!
//! Three modes ([`Mode`]): `echo` (round trips per second and their latency), `connect`
//! (handshakes per second, optionally holding the connections idle) and `broadcast`
//! (one publisher, many subscribers in a chat room: deliveries per second and publish-to-
//! receive latency). [`run`] spreads the connections over `threads` threads, each with
//! its own ring (`client`), drives the phases (connect, warm-up, measured window,
//! closing handshake) from the calling thread, shows a progress line and returns a
//! [`Report`]. Everything received is checked; [`Report::errors`] counts what was wrong
//! and a run with errors is a failed run.
//!
//! In echo mode the connections start sending once the connect phase is over (at the
//! warm-up), a few MiB of messages per loop turn, so that handshakes do not wait behind
//! the echoes of connections already open and the first turn does not encode
//! gigabytes; and the closing handshakes at the end may take 3 s plus twice what the
//! echoes still in flight need at the window's rate (at most 60 s), since the server's
//! close reply comes after them.
//!
//! With [`Config::server_pid`] the driving thread also reads the server's CPU time
//! (`utime + stime` of `/proc/PID/stat`, all its threads), its own and the machine's
//! (`/proc/self/stat`, `/proc/stat`) when the connect phase starts and ends and at the
//! instants the measured window opens and closes (it sleeps until each edge rather than
//! polling past it), so the server's CPU time per message covers the same window as the
//! message count: a saturated client hides a faster server, its CPU time does not.

mod client;
mod io;
pub mod tls;
pub mod wire;

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

pub use wire::Target;

/// What the run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Round trips through an echo server.
    Echo,
    /// Opening (and optionally holding) connections.
    Connect,
    /// Publications delivered to a chat room's subscribers.
    Broadcast,
    /// Direct messages through a chat gear: connection `i` sends to connection `i + 1`
    /// by name (with several targets, always to another server: a cluster's
    /// cross-node `send_message`).
    Direct,
}

/// The kind of data frames sent in echo mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Text frames (the payloads are ASCII).
    Text,
    /// Binary frames.
    Binary,
}

/// Everything a run needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The mode.
    pub mode: Mode,
    /// Where to connect: connection `i` goes to `targets[i % targets.len()]`, the
    /// broadcast publisher to the first.
    pub targets: Vec<Target>,
    /// Connections (subscribers in broadcast mode, the publisher not counted).
    pub connections: usize,
    /// Payload bytes (echo), or the publication's text padded to this size (broadcast).
    pub bytes: usize,
    /// Text or binary frames (echo).
    pub kind: Kind,
    /// Messages in flight per connection (echo), or publications not yet delivered to
    /// every subscriber (broadcast without a rate).
    pub in_flight: usize,
    /// Seconds of traffic before the window (echo, broadcast).
    pub warmup: Duration,
    /// The measured window (echo, broadcast).
    pub duration: Duration,
    /// How long connect mode keeps the connections open and idle.
    pub hold: Duration,
    /// Local addresses to bind, round robin over connections (empty: the kernel picks).
    pub source_addrs: Vec<IpAddr>,
    /// Threads, each with its own ring and share of the connections.
    pub threads: usize,
    /// Connects and handshakes in progress per thread at most.
    pub concurrency: usize,
    /// How long the connect phase may take before the run goes on without the rest.
    pub connect_timeout: Duration,
    /// The chat room (broadcast).
    pub room: String,
    /// Publications per second (broadcast); `None`: as fast as `in_flight` allows.
    pub rate: Option<f64>,
    /// Echo: how long a connection waits after an echo before it sends the next
    /// message (zero: at once). A paced load leaves the server idle most of the time,
    /// so that a round trip shows what the server did to it (a live handover's pause)
    /// rather than the queue of a saturated server.
    pub echo_pause: Duration,
    /// Show the progress line on stderr.
    pub progress: bool,
    /// A server process whose resident memory is read before connecting and at the
    /// end of the window or hold (Linux `/proc/PID/status`), for memory per connection.
    pub server_pid: Option<u32>,
    /// Offer permessage-deflate and require it; messages both ways are compressed
    /// (client: zlib level 1, every message) and checked once inflated.
    pub deflate: bool,
    /// The TLS client settings for `wss://` targets (trusted roots, or none checked).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Counts of what went wrong, by kind; any of them fails the run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Errors {
    /// Sockets that could not be made or connected.
    pub connect: u64,
    /// Handshakes refused or malformed (not 101, wrong `Sec-WebSocket-Accept`).
    pub handshake: u64,
    /// Frames that break RFC 6455 for a client (masked, bad lengths, bad fragments).
    pub protocol: u64,
    /// Messages of the wrong opcode.
    pub opcode: u64,
    /// Messages of the wrong content or order.
    pub payload: u64,
    /// Messages on a connection that should get none.
    pub unexpected: u64,
    /// Close frames the server sent on its own.
    pub closed: u64,
    /// Connections reset or ended without a closing handshake.
    pub disconnected: u64,
    /// Echoes or publications that never arrived.
    pub lost: u64,
    /// Handshakes or closing handshakes that did not finish in time.
    pub timeout: u64,
}

impl Errors {
    /// All errors.
    pub fn total(&self) -> u64 {
        self.connect
            + self.handshake
            + self.protocol
            + self.opcode
            + self.payload
            + self.unexpected
            + self.closed
            + self.disconnected
            + self.lost
            + self.timeout
    }

    fn add(&mut self, o: &Errors) {
        self.connect += o.connect;
        self.handshake += o.handshake;
        self.protocol += o.protocol;
        self.opcode += o.opcode;
        self.payload += o.payload;
        self.unexpected += o.unexpected;
        self.closed += o.closed;
        self.disconnected += o.disconnected;
        self.lost += o.lost;
        self.timeout += o.timeout;
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        }
    }
}

/// The results of a run, as printed and as written by `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The mode.
    pub mode: Mode,
    /// The target URL.
    pub url: String,
    /// Threads used.
    pub threads: usize,
    /// Connections asked for (subscribers in broadcast mode).
    pub connections: usize,
    /// Handshakes completed (the publisher included).
    pub established: u64,
    /// Payload bytes.
    pub bytes: usize,
    /// Frame kind (echo).
    pub kind: Kind,
    /// Messages in flight per connection.
    pub in_flight: usize,
    /// Warm-up seconds.
    pub warmup_secs: f64,
    /// Length of the measured window in seconds (the hold time in connect mode).
    pub duration_secs: f64,
    /// Echoes (echo) or deliveries (broadcast) in the window.
    pub messages: u64,
    /// `messages` per second.
    pub messages_per_sec: f64,
    /// Round trip (echo) or publish-to-receive (broadcast) latency in the window.
    pub latency_us: Option<Latency>,
    /// Echo: each connection's longest round trip in the window (the longest pause it
    /// saw: during a live handover, say), over the connections.
    pub longest_round_trip_us: Option<Latency>,
    /// Publications sent in the window (broadcast).
    pub published: Option<u64>,
    /// Frames received that were not the load's own (broadcast).
    pub ignored: u64,
    /// Seconds from the first connect to the last handshake.
    pub connect_secs: f64,
    /// Handshakes per second over `connect_secs`.
    pub handshakes_per_sec: f64,
    /// Connect start to 101, per connection.
    pub handshake_latency_us: Option<Latency>,
    /// The server's resident memory before the connections, in KiB (`--server-pid`).
    pub server_rss_before_kib: Option<u64>,
    /// The server's resident memory at the end of the window or hold, in KiB.
    pub server_rss_loaded_kib: Option<u64>,
    /// The growth of the server's resident memory per established connection, bytes.
    pub server_rss_per_connection: Option<f64>,
    /// The server's CPU time (user + system, all threads) in the measured window, s
    /// (`--server-pid`; the hold in connect mode).
    pub server_cpu_seconds: Option<f64>,
    /// `server_cpu_seconds` over the window: 1.0 is one core busy all the time.
    pub server_cpu_util: Option<f64>,
    /// The server's CPU time per message (echo) or delivery (broadcast) in the
    /// window, µs.
    pub server_cpu_us_per_msg: Option<f64>,
    /// Its user-space part (`utime`), µs per message.
    pub server_user_us_per_msg: Option<f64>,
    /// Its kernel part (`stime`, which on loopback includes delivering the server's
    /// sends into the client's socket), µs per message.
    pub server_sys_us_per_msg: Option<f64>,
    /// The server's CPU time from the first connect to the end of the connect phase, s.
    pub server_connect_cpu_seconds: Option<f64>,
    /// `server_connect_cpu_seconds` per established connection, µs.
    pub server_cpu_us_per_handshake: Option<f64>,
    /// This load generator's CPU time over the window, in cores (1.0: one core busy).
    pub client_cpu_util: Option<f64>,
    /// Its CPU time per message in the window, µs.
    pub client_cpu_us_per_msg: Option<f64>,
    /// The whole machine's busy CPU time in the window, in cores (`/proc/stat`): the
    /// server, the client and whatever else ran (2.0 is all of a 2-core machine).
    pub system_busy_cores: Option<f64>,
    /// All errors.
    pub errors: u64,
    /// Errors by kind.
    pub error_kinds: Errors,
}

impl Report {
    /// Whether the server behaved: every connection established and nothing wrong.
    pub fn ok(&self) -> bool {
        let want = self.connections as u64 + u64::from(self.mode == Mode::Broadcast);
        self.errors == 0 && self.established == want
    }

    /// The summary table printed at the end.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let mode = format!("{:?}", self.mode).to_lowercase();
        let _ = writeln!(s, "kythera-load {mode} {}", self.url);
        let row = |s: &mut String, k: &str, v: String| {
            let _ = writeln!(s, "  {k:<18} {v}");
        };
        row(
            &mut s,
            "connections",
            format!(
                "{} asked, {} established, {} thread(s)",
                self.connections, self.established, self.threads
            ),
        );
        row(
            &mut s,
            "handshakes",
            format!(
                "{:.0}/s over {:.3} s",
                self.handshakes_per_sec, self.connect_secs
            ),
        );
        if let Some(l) = &self.handshake_latency_us {
            row(&mut s, "handshake latency", latency_line(l));
        }
        match self.mode {
            Mode::Echo => {
                let kind = format!("{:?}", self.kind).to_lowercase();
                row(
                    &mut s,
                    "messages",
                    format!(
                        "{} B {kind}, {} in flight per connection",
                        self.bytes, self.in_flight
                    ),
                );
            }
            Mode::Broadcast => row(
                &mut s,
                "publications",
                format!(
                    "{} in the window ({:.0}/s), {} ignored frames",
                    self.published.unwrap_or(0),
                    self.published.unwrap_or(0) as f64 / self.duration_secs.max(1e-9),
                    self.ignored
                ),
            ),
            Mode::Direct => row(
                &mut s,
                "messages",
                format!(
                    "{} B of text, {} in flight per sender",
                    self.bytes, self.in_flight
                ),
            ),
            Mode::Connect => {}
        }
        if self.mode == Mode::Connect {
            row(&mut s, "held", format!("{:.2} s", self.duration_secs));
        } else {
            row(
                &mut s,
                "window",
                format!(
                    "{:.2} s after {:.2} s of warm-up",
                    self.duration_secs, self.warmup_secs
                ),
            );
            let what = if self.mode == Mode::Echo {
                "echoes"
            } else {
                "deliveries"
            };
            row(
                &mut s,
                what,
                format!("{} ({:.0}/s)", self.messages, self.messages_per_sec),
            );
            if let Some(l) = &self.latency_us {
                row(&mut s, "latency", latency_line(l));
            }
            if let Some(l) = &self.longest_round_trip_us {
                row(&mut s, "longest per conn", latency_line(l));
            }
        }
        if let (Some(before), Some(loaded)) =
            (self.server_rss_before_kib, self.server_rss_loaded_kib)
        {
            row(
                &mut s,
                "server memory",
                format!(
                    "{before} KiB before, {loaded} KiB loaded: {:.0} B per connection",
                    self.server_rss_per_connection.unwrap_or(0.0)
                ),
            );
        }
        if let Some(cpu) = self.server_cpu_seconds {
            let util = self.server_cpu_util.unwrap_or(0.0) * 100.0;
            let per_msg = match (
                self.server_cpu_us_per_msg,
                self.server_user_us_per_msg,
                self.server_sys_us_per_msg,
            ) {
                (Some(t), Some(u), Some(k)) => {
                    format!(": {t:.2} us per message (user {u:.2} + sys {k:.2})")
                }
                _ => String::new(),
            };
            row(
                &mut s,
                "server CPU",
                format!("{cpu:.3} s in the window ({util:.0}% of a core){per_msg}"),
            );
        }
        if let (Some(cpu), Some(per)) = (
            self.server_connect_cpu_seconds,
            self.server_cpu_us_per_handshake,
        ) {
            row(
                &mut s,
                "server CPU conn.",
                format!("{cpu:.3} s connecting: {per:.1} us per handshake"),
            );
        }
        if let Some(util) = self.client_cpu_util {
            let busy = self
                .system_busy_cores
                .map(|b| format!("; machine {b:.2} cores busy"))
                .unwrap_or_default();
            row(
                &mut s,
                "client CPU",
                format!("{:.0}% of a core in the window{busy}", util * 100.0),
            );
        }
        let mut kinds = serde_json::to_value(self.error_kinds)
            .ok()
            .and_then(|v| v.as_object().cloned())
            .unwrap_or_default();
        kinds.retain(|_, v| v.as_u64() != Some(0));
        let detail = if kinds.is_empty() {
            String::new()
        } else {
            format!(" {}", serde_json::Value::Object(kinds))
        };
        row(&mut s, "errors", format!("{}{detail}", self.errors));
        s
    }
}

fn latency_line(l: &Latency) -> String {
    format!(
        "us: p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  (mean {:.1}, n {})",
        l.p50, l.p90, l.p99, l.p999, l.max, l.mean, l.count
    )
}

/// Error lines printed on stderr before errors are only counted.
const MAX_ERROR_LINES: u64 = 10;

/// What the threads and the driving thread share.
#[derive(Debug)]
struct Shared {
    base: Instant,
    established: AtomicU64,
    failed: AtomicU64,
    messages: AtomicU64,
    errors: AtomicU64,
    error_lines: AtomicU64,
    /// The measured window in ns since `base`; `u64::MAX` until set.
    measure_start: AtomicU64,
    measure_end: AtomicU64,
    /// Broadcast: the subscribers are in; the publisher may connect.
    publish_go: AtomicBool,
    /// Broadcast: the publisher never got going, so nobody waits for publications.
    publish_failed: AtomicBool,
    /// Broadcast: publications sent in all, once the publisher stopped.
    published: AtomicU64,
    /// Broadcast, per thread: publications delivered to all its subscribers.
    done: Vec<AtomicU64>,
    /// Direct, per connection: messages it sent, and those of them that arrived.
    sent: Vec<AtomicU64>,
    delivered: Vec<AtomicU64>,
}

impl Shared {
    fn now(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns to 60 s at 3 significant digits (0.1% error); samples are recorded with
    // `saturating_record`, so a longer stall counts as 60 s instead of vanishing.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds")
}

/// Local addresses enough for `connections` to `target`: none (the kernel picks) up to
/// 25,000 connections or for a target off loopback; else 127.0.0.1, 127.0.0.2, ... one
/// per 25,000 (a source address has about 28,000 ephemeral ports to one server port).
pub fn default_source_addrs(target: &Target, connections: usize) -> Vec<IpAddr> {
    const PER_ADDRESS: usize = 25_000;
    if connections <= PER_ADDRESS || !target.addr.ip().is_loopback() || target.addr.is_ipv6() {
        return Vec::new();
    }
    (0..connections.div_ceil(PER_ADDRESS).min(254))
        .map(|i| IpAddr::from([127, 0, 0, 1 + i as u8]))
        .collect()
}

/// Runs the load described by `cfg` to its end and reports.
pub fn run(cfg: Config) -> Result<Report, String> {
    let nofile = io::raise_nofile_limit();
    let wanted = cfg.connections as u64 + 64;
    if nofile < wanted {
        eprintln!(
            "kythera-load: warning: the open-file limit is {nofile}, {} connections need about {wanted}",
            cfg.connections
        );
    }
    let threads = cfg.threads.clamp(1, cfg.connections.max(1));
    let rss = |pid: Option<u32>| pid.and_then(rss_kib);
    let rss_before = rss(cfg.server_pid);
    let cpu_connect_start = CpuSample::take(cfg.server_pid);
    let mut rss_loaded = None;
    let shared = Arc::new(Shared {
        base: Instant::now(),
        established: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        messages: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        error_lines: AtomicU64::new(0),
        measure_start: AtomicU64::new(u64::MAX),
        measure_end: AtomicU64::new(u64::MAX),
        publish_go: AtomicBool::new(false),
        publish_failed: AtomicBool::new(false),
        published: AtomicU64::new(u64::MAX),
        done: (0..threads).map(|_| AtomicU64::new(u64::MAX)).collect(),
        sent: (0..cfg.connections).map(|_| AtomicU64::new(0)).collect(),
        delivered: (0..cfg.connections).map(|_| AtomicU64::new(0)).collect(),
    });
    let cfg = Arc::new(cfg);
    let mut handles = Vec::new();
    let mut first = 0u32;
    for t in 0..threads {
        let count = cfg.connections / threads + usize::from(t < cfg.connections % threads);
        let (cfg, shared) = (cfg.clone(), shared.clone());
        let handle = std::thread::Builder::new()
            .name(format!("load-{t}"))
            .spawn(move || client::run(t, first, count, cfg, shared))
            .map_err(|e| format!("thread: {e}"))?;
        handles.push(handle);
        first += count as u32;
    }

    let progress = Progress::new(cfg.progress);
    let settled = |want: u64| {
        shared.established.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed) >= want
    };
    let all_done = |handles: &[std::thread::JoinHandle<_>]| handles.iter().all(|h| h.is_finished());
    let deadline = Instant::now() + cfg.connect_timeout;
    let subscribers = cfg.connections as u64;
    while !settled(subscribers) && Instant::now() < deadline && !all_done(&handles) {
        progress.tick(&shared, "connecting", subscribers);
        std::thread::sleep(Duration::from_millis(50));
    }
    // Give the server a moment to register the last joins and names before the
    // traffic starts (in a cluster every node must hear of them: a few milliseconds
    // on a healthy link, a second leaves room).
    let settle = if cfg.targets.len() > 1 {
        Duration::from_secs(1)
    } else {
        Duration::from_millis(200)
    };
    if cfg.mode == Mode::Direct {
        std::thread::sleep(settle);
    }
    if cfg.mode == Mode::Broadcast {
        std::thread::sleep(settle);
        shared.publish_go.store(true, Ordering::Release);
        let before = shared.established.load(Ordering::Relaxed);
        let deadline = Instant::now() + cfg.connect_timeout;
        while !settled(subscribers + 1) && Instant::now() < deadline && !all_done(&handles) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if shared.established.load(Ordering::Relaxed) == before {
            shared.publish_failed.store(true, Ordering::Relaxed);
        }
    }
    let cpu_connect_end = CpuSample::take(cfg.server_pid);
    let (mut cpu_start, mut cpu_end) = (None, None);
    let now = shared.now();
    let (start, end) = match cfg.mode {
        // Nothing to measure: end at once rather than wait out the window.
        _ if shared.established.load(Ordering::Relaxed) == 0 => (now, now),
        Mode::Connect => (now, now + cfg.hold.as_nanos() as u64),
        Mode::Echo | Mode::Broadcast | Mode::Direct => {
            let start = now + cfg.warmup.as_nanos() as u64;
            (start, start + cfg.duration.as_nanos() as u64)
        }
    };
    shared.measure_start.store(start, Ordering::Relaxed);
    shared.measure_end.store(end, Ordering::Relaxed);
    while !all_done(&handles) {
        let now = shared.now();
        let phase = if now < start {
            "warm-up"
        } else if now < end {
            if cfg.mode == Mode::Connect {
                "holding"
            } else {
                "measuring"
            }
        } else {
            "closing"
        };
        // The CPU time at the window's edges, taken as close to them as the sleep
        // below allows (the workers count a message by the same clock).
        if now >= start && cpu_start.is_none() {
            cpu_start = Some(CpuSample::take(cfg.server_pid));
        }
        if now >= end && cpu_end.is_none() {
            cpu_end = Some(CpuSample::take(cfg.server_pid));
        }
        if now >= start && now < end {
            // The last sample before the end: every connection is still open.
            rss_loaded = rss(cfg.server_pid).or(rss_loaded);
        }
        progress.tick(&shared, phase, subscribers);
        let now = shared.now();
        let next_edge = [start, end]
            .into_iter()
            .filter(|&e| e > now)
            .min()
            .map_or(u64::MAX, |e| e - now);
        std::thread::sleep(Duration::from_nanos(next_edge.min(50_000_000)));
    }
    progress.finish();
    // The threads ended before the window did (every connection failed): the window
    // ends here for the CPU time as it did for the messages.
    let cpu_start = cpu_start.unwrap_or_else(|| CpuSample::take(cfg.server_pid));
    let cpu_end = cpu_end.unwrap_or_else(|| CpuSample::take(cfg.server_pid));

    let mut latency = new_histogram();
    let mut longest = new_histogram();
    let mut handshake = new_histogram();
    let mut errors = Errors::default();
    let (mut messages, mut published, mut ignored, mut established) = (0, 0, 0, 0);
    let (mut first_start, mut last_est) = (u64::MAX, 0);
    for h in handles {
        let r = h
            .join()
            .map_err(|_| "a load thread panicked".to_string())??;
        latency
            .add(&r.latency)
            .map_err(|e| format!("histogram: {e}"))?;
        longest
            .add(&r.longest)
            .map_err(|e| format!("histogram: {e}"))?;
        handshake
            .add(&r.handshake)
            .map_err(|e| format!("histogram: {e}"))?;
        errors.add(&r.errors);
        messages += r.messages;
        published += r.published;
        ignored += r.ignored;
        established += r.established;
        first_start = first_start.min(r.first_start.unwrap_or(u64::MAX));
        last_est = last_est.max(r.last_established.unwrap_or(0));
    }
    let window = end.saturating_sub(start) as f64 / 1e9;
    let connect_secs = last_est.saturating_sub(first_start) as f64 / 1e9;
    let has = |h: &Histogram<u64>| (!h.is_empty()).then(|| Latency::of(h));
    let window_cpu = cpu_end.since(&cpu_start);
    let connect_cpu = cpu_connect_end.since(&cpu_connect_start);
    let per_msg = |secs: Option<f64>| match secs {
        Some(s) if messages > 0 && cfg.mode != Mode::Connect => Some(s * 1e6 / messages as f64),
        _ => None,
    };
    let util = |secs: Option<f64>| secs.filter(|_| window > 0.0).map(|s| s / window);
    Ok(Report {
        mode: cfg.mode,
        url: cfg
            .targets
            .iter()
            .map(|t| {
                format!(
                    "{}://{}{}",
                    if t.tls { "wss" } else { "ws" },
                    t.host,
                    t.path
                )
            })
            .collect::<Vec<_>>()
            .join(","),
        threads,
        connections: cfg.connections,
        established,
        bytes: cfg.bytes,
        kind: cfg.kind,
        in_flight: cfg.in_flight,
        warmup_secs: cfg.warmup.as_secs_f64(),
        duration_secs: window,
        messages,
        messages_per_sec: if window > 0.0 {
            messages as f64 / window
        } else {
            0.0
        },
        latency_us: has(&latency),
        longest_round_trip_us: has(&longest),
        published: (cfg.mode == Mode::Broadcast).then_some(published),
        ignored,
        connect_secs,
        handshakes_per_sec: if connect_secs > 0.0 {
            established as f64 / connect_secs
        } else {
            0.0
        },
        handshake_latency_us: has(&handshake),
        server_rss_before_kib: rss_before,
        server_rss_loaded_kib: rss_loaded,
        server_rss_per_connection: match (rss_before, rss_loaded) {
            (Some(b), Some(l)) if established > 0 => {
                Some((l as f64 - b as f64) * 1024.0 / established as f64)
            }
            _ => None,
        },
        server_cpu_seconds: window_cpu.server_total(),
        server_cpu_util: util(window_cpu.server_total()),
        server_cpu_us_per_msg: per_msg(window_cpu.server_total()),
        server_user_us_per_msg: per_msg(window_cpu.server.map(|s| s.0)),
        server_sys_us_per_msg: per_msg(window_cpu.server.map(|s| s.1)),
        server_connect_cpu_seconds: connect_cpu.server_total(),
        server_cpu_us_per_handshake: connect_cpu
            .server_total()
            .filter(|_| established > 0)
            .map(|s| s * 1e6 / established as f64),
        client_cpu_util: util(window_cpu.client),
        client_cpu_us_per_msg: per_msg(window_cpu.client),
        system_busy_cores: util(window_cpu.busy),
        errors: errors.total(),
        error_kinds: errors,
    })
}

/// CPU time at one instant, in clock ticks: the server's `(utime, stime)`, this
/// process's `utime + stime`, and the whole machine's busy time.
#[derive(Debug, Clone, Copy)]
struct CpuSample {
    server: Option<(u64, u64)>,
    client: Option<u64>,
    busy: Option<u64>,
}

/// CPU time between two samples, in seconds.
#[derive(Debug, Clone, Copy)]
struct CpuSpan {
    /// The server's (user, system).
    server: Option<(f64, f64)>,
    client: Option<f64>,
    busy: Option<f64>,
}

impl CpuSample {
    fn take(server_pid: Option<u32>) -> CpuSample {
        CpuSample {
            server: server_pid.and_then(|pid| proc_cpu_ticks(&pid.to_string())),
            client: proc_cpu_ticks("self").map(|(u, s)| u + s),
            busy: system_busy_ticks(),
        }
    }

    fn since(&self, earlier: &CpuSample) -> CpuSpan {
        let hz = io::clock_ticks_per_sec() as f64;
        let secs = |a: u64, b: u64| a.saturating_sub(b) as f64 / hz;
        CpuSpan {
            server: match (self.server, earlier.server) {
                (Some((u, s)), Some((u0, s0))) => Some((secs(u, u0), secs(s, s0))),
                _ => None,
            },
            client: self.client.zip(earlier.client).map(|(a, b)| secs(a, b)),
            busy: self.busy.zip(earlier.busy).map(|(a, b)| secs(a, b)),
        }
    }
}

impl CpuSpan {
    fn server_total(&self) -> Option<f64> {
        self.server.map(|(u, s)| u + s)
    }
}

/// `(utime, stime)` of process `pid` ("self" for this one), all threads, in clock ticks.
fn proc_cpu_ticks(pid: &str) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "(comm)" come the fields from `state` (field 3) on: utime is field 14.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut f = rest.split_whitespace().skip(11);
    Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
}

/// Busy clock ticks of the whole machine (user, nice, system, irq, softirq, steal)
/// from the first line of `/proc/stat`.
fn system_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    (f.len() >= 8).then(|| f[0] + f[1] + f[2] + f[5] + f[6] + f[7])
}

/// `VmRSS` of process `pid` in KiB, if it can be read.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The progress line on stderr (indicatif hides it when stderr is not a terminal).
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    last: std::cell::Cell<(Instant, u64)>,
}

impl Progress {
    fn new(show: bool) -> Progress {
        let bar = show.then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {elapsed} {msg}")
            {
                bar.set_style(style);
            }
            bar
        });
        Progress {
            bar,
            last: std::cell::Cell::new((Instant::now(), 0)),
        }
    }

    fn tick(&self, shared: &Shared, phase: &str, total: u64) {
        let Some(bar) = &self.bar else { return };
        let (then, before) = self.last.get();
        if then.elapsed() < Duration::from_millis(250) {
            return;
        }
        let messages = shared.messages.load(Ordering::Relaxed);
        let rate = (messages - before) as f64 / then.elapsed().as_secs_f64();
        self.last.set((Instant::now(), messages));
        bar.set_message(format!(
            "{phase:<10} connections {}/{total} ({} failed)  messages {messages} ({rate:.0}/s)  errors {}",
            shared.established.load(Ordering::Relaxed),
            shared.failed.load(Ordering::Relaxed),
            shared.errors.load(Ordering::Relaxed),
        ));
        bar.tick();
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
