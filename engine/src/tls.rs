//! `wss://`: TLS on the engine's own listeners, with rustls (its default crypto
//! provider, aws-lc-rs), on either driver.
//!
//! TLS sits between a shard's driver and its sessions: the shard feeds the ciphertext a
//! recv brought to the connection's `TlsConn`, hands the plaintext to the session as
//! if it had been received, and seals what the session queued into records before the
//! send. The session (and the gear) cannot tell a TLS connection from a plain one, but
//! for [`kythera_handler_api::TlsParts`] in the upgrade request.
//!
//! # Where bytes are copied
//!
//! rustls' unbuffered API (`UnbufferedServerConnection`): records are decrypted in
//! place in the receive buffer (only a record cut by the end of a receive is copied, to
//! `TlsConn::incoming`, and only that record), and the session's output goes from its
//! buffers to `WriteTraffic::encrypt`, which writes records into the send buffer. Inside
//! rustls 0.23 each way still copies twice, which cannot be avoided from here: a
//! decrypted record is moved into a `Vec` of its own (`ReadTraffic::next_record` pops it
//! from its plaintext queue; its source says in-place records are for later) and lent
//! immutably, so it is copied once more into the shard's scratch buffer, where the
//! session unmasks frames in place as in a receive buffer; and `encrypt` copies the
//! plaintext into a record of its own, encrypts it there and copies the record into the
//! send buffer. A plain connection copies none of these.
//!
//! # kTLS
//!
//! Handing the record layer to the kernel (`setsockopt(TCP_ULP, "tls")` after the
//! handshake, then plain sends and recvs) needs the kernel's `tls` module, which these
//! machines do not offer (`/proc/sys/net/ipv4/tcp_available_ulp` lists `mptcp` only).
//! The seam for it is `TlsConn`: after the handshake it would export the traffic
//! secrets (`dangerous_extract_secrets`) and step aside.
//!
//! # Memory
//!
//! An idle TLS connection holds rustls' connection state (keys, the record layer: about
//! 2.3 KB measured with a counting allocator) and no buffer: `incoming` is empty
//! between records, and the send buffer is given back by the shard's idle sweep. At
//! 10,000 idle `wss://` connections the server's RSS grew by 4.0 KB per connection
//! (136 B for `ws://`), README "Serving wss://".
//!
//! # Certificates
//!
//! [`TlsConfig`] holds the certificate chain and key, read from PEM. Every shard takes
//! the current rustls configuration when it accepts a connection, so
//! [`TlsConfig::reload`] (the `kythera` binary calls it on `SIGHUP`) changes what new
//! handshakes present without touching established connections. Session tickets stay
//! valid across reloads: the ticket keys and the session cache belong to the
//! `TlsConfig`, not to one certificate.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use kythera_handler_api::TlsParts;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{
    ClientHello, ProducesTickets, ResolvesServerCert, ServerSessionMemoryCache,
    StoresServerSessions, UnbufferedServerConnection,
};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};
use rustls::{HandshakeKind, ProtocolVersion, ServerConfig};

use crate::session::Output;

/// Sessions kept per server for resumption by session id (TLS 1.2 clients without
/// tickets); tickets need no server memory.
const SESSION_CACHE_ENTRIES: usize = 4096;

/// Why a certificate or key could not be used.
#[derive(Debug)]
pub enum TlsError {
    /// A file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// No certificate in the certificate file (or it is not PEM).
    NoCertificate(String),
    /// No private key in the key file (PKCS#8, PKCS#1 or SEC1 PEM).
    NoKey(String),
    /// rustls refused the pair (a key that does not match the certificate, say).
    Rustls(rustls::Error),
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Read { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            TlsError::NoCertificate(from) => write!(f, "no PEM certificate in {from}"),
            TlsError::NoKey(from) => write!(f, "no PEM private key in {from}"),
            TlsError::Rustls(err) => write!(f, "TLS configuration refused: {err}"),
        }
    }
}

impl std::error::Error for TlsError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TlsError::Read { source, .. } => Some(source),
            TlsError::Rustls(err) => Some(err),
            _ => None,
        }
    }
}

/// Where the certificate and key come from (what [`TlsConfig::reload`] reads again).
#[derive(Debug, Clone)]
enum Source {
    Files { cert: PathBuf, key: PathBuf },
    Pem { cert: Vec<u8>, key: Vec<u8> },
}

/// The TLS settings of a server's TLS listeners: a certificate chain and its key, TLS
/// 1.3 and 1.2, ALPN `http/1.1`, session tickets. Cheap to clone (one `Arc`); all
/// clones see a [`TlsConfig::reload`].
#[derive(Clone)]
pub struct TlsConfig {
    shared: Arc<Shared>,
}

struct Shared {
    source: RwLock<Source>,
    current: RwLock<Arc<ServerConfig>>,
    /// Bumped by each reload, so that a shard sees a new configuration with one atomic
    /// load per accept.
    generation: AtomicU64,
    ticketer: Arc<dyn ProducesTickets>,
    sessions: Arc<dyn StoresServerSessions>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("generation", &self.generation())
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Reads a PEM certificate chain (leaf first) and a PEM private key from files.
    pub fn from_pem_files(
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Result<TlsConfig, TlsError> {
        TlsConfig::new(Source::Files {
            cert: cert.into(),
            key: key.into(),
        })
    }

    /// A PEM certificate chain (leaf first) and a PEM private key held in memory
    /// (tests, or embedders with their own secret store).
    pub fn from_pem(cert: &[u8], key: &[u8]) -> Result<TlsConfig, TlsError> {
        TlsConfig::new(Source::Pem {
            cert: cert.to_vec(),
            key: key.to_vec(),
        })
    }

    fn new(source: Source) -> Result<TlsConfig, TlsError> {
        let ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(TlsError::Rustls)?;
        let sessions: Arc<dyn StoresServerSessions> =
            ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
        let config = build(&source, &ticketer, &sessions)?;
        Ok(TlsConfig {
            shared: Arc::new(Shared {
                source: RwLock::new(source),
                current: RwLock::new(config),
                generation: AtomicU64::new(0),
                ticketer,
                sessions,
            }),
        })
    }

    /// Reads the certificate and key again (from the same files) and makes them the
    /// ones new handshakes present. On an error nothing changes: the old pair stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let source = read_lock(&self.shared.source).clone();
        self.install(&source)
    }

    /// Replaces a pair held in memory (see [`TlsConfig::from_pem`]); from then on,
    /// [`TlsConfig::reload`] rereads this one.
    pub fn reload_from_pem(&self, cert: &[u8], key: &[u8]) -> Result<(), TlsError> {
        let source = Source::Pem {
            cert: cert.to_vec(),
            key: key.to_vec(),
        };
        self.install(&source)?;
        *write_lock(&self.shared.source) = source;
        Ok(())
    }

    fn install(&self, source: &Source) -> Result<(), TlsError> {
        let config = build(source, &self.shared.ticketer, &self.shared.sessions)?;
        *write_lock(&self.shared.current) = config;
        self.shared.generation.fetch_add(1, Ordering::Release);
        Ok(())
    }

    /// How many reloads took effect.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// The configuration new handshakes use, and its generation.
    pub(crate) fn current(&self) -> (u64, Arc<ServerConfig>) {
        let generation = self.generation();
        let config = Arc::clone(&read_lock(&self.shared.current));
        (generation, config)
    }
}

fn read_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A panic while holding the lock cannot leave the value half written (each write
    // is one assignment), so a poisoned lock is still good.
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write_lock<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// rustls' configuration for a certificate and key: TLS 1.3 and 1.2, ALPN `http/1.1`,
/// the shared ticketer and session cache.
fn build(
    source: &Source,
    ticketer: &Arc<dyn ProducesTickets>,
    sessions: &Arc<dyn StoresServerSessions>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let (cert_pem, key_pem, cert_from, key_from) = match source {
        Source::Files { cert, key } => (
            read_file(cert)?,
            read_file(key)?,
            cert.display().to_string(),
            key.display().to_string(),
        ),
        Source::Pem { cert, key } => (
            cert.clone(),
            key.clone(),
            "the certificate PEM".to_owned(),
            "the key PEM".to_owned(),
        ),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::NoCertificate(cert_from.clone()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(cert_from));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey(key_from))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Rustls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsError::Rustls)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.cert_resolver = Arc::new(RecordServerName(Arc::clone(&config.cert_resolver)));
    config.ticketer = Arc::clone(ticketer);
    config.session_storage = Arc::clone(sessions);
    Ok(Arc::new(config))
}

/// Why a TLS connection failed before or during its handshake (`/metrics`:
/// `kythera_tls_handshakes_failed_total{cause}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The first bytes were not a TLS handshake record (a plain HTTP request gets a
    /// plain 400 that says the port speaks TLS).
    NotTls,
    /// The client ended the handshake with an alert (it refused the certificate, say).
    RefusedByClient,
    /// Anything else rustls refused: a malformed record, no common version or cipher.
    Protocol,
}

/// The plain answer to a plain HTTP request on a TLS port (as nginx answers one).
const PLAIN_HTTP_ON_TLS_PORT: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
Content-Length: 46\r\n\
Connection: close\r\n\r\n\
This port speaks TLS: use https:// or wss://.\n";

/// A connection's TLS state, held by its shard beside the session: rustls' unbuffered
/// connection (which holds no buffers of its own between records) and the few bytes
/// that must wait.
pub(crate) struct TlsConn {
    conn: UnbufferedServerConnection,
    /// Received ciphertext not processed yet: a record (or handshake message) cut by the
    /// end of a receive. Empty between records, which is almost always.
    incoming: Vec<u8>,
    /// Ciphertext to send (`out[..out_used]`): handshake messages, tickets, sealed
    /// output; the bytes after `out_used` are a previous send's, kept as room to write
    /// into without zeroing it first.
    out: Vec<u8>,
    out_used: usize,
    /// The session's outputs whose bytes are sealed into the send in flight: they go
    /// back to the session ([`crate::session::Session::sent`]) when that send
    /// completes, so that its slow-consumer limit counts them until then.
    pub(crate) held: Vec<Output>,
    /// The name the client asked for (SNI), until the session is told.
    server_name: Option<Box<str>>,
    /// The handshake completed.
    established: bool,
    /// The connection failed (counted once); nothing more is read from it.
    failed: bool,
    close_notified: bool,
    /// The first byte was looked at (a TLS record or not).
    saw_first: bool,
}

/// rustls' overhead per record at most (TLS 1.2's 5-byte header, 8-byte explicit nonce
/// and 16-byte tag; TLS 1.3's is 22), and its largest plaintext per record.
const RECORD_OVERHEAD: usize = 29;
const RECORD_PLAINTEXT: usize = 16 * 1024;

/// Room for rustls to write `estimate` bytes at `out[*used..]` (growing `out` only where
/// it is shorter: what is beyond `used` is writable already), retried with the size
/// rustls asks for; advances `used` by what was written.
fn write_out<E>(
    out: &mut Vec<u8>,
    used: &mut usize,
    estimate: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
    required: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let mut room = estimate;
    loop {
        if out.len() < *used + room {
            out.resize(*used + room, 0);
        }
        match write(&mut out[*used..]) {
            Ok(n) => {
                *used += n;
                return Ok(());
            }
            Err(e) => match required(&e) {
                Some(r) if r > room => room = r,
                _ => return Err(e),
            },
        }
    }
}

fn encode_required(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

fn encrypt_required(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

thread_local! {
    /// The SNI name of the ClientHello a shard's thread processed last (see
    /// [`RecordServerName`]).
    static HELLO_SERVER_NAME: std::cell::RefCell<Option<Box<str>>> =
        const { std::cell::RefCell::new(None) };
}

/// Notes the client's SNI name on the way to the certificate: rustls' unbuffered server
/// connection does not tell it, and the resolver runs on the shard's thread, inside the
/// `process_tls_records` call that reads the ClientHello.
#[derive(Debug)]
struct RecordServerName(Arc<dyn ResolvesServerCert>);

impl ResolvesServerCert for RecordServerName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().map(Box::from);
        HELLO_SERVER_NAME.with(|n| *n.borrow_mut() = name);
        self.0.resolve(hello)
    }
}

impl TlsConn {
    pub(crate) fn new(config: Arc<ServerConfig>) -> Result<TlsConn, rustls::Error> {
        Ok(TlsConn {
            conn: UnbufferedServerConnection::new(config)?,
            incoming: Vec::new(),
            out: Vec::new(),
            out_used: 0,
            held: Vec::new(),
            server_name: None,
            established: false,
            failed: false,
            close_notified: false,
            saw_first: false,
        })
    }

    /// The handshake completed.
    pub(crate) fn is_established(&self) -> bool {
        self.established
    }

    /// The connection failed (and was counted).
    pub(crate) fn has_failed(&self) -> bool {
        self.failed
    }

    /// What `connect` is told of this session.
    pub(crate) fn parts(&mut self) -> TlsParts {
        TlsParts {
            server_name: self.server_name.take().map(String::from),
            version: match self.conn.protocol_version() {
                Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
                Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "unknown",
            },
            resumed: self.conn.handshake_kind() == Some(HandshakeKind::Resumed),
        }
    }

    /// Takes received ciphertext (decrypted in place where a record lies whole in
    /// `data`); appends the plaintext of its records to `plain`. `Ok(true)` when this
    /// completed the handshake. After an error the connection is to be closed (what
    /// [`TlsConn::seal`] returns next is the 400 to a plain HTTP request, if that was
    /// it).
    pub(crate) fn receive(
        &mut self,
        data: &mut [u8],
        plain: &mut Vec<u8>,
    ) -> Result<bool, Failure> {
        if self.failed {
            return Ok(false);
        }
        if !self.saw_first && !data.is_empty() {
            self.saw_first = true;
            // 22: a handshake record. Anything else cannot start a TLS connection.
            if data[0] != 22 {
                self.failed = true;
                if data[0].is_ascii_uppercase() {
                    self.out.truncate(self.out_used);
                    self.out.extend_from_slice(PLAIN_HTTP_ON_TLS_PORT);
                    self.out_used = self.out.len();
                }
                return Err(Failure::NotTls);
            }
        }
        let was_established = self.established;
        if !was_established {
            // A name noted for a connection that failed before taking it is not this
            // one's.
            HELLO_SERVER_NAME.with(|n| n.borrow_mut().take());
        }
        let mut data = data;
        if self.established && !self.incoming.is_empty() {
            // The rest of a record cut by the end of the last receive: complete that
            // record alone, then go on in place (appending the whole receive would copy
            // every byte of it, and with several messages in flight nearly every
            // receive ends inside a record).
            let taken = self.complete_cut_record(data, plain)?;
            data = &mut data[taken..];
        }
        let result = if self.incoming.is_empty() {
            // The usual case: records are processed where they arrived, and only a
            // record cut by the end of the receive is kept.
            let result = self.process(data, plain);
            if let Ok(used) = result {
                self.incoming.extend_from_slice(&data[used..]);
            }
            result
        } else {
            let mut buf = std::mem::take(&mut self.incoming);
            buf.extend_from_slice(data);
            let result = self.process(&mut buf, plain);
            if let Ok(used) = result {
                buf.drain(..used);
            }
            self.incoming = buf;
            result
        };
        if let Err(failure) = result {
            self.failed = true;
            return Err(failure);
        }
        if self.server_name.is_none() && !was_established {
            self.server_name = HELLO_SERVER_NAME.with(|n| n.borrow_mut().take());
        }
        Ok(self.established && !was_established)
    }

    /// After the handshake, with a cut record in `incoming`: appends from `data` what
    /// completes it (its length is in its header) and processes it. Returns how many
    /// bytes of `data` it took; `incoming` is empty afterwards unless `data` ended first.
    fn complete_cut_record(&mut self, data: &[u8], plain: &mut Vec<u8>) -> Result<usize, Failure> {
        const HEADER: usize = 5;
        let mut taken = 0;
        if self.incoming.len() < HEADER {
            taken = (HEADER - self.incoming.len()).min(data.len());
            self.incoming.extend_from_slice(&data[..taken]);
            if self.incoming.len() < HEADER {
                return Ok(taken);
            }
        }
        let record = HEADER + usize::from(u16::from_be_bytes([self.incoming[3], self.incoming[4]]));
        let more = record
            .saturating_sub(self.incoming.len())
            .min(data.len() - taken);
        self.incoming.extend_from_slice(&data[taken..taken + more]);
        taken += more;
        if self.incoming.len() >= record {
            let mut buf = std::mem::take(&mut self.incoming);
            let used = self
                .process(&mut buf, plain)
                .inspect_err(|_| self.failed = true)?;
            buf.drain(..used);
            // A record rustls did not take whole (it cannot be, after the handshake)
            // stays, and the rest of `data` is appended behind it as before.
            self.incoming = buf;
        }
        Ok(taken)
    }

    /// Drives rustls over `buf` (the records not processed yet, first byte on): the
    /// plaintext of application-data records to `plain`, handshake messages to `out`.
    /// Returns how many bytes of `buf` it is done with.
    fn process(&mut self, buf: &mut [u8], plain: &mut Vec<u8>) -> Result<usize, Failure> {
        let mut start = 0;
        loop {
            let status = self.conn.process_tls_records(&mut buf[start..]);
            let mut discard = status.discard;
            let state = status.state.map_err(|err| {
                tracing::debug!(error = %err, "TLS connection failed");
                match err {
                    rustls::Error::AlertReceived(_) => Failure::RefusedByClient,
                    _ => Failure::Protocol,
                }
            })?;
            let done = match state {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(|_| Failure::Protocol)?;
                        discard += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                    false
                }
                ConnectionState::EncodeTlsData(mut message) => {
                    write_out(
                        &mut self.out,
                        &mut self.out_used,
                        4096,
                        |b| message.encode(b),
                        encode_required,
                    )
                    .map_err(|_| Failure::Protocol)?;
                    false
                }
                // Sent at this turn's flush, after anything queued before it.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    false
                }
                ConnectionState::WriteTraffic(_) => {
                    self.established = true;
                    true
                }
                // Need more bytes; or the peer's close_notify (its close frame, or the
                // end of the connection, follows).
                _ => true,
            };
            start += discard;
            if done {
                return Ok(start);
            }
        }
    }

    /// Seals `plain` (the session's output, kept in `held` until the send completes)
    /// straight into records in the send buffer, with a `close_notify` once `closing`,
    /// and returns what is to be sent: records (handshake messages among them), or the
    /// 400 to a plain HTTP request. `None` when there is nothing to send.
    pub(crate) fn seal(&mut self, plain: Option<Output>, closing: bool) -> Option<Output> {
        let plain_bytes = plain.as_ref().map_or(0, Output::len);
        if self.established
            && !self.failed
            && (plain_bytes > 0 || (closing && !self.close_notified))
        {
            self.encrypt(plain.as_ref(), closing);
        }
        if let Some(plain) = plain {
            self.held.push(plain);
        }
        if self.out_used == 0 {
            return None;
        }
        let mut buf = std::mem::take(&mut self.out);
        buf.truncate(std::mem::take(&mut self.out_used));
        Some(Output {
            first: buf,
            start: 0,
            rest: Vec::new(),
        })
    }

    /// Encrypts `plain`'s bytes (and a `close_notify` once `closing`) into `out`.
    fn encrypt(&mut self, plain: Option<&Output>, closing: bool) {
        // Handshake messages still waiting (tickets) go first; the records of a cut
        // message in `incoming` are not touched (no bytes are read here).
        loop {
            let status = self.conn.process_tls_records(&mut []);
            match status.state {
                Ok(ConnectionState::EncodeTlsData(mut message)) => {
                    let written = write_out(
                        &mut self.out,
                        &mut self.out_used,
                        4096,
                        |b| message.encode(b),
                        encode_required,
                    );
                    if written.is_err() {
                        return;
                    }
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    let mut seal = |bytes: &[u8]| {
                        let records = bytes.len().div_ceil(RECORD_PLAINTEXT).max(1);
                        write_out(
                            &mut self.out,
                            &mut self.out_used,
                            bytes.len() + records * RECORD_OVERHEAD,
                            |b| traffic.encrypt(bytes, b),
                            encrypt_required,
                        )
                    };
                    if let Some(p) = plain {
                        let _ = seal(&p.first[p.start..]);
                        for chunk in &p.rest {
                            let _ = seal(chunk.bytes());
                        }
                    }
                    if closing && !self.close_notified {
                        self.close_notified = true;
                        let _ = write_out(
                            &mut self.out,
                            &mut self.out_used,
                            64,
                            |b| traffic.queue_close_notify(b),
                            encrypt_required,
                        );
                    }
                    return;
                }
                _ => return,
            }
        }
    }

    /// Gives back what an idle connection need not hold: its send buffer, and the room
    /// of its receive state.
    pub(crate) fn release_idle(&mut self) {
        if self.out_used == 0 {
            self.out = Vec::new();
        }
        if self.incoming.is_empty() {
            self.incoming = Vec::new();
        }
        if self.held.is_empty() {
            self.held = Vec::new();
        }
    }

    /// A send of [`TlsConn::seal`]'s output completed (call it before giving `held`
    /// back): its buffer is the next one written into, unless more was queued
    /// meanwhile or it carried no output of the session.
    pub(crate) fn recycle(&mut self, output: Output) {
        // Only a send that carried the session's output is a sign of more to come: the
        // handshake's own sends (its flight, the tickets) are followed by idle time.
        // Whatever its size: the idle sweep gives it back once the connection is quiet,
        // and dropping a large one after each send would allocate (and zero, and fault
        // in) as much again for the next.
        if self.out_used == 0 && !self.held.is_empty() {
            self.out = output.first;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_http_answer_has_its_length() {
        let text = std::str::from_utf8(PLAIN_HTTP_ON_TLS_PORT).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{text}"
        );
    }

    #[test]
    fn a_file_that_is_not_pem_is_refused_with_its_name() {
        let err = TlsConfig::from_pem(b"not a certificate", b"not a key").unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }
}
