//! What the two floor servers (`uring-floor`, `epoll-floor`, issues 17 and 18) share:
//! the echo of a connection's frames as their bytes arrive and the answer to the
//! upgrade, so that they differ in their I/O only.

use std::io;
use std::net::TcpListener;

use kythera_engine::protocol::handshake;
use kythera_engine::protocol::mask::extend_unmasked;

/// The longest client frame header: 2 bytes, a 64-bit length and the mask key.
const MAX_HEADER: usize = 14;

/// The echo of one connection's stream of client frames, piece by piece as the bytes
/// arrive: each header is answered with the server's (the mask bit and key removed) as
/// soon as it is whole, and each piece of payload is appended to the output unmasked at
/// once, in one pass that reads each byte once and writes it once (the engine's
/// `extend_unmasked`, as kythera gathers a payload). Nothing waits for a frame to be
/// whole, so a frame split across receives costs no more than one that is not; only a
/// header split across receives (at most 13 bytes) is kept.
///
/// Why not unmask in place and copy: that reads and writes every byte twice, and on the
/// AMD EPYC cores measured glibc's `memcpy` of 16 KiB (`rep movsb` above its 8 KiB
/// threshold) was about six times slower when source and destination were not at the
/// same offset modulo 64 bytes: the epoll floor spent 6.1 to 7.9 µs of user time per
/// 16 KiB echo that way, 0.9 µs with `GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=4194304`
/// and 1.3 µs with its receive buffer moved so that the two offsets agreed
/// (`kythera-load echo -c 100 -b 16384 -p 1`). An echo sent from the receive buffer
/// itself would save the copy altogether.
#[derive(Debug, Default)]
pub struct EchoStream {
    /// The start of a header that is not whole yet.
    head: [u8; MAX_HEADER],
    head_len: usize,
    /// Payload bytes of the frame under way still to come.
    remaining: u64,
    mask: Option<[u8; 4]>,
    /// Payload bytes of that frame unmasked so far (where in the key the next one is).
    unmasked: usize,
}

/// The header at the start of `b`, once it is whole: its length, the payload's length
/// and the mask key. Not the engine's `parse_header`, which checks the opcode, the RSV
/// bits, the masking and the length against limits: a floor checks nothing.
fn header(b: &[u8]) -> Option<(usize, u64, Option<[u8; 4]>)> {
    let second = *b.get(1)?;
    let (len, at) = match second & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes(b.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(b.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    if second & 0x80 == 0 {
        return Some((at, len, None));
    }
    Some((at + 4, len, Some(b.get(at..at + 4)?.try_into().ok()?)))
}

impl EchoStream {
    /// Echoes what `data` holds of the stream into `out`.
    pub fn echo(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        while !data.is_empty() {
            if self.remaining == 0 {
                // A header, maybe continuing one kept from the last receive.
                let kept = self.head_len;
                let taken = if kept == 0 {
                    0
                } else {
                    let take = (MAX_HEADER - kept).min(data.len());
                    self.head[kept..kept + take].copy_from_slice(&data[..take]);
                    take
                };
                let src: &[u8] = if kept == 0 {
                    data
                } else {
                    &self.head[..kept + taken]
                };
                let Some((header_len, len, mask)) = header(src) else {
                    // Shorter than its header: all of `data` (or taken into `head`).
                    if kept == 0 {
                        self.head[..data.len()].copy_from_slice(data);
                    }
                    self.head_len += data.len();
                    return;
                };
                let length_end = header_len - if mask.is_some() { 4 } else { 0 };
                out.push(src[0]);
                out.push(src[1] & 0x7f);
                out.extend_from_slice(&src[2..length_end]);
                data = &data[header_len - kept..];
                self.head_len = 0;
                (self.remaining, self.mask, self.unmasked) = (len, mask, 0);
                continue;
            }
            let n = usize::try_from(self.remaining).map_or(data.len(), |r| r.min(data.len()));
            let (piece, rest) = data.split_at(n);
            match self.mask {
                Some(mask) => extend_unmasked(out, piece, mask, self.unmasked),
                None => out.extend_from_slice(piece),
            }
            self.unmasked += n;
            self.remaining -= n as u64;
            data = rest;
        }
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

    /// The stream of frames of several sizes, cut into receives at every place (and
    /// at random places), comes out as the server's frames, unmasked, whole.
    #[test]
    fn echoes_a_stream_cut_anywhere() {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for (i, len) in [0, 20, 125, 126, 512, 65_535, 65_536, 70_000, 1, 16 * 1024]
            .into_iter()
            .enumerate()
        {
            let text = i % 2 == 0;
            stream.extend_from_slice(&masked_frame(len, text));
            let op = if text {
                kythera_engine::protocol::OpCode::Text
            } else {
                kythera_engine::protocol::OpCode::Binary
            };
            kythera_engine::protocol::codec::encode_frame_into(
                &mut expected,
                true,
                0,
                op,
                &payload(len),
                None,
            );
        }
        let echo = |cuts: &[usize]| {
            let (mut echo, mut out, mut at) = (EchoStream::default(), Vec::new(), 0);
            for &cut in cuts.iter().chain([&stream.len()]) {
                echo.echo(&stream[at..cut], &mut out);
                at = cut;
            }
            out
        };
        assert_eq!(echo(&[]), expected, "one receive");
        // Every cut in the first frames' headers and payloads, one at a time and two
        // apart (a header split three ways).
        for cut in 1..700 {
            assert_eq!(echo(&[cut]), expected, "cut at {cut}");
            assert_eq!(echo(&[cut, cut + 2]), expected, "cuts at {cut}, {cut}+2");
        }
        let mut seed = 99u64;
        for round in 0..200 {
            let mut cuts = Vec::new();
            let mut at = 0;
            loop {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                at += 1 + (seed >> 33) as usize % if round % 2 == 0 { 16 } else { 40_000 };
                if at >= stream.len() {
                    break;
                }
                cuts.push(at);
            }
            assert_eq!(echo(&cuts), expected, "round {round}");
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
