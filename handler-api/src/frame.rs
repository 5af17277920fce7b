//! Frames: what a gear receives (borrowed) and what it sends (owned or shared).

use bytes::Bytes;
use std::fmt;

use crate::close::{CloseCode, truncate_reason};

/// A complete data message from the client, borrowed from the engine's buffers.
///
/// An unfragmented message under 1 KiB points straight into the buffer the kernel
/// filled, and a longer one into the connection's output, where the engine unmasked it
/// behind the header of its echo (so that echoing it as it is copies nothing more); a
/// message that was fragmented, compressed or split across receives, into the buffer
/// it was gathered in. The borrow ends when the callback returns. Keep what you need by copying it
/// (`text.to_owned()`, `Bytes::copy_from_slice(data)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// A text message, already validated as UTF-8.
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
}

impl<'a> Message<'a> {
    /// The payload bytes, whatever the type.
    pub fn as_bytes(&self) -> &'a [u8] {
        match self {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
        }
    }

    /// Payload length in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Bytes that are known to be valid UTF-8, cheap to clone (a shared [`Bytes`]).
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Utf8Bytes(Bytes);

impl Utf8Bytes {
    /// Text from a static string, without copying.
    pub const fn from_static(s: &'static str) -> Utf8Bytes {
        Utf8Bytes(Bytes::from_static(s.as_bytes()))
    }

    /// Checks `bytes` and wraps them.
    pub fn try_from_bytes(bytes: Bytes) -> Result<Utf8Bytes, std::str::Utf8Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Utf8Bytes(bytes))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // The constructor checked the bytes; from_utf8 here would cost a scan per read.
        match std::str::from_utf8(&self.0) {
            Ok(s) => s,
            Err(_) => unreachable!("Utf8Bytes holds valid UTF-8 by construction"),
        }
    }

    /// The shared bytes underneath.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Gives the shared bytes back.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl fmt::Debug for Utf8Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl From<String> for Utf8Bytes {
    fn from(s: String) -> Self {
        Utf8Bytes(Bytes::from(s))
    }
}

impl From<&'static str> for Utf8Bytes {
    fn from(s: &'static str) -> Self {
        Utf8Bytes::from_static(s)
    }
}

/// The payload of a close frame that carries a status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    /// The status code, valid by construction.
    pub code: CloseCode,
    /// Why, for humans; at most 123 bytes are sent (cut at a character boundary).
    pub reason: Utf8Bytes,
}

/// A frame a gear sends. Payloads are owned or shared: one encoded broadcast can be
/// referenced by many connections' queues without copying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A text frame.
    Text(Utf8Bytes),
    /// A binary frame.
    Binary(Bytes),
    /// A close frame; `None` sends a close without a status. Nothing queued after it
    /// is sent.
    Close(Option<CloseFrame>),
}

impl Frame {
    /// A text frame.
    pub fn text(text: impl Into<Utf8Bytes>) -> Frame {
        Frame::Text(text.into())
    }

    /// A binary frame.
    pub fn binary(data: impl Into<Bytes>) -> Frame {
        Frame::Binary(data.into())
    }

    /// A close frame with a code and a reason (cut to 123 bytes).
    pub fn close(code: CloseCode, reason: &str) -> Frame {
        let reason = truncate_reason(reason);
        Frame::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes(Bytes::copy_from_slice(reason.as_bytes())),
        }))
    }

    /// Whether this is a close frame.
    pub fn is_close(&self) -> bool {
        matches!(self, Frame::Close(_))
    }
}
