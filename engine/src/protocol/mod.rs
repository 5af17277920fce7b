//! The sans-I/O WebSocket protocol core: no syscalls, no clock of its own.
//!
//! - [`handshake`]: the HTTP/1.1 upgrade, parsed with `httparse`, and its responses.
//! - [`codec`]: frame headers and frames, decoded in place, encoded header-first.
//! - [`mask`]: unmasking, fast path and reference.
//! - [`utf8`]: UTF-8 validation of text that arrives in pieces.
//! - [`fragment`]: reassembly of fragmented messages.
//! - [`close`]: close payloads and the closing handshake.
//! - [`decoder`]: all of the receive side for one connection.
//! - [`deflate`]: permessage-deflate (RFC 7692): negotiation, compression, inflation.

pub mod close;
pub mod codec;
pub mod decoder;
pub mod deflate;
pub mod error;
pub mod fragment;
pub mod handshake;
pub mod mask;
pub mod utf8;

pub use codec::{DecoderConfig, FrameHeader, OpCode, Role};
pub use decoder::{Decoder, Step};
pub use error::ProtocolError;
pub use fragment::Event;
