//! One thread's client loop: its connections, from connect through handshake, traffic
//! and closing handshake, on its own ring.
//!
//! Each loop iteration: read the clock once, start connects (at most `concurrency`
//! handshakes in progress), handle every completion, run the mode's step (the
//! publisher's sends, the stop), then flush: re-arm ended recvs and start one send per
//! touched connection carrying every frame it queued in this iteration (batched), and
//! one `io_uring_enter` that submits and waits.
//!
//! Every frame received is checked: opcode, order and content (see [`wire::payload`]);
//! anything unexpected is counted in [`Errors`] and makes the run fail.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hdrhistogram::Histogram;
use kythera_engine::protocol::codec::{
    self, Decoded, DecoderConfig, OpCode, RSV1, Role as CodecRole,
};
use kythera_engine::protocol::deflate::{ConnDeflate, DeflateConfig, with_scratch};
use kythera_engine::protocol::mask;

use super::io::{self, Completion, Io};
use super::wire::{self, Rng};
use super::{Config, Errors, Kind, Mode, Shared, new_histogram};

/// How long the closing handshake (and, in broadcast mode, the last deliveries) may
/// take after the run's end before what is left counts as an error.
const CLOSING_GRACE: Duration = Duration::from_secs(3);

/// The most the closing grace grows to for the messages still in flight at the end
/// (see [`Worker::closing_grace_ns`]).
const MAX_CLOSING_GRACE: Duration = Duration::from_secs(60);

/// Publications sent in one loop iteration at most, so a rate far above what the server
/// takes does not queue without bound.
const MAX_BURST: u64 = 1024;

/// Echo: bytes of messages that connections starting to send may queue in one loop
/// iteration (see [`Worker::start_echoes`]).
const START_BYTES: u64 = 8 << 20;

/// What a connection does once open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Sends messages and checks their echoes.
    Echo,
    /// Stays idle (connect mode).
    Idle,
    /// Receives the room's publications (broadcast mode).
    Subscriber,
    /// Publishes to the room (broadcast mode).
    Publisher,
    /// Sends direct messages to the next connection and receives the previous one's
    /// (direct mode).
    Direct,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not started.
    New,
    Connecting,
    /// The upgrade request is out; waiting for the 101.
    Handshaking,
    Open,
    /// Our close frame is queued or sent; waiting for the server's.
    Closing,
    /// Finished, well or not: the socket is shut down.
    Done,
}

#[derive(Debug)]
struct Conn {
    fd: Option<OwnedFd>,
    /// The connection's number over all threads (goes into payloads).
    id: u32,
    role: Role,
    state: State,
    key: String,
    /// When its connect started (ns).
    started: u64,
    recv_armed: bool,
    /// In the flush list of this iteration.
    dirty: bool,
    /// Received bytes that do not make a whole frame yet (or the response head).
    rbuf: Vec<u8>,
    /// Frames queued for the next send.
    out: Vec<u8>,
    /// The buffer of the last send, kept for reuse.
    spare: Vec<u8>,
    /// A fragmented message being reassembled: its opcode, whether it is compressed,
    /// and its bytes so far.
    frag: Option<(OpCode, bool, Vec<u8>)>,
    /// permessage-deflate, when agreed (`--deflate`), seen from the client's side.
    pmd: Option<Box<ConnDeflate>>,
    /// TLS (a `wss://` target): `out` holds plaintext, sealed into records at the
    /// flush; received records are decrypted before anything else looks at them.
    tls: Option<Box<rustls::ClientConnection>>,
    /// Echo: messages sent and not yet echoed, as `(seq, sent at)`.
    pending: VecDeque<(u64, u64)>,
    /// Echo and publisher: the next sequence number to send.
    next_seq: u64,
    /// Subscriber: the next publication expected (`None` before the first).
    expect: Option<u64>,
    /// Echo: the longest round trip in the window, ns (the pause this connection saw).
    longest: u64,
}

impl Conn {
    fn new(id: u32, role: Role) -> Conn {
        Conn {
            fd: None,
            id,
            role,
            state: State::New,
            key: String::new(),
            started: 0,
            recv_armed: false,
            dirty: false,
            rbuf: Vec::new(),
            out: Vec::new(),
            spare: Vec::new(),
            frag: None,
            pmd: None,
            tls: None,
            pending: VecDeque::new(),
            next_seq: 0,
            expect: None,
            longest: 0,
        }
    }
}

/// What one thread measured.
#[derive(Debug)]
pub(crate) struct WorkerResult {
    /// Round trips (echo) or publish-to-receive times (broadcast), ns, in the window.
    pub latency: Histogram<u64>,
    /// Echo: each connection's longest round trip in the window, ns.
    pub longest: Histogram<u64>,
    /// Connect start to 101, ns.
    pub handshake: Histogram<u64>,
    /// Echoes or deliveries in the window.
    pub messages: u64,
    /// Publications sent in the window (broadcast, thread 0).
    pub published: u64,
    /// Frames received that were not the load's own (broadcast: other senders).
    pub ignored: u64,
    /// Handshakes completed.
    pub established: u64,
    /// First connect started (ns), if any.
    pub first_start: Option<u64>,
    /// Last handshake completed (ns), if any.
    pub last_established: Option<u64>,
    /// What went wrong.
    pub errors: Errors,
}

/// The `from` and `text` of a chat room's frame; other fields are ignored.
#[derive(Debug, serde::Deserialize)]
struct ChatFrame<'a> {
    #[serde(borrow, default)]
    from: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

/// The name the publisher joins the room with.
pub(crate) const PUBLISHER_NAME: &str = "pub";

struct Worker {
    thread: usize,
    cfg: Arc<Config>,
    shared: Arc<Shared>,
    conns: Vec<Conn>,
    /// Slots to flush at the end of the iteration.
    dirty: Vec<u32>,
    /// Echoes waiting for their pause (`--pause-ms`) to end: (due, slot).
    paced: VecDeque<(u64, u32)>,
    /// Next slot to start connecting.
    next_start: usize,
    /// Connects and handshakes in progress.
    connecting: usize,
    /// Slots not yet `Done`.
    live: usize,
    rng: Rng,
    scratch: Vec<u8>,
    decoder: DecoderConfig,
    opcode: OpCode,
    /// The loop's clock for this iteration (ns since `shared.base`).
    now: u64,
    /// The window, once the main thread has set it.
    window: (u64, u64),
    stopping: bool,
    /// Echo: connections before this slot have started sending (see
    /// [`Worker::start_echoes`]). They wait until the connect phase is over, so that
    /// handshakes do not queue behind the echoes of the connections already open
    /// (with 16 KiB x 16 in flight that stalled the connect phase at 131/s).
    echo_cursor: usize,
    closing_deadline: u64,
    /// Broadcast: receipts per publication not yet seen by all subscribers here, from
    /// `counts_base` on.
    counts: VecDeque<u32>,
    counts_base: u64,
    /// Broadcast: subscribers open on this thread.
    subs_alive: u32,
    /// Broadcast publisher: when publishing started (ns).
    pub_started: Option<u64>,
    /// Counted into `shared` at the end of each iteration.
    messages_delta: u64,
    result: WorkerResult,
    /// Where a TLS connection's received records are decrypted to.
    tls_plain: Vec<u8>,
}

/// Runs thread `thread`'s share of the connections: `count` of them, numbered from
/// `first`; in broadcast mode thread 0 also runs the publisher.
pub(crate) fn run(
    thread: usize,
    first: u32,
    count: usize,
    cfg: Arc<Config>,
    shared: Arc<Shared>,
) -> Result<WorkerResult, String> {
    let role = match cfg.mode {
        Mode::Echo => Role::Echo,
        Mode::Connect => Role::Idle,
        Mode::Broadcast => Role::Subscriber,
        Mode::Direct => Role::Direct,
    };
    let mut conns: Vec<Conn> = (0..count)
        .map(|i| Conn::new(first + i as u32, role))
        .collect();
    if cfg.mode == Mode::Broadcast && thread == 0 {
        conns.push(Conn::new(u32::MAX, Role::Publisher));
    }
    let mut io = Io::new(conns.len()).map_err(|e| format!("io_uring: {e}"))?;
    let opcode = match cfg.kind {
        Kind::Text => OpCode::Text,
        Kind::Binary => OpCode::Binary,
    };
    let rsv = if cfg.deflate { RSV1 } else { 0 };
    let mut w = Worker {
        thread,
        live: conns.len(),
        conns,
        cfg,
        shared,
        dirty: Vec::new(),
        paced: VecDeque::new(),
        next_start: 0,
        connecting: 0,
        rng: Rng::new(0x5eed ^ ((thread as u64 + 1) << 32) ^ u64::from(first)),
        tls_plain: Vec::new(),
        scratch: Vec::new(),
        decoder: DecoderConfig {
            role: CodecRole::Client,
            max_message_bytes: 64 << 20,
            allowed_rsv: rsv,
        },
        opcode,
        now: 0,
        window: (u64::MAX, u64::MAX),
        stopping: false,
        echo_cursor: 0,
        closing_deadline: u64::MAX,
        counts: VecDeque::new(),
        counts_base: 0,
        subs_alive: 0,
        pub_started: None,
        messages_delta: 0,
        result: WorkerResult {
            latency: new_histogram(),
            longest: new_histogram(),
            handshake: new_histogram(),
            messages: 0,
            published: 0,
            ignored: 0,
            established: 0,
            first_start: None,
            last_established: None,
            errors: Errors::default(),
        },
    };
    w.run_loop(&mut io).map_err(|e| format!("io_uring: {e}"))?;
    w.finish_all();
    for c in &w.conns {
        if c.longest > 0 {
            w.result.longest.saturating_record(c.longest);
        }
    }
    io.quiesce(Duration::from_secs(1));
    Ok(w.result)
}

impl Worker {
    fn run_loop(&mut self, io: &mut Io) -> std::io::Result<()> {
        loop {
            self.now = self.shared.now();
            self.window = (
                self.shared.measure_start.load(Ordering::Relaxed),
                self.shared.measure_end.load(Ordering::Relaxed),
            );
            self.start_echoes();
            self.send_paced();
            self.start_connects(io)?;
            io.drain(|c| self.on_completion(c))?;
            self.step();
            self.flush(io)?;
            if self.messages_delta > 0 {
                self.shared
                    .messages
                    .fetch_add(self.messages_delta, Ordering::Relaxed);
                self.messages_delta = 0;
            }
            if self.stopping && (self.live == 0 || self.now >= self.closing_deadline) {
                return Ok(());
            }
            io.wait(self.wait_timeout())?;
        }
    }

    /// How long to sleep in the kernel when nothing completes: until the publisher's
    /// next send when it runs at a rate, else a short tick to see the window change.
    fn wait_timeout(&self) -> Duration {
        if let Some(&(due, _)) = self.paced.front() {
            let ns = due.saturating_sub(self.now).clamp(10_000, 10_000_000);
            return Duration::from_nanos(ns);
        }
        if let (Some(started), Some(rate)) = (self.pub_started, self.cfg.rate) {
            let sent = self.conns.last().map_or(0, |c| c.next_seq);
            let next_at = started + ((sent + 1) as f64 * 1e9 / rate) as u64;
            let ns = next_at.saturating_sub(self.now).clamp(10_000, 10_000_000);
            return Duration::from_nanos(ns);
        }
        Duration::from_millis(10)
    }

    fn error(&mut self, slot: u32, msg: impl FnOnce() -> String) {
        self.shared.errors.fetch_add(1, Ordering::Relaxed);
        if self.shared.error_lines.fetch_add(1, Ordering::Relaxed) < super::MAX_ERROR_LINES {
            let id = self.conns[slot as usize].id;
            let who = if id == u32::MAX {
                "publisher".to_string()
            } else {
                format!("connection {id}")
            };
            eprintln!("kythera-load: {who}: {}", msg());
        }
    }

    fn mark(&mut self, slot: u32) {
        let c = &mut self.conns[slot as usize];
        if !c.dirty {
            c.dirty = true;
            self.dirty.push(slot);
        }
    }

    fn start_connects(&mut self, io: &mut Io) -> std::io::Result<()> {
        if self.stopping {
            return Ok(());
        }
        while self.next_start < self.conns.len() && self.connecting < self.cfg.concurrency {
            let slot = self.next_start;
            if self.conns[slot].role == Role::Publisher
                && !self.shared.publish_go.load(Ordering::Acquire)
            {
                break;
            }
            self.next_start += 1;
            self.connecting += 1;
            let source = self.source_for(self.conns[slot].id);
            let now = self.now;
            self.result.first_start.get_or_insert(now);
            let c = &self.conns[slot];
            let addr = self.target_of(c.id).addr;
            let c = &mut self.conns[slot];
            c.started = now;
            c.state = State::Connecting;
            match io::tcp_socket(addr, source) {
                Ok(fd) => {
                    io.connect(slot as u32, fd.as_raw_fd(), addr)?;
                    c.fd = Some(fd);
                }
                Err(e) => {
                    self.result.errors.connect += 1;
                    self.fail(slot as u32, || format!("socket: {e}"));
                }
            }
        }
        Ok(())
    }

    /// Where connection `id` goes: round robin over the targets (the publisher, whose
    /// id is `u32::MAX`, to the first).
    fn target_of(&self, id: u32) -> &super::Target {
        let targets = &self.cfg.targets;
        if id == u32::MAX {
            return &targets[0];
        }
        &targets[id as usize % targets.len()]
    }

    fn source_for(&self, id: u32) -> Option<IpAddr> {
        let addrs = &self.cfg.source_addrs;
        if addrs.is_empty() || id == u32::MAX {
            return addrs.first().copied();
        }
        Some(addrs[id as usize % addrs.len()])
    }

    fn on_completion(&mut self, c: Completion<'_>) {
        match c {
            Completion::Connected { slot, res } => self.on_connected(slot, res),
            Completion::Data { slot, bytes } => self.on_data(slot, bytes),
            Completion::RecvEnded { slot, res } => {
                let c = &mut self.conns[slot as usize];
                c.recv_armed = false;
                if c.state == State::Done {
                    return;
                }
                if res == 0 || (res < 0 && res != -libc::ENOBUFS) {
                    if c.state == State::Closing && c.pending.is_empty() {
                        // The server closed the socket right after its close frame, or
                        // without one after ours: either way we are done.
                        self.finish(slot);
                        return;
                    }
                    self.result.errors.disconnected += 1;
                    let why = if res == 0 {
                        "the server closed the connection".to_string()
                    } else {
                        format!("recv: {}", std::io::Error::from_raw_os_error(-res))
                    };
                    self.fail(slot, || why);
                } else {
                    self.mark(slot);
                }
            }
            Completion::Sent { slot, res, mut buf } => {
                let c = &mut self.conns[slot as usize];
                buf.clear();
                if c.spare.capacity() < buf.capacity() {
                    c.spare = buf;
                }
                if c.state == State::Done {
                    return;
                }
                if res < 0 {
                    self.result.errors.disconnected += 1;
                    self.fail(slot, || {
                        format!("send: {}", std::io::Error::from_raw_os_error(-res))
                    });
                } else if !c.out.is_empty() || c.tls.as_ref().is_some_and(|t| t.wants_write()) {
                    self.mark(slot);
                }
            }
        }
    }

    fn on_connected(&mut self, slot: u32, res: i32) {
        let c = &mut self.conns[slot as usize];
        if c.state != State::Connecting {
            return;
        }
        if res < 0 {
            self.result.errors.connect += 1;
            self.fail(slot, || {
                format!("connect: {}", std::io::Error::from_raw_os_error(-res))
            });
            return;
        }
        c.state = State::Handshaking;
        c.key = wire::new_key(&mut self.rng);
        let (id, role) = (c.id, c.role);
        let target = self.target_of(id);
        let path = match role {
            Role::Subscriber | Role::Publisher | Role::Direct => {
                let name = match role {
                    Role::Publisher => PUBLISHER_NAME.to_string(),
                    Role::Direct => format!("d{id}"),
                    _ => format!("s{id}"),
                };
                let path = &target.path;
                let sep = if path.contains('?') { '&' } else { '?' };
                format!("{path}{sep}room={}&name={name}", self.cfg.room)
            }
            Role::Echo | Role::Idle => target.path.clone(),
        };
        let host = target.host.clone();
        let tls = match (&self.cfg.tls, target.tls) {
            (Some(config), true) => {
                let name = rustls::pki_types::ServerName::try_from(target.server_name.clone());
                match name.map_err(|e| e.to_string()).and_then(|name| {
                    rustls::ClientConnection::new(Arc::clone(config), name)
                        .map_err(|e| e.to_string())
                }) {
                    Ok(mut conn) => {
                        // The run's own limits bound what is queued.
                        conn.set_buffer_limit(None);
                        Some(Box::new(conn))
                    }
                    Err(e) => {
                        self.result.errors.handshake += 1;
                        self.fail(slot, || format!("TLS: {e}"));
                        return;
                    }
                }
            }
            _ => None,
        };
        let c = &mut self.conns[slot as usize];
        c.tls = tls;
        // Over TLS the request waits in rustls until the handshake is done.
        wire::write_request(&mut c.out, &host, &path, &c.key, self.cfg.deflate);
        self.mark(slot);
    }

    /// Received bytes: decrypted first on a TLS connection.
    fn on_data(&mut self, slot: u32, bytes: &[u8]) {
        let Some(tls) = self.conns[slot as usize].tls.as_mut() else {
            self.on_plain(slot, bytes);
            return;
        };
        let mut plain = std::mem::take(&mut self.tls_plain);
        plain.clear();
        let mut rest = bytes;
        let mut failed = None;
        while !rest.is_empty() {
            if let Err(e) = tls.read_tls(&mut rest) {
                failed = Some(e.to_string());
                break;
            }
            match tls.process_new_packets() {
                Ok(state) => {
                    let n = state.plaintext_bytes_to_read();
                    let at = plain.len();
                    plain.resize(at + n, 0);
                    let read =
                        std::io::Read::read(&mut tls.reader(), &mut plain[at..]).unwrap_or(0);
                    plain.truncate(at + read);
                }
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        if tls.wants_write() {
            self.mark(slot);
        }
        if let Some(e) = failed {
            self.result.errors.handshake += 1;
            self.fail(slot, || format!("TLS: {e}"));
        } else if !plain.is_empty() {
            self.on_plain(slot, &plain);
        }
        self.tls_plain = plain;
    }

    fn on_plain(&mut self, slot: u32, bytes: &[u8]) {
        let state = self.conns[slot as usize].state;
        match state {
            State::Handshaking => {
                let c = &mut self.conns[slot as usize];
                c.rbuf.extend_from_slice(bytes);
                match wire::parse_response(&c.rbuf, &c.key) {
                    Ok(wire::Response::Partial) => {}
                    Ok(wire::Response::Upgraded(_, None)) if self.cfg.deflate => {
                        self.result.errors.handshake += 1;
                        self.fail(slot, || {
                            "--deflate: the server did not agree to permessage-deflate".into()
                        });
                    }
                    Ok(wire::Response::Upgraded(head, agreed)) => {
                        // The client compresses at zlib's fastest level, every message.
                        let cfg = DeflateConfig {
                            level: 1,
                            min_bytes: 0,
                            ..DeflateConfig::default()
                        };
                        c.pmd = agreed.map(|a| Box::new(ConnDeflate::new(a.mirrored(), &cfg)));
                        c.rbuf.drain(..head);
                        self.on_open(slot);
                        let rbuf = std::mem::take(&mut self.conns[slot as usize].rbuf);
                        self.on_frames(slot, rbuf);
                    }
                    Err(e) => {
                        self.result.errors.handshake += 1;
                        self.fail(slot, || format!("handshake: {e}"));
                    }
                }
            }
            State::Open | State::Closing => self.on_frame_bytes(slot, bytes),
            State::New | State::Connecting | State::Done => {}
        }
    }

    /// Frame bytes of one receive. A frame started in an earlier receive is completed in
    /// the connection's receive buffer with only its own bytes (appending all of
    /// `bytes` copied every frame after it too: 13% of the client's time at 16 KiB);
    /// the frames after it are handled in place, and an incomplete last one is kept.
    fn on_frame_bytes(&mut self, slot: u32, mut bytes: &[u8]) {
        while !self.conns[slot as usize].rbuf.is_empty() {
            let c = &mut self.conns[slot as usize];
            let need = match codec::parse_header(&c.rbuf, &self.decoder) {
                Ok(Decoded::Complete(h, _)) => {
                    (h.frame_len() as usize).saturating_sub(c.rbuf.len())
                }
                // Enough for the longest header; any bytes of the frames after it
                // stay in the buffer and are handled from there.
                Ok(Decoded::Incomplete { .. }) => {
                    codec::MAX_HEADER_BYTES.saturating_sub(c.rbuf.len()).max(1)
                }
                // `frames` reports it.
                Err(_) => bytes.len(),
            };
            let take = need.min(bytes.len());
            c.rbuf.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            let rbuf = std::mem::take(&mut c.rbuf);
            self.on_frames(slot, rbuf);
            if self.conns[slot as usize].state == State::Done || bytes.is_empty() {
                return;
            }
        }
        let used = self.frames(slot, bytes);
        let c = &mut self.conns[slot as usize];
        if c.state != State::Done && used < bytes.len() {
            c.rbuf.extend_from_slice(&bytes[used..]);
        }
    }

    /// Handles the whole frames in `rbuf` and keeps the rest as the connection's
    /// receive buffer.
    fn on_frames(&mut self, slot: u32, mut rbuf: Vec<u8>) {
        let used = self.frames(slot, &rbuf);
        let c = &mut self.conns[slot as usize];
        if c.state != State::Done {
            rbuf.drain(..used);
            c.rbuf = rbuf;
        }
    }

    /// Handles the whole frames at the start of `buf`; returns the bytes they took.
    fn frames(&mut self, slot: u32, buf: &[u8]) -> usize {
        let mut at = 0;
        while self.conns[slot as usize].state != State::Done {
            let rest = &buf[at..];
            let header = match codec::parse_header(rest, &self.decoder) {
                Ok(Decoded::Complete(h, _)) => h,
                Ok(Decoded::Incomplete { .. }) => break,
                Err(e) => {
                    self.result.errors.protocol += 1;
                    self.fail(slot, || format!("bad frame from the server: {e:?}"));
                    break;
                }
            };
            let total = header.frame_len() as usize;
            if rest.len() < total {
                break;
            }
            let payload = &rest[header.header_len..total];
            at += total;
            let compressed = header.rsv & RSV1 != 0;
            self.frame(slot, header.fin, compressed, header.opcode, payload);
        }
        at
    }

    fn frame(&mut self, slot: u32, fin: bool, compressed: bool, opcode: OpCode, payload: &[u8]) {
        match opcode {
            OpCode::Ping => {
                let mask = self.rng.mask();
                let c = &mut self.conns[slot as usize];
                codec::encode_frame_into(&mut c.out, true, 0, OpCode::Pong, payload, Some(mask));
                self.mark(slot);
            }
            OpCode::Pong => {}
            OpCode::Close => self.on_close_frame(slot, payload),
            OpCode::Text | OpCode::Binary if fin => {
                if self.conns[slot as usize].frag.is_some() {
                    self.result.errors.protocol += 1;
                    self.fail(slot, || "a new message inside a fragmented one".into());
                    return;
                }
                self.message_maybe_compressed(slot, opcode, compressed, payload);
            }
            OpCode::Text | OpCode::Binary => {
                let c = &mut self.conns[slot as usize];
                if c.frag.is_some() {
                    self.result.errors.protocol += 1;
                    self.fail(slot, || "a new message inside a fragmented one".into());
                    return;
                }
                c.frag = Some((opcode, compressed, payload.to_vec()));
            }
            OpCode::Continuation => {
                let c = &mut self.conns[slot as usize];
                let Some((_, _, bytes)) = c.frag.as_mut() else {
                    self.result.errors.protocol += 1;
                    self.fail(slot, || "a continuation frame outside a message".into());
                    return;
                };
                bytes.extend_from_slice(payload);
                if fin {
                    let (op, compressed, bytes) = c.frag.take().expect("fragment");
                    self.message_maybe_compressed(slot, op, compressed, &bytes);
                }
            }
        }
    }

    /// A whole message; a compressed one is inflated first.
    fn message_maybe_compressed(
        &mut self,
        slot: u32,
        opcode: OpCode,
        compressed: bool,
        payload: &[u8],
    ) {
        if !compressed {
            return self.message(slot, opcode, payload);
        }
        with_scratch(|inflated| {
            let c = &mut self.conns[slot as usize];
            let result = match c.pmd.as_mut() {
                Some(pmd) => pmd
                    .inflate(payload, inflated, 64 << 20)
                    .map_err(|e| e.to_string()),
                None => Err("RSV1 without permessage-deflate".to_owned()),
            };
            match result {
                Ok(()) => self.message(slot, opcode, inflated),
                Err(e) => {
                    self.result.errors.protocol += 1;
                    self.fail(slot, || {
                        format!("bad compressed message from the server: {e}")
                    });
                }
            }
        });
    }

    /// Appends a masked data frame for `payload`, compressed when the extension was
    /// agreed.
    fn encode_data(c: &mut Conn, opcode: OpCode, payload: &[u8], mask: [u8; 4]) {
        match c.pmd.as_mut() {
            Some(pmd) => pmd.encode_frame(&mut c.out, opcode, payload, Some(mask)),
            None => codec::encode_frame_into(&mut c.out, true, 0, opcode, payload, Some(mask)),
        }
    }

    fn on_close_frame(&mut self, slot: u32, payload: &[u8]) {
        let c = &self.conns[slot as usize];
        if c.state == State::Closing {
            let lost = c.pending.len() as u64;
            if lost > 0 {
                self.result.errors.lost += lost;
                self.error(slot, || {
                    format!("{lost} messages not echoed before the server's close")
                });
            }
            self.finish(slot);
            return;
        }
        let code = (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
        let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or_default()).into_owned();
        self.result.errors.closed += 1;
        self.fail(slot, || {
            format!("the server closed the websocket: code {code:?} {reason:?}")
        });
    }

    fn message(&mut self, slot: u32, opcode: OpCode, payload: &[u8]) {
        match self.conns[slot as usize].role {
            Role::Echo => self.on_echo(slot, opcode, payload),
            Role::Subscriber => self.on_publication(slot, opcode, payload),
            Role::Direct => self.on_direct(slot, opcode, payload),
            Role::Publisher => self.result.ignored += 1,
            Role::Idle => {
                self.result.errors.unexpected += 1;
                self.error(slot, || {
                    format!("unexpected {opcode:?} message on an idle connection")
                });
            }
        }
    }

    fn in_window(&self) -> bool {
        self.now >= self.window.0 && self.now < self.window.1
    }

    fn on_echo(&mut self, slot: u32, opcode: OpCode, payload: &[u8]) {
        if opcode != self.opcode {
            self.result.errors.opcode += 1;
            let want = self.opcode;
            self.fail(slot, || {
                format!("echo came back as {opcode:?}, sent {want:?}")
            });
            return;
        }
        let c = &mut self.conns[slot as usize];
        let Some((seq, ts)) = c.pending.pop_front() else {
            self.result.errors.payload += 1;
            self.fail(slot, || "a message that was never sent".into());
            return;
        };
        if !wire::payload_matches(payload, c.id, seq, ts, self.cfg.bytes) {
            wire::payload(&mut self.scratch, c.id, seq, ts, self.cfg.bytes);
            self.result.errors.payload += 1;
            let (got, want) = (preview(payload), preview(&self.scratch));
            self.fail(slot, || {
                format!("echo of message {seq} differs: got {got}, sent {want}")
            });
            return;
        }
        if self.in_window() {
            self.result.messages += 1;
            self.messages_delta += 1;
            let rtt = self.now.saturating_sub(ts).max(1);
            self.result.latency.saturating_record(rtt);
            let c = &mut self.conns[slot as usize];
            c.longest = c.longest.max(rtt);
        }
        if !self.stopping && self.now < self.window.1 {
            if self.cfg.echo_pause.is_zero() {
                self.queue_echo(slot);
            } else {
                let due = self.now + self.cfg.echo_pause.as_nanos() as u64;
                self.paced.push_back((due, slot));
            }
        }
    }

    /// Once the main thread has set the window (the connect phase is over), the echo
    /// connections open by then start sending, [`START_BYTES`] per loop iteration at
    /// most (all at once, 10,000 x 16 x 16 KiB would be 2.5 GiB encoded in one
    /// iteration); one that opens later starts as it opens.
    fn start_echoes(&mut self) {
        if self.cfg.mode != Mode::Echo || self.window.0 == u64::MAX || self.stopping {
            return;
        }
        let per_conn =
            (self.cfg.bytes + codec::MAX_HEADER_BYTES) as u64 * self.cfg.in_flight as u64;
        let mut budget = START_BYTES;
        while self.echo_cursor < self.conns.len() && budget > 0 {
            let slot = self.echo_cursor as u32;
            self.echo_cursor += 1;
            let c = &self.conns[slot as usize];
            if c.role == Role::Echo && c.state == State::Open {
                for _ in 0..self.cfg.in_flight {
                    self.queue_echo(slot);
                }
                budget = budget.saturating_sub(per_conn);
            }
        }
    }

    /// Echoes whose pause (`--pause-ms`) is over go out (the pause is the same for
    /// every connection, so the queue is in order of due time).
    fn send_paced(&mut self) {
        while let Some(&(due, slot)) = self.paced.front() {
            if due > self.now {
                break;
            }
            self.paced.pop_front();
            if !self.stopping && self.conns[slot as usize].state == State::Open {
                self.queue_echo(slot);
            }
        }
    }

    fn queue_echo(&mut self, slot: u32) {
        let mask = self.rng.mask();
        let c = &mut self.conns[slot as usize];
        let seq = c.next_seq;
        c.next_seq += 1;
        if c.pmd.is_some() {
            wire::payload(&mut self.scratch, c.id, seq, self.now, self.cfg.bytes);
            Self::encode_data(c, self.opcode, &self.scratch, mask);
        } else {
            // Masked straight from the payload's pieces into the output (no copy of
            // the payload first).
            let len = self.cfg.bytes;
            let header = codec::encode_header(true, 0, self.opcode, len as u64, Some(mask));
            c.out.reserve(header.as_bytes().len() + len);
            c.out.extend_from_slice(header.as_bytes());
            let mut offset = 0;
            wire::payload_pieces(c.id, seq, self.now, len, |piece| {
                mask::extend_unmasked(&mut c.out, piece, mask, offset);
                offset += piece.len();
            });
        }
        c.pending.push_back((seq, self.now));
        self.mark(slot);
    }

    fn on_publication(&mut self, slot: u32, opcode: OpCode, payload: &[u8]) {
        if opcode != OpCode::Text {
            self.result.errors.opcode += 1;
            self.fail(slot, || format!("a {opcode:?} frame from the chat room"));
            return;
        }
        let frame: ChatFrame<'_> = match serde_json::from_slice(payload) {
            Ok(f) => f,
            Err(e) => {
                self.result.errors.payload += 1;
                let got = preview(payload);
                self.fail(slot, || format!("not a chat JSON frame ({e}): {got}"));
                return;
            }
        };
        let ours = frame.from.as_deref().is_none_or(|f| f == PUBLISHER_NAME);
        let parsed = frame.text.as_deref().and_then(wire::parse_publication);
        let Some((seq, ts)) = parsed.filter(|_| ours) else {
            // Another member's message or a notice of the room: not ours to check.
            self.result.ignored += 1;
            return;
        };
        let c = &mut self.conns[slot as usize];
        // A subscriber's first publication settles everything before it: it may have
        // joined after the first ones went out.
        let settle_from = c.expect.unwrap_or(self.counts_base);
        let expect = c.expect.unwrap_or(seq);
        if seq < expect {
            self.result.errors.payload += 1;
            self.error(slot, || {
                format!(
                    "publication {seq} after {} (repeated or reordered)",
                    expect - 1
                )
            });
            return;
        }
        c.expect = Some(seq + 1);
        if seq > expect {
            self.result.errors.lost += seq - expect;
            self.error(slot, || {
                format!("publications {expect}..{seq} never arrived")
            });
        }
        // Everything up to `seq` is now settled for this subscriber.
        for s in settle_from.max(self.counts_base)..=seq {
            let i = (s - self.counts_base) as usize;
            if self.counts.len() <= i {
                self.counts.resize(i + 1, 0);
            }
            self.counts[i] += 1;
        }
        self.advance_done();
        if self.in_window() {
            self.result.messages += 1;
            self.messages_delta += 1;
            self.result
                .latency
                .saturating_record(self.now.saturating_sub(ts).max(1));
        }
    }

    /// A direct message from the previous connection: in order, counted as delivered for
    /// its sender (whose window of messages in flight it opens).
    fn on_direct(&mut self, slot: u32, opcode: OpCode, payload: &[u8]) {
        if opcode != OpCode::Text {
            self.result.errors.opcode += 1;
            self.fail(slot, || format!("a {opcode:?} frame from the chat gear"));
            return;
        }
        let n = self.cfg.connections as u32;
        let c = &self.conns[slot as usize];
        let from_id = (c.id + n - 1) % n;
        let frame: ChatFrame<'_> = match serde_json::from_slice(payload) {
            Ok(f) => f,
            Err(e) => {
                self.result.errors.payload += 1;
                let got = preview(payload);
                self.fail(slot, || format!("not a chat JSON frame ({e}): {got}"));
                return;
            }
        };
        let parsed = frame.text.as_deref().and_then(wire::parse_publication);
        let sender_ok = frame.from.as_deref() == Some(&format!("d{from_id}"));
        let Some((seq, ts)) = parsed.filter(|_| sender_ok) else {
            self.result.errors.payload += 1;
            let got = preview(payload);
            self.fail(slot, || format!("not a message of d{from_id}: {got}"));
            return;
        };
        let c = &mut self.conns[slot as usize];
        let expect = c.expect.unwrap_or(0);
        c.expect = Some(seq + 1);
        if seq != expect {
            self.result.errors.payload += 1;
            self.error(slot, || {
                format!("message {seq} of d{from_id} where {expect} was due")
            });
        }
        self.shared.delivered[from_id as usize].store(seq + 1, Ordering::Release);
        if self.in_window() {
            self.result.messages += 1;
            self.messages_delta += 1;
            self.result
                .latency
                .saturating_record(self.now.saturating_sub(ts).max(1));
        }
    }

    /// Direct: every open sender of this thread tops its messages in flight (sent and
    /// not yet received by the next connection) up to `in_flight`, once the window is
    /// set and until it ends.
    fn send_directs(&mut self) {
        if self.cfg.mode != Mode::Direct
            || self.window.0 == u64::MAX
            || self.stopping
            || self.now >= self.window.1
        {
            return;
        }
        let n = self.cfg.connections as u32;
        for slot in 0..self.conns.len() as u32 {
            let c = &self.conns[slot as usize];
            if c.state != State::Open {
                continue;
            }
            let (id, mut seq) = (c.id, c.next_seq);
            let delivered = self.shared.delivered[id as usize].load(Ordering::Acquire);
            if seq - delivered >= self.cfg.in_flight as u64 {
                continue;
            }
            let to = (id + 1) % n;
            while seq - delivered < self.cfg.in_flight as u64 {
                let mask = self.rng.mask();
                wire::direct(&mut self.scratch, to, seq, self.now, self.cfg.bytes);
                Self::encode_data(
                    &mut self.conns[slot as usize],
                    OpCode::Text,
                    &self.scratch,
                    mask,
                );
                seq += 1;
            }
            self.conns[slot as usize].next_seq = seq;
            self.shared.sent[id as usize].store(seq, Ordering::Release);
            self.mark(slot);
        }
    }

    /// Moves this thread's "delivered to every subscriber" mark on and publishes it
    /// (the publisher's window reads it).
    fn advance_done(&mut self) {
        while self.counts.front().is_some_and(|&n| n >= self.subs_alive) {
            self.counts.pop_front();
            self.counts_base += 1;
        }
        let done = if self.subs_alive == 0 {
            u64::MAX
        } else {
            self.counts_base
        };
        self.shared.done[self.thread].store(done, Ordering::Release);
    }

    fn on_open(&mut self, slot: u32) {
        let now = self.now;
        let c = &mut self.conns[slot as usize];
        c.state = State::Open;
        self.connecting -= 1;
        self.result.established += 1;
        // The publisher connects later on purpose; its handshake would stretch the
        // subscribers' handshake rate.
        if c.role != Role::Publisher {
            self.result.last_established = Some(now);
        }
        self.result
            .handshake
            .saturating_record(now.saturating_sub(c.started).max(1));
        self.shared.established.fetch_add(1, Ordering::Relaxed);
        match c.role {
            Role::Echo => {
                if (slot as usize) < self.echo_cursor && !self.stopping {
                    for _ in 0..self.cfg.in_flight {
                        self.queue_echo(slot);
                    }
                }
            }
            Role::Subscriber => {
                self.subs_alive += 1;
                self.advance_done();
            }
            Role::Publisher | Role::Idle | Role::Direct => {}
        }
    }

    /// The mode's work once per iteration: the publisher's sends and the stop.
    fn step(&mut self) {
        self.send_directs();
        let end = self.window.1;
        let last = self.conns.len().saturating_sub(1);
        if self
            .conns
            .get(last)
            .is_some_and(|c| c.role == Role::Publisher)
        {
            self.publish(last as u32, end);
        }
        if !self.stopping && self.now >= end {
            self.stopping = true;
            self.closing_deadline = self.now + self.closing_grace_ns();
        }
        if self.stopping {
            self.close_when_settled();
        }
    }

    /// How long the closing handshakes may take: [`CLOSING_GRACE`], plus twice the
    /// time the echoes still in flight need at the rate this thread saw in the window.
    /// The server's close reply comes after them: with 10,000 connections of 16
    /// messages of 16 KiB in flight, that is several seconds of echoes, and a fixed
    /// grace counted a server that was only busy as one that did not close.
    fn closing_grace_ns(&self) -> u64 {
        let base = CLOSING_GRACE.as_nanos() as u64;
        let in_flight: u64 = self.conns.iter().map(|c| c.pending.len() as u64).sum();
        let window_ns = self.window.1.saturating_sub(self.window.0);
        if in_flight == 0 || self.result.messages == 0 {
            return base;
        }
        let drain_ns = in_flight as f64 * window_ns as f64 / self.result.messages as f64;
        (base + 2 * drain_ns as u64).min(MAX_CLOSING_GRACE.as_nanos() as u64)
    }

    fn publish(&mut self, slot: u32, end: u64) {
        let c = &self.conns[slot as usize];
        if c.state != State::Open {
            return;
        }
        if self.now >= end {
            if self.shared.published.load(Ordering::Relaxed) == u64::MAX {
                self.shared.published.store(c.next_seq, Ordering::Release);
            }
            return;
        }
        let started = *self.pub_started.get_or_insert(self.now);
        let target = match self.cfg.rate {
            Some(rate) => ((self.now - started) as f64 * rate / 1e9) as u64 + 1,
            None => {
                let done = self
                    .shared
                    .done
                    .iter()
                    .map(|d| d.load(Ordering::Acquire))
                    .min()
                    .unwrap_or(u64::MAX);
                done.saturating_add(self.cfg.in_flight as u64)
            }
        };
        let mut sent = c.next_seq;
        let until = target.min(sent + MAX_BURST);
        while sent < until {
            let mask = self.rng.mask();
            wire::publication(&mut self.scratch, sent, self.now, self.cfg.bytes);
            let c = &mut self.conns[slot as usize];
            Self::encode_data(c, OpCode::Text, &self.scratch, mask);
            sent += 1;
            c.next_seq = sent;
            if self.in_window() {
                self.result.published += 1;
            }
        }
        self.mark(slot);
    }

    /// After the end: sends close frames once what is owed has arrived (echoes come
    /// back before the server's close reply anyway; broadcast waits until every
    /// publication reached this thread's subscribers), and gives up at the deadline.
    fn close_when_settled(&mut self) {
        let published = self.shared.published.load(Ordering::Acquire);
        let deliveries_done = match self.cfg.mode {
            Mode::Broadcast => {
                // Without a publisher that got to publish there is nothing to wait for.
                let none = self.shared.publish_failed.load(Ordering::Relaxed);
                none || (published != u64::MAX && self.counts_base >= published)
                    || self.subs_alive == 0
            }
            // Every sender's messages arrived, on every thread: a connection that
            // closed earlier would turn messages still on their way into errors.
            Mode::Direct => self
                .shared
                .sent
                .iter()
                .zip(&self.shared.delivered)
                .all(|(s, d)| s.load(Ordering::Acquire) == d.load(Ordering::Acquire)),
            Mode::Echo | Mode::Connect => true,
        };
        let overdue = self.now >= self.closing_deadline;
        for slot in 0..self.conns.len() as u32 {
            let c = &self.conns[slot as usize];
            match c.state {
                State::New => self.finish(slot),
                State::Connecting | State::Handshaking => {
                    self.result.errors.timeout += 1;
                    self.fail(slot, || {
                        "the handshake did not finish before the end".into()
                    });
                }
                State::Open if deliveries_done || overdue || c.role == Role::Publisher => {
                    let (role, id) = (c.role, c.id as usize);
                    if role == Role::Direct {
                        let lost = self.shared.sent[id].load(Ordering::Acquire)
                            - self.shared.delivered[id].load(Ordering::Acquire);
                        if lost > 0 {
                            self.result.errors.lost += lost;
                            self.error(slot, || format!("{lost} direct messages never arrived"));
                        }
                    }
                    if role == Role::Subscriber && published != u64::MAX {
                        let got = self.conns[slot as usize].expect.unwrap_or(0);
                        if got < published {
                            self.result.errors.lost += published - got;
                            self.error(slot, || {
                                format!("publications {got}..{published} never arrived")
                            });
                        }
                    }
                    self.send_close(slot);
                }
                State::Closing if overdue => {
                    self.result.errors.timeout += 1;
                    let pending = c.pending.len();
                    self.fail(slot, || {
                        format!("no close reply in time ({pending} echoes missing)")
                    });
                }
                State::Open | State::Closing | State::Done => {}
            }
        }
    }

    fn send_close(&mut self, slot: u32) {
        let mask = self.rng.mask();
        let c = &mut self.conns[slot as usize];
        codec::encode_frame_into(
            &mut c.out,
            true,
            0,
            OpCode::Close,
            &1000u16.to_be_bytes(),
            Some(mask),
        );
        c.state = State::Closing;
        if c.role == Role::Subscriber {
            self.subs_alive -= 1;
        }
        self.mark(slot);
    }

    /// Counts a failure of `slot`, says why (the first few times) and finishes it.
    fn fail(&mut self, slot: u32, msg: impl FnOnce() -> String) {
        if matches!(
            self.conns[slot as usize].state,
            State::Connecting | State::Handshaking
        ) {
            self.shared.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.error(slot, msg);
        self.finish(slot);
    }

    /// Ends `slot`: shuts the socket down (its recv ends, a send fails) and closes it.
    /// The memory its operations point to belongs to [`Io`], so closing now is safe.
    fn finish(&mut self, slot: u32) {
        let c = &mut self.conns[slot as usize];
        match c.state {
            State::Done => return,
            State::Connecting | State::Handshaking => self.connecting -= 1,
            State::Open if c.role == Role::Subscriber => {
                self.subs_alive -= 1;
                c.state = State::Done;
                self.advance_done();
            }
            _ => {}
        }
        let c = &mut self.conns[slot as usize];
        c.state = State::Done;
        if let Some(fd) = c.fd.take() {
            io::shutdown(&fd);
        }
        c.rbuf = Vec::new();
        c.out = Vec::new();
        c.spare = Vec::new();
        c.frag = None;
        self.live -= 1;
    }

    /// Ends every connection still open (the run is over).
    fn finish_all(&mut self) {
        for slot in 0..self.conns.len() as u32 {
            self.finish(slot);
        }
    }

    /// Re-arms ended recvs and sends what each touched connection queued, one send per
    /// connection at a time.
    fn flush(&mut self, io: &mut Io) -> std::io::Result<()> {
        for slot in std::mem::take(&mut self.dirty) {
            let c = &mut self.conns[slot as usize];
            c.dirty = false;
            let Some(fd) = c.fd.as_ref().map(AsRawFd::as_raw_fd) else {
                continue;
            };
            if !c.recv_armed && matches!(c.state, State::Handshaking | State::Open | State::Closing)
            {
                c.recv_armed = true;
                io.recv(slot, fd)?;
            }
            let tls_pending = c.tls.as_ref().is_some_and(|t| t.wants_write());
            if (!c.out.is_empty() || tls_pending) && !io.sending(slot) {
                let next = std::mem::take(&mut c.spare);
                let mut bytes = std::mem::replace(&mut c.out, next);
                if let Some(tls) = c.tls.as_mut() {
                    // Seal the frames into records (held by rustls until the
                    // handshake is done) and send whatever records are ready.
                    if !bytes.is_empty() {
                        let _ = std::io::Write::write_all(&mut tls.writer(), &bytes);
                    }
                    bytes.clear();
                    while tls.wants_write() {
                        match tls.write_tls(&mut bytes) {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                    }
                    if bytes.is_empty() {
                        c.spare = bytes;
                        continue;
                    }
                }
                io.send(slot, fd, bytes)?;
            }
        }
        Ok(())
    }
}

/// The first bytes of a payload, for an error message.
fn preview(bytes: &[u8]) -> String {
    let cut = &bytes[..bytes.len().min(48)];
    let more = if bytes.len() > cut.len() { "..." } else { "" };
    format!(
        "{:?}{more} ({} bytes)",
        String::from_utf8_lossy(cut),
        bytes.len()
    )
}
