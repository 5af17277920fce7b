//! Inputs shared by the benchmarks: the same client frames for every implementation,
//! an endless in-memory socket that serves them, and a poll-once executor for the
//! async implementation; and ([`floor`]) what the two floor servers share.

pub mod floor;

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The payload that [`masked_frame`] carries: `len` ASCII bytes (`abc...zabc...`), so
/// that text frames are valid UTF-8 and every implementation validates the same bytes.
pub fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

/// A masked client frame (FIN, one opcode, the [`payload`] of `len` bytes), as a browser
/// would send it. Text payloads are ASCII so that every implementation validates the
/// same bytes.
pub fn masked_frame(len: usize, text: bool) -> Vec<u8> {
    let opcode = if text {
        kythera_engine::protocol::OpCode::Text
    } else {
        kythera_engine::protocol::OpCode::Binary
    };
    masked_frame_with(opcode, &payload(len))
}

/// A masked client frame (FIN) with this opcode and payload.
pub fn masked_frame_with(opcode: kythera_engine::protocol::OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    kythera_engine::protocol::codec::encode_frame_into(
        &mut out,
        true,
        0,
        opcode,
        payload,
        Some([0x37, 0xfa, 0x21, 0x3d]),
    );
    out
}

/// An endless in-memory socket: the peer sends the same bytes (normally one whole frame)
/// over and over. Every read fills the caller's buffer with the next bytes of that
/// stream, copying them as the kernel copies received bytes into a receive buffer, so
/// each wire byte is copied exactly once; frames may be split across reads, as on a
/// real socket. Writes (pongs, close replies) are accepted and dropped.
///
/// Implements both `std::io::{Read, Write}` (for tungstenite) and tokio's
/// `AsyncRead + AsyncWrite` (for fastwebsockets); the async side is always ready.
#[derive(Debug, Clone)]
pub struct EndlessWire {
    bytes: Vec<u8>,
    pos: usize,
}

impl EndlessWire {
    /// A socket whose peer sends `bytes` forever.
    pub fn new(bytes: Vec<u8>) -> EndlessWire {
        assert!(!bytes.is_empty(), "an endless stream of nothing");
        EndlessWire { bytes, pos: 0 }
    }

    /// Copies the next `dst_len` bytes of the stream through `put`, in at most
    /// `dst_len / bytes.len() + 2` pieces.
    #[inline]
    fn feed(&mut self, dst_len: usize, mut put: impl FnMut(&[u8])) {
        let mut left = dst_len;
        while left > 0 {
            let take = left.min(self.bytes.len() - self.pos);
            put(&self.bytes[self.pos..self.pos + take]);
            self.pos += take;
            if self.pos == self.bytes.len() {
                self.pos = 0;
            }
            left -= take;
        }
    }
}

impl io::Read for EndlessWire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len();
        let mut off = 0;
        self.feed(n, |piece| {
            buf[off..off + piece.len()].copy_from_slice(piece);
            off += piece.len();
        });
        Ok(n)
    }
}

impl io::Write for EndlessWire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsyncRead for EndlessWire {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let n = buf.remaining();
        this.feed(n, |piece| buf.put_slice(piece));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for EndlessWire {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The smallest executor there is: polls `fut` once with a no-op waker and returns its
/// output. Meant for futures over always-ready in-memory streams such as
/// [`EndlessWire`], which never wait; panics if `fut` is not ready after one poll
/// (so a benchmark can never silently measure a future that did nothing).
///
/// This charges the async implementation no executor overhead at all (no runtime
/// context, no thread-local parking as in `futures::executor::block_on`), which is the
/// most favourable setting for it.
#[inline]
pub fn poll_once<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => panic!("future not ready after one poll on an in-memory stream"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn endless_wire_repeats_across_reads() {
        let mut w = EndlessWire::new(vec![1, 2, 3]);
        let mut a = [0u8; 5];
        assert_eq!(w.read(&mut a).unwrap(), 5);
        assert_eq!(a, [1, 2, 3, 1, 2]);
        let mut b = [0u8; 4];
        assert_eq!(w.read(&mut b).unwrap(), 4);
        assert_eq!(b, [3, 1, 2, 3]);
    }

    #[test]
    fn endless_wire_async_read() {
        let mut w = EndlessWire::new(vec![7, 8]);
        let mut buf = Vec::with_capacity(5);
        let n = poll_once(tokio::io::AsyncReadExt::read_buf(&mut w, &mut buf)).unwrap();
        assert_eq!(n, buf.len());
        assert!(buf.iter().enumerate().all(|(i, &b)| b == [7, 8][i % 2]));
    }
}
