//! permessage-deflate (RFC 7692): negotiation, and compression and decompression of
//! whole messages through zlib-rs (behind `flate2`).
//!
//! # Negotiation
//!
//! [`negotiate`] reads the client's `Sec-WebSocket-Extensions` offers in order and
//! accepts the first `permessage-deflate` offer it can honour; offers the RFC says to
//! decline (an unknown or repeated parameter, a missing or invalid value) are declined
//! and the next one is tried. With none acceptable the connection has no extension.
//! The answer combines the offer with the server's [`DeflateConfig`]:
//!
//! - `server_no_context_takeover` when the client asks for it or the server is
//!   configured so (the default);
//! - `client_no_context_takeover` when the client offers it or the server is configured
//!   to ask for it (the default; RFC 7692 section 7.1.1.2 lets the server ask);
//! - `server_max_window_bits=N`: the smaller of the client's limit and the server's;
//!   zlib cannot compress with an 8-bit window, so an offer that demands 8 is declined
//!   (and the configured minimum is 9);
//! - `client_max_window_bits=N`, only if the offer allows it (with or without a value),
//!   and only when it is below 15 or the client gave a value.
//!
//! # Memory
//!
//! Without context takeover (both defaults) a message is compressed or inflated on its
//! own, so one compressor per window size and one decompressor are kept per shard
//! thread ([`with_shared_deflater`], [`with_shared_inflater`]) and a connection holds no
//! zlib state at all, idle or not. With context takeover a connection owns its
//! compressor (zlib's deflate state: about 2^(w+2) bytes of window and chains plus
//! 128 KiB of hash and pending buffers at memory level 8, so 256 KiB at w = 15,
//! 129 KiB at w = 9) or decompressor (2^w bytes of window plus about 7 KiB) from its
//! first compressed message until it closes. Measured with both (zlib-rs, mimalloc):
//! about 470 KiB of resident memory per busy connection (README, "Compression").
//!
//! # Limits
//!
//! Inflated bytes count toward the message size limit: [`Inflater::inflate`] grows its
//! output at most to the limit plus one byte and stops there, so a small message that
//! inflates to gigabytes costs the server at most `max_message_bytes` before it is closed
//! with 1009.

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use super::codec::{OpCode, RSV1, encode_frame_into};
use super::error::ProtocolError;

/// The four bytes a sync flush ends with, which RFC 7692 strips from each message and
/// the receiver appends again before inflating.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// The smallest window zlib can compress with (RFC 7692 allows 8).
pub const MIN_WINDOW_BITS: u8 = 9;
/// The largest window (32 KiB), the default on both sides.
pub const MAX_WINDOW_BITS: u8 = 15;

/// The server's permessage-deflate settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateConfig {
    /// Negotiate permessage-deflate at all. Default true.
    pub enabled: bool,
    /// Compress every message on its own (no per-connection compressor). Default true.
    pub server_no_context_takeover: bool,
    /// Ask clients to compress every message on its own (no per-connection
    /// decompressor). Default true.
    pub client_no_context_takeover: bool,
    /// The largest window the server compresses with (9 to 15). Default 15.
    pub server_max_window_bits: u8,
    /// The largest window the server asks clients to compress with, where they allow
    /// it (9 to 15). Default 15.
    pub client_max_window_bits: u8,
    /// zlib compression level, 0 to 9. Default 1 (fastest; JSON-like text still
    /// shrinks several times).
    pub level: u8,
    /// Messages shorter than this are sent uncompressed (RSV1 clear), which the RFC
    /// allows per message: deflate cannot shrink a few bytes enough to pay for itself.
    /// Default 0 (compress everything): some clients mishandle an uncompressed message
    /// on a compressed connection (kosoku, the Autobahn runner, hands it to its case
    /// as a string and fails), so raising it is left to the operator.
    pub min_bytes: usize,
}

impl Default for DeflateConfig {
    fn default() -> Self {
        DeflateConfig {
            enabled: true,
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: MAX_WINDOW_BITS,
            client_max_window_bits: MAX_WINDOW_BITS,
            level: 1,
            min_bytes: 0,
        }
    }
}

impl DeflateConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        for (name, bits) in [
            ("server_max_window_bits", self.server_max_window_bits),
            ("client_max_window_bits", self.client_max_window_bits),
        ] {
            if !(MIN_WINDOW_BITS..=MAX_WINDOW_BITS).contains(&bits) {
                return Err(format!(
                    "{name} must be between {MIN_WINDOW_BITS} and {MAX_WINDOW_BITS}, not {bits}"
                ));
            }
        }
        if self.level > 9 {
            return Err(format!("level must be between 0 and 9, not {}", self.level));
        }
        Ok(())
    }
}

/// What was agreed for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Agreed {
    /// The server compresses every message on its own.
    pub server_no_context_takeover: bool,
    /// The client compresses every message on its own.
    pub client_no_context_takeover: bool,
    /// The server's window.
    pub server_max_window_bits: u8,
    /// The client's window (15 unless agreed lower).
    pub client_max_window_bits: u8,
    /// Whether the response names `server_max_window_bits` / `client_max_window_bits`.
    server_bits_in_response: bool,
    client_bits_in_response: bool,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` value of the response.
    pub fn response(&self) -> String {
        let mut s = String::from("permessage-deflate");
        if self.server_no_context_takeover {
            s.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            s.push_str("; client_no_context_takeover");
        }
        if self.server_bits_in_response {
            s.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_max_window_bits
            ));
        }
        if self.client_bits_in_response {
            s.push_str(&format!(
                "; client_max_window_bits={}",
                self.client_max_window_bits
            ));
        }
        s
    }

    /// The same agreement seen from the other side (for clients such as
    /// `kythera-load`): what binds the server binds the client's peer, so a
    /// [`ConnDeflate`] built from the mirror compresses with the client's parameters
    /// and inflates with the server's.
    pub fn mirrored(&self) -> Agreed {
        Agreed {
            server_no_context_takeover: self.client_no_context_takeover,
            client_no_context_takeover: self.server_no_context_takeover,
            server_max_window_bits: self.client_max_window_bits,
            client_max_window_bits: self.server_max_window_bits,
            server_bits_in_response: self.client_bits_in_response,
            client_bits_in_response: self.server_bits_in_response,
        }
    }

    /// The parameters as a client reads them from a server's response (for clients
    /// such as `kythera-load`): `None` if the response is not a valid
    /// permessage-deflate answer.
    pub fn from_response(value: &[u8]) -> Option<Agreed> {
        let offers = parse_offers(value)?;
        let [offer] = offers.as_slice() else {
            return None;
        };
        let o = parse_deflate_params(offer)?;
        let client_bits = match o.client_max_window_bits {
            Some(Some(bits)) => bits,
            Some(None) => return None, // a response must give a value
            None => MAX_WINDOW_BITS,
        };
        Some(Agreed {
            server_no_context_takeover: o.server_no_context_takeover,
            client_no_context_takeover: o.client_no_context_takeover,
            server_max_window_bits: o.server_max_window_bits.unwrap_or(MAX_WINDOW_BITS),
            client_max_window_bits: client_bits.max(MIN_WINDOW_BITS),
            server_bits_in_response: o.server_max_window_bits.is_some(),
            client_bits_in_response: o.client_max_window_bits.is_some(),
        })
    }
}

/// One extension offer: its name and its parameters (name, value without quotes).
struct Offer<'a> {
    name: &'a [u8],
    params: Vec<(&'a [u8], Option<Vec<u8>>)>,
}

/// Splits a header value into offers (`,`) and parameters (`;`), honouring quoted
/// values. `None` if it is malformed.
fn parse_offers(value: &[u8]) -> Option<Vec<Offer<'_>>> {
    let mut offers = Vec::new();
    for part in split_outside_quotes(value, b',') {
        let mut items = split_outside_quotes(part, b';').into_iter();
        let name = items.next()?.trim_ascii();
        if name.is_empty() {
            continue; // empty list elements are allowed (RFC 7230 section 7)
        }
        if !name.iter().all(|&b| is_tchar(b)) {
            return None;
        }
        let mut params = Vec::new();
        for item in items {
            let item = item.trim_ascii();
            let (key, value) = match item.iter().position(|&b| b == b'=') {
                Some(i) => (
                    item[..i].trim_ascii(),
                    Some(unquote(item[i + 1..].trim_ascii())?),
                ),
                None => (item, None),
            };
            if key.is_empty() || !key.iter().all(|&b| is_tchar(b)) {
                return None;
            }
            params.push((key, value));
        }
        offers.push(Offer { name, params });
    }
    Some(offers)
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn split_outside_quotes(s: &[u8], sep: u8) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, &b) in s.iter().enumerate() {
        if escaped {
            escaped = false;
        } else if quoted && b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            quoted = !quoted;
        } else if b == sep && !quoted {
            parts.push(&s[start..i]);
            start = i + 1;
        }
    }
    parts.push(&s[start..]);
    parts
}

/// A token or a quoted string's content.
fn unquote(v: &[u8]) -> Option<Vec<u8>> {
    if let Some(inner) = v.strip_prefix(b"\"") {
        let inner = inner.strip_suffix(b"\"")?;
        let mut out = Vec::with_capacity(inner.len());
        let mut escaped = false;
        for &b in inner {
            if escaped || b != b'\\' {
                out.push(b);
                escaped = false;
            } else {
                escaped = true;
            }
        }
        Some(out)
    } else if !v.is_empty() && v.iter().all(|&b| is_tchar(b)) {
        Some(v.to_vec())
    } else {
        None
    }
}

/// The parameters of a permessage-deflate offer or response, checked.
#[derive(Default)]
struct DeflateParams {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: the parameter without a value.
    client_max_window_bits: Option<Option<u8>>,
}

/// `None`: not permessage-deflate, or a parameter the RFC says to decline.
fn parse_deflate_params(offer: &Offer<'_>) -> Option<DeflateParams> {
    if !offer.name.eq_ignore_ascii_case(b"permessage-deflate") {
        return None;
    }
    let bits = |v: &Option<Vec<u8>>| -> Option<u8> {
        let v = v.as_deref()?;
        // 1*DIGIT without leading zeros, 8 to 15 (RFC 7692 section 7.1.2).
        if v.first() == Some(&b'0') {
            return None;
        }
        let n: u8 = std::str::from_utf8(v).ok()?.parse().ok()?;
        (8..=15).contains(&n).then_some(n)
    };
    let mut p = DeflateParams::default();
    let mut seen = [false; 4];
    for (key, value) in &offer.params {
        let slot = match key.to_ascii_lowercase().as_slice() {
            b"server_no_context_takeover" => 0,
            b"client_no_context_takeover" => 1,
            b"server_max_window_bits" => 2,
            b"client_max_window_bits" => 3,
            _ => return None,
        };
        if std::mem::replace(&mut seen[slot], true) {
            return None; // a parameter named twice
        }
        match slot {
            0 | 1 if value.is_some() => return None,
            0 => p.server_no_context_takeover = true,
            1 => p.client_no_context_takeover = true,
            2 => p.server_max_window_bits = Some(bits(value)?),
            _ => {
                p.client_max_window_bits = Some(match value {
                    None => None,
                    Some(_) => Some(bits(value)?),
                })
            }
        }
    }
    Some(p)
}

/// Picks the first acceptable permessage-deflate offer among the values of the
/// request's `Sec-WebSocket-Extensions` headers (see the module documentation).
pub fn negotiate<'a>(
    values: impl IntoIterator<Item = &'a [u8]>,
    cfg: &DeflateConfig,
) -> Option<Agreed> {
    if !cfg.enabled {
        return None;
    }
    for value in values {
        // A malformed header value declines all of its offers, not the others'.
        let Some(offers) = parse_offers(value) else {
            continue;
        };
        for offer in &offers {
            let Some(p) = parse_deflate_params(offer) else {
                continue;
            };
            let server_bits = p
                .server_max_window_bits
                .unwrap_or(MAX_WINDOW_BITS)
                .min(cfg.server_max_window_bits);
            if server_bits < MIN_WINDOW_BITS {
                continue; // zlib cannot honour an 8-bit window: decline
            }
            let (client_bits, client_in_response) = match p.client_max_window_bits {
                None => (MAX_WINDOW_BITS, false),
                Some(offered) => {
                    let bits = offered
                        .unwrap_or(MAX_WINDOW_BITS)
                        .min(cfg.client_max_window_bits);
                    (bits, offered.is_some() || bits < MAX_WINDOW_BITS)
                }
            };
            return Some(Agreed {
                server_no_context_takeover: p.server_no_context_takeover
                    || cfg.server_no_context_takeover,
                client_no_context_takeover: p.client_no_context_takeover
                    || cfg.client_no_context_takeover,
                server_max_window_bits: server_bits,
                client_max_window_bits: client_bits,
                server_bits_in_response: p.server_max_window_bits.is_some()
                    || server_bits < MAX_WINDOW_BITS,
                client_bits_in_response: client_in_response,
            });
        }
    }
    None
}

/// A compressor for one side of a connection (or shared, without context takeover).
pub struct Deflater {
    inner: Compress,
    bits: u8,
    level: u8,
}

impl std::fmt::Debug for Deflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflater")
            .field("bits", &self.bits)
            .field("level", &self.level)
            .finish_non_exhaustive()
    }
}

impl Deflater {
    /// A raw-deflate compressor with a `2^bits`-byte window (9 to 15) at `level`.
    pub fn new(level: u8, bits: u8) -> Deflater {
        let bits = bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
        Deflater {
            inner: Compress::new_with_window_bits(Compression::new(u32::from(level)), false, bits),
            bits,
            level,
        }
    }

    /// Appends `payload` compressed as one message (sync flush, the four-byte tail
    /// removed) to `out`. `reset`: forget the history afterwards (no context takeover).
    pub fn compress(&mut self, payload: &[u8], out: &mut Vec<u8>, reset: bool) {
        let start = out.len();
        let mut used = 0;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(payload.len() / 2 + 128);
            }
            let before = self.inner.total_in();
            // Compressing into a vector cannot fail: the stream is valid and the flush
            // mode is allowed; a failure would be a bug in the library.
            let status = self
                .inner
                .compress_vec(&payload[used..], out, FlushCompress::Sync)
                .unwrap_or(Status::StreamEnd);
            used += (self.inner.total_in() - before) as usize;
            // Done once all input is in and the flush left room in the output.
            if status == Status::StreamEnd || (used == payload.len() && out.len() < out.capacity())
            {
                break;
            }
        }
        if out[start..].ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        if out.len() == start {
            // An empty message still needs one (empty) block to inflate.
            out.push(0x00);
        }
        if reset {
            self.inner.reset();
        }
    }
}

/// A decompressor for one side of a connection (or shared, without context takeover).
pub struct Inflater {
    inner: Decompress,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater").finish_non_exhaustive()
    }
}

impl Default for Inflater {
    fn default() -> Self {
        Inflater::new(MAX_WINDOW_BITS)
    }
}

impl Inflater {
    /// A raw-inflate decompressor with a `2^bits`-byte window (a larger window than
    /// the sender's inflates its data as well).
    pub fn new(bits: u8) -> Inflater {
        Inflater {
            inner: Decompress::new_with_window_bits(
                false,
                bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS),
            ),
        }
    }

    /// Inflates one message (as received: without the tail) and appends it to `out`.
    /// `out` never grows past `limit + 1` bytes: a message that inflates to more than
    /// `limit` bytes is `MessageTooBig`; data that is not deflate is
    /// `BadCompressedData`. `reset`: forget the history afterwards (no context
    /// takeover); after an error the history is forgotten too (the connection closes).
    pub fn inflate(
        &mut self,
        compressed: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
        reset: bool,
    ) -> Result<(), ProtocolError> {
        let result = self.inflate_inner(compressed, out, limit);
        if reset || result.is_err() {
            self.inner.reset(false);
        }
        result
    }

    fn inflate_inner(
        &mut self,
        compressed: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), ProtocolError> {
        let max_len = limit.saturating_add(1);
        for input in [compressed, &TAIL[..]] {
            let mut used = 0;
            loop {
                if out.len() == out.capacity() {
                    if out.len() >= max_len {
                        return Err(ProtocolError::MessageTooBig);
                    }
                    let want = (compressed.len() * 4).clamp(4096, 1 << 20);
                    out.reserve_exact(want.min(max_len - out.len()));
                }
                let (before_in, before_out) = (self.inner.total_in(), out.len());
                let status = self
                    .inner
                    .decompress_vec(&input[used..], out, FlushDecompress::Sync)
                    .map_err(|_| ProtocolError::BadCompressedData)?;
                used += (self.inner.total_in() - before_in) as usize;
                if out.len() > limit {
                    return Err(ProtocolError::MessageTooBig);
                }
                if status == Status::StreamEnd {
                    // A final block: whatever follows it is not deflate data.
                    if used < input.len() && input != &TAIL[..] {
                        return Err(ProtocolError::BadCompressedData);
                    }
                    self.inner.reset(false);
                    return Ok(());
                }
                if used == input.len() && out.len() < out.capacity() {
                    break;
                }
                let progressed = self.inner.total_in() != before_in || out.len() != before_out;
                if !progressed {
                    // Input left, room left, and zlib took none of it: it wants more than
                    // the message has (a truncated stream cannot occur with the tail).
                    return Err(ProtocolError::BadCompressedData);
                }
            }
        }
        Ok(())
    }
}

/// One connection's permessage-deflate state: what was agreed, and the compressor or
/// decompressor it owns when context is taken over (created at its first use).
#[derive(Debug)]
pub struct ConnDeflate {
    agreed: Agreed,
    level: u8,
    min_bytes: usize,
    /// Boxed: zlib's stream structs are a few hundred bytes even before their buffers,
    /// and most connections never have them.
    deflater: Option<Box<Deflater>>,
    inflater: Option<Box<Inflater>>,
}

impl ConnDeflate {
    /// The state for a connection that agreed `agreed`, with the server's settings.
    pub fn new(agreed: Agreed, cfg: &DeflateConfig) -> ConnDeflate {
        ConnDeflate {
            agreed,
            level: cfg.level,
            min_bytes: cfg.min_bytes,
            deflater: None,
            inflater: None,
        }
    }

    /// What was agreed.
    pub fn agreed(&self) -> &Agreed {
        &self.agreed
    }

    /// Whether a message of `len` bytes is sent compressed.
    pub fn compresses(&self, len: usize) -> bool {
        len >= self.min_bytes
    }

    /// When every message is compressed afresh, the compressed form of a payload
    /// depends only on the window and the level: `Some((bits, level))` then, so that
    /// connections agreeing on them can share one compressed copy (`publish_frame`).
    pub fn shared_key(&self) -> Option<(u8, u8)> {
        self.agreed
            .server_no_context_takeover
            .then_some((self.agreed.server_max_window_bits, self.level))
    }

    /// Appends `payload` compressed to `out` (the payload of a frame with RSV1).
    pub fn compress(&mut self, payload: &[u8], out: &mut Vec<u8>) {
        let (level, bits) = (self.level, self.agreed.server_max_window_bits);
        if self.agreed.server_no_context_takeover {
            with_shared_deflater(level, bits, |d| d.compress(payload, out, true));
        } else {
            self.deflater
                .get_or_insert_with(|| Box::new(Deflater::new(level, bits)))
                .compress(payload, out, false);
        }
    }

    /// Appends a whole data frame for `payload`, compressed (RSV1 set), to `out`;
    /// masked with `mask` when a client sends it.
    pub fn encode_frame(
        &mut self,
        out: &mut Vec<u8>,
        opcode: OpCode,
        payload: &[u8],
        mask: Option<[u8; 4]>,
    ) {
        with_scratch(|compressed| {
            self.compress(payload, compressed);
            encode_frame_into(out, true, RSV1, opcode, compressed, mask);
        });
    }

    /// Inflates a received message into `out`, at most `limit` bytes.
    pub fn inflate(
        &mut self,
        compressed: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), ProtocolError> {
        if self.agreed.client_no_context_takeover {
            with_shared_inflater(|i| i.inflate(compressed, out, limit, true))
        } else {
            let bits = self.agreed.client_max_window_bits;
            self.inflater
                .get_or_insert_with(|| Box::new(Inflater::new(bits)))
                .inflate(compressed, out, limit, false)
        }
    }
}

/// Scratch buffers kept only above this capacity are dropped after use, so that one
/// large message does not pin its memory to the thread.
const SCRATCH_KEEP: usize = 1 << 20;

/// Runs `f` with an empty buffer of this thread's (inflated messages, compressed
/// frames), reused from call to call. Nested calls get distinct buffers.
pub fn with_scratch<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    let mut buf = SCRATCH
        .with(|cell| cell.borrow_mut().pop())
        .unwrap_or_default();
    let result = f(&mut buf);
    if buf.capacity() <= SCRATCH_KEEP {
        buf.clear();
        SCRATCH.with(|cell| {
            let mut all = cell.borrow_mut();
            if all.len() < 4 {
                all.push(buf);
            }
        });
    }
    result
}

thread_local! {
    /// Per thread (so per shard): compressors by window size, 9 to 15.
    static SHARED_DEFLATERS: RefCell<[Option<Deflater>; 7]> = const { RefCell::new([None, None, None, None, None, None, None]) };
    /// Per thread: one decompressor for messages without context takeover.
    static SHARED_INFLATER: RefCell<Option<Inflater>> = const { RefCell::new(None) };
    /// Per thread: spare buffers for [`with_scratch`].
    static SCRATCH: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's compressor for `bits` and `level`, which starts each
/// message afresh (the caller compresses with `reset: true`).
pub fn with_shared_deflater<R>(level: u8, bits: u8, f: impl FnOnce(&mut Deflater) -> R) -> R {
    let bits = bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS);
    SHARED_DEFLATERS.with(|cell| {
        let mut all = cell.borrow_mut();
        let slot = &mut all[usize::from(bits - MIN_WINDOW_BITS)];
        let deflater = match slot {
            Some(d) if d.level == level => d,
            _ => slot.insert(Deflater::new(level, bits)),
        };
        f(deflater)
    })
}

/// Runs `f` with this thread's decompressor, which starts each message afresh (the
/// caller inflates with `reset: true`).
pub fn with_shared_inflater<R>(f: impl FnOnce(&mut Inflater) -> R) -> R {
    SHARED_INFLATER.with(|cell| f(cell.borrow_mut().get_or_insert_with(Inflater::default)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agree(header: &str) -> Option<String> {
        negotiate([header.as_bytes()], &DeflateConfig::default()).map(|a| a.response())
    }

    fn agree_with(header: &str, cfg: DeflateConfig) -> Option<String> {
        negotiate([header.as_bytes()], &cfg).map(|a| a.response())
    }

    const BOTH: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn default_offer_gets_both_no_context_takeover() {
        assert_eq!(agree("permessage-deflate").as_deref(), Some(BOTH));
        assert_eq!(agree("PerMessage-Deflate").as_deref(), Some(BOTH));
    }

    #[test]
    fn takeover_when_configured() {
        let cfg = DeflateConfig {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            ..Default::default()
        };
        assert_eq!(
            agree_with("permessage-deflate", cfg).as_deref(),
            Some("permessage-deflate")
        );
        // The client's requests are honoured whatever the configuration.
        assert_eq!(
            agree_with("permessage-deflate; server_no_context_takeover", cfg).as_deref(),
            Some("permessage-deflate; server_no_context_takeover")
        );
    }

    #[test]
    fn window_bits() {
        assert_eq!(
            agree("permessage-deflate; server_max_window_bits=10").as_deref(),
            Some(&*format!("{BOTH}; server_max_window_bits=10"))
        );
        assert_eq!(
            agree("permessage-deflate; client_max_window_bits").as_deref(),
            Some(BOTH),
            "15 is the default: no need to name it"
        );
        assert_eq!(
            agree("permessage-deflate; client_max_window_bits=12").as_deref(),
            Some(&*format!("{BOTH}; client_max_window_bits=12"))
        );
        assert_eq!(
            agree(r#"permessage-deflate; client_max_window_bits="11""#).as_deref(),
            Some(&*format!("{BOTH}; client_max_window_bits=11")),
            "quoted values are allowed"
        );
        let small = DeflateConfig {
            server_max_window_bits: 11,
            client_max_window_bits: 10,
            ..Default::default()
        };
        assert_eq!(
            agree_with("permessage-deflate; client_max_window_bits", small).as_deref(),
            Some(&*format!(
                "{BOTH}; server_max_window_bits=11; client_max_window_bits=10"
            ))
        );
        assert_eq!(
            agree_with("permessage-deflate", small).as_deref(),
            Some(&*format!("{BOTH}; server_max_window_bits=11")),
            "a client that did not allow client_max_window_bits is not sent it"
        );
    }

    #[test]
    fn offers_to_decline() {
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=abc",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            "permessage-deflate; unknown_param",
            "permessage-deflate; server_max_window_bits=8",
            "x-webkit-deflate-frame",
            "permessage-deflate; =1",
            "permessage-deflate; a b",
        ] {
            assert_eq!(agree(bad), None, "{bad}");
        }
        let off = DeflateConfig {
            enabled: false,
            ..Default::default()
        };
        assert_eq!(agree_with("permessage-deflate", off), None);
    }

    #[test]
    fn first_acceptable_offer_wins() {
        assert_eq!(
            agree("permessage-deflate; foo, permessage-deflate; server_max_window_bits=12")
                .as_deref(),
            Some(&*format!("{BOTH}; server_max_window_bits=12"))
        );
        assert_eq!(agree("x-other, permessage-deflate").as_deref(), Some(BOTH));
        // Several header lines.
        let got = negotiate(
            [&b"permessage-deflate; bad"[..], b"permessage-deflate"],
            &DeflateConfig::default(),
        );
        assert_eq!(got.map(|a| a.response()).as_deref(), Some(BOTH));
    }

    #[test]
    fn response_parses_back() {
        let a = negotiate(
            [&b"permessage-deflate; client_max_window_bits; server_max_window_bits=10"[..]],
            &DeflateConfig::default(),
        )
        .unwrap();
        assert_eq!(Agreed::from_response(a.response().as_bytes()), Some(a));
        assert_eq!(
            Agreed::from_response(b"permessage-deflate; client_max_window_bits"),
            None
        );
    }

    fn roundtrip(payload: &[u8], deflater: &mut Deflater, inflater: &mut Inflater, reset: bool) {
        let mut wire = Vec::new();
        deflater.compress(payload, &mut wire, reset);
        assert!(!wire.ends_with(&TAIL) || payload.is_empty());
        let mut back = Vec::new();
        inflater.inflate(&wire, &mut back, 1 << 24, reset).unwrap();
        assert_eq!(back, payload);
    }

    #[test]
    fn compress_and_inflate_round_trip() {
        let text: Vec<u8> = (0..20_000u32)
            .flat_map(|i| format!("{{\"n\":{i},\"text\":\"hello\"}}").into_bytes())
            .collect();
        for bits in MIN_WINDOW_BITS..=MAX_WINDOW_BITS {
            for reset in [true, false] {
                let (mut d, mut i) = (Deflater::new(1, bits), Inflater::new(bits));
                for payload in [&b""[..], b"a", b"hello hello hello", &text, &text[..1000]] {
                    roundtrip(payload, &mut d, &mut i, reset);
                }
            }
        }
    }

    #[test]
    fn context_takeover_makes_repeats_small() {
        let msg = br#"{"from":"ann","text":"the same message again and again","to":null}"#;
        let mut d = Deflater::new(6, 15);
        let (mut first, mut second) = (Vec::new(), Vec::new());
        d.compress(msg, &mut first, false);
        d.compress(msg, &mut second, false);
        assert!(
            second.len() < first.len() / 3,
            "{} vs {}",
            second.len(),
            first.len()
        );
        let mut i = Inflater::new(15);
        let mut out = Vec::new();
        i.inflate(&first, &mut out, 1000, false).unwrap();
        out.clear();
        i.inflate(&second, &mut out, 1000, false).unwrap();
        assert_eq!(out, msg);
    }

    #[test]
    fn known_vectors_from_rfc_7692() {
        for (section, wire) in [
            (
                "7.2.3.1, compressed",
                &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00][..],
            ),
            (
                "7.2.3.3, a stored block",
                &[
                    0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
                ],
            ),
            (
                "7.2.3.4, a final block",
                &[0xf3, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
            ),
        ] {
            let mut out = Vec::new();
            Inflater::default()
                .inflate(wire, &mut out, 100, true)
                .unwrap_or_else(|e| panic!("{section}: {e}"));
            assert_eq!(out, b"Hello", "{section}");
        }
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        // 16 MiB of zeros compress to about 16 KiB.
        let zeros = vec![0u8; 16 << 20];
        let mut wire = Vec::new();
        Deflater::new(9, 15).compress(&zeros, &mut wire, true);
        assert!(wire.len() < 40_000, "{}", wire.len());
        let mut out = Vec::new();
        let err = Inflater::default().inflate(&wire, &mut out, 1_000_000, true);
        assert_eq!(err, Err(ProtocolError::MessageTooBig));
        assert!(out.capacity() <= 1_000_001, "grew to {}", out.capacity());
        // Exactly at the limit is fine.
        let mut out = Vec::new();
        let mut wire = Vec::new();
        Deflater::new(1, 15).compress(&zeros[..1000], &mut wire, true);
        Inflater::default()
            .inflate(&wire, &mut out, 1000, true)
            .unwrap();
        assert_eq!(out.len(), 1000);
    }

    #[test]
    fn garbage_is_refused_and_the_inflater_recovers() {
        let mut i = Inflater::default();
        let mut out = Vec::new();
        assert_eq!(
            i.inflate(&[0xff, 0xff, 0xff, 0xff, 0x13], &mut out, 1000, false),
            Err(ProtocolError::BadCompressedData)
        );
        out.clear();
        i.inflate(
            &[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00],
            &mut out,
            100,
            true,
        )
        .unwrap();
        assert_eq!(out, b"Hello");
    }

    #[test]
    fn a_connection_without_context_takeover_holds_little() {
        // What an idle compressed connection keeps (boxed in its session).
        assert!(
            std::mem::size_of::<ConnDeflate>() <= 48,
            "{}",
            std::mem::size_of::<ConnDeflate>()
        );
    }

    #[test]
    fn shared_instances_are_per_window_and_level() {
        let mut a = Vec::new();
        with_shared_deflater(1, 10, |d| d.compress(b"hello hello hello", &mut a, true));
        let mut b = Vec::new();
        with_shared_deflater(1, 10, |d| d.compress(b"hello hello hello", &mut b, true));
        assert_eq!(
            a, b,
            "reset between messages: the same input compresses the same"
        );
        let mut out = Vec::new();
        with_shared_inflater(|i| i.inflate(&a, &mut out, 100, true)).unwrap();
        assert_eq!(out, b"hello hello hello");
    }
}
