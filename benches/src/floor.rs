//! What the two floor servers (`uring-floor`, `epoll-floor`, issues 17 and 18) share:
//! the echo of whole frames and the answer to the upgrade, so that they differ in their
//! I/O only.

use std::io;
use std::net::TcpListener;

use kythera_engine::protocol::handshake;

/// Unmasks and echoes every whole frame at the start of `data`; returns the bytes
/// used. The header is copied with the mask bit and key removed; the payload is
/// unmasked in place with the engine's unmasking (word-wide, as kythera does, so that
/// the floor is a floor at 16 KiB too), then copied.
pub fn echo_frames(data: &mut [u8], out: &mut Vec<u8>) -> usize {
    let mut at = 0;
    loop {
        let rest = &mut data[at..];
        if rest.len() < 2 {
            return at;
        }
        let (len, header) = match rest[1] & 0x7f {
            126 if rest.len() >= 4 => (u64::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 if rest.len() >= 10 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&rest[2..10]);
                (u64::from_be_bytes(b), 10)
            }
            126 | 127 => return at,
            n => (u64::from(n), 2),
        };
        let masked = rest[1] & 0x80 != 0;
        let key_len = if masked { 4 } else { 0 };
        let total = header + key_len + len as usize;
        if rest.len() < total {
            return at;
        }
        out.push(rest[0]);
        out.push(rest[1] & 0x7f);
        out.extend_from_slice(&rest[2..header]);
        let (head, payload) = rest.split_at_mut(header + key_len);
        let payload = &mut payload[..len as usize];
        if masked {
            let key = [
                head[header],
                head[header + 1],
                head[header + 2],
                head[header + 3],
            ];
            kythera_engine::protocol::mask::unmask(payload, key, 0);
        }
        out.extend_from_slice(payload);
        at += total;
    }
}

/// The listener of floor server `name`: 127.0.0.1 and the port of `--port N` (the only
/// argument), else `default_port`.
pub fn listen(name: &str, default_port: u16) -> io::Result<TcpListener> {
    let usage = || io::Error::other(format!("usage: {name} [--port N]"));
    let mut port = default_port;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => port = args.next().and_then(|p| p.parse().ok()).ok_or_else(usage)?,
            _ => return Err(usage()),
        }
    }
    TcpListener::bind(("127.0.0.1", port))
}

/// The 101 to the upgrade request at the start of `pending`, and the request's length,
/// once its head is whole; `Ok(None)` while it is not.
pub fn upgrade_response(pending: &[u8]) -> io::Result<Option<(Vec<u8>, usize)>> {
    let mut headers = [httparse::EMPTY_HEADER; handshake::MAX_HEADERS];
    let req = match handshake::parse_request(pending, &mut headers, 16 * 1024) {
        Ok(Some(req)) => req,
        Ok(None) => return Ok(None),
        Err(_) => return Err(io::Error::other("bad request")),
    };
    let up = handshake::validate_upgrade(&req).map_err(|_| io::Error::other("not an upgrade"))?;
    let mut out = Vec::with_capacity(256);
    handshake::write_switching_protocols(&mut out, up.key, None, None, std::iter::empty());
    Ok(Some((out, req.head_len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{masked_frame, payload};

    #[test]
    fn echoes_whole_frames_unmasked_and_leaves_a_partial_one() {
        for len in [0, 20, 125, 126, 512, 16 * 1024, 70_000] {
            let mut data = masked_frame(len, true);
            data.extend_from_slice(&masked_frame(len, false));
            let whole = data.len();
            data.extend_from_slice(&masked_frame(len, true)[..3]); // a partial third
            let mut out = Vec::new();
            assert_eq!(echo_frames(&mut data, &mut out), whole, "len {len}");
            // Each echo: FIN + opcode, the unmasked length, the payload unmasked.
            let mut expected = Vec::new();
            for op in [
                kythera_engine::protocol::OpCode::Text,
                kythera_engine::protocol::OpCode::Binary,
            ] {
                kythera_engine::protocol::codec::encode_frame_into(
                    &mut expected,
                    true,
                    0,
                    op,
                    &payload(len),
                    None,
                );
            }
            assert_eq!(out, expected, "len {len}");
        }
    }

    #[test]
    fn answers_the_upgrade_once_its_head_is_whole() {
        let request = b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
            Sec-WebSocket-Version: 13\r\n\r\n";
        assert!(upgrade_response(&request[..40]).unwrap().is_none());
        let (response, used) = upgrade_response(request).unwrap().unwrap();
        assert_eq!(used, request.len());
        let text = String::from_utf8(response).unwrap();
        assert!(text.starts_with("HTTP/1.1 101"), "{text}");
        assert!(text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{text}");
    }
}
