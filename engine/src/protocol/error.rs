//! Protocol errors and the close code each one is answered with (SPEC section 3).

use std::fmt;

use kythera_handler_api::{CloseCode, TerminateError};

/// A violation of RFC 6455 (or of a configured limit) by the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// A client frame without a mask (1002).
    UnmaskedFrame,
    /// A server frame with a mask, seen in client role (1002).
    MaskedFrame,
    /// RSV1-3 set without an extension that defines them (1002).
    ReservedBits,
    /// Opcodes 3-7 and 11-15 (1002).
    UnknownOpcode(u8),
    /// A control frame longer than 125 bytes (1002).
    ControlFrameTooLong,
    /// A control frame without FIN (1002).
    FragmentedControlFrame,
    /// A 64-bit length with the most significant bit set (1002).
    LengthOverflow,
    /// A length not encoded in the fewest bytes (RFC 6455 section 5.2: MUST) (1002).
    NonMinimalLength,
    /// A continuation frame with no message in progress (1002).
    UnexpectedContinuation,
    /// A new text or binary frame while a fragmented message is in progress (1002).
    ExpectedContinuation,
    /// A frame or reassembled message over the size limit (1009).
    MessageTooBig,
    /// A text message that is not UTF-8 (1007).
    InvalidUtf8,
    /// A close frame with a 1-byte payload (1002).
    CloseFrameTooShort,
    /// A close frame with a code that may not be sent (1002).
    InvalidCloseCode(u16),
    /// A close reason that is not UTF-8 (1007).
    InvalidCloseReason,
    /// A compressed message (permessage-deflate) that does not inflate.
    BadCompressedData,
}

impl ProtocolError {
    /// The code of the close frame that answers this error.
    pub fn close_code(self) -> CloseCode {
        match self {
            ProtocolError::MessageTooBig => CloseCode::MESSAGE_TOO_BIG,
            ProtocolError::InvalidUtf8
            | ProtocolError::InvalidCloseReason
            | ProtocolError::BadCompressedData => CloseCode::INVALID_PAYLOAD,
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }

    /// A short description, also used as the close reason.
    pub fn as_str(self) -> &'static str {
        match self {
            ProtocolError::UnmaskedFrame => "client frame not masked",
            ProtocolError::MaskedFrame => "server frame masked",
            ProtocolError::ReservedBits => "reserved bits set",
            ProtocolError::UnknownOpcode(_) => "unknown opcode",
            ProtocolError::ControlFrameTooLong => "control frame over 125 bytes",
            ProtocolError::FragmentedControlFrame => "fragmented control frame",
            ProtocolError::LengthOverflow => "64-bit length with high bit set",
            ProtocolError::NonMinimalLength => "length not minimally encoded",
            ProtocolError::UnexpectedContinuation => "continuation without a message",
            ProtocolError::ExpectedContinuation => "new message inside a fragmented one",
            ProtocolError::MessageTooBig => "message too big",
            ProtocolError::InvalidUtf8 => "invalid UTF-8 in text message",
            ProtocolError::CloseFrameTooShort => "close payload of 1 byte",
            ProtocolError::InvalidCloseCode(_) => "invalid close code",
            ProtocolError::InvalidCloseReason => "close reason not UTF-8",
            ProtocolError::BadCompressedData => "compressed message does not inflate",
        }
    }

    /// How `terminate` is told about it.
    pub fn to_terminate_error(self) -> TerminateError {
        match self {
            ProtocolError::MessageTooBig => TerminateError::MessageTooBig,
            ProtocolError::InvalidUtf8 | ProtocolError::InvalidCloseReason => {
                TerminateError::InvalidUtf8
            }
            other => TerminateError::Protocol(other.as_str()),
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::UnknownOpcode(op) => write!(f, "unknown opcode {op:#x}"),
            ProtocolError::InvalidCloseCode(c) => write!(f, "invalid close code {c}"),
            other => f.write_str(other.as_str()),
        }
    }
}

impl std::error::Error for ProtocolError {}
