//! `wss://`: TLS on the engine's own listeners, on either driver: rustls (its aws-lc-rs
//! provider) for the handshake, then a record layer of kythera's own
//! (`record_layer.rs`) with the keys rustls gives up.
//!
//! TLS sits between a shard's driver and its sessions: the shard feeds the ciphertext a
//! recv brought to the connection's `TlsConn`, which hands the plaintext to the session
//! as if it had been received, and seals what the session queued into records before
//! the send. The session (and the gear) cannot tell a TLS connection from a plain one,
//! but for [`kythera_handler_api::TlsParts`] in the upgrade request.
//!
//! # Where bytes are copied
//!
//! - Receiving, after the handshake: records are opened in place in the receive buffer,
//!   and the plaintext of each record after the first is moved down behind the first's,
//!   in the same buffer, so that the session gets one slice of the receive buffer as
//!   from a plain connection: a whole frame reaches the gear borrowed from where it
//!   arrived. Only a record cut by the end of a receive is copied (into
//!   `TlsConn::incoming`, and only that record).
//! - Sending: a piece of the session's output of 1 KiB or more is sealed from where it
//!   lies straight into the send buffer; smaller pieces are copied into a shared record
//!   and sealed there.
//! - During the handshake, rustls' unbuffered API: the plaintext that comes with the
//!   client's last flight (its upgrade request, often) is copied twice.
//!
//! rustls' own record layer (`ReadTraffic`, `WriteTraffic::encrypt`) copies twice each
//! way, which is why it is only used for the handshake.
//!
//! # kTLS
//!
//! Handing the record layer to the kernel (`setsockopt(TCP_ULP, "tls")` after the
//! handshake, then plain sends and recvs) needs the kernel's `tls` module, which these
//! machines do not offer (`/proc/sys/net/ipv4/tcp_available_ulp` lists `mptcp` only).
//! The seam for it is where `record_layer::RecordLayer` is made: the same secrets
//! from the same rustls call would go to `setsockopt(SOL_TLS, TLS_TX/TLS_RX)`, and
//! `TlsConn` would step aside.
//!
//! # Memory
//!
//! An idle TLS connection holds the record layer (two AEAD keys, their IVs and sequence
//! numbers, rustls' key schedule for key updates) and no buffer: `incoming` is empty
//! between records, and the send buffer is given back by the shard's idle sweep once
//! the session is quiet (a second without output). At 10,000 idle `wss://` connections
//! the server's RSS grew by 2.7 KB per connection (4.0 KB with rustls' whole connection
//! kept, before the record layer), README "Serving wss://".
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
    ClientHello, ProducesTickets, ResolvesServerCert, ServerConnectionData,
    ServerSessionMemoryCache, StoresServerSessions, UnbufferedServerConnection,
};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{ConnectionState, EncodeError, EncodeTlsData};
use rustls::{HandshakeKind, ProtocolVersion, ServerConfig};

use crate::session::Output;

mod record_layer;

use record_layer::{MAX_PLAINTEXT, Opened, Plain, RecordError, RecordLayer, Sink};

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

/// The cipher suites, in the server's order of preference, which decides (as Go's TLS
/// server and nginx's usual settings do): AES-128-GCM first. Clients (rustls, and
/// OpenSSL's defaults) list AES-256-GCM-SHA384 first, and following them costs the
/// server twice: SHA-384 has no instructions of its own on x86 (SHA-256 has SHA-NI), so
/// the handshake's key schedule is slower, and AES-256 is 14 rounds against AES-128's
/// 10 for every byte after it. AES-128-GCM is TLS 1.3's mandatory suite; the other
/// two stay for clients that offer nothing else.
const SUITES: [rustls::SupportedCipherSuite; 9] = {
    use rustls::crypto::aws_lc_rs::cipher_suite::*;
    [
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
    ]
};

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
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: SUITES.to_vec(),
        ..rustls::crypto::aws_lc_rs::default_provider()
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Rustls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(TlsError::Rustls)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // The server's order of SUITES, not the client's: see there.
    config.ignore_client_order = true;
    // After the handshake the traffic keys go to kythera's record layer (record_layer.rs).
    config.enable_secret_extraction = true;
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

/// Who runs a connection's TLS: rustls for the handshake, then kythera's own record
/// layer.
// The record layer inline, as an open connection holds it for its life; rustls'
// connection (1,088 bytes against 672) boxed, for the handshake only.
#[allow(clippy::large_enum_variant)]
enum Stage {
    Handshake(Box<UnbufferedServerConnection>),
    Records(RecordLayer),
    /// Between the two for a moment, and after a failure to change over.
    Gone,
}

/// A connection's TLS state, held by its shard beside the session: rustls' unbuffered
/// connection during the handshake, then the record layer (neither holds buffers of its
/// own between records), and the few bytes that must wait.
pub(crate) struct TlsConn {
    stage: Stage,
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
    /// The version agreed, and whether the session was resumed (noted when the
    /// handshake completes, for [`TlsConn::parts`]).
    version: &'static str,
    resumed: bool,
    /// The connection failed (counted once); nothing more is read from it.
    failed: bool,
    close_notified: bool,
    /// The peer's `close_notify` came: what follows it is not read.
    peer_closed: bool,
    /// The first byte was looked at (a TLS record or not).
    saw_first: bool,
}

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

/// Writes a handshake message rustls has to send at `out[*used..]`.
fn encode_into(
    out: &mut Vec<u8>,
    used: &mut usize,
    message: &mut EncodeTlsData<'_, ServerConnectionData>,
) -> Result<(), Failure> {
    write_out(out, used, 4096, |b| message.encode(b), encode_required)
        .map_err(|_| Failure::Protocol)
}

/// Pieces of the session's output shorter than this are gathered into records shared
/// with their neighbours (a copy of a few bytes); longer ones are sealed from where they
/// are, in records of their own.
const GATHER_BELOW: usize = 1024;

/// What a refused record counts as.
fn record_failure(err: RecordError) -> Failure {
    tracing::debug!(error = ?err, "TLS connection failed");
    match err {
        RecordError::Alert(_) => Failure::RefusedByClient,
        RecordError::Protocol(_) => Failure::Protocol,
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
            stage: Stage::Handshake(Box::new(UnbufferedServerConnection::new(config)?)),
            incoming: Vec::new(),
            out: Vec::new(),
            out_used: 0,
            held: Vec::new(),
            server_name: None,
            version: "unknown",
            resumed: false,
            failed: false,
            close_notified: false,
            peer_closed: false,
            saw_first: false,
        })
    }

    /// The handshake completed.
    pub(crate) fn is_established(&self) -> bool {
        matches!(self.stage, Stage::Records(_))
    }

    /// The connection failed (and was counted).
    pub(crate) fn has_failed(&self) -> bool {
        self.failed
    }

    /// What `connect` is told of this session.
    pub(crate) fn parts(&mut self) -> TlsParts {
        TlsParts {
            server_name: self.server_name.take().map(String::from),
            version: self.version,
            resumed: self.resumed,
        }
    }

    /// Takes received ciphertext. During the handshake, rustls takes it, and the
    /// plaintext of records that came with the client's last flight is appended to
    /// `plain`; `Ok(true)` when this completed the handshake (call again with no data
    /// then: bytes that came behind the handshake wait in `incoming` until that call).
    /// After it, records are opened in place in `data` and their plaintext is handed to
    /// `deliver`, borrowed from `data` (or from `incoming` for a record cut by the end of
    /// a receive). After an error the connection is to be closed (what
    /// [`TlsConn::seal`] returns next is the 400 to a plain HTTP request, if that was
    /// it).
    pub(crate) fn receive(
        &mut self,
        data: &mut [u8],
        plain: &mut Vec<u8>,
        deliver: &mut dyn FnMut(&mut [u8]),
    ) -> Result<bool, Failure> {
        if self.failed {
            return Ok(false);
        }
        let result = if self.is_established() {
            self.receive_records(data, deliver).map(|()| false)
        } else {
            self.receive_handshake(data, plain)
        };
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn receive_handshake(&mut self, data: &mut [u8], plain: &mut Vec<u8>) -> Result<bool, Failure> {
        if !self.saw_first && !data.is_empty() {
            self.saw_first = true;
            // 22: a handshake record. Anything else cannot start a TLS connection.
            if data[0] != 22 {
                if data[0].is_ascii_uppercase() {
                    self.out.truncate(self.out_used);
                    self.out.extend_from_slice(PLAIN_HTTP_ON_TLS_PORT);
                    self.out_used = self.out.len();
                }
                return Err(Failure::NotTls);
            }
        }
        // A name noted for a connection that failed before taking it is not this one's.
        HELLO_SERVER_NAME.with(|n| n.borrow_mut().take());
        let complete = if self.incoming.is_empty() {
            // Handshake records are processed where they arrived, and only a message
            // cut by the end of the receive is kept.
            let (used, complete) = self.process(data, plain)?;
            self.incoming.extend_from_slice(&data[used..]);
            complete
        } else {
            let mut buf = std::mem::take(&mut self.incoming);
            buf.extend_from_slice(data);
            let (used, complete) = self.process(&mut buf, plain)?;
            buf.drain(..used);
            self.incoming = buf;
            complete
        };
        if self.server_name.is_none() {
            self.server_name = HELLO_SERVER_NAME.with(|n| n.borrow_mut().take());
        }
        if complete {
            self.take_keys()?;
        }
        Ok(complete)
    }

    /// The handshake is complete: notes what `connect` is told of it, takes what rustls
    /// still has to send (TLS 1.3's tickets), and gives the keys to the record layer.
    fn take_keys(&mut self) -> Result<(), Failure> {
        let Stage::Handshake(mut conn) = std::mem::replace(&mut self.stage, Stage::Gone) else {
            return Err(Failure::Protocol);
        };
        self.version = match conn.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "unknown",
        };
        self.resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
        loop {
            match conn.process_tls_records(&mut []).state {
                Ok(ConnectionState::EncodeTlsData(mut message)) => {
                    encode_into(&mut self.out, &mut self.out_used, &mut message)?;
                }
                Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
                _ => break,
            }
        }
        self.stage = Stage::Records(RecordLayer::new(*conn).map_err(record_failure)?);
        Ok(())
    }

    /// After the handshake: a record cut by the end of the last receive is completed
    /// from `data` (its length is in its header) and opened alone, then the records in
    /// `data` are opened where they are; a record cut by the end of `data` waits in
    /// `incoming`.
    fn receive_records(
        &mut self,
        mut data: &mut [u8],
        deliver: &mut dyn FnMut(&mut [u8]),
    ) -> Result<(), Failure> {
        while !self.incoming.is_empty() && !self.peer_closed {
            let need = self.missing_from_cut_record()?;
            if need > 0 {
                let take = need.min(data.len());
                if take == 0 {
                    return Ok(());
                }
                self.incoming.extend_from_slice(&data[..take]);
                data = &mut data[take..];
                continue;
            }
            let mut buf = std::mem::take(&mut self.incoming);
            let used = self.open_records(&mut buf, deliver)?;
            buf.drain(..used);
            self.incoming = buf;
        }
        if self.peer_closed {
            self.incoming = Vec::new();
            return Ok(());
        }
        let used = self.open_records(data, deliver)?;
        if !self.peer_closed {
            self.incoming.extend_from_slice(&data[used..]);
        }
        Ok(())
    }

    /// How many bytes the record at the start of `incoming` lacks (of its header, then of
    /// its body).
    fn missing_from_cut_record(&self) -> Result<usize, Failure> {
        let Stage::Records(records) = &self.stage else {
            return Err(Failure::Protocol);
        };
        Ok(match records.record_len(&self.incoming) {
            None => record_layer::HEADER - self.incoming.len(),
            Some(len) => len
                .map_err(record_failure)?
                .saturating_sub(self.incoming.len()),
        })
    }

    /// Opens the whole records at the start of `buf` in place, moves the plaintext of
    /// each behind the first's (one `deliver` for them all, so that a message sealed
    /// over two records reaches the session in one piece), and returns how many bytes
    /// of `buf` it is done with.
    fn open_records(
        &mut self,
        buf: &mut [u8],
        deliver: &mut dyn FnMut(&mut [u8]),
    ) -> Result<usize, Failure> {
        let Stage::Records(records) = &mut self.stage else {
            return Err(Failure::Protocol);
        };
        let mut at = 0;
        let mut plain: Option<std::ops::Range<usize>> = None;
        while let Some(len) = records.record_len(&buf[at..]) {
            let len = len.map_err(record_failure)?;
            if buf.len() - at < len {
                break;
            }
            match records
                .open(&mut buf[at..at + len])
                .map_err(record_failure)?
            {
                Opened::Data(range) if !range.is_empty() => {
                    let range = at + range.start..at + range.end;
                    match &mut plain {
                        None => plain = Some(range),
                        Some(p) => {
                            buf.copy_within(range.clone(), p.end);
                            p.end += range.len();
                        }
                    }
                }
                Opened::Data(_) | Opened::Nothing => {}
                // Nothing goes after our close_notify.
                Opened::KeyUpdateRequested if self.close_notified => {}
                Opened::KeyUpdateRequested => {
                    let mut out = Sink {
                        buf: &mut self.out,
                        used: &mut self.out_used,
                    };
                    records
                        .answer_key_update(&mut out)
                        .map_err(record_failure)?;
                }
                Opened::Closed => {
                    self.peer_closed = true;
                    at = buf.len();
                    break;
                }
            }
            at += len;
        }
        if let Some(p) = plain {
            deliver(&mut buf[p]);
        }
        Ok(at)
    }

    /// Drives rustls' handshake over `buf` (the records not processed yet, first byte
    /// on): the plaintext of application-data records to `plain`, handshake messages to
    /// `out`. Returns how many bytes of `buf` it is done with, and whether the handshake
    /// is complete.
    fn process(&mut self, buf: &mut [u8], plain: &mut Vec<u8>) -> Result<(usize, bool), Failure> {
        let Stage::Handshake(conn) = &mut self.stage else {
            return Err(Failure::Protocol);
        };
        let mut start = 0;
        loop {
            let status = conn.process_tls_records(&mut buf[start..]);
            let mut discard = status.discard;
            let state = status.state.map_err(|err| {
                tracing::debug!(error = %err, "TLS connection failed");
                match err {
                    rustls::Error::AlertReceived(_) => Failure::RefusedByClient,
                    _ => Failure::Protocol,
                }
            })?;
            // Some(complete): stop here.
            let done = match state {
                ConnectionState::ReadTraffic(mut records) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(|_| Failure::Protocol)?;
                        discard += record.discard;
                        plain.extend_from_slice(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut message) => {
                    encode_into(&mut self.out, &mut self.out_used, &mut message)?;
                    None
                }
                // Sent at this turn's flush, after anything queued before it.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::WriteTraffic(_) => Some(true),
                // The client's close_notify, maybe right behind its Finished and its
                // request: nothing more is read, and the next state says whether the
                // handshake is complete (WriteTraffic: its request is answered).
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                // Need more bytes.
                _ => Some(false),
            };
            start += discard;
            if let Some(complete) = done {
                return Ok((start, complete));
            }
        }
    }

    /// Seals `plain` (the session's output, kept in `held` until the send completes)
    /// straight into records in the send buffer, with a `close_notify` once `closing`,
    /// and returns what is to be sent: records (handshake messages among them), or the
    /// 400 to a plain HTTP request. `Ok(None)` when there is nothing to send. An error
    /// when a record could not be sealed (a TLS 1.2 key worn out): the connection fails.
    pub(crate) fn seal(
        &mut self,
        plain: Option<Output>,
        closing: bool,
    ) -> Result<Option<Output>, Failure> {
        let plain_bytes = plain.as_ref().map_or(0, Output::len);
        if !self.failed
            && (plain_bytes > 0 || (closing && !self.close_notified))
            && let Err(err) = self.encrypt(plain.as_ref(), closing)
        {
            tracing::warn!(error = ?err, "TLS output not sealed: the connection fails");
            self.failed = true;
            return Err(Failure::Protocol);
        }
        if let Some(plain) = plain {
            self.held.push(plain);
        }
        if self.out_used == 0 {
            return Ok(None);
        }
        let mut buf = std::mem::take(&mut self.out);
        buf.truncate(std::mem::take(&mut self.out_used));
        Ok(Some(Output {
            first: buf,
            start: 0,
            rest: Vec::new(),
        }))
    }

    /// Seals `plain`'s bytes (and a `close_notify` once `closing`) at the end of `out`:
    /// records as full as the bytes allow, whatever the output's pieces. A record whose
    /// bytes lie together (all but those that span two pieces) is sealed from where
    /// they are straight into `out`.
    fn encrypt(&mut self, plain: Option<&Output>, closing: bool) -> Result<(), RecordError> {
        let Stage::Records(records) = &mut self.stage else {
            return Ok(());
        };
        let mut out = Sink {
            buf: &mut self.out,
            used: &mut self.out_used,
        };
        if let Some(p) = plain {
            let mut left = p.len();
            // Room for all of it at once: a record per piece and per 16 KiB at most,
            // and a KeyUpdate and a close_notify.
            let records_at_most = p.rest.len() + 1 + left.div_ceil(MAX_PLAINTEXT) + 2;
            out.reserve(left + records_at_most * RecordLayer::OVERHEAD);
            let mut pieces = std::iter::once(&p.first[p.start..])
                .chain(p.rest.iter().map(|c| c.bytes()))
                .filter(|b| !b.is_empty());
            let mut piece: &[u8] = &[];
            while left > 0 {
                if piece.is_empty() {
                    piece = pieces.next().expect("Output::len counts these bytes");
                }
                if piece.len() >= GATHER_BELOW {
                    // Records cut where the piece ends, so that none spans two pieces:
                    // a 16 KiB echo (its header, then 16,384 bytes) is two records,
                    // both sealed from where the bytes are.
                    let (now, later) = piece.split_at(piece.len().min(MAX_PLAINTEXT));
                    records.seal_data(Plain::Bytes(now), &mut out)?;
                    left -= now.len();
                    piece = later;
                    continue;
                }
                // Small pieces in a row share a record (gathered into it, then sealed
                // there), up to the next large piece.
                let mut len = piece.len();
                let mut ahead = pieces.clone();
                while len < MAX_PLAINTEXT {
                    match ahead.next() {
                        Some(b) if b.len() < GATHER_BELOW => len += b.len(),
                        _ => break,
                    }
                }
                let len = len.min(MAX_PLAINTEXT);
                let mut fill = |dst: &mut [u8]| {
                    let mut at = 0;
                    while at < dst.len() {
                        while piece.is_empty() {
                            piece = pieces.next().expect("Output::len counts these bytes");
                        }
                        let n = (dst.len() - at).min(piece.len());
                        dst[at..at + n].copy_from_slice(&piece[..n]);
                        piece = &piece[n..];
                        at += n;
                    }
                };
                records.seal_data(
                    Plain::Pieces {
                        len,
                        fill: &mut fill,
                    },
                    &mut out,
                )?;
                left -= len;
            }
        }
        if closing && !self.close_notified {
            self.close_notified = true;
            records.seal_close_notify(&mut out)?;
        }
        Ok(())
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
