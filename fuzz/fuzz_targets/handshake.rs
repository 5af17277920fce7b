//! The HTTP/1.1 upgrade: `parse_request` (8 KiB head limit) and `validate_upgrade`.
//!
//! The first input byte picks the mode:
//! - even: the rest is raw bytes, checked against invariants that hold for any input
//!   (prefix consistency, head length bounds, what an accepted upgrade must look like,
//!   and that every rejection writes a well-formed response);
//! - odd: the rest drives a generator of valid upgrade requests, one field of which is
//!   then broken in a chosen way, and the exact rejection that must come out is checked.

#![no_main]

use std::sync::Once;

use arbitrary::{Arbitrary, Unstructured};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use kythera_engine::protocol::handshake::{
    MAX_HEADERS, Rejection, accept_key, parse_request, reason_phrase, validate_upgrade,
};
use libfuzzer_sys::fuzz_target;
use sha1::{Digest, Sha1};

const MAX_HEAD: usize = 8192;

fuzz_target!(|data: &[u8]| {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Rejections that parsing never produces (the router and the connection limit
        // do): check their responses once.
        for r in [
            Rejection::NotFound,
            Rejection::TooManyConnections,
            Rejection::MethodNotAllowed,
            Rejection::UpgradeRequired,
            Rejection::HeadersTooLarge,
            Rejection::BadRequest("x"),
        ] {
            check_rejection_response(r);
        }
    });
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        raw(rest);
    } else if let Ok(spec) = Spec::arbitrary_take_rest(Unstructured::new(rest)) {
        structured(spec);
    }
});

// ---------------------------------------------------------------------------------
// Raw bytes.

/// Everything `parse_request` + `validate_upgrade` said about a buffer, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Partial,
    Rejected(Rejection),
    Complete {
        head_len: usize,
        method: String,
        path: String,
        query: String,
        version: u8,
        headers: Vec<(String, Vec<u8>)>,
        upgrade: Result<String, Rejection>,
    },
}

fn outcome(buf: &[u8]) -> Outcome {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match parse_request(buf, &mut headers, MAX_HEAD) {
        Ok(None) => Outcome::Partial,
        Err(r) => Outcome::Rejected(r),
        Ok(Some(req)) => Outcome::Complete {
            head_len: req.head_len,
            method: req.method.to_owned(),
            path: req.path.to_owned(),
            query: req.query.to_owned(),
            version: req.version,
            headers: req
                .headers
                .iter()
                .map(|h| (h.name.to_owned(), h.value.to_vec()))
                .collect(),
            upgrade: validate_upgrade(&req).map(|u| u.key.to_owned()),
        },
    }
}

fn raw(buf: &[u8]) {
    let full = outcome(buf);
    check_outcome(buf, &full);

    // Prefixes: as bytes arrive, the answer goes Partial* and then either Complete
    // (from the head's end on, always the same request) or a rejection (from then on
    // always a rejection; a 400 from httparse stays that same 400). A 431 may turn
    // into a 400 on a longer prefix (the head is still too long, but httparse now also
    // sees a malformed byte), never into a request.
    let cuts: Vec<usize> = if buf.len() <= 256 {
        (0..=buf.len()).collect()
    } else {
        let mut c: Vec<usize> = (0..=64).map(|i| i * buf.len() / 64).collect();
        if let Outcome::Complete { head_len, .. } = full {
            c.extend([head_len.saturating_sub(2), head_len - 1, head_len, head_len + 1]);
        }
        c.extend(buf.len().saturating_sub(4)..=buf.len());
        c.retain(|&n| n <= buf.len());
        c.sort_unstable();
        c.dedup();
        c
    };
    let mut prev = Outcome::Partial;
    let mut prev_cut = 0;
    for n in cuts {
        let now = if n == buf.len() {
            full.clone()
        } else {
            outcome(&buf[..n])
        };
        if n < buf.len() {
            check_outcome(&buf[..n], &now);
        }
        match (&prev, &now) {
            (Outcome::Partial, _) => {}
            (Outcome::Complete { .. }, _) => assert_eq!(prev, now, "request changed at cut {n}"),
            (Outcome::Rejected(Rejection::BadRequest(_)), _) => {
                assert_eq!(prev, now, "400 at {prev_cut} but {now:?} at {n}")
            }
            (Outcome::Rejected(_), Outcome::Rejected(_)) => {}
            (Outcome::Rejected(_), _) => panic!("{prev:?} at {prev_cut} but {now:?} at {n}"),
        }
        if let (Outcome::Complete { head_len, .. }, false) =
            (&now, matches!(prev, Outcome::Complete { .. }))
        {
            // The head is complete exactly from its own length on: one byte less is
            // still partial, its own length is the same request.
            let head_len = *head_len;
            assert!(n >= head_len);
            assert_eq!(outcome(&buf[..head_len - 1]), Outcome::Partial);
            assert_eq!(outcome(&buf[..head_len]), now);
        }
        prev = now;
        prev_cut = n;
    }
}

fn check_outcome(buf: &[u8], o: &Outcome) {
    match o {
        Outcome::Partial => assert!(buf.len() < MAX_HEAD, "partial at {} bytes", buf.len()),
        Outcome::Rejected(r) => check_rejection_response(*r),
        Outcome::Complete {
            head_len,
            method,
            path,
            query,
            version,
            headers,
            upgrade,
        } => {
            let head_len = *head_len;
            assert!(head_len <= buf.len() && head_len <= MAX_HEAD, "head_len {head_len}");
            assert_eq!(buf[head_len - 1], b'\n');
            assert!(headers.len() <= MAX_HEADERS);
            assert!(!path.contains('?'));
            // The request target, as sent, is path[?query].
            let target = if query.is_empty() {
                None
            } else {
                Some(format!("{path}?{query}"))
            };
            if let Some(t) = target {
                assert!(find(&buf[..head_len], t.as_bytes()));
            }
            match upgrade {
                Ok(key) => {
                    assert_eq!(method, "GET");
                    assert_eq!(*version, 1);
                    let decoded = BASE64.decode(key.as_bytes()).expect("key is base64");
                    assert_eq!(decoded.len(), 16);
                    let get = |name: &str| -> Vec<&[u8]> {
                        headers
                            .iter()
                            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                            .map(|(_, v)| v.as_slice())
                            .collect()
                    };
                    assert_eq!(get("sec-websocket-key").len(), 1);
                    assert_eq!(get("sec-websocket-key")[0].trim_ascii(), key.as_bytes());
                    let versions = get("sec-websocket-version");
                    assert_eq!(versions.len(), 1);
                    assert_eq!(versions[0].trim_ascii(), b"13");
                    assert!(!get("host").is_empty());
                    assert!(get("transfer-encoding").is_empty());
                    assert_eq!(accept_key(key), reference_accept(key));
                }
                Err(r) => {
                    assert_ne!(r.status(), 431, "431 after a complete parse");
                    check_rejection_response(*r);
                }
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn reference_accept(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let out = BASE64.encode(h.finalize());
    assert_eq!(out.len(), 28);
    out
}

/// The status is one the handshake uses, and the response parses back (httparse) with
/// that status, its reason, `Connection: close` and a `Content-Length` equal to the body.
fn check_rejection_response(r: Rejection) {
    let status = r.status();
    assert!(
        [400, 404, 405, 426, 431, 503].contains(&status),
        "status {status}"
    );
    let mut out = Vec::new();
    r.write_response(&mut out);
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(&out) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("{other:?}: {}", String::from_utf8_lossy(&out)),
    };
    assert_eq!(resp.code, Some(status));
    assert_eq!(resp.version, Some(1));
    assert_eq!(resp.reason, Some(reason_phrase(status)));
    let body = &out[n..];
    assert_eq!(body, r.body().as_bytes());
    let lens: Vec<&[u8]> = resp
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| h.value)
        .collect();
    assert_eq!(lens, [body.len().to_string().as_bytes()]);
    assert!(
        resp.headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("connection") && h.value == b"close")
    );
    let has = |name: &str, value: &[u8]| {
        resp.headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case(name) && h.value == value)
    };
    match r {
        Rejection::UpgradeRequired => {
            assert!(has("sec-websocket-version", b"13") && has("upgrade", b"websocket"))
        }
        Rejection::MethodNotAllowed => assert!(has("allow", b"GET")),
        _ => {}
    }
}

// ---------------------------------------------------------------------------------
// Structured: a valid upgrade, then one field broken.

/// Characters a generated path, host or header value is made of (all legal there).
const PATH_CHARS: &[u8] = b"abcxyzABCXYZ0189-._~%!$&'()*+,;=:@/";
const VALUE_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCW0123456789 \t-_.,;:/=+!?()<>\"'";
const TOKEN_CHARS: &[u8] = b"websocktupgradWEBSOCKTUPGRAD2h-";

fn pick(chars: &[u8], raw: &[u8], max: usize) -> String {
    raw.iter()
        .take(max)
        .map(|&b| chars[b as usize % chars.len()] as char)
        .collect()
}

#[derive(Arbitrary, Debug)]
struct Spec {
    path: Vec<u8>,
    query: Option<Vec<u8>>,
    host: Vec<u8>,
    key: [u8; 16],
    /// One bit per header: send its name in another case.
    name_case: u64,
    /// Extra tokens around `websocket` / `Upgrade` in the Upgrade and Connection headers.
    upgrade_extra: Vec<Vec<u8>>,
    connection_extra: Vec<Vec<u8>>,
    /// Put `Connection: Upgrade` in a header of its own, after a `Connection: keep-alive`.
    split_connection: bool,
    /// Spaces and tabs around values (trimmed by httparse and by the checks).
    padding: u8,
    extra: Vec<(Vec<u8>, Vec<u8>)>,
    shuffle: u64,
    /// Bytes after the head: the client's first frames.
    trailing: Vec<u8>,
    mutation: Mutation,
}

#[derive(Arbitrary, Debug)]
enum Mutation {
    None,
    Http10,
    Method(Vec<u8>),
    DropUpgrade,
    UpgradeTokens(Vec<Vec<u8>>),
    DropConnection,
    ConnectionTokens(Vec<Vec<u8>>),
    DropHost,
    /// Extra `Content-Length` headers with these values.
    ContentLength(Vec<Vec<u8>>),
    TransferEncoding(Vec<u8>),
    Version(Vec<u8>),
    DropVersion,
    DuplicateVersion(Vec<u8>),
    DropKey,
    DuplicateKey([u8; 16]),
    /// A key of some other number of bytes.
    KeyLength(Vec<u8>),
    /// The 16-byte key without its `==` padding.
    KeyUnpadded,
    /// One character of the key replaced by this byte.
    KeyByte(u8, u8),
    /// Filler headers so that there are this many headers in all.
    HeaderCount(u8),
    /// A filler header so that the head is 8192 + this many bytes (negative: fewer).
    HeadLength(i16),
}

struct Builder {
    method: String,
    target: String,
    version: &'static str,
    headers: Vec<(String, String)>,
}

impl Builder {
    fn render(&self, case: u64, padding: u8, shuffle: u64) -> Vec<u8> {
        let mut order: Vec<usize> = (0..self.headers.len()).collect();
        // Fisher-Yates with a small LCG: header order must not matter.
        let mut s = shuffle | 1;
        for i in (1..order.len()).rev() {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let j = (s >> 33) as usize % (i + 1);
            order.swap(i, j);
        }
        let pad = |bits: u8| match bits & 3 {
            0 => "",
            1 => " ",
            2 => "\t",
            _ => "  ",
        };
        let mut out = format!("{} {} {}\r\n", self.method, self.target, self.version);
        for (k, &i) in order.iter().enumerate() {
            let (name, value) = &self.headers[i];
            let name: String = if case >> (k % 64) & 1 == 1 {
                name.chars()
                    .map(|c| {
                        if c.is_ascii_uppercase() {
                            c.to_ascii_lowercase()
                        } else {
                            c.to_ascii_uppercase()
                        }
                    })
                    .collect()
            } else {
                name.clone()
            };
            let p = padding.rotate_left(k as u32);
            out.push_str(&format!("{name}:{}{value}{}\r\n", pad(p), pad(p >> 2)));
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    fn remove(&mut self, name: &str) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    fn set(&mut self, name: &str, value: String) {
        self.remove(name);
        self.headers.push((name.to_owned(), value));
    }
}

fn tokens(raw: &[Vec<u8>]) -> Vec<String> {
    raw.iter()
        .take(4)
        .map(|t| pick(TOKEN_CHARS, t, 12))
        .filter(|t| !t.is_empty())
        .collect()
}

/// Whether a comma-separated list holds `token`, case-insensitively (the reference).
fn list_has(values: &[String], token: &str) -> bool {
    values.iter().any(|v| {
        v.split(',')
            .any(|t| t.trim_matches([' ', '\t']).eq_ignore_ascii_case(token))
    })
}

fn structured(spec: Spec) {
    let key = BASE64.encode(spec.key);
    let mut path = format!("/{}", pick(PATH_CHARS, &spec.path, 64));
    if let Some(q) = &spec.query {
        path.push('?');
        path.push_str(&pick(PATH_CHARS, q, 64));
    }
    let host = {
        let h = pick(b"abcdefxyz0123456789.-:", &spec.host, 40);
        if h.is_empty() { "localhost".to_owned() } else { h }
    };
    let mut upgrade = tokens(&spec.upgrade_extra);
    let pos = spec.padding as usize % (upgrade.len() + 1);
    upgrade.insert(pos, "websocket".to_owned());
    let mut connection = tokens(&spec.connection_extra);
    let pos = spec.shuffle as usize % (connection.len() + 1);
    connection.insert(pos, "Upgrade".to_owned());

    let mut b = Builder {
        method: "GET".into(),
        target: path.clone(),
        version: "HTTP/1.1",
        headers: vec![
            ("Host".into(), host),
            ("Upgrade".into(), upgrade.join(", ")),
            ("Sec-WebSocket-Key".into(), key.clone()),
            ("Sec-WebSocket-Version".into(), "13".into()),
        ],
    };
    if spec.split_connection {
        b.headers.push(("Connection".into(), "keep-alive".into()));
    }
    b.headers.push(("Connection".into(), connection.join(",")));
    for (name, value) in spec.extra.iter().take(8) {
        let name = format!("X-{}", pick(b"abcdefghijklmnopqrstuvwxyz0123456789-", name, 20));
        let value = pick(VALUE_CHARS, value, 64);
        b.headers
            .push((name, value.trim_matches([' ', '\t']).to_owned()));
    }

    const NOT_HTTP11: Rejection = Rejection::BadRequest("websocket upgrades need HTTP/1.1");
    const NO_CONNECTION: Rejection =
        Rejection::BadRequest("Connection header must include Upgrade");
    const NO_HOST: Rejection = Rejection::BadRequest("missing Host header");
    const BODY: Rejection = Rejection::BadRequest("an upgrade request must not have a body");
    const NO_KEY: Rejection = Rejection::BadRequest("missing Sec-WebSocket-Key");
    const TWO_KEYS: Rejection = Rejection::BadRequest("several Sec-WebSocket-Key headers");
    const BAD_KEY: Rejection = Rejection::BadRequest("Sec-WebSocket-Key is not 16 bytes of base64");

    let mut want_key = key.clone();
    // Filled in after rendering for the length mutations.
    let mut head_target: Option<usize> = None;
    let mut count_target: Option<usize> = None;
    let expected: Result<(), Rejection> = match &spec.mutation {
        Mutation::None => Ok(()),
        Mutation::Http10 => {
            b.version = "HTTP/1.0";
            Err(NOT_HTTP11)
        }
        Mutation::Method(m) => {
            let m = pick(b"GETPOSTputdelHAD", m, 8);
            let m = if m.is_empty() { "POST".to_owned() } else { m };
            b.method = m.clone();
            if m == "GET" {
                Ok(())
            } else {
                Err(Rejection::MethodNotAllowed)
            }
        }
        Mutation::DropUpgrade => {
            b.remove("upgrade");
            Err(Rejection::UpgradeRequired)
        }
        Mutation::UpgradeTokens(t) => {
            let v = tokens(t).join(", ");
            let ok = list_has(std::slice::from_ref(&v), "websocket");
            b.set("Upgrade", v);
            if ok { Ok(()) } else { Err(Rejection::UpgradeRequired) }
        }
        Mutation::DropConnection => {
            b.remove("connection");
            Err(NO_CONNECTION)
        }
        Mutation::ConnectionTokens(t) => {
            let v = tokens(t).join(",");
            let ok = list_has(std::slice::from_ref(&v), "upgrade");
            b.set("Connection", v);
            if ok { Ok(()) } else { Err(NO_CONNECTION) }
        }
        Mutation::DropHost => {
            b.remove("host");
            Err(NO_HOST)
        }
        Mutation::ContentLength(values) => {
            let values: Vec<String> = values
                .iter()
                .take(3)
                .map(|v| pick(b"0001259 ,", v, 6).trim_matches(' ').to_owned())
                .collect();
            // Any Content-Length other than 0 means a body (RFC 9112 section 6.3:
            // several differing ones are an error too).
            let body = values.iter().any(|v| v != "0");
            for v in values {
                b.headers.push(("Content-Length".into(), v));
            }
            if body { Err(BODY) } else { Ok(()) }
        }
        Mutation::TransferEncoding(v) => {
            let v = pick(b"chunkedidentitygzip, ", v, 20).trim_matches(' ').to_owned();
            b.headers.push(("Transfer-Encoding".into(), v));
            Err(BODY)
        }
        Mutation::Version(v) => {
            let v = pick(b"0123456789 13", v, 4).trim_matches(' ').to_owned();
            let ok = v == "13";
            b.set("Sec-WebSocket-Version", v);
            if ok { Ok(()) } else { Err(Rejection::UpgradeRequired) }
        }
        Mutation::DropVersion => {
            b.remove("sec-websocket-version");
            Err(Rejection::UpgradeRequired)
        }
        Mutation::DuplicateVersion(v) => {
            let v = pick(b"0123456789 13", v, 4).trim_matches(' ').to_owned();
            b.headers.push(("Sec-WebSocket-Version".into(), v));
            Err(Rejection::UpgradeRequired)
        }
        Mutation::DropKey => {
            b.remove("sec-websocket-key");
            Err(NO_KEY)
        }
        Mutation::DuplicateKey(k) => {
            b.headers
                .push(("Sec-WebSocket-Key".into(), BASE64.encode(k)));
            Err(TWO_KEYS)
        }
        Mutation::KeyLength(k_raw) => {
            let k = BASE64.encode(k_raw);
            b.set("Sec-WebSocket-Key", k.clone());
            if k_raw.len() == 16 {
                want_key = k;
                Ok(())
            } else {
                Err(BAD_KEY)
            }
        }
        Mutation::KeyUnpadded => {
            b.set("Sec-WebSocket-Key", key.trim_end_matches('=').to_owned());
            Err(BAD_KEY)
        }
        Mutation::KeyByte(at, byte) => {
            // A printable, non-space byte that keeps the header well-formed.
            let c = b'!' + byte % 94;
            let mut k = key.clone().into_bytes();
            let at = *at as usize % k.len();
            k[at] = c;
            let k = String::from_utf8(k).unwrap();
            // A base64 character keeps the key valid only if it keeps the padding
            // and leaves no stray bits in the last character (base64 0.22 refuses those).
            let ok = BASE64.decode(&k).map(|d| d.len()) == Ok(16);
            if ok {
                // Independent check of that claim: the only valid keys are 22 chars of
                // the alphabet, the last of which has its low 4 bits clear, then "==".
                let alpha = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
                let kb = k.as_bytes();
                assert!(kb[..22].iter().all(|c| alpha.contains(c)) && &kb[22..] == b"==");
                let last = alpha.iter().position(|&a| a == kb[21]).unwrap();
                assert_eq!(last & 0xf, 0);
                want_key = k.clone();
            }
            b.set("Sec-WebSocket-Key", k);
            if ok { Ok(()) } else { Err(BAD_KEY) }
        }
        Mutation::HeaderCount(n) => {
            let n = 60 + *n as usize % 10; // 60..=69 headers in all
            count_target = Some(n);
            if n > MAX_HEADERS {
                Err(Rejection::HeadersTooLarge)
            } else {
                Ok(())
            }
        }
        Mutation::HeadLength(d) => {
            let t = (MAX_HEAD as i64 + i64::from(*d % 200)) as usize;
            head_target = Some(t);
            if t > MAX_HEAD {
                Err(Rejection::HeadersTooLarge)
            } else {
                Ok(())
            }
        }
    };
    if let Some(n) = count_target {
        let mut i = 0;
        while b.headers.len() < n {
            b.headers.push((format!("X-Fill-{i}"), "v".into()));
            i += 1;
        }
        if b.headers.len() > n {
            return; // the base request already has more headers than that
        }
    }
    let head = match head_target {
        None => b.render(spec.name_case, spec.padding, spec.shuffle),
        Some(t) => {
            // No padding, so that lengths add up: a filler header "X-Pad:" + value +
            // CRLF brings the head to exactly t bytes.
            let base = b.render(spec.name_case, 0, spec.shuffle).len();
            if base + 8 > t {
                return;
            }
            b.headers.push(("X-Pad".into(), "p".repeat(t - base - 8)));
            let head = b.render(spec.name_case, 0, spec.shuffle);
            assert_eq!(head.len(), t);
            head
        }
    };
    let head_len = head.len();
    let mut buf = head;
    buf.extend_from_slice(&spec.trailing);

    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let got = match parse_request(&buf, &mut headers, MAX_HEAD) {
        Ok(Some(req)) => {
            assert_eq!(req.head_len, head_len, "{}", String::from_utf8_lossy(&buf));
            assert_eq!(&buf[req.head_len..], &spec.trailing[..]);
            let (p, q) = path.split_once('?').unwrap_or((&path, ""));
            assert_eq!((req.path, req.query), (p, q));
            validate_upgrade(&req).map(|u| {
                assert_eq!(u.key, want_key);
                assert_eq!(accept_key(u.key), reference_accept(u.key));
            })
        }
        Ok(None) => panic!("partial: {}", String::from_utf8_lossy(&buf)),
        Err(r) => Err(r),
    };
    assert_eq!(
        got,
        expected,
        "mutation {:?}\n{}",
        spec.mutation,
        String::from_utf8_lossy(&buf[..head_len])
    );
    if let Err(r) = got {
        check_rejection_response(r);
    }
    // The whole head, cut anywhere before its end, is still partial.
    if head_len <= 1024 {
        for cut in [0, 1, head_len / 2, head_len - 2, head_len - 1] {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let r = parse_request(&buf[..cut], &mut headers, MAX_HEAD);
            // A HeaderCount mutation may already be over 64 headers in a prefix.
            if count_target.is_none() {
                assert!(matches!(r, Ok(None)), "cut {cut}: {r:?}");
            }
        }
    }
}
