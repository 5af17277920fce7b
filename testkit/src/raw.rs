//! A raw websocket client over a blocking TCP socket, for tests that need frames made
//! by hand (unmasked, invalid UTF-8, a client that never reads) or that must not
//! allocate while they run (the allocation-count tests): the upgrade is a fixed
//! request, frames are encoded into and read from buffers the caller keeps.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// The `Sec-WebSocket-Key` of every raw upgrade (RFC 6455's example).
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The mask of every masked frame this module makes.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The longest frame header: 2 bytes, 8 of extended length, 4 of mask.
pub const MAX_HEADER_BYTES: usize = 14;

/// An upgrade request for `path` (Host `localhost`).
pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A frame header with FIN set: opcode, payload length, and the mask bit.
pub fn frame_head(opcode: u8, len: usize, masked: bool) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match len {
        0..=125 => out.push(mask_bit | len as u8),
        126..=0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out
}

/// A masked frame with FIN set, as a client sends it.
pub fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = frame_head(opcode, payload.len(), true);
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    out
}

/// An unmasked frame with FIN set, as only a server may send it.
pub fn unmasked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = frame_head(opcode, payload.len(), false);
    out.extend_from_slice(payload);
    out
}

/// A connection that completed its upgrade.
#[derive(Debug)]
pub struct RawClient {
    /// The socket (tests may write anything to it).
    pub stream: TcpStream,
}

impl RawClient {
    /// Connects to `addr`, upgrades on `path`, and checks the answer is a 101 with the
    /// right `Sec-WebSocket-Accept`; panics otherwise.
    pub fn open(addr: SocketAddr, path: &str) -> RawClient {
        let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream.set_nodelay(true).ok();
        stream.set_read_timeout(Some(crate::DEFAULT_TIMEOUT)).ok();
        stream
            .write_all(upgrade_request(path).as_bytes())
            .expect("send the upgrade");
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            stream.read_exact(&mut byte).expect("read the 101");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        // RFC 6455 section 1.3's answer to its example key.
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "{head}"
        );
        RawClient { stream }
    }

    /// Waits at most `timeout` for each read from now on.
    pub fn set_timeout(&self, timeout: Duration) {
        self.stream.set_read_timeout(Some(timeout)).ok();
    }

    /// Sends bytes as they are (an encoded frame, say).
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Reads one server frame (unmasked, FIN set, at most `buf.len()` bytes of payload)
    /// into `buf`: its opcode and payload length. Allocates nothing.
    pub fn read_frame_into(&mut self, buf: &mut [u8]) -> io::Result<(u8, usize)> {
        let mut head = [0u8; 2];
        self.stream.read_exact(&mut head)?;
        let len = match head[1] & 0x7f {
            126 => {
                let mut ext = [0u8; 2];
                self.stream.read_exact(&mut ext)?;
                usize::from(u16::from_be_bytes(ext))
            }
            127 => {
                let mut ext = [0u8; 8];
                self.stream.read_exact(&mut ext)?;
                u64::from_be_bytes(ext) as usize
            }
            n => usize::from(n),
        };
        if len > buf.len() {
            return Err(io::Error::other(format!(
                "a {len}-byte frame for a {}-byte buffer",
                buf.len()
            )));
        }
        self.stream.read_exact(&mut buf[..len])?;
        Ok((head[0] & 0x0f, len))
    }

    /// Reads one server frame: its opcode and payload.
    pub fn read_frame(&mut self) -> (u8, Vec<u8>) {
        let mut buf = vec![0u8; 1 << 24];
        let (op, len) = self.read_frame_into(&mut buf).expect("read a frame");
        buf.truncate(len);
        (op, buf)
    }
}
