//! The TLS record layer of an established connection, kythera's own: rustls runs the
//! handshake, then gives up the traffic keys (`dangerous_into_kernel_connection`, the
//! API meant for kTLS) and keeps only the key schedule, for key updates. Records are
//! then opened in place where they arrived, so their plaintext reaches the session
//! from the receive buffer as a plain connection's bytes do, and sealed in place in
//! the send buffer, one copy from the session's output.
//!
//! This is what the kernel's `tls` module would do after `setsockopt(TCP_ULP, "tls")`
//! with the same secrets; these machines do not have it. The AEADs are aws-lc's, the
//! same rustls uses.
//!
//! What it does, per RFC 8446 (TLS 1.3) and RFC 5246 (TLS 1.2):
//! - application data, alerts (a `close_notify` ends what is read; a fatal alert fails
//!   the connection), and in TLS 1.3 the client's `KeyUpdate`, answered with one of ours
//!   when it asks (our keys are updated too);
//! - AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305, in both versions;
//! - the confidentiality limit of the suite: before it, TLS 1.3 updates its sending key
//!   (and says so with a `KeyUpdate`); TLS 1.2 cannot, and fails the connection.
//!
//! What it refuses (the connection fails, as rustls would fail it): records larger than
//! the version allows, a record that does not open (wrong key, altered), handshake
//! messages other than `KeyUpdate` (a TLS 1.2 renegotiation among them), a handshake
//! message split over two records (rustls would join them; no client splits a 5-byte
//! `KeyUpdate`), an empty TLS 1.3 record with no content type, and more than 32 records
//! in a row that carry no application data (key updates, empty records, warnings), as
//! rustls refuses them.
//!
//! Not handled: a `KeyUpdate` the client sends in the same flight as its `Finished` is
//! answered by rustls during the handshake, and that answer is lost in the hand-over
//! (rustls keeps it outside what `dangerous_into_kernel_connection` checks), so that
//! client cannot read what follows; no client is known to send one there. No alert is
//! sent when a connection fails after the handshake: it is closed.

use std::ops::Range;

use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, Aad, CHACHA20_POLY1305, LessSafeKey};
use aws_lc_rs::aead::{NONCE_LEN, Nonce, UnboundKey};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::{ConnectionTrafficSecrets, ProtocolVersion, SupportedCipherSuite};

/// A record's header: content type, legacy version, length.
pub(crate) const HEADER: usize = 5;
/// The largest plaintext of a record (both versions).
pub(crate) const MAX_PLAINTEXT: usize = 16 * 1024;
/// The AEAD tag of every suite here.
const TAG: usize = 16;
/// TLS 1.2 AES-GCM's explicit nonce, sent before the ciphertext.
const EXPLICIT_NONCE: usize = 8;
/// The largest record body a peer may send: TLS 1.3 allows 256 bytes over the
/// plaintext, TLS 1.2 2,048.
const MAX_BODY_13: usize = MAX_PLAINTEXT + 256;
const MAX_BODY_12: usize = MAX_PLAINTEXT + 2048;

/// Content types.
const CHANGE_CIPHER_SPEC: u8 = 20;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const APPLICATION_DATA: u8 = 23;

/// Handshake message type of a TLS 1.3 `KeyUpdate`, and its one-byte values.
const KEY_UPDATE: u8 = 24;
const UPDATE_NOT_REQUESTED: u8 = 0;
const UPDATE_REQUESTED: u8 = 1;

/// Alert descriptions read here.
const CLOSE_NOTIFY: u8 = 0;
const USER_CANCELED: u8 = 90;
/// Alert level of a warning (TLS 1.2 lets a peer go on after one).
const WARNING: u8 = 1;

/// Why a record was refused (the connection fails).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RecordError {
    /// The peer sent a fatal alert.
    Alert(u8),
    /// Anything else: a record that does not open, is too large, or is not allowed here.
    Protocol(&'static str),
}

/// What one record held.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Opened {
    /// Application data: where its plaintext lies in the record.
    Data(Range<usize>),
    /// Nothing for the session (a warning alert, a `KeyUpdate` that asked for no answer).
    Nothing,
    /// The peer's `KeyUpdate` asked for ours: it is to be sent (see
    /// [`RecordLayer::answer_key_update`]) before anything else is sealed.
    KeyUpdateRequested,
    /// The peer's `close_notify`: it sends nothing more.
    Closed,
}

/// One direction's key, its nonce base and the sequence number of its next record.
struct Keys {
    key: LessSafeKey,
    iv: [u8; NONCE_LEN],
    seq: u64,
}

impl Keys {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Keys, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => {
                return Err(RecordError::Protocol(
                    "a cipher suite with no record layer here",
                ));
            }
        };
        let key = UnboundKey::new(alg, key.as_ref())
            .map_err(|_| RecordError::Protocol("a traffic key of the wrong length"))?;
        let iv: [u8; NONCE_LEN] = iv
            .as_ref()
            .try_into()
            .map_err(|_| RecordError::Protocol("a traffic IV of the wrong length"))?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// The nonce of record `seq` (RFC 8446 5.3; RFC 7905 for ChaCha20 in TLS 1.2; and
    /// rustls' choice of explicit nonce for AES-GCM in TLS 1.2, which any unique value
    /// satisfies): the IV with the sequence number XORed into its last 8 bytes.
    fn nonce(&self) -> [u8; NONCE_LEN] {
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    fn is_gcm(&self) -> bool {
        self.key.algorithm() != &CHACHA20_POLY1305
    }
}

/// TLS 1.2's additional data: sequence number, content type, version, plaintext length.
fn tls12_aad(seq: u64, typ: u8, version: [u8; 2], len: usize) -> [u8; 13] {
    let mut aad = [0; 13];
    aad[..8].copy_from_slice(&seq.to_be_bytes());
    aad[8] = typ;
    aad[9..11].copy_from_slice(&version);
    aad[11..].copy_from_slice(&(len as u16).to_be_bytes());
    aad
}

/// The record layer of one established connection (see the module's text).
pub(crate) struct RecordLayer {
    /// rustls' key schedule, for TLS 1.3 key updates.
    kernel: KernelConnection<ServerConnectionData>,
    tls13: bool,
    rx: Keys,
    tx: Keys,
    /// Records sealed under one key before it must change.
    tx_limit: u64,
    /// Our `KeyUpdate` is sealed and no application data since: further requests are
    /// answered by it (RFC 8446 4.6.3: one update for many requests while silent).
    answered: bool,
    /// Records with no application data in them (key updates, empty records, warning
    /// alerts) since the last that had some: a peer that sends only those is refused
    /// after [`IDLE_RECORDS_MAX`], as rustls refuses it, before it costs a key update
    /// each for ever.
    idle_records: u8,
}

/// See [`RecordLayer::idle_records`].
const IDLE_RECORDS_MAX: u8 = 32;

impl RecordLayer {
    /// Takes over from rustls once its handshake is complete and everything it had to
    /// send was taken (`WriteTraffic`).
    pub(crate) fn new(conn: UnbufferedServerConnection) -> Result<RecordLayer, RecordError> {
        let (secrets, kernel) = conn.dangerous_into_kernel_connection().map_err(|err| {
            tracing::warn!(error = %err, "TLS keys not handed over");
            RecordError::Protocol("keys not handed over")
        })?;
        let tls13 = kernel.protocol_version() == ProtocolVersion::TLSv1_3;
        let tx_limit = match kernel.negotiated_cipher_suite() {
            SupportedCipherSuite::Tls13(s) => s.common.confidentiality_limit,
            SupportedCipherSuite::Tls12(s) => s.common.confidentiality_limit,
        };
        Ok(RecordLayer {
            kernel,
            tls13,
            rx: Keys::new(secrets.rx.0, secrets.rx.1)?,
            tx: Keys::new(secrets.tx.0, secrets.tx.1)?,
            tx_limit,
            answered: false,
            idle_records: 0,
        })
    }

    /// The whole record's length (header and body) if `buf` starts with a record header
    /// (5 bytes or more); an error for a length no peer may send.
    pub(crate) fn record_len(&self, buf: &[u8]) -> Option<Result<usize, RecordError>> {
        let header = buf.get(..HEADER)?;
        let body = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let max = if self.tls13 { MAX_BODY_13 } else { MAX_BODY_12 };
        Some(if body > max {
            Err(RecordError::Protocol("a record over the size limit"))
        } else {
            Ok(HEADER + body)
        })
    }

    /// Opens one whole record (header and body) in place.
    pub(crate) fn open(&mut self, record: &mut [u8]) -> Result<Opened, RecordError> {
        let (header, body) = record.split_at_mut(HEADER);
        let outer = header[0];
        let (typ, content) = if self.tls13 {
            if outer != APPLICATION_DATA {
                // Not even the middlebox-compatibility ChangeCipherSpec is allowed once
                // the handshake is over (RFC 8446 5).
                return Err(RecordError::Protocol(
                    "a plaintext record after the handshake",
                ));
            }
            if body.len() < TAG + 1 {
                return Err(RecordError::Protocol("a record shorter than its tag"));
            }
            let nonce = Nonce::assume_unique_for_key(self.rx.nonce());
            let aad: [u8; HEADER] = header.try_into().expect("5 bytes");
            let plain = self
                .rx
                .key
                .open_in_place(nonce, Aad::from(aad), body)
                .map_err(|_| RecordError::Protocol("a record that does not open"))?;
            self.rx.seq += 1;
            // The inner plaintext (data, content type, padding) has the same limit as
            // the data plus its type byte (RFC 8446 5.4).
            if plain.len() > MAX_PLAINTEXT + 1 {
                return Err(RecordError::Protocol("a record over the size limit"));
            }
            // The content type is the last byte that is not padding.
            let Some(end) = plain.iter().rposition(|&b| b != 0) else {
                return Err(RecordError::Protocol("a record with no content type"));
            };
            if end > MAX_PLAINTEXT {
                return Err(RecordError::Protocol("a record over the size limit"));
            }
            (plain[end], HEADER..HEADER + end)
        } else {
            let version = [header[1], header[2]];
            let (nonce, at) = if self.rx.is_gcm() {
                if body.len() < EXPLICIT_NONCE + TAG {
                    return Err(RecordError::Protocol("a record shorter than its tag"));
                }
                let mut nonce = self.rx.iv;
                nonce[4..].copy_from_slice(&body[..EXPLICIT_NONCE]);
                (nonce, EXPLICIT_NONCE)
            } else {
                if body.len() < TAG {
                    return Err(RecordError::Protocol("a record shorter than its tag"));
                }
                (self.rx.nonce(), 0)
            };
            let len = body.len() - at - TAG;
            if len > MAX_PLAINTEXT {
                return Err(RecordError::Protocol("a record over the size limit"));
            }
            let aad = tls12_aad(self.rx.seq, outer, version, len);
            self.rx
                .key
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    &mut body[at..],
                )
                .map_err(|_| RecordError::Protocol("a record that does not open"))?;
            self.rx.seq += 1;
            (outer, HEADER + at..HEADER + at + len)
        };
        if typ == APPLICATION_DATA && !content.is_empty() {
            self.idle_records = 0;
            return Ok(Opened::Data(content));
        }
        self.idle_records += 1;
        if self.idle_records > IDLE_RECORDS_MAX {
            return Err(RecordError::Protocol("too many records without data"));
        }
        match typ {
            APPLICATION_DATA => Ok(Opened::Nothing),
            ALERT => match record[content] {
                [_, CLOSE_NOTIFY] => Ok(Opened::Closed),
                [_, USER_CANCELED] if self.tls13 => Ok(Opened::Nothing),
                [WARNING, _] if !self.tls13 => Ok(Opened::Nothing),
                [_, description] => Err(RecordError::Alert(description)),
                _ => Err(RecordError::Protocol("a malformed alert")),
            },
            HANDSHAKE if self.tls13 => self.handshake(&record[content]),
            HANDSHAKE => Err(RecordError::Protocol("a renegotiation")),
            CHANGE_CIPHER_SPEC => Err(RecordError::Protocol(
                "a ChangeCipherSpec after the handshake",
            )),
            _ => Err(RecordError::Protocol("an unknown content type")),
        }
    }

    /// TLS 1.3 handshake messages after the handshake: only the client's `KeyUpdate`,
    /// last in its record (RFC 8446 5.1).
    fn handshake(&mut self, messages: &[u8]) -> Result<Opened, RecordError> {
        match messages {
            [
                KEY_UPDATE,
                0,
                0,
                1,
                request @ (UPDATE_NOT_REQUESTED | UPDATE_REQUESTED),
            ] => {
                let (seq, secrets) = self.kernel.update_rx_secret().map_err(|err| {
                    tracing::warn!(error = %err, "TLS receive key not updated");
                    RecordError::Protocol("a key update that failed")
                })?;
                self.rx = Keys::new(seq, secrets)?;
                Ok(if *request == UPDATE_REQUESTED && !self.answered {
                    Opened::KeyUpdateRequested
                } else {
                    Opened::Nothing
                })
            }
            [KEY_UPDATE, ..] => Err(RecordError::Protocol("a malformed KeyUpdate")),
            _ => Err(RecordError::Protocol(
                "a handshake message after the handshake",
            )),
        }
    }

    /// Sends our `KeyUpdate` (under the old key) and changes to the new sending key: the
    /// answer to [`Opened::KeyUpdateRequested`], and what the confidentiality limit
    /// calls for.
    pub(crate) fn answer_key_update(&mut self, out: &mut Sink<'_>) -> Result<(), RecordError> {
        let message = [KEY_UPDATE, 0, 0, 1, UPDATE_NOT_REQUESTED];
        self.seal_one(HANDSHAKE, Plain::Bytes(&message), out)?;
        let (seq, secrets) = self.kernel.update_tx_secret().map_err(|err| {
            tracing::warn!(error = %err, "TLS send key not updated");
            RecordError::Protocol("a key update that failed")
        })?;
        self.tx = Keys::new(seq, secrets)?;
        self.answered = true;
        Ok(())
    }

    /// Seals application data (at most [`MAX_PLAINTEXT`] bytes) as one record at
    /// `out`'s end.
    pub(crate) fn seal_data(
        &mut self,
        plain: Plain<'_>,
        out: &mut Sink<'_>,
    ) -> Result<(), RecordError> {
        // TLS 1.2 cannot change its key: at the limit, the connection fails (a
        // close_notify may still go, under the last record number).
        if !self.tls13 && self.tx.seq + 1 >= self.tx_limit {
            return Err(RecordError::Protocol("the sending key is worn out"));
        }
        self.seal_one(APPLICATION_DATA, plain, out)?;
        self.answered = false;
        // TLS 1.3: one record under the key is left for the KeyUpdate that changes it.
        if self.tls13 && self.tx.seq + 1 >= self.tx_limit {
            self.answer_key_update(out)?;
        }
        Ok(())
    }

    /// Seals a `close_notify` alert at `out`'s end.
    pub(crate) fn seal_close_notify(&mut self, out: &mut Sink<'_>) -> Result<(), RecordError> {
        self.seal_one(ALERT, Plain::Bytes(&[WARNING, CLOSE_NOTIFY]), out)
    }

    /// The most a record adds to its plaintext (TLS 1.2 AES-GCM's header, explicit
    /// nonce and tag; TLS 1.3's header, content type and tag are 22 bytes).
    pub(crate) const OVERHEAD: usize = HEADER + EXPLICIT_NONCE + TAG;

    fn seal_one(
        &mut self,
        typ: u8,
        plain: Plain<'_>,
        out: &mut Sink<'_>,
    ) -> Result<(), RecordError> {
        let len = plain.len();
        if len > MAX_PLAINTEXT {
            return Err(RecordError::Protocol("a record over the size limit"));
        }
        let explicit = if !self.tls13 && self.tx.is_gcm() {
            EXPLICIT_NONCE
        } else {
            0
        };
        // TLS 1.3 hides the content type inside the record, after the data.
        let inner_type = [typ];
        let extra_in: &[u8] = if self.tls13 { &inner_type } else { &[] };
        let total = HEADER + explicit + len + extra_in.len() + TAG;
        let nonce = self.tx.nonce();
        let record = out.room(total);
        let outer = if self.tls13 { APPLICATION_DATA } else { typ };
        let body = ((total - HEADER) as u16).to_be_bytes();
        record[..HEADER].copy_from_slice(&[outer, 3, 3, body[0], body[1]]);
        record[HEADER..HEADER + explicit].copy_from_slice(&nonce[NONCE_LEN - explicit..]);
        let aad = if self.tls13 {
            let mut aad = [0; 13];
            aad[..HEADER].copy_from_slice(&record[..HEADER]);
            (aad, HEADER)
        } else {
            (tls12_aad(self.tx.seq, typ, [3, 3], len), 13)
        };
        let aad = Aad::from(&aad.0[..aad.1]);
        let (data, extra_out_and_tag) = record[HEADER + explicit..].split_at_mut(len);
        let nonce = Nonce::assume_unique_for_key(nonce);
        let key = &self.tx.key;
        match plain {
            // From where the bytes are straight into the record: no copy of them first.
            Plain::Bytes(bytes) => {
                key.seal_out_of_place_scatter(nonce, aad, bytes, data, extra_in, extra_out_and_tag)
            }
            Plain::Pieces { fill, .. } => {
                fill(data);
                key.seal_in_place_scatter(nonce, aad, data, extra_in, extra_out_and_tag)
            }
        }
        .map_err(|_| RecordError::Protocol("a record that did not seal"))?;
        out.advance(total);
        self.tx.seq += 1;
        Ok(())
    }
}

/// The plaintext of a record to seal.
pub(crate) enum Plain<'a> {
    /// Bytes that lie together.
    Bytes(&'a [u8]),
    /// `len` bytes that `fill` writes into the slice it is given (of that length): bytes
    /// from several places.
    Pieces {
        len: usize,
        fill: &'a mut dyn FnMut(&mut [u8]),
    },
}

impl Plain<'_> {
    fn len(&self) -> usize {
        match self {
            Plain::Bytes(b) => b.len(),
            Plain::Pieces { len, .. } => *len,
        }
    }
}

/// Where records are written: `buf[*used..]`, whose bytes past `used` (a previous
/// send's) are room to write into without zeroing it first.
pub(crate) struct Sink<'a> {
    pub(crate) buf: &'a mut Vec<u8>,
    pub(crate) used: &'a mut usize,
}

impl Sink<'_> {
    /// `n` bytes to write at the end, grown (zeroed) only where the buffer is shorter.
    fn room(&mut self, n: usize) -> &mut [u8] {
        self.reserve(n);
        &mut self.buf[*self.used..*self.used + n]
    }

    /// At least `n` bytes of room after `used` from now on.
    pub(crate) fn reserve(&mut self, n: usize) {
        let end = *self.used + n;
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
    }

    fn advance(&mut self, n: usize) {
        *self.used += n;
    }
}
