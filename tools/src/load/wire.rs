//! What goes on the wire besides the io_uring plumbing: the target URL, the opening
//! handshake, message payloads and masks.

use std::net::{SocketAddr, ToSocketAddrs};

use base64::Engine as _;
use kythera_engine::protocol::deflate::Agreed;
use kythera_engine::protocol::handshake::accept_key;

/// A `ws://host:port/path` or `wss://host:port/path` target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The `Host` header value (`host:port` as written in the URL).
    pub host: String,
    /// The address connected to.
    pub addr: SocketAddr,
    /// Path and query, starting with `/`.
    pub path: String,
    /// `wss://`: the connection speaks TLS, for `server_name`.
    pub tls: bool,
    /// The host without its port (what a certificate must name).
    pub server_name: String,
}

impl Target {
    /// Parses `ws://HOST[:PORT][/PATH]` (port 80 by default) or `wss://...` (443) and
    /// resolves the host.
    pub fn parse(url: &str) -> Result<Target, String> {
        let (rest, tls) = if let Some(rest) = url.strip_prefix("ws://") {
            (rest, false)
        } else if let Some(rest) = url.strip_prefix("wss://") {
            (rest, true)
        } else {
            return Err(format!("{url:?}: the URL must start with ws:// or wss://"));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        // A bracketed IPv6 literal holds colons of its own.
        let has_port = match authority.rfind(']') {
            Some(close) => authority[close..].contains(':'),
            None => authority.contains(':'),
        };
        let with_port = if has_port {
            authority.to_string()
        } else {
            format!("{authority}:{}", if tls { 443 } else { 80 })
        };
        let server_name = match authority.rfind(']') {
            Some(close) => authority[1..close].to_string(),
            None if has_port => authority[..authority.rfind(':').unwrap_or(0)].to_string(),
            None => authority.to_string(),
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{url:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url:?}: the host has no address"))?;
        Ok(Target {
            host: authority.to_string(),
            addr,
            path: path.to_string(),
            tls,
            server_name,
        })
    }
}

/// xorshift64*: masks, keys and nothing that needs to be unpredictable to an attacker
/// (RFC 6455 wants masks unpredictable to stop cache poisoning through proxies, which a
/// load generator on a test network does not face).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (0 is replaced: xorshift would stay at 0).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A masking key.
    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }
}

/// A fresh `Sec-WebSocket-Key`: base64 of 16 random bytes.
pub fn new_key(rng: &mut Rng) -> String {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&rng.next_u64().to_ne_bytes());
    raw[8..].copy_from_slice(&rng.next_u64().to_ne_bytes());
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// The extension offer of `--deflate`: permessage-deflate, letting the server pick the
/// client's window (the offer browsers make).
pub const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// Appends the upgrade request for `path` to `out`, offering permessage-deflate when
/// `deflate`.
pub fn write_request(out: &mut Vec<u8>, host: &str, path: &str, key: &str, deflate: bool) {
    let ext = if deflate {
        format!("Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n")
    } else {
        String::new()
    };
    out.extend_from_slice(
        format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n\
             Sec-WebSocket-Version: 13\r\n{ext}\r\n"
        )
        .as_bytes(),
    );
}

/// The outcome of reading a handshake response from the bytes so far.
#[derive(Debug, PartialEq, Eq)]
pub enum Response {
    /// Not all of the head is there yet.
    Partial,
    /// A valid 101; the head took this many bytes (frames may follow), and the
    /// permessage-deflate parameters if the server agreed to it.
    Upgraded(usize, Option<Agreed>),
}

/// The largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// Checks a response head: status 101, `Upgrade: websocket`, `Connection: upgrade` and
/// the `Sec-WebSocket-Accept` that matches `key`.
pub fn parse_response(buf: &[u8], key: &str) -> Result<Response, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(format!("response head over {MAX_HEAD} bytes"));
        }
        Ok(httparse::Status::Partial) => return Ok(Response::Partial),
        Err(e) => return Err(format!("bad response: {e}")),
    };
    let code = resp.code.unwrap_or(0);
    if code != 101 {
        return Err(format!(
            "status {code} {} instead of 101",
            resp.reason.unwrap_or("")
        ));
    }
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    let upgrade = header("upgrade").unwrap_or_default();
    if !upgrade.trim().eq_ignore_ascii_case("websocket") {
        return Err(format!("Upgrade: {upgrade:?}"));
    }
    let connection = header("connection").unwrap_or_default();
    if !connection
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    {
        return Err(format!("Connection: {connection:?}"));
    }
    let accept = header("sec-websocket-accept").unwrap_or_default();
    if accept.trim() != accept_key(key) {
        return Err(format!("wrong Sec-WebSocket-Accept {accept:?}"));
    }
    let deflate = match header("sec-websocket-extensions") {
        None => None,
        Some(ext) => Some(
            Agreed::from_response(ext.as_bytes())
                .ok_or_else(|| format!("Sec-WebSocket-Extensions: {ext:?} was not offered"))?,
        ),
    };
    Ok(Response::Upgraded(head_len, deflate))
}

/// Letters `a` to `z` over and over: the letters of a payload from any position on are
/// a slice of it ([`payload`] copies them in slices rather than byte by byte, which cost
/// two thirds of the client's time at 512-byte messages and limited every server's
/// rate at 16 KiB).
const LETTERS: [u8; 26 * 160] = {
    let mut t = [0u8; 26 * 160];
    let mut i = 0;
    while i < t.len() {
        t[i] = b'a' + (i % 26) as u8;
        i += 1;
    }
    t
};

/// Writes the payload of message `seq` of connection `conn`, sent at `ts` (ns), into
/// `out` (cleared first), `len` bytes long.
///
/// The payload is ASCII (valid as text and as binary) and fully determined by its three
/// inputs, so an echo is checked by writing the expected payload again and comparing:
/// 16 hex digits of `seq` (least significant first, so that even a short payload
/// differs from its neighbours), 16 of `ts`, 8 of `conn`, then the alphabet over and
/// over from a letter that depends on all three (byte `i` is `a` plus `(i + salt) % 26`,
/// `salt` their sum modulo 26). Shorter payloads are a prefix of this.
pub fn payload(out: &mut Vec<u8>, conn: u32, seq: u64, ts: u64, len: usize) {
    out.clear();
    out.reserve(len);
    payload_pieces(conn, seq, ts, len, |piece| out.extend_from_slice(piece));
}

/// Whether `got` is the payload [`payload`] writes for these inputs, compared piece by
/// piece (nothing is written out: at 16 KiB writing the expected payload again cost
/// more than the comparison).
pub fn payload_matches(got: &[u8], conn: u32, seq: u64, ts: u64, len: usize) -> bool {
    if got.len() != len {
        return false;
    }
    let mut at = 0;
    let mut same = true;
    payload_pieces(conn, seq, ts, len, |piece| {
        same = same && got[at..at + piece.len()] == *piece;
        at += piece.len();
    });
    same
}

/// The payload of [`payload`] in order, as slices: its head, then runs of letters.
pub fn payload_pieces(conn: u32, seq: u64, ts: u64, len: usize, mut f: impl FnMut(&[u8])) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut head = [0u8; 40];
    for i in 0..16 {
        head[i] = HEX[((seq >> (4 * i)) & 0xf) as usize];
        head[16 + i] = HEX[((ts >> (4 * i)) & 0xf) as usize];
    }
    for i in 0..8 {
        head[32 + i] = HEX[((conn >> (4 * i)) & 0xf) as usize];
    }
    f(&head[..len.min(40)]);
    let salt = (seq.wrapping_add(u64::from(conn)).wrapping_add(ts) % 26) as usize;
    let mut i = 40;
    while i < len {
        let from = (i + salt) % 26;
        let n = (len - i).min(LETTERS.len() - from);
        f(&LETTERS[from..from + n]);
        i += n;
    }
}

/// The text of a broadcast publication: `{"text":"<seq> <ts>"}` with the text padded by
/// spaces to `pad` bytes (so that message size can be chosen).
pub fn publication(out: &mut Vec<u8>, seq: u64, ts: u64, pad: usize) {
    out.clear();
    let text = format!("{seq} {ts}");
    out.extend_from_slice(b"{\"text\":\"");
    out.extend_from_slice(text.as_bytes());
    out.extend(std::iter::repeat_n(b' ', pad.saturating_sub(text.len())));
    out.extend_from_slice(b"\"}");
}

/// A direct message of the chat gear to `d{to}`: the text is `"{seq} {ts}"` padded with
/// spaces to `pad` bytes, as a publication's.
pub fn direct(out: &mut Vec<u8>, to: u32, seq: u64, ts: u64, pad: usize) {
    out.clear();
    let text = format!("{seq} {ts}");
    out.extend_from_slice(format!("{{\"to\":\"d{to}\",\"text\":\"").as_bytes());
    out.extend_from_slice(text.as_bytes());
    out.extend(std::iter::repeat_n(b' ', pad.saturating_sub(text.len())));
    out.extend_from_slice(b"\"}");
}

/// The `(seq, ts)` in a publication's text as the chat room delivers it.
pub fn parse_publication(text: &str) -> Option<(u64, u64)> {
    let mut parts = text.split_ascii_whitespace();
    let seq = parts.next()?.parse().ok()?;
    let ts = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((seq, ts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = Target::parse("ws://127.0.0.1:8080/echo").unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(t.path, "/echo");
        assert_eq!(t.host, "127.0.0.1:8080");
        let t = Target::parse("ws://127.0.0.1").unwrap();
        assert_eq!(t.addr.port(), 80);
        assert_eq!(t.path, "/");
        let t = Target::parse("ws://[::1]:9/x?y=1").unwrap();
        assert_eq!(t.addr, "[::1]:9".parse().unwrap());
        assert_eq!(t.path, "/x?y=1");
        let t = Target::parse("wss://localhost:8443/echo").unwrap();
        assert!(t.tls);
        assert_eq!((t.server_name.as_str(), t.addr.port()), ("localhost", 8443));
        let t = Target::parse("wss://[::1]/x").unwrap();
        assert_eq!((t.server_name.as_str(), t.addr.port()), ("::1", 443));
        assert!(Target::parse("http://a/").is_err());
    }

    #[test]
    fn payloads_differ_and_have_the_size() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for len in [0, 1, 20, 40, 100] {
            payload(&mut a, 1, 5, 99, len);
            assert_eq!(a.len(), len);
            assert!(a.is_ascii());
        }
        payload(&mut a, 1, 5, 99, 20);
        payload(&mut b, 1, 6, 99, 20);
        assert_ne!(a, b);
        payload(&mut b, 1, 5, 99, 20);
        assert_eq!(a, b);
    }

    #[test]
    fn payload_letters_follow_their_definition_at_every_length() {
        let mut out = Vec::new();
        for (conn, seq, ts) in [(0, 0, 0), (7, u64::MAX, 3), (u32::MAX, 12, u64::MAX - 5)] {
            let salt = (seq.wrapping_add(u64::from(conn)).wrapping_add(ts) % 26) as usize;
            for len in [0, 39, 40, 41, 65, 512, 4160, 4200, 16_384, 100_000] {
                payload(&mut out, conn, seq, ts, len);
                assert_eq!(out.len(), len);
                for (i, &b) in out.iter().enumerate().skip(40) {
                    assert_eq!(b, b'a' + ((i + salt) % 26) as u8, "byte {i} of {len}");
                }
            }
        }
    }

    #[test]
    fn payloads_are_matched_piece_by_piece() {
        let mut want = Vec::new();
        for len in [0, 10, 40, 41, 5_000, 16_384] {
            payload(&mut want, 3, 9, 77, len);
            assert!(payload_matches(&want, 3, 9, 77, len));
            assert!(!payload_matches(&want, 3, 10, 77, len) || len == 0);
            if len > 0 {
                let mut bad = want.clone();
                bad[len - 1] ^= 1;
                assert!(!payload_matches(&bad, 3, 9, 77, len));
                assert!(!payload_matches(&want[..len - 1], 3, 9, 77, len));
            }
        }
    }

    #[test]
    fn accepts_only_the_right_101() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let good = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81";
        assert_eq!(
            parse_response(good, key),
            Ok(Response::Upgraded(good.len() - 1, None))
        );
        assert_eq!(parse_response(&good[..20], key), Ok(Response::Partial));
        let wrong = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Accept: AAAA\r\n\r\n";
        assert!(parse_response(wrong, key).is_err());
        assert!(parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n", key).is_err());
    }

    #[test]
    fn publications_round_trip() {
        let mut out = Vec::new();
        publication(&mut out, 7, 123, 30);
        let s = std::str::from_utf8(&out).unwrap();
        let text = s.strip_prefix("{\"text\":\"").unwrap().strip_suffix("\"}");
        assert_eq!(parse_publication(text.unwrap()), Some((7, 123)));
        assert_eq!(parse_publication("7"), None);
        assert_eq!(parse_publication("hello there"), None);
    }
}
