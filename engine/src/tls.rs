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
//! This first version uses rustls' buffered `ServerConnection`. Receiving, the
//! ciphertext is copied into rustls' record buffer, decrypted there, and the plaintext
//! copied out into the shard's scratch buffer, where the session unmasks frames in place
//! as it does in a receive buffer. Sending, each buffer of the session's output is
//! encrypted into rustls' queue of records and copied from there into the send buffer.
//! A plain connection copies none of these. rustls' unbuffered API would decrypt records
//! in place in the receive buffer and encrypt straight into the send buffer; moving to it
//! is the next step (issue 19's notes).
//!
//! # kTLS
//!
//! Handing the record layer to the kernel (`setsockopt(TCP_ULP, "tls")` after the
//! handshake, then plain sends and recvs) needs the kernel's `tls` module, which these
//! machines do not offer (`/proc/sys/net/ipv4/tcp_available_ulp` lists `mptcp` only).
//! The seam for it is `TlsConn`: after the handshake it would export the traffic
//! secrets (`dangerous_extract_secrets`) and step aside.
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
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use kythera_handler_api::TlsParts;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ProducesTickets, ServerSessionMemoryCache, StoresServerSessions};
use rustls::{HandshakeKind, ProtocolVersion, ServerConfig, ServerConnection};

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

/// A connection's TLS state, held by its shard beside the session.
pub(crate) struct TlsConn {
    conn: ServerConnection,
    /// The session's outputs whose bytes are sealed into the send in flight: they go
    /// back to the session ([`crate::session::Session::sent`]) when that send
    /// completes, so that its slow-consumer limit counts them until then.
    pub(crate) held: Vec<Output>,
    /// The last send buffer, for the next.
    spare: Vec<u8>,
    /// Bytes to send outside TLS (the 400 to a plain HTTP request).
    raw: Vec<u8>,
    /// The handshake completed.
    established: bool,
    /// The connection failed (counted once); nothing more is read from it.
    failed: bool,
    close_notified: bool,
    /// The first byte was looked at (a TLS record or not).
    saw_first: bool,
}

impl TlsConn {
    pub(crate) fn new(config: Arc<ServerConfig>) -> Result<TlsConn, rustls::Error> {
        let mut conn = ServerConnection::new(config)?;
        // The session's own slow-consumer limit bounds what is queued; rustls' would
        // only make writes partial.
        conn.set_buffer_limit(None);
        Ok(TlsConn {
            conn,
            held: Vec::new(),
            spare: Vec::new(),
            raw: Vec::new(),
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
    pub(crate) fn parts(&self) -> TlsParts {
        TlsParts {
            server_name: self.conn.server_name().map(str::to_owned),
            version: match self.conn.protocol_version() {
                Some(ProtocolVersion::TLSv1_3) => "TLSv1.3",
                Some(ProtocolVersion::TLSv1_2) => "TLSv1.2",
                _ => "unknown",
            },
            resumed: self.conn.handshake_kind() == Some(HandshakeKind::Resumed),
        }
    }

    /// Takes received ciphertext; appends the plaintext it held to `plain`. `Ok(true)`
    /// when this completed the handshake. After an error the connection is to be
    /// closed (what [`TlsConn::seal`] returns next is the alert, or the 400).
    pub(crate) fn receive(
        &mut self,
        mut data: &[u8],
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
                    self.raw.extend_from_slice(PLAIN_HTTP_ON_TLS_PORT);
                }
                return Err(Failure::NotTls);
            }
        }
        let was_handshaking = self.conn.is_handshaking();
        while !data.is_empty() {
            if let Err(err) = self.conn.read_tls(&mut data) {
                tracing::debug!(error = %err, "TLS read refused");
                self.failed = true;
                return Err(Failure::Protocol);
            }
            let state = match self.conn.process_new_packets() {
                Ok(state) => state,
                Err(err) => {
                    self.failed = true;
                    tracing::debug!(error = %err, "TLS connection failed");
                    return Err(match err {
                        rustls::Error::AlertReceived(_) => Failure::RefusedByClient,
                        _ => Failure::Protocol,
                    });
                }
            };
            let n = state.plaintext_bytes_to_read();
            if n > 0 {
                let at = plain.len();
                plain.resize(at + n, 0);
                // `n` bytes are ready: one read takes them all.
                let read = self.conn.reader().read(&mut plain[at..]).unwrap_or(0);
                plain.truncate(at + read);
            }
        }
        let done = was_handshaking && !self.conn.is_handshaking();
        if done {
            self.established = true;
        }
        Ok(done)
    }

    /// Seals `plain` (the session's output, kept in `held` until the send completes)
    /// into records, with a `close_notify` once `closing`, and returns what is to be
    /// sent: records (handshake messages and alerts among them), or the raw 400. `None`
    /// when there is nothing to send.
    pub(crate) fn seal(&mut self, plain: Option<Output>, closing: bool) -> Option<Output> {
        if let Some(plain) = plain {
            if !plain.is_empty() && !self.failed {
                let mut writer = self.conn.writer();
                // Without a buffer limit the writer takes everything.
                let _ = writer.write_all(&plain.first[plain.start..]);
                for chunk in &plain.rest {
                    let _ = writer.write_all(chunk.bytes());
                }
            }
            self.held.push(plain);
        }
        if closing && self.established && !self.close_notified && !self.failed {
            self.close_notified = true;
            self.conn.send_close_notify();
        }
        let mut buf = std::mem::take(&mut self.spare);
        buf.clear();
        buf.append(&mut self.raw);
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        if buf.is_empty() {
            self.spare = buf;
            return None;
        }
        Some(Output {
            first: buf,
            start: 0,
            rest: Vec::new(),
        })
    }

    /// A send of [`TlsConn::seal`]'s output completed: its buffer is kept for the next.
    pub(crate) fn recycle(&mut self, output: Output) {
        // The largest send buffer kept between sends, as for a plain connection.
        if output.first.capacity() <= 64 * 1024 {
            self.spare = output.first;
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
