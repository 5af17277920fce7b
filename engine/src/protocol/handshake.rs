//! The HTTP/1.1 upgrade (RFC 6455 section 4): parsing with `httparse`, validation as
//! SPEC section 3 asks, `Sec-WebSocket-Accept`, and the responses.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha1::{Digest, Sha1};

/// The GUID of RFC 6455 section 1.3.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Most headers a request may have; more is answered with 431.
pub const MAX_HEADERS: usize = 64;

/// Why a request is refused, and with which response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// 400: not a well-formed request, or a malformed upgrade.
    BadRequest(&'static str),
    /// 404: no gear at this path (decided by the router).
    NotFound,
    /// 405: an upgrade must be a GET.
    MethodNotAllowed,
    /// 426: not an upgrade to websocket, or a version other than 13.
    UpgradeRequired,
    /// 431: the request head is over the limit, or has too many headers.
    HeadersTooLarge,
    /// 503: the gear is at its connection limit.
    TooManyConnections,
    /// 503: the server is draining; the client should connect again (elsewhere).
    Draining,
    /// 403: the page that opens the connection (its `Origin`) is not allowed to
    /// (cross-site WebSocket hijacking; see `kythera_engine::origin`).
    ForbiddenOrigin,
}

impl Rejection {
    /// The HTTP status.
    pub fn status(self) -> u16 {
        match self {
            Rejection::BadRequest(_) => 400,
            Rejection::NotFound => 404,
            Rejection::MethodNotAllowed => 405,
            Rejection::UpgradeRequired => 426,
            Rejection::HeadersTooLarge => 431,
            Rejection::TooManyConnections | Rejection::Draining => 503,
            Rejection::ForbiddenOrigin => 403,
        }
    }

    /// Headers the response carries besides `Content-Length` and `Connection`.
    pub fn headers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Rejection::MethodNotAllowed => &[("Allow", "GET")],
            Rejection::UpgradeRequired => {
                &[("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")]
            }
            Rejection::Draining => &[("Retry-After", "1")],
            _ => &[],
        }
    }

    /// The body: a short text for people reading a failed request.
    pub fn body(self) -> &'static str {
        match self {
            Rejection::BadRequest(why) => why,
            Rejection::NotFound => "no websocket endpoint at this path",
            Rejection::MethodNotAllowed => "websocket upgrades use GET",
            Rejection::UpgradeRequired => {
                "websocket upgrade with Sec-WebSocket-Version: 13 required"
            }
            Rejection::HeadersTooLarge => "request header fields too large",
            Rejection::TooManyConnections => "TooManyWebsocketConnections",
            Rejection::Draining => "ServerDraining",
            Rejection::ForbiddenOrigin => "websocket connections from this origin are not allowed",
        }
    }

    /// Writes the whole response.
    pub fn write_response(self, out: &mut Vec<u8>) {
        write_response(
            out,
            self.status(),
            self.headers().iter().copied(),
            self.body().as_bytes(),
        );
    }
}

/// A request head parsed by `httparse`, borrowing the receive buffer.
#[derive(Debug)]
pub struct Request<'b> {
    /// The method.
    pub method: &'b str,
    /// The path without the query.
    pub path: &'b str,
    /// The query without `?` (empty if none).
    pub query: &'b str,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// The headers, as sent.
    pub headers: &'b [httparse::Header<'b>],
    /// Length of the head; bytes after it are the client's first frames.
    pub head_len: usize,
}

impl<'b> Request<'b> {
    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'b [u8]> {
        self.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    /// All values of a header.
    pub fn header_all<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'b [u8]> + 's {
        self.headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    }

    /// Whether a comma-separated header holds `token` (case-insensitive), in any of
    /// its occurrences.
    pub fn has_token(&self, name: &str, token: &str) -> bool {
        self.header_all(name).any(|v| {
            v.split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
        })
    }
}

/// Parses a request head from `buf`. `Ok(None)` means more bytes are needed. A head
/// longer than `max_head_bytes`, or with more than [`MAX_HEADERS`] headers, is refused
/// with 431; anything `httparse` refuses gets 400.
pub fn parse_request<'b>(
    buf: &'b [u8],
    headers: &'b mut [httparse::Header<'b>; MAX_HEADERS],
    max_head_bytes: usize,
) -> Result<Option<Request<'b>>, Rejection> {
    let mut req = httparse::Request::new(headers);
    let status = match req.parse(buf) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => return Err(Rejection::HeadersTooLarge),
        Err(_) => return Err(Rejection::BadRequest("malformed HTTP request")),
    };
    let head_len = match status {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial if buf.len() >= max_head_bytes => {
            return Err(Rejection::HeadersTooLarge);
        }
        httparse::Status::Partial => return Ok(None),
    };
    if head_len > max_head_bytes {
        return Err(Rejection::HeadersTooLarge);
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(Rejection::BadRequest("malformed HTTP request"));
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Some(Request {
        method,
        path,
        query,
        version,
        headers: req.headers,
        head_len,
    }))
}

/// What a valid upgrade request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade<'b> {
    /// The client's `Sec-WebSocket-Key`.
    pub key: &'b str,
}

/// Checks that `req` is a websocket upgrade kythera accepts (SPEC section 3):
/// GET, HTTP/1.1, `Host`, `Upgrade: websocket`, `Connection: Upgrade`, one
/// `Sec-WebSocket-Key` of 16 base64-encoded bytes, `Sec-WebSocket-Version: 13`, and no
/// request body.
pub fn validate_upgrade<'b>(req: &Request<'b>) -> Result<Upgrade<'b>, Rejection> {
    if req.version != 1 {
        return Err(Rejection::BadRequest("websocket upgrades need HTTP/1.1"));
    }
    if req.method != "GET" {
        return Err(Rejection::MethodNotAllowed);
    }
    if !req.has_token("upgrade", "websocket") {
        return Err(Rejection::UpgradeRequired);
    }
    if !req.has_token("connection", "upgrade") {
        return Err(Rejection::BadRequest(
            "Connection header must include Upgrade",
        ));
    }
    if req.header("host").is_none() {
        return Err(Rejection::BadRequest("missing Host header"));
    }
    // A body on an upgrade has no meaning, and accepting one would let its bytes be
    // read as frames: refuse it rather than guess (request smuggling). Every
    // Content-Length counts, not just the first: `0` then `5` is a body to a proxy that
    // reads the second one.
    if req.header("transfer-encoding").is_some()
        || req
            .header_all("content-length")
            .any(|v| v.trim_ascii() != b"0")
    {
        return Err(Rejection::BadRequest(
            "an upgrade request must not have a body",
        ));
    }
    let mut versions = req.header_all("sec-websocket-version");
    match (versions.next(), versions.next()) {
        (Some(v), None) if v.trim_ascii() == b"13" => {}
        _ => return Err(Rejection::UpgradeRequired),
    }
    let mut keys = req.header_all("sec-websocket-key");
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) => k.trim_ascii(),
        (None, _) => return Err(Rejection::BadRequest("missing Sec-WebSocket-Key")),
        _ => return Err(Rejection::BadRequest("several Sec-WebSocket-Key headers")),
    };
    let decoded_len = BASE64.decode(key).map(|k| k.len());
    let key = match (decoded_len, std::str::from_utf8(key)) {
        (Ok(16), Ok(k)) => k,
        _ => {
            return Err(Rejection::BadRequest(
                "Sec-WebSocket-Key is not 16 bytes of base64",
            ));
        }
    };
    Ok(Upgrade { key })
}

/// `Sec-WebSocket-Accept` for a client key: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(WS_GUID.as_bytes());
    BASE64.encode(sha.finalize())
}

/// Writes the 101 response.
pub fn write_switching_protocols<'h>(
    out: &mut Vec<u8>,
    key: &str,
    subprotocol: Option<&str>,
    extensions: Option<&str>,
    extra_headers: impl IntoIterator<Item = (&'h str, &'h str)>,
) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept_key(key).as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(p) = subprotocol {
        push_header(out, "Sec-WebSocket-Protocol", p);
    }
    if let Some(e) = extensions {
        push_header(out, "Sec-WebSocket-Extensions", e);
    }
    for (k, v) in extra_headers {
        push_header(out, k, v);
    }
    out.extend_from_slice(b"\r\n");
}

/// Writes an ordinary response that closes the connection: status line, the given
/// headers, `Content-Length`, `Connection: close`, body. Headers that would break the
/// response (not a token, CR/LF in the value) are left out.
pub fn write_response<'h>(
    out: &mut Vec<u8>,
    status: u16,
    headers: impl IntoIterator<Item = (&'h str, &'h str)>,
    body: &[u8],
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason_phrase(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (k, v) in headers {
        if kythera_handler_api::check_header(k, v).is_ok() {
            push_header(out, k, v);
        }
    }
    push_header(out, "Content-Length", &body.len().to_string());
    push_header(out, "Connection", "close");
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The reason phrase for a status code.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /chat?room=a HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn check(raw: &[u8]) -> Result<String, Rejection> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let req = parse_request(raw, &mut headers, 8192)?.expect("complete");
        validate_upgrade(&req).map(|u| u.key.to_owned())
    }

    #[test]
    fn rfc_1_3_accept_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn good_request_and_trailing_frames_kept() {
        let mut raw = GOOD.as_bytes().to_vec();
        raw.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let req = parse_request(&raw, &mut headers, 8192).unwrap().unwrap();
        assert_eq!((req.path, req.query), ("/chat", "room=a"));
        assert_eq!(&raw[req.head_len..], &[0x81, 0x80, 1, 2, 3, 4]);
        let up = validate_upgrade(&req).unwrap();
        let mut out = Vec::new();
        write_switching_protocols(&mut out, up.key, Some("chat"), None, [("X-A", "b")]);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(text.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(text.contains("Sec-WebSocket-Protocol: chat\r\n"));
        assert!(text.ends_with("X-A: b\r\n\r\n"));
    }

    #[test]
    fn partial_then_complete() {
        let raw = GOOD.as_bytes();
        for cut in 0..raw.len() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            assert!(
                matches!(parse_request(&raw[..cut], &mut headers, 8192), Ok(None)),
                "cut {cut}"
            );
        }
    }

    fn with(replace: &str, by: &str) -> Vec<u8> {
        assert!(GOOD.contains(replace), "{replace}");
        GOOD.replacen(replace, by, 1).into_bytes()
    }

    #[test]
    fn malformed_and_refused_requests_get_their_status() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (b"GARBAGE\r\n\r\n".to_vec(), 400),
            (b"GET / HTTP/1.1\r\nBad Header\r\n\r\n".to_vec(), 400),
            (with("GET ", "POST "), 405),
            (with("HTTP/1.1", "HTTP/1.0"), 400),
            (with("Upgrade: websocket\r\n", ""), 426),
            (with("Upgrade: websocket", "Upgrade: h2c"), 426),
            (with("Connection: Upgrade", "Connection: keep-alive"), 400),
            (with("Host: server.example.com\r\n", ""), 400),
            (
                with("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8"),
                426,
            ),
            (with("Sec-WebSocket-Version: 13\r\n", ""), 426),
            (
                with("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
                400,
            ),
            (with("dGhlIHNhbXBsZSBub25jZQ==", "dG9vc2hvcnQ="), 400),
            (
                with("dGhlIHNhbXBsZSBub25jZQ==", "not base64 at all!!!!!!!"),
                400,
            ),
            (
                with(
                    "Origin",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin",
                ),
                400,
            ),
            (with("Origin", "Content-Length: 5\r\nOrigin"), 400),
            (with("Origin", "Transfer-Encoding: chunked\r\nOrigin"), 400),
        ];
        for (raw, status) in cases {
            let got = check(&raw).map_err(Rejection::status);
            assert_eq!(got, Err(status), "{}", String::from_utf8_lossy(&raw));
        }
        // Tokens are matched case-insensitively and inside lists.
        assert!(
            check(&with(
                "Connection: Upgrade",
                "connection: keep-alive, UPGRADE"
            ))
            .is_ok()
        );
        assert!(check(&with("Origin", "Content-Length: 0\r\nOrigin")).is_ok());
        assert!(
            check(&with(
                "Origin",
                "Content-Length: 0\r\nContent-Length: 0\r\nOrigin"
            ))
            .is_ok()
        );
    }

    // Found by the handshake fuzz target: only the first Content-Length was looked at,
    // so `0` followed by `5` passed as a body-less upgrade.
    #[test]
    fn every_content_length_counts() {
        for extra in [
            "Content-Length: 0\r\nContent-Length: 5\r\n",
            "content-length: 0\r\nContent-Length: 001\r\n",
            "Content-Length: 0\r\nContent-Length:\r\n",
        ] {
            let raw = with("Origin", &format!("{extra}Origin"));
            assert_eq!(
                check(&raw),
                Err(Rejection::BadRequest(
                    "an upgrade request must not have a body"
                )),
                "{extra:?}"
            );
        }
    }

    #[test]
    fn oversized_heads_get_431() {
        let mut big = GOOD.replacen("\r\n\r\n", "\r\n", 1);
        big.push_str(&format!("X-Big: {}\r\n\r\n", "a".repeat(9000)));
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let r = parse_request(big.as_bytes(), &mut headers, 8192);
        assert_eq!(r.unwrap_err().status(), 431);
        // Still partial but already over the limit.
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let r = parse_request(&big.as_bytes()[..8500], &mut headers, 8192);
        assert_eq!(r.unwrap_err().status(), 431);
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..(MAX_HEADERS + 1) {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let r = parse_request(many.as_bytes(), &mut headers, 8192);
        assert_eq!(r.unwrap_err().status(), 431);
    }

    #[test]
    fn rejection_responses() {
        for (rej, status, needle) in [
            (Rejection::NotFound, 404, "Not Found"),
            (
                Rejection::UpgradeRequired,
                426,
                "Sec-WebSocket-Version: 13\r\n",
            ),
            (Rejection::HeadersTooLarge, 431, "Too Large"),
            (
                Rejection::TooManyConnections,
                503,
                "\r\n\r\nTooManyWebsocketConnections",
            ),
            (Rejection::MethodNotAllowed, 405, "Allow: GET\r\n"),
        ] {
            let mut out = Vec::new();
            rej.write_response(&mut out);
            let text = String::from_utf8(out).unwrap();
            assert!(text.starts_with(&format!("HTTP/1.1 {status} ")), "{text}");
            assert!(text.contains(needle), "{text}");
            assert!(text.contains("Connection: close\r\n"), "{text}");
            let body = text.split("\r\n\r\n").nth(1).unwrap();
            assert!(text.contains(&format!("Content-Length: {}\r\n", body.len())));
        }
    }

    #[test]
    fn response_drops_injected_headers() {
        let mut out = Vec::new();
        write_response(
            &mut out,
            403,
            [("X-Ok", "1"), ("X-Bad", "a\r\nSet-Cookie: x")],
            b"no",
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("X-Ok: 1\r\n"));
        assert!(!text.contains("Set-Cookie"));
    }
}
