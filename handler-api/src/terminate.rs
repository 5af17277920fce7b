//! Why a connection ended, as `terminate` is told.

use std::fmt;

use crate::close::CloseCode;

/// Why a connection ended (the seed's `terminate_reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TerminateReason {
    /// Closed by the engine on request of something other than the gear or the peer,
    /// for instance a connection handle's `close`.
    Normal,
    /// The gear sent a close frame, or the server drained.
    Stop,
    /// No data arrived within the idle timeout; the engine sent close 1000.
    Timeout,
    /// The peer went away without a close frame (EOF or reset).
    Remote,
    /// The peer sent a close frame. `code` is `None` when the frame carried no status.
    RemoteClose {
        /// The peer's status code.
        code: Option<CloseCode>,
        /// The peer's reason (valid UTF-8, at most 123 bytes).
        reason: String,
    },
    /// Something failed; the error says what.
    Error(TerminateError),
}

/// The failures that end a connection, each with the close code the engine sent.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TerminateError {
    /// The peer broke RFC 6455 (close 1002); the text names the rule.
    Protocol(&'static str),
    /// A text message or close reason was not UTF-8 (close 1007).
    InvalidUtf8,
    /// A message exceeded the size limit (close 1009).
    MessageTooBig,
    /// The peer stopped reading and the outgoing buffer limit was reached (close 1008).
    SlowConsumer,
    /// A callback panicked (close 1011); the text is the panic message.
    HandlerPanic(String),
    /// The gear asked to close with a code that is not valid on the wire (close 1011).
    InvalidCloseCode(u16),
    /// The peer did not answer a server ping before the pong deadline; the socket was closed.
    PongTimeout,
    /// The peer did not answer our close frame in time; the socket was closed.
    ClosingTimeout,
    /// A socket error; the value is the `errno`.
    Io(i32),
    /// The connection registered this name from a callback while a connection on
    /// another node of the cluster claimed it too, and the other claim won (close
    /// 3409, [`CloseCode::NAME_CONFLICT`]). See the `registry` crate for the rule.
    NameConflict(String),
}

impl TerminateError {
    /// The close code sent to the peer for this error, if a close frame was sent.
    pub fn close_code(&self) -> Option<CloseCode> {
        match self {
            TerminateError::Protocol(_) => Some(CloseCode::PROTOCOL_ERROR),
            TerminateError::InvalidUtf8 => Some(CloseCode::INVALID_PAYLOAD),
            TerminateError::MessageTooBig => Some(CloseCode::MESSAGE_TOO_BIG),
            TerminateError::SlowConsumer => Some(CloseCode::POLICY_VIOLATION),
            TerminateError::HandlerPanic(_) | TerminateError::InvalidCloseCode(_) => {
                Some(CloseCode::INTERNAL_ERROR)
            }
            TerminateError::NameConflict(_) => Some(CloseCode::NAME_CONFLICT),
            TerminateError::PongTimeout
            | TerminateError::ClosingTimeout
            | TerminateError::Io(_) => None,
        }
    }
}

impl fmt::Display for TerminateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TerminateError::Protocol(what) => write!(f, "protocol error: {what}"),
            TerminateError::InvalidUtf8 => f.write_str("invalid UTF-8"),
            TerminateError::MessageTooBig => f.write_str("message too big"),
            TerminateError::SlowConsumer => f.write_str("slow consumer"),
            TerminateError::HandlerPanic(m) => write!(f, "handler panicked: {m}"),
            TerminateError::InvalidCloseCode(c) => write!(f, "gear sent invalid close code {c}"),
            TerminateError::PongTimeout => f.write_str("no pong before the deadline"),
            TerminateError::ClosingTimeout => f.write_str("closing handshake timed out"),
            TerminateError::Io(errno) => write!(f, "socket error (errno {errno})"),
            TerminateError::NameConflict(name) => {
                write!(f, "name {name:?} was taken by a connection on another node")
            }
        }
    }
}

impl std::error::Error for TerminateError {}

impl fmt::Display for TerminateReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TerminateReason::Normal => f.write_str("normal"),
            TerminateReason::Stop => f.write_str("stop"),
            TerminateReason::Timeout => f.write_str("timeout"),
            TerminateReason::Remote => f.write_str("remote"),
            TerminateReason::RemoteClose {
                code: Some(c),
                reason,
            } => {
                write!(f, "remote close {c} {reason:?}")
            }
            TerminateReason::RemoteClose { code: None, .. } => f.write_str("remote close"),
            TerminateReason::Error(e) => write!(f, "error: {e}"),
        }
    }
}
